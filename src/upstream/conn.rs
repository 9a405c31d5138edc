//! One HTTP/1.1 connection to the upstream, driven by the request that holds it: the request
//! future writes the head and body and reads the answer's head itself, and the response body
//! reads from the same connection as the client's side of the proxy asks for it. No task per
//! connection and no channel between the request and its connection, which is what hyper's
//! `client::conn` costs on every request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::server::ClientBody;
use bytes::{Bytes, BytesMut};
use http::Method;

use crate::headers::FieldLookup;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::wire::{self, Chunked, Decoded, Framing, Head, RequestFraming, WireError};
use crate::http1::Rewind;

/// What a connection runs over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> Stream for S {}

/// The byte stream under a connection (boxed once per connection, so plain and TLS
/// connections share one pool).
pub type Transport = Box<dyn Stream>;

/// A connection's stream as its exchange left it.
enum Io {
    Whole(Transport),
    /// The answer came while the request body was still going up, from a task of its own
    /// that goes on beside the response body (full duplex) and is stopped with it. Such a
    /// connection is never reused.
    Reading {
        half: ReadHalf<Transport>,
        /// Held for its `Drop`: the upload stops with the response body.
        _upload: Option<AbortOnDrop>,
    },
    /// Lost to a failed exchange.
    Gone,
}

