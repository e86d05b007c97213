//! Erasure of a user (DeleteUser): every trace of the user in one write group, alone in it.

use std::collections::{BTreeSet, HashMap};

use super::{Group, Writer};
use crate::error::Error;
use crate::store::columns::{period_of, Level};
use crate::store::timers::user_bucket;

impl Writer {
    /// Erases `user` (run alone in its group, so nothing of the user is in flight).
    pub(super) fn erase(&mut self, user: &str, group: &mut Group) -> Result<u64, Error> {
        let mut erased = 0u64;
        let mut names: HashMap<String, u64> = HashMap::new();
        let mut hours = BTreeSet::new();
        for event in self.store.user_events(user) {
            let event = event?;
            group.batch.remove_event(&event);
            hours.insert((event.name.clone(), period_of(event.occurred_at, Level::Hour)));
            if self.store.sequence_of_event_id(&event.event_id)? == Some(event.sequence) {
                group.batch.remove_event_id(&event.event_id);
            }
            *names.entry(event.name).or_default() += 1;
            erased += 1;
        }
        self.columns.erase(&self.store, &mut group.batch, user, &hours)?;
        let user_names: BTreeSet<String> = hours.iter().map(|(name, _)| name.clone()).collect();
        self.columns
            .erase_from_rollups(&self.store, &mut group.batch, user, &user_names)?;
        for (name, count) in names {
            group.batch.remove_user_aggregate(user, &name);
            if let Some(mut stats) = self.name_stats(&name, group) {
                stats.count = stats.count.saturating_sub(count);
                group.name_stats.insert(name, stats);
            }
        }
        for trigger_id in self.triggers.keys() {
            group.batch.remove_firing_state(trigger_id, user);
        }
        // Every pending timer of the user, whatever the trigger (deleted ones included).
        group.timers.load(&self.store, user_bucket(user))?;
        group.timers.remove_user(user);
        for action in self.store.user_actions(user) {
            let mut action = action?;
            group.batch.remove_user_action(user, action.sequence);
            action.user_id.clear();
            action.payload.clear();
            action.event = None;
            group.batch.put_action_record(&action);
        }
        tracing::info!(events = erased, "user erased");
        Ok(erased)
    }
}
