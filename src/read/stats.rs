//! GetEventStats: per-bucket statistics of one event name, read from the maintained per-hour
//! statistics buckets and, for what is not whole hours, the by-name index.
//!
//! **What statistics cost.** COUNT, SUM, MIN, MAX and AVG read the maintained summaries of the
//! whole hours in the range (with the records of the name's stage, which they do not count
//! yet), and the records of the partial hours at its ends from their blocks: a 24-hour hourly
//! chart reads 24 summaries, or 23 and two hours of records. Minute buckets (no summaries are kept per minute) and DISTINCT_USERS (users cannot
//! be summed across buckets) read the name's records in the range.

use std::collections::HashSet;

use super::scan::{blocks, each_row, Span};
use crate::domain::condition::Aggregate;
use crate::domain::model::{NumberAggregate, Timestamp};
use crate::error::Error;
use crate::store::columns::{BucketSummary, Row, ValueRef, HOUR, MINUTE};
use crate::store::Store;

/// The size of a statistics bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub(crate) fn seconds(self) -> i64 {
        match self {
            Granularity::Minute => MINUTE,
            Granularity::Hour => HOUR,
            Granularity::Day => 24 * HOUR,
        }
    }
}

/// Most buckets one GetEventStats call may ask for (a week of minutes is 10 080).
pub(crate) const MAX_BUCKETS: i64 = 20_000;

/// A validated statistics request over `[from, to)`.
#[derive(Clone, Debug)]
pub(crate) struct StatsQuery {
    pub event_name: String,
    pub from: Timestamp,
    pub to: Timestamp,
    pub granularity: Granularity,
    pub aggregate: Aggregate,
    /// The NUMBER attribute of SUM, MIN, MAX and AVG.
    pub attribute: String,
}

/// One bucket: its start, the aggregate's value and the number of events.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StatsBucket {
    pub start: Timestamp,
    pub value: f64,
    pub events: u64,
}

/// Buckets covering the range and the aggregate over all of it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Stats {
    pub buckets: Vec<StatsBucket>,
    pub total: f64,
}

/// The first bucket's start (`from` aligned down) and the number of buckets covering
/// `[from, to)`; `from < to` is checked by the caller.
pub(crate) fn bucket_span(from: Timestamp, to: Timestamp, g: Granularity) -> (i64, i64) {
    let w = g.seconds();
    let first = from.secs.div_euclid(w) * w;
    // The last bucket starts before `to`.
    let last_secs = if to.nanos == 0 { to.secs - 1 } else { to.secs };
    let last = last_secs.div_euclid(w) * w;
    (first, (last - first) / w + 1)
}

/// Actions fired per bucket of `[from, to)` (all triggers, or one): GetActionStats.
pub(crate) fn action_stats(
    store: &Store,
    trigger: Option<&str>,
    from: Timestamp,
    to: Timestamp,
    g: Granularity,
) -> Result<Stats, Error> {
    let (first, n) = bucket_span(from, to, g);
    let w = g.seconds();
    let mut counts = vec![0u64; n.max(0) as usize];
    for t in store.action_times(trigger, from, to)? {
        if let Some(c) = counts.get_mut(((t.secs - first) / w) as usize) {
            *c += 1;
        }
    }
    let total = counts.iter().sum::<u64>() as f64;
    Ok(Stats {
        buckets: counts
            .into_iter()
            .enumerate()
            .map(|(i, c)| StatsBucket {
                start: ts(first + i as i64 * w),
                value: c as f64,
                events: c,
            })
            .collect(),
        total,
    })
}

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_nanos(secs as i128 * 1_000_000_000)
}

fn ceil_to(t: Timestamp, w: i64) -> i64 {
    let down = t.secs.div_euclid(w) * w;
    if down == t.secs && t.nanos == 0 {
        down
    } else {
        down + w
    }
}

fn value_of(summary: &BucketSummary, aggregate: Aggregate, attribute: &str) -> f64 {
    let none = NumberAggregate::default();
    let n = summary.numbers.get(attribute).unwrap_or(&none);
    match aggregate {
        Aggregate::Count | Aggregate::DistinctUsers => summary.events as f64,
        Aggregate::Sum => n.sum,
        Aggregate::Min if n.count > 0 => n.min,
        Aggregate::Max if n.count > 0 => n.max,
        Aggregate::Avg if n.count > 0 => n.sum / n.count as f64,
        _ => 0.0,
    }
}

