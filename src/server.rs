//! keygate's own HTTP/1.1 server connection, for the proxy front: one task per connection
//! reads a request head, hands the request to the front's [`Handler`], writes the answer, and
//! reads the next head. No channel and no second task between the connection and its request:
//! the request body reads from the connection itself ([`RequestBody`]).
//!
//! What it owes the client, and never leaves to chance:
//! - a request framed ambiguously (see [`wire`]) or a head over the configured limits is
//!   answered by the front's refusal (400 or 431, the contract's JSON) and the connection
//!   closes; nothing after such a head is read as a request;
//! - a head must arrive whole within `header_read_timeout` of the connection being ready for
//!   it (between requests too), or the connection closes;
//! - a body the front did not read is drained when it is small and already on its way
//!   (`Content-Length` up to [`DRAIN_MAX`], no `100 Continue` owed); otherwise the answer says
//!   `Connection: close` and the connection closes after it, so the body is never read as the
//!   next request;
//! - `Expect: 100-continue` is answered when the front first reads the body, so a denied
//!   request's body is never asked for;
//! - the answer's framing is keygate's: its own `Content-Length` or chunking, whatever length
//!   fields the answer carried (HEAD and 304 answers keep theirs, since they describe a body
//!   not sent);
//! - a client that goes away mid-answer (end of stream or reset) ends the exchange at once,
//!   which drops the upstream's side too.

mod body;
pub mod wire;

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::AsyncWrite;

use crate::deadline::Deadline;
pub use body::{BodyError, OnUpgrade, RequestBody, Stream, Transport, Upgraded};
use body::{BodyState, Continue, Shared};
use wire::{BodyFraming, HeadError, HeadLimits, Persistence, ResponseFraming};

/// A request body that is still unread when its answer has been written is read and dropped
/// when it is at most this long, so the connection can carry the next request.
pub const DRAIN_MAX: u64 = 64 * 1024;
/// Answer bytes gathered before they are written: one write for a head and a small body.
const WRITE_AT: usize = 16 * 1024;
/// After a refusal, how long (and how much) the client's unread bytes are read and dropped
/// before the connection closes: closing with them unread would reset the connection, and the
/// client could lose the refusal.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Header fields an answer carries outside its map: an upstream's, as it sent them (see
/// [`crate::upstream::PooledBody`]), and one of keygate's that takes the place of the
/// upstream's of that name (the request id). The map's names win over both.
pub trait PassedFields {
    fn passed(&self) -> Option<&crate::upstream::wire::Fields> {
        None
    }

    fn own_field(&self) -> Option<(&http::HeaderName, &http::HeaderValue)> {
        None
    }
}

/// What a front does with the requests of a connection.
pub trait Handler: Send + Sync + 'static {
    type Body: Body<Data = Bytes, Error: std::fmt::Display> + PassedFields + Send + Unpin + 'static;

    /// Answer `req`, whose header fields are `fields` (its own map is empty). One call at a
    /// time: the connection's requests are answered in turn.
    fn call(
        &mut self,
        req: Request<RequestBody>,
        fields: crate::http1::Fields,
    ) -> impl Future<Output = Response<Self::Body>> + Send;

    /// The answer to a request whose head could not be taken (the connection closes after it).
    fn refuse(&self, error: HeadError) -> Response<Self::Body>;

    /// The answer to give instead of one whose body broke off (or was not as long as it said)
    /// before any of it went out; the connection closes after it. `own`: the value of the broken
    /// answer's own field ([`PassedFields::own_field`]), if it had one.
    fn broken(&self, own: Option<http::HeaderValue>) -> Response<Self::Body>;
}

/// A connection's settings, from `[proxy]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    pub limits: HeadLimits,
}

/// Serve HTTP/1.1 on `io` until the client closes, a request or answer ends the connection,
/// or `stopped` turns true (the request in flight is answered first). `read` holds bytes
/// already read from `io` (the start of the first request).
pub async fn serve<H: Handler>(
    io: Transport,
    read: BytesMut,
    handler: H,
    settings: Settings,
    stopped: tokio::sync::watch::Receiver<bool>,
) {
    let shared = Shared::new(io, read);
    serve_on(&shared, handler, settings, stopped).await;
    // The socket closes now, even if a request body (held by an upload task on its way out)
    // still refers to the connection.
    drop(shared.lock().io.take());
}

