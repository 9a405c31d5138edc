//! The gRPC front: `envoy.service.auth.v3.Authorization/Check` (Envoy, Istio and other meshes
//! ask it) and `grpc.health.v1.Health` on one port. It turns a `CheckRequest` into
//! [`RequestFacts`], asks [`decide`](crate::decision::decide), and answers with a `CheckResponse`: OK with header
//! mutations, or a denial carrying the contract's HTTP status, JSON body and headers.
//!
//! It never answers with a gRPC error, not for a missing snapshot and not for a malformed
//! request: an error is what `failure_mode_allow` turns into an allow.

use crate::ratelimit::Outcome;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, BoolValue, Struct, Value};
use envoy_types::pb::google::rpc;
use http::StatusCode;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::client_ip::client_ip;
use crate::config::{FrontSettings, HeaderNames, Policy};
use crate::credential::{extract, Credential};
use crate::decision::{decide_attributed, now_ms, Allow, RequestFacts, Verdict};
use crate::deny::DenyReason;
use crate::headers::is_identity_variant;
use crate::path::{normalize, split_target};
use crate::request_id;
use crate::snapshot::SnapshotStore;
use crate::telemetry::{Note, Record};

/// The service name health checks ask about (besides the whole server, `""`).
pub const SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// The largest `CheckRequest` decoded. tonic's default (4 MiB) is below what Envoy can send with
/// `with_request_body` or large header limits, and a message over the limit is a gRPC error,
/// which `failure_mode_allow` turns into an allow. keygate reads no body, but must decode it.
pub const MAX_CHECK_BYTES: usize = 64 << 20;

pub struct ExtAuthzState {
    pub settings: FrontSettings,
    pub policy: Arc<Policy>,
    pub names: Arc<HeaderNames>,
    pub store: Arc<SnapshotStore>,
    pub limits: Arc<crate::ratelimit::RateLimits>,
    pub usage: Arc<crate::usage::Usage>,
    /// True once keygate is shutting down: health answers NOT_SERVING while Checks are still
    /// answered.
    pub closing: tokio::sync::watch::Receiver<bool>,
    pub shard: Arc<crate::telemetry::Shard>,
    pub connections: Arc<crate::telemetry::Connections>,
    pub resources: crate::config::Limits,
}

struct Service(Arc<ExtAuthzState>);

#[tonic::async_trait]
impl Authorization for Service {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let request = request.into_inner();
        Ok(tonic::Response::new(
            guarded(&self.0.names, check(&self.0, &request)).await,
        ))
    }
}

/// Run `check`; should it panic, answer a denial rather than let the stream die, which Envoy
/// would count as an authorization error (an allow under `failure_mode_allow`).
async fn guarded(names: &HeaderNames, check: impl Future<Output = CheckResponse>) -> CheckResponse {
    CatchUnwind(std::pin::pin!(check))
        .await
        .unwrap_or_else(|()| {
            tracing::error!("ext_authz: a Check panicked; denied with snapshot_unavailable");
            let id = request_id::mint();
            denied(
                &DenyReason::SnapshotUnavailable,
                id.to_str().unwrap_or(""),
                names,
            )
        })
}

/// A future that turns a panic while polling `F` into `Err(())`.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(inner).poll(cx)
        })) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

