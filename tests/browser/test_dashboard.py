"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

Starts `llm-gateway --demo 2` on an ephemeral loopback port, opens `/`, and checks what a person would
see: two worker rows, numbers that move while load flows, a Drain click that really drains the worker,
and a strategy switch that really changes the routing strategy. Saves a screenshot to docs/dashboard.png.

    .venv/bin/python tests/browser/test_dashboard.py target/release/llm-gateway

Prints `dashboard: N passed, 0 failed` and exits non-zero on any failure. Never sleeps to wait for
something: every wait is a condition polled until a deadline.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request

from playwright.sync_api import sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = os.path.join(ROOT, "docs", "dashboard.png")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def http(method, url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_for(what, cond, deadline=15.0, every=0.1):
    """Polls `cond` until it answers something truthy, or fails after `deadline` seconds."""
    end = time.monotonic() + deadline
    last_err = None
    while time.monotonic() < end:
        try:
            got = cond()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_err = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))


class Gateway:
    def __init__(self, binary, env=None):
        self.proc = subprocess.Popen(
            [binary, "--demo", "2", "--host", "127.0.0.1", "--port", "0"],
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"gateway did not start: {line!r}")
        self.url = line.split("listening on", 1)[1].strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Load(threading.Thread):
    """Sends chat requests back to back (bounded in count and time) until stopped."""

    def __init__(self, url, max_requests=5000, max_seconds=120):
        super().__init__(daemon=True)
        self.url, self.max_requests, self.max_seconds = url, max_requests, max_seconds
        self.halt = threading.Event()
        self.sent = 0
        self.errors = 0

    def run(self):
        end = time.monotonic() + self.max_seconds
        while not self.halt.is_set() and self.sent < self.max_requests and time.monotonic() < end:
            # Every other request streams, so time to first token is measured too.
            body = {
                "model": "demo-model",
                "max_tokens": 8,
                "stream": self.sent % 2 == 1,
                "messages": [{"role": "user", "content": f"hello {self.sent % 7}"}],
            }
            try:
                req = urllib.request.Request(
                    self.url + "/v1/chat/completions",
                    data=json.dumps(body).encode(),
                    method="POST",
                    headers={"content-type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
            except Exception:  # noqa: BLE001 - counted, the test checks progress not perfection
                self.errors += 1
            self.sent += 1

    def stop(self):
        self.halt.set()
        self.join(timeout=35)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "llm-gateway")
    passed, failed = 0, 0
    gw = Gateway(binary)
    loads = []
    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    checks = []

    def check(name):
        def register(fn):
            checks.append((name, fn))
            return fn

        return register

    try:
        with sync_playwright() as pw:
            # A fresh profile each run (Playwright takes --user-data-dir as launch_persistent_context's dir).
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
                color_scheme="light",
            )
            page = context.pages[0] if context.pages else context.new_page()
            console_errors = []
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

            def cell(worker, field):
                return page.locator(f'#workers tr[data-worker="{worker}"] td[data-field="{field}"]').inner_text()

            @check("page loads with its title and two worker rows")
            def _():
                page.goto(gw.url + "/")
                assert page.title() == "llm-gateway dashboard", page.title()
                wait_for("2 worker rows", lambda: page.locator("#workers tbody tr").count() == 2)
                wait_for("live connection", lambda: page.locator("#conn").inner_text() == "live")
                names = sorted(page.locator("#workers tbody tr").evaluate_all("rs => rs.map(r => r.dataset.worker)"))
                assert names == ["sim-0", "sim-1"], names
                wait_for("both healthy", lambda: cell("sim-0", "health") == "healthy" and cell("sim-1", "health") == "healthy")

            @check("numbers move while load flows")
            def _():
                before = {w: cell(w, "requests_total") for w in ("sim-0", "sim-1")}
                total_before = page.locator("#stat-total").inner_text()
                for _ in range(4):
                    load = Load(gw.url)
                    load.start()
                    loads.append(load)
                wait_for(
                    "both workers' request counts to change",
                    lambda: all(cell(w, "requests_total") != before[w] for w in before),
                    deadline=20,
                )
                wait_for("total requests card to change", lambda: page.locator("#stat-total").inner_text() != total_before)
                wait_for(
                    "qps above zero",
                    lambda: float(page.locator("#stat-qps").inner_text().replace(",", "") or 0) > 0,
                    deadline=20,
                )
                wait_for(
                    "a latency p50 in the chart legend",
                    lambda: "p50 –" not in page.locator("#legend-latency").inner_text(),
                    deadline=20,
                )
                share = cell("sim-0", "share")
                assert share.endswith("%") and share != "0%", share

            @check("Drain button drains the worker")
            def _():
                page.locator('#workers tr[data-worker="sim-1"] button[data-action="drain"]').click()
                wait_for(
                    "sim-1 draining in /api/workers",
                    lambda: any(w["name"] == "sim-1" and w["draining"] for w in http("GET", gw.url + "/api/workers")),
                )
                wait_for("page shows draining", lambda: cell("sim-1", "draining") == "draining")
                wait_for("button turns to Undrain", lambda: "Undrain" in cell("sim-1", "actions"))
                assert cell("sim-0", "draining") == "no"
                page.locator('#workers tr[data-worker="sim-1"] button[data-action="undrain"]').click()
                wait_for(
                    "sim-1 undrained in /api/workers",
                    lambda: any(w["name"] == "sim-1" and not w["draining"] for w in http("GET", gw.url + "/api/workers")),
                )
                wait_for("page shows sim-1 not draining", lambda: cell("sim-1", "draining") == "no")

            @check("strategy select switches the routing strategy")
            def _():
                assert page.locator("#strategy option").count() == 7
                page.select_option("#strategy", "least_queue")
                wait_for("status reports least_queue", lambda: http("GET", gw.url + "/api/status")["strategy"] == "least_queue")
                wait_for("select shows least_queue", lambda: page.locator("#strategy").input_value() == "least_queue")

            @check("queue and rate-limit panels render gracefully")
            def _():
                assert page.locator("#queue-empty").is_visible() or page.locator("#queue tbody tr").count() > 0
                wait_for("processing chips", lambda: page.locator("#processing .chip").count() == 2)
                assert page.locator("#ratelimit-empty").is_visible() or page.locator("#ratelimit tbody tr").count() > 0

            @check("screenshot")
            def _():
                # Let load draw half a minute of charts, with TTFT measured (streamed requests).
                wait_for("30 s of series", lambda: page.evaluate("last && last.series.t.length") >= 30, deadline=40)
                wait_for("a TTFT p50 in the legend", lambda: "p50 –" not in page.locator("#legend-ttft").inner_text())
                wait_for("status card without draining", lambda: "draining" not in page.locator("#stat-workers").inner_text())
                page.evaluate("document.getElementById('notice').hidden = true")
                os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
                page.screenshot(path=SCREENSHOT, full_page=True)
                assert os.path.getsize(SCREENSHOT) > 10000

            @check("with an admin token: a clear 401 message, then the token field unlocks mutations")
            def _():
                secured = Gateway(binary, {"LLM_ADMIN_TOKEN": "s3cret-token"})
                try:
                    p2 = context.new_page()
                    p2.goto(secured.url + "/")
                    drain = p2.locator('#workers tr[data-worker="sim-0"] button[data-action="drain"]')
                    wait_for("worker rows", lambda: drain.count() == 1)
                    drain.click()
                    wait_for("401 notice", lambda: "401" in p2.locator("#notice").inner_text())
                    assert "admin token" in p2.locator("#notice").inner_text().lower()
                    assert not any(w["draining"] for w in http("GET", secured.url + "/api/workers"))
                    p2.fill("#token", "s3cret-token")
                    drain.click()
                    wait_for(
                        "sim-0 draining with the token",
                        lambda: any(w["name"] == "sim-0" and w["draining"] for w in http("GET", secured.url + "/api/workers")),
                    )
                    assert p2.evaluate("localStorage.getItem('llm-gateway.admin-token')") == "s3cret-token"
                    p2.close()
                finally:
                    secured.stop()

            @check("no script errors")
            def _():
                assert not console_errors, console_errors

            for name, fn in checks:
                try:
                    fn()
                    passed += 1
                    print(f"ok   {name}")
                except Exception:  # noqa: BLE001 - reported per check
                    failed += 1
                    print(f"FAIL {name}")
                    traceback.print_exc()
            context.close()
    except Exception:  # noqa: BLE001 - setup failure counts as one failure
        failed += 1
        traceback.print_exc()
    finally:
        for load in loads:
            load.stop()
        gw.stop()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"dashboard: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
