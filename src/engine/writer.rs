//! The writer thread: owns every piece of mutable engine state, drains waiting jobs into one
//! write group, applies the group's batch atomically and hands its replies to the committer.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use crate::telemetry::{stamp, write_stage};

use tokio::sync::mpsc;

use super::clock::TimerClock;
use super::committer::SharedCommit;
use super::{unavailable, Group, Published};
use crate::domain::model::{AttributeDefinition, AttributeType, EventNameStats, Trigger};
use crate::domain::rules::Limits;
use crate::domain::template;
use crate::error::Error;
use crate::store::columns::Columns;
use crate::store::Store;

/// A reply waiting for its group's flush: answers the result, or the flush's fault.
pub(super) type Reply = Box<dyn FnOnce(Option<&Error>) + Send>;

/// Work for the writer thread. A *barrier* runs alone in its group, after every earlier write is
/// applied: trigger changes (later events must see every earlier one in the store, whatever
/// overlay the old trigger set kept) and user erasure (no write of that user may be in flight).
pub(super) struct Job {
    pub(super) run: JobFn,
    pub(super) barrier: bool,
    /// When the caller submitted it (the `queued` stage; `None` without metrics).
    pub(super) submitted: Option<Instant>,
}

pub(super) type JobFn = Box<dyn FnOnce(&mut Writer, &mut Group) + Send>;

/// Most writes one group may hold before the writer applies it: larger groups share fsyncs
/// better but make sled's batch (and the callers' wait) large; measured best around here.
const MAX_GROUP_WRITES: usize = 4096;

/// An applied group, for the committer: its replies and the highest action sequence it leaves
/// behind (durable once the committer's flush succeeds).
pub(super) struct Applied {
    pub(super) replies: Vec<Reply>,
    /// What the group's events did, recorded once its flush succeeds.
    pub(super) counts: super::group::Counts,
    pub(super) last_event_seq: u64,
    pub(super) last_action_seq: u64,
    /// When the writer handed it over (the `handoff` stage; `None` without metrics).
    pub(super) applied_at: Option<Instant>,
}

/// The writer thread's state (see the module documentation of `engine`). It owns the state it
/// writes; after each applied group it publishes what changed to the read views.
pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) published: Arc<Published>,
    pub(super) failed: Arc<AtomicBool>,
    pub(super) limits: Limits,
    pub(super) last_seq: u64,
    pub(super) last_action_seq: u64,
    pub(super) ulids: ulid::Generator,
    /// Every attribute definition, by name.
    pub(super) attributes: BTreeMap<String, AttributeDefinition>,
    /// Every event name seen, with its statistics.
    pub(super) event_names: BTreeMap<String, EventNameStats>,
    pub(super) triggers: BTreeMap<String, Arc<Trigger>>,
    /// Active (unpaused) triggers by event name: an event only looks at its own name's.
    pub(super) by_name: HashMap<String, Vec<Arc<Trigger>>>,
    /// Active triggers with a history condition; when 0, groups keep no event overlay.
    pub(super) history_triggers: usize,
    /// Names whose running aggregates are maintained, with their current epoch.
    pub(super) maintained: HashMap<String, u64>,
    /// The last epoch of every name ever maintained.
    pub(super) epochs: HashMap<String, u64>,
    pub(super) templates: template::Templates,
    /// The by-name index's write state (see `store::columns`).
    pub(super) columns: Columns,
    /// Active triggers with an absence check, by the name of the event that cancels them.
    pub(super) unless_by_name: HashMap<String, Vec<Arc<Trigger>>>,
    /// Wakes the writer when the earliest timer is due.
    pub(super) clock: Arc<TimerClock>,
    pub(super) destinations: BTreeMap<String, Arc<crate::domain::destination::Destination>>,
}

