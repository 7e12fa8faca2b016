#!/usr/bin/env bash
# Runs schemathesis against a real tenantd (fresh database, ephemeral port) with the OpenAPI
# document it serves: no 5xx, no status or body outside the contract. Then deletes what the run
# created. Expects PostgreSQL and RabbitMQ up (scripts/test.sh sees to it). schemathesis also
# reads scripts/schemathesis.toml (one operation kept out of the stateful phase; it says why).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

SCHEMATHESIS_VERSION=4.32.5
venv=target/schemathesis-venv
if [ ! -x "$venv/bin/st" ]; then
  command -v python3 >/dev/null 2>&1 || apt_install python3
  python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; apt_install python3-venv; python3 -m venv "$venv"; }
  say "installing schemathesis $SCHEMATHESIS_VERSION"
  "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

db=tenantd_contract
admin="postgres://postgres:postgres@$PG_HOST:$PG_PORT/postgres"
psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cargo build --locked --quiet
DATABASE_URL="postgres://postgres:postgres@$PG_HOST:$PG_PORT/$db" HTTP_ADDR="127.0.0.1:$port" \
  LOG_LEVEL=warn ./target/debug/tenantd &
tenantd=$!
trap 'kill -TERM $tenantd 2>/dev/null; wait $tenantd 2>/dev/null || true' EXIT
wait_for tenantd 30 port_open "$port"

status=0
"$venv/bin/st" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$port/api/openapi.json" \
  --checks all \
  --max-examples 25 --seed 1 --generation-allow-x00 false --no-color || status=$?

# Delete the tenants the run created: their queues live in the shared broker.
"$venv/bin/python" - "$port" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
while True:
    page = json.load(urllib.request.urlopen(f"{base}/api/tenants?limit=100"))
    if not page["data"]:
        break
    for t in page["data"]:
        urllib.request.urlopen(urllib.request.Request(f"{base}/api/tenants/{t['id']}", method="DELETE"))
PY
exit $status
