#!/usr/bin/env bash
# taskmill and its peers, side by side: the same no-op work on taskmill, Celery and
# BullMQ, on this machine, against the local RabbitMQ and PostgreSQL.
#
#   scripts/peers/run.sh [--tasks N] [--jobs N] [--rounds R] [--bullmq-concurrency 1,32]
#                        [--celery-concurrency default[,C...]] [--only taskmill,celery,bullmq]
#                        [--timeout SECONDS] [--json]
#
# --timeout (900) bounds each measurement: one that has not ended by then fails the run
# (KEEP_LOGS=1 keeps a failed run's directory of logs).
# Progress goes to stderr, the table to stdout; with --json, the table goes to stderr and
# the medians, every round's rates, the versions and the machine go to stdout as JSON.
#
# The work (N = --tasks, 10,000; J = --jobs, 1,000):
#   one job   taskmill S1: one job of N echo tasks; Celery: a chord of N no-op tasks with a
#             no-op callback; BullMQ: a FlowProducer parent with N no-op children. Timed
#             from the first submit to the job event / the callback's stored result / the
#             parent's completion.
#   many      taskmill S3: J jobs of 10; Celery: J chords of 10; BullMQ: J flows of 10; all
#             submitted at once, timed until every job has ended.
# Each round runs `taskmill bench --only S1,S3 --json` (fresh `taskmill worker`, its
# defaults), then Celery (a fresh `celery worker` per measurement at its defaults: the
# prefork pool, one process per core; --celery-concurrency adds rows), then BullMQ (a
# fresh worker process per measurement, at each --bullmq-concurrency; BullMQ's default
# is 1). The table gives the median of --rounds rounds (3) and "taskmill is X×":
# taskmill's rate over the peer's.
#
# What each one guarantees, as run here:
#   taskmill  Durable: task messages are persistent on durable queues and published with
#             confirms; every state change is a PostgreSQL commit. A task message is acked
#             only after its outcome committed (and the messages it causes were confirmed):
#             at-least-once, a worker crash redelivers its tasks and the conditional
#             UPDATEs count each once. Retries: 3 by default, after a linear delay
#             (attempt n waits n × 5 s), through delay queues.
#   Celery    Messages persistent (delivery_mode 2) on durable queues by default, published
#             without confirms; results and chord state in PostgreSQL (SQLAlchemy backend),
#             the chord's callback fired by a `chord_unlock` task that polls the results
#             once a second. Acks early by default (task_acks_late=False): a message is
#             acked just before its task runs, so a worker that dies mid-task loses that
#             task (at-most-once for running tasks; messages prefetched but not started are
#             redelivered). Retries: none unless the task asks (self.retry or autoretry_for);
#             a failed header task fails the chord.
#   BullMQ    Everything in Redis, here with AOF and `appendfsync everysec`: up to a second
#             of acknowledged work (added jobs, completions) can be lost when the machine
#             crashes. A job is locked while it runs (30 s lock, renewed) and moved to
#             completed when its processor returns; a job whose worker died is taken back
#             by the stalled-job check (at-least-once, up to once by default, then failed).
#             Retries: none by default (attempts: 1).
#
# It installs what it needs: Celery and friends (requirements.txt, pinned) in a venv at
# scripts/peers/.venv, BullMQ (package-lock.json) with `npm ci` in scripts/peers/node_modules,
# and builds taskmill with `cargo build --release` (TASKMILL_BIN names another binary).
# It creates, and removes on exit or interruption: a RabbitMQ vhost of its own (for
# taskmill and Celery, through the management API on 15672); a PostgreSQL role of its own
# (login, createdb) that owns a database for Celery's results and that `taskmill bench`
# connects as (DATABASE_URL=postgres://ROLE@127.0.0.1/postgres: the scratch database the
# bench makes is the role's, so one the bench had no time to drop goes too); and a Redis
# server with AOF on a free port in a temporary directory (the machine's own Redis on 6379
# has no persistence).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

TASKS=10000
JOBS=1000
ROUNDS=3
BULLMQ_CONCURRENCY=1,32
CELERY_CONCURRENCY=default
TIMEOUT=900
ONLY=taskmill,celery,bullmq
JSON=0
RABBIT_API=${RABBIT_API:-http://127.0.0.1:15672/api}
PG_HOST=127.0.0.1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
    --tasks) TASKS=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --bullmq-concurrency) BULLMQ_CONCURRENCY=$2; shift 2 ;;
    --celery-concurrency) CELERY_CONCURRENCY=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --json) JSON=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for n in "$TASKS" "$JOBS" "$ROUNDS" "$TIMEOUT"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "not a positive number: $n" >&2; exit 2; }
done
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

log() { printf '%s\n' "$*" >&2; }

# --- Clean-up: whatever this run created goes, on any exit ------------------------------

