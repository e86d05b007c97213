//! The by-name event index ("columns") and the statistics buckets: what FilterUsers and
//! GetEventStats read instead of scanning every event.
//!
//! sled pays about 2 µs per item on a range scan whatever the item's size (measured on this
//! project's machines: 100 000 one-event items took 200 ms, 800 blocks holding the same events
//! 0.5 ms). So the index packs events into **blocks**: every event of a name is copied, as a
//! compact [`Record`] (user, time, sequence, attributes), into a block of that name and UTC hour.
//! A query over a window reads the blocks of the hours the window touches and decodes records
//! without copying them (about 0.3 µs each).
//!
//! Blocks are written per write group, one per (name, hour) the group touches, and merged
//! size-tiered: when an hour holds [`FAN_IN`] blocks of one size class (fewer than 8, 64 or 512
//! records), they are merged into one, and a block of [`FULL`] records or more is never merged
//! again. Each record is so rewritten about three times whatever the write pattern, and an hour
//! holds at most `3 × (FAN_IN − 1)` small blocks plus its full ones. The writer remembers the
//! small blocks of the hours it touched (read once per hour from sled on first touch).
//!
//! Statistics buckets hold, per name and UTC minute (`K`) and hour (`H`), the number of events
//! and count/sum/min/max of each NUMBER attribute, updated once per write group per bucket.
//!
//! `W` keys list the users with at least one stored event (FilterUsers' candidates).
//!
//! Every structure here is written in the same batch as the events it describes.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{decode, encode, prefixed, Store, StoreError, WriteBatch};
use crate::model::{Event, NumberAggregate, Timestamp, Value};

const BLOCK: u8 = b'B';
const MINUTE_BUCKET: u8 = b'K';
const HOUR_BUCKET: u8 = b'H';
const USER: u8 = b'W';
const ROLLUP: u8 = b'Y';
const ROLLUP_META: u8 = b'X';

/// Users per rollup chunk.
const ROLLUP_CHUNK: usize = 4096;

/// Blocks of one size class merged at once.
pub const FAN_IN: usize = 8;
/// A block with this many records is full: never merged again.
pub const FULL: usize = 512;

/// Seconds per minute and per hour.
pub const MINUTE: i64 = 60;
pub const HOUR: i64 = 3600;

/// An attribute value as stored in a block, borrowed from the block's bytes. Same encoding as
/// [`Value`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ValueRef<'a> {
    String(&'a str),
    Number(f64),
    Bool(bool),
    Date(Timestamp),
    Json(&'a str),
}

impl<'a> ValueRef<'a> {
    /// Borrows a stored value.
    pub fn of(v: &'a Value) -> Self {
        match v {
            Value::String(s) => ValueRef::String(s),
            Value::Number(n) => ValueRef::Number(*n),
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Date(d) => ValueRef::Date(*d),
            Value::Json(s) => ValueRef::Json(s),
        }
    }

    /// An owned copy.
    pub fn to_value(self) -> Value {
        match self {
            ValueRef::String(s) => Value::String(s.to_string()),
            ValueRef::Number(n) => Value::Number(n),
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Date(d) => Value::Date(d),
            ValueRef::Json(s) => Value::Json(s.to_string()),
        }
    }
}

/// One event in a block: everything a query reads, borrowed from the block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record<'a> {
    #[serde(borrow)]
    pub user_id: &'a str,
    pub occurred_at: Timestamp,
    pub sequence: u64,
    /// By attribute name, ascending.
    #[serde(borrow)]
    pub attributes: Vec<(&'a str, ValueRef<'a>)>,
}

impl<'a> Record<'a> {
    /// The record of a stored event.
    pub fn of(event: &'a Event) -> Self {
        Self {
            user_id: &event.user_id,
            occurred_at: event.occurred_at,
            sequence: event.sequence,
            attributes: event
                .attributes
                .iter()
                .map(|(k, v)| (k.as_str(), ValueRef::of(v)))
                .collect(),
        }
    }

