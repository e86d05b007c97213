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
//! in a row make a destination FAILING: from then on one attempt at a time, at most about one
//! a second (a dead endpoint is not sent every new action; they wait in the log, nothing is
//! dropped); 5 minutes of failing make it SUSPENDED: one probe attempt at a time, the wait
//! between probes doubling up to 10 minutes, until one succeeds. Health lives in memory
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
    /// The worker's health, as it last saw it (queue depth and dead letters are gauges).
    health: Arc<Mutex<Health>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How often the supervisor restarts a destination's task that ended on an error.
const RESTART_EVERY: Duration = Duration::from_secs(5);

/// What the supervisor needs to start a destination's task.
struct Spawner {
    weak: crate::engine::WeakIngest,
    store: Store,
    settings: DeliverySettings,
    sender: http::Sender,
    stopped: watch::Receiver<bool>,
}

impl Spawner {
    fn spawn(&self, id: &str, d: &Arc<Destination>) -> WorkerHandle {
        let (config, config_rx) = watch::channel(d.clone());
        let (redriven, redriven_rx) = mpsc::unbounded_channel();
        let health = Arc::new(Mutex::new(Health::default()));
        let worker = Worker {
            id: id.to_string(),
            ingest: self.weak.clone(),
            store: self.store.clone(),
            sender: self.sender.clone(),
            settings: self.settings.clone(),
            health: health.clone(),
        };
        let task = tokio::spawn(worker.run(config_rx, redriven_rx, self.stopped.clone()));
        WorkerHandle {
            config,
            redriven,
            health,
            task: Some(task),
        }
    }
}

