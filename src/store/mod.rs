//! Storage: the only code that knows sled and the key layouts.
//!
//! Everything that must change atomically with an event lives in **one** sled tree (`engage`).
//! The engine turns a whole group of requests into one [`WriteBatch`], applies it atomically
//! through a record of the `redo` tree (not sled's `apply_batch`, whose process-wide lock waits
//! for every flush: see [`redo`]), and answers after one shared [`Store::flush`] (group
//! commit). Nothing outside this module names sled: reads answer domain
//! types or this module's own ([`TimelineIter`], [`columns::Block`], ...), never raw keys.
//!
//! Rooms: [`keys`] (every key layout), [`codec`] (value encodings), [`batch`] (the write
//! batch), [`events`] (timelines and per-user reads), [`actions`] (the action log, consumers,
//! firing state), [`columns`] (the by-name index, statistics buckets, rollups), [`timers`]
//! (pending timers), [`destinations`] (destinations, delivery positions, retries, dead letters), [`migrate`] (older on-disk layouts, brought up to date at start), [`redo`]
//! (atomic groups, completed at start after a crash).
//!
//! Key layouts of the `engage` tree (built in [`keys`]; integers big-endian so byte order is
//! numeric order; signed integers and timestamps order-preserving):
//!
//! | prefix | key                                              | value                       |
//! |--------|--------------------------------------------------|-----------------------------|
//! | `T`    | `T` user_id 0x00 name 0x00 occurred_at(12) sequence(8) | postcard [`Event`]    |
//! | `G`    | `G` user_id 0x00 name                            | postcard [`UserNameAggregate`] |
//! | `I`    | `I` event_id                                     | sequence(8) (client ids only) |
//! | `A`    | `A` attribute name                               | postcard [`AttributeDefinition`] |
//! | `S`    | `S` event name                                   | postcard [`EventNameStats`] |
//! | `R`    | `R` trigger_id                                   | postcard [`Trigger`]        |
//! | `N`    | `N` first action sequence(8)                     | postcard chunk of consecutive actions and their events: the action log ([`actions`]) |
//! | `U`    | `U` user_id 0x00 action sequence(8)              | the user's actions in that chunk, a byte each: distance from the key's sequence (empty: that one) |
//! | `V`    | `V` trigger_id 0x00 action sequence(8)           | the same for a trigger      |
//! | `L`    | `L` trigger_id 0x00 user_id                      | postcard [`FiringState`]    |
//! | `C`    | `C` consumer name                                | acknowledged sequence(8), then postcard (created_at, last_acked_at) (older: the 8 bytes alone) |
//! | `E`    | `E` event name                                   | aggregate maintenance epoch(8) |
//! | `B`    | `B` name 0x00 hour(8) block(8)                   | a block of [`columns::Record`]s |
//! | `H`    | `H` name 0x00 hour(8)                            | postcard [`columns::BucketSummary`] |
//! | `W`    | `W` user_id                                      | empty: a user with events   |
//! | `Y`    | `Y` name 0x00 first user_id                      | a chunk of [`columns::RollupEntry`]s (4096 users) |
//! | `X`    | `X` name                                         | postcard [`columns::RollupMeta`] |
//! | `P`    | `P` bucket(2)                                    | postcard list of [`Timer`](crate::domain::model::Timer)s: the pending timers of users hashing there ([`timers`]) |
//! | `Q`    | `Q` minute(8) part(1)                            | buckets with a timer due in that minute ([`timers`]) |
//! | `D`    | `D` user_id                                      | empty: an erasure between two of its slices |
//! | `O`    | `O` destination_id                               | postcard [`Destination`](crate::domain::destination::Destination) ([`destinations`]) |
//! | `J`    | `J` destination_id                               | delivery position(8): every action up to it is delivered, retried or dead-lettered; then postcard distances of the actions after it already settled |
//! | `j`    | `j` destination_id 0x00 action sequence(8)       | postcard [`DeliveryState`](crate::domain::destination::DeliveryState): a pending retry |
//! | `o`    | `o` destination_id 0x00 action sequence(8)       | postcard `DeliveryState`: a dead letter |
//! | `M`    | `M` meta name (`event_seq`, `action_seq`, `columns`) | u64(8); `columns`: 1    |
//!
//! Event names, trigger ids and user ids never contain NUL, so 0x00 separates key parts and
//! keeps each prefix's keys contiguous. The action log is keyed by sequence, so replay is a range
//! scan and retention deletes a prefix. (`F` sequence, one action per key, is the log's layout
//! before chunks; [`migrate`] rewrites it at start.)
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
//! per-hour statistics (`H`; `K`, per-minute, is an older layout that [`migrate`] removes), the user registry (`W`) and, per name, a
//! rollup of every user's all-history aggregates (`Y`, `X`).

