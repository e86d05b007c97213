//! The key layouts of the `engage` tree, all of them here (the table is in the module
//! documentation of `store`). Integers are big-endian so that byte order is numeric order;
//! signed ones and timestamps use the order-preserving encodings of `domain::bytes`.
//!
//! Event names, trigger ids and user ids never contain NUL, so 0x00 separates key parts and
//! keeps each prefix's keys contiguous.

use super::StoreError;
use crate::domain::bytes::{from_sortable_i64, sortable_i64};
use crate::domain::model::{Event, Timestamp};

pub(super) const TIMELINE: u8 = b'T';
pub(super) const EVENT_ID: u8 = b'I';
pub(super) const ATTRIBUTE: u8 = b'A';
pub(super) const NAME_STATS: u8 = b'S';
pub(super) const AGGREGATE: u8 = b'G';
pub(super) const TRIGGER: u8 = b'R';
/// The action log before chunks: one action per key (migrated at start).
pub(super) const UNCHUNKED_ACTION: u8 = b'F';
pub(super) const ACTION_CHUNK: u8 = b'N';
pub(super) const USER_ACTION: u8 = b'U';
pub(super) const TRIGGER_ACTION: u8 = b'V';
pub(super) const FIRING: u8 = b'L';
pub(super) const CONSUMER: u8 = b'C';
pub(super) const EPOCH: u8 = b'E';
pub(super) const BLOCK: u8 = b'B';
pub(super) const MINUTE_BUCKET: u8 = b'K';
pub(super) const HOUR_BUCKET: u8 = b'H';
pub(super) const USER: u8 = b'W';
pub(super) const ROLLUP: u8 = b'Y';
pub(super) const ROLLUP_META: u8 = b'X';
pub(crate) const TIMER_BUCKET: u8 = b'P';
pub(super) const DUE: u8 = b'Q';
pub(super) const ERASING: u8 = b'D';
pub(super) const DESTINATION: u8 = b'O';
pub(super) const DELIVERY_POSITION: u8 = b'J';
pub(super) const RETRY: u8 = b'j';
pub(super) const DEAD_LETTER: u8 = b'o';
pub(super) const META_EVENT_SEQ: &[u8] = b"Mevent_seq";
pub(super) const META_ACTION_SEQ: &[u8] = b"Maction_seq";
/// Present once the by-name index is built.
pub(super) const META_COLUMNS: &[u8] = b"Mcolumns";

/// A position in a user's timeline: an event's `occurred_at` and `sequence`.
pub(crate) type TimelinePos = (Timestamp, u64);

/// `prefix` name: the key of a record named by one string.
pub(super) fn prefixed(prefix: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.push(prefix);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `prefix` name 0x00: the prefix of every key under one name.
pub(super) fn under(prefix: u8, name: &str) -> Vec<u8> {
    let mut k = prefixed(prefix, name);
    k.push(0);
    k
}

/// `prefix` a 0x00 b: the key of a pair of names (user and event name, trigger and user, ...).
pub(super) fn pair(prefix: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 2);
    k.push(prefix);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

/// The upper bound of every key starting with `prefix` (which ends with 0x00).
pub(super) fn end_of(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = 1;
    }
    end
}

/// `T` user 0x00 name 0x00: the prefix of a user's events of one name.
pub(super) fn named_prefix(user_id: &str, name: &str) -> Vec<u8> {
    let mut k = pair(TIMELINE, user_id, name);
    k.push(0);
    k
}

/// The key of the event of `user_id` named `name` at `pos`.
pub(super) fn named_key(user_id: &str, name: &str, pos: TimelinePos) -> Vec<u8> {
    let mut k = named_prefix(user_id, name);
    k.extend_from_slice(&pos.0.sort_key());
    k.extend_from_slice(&pos.1.to_be_bytes());
    k
}

/// The key a stored event lives under.
pub(crate) fn event_key(event: &Event) -> Vec<u8> {
    named_key(&event.user_id, &event.name, (event.occurred_at, event.sequence))
}

