//! The ingest engine: validates, types, sequences and stores events, with group commit.
//!
//! One **writer thread** owns every piece of mutable ingest state (the next sequence, the schema,
//! event-name statistics). It drains all waiting commands, turns them into one atomic
//! [`WriteBatch`], applies it and hands the replies to one **committer thread**, which drains
//! every applied group, runs a single `flush()` and only then answers: many concurrent writers
//! share one fsync, and no caller hears OK before its writes are durable. While the committer
//! flushes group N the writer already builds group N+1.
//!
//! Single ownership makes idempotency, gap-free sequences and "a rejected event leaves nothing
//! behind" (auto-created attributes included) simple: nothing else writes. Triggers are
//! evaluated here too, on each newly stored event, and the actions they fire join the event's
//! batch, so an action never exists without its event and both are durable together.
//!
//! Cost of one event: its stateless checks, typing, one write, and for each trigger on its name
//! (found through an in-memory index, so triggers on other names cost nothing) the condition:
//! attribute conditions read the event only; a history condition without window and `where`
//! reads one running aggregate of (user, name); one with a window or `where` reads the user's
//! events of that name inside the window, never other names or users.
//!
//! Running aggregates are maintained only for the names such all-history conditions use (one
//! read and one write per event of those names). A name starts a new maintenance *epoch* each
//! time it enters that set; an aggregate from an older epoch, or a missing one, is rebuilt from
//! the user's events of that name the first time it is needed, so no stale count is ever used.
//!
//! Timed triggers (`delay`, `unless`) arm a timer instead of firing: a durable record in the
//! event's batch, one per (trigger, user). An event that an absence check waits for cancels
//! its user's timer (one index read per trigger waiting for that name); the clock thread
//! (`timers`) sends a job that fires due timers, alone in its write group.
//!
//! Every stored event is also added to the by-name index of `store::columns` (FilterUsers and
//! GetEventStats read it): one compact record per event, and per write group one block per
//! (name, hour) and one bucket update per (name, minute) and (name, hour) it touches.
//!
//! Stateless checks ([`prepare`]) run on the caller's task, so they use every core.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, RwLock};
use std::thread;

use tokio::sync::{mpsc, oneshot};

use tokio::sync::watch;

use crate::condition::{self, Accumulator, Condition, HistoryCondition};
use crate::error::{invalid, Error};
use crate::model::{
    AbsenceCheck, AttributeDefinition, AttributeType, Event, EventNameStats, FiredAction, FiringState,
    NewEvent, PendingTimer, Timer, Timestamp, Trigger, UserNameAggregate, Value,
};
use crate::schema;
use crate::store::columns::{self, ColumnWrites, Columns};
use crate::store::timers::{self, TimerOverlay};
use crate::store::{Store, WriteBatch};
use crate::template;
use crate::timers::TimerClock;

/// Limits on events and batches (SPEC §4 defaults; configurable).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_attributes_per_event: usize,
    pub max_attribute_name_chars: usize,
    pub max_string_value_bytes: usize,
    pub max_json_value_bytes: usize,
    pub max_batch_events: usize,
    pub max_future_skew_secs: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_attributes_per_event: 100,
            max_attribute_name_chars: 128,
            max_string_value_bytes: 8 * 1024,
            max_json_value_bytes: 64 * 1024,
            max_batch_events: 1000,
            max_future_skew_secs: 24 * 3600,
        }
    }
}

/// Longest accepted client event id, in characters.
pub const MAX_EVENT_ID_CHARS: usize = 128;
/// Longest accepted user id, in bytes (SPEC §1).
pub const MAX_USER_ID_BYTES: usize = 256;

/// An event that passed the stateless checks; attributes still need typing.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    event_id: Option<String>,
    user_id: String,
    name: String,
    occurred_at: Option<Timestamp>,
    attributes: Vec<(String, Value)>,
}

/// Checks a user id (SPEC §1): 1-256 bytes of UTF-8, no NUL.
pub fn check_user_id(field: &str, user_id: &str) -> Result<(), Error> {
    if user_id.is_empty() {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(invalid(format!(
            "{field}: {} bytes, at most {MAX_USER_ID_BYTES} allowed",
            user_id.len()
        )));
    }
    if user_id.contains('\0') {
        return Err(invalid(format!("{field}: must not contain NUL")));
    }
    Ok(())
}

/// The stateless checks of one event: ids, name, time, attribute names, counts and sizes.
/// Field names in errors are relative to the event (`user_id`, `attributes["price"]`).
pub fn prepare(event: NewEvent, limits: &Limits, now: Timestamp) -> Result<PreparedEvent, Error> {
    let event_id = match event.event_id.chars().count() {
        0 => None,
        n if n > MAX_EVENT_ID_CHARS => {
            return Err(invalid(format!(
                "event_id: {n} characters, at most {MAX_EVENT_ID_CHARS} allowed"
            )))
        }
        _ => Some(event.event_id),
    };
    check_user_id("user_id", &event.user_id)?;
    let name = schema::normalize_event_name("name", &event.name)?;
    if let Some(at) = event.occurred_at {
        let latest = now.plus_secs(limits.max_future_skew_secs);
        if at > latest {
            return Err(invalid(format!(
                "occurred_at: {at} is more than {}s in the future (max_future_skew)",
                limits.max_future_skew_secs
            )));
        }
    }
    let count = event.attributes.len();
    if count > limits.max_attributes_per_event {
        return Err(invalid(format!(
            "attributes: {count} attributes, limit is {} (max_attributes_per_event)",
            limits.max_attributes_per_event
        )));
    }
    for (attr, value) in &event.attributes {
        let field = || format!("attributes[{attr:?}]");
        schema::check_attribute_name(field, attr, limits.max_attribute_name_chars)?;
        let (len, limit, limit_name) = match value {
            Value::Json(s) => (s.len(), limits.max_json_value_bytes, "max_json_value_bytes"),
            // A string may still become JSON; its final size is checked after typing.
            Value::String(s) => (
                s.len(),
                limits.max_json_value_bytes.max(limits.max_string_value_bytes),
                "max_json_value_bytes",
            ),
            _ => (0, usize::MAX, ""),
        };
        if len > limit {
            return Err(invalid(format!(
                "{}: value is {len} bytes, limit is {limit} ({limit_name})",
                field()
            )));
        }
    }
    Ok(PreparedEvent {
        event_id,
        user_id: event.user_id,
        name,
        occurred_at: event.occurred_at,
        attributes: event.attributes,
    })
}

/// What happened to one tracked event.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracked {
    pub event_id: String,
    pub sequence: u64,
    pub duplicate: bool,
    pub actions_fired: u32,
}

/// A reply waiting for its group's flush: answers the result, or the flush's fault.
type Reply = Box<dyn FnOnce(Option<&Error>) + Send>;

