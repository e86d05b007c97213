//! Statistics buckets: per event name and UTC hour (`H`), the number of events and
//! count/sum/min/max of each NUMBER attribute.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::super::keys::HOUR_BUCKET;
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

    /// Adds another summary.
    pub(crate) fn merge(&mut self, other: &BucketSummary) {
        self.events += other.events;
        for (name, agg) in &other.numbers {
            self.numbers.entry(name.clone()).or_default().merge(agg);
        }
    }
}

/// The granularity a statistics bucket is kept at: hours (minutes are computed from the
/// blocks, see [`super`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Level {
    Hour,
}

impl Level {
    pub(crate) fn seconds(self) -> i64 {
        match self {
            Level::Hour => HOUR,
        }
    }

    pub(super) fn prefix(self) -> u8 {
        match self {
            Level::Hour => HOUR_BUCKET,
        }
    }
}

/// The number of the hour `at` falls in (periods since the epoch, floored).
pub(crate) fn period_of(at: Timestamp, level: Level) -> i64 {
    at.secs.div_euclid(level.seconds())
}