/// Stops a task when dropped (dropping a `JoinHandle` alone lets the task run on).
struct AbortOnDrop(tokio::task::JoinHandle<Result<WriteHalf<Transport>, ConnError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn not_writable() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the upstream connection is not writable",
    )
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Whole(t) => Pin::new(t).poll_read(cx, buf),
            Io::Reading { half, .. } => Pin::new(half).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Err(not_writable())),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Whole(t) => Pin::new(t).poll_write(cx, buf),
            _ => Poll::Ready(Err(not_writable())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Whole(t) => Pin::new(t).poll_flush(cx),
            _ => Poll::Ready(Err(not_writable())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Whole(t) => Pin::new(t).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the upstream closed the connection in the middle of the response body")]
    Incomplete,
    #[error("the client's request body failed: {0}")]
    ClientBody(crate::server::ClientBodyError),
}

/// A request body on its way up: in memory (resendable), or streaming from the client (and
/// how far it got, for the caller's timeout).
pub enum Outgoing {
    Bytes(Bytes),
    Stream(ClientBody, Arc<Progress>),
}

/// How far a request body streaming up has got, so that `upstream_timeout` counts from its last
/// piece, not from the head: an upload takes as long as its client takes to send it, as long as
/// it keeps moving. Shared between the upload's task and the request waiting for the answer.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// When a piece last went up whole (or the body began), in milliseconds since `origin`,
    /// shifted left by one; the low bit says whether the upload waits on the client for its
    /// next piece (not on the upstream). One word, so that both are read as one.
    state: AtomicU64,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            origin: crate::clock::now(),
            state: AtomicU64::new(0),
        }
    }

    /// `timeout` after the body last moved, and whether the upload was then waiting on the
    /// client.
    pub fn due(&self, timeout: std::time::Duration) -> (Instant, bool) {
        let state = self.state.load(Ordering::Relaxed);
        let moved = std::time::Duration::from_millis(state >> 1);
        (self.origin + moved + timeout, state & 1 == 1)
    }

    fn moved(&self) {
        let ms = crate::clock::fresh()
            .saturating_duration_since(self.origin)
            .as_millis();
        let ms = u64::try_from(ms)
            .unwrap_or(u64::MAX >> 1)
            .min(u64::MAX >> 1);
        self.state.store(ms << 1, Ordering::Relaxed);
    }

    fn waiting(&self, on_client: bool) {
        if on_client {
            self.state.fetch_or(1, Ordering::Relaxed);
        } else {
            self.state.fetch_and(!1, Ordering::Relaxed);
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// An exchange that got no answer. `body` is given back when the request can be sent again
/// on another connection: its body untouched, and nothing of an answer received.
pub struct Failed {
    pub error: ConnError,
    pub body: Option<Outgoing>,
    /// Whether the request may have reached the upstream whole (its head was written).
    pub sent: bool,
}

/// Bodies held in memory up to this size go out in the same write as the head.
const INLINE_BODY: usize = 64 * 1024;
/// Read buffer growth: room for a typical answer in one read.
const READ_ROOM: usize = 16 * 1024;

/// An HTTP/1.1 connection, idle (in the pool) or carrying one exchange.
pub struct Conn {
    io: Io,
    /// Bytes read and not consumed yet. Empty whenever the connection is idle: anything the
    /// upstream sends unasked makes the connection unusable.
    read: BytesMut,
    /// The request head being written; its capacity is kept for the next request.
    write: Vec<u8>,
    /// Whether it has carried an exchange before (so a failure may be a stale connection).
    pub reused: bool,
}

impl Conn {
    pub fn new(transport: Transport) -> Self {
        Self {
            io: Io::Whole(transport),
            read: BytesMut::new(),
            write: Vec::new(),
            reused: false,
        }
    }

    /// Whether an idle connection can carry a request: the upstream has not closed it and has
    /// sent nothing unasked. One non-blocking read; it never waits.
    pub fn is_usable(&mut self) -> bool {
        if !matches!(self.io, Io::Whole(_)) {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Send a request and read its answer's head; the body is read afterwards through
    /// [`ResponseBody`].
    pub async fn exchange(
        &mut self,
        head: &super::Outbound,
        body: Outgoing,
    ) -> Result<(Head, bool), Failed> {
        let (method, upgrade) = (&head.method, head.upgrade);
        let framing = match &body {
            Outgoing::Bytes(b) if !b.is_empty() => RequestFraming::Length(b.len() as u64),
            Outgoing::Bytes(_) => {
                if head.fields.contains(&http::header::CONTENT_LENGTH)
                    || matches!(*method, Method::POST | Method::PUT | Method::PATCH)
                {
                    RequestFraming::Length(0)
                } else {
                    RequestFraming::None
                }
            }
            Outgoing::Stream(s, _) => match s.size_hint().exact() {
                Some(n) => RequestFraming::Length(n),
                None => RequestFraming::Chunked,
            },
        };
        self.write.clear();
        wire::encode_head(&mut self.write, head, framing);
        let reused = self.reused;
        self.reused = true;
        match body {
            Outgoing::Bytes(b) if b.len() <= INLINE_BODY => {
                self.write.extend_from_slice(&b);
                let mut written = 0;
                let wrote = async {
                    while written < self.write.len() {
                        match self.io.write(&self.write[written..]).await? {
                            0 => return Err(std::io::ErrorKind::WriteZero.into()),
                            n => written += n,
                        }
                    }
                    // TLS may hold the last records back until flushed.
                    self.io.flush().await
                }
                .await;
                if let Err(e) = wrote {
                    // Not a byte accepted: no upstream can have seen any of it. Once some
                    // went out, the upstream may have acted on the head alone.
                    return Err(Failed {
                        error: e.into(),
                        body: Some(Outgoing::Bytes(b)),
                        sent: written > 0,
                    });
                }
                let mut heard = false;
                match read_head(&mut self.io, &mut self.read, method, upgrade, &mut heard).await {
                    Ok(head) => Ok((head, true)),
                    Err(error) => {
                        // Not even an interim answer: the connection was dead on arrival.
                        let nothing_back =
                            !heard && matches!(error, ConnError::Closed | ConnError::Io(_));
                        Err(Failed {
                            error,
                            body: (reused && nothing_back).then_some(Outgoing::Bytes(b)),
                            sent: true,
                        })
                    }
                }
            }
            Outgoing::Bytes(b) => self.stream_exchange(method, upgrade, Upload::Full(b)).await,
            Outgoing::Stream(s, progress) => {
                let chunked = framing == RequestFraming::Chunked;
                let upload = Upload::Streamed {
                    body: s,
                    chunked,
                    progress,
                };
                self.stream_exchange(method, upgrade, upload).await
            }
        }
    }

    /// Write the head and the body from a task of their own while this reads the answer, which
    /// may come before the body is all sent: an upstream refusing a large upload, or one that
    /// answers as it reads (full duplex). Then the upload goes on beside the response body and
    /// stops with it, and the connection is not reused. Returns the head and whether the whole
    /// request was written by the time it came.
    async fn stream_exchange(
        &mut self,
        method: &Method,
        upgrade: bool,
        body: Upload,
    ) -> Result<(Head, bool), Failed> {
        // An upload may have been consumed: never given back to be sent again.
        let failed = |error, sent| Failed {
            error,
            body: None,
            sent,
        };
        let Io::Whole(transport) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Err(failed(ConnError::Io(not_writable()), false));
        };
        let (mut reader, mut writer) = tokio::io::split(transport);
        let head = std::mem::take(&mut self.write);
        let mut upload = AbortOnDrop(tokio::spawn(async move {
            writer.write_all(&head).await?;
            writer.flush().await?;
            // Flushed by `send` at its end.
            body.send(&mut writer).await?;
            Ok(writer)
        }));
        let (head, sent) = {
            let mut heard = false;
            let answer = read_head(&mut reader, &mut self.read, method, upgrade, &mut heard);
            tokio::pin!(answer);
            let mut sent = None;
            let head = loop {
                tokio::select! {
                    biased;
                    head = &mut answer => break head,
                    done = &mut upload.0, if sent.is_none() => {
                        let done = done.unwrap_or_else(|e| Err(ConnError::Io(std::io::Error::other(e))));
                        if let Err(ConnError::ClientBody(e)) = done {
                            // The client's body broke: the request cannot be completed upstream.
                            return Err(failed(ConnError::ClientBody(e), false));
                        }
                        sent = Some(done);
                    }
                }
            };
            (head, sent)
        };
        match (head, sent) {
            // A switch needs the whole connection: not while the request is still going up.
            (Ok(head), Some(Err(_)) | None)
                if head.status == http::StatusCode::SWITCHING_PROTOCOLS =>
            {
                Err(failed(WireError::UnaskedUpgrade.into(), true))
            }
            (Ok(head), Some(Ok(writer))) => {
                self.io = Io::Whole(reader.unsplit(writer));
                Ok((head, true))
            }
            (Ok(head), Some(Err(_))) => {
                self.io = Io::Reading {
                    half: reader,
                    _upload: None,
                };
                Ok((head, false))
            }
            (Ok(head), None) => {
                self.io = Io::Reading {
                    half: reader,
                    _upload: Some(upload),
                };
                Ok((head, false))
            }
            // The upstream's refusal to read on is often the real story.
            (Err(ConnError::Closed | ConnError::Io(_)), Some(Err(write_error))) => {
                Err(failed(write_error, true))
            }
            (Err(e), _) => Err(failed(e, true)),
        }
    }

    /// Read more into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.read.capacity() - self.read.len() < 1024 {
            self.read.reserve(READ_ROOM);
        }
        let fill = self.io.read_buf(&mut self.read);
        std::pin::pin!(fill).poll(cx)
    }

    /// The connection as a byte stream, after a switch of protocols: what was read past the
    /// 101's head comes first. `None` if the exchange left it half (a 101 is only accepted
    /// once the request was written whole, so this does not happen).
    pub fn into_tunnel(self) -> Option<Tunnel> {
        match self.io {
            Io::Whole(t) => Some(Rewind::new(t, self.read.freeze())),
            Io::Reading { .. } | Io::Gone => None,
        }
    }
}

/// Read until a final answer's head is in. `heard` is set once any byte came back (an interim
/// answer included), after which the request must not be sent again.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    read: &mut BytesMut,
    method: &Method,
    upgrade: bool,
    heard: &mut bool,
) -> Result<Head, ConnError> {
    loop {
        if !read.is_empty() {
            if let Some(head) = wire::parse_head(read, method, upgrade)? {
                return Ok(head);
            }
        }
        if read.capacity() - read.len() < 1024 {
            read.reserve(READ_ROOM);
        }
        let n = io.read_buf(read).await?;
        *heard |= n > 0;
        if n == 0 {
            return Err(if read.is_empty() {
                ConnError::Closed
            } else {
                ConnError::Wire(WireError::MalformedHead)
            });
        }
    }
}

