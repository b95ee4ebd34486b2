#!/usr/bin/env bash
# Checks the deployment files without a Docker daemon (called from scripts/test.sh):
#  1. docker-compose.yml parses (`docker compose config -q` where the compose plugin exists) and holds
#     together: every file it mounts or builds from exists, every service it depends on or routes to is
#     defined, the Dockerfile's COPY sources exist and are not excluded by .dockerignore, prometheus.yml
#     scrapes services of the stack, the Grafana provisioning and deploy/kubernetes fit together (PyYAML
#     in .venv);
#  2. `promtool check config prometheus.yml` (Debian's prometheus package, installed when missing);
#  3. the Dockerfile's dependency layer: the manifests alone, stubbed by docker/stub-crates.sh, resolve
#     to a buildable `cargo build --locked -p llm-gateway -p vllm-sim` (unit graph only, nothing compiled);
#  4. crates/gateway/tests/deploy.rs with its ignored test: the Grafana dashboard queries only exported
#     metrics, every config example loads, and Debian's real prometheus scrapes a gateway and its sims.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt's lock may be held by another install for a while: retry for up to ~5 minutes.
apt_install() {
  local i
  for i in $(seq 1 60); do
    if as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "$@"; then
      return 0
    fi
    echo "apt-get busy or failing; retrying ($i)" >&2
    sleep 5
  done
  return 1
}

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing Debian's prometheus (promtool, prometheus)"
  apt_install prometheus >/dev/null
fi
# The Debian package enables a prometheus service; where an init system started it, it is not ours to
# stop, and the tests use their own ports, so nothing to do.

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import yaml" 2>/dev/null; then
  .venv/bin/pip install --quiet pyyaml
fi

echo "== docker-compose.yml"
if docker compose version >/dev/null 2>&1; then
  docker compose -f docker-compose.yml config -q
  echo "docker compose config -q: ok"
else
  echo "(no docker compose plugin here: structural checks only)"
fi
.venv/bin/python - <<'PY'
import fnmatch, json, os, re, sys, yaml

errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)

def load(path):
    with open(path) as f:
        return yaml.safe_load(f)

compose = load("docker-compose.yml")
services = compose.get("services") or {}
for name in ("gateway", "sim-0", "sim-1", "sim-2", "prometheus", "grafana"):
    check(name in services, f"compose: service {name} missing")

for name, svc in services.items():
    check("image" in svc or "build" in svc, f"compose: {name}: neither image nor build")
    build = svc.get("build")
    if build is not None:
        ctx = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        check(os.path.isdir(ctx), f"compose: {name}: build context {ctx} missing")
        check(os.path.isfile(os.path.join(ctx, dockerfile)), f"compose: {name}: {dockerfile} missing")
    for vol in svc.get("volumes") or []:
        src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
        if src.startswith((".", "/")):
            check(os.path.exists(src), f"compose: {name}: mounted {src} does not exist")
    deps = svc.get("depends_on") or []
    for dep in deps if isinstance(deps, list) else deps.keys():
        check(dep in services, f"compose: {name}: depends on unknown service {dep}")
    hc = svc.get("healthcheck")
    if hc is not None:
        check(isinstance(hc.get("test"), list) and hc["test"][0] in ("CMD", "CMD-SHELL", "NONE"),
              f"compose: {name}: healthcheck.test must be a CMD list")
    ports = [str(p) for p in svc.get("ports") or []]
    for p in ports:
        check(re.fullmatch(r"(\d+:)?\d+(/tcp|/udp)?", p) is not None, f"compose: {name}: bad port {p!r}")

gw = services.get("gateway", {})
check("9000:9000" in [str(p) for p in gw.get("ports") or []], "compose: gateway does not publish 9000")
urls = str((gw.get("environment") or {}).get("LLM_WORKER_URLS", ""))
for url in filter(None, urls.split(",")):
    m = re.fullmatch(r"http://([^:/]+):(\d+)", url.strip())
    check(m is not None and m.group(1) in services, f"compose: LLM_WORKER_URLS names {url}, not a service")
for i in range(3):
    cmd = services.get(f"sim-{i}", {}).get("command") or []
    check(cmd[:1] == ["vllm-sim"] and "0.0.0.0" in cmd and "8000" in cmd,
          f"compose: sim-{i} must run vllm-sim on 0.0.0.0:8000, got {cmd}")