/// The next job, waiting for one. After a group of many jobs (many callers waiting one write
/// each: unary calls), a job that arrives within [`SPIN`] is taken without the writer thread
/// parking; a park and the caller's wake-up of it cost more than that on a busy machine
/// (unary TrackEvent 1.05-1.14x in alternated pairs, batches 0.97-1.06). After a group of few jobs (batches), it
/// parks at once: its CPU is better spent decoding them.
fn next_job(rx: &mut mpsc::Receiver<Job>, spin: bool) -> Option<Job> {
    if !spin {
        return rx.blocking_recv();
    }
    let spinning = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if spinning.elapsed() < SPIN => std::thread::yield_now(),
            Err(mpsc::error::TryRecvError::Empty) => return rx.blocking_recv(),
        }
    }
}

/// How long the writer looks for a next job before it parks.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);
/// Jobs in the last group from which the writer spins for the next.
const SPIN_AFTER_JOBS: usize = 4;

impl Writer {
    /// Runs write groups until every job sender is gone. An applied group is committed here when
    /// no job is waiting and no round is running (see `committer`), else handed to the committer
    /// thread.
    pub(super) fn run(
        mut self,
        mut rx: mpsc::Receiver<Job>,
        handoff: std_mpsc::SyncSender<Applied>,
        commit: SharedCommit,
    ) {
        let mut held: Option<Job> = None;
        let mut last_jobs = 0;
        loop {
            let Some(first) = held
                .take()
                .or_else(|| next_job(&mut rx, last_jobs >= SPIN_AFTER_JOBS))
            else {
                break;
            };
            let mut group = Group::new();
            let start_seq = self.last_seq;
            let start_action_seq = self.last_action_seq;
            let alone = first.barrier;
            write_stage("queued", first.submitted);
            let built = stamp();
            (first.run)(&mut self, &mut group);
            last_jobs = 1;
            // A group that read much history ends early too (see `Group::reads`).
            while !alone && group.batch.len() < MAX_GROUP_WRITES && !group.reads.group_spent(&self.limits) {
                match rx.try_recv() {
                    Ok(job) if job.barrier => {
                        held = Some(job);
                        break;
                    }
                    Ok(job) => {
                        write_stage("queued", job.submitted);
                        last_jobs += 1;
                        (job.run)(&mut self, &mut group)
                    }
                    Err(_) => break,
                }
            }
            let replies = std::mem::take(&mut group.replies);
            let counts = std::mem::take(&mut group.counts);
            write_stage("build", built);
            let applying = stamp();
            if let Some(fault) = self.apply(group, start_seq, start_action_seq) {
                for r in replies {
                    r(Some(&fault));
                }
                continue;
            }
            write_stage("apply", applying);
            let applied_at = stamp();
            let applied = Applied {
                replies,
                counts,
                last_event_seq: self.last_seq,
                last_action_seq: self.last_action_seq,
                applied_at,
            };
            // Committed here only when nothing waits: with jobs queued, the committer thread
            // flushes this group while the writer goes on applying the next.
            let idle = if rx.is_empty() { commit.try_lock() } else { None };
            match idle {
                Some(mut idle) => idle.round(vec![applied]),
                None => {
                    if handoff.send(applied).is_err() {
                        break;
                    }
                }
            }
        }
    }

