//! The action log (`F`, with the by-user `U` and by-trigger `V` indexes), named consumers'
//! positions (`C`) and per-(trigger, user) firing state (`L`).

use super::codec::{decode, decode_u64};
use super::keys::*;
use super::{Store, StoreError, WriteBatch};
use crate::domain::model::{FiredAction, FiringState, Timestamp};

impl Store {
    /// A user's fired actions (those still in the log).
    pub(crate) fn user_actions(
        &self,
        user_id: &str,
    ) -> impl Iterator<Item = Result<FiredAction, StoreError>> + '_ {
        self.tree
            .scan_prefix(under(USER_ACTION, user_id))
            .filter_map(move |kv| {
                let step = || -> Result<Option<FiredAction>, StoreError> {
                    let (k, _) = kv?;
                    let seq = seq_of_index_key(&k)?;
                    match self.tree.get(action_key(seq))? {
                        Some(v) => Ok(Some(decode(&action_key(seq), &v)?)),
                        None => Ok(None),
                    }
                };
                step().transpose()
            })
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
        let key = prefixed(CONSUMER, name);
        self.tree.get(&key)?.map(|v| decode_u64(&key, &v)).transpose()
    }

    /// Every named consumer with its acknowledged position, by name.
    pub(crate) fn consumers(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([CONSUMER]) {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k[1..]).into_owned(), decode_u64(&k, &v)?));
        }
        Ok(out)
    }

    /// Up to `limit` actions with sequences from `from` to `to` inclusive, in order.
    /// (At least one, and no more than `max_bytes` of stored records after the first.)
    pub(crate) fn actions(
        &self,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<FiredAction>, StoreError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        let mut bytes = 0;
        for kv in self.tree.range(action_key(from)..=action_key(to)).take(limit) {
            let (k, v) = kv?;
            bytes += v.len();
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// The oldest action kept, if any.
    pub(crate) fn first_action(&self) -> Result<Option<FiredAction>, StoreError> {
        match self.tree.scan_prefix([ACTION]).next() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(decode(&k, &v)?))
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
        let (prefix, tag) = match owner {
            ActionOwner::All => {
                return self
                    .tree
                    .range(action_key(0)..action_key(before))
                    .rev()
                    .take(limit)
                    .map(|kv| {
                        let (k, v) = kv?;
                        decode(&k, &v)
                    })
                    .collect();
            }
            ActionOwner::User(u) => (u, USER_ACTION),
            ActionOwner::Trigger(t) => (t, TRIGGER_ACTION),
        };
        let lo = seq_index_key(tag, prefix, 0);
        let hi = seq_index_key(tag, prefix, before);
        let mut out = Vec::new();
        for kv in self.tree.range(lo..hi).rev() {
            let (k, _) = kv?;
            let seq = seq_of_index_key(&k)?;
            if let Some(v) = self.tree.get(action_key(seq))? {
                out.push(decode(&k, &v)?);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Adds to `batch` the deletion of up to `max` actions from the start of the log fired
    /// before `cutoff`, with their index entries. Returns how many.
    pub(crate) fn expire_actions(
        &self,
        batch: &mut WriteBatch,
        cutoff: Timestamp,
        max: usize,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.tree.scan_prefix([ACTION]).take(max) {
            let (k, v) = kv?;
            let action: FiredAction = decode(&k, &v)?;
            if action.fired_at >= cutoff {
                break;
            }
            batch.remove_action(&action);
            n += 1;
        }
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
