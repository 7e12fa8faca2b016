# Build stage.
FROM rust:1-bookworm AS builder
WORKDIR /src
RUN rustup component add rustfmt clippy
COPY Cargo.toml Cargo.lock schema.sql ./
COPY src ./src
COPY tests ./tests
RUN cargo build --release --locked

# Test stage: the build plus the documents (a test reads the README's settings table, the
# package ships them), promtool, dpkg-dev and systemd-analyze (the package's tests), and
# the PostgreSQL and RabbitMQ programs the fault soak runs private servers with, for
# `docker compose run --rm tests`.
FROM builder AS tests
RUN apt-get update && apt-get install -y --no-install-recommends prometheus dpkg-dev systemd \
        postgresql rabbitmq-server \
    && rm -rf /var/lib/apt/lists/*
COPY README.md ARCHITECTURE.md ./
COPY docs ./docs
COPY scripts ./scripts

# Runtime stage: the binary alone on a slim Debian.
FROM debian:bookworm-slim
RUN useradd --system --no-create-home tenantd
COPY --from=builder /src/target/release/tenantd /usr/local/bin/tenantd
USER tenantd
# Other containers must reach it, so it needs API_TOKEN or JWT_* (README, Access): without
# one it refuses to start, saying what to set.
ENV HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tenantd"]
