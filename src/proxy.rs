//! The reverse-proxy front: HTTP/1.1 (keygate's own server, [`crate::server`]) and h2c (hyper)
//! on one port, or both over TLS (ALPN `h2` and `http/1.1`, optionally requiring client
//! certificates) when `proxy.tls_cert` is set. It turns a request into
//! [`RequestFacts`], asks [`decide`](crate::decision::decide), and applies the verdict: an allowed request is forwarded with
//! its normalized path, without hop-by-hop headers, spoofed identity headers or (by default) the
//! credential, and with keygate's identity headers; a denied one is answered here with the
//! contract's JSON. Bodies stream both ways and are never buffered whole. This module decides
//! nothing itself.

use crate::deadline::Deadline;
use crate::idempotency::{self, Begin, Stored, BACKGROUND_EXCHANGE};
use crate::ratelimit::RateLimits;
use crate::upstream::ReadAhead;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::admit::{admit, Admitted, Refused};
use crate::client_ip::{client_ip, is_trusted};
use crate::config::{HeaderNames, Limits, Policy, ProxySettings, UpstreamHost};
use crate::credential::Credential;
use crate::decision::{now_ms, RequestFacts};
use crate::deny::DenyReason;
use crate::headers::{
    folded_eq_any_case, joined_otherwise, request_id_str, set_identity_fields,
    strip_hop_and_identity, wants_upgrade, FieldEdit, FieldLookup, Read, RequestFields,
};
use crate::listen::{until_goodbye, Activity, Tracked, Watched};
use crate::path::normalize_uri;
use crate::request_id;
use crate::server::{self, ClientBody};
use crate::snapshot::SnapshotStore;
use crate::telemetry::{ConnectionGuard, Connections, Front, Note, Record, Shard, Telemetry};
use crate::tls::TlsServer;
use crate::upstream::{
    Added, ConnError, Outbound, PooledBody, Upstream, UpstreamError, UpstreamTls,
};

/// Response body: the upstream's, streamed, or one keygate made.
pub type ProxyBody = Either<PooledBody, Full<Bytes>>;

impl server::PassedFields for ProxyBody {
    fn passed(&self) -> Option<&crate::upstream::wire::Fields> {
        match self {
            Either::Left(upstream) => Some(upstream.fields()),
            Either::Right(_) => None,
        }
    }

    fn own_field(&self) -> Option<(&HeaderName, &HeaderValue)> {
        match self {
            Either::Left(upstream) => upstream.own_field(),
            Either::Right(_) => None,
        }
    }
}

/// Everything a proxy connection needs, shared by all of them.
pub struct ProxyState {
    pub settings: ProxySettings,
    pub policy: Arc<Policy>,
    pub names: Arc<HeaderNames>,
    pub store: Arc<SnapshotStore>,
    pub limits: Arc<RateLimits>,
    pub usage: Arc<crate::usage::Usage>,
    /// Idempotent replay; `None` when `idempotency.replay = false`.
    pub idempotency: Option<Arc<idempotency::Idempotency>>,
    /// This state's share of the counts (one per proxy thread).
    pub shard: Arc<Shard>,
    pub connections: Arc<Connections>,
    pub resources: Limits,
    /// True from the start of shutdown: HTTP/1.1 answers carry `Connection: close`, so clients
    /// move to other replicas during `shutdown.delay` instead of being cut after it.
    pub draining: Arc<AtomicBool>,
    /// TLS termination on the listener; shared by every proxy thread, reloaded in place.
    tls: Option<Arc<TlsServer>>,
    upstream: Arc<Upstream>,
}

impl ProxyState {
    // One argument per shared part; app.rs builds one state per proxy thread.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: ProxySettings,
        policy: Arc<Policy>,
        names: Arc<HeaderNames>,
        store: Arc<SnapshotStore>,
        limits: Arc<RateLimits>,
        usage: Arc<crate::usage::Usage>,
        idempotency: Option<Arc<idempotency::Idempotency>>,
        telemetry: &Telemetry,
        resources: Limits,
        draining: Arc<AtomicBool>,
    ) -> Self {
        let upstream = Upstream::new(
            connect_address(&settings),
            None,
            settings.connect_timeout,
            settings.pool_idle_per_host,
        );
        Self {
            settings,
            policy,
            names,
            store,
            limits,
            usage,
            idempotency,
            shard: telemetry.shard(Front::Proxy),
            connections: telemetry.connections(Front::Proxy),
            resources,
            draining,
            tls: None,
            upstream,
        }
    }

    /// Terminate TLS with `server`, and reach an `https://` upstream with `upstream`.
    pub fn with_tls(
        mut self,
        server: Option<Arc<TlsServer>>,
        upstream: Option<UpstreamTls>,
    ) -> Self {
        self.tls = server;
        if upstream.is_some() {
            self.upstream = Upstream::new(
                connect_address(&self.settings),
                upstream,
                self.settings.connect_timeout,
                self.settings.pool_idle_per_host,
            );
        }
        self
    }
}

