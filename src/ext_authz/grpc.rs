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
//! Connections get the same rules as on every front ([`crate::listen::Http2Front`]): counted
//! against `limits.max_connections`, told goodbye (GOAWAY) and then closed when unused, drained
//! on shutdown, TLS when configured.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::net::TcpListener;

use super::{check, guarded, ExtAuthzState, MAX_CHECK_BYTES};
use crate::listen::{Routed, Tracked};

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
    let front = crate::listen::Http2Front {
        name: "ext_authz",
        connections: state.connections.clone(),
        tls,
        limits: state.resources,
        drain,
    };
    front
        .serve(listener, shutdown, |activity, peer| {
            Connection::new(state.clone(), Routed::new(others.clone(), activity, peer))
        })
        .await;
}

/// One connection's service: each request is in flight on the connection's [`Activity`] until
/// its answer has been sent (a health Watch stream included).
#[derive(Clone)]
pub(super) struct Connection {
    state: Arc<ExtAuthzState>,
    /// Health and unknown methods.
    others: Routed,
}

impl Connection {
    pub(super) fn new(state: Arc<ExtAuthzState>, others: Routed) -> Self {
        Connection { state, others }
    }
}

type Answer = Response<Tracked<Reply>>;

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = Answer;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = self.others.busy();
        if req.uri().path() == CHECK {
            // The head is looked at here, so that the boxed future holds only the body.
            let (body, timeout) = match opened(req) {
                Ok(opened) => opened,
                Err(refused) => {
                    let answer = refused.answer().map(|body| Tracked::new(body, busy));
                    return Box::pin(std::future::ready(Ok(answer)));
                }
            };
            let state = self.state.clone();
            Box::pin(async move {
                let answer = checked(&state, body, timeout).await;
                Ok(answer.map(|body| Tracked::new(body, busy)))
            })
        } else {
            Box::pin(self.others.answer(req, busy, |body| Reply::Tonic { body }))
        }
    }
}

/// A gRPC error: its code and message.
#[derive(Debug, PartialEq, Eq)]
struct Failure(u8, &'static str);

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
fn opened(req: Request<Incoming>) -> Result<(Incoming, Option<Duration>), Refused> {
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

/// Answer one call of Check whose head was [`opened`].
async fn checked(
    state: &ExtAuthzState,
    mut body: Incoming,
    timeout: Option<Duration>,
) -> Response<Reply> {
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
                    let mut t = HeaderMap::with_capacity(1);
                    t.insert(GRPC_STATUS, HeaderValue::from_static("0"));
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
