#!/usr/bin/env python3
"""Samples a job's progress and the broker's queues every second, for run.sh.

    sample.py DATABASE_URL JOB_ID MGMT_URL PREFIX

prints, once a second until killed, one line:

    epoch done_count rows_done work_ready work_unacked completion_ready completion_unacked unconfirmed

done_count is the job's counter (kept by the completion role), rows_done its task rows
in status done (written by the workers), the queue figures come from the management
API, and unconfirmed is the publishes that all channels in the cluster wait to have
confirmed. A figure that cannot be read is `-`. Standard library and psql only.
"""

import subprocess
import sys
import time

from mgmt import VHOST, call


def counts(db_url, job_id):
    query = (
        "SELECT done_count, (SELECT count(*) FROM tasks WHERE job_id = :'job' AND status = 'done')"
        " FROM jobs WHERE id = :'job'"
    )
    try:
        out = subprocess.run(
            ["psql", db_url, "-qAtX", "-F", " ", "-v", f"job={job_id}"],
            input=query,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.split()
    except subprocess.TimeoutExpired:
        out = []
    return out if len(out) == 2 else ["-", "-"]


def queues(base, prefix):
    figures = {}
    columns = "name,messages_ready,messages_unacknowledged"
    for queue in call(base, "GET", f"/api/queues/{VHOST}?columns={columns}", timeout=5):
        figures[queue["name"]] = (
            queue.get("messages_ready", "-"),
            queue.get("messages_unacknowledged", "-"),
        )
    work = figures.get(f"{prefix}.work.default", ("-", "-"))
    completion = figures.get(f"{prefix}.completion", ("-", "-"))
    return [*work, *completion]


def unconfirmed(base):
    channels = call(base, "GET", "/api/channels?columns=messages_unconfirmed", timeout=5)
    return [sum(channel.get("messages_unconfirmed", 0) or 0 for channel in channels)]


def main(argv):
    db_url, job_id, base, prefix = argv[1:5]
    while True:
        started = time.time()
        line = [f"{started:.3f}", *counts(db_url, job_id)]
        # Whatever the API answers (or not) while a node is down, sampling goes on.
        try:
            line += queues(base, prefix)
        except Exception as err:  # noqa: BLE001
            print(f"{started:.3f} queues: {err!r}", file=sys.stderr, flush=True)
            line += ["-"] * 4
        try:
            line += unconfirmed(base)
        except Exception as err:  # noqa: BLE001
            print(f"{started:.3f} channels: {err!r}", file=sys.stderr, flush=True)
            line += ["-"]
        print(" ".join(str(figure) for figure in line), flush=True)
        time.sleep(max(0.0, 1.0 - (time.time() - started)))


if __name__ == "__main__":
    main(sys.argv)
