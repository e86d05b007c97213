//! Rollups: per event name, every user's all-history aggregates (count, and count/sum/min/max
//! of each NUMBER attribute), packed 4096 users per key (`Y`), with what they cover (`X`).
//! FilterUsers answers an all-history condition without `where` from the rollup plus the
//! events it does not cover yet; the writer rebuilds a rollup when a query finds it missing or
//! lagging.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use super::super::codec::{decode, encode};
use super::super::keys::*;
use super::super::{Store, StoreError, WriteBatch};
use super::{hour_of, Block, Columns, ValueRef, STAGE_HOUR};
use crate::domain::model::{NumberAggregate, Timestamp};

/// Users per rollup chunk.
const ROLLUP_CHUNK: usize = 4096;

/// What a name's rollup covers: every event with `sequence <= sequence` and
/// `occurred_at <= cutoff`, where `cutoff` is the latest date among them (events dated after the
/// rebuild wait for the next one). A rollup answers "all history up to as_of" for any
/// `as_of >= cutoff`, with the events it does not cover added.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RollupMeta {
    pub sequence: u64,
    pub cutoff: Timestamp,
    pub users: u64,
}

/// One user's all-history aggregates of one name in a rollup chunk, borrowed from the chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RollupEntry<'a> {
    #[serde(borrow)]
    pub user_id: &'a str,
    pub count: u64,
    /// Per NUMBER attribute, by name.
    #[serde(borrow)]
    pub numbers: Vec<(&'a str, NumberAggregate)>,
}

/// A consistent view of a name for an all-history query: its rollup and every block that may
/// hold events it does not cover (see `written`).
pub(crate) struct RollupView {
    pub meta: RollupMeta,
    pub chunks: Vec<RollupChunk>,
    pub blocks: Vec<Block>,
    /// Every block of the name had to be read (the rollup is older than the start): a rebuild
    /// makes the next read cheap.
    pub every_block: bool,
}

/// One stored rollup chunk.
pub(crate) struct RollupChunk {
    key: sled::IVec,
    bytes: sled::IVec,
}

impl RollupChunk {
    /// The chunk's entries, by user id ascending, borrowed from it.
    pub(crate) fn entries(&self) -> Result<Vec<RollupEntry<'_>>, StoreError> {
        decode_rollup_chunk(&self.key, &self.bytes)
    }
}

impl RollupView {
    /// True when a block may hold events the rollup does not cover: a newer sequence, or a
    /// date after its cutoff (an hour block is judged by its hour, a stage block, which may
    /// hold any hour's records, by its latest record).
    pub(crate) fn is_delta_block(&self, block: &Block) -> Result<bool, StoreError> {
        if block.max_sequence()? > self.meta.sequence {
            return Ok(true);
        }
        if block.hour()? == STAGE_HOUR {
            return Ok(block.last_time()?.is_some_and(|t| t > self.meta.cutoff));
        }
        Ok(block.hour()? >= hour_of(self.meta.cutoff))
    }

    /// True when an event is not covered by the rollup.
    pub(crate) fn is_delta(&self, sequence: u64, occurred_at: Timestamp) -> bool {
        sequence > self.meta.sequence || occurred_at > self.meta.cutoff
    }
}

/// The entries of a rollup chunk, by user id ascending.
fn decode_rollup_chunk<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<RollupEntry<'a>>, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::corrupt(key, e))
}

/// One user's events not covered by the old rollup, while a rollup is rebuilt (borrowed from
/// the blocks; a user has few NUMBER attributes, so a list beats a map).
#[derive(Default)]
struct Delta<'a> {
    count: u64,
    numbers: Vec<(&'a str, NumberAggregate)>,
}

/// The aggregate of `attr` in a user's list, added empty when missing.
fn number_slot<'l, 'a>(
    numbers: &'l mut Vec<(&'a str, NumberAggregate)>,
    attr: &'a str,
) -> &'l mut NumberAggregate {
    let i = match numbers.iter().position(|(k, _)| *k == attr) {
        Some(i) => i,
        None => {
            numbers.push((attr, NumberAggregate::default()));
            numbers.len() - 1
        }
    };
    &mut numbers[i].1
}

impl<'a> Delta<'a> {
    /// Adds these events to a user's old entry.
    fn merge_into(self, entry: &mut RollupEntry<'a>) {
        entry.count += self.count;
        for (attr, agg) in self.numbers {
            number_slot(&mut entry.numbers, attr).merge(&agg);
        }
        entry.numbers.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }

