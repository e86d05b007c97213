//! The action log (`N` chunks, with the by-user `U` and by-trigger `V` indexes), named
//! consumers' positions (`C`) and per-(trigger, user) firing state (`L`).
//!
//! The log is a sequence of *chunks*: one record holds consecutive actions of one write group
//! (up to [`CHUNK_ACTIONS`] of them and about [`CHUNK_BYTES`]), keyed by the sequence of its
//! first, with each event that fired them stored once. Ten triggers firing on one event cost one
//! record and one copy of the event, not ten of each. The indexes have one key per owner and
//! chunk, `U` user 0x00 seq or `V` trigger 0x00 seq, where seq is the owner's first action in
//! the chunk; the value lists the owner's actions there as one byte each, their distance from
//! seq. An empty value stands for seq alone (the layout before chunks, one key per action).
//!
//! Sequences stay one per action and gap-free; a chunk of `n` actions keyed `first` holds
//! `first..first + n`. Retention removes whole chunks (their actions share one firing time) with
//! the index keys computed from the chunk; erasure rewrites the user's chunks without the
//! user's data and removes the user's index keys.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::codec::{decode, decode_u64, encode, older};
use super::keys::*;
use super::{Store, StoreError, WriteBatch};
use crate::domain::model::{Event, FiredAction, FiringState, Timestamp};

/// At most this many actions in one chunk (an index value names one by a byte).
pub(super) const CHUNK_ACTIONS: usize = 256;
/// A chunk is closed once its actions reach about this many bytes (far below the size at which
/// sled stores a value outside its log).
pub(super) const CHUNK_BYTES: usize = 48 * 1024;

/// One record of the action log: consecutive actions from the sequence in its key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Chunk {
    /// The events that fired the actions, each once.
    events: Vec<Event>,
    actions: Vec<Entry>,
    /// The actions delivered to a destination: their position in `actions` (ascending) and the
    /// destination's id. Last, so a chunk written before destinations decodes as [`ChunkV1`].
    destinations: Vec<(u32, String)>,
}

/// A chunk read for the sequence it holds: its first sequence, its key and the chunk.
type HeldChunk = (u64, Vec<u8>, Chunk);

/// A chunk as written before destinations existed.
#[derive(Deserialize)]
struct ChunkV1 {
    events: Vec<Event>,
    actions: Vec<Entry>,
}

/// How far back in time a scan of the log by `fired_at` reads past its range: a wall clock
/// stepped back by up to this much does not hide actions fired before the step.
const CLOCK_SLACK_SECS: i64 = 300;

/// A named consumer as stored: `C` name → position(8), then (from this release on) postcard
/// (created_at, last_acked_at); `created_at` stays unknown for a consumer created before.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConsumerRecord {
    pub name: String,
    pub acked: u64,
    pub created_at: Option<Timestamp>,
    pub last_acked_at: Option<Timestamp>,
}

type ConsumerTimes = (Option<Timestamp>, Option<Timestamp>);

fn decode_consumer(key: &[u8], name: &str, v: &[u8]) -> Result<ConsumerRecord, StoreError> {
    if v.len() < 8 {
        return Err(StoreError::corrupt(
            key,
            "a consumer position shorter than 8 bytes",
        ));
    }
    let acked = decode_u64(key, &v[..8])?;
    let (created_at, last_acked_at): ConsumerTimes = if v.len() > 8 {
        decode(key, &v[8..])?
    } else {
        (None, None)
    };
    Ok(ConsumerRecord {
        name: name.to_string(),
        acked,
        created_at,
        last_acked_at,
    })
}

impl WriteBatch {
    /// Stores a named consumer's position with when it was created and last acknowledged.
    pub(crate) fn put_consumer(
        &mut self,
        name: &str,
        acked: u64,
        created_at: Option<Timestamp>,
        last_acked_at: Option<Timestamp>,
    ) {
        let mut value = acked.to_be_bytes().to_vec();
        value.extend_from_slice(&encode(&(created_at, last_acked_at)));
        self.put_raw(prefixed(CONSUMER, name), value);
    }
}

/// Decodes a chunk stored under `key`, in its current form or the one before destinations.
pub(super) fn decode_chunk(key: &[u8], bytes: &[u8]) -> Result<Chunk, StoreError> {
    decode::<Chunk>(key, bytes).or_else(|e| {
        older::<ChunkV1>(bytes)
            .map(|old| Chunk {
                events: old.events,
                actions: old.actions,
                destinations: Vec::new(),
            })
            .ok_or(e)
    })
}

