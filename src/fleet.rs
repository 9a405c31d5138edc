//! State shared by a fleet of keygates through Redis: per-key rate limits
//! (`rate_limit.backend = "redis"`), so every replica counts against one allowance, and
//! idempotency records (`idempotency.backend = "redis"`), so a retry that lands on another
//! replica is still replayed.
//!
//! **Idempotency without Redis fails closed**: a mutating request with an Idempotency-Key that
//! cannot be checked gets `503 idempotency_unavailable` (with `Retry-After`), never a run that
//! could duplicate one already made through another replica.
//!
//! The limiter is the same GCRA as the local one ([`crate::ratelimit`]), run atomically inside
//! Redis by a Lua script that reads Redis's own clock, so replicas with skewed clocks agree. The
//! connection is made in the background and re-made after a failure; until it works, and for any
//! command not answered within `redis.timeout`, the **local limiter decides** (each replica then
//! enforces the whole limit on its own: a fleet of N may allow up to N times it, never zero).
//! The switch both ways is logged once and shown in `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;

use crate::config::RedisSettings;
use crate::ratelimit::{Outcome, Quota, Status};

/// GCRA on Redis. KEYS[1] = the key's bucket; ARGV = interval µs, tolerance µs. Returns
/// {allowed (1/0), wait µs, reset µs}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local ahead = tat - now
if ahead > tau then
  return {0, ahead - tau, ahead}
end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.floor((new - now) / 1000) + 1)
return {1, 0, new - now}
";

/// Counts of the Redis backend, for `/metrics`.
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Decisions Redis made.
    pub answered: AtomicU64,
    /// Decisions the local limiter made because Redis could not.
    pub fallbacks: AtomicU64,
}

/// The Redis rate limiter.
pub struct RedisLimiter {
    settings: RedisSettings,
    conn: Arc<ArcSwapOption<ConnectionManager>>,
    script: redis::Script,
    degraded: AtomicBool,
    pub stats: RedisStats,
}

impl RedisLimiter {
    /// Starts connecting in the background (keygate starts whether Redis is up or not).
    pub fn new(settings: RedisSettings) -> Self {
        let conn = connect_in_background(
            settings.url.clone(),
            "rate limits are local until it answers",
        );
        Self {
            settings,
            conn,
            script: redis::Script::new(GCRA),
            degraded: AtomicBool::new(false),
            stats: RedisStats::default(),
        }
    }

    /// The shared decision, or `None` when Redis could not make it in time.
    pub async fn check(&self, key_id: &str, quota: Quota) -> Option<Outcome> {
        let Some(conn) = self.conn.load_full() else {
            self.fell_back("not connected");
            return None;
        };
        let mut conn = ConnectionManager::clone(&conn);
        let interval = quota.interval_us();
        let tau = quota.tolerance_us();
        let key = format!("{}rl:{key_id}", self.settings.key_prefix);
        let call = async {
            self.script
                .key(key)
                .arg(interval)
                .arg(tau)
                .invoke_async::<(i64, i64, i64)>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok((allowed, wait_us, reset_us))) => {
                self.recovered();
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                let (wait_us, reset_us) = (wait_us.max(0) as u64, reset_us.max(0) as u64);
                Some(if allowed == 1 {
                    let remaining = if reset_us <= tau {
                        (tau - reset_us) / interval + 1
                    } else {
                        0
                    };
                    Outcome::Allowed(Status {
                        limit: quota.per_minute,
                        remaining: remaining.min(u64::from(u32::MAX)) as u32,
                        reset_secs: reset_us.div_ceil(1_000_000),
                    })
                } else {
                    Outcome::Limited {
                        status: Status {
                            limit: quota.per_minute,
                            remaining: 0,
                            reset_secs: reset_us.div_ceil(1_000_000),
                        },
                        retry_after_secs: wait_us.div_ceil(1_000_000).max(1),
                    }
                })
            }
            Ok(Err(e)) => {
                self.fell_back(&format!("{:?}", e.kind()));
                None
            }
            Err(_) => {
                self.fell_back("timed out");
                None
            }
        }
    }

    fn fell_back(&self, why: &str) {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::error!(
                reason = why,
                "redis: no answer; rate limits fall back to this replica's local limiter"
            );
        }
    }

    fn recovered(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!("redis: answering again; rate limits are shared again");
        }
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
}

