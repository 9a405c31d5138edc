# keygate's container image: build with the Rust toolchain, run the binary alone on distroless.
#
#   docker build -t keygate:0.1.0 .
#   docker run --rm keygate:0.1.0 --help
#
# The runtime image has no shell and no package manager: glibc, libgcc, CA certificates (for
# https:// sources, upstreams and usage reports) and the `nonroot` user (uid/gid 65532).

FROM rust:1-bookworm AS build
# The release build is profile-guided (scripts/build-release): an instrumented keygate is
# trained on loopback with h2load, then built again from its profile. llvm-profdata comes with
# rustup's llvm-tools, which match the compiler's LLVM.
RUN apt-get update && apt-get install -y --no-install-recommends nghttp2-client \
    && rm -rf /var/lib/apt/lists/* && rustup component add llvm-tools
WORKDIR /src
# Only what the build reads (see .dockerignore); build.rs compiles proto/ with protox, so no
# protoc is needed.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY scripts/build-release ./scripts/
RUN bash scripts/build-release && cp target/pgo/keygate /keygate

# cc, not static: the binary links glibc dynamically. Debian 12 on both sides, same glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /keygate /usr/local/bin/keygate
USER 65532:65532
# proxy, ext_authz (gRPC), forward-auth, admin (probes, /metrics), sync hub: the port numbers of
# config.example.toml. Which of them listen, and on which address, is up to the configuration.
EXPOSE 8080 9191 9192 9901 9393
ENTRYPOINT ["/usr/local/bin/keygate"]
# Mount the configuration at /etc/keygate/keygate.toml (deploy/kubernetes does). Other commands
# replace this one: `docker run --rm -v "$PWD:/w" keygate:0.1.0 config check --config /w/keygate.toml`.
CMD ["serve", "--config", "/etc/keygate/keygate.toml"]
