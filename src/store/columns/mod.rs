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
//! Statistics buckets hold, per name and UTC hour (`H`), the number of events and
//! count/sum/min/max of each NUMBER attribute, updated once per write group per bucket. Minutes
//! are not kept: a minute's figures are computed from the hour's blocks when asked for. (Per-minute
//! buckets, `K`, held 2.6 events each on the 1M-event benchmark, 389 500 keys, and a late
//! event cost a read and a write of its minute's; [`super::migrate`] removes them from older
//! directories.)
//!
//! **The stage.** Events that arrive out of time order (an offline queue flushed, a backfill,
//! retries) touch many hours with one or two records each: written directly, each would cost a
//! block, a statistics bucket read and write, and a share of merges (about 2.6 sled operations
//! per event, estimated from the merge scheme, not counted). So a write group's records of a (name, hour) with fewer than [`STAGE_BELOW`] of them
//! go to the name's **stage** instead: blocks under the sentinel hour [`STAGE_HOUR`], merged
//! size-tiered like an hour's. Staged records are not in the hour buckets. When a name's stage
//! holds [`DRAIN_AT`] records, the group that reaches it drains the stage: its records go to
//! their hours' blocks and buckets and the stage's blocks are removed, in one batch (which moves
//! index records, so queries see either the stage or the hours, see `Store::apply`). Every
//! reader of a name's blocks reads its stage blocks with them ([`Store::blocks`]); statistics
//! add the stage's records in range to the hour buckets, all read together
//! ([`Store::index_view`]).
//!
//! `W` keys list the users with at least one stored event (FilterUsers' candidates).
//!
//! Every structure here is written in the same batch as the events it describes.

use std::collections::{BTreeSet, HashMap, HashSet};

mod block;
mod buckets;
mod rollup;
mod written;
pub(crate) use rollup::RollupMeta;
pub(crate) use written::WrittenHours;

pub(crate) use block::{Block, Record, Row, ValueRef};
pub(crate) use buckets::{hour_of, BucketSummary};

use super::codec::{decode, encode};
use super::keys::*;
use super::{Store, StoreError, WriteBatch};
use crate::domain::model::{Event, Timestamp};
use block::{block_len, build_block, split_block};

/// Blocks of one size class merged at once.
pub(crate) const FAN_IN: usize = 8;
/// A block with this many records is full: never merged again.
pub(crate) const FULL: usize = 512;

/// The hour of a name's stage blocks (no event is dated in it: hours are seconds / 3600).
pub(crate) const STAGE_HOUR: i64 = i64::MAX;
/// A write group's records of one (name, hour) go to the stage when fewer than this.
pub(crate) const STAGE_BELOW: usize = 8;
/// A name's stage is drained into its hours when it would hold this many records: on a month
/// of data (720 hours), about 90 records per hour and drain, so an hour of late events should
/// end up in one or two blocks, as one of events sent in time order does (by arithmetic; a
/// smaller threshold took no less disk, BENCHMARKS.md issue 14).
pub(crate) const DRAIN_AT: usize = 65_536;

/// Seconds per minute and per hour.
pub(crate) const MINUTE: i64 = 60;
pub(crate) const HOUR: i64 = 3600;

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

/// A consistent read of one name's index (see [`Store::index_view`]).
#[derive(Default)]
pub(crate) struct IndexView {
    /// The non-empty hour statistics buckets asked for, by hour.
    pub summaries: Vec<(i64, BucketSummary)>,
    /// The hour blocks asked for, in hour order.
    pub blocks: Vec<Block>,
    /// The stage's blocks: records of any hour, not counted in the buckets.
    pub stage: Vec<Block>,
}

impl IndexView {
    /// The hour blocks, then the stage's.
    fn into_blocks(self) -> Vec<Block> {
        let mut blocks = self.blocks;
        blocks.extend(self.stage);
        blocks
    }
}

/// An encoded record with its sort key.
type Encoded = (Timestamp, u64, Vec<u8>);

