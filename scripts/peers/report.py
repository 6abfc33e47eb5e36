#!/usr/bin/env python3
"""The table (or JSON) of scripts/peers/run.sh, from the measurements in its run directory.

    report.py RUN_DIR [--json]
    report.py --summary FILE      # one measurement in a line

RUN_DIR holds taskmill-<round>.json (`taskmill bench --only S1,S3 --json`) and one JSON
line per peer measurement: celery-<scenario>-<round>.json and
bullmq-<scenario>-c<concurrency>-<round>.json. Each row is the median of its rounds;
"taskmill is" is taskmill's median rate over the row's (tasks/s for one job, jobs/s for
the 1,000 jobs of 10), so above 1× taskmill is faster.
"""

import glob
import json
import os
import re
import statistics
import subprocess
import sys


# The peers' scenarios that match taskmill's S1 (one job of N) and S3 (1,000 jobs of 10).
SCENARIOS = {"S1": ("chord", "flow"), "S3": ("chords", "flows")}


def load(path):
    with open(path) as f:
        return json.load(f)


def median_row(name, system, scenario, rounds):
    """One table row from its rounds: the median of each rate."""
    first = rounds[0]
    return {
        "name": name,
        "system": system,
        "scenario": scenario,
        "worker": first.get("worker"),
        "jobs": first["jobs"],
        "tasks": first["tasks"],
        "seconds": statistics.median(r["seconds"] for r in rounds),
        "tasks_per_s": statistics.median(r["tasks_per_s"] for r in rounds),
        "jobs_per_s": statistics.median(r["jobs_per_s"] for r in rounds),
        # How long the submitter took to hand every job over (the peers only).
        "submit_seconds": statistics.median(r["submit_seconds"] for r in rounds)
        if all("submit_seconds" in r for r in rounds) else None,
        "tasks_per_s_rounds": [r["tasks_per_s"] for r in rounds],
        "jobs_per_s_rounds": [r["jobs_per_s"] for r in rounds],
    }


def taskmill_rows(run_dir):
    reports = [load(p) for p in sorted(glob.glob(os.path.join(run_dir, "taskmill-*.json")))]
    if not reports:
        return {}, None, None
    head = reports[0]
    worker = f"1 process, {head['worker_concurrency']} handlers, prefetch {head['worker_prefetch']}"
    if head["defaults"]:
        worker += " (defaults)"
    rows = {}
    for scenario in ("S1", "S3"):
        rounds = []
        for report in reports:
            found = [s for s in report["scenarios"] if s["name"] == scenario]
            if found:
                rounds.append({**found[0], "worker": worker})
        if rounds:
            rows[scenario] = median_row(f"taskmill {scenario}", "taskmill", scenario, rounds)
            if not all(r["all_done"] for r in rounds):
                rows[scenario]["note"] = "not every job done"
    broker = statistics.median(r["broker"]["messages_per_s"] for r in reports)
    return rows, broker, head.get("autovacuum")


