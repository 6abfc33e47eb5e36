#!/usr/bin/env python3
"""What jobs in parts that wait for their next part cost a running pod.

Against one `taskmill worker` already running on PostgreSQL and RabbitMQ (see
docs/benchmarks.md): samples the database's commits and the pod's broker frames per
second with no job at all, then sends the first part (one task) of JOBS jobs that are
never sealed, waits for their tasks to finish and the feeders to rest, and samples again.
Prints both rows; the difference is what the waiting jobs cost.

    python3 scripts/idle_forming.py --jobs 1000 --database taskmill_idle --vhost idle

Needs pika (pip install pika) and psql on the PATH; the management plugin for frames.
"""

import argparse
import base64
import json
import subprocess
import time
import urllib.request
import uuid

import pika


def psql(database, sql):
    out = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-Atc", sql],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def commits(database):
    return int(psql(database, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{database}'"))


def frames(api, auth, vhost):
    request = urllib.request.Request(f"{api}/connections", headers={"Authorization": auth})
    with urllib.request.urlopen(request) as response:
        connections = json.load(response)
    # The pod's connections: the script's own is closed while it samples.
    return sum(c.get("recv_cnt", 0) + c.get("send_cnt", 0) for c in connections
               if c.get("vhost") == vhost)


def sample(database, api, auth, vhost, seconds):
    c0, f0, t0 = commits(database), frames(api, auth, vhost), time.monotonic()
    time.sleep(seconds)
    c1, f1, t1 = commits(database), frames(api, auth, vhost), time.monotonic()
    return (c1 - c0) / (t1 - t0), (f1 - f0) / (t1 - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--database", required=True)
    parser.add_argument("--vhost", default="/")
    parser.add_argument("--api", default="http://127.0.0.1:15672/api")
    parser.add_argument("--prefix", default="taskmill")
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    auth = "Basic " + base64.b64encode(b"guest:guest").decode()

    idle = sample(args.database, args.api, auth, args.vhost, args.seconds)
    print(f"no job:      {idle[0]:8.1f} commits/s {idle[1]:8.1f} broker frames/s")

    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", 5672, args.vhost, pika.PlainCredentials("guest", "guest")))
    channel = connection.channel()
    channel.confirm_delivery()
    jobs = [f"idle-{uuid.uuid4().hex}" for _ in range(args.jobs)]
    for job_id in jobs:
        request = {"version": 1, "job_id": job_id, "job_type": "taskmill.echo",
                   "part": {"number": 1, "offset": 0}, "tasks": [{"n": 0}]}
        channel.basic_publish(
            f"{args.prefix}.jobs", "taskmill.echo", json.dumps(request).encode(),
            pika.BasicProperties(content_type="application/json", delivery_mode=2))
    connection.close()

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        done = int(psql(args.database, "SELECT count(*) FROM tasks t JOIN jobs j ON j.id = t.job_id "
                        "WHERE j.id LIKE 'idle-%' AND t.status = 'done'"))
        leases = int(psql(args.database, "SELECT count(*) FROM leases WHERE name LIKE 'feed:idle-%'"))
        if done >= args.jobs and leases == 0:
            break
        time.sleep(1)
    else:
        raise SystemExit(f"only {done} of {args.jobs} first parts ran, {leases} feeders left")
    # A feeder may still be between its last look and its rest; give them all time.
    time.sleep(10)

    waiting = sample(args.database, args.api, auth, args.vhost, args.seconds)
    print(f"{args.jobs} forming: {waiting[0]:8.1f} commits/s {waiting[1]:8.1f} broker frames/s")


if __name__ == "__main__":
    main()