/// The front's stop signal as a connection's task waits for it between requests. Once it waits
/// with that task's waker it is polled again only when the signal has changed: each poll of a
/// watch receiver's wait takes its waiter list's atomics, for a signal that comes once.
struct StopSignal<'a, F> {
    wait: Pin<&'a mut F>,
    /// A receiver of the same signal, to ask whether it changed.
    changed: tokio::sync::watch::Receiver<bool>,
    /// The waker `wait` was last left waiting with.
    waiting: crate::deadline::Registered,
}

impl<F: Future<Output = ()>> StopSignal<'_, F> {
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.waiting.holds(cx) && !self.changed.has_changed().unwrap_or(true) {
            return Poll::Pending;
        }
        let budget = tokio::task::coop::has_budget_remaining();
        let polled = self.wait.as_mut().poll(cx);
        if polled.is_pending() {
            self.waiting.note(cx, budget);
        }
        polled
    }
}

async fn serve_on<H: Handler>(
    shared: &Arc<Shared>,
    mut handler: H,
    settings: Settings,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let shutting_down = stopped.clone();
    let mut conn = Conn {
        shared,
        out: Vec::with_capacity(4096),
        settings,
    };
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let mut stop = StopSignal {
        wait: std::pin::pin!(stop),
        changed: shutting_down.clone(),
        waiting: Default::default(),
    };
    let mut stopping = false;
    let wait = settings.header_read_timeout;
    let mut deadline = Deadline::new(crate::clock::now() + wait);
    loop {
        deadline.set(crate::clock::now() + wait);
        let next = conn
            .next_head(&mut deadline, &mut stop, &mut stopping)
            .await;
        let head = match next {
            Next::Head(head) => head,
            Next::Close => return conn.close(false).await,
            Next::Refuse(error, head) => {
                let resp = handler.refuse(error);
                // A HEAD's refusal has no body either.
                let said = Said {
                    head,
                    ..Said::refusal()
                };
                let _ = conn.respond(resp, said).await;
                return conn.close(true).await;
            }
        };
        let mut request = head.request.map(|()| RequestBody::empty());
        let seq = {
            let mut inner = shared.lock();
            inner.seq += 1;
            inner.expect = Continue::NotExpected;
            let seq = inner.seq;
            let (state, length) = match head.framing {
                BodyFraming::Empty => (BodyState::Done, Some(0)),
                BodyFraming::Length(n) => (BodyState::Length(n), Some(n)),
                BodyFraming::Chunked => (BodyState::Chunked(Default::default()), None),
            };
            if head.framing != BodyFraming::Empty {
                *request.body_mut() = RequestBody::new(shared.clone(), seq, length);
                if head.expect_continue {
                    inner.expect = Continue::Expected;
                }
            }
            inner.body = state;
            seq
        };
        let upgrade = head.upgrade.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
            request.extensions_mut().insert(OnUpgrade(rx));
            tx
        });
        let said = Said {
            head: request.method() == Method::HEAD,
            close: false,
            http10: request.version() == Version::HTTP_10,
            upgrade: upgrade.is_some(),
            trailers: head.trailers,
        };
        let keep_alive = head.keep_alive && !stopping;

        // Pinned where it is made: the handler's future (several KiB of state) is not moved
        // again on its way to being polled.
        let resp = {
            let mut call = std::pin::pin!(handler.call(request, head.fields));
            if head.expect_continue {
                match conn.answer_expecting_continue(call.as_mut()).await {
                    Some(resp) => resp,
                    None => return,
                }
            } else {
                call.await
            }
        };
        let said = Said {
            close: !keep_alive || *shutting_down.borrow(),
            ..said
        };
        let written = conn.respond(resp, said).await;
        let keep = match written {
            Ok(Written::Broken(own)) => {
                let said = Said {
                    close: true,
                    ..said
                };
                let _ = conn.respond(handler.broken(own), said).await;
                return conn.close(true).await;
            }
            Ok(Written::KeepAlive) => true,
            Ok(Written::Close) => false,
            Ok(Written::Switched) => {
                let taken = {
                    let mut inner = shared.lock();
                    inner.seq += 1;
                    let pending = inner.buf.split().freeze();
                    inner.io.take().map(|io| Upgraded::new(io, pending))
                };
                if let (Some(tx), Some(upgraded)) = (upgrade, taken) {
                    let _ = tx.send(upgraded);
                }
                return;
            }
            Err(Abort) => return,
        };
        if !keep || !conn.finish_body(seq, &mut deadline).await {
            return conn.close(true).await;
        }
    }
}