RUN_ID="$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
VHOST="peers-$RUN_ID"
PG_ROLE="peers_$RUN_ID"
CELERY_DB="peers_$RUN_ID"
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/taskmill-peers.XXXXXX")"
mkdir -p "$RUN_DIR/pids" "$RUN_DIR/redis"
CHILD=""        # the measurement running now
CHILD_GROUP=0   # 1 when it leads a process group of its own (taskmill bench)
REDIS_PID=""
VHOST_MADE=0
ROLE_MADE=0

api() { # api METHOD PATH [JSON]
    curl -sf -u guest:guest -X "$1" -H 'content-type: application/json' \
        ${3:+--data "$3"} "$RABBIT_API/$2"
}
psql_admin() { psql -h "$PG_HOST" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

# stop_child: ends the measurement under way, if any.
stop_child() {
    [[ -n $CHILD ]] && kill -0 "$CHILD" 2>/dev/null || return 0
    if ((CHILD_GROUP)); then
        # taskmill bench does not stop on its first signal: end it and its workers.
        kill -KILL -- "-$CHILD" 2>/dev/null || true
    else
        # The drivers stop their worker on SIGTERM.
        kill -TERM "$CHILD" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$CHILD" 2>/dev/null || true
    fi
    wait "$CHILD" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $CHILD ]] && kill -0 "$CHILD" 2>/dev/null; then
        log "stopping the measurement under way…"
        stop_child
    fi
    # Workers a driver started and did not stop (each leads its own process group).
    local pid_file
    for pid_file in "$RUN_DIR"/pids/*.pid; do
        [[ -e $pid_file ]] && kill -KILL -- "-$(cat "$pid_file")" 2>/dev/null
    done
    if [[ -n $REDIS_PID ]]; then
        kill -TERM "$REDIS_PID" 2>/dev/null
        wait "$REDIS_PID" 2>/dev/null
    fi
    if ((VHOST_MADE)); then
        api DELETE "vhosts/$VHOST" >/dev/null || log "could not delete vhost $VHOST"
    fi
    if ((ROLE_MADE)); then
        # Celery's database and whatever taskmill bench made and had no time to drop.
        local database
        for database in $(psql_admin "SELECT datname FROM pg_database WHERE datdba = '$PG_ROLE'::regrole"); do
            psql_admin "DROP DATABASE IF EXISTS $database WITH (FORCE)" || log "could not drop database $database"
        done
        psql_admin "DROP ROLE IF EXISTS $PG_ROLE" || log "could not drop role $PG_ROLE"
    fi
    if ((status != 0)) && [[ -n ${KEEP_LOGS:-} ]]; then
        log "logs kept in $RUN_DIR"
    else
        rm -rf "$RUN_DIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run_child OUT NAME CMD...: runs one measurement in the background (so that a signal
# reaches the trap at once), its stdout to OUT, its stderr to NAME.log in the run dir;
# one that has not ended after --timeout seconds is stopped and fails the run (taskmill
# bench, for one, waits 15 minutes for job events that a broker restart lost).
run_child() {
    local out=$1 name=$2 deadline=$((SECONDS + TIMEOUT)) status=0
    shift 2
    "$@" >"$out" 2>"$RUN_DIR/$name.log" &
    CHILD=$!
    while kill -0 "$CHILD" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    if kill -0 "$CHILD" 2>/dev/null; then
        log "$name: not done after $TIMEOUT s; stopping it"
        stop_child
        status=124
    else
        wait "$CHILD" || status=$?
    fi
    CHILD=""
    if ((status != 0)); then
        log "$name failed:"
        tail -n 20 "$RUN_DIR/$name.log" >&2
        for worker_log in "$RUN_DIR"/*worker*.log; do
            [[ -s $worker_log ]] && { log "--- $worker_log"; tail -n 20 "$worker_log" >&2; }
        done
        return 1
    fi
}

# --- What it needs -----------------------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_open 5672 || { log "RabbitMQ is not listening on 127.0.0.1:5672"; exit 1; }
api GET overview >/dev/null || { log "RabbitMQ's management API is not at $RABBIT_API"; exit 1; }
psql_admin 'SELECT 1' >/dev/null || { log "PostgreSQL is not at $PG_HOST:5432 (user postgres)"; exit 1; }

if wanted celery; then
    if ! cmp -s "$HERE/requirements.txt" "$HERE/.venv/requirements.txt"; then
        log "installing Celery into scripts/peers/.venv…"
        rm -rf "$HERE/.venv"
        python3 -m venv "$HERE/.venv"
        "$HERE/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" >&2
        cp "$HERE/requirements.txt" "$HERE/.venv/requirements.txt"
    fi
fi
if wanted bullmq; then
    command -v redis-server >/dev/null || { log "redis-server is not on the PATH"; exit 1; }
    if ! cmp -s "$HERE/package-lock.json" "$HERE/node_modules/.peers-lock.json"; then
        log "installing BullMQ into scripts/peers/node_modules…"
        # Its summary goes with the progress, to stderr: stdout is the table or the JSON.
        (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error) >&2
        cp "$HERE/package-lock.json" "$HERE/node_modules/.peers-lock.json"
    fi
fi
if wanted taskmill; then
    if [[ -z ${TASKMILL_BIN:-} ]]; then
        log "building taskmill (cargo build --release)…"
        (cd "$ROOT" && cargo build --release --quiet)
        TASKMILL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/taskmill"
    fi
    [[ -x $TASKMILL_BIN ]] || { log "no taskmill binary at $TASKMILL_BIN"; exit 1; }
fi
# report.py reads the Celery packages' versions when they are there.
PYTHON="$HERE/.venv/bin/python"
[[ -x $PYTHON ]] || PYTHON=python3

# --- The scratch broker vhost, database and Redis ----------------------------------------

api PUT "vhosts/$VHOST" >/dev/null
VHOST_MADE=1
api PUT "permissions/$VHOST/guest" '{"configure":".*","write":".*","read":".*"}' >/dev/null
export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$VHOST"
export PEERS_RUN_DIR="$RUN_DIR" PEERS_VHOST="$VHOST" PEERS_RABBIT_API="$RABBIT_API"

# A PostgreSQL role of this run's own: taskmill bench connects as it, so the scratch
# database it makes is this role's, and so is Celery's: the clean-up drops every
# database the role owns, and no other.
psql_admin "CREATE ROLE $PG_ROLE LOGIN CREATEDB"
ROLE_MADE=1
if wanted celery; then
    psql_admin "CREATE DATABASE $CELERY_DB OWNER $PG_ROLE"
    export PEERS_CELERY_BROKER="$AMQP_URL"
    export PEERS_CELERY_BACKEND="db+postgresql+psycopg2://postgres@$PG_HOST:5432/$CELERY_DB"
    export PEERS_CELERY_DSN="host=$PG_HOST user=postgres dbname=$CELERY_DB"
fi

if wanted bullmq; then
    REDIS_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN_DIR/redis" \
        --appendonly yes --appendfsync everysec --save '' --maxmemory-policy noeviction \
        >"$RUN_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 100); do port_open "$REDIS_PORT" && break; sleep 0.1; done
    port_open "$REDIS_PORT" || { log "redis-server did not start:"; cat "$RUN_DIR/redis.log" >&2; exit 1; }
fi

# --- The rounds --------------------------------------------------------------------------

IFS=, read -r -a CONCURRENCIES <<<"$BULLMQ_CONCURRENCY"
IFS=, read -r -a CELERY_CONCURRENCIES <<<"$CELERY_CONCURRENCY"
summary() { "$PYTHON" "$HERE/report.py" --summary "$1"; }

log "taskmill and its peers: --tasks $TASKS, --jobs $JOBS, $ROUNDS round(s), $(nproc) cores, run dir $RUN_DIR"
started=$SECONDS
for round in $(seq "$ROUNDS"); do
    if wanted taskmill; then
        log "round $round: taskmill bench --only S1,S3…"
        CHILD_GROUP=1
        DATABASE_URL="postgres://$PG_ROLE@$PG_HOST/postgres" RUST_LOG=warn \
            run_child "$RUN_DIR/taskmill-$round.json" "taskmill-$round" \
            setsid "$TASKMILL_BIN" bench --only S1,S3 --json --tasks "$TASKS" --jobs "$JOBS"
        CHILD_GROUP=0
        log "  $(summary "$RUN_DIR/taskmill-$round.json")"
    fi
    if wanted celery; then
        for concurrency in "${CELERY_CONCURRENCIES[@]}"; do
            for scenario in chord chords; do
                log "round $round: Celery $scenario, concurrency $concurrency…"
                out="$RUN_DIR/celery-$scenario-c$concurrency-$round.json"
                args=(--tasks "$TASKS" --jobs "$JOBS")
                [[ $concurrency == default ]] || args+=(--concurrency "$concurrency")
                run_child "$out" "celery-$scenario-c$concurrency-$round" \
                    "$HERE/.venv/bin/python" "$HERE/celery_bench.py" "$scenario" "${args[@]}"
                log "  $(summary "$out")"
            done
        done
    fi
    if wanted bullmq; then
        for concurrency in "${CONCURRENCIES[@]}"; do
            for scenario in flow flows; do
                log "round $round: BullMQ $scenario, concurrency $concurrency…"
                out="$RUN_DIR/bullmq-$scenario-c$concurrency-$round.json"
                args=(--tasks "$TASKS" --jobs "$JOBS" --port "$REDIS_PORT")
                # Concurrency 1 is BullMQ's default: leave the option unset then.
                ((concurrency == 1)) || args+=(--concurrency "$concurrency")
                run_child "$out" "bullmq-$scenario-c$concurrency-$round" \
                    node "$HERE/bullmq_bench.js" "$scenario" "${args[@]}"
                log "  $(summary "$out")"
            done
        done
    fi
done
log "measured in $((SECONDS - started)) s"
echo >&2

if ((JSON)); then
    # The table still shows, on stderr.
    "$PYTHON" "$HERE/report.py" "$RUN_DIR" >&2
    "$PYTHON" "$HERE/report.py" "$RUN_DIR" --json
else
    "$PYTHON" "$HERE/report.py" "$RUN_DIR"
fi
