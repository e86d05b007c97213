//! The history-cost benchmark: how long a batch whose events each read a long history holds
//! another user's writes.
//!
//! ```text
//! cargo build --release --bin engage --example loadgen
//! target/release/examples/loadgen history
//! ```
//!
//! One user has `--history` stored `visit` events; a trigger on `visit` counts the user's visits
//! within a year (a windowed history condition: every evaluation reads the window). A probe
//! sends one unary TrackEvent at a time for another user, for `--secs`: first alone (the
//! baseline), then while a client sends batches of `--batch` heavy visits, on two servers: one
//! with the defaults (a group stops after `--max-group-history-reads` reads, the batch goes on in
//! the next group) and one where a group never stops for reads (how engage behaved before).

use std::time::{Duration, Instant};

use engage::proto;
use engage::proto::event_service_client::EventServiceClient;
use hdrhistogram::Histogram;
use tonic::transport::Channel;

#[derive(clap::Args, Clone)]
pub struct HistoryArgs {
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Stored events of the heavy user (each heavy event reads them all).
    #[arg(long, default_value_t = 50_000)]
    history: u64,
    /// Heavy events per TrackEvents call.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: std::path::PathBuf,
}

fn visit(user: &str) -> proto::Event {
    proto::Event {
        user_id: user.into(),
        name: "visit".into(),
        ..Default::default()
    }
}

async fn prepare(channel: &Channel, history: u64) {
    let mut c = EventServiceClient::new(channel.clone());
    let mut i = 0;
    while i < history {
        let n = (history - i).min(1000);
        let events = (0..n).map(|_| visit("heavy")).collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .expect("track");
        i += n;
    }
    let window = proto::HistoryCondition {
        event_name: "visit".into(),
        aggregate: proto::Aggregate::Count as i32,
        op: proto::Operator::Gte as i32,
        value: 1.0,
        within: Some(prost_types::Duration {
            seconds: 365 * 86_400,
            nanos: 0,
        }),
        ..Default::default()
    };
    proto::trigger_service_client::TriggerServiceClient::new(channel.clone())
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(proto::Trigger {
                name: "regular".into(),
                event_name: "visit".into(),
                condition: Some(proto::Condition {
                    kind: Some(proto::condition::Kind::History(Box::new(window))),
                }),
                action: Some(proto::ActionTemplate {
                    r#type: "x".into(),
                    payload_template: String::new(),
                    destination_id: String::new(),
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("trigger");
}

/// Unary TrackEvents of a light user, one at a time, for `secs`: their latency in µs.
async fn probe(channel: Channel, secs: u64) -> Histogram<u64> {
    let mut c = EventServiceClient::new(channel);
    let mut hist = super::histogram();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let t = Instant::now();
        c.track_event(proto::TrackEventRequest {
            event: Some(proto::Event {
                name: "ping".into(),
                ..visit("light")
            }),
        })
        .await
        .expect("probe");
        let _ = hist.record(t.elapsed().as_micros() as u64);
    }
    hist
}

/// Heavy batches until `stop`: answers the heavy events stored per second.
async fn heavy(channel: Channel, batch: usize, stop: tokio::sync::watch::Receiver<bool>) -> f64 {
    let mut c = EventServiceClient::new(channel);
    let start = Instant::now();
    let mut stored = 0u64;
    while !*stop.borrow() {
        let events = (0..batch).map(|_| visit("heavy")).collect();
        let r = c
            .track_events(proto::TrackEventsRequest { events })
            .await
            .expect("heavy batch")
            .into_inner();
        stored += r.results.iter().filter(|r| r.accepted).count() as u64;
    }
    stored as f64 / start.elapsed().as_secs_f64()
}

fn line(name: &str, h: &Histogram<u64>) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "{name:<34} {:>6} calls  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// The probe alone, then beside the heavy batches, on a server started with `env`.
async fn scenario(a: &HistoryArgs, name: &str, env: &[(&str, &str)]) -> (Histogram<u64>, Histogram<u64>) {
    let engage = super::start_engage_env(&a.engage_bin, tempfile::TempDir::new().expect("dir"), env);
    let channel = super::channel(engage.addr).await;
    prepare(&channel, a.history).await;
    super::settle().await;
    let alone = probe(channel.clone(), a.secs).await;
    println!("{}", line(&format!("{name}: probe alone"), &alone));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(heavy(channel.clone(), a.batch, rx));
    let beside = probe(channel.clone(), a.secs).await;
    let _ = tx.send(true);
    let rate = load.await.expect("heavy task");
    println!("{}", line(&format!("{name}: probe beside heavy"), &beside));
    println!("{name}: heavy events stored {rate:.1}/s");
    (alone, beside)
}

pub async fn run(a: HistoryArgs) {
    let (alone, sliced) = scenario(&a, "sliced (defaults)", &[]).await;
    let (_, whole) = scenario(
        &a,
        "one group per batch",
        &[("ENGAGE_MAX_GROUP_HISTORY_READS", "1000000000000")],
    )
    .await;
    let ratio = |x: u64, y: u64| x as f64 / y.max(1) as f64;
    println!(
        "probe p99 beside heavy batches / alone: sliced {:.1}, one group per batch {:.1}",
        ratio(sliced.value_at_quantile(0.99), alone.value_at_quantile(0.99)),
        ratio(whole.value_at_quantile(0.99), alone.value_at_quantile(0.99)),
    );
    println!(
        "probe max, one group per batch / sliced: {:.1}",
        ratio(whole.max(), sliced.max())
    );
}
