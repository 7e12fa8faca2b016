# Sourced by run.sh and test.sh: makes PostgreSQL and RabbitMQ reachable on 127.0.0.1, using
# the servers already running, starting installed ones, or installing Debian's packages.
# Every step says what it does; nothing is done twice.

PG_HOST=127.0.0.1
PG_PORT=5432
AMQP_PORT=5672

say() { printf 'tenantd: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "$* missing and this is not a Debian/Ubuntu machine: install it, or use docker compose"
  say "installing $* from Debian's packages"
  if [ -z "${TENANTD_APT_UPDATED:-}" ]; then
    as_root apt-get update -qq
    TENANTD_APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # what, seconds, command...
  local what=$1 seconds=$2; shift 2
  local i
  for ((i = 0; i < seconds * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "$what did not come up within ${seconds}s"
}

ensure_postgres() {
  if ! port_open "$PG_PORT"; then
    command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for PostgreSQL 60 port_open "$PG_PORT"
  fi
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  local admin="postgres://postgres:postgres@$PG_HOST:$PG_PORT/postgres"
  if ! psql "$admin" -Atqc 'SELECT 1' >/dev/null 2>&1; then
    say "setting the postgres user's password to 'postgres' (the default DATABASE_URL)"
    as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null ||
      die "cannot log in to PostgreSQL as postgres/postgres"
  fi
  if [ "$(psql "$admin" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'sample_db'")" != 1 ]; then
    say "creating database sample_db"
    psql "$admin" -qc 'CREATE DATABASE sample_db'
  fi
}

# Prints the broker configuration file $1 (which may not exist) with `max_message_size` set
# to $2 bytes, every other line kept: a larger message is refused at the door, so what a replica
# holds is bounded by prefetch x this size (`tenantd --help`, Memory).
rabbitmq_conf_with_max_message_size() {
  local conf=$1 bytes=$2
  if [ -f "$conf" ]; then grep -v '^[[:space:]]*max_message_size[[:space:]]*=' "$conf" || true; fi
  echo "max_message_size = $bytes"
}

# Only a broker this script starts is configured: a running one (shared, perhaps) is left as
# it is.
ensure_rabbitmq() {
  port_open "$AMQP_PORT" && return 0
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  local env_conf=/etc/rabbitmq/rabbitmq-env.conf
  if ! grep -qs 'ulimit' "$env_conf"; then
    # Started as root the broker gets 1024 files (~830 connections, one per tenant) and the
    # next connection hangs; raise it to the hard limit before the broker starts.
    say "raising RabbitMQ's file limit in $env_conf"
    echo 'ulimit -S -n "$(ulimit -H -n)"' | as_root tee -a "$env_conf" >/dev/null
  fi
  if ! getent hosts "$(hostname)" >/dev/null && ! grep -qs '^NODENAME' "$env_conf"; then
    echo 'NODENAME=rabbit@localhost' | as_root tee -a "$env_conf" >/dev/null
  fi
  local conf=/etc/rabbitmq/rabbitmq.conf bytes=${MAX_MESSAGE_BYTES:-1048576}
  if ! grep -qsx "max_message_size = $bytes" "$conf"; then
    say "setting RabbitMQ's max_message_size to $bytes bytes (MAX_MESSAGE_BYTES) in $conf"
    rabbitmq_conf_with_max_message_size "$conf" "$bytes" | as_root tee "$conf.new" >/dev/null
    as_root mv "$conf.new" "$conf"
  fi
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached
  wait_for RabbitMQ 90 as_root rabbitmqctl -q await_startup
  wait_for RabbitMQ 30 port_open "$AMQP_PORT"
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust (https://rustup.rs), or use docker compose"
}

ensure_promtool() {
  # The metrics test checks /metrics with `promtool check metrics`.
  command -v promtool >/dev/null 2>&1 || apt_install --no-install-recommends prometheus
}

ensure_packaging_tools() {
  # The install tests build the Debian package (dpkg-dev) and verify its unit (systemd-analyze).
  command -v dpkg-shlibdeps >/dev/null 2>&1 || apt_install --no-install-recommends dpkg-dev
  command -v systemd-analyze >/dev/null 2>&1 || apt_install --no-install-recommends systemd
}

raise_limits() {
  # Each tenant holds one broker connection (~4 file descriptors in tenantd) and 3 threads.
  # 5,000 tenants need ~20,000 descriptors and ~15,000 threads: raise the file limit (the hard
  # one too when root), and the kernel's map count, which caps a process near 16,000 threads.
  ulimit -n 1048576 2>/dev/null || ulimit -S -n "$(ulimit -H -n)" 2>/dev/null || true
  local files
  files=$(ulimit -n)
  if [ "$files" != unlimited ] && [ "$files" -lt 32768 ]; then
    # tenantd keeps ~630 for itself with the default settings (HTTP connections, pools): the
    # same reserve `tenantd check` counts.
    say "file limit is $files: tenantd can hold about $(((files > 630 ? files - 630 : 0) / 4)) tenants (raise the hard limit for more; tenantd check says what else limits them)"
  fi
  if [ "$(id -u)" = 0 ] && [ "$(cat /proc/sys/vm/max_map_count 2>/dev/null || echo 0)" -lt 262144 ]; then
    sysctl -qw vm.max_map_count=262144 2>/dev/null || say "could not raise vm.max_map_count (thousands of tenants need it)"
  fi
}

ensure_server_programs() {
  # The fault soak (tests/it/soak.rs, tenantd-bench --phases soak) restarts PostgreSQL and
  # RabbitMQ, so it runs private servers of its own: it needs their programs on this machine,
  # even where the shared servers run elsewhere.
  if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && ! command -v initdb >/dev/null 2>&1; then
    apt_install postgresql
  fi
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || apt_install rabbitmq-server
}

# Everything tenantd and its tests need on this machine.
ensure_stack() {
  ensure_postgres
  ensure_rabbitmq
  ensure_cargo
  raise_limits
}