/// Work for the writer thread. A *barrier* runs alone in its group, after every earlier write is
/// applied: trigger changes (later events must see every earlier one in the store, whatever
/// overlay the old trigger set kept) and user erasure (no write of that user may be in flight).
struct Job {
    run: JobFn,
    barrier: bool,
}

type JobFn = Box<dyn FnOnce(&mut Writer, &mut Group) + Send>;

/// Read views of the writer's state, for the read RPCs.
#[derive(Default)]
pub struct SharedState {
    pub attributes: RwLock<BTreeMap<String, AttributeDefinition>>,
    pub event_names: RwLock<BTreeMap<String, EventNameStats>>,
    pub triggers: RwLock<BTreeMap<String, Arc<Trigger>>>,
}

/// The handle callers use; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
    shared: Arc<SharedState>,
    failed: Arc<AtomicBool>,
    limits: Arc<Limits>,
    durable_actions: watch::Receiver<u64>,
    /// Names whose rollup refresh is queued or running (one at a time per name).
    refreshing: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Users erased since start (cached query results from before an erasure are not reused).
    erasures: Arc<std::sync::atomic::AtomicU64>,
}

/// Joins the engine's threads; dropping every [`Ingest`] handle lets them finish.
pub struct IngestThreads {
    writer: thread::JoinHandle<()>,
    committer: thread::JoinHandle<()>,
    clock: Arc<TimerClock>,
    clock_thread: thread::JoinHandle<()>,
}

impl IngestThreads {
    /// Waits until every accepted command is applied, flushed and answered.
    pub fn join(self) {
        self.clock.stop();
        let _ = self.clock_thread.join();
        let _ = self.writer.join();
        let _ = self.committer.join();
    }
}

/// Most writes one group may hold before the writer applies it: larger groups share fsyncs
/// better but make sled's batch (and the callers' wait) large; measured best around here.
const MAX_GROUP_WRITES: usize = 4096;