/// What came of waiting for a request head (one per request, moved once: its size does not
/// matter).
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(wire::RequestHead),
    /// A head that cannot be taken; whether it began as a HEAD request.
    Refuse(HeadError, bool),
    /// The client closed, went silent past the timeout, or keygate is shutting down.
    Close,
}

/// How an answer left the connection.
enum Written {
    KeepAlive,
    Close,
    /// A 101 went out: the connection is the client's tunnel now.
    Switched,
    /// Nothing went out: the answer's body broke off before any of it was written. Carries
    /// the answer's own field's value.
    Broken(Option<http::HeaderValue>),
}

/// The connection cannot go on (the client went away, the answer broke off).
struct Abort;

/// What the request (and the connection) said about how its answer may be written.
#[derive(Clone, Copy)]
struct Said {
    /// The request was a HEAD: the answer has no body.
    head: bool,
    /// The connection ends after the answer, whatever else is said.
    close: bool,
    http10: bool,
    /// The request asked to switch protocols.
    upgrade: bool,
    /// `TE: trailers`.
    trailers: bool,
}

impl Said {
    fn refusal() -> Self {
        Said {
            head: false,
            close: true,
            http10: false,
            upgrade: false,
            trailers: false,
        }
    }
}

struct Conn<'a> {
    shared: &'a Arc<Shared>,
    /// The answer being written.
    out: Vec<u8>,
    settings: Settings,
}

