#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this one machine, from Debian's rabbitmq-server, beside any broker
# already running (which it never touches): nodes rabbit1..3@localhost, AMQP on 127.0.0.1 ports
# 5681..5683, everything (cookie, data, logs) under $TENANTD_CLUSTER_DIR (/tmp/tenantd-cluster).
#
#   scripts/cluster.sh start          start the three nodes and join them (~20 s)
#   scripts/cluster.sh stop           stop them and remove their data
#   scripts/cluster.sh stop-node N    stop node N alone (a node failure)
#   scripts/cluster.sh start-node N   start node N again; it rejoins the cluster
#   scripts/cluster.sh urls           the RABBITMQ_URL of the cluster
#   scripts/cluster.sh ctl N ARGS     rabbitmqctl ARGS on node N
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

BASE=${TENANTD_CLUSTER_DIR:-/tmp/tenantd-cluster}
# The scripts behind /usr/sbin: as root those switch to the rabbitmq user and its cookie.
BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

node() { echo "rabbit$1@localhost"; }

# Runs a command as node N's environment sees it: its own directories, ports and config, and
# the cluster's cookie in $HOME (never the system broker's).
as_node() {
  local n=$1; shift
  local dir="$BASE/node$n"
  env HOME="$BASE" \
    RABBITMQ_NODENAME="$(node "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$((5680 + n)) \
    RABBITMQ_DIST_PORT=$((25680 + n)) \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_CONFIG_FILES="$dir/conf.d" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$@"
}

ctl() { # node, args...
  local n=$1; shift
  as_node "$n" "$BIN/rabbitmqctl" -q -n "$(node "$n")" "$@"
}

prepare() {
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  mkdir -p "$BASE"
  if [ ! -f "$BASE/.erlang.cookie" ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$BASE/.erlang.cookie"
    chmod 400 "$BASE/.erlang.cookie"
  fi
  local n dir
  for n in "${NODES[@]}"; do
    dir="$BASE/node$n"
    mkdir -p "$dir/mnesia" "$dir/log" "$dir/conf.d"
    echo '[].' >"$dir/enabled_plugins"
    : >"$dir/rabbitmq-env.conf"
    printf 'loopback_users = none\n' >"$dir/rabbitmq.conf"
  done
}

start_node() {
  local n=$1
  say "starting RabbitMQ node $(node "$n") on port $((5680 + n))"
  ulimit -S -n "$(ulimit -H -n)" 2>/dev/null || true
  as_node "$n" setsid "$BIN/rabbitmq-server" >"$BASE/node$n/log/stdout" 2>&1 </dev/null &
  wait_for "node $n" 60 ctl "$n" wait "$BASE/node$n/pid"
}

start() {
  prepare
  local n
  for n in "${NODES[@]}"; do
    port_open $((5680 + n)) || start_node "$n"
  done
  for n in 2 3; do
    if ! ctl "$n" cluster_status 2>/dev/null | grep -q "$(node 1)"; then
      say "joining $(node "$n") to $(node 1)"
      ctl "$n" stop_app
      ctl "$n" join_cluster "$(node 1)"
      ctl "$n" start_app
    fi
  done
  for n in "${NODES[@]}"; do
    wait_for "node $n" 60 port_open $((5680 + n))
  done
  say "cluster up: RABBITMQ_URL=$(urls)"
}

stop_node() {
  local n=$1
  [ -f "$BASE/node$n/pid" ] || return 0
  say "stopping $(node "$n")"
  ctl "$n" stop "$BASE/node$n/pid" || true
}

stop() {
  [ -d "$BASE" ] || return 0
  local n
  for n in 3 2 1; do stop_node "$n"; done
  rm -rf "$BASE"
}

urls() {
  local n out=""
  for n in "${NODES[@]}"; do
    out+="${out:+,}amqp://guest:guest@127.0.0.1:$((5680 + n))/%2f"
  done
  echo "$out"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  stop-node) stop_node "${2:?node number}" ;;
  start-node) prepare; start_node "${2:?node number}" ;;
  urls) urls ;;
  ctl) shift; n=${1:?node number}; shift; ctl "$n" "$@" ;;
  *) echo "usage: $0 start|stop|stop-node N|start-node N|urls|ctl N ARGS" >&2; exit 2 ;;
esac