/// Serve Check and Health on `listener` until `shutdown` resolves; over TLS (ALPN `h2`) when
/// `tls` is given.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ExtAuthzState>,
    tls: Option<Arc<crate::tls::TlsServer>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Health follows the snapshot: SERVING only while one is in force, and not once shutdown
    // begins. Woken by each publish and by shutdown; the timer re-reads the store in case a
    // snapshot ever leaves force without one.
    let store = state.store.clone();
    let mut closing = state.closing.clone();
    let mut clearing = reporter.clone();
    let watcher = tokio::spawn(async move {
        let mut published = store.watch();
        let mut last = None;
        loop {
            published.borrow_and_update();
            let status = if store.serving().is_some() && !*closing.borrow_and_update() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if last != Some(status) {
                reporter.set_service_status("", status).await;
                reporter.set_service_status(SERVICE, status).await;
                last = Some(status);
            }
            tokio::select! {
                changed = published.changed() => if changed.is_err() { break },
                _ = closing.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    // When the listener stops, health Watch streams end (their channels close), so the drain
    // is not held for drain_timeout by clients that watch health on every connection.
    let stop_watcher = watcher.abort_handle();
    let shutdown = async move {
        shutdown.await;
        stop_watcher.abort();
        clearing.clear_service_status("").await;
        clearing.clear_service_status(SERVICE).await;
    };
    let connections = state.connections.clone();
    let r = &state.resources;
    let idle = r.idle_timeout;
    let router = tonic::transport::Server::builder()
        .layer(crate::listen::TrackRequestsLayer)
        .max_concurrent_streams(r.http2_max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(r.http2_max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(r.http2_max_local_error_reset_streams))
        .http2_keepalive_interval(Some(r.http2_keep_alive_interval))
        .http2_keepalive_timeout(Some(r.http2_keep_alive_timeout))
        .add_service(health)
        .add_service(
            AuthorizationServer::new(Service(state)).max_decoding_message_size(MAX_CHECK_BYTES),
        );
    let result = match tls {
        Some(tls) => {
            let incoming = crate::tls::incoming(listener, tls, connections, idle, "ext_authz");
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            let incoming =
                crate::listen::counted_incoming(listener, connections, idle, "ext_authz");
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    watcher.abort();
    if let Err(e) = result {
        tracing::error!(error = %e, "ext_authz server stopped");
    }
}

/// The request's headers as Envoy sends them: the `headers` map (lower-case names, repeated
/// headers comma-joined) or, with `encode_raw_headers`, the `header_map` list.
struct Headers<'a> {
    map: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Headers<'a> {
    fn of(
        http: &'a envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
    ) -> Self {
        let mut map: Vec<(&str, &[u8])> = http
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        if let Some(raw) = &http.header_map {
            for h in &raw.headers {
                let value: &[u8] = if h.raw_value.is_empty() {
                    h.value.as_bytes()
                } else {
                    &h.raw_value
                };
                map.push((h.key.as_str(), value));
            }
        }
        Headers { map }
    }

    fn all(&self, name: &str) -> Vec<&'a [u8]> {
        self.map
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
            .collect()
    }

    /// The one value of `name`; a repeated header yields an empty value (matches nothing).
    fn single(&self, name: &str) -> Option<&'a [u8]> {
        match self.all(name).as_slice() {
            [] => None,
            [one] => Some(one),
            _ => Some(b""),
        }
    }
}

/// Decide one `CheckRequest`, then count it and log the decision (also when Envoy cancels
/// first). Always a `CheckResponse`.
pub async fn check(state: &ExtAuthzState, req: &CheckRequest) -> CheckResponse {
    let mut record = Record::new(&state.shard);
    let (resp, request_id) = decide_check(state, req, &mut record.note).await;
    let status = match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map_or(403, |s| s.code as u16),
        _ => 200,
    };
    record.finish(status, &request_id);
    resp
}

async fn decide_check(
    state: &ExtAuthzState,
    req: &CheckRequest,
    note: &mut Note,
) -> (CheckResponse, String) {
    let names = &*state.names;
    let attributes = req.attributes.as_ref();
    let Some(http) = attributes
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        let id = request_id::mint();
        let id = id.to_str().unwrap_or("").to_owned();
        let reason = DenyReason::BadRequest("the CheckRequest has no HTTP request");
        note.deny(&reason);
        return (denied(&reason, &id, names), id);
    };
    let headers = Headers::of(http);
    let request_id = headers
        .single(names.request_id.as_str())
        .filter(|v| request_id::acceptable(v, &state.policy.prefixes))
        .and_then(|v| std::str::from_utf8(v).ok().map(str::to_owned))
        .unwrap_or_else(|| request_id::mint().to_str().unwrap_or("").to_owned());

    let (path, _query) = split_target(&http.path);
    let normalized = normalize(path, state.policy.path);
    let peer = attributes
        .and_then(|a| a.source.as_ref())
        .and_then(|s| s.address.as_ref())
        .and_then(|a| match a.address.as_ref()? {
            envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s) => {
                s.address.parse::<IpAddr>().ok()
            }
            _ => None,
        });
    let client = peer.and_then(|p| {
        client_ip(
            p,
            headers.all("x-forwarded-for").into_iter(),
            &state.settings.trusted_proxies,
        )
    });
    let auth = headers.all(names.credentials.authorization.as_str());
    let api_key = headers.all(names.credentials.api_key.as_str());
    let credential = extract(&auth, &api_key);
    let facts = RequestFacts {
        method: &http.method,
        path: normalized.as_ref().map_err(|e| *e),
        host: Some(http.host.as_str()).filter(|h| !h.is_empty()),
        client_ip: client,
        credential,
        referer: headers.single("referer"),
        origin: headers.single("origin"),
        idempotency_key: headers.single(names.idempotency_key.as_str()),
    };
    let snapshot = state.store.serving();
    let now = now_ms();
    let (verdict, key) = decide_attributed(
        snapshot.as_ref().and_then(|g| g.as_deref()),
        &state.policy,
        &facts,
        now,
    );
    if let Some(k) = key {
        note.key(&k.id_header, None);
    }
    let resp = match verdict {
        Verdict::Allow(allow) => match state.limits.check(&allow).await.map(Outcome::verdict) {
            Some(Err((reason, status))) => {
                note.key(&allow.key.id_header, Some(&allow.partner.id_header));
                note.deny(&reason);
                state.usage.denied(Some(allow.key), &reason);
                let mut resp = denied(&reason, &request_id, names);
                if let Some(HttpResponse::DeniedResponse(d)) = &mut resp.http_response {
                    d.headers.extend(limit_headers(&status));
                }
                resp
            }
            limit => {
                note.key(&allow.key.id_header, Some(&allow.partner.id_header));
                note.allow();
                state.usage.allowed(allow.key, now);
                let mut resp = allowed(&allow, credential, &headers, &request_id, names);
                if let (Some(Ok(status)), Some(HttpResponse::OkResponse(ok))) =
                    (limit, &mut resp.http_response)
                {
                    ok.response_headers_to_add.extend(limit_headers(&status));
                }
                resp
            }
        },
        Verdict::Deny(reason) => {
            note.deny(&reason);
            state.usage.denied(key, &reason);
            denied(&reason, &request_id, names)
        }
    };
    (resp, request_id)
}

