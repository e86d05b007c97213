//! Segments and statistics (QueryService): FilterUsers and GetEventStats, read from the by-name
//! index of [`crate::store::columns`], never from the per-user event keys.
//!
//! **What a filter costs.** A history condition over all history without `where` reads its
//! name's rollup (one packed aggregate per user, in user order) plus the events the rollup does
//! not cover yet. Any other history condition reads the blocks of its event name for the hours
//! its window touches, decoding each record of that name once (about 0.3 µs) and folding the
//! ones inside the window that match `where` into one [`Accumulator`] per user: events of other
//! names are never read. The conditions then combine
//! as sets of users. A condition that users without matching events satisfy (`COUNT < 3`,
//! `not ...`) is kept as the complement of the users who fail it, so no list of all users is
//! needed until the end, and only when the whole filter matches users without events: then the
//! user registry (one key per user) is read once.
//!
//! Every page evaluates the filter again: `as_of` is pinned in the page token, so pages agree
//! with each other as long as no event inside the windows arrives in between.
//!
//! **What statistics cost.** COUNT, SUM, MIN, MAX and AVG read the maintained per-hour summaries
//! of whole hours, per-minute summaries of whole minutes at the range's ends, and for at most
//! two partial minutes the blocks of their hours, decoding only the blocks that overlap them: a
//! 24-hour hourly chart reads 24 to about 140 summaries (23 hours and up to 2 × 59 minutes).
//! DISTINCT_USERS cannot be summed across buckets, so it reads the name's records in the range.

use std::collections::{BTreeSet, HashSet};

use crate::condition::{self, Accumulator, Aggregate, Condition, HistoryCondition};
use crate::error::Error;
use crate::model::{NumberAggregate, Timestamp, Value};
use crate::store::columns::{self, bucket_of, BucketSummary, Level, Record, Row, ValueRef, HOUR, MINUTE};
use crate::store::Store;
use rustc_hash::FxHashMap;
use sled::IVec;

/// A set of users: listed, or everyone with events except those listed. Lists are sorted.
#[derive(Debug)]
enum Users {
    Only(Vec<String>),
    AllBut(Vec<String>),
}

fn intersect(a: &[String], b: &[String]) -> Vec<String> {
    let set: HashSet<&str> = b.iter().map(String::as_str).collect();
    a.iter().filter(|u| set.contains(u.as_str())).cloned().collect()
}

fn minus(a: &[String], b: &[String]) -> Vec<String> {
    let set: HashSet<&str> = b.iter().map(String::as_str).collect();
    a.iter().filter(|u| !set.contains(u.as_str())).cloned().collect()
}

fn union(a: Vec<String>, b: Vec<String>) -> Vec<String> {
    let mut out = a;
    out.extend(b);
    out.sort_unstable();
    out.dedup();
    out
}

impl Users {
    fn and(self, other: Users) -> Users {
        use Users::*;
        match (self, other) {
            (Only(a), Only(b)) => Only(intersect(&a, &b)),
            (Only(a), AllBut(b)) | (AllBut(b), Only(a)) => Only(minus(&a, &b)),
            (AllBut(a), AllBut(b)) => AllBut(union(a, b)),
        }
    }

    fn or(self, other: Users) -> Users {
        use Users::*;
        match (self, other) {
            (Only(a), Only(b)) => Only(union(a, b)),
            (Only(a), AllBut(b)) | (AllBut(b), Only(a)) => AllBut(minus(&b, &a)),
            (AllBut(a), AllBut(b)) => AllBut(intersect(&a, &b)),
        }
    }

    fn not(self) -> Users {
        match self {
            Users::Only(a) => Users::AllBut(a),
            Users::AllBut(a) => Users::Only(a),
        }
    }
}

