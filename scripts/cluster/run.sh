#!/usr/bin/env bash
# A real RabbitMQ cluster on one machine: three extra local nodes (tm1..tm3@localhost)
# joined into one cluster, three `taskmill worker` pods on quorum queues (pod i on node
# i), one job of 20,000 tasks, and one broker node stopped mid-job and restarted. Then
# the invariants: the job ends done; every task row terminal; the job's counters equal
# its rows by status; exactly one completion event for the job; nothing parked; every
# queue drained; never more than STALL_LIMIT s without a task done. Prints the figures
# and exits non-zero on any failure.
#
# For a Debian machine with RabbitMQ (the rabbitmq-server package) and PostgreSQL on
# 127.0.0.1:5432 (trust auth), as root. The system's own node (rabbit@localhost, 5672)
# is left alone: this script never stops, configures or joins it, and checks at the end
# that it still runs as before. Everything it starts it stops on exit (trap): pods,
# nodes, their data directories, the database. See docs/cluster.md.
#
# Settings (environment):
#   TASKS=20000          tasks in the job (taskmill.sleep, SLEEP_MS each)
#   SLEEP_MS=300         what each task sleeps (3 pods x 32 handlers: at most 320 tasks/s)
#   STOP_NODE=2          the node stopped mid-job: 2 or 3 (1 serves the submitter)
#   FAULT=stop           stop: `rabbitmqctl stop` (the whole node) and start it again;
#                        stop_app: `rabbitmqctl stop_app` and start_app;
#                        kill: SIGKILL to the node's processes, then start it again
#   LEADERS=stopped-node the pod of the node to be stopped starts first and declares the
#                        queues, so their leaders are there; any: all pods start at once
#   DOWN_SECS=10         how long the node stays down
#   STOP_AT=             stop the node once this many tasks are done (default TASKS/4)
#   JOB_TIMEOUT=900      seconds the job may take after the submit
#   STALL_DIAG=30        no task done for this long: the database sessions, locks and
#                        unfinished rows are written to $ARTIFACTS/stall-*.txt
#   STALL_LIMIT=60       a longer time without a task done fails the run
#   CONCURRENCY=32       handlers per pod (TASKMILL_CONCURRENCY)
#   TASKMILL=            the binary; default: `cargo build --bin taskmill`, target/debug
#   PG_URL=postgres://postgres@127.0.0.1:5432
#   CLUSTER_PORT_BASE=5680   node i: AMQP base+i, management base+10000+i, dist base+20000+i
#   ARTIFACTS=target/cluster-runs/<time>   where pod and node logs and the summary are kept
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

TASKS=${TASKS:-20000}
SLEEP_MS=${SLEEP_MS:-300}
STOP_NODE=${STOP_NODE:-2}
FAULT=${FAULT:-stop}
LEADERS=${LEADERS:-stopped-node}
DOWN_SECS=${DOWN_SECS:-10}
STOP_AT=${STOP_AT:-$((TASKS / 4))}
STALL_DIAG=${STALL_DIAG:-30}
STALL_LIMIT=${STALL_LIMIT:-60}
JOB_TIMEOUT=${JOB_TIMEOUT:-900}
CONCURRENCY=${CONCURRENCY:-32}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
PREFIX=taskmill
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
ARTIFACTS=${ARTIFACTS:-$ROOT/target/cluster-runs/$RUN_ID}
DB=taskmill_cluster_$$
DB_URL="$PG_URL/$DB"
JOB_ID="cluster-$RUN_ID"
AUDIT_QUEUE="$PREFIX.audit.$RUN_ID"

# The nodes' directories: made once the cleanup trap is set (below).
CLUSTER_WORK=''
# shellcheck source=scripts/cluster/nodes.sh
source "$HERE/nodes.sh"
MGMT=(python3 "$HERE/mgmt.py")
# The helpers leave no bytecode beside them (sample.py imports mgmt.py).
export PYTHONDONTWRITEBYTECODE=1

STARTED=$SECONDS
say() { printf '[%4ds] %s\n' $((SECONDS - STARTED)) "$*"; }
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}

case "$STOP_NODE" in 2 | 3) ;; *) fail "STOP_NODE must be 2 or 3 (node 1 serves the submitter)" ;; esac
case "$FAULT" in stop | stop_app | kill) ;; *) fail "FAULT must be stop, stop_app or kill" ;; esac
case "$LEADERS" in stopped-node | any) ;; *) fail "LEADERS must be stopped-node or any" ;; esac
[ "$(id -u)" = 0 ] || fail "run as root (the nodes run as user rabbitmq)"
for tool in setpriv timeout psql python3 "$RABBITMQ_LIB/rabbitmq-server" "$RABBITMQ_LIB/rabbitmqctl"; do
    command -v "$tool" >/dev/null || fail "$tool not found"
