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
//! behind" (auto-created attributes included) simple: nothing else writes. The trigger engine
//! will add the actions an event fires to the same batch.
//!
//! Stateless checks ([`prepare`]) run on the caller's task, so they use every core.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, RwLock};
use std::thread;

use tokio::sync::{mpsc, oneshot};

use crate::error::{invalid, Error};
use crate::model::{AttributeDefinition, AttributeType, Event, EventNameStats, NewEvent, Timestamp, Value};
use crate::schema;
use crate::store::{Store, WriteBatch};

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

/// The outcome of DefineAttribute.
pub type Defined = Result<AttributeDefinition, Error>;

enum Command {
    Track {
        events: Vec<Result<PreparedEvent, Error>>,
        reply: oneshot::Sender<Vec<Result<Tracked, Error>>>,
    },
    Define {
        name: String,
        attribute_type: AttributeType,
        description: String,
        reply: oneshot::Sender<Defined>,
    },
}

enum Reply {
    Track(
        oneshot::Sender<Vec<Result<Tracked, Error>>>,
        Vec<Result<Tracked, Error>>,
    ),
    Define(oneshot::Sender<Defined>, Defined),
}

impl Reply {
    fn send(self, fault: Option<&Error>) {
        match self {
            Reply::Track(tx, results) => {
                let results = match fault {
                    Some(e) => results.into_iter().map(|_| Err(e.clone())).collect(),
                    None => results,
                };
                let _ = tx.send(results);
            }
            Reply::Define(tx, result) => {
                let _ = tx.send(match fault {
                    Some(e) => Err(e.clone()),
                    None => result,
                });
            }
        }
    }
}

/// Read views of the writer's state, for the schema RPCs.
#[derive(Default)]
pub struct SharedState {
    pub attributes: RwLock<BTreeMap<String, AttributeDefinition>>,
    pub event_names: RwLock<BTreeMap<String, EventNameStats>>,
}

/// The handle callers use; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Command>,
    shared: Arc<SharedState>,
    failed: Arc<AtomicBool>,
    limits: Arc<Limits>,
}

/// Joins the engine's threads; dropping every [`Ingest`] handle lets them finish.
pub struct IngestThreads {
    writer: thread::JoinHandle<()>,
    committer: thread::JoinHandle<()>,
}

impl IngestThreads {
    /// Waits until every accepted command is applied, flushed and answered.
    pub fn join(self) {
        let _ = self.writer.join();
        let _ = self.committer.join();
    }
}

/// Most events one group may hold before the writer applies it.
const MAX_GROUP_EVENTS: usize = 8192;

fn unavailable() -> Error {
    Error::Unavailable("storage failed; the server must be restarted".into())
}

impl Ingest {
    /// Loads the state from `store` and starts the writer and committer threads.
    pub fn start(store: Store, limits: Limits) -> Result<(Self, IngestThreads), Error> {
        let loaded = store.load_state()?;
        let shared = Arc::new(SharedState::default());
        {
            let mut attrs = shared
                .attributes
                .write()
                .map_err(|_| Error::Internal("lock".into()))?;
            for def in loaded.attributes {
                attrs.insert(def.name.clone(), def);
            }
            let mut names = shared
                .event_names
                .write()
                .map_err(|_| Error::Internal("lock".into()))?;
            names.extend(loaded.event_names);
        }
        let failed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(1024);
        let (commit_tx, commit_rx) = std_mpsc::sync_channel::<Vec<Reply>>(64);
        let writer = Writer {
            store: store.clone(),
            shared: shared.clone(),
            failed: failed.clone(),
            limits: limits.clone(),
            last_seq: loaded.last_event_seq,
            ulids: ulid::Generator::new(),
        };
        let writer = thread::Builder::new()
            .name("engage-writer".into())
            .spawn(move || writer.run(rx, commit_tx))
            .map_err(|e| Error::Internal(format!("spawn writer: {e}")))?;
        let committer_failed = failed.clone();
        let committer = thread::Builder::new()
            .name("engage-committer".into())
            .spawn(move || run_committer(store, commit_rx, committer_failed))
            .map_err(|e| Error::Internal(format!("spawn committer: {e}")))?;
        let ingest = Self {
            tx,
            shared,
            failed,
            limits: Arc::new(limits),
        };
        Ok((ingest, IngestThreads { writer, committer }))
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Tracks events: one result per input, in order. `events` hold the outcome of [`prepare`],
    /// so a batch keeps its positions when some items were already rejected.
    pub async fn track(
        &self,
        events: Vec<Result<PreparedEvent, Error>>,
    ) -> Result<Vec<Result<Tracked, Error>>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Track { events, reply }).await?;
        rx.await.map_err(|_| unavailable())
    }

    /// Defines an attribute (SPEC §2): same type again is a no-op, another type is
    /// FAILED_PRECONDITION.
    pub async fn define_attribute(
        &self,
        name: String,
        attribute_type: AttributeType,
        description: String,
    ) -> Defined {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Define {
            name,
            attribute_type,
            description,
            reply,
        })
        .await?;
        rx.await.map_err(|_| unavailable())?
    }

    async fn send(&self, cmd: Command) -> Result<(), Error> {
        if self.failed.load(Ordering::Acquire) {
            return Err(unavailable());
        }
        self.tx
            .send(cmd)
            .await
            .map_err(|_| Error::Unavailable("the server is shutting down".into()))
    }

    /// Every attribute definition, by name.
    pub fn attributes(&self) -> Vec<AttributeDefinition> {
        match self.shared.attributes.read() {
            Ok(map) => map.values().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        }
    }

    /// Every event name seen, by name.
    pub fn event_names(&self) -> Vec<(String, EventNameStats)> {
        let read =
            |m: &BTreeMap<String, EventNameStats>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        match self.shared.event_names.read() {
            Ok(map) => read(&map),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }
}

