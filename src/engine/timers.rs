//! Timed triggers (`delay`, `unless`): what an event does to them (arm, settle at once, cancel
//! an absence it breaks, fire an overdue timer it replaces), and firing the timers that fall
//! due (a job the clock sends, alone in its write group).

use super::triggers::Firing;
use super::{Group, Writer};
use crate::domain::condition;
use crate::domain::model::{AbsenceCheck, Event, PendingTimer, Timer, Timestamp, Trigger};
use crate::error::Error;
use crate::store::timers::minute_of;

/// What an event does to timed triggers: fire now (settled at once), fire an overdue pending
/// timer it is about to replace, remove timers, arm timers.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) now_firing: Vec<Firing>,
    pub(super) overdue: Vec<(Firing, Event)>,
    pub(super) removals: Vec<(String, Timestamp)>,
    pub(super) arms: Vec<Arm>,
}

/// A timer an event arms: due at `due`, replacing the pending one of its (trigger, user).
pub(super) struct Arm {
    pub(super) trigger_id: String,
    pub(super) generation: Timestamp,
    pub(super) due: Timestamp,
}

impl Writer {
    /// The pending timer of (trigger, user), whatever its generation.
    pub(super) fn pending_timer(
        &self,
        trigger_id: &str,
        user: &str,
        group: &Group,
    ) -> Result<Option<PendingTimer>, Error> {
        Ok(group
            .timers
            .get(&self.store, trigger_id, user)?
            .map(|t| PendingTimer {
                due: t.due,
                armed_at: t.event.occurred_at,
                generation: t.generation,
            }))
    }

    /// The pending timer of (trigger, user) if armed by the trigger as it is now (a change of
    /// the trigger cancels the timers armed before it).
    pub(super) fn live_timer(
        &self,
        trigger: &Trigger,
        user: &str,
        group: &Group,
    ) -> Result<Option<PendingTimer>, Error> {
        Ok(self
            .pending_timer(&trigger.id, user, group)?
            .filter(|p| p.generation == trigger.updated_at))
    }

    /// True when `event` is one `unless` waits for: its name, dated inside
    /// (armed_at, armed_at + within], matching the condition.
    pub(super) fn breaks_absence(u: &AbsenceCheck, armed_at: Timestamp, event: &Event) -> bool {
        let until = armed_at.as_nanos() + u.within_nanos;
        event.name == u.event_name
            && event.occurred_at > armed_at
            && event.occurred_at.as_nanos() <= until
            && u.condition
                .as_ref()
                .is_none_or(|c| condition::eval(c, event, &mut |_| false))
    }

    /// True when the user already has an event that breaks the absence armed at `armed_at`
    /// (stored, or earlier in this group): the timer is settled at once, without firing.
    pub(super) fn absence_already_broken(
        &self,
        u: &AbsenceCheck,
        user: &str,
        armed_at: Timestamp,
        group: &Group,
    ) -> Result<bool, Error> {
        let lower = std::ops::Bound::Excluded((armed_at, u64::MAX));
        let upper = std::ops::Bound::Unbounded;
        for event in self
            .store
            .timeline(user, Some(&u.event_name), lower, upper, false)?
        {
            group
                .reads
                .charge(&self.limits, || format!("an absence check on {:?}", u.event_name))?;
            let event = event?;
            if event.occurred_at.as_nanos() > armed_at.as_nanos() + u.within_nanos {
                break;
            }
            if Self::breaks_absence(u, armed_at, &event) {
                return Ok(true);
            }
        }
        let recent = group.recent.get(&(user.to_string(), u.event_name.clone()));
        Ok(recent.is_some_and(|events| events.iter().any(|e| Self::breaks_absence(u, armed_at, e))))
    }

    /// The pending timers `event` cancels: those of its user whose absence check waits for it.
    pub(super) fn cancellations(
        &self,
        event: &Event,
        group: &Group,
    ) -> Result<Vec<(String, Timestamp)>, Error> {
        let Some(triggers) = self.unless_by_name.get(&event.name) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for t in triggers {
            let Some(u) = &t.unless else { continue };
            if let Some(p) = self.live_timer(t, &event.user_id, group)? {
                if Self::breaks_absence(u, p.armed_at, event) {
                    out.push((t.id.clone(), p.due));
                }
            }
        }
        Ok(out)
    }

