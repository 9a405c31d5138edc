//! The ext_authz listener: hyper's HTTP/2 server, with `Authorization/Check` answered here and
//! every other path (`grpc.health.v1.Health`, unknown methods) handed to tonic's routes.
//!
//! A Check is a unary gRPC call, framed by hand: one message (a 0 byte, a 4-byte big-endian
//! length, the `CheckRequest`) in the request body, and the answer's message followed by
//! `grpc-status: 0` trailers. A call that is not well-framed gRPC gets a gRPC error in a
//! trailers-only answer (no `CheckResponse` can answer it): a content type other than
//! `application/grpc` (415), a compressed message (keygate accepts none), a message over
//! [`MAX_CHECK_BYTES`], a body that ends inside a message or holds more than one. A
//! `grpc-timeout` is honoured: past it the call ends with DEADLINE_EXCEEDED.
//!
//! Connections get the same rules as on every front: counted against `limits.max_connections`,
//! told goodbye (GOAWAY) and then closed when unused ([`Watched`], [`until_goodbye`]), drained
//! on shutdown, TLS when configured.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use super::{check, guarded, ExtAuthzState, MAX_CHECK_BYTES};
use crate::listen::{until_goodbye, Activity, Tracked, Watched, FIRST_REQUEST};

/// The one path served here; everything else goes to tonic.
pub const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

/// A client has this long to complete its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// gRPC status codes used here.
const DEADLINE_EXCEEDED: u8 = 4;
const RESOURCE_EXHAUSTED: u8 = 8;
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
    let builder = Arc::new(http2_builder(&state.resources));
    let idle = state.resources.idle_timeout;
    // True once the listener has stopped: every connection says goodbye (GOAWAY) and finishes
    // its Checks in flight.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    while let Some((stream, peer, open)) = crate::listen::next_connection(
        &listener,
        shutdown.as_mut(),
        "ext_authz",
        &state.connections,
        &[],
    )
    .await
    {
        // The first request is due within FIRST_REQUEST of the accept, a handshake included.
        let activity = Activity::new();
        let stream = Watched::new(stream, activity.clone(), FIRST_REQUEST, idle);
        let service = Connection::new(state.clone(), others.clone(), activity.clone());
        let (stopping, builder, tls) = (stopping.clone(), builder.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => {
                    let conn = http2(&builder, stream, service);
                    let _ =
                        until_goodbye(conn, |c| c.graceful_shutdown(), &activity, stopping).await;
                }
                Some(tls) => match tls.accept(stream, HANDSHAKE).await {
                    Ok(stream) => {
                        let conn = http2(&builder, stream, service);
                        let _ = until_goodbye(conn, |c| c.graceful_shutdown(), &activity, stopping)
                            .await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, front = "ext_authz", "TLS handshake failed");
                    }
                },
            }
            drop(open);
        });
    }
    drop(listener);
    stopping_tx.send_replace(true);
    let _ = tokio::time::timeout(drain, crate::listen::drained(&state.connections)).await;
}

pub(super) type Http2 = hyper::server::conn::http2::Builder<TokioExecutor>;

pub(super) fn http2_builder(r: &crate::config::Limits) -> Http2 {
    let mut builder = Http2::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(r.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(r.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(r.http2_max_local_error_reset_streams)
        .keep_alive_interval(r.http2_keep_alive_interval)
        .keep_alive_timeout(r.http2_keep_alive_timeout);
    builder
}

/// One connection's HTTP/2, served on `I` (the TCP or TLS stream).
pub(super) type Http2Connection<I> =
    hyper::server::conn::http2::Connection<TokioIo<Unvectored<I>>, Connection, TokioExecutor>;

/// One connection's HTTP/2 (after its TLS handshake, if any), served until it closes.
pub(super) fn http2<I>(builder: &Http2, io: I, service: Connection) -> Http2Connection<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    builder.serve_connection(TokioIo::new(Unvectored(io)), service)
}

/// A connection's IO, shown to h2 as one without vectored writes, so that an answer is copied
/// into h2's write buffer and the answers of all the streams ready together go out in one
/// write.
///
/// h2 copies a DATA frame into its buffer only if its payload is under a threshold: 256 bytes
/// when the IO can write vectored, 1 KiB when it cannot. A larger payload is held aside, and h2
/// flushes before it buffers the next frame: with vectored IO, a `CheckResponse` (an allow is
/// about 500 bytes) cost one `writev` per Check, where tonic's small answers were batched ten
/// to a write. Below 1 KiB, a copy costs far less than a system call.
pub(super) struct Unvectored<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for Unvectored<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Without `poll_write_vectored` (the default writes the first buffer) and
/// `is_write_vectored` (false by default).
impl<S: AsyncWrite + Unpin> AsyncWrite for Unvectored<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// One connection's service: each request is in flight on the connection's [`Activity`] until
/// its answer has been sent (a health Watch stream included).
#[derive(Clone)]
pub(super) struct Connection {
    state: Arc<ExtAuthzState>,
    others: tonic::service::Routes,
    activity: Arc<Activity>,
}

impl Connection {
    pub(super) fn new(
        state: Arc<ExtAuthzState>,
        others: tonic::service::Routes,
        activity: Arc<Activity>,
    ) -> Self {
        Connection {
            state,
            others,
            activity,
        }
    }
}

type Answer = Response<Tracked<Reply>>;

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = Answer;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = self.activity.busy();
        if req.uri().path() == CHECK {
            let state = self.state.clone();
            Box::pin(async move {
                let answer = checked(&state, req).await;
                Ok(answer.map(|body| Tracked::new(body, busy)))
            })
        } else {
            let mut others = self.others.clone();
            Box::pin(async move {
                type Tonic = tonic::service::Routes;
                std::future::poll_fn(|cx| {
                    <Tonic as tower_service::Service<Request<Incoming>>>::poll_ready(
                        &mut others,
                        cx,
                    )
                })
                .await?;
                let answer = tower_service::Service::call(&mut others, req).await?;
                Ok(answer.map(|body| Tracked::new(Reply::Tonic { body }, busy)))
            })
        }
    }
}