    /// The entry of a user the old rollup did not hold.
    fn into_entry(mut self, user_id: &'a str) -> RollupEntry<'a> {
        self.numbers.sort_unstable_by(|a, b| a.0.cmp(b.0));
        RollupEntry {
            user_id,
            count: self.count,
            numbers: self.numbers,
        }
    }
}

impl Store {
    /// The rollup of `name` (if any) with its chunks and the name's blocks that may hold events
    /// it does not cover (see [`RollupView`]), read together.
    pub(crate) fn rollup_view(&self, name: &str) -> Result<Option<RollupView>, StoreError> {
        self.read_index_consistently(true, || self.rollup_view_unlocked(name))
    }

    /// [`Store::rollup_view`], for a caller that holds the index lock or is the writer.
    fn rollup_view_unlocked(&self, name: &str) -> Result<Option<RollupView>, StoreError> {
        let meta_key = prefixed(ROLLUP_META, name);
        let Some(meta) = self.tree.get(&meta_key)? else {
            return Ok(None);
        };
        let meta: RollupMeta = decode(&meta_key, &meta)?;
        let chunks = self
            .tree
            .scan_prefix(under(ROLLUP, name))
            .map(|kv| kv.map(|(key, bytes)| RollupChunk { key, bytes }))
            .collect::<Result<_, _>>()?;
        let (blocks, every_block) = match self.blocks_after(name, meta.sequence, meta.cutoff)? {
            Some(blocks) => (blocks, false),
            None => (self.all_blocks(name)?, true),
        };
        Ok(Some(RollupView {
            meta,
            chunks,
            blocks,
            every_block,
        }))
    }

