//! The clocks the request path reads, at most once per poll of a connection's task.
//!
//! A proxied request read the monotonic clock five times (its header deadline, its arrival, its
//! verdict, its upstream deadline, its answer) and the wall clock twice (the decision's `now`,
//! the `Date` field). On a virtual machine whose clock is the TSC, one reading costs ~18 ns,
//! about 5% of the proxy's user time per request, where nginx reads the time once per wake-up.
//! So keygate does the same per poll:
//!
//! - [`now`] is the monotonic time read once, at its first use, within a poll of a task wrapped
//!   in [`PerPoll`] (a connection's task), and read afresh outside one. Within a poll the time
//!   stands still (until a [`fresh`] reading moves it on): a timeout set from it is at most the
//!   poll's own duration early, never late. A poll is bounded by tokio's cooperative budget.
//! - [`fresh`] reads the clock in any case (and is the poll's reading from then on): for what a
//!   stale reading would misstate, a request's answer time in its latency.
//! - [`wall_ms`] and [`wall_second`] read the kernel's coarse wall clock (on Linux
//!   `CLOCK_REALTIME_COARSE`, ~4 ns: a memory read), which the kernel moves on at each
//!   scheduler tick (1–10 ms), so it is normally that much behind the precise one, more only
//!   while the machine's timekeeping itself stalls (a starved virtual machine): a key is refused
//!   that late after its `expires_at`, and the `Date` field names that second.
//!
//! Nothing here holds state across polls: a value is never older than the poll it was read in.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// Where the current thread is, as far as [`now`] is concerned.
#[derive(Clone, Copy)]
enum Reading {
    /// Not in a [`PerPoll`]: each [`now`] reads the clock.
    Outside,
    /// In a poll that has not asked for the time yet.
    Unread,
    /// In a poll that read it.
    Read(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Outside) };
}

/// The monotonic time: within a [`PerPoll`] poll, the one reading of that poll; outside, the
/// clock. `tokio::time::Instant`, so that tests with tokio's paused clock see theirs.
pub fn now() -> Instant {
    READING.with(|reading| match reading.get() {
        Reading::Read(now) => now,
        Reading::Unread => {
            let now = Instant::now();
            reading.set(Reading::Read(now));
            now
        }
        Reading::Outside => Instant::now(),
    })
}

/// The monotonic time read now, which the rest of the poll (in a [`PerPoll`]) then shares.
pub fn fresh() -> Instant {
    let now = Instant::now();
    READING.with(|reading| {
        if !matches!(reading.get(), Reading::Outside) {
            reading.set(Reading::Read(now));
        }
    });
    now
}

pin_project_lite::pin_project! {
    /// A future (a connection's task) in whose polls [`now`] reads the clock at most once.
    pub struct PerPoll<F> {
        #[pin]
        inner: F,
    }
}

impl<F> PerPoll<F> {
    pub fn new(inner: F) -> Self {
        PerPoll { inner }
    }
}

impl<F: Future> Future for PerPoll<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Puts back what was there before the poll, also when the poll unwinds.
        struct Restore(Reading);
        impl Drop for Restore {
            fn drop(&mut self) {
                READING.with(|reading| reading.set(self.0));
            }
        }
        let _restore = Restore(READING.with(|reading| reading.replace(Reading::Unread)));
        self.project().inner.poll(cx)
    }
}

/// hyper's executor for the tasks a served connection spawns (an HTTP/2 connection's streams):
/// each runs in a [`PerPoll`], as the connections' own tasks do.
#[derive(Clone, Copy, Debug, Default)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(PerPoll::new(future));
    }
}

/// The wall clock in Unix milliseconds (coarse: see the module's documentation).
pub fn wall_ms() -> i64 {
    i64::try_from(since_epoch().as_millis()).unwrap_or(i64::MAX)
}

/// The wall clock's current second since the Unix epoch (coarse).
pub fn wall_second() -> u64 {
    since_epoch().as_secs()
}

#[cfg(target_os = "linux")]
fn since_epoch() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    // Before 1970 only on a clock set wrong: counted as the epoch, as `SystemTime` would fail.
    match (u64::try_from(t.tv_sec), u32::try_from(t.tv_nsec)) {
        (Ok(secs), Ok(nanos)) => Duration::new(secs, nanos),
        _ => Duration::ZERO,
    }
}

#[cfg(not(target_os = "linux"))]
fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn one_reading_per_poll_and_a_fresh_one_outside() {
        let tick = Duration::from_millis(2);
        // Outside a PerPoll every call reads the clock.
        let before = now();
        std::thread::sleep(tick);
        assert!(now() - before >= tick);

        let mut firsts = Vec::new();
        let polled = PerPoll::new(poll_fn(|cx| {
            let first = now();
            // The clock moves within the poll (as in a slow poll); the reading does not.
            std::thread::sleep(tick);
            assert_eq!(now(), first, "a second reading in the same poll");
            // Until a fresh reading, which the rest of the poll shares.
            let fresh = fresh();
            assert!(fresh - first >= tick);
            assert_eq!(now(), fresh);
            firsts.push(first);
            if firsts.len() < 2 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(())
        }));
        polled.await;
        assert!(
            firsts[1] - firsts[0] >= tick,
            "the next poll reads the clock again"
        );
        // Back outside: a fresh reading, and `fresh` leaves nothing behind.
        assert!(now() - firsts[1] >= tick);
        let outside = fresh();
        std::thread::sleep(tick);
        assert!(now() - outside >= tick);
    }

    #[test]
    fn a_poll_that_unwinds_leaves_the_thread_outside() {
        let mut polled = std::pin::pin!(PerPoll::new(poll_fn(|_| -> Poll<()> {
            let _ = now();
            panic!("the connection's task panics");
        })));
        let waker = std::task::Waker::noop();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = polled.as_mut().poll(&mut Context::from_waker(waker));
        }));
        assert!(unwound.is_err());
        let before = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > before, "a reading left behind by the unwound poll");
    }

    #[test]
    fn the_coarse_wall_clock_is_within_a_tick_behind_the_precise_one() {
        let precise = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
        };
        for _ in 0..1000 {
            let before = precise();
            let coarse = since_epoch();
            let after = precise();
            assert!(coarse <= after, "coarse {coarse:?} ahead of {after:?}");
            // A tick is 1–10 ms; the margin also covers this thread being preempted.
            let lag = before.saturating_sub(coarse);
            assert!(
                lag < Duration::from_millis(100),
                "coarse clock {lag:?} behind"
            );
        }
        let ms = wall_ms();
        let second = wall_second();
        assert!(second >= u64::try_from(ms / 1000).unwrap());
        assert!(second - u64::try_from(ms / 1000).unwrap() <= 1);
    }
}