/// A request body written after its head.
enum Upload {
    /// A large body already in memory.
    Full(Bytes),
    /// The client's body, forwarded as it arrives, with its length or chunked.
    Streamed {
        body: ClientBody,
        chunked: bool,
        progress: Arc<Progress>,
    },
}

impl Upload {
    async fn send<W: AsyncWrite + Unpin>(self, w: &mut W) -> Result<(), ConnError> {
        use http_body_util::BodyExt;
        let streamed = match self {
            Upload::Full(b) => {
                w.write_all(&b).await?;
                return Ok(w.flush().await?);
            }
            Upload::Streamed {
                body,
                chunked,
                progress,
            } => (body, chunked, progress),
        };
        let (mut body, chunked, progress) = streamed;
        let mut framed = Vec::new();
        loop {
            progress.waiting(true);
            let Some(frame) = body.frame().await else {
                break;
            };
            // A piece came: the client moved (and the upstream's turn to take it begins).
            progress.moved();
            let frame = frame.map_err(ConnError::ClientBody)?;
            // Trailers of a request are not forwarded.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                framed.clear();
                wire::encode_chunk(&mut framed, &data);
                w.write_all(&framed).await?;
            } else {
                w.write_all(&data).await?;
            }
            // Out now, not when the next piece comes: the client may pause (and TLS holds
            // records back until flushed).
            w.flush().await?;
            progress.moved();
        }
        progress.waiting(false);
        if chunked {
            w.write_all(wire::LAST_CHUNK).await?;
        }
        w.flush().await?;
        // All of it is up: the upstream's time to answer starts now.
        progress.moved();
        Ok(())
    }
}

