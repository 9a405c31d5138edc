//! keygate: an API-key authentication sidecar.
//!
//! It sits in front of an API and decides, for every request, whether the API key it carries may
//! do what the request asks, against a synced, immutable snapshot of key digests.
//!
//! ```text
//! request ─► front (proxy | ext_authz | /authz) ─► RequestFacts ─► decide(&Snapshot, &Policy, facts, now)
//!                                               │
//!           Allow { key, partner, … } ◄─────────┴──► Deny(DenyReason)
//! front applies the verdict: forward with identity headers, or answer the contract's JSON error
//! ```
//!
//! # Layout
//! - [`app`]: bind listeners, load and follow the snapshot, shut down together.
//! - [`config`]: TOML + `KEYGATE__…` environment → validated [`config::Settings`].
//! - [`credential`]: key format (prefix, body, CRC-32 checksum), prefix rules, extraction.
//! - [`path`]: request path normalization (pure); [`routes`]: route patterns (pure).
//! - [`referrer`]: `allowed_referrers` patterns (pure); [`client_ip`]: peer / trusted XFF.
//! - [`decision`]: the one pure decision; [`deny`]: deny reason → status, code, JSON, headers;
//!   [`admit`]: the decision, the rate limit and their accounting, as every front runs them.
//! - [`snapshot`]: the snapshot model, index and store (with freshness); its sources
//!   `snapshot::{file, http_source}` and the grpc one in [`sync`], chosen by `snapshot::source`;
//!   `snapshot::cache` (last good on disk), `snapshot::document` (entries by id, for sync).
//! - [`sync`]: `keygate.sync.v1`: the hub (`sync::server`) and the follower (`sync::client`).
//! - [`headers`]: hop-by-hop and identity header rules shared by the fronts; [`http1`]: what
//!   the HTTP/1.1 server and upstream client share (field places, framing rules, `Rewind`).
//! - [`proxy`]: the reverse-proxy front; [`server`]: its HTTP/1.1 server side (`wire`: the
//!   bytes, strict on framing; a connection driven by one task, the request body read from
//!   it), hyper serving HTTP/2; [`upstream`]: its HTTP/1.1 client (`wire`: the bytes, strict
//!   on framing; `conn`: a connection driven by its request) and per-thread pool.
//! - [`tls`]: rustls for the listeners (certificates reloaded when their files change) and for
//!   `https://` upstreams.
//! - [`authz_http`]: the forward-auth front (Envoy `http_service`, nginx, Traefik).
//! - [`ext_authz`]: the gRPC `envoy.service.auth.v3.Authorization` front, with health.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` ([`metrics`]), `/usage` ([`usage`]);
//!   [`listen`]: the accept loop every front shares, with `limits.max_connections`;
//!   [`deadline`]: a connection's timer that moves with each request without re-arming;
//!   [`clock`]: the monotonic clock read once per poll of a connection, the coarse wall clock.
//! - [`telemetry`]: answers by front and code, latency histograms, connection counts (per-thread
//!   shards read by [`metrics`]), and the one log event per decision.
//! - [`ratelimit`]: per-key GCRA limits (check 12); [`idempotency`]: the proxy's idempotent
//!   replay store.
//! - [`keys`]: `keygate keys create | list | revoke` on a snapshot file.
//! - [`demo`]: `keygate demo`, the zero-setup tour.

pub mod admin;
pub mod admit;
pub mod app;
pub mod authz_http;
pub mod client_ip;
pub mod clock;
pub mod config;
pub mod credential;
pub mod deadline;
pub mod decision;
pub mod demo;
pub mod deny;
pub mod ext_authz;
pub mod fleet;
pub mod headers;
pub mod http1;
pub mod idempotency;
pub mod keys;
pub mod listen;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod ratelimit;
pub mod referrer;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod snapshot;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod usage;
