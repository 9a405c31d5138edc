//! State shared by a fleet of keygates through Redis: per-key rate limits
//! (`rate_limit.backend = "redis"`), so every replica counts against one allowance.
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
        let conn: Arc<ArcSwapOption<ConnectionManager>> = Arc::default();
        let slot = conn.clone();
        let url = settings.url.clone();
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
                            tracing::warn!(error = ?e.kind(), "redis: cannot connect yet; rate limits are local until it answers");
                        }
                        let delay =
                            crate::snapshot::http_source::backoff(attempt, Duration::from_secs(5));
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        });
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
