# Builds the taskmill binary; the image runs `taskmill worker` by default.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin taskmill

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 taskmill \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --shell /usr/sbin/nologin taskmill
COPY --from=build /src/target/release/taskmill /usr/local/bin/taskmill
# Numeric, not the name: Kubernetes' runAsNonRoot can only verify a numeric user, and
# refuses to start an image that names its user unless the pod sets runAsUser.
USER 10001:10001
# /healthz, /readyz, /metrics and the dashboard (TASKMILL_HTTP_ADDR).
EXPOSE 9464
ENTRYPOINT ["taskmill"]
CMD ["worker"]
