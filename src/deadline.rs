//! A connection's deadline that moves with every request and almost never expires.
//!
//! Re-arming a tokio timer for each request (or making one per request, as
//! `tokio::time::timeout` does) takes the timer wheel's lock twice and converts instants to
//! ticks each time: about a thousand instructions per proxied request, for timers that fire
//! only on a stuck client or upstream. A [`Deadline`] keeps one timer per connection and only
//! notes the new due instant: the timer stays armed where it was, and when it fires before the
//! due instant it is re-armed for it. It never fires late; it may fire early, harmlessly, once
//! per period.
//!
//! Nor is the timer polled again while it waits with the waker that polls: registering the same
//! waker again is a few atomic operations and a waker clone for nothing, a few times per request.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

pub struct Deadline {
    /// Armed at or before `due`.
    timer: Pin<Box<Sleep>>,
    due: Instant,
    /// The waker the armed timer holds, since the last poll that left it waiting. The timer
    /// keeps it when re-armed and gives it up when it fires.
    waiting: Registered,
}

/// The waker a timer (or any future that keeps its waker until woken) was last left waiting
/// with, so that it need not be polled again with the same one. Noted only when tokio's coop
/// budget let the poll register it: with the budget spent, tokio's timers and channels answer
/// Pending before registering anything, and the next poll must look again.
#[derive(Default)]
pub struct Registered(Option<Waker>);

impl Registered {
    /// Whether `cx`'s waker is the one waiting.
    pub fn holds(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    /// After a poll with `cx` that answered Pending; `budget`: whether the task had coop budget
    /// before it (`tokio::task::coop::has_budget_remaining`).
    pub fn note(&mut self, cx: &Context<'_>, budget: bool) {
        if !budget {
            self.0 = None;
        } else if !self.holds(cx) {
            self.0 = Some(cx.waker().clone());
        }
    }

    /// Nothing is known to wait any more.
    pub fn forget(&mut self) {
        self.0 = None;
    }
}

/// The deadline passed before the work it bounded was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired;

impl Deadline {
    pub fn new(due: Instant) -> Self {
        Deadline {
            timer: Box::pin(tokio::time::sleep_until(due)),
            due,
            waiting: Registered::default(),
        }
    }

    /// Expire at `due` instead. A later instant is only noted; an earlier one re-arms the timer.
    pub fn set(&mut self, due: Instant) {
        self.due = due;
        if due < self.timer.deadline() {
            // A timer that fired is armed again without a waker: the next poll registers one.
            self.waiting.forget();
            self.timer.as_mut().reset(due);
        }
    }

    /// Ready once `due` has passed. Registers `cx` to be woken then (or a little earlier,
    /// whereupon this is polled again and re-arms the timer).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.waiting.holds(cx) && !self.timer.is_elapsed() {
            return Poll::Pending;
        }
        loop {
            let budget = tokio::task::coop::has_budget_remaining();
            if self.timer.as_mut().poll(cx).is_pending() {
                self.waiting.note(cx, budget);
                return Poll::Pending;
            }
            if self.timer.deadline() >= self.due {
                self.waiting.forget();
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(self.due);
        }
    }

    /// [`Deadline::poll_expired`] after work polled in the same turn, which had the task's coop
    /// budget (`had_budget`) and may have spent it. Polled without budget the timer only answers
    /// Pending, and work that spends the budget at every poll (a fast, endless transfer) would
    /// keep the deadline from ever passing: then the timer is polled with the budget lifted, as
    /// `tokio::time::timeout` does.
    pub fn poll_expired_after(&mut self, cx: &mut Context<'_>, had_budget: bool) -> Poll<()> {
        if had_budget && !tokio::task::coop::has_budget_remaining() {
            let unbudgeted = tokio::task::coop::unconstrained(poll_fn(|cx| self.poll_expired(cx)));
            return std::pin::pin!(unbudgeted).poll(cx);
        }
        self.poll_expired(cx)
    }

