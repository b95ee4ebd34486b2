#!/usr/bin/env bash
# Instructions the gateway executes per proxied request, counted by callgrind: deterministic to about
# 0.5% where CPU time on a shared 2-core machine moves by 30% between rounds (BENCHMARKS.md, Overhead).
#
#   scripts/instructions-per-request.sh [--stream] [--floor] [GATEWAY_BIN] [OUT_DIR]
#
# Runs a zero-latency vllm-sim and the gateway (round_robin, request log on) under callgrind twice,
# sends 200 and then 1200 sequential 1 KB chat POSTs over one keep-alive connection, and prints
# (Ir(1200) - Ir(200)) / 1000: start-up and shutdown cancel out. Needs valgrind and python3.
#
# --stream: streamed requests instead, 64 events 5 ms apart as a worker sends them (each event its own
#   read, so what a relayed event costs is counted; events that arrive together would hide it), 10 at
#   once over 10 connections, 20 and then 80 streams: (Ir(80) - Ir(20)) / 60.
# --floor: the same through `bench hyper-proxy` (a bare hyper proxy, the stack's floor) instead, the
#   bench beside GATEWAY_BIN (so `--floor target/dist/llm-gateway` counts the floor built as dist).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
stream=0 floor=0
while [ $# -gt 0 ]; do
    case $1 in
        --stream) stream=1 ;;
        --floor) floor=1 ;;
        *) break ;;
    esac
    shift
done
bin=${1:-$here/target/release/llm-gateway}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
# vllm-sim and bench from GATEWAY_BIN's directory when they are there (`target/dist/llm-gateway`
# counts the dist profile), else target/release's (a saved older build, say).
dir=$(dirname "$bin")
[ -x "$dir/bench" ] && [ -x "$dir/vllm-sim" ] || dir=$here/target/release
sim=$dir/vllm-sim
bench=$dir/bench
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
[ -x "$sim" ] && [ -x "$bench" ] || { echo "build first: cargo build --release --workspace --bins (or --profile dist)" >&2; exit 1; }
if [ "$stream" = 1 ]; then itl=5 tokens=64; else itl=0 tokens=16; fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() { # run N -> prints total Ir
    local n=$1 sim_port port sim_pid pid
    sim_port=$(free_port); port=$(free_port)
    "$sim" --host 127.0.0.1 --port "$sim_port" --ttft-ms 0 --itl-ms "$itl" --prefill-ms-per-1k-tokens 0 \
        --output-tokens "$tokens-$tokens" --max-num-seqs 1024 >"$out/sim.$n.out" 2>&1 &
    sim_pid=$!
    if [ "$floor" = 1 ]; then
        valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.$n" "$bench" hyper-proxy \
            --upstream "http://127.0.0.1:$sim_port" >"$out/proxy.$n.out" 2>&1 &
        pid=$!
        for _ in $(seq 1 240); do grep -q listening "$out/proxy.$n.out" 2>/dev/null && break; sleep 0.5; done
        port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$out/proxy.$n.out" | cut -d: -f3)
    else
        cat >"$out/gateway.$n.toml" <<TOML
[server]
host = "127.0.0.1"
port = $port
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
        pid=$!
        for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    python3 - "$port" "$n" "$stream" <<'PY'
import http.client, json, sys, threading
port, n, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
content = "Tell me how a load balancer spreads requests over a fleet of inference servers. " * 11
body = json.dumps({"model": "demo-model", "stream": stream, "max_tokens": 64 if stream else 16, "messages": [
    {"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": content}]})
def client(k):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(k):
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse(); data = r.read()
        assert r.status == 200, r.status
        assert not stream or data.count(b"data:") >= 64, data.count(b"data:")
# Streams 10 at once (each its own connection), whole answers one after another.
shares = [n // 10] * 10 if stream else [n]
clients = [threading.Thread(target=client, args=(k,)) for k in shares]
[t.start() for t in clients]; [t.join() for t in clients]
PY
    kill -TERM "$pid"; wait "$pid" || true
    kill "$sim_pid"; wait "$sim_pid" 2>/dev/null || true
    awk '/^summary:/ {print $2}' "$out/callgrind.$n"
}

if [ "$stream" = 1 ]; then
    small=$(run 20); large=$(run 80)
    echo "instructions per streamed request (64 events): $(( (large - small) / 60 ))  (callgrind files in $out)"
else
    small=$(run 200); large=$(run 1200)
    echo "instructions per request: $(( (large - small) / 1000 ))  (callgrind files in $out)"
fi