/// The users whose history matches `filter` at `as_of`, ascending. `filter` was validated with
/// [`condition::Place::Filter`].
/// Names whose rollup is missing or lags are added to `stale` (the caller asks the writer to
/// rebuild them; see [`rollup_history`]).
pub fn filter_users(
    store: &Store,
    filter: &Condition,
    as_of: Timestamp,
    stale: &mut BTreeSet<String>,
) -> Result<Vec<String>, Error> {
    match eval(store, filter, as_of, stale)? {
        Users::Only(users) => Ok(users),
        Users::AllBut(excluded) => {
            let excluded: HashSet<&str> = excluded.iter().map(String::as_str).collect();
            let mut out = Vec::new();
            for user in store.users() {
                let user = user?;
                if !excluded.contains(user.as_str()) {
                    out.push(user);
                }
            }
            Ok(out)
        }
    }
}

fn eval(
    store: &Store,
    cond: &Condition,
    as_of: Timestamp,
    stale: &mut BTreeSet<String>,
) -> Result<Users, Error> {
    match cond {
        Condition::All(items) => {
            let mut acc = Users::AllBut(Vec::new());
            for c in items {
                acc = acc.and(eval(store, c, as_of, stale)?);
                if matches!(&acc, Users::Only(v) if v.is_empty()) {
                    break;
                }
            }
            Ok(acc)
        }
        Condition::Any(items) => {
            let mut acc = Users::Only(Vec::new());
            for c in items {
                acc = acc.or(eval(store, c, as_of, stale)?);
            }
            Ok(acc)
        }
        Condition::Not(inner) => Ok(eval(store, inner, as_of, stale)?.not()),
        Condition::History(h) if h.filter.is_none() && h.within_nanos.is_none() => {
            if let Some(users) = rollup_history(store, h, as_of, stale)? {
                return Ok(users);
            }
            history(store, h, as_of)
        }
        Condition::History(h) => history(store, h, as_of),
        Condition::Attribute(_) => Err(Error::Internal(
            "an attribute condition outside a where reached FilterUsers".into(),
        )),
    }
}

/// A time range of events: `[from, to]`, or `[from, to)` unless `inclusive_to`.
#[derive(Clone, Copy)]
struct Span {
    from: Option<Timestamp>,
    to: Timestamp,
    inclusive_to: bool,
}

impl Span {
    fn until(from: Option<Timestamp>, to: Timestamp) -> Self {
        Span {
            from,
            to,
            inclusive_to: false,
        }
    }

    /// The last instant inside the span.
    fn last(self) -> Timestamp {
        if self.inclusive_to {
            self.to
        } else {
            Timestamp::from_nanos(self.to.as_nanos() - 1)
        }
    }

    fn contains(self, at: Timestamp) -> bool {
        at <= self.last() && self.from.is_none_or(|f| at >= f)
    }
}

/// The blocks of `name` for the hours `span` touches.
fn blocks(store: &Store, name: &str, span: Span) -> Result<Vec<(IVec, IVec)>, Error> {
    let from_hour = span.from.map_or(i64::MIN, |t| bucket_of(t, Level::Hour));
    let to_hour = bucket_of(span.last(), Level::Hour);
    Ok(store.blocks(name, from_hour, to_hour)?)
}

/// Calls `f` for every row of `blocks` inside `span`, block by block (rows of one hour are not
/// in global time order); blocks entirely outside the span are skipped undecoded.
fn each_row<'a>(
    blocks: &'a [(IVec, IVec)],
    span: Span,
    f: &mut dyn FnMut(Row<'a>) -> Result<(), Error>,
) -> Result<(), Error> {
    let last = span.last();
    for (key, value) in blocks {
        for r in columns::decode_block(key, value, span.from, last)? {
            if span.contains(r.occurred_at) {
                f(r)?;
            }
        }
    }
    Ok(())
}