    /// The value of an attribute.
    pub fn get(&self, name: &str) -> Option<ValueRef<'a>> {
        self.attributes
            .binary_search_by(|(k, _)| (*k).cmp(name))
            .ok()
            .map(|i| self.attributes[i].1)
    }
}

/// The head of a [`Record`]: what every query reads. The attributes follow in the encoding.
#[derive(Deserialize)]
struct RecordHead<'a> {
    #[serde(borrow)]
    user_id: &'a str,
    occurred_at: Timestamp,
    sequence: u64,
}

/// A record as read from a block: the head decoded, the attributes only on demand (a COUNT
/// without `where` never decodes them).
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    pub user_id: &'a str,
    pub occurred_at: Timestamp,
    pub sequence: u64,
    attributes: &'a [u8],
}

impl<'a> Row<'a> {
    fn decode(key: &[u8], bytes: &'a [u8]) -> Result<Self, StoreError> {
        let (head, attributes) =
            postcard::take_from_bytes::<RecordHead>(bytes).map_err(|e| corrupt(key, e))?;
        Ok(Self {
            user_id: head.user_id,
            occurred_at: head.occurred_at,
            sequence: head.sequence,
            attributes,
        })
    }

    /// The attributes, by name ascending.
    pub fn attributes(&self) -> Result<Vec<(&'a str, ValueRef<'a>)>, StoreError> {
        postcard::from_bytes(self.attributes).map_err(|e| corrupt(self.user_id.as_bytes(), e))
    }

    /// The whole record.
    pub fn record(&self) -> Result<Record<'a>, StoreError> {
        Ok(Record {
            user_id: self.user_id,
            occurred_at: self.occurred_at,
            sequence: self.sequence,
            attributes: self.attributes()?,
        })
    }
}

/// Per-bucket statistics of one event name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BucketSummary {
    pub events: u64,
    /// Per NUMBER attribute.
    pub numbers: BTreeMap<String, NumberAggregate>,
}

impl BucketSummary {
    /// Adds one event's record.
    pub fn add(&mut self, record: &Record<'_>) {
        self.events += 1;
        for (name, value) in &record.attributes {
            if let ValueRef::Number(n) = value {
                match self.numbers.get_mut(*name) {
                    Some(agg) => agg.add(*n),
                    None => {
                        let mut agg = NumberAggregate::default();
                        agg.add(*n);
                        self.numbers.insert(name.to_string(), agg);
                    }
                }
            }
        }
    }

    /// Adds another summary.
    pub fn merge(&mut self, other: &BucketSummary) {
        self.events += other.events;
        for (name, agg) in &other.numbers {
            self.numbers.entry(name.clone()).or_default().merge(agg);
        }
    }
}

/// The granularity a statistics bucket is kept at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Minute,
    Hour,
}

impl Level {
    pub fn seconds(self) -> i64 {
        match self {
            Level::Minute => MINUTE,
            Level::Hour => HOUR,
        }
    }

    fn prefix(self) -> u8 {
        match self {
            Level::Minute => MINUTE_BUCKET,
            Level::Hour => HOUR_BUCKET,
        }
    }
}

/// The bucket number of `at` at `level` (buckets since the epoch, floored).
pub fn bucket_of(at: Timestamp, level: Level) -> i64 {
    at.secs.div_euclid(level.seconds())
}

