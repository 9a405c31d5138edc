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
//! Records expire after `ttl`; past `max_memory_bytes` the oldest are evicted first.

use std::collections::VecDeque;
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
        }
    }

    /// A place among the requests being answered (their bodies are held in memory), or `None`
    /// when `max_in_flight` are.
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
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
}

/// The local (in-process) store.
pub struct Store {
    records: DashMap<Box<str>, Record>,
    /// Completed records, oldest first, for eviction (entries whose seq no longer matches are
    /// skipped).
    order: Mutex<VecDeque<(Box<str>, u64)>>,
    bytes: AtomicUsize,
    seq: AtomicU64,
    pub limits: Limits,
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
            order: Mutex::default(),
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
        match self.records.entry(key.clone()) {
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
                    self.bytes.fetch_sub(*size, Ordering::Relaxed);
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
        }
    }

    /// Drop expired records; returns how many remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut freed = 0;
        self.records.retain(|_, r| match r {
            Record::Done { expires, size, .. } if *expires <= now => {
                freed += *size;
                false
            }
            _ => true,
        });
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        let mut order = self.order.lock().expect("lock poisoned");
        order.retain(|(k, seq)| {
            matches!(self.records.get(k).as_deref(), Some(Record::Done { seq: s, .. }) if s == seq)
        });
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

    fn evict(&self) {
        let mut order = self.order.lock().expect("lock poisoned");
        while self.bytes.load(Ordering::Relaxed) > self.limits.max_memory_bytes {
            let Some((key, seq)) = order.pop_front() else {
                break;
            };
            let removed = self.records.remove_if(
                &key,
                |_, r| matches!(r, Record::Done { seq: s, .. } if *s == seq),
            );
            if let Some((_, Record::Done { size, .. })) = removed {
                self.bytes.fetch_sub(size, Ordering::Relaxed);
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
        // The key is held twice: by the map and in the eviction order.
        let size = response.size() + 2 * key.len();
        let mut stored = false;
        if let Some(mut r) = store.records.get_mut(&key) {
            if let Record::InFlight { fingerprint, seq } = *r {
                if seq == self.seq {
                    *r = Record::Done {
                        fingerprint,
                        response: Arc::new(response),
                        expires: Instant::now() + store.limits.ttl,
                        seq,
                        size,
                    };
                    stored = true;
                }
            }
        }
        if stored {
            store.bytes.fetch_add(size, Ordering::Relaxed);
            store
                .order
                .lock()
                .expect("lock poisoned")
                .push_back((key, self.seq));
            store.evict();
        }
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
