//! The `grpc` snapshot source: follow a hub's `keygate.sync.v1` Watch stream.
//!
//! The client keeps the document as entries by id, applies each delta to them, re-indexes off the
//! request path and publishes. A stream that breaks, ends, or stays silent longer than
//! `snapshot.idle_timeout` (the hub sends heartbeats; a message still arriving, such as a large
//! full snapshot over a slow link, is not silence) is dropped and reopened with the revision
//! held, after a backoff with jitter; until then the snapshot in force keeps serving, for as long
//! as `snapshot.max_staleness` allows, counted from the hub's own last confirmation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use serde_json::value::RawValue;
use tonic::codec::Streaming;
use tonic::transport::{Channel, Endpoint};

use super::proto::sync_client::SyncClient as Stub;
use super::proto::{watch_response::Event, WatchRequest, WatchResponse};
use crate::config::SnapshotSettings;
use crate::snapshot::document::{self, Document};
use crate::snapshot::http_source::{backoff, error_chain};
use crate::snapshot::{SnapshotStore, SourceStats};

/// Why the stream is dropped (and reopened).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot reach the hub: {0}")]
    Connect(String),
    #[error("the hub refused the watch: {0}")]
    Refused(String),
    #[error("the hub did not answer the watch within {0:?}")]
    NoAnswer(Duration),
    #[error("the stream broke: {0}")]
    Broken(String),
    #[error("the hub ended the stream")]
    Ended,
    #[error("no message for {0:?} (heartbeats stopped)")]
    Silent(Duration),
    #[error("a delta from revision {from} does not apply to revision {held}")]
    Gap { from: u64, held: u64 },
    #[error("the hub sent a document keygate refuses: {0}")]
    Document(String),
}

pub struct SyncClient {
    settings: SnapshotSettings,
    endpoint: Endpoint,
    doc: Option<Arc<Document>>,
    stream: Option<Streaming<WatchResponse>>,
    /// When the stream in use was opened.
    opened: Option<std::time::Instant>,
    /// Streams lost in a row; a stream that held for `idle_timeout` (or `backoff_max`, if
    /// shorter) starts the count over.
    failures: u32,
    cache_touch: crate::snapshot::cache::Toucher,
    /// Bytes read from the hub so far, to tell a message still arriving from silence.
    received: Arc<AtomicU64>,
}

/// Bytes that must arrive within `idle_timeout` for a message still arriving to count as one:
/// far more than the hub's HTTP/2 control frames (a PING's answer, a WINDOW_UPDATE) make, so
/// a hub whose connection lives but whose stream went quiet is still found silent.
const PROGRESS_BYTES: u64 = 64 * 1024;

/// The longest one message may take to arrive while its bytes keep coming (a full snapshot of
/// 300 MB needs half a megabyte a second): a hub that trickles one never holds a client on it
/// for longer, and the client calls again (perhaps another hub behind the same address).
const MESSAGE_DEADLINE: Duration = Duration::from_secs(600);

