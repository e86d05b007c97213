//! The handle callers use: every write is a job for the writer thread, answered once durable;
//! reads answer from the views the writer publishes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use super::track::{Defined, Tracked};
use super::writer::Job;
use super::{unavailable, Group, Ingest, Writer};
use crate::domain::model::{AttributeDefinition, AttributeType, EventNameStats, Timestamp, Trigger};
use crate::domain::rules::{Limits, PreparedEvent};
use crate::error::Error;
use crate::store::columns::RollupMeta;

/// Rollup rebuilds computed away from the writer before the writer computes one itself.
const ROLLUP_ATTEMPTS: u32 = 3;

/// How often the rollup keeper looks at the event counts (see [`Ingest::keep_rollups`]).
const KEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Events of a name from which the keeper maintains its rollup, and the fewest new events that
/// make it rebuild one.
const KEEP_FROM: u64 = 4096;

/// True when a name with `count` events, whose rollup was last rebuilt at `covered`, is due a
/// rebuild: as many new events as `covered` (the rollup doubles), and at least [`KEEP_FROM`].
/// Each rebuild rewrites the whole rollup, so rebuilding at every doubling writes about twice
/// the final rollup over a load; rebuilding at every quarter of growth (measured: 80-90 rebuilds
/// in a 1M-event load, 31-36 s of rebuild time logged, and the data directory 1.2-1.5x larger,
/// likely the superseded chunks) cost too much.
fn keep_due(covered: u64, count: u64) -> bool {
    count.saturating_sub(covered) >= KEEP_FROM.max(covered)
}

impl Ingest {
    /// Timers pending (as of the last applied write group).
    pub(crate) fn pending_timers(&self) -> u64 {
        self.shared.published.pending_timers.load(Ordering::Relaxed)
    }

    /// Whether storage failed (the engine refuses every write until a restart).
    pub(crate) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Follows the highest action sequence that is durable (only those may be delivered).
    pub(crate) fn durable_actions(&self) -> watch::Receiver<u64> {
        self.shared.durable_actions.clone()
    }