/// The timeline position at the end of an event key (`bytes` is the key after its prefix).
pub(super) fn decode_pos(key: &[u8], bytes: &[u8]) -> Result<TimelinePos, StoreError> {
    let (Some(ts), Some(seq)) = (
        bytes.get(..12).and_then(|b| <[u8; 12]>::try_from(b).ok()),
        bytes.get(12..).and_then(|b| <[u8; 8]>::try_from(b).ok()),
    ) else {
        return Err(StoreError::corrupt(key, "expected a 20-byte timeline position"));
    };
    Ok((Timestamp::from_sort_key(ts), u64::from_be_bytes(seq)))
}

/// `N` sequence: the chunk of the action log whose first action has this sequence.
pub(super) fn chunk_key(seq: u64) -> [u8; 9] {
    let mut k = [ACTION_CHUNK; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence of an action log key (`N` chunk or `F` action).
pub(super) fn seq_of_chunk_key(key: &[u8]) -> Result<u64, StoreError> {
    match key {
        [_, rest @ ..] if rest.len() == 8 => trailing_u64(key, "action log key"),
        _ => Err(StoreError::corrupt(key, "expected a 9-byte action log key")),
    }
}

/// `prefix` owner 0x00 sequence: an action in a user's or a trigger's index.
pub(super) fn seq_index_key(prefix: u8, owner: &str, seq: u64) -> Vec<u8> {
    let mut k = under(prefix, owner);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence at the end of an action index key.
pub(super) fn seq_of_index_key(key: &[u8]) -> Result<u64, StoreError> {
    trailing_u64(key, "action index key too short")
}

/// The big-endian number in the last 8 bytes of a key.
fn trailing_u64(key: &[u8], short: &str) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::corrupt(key, short))
}

/// `prefix` name 0x00 bucket: a statistics bucket (minute or hour), or a block's hour prefix.
pub(super) fn bucket_key(prefix: u8, name: &str, bucket: i64) -> Vec<u8> {
    let mut k = under(prefix, name);
    k.extend_from_slice(&sortable_i64(bucket));
    k
}

/// The bucket number of a bucket key whose name part is `prefix_len` bytes long (prefix byte,
/// name and 0x00 included).
pub(super) fn decode_bucket(key: &[u8], prefix_len: usize) -> Result<i64, StoreError> {
    key.get(prefix_len..prefix_len + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(from_sortable_i64)
        .ok_or_else(|| StoreError::corrupt(key, "bucket key too short"))
}

/// `B` name 0x00 hour block: a block of index records.
pub(super) fn block_key(name: &str, hour: i64, blockno: u64) -> Vec<u8> {
    let mut k = bucket_key(BLOCK, name, hour);
    k.extend_from_slice(&blockno.to_be_bytes());
    k
}

/// The block number at the end of a block key.
pub(super) fn blockno_of(key: &[u8]) -> Result<u64, StoreError> {
    trailing_u64(key, "block key too short")
}

/// The hour of a block key.
pub(super) fn block_hour(key: &[u8]) -> Result<i64, StoreError> {
    let at = key
        .len()
        .checked_sub(16)
        .ok_or_else(|| StoreError::corrupt(key, "block key too short"))?;
    decode_bucket(key, at)
}

/// `Y` name 0x00 first user: a rollup chunk.
pub(super) fn rollup_chunk_key(name: &str, first_user: &str) -> Vec<u8> {
    let mut k = under(ROLLUP, name);
    k.extend_from_slice(first_user.as_bytes());
    k
}

/// `P` bucket: the pending timers of the users hashing to one bucket.
pub(super) fn timer_bucket_key(bucket: u16) -> [u8; 3] {
    let b = bucket.to_be_bytes();
    [TIMER_BUCKET, b[0], b[1]]
}

/// `Q` minute part: the timer buckets with a timer due in that minute.
pub(super) fn due_key(minute: i64, part: u8) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = DUE;
    k[1..9].copy_from_slice(&sortable_i64(minute));
    k[9] = part;
    k
}

/// The minute and part of a due key.
pub(super) fn due_key_parts(key: &[u8]) -> Option<(i64, u8)> {
    let m: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some((from_sortable_i64(m), *key.get(9)?))
}
