//! [`WriteBatch`]: the writes of one write group, applied atomically by `Store::apply`.

use super::actions::{Chunk, CHUNK_ACTIONS, CHUNK_BYTES};
use super::codec::encode;
use super::keys::*;
use crate::domain::model::{
    AttributeDefinition, Event, EventNameStats, FiredAction, FiringState, Trigger, UserNameAggregate,
};

/// One write: a key and its new value, or `None` to remove it.
pub(super) type Op = (Vec<u8>, Option<Vec<u8>>);

/// What a batch moves (see `Store::apply`): index records between blocks, rollup chunks, and
/// whether it changes what the index holds (an erasure).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Moves {
    pub index: bool,
    pub rollups: bool,
    pub content: bool,
}

/// Writes that become visible and durable together (see `Store::apply`).
#[derive(Default)]
pub(crate) struct WriteBatch {
    /// In order: a key written twice keeps its last value (as in one sled batch).
    ops: Vec<Op>,
    writes: usize,
    /// What it moves (see `Store::apply` and `Store::index_content_changes`).
    moves: Moves,
    /// The action chunk being filled: its first sequence, the chunk, about its bytes.
    open_chunk: Option<(u64, Chunk, usize)>,
}

impl WriteBatch {
    pub(super) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
        self.writes += 1;
    }

    pub(super) fn remove_raw(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
        self.writes += 1;
    }

    /// Marks the batch as one that moves records between index keys: it is applied while no
    /// query collects blocks.
    pub(super) fn moves_index(&mut self) {
        self.moves.index = true;
    }

    /// Marks the batch as one that rewrites a rollup's chunks: it is applied while no query
    /// reads a rollup (readers of blocks and statistics do not wait for it).
    pub(super) fn moves_rollups(&mut self) {
        self.moves.rollups = true;
    }

    /// Whether the batch moves index records (for tests).
    #[cfg(test)]
    pub(crate) fn moves_index_records(&self) -> bool {
        self.moves.index
    }

    /// Marks the batch as one that changes what the by-name index holds, not only where (an
    /// erasure removing records): a rollup computed from what was there before is no longer
    /// current. (A rollup replaced is caught by its own meta, see `ComputedRollup::write`.)
    pub(super) fn changes_index_content(&mut self) {
        // Records leave blocks and rollups alike (an erasure).
        self.moves = Moves {
            index: true,
            rollups: true,
            content: true,
        };
    }

    /// Takes the writes out, in order, with what they move.
    pub(super) fn into_parts(mut self) -> (Vec<Op>, Moves) {
        self.close_chunk();
        (self.ops, self.moves)
    }

    /// True when nothing was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.writes == 0 && self.open_chunk.is_none()
    }

    /// How many writes were added (an action chunk still open counts as one, though it is
    /// written with an index key per user and trigger in it).
    pub(crate) fn len(&self) -> usize {
        self.writes + usize::from(self.open_chunk.is_some())
    }

    /// Stores an event on its user's timeline.
    pub(crate) fn put_event(&mut self, event: &Event) {
        self.put_raw(event_key(event), encode(event));
    }

    /// Removes a stored event from its user's timeline.
    pub(crate) fn remove_event(&mut self, event: &Event) {
        self.remove_raw(event_key(event));
    }

    /// Stores a user's running aggregates for one event name.
    pub(crate) fn put_user_aggregate(&mut self, user_id: &str, name: &str, agg: &UserNameAggregate) {
        self.put_raw(pair(AGGREGATE, user_id, name), encode(agg));
    }

    /// Removes a user's running aggregates for one event name.
    pub(crate) fn remove_user_aggregate(&mut self, user_id: &str, name: &str) {
        self.remove_raw(pair(AGGREGATE, user_id, name));
    }

    /// Stores a trigger (create or replace).
    pub(crate) fn put_trigger(&mut self, trigger: &Trigger) {
        self.put_raw(prefixed(TRIGGER, &trigger.id), encode(trigger));
    }

    /// Removes a trigger.
    pub(crate) fn remove_trigger(&mut self, id: &str) {
        self.remove_raw(prefixed(TRIGGER, id));
    }

    /// Appends an action fired by `event` to the log (`action.event` is not read: the chunk
    /// stores each event once). Consecutive actions of a batch share a chunk (see
    /// [`super::actions`]); its record and index keys are written when it is closed.
    pub(crate) fn put_action(&mut self, action: FiredAction, event: Option<&Event>) {
        let seq = action.sequence;
        if let Some((first, chunk, bytes)) = &self.open_chunk {
            if first + chunk.len() as u64 != seq || chunk.len() >= CHUNK_ACTIONS || *bytes >= CHUNK_BYTES {
                self.close_chunk();
            }
        }
        let (_, chunk, bytes) = self.open_chunk.get_or_insert_with(|| (seq, Chunk::default(), 0));
        *bytes += chunk.push(action, event);
    }

    /// Writes the open action chunk, if any, with its index keys.
    fn close_chunk(&mut self) {
        if let Some((first, chunk, _)) = self.open_chunk.take() {
            for (key, value) in chunk.index_entries(first) {
                self.put_raw(key, value);
            }
            self.put_raw(chunk_key(first).to_vec(), encode(&chunk));
        }
    }

    /// Stores a trigger's firing state for one user.
    pub(crate) fn put_firing_state(&mut self, trigger_id: &str, user_id: &str, state: &FiringState) {
        self.put_raw(pair(FIRING, trigger_id, user_id), encode(state));
    }

    /// Removes a trigger's firing state for one user.
    pub(crate) fn remove_firing_state(&mut self, trigger_id: &str, user_id: &str) {
        self.remove_raw(pair(FIRING, trigger_id, user_id));
    }

    /// Remembers a client-supplied event id and the sequence it was stored with.
    pub(crate) fn put_event_id(&mut self, event_id: &str, sequence: u64) {
        self.put_raw(prefixed(EVENT_ID, event_id), sequence.to_be_bytes().to_vec());
    }

    /// Forgets a client event id.
    pub(crate) fn remove_event_id(&mut self, event_id: &str) {
        self.remove_raw(prefixed(EVENT_ID, event_id));
    }

    /// Stores an event name's aggregate maintenance epoch.
    pub(crate) fn put_epoch(&mut self, name: &str, epoch: u64) {
        self.put_raw(prefixed(EPOCH, name), epoch.to_be_bytes().to_vec());
    }

    /// Stores the last action sequence handed out.
    pub(crate) fn put_last_action_seq(&mut self, seq: u64) {
        self.put_raw(META_ACTION_SEQ.to_vec(), seq.to_be_bytes().to_vec());
    }

    /// Stores the last event sequence handed out.
    pub(crate) fn put_last_event_seq(&mut self, seq: u64) {
        self.put_raw(META_EVENT_SEQ.to_vec(), seq.to_be_bytes().to_vec());
    }

    /// Stores an attribute definition.
    pub(crate) fn put_attribute(&mut self, def: &AttributeDefinition) {
        self.put_raw(prefixed(ATTRIBUTE, &def.name), encode(def));
    }

    /// Stores an event name's statistics.
    pub(crate) fn put_name_stats(&mut self, name: &str, stats: &EventNameStats) {
        self.put_raw(prefixed(NAME_STATS, name), encode(stats));
    }

    /// Marks a user as being erased (DeleteUser is between two of its slices).
    pub(crate) fn put_erasing(&mut self, user_id: &str) {
        self.put_raw(prefixed(ERASING, user_id), Vec::new());
    }

    /// Clears the mark of a user being erased (the last slice is done).
    pub(crate) fn remove_erasing(&mut self, user_id: &str) {
        self.remove_raw(prefixed(ERASING, user_id));
    }

    /// Marks the by-name index as built.
    pub(super) fn put_columns_built(&mut self) {
        self.put_raw(META_COLUMNS.to_vec(), vec![1]);
    }
}
