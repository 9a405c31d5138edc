//! The admin listener: `/healthz` (the process answers), `/readyz` (200 only while a snapshot
//! is in force and fresh), `/metrics` (Prometheus) and `/usage` (per-key counts). Loopback by
//! default; it exposes no key material.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::listen::{Activity, Watched};
use crate::snapshot::SnapshotStore;
use crate::telemetry::{Connections, Front, Telemetry};
use crate::usage::Usage;

/// What the admin endpoints read.
pub struct AdminState {
    pub store: Arc<SnapshotStore>,
    pub usage: Arc<Usage>,
    pub limits: Arc<crate::ratelimit::RateLimits>,
    pub telemetry: Arc<Telemetry>,
    /// True once shutdown begins: `/readyz` answers 503.
    pub closing: watch::Receiver<bool>,
    /// The fronts this keygate runs (their metrics are shown).
    pub fronts: Vec<Front>,
    /// `limits.max_connections` and `idle_timeout` apply here too.
    pub resources: crate::config::Limits,
    /// The TLS listeners, whose certificates' expiry is shown.
    pub tls: Vec<Arc<crate::tls::TlsServer>>,
    /// The hub, when this keygate serves `keygate.sync.v1` (`[sync_server]`).
    pub hub: Option<Arc<crate::sync::server::Hub>>,
}

/// Time a probe or scraper has for a request head (and for the first one after connecting).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a `/usage` document is served again before another is written.
const USAGE_FRESH: Duration = Duration::from_secs(1);

/// The last `/usage` document and when it was written. At tens of thousands of keys writing
/// one takes tens of milliseconds: it is written off the runtime's thread (which the fronts
/// share under `thread_per_core`, and a document written on it stalled every one of them),
/// one at a time, and at most once a second however often it is asked for.
#[derive(Default)]
struct UsageDocument(Arc<tokio::sync::Mutex<Option<(Instant, Bytes)>>>);

impl UsageDocument {
    async fn get(&self, usage: &Arc<Usage>) -> Response<Full<Bytes>> {
        let mut last = self.0.clone().lock_owned().await;
        if let Some((at, body)) = &*last {
            if at.elapsed() < USAGE_FRESH {
                return json_text(StatusCode::OK, body.clone());
            }
        }
        // The lock goes with the work: a caller that leaves while it runs (its future dropped)
        // frees neither the lock nor the document, which the next caller then gets.
        let usage = usage.clone();
        let written = tokio::task::spawn_blocking(move || {
            let body = Bytes::from(usage.report_json());
            *last = Some((Instant::now(), body.clone()));
            body
        });
        match written.await {
            Ok(body) => json_text(StatusCode::OK, body),
            Err(_) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "the usage document could not be written"}),
            ),
        }
    }
}

/// Serve the admin endpoints until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: impl Future<Output = ()>) {
    let state = Arc::new(state);
    let usage = Arc::new(UsageDocument::default());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let connections = Connections::new(state.resources.max_connections, 0);
    tokio::pin!(shutdown);
    while let Some((stream, _, open)) =
        crate::listen::next_connection(&listener, shutdown.as_mut(), "admin", &connections, &[])
            .await
    {
        let activity = Activity::new();
        let stream = Watched::new(
            stream,
            activity.clone(),
            HEADER_READ_TIMEOUT,
            state.resources.idle_timeout,
        );
        let (state, usage) = (state.clone(), usage.clone());
        let service = hyper::service::service_fn(move |req| {
            let (state, usage) = (state.clone(), usage.clone());
            let busy = activity.busy();
            async move {
                let resp = match route(&state, &req) {
                    Some(resp) => resp,
                    None => usage.get(&state.usage).await,
                };
                drop(busy);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = conn.await;
            drop(open);
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

/// The answer to `req`, or `None` for `/usage` (written apart, see [`UsageDocument`]).
fn route(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Some(json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method not allowed"}),
        ));
    }
    Some(match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => readiness(&state.store, *state.closing.borrow()),
        "/usage" => return None,
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(crate::metrics::render(
                &state.store,
                &state.limits,
                &state.telemetry,
                &state.fronts,
                &state.tls,
                state.hub.as_deref(),
            ))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            resp
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    })
}

/// 200 only while a snapshot is in force and fresh and keygate is not shutting down; the body
/// says which revision, how old its
/// last confirmation by the source is, and, when not ready, why.
fn readiness(store: &SnapshotStore, closing: bool) -> Response<Full<Bytes>> {
    let current = store.current();
    let unconfirmed = store.unconfirmed_for().map(|d| d.as_secs_f64());
    let loaded = store
        .loaded_at()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs_f64());
    let Some(s) = current.as_ref() else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "reason": "no snapshot in force"}),
        );
    };
    let mut body = serde_json::json!({
        "ready": true, "revision": s.revision, "keys": s.key_count(),
        "quarantined": s.quarantined.len(), "loaded_seconds_ago": loaded,
        "confirmed_seconds_ago": unconfirmed,
        "max_staleness_seconds": store.max_staleness().map(|d| d.as_secs_f64()),
    });
    let reason = if closing {
        "shutting down"
    } else if !store.is_fresh() {
        "the snapshot is older than snapshot.max_staleness"
    } else {
        return json(StatusCode::OK, body);
    };
    body["ready"] = false.into();
    body["reason"] = reason.into();
    json(StatusCode::SERVICE_UNAVAILABLE, body)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    json_text(status, Bytes::from(body.to_string()))
}

fn json_text(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
