//! Which hours of each name had blocks written since the store was opened, with the highest
//! sequence written to each: a rollup covering every sequence up to S then knows which blocks
//! may hold events it does not cover without reading every block of the name (reading them
//! all was most of a rollup answer's time, BENCHMARKS.md "The rollup keeper").
//!
//! Noted by [`Store::apply`] before a batch is applied, from the block keys the batch puts, so
//! a reader never sees a block this does not account for. Nothing is known of blocks written
//! before the store was opened, except that their records' sequences are at most the last
//! event sequence then (`since`): a rollup older than that reads every block, and is rebuilt.
//! Memory: one entry per (name, hour) written since the start (16 bytes and the map's
//! overhead; 10 names over 300 days of hours is 72 000 entries), not pruned while it runs.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use super::super::batch::Op;
use super::super::keys::BLOCK;
use super::block::block_max_sequence;
use crate::domain::bytes::from_sortable_i64;

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct WrittenHours {
    /// Every block on disk at the start holds only sequences up to this.
    since: u64,
    /// Per name, per hour written since the start, the highest sequence of a block written.
    hours: FxHashMap<String, BTreeMap<i64, u64>>,
}

impl WrittenHours {
    pub(crate) fn new(since: u64) -> Self {
        Self {
            since,
            hours: FxHashMap::default(),
        }
    }

    /// Notes the blocks a batch puts. A block key or header that does not decode makes every
    /// later question answer "unknown" (the caller then reads every block).
    pub(crate) fn note(&mut self, ops: &[Op]) {
        for (key, value) in ops {
            let (Some(&BLOCK), Some(value)) = (key.first(), value) else {
                continue;
            };
            match parse(key, value) {
                Some((name, hour, sequence)) => {
                    let hours = match self.hours.get_mut(name) {
                        Some(hours) => hours,
                        None => self.hours.entry(name.to_string()).or_default(),
                    };
                    let max = hours.entry(hour).or_default();
                    *max = (*max).max(sequence);
                }
                None => {
                    if self.since != u64::MAX {
                        tracing::error!(
                            "an index block written does not decode; rollup answers read every block until the next start"
                        );
                    }
                    self.since = u64::MAX;
                }
            }
        }
    }

    /// The hours of `name` with a block written since the start that holds a sequence above
    /// `sequence`, ascending; `None` when that cannot be known (`sequence` is older than the
    /// start).
    pub(crate) fn hours_after(&self, name: &str, sequence: u64) -> Option<Vec<i64>> {
        if sequence < self.since {
            return None;
        }
        Some(
            self.hours
                .get(name)
                .map(|hours| {
                    hours
                        .iter()
                        .filter(|(_, max)| **max > sequence)
                        .map(|(hour, _)| *hour)
                        .collect()
                })
                .unwrap_or_default(),
        )
    }
}

/// (name, hour, highest sequence) of a block put: `B` name 0x00 hour(8) blockno(8).
fn parse<'a>(key: &'a [u8], value: &[u8]) -> Option<(&'a str, i64, u64)> {
    let tail = key.len().checked_sub(17)?;
    if tail < 1 || key[tail] != 0 {
        return None;
    }
    let name = std::str::from_utf8(&key[1..tail]).ok()?;
    let hour = from_sortable_i64(<[u8; 8]>::try_from(&key[tail + 1..tail + 9]).ok()?);
    let sequence = block_max_sequence(key, value).ok()?;
    Some((name, hour, sequence))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::block_key;

    fn block(max_sequence: u64) -> Vec<u8> {
        postcard::to_allocvec(&max_sequence).unwrap_or_default()
    }

    #[test]
    fn hours_written_after_a_sequence_are_known_from_the_start_on() {
        let mut written = WrittenHours::new(10);
        written.note(&[
            (block_key("buy", 5, 1), Some(block(12))),
            (block_key("buy", 5, 2), Some(block(20))),
            (block_key("buy", -3, 1), Some(block(11))),
            (block_key("view", 7, 1), Some(block(30))),
            // Removals and other keys say nothing.
            (block_key("buy", 9, 1), None),
            (b"Xbuy".to_vec(), Some(block(99))),
        ]);
        assert_eq!(written.hours_after("buy", 10), Some(vec![-3, 5]));
        assert_eq!(written.hours_after("buy", 11), Some(vec![5]));
        assert_eq!(written.hours_after("buy", 20), Some(vec![]));
        assert_eq!(written.hours_after("view", 10), Some(vec![7]));
        assert_eq!(written.hours_after("cart", 10), Some(vec![]));
        // Before the start nothing is known.
        assert_eq!(written.hours_after("buy", 9), None);
        // Nor after a key that does not parse.
        written.note(&[(b"B\x00".to_vec(), Some(block(1)))]);
        assert_eq!(written.hours_after("buy", 20), None);
    }
}
