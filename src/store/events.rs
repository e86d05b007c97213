//! Reads of the per-user event keys (`T`, `G`, `I`): timelines, a user's events of one name,
//! running aggregates, client event ids. No read touches another user's keys.

use std::ops::Bound;

use super::codec::{decode, decode_u64};
use super::keys::*;
use super::{Store, StoreError};
use crate::domain::model::{Event, Timestamp, UserNameAggregate};

impl Store {
    /// The users whose erasure was started and not finished (a server stopped between slices).
    pub(crate) fn erasing_users(&self) -> Result<Vec<String>, StoreError> {
        self.tree
            .scan_prefix([ERASING])
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[1..]).into_owned()))
            .collect()
    }

    /// The sequence a client-supplied event id was stored with, if any.
    pub(crate) fn sequence_of_event_id(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        let key = prefixed(EVENT_ID, event_id);
        match self.tree.get(&key)? {
            Some(v) => Ok(Some(decode_u64(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// The names of the events a user has: one seek per name over the user's event keys, which
    /// are grouped by name.
    pub(crate) fn user_event_names(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let prefix = under(TIMELINE, user_id);
        let end = end_of(&prefix);
        let mut names = Vec::new();
        let mut from = prefix.clone();
        while let Some(kv) = self.tree.range(from.clone()..end.clone()).next() {
            let (k, _) = kv?;
            let rest = &k[prefix.len()..];
            let Some(len) = rest.iter().position(|b| *b == 0) else {
                return Err(StoreError::Corrupt {
                    key: k.to_vec(),
                    reason: "event key without a name terminator".into(),
                });
            };
            let name = String::from_utf8_lossy(&rest[..len]).into_owned();
            from = end_of(&named_prefix(user_id, &name));
            names.push(name);
        }
        Ok(names)
    }

    /// One user's events within `[lower, upper]` bounds, of one name or all, in timeline order
    /// (or reversed). Reads only that user's keys: one range per event name, merged.
    pub(crate) fn timeline(
        &self,
        user_id: &str,
        name: Option<&str>,
        lower: Bound<TimelinePos>,
        upper: Bound<TimelinePos>,
        newest_first: bool,
    ) -> Result<TimelineIter, StoreError> {
        let names = match name {
            Some(n) => vec![n.to_string()],
            None => self.user_event_names(user_id)?,
        };
        let mut ranges = Vec::with_capacity(names.len());
        for name in &names {
            let prefix = named_prefix(user_id, name);
            let map = |b: Bound<TimelinePos>| match b {
                Bound::Included(p) => Bound::Included(named_key(user_id, name, p)),
                Bound::Excluded(p) => Bound::Excluded(named_key(user_id, name, p)),
                Bound::Unbounded => Bound::Unbounded,
            };
            let lo = match map(lower) {
                Bound::Unbounded => Bound::Included(prefix.clone()),
                b => b,
            };
            let hi = match map(upper) {
                Bound::Unbounded => Bound::Excluded(end_of(&prefix)),
                b => b,
            };
            let iter = self.tree.range::<Vec<u8>, _>((lo, hi));
            let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send> =
                if newest_first {
                    Box::new(iter.rev())
                } else {
                    Box::new(iter)
                };
            ranges.push((prefix.len(), iter.peekable()));
        }
        Ok(TimelineIter { ranges, newest_first })
    }

    /// A user's running aggregates for one event name.
    pub(crate) fn user_aggregate(
        &self,
        user_id: &str,
        name: &str,
    ) -> Result<Option<UserNameAggregate>, StoreError> {
        let key = pair(AGGREGATE, user_id, name);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Positions of a user's events of one name with `occurred_at` in `(after, until]`
    /// (`after` `None`: from the beginning), oldest first. Reads only those keys.
    pub(crate) fn named_positions(
        &self,
        user_id: &str,
        name: &str,
        after: Option<Timestamp>,
        until: Timestamp,
    ) -> impl Iterator<Item = Result<TimelinePos, StoreError>> + '_ {
        let prefix = named_prefix(user_id, name);
        let plen = prefix.len();
        let lo = match after {
            // Every event at `after` sorts before (after, u64::MAX].
            Some(t) => Bound::Excluded(named_key(user_id, name, (t, u64::MAX))),
            None => Bound::Included(prefix.clone()),
        };
        let hi = Bound::Included(named_key(user_id, name, (until, u64::MAX)));
        self.tree.range::<Vec<u8>, _>((lo, hi)).map(move |kv| {
            let (k, _) = kv?;
            decode_pos(&k, &k[plen..])
        })
    }

    /// Every event of a user, grouped by name.
    pub(crate) fn user_events(&self, user_id: &str) -> impl Iterator<Item = Result<Event, StoreError>> + '_ {
        self.tree.scan_prefix(under(TIMELINE, user_id)).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }

    /// All of a user's events of one name, oldest first.
    pub(crate) fn named_events(
        &self,
        user_id: &str,
        name: &str,
    ) -> impl Iterator<Item = Result<Event, StoreError>> + '_ {
        self.tree.scan_prefix(named_prefix(user_id, name)).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }

    /// The event of `user_id` named `name` at a timeline position.
    pub(crate) fn event_at(
        &self,
        user_id: &str,
        name: &str,
        pos: TimelinePos,
    ) -> Result<Option<Event>, StoreError> {
        let key = named_key(user_id, name, pos);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }
}

type KvIter = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send>;

/// A user's events in timeline order: a merge of one range per event name.
pub(crate) struct TimelineIter {
    /// Per event name: the key prefix length and the range.
    ranges: Vec<(usize, std::iter::Peekable<KvIter>)>,
    newest_first: bool,
}

impl Iterator for TimelineIter {
    type Item = Result<Event, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut best: Option<(usize, TimelinePos)> = None;
        for (i, (plen, range)) in self.ranges.iter_mut().enumerate() {
            let pos = match range.peek() {
                None => continue,
                Some(Ok((k, _))) => match decode_pos(k, &k[*plen..]) {
                    Ok(p) => p,
                    Err(e) => return Some(Err(e)),
                },
                Some(Err(_)) => match range.next() {
                    Some(Err(e)) => return Some(Err(e.into())),
                    _ => continue,
                },
            };
            let better = match best {
                None => true,
                Some((_, b)) => (pos > b) == self.newest_first && pos != b,
            };
            if better {
                best = Some((i, pos));
            }
        }
        let (i, _) = best?;
        match self.ranges[i].1.next()? {
            Ok((k, v)) => Some(decode(&k, &v)),
            Err(e) => Some(Err(e.into())),
        }
    }
}
