//! The ext_authz listener: HTTP/2 served with the `h2` crate itself, `Authorization/Check`
//! answered here and every other path (`grpc.health.v1.Health`, unknown methods) handed to
//! tonic's routes. A Check whose request has arrived whole is answered in the connection's own
//! task, where it was accepted ([`Connection`]); the streams accepted together are answered
//! together and their answers written in one go. hyper's server did the same work with a task,
//! a boxed future and its own request and response types per stream: a fifth of a Check's
//! instructions.
//!
//! A Check is a unary gRPC call, framed by hand: one message (a 0 byte, a 4-byte big-endian
//! length, the `CheckRequest`) in the request body, and the answer's message followed by
//! `grpc-status: 0` trailers. A call that is not well-framed gRPC gets a gRPC error in a
//! trailers-only answer (no `CheckResponse` can answer it): a content type other than
//! `application/grpc` (415), a compressed message (keygate accepts none), a body that ends
//! inside a message or holds more than one. A `grpc-timeout` is honoured: past it the call ends
//! with DEADLINE_EXCEEDED. A well-framed CheckRequest keygate will not hold or wait for (over
//! `ext_authz.max_request_bytes`, over `max_buffered_bytes` with the others arriving, not whole
//! within `read_timeout`) is denied with a `CheckResponse`, never a gRPC error: an error would
//! be an allow under `failure_mode_allow`.
//!
//! Connections get the same rules as on every front ([`crate::listen::Http2Front`]): counted
//! against `limits.max_connections`, told goodbye (GOAWAY) and then closed when unused, drained
//! on shutdown, TLS when configured.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::{check, fault_denial, guarded, refused, Buffers, ExtAuthzState};
use crate::deny::DenyReason;
use crate::listen::{until_goodbye, Activity, Busy, Http2Serve, Routed, Tracked, Unvectored};

/// The one path served here; everything else goes to tonic.
pub const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

/// gRPC's header names, made once (a name spelled as a `&str` is parsed and checked at each
/// use).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// gRPC status codes used here.
const DEADLINE_EXCEEDED: u8 = 4;
const UNIMPLEMENTED: u8 = 12;
const INTERNAL: u8 = 13;

pub async fn serve(
    listener: TcpListener,
    state: Arc<ExtAuthzState>,
    tls: Option<Arc<crate::tls::TlsServer>>,
    others: tonic::service::Routes,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let front = crate::listen::Http2Front {
        name: "ext_authz",
        connections: state.connections.clone(),
        tls,
        limits: state.resources,
        drain,
    };
    front
        .serve_with(listener, shutdown, Serving { state, others })
        .await;
}

/// Serves each connection with [`Connection`].
struct Serving {
    state: Arc<ExtAuthzState>,
    others: tonic::service::Routes,
}

impl Http2Serve for Serving {
    fn serve<I>(
        &self,
        io: I,
        activity: Arc<Activity>,
        peer: SocketAddr,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let others = Routed::new(self.others.clone(), activity.clone(), peer);
        let conn = Connection::new(io, self.state.clone(), others);
        async move {
            let _ = until_goodbye(conn, Connection::graceful_shutdown, &activity, stopping).await;
        }
    }
}

/// hyper's defaults for its HTTP/2 server, which served this front before (and serves the
/// others): 1 MiB windows, 16 KiB of header list, 400 KiB of send buffer per stream.
const WINDOW: u32 = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;

pin_project_lite::pin_project! {
    /// One connection's HTTP/2, served with h2 itself rather than hyper's server: a Check whose
    /// request has arrived whole is answered right where it is accepted, in the connection's own
    /// task, without a task, a boxed future and hyper's conversions of its own. Checks accepted
    /// together are answered together, then written in one go. Every other stream (health, an
    /// unknown method, a Check still arriving or waiting on Redis) runs in a task of its own,
    /// as hyper would run it.
    pub(super) struct Connection<I> {
        state: Arc<ExtAuthzState>,
        others: Routed,
        phase: Phase<I>,
        // Streams accepted since the connection last had nothing to read: answered together.
        accepted: Vec<(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>)>,
        // Say goodbye once the handshake is done.
        goodbye: bool,
        // Streams accepted so far: a connection that accepts none for a keep-alive interval is
        // idle, and gets a PING.
        streams: u64,
        keep_alive: Option<KeepAlive>,
    }
}

