//! Configuration: the TOML file plus `KEYGATE__SECTION__KEY` environment overrides, read with the
//! `config` crate into serde types ([`RawConfig`]), then validated into [`Settings`], the typed,
//! checked form the rest of keygate uses.
//!
//! Every problem is reported with the dotted name of the key it concerns and what is wrong with
//! it, and validation collects all problems instead of stopping at the first (`keygate config
//! check` prints them all). Nothing here binds a socket or reads a snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use serde::Deserialize;

use crate::credential::{CredentialHeaders, PrefixRule, PrefixRules};
use crate::path::PathOptions;
use crate::routes::{Case, RoutePattern, RouteTable};

/// One problem with the configuration: the dotted key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config: {}: {}", self.key, self.message)
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {path}: {message}")]
    Read { path: String, message: String },
    #[error("{}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

impl ConfigError {
    /// Every problem found, one per line when displayed.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid(p) => p.iter().map(Problem::to_string).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, as written in the file. A key no table takes is reported by its dotted name (see
// `strip_unknown`); `deny_unknown_fields` backs that up.

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub environment: Option<String>,
    #[serde(default)]
    pub key_prefixes: Vec<RawPrefixRule>,
    #[serde(default)]
    pub snapshot: RawSnapshot,
    #[serde(default)]
    pub sync_server: RawSyncServer,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub admin: RawListen,
    #[serde(default)]
    pub ext_authz: RawExtAuthz,
    #[serde(default)]
    pub authz_http: RawFront,
    #[serde(default)]
    pub credentials: RawCredentials,
    #[serde(default)]
    pub identity_headers: RawIdentityHeaders,
    #[serde(default)]
    pub paths: RawPaths,
    #[serde(default)]
    pub routes: RawRoutes,
    #[serde(default)]
    pub idempotency: RawIdempotency,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub usage: RawUsage,
    #[serde(default)]
    pub redis: RawRedis,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrefixRule {
    pub prefix: String,
    pub environment: String,
    #[serde(default = "yes")]
    pub checksum: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshot {
    pub source: Option<String>,
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    pub poll_interval: Option<String>,
    pub token_env: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub backoff_max: Option<String>,
    pub idle_timeout: Option<String>,
    pub cache_path: Option<PathBuf>,
    pub max_staleness: Option<String>,
    pub pepper_env: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSyncServer {
    pub listen: Option<String>,
    pub token_env: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    #[serde(default, deserialize_with = "list_or_text")]
    pub trusted_proxies: Vec<String>,
    pub connect_timeout: Option<String>,
    pub upstream_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub pool_idle_per_host: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub upstream_host: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub upstream_ca_file: Option<PathBuf>,
    pub upstream_server_name: Option<String>,
    pub upstream_client_cert: Option<PathBuf>,
    pub upstream_client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub listen: Option<String>,
}

/// A front that is asked by another proxy (Envoy, nginx, Traefik) rather than by clients.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawFront {
    pub listen: Option<String>,
    #[serde(default, deserialize_with = "list_or_text")]
    pub trusted_proxies: Vec<String>,
    pub header_read_timeout: Option<String>,
}

/// The gRPC front: a [`RawFront`] that can also serve TLS.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawExtAuthz {
    pub listen: Option<String>,
    #[serde(default, deserialize_with = "list_or_text")]
    pub trusted_proxies: Vec<String>,
    pub read_timeout: Option<String>,
    pub max_request_bytes: Option<usize>,
    pub max_buffered_bytes: Option<usize>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCredentials {
    pub authorization_header: Option<String>,
    pub api_key_header: Option<String>,
    pub forward: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawIdentityHeaders {
    pub partner_id: Option<String>,
    pub org_id: Option<String>,
    pub key_id: Option<String>,
    pub key_environment: Option<String>,
    pub scopes: Option<String>,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    pub allow_semicolon: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRoutes {
    pub unmatched: Option<String>,
    pub case_sensitive: Option<bool>,
    #[serde(default)]
    pub rule: Vec<RawRouteRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteRule {
    pub route: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawIdempotency {
    pub required: Option<bool>,
    pub header: Option<String>,
    pub replay: Option<bool>,
    pub backend: Option<String>,
    pub ttl: Option<String>,
    pub max_request_bytes: Option<usize>,
    pub max_response_bytes: Option<usize>,
    pub max_memory_bytes: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub max_in_flight_per_key: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub backend: Option<String>,
    pub default_per_minute: Option<u32>,
    #[serde(default)]
    pub per_environment: BTreeMap<String, u32>,
    pub burst: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
    pub decisions: Option<String>,
    pub buffered_lines: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub delay: Option<String>,
    pub drain_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub http2_max_pending_accept_reset_streams: Option<usize>,
    pub http2_max_local_error_reset_streams: Option<usize>,
    pub http2_keep_alive_interval: Option<String>,
    pub http2_keep_alive_timeout: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    pub timeout: Option<String>,
    pub key_prefix: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    pub report_url: Option<String>,
    pub token_env: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub max_pending_batches: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub flavor: Option<String>,
    pub worker_threads: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// Validated.

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: Arc<Policy>,
    pub snapshot: SnapshotSettings,
    /// Serves `keygate.sync.v1` Watch to other keygates.
    pub sync_server: Option<SyncServerSettings>,
    pub proxy: Option<ProxySettings>,
    pub admin: Option<SocketAddr>,
    /// gRPC `envoy.service.auth.v3.Authorization` front.
    pub ext_authz: Option<FrontSettings>,
    /// What that front holds of CheckRequests (the defaults when it is off).
    pub ext_authz_limits: CheckLimits,
    /// HTTP forward-auth (`/authz`) front.
    pub authz_http: Option<FrontSettings>,
    pub headers: Arc<HeaderNames>,
    pub rate_limit: Arc<RateLimitSettings>,
    /// Idempotent replay in the proxy front; `None` = off.
    pub idempotency: Option<IdempotencySettings>,
    /// Periodic usage reports; `None` = off (`/usage` only).
    pub usage_report: Option<UsageReportSettings>,
    pub log: LogSettings,
    pub runtime: RuntimeSettings,
    pub shutdown: ShutdownSettings,
    /// Connection and HTTP/2 limits every front applies.
    pub limits: Limits,
}

/// What the decision needs besides the snapshot: plain data, shared by every front.
#[derive(Debug)]
pub struct Policy {
    /// The key environment this keygate serves.
    pub environment: String,
    pub prefixes: PrefixRules,
    /// Route pattern → scopes the route needs (all of them).
    pub routes: RouteTable<Arc<[Arc<str>]>>,
    pub unmatched: Unmatched,
    /// How route literals (the table's and keys' `allowed_routes`) compare with a request's
    /// path: `routes.case_sensitive`.
    pub route_case: Case,
    pub path: PathOptions,
    pub idempotency_required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Allow,
    Deny,
}

/// Where the snapshot comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A JSON file, reloaded on change.
    File,
    /// A control plane polled over HTTP(S) with `If-None-Match`.
    Http,
    /// Another keygate (or a control plane) speaking `keygate.sync.v1` Watch.
    Grpc,
}

#[derive(Clone)]
pub struct SnapshotSettings {
    pub source: SourceKind,
    /// The file (file source).
    pub path: PathBuf,
    /// The control plane (http source) or the hub (grpc source).
    pub url: Option<http::Uri>,
    /// File: how often the file is stat-ed as a fallback for (and a check on) inotify.
    /// HTTP: how often the control plane is asked.
    pub poll_interval: Duration,
    /// Bearer token for the source, read from the environment at start.
    pub token: Option<Secret>,
    /// PEM CA certificates that replace the system roots for an `https://` source.
    pub ca_file: Option<PathBuf>,
    /// gRPC over TLS: the client certificate and key (PEM) for a hub that requires mTLS.
    pub client_identity: Option<TlsIdentity>,
    pub connect_timeout: Duration,
    /// HTTP: the whole answer must arrive within this.
    pub read_timeout: Duration,
    /// HTTP: a larger answer is refused (and the snapshot in force kept).
    pub max_body_bytes: usize,
    /// Retries after a failure wait 1 s, 2 s, 4 s… (with jitter) up to this.
    pub backoff_max: Duration,
    /// gRPC: a stream that delivers nothing (not even a heartbeat) this long is dead.
    pub idle_timeout: Duration,
    /// The last good snapshot, written after each applied revision, read at start when the
    /// source cannot be reached.
    pub cache_path: Option<PathBuf>,
    /// Once the source has not confirmed the snapshot for this long, every front answers
    /// `snapshot_unavailable`. `None` = serve the last good snapshot however old.
    pub max_staleness: Option<Duration>,
    /// The pepper for `hmac-sha256:` digests, read from the environment at start.
    pub pepper: Option<Arc<[u8]>>,
}

/// Every field but the pepper, which is never printed (as [`Secret`] is not).
impl std::fmt::Debug for SnapshotSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSettings")
            .field("source", &self.source)
            .field("path", &self.path)
            .field("url", &self.url)
            .field("poll_interval", &self.poll_interval)
            .field("token", &self.token)
            .field("ca_file", &self.ca_file)
            .field("client_identity", &self.client_identity)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("backoff_max", &self.backoff_max)
            .field("idle_timeout", &self.idle_timeout)
            .field("cache_path", &self.cache_path)
            .field("max_staleness", &self.max_staleness)
            .field("pepper", &self.pepper.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A secret read from the environment: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The Redis shared by a fleet's replicas (rate limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://host:port[/db]` (credentials in the URL are allowed; never logged).
    pub url: String,
    /// Each command must be answered within this, or the documented fallback applies.
    pub timeout: Duration,
    pub key_prefix: String,
}

/// Idempotent replay: its limits, and Redis when records are shared by a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencySettings {
    pub limits: crate::idempotency::Limits,
    /// `idempotency.backend = "redis"`: records shared by every replica. Without an answer from
    /// Redis, mutating requests with an Idempotency-Key are refused (503), never run unguarded.
    pub redis: Option<RedisSettings>,
}

/// Where and how often usage is reported.
#[derive(Debug, Clone)]
pub struct UsageReportSettings {
    pub url: http::Uri,
    pub token: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub interval: Duration,
    /// Each POST must be answered (2xx) within this.
    pub timeout: Duration,
    /// Batches kept for retry while the receiver is away; past it the oldest are merged.
    pub max_pending_batches: usize,
}

/// Per-key rate limits (check 12), applied by every front after the decision allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Share allowances across replicas through Redis (`rate_limit.backend = "redis"`); when
    /// Redis does not answer in time, the local limiter decides.
    pub redis: Option<RedisSettings>,
    /// For keys without `rate_limit_per_minute` and no environment default; `None` = unlimited.
    pub default_per_minute: Option<u32>,
    /// Environment → requests per minute, over `default_per_minute`.
    pub per_environment: BTreeMap<String, u32>,
    /// How much of the rate a key may use at once.
    pub burst: Duration,
}

impl RateLimitSettings {
    /// The quota of a key: its own `rate_limit_per_minute`, else its environment's, else the
    /// default; `None` = not limited.
    pub fn quota(&self, own: Option<u32>, environment: &str) -> Option<crate::ratelimit::Quota> {
        let per_minute = own
            .or_else(|| self.per_environment.get(environment).copied())
            .or(self.default_per_minute)?;
        Some(crate::ratelimit::Quota::new(per_minute, self.burst))
    }
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A listener served over TLS. The files are read at start and again whenever they change
/// (see [`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsSettings {
    pub identity: TlsIdentity,
    /// Require client certificates signed by these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// How the proxy talks TLS to an `https://` upstream. Files are read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsSettings {
    /// PEM CA certificates that replace the system roots.
    pub ca_file: Option<PathBuf>,
    /// The name the upstream's certificate must carry, also sent as SNI: the upstream's host
    /// unless `upstream_server_name` overrides it.
    pub server_name: String,
    /// A client certificate for an upstream that requires mTLS.
    pub client_identity: Option<TlsIdentity>,
}

#[derive(Debug, Clone)]
pub struct SyncServerSettings {
    pub listen: SocketAddr,
    /// Serve over TLS (mTLS with a client CA).
    pub tls: Option<ServerTlsSettings>,
    /// Clients must present `authorization: Bearer <token>` when set.
    pub token: Option<Secret>,
    /// How often an idle Watch stream carries a heartbeat.
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    /// `scheme://authority` of the upstream, no path.
    pub upstream: http::uri::Authority,
    pub upstream_scheme: http::uri::Scheme,
    pub trusted_proxies: Arc<[IpNet]>,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub pool_idle_per_host: usize,
    /// Connections open at once from one client address, `trusted_proxies` aside; 0: no limit.
    pub max_connections_per_ip: usize,
    /// The `Host` the upstream receives.
    pub upstream_host: UpstreamHost,
    /// Terminate TLS on `listen`.
    pub tls: Option<ServerTlsSettings>,
    /// Set exactly when the upstream is `https://`.
    pub upstream_tls: Option<UpstreamTlsSettings>,
}

/// Which `Host` a forwarded request carries (`proxy.upstream_host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamHost {
    /// The host the client addressed (its `Host`, or an HTTP/2 request's `:authority`).
    Client,
    /// The upstream's own name, as a virtual-hosted upstream expects ([`upstream_host`]); the
    /// client's host goes on in `X-Forwarded-Host`.
    Upstream(HeaderValue),
}

/// The `Host` that names the upstream itself: the authority of `proxy.upstream`, or with
/// `proxy.upstream_server_name` (an upstream reached by address whose certificate names a
/// service) that name, with the upstream's port when it is not the scheme's default.
pub fn upstream_host(
    scheme: &http::uri::Scheme,
    authority: &http::uri::Authority,
    server_name: Option<&str>,
) -> HeaderValue {
    let text = match (server_name, authority.port_u16()) {
        (None, _) => authority.as_str().to_owned(),
        (Some(name), Some(port)) if !(port == 443 && *scheme == http::uri::Scheme::HTTPS) => {
            format!("{name}:{port}")
        }
        (Some(name), _) => name.to_owned(),
    };
    // A server name that is no header value is refused as a problem of its own.
    HeaderValue::from_str(&text)
        .or_else(|_| HeaderValue::from_str(authority.as_str()))
        .expect("an authority is a header value")
}

/// Where an asking front listens, and whose `X-Forwarded-For` it believes.
#[derive(Debug, Clone)]
pub struct FrontSettings {
    pub listen: SocketAddr,
    pub trusted_proxies: Arc<[IpNet]>,
    /// Serve over TLS (ext_authz only; `None` for authz_http).
    pub tls: Option<ServerTlsSettings>,
    /// authz_http: time a caller has to send a request head (also the first one after it
    /// connects, and the keep-alive idle limit).
    pub header_read_timeout: Duration,
}

/// How much of CheckRequests the ext_authz front holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckLimits {
    /// Time a Check's CheckRequest has to arrive whole once its stream is open; then it is
    /// denied (400 `invalid_request`).
    pub read_timeout: Duration,
    /// The largest CheckRequest decoded; a larger one is denied (413 `request_too_large`).
    pub max_request_bytes: usize,
    /// Bytes held at once for CheckRequests still arriving in pieces; a Check that would go
    /// over is denied the same way.
    pub max_buffered_bytes: usize,
}

impl Default for CheckLimits {
    fn default() -> Self {
        CheckLimits {
            read_timeout: Duration::from_secs(10),
            max_request_bytes: 64 << 20,
            max_buffered_bytes: 128 << 20,
        }
    }
}

/// Header names keygate reads and writes, all configurable.
#[derive(Debug, Clone)]
pub struct HeaderNames {
    pub credentials: CredentialHeaders,
    /// Forward credentials upstream instead of removing them.
    pub forward_credentials: bool,
    pub partner_id: HeaderName,
    pub org_id: HeaderName,
    pub key_id: HeaderName,
    pub key_environment: HeaderName,
    pub scopes: HeaderName,
    pub request_id: HeaderName,
    pub idempotency_key: HeaderName,
}

impl HeaderNames {
    /// The identity header names: every inbound variant of these is stripped.
    pub fn identity(&self) -> [&HeaderName; 6] {
        [
            &self.partner_id,
            &self.org_id,
            &self.key_id,
            &self.key_environment,
            &self.scopes,
            &self.request_id,
        ]
    }
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub json: bool,
    pub decisions: DecisionLog,
    /// Lines waiting for stderr at most; past it new lines are dropped (and counted), so a
    /// stalled log reader never blocks a request.
    pub buffered_lines: usize,
}

/// The most `runtime.worker_threads` taken.
pub const MAX_WORKER_THREADS: usize = 1024;

/// `log.buffered_lines` by default: ~5 MB of decision lines, a second or more of a busy
/// proxy's, while stderr's reader catches up.
pub const DEFAULT_LOG_BUFFERED_LINES: usize = 16_384;

/// Which decisions are logged, one event each (target `keygate::decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionLog {
    All,
    Denied,
    None,
}

