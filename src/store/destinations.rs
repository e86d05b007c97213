//! Destinations (`O`), each destination's delivery position in the action log (`J`), its pending
//! retries (`j`) and its dead letters (`o`). An action is in at most one of: after the position
//! (not attempted yet, or in flight), a retry, a dead letter; or it is delivered (nothing kept).
//! Each is changed through the writer's batches like every other record.

use super::codec::{decode, decode_u64, encode};
use super::keys::*;
use super::{Store, StoreError, WriteBatch};
use crate::domain::destination::{DeliveryState, Destination};
use crate::domain::model::FiredAction;

impl WriteBatch {
    /// Stores a destination (create or replace).
    pub(crate) fn put_destination(&mut self, d: &Destination) {
        self.put_raw(prefixed(DESTINATION, &d.id), encode(d));
    }

    /// Stores a destination's delivery position.
    pub(crate) fn put_delivery_position(&mut self, id: &str, position: u64) {
        self.put_raw(prefixed(DELIVERY_POSITION, id), position.to_be_bytes().to_vec());
    }

    /// Stores the pending retry of action `seq`.
    pub(crate) fn put_retry(&mut self, id: &str, seq: u64, state: &DeliveryState) {
        self.put_raw(seq_index_key(RETRY, id, seq), encode(state));
    }

    pub(crate) fn remove_retry(&mut self, id: &str, seq: u64) {
        self.remove_raw(seq_index_key(RETRY, id, seq));
    }

    /// Stores action `seq` as a dead letter.
    pub(crate) fn put_dead_letter(&mut self, id: &str, seq: u64, state: &DeliveryState) {
        self.put_raw(seq_index_key(DEAD_LETTER, id, seq), encode(state));
    }

    pub(crate) fn remove_dead_letter(&mut self, id: &str, seq: u64) {
        self.remove_raw(seq_index_key(DEAD_LETTER, id, seq));
    }
}

/// Actions of one destination in the retry or dead-letter records, by sequence.
pub(crate) type Deliveries = Vec<(u64, DeliveryState)>;

impl Store {
    /// Every destination, by id.
    pub(crate) fn destinations(&self) -> Result<Vec<Destination>, StoreError> {
        self.tree
            .scan_prefix([DESTINATION])
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// A destination's delivery position (`None`: it has none yet).
    pub(crate) fn delivery_position(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let key = prefixed(DELIVERY_POSITION, id);
        self.tree.get(&key)?.map(|v| decode_u64(&key, &v)).transpose()
    }

    /// Every pending retry of a destination.
    pub(crate) fn retries(&self, id: &str) -> Result<Deliveries, StoreError> {
        self.deliveries(RETRY, id, 0, usize::MAX)
    }

    /// The pending retry of action `seq`, if any.
    pub(crate) fn retry(&self, id: &str, seq: u64) -> Result<Option<DeliveryState>, StoreError> {
        let key = seq_index_key(RETRY, id, seq);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Up to `limit` dead letters of a destination from sequence `from` on.
    pub(crate) fn dead_letters(&self, id: &str, from: u64, limit: usize) -> Result<Deliveries, StoreError> {
        self.deliveries(DEAD_LETTER, id, from, limit)
    }

    /// The dead letter of action `seq`, if any.
    pub(crate) fn dead_letter(&self, id: &str, seq: u64) -> Result<Option<DeliveryState>, StoreError> {
        let key = seq_index_key(DEAD_LETTER, id, seq);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// How many dead letters a destination holds.
    pub(crate) fn count_dead_letters(&self, id: &str) -> Result<u64, StoreError> {
        let mut n = 0;
        for k in self.tree.scan_prefix(under(DEAD_LETTER, id)).keys() {
            k?;
            n += 1;
        }
        Ok(n)
    }

    fn deliveries(&self, prefix: u8, id: &str, from: u64, limit: usize) -> Result<Deliveries, StoreError> {
        let start = seq_index_key(prefix, id, from);
        let end = end_of(&under(prefix, id));
        let mut out = Vec::new();
        for kv in self.tree.range(start..end) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            out.push((seq_of_index_key(&k)?, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Whether `user` has stored events (is in the user registry): erasure removes it.
    pub(crate) fn has_user(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(prefixed(USER, user))?)
    }

    /// The action of sequence `seq`, if the log still holds it.
    pub(crate) fn action_at(&self, seq: u64) -> Result<Option<FiredAction>, StoreError> {
        Ok(self.actions_at(&[seq])?.into_iter().next())
    }

    /// Adds to `batch` the removal of a destination with its position, retries and dead letters.
    pub(crate) fn remove_destination(&self, batch: &mut WriteBatch, id: &str) -> Result<(), StoreError> {
        batch.remove_raw(prefixed(DESTINATION, id));
        batch.remove_raw(prefixed(DELIVERY_POSITION, id));
        for prefix in [RETRY, DEAD_LETTER] {
            for k in self.tree.scan_prefix(under(prefix, id)).keys() {
                batch.remove_raw(k?.to_vec());
            }
        }
        Ok(())
    }

    /// Adds to `batch` the removal of the retries and dead letters of actions `seqs` (a user's,
    /// being erased) at every destination.
    pub(super) fn remove_deliveries_of(
        &self,
        batch: &mut WriteBatch,
        seqs: &[u64],
    ) -> Result<usize, StoreError> {
        let mut ids = Vec::new();
        for k in self.tree.scan_prefix([DESTINATION]).keys() {
            ids.push(String::from_utf8_lossy(&k?[1..]).into_owned());
        }
        let mut removed = 0;
        for id in &ids {
            for prefix in [RETRY, DEAD_LETTER] {
                for &seq in seqs {
                    let key = seq_index_key(prefix, id, seq);
                    if self.tree.contains_key(&key)? {
                        batch.remove_raw(key);
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }
}
