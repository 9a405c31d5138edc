//! The key snapshot: an immutable, indexed view of one `keygate.snapshot/v1` document, and the
//! [`SnapshotStore`] that publishes a new one with an atomic pointer swap.
//!
//! A snapshot never holds a key, only its digest. Lookups are by digest (one hash of the presented
//! key, one index probe) with a constant-time final comparison. Identity header values are built
//! once, here, at load, so the request path only clones them.
//!
//! The index is compact, so that a million keys fit in little memory and build quickly: what
//! many keys share is stored once (partners, environments, scope sets, each with its header
//! values) and a key refers to it by position; key ids and names live in one shared text; the
//! restrictions few keys carry (CIDRs, referrers, routes) are boxed, so the others pay one null
//! pointer for them; and the digest index holds positions, not digests. A key record has no heap
//! allocation of its own.
//!
//! Keys are stored in chunks chosen by digest (`snapshot::chunk`), each behind an `Arc`: a reload
//! builds only the chunks whose keys changed and shares the others with the snapshot in force,
//! so that during a reload the memory of two snapshots is not needed, only of one and the change.
//! For that, a reload keeps the positions of partners, environments and scope sets the snapshot
//! in force gave them. A snapshot also remembers a fingerprint of each entry its keys were read
//! from (`snapshot::memo`), so that a reload takes an entry whose text has not changed as it
//! was, without reading it again: the CPU a reload takes from requests is mostly for what changed.
//!
//! Requests read the store without locks and see exactly one revision from start to end; the
//! source task (`snapshot::source`: a file, a control plane or a sync hub) is the only writer.

pub mod cache;
mod chunk;
pub mod document;
pub mod file;
pub mod http_source;
mod index;
mod memo;
pub mod parse;
pub mod source;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwapOption, Guard};
use hmac::{Hmac, Mac};
use http::HeaderValue;
use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::referrer::ReferrerSet;
use crate::routes::RouteTable;
use chunk::{chunk_of, Chunk};
use index::digest_hash;

pub use parse::{build, parse, parse_with_base, DocumentError};

/// Partner account status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartnerStatus {
    Active,
    Suspended,
    Deactivated,
    PaymentRequired,
}

#[derive(Debug)]
pub struct Partner {
    pub id: Box<str>,
    pub org_id: Option<Box<str>>,
    pub status: PartnerStatus,
    /// Pre-validated header values (`x-partner-id`, `x-org-id`).
    pub id_header: HeaderValue,
    pub org_header: Option<HeaderValue>,
}

/// A key environment, stored once for all the keys of that environment.
#[derive(Debug, Clone)]
pub struct Environment {
    pub name: Box<str>,
    /// Pre-validated `x-key-environment` value.
    pub header: HeaderValue,
}

/// A set of scopes, stored once for all the keys granted exactly that set.
#[derive(Debug, Clone)]
pub struct ScopeSet {
    /// Sorted, deduplicated.
    scopes: Box<[Box<str>]>,
    /// Pre-validated `x-scopes` value: the scopes, sorted, space-separated.
    pub header: HeaderValue,
}

impl ScopeSet {
    pub fn contains(&self, scope: &str) -> bool {
        self.scopes.binary_search_by(|s| (**s).cmp(scope)).is_ok()
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> {
        self.scopes.iter().map(|s| &**s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
}

/// Which digest a record was stored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestKind {
    Sha256,
    HmacSha256,
}

/// Where a request may come from and what it may ask for, for the keys that say. Empty lists
/// are no restriction; a key with none of them has no `Restrictions` at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Restrictions {
    pub cidrs: Box<[IpNet]>,
    pub referrers: ReferrerSet,
    /// `None` = no restriction.
    pub routes: Option<RouteTable<()>>,
}

/// A run of a chunk's shared text.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    /// For a key without a name.
    const NONE: Span = Span {
        start: 0,
        len: u32::MAX,
    };

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// One key in force. Fixed size, no heap allocation of its own: what it shares with other keys
/// is a position in the snapshot, its id and name are in its chunk's text.
#[derive(Debug)]
pub struct KeyRecord {
    digest: [u8; 32],
    /// Pre-validated `x-key-id` value; its bytes are its chunk's shared text.
    pub id_header: HeaderValue,
    /// Unix milliseconds; `i64::MAX` for a key that does not expire.
    expires_at_ms: i64,
    /// `None` for the many keys without any (one null pointer).
    restrictions: Option<Box<Restrictions>>,
    name: Span,
    /// Index into [`Snapshot::partners`].
    partner: u32,
    /// Index into [`Snapshot::scope_sets`].
    scopes: u32,
    /// Index into [`Snapshot::environments`].
    environment: u32,
    rate_limit_per_minute: Option<NonZeroU32>,
    pub status: KeyStatus,
    kind: DigestKind,
}

impl KeyRecord {
    /// A number for per-key state kept beside the snapshot (rate-limit buckets, usage): the
    /// digest's keyed hash, pseudorandom whatever digests the document chose (two keys whose
    /// digests begin alike must not share a bucket), so maps keyed by it need no more hashing.
    /// Stable for the life of the process while the key's digest is.
    pub fn state_key(&self) -> u64 {
        digest_hash(&self.digest).index
    }

