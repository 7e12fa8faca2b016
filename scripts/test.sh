#!/usr/bin/env bash
# Runs every test against real PostgreSQL and RabbitMQ (started or installed as needed):
# formatting, lints, the API contract (schemathesis), unit tests and the integration suite,
# including the test that stops a node of a 3-node RabbitMQ cluster under load (the cluster is
# started beside the broker for it and stopped at the end; TENANTD_TEST_CLUSTER= skips it) and
# the fault soak (private PostgreSQL and RabbitMQ servers of its own, on ports 5491 and 5691).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

ensure_stack
ensure_promtool
ensure_packaging_tools
ensure_server_programs

cluster=
if [ -z "${TENANTD_TEST_CLUSTER+set}" ]; then
  # Started now, in the background: it takes ~30 s, while the checks below run.
  mkdir -p target
  ./scripts/cluster.sh start >target/cluster.log 2>&1 &
  cluster=$!
  trap './scripts/cluster.sh stop >>target/cluster.log 2>&1 || true' EXIT
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
./scripts/contract.sh

if [ -n "$cluster" ]; then
  if wait "$cluster"; then
    export TENANTD_TEST_CLUSTER="$PWD/scripts/cluster.sh"
  else
    cat target/cluster.log >&2
    die "the 3-node RabbitMQ cluster did not start (TENANTD_TEST_CLUSTER= skips its test)"
  fi
fi
cargo test --locked "$@"
