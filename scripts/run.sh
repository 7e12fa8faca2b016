#!/usr/bin/env bash
# Runs the whole stack on this machine: PostgreSQL and RabbitMQ (started or installed as
# needed), then tenantd in the foreground on 127.0.0.1:8080 (HTTP_ADDR=0.0.0.0:8080 serves other
# hosts: set a credential too, see the README's Access). Ctrl-C stops tenantd cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

ensure_stack
cargo build --release --locked --quiet
say "starting tenantd on ${HTTP_ADDR:-127.0.0.1:8080}"
exec ./target/release/tenantd
