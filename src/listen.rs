//! The accept loop every HTTP front shares: the next connection, or `None` once shutdown begins.
//! Accept errors (out of file descriptors and the like) are logged and retried after a short
//! pause instead of spinning. A connection past the front's `limits.max_connections` (or, on
//! the proxy, its address's `proxy.max_connections_per_ip`) is reset at once, so the client
//! learns immediately instead of waiting in a queue; one that stays without a request in flight
//! for too long is closed ([`Watched`]), so a silent client cannot hold a place. The gRPC fronts
//! (ext_authz, sync_server) share the rest of their serving too ([`Http2Front`], [`Routed`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Limits;
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

/// [`Activity::goodbye`]: the connection is closed by failing its IO (HTTP/1.1).
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

    /// A frame of the answer went out (use of the connection while the request is in flight).
    pub fn frame_sent(&self) {
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
    /// Whether the timer waits with `waker` (it keeps it when re-armed and gives it up when it
    /// fires): polling it again before it fires would register the same waker again.
    armed: bool,
    /// Wakes every task that asked, not only the last: keygate's HTTP/1.1 side reads a request
    /// body in one task while another writes the answer, and either may be the one left
    /// waiting when the deadline passes.
    wakers: Arc<Wakers>,
    waker: std::task::Waker,
    /// Requests begun, response frames sent and bytes moved when the timer was last armed.
    then: (u64, u64, u64),
    /// Bytes read from and written to the client.
    moved: u64,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>, first_request: Duration, idle: Duration) -> Self {
        let wakers = Arc::new(Wakers::default());
        Watched {
            inner,
            activity,
            idle,
            timer: Box::pin(tokio::time::sleep(first_request)),
            armed: false,
            wakers: wakers.clone(),
            waker: std::task::Waker::from(wakers),
            then: (0, 0, 0),
            moved: 0,
        }
    }

    /// `Ready(Err)` once the connection has been unused past its deadline.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        self.wakers.register(cx.waker());
        if self.armed && !self.timer.is_elapsed() {
            return Poll::Pending;
        }
        let mut fanned = Context::from_waker(&self.waker);
        loop {
            // With the task's coop budget spent, the timer answers Pending before it registers
            // the waker (or is even made): then it is not armed, and the next poll must look.
            let budget = tokio::task::coop::has_budget_remaining();
            if self.timer.as_mut().poll(&mut fanned).is_pending() {
                self.armed = budget;
                return Poll::Pending;
            }
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
    }

    /// Whether the timer may have fired, or waits with no waker: the deadline must be looked
    /// at before reading on, not only when a read has to wait (a client whose bytes never let
    /// a read wait, but whose reads are cut short by tokio's budget, would never be looked at).
    fn may_have_expired(&self) -> bool {
        !self.armed || self.timer.is_elapsed()
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

/// hyper's HTTP/2 server with the `[limits]` of every HTTP/2 front.
pub type Http2 = hyper::server::conn::http2::Builder<crate::clock::Executor>;

pub fn http2_builder(r: &Limits) -> Http2 {
    let mut builder = Http2::new(crate::clock::Executor);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(r.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(r.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(r.http2_max_local_error_reset_streams)
        .keep_alive_interval(r.http2_keep_alive_interval)
        .keep_alive_timeout(r.http2_keep_alive_timeout);
    builder
}

/// One connection's HTTP/2 on `io` (after its TLS handshake, if any), served until it closes.
pub fn http2<I, S, B>(
    builder: &Http2,
    io: I,
    service: S,
) -> hyper::server::conn::http2::Connection<TokioIo<Unvectored<I>>, S, crate::clock::Executor>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    builder.serve_connection(TokioIo::new(Unvectored(io)), service)
}

/// A gRPC front (ext_authz on h2 itself, sync_server on hyper's HTTP/2): what
/// [`Http2Front::serve_with`] needs.
pub struct Http2Front {
    pub name: &'static str,
    pub connections: Arc<Connections>,
    pub tls: Option<Arc<crate::tls::TlsServer>>,
    pub limits: Limits,
    /// How long the connections in flight get to finish once `shutdown` resolves.
    pub drain: Duration,
}

/// A client has this long to complete its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// What serves one connection of an [`Http2Front`], once accepted (and its TLS handshake done):
/// until it closes, saying goodbye (GOAWAY) once `stopping` turns true or the connection has
/// been unused too long ([`until_goodbye`]).
pub trait Http2Serve: Send + Sync + 'static {
    fn serve<I>(
        &self,
        io: I,
        activity: Arc<Activity>,
        peer: SocketAddr,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static;
}

/// [`Http2Serve`] with hyper's HTTP/2 server and the service `make(activity, peer)` makes for
/// each connection.
pub struct HyperHttp2<F> {
    builder: Http2,
    make: F,
}

impl<F, S, B> Http2Serve for HyperHttp2<F>
where
    F: Fn(Arc<Activity>, SocketAddr) -> S + Send + Sync + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
        let conn = http2(&self.builder, io, (self.make)(activity.clone(), peer));
        async move {
            let _ = until_goodbye(conn, |c| c.graceful_shutdown(), &activity, stopping).await;
        }
    }
}

