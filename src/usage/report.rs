//! Periodic usage reports: every `usage.interval`, what changed since the last report is POSTed
//! to `usage.report_url` as one JSON batch (`keygate.usage/v1`).
//!
//! Delivery is at least once: a batch stays queued, in order, until the receiver answers 2xx,
//! and is sent again with the same `batch_id` after a failure (so a receiver that dedupes by it
//! counts everything exactly once). While the receiver is away new counts go into new batches;
//! past `max_pending_batches` the oldest is dropped, logged and counted in the next batch's
//! `dropped_batches`. On shutdown, once the fronts have drained, a last batch is taken and every
//! pending batch is sent (each bounded by `usage.timeout`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::Full;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{rfc3339, Usage};
use crate::config::UsageReportSettings;
use crate::deny::CODES;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Batch {
    id: String,
    body: Bytes,
}

#[derive(Clone, Copy)]
struct Counted {
    requests: u64,
    denials: [u64; CODES.len()],
}

pub struct Reporter {
    settings: UsageReportSettings,
    usage: Arc<Usage>,
    client: HttpsClient,
    reporter: String,
    /// What the previous batches covered, per key.
    reported: HashMap<u64, Counted>,
    reported_unattributed: [u64; CODES.len()],
    pending: VecDeque<Batch>,
    /// Time covered so far (Unix ms).
    covered_to: i64,
    seq: u64,
    dropped: u64,
}

impl Reporter {
    pub fn new(
        settings: UsageReportSettings,
        usage: Arc<Usage>,
        now_ms: i64,
    ) -> Result<Self, String> {
        let tls = crate::snapshot::http_source::tls_config(settings.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.timeout));
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        if settings.url.scheme_str() == Some("http") && settings.token.is_some() {
            tracing::warn!(
                "usage.report_url is plain http: the bearer token crosses the network unencrypted"
            );
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Ok(Self {
            settings,
            usage,
            client: Client::builder(TokioExecutor::new()).build(connector),
            reporter: format!("{host}:{}", std::process::id()),
            reported: HashMap::new(),
            reported_unattributed: [0; CODES.len()],
            pending: VecDeque::new(),
            covered_to: now_ms,
            seq: 0,
            dropped: 0,
        })
    }

    /// [`Reporter::take`] on a thread of the blocking pool: at tens of thousands of keys it
    /// takes tens of milliseconds, which on the runtime's thread would stall every front
    /// sharing it.
    async fn take_apart(mut self) -> Self {
        tokio::task::spawn_blocking(move || {
            self.take(crate::decision::now_ms());
            self
        })
        .await
        .expect("taking a usage batch does not panic")
    }

    /// Queue what changed since the last batch (nothing when nothing did).
    fn take(&mut self, now_ms: i64) {
        let (keys, unattributed) = self.usage.totals();
        let by_code = |now: &[u64; CODES.len()], before: &[u64; CODES.len()]| {
            let mut m = serde_json::Map::new();
            for (i, code) in CODES.iter().enumerate() {
                let d = now[i].saturating_sub(before[i]);
                if d > 0 {
                    m.insert((*code).to_owned(), d.into());
                }
            }
            m
        };
        let mut entries = Vec::new();
        for k in keys {
            let before = self.reported.get(&k.state_key).copied().unwrap_or(Counted {
                requests: 0,
                denials: [0; CODES.len()],
            });
            let requests = k.requests.saturating_sub(before.requests);
            let denied = by_code(&k.denials, &before.denials);
            if requests > 0 || !denied.is_empty() {
                entries.push(serde_json::json!({
                    "key_id": &*k.key_id,
                    "requests": requests,
                    "denied": denied,
                    "last_used_at": (k.last_used_ms > 0).then(|| rfc3339(k.last_used_ms)),
                }));
            }
            self.reported.insert(
                k.state_key,
                Counted {
                    requests: k.requests,
                    denials: k.denials,
                },
            );
        }
        let without_key = by_code(&unattributed, &self.reported_unattributed);
        self.reported_unattributed = unattributed;
        if entries.is_empty() && without_key.is_empty() && self.dropped == 0 {
            self.covered_to = now_ms;
            return;
        }
        self.seq += 1;
        let id = format!("{}-{}-{}", self.reporter, self.covered_to, self.seq);
        let body = serde_json::json!({
            "schema": "keygate.usage/v1",
            "batch_id": id,
            "reporter": self.reporter,
            "from": rfc3339(self.covered_to),
            "to": rfc3339(now_ms),
            "keys": entries,
            "denied_without_key": without_key,
            "dropped_batches": self.dropped,
        });
        self.dropped = 0;
        self.covered_to = now_ms;
        self.pending.push_back(Batch {
            id,
            body: Bytes::from(body.to_string()),
        });
        while self.pending.len() > self.settings.max_pending_batches {
            if let Some(old) = self.pending.pop_front() {
                self.dropped += 1;
                tracing::error!(batch_id = %old.id, "usage: too many unsent batches; dropping the oldest");
            }
        }
    }

    /// Send pending batches in order until one fails. Returns whether all went.
    async fn send_pending(&mut self) -> bool {
        while let Some(batch) = self.pending.front() {
            match self.post(batch).await {
                Ok(()) => {
                    tracing::debug!(batch_id = %batch.id, "usage: batch delivered");
                    self.pending.pop_front();
                }
                Err(e) => {
                    tracing::warn!(
                        batch_id = %batch.id, error = %e, pending = self.pending.len(),
                        "usage: report failed; will retry"
                    );
                    return false;
                }
            }
        }
        true
    }

    async fn post(&self, batch: &Batch) -> Result<(), String> {
        let mut req = Request::post(self.settings.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("keygate/", env!("CARGO_PKG_VERSION")),
            )
            .header("idempotency-key", batch.id.as_str());
        if let Some(token) = &self.settings.token {
            let mut v = HeaderValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| "the token is not a valid header value".to_owned())?;
            v.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, v);
        }
        let req = req
            .body(Full::new(batch.body.clone()))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(self.settings.timeout, self.client.request(req))
            .await
            .map_err(|_| format!("no answer within {:?}", self.settings.timeout))?
            .map_err(|e| crate::snapshot::http_source::error_chain(&e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {}", resp.status()))
        }
    }

    /// Report every interval until `stop` resolves; returns itself for the final
    /// [`Reporter::flush`].
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Self {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return self,
                () = tokio::time::sleep(self.settings.interval) => {}
            }
            self = self.take_apart().await;
            tokio::select! {
                () = &mut stop => return self,
                _ = self.send_pending() => {}
            }
        }
    }

    /// Take the last batch and send everything pending. Returns how many batches are left
    /// undelivered (logged).
    pub async fn flush(self) -> usize {
        let mut this = self.take_apart().await;
        if !this.send_pending().await {
            tracing::error!(
                undelivered = this.pending.len(),
                "usage: shutting down with undelivered batches"
            );
        }
        this.pending.len()
    }
}