impl Conn<'_> {
    async fn next_head(
        &mut self,
        deadline: &mut Deadline,
        stop: &mut StopSignal<'_, impl Future<Output = ()>>,
        stopping: &mut bool,
    ) -> Next {
        let limits = self.settings.limits;
        poll_fn(|cx| {
            let had_budget = tokio::task::coop::has_budget_remaining();
            let mut inner = self.shared.lock();
            loop {
                if !inner.buf.is_empty() {
                    // Looked at first: a refused head may be split off the buffer already.
                    // (Empty lines before a request line are skipped, as httparse does.)
                    let start = inner.buf.iter().position(|&b| b != b'\r' && b != b'\n');
                    let head = start.is_some_and(|at| inner.buf[at..].starts_with(b"HEAD "));
                    match wire::parse_request(&mut inner.buf, limits) {
                        Ok(Some(head)) => return Poll::Ready(Next::Head(head)),
                        Ok(None) => {}
                        Err(e) => return Poll::Ready(Next::Refuse(e, head)),
                    }
                }
                // Shutting down: a request already begun is still taken, none is waited for.
                if *stopping && inner.buf.is_empty() {
                    return Poll::Ready(Next::Close);
                }
                match inner.poll_fill(cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Next::Close),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Pending => {}
                }
                // Nothing to read yet: the stop signal and the deadline are what may come
                // first (looked at only now, so that a request that is there costs neither).
                if !*stopping && stop.poll(cx).is_ready() {
                    *stopping = true;
                    continue;
                }
                if deadline.poll_expired_after(cx, had_budget).is_ready() {
                    return Poll::Ready(Next::Close);
                }
                return Poll::Pending;
            }
        })
        .await
    }

    /// Poll the answer, sending `100 Continue` when the front reads the body. `None`: the
    /// interim answer could not be written.
    async fn answer_expecting_continue<B>(
        &mut self,
        mut call: Pin<&mut impl Future<Output = Response<B>>>,
    ) -> Option<Response<B>> {
        loop {
            let polled = poll_fn(|cx| {
                if let Poll::Ready(resp) = call.as_mut().poll(cx) {
                    return Poll::Ready(Some(resp));
                }
                let mut inner = self.shared.lock();
                match inner.expect {
                    Continue::Wanted => Poll::Ready(None),
                    Continue::Expected => {
                        inner.conn_waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    Continue::NotExpected | Continue::Sent => Poll::Pending,
                }
            })
            .await;
            if let Some(resp) = polled {
                self.shared.lock().conn_waker = None;
                return Some(resp);
            }
            self.shared.lock().expect = Continue::Sent;
            if self.write_all(wire::CONTINUE).await.is_err() || self.flush().await.is_err() {
                return None;
            }
        }
    }

    /// Write `resp` as `said` allows.
    async fn respond<B>(&mut self, resp: Response<B>, said: Said) -> Result<Written, Abort>
    where
        B: Body<Data = Bytes> + PassedFields + Unpin,
        B::Error: std::fmt::Display,
    {
        let Said {
            head,
            close,
            http10,
            upgrade,
            trailers: wants_trailers,
        } = said;
        let (mut parts, mut body) = resp.into_parts();
        let status = parts.status;
        let switch = status == StatusCode::SWITCHING_PROTOCOLS && upgrade;
        let framing = if switch {
            ResponseFraming::NoBody { keep_length: false }
        } else if head || status == StatusCode::NOT_MODIFIED {
            ResponseFraming::NoBody { keep_length: true }
        } else if status.is_informational() || status == StatusCode::NO_CONTENT {
            ResponseFraming::NoBody { keep_length: false }
        } else if let Some(n) = body.size_hint().exact() {
            ResponseFraming::Length(n)
        } else if http10 {
            ResponseFraming::UntilClose
        } else {
            ResponseFraming::Chunked
        };
        let said_close = parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        let close = close
            || said_close
            || framing == ResponseFraming::UntilClose
            || (status.is_informational() && !switch)
            || !self.body_drainable();
        let persistence = if switch {
            Persistence::Upgrade
        } else if close {
            Persistence::Close
        } else if http10 {
            Persistence::KeepAlive
        } else {
            Persistence::Default
        };
        // A HEAD answer of keygate's own (a refusal) says how long its GET answer would be.
        if framing == (ResponseFraming::NoBody { keep_length: true })
            && body.passed().is_none()
            && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            if let Some(n) = body.size_hint().exact() {
                parts.headers.insert(header::CONTENT_LENGTH, n.into());
            }
        }
        self.out.clear();
        wire::encode_response_head(
            &mut self.out,
            status,
            &parts.headers,
            wire::Outside {
                passed: body.passed(),
                own: body.own_field(),
            },
            framing,
            persistence,
            &wire::date(),
        );
        drop(parts);
        let chunked = framing == ResponseFraming::Chunked;
        let mut left = match framing {
            ResponseFraming::NoBody { .. } => {
                // An upstream's empty body gives its connection back to the pool when it is
                // seen to end.
                let _ = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
                drop(body);
                self.write_out().await?;
                return Ok(if switch {
                    Written::Switched
                } else if close {
                    Written::Close
                } else {
                    Written::KeepAlive
                });
            }
            ResponseFraming::Length(n) => n,
            ResponseFraming::Chunked | ResponseFraming::UntilClose => u64::MAX,
        };
        let mut trailers = None;
        // Whether any of the answer went out: until then a broken one can still be replaced.
        let mut wrote = false;
        let broken = |wrote: bool, body: &B| {
            if wrote {
                Err(Abort)
            } else {
                Ok(Written::Broken(body.own_field().map(|(_, v)| v.clone())))
            }
        };
        loop {
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // Nothing more yet: what is gathered goes out now.
                    wrote = true;
                    self.write_out().await?;
                    self.wait_frame(&mut body).await?
                }
            };
            match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "the answer's body failed; closing the connection");
                    return broken(wrote, &body);
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        let n = data.len() as u64;
                        if !chunked && n > left {
                            tracing::debug!("the answer's body is longer than it said");
                            return broken(wrote, &body);
                        }
                        left -= n;
                        if chunked {
                            wire::encode_chunk_size(&mut self.out, data.len());
                        }
                        if data.len() >= WRITE_AT {
                            wrote = true;
                            self.write_out().await?;
                            self.write_all(&data).await.map_err(|_| Abort)?;
                        } else {
                            self.out.extend_from_slice(&data);
                        }
                        if chunked {
                            self.out.extend_from_slice(b"\r\n");
                        }
                        if self.out.len() >= WRITE_AT {
                            wrote = true;
                            self.write_out().await?;
                        }
                    }
                    // Trailers only to a client that said it reads them (RFC 9110 §6.5.1).
                    Err(frame) if wants_trailers => {
                        if let Ok(t) = frame.into_trailers() {
                            trailers = Some(t);
                        }
                    }
                    Err(_) => {}
                },
            }
        }
        match framing {
            ResponseFraming::Length(_) if left != 0 => {
                tracing::debug!("the answer's body is shorter than it said");
                return broken(wrote, &body);
            }
            ResponseFraming::Chunked => {
                // What a trailer may not say was left out where the answer was read.
                wire::encode_last_chunk(&mut self.out, trailers.as_ref());
            }
            _ => {}
        }
        drop(body);
        self.write_out().await?;
        Ok(if close {
            Written::Close
        } else {
            Written::KeepAlive
        })
    }

    /// Whether the request body, if unread when the answer is ready, may be drained.
    fn body_drainable(&self) -> bool {
        let inner = self.shared.lock();
        match inner.body {
            BodyState::Done => true,
            BodyState::Length(n) => {
                n <= DRAIN_MAX && matches!(inner.expect, Continue::NotExpected | Continue::Sent)
            }
            BodyState::Chunked(_) | BodyState::Failed => false,
        }
    }

    /// Wait for the answer's next frame; meanwhile watch the client's side. Once the request
    /// body is in, its end of stream or a reset ends the exchange (as does the connection going
    /// unused past `limits.idle_timeout`, which reads report). While the body is still being
    /// read (by the upload, in another task), a body that broke off ends it, and so does the
    /// connection's deadline, polled here since this task does not read.
    async fn wait_frame<B>(
        &mut self,
        body: &mut B,
    ) -> Result<Option<Result<http_body::Frame<Bytes>, B::Error>>, Abort>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        let limit = self.settings.limits.bytes;
        poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                return Poll::Ready(Ok(frame));
            }
            let mut inner = self.shared.lock();
            loop {
                match inner.body {
                    BodyState::Failed => return Poll::Ready(Err(Abort)),
                    // Pipelined bytes are kept (up to a head's worth) for the next request.
                    BodyState::Done if inner.buf.len() < limit => {
                        match std::task::ready!(inner.poll_fill(cx)) {
                            Ok(0) | Err(_) => return Poll::Ready(Err(Abort)),
                            Ok(_) => continue,
                        }
                    }
                    BodyState::Done => {}
                    BodyState::Length(_) | BodyState::Chunked(_) => {
                        inner.conn_waker = Some(cx.waker().clone());
                    }
                }
                let expired = match inner.io.as_mut() {
                    Some(io) => io.poll_expired(cx).is_ready(),
                    None => true,
                };
                return if expired {
                    Poll::Ready(Err(Abort))
                } else {
                    Poll::Pending
                };
            }
        })
        .await
    }

    /// After an answer on a connection that goes on: the request body, if unread, is read and
    /// dropped (it was found drainable). `false` if that failed.
    async fn finish_body(&mut self, seq: u64, deadline: &mut Deadline) -> bool {
        {
            let mut inner = self.shared.lock();
            if inner.seq != seq {
                return false;
            }
            // The body (in a task that may still run) can no longer read.
            inner.seq += 1;
            if matches!(inner.body, BodyState::Done) {
                return true;
            }
        }
        deadline.set(crate::clock::now() + self.settings.header_read_timeout);
        poll_fn(|cx| {
            let had_budget = tokio::task::coop::has_budget_remaining();
            let mut inner = self.shared.lock();
            loop {
                let left = match inner.body {
                    BodyState::Done => return Poll::Ready(true),
                    BodyState::Length(n) => n,
                    BodyState::Chunked(_) | BodyState::Failed => return Poll::Ready(false),
                };
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(inner.buf.len());
                let _ = inner.buf.split_to(take);
                let left = left - take as u64;
                inner.body = if left == 0 {
                    BodyState::Done
                } else {
                    BodyState::Length(left)
                };
                if left == 0 {
                    return Poll::Ready(true);
                }
                if deadline.poll_expired_after(cx, had_budget).is_ready() {
                    return Poll::Ready(false);
                }
                match std::task::ready!(inner.poll_fill(cx)) {
                    Ok(0) | Err(_) => return Poll::Ready(false),
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    async fn write_out(&mut self) -> Result<(), Abort> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let wrote = match self.write_all(&out).await {
            Ok(()) => self.flush().await,
            Err(e) => Err(e),
        };
        self.out = out;
        self.out.clear();
        wrote.map_err(|_| Abort)
    }

    async fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut written = 0;
        while written < bytes.len() {
            let n = poll_fn(|cx| {
                let mut inner = self.shared.lock();
                let Some(io) = inner.io.as_mut() else {
                    return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
                };
                Pin::new(io).poll_write(cx, &bytes[written..])
            })
            .await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            written += n;
        }
        Ok(())
    }

    async fn flush(&self) -> std::io::Result<()> {
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            match inner.io.as_mut() {
                Some(io) => Pin::new(io).poll_flush(cx),
                None => Poll::Ready(Ok(())),
            }
        })
        .await
    }

    /// End the connection: the write side first (the client sees the end of the answer), then,
    /// with `linger`, what the client still sends is read and dropped for a moment, so that
    /// closing with bytes unread does not reset the connection under the last answer.
    async fn close(self, linger: bool) {
        let shut = poll_fn(|cx| {
            let mut inner = self.shared.lock();
            match inner.io.as_mut() {
                Some(io) => Pin::new(io).poll_shutdown(cx),
                None => Poll::Ready(Ok(())),
            }
        });
        if tokio::time::timeout(LINGER, shut).await.is_err() || !linger {
            return;
        }
        let mut dropped = 0;
        let drain = poll_fn(|cx| {
            let mut inner = self.shared.lock();
            loop {
                inner.buf.clear();
                match std::task::ready!(inner.poll_fill(cx)) {
                    Ok(0) | Err(_) => return Poll::Ready(()),
                    Ok(n) => {
                        dropped += n;
                        if dropped > LINGER_BYTES {
                            return Poll::Ready(());
                        }
                    }
                }
            }
        });
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

/// A proxied request's body, read by keygate's HTTP/1.1 server or by hyper's HTTP/2 one.
pub enum ClientBody {
    H1(RequestBody),
    H2(hyper::body::Incoming),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error(transparent)]
    H1(#[from] BodyError),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::tests::{woken, Count};
    use std::task::{Context, Waker};

    /// The stop signal first waited for when the task's budget is spent (the wait answers
    /// Pending without registering anything) still wakes its task when it comes.
    #[tokio::test]
    async fn a_stop_signal_first_waited_for_out_of_budget_still_wakes_its_task() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let changed = rx.clone();
        let wait = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut stop = StopSignal {
            wait: std::pin::pin!(wait),
            changed,
            waiting: Default::default(),
        };
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        poll_fn(|_| {
            crate::deadline::tests::spend_coop_budget();
            assert!(stop.poll(&mut Context::from_waker(&waker)).is_pending());
            Poll::Ready(())
        })
        .await;
        // Spending the budget woke the task, which is polled again with a new one; then the
        // signal comes.
        tokio::task::yield_now().await;
        assert!(stop.poll(&mut Context::from_waker(&waker)).is_pending());
        let before = woken(&count);
        tx.send_replace(true);
        assert_eq!(
            woken(&count),
            before + 1,
            "the stop signal did not wake its task"
        );
        assert!(stop.poll(&mut Context::from_waker(&waker)).is_ready());
    }
}