    /// `work`'s output, unless the deadline passes first. `work` is pinned by the caller, where
    /// it was made: a large future is not moved again to be bounded.
    pub fn bound<'a, F: Future + ?Sized>(
        &'a mut self,
        mut work: Pin<&'a mut F>,
    ) -> impl Future<Output = Result<F::Output, Expired>> + 'a {
        poll_fn(move |cx| {
            let had_budget = tokio::task::coop::has_budget_remaining();
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            self.poll_expired_after(cx, had_budget)
                .map(|()| Err(Expired))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// A waker that counts its wakes.
    #[derive(Default)]
    pub(crate) struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub(crate) fn woken(count: &std::sync::Arc<Count>) -> usize {
        count.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_polled_again_by_another_task_wakes_that_task() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + SECOND);
        let (a, b) = (
            std::sync::Arc::new(Count::default()),
            std::sync::Arc::new(Count::default()),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        assert!(deadline
            .poll_expired(&mut Context::from_waker(&wa))
            .is_pending());
        assert!(deadline
            .poll_expired(&mut Context::from_waker(&wa))
            .is_pending());
        assert!(deadline
            .poll_expired(&mut Context::from_waker(&wb))
            .is_pending());
        tokio::time::advance(SECOND).await;
        assert_eq!((woken(&a), woken(&b)), (0, 1));
        assert!(deadline
            .poll_expired(&mut Context::from_waker(&wb))
            .is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_deadline_moved_earlier_wakes_its_task_at_the_earlier_instant() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + 10 * SECOND);
        let count = std::sync::Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(deadline.poll_expired(&mut cx).is_pending());
        deadline.set(start + SECOND);
        assert!(deadline.poll_expired(&mut cx).is_pending());
        tokio::time::advance(SECOND).await;
        assert_eq!(woken(&count), 1);
        assert!(deadline.poll_expired(&mut cx).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_fired_early_is_armed_again_with_its_waker() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + SECOND);
        let count = std::sync::Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(deadline.poll_expired(&mut cx).is_pending());
        deadline.set(start + 3 * SECOND);
        tokio::time::advance(SECOND).await;
        // Fired at the first instant: polled, it re-arms for the second and waits again.
        assert_eq!(woken(&count), 1);
        assert!(deadline.poll_expired(&mut cx).is_pending());
        assert!(deadline.poll_expired(&mut cx).is_pending());
        tokio::time::advance(SECOND).await;
        assert_eq!(woken(&count), 1);
        tokio::time::advance(SECOND).await;
        assert_eq!(woken(&count), 2);
        assert!(deadline.poll_expired(&mut cx).is_ready());
    }

    /// Spend the running task's coop budget, as a task does that has just done a lot of IO.
    pub(crate) fn spend_coop_budget() {
        let mut cx = Context::from_waker(Waker::noop());
        while tokio::task::coop::has_budget_remaining() {
            let _ = pin!(tokio::task::coop::consume_budget()).poll(&mut cx);
        }
    }

    /// A deadline first polled when the task's budget is spent (its timer answers Pending
    /// without registering anything) still expires and wakes its task once polled again.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_first_polled_out_of_budget_still_expires() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + SECOND);
        let count = std::sync::Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        poll_fn(|_| {
            spend_coop_budget();
            assert!(deadline
                .poll_expired(&mut Context::from_waker(&waker))
                .is_pending());
            Poll::Ready(())
        })
        .await;
        // Spending the budget woke the task, which is polled again with a new one.
        tokio::task::yield_now().await;
        assert!(deadline
            .poll_expired(&mut Context::from_waker(&waker))
            .is_pending());
        let before = woken(&count);
        tokio::time::advance(2 * SECOND).await;
        assert_eq!(woken(&count), before + 1, "the timer did not wake the task");
        assert!(deadline
            .poll_expired(&mut Context::from_waker(&waker))
            .is_ready());
    }

    /// Work that spends the task's whole budget at every poll (as a fast, endless transfer
    /// does) still ends at the deadline.
    #[tokio::test]
    async fn bounded_work_that_spends_the_budget_at_every_poll_still_ends_at_the_deadline() {
        let mut deadline = Deadline::new(Instant::now() + Duration::from_millis(100));
        let work = pin!(poll_fn(|cx| {
            spend_coop_budget();
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        }));
        let out = tokio::time::timeout(Duration::from_secs(5), deadline.bound(work)).await;
        assert_eq!(out, Ok(Err(Expired)), "the deadline never passed");
    }
}
