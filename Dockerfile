# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, ship only the binary on a distroless, non-root
# runtime (glibc, libgcc, CA certificates; no shell).
#
#   docker build -t <your-registry>/iot-operator:0.1.0 .      (or: podman build ...)
#
# Dependencies are compiled in their own layer with cargo-chef, from a recipe that keeps only
# what decides them (manifests, lock file, target names), so a change under src/ rebuilds the
# operator alone.

FROM docker.io/library/rust:1.95-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78 \
    && rm -rf "$CARGO_HOME/registry" "$CARGO_HOME/git"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin iot-operator
COPY . .
RUN cargo build --release --locked --bin iot-operator \
    && ./target/release/iot-operator --version

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/iot-operator /usr/local/bin/iot-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/iot-operator"]
CMD ["run"]