done
id rabbitmq >/dev/null 2>&1 || fail "no user rabbitmq (install the rabbitmq-server package)"

# Waits until COMMAND succeeds, at most SECS; on timeout says what it waited for.
wait_for() { # wait_for SECS DESCRIPTION COMMAND...
    local secs=$1 what=$2
    local deadline=$((SECONDS + secs))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "timed out after $secs s waiting for $what" >&2
            return 1
        fi
        sleep 1
    done
}

sql() { psql "$DB_URL" -v ON_ERROR_STOP=1 -qAtX -F ' ' -c "$1"; }

# --- the system node, before -------------------------------------------------------
system_node_pid() { # the OS pid of rabbit@localhost, empty if it is not running
    timeout -k 5 30 rabbitmqctl -q -n rabbit@localhost eval 'os:getpid().' 2>/dev/null | tr -dc '0-9'
}
SYSTEM_PID=$(system_node_pid || true)
if [ -n "$SYSTEM_PID" ]; then
    say "system node rabbit@localhost runs (pid $SYSTEM_PID); it is left alone"
else
    say "system node rabbit@localhost is not running; it is left as it is"
fi

# --- cleanup -------------------------------------------------------------------------
POD_PIDS=()
SAMPLER_PID='' WATCHER_PID=''
NODES_STARTED=()
DB_CREATED=
cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    set +e
    echo
    say "cleanup"
    [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
    [ -n "$WATCHER_PID" ] && kill "$WATCHER_PID" 2>/dev/null
    for pid in "${POD_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    local deadline=$((SECONDS + 30))
    for pid in "${POD_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    ((${#POD_PIDS[@]})) && say "pods stopped"
    # The nodes stop in parallel; a graceful stop takes each some 20 s here.
    for i in "${NODES_STARTED[@]}"; do node_stop "$i" & done
    wait
    for i in "${NODES_STARTED[@]}"; do
        if node_process_alive "$i"; then
            echo "WARNING: $(node_name "$i") (process group $(node_pgid "$i")) is still running" >&2
            status=1
        fi
    done
    ((${#NODES_STARTED[@]})) && say "nodes stopped: ${NODES_STARTED[*]/#/tm}"
    mkdir -p "$ARTIFACTS"
    for i in 1 2 3; do
        [ -d "$(node_dir "$i")/log" ] && cp -r "$(node_dir "$i")/log" "$ARTIFACTS/node$i-log"
    done
    [ -n "$CLUSTER_WORK" ] && rm -rf "$CLUSTER_WORK"
    if [ -n "$DB_CREATED" ]; then
        psql "$PG_URL/postgres" -qAtX -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null &&
            say "database $DB dropped"
    fi
    if [ -n "$SYSTEM_PID" ]; then
        local now
        now=$(system_node_pid)
        if [ "$now" = "$SYSTEM_PID" ] && port_open 5672; then
            say "system node rabbit@localhost still runs, same pid $now, 5672 open"
        else
            echo "WARNING: system node rabbit@localhost was pid $SYSTEM_PID, now '${now:-not running}'" >&2
            status=1
        fi
    fi
    say "logs kept in $ARTIFACTS"
    if ((status == 0)); then
        say "PASSED in $((SECONDS - STARTED)) s"
    else
        say "FAILED (exit $status) after $((SECONDS - STARTED)) s"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$ARTIFACTS"

# --- the binary ---------------------------------------------------------------------
if [ -z "${TASKMILL:-}" ]; then
    say "building taskmill (cargo build --bin taskmill)"
    (cd "$ROOT" && cargo build --quiet --bin taskmill)
    TASKMILL=$ROOT/target/debug/taskmill
fi
[ -x "$TASKMILL" ] || fail "no taskmill binary at $TASKMILL"

# --- three nodes, one cluster -------------------------------------------------------
CLUSTER_WORK=$(mktemp -d /tmp/taskmill-cluster.XXXXXX)
export CLUSTER_WORK
cluster_prepare
for i in 1 2 3; do
    node_prepare "$i"
    node_launch "$i" || fail "could not launch $(node_name "$i")"
    NODES_STARTED+=("$i")
done
say "nodes launched: tm1..tm3@localhost, AMQP $(amqp_port 1)-$(amqp_port 3), management $(mgmt_port 1)-$(mgmt_port 3), distribution $(dist_port 1)-$(dist_port 3)"
for i in 1 2 3; do
    node_await "$i" 180 || fail "$(node_name "$i") did not start; see $ARTIFACTS/node$i-log"
done
say "nodes started"
for i in 2 3; do
    node_join "$i" 180 || fail "$(node_name "$i") could not join $(node_name 1)"
    say "$(node_name "$i") joined $(node_name 1)"
done
cluster_await_running 60 || fail "the cluster did not form"
say "cluster of 3: $(running_nodes 1 | sort | tr '\n' ' ')"

# --- database and pods ----------------------------------------------------------------
psql "$PG_URL/postgres" -v ON_ERROR_STOP=1 -qAtX -c "CREATE DATABASE $DB" >/dev/null ||
    fail "could not create database $DB at $PG_URL"
DB_CREATED=1
pod_env() { # pod_env I: the environment of a process talking to node I
    echo AMQP_URL="$(amqp_url "$1")" DATABASE_URL="$DB_URL" TASKMILL_QUEUE_TYPE=quorum \
        TASKMILL_PREFIX="$PREFIX" TASKMILL_HTTP_ADDR=127.0.0.1:0 \
        RUST_LOG="${RUST_LOG:-warn,taskmill=info}"
}
# shellcheck disable=SC2046
env $(pod_env 1) "$TASKMILL" migrate >"$ARTIFACTS/migrate.log" 2>&1 ||
    fail "taskmill migrate failed: $(tail -n 5 "$ARTIFACTS/migrate.log")"
say "database $DB migrated"

# Quorum queues get their members when declared (RabbitMQ 3.10 adds none later), and
# pods declare the topology when they start: so the pods start only now, with all three
# nodes in the cluster. A queue's leader is on the node of the connection that declared
# it first (queue_leader_locator client-local), so with LEADERS=stopped-node the pod of
# the node to be stopped starts alone first: the fault then hits the leaders of the
# intake, work and completion queues.
start_pod() { # start_pod I
    # shellcheck disable=SC2046
    env $(pod_env "$1") TASKMILL_CONCURRENCY="$CONCURRENCY" TASKMILL_GRACE_SECS=10 \
        "$TASKMILL" worker >"$ARTIFACTS/pod$1.log" 2>&1 &
    POD_PIDS[$1 - 1]=$!
}
pods_alive() {
    local i
    for i in "${!POD_PIDS[@]}"; do
        if ! kill -0 "${POD_PIDS[$i]}" 2>/dev/null; then
            echo "pod $((i + 1)) exited; the end of its log:" >&2
            tail -n 20 "$ARTIFACTS/pod$((i + 1)).log" >&2
            return 1
        fi
    done
}
# Ready: N pods consume the intake and the default work queue.
consumers_of() { # consumers_of QUEUE
    "${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX" | awk -v q="$1" '$1 == q { print $6 }'
}
pods_consuming() { # pods_consuming N
    pods_alive >/dev/null 2>&1 || return 1
    [ "$(consumers_of "$PREFIX.intake")" = "$1" ] && [ "$(consumers_of "$PREFIX.work.default")" = "$1" ]
}
await_consumers() { # await_consumers N
    wait_for 180 "$1 consumer(s) on $PREFIX.intake and $PREFIX.work.default" pods_consuming "$1" || {
        pods_alive || true
        "${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX" >&2 || true
        fail "the pods did not start consuming"
    }
}
case "$LEADERS" in
    stopped-node)
        start_pod "$STOP_NODE"
        await_consumers 1
        say "pod $STOP_NODE consuming: it declared the queues, their leaders are on $(node_name "$STOP_NODE")"
        for i in 1 2 3; do ((i == STOP_NODE)) || start_pod "$i"; done
        ;;
    *) for i in 1 2 3; do start_pod "$i"; done ;;
esac
say "pods started: pid ${POD_PIDS[*]} (pod i on node i)"
await_consumers 3
say "pods consuming"

quorum_report() { # prints: queues quorum full-members fully-online
    "${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX" | awk '
        { n++ } $2 == "quorum" { q++; if ($7 == 3) m++; if ($8 == 3) o++ }
        END { print n + 0, q + 0, m + 0, o + 0 }'
}
read -r QUEUES QUORUM MEMBERS3 ONLINE3 < <(quorum_report)
say "queues: $QUEUES, quorum: $QUORUM, with 3 members: $MEMBERS3, 3 online: $ONLINE3"
((QUORUM == QUEUES && MEMBERS3 == QUEUES)) ||
    fail "every queue should be a quorum queue with 3 members"

# The audit queue: every job event, bound before the submit.
wait_for 30 "exchange $PREFIX.events" "${MGMT[@]}" "$(mgmt_url 1)" exchange-exists "$PREFIX.events" ||
    fail "no events exchange"
"${MGMT[@]}" "$(mgmt_url 1)" declare-audit "$AUDIT_QUEUE" "$PREFIX.events" 'job.#' ||
    fail "could not declare the audit queue"
say "audit queue $AUDIT_QUEUE bound to $PREFIX.events with job.#"

# --- the job -------------------------------------------------------------------------
TASKS_FILE=$CLUSTER_WORK/tasks.jsonl
python3 -c "import sys; sys.stdout.write('{\"ms\": $SLEEP_MS}\n' * $TASKS)" >"$TASKS_FILE"
SUBMITTED=$SECONDS SUBMITTED_T=$EPOCHREALTIME
# shellcheck disable=SC2046
env $(pod_env 1) "$TASKMILL" submit --type taskmill.sleep --tasks-file "$TASKS_FILE" \
    --job-id "$JOB_ID" >"$ARTIFACTS/submit.log" 2>&1 ||
    fail "submit failed: $(tail -n 5 "$ARTIFACTS/submit.log")"
say "submitted job $JOB_ID: $TASKS x taskmill.sleep {\"ms\": $SLEEP_MS} through $(node_name 1)"
# A stall: no task row done for STALL_DIAG s while the job runs. A watcher in the
# background (the script itself may be waiting for a node) reads the samples and writes
# the picture of a stall to $ARTIFACTS/stall-<s after the submit>.txt, again every 120 s
# while it lasts: the database sessions (which pod each belongs to, from its client
# port), who blocks whom, the unfinished task rows, the leases, the queues.
stall_watcher() {
    local last=x since=$SECONDS dumped=-1000 rows file
    while :; do
        rows=$(tail -n 1 "$ARTIFACTS/progress.txt" | awk '{ print $3 }')
        if [ "$rows" != "$last" ] || [ "$rows" = - ]; then
            last=$rows since=$SECONDS
        elif ((SECONDS - since >= STALL_DIAG && SECONDS - dumped >= 120)); then
            dumped=$SECONDS
            file=$ARTIFACTS/stall-$((SECONDS - SUBMITTED))s.txt
            say "STALL: no task row done for $((SECONDS - since)) s ($rows done); picture in $file"
            dump_stall "$((SECONDS - since))" >"$file" 2>&1 || true
        fi
        sleep 1
    done
}
dump_stall() {
    echo "# $(date -u +%FT%TZ): no task row done for $1 s; pods (i pid): 1 ${POD_PIDS[0]} 2 ${POD_PIDS[1]} 3 ${POD_PIDS[2]}"
    echo "## database sessions of $DB (client_port -> process: see the sockets below)"
    psql "$DB_URL" -X -c "SELECT pid, client_port, state, now() - xact_start AS xact_age,
        now() - state_change AS in_state, wait_event_type, wait_event,
        pg_blocking_pids(pid) AS blocked_by, left(query, 160) AS last_query
        FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
        ORDER BY xact_start NULLS LAST"
    echo "## locks not granted"
    psql "$DB_URL" -X -c "SELECT l.pid, l.locktype, l.relation::regclass, l.mode, l.granted
        FROM pg_locks l JOIN pg_stat_activity a USING (pid)
        WHERE a.datname = current_database() AND NOT l.granted"
    echo "## the job's task rows by status (pods busy claiming while none is running: the"
    echo "## messages they take are for tasks already done)"
    psql "$DB_URL" -X -c "SELECT status, count(*), min(ordinal), max(ordinal) FROM tasks
        WHERE job_id = '$JOB_ID' GROUP BY status ORDER BY 1"
    echo "## unfinished task rows of the job (at most 50)"
    psql "$DB_URL" -X -c "SELECT id, ordinal, status, attempts, deliveries, claimed_by, lease_until, updated_at
        FROM tasks WHERE job_id = '$JOB_ID' AND status NOT IN ('done', 'failed', 'cancelled')
        ORDER BY id LIMIT 50"
    echo "## the job, its leases"
    psql "$DB_URL" -X -c "SELECT * FROM jobs WHERE id = '$JOB_ID'" -x
    psql "$DB_URL" -X -c "SELECT * FROM leases"
    echo "## sockets to PostgreSQL (local port = client_port above; users = the process)"
    ss -tnp 'dport = :5432' | grep -E "taskmill|Local" || true
    echo "## queues (name type messages ready unacked consumers members online leader)"
    "${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX"
}

# Every second: the job's done counter and task rows done, the work and completion
# queues, and the publishes waiting for a confirm (sample.py): progress before, during
# and after the fault, and where it stalls if it does.
echo "# epoch done_count rows_done work_ready work_unacked completion_ready completion_unacked unconfirmed" >"$ARTIFACTS/progress.txt"
python3 "$HERE/sample.py" "$DB_URL" "$JOB_ID" "$(mgmt_url 1)" "$PREFIX" >>"$ARTIFACTS/progress.txt" 2>"$ARTIFACTS/sample.log" &
SAMPLER_PID=$!
stall_watcher &
WATCHER_PID=$!

job_row() { sql "SELECT stage, done_count, failed_count, cancelled_count, task_count FROM jobs WHERE id = '$JOB_ID'"; }
# Sets STAGE and DONE from the job's row ("none" and 0 before it is stored or on a
# failed query).
read_job() {
    local row
    row=$(job_row 2>/dev/null || true)
    read -r STAGE DONE _ <<<"$row" || true
    STAGE=${STAGE:-none} DONE=${DONE:-0}
}
progress() {
    local row
    row=$(job_row 2>/dev/null) || row="?"
    say "job: ${row:-not stored yet} (stage done failed cancelled of)"
}
JOB_DEADLINE=$((SUBMITTED + JOB_TIMEOUT))
job_timeout() {
    progress
    sql "SELECT status, count(*) FROM tasks WHERE job_id = '$JOB_ID' GROUP BY status ORDER BY 1" >&2 || true
    "${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX" >&2 || true
    fail "the job did not end within $JOB_TIMEOUT s of its submit ($1)"
}

# Wait for STOP_AT tasks done, then the fault.
LAST_REPORT=$SECONDS
while :; do
    read_job
    ((DONE >= STOP_AT)) && break
    case "$STAGE" in done | failed | cancelled)
        fail "the job ended ($STAGE) before $STOP_AT tasks were done: no fault injected; raise TASKS or SLEEP_MS" ;;
    esac
    ((SECONDS < JOB_DEADLINE)) || job_timeout "before the fault"
    pods_alive || fail "a pod died before the fault"
    if ((SECONDS - LAST_REPORT >= 5)); then
        progress
        LAST_REPORT=$SECONDS
    fi
    sleep 0.5
done
FAULT_DONE=$DONE
"${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX" >"$ARTIFACTS/queues-at-fault.txt" || true
LED=$(awk -v n="$(node_name "$STOP_NODE")" '$9 == n && $1 !~ /\.delay\.[0-9]/ { sub(/^[^.]*\./, "", $1); printf "%s ", $1 }' "$ARTIFACTS/queues-at-fault.txt")
LED_LADDER=$(awk -v n="$(node_name "$STOP_NODE")" '$9 == n && $1 ~ /\.delay\.[0-9]/' "$ARTIFACTS/queues-at-fault.txt" | wc -l)
FAULT_AT=$SECONDS FAULT_AT_T=$EPOCHREALTIME
say "FAULT: $FAULT $(node_name "$STOP_NODE") with $DONE of $TASKS tasks done"
# The stop runs in the background: the node is down from when its AMQP port closes.
case "$FAULT" in
    stop) CTL_TIMEOUT=90 ctl "$STOP_NODE" -q stop >/dev/null 2>&1 & ;;
    stop_app) CTL_TIMEOUT=90 ctl "$STOP_NODE" -q stop_app >/dev/null 2>&1 & ;;
    kill) node_kill "$STOP_NODE" & ;;
