//! Storage: the only code that knows sled and the key layouts.
//!
//! Everything that must change atomically with an event lives in **one** sled tree (`engage`),
//! because `apply_batch` is atomic (and crash-atomic) for one tree only. The ingest engine turns a
//! whole group of requests into one [`WriteBatch`], applies it, and answers after one shared
//! [`Store::flush`] (group commit).
//!
//! Key layouts of the `engage` tree (integers big-endian so byte order is numeric order;
//! timestamps as [`encode_ts`]):
//!
//! | prefix | key                                              | value                       |
//! |--------|--------------------------------------------------|-----------------------------|
//! | `T`    | `T` user_id 0x00 name 0x00 occurred_at(12) sequence(8) | postcard [`Event`]    |
//! | `G`    | `G` user_id 0x00 name                            | postcard [`UserNameAggregate`] |
//! | `I`    | `I` event_id                                     | sequence(8) (client ids only) |
//! | `A`    | `A` attribute name                               | postcard [`AttributeDefinition`] |
//! | `S`    | `S` event name                                   | postcard [`EventNameStats`] |
//! | `R`    | `R` trigger_id                                   | postcard [`Trigger`]        |
//! | `F`    | `F` action sequence(8)                           | postcard [`FiredAction`]: the action log |
//! | `U`    | `U` user_id 0x00 action sequence(8)              | empty: a user's actions     |
//! | `V`    | `V` trigger_id 0x00 action sequence(8)           | empty: a trigger's actions  |
//! | `L`    | `L` trigger_id 0x00 user_id                      | postcard [`FiringState`]    |
//! | `C`    | `C` consumer name                                | acknowledged sequence(8)    |
//! | `E`    | `E` event name                                   | aggregate maintenance epoch(8) |
//! | `B`    | `B` name 0x00 hour(8) block(8)                   | a block of [`columns::Record`]s |
//! | `K`    | `K` name 0x00 minute(8)                          | postcard [`columns::BucketSummary`] |
//! | `H`    | `H` name 0x00 hour(8)                            | postcard [`columns::BucketSummary`] |
//! | `W`    | `W` user_id                                      | empty: a user with events   |
//! | `Y`    | `Y` name 0x00 first user_id                      | a chunk of [`columns::RollupEntry`]s (4096 users) |
//! | `X`    | `X` name                                         | postcard [`columns::RollupMeta`] |
//! | `P`    | `P` bucket(2)                                    | postcard list of [`crate::model::Timer`]s: the pending timers of users hashing there ([`timers`]) |
//! | `Q`    | `Q` minute(8) part(1)                            | buckets with a timer due in that minute ([`timers`]) |
//! | `M`    | `M` meta name (`event_seq`, `action_seq`, `columns`) | u64(8); `columns`: 1    |
//!
//! Event names, trigger ids and user ids never contain NUL, so 0x00 separates key parts and
//! keeps each prefix's keys contiguous. The action log is keyed by sequence, so replay is a range
//! scan and retention deletes a prefix.
//!
//! An event is stored once, under its user, then its name, then time and sequence: one user's
//! events of one name are one contiguous range in time order (history conditions and
//! name-filtered timelines read exactly that range), and all of a user's events are a handful of
//! such ranges, one per name the user has (listed by the user's `G` keys), which a timeline read
//! merges by (time, sequence). No read ever touches another user's keys. User ids may not contain
//! NUL, so the 0x00 terminator keeps users apart and keeps the keys ordered by user id.
//!
//! Queries across users (FilterUsers, GetEventStats) read the by-name index of [`columns`]
//! instead: every event is also copied into a block of its name and UTC hour (`B`), with
//! per-minute and per-hour statistics (`K`, `H`), the user registry (`W`) and, per name, a
//! rollup of every user's all-history aggregates (`Y`, `X`).

pub mod columns;
pub mod timers;

use std::ops::Bound;
use std::path::Path;

use crate::model::{
    AttributeDefinition, Event, EventNameStats, FiredAction, FiringState, Timestamp, Trigger, TriggerV1,
    UserNameAggregate,
};

const TIMELINE: u8 = b'T';
const EVENT_ID: u8 = b'I';
const ATTRIBUTE: u8 = b'A';
const NAME_STATS: u8 = b'S';
const AGGREGATE: u8 = b'G';
const TRIGGER: u8 = b'R';
const ACTION: u8 = b'F';
const USER_ACTION: u8 = b'U';
const TRIGGER_ACTION: u8 = b'V';
const FIRING: u8 = b'L';
const CONSUMER: u8 = b'C';
const EPOCH: u8 = b'E';
const META_EVENT_SEQ: &[u8] = b"Mevent_seq";
const META_ACTION_SEQ: &[u8] = b"Maction_seq";