/// `host:port` of the upstream, the port defaulting to the scheme's.
fn connect_address(settings: &ProxySettings) -> String {
    let a = &settings.upstream;
    let default = if settings.upstream_scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    format!("{}:{}", a.host(), a.port_u16().unwrap_or(default))
}

/// Accept connections on `listener` until `shutdown` resolves, then let open connections finish
/// their requests for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    // HTTP/1.1 is keygate's own server; HTTP/2 (h2c with prior knowledge, or ALPN `h2` over
    // TLS) is hyper's.
    let (p, r) = (&state.settings, &state.resources);
    let mut h2 = crate::listen::http2_builder(r);
    h2.max_header_list_size(p.max_header_bytes as u32);
    let h1 = server::Settings {
        header_read_timeout: p.header_read_timeout,
        limits: server::wire::HeadLimits {
            bytes: p.max_header_bytes,
            fields: p.max_headers,
        },
    };
    // True once the listener has stopped: HTTP/1.1 connections finish the request in flight
    // and close, HTTP/2 ones say goodbye (GOAWAY) and finish their streams.
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    while let Some((stream, peer, open)) = crate::listen::next_connection(
        &listener,
        shutdown.as_mut(),
        "proxy",
        &state.connections,
        &state.settings.trusted_proxies,
    )
    .await
    {
        let tls = state.tls.clone();
        let activity = Activity::new();
        // No request within header_read_timeout of the accept (a TLS handshake included), or
        // none in flight for limits.idle_timeout: the connection closes.
        let stream = Watched::new(
            stream,
            activity.clone(),
            state.settings.header_read_timeout,
            state.resources.idle_timeout,
        );
        let client = Arc::new(Peer::new(peer, tls.is_some(), activity, open));
        let h2 = h2.clone();
        let stopped = stopped_rx.clone();
        let state = state.clone();
        let handshake = state.settings.header_read_timeout;
        // The connection's task reads the clock at most once per poll (`clock`).
        tokio::spawn(crate::clock::PerPoll::new(async move {
            let (io, read, http2): (server::Transport, _, _) = match tls {
                None => {
                    // h2c with prior knowledge starts with HTTP/2's preface; anything else is
                    // HTTP/1.1.
                    let mut stream = stream;
                    let mut read = bytes::BytesMut::with_capacity(8192);
                    let http2 = loop {
                        match tokio::io::AsyncReadExt::read_buf(&mut stream, &mut read).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if !server::wire::may_be_h2(&read) {
                            break false;
                        }
                        if read.len() >= server::wire::H2_PREFACE.len() {
                            break true;
                        }
                    };
                    (Box::new(stream), read, http2)
                }
                Some(tls) => {
                    // The handshake runs in the connection's task, bounded like the request
                    // head it precedes, so a slow client holds up no one.
                    let stream = match tls.accept(stream, handshake).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "proxy: TLS handshake failed");
                            return;
                        }
                    };
                    // keygate offers h2 and http/1.1; a client that offers neither speaks
                    // HTTP/1.1.
                    let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    (Box::new(stream), bytes::BytesMut::new(), http2)
                }
            };
            if !http2 {
                let handler = H1 {
                    state,
                    peer: client,
                    upstream_deadline: None,
                };
                return server::serve(io, read, handler, h1, stopped).await;
            }
            let activity = client.activity.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let client = client.clone();
                // In flight until the response body has been sent (or dropped).
                let busy = client.activity.busy();
                async move {
                    let (mut parts, body) = req.into_parts();
                    let head = parts.method == http::Method::HEAD;
                    let fields = RequestFields::Map(std::mem::take(&mut parts.headers));
                    let req = Request::from_parts(parts, ClientBody::H2(body));
                    let due = crate::clock::now() + state.settings.upstream_timeout;
                    let mut deadline = Deadline::new(due);
                    let mut resp = handle(&state, &client, req, fields, &mut deadline).await;
                    // An answer to HEAD has no body: keygate's own refusals carry one, which
                    // HTTP/2 would send as DATA (a protocol error to the client). The
                    // upstream's answer to a HEAD has none already.
                    if head {
                        if let Either::Right(own) = resp.body_mut() {
                            *own = Full::new(Bytes::new());
                        }
                    }
                    Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, busy)))
                }
            });
            let io = crate::http1::Rewind::new(io, read.freeze());
            let conn = h2.serve_connection(TokioIo::new(io), service);
            let said = until_goodbye(conn, |c| c.graceful_shutdown(), &activity, stopped);
            if let Err(e) = said.await {
                tracing::debug!(error = %e, %peer, "proxy connection ended with an error");
            }
        }));
    }
    drop(listener);
    stopped_tx.send_replace(true);
    // HTTP/2 connections get GOAWAY and finish their streams, HTTP/1.1 ones their request in
    // flight; upgraded tunnels hold their connection's place: all get what is left of the
    // drain.
    let drained = tokio::time::timeout(drain, crate::listen::drained(&state.connections)).await;
    if drained.is_err() {
        tracing::warn!(
            open = state.connections.open(),
            "proxy: connections or tunnels still open after the drain timeout"
        );
    }
}

