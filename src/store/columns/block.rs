//! The block codec: how index records are packed into one sled value per block, and read back
//! without copying.

use serde::{Deserialize, Serialize};

use super::super::codec::encode;
use super::super::keys::block_hour;
use super::super::StoreError;
use crate::domain::model::{Event, Timestamp, Value};

/// One stored block, as a query reads it (its key and bytes, as read together with the others
/// of a consistent set).
#[derive(Clone)]
pub(crate) struct Block {
    key: sled::IVec,
    bytes: sled::IVec,
}

impl Block {
    pub(in crate::store) fn new(key: sled::IVec, bytes: sled::IVec) -> Self {
        Self { key, bytes }
    }

    /// The rows of the block in `[from, to]`, in (time, sequence) order, borrowed from it (see
    /// [`decode_block`]).
    pub(crate) fn rows(&self, from: Option<Timestamp>, to: Timestamp) -> Result<Vec<Row<'_>>, StoreError> {
        decode_block(&self.key, &self.bytes, from, to)
    }

    /// The rows of the block with the bytes each record was encoded as.
    pub(super) fn split(&self) -> Result<Vec<(Row<'_>, &[u8])>, StoreError> {
        split_block(&self.key, &self.bytes)
    }

    /// The highest sequence in the block, from its header.
    pub(crate) fn max_sequence(&self) -> Result<u64, StoreError> {
        block_max_sequence(&self.key, &self.bytes)
    }

    /// The latest `occurred_at` in the block (its last record's; `None` when empty).
    pub(crate) fn last_time(&self) -> Result<Option<Timestamp>, StoreError> {
        let records = block_records(&self.key, &self.bytes)?;
        records
            .last()
            .map(|r| Row::decode(&self.key, r).map(|r| r.occurred_at))
            .transpose()
    }

    /// The block's hour, from its key.
    pub(crate) fn hour(&self) -> Result<i64, StoreError> {
        block_hour(&self.key)
    }
}

/// An attribute value as stored in a block, borrowed from the block's bytes. Same encoding as
/// [`Value`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum ValueRef<'a> {
    String(&'a str),
    Number(f64),
    Bool(bool),
    Date(Timestamp),
    Json(&'a str),
}

impl<'a> ValueRef<'a> {
    /// Borrows a stored value.
    pub(crate) fn of(v: &'a Value) -> Self {
        match v {
            Value::String(s) => ValueRef::String(s),
            Value::Number(n) => ValueRef::Number(*n),
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Date(d) => ValueRef::Date(*d),
            Value::Json(s) => ValueRef::Json(s),
        }
    }

    /// An owned copy.
    pub(crate) fn to_value(self) -> Value {
        match self {
            ValueRef::String(s) => Value::String(s.to_string()),
            ValueRef::Number(n) => Value::Number(n),
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Date(d) => Value::Date(d),
            ValueRef::Json(s) => Value::Json(s.to_string()),
        }
    }
}

/// One event in a block: everything a query reads, borrowed from the block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record<'a> {
    #[serde(borrow)]
    pub user_id: &'a str,
    pub occurred_at: Timestamp,
    pub sequence: u64,
    /// By attribute name, ascending.
    #[serde(borrow)]
    pub attributes: Vec<(&'a str, ValueRef<'a>)>,
}

impl<'a> Record<'a> {
    /// The record of a stored event.
    pub(crate) fn of(event: &'a Event) -> Self {
        Self {
            user_id: &event.user_id,
            occurred_at: event.occurred_at,
            sequence: event.sequence,
            attributes: event
                .attributes
                .iter()
                .map(|(k, v)| (k.as_str(), ValueRef::of(v)))
                .collect(),
        }
    }
}

/// The head of a [`Record`]: what every query reads. The attributes follow in the encoding.
#[derive(Deserialize)]
struct RecordHead<'a> {
    #[serde(borrow)]
    user_id: &'a str,
    occurred_at: Timestamp,
    sequence: u64,
}

/// A record as read from a block: the head decoded, the attributes only on demand (a COUNT
/// without `where` never decodes them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Row<'a> {
    pub user_id: &'a str,
    pub occurred_at: Timestamp,
    pub sequence: u64,
    attributes: &'a [u8],
}

