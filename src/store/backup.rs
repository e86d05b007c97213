//! Backups of a running server and restores. A backup is a copy of every key of the database
//! at one durable sequence: the engine takes it as a barrier job, after every earlier write is
//! applied and before any later one, so it is consistent; writes wait while it is copied, reads
//! go on (BENCHMARKS.md has what it costs). A restore copies a backup into an empty data
//! directory and checks that it opens.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::compact::copy_db;
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
    /// How long the copy held writes, in milliseconds.
    pub(crate) millis: u64,
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Damaged(format!("{}: {e}", path.display()))
}

/// True when `dir` is missing or an empty directory.
fn is_empty_dir(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !dir.exists(),
    }
}

impl Store {
    /// Copies the database into `target` (missing or empty). Call it with no writer running:
    /// the engine calls it as a barrier job.
    pub(crate) fn backup_to(&self, target: &Path) -> Result<Backup, StoreError> {
        if !is_empty_dir(target) {
            return Err(StoreError::Damaged(format!(
                "{}: a backup goes into a missing or empty directory",
                target.display()
            )));
        }
        let started = std::time::Instant::now();
        // No checksum pass: writes wait while the copy runs (a restore checks the sequences).
        let keys = copy_db(&self.db, target, false)?;
        let held = Acknowledged {
            event_seq: read_u64(&self.tree, META_EVENT_SEQ)?,
            action_seq: read_u64(&self.tree, META_ACTION_SEQ)?,
        };
        let (mut mark, _) = HighWater::open(target)?;
        mark.reset(held).map_err(|e| io(target, e))?;
        let backup = Backup {
            event_seq: held.event_seq,
            action_seq: held.action_seq,
            keys,
            bytes: super::compact::dir_bytes(target),
            millis: started.elapsed().as_millis() as u64,
        };
        let text = serde_json::to_string_pretty(&backup).map_err(|e| io(target, e))?;
        std::fs::write(target.join(DESCRIPTION), text).map_err(|e| io(target, e))?;
        Ok(backup)
    }
}

/// Copies the backup in `from` into the data directory `to` (missing or empty), then opens it
/// to check it. Answers what the backup holds.
pub(crate) fn restore(from: &Path, to: &Path) -> Result<Backup, StoreError> {
    let description = from.join(DESCRIPTION);
    let text = std::fs::read_to_string(&description)
        .map_err(|e| io(&description, format!("not a backup of engage ({e})")))?;
    let backup: Backup = serde_json::from_str(&text).map_err(|e| io(&description, e))?;
    if !is_empty_dir(to) {
        return Err(StoreError::Damaged(format!(
            "{}: a restore goes into a missing or empty data directory",
            to.display()
        )));
    }
    copy_files(from, to)?;
    let _ = std::fs::remove_file(to.join(DESCRIPTION));
    let opts = StoreOptions {
        cache_capacity: 64 << 20,
        flush_every_ms: 500,
        accept_data_loss: false,
    };
    let store = Store::open(to, &opts)?;
    let found = Acknowledged {
        event_seq: read_u64(&store.tree, META_EVENT_SEQ)?,
        action_seq: read_u64(&store.tree, META_ACTION_SEQ)?,
    };
    if found.event_seq != backup.event_seq || found.action_seq != backup.action_seq {
        return Err(StoreError::Damaged(format!(
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

fn copy_files(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_files(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| io(&target, e))?;
        }
    }
    Ok(())
}