/// The proxy's HTTP/1.1 requests on one connection.
struct H1 {
    state: Arc<ProxyState>,
    peer: Arc<Peer>,
    /// The `upstream_timeout` of the request in flight: one timer for all the connection's
    /// requests (made at its first request, armed at the first that goes upstream).
    upstream_deadline: Option<Deadline>,
}

impl server::Handler for H1 {
    type Body = Tracked<ProxyBody>;

    fn call(
        &mut self,
        req: Request<server::RequestBody>,
        fields: crate::http1::Fields,
    ) -> impl Future<Output = Response<Tracked<ProxyBody>>> + Send {
        // In flight until the response body has been sent (or dropped).
        let busy = self.peer.activity.busy();
        async move {
            let req = req.map(ClientBody::H1);
            let fields = RequestFields::Head(fields);
            let timeout = self.state.settings.upstream_timeout;
            let deadline = self
                .upstream_deadline
                .get_or_insert_with(|| Deadline::new(crate::clock::now() + timeout));
            let resp = handle(&self.state, &self.peer, req, fields, deadline).await;
            resp.map(|body| Tracked::new(body, busy))
        }
    }

    fn refuse(&self, error: server::wire::HeadError) -> Response<Tracked<ProxyBody>> {
        let reason = match error {
            server::wire::HeadError::TooLarge => DenyReason::HeadTooLarge,
            server::wire::HeadError::Fragment => {
                DenyReason::InvalidPath(crate::path::PathError::Fragment)
            }
            server::wire::HeadError::ControlInTarget => {
                DenyReason::InvalidPath(crate::path::PathError::ControlCharacter)
            }
            server::wire::HeadError::Malformed(why) => DenyReason::BadRequest(why),
        };
        let mut record = Record::new(&self.state.shard);
        let request_id = request_id::mint();
        record.note.deny(&reason);
        let resp = deny(&reason, &request_id, &self.state.names, true);
        record.finish(resp.status().as_u16(), request_id_str(&request_id));
        let mut busy = self.peer.activity.busy();
        busy.answered();
        resp.map(|body| Tracked::new(body, busy))
    }

    fn broken(&self, own: Option<HeaderValue>) -> Response<Tracked<ProxyBody>> {
        // The upstream's answer broke off before a byte of it reached the client: a 502 can
        // still say so, with the request's id.
        let request_id = own.unwrap_or_else(request_id::mint);
        self.state.shard.broken_answer();
        tracing::warn!(
            request_id = request_id_str(&request_id),
            "the upstream's answer broke off before any of it was sent"
        );
        let resp = deny(
            &DenyReason::UpstreamUnavailable,
            &request_id,
            &self.state.names,
            true,
        );
        let mut busy = self.peer.activity.busy();
        busy.answered();
        resp.map(|body| Tracked::new(body, busy))
    }
}

/// Shapes keygate refuses to interpret, because a server behind it might read them differently.
fn smuggling_shape(req: &Request<ClientBody>, fields: &RequestFields) -> Option<&'static str> {
    // keygate's HTTP/1.1 server refuses these before a request is made (`http1::Framing`,
    // `server::wire::parse_request`); over HTTP/2 they are checked here.
    if let ClientBody::H2(_) = req.body() {
        if fields.values(&header::CONTENT_LENGTH).nth(1).is_some() {
            return Some("more than one Content-Length header");
        }
        if fields.contains(&header::TRANSFER_ENCODING) && fields.contains(&header::CONTENT_LENGTH) {
            return Some("both Transfer-Encoding and Content-Length");
        }
        if fields.values(&header::HOST).nth(1).is_some() {
            return Some("more than one Host header");
        }
    }
    // Such a body would go upstream chunked, and a server that reads no body on GET or HEAD
    // would take its bytes for another request, one keygate never checked.
    // Any case: keygate's routes take `get` for `GET`, and so do many servers.
    let method = req.method().as_str();
    if (method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD"))
        && !http_body::Body::is_end_stream(req.body())
        && http_body::Body::size_hint(req.body()).exact().is_none()
    {
        return Some("a GET or HEAD with a body of unknown length");
    }
    None
}

/// The TCP peer of a connection, with its `X-Forwarded-For` form built once per connection.
/// Shared by the connection's requests and by an upgraded tunnel, which outlives the
/// connection's HTTP part: the connection's place among `limits.max_connections` is held until
/// the last of them ends.
struct Peer {
    ip: IpAddr,
    header: HeaderValue,
    /// `X-Forwarded-Proto`: how the client reached keygate.
    proto: HeaderValue,
    activity: Arc<Activity>,
    _open: ConnectionGuard,
}

impl Peer {
    fn new(addr: SocketAddr, tls: bool, activity: Arc<Activity>, open: ConnectionGuard) -> Self {
        let ip = crate::snapshot::canonical_ip(addr.ip());
        Peer {
            ip,
            header: HeaderValue::from_str(&ip.to_string()).expect("an IP is a header value"),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
            activity,
            _open: open,
        }
    }
}

