#!/usr/bin/env bash
# Holds a running relay to sync-server/openapi.json with Schemathesis:
# requests generated from the document (valid ones, invalid ones, and
# sequences that create a context and use it), each answer checked to be
# documented, in the documented shape, never a 5xx, valid requests
# accepted (or a documented 404/422) and invalid ones refused.
#
#   tests/openapi/run.sh <converge-server binary> [examples per operation]
#
# The seed is random unless ST_SEED is set; it is printed, so a failure
# replays with ST_SEED=<seed>. The event stream (`/events`) never ends, so
# it is left to the suite's own tests.
set -euo pipefail
server=${1:?usage: run.sh <converge-server> [examples]}
examples=${2:-100}
here=$(cd "$(dirname "$0")" && pwd)
spec="$here/../../sync-server/openapi.json"
data=$(mktemp -d)
log="$data/relay.log"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Schemathesis sends thousands of requests from one address: the per-address
# HTTP limit is lifted (tests/tests/suite/limits.rs holds it).
"$server" --listen "127.0.0.1:$port" --data-dir "$data/store" --log warn \
  --http-requests-per-ip-per-sec 1000000 >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  kill -0 "$pid" 2>/dev/null || { echo "the relay exited:"; cat "$log"; exit 1; }
  sleep 0.1
done
seed=${ST_SEED:-$RANDOM$RANDOM}
echo "schemathesis against 127.0.0.1:$port, seed $seed, $examples examples per operation"
status=0
python3 -m schemathesis.cli --config-file "$here/schemathesis.toml" run "$spec" \
  --url "http://127.0.0.1:$port" --checks all --exclude-path-regex '/events$' \
  --max-examples "$examples" --seed "$seed" --generation-database none \
  --no-color --request-timeout 10 || status=$?
# Whatever the checks said, the relay must still be up and have logged no
# panic.
curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "the relay is down after the run"; status=1; }
if grep -q "panicked" "$log"; then echo "the relay panicked:"; grep -A5 panicked "$log"; status=1; fi
exit $status
