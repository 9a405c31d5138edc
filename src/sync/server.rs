//! The hub: serves `keygate.sync.v1` Watch from whatever snapshot this keygate holds.
//!
//! One task follows the store and, for each new revision, diffs its entries against the previous
//! revision's; the resulting deltas are kept in a bounded history. Each Watch stream brings its
//! caller up to date from that history (or with a full snapshot when the history does not reach
//! back to the caller's revision), then forwards every new delta, and sends a heartbeat whenever
//! it has been quiet for `heartbeat_interval`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::proto::{watch_response, Delta, Full, Heartbeat, WatchRequest, WatchResponse};
use crate::config::SyncServerSettings;
use crate::snapshot::document::{diff, Document};
use crate::snapshot::SnapshotStore;
use crate::telemetry::Connections;

/// How much history the hub keeps for callers that resume.
const MAX_DELTAS: usize = 1024;
const MAX_HISTORY_ENTRIES: usize = 200_000;

#[derive(Default)]
struct History {
    /// Chained: each delta's `from_revision` is the previous one's `revision`.
    deltas: VecDeque<Step>,
    /// [`Document::digest`] of `current`.
    digest: [u8; 32],
    entries: usize,
    /// The document the last delta leads to.
    current: Option<Arc<Document>>,
    /// Its JSON, made once for all the clients that need a full snapshot.
    full: Option<bytes::Bytes>,
    /// Bumped when the document changes without a new revision (a file edited by hand): every
    /// connected client then gets it whole, since no delta can say "revision R, again".
    generation: u64,
}

/// What the hub holds: revision and generation.
type Held = (u64, u64);

/// One delta of the history, and the digest of the document it applies to.
struct Step {
    delta: Arc<Delta>,
    from_digest: [u8; 32],
}

/// The hub's shared state.
pub struct Hub {
    store: Arc<SnapshotStore>,
    history: Mutex<History>,
    /// The revision (0 = nothing yet) and generation the history reaches.
    updated: watch::Sender<Held>,
    /// Turns true when the server shuts down: every stream ends.
    closing: watch::Sender<bool>,
    settings: SyncServerSettings,
    /// The hub's listener's connections, against `limits.max_connections`.
    pub connections: Arc<Connections>,
    pub stats: HubStats,
}

/// What the hub counts, for `/metrics`.
#[derive(Default)]
pub struct HubStats {
    /// Watch streams open now: the sidecars following this hub.
    watching: AtomicUsize,
    full: AtomicU64,
    deltas: AtomicU64,
    heartbeats: AtomicU64,
    /// Watch calls refused without (or with a wrong) `token`.
    unauthenticated: AtomicU64,
}

impl HubStats {
    pub fn watching(&self) -> usize {
        self.watching.load(Ordering::Relaxed)
    }