    /// Splits the matching triggers into those that fire now and timers to arm. A timed trigger
    /// whose moment has already passed is settled at once: it fires now (limits permitting)
    /// unless its absence is already broken; one whose absence is already broken never arms.
    pub(super) fn plan_timers(
        &self,
        event: &Event,
        firing: Vec<Firing>,
        group: &Group,
    ) -> Result<Plan, Error> {
        let mut plan = Plan::default();
        let now = event.received_at;
        for firing in firing {
            let Some(after) = firing.trigger.timer_nanos() else {
                plan.now_firing.push(firing);
                continue;
            };
            let trigger = firing.trigger;
            let user = &event.user_id;
            let due = Timestamp::from_nanos(event.occurred_at.as_nanos() + after);
            let pending = self.pending_timer(&trigger.id, user, group)?;
            let live = pending.filter(|p| p.generation == trigger.updated_at);
            if let Some(p) = live {
                if p.armed_at >= event.occurred_at {
                    // One timer per (trigger, user), from the latest event: an event dated no
                    // later than the pending timer's leaves it alone. Only one whose own window
                    // closed before the pending timer's event, and is due now, is settled (it
                    // fires unless its absence was broken).
                    let settles = due <= p.armed_at && due <= now;
                    let broken = match &trigger.unless {
                        Some(u) if settles => {
                            self.absence_already_broken(u, user, event.occurred_at, group)?
                        }
                        _ => false,
                    };
                    if settles && !broken {
                        if let Some(firing) = self.limit_allows(&trigger, user, now, group)? {
                            plan.now_firing.push(firing);
                        }
                    }
                    continue;
                }
                if p.due <= now {
                    // Due but not fired yet (the fire job is behind): it fires now, before the
                    // newer event replaces it.
                    if let Some(timer) = group.timers.get(&self.store, &trigger.id, user)? {
                        if let Some(firing) = self.limit_allows(&trigger, user, now, group)? {
                            plan.overdue.push((firing, timer.event));
                        }
                    }
                    plan.removals.push((trigger.id.clone(), p.due));
                }
            }
            if let Some(u) = &trigger.unless {
                if self.absence_already_broken(u, user, event.occurred_at, group)? {
                    continue;
                }
            }
            if due <= now {
                if let Some(firing) = self.limit_allows(&trigger, user, now, group)? {
                    plan.now_firing.push(firing);
                }
                continue;
            }
            plan.arms.push(Arm {
                trigger_id: trigger.id.clone(),
                generation: trigger.updated_at,
                due,
            });
        }
        Ok(plan)
    }

    /// Writes what an event does to timed triggers into its group: the timers it cancels or
    /// replaces are removed, overdue ones it replaces fire (not counted as the event's own
    /// firings), new ones are armed. Answers the firings that are the event's own.
    pub(super) fn settle_timers(
        &mut self,
        event: &Event,
        cancels: Vec<(String, Timestamp)>,
        plan: Plan,
        group: &mut Group,
        now: Timestamp,
    ) -> Vec<Firing> {
        for (trigger_id, _) in cancels.iter().chain(&plan.removals) {
            group.timers.remove(trigger_id, &event.user_id);
        }
        for (firing, armed_by) in plan.overdue {
            self.fire(&armed_by, vec![firing], group, now);
        }
        for arm in plan.arms {
            group.timers.arm(Timer {
                trigger_id: arm.trigger_id,
                due: arm.due,
                generation: arm.generation,
                event: event.clone(),
            });
            self.clock.armed(arm.due);
        }
        plan.now_firing
    }

    /// Fires every timer due now (up to 1000 per call; the clock calls again at once for more)
    /// and tells the clock when the next one is due. Runs alone in its write group.
    pub(super) fn fire_due_timers(&mut self, group: &mut Group) -> Result<(), Error> {
        const MAX: usize = 1000;
        let now = Timestamp::now();
        let this_minute = minute_of(now);
        let mut fired = 0;
        let mut taken = 0;
        let mut next: Option<Timestamp> = None;
        let earliest = |a: Option<Timestamp>, b: Timestamp| Some(a.map_or(b, |a| a.min(b)));
        'sets: for (minute, part, buckets) in self.store.due_sets(this_minute)? {
            for bucket in &buckets {
                if taken >= MAX {
                    // More next time, at once.
                    next = Some(now);
                    break 'sets;
                }
                group.timers.load(&self.store, *bucket)?;
                for timer in group.timers.take_due(*bucket, now) {
                    taken += 1;
                    // Deleted, paused or changed since it was armed: cancelled.
                    let Some(trigger) = self.triggers.get(&timer.trigger_id).cloned() else {
                        continue;
                    };
                    if trigger.paused || trigger.updated_at != timer.generation {
                        continue;
                    }
                    let user = timer.event.user_id.clone();
                    if let Some(firing) = self.limit_allows(&trigger, &user, now, group)? {
                        fired += self.fire(&timer.event, vec![firing], group, now);
                    }
                }
                if minute == this_minute {
                    if let Some(due) = group.timers.earliest_in(*bucket, minute) {
                        next = earliest(next, due);
                    }
                }
            }
            // Every timer due in a past minute has been taken: its set is done.
            if minute < this_minute {
                group.timers.retire(minute, part);
            }
        }
        if let Some(m) = self.store.next_due_minute(Some(this_minute))? {
            next = earliest(next, Timestamp::from_nanos(m as i128 * 60_000_000_000));
        }
        if taken > 0 {
            tracing::debug!(taken, fired, "timers fired");
        }
        self.clock.set_next(next);
        Ok(())
    }
}
