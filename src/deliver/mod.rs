//! The delivery engine (SPEC §9): engage POSTs the actions of triggers with a destination to
//! that destination itself, at least once, with retries, a dead-letter queue and health.
//!
//! One task per destination reads the action log from the destination's durable position, the
//! way a subscriber does (there is no second log): it reads ahead a few hundred actions after
//! the position, keeps those of triggers that named the destination when they fired, and
//! attempts them, at most `concurrency` at once. Each attempt's outcome is written through the
//! writer, in order, one write in flight per destination (outcomes that finish meanwhile share
//! the next): a delivery removes nothing but moves the position, a failure writes a retry record
//! (`j`) or a dead letter (`o`). The position written with a batch is the highest sequence
//! below which every action of the destination has an outcome in that batch or an earlier one,
//! computed on the writer thread as the batch is built (`Position`), so after a crash every
//! action after the position is attempted again and none before it is lost: only attempts in
//! flight at the crash repeat.
//!
//! Retries wait 1 s, 2 s, 4 s, ... at most 10 min, each within ±50 % (never sooner than a
//! `Retry-After` up to that cap), until `max_attempts` or `max_retry_age`. Health: 5 failures
//! in a row make a destination FAILING, 5 minutes of failing SUSPENDED: then one probe attempt
//! at a time, with the same backoff between probes, until one succeeds. Health lives in memory
//! (a restart starts HEALTHY and re-learns it within 5 attempts). A paused destination keeps
//! its position and retries and attempts nothing. Each destination has its own task and
//! connections, so a slow or dead endpoint holds only its own `concurrency` slots; its writes
//! are one per finished attempt batch, never more than the attempts it makes.

mod http;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::domain::destination::{backoff_ms, Attempt, DeliveryState, Destination, Health, FAILING_AFTER};
use crate::domain::model::{FiredAction, Timestamp};
use crate::engine::{Ingest, Outcome};
use crate::store::Store;
use crate::telemetry;

/// Settings of the delivery engine.
#[derive(Clone, Debug)]
pub(crate) struct DeliverySettings {
    pub allow_private: bool,
    /// The first retry's nominal delay (1 s; tests shorten it).
    pub backoff_base_ms: u64,
    /// How long a destination fails before it is suspended (5 min; tests shorten it).
    pub suspend_after: Duration,
}

/// What the API asks of the delivery engine and reads from it; cheap to clone.
#[derive(Clone)]
pub(crate) struct Deliveries {
    workers: Arc<Mutex<HashMap<String, WorkerHandle>>>,
    sender: http::Sender,
}

struct WorkerHandle {
    config: watch::Sender<Arc<Destination>>,
    redriven: mpsc::UnboundedSender<Vec<u64>>,
    status: Arc<Mutex<Status>>,
    task: tokio::task::AbortHandle,
}

/// What a worker shows of itself.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Status {
    pub health: Health,
    /// Actions read and not yet settled, and pending retries.
    pub queued: u64,
    pub dead_letters: u64,
}

impl Deliveries {
    /// Starts the engine: a task per destination, following the destinations as they change,
    /// until every [`Ingest`] handle but the engine's own is gone or `stopped` turns true.
    pub(crate) fn start(
        ingest: &Ingest,
        store: Store,
        settings: DeliverySettings,
        stopped: watch::Receiver<bool>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), String> {
        let this = Deliveries {
            workers: Arc::default(),
            sender: http::Sender::new(settings.allow_private)?,
        };
        let task = tokio::spawn(
            this.clone()
                .supervise(ingest.downgrade(), store, settings, stopped),
        );
        Ok((this, task))
    }

    /// Whether `url` may be a destination's (private hosts refused unless allowed).
    pub(crate) async fn check_host(&self, url: &str) -> Result<(), String> {
        self.sender.check_host(url, true).await
    }

    /// A destination's status (the default for one not started yet).
    pub(crate) fn status(&self, id: &str) -> Status {
        self.workers
            .lock()
            .get(id)
            .map(|w| *w.status.lock())
            .unwrap_or_default()
    }

    /// Stops every destination's task (attempts in flight are abandoned: they repeat after the
    /// next start, as after a crash).
    pub(crate) fn stop(&self) {
        self.workers.lock().clear();
    }

    /// Tells a destination's task that dead letters went back to its queue.
    pub(crate) fn redriven(&self, id: &str, seqs: Vec<u64>) {
        if let Some(w) = self.workers.lock().get(id) {
            let _ = w.redriven.send(seqs);
        }
    }

