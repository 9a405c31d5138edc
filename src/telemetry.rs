//! What the fronts count as they answer: answers by front and code, how long deciding and
//! answering took (histograms), open and refused connections; and the one log event per
//! decision. Counting happens on the request path, so it is a handful of relaxed atomic adds
//! into a [`Shard`] owned by one proxy thread (no cache line shared between threads in the
//! thread-per-core layout); `/metrics` sums the shards when scraped.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::HeaderValue;
use ipnet::IpNet;

use crate::config::DecisionLog;
use crate::deny::{DenyReason, CODES};

/// The fronts that decide requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Proxy,
    ExtAuthz,
    AuthzHttp,
}

impl Front {
    pub const ALL: [Front; 3] = [Front::Proxy, Front::ExtAuthz, Front::AuthzHttp];

    pub fn as_str(self) -> &'static str {
        match self {
            Front::Proxy => "proxy",
            Front::ExtAuthz => "ext_authz",
            Front::AuthzHttp => "authz_http",
        }
    }
}

/// Upper bounds of the latency histograms' buckets, in nanoseconds (50 µs to 10 s).
pub const BUCKETS_NS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// A latency histogram: a count per bucket (not cumulative; the last one is `+Inf`) and the sum.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKETS_NS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Add this histogram's counts to `counts` and `sum_ns`.
    fn add_to(&self, counts: &mut [u64; BUCKETS_NS.len() + 1], sum_ns: &mut u64) {
        for (total, c) in counts.iter_mut().zip(&self.counts) {
            *total += c.load(Ordering::Relaxed);
        }
        *sum_ns += self.sum_ns.load(Ordering::Relaxed);
    }
}

/// A summed histogram, as `/metrics` shows it.
#[derive(Debug)]
pub struct HistogramTotals {
    /// `(upper bound in seconds, count in this bucket alone)`, ending with `f64::MAX` for
    /// `+Inf` (prometheus-client's convention: it accumulates while encoding).
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

fn totals<'a>(parts: impl Iterator<Item = &'a Histogram>) -> HistogramTotals {
    let mut counts = [0u64; BUCKETS_NS.len() + 1];
    let mut sum_ns = 0u64;
    for h in parts {
        h.add_to(&mut counts, &mut sum_ns);
    }
    let buckets = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| (BUCKETS_NS.get(i).map_or(f64::MAX, |&b| b as f64 / 1e9), c))
        .collect();
    HistogramTotals {
        buckets,
        count: counts.iter().sum(),
        sum_seconds: sum_ns as f64 / 1e9,
    }
}

/// Index of "allowed" in a shard's answer counts; denials follow at `1 + code_index`.
const ALLOWED: usize = 0;

/// One thread's counts for one front.
pub struct Shard {
    answers: [AtomicU64; CODES.len() + 1],
    /// From the request's arrival to the verdict (decision and rate limit).
    decision: Histogram,
    /// From the request's arrival to the response head being ready (for the proxy, the
    /// upstream's answer; for the asking fronts, the same as `decision` plus encoding).
    request: Histogram,
    log: DecisionLog,
    front: Front,
    /// Upstream answers replaced by a 502 because their body broke off before any of it went
    /// out (the request was counted by the upstream's status already).
    broken: AtomicU64,
}

impl Shard {
    /// Count an upstream answer replaced by a 502 (see `broken`).
    pub fn broken_answer(&self) {
        self.broken.fetch_add(1, Ordering::Relaxed);
    }
}

/// A request's facts as it is answered, filled in by the front.
pub struct Note {
    /// The request id, once known (for a request whose client leaves before the answer).
    pub request_id: Option<HeaderValue>,
    /// When the verdict was known.
    pub decided: Option<Instant>,
    /// The denial's position in [`CODES`]; `None` while the request is allowed.
    pub denied: Option<usize>,
    pub key_id: Option<HeaderValue>,
    pub partner_id: Option<HeaderValue>,
    /// Whether [`Note::key`] keeps the ids: only the decision log reads them, and each kept id
    /// costs a request two reference counts (a locked instruction each). With
    /// `log.decisions = "denied"` an allowed request's ids are kept too: the proxy may still
    /// deny it after the decision (the upstream's 502 or 504, an idempotent replay's 409).
    pub keep_ids: bool,
}

impl Default for Note {
    fn default() -> Self {
        Note {
            request_id: None,
            decided: None,
            denied: None,
            key_id: None,
            partner_id: None,
            keep_ids: true,
        }
    }
}

