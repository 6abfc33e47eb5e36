#!/usr/bin/env python3
"""The RabbitMQ management HTTP API, for run.sh: standard library only.

    mgmt.py URL nodes                       running cluster nodes, one per line
    mgmt.py URL exchange-exists NAME        exit 0 if the exchange exists
    mgmt.py URL queues PREFIX               one line per queue under PREFIX:
                                            name type messages ready unacked consumers members online leader
    mgmt.py URL declare-audit QUEUE EXCHANGE KEY
                                            a durable quorum queue bound to EXCHANGE with KEY
    mgmt.py URL events QUEUE JOB_ID         takes every message of QUEUE (acked) and prints
                                            a JSON summary of the job events in it
    mgmt.py URL get QUEUE COUNT             prints up to COUNT messages, requeued

URL is a node's management base URL (http://127.0.0.1:15681); user guest/guest
(MGMT_USER / MGMT_PASSWORD to change). The default vhost `/` only.
"""

import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

VHOST = "%2F"


def call(base, method, path, body=None, timeout=30):
    user = os.environ.get("MGMT_USER", "guest")
    password = os.environ.get("MGMT_PASSWORD", "guest")
    request = urllib.request.Request(base.rstrip("/") + path, method=method)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, data=data, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text else None


def quote(name):
    return urllib.parse.quote(name, safe="")


def nodes(base):
    for node in call(base, "GET", "/api/nodes"):
        if node.get("running"):
            print(node["name"])


def exchange_exists(base, name):
    try:
        call(base, "GET", f"/api/exchanges/{VHOST}/{quote(name)}")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return 1
        raise
    return 0


def queues(base, prefix):
    columns = (
        "name,type,messages,messages_ready,messages_unacknowledged,consumers,members,online,leader"
    )
    for queue in call(base, "GET", f"/api/queues/{VHOST}?columns={columns}"):
        if not queue["name"].startswith(prefix + "."):
            continue
        members = queue.get("members")
        online = queue.get("online")
        print(
            queue["name"],
            queue.get("type", "classic"),
            queue.get("messages", 0) or 0,
            queue.get("messages_ready", 0) or 0,
            queue.get("messages_unacknowledged", 0) or 0,
            queue.get("consumers", 0) or 0,
            len(members) if members is not None else "-",
            len(online) if online is not None else "-",
            queue.get("leader") or "-",
        )


def declare_audit(base, queue, exchange, key):
    call(
        base,
        "PUT",
        f"/api/queues/{VHOST}/{quote(queue)}",
        {"durable": True, "auto_delete": False, "arguments": {"x-queue-type": "quorum"}},
    )
    call(
        base,
        "POST",
        f"/api/bindings/{VHOST}/e/{quote(exchange)}/q/{quote(queue)}",
        {"routing_key": key, "arguments": {}},
    )


def take(base, queue, count, ackmode):
    return call(
        base,
        "POST",
        f"/api/queues/{VHOST}/{quote(queue)}/get",
        {"count": count, "ackmode": ackmode, "encoding": "auto", "truncate": 1_000_000},
    )


def events(base, queue, job_id):
    """Every message of the audit queue, summed up: kinds for this job, and others."""
    messages = []
    while True:
        batch = take(base, queue, 1000, "ack_requeue_false")
        messages.extend(batch)
        if len(batch) < 1000:
            break
    completion = ("job.done", "job.failed", "job.cancelled", "job.rejected")
    summary = {
        "messages": len(messages),
        "by_kind": {},
        "completion_events": 0,
        "other_jobs": 0,
        "events": [],
    }
    for message in messages:
        key = message["routing_key"]
        kind, _, rest = key.rpartition(".")
        if rest != job_id:
            summary["other_jobs"] += 1
            continue
        summary["by_kind"][kind] = summary["by_kind"].get(kind, 0) + 1
        if kind in completion:
            summary["completion_events"] += 1
        try:
            body = json.loads(message["payload"])
        except (ValueError, TypeError):
            body = {"unparsed": str(message["payload"])[:200]}
        summary["events"].append(
            {
                "routing_key": key,
                "redelivered": message.get("redelivered"),
                "event": body.get("event"),
                "stage": body.get("stage"),
                "task_count": body.get("task_count"),
                "done": body.get("done"),
                "failed": body.get("failed"),
                "cancelled": body.get("cancelled"),
            }
        )
    print(json.dumps(summary))


def get(base, queue, count):
    for message in take(base, queue, count, "ack_requeue_true"):
        print(json.dumps({k: message.get(k) for k in ("routing_key", "properties", "payload")}))


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    base, command, args = argv[1], argv[2], argv[3:]
    try:
        if command == "nodes":
            nodes(base)
        elif command == "exchange-exists":
            return exchange_exists(base, *args)
        elif command == "queues":
            queues(base, *args)
        elif command == "declare-audit":
            declare_audit(base, *args)
        elif command == "events":
            events(base, *args)
        elif command == "get":
            get(base, args[0], int(args[1]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (urllib.error.URLError, OSError) as err:
        print(f"management API {base}: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