/// A response body read from its connection. When it ends and the connection can carry
/// another request, `release` gets the connection back.
pub struct ResponseBody {
    conn: Option<Conn>,
    state: BodyState,
    keep_alive: bool,
}

#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// What polling a [`ResponseBody`] gave.
pub enum Polled {
    Frame(Frame<Bytes>),
    /// The body is complete; the connection comes back when it can be reused.
    End(Option<Conn>),
}

impl ResponseBody {
    pub fn new(conn: Conn, head: &Head, whole_request_sent: bool) -> Self {
        let state = match head.framing {
            Framing::Empty => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Chunked::default()),
            Framing::UntilClose => BodyState::UntilClose,
        };
        Self {
            conn: Some(conn),
            state,
            keep_alive: head.keep_alive && whole_request_sent,
        }
    }

    pub fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// The connection, if the body is over and it is fit for another request.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        let ended = match &self.state {
            BodyState::Done => true,
            BodyState::Length(0) => true,
            BodyState::Chunked(c) => c.is_done(),
            _ => false,
        };
        let conn = self
            .conn
            .take_if(|c| ended && self.keep_alive && c.read.is_empty())?;
        Some(conn)
    }

    /// The connection itself, for a switch of protocols.
    pub fn take_conn(&mut self) -> Option<Conn> {
        self.conn.take()
    }

    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Polled, ConnError>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(Ok(Polled::End(None)));
            };
            match &mut self.state {
                BodyState::Done | BodyState::Length(0) => {
                    self.state = BodyState::Done;
                    return Poll::Ready(Ok(Polled::End(self.take_reusable())));
                }
                BodyState::Length(left) => {
                    if !conn.read.is_empty() {
                        let take = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.read.len());
                        *left -= take as u64;
                        let data = conn.read.split_to(take).freeze();
                        return Poll::Ready(Ok(Polled::Frame(Frame::data(data))));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut conn.read)? {
                    Decoded::Data(data) => {
                        return Poll::Ready(Ok(Polled::Frame(Frame::data(data))))
                    }
                    Decoded::Trailers(mut t) => {
                        crate::headers::strip_trailers(&mut t, None);
                        return Poll::Ready(Ok(Polled::Frame(Frame::trailers(t))));
                    }
                    Decoded::End => {
                        self.state = BodyState::Done;
                        return Poll::Ready(Ok(Polled::End(self.take_reusable())));
                    }
                    Decoded::More => {}
                },
                BodyState::UntilClose => {
                    if !conn.read.is_empty() {
                        let data = conn.read.split().freeze();
                        return Poll::Ready(Ok(Polled::Frame(Frame::data(data))));
                    }
                }
            }
            let n = match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r?,
            };
            if n == 0 {
                if let BodyState::UntilClose = self.state {
                    self.state = BodyState::Done;
                    self.conn = None;
                    return Poll::Ready(Ok(Polled::End(None)));
                }
                self.conn = None;
                return Poll::Ready(Err(ConnError::Incomplete));
            }
        }
    }
}

/// An upstream connection turned into a byte stream by a 101 Switching Protocols.
pub type Tunnel = Rewind<Transport>;
