//! One write group: the writes of every job the writer drained at once, before they are applied,
//! and what they change in memory once they are.

use std::collections::HashMap;

use super::writer::Reply;
use crate::domain::model::{AttributeDefinition, Event, EventNameStats, FiringState, UserNameAggregate};
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
    /// What the group's events add to the by-name index and statistics.
    pub(super) columns: ColumnWrites,
    /// The timers this group reads, arms, cancels or fires (see `store::timers`).
    pub(super) timers: TimerOverlay,
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
            columns: ColumnWrites::default(),
            timers: TimerOverlay::default(),
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
