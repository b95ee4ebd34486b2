#!/usr/bin/env bash
# The gateway's CPU time to relay event streams whose tokens come faster than a scheduler turn: a
# zero-latency vllm-sim answers 20 streamed requests of 4,000 tokens each (19 MB of SSE), sent one after
# another through the gateway by one client. Prints the wall time, the client's reads and the gateway's
# CPU time in clock ticks (user + system, 10 ms each on Linux).
#
#   scripts/stream-burst-cpu.sh [GATEWAY_BIN]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/release/llm-gateway}
sim=$here/target/release/vllm-sim
[ -x "$sim" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }
out=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port); gw_port=$(free_port)
"$sim" --host 127.0.0.1 --port "$sim_port" --ttft-ms 0 --itl-ms 0 --prefill-ms-per-1k-tokens 0 \
    --output-tokens 4000-4000 --max-num-seqs 1024 --max-model-len 100000 >"$out/sim.out" 2>&1 &
sim_pid=$!
cat >"$out/gateway.toml" <<TOML
[server]
host = "127.0.0.1"
port = $gw_port
[routing]
strategy = "round_robin"
[log]
level = "warn"
[[workers]]
url = "http://127.0.0.1:$sim_port"
TOML
"$bin" --config "$out/gateway.toml" >"$out/gateway.out" 2>&1 &
gw_pid=$!
trap 'kill "$gw_pid" "$sim_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$gw_port/health" >/dev/null 2>&1 && break; sleep 0.2; done
python3 - "$gw_port" <<'PY'
import http.client, json, sys, time
port = int(sys.argv[1])
body = json.dumps({"model": "demo-model", "stream": True, "max_tokens": 4000,
                   "messages": [{"role": "user", "content": "hi"}]})
start, reads, size = time.time(), 0, 0
for _ in range(20):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.status
    while chunk := r.read1(1 << 20):
        reads, size = reads + 1, size + len(chunk)
print(f"wall {time.time() - start:.2f} s, {reads} reads, {size} bytes")
PY
awk '{print "gateway CPU ticks (user + system):", $14 + $15}' "/proc/$gw_pid/stat"