impl SyncClient {
    pub fn new(settings: SnapshotSettings) -> Result<Self, String> {
        let url = settings
            .url
            .clone()
            .ok_or("snapshot.url is required with source = \"grpc\"")?;
        let tls = client_tls(&settings, &url)?;
        if url.scheme_str() == Some("http") && !is_loopback(&url) {
            // Whoever sees the stream learns every key digest (and the token, which lets them
            // ask again); whoever can change it can put their own key in force.
            tracing::warn!(
                "snapshot.url is plain http to a hub off this host: the snapshot (and the token) cross the network unencrypted and unauthenticated; use https:// or a mesh that encrypts"
            );
        }
        let mut endpoint = Endpoint::from(url)
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
        }
        Ok(Self {
            settings,
            endpoint,
            doc: None,
            stream: None,
            opened: None,
            failures: 0,
            cache_touch: crate::snapshot::cache::Toucher::default(),
            received: Arc::default(),
        })
    }

    /// The revision this client holds.
    fn held(&self) -> u64 {
        self.doc.as_ref().map_or(0, |d| d.revision)
    }

    async fn open(&mut self) -> Result<(), StreamError> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        // As tonic's own connector: any scheme (TLS is tonic's), no delay, the connect
        // timeout per address tried (IPv6 then IPv4 after 300 ms, as hyper does).
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.settings.connect_timeout));
        let counting = Counting {
            http,
            received: self.received.clone(),
        };
        let channel: Channel = self
            .endpoint
            .connect_with_connector(counting)
            .await
            .map_err(|e| StreamError::Connect(error_chain(&e)))?;
        let mut stub = Stub::new(channel).max_decoding_message_size(super::MAX_MESSAGE_BYTES);
        // What this client holds, so that the hub resumes only on the same content (a
        // document changed without a new revision while this client was away is sent whole).
        let since_digest = match self.doc.clone() {
            Some(doc) => tokio::task::spawn_blocking(move || doc.digest().to_vec())
                .await
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let mut req = tonic::Request::new(WatchRequest {
            since_revision: self.held(),
            client: hostname(),
            since_digest,
        });
        if let Some(token) = &self.settings.token {
            let mut value: tonic::metadata::MetadataValue<_> =
                format!("Bearer {}", token.expose()).parse().map_err(|_| {
                    StreamError::Connect("the token is not a valid header value".into())
                })?;
            // Never in HPACK's table (a peer's table can be probed for it).
            value.set_sensitive(true);
            req.metadata_mut().insert("authorization", value);
        }
        // A hub that takes the call and never answers it is no better than a silent stream.
        let idle = self.settings.idle_timeout;
        let stream = tokio::time::timeout(idle, stub.watch(req))
            .await
            .map_err(|_| StreamError::NoAnswer(idle))?
            .map_err(|s| StreamError::Refused(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner();
        self.stream = Some(stream);
        self.opened = Some(std::time::Instant::now());
        Ok(())
    }

    /// Start from the cached document (if there is a usable one): it is put in force (as
    /// confirmed when the file was written) and the first Watch asks only for what changed
    /// since its revision.
    pub fn resume_from_cache(&mut self, store: &SnapshotStore, path: &std::path::Path) {
        let Some(revision) =
            crate::snapshot::cache::load_into(store, path, self.settings.pepper.clone())
        else {
            return;
        };
        match std::fs::read(path).map(|b| Document::from_json(&b)) {
            Ok(Ok(doc)) if doc.revision == revision => self.doc = Some(Arc::new(doc)),
            _ => {}
        }
    }

    /// Read and apply one message. `Ok(true)` when the message brought or confirmed what this
    /// client holds.
    async fn step(&mut self, store: &Arc<SnapshotStore>) -> Result<bool, StreamError> {
        if self.stream.is_none() {
            self.open().await?;
        }
        let idle = self.settings.idle_timeout;
        let stream = self.stream.as_mut().expect("opened above");
        let received = self.received.clone();
        let started = tokio::time::Instant::now();
        let next = loop {
            // A message whose bytes keep coming is waited for, up to MESSAGE_DEADLINE (a full
            // snapshot of a million keys over a modest link): the hub cannot beat inside one.
            // (`message` keeps what it has read in the stream: waiting again loses none.)
            let before = received.load(Ordering::Relaxed);
            match tokio::time::timeout(idle, stream.message()).await {
                Err(_)
                    if received.load(Ordering::Relaxed) - before >= PROGRESS_BYTES
                        && started.elapsed() < MESSAGE_DEADLINE =>
                {
                    continue
                }
                next => break next,
            }
        };
        let msg = match next {
            Err(_) => return Err(StreamError::Silent(idle)),
            Ok(Err(status)) => {
                return Err(StreamError::Broken(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )))
            }
            Ok(Ok(None)) => return Err(StreamError::Ended),
            Ok(Ok(Some(msg))) => msg,
        };
        let age = msg.confirmed_age_ms.map(Duration::from_millis);
        match msg.event {
            Some(Event::Full(full)) => self.apply_full(store, full.document).await?,
            Some(Event::Delta(delta)) => self.apply_delta(store, delta).await?,
            Some(Event::Heartbeat(beat)) => {
                if beat.revision != self.held() || beat.revision == 0 {
                    // Not about what this client holds: proves only that the hub is alive.
                    return Ok(false);
                }
            }
            None => return Ok(false),
        }
        if let Some(age) = age {
            store.confirm_ago(age);
            if age < self.settings.idle_timeout {
                self.cache_touch
                    .confirmed(self.settings.cache_path.as_deref());
            }
        }
        Ok(true)
    }

    async fn apply_full(
        &mut self,
        store: &Arc<SnapshotStore>,
        bytes: bytes::Bytes,
    ) -> Result<(), StreamError> {
        let store2 = store.clone();
        let settings = self.settings.clone();
        let cache = self.cache_touch.writer();
        let doc = tokio::task::spawn_blocking(move || {
            let doc = Document::from_json(&bytes).map_err(|e| e.to_string())?;
            publish(&store2, &settings, &cache, doc, &bytes)
        })
        .await
        .map_err(|e| StreamError::Document(e.to_string()))?
        .map_err(StreamError::Document)?;
        tracing::info!(
            revision = doc.revision,
            "sync: full snapshot from the hub in force"
        );
        self.doc = Some(doc);
        Ok(())
    }

    async fn apply_delta(
        &mut self,
        store: &Arc<SnapshotStore>,
        delta: super::proto::Delta,
    ) -> Result<(), StreamError> {
        let held = self.held();
        if delta.from_revision != held || held == 0 {
            return Err(StreamError::Gap {
                from: delta.from_revision,
                held,
            });
        }
        let mut doc = self.doc.take().expect("held != 0 means a document");
        let store2 = store.clone();
        let settings = self.settings.clone();
        let cache = self.cache_touch.writer();
        let result = tokio::task::spawn_blocking(move || {
            let next = Arc::make_mut(&mut doc);
            let entries = |list: Vec<bytes::Bytes>| -> Result<Vec<Box<RawValue>>, String> {
                list.into_iter()
                    .map(|b| {
                        String::from_utf8(b.to_vec())
                            .map_err(|_| "an entry is not UTF-8".to_owned())
                            .and_then(|s| {
                                RawValue::from_string(s)
                                    .map_err(|e| format!("an entry is not JSON: {e}"))
                            })
                    })
                    .collect()
            };
            let skipped = document::apply(
                &mut next.partners,
                entries(delta.upsert_partners)?,
                delta.remove_partners.into_iter().map(Box::from),
            ) + document::apply(
                &mut next.keys,
                entries(delta.upsert_keys)?,
                delta.remove_keys.into_iter().map(Box::from),
            );
            if skipped > 0 {
                tracing::warn!(
                    skipped,
                    "sync: delta entries without a usable id were skipped"
                );
            }
            next.revision = delta.revision;
            next.generated_at = Some(delta.generated_at).filter(|g| !g.is_empty());
            let doc = Arc::try_unwrap(doc).unwrap_or_else(|a| (*a).clone());
            let bytes = settings.cache_path.as_ref().map(|_| doc.to_json());
            publish(
                &store2,
                &settings,
                &cache,
                doc,
                bytes.as_deref().unwrap_or_default(),
            )
        })
        .await
        .map_err(|e| StreamError::Document(e.to_string()))?;
        match result {
            Ok(doc) => {
                SourceStats::count(&store.stats.deltas_applied);
                tracing::info!(revision = doc.revision, "sync: delta from the hub in force");
                self.doc = Some(doc);
                Ok(())
            }
            // The document held before the delta is gone with the failed attempt: start over.
            Err(e) => Err(StreamError::Document(e)),
        }
    }

    /// At start-up: open the stream and wait (bounded by the connect and idle timeouts) for the
    /// first snapshot. `true` when one is in force.
    pub async fn first_snapshot(&mut self, store: &Arc<SnapshotStore>) -> bool {
        let bound = self.settings.connect_timeout + self.settings.idle_timeout;
        let result = tokio::time::timeout(bound, async {
            while !self.step(store).await? {}
            Ok::<_, StreamError>(())
        })
        .await;
        match result {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.failed(store, &e);
                false
            }
            Err(_) => {
                self.failed(store, &StreamError::Silent(bound));
                false
            }
        }
    }

    fn failed(&mut self, store: &SnapshotStore, e: &StreamError) {
        self.stream = None;
        // A stream that held for a while was a success: the next wait starts short again. One
        // that failed soon after it opened, whatever it delivered first, was not (a hub that
        // sends a message and then fails would otherwise be called every second, forever).
        // "A while": an idle_timeout (heartbeats arrived through it), or backoff_max if shorter.
        let held_for = self.settings.backoff_max.min(self.settings.idle_timeout);
        if self
            .opened
            .take()
            .is_some_and(|at| at.elapsed() >= held_for)
        {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        let counter = match e {
            StreamError::Gap { .. } | StreamError::Document(_) => &store.stats.reloads_rejected,
            _ => &store.stats.fetch_errors,
        };
        SourceStats::count(counter);
        let in_force = store.current().as_ref().map(|s| s.revision);
        tracing::error!(
            error = %e, revision_in_force = ?in_force, failures_in_a_row = self.failures,
            "sync: stream to the hub lost; keeping the snapshot in force"
        );
    }

    /// Follow the hub until `shutdown` resolves.
    pub async fn run(mut self, store: Arc<SnapshotStore>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if self.stream.is_none() && self.failures > 0 {
                let delay = backoff(self.failures, self.settings.backoff_max);
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            let step = tokio::select! {
                () = &mut shutdown => return,
                step = self.step(&store) => step,
            };
            if let Err(e) = step {
                self.failed(&store, &e);
            }
        }
    }
}