fn unavailable() -> Error {
    Error::Unavailable("storage failed; the server must be restarted".into())
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    match lock.read() {
        Ok(v) => v.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

impl Ingest {
    /// Loads the state from `store` and starts the writer and committer threads.
    pub fn start(store: Store, limits: Limits) -> Result<(Self, IngestThreads), Error> {
        let loaded = store.load_state()?;
        let shared = Arc::new(SharedState::default());
        let lock = || Error::Internal("lock poisoned at start".into());
        {
            let mut attrs = shared.attributes.write().map_err(|_| lock())?;
            for def in loaded.attributes {
                attrs.insert(def.name.clone(), def);
            }
            let mut names = shared.event_names.write().map_err(|_| lock())?;
            names.extend(loaded.event_names);
        }
        let triggers: BTreeMap<String, Arc<Trigger>> = loaded
            .triggers
            .into_iter()
            .map(|t| (t.id.clone(), Arc::new(t)))
            .collect();
        *shared.triggers.write().map_err(|_| lock())? = triggers.clone();
        let failed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(1024);
        let (commit_tx, commit_rx) = std_mpsc::sync_channel::<(Vec<Reply>, u64)>(64);
        let (durable_tx, durable_rx) = watch::channel(loaded.last_action_seq);
        let mut writer = Writer {
            store: store.clone(),
            shared: shared.clone(),
            failed: failed.clone(),
            limits: limits.clone(),
            last_seq: loaded.last_event_seq,
            last_action_seq: loaded.last_action_seq,
            ulids: ulid::Generator::new(),
            triggers,
            by_name: HashMap::new(),
            history_triggers: 0,
            maintained: HashMap::new(),
            epochs: loaded.epochs.into_iter().collect(),
            templates: template::Templates::default(),
            columns: Columns::default(),
            unless_by_name: HashMap::new(),
            clock: Arc::new(TimerClock::default()),
        };
        let unpacked = store.drop_unpacked_timers()?;
        if unpacked > 0 {
            tracing::warn!(keys = unpacked, "dropped timer keys of a pre-release layout");
        }
        let clock = writer.clock.clone();
        // A timer that fell due while the server was down fires at once.
        clock.set_next(
            store
                .next_due_minute(None)?
                .map(|m| Timestamp::from_nanos(m as i128 * 60_000_000_000)),
        );
        writer.backfill_columns()?;
        for t in writer.triggers.values() {
            writer.templates.set(&t.id, &t.action.payload_template);
        }
        // The triggers are the ones that were live when the server stopped, so every name they
        // maintain was maintained without a break: it keeps its stored epoch (no rebuild).
        for t in writer.triggers.values().filter(|t| !t.paused) {
            let mut names = std::collections::HashSet::new();
            if let Some(c) = &t.condition {
                all_history_names(c, &mut names);
            }
            for name in names {
                if let Some(epoch) = writer.epochs.get(&name) {
                    writer.maintained.insert(name, *epoch);
                }
            }
        }
        let mut at_start = WriteBatch::default();
        writer.reindex(&mut at_start);
        store.apply(at_start)?;
        let writer = thread::Builder::new()
            .name("engage-writer".into())
            .spawn(move || writer.run(rx, commit_tx))
            .map_err(|e| Error::Internal(format!("spawn writer: {e}")))?;
        let committer_failed = failed.clone();
        let committer = thread::Builder::new()
            .name("engage-committer".into())
            .spawn(move || run_committer(store, commit_rx, committer_failed, durable_tx))
            .map_err(|e| Error::Internal(format!("spawn committer: {e}")))?;
        let ingest = Self {
            tx,
            shared,
            failed,
            limits: Arc::new(limits),
            durable_actions: durable_rx,
            refreshing: Default::default(),
            erasures: Default::default(),
        };
        // The clock holds only a weak sender: it never keeps the writer alive.
        let weak = ingest.tx.downgrade();
        let clock_thread = thread::Builder::new()
            .name("engage-timers".into())
            .spawn({
                let clock = clock.clone();
                move || {
                    clock.run(|| {
                        let Some(tx) = weak.upgrade() else {
                            return false;
                        };
                        let job = Job {
                            run: Box::new(|writer: &mut Writer, group: &mut Group| {
                                let action_seq = writer.last_action_seq;
                                if let Err(e) = writer.fire_due_timers(group) {
                                    // The actions are dropped with the writes: their sequence
                                    // numbers must be handed out again (the log stays gap-free).
                                    writer.last_action_seq = action_seq;
                                    tracing::error!(error = %e, "firing due timers failed; retrying in 1 s");
                                    group.discard_writes();
                                    writer.clock.set_next(Some(Timestamp::now().plus_secs(1)));
                                }
                            }),
                            barrier: true,
                        };
                        tx.blocking_send(job).is_ok()
                    })
                }
            })
            .map_err(|e| Error::Internal(format!("spawn timer clock: {e}")))?;
        Ok((
            ingest,
            IngestThreads {
                writer,
                committer,
                clock,
                clock_thread,
            },
        ))
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Follows the highest action sequence that is durable (only those may be delivered).
    pub fn durable_actions(&self) -> watch::Receiver<u64> {
        self.durable_actions.clone()
    }

    /// Runs `job` on the writer thread; answers after the group it joined is durable.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Writer, &mut Group) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.submit(job, false).await
    }

    /// Like [`Ingest::run`], as a barrier (see [`Job`]).
    async fn run_alone<T: Send + 'static>(
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
        if self.failed.load(Ordering::Acquire) {
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
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
        rx.await.map_err(|_| unavailable())?
    }

    /// Tracks events: one result per input, in order. `events` hold the outcome of [`prepare`],
    /// so a batch keeps its positions when some items were already rejected.
    pub async fn track(
        &self,
        events: Vec<Result<PreparedEvent, Error>>,
    ) -> Result<Vec<Result<Tracked, Error>>, Error> {
        self.run(move |writer, group| {
            Ok(events
                .into_iter()
                .map(|e| e.and_then(|e| writer.track_one(e, group)))
                .collect())
        })
        .await
    }

    /// Defines an attribute (SPEC §2): same type again is a no-op, another type is
    /// FAILED_PRECONDITION.
    pub async fn define_attribute(
        &self,
        name: String,
        attribute_type: AttributeType,
        description: String,
    ) -> Defined {
        self.run(move |writer, group| writer.define(name, attribute_type, description, group))
            .await
    }

    /// Stores a new trigger (already validated); the writer assigns its id and times.
    pub async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, Error> {
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
    pub async fn update_trigger(&self, trigger: Trigger) -> Result<Trigger, Error> {
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
    pub async fn delete_trigger(&self, id: String) -> Result<(), Error> {
        self.run_alone(move |writer, group| {
            if !writer.triggers.contains_key(&id) {
                return Err(Error::NotFound(format!("id: no trigger {id:?}")));
            }
            let firing_keys = writer.store.firing_state_keys(&id)?;

            writer.triggers.remove(&id);
            writer.templates.remove(&id);
            group.batch.remove_trigger(&id);

            group.batch.remove_keys(firing_keys);
            group.firing.retain(|(t, _), _| t != &id);
            group.triggers_changed = true;
            writer.reindex(&mut group.batch);
            Ok(())
        })
        .await
    }

    /// Erases a user everywhere (SPEC §3 DeleteUser): events, event ids, running aggregates,
    /// firing state and event-name counts; the user's fired actions keep their sequence but lose
    /// user id, payload and event. Answers the number of events erased.
    pub async fn delete_user(&self, user_id: String) -> Result<u64, Error> {
        // Erasure runs alone in its group: if any read fails half-way, dropping the group's
        // writes leaves the user exactly as before (and a retry starts from scratch).
        let erased = self
            .run_alone(move |writer, group| {
                let erased = writer.erase(&user_id, group);
                if erased.is_err() {
                    group.discard_writes();
                }
                erased
            })
            .await;
        self.erasures.fetch_add(1, Ordering::SeqCst);
        erased
    }

    /// How many erasures were requested since start.
    pub fn erasures(&self) -> u64 {
        self.erasures.load(Ordering::SeqCst)
    }

    /// Asks for `name`'s rollup to be rebuilt (see `store::columns`) unless a rebuild is already
    /// queued; returns at once. The rebuild runs in the writer, alone in its write group.
    pub fn request_rollup(&self, name: String) {
        let fresh = match self.refreshing.lock() {
            Ok(mut pending) => pending.insert(name.clone()),
            Err(_) => false,
        };
        if !fresh {
            return;
        }
        let ingest = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let done = ingest
                .run_alone({
                    let name = name.clone();
                    move |writer, group| {
                        let now = Timestamp::now();
                        let refreshed = writer
                            .columns
                            .refresh_rollup(&writer.store, &mut group.batch, &name, writer.last_seq, now)
                            .map_err(Error::from);
                        if refreshed.is_err() {
                            group.discard_writes();
                        }
                        refreshed
                    }
                })
                .await;
            match done {
                Ok(meta) => tracing::info!(
                    name,
                    users = meta.users,
                    ms = started.elapsed().as_millis() as u64,
                    "rollup rebuilt"
                ),
                Err(e) => tracing::warn!(name, error = %e, "rollup refresh failed"),
            }
            if let Ok(mut pending) = ingest.refreshing.lock() {
                pending.remove(&name);
            }
        });
    }

    /// Deletes up to `max` actions fired before `cutoff` from the start of the log.
    pub async fn expire_actions(&self, cutoff: Timestamp, max: usize) -> Result<usize, Error> {
        self.run(move |writer, group| Ok(writer.store.expire_actions(&mut group.batch, cutoff, max)?))
            .await
    }

    /// A named consumer's position, creating the consumer at `initial` when it is new.
    pub async fn ensure_consumer(&self, name: String, initial: u64) -> Result<u64, Error> {
        self.run(move |writer, group| {
            if let Some(pos) = writer.consumer(&name, group)? {
                return Ok(pos);
            }
            group.batch.put_consumer(&name, initial);
            group.consumers.insert(name, initial);
            Ok(initial)
        })
        .await
    }

    /// Moves a named consumer's position forward to `up_to` (never back); answers the position.
    pub async fn ack(&self, name: String, up_to: u64) -> Result<u64, Error> {
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
            group.batch.put_consumer(&name, up_to);
            group.consumers.insert(name, up_to);
            Ok(up_to)
        })
        .await
    }

    /// Every attribute definition, by name.
    pub fn attributes(&self) -> Vec<AttributeDefinition> {
        read(&self.shared.attributes).into_values().collect()
    }

    /// The type of one attribute, if defined.
    pub fn attribute_type(&self, name: &str) -> Option<AttributeType> {
        match self.shared.attributes.read() {
            Ok(m) => m.get(name).map(|d| d.attribute_type),
            Err(p) => p.into_inner().get(name).map(|d| d.attribute_type),
        }
    }

    /// Every event name seen, by name.
    pub fn event_names(&self) -> Vec<(String, EventNameStats)> {
        read(&self.shared.event_names).into_iter().collect()
    }

    /// Every trigger, by id (creation order).
    pub fn triggers(&self) -> BTreeMap<String, Arc<Trigger>> {
        read(&self.shared.triggers)
    }
}

/// The outcome of DefineAttribute.
pub type Defined = Result<AttributeDefinition, Error>;

/// The writer thread's state (see the module documentation).
pub struct Writer {
    store: Store,
    shared: Arc<SharedState>,
    failed: Arc<AtomicBool>,
    limits: Limits,
    last_seq: u64,
    last_action_seq: u64,
    ulids: ulid::Generator,
    triggers: BTreeMap<String, Arc<Trigger>>,
    /// Active (unpaused) triggers by event name: an event only looks at its own name's.
    by_name: HashMap<String, Vec<Arc<Trigger>>>,
    /// Active triggers with a history condition; when 0, groups keep no event overlay.
    history_triggers: usize,
    /// Names whose running aggregates are maintained, with their current epoch.
    maintained: HashMap<String, u64>,
    /// The last epoch of every name ever maintained.
    epochs: HashMap<String, u64>,
    templates: template::Templates,
    /// The by-name index's write state (see `store::columns`).
    columns: Columns,
    /// Active triggers with an absence check, by the name of the event that cancels them.
    unless_by_name: HashMap<String, Vec<Arc<Trigger>>>,
    /// Wakes the writer when the earliest timer is due.
    clock: Arc<TimerClock>,
}

