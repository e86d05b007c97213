//! The destinations benchmark (issue 15), each part against a fresh server:
//!
//! ```text
//! cargo build --release --bin engage --example loadgen
//! target/release/examples/loadgen deliveries
//! ```
//!
//! 1. **Throughput.** `--actions` actions fired at once (TrackEvents of 1000 `product_purchased`
//!    events, one trigger delivering each to a local receiver answering 200 at once); the rate at
//!    which the receiver gets them, from the first to the last, at the default concurrency (8)
//!    and at `--concurrency`.
//! 2. **Latency.** Open-loop TrackEvent at half the default-concurrency rate of 1 for `--secs`;
//!    event (its scheduled send) → webhook received, p50/p99, against event → subscriber at the
//!    same rate on the same server.
//! 3. **Ingest with a failing destination.** Batched TrackEvents (the `engage batch` load) on a
//!    server with no destination and on one whose trigger delivers every event to a receiver
//!    answering 500 to every call; `--pairs` alternated pairs, ratio per pair.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engage::proto;

#[derive(clap::Args, Clone)]
pub struct DeliveryArgs {
    #[arg(long, default_value_t = 20_000)]
    actions: u64,
    /// The second concurrency measured for throughput.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long, default_value_t = 2)]
    pairs: usize,
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: std::path::PathBuf,
}

/// A local webhook receiver: counts requests, reports each body (the template renders the
/// event id), answers `status`.
struct Receiver {
    url: String,
    count: Arc<AtomicU64>,
    times: Arc<Mutex<Vec<Instant>>>,
}

#[derive(Clone)]
struct State {
    status: u16,
    count: Arc<AtomicU64>,
    times: Arc<Mutex<Vec<Instant>>>,
    ids: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

async fn receive(
    axum::extract::State(s): axum::extract::State<State>,
    body: String,
) -> axum::http::StatusCode {
    s.count.fetch_add(1, Ordering::Relaxed);
    s.times.lock().expect("times").push(Instant::now());
    if let Some(ids) = &s.ids {
        let _ = ids.send(body);
    }
    axum::http::StatusCode::from_u16(s.status).expect("status")
}

impl Receiver {
    async fn start(status: u16, ids: Option<tokio::sync::mpsc::UnboundedSender<String>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = State {
            status,
            count: Arc::default(),
            times: Arc::default(),
            ids,
        };
        let (count, times) = (state.count.clone(), state.times.clone());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url: format!("http://{addr}/hook"),
            count,
            times,
        }
    }
}

fn start(bin: &std::path::Path) -> super::Proc {
    super::start_engage_env(
        &bin.to_path_buf(),
        tempfile::TempDir::new().expect("temp dir"),
        &[("ENGAGE_ALLOW_PRIVATE_DESTINATIONS", "true")],
    )
}