/// An action as a chunk stores it: its event by position in [`Chunk::events`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    action_id: String,
    trigger_id: String,
    trigger_name: String,
    action_type: String,
    user_id: String,
    event_id: String,
    fired_at: Timestamp,
    payload: String,
    event: Option<u32>,
}

impl Chunk {
    /// Actions held.
    pub(super) fn len(&self) -> usize {
        self.actions.len()
    }

    /// Adds `action` (its own `event` ignored) fired by `event`; answers its approximate size.
    pub(super) fn push(&mut self, action: FiredAction, event: Option<&Event>) -> usize {
        let mut size = action.approx_size();
        let event = event.map(|e| {
            match self.events.last() {
                Some(last) if last.sequence == e.sequence && last.user_id == e.user_id => {}
                _ => {
                    size += e.approx_size();
                    self.events.push(e.clone());
                }
            }
            (self.events.len() - 1) as u32
        });
        if !action.destination_id.is_empty() {
            self.destinations
                .push((self.actions.len() as u32, action.destination_id));
        }
        self.actions.push(Entry {
            action_id: action.action_id,
            trigger_id: action.trigger_id,
            trigger_name: action.trigger_name,
            action_type: action.action_type,
            user_id: action.user_id,
            event_id: action.event_id,
            fired_at: action.fired_at,
            payload: action.payload,
            event,
        });
        size
    }

    /// The action at `offset` as the API sees it (sequence `first + offset`).
    fn action(&self, key: &[u8], first: u64, offset: usize) -> Result<Option<FiredAction>, StoreError> {
        let Some(e) = self.actions.get(offset) else {
            return Ok(None);
        };
        let event = match e.event {
            None => None,
            Some(i) => Some(
                self.events
                    .get(i as usize)
                    .cloned()
                    .ok_or_else(|| StoreError::corrupt(key, "an action names an event the chunk lacks"))?,
            ),
        };
        Ok(Some(FiredAction {
            sequence: first + offset as u64,
            action_id: e.action_id.clone(),
            trigger_id: e.trigger_id.clone(),
            trigger_name: e.trigger_name.clone(),
            action_type: e.action_type.clone(),
            user_id: e.user_id.clone(),
            event_id: e.event_id.clone(),
            fired_at: e.fired_at,
            payload: e.payload.clone(),
            event,
            destination_id: self.destination_of(offset).to_string(),
        }))
    }

    /// The destination of the action at `offset` (empty: none).
    fn destination_of(&self, offset: usize) -> &str {
        match self
            .destinations
            .binary_search_by_key(&(offset as u32), |(at, _)| *at)
        {
            Ok(i) => &self.destinations[i].1,
            Err(_) => "",
        }
    }

    /// Every action, in order.
    #[cfg(test)]
    fn all(&self, key: &[u8], first: u64) -> Result<Vec<FiredAction>, StoreError> {
        (0..self.len())
            .filter_map(|i| self.action(key, first, i).transpose())
            .collect()
    }

    /// The index keys of the chunk keyed `first`, each with its value: per user (erased ones,
    /// with an empty id, have none) and per trigger, the first action's sequence and every
    /// action's distance from it.
    pub(super) fn index_entries(&self, first: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut users: BTreeMap<&str, (u64, Vec<u8>)> = BTreeMap::new();
        let mut triggers: BTreeMap<&str, (u64, Vec<u8>)> = BTreeMap::new();
        for (i, e) in self.actions.iter().enumerate() {
            let seq = first + i as u64;
            for (map, owner) in [
                (&mut users, e.user_id.as_str()),
                (&mut triggers, e.trigger_id.as_str()),
            ] {
                if owner.is_empty() {
                    continue;
                }
                let (start, offsets) = map.entry(owner).or_insert((seq, Vec::new()));
                // Below CHUNK_ACTIONS, so a byte.
                offsets.push((seq - *start) as u8);
            }
        }
        let mut out = Vec::with_capacity(users.len() + triggers.len());
        for (tag, map) in [(USER_ACTION, users), (TRIGGER_ACTION, triggers)] {
            for (owner, (start, offsets)) in map {
                out.push((seq_index_key(tag, owner, start), offsets));
            }
        }
        out
    }

