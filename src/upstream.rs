//! The proxy's upstream client: HTTP/1.1 connections from hyper's `client::conn`, kept in a
//! small pool owned by one [`ProxyState`](crate::proxy::ProxyState), so with the thread-per-core
//! layout every thread has its own pool and its lock is never contended.
//!
//! A connection goes back to the pool when the response body it carried has been read to the
//! end (or had none); a body dropped half-way takes its connection with it. A request that a
//! pooled connection could not send at all (the upstream closed it while idle) is retried once
//! on a fresh connection; a request that may have reached the upstream is never retried.
//!
//! An `https://` upstream gets TLS on each new connection (ALPN `http/1.1`, SNI and certificate
//! checked against the upstream's name); the TCP connect and the handshake together
//! must finish within `connect_timeout`. Pooled connections stay TLS connections.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use arc_swap::ArcSwap;

use crate::config::UpstreamTlsSettings;
use crate::tls::TlsError;

/// What goes upstream: the client's streaming body, or one held in memory (empty for a
/// bodiless request, or read whole for an idempotent replay's fingerprint), which can be sent
/// again.
pub type UpBody = Either<Incoming, Full<Bytes>>;

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A copy of a request whose body is in memory, to send again.
fn replay(req: &Request<UpBody>) -> Option<Request<UpBody>> {
    let Either::Right(body) = req.body() else {
        return None;
    };
    let mut copy = Request::new(Either::Right(body.clone()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Why a request did not get a response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    #[error("connecting to the upstream failed: {0}")]
    Connect(std::io::Error),
    #[error("the TLS handshake with the upstream failed: {0}")]
    Tls(std::io::Error),
    #[error("the upstream connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// TLS to an `https://` upstream, shared by every thread's pool. The CA and client
/// certificate files are re-read when they change (short-lived client certificates from a
/// mesh or cert-manager), as the listeners' certificates are; a broken replacement keeps the
/// configuration in force. Connections already open keep theirs.
#[derive(Clone)]
pub struct UpstreamTls(Arc<TlsInner>);

struct TlsInner {
    settings: UpstreamTlsSettings,
    config: ArcSwap<rustls::ClientConfig>,
    /// What the files held when `config` was built (or last refused).
    seen: Mutex<Option<[u8; 32]>>,
    /// What the certificate is checked against, and the SNI when it is a DNS name.
    server_name: ServerName<'static>,
}

impl UpstreamTls {
    /// Read the CA and client certificate files (already checked by `config check`).
    pub fn new(settings: &UpstreamTlsSettings) -> Result<Self, TlsError> {
        let server_name =
            crate::tls::server_name(&settings.server_name).ok_or_else(|| TlsError {
                file: crate::tls::TlsFile::Cert,
                path: settings.server_name.clone(),
                reason: "is not a DNS name or an IP address".into(),
            })?;
        let seen = crate::tls::fingerprint_files(&Self::files(settings));
        Ok(Self(Arc::new(TlsInner {
            config: ArcSwap::from_pointee(Self::build(settings)?),
            settings: settings.clone(),
            seen: Mutex::new(seen),
            server_name,
        })))
    }

    fn build(settings: &UpstreamTlsSettings) -> Result<rustls::ClientConfig, TlsError> {
        crate::tls::client_config(
            settings.ca_file.as_deref(),
            settings.client_identity.as_ref(),
            &[b"http/1.1"],
        )
    }

    fn files(settings: &UpstreamTlsSettings) -> Vec<&std::path::Path> {
        let mut files: Vec<&std::path::Path> =
            settings.ca_file.iter().map(|p| p.as_path()).collect();
        if let Some(id) = &settings.client_identity {
            files.extend([id.cert.as_path(), id.key.as_path()]);
        }
        files
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.0.config.load_full())
    }

    /// Re-read the files; when they changed, put a configuration built from them in force, or
    /// keep the one in force and say why. Blocking file I/O.
    pub fn reload_if_changed(&self) {
        let inner = &self.0;
        let files = Self::files(&inner.settings);
        if files.is_empty() {
            return;
        }
        let now = crate::tls::fingerprint_files(&files);
        {
            let mut seen = inner.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match Self::build(&inner.settings) {
            Ok(config) => {
                inner.config.store(Arc::new(config));
                tracing::info!("proxy upstream TLS: new CA or client certificate files in force");
            }
            Err(e) => tracing::warn!(
                error = %e,
                "proxy upstream TLS: the changed files are not usable; keeping the ones in force"
            ),
        }
    }

    /// Follow the files until `shutdown` resolves.
    pub async fn watch(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(crate::tls::RELOAD_EVERY) => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }
}

/// A pool of HTTP/1.1 connections to one upstream address.
pub struct Upstream {
    /// `host:port` to connect to.
    authority: String,
    tls: Option<UpstreamTls>,
    connect_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<SendRequest<UpBody>>>,
    me: Weak<Upstream>,
}

impl Upstream {
    pub fn new(
        authority: String,
        tls: Option<UpstreamTls>,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Upstream {
            authority,
            tls,
            connect_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            me: me.clone(),
        })
    }

    /// Send `req` and return the response head; the body streams from the connection.
    pub async fn send(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        // A request without a body and with a method that is safe to repeat (RFC 9110 §9.2.2)
        // can be sent again when a reused connection turns out to be closed: an upstream that
        // closes an idle connection races the next request on it, and nginx retries the same way.
        let replayable = req.body().is_end_stream() && is_idempotent(req.method());
        let req: Request<UpBody> = if replayable {
            req.map(|_| Either::Right(Full::new(Bytes::new())))
        } else {
            req.map(Either::Left)
        };
        self.send_up(req, replayable).await
    }

    /// Send a request whose body has been read into memory already.
    pub async fn send_buffered(
        &self,
        req: Request<Bytes>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let replayable = is_idempotent(req.method());
        self.send_up(req.map(|b| Either::Right(Full::new(b))), replayable)
            .await
    }

    async fn send_up(
        &self,
        mut req: Request<UpBody>,
        replayable: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        if let Some(mut sender) = self.checkout().await {
            let again = if replayable { replay(&req) } else { None };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender)),
                Err(mut e) => match (e.take_message(), again) {
                    // Never written: the idle connection was closed under us. Retry below.
                    (Some(back), _) => req = back,
                    // Written, but the connection failed before an answer: send it again on a
                    // fresh connection, once.
                    (None, Some(again)) => {
                        tracing::debug!(error = %e.error(), "reused upstream connection failed; retrying");
                        req = again;
                    }
                    (None, None) => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        let resp = sender.send_request(req).await?;
        Ok(self.wrap(resp, sender))
    }

    fn wrap(&self, resp: Response<Incoming>, sender: SendRequest<UpBody>) -> Response<PooledBody> {
        resp.map(|inner| PooledBody {
            prefix: std::collections::VecDeque::new(),
            inner,
            sender: Some(sender),
            pool: self.me.clone(),
        })
    }

    /// An idle connection that is still open and ready, if there is one.
    async fn checkout(&self) -> Option<SendRequest<UpBody>> {
        loop {
            let mut sender = self.idle.lock().expect("pool lock").pop()?;
            if sender.is_closed() {
                continue;
            }
            // Usually ready already; right after a body ends the connection task may not have
            // polled yet, and this waits for it.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, sender: SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < self.max_idle {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<UpBody>, UpstreamError> {
        let connected = tokio::time::timeout(self.connect_timeout, async {
            let stream = TcpStream::connect(&self.authority)
                .await
                .map_err(UpstreamError::Connect)?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => handshake(stream).await,
                Some(tls) => {
                    let stream = tls
                        .connector()
                        .connect(tls.0.server_name.clone(), stream)
                        .await
                        .map_err(UpstreamError::Tls)?;
                    handshake(stream).await
                }
            }
        });
        connected.await.map_err(|_| UpstreamError::ConnectTimeout)?
    }
}

/// HTTP/1.1 on a connected stream; the connection is driven by its own task.
async fn handshake<S>(stream: S) -> Result<SendRequest<UpBody>, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// An upstream response body that returns its connection to the pool once fully read.
pub struct PooledBody {
    /// Frames already read from `inner` (by the idempotent replay, which reads ahead to store
    /// the answer), given out first.
    prefix: std::collections::VecDeque<Frame<Bytes>>,
    inner: Incoming,
    sender: Option<SendRequest<UpBody>>,
    pool: Weak<Upstream>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(frame) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// How reading a response body ahead ended.
pub enum ReadAhead {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// More than the limit (or trailers): the body, with what was read put back in front.
    TooLarge(PooledBody),
}

impl PooledBody {
    /// Read the body into memory if it is at most `limit` bytes; otherwise give it back intact.
    pub async fn read_ahead(mut self, limit: usize) -> Result<ReadAhead, hyper::Error> {
        use http_body_util::BodyExt;
        let mut whole = bytes::BytesMut::new();
        let mut frames = std::collections::VecDeque::new();
        while let Some(frame) = self.frame().await {
            let frame = frame?;
            match frame.data_ref() {
                Some(d) if whole.len() + d.len() <= limit => {
                    whole.extend_from_slice(d);
                    frames.push_back(frame);
                }
                _ => {
                    frames.push_back(frame);
                    frames.append(&mut self.prefix);
                    self.prefix = frames;
                    return Ok(ReadAhead::TooLarge(self));
                }
            }
        }
        Ok(ReadAhead::Whole(whole.freeze()))
    }
}

impl PooledBody {
    fn release(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.checkin(sender);
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing left (read to the end, or none at all, as for HEAD or 204) leaves
        // its connection reusable; one dropped half-way does not, and the sender just drops.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
