//! Idempotent replay for the proxy front: the first response to a mutating request carrying an
//! `Idempotency-Key` is stored, and a retry with the same key gets that response again without
//! reaching the upstream.
//!
//! Records are keyed by (API key id, Idempotency-Key), so two clients can never see each other's
//! responses, and hold a fingerprint of the request (method, normalized path and query, body):
//! a retry with the same key and a different fingerprint is refused (`422
//! idempotency_key_reused`), one arriving while the first is still being answered too (`409
//! idempotency_key_in_use`). Upstream 5xx answers, keygate's own 502/504, answers larger than
//! `max_response_bytes` and requests the client abandoned are not stored, so a retry runs again.
//! Records expire after `ttl`. Past `max_memory_bytes`, records are evicted from the API key
//! holding the most, its oldest first: a key that keeps many answers (a bulk job, a client
//! minting a new Idempotency-Key per call) evicts its own, never a quieter key's. Each key
//! holds at most `max_in_flight_per_key` of the `max_in_flight` places for requests being
//! answered.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

/// How long an idempotent request's exchange may go on in the background after its client was
/// answered 504 (or went away), so that its outcome is still recorded: the request sent and
/// answered within it, then the answer read ahead within it again.
pub const BACKGROUND_EXCHANGE: Duration = Duration::from_secs(300);

/// How long a shared (Redis) in-flight record holds its key at most: longer than the exchange
/// it guards can run (twice [`BACKGROUND_EXCHANGE`]), and a minute more. A replica that dies
/// mid-request, or a record whose release was lost, blocks retries (409) that long, not for
/// the whole `idempotency.ttl`.
pub const IN_FLIGHT_HOLD: Duration = Duration::from_secs(2 * BACKGROUND_EXCHANGE.as_secs() + 60);

/// The longest Idempotency-Key kept (as Stripe's API takes them): a longer one is refused.
pub const MAX_KEY_BYTES: usize = 255;

/// What is kept of a response.
#[derive(Debug)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Stored {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum::<usize>()
            + 128
    }
}

#[derive(Debug)]
enum Record {
    InFlight {
        fingerprint: [u8; 32],
        seq: u64,
    },
    Done {
        fingerprint: [u8; 32],
        response: Arc<Stored>,
        expires: Instant,
        seq: u64,
        size: usize,
    },
}

/// What to do with a request.
pub enum Begin {
    /// First time: forward it, then [`Pending::complete`] with the response.
    Proceed(Pending),
    /// Seen and answered: send this again.
    Replay(Arc<Stored>),
    InUse,
    Reused,
    /// The shared store did not answer: refuse rather than run the request unguarded.
    Unavailable,
}

/// A request being answered for the first time, in whichever store keeps its record. Dropped
/// without [`Pending::complete`], it frees its Idempotency-Key for a retry.
pub enum Pending {
    Local(LocalPending),
    Redis(crate::fleet::RedisPending),
}

impl Pending {
    /// Keep `response` for retries, unless it is not [`keepable`] or too large.
    pub async fn complete(self, response: Stored) {
        match self {
            Pending::Local(p) => p.complete(response),
            Pending::Redis(p) => p.complete(response).await,
        }
    }
}

/// Idempotent replay as the proxy uses it: the local store, or Redis for a fleet.
pub struct Idempotency {
    pub limits: Limits,
    backend: Backend,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Places held by each API key (present while it holds any).
    held: Arc<Mutex<HashMap<Box<str>, usize>>>,
}

/// A place among the idempotent requests being answered, held by one API key; given back when
/// dropped.
pub struct Admission {
    _place: tokio::sync::OwnedSemaphorePermit,
    key_id: Box<str>,
    held: Arc<Mutex<HashMap<Box<str>, usize>>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("lock poisoned");
        if let Some(n) = held.get_mut(&self.key_id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key_id);
            }
        }
    }
}

enum Backend {
    Local(Arc<Store>),
    Redis(crate::fleet::RedisIdempotency),
}