/// Creates a destination at `url` and a trigger on `product_purchased` delivering
/// `{{ event.event_id }}` to it.
async fn deliver_to(addr: SocketAddr, url: &str, concurrency: u32) {
    let channel = super::channel(addr).await;
    let d = proto::destination_service_client::DestinationServiceClient::new(channel.clone())
        .create_destination(proto::CreateDestinationRequest {
            destination: Some(proto::Destination {
                name: "bench".into(),
                url: url.into(),
                concurrency,
                ..Default::default()
            }),
        })
        .await
        .expect("destination")
        .into_inner();
    proto::trigger_service_client::TriggerServiceClient::new(channel)
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(proto::Trigger {
                name: "bench webhook".into(),
                event_name: "product_purchased".into(),
                action: Some(proto::ActionTemplate {
                    r#type: "webhook".into(),
                    payload_template: "{{ event.event_id }}".into(),
                    destination_id: d.id,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("trigger");
}

/// Fires `n` actions at once and answers the receiver's rate from its first request to its last.
async fn throughput(a: &DeliveryArgs, concurrency: u32) -> f64 {
    let receiver = Receiver::start(200, None).await;
    let engage = start(&a.engage_bin);
    deliver_to(engage.addr, &receiver.url, concurrency).await;
    let mut events = proto::event_service_client::EventServiceClient::new(super::channel(engage.addr).await);
    let mut sent = 0;
    while sent < a.actions {
        let n = (a.actions - sent).min(1000);
        let batch = (sent..sent + n)
            .map(|i| proto::Event {
                event_id: format!("t-{i}"),
                ..super::wire_event(i, 10_000)
            })
            .collect();
        events
            .track_events(proto::TrackEventsRequest { events: batch })
            .await
            .expect("track");
        sent += n;
    }
    let waiting = Instant::now();
    while receiver.count.load(Ordering::Relaxed) < a.actions {
        assert!(
            waiting.elapsed() < Duration::from_secs(600),
            "only {} of {} delivered",
            receiver.count.load(Ordering::Relaxed),
            a.actions
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let times = receiver.times.lock().expect("times").clone();
    let span = times[times.len() - 1].duration_since(times[0]).as_secs_f64();
    let rate = (times.len() - 1) as f64 / span;
    println!(
        "throughput, concurrency {concurrency:>3}: {rate:>8.0} deliveries/s ({} requests for {} actions)",
        times.len(),
        a.actions
    );
    rate
}

pub async fn run(a: DeliveryArgs) {
    println!("1. deliveries per second to a local receiver answering 200 at once");
    let rate = throughput(&a, 8).await;
    super::settle().await;
    throughput(&a, a.concurrency).await;
    super::settle().await;

    let half = (rate / 2.0).floor().max(1.0);
    println!("2. event -> webhook received at {half:.0} events/s (half the rate at concurrency 8)");
    let (ids_tx, ids_rx) = tokio::sync::mpsc::unbounded_channel();
    let receiver = Receiver::start(200, Some(ids_tx)).await;
    let engage = start(&a.engage_bin);
    deliver_to(engage.addr, &receiver.url, 8).await;
    super::settle().await;
    let r = super::open_loop(engage.addr, a.secs, half, 10_000, super::Arrivals::Ids(ids_rx)).await;
    println!(
        "   TrackEvent answered:  {}",
        super::quantiles(&r.answered.latency_us)
    );
    if let Some(d) = &r.delivered {
        println!("   webhook received:     {}", super::quantiles(&d.latency_us));
    }
    drop(engage);
    super::settle().await;
    let engage = super::start_engage(&a.engage_bin);
    super::create_triggers(engage.addr, 1, 0).await;
    super::settle().await;
    let r = super::open_loop(engage.addr, a.secs, half, 10_000, true).await;
    if let Some(d) = &r.delivered {
        println!(
            "   subscriber received:  {} (same rate, no destination)",
            super::quantiles(&d.latency_us)
        );
    }
    drop(engage);
    super::settle().await;

    println!("3. batched ingest with one destination failing every call, against none");
    let failing = Receiver::start(500, None).await;
    for pair in 1..=a.pairs {
        let none = {
            let engage = super::start_engage(&a.engage_bin);
            super::create_triggers(engage.addr, 1, 0).await;
            super::settle().await;
            super::grpc_load("no destination", engage.addr, a.secs, 500, 4, 10_000).await
        };
        none.print();
        super::settle().await;
        let before = failing.count.load(Ordering::Relaxed);
        let with = {
            let engage = start(&a.engage_bin);
            deliver_to(engage.addr, &failing.url, 8).await;
            super::settle().await;
            super::grpc_load("failing dest.", engage.addr, a.secs, 500, 4, 10_000).await
        };
        with.print();
        println!(
            "   pair {pair}: failing / none = {:.2} ({} attempts answered 500)",
            with.rate() / none.rate(),
            failing.count.load(Ordering::Relaxed) - before
        );
        super::settle().await;
    }
}