// One per connection, in its task: the serving phase unboxed, since it is polled on every turn.
#[allow(clippy::large_enum_variant)]
enum Phase<I> {
    Handshaking(Pin<Box<h2::server::Handshake<Unvectored<I>, Bytes>>>),
    Serving(h2::server::Connection<Unvectored<I>, Bytes>),
}

impl<I: AsyncRead + AsyncWrite + Unpin> Connection<I> {
    pub(super) fn new(io: I, state: Arc<ExtAuthzState>, others: Routed) -> Self {
        let r = &state.resources;
        let handshake = h2::server::Builder::new()
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_streams(r.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams(r.http2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(Some(r.http2_max_local_error_reset_streams))
            .handshake(Unvectored::new(io));
        let keep_alive = KeepAlive::new(r.http2_keep_alive_interval, r.http2_keep_alive_timeout);
        Connection {
            state,
            others,
            phase: Phase::Handshaking(Box::pin(handshake)),
            accepted: Vec::new(),
            goodbye: false,
            streams: 0,
            keep_alive,
        }
    }

    /// A GOAWAY: the streams in flight finish, the client opens no new one.
    pub(super) fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.project();
        match this.phase {
            Phase::Handshaking(_) => *this.goodbye = true,
            Phase::Serving(conn) => conn.graceful_shutdown(),
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Future for Connection<I> {
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let conn = loop {
            match this.phase {
                Phase::Handshaking(handshake) => {
                    let mut conn = ready!(handshake.as_mut().poll(cx))?;
                    if std::mem::take(this.goodbye) {
                        conn.graceful_shutdown();
                    }
                    if let Some(k) = this.keep_alive.as_mut() {
                        k.pings = conn.ping_pong();
                    }
                    *this.phase = Phase::Serving(conn);
                }
                Phase::Serving(conn) => break conn,
            }
        };
        loop {
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    *this.streams += 1;
                    this.accepted.push(stream);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending if this.accepted.is_empty() => break,
                // Everything that came is read: answer it, then poll again, which writes the
                // answers (and accepts whatever came meanwhile).
                Poll::Pending => {
                    for (req, respond) in this.accepted.drain(..) {
                        // A panic ends this stream (reset), not the connection and its others.
                        let answered =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                stream(this.state, this.others, req, respond, cx)
                            }));
                        if answered.is_err() {
                            tracing::error!("ext_authz: a stream panicked; reset");
                        }
                    }
                }
            }
        }
        // After the reads above: a PONG that came with them is seen before the deadline is.
        if let Some(k) = this.keep_alive.as_mut() {
            if let Poll::Ready(e) = k.poll(cx, *this.streams) {
                // As hyper does: the connection is dropped, not told goodbye (its peer is gone).
                tracing::debug!(error = %e, "ext_authz: keep-alive PING unanswered; closing");
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    }
}

/// Keep-alive PINGs, as hyper sends them: one once the connection has been idle (no stream
/// accepted) for `interval`; no answer within `timeout` closes the connection.
struct KeepAlive {
    pings: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Streams accepted when the timer was last armed.
    streams: u64,
    waiting: bool,
}

impl KeepAlive {
    fn new(interval: Duration, timeout: Duration) -> Option<Self> {
        (!interval.is_zero()).then(|| KeepAlive {
            pings: None,
            interval,
            timeout,
            timer: Box::pin(tokio::time::sleep(interval)),
            streams: 0,
            waiting: false,
        })
    }