impl<'a> Row<'a> {
    fn decode(key: &[u8], bytes: &'a [u8]) -> Result<Self, StoreError> {
        let (head, attributes) =
            postcard::take_from_bytes::<RecordHead>(bytes).map_err(|e| StoreError::corrupt(key, e))?;
        Ok(Self {
            user_id: head.user_id,
            occurred_at: head.occurred_at,
            sequence: head.sequence,
            attributes,
        })
    }

    /// The attributes, by name ascending.
    pub(crate) fn attributes(&self) -> Result<Vec<(&'a str, ValueRef<'a>)>, StoreError> {
        postcard::from_bytes(self.attributes).map_err(|e| StoreError::corrupt(self.user_id.as_bytes(), e))
    }

    /// The whole record.
    pub(crate) fn record(&self) -> Result<Record<'a>, StoreError> {
        Ok(Record {
            user_id: self.user_id,
            occurred_at: self.occurred_at,
            sequence: self.sequence,
            attributes: self.attributes()?,
        })
    }
}

/// The rows of a block in `[from, to]`, in (time, sequence) order, borrowed from `bytes`.
/// Blocks are sorted by time, so the rows are found by binary search on the records' heads:
/// a block outside the range costs two or three heads decoded, and a stage block (which spans
/// any hours) only its records in range.
pub(super) fn decode_block<'a>(
    key: &[u8],
    bytes: &'a [u8],
    from: Option<Timestamp>,
    to: Timestamp,
) -> Result<Vec<Row<'a>>, StoreError> {
    let records = block_records(key, bytes)?;
    let lo = match from {
        Some(from) => first_where(&records, |r| Ok(Row::decode(key, r)?.occurred_at >= from))?,
        None => 0,
    };
    let rest = records.get(lo..).unwrap_or_default();
    let hi = lo + first_where(rest, |r| Ok(Row::decode(key, r)?.occurred_at > to))?;
    records
        .get(lo..hi)
        .unwrap_or_default()
        .iter()
        .map(|r| Row::decode(key, r))
        .collect()
}

/// The index of the first record for which `pred` holds, `pred` being false then true along
/// the records (their length when it never holds).
fn first_where(
    records: &[&[u8]],
    pred: impl Fn(&[u8]) -> Result<bool, StoreError>,
) -> Result<usize, StoreError> {
    let (mut lo, mut hi) = (0, records.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(records[mid])? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// A block as stored: the highest sequence among its records (so a reader can tell whether it
/// holds anything newer than a rollup without decoding it), then one encoded [`Record`] per
/// byte string, so a reader can skip a record's attributes.
#[derive(Serialize, Deserialize)]
struct BlockBytes<'a> {
    max_sequence: u64,
    #[serde(borrow)]
    records: Vec<&'a [u8]>,
}

fn block_records<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<&'a [u8]>, StoreError> {
    let block: BlockBytes = postcard::from_bytes(bytes).map_err(|e| StoreError::corrupt(key, e))?;
    Ok(block.records)
}

/// The highest sequence in a block, from its header.
pub(super) fn block_max_sequence(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let (n, _) = postcard::take_from_bytes::<u64>(bytes).map_err(|e| StoreError::corrupt(key, e))?;
    Ok(n)
}

/// The number of records in a block, from its header and length prefix.
pub(super) fn block_len(key: &[u8], bytes: &[u8]) -> Result<usize, StoreError> {
    let (_, rest) = postcard::take_from_bytes::<u64>(bytes).map_err(|e| StoreError::corrupt(key, e))?;
    let (n, _) = postcard::take_from_bytes::<u32>(rest).map_err(|e| StoreError::corrupt(key, e))?;
    Ok(n as usize)
}

/// A block's rows with the bytes each record was encoded as. A block is a postcard list of
/// byte strings, one encoded [`Record`] each, so a reader can skip a record's attributes.
pub(super) fn split_block<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<(Row<'a>, &'a [u8])>, StoreError> {
    block_records(key, bytes)?
        .into_iter()
        .map(|r| Ok((Row::decode(key, r)?, r)))
        .collect()
}

/// A block of encoded records, sorted by (time, sequence) here.
pub(super) fn build_block(records: &mut [(Timestamp, u64, &[u8])]) -> Vec<u8> {
    records.sort_by_key(|r| (r.0, r.1));
    encode(&BlockBytes {
        max_sequence: records.iter().map(|r| r.1).max().unwrap_or(0),
        records: records.iter().map(|r| r.2).collect(),
    })
}
