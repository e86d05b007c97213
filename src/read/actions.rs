//! Delivery of fired actions: subscriptions that replay the durable log and then follow it,
//! named consumers, listing, and retention.
//!
//! A subscriber never holds anything the writer waits for. It reads the action log (sled,
//! keyed by sequence) from its own cursor up to the highest *durable* sequence, which the
//! committer publishes after each flush through a `watch` channel; when it has caught up it
//! waits for that number to move. So replay and live delivery are the same loop: there is no
//! seam where an action could be missed or sent twice, only durable actions are ever sent, and a
//! slow or stalled subscriber only falls behind in the log (its channel to the client is bounded)
//! without slowing ingest or growing memory.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::domain::model::{FiredAction, Timestamp};
use crate::engine::Ingest;
use crate::error::Error;
use crate::store::{ActionOwner, Store};

/// Where a subscription starts (the wire's `StartFrom`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StartFrom {
    Unspecified,
    Latest,
    Earliest,
    /// Deliver actions with a sequence above this one.
    After(u64),
}

/// Which actions a subscription delivers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    pub trigger_ids: HashSet<String>,
    pub action_types: HashSet<String>,
}

impl Filter {
    fn matches(&self, a: &FiredAction) -> bool {
        (self.trigger_ids.is_empty() || self.trigger_ids.contains(&a.trigger_id))
            && (self.action_types.is_empty() || self.action_types.contains(&a.action_type))
    }
}

/// Actions read from the log per step of a subscription.
const READ_CHUNK: usize = 256;
/// Actions buffered per subscriber between its reader task and the client.
const STREAM_BUFFER: usize = 64;

/// Settings of action delivery.
#[derive(Clone, Debug)]
pub struct DeliveryOptions {
    pub max_subscribers: usize,
    pub retention_secs: u64,
    /// Bytes of actions one subscriber may hold between the log and its client (read, and
    /// waiting to be sent): a reader whose client stops reading stops reading the log.
    pub buffer_bytes: usize,
    /// Bytes of actions all subscribers together may hold waiting to be sent.
    pub total_buffer_bytes: usize,
}

/// An action on its way to a subscriber, with the share of the buffer budgets it holds until
/// the client's stream takes it.
pub(crate) struct Delivered {
    pub(crate) action: FiredAction,
    _held: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Takes `bytes` of a subscriber's budget and of the total (`None`: a semaphore was closed).
async fn hold(
    mine: (Arc<Semaphore>, u32),
    total: (Arc<Semaphore>, u32),
) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    let mine = mine.0.acquire_many_owned(mine.1).await.ok()?;
    let total = total.0.acquire_many_owned(total.1).await.ok()?;
    Some((mine, total))
}

/// The action log as subscribers and listings see it.
#[derive(Clone)]
pub(crate) struct ActionLog {
    store: Store,
    ingest: Ingest,
    permits: Arc<Semaphore>,
    max_subscribers: usize,
    shutdown: watch::Receiver<bool>,
    retention_secs: u64,
    buffer_bytes: usize,
    /// What all subscribers together may hold waiting (in bytes), and its size.
    total_buffer: Arc<Semaphore>,
    total_buffer_bytes: usize,
}