/// `X-RateLimit-*` as header mutations (for the client's response).
fn limit_headers(status: &crate::ratelimit::Status) -> impl Iterator<Item = HeaderValueOption> {
    status
        .headers()
        .into_iter()
        .map(|(name, value)| set(name, text(&value)))
}

fn set(key: &str, value: &str) -> HeaderValueOption {
    #[allow(deprecated)] // `append` is read by Envoy versions before `append_action`.
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append: Some(BoolValue { value: false }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

fn text(v: &http::HeaderValue) -> &str {
    v.to_str().unwrap_or("")
}

fn allowed(
    allow: &Allow<'_>,
    credential: Credential<'_>,
    headers: &Headers<'_>,
    request_id: &str,
    names: &HeaderNames,
) -> CheckResponse {
    let (partner, key) = (allow.partner, allow.key);
    let mut set_headers = vec![
        set(names.partner_id.as_str(), &partner.id),
        set(names.key_id.as_str(), key.id()),
        set(names.key_environment.as_str(), &allow.environment.name),
        set(names.scopes.as_str(), text(&allow.scopes.header)),
        set(names.request_id.as_str(), request_id),
    ];
    if let Some(org) = &partner.org_id {
        set_headers.push(set(names.org_id.as_str(), org));
    }
    let mut remove: Vec<String> = Vec::new();
    if let Credential::Present { found, .. } = credential {
        if !names.forward_credentials {
            if found.authorization {
                remove.push(names.credentials.authorization.as_str().to_owned());
            }
            if found.api_key {
                remove.push(names.credentials.api_key.as_str().to_owned());
            }
        }
    }
    // Spoofed identity headers keygate does not overwrite (`x-org-id` of a partner without an
    // org, `_` spellings) are removed.
    for (name, _) in &headers.map {
        let lower = name.to_ascii_lowercase();
        let overwritten = set_headers
            .iter()
            .any(|h| h.header.as_ref().is_some_and(|h| h.key == lower));
        if is_identity_variant(&lower, names) && !overwritten && !remove.contains(&lower) {
            remove.push(lower);
        }
    }
    let metadata = Struct {
        fields: HashMap::from([
            ("partner_id".to_owned(), string(&partner.id)),
            (
                "org_id".to_owned(),
                partner.org_id.as_deref().map_or(null(), string),
            ),
            ("key_id".to_owned(), string(key.id())),
            (
                "key_environment".to_owned(),
                string(&allow.environment.name),
            ),
            (
                "scopes".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(
                        envoy_types::pb::google::protobuf::ListValue {
                            values: allow.scopes.iter().map(string).collect(),
                        },
                    )),
                },
            ),
        ]),
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: 0,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: set_headers,
            headers_to_remove: remove,
            response_headers_to_add: vec![set(names.request_id.as_str(), request_id)],
            ..Default::default()
        })),
        dynamic_metadata: Some(metadata),
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

fn null() -> Value {
    Value {
        kind: Some(Kind::NullValue(0)),
    }
}

/// gRPC status code for a denial's HTTP status (google.rpc.Code).
pub fn grpc_code(status: StatusCode) -> i32 {
    match status.as_u16() {
        400 => 3,        // INVALID_ARGUMENT
        401 => 16,       // UNAUTHENTICATED
        402 | 403 => 7,  // PERMISSION_DENIED
        429 => 8,        // RESOURCE_EXHAUSTED
        503 => 14,       // UNAVAILABLE
        502 | 504 => 14, // UNAVAILABLE
        _ => 7,
    }
}

fn denied(reason: &DenyReason, request_id: &str, names: &HeaderNames) -> CheckResponse {
    let status = reason.status();
    let mut headers: Vec<HeaderValueOption> = reason
        .headers()
        .iter()
        .map(|(k, v)| set(k.as_str(), text(v)))
        .collect();
    headers.push(set(names.request_id.as_str(), request_id));
    CheckResponse {
        status: Some(rpc::Status {
            code: grpc_code(status),
            message: reason.code().to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status.as_u16()),
            }),
            headers,
            body: String::from_utf8_lossy(&reason.body(request_id)).into_owned(),
        })),
        dynamic_metadata: None,
    }
}

#[cfg(test)]
mod tests;
