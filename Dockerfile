# syntax=docker/dockerfile:1
# One build, four small images (targets): outbox-operator, outbox-relay, demo-consumer, demo-api.
#   docker build --target outbox-relay -t ghcr.io/outbox-operator/outbox-relay:0.1.0 .
# `make images` builds all four with the tags the Helm chart expects.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# librdkafka is built from source by rdkafka-sys (gcc + make, in the image). The cache mounts keep the
# registry and target directory between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      --bin outbox-operator --bin outbox-relay --bin demo-consumer --bin demo-api \
 && mkdir -p /out \
 && cp target/release/outbox-operator target/release/outbox-relay \
       target/release/demo-consumer target/release/demo-api /out/

# Distroless: glibc, libgcc, CA certificates, user `nonroot` (65532); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532

FROM runtime AS outbox-operator
COPY --from=build /out/outbox-operator /usr/local/bin/outbox-operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-operator"]

FROM runtime AS outbox-relay
COPY --from=build /out/outbox-relay /usr/local/bin/outbox-relay
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/outbox-relay"]
CMD ["run"]

FROM runtime AS demo-consumer
COPY --from=build /out/demo-consumer /usr/local/bin/demo-consumer
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/demo-consumer"]

FROM runtime AS demo-api
COPY --from=build /out/demo-api /usr/local/bin/demo-api
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/demo-api"]
