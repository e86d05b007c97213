//! One write group: the writes of every job the writer drained at once, before they are applied,
//! and what they change in memory once they are.

use std::cell::Cell;
use std::collections::HashMap;

use super::writer::Reply;
use crate::domain::model::{AttributeDefinition, Event, EventNameStats, FiringState, UserNameAggregate};
use crate::domain::rules::Limits;
use crate::error::Error;
use crate::store::columns::ColumnWrites;
use crate::store::timers::TimerOverlay;
use crate::store::WriteBatch;

/// The writes of one group, before they are applied, and what they change in memory.
pub(super) struct Group {
    pub(super) batch: WriteBatch,
    pub(super) replies: Vec<Reply>,
    /// Client event ids stored by this group, for duplicates inside the group.
    pub(super) event_ids: HashMap<String, u64>,
    pub(super) new_attributes: Vec<AttributeDefinition>,
    pub(super) name_stats: HashMap<String, EventNameStats>,
    /// (user, event name) aggregates touched by this group.
    pub(super) aggregates: HashMap<(String, String), UserNameAggregate>,
    /// (user, event name) events of this group, not yet readable from sled (history overlay).
    pub(super) recent: HashMap<(String, String), Vec<Event>>,
    /// (trigger, user) firing states changed by this group.
    pub(super) firing: HashMap<(String, String), FiringState>,
    pub(super) consumers: HashMap<String, u64>,
    pub(super) triggers_changed: bool,
    /// The destinations changed: published after the group is applied.
    pub(super) destinations_changed: bool,
    /// What the group's events add to the by-name index and statistics.
    pub(super) columns: ColumnWrites,
    /// The timers this group reads, arms, cancels or fires (see `store::timers`).
    pub(super) timers: TimerOverlay,
    /// The history reads of the event being evaluated and of the whole group.
    pub(super) reads: Reads,
    /// What the group's events did, recorded as metrics once it is applied.
    pub(super) counts: Counts,
}

/// What a group's events did (see `telemetry`): counted in the group, recorded once per group.
#[derive(Default)]
pub(super) struct Counts {
    pub(super) stored: u64,
    pub(super) duplicate: u64,
    pub(super) rejected: HashMap<crate::telemetry::Rejection, u64>,
    /// Actions fired, by trigger id.
    pub(super) fired: HashMap<String, u64>,
}

impl Counts {
    /// Counts one tracked event's outcome.
    pub(super) fn track(&mut self, result: &Result<super::track::Tracked, Error>) {
        match result {
            Ok(t) if t.duplicate => self.duplicate += 1,
            Ok(_) => self.stored += 1,
            Err(e) => {
                *self
                    .rejected
                    .entry(crate::telemetry::Rejection::of(e))
                    .or_default() += 1
            }
        }
    }

    /// Records the counts (the group was applied).
    pub(super) fn record(self) {
        use crate::telemetry as t;
        if !t::enabled() {
            return;
        }
        if self.stored > 0 {
            metrics::counter!(t::EVENTS_STORED).increment(self.stored);
        }
        if self.duplicate > 0 {
            metrics::counter!(t::EVENTS_DUPLICATE).increment(self.duplicate);
        }
        for (why, n) in self.rejected {
            t::rejected(why, n);
        }
        for (trigger, n) in self.fired {
            metrics::counter!(t::ACTIONS_FIRED, "trigger_id" => trigger).increment(n);
        }
    }
}

/// Counts the stored events a group reads to evaluate conditions and absence checks, so one
/// event's evaluation and one group's are bounded (see `Limits::max_history_events` and
/// `Limits::max_group_history_reads`). Cells: the evaluation paths only borrow the group.
#[derive(Default)]
pub(super) struct Reads {
    event: Cell<usize>,
    group: Cell<usize>,
}

impl Reads {
    /// A new event's evaluation starts.
    pub(super) fn start_event(&self) {
        self.event.set(0);
    }

    /// Counts one stored event read for `what`; refuses the event past `max_history_events`.
    pub(super) fn charge(&self, limits: &Limits, what: impl FnOnce() -> String) -> Result<(), Error> {
        let n = self.event.get() + 1;
        self.event.set(n);
        self.group.set(self.group.get() + 1);
        let max = limits.max_history_events;
        if n > max {
            // A user's history is data, not configuration: past this bound the event is shed
            // rather than let one user's evaluation hold every other user's writes.
            return Err(Error::ResourceExhausted(format!(
                ": {} would read more than {max} of this user's events (max_history_events); the event is not stored",
                what()
            )));
        }
        Ok(())
    }

    /// Counts stored events read without a bound of their own (a running aggregate rebuilt once
    /// per user and name), so the group still ends early.
    pub(super) fn charge_group(&self, n: usize) {
        self.group.set(self.group.get() + n);
    }

    /// Whether the group has read its share: the writer takes no further events into it.
    pub(super) fn group_spent(&self, limits: &Limits) -> bool {
        self.group.get() >= limits.max_group_history_reads
    }
}

impl Group {
    pub(super) fn new() -> Self {
        Self {
            batch: WriteBatch::default(),
            replies: Vec::new(),
            event_ids: HashMap::new(),
            new_attributes: Vec::new(),
            name_stats: HashMap::new(),
            aggregates: HashMap::new(),
            recent: HashMap::new(),
            firing: HashMap::new(),
            consumers: HashMap::new(),
            triggers_changed: false,
            destinations_changed: false,
            columns: ColumnWrites::default(),
            timers: TimerOverlay::default(),
            reads: Reads::default(),
            counts: Counts::default(),
        }
    }
}

impl Group {
    /// Drops every write of the group (its replies stay).
    pub(super) fn discard_writes(&mut self) {
        let replies = std::mem::take(&mut self.replies);
        *self = Group::new();
        self.replies = replies;
    }
}
