#!/usr/bin/env bash
# Removing a job of 1,000,000 tasks on PostgreSQL, one job at a time (batched
# DELETEs, as SQLite and held partitions do) and by dropping its partition, each while
# another job runs beside it: wall time, WAL written, and how the running job's
# finishes fare meanwhile (rate, and the longest pause between two of them).
# Also: how long migration 17 takes to partition a table of 1,000,000 task rows.
#
# Usage: scripts/retention/delete_vs_drop.sh [path/to/taskmill]   (PostgreSQL on
# 127.0.0.1 with trust auth, RabbitMQ on 127.0.0.1; prints a Markdown table)
set -euo pipefail

TASKMILL=${1:-target/release/taskmill}
MIGRATE=${MIGRATE:-target/release/migration}
TASKS=${TASKS:-1000000}
DB=tm_retention_bench_$$
PSQL=(psql -X -q -t -A -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1)
export DATABASE_URL=postgres://postgres@127.0.0.1/$DB
VHOST=tm_retention_bench_$$
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$VHOST
export TASKMILL_HTTP_ADDR=off
export RUST_LOG=warn

cleanup() {
    [[ -n ${WORKER:-} ]] && kill "$WORKER" 2>/dev/null && wait "$WORKER" 2>/dev/null || true
    "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
    rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
}
trap cleanup EXIT

sql() { "${PSQL[@]}" -d "$DB" -c "$1"; }
now_ms() { date +%s%3N; }
wal() { sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"; }

# One ended job of $TASKS done tasks, created at $2, without its event (nothing
# waits on it), its tasks filed at its creation ($3: with filed_at or not).
ended_job() {
    local id=$1 created=$2 filed=$3
    sql "INSERT INTO jobs (id, type, queue, stage, params, max_retries, retry_delay_ms,
           on_failure, task_count, done_count, failed_count, cancelled_count,
           tasks_published, created_at, updated_at, started_at, finished_at,
           results_in_event, phase_first_ordinal, run)
         VALUES ('$id', 'taskmill.echo', 'default', 'done', 'null', 3, 5000, 'fail_fast',
           $TASKS, $TASKS, 0, 0, true, '$created', now(), '$created', now(), false, 0, 1)"
    local columns="job_id, ordinal, type, payload, status, attempts, deliveries, version,
           created_at, updated_at, finished_at, result"
    local values="'$id', n, 'taskmill.echo', to_jsonb(n), 'done', 1, 1, 2,
           '$created', now(), now(), jsonb_build_object('n', n)"
    if [[ $filed == yes ]]; then
        columns="$columns, filed_at"
        values="$values, '$created'"
    fi
    sql "INSERT INTO tasks ($columns) SELECT $values FROM generate_series(0, $TASKS - 1) AS n"
}

"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB" >/dev/null
rabbitmqctl -q add_vhost "$VHOST" >/dev/null
rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null

# Migration 17 on a table of $TASKS rows.
"$MIGRATE" 16 >/dev/null
ended_job old "2026-01-01 00:00:00+00" no
started=$(now_ms)
"$TASKMILL" migrate >/dev/null
echo "migration 17 on $TASKS task rows: $(( $(now_ms) - started )) ms"
sql "DELETE FROM tasks; DELETE FROM jobs" >/dev/null

# A job running beside each removal: a worker, and before each removal a job of
# 20 ms tasks long enough to outlast it, at a steady pace the database's locks can
# only slow down.
"$TASKMILL" worker --roles intake,worker,completion >/tmp/retention-bench-worker.log 2>&1 &
WORKER=$!
sleep 3

# The running job $1's finishes per second and longest pause within [$2, $3] (ms).
beside() {
    sql "WITH f AS (SELECT finished_at FROM tasks WHERE job_id = '$1'
           AND finished_at BETWEEN to_timestamp($2 / 1000.0) AND to_timestamp($3 / 1000.0)),
         g AS (SELECT finished_at - lag(finished_at) OVER (ORDER BY finished_at) AS gap FROM f)
         SELECT round(count(*) / (($3 - $2) / 1000.0)) || ' tasks/s, longest pause '
                || coalesce(round(extract(epoch FROM (SELECT max(gap) FROM g)) * 1000), 0) || ' ms'
         FROM f"
}

runs=0
measure() {
    local label=$1; shift
    runs=$((runs + 1))
    local running=running-$runs
    seq 1 200000 | sed 's/.*/{"ms": 20}/' >/tmp/retention-bench-tasks.jsonl
    "$TASKMILL" submit --type taskmill.sleep --tasks-file /tmp/retention-bench-tasks.jsonl \
        --job-id "$running" >/dev/null
    # Formed, and running steadily for 10 s: the WAL it writes meanwhile is measured
    # too, and taken from the removal's.
    until [[ $(sql "SELECT stage FROM jobs WHERE id = '$running'") == running ]]; do sleep 1; done
    local before_from before_to from to wal0 wal1 wal_before
    wal0=$(wal); before_from=$(now_ms)
    sleep 10
    before_to=$(now_ms); wal_before=$(( $(wal) - wal0 ))
    wal0=$(wal); from=$(now_ms)
    "$@" >/dev/null
    to=$(now_ms); wal1=$(wal)
    local wal_running=$(( wal_before * (to - from) / (before_to - before_from) ))
    echo "| $label | $(( to - from )) ms | $(( (wal1 - wal0 - wal_running) / 1048576 )) MiB | $(beside "$running" "$before_from" "$before_to") | $(beside "$running" "$from" "$to") |"
    "$TASKMILL" cancel "$running" >/dev/null || true
}

echo "| removal of a job of $TASKS tasks | time | WAL (less the running job's) | a running job, 10 s before | during |"
echo "|---|---|---|---|---|"
# One job at a time: batched DELETEs of the job's tasks (the job sits in the
# partition made at migration, and `--stage` removes one job at a time).
cut=$(sql "SELECT ends_at - interval '1 hour' FROM task_partitions WHERE name = 'tasks_before_migration'")
ended_job gone-by-delete "$cut" yes
measure "DELETE, one job at a time (prune --stage done)" \
    "$TASKMILL" prune --older-than 0s --stage done
# By partition: the same job, dropped with its partition.
ended_job gone-by-drop "$cut" yes
measure "DROP of its partition (prune)" "$TASKMILL" prune --older-than 0s