    /// Strips `user`'s data from the chunk (id, payload, event); answers whether it held any.
    /// An action naming an event the chunk lacks is damage (`key` names the chunk).
    fn strip_user(&mut self, key: &[u8], user: &str) -> Result<bool, StoreError> {
        let mut stripped = false;
        for e in self.actions.iter_mut().filter(|e| e.user_id == user) {
            e.user_id.clear();
            e.payload.clear();
            e.event = None;
            stripped = true;
        }
        if !stripped {
            return Ok(false);
        }
        // Keep only the events still referred to, renumbered.
        let mut events: Vec<Option<Event>> = std::mem::take(&mut self.events).into_iter().map(Some).collect();
        let mut renumber: BTreeMap<u32, u32> = BTreeMap::new();
        for e in self.actions.iter_mut() {
            if let Some(i) = e.event {
                let new = match renumber.get(&i) {
                    Some(new) => *new,
                    None => {
                        let event = events.get_mut(i as usize).and_then(Option::take).ok_or_else(|| {
                            StoreError::corrupt(key, "an action names an event the chunk lacks")
                        })?;
                        self.events.push(event);
                        let new = (self.events.len() - 1) as u32;
                        renumber.insert(i, new);
                        new
                    }
                };
                e.event = Some(new);
            }
        }
        Ok(true)
    }
}

/// The sequences an index entry names: its key's, plus each distance in its value.
pub(super) fn index_sequences(key: &[u8], value: &[u8]) -> Result<Vec<u64>, StoreError> {
    let start = seq_of_index_key(key)?;
    if value.is_empty() {
        return Ok(vec![start]);
    }
    Ok(value.iter().map(|d| start + u64::from(*d)).collect())
}

impl Store {
    /// The chunk holding sequence `seq`, with its first sequence and key, if kept.
    fn chunk_holding(&self, seq: u64) -> Result<Option<HeldChunk>, StoreError> {
        let Some(kv) = self.tree.range(chunk_key(0)..=chunk_key(seq)).next_back() else {
            return Ok(None);
        };
        let (k, v) = kv?;
        let first = seq_of_chunk_key(&k)?;
        let chunk = decode_chunk(&k, &v)?;
        if seq - first >= chunk.len() as u64 {
            return Ok(None);
        }
        Ok(Some((first, k.to_vec(), chunk)))
    }