    /// Ready with an error once the connection should close; `streams` is the connection's
    /// count of accepted streams.
    fn poll(&mut self, cx: &mut Context<'_>, streams: u64) -> Poll<h2::Error> {
        let Some(pings) = self.pings.as_mut() else {
            return Poll::Pending;
        };
        if self.waiting {
            match pings.poll_pong(cx) {
                Poll::Ready(Ok(_)) => {
                    self.waiting = false;
                    self.streams = streams;
                    let next = tokio::time::Instant::now() + self.interval;
                    self.timer.as_mut().reset(next);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(e),
                Poll::Pending => {}
            }
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.waiting {
                return Poll::Ready(h2::Error::from(h2::Reason::NO_ERROR));
            }
            let now = tokio::time::Instant::now();
            if streams != self.streams {
                // In use since the timer was armed: not idle.
                self.streams = streams;
                self.timer.as_mut().reset(now + self.interval);
                continue;
            }
            if let Err(e) = pings.send_ping(h2::Ping::opaque()) {
                return Poll::Ready(e);
            }
            self.waiting = true;
            self.timer.as_mut().reset(now + self.timeout);
            if let Poll::Ready(Ok(_)) = pings.poll_pong(cx) {
                self.waiting = false;
                self.timer.as_mut().reset(now + self.interval);
            }
        }
        Poll::Pending
    }
}

/// One accepted stream: a Check answered here when it can be, anything else in a task.
fn stream(
    state: &Arc<ExtAuthzState>,
    others: &Routed,
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    cx: &mut Context<'_>,
) {
    let busy = others.busy();
    if req.uri().path() != CHECK {
        let answer = others.answer(req.map(Received::new), busy, |body| Reply::Tonic { body });
        tokio::spawn(crate::clock::PerPoll::new(async move {
            let mut respond = respond;
            if let Some(Ok(answer)) = until_reset(&mut respond, answer).await {
                send(answer, respond).await;
            }
        }));
        return;
    }
    let (mut body, timeout) = match opened(req) {
        Ok(opened) => opened,
        Err(refused) => {
            reply(refused.answer(), respond, busy);
            return;
        }
    };
    // A Check waits on nothing but Redis: without it, one whose request is here is answered now.
    let mut message = Message::default();
    let here = !state.limits.waits()
        && loop {
            match body.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = body.flow_control().release_capacity(data.len());
                    if let Err(why) = message.push(data, &state.buffers) {
                        reply(stopped(state, why), respond, busy);
                        return;
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    reply(failure(UNREADABLE), respond, busy);
                    return;
                }
                Poll::Ready(None) => break true,
                Poll::Pending => break false,
            }
        };
    if here {
        let answer = match message.whole() {
            Ok((message, _held)) => {
                let check = std::pin::pin!(guarded(&state.names, check(state, &message[5..])));
                match check.poll(cx) {
                    Poll::Ready(message) => answered(message),
                    // Not without a remote rate limiter (`waits`): a fault, denied all the same.
                    Poll::Pending => {
                        tracing::error!("ext_authz: a Check waited without Redis; denied");
                        answered(fault_denial(&state.names))
                    }
                }
            }
            Err(why) => failure(why),
        };
        reply(answer, respond, busy);
        return;
    }
    // What came of it so far waits in the task: counted from now on.
    if let Err(why) = message.hold(&state.buffers) {
        reply(stopped(state, why), respond, busy);
        return;
    }
    // (Read in the poll that accepted the stream: the time it opened, for `read_timeout`.)
    let opened_at = crate::clock::now();
    let state = state.clone();
    tokio::spawn(crate::clock::PerPoll::new(async move {
        let mut respond = respond;
        let answer = checked(&state, message, Received::new(body), timeout, opened_at);
        if let Some(answer) = until_reset(&mut respond, answer).await {
            send(answer.map(|body| Tracked::new(body, busy)), respond).await;
        }
    }));
}

/// `work`'s output, or `None` once the client has reset the stream: the work is dropped then,
/// as hyper drops it (a Check is counted as 499, its Redis exchange abandoned), and the stream
/// stops holding a task that h2 no longer counts against `max_concurrent_streams`.
async fn until_reset<F: Future>(
    respond: &mut h2::server::SendResponse<Bytes>,
    work: F,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Send an answer made at once (a Check's, a refusal): its head, message and trailers queued on
/// the stream, written with the other answers of the connection's turn.
fn reply(answer: Response<Reply>, mut respond: h2::server::SendResponse<Bytes>, mut busy: Busy) {
    busy.answered();
    let (parts, body) = answer.into_parts();
    let head = Response::from_parts(parts, ());
    match body {
        Reply::Message { message, .. } => {
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            if let Some(message) = message {
                if send.send_data(message, false).is_err() {
                    return;
                }
                busy.frame_sent();
            }
            let _ = send.send_trailers(grpc_status_ok());
        }
        // Tonic's answers go through `send`; a trailers-only answer is its head alone.
        Reply::Empty | Reply::Tonic { .. } => {
            let _ = respond.send_response(head, true);
        }
    }
    busy.frame_sent();
}

/// Send an answer whose body may take its time (tonic's, a health Watch), as hyper sends one:
/// frames as they come, within the stream's flow-control window; a stream the client reset is
/// given up.
async fn send<B>(answer: Response<B>, mut respond: h2::server::SendResponse<Bytes>)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = answer.into_parts();
    let end = body.is_end_stream();
    let Ok(mut send) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    let mut body = std::pin::pin!(body);
    loop {
        // The next frame, unless the client resets the stream meanwhile.
        let next = std::future::poll_fn(|cx| {
            if send.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            body.as_mut().poll_frame(cx).map(Some)
        })
        .await;
        let Some(frame) = next else {
            return;
        };
        match frame {
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "ext_authz: an answer's body failed; stream reset");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if !data.is_empty() && !room(&mut send).await {
                        return;
                    }
                    if send.send_data(data, end).is_err() || end {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = send.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}

/// Waits for room in the stream's flow-control window for data in hand (false: the stream was
/// reset or closed). A byte is claimed, only once there is data to send (as hyper does: a claim
/// held by a stream with nothing to send, a quiet health Watch, could keep the connection's
/// window from the others); h2 raises the claim to the data's length when it is sent.
async fn room(send: &mut h2::SendStream<Bytes>) -> bool {
    send.reserve_capacity(1);
    std::future::poll_fn(|cx| {
        if send.poll_reset(cx).is_ready() {
            return Poll::Ready(false);
        }
        while send.capacity() == 0 {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                _ => return Poll::Ready(false),
            }
        }
        Poll::Ready(true)
    })
    .await
}

/// A request's body as h2 receives it, as an [`http_body::Body`]: each DATA frame's bytes handed
/// back to the flow-control window once taken.
pub(super) struct Received {
    stream: h2::RecvStream,
    data_done: bool,
}

impl Received {
    fn new(stream: h2::RecvStream) -> Self {
        Received {
            stream,
            data_done: false,
        }
    }
}

impl Body for Received {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// A gRPC error: its code and message.
#[derive(Debug, PartialEq, Eq)]
struct Failure(u8, &'static str);

/// Why reading a Check stops: a gRPC error (the call is not well-framed gRPC), or a
/// CheckRequest keygate will not hold or wait for, denied with a `CheckResponse`.
#[derive(Debug)]
enum Stop {
    Grpc(Failure),
    Denied(DenyReason),
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Self {
        Stop::Grpc(failure)
    }
}

/// The answer to a Check stopped before it was decided.
fn stopped(state: &ExtAuthzState, stop: Stop) -> Response<Reply> {
    match stop {
        Stop::Grpc(why) => failure(why),
        Stop::Denied(reason) => answered(refused(state, &reason)),
    }
}

/// Why a call of Check is refused before its body is read.
#[derive(Debug, Clone, Copy)]
enum Refused {
    NotPost,
    NotGrpc,
    Compressed,
}

impl Refused {
    fn answer(self) -> Response<Reply> {
        let (why, status) = match self {
            Refused::NotPost => (
                Failure(UNIMPLEMENTED, "gRPC calls are POST requests"),
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            Refused::NotGrpc => (
                Failure(INTERNAL, "invalid gRPC request content-type"),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            Refused::Compressed => (
                Failure(
                    UNIMPLEMENTED,
                    "compressed messages are not accepted (grpc-accept-encoding: identity)",
                ),
                StatusCode::OK,
            ),
        };
        let mut answer = failure(why);
        *answer.status_mut() = status;
        if let Refused::Compressed = self {
            answer
                .headers_mut()
                .insert(GRPC_ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        answer
    }
}

/// A call of Check's head: its body and `grpc-timeout`, or why it is refused.
fn opened<B>(req: Request<B>) -> Result<(B, Option<Duration>), Refused> {
    let (parts, body) = req.into_parts();
    if parts.method != Method::POST {
        return Err(Refused::NotPost);
    }
    if !is_grpc(parts.headers.get(http::header::CONTENT_TYPE)) {
        return Err(Refused::NotGrpc);
    }
    if parts
        .headers
        .get(GRPC_ENCODING)
        .is_some_and(|encoding| encoding != "identity")
    {
        return Err(Refused::Compressed);
    }
    let timeout = parts.headers.get(GRPC_TIMEOUT).and_then(grpc_timeout);
    Ok((body, timeout))
}

/// Answer one call of Check whose head was [`opened`] at `opened_at` and of whose body
/// `message` holds what came so far.
async fn checked(
    state: &ExtAuthzState,
    message: Message,
    mut body: Received,
    timeout: Option<Duration>,
    opened_at: tokio::time::Instant,
) -> Response<Reply> {
    let buffers = &state.buffers;
    let work = async {
        // (The rest of a CheckRequest arriving in pieces: read as it comes, within the time a
        // client has for it, whatever its grpc-timeout says.)
        let until = opened_at + buffers.limits.read_timeout;
        let read = tokio::time::timeout_at(until, message.read_rest(&mut body, buffers));
        let Ok(read) = read.await else {
            let why = DenyReason::BadRequest("the CheckRequest did not arrive in time");
            return Err(Stop::Denied(why));
        };
        // Held until the Check is answered: the bytes are in memory until then.
        let (message, _held) = read?;
        Ok::<_, Stop>(guarded(&state.names, check(state, &message[5..])).await)
    };
    let answer = match timeout {
        None => work.await,
        Some(timeout) => Deadline::new(work, timeout).await.unwrap_or(Err(Failure(
            DEADLINE_EXCEEDED,
            "Deadline Exceeded",
        )
        .into())),
    };
    match answer {
        Ok(message) => answered(message),
        Err(stop) => stopped(state, stop),
    }
}

/// The answer carrying a `CheckResponse` (an allow or a denial alike).
fn answered(message: Bytes) -> Response<Reply> {
    let mut answer = Response::new(Reply::Message {
        message: Some(message),
        trailers: true,
    });
    answer
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, grpc_content_type());
    answer
}

/// `grpc-status: 0`, the trailers of a call answered.
fn grpc_status_ok() -> HeaderMap {
    let mut t = HeaderMap::with_capacity(1);
    t.insert(GRPC_STATUS, HeaderValue::from_static("0"));
    t
}

fn grpc_content_type() -> HeaderValue {
    HeaderValue::from_static("application/grpc")
}

/// `application/grpc`, `application/grpc+proto`, with or without parameters.
fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let ct = ct.as_bytes();
    let Some(rest) = ct.strip_prefix(b"application/grpc") else {
        return false;
    };
    let subtype = rest.split(|&b| b == b';').next().unwrap_or(b"");
    subtype.is_empty() || subtype == b"+proto"
}

/// A `grpc-timeout` value (1 to 8 digits and a unit: H, M, S, m, u, n); an invalid one is
/// ignored, as tonic ignores it.
fn grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let v = v.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A body that could not be read.
const UNREADABLE: Failure = Failure(INTERNAL, "the request body could not be read");

/// The one message of a unary call's body, with its 5-byte prefix, as its DATA frames come.
/// Usually the whole body is one frame, taken as it is; a message split across frames is
/// gathered, its room counted in the front's [`Buffers`] before it is allocated.
#[derive(Default)]
struct Message {
    /// The only frame so far, or (once the message spans frames) none: all are in `gathered`.
    first: Option<Bytes>,
    gathered: Vec<u8>,
    /// The message's length with its prefix, once the prefix is in.
    whole: Option<usize>,
    /// `gathered`'s room, and `first` once it waits for the rest, as counted in the front's
    /// [`Buffers`].
    held: Option<Held>,
    /// The part of `held` that is `first`'s.
    first_held: usize,
}

/// Bytes counted in [`Buffers`], given back when dropped.
struct Held {
    buffers: Arc<Buffers>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.buffers.give_back(self.bytes);
    }
}

impl Message {
    fn push(&mut self, data: Bytes, buffers: &Arc<Buffers>) -> Result<(), Stop> {
        if data.is_empty() {
            return Ok(());
        }
        if self.first.is_none() && self.gathered.is_empty() {
            self.first = Some(data);
        } else {
            let first = self.first.take();
            // `first` is counted from here on as part of `gathered`'s room.
            if let Some(held) = &mut self.held {
                held.bytes -= self.first_held;
                buffers.give_back(std::mem::take(&mut self.first_held));
            }
            self.make_room(first.as_ref().map_or(0, Bytes::len) + data.len(), buffers)?;
            if let Some(f) = first {
                self.gathered.extend_from_slice(&f);
            }
            self.gathered.extend_from_slice(&data);
        }
        let received: &[u8] = self.first.as_deref().unwrap_or(&self.gathered);
        if self.whole.is_none() {
            self.whole = prefix(received, buffers.limits.max_request_bytes)?;
        }
        if self.whole.is_some_and(|n| received.len() > n) {
            return Err(Failure(INTERNAL, "more than one message in a unary call").into());
        }
        Ok(())
    }

    /// Room in `gathered` for `adding` more bytes: doubled as it fills (but never past the
    /// message's declared length), and counted in `buffers` before it is allocated. A Check
    /// that would take the front over `max_buffered_bytes` is denied.
    fn make_room(&mut self, adding: usize, buffers: &Arc<Buffers>) -> Result<(), Stop> {
        let (len, room) = (self.gathered.len(), self.gathered.capacity());
        let needed = len + adding;
        if needed <= room {
            return Ok(());
        }
        let mut grown = needed.max(room * 2);
        if let Some(whole) = self.whole {
            grown = grown.min(whole.max(needed));
        }
        self.charge(grown - room, buffers)?;
        self.gathered.reserve_exact(grown - len);
        Ok(())
    }

    /// Count what this message holds before its task waits for the rest of it: a first frame
    /// taken as it is (a message answered in the turn it came in is not counted).
    fn hold(&mut self, buffers: &Arc<Buffers>) -> Result<(), Stop> {
        let Some(n) = self.first.as_ref().map(Bytes::len) else {
            return Ok(());
        };
        self.charge(n, buffers)?;
        self.first_held = n;
        Ok(())
    }

    /// Count `n` more bytes held by this message in `buffers`, or deny the Check if the front
    /// holds the most it may.
    fn charge(&mut self, n: usize, buffers: &Arc<Buffers>) -> Result<(), Stop> {
        if !buffers.take(n) {
            tracing::warn!(
                held = buffers.held(),
                max_buffered_bytes = buffers.limits.max_buffered_bytes,
                "ext_authz: CheckRequests arriving in pieces hold the most allowed; a Check is denied"
            );
            return Err(Stop::Denied(DenyReason::Overloaded));
        }
        let held = self.held.get_or_insert_with(|| Held {
            buffers: buffers.clone(),
            bytes: 0,
        });
        held.bytes += n;
        Ok(())
    }

    /// The message, once the body has ended, and the room it holds in the front's buffers.
    fn whole(self) -> Result<(Bytes, Option<Held>), Failure> {
        let Message {
            first,
            gathered,
            whole,
            held,
            first_held: _,
        } = self;
        let received = first.unwrap_or_else(|| Bytes::from(gathered));
        match whole {
            Some(n) if received.len() == n => Ok((received, held)),
            _ if received.is_empty() => Err(Failure(INTERNAL, "missing request message")),
            _ => Err(Failure(INTERNAL, "the request body ends inside a message")),
        }
    }

    /// The rest of `body`, then the message.
    async fn read_rest(
        mut self,
        body: &mut Received,
        buffers: &Arc<Buffers>,
    ) -> Result<(Bytes, Option<Held>), Stop> {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| UNREADABLE)?;
            if let Ok(data) = frame.into_data() {
                self.push(data, buffers)?;
            } // else trailers
        }
        Ok(self.whole()?)
    }
}

/// The whole length of the message (prefix included) that `buf` begins, once its prefix is
/// there. One longer than `max` is denied at its prefix, unread.
fn prefix(buf: &[u8], max: usize) -> Result<Option<usize>, Stop> {
    if buf.len() < 5 {
        return Ok(None);
    }
    match buf[0] {
        0 => {}
        1 => {
            return Err(Failure(
                INTERNAL,
                "a compressed message, but no grpc-encoding was agreed",
            )
            .into())
        }
        _ => return Err(Failure(INTERNAL, "invalid message flags").into()),
    }
    let len = (&buf[1..5]).get_u32() as usize;
    if len > max {
        return Err(Stop::Denied(DenyReason::CheckTooLarge));
    }
    Ok(Some(5 + len))
}

/// A trailers-only answer: HTTP 200 and the gRPC status in the headers, no body.
fn failure(Failure(code, message): Failure) -> Response<Reply> {
    let mut answer = Response::new(Reply::Empty);
    let h = answer.headers_mut();
    h.insert(http::header::CONTENT_TYPE, grpc_content_type());
    h.insert(GRPC_STATUS, HeaderValue::from(u16::from(code)));
    // The messages here are plain ASCII without `%`: nothing to percent-encode.
    h.insert(GRPC_MESSAGE, HeaderValue::from_static(message));
    answer
}

pin_project_lite::pin_project! {
    /// `F`, or `None` once `timeout` has passed. The timer is armed only if `F` is not ready
    /// at its first poll: most Checks are.
    struct Deadline<F> {
        #[pin]
        work: F,
        start: tokio::time::Instant,
        timeout: Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F> Deadline<F> {
    fn new(work: F, timeout: Duration) -> Self {
        Deadline {
            work,
            start: crate::clock::now(),
            timeout,
            timer: None,
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.work.poll(cx) {
            return Poll::Ready(Some(v));
        }
        let (start, timeout) = (*this.start, *this.timeout);
        let timer = this.timer.get_or_insert_with(|| {
            let at = start.checked_add(timeout).unwrap_or(start + FAR);
            Box::pin(tokio::time::sleep_until(at))
        });
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A deadline too far out to represent is none.
const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);

pin_project_lite::pin_project! {
    /// An answer's body: a Check's message and its `grpc-status: 0` trailers, nothing (a
    /// trailers-only answer), or whatever tonic answers.
    #[project = ReplyProj]
    pub enum Reply {
        Message { message: Option<Bytes>, trailers: bool },
        Empty,
        Tonic { #[pin] body: tonic::body::Body },
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        match self.project() {
            ReplyProj::Message { message, trailers } => {
                if let Some(message) = message.take() {
                    return Poll::Ready(Some(Ok(Frame::data(message))));
                }
                if std::mem::take(trailers) {
                    return Poll::Ready(Some(Ok(Frame::trailers(grpc_status_ok()))));
                }
                Poll::Ready(None)
            }
            ReplyProj::Empty => Poll::Ready(None),
            ReplyProj::Tonic { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Message { message, trailers } => message.is_none() && !trailers,
            Reply::Empty => true,
            Reply::Tonic { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            // Not exact for a message: gRPC reads no content-length, so none is worked out.
            Reply::Message { .. } => SizeHint::default(),
            Reply::Empty => SizeHint::with_exact(0),
            Reply::Tonic { body } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_that_are_grpc() {
        let table = [
            (Some("application/grpc"), true),
            (Some("application/grpc+proto"), true),
            (Some("application/grpc; charset=utf-8"), true),
            (Some("application/grpc+json"), false),
            (Some("application/grpc-web"), false),
            (Some("application/json"), false),
            (Some("text/plain"), false),
            (None, false),
        ];
        for (ct, grpc) in table {
            let v = ct.map(HeaderValue::from_static);
            assert_eq!(is_grpc(v.as_ref()), grpc, "{ct:?}");
        }
    }

    #[test]
    fn grpc_timeouts() {
        let table = [
            ("1S", Some(Duration::from_secs(1))),
            ("250m", Some(Duration::from_millis(250))),
            ("2H", Some(Duration::from_secs(7200))),
            ("3M", Some(Duration::from_secs(180))),
            ("10u", Some(Duration::from_micros(10))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("123456789S", None),
            ("S", None),
            ("1s", None),
            ("-1S", None),
            ("", None),
        ];
        for (v, want) in table {
            assert_eq!(grpc_timeout(&HeaderValue::from_static(v)), want, "{v}");
        }
    }

    #[test]
    fn message_prefixes() {
        let max = 64 << 20;
        let grpc = |r: Result<Option<usize>, Stop>| match r {
            Err(Stop::Grpc(Failure(code, _))) => code,
            other => panic!("{other:?}"),
        };
        assert!(matches!(prefix(&[0, 0, 0], max), Ok(None)));
        assert!(matches!(prefix(&[0, 0, 0, 0, 7], max), Ok(Some(12))));
        assert!(matches!(prefix(&[0, 0, 0, 0, 0], max), Ok(Some(5))));
        assert_eq!(grpc(prefix(&[1, 0, 0, 0, 7], max)), INTERNAL);
        assert_eq!(grpc(prefix(&[2, 0, 0, 0, 7], max)), INTERNAL);
        let mut big = vec![0];
        big.extend_from_slice(&(max as u32 + 1).to_be_bytes());
        assert!(matches!(
            prefix(&big, max),
            Err(Stop::Denied(DenyReason::CheckTooLarge))
        ));
        assert!(matches!(prefix(&big, max + 1), Ok(Some(_))));
    }
}