    async fn supervise(
        self,
        weak: crate::engine::WeakIngest,
        store: Store,
        settings: DeliverySettings,
        mut stopped: watch::Receiver<bool>,
    ) {
        let Some(mut changed) = weak.upgrade().map(|i| i.destinations_changed()) else {
            return;
        };
        loop {
            let Some(ingest) = weak.upgrade() else {
                break;
            };
            let now = ingest.destinations();
            drop(ingest);
            {
                let mut workers = self.workers.lock();
                workers.retain(|id, w| {
                    let keep = now.contains_key(id);
                    if !keep {
                        w.task.abort();
                        telemetry::forget_destination(id);
                    }
                    keep
                });
                for (id, d) in &now {
                    match workers.get(id) {
                        Some(w) => {
                            if !Arc::ptr_eq(&w.config.borrow(), d) {
                                let _ = w.config.send(d.clone());
                            }
                        }
                        None => {
                            let (config, config_rx) = watch::channel(d.clone());
                            let (redriven, redriven_rx) = mpsc::unbounded_channel();
                            let status = Arc::new(Mutex::new(Status::default()));
                            let worker = Worker {
                                id: id.clone(),
                                ingest: weak.clone(),
                                store: store.clone(),
                                sender: self.sender.clone(),
                                settings: settings.clone(),
                                status: status.clone(),
                            };
                            let task = tokio::spawn(worker.run(config_rx, redriven_rx)).abort_handle();
                            workers.insert(
                                id.clone(),
                                WorkerHandle {
                                    config,
                                    redriven,
                                    status,
                                    task,
                                },
                            );
                        }
                    }
                }
            }
            tokio::select! {
                c = changed.changed() => if c.is_err() { break },
                _ = stopped.wait_for(|s| *s) => break,
            }
        }
        self.stop();
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The most actions a worker reads ahead of its attempts.
const READ_AHEAD: usize = 512;
/// How often a worker writes its position when only actions of other destinations passed.
const POSITION_EVERY: Duration = Duration::from_secs(1);

/// A worker's bookkeeping of the log, shared with the writer thread (see `Position`).
#[derive(Default)]
struct Progress {
    /// Every action up to here has been read.
    read: u64,
    /// Actions read for this destination without an outcome recorded.
    open: BTreeSet<u64>,
    /// The position last handed to the writer.
    written: u64,
}

impl Progress {
    fn position(&self) -> u64 {
        match self.open.first() {
            Some(first) => first - 1,
            None => self.read,
        }
    }

    /// Whether the position is ahead of the one written.
    fn moved(&self) -> bool {
        self.position() > self.written
    }

    /// The new position, if it moved.
    fn advance(&mut self) -> Option<u64> {
        let at = self.position();
        (at > self.written).then(|| {
            self.written = at;
            at
        })
    }
}

/// A destination's health as its worker tracks it.
#[derive(Default)]
struct HealthState {
    failures_in_a_row: u32,
    failing_since: Option<Instant>,
    suspended: bool,
    probes_failed: u32,
    next_probe: Option<Instant>,
}

impl HealthState {
    fn health(&self) -> Health {
        if self.suspended {
            Health::Suspended
        } else if self.failing_since.is_some() {
            Health::Failing
        } else {
            Health::Healthy
        }
    }
}

/// One attempt's result, back at the worker.
struct Done {
    seq: u64,
    fresh: bool,
    user: String,
    fired_at: Timestamp,
    attempt: Attempt,
    /// The state before the attempt (retries), `None` for a first attempt.
    before: Option<DeliveryState>,
    started: Timestamp,
    /// Started as the probe of a suspended destination.
    probe: bool,
}

struct Worker {
    id: String,
    ingest: crate::engine::WeakIngest,
    store: Store,
    sender: http::Sender,
    settings: DeliverySettings,
    status: Arc<Mutex<Status>>,
}

impl Worker {
    async fn run(
        self,
        mut config: watch::Receiver<Arc<Destination>>,
        mut redriven: mpsc::UnboundedReceiver<Vec<u64>>,
    ) {
        let Some(ingest) = self.ingest.upgrade() else {
            return;
        };
        let mut durable = ingest.durable_actions();
        drop(ingest);
        let progress = Arc::new(Mutex::new(Progress::default()));
        let start = match self.store.delivery_position(&self.id) {
            Ok(p) => p.unwrap_or(0),
            Err(e) => {
                tracing::error!(destination = %self.id, error = %e, "cannot read the delivery position; not delivering");
                return;
            }
        };
        {
            let mut p = progress.lock();
            p.read = start;
            p.written = start;
        }
        // Pending retries: due time, then sequence; and each one's state.
        let mut due: BTreeSet<(Timestamp, u64)> = BTreeSet::new();
        let mut retries: HashMap<u64, DeliveryState> = HashMap::new();
        match self.store.retries(&self.id) {
            Ok(all) => {
                for (seq, state) in all {
                    due.insert((state.next_at, seq));
                    retries.insert(seq, state);
                }
            }
            Err(e) => {
                tracing::error!(destination = %self.id, error = %e, "cannot read the pending retries; not delivering");
                return;
            }
        }
        // Actions after the position that already have an outcome (a crash came before the
        // position caught up with them): a retry (scheduled above) or a dead letter.
        let mut recorded: HashSet<u64> = match self.store.dead_letters(&self.id, start + 1, usize::MAX) {
            Ok(found) => found.into_iter().map(|(seq, _)| seq).collect(),
            Err(e) => {
                tracing::error!(destination = %self.id, error = %e, "cannot read the dead letters; not delivering");
                return;
            }
        };
        recorded.extend(retries.keys().filter(|s| **s > start));
        let mut dead = self.store.count_dead_letters(&self.id).unwrap_or(0);
        let mut buffer: VecDeque<FiredAction> = VecDeque::new();
        let mut inflight: JoinSet<Done> = JoinSet::new();
        let mut outcomes: Vec<Outcome> = Vec::new();
        let mut settled_fresh: Vec<u64> = Vec::new();
        let mut writing: Option<tokio::task::JoinHandle<bool>> = None;
        let mut health = HealthState::default();
        let mut last_position = Instant::now();
        let mut erasures = self.ingest.upgrade().map_or(0, |i| i.erasures());
        let mut dead_counted_at = erasures;
        let labels = [("destination_id", self.id.clone())];
        loop {
            let d = config.borrow().clone();
            let Some(ingest) = self.ingest.upgrade() else {
                return;
            };
            // An erasure since the last look: buffered actions may belong to the erased user.
            let now_erasures = ingest.erasures();
            if now_erasures != erasures {
                erasures = now_erasures;
                for a in buffer.iter_mut() {
                    match self.store.action_at(a.sequence) {
                        Ok(Some(fresh)) => *a = fresh,
                        Ok(None) | Err(_) => a.user_id.clear(),
                    }
                }
            }
            // Read ahead from the log, up to the durable head.
            let head = *durable.borrow();
            let read = progress.lock().read;
            if buffer.len() < READ_AHEAD && read < head {
                match self.store.actions(read + 1, head, READ_AHEAD, 4 * 1024 * 1024) {
                    Ok(actions) => {
                        let mut p = progress.lock();
                        for a in actions {
                            p.read = a.sequence;
                            if a.destination_id == self.id && !recorded.remove(&a.sequence) {
                                p.open.insert(a.sequence);
                                buffer.push_back(a);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(destination = %self.id, error = %e, "cannot read the action log");
                    }
                }
            }
            // Start attempts.
            let now = Timestamp::now();
            let instant = Instant::now();
            let limit = if health.suspended {
                1
            } else {
                d.concurrency.max(1) as usize
            };
            let probe_due = health.next_probe.is_none_or(|at| at <= instant);
            while !d.paused && inflight.len() < limit && (!health.suspended || probe_due) {
                // Retries first when due, then fresh actions (erased ones settle at once).
                let next_retry = due.first().copied().filter(|(at, _)| *at <= now);
                let (action, before, fresh) = if let Some((at, seq)) = next_retry {
                    due.remove(&(at, seq));
                    let Some(state) = retries.get(&seq).cloned() else {
                        continue;
                    };
                    match self.store.action_at(seq) {
                        Ok(Some(a)) if !a.user_id.is_empty() => (a, Some(state), false),
                        Ok(_) => {
                            // Expired from the log or erased: nothing left to deliver.
                            retries.remove(&seq);
                            outcomes.push(Outcome::Settled { seq });
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(destination = %self.id, seq, error = %e, "cannot read an action to retry");
                            due.insert((now.plus_secs(1), seq));
                            break;
                        }
                    }
                } else if let Some(a) = buffer.pop_front() {
                    if a.user_id.is_empty() {
                        settled_fresh.push(a.sequence);
                        continue;
                    }
                    (a, None, true)
                } else {
                    break;
                };
                let sender = self.sender.clone();
                let dest = d.clone();
                let probe = health.suspended;
                inflight.spawn(async move {
                    let started = Timestamp::now();
                    let attempt = sender.post(&dest, &action).await;
                    Done {
                        seq: action.sequence,
                        fresh,
                        user: action.user_id,
                        fired_at: action.fired_at,
                        attempt,
                        before,
                        started,
                        probe,
                    }
                });
                if health.suspended {
                    // One probe at a time; the next waits for this one's outcome.
                    health.next_probe = Some(Instant::now() + Duration::from_secs(24 * 3600));
                    break;
                }
            }
            // Hand finished outcomes to the writer, one write at a time.
            let moved = progress.lock().moved();
            if writing.is_none() {
                let position_due = moved && last_position.elapsed() >= POSITION_EVERY;
                if !outcomes.is_empty() || !settled_fresh.is_empty() || position_due {
                    last_position = Instant::now();
                    let batch = std::mem::take(&mut outcomes);
                    let settled = std::mem::take(&mut settled_fresh);
                    let p = progress.clone();
                    let position: crate::engine::Position = Box::new(move || {
                        let mut p = p.lock();
                        for s in settled {
                            p.open.remove(&s);
                        }
                        p.advance()
                    });
                    let ingest = ingest.clone();
                    let id = self.id.clone();
                    writing = Some(tokio::spawn(async move {
                        match ingest.record_deliveries(id.clone(), batch, position).await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::error!(destination = %id, error = %e, "recording deliveries failed");
                                false
                            }
                        }
                    }));
                }
            }
            if dead_counted_at != erasures {
                dead_counted_at = erasures;
                dead = self.store.count_dead_letters(&self.id).unwrap_or(dead);
            }
            {
                let queued = (buffer.len() + retries.len() + inflight.len()) as u64;
                let mut s = self.status.lock();
                s.health = health.health();
                s.queued = queued;
                s.dead_letters = dead;
                metrics::gauge!(telemetry::DELIVERY_QUEUE, &labels).set(queued as f64);
                metrics::gauge!(telemetry::DEAD_LETTERS, &labels).set(dead as f64);
            }
            drop(ingest);

            // Wait for something to do.
            let next_retry = due.first().map(|(at, _)| *at);
            let wake = match (health.suspended, health.next_probe) {
                (true, Some(at)) => Some(at),
                _ => next_retry.map(|at| {
                    let ms = (at.as_nanos() - Timestamp::now().as_nanos()).max(0) / 1_000_000;
                    Instant::now() + Duration::from_millis(ms as u64)
                }),
            };
            // A position that only foreign actions moved is written a little later.
            let wake = match (wake, moved && writing.is_none()) {
                (Some(w), true) => Some(w.min(last_position + POSITION_EVERY)),
                (None, true) => Some(last_position + POSITION_EVERY),
                (w, false) => w,
            };
            let can_read = buffer.len() < READ_AHEAD;
            tokio::select! {
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    let Ok(done) = done else { continue };
                    self.settle(&d, done, &mut health, &mut retries, &mut due, &mut outcomes, &mut settled_fresh, &mut dead, &labels);
                    // Take every other attempt that finished meanwhile.
                    while let Some(Ok(done)) = inflight.try_join_next() {
                            self.settle(&d, done, &mut health, &mut retries, &mut due, &mut outcomes, &mut settled_fresh, &mut dead, &labels);
                    }
                }
                ok = finished(&mut writing), if writing.is_some() => {
                    writing = None;
                    if !ok {
                        // The engine refuses writes: nothing more can be recorded.
                        return;
                    }
                }
                c = durable.changed(), if can_read => if c.is_err() { return },
                c = config.changed() => if c.is_err() { return },
                Some(seqs) = redriven.recv() => {
                    for seq in seqs {
                        if let Ok(Some(state)) = self.store.retry(&self.id, seq) {
                            if let Some(old) = retries.insert(seq, state.clone()) {
                                due.remove(&(old.next_at, seq));
                            }
                            due.insert((state.next_at, seq));
                        }
                    }
                    dead = self.store.count_dead_letters(&self.id).unwrap_or(dead);
                }
                _ = sleep_until(wake) => {}
            }
        }
    }

    /// Takes one attempt's result into the worker's state and queues its outcome record.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        d: &Destination,
        done: Done,
        health: &mut HealthState,
        retries: &mut HashMap<u64, DeliveryState>,
        due: &mut BTreeSet<(Timestamp, u64)>,
        outcomes: &mut Vec<Outcome>,
        settled_fresh: &mut Vec<u64>,
        dead: &mut u64,
        labels: &[(&'static str, String); 1],
    ) {
        let now = Timestamp::now();
        let seq = done.seq;
        if done.fresh {
            settled_fresh.push(seq);
        }
        let before_health = health.health();
        let (status, error, retry_after, final_now) = match done.attempt {
            Attempt::Delivered => {
                retries.remove(&seq);
                if !done.fresh {
                    outcomes.push(Outcome::Settled { seq });
                }
                metrics::counter!(telemetry::DELIVERIES, "destination_id" => self.id.clone(), "outcome" => "delivered").increment(1);
                let latency = (now.as_nanos() - done.fired_at.as_nanos()).max(0) as f64 / 1e9;
                metrics::histogram!(telemetry::DELIVERY_LATENCY, labels).record(latency);
                *health = HealthState::default();
                self.log_health(before_health, health.health(), "");
                return;
            }
            Attempt::Failed {
                status,
                error,
                retry_after,
            } => (status, error, retry_after, false),
            Attempt::Refused { status, error } => (status, error, None, true),
        };
        // A failure: health first.
        health.failures_in_a_row += 1;
        let instant = Instant::now();
        if health.failures_in_a_row >= FAILING_AFTER && health.failing_since.is_none() {
            health.failing_since = Some(instant);
        }
        if let Some(since) = health.failing_since {
            // Suspended on a failure once failing long enough; each failed probe doubles the
            // wait before the next (failures of attempts started before do not count).
            let suspends = !health.suspended && instant.duration_since(since) >= self.settings.suspend_after;
            if suspends || (health.suspended && done.probe) {
                if done.probe {
                    health.probes_failed += 1;
                }
                health.suspended = true;
                let ms = backoff_ms(
                    health.probes_failed + 1,
                    self.settings.backoff_base_ms,
                    0.5 + fastrand::f64(),
                    None,
                );
                health.next_probe = Some(instant + Duration::from_millis(ms));
            }
        }
        self.log_health(before_health, health.health(), &error);
        let mut state = match done.before {
            Some(s) => s,
            None => DeliveryState {
                attempts: 0,
                last_status: 0,
                last_error: String::new(),
                first_attempt_at: done.started,
                last_attempt_at: done.started,
                next_at: done.started,
            },
        };
        state.attempts += 1;
        state.last_status = status;
        state.last_error = error;
        state.last_attempt_at = done.started;
        let next = if final_now {
            None
        } else {
            let ms = backoff_ms(
                state.attempts,
                self.settings.backoff_base_ms,
                0.5 + fastrand::f64(),
                retry_after,
            );
            crate::domain::destination::after_failure(d, &state, now, ms)
        };
        match next {
            Some(at) => {
                state.next_at = at;
                if let Some(old) = retries.insert(seq, state.clone()) {
                    due.remove(&(old.next_at, seq));
                }
                due.insert((at, seq));
                outcomes.push(Outcome::Retry {
                    seq,
                    user: done.user,
                    state,
                });
                metrics::counter!(telemetry::DELIVERIES, "destination_id" => self.id.clone(), "outcome" => "retry").increment(1);
            }
            None => {
                if let Some(old) = retries.remove(&seq) {
                    due.remove(&(old.next_at, seq));
                }
                tracing::warn!(destination = %self.id, seq, attempts = state.attempts, status = state.last_status, error = %state.last_error, "action dead-lettered");
                outcomes.push(Outcome::Dead {
                    seq,
                    user: done.user,
                    state,
                });
                *dead += 1;
                metrics::counter!(telemetry::DELIVERIES, "destination_id" => self.id.clone(), "outcome" => "dead_letter").increment(1);
            }
        }
    }

    fn log_health(&self, before: Health, after: Health, error: &str) {
        if before == after {
            return;
        }
        match after {
            Health::Healthy => tracing::info!(destination = %self.id, "destination healthy again"),
            Health::Failing => {
                tracing::warn!(destination = %self.id, failures = FAILING_AFTER, last_error = %error, "destination failing")
            }
            Health::Suspended => {
                tracing::warn!(destination = %self.id, last_error = %error, "destination suspended: one probe attempt at a time")
            }
        }
    }
}

/// The result of the write in flight (`false` if it failed or is gone).
async fn finished(writing: &mut Option<tokio::task::JoinHandle<bool>>) -> bool {
    match writing {
        Some(w) => w.await.unwrap_or(false),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
