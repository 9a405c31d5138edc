//! The accept loop every HTTP front shares: the next connection, or `None` once shutdown begins.
//! Accept errors (out of file descriptors and the like) are logged and retried after a short
//! pause instead of spinning. A connection past the front's `limits.max_connections` (or, on
//! the proxy, its address's `proxy.max_connections_per_ip`) is reset at once, so the client learns
//! immediately instead of waiting in a queue; one that stays
//! without a request in flight for too long is closed ([`Watched`]), so a silent client cannot
//! hold a place.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::telemetry::{ConnectionGuard, Connections};

/// The next connection on `listener` that [`Connections::admit`] lets in (one past a limit is
/// reset and the next awaited), or `None` once `shutdown` resolves. `trusted`: peers not
/// limited per address (the proxy's trusted proxies).
pub async fn next_connection<F: Future<Output = ()>>(
    listener: &TcpListener,
    mut shutdown: Pin<&mut F>,
    front: &'static str,
    connections: &Arc<Connections>,
    trusted: &[IpNet],
) -> Option<(TcpStream, SocketAddr, ConnectionGuard)> {
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let ip = crate::snapshot::canonical_ip(peer.ip());
                    let Some(guard) = connections.admit(ip, trusted) else {
                        tracing::debug!(front, %peer, "connection refused: limits.max_connections (or proxy.max_connections_per_ip) reached");
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

/// How long a gRPC client has, from connecting (a TLS handshake included), to begin its first
/// request.
pub const FIRST_REQUEST: Duration = Duration::from_secs(10);

/// What a tonic request carries about its connection: the inner stream's info and the
/// connection's [`Activity`], for [`TrackRequests`].
#[derive(Clone)]
pub struct WatchedInfo<I> {
    pub inner: I,
    activity: Arc<Activity>,
}

impl<S: Connected> Connected for Watched<S> {
    type ConnectInfo = WatchedInfo<S::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        WatchedInfo {
            inner: self.inner.connect_info(),
            activity: self.activity.clone(),
        }
    }
}

type TcpInfo = tonic::transport::server::TcpConnectInfo;

/// The connection's activity, from a tonic request's extensions (plain or TLS).
fn activity_of(ext: &http::Extensions) -> Option<&Arc<Activity>> {
    ext.get::<WatchedInfo<TcpInfo>>()
        .map(|w| &w.activity)
        .or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<WatchedInfo<TcpInfo>>>()
                .map(|t| &t.get_ref().activity)
        })
}

/// The client's address, from a tonic request's extensions (plain or TLS).
pub fn remote_addr(ext: &http::Extensions) -> Option<SocketAddr> {
    ext.get::<WatchedInfo<TcpInfo>>()
        .and_then(|w| w.inner.remote_addr())
        .or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<WatchedInfo<TcpInfo>>>()
                .and_then(|t| t.get_ref().inner.remote_addr())
        })
}

/// A tower layer for tonic servers: each request is in flight on its connection (until its
/// response body, a stream included, ends), so gRPC connections get the same first-request and
/// idle rules as the HTTP fronts.
#[derive(Clone, Copy, Default)]
pub struct TrackRequestsLayer;

impl<S> tower_layer::Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> TrackRequests<S> {
        TrackRequests(inner)
    }
}

#[derive(Clone)]
pub struct TrackRequests<S>(S);

impl<S, B, R> tower_service::Service<http::Request<B>> for TrackRequests<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<Tracked<R>>;
    type Error = S::Error;
    type Future = TrackedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let busy = activity_of(req.extensions()).map(Activity::busy);
        TrackedCall {
            inner: self.0.call(req),
            busy,
        }
    }
}

pin_project_lite::pin_project! {
    /// A tracked call's future: hands its [`Busy`] to the response body.
    pub struct TrackedCall<F> {
        #[pin]
        inner: F,
        busy: Option<Busy>,
    }
}

