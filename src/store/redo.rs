//! Atomic write groups without sled's `apply_batch`.
//!
//! sled 0.34.7 runs `apply_batch` under the write side of a process-wide lock whose read side
//! every `flush()` holds until its fsync completes, so an atomic batch waits for the
//! committer's flush (and every read waits behind it). Plain inserts take only the read side:
//! they overlap the flush. So a write group is made atomic here instead:
//!
//! 1. the group's operations are written as **one record** of the `redo` tree (a single insert,
//!    atomic by itself);
//! 2. its operations are applied with plain inserts and removes;
//! 3. the record is removed.
//!
//! All of it goes through one sled log in that order, and sled recovers a prefix of its log. A
//! crash therefore leaves either no record and nothing of the group, or the record with any
//! prefix of its operations. At open, [`recover`] re-applies every record it finds (putting a
//! value or removing a key twice changes nothing) and removes it, before anything is read.
//! The cost is one more insert and removal per group, and the group's bytes once more in the log.
//!
//! Readers may see a group half applied for the moment it takes, as they could always see an
//! applied group before its flush made it durable: nothing durable-only (the action stream, the
//! answers) is published before the flush. A group that removes and rewrites what queries
//! read together (index blocks, an erased user's statistics buckets) is applied under the
//! store's `index` lock, which those queries take for reading.
//!
//! The guarantee is atomicity across a crash of the process, and across a power cut as far as
//! sled's own log is ordered there: the record is cut into pieces small enough to stay in the
//! log, because sled writes a larger value to a blob file it does not fsync and skips when
//! missing at recovery. A binary older than this module ignores a record left by a crash.

use std::sync::atomic::{AtomicU64, Ordering};

use super::batch::Op;
use super::StoreError;

/// The tree of the records of groups being applied.
pub(super) const TREE: &str = "redo";

/// Pieces of a record, each small enough to stay in sled's log: a value over ~128 KiB becomes a
/// blob file, which sled does not fsync and skips when missing at recovery, so a record kept
/// as one value would not be ordered with its operations across a power cut.
const PIECE: usize = 64 * 1024;

/// A piece's key: the group's number, then the piece's.
fn piece_key(group: u64, piece: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&group.to_be_bytes());
    key[8..].copy_from_slice(&piece.to_be_bytes());
    key
}

/// Applies `ops` to `tree` atomically through a record in `redo` (see the module docs).
pub(super) fn apply(
    tree: &sled::Tree,
    redo: &sled::Tree,
    next: &AtomicU64,
    ops: &[Op],
) -> Result<(), StoreError> {
    let group = next.fetch_add(1, Ordering::Relaxed);
    let record = encode(ops)?;
    let pieces: Vec<&[u8]> = record.chunks(PIECE).collect();
    let count =
        u32::try_from(pieces.len()).map_err(|_| StoreError::corrupt(b"redo", "a write group too large"))?;
    for (i, piece) in (0u32..).zip(&pieces) {
        // The first piece says how many there are: a record cut short by a crash is known.
        let value = if i == 0 {
            [count.to_be_bytes().as_slice(), piece].concat()
        } else {
            piece.to_vec()
        };
        redo.insert(piece_key(group, i), value)?;
    }
    apply_plain(tree, ops)?;
    for i in 0..count {
        redo.remove(piece_key(group, i))?;
    }
    Ok(())
}

fn apply_plain(tree: &sled::Tree, ops: &[Op]) -> Result<(), StoreError> {
    for (key, value) in ops {
        match value {
            Some(value) => tree.insert(key.as_slice(), value.as_slice())?,
            None => tree.remove(key.as_slice())?,
        };
    }
    Ok(())
}

/// Re-applies the groups a crash interrupted and removes their records; answers how many.
///
/// A record missing pieces was cut while it was written, before any of its operations (they
/// come after it in the log): its group left nothing, and the pieces are dropped.
pub(super) fn recover(tree: &sled::Tree, redo: &sled::Tree) -> Result<usize, StoreError> {
    let mut recovered = 0;
    let mut pieces: Vec<(sled::IVec, sled::IVec)> = Vec::new();
    let mut finish = |pieces: &mut Vec<(sled::IVec, sled::IVec)>| -> Result<(), StoreError> {
        if let Some(ops) = whole(pieces)? {
            apply_plain(tree, &ops)?;
            recovered += 1;
        }
        for (key, _) in pieces.drain(..) {
            redo.remove(key)?;
        }
        Ok(())
    };
    for kv in redo.iter() {
        let (key, value) = kv?;
        if key.len() != 12 {
            return Err(StoreError::corrupt(&key, "a redo key of the wrong size"));
        }
        if pieces.first().is_some_and(|(k, _)| k[..8] != key[..8]) {
            finish(&mut pieces)?;
        }
        pieces.push((key, value));
    }
    finish(&mut pieces)?;
    Ok(recovered)
}

/// The operations of a record's pieces, or `None` when pieces are missing.
fn whole(pieces: &[(sled::IVec, sled::IVec)]) -> Result<Option<Vec<Op>>, StoreError> {
    let Some((first_key, first)) = pieces.first() else {
        return Ok(None);
    };
    if first_key[8..] != [0, 0, 0, 0] || first.len() < 4 {
        return Ok(None);
    }
    let count = u32::from_be_bytes([first[0], first[1], first[2], first[3]]) as usize;
    let in_order = pieces
        .iter()
        .enumerate()
        .all(|(i, (k, _))| k[8..] == (i as u32).to_be_bytes());
    if pieces.len() != count || !in_order {
        return Ok(None);
    }
    let mut record = first[4..].to_vec();
    for (_, piece) in &pieces[1..] {
        record.extend_from_slice(piece);
    }
    decode(&record)
        .map(Some)
        .ok_or_else(|| StoreError::corrupt(first_key, "a redo record that does not decode"))
}

