//! Backups of a running server and restores.
//!
//! A backup copies the `engage` tree in key order, a slice of `--backup-slice-keys` keys at a time,
//! each slice a barrier job of the engine (so no write is applied during it). Between slices
//! writes go on, and every write to a key the backup has already copied is applied to the backup
//! too (`Store::apply` mirrors it); a key not yet copied is copied later with whatever it holds
//! then. So when the last slice is copied the backup equals the database at that moment: one
//! consistent state, at the sequences it records, while ingest went on (slowed, not stopped:
//! BENCHMARKS.md has what it costs). A restore copies a backup into an empty data directory and
//! checks that it opens at the backup's sequences.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::integrity::HighWater;
use super::keys::{META_ACTION_SEQ, META_EVENT_SEQ};
use super::{read_u64, Acknowledged, Store, StoreError, StoreOptions};

/// The file that describes a backup, in its directory.
pub(crate) const DESCRIPTION: &str = "engage-backup.json";

/// What a backup holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Backup {
    /// The last event and action sequences it holds.
    pub(crate) event_seq: u64,
    pub(crate) action_seq: u64,
    pub(crate) keys: u64,
    pub(crate) bytes: u64,
    /// How long the backup took, in milliseconds.
    pub(crate) millis: u64,
    /// The longest time one of its slices held writes, in milliseconds.
    #[serde(default)]
    pub(crate) longest_slice_ms: u64,
    /// How many slices it took (writes went on between them).
    #[serde(default)]
    pub(crate) slices: u64,
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Refused(format!("{}: {e}", path.display()))
}

/// True when `dir` is missing or an empty directory.
fn is_empty_dir(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !dir.exists(),
    }
}

/// A backup being taken: its database and how far the copy has come.
pub(crate) struct InProgress {
    db: sled::Db,
    tree: sled::Tree,
    target: std::path::PathBuf,
    /// Every key below this is copied (and kept up to date); `None`: nothing copied yet.
    copied_below: Option<Vec<u8>>,
    keys: u64,
    started: std::time::Instant,
    /// The longest any slice held writes, in milliseconds.
    longest_slice_ms: u64,
    slices: u64,
}

impl InProgress {
    /// The writes of a batch to keys already copied, as a batch for the backup.
    pub(super) fn mirror(&self, ops: &[super::batch::Op]) -> sled::Batch {
        let mut batch = sled::Batch::default();
        if let Some(bound) = &self.copied_below {
            for (key, value) in ops {
                if key < bound {
                    match value {
                        Some(v) => batch.insert(key.as_slice(), v.as_slice()),
                        None => batch.remove(key.as_slice()),
                    }
                }
            }
        }
        batch
    }

    /// Applies mirrored writes to the backup.
    pub(super) fn apply(&mut self, batch: sled::Batch) -> Result<(), StoreError> {
        Ok(self.tree.apply_batch(batch)?)
    }
}

impl Store {
    /// Starts a backup into `target` (missing or empty). Call it from the writer, as a barrier.
    pub(crate) fn begin_backup(&self, target: &Path) -> Result<(), StoreError> {
        let mut slot = self.backup.lock();
        if slot.is_some() {
            return Err(StoreError::Refused("a backup is already being taken".into()));
        }
        if !is_empty_dir(target) {
            return Err(StoreError::Refused(format!(
                "{}: a backup goes into a missing or empty directory",
                target.display()
            )));
        }
        let db = super::open_without_panic(&super::sled_config(target, self.compressed)?.0)??;
        let tree = db.open_tree("engage")?;
        *slot = Some(InProgress {
            db,
            tree,
            target: target.to_path_buf(),
            copied_below: None,
            keys: 0,
            started: std::time::Instant::now(),
            longest_slice_ms: 0,
            slices: 0,
        });
        Ok(())
    }