/// Reads the records of `name` in `span` and calls `f` with each.
fn for_records(store: &Store, name: &str, span: Span, f: &mut dyn FnMut(&Record<'_>)) -> Result<(), Error> {
    let blocks = blocks(store, name, span)?;
    each_row(&blocks, span, &mut |r| {
        f(&r.record()?);
        Ok(())
    })
}

fn lookup(attributes: &[(&str, ValueRef<'_>)], name: &str) -> Option<Value> {
    attributes
        .binary_search_by(|(k, _)| (*k).cmp(name))
        .ok()
        .map(|i| attributes[i].1.to_value())
}

/// Folds rows into one accumulator per user for a history condition.
fn fold<'a>(
    h: &HistoryCondition,
    blocks: &'a [(IVec, IVec)],
    span: Span,
) -> Result<FxHashMap<&'a str, Accumulator>, Error> {
    let mut accs: FxHashMap<&str, Accumulator> = FxHashMap::default();
    let needs_attributes = h.filter.is_some() || !matches!(h.aggregate, Aggregate::Count);
    each_row(blocks, span, &mut |r| {
        let mut number = None;
        if needs_attributes {
            let attributes = r.attributes()?;
            if let Some(filter) = &h.filter {
                if !condition::eval_where(filter, &mut |name| lookup(&attributes, name)) {
                    return Ok(());
                }
            }
            if let Ok(i) = attributes.binary_search_by(|(k, _)| (*k).cmp(h.attribute.as_str())) {
                if let ValueRef::Number(n) = attributes[i].1 {
                    number = Some(n);
                }
            }
        }
        accs.entry(r.user_id).or_default().add_number(number);
        Ok(())
    })?;
    Ok(accs)
}

/// Blocks above which a history condition is folded on two threads (this many blocks hold
/// thousands of events; below it a thread costs more than it saves).
const PARALLEL_BLOCKS: usize = 64;

/// Splits users into those a condition holds for and the rest, as [`Users`].
fn users_where(zero_holds: bool, mut users: Vec<String>) -> Users {
    users.sort_unstable();
    if zero_holds {
        Users::AllBut(users)
    } else {
        Users::Only(users)
    }
}

/// A rollup is rebuilt when the events it does not cover exceed this, or a quarter of its users.
const ROLLUP_LAG: usize = 4096;

/// An all-history condition without `where`, answered from the name's rollup (one maintained
/// aggregate per user, packed in chunks of 4096 users, read in user order without decoding any
/// event) plus the events the rollup does not cover yet (blocks newer than it, usually the
/// current hour). `None` when the name has no rollup or `as_of` is before its cutoff: the caller
/// scans the events instead. A missing or lagging rollup is reported in `stale`.
fn rollup_history(
    store: &Store,
    h: &HistoryCondition,
    as_of: Timestamp,
    stale: &mut BTreeSet<String>,
) -> Result<Option<Users>, Error> {
    let Some(view) = store.rollup_view(&h.event_name)? else {
        stale.insert(h.event_name.clone());
        return Ok(None);
    };
    if as_of < view.meta.cutoff {
        return Ok(None);
    }
    let mut delta: FxHashMap<&str, Accumulator> = FxHashMap::default();
    let mut delta_events = 0usize;
    for (key, value) in &view.blocks {
        if !view.is_delta_block(key, value)? {
            continue;
        }
        for r in columns::decode_block(key, value, None, as_of)? {
            if r.occurred_at > as_of || !view.is_delta(r.sequence, r.occurred_at) {
                continue;
            }
            delta_events += 1;
            let number = if matches!(h.aggregate, Aggregate::Count) {
                None
            } else {
                r.attributes()?
                    .into_iter()
                    .find(|(k, _)| *k == h.attribute)
                    .and_then(|(_, v)| match v {
                        ValueRef::Number(n) => Some(n),
                        _ => None,
                    })
            };
            delta.entry(r.user_id).or_default().add_number(number);
        }
    }
    if delta_events > ROLLUP_LAG.max(view.meta.users as usize / 4) {
        stale.insert(h.event_name.clone());
    }
    let zero_holds = h.holds(&Accumulator::default());
    let mut users = Vec::new();
    for (key, value) in &view.chunks {
        for e in columns::decode_rollup_chunk(key, value)? {
            let number = e.numbers.iter().find(|(k, _)| *k == h.attribute).map(|(_, n)| n);
            let mut acc = Accumulator::from_parts(e.count, number);
            if let Some(d) = delta.remove(e.user_id) {
                acc.merge(&d);
            }
            if h.holds(&acc) != zero_holds {
                users.push(e.user_id.to_string());
            }
        }
    }
    for (user, acc) in delta {
        if h.holds(&acc) != zero_holds {
            users.push(user.to_string());
        }
    }
    Ok(Some(users_where(zero_holds, users)))
}

/// The users for whom one history condition holds at `as_of`: window (as_of − within, as_of].
/// Reads the name's blocks of the window's hours; decodes attributes only when `where` or the
/// aggregate needs them. Large scans are split over two threads.
fn history(store: &Store, h: &HistoryCondition, as_of: Timestamp) -> Result<Users, Error> {
    // (as_of − within, as_of] as [from, as_of] with from one nanosecond after the open end.
    let from = h
        .within_nanos
        .map(|w| Timestamp::from_nanos(as_of.as_nanos() - w + 1));
    let span = Span {
        from,
        to: as_of,
        inclusive_to: true,
    };
    let blocks = blocks(store, &h.event_name, span)?;
    let accs = if blocks.len() >= PARALLEL_BLOCKS {
        let (left, right) = blocks.split_at(blocks.len() / 2);
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(|| fold(h, right, span));
            let mine = fold(h, left, span);
            (mine, other.join())
        });
        let mut a = a?;
        let b = b.map_err(|_| Error::Internal("a filter thread panicked".into()))??;
        for (user, acc) in b {
            a.entry(user).or_default().merge(&acc);
        }
        a
    } else {
        fold(h, &blocks, span)?
    };
    let zero_holds = h.holds(&Accumulator::default());
    let users: Vec<String> = accs
        .into_iter()
        .filter(|(_, acc)| h.holds(acc) != zero_holds)
        .map(|(u, _)| u.to_string())
        .collect();
    Ok(users_where(zero_holds, users))
}