# prometheus.yml scrapes services of the stack.
prom = load("prometheus.yml")
jobs = {j["job_name"]: j for j in prom.get("scrape_configs") or []}
targets = [t for j in jobs.values() for sc in j.get("static_configs") or [] for t in sc.get("targets") or []]
check(any(t.startswith("gateway:") for t in targets), "prometheus.yml: the gateway is not scraped")
for t in targets:
    check(t.split(":")[0] in services, f"prometheus.yml: target {t} is not a compose service")

# Grafana provisioning parses; the dashboard provider's path is where compose mounts the dashboards.
ds = load("docker/grafana/provisioning/datasources/prometheus.yml")
check(any(d.get("uid") == "prometheus" and d.get("url") == "http://prometheus:9090" for d in ds["datasources"]),
      "grafana: datasource uid prometheus at http://prometheus:9090")
prov = load("docker/grafana/provisioning/dashboards/llm-gateway.yml")
mounts = [v.split(":")[1] for v in services.get("grafana", {}).get("volumes") or [] if isinstance(v, str)]
for p in prov["providers"]:
    check(p["options"]["path"] in mounts, f"grafana: dashboards path {p['options']['path']} is not mounted")
dash_dir = "docker/grafana/dashboards"
dashboards = [f for f in os.listdir(dash_dir) if f.endswith(".json")]
check(dashboards, "grafana: no dashboard JSON")
for f in dashboards:
    with open(os.path.join(dash_dir, f)) as fh:
        json.load(fh)

# The Dockerfile's COPY sources exist and are inside the build context (.dockerignore).
ignored = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]


def excluded(path):
    """As Docker reads .dockerignore: the last pattern matching the path or a parent decides; `!` keeps."""
    parts = path.rstrip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for pattern in ignored:
        keep = pattern.startswith("!")
        if any(fnmatch.fnmatch(p, pattern.lstrip("!")) for p in prefixes):
            out = not keep
    return out


for line in open("Dockerfile"):
    m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+\s*$", line)
    if not m:
        continue
    for src in m.group(1).split():
        check(os.path.exists(src), f"Dockerfile: COPY {src}: missing")
        check(not excluded(src), f"Dockerfile: COPY {src}: excluded by .dockerignore")

# Kubernetes: kustomization references exist; the Deployment mounts the generated ConfigMap, listens on
# 9000 and is selected by the Service.
k = "deploy/kubernetes"
kust = load(f"{k}/kustomization.yaml")
docs = {}
for r in kust["resources"]:
    check(os.path.isfile(f"{k}/{r}"), f"kubernetes: resource {r} missing")
    for d in yaml.safe_load_all(open(f"{k}/{r}")):
        # The gateway's own Deployment and Service (redis.yaml holds Redis's).
        if d["metadata"]["name"] == "llm-gateway":
            docs[d["kind"]] = d
gen = kust["configMapGenerator"][0]
for f in gen["files"]:
    check(os.path.isfile(f"{k}/{f.split('=')[-1]}"), f"kubernetes: configMapGenerator file {f} missing")
dep, svc = docs.get("Deployment"), docs.get("Service")
check(dep is not None and svc is not None, "kubernetes: Deployment and Service expected")
if dep and svc:
    pod = dep["spec"]["template"]
    check(any(v.get("configMap", {}).get("name") == gen["name"] for v in pod["spec"]["volumes"]),
          "kubernetes: the Deployment does not mount the generated ConfigMap")
    c = pod["spec"]["containers"][0]
    check(any(p["containerPort"] == 9000 for p in c["ports"]), "kubernetes: container port 9000")
    labels = pod["metadata"]["labels"]
    check(all(labels.get(kk) == vv for kk, vv in svc["spec"]["selector"].items()),
          "kubernetes: the Service selector does not match the pod labels")
    check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "kubernetes: Deployment selector")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"compose: {len(services)} services, references ok; prometheus.yml targets ok; grafana provisioning ok; "
      "kubernetes manifests ok")
PY

echo "== promtool check config prometheus.yml"
promtool check config prometheus.yml

echo "== Dockerfile dependency layer (stubbed manifests resolve)"
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
cp Cargo.toml Cargo.lock "$stub/"
for m in crates/*/Cargo.toml; do
  mkdir -p "$stub/$(dirname "$m")"
  cp "$m" "$stub/$m"
done
sh docker/stub-crates.sh "$stub"
# --unit-graph plans the build (every target file found, Cargo.lock up to date) without compiling.
(cd "$stub" && RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$stub/target" \
  cargo build --release --locked -p llm-gateway -p vllm-sim --unit-graph -Z unstable-options >/dev/null)
echo "stubbed workspace: ok"

echo "== deploy tests (dashboard metrics, config examples, real prometheus)"
cargo test --release -p llm-gateway --test deploy -- --include-ignored