struct Writer {
    store: Store,
    shared: Arc<SharedState>,
    failed: Arc<AtomicBool>,
    limits: Limits,
    last_seq: u64,
    ulids: ulid::Generator,
}

/// The writes of one group, before they are applied.
struct Group {
    batch: WriteBatch,
    replies: Vec<Reply>,
    /// Client event ids stored by this group, for duplicates inside the group.
    event_ids: HashMap<String, u64>,
    new_attributes: Vec<AttributeDefinition>,
    name_stats: HashMap<String, EventNameStats>,
    events: usize,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>, commit: std_mpsc::SyncSender<Vec<Reply>>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = Group {
                batch: WriteBatch::default(),
                replies: Vec::new(),
                event_ids: HashMap::new(),
                new_attributes: Vec::new(),
                name_stats: HashMap::new(),
                events: 0,
            };
            let start_seq = self.last_seq;
            self.handle(first, &mut group);
            while group.events < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd, &mut group),
                    Err(_) => break,
                }
            }
            let fault = self.apply(group.batch, start_seq, &group.name_stats, &group.new_attributes);
            if let Some(fault) = fault {
                for r in group.replies {
                    r.send(Some(&fault));
                }
                continue;
            }
            if commit.send(group.replies).is_err() {
                break;
            }
        }
    }

    /// Applies a group's batch and publishes its state; on failure the engine stops accepting
    /// writes (the in-memory state may now be ahead of the disk).
    fn apply(
        &mut self,
        mut batch: WriteBatch,
        start_seq: u64,
        name_stats: &HashMap<String, EventNameStats>,
        new_attributes: &[AttributeDefinition],
    ) -> Option<Error> {
        if self.failed.load(Ordering::Acquire) {
            return Some(unavailable());
        }
        for (name, stats) in name_stats {
            batch.put_name_stats(name, stats);
        }
        if self.last_seq != start_seq {
            batch.put_last_event_seq(self.last_seq);
        }
        if let Err(e) = self.store.apply(batch) {
            tracing::error!(error = %e, "applying a write batch failed; refusing further writes");
            self.failed.store(true, Ordering::Release);
            return Some(unavailable());
        }
        if !name_stats.is_empty() {
            if let Ok(mut names) = self.shared.event_names.write() {
                for (name, stats) in name_stats {
                    names.insert(name.clone(), stats.clone());
                }
            }
        }
        if !new_attributes.is_empty() {
            if let Ok(mut attrs) = self.shared.attributes.write() {
                for def in new_attributes {
                    attrs.insert(def.name.clone(), def.clone());
                }
            }
        }
        None
    }

    fn handle(&mut self, cmd: Command, group: &mut Group) {
        match cmd {
            Command::Track { events, reply } => {
                let results = events
                    .into_iter()
                    .map(|e| e.and_then(|e| self.track_one(e, group)))
                    .collect();
                group.replies.push(Reply::Track(reply, results));
            }
            Command::Define {
                name,
                attribute_type,
                description,
                reply,
            } => {
                let result = self.define(name, attribute_type, description, group);
                group.replies.push(Reply::Define(reply, result));
            }
        }
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
        self.last_seq += 1;
        let sequence = self.last_seq;
        let event_id = match event.event_id {
            Some(id) => {
                group.batch.put_event_id(&id, sequence);
                group.event_ids.insert(id.clone(), sequence);
                id
            }
            None => self.generate_id(),
        };
        for def in created {
            group.batch.put_attribute(&def);
            group.new_attributes.push(def);
        }
        let stored = Event {
            event_id: event_id.clone(),
            user_id: event.user_id,
            name: event.name,
            occurred_at: event.occurred_at.unwrap_or(now),
            received_at: now,
            sequence,
            attributes,
        };
        group.batch.put_event(&stored);
        self.count_name(&stored, group);
        group.events += 1;
        Ok(Tracked {
            event_id,
            sequence,
            duplicate: false,
            actions_fired: 0,
        })
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

    /// A ULID: sorts by receive time, monotonic within a millisecond.
    fn generate_id(&mut self) -> String {
        match self.ulids.generate() {
            Ok(id) => id.to_string(),
            // The generator overflows only after 2^80 ids in one millisecond: fall back to a
            // fresh one, which still sorts by time.
            Err(_) => ulid::Ulid::new().to_string(),
        }
    }
}

/// Flushes once per drained set of applied groups, then answers them all.
fn run_committer(store: Store, rx: std_mpsc::Receiver<Vec<Reply>>, failed: Arc<AtomicBool>) {
    while let Ok(first) = rx.recv() {
        let mut replies = first;
        while let Ok(more) = rx.try_recv() {
            replies.extend(more);
        }
        let fault = match store.flush() {
            Ok(_) => None,
            Err(e) => {
                tracing::error!(error = %e, "flush failed; refusing further writes");
                failed.store(true, Ordering::Release);
                Some(unavailable())
            }
        };
        for r in replies {
            r.send(fault.as_ref());
        }
    }
    if let Err(e) = store.flush() {
        tracing::error!(error = %e, "final flush failed");
    }
}
