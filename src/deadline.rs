//! A connection's deadline that moves with every request and almost never expires.
//!
//! Re-arming a tokio timer for each request (or making one per request, as
//! `tokio::time::timeout` does) takes the timer wheel's lock twice and converts instants to
//! ticks each time: about a thousand instructions per proxied request, for timers that fire
//! only on a stuck client or upstream. A [`Deadline`] keeps one timer per connection and only
//! notes the new due instant: the timer stays armed where it was, and when it fires before the
//! due instant it is re-armed for it. It never fires late; it may fire early, harmlessly, once
//! per period.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub struct Deadline {
    /// Armed at or before `due`.
    timer: Pin<Box<Sleep>>,
    due: Instant,
}

/// The deadline passed before the work it bounded was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired;

impl Deadline {
    pub fn new(due: Instant) -> Self {
        Deadline {
            timer: Box::pin(tokio::time::sleep_until(due)),
            due,
        }
    }

    /// Expire at `due` instead. A later instant is only noted; an earlier one re-arms the timer.
    pub fn set(&mut self, due: Instant) {
        self.due = due;
        if due < self.timer.deadline() {
            self.timer.as_mut().reset(due);
        }
    }

    /// Ready once `due` has passed. Registers `cx` to be woken then (or a little earlier,
    /// whereupon this is polled again and re-arms the timer).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.timer.deadline() >= self.due {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(self.due);
        }
        Poll::Pending
    }

    /// `work`'s output, unless the deadline passes first. `work` is pinned by the caller, where
    /// it was made: a large future is not moved again to be bounded.
    pub fn bound<'a, F: Future + ?Sized>(
        &'a mut self,
        mut work: Pin<&'a mut F>,
    ) -> impl Future<Output = Result<F::Output, Expired>> + 'a {
        poll_fn(move |cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            self.poll_expired(cx).map(|()| Err(Expired))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::time::Duration;

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_expires_at_the_new_instant_not_the_first() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + SECOND);
        tokio::time::advance(SECOND / 2).await;
        deadline.set(start + 3 * SECOND);
        poll_fn(|cx| deadline.poll_expired(cx)).await;
        assert_eq!(Instant::now(), start + 3 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_earlier_expires_at_the_earlier_instant() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + 10 * SECOND);
        deadline.set(start + SECOND);
        poll_fn(|cx| deadline.poll_expired(cx)).await;
        assert_eq!(Instant::now(), start + SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_already_fired_serves_again_once_moved() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + SECOND);
        poll_fn(|cx| deadline.poll_expired(cx)).await;
        deadline.set(Instant::now() + 2 * SECOND);
        let early = deadline.bound(pin!(tokio::time::sleep(SECOND))).await;
        assert_eq!(early, Ok(()));
        let late = deadline.bound(pin!(std::future::pending::<()>())).await;
        assert_eq!(late, Err(Expired));
        assert_eq!(Instant::now(), start + 3 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_work_that_finishes_in_time_gives_its_output() {
        let mut deadline = Deadline::new(Instant::now() + SECOND);
        let out = deadline.bound(pin!(async { 7 })).await;
        assert_eq!(out, Ok(7));
    }
}
