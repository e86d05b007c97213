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
//! answers) is published before the flush.

use std::sync::atomic::{AtomicU64, Ordering};

use super::batch::Op;
use super::StoreError;

/// The tree of the records of groups being applied.
pub(super) const TREE: &str = "redo";

/// Applies `ops` to `tree` atomically through a record in `redo` (see the module docs).
pub(super) fn apply(
    tree: &sled::Tree,
    redo: &sled::Tree,
    next: &AtomicU64,
    ops: &[Op],
) -> Result<(), StoreError> {
    let key = next.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    redo.insert(key, encode(ops))?;
    apply_plain(tree, ops)?;
    redo.remove(key)?;
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
pub(super) fn recover(tree: &sled::Tree, redo: &sled::Tree) -> Result<usize, StoreError> {
    let mut recovered = 0;
    for kv in redo.iter() {
        let (key, record) = kv?;
        let ops =
            decode(&record).ok_or_else(|| StoreError::corrupt(&key, "a redo record that does not decode"))?;
        apply_plain(tree, &ops)?;
        redo.remove(&key)?;
        recovered += 1;
    }
    Ok(recovered)
}

/// `count (u32) | per op: key length (u32) | key | 1 + value length (u32; 0 for a removal) | value`.
fn encode(ops: &[Op]) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|(k, v)| 8 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(4 + size);
    out.extend_from_slice(&(ops.len() as u32).to_be_bytes());
    for (key, value) in ops {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        match value {
            Some(v) => {
                out.extend_from_slice(&(v.len() as u32 + 1).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&0u32.to_be_bytes()),
        }
    }
    out
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
        assert_eq!(decode(&encode(&ops)), Some(ops.clone()));
        let bytes = encode(&ops);
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
        redo.insert(7u64.to_be_bytes(), encode(&ops))?;
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
