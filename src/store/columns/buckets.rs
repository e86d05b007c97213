//! Statistics buckets: per event name and UTC hour (`H`), the number of events and
//! count/sum/min/max of each NUMBER attribute.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Record, ValueRef, HOUR};
use crate::domain::model::{NumberAggregate, Timestamp};

/// Per-bucket statistics of one event name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct BucketSummary {
    pub events: u64,
    /// Per NUMBER attribute.
    pub numbers: BTreeMap<String, NumberAggregate>,
}

impl BucketSummary {
    /// Adds one event's record.
    pub(crate) fn add(&mut self, record: &Record<'_>) {
        self.events += 1;
        for (name, value) in &record.attributes {
            if let ValueRef::Number(n) = value {
                match self.numbers.get_mut(*name) {
                    Some(agg) => agg.add(*n),
                    None => {
                        let mut agg = NumberAggregate::default();
                        agg.add(*n);
                        self.numbers.insert(name.to_string(), agg);
                    }
                }
            }
        }
    }

    /// Adds one event with, if it has one, its number for `attribute` (a summary for one
    /// attribute's statistics, cheaper than [`BucketSummary::add`]).
    pub(crate) fn add_event(&mut self, attribute: &str, number: Option<f64>) {
        self.events += 1;
        if let Some(n) = number {
            match self.numbers.get_mut(attribute) {
                Some(agg) => agg.add(n),
                None => {
                    let mut agg = NumberAggregate::default();
                    agg.add(n);
                    self.numbers.insert(attribute.to_string(), agg);
                }
            }
        }
    }

    /// Adds another summary.
    pub(crate) fn merge(&mut self, other: &BucketSummary) {
        self.events += other.events;
        for (name, agg) in &other.numbers {
            self.numbers.entry(name.clone()).or_default().merge(agg);
        }
    }
}

/// The number of the UTC hour `at` falls in (hours since the epoch, floored): the hour of its
/// block and of its statistics bucket.
pub(crate) fn hour_of(at: Timestamp) -> i64 {
    at.secs.div_euclid(HOUR)
}