/// Whether a shard's decisions can be logged, by its `log.decisions` and the log's level.
fn logs_decisions(log: DecisionLog) -> bool {
    log != DecisionLog::None && tracing::enabled!(target: "keygate::decision", tracing::Level::INFO)
}

impl Note {
    pub fn deny(&mut self, reason: &DenyReason) {
        self.denied = Some(reason.code_index());
        self.decided
            .get_or_insert_with(|| crate::clock::now().into_std());
    }

    pub fn allow(&mut self) {
        self.decided
            .get_or_insert_with(|| crate::clock::now().into_std());
    }

    /// The key (and its partner) the request was decided for, kept if its decision can be
    /// logged.
    pub fn key(&mut self, key_id: &HeaderValue, partner_id: Option<&HeaderValue>) {
        if self.keep_ids {
            self.key_id = Some(key_id.clone());
            self.partner_id = partner_id.cloned();
        }
    }

    pub fn code(&self) -> &'static str {
        self.denied.map_or("allowed", |i| CODES[i])
    }
}

impl Shard {
    /// Count one answered request and log it as `log.decisions` says.
    pub fn answered(&self, started: Instant, note: &Note, status: u16, request_id: &str) {
        // Read afresh: the answer may come late in the poll its request arrived in (a decision
        // made without waiting), and the latency must show what the poll took.
        let now = crate::clock::fresh().into_std();
        self.answers[note.denied.map_or(ALLOWED, |i| i + 1)].fetch_add(1, Ordering::Relaxed);
        let decided = note.decided.unwrap_or(now);
        self.decision
            .observe(decided.saturating_duration_since(started));
        let elapsed = now.saturating_duration_since(started);
        self.request.observe(elapsed);
        let log = match self.log {
            DecisionLog::All => true,
            DecisionLog::Denied => note.denied.is_some(),
            DecisionLog::None => false,
        };
        if log {
            let text = |v: &Option<HeaderValue>| {
                v.as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            tracing::info!(
                target: "keygate::decision",
                front = self.front.as_str(),
                request_id,
                key_id = %text(&note.key_id),
                partner_id = %text(&note.partner_id),
                code = note.code(),
                status,
                latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                "decision"
            );
        }
    }
}

/// Counts and logs one request exactly once: with its answer ([`Record::finish`]), or, when
/// the client leaves first and the request's future is dropped, with status 499 (nginx's
/// "client closed request") and whatever was decided by then.
pub struct Record<'s> {
    shard: &'s Shard,
    started: Instant,
    pub note: Note,
    finished: bool,
}

impl<'s> Record<'s> {
    pub fn new(shard: &'s Shard) -> Self {
        Record {
            shard,
            started: crate::clock::now().into_std(),
            note: Note {
                keep_ids: logs_decisions(shard.log),
                ..Note::default()
            },
            finished: false,
        }
    }

    /// Counts and logs the answer (once: a second call does nothing, nor does the drop).
    pub fn finish(&mut self, status: u16, request_id: &str) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.shard
            .answered(self.started, &self.note, status, request_id);
    }

    /// [`Record::finish`] with the request id in the note.
    pub fn finish_noted(mut self, status: u16) {
        self.finished = true;
        self.answered_noted(status);
    }

    fn answered_noted(&self, status: u16) {
        let id = self.note.request_id.as_ref();
        let id = id.map_or("", crate::headers::request_id_str);
        self.shard.answered(self.started, &self.note, status, id);
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.answered_noted(499);
        }
    }
}

/// Open connections of one front, against `limits.max_connections` and, on the proxy, per
/// client address (`proxy.max_connections_per_ip`).
pub struct Connections {
    open: AtomicUsize,
    max: usize,
    refused: AtomicU64,
    /// 0: no limit per address.
    per_ip: usize,
    /// Connections open per client address; empty without a limit.
    by_ip: DashMap<IpAddr, usize>,
    refused_per_ip: AtomicU64,
}

