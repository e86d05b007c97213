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
//! | `T`    | `T` user_id 0x00 occurred_at(12) sequence(8)     | postcard [`Event`]          |
//! | `I`    | `I` event_id                                     | sequence(8) (client ids only) |
//! | `A`    | `A` attribute name                               | postcard [`AttributeDefinition`] |
//! | `S`    | `S` event name                                   | postcard [`EventNameStats`] |
//! | `M`    | `M` meta name (`event_seq`)                      | u64(8)                      |
//!
//! The timeline key puts the user first so one user's events are one contiguous range (a
//! timeline read never touches other users), then time and sequence so the range is already in
//! timeline order. User ids may not contain NUL, so the 0x00 terminator keeps users apart and
//! keeps the keys ordered by user id.

use std::ops::Bound;
use std::path::Path;

use crate::model::{AttributeDefinition, Event, EventNameStats, Timestamp};

const TIMELINE: u8 = b'T';
const EVENT_ID: u8 = b'I';
const ATTRIBUTE: u8 = b'A';
const NAME_STATS: u8 = b'S';
const META_EVENT_SEQ: &[u8] = b"Mevent_seq";

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
}

/// Everything the ingest engine keeps in memory, read once at start-up.
#[derive(Debug, Default)]
pub struct LoadedState {
    pub last_event_seq: u64,
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

fn user_prefix(user_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user_id.len() + 22);
    k.push(TIMELINE);
    k.extend_from_slice(user_id.as_bytes());
    k.push(0);
    k
}

fn timeline_key(user_id: &str, pos: TimelinePos) -> Vec<u8> {
    let mut k = user_prefix(user_id);
    k.extend_from_slice(&encode_ts(pos.0));
    k.extend_from_slice(&pos.1.to_be_bytes());
    k
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
}

impl WriteBatch {
    /// Stores an event on its user's timeline.
    pub fn put_event(&mut self, event: &Event) {
        let key = timeline_key(&event.user_id, (event.occurred_at, event.sequence));
        self.batch.insert(key, encode(event));
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

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.writes == 0
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_capacity)
            .flush_every_ms(Some(opts.flush_every_ms.max(1)))
            .open()?;
        let tree = db.open_tree("engage")?;
        Ok(Self { db, tree })
    }

    /// Reads the state the ingest engine keeps in memory.
    pub fn load_state(&self) -> Result<LoadedState, StoreError> {
        let mut state = LoadedState::default();
        if let Some(v) = self.tree.get(META_EVENT_SEQ)? {
            state.last_event_seq = decode_u64(META_EVENT_SEQ, &v)?;
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
        self.tree.apply_batch(batch.batch)?;
        Ok(())
    }

    /// Makes every write applied before this call durable. Blocking; call it from one thread at a
    /// time per group (see NOTES: concurrent `flush_async` deadlocks in sled 0.34.7).
    pub fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    /// One user's events within `[lower, upper]` bounds, in timeline order (or reversed),
    /// reading only that user's keys.
    pub fn timeline(
        &self,
        user_id: &str,
        lower: Bound<TimelinePos>,
        upper: Bound<TimelinePos>,
        newest_first: bool,
    ) -> impl Iterator<Item = Result<Event, StoreError>> + '_ {
        let prefix = user_prefix(user_id);
        let map = |b: Bound<TimelinePos>| match b {
            Bound::Included(p) => Bound::Included(timeline_key(user_id, p)),
            Bound::Excluded(p) => Bound::Excluded(timeline_key(user_id, p)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let lo = match map(lower) {
            Bound::Unbounded => Bound::Included(prefix.clone()),
            b => b,
        };
        let hi = match map(upper) {
            Bound::Unbounded => {
                // The user's keys all start with `prefix`, whose last byte is 0x00.
                let mut end = prefix.clone();
                if let Some(last) = end.last_mut() {
                    *last = 1;
                }
                Bound::Excluded(end)
            }
            b => b,
        };
        let iter = self.tree.range::<Vec<u8>, _>((lo, hi));
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if newest_first {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        };
        iter.map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }
}