/// What happens between SIGTERM and exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownSettings {
    /// Not ready at once, but listeners keep accepting for this long (endpoints are removed).
    pub delay: Duration,
    /// Then in-flight requests and streams may run for up to this.
    pub drain_timeout: Duration,
}

/// Resource limits, the same for every front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per front; one more is closed at once.
    pub max_connections: usize,
    pub http2_max_concurrent_streams: u32,
    pub http2_max_pending_accept_reset_streams: usize,
    pub http2_max_local_error_reset_streams: usize,
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            http2_max_concurrent_streams: 200,
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            http2_keep_alive_interval: Duration::from_secs(30),
            http2_keep_alive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(180),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeFlavor {
    /// tokio's work-stealing scheduler over `worker_threads` threads.
    MultiThread,
    /// Everything on one thread.
    CurrentThread,
    /// `worker_threads` proxy threads, each a single-threaded runtime with its own
    /// `SO_REUSEPORT` listener and upstream pool.
    ThreadPerCore,
}

#[derive(Debug, Clone, Copy)]
pub struct RuntimeSettings {
    pub flavor: RuntimeFlavor,
    /// 0 = one per core.
    pub worker_threads: usize,
}

/// Read `path` (TOML) and the `KEYGATE__…` environment, then validate.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    load_with_env(path, std::env::vars())
}

