//! Older on-disk layouts, all in one place, and what brings a data directory written by an
//! earlier release up to date. Every migration runs at start-up (from [`Store::migrate`], or
//! while decoding, for records that still decode in an older form) and is idempotent: a crash
//! half-way leaves a directory the next start migrates again.
//!
//! | layout | how it is recognised | what happens |
//! |---|---|---|
//! | triggers stored before timers existed | the record decodes as [`TriggerV1`] with no bytes left | read as a trigger without `delay`/`unless`; rewritten in the current form by its next change |
//! | triggers stored before destinations existed | the record decodes as [`TriggerV2`] with no bytes left | read as a trigger without a destination; rewritten by its next change |
//! | action chunks written before destinations existed | the chunk decodes as `ChunkV1` with no bytes left | read as a chunk whose actions go to no destination |
//! | timers of pre-release builds (one key per timer) | `Q` keys longer than 10 bytes, `P` keys other than 3 bytes, any `Z` key | removed (they would never fire, and erasure does not look for them) |
//! | a data directory from before the by-name index | no `Mcolumns` key | the index is built from the stored events, 10 000 at a time, then marked built |
//! | per-minute statistics buckets (before minutes were computed from blocks) | any `K` key | removed, 10 000 per batch (nothing reads them) |

use serde::{Deserialize, Serialize};

use super::codec::{decode, older};
use super::columns::{ColumnWrites, Columns};
use super::keys::*;
use super::{Store, StoreError, WriteBatch};
use crate::domain::model::{ActionTemplate, Event, Timestamp, Trigger};

/// A trigger as stored before timers existed (read once, then rewritten in the current form).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct TriggerV1 {
    id: String,
    name: String,
    paused: bool,
    event_name: String,
    raw_condition: Option<crate::domain::condition::RawCondition>,
    condition: Option<crate::domain::condition::Condition>,
    action: ActionTemplate,
    cooldown_nanos: Option<i128>,
    once_per_user: bool,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl From<TriggerV1> for Trigger {
    fn from(t: TriggerV1) -> Self {
        Trigger {
            id: t.id,
            name: t.name,
            paused: t.paused,
            event_name: t.event_name,
            raw_condition: t.raw_condition,
            condition: t.condition,
            action: t.action,
            cooldown_nanos: t.cooldown_nanos,
            once_per_user: t.once_per_user,
            created_at: t.created_at,
            updated_at: t.updated_at,
            delay_nanos: None,
            unless: None,
            destination_id: String::new(),
        }
    }
}

/// A trigger as stored before destinations existed (read once, then rewritten in the current
/// form by its next change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct TriggerV2 {
    id: String,
    name: String,
    paused: bool,
    event_name: String,
    raw_condition: Option<crate::domain::condition::RawCondition>,
    condition: Option<crate::domain::condition::Condition>,
    action: ActionTemplate,
    cooldown_nanos: Option<i128>,
    once_per_user: bool,
    created_at: Timestamp,
    updated_at: Timestamp,
    delay_nanos: Option<i128>,
    unless: Option<crate::domain::model::AbsenceCheck>,
}

impl From<TriggerV2> for Trigger {
    fn from(t: TriggerV2) -> Self {
        Trigger {
            id: t.id,
            name: t.name,
            paused: t.paused,
            event_name: t.event_name,
            raw_condition: t.raw_condition,
            condition: t.condition,
            action: t.action,
            cooldown_nanos: t.cooldown_nanos,
            once_per_user: t.once_per_user,
            created_at: t.created_at,
            updated_at: t.updated_at,
            delay_nanos: t.delay_nanos,
            unless: t.unless,
            destination_id: String::new(),
        }
    }
}

/// Decodes a stored trigger, in its current form or the one from before timers existed.
pub(super) fn decode_trigger(key: &[u8], bytes: &[u8]) -> Result<Trigger, StoreError> {
    // A trigger stored before timers existed lacks their trailing fields: it decodes as the old
    // form with nothing left over, and nothing else does.
    decode::<Trigger>(key, bytes).or_else(|e| {
        older::<TriggerV2>(bytes)
            .map(Trigger::from)
            .or_else(|| older::<TriggerV1>(bytes).map(Trigger::from))
            .ok_or(e)
    })
}