esac
STOPPER=$!
deadline=$((SECONDS + 90))
while port_open "$(amqp_port "$STOP_NODE")"; do
    ((SECONDS < deadline)) || fail "$(node_name "$STOP_NODE") still accepts AMQP connections 90 s after the $FAULT"
    sleep 0.2
done
DOWN_AT=$SECONDS DOWN_AT_T=$EPOCHREALTIME
wait "$STOPPER" || fail "$FAULT of $(node_name "$STOP_NODE") failed"
if [ "$FAULT" != stop_app ]; then
    deadline=$((SECONDS + 60))
    while node_process_alive "$STOP_NODE"; do
        ((SECONDS < deadline)) || fail "$(node_name "$STOP_NODE") still runs 60 s after the $FAULT"
        sleep 0.2
    done
fi
say "$(node_name "$STOP_NODE") down ($((DOWN_AT - FAULT_AT)) s to close its port); running nodes: $(running_nodes 1 | sort | tr '\n' ' ')"
while ((SECONDS - DOWN_AT < DOWN_SECS)); do sleep 0.5; done
progress
DONE_AT_RESTART=$(sql "SELECT done_count FROM jobs WHERE id = '$JOB_ID'")
RESTART_AT=$SECONDS RESTART_AT_T=$EPOCHREALTIME
STARTER=''
case "$FAULT" in
    stop | kill) node_launch "$STOP_NODE" || fail "could not launch $(node_name "$STOP_NODE") again" ;;
    stop_app)
        CTL_TIMEOUT=180 ctl "$STOP_NODE" -q start_app >/dev/null 2>&1 &
        STARTER=$!
        ;;