/// As [`load`], with the environment given explicitly (tests).
pub fn load_with_env(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let lookup: std::collections::HashMap<String, String> = env.iter().cloned().collect();
    let (raw, unknown) = read_raw(path, env)?;
    with_unknown(validate_with_env(raw, &|k| lookup.get(k).cloned()), unknown)
}

/// Parse TOML text (no environment overrides) and validate: used by `keygate demo` and tests.
pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
    from_toml_with_env(text, &|k| std::env::var(k).ok())
}

/// As [`from_toml`], reading the variables named by `*_env` keys through `env`.
pub fn from_toml_with_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let (raw, unknown) = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .map_err(|e| e.to_string())
        .and_then(deserialize)
        .map_err(|message| ConfigError::Read {
            path: "<inline>".into(),
            message,
        })?;
    with_unknown(validate_with_env(raw, env), unknown)
}

/// Unknown keys are problems like any other: reported together with what validation found.
fn with_unknown(
    validated: Result<Settings, ConfigError>,
    mut unknown: Vec<Problem>,
) -> Result<Settings, ConfigError> {
    if unknown.is_empty() {
        return validated;
    }
    match validated {
        Ok(_) => Err(ConfigError::Invalid(unknown)),
        Err(ConfigError::Invalid(problems)) => {
            unknown.extend(problems);
            Err(ConfigError::Invalid(unknown))
        }
        Err(read) => Err(read),
    }
}

/// Deserialize the merged file and environment, after taking out (and reporting) every key no
/// table takes, so that a typo does not hide the file's other problems.
fn deserialize(c: config::Config) -> Result<(RawConfig, Vec<Problem>), String> {
    let mut root: config::Value = c.try_deserialize().map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    strip_unknown(&mut root, "", "", &mut unknown);
    unknown.sort_by(|a, b| a.key.cmp(&b.key));
    let raw = root.try_deserialize().map_err(|e| e.to_string())?;
    Ok((raw, unknown))
}

/// The keys each table takes, by its path with `[]` for an array's elements. A table missing
/// here is still refused whole by `deny_unknown_fields`; it is only not reported key by key.
fn table_fields(table: &str) -> Option<&'static [&'static str]> {
    Some(match table {
        "" => fields_of::<RawConfig>(),
        "key_prefixes[]" => fields_of::<RawPrefixRule>(),
        "snapshot" => fields_of::<RawSnapshot>(),
        "sync_server" => fields_of::<RawSyncServer>(),
        "proxy" => fields_of::<RawProxy>(),
        "admin" => fields_of::<RawListen>(),
        "ext_authz" => fields_of::<RawExtAuthz>(),
        "authz_http" => fields_of::<RawFront>(),
        "credentials" => fields_of::<RawCredentials>(),
        "identity_headers" => fields_of::<RawIdentityHeaders>(),
        "paths" => fields_of::<RawPaths>(),
        "routes" => fields_of::<RawRoutes>(),
        "routes.rule[]" => fields_of::<RawRouteRule>(),
        "idempotency" => fields_of::<RawIdempotency>(),
        "rate_limit" => fields_of::<RawRateLimit>(),
        "usage" => fields_of::<RawUsage>(),
        "redis" => fields_of::<RawRedis>(),
        "log" => fields_of::<RawLog>(),
        "runtime" => fields_of::<RawRuntime>(),
        "shutdown" => fields_of::<RawShutdown>(),
        "limits" => fields_of::<RawLimits>(),
        _ => return None,
    })
}

