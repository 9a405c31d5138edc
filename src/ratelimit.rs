//! Per-key rate limits: GCRA (the generic cell rate algorithm), a smooth limiter equivalent to a
//! token bucket that keeps one number per key, its *theoretical arrival time* (TAT).
//!
//! A key allowed `rate` requests per minute has an emission interval `T = 60 s / rate` and may
//! run ahead of that schedule by `τ = T × (burst − 1)`: a request at `now` is allowed when
//! `max(TAT, now) − now ≤ τ`, and then moves the TAT on by `T`. So a fresh key can send `burst`
//! requests at once, then one every `T`; an idle key earns its allowance back at the same pace.
//!
//! Check 12 of the contract: the fronts ask [`Limiter::check`] only once the pure decision has
//! allowed a request. The state is one `AtomicU64` per key in a sharded map (no lock shared by
//! all requests), updated with a compare-and-swap; a key idle long enough to be back at a full
//! allowance is indistinguishable from an unseen one, so [`Limiter::sweep`] drops it and memory
//! stays bounded by the keys active within one burst window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::HeaderValue;

/// How many requests a key may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Sustained rate, requests per minute (≥ 1).
    pub per_minute: u32,
    /// Requests that may arrive at once (≥ 1).
    pub burst: u32,
}

impl Quota {
    /// `per_minute` with a burst of `burst_window` worth of it (at least 1 request).
    pub fn new(per_minute: u32, burst_window: Duration) -> Self {
        let per_minute = per_minute.max(1);
        let burst = (u128::from(per_minute) * burst_window.as_micros() / 60_000_000)
            .clamp(1, u128::from(u32::MAX)) as u32;
        Self { per_minute, burst }
    }

    /// Microseconds between requests at the sustained rate.
    pub fn interval_us(self) -> u64 {
        (60_000_000 / u64::from(self.per_minute.max(1))).max(1)
    }

    /// How far ahead of the sustained rate a key may run, in microseconds.
    pub fn tolerance_us(self) -> u64 {
        self.interval_us() * u64::from(self.burst.max(1) - 1)
    }
}

/// The verdict for one request, with what the `X-RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed(Status),
    /// Over the limit: retry after `retry_after_secs`.
    Limited {
        status: Status,
        retry_after_secs: u64,
    },
}

/// The `X-RateLimit-*` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// `X-RateLimit-Limit`: requests per minute.
    pub limit: u32,
    /// `X-RateLimit-Remaining`: requests that would be allowed right now, one after another.
    pub remaining: u32,
    /// `X-RateLimit-Reset`: seconds until the full burst is available again.
    pub reset_secs: u64,
}