/// Answer one request, then count it and log the decision (also when the client leaves
/// before the answer). `req`'s own map is empty: its fields are `fields`.
async fn handle(
    state: &ProxyState,
    peer: &Arc<Peer>,
    req: Request<ClientBody>,
    fields: RequestFields,
    upstream_deadline: &mut Deadline,
) -> Response<ProxyBody> {
    let mut record = Record::new(&state.shard);
    let http1 = req.version() <= Version::HTTP_11;
    let mut resp = answer(
        state,
        peer,
        req,
        fields,
        upstream_deadline,
        &mut record.note,
    )
    .await;
    if !http1 {
        // HTTP/2 answers are hyper's to write: the upstream's fields go into the map.
        let (mut parts, mut body) = resp.into_parts();
        let merged = match &mut body {
            Either::Left(upstream) => upstream.merge_fields(&mut parts.headers),
            Either::Right(_) => Ok(()),
        };
        resp = match merged {
            Ok(()) => Response::from_parts(parts, body),
            Err(_) => {
                let id = record.note.request_id.clone();
                let id = id.unwrap_or_else(request_id::mint);
                deny(&DenyReason::UpstreamUnavailable, &id, &state.names, false)
            }
        };
    }
    if http1
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        && state.draining.load(Ordering::Relaxed)
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(Denied(i)) = resp.extensions().get::<Denied>() {
        record.note.denied = Some(*i);
    }
    // The answer carries the request id `answer` noted.
    record.finish_noted(resp.status().as_u16());
    resp
}

/// Marks a keygate-made denial with its position in [`crate::deny::CODES`].
#[derive(Clone, Copy)]
struct Denied(usize);