impl ActionLog {
    /// `shutdown` turning true ends every open subscription.
    pub(crate) fn new(
        store: Store,
        ingest: Ingest,
        options: &DeliveryOptions,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            ingest,
            permits: Arc::new(Semaphore::new(options.max_subscribers)),
            max_subscribers: options.max_subscribers,
            shutdown,
            retention_secs: options.retention_secs,
            // One action's share never exceeds either budget, or it could never be sent.
            buffer_bytes: options
                .buffer_bytes
                .min(options.total_buffer_bytes)
                .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)),
            total_buffer: Arc::new(Semaphore::new(
                options
                    .total_buffer_bytes
                    .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)),
            )),
            total_buffer_bytes: options
                .total_buffer_bytes
                .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)),
        }
    }

    /// SubscribeActions streams open now.
    pub(crate) fn open_subscriptions(&self) -> usize {
        self.max_subscribers
            .saturating_sub(self.permits.available_permits())
    }

    /// The oldest sequence still kept (one past the last when the log is empty).
    pub(crate) fn earliest_available(&self) -> Result<u64, Error> {
        match self.store.first_action()? {
            Some(a) => Ok(a.sequence),
            None => Ok(*self.ingest.durable_actions().borrow() + 1),
        }
    }

    fn too_old(&self, first_wanted: u64) -> Result<Option<Error>, Error> {
        let earliest = self.earliest_available()?;
        Ok((first_wanted < earliest).then(|| {
            Error::OutOfRange(format!(
                "start: sequence {first_wanted} is no longer kept; the earliest available sequence is {earliest}"
            ))
        }))
    }

    /// Opens a subscription and answers the channel its actions arrive on, in strictly
    /// increasing sequence. A named consumer is created at this subscription's start point if
    /// new; its stored position moves only through [`Ingest::ack`].
    pub(crate) async fn subscribe(
        &self,
        consumer: Option<String>,
        start: StartFrom,
        filter: Filter,
    ) -> Result<mpsc::Receiver<Result<Delivered, Error>>, Error> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted("too many open subscriptions (max_subscribers); retry later".into())
        })?;
        let durable = *self.ingest.durable_actions().borrow();
        let explicit = match start {
            StartFrom::Unspecified => None,
            StartFrom::Latest => Some(durable),
            StartFrom::Earliest => Some(self.earliest_available()?.saturating_sub(1)),
            StartFrom::After(seq) => {
                if seq > durable {
                    return Err(Error::OutOfRange(format!(
                        "after_sequence: {seq} is past the last fired sequence {durable}"
                    )));
                }
                Some(seq)
            }
        };
        // Check an explicit start before a new consumer is created at it: a refused subscription
        // leaves nothing behind.
        let check = |cursor: u64| -> Result<(), Error> {
            match self.too_old(cursor + 1)? {
                Some(e) if cursor < durable => Err(e),
                _ => Ok(()),
            }
        };
        let cursor = match (consumer, explicit) {
            (None, None) => durable,
            (None, Some(c)) => {
                check(c)?;
                c
            }
            (Some(name), None) => {
                let c = self.ingest.ensure_consumer(name, durable).await?;
                check(c)?;
                c
            }
            (Some(name), Some(c)) => {
                check(c)?;
                self.ingest.ensure_consumer(name, c).await?;
                c
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let task = Subscription {
            budget: Arc::new(Semaphore::new(self.buffer_bytes)),
            log: self.clone(),
            durable: self.ingest.durable_actions(),
            shutdown: self.shutdown.clone(),
            filter,
            cursor,
            tx,
        };
        tokio::spawn(async move {
            let _permit = permit;
            task.run().await;
        });
        Ok(rx)
    }

    /// Up to `limit` durable actions newest first, with sequence below `before` (0: from the
    /// newest): all, a user's, a trigger's, or a user's of one trigger (read through the user's
    /// index, keeping the trigger's). Actions not yet durable are never listed. The flag says
    /// the list stopped early, at `max_bytes` (more follow).
    pub(crate) fn list(
        &self,
        user: Option<&str>,
        trigger: Option<&str>,
        before: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<FiredAction>, bool), Error> {
        let durable_end = self.ingest.durable_actions().borrow().saturating_add(1);
        let mut cursor = if before == 0 {
            durable_end
        } else {
            before.min(durable_end)
        };
        let owner = match (user, trigger) {
            (Some(u), _) => ActionOwner::User(u),
            (None, Some(t)) => ActionOwner::Trigger(t),
            (None, None) => ActionOwner::All,
        };
        let keep = |a: &FiredAction| user.is_none() || trigger.is_none_or(|t| a.trigger_id == t);
        let mut out = Vec::new();
        let mut bytes = 0;
        // Read in small chunks: actions can be megabytes each, and a page stops at `max_bytes`.
        let chunk_len = limit.clamp(1, 64);
        loop {
            let chunk = self.store.actions_newest_first(owner, cursor, chunk_len)?;
            let exhausted = chunk.len() < chunk_len;
            for a in chunk {
                cursor = a.sequence;
                if keep(&a) {
                    bytes += a.approx_size();
                    if bytes > max_bytes && !out.is_empty() {
                        return Ok((out, true));
                    }
                    out.push(a);
                    if out.len() == limit {
                        return Ok((out, false));
                    }
                }
            }
            if exhausted {
                return Ok((out, false));
            }
        }
    }

    /// Deletes the actions older than the retention period; answers how many. Runs through the
    /// writer, like every other write, so it never races an erasure rewriting an action.
    pub(crate) async fn expire(&self) -> Result<usize, Error> {
        let cutoff = Timestamp::now().plus_secs(-(self.retention_secs.min(i64::MAX as u64) as i64));
        let mut total = 0;
        loop {
            let n = self.ingest.expire_actions(cutoff, 1024).await?;
            total += n;
            if n < 1024 {
                return Ok(total);
            }
        }
    }
}

