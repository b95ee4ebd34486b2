"""The Batch API through the official openai Python SDK, unchanged: files.create(purpose="batch"),
batches.create/retrieve/list/cancel, files.content; a malformed file; another tenant's key; and a
gateway killed with SIGKILL mid-batch and restarted on the same data_dir.

Usage: test_batch_sdk.py path/to/llm-gateway
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import openai

KEYS = {"sk-team-a": "team-a", "sk-team-b": "team-b"}


def config_text(data_dir):
    keys = "".join(f'[[auth.keys]]\nkey = "{k}"\nname = "{n}"\n' for k, n in KEYS.items())
    return (
        "[auth]\nenabled = true\n" + keys +
        f'[batch]\ndata_dir = "{data_dir}"\nmax_concurrency = 16\nretry_base_ms = 50\n'
    )


def start_gateway(binary, config_path):
    proc = subprocess.Popen(
        [binary, "-c", config_path, "--demo", "2", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("gateway exited before listening")


def lines(n, max_tokens=20, prefix="req"):
    out = []
    for i in range(n):
        out.append(json.dumps({
            "custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "demo-model", "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": f"question {i}"}]},
        }))
    return ("\n".join(out) + "\n").encode()


def client(url, key):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def submit(c, content, name="input.jsonl"):
    f = c.files.create(file=(name, content), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.bytes == len(content), f
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"suite": "sdk"})
    assert b.status == "validating" and b.input_file_id == f.id and b.metadata == {"suite": "sdk"}, b
    return b


def wait(c, batch_id, cond, timeout=120):
    end = time.time() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if cond(b):
            return b
        if time.time() > end:
            raise AssertionError(f"timed out waiting; batch is {b}")
        time.sleep(0.1)


def terminal(b):
    return b.status in ("completed", "failed", "expired", "cancelled")


def done(b):
    return b.request_counts.completed + b.request_counts.failed


def output_lines(c, file_id):
    return [json.loads(l) for l in c.files.content(file_id).text.splitlines() if l.strip()]


def one_per_custom_id(out, n, prefix="req"):
    ids = [l["custom_id"] for l in out]
    assert len(ids) == n, f"{len(ids)} output lines for {n} inputs"
    assert sorted(ids) == sorted(f"{prefix}-{i}" for i in range(n)), "every custom_id exactly once"


def main():
    binary = sys.argv[1]
    work = tempfile.mkdtemp(prefix="batch-sdk-")
    config_path = os.path.join(work, "gateway.toml")
    with open(config_path, "w") as f:
        f.write(config_text(os.path.join(work, "data")))
    proc, url = start_gateway(binary, config_path)
    passed = failed = 0

    def check(name, fn):
        nonlocal passed, failed
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {name}: {e!r}")

    try:
        a = client(url, "sk-team-a")
        b_client = client(url, "sk-team-b")
        state = {}

        def few_hundred():
            b = submit(a, lines(300))
            state["batch"] = b
            b = wait(a, b.id, terminal)
            assert b.status == "completed", b
            assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (300, 300, 0), b
            assert b.completed_at and b.in_progress_at and b.output_file_id and b.error_file_id is None, b
            out = output_lines(a, b.output_file_id)
            one_per_custom_id(out, 300)
            assert all(l["response"]["status_code"] == 200 and l["error"] is None for l in out)
            assert out[0]["response"]["body"]["choices"][0]["message"]["content"]
            assert b.id in [x.id for x in a.batches.list(limit=10)]
            assert a.files.retrieve(b.output_file_id).purpose == "batch_output"

        def malformed():
            bad = lines(2) + b"{not json\n" + json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}).encode()
            b = submit(a, bad, "bad.jsonl")
            b = wait(a, b.id, terminal)
            assert b.status == "failed", b
            got = [(e.line, e.code) for e in b.errors.data]
            assert got == [(3, "invalid_json_line"), (4, "mismatched_endpoint")], got
            assert all(e.message for e in b.errors.data)

        def cancel():
            b = submit(a, lines(800, max_tokens=40, prefix="c"))
            wait(a, b.id, lambda x: done(x) >= 10)
            c = a.batches.cancel(b.id)
            assert c.status in ("cancelling", "cancelled") and c.cancelling_at, c
            c = wait(a, b.id, terminal)
            assert c.status == "cancelled" and c.cancelled_at, c
            assert 10 <= done(c) < 800, f"partial counts: {c.request_counts}"
            out = output_lines(a, c.output_file_id)
            assert len(out) == c.request_counts.completed

        def other_tenant():
            b = state["batch"]
            for call in (lambda: b_client.batches.retrieve(b.id),
                         lambda: b_client.files.retrieve(b.input_file_id),
                         lambda: b_client.files.content(b.input_file_id),
                         lambda: b_client.batches.cancel(b.id)):
                try:
                    call()
                    raise AssertionError("another tenant's key could see the batch")
                except openai.NotFoundError:
                    pass
            assert [x.id for x in b_client.batches.list()] == []
            assert [x.id for x in b_client.files.list()] == []

        def kill_9_and_resume():
            nonlocal proc, url
            n = 400
            b = submit(a, lines(n, max_tokens=40, prefix="k"))
            before = wait(a, b.id, lambda x: done(x) >= 40)
            proc.kill()  # SIGKILL
            proc.wait()
            assert done(before) < n, before
            proc, url = start_gateway(binary, config_path)
            c = client(url, "sk-team-a")
            after = wait(c, b.id, terminal, timeout=180)
            assert after.status == "completed", after
            assert (after.request_counts.completed, after.request_counts.failed) == (n, 0), after.request_counts
            one_per_custom_id(output_lines(c, after.output_file_id), n, prefix="k")

        check("batch of 300 lines completes, one output line per custom_id", few_hundred)
        check("malformed file fails with errors naming lines", malformed)
        check("cancel ends cancelled with partial counts", cancel)
        check("another tenant's key gets 404", other_tenant)
        check("kill -9 mid-batch, restart on the same data_dir: completes, one line per input", kill_9_and_resume)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
