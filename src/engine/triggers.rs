//! Trigger evaluation: the in-memory index of active triggers by event name, conditions with
//! their history (running aggregates or the user's events in the window), once-per-user and
//! cooldown limits, and firing (the action joins the event's write group).

use std::collections::HashSet;
use std::sync::Arc;

use super::{Group, Writer};
use crate::domain::condition::{self, Accumulator, Condition, HistoryCondition};
use crate::domain::model::{Event, FiredAction, FiringState, Timestamp, Trigger, UserNameAggregate};
use crate::domain::template::EventContext;
use crate::error::Error;
use crate::store::WriteBatch;

/// A trigger about to fire.
pub(super) struct Firing {
    pub(super) trigger: Arc<Trigger>,
    /// Its firing state for the user, kept only when it has `once_per_user` or a cooldown.
    pub(super) state: Option<FiringState>,
}

/// Adds the event names of `c`'s history conditions that read all history without `where`
/// (those a running aggregate answers).
pub(super) fn all_history_names(c: &Condition, out: &mut HashSet<String>) {
    match c {
        Condition::All(v) | Condition::Any(v) => v.iter().for_each(|c| all_history_names(c, out)),
        Condition::Not(c) => all_history_names(c, out),
        Condition::Attribute(_) => {}
        Condition::History(h) => {
            if h.within_nanos.is_none() && h.filter.is_none() {
                out.insert(h.event_name.clone());
            }
        }
    }
}

fn has_history(c: &Condition) -> bool {
    match c {
        Condition::All(v) | Condition::Any(v) => v.iter().any(has_history),
        Condition::Not(c) => has_history(c),
        Condition::Attribute(_) => false,
        Condition::History(_) => true,
    }
}

impl Writer {
    /// Stores a trigger (created or changed). A change cancels its pending timers
    /// without touching them: they carry the `updated_at` they were armed under, and a timer of
    /// another generation is dropped when it falls due (so a change costs nothing per timer,
    /// even with a million pending).
    pub(super) fn put_trigger(&mut self, trigger: Trigger, group: &mut Group) -> Result<(), Error> {
        self.check_destination("trigger.action.destination_id", &trigger.destination_id)?;
        group.batch.put_trigger(&trigger);
        self.templates.set(&trigger.id, &trigger.action.payload_template);
        self.triggers.insert(trigger.id.clone(), Arc::new(trigger));
        group.triggers_changed = true;
        self.reindex(&mut group.batch);
        Ok(())
    }

    /// Rebuilds the by-name index and the set of maintained names from the trigger map (on
    /// trigger changes only). A name entering the set starts a new epoch, written to `batch`.
    pub(super) fn reindex(&mut self, batch: &mut WriteBatch) {
        self.by_name.clear();
        self.unless_by_name.clear();
        self.history_triggers = 0;
        let mut wanted = std::collections::HashSet::new();
        for t in self.triggers.values().filter(|t| !t.paused) {
            if let Some(u) = &t.unless {
                // Absence checks read the user's recent events too (the group overlay).
                self.history_triggers += 1;
                self.unless_by_name
                    .entry(u.event_name.clone())
                    .or_default()
                    .push(t.clone());
            }
            if let Some(c) = &t.condition {
                if has_history(c) {
                    self.history_triggers += 1;
                }
                all_history_names(c, &mut wanted);
            }
            self.by_name
                .entry(t.event_name.clone())
                .or_default()
                .push(t.clone());
        }
        self.maintained.retain(|name, _| wanted.contains(name));
        for name in wanted {
            if !self.maintained.contains_key(&name) {
                let epoch = self.epochs.get(&name).copied().unwrap_or(0) + 1;
                self.epochs.insert(name.clone(), epoch);
                batch.put_epoch(&name, epoch);
                self.maintained.insert(name, epoch);
            }
        }
    }