/// Remove from `value` (at `table`, shown to the user as `shown`) every key its table does not
/// take, recording each as a problem under its dotted name.
fn strip_unknown(value: &mut config::Value, table: &str, shown: &str, out: &mut Vec<Problem>) {
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_owned()
        } else {
            format!("{a}.{b}")
        }
    };
    match &mut value.kind {
        config::ValueKind::Table(map) => {
            let Some(known) = table_fields(table) else {
                return;
            };
            map.retain(|k, _| {
                let ok = known.contains(&k.as_str());
                if !ok {
                    let place = if shown.is_empty() {
                        "the top level"
                    } else {
                        shown
                    };
                    out.push(Problem {
                        key: join(shown, k),
                        message: format!("unknown key ({place} takes: {})", known.join(", ")),
                    });
                }
                ok
            });
            for (k, v) in map.iter_mut() {
                strip_unknown(v, &join(table, k), &join(shown, k), out);
            }
        }
        config::ValueKind::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                strip_unknown(item, &format!("{table}[]"), &format!("{shown}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The field names serde's derive gives the struct `T` (what it hands `deserialize_struct`).
fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("probe")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// A list from the file, or from an environment variable as its items joined by commas
/// (`KEYGATE__PROXY__TRUSTED_PROXIES=10.0.0.0/8,192.168.0.0/16`; one item is a list of one).
fn list_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrText::deserialize(d)? {
        ListOrText::List(items) => items,
        ListOrText::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

fn read_raw(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(RawConfig, Vec<Problem>), ConfigError> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(ConfigError::Read {
            path: shown,
            message: "no such file".into(),
        });
    }
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("KEYGATE__"))
        .collect();
    let environment = config::Environment::with_prefix("KEYGATE")
        .prefix_separator("__")
        .separator("__")
        // Values stay text: serde reads numbers and booleans from it where a key takes one, and
        // a text key keeps what was written (try_parsing turned "007" into "7", "1e3" into
        // "1000", "TRUE" into "true"). A list is its items joined by commas ([`list_or_text`]).
        .try_parsing(false)
        .source(Some(env));
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(environment)
        .build()
        .map_err(|e| e.to_string())
        .and_then(deserialize)
        .map_err(|message| ConfigError::Read {
            path: shown,
            message,
        })
}

/// Check everything and build [`Settings`], or list every problem. Variables named by
/// `*_env` keys are read from the process environment.
pub fn validate(raw: RawConfig) -> Result<Settings, ConfigError> {
    validate_with_env(raw, &|k| std::env::var(k).ok())
}

/// As [`validate`], reading the variables named by `*_env` keys through `env`.
pub fn validate_with_env(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let mut v = Validator {
        problems: Vec::new(),
        env,
    };

    let environment = match raw.environment.as_deref() {
        None => {
            v.problem("environment", "is required (e.g. \"live\")");
            String::new()
        }
        Some(e) if !is_token(e) => {
            v.problem(
                "environment",
                format!("{e:?} must be letters, digits, '_' or '-'"),
            );
            String::new()
        }
        Some(e) => e.to_owned(),
    };

    let mut prefixes = Vec::new();
    for (i, p) in raw.key_prefixes.iter().enumerate() {
        let key = format!("key_prefixes[{i}]");
        if p.prefix.is_empty()
            || !p
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            v.problem(
                format!("{key}.prefix"),
                format!("{:?} must be 1 or more of A-Z a-z 0-9 _", p.prefix),
            );
        }
        if !is_token(&p.environment) {
            v.problem(
                format!("{key}.environment"),
                format!("{:?} must be letters, digits, '_' or '-'", p.environment),
            );
        }
        if raw.key_prefixes[..i].iter().any(|q| q.prefix == p.prefix) {
            v.problem(
                format!("{key}.prefix"),
                format!("{:?} is configured twice", p.prefix),
            );
        }
        prefixes.push(PrefixRule {
            prefix: p.prefix.clone(),
            environment: p.environment.clone(),
            checksum: p.checksum,
        });
    }

    let snapshot = v.snapshot(&raw.snapshot);
    let sync_server = v.sync_server(&raw.sync_server);
    let proxy = v.proxy(&raw.proxy);
    let admin = v.listen("admin.listen", raw.admin.listen.as_deref());
    let ext_authz = v.ext_authz(&raw.ext_authz);
    let ext_authz_limits = v.check_limits(&raw.ext_authz);
    let authz_http = v.front("authz_http", &raw.authz_http);
    let headers = v.headers(&raw.credentials, &raw.identity_headers, &raw.idempotency);
    let rate_limit = v.rate_limit(&raw.rate_limit, &raw.redis);
    let idempotency = v.idempotency(&raw.idempotency, &raw.redis);
    let usage_report = v.usage_report(&raw.usage);

    let unmatched = match raw.routes.unmatched.as_deref().unwrap_or("allow") {
        "allow" => Unmatched::Allow,
        "deny" => Unmatched::Deny,
        other => {
            v.problem(
                "routes.unmatched",
                format!("{other:?} must be \"allow\" or \"deny\""),
            );
            Unmatched::Allow
        }
    };
    let mut rules = Vec::new();
    for (i, r) in raw.routes.rule.iter().enumerate() {
        let key = format!("routes.rule[{i}]");
        match RoutePattern::parse(&r.route) {
            Ok(p) => {
                let mut scopes: Vec<Arc<str>> = Vec::new();
                for s in &r.scopes {
                    if !is_scope(s) {
                        v.problem(
                            format!("{key}.scopes"),
                            format!("{s:?} is not a valid scope"),
                        );
                    } else if !scopes.iter().any(|x| &**x == s) {
                        scopes.push(Arc::from(s.as_str()));
                    }
                }
                rules.push((p, Arc::<[Arc<str>]>::from(scopes)));
            }
            Err(e) => v.problem(format!("{key}.route"), e.to_string()),
        }
    }
    let route_case = if raw.routes.case_sensitive.unwrap_or(true) {
        Case::Sensitive
    } else {
        Case::Insensitive
    };
    // Ignoring case, `GET /a` and `GET /A` are one route, listed twice, as `GET /a` and
    // `GET /a/` are everywhere.
    let routes = match route_case {
        Case::Sensitive => RouteTable::new(rules),
        Case::Insensitive => RouteTable::folded(rules),
    };
    let routes = match routes {
        Ok(t) => t,
        Err(e) => {
            let note = match route_case {
                Case::Sensitive => "",
                Case::Insensitive => " when letter case is ignored (routes.case_sensitive = false)",
            };
            v.problem("routes.rule", format!("{e}{note}"));
            RouteTable::new(Vec::new()).expect("an empty route table is valid")
        }
    };

    let log = LogSettings {
        level: raw.log.level.clone().unwrap_or_else(|| "info".into()),
        json: match raw.log.format.as_deref().unwrap_or("pretty") {
            "pretty" => false,
            "json" => true,
            other => {
                v.problem(
                    "log.format",
                    format!("{other:?} must be \"pretty\" or \"json\""),
                );
                false
            }
        },
        decisions: match raw.log.decisions.as_deref().unwrap_or("all") {
            "all" => DecisionLog::All,
            "denied" => DecisionLog::Denied,
            "none" => DecisionLog::None,
            other => {
                v.problem(
                    "log.decisions",
                    format!("{other:?} must be \"all\", \"denied\" or \"none\""),
                );
                DecisionLog::All
            }
        },
        buffered_lines: match raw.log.buffered_lines {
            Some(n @ 1..=1_000_000) => n,
            Some(n) => {
                v.problem("log.buffered_lines", format!("{n} is not in 1..=1000000"));
                DEFAULT_LOG_BUFFERED_LINES
            }
            None => DEFAULT_LOG_BUFFERED_LINES,
        },
    };
    let shutdown = ShutdownSettings {
        delay: v.duration_or_zero(
            "shutdown.delay",
            raw.shutdown.delay.as_deref(),
            Duration::ZERO,
        ),
        drain_timeout: v.duration(
            "shutdown.drain_timeout",
            raw.shutdown.drain_timeout.as_deref(),
            Duration::from_secs(30),
        ),
    };
    let limits = v.limits(&raw.limits);
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        v.problem("log.level", format!("{:?}: {e}", log.level));
    }
    let runtime = RuntimeSettings {
        flavor: match raw.runtime.flavor.as_deref().unwrap_or("thread_per_core") {
            "multi_thread" => RuntimeFlavor::MultiThread,
            "current_thread" => RuntimeFlavor::CurrentThread,
            "thread_per_core" => RuntimeFlavor::ThreadPerCore,
            other => {
                v.problem(
                    "runtime.flavor",
                    format!(
                        "{other:?} must be \"multi_thread\", \"current_thread\" or \"thread_per_core\""
                    ),
                );
                RuntimeFlavor::MultiThread
            }
        },
        worker_threads: match raw.runtime.worker_threads {
            // Each is a thread (and, under thread_per_core, a listening socket) of its own.
            Some(n) if n > MAX_WORKER_THREADS => {
                v.problem(
                    "runtime.worker_threads",
                    format!("{n} is more than {MAX_WORKER_THREADS}"),
                );
                0
            }
            n => n.unwrap_or(0),
        },
    };

    let no_front = proxy.is_none()
        && ext_authz.is_none()
        && authz_http.is_none()
        && raw
            .sync_server
            .listen
            .as_deref()
            .is_none_or(|l| l.trim().is_empty());
    if no_front && admin.is_none() && v.problems.is_empty() {
        v.problem(
            "proxy.listen",
            "no front is configured: set proxy.listen (and proxy.upstream), ext_authz.listen or authz_http.listen",
        );
    }

    if !v.problems.is_empty() {
        return Err(ConfigError::Invalid(v.problems));
    }
    Ok(Settings {
        policy: Arc::new(Policy {
            environment,
            prefixes: PrefixRules::new(prefixes),
            routes,
            unmatched,
            route_case,
            path: PathOptions {
                allow_semicolon: raw.paths.allow_semicolon.unwrap_or(false),
                as_sent: false,
            },
            idempotency_required: raw.idempotency.required.unwrap_or(false),
        }),
        snapshot: snapshot.expect("no problems means a snapshot section"),
        sync_server,
        proxy,
        admin,
        ext_authz,
        ext_authz_limits,
        authz_http,
        headers: Arc::new(headers),
        rate_limit: Arc::new(rate_limit),
        idempotency,
        usage_report,
        log,
        runtime,
        shutdown,
        limits,
    })
}

/// The longest duration any key takes.
const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