    /// Runs `job` on the writer thread; answers after the group it joined is durable.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Writer, &mut Group) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.submit(job, false).await
    }

    /// Like [`Ingest::run`], as a barrier (see [`Job`]).
    pub(super) async fn run_alone<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Writer, &mut Group) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.submit(job, true).await
    }

    async fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Writer, &mut Group) -> Result<T, Error> + Send + 'static,
        barrier: bool,
    ) -> Result<T, Error> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(unavailable());
        }
        let (tx, rx) = oneshot::channel::<Result<T, Error>>();
        let job = Job {
            run: Box::new(move |writer, group| {
                let result = job(writer, group);
                group.replies.push(Box::new(move |fault| {
                    let _ = tx.send(match fault {
                        Some(e) => Err(e.clone()),
                        None => result,
                    });
                }));
            }),
            barrier,
            submitted: crate::telemetry::stamp(),
        };
        let submitted = job.submitted;
        self.tx
            .send(job)
            .await
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        let answer = rx.await.map_err(|_| unavailable())?;
        crate::telemetry::write_stage("answered", submitted);
        answer
    }

    /// Tracks events: one result per input, in order. `events` hold the outcome of [`prepare`],
    /// so a batch keeps its positions when some items were already rejected.
    ///
    /// A batch whose evaluation reads much history is stored in slices, one write group each
    /// (see `Group::reads`), so other writes go through between them. Events are independent
    /// (each is accepted or rejected alone), so a slice that fails to commit answers its own
    /// events and the rest with the fault while the earlier slices' results stand: no event is
    /// answered as failed after it committed.
    pub(crate) async fn track(
        &self,
        events: Vec<Result<PreparedEvent, Error>>,
    ) -> Result<Vec<Result<Tracked, Error>>, Error> {
        let total = events.len();
        let mut results: Vec<Result<Tracked, Error>> = Vec::with_capacity(total);
        let mut rest = events;
        loop {
            let slice = self
                .run(move |writer, group| {
                    let mut done = Vec::new();
                    let mut it = rest.into_iter();
                    for e in it.by_ref() {
                        let result = e.and_then(|e| writer.track_one(e, group));
                        group.counts.track(&result);
                        done.push(result);
                        if group.reads.group_spent(&writer.limits) {
                            break;
                        }
                    }
                    Ok((done, it.collect::<Vec<_>>()))
                })
                .await;
            match slice {
                Ok((done, left)) => {
                    results.extend(done);
                    if left.is_empty() {
                        return Ok(results);
                    }
                    rest = left;
                }
                Err(e) => {
                    // The events of this slice and after it were not stored: counted here (the
                    // group's own counts are recorded only once its flush succeeds).
                    let left = total - results.len();
                    crate::telemetry::rejected(crate::telemetry::Rejection::of(&e), left as u64);
                    // Nothing of this call committed yet: the call fails as a whole.
                    if results.is_empty() {
                        return Err(e);
                    }
                    results.resize_with(total, || Err(e.clone()));
                    return Ok(results);
                }
            }
        }
    }

    /// Defines an attribute: same type again is a no-op, another type is
    /// FAILED_PRECONDITION.
    pub(crate) async fn define_attribute(
        &self,
        name: String,
        attribute_type: AttributeType,
        description: String,
    ) -> Defined {
        self.run(move |writer, group| writer.define(name, attribute_type, description, group))
            .await
    }

    /// Stores a new trigger (already validated); the writer assigns its id and times.
    pub(crate) async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, Error> {
        self.run_alone(move |writer, group| {
            let now = Timestamp::now();
            let trigger = Trigger {
                id: writer.generate_id(),
                created_at: now,
                updated_at: now,
                ..trigger
            };
            writer.put_trigger(trigger.clone(), group)?;
            Ok(trigger)
        })
        .await
    }

    /// Replaces a trigger by id, keeping its creation time and its firing history.
    pub(crate) async fn update_trigger(&self, trigger: Trigger) -> Result<Trigger, Error> {
        self.run_alone(move |writer, group| {
            let existing = writer
                .triggers
                .get(&trigger.id)
                .ok_or_else(|| Error::NotFound(format!("trigger.id: no trigger {:?}", trigger.id)))?;
            let trigger = Trigger {
                created_at: existing.created_at,
                // Strictly later than before: the generation of timers armed before the change.
                updated_at: Timestamp::now().max(Timestamp::from_nanos(existing.updated_at.as_nanos() + 1)),
                ..trigger
            };
            writer.put_trigger(trigger.clone(), group)?;
            Ok(trigger)
        })
        .await
    }

    /// Deletes a trigger and its per-user firing state.
    pub(crate) async fn delete_trigger(&self, id: String) -> Result<(), Error> {
        self.run_alone(move |writer, group| {
            if !writer.triggers.contains_key(&id) {
                return Err(Error::NotFound(format!("id: no trigger {id:?}")));
            }
            let firing_users = writer.store.firing_state_users(&id)?;
            writer.triggers.remove(&id);
            writer.templates.remove(&id);
            group.batch.remove_trigger(&id);
            for user in firing_users {
                group.batch.remove_firing_state(&id, &user);
            }
            group.firing.retain(|(t, _), _| t != &id);
            group.triggers_changed = true;
            writer.reindex(&mut group.batch);
            Ok(())
        })
        .await
    }

    /// Erases a user everywhere (DeleteUser): events, event ids, running aggregates,
    /// firing state and event-name counts; the user's fired actions keep their sequence but lose
    /// user id, payload and event. Answers the number of events erased.
    pub(crate) async fn delete_user(&self, user_id: String) -> Result<u64, Error> {
        // The slices run in a task of their own: a client that gives up (a deadline, a dropped
        // connection) does not leave the user half erased.
        let this = self.clone();
        tokio::spawn(async move { this.erase_in_slices(user_id).await })
            .await
            .map_err(|e| Error::Internal(format!("erasure task: {e}")))?
    }

    /// Finishes the erasures a stop or a crash left between slices; answers how many users.
    pub(crate) async fn resume_erasures(&self) -> Result<usize, Error> {
        let users = self
            .run(|writer, _group| Ok(writer.store.erasing_users()?))
            .await?;
        for user in &users {
            tracing::warn!(user_id = %user, "finishing an erasure a stop interrupted");
            self.delete_user(user.clone()).await?;
        }
        Ok(users.len())
    }

    async fn erase_in_slices(&self, user_id: String) -> Result<u64, Error> {
        // Each slice runs alone in its group: if a read fails half-way, dropping the group's
        // writes leaves the slice undone (and a retry goes on from there). Other writes go on
        // between slices (see `erase`).
        let mut total = 0;
        let erased = loop {
            let user = user_id.clone();
            let slice = self
                .run_alone(move |writer, group| {
                    let slice = writer.erase(&user, group);
                    if slice.is_err() {
                        group.discard_writes();
                    }
                    slice
                })
                .await;
            match slice {
                Ok((n, done)) => {
                    total += n;
                    if done {
                        tracing::info!(events = total, "user erased");
                        break Ok(total);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        self.shared.erasures.fetch_add(1, Ordering::SeqCst);
        erased
    }

    /// How many erasure jobs have finished since start (whatever their outcome): a cached
    /// query result taken before one is not reused.
    pub(crate) fn erasures(&self) -> u64 {
        self.shared.erasures.load(Ordering::SeqCst)
    }

    /// Asks for `name`'s rollup to be rebuilt (see `store::columns`) unless a rebuild is already
    /// queued; returns at once. See [`Ingest::rebuild_rollup`].
    pub(crate) fn request_rollup(&self, name: String) {
        let ingest = self.clone();
        tokio::spawn(async move { ingest.refresh_rollup(name, "query").await });
    }

    /// Rebuilds `name`'s rollup unless a rebuild of it is already queued or running (then
    /// returns at once), and logs the outcome; `by` says who asked.
    async fn refresh_rollup(&self, name: String, by: &'static str) {
        let fresh = self.shared.refreshing.lock().insert(name.clone());
        if !fresh {
            return;
        }
        // Released however this ends (an aborted keeper included).
        struct Refreshing<'a>(&'a parking_lot::Mutex<std::collections::HashSet<String>>, &'a str);
        impl Drop for Refreshing<'_> {
            fn drop(&mut self) {
                self.0.lock().remove(self.1);
            }
        }
        let _refreshing = Refreshing(&self.shared.refreshing, &name);
        let started = std::time::Instant::now();
        match self.rebuild_rollup(&name).await {
            Ok((meta, attempts)) => tracing::info!(
                name,
                by,
                users = meta.users,
                attempts,
                ms = started.elapsed().as_millis() as u64,
                "rollup rebuilt"
            ),
            Err(e) => tracing::warn!(name, by, error = %e, "rollup refresh failed"),
        }
    }

    /// Keeps every name's rollup close to its events, in the background, so that the first
    /// all-history filter of a name finds one right after a load or a restart instead of
    /// scanning every block (issue 14). Every [`KEEP_EVERY`] it compares each name's event count
    /// with the count when its rollup was last rebuilt, and rebuilds it (one name at a time, on
    /// the blocking pool, written by the writer like a query's request) when the events since
    /// are as many as those covered, and at least [`KEEP_FROM`] (see [`keep_due`]). Names below
    /// [`KEEP_FROM`] events are not kept (a scan of them costs little). The names there are at
    /// start are counted as covered as they are: rebuilding them all at once at start (tried,
    /// one run each order) made q1's and q5's first calls after a restart 5.6x and 9x slower in
    /// time order, likely because the rebuilds read every block from a cold cache meanwhile. Instead the first query of such a name, which reads every block of it
    /// (its rollup is older than the start, see `store::columns::written`), asks for a rebuild
    /// of that name alone; one that finds nothing new writes only its meta.
    ///
    /// A rebuild reads the blocks the rollup does not cover and rewrites its chunks. The keeper
    /// holds a handle only while it looks or rebuilds; the caller aborts it before stopping the
    /// engine (answered handle).
    pub(crate) fn keep_rollups(&self) -> tokio::task::JoinHandle<()> {
        let weak = self.downgrade();
        tokio::spawn(async move {
            // Per name, its event count when its rollup was last rebuilt (at start: its count
            // then; a name first seen later: 0).
            let mut built: Option<std::collections::HashMap<String, u64>> = None;
            let mut tick = tokio::time::interval(KEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let counts: Vec<(String, u64)> = match weak.upgrade() {
                    Some(ingest) => ingest
                        .shared
                        .published
                        .event_names
                        .read()
                        .iter()
                        .map(|(name, stats)| (name.clone(), stats.count))
                        .collect(),
                    None => return,
                };
                let Some(built) = &mut built else {
                    built = Some(counts.into_iter().collect());
                    continue;
                };
                for (name, count) in counts {
                    let covered = built.get(&name).copied().unwrap_or(0);
                    if !keep_due(covered, count) {
                        continue;
                    }
                    built.insert(name.clone(), count);
                    let Some(ingest) = weak.upgrade() else {
                        return;
                    };
                    ingest.refresh_rollup(name, "keeper").await;
                }
            }
        })
    }

    /// Rebuilds `name`'s rollup. Computing it reads the blocks the old rollup does not cover
    /// (every block of the name when there is none: hundreds of milliseconds at a million
    /// events), so that runs on a blocking thread, not the writer,
    /// which would hold every write behind it; the writer only writes the result, alone in its
    /// group. If the index's content changed in between (an erasure, another rollup written),
    /// the result is dropped and computed again; after [`ROLLUP_ATTEMPTS`] such tries the writer computes it
    /// itself. Answers the rollup and the attempts it took.
    async fn rebuild_rollup(&self, name: &str) -> Result<(RollupMeta, u32), Error> {
        for attempt in 1..=ROLLUP_ATTEMPTS {
            // Answered once every event before it is applied: they are all in the blocks read next.
            let (store, last_seq) = self
                .run(|writer, _group| Ok((writer.store.clone(), writer.last_seq)))
                .await?;
            let computed = {
                let name = name.to_string();
                tokio::task::spawn_blocking(move || store.compute_rollup(&name, last_seq, Timestamp::now()))
                    .await
                    .map_err(|e| Error::Internal(format!("rollup rebuild task: {e}")))??
            };
            let written = self
                .run_alone(move |writer, group| Ok(computed.write(&writer.store, &mut group.batch)?))
                .await?;
            if let Some(meta) = written {
                return Ok((meta, attempt));
            }
        }
        let name = name.to_string();
        let meta = self
            .run_alone(move |writer, group| {
                let refreshed = writer
                    .columns
                    .refresh_rollup(
                        &writer.store,
                        &mut group.batch,
                        &name,
                        writer.last_seq,
                        Timestamp::now(),
                    )
                    .map_err(Error::from);
                if refreshed.is_err() {
                    group.discard_writes();
                }
                refreshed
            })
            .await?;
        Ok((meta, ROLLUP_ATTEMPTS + 1))
    }

    /// Copies the database into `target`, a slice at a time, each slice a barrier job, with the
    /// writes between slices mirrored (see `store::backup`): consistent at the sequences it
    /// answers, every one durable by the time it answers, while writes go on between slices.
    pub(crate) async fn backup(&self, target: std::path::PathBuf) -> Result<crate::store::Backup, Error> {
        self.run_alone(move |writer, _group| Ok(writer.store.begin_backup(&target)?))
            .await?;
        loop {
            let slice = self
                .run_alone(|writer, _group| {
                    let slice = writer.store.backup_slice();
                    if slice.is_err() {
                        writer.store.abandon_backup();
                    }
                    Ok(slice?)
                })
                .await;
            match slice {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => continue,
                Err(e) => {
                    // A failed flush answers every job with an error: make sure nothing is left.
                    let _ = self
                        .run_alone(|writer, _group| {
                            writer.store.abandon_backup();
                            Ok(())
                        })
                        .await;
                    return Err(e);
                }
            }
        }
    }

    /// Deletes up to `max` actions fired before `cutoff` from the start of the log.
    pub(crate) async fn expire_actions(&self, cutoff: Timestamp, max: usize) -> Result<usize, Error> {
        self.run(move |writer, group| Ok(writer.store.expire_actions(&mut group.batch, cutoff, max)?))
            .await
    }

    /// A named consumer's position, creating the consumer at `initial` when it is new.
    pub(crate) async fn ensure_consumer(&self, name: String, initial: u64) -> Result<u64, Error> {
        self.run(move |writer, group| {
            if let Some(pos) = writer.consumer(&name, group)? {
                return Ok(pos);
            }
            group
                .batch
                .put_consumer(&name, initial, Some(Timestamp::now()), None);
            group.consumers.insert(name, initial);
            Ok(initial)
        })
        .await
    }

    /// Moves a named consumer's position forward to `up_to` (never back); answers the position.
    pub(crate) async fn ack(&self, name: String, up_to: u64) -> Result<u64, Error> {
        self.run(move |writer, group| {
            let current = writer
                .consumer(&name, group)?
                .ok_or_else(|| Error::NotFound(format!("consumer: no consumer {name:?}")))?;
            if up_to > writer.last_action_seq {
                return Err(Error::OutOfRange(format!(
                    "up_to_sequence: {up_to} is past the last fired sequence {}",
                    writer.last_action_seq
                )));
            }
            if up_to <= current {
                return Ok(current);
            }
            let now = Timestamp::now();
            // A consumer created before creation times were kept keeps an unknown one; one
            // created in this group (not stored yet) was created now.
            let created = match writer.store.consumer_record(&name)? {
                Some(c) => c.created_at,
                None => Some(now),
            };
            group.batch.put_consumer(&name, up_to, created, Some(now));
            group.consumers.insert(name, up_to);
            Ok(up_to)
        })
        .await
    }

    /// Every attribute definition, by name.
    pub(crate) fn attributes(&self) -> Vec<AttributeDefinition> {
        self.shared
            .published
            .attributes
            .read()
            .values()
            .cloned()
            .collect()
    }

    /// The type of one attribute, if defined.
    pub(crate) fn attribute_type(&self, name: &str) -> Option<AttributeType> {
        self.shared
            .published
            .attributes
            .read()
            .get(name)
            .map(|d| d.attribute_type)
    }

    /// Every event name seen, by name.
    pub(crate) fn event_names(&self) -> Vec<(String, EventNameStats)> {
        self.shared
            .published
            .event_names
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every trigger, by id (creation order).
    pub(crate) fn triggers(&self) -> BTreeMap<String, Arc<Trigger>> {
        self.shared.published.triggers.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keeper_rebuilds_at_each_doubling_from_keep_from() {
        assert!(!keep_due(0, KEEP_FROM - 1));
        assert!(keep_due(0, KEEP_FROM));
        // Small rollups wait for KEEP_FROM new events, large ones until their events doubled.
        assert!(!keep_due(2000, 2000 + KEEP_FROM - 1));
        assert!(keep_due(2000, 2000 + KEEP_FROM));
        assert!(!keep_due(100_000, 199_999));
        assert!(keep_due(100_000, 200_000));
        // Counts that fell (an erasure) never ask.
        assert!(!keep_due(10_000, 9_000));
    }
}