/// `count (u32) | per op: key length (u32) | key | 1 + value length (u32; 0 for a removal) | value`.
fn encode(ops: &[Op]) -> Result<Vec<u8>, StoreError> {
    let size: usize = ops
        .iter()
        .map(|(k, v)| 8 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let too_large = || StoreError::corrupt(b"redo", "a write too large for a redo record");
    let len = |n: usize| u32::try_from(n).map_err(|_| too_large());
    let mut out = Vec::with_capacity(4 + size);
    out.extend_from_slice(&len(ops.len())?.to_be_bytes());
    for (key, value) in ops {
        out.extend_from_slice(&len(key.len())?.to_be_bytes());
        out.extend_from_slice(key);
        match value {
            Some(v) => {
                let n = len(v.len())?.checked_add(1).ok_or_else(too_large)?;
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&0u32.to_be_bytes()),
        }
    }
    Ok(out)
}

fn decode(mut bytes: &[u8]) -> Option<Vec<Op>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Some(head)
    }
    fn len(bytes: &mut &[u8]) -> Option<usize> {
        let b = take(bytes, 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let count = len(&mut bytes)?;
    let mut ops = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let key_len = len(&mut bytes)?;
        let key = take(&mut bytes, key_len)?.to_vec();
        let value = match len(&mut bytes)? {
            0 => None,
            n => Some(take(&mut bytes, n - 1)?.to_vec()),
        };
        ops.push((key, value));
    }
    bytes.is_empty().then_some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = sled::Config::new()
            .path(dir.path())
            .open()
            .unwrap_or_else(|e| panic!("{e}"));
        (dir, db)
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let ops: Vec<Op> = vec![
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"b".to_vec(), None),
            (vec![], Some(vec![])),
        ];
        let bytes = encode(&ops).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(decode(&bytes), Some(ops.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), None, "a record cut at {cut}");
        }
    }

    #[test]
    fn an_interrupted_group_is_applied_whole_at_recovery() -> Result<(), StoreError> {
        let (_dir, db) = temp_db();
        let tree = db.open_tree("engage")?;
        let redo = db.open_tree(TREE)?;
        tree.insert(b"gone", b"x".as_slice())?;
        tree.insert(b"kept", b"old".as_slice())?;
        let ops: Vec<Op> = vec![
            (b"kept".to_vec(), Some(b"new".to_vec())),
            (b"gone".to_vec(), None),
            (b"added".to_vec(), Some(b"1".to_vec())),
        ];
        // What a crash after the record and the first operation leaves.
        let record = encode(&ops)?;
        redo.insert(piece_key(7, 0), [1u32.to_be_bytes().as_slice(), &record].concat())?;
        tree.insert(b"kept", b"new".as_slice())?;
        assert_eq!(recover(&tree, &redo)?, 1);
        assert_eq!(tree.get(b"kept")?.as_deref(), Some(b"new".as_slice()));
        assert_eq!(tree.get(b"gone")?, None);
        assert_eq!(tree.get(b"added")?.as_deref(), Some(b"1".as_slice()));
        assert!(redo.is_empty(), "the record is removed");
        assert_eq!(recover(&tree, &redo)?, 0);
        Ok(())
    }

    #[test]
    fn a_record_cut_while_written_is_dropped_and_a_large_one_is_kept_in_pieces() -> Result<(), StoreError> {
        let (_dir, db) = temp_db();
        let tree = db.open_tree("engage")?;
        let redo = db.open_tree(TREE)?;
        // A group of 300 KB: several pieces, none a blob.
        let big: Vec<Op> = (0..3u8).map(|i| (vec![i], Some(vec![i; 100_000]))).collect();
        let record = encode(&big)?;
        let pieces: Vec<&[u8]> = record.chunks(PIECE).collect();
        assert!(pieces.len() > 1);
        // Group 1 cut after its first piece (none of its operations ran); group 2 whole.
        redo.insert(
            piece_key(1, 0),
            [(pieces.len() as u32).to_be_bytes().as_slice(), pieces[0]].concat(),
        )?;
        for (i, piece) in (0u32..).zip(&pieces) {
            let value = if i == 0 {
                [(pieces.len() as u32).to_be_bytes().as_slice(), piece].concat()
            } else {
                piece.to_vec()
            };
            redo.insert(piece_key(2, i), value)?;
        }
        assert_eq!(recover(&tree, &redo)?, 1, "only the whole record is applied");
        assert_eq!(tree.len(), 3);
        assert_eq!(tree.get([2u8])?.map(|v| v.len()), Some(100_000));
        assert!(redo.is_empty());
        Ok(())
    }

    #[test]
    fn a_group_leaves_no_record_behind() -> Result<(), StoreError> {
        let (_dir, db) = temp_db();
        let tree = db.open_tree("engage")?;
        let redo = db.open_tree(TREE)?;
        let next = AtomicU64::new(0);
        apply(&tree, &redo, &next, &[(b"k".to_vec(), Some(b"v".to_vec()))])?;
        assert_eq!(tree.get(b"k")?.as_deref(), Some(b"v".as_slice()));
        assert!(redo.is_empty());
        Ok(())
    }
}
