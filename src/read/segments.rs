//! FilterUsers: the users whose history matches a filter, read from the by-name index of
//! `store::columns`, never from the per-user event keys.
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

use std::collections::{BTreeSet, HashSet};

use rustc_hash::FxHashMap;

use super::scan::{blocks, each_row, Span};
use crate::domain::condition::{self, Accumulator, Aggregate, Condition, HistoryCondition};
use crate::domain::model::{Timestamp, Value};
use crate::error::Error;
use crate::store::columns::{Block, ValueRef};
use crate::store::Store;

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
pub(crate) fn filter_users(
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

fn lookup(attributes: &[(&str, ValueRef<'_>)], name: &str) -> Option<Value> {
    attributes
        .binary_search_by(|(k, _)| (*k).cmp(name))
        .ok()
        .map(|i| attributes[i].1.to_value())
}

/// Folds rows into one accumulator per user for a history condition.
fn fold<'a>(
    h: &HistoryCondition,
    blocks: &'a [Block],
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
    for block in &view.blocks {
        if !view.is_delta_block(block)? {
            continue;
        }
        for r in block.rows(None, as_of)? {
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
    for chunk in &view.chunks {
        for e in chunk.entries()? {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::domain::condition::Operator;
    use crate::domain::model::Event;
    use crate::store::columns::{ColumnWrites, Columns};
    use crate::store::{temp_store, WriteBatch};

    fn event(i: u64, user: u64, secs: i64, amount: Option<f64>) -> Event {
        let mut attributes = BTreeMap::new();
        if let Some(a) = amount {
            attributes.insert("amount".to_string(), crate::domain::model::Value::Number(a));
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

    /// A rollup computed away from the writer is written only if nothing changed the index's
    /// content since its blocks were read (block merges and appends do not; another rollup
    /// written, or an erasure, does), and then answers what a scan answers.
    #[test]
    fn a_rollup_computed_before_the_index_changed_is_not_written() {
        let (_dir, store) = temp_store();
        let mut columns = Columns::default();
        let moves = std::cell::Cell::new(0);
        let add = |columns: &mut Columns, seqs: std::ops::RangeInclusive<u64>| {
            for i in seqs {
                let mut writes = ColumnWrites::default();
                writes.add(&event(i, i % 7, 3600 + i as i64, Some(i as f64)));
                let mut batch = WriteBatch::default();
                columns.write(&store, &mut batch, writes).expect("index");
                moves.set(moves.get() + usize::from(batch.moves_index_records()));
                store.apply(batch).expect("apply");
            }
        };
        add(&mut columns, 1..=60);
        let now = Timestamp {
            secs: 10 * 3600,
            nanos: 0,
        };
        let first = store.compute_rollup("n", 60, now).expect("compute");
        let second = store.compute_rollup("n", 60, now).expect("compute");
        // Appends and the block merges they cause do not make a computed rollup stale.
        let before = moves.get();
        add(&mut columns, 61..=120);
        assert!(moves.get() > before, "the appends merged blocks");
        let mut batch = WriteBatch::default();
        let meta = first
            .write(&store, &mut batch)
            .expect("read")
            .expect("nothing changed since");
        assert_eq!((meta.sequence, meta.users), (60, 7));
        store.apply(batch).expect("apply");
        let mut batch = WriteBatch::default();
        assert!(
            second.write(&store, &mut batch).expect("read").is_none(),
            "the first rollup replaced the one it read"
        );
        assert!(batch.is_empty());
        // An erasure removing a user's records does too.
        let third = store.compute_rollup("n", 60, now).expect("compute");
        let mut batch = WriteBatch::default();
        let hours: BTreeSet<(String, i64)> = [("n".to_string(), 1)].into();
        columns.erase(&store, &mut batch, "u003", &hours).expect("erase");
        let names: BTreeSet<String> = ["n".to_string()].into();
        columns
            .erase_from_rollups(&store, &mut batch, "u003", &names)
            .expect("erase from rollups");
        let mut kept = WriteBatch::default();
        store.apply(batch).expect("apply");
        assert!(
            third.write(&store, &mut kept).expect("read").is_none(),
            "u003 was erased since"
        );
        let h = HistoryCondition {
            event_name: "n".into(),
            filter: None,
            aggregate: Aggregate::Sum,
            attribute: "amount".into(),
            op: Operator::Gt,
            value: 250.0,
            within_nanos: None,
        };
        let mut stale = BTreeSet::new();
        let from_rollup = rollup_history(&store, &h, now, &mut stale)
            .expect("rollup history")
            .expect("a rollup");
        let scanned = history(&store, &h, now).expect("history");
        let list = |u: &Users| match u {
            Users::Only(v) => (true, v.clone()),
            Users::AllBut(v) => (false, v.clone()),
        };
        assert_eq!(list(&from_rollup), list(&scanned));
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

    /// Events written one per write group out of time order go through the stage and its
    /// drains; the same events written in time order in large groups go straight to their
    /// hours. Both answer every statistic and filter alike, after an erasure and a restart of
    /// the writer (which reads the stage back) too.
    #[test]
    fn staged_and_drained_events_answer_as_events_written_in_order() {
        use crate::read::stats::{event_stats, Granularity, StatsQuery};
        let (_d1, staged) = temp_store();
        let (_d2, direct) = temp_store();
        let mut rng = 11u64;
        let mut next = move |n: u64| {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) % n
        };
        let base = 200 * 3600;
        let events: Vec<Event> = (1..=937u64)
            .map(|i| {
                let amount = (next(4) > 0).then(|| next(100) as f64);
                event(i, next(30), base + next(12 * 3600) as i64, amount)
            })
            .collect();
        let one_by_one = |columns: &mut Columns, events: &[Event]| {
            for e in events {
                let mut writes = ColumnWrites::default();
                writes.add(e);
                let mut batch = WriteBatch::default();
                columns.write(&staged, &mut batch, writes).expect("index");
                staged.apply(batch).expect("apply");
            }
        };
        let in_one_group = |columns: &mut Columns, events: &[Event]| {
            let mut writes = ColumnWrites::default();
            for e in events {
                writes.add(e);
            }
            let mut batch = WriteBatch::default();
            columns.write(&direct, &mut batch, writes).expect("index");
            direct.apply(batch).expect("apply");
        };
        let erase = |columns: &mut Columns, store: &Store, user: &str, events: &[Event]| {
            let hours: BTreeSet<(String, i64)> = events
                .iter()
                .filter(|e| e.user_id == user)
                .map(|e| (e.name.clone(), crate::store::columns::hour_of(e.occurred_at)))
                .collect();
            let mut batch = WriteBatch::default();
            columns.erase(store, &mut batch, user, &hours).expect("erase");
            store.apply(batch).expect("apply");
        };
        let (mut s_cols, mut d_cols) = (Columns::draining_at(100), Columns::default());
        one_by_one(&mut s_cols, &events[..550]);
        in_one_group(&mut d_cols, &events[..550]);
        // The last event's user has records in the stage (50 of them wait there) and hours.
        let user = events[549].user_id.clone();
        erase(&mut s_cols, &staged, &user, &events[..550]);
        erase(&mut d_cols, &direct, &user, &events[..550]);
        // A restarted writer knows nothing of the stage but what it reads back.
        let mut s_cols = Columns::draining_at(100);
        one_by_one(&mut s_cols, &events[550..]);
        in_one_group(&mut d_cols, &events[550..]);

        let at = |secs: i64| Timestamp { secs, nanos: 0 };
        let (hours, stage) = staged.hour_summaries("n", 0, i64::MAX / 4).expect("read");
        let in_stage: usize = stage
            .iter()
            .map(|b| b.rows(None, at(i64::MAX / 2)).expect("block").len())
            .sum();
        assert!(!hours.is_empty(), "no drain reached the hours");
        assert!(in_stage > 0 && in_stage < 100, "{in_stage} records in the stage");
        let (_, direct_stage) = direct.hour_summaries("n", 0, i64::MAX / 4).expect("read");
        assert!(direct_stage.is_empty(), "large groups were staged");

        let mut compared = 0;
        for (granularity, from, to) in [
            (Granularity::Hour, base + 1800, base + 23 * 3600 + 600),
            (Granularity::Hour, base, base + 24 * 3600),
            (Granularity::Day, base - 3600, base + 48 * 3600),
            (Granularity::Minute, base + 5 * 3600 + 17, base + 7 * 3600),
        ] {
            for aggregate in [
                Aggregate::Count,
                Aggregate::Sum,
                Aggregate::Min,
                Aggregate::Max,
                Aggregate::Avg,
                Aggregate::DistinctUsers,
            ] {
                let q = StatsQuery {
                    event_name: "n".into(),
                    from: at(from),
                    to: at(to),
                    granularity,
                    aggregate,
                    attribute: "amount".into(),
                };
                assert_eq!(
                    event_stats(&staged, &q).expect("stats"),
                    event_stats(&direct, &q).expect("stats"),
                    "{granularity:?} {aggregate:?} from {from} to {to}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 24);
        let list = |u: Users| match u {
            Users::Only(v) => (true, v),
            Users::AllBut(v) => (false, v),
        };
        for (aggregate, op, value, within_hours) in [
            (Aggregate::Count, Operator::Gte, 30.0, None),
            (Aggregate::Sum, Operator::Gt, 1500.0, None),
            (Aggregate::Count, Operator::Gte, 2.0, Some(6)),
            (Aggregate::Max, Operator::Gte, 90.0, Some(3)),
        ] {
            let h = HistoryCondition {
                event_name: "n".into(),
                filter: None,
                aggregate,
                attribute: "amount".into(),
                op,
                value,
                within_nanos: within_hours.map(|w: i128| w * 3600 * 1_000_000_000),
            };
            let as_of = at(base + 15 * 3600);
            assert_eq!(
                list(history(&staged, &h, as_of).expect("history")),
                list(history(&direct, &h, as_of).expect("history")),
                "{aggregate:?} {op:?} {value} within {within_hours:?}"
            );
        }
        // A rollup over staged records, then more staged and drained after it.
        let now = at(base + 30 * 3600);
        let mut batch = WriteBatch::default();
        s_cols
            .refresh_rollup(&staged, &mut batch, "n", 937, now)
            .expect("rollup");
        staged.apply(batch).expect("apply");
        let more: Vec<Event> = (938..=1100u64)
            .map(|i| event(i, next(30), base + next(12 * 3600) as i64, Some(next(100) as f64)))
            .collect();
        one_by_one(&mut s_cols, &more);
        in_one_group(&mut d_cols, &more);
        let h = HistoryCondition {
            event_name: "n".into(),
            filter: None,
            aggregate: Aggregate::Sum,
            attribute: "amount".into(),
            op: Operator::Gt,
            value: 1800.0,
            within_nanos: None,
        };
        let from_rollup = rollup_history(&staged, &h, now, &mut BTreeSet::new())
            .expect("rollup history")
            .expect("a rollup");
        assert_eq!(
            list(from_rollup),
            list(history(&direct, &h, now).expect("history"))
        );
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

    #[test]
    fn statistics_never_lose_other_users_while_one_is_erased() {
        let (_dir, store) = temp_store();
        let mut columns = Columns::default();
        let secs = 1_000_000 * 3600 + 120;
        let ev = move |i: u64, user: &str| Event {
            event_id: format!("e{i}"),
            user_id: user.into(),
            name: "n".into(),
            occurred_at: Timestamp { secs, nanos: 0 },
            received_at: Timestamp { secs: 0, nanos: 0 },
            sequence: i,
            attributes: BTreeMap::new(),
        };
        let mut writes = ColumnWrites::default();
        writes.add(&ev(1, "b"));
        let mut batch = WriteBatch::default();
        columns.write(&store, &mut batch, writes).expect("index");
        store.apply(batch).expect("apply");
        let hour = secs / 3600;
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let hours: std::collections::BTreeSet<(String, i64)> =
                    [("n".to_string(), secs / 3600)].into_iter().collect();
                for i in 2..1000u64 {
                    let mut writes = ColumnWrites::default();
                    writes.add(&ev(i, "a"));
                    let mut batch = WriteBatch::default();
                    columns.write(&store, &mut batch, writes).expect("index");
                    store.apply(batch).expect("apply");
                    let mut batch = WriteBatch::default();
                    columns.erase(&store, &mut batch, "a", &hours).expect("erase");
                    store.apply(batch).expect("apply");
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let (mut reads, mut zero) = (0u64, 0u64);
        while !done.load(Ordering::SeqCst) {
            // The hour bucket and the stage together (b's event may be in either).
            let q = crate::read::stats::StatsQuery {
                event_name: "n".into(),
                from: Timestamp {
                    secs: hour * 3600,
                    nanos: 0,
                },
                to: Timestamp {
                    secs: (hour + 1) * 3600,
                    nanos: 0,
                },
                granularity: crate::read::stats::Granularity::Hour,
                aggregate: crate::domain::condition::Aggregate::Count,
                attribute: String::new(),
            };
            let n = crate::read::stats::event_stats(&store, &q)
                .expect("stats")
                .buckets[0]
                .events;
            reads += 1;
            if n == 0 {
                zero += 1;
            }
        }
        writer.join().expect("writer");
        assert_eq!(
            zero, 0,
            "user b's event vanished from the hour bucket in {zero} of {reads} reads"
        );
    }
}
