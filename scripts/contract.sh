#!/usr/bin/env bash
# Runs schemathesis against a real tenantd (fresh database, ephemeral port) with the OpenAPI
# document it serves: no 5xx, no status or body outside the contract. tenantd verifies JWTs with
# a fresh secret and schemathesis calls it with an admin token minted by `tenantd token` (its
# checks also send requests without it, which must get 401). Then deletes what the run created.
# The rate limit is off: schemathesis sends as fast as tenantd answers, and the contract is
# about what each answer holds (429 is in it all the same).
# Expects PostgreSQL and RabbitMQ up (scripts/test.sh sees to it). schemathesis also reads
# scripts/schemathesis.toml (one operation kept out of the stateful phase; it says why).
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

# A database of this run's own, so two runs on one machine never drop each other's.
db=tenantd_contract_$$
admin="postgres://postgres:postgres@$PG_HOST:$PG_PORT/postgres"
psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cargo build --locked --quiet
export JWT_HS256_SECRET
JWT_HS256_SECRET=$("$venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))')
token=$(./target/debug/tenantd token --admin --ttl 1h)
DATABASE_URL="postgres://postgres:postgres@$PG_HOST:$PG_PORT/$db" HTTP_ADDR="127.0.0.1:$port" \
  RATE_LIMIT_PER_SEC=0 LOG_LEVEL=warn ./target/debug/tenantd &
tenantd=$!
trap 'kill -TERM $tenantd 2>/dev/null; wait $tenantd 2>/dev/null || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true' EXIT
wait_for tenantd 30 port_open "$port"

status=0
"$venv/bin/st" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$port/api/openapi.json" \
  -H "Authorization: Bearer $token" --checks all \
  --max-examples 25 --seed 1 --generation-allow-x00 false --no-color || status=$?

# Delete the tenants the run created: their queues live in the shared broker. None created
# would mean the token never got through, and every answer was a (documented) 401.
"$venv/bin/python" - "$port" "$token" <<'PY' || status=1
import json, sys, urllib.request
base, auth = f"http://127.0.0.1:{sys.argv[1]}", {"Authorization": f"Bearer {sys.argv[2]}"}
deleted = 0
while True:
    page = json.load(urllib.request.urlopen(urllib.request.Request(f"{base}/api/tenants?limit=100", headers=auth)))
    if not page["data"]:
        break
    for t in page["data"]:
        urllib.request.urlopen(urllib.request.Request(f"{base}/api/tenants/{t['id']}", method="DELETE", headers=auth))
        deleted += 1
print(f"tenantd: deleted the {deleted} tenants schemathesis created", file=sys.stderr)
sys.exit(0 if deleted else "tenantd: schemathesis created no tenant: its token was refused")
PY
exit $status