esac
# Clients see the node back when its AMQP port listens again: polled, since the CLI
# takes seconds to answer on a busy machine.
deadline=$((SECONDS + 180))
until port_open "$(amqp_port "$STOP_NODE")"; do
    ((SECONDS < deadline)) || fail "$(node_name "$STOP_NODE") does not listen 180 s after its restart"
    if [ "$FAULT" != stop_app ] && ! node_process_alive "$STOP_NODE"; then
        tail -n 20 "$(node_dir "$STOP_NODE")/log/server-stdout.log" >&2
        fail "$(node_name "$STOP_NODE") exited while restarting"
    fi
    sleep 0.2
done
LISTENING_AT=$SECONDS LISTENING_AT_T=$EPOCHREALTIME
if [ -n "$STARTER" ]; then wait "$STARTER" || fail "start_app failed"; fi
node_await "$STOP_NODE" 180 || fail "$(node_name "$STOP_NODE") did not come back"
UP_AT=$SECONDS UP_AT_T=$EPOCHREALTIME
cluster_await_running 60 || fail "$(node_name "$STOP_NODE") did not rejoin the cluster"
PORT_DOWN=$(awk -v a="$DOWN_AT_T" -v b="$LISTENING_AT_T" 'BEGIN { printf "%.1f", b - a }')
say "$(node_name "$STOP_NODE") back: AMQP port closed for $PORT_DOWN s, listening $((LISTENING_AT - RESTART_AT)) s after the restart, started (await_startup) after $((UP_AT - RESTART_AT)) s; $DONE_AT_RESTART tasks done at the restart"

