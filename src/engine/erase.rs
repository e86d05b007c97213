//! Erasure of a user (DeleteUser), in slices: each slice erases up to
//! `Limits::max_erase_events_per_group` of the user's events (their index records, statistics
//! and aggregates with them) alone in its write group, and the writes of other users go on
//! between slices, so a user with a million events does not stop ingest. The last slice also
//! removes the user's firing state, timers and registry entry and strips the user's fired
//! actions. Each slice is atomic; DeleteUser answers after the last. If one fails, the slices
//! before it stay done and a retry erases the rest; a user left between slices by a stop or a
//! crash is marked (`D` user), and start-up finishes the erasure before serving.

use std::collections::{BTreeSet, HashMap};

use super::{Group, Writer};
use crate::error::Error;
use crate::store::columns::hour_of;
use crate::store::timers::user_bucket;

impl Writer {
    /// Erases a slice of `user`'s events (run alone in its group, so nothing of the user is in
    /// flight); answers how many, and whether the user is now gone entirely.
    pub(super) fn erase(&mut self, user: &str, group: &mut Group) -> Result<(u64, bool), Error> {
        let mut erased = 0u64;
        let mut names: HashMap<String, u64> = HashMap::new();
        let mut hours = BTreeSet::new();
        let max = self.limits.max_erase_events_per_group.max(1);
        let mut last_slice = true;
        for event in self.store.user_events(user) {
            if erased as usize == max {
                last_slice = false;
                break;
            }
            let event = event?;
            group.batch.remove_event(&event);
            hours.insert((event.name.clone(), hour_of(event.occurred_at)));
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
        if !last_slice {
            // Marked until the last slice: a server stopped in between finishes it at start.
            group.batch.put_erasing(user);
            tracing::debug!(events = erased, "erased a slice of a user's events");
            return Ok((erased, false));
        }
        group.batch.remove_erasing(user);
        for trigger_id in self.triggers.keys() {
            group.batch.remove_firing_state(trigger_id, user);
        }
        // Every pending timer of the user, whatever the trigger (deleted ones included).
        group.timers.load(&self.store, user_bucket(user))?;
        group.timers.remove_user(user);
        self.store.strip_user_actions(&mut group.batch, user)?;
        Ok((erased, true))
    }
}