impl Idempotency {
    /// With a Redis backend, starts connecting (so: inside a runtime).
    pub fn new(settings: crate::config::IdempotencySettings) -> Self {
        let limits = settings.limits;
        let backend = match settings.redis {
            Some(redis) => Backend::Redis(crate::fleet::RedisIdempotency::new(redis, limits)),
            None => Backend::Local(Arc::new(Store::new(limits))),
        };
        Self {
            limits,
            backend,
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight)),
            held: Arc::default(),
        }
    }

    /// A place among the requests being answered (their bodies are held in memory) for a
    /// request of API key `key_id`, or `None` when `max_in_flight` are, or that key holds
    /// `max_in_flight_per_key` (so one key's slow endpoint cannot take every place).
    pub fn admit(&self, key_id: &str) -> Option<Admission> {
        let mut held = self.held.lock().expect("lock poisoned");
        if held.get(key_id).copied().unwrap_or(0) >= self.limits.max_in_flight_per_key {
            return None;
        }
        let place = self.in_flight.clone().try_acquire_owned().ok()?;
        *held.entry(key_id.into()).or_insert(0) += 1;
        Some(Admission {
            _place: place,
            key_id: key_id.into(),
            held: self.held.clone(),
        })
    }

    pub async fn begin(
        &self,
        key_id: &str,
        idempotency_key: &[u8],
        fingerprint: [u8; 32],
    ) -> Begin {
        match &self.backend {
            Backend::Local(store) => store.begin(key_id, idempotency_key, fingerprint),
            Backend::Redis(redis) => redis.begin(key_id, idempotency_key, fingerprint).await,
        }
    }

    /// The local store, which needs sweeping (Redis expires its own records).
    pub fn local(&self) -> Option<&Arc<Store>> {
        match &self.backend {
            Backend::Local(store) => Some(store),
            Backend::Redis(_) => None,
        }
    }
}

/// Limits of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub ttl: Duration,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub max_memory_bytes: usize,
    /// Idempotent requests being answered at once; each may hold `max_request_bytes` and
    /// `max_response_bytes` in memory, so this bounds that memory. Past it: 503.
    pub max_in_flight: usize,
    /// Of those, the most one API key may hold (1..=`max_in_flight`).
    pub max_in_flight_per_key: usize,
}

/// The local (in-process) store.
pub struct Store {
    records: DashMap<Box<str>, Record>,
    /// Completed records by API key, for eviction. Locked after a `records` entry is let go,
    /// never while one is held.
    ledger: Mutex<Ledger>,
    bytes: AtomicUsize,
    seq: AtomicU64,
    pub limits: Limits,
}

/// The completed records of each API key, oldest first, and the keys by the bytes they hold.
#[derive(Default)]
struct Ledger {
    holders: HashMap<Box<str>, Holder>,
    /// (bytes held, key id) of every holder: the last holds the most.
    by_bytes: BTreeSet<(usize, Box<str>)>,
}

#[derive(Default)]
struct Holder {
    /// The sizes of its completed records still in the store.
    bytes: usize,
    /// Its completed records (record key, seq, size), oldest first; entries whose record is
    /// gone or was replaced (another seq) are skipped.
    kept: VecDeque<(Box<str>, u64, usize)>,
}

impl Ledger {
    /// Change what `key_id` holds by `add` bytes less `sub`, keeping `by_bytes` in step.
    fn adjust(&mut self, key_id: &str, add: usize, sub: usize) -> Option<&mut Holder> {
        let holder = self.holders.get_mut(key_id)?;
        self.by_bytes.remove(&(holder.bytes, key_id.into()));
        holder.bytes = (holder.bytes + add).saturating_sub(sub);
        self.by_bytes.insert((holder.bytes, key_id.into()));
        Some(holder)
    }

    fn kept(&mut self, key_id: &str, record: Box<str>, seq: u64, size: usize) {
        self.holders.entry(key_id.into()).or_default();
        if let Some(holder) = self.adjust(key_id, size, 0) {
            holder.kept.push_back((record, seq, size));
        }
    }

    /// A record of `key_id` of `size` bytes left the store (expired or replaced).
    fn forget(&mut self, key_id: &str, size: usize) {
        self.adjust(key_id, 0, size);
    }

    fn drop_holder(&mut self, key_id: &str) {
        if let Some(holder) = self.holders.remove(key_id) {
            self.by_bytes.remove(&(holder.bytes, key_id.into()));
        }
    }
}