async fn answer(
    state: &ProxyState,
    peer: &Arc<Peer>,
    mut req: Request<ClientBody>,
    mut fields: RequestFields,
    upstream_deadline: &mut Deadline,
    note: &mut Note,
) -> Response<ProxyBody> {
    let names = &*state.names;
    let read = Read::of(fields.iter(), names);
    let request_id = request_id::accept(
        read.request_id.as_slice().iter().copied(),
        &state.policy.prefixes,
    )
    .unwrap_or_else(request_id::mint);
    note.request_id = Some(request_id.clone());

    // keygate's HTTP/1.1 server counts a head's fields as it reads them; hyper's HTTP/2 one
    // bounds only their size. (HTTP/2 clients may send each cookie as a field of its own: they
    // count as the one `Cookie` they make.)
    if let RequestFields::Map(map) = &fields {
        let max = state.settings.max_headers;
        if map.len() > max {
            let crumbs = map.get_all(header::COOKIE).iter().count();
            if map.len() - crumbs.saturating_sub(1) > max {
                return deny(&DenyReason::HeadTooLarge, &request_id, names, false);
            }
        }
    }
    if let Some(why) = smuggling_shape(&req, &fields) {
        return deny(&DenyReason::BadRequest(why), &request_id, names, true);
    }

    let normalized = normalize_uri(req.uri(), state.policy.path);
    // Only a trusted proxy's X-Forwarded-For is read (and only then looked up).
    let trusted = &state.settings.trusted_proxies;
    let client = if trusted.is_empty() {
        Some(peer.ip)
    } else {
        const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
        client_ip(peer.ip, fields.values(&XFF), trusted)
    };
    let host = host_of(&req, &fields);
    // RFC 9110 §4.2.4: user information in the authority is an error, not a host to pass on.
    if host.as_ref().is_some_and(|h| h.as_bytes().contains(&b'@')) {
        let why = "the request's host carries user information (user@host)";
        return deny(&DenyReason::BadRequest(why), &request_id, names, true);
    }
    let snapshot = state.store.serving();
    let facts = RequestFacts::from_read(
        req.method().as_str(),
        &normalized,
        host.as_ref().and_then(|h| h.to_str().ok()),
        client,
        &read,
    );
    let credential = facts.credential;
    let now = now_ms();
    let Admitted { allow, limit } = match admit(
        snapshot.as_ref().and_then(|g| g.as_deref()),
        &state.policy,
        &facts,
        now,
        &state.limits,
        &state.usage,
        note,
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(Refused { reason, limit }) => {
            let close = matches!(reason, DenyReason::InvalidPath(_));
            let mut resp = deny(&reason, &request_id, names, close);
            if let Some(status) = &limit {
                add_limit_headers(resp.headers_mut(), status);
            }
            return resp;
        }
    };
    let found = match credential {
        Credential::Present { found, .. } => found,
        _ => unreachable!("an allow always has a credential"),
    };
    // Idempotent replay: a mutating request with an Idempotency-Key.
    let replay = match (&state.idempotency, facts.idempotency_key) {
        (Some(store), Some(k))
            if !k.is_empty() && crate::decision::is_mutating(req.method().as_str()) =>
        {
            Some((
                store.clone(),
                k.to_owned(),
                Box::<str>::from(allow.key.id()),
            ))
        }
        _ => None,
    };
    let path = normalized.expect("an allow always has a normalized path");

    // Build the upstream request in place: same method, body and (cleaned) headers.
    // Only an HTTP/1.1 request with an `Upgrade` field may switch: the server marks it with the
    // client side of the switch.
    // A request its Idempotency-Key guards is not switched (its `Upgrade` goes as any hop-by-hop
    // field does): a tunnel's outcome cannot be kept, and the key would guard nothing.
    let on_upgrade = req
        .extensions_mut()
        .remove::<server::OnUpgrade>()
        .filter(|_| replay.is_none() && wants_upgrade(&fields));
    let upgrade = on_upgrade.is_some();
    let (parts, body) = req.into_parts();
    let Some(target) = upstream_target(&parts.uri, path.as_str()) else {
        return deny(
            &DenyReason::BadRequest("the request target cannot be forwarded"),
            &request_id,
            names,
            true,
        );
    };
    let h = &mut fields;
    strip_hop_and_identity(h, Some(names), upgrade);
    if !names.forward_credentials {
        if found.authorization {
            h.remove(&names.credentials.authorization);
        }
        if found.api_key {
            h.remove(&names.credentials.api_key);
        }
    }
    // keygate's own fields go after the client's, written as they are: none of their names is
    // left among the client's (identity and request id were stripped above, forwarding fields
    // in `set_forwarded`, Host below when keygate writes its own).
    let mut added = Added::new();
    if upgrade {
        added.push(&header::CONNECTION, &HeaderValue::from_static("upgrade"));
    }
    set_forwarded(
        h,
        &mut added,
        (peer, client),
        host.as_ref(),
        &state.settings.trusted_proxies,
    );
    // HTTP/1.1 needs a Host: the upstream's when configured so; else the client's, the
    // authority of an absolute-form target, or (HTTP/1.0 without one) the upstream's.
    if let UpstreamHost::Upstream(own) = &state.settings.upstream_host {
        h.remove(&header::HOST);
        added.push(&header::HOST, own);
    } else if parts.uri.authority().is_some() || !h.contains(&header::HOST) {
        let host = host.unwrap_or_else(|| {
            HeaderValue::from_str(state.settings.upstream.as_str())
                .expect("an authority is a header value")
        });
        h.remove(&header::HOST);
        added.push(&header::HOST, &host);
    }
    set_identity_fields(&mut added, names, &allow);
    added.push(&names.request_id, &request_id);
    drop(snapshot);
    let outbound = Outbound {
        method: parts.method,
        target,
        fields,
        added,
        upgrade,
    };
    let timeout = state.settings.upstream_timeout;

    let sent = match replay {
        None => {
            // upstream_timeout counts from the head, and again from each piece of a body that
            // streams up: a long upload is not cut off while it moves.
            let progress = (!http_body::Body::is_end_stream(&body))
                .then(|| Arc::new(crate::upstream::Progress::new()));
            upstream_deadline.set(crate::clock::now() + timeout);
            let mut send = std::pin::pin!(state.upstream.send(&outbound, body, progress.clone()));
            loop {
                match upstream_deadline.bound(send.as_mut()).await {
                    Ok(sent) => break Ok(sent),
                    Err(expired) => match progress.as_deref().map(|p| p.due(timeout)) {
                        Some((due, _)) if due > crate::clock::fresh() => {
                            upstream_deadline.set(due);
                        }
                        // The client stopped sending its body: its fault, and the connection
                        // cannot carry another request.
                        Some((_, true)) => {
                            let why = "the request body did not arrive in time";
                            return deny(&DenyReason::BadRequest(why), &request_id, names, true);
                        }
                        _ => break Err(expired),
                    },
                }
            }
        }
        // Rare, and its state is several times the plain exchange's: kept on the heap so that
        // every request's future does not carry room for it.
        Some(replay) => {
            let replayable = answer_replayable(state, replay, outbound, body, request_id, limit);
            return Box::pin(replayable).await;
        }
    };
    let resp = match sent {
        Err(_) => return deny(&DenyReason::UpstreamTimeout, &request_id, names, false),
        // The client's own body broke off (malformed chunks, cut short): its fault, not the
        // upstream's, and the connection cannot carry another request.
        Ok(Err(UpstreamError::Exchange(ConnError::ClientBody(e)))) => {
            tracing::debug!(error = %e, request_id = request_id_str(&request_id), "the request body failed");
            let why = match e {
                server::ClientBodyError::H1(server::BodyError::Malformed) => {
                    "the chunked request body is malformed"
                }
                _ => "the request body ended before it was complete",
            };
            return deny(&DenyReason::BadRequest(why), &request_id, names, true);
        }
        Ok(Err(e)) => {
            let reason = upstream_error(&e);
            tracing::warn!(error = %e, request_id = request_id_str(&request_id), "upstream request failed");
            return deny(&reason, &request_id, names, false);
        }
        Ok(Ok(resp)) => resp,
    };

    let mut resp = match (on_upgrade, resp.status()) {
        (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) => {
            // The upstream agreed to switch: the client's connection and the upstream's become
            // one byte stream. The tunnel keeps the connection's place until it ends, and is
            // closed as idle only after a whole limits.idle_timeout with no byte either way.
            let (mut parts, mut body) = resp.into_parts();
            if body.merge_fields(&mut parts.headers).is_err() {
                return deny(&DenyReason::UpstreamUnavailable, &request_id, names, false);
            }
            let upstream_side = body.into_tunnel();
            let mut busy = peer.activity.busy();
            busy.answered();
            let tunnel = (peer.clone(), busy);
            tokio::spawn(async move {
                let _tunnel = tunnel;
                match (client_side.await, upstream_side) {
                    (Ok(client), Some(mut upstream)) => {
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    (Err(e), _) => tracing::debug!(error = %e, "upgrade failed"),
                    (Ok(_), None) => {}
                }
            });
            let mut resp = Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
            resp.headers_mut()
                .insert(names.request_id.clone(), request_id);
            resp
        }
        // The upstream client has left out the answer's hop-by-hop fields already.
        _ => resp.map(|mut body| {
            body.keep_out_of_trailers(state.names.clone());
            body.set_own_field(names.request_id.clone(), request_id);
            Either::Left(body)
        }),
    };
    if let Some(status) = &limit {
        add_limit_headers(resp.headers_mut(), status);
    }
    resp
}

/// [`answer`] for a mutating request with an `Idempotency-Key`: its body read whole, then the
/// exchange made once (or a stored answer replayed).
async fn answer_replayable(
    state: &ProxyState,
    (store, idempotency_key, key_id): (Arc<idempotency::Idempotency>, Vec<u8>, Box<str>),
    outbound: Outbound,
    body: ClientBody,
    request_id: HeaderValue,
    limit: Option<crate::ratelimit::Status>,
) -> Response<ProxyBody> {
    let names = &*state.names;
    let timeout = state.settings.upstream_timeout;
    // Every answer of a request that got as far as the rate limit says where it stands.
    let limited = |mut resp: Response<ProxyBody>| {
        if let Some(status) = &limit {
            add_limit_headers(resp.headers_mut(), status);
        }
        resp
    };
    let refuse =
        |reason: &DenyReason, close: bool| limited(deny(reason, &request_id, names, close));
    // The key is kept with the answer (twice: by key and in the eviction order): a long one
    // would make every record that much larger, and is no one's retry scheme.
    if idempotency_key.len() > idempotency::MAX_KEY_BYTES {
        let reason = DenyReason::BadRequest("the Idempotency-Key is longer than 255 bytes");
        return refuse(&reason, false);
    }
    // Bodies of idempotent requests are held in memory: only so many at once.
    let Some(admitted) = store.admit(&key_id) else {
        return refuse(&DenyReason::IdempotencyUnavailable, false);
    };
    // Read whole within upstream_timeout, not per piece: the body holds one of the store's
    // admissions and up to max_request_bytes of memory while it comes, and a trickle must not
    // keep them (a body of that size arrives well within it at any usable rate).
    let read = tokio::time::timeout(
        timeout,
        read_request_body(
            body,
            outbound.fields.values(&header::CONTENT_LENGTH).next(),
            store.limits.max_request_bytes,
        ),
    )
    .await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(reason)) => return refuse(&reason, true),
        Err(_) => {
            let reason = DenyReason::BadRequest("the request body did not arrive in time");
            return refuse(&reason, true);
        }
    };
    let fingerprint =
        idempotency::fingerprint(outbound.method.as_str(), outbound.target.as_str(), &bytes);
    match store.begin(&key_id, &idempotency_key, fingerprint).await {
        Begin::Unavailable => refuse(&DenyReason::IdempotencyUnavailable, false),
        Begin::Replay(stored) => replayed(&stored, request_id, names, limit.as_ref()),
        Begin::InUse => refuse(&DenyReason::IdempotencyKeyInUse, false),
        Begin::Reused => refuse(&DenyReason::IdempotencyKeyReused, false),
        Begin::Proceed(pending) => {
            let max = store.limits.max_response_bytes;
            let resp = match exchange_once(
                state.upstream.clone(),
                (outbound, bytes),
                (pending, admitted),
                max,
                timeout,
                state.names.clone(),
            )
            .await
            {
                Ok(resp) => resp,
                Err(reason) => {
                    if !matches!(reason, DenyReason::UpstreamTimeout) {
                        tracing::warn!(
                            request_id = request_id_str(&request_id),
                            code = reason.code(),
                            "upstream request failed"
                        );
                    }
                    return refuse(&reason, false);
                }
            };
            // An answer that streams on carries the request id as its own field, as answer()'s
            // do: should its body break before any of it goes out, the 502 still has it.
            let (mut parts, mut body) = resp.into_parts();
            match &mut body {
                Either::Left(streamed) => {
                    parts.headers.remove(&names.request_id);
                    streamed.set_own_field(names.request_id.clone(), request_id);
                }
                Either::Right(_) => {
                    parts.headers.insert(names.request_id.clone(), request_id);
                }
            }
            limited(Response::from_parts(parts, body))
        }
    }
}