/// What [`Store::migrate`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Migrated {
    /// Timer keys of the pre-release layout removed.
    pub dropped_timer_keys: usize,
    /// Events added to a by-name index built from scratch (`None`: it was already built).
    pub indexed_events: Option<u64>,
    /// Actions of the layout before chunks rewritten as chunks.
    pub chunked_actions: usize,
    /// Per-minute statistics buckets removed.
    pub dropped_minute_buckets: usize,
}

impl Store {
    /// Brings the data directory up to date (see the module documentation). `columns` is the
    /// writer's index state, which the index backfill writes through.
    pub(crate) fn migrate(&self, columns: &mut Columns) -> Result<Migrated, StoreError> {
        Ok(Migrated {
            dropped_timer_keys: self.drop_unpacked_timers()?,
            indexed_events: self.backfill_columns(columns)?,
            chunked_actions: self.chunk_action_log()?,
            dropped_minute_buckets: self.drop_minute_buckets()?,
        })
    }

    /// Removes the per-minute statistics buckets of older releases. Answers how many.
    fn drop_minute_buckets(&self) -> Result<usize, StoreError> {
        let dropped = self.remove_prefix(MINUTE_BUCKET)?;
        if dropped > 0 {
            self.flush()?;
        }
        Ok(dropped)
    }

    /// Removes timer keys written by pre-release builds of the timers (two keys per timer: `Q`
    /// keys longer than this layout's, `P` keys other than buckets, and `Z` keys). Answers how
    /// many.
    fn drop_unpacked_timers(&self) -> Result<usize, StoreError> {
        let mut batch = WriteBatch::default();
        for (prefix, keep_len) in [(DUE, 10), (TIMER_BUCKET, 3), (b'Z', usize::MAX)] {
            for k in self.tree.scan_prefix([prefix]).keys() {
                let k = k?;
                if k.len() != keep_len {
                    batch.remove_raw(k.to_vec());
                }
            }
        }
        let dropped = batch.len();
        self.apply(batch)?;
        Ok(dropped)
    }

