//! Value encodings: postcard for records, 8 big-endian bytes for counters and positions.

use super::StoreError;

/// Decodes a postcard record stored under `key`.
pub(super) fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::corrupt(key, e))
}

/// `bytes` as a record in an older form `O`, when they are exactly that (nothing left over):
/// how a record written before a trailing field was added is told apart (see `migrate`).
pub(super) fn older<O: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<O> {
    match postcard::take_from_bytes::<O>(bytes) {
        Ok((old, [])) => Some(old),
        _ => None,
    }
}

/// Encodes a record with postcard.
pub(super) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain data types into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// Decodes an 8-byte counter stored under `key`.
pub(super) fn decode_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::corrupt(key, format!("expected 8 bytes, found {}", bytes.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// An event encoded as engage stores it (for the benchmarks' raw-sled baseline).
pub(crate) fn encode_event(event: &crate::domain::model::Event) -> Vec<u8> {
    encode(event)
}