impl Status {
    /// The three headers, in the order they are documented.
    pub fn headers(&self) -> [(&'static str, HeaderValue); 3] {
        [
            ("x-ratelimit-limit", HeaderValue::from(self.limit)),
            ("x-ratelimit-remaining", HeaderValue::from(self.remaining)),
            ("x-ratelimit-reset", HeaderValue::from(self.reset_secs)),
        ]
    }
}

impl Outcome {
    pub fn status(&self) -> &Status {
        match self {
            Outcome::Allowed(s) | Outcome::Limited { status: s, .. } => s,
        }
    }
}

fn ceil_secs(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

/// Passes a `u64` key through: the limiter's keys are digest bytes, uniformly distributed
/// already (and not chosen by clients: only keys found in the snapshot get a bucket).
#[derive(Default)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Buckets = DashMap<u64, AtomicU64, std::hash::BuildHasherDefault<PassThrough>>;

/// The local (in-process) limiter, shared by every front and thread.
pub struct Limiter {
    /// Key ([`crate::snapshot::KeyRecord::state_key`]) → TAT, in microseconds since `epoch`.
    buckets: Buckets,
    epoch: Instant,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    pub fn new() -> Self {
        Self {
            buckets: Buckets::default(),
            epoch: Instant::now(),
        }
    }

    /// Microseconds since this limiter's epoch: the `now` of [`Limiter::check_at`].
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Count a request by the key `key` against `quota` now.
    pub fn check(&self, key: u64, quota: Quota) -> Outcome {
        self.check_at(key, quota, self.now_us())
    }

    /// Count a request by the key `key` against `quota` at `now_us`.
    pub fn check_at(&self, key: u64, quota: Quota, now_us: u64) -> Outcome {
        if let Some(tat) = self.buckets.get(&key) {
            return gcra(&tat, quota, now_us);
        }
        let tat = self.buckets.entry(key).or_insert_with(|| AtomicU64::new(0));
        gcra(&tat, quota, now_us)
    }

    /// Forget keys whose allowance is full again (their TAT has passed): bounded memory however
    /// many keys are seen. Returns how many are kept.
    pub fn sweep(&self) -> usize {
        let now = self.now_us();
        self.buckets
            .retain(|_, tat| tat.load(Ordering::Relaxed) > now);
        self.buckets.len()
    }

    /// Keys with state.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Rate limits as the fronts apply them: the configuration and the limiter every front and
/// thread shares (so a key's allowance is one, whichever front it comes through).
pub struct RateLimits {
    pub settings: std::sync::Arc<crate::config::RateLimitSettings>,
    /// The local limiter: the backend, or the fallback when Redis does not answer.
    pub limiter: Limiter,
    pub redis: Option<crate::fleet::RedisLimiter>,
}

impl RateLimits {
    /// With `rate_limit.backend = "redis"`, starts connecting (so: inside a runtime).
    pub fn new(settings: std::sync::Arc<crate::config::RateLimitSettings>) -> Self {
        let redis = settings.redis.clone().map(crate::fleet::RedisLimiter::new);
        Self {
            settings,
            limiter: Limiter::new(),
            redis,
        }
    }

    /// Whether a check may wait (on Redis); with the local backend alone it never does.
    pub fn waits(&self) -> bool {
        self.redis.is_some()
    }

    /// Check 12 for an allowed request: `None` when the key has no limit.
    pub async fn check(&self, allow: &crate::decision::Allow<'_>) -> Option<Outcome> {
        let quota = self
            .settings
            .quota(allow.key.rate_limit_per_minute(), &allow.environment.name)?;
        if let Some(redis) = &self.redis {
            // Boxed: the Redis exchange's future is ~700 bytes, which every request's future
            // would otherwise carry (and copy) with the local backend too.
            if let Some(outcome) = Box::pin(redis.check(allow.key.id(), quota)).await {
                return Some(outcome);
            }
        }
        Some(self.limiter.check(allow.key.state_key(), quota))
    }
}

impl Outcome {
    /// As the fronts apply it: the headers' values to add when allowed, or the denial (check 12)
    /// with them.
    pub fn verdict(self) -> Result<Status, (crate::deny::DenyReason, Status)> {
        match self {
            Outcome::Allowed(status) => Ok(status),
            Outcome::Limited {
                status,
                retry_after_secs,
            } => Err((
                crate::deny::DenyReason::RateLimited { retry_after_secs },
                status,
            )),
        }
    }
}

fn gcra(tat: &AtomicU64, quota: Quota, now: u64) -> Outcome {
    let t = quota.interval_us();
    let tau = quota.tolerance_us();
    let mut current = tat.load(Ordering::Relaxed);
    loop {
        let start = current.max(now);
        let ahead = start - now;
        if ahead > tau {
            // Allowed again once the schedule is back within the tolerance.
            let wait = ahead - tau;
            return Outcome::Limited {
                status: Status {
                    limit: quota.per_minute,
                    remaining: 0,
                    reset_secs: ceil_secs(ahead),
                },
                retry_after_secs: ceil_secs(wait).max(1),
            };
        }
        let next = start + t;
        match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                let used = next - now;
                let remaining = if used <= tau { (tau - used) / t + 1 } else { 0 };
                return Outcome::Allowed(Status {
                    limit: quota.per_minute,
                    remaining: remaining.min(u64::from(u32::MAX)) as u32,
                    reset_secs: ceil_secs(used),
                });
            }
            Err(seen) => current = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000;

    fn allowed(o: Outcome) -> Status {
        match o {
            Outcome::Allowed(s) => s,
            other => panic!("expected allowed, got {other:?}"),
        }
    }

    #[test]
    fn exactly_the_burst_then_429_with_retry_after() {
        let l = Limiter::new();
        let q = Quota {
            per_minute: 60,
            burst: 5,
        };
        let now = 100 * SEC;
        for i in 0..5u32 {
            let s = allowed(l.check_at(1, q, now));
            assert_eq!(s.limit, 60);
            assert_eq!(s.remaining, 4 - i, "request {i}");
            assert_eq!(s.reset_secs, u64::from(i) + 1);
        }
        match l.check_at(1, q, now) {
            Outcome::Limited {
                status,
                retry_after_secs,
            } => {
                assert_eq!(
                    retry_after_secs, 1,
                    "one interval (1 s) until the next slot"
                );
                assert_eq!(status.remaining, 0);
                assert_eq!(status.reset_secs, 5);
            }
            other => panic!("{other:?}"),
        }
        // Other keys have their own allowance.
        assert_eq!(allowed(l.check_at(2, q, now)).remaining, 4);
    }

    #[test]
    fn the_allowance_comes_back_at_the_sustained_rate() {
        let l = Limiter::new();
        let q = Quota {
            per_minute: 60,
            burst: 2,
        };
        let now = 10 * SEC;
        allowed(l.check_at(1, q, now));
        allowed(l.check_at(1, q, now));
        assert!(matches!(l.check_at(1, q, now), Outcome::Limited { .. }));
        assert!(matches!(
            l.check_at(1, q, now + SEC - 1),
            Outcome::Limited { .. }
        ));
        assert_eq!(allowed(l.check_at(1, q, now + SEC)).remaining, 0);
        // Idle for the whole window: the full burst again.
        assert_eq!(allowed(l.check_at(1, q, now + 10 * SEC)).remaining, 1);
    }

    #[test]
    fn a_limited_request_does_not_consume_allowance() {
        let l = Limiter::new();
        let q = Quota {
            per_minute: 1,
            burst: 1,
        };
        allowed(l.check_at(1, q, 0));
        for _ in 0..100 {
            assert!(matches!(l.check_at(1, q, SEC), Outcome::Limited { .. }));
        }
        assert!(matches!(l.check_at(1, q, 60 * SEC), Outcome::Allowed(_)));
    }

    #[test]
    fn quota_from_a_burst_window() {
        assert_eq!(
            Quota::new(600, Duration::from_secs(60)),
            Quota {
                per_minute: 600,
                burst: 600
            }
        );
        assert_eq!(Quota::new(600, Duration::from_secs(10)).burst, 100);
        assert_eq!(Quota::new(1, Duration::from_secs(1)).burst, 1);
        assert_eq!(Quota::new(0, Duration::from_secs(60)).per_minute, 1);
    }

    #[test]
    fn sweep_forgets_only_keys_back_at_full_allowance() {
        let l = Limiter::new();
        let slow = Quota {
            per_minute: 1,
            burst: 1,
        };
        let fast = Quota {
            per_minute: 6_000_000,
            burst: 1,
        };
        l.check(1, slow);
        l.check(2, fast);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(l.sweep(), 1, "the slow key is still recovering");
        assert!(l.buckets.contains_key(&1));
    }

    #[test]
    fn concurrent_requests_never_exceed_the_burst() {
        let l = std::sync::Arc::new(Limiter::new());
        let q = Quota {
            per_minute: 1,
            burst: 1000,
        };
        let now = 5 * SEC;
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let l = l.clone();
                    s.spawn(move || {
                        (0..1000)
                            .filter(|_| matches!(l.check_at(1, q, now), Outcome::Allowed(_)))
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 1000);
    }
}