/// What one write group adds to the index: its events' records, bucket contributions and users.
#[derive(Default)]
pub(crate) struct ColumnWrites {
    /// name → hour → records.
    records: HashMap<String, HashMap<i64, Vec<Encoded>>>,
    /// name → hour → the group's contribution to the hour's statistics.
    buckets: HashMap<String, HashMap<i64, BucketSummary>>,
    users: HashSet<String>,
}

impl ColumnWrites {
    /// Adds a newly stored event.
    pub(crate) fn add(&mut self, event: &Event) {
        let record = Record::of(event);
        let hour = hour_of(event.occurred_at);
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
            buckets.entry(hour).or_default().add(&record);
        }
        if !self.users.contains(&event.user_id) {
            self.users.insert(event.user_id.clone());
        }
    }

    /// True when no event was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The writer's view of the index: the small blocks of the hours it touched, and users it
/// knows are registered (so a returning user costs no read).
pub(crate) struct Columns {
    small: HashMap<(String, i64), Vec<SmallBlock>>,
    registered: HashSet<Box<str>>,
    /// Records in each name's stage (read from sled on first touch).
    staged: HashMap<String, usize>,
    /// [`DRAIN_AT`], smaller in tests.
    drain_at: usize,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            small: HashMap::new(),
            registered: HashSet::new(),
            staged: HashMap::new(),
            drain_at: DRAIN_AT,
        }
    }
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
    pub(crate) fn write(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        writes: ColumnWrites,
    ) -> Result<(), StoreError> {
        if self.small.len() > MAX_REMEMBERED_HOURS {
            self.small.clear();
        }
        let mut all_buckets = writes.buckets;
        for (name, mut hours) in writes.records {
            let buckets = all_buckets.entry(name.clone()).or_default();
            let late: usize = hours.values().map(Vec::len).filter(|n| *n < STAGE_BELOW).sum();
            if late > 0 {
                let staged = self.staged_len(store, &name)?;
                if staged + late >= self.drain_at {
                    // Everything of the name goes to its hours, the stage's records with it.
                    self.drain_stage(store, batch, &name, &mut hours, buckets)?;
                } else {
                    let mut stage = Vec::with_capacity(late);
                    hours.retain(|hour, records| {
                        if records.len() >= STAGE_BELOW {
                            return true;
                        }
                        buckets.remove(hour);
                        stage.append(records);
                        false
                    });
                    self.staged.insert(name.clone(), staged + late);
                    self.write_hour(store, batch, &name, STAGE_HOUR, stage)?;
                }
            }
            for (hour, records) in hours {
                self.write_hour(store, batch, &name, hour, records)?;
            }
        }
        for (name, hours) in all_buckets {
            for (hour, add) in hours {
                let key = bucket_key(HOUR_BUCKET, &name, hour);
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
        // Full blocks of FULL records each are written as they are (never merged again), so a
        // drain or a large group makes no value near what sled would put in an unsynced blob
        // file; the rest is a small block.
        if records.len() >= FULL {
            records.sort_unstable_by_key(|r| (r.0, r.1));
        }
        while records.len() >= FULL {
            let rest = records.split_off(FULL);
            let full = std::mem::replace(&mut records, rest);
            let (blockno, bytes) = encode_block(&full);
            put_block(store, batch, name, hour, blockno, bytes);
        }
        if records.is_empty() {
            return Ok(());
        }
        let (blockno, bytes) = encode_block(&records);
        let len = records.len();
        let slot = (name.to_string(), hour);
        self.remember_hour(store, &slot)?;
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
            let merged = merge_blocks(store, batch, name, hour, merge, blockno)?;
            small.push(merged);
        }
        // Write what is new; a full block is forgotten (never merged again).
        let mut i = 0;
        while i < small.len() {
            if let Some(bytes) = small[i].pending.take() {
                put_block(store, batch, name, hour, small[i].blockno, bytes);
            }
            if small[i].len >= FULL {
                small.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Reads which small blocks an hour holds from sled, the first time the writer touches it.
    fn remember_hour(&mut self, store: &Store, slot: &(String, i64)) -> Result<(), StoreError> {
        if self.small.contains_key(slot) {
            return Ok(());
        }
        let mut small = Vec::new();
        for kv in store.tree.scan_prefix(bucket_key(BLOCK, &slot.0, slot.1)) {
            let (k, v) = kv?;
            let len = match block_len(&k, &v) {
                Ok(len) => len,
                Err(e) => {
                    // Not remembered, so never merged: a drain or an erasure drops it, and a
                    // query reading it answers the error.
                    tracing::error!(error = %e, "an index block's header does not decode");
                    continue;
                }
            };
            if len < FULL {
                small.push(SmallBlock {
                    blockno: blockno_of(&k)?,
                    len,
                    pending: None,
                });
            }
        }
        self.small.insert(slot.clone(), small);
        Ok(())
    }

    /// Forgets what is remembered of an hour's blocks (after erasure rewrote them).
    pub(crate) fn forget(&mut self, name: &str, hour: i64) {
        self.small.remove(&(name.to_string(), hour));
        if hour == STAGE_HOUR {
            self.staged.remove(name);
        }
    }

    /// Columns whose stages drain at `drain_at` records (for tests).
    #[cfg(test)]
    pub(crate) fn draining_at(drain_at: usize) -> Self {
        Self {
            drain_at,
            ..Self::default()
        }
    }

    /// The number of records in `name`'s stage.
    fn staged_len(&mut self, store: &Store, name: &str) -> Result<usize, StoreError> {
        if let Some(n) = self.staged.get(name) {
            return Ok(*n);
        }
        let mut n = 0;
        for kv in store.tree.scan_prefix(bucket_key(BLOCK, name, STAGE_HOUR)) {
            let (k, v) = kv?;
            // A block whose header does not decode counts as empty; the next drain drops it.
            n += block_len(&k, &v).unwrap_or(0);
        }
        self.staged.insert(name.to_string(), n);
        Ok(n)
    }

    /// Moves every record of `name`'s stage into `hours` (and its statistics into `buckets`),
    /// removing the stage's blocks in `batch`. Every stage block is in sled: a group's are
    /// written by its own batch, applied before the next group is indexed (checked against the
    /// blocks remembered, so a second call on one batch is an error, not a double count). A
    /// block that does not decode is dropped with an error logged (its events stay in their
    /// users' timelines; only their index copy is lost), so one damaged block does not stop
    /// the writer.
    fn drain_stage(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        name: &str,
        hours: &mut HashMap<i64, Vec<Encoded>>,
        buckets: &mut HashMap<i64, BucketSummary>,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut drained = 0usize;
        let mut seen = HashSet::new();
        for kv in store.tree.scan_prefix(bucket_key(BLOCK, name, STAGE_HOUR)) {
            let (key, value) = kv?;
            seen.insert(blockno_of(&key)?);
            batch.remove_raw(key.to_vec());
            let rows = match decoded_records(&key, &value) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(name, error = %e, "a damaged stage block was dropped from the index");
                    // Records leave the index: a rollup computed before must not be written.
                    batch.changes_index_content();
                    continue;
                }
            };
            for (record, bytes) in rows {
                let hour = hour_of(record.occurred_at);
                buckets.entry(hour).or_default().add(&record);
                let encoded = (record.occurred_at, record.sequence, bytes.to_vec());
                hours.entry(hour).or_default().push(encoded);
                drained += 1;
            }
        }
        if let Some(small) = self.small.get(&(name.to_string(), STAGE_HOUR)) {
            if let Some(b) = small.iter().find(|b| !seen.contains(&b.blockno)) {
                return Err(StoreError::corrupt(
                    &block_key(name, STAGE_HOUR, b.blockno),
                    "a remembered stage block is not stored (indexed twice in one batch?)",
                ));
            }
        }
        self.forget(name, STAGE_HOUR);
        self.staged.insert(name.to_string(), 0);
        batch.moves_index();
        tracing::info!(
            name,
            records = drained,
            hours = hours.len(),
            ms = started.elapsed().as_millis() as u64,
            "stage drained"
        );
        Ok(())
    }
}

/// Puts a block, noting its hour and highest sequence first (see `written`): every block write
/// that adds records goes through here, before its batch is applied, so no reader sees such a
/// block not noted. (An erasure rewrites blocks with records removed, whose sequences were
/// noted when written or are from before the start.)
fn put_block(store: &Store, batch: &mut WriteBatch, name: &str, hour: i64, blockno: u64, bytes: Vec<u8>) {
    let key = block_key(name, hour, blockno);
    // Bytes just built always decode; were they not, the block counts as newer than any rollup.
    let max_sequence = block::block_max_sequence(&key, &bytes).unwrap_or(u64::MAX);
    store.written.lock().note(name, hour, max_sequence);
    batch.put_raw(key, bytes);
}

/// A block of `records`, numbered by their lowest sequence.
fn encode_block(records: &[Encoded]) -> (u64, Vec<u8>) {
    let blockno = records.iter().map(|r| r.1).min().unwrap_or(0);
    let mut parts: Vec<(Timestamp, u64, &[u8])> =
        records.iter().map(|r| (r.0, r.1, r.2.as_slice())).collect();
    (blockno, build_block(&mut parts))
}

/// Every record of a block, decoded whole, with the bytes it is encoded as (so a block that
/// does not decode is found before any of its records is used).
fn decoded_records<'a>(key: &[u8], value: &'a [u8]) -> Result<Vec<(Record<'a>, &'a [u8])>, StoreError> {
    split_block(key, value)?
        .into_iter()
        .map(|(row, bytes)| Ok((row.record()?, bytes)))
        .collect()
}