/// One subscriber's reader task.
struct Subscription {
    log: ActionLog,
    durable: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    filter: Filter,
    cursor: u64,
    tx: mpsc::Sender<Result<Delivered, Error>>,
    /// This subscriber's share of buffered bytes (`DeliveryOptions::buffer_bytes`).
    budget: Arc<Semaphore>,
}

impl Subscription {
    async fn run(mut self) {
        loop {
            let durable = *self.durable.borrow_and_update();
            while self.cursor < durable {
                let from = self.cursor + 1;
                // A bounded read of recent, cached entries: cheaper inline than a hop to a
                // blocking thread, which showed in the event-to-subscriber latency.
                let actions = match self
                    .log
                    .store
                    .actions(from, durable, READ_CHUNK, self.log.buffer_bytes)
                {
                    Ok(a) => a,
                    Err(e) => return self.fail(e.into()).await,
                };
                if actions.is_empty() {
                    return self.gap(from).await;
                }
                for a in actions {
                    // A sled range is not a snapshot: if retention removed entries while this
                    // chunk was read, the next entry is not the one expected. Never skip.
                    if a.sequence != self.cursor + 1 {
                        let missing = self.cursor + 1;
                        return self.gap(missing).await;
                    }
                    self.cursor = a.sequence;
                    if !self.filter.matches(&a) {
                        continue;
                    }
                    // Wait for room in the budgets: a client that stops reading stops this reader.
                    // Each budget is charged the action's size, up to all of that budget (a larger
                    // action waits until it has the budget to itself).
                    let size = a.approx_size();
                    let shares = hold(
                        (self.budget.clone(), size.min(self.log.buffer_bytes) as u32),
                        (
                            self.log.total_buffer.clone(),
                            size.min(self.log.total_buffer_bytes) as u32,
                        ),
                    );
                    let held = tokio::select! {
                        biased;
                        _ = self.shutdown.wait_for(|s| *s) => return,
                        _ = self.tx.closed() => return,
                        held = shares => match held {
                            Some(held) => held,
                            None => return,
                        },
                    };
                    let delivered = Delivered {
                        action: a,
                        _held: held,
                    };
                    tokio::select! {
                        biased;
                        _ = self.shutdown.wait_for(|s| *s) => return,
                        sent = self.tx.send(Ok(delivered)) => if sent.is_err() { return },
                    }
                }
                // A filtered replay may send nothing for a long time: stay cooperative and
                // notice shutdown or a departed client between chunks.
                tokio::task::yield_now().await;
                if *self.shutdown.borrow() || self.tx.is_closed() {
                    return;
                }
            }
            tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => return,
                _ = self.tx.closed() => return,
                changed = self.durable.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Ends the stream because `missing` is not in the log (retention removed it).
    async fn gap(self, missing: u64) {
        let e = match self.log.too_old(missing) {
            Ok(Some(e)) => e,
            Ok(None) => Error::Internal(format!("action {missing} missing from the log")),
            Err(e) => e,
        };
        self.fail(e).await
    }

    /// Sends a final error, unless the client is gone or the server is stopping.
    async fn fail(mut self, e: Error) {
        tokio::select! {
            biased;
            _ = self.shutdown.wait_for(|s| *s) => {}
            _ = self.tx.send(Err(e)) => {}
        }
    }
}