impl<F, R, E> Future for TrackedCall<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<Tracked<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let mut busy = this.busy.take();
        if let Some(b) = busy.as_mut() {
            b.answered();
        }
        Poll::Ready(Ok(resp.map(|body| Tracked { body, busy })))
    }
}

/// Connections accepted on `listener` for a tonic server (with [`TrackRequestsLayer`]), each
/// counted against `connections` (past the limit they are reset, as on the other fronts) and
/// closed when no request begins within [`FIRST_REQUEST`] of the accept or none is in flight
/// for `idle`. Ends, closing the listener, when the stream is dropped.
pub fn counted_incoming(
    listener: TcpListener,
    connections: Arc<Connections>,
    idle: Duration,
    front: &'static str,
) -> ReceiverStream<std::io::Result<Watched<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let closed = tx.clone();
        let closed = closed.closed();
        tokio::pin!(closed);
        while let Some((stream, _, open)) =
            next_connection(&listener, closed.as_mut(), front, &connections, &[]).await
        {
            let stream = Watched::new(stream, Activity::new(), FIRST_REQUEST, idle).holding(open);
            if tx.send(Ok(stream)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// What one connection is doing, shared by its IO ([`Watched`]) and its service: how many
/// requests have begun and are in flight, and how many response frames have been sent.
/// Relaxed atomic adds per request and per response frame; no clock read, lock or wake-up on
/// the request path.
pub struct Activity {
    begun: AtomicU64,
    in_flight: AtomicU64,
    /// In flight without a response head yet (bounded by the front's own timeouts).
    waiting: AtomicU64,
    frames: AtomicU64,
    /// Whether the connection's server can say goodbye before it is closed as unused (HTTP/2's
    /// GOAWAY), and whether it should now: see [`Activity::offer_goodbye`].
    goodbye: AtomicU8,
}

/// [`Activity::goodbye`]: the connection is closed by failing its IO (HTTP/1.1, tonic's own
/// servers).
const GOODBYE_NONE: u8 = 0;
/// Its server says goodbye first ([`until_goodbye`]).
const GOODBYE_OFFERED: u8 = 1;
/// Unused past its deadline: its server should say goodbye now.
const GOODBYE_DUE: u8 = 2;

/// How long a connection told goodbye for being unused may stay open unused before its IO fails
/// (at most its idle period): time for the client's answer to HTTP/2's GOAWAY and PING and for
/// the streams that crossed the GOAWAY to finish.
const GOODBYE_GRACE: Duration = Duration::from_secs(5);

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            begun: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            goodbye: AtomicU8::new(GOODBYE_NONE),
        })
    }

    /// The connection's server can close it gracefully ([`until_goodbye`]): when the connection
    /// has served requests, has none in flight and has been unused past its deadline, it is
    /// asked to (HTTP/2: a GOAWAY, so a client that sends a request at that moment is not cut
    /// off mid-call, as Envoy's ext_authz client would be, turning the Check into a denial), and
    /// its IO fails only if it is still open and unused a grace period later.
    pub fn offer_goodbye(&self) {
        let _ = self.goodbye.compare_exchange(
            GOODBYE_NONE,
            GOODBYE_OFFERED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn goodbye_due(&self) -> bool {
        self.goodbye.load(Ordering::Relaxed) == GOODBYE_DUE
    }

    /// A request begins; it is in flight until the returned guard drops (with its response
    /// body, [`Tracked`], whose frames count as use; an upgraded tunnel holds one too).
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Busy {
            activity: self.clone(),
            waiting: true,
        }
    }
}

/// A request in flight on its connection (see [`Activity::busy`]).
pub struct Busy {
    activity: Arc<Activity>,
    waiting: bool,
}