/// A storage failure: the disk, or data that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under key {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
}

/// Storage tuning.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// sled's page cache in bytes (counts on-disk bytes, not RAM).
    pub cache_capacity: u64,
    /// sled's background flush interval; keeps its GC running too.
    pub flush_every_ms: u64,
}

/// The sled database behind engage.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// Held for writing while a batch that rewrites or removes index blocks is applied, and for
    /// reading while a query collects blocks: a sled range scan is not a snapshot, and a merge
    /// that moves records between keys under a running scan would hide them from it.
    index: std::sync::Arc<std::sync::RwLock<()>>,
}

/// Everything the ingest engine keeps in memory, read once at start-up.
#[derive(Debug, Default)]
pub struct LoadedState {
    pub last_event_seq: u64,
    /// Aggregate maintenance epochs by event name.
    pub epochs: Vec<(String, u64)>,
    pub last_action_seq: u64,
    pub triggers: Vec<Trigger>,
    pub attributes: Vec<AttributeDefinition>,
    pub event_names: Vec<(String, EventNameStats)>,
}

/// A position in a user's timeline: an event's `occurred_at` and `sequence`.
pub type TimelinePos = (Timestamp, u64);

/// Encodes a timestamp so that byte order is time order: seconds with the sign bit flipped, then
/// nanoseconds, both big-endian (12 bytes).
pub fn encode_ts(ts: Timestamp) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&((ts.secs as u64) ^ (1 << 63)).to_be_bytes());
    out[8..].copy_from_slice(&ts.nanos.to_be_bytes());
    out
}

/// `prefix` a 0x00 b: the key of a pair of names (user and event name, trigger and user, ...).
fn pair(prefix: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 2);
    k.push(prefix);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn named_prefix(user_id: &str, name: &str) -> Vec<u8> {
    let mut k = pair(TIMELINE, user_id, name);
    k.push(0);
    k
}

fn named_key(user_id: &str, name: &str, pos: TimelinePos) -> Vec<u8> {
    let mut k = named_prefix(user_id, name);
    k.extend_from_slice(&encode_ts(pos.0));
    k.extend_from_slice(&pos.1.to_be_bytes());
    k
}