/// Read a request body whole, refusing one over `max` bytes (by its Content-Length at once).
async fn read_request_body(
    body: ClientBody,
    declared: Option<&[u8]>,
    max: usize,
) -> Result<Bytes, DenyReason> {
    use http_body_util::BodyExt;
    let declared = declared.and_then(crate::http1::parse_length);
    if declared.is_some_and(|n| n > max as u64) {
        return Err(DenyReason::RequestTooLarge);
    }
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(DenyReason::RequestTooLarge),
        Err(_) => Err(DenyReason::BadRequest("the request body could not be read")),
    }
}

/// How long an answer of unknown length is read ahead to be kept for retries before it is let
/// stream to the client unkept.
const UNKNOWN_LENGTH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Send an idempotent request once and record its outcome. The exchange runs in its own task:
/// when the answer is slower than `timeout` the client gets 504, but the request (which may
/// already be executing upstream) is not abandoned; its answer is recorded when it comes, so a
/// retry is replayed it (or told 409 until then) instead of running the mutation twice.
async fn exchange_once(
    upstream: Arc<Upstream>,
    (outbound, body): (Outbound, Bytes),
    (pending, admitted): (idempotency::Pending, idempotency::Admission),
    max: usize,
    timeout: std::time::Duration,
    names: Arc<HeaderNames>,
) -> Result<Response<ProxyBody>, DenyReason> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // Held until the answer is recorded (or given up on), with the bodies it covers.
        let _admitted = admitted;
        let send = upstream.send_buffered(&outbound, body);
        let outcome = match tokio::time::timeout(BACKGROUND_EXCHANGE, send).await {
            Err(_) => Err(DenyReason::UpstreamTimeout),
            // Never answered: the key is freed (dropping `pending`) so a retry runs.
            Ok(Err(e)) => Err(upstream_error(&e)),
            Ok(Ok(resp)) => remember(pending, resp, max, BACKGROUND_EXCHANGE, names).await,
        };
        let _ = tx.send(outcome);
    });
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(DenyReason::UpstreamUnavailable),
        Err(_) => Err(DenyReason::UpstreamTimeout),
    }
}