mod actions;
mod backup;
mod batch;
mod codec;
pub(crate) mod columns;
mod compact;
mod destinations;
mod events;
mod integrity;
mod keys;
mod migrate;
mod redo;
pub(crate) mod timers;

use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

pub(crate) use actions::ActionOwner;
pub(crate) use batch::WriteBatch;
pub(crate) use codec::encode_event;
pub(crate) use keys::{event_key, TimelinePos};

use crate::domain::model::{AttributeDefinition, EventNameStats, Trigger};
use crate::error::Error;
use codec::{decode, decode_u64};
use integrity::{HighWater, IntegrityError};
use keys::*;

pub(crate) use backup::{restore, Backup};
pub(crate) use compact::compact;
pub(crate) use integrity::Acknowledged;

/// A storage failure: the disk, or data that does not decode.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under key {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
    #[error("{0}")]
    Integrity(#[from] IntegrityError),
    #[error("the data files are damaged: sled failed while opening them ({0}); restore the data directory from a backup")]
    Damaged(String),
    /// An operation refused as asked (a backup target not empty, an interrupted compaction).
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// A record under `key` that does not decode.
    pub(crate) fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            key: key.to_vec(),
            reason: reason.to_string(),
        }
    }
}

/// A storage failure is the server's fault: answered as INTERNAL (and logged in full).
impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Internal(e.to_string())
    }
}

/// Storage tuning.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// sled's page cache in bytes (counts on-disk bytes, not RAM).
    pub cache_capacity: u64,
    /// sled's background flush interval; keeps its GC running too.
    pub flush_every_ms: u64,
    /// Whether a data directory created by this open is compressed (see [`sled_config`]).
    pub compress_new: bool,
    /// Serve a data directory that lost acknowledged writes (and record what it holds as the
    /// new high-water mark) instead of refusing to start.
    pub accept_data_loss: bool,
    /// Keys a backup copies per slice (each slice holds writes while it is copied).
    pub backup_slice_keys: usize,
}

/// What the one-shot commands (compact, restore) and the unit tests open a store with.
impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_capacity: 64 << 20,
            flush_every_ms: 500,
            compress_new: true,
            accept_data_loss: false,
            backup_slice_keys: 10_000,
        }
    }
}

/// The sled database behind engage.
#[derive(Clone)]
pub(crate) struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// The records of write groups being applied (see `redo`).
    redo: sled::Tree,
    next_redo: Arc<std::sync::atomic::AtomicU64>,
    /// Held for writing while a batch that rewrites or removes index blocks is applied, and for
    /// reading while a query collects blocks: a sled range scan is not a snapshot, and a merge
    /// that moves records between keys under a running scan would hide them from it.
    index: Arc<RwLock<()>>,
    /// Incremented before and after each batch that moves index records is applied (so odd
    /// while one is): a reader that sees it even and unchanged across its reads saw no move
    /// (see [`Store::read_index_consistently`]).
    index_moves: Arc<std::sync::atomic::AtomicU64>,
    /// The same for batches that rewrite rollup chunks.
    rollup_moves: Arc<std::sync::atomic::AtomicU64>,
    /// Batches that changed the by-name index's content so far (see
    /// [`Store::index_content_changes`]).
    content_changes: Arc<std::sync::atomic::AtomicU64>,
    backup_slice_keys: usize,
    /// Whether the data directory is compressed (so are its backups).
    compressed: bool,
    /// What was acknowledged as durable (see `integrity`).
    high_water: Arc<Mutex<HighWater>>,
    /// A backup being taken, if any (see `backup`).
    backup: Arc<Mutex<Option<backup::InProgress>>>,
    /// The hours of each name with blocks written since the start (see `columns::written`).
    written: Arc<Mutex<columns::WrittenHours>>,
}

