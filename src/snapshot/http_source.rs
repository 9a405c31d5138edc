//! The `http` snapshot source: poll a control plane's snapshot URL.
//!
//! Each poll is one `GET` with `If-None-Match` (the ETag of the document in force) and, when
//! configured, `Authorization: Bearer <token>`. `304 Not Modified` confirms the snapshot in
//! force; `200` brings a `keygate.snapshot/v1` document, which is parsed off the request path and
//! put in force unless its revision is lower than the one in force. Anything else — a refused or
//! reset connection, a timeout, a non-2xx status, a body over `max_body_bytes`, a document that
//! does not parse — leaves the snapshot in force untouched and retries after a backoff (1 s, 2 s,
//! 4 s… up to `backoff_max`, each with random jitter so a fleet does not retry in step).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::{LoadFailure, PublishError, SnapshotStore, SourceStats};
use crate::config::SnapshotSettings;

/// Why a poll brought no document in force.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("cannot reach the control plane: {0}")]
    Unreachable(String),
    #[error("the control plane answered {0}")]
    Status(StatusCode),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer is larger than snapshot.max_body_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error("the answer broke off: {0}")]
    Body(String),
    #[error("the control plane sent a document keygate refuses: {0}")]
    Document(#[from] super::DocumentError),
    #[error("the control plane sent revision {offered}, lower than revision {current} in force")]
    Regressed { offered: u64, current: u64 },
    /// A 304 confirms only the document whose ETag was sent: one to a request that sent none
    /// (no document in force, or one in force from the cache or refused since) would pass an
    /// old snapshot off as fresh.
    #[error("304 Not Modified to a request that named no document (no If-None-Match)")]
    UnexpectedNotModified,
}

impl PollError {
    /// A document was offered and refused (as opposed to no document arriving at all).
    fn is_rejection(&self) -> bool {
        matches!(self, Self::Document(_) | Self::Regressed { .. })
    }
}

/// What a successful poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// 304, or a 200 with the revision already in force.
    Unchanged(u64),
    /// A new revision is in force.
    Applied(u64),
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Build the TLS client configuration: the PEM certificates of `ca_file` as the only roots when
/// given, else the system's roots (one implementation for every https client, in [`crate::tls`]).
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    crate::tls::client_config(ca_file, None, &[]).map_err(|e| e.to_string())
}

/// The poller: remembers the ETag of the document in force and how many polls failed in a row.
pub struct HttpSource {
    settings: SnapshotSettings,
    url: http::Uri,
    client: HttpsClient,
    etag: Option<HeaderValue>,
    failures: u32,
    cache_touch: super::cache::Toucher,
}

impl HttpSource {
    /// Fails only on a bad `ca_file` (which `config check` has already looked at).
    pub fn new(settings: SnapshotSettings) -> Result<Self, String> {
        let url = settings
            .url
            .clone()
            .ok_or("snapshot.url is required with source = \"http\"")?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let tls = tls_config(settings.ca_file.as_deref())?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        if url.scheme_str() == Some("http") && settings.token.is_some() {
            tracing::warn!(
                "snapshot.url is plain http: the bearer token crosses the network unencrypted"
            );
        }
        Ok(Self {
            settings,
            url,
            client,
            etag: None,
            failures: 0,
            cache_touch: super::cache::Toucher::default(),
        })
    }

    /// One poll: fetch, and put a new document in force. Counts the outcome; logs failures.
    pub async fn poll_once(&mut self, store: &Arc<SnapshotStore>) -> Result<Polled, PollError> {
        let result = self.poll_inner(store).await;
        match &result {
            Ok(Polled::Unchanged(_)) => {
                self.failures = 0;
                store.confirm();
                self.cache_touch
                    .confirmed(self.settings.cache_path.as_deref());
            }
            Ok(Polled::Applied(revision)) => {
                self.failures = 0;
                store.confirm();
                tracing::info!(revision, "snapshot from the control plane in force");
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                let counter = if e.is_rejection() {
                    &store.stats.reloads_rejected
                } else {
                    &store.stats.fetch_errors
                };
                SourceStats::count(counter);
                let in_force = store.current().as_ref().map(|s| s.revision);
                tracing::error!(
                    error = %e, revision_in_force = ?in_force, failures_in_a_row = self.failures,
                    "snapshot poll failed; keeping the snapshot in force"
                );
            }
        }
        result
    }