    /// Events sent on Watch streams: `(kind, count)`.
    pub fn sent(&self) -> [(&'static str, u64); 3] {
        [
            ("full", self.full.load(Ordering::Relaxed)),
            ("delta", self.deltas.load(Ordering::Relaxed)),
            ("heartbeat", self.heartbeats.load(Ordering::Relaxed)),
        ]
    }

    pub fn unauthenticated(&self) -> u64 {
        self.unauthenticated.load(Ordering::Relaxed)
    }

    /// Count an event once its stream took it (not one whose client had gone).
    fn sent_one(&self, kind: Kind) {
        let n = match kind {
            Kind::Full => &self.full,
            Kind::Delta => &self.deltas,
            Kind::Heartbeat => &self.heartbeats,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// An event's kind, kept to count it after the event itself is sent.
#[derive(Clone, Copy)]
enum Kind {
    Full,
    Delta,
    Heartbeat,
}

impl Kind {
    fn of(event: &watch_response::Event) -> Self {
        match event {
            watch_response::Event::Full(_) => Kind::Full,
            watch_response::Event::Delta(_) => Kind::Delta,
            watch_response::Event::Heartbeat(_) => Kind::Heartbeat,
        }
    }
}

/// Held by a Watch stream while it is open.
struct Watching(Arc<Hub>);

impl Watching {
    fn new(hub: &Arc<Hub>) -> Self {
        hub.stats.watching.fetch_add(1, Ordering::Relaxed);
        Self(hub.clone())
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.stats.watching.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    /// A hub serving `store`, taking at most `max_connections` connections at once.
    pub fn new(
        store: Arc<SnapshotStore>,
        settings: SyncServerSettings,
        max_connections: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            history: Mutex::default(),
            updated: watch::Sender::new((0, 0)),
            closing: watch::Sender::new(false),
            settings,
            connections: Connections::new(max_connections, 0),
            stats: HubStats::default(),
        })
    }

    /// Follow the store until `shutdown` resolves, turning each new revision into a delta.
    pub async fn follow(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let mut published = self.store.watch_documents();
        tokio::pin!(shutdown);
        loop {
            published.borrow_and_update();
            if let Some(doc) = self.store.document() {
                let hub = self.clone();
                let _ = tokio::task::spawn_blocking(move || hub.record(doc)).await;
            }
            tokio::select! {
                () = &mut shutdown => return,
                changed = published.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Make `doc` the hub's current document, with the delta that leads to it.
    fn record(&self, doc: Arc<Document>) {
        if doc.revision == 0 {
            // keygate.sync.v1 reads revision 0 as "nothing held": such a document can be
            // neither sent nor vouched for. Said at once rather than left to sidecars that
            // never become ready.
            tracing::error!(
                "sync: the snapshot in force has revision 0, which keygate.sync.v1 reads as nothing: the sidecars following this hub get no snapshot until one with revision 1 or more is in force"
            );
            return;
        }
        let current = |h: &History| h.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &doc));
        if current(&self.history.lock().expect("lock poisoned")) {
            // Recorded already (the follower's first look at what `serve` recorded).
            return;
        }
        let digest = doc.digest();
        let mut h = self.history.lock().expect("lock poisoned");
        let revision = doc.revision;
        match &h.current {
            Some(cur) if cur.revision == revision => {
                // The digest, not the entries alone: clients resume on it, `generated_at` too.
                if digest == h.digest {
                    return;
                }
                tracing::warn!(
                    revision,
                    "sync: the document changed without a new revision; sending it whole to every connected client (bump the revision with each change)"
                );
                h.deltas.clear();
                h.entries = 0;
                h.generation += 1;
            }
            Some(cur) => {
                let (upsert_partners, remove_partners) = diff(&cur.partners, &doc.partners);
                let (upsert_keys, remove_keys) = diff(&cur.keys, &doc.keys);
                let delta = Delta {
                    from_revision: cur.revision,
                    revision,
                    generated_at: doc.generated_at.clone().unwrap_or_default(),
                    upsert_partners: upsert_partners
                        .into_iter()
                        .map(|e| bytes::Bytes::copy_from_slice(e.get().as_bytes()))
                        .collect(),
                    remove_partners: remove_partners.into_iter().map(String::from).collect(),
                    upsert_keys: upsert_keys
                        .into_iter()
                        .map(|e| bytes::Bytes::copy_from_slice(e.get().as_bytes()))
                        .collect(),
                    remove_keys: remove_keys.into_iter().map(String::from).collect(),
                };
                h.entries += size(&delta);
                let from_digest = h.digest;
                h.deltas.push_back(Step {
                    delta: Arc::new(delta),
                    from_digest,
                });
                while h.deltas.len() > MAX_DELTAS || h.entries > MAX_HISTORY_ENTRIES {
                    let Some(old) = h.deltas.pop_front() else {
                        break;
                    };
                    h.entries -= size(&old.delta);
                }
            }
            None => {}
        }
        let replaced = h.current.replace(doc);
        h.digest = digest;
        h.full = None;
        let generation = h.generation;
        drop(h);
        self.updated.send_replace((revision, generation));
        // Freeing a large document's entries takes a while: the streams have the delta first.
        drop(replaced);
    }

    /// What brings a caller holding `since` up to date: the deltas from `since` when the
    /// history has them, else the full document. Empty when already up to date (or when the
    /// hub has nothing yet). `claimed`: a resuming caller's digest of what it holds at `since`,
    /// which must be the hub's own there (else the caller gets the full document); without
    /// one, the caller holds what this stream sent it, of generation `generation`.
    ///
    /// Also returns what the caller holds once it has the events: the hub's revision and
    /// generation as checked under the lock (`None` when the hub holds nothing yet).
    fn catch_up(
        &self,
        (since, generation): Held,
        claimed: Option<&[u8]>,
    ) -> (Vec<watch_response::Event>, Option<Held>) {
        let mut h = self.history.lock().expect("lock poisoned");
        let Some(cur) = &h.current else {
            return (Vec::new(), None);
        };
        let reached = Some((cur.revision, h.generation));
        let same_generation = match claimed {
            None => generation == h.generation,
            Some(digest) => {
                let ours = if since == cur.revision {
                    Some(&h.digest)
                } else {
                    h.deltas
                        .iter()
                        .find(|d| d.delta.from_revision == since)
                        .map(|d| &d.from_digest)
                };
                ours.is_some_and(|ours| ours.as_slice() == digest)
            }
        };
        if since == cur.revision && same_generation {
            return (Vec::new(), reached);
        }
        if since != 0 && same_generation {
            if let Some(start) = h.deltas.iter().position(|d| d.delta.from_revision == since) {
                let deltas = h
                    .deltas
                    .iter()
                    .skip(start)
                    .map(|d| watch_response::Event::Delta(Delta::clone(&d.delta)))
                    .collect();
                return (deltas, reached);
            }
        }
        let revision = cur.revision;
        let document = match &h.full {
            Some(bytes) => bytes.clone(),
            None => {
                let bytes = bytes::Bytes::from(cur.to_json());
                h.full = Some(bytes.clone());
                bytes
            }
        };
        (
            vec![watch_response::Event::Full(Full { revision, document })],
            reached,
        )
    }

    /// Start a Watch stream for a caller (at `peer`) that asked with `req`: what the stream
    /// sends arrives on the receiver, which the call's answer reads ([`super::wire`]).
    pub(super) fn watch(
        self: &Arc<Self>,
        peer: Option<std::net::SocketAddr>,
        req: WatchRequest,
    ) -> Result<mpsc::Receiver<Result<WatchResponse, Status>>, Status> {
        if *self.closing.borrow() {
            return Err(Status::unavailable("the hub is shutting down"));
        }
        let WatchRequest {
            since_revision,
            client,
            since_digest,
        } = req;
        // The caller's own name, shown escaped and cut short: it must not forge log lines.
        let client: String = client.chars().take(128).collect();
        tracing::info!(?peer, client = ?client, since_revision, "sync: a client is watching");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream(self.clone(), since_revision, since_digest, tx));
        Ok(rx)
    }

    fn message(&self, event: watch_response::Event) -> WatchResponse {
        WatchResponse {
            event: Some(event),
            confirmed_age_ms: self
                .store
                .unconfirmed_for()
                .map(|d| d.as_millis().try_into().unwrap_or(u64::MAX)),
        }
    }

    /// Whether a call's headers carry the hub's token (any call, when it has none).
    pub(super) fn authorized(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let Some(token) = &self.settings.token else {
            return Ok(());
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .unwrap_or("");
        if bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes())) {
            Ok(())
        } else {
            self.stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
            Err(Status::unauthenticated("a valid bearer token is required"))
        }
    }
}

fn size(d: &Delta) -> usize {
    1 + d.upsert_keys.len()
        + d.remove_keys.len()
        + d.upsert_partners.len()
        + d.remove_partners.len()
}

/// Feed one Watch stream until the caller goes away.
async fn stream(
    hub: Arc<Hub>,
    since: u64,
    since_digest: Vec<u8>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let mut updated = hub.updated.subscribe();
    let mut closing = hub.closing.subscribe();
    // A stream begun after the hub started closing (on a connection accepted just before)
    // ends at once: `changed` would never see that.
    if *closing.borrow() {
        return;
    }
    let _watching = Watching::new(&hub);
    let beat = hub.settings.heartbeat_interval;
    // A client resuming at a revision holds the hub's current generation of it only if its
    // digest says so: checked by the first catch-up the hub can make (it may hold nothing yet).
    let mut held: Held = (since, updated.borrow().1);
    let mut claimed = (since != 0).then_some(since_digest);
    let mut first = true;
    loop {
        let target = *updated.borrow_and_update();
        let (events, reached) = if target.0 != 0 && (held != target || claimed.is_some()) {
            let hub2 = hub.clone();
            let claim = claimed.clone();
            // Serializing a full document is CPU work.
            tokio::task::spawn_blocking(move || hub2.catch_up(held, claim.as_deref()))
                .await
                .unwrap_or_default()
        } else {
            (Vec::new(), None)
        };
        let sent_any = !events.is_empty();
        for event in events {
            let kind = Kind::of(&event);
            if tx.send(Ok(hub.message(event))).await.is_err() {
                return;
            }
            hub.stats.sent_one(kind);
        }
        if let Some(reached) = reached {
            // What the hub checked under its lock, which may be newer than `target`.
            held = reached;
            claimed = None;
        }
        if first && !sent_any {
            // Already up to date (or nothing to send yet): say so at once.
            if send_heartbeat(&hub, &tx, held, claimed.is_some(), beat)
                .await
                .is_err()
            {
                return;
            }
        }
        first = false;
        tokio::select! {
            changed = updated.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(beat) => {
                if send_heartbeat(&hub, &tx, held, claimed.is_some(), beat).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
            _ = closing.changed() => return,
        }
    }
}

async fn send_heartbeat(
    hub: &Hub,
    tx: &mpsc::Sender<Result<WatchResponse, Status>>,
    held: Held,
    unchecked: bool,
    beat: Duration,
) -> Result<(), ()> {
    // A heartbeat vouches for a revision only when the caller holds what the hub holds, this
    // generation of it included, and that was checked (a hub that has loaded nothing yet, or
    // has not yet compared a resuming caller's digest, must not confirm what it brought).
    let vouch = !unchecked && held == *hub.updated.borrow();
    let event = watch_response::Event::Heartbeat(Heartbeat {
        revision: if vouch { held.0 } else { 0 },
        interval_ms: beat.as_millis().try_into().unwrap_or(u32::MAX),
    });
    tx.send(Ok(hub.message(event))).await.map_err(|_| ())?;
    hub.stats.sent_one(Kind::Heartbeat);
    Ok(())
}

/// Serve Watch on `listener` until `shutdown` resolves, on the same HTTP/2 serving as ext_authz
/// ([`crate::listen::Http2Front`]: `[limits]`, GOAWAY before an unused connection is closed);
/// over TLS (`sync_server.tls_cert`, reloaded when the files change, and `client_ca` for mTLS)
/// when `tls` is given. On shutdown the Watch streams end, then connections are told goodbye
/// and get `drain` to close.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    tls: Option<Arc<crate::tls::TlsServer>>,
    limits: crate::config::Limits,
    drain: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let connections = hub.connections.clone();
    // The document in force as the hub starts is its own before it takes a call: a Watch
    // accepted first would find it holding nothing (a heartbeat of revision 0) for a moment.
    // Callers connecting meanwhile wait in the listener's backlog.
    // (Revision 0 is the follower's to report, once.)
    if let Some(doc) = hub.store.document().filter(|d| d.revision != 0) {
        let first = hub.clone();
        let _ = tokio::task::spawn_blocking(move || first.record(doc)).await;
    }
    let follower = tokio::spawn(hub.clone().follow(std::future::pending::<()>()));
    let closing = hub.clone();
    // Watch streams are told to end (each client reconnects, to another hub if there is one)
    // as every connection is told goodbye; streams still in flight finish within `drain`.
    let shutdown = async move {
        shutdown.await;
        closing.closing.send_replace(true);
    };
    let routes = tonic::service::Routes::new(super::wire::Service(hub)).prepare();
    let front = crate::listen::Http2Front {
        name: "sync_server",
        connections,
        tls,
        limits,
        drain,
    };
    front
        .serve(listener, shutdown, move |activity, peer| {
            crate::listen::Routed::new(routes.clone(), activity, peer)
        })
        .await;
    follower.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<Hub> {
        let settings = SyncServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            token: None,
            heartbeat_interval: Duration::from_secs(1),
        };
        Hub::new(Arc::new(SnapshotStore::new()), settings, 16)
    }

    fn doc(revision: u64, generated_at: &str, status: &str) -> Arc<Document> {
        let text = format!(
            r#"{{"schema":"keygate.snapshot/v1","revision":{revision},"generated_at":"{generated_at}","partners":[{{"id":"p","status":"active"}}],"keys":[{{"id":"k","status":"{status}"}}]}}"#
        );
        Arc::new(Document::from_json(text.as_bytes()).unwrap())
    }

    fn kinds(events: &[watch_response::Event]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                watch_response::Event::Full(_) => "full",
                watch_response::Event::Delta(_) => "delta",
                watch_response::Event::Heartbeat(_) => "heartbeat",
            })
            .collect()
    }

    /// A resuming caller is brought up to date on its digest, not its revision alone, and is
    /// told what it then holds as the hub checked it.
    #[test]
    fn a_resuming_caller_is_judged_by_its_digest() {
        let hub = hub();
        let (v4, v5, v5_edited) = (
            doc(4, "a", "active"),
            doc(5, "a", "revoked"),
            doc(5, "b", "revoked"),
        );
        hub.record(v4.clone());
        hub.record(v5.clone());
        let gen = hub.history.lock().unwrap().generation;
        let check = |since: u64, digest: &[u8]| {
            let (events, reached) = hub.catch_up((since, 0), Some(digest));
            (kinds(&events), reached)
        };
        assert_eq!(check(5, &v5.digest()), (vec![], Some((5, gen))));
        assert_eq!(check(4, &v4.digest()), (vec!["delta"], Some((5, gen))));
        // The same revisions with other content: whole.
        assert_eq!(check(5, &v4.digest()), (vec!["full"], Some((5, gen))));
        assert_eq!(check(4, &v5.digest()), (vec!["full"], Some((5, gen))));
        assert_eq!(check(5, b""), (vec!["full"], Some((5, gen))));
        // Only generated_at edited at the same revision: a new generation, a new digest.
        hub.record(v5_edited.clone());
        let (events, reached) = hub.catch_up((5, 0), Some(&v5.digest()));
        assert_eq!(kinds(&events), ["full"]);
        assert_eq!(reached, Some((5, gen + 1)));
        assert_eq!(
            kinds(&hub.catch_up((5, 0), Some(&v5_edited.digest())).0),
            Vec::<&str>::new()
        );
        // A caller of this stream (no claim) holding the previous generation: whole.
        assert_eq!(kinds(&hub.catch_up((5, gen), None).0), ["full"]);
        assert_eq!(
            kinds(&hub.catch_up((5, gen + 1), None).0),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn a_hub_holding_nothing_answers_nothing() {
        let hub = hub();
        assert_eq!(hub.catch_up((3, 0), Some(b"x")), (Vec::new(), None));
    }
}
