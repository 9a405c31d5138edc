//! The read side of a client connection, shared by the connection (which reads request heads)
//! and the request body in flight (which may be read from another task, the upstream upload's).
//! Only one of them reads at a time: the body while its request is being answered, the
//! connection before and after. A body outlived by its request (an upload task still running)
//! finds the connection's sequence number moved on and fails instead of reading the next
//! request's bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::upstream::wire::{Chunked, Decoded};

/// What a client connection runs over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {
    /// Ready with the error once the connection has gone unused past its deadline
    /// ([`crate::listen::Watched`]): polled by the connection while it neither reads nor
    /// writes, since the request body (in another task) may be the one reading.
    fn poll_expired(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Error> {
        Poll::Pending
    }
}

pub type Transport = Box<dyn Stream>;

/// Read buffer growth: room for a typical request head in one read.
const READ_ROOM: usize = 8 * 1024;

/// Why a request body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client's connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client closed the connection before the request body ended")]
    Incomplete,
    #[error("the request's chunked body is malformed")]
    Malformed,
    #[error("the request body was read after its request was answered")]
    Detached,
}

/// Where the request body in flight stands.
pub(super) enum BodyState {
    Done,
    Length(u64),
    Chunked(Chunked),
    /// Broken off (malformed, cut short): the connection cannot carry another request.
    Failed,
}

/// The client's `Expect: 100-continue`, and whether the interim answer was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Continue {
    NotExpected,
    /// Expected, not yet asked for: the body has not been read.
    Expected,
    /// The body was read: the connection owes the client its `100 Continue`.
    Wanted,
    Sent,
}

pub(super) struct Inner {
    /// `None` once the connection has switched protocols.
    pub io: Option<Transport>,
    pub buf: BytesMut,
    pub body: BodyState,
    /// Counts requests; a body belongs to the request it was made for.
    pub seq: u64,
    pub expect: Continue,
    /// The connection's task, to wake when the body asks for `100 Continue` from elsewhere.
    pub conn_waker: Option<Waker>,
}

impl Inner {
    /// Read more into the buffer; `Ok(0)` at the end of the stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_ROOM);
        }
        std::pin::pin!(io.read_buf(&mut self.buf)).poll(cx)
    }

    /// The body's next piece from the buffer, reading more as needed. When it breaks off, the
    /// connection's task is woken: it may be waiting on an answer that now never ends.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = self.poll_body_inner(cx);
        if let Poll::Ready(Some(Err(_))) = polled {
            if let Some(waker) = self.conn_waker.take() {
                waker.wake();
            }
        }
        polled
    }

    fn poll_body_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match &mut self.body {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Failed => return Poll::Ready(Some(Err(BodyError::Incomplete))),
                BodyState::Length(left) => {
                    if !self.buf.is_empty() {
                        let take = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(self.buf.len());
                        *left -= take as u64;
                        if *left == 0 {
                            self.body = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(
                            self.buf.split_to(take).freeze(),
                        ))));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut self.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Trailers(t)) => {
                        self.body = BodyState::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::End) => {
                        self.body = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(_) => {
                        self.body = BodyState::Failed;
                        return Poll::Ready(Some(Err(BodyError::Malformed)));
                    }
                },
            }
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    self.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(BodyError::Incomplete)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(BodyError::Io(e))));
                }
            }
        }
    }
}

pub(super) struct Shared(Mutex<Inner>);

impl Shared {
    pub fn new(io: Transport, buf: BytesMut) -> Arc<Self> {
        Arc::new(Shared(Mutex::new(Inner {
            io: Some(io),
            buf,
            body: BodyState::Done,
            seq: 0,
            expect: Continue::NotExpected,
            conn_waker: None,
        })))
    }

    /// Never held across an await; a panic while held leaves nothing half-done that matters
    /// more than the connection it will close.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A request body read from an HTTP/1.1 client connection as the request's handler asks for it.
pub struct RequestBody {
    /// `None`: no body.
    shared: Option<Arc<Shared>>,
    seq: u64,
    /// The declared length, for `size_hint` before any of it is read.
    length: Option<u64>,
}

impl RequestBody {
    pub(super) fn empty() -> Self {
        RequestBody {
            shared: None,
            seq: 0,
            length: Some(0),
        }
    }

    pub(super) fn new(shared: Arc<Shared>, seq: u64, length: Option<u64>) -> Self {
        RequestBody {
            shared: Some(shared),
            seq,
            length,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(shared) = &this.shared else {
            return Poll::Ready(None);
        };
        let mut inner = shared.lock();
        if inner.seq != this.seq {
            return Poll::Ready(Some(Err(BodyError::Detached)));
        }
        if inner.expect == Continue::Expected {
            inner.expect = Continue::Wanted;
            if let Some(waker) = inner.conn_waker.take() {
                waker.wake();
            }
        }
        let polled = inner.poll_body(cx);
        if let Poll::Ready(None) = polled {
            drop(inner);
            this.shared = None;
            this.length = Some(0);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.shared.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The client's side of a connection that switched protocols (a WebSocket), once the 101 has
/// been written: the stream, and what the client sent past its request head before the switch.
pub type Upgraded = crate::http1::Rewind<Transport>;

/// In a request's extensions when it asks to switch protocols: resolves to the client's
/// connection once a 101 answer has been written, or fails if the answer was another.
/// (Cloneable as extensions must be; the connection goes to whichever clone asks first.)
#[derive(Clone)]
pub struct OnUpgrade(pub(super) Arc<Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl Future for OnUpgrade {
    type Output = Result<Upgraded, std::io::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let gone = || {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the connection did not switch protocols",
            )
        };
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(rx) = slot.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let polled = Pin::new(rx).poll(cx).map_err(|_| gone());
        if polled.is_ready() {
            *slot = None;
        }
        polled
    }
}