    /// Copies the next slice; once everything is copied, finishes the backup and answers what
    /// it holds. Call it from the writer, as a barrier (no write may be applied meanwhile).
    pub(crate) fn backup_slice(&self) -> Result<Option<Backup>, StoreError> {
        let mut slot = self.backup.lock();
        let Some(progress) = slot.as_mut() else {
            return Err(StoreError::Refused("no backup is being taken".into()));
        };
        let started = std::time::Instant::now();
        let range = match &progress.copied_below {
            None => self.tree.range::<&[u8], _>(..),
            Some(bound) => self.tree.range::<&[u8], _>(bound.as_slice()..),
        };
        let mut batch = sled::Batch::default();
        let mut n = 0;
        let mut exhausted = true;
        for kv in range {
            let (k, v) = kv?;
            if n == self.backup_slice_keys {
                // `k` is the first key of the next slice.
                progress.copied_below = Some(k.to_vec());
                exhausted = false;
                break;
            }
            batch.insert(k, v);
            n += 1;
        }
        progress.tree.apply_batch(batch)?;
        progress.keys += n as u64;
        progress.slices += 1;
        progress.longest_slice_ms = progress
            .longest_slice_ms
            .max(started.elapsed().as_millis() as u64);
        if !exhausted {
            return Ok(None);
        }
        // Everything is copied: the backup equals the database now.
        let Some(done) = slot.take() else {
            return Ok(None);
        };
        finish(done).map(Some)
    }

    /// Abandons a backup in progress (its directory is left as it is).
    pub(crate) fn abandon_backup(&self) {
        self.backup.lock().take();
    }
}

/// Flushes a complete backup, gives it its high-water mark and its description.
fn finish(done: InProgress) -> Result<Backup, StoreError> {
    done.db.flush()?;
    let held = Acknowledged {
        event_seq: read_u64(&done.tree, META_EVENT_SEQ)?,
        action_seq: read_u64(&done.tree, META_ACTION_SEQ)?,
    };
    let target = done.target.clone();
    drop(done.tree);
    drop(done.db);
    let (mut mark, _) = HighWater::open(&target)?;
    mark.reset(held).map_err(|e| io(&target, e))?;
    let backup = Backup {
        event_seq: held.event_seq,
        action_seq: held.action_seq,
        keys: done.keys,
        bytes: super::compact::dir_bytes(&target),
        millis: done.started.elapsed().as_millis() as u64,
        longest_slice_ms: done.longest_slice_ms,
        slices: done.slices,
    };
    let text = serde_json::to_string_pretty(&backup).map_err(|e| io(&target, e))?;
    std::fs::write(target.join(DESCRIPTION), text).map_err(|e| io(&target, e))?;
    Ok(backup)
}

/// Copies the backup in `from` into the data directory `to` (missing or empty), then opens it
/// to check it. Answers what the backup holds.
pub(crate) fn restore(from: &Path, to: &Path) -> Result<Backup, StoreError> {
    let description = from.join(DESCRIPTION);
    let text = std::fs::read_to_string(&description)
        .map_err(|e| io(&description, format!("not a backup of engage ({e})")))?;
    let backup: Backup = serde_json::from_str(&text).map_err(|e| io(&description, e))?;
    if !is_empty_dir(to) {
        return Err(StoreError::Refused(format!(
            "{}: a restore goes into a missing or empty data directory",
            to.display()
        )));
    }
    copy_files(from, to)?;
    let _ = std::fs::remove_file(to.join(DESCRIPTION));
    let store = Store::open(to, &StoreOptions::default())?;
    let found = Acknowledged {
        event_seq: read_u64(&store.tree, META_EVENT_SEQ)?,
        action_seq: read_u64(&store.tree, META_ACTION_SEQ)?,
    };
    if found.event_seq != backup.event_seq || found.action_seq != backup.action_seq {
        return Err(StoreError::Refused(format!(
            "{}: the restored data holds sequences {}/{}, the backup says {}/{}",
            to.display(),
            found.event_seq,
            found.action_seq,
            backup.event_seq,
            backup.action_seq
        )));
    }
    Ok(backup)
}

/// Copies the files under `from` into `to`, each made durable, `conf` first (sled cannot read a
/// database without it), then the directory entries.
fn copy_files(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    let mut entries = std::fs::read_dir(from)
        .map_err(|e| io(from, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io(from, e))?;
    entries.sort_by_key(|e| e.file_name() != "conf");
    for entry in entries {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_files(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| io(&target, e))?;
            std::fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&target, e))?;
        }
    }
    super::compact::sync_dir(to)
}
