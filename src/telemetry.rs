//! Prometheus metrics (SPEC §8): the series names, the recorder, and the text a scrape answers.
//!
//! Recording goes through the `metrics` facade: without `--metrics-listen` no recorder is
//! installed and every record is a no-op. With it, `metrics-exporter-prometheus` keeps the
//! series (atomics; histograms as Prometheus histograms) and renders the text format. The
//! facade was chosen over `prometheus-client` because its macros cost one atomic add per record
//! once a series exists and need no registry passed through every layer; the engine records
//! once per write group, not per event.
//!
//! Gauges that describe state (pending timers, the log head, consumers, open streams, storage
//! size) are set when a scrape asks, from the state itself, so they are never stale.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub(crate) const EVENTS_STORED: &str = "engage_events_stored_total";
pub(crate) const EVENTS_DUPLICATE: &str = "engage_events_duplicate_total";
pub(crate) const EVENTS_REJECTED: &str = "engage_events_rejected_total";
pub(crate) const ACTIONS_FIRED: &str = "engage_actions_fired_total";
pub(crate) const TIMERS_PENDING: &str = "engage_timers_pending";
pub(crate) const LOG_HEAD: &str = "engage_action_log_head_sequence";
pub(crate) const CONSUMER_ACKED: &str = "engage_consumer_acked_sequence";
pub(crate) const CONSUMER_LAG: &str = "engage_consumer_lag";
pub(crate) const SUBSCRIPTIONS_OPEN: &str = "engage_subscriptions_open";
pub(crate) const FLUSH_DURATION: &str = "engage_flush_duration_seconds";
pub(crate) const WRITE_GROUP_SIZE: &str = "engage_write_group_size";
/// Beyond SPEC §8: where a write's time goes, by `stage`: `queued` (submitted → the writer takes
/// it), `build` (the writer runs a group's jobs), `apply` (the group's batch into sled),
/// `handoff` (applied → its commit round starts: about 0 when the writer commits it itself,
/// the wait for the committer thread otherwise), `answered` (the whole write, as its caller saw
/// it: submitted → its answer received). `flush` is `engage_flush_duration_seconds`.
pub(crate) const WRITE_STAGE: &str = "engage_write_stage_seconds";
pub(crate) const GRPC_REQUESTS: &str = "engage_grpc_requests_total";
pub(crate) const GRPC_DURATION: &str = "engage_grpc_request_duration_seconds";
pub(crate) const STORAGE_BYTES: &str = "engage_storage_bytes";
pub(crate) const HTTP_REQUESTS: &str = "engage_http_requests_total";
pub(crate) const DELIVERIES: &str = "engage_deliveries_total";
pub(crate) const DEAD_LETTERS: &str = "engage_dead_letters";
/// Actions of a destination read and not yet delivered or dead-lettered (retries included).
pub(crate) const DELIVERY_QUEUE: &str = "engage_delivery_queue";
/// From an action's firing to its delivery (2xx), per destination.
pub(crate) const DELIVERY_LATENCY: &str = "engage_delivery_latency_seconds";

/// Why an event was refused, as `engage_events_rejected_total` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Rejection {
    Invalid,
    Limit,
    Unauthenticated,
    PermissionDenied,
    RateLimited,
    Unavailable,
}

impl Rejection {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Rejection::Invalid => "invalid",
            Rejection::Limit => "limit",
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::PermissionDenied => "permission_denied",
            Rejection::RateLimited => "rate_limited",
            Rejection::Unavailable => "unavailable",
        }
    }

    /// The reason of an event refused with `e`: a broken limit (a size, a count, a cost) is
    /// `limit`, another bad value `invalid`, a server that cannot write `unavailable`.
    pub(crate) fn of(e: &crate::error::Error) -> Self {
        use crate::error::Error;
        match e {
            Error::ResourceExhausted(_) | Error::OutOfRange(_) => Rejection::Limit,
            Error::InvalidArgument(m) if names_a_limit(m) => Rejection::Limit,
            Error::Unavailable(_) | Error::Internal(_) => Rejection::Unavailable,
            _ => Rejection::Invalid,
        }
    }
}

/// Whether a message is about a limit: every limit message says what is allowed at most (or
/// names the `max_*` setting), see `domain::rules`.
fn names_a_limit(message: &str) -> bool {
    message.contains("at most") || message.contains("max_") || message.contains("limit is")
}

/// Counts `n` events refused for `why`.
pub(crate) fn rejected(why: Rejection, n: u64) {
    if n > 0 && enabled() {
        metrics::counter!(EVENTS_REJECTED, "reason" => why.label()).increment(n);
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether a recorder is installed (`--metrics-listen`): without one, the per-call paths skip
/// building labels and wrapping answers (the facade would discard them anyway).
pub(crate) fn enabled() -> bool {
    HANDLE.get().is_some()
}

/// Zeroes the gauges of a deleted destination (the exporter keeps a series once it exists).
pub(crate) fn forget_destination(id: &str) {
    let labels = [("destination_id", id.to_string())];
    metrics::gauge!(DELIVERY_QUEUE, &labels).set(0.0);
    metrics::gauge!(DEAD_LETTERS, &labels).set(0.0);
}

/// A moment to time a write stage from; `None` without a recorder, so the write path reads no
/// clock for metrics nobody collects.
pub(crate) fn stamp() -> Option<std::time::Instant> {
    enabled().then(std::time::Instant::now)
}

/// Records the time since `from` (a [`stamp`]) as the write stage `stage` (see [`WRITE_STAGE`]).
pub(crate) fn write_stage(stage: &'static str, from: Option<std::time::Instant>) {
    if let Some(from) = from {
        metrics::histogram!(WRITE_STAGE, "stage" => stage).record(from.elapsed().as_secs_f64());
    }
}

/// Installs the process's recorder (once: servers started again in one process share it) and
/// answers its handle.
pub(crate) fn install() -> Result<PrometheusHandle, String> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let seconds = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let sizes = [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(FLUSH_DURATION.into()),
            &seconds,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(GRPC_DURATION.into()),
                &seconds,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(DELIVERY_LATENCY.into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 600.0, 3600.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(WRITE_STAGE.into()),
                &seconds,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(WRITE_GROUP_SIZE.into()),
                &sizes,
            )
        })
        .map_err(|e| format!("metrics: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            let _ = HANDLE.set(handle.clone());
            Ok(handle)
        }
        Err(_) => HANDLE
            .get()
            .cloned()
            .ok_or_else(|| "metrics: another recorder is installed in this process".to_string()),
    }
}

/// The gRPC code name of a `grpc-status` value, as `engage_grpc_requests_total` labels it.
pub(crate) fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// The bytes of every file under `dir`.
pub(crate) fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
