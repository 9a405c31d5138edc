//! The HTTP forward-auth front: one endpoint that Envoy's `http_service` ext_authz, nginx's
//! `auth_request` and Traefik's `ForwardAuth` ask whether a request may pass. It rebuilds the
//! original request's facts from what the caller sends, asks [`decide`](crate::decision::decide), and answers 200 with
//! identity headers or the contract's denial. It never answers 5xx for a decision (a 5xx is an
//! authorization *error* to Envoy, which `failure_mode_allow` could turn into an allow): a
//! missing snapshot is 403 `snapshot_unavailable`.
//!
//! Which request is being asked about:
//! - `/authz` exactly (nginx, Traefik): the original URI from `X-Original-URI` (nginx) or
//!   `X-Forwarded-Uri` (Traefik), the method from `X-Original-Method` or `X-Forwarded-Method`.
//!   Each caller overwrites its own header, but passes the client's copy of the *other* one, so
//!   when both are sent they must agree, or the answer is 400: a client cannot steer the
//!   decision to another path than the one its proxy will serve.
//! - `/authz/<original path>` (Envoy `http_service` with `path_prefix: /authz`): the path after
//!   the prefix, and the method of the check request itself.

use crate::proxy::add_limit_headers;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::admit::{admit, Admitted, Refused};
use crate::client_ip::{client_ip, is_trusted};
use crate::config::{FrontSettings, HeaderNames, Limits, Policy};
use crate::decision::{now_ms, RequestFacts};
use crate::deny::DenyReason;
use crate::headers::{joined_url_override, map_fields, request_id_str, set_identity, Read};
use crate::listen::{until_goodbye, Activity, Watched};
use crate::path::{normalize, split_target};
use crate::request_id;
use crate::snapshot::SnapshotStore;
use crate::telemetry::{Connections, Note, Record, Shard};

/// The path callers ask on.
pub const PREFIX: &str = "/authz";

/// Tells Envoy's `http_service` which headers to remove from the original request.
const HEADERS_TO_REMOVE: HeaderName = HeaderName::from_static("x-envoy-auth-headers-to-remove");

/// Asked on a check (nginx's `auth_request`): keep a denial to tell again. The denial then
/// names it in [`RETELL`].
const RETELL_ASK: HeaderName = HeaderName::from_static("x-keygate-retell-ask");

/// A kept denial's name, on the denial; sent back on a second ask (nginx's `error_page`
/// location, which must ask again for an answer to send the client), it gets the same answer
/// again, neither decided nor counted twice.
const RETELL: HeaderName = HeaderName::from_static("x-keygate-retell");

/// How long a kept denial can be told again, and how many are kept at most (the oldest go).
const RETELL_FOR: std::time::Duration = std::time::Duration::from_secs(10);
const RETELL_MAX: usize = 4096;

/// Denials kept to be told again once, by a random name (a caller cannot pick another's).
#[derive(Default)]
pub struct Retold(std::sync::Mutex<RetoldInner>);

/// A kept denial, and when it was kept.
type Answer = (std::time::Instant, StatusCode, HeaderMap, Full<Bytes>);

#[derive(Default)]
struct RetoldInner {
    answers: std::collections::HashMap<HeaderValue, Answer>,
    /// Names in the order kept, for eviction (some already told and gone from `answers`).
    order: std::collections::VecDeque<HeaderValue>,
}

impl Retold {
    /// Keep `resp` under a new name, returned.
    fn keep(&self, resp: &Response<Full<Bytes>>) -> HeaderValue {
        let name = request_id::mint();
        let now = std::time::Instant::now();
        let mut inner = self.0.lock().expect("lock poisoned");
        // The oldest go: told already, past RETELL_FOR, or past RETELL_MAX.
        while let Some(oldest) = inner.order.front() {
            let kept = inner.answers.get(oldest).map(|(at, ..)| *at);
            // (The count is of names, told ones included: that bounds both.)
            if kept.is_some_and(|at| {
                now.duration_since(at) < RETELL_FOR && inner.order.len() < RETELL_MAX
            }) {
                break;
            }
            if let Some(old) = inner.order.pop_front() {
                inner.answers.remove(&old);
            }
        }
        let answer = (
            now,
            resp.status(),
            resp.headers().clone(),
            resp.body().clone(),
        );
        inner.answers.insert(name.clone(), answer);
        inner.order.push_back(name.clone());
        name
    }

