//! The engine: the write path. It types, sequences and stores events with group commit,
//! evaluates triggers, keeps timers, erases users; every write of the service goes through it.
//!
//! One **writer thread** owns every piece of mutable engine state (the next sequences, the
//! schema, event-name statistics, the triggers) and publishes read views of it after each
//! group ([`Published`]). It drains all waiting commands, turns them into one atomic
//! [`WriteBatch`], applies it and commits it: one `flush()` for every applied group waiting, and
//! only then the answers, so many concurrent writers share one fsync and no caller hears OK
//! before its writes are durable. When no flush is running the writer commits the group itself
//! (one thread hand-off less); while one is, it hands the group to the **committer thread** and
//! goes on building and applying group N+1 while group N flushes.
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
//! ([`clock`]) sends a job that fires due timers, alone in its write group.
//!
//! Every stored event is also added to the by-name index of `store::columns` (FilterUsers and
//! GetEventStats read it): one compact record per event, and per write group one block per
//! (name, hour) and one bucket update per (name, hour) it touches.
//!
//! Stateless checks (`rules::prepare`) run on the caller's task, so they use every core.
//!
//! Rooms: [`handle`] (the [`Ingest`] handle: jobs and read views), [`writer`] (the thread, its
//! loop and the application of a group), [`group`] (one write group), [`track`] (events and
//! attributes), [`triggers`] (evaluation and firing), [`timers`] (timed triggers), [`clock`]
//! (the thread that wakes due timers), [`erase`] (DeleteUser), [`committer`] (the shared
//! flush), [`destinations`] (destinations and the delivery records), [`start`] (loading, migrations, the threads).

mod clock;
mod committer;
mod destinations;
mod erase;
mod group;
mod handle;
mod start;
mod timers;
mod track;
mod triggers;
mod writer;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::thread;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};

use crate::domain::destination::Destination;
use crate::domain::model::{AttributeDefinition, EventNameStats, Trigger};
use crate::domain::rules::Limits;
use crate::error::Error;
use clock::TimerClock;
pub(crate) use destinations::{Outcome, Position};
use group::Group;
use writer::{Job, Writer};

/// The views the writer publishes after each applied group, for the read RPCs. Only the writer
/// writes them, and it never reads them back (it owns its own copies).
#[derive(Default)]
struct Published {
    attributes: RwLock<BTreeMap<String, AttributeDefinition>>,
    event_names: RwLock<BTreeMap<String, EventNameStats>>,
    triggers: RwLock<BTreeMap<String, Arc<Trigger>>>,
    /// Timers pending once the last applied group is (what `engage_timers_pending` shows).
    pending_timers: AtomicU64,
    destinations: RwLock<BTreeMap<String, Arc<Destination>>>,
    /// Bumped after each applied change of the destinations (the delivery engine follows it).
    destinations_changed: watch::Sender<u64>,
}

/// The handle callers use; cheap to clone.
#[derive(Clone)]
pub(crate) struct Ingest {
    tx: mpsc::Sender<Job>,
    shared: Shared,
}

/// What every handle shares besides the job sender.
#[derive(Clone)]
struct Shared {
    published: Arc<Published>,
    failed: Arc<AtomicBool>,
    limits: Arc<Limits>,
    durable_actions: watch::Receiver<u64>,
    /// Names whose rollup refresh is queued or running (one at a time per name).
    refreshing: Arc<Mutex<HashSet<String>>>,
    /// Erasures completed since start (a cached query result from before one is not reused).
    erasures: Arc<AtomicU64>,
}

/// An [`Ingest`] that does not keep the writer alive (background tasks hold this).
#[derive(Clone)]
pub(crate) struct WeakIngest {
    tx: mpsc::WeakSender<writer::Job>,
    shared: Shared,
}

impl Ingest {
    pub(crate) fn downgrade(&self) -> WeakIngest {
        WeakIngest {
            tx: self.tx.downgrade(),
            shared: self.shared.clone(),
        }
    }
}

impl WeakIngest {
    /// The handle, while any other handle still exists.
    pub(crate) fn upgrade(&self) -> Option<Ingest> {
        Some(Ingest {
            tx: self.tx.upgrade()?,
            shared: self.shared.clone(),
        })
    }
}

/// Joins the engine's threads; dropping every [`Ingest`] handle lets them finish.
pub(crate) struct IngestThreads {
    writer: thread::JoinHandle<()>,
    committer: thread::JoinHandle<()>,
    clock: Arc<TimerClock>,
    clock_thread: thread::JoinHandle<()>,
}

impl IngestThreads {
    /// Waits until every accepted command is applied, flushed and answered.
    pub(crate) fn join(self) {
        self.clock.stop();
        let _ = self.clock_thread.join();
        let _ = self.writer.join();
        let _ = self.committer.join();
    }
}

/// The answer to every write once storage failed.
fn unavailable() -> Error {
    Error::Unavailable("storage failed; the server must be restarted".into())
}