impl Busy {
    /// The response head is ready: from now on the request counts as use only while its
    /// frames or bytes move (an upgraded tunnel too).
    pub fn answered(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.activity.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn frame_sent(&self) {
        self.activity.frames.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.answered();
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's IO that fails its reads once the connection has been unused for too long,
/// so the server closes it and its place among `limits.max_connections` comes back:
/// - no request begun within `first_request` of the accept (silent clients, a half-sent
///   HTTP/2 preface trickled a byte at a time, a TLS handshake and then nothing);
/// - later, a whole `idle` period (checked when the timer fires: so closed between `idle` and
///   twice that after the last use) in which no request began, none waited for its answer
///   and, if one is in flight, no response frame was sent and no byte moved either way: HTTP/2 connections kept open unused
///   (their keep-alive PINGs do not count), a client that stopped reading its response over
///   HTTP/1.1 (it holds an upstream connection too), a silent WebSocket tunnel. Over HTTP/2 a
///   stream in flight counts as used while PINGs are answered, so quiet gRPC streams (health
///   Watch) are kept as long as their client answers.
///
/// A connection whose server can say goodbye ([`Activity::offer_goodbye`]) and that has served
/// requests, none in flight, is asked to at that deadline instead, and its IO fails only if it
/// is still open and unused a grace period later.
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    idle: Duration,
    /// Always armed: at the first-request deadline, then every `idle`.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Wakes every task that asked, not only the last: keygate's HTTP/1.1 side reads a request
    /// body in one task while another writes the answer, and either may be the one left
    /// waiting when the deadline passes.
    wakers: Arc<Wakers>,
    waker: std::task::Waker,
    /// Requests begun, response frames sent and bytes moved when the timer was last armed.
    then: (u64, u64, u64),
    /// Bytes read from and written to the client.
    moved: u64,
    /// For tonic's connections, which keygate does not hold otherwise: the connection's place
    /// among `limits.max_connections`, given back when the connection is dropped.
    _open: Option<ConnectionGuard>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>, first_request: Duration, idle: Duration) -> Self {
        let wakers = Arc::new(Wakers::default());
        Watched {
            inner,
            activity,
            idle,
            timer: Box::pin(tokio::time::sleep(first_request)),
            wakers: wakers.clone(),
            waker: std::task::Waker::from(wakers),
            then: (0, 0, 0),
            moved: 0,
            _open: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The same, holding the connection's place until it is dropped (tonic's connections,
    /// whose requests [`TrackRequests`] marks on the connection's [`Activity`]).
    pub fn holding(mut self, open: ConnectionGuard) -> Self {
        self._open = Some(open);
        self
    }

    /// `Ready(Err)` once the connection has been unused past its deadline.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        self.wakers.register(cx.waker());
        let mut fanned = Context::from_waker(&self.waker);
        while self.timer.as_mut().poll(&mut fanned).is_ready() {
            let now = (
                self.activity.begun.load(Ordering::Relaxed),
                self.activity.frames.load(Ordering::Relaxed),
                self.moved,
            );
            // A new request is use. Frames and bytes are use only for a request in flight:
            // bytes trickled into a preface or a handshake, or keep-alive PINGs on an unused
            // connection, are not.
            let a = &self.activity;
            let in_flight = a.in_flight.load(Ordering::Relaxed) > 0;
            let waiting = a.waiting.load(Ordering::Relaxed) > 0;
            let used = now.0 != self.then.0 || waiting || (in_flight && now != self.then);
            let mut period = self.idle;
            if !used {
                // A goodbye helps only a connection that has served requests and has none in
                // flight: a request may be on its way. One that never began a request (a silent
                // client, half a preface, half a head) or whose client stopped reading is cut
                // at once, as before; so is one told goodbye already and still here unused a
                // grace period later.
                let asked = now.0 > 0
                    && !in_flight
                    && a.goodbye
                        .compare_exchange(
                            GOODBYE_OFFERED,
                            GOODBYE_DUE,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok();
                if !asked {
                    return Poll::Ready(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connection closed: unused for too long",
                    ));
                }
                // The connection's task looks at the flag when this poll returns.
                cx.waker().wake_by_ref();
                period = self.idle.min(GOODBYE_GRACE);
            }
            // Look again in a whole idle period (a grace period after a goodbye).
            self.then = now;
            let next = tokio::time::Instant::now()
                .checked_add(period)
                .unwrap_or_else(|| tokio::time::Instant::now() + FAR);
            self.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl crate::server::Stream for Watched<TcpStream> {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        Watched::poll_expired(self, cx)
    }
}

impl crate::server::Stream for tokio_rustls::server::TlsStream<Watched<TcpStream>> {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        Watched::poll_expired(self.get_mut().0, cx)
    }
}

/// Serves a hyper connection until it ends, saying goodbye with `goodbye` (its
/// `graceful_shutdown`: over HTTP/2 a GOAWAY, after which the streams in flight finish and the
/// client opens no new one) once `stopping` turns true (the front is shutting down) or the
/// connection has been unused past its deadline ([`Watched`], which this offers the goodbye
/// to). A connection closed for being unused without a GOAWAY leaves a client that sent a
/// request at that moment with a reset stream, and nothing to tell that the request was never
/// seen.
pub async fn until_goodbye<C, E>(
    conn: C,
    goodbye: impl FnOnce(Pin<&mut C>),
    activity: &Activity,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    activity.offer_goodbye();
    let mut conn = std::pin::pin!(conn);
    let stopped = async move {
        // A sender dropped without a stop is no reason to say goodbye.
        if stopping.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let mut stopped = std::pin::pin!(stopped);
    let mut goodbye = Some(goodbye);
    std::future::poll_fn(|cx| {
        // `stopped` is polled only until the goodbye is said, so never after it completed.
        if let Some(say) = goodbye.take_if(|_| stopped.as_mut().poll(cx).is_ready()) {
            say(conn.as_mut());
        }
        let served = conn.as_mut().poll(cx);
        if served.is_ready() {
            return served;
        }
        // The connection's IO marks the goodbye due from inside the poll just made.
        match goodbye.take_if(|_| activity.goodbye_due()) {
            Some(say) => {
                say(conn.as_mut());
                conn.as_mut().poll(cx)
            }
            None => served,
        }
    })
    .await
}

/// Resolves once every connection counted in `connections` has closed: a front's drain.
pub async fn drained(connections: &Connections) {
    while connections.open() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The tasks waiting on a connection's deadline (at most two: a request body's reader and the
/// connection's writer).
#[derive(Default)]
struct Wakers(std::sync::Mutex<[Option<std::task::Waker>; 2]>);

impl Wakers {
    fn register(&self, waker: &std::task::Waker) {
        let mut slots = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slots.iter().flatten().any(|w| w.will_wake(waker)) {
            return;
        }
        // The older one goes when a third task asks.
        slots[1] = slots[0].take();
        slots[0] = Some(waker.clone());
    }
}

impl std::task::Wake for Wakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let woken = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for w in woken.into_iter().flatten() {
            w.wake();
        }
    }
}

/// A limit too far out to represent is no limit.
const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Poll::Ready(e) = self.poll_expired(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.moved += (buf.filled().len() - before) as u64;
        read
    }
}

impl<S> Watched<S> {
    /// Count what a write moved; a write that must wait is where a client that stopped
    /// reading is found, so the deadline holds for writes too.
    fn wrote(
        &mut self,
        written: Poll<std::io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => self.moved += n as u64,
            Poll::Pending => {
                if let Poll::Ready(e) = self.poll_expired(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        written
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(written, cx)
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
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(written, cx)
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
    pub fn new(body: B, mut busy: Busy) -> Self {
        busy.answered();
        Tracked {
            body,
            busy: Some(busy),
        }
    }
}

impl<B: crate::server::PassedFields> crate::server::PassedFields for Tracked<B> {
    fn passed(&self) -> Option<&crate::upstream::wire::Fields> {
        self.body.passed()
    }

    fn own_field(&self) -> Option<(&http::HeaderName, &http::HeaderValue)> {
        self.body.own_field()
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
        match &frame {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(b) = this.busy.as_ref() {
                    b.frame_sent();
                }
            }
            Poll::Ready(None | Some(Err(_))) => {
                this.busy.take();
            }
            Poll::Pending => {}
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