    /// Rewrites the action log of the layout before chunks (one key per action) as chunks of
    /// one action, 1 000 per atomic batch, then flushes. A crash in between leaves both kinds,
    /// and the next start converts the rest (both are never read at once: the server serves
    /// only after this). Answers how many.
    fn chunk_action_log(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let n = self.chunk_unchunked_actions(1_000)?;
            total += n;
            if n == 0 {
                break;
            }
        }
        if total > 0 {
            self.flush()?;
        }
        Ok(total)
    }

    /// Builds the by-name index from the stored events when the data directory predates it
    /// (once; in batches of 10 000 events, then marked built). Answers how many events it
    /// indexed, or `None` when the index was already built.
    fn backfill_columns(&self, columns: &mut Columns) -> Result<Option<u64>, StoreError> {
        if self.tree.contains_key(META_COLUMNS)? {
            return Ok(None);
        }
        self.clear_columns()?;
        let mut events = 0u64;
        let mut writes = ColumnWrites::default();
        let mut pending = 0;
        for event in self.all_events() {
            writes.add(&event?);
            pending += 1;
            events += 1;
            if pending == 10_000 {
                let mut batch = WriteBatch::default();
                columns.write(self, &mut batch, std::mem::take(&mut writes))?;
                self.apply(batch)?;
                pending = 0;
            }
        }
        let mut batch = WriteBatch::default();
        columns.write(self, &mut batch, writes)?;
        batch.put_columns_built();
        self.apply(batch)?;
        self.flush()?;
        Ok(Some(events))
    }

    /// Removes every index key (before a backfill, which a crash may have interrupted).
    fn clear_columns(&self) -> Result<(), StoreError> {
        for prefix in [BLOCK, HOUR_BUCKET, USER, ROLLUP, ROLLUP_META] {
            self.remove_prefix(prefix)?;
        }
        Ok(())
    }

    /// Removes every key starting with `prefix`, 10 000 per batch. Answers how many.
    fn remove_prefix(&self, prefix: u8) -> Result<usize, StoreError> {
        let mut removed = 0;
        loop {
            let mut batch = WriteBatch::default();
            for k in self.tree.scan_prefix([prefix]).keys().take(10_000) {
                batch.remove_raw(k?.to_vec());
            }
            if batch.is_empty() {
                return Ok(removed);
            }
            removed += batch.len();
            self.apply(batch)?;
        }
    }

    /// Every stored event, in key order (for the index backfill).
    fn all_events(&self) -> impl Iterator<Item = Result<Event, StoreError>> + '_ {
        self.tree.scan_prefix([TIMELINE]).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    #[test]
    fn minute_buckets_of_the_older_layout_are_removed_once() {
        let (_dir, store) = temp_store();
        let mut columns = Columns::default();
        store.migrate(&mut columns).expect("the index marked built");
        let mut batch = WriteBatch::default();
        for minute in 0..25_000u64 {
            batch.put_raw(bucket_key(MINUTE_BUCKET, "n", minute as i64).to_vec(), vec![1]);
        }
        batch.put_raw(bucket_key(HOUR_BUCKET, "n", 3).to_vec(), vec![2]);
        store.apply(batch).expect("apply");
        let migrated = store.migrate(&mut columns).expect("migrate");
        assert_eq!(migrated.dropped_minute_buckets, 25_000);
        assert_eq!(store.tree.scan_prefix([MINUTE_BUCKET]).count(), 0);
        assert!(store
            .tree
            .contains_key(bucket_key(HOUR_BUCKET, "n", 3))
            .expect("get"));
        assert_eq!(
            store.migrate(&mut columns).expect("again").dropped_minute_buckets,
            0
        );
    }

    #[test]
    fn keys_of_the_unpacked_timer_layout_are_dropped_and_buckets_kept() {
        let (_dir, store) = temp_store();
        let mut batch = WriteBatch::default();
        batch.put_raw(b"Q0123456789abtrigger\0ann".to_vec(), b"old timer ann".to_vec());
        batch.put_raw(b"Ptrigger\0ann".to_vec(), b"old index".to_vec());
        batch.put_raw(b"Ztrigger".to_vec(), Vec::new());
        batch.put_raw(
            timer_bucket_key(7).to_vec(),
            super::super::codec::encode(&Vec::<u8>::new()),
        );
        batch.put_raw(due_key(9, 1).to_vec(), super::super::codec::encode(&vec![7u16]));
        store.apply(batch).expect("apply");
        assert_eq!(store.drop_unpacked_timers().expect("drop"), 3);
        let left: Vec<Vec<u8>> = store
            .tree
            .iter()
            .keys()
            .map(|k| k.expect("key").to_vec())
            .collect();
        assert_eq!(left, vec![timer_bucket_key(7).to_vec(), due_key(9, 1).to_vec()]);
    }

    #[test]
    fn a_trigger_of_the_layout_before_timers_decodes_without_timers() {
        let at = Timestamp { secs: 5, nanos: 0 };
        let old = TriggerV1 {
            id: "t1".into(),
            name: "n".into(),
            paused: false,
            event_name: "e".into(),
            raw_condition: None,
            condition: None,
            action: ActionTemplate {
                action_type: "email".into(),
                payload_template: "hi".into(),
            },
            cooldown_nanos: Some(7),
            once_per_user: true,
            created_at: at,
            updated_at: at,
        };
        let bytes = super::super::codec::encode(&old);
        let t = decode_trigger(b"Rt1", &bytes).expect("decodes");
        assert_eq!(
            (t.id.as_str(), t.cooldown_nanos, t.delay_nanos, t.unless),
            ("t1", Some(7), None, None)
        );
        assert!(decode_trigger(b"Rt1", &bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_trigger_of_the_layout_before_destinations_decodes_without_one() {
        let at = Timestamp { secs: 5, nanos: 0 };
        let old = TriggerV2 {
            id: "t2".into(),
            name: "n".into(),
            paused: true,
            event_name: "e".into(),
            raw_condition: None,
            condition: None,
            action: ActionTemplate {
                action_type: "email".into(),
                payload_template: "hi".into(),
            },
            cooldown_nanos: None,
            once_per_user: false,
            created_at: at,
            updated_at: at,
            delay_nanos: Some(9),
            unless: None,
        };
        let bytes = super::super::codec::encode(&old);
        let t = decode_trigger(b"Rt2", &bytes).expect("decodes");
        assert_eq!(
            (t.id.as_str(), t.paused, t.delay_nanos, t.destination_id.as_str()),
            ("t2", true, Some(9), "")
        );
        // The current form round-trips with its destination.
        let now = Trigger {
            destination_id: "d1".into(),
            ..t
        };
        let again = decode_trigger(b"Rt2", &super::super::codec::encode(&now)).expect("decodes");
        assert_eq!(again, now);
    }

    /// Writes `n` actions in the layout before chunks (a record and two empty index keys each),
    /// alternating users a and b and triggers t1 and t2.
    fn write_unchunked_actions(store: &Store, n: u64) {
        use crate::domain::model::FiredAction;
        let mut batch = WriteBatch::default();
        for seq in 1..=n {
            let user = if seq % 2 == 0 { "a" } else { "b" };
            let trigger = if seq % 3 == 0 { "t1" } else { "t2" };
            let event = super::super::actions::tests::event(user, seq);
            let action = FiredAction {
                sequence: seq,
                action_id: format!("a{seq}"),
                event_id: event.event_id.clone(),
                fired_at: Timestamp {
                    secs: seq as i64,
                    nanos: 0,
                },
                payload: format!("p{seq}"),
                event: Some(event),
                ..super::super::actions::tests::action(user, trigger)
            };
            let mut key = vec![UNCHUNKED_ACTION];
            key.extend_from_slice(&seq.to_be_bytes());
            batch.put_raw(key, super::super::codec::encode(&action));
            batch.put_raw(seq_index_key(USER_ACTION, user, seq), Vec::new());
            batch.put_raw(seq_index_key(TRIGGER_ACTION, trigger, seq), Vec::new());
        }
        store.apply(batch).expect("apply");
    }

    #[test]
    fn the_action_log_before_chunks_is_rewritten_once_and_reads_as_it_did() {
        use crate::store::ActionOwner;
        let (_dir, store) = temp_store();
        write_unchunked_actions(&store, 2_500);
        let before: Vec<_> = (1..=2_500u64)
            .map(|s| (s, format!("a{s}"), format!("p{s}"), format!("e{s}")))
            .collect();
        // Spread over three batches of 1 000.
        assert_eq!(store.chunk_action_log().expect("migrate"), 2_500);
        assert_eq!(store.chunk_action_log().expect("again"), 0, "once");
        assert_eq!(store.tree.scan_prefix([UNCHUNKED_ACTION]).count(), 0);
        let all = store.actions(1, u64::MAX, usize::MAX, usize::MAX).expect("read");
        let got: Vec<_> = all
            .iter()
            .map(|a| {
                let e = a.event.as_ref().map(|e| e.event_id.clone()).unwrap_or_default();
                (a.sequence, a.action_id.clone(), a.payload.clone(), e)
            })
            .collect();
        assert_eq!(got, before);
        let a_newest = store
            .actions_newest_first(ActionOwner::User("a"), 100, 3)
            .expect("user");
        assert_eq!(
            a_newest.iter().map(|a| a.sequence).collect::<Vec<_>>(),
            vec![98, 96, 94]
        );
        let t1 = store
            .actions_newest_first(ActionOwner::Trigger("t1"), 10, 10)
            .expect("trigger");
        assert_eq!(t1.iter().map(|a| a.sequence).collect::<Vec<_>>(), vec![9, 6, 3]);
        // Erasure and retention of converted actions leave no index key behind.
        let mut batch = WriteBatch::default();
        assert_eq!(store.strip_user_actions(&mut batch, "a").expect("strip"), 1_250);
        store.apply(batch).expect("apply");
        assert!(store
            .actions_newest_first(ActionOwner::User("a"), 0, 1)
            .expect("gone")
            .is_empty());
        assert_eq!(store.tree.scan_prefix(under(USER_ACTION, "a")).count(), 0);
        let a2 = store.actions(2, 2, 1, usize::MAX).expect("stripped");
        assert_eq!(
            (
                a2[0].user_id.as_str(),
                a2[0].payload.as_str(),
                a2[0].event.is_none()
            ),
            ("", "", true)
        );
        let mut batch = WriteBatch::default();
        let cutoff = Timestamp {
            secs: i64::MAX / 2,
            nanos: 0,
        };
        assert_eq!(
            store
                .expire_actions(&mut batch, cutoff, usize::MAX)
                .expect("expire"),
            2_500
        );
        store.apply(batch).expect("apply");
        assert_eq!(store.tree.scan_prefix([USER_ACTION]).count(), 0);
        assert_eq!(store.tree.scan_prefix([TRIGGER_ACTION]).count(), 0);
        assert_eq!(store.tree.scan_prefix([ACTION_CHUNK]).count(), 0);
    }
}
