#!/usr/bin/env python3
"""One Celery measurement of scripts/peers/run.sh; prints one JSON line.

    celery_bench.py chord --tasks 10000       # one chord of N echo tasks, no-op callback
    celery_bench.py chords --jobs 1000        # 1,000 chords of 10, submitted at once
    ... [--concurrency C]                     # pool processes (default: one per core)

Starts a fresh `celery worker` at its defaults (prefork, one process per core, unless
--concurrency says otherwise), waits
until it consumes, submits, and times from the first submit until every chord's
callback has stored its result (polled in the result backend's table every 20 ms, as
`taskmill bench` polls its job events), then stops the worker. The environment comes
from run.sh: PEERS_CELERY_BROKER, PEERS_CELERY_BACKEND, PEERS_CELERY_DSN (libpq, for
the polling), PEERS_RABBIT_API and PEERS_VHOST (management API, for readiness) and
PEERS_RUN_DIR (the worker's log and pid file, which run.sh's clean-up reads).
"""

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import psycopg2

HERE = os.path.dirname(os.path.abspath(__file__))
POLL_S = 0.02
TIMEOUT_S = 600


def api_get(path):
    auth = base64.b64encode(b"guest:guest").decode()
    request = urllib.request.Request(
        f"{os.environ['PEERS_RABBIT_API']}/{path}", headers={"Authorization": f"Basic {auth}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def consumers(queue):
    vhost = urllib.parse.quote(os.environ["PEERS_VHOST"], safe="")
    try:
        return api_get(f"queues/{vhost}/{queue}").get("consumers", 0)
    except OSError:
        return 0


class Worker:
    """`celery worker` at its defaults, in a process group of its own."""

    def __init__(self, label, concurrency):
        run_dir = os.environ["PEERS_RUN_DIR"]
        self.pid_file = os.path.join(run_dir, "pids", f"celery-{label}.pid")
        self.log = open(os.path.join(run_dir, f"celery-worker-{label}.log"), "w")
        self.process = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "celery"), "-A", "celery_app",
             "worker", "--loglevel=WARNING"]
            + (["--concurrency", str(concurrency)] if concurrency else []),
            cwd=HERE, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        with open(self.pid_file, "w") as f:
            f.write(str(self.process.pid))

    def wait_ready(self):
        deadline = time.monotonic() + 120
        while consumers("celery") < 1:
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker exited ({self.process.returncode}); see {self.log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"celery worker not consuming after 120 s; see {self.log.name}")
            time.sleep(0.2)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its pool processes, if any remain
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()
        os.remove(self.pid_file)


def wait_for(cursor, ids):
    """Until every id has a SUCCESS row; a FAILURE ends the wait with an error."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        cursor.execute(
            "SELECT status, count(*) FROM celery_taskmeta WHERE task_id = ANY(%s) GROUP BY status",
            (ids,),
        )
        counts = dict(cursor.fetchall())
        if counts.get("SUCCESS", 0) == len(ids):
            return time.perf_counter()
        if counts.get("FAILURE"):
            raise RuntimeError(f"{counts['FAILURE']} chord callbacks failed")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {counts.get('SUCCESS', 0)} of {len(ids)} chords done after {TIMEOUT_S} s")
        time.sleep(POLL_S)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["chord", "chords"])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks of the one chord")
    parser.add_argument("--jobs", type=int, default=1_000, help="chords of 10")
    parser.add_argument("--concurrency", type=int, help="pool processes (default: Celery's, one per core)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sys.path.insert(0, HERE)
    from celery import chord

    from celery_app import app, done, echo

    # The result tables, created now rather than by the first task, and emptied.
    app.backend.ResultSession().close()
    db = psycopg2.connect(os.environ["PEERS_CELERY_DSN"])
    db.autocommit = True
    cursor = db.cursor()
    cursor.execute("TRUNCATE celery_taskmeta, celery_tasksetmeta")

    jobs, per_job = (1, args.tasks) if args.scenario == "chord" else (args.jobs, 10)
    worker = Worker(args.scenario, args.concurrency)
    try:
        worker.wait_ready()
        started = time.perf_counter()
        ids = [chord([echo.s(n) for n in range(per_job)])(done.s()).id for _ in range(jobs)]
        submitted = time.perf_counter()
        ended = wait_for(cursor, ids)
    finally:
        worker.stop()
        db.close()
    seconds = ended - started
    print(json.dumps({
        "system": "celery",
        "scenario": args.scenario,
        "worker": f"prefork, concurrency {args.concurrency}" if args.concurrency
        else f"prefork, concurrency {os.cpu_count()} (defaults)",
        "concurrency": args.concurrency or os.cpu_count(),
        "default_concurrency": not args.concurrency,
        "jobs": jobs,
        "tasks": jobs * per_job,
        "seconds": seconds,
        "submit_seconds": submitted - started,
        "tasks_per_s": jobs * per_job / seconds,
        "jobs_per_s": jobs / seconds,
    }))


if __name__ == "__main__":
    main()