/// Everything the engine keeps in memory, read once at start-up.
#[derive(Debug, Default)]
pub(crate) struct LoadedState {
    pub last_event_seq: u64,
    /// Aggregate maintenance epochs by event name.
    pub epochs: Vec<(String, u64)>,
    pub last_action_seq: u64,
    pub triggers: Vec<Trigger>,
    pub attributes: Vec<AttributeDefinition>,
    pub event_names: Vec<(String, EventNameStats)>,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// The directory's lock may still be held for a moment by a process (or, in one process, a
    /// database handle) that just closed it: sled releases it from a background thread. So a
    /// held lock is retried for up to 5 s before the error is returned.
    pub(crate) fn open(dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        let before = compact::sibling(dir, "before-compaction");
        if before.exists() {
            return Err(StoreError::Refused(compact::interrupted(dir, &before)));
        }
        let (config, compressed) = sled_config(dir, opts.compress_new)?;
        let config = config
            .cache_capacity(opts.cache_capacity)
            .flush_every_ms(Some(opts.flush_every_ms.max(1)));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match open_without_panic(&config)? {
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
        // Groups a crash interrupted are completed before anything is read.
        let redo = db.open_tree(redo::TREE)?;
        let recovered = redo::recover(&tree, &redo)?;
        if recovered > 0 {
            db.flush()?;
            tracing::info!(groups = recovered, "completed write groups a stop interrupted");
        }
        let (mut high_water, acked) = match HighWater::open(dir) {
            Err(IntegrityError::Damaged { .. }) if opts.accept_data_loss => {
                let _ = std::fs::remove_file(dir.join(integrity::FILE_NAME));
                HighWater::open(dir)?
            }
            other => other?,
        };
        let found = Acknowledged {
            event_seq: read_u64(&tree, META_EVENT_SEQ)?,
            action_seq: read_u64(&tree, META_ACTION_SEQ)?,
        };
        if let Some(acked) = acked {
            match high_water.check(found, acked) {
                Err(lost) if opts.accept_data_loss => {
                    tracing::warn!(error = %lost, "serving a data directory that lost acknowledged writes (--accept-data-loss)");
                    high_water
                        .reset(found)
                        .map_err(|e| StoreError::Damaged(e.to_string()))?;
                }
                checked => checked?,
            }
        }
        Ok(Self {
            db,
            tree,
            redo,
            next_redo: Default::default(),
            index: Default::default(),
            index_moves: Default::default(),
            rollup_moves: Default::default(),
            content_changes: Default::default(),
            backup_slice_keys: opts.backup_slice_keys.max(1),
            compressed,
            high_water: Arc::new(Mutex::new(high_water)),
            backup: Default::default(),
            written: Arc::new(Mutex::new(columns::WrittenHours::new(found.event_seq))),
        })
    }

    /// Records `now` as acknowledged: call it after the flush that made it durable, before
    /// answering (see `integrity`).
    pub(crate) fn record_durable(&self, now: Acknowledged) -> std::io::Result<()> {
        self.high_water.lock().record(now)
    }

    /// Reads the state the engine keeps in memory.
    pub(crate) fn load_state(&self) -> Result<LoadedState, StoreError> {
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
            state.triggers.push(migrate::decode_trigger(&k, &v)?);
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

    /// How many batches that change what the by-name index holds (an erasure's records) were
    /// applied so far. Block merges only move records, and appends add
    /// ones with higher sequences, so a consistent read of the index (taken under its lock)
    /// stays true for the events it covered while this has not changed.
    pub(crate) fn index_content_changes(&self) -> u64 {
        self.content_changes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `read` so that no batch moving index records (and, with `rollups`, none
    /// rewriting rollup chunks) is applied in the middle of it: optimistically first (twice,
    /// unlocked, checking the move counters around it), then under the index lock. A reader
    /// of blocks and statistics so never waits for a rollup being written.
    pub(crate) fn read_index_consistently<T>(
        &self,
        rollups: bool,
        read: impl Fn() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let moves = || {
            let index = self.index_moves.load(SeqCst);
            let rollup = if rollups {
                self.rollup_moves.load(SeqCst)
            } else {
                0
            };
            (index, rollup)
        };
        for _ in 0..2 {
            let before = moves();
            if before.0 % 2 == 1 || before.1 % 2 == 1 {
                break;
            }
            let out = read()?;
            if moves() == before {
                return Ok(out);
            }
        }
        let _reading = self.index.read();
        read()
    }

    /// Applies a batch atomically across crashes (see [`redo`]); visible at once (a reader may
    /// see it half applied for the moment it takes), durable after the next [`Store::flush`].
    pub(crate) fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (ops, moves) = batch.into_parts();
        // A backup in progress gets the writes to keys it has already copied (see `backup`).
        let mut mirror = self.backup.lock();
        let mirrored = mirror.as_ref().map(|m| m.mirror(&ops));
        if moves.index || moves.rollups {
            use std::sync::atomic::Ordering::SeqCst;
            let _moving = self.index.write();
            if moves.content {
                self.content_changes.fetch_add(1, SeqCst);
            }
            let counters = [
                (moves.index, &self.index_moves),
                (moves.rollups, &self.rollup_moves),
            ];
            for (moved, counter) in counters {
                if moved {
                    counter.fetch_add(1, SeqCst);
                }
            }
            let applied = redo::apply(&self.tree, &self.redo, &self.next_redo, &ops);
            for (moved, counter) in counters {
                if moved {
                    counter.fetch_add(1, SeqCst);
                }
            }
            applied?;
        } else {
            redo::apply(&self.tree, &self.redo, &self.next_redo, &ops)?;
        }
        if let (Some(m), Some(mirrored)) = (mirror.as_mut(), mirrored) {
            // The live write is applied: a failing backup must not turn it into an error.
            if let Err(e) = m.apply(mirrored) {
                tracing::error!(error = %e, "writing to the backup failed; the backup is abandoned");
                mirror.take();
            }
        }
        Ok(())
    }

    /// Makes every write applied before this call durable. Blocking; call it from one thread
    /// at a time (concurrent `flush_async` calls deadlock in sled 0.34.7).
    pub(crate) fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }
}

/// An 8-byte counter of the tree, 0 when absent.
fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    match tree.get(key)? {
        Some(v) => decode_u64(key, &v),
        None => Ok(0),
    }
}

thread_local! {
    /// Set while sled opens damaged files on this thread: its panic is answered as an error,
    /// and printing it (with a backtrace) is skipped.
    static OPENING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// sled's segment size for new data directories. sled writes any page whose image exceeds a
/// quarter of a segment (128 KiB at its default 512 KiB) to a blob file of its own, which it
/// never fsyncs; and a leaf of 17 index blocks or action chunks is several times that. Measured
/// at the default: 245 blob files (99 MB, ~440 KB each, none fsynced) after 30 000 events in
/// 10 s. At 8 MiB a page of up to 2 MiB stays in the log, fsynced with every flush.
const SEGMENT_SIZE: usize = 8 << 20;

/// sled's own default, which every data directory made before [`SEGMENT_SIZE`] was written with.
const SLED_DEFAULT_SEGMENT_SIZE: usize = 512 << 10;

/// zstd's level for new data directories. sled compresses every log message it writes (each
/// insert's delta and each page image): one million events of the `segments` benchmark took
/// 1130 MB uncompressed and 252 MB at level 1, whose live keys and values are 187 MB (most of
/// the difference is sled's not yet reclaimed page versions, which shrink with the rest).
/// Higher levels gained little (level 3: 226 MB) for more CPU on the writer; see BENCHMARKS.md.
const COMPRESSION_LEVEL: i32 = 1;

/// The sled configuration of the data directory `dir`: what it recorded when it was made (sled
/// refuses to open a directory with another segment size or compression), and for a new one
/// (no data file yet) [`SEGMENT_SIZE`] and, with `compress_new`, compression at
/// [`COMPRESSION_LEVEL`]. A directory with data but no readable record is refused: sled would
/// write a new record from whatever it is given and then misread the data (or, with another
/// segment size, truncate it). Older sleds never fsynced `conf`, so a crash could cut it;
/// engage's sled fsyncs it when it writes it. Answers the configuration and whether it is
/// compressed.
pub(super) fn sled_config(dir: &Path, compress_new: bool) -> Result<(sled::Config, bool), StoreError> {
    // The file ends in a binary checksum: read as text lossily.
    let conf = std::fs::read(dir.join("conf")).ok();
    let recorded = |name: &str| {
        conf.as_ref().and_then(|conf| {
            String::from_utf8_lossy(conf)
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        })
    };
    let size = recorded("segment_size: ").and_then(|v| v.parse::<usize>().ok());
    let compressed = recorded("use_compression: ").and_then(|v| v.parse::<bool>().ok());
    let has_data = std::fs::metadata(dir.join("db")).is_ok_and(|m| m.len() > 0);
    let (size, compressed) = match (size, compressed) {
        (Some(size), Some(compressed)) => (size, compressed),
        _ if has_data => {
            return Err(StoreError::Refused(format!(
                "{}: the file `conf` is missing or damaged, and sled cannot read the data without \
                 it. Write it back before starting, with the values the directory was made with \
                 and four trailing bytes sled reads as a checksum, e.g. `printf \
                 'segment_size: {SEGMENT_SIZE}\\nuse_compression: true\\nversion: 0.34\\n\\0\\0\\0\\0' \
                 > conf`: directories made by engage before 2026-12-02 used segment_size \
                 {SLED_DEFAULT_SEGMENT_SIZE} and no compression, those of 2026-12-02 \
                 {SEGMENT_SIZE} and no compression, later ones {SEGMENT_SIZE} and compression \
                 unless started with `--compression none`",
                dir.display()
            )))
        }
        _ => (SEGMENT_SIZE, compress_new),
    };
    let config = sled::Config::new()
        .path(dir)
        .segment_size(size)
        .use_compression(compressed)
        .compression_factor(COMPRESSION_LEVEL);
    Ok((config, compressed))
}

/// Opens sled, turning a panic of its recovery (which some damaged files cause) into
/// [`StoreError::Damaged`]. The panic hook is wrapped once, to stay silent for those panics only.
fn open_without_panic(config: &sled::Config) -> Result<sled::Result<sled::Db>, StoreError> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !OPENING.with(|o| o.get()) {
                previous(info);
            }
        }));
    });
    OPENING.with(|o| o.set(true));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    OPENING.with(|o| o.set(false));
    opened.map_err(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        StoreError::Damaged(reason)
    })
}