    pub fn id(&self) -> &str {
        self.id_header
            .to_str()
            .expect("ids are validated to be visible ASCII")
    }

    /// The id, unchecked (ids are checked when read): for comparing many.
    fn id_bytes(&self) -> &[u8] {
        self.id_header.as_bytes()
    }

    /// Unix milliseconds.
    pub fn expires_at_ms(&self) -> Option<i64> {
        (self.expires_at_ms != i64::MAX).then_some(self.expires_at_ms)
    }

    /// Expired at `now_ms` (`expires_at <= now`).
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms <= now_ms
    }

    pub fn rate_limit_per_minute(&self) -> Option<u32> {
        self.rate_limit_per_minute.map(NonZeroU32::get)
    }

    pub fn restrictions(&self) -> Option<&Restrictions> {
        self.restrictions.as_deref()
    }

    pub fn allows_ip(&self, ip: Option<IpAddr>) -> bool {
        let Some(r) = self.restrictions.as_deref() else {
            return true;
        };
        if r.cidrs.is_empty() {
            return true;
        }
        let Some(ip) = ip else { return false };
        let ip = canonical_ip(ip);
        r.cidrs.iter().any(|n| n.contains(&ip))
    }

    /// See [`ReferrerSet::allows`].
    pub fn allows_referrer(&self, referer: Option<&[u8]>, origin: Option<&[u8]>) -> bool {
        self.restrictions
            .as_deref()
            .is_none_or(|r| r.referrers.allows(referer, origin))
    }

