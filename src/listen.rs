//! The accept loop every HTTP front shares: the next connection, or `None` once shutdown begins.
//! Accept errors (out of file descriptors and the like) are logged and retried after a short
//! pause instead of spinning. A connection past the front's `limits.max_connections` is reset
//! at once, so the client learns immediately instead of waiting in a queue; one that stays
//! without a request in flight for too long is closed ([`Watched`]), so a silent client cannot
//! hold a place.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::telemetry::{ConnectionGuard, Connections};

pub async fn next_connection<F: Future<Output = ()>>(
    listener: &TcpListener,
    mut shutdown: Pin<&mut F>,
    front: &'static str,
    connections: &Arc<Connections>,
) -> Option<(TcpStream, SocketAddr, ConnectionGuard)> {
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(guard) = connections.admit() else {
                        tracing::debug!(front, %peer, "connection refused: limits.max_connections reached");
                        // An RST rather than a FIN: nothing was read, nothing will be answered.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, guard));
                }
                Err(e) => {
                    tracing::warn!(error = %e, front, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// How long a gRPC client has to send its first bytes after connecting.
pub const FIRST_BYTES: Duration = Duration::from_secs(10);

/// A connection that holds its place among the front's `limits.max_connections` until dropped.
pub struct Counted<S> {
    inner: S,
    _open: ConnectionGuard,
}

impl<S> Counted<S> {
    pub fn new(inner: S, open: ConnectionGuard) -> Self {
        Counted { inner, _open: open }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Watched<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: Connected> Connected for Counted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Connections accepted on `listener` for a tonic server, each counted against `connections`
/// (past the limit they are reset, as on the other fronts) and closed if nothing arrives within
/// [`FIRST_BYTES`]. Ends, closing the listener, when the stream is dropped.
pub fn counted_incoming(
    listener: TcpListener,
    connections: Arc<Connections>,
    front: &'static str,
) -> ReceiverStream<std::io::Result<Counted<Watched<TcpStream>>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let closed = tx.clone();
        let closed = closed.closed();
        tokio::pin!(closed);
        while let Some((stream, _, open)) =
            next_connection(&listener, closed.as_mut(), front, &connections).await
        {
            let stream = Watched::until_first_bytes(stream, FIRST_BYTES);
            if tx.send(Ok(Counted::new(stream, open))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// What one connection is doing, shared by its IO ([`Watched`]) and its service: how many
/// requests are in flight, and since when it has been quiet.
pub struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// A request has begun (before that, the first-request deadline applies).
    started: AtomicBool,
    /// Milliseconds after `born` when the last request ended.
    quiet_since_ms: AtomicU64,
    /// The connection's task, to wake when the last request in flight ends (so the idle
    /// deadline is armed even if no byte arrives).
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            quiet_since_ms: AtomicU64::new(0),
            waker: Mutex::new(None),
        })
    }

    /// A request begins; it is in flight until the returned guard drops (for the proxy, with
    /// the response body; for an upgrade, with the tunnel).
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started.store(true, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// When the connection must close if nothing is in flight by then.
    fn deadline(&self, first_request: Duration, idle: Duration) -> Instant {
        let after = if self.started.load(Ordering::Relaxed) {
            let quiet = Duration::from_millis(self.quiet_since_ms.load(Ordering::Relaxed));
            quiet.saturating_add(idle)
        } else {
            first_request
        };
        // A limit too far out to represent is no limit (a century is far enough).
        self.born
            .checked_add(after)
            .unwrap_or_else(|| self.born + Duration::from_secs(100 * 365 * 86_400))
    }
}

/// A request in flight on its connection.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.quiet_since_ms.fetch_max(ms, Ordering::Relaxed);
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(w) = a.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
                w.wake();
            }
        }
    }
}

/// A connection's IO that fails its reads once the connection has had nothing in flight for
/// too long: no request within `first_request` of the accept (silent clients, a half-sent
/// HTTP/2 preface), or none for `idle` after the last one ended (HTTP/2 connections kept open
/// unused). The server then closes it, giving its place among `limits.max_connections` back.
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    first_request: Duration,
    idle: Duration,
    /// Armed at a deadline no later than the real one; re-armed when it fires early.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// For servers whose requests keygate cannot see (tonic): the deadline holds only until the
    /// first bytes arrive.
    until_first_bytes: bool,
    disarmed: bool,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>, first_request: Duration, idle: Duration) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(
            activity.deadline(first_request, idle).into(),
        ));
        Watched {
            inner,
            activity,
            first_request,
            idle,
            timer,
            until_first_bytes: false,
            disarmed: false,
        }
    }

    /// For a server whose requests are not tracked: close the connection if nothing at all
    /// arrives within `first_bytes` of the accept; after that, never.
    pub fn until_first_bytes(inner: S, first_bytes: Duration) -> Self {
        let mut w = Self::new(inner, Activity::new(), first_bytes, Duration::MAX);
        w.until_first_bytes = true;
        w
    }

    /// `Ready(Err)` once the connection has been quiet past its deadline.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        loop {
            if self.activity.in_flight.load(Ordering::Acquire) > 0 {
                // Woken when the last request ends, to arm the deadline then.
                let mut w = self
                    .activity
                    .waker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                drop(w);
                if self.activity.in_flight.load(Ordering::Acquire) > 0 {
                    return Poll::Pending;
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.activity.deadline(self.first_request, self.idle);
            if deadline <= Instant::now() {
                return Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection closed: no request in flight for too long",
                ));
            }
            // Fired early (a request came and went since it was armed): move it.
            self.timer.as_mut().reset(deadline.into());
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.disarmed {
            if let Poll::Ready(e) = self.poll_expired(cx) {
                return Poll::Ready(Err(e));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.until_first_bytes && buf.filled().len() > before {
            self.disarmed = true;
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight (see [`Activity::busy`]) until it has
    /// been sent or dropped.
    pub struct Tracked<B> {
        #[pin]
        body: B,
        busy: Option<Busy>,
    }
}

impl<B> Tracked<B> {
    pub fn new(body: B, busy: Busy) -> Self {
        Tracked {
            body,
            busy: Some(busy),
        }
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.busy.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
