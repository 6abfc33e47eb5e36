//! The cap on every payload taskmill makes: a task's result (a map task's output among
//! them), a reduce task's input, the finalize task's input and a job's result. Each is
//! checked where it is made, so that nothing over it ever reaches a table or the
//! broker: a task message over the worker's size limit would be parked while its row
//! waits, re-sent by the sweeper and parked again for ever.

use serde_json::Value;

/// The cap when `TASKMILL_MAX_PAYLOAD_BYTES` does not set one: half of RabbitMQ's own
/// limit on a message (16 MiB by default in 3.13 and 4), so that a task message holding
/// a payload at the cap still fits with room to spare.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// Room a task message keeps for what is not its payload (a job id of at most 128
/// characters, a task type of at most 200, a few numbers; under 1 KiB even with every
/// character escaped): a payload cap is never above the request limit less this.
pub const ENVELOPE_BYTES: usize = 4 * 1024;

/// The bytes `value` takes as JSON, counted without building the text.
pub fn json_bytes(value: &Value) -> u64 {
    struct Counter(u64);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len() as u64;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).expect("a JSON value serializes");
    counter.0
}

/// Why `what` (say, "the result of task 12") is refused: its size against the cap.
pub fn over_cap(what: &str, bytes: u64, cap: usize) -> String {
    format!("{what} is {bytes} bytes, over the cap of {cap} bytes (TASKMILL_MAX_PAYLOAD_BYTES)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_the_json_text_length() {
        for value in [
            serde_json::json!(null),
            serde_json::json!({ "a": [1, 2.5, "ü\u{0}"], "b": { "c": true } }),
        ] {
            assert_eq!(json_bytes(&value), value.to_string().len() as u64);
        }
    }
}
