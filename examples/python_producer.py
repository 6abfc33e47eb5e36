#!/usr/bin/env python3
"""Submit a job to taskmill over plain AMQP and wait for its completion event.

This shows that a producer needs nothing from taskmill but the broker: no Rust, no
database access. It uses the `pika` library (`pip install pika`).

    python3 examples/python_producer.py                          # 10 echo tasks
    python3 examples/python_producer.py --type taskmill.sleep --tasks 3
    python3 examples/python_producer.py --fail                   # job.failed, exit 1

Environment:
    AMQP_URL             broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
    TASKMILL_PREFIX      name prefix of every exchange and queue (default "taskmill")
    TASKMILL_QUEUE_TYPE  "classic" (default) or "quorum": must match the workers',
                         since this script declares the intake queue the same way

Output: the job id on the first line, then the job event as JSON.
Exit status: 0 if the job ended `job.done`, 1 if it failed, was cancelled or was
rejected (or could not be submitted), 2 if no event arrived within --timeout.

Note: a request taskmill cannot accept (bad field, unknown task type, ...) is moved
to the `{prefix}.parking` queue with the reason in a header, and answered with a
`job.rejected` event whose `first_error` is the reason.
"""

import argparse
import json
import os
import sys
import time
import uuid

import pika
import pika.exceptions

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
SCHEMA_VERSION = 1  # the only version taskmill accepts; any other is parked

EXIT_DONE, EXIT_NOT_DONE, EXIT_TIMEOUT = 0, 1, 2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--type",
        help="job type, also the task handler (default taskmill.echo, "
        "or taskmill.fail with --fail)",
    )
    parser.add_argument("--tasks", type=int, default=10, help="number of tasks (default 10)")
    parser.add_argument(
        "--timeout", type=float, default=60, help="seconds to wait for the event (default 60)"
    )
    parser.add_argument(
        "--fail",
        action="store_true",
        help='make every task fail for good (payload {"times": 99, "permanent": true}, '
        "for the built-in taskmill.fail handler)",
    )
    args = parser.parse_args()
    if args.tasks < 0:
        parser.error("--tasks must be 0 or more")
    if args.type is None:
        args.type = "taskmill.fail" if args.fail else "taskmill.echo"
    return args


def declare_topology(channel, prefix):
    """Declares what a request needs to be routed, so that it is accepted (and waits
    in the intake queue) even if no taskmill worker has started yet.

    taskmill declares exactly these itself; declaring is idempotent as long as the
    arguments are identical, so nothing here may differ from taskmill's own
    declarations (a mismatch closes the channel with PRECONDITION_FAILED).
    """
    for exchange in (f"{prefix}.jobs", f"{prefix}.events"):
        channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)

    # The intake queue receives every request (binding key "#"). With
    # TASKMILL_QUEUE_TYPE=quorum taskmill declares its queues as quorum queues.
    arguments = None
    if os.environ.get("TASKMILL_QUEUE_TYPE") == "quorum":
        arguments = {"x-queue-type": "quorum"}
    intake = f"{prefix}.intake"
    channel.queue_declare(queue=intake, durable=True, arguments=arguments)
    channel.queue_bind(queue=intake, exchange=f"{prefix}.jobs", routing_key="#")


def subscribe_to_job_event(channel, prefix, job_id):
    """Creates a private queue that will receive this job's event.

    It must exist *before* the request is published: the events exchange does not
    keep messages for queues bound later, so binding afterwards could miss an event
    for a job that finishes fast.

    (Alternative: set "on_complete": {"exchange": "", "routing_key": <queue name>}
    in the request, and taskmill also sends the event straight to that queue through
    the default exchange. Either way, create the queue before publishing.)
    """
    # Server-named, exclusive (only this connection), auto-deleted when we leave.
    result = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
    queue = result.method.queue
    # Events are routed as job.done.<id>, job.failed.<id>, job.cancelled.<id> or
    # job.rejected.<id>.
    channel.queue_bind(queue=queue, exchange=f"{prefix}.events", routing_key=f"job.*.{job_id}")
    return queue


def build_request(args, job_id):
    if args.fail:
        # taskmill.fail fails its first `times` attempts; permanent = no retries.
        payloads = [{"n": i, "times": 99, "permanent": True} for i in range(args.tasks)]
    else:
        payloads = [{"n": i} for i in range(args.tasks)]
    # taskmill parks requests with unknown fields, so send only these. Optional
    # ones are shown with their defaults.
    return {
        "version": SCHEMA_VERSION,
        "job_id": job_id,  # idempotency key: resending the same id creates no new job
        "job_type": args.type,
        # "task_type": ...,      # handler of each task; defaults to job_type
        "queue": "default",  # worker pool
        "params": {},
        "tasks": payloads,
        "max_retries": 3,
        "retry_delay_ms": 5000,
        "on_failure": "fail_fast",  # or "continue": run every task, then report
    }


def publish_request(channel, prefix, request):
    """Publishes the request persistently and waits for the broker's confirm.

    With confirms on, pika's BlockingChannel.basic_publish blocks until the broker
    acks; with mandatory=True an unroutable message (no intake queue bound) raises
    UnroutableError instead of being silently dropped.
    """
    channel.basic_publish(
        exchange=f"{prefix}.jobs",
        routing_key=request["job_type"],  # the routing key is the job type
        body=json.dumps(request).encode("utf-8"),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,  # persistent
            message_id=request["job_id"],
        ),
        mandatory=True,
    )


def wait_for_event(channel, queue, job_id, timeout):
    """Returns the job's event (a dict), or None if none arrived within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        # auto_ack: the queue is ours alone and disappears with us anyway.
        for _method, _properties, body in channel.consume(
            queue, auto_ack=True, inactivity_timeout=0.5
        ):
            if body is not None:
                try:
                    event = json.loads(body)
                except ValueError:
                    print("ignoring an unreadable event", file=sys.stderr)
                else:
                    # job.stage events report a multi-stage job's progress, not its end.
                    if event.get("job_id") == job_id and event.get("event") != "job.stage":
                        return event
            if time.monotonic() >= deadline:
                return None
    finally:
        channel.cancel()


def main():
    args = parse_args()
    prefix = os.environ.get("TASKMILL_PREFIX", "taskmill")
    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)

    # uuid4 uses only hex digits and "-", inside taskmill's job id alphabet
    # (A-Z a-z 0-9 - _ :, at most 128 characters). Ids never contain ".", which
    # would break the job.*.<id> binding key.
    job_id = str(uuid.uuid4())

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_topology(channel, prefix)
        queue = subscribe_to_job_event(channel, prefix, job_id)
        try:
            publish_request(channel, prefix, build_request(args, job_id))
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as err:
            print(f"job request not accepted by the broker: {err!r}", file=sys.stderr)
            return EXIT_NOT_DONE
        print(job_id, flush=True)

        event = wait_for_event(channel, queue, job_id, args.timeout)
    finally:
        if connection.is_open:
            connection.close()

    if event is None:
        print(f"no event for job {job_id} within {args.timeout:g}s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(json.dumps(event, indent=2))
    return EXIT_DONE if event.get("event") == "job.done" else EXIT_NOT_DONE


if __name__ == "__main__":
    sys.exit(main())