/// The API key id a record key begins with.
fn key_id_of(record: &str) -> &str {
    record.split_once('\n').map_or(record, |(id, _)| id)
}

/// The fingerprint of a request: what makes a retry "the same request".
pub fn fingerprint(method: &str, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.to_ascii_uppercase().as_bytes());
    h.update(b"\n");
    h.update(path_and_query.as_bytes());
    h.update(b"\n");
    h.update(body);
    h.finalize().into()
}

/// Whether an answer is the request's outcome, to replay: not a server error, and not one of
/// the client errors that say the request was not processed and may be retried as it is
/// (408 Request Timeout, 425 Too Early, 429 Too Many Requests).
pub fn keepable(status: StatusCode) -> bool {
    !status.is_server_error()
        && !matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        )
}

fn record_key(key_id: &str, idempotency_key: &[u8]) -> Box<str> {
    // A key id is a conservative token (no newline), and the Idempotency-Key (any header bytes)
    // goes in hex, so the pair is unambiguous.
    format!("{key_id}\n{}", hex::encode(idempotency_key)).into_boxed_str()
}

impl Store {
    pub fn new(limits: Limits) -> Self {
        Self {
            records: DashMap::new(),
            ledger: Mutex::default(),
            bytes: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            limits,
        }
    }

    pub fn begin(
        self: &Arc<Self>,
        key_id: &str,
        idempotency_key: &[u8],
        fingerprint: [u8; 32],
    ) -> Begin {
        self.begin_at(key_id, idempotency_key, fingerprint, Instant::now())
    }

    fn begin_at(
        self: &Arc<Self>,
        key_id: &str,
        idempotency_key: &[u8],
        fp: [u8; 32],
        now: Instant,
    ) -> Begin {
        let key = record_key(key_id, idempotency_key);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut expired = 0;
        let begin = match self.records.entry(key.clone()) {
            Entry::Occupied(mut e) => match e.get() {
                Record::InFlight { .. } => Begin::InUse,
                Record::Done {
                    fingerprint,
                    response,
                    expires,
                    ..
                } if *expires > now => {
                    if *fingerprint == fp {
                        Begin::Replay(response.clone())
                    } else {
                        Begin::Reused
                    }
                }
                Record::Done { size, .. } => {
                    // Expired: a new request under the same key.
                    expired = *size;
                    e.insert(Record::InFlight {
                        fingerprint: fp,
                        seq,
                    });
                    Begin::Proceed(Pending::Local(LocalPending {
                        store: self.clone(),
                        key: Some(key),
                        seq,
                    }))
                }
            },
            Entry::Vacant(e) => {
                e.insert(Record::InFlight {
                    fingerprint: fp,
                    seq,
                });
                Begin::Proceed(Pending::Local(LocalPending {
                    store: self.clone(),
                    key: Some(key),
                    seq,
                }))
            }
        };
        if expired > 0 {
            self.bytes.fetch_sub(expired, Ordering::Relaxed);
            let mut ledger = self.ledger.lock().expect("lock poisoned");
            ledger.forget(key_id, expired);
        }
        begin
    }

