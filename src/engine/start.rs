//! Starting the engine: the state loaded from the store, migrations, the writer, committer and
//! timer clock threads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread;

use tokio::sync::{mpsc, watch};

use super::clock::TimerClock;
use super::committer::{run_committer, Commit};
use super::triggers::all_history_names;
use super::writer::{Applied, Job};
use super::{Group, Ingest, IngestThreads, Published, Writer};
use crate::domain::model::{Timestamp, Trigger};
use crate::domain::rules::Limits;
use crate::domain::template;
use crate::error::Error;
use crate::store::columns::Columns;
use crate::store::{Store, WriteBatch};

impl Ingest {
    /// Loads the state from `store`, migrates older layouts and starts the writer, committer
    /// and timer clock threads.
    pub(crate) fn start(store: Store, limits: Limits) -> Result<(Self, IngestThreads), Error> {
        let (writer, last_action_seq) = Writer::load(store.clone(), limits.clone())?;
        let published = writer.published.clone();
        let failed = writer.failed.clone();
        let clock = writer.clock.clone();
        let (tx, rx) = mpsc::channel(1024);
        let (commit_tx, commit_rx) = std_mpsc::sync_channel::<Applied>(64);
        let (durable_tx, durable_rx) = watch::channel(last_action_seq);
        let commit = Commit::new(store, failed.clone(), durable_tx);
        let writer_commit = commit.clone();
        let writer = thread::Builder::new()
            .name("engage-writer".into())
            .spawn(move || writer.run(rx, commit_tx, writer_commit))
            .map_err(|e| Error::Internal(format!("spawn writer: {e}")))?;
        let committer = thread::Builder::new()
            .name("engage-committer".into())
            .spawn(move || run_committer(commit, commit_rx))
            .map_err(|e| Error::Internal(format!("spawn committer: {e}")))?;
        let ingest = Self {
            tx,
            shared: super::Shared {
                published,
                failed,
                limits: Arc::new(limits),
                durable_actions: durable_rx,
                refreshing: Default::default(),
                erasures: Default::default(),
            },
        };
        let clock_thread = ingest.spawn_clock(clock.clone())?;
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

    /// Starts the thread that sends the writer a job firing the due timers whenever the earliest
    /// falls due. It holds only a weak sender: it never keeps the writer alive.
    fn spawn_clock(&self, clock: Arc<TimerClock>) -> Result<thread::JoinHandle<()>, Error> {
        let weak = self.tx.downgrade();
        thread::Builder::new()
            .name("engage-timers".into())
            .spawn(move || {
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
                        submitted: crate::telemetry::stamp(),
                    };
                    tx.blocking_send(job).is_ok()
                })
            })
            .map_err(|e| Error::Internal(format!("spawn timer clock: {e}")))
    }
}

impl Writer {
    /// The writer of the state stored in `store`, after migrating older layouts; with the last
    /// action sequence handed out (the committer's first durable position).
    fn load(store: Store, limits: Limits) -> Result<(Self, u64), Error> {
        let loaded = store.load_state()?;
        let attributes: BTreeMap<_, _> = loaded
            .attributes
            .into_iter()
            .map(|def| (def.name.clone(), def))
            .collect();
        let event_names: BTreeMap<_, _> = loaded.event_names.into_iter().collect();
        let triggers: BTreeMap<String, Arc<Trigger>> = loaded
            .triggers
            .into_iter()
            .map(|t| (t.id.clone(), Arc::new(t)))
            .collect();
        let destinations: BTreeMap<String, Arc<crate::domain::destination::Destination>> = store
            .destinations()?
            .into_iter()
            .map(|d| (d.id.clone(), Arc::new(d)))
            .collect();
        let published = Published::default();
        *published.destinations.write() = destinations.clone();
        *published.attributes.write() = attributes.clone();
        *published.event_names.write() = event_names.clone();
        *published.triggers.write() = triggers.clone();
        published
            .pending_timers
            .store(store.count_timers()?, std::sync::atomic::Ordering::Relaxed);
        let mut writer = Writer {
            store: store.clone(),
            published: Arc::new(published),
            failed: Arc::new(AtomicBool::new(false)),
            limits,
            last_seq: loaded.last_event_seq,
            last_action_seq: loaded.last_action_seq,
            ulids: ulid::Generator::new(),
            attributes,
            event_names,
            triggers,
            by_name: HashMap::new(),
            history_triggers: 0,
            maintained: HashMap::new(),
            epochs: loaded.epochs.into_iter().collect(),
            templates: template::Templates::default(),
            columns: Columns::default(),
            unless_by_name: HashMap::new(),
            clock: Arc::new(TimerClock::default()),
            destinations,
        };
        let migrated = store.migrate(&mut writer.columns)?;
        if migrated.dropped_timer_keys > 0 {
            tracing::warn!(
                keys = migrated.dropped_timer_keys,
                "dropped timer keys of a pre-release layout"
            );
        }
        if migrated.chunked_actions > 0 {
            tracing::info!(
                actions = migrated.chunked_actions,
                "rewrote the action log of the layout before chunks"
            );
        }
        if migrated.dropped_minute_buckets > 0 {
            tracing::info!(
                keys = migrated.dropped_minute_buckets,
                "removed the per-minute statistics buckets of an older layout"
            );
        }
        if let Some(events) = migrated.indexed_events.filter(|n| *n > 0) {
            tracing::info!(events, "built the by-name index of existing events");
        }
        // A timer that fell due while the server was down fires at once.
        writer.clock.set_next(
            store
                .next_due_minute(None)?
                .map(|m| Timestamp::from_nanos(m as i128 * 60_000_000_000)),
        );
        for t in writer.triggers.values() {
            writer.templates.set(&t.id, &t.action.payload_template);
        }
        // The triggers are the ones that were live when the server stopped, so every name they
        // maintain was maintained without a break: it keeps its stored epoch (no rebuild).
        for t in writer.triggers.values().filter(|t| !t.paused) {
            let mut names = HashSet::new();
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
        let last_action_seq = writer.last_action_seq;
        Ok((writer, last_action_seq))
    }
}
