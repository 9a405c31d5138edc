//! The gRPC front: `envoy.service.auth.v3.Authorization/Check` (Envoy, Istio and other meshes
//! ask it) and `grpc.health.v1.Health` on one port. It turns a `CheckRequest` into
//! [`RequestFacts`], asks [`decide`](crate::decision::decide), and answers with a `CheckResponse`: OK with header
//! mutations, or a denial carrying the contract's HTTP status, JSON body and headers.
//!
//! A Check never gets a gRPC error for its decision, not for a missing snapshot, not for a
//! `CheckRequest` that cannot be decoded or lacks its HTTP request, not for a fault: an error is
//! what `failure_mode_allow` turns into an allow. Only a call that is not a well-framed gRPC
//! call at all (see [`grpc`]) gets one, since no `CheckResponse` can answer it.
//!
//! Check is served below tonic ([`grpc`]: h2's HTTP/2 and the gRPC framing by hand), and the
//! messages are read and written without prost's owned types ([`wire`]): with tonic, the gRPC
//! stack alone cost more than the whole budget of a Check. Health (and any other path) goes to
//! tonic's routes.

mod grpc;
pub mod wire;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use http::StatusCode;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::admit::{admit, Admitted, Refused};
use crate::client_ip::client_ip;
use crate::config::{FrontSettings, HeaderNames, Policy};
use crate::credential::{extract, Credential};
use crate::decision::{now_ms, Allow, RequestFacts};
use crate::deny::DenyReason;
use crate::path::{normalize, split_target};
use crate::request_id;
use crate::snapshot::SnapshotStore;
use crate::telemetry::{Note, Record};
use wire::{delimited_len, string_len, varint_len, CheckFacts, Writer};

/// The service name health checks ask about (besides the whole server, `""`).
pub const SERVICE: &str = "envoy.service.auth.v3.Authorization";

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
    /// CheckRequests' size and arrival (`ext_authz.max_request_bytes` and the like), and the
    /// bytes held for those still arriving.
    pub buffers: Arc<Buffers>,
}

/// What the ext_authz front holds of CheckRequests: how large one may be, how long it may take
/// to arrive, and the bytes held now for those arriving in pieces (a CheckRequest in one DATA
/// frame is taken as it is, and not counted).
#[derive(Debug)]
pub struct Buffers {
    pub limits: crate::config::CheckLimits,
    held: std::sync::atomic::AtomicUsize,
}

impl Buffers {
    pub fn new(limits: crate::config::CheckLimits) -> Self {
        Buffers {
            limits,
            held: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Count `n` more bytes held, unless that goes over `max_buffered_bytes`.
    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let max = self.limits.max_buffered_bytes;
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|&total| total <= max)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes held now for CheckRequests arriving in pieces.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Serve Check and Health on `listener` until `shutdown` resolves, then let calls in flight
/// finish for up to `drain`; over TLS (ALPN `h2`) when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ExtAuthzState>,
    tls: Option<Arc<crate::tls::TlsServer>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
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
    let others = tonic::service::Routes::new(health).prepare();
    grpc::serve(listener, state, tls, others, shutdown, drain).await;
    watcher.abort();
}

/// Run `check`; should it panic, answer a denial rather than let the stream die, which Envoy
/// would count as an authorization error (an allow under `failure_mode_allow`).
fn guarded<F: Future<Output = Bytes>>(names: &HeaderNames, check: F) -> Guarded<'_, F> {
    Guarded { check, names }
}

pin_project_lite::pin_project! {
    /// [`guarded`]'s future: `check` itself, not a copy of it in a future of its own (a Check's
    /// future is a few KiB; each layer of `async fn` around it would hold it again).
    struct Guarded<'n, F> {
        #[pin]
        check: F,
        names: &'n HeaderNames,
    }
}

impl<F: Future<Output = Bytes>> Future for Guarded<'_, F> {
    type Output = Bytes;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Bytes> {
        let this = self.project();
        let check = this.check;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check.poll(cx))) {
            Ok(answer) => answer,
            Err(_) => {
                tracing::error!("ext_authz: a Check panicked; denied with snapshot_unavailable");
                std::task::Poll::Ready(fault_denial(this.names))
            }
        }
    }
}

