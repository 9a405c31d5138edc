//! The proxy's upstream client: HTTP/1.1 connections kept in a small pool owned by one
//! [`ProxyState`](crate::proxy::ProxyState), so with the thread-per-core layout every thread has
//! its own pool and its lock is never contended. The wire format is [`wire`]; a connection is
//! driven by the request using it ([`conn`]), with no task of its own.
//!
//! A connection goes back to the pool when the response body it carried has been read to the
//! end (or had none) and the upstream lets it be reused; a body dropped half-way takes its
//! connection with it. An idle connection is checked before use (one non-blocking read: closed,
//! or sending unasked, it is dropped). A request that a reused connection got no answer to at
//! all is sent once more on a fresh connection when that is safe: its head never went out
//! whole, or it is idempotent with its body in memory. Anything else is never retried.
//!
//! An `https://` upstream gets TLS on each new connection (ALPN `http/1.1`, SNI and certificate
//! checked against the upstream's name); the TCP connect and the handshake together
//! must finish within `connect_timeout`. Pooled connections stay TLS connections.

mod conn;
pub mod wire;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::server::ClientBody;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Method, Response};
use http_body::{Body, Frame, SizeHint};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use arc_swap::ArcSwap;

use crate::config::UpstreamTlsSettings;
use crate::headers::RequestFields;
use crate::tls::TlsError;
use conn::{Conn, Failed, Outgoing, Polled, ResponseBody, Transport};
pub use conn::{ConnError, Progress, Tunnel};
pub use wire::Added;

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A request's head on its way upstream.
#[derive(Debug)]
pub struct Outbound {
    pub method: Method,
    /// The request target in origin form (`/path?query`): the pool knows where it connects.
    pub target: PathAndQuery,
    /// The request's own fields, less what keygate took out.
    pub fields: RequestFields,
    /// keygate's fields, written after `fields` (which holds none of their names).
    pub added: Added,
    /// The request asks to switch protocols (its `Upgrade` is kept): a 101 is welcome.
    pub upgrade: bool,
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
    Exchange(#[from] ConnError),
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
    idle: Mutex<Vec<Conn>>,
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

    /// Send a request and return the response head; the body streams from the connection.
    ///
    /// A body that streams up notes its pieces in `progress` (one is made if none is given), by
    /// which the caller can tell how long ago it last moved.
    pub async fn send(
        &self,
        head: &Outbound,
        body: ClientBody,
        progress: Option<Arc<Progress>>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        // A request without a body and with a method that is safe to repeat (RFC 9110 §9.2.2)
        // can be sent again when a reused connection turns out to be closed: an upstream that
        // closes an idle connection races the next request on it, and nginx retries the same way.
        let (body, replayable) = if body.is_end_stream() {
            (Outgoing::Bytes(Bytes::new()), is_idempotent(&head.method))
        } else {
            (Outgoing::Stream(body, progress.unwrap_or_default()), false)
        };
        self.send_up(head, body, replayable).await
    }

    /// Send a request whose body has been read into memory already.
    pub async fn send_buffered(
        &self,
        head: &Outbound,
        body: Bytes,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        // Only the idempotent replay sends a request read whole: one its Idempotency-Key guards,
        // whose client asked for it to run at most once. Sent again only when its head never
        // went out whole: a PUT or DELETE is idempotent by its method, but not always in
        // practice (a DELETE of a queue's head, one that refunds), with a body or without.
        self.send_up(head, Outgoing::Bytes(body), false).await
    }

    async fn send_up(
        &self,
        head: &Outbound,
        mut body: Outgoing,
        replayable: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        if let Some(mut conn) = self.checkout() {
            match conn.exchange(head, body).await {
                Ok((answer, whole)) => return Ok(self.wrap(answer, conn, whole)),
                // No answer on a reused connection: retry on a fresh one, once, when safe.
                Err(Failed {
                    error,
                    body: Some(back),
                    sent,
                }) if replayable || !sent => {
                    tracing::debug!(error = %error, "reused upstream connection failed; retrying");
                    body = back;
                }
                Err(failed) => return Err(failed.error.into()),
            }
        }
        let mut conn = self.connect().await?;
        match conn.exchange(head, body).await {
            Ok((answer, whole)) => Ok(self.wrap(answer, conn, whole)),
            Err(failed) => Err(failed.error.into()),
        }
    }

    fn wrap(&self, head: wire::Head, conn: Conn, whole: bool) -> Response<PooledBody> {
        let inner = ResponseBody::new(conn, &head, whole);
        // The answer's map starts empty: its fields travel with the body (see `PooledBody`).
        let mut resp = Response::new(PooledBody(Box::new(Pooled {
            fields: head.fields,
            own: None,
            identity: None,
            prefix: VecDeque::new(),
            held: None,
            inner,
            pool: self.me.clone(),
        })));
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        resp
    }

    /// An idle connection that is still open, if there is one.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = self.idle.lock().expect("pool lock").pop()?;
            if conn.is_usable() {
                return Some(conn);
            }
        }
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let connected = tokio::time::timeout(self.connect_timeout, async {
            let stream = TcpStream::connect(&self.authority)
                .await
                .map_err(UpstreamError::Connect)?;
            let _ = stream.set_nodelay(true);
            let io = match &self.tls {
                None => Box::new(stream) as Transport,
                Some(tls) => Box::new(
                    tls.connector()
                        .connect(tls.0.server_name.clone(), stream)
                        .await
                        .map_err(UpstreamError::Tls)?,
                ),
            };
            Ok(Conn::new(io))
        });
        connected.await.map_err(|_| UpstreamError::ConnectTimeout)?
    }
}