    /// `None` = no restriction.
    pub fn allowed_routes(&self) -> Option<&RouteTable<()>> {
        self.restrictions.as_deref()?.routes.as_ref()
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:203.0.113.7`) is the IPv4 address it maps.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// An entry that acts as absent, and why. Logged once by key id and counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Quarantined {
    /// `key <id>` or `partner <id>` (or the entry's position when it has no usable id).
    pub entry: String,
    pub reason: String,
}

pub struct Snapshot {
    pub revision: u64,
    pub generated_at: Option<Box<str>>,
    /// By the position a key record names. A partner id that keys name but the document does
    /// not give (once) has a place too, holding a deactivated placeholder no key in force
    /// refers to: positions stay the same from one reload to the next.
    pub partners: Vec<Partner>,
    pub environments: Vec<Environment>,
    pub scope_sets: Vec<ScopeSet>,
    pub quarantined: Vec<Quarantined>,
    /// `1 << chunk_bits` chunks, by digest.
    chunks: Box<[Arc<Chunk>]>,
    chunk_bits: u32,
    key_count: usize,
    /// Whether any key is stored as each kind of digest: a lookup skips the other.
    has_sha256: bool,
    has_hmac: bool,
    /// Whether the tables above are compact enough for the next reload to keep their
    /// positions (each at most about twice what is used), so that it can share chunks.
    reusable: bool,
    pepper: Option<Arc<[u8]>>,
    /// What the next reload needs to take entries whose text has not changed as they are.
    memo: memo::Memo,
    /// Key entries of the document taken from the snapshot it was a reload of, unread.
    recalled: usize,
}

/// A summary: the revision and counts, never a digest or the pepper.
impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("revision", &self.revision)
            .field("generated_at", &self.generated_at)
            .field("keys", &self.key_count)
            .field("partners", &self.partners.len())
            .field("quarantined", &self.quarantined.len())
            .field("pepper", &self.pepper.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Find the record for a presented key: hash it the way the records were stored, probe the
    /// index, and confirm the digest in constant time.
    pub fn find(&self, key: &str) -> Option<&KeyRecord> {
        if self.has_sha256 {
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            if let Some(r) = self.probe(DigestKind::Sha256, &digest) {
                return Some(r);
            }
        }
        if let (true, Some(pepper)) = (self.has_hmac, &self.pepper) {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(pepper).expect("HMAC takes any key length");
            mac.update(key.as_bytes());
            let digest: [u8; 32] = mac.finalize().into_bytes().into();
            if let Some(r) = self.probe(DigestKind::HmacSha256, &digest) {
                return Some(r);
            }
        }
        None
    }

    #[inline]
    fn probe(&self, kind: DigestKind, digest: &[u8; 32]) -> Option<&KeyRecord> {
        let hash = digest_hash(digest);
        self.chunks[chunk_of(hash, self.chunk_bits)].find(kind, digest, hash)
    }

    pub fn partner(&self, record: &KeyRecord) -> &Partner {
        &self.partners[record.partner as usize]
    }

    pub fn environment(&self, record: &KeyRecord) -> &Environment {
        &self.environments[record.environment as usize]
    }

    pub fn scopes(&self, record: &KeyRecord) -> &ScopeSet {
        &self.scope_sets[record.scopes as usize]
    }

    /// The key's `name`, if the document gave one. `record` is one of this snapshot's.
    pub fn key_name(&self, record: &KeyRecord) -> Option<&str> {
        self.chunks[chunk_of(digest_hash(&record.digest), self.chunk_bits)].name(record)
    }

    /// Keys in force (not quarantined).
    pub fn key_count(&self) -> usize {
        self.key_count
    }

    /// Key entries of the document that had the same text in the snapshot this one is a
    /// reload of, and were taken from it without being read again (see `snapshot::memo`).
    pub fn recalled_entries(&self) -> usize {
        self.recalled
    }
}

/// Where requests get the snapshot in force, and how fresh the source says it is.
pub struct SnapshotStore {
    current: ArcSwapOption<Snapshot>,
    /// Quarantined entries of the revision in force, so a reload logs only new ones.
    logged: Mutex<Vec<Quarantined>>,
    loaded_at: Mutex<Option<SystemTime>>,
    /// The revision in force, for tasks that follow it (ext_authz health) without polling.
    revision: watch::Sender<Option<u64>>,
    /// Milliseconds after `epoch` (negative: before it, for a cache written by an earlier run)
    /// at which the source last confirmed the snapshot in force; `NEVER` = not yet. Monotonic:
    /// a wall-clock jump neither revives nor expires a snapshot.
    confirmed_ms: AtomicI64,
    epoch: Instant,
    /// `u64::MAX` = no bound.
    max_staleness_ms: u64,
    /// The document in force as entries by id, kept only when `retain_documents` (a sync hub
    /// diffs it, a sync client applies deltas to it).
    document: ArcSwapOption<document::Document>,
    retain_documents: bool,
    /// The revision of the retained document, for the hub, which follows documents rather
    /// than snapshots (a document may be put beside its snapshot a little later).
    document_revision: watch::Sender<Option<u64>>,
    /// Counted outcomes, for `/metrics` and logs.
    pub stats: SourceStats,
}

const NEVER: i64 = i64::MIN;

/// What the source has done so far. Counters only go up.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Documents (or deltas) put in force.
    pub reloads_applied: AtomicU64,
    /// Documents refused: not JSON, wrong schema, revision going backwards, too large…
    pub reloads_rejected: AtomicU64,
    /// Attempts that got no document at all: unreachable, 5xx, timeouts, broken streams.
    pub fetch_errors: AtomicU64,
    /// Answers that confirmed the snapshot in force unchanged (HTTP 304, a gRPC heartbeat).
    pub confirmations: AtomicU64,
    /// `keygate.sync.v1` deltas applied.
    pub deltas_applied: AtomicU64,
}

impl SourceStats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for SnapshotStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a document was not put in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadFailure {
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Why a valid document was not put in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("revision {offered} is lower than revision {current} in force")]
    RevisionRegressed { offered: u64, current: u64 },
}

impl SnapshotStore {
    /// A store whose snapshot never goes stale.
    pub fn new() -> Self {
        Self::with_max_staleness(None)
    }

    /// A store whose snapshot stops being served once the source has not confirmed it for
    /// `max_staleness`.
    pub fn with_max_staleness(max_staleness: Option<Duration>) -> Self {
        Self::configured(max_staleness, false)
    }

    /// A store with a staleness bound that, when `retain_documents`, also keeps each
    /// document's entries (for `keygate.sync.v1`).
    pub fn configured(max_staleness: Option<Duration>, retain_documents: bool) -> Self {
        Self {
            document: ArcSwapOption::empty(),
            retain_documents,
            document_revision: watch::Sender::new(None),
            current: ArcSwapOption::empty(),
            logged: Mutex::default(),
            loaded_at: Mutex::default(),
            revision: watch::Sender::new(None),
            confirmed_ms: AtomicI64::new(NEVER),
            epoch: Instant::now(),
            max_staleness_ms: max_staleness
                .map_or(u64::MAX, |d| d.as_millis().try_into().unwrap_or(u64::MAX)),
            stats: SourceStats::default(),
        }
    }

    /// The source has just confirmed that the snapshot in force is current.
    pub fn confirm(&self) {
        self.confirm_ago(Duration::ZERO);
    }

    /// The source confirmed the snapshot in force `age` ago (a hub relays the age of its own
    /// confirmation, and a cache file its modification time, so staleness is measured end to
    /// end). Never moves the confirmation backwards.
    pub fn confirm_ago(&self, age: Duration) {
        let now = self.now_ms();
        let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2);
        self.confirmed_ms
            .fetch_max(now.saturating_sub(age), Ordering::Relaxed);
        SourceStats::count(&self.stats.confirmations);
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// How long ago the source last confirmed the snapshot in force; `None` = never.
    pub fn unconfirmed_for(&self) -> Option<Duration> {
        match self.confirmed_ms.load(Ordering::Relaxed) {
            NEVER => None,
            ms => Some(Duration::from_millis(
                self.now_ms().saturating_sub(ms).max(0) as u64,
            )),
        }
    }

    /// Whether the snapshot in force may be served: always without `max_staleness`, else only
    /// while its last confirmation is recent enough. Cheap: one atomic load and a clock read,
    /// and only when a bound is set.
    pub fn is_fresh(&self) -> bool {
        if self.max_staleness_ms == u64::MAX {
            return true;
        }
        let confirmed = self.confirmed_ms.load(Ordering::Relaxed);
        confirmed != NEVER
            && self.now_ms().saturating_sub(confirmed) as u64 <= self.max_staleness_ms
    }

    pub fn max_staleness(&self) -> Option<Duration> {
        (self.max_staleness_ms != u64::MAX).then(|| Duration::from_millis(self.max_staleness_ms))
    }

    /// The snapshot requests are decided against: the one in force while it is fresh, else
    /// none (every front then answers `snapshot_unavailable`).
    pub fn serving(&self) -> Option<Guard<Option<Arc<Snapshot>>>> {
        let guard = self.current.load();
        (guard.is_some() && self.is_fresh()).then_some(guard)
    }

    /// The snapshot in force, if any. Cheap: no lock, no reference count on the common path.
    pub fn current(&self) -> Guard<Option<Arc<Snapshot>>> {
        self.current.load()
    }

    pub fn current_arc(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Changes each time a snapshot is put in force: its revision.
    pub fn watch(&self) -> watch::Receiver<Option<u64>> {
        self.revision.subscribe()
    }

    /// When the snapshot in force was put in force.
    pub fn loaded_at(&self) -> Option<SystemTime> {
        *self.loaded_at.lock().expect("lock poisoned")
    }

    /// Whether sources should hand [`SnapshotStore::publish_document`] the document's entries.
    pub fn retains_documents(&self) -> bool {
        self.retain_documents
    }

    /// The entries of the document in force, when retained.
    pub fn document(&self) -> Option<Arc<document::Document>> {
        self.document.load_full()
    }

    /// Changes each time a retained document is stored: its revision.
    pub fn watch_documents(&self) -> watch::Receiver<Option<u64>> {
        self.document_revision.subscribe()
    }

    /// Publish from a document's JSON text: the index, then (when retained) the entries. The
    /// snapshot goes in force first, so a revocation does not wait for the entries.
    pub fn publish_json(
        &self,
        bytes: &[u8],
        pepper: Option<Arc<[u8]>>,
    ) -> Result<(u64, Vec<Quarantined>), LoadFailure> {
        // A hub also keeps the document as entries by id, for its followers. That second parse
        // runs on another thread at the same time, so the snapshot is put in force no later
        // and the delta is ready almost as soon as it is (hub → sidecar propagation).
        std::thread::scope(|scope| {
            let doc = self
                .retain_documents
                .then(|| scope.spawn(|| document::Document::from_json(bytes)));
            // Keys that did not change are shared with the snapshot in force.
            let base = self.current_arc();
            let snapshot = parse_with_base(bytes, pepper, base.as_deref())?;
            drop(base);
            let revision = snapshot.revision;
            let fresh = self.publish(snapshot)?;
            match doc.map(|d| d.join()) {
                None => {}
                Some(Ok(Ok(doc))) => self.keep_document(Arc::new(doc)),
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, revision, "sync: cannot keep the document")
                }
                Some(Err(_)) => {
                    tracing::error!(revision, "sync: keeping the document failed (a panic)")
                }
            }
            Ok((revision, fresh))
        })
    }

    fn keep_document(&self, doc: Arc<document::Document>) {
        let revision = doc.revision;
        // Only the newest: a late store must not replace a newer document.
        let newer = self
            .document
            .load()
            .as_ref()
            .is_none_or(|d| d.revision <= revision);
        if newer {
            self.document.store(Some(doc));
            self.document_revision.send_replace(Some(revision));
        }
    }

    /// As [`SnapshotStore::publish`], keeping `doc` (the same revision's entries) beside it.
    pub fn publish_document(
        &self,
        next: Snapshot,
        doc: Option<Arc<document::Document>>,
    ) -> Result<Vec<Quarantined>, PublishError> {
        self.publish_inner(next, doc)
    }

    /// Put `next` in force unless it would move the revision backwards. Returns the entries
    /// quarantined in `next` that were not quarantined in the revision it replaces.
    pub fn publish(&self, next: Snapshot) -> Result<Vec<Quarantined>, PublishError> {
        self.publish_inner(next, None)
    }

    fn publish_inner(
        &self,
        next: Snapshot,
        doc: Option<Arc<document::Document>>,
    ) -> Result<Vec<Quarantined>, PublishError> {
        // One publisher at a time from the revision check to the swap, so two sources racing
        // (a slow first poll and the cache at start-up) cannot put an older revision last.
        let mut logged = self.logged.lock().expect("lock poisoned");
        if let Some(cur) = self.current.load().as_ref() {
            if next.revision < cur.revision {
                return Err(PublishError::RevisionRegressed {
                    offered: next.revision,
                    current: cur.revision,
                });
            }
        }
        let revision = next.revision;
        let quarantined = next.quarantined.clone();
        SourceStats::count(&self.stats.reloads_applied);
        if let (true, Some(doc)) = (self.retain_documents, doc) {
            self.keep_document(doc);
        }
        self.current.store(Some(Arc::new(next)));
        *self.loaded_at.lock().expect("lock poisoned") = Some(SystemTime::now());
        self.revision.send_replace(Some(revision));
        // After the swap (a revocation does not wait for it), and linear: which quarantined
        // entries are new since the revision replaced.
        let before: std::collections::HashSet<&Quarantined> = logged.iter().collect();
        let fresh: Vec<Quarantined> = quarantined
            .iter()
            .filter(|q| !before.contains(q))
            .cloned()
            .collect();
        drop(before);
        *logged = quarantined;
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests;