/// Held while a connection is open.
pub struct ConnectionGuard {
    connections: Arc<Connections>,
    /// The address it counts against, when there is a limit per address.
    ip: Option<IpAddr>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let c = &self.connections;
        if let Some(ip) = self.ip {
            if let dashmap::Entry::Occupied(mut open) = c.by_ip.entry(ip) {
                if *open.get() <= 1 {
                    open.remove();
                } else {
                    *open.get_mut() -= 1;
                }
            }
        }
        c.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connections {
    /// `per_ip` 0: no limit per client address.
    pub fn new(max: usize, per_ip: usize) -> Arc<Self> {
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            max,
            refused: AtomicU64::new(0),
            per_ip,
            by_ip: DashMap::new(),
            refused_per_ip: AtomicU64::new(0),
        })
    }

    /// Take a place for a new connection from `peer` (its canonical form:
    /// [`crate::snapshot::canonical_ip`]), or `None` (counted as refused) when all are taken,
    /// or all of the address's, unless it is one of the `trusted` proxies, which speak for many
    /// clients.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, trusted: &[IpNet]) -> Option<ConnectionGuard> {
        let taken = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            });
        if taken.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut guard = ConnectionGuard {
            connections: self.clone(),
            ip: None,
        };
        if self.per_ip > 0 && !crate::client_ip::is_trusted(peer, trusted) {
            let mut open = self.by_ip.entry(peer).or_insert(0);
            if *open >= self.per_ip {
                drop(open);
                self.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                // Gives the front's place back; the address's count was not taken.
                return None;
            }
            *open += 1;
            guard.ip = Some(peer);
        }
        Some(guard)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Refused because `limits.max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Refused because `proxy.max_connections_per_ip` were open from the client's address.
    pub fn refused_per_ip(&self) -> u64 {
        self.refused_per_ip.load(Ordering::Relaxed)
    }
}

struct FrontStats {
    shards: Mutex<Vec<Arc<Shard>>>,
    connections: Arc<Connections>,
}

/// Lines the log dropped because stderr did not take them in time (see [`LogWriter`]).
static LOG_DROPS: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// The log's writer thread, kept until [`flush_log`].
static LOG_GUARD: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// The process's log writer: never blocks its caller. Lines go to a thread of their own that
/// writes them to stderr, at most `buffered_lines` waiting; past that, new lines are dropped and
/// counted ([`log_lines_dropped`]). A log reader that stalls (a stuck shipper, a pipe nobody
/// drains) would otherwise stop every request at its decision line, and `/healthz` with them.
///
/// The thread starts with the first line written, not before: a keygate that logs nothing
/// (`level = "warn"` and all well) stays a single-threaded process when pinned to one core,
/// where glibc's `malloc` and socket calls skip their locking and cancellation work (~1% of
/// a proxied request's instructions, BENCHMARKS.md §3).
pub struct LogWriter {
    writer: std::sync::OnceLock<tracing_appender::non_blocking::NonBlocking>,
    buffered_lines: usize,
}

impl LogWriter {
    pub fn new(buffered_lines: usize) -> Self {
        Self {
            writer: std::sync::OnceLock::new(),
            buffered_lines,
        }
    }

    fn writer(&self) -> &tracing_appender::non_blocking::NonBlocking {
        self.writer.get_or_init(|| {
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(true)
                .buffered_lines_limit(self.buffered_lines)
                .thread_name("keygate-log")
                .finish(std::io::stderr());
            let _ = LOG_DROPS.set(writer.error_counter());
            if let Ok(mut kept) = LOG_GUARD.lock() {
                *kept = Some(guard);
            }
            writer
        })
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = tracing_appender::non_blocking::NonBlocking;

    fn make_writer(&'a self) -> Self::Writer {
        self.writer().clone()
    }
}

/// Write out the log lines still waiting (within the writer's own bound of a second), before
/// the process exits.
pub fn flush_log() {
    let guard = LOG_GUARD.lock().map(|mut g| g.take()).unwrap_or(None);
    drop(guard);
}

/// Lines dropped so far because stderr's reader did not keep up.
pub fn log_lines_dropped() -> u64 {
    LOG_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Every front's counts, shared by the whole process.
pub struct Telemetry {
    fronts: [FrontStats; 3],
    log: DecisionLog,
}

/// One front's summed counts.
pub struct FrontTotals {
    pub front: Front,
    /// `(code, count)`, "allowed" first; codes never seen are left out.
    pub answers: Vec<(&'static str, u64)>,
    pub decision: HistogramTotals,
    pub request: HistogramTotals,
    pub open_connections: usize,
    pub refused_connections: u64,
    pub refused_connections_per_ip: u64,
    /// Upstream answers that broke off before any of it went out, answered 502 instead.
    pub broken_answers: u64,
}

impl Telemetry {
    pub fn new(max_connections: usize, log: DecisionLog) -> Self {
        let front = || FrontStats {
            shards: Mutex::new(Vec::new()),
            connections: Connections::new(max_connections, 0),
        };
        Telemetry {
            fronts: [front(), front(), front()],
            log,
        }
    }

    /// The same, with at most `per_ip` connections open at once from one client address on
    /// `front` (0: no limit). Before any connection is counted.
    pub fn limit_per_ip(mut self, front: Front, per_ip: usize) -> Self {
        let stats = &mut self.fronts[front as usize];
        stats.connections = Connections::new(stats.connections.max, per_ip);
        self
    }

    fn stats(&self, front: Front) -> &FrontStats {
        &self.fronts[front as usize]
    }

    /// A new shard for one thread (or one shared state) of `front`.
    pub fn shard(&self, front: Front) -> Arc<Shard> {
        let shard = Arc::new(Shard {
            answers: std::array::from_fn(|_| AtomicU64::new(0)),
            decision: Histogram::default(),
            request: Histogram::default(),
            log: self.log,
            front,
            broken: AtomicU64::new(0),
        });
        self.stats(front)
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(shard.clone());
        shard
    }

    /// The connection counter (and limit) of `front`.
    pub fn connections(&self, front: Front) -> Arc<Connections> {
        self.stats(front).connections.clone()
    }

    /// Sum the shards of `front`.
    pub fn totals(&self, front: Front) -> FrontTotals {
        let stats = self.stats(front);
        let shards = stats
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut answers = Vec::new();
        for (i, code) in std::iter::once("allowed").chain(CODES).enumerate() {
            let n: u64 = shards
                .iter()
                .map(|s| s.answers[i].load(Ordering::Relaxed))
                .sum();
            if n > 0 || i == ALLOWED {
                answers.push((code, n));
            }
        }
        FrontTotals {
            front,
            answers,
            decision: totals(shards.iter().map(|s| &s.decision)),
            request: totals(shards.iter().map(|s| &s.request)),
            open_connections: stats.connections.open(),
            refused_connections: stats.connections.refused(),
            refused_connections_per_ip: stats.connections.refused_per_ip(),
            broken_answers: shards
                .iter()
                .map(|s| s.broken.load(Ordering::Relaxed))
                .sum(),
        }
    }
}

/// What `f` logs on this thread, through a real `fmt` subscriber (at its default level, info),
/// as text: for tests of what keygate says.
#[cfg(test)]
pub(crate) fn logged_by(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let out = sink.0.lock().unwrap().clone();
    String::from_utf8(out).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_each_bucket_and_end_with_inf() {
        let t = Telemetry::new(10, DecisionLog::None);
        let s = t.shard(Front::Proxy);
        let start = Instant::now();
        let mut note = Note::default();
        note.allow();
        s.answered(start, &note, 200, "r");
        s.decision.observe(Duration::from_millis(3));
        s.decision.observe(Duration::from_secs(60));
        let mut denied = Note::default();
        denied.deny(&DenyReason::KeyRevoked);
        t.shard(Front::Proxy).answered(start, &denied, 401, "r");
        let totals = t.totals(Front::Proxy);
        assert_eq!(totals.answers, vec![("allowed", 1), ("key_revoked", 1)]);
        let b = &totals.decision.buckets;
        assert_eq!(b.len(), BUCKETS_NS.len() + 1);
        assert!(b.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(
            b.last().unwrap(),
            &(f64::MAX, 1),
            "60 s is past every bound"
        );
        assert_eq!(totals.decision.count, 4);
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), 4);
        // 3 ms lands in the 5 ms bucket alone.
        let at = |secs: f64| {
            b.iter()
                .find(|(le, _)| (*le - secs).abs() < 1e-12)
                .unwrap()
                .1
        };
        assert_eq!((at(0.0025), at(0.005)), (0, 1));
        assert!(totals.decision.sum_seconds >= 60.003);
    }

    /// What `log.decisions` lets through, captured from a real subscriber.
    fn logged(mode: DecisionLog) -> String {
        logged_by(|| {
            let t = Telemetry::new(10, mode);
            let s = t.shard(Front::AuthzHttp);
            let mut allowed = Note::default();
            allowed.key(
                &HeaderValue::from_static("key_a"),
                Some(&HeaderValue::from_static("partner_a")),
            );
            allowed.allow();
            s.answered(Instant::now(), &allowed, 200, "req-allowed");
            let mut denied = Note::default();
            denied.deny(&DenyReason::KeyRevoked);
            s.answered(Instant::now(), &denied, 401, "req-denied");
        })
    }

    #[test]
    fn decision_events_follow_log_decisions() {
        let all = logged(DecisionLog::All);
        assert!(
            all.contains("req-allowed") && all.contains("req-denied"),
            "{all}"
        );
        assert!(all.contains("partner_id=partner_a") && all.contains("code=\"key_revoked\""));
        let denied = logged(DecisionLog::Denied);
        assert!(
            !denied.contains("req-allowed") && denied.contains("req-denied"),
            "{denied}"
        );
        assert_eq!(logged(DecisionLog::None), "");
    }

    /// Key and partner ids are cloned into a request's note only when decisions can be logged:
    /// by `log.decisions` and by the log's level. With `"denied"`, an allowed request's are
    /// kept too (the proxy may deny it after the decision).
    #[test]
    fn notes_keep_ids_only_when_decisions_can_be_logged() {
        let key = HeaderValue::from_static("key_a");
        let partner = HeaderValue::from_static("partner_a");
        let kept = |level: tracing::Level, mode: DecisionLog| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                let t = Telemetry::new(10, mode);
                let shard = t.shard(Front::Proxy);
                let mut record = Record::new(&shard);
                record.note.key(&key, Some(&partner));
                let kept = (
                    record.note.key_id.is_some(),
                    record.note.partner_id.is_some(),
                );
                record.finish(200, "r");
                kept
            })
        };
        let info = tracing::Level::INFO;
        assert_eq!(kept(info, DecisionLog::All), (true, true));
        assert_eq!(kept(info, DecisionLog::Denied), (true, true));
        assert_eq!(kept(info, DecisionLog::None), (false, false));
        assert_eq!(kept(tracing::Level::WARN, DecisionLog::All), (false, false));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_past_the_limit_are_refused_and_places_come_back() {
        let t = Telemetry::new(2, DecisionLog::None);
        let c = t.connections(Front::AuthzHttp);
        let a = c.admit(ip("127.0.0.1"), &[]).unwrap();
        let _b = c.admit(ip("127.0.0.1"), &[]).unwrap();
        assert!(c.admit(ip("127.0.0.2"), &[]).is_none());
        assert_eq!((c.open(), c.refused()), (2, 1));
        drop(a);
        assert!(c.admit(ip("127.0.0.1"), &[]).is_some());
        assert_eq!(t.totals(Front::AuthzHttp).refused_connections, 1);
        assert_eq!(t.totals(Front::AuthzHttp).refused_connections_per_ip, 0);
    }

    #[test]
    fn connections_past_the_limit_per_address_are_refused_but_not_a_trusted_proxys() {
        let t = Telemetry::new(100, DecisionLog::None).limit_per_ip(Front::Proxy, 2);
        assert_eq!(
            t.connections(Front::AuthzHttp).per_ip,
            0,
            "only the front named"
        );
        let c = t.connections(Front::Proxy);
        let trusted = ["203.0.113.0/28".parse().unwrap()];
        let first = c.admit(ip("198.51.100.7"), &trusted).unwrap();
        let second = c.admit(ip("198.51.100.7"), &trusted).unwrap();
        assert!(c.admit(ip("198.51.100.7"), &trusted).is_none());
        // Each address has places of its own (IPv6 ones too: one address each, as nginx's and
        // HAProxy's limits count them); a trusted proxy is not counted.
        let _v6 = c.admit(ip("2001:db8::1"), &trusted).unwrap();
        let _v6b = c.admit(ip("2001:db8::2"), &trusted).unwrap();
        let proxies: Vec<_> = (0..5)
            .map(|_| c.admit(ip("203.0.113.7"), &trusted).unwrap())
            .collect();
        assert_eq!((c.open(), c.refused(), c.refused_per_ip()), (9, 0, 1));
        // A closed connection gives its address's place back; an address with none open is
        // forgotten.
        drop(first);
        let again = c.admit(ip("198.51.100.7"), &trusted).unwrap();
        assert!(c.admit(ip("198.51.100.7"), &trusted).is_none());
        drop((proxies, again, second));
        assert!(!c.by_ip.contains_key(&ip("198.51.100.7")));
        assert_eq!((c.by_ip.len(), c.open()), (2, 2));
        let totals = t.totals(Front::Proxy);
        assert_eq!(
            (
                totals.refused_connections,
                totals.refused_connections_per_ip
            ),
            (0, 2)
        );
    }

    #[test]
    fn without_a_limit_per_address_nothing_is_counted_per_address() {
        let c = Connections::new(100, 0);
        let open: Vec<_> = (0..50)
            .map(|_| c.admit(ip("198.51.100.1"), &[]).unwrap())
            .collect();
        assert_eq!((open.len(), c.by_ip.len()), (50, 0));
    }
}
