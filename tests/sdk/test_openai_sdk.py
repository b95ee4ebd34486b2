"""The official openai Python SDK against the gateway in demo mode: chat without and with stream=True."""
import os
import re
import subprocess
import sys

import openai


def start_gateway(binary):
    proc = subprocess.Popen(
        [binary, "--demo", "2", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("gateway exited before listening")


def main():
    binary = sys.argv[1]
    proc, url = start_gateway(binary)
    passed = failed = 0
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)

        def check(name, fn):
            nonlocal passed, failed
            try:
                fn()
                passed += 1
                print(f"ok   {name}")
            except Exception as e:  # noqa: BLE001 - report every failure
                failed += 1
                print(f"FAIL {name}: {e!r}")

        def chat():
            r = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
            assert r.choices[0].message.content, r
            assert r.usage.completion_tokens > 0, r

        def chat_stream():
            stream = client.chat.completions.create(
                model="demo-model", messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                stream=True, stream_options={"include_usage": True}, max_tokens=8,
            )
            text, usage = "", None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage
            assert text, "no content streamed"
            assert usage is not None and usage.completion_tokens > 0, usage

        def models():
            ids = [m.id for m in client.models.list()]
            assert ids == ["demo-model"], ids

        def unknown_model():
            try:
                client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
            except openai.NotFoundError as e:
                assert e.code == "model_not_found", e
                return
            raise AssertionError("expected NotFoundError")

        check("chat completion", chat)
        check("chat completion stream=True", chat_stream)
        check("models.list", models)
        check("unknown model raises NotFoundError", unknown_model)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"sdk: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
