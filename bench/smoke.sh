#!/usr/bin/env bash
# A few seconds of the load generator against a real relay and the floor
# (part of `make test`; the benchmarks themselves are `make bench`).
#   bench/smoke.sh <converge-bench> <converge-server>
set -euo pipefail
bench=$1 server=$2
data=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
fport=$((port + 1))
# Limits lifted as in bench/run.py (one address stands for many users).
"$server" --listen 127.0.0.1:$port --data-dir "$data" --log warn \
  --max-connections-per-ip 1000000 --new-connections-per-ip-per-sec 1000000 --http-requests-per-ip-per-sec 1000000 \
  --messages-per-sec 1000000000 --bytes-per-sec 1000000000000 --max-docs-per-connection 1000000000 & spid=$!
"$bench" floor --listen 127.0.0.1:$fport >/dev/null & fpid=$!
trap 'kill $spid $fpid 2>/dev/null; wait $spid $fpid 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
check() {
  python3 -c 'import json,sys; r=json.loads(sys.stdin.read().splitlines()[-1]); print(r)
assert r["delivered"] > 0 and r["lost"] == 0 and not r["errors"], r'
}
"$bench" p1 --url ws://127.0.0.1:$port --typists 3 --docs 1 --secs 1 --warmup 0.3 | check
"$bench" p1 --url ws://127.0.0.1:$port --typists 8 --docs 2 --secs 1 --warmup 0.3 | check
"$bench" p1 --url ws://127.0.0.1:$fport --typists 3 --secs 1 --warmup 0.3 --floor | check
idle=$("$bench" idle --url ws://127.0.0.1:$port --conns 50 --hold 0.2)
grep -q '^ready 50$' <<<"$idle"
grep -q '"closed_by_server":0' <<<"$idle"
echo "bench smoke: ok"
