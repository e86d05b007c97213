//! Pending timers, packed so that their number of sled keys does not grow with their number
//! (sled 0.34 keeps about 38 bytes of memory per key: one key per timer would make 1M pending
//! timers cost tens of MiB).
//!
//! - `P` bucket(2): every pending timer of the users whose id hashes to that bucket (65 536
//!   buckets), as a postcard list of [`Timer`]s. Arming, cancelling, firing and erasing a user
//!   rewrite one bucket (a few timers at most for a million pending).
//! - `Q` minute(8) part(1): the buckets holding a timer due in that UTC minute (split in 256 parts
//!   by the bucket's high byte, so a part stays small). The next due timer is found from the
//!   first `Q` key without scanning; an entry left behind by a cancelled or re-armed timer is
//!   harmless (its bucket holds nothing due then) and goes when its minute is processed.
//!
//! The writer changes timers through a [`TimerOverlay`] per write group, written in the group's
//! batch like everything else.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::codec::{decode, encode};
use super::keys::{due_key, due_key_parts, timer_bucket_key, DUE};
use super::{Store, StoreError, WriteBatch};
use crate::domain::bytes::fnv1a;
use crate::domain::model::{Timer, Timestamp};

/// The bucket of a user's timers (FNV-1a of the user id, folded to 16 bits).
pub(crate) fn user_bucket(user_id: &str) -> u16 {
    let h = fnv1a(user_id.as_bytes());
    (h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48)) as u16
}

/// The UTC minute of a due time.
pub(crate) fn minute_of(at: Timestamp) -> i64 {
    at.secs.div_euclid(60)
}

impl Store {
    /// The pending timers of a bucket.
    pub(crate) fn timer_bucket(&self, bucket: u16) -> Result<Vec<Timer>, StoreError> {
        let key = timer_bucket_key(bucket);
        match self.tree.get(key)? {
            Some(v) => decode(&key, &v),
            None => Ok(Vec::new()),
        }
    }

    /// The due sets of every minute up to `upto` (inclusive), earliest first: (minute, part,
    /// buckets).
    pub(crate) fn due_sets(&self, upto: i64) -> Result<Vec<(i64, u8, Vec<u16>)>, StoreError> {
        let end = due_key(upto.saturating_add(1), 0);
        let mut out = Vec::new();
        for kv in self.tree.range(vec![DUE]..end.to_vec()) {
            let (k, v) = kv?;
            let (minute, part) = due_key_parts(&k).ok_or_else(|| StoreError::corrupt(&k, "short due key"))?;
            // A set that does not decode is read as empty: retired when its minute is past.
            let buckets = decode(&k, &v).unwrap_or_else(|e| {
                tracing::error!(error = %e, minute, "dropping a due set that does not decode");
                Vec::new()
            });
            out.push((minute, part, buckets));
        }
        Ok(out)
    }

    /// The first minute after `after` with a due set.
    pub(crate) fn next_due_minute(&self, after: Option<i64>) -> Result<Option<i64>, StoreError> {
        let start = match after {
            Some(m) => due_key(m.saturating_add(1), 0).to_vec(),
            None => vec![DUE],
        };
        match self.tree.range(start..vec![DUE + 1]).next() {
            Some(kv) => {
                let (k, _) = kv?;
                Ok(due_key_parts(&k).map(|(m, _)| m))
            }
            None => Ok(None),
        }
    }
}

/// A write group's view of the timers: the buckets it read, changed in memory, and the due
/// sets it adds to or retires; written into the group's batch by [`TimerOverlay::write`].
#[derive(Default)]
pub(crate) struct TimerOverlay {
    buckets: HashMap<u16, Vec<Timer>>,
    /// How many timers each bucket held when loaded (for the count of pending timers).
    loaded: HashMap<u16, usize>,
    changed: HashSet<u16>,
    added: BTreeMap<(i64, u8), BTreeSet<u16>>,
    retired: BTreeSet<(i64, u8)>,
}