    async fn poll_inner(&mut self, store: &Arc<SnapshotStore>) -> Result<Polled, PollError> {
        let (etag, bytes) = match self.fetch(store).await? {
            None => {
                return match store.current().as_ref() {
                    Some(s) => Ok(Polled::Unchanged(s.revision)),
                    None => {
                        self.etag = None;
                        Err(PollError::UnexpectedNotModified)
                    }
                }
            }
            Some(answer) => answer,
        };
        // Until this document is in force, its ETag must not be sent: a 304 would then confirm
        // a document keygate refused.
        self.etag = None;
        let store2 = store.clone();
        let settings = self.settings.clone();
        let cache = self.cache_touch.writer();
        let applied =
            tokio::task::spawn_blocking(move || apply(&store2, &settings, &cache, &bytes))
                .await
                .map_err(|e| PollError::Body(format!("the parser stopped: {e}")))??;
        self.etag = etag;
        Ok(applied)
    }

    /// `None` = 304 Not Modified; else the ETag and the body.
    async fn fetch(
        &self,
        store: &SnapshotStore,
    ) -> Result<Option<(Option<HeaderValue>, Bytes)>, PollError> {
        let mut req = Request::get(self.url.clone())
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("keygate/", env!("CARGO_PKG_VERSION")),
            );
        // Whether this request names the document in force: only then can a 304 confirm it.
        let mut conditional = false;
        if let (Some(etag), true) = (&self.etag, store.current().is_some()) {
            req = req.header(header::IF_NONE_MATCH, etag.clone());
            conditional = true;
        }
        if let Some(token) = &self.settings.token {
            let mut value =
                HeaderValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
                    PollError::Unreachable("the token is not a valid header value".into())
                })?;
            value.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, value);
        }
        let req = req
            .body(Empty::new())
            .expect("a GET with valid headers builds");
        let limit = self.settings.max_body_bytes;
        let timeout = self.settings.read_timeout;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| PollError::Unreachable(error_chain(&e)))?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_MODIFIED if conditional => return Ok(None),
                StatusCode::NOT_MODIFIED => return Err(PollError::UnexpectedNotModified),
                other => return Err(PollError::Status(other)),
            }
            let declared = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit as u64) {
                return Err(PollError::TooLarge(limit));
            }
            let etag = resp.headers().get(header::ETAG).cloned();
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        PollError::TooLarge(limit)
                    } else {
                        PollError::Body(e.to_string())
                    }
                })?
                .to_bytes();
            Ok(Some((etag, body)))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| PollError::Timeout(timeout))?
    }

    /// How long to wait before the next poll: the poll interval after a success, else an
    /// exponential backoff with jitter.
    pub fn next_delay(&self) -> Duration {
        if self.failures == 0 {
            return self.settings.poll_interval;
        }
        backoff(self.failures, self.settings.backoff_max)
    }

    /// Poll until `shutdown` resolves.
    pub async fn run(
        mut self,
        store: Arc<SnapshotStore>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.next_delay()) => {}
            }
            tokio::select! {
                () = &mut shutdown => return,
                _ = self.poll_once(&store) => {}
            }
        }
    }
}

/// The `n`th retry's delay (n ≥ 1): 1 s doubled each time up to `max`, then a random point in
/// its upper half.
pub fn backoff(n: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(max);
    base.mul_f64(rand::random_range(0.5..=1.0))
}

/// An error and its sources, one line: hyper's and tonic's top-level messages alone ("client
/// error (Connect)") do not say what went wrong.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(Deserialize)]
struct Envelope {
    schema: Option<String>,
    revision: u64,
}

/// Parse and publish `bytes` (on a blocking thread). A revision already in force is only
/// confirmed, not rebuilt: a control plane bumps the revision whenever the content changes.
fn apply(
    store: &SnapshotStore,
    settings: &SnapshotSettings,
    cache: &super::cache::Writer,
    bytes: &[u8],
) -> Result<Polled, PollError> {
    let in_force = store.current().as_ref().map(|s| s.revision);
    let envelope = serde_json::from_slice::<Envelope>(bytes)
        .ok()
        .filter(|e| e.schema.as_deref() == Some(super::parse::SCHEMA));
    if let (Some(current), Some(env)) = (in_force, envelope) {
        if env.revision == current {
            return Ok(Polled::Unchanged(current));
        }
        if env.revision < current {
            return Err(PollError::Regressed {
                offered: env.revision,
                current,
            });
        }
    }
    match store.publish_json(bytes, settings.pepper.clone()) {
        Ok((revision, fresh)) => {
            for q in fresh {
                tracing::warn!(entry = %q.entry, reason = %q.reason, "snapshot entry quarantined");
            }
            if let Some(path) = &settings.cache_path {
                cache.write(path, bytes);
            }
            Ok(Polled::Applied(revision))
        }
        Err(LoadFailure::Document(e)) => Err(PollError::Document(e)),
        Err(LoadFailure::Publish(PublishError::RevisionRegressed { offered, current })) => {
            Err(PollError::Regressed { offered, current })
        }
    }
}
