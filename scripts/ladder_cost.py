#!/usr/bin/env python3
"""Broker CPU per message of a delay-ladder design, measured on the local RabbitMQ.

Each run declares one design in a vhost of its own, publishes N persistent messages
with confirms (pipelined, paced) that each wait W ms, consumes them from the work queue
with acks, and reports the broker's CPU (beam.smp's utime + stime from /proc) over the
run, less what the broker spends idle over the same time (sampled just before), per
message. Arrival lateness (arrival - publish - wait) is reported too.

    pip install aio-pika
    python3 scripts/ladder_cost.py --design direct,binary --wait 100,5000,15000
    python3 scripts/ladder_cost.py --design digits:10 --queue-type quorum

Designs:
    direct            the work queue straight through the default exchange (no wait)
    binary            32 power-of-two levels, topic routing level by level (one routing
                      per level from the entry down, one queue per 1 digit)
    digits:B[:MODE][:roundN]
                      base-B levels, one queue per nonzero digit value (TTL d * B^k);
                      MODE is how a level passes on a 0 digit: chain (the default:
                      to the level below), skip (every exchange binds every queue
                      below it) or done (chain, but the zeros after the last nonzero
                      digit are spelled "_" and go straight to delivery); ":roundN"
                      rounds a wait to its N leading nonzero digits (N hops at most).
                      taskmill's ladder is digits:10:done:round3.
    perwait           one queue per wait (the unbounded design the ladder replaces;
                      a reference for what one hop costs)

Needs the management API (guest/guest, RABBITMQ_API, default http://127.0.0.1:15672/api)
to create and delete the vhosts; RABBITMQ_PORT (default 5672) is the AMQP port, and
the broker counted is the process listening there. On a shared broker other vhosts'
traffic is counted too: a node of its own (another RABBITMQ_NODENAME and ports) keeps
the figures clean. Repeat runs (--repeat) and read the lowest figure.
"""

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import time
import urllib.request
import uuid

import aio_pika

API = os.environ.get("RABBITMQ_API", "http://127.0.0.1:15672/api")
AMQP_PORT = int(os.environ.get("RABBITMQ_PORT", "5672"))
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()
MAX_DELAY_MS = (1 << 32) - 1
POOL = "default"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def api(method, path, body=None):
    request = urllib.request.Request(
        API + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return response.read()


def beam_pid():
    """The broker that listens on the AMQP port (other nodes on the machine are not
    counted)."""
    listening = subprocess.check_output(["ss", "-Hltnp", f"sport = :{AMQP_PORT}"], text=True)
    return int(listening.split("pid=")[1].split(",")[0])


def beam_cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


def queue_args(options, ttl=None, dlx=None, dlk=None):
    args = {}
    if ttl is not None:
        args["x-message-ttl"] = ttl
    if dlx is not None:
        args["x-dead-letter-exchange"] = dlx
    if dlk is not None:
        args["x-dead-letter-routing-key"] = dlk
    if options.queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if ttl is not None:
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    elif options.queue_version:
        args["x-queue-version"] = options.queue_version
    return args


async def declare_queue(channel, name, args):
    return await channel.declare_queue(name, durable=True, arguments=args)


async def declare_topic(channel, name):
    return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)


class Direct:
    queues = 0

    async def declare(self, channel, options, work):
        pass

    def route(self, wait_ms):
        return "", "work"


class PerWait:
    """One queue per wait, dead-lettering straight to the work queue."""

    def __init__(self):
        self.queues = 0

    async def declare(self, channel, options, work):
        self.channel, self.options = channel, options

    async def prepare(self, waits):
        for wait in waits:
            args = queue_args(self.options, ttl=wait, dlx="", dlk="work")
            await declare_queue(self.channel, f"wait.{wait}", args)
            self.queues += 1

    def route(self, wait_ms):
        return "", f"wait.{wait_ms}"