    /// The denial kept under `name`, once, while it may be told again.
    fn take(&self, name: &HeaderValue) -> Option<Response<Full<Bytes>>> {
        let mut inner = self.0.lock().expect("lock poisoned");
        let (at, status, headers, body) = inner.answers.remove(name)?;
        if at.elapsed() >= RETELL_FOR {
            return None;
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Some(resp)
    }
}

pub struct AuthzState {
    pub settings: FrontSettings,
    pub policy: Arc<Policy>,
    pub names: Arc<HeaderNames>,
    pub store: Arc<SnapshotStore>,
    pub limits: Arc<crate::ratelimit::RateLimits>,
    pub usage: Arc<crate::usage::Usage>,
    pub shard: Arc<Shard>,
    pub connections: Arc<Connections>,
    pub resources: Limits,
    pub retold: Retold,
}

/// Answer forward-auth checks on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AuthzState>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(crate::clock::Executor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.settings.header_read_timeout)
        .max_headers(200);
    let r = &state.resources;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(r.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(r.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(r.http2_max_local_error_reset_streams)
        .keep_alive_interval(Some(r.http2_keep_alive_interval))
        .keep_alive_timeout(r.http2_keep_alive_timeout);
    // True once the listener has stopped: every connection says goodbye (HTTP/2's GOAWAY;
    // HTTP/1.1 closes after the request in flight).
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    while let Some((stream, peer, open)) = crate::listen::next_connection(
        &listener,
        shutdown.as_mut(),
        "authz_http",
        &state.connections,
        &[],
    )
    .await
    {
        let activity = Activity::new();
        let stream = Watched::new(
            stream,
            activity.clone(),
            state.settings.header_read_timeout,
            state.resources.idle_timeout,
        );
        let state = state.clone();
        let busy_on = activity.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            let busy = busy_on.busy();
            async move {
                let resp = answered(&state, peer, &req).await;
                drop(busy);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let stopping = stopping.clone();
        tokio::spawn(crate::clock::PerPoll::new(async move {
            let _ = until_goodbye(conn, |c| c.graceful_shutdown(), &activity, stopping).await;
            drop(open);
        }));
    }
    drop(listener);
    stopping_tx.send_replace(true);
    let _ = tokio::time::timeout(drain, crate::listen::drained(&state.connections)).await;
}

/// The headers by which nginx (`X-Original-*`) and Traefik (`X-Forwarded-Uri`, `-Method`)
/// report the original request.
const ORIGINAL: [&str; 4] = [
    "x-original-uri",
    "x-original-method",
    "x-forwarded-uri",
    "x-forwarded-method",
];

/// Whether an ask reports its original request in fields (nginx's and Traefik's form), not in
/// its own method and path after `/authz` (Envoy's).
fn reported_original(req: &Request<Incoming>) -> bool {
    let path = req.uri().path();
    let h = req.headers();
    // `/authz//`, `/authz/.` and the like are `/authz/` too: an ask there that names an original
    // request is never a check of `/`. (Envoy's asks name none: their path is not normalized
    // here for nothing.)
    let at_root = || {
        path.strip_prefix(PREFIX).is_some_and(|rest| {
            rest.starts_with('/')
                && crate::path::normalize(rest, crate::path::PathOptions::default())
                    .is_ok_and(|p| p.as_str() == "/")
        })
    };
    path == PREFIX || (ORIGINAL.iter().any(|name| h.contains_key(*name)) && at_root())
}

/// The original request's method and target, as the caller reports them: nginx and Traefik
/// ask on `/authz` with the original in headers; Envoy's `http_service` asks with the original
/// method on `/authz` + the original path, which for the root is `/authz/`. A `/authz/` ask
/// naming an original request in headers is nginx's or Traefik's (a `proxy_pass` with a
/// trailing slash), never taken as a check of `/`. `reported`: [`reported_original`]'s answer
/// for `req`.
fn original(req: &Request<Incoming>, reported: bool) -> Result<Option<(&str, &str)>, &'static str> {
    let h = req.headers();
    if reported {
        let target = agreeing(h, "x-original-uri", "x-forwarded-uri")?.ok_or(
            "no original URI: nginx must set X-Original-URI, Traefik sends X-Forwarded-Uri",
        )?;
        let method = agreeing(h, "x-original-method", "x-forwarded-method")?.ok_or(
            "no original method: nginx must set X-Original-Method, Traefik sends X-Forwarded-Method",
        )?;
        return Ok(Some((method, target)));
    }
    match req.uri().path_and_query().map(|pq| pq.as_str()) {
        Some(pq) if pq.starts_with("/authz/") => {
            Ok(Some((req.method().as_str(), &pq[PREFIX.len()..])))
        }
        _ => Ok(None),
    }
}

/// The value of `a` and/or `b`: each sent at most once, and equal when both are sent.
fn agreeing<'a>(h: &'a HeaderMap, a: &str, b: &str) -> Result<Option<&'a str>, &'static str> {
    let one = |name: &str| -> Result<Option<&'a str>, &'static str> {
        let mut values = h.get_all(name).iter();
        let Some(v) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err("an original-request header is repeated");
        }
        v.to_str()
            .map(Some)
            .map_err(|_| "an original-request header is not ASCII")
    };
    match (one(a)?, one(b)?) {
        (Some(x), Some(y)) if x != y => {
            Err("X-Original-* and X-Forwarded-* name different requests")
        }
        (x, y) => Ok(x.or(y)),
    }
}