    /// Drop expired records; returns how many remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut freed = Vec::new();
        self.records.retain(|k, r| match r {
            Record::Done { expires, size, .. } if *expires <= now => {
                freed.push((key_id_of(k).to_owned(), *size));
                false
            }
            _ => true,
        });
        self.bytes
            .fetch_sub(freed.iter().map(|(_, size)| size).sum(), Ordering::Relaxed);
        let mut ledger = self.ledger.lock().expect("lock poisoned");
        for (key_id, size) in &freed {
            ledger.forget(key_id, *size);
        }
        let ids: Vec<Box<str>> = ledger.holders.keys().cloned().collect();
        for id in ids {
            let holder = ledger.holders.get_mut(&id).expect("listed");
            holder.kept.retain(|(k, seq, _)| self.holds(k, *seq));
            if holder.kept.is_empty() {
                ledger.drop_holder(&id);
            }
        }
        self.records.len()
    }

    /// Bytes held by completed records (approximate).
    pub fn memory(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether the store holds the completed record `seq` under `key`.
    fn holds(&self, key: &str, seq: u64) -> bool {
        matches!(self.records.get(key).as_deref(), Some(Record::Done { seq: s, .. }) if *s == seq)
    }

    /// Complete the in-flight record `seq` under `record` with `response` (unless it is gone:
    /// abandoned or expired), count it in the ledger, then evict while over
    /// `max_memory_bytes`: the oldest record of the key holding the most. Under the ledger's
    /// lock throughout, so that a record is never seen completed and not yet counted (an
    /// expiry or a sweep in between would make the counts drift).
    fn keep(&self, record: Box<str>, seq: u64, response: Stored) {
        // The key is held twice: by the map and in the eviction order.
        let size = response.size() + 2 * record.len();
        let mut ledger = self.ledger.lock().expect("lock poisoned");
        let stored = match self.records.get_mut(&record) {
            Some(mut r) => match *r {
                Record::InFlight {
                    fingerprint,
                    seq: s,
                } if s == seq => {
                    *r = Record::Done {
                        fingerprint,
                        response: Arc::new(response),
                        expires: Instant::now() + self.limits.ttl,
                        seq,
                        size,
                    };
                    true
                }
                _ => false,
            },
            None => false,
        };
        if !stored {
            return;
        }
        self.bytes.fetch_add(size, Ordering::Relaxed);
        let key_id: Box<str> = key_id_of(&record).into();
        ledger.kept(&key_id, record, seq, size);
        while self.bytes.load(Ordering::Relaxed) > self.limits.max_memory_bytes {
            let Some((_, largest)) = ledger.by_bytes.last().cloned() else {
                break;
            };
            let holder = ledger.holders.get_mut(&largest).expect("listed");
            let Some((key, seq, size)) = holder.kept.pop_front() else {
                // Nothing of it left to evict (cannot happen: its bytes are its records').
                ledger.drop_holder(&largest);
                continue;
            };
            let removed = self.records.remove_if(
                &key,
                |_, r| matches!(r, Record::Done { seq: s, .. } if *s == seq),
            );
            if removed.is_some() {
                self.bytes.fetch_sub(size, Ordering::Relaxed);
                ledger.forget(&largest, size);
            }
            if ledger
                .holders
                .get(&largest)
                .is_some_and(|h| h.kept.is_empty())
            {
                ledger.drop_holder(&largest);
            }
        }
    }
}

/// A request being answered for the first time, in the local store.
pub struct LocalPending {
    store: Arc<Store>,
    key: Option<Box<str>>,
    seq: u64,
}

impl LocalPending {
    /// Keep `response` for retries, unless it is a 5xx or too large (then the key is freed).
    pub fn complete(mut self, response: Stored) {
        let Some(key) = self.key.take() else { return };
        let store = self.store.clone();
        if !keepable(response.status) || response.body.len() > store.limits.max_response_bytes {
            store.records.remove_if(
                &key,
                |_, r| matches!(r, Record::InFlight { seq, .. } if *seq == self.seq),
            );
            return;
        }
        store.keep(key, self.seq, response);
    }
}

impl Drop for LocalPending {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let seq = self.seq;
            self.store.records.remove_if(
                &key,
                |_, r| matches!(r, Record::InFlight { seq: s, .. } if *s == seq),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_memory_bytes: usize) -> Arc<Store> {
        Arc::new(Store::new(Limits {
            ttl: Duration::from_secs(60),
            max_request_bytes: 1024,
            max_response_bytes: 1024,
            max_memory_bytes,
            max_in_flight: 16,
            max_in_flight_per_key: 4,
        }))
    }

    fn complete_local(p: Pending, response: Stored) {
        match p {
            Pending::Local(p) => p.complete(response),
            Pending::Redis(_) => unreachable!(),
        }
    }