/// Keep the upstream's answer for retries with the same Idempotency-Key, when it can be: not a
/// 5xx, and its body within `max` bytes (read ahead, within `timeout`). Otherwise the answer
/// streams on as usual and the key is freed.
async fn remember(
    pending: idempotency::Pending,
    resp: Response<PooledBody>,
    max: usize,
    timeout: std::time::Duration,
    names: Arc<HeaderNames>,
) -> Result<Response<ProxyBody>, DenyReason> {
    // The stored answer needs its fields in the map. One that streams on has its trailers
    // cleaned as any answer's.
    let (mut parts, mut body) = resp.into_parts();
    body.keep_out_of_trailers(names);
    body.merge_fields(&mut parts.headers)
        .map_err(|_| DenyReason::UpstreamUnavailable)?;
    // The body's length as its framing gives it: a `Content-Length`, or none at all (a 204,
    // a 304, an answer to HEAD), which no header says.
    let declared = http_body::Body::size_hint(&body).exact();
    if !idempotency::keepable(parts.status) || declared.is_some_and(|n| n > max as u64) {
        // Not kept: a retry runs again once this answer is over, not beside it.
        body.hold(pending);
        return Ok(Response::from_parts(parts, Either::Left(body)));
    }
    // One of unknown length (chunked, or until the connection closes) is kept when it ends
    // within `max` bytes and a moment: an API's chunked answer does. A stream (server-sent
    // events) goes on to the client as it comes once the moment has passed, unkept.
    let until = declared
        .is_none()
        .then(|| tokio::time::Instant::now() + UNKNOWN_LENGTH_WAIT);
    match tokio::time::timeout(timeout, body.read_ahead(max, until)).await {
        Ok(Ok(ReadAhead::Whole(bytes))) => {
            // A replay gets the date it is sent on, not the first answer's.
            let mut headers = parts.headers.clone();
            headers.remove(header::DATE);
            pending
                .complete(Stored {
                    status: parts.status,
                    headers,
                    body: bytes.clone(),
                })
                .await;
            Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))))
        }
        Ok(Ok(ReadAhead::NotWhole(mut body))) => {
            body.hold(pending);
            Ok(Response::from_parts(parts, Either::Left(body)))
        }
        Ok(Err(_)) => Err(DenyReason::UpstreamUnavailable),
        Err(_) => Err(DenyReason::UpstreamTimeout),
    }
}

/// A stored answer, sent again for a retry: the upstream's status, headers and body, marked
/// `Idempotent-Replayed: true`, with this request's id.
fn replayed(
    stored: &Stored,
    request_id: HeaderValue,
    names: &HeaderNames,
    limit: Option<&crate::ratelimit::Status>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(stored.body.clone())));
    *resp.status_mut() = stored.status;
    *resp.headers_mut() = stored.headers.clone();
    let h = resp.headers_mut();
    h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    h.insert(names.request_id.clone(), request_id);
    if let Some(status) = limit {
        add_limit_headers(h, status);
    }
    resp
}

