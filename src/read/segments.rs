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
    if view.every_block {
        stale.insert(h.event_name.clone());
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
    use std::collections::{BTreeMap, HashMap};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::domain::condition::Operator;
    use crate::domain::model::Event;
    use crate::store::columns::{ColumnWrites, Columns};
    use crate::store::{temp_store, WriteBatch};

    /// A deterministic generator: `next(n)` is a number below `n`.
    fn numbers(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut state = seed;
        move |n| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        }
    }

    /// A history condition on the `amount` attribute, without `where`.
    fn amount_history(
        name: &str,
        aggregate: Aggregate,
        op: Operator,
        value: f64,
        within_nanos: Option<i128>,
    ) -> HistoryCondition {
        HistoryCondition {
            event_name: name.into(),
            filter: None,
            aggregate,
            attribute: "amount".into(),
            op,
            value,
            within_nanos,
        }
    }

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
        let h = amount_history("n", Aggregate::Sum, Operator::Gt, 250.0, None);
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
        let mut next = numbers(7);
        // Events dated in [from_hour, from_hour + hours), one write group each (`group`: all in
        // one group).
        let mut add = |columns: &mut Columns,
                       count: u64,
                       from_hour: i64,
                       hours: u64,
                       users: u64,
                       spread: u64,
                       group: bool| {
            let mut writes = ColumnWrites::default();
            for i in 0..count {
                seq += 1;
                let amount = (next(4) > 0).then(|| next(100) as f64);
                let secs = from_hour * 3600 + next(hours * 3600) as i64;
                writes.add(&event(seq, next(users) * spread, secs, amount));
                if !group || i + 1 == count {
                    let mut batch = WriteBatch::default();
                    columns
                        .write(&store, &mut batch, std::mem::take(&mut writes))
                        .expect("index");
                    store.apply(batch).expect("apply");
                }
            }
            seq
        };
        // Before the rollup: mostly before the cutoff, some dated after it.
        let last = add(&mut columns, 300, 90, 20, 40, 3, false);
        let mut batch = WriteBatch::default();
        columns
            .refresh_rollup(&store, &mut batch, "n", last, cutoff)
            .expect("rollup");
        store.apply(batch).expect("apply");
        // After it: late-dated and current events, one group of them large enough for a block
        // of its own in an hour before the cutoff (not the stage).
        add(&mut columns, 200, 95, 10, 40, 3, false);
        let last = add(&mut columns, 12, 92, 1, 40, 3, true);
        let mut checked = 0;
        check_rollup_against_scan(&store, &mut checked);
        // Rebuilt from the old rollup and what it did not cover, then more events, of new
        // users too (u000-u119 between the old u000, u003, ..., u117: the merge interleaves them).
        let mut batch = WriteBatch::default();
        columns
            .refresh_rollup(&store, &mut batch, "n", last, cutoff)
            .expect("rollup");
        store.apply(batch).expect("apply");
        add(&mut columns, 150, 96, 8, 120, 1, false);
        add(&mut columns, 10, 93, 1, 120, 1, true);
        check_rollup_against_scan(&store, &mut checked);
        assert_eq!(checked, 48);
        // Before its cutoff a rollup is not used.
        let h = any_event("n");
        let early = Timestamp {
            secs: 99 * 3600,
            nanos: 0,
        };
        assert!(rollup_history(&store, &h, early, &mut BTreeSet::new())
            .expect("read")
            .is_none());
    }

    /// "At least one event of `name`, over all history."
    fn any_event(name: &str) -> HistoryCondition {
        HistoryCondition {
            event_name: name.into(),
            filter: None,
            aggregate: Aggregate::Count,
            attribute: String::new(),
            op: Operator::Gte,
            value: 1.0,
            within_nanos: None,
        }
    }

    /// Every aggregate of `amount` at a few as_of, from the rollup and from a scan: the same users.
    fn check_rollup_against_scan(store: &Store, checked: &mut usize) {
        for (aggregate, op, value) in [
            (Aggregate::Count, Operator::Gte, 8.0),
            (Aggregate::Count, Operator::Lt, 10.0),
            (Aggregate::Sum, Operator::Gt, 400.0),
            (Aggregate::Min, Operator::Lt, 5.0),
            (Aggregate::Max, Operator::Gte, 97.0),
            (Aggregate::Avg, Operator::Lt, 45.0),
        ] {
            let h = amount_history("n", aggregate, op, value, None);
            for as_of_hour in [100, 101, 104, 106] {
                let as_of = Timestamp {
                    secs: as_of_hour * 3600,
                    nanos: 0,
                };
                let mut stale = BTreeSet::new();
                let from_rollup = rollup_history(store, &h, as_of, &mut stale)
                    .expect("rollup history")
                    .expect("a rollup exists and covers as_of");
                let scanned = history(store, &h, as_of).expect("history");
                let list = |u: &Users| match u {
                    Users::Only(v) => (true, v.clone()),
                    Users::AllBut(v) => (false, v.clone()),
                };
                assert_eq!(
                    list(&from_rollup),
                    list(&scanned),
                    "{aggregate:?} {op:?} {value} at hour {as_of_hour}"
                );
                *checked += 1;
            }
        }
    }

    /// Events written one per write group out of time order go through the stage and its
    /// drains; the same events written in time order in large groups go straight to their
    /// hours. Both answer every statistic and filter alike: across drains, an erasure (with
    /// the same writer going on after it), a restart of the writer (which reads the stage back),
    /// a group of more than a full block in one hour, two names, and a rollup built while
    /// the stage holds events dated after its cutoff. The stage holds exactly the records a
    /// model of it predicts.
    #[test]
    fn staged_and_drained_events_answer_as_events_written_in_order() {
        use crate::read::stats::{event_stats, Granularity, StatsQuery};
        use crate::store::columns::hour_of;
        const DRAIN: usize = 100;
        let (_d1, staged) = temp_store();
        let (_d2, direct) = temp_store();
        let mut next = numbers(11);
        let base = 200 * 3600;
        let names = ["n", "m"];
        let mut seq = 0u64;
        let mut make = |count: u64, from: i64, span: u64| -> Vec<Event> {
            (0..count)
                .map(|_| {
                    seq += 1;
                    let amount = (next(4) > 0).then(|| next(100) as f64);
                    let mut e = event(seq, next(30), from + next(span) as i64, amount);
                    e.name = names[next(2) as usize].into();
                    e
                })
                .collect()
        };
        // The model: the records each name's stage should hold (by sequence).
        let mut model: HashMap<String, BTreeSet<u64>> = HashMap::new();
        let one_by_one =
            |columns: &mut Columns, events: &[Event], model: &mut HashMap<String, BTreeSet<u64>>| {
                for e in events {
                    let stage = model.entry(e.name.clone()).or_default();
                    if stage.len() + 1 >= DRAIN {
                        stage.clear();
                    } else {
                        stage.insert(e.sequence);
                    }
                    let mut writes = ColumnWrites::default();
                    writes.add(e);
                    let mut batch = WriteBatch::default();
                    columns.write(&staged, &mut batch, writes).expect("index");
                    staged.apply(batch).expect("apply");
                }
            };
        let in_one_group = |columns: &mut Columns, store: &Store, events: &[Event]| {
            let mut writes = ColumnWrites::default();
            for e in events {
                writes.add(e);
            }
            let mut batch = WriteBatch::default();
            columns.write(store, &mut batch, writes).expect("index");
            store.apply(batch).expect("apply");
        };
        let erase = |columns: &mut Columns, store: &Store, user: &str, events: &[Event]| {
            let hours: BTreeSet<(String, i64)> = events
                .iter()
                .filter(|e| e.user_id == user)
                .map(|e| (e.name.clone(), hour_of(e.occurred_at)))
                .collect();
            let mut batch = WriteBatch::default();
            columns.erase(store, &mut batch, user, &hours).expect("erase");
            store.apply(batch).expect("apply");
        };
        let at = |secs: i64| Timestamp { secs, nanos: 0 };
        let check_stage = |model: &HashMap<String, BTreeSet<u64>>| {
            for name in names {
                let view = staged.index_view(name, 0..0, &[]).expect("read");
                let mut held = BTreeSet::new();
                for b in &view.stage {
                    for r in b.rows(None, at(i64::MAX / 2)).expect("block") {
                        assert!(held.insert(r.sequence), "sequence {} staged twice", r.sequence);
                    }
                }
                let empty = BTreeSet::new();
                assert_eq!(&held, model.get(name).unwrap_or(&empty), "the stage of {name}");
            }
        };
        let mut written: Vec<Event> = make(550, base, 12 * 3600);
        let (mut s_cols, mut d_cols) = (Columns::draining_at(DRAIN), Columns::default());
        one_by_one(&mut s_cols, &written, &mut model);
        in_one_group(&mut d_cols, &direct, &written);
        check_stage(&model);
        // The last event's user has records in a stage and in hours; the same writer goes on.
        let user = written[549].user_id.clone();
        assert!(model.values().any(|m| m.contains(&written[549].sequence)));
        erase(&mut s_cols, &staged, &user, &written);
        erase(&mut d_cols, &direct, &user, &written);
        let erased: BTreeSet<u64> = written
            .iter()
            .filter(|e| e.user_id == user)
            .map(|e| e.sequence)
            .collect();
        for stage in model.values_mut() {
            stage.retain(|s| !erased.contains(s));
        }
        written.retain(|e| e.user_id != user);
        let more = make(250, base, 12 * 3600);
        one_by_one(&mut s_cols, &more, &mut model);
        in_one_group(&mut d_cols, &direct, &more);
        written.extend(more);
        check_stage(&model);
        // A restarted writer knows nothing of the stage but what it reads back.
        let mut s_cols = Columns::draining_at(DRAIN);
        let more = make(137, base, 12 * 3600);
        one_by_one(&mut s_cols, &more, &mut model);
        in_one_group(&mut d_cols, &direct, &more);
        written.extend(more);
        check_stage(&model);
        // More than a full block in one hour, in one group: straight to the hour, in full blocks.
        let big = make(1300, base + 4 * 3600, 3600);
        in_one_group(&mut s_cols, &staged, &big);
        in_one_group(&mut d_cols, &direct, &big);
        for name in names {
            let hour = hour_of(at(base + 4 * 3600));
            let blocks = staged.blocks(name, hour, hour).expect("blocks");
            for b in &blocks {
                let n = b.rows(None, at(i64::MAX / 2)).expect("block").len();
                assert!(n <= crate::store::columns::FULL, "a block of {n} records");
            }
        }
        check_stage(&model);
        for name in names {
            let view = staged.index_view(name, 0..i64::MAX / 4, &[]).expect("read");
            assert!(!view.summaries.is_empty(), "no drain of {name} reached the hours");
        }

        let compare = |what: &str| {
            let mut compared = 0;
            for name in names {
                for (granularity, from, to) in [
                    (Granularity::Hour, base + 1800, base + 23 * 3600 + 600),
                    (Granularity::Hour, base, base + 48 * 3600),
                    (Granularity::Day, base - 3600, base + 72 * 3600),
                    (Granularity::Minute, base + 3 * 3600 + 17, base + 5 * 3600),
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
                            event_name: name.into(),
                            from: at(from),
                            to: at(to),
                            granularity,
                            aggregate,
                            attribute: "amount".into(),
                        };
                        assert_eq!(
                            event_stats(&staged, &q).expect("stats"),
                            event_stats(&direct, &q).expect("stats"),
                            "{what}: {name} {granularity:?} {aggregate:?} from {from} to {to}"
                        );
                        compared += 1;
                    }
                }
            }
            assert_eq!(compared, 48);
        };
        compare("after the load");
        let list = |u: Users| match u {
            Users::Only(v) => (true, v),
            Users::AllBut(v) => (false, v),
        };
        let as_of = at(base + 10 * 3600);
        for (aggregate, op, value, within_hours) in [
            (Aggregate::Count, Operator::Gte, 30.0, None),
            (Aggregate::Sum, Operator::Gt, 1500.0, None),
            (Aggregate::Count, Operator::Gte, 2.0, Some(6)),
            (Aggregate::Max, Operator::Gte, 90.0, Some(3)),
        ] {
            let h = amount_history(
                "n",
                aggregate,
                op,
                value,
                within_hours.map(|w: i128| w * 3600 * 1_000_000_000),
            );
            let (a, b) = (
                list(history(&staged, &h, as_of).expect("history")),
                list(history(&direct, &h, as_of).expect("history")),
            );
            assert!(!a.1.is_empty(), "{aggregate:?} {op:?} {value} matched nobody");
            assert_eq!(a, b, "{aggregate:?} {op:?} {value} within {within_hours:?}");
        }
        // Events dated after the rollup's cutoff, staged before it is built (covered by its
        // sequence, not by its cutoff), then more staged and drained after it.
        let now = at(base + 30 * 3600);
        let future = make(20, base + 40 * 3600, 3600);
        one_by_one(&mut s_cols, &future, &mut model);
        in_one_group(&mut d_cols, &direct, &future);
        let last = future.last().map_or(0, |e| e.sequence);
        for name in names {
            let mut batch = WriteBatch::default();
            s_cols
                .refresh_rollup(&staged, &mut batch, name, last, now)
                .expect("rollup");
            staged.apply(batch).expect("apply");
        }
        let more = make(300, base, 12 * 3600);
        one_by_one(&mut s_cols, &more, &mut model);
        in_one_group(&mut d_cols, &direct, &more);
        check_stage(&model);
        compare("after the rollups");
        for name in names {
            for as_of in [now, at(base + 50 * 3600)] {
                let h = amount_history(name, Aggregate::Sum, Operator::Gt, 1500.0, None);
                let from_rollup = rollup_history(&staged, &h, as_of, &mut BTreeSet::new())
                    .expect("rollup history")
                    .expect("a rollup");
                assert_eq!(
                    list(from_rollup),
                    list(history(&direct, &h, as_of).expect("history")),
                    "{name} as of {as_of:?}"
                );
            }
        }
    }

    /// A writer adds one user per batch in one hour, so blocks merge and the stage drains all
    /// the time; a reader filters meanwhile. Every user applied before a read started must be in its answer.
    #[test]
    fn a_merge_never_hides_records_from_a_running_filter() {
        let (_dir, store) = temp_store();
        let applied = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, applied, done) = (store.clone(), applied.clone(), done.clone());
            std::thread::spawn(move || {
                // Every record is staged (one per batch), and drained three times into full
                // blocks of the hour.
                let mut columns = Columns::draining_at(4096);
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
        let cond = Condition::History(any_event("n"));
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

    /// A writer stages one event per batch in one hour and drains the stage every 64; a reader
    /// charts that hour meanwhile, whole (hour buckets and the stage) and from its second
    /// second (blocks and the stage). Every event applied before a read started is counted,
    /// and none twice.
    #[test]
    fn statistics_count_every_event_once_while_stages_drain() {
        use crate::read::stats::{event_stats, Granularity, StatsQuery};
        let (_dir, store) = temp_store();
        let applied = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let hour = 1_000_000i64;
        let writer = {
            let (store, applied, done) = (store.clone(), applied.clone(), done.clone());
            std::thread::spawn(move || {
                let mut columns = Columns::draining_at(64);
                for i in 1..=3000u64 {
                    let mut writes = ColumnWrites::default();
                    writes.add(&event(i, i % 50, hour * 3600 + 1 + (i as i64 % 3599), None));
                    let mut batch = WriteBatch::default();
                    columns.write(&store, &mut batch, writes).expect("index");
                    store.apply(batch).expect("apply");
                    applied.store(i as usize, Ordering::SeqCst);
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let query = |from: i64| StatsQuery {
            event_name: "n".into(),
            from: Timestamp { secs: from, nanos: 0 },
            to: Timestamp {
                secs: (hour + 1) * 3600,
                nanos: 0,
            },
            granularity: Granularity::Hour,
            aggregate: Aggregate::Count,
            attribute: String::new(),
        };
        let mut reads = 0;
        while !done.load(Ordering::SeqCst) || reads == 0 {
            for from in [hour * 3600, hour * 3600 + 1] {
                let before = applied.load(Ordering::SeqCst) as u64;
                let n = event_stats(&store, &query(from)).expect("stats").buckets[0].events;
                let after = applied.load(Ordering::SeqCst) as u64;
                // (One batch may be applied and not yet announced.)
                assert!(
                    n >= before && n <= after + 1,
                    "{n} events counted from {from}, {before} applied before the read and {after} after"
                );
                reads += 1;
            }
        }
        writer.join().expect("writer");
        let n = event_stats(&store, &query(hour * 3600)).expect("stats").buckets[0].events;
        assert_eq!(n, 3000);
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