/// An upstream response body that returns its connection to the pool once fully read. Boxed: the
/// response that carries it is moved through several futures' states on every request.
pub struct PooledBody(Box<Pooled>);

struct Pooled {
    /// The answer's header fields as the upstream sent them. They are not in the response's
    /// map, which holds only what keygate adds (and wins over these): the HTTP/1.1 side writes
    /// them as they are, and [`PooledBody::merge_fields`] makes map entries of them where a map
    /// is needed.
    fields: wire::Fields,
    /// keygate's field in place of the upstream's of that name (the request id): written after
    /// the upstream's fields, or merged into the map with them. Carried here rather than in the
    /// response's map, which would cost the map's two allocations on every answer.
    own: Option<(http::HeaderName, http::HeaderValue)>,
    /// Identity and request-id names to keep out of the answer's trailers (only keygate sets
    /// them); see [`PooledBody::keep_out_of_trailers`].
    identity: Option<Arc<crate::config::HeaderNames>>,
    /// Frames already read from `inner` (by the idempotent replay, which reads ahead to store
    /// the answer), given out first.
    prefix: VecDeque<Frame<Bytes>>,
    inner: ResponseBody,
    pool: Weak<Upstream>,
    /// Held while the body lives: an idempotent request's claim on its key, for an answer that
    /// streams on unkept (a retry meanwhile is told 409, not run beside it).
    held: Option<Box<dyn std::any::Any + Send>>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = ConnError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        if let Some(frame) = self.0.prefix.pop_front() {
            return Poll::Ready(Some(Ok(self.clean(frame))));
        }
        match self.0.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Polled::Frame(frame))) => Poll::Ready(Some(Ok(self.clean(frame)))),
            Poll::Ready(Ok(Polled::End(conn))) => {
                if let Some(conn) = conn {
                    self.0.release(conn);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.prefix.is_empty() && self.0.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead: u64 = self
            .0
            .prefix
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self.0.inner.size_hint();
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
    /// More than the limit, trailers, or not whole by the deadline: the body, with what was
    /// read put back in front.
    NotWhole(PooledBody),
}

impl PooledBody {
    /// Keep every spelling of `names`' identity and request-id fields out of the trailers.
    pub fn keep_out_of_trailers(&mut self, names: Arc<crate::config::HeaderNames>) {
        self.0.identity = Some(names);
    }

    fn clean(&self, frame: Frame<Bytes>) -> Frame<Bytes> {
        match (frame.into_trailers(), &self.0.identity) {
            (Ok(mut t), Some(names)) => {
                crate::headers::strip_trailers(&mut t, Some(names));
                Frame::trailers(t)
            }
            (Ok(t), None) => Frame::trailers(t),
            (Err(frame), _) => frame,
        }
    }

    /// The upstream's header fields still to be written (see the field's doc).
    pub fn fields(&self) -> &wire::Fields {
        &self.0.fields
    }

    /// Answer with `name: value` in place of the upstream's fields of that name.
    pub fn set_own_field(&mut self, name: http::HeaderName, value: http::HeaderValue) {
        let spelled = name.as_str().as_bytes();
        self.0
            .fields
            .remove_where(|n| n.len() == spelled.len() && n.eq_ignore_ascii_case(spelled));
        self.0.own = Some((name, value));
    }

    pub fn own_field(&self) -> Option<(&http::HeaderName, &http::HeaderValue)> {
        self.0.own.as_ref().map(|(n, v)| (n, v))
    }

    /// Move the upstream's header fields, and keygate's own field, into `map`, where the
    /// values keygate put there win.
    pub fn merge_fields(&mut self, map: &mut http::HeaderMap) -> Result<(), wire::WireError> {
        let fields = std::mem::take(&mut self.0.fields);
        fields
            .merge_into(map)
            .map_err(|_| wire::WireError::MalformedHead)?;
        if let Some((name, value)) = self.0.own.take() {
            if let http::header::Entry::Vacant(e) = map.entry(name) {
                e.insert(value);
            }
        }
        Ok(())
    }

    /// Keep `guard` until this body is dropped (read to its end, or given up).
    pub fn hold(&mut self, guard: impl std::any::Any + Send) {
        self.0.held = Some(Box::new(guard));
    }

    /// Read the body into memory if it is at most `limit` bytes (and, with `until`, whole by
    /// then); otherwise give it back intact.
    pub async fn read_ahead(
        mut self,
        limit: usize,
        until: Option<tokio::time::Instant>,
    ) -> Result<ReadAhead, ConnError> {
        use http_body_util::BodyExt;
        let mut whole = bytes::BytesMut::new();
        let mut frames = VecDeque::new();
        loop {
            let next = match until {
                None => self.frame().await,
                Some(until) => match tokio::time::timeout_at(until, self.frame()).await {
                    Ok(next) => next,
                    // Not whole by then: what came goes back in front, and the body streams on.
                    Err(_) => {
                        frames.append(&mut self.0.prefix);
                        self.0.prefix = frames;
                        return Ok(ReadAhead::NotWhole(self));
                    }
                },
            };
            let Some(frame) = next else { break };
            let frame = frame?;
            match frame.data_ref() {
                Some(d) if whole.len() + d.len() <= limit => {
                    whole.extend_from_slice(d);
                    frames.push_back(frame);
                }
                _ => {
                    frames.push_back(frame);
                    frames.append(&mut self.0.prefix);
                    self.0.prefix = frames;
                    return Ok(ReadAhead::NotWhole(self));
                }
            }
        }
        Ok(ReadAhead::Whole(whole.freeze()))
    }

    /// After a 101 Switching Protocols: the upstream connection as a byte stream.
    pub fn into_tunnel(mut self) -> Option<Tunnel> {
        self.0.inner.take_conn().and_then(|conn| conn.into_tunnel())
    }
}

impl Pooled {
    fn release(&self, conn: Conn) {
        if let Some(pool) = self.pool.upgrade() {
            pool.checkin(conn);
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // A body with nothing left (read to the end, or none at all, as for HEAD or 204) leaves
        // its connection reusable; one dropped half-way does not, and its connection closes.
        if let Some(conn) = self.inner.take_reusable() {
            self.release(conn);
        }
    }
}
