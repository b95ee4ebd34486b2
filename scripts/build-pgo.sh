#!/usr/bin/env bash
# The shipped build: `llm-gateway` as the `dist` profile, optimised with a profile of its own request path
# (profile-guided optimisation). Writes target/pgo/llm-gateway. About 20% less CPU per proxied request than
# the plain `dist` build on the overhead bench (BENCHMARKS.md, "Built from a profile of its own work").
#
#   bash scripts/build-pgo.sh
#
# Steps: an instrumented build (counters in every branch), a training run of ordinary chat traffic through
# it (two vllm-sim workers, whole and streamed answers, a few refused requests, metrics and admin reads),
# then the build again with those counts, so the compiler lays out and inlines for the paths taken.
# The training is not the overhead bench's workload: another strategy, prompt and fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

# llvm-profdata of this rustc's own LLVM (a distribution's may read another profile format).
rustup component add llvm-tools >/dev/null 2>&1 || true
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || { echo "llvm-profdata not found at $profdata (rustup component add llvm-tools)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "== plain build (the sims and the load generator of the training run)"
cargo build --profile dist --locked -p llm-gateway -p vllm-sim --bins
plain=target/dist

echo "== instrumented build"
# (Build scripts run instrumented too; their counts land in target/pgo-gen/unused.)
RUSTFLAGS="-Cprofile-generate=$PWD/target/pgo-gen/unused" \
  cargo build --profile dist --locked -p llm-gateway --bins --target-dir target/pgo-gen

# The URL a process logging to $work/$1.log listens on, once its "listening on http://..." line is there.
url_of() {
  for _ in $(seq 100); do
    local url
    url=$(grep -o 'listening on http://[0-9.:]*' "$work/$1.log" | head -1 | cut -d' ' -f3 || true)
    if [ -n "$url" ]; then echo "$url"; return; fi
    sleep 0.1
  done
  echo "$1 did not start:" >&2; cat "$work/$1.log" >&2; exit 1
}

echo "== training run"
sim_args=(--host 127.0.0.1 --port 0 --ttft-ms 2 --itl-ms 2 --output-tokens 8-48 --max-num-seqs 256)
"$plain/vllm-sim" "${sim_args[@]}" > "$work/sim-a.log" 2>&1 &
pids+=($!)
"$plain/vllm-sim" "${sim_args[@]}" > "$work/sim-b.log" 2>&1 &
pids+=($!)
a=$(url_of sim-a)
b=$(url_of sim-b)
cat > "$work/gateway.toml" <<EOF
[server]
host = "127.0.0.1"
port = 0

[[workers]]
url = "$a"

[[workers]]
url = "$b"
EOF
LLVM_PROFILE_FILE="$work/gateway-%p-%m.profraw" \
  target/pgo-gen/dist/llm-gateway --config "$work/gateway.toml" > "$work/gateway.log" 2>&1 &
gw_pid=$!
pids+=($gw_pid)
gw=$(url_of gateway)
"$plain/llm-gateway" loadtest "$gw" --concurrency 16 --duration 8 --max-tokens 16
"$plain/llm-gateway" loadtest "$gw" --concurrency 48 --duration 8 --stream
"$plain/llm-gateway" loadtest "$gw" --concurrency 8 --duration 3 --prompt "$(printf 'A longer question. %.0s' $(seq 200))"
for _ in $(seq 20); do
  curl -s -o /dev/null "$gw/metrics"
  curl -s -o /dev/null "$gw/v1/models"
  curl -s -o /dev/null "$gw/admin/workers"
  curl -s -o /dev/null -H 'content-type: application/json' -d '{"model": 5}' "$gw/v1/chat/completions"
  curl -s -o /dev/null -H 'content-type: application/json' -d '{"model":"demo-model","messages":' "$gw/v1/chat/completions"
done
# The counts are written at a clean exit.
kill -TERM "$gw_pid"
wait "$gw_pid" || true
ls "$work"/gateway-*.profraw >/dev/null
"$profdata" merge -o "$work/gateway.profdata" "$work"/gateway-*.profraw
# Named by its content: cargo rebuilds when RUSTFLAGS change, not when a file they name does.
mkdir -p target/pgo-use
profile="$PWD/target/pgo-use/gateway-$(sha256sum "$work/gateway.profdata" | cut -c1-16).profdata"
cp "$work/gateway.profdata" "$profile"

echo "== optimised build"
RUSTFLAGS="-Cprofile-use=$profile" \
  cargo build --profile dist --locked -p llm-gateway --bins --target-dir target/pgo-use
install -D -m 0755 target/pgo-use/dist/llm-gateway target/pgo/llm-gateway
echo "built target/pgo/llm-gateway"
