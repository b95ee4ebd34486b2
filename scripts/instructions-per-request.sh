#!/usr/bin/env bash
# Instructions the gateway executes per proxied request, counted by callgrind: deterministic to about
# 0.5% where CPU time on a shared 2-core machine moves by 30% between rounds (BENCHMARKS.md, Overhead).
#
#   scripts/instructions-per-request.sh [GATEWAY_BIN] [OUT_DIR]
#
# Runs a zero-latency vllm-sim and the gateway (round_robin, request log on) under callgrind twice,
# sends 200 and then 1200 sequential 1 KB chat POSTs over one keep-alive connection, and prints
# (Ir(1200) - Ir(200)) / 1000: start-up and shutdown cancel out. Needs valgrind and python3.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/release/llm-gateway}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
sim=$here/target/release/vllm-sim
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
[ -x "$sim" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() { # run N -> prints total Ir
    local n=$1 sim_port gw_port sim_pid gw_pid
    sim_port=$(free_port); gw_port=$(free_port)
    "$sim" --host 127.0.0.1 --port "$sim_port" --ttft-ms 0 --itl-ms 0 --prefill-ms-per-1k-tokens 0 \
        --output-tokens 16-16 --max-num-seqs 1024 >"$out/sim.$n.out" 2>&1 &
    sim_pid=$!
    cat >"$out/gateway.$n.toml" <<TOML
[server]
host = "127.0.0.1"
port = $gw_port
shutdown_grace_secs = 1
[routing]
strategy = "round_robin"
[log]
level = "info"
[[workers]]
url = "http://127.0.0.1:$sim_port"
TOML
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.$n" "$bin" --config "$out/gateway.$n.toml" \
        >"$out/gateway.$n.out" 2>&1 &
    gw_pid=$!
    for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$gw_port/health" >/dev/null 2>&1 && break; sleep 0.5; done
    python3 - "$gw_port" "$n" <<'PY'
import http.client, json, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
content = "Tell me how a load balancer spreads requests over a fleet of inference servers. " * 11
body = json.dumps({"model": "demo-model", "stream": False, "max_tokens": 16, "messages": [
    {"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": content}]})
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
    kill -TERM "$gw_pid"; wait "$gw_pid" || true
    kill "$sim_pid"; wait "$sim_pid" 2>/dev/null || true
    awk '/^summary:/ {print $2}' "$out/callgrind.$n"
}

small=$(run 200)
large=$(run 1200)
echo "instructions per request: $(( (large - small) / 1000 ))  (callgrind files in $out)"
