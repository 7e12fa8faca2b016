# Build stage: also the image the compose `tests` service runs the test suite in.
FROM rust:1-bookworm AS builder
WORKDIR /src
RUN rustup component add rustfmt clippy
COPY Cargo.toml Cargo.lock schema.sql ./
COPY src ./src
COPY tests ./tests
RUN cargo build --release --locked

# Runtime stage: the binary alone on a slim Debian.
FROM debian:bookworm-slim
RUN useradd --system --no-create-home tenantd
COPY --from=builder /src/target/release/tenantd /usr/local/bin/tenantd
USER tenantd
ENV HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tenantd"]