/// The answer to a Check that could not be decided (a fault): a denial, `snapshot_unavailable`
/// (fail closed: never a gRPC error, which `failure_mode_allow` would turn into an allow).
fn fault_denial(names: &HeaderNames) -> Bytes {
    let id = request_id::mint();
    denied(
        &DenyReason::SnapshotUnavailable,
        id.to_str().unwrap_or(""),
        names,
        None,
    )
}

/// The request's headers as Envoy sends them: the `headers` map (lower-case names, repeated
/// headers comma-joined) or, with `encode_raw_headers`, the `header_map` list.
struct Headers<'a, 'f>(&'f [(&'a [u8], &'a [u8])]);

impl<'a> Headers<'a, '_> {
    fn all<'s>(&'s self, name: &'s str) -> impl DoubleEndedIterator<Item = &'a [u8]> + 's {
        let name = name.as_bytes();
        self.0
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The value of the fields `is` picks, in any spelling (an empty one only with `empty`):
    /// empty when more than one came.
    fn one_of(&self, is: fn(&[u8]) -> bool, empty: bool) -> Option<&'a [u8]> {
        let mut all = self
            .0
            .iter()
            .filter(|(k, v)| is(k) && (empty || !v.trim_ascii().is_empty()))
            .map(|(_, v)| *v);
        let first = all.next()?;
        Some(if all.next().is_some() { b"" } else { first })
    }

    /// The non-empty value of the method-override fields ([`crate::headers::METHOD_OVERRIDES`]):
    /// a repeat (Envoy joins repeats with commas, which no method has) is empty.
    fn method_override(&self) -> Option<&'a [u8]> {
        self.one_of(crate::headers::is_method_override, false)
    }

    /// The value of the URL-override fields ([`crate::headers::URL_OVERRIDES`], an empty one
    /// included), as Envoy joins repeats ([`crate::headers::joined_url_override`]).
    fn url_override(&self) -> Option<&'a [u8]> {
        self.one_of(crate::headers::is_url_override, true)
            .map(crate::headers::joined_url_override)
    }

    /// The one value of `name`; a repeated header yields an empty value (matches nothing).
    fn single(&self, name: &str) -> Option<&'a [u8]> {
        let mut all = self.all(name);
        let first = all.next()?;
        Some(if all.next().is_some() { b"" } else { first })
    }
}

/// Decide one serialized `CheckRequest`, then count it and log the decision (also when Envoy
/// cancels first). The answer is a whole gRPC message: the 5-byte prefix and a serialized
/// `CheckResponse`, always one.
pub async fn check(state: &ExtAuthzState, message: &[u8]) -> Bytes {
    let facts = match wire::read(message) {
        Ok(facts) => facts,
        Err(wire::Malformed) => {
            return refused(
                state,
                &DenyReason::BadRequest("the CheckRequest could not be decoded"),
            )
        }
    };
    let mut record = Record::new(&state.shard);
    // The record by reference: an `async fn`'s argument is held twice in its future.
    decided(state, &facts, &mut record).await
}

/// A Check denied before its CheckRequest could be read (too large, too slow, undecodable):
/// a `CheckResponse` all the same, never a gRPC error; counted and logged like any denial.
pub(crate) fn refused(state: &ExtAuthzState, reason: &DenyReason) -> Bytes {
    let mut record = Record::new(&state.shard);
    let minted = request_id::mint();
    let id = minted.to_str().unwrap_or("");
    record.note.deny(reason);
    let answer = denied(reason, id, &state.names, None);
    record.finish(reason.status().as_u16(), id);
    answer
}

async fn decided(state: &ExtAuthzState, facts: &CheckFacts<'_>, record: &mut Record<'_>) -> Bytes {
    let minted;
    let headers = Headers(&facts.headers);
    let names = &*state.names;
    let request_id = match headers
        .single(names.request_id.as_str())
        .filter(|v| request_id::acceptable(v, &state.policy.prefixes))
        .and_then(|v| std::str::from_utf8(v).ok())
    {
        Some(id) => id,
        None => {
            minted = request_id::mint();
            minted.to_str().unwrap_or("")
        }
    };
    let (answer, status) = decide_check(state, facts, &headers, request_id, &mut record.note).await;
    record.finish(status, request_id);
    answer
}