/// A connection manager made in the background (retried with backoff until Redis answers),
/// then kept: it reconnects by itself after a failure.
fn connect_in_background(
    url: String,
    meanwhile: &'static str,
) -> Arc<ArcSwapOption<ConnectionManager>> {
    let conn: Arc<ArcSwapOption<ConnectionManager>> = Arc::default();
    let slot = conn.clone();
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            let made = async {
                let client = redis::Client::open(url.as_str())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)));
                ConnectionManager::new_with_config(client, config).await
            };
            match made.await {
                Ok(m) => {
                    tracing::info!("redis: connected");
                    slot.store(Some(Arc::new(m)));
                    return;
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    if attempt == 1 {
                        tracing::warn!(error = ?e.kind(), "redis: cannot connect yet; {meanwhile}");
                    }
                    let delay =
                        crate::snapshot::http_source::backoff(attempt, Duration::from_secs(5));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    });
    conn
}

/// Store a final record only while the key still holds this request's in-flight record.
/// KEYS[1] = record; ARGV = in-flight value, final value, ttl ms.
const FINISH: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Free a key only while it still holds this request's in-flight record.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Idempotency records in Redis: `<prefix>idem:<key>:<hex Idempotency-Key>` holds
/// `i:<fingerprint>:<token>` while the first request is in flight (SET NX PX), then
/// `d:<fingerprint>:<the answer as JSON>` for `idempotency.ttl`.
pub struct RedisIdempotency {
    settings: RedisSettings,
    limits: crate::idempotency::Limits,
    conn: Arc<ArcSwapOption<ConnectionManager>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredWire {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl RedisIdempotency {
    pub fn new(settings: RedisSettings, limits: crate::idempotency::Limits) -> Self {
        let conn = connect_in_background(
            settings.url.clone(),
            "idempotent requests are refused (503) until it answers",
        );
        Self {
            settings,
            limits,
            conn,
        }
    }

    pub async fn begin(
        &self,
        key_id: &str,
        idempotency_key: &[u8],
        fingerprint: [u8; 32],
    ) -> crate::idempotency::Begin {
        use crate::idempotency::{Begin, Pending};
        let Some(conn) = self.conn.load_full() else {
            return Begin::Unavailable;
        };
        let mut conn = ConnectionManager::clone(&conn);
        let key = format!(
            "{}idem:{key_id}:{}",
            self.settings.key_prefix,
            hex::encode(idempotency_key)
        );
        let fp = hex::encode(fingerprint);
        let token: u64 = rand::random();
        let in_flight = format!("i:{fp}:{token:016x}");
        let ttl_ms = self.limits.ttl.as_millis().max(1) as u64;
        // An in-flight record outlives any exchange it guards, and no more: a replica that dies
        // mid-request, or a record that could not be released, holds the key that long, not
        // for the whole ttl.
        let in_flight_ms = crate::idempotency::IN_FLIGHT_HOLD.as_millis() as u64;
        let attempt = async {
            for _ in 0..3 {
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&in_flight)
                    .arg("NX")
                    .arg("PX")
                    .arg(in_flight_ms)
                    .query_async(&mut conn)
                    .await?;
                if set.is_some() {
                    return Ok(Begin::Proceed(Pending::Redis(RedisPending {
                        conn: conn.clone(),
                        key: Some(key.clone()),
                        in_flight: in_flight.clone(),
                        ttl_ms,
                        timeout: self.settings.timeout,
                        max_response_bytes: self.limits.max_response_bytes,
                    })));
                }
                let held: Option<Vec<u8>> =
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                // Gone between the two (expired): try to take it again.
                let Some(held) = held else { continue };
                return Ok(read_record(&held, &fp));
            }
            Ok::<_, redis::RedisError>(Begin::InUse)
        };
        let outcome = tokio::time::timeout(self.settings.timeout, attempt).await;
        if !matches!(outcome, Ok(Ok(_))) {
            // The SET may still run once Redis answers (it was sent): free the key then, or
            // every retry of this refused request would be told 409 while the record lives.
            // (Sent on the same connection after the SET, so run after it.)
            tokio::spawn(release(
                conn.clone(),
                key.clone(),
                in_flight.clone(),
                self.settings.timeout,
            ));
        }
        match outcome {
            Ok(Ok(begin)) => begin,
            Ok(Err(e)) => {
                tracing::error!(error = ?e.kind(), "redis: idempotency record unavailable; refusing the request");
                Begin::Unavailable
            }
            Err(_) => {
                tracing::error!("redis: idempotency record timed out; refusing the request");
                Begin::Unavailable
            }
        }
    }
}

fn read_record(held: &[u8], fp: &str) -> crate::idempotency::Begin {
    use crate::idempotency::{Begin, Stored};
    let text = String::from_utf8_lossy(held);
    let mut parts = text.splitn(3, ':');
    let (state, held_fp, rest) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
    match (state, held_fp) {
        (Some("i"), _) => Begin::InUse,
        (Some("d"), Some(held_fp)) if held_fp != fp => Begin::Reused,
        (Some("d"), Some(_)) => match serde_json::from_str::<StoredWire>(rest) {
            Ok(w) => {
                let mut headers = http::HeaderMap::new();
                for (k, v) in w.headers {
                    if let (Ok(k), Ok(v)) = (
                        http::HeaderName::from_bytes(k.as_bytes()),
                        hex::decode(&v)
                            .map_err(|_| ())
                            .and_then(|b| http::HeaderValue::from_bytes(&b).map_err(|_| ())),
                    ) {
                        headers.append(k, v);
                    }
                }
                match (http::StatusCode::from_u16(w.status), hex::decode(&w.body)) {
                    (Ok(status), Ok(body)) => Begin::Replay(Arc::new(Stored {
                        status,
                        headers,
                        body: bytes::Bytes::from(body),
                    })),
                    _ => Begin::Unavailable,
                }
            }
            Err(_) => Begin::Unavailable,
        },
        _ => Begin::Unavailable,
    }
}

/// A request whose in-flight record is in Redis.
pub struct RedisPending {
    conn: ConnectionManager,
    key: Option<String>,
    in_flight: String,
    ttl_ms: u64,
    timeout: Duration,
    max_response_bytes: usize,
}

impl RedisPending {
    pub async fn complete(mut self, response: crate::idempotency::Stored) {
        let Some(key) = self.key.take() else { return };
        if !crate::idempotency::keepable(response.status)
            || response.body.len() > self.max_response_bytes
        {
            release(self.conn.clone(), key, self.in_flight.clone(), self.timeout).await;
            return;
        }
        let fp = self
            .in_flight
            .split(':')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let wire = StoredWire {
            status: response.status.as_u16(),
            headers: response
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), hex::encode(v.as_bytes())))
                .collect(),
            body: hex::encode(&response.body),
        };
        let value = format!(
            "d:{fp}:{}",
            serde_json::to_string(&wire).expect("plain data serializes")
        );
        let mut conn = self.conn.clone();
        let stored = tokio::time::timeout(
            self.timeout * 4,
            redis::cmd("EVAL")
                .arg(FINISH)
                .arg(1)
                .arg(&key)
                .arg(&self.in_flight)
                .arg(value)
                .arg(self.ttl_ms)
                .query_async::<i64>(&mut conn),
        )
        .await;
        if !matches!(stored, Ok(Ok(1))) {
            // The in-flight record stays until it expires: retries get 409, never a second run.
            tracing::error!(
                "redis: could not record an idempotent answer; retries with its key get 409 until its in-flight record expires (11 minutes)"
            );
        }
    }
}

impl Drop for RedisPending {
    fn drop(&mut self) {
        if let (Some(key), Ok(handle)) = (self.key.take(), tokio::runtime::Handle::try_current()) {
            handle.spawn(release(
                self.conn.clone(),
                key,
                self.in_flight.clone(),
                self.timeout,
            ));
        }
    }
}

/// Free `key` if it still holds `in_flight`. One `EVAL` with the script's text (not `EVALSHA`
/// and a second command when Redis does not know the script yet): sent at once, it keeps its
/// place behind the commands sent before it, and runs after them even when Redis answers late
/// (a stalled Redis, a failover, which also forget cached scripts). Waited on for seconds, not
/// `redis.timeout`: nothing waits on it but the key's next retry.
async fn release(mut conn: ConnectionManager, key: String, in_flight: String, timeout: Duration) {
    let _ = tokio::time::timeout(
        (timeout * 4).max(RELEASE_WAIT),
        redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(key)
            .arg(in_flight)
            .query_async::<i64>(&mut conn),
    )
    .await;
}

/// How long a release is waited on at least.
const RELEASE_WAIT: Duration = Duration::from_secs(10);