struct Validator<'e> {
    problems: Vec<Problem>,
    env: &'e dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text) {
            // hyper, h2 and keygate add durations to the clock: a year is more than any timeout
            // needs, and far from overflowing it.
            Ok(d) if d > MAX_DURATION => {
                self.problem(key, format!("{text:?} is more than a year"));
                default
            }
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(key, format!("{text:?} must be more than zero"));
                default
            }
            Err(_) => {
                self.problem(
                    key,
                    format!(
                        "{text:?} is not a duration with a unit, like \"250ms\", \"5s\" or \"1m\""
                    ),
                );
                default
            }
        }
    }

    /// As [`Self::duration`], where zero (\"0s\") is allowed.
    fn duration_or_zero(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(humantime::parse_duration) {
            Some(Ok(d)) if d.is_zero() => d,
            _ => self.duration(key, value, default),
        }
    }

    fn limits(&mut self, raw: &RawLimits) -> Limits {
        let d = Limits::default();
        let mut count =
            |key: &str, value: Option<usize>, default: usize, min: usize, max: usize| match value {
                None => default,
                Some(n) if (min..=max).contains(&n) => n,
                Some(n) => {
                    self.problem(key, format!("{n} must be between {min} and {max}"));
                    default
                }
            };
        let max_connections = count(
            "limits.max_connections",
            raw.max_connections,
            d.max_connections,
            1,
            1_000_000,
        );
        let streams = count(
            "limits.http2_max_concurrent_streams",
            raw.http2_max_concurrent_streams.map(|n| n as usize),
            d.http2_max_concurrent_streams as usize,
            1,
            10_000,
        ) as u32;
        let pending_resets = count(
            "limits.http2_max_pending_accept_reset_streams",
            raw.http2_max_pending_accept_reset_streams,
            d.http2_max_pending_accept_reset_streams,
            1,
            100_000,
        );
        let local_resets = count(
            "limits.http2_max_local_error_reset_streams",
            raw.http2_max_local_error_reset_streams,
            d.http2_max_local_error_reset_streams,
            1,
            100_000,
        );
        let problems = self.problems.len();
        let idle_timeout = match self.duration(
            "limits.idle_timeout",
            raw.idle_timeout.as_deref(),
            d.idle_timeout,
        ) {
            t if t < Duration::from_millis(100) => {
                self.problem(
                    "limits.idle_timeout",
                    "must be at least 100ms (HTTP/2 keep-alive PINGs come within it)",
                );
                d.idle_timeout
            }
            t => t,
        };
        let idle_timeout_ok = self.problems.len() == problems;
        // Unset, PINGs come at least twice per idle_timeout.
        let keep_alive = self.duration(
            "limits.http2_keep_alive_interval",
            raw.http2_keep_alive_interval.as_deref(),
            d.http2_keep_alive_interval.min(idle_timeout / 2),
        );
        if keep_alive >= idle_timeout && idle_timeout_ok {
            // A quiet stream (Envoy's health Watch, a hub's Watch between heartbeats) is kept
            // only while PINGs answered show its client is there: they must come first.
            self.problem(
                "limits.http2_keep_alive_interval",
                format!(
                    "{} is not shorter than limits.idle_timeout ({}): quiet HTTP/2 and gRPC streams would be closed as idle before a keep-alive PING",
                    humantime::format_duration(keep_alive),
                    humantime::format_duration(idle_timeout)
                ),
            );
        }
        Limits {
            max_connections,
            http2_max_concurrent_streams: streams,
            http2_max_pending_accept_reset_streams: pending_resets,
            http2_max_local_error_reset_streams: local_resets,
            http2_keep_alive_interval: keep_alive,
            http2_keep_alive_timeout: self.duration(
                "limits.http2_keep_alive_timeout",
                raw.http2_keep_alive_timeout.as_deref(),
                d.http2_keep_alive_timeout,
            ),
            idle_timeout,
        }
    }

    fn listen(&mut self, key: &str, value: Option<&str>) -> Option<SocketAddr> {
        let text = value.map(str::trim).filter(|s| !s.is_empty())?;
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("{text:?} is not an address like \"127.0.0.1:8080\""),
                );
                None
            }
        }
    }

    fn header(&mut self, key: &str, value: Option<&str>, default: &'static str) -> HeaderName {
        let text = value.unwrap_or(default);
        match HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                self.problem(key, format!("{text:?} is not a valid header name"));
                HeaderName::from_static(default)
            }
        }
    }

    fn snapshot(&mut self, raw: &RawSnapshot) -> Option<SnapshotSettings> {
        let source = match raw.source.as_deref().unwrap_or("file") {
            "file" => SourceKind::File,
            "http" => SourceKind::Http,
            "grpc" => SourceKind::Grpc,
            other => {
                self.problem(
                    "snapshot.source",
                    format!("{other:?} must be \"file\", \"http\" or \"grpc\""),
                );
                SourceKind::File
            }
        };
        let path = match (&raw.path, source) {
            (Some(p), _) if !p.as_os_str().is_empty() => p.clone(),
            (_, SourceKind::File) => {
                self.problem("snapshot.path", "is required (the snapshot JSON file)");
                PathBuf::new()
            }
            _ => PathBuf::new(),
        };
        let url = match (raw.url.as_deref().map(str::trim), source) {
            (Some(text), _) if !text.is_empty() => self.source_url(text, source),
            (_, SourceKind::File) => None,
            (_, SourceKind::Http) => {
                self.problem(
                    "snapshot.url",
                    "is required with source = \"http\" (the control plane's snapshot URL)",
                );
                None
            }
            (_, SourceKind::Grpc) => {
                self.problem(
                    "snapshot.url",
                    "is required with source = \"grpc\" (the hub, like \"http://hub:9393\")",
                );
                None
            }
        };
        let poll_default = match source {
            SourceKind::Http => secs(5),
            _ => secs(1),
        };
        let poll_interval = self.duration(
            "snapshot.poll_interval",
            raw.poll_interval.as_deref(),
            poll_default,
        );
        let token = self.secret_env("snapshot.token_env", raw.token_env.as_deref());
        self.refuse_blank("snapshot.ca_file", raw.ca_file.as_deref().map(path_text));
        self.refuse_blank("snapshot.max_staleness", raw.max_staleness.as_deref());
        let client_identity = self.identity(
            ("snapshot.client_cert", raw.client_cert.as_ref()),
            ("snapshot.client_key", raw.client_key.as_ref()),
        );
        let ca_file = raw.ca_file.clone().filter(|p| !p.as_os_str().is_empty());
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                self.problem(
                    "snapshot.ca_file",
                    format!("{} is not a readable file", ca.display()),
                );
            }
        }
        let connect_timeout = self.duration(
            "snapshot.connect_timeout",
            raw.connect_timeout.as_deref(),
            secs(2),
        );
        let read_timeout = self.duration(
            "snapshot.read_timeout",
            raw.read_timeout.as_deref(),
            secs(30),
        );
        let max_body_bytes = match raw.max_body_bytes {
            Some(0) => {
                self.problem("snapshot.max_body_bytes", "must be more than zero");
                0
            }
            Some(n) => n,
            None => 1 << 30,
        };
        let backoff_max =
            self.duration("snapshot.backoff_max", raw.backoff_max.as_deref(), secs(30));
        let idle_timeout = self.duration(
            "snapshot.idle_timeout",
            raw.idle_timeout.as_deref(),
            secs(15),
        );
        let cache_path = raw.cache_path.clone().filter(|p| !p.as_os_str().is_empty());
        let max_staleness = raw
            .max_staleness
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .map(|t| self.duration("snapshot.max_staleness", Some(t), Duration::MAX));
        if let Some(m) = max_staleness {
            let confirm_every = if source == SourceKind::Grpc {
                idle_timeout
            } else {
                poll_interval
            };
            if m != Duration::MAX && m <= confirm_every {
                self.problem(
                    "snapshot.max_staleness",
                    format!(
                        "{} must be longer than the source's confirmation interval ({}), or nothing would ever be fresh",
                        humantime::format_duration(m),
                        humantime::format_duration(confirm_every)
                    ),
                );
            }
        }
        let pepper = match raw.pepper_env.as_deref() {
            None => None,
            Some(var) => match (self.env)(var) {
                Some(v) if !v.is_empty() => Some(Arc::from(v.as_bytes())),
                _ => {
                    self.problem(
                        "snapshot.pepper_env",
                        format!("the environment variable {var:?} is not set or empty"),
                    );
                    None
                }
            },
        };
        Some(SnapshotSettings {
            source,
            path,
            url,
            poll_interval,
            token,
            ca_file,
            client_identity,
            connect_timeout,
            read_timeout,
            max_body_bytes,
            backoff_max,
            idle_timeout,
            cache_path,
            max_staleness,
            pepper,
        })
    }

    fn source_url(&mut self, text: &str, source: SourceKind) -> Option<http::Uri> {
        let uri = self.http_url("snapshot.url", text)?;
        if source == SourceKind::Grpc && !matches!(uri.path(), "" | "/") {
            self.problem(
                "snapshot.url",
                format!(
                    "{}: a gRPC hub is an address without a path, like \"http://hub:9393\"",
                    shown_url(&uri)
                ),
            );
            return None;
        }
        Some(uri)
    }

    /// An `http://` or `https://` URL with a host (and a port that is a number, if any), and no
    /// user information. Never quoted whole in a problem: a password in it would be printed
    /// and logged (one with `/`, `?` or `#` in it even ends the host early, unnoticed).
    fn http_url(&mut self, key: &str, text: &str) -> Option<http::Uri> {
        if self.refuse_credentials(key, text) {
            return None;
        }
        let Ok(uri) = text.parse::<http::Uri>() else {
            self.problem(key, "is not a URL");
            return None;
        };
        let port_ok = uri.authority().is_some_and(|a| {
            let s = a.as_str();
            // After an IPv6 literal's `]`, or after the host: a port is all digits.
            let after_host = s.rsplit_once(']').map_or(s, |(_, rest)| rest);
            after_host
                .split_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_ok())
        });
        if !matches!(uri.scheme_str(), Some("http" | "https")) || !port_ok {
            self.problem(
                key,
                format!(
                    "{} must be an http:// or https:// URL with a host (and a port that is a number)",
                    shown_url(&uri)
                ),
            );
            return None;
        }
        Some(uri)
    }

    /// Refuses a URL with user information (`user:password@`), without quoting it: problems
    /// are printed and logged, and the password would be with them. Returns whether it had any.
    fn refuse_credentials(&mut self, key: &str, text: &str) -> bool {
        let after_scheme = text.split_once("://").map_or(text, |(_, rest)| rest);
        let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
        let Some((_, host)) = authority.rsplit_once('@') else {
            return false;
        };
        self.problem(
            key,
            format!(
                "the URL (host {host:?}) holds a user name or password: keygate sends none from a URL; name a bearer token with token_env"
            ),
        );
        true
    }

    /// Refuses a value that is given but blank, for a key whose absence weakens a check
    /// (staleness, a private CA, a token): that is an unset variable in a template or an
    /// environment override, not a wish to turn the check off. Returns whether it was blank.
    fn refuse_blank(&mut self, key: &str, value: Option<&str>) -> bool {
        let blank = value.is_some_and(|v| v.trim().is_empty());
        if blank {
            self.problem(
                key,
                "is empty: give a value, or remove the key (an empty value does not turn it off)",
            );
        }
        blank
    }

    /// The value of the environment variable named at `key`, which must be set and not empty.
    fn secret_env(&mut self, key: &str, var: Option<&str>) -> Option<Secret> {
        if self.refuse_blank(key, var) {
            return None;
        }
        let var = var.map(str::trim)?;
        match (self.env)(var) {
            Some(v) if !v.trim().is_empty() => Some(Secret::new(v.trim())),
            _ => {
                self.problem(
                    key,
                    format!("the environment variable {var:?} is not set or empty"),
                );
                None
            }
        }
    }

    fn idempotency(
        &mut self,
        raw: &RawIdempotency,
        redis: &RawRedis,
    ) -> Option<IdempotencySettings> {
        let redis = match raw.backend.as_deref().unwrap_or("local") {
            "local" => None,
            "redis" => self.redis(redis, "idempotency.backend"),
            other => {
                self.problem(
                    "idempotency.backend",
                    format!("{other:?} must be \"local\" or \"redis\""),
                );
                None
            }
        };
        let ttl = self.duration("idempotency.ttl", raw.ttl.as_deref(), secs(24 * 3600));
        let mut size = |key: &str, value: Option<usize>, default: usize| match value {
            Some(0) => {
                self.problem(key, "must be more than zero");
                default
            }
            Some(n) => n,
            None => default,
        };
        let max_in_flight = size("idempotency.max_in_flight", raw.max_in_flight, 256);
        let limits = crate::idempotency::Limits {
            ttl,
            max_request_bytes: size(
                "idempotency.max_request_bytes",
                raw.max_request_bytes,
                1 << 20,
            ),
            max_response_bytes: size(
                "idempotency.max_response_bytes",
                raw.max_response_bytes,
                1 << 20,
            ),
            max_memory_bytes: size(
                "idempotency.max_memory_bytes",
                raw.max_memory_bytes,
                64 << 20,
            ),
            max_in_flight,
            max_in_flight_per_key: self.in_flight_per_key(raw.max_in_flight_per_key, max_in_flight),
        };
        raw.replay
            .unwrap_or(true)
            .then_some(IdempotencySettings { limits, redis })
    }

    /// `idempotency.max_in_flight_per_key`: 1..=`max_in_flight`, a quarter of it by default
    /// (four keys at their most still leave room for the others).
    fn in_flight_per_key(&mut self, value: Option<usize>, max_in_flight: usize) -> usize {
        let key = "idempotency.max_in_flight_per_key";
        match value {
            Some(0) => {
                self.problem(key, "must be more than zero");
                1
            }
            Some(n) if n > max_in_flight => {
                let why = format!("{n} is more than idempotency.max_in_flight ({max_in_flight})");
                self.problem(key, why);
                max_in_flight
            }
            Some(n) => n,
            None => (max_in_flight / 4).max(1),
        }
    }

    fn usage_report(&mut self, raw: &RawUsage) -> Option<UsageReportSettings> {
        let token = self.secret_env("usage.token_env", raw.token_env.as_deref());
        self.refuse_blank("usage.ca_file", raw.ca_file.as_deref().map(path_text));
        let mut interval = self.duration("usage.interval", raw.interval.as_deref(), secs(60));
        if interval < Duration::from_millis(100) {
            // A batch (and, while the receiver is down, a failed attempt and its warning) per
            // interval: "1ns" is a typo, not a reporting need.
            self.problem("usage.interval", format!("{interval:?} is less than 100ms"));
            interval = secs(60);
        }
        let timeout = self.duration("usage.timeout", raw.timeout.as_deref(), secs(10));
        let max_pending_batches = match raw.max_pending_batches {
            Some(0) => {
                self.problem("usage.max_pending_batches", "must be at least 1");
                1
            }
            Some(n) => n,
            None => 1000,
        };
        let ca_file = raw.ca_file.clone().filter(|p| !p.as_os_str().is_empty());
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                self.problem(
                    "usage.ca_file",
                    format!("{} is not a readable file", ca.display()),
                );
            }
        }
        let text = raw
            .report_url
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())?;
        let url = self.http_url("usage.report_url", text)?;
        Some(UsageReportSettings {
            url,
            token,
            ca_file,
            interval,
            timeout,
            max_pending_batches,
        })
    }

    fn redis(&mut self, raw: &RawRedis, wanted_by: &str) -> Option<RedisSettings> {
        let url = match raw.url.as_deref().map(str::trim) {
            Some(u) if u.starts_with("redis://") || u.starts_with("rediss://") => u.to_owned(),
            Some(u) if !u.is_empty() => {
                let shown = u.split('@').next_back().unwrap_or(u);
                self.problem(
                    "redis.url",
                    format!("\"…{shown}\" must be a redis:// URL, like \"redis://127.0.0.1:6379\""),
                );
                return None;
            }
            _ => {
                self.problem(
                    "redis.url",
                    format!("is required with {wanted_by} = \"redis\""),
                );
                return None;
            }
        };
        if url.starts_with("rediss://") {
            self.problem("redis.url", "TLS to Redis (rediss://) is not supported yet");
            return None;
        }
        if redis::Client::open(url.as_str()).is_err() {
            self.problem("redis.url", "is not a valid Redis URL");
            return None;
        }
        let timeout = self.duration(
            "redis.timeout",
            raw.timeout.as_deref(),
            Duration::from_millis(50),
        );
        Some(RedisSettings {
            url,
            timeout,
            key_prefix: raw.key_prefix.clone().unwrap_or_else(|| "keygate:".into()),
        })
    }

    fn rate_limit(&mut self, raw: &RawRateLimit, redis: &RawRedis) -> RateLimitSettings {
        let redis = match raw.backend.as_deref().unwrap_or("local") {
            "local" => None,
            "redis" => self.redis(redis, "rate_limit.backend"),
            other => {
                self.problem(
                    "rate_limit.backend",
                    format!("{other:?} must be \"local\" or \"redis\""),
                );
                None
            }
        };
        let default_per_minute = match raw.default_per_minute {
            Some(0) | None => None,
            Some(n) => Some(n),
        };
        for (env, n) in &raw.per_environment {
            if *n == 0 {
                self.problem(
                    format!("rate_limit.per_environment.{env}"),
                    "must be at least 1 request per minute",
                );
            }
        }
        let burst = self.duration("rate_limit.burst", raw.burst.as_deref(), secs(60));
        RateLimitSettings {
            redis,
            default_per_minute,
            per_environment: raw.per_environment.clone(),
            burst,
        }
    }

    fn sync_server(&mut self, raw: &RawSyncServer) -> Option<SyncServerSettings> {
        let listen = self.listen("sync_server.listen", raw.listen.as_deref());
        let token = self.secret_env("sync_server.token_env", raw.token_env.as_deref());
        let heartbeat_interval = self.duration(
            "sync_server.heartbeat_interval",
            raw.heartbeat_interval.as_deref(),
            secs(5),
        );
        if let (Some(addr), None) = (listen, &token) {
            if !addr.ip().is_loopback() {
                self.problem(
                    "sync_server.token_env",
                    format!("is required when sync_server.listen ({addr}) is not a loopback address: the stream carries every key digest"),
                );
            }
        }
        let tls = self.server_tls(
            "sync_server",
            raw.tls_cert.as_ref(),
            raw.tls_key.as_ref(),
            raw.client_ca.as_ref(),
        );
        Some(SyncServerSettings {
            listen: listen?,
            tls,
            token,
            heartbeat_interval,
        })
    }

    /// A readable file at `key`, if one is named.
    fn pem_file(&mut self, key: &str, path: Option<&PathBuf>) -> Option<PathBuf> {
        let path = path?;
        // An empty value is an unset variable, not "no TLS": refusing it keeps a typo from
        // turning TLS or client-certificate checks off silently.
        if path.as_os_str().is_empty() {
            self.problem(key, "is empty: name a PEM file, or remove the key");
            return None;
        }
        if std::fs::File::open(path).is_err() {
            self.problem(key, format!("{} is not a readable file", path.display()));
            return None;
        }
        Some(path.clone())
    }

    /// `<section>.tls_cert`, `tls_key` and `client_ca`: the files exist, parse, and the key
    /// matches the certificate.
    fn server_tls(
        &mut self,
        section: &str,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        client_ca: Option<&PathBuf>,
    ) -> Option<ServerTlsSettings> {
        let (cert_key, key_key, ca_key) = (
            format!("{section}.tls_cert"),
            format!("{section}.tls_key"),
            format!("{section}.client_ca"),
        );
        let identity = self.identity((&cert_key, cert), (&key_key, key));
        let client_ca = self.pem_file(&ca_key, client_ca);
        if client_ca.is_some() && identity.is_none() && cert.is_none() && key.is_none() {
            self.problem(
                &ca_key,
                format!("needs {section}.tls_cert and tls_key (client certificates are checked over TLS)"),
            );
        }
        let tls = ServerTlsSettings {
            identity: identity?,
            client_ca,
        };
        match crate::tls::check_server(&tls) {
            Ok(()) => Some(tls),
            Err(e) => {
                let key = match e.file {
                    crate::tls::TlsFile::Cert => cert_key,
                    crate::tls::TlsFile::Key => key_key,
                    crate::tls::TlsFile::ClientCa => ca_key,
                };
                self.problem(key, e.to_string());
                None
            }
        }
    }

    /// A certificate and key named together, or neither.
    fn identity(
        &mut self,
        (cert_key, cert): (&str, Option<&PathBuf>),
        (key_key, key): (&str, Option<&PathBuf>),
    ) -> Option<TlsIdentity> {
        match (self.pem_file(cert_key, cert), self.pem_file(key_key, key)) {
            (Some(cert), Some(key)) => Some(TlsIdentity { cert, key }),
            (Some(_), None) if key.is_none() => {
                self.problem(key_key, format!("is required with {cert_key}"));
                None
            }
            (None, Some(_)) if cert.is_none() => {
                self.problem(cert_key, format!("is required with {key_key}"));
                None
            }
            _ => None,
        }
    }

    fn proxy(&mut self, raw: &RawProxy) -> Option<ProxySettings> {
        let listen = self.listen("proxy.listen", raw.listen.as_deref());
        // The upstream is checked whenever it is given, even if `listen` itself is broken, so
        // that `config check` names both.
        let listen_given = raw.listen.as_deref().is_some_and(|l| !l.trim().is_empty());
        let upstream = match (listen_given, raw.upstream.as_deref()) {
            (_, Some(text)) => self.upstream(text),
            (true, None) => {
                self.problem("proxy.upstream", "is required when proxy.listen is set");
                None
            }
            (false, None) => None,
        };
        let trusted = self.cidrs("proxy.trusted_proxies", &raw.trusted_proxies);
        let connect_timeout = self.duration(
            "proxy.connect_timeout",
            raw.connect_timeout.as_deref(),
            secs(2),
        );
        let upstream_timeout = self.duration(
            "proxy.upstream_timeout",
            raw.upstream_timeout.as_deref(),
            secs(30),
        );
        let header_read_timeout = self.duration(
            "proxy.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            secs(10),
        );
        let max_header_bytes = raw.max_header_bytes.unwrap_or(16 * 1024);
        if !(8192..=1024 * 1024).contains(&max_header_bytes) {
            self.problem(
                "proxy.max_header_bytes",
                format!("{max_header_bytes} must be between 8192 and 1048576"),
            );
        }
        let max_headers = raw.max_headers.unwrap_or(100);
        if !(16..=1000).contains(&max_headers) {
            self.problem(
                "proxy.max_headers",
                format!("{max_headers} must be between 16 and 1000"),
            );
        }
        let tls = self.server_tls(
            "proxy",
            raw.tls_cert.as_ref(),
            raw.tls_key.as_ref(),
            raw.client_ca.as_ref(),
        );
        let max_connections_per_ip = raw.max_connections_per_ip.unwrap_or(0);
        if max_connections_per_ip > 1_000_000 {
            self.problem(
                "proxy.max_connections_per_ip",
                format!("{max_connections_per_ip} must be between 0 and 1000000"),
            );
        }
        let own_host = match raw.upstream_host.as_deref().map(str::trim) {
            None | Some("client") => false,
            Some("upstream") => true,
            Some(other) => {
                self.problem(
                    "proxy.upstream_host",
                    format!("{other:?} must be \"client\" or \"upstream\""),
                );
                false
            }
        };
        let upstream_tls = self.upstream_tls(raw, upstream.as_ref());
        let (scheme, authority) = upstream?;
        let upstream_host = if own_host {
            UpstreamHost::Upstream(upstream_host(
                &scheme,
                &authority,
                raw.upstream_server_name.as_deref().map(str::trim),
            ))
        } else {
            UpstreamHost::Client
        };
        Some(ProxySettings {
            listen: listen?,
            upstream: authority,
            upstream_scheme: scheme,
            trusted_proxies: trusted.into(),
            connect_timeout,
            upstream_timeout,
            header_read_timeout,
            max_header_bytes,
            max_headers,
            pool_idle_per_host: raw.pool_idle_per_host.unwrap_or(64),
            max_connections_per_ip,
            upstream_host,
            tls,
            upstream_tls,
        })
    }

    /// The `upstream_*` TLS keys: only with an `https://` upstream, and each usable.
    fn upstream_tls(
        &mut self,
        raw: &RawProxy,
        upstream: Option<&(http::uri::Scheme, http::uri::Authority)>,
    ) -> Option<UpstreamTlsSettings> {
        let https = match upstream {
            Some((scheme, authority)) if *scheme == http::uri::Scheme::HTTPS => Some(authority),
            Some(_) => {
                let given = [
                    ("proxy.upstream_ca_file", raw.upstream_ca_file.is_some()),
                    (
                        "proxy.upstream_server_name",
                        raw.upstream_server_name.is_some(),
                    ),
                    (
                        "proxy.upstream_client_cert",
                        raw.upstream_client_cert.is_some(),
                    ),
                    (
                        "proxy.upstream_client_key",
                        raw.upstream_client_key.is_some(),
                    ),
                ];
                for (key, set) in given {
                    if set {
                        self.problem(key, "is only used with an https:// proxy.upstream");
                    }
                }
                return None;
            }
            None => None,
        };
        let ca_file = self.pem_file("proxy.upstream_ca_file", raw.upstream_ca_file.as_ref());
        let client_identity = self.identity(
            (
                "proxy.upstream_client_cert",
                raw.upstream_client_cert.as_ref(),
            ),
            (
                "proxy.upstream_client_key",
                raw.upstream_client_key.as_ref(),
            ),
        );
        let server_name = match raw.upstream_server_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => {
                if crate::tls::server_name(name).is_none() {
                    self.problem(
                        "proxy.upstream_server_name",
                        format!("{name:?} is not a DNS name or an IP address"),
                    );
                    return None;
                }
                name.to_owned()
            }
            _ => https?.host().to_owned(),
        };
        let authority = https?;
        if crate::tls::server_name(&server_name).is_none() {
            self.problem(
                "proxy.upstream",
                format!("the host of {authority:?} is not a DNS name or an IP address a certificate can be checked against"),
            );
            return None;
        }
        if let Err(e) = crate::tls::client_config(ca_file.as_deref(), client_identity.as_ref(), &[])
        {
            let key = match e.file {
                crate::tls::TlsFile::ClientCa => "proxy.upstream_ca_file",
                crate::tls::TlsFile::Cert => "proxy.upstream_client_cert",
                crate::tls::TlsFile::Key => "proxy.upstream_client_key",
            };
            self.problem(key, e.to_string());
            return None;
        }
        Some(UpstreamTlsSettings {
            ca_file,
            server_name,
            client_identity,
        })
    }

    fn cidrs(&mut self, key: &str, list: &[String]) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, c) in list.iter().enumerate() {
            // An empty variable (`KEYGATE__PROXY__TRUSTED_PROXIES=""`) or a trailing comma
            // means no entry.
            if c.trim().is_empty() {
                continue;
            }
            match parse_cidr(c) {
                Some(n) => out.push(n),
                None => self.problem(
                    format!("{key}[{i}]"),
                    format!("{c:?} is not a CIDR like \"10.0.0.0/8\" or an IP address"),
                ),
            }
        }
        out
    }

    fn front(&mut self, section: &str, raw: &RawFront) -> Option<FrontSettings> {
        let listen = self.listen(&format!("{section}.listen"), raw.listen.as_deref());
        let trusted = self.cidrs(&format!("{section}.trusted_proxies"), &raw.trusted_proxies);
        let header_read_timeout = self.duration(
            &format!("{section}.header_read_timeout"),
            raw.header_read_timeout.as_deref(),
            Duration::from_secs(10),
        );
        Some(FrontSettings {
            listen: listen?,
            trusted_proxies: trusted.into(),
            tls: None,
            header_read_timeout,
        })
    }

    fn ext_authz(&mut self, raw: &RawExtAuthz) -> Option<FrontSettings> {
        let tls = self.server_tls(
            "ext_authz",
            raw.tls_cert.as_ref(),
            raw.tls_key.as_ref(),
            raw.client_ca.as_ref(),
        );
        let front = RawFront {
            listen: raw.listen.clone(),
            trusted_proxies: raw.trusted_proxies.clone(),
            header_read_timeout: None,
        };
        Some(FrontSettings {
            tls,
            ..self.front("ext_authz", &front)?
        })
    }

    fn check_limits(&mut self, raw: &RawExtAuthz) -> CheckLimits {
        let d = CheckLimits::default();
        // A CheckRequest's length is a 32-bit field of its gRPC frame.
        let max = u32::MAX as usize;
        let mut size = |key: &str, value: Option<usize>, default: usize, max: usize| match value {
            Some(n) if (1..=max).contains(&n) => n,
            Some(n) => {
                self.problem(key, format!("{n} must be between 1 and {max}"));
                default
            }
            None => default,
        };
        let limits = CheckLimits {
            read_timeout: Duration::ZERO,
            max_request_bytes: size(
                "ext_authz.max_request_bytes",
                raw.max_request_bytes,
                d.max_request_bytes,
                max,
            ),
            max_buffered_bytes: size(
                "ext_authz.max_buffered_bytes",
                raw.max_buffered_bytes,
                d.max_buffered_bytes,
                usize::MAX,
            ),
        };
        let limits = CheckLimits {
            read_timeout: self.duration(
                "ext_authz.read_timeout",
                raw.read_timeout.as_deref(),
                d.read_timeout,
            ),
            ..limits
        };
        // The largest CheckRequest arrives with its gRPC frame's 5-byte prefix.
        let largest = limits.max_request_bytes.saturating_add(5);
        if limits.max_buffered_bytes < largest {
            self.problem(
                "ext_authz.max_buffered_bytes",
                format!(
                    "{} is less than ext_authz.max_request_bytes ({}) and the 5 bytes of its gRPC frame: the largest CheckRequest could never be held",
                    limits.max_buffered_bytes, limits.max_request_bytes
                ),
            );
        }
        limits
    }

    fn upstream(&mut self, text: &str) -> Option<(http::uri::Scheme, http::uri::Authority)> {
        let bad = |why: &str| format!("{text:?} {why}");
        let uri: http::Uri = match text.parse() {
            Ok(u) => u,
            Err(_) => {
                self.problem(
                    "proxy.upstream",
                    bad("is not a URL like \"http://127.0.0.1:3000\""),
                );
                return None;
            }
        };
        let scheme = match uri.scheme_str() {
            Some("http") => http::uri::Scheme::HTTP,
            Some("https") => http::uri::Scheme::HTTPS,
            _ => {
                self.problem("proxy.upstream", bad("is not an http:// or https:// URL"));
                return None;
            }
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.problem("proxy.upstream", bad("must not have a path or query"));
            return None;
        }
        let authority = uri.authority()?.clone();
        if authority.as_str().contains('@') {
            self.problem("proxy.upstream", bad("must not carry credentials"));
            return None;
        }
        Some((scheme, authority))
    }

    fn headers(
        &mut self,
        c: &RawCredentials,
        i: &RawIdentityHeaders,
        idem: &RawIdempotency,
    ) -> HeaderNames {
        let names = HeaderNames {
            credentials: CredentialHeaders {
                authorization: self.header(
                    "credentials.authorization_header",
                    c.authorization_header.as_deref(),
                    "authorization",
                ),
                api_key: self.header(
                    "credentials.api_key_header",
                    c.api_key_header.as_deref(),
                    "x-api-key",
                ),
            },
            forward_credentials: c.forward.unwrap_or(false),
            partner_id: self.header(
                "identity_headers.partner_id",
                i.partner_id.as_deref(),
                "x-partner-id",
            ),
            org_id: self.header("identity_headers.org_id", i.org_id.as_deref(), "x-org-id"),
            key_id: self.header("identity_headers.key_id", i.key_id.as_deref(), "x-key-id"),
            key_environment: self.header(
                "identity_headers.key_environment",
                i.key_environment.as_deref(),
                "x-key-environment",
            ),
            scopes: self.header("identity_headers.scopes", i.scopes.as_deref(), "x-scopes"),
            request_id: self.header(
                "identity_headers.request_id",
                i.request_id.as_deref(),
                "x-request-id",
            ),
            idempotency_key: self.header(
                "idempotency.header",
                idem.header.as_deref(),
                "idempotency-key",
            ),
        };
        let all = names.identity();
        for (n, name) in all.iter().enumerate() {
            if all[..n]
                .iter()
                .any(|other| folded_eq(other.as_str(), name.as_str()))
            {
                self.problem(
                    "identity_headers",
                    format!("{name} is used for two identity headers"),
                );
            }
            for cred in [&names.credentials.authorization, &names.credentials.api_key] {
                if folded_eq(cred.as_str(), name.as_str()) {
                    self.problem(
                        "identity_headers",
                        format!("{name} is also a credential header"),
                    );
                }
            }
        }
        names
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Header names equal once `_` is read as `-` (both lower case already).
pub fn folded_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x == y || (matches!(x, b'_' | b'-') && matches!(y, b'_' | b'-')))
}

/// `10.0.0.0/8`, `::1/128` or a bare address (a /32 or /128). An IPv4-mapped IPv6 network
/// (`::ffff:10.0.0.0/104`) is the IPv4 network it maps, since addresses are compared in that form
/// too ([`crate::snapshot::canonical_ip`]).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let net = s
        .parse::<IpNet>()
        .ok()
        .map(|n| n.trunc())
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))?;
    Some(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32"),
            ),
            None => net,
        },
        _ => net,
    })
}

/// A URL as a problem shows it: its scheme and host only (no port, path or query, where a
/// mistyped password could be).
fn shown_url(uri: &http::Uri) -> String {
    match (uri.scheme_str(), uri.host()) {
        (Some(scheme), Some(host)) => format!("\"{scheme}://{host}…\""),
        (None, Some(host)) => format!("\"{host}…\""),
        _ => "the URL".to_owned(),
    }
}

/// A path as text, for [`Validator::refuse_blank`] (a path that is not UTF-8 is not blank).
fn path_text(p: &std::path::Path) -> &str {
    p.to_str().unwrap_or("?")
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Scopes are visible ASCII without spaces or commas (they travel space-separated in a header).
pub fn is_scope(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',')
}

#[cfg(test)]
mod tests;