# Wait for the end.
LAST_REPORT=0
while :; do
    read_job
    case "$STAGE" in done | failed | cancelled) break ;; esac
    ((SECONDS < JOB_DEADLINE)) || job_timeout "after the restart"
    pods_alive || fail "a pod died"
    if ((SECONDS - LAST_REPORT >= 10)); then
        progress
        LAST_REPORT=$SECONDS
    fi
    sleep 0.5
done
ENDED=$SECONDS ENDED_T=$EPOCHREALTIME
kill "$WATCHER_PID" 2>/dev/null || true
STALLS=$(find "$ARTIFACTS" -name 'stall-*.txt' | wc -l)
progress

# --- the invariants ------------------------------------------------------------------
FAILURES=()
check() { # check DESCRIPTION CONDITION-WORDS...
    local what=$1
    shift
    if "$@"; then
        echo "  ok    $what"
    else
        echo "  FAIL  $what"
        FAILURES+=("$what")
    fi
}

# The job's event leaves through the outbox: wait until its row is published.
events_published() {
    [ "$(sql "SELECT count(*) FROM job_events WHERE job_id = '$JOB_ID' AND published_at IS NULL")" = 0 ]
}
wait_for 60 "the job's event to be published" events_published || true
# Queues: wait for them to drain (the management API refreshes its counts every 5 s)
# and for every replica to be back online.
queues_settled() {
    "${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX" | awk -v audit="$AUDIT_QUEUE" '
        $1 != audit && $3 != 0 { busy = 1 } $2 == "quorum" && $8 != 3 { busy = 1 }
        END { exit busy }'
}
wait_for 120 "every queue to drain and every replica to be online" queues_settled || true
sleep 6 # one more statistics interval, so a late message would show
"${MGMT[@]}" "$(mgmt_url 1)" queues "$PREFIX" >"$ARTIFACTS/queues.txt" || true
EVENTS=$("${MGMT[@]}" "$(mgmt_url 1)" events "$AUDIT_QUEUE" "$JOB_ID" || true)
echo "$EVENTS" >"$ARTIFACTS/events.json"