    /// The running aggregate of (user, name) in the current epoch, including everything stored
    /// (and this group's events), rebuilt from the events when missing or stale.
    /// The flag tells whether it was rebuilt (and so should be written back).
    pub(super) fn aggregate(
        &self,
        user: &str,
        name: &str,
        epoch: u64,
        group: &Group,
    ) -> Result<(UserNameAggregate, bool), Error> {
        let key = (user.to_string(), name.to_string());
        let known = match group.aggregates.get(&key) {
            Some(a) => Some(a.clone()),
            None => self.store.user_aggregate(user, name)?,
        };
        if let Some(agg) = known.filter(|a| a.epoch == epoch) {
            return Ok((agg, false));
        }
        let mut agg = UserNameAggregate {
            epoch,
            ..Default::default()
        };
        let mut read = 0;
        for e in self.store.named_events(user, name) {
            agg.add(&e?);
            read += 1;
        }
        group.reads.charge_group(read);
        for e in group.recent.get(&key).into_iter().flatten() {
            agg.add(e);
        }
        Ok((agg, true))
    }

    /// The triggers on `event`'s name whose condition holds and whose once/cooldown allow a
    /// firing now, with their firing state (`None` when the trigger has neither limit, so
    /// nothing needs tracking).
    pub(super) fn matching_triggers(
        &self,
        event: &Event,
        aggregate: Option<&UserNameAggregate>,
        group: &mut Group,
    ) -> Result<Vec<Firing>, Error> {
        let Some(candidates) = self.by_name.get(&event.name) else {
            return Ok(Vec::new());
        };
        // Actions fire when the event is received (the time `fire` stamps them with).
        let now = event.received_at;
        let mut out = Vec::new();
        for trigger in candidates {
            if let Some(cond) = &trigger.condition {
                let mut failure = None;
                let holds = condition::eval(cond, event, &mut |h| match self
                    .history_holds(h, event, aggregate, group)
                {
                    Ok(b) => b,
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                });
                if let Some(e) = failure {
                    return Err(e);
                }
                if !holds {
                    continue;
                }
            }
            // A timed trigger's limits count firings, checked when its timer fires.
            if trigger.timer_nanos().is_some() {
                out.push(Firing {
                    trigger: trigger.clone(),
                    state: None,
                });
                continue;
            }
            if let Some(firing) = self.limit_allows(trigger, &event.user_id, now, group)? {
                out.push(firing);
            }
        }
        Ok(out)
    }

    /// The firing of `trigger` for `user` at `now`, or `None` when `once_per_user` or the
    /// cooldown forbid it. The firing carries the state to update when the trigger has either
    /// limit (none to track otherwise).
    pub(super) fn limit_allows(
        &self,
        trigger: &Arc<Trigger>,
        user: &str,
        now: Timestamp,
        group: &Group,
    ) -> Result<Option<Firing>, Error> {
        if !trigger.once_per_user && trigger.cooldown_nanos.is_none() {
            return Ok(Some(Firing {
                trigger: trigger.clone(),
                state: None,
            }));
        }
        let state = match group.firing.get(&(trigger.id.clone(), user.to_string())) {
            Some(s) => s.clone(),
            None => self.store.firing_state(&trigger.id, user)?.unwrap_or_default(),
        };
        if trigger.once_per_user && state.firings > 0 {
            return Ok(None);
        }
        if let (Some(cooldown), Some(last)) = (trigger.cooldown_nanos, state.last_fired_at) {
            if now.as_nanos() < last.as_nanos() + cooldown {
                return Ok(None);
            }
        }
        Ok(Some(Firing {
            trigger: trigger.clone(),
            state: Some(state),
        }))
    }