async fn decide_check(
    state: &ExtAuthzState,
    req: &CheckFacts<'_>,
    headers: &Headers<'_, '_>,
    request_id: &str,
    note: &mut Note,
) -> (Bytes, u16) {
    let names = &*state.names;
    let deny = |reason: DenyReason, note: &mut Note| {
        note.deny(&reason);
        (
            denied(&reason, request_id, names, None),
            reason.status().as_u16(),
        )
    };
    if !req.http {
        return deny(
            DenyReason::BadRequest("the CheckRequest has no HTTP request"),
            note,
        );
    }
    let (path, _query) = split_target(req.path);
    // Envoy, nginx or Traefik forwards the path as it was sent, not as decided on.
    let normalized = normalize(path, state.policy.path.as_sent());
    let peer = req.peer.and_then(|a| a.parse::<IpAddr>().ok());
    let client = peer.and_then(|p| {
        client_ip(
            p,
            headers.all("x-forwarded-for"),
            &state.settings.trusted_proxies,
        )
    });
    let (mut auth, mut api_key) = (Values::new(), Values::new());
    let credential = extract(
        auth.of(headers, names.credentials.authorization.as_str()),
        api_key.of(headers, names.credentials.api_key.as_str()),
    );
    let facts = RequestFacts {
        method: req.method,
        path: normalized.as_ref().map_err(|e| *e),
        host: Some(req.host).filter(|h| !h.is_empty()),
        client_ip: client,
        credential,
        referer: headers.single("referer"),
        origin: headers.single("origin"),
        idempotency_key: headers.single(names.idempotency_key.as_str()),
        method_override: headers.method_override(),
        url_override: headers.url_override(),
    };
    let snapshot = state.store.serving();
    match admit(
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
        Ok(Admitted { allow, limit }) => {
            let limits = limit.map(|status| status.headers());
            let allowed = Allowed {
                allow: &allow,
                credential,
                headers,
                request_id,
                names,
                limits: limits.as_ref(),
            };
            (allowed.encode(), 200)
        }
        Err(Refused { reason, limit }) => {
            let limits = limit.map(|status| status.headers());
            let answer = denied(&reason, request_id, names, limits.as_ref());
            (answer, reason.status().as_u16())
        }
    }
}

/// A header's values, gathered without an allocation when there are few (there is one).
struct Values<'a> {
    few: [&'a [u8]; 4],
    many: Vec<&'a [u8]>,
}

impl<'a> Values<'a> {
    fn new() -> Self {
        Values {
            few: [b""; 4],
            many: Vec::new(),
        }
    }

    fn of(&mut self, headers: &Headers<'a, '_>, name: &str) -> &[&'a [u8]] {
        let mut n = 0;
        for v in headers.all(name) {
            if n < self.few.len() {
                self.few[n] = v;
            }
            n += 1;
        }
        if n <= self.few.len() {
            &self.few[..n]
        } else {
            self.many = headers.all(name).collect();
            &self.many
        }
    }
}

/// `X-RateLimit-*`, for the client's response.
type LimitHeaders = [(&'static str, http::HeaderValue); 3];

fn text(v: &http::HeaderValue) -> &str {
    v.to_str().unwrap_or("")
}

/// A buffer for a gRPC message of `len` bytes: the prefix (not compressed, the length) written.
/// A `Vec` rather than a `BytesMut`: a byte is pushed where `BytesMut` would check for room and
/// copy a slice of one, and a `Vec` filled to exactly its capacity becomes `Bytes` without
/// allocating.
fn message_buffer(len: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("a CheckResponse is far below 4 GiB"));
    buf
}

/// One header mutation, a `HeaderValueOption`: header = 1 (`HeaderValue`: key = 1, value = 2),
/// `append` = 2 set to false (read by Envoy versions before `append_action`), `append_action`
/// = 3 `OVERWRITE_IF_EXISTS_OR_ADD` (2).
#[derive(Clone, Copy)]
struct Set<'a>(&'a str, &'a str);

impl Set<'_> {
    /// `append` = 2: an empty `BoolValue` (false).
    const APPEND_FALSE: usize = 2;
    const OVERWRITE_IF_EXISTS_OR_ADD: u64 = 2;

    fn header_len(self) -> usize {
        string_len(1, self.0) + string_len(2, self.1)
    }

    fn len(self) -> usize {
        delimited_len(1, self.header_len())
            + Self::APPEND_FALSE
            + varint_len(3, Self::OVERWRITE_IF_EXISTS_OR_ADD)
    }

    /// As a field `tag` of the enclosing message.
    fn field_len(self, tag: u32) -> usize {
        delimited_len(tag, self.len())
    }

    fn write<B: BufMut>(self, tag: u32, w: &mut Writer<'_, B>) {
        let Set(name, value) = self;
        let len = self.len();
        if len < 0x80 && tag < 16 && !name.is_empty() {
            // Every key and length is one byte (the usual header): the framing in a few writes.
            let key = (tag << 3 | 2) as u8;
            let header = self.header_len() as u8;
            w.raw(&[key, len as u8, 0x0a, header, 0x0a, name.len() as u8]);
            w.raw(name.as_bytes());
            if !value.is_empty() {
                w.raw(&[0x12, value.len() as u8]);
                w.raw(value.as_bytes());
            }
            // append = 2: an empty `BoolValue`; append_action = 3: OVERWRITE_IF_EXISTS_OR_ADD.
            w.raw(&[0x12, 0x00, 0x18, Self::OVERWRITE_IF_EXISTS_OR_ADD as u8]);
            return;
        }
        w.delimited(tag, len);
        w.delimited(1, self.header_len());
        w.string(1, name);
        w.string(2, value);
        w.delimited(2, 0);
        w.varint(3, Self::OVERWRITE_IF_EXISTS_OR_ADD);
    }
}

