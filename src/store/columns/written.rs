//! Which hours of each name had blocks written since the store was opened, with the highest
//! sequence written to each: a rollup covering every sequence up to S then knows which blocks
//! may hold events it does not cover without reading every block of the name (reading them
//! all took 4-31 ms of a 12-25 ms rollup answer, BENCHMARKS.md "The rollup keeper").
//!
//! Noted by `Columns` as it puts each block (`put_block`), before the batch is applied, so a
//! reader never sees a block this does not account for. Nothing is known of blocks written
//! before the store was opened, except that their records' sequences are at most the last
//! event sequence then (`since`): a rollup older than that reads every block, and is rebuilt.
//! Memory: one entry per (name, hour) written since the start (16 bytes and the map's
//! overhead; 10 names over 300 days of hours is 72 000 entries), not pruned while it runs.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

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

    /// Notes a block of `name`'s `hour` about to be written, holding sequences up to `sequence`.
    pub(crate) fn note(&mut self, name: &str, hour: i64, sequence: u64) {
        let hours = match self.hours.get_mut(name) {
            Some(hours) => hours,
            None => self.hours.entry(name.to_string()).or_default(),
        };
        let max = hours.entry(hour).or_default();
        *max = (*max).max(sequence);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_written_after_a_sequence_are_known_from_the_start_on() {
        let mut written = WrittenHours::new(10);
        written.note("buy", 5, 12);
        written.note("buy", 5, 20);
        written.note("buy", -3, 11);
        written.note("view", 7, 30);
        assert_eq!(written.hours_after("buy", 10), Some(vec![-3, 5]));
        assert_eq!(written.hours_after("buy", 11), Some(vec![5]));
        assert_eq!(written.hours_after("buy", 20), Some(vec![]));
        assert_eq!(written.hours_after("view", 10), Some(vec![7]));
        assert_eq!(written.hours_after("cart", 10), Some(vec![]));
        // Before the start nothing is known.
        assert_eq!(written.hours_after("buy", 9), None);
    }
}