    /// Evaluates a history condition for `event`'s user with the window ending at its
    /// `occurred_at`, the event itself included (see the module documentation for the cost).
    pub(super) fn history_holds(
        &self,
        h: &HistoryCondition,
        event: &Event,
        current: Option<&UserNameAggregate>,
        group: &mut Group,
    ) -> Result<bool, Error> {
        let user = &event.user_id;
        let reference = event.occurred_at;
        let same_name = h.event_name == event.name;
        let epoch = self.maintained.get(&h.event_name);
        if let (None, None, Some(epoch)) = (h.within_nanos, &h.filter, epoch) {
            let agg = match (same_name, current) {
                (true, Some(agg)) => agg.clone(),
                _ => {
                    let (agg, rebuilt) = self.aggregate(user, &h.event_name, *epoch, group)?;
                    if rebuilt {
                        // Written back with the group: the next evaluation reads it.
                        group
                            .aggregates
                            .insert((user.clone(), h.event_name.clone()), agg.clone());
                    }
                    agg
                }
            };
            // It answers "all history up to the reference" unless a later event is in it.
            if agg.last_occurred_at.is_none_or(|t| t <= reference) {
                return Ok(h.holds(&Accumulator::from_aggregate(&agg, &h.attribute)));
            }
        }
        // A window reaching before the earliest representable time has no lower bound (clamped,
        // it would exclude an event dated at that very time).
        let after = h.within_nanos.and_then(|w| {
            let from = reference.as_nanos() - w;
            (from >= Timestamp::MIN.as_nanos()).then(|| Timestamp::from_nanos(from))
        });
        let in_window = |t: Timestamp| t <= reference && after.is_none_or(|a| t > a);
        let needs_event = h.filter.is_some() || h.aggregate != condition::Aggregate::Count;
        let mut acc = Accumulator::default();
        let add = |e: &Event, acc: &mut Accumulator| {
            let pass = h
                .filter
                .as_ref()
                .is_none_or(|f| condition::eval(f, e, &mut |_| false));
            if pass {
                acc.add(e, &h.attribute);
            }
        };
        for pos in self.store.named_positions(user, &h.event_name, after, reference) {
            group.reads.charge(&self.limits, || {
                format!("a trigger's history condition on {:?}", h.event_name)
            })?;
            let pos = pos?;
            if needs_event {
                if let Some(e) = self.store.event_at(user, &h.event_name, pos)? {
                    add(&e, &mut acc);
                }
            } else {
                acc.count += 1;
            }
        }
        if let Some(recent) = group.recent.get(&(user.clone(), h.event_name.clone())) {
            for e in recent.iter().filter(|e| in_window(e.occurred_at)) {
                add(e, &mut acc);
            }
        }
        if same_name && in_window(event.occurred_at) {
            add(event, &mut acc);
        }
        Ok(h.holds(&acc))
    }

    /// Writes the actions of `firing` for `event` into the group; answers how many.
    pub(super) fn fire(
        &mut self,
        event: &Event,
        firing: Vec<Firing>,
        group: &mut Group,
        now: Timestamp,
    ) -> u32 {
        if firing.is_empty() {
            return 0;
        }
        let mut fired = 0;
        // The event's template variables, shared by every trigger firing on it.
        let context = EventContext::new(event);
        for Firing { trigger, state } in firing {
            self.last_action_seq += 1;
            let action = FiredAction {
                sequence: self.last_action_seq,
                action_id: self.generate_id(),
                trigger_id: trigger.id.clone(),
                trigger_name: trigger.name.clone(),
                action_type: trigger.action.action_type.clone(),
                user_id: event.user_id.clone(),
                event_id: event.event_id.clone(),
                fired_at: now,
                payload: self.templates.render(
                    &trigger.id,
                    &trigger.name,
                    &context,
                    self.limits.max_payload_bytes(),
                ),
                // Stored once per event by the log, not once per action.
                event: None,
                destination_id: trigger.destination_id.clone(),
            };
            group.batch.put_action(action, Some(event));
            *group.counts.fired.entry(trigger.id.clone()).or_default() += 1;
            if let Some(mut state) = state {
                state.firings += 1;
                state.last_fired_at = Some(now);
                group
                    .firing
                    .insert((trigger.id.clone(), event.user_id.clone()), state);
            }
            fired += 1;
        }
        fired
    }
}