impl TimerOverlay {
    /// Reads a bucket into the overlay (once per group); every change needs it loaded.
    pub(crate) fn load(&mut self, store: &Store, bucket: u16) -> Result<(), StoreError> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.buckets.entry(bucket) {
            match store.timer_bucket(bucket) {
                Ok(timers) => {
                    self.loaded.insert(bucket, timers.len());
                    slot.insert(timers);
                }
                Err(e @ StoreError::Corrupt { .. }) => {
                    // One bad record must not hold every later timer back: it is dropped.
                    tracing::error!(error = %e, bucket, "dropping a timer bucket that does not decode");
                    slot.insert(Vec::new());
                    self.changed.insert(bucket);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The pending timer of (trigger, user), from the overlay or the store.
    pub(crate) fn get(
        &self,
        store: &Store,
        trigger_id: &str,
        user_id: &str,
    ) -> Result<Option<Timer>, StoreError> {
        let bucket = user_bucket(user_id);
        let find = |timers: &[Timer]| {
            timers
                .iter()
                .find(|t| t.trigger_id == trigger_id && t.event.user_id == user_id)
                .cloned()
        };
        match self.buckets.get(&bucket) {
            Some(timers) => Ok(find(timers)),
            None => Ok(find(&store.timer_bucket(bucket)?)),
        }
    }

    /// A loaded bucket, marked changed (`None`, and nothing marked, when it was not loaded).
    fn bucket_mut(&mut self, bucket: u16) -> Option<&mut Vec<Timer>> {
        let timers = self.buckets.get_mut(&bucket)?;
        self.changed.insert(bucket);
        Some(timers)
    }

    /// Removes the timer of (trigger, user) (its bucket must be loaded).
    pub(crate) fn remove(&mut self, trigger_id: &str, user_id: &str) {
        if let Some(timers) = self.bucket_mut(user_bucket(user_id)) {
            timers.retain(|t| !(t.trigger_id == trigger_id && t.event.user_id == user_id));
        }
    }

    /// Arms a timer, replacing the pending one of its (trigger, user) (bucket loaded).
    pub(crate) fn arm(&mut self, timer: Timer) {
        let bucket = user_bucket(&timer.event.user_id);
        let minute = minute_of(timer.due);
        self.remove(&timer.trigger_id, &timer.event.user_id);
        if let Some(timers) = self.bucket_mut(bucket) {
            timers.push(timer);
            self.added
                .entry((minute, (bucket >> 8) as u8))
                .or_default()
                .insert(bucket);
        }
    }

    /// Removes every timer of a user (bucket loaded); answers how many.
    pub(crate) fn remove_user(&mut self, user_id: &str) -> usize {
        match self.bucket_mut(user_bucket(user_id)) {
            Some(timers) => {
                let before = timers.len();
                timers.retain(|t| t.event.user_id != user_id);
                before - timers.len()
            }
            None => 0,
        }
    }

    /// Takes the timers of a bucket due at or before `now` (bucket loaded), earliest first.
    pub(crate) fn take_due(&mut self, bucket: u16, now: Timestamp) -> Vec<Timer> {
        let Some(timers) = self.buckets.get_mut(&bucket) else {
            return Vec::new();
        };
        let (mut due, rest): (Vec<Timer>, Vec<Timer>) = timers.drain(..).partition(|t| t.due <= now);
        *timers = rest;
        if !due.is_empty() {
            self.changed.insert(bucket);
        }
        due.sort_by_key(|t| t.due);
        due
    }

    /// The earliest due time in a loaded bucket within `minute`.
    pub(crate) fn earliest_in(&self, bucket: u16, minute: i64) -> Option<Timestamp> {
        self.buckets
            .get(&bucket)?
            .iter()
            .map(|t| t.due)
            .filter(|d| minute_of(*d) == minute)
            .min()
    }

    /// Forgets a minute's due set (every timer due in it has been handled).
    pub(crate) fn retire(&mut self, minute: i64, part: u8) {
        self.retired.insert((minute, part));
    }

    /// True when nothing changed.
    pub(crate) fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.added.is_empty() && self.retired.is_empty()
    }

    /// Adds the group's timer changes to `batch`: changed buckets, due sets merged with the
    /// stored ones (read, merged, rewritten), retired due sets removed. Answers how many more
    /// timers are pending once the batch is applied (negative: fewer).
    pub(crate) fn write(self, store: &Store, batch: &mut WriteBatch) -> Result<i64, StoreError> {
        let mut delta = 0i64;
        for bucket in &self.changed {
            let now = self.buckets.get(bucket).map_or(0, Vec::len);
            delta += now as i64 - self.loaded.get(bucket).copied().unwrap_or(0) as i64;
        }
        for bucket in &self.changed {
            let key = timer_bucket_key(*bucket).to_vec();
            match self.buckets.get(bucket) {
                Some(timers) if !timers.is_empty() => batch.put_raw(key, encode(timers)),
                _ => batch.remove_raw(key),
            }
        }
        for key in &self.retired {
            if !self.added.contains_key(key) {
                batch.remove_raw(due_key(key.0, key.1).to_vec());
            }
        }
        for ((minute, part), buckets) in self.added {
            let key = due_key(minute, part);
            let mut set: BTreeSet<u16> = if self.retired.contains(&(minute, part)) {
                BTreeSet::new()
            } else {
                match store.tree.get(key)? {
                    Some(v) => decode::<Vec<u16>>(&key, &v)?.into_iter().collect(),
                    None => BTreeSet::new(),
                }
            };
            set.extend(buckets);
            let list: Vec<u16> = set.into_iter().collect();
            batch.put_raw(key.to_vec(), encode(&list));
        }
        Ok(delta)
    }
}

impl Store {
    /// Every pending timer, counted (once, at start: the writer keeps the count after that).
    pub(crate) fn count_timers(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.tree.scan_prefix([super::keys::TIMER_BUCKET]) {
            let (k, v) = kv?;
            // A bucket that does not decode is dropped when next loaded: it counts as empty.
            n += decode::<Vec<Timer>>(&k, &v).map_or(0, |t| t.len() as u64);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    #[test]
    fn a_bucket_that_does_not_decode_is_dropped_not_fatal() {
        let (_dir, store) = temp_store();
        let bucket = user_bucket("ann");
        let mut batch = WriteBatch::default();
        batch.put_raw(timer_bucket_key(bucket).to_vec(), vec![0xff, 0xff, 0xff]);
        batch.put_raw(due_key(5, 0).to_vec(), vec![0xff]);
        store.apply(batch).expect("apply");
        let mut overlay = TimerOverlay::default();
        overlay
            .load(&store, bucket)
            .expect("a corrupt bucket loads as empty");
        assert_eq!(overlay.get(&store, "t", "ann").expect("get"), None);
        assert_eq!(store.due_sets(10).expect("sets"), vec![(5, 0, vec![])]);
        let mut batch = WriteBatch::default();
        overlay.write(&store, &mut batch).expect("write");
        store.apply(batch).expect("apply");
        assert_eq!(store.timer_bucket(bucket).expect("read"), Vec::<Timer>::new());
        assert!(
            store.tree.get(timer_bucket_key(bucket)).expect("get").is_none(),
            "rewritten away"
        );
    }
}