    fn ok(body: &'static str) -> Stored {
        Stored {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn replay_in_use_and_reused() {
        let s = store(1 << 20);
        let fp = fingerprint("POST", "/v1/x", b"{}");
        let Begin::Proceed(p) = s.begin("key_a", b"k1", fp) else {
            panic!()
        };
        assert!(matches!(s.begin("key_a", b"k1", fp), Begin::InUse));
        complete_local(p, ok("made"));
        match s.begin("key_a", b"k1", fp) {
            Begin::Replay(r) => assert_eq!(&r.body[..], b"made"),
            _ => panic!("no replay"),
        }
        let other = fingerprint("POST", "/v1/x", b"{\"a\":1}");
        assert!(matches!(s.begin("key_a", b"k1", other), Begin::Reused));
        // Another API key's records are its own.
        assert!(matches!(s.begin("key_b", b"k1", fp), Begin::Proceed(_)));
    }

    #[test]
    fn failures_and_abandoned_requests_free_the_key() {
        let s = store(1 << 20);
        let fp = fingerprint("POST", "/v1/x", b"");
        let Begin::Proceed(p) = s.begin("key_a", b"k", fp) else {
            panic!()
        };
        complete_local(
            p,
            Stored {
                status: StatusCode::BAD_GATEWAY,
                headers: HeaderMap::new(),
                body: Bytes::new(),
            },
        );
        let Begin::Proceed(p) = s.begin("key_a", b"k", fp) else {
            panic!("a 5xx was kept")
        };
        drop(p);
        let Begin::Proceed(p) = s.begin("key_a", b"k", fp) else {
            panic!("an abandoned request kept the key")
        };
        complete_local(
            p,
            Stored {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Bytes::from(vec![b'x'; 2048]),
            },
        );
        assert!(
            matches!(s.begin("key_a", b"k", fp), Begin::Proceed(_)),
            "an oversized answer was kept"
        );
    }

    #[test]
    fn records_expire() {
        let s = store(1 << 20);
        let fp = fingerprint("DELETE", "/v1/x/1", b"");
        let Begin::Proceed(p) = s.begin("key_a", b"k", fp) else {
            panic!()
        };
        complete_local(p, ok("gone"));
        let later = Instant::now() + Duration::from_secs(61);
        assert!(matches!(
            s.begin_at("key_a", b"k", fp, later),
            Begin::Proceed(_)
        ));
    }

    #[test]
    fn memory_is_capped_oldest_first() {
        let s = store(2_000);
        for i in 0..50 {
            let fp = fingerprint("POST", "/v1/x", format!("{i}").as_bytes());
            let Begin::Proceed(p) = s.begin("key_a", format!("k{i}").as_bytes(), fp) else {
                panic!()
            };
            complete_local(p, ok("0123456789012345678901234567890123456789"));
        }
        assert!(s.memory() <= 2_000, "{}", s.memory());
        assert!(s.len() < 50);
        let last = fingerprint("POST", "/v1/x", b"49");
        assert!(matches!(s.begin("key_a", b"k49", last), Begin::Replay(_)));
        let first = fingerprint("POST", "/v1/x", b"0");
        assert!(matches!(s.begin("key_a", b"k0", first), Begin::Proceed(_)));
    }

    /// Completes a record of `key_id` under Idempotency-Key `k` with a ~200-byte answer.
    fn keep(s: &Arc<Store>, key_id: &str, k: &str) {
        let fp = fingerprint("POST", "/v1/x", k.as_bytes());
        let Begin::Proceed(p) = s.begin(key_id, k.as_bytes(), fp) else {
            panic!("{key_id} {k} was not new")
        };
        complete_local(p, ok("0123456789012345678901234567890123456789"));
    }

    fn replays(s: &Arc<Store>, key_id: &str, k: &str) -> bool {
        let fp = fingerprint("POST", "/v1/x", k.as_bytes());
        match s.begin(key_id, k.as_bytes(), fp) {
            Begin::Replay(_) => true,
            Begin::Proceed(_) => false,
            _ => panic!("{key_id} {k}: neither replayed nor new"),
        }
    }

    #[test]
    fn a_key_that_keeps_many_answers_evicts_its_own() {
        let s = store(2_000);
        for k in ["b0", "b1", "b2"] {
            keep(&s, "key_b", k);
        }
        // key_a keeps far more than fits: it evicts its own oldest, never key_b's.
        for i in 0..50 {
            keep(&s, "key_a", &format!("a{i}"));
        }
        assert!(s.memory() <= 2_000, "{}", s.memory());
        for k in ["b0", "b1", "b2"] {
            assert!(replays(&s, "key_b", k), "key_b's {k} was evicted");
        }
        assert!(replays(&s, "key_a", "a49"));
        assert!(!replays(&s, "key_a", "a0"), "key_a's oldest was kept");
        // Once key_b holds the most, its own oldest go first.
        let kept_a: Vec<usize> = (0..50)
            .filter(|i| replays(&s, "key_a", &format!("a{i}")))
            .collect();
        for i in 3..20 {
            keep(&s, "key_b", &format!("b{i}"));
        }
        assert!(s.memory() <= 2_000, "{}", s.memory());
        assert!(!replays(&s, "key_b", "b0"), "key_b's oldest was kept");
        assert!(replays(&s, "key_b", "b19"));
        let still_a = (0..50)
            .filter(|i| replays(&s, "key_a", &format!("a{i}")))
            .count();
        assert!(still_a > 0, "key_b evicted all of key_a's");
        assert!(still_a <= kept_a.len());
    }

    #[test]
    fn expired_records_leave_the_ledger() {
        let s = Arc::new(Store::new(Limits {
            ttl: Duration::ZERO,
            ..store(2_000).limits
        }));
        for i in 0..5 {
            keep(&s, "key_a", &format!("a{i}"));
            keep(&s, &format!("key_{i}"), "x");
        }
        assert_eq!(s.sweep(), 0);
        assert_eq!(s.memory(), 0);
        let ledger = s.ledger.lock().unwrap();
        assert!(ledger.holders.is_empty() && ledger.by_bytes.is_empty());
    }

    #[test]
    fn a_replaced_record_is_counted_once() {
        // An expired record taken over by a new request: its bytes leave the key's count, so
        // the key is not thought to hold more than it does (and evicted from first).
        let s = store(1 << 20);
        keep(&s, "key_a", "k");
        let held = s.memory();
        let fp = fingerprint("POST", "/v1/x", b"k");
        let later = Instant::now() + Duration::from_secs(61);
        let Begin::Proceed(p) = s.begin_at("key_a", b"k", fp, later) else {
            panic!("not expired")
        };
        assert_eq!(s.memory(), 0);
        complete_local(p, ok("0123456789012345678901234567890123456789"));
        assert_eq!(s.memory(), held);
        let ledger = s.ledger.lock().unwrap();
        assert_eq!(ledger.holders["key_a"].bytes, held);
        assert_eq!(ledger.by_bytes.len(), 1);
    }

    #[tokio::test]
    async fn one_key_holds_at_most_its_share_of_the_places() {
        let limits = store(1 << 20).limits; // 16 places, 4 a key
        let idem = Idempotency::new(crate::config::IdempotencySettings {
            limits,
            redis: None,
        });
        let a: Vec<Admission> = (0..4).map(|_| idem.admit("key_a").unwrap()).collect();
        assert!(idem.admit("key_a").is_none(), "a fifth place for key_a");
        let others: Vec<Admission> = (0..12)
            .map(|i| idem.admit(&format!("key_{i}")).unwrap())
            .collect();
        assert!(idem.admit("key_b").is_none(), "more than 16 places");
        drop(others);
        assert!(idem.admit("key_a").is_none());
        drop(a);
        let again: Vec<Admission> = (0..4).map(|_| idem.admit("key_a").unwrap()).collect();
        assert_eq!(again.len(), 4, "places given back");
        drop(again);
        assert!(idem.held.lock().unwrap().is_empty());
    }

    #[test]
    fn the_fingerprint_covers_method_path_and_body() {
        let base = fingerprint("POST", "/v1/x?a=1", b"{}");
        assert_eq!(base, fingerprint("post", "/v1/x?a=1", b"{}"));
        assert_ne!(base, fingerprint("PUT", "/v1/x?a=1", b"{}"));
        assert_ne!(base, fingerprint("POST", "/v1/x?a=2", b"{}"));
        assert_ne!(base, fingerprint("POST", "/v1/x?a=1", b"{ }"));
        assert_ne!(
            fingerprint("POST", "/a\nb", b""),
            fingerprint("POST", "/a", b"b")
        );
    }
}