def peer_rows(run_dir, system, label):
    """Rows of one peer, grouped by scenario and concurrency (the file name without the round)."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(run_dir, f"{system}-*.json"))):
        key = re.sub(r"-\d+\.json$", "", os.path.basename(path))
        groups.setdefault(key, []).append(load(path))
    rows = {}
    for key, rounds in groups.items():
        rows[key] = median_row(label(rounds[0]), system, rounds[0]["scenario"], rounds)
        if "concurrency" in rounds[0]:
            rows[key]["concurrency"] = rounds[0]["concurrency"]
            # The peer's default first (Celery's is one process per core, BullMQ's 1).
            rows[key]["default"] = rounds[0].get("default_concurrency", rounds[0]["concurrency"] == 1)
    return rows


def versions():
    """What ran: the peers' pinned packages and the services' versions."""
    found = {}
    try:
        import celery
        found["celery"] = celery.__version__
        import kombu
        found["kombu"] = kombu.__version__
        import sqlalchemy
        found["sqlalchemy"] = sqlalchemy.__version__
        import psycopg2
        found["psycopg2"] = psycopg2.__version__.split()[0]
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    for package in ("bullmq", "ioredis"):
        path = os.path.join(here, "node_modules", package, "package.json")
        if os.path.exists(path):
            found[package] = load(path)["version"]
    commands = {
        "node": ["node", "--version"],
        "redis": ["redis-server", "--version"],
        "postgresql": ["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "SHOW server_version"],
        "rabbitmq": ["curl", "-sf", "-u", "guest:guest", "http://127.0.0.1:15672/api/overview"],
    }
    for name, command in commands.items():
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if name == "redis":
            out = re.search(r"v=(\S+)", out).group(1) if "v=" in out else out
        elif name == "rabbitmq":
            out = json.loads(out).get("rabbitmq_version", "") if out else ""
        found[name] = out.lstrip("v").split()[0] if out else "?"
    return found


def summary(path):
    """One measurement in a line, for the progress log."""
    result = load(path)
    rates = lambda r: f"{r['tasks_per_s']:.0f} tasks/s, {r['jobs_per_s']:.1f} jobs/s"
    if "scenarios" in result:
        return "; ".join(f"{s['name']} {rates(s)}" for s in result["scenarios"]) + \
            f"; broker baseline {result['broker']['messages_per_s']:.0f} msg/s"
    return rates(result)


def main():
    if sys.argv[1] == "--summary":
        print(summary(sys.argv[2]))
        return
    run_dir = sys.argv[1]
    as_json = "--json" in sys.argv[2:]
    taskmill, broker, autovacuum = taskmill_rows(run_dir)
    celery = peer_rows(run_dir, "celery", lambda r: {
        "chord": f"Celery chord of {r['tasks']:,}",
        "chords": f"Celery {r['jobs']:,} chords × 10",
    }[r["scenario"]] + ("" if r.get("default_concurrency", True) else f", c={r['concurrency']}"))
    bullmq = peer_rows(run_dir, "bullmq", lambda r: {
        "flow": f"BullMQ flow of {r['tasks']:,}, c={r['concurrency']}",
        "flows": f"BullMQ {r['jobs']:,} flows × 10, c={r['concurrency']}",
    }[r["scenario"]])

    def rows_of(scenario, *peers):
        """taskmill's row first, then Celery's, then BullMQ's by concurrency."""
        rows = [taskmill[scenario]] if scenario in taskmill else []
        peer = [r for group in peers for r in group.values() if r["scenario"] in SCENARIOS[scenario]]
        order = {"celery": 0, "bullmq": 1}
        return rows + sorted(peer, key=lambda r: (order[r["system"]], not r.get("default", True), r.get("concurrency", 0)))

    one_job = rows_of("S1", celery, bullmq)
    many = rows_of("S3", celery, bullmq)

    s1 = taskmill.get("S1")
    s3 = taskmill.get("S3")
    for row in one_job:
        row["taskmill_is_x"] = s1["tasks_per_s"] / row["tasks_per_s"] if s1 else None
    for row in many:
        row["taskmill_is_x"] = s3["jobs_per_s"] / row["jobs_per_s"] if s3 else None
    rounds = max((len(r["tasks_per_s_rounds"]) for r in one_job + many), default=0)
    machine = {
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    result = {
        "machine": machine,
        "rounds": rounds,
        "broker_baseline_msg_per_s": broker,
        "postgresql_autovacuum": autovacuum,
        "versions": versions(),
        "one_job": one_job,
        "many_jobs": many,
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return

    print(f"taskmill and its peers: medians of {rounds} round(s); {machine['cores']} cores shared by "
          "the broker, the databases, the workers and the submitters (load average now "
          f"{machine['load_average']:.1f})")
    if autovacuum is not None:
        print(f"PostgreSQL autovacuum: {'on' if autovacuum else 'off'}")
    if broker:
        print(f"broker baseline (taskmill bench): {broker:,.0f} persistent msg/s")
    print()
    header = f"{'':<34} {'worker':<48} {'wall s':>7} {'jobs/s':>8} {'tasks/s':>8} {'(min–max)':>13} {'taskmill is':>11}"
    print(header)
    for title, rows in (("one job", one_job), ("many jobs at once", many)):
        print(f"{title}")
        for row in rows:
            spread = row["tasks_per_s_rounds"]
            ratio = row["taskmill_is_x"]
            print(f"  {row['name']:<32} {row['worker'] or '':<48} {row['seconds']:>7.2f} "
                  f"{row['jobs_per_s']:>8.1f} {row['tasks_per_s']:>8.0f} "
                  f"{f'{min(spread):.0f}–{max(spread):.0f}':>13} "
                  f"{'—' if row['system'] == 'taskmill' or ratio is None else f'{ratio:.1f}×':>11}"
                  f"{'  (' + row['note'] + ')' if row.get('note') else ''}")
    print()
    print("taskmill is: taskmill's median rate ÷ the row's (tasks/s for one job, jobs/s for many);")
    print("tasks/s count the N no-op tasks of each job, not the peers' callback or parent jobs")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))


if __name__ == "__main__":
    main()