read -r J_STAGE J_DONE J_FAILED J_CANCELLED J_COUNT < <(job_row)
read -r R_ALL R_DONE R_FAILED R_CANCELLED R_OPEN R_RETRIED R_TAKEN R_MAXATT < <(sql "
    SELECT count(*), count(*) FILTER (WHERE status = 'done'),
           count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'cancelled'),
           count(*) FILTER (WHERE status NOT IN ('done', 'failed', 'cancelled')),
           count(*) FILTER (WHERE attempts > 1), count(*) FILTER (WHERE deliveries > 1),
           coalesce(max(attempts), 0)
    FROM tasks WHERE job_id = '$JOB_ID'")
read -r WALL FIRST_ERROR < <(sql "
    SELECT round(extract(epoch FROM finished_at - created_at)::numeric, 1), coalesce(first_error, '-')
    FROM jobs WHERE id = '$JOB_ID'")
WALL=${WALL:-0}
event_field() { # event_field PYTHON-EXPRESSION-OF-e: from the audit summary
    python3 -c 'import json,sys; e=json.loads(sys.argv[2] or "{}"); print(eval(sys.argv[1]))' "$1" "$EVENTS" || echo "?"
}
COMPLETIONS=$(event_field 'e.get("completion_events", "?")')
DONE_EVENTS=$(event_field 'e.get("by_kind", {}).get("job.done", 0)')
KINDS=$(event_field 'json.dumps(e.get("by_kind"))')
PARKED=$(awk -v q="$PREFIX.parking" '$1 == q { print $3 }' "$ARTIFACTS/queues.txt")
UNDRAINED=$(awk -v audit="$AUDIT_QUEUE" '$1 != audit && $3 != 0 { printf "%s(%s) ", $1, $3 }' "$ARTIFACTS/queues.txt")
OFFLINE=$(awk '$2 == "quorum" && $8 != 3 { printf "%s(%s/%s) ", $1, $8, $7 }' "$ARTIFACTS/queues.txt")
UNPUBLISHED=$(sql "SELECT count(*) FROM job_events WHERE job_id = '$JOB_ID' AND published_at IS NULL")

RATE=$(python3 -c "print(round($TASKS / max($WALL, 0.001)))")
# The feeder: a pod that lost its broker while feeding hands the job to another,
# which publishes again what was waiting in the queue (see docs/cluster.md).
pods_logging() { # pods_logging TEXT: the pods whose log has TEXT
    local i
    for i in 1 2 3; do grep -q "$1" "$ARTIFACTS/pod$i.log" && printf '%s ' "$i"; done
    return 0
}
FEED_STOPPED=$(pods_logging 'feeding stopped')
FEED_LOST=$(pods_logging 'feed lease lost')
FED_BY=$(pods_logging '"message":"job fed"')
kill "$SAMPLER_PID" 2>/dev/null || echo "WARNING: the sampler had stopped early: $(tail -n 3 "$ARTIFACTS/sample.log")" >&2
# Throughput by phase and the longest time without a task done, from the samples.
PHASES=$(python3 - "$ARTIFACTS/progress.txt" "$SUBMITTED_T" "$FAULT_AT_T" "$RESTART_AT_T" "$UP_AT_T" "$ENDED_T" <<'PY'
import bisect, sys
path, submitted, fault, restart, up, ended = sys.argv[1], *map(float, sys.argv[2:])
samples, rows = [], []
for line in open(path):
    parts = line.split()
    if len(parts) >= 2 and parts[1].isdigit():
        samples.append((float(parts[0]), int(parts[1])))
    if len(parts) >= 3 and parts[2].isdigit():
        rows.append((float(parts[0]), int(parts[2])))
if len(samples) < 2:
    print("(too few samples)")
    sys.exit()
times = [t for t, _ in samples]
def done_at(t):  # the done counter at time t, linear between samples
    i = bisect.bisect_left(times, t)
    if i == 0:
        return samples[0][1]
    if i >= len(samples):
        return samples[-1][1]
    (t0, d0), (t1, d1) = samples[i - 1], samples[i]
    return d0 + (d1 - d0) * (t - t0) / max(t1 - t0, 1e-9)
def rate(a, b):
    return round((done_at(b) - done_at(a)) / max(b - a, 1e-9))
def longest_stall(series):  # (seconds, since submit) of the longest time without change
    best, start, last = 0.0, None, series[0][0]
    for (t0, d0), (t1, d1) in zip(series, series[1:]):
        if d1 != d0:
            if t1 - last > best:
                best, start = t1 - last, last
            last = t1
    return best, (start or submitted) - submitted
counter, at = longest_stall(samples)
text = (f"before the fault {rate(submitted, fault)}; fault to restart {rate(fault, restart)};"
        f" restarting {rate(restart, up)}; after {rate(up, ended)}."
        f" Longest time without a task counted done: {counter:.1f} s (from {at:.0f} s after the submit)")
if len(rows) >= 2:
    worker, at = longest_stall(rows)
    text += f"; without a task row done: {worker:.1f} s (from {at:.0f} s)"
print(text)
print(f"{counter:.1f}")
PY
)
LONGEST_STALL=${PHASES##*$'\n'}
PHASES=${PHASES%$'\n'*}
echo
echo "invariants:"
check "the job ended done (stage $J_STAGE, first error: $FIRST_ERROR)" test "$J_STAGE" = "done"
check "the job has $TASKS task rows ($R_ALL; task_count $J_COUNT)" \
    test "$R_ALL" = "$TASKS" -a "$J_COUNT" = "$TASKS"
check "every task row is terminal ($R_OPEN are not)" test "$R_OPEN" = 0
check "counters equal rows: done $J_DONE = $R_DONE, failed $J_FAILED = $R_FAILED, cancelled $J_CANCELLED = $R_CANCELLED" \
    test "$J_DONE" = "$R_DONE" -a "$J_FAILED" = "$R_FAILED" -a "$J_CANCELLED" = "$R_CANCELLED"
check "exactly one completion event, job.done ($COMPLETIONS completion events; by kind $KINDS)" \
    test "$COMPLETIONS" = 1 -a "$DONE_EVENTS" = 1
check "the outbox has published every event of the job ($UNPUBLISHED unpublished)" test "$UNPUBLISHED" = 0
check "nothing in $PREFIX.parking (${PARKED:-?})" test "${PARKED:-x}" = 0
check "every queue drained (${UNDRAINED:-all empty})" test -z "$UNDRAINED"
check "every quorum queue has its 3 replicas online (${OFFLINE:-all})" test -z "$OFFLINE"
check "never more than $STALL_LIMIT s without a task counted done (longest: $LONGEST_STALL s; stall pictures: $STALLS)" \
    python3 -c "import sys; sys.exit(float(sys.argv[1]) > $STALL_LIMIT)" "$LONGEST_STALL"

# --- figures -------------------------------------------------------------------------
lost=() restored=() failed_roles=() warns=() outages=()
for i in 1 2 3; do
    log=$ARTIFACTS/pod$i.log
    # "broker connection restored" carries how long the pod was without its broker.
    outages+=("$(grep -o '"message":"broker connection restored","after":"[0-9.]*' "$log" |
        sed 's/.*"after":"\([0-9]*\.[0-9]\).*/\1 s/' | paste -sd, - || true)")
    lost+=("$(grep -c 'broker connection lost' "$log" || true)")
    restored+=("$(grep -c 'broker connection restored' "$log" || true)")
    failed_roles+=("$(grep -c 'role failed; restarting it' "$log" || true)")
    warns+=("$(grep -Ec '"level":"(WARN|ERROR)"|  (WARN|ERROR) ' "$log" || true)")
done
{
    echo
    echo "figures ($RUN_ID, $(nproc) cores):"
    echo "  tasks                 $TASKS x taskmill.sleep ${SLEEP_MS} ms, 3 pods x $CONCURRENCY handlers, quorum queues"
    echo "  job wall time         $WALL s (created -> finished), $RATE tasks/s"
    echo "  fault                 $FAULT $(node_name "$STOP_NODE") at $FAULT_DONE tasks done, $((FAULT_AT - SUBMITTED)) s after the submit; its AMQP port closed $((DOWN_AT - FAULT_AT)) s later"
    echo "  leaders on that node  ${LED:-none} (+ $LED_LADDER delay queues)"
    echo "  node down             AMQP port closed for $PORT_DOWN s ($((RESTART_AT - DOWN_AT)) s until the restart, listening again $((LISTENING_AT - RESTART_AT)) s after it; await_startup returned after $((UP_AT - RESTART_AT)) s)"
    echo "  timeline (s after the submit)  fault $((FAULT_AT - SUBMITTED)), port closed $((DOWN_AT - SUBMITTED)), restart $((RESTART_AT - SUBMITTED)), listening $((LISTENING_AT - SUBMITTED)), started $((UP_AT - SUBMITTED)), job ended $((ENDED - SUBMITTED))"
    echo "  job end after restart $((ENDED - UP_AT)) s; feeding stopped in pod(s): ${FEED_STOPPED:-none}, lost its lease in: ${FEED_LOST:-none}; job fed by pod ${FED_BY:-?}"
    echo "  tasks/s by phase      $PHASES"
    echo "  pods (1 2 3)          connection lost: ${lost[*]}; restored: ${restored[*]}; role restarts: ${failed_roles[*]}; warn+error lines: ${warns[*]}"
    for i in 1 2 3; do
        [ -n "${outages[$((i - 1))]}" ] && echo "  pod $i without broker  ${outages[$((i - 1))]} (its log: broker connection restored after)"
    done
    echo "  tasks retried         $R_RETRIED (max attempts $R_MAXATT); taken over after a lost channel: $R_TAKEN"
    echo "  events for the job    $KINDS"
    echo "  script so far         $((SECONDS - STARTED)) s"
} | tee "$ARTIFACTS/summary.txt"

if ((${#FAILURES[@]})); then
    fail "${#FAILURES[@]} invariant(s) broken: ${FAILURES[*]}"
fi
echo
say "all invariants hold"