fn action_key(seq: u64) -> [u8; 9] {
    let mut k = [ACTION; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_index_key(prefix: u8, owner: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 10);
    k.push(prefix);
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The upper bound of every key starting with `prefix` (which ends with 0x00).
fn end_of(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = 1;
    }
    end
}

fn decode_ts(key: &[u8], bytes: &[u8]) -> Result<TimelinePos, StoreError> {
    if bytes.len() != 20 {
        return Err(StoreError::Corrupt {
            key: key.to_vec(),
            reason: "expected a 20-byte timeline position".into(),
        });
    }
    let mut secs = [0u8; 8];
    secs.copy_from_slice(&bytes[..8]);
    let mut nanos = [0u8; 4];
    nanos.copy_from_slice(&bytes[8..12]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[12..]);
    let ts = Timestamp {
        secs: (u64::from_be_bytes(secs) ^ (1 << 63)) as i64,
        nanos: u32::from_be_bytes(nanos),
    };
    Ok((ts, u64::from_be_bytes(seq)))
}

fn prefixed(prefix: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.push(prefix);
    k.extend_from_slice(name.as_bytes());
    k
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_vec(),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain data types into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

fn decode_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        key: key.to_vec(),
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Writes that become visible and durable together (see [`Store::apply`]).
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    writes: usize,
    /// Index blocks are rewritten or removed (see `Store::index`).
    moves_index: bool,
}

impl WriteBatch {
    /// Stores an event on its user's timeline.
    pub fn put_event(&mut self, event: &Event) {
        let pos = (event.occurred_at, event.sequence);
        self.batch
            .insert(named_key(&event.user_id, &event.name, pos), encode(event));
        self.writes += 1;
    }

    /// Stores a user's running aggregates for one event name.
    pub fn put_user_aggregate(&mut self, user_id: &str, name: &str, agg: &UserNameAggregate) {
        self.batch.insert(pair(AGGREGATE, user_id, name), encode(agg));
        self.writes += 1;
    }

    /// Stores a trigger (create or replace).
    pub fn put_trigger(&mut self, trigger: &Trigger) {
        self.batch.insert(prefixed(TRIGGER, &trigger.id), encode(trigger));
        self.writes += 1;
    }

    /// Removes a trigger.
    pub fn remove_trigger(&mut self, id: &str) {
        self.batch.remove(prefixed(TRIGGER, id));
        self.writes += 1;
    }

    /// Appends an action to the log, with its by-user and by-trigger index entries.
    pub fn put_action(&mut self, action: &FiredAction) {
        self.batch
            .insert(&action_key(action.sequence)[..], encode(action));
        self.batch.insert(
            seq_index_key(USER_ACTION, &action.user_id, action.sequence),
            &[][..],
        );
        self.batch.insert(
            seq_index_key(TRIGGER_ACTION, &action.trigger_id, action.sequence),
            &[][..],
        );
        self.writes += 3;
    }

    /// Stores a trigger's firing state for one user.
    pub fn put_firing_state(&mut self, trigger_id: &str, user_id: &str, state: &FiringState) {
        self.batch
            .insert(pair(FIRING, trigger_id, user_id), encode(state));
        self.writes += 1;
    }

    /// Removes raw keys (found with a `Store` scan).
    pub fn remove_keys(&mut self, keys: Vec<sled::IVec>) {
        self.writes += keys.len();
        for k in keys {
            self.batch.remove(k);
        }
    }

    /// Forgets a client event id.
    pub fn remove_event_id(&mut self, event_id: &str) {
        self.batch.remove(prefixed(EVENT_ID, event_id));
        self.writes += 1;
    }

    /// Removes a user's running aggregates for one event name.
    pub fn remove_user_aggregate(&mut self, user_id: &str, name: &str) {
        self.batch.remove(pair(AGGREGATE, user_id, name));
        self.writes += 1;
    }

    /// Removes a trigger's firing state for one user.
    pub fn remove_firing_state(&mut self, trigger_id: &str, user_id: &str) {
        self.batch.remove(pair(FIRING, trigger_id, user_id));
        self.writes += 1;
    }

    /// Rewrites an action's log record (its index entries are left as they are).
    pub fn put_action_record(&mut self, action: &FiredAction) {
        self.batch
            .insert(&action_key(action.sequence)[..], encode(action));
        self.writes += 1;
    }

    /// Stores an event name's aggregate maintenance epoch.
    pub fn put_epoch(&mut self, name: &str, epoch: u64) {
        self.batch.insert(prefixed(EPOCH, name), &epoch.to_be_bytes()[..]);
        self.writes += 1;
    }

    /// Stores a consumer's acknowledged position.
    pub fn put_consumer(&mut self, name: &str, acked: u64) {
        self.batch
            .insert(prefixed(CONSUMER, name), &acked.to_be_bytes()[..]);
        self.writes += 1;
    }

    /// Stores the last action sequence handed out.
    pub fn put_last_action_seq(&mut self, seq: u64) {
        self.batch.insert(META_ACTION_SEQ, &seq.to_be_bytes()[..]);
        self.writes += 1;
    }

    /// Remembers a client-supplied event id and the sequence it was stored with.
    pub fn put_event_id(&mut self, event_id: &str, sequence: u64) {
        self.batch
            .insert(prefixed(EVENT_ID, event_id), &sequence.to_be_bytes()[..]);
        self.writes += 1;
    }

    /// Stores an attribute definition.
    pub fn put_attribute(&mut self, def: &AttributeDefinition) {
        self.batch.insert(prefixed(ATTRIBUTE, &def.name), encode(def));
        self.writes += 1;
    }

    /// Stores an event name's statistics.
    pub fn put_name_stats(&mut self, name: &str, stats: &EventNameStats) {
        self.batch.insert(prefixed(NAME_STATS, name), encode(stats));
        self.writes += 1;
    }

    /// Stores the last event sequence handed out.
    pub fn put_last_event_seq(&mut self, seq: u64) {
        self.batch.insert(META_EVENT_SEQ, &seq.to_be_bytes()[..]);
        self.writes += 1;
    }

    fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.batch.insert(key, value);
        self.writes += 1;
    }

    fn remove_raw(&mut self, key: Vec<u8>) {
        self.batch.remove(key);
        self.writes += 1;
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.writes == 0
    }

    /// How many writes were added.
    pub fn len(&self) -> usize {
        self.writes
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// The directory's lock may still be held for a moment by a process (or, in one process, a
    /// database handle) that just closed it: sled releases it from a background thread. So a
    /// held lock is retried for up to 5 s before the error is returned.
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_capacity)
            .flush_every_ms(Some(opts.flush_every_ms.max(1)));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        let tree = db.open_tree("engage")?;
        Ok(Self {
            db,
            tree,
            index: Default::default(),
        })
    }

    /// Reads the state the ingest engine keeps in memory.
    pub fn load_state(&self) -> Result<LoadedState, StoreError> {
        let mut state = LoadedState::default();
        if let Some(v) = self.tree.get(META_EVENT_SEQ)? {
            state.last_event_seq = decode_u64(META_EVENT_SEQ, &v)?;
        }
        if let Some(v) = self.tree.get(META_ACTION_SEQ)? {
            state.last_action_seq = decode_u64(META_ACTION_SEQ, &v)?;
        }
        for kv in self.tree.scan_prefix([EPOCH]) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            state.epochs.push((name, decode_u64(&k, &v)?));
        }
        for kv in self.tree.scan_prefix([TRIGGER]) {
            let (k, v) = kv?;
            // A trigger stored before timers existed lacks their trailing fields: it decodes as
            // the old form with nothing left over, and nothing else does.
            let trigger = match postcard::from_bytes::<Trigger>(&v) {
                Ok(t) => t,
                Err(e) => match postcard::take_from_bytes::<TriggerV1>(&v) {
                    Ok((old, [])) => old.into(),
                    _ => {
                        return Err(StoreError::Corrupt {
                            key: k.to_vec(),
                            reason: e.to_string(),
                        })
                    }
                },
            };
            state.triggers.push(trigger);
        }
        for kv in self.tree.scan_prefix([ATTRIBUTE]) {
            let (k, v) = kv?;
            state.attributes.push(decode(&k, &v)?);
        }
        for kv in self.tree.scan_prefix([NAME_STATS]) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            state.event_names.push((name, decode(&k, &v)?));
        }
        Ok(state)
    }

    /// The sequence a client-supplied event id was stored with, if any.
    pub fn sequence_of_event_id(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        let key = prefixed(EVENT_ID, event_id);
        match self.tree.get(&key)? {
            Some(v) => Ok(Some(decode_u64(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// Applies a batch atomically. Visible at once; durable after the next [`Store::flush`].
    pub fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.moves_index {
            let _moving = self.index.write().unwrap_or_else(|e| e.into_inner());
            self.tree.apply_batch(batch.batch)?;
        } else {
            self.tree.apply_batch(batch.batch)?;
        }
        Ok(())
    }

    /// Makes every write applied before this call durable. Blocking; call it from one thread at a
    /// time per group (see NOTES: concurrent `flush_async` deadlocks in sled 0.34.7).
    pub fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    /// The names of the events a user has: one seek per name over the user's event keys, which
    /// are grouped by name.
    pub fn user_event_names(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let mut prefix = prefixed(TIMELINE, user_id);
        prefix.push(0);
        let end = end_of(&prefix);
        let mut names = Vec::new();
        let mut from = prefix.clone();
        while let Some(kv) = self.tree.range(from.clone()..end.clone()).next() {
            let (k, _) = kv?;
            let rest = &k[prefix.len()..];
            let Some(len) = rest.iter().position(|b| *b == 0) else {
                return Err(StoreError::Corrupt {
                    key: k.to_vec(),
                    reason: "event key without a name terminator".into(),
                });
            };
            let name = String::from_utf8_lossy(&rest[..len]).into_owned();
            from = end_of(&named_prefix(user_id, &name));
            names.push(name);
        }
        Ok(names)
    }

    /// One user's events within `[lower, upper]` bounds, of one name or all, in timeline order
    /// (or reversed). Reads only that user's keys: one range per event name, merged.
    pub fn timeline(
        &self,
        user_id: &str,
        name: Option<&str>,
        lower: Bound<TimelinePos>,
        upper: Bound<TimelinePos>,
        newest_first: bool,
    ) -> Result<TimelineIter, StoreError> {
        let names = match name {
            Some(n) => vec![n.to_string()],
            None => self.user_event_names(user_id)?,
        };
        let mut ranges = Vec::with_capacity(names.len());
        for name in &names {
            let prefix = named_prefix(user_id, name);
            let map = |b: Bound<TimelinePos>| match b {
                Bound::Included(p) => Bound::Included(named_key(user_id, name, p)),
                Bound::Excluded(p) => Bound::Excluded(named_key(user_id, name, p)),
                Bound::Unbounded => Bound::Unbounded,
            };
            let lo = match map(lower) {
                Bound::Unbounded => Bound::Included(prefix.clone()),
                b => b,
            };
            let hi = match map(upper) {
                Bound::Unbounded => Bound::Excluded(end_of(&prefix)),
                b => b,
            };
            let iter = self.tree.range::<Vec<u8>, _>((lo, hi));
            let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send> =
                if newest_first {
                    Box::new(iter.rev())
                } else {
                    Box::new(iter)
                };
            ranges.push((prefix.len(), iter.peekable()));
        }
        Ok(TimelineIter { ranges, newest_first })
    }

    /// A user's running aggregates for one event name.
    pub fn user_aggregate(&self, user_id: &str, name: &str) -> Result<Option<UserNameAggregate>, StoreError> {
        let key = pair(AGGREGATE, user_id, name);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Positions of a user's events of one name with `occurred_at` in `(after, until]`
    /// (`after` `None`: from the beginning), oldest first. Reads only those keys.
    pub fn named_positions(
        &self,
        user_id: &str,
        name: &str,
        after: Option<Timestamp>,
        until: Timestamp,
    ) -> impl Iterator<Item = Result<TimelinePos, StoreError>> + '_ {
        let prefix = named_prefix(user_id, name);
        let plen = prefix.len();
        let lo = match after {
            // Every event at `after` sorts before (after, u64::MAX].
            Some(t) => Bound::Excluded(named_key(user_id, name, (t, u64::MAX))),
            None => Bound::Included(prefix.clone()),
        };
        let hi = Bound::Included(named_key(user_id, name, (until, u64::MAX)));
        self.tree.range::<Vec<u8>, _>((lo, hi)).map(move |kv| {
            let (k, _) = kv?;
            decode_ts(&k, &k[plen..])
        })
    }

    /// Every event of a user, with its key, grouped by name.
    pub fn user_events(
        &self,
        user_id: &str,
    ) -> impl Iterator<Item = Result<(sled::IVec, Event), StoreError>> + '_ {
        let mut prefix = prefixed(TIMELINE, user_id);
        prefix.push(0);
        self.tree.scan_prefix(prefix).map(|kv| {
            let (k, v) = kv?;
            let event = decode(&k, &v)?;
            Ok((k, event))
        })
    }

    /// A user's fired actions (still in the log), with their by-user index key.
    pub fn user_actions(
        &self,
        user_id: &str,
    ) -> impl Iterator<Item = Result<(sled::IVec, FiredAction), StoreError>> + '_ {
        let mut prefix = prefixed(USER_ACTION, user_id);
        prefix.push(0);
        self.tree.scan_prefix(prefix).filter_map(move |kv| {
            let step = || -> Result<Option<(sled::IVec, FiredAction)>, StoreError> {
                let (k, _) = kv?;
                let seq = decode_u64(&k, &k[k.len() - 8..])?;
                match self.tree.get(action_key(seq))? {
                    Some(v) => Ok(Some((k, decode(&action_key(seq), &v)?))),
                    None => Ok(None),
                }
            };
            step().transpose()
        })
    }

    /// All of a user's events of one name, oldest first.
    pub fn named_events(
        &self,
        user_id: &str,
        name: &str,
    ) -> impl Iterator<Item = Result<Event, StoreError>> + '_ {
        self.tree.scan_prefix(named_prefix(user_id, name)).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }

    /// The event of `user_id` named `name` at a timeline position.
    pub fn event_at(&self, user_id: &str, name: &str, pos: TimelinePos) -> Result<Option<Event>, StoreError> {
        let key = named_key(user_id, name, pos);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// A trigger's firing state for one user.
    pub fn firing_state(&self, trigger_id: &str, user_id: &str) -> Result<Option<FiringState>, StoreError> {
        let key = pair(FIRING, trigger_id, user_id);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// The keys of every firing state of a trigger (to delete them with the trigger).
    pub fn firing_state_keys(&self, trigger_id: &str) -> Result<Vec<sled::IVec>, StoreError> {
        let mut prefix = prefixed(FIRING, trigger_id);
        prefix.push(0);
        self.tree
            .scan_prefix(prefix)
            .keys()
            .map(|k| k.map_err(StoreError::from))
            .collect()
    }

    /// A consumer's acknowledged position.
    pub fn consumer(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let key = prefixed(CONSUMER, name);
        self.tree.get(&key)?.map(|v| decode_u64(&key, &v)).transpose()
    }

    /// Up to `limit` actions with sequences from `from` to `to` inclusive, in order.
    pub fn actions(&self, from: u64, to: u64, limit: usize) -> Result<Vec<FiredAction>, StoreError> {
        if from > to {
            return Ok(Vec::new());
        }
        self.tree
            .range(action_key(from)..=action_key(to))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// The oldest action kept, if any.
    pub fn first_action(&self) -> Result<Option<FiredAction>, StoreError> {
        match self.tree.scan_prefix([ACTION]).next() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(decode(&k, &v)?))
            }
            None => Ok(None),
        }
    }

    /// Actions newest first with sequence below `before`, all or those of one user or trigger.
    pub fn actions_newest_first(
        &self,
        owner: ActionOwner<'_>,
        before: u64,
        limit: usize,
    ) -> Result<Vec<FiredAction>, StoreError> {
        let (prefix, tag) = match owner {
            ActionOwner::All => {
                return self
                    .tree
                    .range(action_key(0)..action_key(before))
                    .rev()
                    .take(limit)
                    .map(|kv| {
                        let (k, v) = kv?;
                        decode(&k, &v)
                    })
                    .collect();
            }
            ActionOwner::User(u) => (u, USER_ACTION),
            ActionOwner::Trigger(t) => (t, TRIGGER_ACTION),
        };
        let lo = seq_index_key(tag, prefix, 0);
        let hi = seq_index_key(tag, prefix, before);
        let mut out = Vec::new();
        for kv in self.tree.range(lo..hi).rev() {
            let (k, _) = kv?;
            let seq = decode_u64(&k, &k[k.len() - 8..])?;
            if let Some(v) = self.tree.get(action_key(seq))? {
                out.push(decode(&k, &v)?);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Adds to `batch` the deletion of up to `max` actions from the start of the log fired
    /// before `cutoff`, with their index entries. Returns how many.
    pub fn expire_actions(
        &self,
        batch: &mut WriteBatch,
        cutoff: Timestamp,
        max: usize,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.tree.scan_prefix([ACTION]).take(max) {
            let (k, v) = kv?;
            let action: FiredAction = decode(&k, &v)?;
            if action.fired_at >= cutoff {
                break;
            }
            batch.batch.remove(k);
            batch
                .batch
                .remove(seq_index_key(USER_ACTION, &action.user_id, action.sequence));
            batch
                .batch
                .remove(seq_index_key(TRIGGER_ACTION, &action.trigger_id, action.sequence));
            batch.writes += 3;
            n += 1;
        }
        Ok(n)
    }
}

type KvIter = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send>;

/// A user's events in timeline order: a merge of one range per event name.
pub struct TimelineIter {
    /// Per event name: the key prefix length and the range.
    ranges: Vec<(usize, std::iter::Peekable<KvIter>)>,
    newest_first: bool,
}

impl Iterator for TimelineIter {
    type Item = Result<Event, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut best: Option<(usize, TimelinePos)> = None;
        for (i, (plen, range)) in self.ranges.iter_mut().enumerate() {
            let pos = match range.peek() {
                None => continue,
                Some(Ok((k, _))) => match decode_ts(k, &k[*plen..]) {
                    Ok(p) => p,
                    Err(e) => return Some(Err(e)),
                },
                Some(Err(_)) => match range.next() {
                    Some(Err(e)) => return Some(Err(e.into())),
                    _ => continue,
                },
            };
            let better = match best {
                None => true,
                Some((_, b)) => (pos > b) == self.newest_first && pos != b,
            };
            if better {
                best = Some((i, pos));
            }
        }
        let (i, _) = best?;
        match self.ranges[i].1.next()? {
            Ok((k, v)) => Some(decode(&k, &v)),
            Err(e) => Some(Err(e.into())),
        }
    }
}

/// Whose actions to list.
#[derive(Clone, Copy, Debug)]
pub enum ActionOwner<'a> {
    All,
    User(&'a str),
    Trigger(&'a str),
}

/// A store in a temporary directory, for unit tests (the guard keeps the directory).
#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = StoreOptions {
        cache_capacity: 64 << 20,
        flush_every_ms: 500,
    };
    let store = Store::open(dir.path(), &opts).expect("open");
    (dir, store)
}