/// `X-RateLimit-*`, replacing any the upstream sent (keygate's limit is the one enforced here).
pub fn add_limit_headers(h: &mut http::HeaderMap, status: &crate::ratelimit::Status) {
    for (name, value) in status.headers() {
        h.insert(name, value);
    }
}

/// The upstream request target in origin form (RFC 9112 §3.2.1): the normalized path and the
/// query as received. The pool connects to the configured upstream, so no authority goes in the
/// request line. When normalization changed nothing (the common case) the received bytes are
/// reused without a copy. (An empty path, as in `:path: ?x=1` or `http://host?x=1`, is "/" to
/// `PathAndQuery::path`, but its bytes are not: those are rebuilt.)
fn upstream_target(received: &Uri, path: &str) -> Option<PathAndQuery> {
    match received.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') && pq.path() == path => Some(pq.clone()),
        _ => {
            let text = match received.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            PathAndQuery::from_maybe_shared(Bytes::from(text)).ok()
        }
    }
}

/// The host the client addressed: the URI's authority (HTTP/2, absolute-form) or `Host`.
fn host_of(req: &Request<ClientBody>, fields: &RequestFields) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => fields.get_value(&header::HOST),
    }
}

/// `X-Forwarded-For/-Proto/-Host`: extended when the peer is a trusted proxy, replaced otherwise
/// (an untrusted client's claims about the chain are not passed on). What keygate sets goes
/// into `added`, and the map keeps none of those names.
///
/// From a trusted proxy, a chain keygate cannot pass on as it came (a value that is not visible
/// ASCII; or none left, when the proxy listed `X-Forwarded-For` in `Connection`) goes on as the
/// client the decision was made for (`client`, from that chain) and the peer: the upstream is
/// never told of another client than the one keygate decided on.
fn set_forwarded(
    h: &mut RequestFields,
    added: &mut Added,
    (peer, client): (&Peer, Option<IpAddr>),
    host: Option<&HeaderValue>,
    trusted: &[ipnet::IpNet],
) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
    let trusted = is_trusted(peer.ip, trusted);
    // `_` and `.` spellings are what CGI-style upstreams read as HTTP_X_FORWARDED_FOR too: never
    // pass them on, from anyone. From an untrusted client, none of the chain's fields go on (RFC
    // 7239 `Forwarded` included): keygate says what it saw.
    h.remove_where(|name| {
        let forwarding = [&XFF, &XFP, &XFH, &header::FORWARDED];
        (!trusted || joined_otherwise(name))
            && forwarding
                .iter()
                .any(|n| folded_eq_any_case(n.as_str().as_bytes(), name))
    });
    if !trusted {
        added.push(&XFF, &peer.header);
        added.push(&XFP, &peer.proto);
        if let Some(host) = host {
            added.push(&XFH, host);
        }
        return;
    }
    // The chain so far, if every value can be made a header value again (visible ASCII).
    let prior: Option<Vec<&str>> = h
        .values(&XFF)
        .map(|v| {
            v.iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
                .then(|| std::str::from_utf8(v).ok())
                .flatten()
        })
        .collect();
    let chain = match prior {
        Some(prior) if !prior.is_empty() => {
            HeaderValue::from_str(&format!("{}, {}", prior.join(", "), peer.ip)).ok()
        }
        _ => None,
    };
    let chain = chain.unwrap_or_else(|| match client.filter(|c| *c != peer.ip) {
        Some(client) => HeaderValue::from_str(&format!("{client}, {}", peer.ip))
            .unwrap_or_else(|_| peer.header.clone()),
        None => peer.header.clone(),
    });
    h.remove(&XFF);
    added.push(&XFF, &chain);
    if !h.contains(&XFP) {
        added.push(&XFP, &peer.proto);
    }
    if !h.contains(&XFH) {
        if let Some(host) = host {
            added.push(&XFH, host);
        }
    }
}

fn upstream_error(e: &UpstreamError) -> DenyReason {
    match e {
        UpstreamError::ConnectTimeout => DenyReason::UpstreamTimeout,
        UpstreamError::Connect(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            DenyReason::UpstreamTimeout
        }
        UpstreamError::Connect(_) | UpstreamError::Tls(_) | UpstreamError::Exchange(_) => {
            DenyReason::UpstreamUnavailable
        }
    }
}

/// A keygate-made answer: status, contract headers, JSON body and the request id.
pub fn deny(
    reason: &DenyReason,
    request_id: &HeaderValue,
    names: &HeaderNames,
    close: bool,
) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(
        reason.body(request_id_str(request_id)),
    )));
    *resp.status_mut() = reason.status();
    resp.extensions_mut().insert(Denied(reason.code_index()));
    let h = resp.headers_mut();
    *h = reason.headers();
    h.insert(names.request_id.clone(), request_id.clone());
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