fn bucket_key(prefix: u8, name: &str, bucket: i64) -> Vec<u8> {
    let mut k = prefixed(prefix, name);
    k.push(0);
    k.extend_from_slice(&((bucket as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// `B` name 0x00: the prefix of every block of a name.
fn block_prefix(name: &str) -> Vec<u8> {
    let mut k = prefixed(BLOCK, name);
    k.push(0);
    k
}

fn block_key(name: &str, hour: i64, blockno: u64) -> Vec<u8> {
    let mut k = bucket_key(BLOCK, name, hour);
    k.extend_from_slice(&blockno.to_be_bytes());
    k
}

fn decode_bucket(key: &[u8], prefix_len: usize) -> Result<i64, StoreError> {
    let bytes: [u8; 8] = key
        .get(prefix_len..prefix_len + 8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_vec(),
            reason: "bucket key too short".into(),
        })?;
    Ok((u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
}

fn blockno_of(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key
        .len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .ok_or_else(|| corrupt(key, "block key too short"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The rows of a block, in (time, sequence) order, borrowed from `bytes`; none when the block
/// holds no record in `[from, to]` (checked on its first and last record only: blocks are
/// sorted by time, and a block written by one group spans seconds, so most blocks of an hour
/// that a range only partly covers are skipped undecoded).
pub fn decode_block<'a>(
    key: &[u8],
    bytes: &'a [u8],
    from: Option<Timestamp>,
    to: Timestamp,
) -> Result<Vec<Row<'a>>, StoreError> {
    let records = block_records(key, bytes)?;
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(Vec::new());
    };
    let (first, last) = (Row::decode(key, first)?, Row::decode(key, last)?);
    if first.occurred_at > to || from.is_some_and(|f| last.occurred_at < f) {
        return Ok(Vec::new());
    }
    records.into_iter().map(|r| Row::decode(key, r)).collect()
}

/// A block as stored: the highest sequence among its records (so a reader can tell whether it
/// holds anything newer than a rollup without decoding it), then one encoded [`Record`] per
/// byte string, so a reader can skip a record's attributes.
#[derive(Serialize, Deserialize)]
struct BlockBytes<'a> {
    max_sequence: u64,
    #[serde(borrow)]
    records: Vec<&'a [u8]>,
}

fn block_records<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<&'a [u8]>, StoreError> {
    let block: BlockBytes = postcard::from_bytes(bytes).map_err(|e| corrupt(key, e))?;
    Ok(block.records)
}

/// The highest sequence in a block, from its header.
pub fn block_max_sequence(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let (n, _) = postcard::take_from_bytes::<u64>(bytes).map_err(|e| corrupt(key, e))?;
    Ok(n)
}

/// The hour of a block, from its key.
pub fn block_hour(key: &[u8]) -> Result<i64, StoreError> {
    let at = key
        .len()
        .checked_sub(16)
        .ok_or_else(|| corrupt(key, "block key too short"))?;
    decode_bucket(key, at)
}

/// The number of records in a block, from its header and length prefix.
fn block_len(key: &[u8], bytes: &[u8]) -> Result<usize, StoreError> {
    let (_, rest) = postcard::take_from_bytes::<u64>(bytes).map_err(|e| corrupt(key, e))?;
    let (n, _) = postcard::take_from_bytes::<u32>(rest).map_err(|e| corrupt(key, e))?;
    Ok(n as usize)
}

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_vec(),
        reason: e.to_string(),
    }
}

/// A block's rows with the bytes each record was encoded as. A block is a postcard list of
/// byte strings, one encoded [`Record`] each, so a reader can skip a record's attributes.
fn split_block<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<(Row<'a>, &'a [u8])>, StoreError> {
    block_records(key, bytes)?
        .into_iter()
        .map(|r| Ok((Row::decode(key, r)?, r)))
        .collect()
}

/// A block of encoded records, sorted by (time, sequence) here.
fn build_block(records: &mut [(Timestamp, u64, &[u8])]) -> Vec<u8> {
    records.sort_by_key(|r| (r.0, r.1));
    encode(&BlockBytes {
        max_sequence: records.iter().map(|r| r.1).max().unwrap_or(0),
        records: records.iter().map(|r| r.2).collect(),
    })
}

fn size_class(len: usize) -> usize {
    match len {
        0..8 => 0,
        8..64 => 1,
        _ => 2,
    }
}

/// A small block of an hour: its number, record count and, when not yet in sled, its bytes.
#[derive(Clone, Debug)]
struct SmallBlock {
    blockno: u64,
    len: usize,
    pending: Option<Vec<u8>>,
}

/// An encoded record with its sort key.
type Encoded = (Timestamp, u64, Vec<u8>);

/// What one write group adds to the index: its events' records, bucket contributions and users.
#[derive(Default)]
pub struct ColumnWrites {
    /// name → hour → records.
    records: HashMap<String, HashMap<i64, Vec<Encoded>>>,
    buckets: HashMap<String, HashMap<(Level, i64), BucketSummary>>,
    users: HashSet<String>,
}

impl ColumnWrites {
    /// Adds a newly stored event.
    pub fn add(&mut self, event: &Event) {
        let record = Record::of(event);
        let hour = bucket_of(event.occurred_at, Level::Hour);
        let encoded = (event.occurred_at, event.sequence, encode(&record));
        match self.records.get_mut(&event.name) {
            Some(hours) => hours.entry(hour).or_default().push(encoded),
            None => {
                self.records
                    .entry(event.name.clone())
                    .or_default()
                    .insert(hour, vec![encoded]);
            }
        }
        if !self.buckets.contains_key(&event.name) {
            self.buckets.insert(event.name.clone(), HashMap::new());
        }
        if let Some(buckets) = self.buckets.get_mut(&event.name) {
            // Minutes only: the hours are summed from them when the group is written.
            buckets
                .entry((Level::Minute, bucket_of(event.occurred_at, Level::Minute)))
                .or_default()
                .add(&record);
        }
        if !self.users.contains(&event.user_id) {
            self.users.insert(event.user_id.clone());
        }
    }

    /// True when no event was added.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The writer's view of the index: the small blocks of the hours it touched, and users it
/// knows are registered (so a returning user costs no read).
#[derive(Default)]
pub struct Columns {
    small: HashMap<(String, i64), Vec<SmallBlock>>,
    registered: HashSet<Box<str>>,
}

/// Users remembered as registered before the memory is dropped (about 16 MB at most); a user
/// not remembered costs one read when next seen.
const MAX_REMEMBERED_USERS: usize = 262_144;

/// Hours whose small blocks are remembered before the memory is dropped (and re-read lazily).
const MAX_REMEMBERED_HOURS: usize = 100_000;

impl Columns {
    /// Adds a group's index writes to `batch`: one block per (name, hour), merged with the
    /// hour's small blocks when a size class is full; bucket summaries read, merged and
    /// rewritten; users not yet known registered.
    pub fn write(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        writes: ColumnWrites,
    ) -> Result<(), StoreError> {
        if self.small.len() > MAX_REMEMBERED_HOURS {
            self.small.clear();
        }
        for (name, hours) in writes.records {
            for (hour, records) in hours {
                self.write_hour(store, batch, &name, hour, records)?;
            }
        }
        for (name, mut buckets) in writes.buckets {
            let mut hours: HashMap<i64, BucketSummary> = HashMap::new();
            for ((_, minute), add) in &buckets {
                hours
                    .entry(minute.div_euclid(HOUR / MINUTE))
                    .or_default()
                    .merge(add);
            }
            buckets.extend(hours.into_iter().map(|(hour, s)| ((Level::Hour, hour), s)));
            for ((level, bucket), add) in buckets {
                let key = bucket_key(level.prefix(), &name, bucket);
                let mut summary: BucketSummary = match store.tree.get(&key)? {
                    Some(v) => decode(&key, &v)?,
                    None => BucketSummary::default(),
                };
                summary.merge(&add);
                batch.put_raw(key, encode(&summary));
            }
        }
        if self.registered.len() > MAX_REMEMBERED_USERS {
            self.registered.clear();
        }
        for user in writes.users {
            if self.registered.contains(user.as_str()) {
                continue;
            }
            let key = prefixed(USER, &user);
            if !store.tree.contains_key(&key)? {
                batch.put_raw(key, Vec::new());
            }
            self.registered.insert(user.into_boxed_str());
        }
        Ok(())
    }

    fn write_hour(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        name: &str,
        hour: i64,
        mut records: Vec<Encoded>,
    ) -> Result<(), StoreError> {
        let blockno = records.iter().map(|r| r.1).min().unwrap_or(0);
        let mut parts: Vec<(Timestamp, u64, &[u8])> =
            records.iter_mut().map(|r| (r.0, r.1, r.2.as_slice())).collect();
        let bytes = build_block(&mut parts);
        let len = records.len();
        if len >= FULL {
            batch.put_raw(block_key(name, hour, blockno), bytes);
            return Ok(());
        }
        let slot = (name.to_string(), hour);
        if !self.small.contains_key(&slot) {
            let mut small = Vec::new();
            for kv in store.tree.scan_prefix(bucket_key(BLOCK, name, hour)) {
                let (k, v) = kv?;
                let len = block_len(&k, &v)?;
                if len < FULL {
                    small.push(SmallBlock {
                        blockno: blockno_of(&k)?,
                        len,
                        pending: None,
                    });
                }
            }
            self.small.insert(slot.clone(), small);
        }
        let Some(small) = self.small.get_mut(&slot) else {
            return Ok(());
        };
        small.push(SmallBlock {
            blockno,
            len,
            pending: Some(bytes),
        });
        // Merge while some size class holds FAN_IN blocks.
        while let Some(class) =
            (0..3).find(|c| small.iter().filter(|b| size_class(b.len) == *c).count() >= FAN_IN)
        {
            let (merge, keep): (Vec<SmallBlock>, Vec<SmallBlock>) =
                small.drain(..).partition(|b| size_class(b.len) == class);
            *small = keep;
            let mut stored = Vec::new();
            for b in &merge {
                if b.pending.is_none() {
                    let key = block_key(name, hour, b.blockno);
                    match store.tree.get(&key)? {
                        Some(v) => stored.push((key, v)),
                        None => return Err(corrupt(&key, "a remembered block is missing")),
                    }
                }
            }
            let mut parts: Vec<(Timestamp, u64, &[u8])> = Vec::new();
            for b in &merge {
                if let Some(bytes) = &b.pending {
                    let key = block_key(name, hour, b.blockno);
                    parts.extend(
                        split_block(&key, bytes)?
                            .into_iter()
                            .map(|(r, s)| (r.occurred_at, r.sequence, s)),
                    );
                }
            }
            for (key, v) in &stored {
                parts.extend(
                    split_block(key, v)?
                        .into_iter()
                        .map(|(r, s)| (r.occurred_at, r.sequence, s)),
                );
            }
            let merged = SmallBlock {
                blockno: merge.iter().map(|b| b.blockno).min().unwrap_or(blockno),
                len: parts.len(),
                pending: Some(build_block(&mut parts)),
            };
            for (key, _) in stored {
                batch.remove_raw(key);
            }
            batch.moves_index = true;
            small.push(merged);
        }
        // Write what is new; a full block is forgotten (never merged again).
        let mut i = 0;
        while i < small.len() {
            if let Some(bytes) = small[i].pending.take() {
                batch.put_raw(block_key(name, hour, small[i].blockno), bytes);
            }
            if small[i].len >= FULL {
                small.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Forgets what is remembered of an hour's blocks (after erasure rewrote them).
    pub fn forget(&mut self, name: &str, hour: i64) {
        self.small.remove(&(name.to_string(), hour));
    }
}

impl Columns {
    /// Removes `user`'s records from the blocks of the given (name, hour)s and recomputes those
    /// hours' buckets from what remains (a MIN or MAX cannot be un-added), and unregisters the
    /// user.
    pub fn erase(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        user: &str,
        hours: &std::collections::BTreeSet<(String, i64)>,
    ) -> Result<(), StoreError> {
        for (name, hour) in hours {
            let mut minutes: BTreeMap<i64, BucketSummary> = BTreeMap::new();
            let mut whole = BucketSummary::default();
            for kv in store.tree.scan_prefix(bucket_key(BLOCK, name, *hour)) {
                let (key, value) = kv?;
                let records = split_block(&key, &value)?;
                let before = records.len();
                let mut kept: Vec<(Timestamp, u64, &[u8])> = Vec::with_capacity(before);
                for (row, bytes) in &records {
                    if row.user_id != user {
                        let record = row.record()?;
                        whole.add(&record);
                        minutes
                            .entry(bucket_of(record.occurred_at, Level::Minute))
                            .or_default()
                            .add(&record);
                        kept.push((row.occurred_at, row.sequence, bytes));
                    }
                }
                if kept.is_empty() {
                    batch.remove_raw(key.to_vec());
                    batch.moves_index = true;
                } else if kept.len() != before {
                    batch.put_raw(key.to_vec(), build_block(&mut kept));
                    batch.moves_index = true;
                }
            }
            let first = hour * (HOUR / MINUTE);
            for kv in store.tree.range(
                bucket_key(MINUTE_BUCKET, name, first)
                    ..bucket_key(MINUTE_BUCKET, name, first + HOUR / MINUTE),
            ) {
                let (key, _) = kv?;
                batch.remove_raw(key.to_vec());
            }
            for (minute, summary) in &minutes {
                batch.put_raw(bucket_key(MINUTE_BUCKET, name, *minute), encode(summary));
            }
            let key = bucket_key(HOUR_BUCKET, name, *hour);
            if whole.events == 0 {
                batch.remove_raw(key);
            } else {
                batch.put_raw(key, encode(&whole));
            }
            self.forget(name, *hour);
        }
        batch.remove_raw(prefixed(USER, user));
        self.registered.remove(user);
        Ok(())
    }
}

impl Store {
    /// The blocks of `name` for the hours `from_hour..=to_hour`, in hour order: a consistent
    /// set (no merge moves records between them while they are read).
    pub fn blocks(
        &self,
        name: &str,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        let lo = bucket_key(BLOCK, name, from_hour);
        let hi = bucket_key(BLOCK, name, to_hour.saturating_add(1));
        let _reading = self.index.read().unwrap_or_else(|e| e.into_inner());
        Ok(self.tree.range(lo..hi).collect::<Result<_, _>>()?)
    }

    /// The non-empty statistics buckets of `name` at `level` in `from..to` (bucket numbers).
    pub fn buckets(
        &self,
        level: Level,
        name: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, BucketSummary)>, StoreError> {
        let prefix_len = name.len() + 2;
        let mut out = Vec::new();
        for kv in self
            .tree
            .range(bucket_key(level.prefix(), name, from)..bucket_key(level.prefix(), name, to))
        {
            let (k, v) = kv?;
            out.push((decode_bucket(&k, prefix_len)?, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Every user with at least one stored event, ascending.
    pub fn users(&self) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
        self.tree.scan_prefix([USER]).map(|kv| {
            let (k, _) = kv?;
            Ok(String::from_utf8_lossy(&k[1..]).into_owned())
        })
    }

    /// True when the by-name index was built (by this version, or by a backfill at start).
    pub fn columns_built(&self) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(META_COLUMNS)?)
    }

    /// Removes every index key (before a backfill, which a crash may have interrupted).
    pub fn clear_columns(&self) -> Result<(), StoreError> {
        for prefix in [BLOCK, MINUTE_BUCKET, HOUR_BUCKET, USER, ROLLUP, ROLLUP_META] {
            loop {
                let keys: Vec<sled::IVec> = self
                    .tree
                    .scan_prefix([prefix])
                    .keys()
                    .take(10_000)
                    .collect::<Result<_, _>>()?;
                if keys.is_empty() {
                    break;
                }
                let mut batch = sled::Batch::default();
                for k in keys {
                    batch.remove(k);
                }
                self.tree.apply_batch(batch)?;
            }
        }
        Ok(())
    }

    /// Every stored event, in key order (for the one-time index backfill).
    pub fn all_events(&self) -> impl Iterator<Item = Result<Event, StoreError>> + '_ {
        self.tree.scan_prefix([super::TIMELINE]).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }
}

/// Marks the by-name index as built.
pub(super) const META_COLUMNS: &[u8] = b"Mcolumns";

impl WriteBatch {
    /// Marks the by-name index as built.
    pub fn put_columns_built(&mut self) {
        self.put_raw(META_COLUMNS.to_vec(), vec![1]);
    }
}

/// What a name's rollup covers: every event with `sequence <= sequence` and
/// `occurred_at <= cutoff`, where `cutoff` is the latest date among them (events dated after the
/// rebuild wait for the next one). A rollup answers "all history up to as_of" for any
/// `as_of >= cutoff`, with the events it does not cover added.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollupMeta {
    pub sequence: u64,
    pub cutoff: Timestamp,
    pub users: u64,
}

/// One user's all-history aggregates of one name in a rollup chunk, borrowed from the chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollupEntry<'a> {
    #[serde(borrow)]
    pub user_id: &'a str,
    pub count: u64,
    /// Per NUMBER attribute, by name.
    #[serde(borrow)]
    pub numbers: Vec<(&'a str, NumberAggregate)>,
}

/// A consistent view of a name for an all-history query: its rollup and every block.
pub struct RollupView {
    pub meta: RollupMeta,
    pub chunks: Vec<(sled::IVec, sled::IVec)>,
    pub blocks: Vec<(sled::IVec, sled::IVec)>,
}

impl RollupView {
    /// True when a block may hold events the rollup does not cover.
    pub fn is_delta_block(&self, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        Ok(block_max_sequence(key, value)? > self.meta.sequence
            || block_hour(key)? >= bucket_of(self.meta.cutoff, Level::Hour))
    }

    /// True when an event is not covered by the rollup.
    pub fn is_delta(&self, sequence: u64, occurred_at: Timestamp) -> bool {
        sequence > self.meta.sequence || occurred_at > self.meta.cutoff
    }
}

/// The entries of a rollup chunk, by user id ascending.
pub fn decode_rollup_chunk<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<RollupEntry<'a>>, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(key, e))
}

fn rollup_chunk_key(name: &str, first_user: &str) -> Vec<u8> {
    let mut k = prefixed(ROLLUP, name);
    k.push(0);
    k.extend_from_slice(first_user.as_bytes());
    k
}

fn rollup_prefix(name: &str) -> Vec<u8> {
    let mut k = prefixed(ROLLUP, name);
    k.push(0);
    k
}

/// Owned aggregates of one user while a rollup is rebuilt.
#[derive(Default)]
struct OwnedEntry {
    count: u64,
    numbers: BTreeMap<String, NumberAggregate>,
}

impl Store {
    /// The rollup of `name` (if any) with its chunks and all the name's blocks, read together.
    pub fn rollup_view(&self, name: &str) -> Result<Option<RollupView>, StoreError> {
        let _reading = self.index.read().unwrap_or_else(|e| e.into_inner());
        let meta_key = prefixed(ROLLUP_META, name);
        let Some(meta) = self.tree.get(&meta_key)? else {
            return Ok(None);
        };
        let meta: RollupMeta = decode(&meta_key, &meta)?;
        let chunks = self
            .tree
            .scan_prefix(rollup_prefix(name))
            .collect::<Result<_, _>>()?;
        let blocks = self
            .tree
            .scan_prefix(block_prefix(name))
            .collect::<Result<_, _>>()?;
        Ok(Some(RollupView { meta, chunks, blocks }))
    }
}

impl Columns {
    /// Rebuilds the rollup of `name` to cover every applied event (`last_sequence`) dated up to
    /// `now`: the previous rollup plus the events it does not cover, written in chunks of
    /// [`ROLLUP_CHUNK`] users that replace the old ones atomically.
    pub fn refresh_rollup(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        name: &str,
        last_sequence: u64,
        now: Timestamp,
    ) -> Result<RollupMeta, StoreError> {
        let old = store.rollup_view(name)?;
        let mut users: BTreeMap<String, OwnedEntry> = BTreeMap::new();
        // The latest date covered: a rollup answers any as_of from there on.
        let mut cutoff = old.as_ref().map(|v| v.meta.cutoff);
        let blocks: Vec<(sled::IVec, sled::IVec)> = match &old {
            Some(view) => {
                for (key, value) in &view.chunks {
                    for e in decode_rollup_chunk(key, value)? {
                        let entry = users.entry(e.user_id.to_string()).or_default();
                        entry.count += e.count;
                        for (attr, agg) in e.numbers {
                            entry.numbers.entry(attr.to_string()).or_default().merge(&agg);
                        }
                    }
                    batch.remove_raw(key.to_vec());
                }
                view.blocks.clone()
            }
            None => store
                .tree
                .scan_prefix(block_prefix(name))
                .collect::<Result<_, _>>()?,
        };
        for (key, value) in &blocks {
            if let Some(view) = &old {
                if !view.is_delta_block(key, value)? {
                    continue;
                }
            }
            for (row, _) in split_block(key, value)? {
                let covered_before = old
                    .as_ref()
                    .is_some_and(|v| !v.is_delta(row.sequence, row.occurred_at));
                if covered_before || row.occurred_at > now || row.sequence > last_sequence {
                    continue;
                }
                cutoff = Some(cutoff.map_or(row.occurred_at, |c| c.max(row.occurred_at)));
                let entry = users.entry(row.user_id.to_string()).or_default();
                entry.count += 1;
                for (attr, value) in row.attributes()? {
                    if let ValueRef::Number(n) = value {
                        entry.numbers.entry(attr.to_string()).or_default().add(n);
                    }
                }
            }
        }
        let all: Vec<(&String, &OwnedEntry)> = users.iter().collect();
        for chunk in all.chunks(ROLLUP_CHUNK) {
            let entries: Vec<RollupEntry> = chunk
                .iter()
                .map(|(user, e)| RollupEntry {
                    user_id: user.as_str(),
                    count: e.count,
                    numbers: e.numbers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
                })
                .collect();
            if let Some(first) = entries.first() {
                batch.put_raw(rollup_chunk_key(name, first.user_id), encode(&entries));
            }
        }
        let meta = RollupMeta {
            sequence: last_sequence,
            // Covering nothing, it answers any as_of.
            cutoff: cutoff.unwrap_or(Timestamp::from_nanos(i128::MIN)),
            users: users.len() as u64,
        };
        batch.put_raw(prefixed(ROLLUP_META, name), encode(&meta));
        batch.moves_index = true;
        Ok(meta)
    }

    /// Removes `user` from the rollups of `names`.
    pub fn erase_from_rollups(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        user: &str,
        names: &std::collections::BTreeSet<String>,
    ) -> Result<(), StoreError> {
        for name in names {
            let meta_key = prefixed(ROLLUP_META, name);
            let Some(meta) = store.tree.get(&meta_key)? else {
                continue;
            };
            let mut meta: RollupMeta = decode(&meta_key, &meta)?;
            let prefix = rollup_prefix(name);
            let Some(kv) = store
                .tree
                .range(prefix.clone()..=rollup_chunk_key(name, user))
                .next_back()
            else {
                continue;
            };
            let (key, value) = kv?;
            let mut entries = decode_rollup_chunk(&key, &value)?;
            let before = entries.len();
            entries.retain(|e| e.user_id != user);
            if entries.len() == before {
                continue;
            }
            // A chunk is keyed by its first user: when that was the erased user, the chunk moves
            // to its new first user's key (the old key holds the erased id).
            batch.remove_raw(key.to_vec());
            if let Some(first) = entries.first() {
                batch.put_raw(rollup_chunk_key(name, first.user_id), encode(&entries));
            }
            meta.users = meta.users.saturating_sub(1);
            batch.put_raw(meta_key, encode(&meta));
            batch.moves_index = true;
        }
        Ok(())
    }
}
