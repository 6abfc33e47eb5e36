# Builds the taskmill binary; the image runs `taskmill worker` by default.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin taskmill

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 taskmill
COPY --from=build /src/target/release/taskmill /usr/local/bin/taskmill
USER taskmill
ENTRYPOINT ["taskmill"]
CMD ["worker"]