/// A gRPC error: its code and message.
#[derive(Debug, PartialEq, Eq)]
struct Failure(u8, &'static str);

/// Answer one call of Check.
async fn checked(state: &ExtAuthzState, req: Request<Incoming>) -> Response<Reply> {
    let (parts, mut body) = req.into_parts();
    if parts.method != Method::POST {
        let mut answer = failure(Failure(UNIMPLEMENTED, "gRPC calls are POST requests"));
        *answer.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return answer;
    }
    if !is_grpc(parts.headers.get(http::header::CONTENT_TYPE)) {
        let mut answer = failure(Failure(INTERNAL, "invalid gRPC request content-type"));
        *answer.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return answer;
    }
    if let Some(encoding) = parts.headers.get("grpc-encoding") {
        if encoding != "identity" {
            let mut answer = failure(Failure(
                UNIMPLEMENTED,
                "compressed messages are not accepted (grpc-accept-encoding: identity)",
            ));
            answer
                .headers_mut()
                .insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
            return answer;
        }
    }
    let timeout = parts.headers.get("grpc-timeout").and_then(grpc_timeout);
    let work = async {
        let message = read_message(&mut body).await?;
        Ok::<_, Failure>(guarded(&state.names, check(state, &message[5..])).await)
    };
    let answer = match timeout {
        None => work.await,
        Some(timeout) => Deadline::new(work, timeout)
            .await
            .unwrap_or(Err(Failure(DEADLINE_EXCEEDED, "Deadline Exceeded"))),
    };
    match answer {
        Ok(message) => {
            let mut answer = Response::new(Reply::Message {
                message: Some(message),
                trailers: true,
            });
            answer
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, grpc_content_type());
            answer
        }
        Err(failure) => self::failure(failure),
    }
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

/// The one message of a unary call's body, with its 5-byte prefix. Usually the whole body is
/// one DATA frame, taken as it is; a message split across frames is gathered.
async fn read_message(body: &mut Incoming) -> Result<Bytes, Failure> {
    const MORE: Failure = Failure(INTERNAL, "more than one message in a unary call");
    // The only frame so far, or (once the message spans frames) all of them gathered.
    let mut first: Option<Bytes> = None;
    let mut gathered = BytesMut::new();
    // The message's length with its prefix, once the prefix is in.
    let mut whole: Option<usize> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Failure(INTERNAL, "the request body could not be read"))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if data.is_empty() {
            continue;
        }
        if first.is_none() && gathered.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                gathered.extend_from_slice(&f);
            }
            gathered.extend_from_slice(&data);
        }
        let received: &[u8] = first.as_deref().unwrap_or(&gathered);
        if whole.is_none() {
            whole = prefix(received)?;
        }
        if whole.is_some_and(|n| received.len() > n) {
            return Err(MORE);
        }
    }
    let received = first.unwrap_or_else(|| gathered.freeze());
    match whole {
        Some(n) if received.len() == n => Ok(received),
        _ if received.is_empty() => Err(Failure(INTERNAL, "missing request message")),
        _ => Err(Failure(INTERNAL, "the request body ends inside a message")),
    }
}

/// The whole length of the message (prefix included) that `buf` begins, once its prefix is
/// there.
fn prefix(buf: &[u8]) -> Result<Option<usize>, Failure> {
    if buf.len() < 5 {
        return Ok(None);
    }
    match buf[0] {
        0 => {}
        1 => {
            return Err(Failure(
                INTERNAL,
                "a compressed message, but no grpc-encoding was agreed",
            ))
        }
        _ => return Err(Failure(INTERNAL, "invalid message flags")),
    }
    let len = (&buf[1..5]).get_u32() as usize;
    if len > MAX_CHECK_BYTES {
        return Err(Failure(
            RESOURCE_EXHAUSTED,
            "the CheckRequest is larger than keygate accepts (64 MiB)",
        ));
    }
    Ok(Some(5 + len))
}

/// A trailers-only answer: HTTP 200 and the gRPC status in the headers, no body.
fn failure(Failure(code, message): Failure) -> Response<Reply> {
    let mut answer = Response::new(Reply::Empty);
    let h = answer.headers_mut();
    h.insert(http::header::CONTENT_TYPE, grpc_content_type());
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    // The messages here are plain ASCII without `%`: nothing to percent-encode.
    h.insert("grpc-message", HeaderValue::from_static(message));
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
            start: tokio::time::Instant::now(),
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
                    let mut t = HeaderMap::with_capacity(1);
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
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
            // Not exact for a message: hyper would add a content-length, which gRPC does not use.
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
        assert_eq!(prefix(&[0, 0, 0]), Ok(None));
        assert_eq!(prefix(&[0, 0, 0, 0, 7]), Ok(Some(12)));
        assert_eq!(prefix(&[0, 0, 0, 0, 0]), Ok(Some(5)));
        assert_eq!(prefix(&[1, 0, 0, 0, 7]).unwrap_err().0, INTERNAL);
        assert_eq!(prefix(&[2, 0, 0, 0, 7]).unwrap_err().0, INTERNAL);
        let over = (MAX_CHECK_BYTES as u32 + 1).to_be_bytes();
        let mut big = vec![0];
        big.extend_from_slice(&over);
        assert_eq!(prefix(&big).unwrap_err().0, RESOURCE_EXHAUSTED);
    }
}