    /// The chunk holding `seq`: `held` when it is that chunk, else read into it (a run of
    /// nearby sequences reads each chunk once).
    fn holding<'a>(
        &self,
        held: &'a mut Option<HeldChunk>,
        seq: u64,
    ) -> Result<Option<&'a HeldChunk>, StoreError> {
        let hit = matches!(held, Some((first, _, c)) if seq >= *first && seq - *first < c.len() as u64);
        if !hit {
            *held = self.chunk_holding(seq)?;
        }
        Ok(held.as_ref().filter(|(first, _, _)| seq >= *first))
    }

    /// The actions of `seqs` (ascending; absent ones skipped), reading each chunk once per run.
    pub(super) fn actions_at(&self, seqs: &[u64]) -> Result<Vec<FiredAction>, StoreError> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut held = None;
        for &seq in seqs {
            if let Some((first, key, chunk)) = self.holding(&mut held, seq)? {
                if let Some(a) = chunk.action(key, *first, (seq - first) as usize)? {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    /// A trigger's firing state for one user.
    pub(crate) fn firing_state(
        &self,
        trigger_id: &str,
        user_id: &str,
    ) -> Result<Option<FiringState>, StoreError> {
        let key = pair(FIRING, trigger_id, user_id);
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// The users with a firing state of a trigger (to delete them with the trigger).
    pub(crate) fn firing_state_users(&self, trigger_id: &str) -> Result<Vec<String>, StoreError> {
        let prefix = under(FIRING, trigger_id);
        self.tree
            .scan_prefix(&prefix)
            .keys()
            .map(|k| {
                let k = k?;
                Ok(String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            })
            .collect()
    }

    /// A consumer's acknowledged position.
    pub(crate) fn consumer(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.consumer_record(name)?.map(|c| c.acked))
    }

    /// A consumer's record: its position and, when known, when it was created and last acked.
    pub(crate) fn consumer_record(&self, name: &str) -> Result<Option<ConsumerRecord>, StoreError> {
        let key = prefixed(CONSUMER, name);
        self.tree
            .get(&key)?
            .map(|v| decode_consumer(&key, name, &v))
            .transpose()
    }

    /// Every named consumer with its acknowledged position, by name.
    pub(crate) fn consumers(&self) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .consumer_records()?
            .into_iter()
            .map(|c| (c.name, c.acked))
            .collect())
    }

    /// Every named consumer's record, by name.
    pub(crate) fn consumer_records(&self) -> Result<Vec<ConsumerRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([CONSUMER]) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            out.push(decode_consumer(&k, &name, &v)?);
        }
        Ok(out)
    }

    /// When the actions of the log (all, or one trigger's) fired in `[from, to)`, read newest
    /// first and stopping once past actions fired before `from` less [`CLOCK_SLACK_SECS`]
    /// (actions fire in sequence order, so the log is in `fired_at` order but for clock steps).
    pub(crate) fn action_times(
        &self,
        trigger: Option<&str>,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<Timestamp>, StoreError> {
        let mut out = Vec::new();
        let stop = from.plus_secs(-CLOCK_SLACK_SECS);
        let keep = |t: Timestamp, out: &mut Vec<Timestamp>| {
            if t >= from && t < to {
                out.push(t);
            }
        };
        match trigger {
            None => {
                for kv in self.tree.scan_prefix([ACTION_CHUNK]).rev() {
                    let (k, v) = kv?;
                    let chunk = decode_chunk(&k, &v)?;
                    for e in &chunk.actions {
                        keep(e.fired_at, &mut out);
                    }
                    if chunk.actions.iter().all(|e| e.fired_at < stop) {
                        break;
                    }
                }
            }
            Some(t) => {
                let mut held = None;
                'keys: for kv in self.tree.scan_prefix(under(TRIGGER_ACTION, t)).rev() {
                    let (k, v) = kv?;
                    for seq in index_sequences(&k, &v)?.into_iter().rev() {
                        let Some((first, _, chunk)) = self.holding(&mut held, seq)? else {
                            continue;
                        };
                        let Some(e) = chunk.actions.get((seq - first) as usize) else {
                            continue;
                        };
                        if e.fired_at < stop {
                            break 'keys;
                        }
                        keep(e.fired_at, &mut out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` actions with sequences from `from` to `to` inclusive, in order.
    /// (At least one, and no more than about `max_bytes` after the first.)
    pub(crate) fn actions(
        &self,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<FiredAction>, StoreError> {
        let mut out = Vec::new();
        if from > to || limit == 0 {
            return Ok(out);
        }
        // The chunk holding `from` may start before it.
        let start = match self.tree.range(chunk_key(0)..=chunk_key(from)).next_back() {
            Some(kv) => seq_of_chunk_key(&kv?.0)?,
            None => from,
        };
        let mut bytes = 0;
        for kv in self.tree.range(chunk_key(start)..=chunk_key(to)) {
            let (k, v) = kv?;
            let first = seq_of_chunk_key(&k)?;
            let chunk = decode_chunk(&k, &v)?;
            let skip = from.saturating_sub(first);
            for offset in skip..chunk.len() as u64 {
                if first + offset > to {
                    return Ok(out);
                }
                let Some(a) = chunk.action(&k, first, offset as usize)? else {
                    break;
                };
                bytes += a.approx_size();
                if bytes > max_bytes && !out.is_empty() {
                    return Ok(out);
                }
                out.push(a);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The oldest action kept, if any.
    pub(crate) fn first_action(&self) -> Result<Option<FiredAction>, StoreError> {
        match self.tree.scan_prefix([ACTION_CHUNK]).next() {
            Some(kv) => {
                let (k, v) = kv?;
                let chunk = decode_chunk(&k, &v)?;
                chunk.action(&k, seq_of_chunk_key(&k)?, 0)
            }
            None => Ok(None),
        }
    }

    /// Actions newest first with sequence below `before`, all or those of one user or trigger.
    pub(crate) fn actions_newest_first(
        &self,
        owner: ActionOwner<'_>,
        before: u64,
        limit: usize,
    ) -> Result<Vec<FiredAction>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 || before == 0 {
            return Ok(out);
        }
        let (prefix, tag) = match owner {
            ActionOwner::All => {
                for kv in self.tree.range(chunk_key(0)..chunk_key(before)).rev() {
                    let (k, v) = kv?;
                    let first = seq_of_chunk_key(&k)?;
                    let chunk = decode_chunk(&k, &v)?;
                    // Only the actions listed are built (each with a copy of its event).
                    let below = (before - first).min(chunk.len() as u64) as usize;
                    for offset in (0..below).rev() {
                        if let Some(a) = chunk.action(&k, first, offset)? {
                            out.push(a);
                            if out.len() == limit {
                                return Ok(out);
                            }
                        }
                    }
                }
                return Ok(out);
            }
            ActionOwner::User(u) => (u, USER_ACTION),
            ActionOwner::Trigger(t) => (t, TRIGGER_ACTION),
        };
        let lo = seq_index_key(tag, prefix, 0);
        let hi = seq_index_key(tag, prefix, before);
        for kv in self.tree.range(lo..hi).rev() {
            let (k, v) = kv?;
            let seqs: Vec<u64> = index_sequences(&k, &v)?
                .into_iter()
                .filter(|s| *s < before)
                .collect();
            for a in self.actions_at(&seqs)?.into_iter().rev() {
                out.push(a);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Adds to `batch` the deletion of the chunks at the start of the log fired before
    /// `cutoff`, with their index keys, until at least `max` actions; a chunk holding an action
    /// a destination still has to deliver (see [`Store::delivery_floor`]) and every chunk after
    /// it stay. Returns how many actions.
    pub(crate) fn expire_actions(
        &self,
        batch: &mut WriteBatch,
        cutoff: Timestamp,
        max: usize,
    ) -> Result<usize, StoreError> {
        // Nothing a destination still has to deliver expires.
        let floor = self.delivery_floor()?;
        let mut n = 0;
        for kv in self.tree.scan_prefix([ACTION_CHUNK]) {
            if n >= max {
                break;
            }
            let (k, v) = kv?;
            let first = seq_of_chunk_key(&k)?;
            let chunk = decode_chunk(&k, &v)?;
            // Retention keeps a chunk while any of its actions is young enough.
            if chunk.actions.iter().any(|a| a.fired_at >= cutoff) || first + chunk.len() as u64 > floor {
                break;
            }
            for (key, _) in chunk.index_entries(first) {
                batch.remove_raw(key);
            }
            batch.remove_raw(k.to_vec());
            n += chunk.len();
        }
        Ok(n)
    }

    /// Adds to `batch` the removal of `user`'s data from the action log: the user's index keys,
    /// pending deliveries and dead letters,
    /// and the user's id, payloads and events from every chunk holding the user's actions
    /// (sequences, action ids and triggers stay, so the log keeps no gap). Answers how many
    /// actions were stripped.
    pub(crate) fn strip_user_actions(&self, batch: &mut WriteBatch, user: &str) -> Result<usize, StoreError> {
        let mut chunks = BTreeSet::new();
        let mut n = 0;
        for kv in self.tree.scan_prefix(under(USER_ACTION, user)) {
            let (k, v) = kv?;
            let seqs = index_sequences(&k, &v)?;
            n += seqs.len();
            chunks.extend(seqs);
            batch.remove_raw(k.to_vec());
        }
        let mut done: Option<(u64, u64)> = None;
        for seq in chunks {
            if matches!(done, Some((first, len)) if seq >= first && seq < first + len) {
                continue;
            }
            if let Some((first, key, mut chunk)) = self.chunk_holding(seq)? {
                done = Some((first, chunk.len() as u64));
                // The user's pending deliveries and dead letters go with the actions' data.
                for (offset, e) in chunk.actions.iter().enumerate() {
                    let destination = chunk.destination_of(offset);
                    if e.user_id == user && !destination.is_empty() {
                        self.remove_delivery_records(batch, destination, first + offset as u64);
                    }
                }
                if chunk.strip_user(&key, user)? {
                    batch.put_raw(key, encode(&chunk));
                }
            }
        }
        Ok(n)
    }

    /// Rewrites up to `max` action records of the layout before chunks (`F` sequence, one
    /// action each) as chunks of one; their index keys already read as such. Answers how many.
    pub(super) fn chunk_unchunked_actions(&self, max: usize) -> Result<usize, StoreError> {
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for kv in self.tree.scan_prefix([UNCHUNKED_ACTION]).take(max) {
            let (k, v) = kv?;
            let mut action: FiredAction = decode(&k, &v)?;
            let seq = seq_of_chunk_key(&k)?;
            let event = action.event.take();
            let mut chunk = Chunk::default();
            chunk.push(action, event.as_ref());
            batch.remove_raw(k.to_vec());
            batch.put_raw(chunk_key(seq).to_vec(), encode(&chunk));
            n += 1;
        }
        self.apply(batch)?;
        Ok(n)
    }
}

/// Whose actions to list.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ActionOwner<'a> {
    All,
    User(&'a str),
    Trigger(&'a str),
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An event of `user` with sequence `seq` (also used by the migration tests).
    pub(in crate::store) fn event(user: &str, seq: u64) -> Event {
        Event {
            event_id: format!("e{seq}"),
            user_id: user.into(),
            name: "n".into(),
            occurred_at: Timestamp { secs: 1, nanos: 0 },
            received_at: Timestamp { secs: 1, nanos: 0 },
            sequence: seq,
            attributes: BTreeMap::new(),
        }
    }

    /// An action of `user` fired by `trigger`, sequence 0 (also used by the migration tests).
    pub(in crate::store) fn action(user: &str, trigger: &str) -> FiredAction {
        FiredAction {
            sequence: 0,
            action_id: format!("a-{user}-{trigger}"),
            trigger_id: trigger.into(),
            trigger_name: trigger.into(),
            action_type: "t".into(),
            user_id: user.into(),
            event_id: String::new(),
            fired_at: Timestamp { secs: 2, nanos: 0 },
            payload: format!("p-{user}"),
            event: None,
            destination_id: String::new(),
        }
    }

    #[test]
    fn a_consumer_of_the_layout_before_its_times_reads_without_them() {
        let (_dir, store) = crate::store::temp_store();
        let mut batch = WriteBatch::default();
        batch.put_raw(prefixed(CONSUMER, "old"), 7u64.to_be_bytes().to_vec());
        batch.put_consumer("new", 9, Some(Timestamp { secs: 5, nanos: 0 }), None);
        batch.put_raw(prefixed(CONSUMER, "bad"), vec![1]);
        store.apply(batch).expect("apply");
        let old = store.consumer_record("old").unwrap().unwrap();
        assert_eq!((old.acked, old.created_at, old.last_acked_at), (7, None, None));
        let new = store.consumer_record("new").unwrap().unwrap();
        assert_eq!(
            (new.acked, new.created_at),
            (9, Some(Timestamp { secs: 5, nanos: 0 }))
        );
        assert!(store.consumer("bad").is_err(), "damage is an error, not a panic");
    }

    #[test]
    fn a_chunk_keeps_each_actions_destination_and_one_written_before_destinations_decodes() {
        #[derive(Serialize)]
        struct ChunkV1Out<'a> {
            events: &'a Vec<Event>,
            actions: &'a Vec<Entry>,
        }
        let mut c = Chunk::default();
        c.push(action("a", "t1"), None);
        c.push(
            FiredAction {
                destination_id: "d1".into(),
                ..action("b", "t2")
            },
            None,
        );
        let again = decode_chunk(b"N", &encode(&c)).expect("decodes");
        let all = again.all(b"N", 10).expect("actions");
        assert_eq!(
            all.iter().map(|a| a.destination_id.as_str()).collect::<Vec<_>>(),
            vec!["", "d1"]
        );
        let old = encode(&ChunkV1Out {
            events: &c.events,
            actions: &c.actions,
        });
        let read = decode_chunk(b"N", &old).expect("the older form decodes");
        assert_eq!(read.len(), 2);
        assert!(read.destinations.is_empty());
        assert!(decode_chunk(b"N", &old[..old.len() - 1]).is_err());
    }

    #[test]
    fn index_entries_name_each_owner_once_with_distances() {
        let mut c = Chunk::default();
        let (ea, eb) = (event("a", 1), event("b", 2));
        c.push(action("a", "t1"), Some(&ea));
        c.push(action("a", "t2"), Some(&ea));
        c.push(action("b", "t1"), Some(&eb));
        assert_eq!(c.events.len(), 2, "one copy per event");
        let entries = c.index_entries(10);
        assert_eq!(
            entries,
            vec![
                (seq_index_key(USER_ACTION, "a", 10), vec![0, 1]),
                (seq_index_key(USER_ACTION, "b", 12), vec![0]),
                (seq_index_key(TRIGGER_ACTION, "t1", 10), vec![0, 2]),
                (seq_index_key(TRIGGER_ACTION, "t2", 11), vec![0]),
            ]
        );
        for (k, v) in &entries {
            let seqs = index_sequences(k, v).expect("seqs");
            assert!(seqs.iter().all(|s| (10..13).contains(s)));
        }
        assert_eq!(
            index_sequences(&seq_index_key(USER_ACTION, "a", 7), &[]).expect("old"),
            vec![7]
        );
    }

    #[test]
    fn stripping_a_user_keeps_the_others_events_and_renumbers_them() {
        let mut c = Chunk::default();
        let (ea, eb) = (event("a", 1), event("b", 2));
        c.push(action("a", "t1"), Some(&ea));
        c.push(action("b", "t1"), Some(&eb));
        assert!(c.strip_user(b"N", "a").expect("strip"));
        assert!(!c.strip_user(b"N", "zed").expect("nothing"));
        let all = c.all(b"N", 5).expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(
            (
                all[0].user_id.as_str(),
                all[0].payload.as_str(),
                all[0].event.is_none()
            ),
            ("", "", true)
        );
        assert_eq!(all[1].event.as_ref().map(|e| e.user_id.as_str()), Some("b"));
        assert_eq!(all[1].sequence, 6);
        assert_eq!(c.events.len(), 1);
    }

    #[test]
    fn an_action_naming_a_missing_event_is_an_error_not_a_panic() {
        let mut c = Chunk::default();
        c.push(action("a", "t1"), Some(&event("a", 1)));
        c.events.clear();
        assert!(c.action(b"N", 1, 0).is_err());
        assert!(c.action(b"N", 1, 5).expect("past the end").is_none());
        c.push(action("b", "t1"), Some(&event("b", 2)));
        c.actions[0].event = Some(5);
        assert!(
            c.strip_user(b"N", "b").is_err(),
            "a's action names a missing event"
        );
    }

    /// 600 actions of users u0..u9 from sequence 1, the ones of t1 delivered to destination d.
    fn delivered_actions(store: &Store) {
        let mut batch = WriteBatch::default();
        batch.put_destination(&crate::domain::destination::Destination {
            id: "d".into(),
            name: "d".into(),
            url: "https://example.com/".into(),
            headers: Default::default(),
            signing_secret: String::new(),
            timeout_ms: 1000,
            max_attempts: 1,
            max_retry_age_secs: 1,
            concurrency: 1,
            paused: false,
            created_at: Timestamp { secs: 1, nanos: 0 },
            updated_at: Timestamp { secs: 1, nanos: 0 },
        });
        let mut seq = 0;
        for e in 0..300u64 {
            let ev = event(&format!("u{}", e % 10), e + 1);
            for t in ["t1", "t2"] {
                seq += 1;
                let mut a = action(&ev.user_id, t);
                a.sequence = seq;
                if t == "t1" {
                    a.destination_id = "d".into();
                }
                batch.put_action(a, Some(&ev));
            }
        }
        store.apply(batch).expect("apply");
    }

    #[test]
    fn retention_keeps_what_a_destination_still_has_to_deliver() {
        let (_dir, store) = crate::store::temp_store();
        delivered_actions(&store);
        let cutoff = Timestamp { secs: 10, nanos: 0 };
        // Nothing delivered yet: nothing expires, though every action is old enough.
        let mut batch = WriteBatch::default();
        batch.put_delivery_position("d", 0, &[]);
        store.apply(batch).expect("apply");
        let mut batch = WriteBatch::default();
        assert_eq!(
            store
                .expire_actions(&mut batch, cutoff, usize::MAX)
                .expect("expire"),
            0
        );
        // Delivered up to 300: only whole chunks below 301 go.
        let mut batch = WriteBatch::default();
        batch.put_delivery_position("d", 300, &[]);
        store.apply(batch).expect("apply");
        let mut batch = WriteBatch::default();
        let expired = store
            .expire_actions(&mut batch, cutoff, usize::MAX)
            .expect("expire");
        store.apply(batch).expect("apply");
        assert!((1..=300).contains(&expired), "{expired}");
        let first = store.first_action().expect("first").expect("kept").sequence;
        assert!(first <= 301, "the first action still needed is kept: {first}");
        // A pending retry holds the log from its action on.
        let state = crate::domain::destination::DeliveryState {
            attempts: 1,
            last_status: 500,
            last_error: String::new(),
            first_attempt_at: cutoff,
            last_attempt_at: cutoff,
            next_at: cutoff,
        };
        let mut batch = WriteBatch::default();
        batch.put_delivery_position("d", 600, &[]);
        batch.put_retry("d", 401, &state);
        store.apply(batch).expect("apply");
        let mut batch = WriteBatch::default();
        store
            .expire_actions(&mut batch, cutoff, usize::MAX)
            .expect("expire");
        store.apply(batch).expect("apply");
        assert!(
            store.action_at(401).expect("read").is_some(),
            "the retried action is kept"
        );
    }

    #[test]
    fn erasing_a_user_removes_their_retries_and_dead_letters_only() {
        let (_dir, store) = crate::store::temp_store();
        delivered_actions(&store);
        let state = crate::domain::destination::DeliveryState {
            attempts: 1,
            last_status: 500,
            last_error: String::new(),
            first_attempt_at: Timestamp { secs: 1, nanos: 0 },
            last_attempt_at: Timestamp { secs: 1, nanos: 0 },
            next_at: Timestamp { secs: 1, nanos: 0 },
        };
        // Sequence 1 is u0's (t1), 3 u1's (t1).
        let mut batch = WriteBatch::default();
        batch.put_retry("d", 1, &state);
        batch.put_dead_letter("d", 3, &state);
        batch.put_dead_letter("d", 21, &state);
        // Sequence 5 is u2's.
        batch.put_dead_letter("d", 5, &state);
        store.apply(batch).expect("apply");
        for user in ["u0", "u1"] {
            let mut batch = WriteBatch::default();
            store.strip_user_actions(&mut batch, user).expect("strip");
            store.apply(batch).expect("apply");
        }
        assert!(store.retry("d", 1).expect("read").is_none());
        assert!(store.dead_letter("d", 3).expect("read").is_none());
        // Sequence 21 is u0's too (event 11).
        assert!(store.dead_letter("d", 21).expect("read").is_none());
        assert!(store.dead_letter("d", 5).expect("read").is_some(), "u2's stays");
    }

    #[test]
    fn a_batch_of_many_actions_is_cut_into_chunks_that_read_from_any_sequence() {
        let (_dir, store) = crate::store::temp_store();
        let mut batch = WriteBatch::default();
        // 300 events of users u0..u9, two triggers each: 600 actions from sequence 5.
        let mut seq = 4;
        for e in 0..300u64 {
            let ev = event(&format!("u{}", e % 10), e + 1);
            for t in ["t1", "t2"] {
                seq += 1;
                let mut a = action(&ev.user_id, t);
                a.sequence = seq;
                a.action_id = format!("a{seq}");
                batch.put_action(a, Some(&ev));
            }
        }
        store.apply(batch).expect("apply");
        // Cut at CHUNK_BYTES before CHUNK_ACTIONS here; index keys: per chunk, one per user and
        // one per trigger.
        let chunks = store.tree.scan_prefix([ACTION_CHUNK]).count();
        assert!((3..10).contains(&chunks), "{chunks} chunks");
        assert_eq!(store.tree.scan_prefix([USER_ACTION]).count(), 10 * chunks);
        assert_eq!(store.tree.scan_prefix([TRIGGER_ACTION]).count(), 2 * chunks);
        let from_mid = store.actions(255, 262, usize::MAX, usize::MAX).expect("range");
        assert_eq!(
            from_mid.iter().map(|a| a.sequence).collect::<Vec<_>>(),
            (255..=262).collect::<Vec<_>>()
        );
        for a in &from_mid {
            assert_eq!(a.action_id, format!("a{}", a.sequence));
            assert_eq!(
                a.event.as_ref().map(|e| e.user_id.as_str()),
                Some(a.user_id.as_str())
            );
        }
        assert_eq!(
            store.actions(1, 4, 10, usize::MAX).expect("before the log").len(),
            0
        );
        assert_eq!(store.actions(604, 700, 10, usize::MAX).expect("tail").len(), 1);
        assert_eq!(store.first_action().expect("first").map(|a| a.sequence), Some(5));
        let all = store.actions_newest_first(ActionOwner::All, 262, 4).expect("all");
        assert_eq!(
            all.iter().map(|a| a.sequence).collect::<Vec<_>>(),
            vec![261, 260, 259, 258]
        );
        // u3's events are 4, 14, ...: its actions are two per event, newest first across chunks.
        let u3 = store
            .actions_newest_first(ActionOwner::User("u3"), 0xffff, 600)
            .expect("user");
        assert_eq!(u3.len(), 60);
        assert!(u3.windows(2).all(|w| w[0].sequence > w[1].sequence));
        assert!(u3.iter().all(|a| a.user_id == "u3"));
        let t2 = store
            .actions_newest_first(ActionOwner::Trigger("t2"), 262, 3)
            .expect("trigger");
        assert_eq!(
            t2.iter().map(|a| a.sequence).collect::<Vec<_>>(),
            vec![260, 258, 256]
        );
        // Erasing u3 strips its actions in every chunk and keeps the others' events.
        let mut batch = WriteBatch::default();
        assert_eq!(store.strip_user_actions(&mut batch, "u3").expect("strip"), 60);
        store.apply(batch).expect("apply");
        let after = store.actions(5, 604, usize::MAX, usize::MAX).expect("all");
        assert_eq!(after.len(), 600);
        assert_eq!(after.iter().filter(|a| a.user_id.is_empty()).count(), 60);
        assert!(after
            .iter()
            .filter(|a| !a.user_id.is_empty())
            .all(|a| a.event.is_some()));
        // Retention removes whole chunks and every index key they had.
        let mut batch = WriteBatch::default();
        let cutoff = Timestamp { secs: 3, nanos: 0 };
        let expired = store.expire_actions(&mut batch, cutoff, 300).expect("expire");
        assert!((300..600).contains(&expired), "whole chunks: {expired}");
        store.apply(batch).expect("apply");
        let first = 5 + expired as u64;
        assert_eq!(
            store.first_action().expect("first").map(|a| a.sequence),
            Some(first)
        );
        let mut named = 0;
        for tag in [USER_ACTION, TRIGGER_ACTION] {
            for kv in store.tree.scan_prefix([tag]) {
                let (k, v) = kv.expect("kv");
                for s in index_sequences(&k, &v).expect("seqs") {
                    assert!(s >= first, "an index key of an expired chunk was left: {s}");
                    named += 1;
                }
            }
        }
        // Each kept action is named by its trigger's key, and by its user's unless u3's.
        assert_eq!(
            named,
            2 * (600 - expired) - after[expired..].iter().filter(|a| a.user_id.is_empty()).count()
        );
    }
}
