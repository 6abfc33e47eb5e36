# shellcheck shell=bash
# Local RabbitMQ nodes beside the system's own: sourced by run.sh, not run.
#
# Node i (1..3) is tm<i>@localhost, with its own
#   AMQP port        CLUSTER_PORT_BASE + i          (5681, 5682, 5683)
#   management port  CLUSTER_PORT_BASE + 10000 + i  (15681, ...)
#   distribution     CLUSTER_PORT_BASE + 20000 + i  (25681, ...)
# and its own directory $CLUSTER_WORK/tm<i> (owned by rabbitmq) holding its
# rabbitmq-env.conf, rabbitmq.conf, enabled_plugins, data (mnesia/) and logs (log/).
#
# The system node (rabbit@localhost) reads /etc/rabbitmq/rabbitmq-env.conf, which sets
# NODENAME=rabbit@localhost, and /etc/rabbitmq/rabbitmq.conf, which pins its listener
# to 127.0.0.1:5672 (its management listener is the default 15672). Each node here is
# given RABBITMQ_CONF_ENV_FILE pointing at its own env file, which names every file it
# reads (config, plugins, data, logs), so nothing under /etc/rabbitmq or
# /var/lib/rabbitmq is read or written. The nodes run as user rabbitmq with HOME set to
# $CLUSTER_WORK/home, whose .erlang.cookie is this cluster's own: the three share it,
# and the system node, which has another, can never be joined to them by mistake.
#
# Needs: root, the Debian rabbitmq-server package, setpriv and timeout, an epmd on
# 4369 (the system node's; a node starts one if none runs).

RABBITMQ_LIB=${RABBITMQ_LIB:-/usr/lib/rabbitmq/bin}
CLUSTER_PORT_BASE=${CLUSTER_PORT_BASE:-5680}
CLUSTER_NODES=${CLUSTER_NODES:-3}

