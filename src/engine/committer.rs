//! The committer thread: one `flush()` for every applied group waiting, then the answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::unavailable;
use super::writer::Applied;
use crate::store::{Acknowledged, Store};

/// Flushes once per drained set of applied groups, answers them all, then publishes the highest
/// durable action sequence (subscribers deliver nothing above it).
///
/// The high-water mark (`store::integrity`) is written by a thread of its own while sled
/// flushes, so its fsync adds no latency: during a round it records what the rounds before made
/// durable, at most every [`MARK_EVERY`] while writes keep coming (one extra fsync per round
/// cost unary ingest 10-15%), and the latest once no write came for [`MARK_EVERY`]. So the mark
/// is never ahead of what is durable, and lags by about [`MARK_EVERY`] at most.
pub(super) fn run_committer(
    store: Store,
    rx: std_mpsc::Receiver<Applied>,
    failed: Arc<AtomicBool>,
    durable: watch::Sender<u64>,
) {
    let marker = Marker::start(store.clone());
    // What is durable; the mark itself skips a write that would change nothing.
    let mut flushed = Acknowledged::default();
    let mut last_mark = Instant::now();
    loop {
        let first = match rx.recv_timeout(MARK_EVERY) {
            Ok(first) => first,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                // Idle: bring the mark up to date before waiting.
                if !failed.load(Ordering::Acquire) {
                    if let Err(e) = store.record_durable(flushed) {
                        fail(&failed, &format!("recording the high-water mark: {e}"));
                    }
                }
                match rx.recv() {
                    Ok(first) => first,
                    Err(_) => break,
                }
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        crate::telemetry::write_stage("handoff", first.applied_at);
        let mut replies = first.replies;
        let mut counts = vec![first.counts];
        let mut now = Acknowledged {
            event_seq: first.last_event_seq,
            action_seq: first.last_action_seq,
        };
        while let Ok(more) = rx.try_recv() {
            crate::telemetry::write_stage("handoff", more.applied_at);
            replies.extend(more.replies);
            counts.push(more.counts);
            now.event_seq = now.event_seq.max(more.last_event_seq);
            now.action_seq = now.action_seq.max(more.last_action_seq);
        }
        // The previous round's mark, written while this round flushes.
        let marking = (last_mark.elapsed() >= MARK_EVERY).then(|| {
            last_mark = Instant::now();
            marker.record(flushed)
        });
        let flush_started = Instant::now();
        let fault = store.flush().err().map(|e| e.to_string());
        metrics::histogram!(crate::telemetry::FLUSH_DURATION).record(flush_started.elapsed().as_secs_f64());
        if let Some(marking) = marking {
            // The mark describes earlier rounds, already answered: a failure to record it
            // refuses the writes after this round, not this round's, whose flush succeeded.
            // (A stopped mark thread: recorded here instead.)
            let recorded = marking.recv().unwrap_or_else(|_| store.record_durable(flushed));
            if let Err(e) = recorded {
                fail(&failed, &format!("recording the high-water mark: {e}"));
            }
        }
        let fault = fault.map(|e| {
            fail(&failed, &e);
            unavailable()
        });
        if fault.is_none() {
            flushed = now;
            // Counted once durable: a failed flush answers its events as unavailable instead.
            counts.into_iter().for_each(super::group::Counts::record);
            // Publish before answering: a client that read sequence N from an answer can
            // subscribe from N at once.
            durable.send_if_modified(|v| {
                let moved = *v < now.action_seq;
                *v = (*v).max(now.action_seq);
                moved
            });
        }
        for r in replies {
            r(fault.as_ref());
        }
    }
    marker.stop();
    if let Err(e) = store.flush() {
        tracing::error!(error = %e, "final flush failed");
    } else if let Err(e) = store.record_durable(flushed) {
        tracing::error!(error = %e, "recording the final high-water mark failed");
    }
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