/// The parts of an allow's `CheckResponse`.
struct Allowed<'r, 'a> {
    allow: &'r Allow<'a>,
    credential: Credential<'r>,
    headers: &'r Headers<'r, 'r>,
    request_id: &'r str,
    names: &'r HeaderNames,
    limits: Option<&'r LimitHeaders>,
}

impl Allowed<'_, '_> {
    /// A `CheckResponse`: status = 1 (OK: empty), ok_response = 3 (`OkHttpResponse`: headers =
    /// 2, headers_to_remove = 5, response_headers_to_add = 6), dynamic_metadata = 4.
    fn encode(&self) -> Bytes {
        let names = self.names;
        let (partner, key) = (self.allow.partner, self.allow.key);
        let mut set = [Set("", ""); 6];
        set[..5].copy_from_slice(&[
            Set(names.partner_id.as_str(), &partner.id),
            Set(names.key_id.as_str(), key.id()),
            Set(names.key_environment.as_str(), &self.allow.environment.name),
            Set(names.scopes.as_str(), text(&self.allow.scopes.header)),
            Set(names.request_id.as_str(), self.request_id),
        ]);
        let set = match &partner.org_id {
            Some(org) => {
                set[5] = Set(names.org_id.as_str(), org);
                &set[..]
            }
            None => &set[..5],
        };
        let remove = self.removed(set);
        let request_id = Set(names.request_id.as_str(), self.request_id);
        let limits = self
            .limits
            .map(|l| l.each_ref().map(|(k, v)| Set(k, text(v))));
        let to_add = std::iter::once(request_id).chain(limits.into_iter().flatten());

        let ok_len = set.iter().map(|s| s.field_len(2)).sum::<usize>()
            + remove
                .iter()
                .map(|r| delimited_len(5, r.len()))
                .sum::<usize>()
            + to_add.clone().map(|s| s.field_len(6)).sum::<usize>();
        let metadata = self.metadata_len();
        let len = delimited_len(1, 0) + delimited_len(3, ok_len) + delimited_len(4, metadata);

        let mut buf = message_buffer(len);
        let w = &mut Writer(&mut buf);
        w.delimited(1, 0);
        w.delimited(3, ok_len);
        for s in set {
            s.write(2, w);
        }
        for r in &remove {
            w.bytes(5, r.as_bytes());
        }
        for s in to_add {
            s.write(6, w);
        }
        w.delimited(4, metadata);
        self.write_metadata(w);
        debug_assert_eq!(buf.len(), 5 + len);
        Bytes::from(buf)
    }