/// The writes of one group, before they are applied, and what they change in memory.
pub struct Group {
    batch: WriteBatch,
    replies: Vec<Reply>,
    /// Client event ids stored by this group, for duplicates inside the group.
    event_ids: HashMap<String, u64>,
    new_attributes: Vec<AttributeDefinition>,
    name_stats: HashMap<String, EventNameStats>,
    /// (user, event name) aggregates touched by this group.
    aggregates: HashMap<(String, String), UserNameAggregate>,
    /// (user, event name) events of this group, not yet readable from sled (history overlay).
    recent: HashMap<(String, String), Vec<Event>>,
    /// (trigger, user) firing states changed by this group.
    firing: HashMap<(String, String), FiringState>,
    consumers: HashMap<String, u64>,
    triggers_changed: bool,
    /// What the group's events add to the by-name index and statistics.
    columns: ColumnWrites,
    /// The timers this group reads, arms, cancels or fires (see `store::timers`).
    timers: TimerOverlay,
}

impl Group {
    fn new() -> Self {
        Self {
            batch: WriteBatch::default(),
            replies: Vec::new(),
            event_ids: HashMap::new(),
            new_attributes: Vec::new(),
            name_stats: HashMap::new(),
            aggregates: HashMap::new(),
            recent: HashMap::new(),
            firing: HashMap::new(),
            consumers: HashMap::new(),
            triggers_changed: false,
            columns: ColumnWrites::default(),
            timers: TimerOverlay::default(),
        }
    }
}

impl Group {
    /// Drops every write of the group (its replies stay).
    fn discard_writes(&mut self) {
        let replies = std::mem::take(&mut self.replies);
        *self = Group::new();
        self.replies = replies;
    }
}

/// What an event does to timed triggers: fire now (settled at once), fire an overdue pending
/// timer it is about to replace, remove timers, arm timers.
#[derive(Default)]
struct Plan {
    now_firing: Vec<Firing>,
    overdue: Vec<(Firing, Event)>,
    removals: Vec<(String, Timestamp)>,
    arms: Vec<Arm>,
}

/// A timer an event arms: due at `due`, replacing the pending one of its (trigger, user).
struct Arm {
    trigger_id: String,
    generation: Timestamp,
    due: Timestamp,
}

/// A trigger about to fire, with its firing state when it has once_per_user or a cooldown.
type Firing = (Arc<Trigger>, Option<FiringState>);

/// Adds the event names of `c`'s history conditions that read all history without `where`
/// (those a running aggregate answers).
fn all_history_names(c: &Condition, out: &mut std::collections::HashSet<String>) {
    match c {
        Condition::All(v) | Condition::Any(v) => v.iter().for_each(|c| all_history_names(c, out)),
        Condition::Not(c) => all_history_names(c, out),
        Condition::Attribute(_) => {}
        Condition::History(h) => {
            if h.within_nanos.is_none() && h.filter.is_none() {
                out.insert(h.event_name.clone());
            }
        }
    }
}