/// A store in a temporary directory, for unit tests (the guard keeps the directory).
#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("open");
    (dir, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leaves full of large values (index blocks, action chunks) are written to sled's log,
    /// which a flush fsyncs, not to blob files, which nothing fsyncs.
    #[test]
    fn large_values_stay_in_the_fsynced_log() {
        let (dir, store) = temp_store();
        for round in 0..20u64 {
            let mut batch = WriteBatch::default();
            for i in 0..40u64 {
                let mut key = vec![BLOCK];
                key.extend_from_slice(&(round * 40 + i).to_be_bytes());
                // Incompressible: sled compresses what it writes.
                let mut state = (round * 40 + i) | 1;
                let value: Vec<u8> = (0..30_000)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                batch.put_raw(key, value);
            }
            store.apply(batch).expect("apply");
            store.flush().expect("flush");
        }
        let blobs = std::fs::read_dir(dir.path().join("blobs")).map_or(0, |d| d.count());
        assert_eq!(blobs, 0, "sled wrote pages to blob files");
        drop(store);
        // A directory keeps the segment size it was created with.
        let conf = std::fs::read(dir.path().join("conf")).expect("conf");
        assert!(String::from_utf8_lossy(&conf).contains(&format!("segment_size: {SEGMENT_SIZE}")));
        Store::open(dir.path(), &StoreOptions::default()).expect("reopen");
    }

    #[test]
    fn a_directory_made_with_another_segment_size_opens_with_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        drop(
            sled::Config::new()
                .path(dir.path())
                .open()
                .expect("sled's default"),
        );
        Store::open(dir.path(), &StoreOptions::default()).expect("opens with its 512 KiB");
    }

    /// Values of every size, from none to more than a page sled keeps in its log (2 MiB).
    fn sizes() -> Vec<(Vec<u8>, Vec<u8>)> {
        // The largest, incompressible, is stored by sled in a blob file of its own.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        [0usize, 1, 31, 200, 4_000, 300_000, 3_000_000]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut key = vec![b'Z'];
                key.extend_from_slice(format!("size-{i}").as_bytes());
                let value = (0..n)
                    .map(|j| {
                        if n < 1_000_000 {
                            (j % 13) as u8
                        } else {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state as u8
                        }
                    })
                    .collect();
                (key, value)
            })
            .collect()
    }

    fn put_sizes(store: &Store) {
        let mut batch = WriteBatch::default();
        for (k, v) in sizes() {
            batch.put_raw(k, v);
        }
        store.apply(batch).expect("apply");
        store.flush().expect("flush");
    }

    fn check_sizes(store: &Store) {
        for (k, v) in sizes() {
            let got = store.tree.get(&k).expect("get").expect("stored");
            assert_eq!(&got[..], &v[..], "value of {} bytes", v.len());
        }
    }

    #[test]
    fn a_new_directory_is_compressed_and_reads_back_every_size_after_a_restart() {
        let (dir, store) = temp_store();
        put_sizes(&store);
        drop(store);
        let conf = std::fs::read(dir.path().join("conf")).expect("conf");
        assert!(String::from_utf8_lossy(&conf).contains("use_compression: true"));
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("reopen");
        check_sizes(&store);
    }

    #[test]
    fn a_directory_with_data_but_no_readable_conf_is_refused_and_left_as_it_is() {
        let (dir, store) = temp_store();
        put_sizes(&store);
        drop(store);
        for damage in [None, Some(&b"seg"[..])] {
            match damage {
                None => std::fs::remove_file(dir.path().join("conf")).expect("remove conf"),
                Some(bytes) => std::fs::write(dir.path().join("conf"), bytes).expect("cut conf"),
            }
            let db = std::fs::read(dir.path().join("db")).expect("db");
            match Store::open(dir.path(), &StoreOptions::default()) {
                Err(StoreError::Refused(m)) => assert!(m.contains("conf"), "{m}"),
                Err(e) => panic!("refused with another error: {e}"),
                Ok(_) => panic!("opened without its conf"),
            }
            assert_eq!(
                std::fs::read(dir.path().join("db")).expect("db"),
                db,
                "db changed"
            );
            assert!(
                std::fs::read(dir.path().join("conf")).map_or(true, |c| c.len() <= 3),
                "a conf was written"
            );
        }
        // Written back as the message says (what its printf writes), the data reads again.
        let conf = format!("segment_size: {SEGMENT_SIZE}\nuse_compression: true\nversion: 0.34\n\0\0\0\0");
        std::fs::write(dir.path().join("conf"), conf).expect("write conf");
        check_sizes(&Store::open(dir.path(), &StoreOptions::default()).expect("reopen"));
    }

    #[test]
    fn compression_can_be_left_off_for_a_new_directory_and_stays_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let off = StoreOptions {
            compress_new: false,
            ..StoreOptions::default()
        };
        put_sizes(&Store::open(dir.path(), &off).expect("open"));
        let conf = std::fs::read(dir.path().join("conf")).expect("conf");
        assert!(String::from_utf8_lossy(&conf).contains("use_compression: false"));
        // Reopened with the default (compress new directories): it keeps its own.
        check_sizes(&Store::open(dir.path(), &StoreOptions::default()).expect("reopen"));
    }

    #[test]
    fn a_directory_of_the_previous_release_stays_uncompressed_and_readable() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            // As the release before compression made it: 8 MiB segments, no compression.
            let db = sled::Config::new()
                .path(dir.path())
                .segment_size(SEGMENT_SIZE)
                .open()
                .expect("open uncompressed");
            let tree = db.open_tree("engage").expect("tree");
            for (k, v) in sizes() {
                tree.insert(k, v).expect("insert");
            }
            db.flush().expect("flush");
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("reopen");
        check_sizes(&store);
        drop(store);
        let conf = std::fs::read(dir.path().join("conf")).expect("conf");
        assert!(String::from_utf8_lossy(&conf).contains("use_compression: false"));
    }
}