/// Answer one ask, then count it and log the decision (also when the caller leaves first).
async fn answered(
    state: &AuthzState,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    // A second ask for a denial already decided: the same answer, not decided or counted again.
    // Only for a trusted proxy (nginx next to keygate), which sets both headers itself.
    let retelling = is_trusted(peer.ip(), &state.settings.trusted_proxies);
    if let Some(told) = req
        .headers()
        .get(RETELL)
        .filter(|_| retelling)
        .and_then(|n| state.retold.take(n))
    {
        return told;
    }
    let mut record = Record::new(&state.shard);
    let mut resp = check(state, peer, req, &mut record.note).await;
    let request_id = resp
        .headers()
        .get(&state.names.request_id)
        .map_or("", request_id_str);
    record.finish(resp.status().as_u16(), request_id);
    if retelling && !resp.status().is_success() && req.headers().contains_key(RETELL_ASK) {
        let name = state.retold.keep(&resp);
        resp.headers_mut().insert(RETELL, name);
    }
    resp
}

async fn check(
    state: &AuthzState,
    peer: SocketAddr,
    req: &Request<Incoming>,
    note: &mut Note,
) -> Response<Full<Bytes>> {
    let names = &*state.names;
    let headers = req.headers();
    let read = Read::of(map_fields(headers), names);
    let request_id = request_id::accept(
        read.request_id.as_slice().iter().copied(),
        &state.policy.prefixes,
    )
    .unwrap_or_else(request_id::mint);
    note.request_id = Some(request_id.clone());
    let reported = reported_original(req);
    let (method, target) = match original(req, reported) {
        Ok(Some(o)) => o,
        Ok(None) => {
            note.deny(&DenyReason::NotFound);
            return deny(&DenyReason::NotFound, &request_id, names);
        }
        Err(why) => {
            let reason = DenyReason::BadRequest(why);
            note.deny(&reason);
            return deny(&reason, &request_id, names);
        }
    };
    let (path, _query) = split_target(target);
    // Envoy, nginx or Traefik forwards the path as it was sent, not as decided on.
    let normalized = normalize(path, state.policy.path.as_sent());
    let host = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))
        .and_then(|h| h.to_str().ok());
    let client = client_ip(
        peer.ip(),
        headers
            .get_all("x-forwarded-for")
            .iter()
            .map(HeaderValue::as_bytes),
        &state.settings.trusted_proxies,
    );
    let snapshot = state.store.serving();
    let mut facts = RequestFacts::from_read(method, &normalized, host, client, &read);
    // Envoy's HTTP service (the `/authz/<path>` form) sends a repeated field as one, its values
    // joined with commas. (nginx and Traefik send repeats apart, and their URLs may hold commas.)
    if !reported {
        facts.url_override = facts.url_override.map(joined_url_override);
    }
    let credential = facts.credential;
    let Admitted { allow, limit } = match admit(
        snapshot.as_ref().and_then(|g| g.as_deref()),
        &state.policy,
        &facts,
        now_ms(),
        &state.limits,
        &state.usage,
        note,
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(Refused { reason, limit }) => {
            let mut resp = deny(&reason, &request_id, names);
            if let Some(status) = &limit {
                add_limit_headers(resp.headers_mut(), status);
            }
            return resp;
        }
    };

    let mut resp = Response::new(Full::new(Bytes::new()));
    let h = resp.headers_mut();
    if let Some(status) = &limit {
        add_limit_headers(h, status);
    }
    set_identity(h, names, &allow);
    h.insert(names.request_id.clone(), request_id);
    // What Envoy must remove from the original request: the credential where it was found, any
    // spoofed identity header keygate is not overwriting (`x-org-id` of a partner without an
    // org, `_` and `.` spellings), and a credential header so spelled.
    let remove = crate::headers::to_remove(
        names,
        &credential,
        allow.partner.org_id.is_some(),
        headers.keys().map(|name| name.as_str().as_bytes()),
        |name| h.contains_key(name),
    );
    if !remove.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&remove.join(",")) {
            h.insert(HEADERS_TO_REMOVE, v);
        }
    }
    resp
}

