# keygate's container image: build with the Rust toolchain, run the binary alone on distroless.
#
#   docker build -t keygate:0.1.0 .
#   docker run --rm keygate:0.1.0 --help
#
# The runtime image has no shell and no package manager: glibc, libgcc, CA certificates (for
# https:// sources, upstreams and usage reports) and the `nonroot` user (uid/gid 65532).

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what `cargo build` reads (see .dockerignore); build.rs compiles proto/ with protox, so no
# protoc is needed.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin keygate

# cc, not static: the binary links glibc dynamically. Debian 12 on both sides, same glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keygate /usr/local/bin/keygate
USER 65532:65532
# proxy, ext_authz (gRPC), forward-auth, admin (probes, /metrics), sync hub: the port numbers of
# config.example.toml. Which of them listen, and on which address, is up to the configuration.
EXPOSE 8080 9191 9192 9901 9393
ENTRYPOINT ["/usr/local/bin/keygate"]
# Mount the configuration at /etc/keygate/keygate.toml (deploy/kubernetes does). Other commands
# replace this one: `docker run --rm -v "$PWD:/w" keygate:0.1.0 config check --config /w/keygate.toml`.
CMD ["serve", "--config", "/etc/keygate/keygate.toml"]