/// TLS for an `https://` hub: the server verified against `ca_file` (or the system's roots), and
/// a client certificate when the hub asks for one.
fn client_tls(
    settings: &SnapshotSettings,
    url: &http::Uri,
) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    if url.scheme_str() != Some("https") {
        return Ok(None);
    }
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut tls = ClientTlsConfig::new().domain_name(url.host().unwrap_or_default());
    tls = match &settings.ca_file {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    if let Some(id) = &settings.client_identity {
        tls = tls.identity(Identity::from_pem(read(&id.cert)?, read(&id.key)?));
    }
    Ok(Some(tls))
}

/// Index and publish `doc`; write the cache from `bytes` (the document's JSON) when configured.
fn publish(
    store: &SnapshotStore,
    settings: &SnapshotSettings,
    cache: &crate::snapshot::cache::Writer,
    doc: Document,
    bytes: &[u8],
) -> Result<Arc<Document>, String> {
    // A delta changes a few keys: the others are shared with the snapshot in force.
    let base = store.current_arc();
    let snapshot = doc.index(settings.pepper.clone(), base.as_deref());
    drop(base);
    let doc = Arc::new(doc);
    let fresh = store
        .publish_document(snapshot, Some(doc.clone()))
        .map_err(|e| e.to_string())?;
    for q in fresh {
        tracing::warn!(entry = %q.entry, reason = %q.reason, "snapshot entry quarantined");
    }
    if let (Some(path), false) = (&settings.cache_path, bytes.is_empty()) {
        cache.write(path, bytes);
    }
    Ok(doc)
}

