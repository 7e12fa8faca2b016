#!/usr/bin/env bash
# Runs every test against real PostgreSQL and RabbitMQ (started or installed as needed):
# formatting, lints, the API contract (schemathesis), unit tests and the integration suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

ensure_stack
ensure_promtool
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
./scripts/contract.sh
cargo test --locked "$@"