fn has_history(c: &Condition) -> bool {
    match c {
        Condition::All(v) | Condition::Any(v) => v.iter().any(has_history),
        Condition::Not(c) => has_history(c),
        Condition::Attribute(_) => false,
        Condition::History(_) => true,
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>, commit: std_mpsc::SyncSender<(Vec<Reply>, u64)>) {
        let mut held: Option<Job> = None;
        loop {
            let Some(first) = held.take().or_else(|| rx.blocking_recv()) else {
                break;
            };
            let mut group = Group::new();
            let start_seq = self.last_seq;
            let start_action_seq = self.last_action_seq;
            let alone = first.barrier;
            (first.run)(&mut self, &mut group);
            while !alone && group.batch.len() < MAX_GROUP_WRITES {
                match rx.try_recv() {
                    Ok(job) if job.barrier => {
                        held = Some(job);
                        break;
                    }
                    Ok(job) => (job.run)(&mut self, &mut group),
                    Err(_) => break,
                }
            }
            let replies = std::mem::take(&mut group.replies);
            if let Some(fault) = self.apply(group, start_seq, start_action_seq) {
                for r in replies {
                    r(Some(&fault));
                }
                continue;
            }
            if commit.send((replies, self.last_action_seq)).is_err() {
                break;
            }
        }
    }

    /// Applies a group's batch and publishes its state; on failure the engine stops accepting
    /// writes (the in-memory state may now be ahead of the disk).
    fn apply(&mut self, group: Group, start_seq: u64, start_action_seq: u64) -> Option<Error> {
        if self.failed.load(Ordering::Acquire) {
            return Some(unavailable());
        }
        let mut batch = group.batch;
        if !group.columns.is_empty() {
            if let Err(e) = self.columns.write(&self.store, &mut batch, group.columns) {
                tracing::error!(error = %e, "indexing a write group failed; refusing further writes");
                self.failed.store(true, Ordering::Release);
                return Some(unavailable());
            }
        }
        if !group.timers.is_empty() {
            if let Err(e) = group.timers.write(&self.store, &mut batch) {
                tracing::error!(error = %e, "writing timers failed; refusing further writes");
                self.failed.store(true, Ordering::Release);
                return Some(unavailable());
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
        if let Err(e) = self.store.apply(batch) {
            tracing::error!(error = %e, "applying a write batch failed; refusing further writes");
            self.failed.store(true, Ordering::Release);
            return Some(unavailable());
        }
        if !group.name_stats.is_empty() {
            if let Ok(mut names) = self.shared.event_names.write() {
                names.extend(group.name_stats);
            }
        }
        if !group.new_attributes.is_empty() {
            if let Ok(mut attrs) = self.shared.attributes.write() {
                for def in group.new_attributes {
                    attrs.insert(def.name.clone(), def);
                }
            }
        }
        if group.triggers_changed {
            if let Ok(mut triggers) = self.shared.triggers.write() {
                *triggers = self.triggers.clone();
            }
        }
        None
    }

    /// Rebuilds the by-name index and the set of maintained names from the trigger map (on
    /// trigger changes only). A name entering the set starts a new epoch, written to `batch`.
    fn reindex(&mut self, batch: &mut WriteBatch) {
        self.by_name.clear();
        self.unless_by_name.clear();
        self.history_triggers = 0;
        let mut wanted = std::collections::HashSet::new();
        for t in self.triggers.values().filter(|t| !t.paused) {
            if let Some(u) = &t.unless {
                // Absence checks read the user's recent events too (the group overlay).
                self.history_triggers += 1;
                self.unless_by_name
                    .entry(u.event_name.clone())
                    .or_default()
                    .push(t.clone());
            }
            if let Some(c) = &t.condition {
                if has_history(c) {
                    self.history_triggers += 1;
                }
                all_history_names(c, &mut wanted);
            }
            self.by_name
                .entry(t.event_name.clone())
                .or_default()
                .push(t.clone());
        }
        self.maintained.retain(|name, _| wanted.contains(name));
        for name in wanted {
            if !self.maintained.contains_key(&name) {
                let epoch = self.epochs.get(&name).copied().unwrap_or(0) + 1;
                self.epochs.insert(name.clone(), epoch);
                batch.put_epoch(&name, epoch);
                self.maintained.insert(name, epoch);
            }
        }
    }

    /// The running aggregate of (user, name) in the current epoch, including everything stored
    /// (and this group's events), rebuilt from the events when missing or stale.
    /// The flag tells whether it was rebuilt (and so should be written back).
    fn aggregate(
        &self,
        user: &str,
        name: &str,
        epoch: u64,
        group: &Group,
    ) -> Result<(UserNameAggregate, bool), Error> {
        let key = (user.to_string(), name.to_string());
        let known = match group.aggregates.get(&key) {
            Some(a) => Some(a.clone()),
            None => self.store.user_aggregate(user, name)?,
        };
        if let Some(agg) = known.filter(|a| a.epoch == epoch) {
            return Ok((agg, false));
        }
        let mut agg = UserNameAggregate {
            epoch,
            ..Default::default()
        };
        for e in self.store.named_events(user, name) {
            agg.add(&e?);
        }
        for e in group.recent.get(&key).into_iter().flatten() {
            agg.add(e);
        }
        Ok((agg, true))
    }

    /// Stores a trigger (created or changed). A change cancels its pending timers (SPEC §3)
    /// without touching them: they carry the `updated_at` they were armed under, and a timer of
    /// another generation is dropped when it falls due (so a change costs nothing per timer,
    /// even with a million pending).
    fn put_trigger(&mut self, trigger: Trigger, group: &mut Group) -> Result<(), Error> {
        group.batch.put_trigger(&trigger);
        self.templates.set(&trigger.id, &trigger.action.payload_template);
        self.triggers.insert(trigger.id.clone(), Arc::new(trigger));
        group.triggers_changed = true;
        self.reindex(&mut group.batch);
        Ok(())
    }

    fn consumer(&self, name: &str, group: &Group) -> Result<Option<u64>, Error> {
        if let Some(pos) = group.consumers.get(name) {
            return Ok(Some(*pos));
        }
        Ok(self.store.consumer(name)?)
    }

    /// The definition of `name` as this group sees it (its own new definitions first).
    fn definition(&self, name: &str, group: &Group) -> Option<AttributeDefinition> {
        if let Some(def) = group.new_attributes.iter().find(|d| d.name == name) {
            return Some(def.clone());
        }
        self.shared.attributes.read().ok()?.get(name).cloned()
    }

    /// The type of `name` as this group sees it, without copying the definition (hot path).
    fn attribute_type(&self, name: &str, group: &Group) -> Option<AttributeType> {
        if let Some(def) = group.new_attributes.iter().find(|d| d.name == name) {
            return Some(def.attribute_type);
        }
        Some(self.shared.attributes.read().ok()?.get(name)?.attribute_type)
    }

    fn define(
        &mut self,
        name: String,
        attribute_type: AttributeType,
        description: String,
        group: &mut Group,
    ) -> Defined {
        if let Some(existing) = self.definition(&name, group) {
            if existing.attribute_type == attribute_type {
                return Ok(existing);
            }
            return Err(Error::FailedPrecondition(format!(
                "type: attribute {name:?} is already defined as {}, cannot redefine it as {attribute_type}",
                existing.attribute_type
            )));
        }
        let def = AttributeDefinition {
            name,
            attribute_type,
            description,
            auto_created: false,
            created_at: Timestamp::now(),
        };
        group.batch.put_attribute(&def);
        group.new_attributes.push(def.clone());
        Ok(def)
    }

    fn track_one(&mut self, event: PreparedEvent, group: &mut Group) -> Result<Tracked, Error> {
        if let Some(id) = &event.event_id {
            let known = match group.event_ids.get(id) {
                Some(seq) => Some(*seq),
                None => self.store.sequence_of_event_id(id)?,
            };
            if let Some(sequence) = known {
                return Ok(Tracked {
                    event_id: id.clone(),
                    sequence,
                    duplicate: true,
                    actions_fired: 0,
                });
            }
        }
        // Type every attribute before writing anything: a rejected event leaves nothing behind.
        let now = Timestamp::now();
        let mut attributes = BTreeMap::new();
        let mut created = Vec::new();
        for (name, value) in event.attributes {
            let (ty, auto) = match self.attribute_type(&name, group) {
                Some(ty) => (ty, false),
                None => (schema::type_for_undefined(&value), true),
            };
            let typed = schema::coerce(ty, &value).map_err(|e| {
                invalid(format!(
                    "attributes[{name:?}]: attribute {name:?} is {}, cannot coerce {}",
                    e.expected, e.shown
                ))
            })?;
            self.check_stored_size(&name, &typed)?;
            if auto {
                created.push(AttributeDefinition {
                    name: name.clone(),
                    attribute_type: ty,
                    description: String::new(),
                    auto_created: true,
                    created_at: now,
                });
            }
            attributes.insert(name, typed);
        }
        let event_id = match &event.event_id {
            Some(id) => id.clone(),
            None => self.generate_id(),
        };
        let stored = Event {
            event_id,
            user_id: event.user_id,
            name: event.name,
            occurred_at: event.occurred_at.unwrap_or(now),
            received_at: now,
            sequence: self.last_seq + 1,
            attributes,
        };
        // Reads that may fail come before any change to the group.
        let aggregate = match self.maintained.get(&stored.name) {
            Some(epoch) => {
                let (mut agg, _) = self.aggregate(&stored.user_id, &stored.name, *epoch, group)?;
                agg.add(&stored);
                Some(agg)
            }
            None => None,
        };
        let firing = self.matching_triggers(&stored, aggregate.as_ref(), group)?;
        let cancels = self.cancellations(&stored, group)?;
        let plan = self.plan_timers(&stored, firing, group)?;
        if !cancels.is_empty() || !plan.removals.is_empty() || !plan.arms.is_empty() {
            group
                .timers
                .load(&self.store, timers::bucket_of(&stored.user_id))?;
        }

        self.last_seq += 1;
        if let Some(id) = event.event_id {
            group.batch.put_event_id(&id, stored.sequence);
            group.event_ids.insert(id, stored.sequence);
        }
        for def in created {
            group.batch.put_attribute(&def);
            group.new_attributes.push(def);
        }
        group.batch.put_event(&stored);
        group.columns.add(&stored);
        self.count_name(&stored, group);
        // (user, name) keys are built only when something is kept per pair: most events of a
        // batch need neither.
        if let Some(agg) = aggregate {
            group
                .aggregates
                .insert((stored.user_id.clone(), stored.name.clone()), agg);
        }
        if self.history_triggers > 0 {
            group
                .recent
                .entry((stored.user_id.clone(), stored.name.clone()))
                .or_default()
                .push(stored.clone());
        }
        for (trigger_id, _) in cancels {
            group.timers.remove(&trigger_id, &stored.user_id);
        }
        for (trigger_id, _) in plan.removals {
            group.timers.remove(&trigger_id, &stored.user_id);
        }
        let mut actions_fired = 0;
        for (firing, event) in plan.overdue {
            // Fired by the timer, not by this call: not counted in actions_fired.
            self.fire(&event, vec![firing], group, now);
        }
        for arm in plan.arms {
            group.timers.arm(Timer {
                trigger_id: arm.trigger_id,
                due: arm.due,
                generation: arm.generation,
                event: stored.clone(),
            });
            self.clock.armed(arm.due);
        }
        actions_fired += self.fire(&stored, plan.now_firing, group, now);
        Ok(Tracked {
            event_id: stored.event_id,
            sequence: stored.sequence,
            duplicate: false,
            actions_fired,
        })
    }

    /// The triggers on `event`'s name whose condition holds and whose once/cooldown allow a
    /// firing now, with their firing state (`None` when the trigger has neither limit, so
    /// nothing needs tracking).
    fn matching_triggers(
        &self,
        event: &Event,
        aggregate: Option<&UserNameAggregate>,
        group: &mut Group,
    ) -> Result<Vec<Firing>, Error> {
        let Some(candidates) = self.by_name.get(&event.name) else {
            return Ok(Vec::new());
        };
        // Actions fire when the event is received (the time `fire` stamps them with).
        let now = event.received_at;
        let mut out = Vec::new();
        for trigger in candidates {
            if let Some(cond) = &trigger.condition {
                let mut failure = None;
                let holds = condition::eval(cond, event, &mut |h| match self
                    .history_holds(h, event, aggregate, group)
                {
                    Ok(b) => b,
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                });
                if let Some(e) = failure {
                    return Err(e);
                }
                if !holds {
                    continue;
                }
            }
            // A timed trigger's limits count firings, checked when its timer fires.
            if trigger.timer_nanos().is_some() {
                out.push((trigger.clone(), None));
                continue;
            }
            if let Some(state) = self.limit_allows(trigger, &event.user_id, now, group)? {
                out.push((trigger.clone(), state));
            }
        }
        Ok(out)
    }

    /// Whether `once_per_user` and `cooldown` let `trigger` fire for `user` at `now`: `None` when
    /// they do not; otherwise the firing state to update (`Some(None)`: the trigger has neither
    /// limit, nothing to track).
    fn limit_allows(
        &self,
        trigger: &Trigger,
        user: &str,
        now: Timestamp,
        group: &Group,
    ) -> Result<Option<Option<FiringState>>, Error> {
        if !trigger.once_per_user && trigger.cooldown_nanos.is_none() {
            return Ok(Some(None));
        }
        let state = match group.firing.get(&(trigger.id.clone(), user.to_string())) {
            Some(s) => s.clone(),
            None => self.store.firing_state(&trigger.id, user)?.unwrap_or_default(),
        };
        if trigger.once_per_user && state.firings > 0 {
            return Ok(None);
        }
        if let (Some(cooldown), Some(last)) = (trigger.cooldown_nanos, state.last_fired_at) {
            if now.as_nanos() < last.as_nanos() + cooldown {
                return Ok(None);
            }
        }
        Ok(Some(Some(state)))
    }

    /// The pending timer of (trigger, user), whatever its generation.
    fn pending_timer(
        &self,
        trigger_id: &str,
        user: &str,
        group: &Group,
    ) -> Result<Option<PendingTimer>, Error> {
        Ok(group
            .timers
            .get(&self.store, trigger_id, user)?
            .map(|t| PendingTimer {
                due: t.due,
                armed_at: t.event.occurred_at,
                generation: t.generation,
            }))
    }

    /// The pending timer of (trigger, user) if armed by the trigger as it is now (a change of
    /// the trigger cancels the timers armed before it).
    fn live_timer(
        &self,
        trigger: &Trigger,
        user: &str,
        group: &Group,
    ) -> Result<Option<PendingTimer>, Error> {
        Ok(self
            .pending_timer(&trigger.id, user, group)?
            .filter(|p| p.generation == trigger.updated_at))
    }

    /// True when `event` is one `unless` waits for: its name, dated inside
    /// (armed_at, armed_at + within], matching the condition.
    fn breaks_absence(u: &AbsenceCheck, armed_at: Timestamp, event: &Event) -> bool {
        let until = armed_at.as_nanos() + u.within_nanos;
        event.name == u.event_name
            && event.occurred_at > armed_at
            && event.occurred_at.as_nanos() <= until
            && u.condition
                .as_ref()
                .is_none_or(|c| condition::eval(c, event, &mut |_| false))
    }

    /// True when the user already has an event that breaks the absence armed at `armed_at`
    /// (stored, or earlier in this group): the timer is settled at once, without firing.
    fn absence_already_broken(
        &self,
        u: &AbsenceCheck,
        user: &str,
        armed_at: Timestamp,
        group: &Group,
    ) -> Result<bool, Error> {
        let lower = std::ops::Bound::Excluded((armed_at, u64::MAX));
        let upper = std::ops::Bound::Unbounded;
        for event in self
            .store
            .timeline(user, Some(&u.event_name), lower, upper, false)?
        {
            let event = event?;
            if event.occurred_at.as_nanos() > armed_at.as_nanos() + u.within_nanos {
                break;
            }
            if Self::breaks_absence(u, armed_at, &event) {
                return Ok(true);
            }
        }
        let recent = group.recent.get(&(user.to_string(), u.event_name.clone()));
        Ok(recent.is_some_and(|events| events.iter().any(|e| Self::breaks_absence(u, armed_at, e))))
    }

    /// The pending timers `event` cancels: those of its user whose absence check waits for it.
    fn cancellations(&self, event: &Event, group: &Group) -> Result<Vec<(String, Timestamp)>, Error> {
        let Some(triggers) = self.unless_by_name.get(&event.name) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for t in triggers {
            let Some(u) = &t.unless else { continue };
            if let Some(p) = self.live_timer(t, &event.user_id, group)? {
                if Self::breaks_absence(u, p.armed_at, event) {
                    out.push((t.id.clone(), p.due));
                }
            }
        }
        Ok(out)
    }

    /// Splits the matching triggers into those that fire now and timers to arm. A timed trigger
    /// whose moment has already passed is settled at once: it fires now (limits permitting)
    /// unless its absence is already broken; one whose absence is already broken never arms.
    fn plan_timers(&self, event: &Event, firing: Vec<Firing>, group: &Group) -> Result<Plan, Error> {
        let mut plan = Plan::default();
        let now = event.received_at;
        for (trigger, state) in firing {
            let Some(after) = trigger.timer_nanos() else {
                plan.now_firing.push((trigger, state));
                continue;
            };
            let user = &event.user_id;
            let due = Timestamp::from_nanos(event.occurred_at.as_nanos() + after);
            let pending = self.pending_timer(&trigger.id, user, group)?;
            let live = pending.filter(|p| p.generation == trigger.updated_at);
            if let Some(p) = live {
                if p.armed_at >= event.occurred_at {
                    // One timer per (trigger, user), from the latest event: an event dated no
                    // later than the pending timer's leaves it alone. Only one whose own window
                    // closed before the pending timer's event, and is due now, is settled (it
                    // fires unless its absence was broken).
                    let settles = due <= p.armed_at && due <= now;
                    let broken = match &trigger.unless {
                        Some(u) if settles => {
                            self.absence_already_broken(u, user, event.occurred_at, group)?
                        }
                        _ => false,
                    };
                    if settles && !broken {
                        if let Some(state) = self.limit_allows(&trigger, user, now, group)? {
                            plan.now_firing.push((trigger, state));
                        }
                    }
                    continue;
                }
                if p.due <= now {
                    // Due but not fired yet (the fire job is behind): it fires now, before the
                    // newer event replaces it.
                    if let Some(timer) = group.timers.get(&self.store, &trigger.id, user)? {
                        if let Some(state) = self.limit_allows(&trigger, user, now, group)? {
                            plan.overdue.push(((trigger.clone(), state), timer.event));
                        }
                    }
                    plan.removals.push((trigger.id.clone(), p.due));
                }
            }
            if let Some(u) = &trigger.unless {
                if self.absence_already_broken(u, user, event.occurred_at, group)? {
                    continue;
                }
            }
            if due <= now {
                if let Some(state) = self.limit_allows(&trigger, user, now, group)? {
                    plan.now_firing.push((trigger, state));
                }
                continue;
            }
            plan.arms.push(Arm {
                trigger_id: trigger.id.clone(),
                generation: trigger.updated_at,
                due,
            });
        }
        Ok(plan)
    }

    /// Fires every timer due now (up to 1000 per call; the clock calls again at once for more)
    /// and tells the clock when the next one is due. Runs alone in its write group.
    fn fire_due_timers(&mut self, group: &mut Group) -> Result<(), Error> {
        const MAX: usize = 1000;
        let now = Timestamp::now();
        let this_minute = timers::minute_of(now);
        let mut fired = 0;
        let mut taken = 0;
        let mut next: Option<Timestamp> = None;
        let earliest = |a: Option<Timestamp>, b: Timestamp| Some(a.map_or(b, |a| a.min(b)));
        'sets: for (minute, part, buckets) in self.store.due_sets(this_minute)? {
            for bucket in &buckets {
                if taken >= MAX {
                    // More next time, at once.
                    next = Some(now);
                    break 'sets;
                }
                group.timers.load(&self.store, *bucket)?;
                for timer in group.timers.take_due(*bucket, now) {
                    taken += 1;
                    // Deleted, paused or changed since it was armed: cancelled.
                    let Some(trigger) = self.triggers.get(&timer.trigger_id).cloned() else {
                        continue;
                    };
                    if trigger.paused || trigger.updated_at != timer.generation {
                        continue;
                    }
                    let user = timer.event.user_id.clone();
                    if let Some(state) = self.limit_allows(&trigger, &user, now, group)? {
                        fired += self.fire(&timer.event, vec![(trigger, state)], group, now);
                    }
                }
                if minute == this_minute {
                    if let Some(due) = group.timers.earliest_in(*bucket, minute) {
                        next = earliest(next, due);
                    }
                }
            }
            // Every timer due in a past minute has been taken: its set is done.
            if minute < this_minute {
                group.timers.retire(minute, part);
            }
        }
        if let Some(m) = self.store.next_due_minute(Some(this_minute))? {
            next = earliest(next, Timestamp::from_nanos(m as i128 * 60_000_000_000));
        }
        if taken > 0 {
            tracing::debug!(taken, fired, "timers fired");
        }
        self.clock.set_next(next);
        Ok(())
    }

    /// Evaluates a history condition for `event`'s user with the window ending at its
    /// `occurred_at`, the event itself included (see the module documentation for the cost).
    fn history_holds(
        &self,
        h: &HistoryCondition,
        event: &Event,
        current: Option<&UserNameAggregate>,
        group: &mut Group,
    ) -> Result<bool, Error> {
        let user = &event.user_id;
        let reference = event.occurred_at;
        let same_name = h.event_name == event.name;
        let epoch = self.maintained.get(&h.event_name);
        if let (None, None, Some(epoch)) = (h.within_nanos, &h.filter, epoch) {
            let agg = match (same_name, current) {
                (true, Some(agg)) => agg.clone(),
                _ => {
                    let (agg, rebuilt) = self.aggregate(user, &h.event_name, *epoch, group)?;
                    if rebuilt {
                        // Written back with the group: the next evaluation reads it.
                        group
                            .aggregates
                            .insert((user.clone(), h.event_name.clone()), agg.clone());
                    }
                    agg
                }
            };
            // It answers "all history up to the reference" unless a later event is in it.
            if agg.last_occurred_at.is_none_or(|t| t <= reference) {
                return Ok(h.holds(&Accumulator::from_aggregate(&agg, &h.attribute)));
            }
        }
        let after = h
            .within_nanos
            .map(|w| Timestamp::from_nanos(reference.as_nanos() - w));
        let in_window = |t: Timestamp| t <= reference && after.is_none_or(|a| t > a);
        let needs_event = h.filter.is_some() || h.aggregate != condition::Aggregate::Count;
        let mut acc = Accumulator::default();
        let add = |e: &Event, acc: &mut Accumulator| {
            let pass = h
                .filter
                .as_ref()
                .is_none_or(|f| condition::eval(f, e, &mut |_| false));
            if pass {
                acc.add(e, &h.attribute);
            }
        };
        for pos in self.store.named_positions(user, &h.event_name, after, reference) {
            let pos = pos?;
            if needs_event {
                if let Some(e) = self.store.event_at(user, &h.event_name, pos)? {
                    add(&e, &mut acc);
                }
            } else {
                acc.count += 1;
            }
        }
        if let Some(recent) = group.recent.get(&(user.clone(), h.event_name.clone())) {
            for e in recent.iter().filter(|e| in_window(e.occurred_at)) {
                add(e, &mut acc);
            }
        }
        if same_name && in_window(event.occurred_at) {
            add(event, &mut acc);
        }
        Ok(h.holds(&acc))
    }

    /// Erases `user` (run alone in its group, so nothing of the user is in flight).
    fn erase(&mut self, user: &str, group: &mut Group) -> Result<u64, Error> {
        let mut erased = 0u64;
        let mut names: HashMap<String, u64> = HashMap::new();
        let mut keys = Vec::new();
        let mut hours = std::collections::BTreeSet::new();
        for item in self.store.user_events(user) {
            let (key, event) = item?;
            keys.push(key);
            hours.insert((
                event.name.clone(),
                columns::bucket_of(event.occurred_at, columns::Level::Hour),
            ));
            if self.store.sequence_of_event_id(&event.event_id)? == Some(event.sequence) {
                group.batch.remove_event_id(&event.event_id);
            }
            *names.entry(event.name).or_default() += 1;
            erased += 1;
        }
        group.batch.remove_keys(keys);
        self.columns.erase(&self.store, &mut group.batch, user, &hours)?;
        let user_names: std::collections::BTreeSet<String> =
            hours.iter().map(|(name, _)| name.clone()).collect();
        self.columns
            .erase_from_rollups(&self.store, &mut group.batch, user, &user_names)?;
        for (name, count) in names {
            group.batch.remove_user_aggregate(user, &name);
            let known = self
                .shared
                .event_names
                .read()
                .ok()
                .and_then(|m| m.get(&name).cloned());
            if let Some(mut stats) = known {
                stats.count = stats.count.saturating_sub(count);
                group.name_stats.insert(name, stats);
            }
        }
        for trigger_id in self.triggers.keys() {
            group.batch.remove_firing_state(trigger_id, user);
        }
        // Every pending timer of the user, whatever the trigger (deleted ones included).
        group.timers.load(&self.store, timers::bucket_of(user))?;
        group.timers.remove_user(user);
        for item in self.store.user_actions(user) {
            let (index_key, mut action) = item?;
            action.user_id.clear();
            action.payload.clear();
            action.event = None;
            group.batch.put_action_record(&action);
            group.batch.remove_keys(vec![index_key]);
        }
        tracing::info!(events = erased, "user erased");
        Ok(erased)
    }

    /// Writes the actions of `firing` for `event` into the group; answers how many.
    fn fire(&mut self, event: &Event, firing: Vec<Firing>, group: &mut Group, now: Timestamp) -> u32 {
        let mut fired = 0;
        for (trigger, state) in firing {
            self.last_action_seq += 1;
            let action = FiredAction {
                sequence: self.last_action_seq,
                action_id: self.generate_id(),
                trigger_id: trigger.id.clone(),
                trigger_name: trigger.name.clone(),
                action_type: trigger.action.action_type.clone(),
                user_id: event.user_id.clone(),
                event_id: event.event_id.clone(),
                fired_at: now,
                payload: self.templates.render(&trigger.id, &trigger.name, event),
                event: Some(event.clone()),
            };
            group.batch.put_action(&action);
            if let Some(mut state) = state {
                state.firings += 1;
                state.last_fired_at = Some(now);
                group
                    .firing
                    .insert((trigger.id.clone(), event.user_id.clone()), state);
            }
            fired += 1;
        }
        fired
    }

    fn check_stored_size(&self, name: &str, value: &Value) -> Result<(), Error> {
        let (len, limit, limit_name) = match value {
            Value::String(s) => (
                s.len(),
                self.limits.max_string_value_bytes,
                "max_string_value_bytes",
            ),
            Value::Json(s) => (s.len(), self.limits.max_json_value_bytes, "max_json_value_bytes"),
            _ => return Ok(()),
        };
        if len > limit {
            return Err(invalid(format!(
                "attributes[{name:?}]: value is {len} bytes, limit is {limit} ({limit_name})"
            )));
        }
        Ok(())
    }

    fn count_name(&self, event: &Event, group: &mut Group) {
        if let Some(stats) = group.name_stats.get_mut(&event.name) {
            stats.record(event.occurred_at);
            return;
        }
        let known = self
            .shared
            .event_names
            .read()
            .ok()
            .and_then(|m| m.get(&event.name).cloned());
        let stats = match known {
            Some(mut s) => {
                s.record(event.occurred_at);
                s
            }
            None => EventNameStats::first(event.occurred_at),
        };
        group.name_stats.insert(event.name.clone(), stats);
    }

    /// Builds the by-name index from the stored events when the data directory predates it
    /// (once; in batches of 10 000 events, then marked built).
    fn backfill_columns(&mut self) -> Result<(), Error> {
        if self.store.columns_built()? {
            return Ok(());
        }
        self.store.clear_columns()?;
        let mut events = 0u64;
        let mut writes = ColumnWrites::default();
        let mut pending = 0;
        let store = self.store.clone();
        for event in store.all_events() {
            writes.add(&event?);
            pending += 1;
            events += 1;
            if pending == 10_000 {
                let mut batch = WriteBatch::default();
                self.columns
                    .write(&self.store, &mut batch, std::mem::take(&mut writes))?;
                self.store.apply(batch)?;
                pending = 0;
            }
        }
        let mut batch = WriteBatch::default();
        self.columns.write(&self.store, &mut batch, writes)?;
        batch.put_columns_built();
        self.store.apply(batch)?;
        self.store.flush()?;
        if events > 0 {
            tracing::info!(events, "built the by-name index of existing events");
        }
        Ok(())
    }

    /// A ULID: sorts by time, monotonic within a millisecond.
    fn generate_id(&mut self) -> String {
        match self.ulids.generate() {
            Ok(id) => id.to_string(),
            // The generator overflows only after 2^80 ids in one millisecond: fall back to a
            // fresh one, which still sorts by time.
            Err(_) => ulid::Ulid::new().to_string(),
        }
    }
}

/// Flushes once per drained set of applied groups, answers them all, then publishes the highest
/// durable action sequence (subscribers deliver nothing above it).
fn run_committer(
    store: Store,
    rx: std_mpsc::Receiver<(Vec<Reply>, u64)>,
    failed: Arc<AtomicBool>,
    durable: watch::Sender<u64>,
) {
    while let Ok((first, mut last_action)) = rx.recv() {
        let mut replies = first;
        while let Ok((more, seq)) = rx.try_recv() {
            replies.extend(more);
            last_action = last_action.max(seq);
        }
        let fault = match store.flush() {
            Ok(_) => None,
            Err(e) => {
                tracing::error!(error = %e, "flush failed; refusing further writes");
                failed.store(true, Ordering::Release);
                Some(unavailable())
            }
        };
        // Publish before answering: a client that read sequence N from an answer can subscribe
        // from N at once.
        if fault.is_none() {
            durable.send_if_modified(|v| {
                let moved = *v < last_action;
                *v = (*v).max(last_action);
                moved
            });
        }
        for r in replies {
            r(fault.as_ref());
        }
    }
    if let Err(e) = store.flush() {
        tracing::error!(error = %e, "final flush failed");
    }
}