/// A denial as the caller expects it: the contract's status, JSON and headers, except that a
/// 5xx (only `snapshot_unavailable` can happen here) is answered 403 so no caller reads it as
/// an authorization error.
fn deny(
    reason: &DenyReason,
    request_id: &HeaderValue,
    names: &HeaderNames,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(reason.body(request_id_str(request_id))));
    let status = reason.status();
    *resp.status_mut() = if status.is_server_error() {
        StatusCode::FORBIDDEN
    } else {
        status
    };
    *resp.headers_mut() = reason.headers();
    resp.headers_mut()
        .insert(names.request_id.clone(), request_id.clone());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(status: StatusCode) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"error\":{}}")));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        resp
    }

    /// A kept denial is told again once, by its name only, and at most RETELL_MAX are kept.
    #[test]
    fn a_denial_is_told_again_once_by_its_name() {
        let retold = Retold::default();
        let name = retold.keep(&denial(StatusCode::TOO_MANY_REQUESTS));
        assert!(retold.take(&HeaderValue::from_static("made-up")).is_none());
        let told = retold.take(&name).expect("kept");
        assert_eq!(told.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(told.headers()["www-authenticate"], "Bearer");
        assert!(retold.take(&name).is_none(), "told twice");
        let first = retold.keep(&denial(StatusCode::UNAUTHORIZED));
        for _ in 0..RETELL_MAX {
            retold.keep(&denial(StatusCode::UNAUTHORIZED));
        }
        assert!(
            retold.take(&first).is_none(),
            "the oldest goes past RETELL_MAX"
        );
        assert!(retold.0.lock().unwrap().answers.len() <= RETELL_MAX);
    }
}