/// The size of a statistics bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn seconds(self) -> i64 {
        match self {
            Granularity::Minute => MINUTE,
            Granularity::Hour => HOUR,
            Granularity::Day => 24 * HOUR,
        }
    }
}

/// Most buckets one GetEventStats call may ask for (a week of minutes is 10 080).
pub const MAX_BUCKETS: i64 = 20_000;

/// A validated statistics request over `[from, to)`.
#[derive(Clone, Debug)]
pub struct StatsQuery {
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
pub struct StatsBucket {
    pub start: Timestamp,
    pub value: f64,
    pub events: u64,
}

/// Buckets covering the range and the aggregate over all of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub buckets: Vec<StatsBucket>,
    pub total: f64,
}

/// The first bucket's start (`from` aligned down) and the number of buckets covering
/// `[from, to)`; `from < to` is checked by the caller.
pub fn bucket_span(from: Timestamp, to: Timestamp, g: Granularity) -> (i64, i64) {
    let w = g.seconds();
    let first = from.secs.div_euclid(w) * w;
    // The last bucket starts before `to`.
    let last_secs = if to.nanos == 0 { to.secs - 1 } else { to.secs };
    let last = last_secs.div_euclid(w) * w;
    (first, (last - first) / w + 1)
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
pub fn event_stats(store: &Store, q: &StatsQuery) -> Result<Stats, Error> {
    let w = q.granularity.seconds();
    let (first, count) = bucket_span(q.from, q.to, q.granularity);
    let index = |at: Timestamp| ((at.secs - first).div_euclid(w)) as usize;
    let mut summaries = vec![BucketSummary::default(); count as usize];
    let mut total = BucketSummary::default();
    if q.aggregate == Aggregate::DistinctUsers {
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
        return Ok(Stats {
            buckets,
            total: all.len() as f64,
        });
    }
    // Pieces: partial minutes at both ends from records, whole minutes from minute summaries,
    // whole hours from hour summaries. No piece straddles a bucket: buckets are whole minutes,
    // hours or days.
    let m0 = ceil_to(q.from, MINUTE);
    let m1 = q.to.secs.div_euclid(MINUTE) * MINUTE;
    let mut add = |at: Timestamp, s: &BucketSummary| {
        if let Some(b) = summaries.get_mut(index(at)) {
            b.merge(s);
        }
        total.merge(s);
    };
    if m0 >= m1 {
        // The whole range lies inside one minute (or two partial ones).
        for_records(store, &q.event_name, Span::until(Some(q.from), q.to), &mut |r| {
            let mut s = BucketSummary::default();
            s.add(r);
            add(r.occurred_at, &s);
        })?;
    } else {
        for_records(
            store,
            &q.event_name,
            Span::until(Some(q.from), ts(m0)),
            &mut |r| {
                let mut s = BucketSummary::default();
                s.add(r);
                add(r.occurred_at, &s);
            },
        )?;
        for_records(store, &q.event_name, Span::until(Some(ts(m1)), q.to), &mut |r| {
            let mut s = BucketSummary::default();
            s.add(r);
            add(r.occurred_at, &s);
        })?;
        let (h0, h1) = if q.granularity == Granularity::Minute {
            (m1, m1)
        } else {
            let h0 = ceil_to(ts(m0), HOUR);
            let h1 = m1.div_euclid(HOUR) * HOUR;
            if h0 < h1 {
                (h0, h1)
            } else {
                (m1, m1)
            }
        };
        let minute_ranges = if h0 < h1 {
            vec![(m0, h0), (h1, m1)]
        } else {
            vec![(m0, m1)]
        };
        for (a, b) in minute_ranges {
            if a < b {
                for (minute, s) in store.buckets(Level::Minute, &q.event_name, a / MINUTE, b / MINUTE)? {
                    add(ts(minute * MINUTE), &s);
                }
            }
        }
        if h0 < h1 {
            for (hour, s) in store.buckets(Level::Hour, &q.event_name, h0 / HOUR, h1 / HOUR)? {
                add(ts(hour * HOUR), &s);
            }
        }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::condition::Operator;
    use crate::model::Event;
    use crate::store::columns::{ColumnWrites, Columns};
    use crate::store::{temp_store, WriteBatch};

    fn event(i: u64, user: u64, secs: i64, amount: Option<f64>) -> Event {
        let mut attributes = BTreeMap::new();
        if let Some(a) = amount {
            attributes.insert("amount".to_string(), crate::model::Value::Number(a));
        }
        Event {
            event_id: format!("e{i}"),
            user_id: format!("u{user:03}"),
            name: "n".into(),
            occurred_at: Timestamp { secs, nanos: 0 },
            received_at: Timestamp { secs: 0, nanos: 0 },
            sequence: i,
            attributes,
        }
    }

    /// A rollup plus the events it does not cover answers exactly what scanning every event
    /// answers: events before and after the rollup, late-dated ones (older than its cutoff but
    /// stored after it) and future-dated ones (stored before it, dated after its cutoff).
    #[test]
    fn rollups_answer_what_a_scan_answers() {
        let (_dir, store) = temp_store();
        let mut columns = Columns::default();
        let cutoff = Timestamp {
            secs: 100 * 3600,
            nanos: 0,
        };
        let mut seq = 0u64;
        let mut rng = 7u64;
        let mut next = move |n: u64| {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) % n
        };
        // Events dated in [from_hour, from_hour + hours), one write group each.
        let mut add = |columns: &mut Columns, count: u64, from_hour: i64, hours: u64| {
            for _ in 0..count {
                seq += 1;
                let amount = (next(4) > 0).then(|| next(100) as f64);
                let secs = from_hour * 3600 + next(hours * 3600) as i64;
                let mut writes = ColumnWrites::default();
                writes.add(&event(seq, next(40), secs, amount));
                let mut batch = WriteBatch::default();
                columns.write(&store, &mut batch, writes).expect("index");
                store.apply(batch).expect("apply");
            }
            seq
        };
        // Before the rollup: mostly before the cutoff, some dated after it.
        let last = add(&mut columns, 300, 90, 20);
        let mut batch = WriteBatch::default();
        columns
            .refresh_rollup(&store, &mut batch, "n", last, cutoff)
            .expect("rollup");
        store.apply(batch).expect("apply");
        // After it: late-dated and current events.
        add(&mut columns, 200, 95, 10);
        let mut checked = 0;
        for (aggregate, op, value) in [
            (Aggregate::Count, Operator::Gte, 8.0),
            (Aggregate::Count, Operator::Lt, 10.0),
            (Aggregate::Sum, Operator::Gt, 400.0),
            (Aggregate::Min, Operator::Lt, 5.0),
            (Aggregate::Max, Operator::Gte, 97.0),
            (Aggregate::Avg, Operator::Lt, 45.0),
        ] {
            let h = HistoryCondition {
                event_name: "n".into(),
                filter: None,
                aggregate,
                attribute: "amount".into(),
                op,
                value,
                within_nanos: None,
            };
            for as_of_hour in [100, 101, 104, 106] {
                let as_of = Timestamp {
                    secs: as_of_hour * 3600,
                    nanos: 0,
                };
                let mut stale = BTreeSet::new();
                let from_rollup = rollup_history(&store, &h, as_of, &mut stale)
                    .expect("rollup history")
                    .expect("a rollup exists and covers as_of");
                let scanned = history(&store, &h, as_of).expect("history");
                let list = |u: &Users| match u {
                    Users::Only(v) => (true, v.clone()),
                    Users::AllBut(v) => (false, v.clone()),
                };
                assert_eq!(
                    list(&from_rollup),
                    list(&scanned),
                    "{aggregate:?} {op:?} {value} at hour {as_of_hour}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 24);
        // Before its cutoff a rollup is not used.
        let h = HistoryCondition {
            event_name: "n".into(),
            filter: None,
            aggregate: Aggregate::Count,
            attribute: String::new(),
            op: Operator::Gte,
            value: 1.0,
            within_nanos: None,
        };
        let early = Timestamp {
            secs: 99 * 3600,
            nanos: 0,
        };
        assert!(rollup_history(&store, &h, early, &mut BTreeSet::new())
            .expect("read")
            .is_none());
    }

    /// A writer adds one user per batch in one hour, so blocks merge all the time; a reader
    /// filters meanwhile. Every user applied before a read started must be in its answer.
    #[test]
    fn a_merge_never_hides_records_from_a_running_filter() {
        let (_dir, store) = temp_store();
        let applied = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, applied, done) = (store.clone(), applied.clone(), done.clone());
            std::thread::spawn(move || {
                let mut columns = Columns::default();
                for i in 1..=15000u64 {
                    let mut writes = ColumnWrites::default();
                    writes.add(&Event {
                        event_id: format!("e{i}"),
                        user_id: format!("u{i:06}"),
                        name: "n".into(),
                        occurred_at: Timestamp {
                            secs: 1_000_000 * 3600 + (i as i64 % 3600),
                            nanos: 0,
                        },
                        received_at: Timestamp { secs: 0, nanos: 0 },
                        sequence: i,
                        attributes: BTreeMap::new(),
                    });
                    let mut batch = WriteBatch::default();
                    columns.write(&store, &mut batch, writes).expect("index");
                    store.apply(batch).expect("apply");
                    applied.fetch_add(1, Ordering::SeqCst);
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let cond = Condition::History(HistoryCondition {
            event_name: "n".into(),
            filter: None,
            aggregate: Aggregate::Count,
            attribute: String::new(),
            op: Operator::Gte,
            value: 1.0,
            within_nanos: None,
        });
        let far = Timestamp {
            secs: 2_000_000 * 3600,
            nanos: 0,
        };
        while !done.load(Ordering::SeqCst) {
            let before = applied.load(Ordering::SeqCst);
            let found = filter_users(&store, &cond, far, &mut BTreeSet::new())
                .expect("filter")
                .len();
            assert!(
                found >= before,
                "{found} users found, {before} applied before the read"
            );
        }
        writer.join().expect("writer");
    }
}
