//! Group commit: one `flush()` for every applied group waiting, then the answers.
//!
//! A round (flush, count, publish, answer) runs on whichever thread holds the commit lock: the
//! writer runs it itself for the group it just applied when no job is waiting and the committer
//! thread is idle (one thread hand-off less per write at low load), and hands the group to the
//! committer thread otherwise, so under load applying the next group overlaps the flush. A flush covers
//! every write applied before it started, so a round may answer for groups still queued for
//! the other thread; those get a second, cheap flush, and every durable position only moves up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::unavailable;
use super::writer::Applied;
use crate::store::{Acknowledged, Store};

/// The state of group commit, shared by the writer and the committer thread; whoever holds
/// the lock runs a round.
///
/// The high-water mark (`store::integrity`) is written by a thread of its own while sled
/// flushes, so its fsync adds no latency: during a round it records what the rounds before made
/// durable, at most every [`MARK_EVERY`] while writes keep coming (one extra fsync per round
/// cost unary ingest 10-15%), and the latest once no write came for [`MARK_EVERY`]. So the mark
/// is never ahead of what is durable, and lags by about [`MARK_EVERY`] at most.
pub(super) struct Commit {
    store: Store,
    failed: Arc<AtomicBool>,
    durable: watch::Sender<u64>,
    marker: Option<Marker>,
    /// What is durable; the mark itself skips a write that would change nothing.
    flushed: Acknowledged,
    last_mark: Instant,
}

pub(super) type SharedCommit = Arc<Mutex<Commit>>;

impl Commit {
    pub(super) fn new(store: Store, failed: Arc<AtomicBool>, durable: watch::Sender<u64>) -> SharedCommit {
        let marker = Some(Marker::start(store.clone()));
        Arc::new(Mutex::new(Self {
            store,
            failed,
            durable,
            marker,
            flushed: Acknowledged::default(),
            last_mark: Instant::now(),
        }))
    }

    /// Flushes once for `groups`, then publishes and answers them.
    pub(super) fn round(&mut self, groups: Vec<Applied>) {
        let mut replies = Vec::new();
        let mut counts = Vec::with_capacity(groups.len());
        let mut now = self.flushed;
        for group in groups {
            crate::telemetry::write_stage("handoff", group.applied_at);
            replies.extend(group.replies);
            counts.push(group.counts);
            now.event_seq = now.event_seq.max(group.last_event_seq);
            now.action_seq = now.action_seq.max(group.last_action_seq);
        }
        // The previous rounds' mark, written while this round flushes.
        let marking = match &self.marker {
            Some(marker) if self.last_mark.elapsed() >= MARK_EVERY => {
                self.last_mark = Instant::now();
                Some(marker.record(self.flushed))
            }
            _ => None,
        };
        let flush_started = Instant::now();
        let fault = self.store.flush().err().map(|e| e.to_string());
        metrics::histogram!(crate::telemetry::FLUSH_DURATION).record(flush_started.elapsed().as_secs_f64());
        if let Some(marking) = marking {
            // The mark describes earlier rounds, already answered: a failure to record it
            // refuses the writes after this round, not this round's, whose flush succeeded.
            // (A stopped mark thread: recorded here instead.)
            let recorded = marking
                .recv()
                .unwrap_or_else(|_| self.store.record_durable(self.flushed));
            if let Err(e) = recorded {
                fail(&self.failed, &format!("recording the high-water mark: {e}"));
            }
        }
        let fault = fault.map(|e| {
            fail(&self.failed, &e);
            unavailable()
        });
        if fault.is_none() {
            self.flushed = now;
            // Counted once durable: a failed flush answers its events as unavailable instead.
            counts.into_iter().for_each(super::group::Counts::record);
            // Publish before answering: a client that read sequence N from an answer can
            // subscribe from N at once.
            self.durable.send_if_modified(|v| {
                let moved = *v < now.action_seq;
                *v = (*v).max(now.action_seq);
                moved
            });
        }
        for r in replies {
            r(fault.as_ref());
        }
    }

    /// Idle: brings the mark up to date (a mark already there costs no write: see
    /// `integrity::HighWater::record`).
    fn mark(&mut self) {
        if !self.failed.load(Ordering::Acquire) {
            if let Err(e) = self.store.record_durable(self.flushed) {
                fail(&self.failed, &format!("recording the high-water mark: {e}"));
            }
        }
    }

    /// The last flush and mark, at shutdown.
    fn finish(&mut self) {
        if let Some(marker) = self.marker.take() {
            marker.stop();
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        } else if let Err(e) = self.store.record_durable(self.flushed) {
            tracing::error!(error = %e, "recording the final high-water mark failed");
        }
    }
}

/// The committer thread: runs a round for every drained set of groups the writer handed over.
pub(super) fn run_committer(commit: SharedCommit, rx: std_mpsc::Receiver<Applied>) {
    loop {
        let first = match rx.recv_timeout(MARK_EVERY) {
            Ok(first) => first,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                // No handed-over group for a while: bring the mark up to date. The writer may
                // have committed rounds itself meanwhile, so this thread never parks for good.
                commit.lock().mark();
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut groups = vec![first];
        groups.extend(rx.try_iter());
        commit.lock().round(groups);
    }
    commit.lock().finish();
}

/// Under load, the high-water mark is brought up to date at most this often.
const MARK_EVERY: Duration = Duration::from_millis(20);

/// Marks the engine failed: no further write is accepted.
fn fail(failed: &AtomicBool, why: &str) {
    tracing::error!(error = %why, "flush failed; refusing further writes");
    failed.store(true, Ordering::Release);
}

/// The thread that writes the high-water mark beside the committer's flush.
struct Marker {
    tx: std_mpsc::Sender<(Acknowledged, std_mpsc::SyncSender<std::io::Result<()>>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Marker {
    fn start(store: Store) -> Self {
        let (tx, rx) = std_mpsc::channel::<(Acknowledged, std_mpsc::SyncSender<std::io::Result<()>>)>();
        let spawned = std::thread::Builder::new()
            .name("engage-hwm".into())
            .spawn(move || {
                for (now, done) in rx {
                    let _ = done.send(store.record_durable(now));
                }
            });
        let thread = match spawned {
            Ok(thread) => Some(thread),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the high-water mark thread");
                None
            }
        };
        Self { tx, thread }
    }

    /// Ends the thread and waits for it (it holds a handle to the store).
    fn stop(self) {
        drop(self.tx);
        if let Some(thread) = self.thread {
            let _ = thread.join();
        }
    }

    /// Asks for `now` to be recorded; the answer arrives on the receiver.
    fn record(&self, now: Acknowledged) -> std_mpsc::Receiver<std::io::Result<()>> {
        let (done, answer) = std_mpsc::sync_channel(1);
        // A stopped thread drops `done`: the receiver then reports it.
        let _ = self.tx.send((now, done));
        answer
    }
}