    /// `headers_to_remove`: credential headers (unless forwarded), spoofed identity headers
    /// keygate does not overwrite (`x-org-id` of a partner without an org, `_` spellings), and
    /// credential headers spelled with `_` ([`is_spoofed`]).
    fn removed(&self, set: &[Set<'_>]) -> Vec<std::borrow::Cow<'_, str>> {
        crate::headers::to_remove(
            self.names,
            &self.credential,
            self.allow.partner.org_id.is_some(),
            self.headers.0.iter().map(|(name, _)| *name),
            |name| set.iter().any(|s| s.0 == name),
        )
    }

    /// The metadata `Struct`'s entries (fields = 1, a map of `Value`s: null = 1, string = 3,
    /// list = 6 whose values = 1): partner, org, key, environment and scopes.
    fn metadata_entries(&self) -> [(&str, Meta<'_>); 5] {
        let (partner, allow) = (self.allow.partner, self.allow);
        [
            ("partner_id", Meta::String(&partner.id)),
            (
                "org_id",
                partner.org_id.as_deref().map_or(Meta::Null, Meta::String),
            ),
            ("key_id", Meta::String(allow.key.id())),
            ("key_environment", Meta::String(&allow.environment.name)),
            ("scopes", Meta::List),
        ]
    }

    fn value_len(&self, value: Meta<'_>) -> usize {
        match value {
            Meta::Null => varint_len(1, 0),
            Meta::String(s) => delimited_len(3, s.len()),
            Meta::List => delimited_len(6, self.list_len()),
        }
    }

    fn list_len(&self) -> usize {
        self.allow
            .scopes
            .iter()
            .map(|s| delimited_len(1, delimited_len(3, s.len())))
            .sum()
    }

    fn entry_len(&self, name: &str, value: Meta<'_>) -> usize {
        delimited_len(1, name.len()) + delimited_len(2, self.value_len(value))
    }

    fn metadata_len(&self) -> usize {
        self.metadata_entries()
            .into_iter()
            .map(|(name, value)| delimited_len(1, self.entry_len(name, value)))
            .sum()
    }

    fn write_metadata<B: BufMut>(&self, w: &mut Writer<'_, B>) {
        for (name, value) in self.metadata_entries() {
            w.delimited(1, self.entry_len(name, value));
            w.bytes(1, name.as_bytes());
            w.delimited(2, self.value_len(value));
            match value {
                Meta::Null => w.varint(1, 0),
                Meta::String(s) => w.bytes(3, s.as_bytes()),
                Meta::List => {
                    w.delimited(6, self.list_len());
                    for scope in self.allow.scopes.iter() {
                        w.delimited(1, delimited_len(3, scope.len()));
                        w.bytes(3, scope.as_bytes());
                    }
                }
            }
        }
    }
}

/// A metadata value: a string, null (no org), or the list of scopes.
#[derive(Clone, Copy)]
enum Meta<'a> {
    Null,
    String(&'a str),
    List,
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

/// A denial's `CheckResponse`: status = 1 (`google.rpc.Status`: code = 1, message = 2, the
/// reason's code), denied_response = 2 (`DeniedHttpResponse`: status = 1 (`HttpStatus`: code =
/// 1), headers = 2, body = 3); the contract's headers, the request id and `limits`.
fn denied(
    reason: &DenyReason,
    request_id: &str,
    names: &HeaderNames,
    limits: Option<&LimitHeaders>,
) -> Bytes {
    let status = reason.status();
    let code = u64::from(grpc_code(status).unsigned_abs());
    let reason_headers = reason.headers();
    let headers = reason_headers
        .iter()
        .map(|(k, v)| Set(k.as_str(), text(v)))
        .chain(std::iter::once(Set(names.request_id.as_str(), request_id)))
        .chain(
            limits
                .into_iter()
                .flat_map(|l| l.iter().map(|(k, v)| Set(k, text(v)))),
        )
        .collect::<Vec<_>>();
    let body = reason.body(request_id);
    let body = String::from_utf8_lossy(&body);

    let rpc_status = varint_len(1, code) + string_len(2, reason.code());
    let http_status = varint_len(1, u64::from(status.as_u16()));
    let denied = delimited_len(1, http_status)
        + headers.iter().map(|s| s.field_len(2)).sum::<usize>()
        + string_len(3, &body);
    let len = delimited_len(1, rpc_status) + delimited_len(2, denied);

    let mut buf = message_buffer(len);
    let w = &mut Writer(&mut buf);
    w.delimited(1, rpc_status);
    w.varint(1, code);
    w.string(2, reason.code());
    w.delimited(2, denied);
    w.delimited(1, http_status);
    w.varint(1, u64::from(status.as_u16()));
    for s in headers {
        s.write(2, w);
    }
    w.string(3, &body);
    debug_assert_eq!(buf.len(), 5 + len);
    Bytes::from(buf)
}

#[cfg(test)]
mod tests;
