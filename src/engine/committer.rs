//! The committer thread: one `flush()` for every applied group waiting, then the answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};

use tokio::sync::watch;

use super::unavailable;
use super::writer::Applied;
use crate::store::Store;

/// Flushes once per drained set of applied groups, answers them all, then publishes the highest
/// durable action sequence (subscribers deliver nothing above it).
pub(super) fn run_committer(
    store: Store,
    rx: std_mpsc::Receiver<Applied>,
    failed: Arc<AtomicBool>,
    durable: watch::Sender<u64>,
) {
    while let Ok(first) = rx.recv() {
        let mut replies = first.replies;
        let mut last_action = first.last_action_seq;
        while let Ok(more) = rx.try_recv() {
            replies.extend(more.replies);
            last_action = last_action.max(more.last_action_seq);
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