/// Merges the small blocks `merge` of one hour into one (pending, numbered by the lowest of
/// them), removing the stored ones in `batch`.
fn merge_blocks(
    store: &Store,
    batch: &mut WriteBatch,
    name: &str,
    hour: i64,
    merge: Vec<SmallBlock>,
    blockno: u64,
) -> Result<SmallBlock, StoreError> {
    let mut stored = Vec::new();
    for b in &merge {
        if b.pending.is_none() {
            let key = block_key(name, hour, b.blockno);
            match store.tree.get(&key)? {
                Some(v) => stored.push((key, v)),
                None => return Err(StoreError::corrupt(&key, "a remembered block is missing")),
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
    batch.moves_index();
    Ok(merged)
}

impl Columns {
    /// Removes `user`'s records from the blocks of the given (name, hour)s and of those names'
    /// stages, recomputes those hours' buckets from what remains (a MIN or MAX cannot be un-added), and unregisters the
    /// user.
    pub(crate) fn erase(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        user: &str,
        hours: &BTreeSet<(String, i64)>,
    ) -> Result<(), StoreError> {
        // The user's records may also wait in the stages of their names.
        let stages: BTreeSet<(String, i64)> =
            hours.iter().map(|(name, _)| (name.clone(), STAGE_HOUR)).collect();
        for (name, hour) in hours.iter().chain(&stages) {
            let mut whole = BucketSummary::default();
            for kv in store.tree.scan_prefix(bucket_key(BLOCK, name, *hour)) {
                let (key, value) = kv?;
                let records = match decoded_records(&key, &value) {
                    Ok(records) => records,
                    Err(e) => {
                        // Whose records it holds cannot be told: dropped, so that erasure
                        // neither stops nor leaves the user's records behind.
                        tracing::error!(name, error = %e, "a damaged index block was dropped during an erasure");
                        batch.remove_raw(key.to_vec());
                        batch.changes_index_content();
                        continue;
                    }
                };
                let before = records.len();
                let mut kept: Vec<(Timestamp, u64, &[u8])> = Vec::with_capacity(before);
                for (record, bytes) in &records {
                    if record.user_id != user {
                        whole.add(record);
                        kept.push((record.occurred_at, record.sequence, bytes));
                    }
                }
                if kept.is_empty() {
                    batch.remove_raw(key.to_vec());
                    batch.changes_index_content();
                } else if kept.len() != before {
                    batch.put_raw(key.to_vec(), build_block(&mut kept));
                    batch.changes_index_content();
                }
            }
            self.forget(name, *hour);
            if *hour == STAGE_HOUR {
                continue;
            }
            let key = bucket_key(HOUR_BUCKET, name, *hour);
            if whole.events == 0 {
                batch.remove_raw(key);
            } else {
                batch.put_raw(key, encode(&whole));
            }
        }
        batch.remove_raw(prefixed(USER, user));
        self.registered.remove(user);
        Ok(())
    }
}

impl Store {
    /// What a query reads of `name`'s index, in one consistent read (no merge or drain moves
    /// records between its parts while they are read; see [`Store::read_index_consistently`]):
    /// the hour buckets of the hours `summaries`, the hour blocks of each of `block_hours`
    /// (inclusive ranges, not overlapping), and the stage's blocks.
    pub(crate) fn index_view(
        &self,
        name: &str,
        summaries: std::ops::Range<i64>,
        block_hours: &[(i64, i64)],
    ) -> Result<IndexView, StoreError> {
        self.read_index_consistently(false, || {
            self.index_view_unlocked(name, summaries.clone(), block_hours)
        })
    }

    /// [`Store::index_view`], for a caller that holds the index lock or is the writer.
    fn index_view_unlocked(
        &self,
        name: &str,
        summaries: std::ops::Range<i64>,
        block_hours: &[(i64, i64)],
    ) -> Result<IndexView, StoreError> {
        let mut view = IndexView::default();
        if summaries.start < summaries.end {
            let prefix_len = name.len() + 2;
            let (lo, hi) = (
                bucket_key(HOUR_BUCKET, name, summaries.start),
                bucket_key(HOUR_BUCKET, name, summaries.end),
            );
            for kv in self.tree.range(lo..hi) {
                let (k, v) = kv?;
                view.summaries
                    .push((decode_bucket(&k, prefix_len)?, decode(&k, &v)?));
            }
        }
        for &(from, to) in block_hours.iter().filter(|(from, to)| from <= to) {
            let lo = bucket_key(BLOCK, name, from);
            let hi = bucket_key(BLOCK, name, to.min(STAGE_HOUR - 1) + 1);
            for kv in self.tree.range(lo..hi) {
                let (k, v) = kv?;
                view.blocks.push(Block::new(k, v));
            }
        }
        for kv in self.tree.scan_prefix(bucket_key(BLOCK, name, STAGE_HOUR)) {
            let (k, v) = kv?;
            view.stage.push(Block::new(k, v));
        }
        Ok(view)
    }

    /// The blocks of `name` that may hold events a rollup covering up to `sequence` and
    /// `cutoff` does not: those of the hours written above `sequence` since the start, every
    /// hour from the cutoff's on, and the stage (see `written`). `None` when the start does not
    /// know (a rollup older than it): the caller reads every block.
    fn blocks_after(
        &self,
        name: &str,
        sequence: u64,
        cutoff: Timestamp,
    ) -> Result<Option<Vec<Block>>, StoreError> {
        let Some(hours) = self.written.lock().hours_after(name, sequence) else {
            return Ok(None);
        };
        let from = hour_of(cutoff);
        let mut ranges: Vec<(i64, i64)> = hours.into_iter().filter(|h| *h < from).map(|h| (h, h)).collect();
        ranges.push((from, STAGE_HOUR - 1));
        Ok(Some(self.index_view_unlocked(name, 0..0, &ranges)?.into_blocks()))
    }

    /// The blocks of `name` for the hours `from_hour..=to_hour`, in hour order, then its stage's
    /// blocks (which may hold records of any hour): a consistent set (see
    /// [`Store::index_view`]).
    pub(crate) fn blocks(&self, name: &str, from_hour: i64, to_hour: i64) -> Result<Vec<Block>, StoreError> {
        Ok(self
            .index_view(name, 0..0, &[(from_hour, to_hour)])?
            .into_blocks())
    }

    /// Every block of `name`, its stage's included (the caller holds the index lock for
    /// reading, or is the writer).
    fn all_blocks(&self, name: &str) -> Result<Vec<Block>, StoreError> {
        Ok(self
            .tree
            .scan_prefix(under(BLOCK, name))
            .map(|kv| kv.map(|(k, v)| Block::new(k, v)))
            .collect::<Result<_, _>>()?)
    }

    /// Every user with at least one stored event, ascending.
    pub(crate) fn users(&self) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
        self.tree.scan_prefix([USER]).map(|kv| {
            let (k, _) = kv?;
            Ok(String::from_utf8_lossy(&k[1..]).into_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::temp_store;

    fn event(i: u64) -> Event {
        Event {
            event_id: format!("e{i}"),
            user_id: format!("u{}", i % 7),
            name: "n".into(),
            // One per hour: every record goes to the stage.
            occurred_at: Timestamp {
                secs: (1000 + i as i64) * HOUR,
                nanos: 0,
            },
            received_at: Timestamp { secs: 0, nanos: 0 },
            sequence: i,
            attributes: BTreeMap::new(),
        }
    }

    fn write(columns: &mut Columns, store: &Store, i: u64) -> Result<(), StoreError> {
        let mut writes = ColumnWrites::default();
        writes.add(&event(i));
        let mut batch = WriteBatch::default();
        columns.write(store, &mut batch, writes)?;
        store.apply(batch)
    }

    /// A stage block that does not decode (its header, or its records) neither stops the writer
    /// (after a restart too, when the stage is read back) nor survives the next drain; the
    /// other staged records reach their hours.
    #[test]
    fn a_damaged_stage_block_is_dropped_at_the_next_drain() {
        let (_dir, store) = temp_store();
        let mut columns = Columns::draining_at(40);
        for i in 1..=20 {
            write(&mut columns, &store, i).expect("write");
        }
        let stage: Vec<(sled::IVec, sled::IVec)> = store
            .tree
            .scan_prefix(bucket_key(BLOCK, "n", STAGE_HOUR))
            .collect::<Result<_, _>>()
            .expect("scan");
        assert!(stage.len() >= 2, "{} stage blocks", stage.len());
        let lost: usize = stage[..2]
            .iter()
            .map(|(k, v)| block_len(k, v).expect("an intact block"))
            .sum();
        // One block cut to nothing (no header), one with a header and garbage after it.
        store.tree.insert(&stage[0].0, Vec::<u8>::new()).expect("damage");
        let mut garbage = stage[1].1.to_vec();
        garbage.truncate(3);
        store.tree.insert(&stage[1].0, garbage).expect("damage");
        // The writer restarted: it reads the stage back.
        let mut columns = Columns::draining_at(40);
        for i in 21..=60 {
            write(&mut columns, &store, i).expect("a damaged block stops no write");
        }
        let left: usize = store.tree.scan_prefix(bucket_key(BLOCK, "n", STAGE_HOUR)).count();
        assert!(left < stage.len() + 5, "the stage was not drained");
        assert!(store.tree.get(&stage[0].0).expect("read").is_none());
        assert!(store.tree.get(&stage[1].0).expect("read").is_none());
        // Every undamaged record is counted once: in its hour's bucket, or still staged.
        let view = store.index_view("n", 0..10_000, &[(0, 10_000)]).expect("read");
        assert!(!view.summaries.is_empty(), "the drain reached no hour");
        let in_buckets: u64 = view.summaries.iter().map(|(_, s)| s.events).sum();
        let end = Timestamp {
            secs: i64::MAX / 2,
            nanos: 0,
        };
        let rows = |blocks: &[Block]| -> usize {
            blocks
                .iter()
                .map(|b| b.rows(None, end).expect("every block left decodes").len())
                .sum()
        };
        assert_eq!(
            rows(&view.blocks) as u64,
            in_buckets,
            "hour blocks against their buckets"
        );
        assert_eq!(in_buckets as usize + rows(&view.stage), 60 - lost);
    }
}