impl Http2Front {
    /// Serve connections from `listener` until `shutdown` resolves, each with hyper's HTTP/2
    /// server and the service `service(activity, peer)` makes for it (see [`Self::serve_with`]).
    pub async fn serve<S, B>(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        service: impl Fn(Arc<Activity>, SocketAddr) -> S + Send + Sync + 'static,
    ) where
        S: hyper::service::HttpService<Incoming, ResBody = B> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut builder = http2_builder(&self.limits);
        // gRPC does not read a `Date`; without it no answer reads the clock for one or spends
        // HPACK's work on it.
        builder.auto_date_header(false);
        let serving = HyperHttp2 {
            builder,
            make: service,
        };
        self.serve_with(listener, shutdown, serving).await;
    }

    /// Serve connections from `listener` until `shutdown` resolves, each served by `serving`:
    /// counted against `limits.max_connections`, TLS when configured, first request due within
    /// [`FIRST_REQUEST`] of the accept (a handshake included), told goodbye (GOAWAY) and then
    /// closed when unused ([`Watched`], [`until_goodbye`]). Then every connection says goodbye
    /// and finishes its streams in flight within `drain`.
    pub async fn serve_with(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        serving: impl Http2Serve,
    ) {
        let serving = Arc::new(serving);
        let idle = self.limits.idle_timeout;
        let front = self.name;
        // True once the listener has stopped: every connection says goodbye (GOAWAY) and
        // finishes its streams in flight.
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        while let Some((stream, peer, open)) =
            next_connection(&listener, shutdown.as_mut(), front, &self.connections, &[]).await
        {
            let activity = Activity::new();
            let stream = Watched::new(stream, activity.clone(), FIRST_REQUEST, idle);
            let (stopping, serving, tls) = (stopping.clone(), serving.clone(), self.tls.clone());
            tokio::spawn(crate::clock::PerPoll::new(async move {
                match tls {
                    None => serving.serve(stream, activity, peer, stopping).await,
                    Some(tls) => match tls.accept(stream, HANDSHAKE).await {
                        Ok(stream) => serving.serve(stream, activity, peer, stopping).await,
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, front, "TLS handshake failed");
                        }
                    },
                }
                drop(open);
            }));
        }
        drop(listener);
        stopping_tx.send_replace(true);
        let _ = tokio::time::timeout(self.drain, drained(&self.connections)).await;
    }
}

/// The client's address, in the extensions of a request served by an [`Http2Front`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// tonic's routes as one connection's service on an [`Http2Front`]: each call is in flight on
/// the connection's [`Activity`] until its answer (a stream included) has been sent, and carries
/// the client's address ([`ClientAddr`]).
#[derive(Clone)]
pub struct Routed {
    routes: tonic::service::Routes,
    activity: Arc<Activity>,
    peer: SocketAddr,
}

impl Routed {
    pub fn new(routes: tonic::service::Routes, activity: Arc<Activity>, peer: SocketAddr) -> Self {
        Routed {
            routes,
            activity,
            peer,
        }
    }

    /// A call begins on the connection (see [`Activity::busy`]).
    pub fn busy(&self) -> Busy {
        self.activity.busy()
    }

    /// Answer `req` with the routes, in flight as `busy`, the answer's body made into `R`.
    pub fn answer<Q, R>(
        &self,
        mut req: http::Request<Q>,
        busy: Busy,
        body: impl FnOnce(tonic::body::Body) -> R + Send + 'static,
    ) -> impl Future<Output = Result<http::Response<Tracked<R>>, Infallible>> + Send + 'static
    where
        Q: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        Q::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        req.extensions_mut().insert(ClientAddr(self.peer));
        let mut routes = self.routes.clone();
        async move {
            type Tonic = tonic::service::Routes;
            std::future::poll_fn(|cx| {
                <Tonic as tower_service::Service<http::Request<Q>>>::poll_ready(&mut routes, cx)
            })
            .await?;
            let answer = tower_service::Service::call(&mut routes, req).await?;
            Ok(answer.map(|b| Tracked::new(body(b), busy)))
        }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Routed {
    type Response = http::Response<Tracked<tonic::body::Body>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        Box::pin(self.answer(req, self.busy(), |body| body))
    }
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
pub struct Unvectored<S>(S);

impl<S> Unvectored<S> {
    pub fn new(io: S) -> Self {
        Unvectored(io)
    }
}

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
        // The deadline matters to a read that must wait (as for writes, `wrote`), and to any read
        // once the timer has fired.
        let looked = self.may_have_expired();
        if looked {
            if let Poll::Ready(e) = self.poll_expired(cx) {
                return Poll::Ready(Err(e));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.moved += (buf.filled().len() - before) as u64;
        if read.is_pending() && !looked {
            if let Poll::Ready(e) = self.poll_expired(cx) {
                return Poll::Ready(Err(e));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's deadline first looked at when the task's budget is spent (the timer
    /// answers Pending without registering anything) still expires.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_first_looked_at_out_of_budget_still_expires() {
        let second = Duration::from_secs(1);
        let mut watched = Watched::new((), Activity::new(), second, second);
        std::future::poll_fn(|cx| {
            crate::deadline::tests::spend_coop_budget();
            assert!(watched.poll_expired(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert!(watched.may_have_expired(), "the timer waits with no waker");
        // Spending the budget woke the task, which is polled again with a new one.
        tokio::task::yield_now().await;
        let pending = std::future::poll_fn(|cx| Poll::Ready(watched.poll_expired(cx).is_pending()));
        assert!(pending.await);
        assert!(!watched.may_have_expired());
        tokio::time::advance(2 * second).await;
        assert!(watched.may_have_expired(), "the timer did not fire");
        let expired = std::future::poll_fn(|cx| Poll::Ready(watched.poll_expired(cx).is_ready()));
        assert!(
            expired.await,
            "unused two seconds past a one-second deadline"
        );
    }
}