class Digits:
    """A ladder of base-`base` levels: level k's queues hold a message d * base^k ms.

    How a level's exchange passes on a 0 digit (`mode`):
      chain  to the exchange of the level below, one routing per 0 digit;
      skip   each exchange binds every queue below it (zeros down to it, then its
             digit), so a message goes from queue to queue in one routing;
      done   as chain, but the 0 digits below the last nonzero one are spelled "_",
             which each exchange binds straight to the delivery exchange.
    """

    def __init__(self, base, mode="chain", most_hops=None):
        self.base, self.mode, self.most_hops = base, mode, most_hops
        self.levels = 1
        while base**self.levels <= MAX_DELAY_MS:
            self.levels += 1
        self.queues = 0

    def rounded(self, wait_ms):
        """The wait rounded to its `most_hops` leading nonzero digits."""
        if self.most_hops is None:
            return wait_ms
        nonzero = [level for level in range(self.levels) if (wait_ms // self.base**level) % self.base]
        if len(nonzero) <= self.most_hops:
            return wait_ms
        unit = self.base ** nonzero[-self.most_hops]
        nearest = (wait_ms + unit // 2) // unit * unit
        return nearest if nearest <= MAX_DELAY_MS else wait_ms // unit * unit

    def digits(self, wait_ms):
        """The wait's digits, highest level first."""
        wait_ms = self.rounded(wait_ms)
        out = []
        for level in reversed(range(self.levels)):
            out.append((wait_ms // self.base**level) % self.base)
        return out

    def exchange(self, level):
        return "deliver" if level < 0 else f"delay.{level:02}"

    def queue(self, level, digit):
        return f"delay.{level:02}.{digit}"

    def binding(self, level, pattern):
        """Skip the words of the levels above `level`, then `pattern`, then the rest."""
        return ".".join(["*"] * (self.levels - 1 - level) + pattern + ["#"])

    async def bind_exchange(self, channel, destination, level, pattern):
        await channel.channel.exchange_bind(
            destination=destination,
            source=self.exchange(level),
            routing_key=self.binding(level, pattern),
        )

    async def declare(self, channel, options, work):
        await declare_topic(channel, "deliver")
        await work.bind("deliver", ".".join(["*"] * self.levels + [POOL]))
        exchanges = {}
        for level in range(self.levels):
            exchanges[level] = await declare_topic(channel, self.exchange(level))
        for level in range(self.levels):
            for digit in range(1, self.base):
                if digit * self.base**level > MAX_DELAY_MS:
                    break
                name = self.queue(level, digit)
                args = queue_args(
                    options, ttl=digit * self.base**level, dlx=self.exchange(level - 1)
                )
                queue = await declare_queue(channel, name, args)
                self.queues += 1
                if self.mode != "skip":
                    await queue.bind(exchanges[level], self.binding(level, [str(digit)]))
                    continue
                for above in range(level, self.levels):
                    zeros = ["0"] * (above - level)
                    await queue.bind(
                        exchanges[above], self.binding(above, zeros + [str(digit)])
                    )
            if self.mode == "skip":
                await self.bind_exchange(channel, "deliver", level, ["0"] * (level + 1))
                continue
            await self.bind_exchange(channel, self.exchange(level - 1), level, ["0"])
            if self.mode == "done":
                await self.bind_exchange(channel, "deliver", level, ["_"])

    def route(self, wait_ms):
        digits = self.digits(wait_ms)
        words = [str(d) for d in digits]
        if self.mode == "done":
            for i in reversed(range(len(digits))):
                if digits[i]:
                    break
                words[i] = "_"
        highest = next((i for i, d in enumerate(digits) if d), len(digits) - 1)
        return self.exchange(self.levels - 1 - highest), ".".join(words + [POOL])

    def hops(self, wait_ms):
        return sum(1 for d in self.digits(wait_ms) if d)


def design(spec):
    if spec == "direct":
        return Direct()
    if spec == "perwait":
        return PerWait()
    if spec == "binary":
        return Digits(2)
    parts = spec.split(":")
    if parts[0] == "digits":
        most = [int(p[len("round"):]) for p in parts[2:] if p.startswith("round")]
        modes = [p for p in parts[2:] if p in ("chain", "skip", "done")]
        return Digits(int(parts[1]), mode=(modes or ["chain"])[0], most_hops=(most or [None])[0])
    raise SystemExit(f"unknown design {spec}")


async def run(spec, wait_ms, options):
    vhost = f"ladder_cost_{uuid.uuid4().hex[:12]}"
    api("PUT", f"/vhosts/{vhost}")
    api("PUT", f"/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        return await measure(spec, wait_ms, options, vhost)
    finally:
        api("DELETE", f"/vhosts/{vhost}")


async def measure(spec, wait_ms, options, vhost):
    the_design = design(spec)
    url = f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}/{vhost}"
    publisher = await aio_pika.connect(url)
    consumer_connection = await aio_pika.connect(url)
    channel = await publisher.channel(publisher_confirms=True, on_return_raises=True)
    work = await declare_queue(channel, "work", queue_args(options))
    await the_design.declare(channel, options, work)
    if isinstance(the_design, PerWait):
        await the_design.prepare([wait_ms])
    consume_channel = await consumer_connection.channel()
    await consume_channel.set_qos(prefetch_count=500)
    consume_queue = await consume_channel.get_queue("work")

    count = options.messages
    sent_at, lateness = {}, []
    done = asyncio.Event()
    received = 0

    async def on_message(message):
        nonlocal received
        now = time.monotonic()
        number = int(message.headers["n"])
        lateness.append((now - sent_at[number]) * 1000 - wait_ms)
        received += 1
        if received % 100 == 0 or received == count:
            await message.ack(multiple=True)
        if received == count:
            done.set()

    await consume_queue.consume(on_message)

    pid = beam_pid()
    idle_start, idle_cpu = time.monotonic(), beam_cpu_ms(pid)
    await asyncio.sleep(options.idle)
    idle_rate = (beam_cpu_ms(pid) - idle_cpu) / (time.monotonic() - idle_start)

    body = json.dumps({"version": 1, "job_id": "x" * 36, "payload": "y" * 150}).encode()
    window = asyncio.Semaphore(options.window)
    interval = 1.0 / options.rate

    async def publish(n):
        exchange_name, key = the_design.route(wait_ms)
        exchange = channel.default_exchange if exchange_name == "" else await channel.get_exchange(
            exchange_name, ensure=False
        )
        message = aio_pika.Message(
            body,
            headers={"n": n, "x-taskmill-sent-ms": int(time.time() * 1000)},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        sent_at[n] = time.monotonic()
        try:
            await exchange.publish(message, key, mandatory=True)
        finally:
            window.release()

    start, cpu_start = time.monotonic(), beam_cpu_ms(pid)
    tasks = []
    for n in range(count):
        await window.acquire()
        tasks.append(asyncio.create_task(publish(n)))
        behind = start + n * interval - time.monotonic()
        if behind > 0:
            await asyncio.sleep(behind)
    await asyncio.gather(*tasks)
    await asyncio.wait_for(done.wait(), timeout=wait_ms / 1000 + 120)
    # Let the acks and whatever the broker defers (index flushes) land.
    await asyncio.sleep(options.settle)
    elapsed = time.monotonic() - start
    cpu = beam_cpu_ms(pid) - cpu_start - idle_rate * elapsed
    await publisher.close()
    await consumer_connection.close()
    late = sorted(lateness)
    hops = the_design.hops(wait_ms) if hasattr(the_design, "hops") else (1 if spec == "perwait" else 0)
    return {
        "design": spec,
        "wait_ms": wait_ms,
        "queues": the_design.queues,
        "hops": hops,
        "cpu_ms_per_msg": cpu / count,
        "late_ms_median": statistics.median(late),
        "late_ms_p99": late[int(len(late) * 0.99) - 1],
        "late_ms_max": late[-1],
        "elapsed_s": elapsed,
    }


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--design", default="direct,binary")
    parser.add_argument("--wait", default="100,5000,15000", help="waits in ms, comma-separated")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000, help="publishes per second")
    parser.add_argument("--window", type=int, default=200, help="unconfirmed publishes at most")
    parser.add_argument("--queue-type", default="classic", choices=["classic", "quorum"])
    parser.add_argument("--queue-version", type=int, default=0, help="classic queue version (1 or 2)")
    parser.add_argument("--idle", type=float, default=3, help="seconds of idle sampling")
    parser.add_argument("--settle", type=float, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    for _ in range(options.repeat):
        for spec in options.design.split(","):
            for wait in [int(w) for w in options.wait.split(",")]:
                if spec == "direct" and wait != int(options.wait.split(",")[0]):
                    continue
                result = await run(spec, wait, options)
                if options.json:
                    print(json.dumps(result), flush=True)
                else:
                    print(
                        f"{result['design']:>16} wait {wait:>6} ms  queues {result['queues']:>3}"
                        f"  hops {result['hops']:>2}  {result['cpu_ms_per_msg']:.3f} CPU ms/msg"
                        f"  late median {result['late_ms_median']:.1f} p99 {result['late_ms_p99']:.1f}"
                        f" max {result['late_ms_max']:.1f} ms  ({result['elapsed_s']:.1f} s)",
                        flush=True,
                    )


if __name__ == "__main__":
    asyncio.run(main())
