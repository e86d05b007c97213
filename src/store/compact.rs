//! Offline compaction (`engage compact`): the data directory rewritten with only its live keys.
//!
//! sled reclaims the space of removed or overwritten records lazily, so an erased user's bytes
//! stay in its segment files long after DeleteUser. Compaction copies every live key of every
//! tree into a fresh database beside the directory, checks that both hold the same (sled's
//! checksum over all keys and values), then swaps the fresh one in: afterwards no file holds a
//! byte of what was removed. It needs the server stopped (sled's lock guarantees it).

use std::path::{Path, PathBuf};

use super::integrity;
use super::{open_without_panic, StoreError};

/// What a compaction did.
#[derive(Debug)]
pub(crate) struct Compacted {
    pub(crate) keys: u64,
    pub(crate) bytes_before: u64,
    pub(crate) bytes_after: u64,
}

pub(super) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

fn io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Refused(format!("{}: {e}", path.display()))
}

/// Compacts the data directory `dir` in place (see the module documentation).
/// The copy is compressed when `compress` (see [`super::sled_config`]).
pub(crate) fn compact(dir: &Path, compress: bool) -> Result<Compacted, StoreError> {
    check_compactable(dir)?;
    let bytes_before = dir_bytes(dir);
    let fresh_dir = sibling(dir, "compacting");
    let old_dir = sibling(dir, "before-compaction");
    if old_dir.exists() {
        // A compaction stopped between its two renames: its original is there, untouched.
        return Err(StoreError::Refused(interrupted(dir, &old_dir)));
    }
    if fresh_dir.exists() {
        // A copy that never was swapped in (the original is intact): start it again.
        std::fs::remove_dir_all(&fresh_dir).map_err(|e| io(&fresh_dir, e))?;
    }
    let keys = {
        // Opened as the server opens it: the mark is checked (a directory that lost
        // acknowledged writes is refused), and a lock just released is waited for.
        let old = super::Store::open(dir, &super::StoreOptions::default())?;
        copy_db(&old.db, &fresh_dir, true, compress)?
    };
    // The high-water mark travels with the data it describes.
    let mark = dir.join(integrity::FILE_NAME);
    if mark.exists() {
        std::fs::copy(&mark, fresh_dir.join(integrity::FILE_NAME)).map_err(|e| io(&mark, e))?;
    }
    sync_dir(&fresh_dir)?;
    std::fs::rename(dir, &old_dir).map_err(|e| io(dir, e))?;
    std::fs::rename(&fresh_dir, dir).map_err(|e| io(&fresh_dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    std::fs::remove_dir_all(&old_dir).map_err(|e| io(&old_dir, e))?;
    Ok(Compacted {
        keys,
        bytes_before,
        bytes_after: dir_bytes(dir),
    })
}

/// Copies every key of every tree of `from` into a new database in `to_dir`, flushed, and with
/// `verify` checks that both hold the same (sled's checksum over all keys and values, two more
/// full scans). Answers how many keys. `from` must not change meanwhile (the caller stops or
/// pauses every writer). The copy is compressed when `compress`.
pub(super) fn copy_db(
    from: &sled::Db,
    to_dir: &Path,
    verify: bool,
    compress: bool,
) -> Result<u64, StoreError> {
    let fresh = open_without_panic(&super::sled_config(to_dir, compress)?.0)??;
    let mut keys = 0u64;
    for name in from.tree_names() {
        let source = from.open_tree(&name)?;
        let target = fresh.open_tree(&name)?;
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for kv in source.iter() {
            let (k, v) = kv?;
            batch.insert(k, v);
            pending += 1;
            keys += 1;
            if pending == 10_000 {
                target.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        target.apply_batch(batch)?;
    }
    fresh.flush()?;
    if verify && from.checksum()? != fresh.checksum()? {
        return Err(StoreError::Refused(format!(
            "the copy in {} does not match the original",
            to_dir.display()
        )));
    }
    Ok(keys)
}

/// Refuses what compaction must not touch: anything but sled's files and the mark in the
/// directory (they would be lost with the old copy), and a directory that lost acknowledged
/// writes (its damaged files are what a recovery needs).
fn check_compactable(dir: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let sled_file = matches!(
            name.as_str(),
            "conf" | "db" | "blobs" | "snap" | integrity::FILE_NAME
        ) || name.starts_with("snap.");
        if !sled_file {
            return Err(StoreError::Refused(format!(
                "{}: {name} is not one of the data directory's own files; move it out before compacting",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The message for a compaction that stopped between its renames.
pub(super) fn interrupted(dir: &Path, old_dir: &Path) -> String {
    format!(
        "a compaction of {} was interrupted: {} holds the data as it was before; move it back \
         to {} (replacing what is there, if anything) and start again",
        dir.display(),
        old_dir.display(),
        dir.display()
    )
}

/// Makes a directory's entries durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// `dir` with a suffix, beside it.
pub(super) fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}