    /// Computes the rollup of `name` covering every applied event up to `last_sequence` dated
    /// up to `now`: the previous rollup plus the events it does not cover. Reads only, so it
    /// runs away from the writer; what it read is consistent (blocks and rollup are read under
    /// the index lock, with the count of index content changes at that moment), and the writer
    /// writes the result only if nothing changed the content since ([`ComputedRollup::write`]).
    pub(crate) fn compute_rollup(
        &self,
        name: &str,
        last_sequence: u64,
        now: Timestamp,
    ) -> Result<ComputedRollup, StoreError> {
        let (old, all_blocks, changes) = {
            let _reading = self.index.read();
            let old = self.rollup_view_unlocked(name)?;
            let blocks = match old {
                Some(_) => None,
                None => Some(self.all_blocks(name)?),
            };
            (old, blocks, self.index_content_changes())
        };
        // Events dated after `now` wait for a later rebuild; never before the old cutoff, though
        // (a clock stepped back would leave those between the two treated as covered).
        let now = old.as_ref().map_or(now, |v| now.max(v.meta.cutoff));
        // The events the old rollup does not cover, per user, borrowed from the blocks.
        let mut delta: FxHashMap<&str, Delta> = FxHashMap::default();
        // The latest date covered: a rollup answers any as_of from there on.
        let mut cutoff = old.as_ref().map(|v| v.meta.cutoff);
        let blocks = match (&old, &all_blocks) {
            (Some(view), _) => &view.blocks,
            (None, Some(blocks)) => blocks,
            (None, None) => return Err(StoreError::corrupt(name.as_bytes(), "no blocks read")),
        };
        for block in blocks {
            if let Some(view) = &old {
                if !view.is_delta_block(block)? {
                    continue;
                }
            }
            for (row, _) in block.split()? {
                let covered_before = old
                    .as_ref()
                    .is_some_and(|v| !v.is_delta(row.sequence, row.occurred_at));
                if covered_before || row.occurred_at > now || row.sequence > last_sequence {
                    continue;
                }
                cutoff = Some(cutoff.map_or(row.occurred_at, |c| c.max(row.occurred_at)));
                let entry = delta.entry(row.user_id).or_default();
                entry.count += 1;
                for (attr, value) in row.attributes()? {
                    if let ValueRef::Number(n) = value {
                        number_slot(&mut entry.numbers, attr).add(n);
                    }
                }
            }
        }
        // Nothing new since the old rollup: its chunks stand as they are, nothing to rewrite.
        // Its sequence moves up to what was read (so the next read skips the blocks read now).
        if let (Some(view), true) = (&old, delta.is_empty()) {
            return Ok(ComputedRollup {
                name: name.to_string(),
                old_meta: Some(view.meta),
                chunks: None,
                meta: RollupMeta {
                    sequence: view.meta.sequence.max(last_sequence),
                    ..view.meta
                },
                changes,
            });
        }
        let mut delta: Vec<(&str, Delta)> = delta.into_iter().collect();
        delta.sort_unstable_by(|a, b| a.0.cmp(b.0));
        // The old entries (by user, chunk after chunk) and the delta (by user), merged in one
        // pass into chunks of ROLLUP_CHUNK, all borrowed.
        let mut old_chunks = Vec::new();
        let mut old_entries: Vec<RollupEntry> = Vec::new();
        if let Some(view) = &old {
            for chunk in &view.chunks {
                old_entries.extend(chunk.entries()?);
                old_chunks.push(chunk.key.to_vec());
            }
        }
        let users = old_entries.len() + delta.len();
        let mut merged: Vec<RollupEntry> = Vec::with_capacity(users);
        let mut news = delta.into_iter().peekable();
        for mut entry in old_entries {
            while let Some((user_id, d)) = news.next_if(|(user_id, _)| *user_id < entry.user_id) {
                merged.push(d.into_entry(user_id));
            }
            if let Some((_, d)) = news.next_if(|(user_id, _)| *user_id == entry.user_id) {
                d.merge_into(&mut entry);
            }
            merged.push(entry);
        }
        merged.extend(news.map(|(user_id, d)| d.into_entry(user_id)));
        let mut chunks = Vec::with_capacity(merged.len().div_ceil(ROLLUP_CHUNK));
        for chunk in merged.chunks(ROLLUP_CHUNK) {
            if let Some(first) = chunk.first() {
                chunks.push((rollup_chunk_key(name, first.user_id), encode(&chunk)));
            }
        }
        let users = merged.len();
        let meta = RollupMeta {
            sequence: last_sequence,
            // Covering nothing, it answers any as_of.
            cutoff: cutoff.unwrap_or(Timestamp::from_nanos(i128::MIN)),
            users: users as u64,
        };
        Ok(ComputedRollup {
            name: name.to_string(),
            old_meta: old.as_ref().map(|v| v.meta),
            chunks: Some((old_chunks, chunks)),
            meta,
            changes,
        })
    }
}

/// The keys of a rollup's old chunks and its new chunks (key, bytes).
type ChunkRewrite = (Vec<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>);

/// A rollup computed by [`Store::compute_rollup`], waiting to be written by the writer.
pub(crate) struct ComputedRollup {
    name: String,
    /// What the rollup it replaces covered (`None`: there was none).
    old_meta: Option<RollupMeta>,
    /// The chunks to rewrite: the keys of the old ones and the new ones; `None` when the old
    /// rollup covers every event there is (only its meta is written, if its sequence moved).
    chunks: Option<ChunkRewrite>,
    meta: RollupMeta,
    /// [`Store::index_content_changes`] when its blocks were read.
    changes: u64,
}

impl ComputedRollup {
    /// Adds the rollup to `batch`, replacing the old one, if nothing changed the index's
    /// content since it was read (an erasure anywhere, or this name's rollup replaced: its stored
    /// meta is no longer the one read); otherwise `None`, and it must be computed again. Only
    /// the writer may call this (so nothing changes in between).
    pub(crate) fn write(
        self,
        store: &Store,
        batch: &mut WriteBatch,
    ) -> Result<Option<RollupMeta>, StoreError> {
        let meta_key = prefixed(ROLLUP_META, &self.name);
        let current: Option<RollupMeta> = match store.tree.get(&meta_key)? {
            Some(v) => Some(decode(&meta_key, &v)?),
            None => None,
        };
        if store.index_content_changes() != self.changes || current != self.old_meta {
            return Ok(None);
        }
        let rewrites = self.chunks.is_some();
        if let Some((old, new)) = self.chunks {
            for key in old {
                batch.remove_raw(key);
            }
            for (key, value) in new {
                batch.put_raw(key, value);
            }
        }
        if rewrites || Some(self.meta) != self.old_meta {
            batch.put_raw(meta_key, encode(&self.meta));
            // Moves records between chunk keys; another name's rollup being computed stays true.
            batch.moves_rollups();
        }
        Ok(Some(self.meta))
    }
}

impl Columns {
    /// Rebuilds the rollup of `name` on the writer (see [`Store::compute_rollup`]); the writer
    /// is the only one that changes the index, so this always succeeds.
    pub(crate) fn refresh_rollup(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        name: &str,
        last_sequence: u64,
        now: Timestamp,
    ) -> Result<RollupMeta, StoreError> {
        store
            .compute_rollup(name, last_sequence, now)?
            .write(store, batch)?
            .ok_or_else(|| {
                StoreError::corrupt(
                    name.as_bytes(),
                    "index records moved during a rollup rebuild on the writer",
                )
            })
    }

    /// Removes `user` from the rollups of `names`.
    pub(crate) fn erase_from_rollups(
        &mut self,
        store: &Store,
        batch: &mut WriteBatch,
        user: &str,
        names: &BTreeSet<String>,
    ) -> Result<(), StoreError> {
        for name in names {
            let meta_key = prefixed(ROLLUP_META, name);
            let Some(meta) = store.tree.get(&meta_key)? else {
                continue;
            };
            let mut meta: RollupMeta = decode(&meta_key, &meta)?;
            let prefix = under(ROLLUP, name);
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
            batch.changes_index_content();
        }
        Ok(())
    }
}