/// Computes GetEventStats.
pub(crate) fn event_stats(store: &Store, q: &StatsQuery) -> Result<Stats, Error> {
    let w = q.granularity.seconds();
    let (first, count) = bucket_span(q.from, q.to, q.granularity);
    let index = |at: Timestamp| ((at.secs - first).div_euclid(w)) as usize;
    let mut summaries = vec![BucketSummary::default(); count as usize];
    let mut total = BucketSummary::default();
    if q.aggregate == Aggregate::DistinctUsers {
        return distinct_users(store, q, first, count);
    }
    // Pieces: the whole hours inside the range from the hour summaries, the rest (the partial
    // hours at both ends; everything for minute buckets) from the records of the hour blocks.
    // No piece straddles a bucket: buckets are whole minutes, hours or days, and the pieces
    // meet on whole hours. (Minutes have no stored summaries: see `store::columns`.)
    let h0 = ceil_to(q.from, HOUR);
    let h1 = q.to.secs.div_euclid(HOUR) * HOUR;
    // A row counts as an event, and as a number only for the attribute asked for (a COUNT
    // decodes no attributes).
    let mut add_record = |r: Row<'_>| {
        let number = match q.aggregate {
            Aggregate::Count | Aggregate::DistinctUsers => None,
            _ => r.attributes()?.into_iter().find_map(|(k, v)| match v {
                ValueRef::Number(n) if k == q.attribute => Some(n),
                _ => None,
            }),
        };
        if let Some(b) = summaries.get_mut(index(r.occurred_at)) {
            b.add_event(&q.attribute, number);
        }
        total.add_event(&q.attribute, number);
        Ok(())
    };
    // The spans read from the hour blocks, and the whole hours read from the summaries.
    let (partial, whole) = if q.granularity == Granularity::Minute || h0 >= h1 {
        (vec![Span::until(Some(q.from), q.to)], 0..0)
    } else {
        let edges = vec![Span::until(Some(q.from), ts(h0)), Span::until(Some(ts(h1)), q.to)];
        (edges, h0 / HOUR..h1 / HOUR)
    };
    let partial: Vec<Span> = partial.into_iter().filter(|s| !s.is_empty()).collect();
    let hours: Vec<(i64, i64)> = partial.iter().map(|s| s.hours()).collect();
    // One read: a drain between separate reads of the stage and the hours could count a
    // record twice or not at all.
    let view = store.index_view(&q.event_name, whole, &hours)?;
    for span in &partial {
        each_row(&view.blocks, *span, &mut add_record)?;
    }
    // Records waiting in the stage are in no summary: all of the range's are read.
    each_row(&view.stage, Span::until(Some(q.from), q.to), &mut add_record)?;
    for (hour, s) in &view.summaries {
        if let Some(b) = summaries.get_mut(index(ts(hour * HOUR))) {
            b.merge(s);
        }
        total.merge(s);
    }
    let buckets = summaries
        .iter()
        .enumerate()
        .map(|(i, s)| StatsBucket {
            start: ts(first + i as i64 * w),
            value: value_of(s, q.aggregate, &q.attribute),
            events: s.events,
        })
        .collect();
    Ok(Stats {
        buckets,
        total: value_of(&total, q.aggregate, &q.attribute),
    })
}

/// DISTINCT_USERS per bucket and over the range: users cannot be summed across buckets, so it
/// reads the name's records in the range.
fn distinct_users(store: &Store, q: &StatsQuery, first: i64, count: i64) -> Result<Stats, Error> {
    let w = q.granularity.seconds();
    let index = |at: Timestamp| ((at.secs - first).div_euclid(w)) as usize;
    let mut summaries = vec![BucketSummary::default(); count as usize];
    let span = Span::until(Some(q.from), q.to);
    let blocks = blocks(store, &q.event_name, span)?;
    let mut users: Vec<HashSet<&str>> = vec![HashSet::new(); count as usize];
    let mut all: HashSet<&str> = HashSet::new();
    each_row(&blocks, span, &mut |r| {
        let i = index(r.occurred_at);
        if let (Some(s), Some(u)) = (summaries.get_mut(i), users.get_mut(i)) {
            s.events += 1;
            u.insert(r.user_id);
        }
        all.insert(r.user_id);
        Ok(())
    })?;
    let buckets = summaries
        .iter()
        .zip(&users)
        .enumerate()
        .map(|(i, (s, u))| StatsBucket {
            start: ts(first + i as i64 * w),
            value: u.len() as f64,
            events: s.events,
        })
        .collect();
    Ok(Stats {
        buckets,
        total: all.len() as f64,
    })
}
