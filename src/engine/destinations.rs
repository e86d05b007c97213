//! Destinations and the records of their deliveries, written by the writer like everything
//! else: a destination's changes, each delivery attempt's outcome with the destination's new
//! position in the action log (one batch, so a crash never loses an outcome the position
//! passed), and redrives of dead letters.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Ingest, Writer};
use crate::domain::destination::{DeliveryState, Destination};
use crate::domain::model::Timestamp;
use crate::error::{invalid, Error};

/// The outcome of an attempt as the delivery engine records it.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// Delivered, or given up without a record (its action is gone): any retry is removed.
    Settled { seq: u64 },
    /// Failed, to be attempted again (`user`: the action's; `None` when the action is gone
    /// from the log, so no erasure can be racing it).
    Retry {
        seq: u64,
        user: Option<String>,
        state: DeliveryState,
    },
    /// Failed for good.
    Dead {
        seq: u64,
        user: Option<String>,
        state: DeliveryState,
    },
}

/// Called by the writer while it records outcomes: answers the destination's new delivery
/// position and the actions after it that have an outcome, if they changed (it reads the
/// delivery engine's own bookkeeping at that moment, so the position written never passes an
/// outcome not yet in this or an earlier batch).
pub(crate) type Position = Box<dyn FnOnce() -> Option<(u64, Vec<u64>)> + Send>;

impl Ingest {
    /// Every destination, by id.
    pub(crate) fn destinations(&self) -> BTreeMap<String, Arc<Destination>> {
        self.shared.published.destinations.read().clone()
    }

    /// Follows changes of the destinations (the value only counts them).
    pub(crate) fn destinations_changed(&self) -> watch::Receiver<u64> {
        self.shared.published.destinations_changed.subscribe()
    }

    /// Stores a new destination (already validated); the writer assigns its id and times. It
    /// starts at the end of the action log: actions fired before it existed are not delivered.
    pub(crate) async fn create_destination(&self, d: Destination) -> Result<Destination, Error> {
        self.run(move |writer, group| {
            let now = Timestamp::now();
            let d = Destination {
                id: writer.generate_id(),
                created_at: now,
                updated_at: now,
                ..d
            };
            group.batch.put_destination(&d);
            group
                .batch
                .put_delivery_position(&d.id, writer.last_action_seq, &[]);
            writer.destinations.insert(d.id.clone(), Arc::new(d.clone()));
            group.destinations_changed = true;
            Ok(d)
        })
        .await
    }

    /// Replaces a destination by id, keeping its creation time, and its secret when the new one
    /// is empty.
    pub(crate) async fn update_destination(&self, d: Destination) -> Result<Destination, Error> {
        self.run(move |writer, group| {
            let existing = writer
                .destinations
                .get(&d.id)
                .ok_or_else(|| Error::NotFound(format!("destination.id: no destination {:?}", d.id)))?;
            let signing_secret = if d.signing_secret.is_empty() {
                existing.signing_secret.clone()
            } else {
                d.signing_secret.clone()
            };
            let d = Destination {
                created_at: existing.created_at,
                updated_at: Timestamp::now(),
                signing_secret,
                ..d
            };
            group.batch.put_destination(&d);
            writer.destinations.insert(d.id.clone(), Arc::new(d.clone()));
            group.destinations_changed = true;
            Ok(d)
        })
        .await
    }

    /// Deletes a destination with its queue and dead letters; FAILED_PRECONDITION while a
    /// trigger delivers to it.
    pub(crate) async fn delete_destination(&self, id: String) -> Result<(), Error> {
        // Alone: no outcome of the destination is in the group the removal scans past.
        self.run_alone(move |writer, group| {
            if !writer.destinations.contains_key(&id) {
                return Err(Error::NotFound(format!("id: no destination {id:?}")));
            }
            if let Some(t) = writer.triggers.values().find(|t| t.destination_id == id) {
                return Err(Error::FailedPrecondition(format!(
                    "id: trigger {:?} ({:?}) delivers to destination {id:?}; change or delete it first",
                    t.id, t.name
                )));
            }
            writer.store.remove_destination(&mut group.batch, &id)?;
            writer.destinations.remove(&id);
            group.destinations_changed = true;
            Ok(())
        })
        .await
    }

