# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, ship only the binary and CA certificates in a
# distroless, non-root runtime image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that they are cached between builds when only src/ changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin iot-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/iot-operator /usr/local/bin/iot-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/iot-operator"]
CMD ["run"]