/// Connects to the hub with hyper's connector, as tonic would (tonic adds TLS), counting the
/// bytes read on the connection into `received`.
#[derive(Clone)]
struct Counting {
    http: hyper_util::client::legacy::connect::HttpConnector,
    received: Arc<AtomicU64>,
}

impl tower_service::Service<http::Uri> for Counting {
    type Response = TokioIo<Counted>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.http.poll_ready(cx).map_err(std::io::Error::other)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let received = self.received.clone();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let io = connecting.await.map_err(std::io::Error::other)?;
            Ok(TokioIo::new(Counted {
                tcp: io.into_inner(),
                received,
            }))
        })
    }
}

/// A connection to the hub that counts what it reads.
struct Counted {
    tcp: TcpStream,
    received: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.tcp).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        read
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Whether `url`'s host is this machine's loopback (`localhost`, `127.0.0.0/8`, `::1`).
fn is_loopback(url: &http::Uri) -> bool {
    match url
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
    {
        Some("localhost") => true,
        Some(host) => host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_this_machines_addresses_are_loopback() {
        for url in [
            "http://127.0.0.1:9393",
            "http://127.1.2.3:1",
            "http://[::1]:9393",
            "http://localhost:9393",
        ] {
            assert!(is_loopback(&url.parse().unwrap()), "{url}");
        }
        for url in [
            "http://hub:9393",
            "http://10.0.0.7:9393",
            "http://[::2]:1",
            "http://localhost.evil:1",
            "http://127.0.0.1.nip.io:1",
        ] {
            assert!(!is_loopback(&url.parse().unwrap()), "{url}");
        }
    }
}
