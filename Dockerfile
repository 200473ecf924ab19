# syntax=docker/dockerfile:1
#
# imrelay image: a static-ish Rust binary on distroless (glibc, libgcc, CA certificates, no shell).
#
#   docker build -t imrelay .
#   docker run -p 8080:8080 -v "$PWD/rules:/app/rules:ro" -v imrelay-data:/app/data imrelay
#
# The final image has no shell and no curl, so it declares no HEALTHCHECK: under Kubernetes use
# the HTTP probes in examples/kubernetes/ (liveness GET /healthz, readiness GET /readyz); under
# plain Docker, probe http://<container>:8080/healthz from outside. See docs/operations.md.

ARG RUST_VERSION=1.95

# ---- build -------------------------------------------------------------------------------------
# Same Debian release as the runtime image, so the binary's glibc requirement is met there.
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binary is copied out of
# the cache mount because the mount is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin imrelay \
    && cp target/release/imrelay /usr/local/bin/imrelay
# The folders the runtime user writes to (the durable queue) must exist and belong to it.
RUN mkdir -p /out/app/data && chown -R 65532:65532 /out/app/data

# ---- run ---------------------------------------------------------------------------------------
# distroless/cc: glibc and libgcc_s (the binary links both), CA certificates for https
# destinations, user `nonroot` (65532), nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/imrelay /usr/local/bin/imrelay
COPY --from=build --chown=65532:65532 /out/app /app
# The repository's example rules and their tests; mount your own folder over /app/rules.
COPY --chown=65532:65532 rules /app/rules
WORKDIR /app
USER 65532:65532
# The durable delivery queue and dead letters: keep them on a volume so a restart loses nothing.
VOLUME ["/app/data"]
ENV IMRELAY_SERVER__LISTEN=0.0.0.0:8080
EXPOSE 8080
# What Kubernetes sends too: imrelay stops accepting, finishes in-flight work, exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/imrelay"]
CMD ["serve"]