    /// Applies a group's batch and publishes its state; on failure the engine stops accepting
    /// writes (the in-memory state may now be ahead of the disk).
    fn apply(&mut self, mut group: Group, start_seq: u64, start_action_seq: u64) -> Option<Error> {
        if self.failed.load(Ordering::Acquire) {
            return Some(unavailable());
        }
        let mut batch = std::mem::take(&mut group.batch);
        if !group.columns.is_empty() {
            let columns = std::mem::take(&mut group.columns);
            if let Err(e) = self.columns.write(&self.store, &mut batch, columns) {
                tracing::error!(error = %e, "indexing a write group failed; refusing further writes");
                self.failed.store(true, Ordering::Release);
                return Some(unavailable());
            }
        }
        let mut timers_delta = 0;
        if !group.timers.is_empty() {
            let timers = std::mem::take(&mut group.timers);
            match timers.write(&self.store, &mut batch) {
                Ok(delta) => timers_delta = delta,
                Err(e) => {
                    tracing::error!(error = %e, "writing timers failed; refusing further writes");
                    self.failed.store(true, Ordering::Release);
                    return Some(unavailable());
                }
            }
        }
        for (name, stats) in &group.name_stats {
            batch.put_name_stats(name, stats);
        }
        for ((user, name), agg) in &group.aggregates {
            batch.put_user_aggregate(user, name, agg);
        }
        for ((trigger, user), state) in &group.firing {
            batch.put_firing_state(trigger, user, state);
        }
        if self.last_seq != start_seq {
            batch.put_last_event_seq(self.last_seq);
        }
        if self.last_action_seq != start_action_seq {
            batch.put_last_action_seq(self.last_action_seq);
        }
        let writes = batch.len();
        if let Err(e) = self.store.apply(batch) {
            tracing::error!(error = %e, "applying a write batch failed; refusing further writes");
            self.failed.store(true, Ordering::Release);
            return Some(unavailable());
        }
        metrics::histogram!(crate::telemetry::WRITE_GROUP_SIZE).record(writes as f64);
        if timers_delta != 0 {
            let pending = &self.published.pending_timers;
            let now = (pending.load(Ordering::Relaxed) as i64 + timers_delta).max(0);
            pending.store(now as u64, Ordering::Relaxed);
        }
        self.publish(group);
        None
    }

    /// Takes an applied group's changes into the writer's own state and publishes them.
    fn publish(&mut self, group: Group) {
        if !group.name_stats.is_empty() {
            let mut published = self.published.event_names.write();
            for (name, stats) in group.name_stats {
                published.insert(name.clone(), stats.clone());
                self.event_names.insert(name, stats);
            }
        }
        if !group.new_attributes.is_empty() {
            let mut published = self.published.attributes.write();
            for def in group.new_attributes {
                published.insert(def.name.clone(), def.clone());
                self.attributes.insert(def.name.clone(), def);
            }
        }
        if group.triggers_changed {
            *self.published.triggers.write() = self.triggers.clone();
        }
        if group.destinations_changed {
            *self.published.destinations.write() = self.destinations.clone();
            self.published.destinations_changed.send_modify(|v| *v += 1);
        }
    }

    pub(super) fn consumer(&self, name: &str, group: &Group) -> Result<Option<u64>, Error> {
        if let Some(pos) = group.consumers.get(name) {
            return Ok(Some(*pos));
        }
        Ok(self.store.consumer(name)?)
    }

    /// The definition of `name` as this group sees it (its own new definitions first).
    pub(super) fn definition(&self, name: &str, group: &Group) -> Option<AttributeDefinition> {
        if let Some(def) = group.new_attributes.iter().find(|d| d.name == name) {
            return Some(def.clone());
        }
        self.attributes.get(name).cloned()
    }

    /// The type of `name` as this group sees it, without copying the definition (hot path).
    pub(super) fn attribute_type(&self, name: &str, group: &Group) -> Option<AttributeType> {
        if let Some(def) = group.new_attributes.iter().find(|d| d.name == name) {
            return Some(def.attribute_type);
        }
        self.attributes.get(name).map(|d| d.attribute_type)
    }

    /// The statistics of an event name as this group sees them.
    pub(super) fn name_stats(&self, name: &str, group: &Group) -> Option<EventNameStats> {
        match group.name_stats.get(name) {
            Some(stats) => Some(stats.clone()),
            None => self.event_names.get(name).cloned(),
        }
    }

    /// A ULID: sorts by time, monotonic within a millisecond.
    pub(super) fn generate_id(&mut self) -> String {
        match self.ulids.generate() {
            Ok(id) => id.to_string(),
            // The generator overflows only after 2^80 ids in one millisecond: fall back to a
            // fresh one, which still sorts by time.
            Err(_) => ulid::Ulid::new().to_string(),
        }
    }
}
