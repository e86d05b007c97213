//! What protects a data directory from silent loss: a high-water mark of what was acknowledged,
//! kept outside sled, and a start-up that never panics on a damaged file.
//!
//! sled recovers whatever its log holds. A data file cut short, or damaged near its end, opens as
//! an older (or empty) database without an error: acknowledged events are gone, and the next
//! writes reuse their sequence numbers. So the committer records the highest event and action
//! sequences durable in `engage.hwm` beside sled's files (16 bytes and a checksum, written in
//! place and synced): never ahead of what sled has flushed, at most about 20 ms behind it under
//! load, and exact once no write came for 20 ms or it stopped (a power loss that takes only the last
//! ~20 ms of acknowledged writes is not detected). At start the sequences
//! sled recovered are compared with it: fewer means acknowledged writes were lost, and the
//! server refuses to start, naming the gap (see the README's recovery section for what an
//! operator does then).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::domain::bytes::fnv1a;

/// The high-water mark's file name inside the data directory.
pub(crate) const FILE_NAME: &str = "engage.hwm";

/// The highest sequences acknowledged as durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Acknowledged {
    pub(crate) event_seq: u64,
    pub(crate) action_seq: u64,
}

impl Acknowledged {
    fn encode(self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.event_seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.action_seq.to_be_bytes());
        let sum = fnv1a(&out[..16]);
        out[16..].copy_from_slice(&sum.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 24] = bytes.try_into().ok()?;
        let num = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        (num(16) == fnv1a(&bytes[..16])).then(|| Acknowledged {
            event_seq: num(0),
            action_seq: num(8),
        })
    }
}

/// The high-water mark file of a data directory.
pub(crate) struct HighWater {
    file: File,
    path: PathBuf,
    last: Acknowledged,
}

/// Why a data directory may not be served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IntegrityError {
    #[error(
        "the data directory lost acknowledged writes: it holds events up to sequence {found_events} \
         and actions up to {found_actions}, but events up to {acked_events} and actions up to \
         {acked_actions} were acknowledged ({path}); restore it from a backup, or start with \
         --accept-data-loss to serve what it holds"
    )]
    LostWrites {
        path: String,
        found_events: u64,
        found_actions: u64,
        acked_events: u64,
        acked_actions: u64,
    },
    #[error("the high-water mark {path} is damaged (not 24 bytes with a valid checksum); it is only rewritten with --accept-data-loss")]
    Damaged { path: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl HighWater {
    /// Opens (or creates) the file in `dir` and reads what it records; a new file records
    /// nothing (zeros).
    pub(crate) fn open(dir: &Path) -> Result<(Self, Option<Acknowledged>), IntegrityError> {
        let path = dir.join(FILE_NAME);
        let io = |source| IntegrityError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let recorded = if bytes.is_empty() {
            // A new mark: its directory entry must survive a crash too.
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            None
        } else {
            Some(
                Acknowledged::decode(&bytes).ok_or_else(|| IntegrityError::Damaged {
                    path: path.display().to_string(),
                })?,
            )
        };
        let hw = Self {
            file,
            path,
            last: recorded.unwrap_or_default(),
        };
        Ok((hw, recorded))
    }

    /// Checks what sled recovered against what was acknowledged.
    pub(crate) fn check(&self, found: Acknowledged, acked: Acknowledged) -> Result<(), IntegrityError> {
        if found.event_seq < acked.event_seq || found.action_seq < acked.action_seq {
            return Err(IntegrityError::LostWrites {
                path: self.path.display().to_string(),
                found_events: found.event_seq,
                found_actions: found.action_seq,
                acked_events: acked.event_seq,
                acked_actions: acked.action_seq,
            });
        }
        Ok(())
    }

    /// Records `now` as durable (written in place, then synced). The mark only moves up:
    /// nothing to do when `now` is not ahead of it (a committer that has flushed nothing yet
    /// reports zeros).
    pub(crate) fn record(&mut self, now: Acknowledged) -> std::io::Result<()> {
        let now = Acknowledged {
            event_seq: now.event_seq.max(self.last.event_seq),
            action_seq: now.action_seq.max(self.last.action_seq),
        };
        if now == self.last {
            return Ok(());
        }
        self.file.write_all_at(&now.encode(), 0)?;
        self.file.set_len(24)?;
        self.file.sync_data()?;
        self.last = now;
        Ok(())
    }

    /// Replaces a damaged or stale mark with `now` (`--accept-data-loss`, a backup): written
    /// beside it, synced, renamed over it, and the directory synced, so a crash leaves the old
    /// mark or the new one, never a torn one.
    pub(crate) fn reset(&mut self, now: Acknowledged) -> std::io::Result<()> {
        let tmp = self.path.with_extension("hwm.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&now.encode())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.last = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_round_trips_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut hw, recorded) = HighWater::open(dir.path()).expect("open");
        assert_eq!(recorded, None);
        let now = Acknowledged {
            event_seq: 7,
            action_seq: 3,
        };
        hw.record(now).expect("record");
        drop(hw);
        let (hw, recorded) = HighWater::open(dir.path()).expect("reopen");
        assert_eq!(recorded, Some(now));
        assert!(hw.check(now, now).is_ok());
        // It never moves down.
        let mut hw = hw;
        hw.record(Acknowledged::default()).expect("record zeros");
        drop(hw);
        let (hw, recorded) = HighWater::open(dir.path()).expect("reopen");
        assert_eq!(recorded, Some(now));
        let lost = hw.check(
            Acknowledged {
                event_seq: 6,
                action_seq: 3,
            },
            now,
        );
        assert!(lost
            .unwrap_err()
            .to_string()
            .contains("holds events up to sequence 6"));
        std::fs::write(dir.path().join(FILE_NAME), [1u8; 24]).expect("damage");
        assert!(matches!(
            HighWater::open(dir.path()),
            Err(IntegrityError::Damaged { .. })
        ));
    }
}