impl Deliveries {
    /// Starts the engine: a task per destination, following the destinations as they change,
    /// until every [`Ingest`] handle but the engine's own is gone or `stopped` turns true (then
    /// each task records what finished and ends; [`Deliveries::stop`] waits for them).
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
        let spawner = Spawner {
            weak: ingest.downgrade(),
            store,
            settings,
            sender: this.sender.clone(),
            stopped,
        };
        let task = tokio::spawn(this.clone().supervise(spawner));
        Ok((this, task))
    }

    /// Whether `url` may be a destination's (private hosts refused unless allowed).
    pub(crate) async fn check_host(&self, url: &str) -> Result<(), String> {
        self.sender.check_host(url, true).await
    }

    /// A destination's health (HEALTHY for one not started yet).
    pub(crate) fn health(&self, id: &str) -> Health {
        self.workers
            .lock()
            .get(id)
            .map(|w| *w.health.lock())
            .unwrap_or_default()
    }

    /// Waits up to `grace` for every destination's task to record what finished (they stop on
    /// the `stopped` signal; attempts in flight are abandoned and repeat after the next start,
    /// as after a crash), then ends the rest.
    pub(crate) async fn stop(&self, grace: Duration) {
        // The handles stay alive until their tasks end: a worker whose config sender is gone
        // would stop without recording.
        let mut handles: Vec<WorkerHandle> = self.workers.lock().drain().map(|(_, w)| w).collect();
        let tasks: Vec<tokio::task::JoinHandle<()>> =
            handles.iter_mut().filter_map(|w| w.task.take()).collect();
        let aborts: Vec<tokio::task::AbortHandle> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("destination tasks still recording after the grace period");
        }
        for a in aborts {
            a.abort();
        }
        drop(handles);
    }

    /// Tells a destination's task that dead letters went back to its queue.
    pub(crate) fn redriven(&self, id: &str, seqs: Vec<u64>) {
        if let Some(w) = self.workers.lock().get(id) {
            let _ = w.redriven.send(seqs);
        }
    }

    async fn supervise(self, mut spawner: Spawner) {
        let Some(mut changed) = spawner.weak.upgrade().map(|i| i.destinations_changed()) else {
            return;
        };
        let mut restarts = tokio::time::interval(RESTART_EVERY);
        loop {
            if *spawner.stopped.borrow() {
                break;
            }
            let Some(ingest) = spawner.weak.upgrade() else {
                break;
            };
            let now = ingest.destinations();
            // A worker cannot record anything once storage failed: none is restarted then.
            let failed = ingest.failed();
            drop(ingest);
            {
                let mut workers = self.workers.lock();
                workers.retain(|id, _| {
                    let keep = now.contains_key(id);
                    if !keep {
                        telemetry::forget_destination(id);
                    }
                    keep
                });
                for (id, d) in &now {
                    let ended = workers
                        .get(id)
                        .is_some_and(|w| w.task.as_ref().is_none_or(|t| t.is_finished()));
                    match workers.get(id) {
                        Some(w) if !ended => {
                            let changed = !Arc::ptr_eq(&w.config.borrow(), d);
                            if changed {
                                let _ = w.config.send(d.clone());
                            }
                        }
                        _ if !failed => {
                            workers.insert(id.clone(), spawner.spawn(id, d));
                        }
                        _ => {}
                    }
                }
            }
            tokio::select! {
                c = changed.changed() => if c.is_err() { break },
                _ = spawner.stopped.wait_for(|s| *s) => break,
                _ = restarts.tick() => {}
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The most actions a worker holds read and not yet attempted.
const READ_AHEAD: usize = 512;
/// The furthest a worker reads past its position (one attempt that hangs holds the position
/// back; what is settled after it is listed with the position, so this bounds that list).
const MAX_AHEAD: u64 = 4096;
/// How often a worker writes its position when only actions of other destinations passed.
const POSITION_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between the attempts of a FAILING destination (SUSPENDED ones wait up to
/// 10 minutes).
const FAILING_SPACING: Duration = Duration::from_secs(1);
/// The longest a worker sleeps on a due time (a clock step cannot make it sleep for ever).
const MAX_SLEEP: Duration = Duration::from_secs(600);

/// A worker's bookkeeping of the log, shared with the writer thread (see `Position`).
#[derive(Default)]
struct Progress {
    /// Every action up to here has been read.
    read: u64,
    /// Actions read for this destination without an outcome recorded.
    open: BTreeSet<u64>,
    /// Actions after the position with an outcome recorded (written with the position, so a
    /// restart does not attempt them again).
    settled: BTreeSet<u64>,
    /// The position last handed to the writer, and whether `settled` changed since.
    written: u64,
    dirty: bool,
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

    /// Records `seqs` as settled; answers the new position and the settled actions after it,
    /// if they changed.
    fn settle(&mut self, seqs: Vec<u64>) -> Option<(u64, Vec<u64>)> {
        for s in seqs {
            self.open.remove(&s);
            self.settled.insert(s);
            self.dirty = true;
        }
        let at = self.position();
        self.settled = self.settled.split_off(&(at + 1));
        if at <= self.written && !self.dirty {
            return None;
        }
        self.written = self.written.max(at);
        self.dirty = false;
        Some((self.written, self.settled.iter().copied().collect()))
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
    /// One attempt at a time, paced (FAILING or SUSPENDED).
    fn throttled(&self) -> bool {
        self.failing_since.is_some()
    }

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

/// What an attempt in flight is about (kept by the worker too, to settle one whose task failed).
#[derive(Clone)]
struct Attempting {
    seq: u64,
    fresh: bool,
    user: String,
    fired_at: Timestamp,
    /// The state before the attempt (retries), `None` for a first attempt.
    before: Option<DeliveryState>,
    /// Started as the probe of a throttled destination.
    probe: bool,
}

/// One attempt's result, back at the worker.
struct Done {
    what: Attempting,
    attempt: Attempt,
    started: Timestamp,
}

struct Worker {
    id: String,
    ingest: crate::engine::WeakIngest,
    store: Store,
    sender: http::Sender,
    settings: DeliverySettings,
    health: Arc<Mutex<Health>>,
}

/// What a worker keeps between its loop's turns.
struct State {
    progress: Arc<Mutex<Progress>>,
    /// Pending retries: due time, then sequence; and each one's state.
    due: BTreeSet<(Timestamp, u64)>,
    retries: HashMap<u64, DeliveryState>,
    /// Actions after the position that already had an outcome at start.
    recorded: HashSet<u64>,
    buffer: VecDeque<FiredAction>,
    inflight: JoinSet<Done>,
    /// What each attempt in flight is, by task (to settle one whose task failed).
    attempts: HashMap<tokio::task::Id, Attempting>,
    outcomes: Vec<Outcome>,
    settled_fresh: Vec<u64>,
    writing: Option<tokio::task::JoinHandle<bool>>,
    health: HealthState,
    last_position: Instant,
    dead: u64,
    /// When reading the log last failed (the next read waits a second).
    read_failed: Option<Instant>,
}

impl Worker {
    /// Reads where the destination stands: its position, retries and dead letters.
    fn load(&self) -> Result<State, crate::store::StoreError> {
        let (start, settled) = self.store.delivery_position(&self.id)?.unwrap_or((0, Vec::new()));
        let mut due = BTreeSet::new();
        let mut retries = HashMap::new();
        for (seq, state) in self.store.retries(&self.id)? {
            due.insert((state.next_at, seq));
            retries.insert(seq, state);
        }
        // Actions after the position that already have an outcome (a crash came before the
        // position caught up with them): listed with it, a retry (scheduled above) or a dead
        // letter.
        let mut recorded: HashSet<u64> = settled.into_iter().collect();
        recorded.extend(
            self.store
                .dead_letters(&self.id, start + 1, usize::MAX)?
                .into_iter()
                .map(|(seq, _)| seq),
        );
        recorded.extend(retries.keys().filter(|s| **s > start));
        // Kept in the list written with the position until the position passes them.
        let progress = Progress {
            read: start,
            written: start,
            settled: recorded.iter().copied().collect(),
            ..Progress::default()
        };
        Ok(State {
            progress: Arc::new(Mutex::new(progress)),
            due,
            retries,
            recorded,
            buffer: VecDeque::new(),
            inflight: JoinSet::new(),
            attempts: HashMap::new(),
            outcomes: Vec::new(),
            settled_fresh: Vec::new(),
            writing: None,
            health: HealthState::default(),
            last_position: Instant::now(),
            dead: self.store.count_dead_letters(&self.id)?,
            read_failed: None,
        })
    }

    async fn run(
        self,
        mut config: watch::Receiver<Arc<Destination>>,
        mut redriven: mpsc::UnboundedReceiver<Vec<u64>>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let Some(mut durable) = self.ingest.upgrade().map(|i| i.durable_actions()) else {
            return;
        };
        let mut st = match self.load() {
            Ok(st) => st,
            Err(e) => {
                tracing::error!(destination = %self.id, error = %e, "cannot read the delivery state; not delivering (retried in a while)");
                return;
            }
        };
        let mut erasures = self.ingest.upgrade().map_or(0, |i| i.erasures());
        let labels = [("destination_id", self.id.clone())];
        loop {
            let d = config.borrow().clone();
            if *stopped.borrow() {
                self.stop(&d, st, &labels).await;
                return;
            }
            let Some(ingest) = self.ingest.upgrade() else {
                return;
            };
            // An erasure since the last look: buffered actions may belong to the erased user.
            let now_erasures = ingest.erasures();
            if now_erasures != erasures {
                erasures = now_erasures;
                for a in st.buffer.iter_mut() {
                    match self.store.action_at(a.sequence) {
                        Ok(Some(fresh)) => *a = fresh,
                        Ok(None) => a.user_id.clear(),
                        // Kept as read: the attempt's outcome is checked on the writer thread.
                        Err(_) => {}
                    }
                }
                if st.dead > 0 {
                    st.dead = self.store.count_dead_letters(&self.id).unwrap_or(st.dead);
                }
            }
            self.read_ahead(&mut st, *durable.borrow());
            self.start_attempts(&d, &mut st);
            if st.writing.is_none() {
                self.write(&ingest, &mut st, false);
            }
            let queued = (st.buffer.len() + st.retries.len() + st.inflight.len()) as u64;
            *self.health.lock() = st.health.health();
            metrics::gauge!(telemetry::DELIVERY_QUEUE, &labels).set(queued as f64);
            metrics::gauge!(telemetry::DEAD_LETTERS, &labels).set(st.dead as f64);
            drop(ingest);

            let wake = self.wake(&d, &st, *durable.borrow());
            tokio::select! {
                done = st.inflight.join_next_with_id(), if !st.inflight.is_empty() => {
                    if let Some(done) = done {
                        self.finished(&d, &mut st, done, &labels);
                    }
                    // Take every other attempt that finished meanwhile.
                    while let Some(done) = st.inflight.try_join_next_with_id() {
                        self.finished(&d, &mut st, done, &labels);
                    }
                }
                ok = written(&mut st.writing), if st.writing.is_some() => {
                    st.writing = None;
                    if !ok {
                        // The engine refuses writes: nothing more can be recorded.
                        return;
                    }
                }
                c = durable.changed() => if c.is_err() { return },
                c = config.changed() => if c.is_err() {
                    self.stop(&d, st, &labels).await;
                    return;
                },
                Some(seqs) = redriven.recv() => {
                    for seq in seqs {
                        if let Ok(Some(state)) = self.store.retry(&self.id, seq) {
                            if let Some(old) = st.retries.insert(seq, state.clone()) {
                                st.due.remove(&(old.next_at, seq));
                            }
                            st.due.insert((state.next_at, seq));
                        }
                    }
                    st.dead = self.store.count_dead_letters(&self.id).unwrap_or(st.dead);
                }
                _ = async { let _ = stopped.wait_for(|s| *s).await; } => {
                    self.stop(&d, st, &labels).await;
                    return;
                }
                _ = sleep_until(wake) => {}
            }
        }
    }

    /// Reads actions after what was read, up to the durable `head`, keeping this destination's.
    fn read_ahead(&self, st: &mut State, head: u64) {
        let (read, position) = {
            let p = st.progress.lock();
            (p.read, p.position())
        };
        if st.buffer.len() >= READ_AHEAD || read >= head || read - position >= MAX_AHEAD {
            return;
        }
        if st
            .read_failed
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        match self.store.actions(read + 1, head, READ_AHEAD, 4 * 1024 * 1024) {
            Ok(actions) => {
                st.read_failed = None;
                let mut p = st.progress.lock();
                if actions.is_empty() {
                    // Nothing left in the range (expired before this rule held it): past it.
                    p.read = head;
                }
                for a in actions {
                    p.read = a.sequence;
                    if a.destination_id == self.id && !st.recorded.remove(&a.sequence) {
                        p.open.insert(a.sequence);
                        st.buffer.push_back(a);
                    }
                }
            }
            Err(e) => {
                tracing::error!(destination = %self.id, error = %e, "cannot read the action log; trying again in a second");
                st.read_failed = Some(Instant::now());
            }
        }
    }

    /// How many attempts could start, the wait of a throttled destination aside: none when
    /// paused, one at a time when throttled, else up to `concurrency`.
    fn capacity(&self, d: &Destination, st: &State) -> usize {
        let most = match (d.paused, st.health.throttled()) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => d.concurrency.max(1) as usize,
        };
        most.saturating_sub(st.inflight.len())
    }

    /// How many attempts may start now.
    fn slots(&self, d: &Destination, st: &State) -> usize {
        let waiting = st.health.throttled() && st.health.next_probe.is_some_and(|at| at > Instant::now());
        if waiting {
            0
        } else {
            self.capacity(d, st)
        }
    }

    /// Starts attempts: due retries first, then fresh actions (erased ones settle at once).
    fn start_attempts(&self, d: &Arc<Destination>, st: &mut State) {
        while self.slots(d, st) > 0 {
            let now = Timestamp::now();
            let next_retry = st.due.first().copied().filter(|(at, _)| *at <= now);
            let (action, before, fresh) = if let Some((at, seq)) = next_retry {
                st.due.remove(&(at, seq));
                let Some(state) = st.retries.get(&seq).cloned() else {
                    continue;
                };
                match self.store.action_at(seq) {
                    Ok(Some(a)) if !a.user_id.is_empty() => (a, Some(state), false),
                    Ok(Some(_)) => {
                        // Erased: nothing left to deliver.
                        st.retries.remove(&seq);
                        st.outcomes.push(Outcome::Settled { seq });
                        continue;
                    }
                    Ok(None) => {
                        // Retention holds the log for pending retries; this one was gone anyway
                        // (a data directory from before that rule): dead-lettered, not dropped.
                        st.retries.remove(&seq);
                        st.outcomes.push(Outcome::Dead {
                            seq,
                            user: None,
                            state: DeliveryState {
                                last_error: "the action expired from the log before it was delivered".into(),
                                ..state
                            },
                        });
                        st.dead += 1;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(destination = %self.id, seq, error = %e, "cannot read an action to retry");
                        st.due.insert((now.plus_secs(1), seq));
                        break;
                    }
                }
            } else if let Some(a) = st.buffer.pop_front() {
                if a.user_id.is_empty() {
                    st.settled_fresh.push(a.sequence);
                    continue;
                }
                (a, None, true)
            } else {
                break;
            };
            let what = Attempting {
                seq: action.sequence,
                fresh,
                user: action.user_id.clone(),
                fired_at: action.fired_at,
                before,
                probe: st.health.throttled(),
            };
            let probe = what.probe;
            let sender = self.sender.clone();
            let dest = d.clone();
            let kept = what.clone();
            let task = st.inflight.spawn(async move {
                let started = Timestamp::now();
                let attempt = sender.post(&dest, &action).await;
                Done {
                    what,
                    attempt,
                    started,
                }
            });
            st.attempts.insert(task.id(), kept);
            if probe {
                // One probe at a time; the next waits for this one's outcome.
                st.health.next_probe = Some(Instant::now() + MAX_SLEEP);
            }
        }
    }

    /// Takes a finished attempt task's result (a task that failed counts as a failed attempt).
    fn finished(
        &self,
        d: &Destination,
        st: &mut State,
        done: Result<(tokio::task::Id, Done), tokio::task::JoinError>,
        labels: &[(&'static str, String); 1],
    ) {
        let done = match done {
            Ok((id, done)) => {
                st.attempts.remove(&id);
                done
            }
            Err(e) => {
                let Some(what) = st.attempts.remove(&e.id()) else {
                    return;
                };
                Done {
                    what,
                    attempt: Attempt::Failed {
                        status: 0,
                        error: "the attempt failed inside engage".into(),
                        retry_after: None,
                    },
                    started: Timestamp::now(),
                }
            }
        };
        self.settle(d, done, st, labels);
    }

    /// Hands the outcomes collected so far (and the position, if due or `now`) to the writer.
    fn write(&self, ingest: &Ingest, st: &mut State, now: bool) {
        let moved = st.progress.lock().moved();
        let position_due = moved && (now || st.last_position.elapsed() >= POSITION_EVERY);
        if st.outcomes.is_empty() && st.settled_fresh.is_empty() && !position_due {
            return;
        }
        st.last_position = Instant::now();
        let batch = std::mem::take(&mut st.outcomes);
        let settled = std::mem::take(&mut st.settled_fresh);
        let progress = st.progress.clone();
        let position: crate::engine::Position = Box::new(move || progress.lock().settle(settled));
        let ingest = ingest.clone();
        let id = self.id.clone();
        st.writing = Some(tokio::spawn(async move {
            match ingest.record_deliveries(id.clone(), batch, position).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(destination = %id, error = %e, "recording deliveries failed");
                    false
                }
            }
        }));
    }

    /// When to look again without news: a due retry or probe that could start, a position
    /// to write, more of the log to read.
    fn wake(&self, d: &Destination, st: &State, head: u64) -> Option<Instant> {
        let now = Instant::now();
        let (read, moved, position) = {
            let p = st.progress.lock();
            (p.read, p.moved(), p.position())
        };
        let mut wake: Option<Instant> = None;
        let mut at = |w: Instant| wake = Some(wake.map_or(w, |x| x.min(w)));
        if read < head && st.buffer.len() < READ_AHEAD && read - position < MAX_AHEAD {
            at(st.read_failed.map_or(now, |f| f + Duration::from_secs(1)));
        }
        if moved && st.writing.is_none() {
            at(st.last_position + POSITION_EVERY);
        }
        if self.capacity(d, st) > 0 {
            let retry_at = st.due.first().map(|(at, _)| {
                let ms = (at.as_nanos() - Timestamp::now().as_nanos()).max(0) / 1_000_000;
                now + Duration::from_millis(ms as u64).min(MAX_SLEEP)
            });
            let work_at = if st.buffer.is_empty() { retry_at } else { Some(now) };
            match (st.health.throttled(), work_at) {
                (true, Some(w)) => at(w.max(st.health.next_probe.unwrap_or(w))),
                (false, Some(w)) => at(w),
                (_, None) => {}
            }
        }
        wake
    }

    /// On shutdown: starts nothing more, lets the attempts in flight finish (the server's
    /// grace period bounds the wait: see [`Deliveries::stop`]; an attempt cut off then repeats
    /// after the next start, as after a crash) and records every outcome.
    async fn stop(&self, d: &Destination, mut st: State, labels: &[(&'static str, String); 1]) {
        while let Some(done) = st.inflight.join_next_with_id().await {
            self.finished(d, &mut st, done, labels);
        }
        if let Some(w) = st.writing.take() {
            let _ = w.await;
        }
        if let Some(ingest) = self.ingest.upgrade() {
            self.write(&ingest, &mut st, true);
            if let Some(w) = st.writing.take() {
                let _ = w.await;
            }
        }
    }

    /// Takes one attempt's result into the worker's state and queues its outcome record.
    fn settle(&self, d: &Destination, done: Done, st: &mut State, labels: &[(&'static str, String); 1]) {
        let State {
            health,
            retries,
            due,
            outcomes,
            settled_fresh,
            dead,
            ..
        } = st;
        let now = Timestamp::now();
        let Done {
            what,
            attempt,
            started,
        } = done;
        let seq = what.seq;
        if what.fresh {
            settled_fresh.push(seq);
        }
        let before_health = health.health();
        let (status, error, retry_after, final_now) = match attempt {
            Attempt::Delivered => {
                retries.remove(&seq);
                if !what.fresh {
                    outcomes.push(Outcome::Settled { seq });
                }
                metrics::counter!(telemetry::DELIVERIES, "destination_id" => self.id.clone(), "outcome" => "delivered").increment(1);
                let latency = (now.as_nanos() - what.fired_at.as_nanos()).max(0) as f64 / 1e9;
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
            // Throttled while failing: one attempt at a time, the next after a wait that
            // doubles with each failure in a row, up to FAILING_SPACING; suspended once failing
            // long enough, the same with waits up to 10 minutes, doubling with each failed probe
            // (failures of attempts started before the throttle do not count).
            if !health.suspended && instant.duration_since(since) >= self.settings.suspend_after {
                health.suspended = true;
            }
            let ms = if health.suspended {
                if what.probe {
                    health.probes_failed += 1;
                }
                backoff_ms(
                    health.probes_failed + 1,
                    self.settings.backoff_base_ms,
                    0.5 + fastrand::f64(),
                    None,
                )
            } else {
                backoff_ms(
                    health.failures_in_a_row + 1 - FAILING_AFTER,
                    self.settings.backoff_base_ms,
                    0.5 + fastrand::f64(),
                    None,
                )
                .min(FAILING_SPACING.as_millis() as u64)
            };
            if !health.suspended || what.probe || health.next_probe.is_none() {
                health.next_probe = Some(instant + Duration::from_millis(ms));
            }
        }
        self.log_health(before_health, health.health(), &error);
        let mut state = match what.before {
            Some(s) => s,
            None => DeliveryState {
                attempts: 0,
                last_status: 0,
                last_error: String::new(),
                first_attempt_at: started,
                last_attempt_at: started,
                next_at: started,
            },
        };
        state.attempts += 1;
        state.last_status = status;
        state.last_error = error;
        state.last_attempt_at = started;
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
                    user: Some(what.user),
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
                    user: Some(what.user),
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
async fn written(writing: &mut Option<tokio::task::JoinHandle<bool>>) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_stops_below_the_first_open_action_and_lists_what_is_settled_after_it() {
        let mut p = Progress {
            read: 10,
            written: 0,
            ..Progress::default()
        };
        p.open.extend([3, 5, 8]);
        // 5 and 8 settle first: the position stays at 2 and lists them.
        assert_eq!(p.settle(vec![5, 8]), Some((2, vec![5, 8])));
        assert!(!p.moved());
        assert_eq!(p.settle(vec![]), None);
        // 3 settles: everything read is settled.
        assert_eq!(p.settle(vec![3]), Some((10, vec![])));
        assert_eq!(p.settle(vec![]), None);
        p.read = 12;
        assert!(p.moved());
        assert_eq!(p.settle(vec![]), Some((12, vec![])));
    }
}
