# llm-gateway and vllm-sim in one image.
#
#   docker build -t llm-gateway .                    # the gateway built with PGO (scripts/build-pgo.sh)
#   docker run --rm -p 9000:9000 -e LLM_WORKER_URLS=http://gpu-a:8000 llm-gateway
#   docker run --rm -p 8000:8000 llm-gateway vllm-sim --host 0.0.0.0 --port 8000
#
# docker-compose.yml runs the whole stack (gateway, three sims, Prometheus, Grafana).

# ---- builder: dependencies in their own layer, rebuilt only when a manifest or Cargo.lock changes ----
FROM rust:1-bookworm AS builder
WORKDIR /src

# 1. Manifests only, with placeholder sources: this layer compiles every dependency.
COPY Cargo.toml Cargo.lock ./
COPY crates/gateway-core/Cargo.toml crates/gateway-core/
COPY crates/routing/Cargo.toml crates/routing/
COPY crates/guard/Cargo.toml crates/guard/
COPY crates/gateway/Cargo.toml crates/gateway/
COPY crates/vllm-sim/Cargo.toml crates/vllm-sim/
COPY crates/bench/Cargo.toml crates/bench/
COPY docker/stub-crates.sh /usr/local/bin/stub-crates
RUN sh /usr/local/bin/stub-crates . \
 && cargo build --profile dist --locked -p llm-gateway -p vllm-sim \
 && rm -rf crates/*/src crates/*/benches

# 2. The real sources. COPY keeps the build context's modification times, which may be older than the
#    placeholders just compiled: touch them so cargo rebuilds the workspace crates (and only them).
COPY crates crates
RUN find crates -name '*.rs' -exec touch {} + \
 && cargo build --profile dist --locked -p llm-gateway -p vllm-sim \
 && install -D -m 0755 target/dist/llm-gateway target/dist/vllm-sim -t /out/

# 3. The gateway built again from a profile of its own request path (about 20% less CPU per request,
#    BENCHMARKS.md): an instrumented build, a training run against two sims, the optimised build.
#    `--build-arg PGO=0` ships the plain build (a quicker image build).
ARG PGO=1
COPY scripts/build-pgo.sh scripts/
RUN if [ "$PGO" = 1 ]; then bash scripts/build-pgo.sh && install -m 0755 target/pgo/llm-gateway /out/; fi

# ---- runtime: slim Debian, non-root ----
# Both binaries link only libc, libm and libgcc_s (workers and Redis are spoken to over plain TCP, no TLS
# library), all in the slim image; `--version` below fails the build if that ever changes.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 llm \
 && useradd --system --uid 10001 --gid llm --home-dir /nonexistent --shell /usr/sbin/nologin llm
COPY --from=builder /out/llm-gateway /out/vllm-sim /usr/local/bin/
RUN llm-gateway --version && vllm-sim --version
COPY config/gateway.toml /etc/llm-gateway/gateway.toml
WORKDIR /etc/llm-gateway
USER llm:llm
ENV LLM_CONFIG=/etc/llm-gateway/gateway.toml \
    LLM_GATEWAY_URL=http://127.0.0.1:9000
EXPOSE 9000
# Healthy while the gateway answers /health with 200 (at least one healthy worker). vllm-sim containers
# from this image override it (see docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["llm-gateway", "health", "--url", "http://127.0.0.1:9000"]
STOPSIGNAL SIGTERM
CMD ["llm-gateway", "--config", "/etc/llm-gateway/gateway.toml"]