node_name() { echo "tm$1@localhost"; }
node_dir() { echo "$CLUSTER_WORK/tm$1"; }
amqp_port() { echo $((CLUSTER_PORT_BASE + $1)); }
mgmt_port() { echo $((CLUSTER_PORT_BASE + 10000 + $1)); }
dist_port() { echo $((CLUSTER_PORT_BASE + 20000 + $1)); }
amqp_url() { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2f"; }
mgmt_url() { echo "http://127.0.0.1:$(mgmt_port "$1")"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# As user rabbitmq, with this cluster's HOME (cookie) and the node's env file, and a
# clean environment: nothing of the caller's (AMQP_URL, ERL_FLAGS, ...) leaks in.
as_rabbitmq() { # as_rabbitmq NODE COMMAND...
    local dir
    dir=$(node_dir "$1")
    shift
    (cd "$CLUSTER_WORK" && setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        HOME="$CLUSTER_WORK/home" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" "$@")
}

# rabbitmqctl against node i, bounded in time (default 60 s; CTL_TIMEOUT to change).
ctl() { # ctl NODE ARGS...
    local i=$1
    shift
    as_rabbitmq "$i" timeout -k 5 "${CTL_TIMEOUT:-60}" \
        "$RABBITMQ_LIB/rabbitmqctl" -n "$(node_name "$i")" "$@"
}

cluster_prepare() { # the shared HOME with the cookie
    mkdir -p "$CLUSTER_WORK/home"
    chmod 755 "$CLUSTER_WORK"
    # A fresh cookie for this cluster: 32 upper-case letters.
    local letters
    letters=$(head -c 4096 /dev/urandom | LC_ALL=C tr -dc '[:upper:]')
    printf '%s' "${letters:0:32}" >"$CLUSTER_WORK/home/.erlang.cookie"
    chmod 400 "$CLUSTER_WORK/home/.erlang.cookie"
    chown -R rabbitmq:rabbitmq "$CLUSTER_WORK/home"
}

node_prepare() { # node_prepare I: the node's directory and files
    local i=$1 dir
    dir=$(node_dir "$i")
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq-env.conf" <<EOF
# tm$i: read instead of /etc/rabbitmq/rabbitmq-env.conf (RABBITMQ_CONF_ENV_FILE).
NODENAME=$(node_name "$i")
DIST_PORT=$(dist_port "$i")
CONFIG_FILE=$dir/rabbitmq.conf
ADVANCED_CONFIG_FILE=$dir/advanced.config
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    cat >"$dir/rabbitmq.conf" <<EOF
# tm$i: read instead of /etc/rabbitmq/rabbitmq.conf (which pins 127.0.0.1:5672).
listeners.tcp.local = 127.0.0.1:$(amqp_port "$i")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(mgmt_port "$i")
log.console = false
log.file.level = info
# Queue statistics every second (default 5 s): run.sh samples them each second.
collect_statistics_interval = 1000
EOF
    echo '[rabbitmq_management].' >"$dir/enabled_plugins"
    echo '[].' >"$dir/advanced.config"
    chown -R rabbitmq:rabbitmq "$dir"
}

# Starts node i in the background, in a session of its own whose id (= its process
# group) is kept in $dir/pgid, so that it, and only it, can be signalled.
node_launch() { # node_launch I
    local i=$1 dir port
    dir=$(node_dir "$i")
    for port in "$(amqp_port "$i")" "$(mgmt_port "$i")" "$(dist_port "$i")"; do
        if port_open "$port"; then
            echo "port $port, wanted by $(node_name "$i"), is already in use" >&2
            return 1
        fi
    done
    rm -f "$dir/pgid"
    # setsid may fork; the shell it runs is the session leader and writes its own id.
    # shellcheck disable=SC2016
    (cd "$CLUSTER_WORK" && exec setsid sh -c 'echo $$ >"$0"; exec "$@"' "$dir/pgid" \
        setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        HOME="$CLUSTER_WORK/home" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        "$RABBITMQ_LIB/rabbitmq-server") >>"$dir/log/server-stdout.log" 2>&1 </dev/null &
    local deadline=$((SECONDS + 10))
    until [ -s "$dir/pgid" ]; do
        if ((SECONDS >= deadline)); then
            echo "$(node_name "$i") did not start (no process group after 10 s)" >&2
            return 1
        fi
        sleep 0.1
    done
}

node_pgid() { cat "$(node_dir "$1")/pgid" 2>/dev/null; }

node_process_alive() { # the node's process group still has a process
    local pgid
    pgid=$(node_pgid "$1") || return 1
    [ -n "$pgid" ] && kill -0 -- "-$pgid" 2>/dev/null
}

# Waits until node i answers and its rabbit app has started, at most SECS.
node_await() { # node_await I SECS
    local i=$1 deadline=$((SECONDS + $2))
    until ctl "$i" -q ping >/dev/null 2>&1; do
        if ! node_process_alive "$i"; then
            echo "$(node_name "$i") exited while starting; its log:" >&2
            tail -n 30 "$(node_dir "$i")/log/server-stdout.log" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "$(node_name "$i") did not answer a ping within $2 s" >&2
            return 1
        fi
        sleep 1
    done
    local left=$((deadline - SECONDS))
    ((left > 5)) || left=5
    CTL_TIMEOUT=$((left + 10)) ctl "$i" -q -t "$left" await_startup >/dev/null || {
        echo "$(node_name "$i") did not finish starting within $2 s" >&2
        return 1
    }
}

# Stops node i: `rabbitmqctl stop`, then TERM and at last KILL to its process group.
node_stop() { # node_stop I
    local i=$1 pgid
    pgid=$(node_pgid "$i") || return 0
    [ -n "$pgid" ] || return 0
    if node_process_alive "$i"; then
        CTL_TIMEOUT=60 ctl "$i" -q stop >/dev/null 2>&1 || true
    fi
    local deadline=$((SECONDS + 30))
    while node_process_alive "$i" && ((SECONDS < deadline)); do sleep 1; done
    if node_process_alive "$i"; then
        kill -TERM -- "-$pgid" 2>/dev/null || true
        deadline=$((SECONDS + 20))
        while node_process_alive "$i" && ((SECONDS < deadline)); do sleep 1; done
    fi
    if node_process_alive "$i"; then
        kill -KILL -- "-$pgid" 2>/dev/null || true
        sleep 1
    fi
    ! node_process_alive "$i"
}

# Kills node i abruptly (SIGKILL to its process group): a crash, not a stop.
node_kill() { # node_kill I
    local pgid
    pgid=$(node_pgid "$1") || return 0
    kill -KILL -- "-$pgid" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while node_process_alive "$1" && ((SECONDS < deadline)); do sleep 0.2; done
    ! node_process_alive "$1"
}

# The running members of node i's cluster, one per line.
running_nodes() { # running_nodes I
    ctl "$1" -q cluster_status --formatter json 2>/dev/null |
        python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin).get("running_nodes", [])))'
}

# Joins node i to node 1's cluster (stop_app, join_cluster, start_app).
# What the CLI prints goes to the node's log/ctl.log (the join prints harmless errors
# about connection tracking tables), shown when a step fails.
node_join() { # node_join I SECS
    local i=$1 step log
    log="$(node_dir "$i")/log/ctl.log"
    for step in stop_app "join_cluster $(node_name 1)" start_app; do
        # shellcheck disable=SC2086
        if ! ctl "$i" -q $step >>"$log" 2>&1; then
            echo "rabbitmqctl -n $(node_name "$i") $step failed:" >&2
            tail -n 20 "$log" >&2
            return 1
        fi
    done
    node_await "$i" "$2"
}

# Waits until node 1 sees all CLUSTER_NODES nodes running, at most SECS.
cluster_await_running() { # cluster_await_running SECS
    local deadline=$((SECONDS + $1)) running
    while :; do
        running=$(running_nodes 1 | wc -l)
        ((running == CLUSTER_NODES)) && return 0
        if ((SECONDS >= deadline)); then
            echo "the cluster has $running running node(s), not $CLUSTER_NODES, after $1 s:" >&2
            ctl 1 cluster_status >&2 || true
            return 1
        fi
        sleep 1
    done
}
