#!/usr/bin/env bash
# Runs every test against real PostgreSQL and RabbitMQ (started or installed as needed):
# formatting, lints, the API contract (schemathesis), unit tests and the integration suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

ensure_postgres
ensure_rabbitmq
ensure_cargo
ensure_promtool
raise_limits
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
./scripts/contract.sh
cargo test --locked "$@"
