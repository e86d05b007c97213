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

    /// Stores a destination's delivery position, with the actions after it that already have
    /// an outcome (delivered ones included), ascending.
    pub(crate) fn put_delivery_position(&mut self, id: &str, position: u64, settled_after: &[u64]) {
        let mut value = position.to_be_bytes().to_vec();
        if !settled_after.is_empty() {
            // Distances from the one before: small numbers, a byte or two each.
            let mut last = position;
            let deltas: Vec<u64> = settled_after
                .iter()
                .map(|s| {
                    let d = s.saturating_sub(last);
                    last = *s;
                    d
                })
                .collect();
            value.extend_from_slice(&encode(&deltas));
        }
        self.put_raw(prefixed(DELIVERY_POSITION, id), value);
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

/// A delivery position as `put_delivery_position` writes it: the position, then the actions
/// settled after it as distances (none for the 8-byte form).
fn decode_position(key: &[u8], v: &[u8]) -> Result<(u64, Vec<u64>), StoreError> {
    if v.len() < 8 {
        return Err(StoreError::corrupt(
            key,
            "a delivery position shorter than 8 bytes",
        ));
    }
    let position = decode_u64(key, &v[..8])?;
    let mut settled = Vec::new();
    if v.len() > 8 {
        let deltas: Vec<u64> = decode(key, &v[8..])?;
        let mut at = position;
        for d in deltas {
            at = at.saturating_add(d);
            settled.push(at);
        }
    }
    Ok((position, settled))
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

    /// A destination's delivery position and the actions after it that already have an outcome
    /// (`None`: it has none yet).
    pub(crate) fn delivery_position(&self, id: &str) -> Result<Option<(u64, Vec<u64>)>, StoreError> {
        let key = prefixed(DELIVERY_POSITION, id);
        self.tree
            .get(&key)?
            .map(|v| decode_position(&key, &v))
            .transpose()
    }

    /// The first action sequence any destination still needs (its position + 1, or its
    /// earliest retry): retention keeps the log from there on. `u64::MAX` without destinations.
    pub(crate) fn delivery_floor(&self) -> Result<u64, StoreError> {
        let mut floor = u64::MAX;
        for kv in self.tree.scan_prefix([DELIVERY_POSITION]) {
            let (k, v) = kv?;
            if v.len() < 8 {
                return Err(StoreError::corrupt(
                    &k,
                    "a delivery position shorter than 8 bytes",
                ));
            }
            floor = floor.min(decode_u64(&k, &v[..8])?.saturating_add(1));
        }
        let mut ids = Vec::new();
        for k in self.tree.scan_prefix([DESTINATION]).keys() {
            ids.push(String::from_utf8_lossy(&k?[1..]).into_owned());
        }
        for id in ids {
            if let Some(kv) = self.tree.scan_prefix(under(RETRY, &id)).keys().next() {
                floor = floor.min(seq_of_index_key(&kv?)?);
            }
        }
        Ok(floor)
    }

    /// Whether action `seq` is still `user`'s (erasure removes the user's action index).
    pub(crate) fn user_has_action(&self, user: &str, seq: u64) -> Result<bool, StoreError> {
        let lo = seq_index_key(USER_ACTION, user, 0);
        let hi = seq_index_key(USER_ACTION, user, seq);
        match self.tree.range(lo..=hi).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(super::actions::index_sequences(&k, &v)?.contains(&seq))
            }
            None => Ok(false),
        }
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

    /// The action of sequence `seq`, if the log still holds it.
    pub(crate) fn action_at(&self, seq: u64) -> Result<Option<FiredAction>, StoreError> {
        Ok(self.actions_at(&[seq])?.into_iter().next())
    }

    /// Adds to `batch` the removal of the retry and dead letter of action `seq` at destination
    /// `id` (whether or not there are any).
    pub(crate) fn remove_delivery_records(&self, batch: &mut WriteBatch, id: &str, seq: u64) {
        batch.remove_raw(seq_index_key(RETRY, id, seq));
        batch.remove_raw(seq_index_key(DEAD_LETTER, id, seq));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    #[test]
    fn a_position_keeps_the_actions_settled_after_it_and_an_old_8_byte_one_reads() {
        let (_dir, store) = temp_store();
        let mut batch = WriteBatch::default();
        batch.put_delivery_position("d1", 7, &[9, 10, 300]);
        batch.put_raw(prefixed(DELIVERY_POSITION, "d2"), 5u64.to_be_bytes().to_vec());
        store.apply(batch).expect("apply");
        assert_eq!(
            store.delivery_position("d1").unwrap(),
            Some((7, vec![9, 10, 300]))
        );
        assert_eq!(store.delivery_position("d2").unwrap(), Some((5, vec![])));
        assert_eq!(store.delivery_position("d3").unwrap(), None);
        let mut batch = WriteBatch::default();
        batch.put_raw(prefixed(DELIVERY_POSITION, "d4"), vec![1, 2]);
        store.apply(batch).expect("apply");
        assert!(
            store.delivery_position("d4").is_err(),
            "damage is an error, not a panic"
        );
    }

    #[test]
    fn retention_is_held_at_the_first_action_a_destination_needs() {
        let (_dir, store) = temp_store();
        assert_eq!(store.delivery_floor().unwrap(), u64::MAX);
        let d = |id: &str| Destination {
            id: id.into(),
            name: id.into(),
            url: "https://example.com/".into(),
            headers: Default::default(),
            signing_secret: String::new(),
            timeout_ms: 1000,
            max_attempts: 1,
            max_retry_age_secs: 1,
            concurrency: 1,
            paused: false,
            created_at: crate::domain::model::Timestamp::now(),
            updated_at: crate::domain::model::Timestamp::now(),
        };
        let state = DeliveryState {
            attempts: 1,
            last_status: 500,
            last_error: String::new(),
            first_attempt_at: crate::domain::model::Timestamp::now(),
            last_attempt_at: crate::domain::model::Timestamp::now(),
            next_at: crate::domain::model::Timestamp::now(),
        };
        let mut batch = WriteBatch::default();
        batch.put_destination(&d("a"));
        batch.put_destination(&d("b"));
        batch.put_delivery_position("a", 100, &[]);
        batch.put_delivery_position("b", 50, &[]);
        batch.put_retry("a", 20, &state);
        store.apply(batch).expect("apply");
        assert_eq!(store.delivery_floor().unwrap(), 20);
        let mut batch = WriteBatch::default();
        batch.remove_retry("a", 20);
        store.apply(batch).expect("apply");
        assert_eq!(store.delivery_floor().unwrap(), 51);
    }
}
