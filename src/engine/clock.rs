//! The timer clock: wakes the writer when the earliest pending timer falls due.
//!
//! Pending timers live in the store (`store::timers`: per-user-bucket lists and per-minute due sets);
//! memory holds only the earliest due time. One thread sleeps until that moment (or until the
//! writer arms an earlier timer, which wakes it), then hands the writer a job that fires every
//! due timer: no polling. The writer owns every timer write, so arming, cancelling and firing
//! are ordered with the events that cause them, and a fired timer's action and the timer's
//! removal are one atomic batch (no double firing, no loss, whenever a crash comes).

use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::domain::model::Timestamp;

/// The earliest due time known, shared by the writer and the clock thread.
#[derive(Default)]
pub(super) struct TimerClock {
    state: Mutex<ClockState>,
    wake: Condvar,
}

#[derive(Default)]
struct ClockState {
    next_due: Option<Timestamp>,
    stopped: bool,
}

/// Longest single sleep. Due times are wall-clock times while the sleep is monotonic: checking
/// once a second keeps a timer within a second of due even when the wall clock jumps forward.
const MAX_SLEEP: Duration = Duration::from_secs(1);

impl TimerClock {
    /// A timer due at `due` exists: wake earlier if it is the earliest.
    pub(super) fn armed(&self, due: Timestamp) {
        let mut s = self.state.lock();
        if s.next_due.is_none_or(|next| due < next) {
            s.next_due = Some(due);
            self.wake.notify_all();
        }
    }

    /// After firing: the earliest timer still pending (or none).
    pub(super) fn set_next(&self, due: Option<Timestamp>) {
        let mut s = self.state.lock();
        s.next_due = match (s.next_due, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.wake.notify_all();
    }

    /// Ends [`TimerClock::run`].
    pub(super) fn stop(&self) {
        self.state.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Sleeps until the earliest timer is due, then calls `fire` (which must lead to
    /// [`TimerClock::set_next`]); returns when stopped or when `fire` answers false.
    pub(super) fn run(&self, mut fire: impl FnMut() -> bool) {
        let mut s = self.state.lock();
        loop {
            if s.stopped {
                return;
            }
            let Some(due) = s.next_due else {
                // Nothing pending: sleep until a timer is armed (or the clock stops).
                self.wake.wait(&mut s);
                continue;
            };
            let wait = due.as_nanos() - Timestamp::now().as_nanos();
            if wait > 0 {
                let wait = Duration::from_nanos(wait.min(u64::MAX as i128) as u64).min(MAX_SLEEP);
                self.wake.wait_for(&mut s, wait);
                continue;
            }
            // Due: hand over to the writer, which sets the next due time when done.
            s.next_due = None;
            let keep_going = parking_lot::MutexGuard::unlocked(&mut s, &mut fire);
            if !keep_going {
                return;
            }
        }
    }
}