    /// Records attempts' outcomes at destination `id` and its new position (see [`Position`]).
    /// An outcome of an action whose user was erased since (the action is gone from the
    /// user's action index), or of a destination deleted since, writes nothing: erasure already
    /// dropped its records. (The check is one index read, not the action's chunk: it runs for
    /// every failed attempt, on the writer thread.)
    pub(crate) async fn record_deliveries(
        &self,
        id: String,
        outcomes: Vec<Outcome>,
        position: Position,
    ) -> Result<(), Error> {
        self.run(move |writer, group| {
            let position = position();
            if !writer.destinations.contains_key(&id) {
                return Ok(());
            }
            for o in outcomes {
                match o {
                    Outcome::Settled { seq } => group.batch.remove_retry(&id, seq),
                    Outcome::Retry { seq, user, state } => {
                        if writer.live(user.as_deref(), seq)? {
                            group.batch.put_retry(&id, seq, &state);
                        }
                    }
                    Outcome::Dead { seq, user, state } => {
                        group.batch.remove_retry(&id, seq);
                        if writer.live(user.as_deref(), seq)? {
                            group.batch.put_dead_letter(&id, seq, &state);
                        }
                    }
                }
            }
            if let Some((p, settled)) = position {
                group.batch.put_delivery_position(&id, p, &settled);
            }
            Ok(())
        })
        .await
    }

    /// Moves dead letters of destination `id` back to its queue, each with a fresh budget of
    /// attempts and age (`seqs` empty: all). Answers the sequences moved.
    pub(crate) async fn redrive(&self, id: String, seqs: Vec<u64>) -> Result<Vec<u64>, Error> {
        self.run(move |writer, group| {
            if !writer.destinations.contains_key(&id) {
                return Err(Error::NotFound(format!("destination_id: no destination {id:?}")));
            }
            let found: Vec<(u64, DeliveryState)> = if seqs.is_empty() {
                writer.store.dead_letters(&id, 0, usize::MAX)?
            } else {
                let mut found = Vec::new();
                for seq in seqs {
                    if seq == 0 {
                        return Err(invalid("sequences: 0 is no action's sequence"));
                    }
                    if let Some(state) = writer.store.dead_letter(&id, seq)? {
                        found.push((seq, state));
                    }
                }
                found
            };
            let now = Timestamp::now();
            let mut moved = Vec::with_capacity(found.len());
            for (seq, state) in found {
                // One whose action expired from the log cannot be delivered: it stays.
                if writer.store.action_at(seq)?.is_none() {
                    continue;
                }
                group.batch.remove_dead_letter(&id, seq);
                group.batch.put_retry(
                    &id,
                    seq,
                    &DeliveryState {
                        attempts: 0,
                        first_attempt_at: now,
                        next_at: now,
                        ..state
                    },
                );
                moved.push(seq);
            }
            Ok(moved)
        })
        .await
    }
}

impl Writer {
    /// Whether an outcome of action `seq` of `user` may still be recorded (the user was not
    /// erased since); one of an action gone from the log may.
    fn live(&self, user: Option<&str>, seq: u64) -> Result<bool, Error> {
        match user {
            Some(user) => Ok(self.store.user_has_action(user, seq)?),
            None => Ok(true),
        }
    }

    /// Checks a trigger's destination (`f` names the field).
    pub(super) fn check_destination(&self, f: &str, id: &str) -> Result<(), Error> {
        if !id.is_empty() && !self.destinations.contains_key(id) {
            return Err(invalid(format!("{f}: no destination {id:?}")));
        }
        Ok(())
    }
}
