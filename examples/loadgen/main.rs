//! Load generator: measures engage's ingest against two baselines measured in the same run.
//!
//! ```text
//! cargo build --release --bin engage --example loadgen
//! target/release/examples/loadgen run --secs 10
//! ```
//!
//! Scenarios, each for `--secs` seconds against its own fresh process and data directory:
//! - `engage batch`: TrackEvents with `--batch-size` events, `--batch-in-flight` calls at once;
//! - `engage unary`: TrackEvent with `--unary-in-flight` calls at once;
//! - `http batch`: the same batches as Segment `track` messages to `/v1/batch` (JSON over
//!   HTTP/1.1 keep-alive connections, one per call in flight);
//! - `echo batch` / `echo unary`: the same calls against a bare tonic server that answers
//!   without storing (this binary's `echo-server`), the transport's ceiling;
//! - `sled batch` / `sled unary`: the same records inserted straight into sled with the same
//!   group commit (one committer thread, one `flush()` per drained set), storage's ceiling;
//!   `sled atomic unary` puts each call's record in through `apply_batch` instead.
//!
//! Latency is per call (microseconds, HDR histogram). Ratios are printed at the end; only ratios
//! are meaningful across machines.

// A benchmark tool: a failed setup step aborts the run with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod deliveries;
mod history;
mod http;
mod rollup;
mod scale;
mod segments;
mod timers;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use clap::{Parser, Subcommand};
use engage::model::{Event, Timestamp, Value};
use engage::proto;
use engage::proto::event_service_server::{EventService, EventServiceServer};
use hdrhistogram::Histogram;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

// The same allocator as the engage binary, so the raw sled baseline is a fair ceiling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs every scenario and prints the results and ratios.
    Run(RunArgs),
    /// A bare tonic EventService that answers without storing (the transport baseline).
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// The segments benchmark: FilterUsers and GetEventStats against PostgreSQL 15.
    Segments(segments::SegmentArgs),
    /// The cost curve: 10M events into one server, measured at every million.
    Scale(scale::ScaleArgs),
    /// The timers benchmark: ingest with pending timers, their memory, firing lateness.
    Timers(timers::TimerArgs),
    /// Another user's write latency while batches with costly history conditions run.
    History(history::HistoryArgs),
    /// Open-loop TrackEvent and event -> subscriber latency at a fixed rate, against the echo
    /// server at the same rate in the same run.
    OpenLoop(OpenLoopArgs),
    /// TrackEvent latency at a fixed rate while all-history queries make the server build and
    /// refresh a rollup over the stored events.
    RollupStall(rollup::RollupArgs),
    /// Destinations: deliveries per second to a local receiver, event -> webhook latency, and
    /// ingest with a failing destination against none.
    Deliveries(deliveries::DeliveryArgs),
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    #[arg(long, default_value_t = 4)]
    batch_in_flight: usize,
    #[arg(long, default_value_t = 64)]
    unary_in_flight: usize,
    /// Distinct users the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// The engage binary to start (build it with --release first).
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: PathBuf,
    /// Events per second for the action latency scenario (default: half the unary rate).
    #[arg(long, default_value_t = 0.0)]
    latency_rate: f64,
    /// Only run scenarios whose name contains this text.
    #[arg(long, default_value = "")]
    only: String,
}

/// The events the benchmark sends: ~200 bytes, three typed attributes.
fn wire_event(i: u64, users: u64) -> proto::Event {
    let num = |v: f64| proto::AttributeValue {
        value: Some(proto::attribute_value::Value::NumberValue(v)),
    };
    let text = |v: &str| proto::AttributeValue {
        value: Some(proto::attribute_value::Value::StringValue(v.into())),
    };
    let mut attributes = HashMap::new();
    attributes.insert("price".to_string(), num((i % 500) as f64 + 0.99));
    attributes.insert("sku".to_string(), text(&format!("SKU-{:06}", i % 100_000)));
    attributes.insert(
        "color".to_string(),
        text(["teal", "blue", "red"][(i % 3) as usize]),
    );
    proto::Event {
        user_id: format!("user-{:08}", (i.wrapping_mul(2_654_435_761)) % users),
        name: "product_purchased".into(),
        attributes,
        ..Default::default()
    }
}

/// The same event as engage stores it, for the raw sled baseline.
fn stored_event(i: u64, users: u64) -> Event {
    let mut attributes = BTreeMap::new();
    attributes.insert("price".to_string(), Value::Number((i % 500) as f64 + 0.99));
    attributes.insert(
        "sku".to_string(),
        Value::String(format!("SKU-{:06}", i % 100_000)),
    );
    attributes.insert(
        "color".to_string(),
        Value::String(["teal", "blue", "red"][(i % 3) as usize].into()),
    );
    let now = Timestamp::now();
    Event {
        event_id: ulid::Ulid::new().to_string(),
        user_id: format!("user-{:08}", (i.wrapping_mul(2_654_435_761)) % users),
        name: "product_purchased".into(),
        occurred_at: now,
        received_at: now,
        sequence: i + 1,
        attributes,
    }
}

struct Report {
    name: String,
    events: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Report {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn print(&self) {
        println!(
            "{:<14} {:>12.0} events/s   p50 {:>8.2} ms   p99 {:>8.2} ms   ({} events, {} calls)",
            self.name,
            self.rate(),
            self.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
            self.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            self.events,
            self.latency_us.len(),
        );
    }
}

impl Report {
    /// The report of load tasks that each answer (events, latency histogram), timed from `start`.
    async fn gather(
        name: &str,
        start: Instant,
        tasks: Vec<tokio::task::JoinHandle<(u64, Histogram<u64>)>>,
    ) -> Report {
        let mut total = 0;
        let mut hist = histogram();
        for t in tasks {
            let (events, h) = t.await.expect("load task");
            total += events;
            hist.add(h).expect("merge histograms");
        }
        Report {
            name: name.into(),
            events: total,
            elapsed: start.elapsed(),
            latency_us: hist,
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Passes pre-encoded protobuf bytes through, so the load generator spends its CPU on the
/// transport only, not on building and encoding messages (it shares the 2 cores with the server).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        buf.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .initial_stream_window_size(engage::server::STREAM_WINDOW)
        .initial_connection_window_size(engage::server::CONNECTION_WINDOW)
        .connect()
        .await
        .expect("connect")
}

/// Pre-encoded requests: `count` TrackEvents bodies of `batch` events each, or TrackEvent bodies
/// when `batch` is 0. Events carry no event_id, so resending a body stores new events.
fn encoded_requests(count: u64, batch: usize, users: u64) -> Vec<Bytes> {
    (0..count)
        .map(|r| {
            let base = r * batch.max(1) as u64;
            let bytes = if batch == 0 {
                proto::TrackEventRequest {
                    event: Some(wire_event(base, users)),
                }
                .encode_to_vec()
            } else {
                proto::TrackEventsRequest {
                    events: (0..batch as u64).map(|k| wire_event(base + k, users)).collect(),
                }
                .encode_to_vec()
            };
            Bytes::from(bytes)
        })
        .collect()
}

/// `in_flight` loops, each sending calls of `batch` events (unary TrackEvent when batch is 0)
/// until the deadline; calls share 4 connections.
async fn grpc_load(
    name: &str,
    addr: SocketAddr,
    secs: u64,
    batch: usize,
    in_flight: usize,
    users: u64,
) -> Report {
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(channel(addr).await);
    }
    let requests = std::sync::Arc::new(encoded_requests(if batch == 0 { 4096 } else { 64 }, batch, users));
    let path = if batch == 0 {
        "/engage.v1.EventService/TrackEvent"
    } else {
        "/engage.v1.EventService/TrackEvents"
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..in_flight {
        let mut grpc = tonic::client::Grpc::new(channels[w % channels.len()].clone())
            .max_decoding_message_size(64 * 1024 * 1024);
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut events = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                let body = requests[i % requests.len()].clone();
                i += 1;
                let t = Instant::now();
                grpc.ready().await.expect("ready");
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
                let reply = grpc
                    .unary(Request::new(body), path, RawCodec)
                    .await
                    .expect("call")
                    .into_inner();
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                if batch == 0 {
                    let r = proto::TrackEventResponse::decode(reply).expect("decode");
                    assert!(r.sequence > 0);
                    events += 1;
                } else {
                    let r = proto::TrackEventsResponse::decode(reply).expect("decode");
                    assert!(r.results.iter().all(|r| r.accepted));
                    events += r.results.len() as u64;
                }
            }
            (events, hist)
        }));
    }
    Report::gather(name, start, tasks).await
}

/// Raw sled: `writers` threads insert `batch` records each (1 for unary) and wait for one
/// committer thread that drains every waiting writer and runs one `flush()` for all of them.
///
/// With `atomic`, each call's records go in through one `apply_batch` (as engage applies a
/// write group) instead of plain inserts. sled 0.34 runs `apply_batch` under the write side of a
/// process-wide lock whose read side every `flush()` holds until its fsync is done, so atomic
/// writes cannot overlap the committer's flush; plain inserts can.
fn sled_load(name: &str, secs: u64, batch: usize, writers: usize, users: u64, atomic: bool) -> Report {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(256 * 1024 * 1024)
        .flush_every_ms(Some(500))
        // As engage creates its data directories (see `store::SEGMENT_SIZE`).
        .segment_size(8 << 20)
        .open()
        .expect("open sled");
    let tree = db.open_tree("engage").expect("tree");
    let (tx, rx) = std_mpsc::channel::<std_mpsc::SyncSender<()>>();
    let committer_db = db.clone();
    let committer = std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut waiting = vec![first];
            while let Ok(more) = rx.try_recv() {
                waiting.push(more);
            }
            committer_db.flush().expect("flush");
            for w in waiting {
                let _ = w.send(());
            }
        }
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let per_call = batch.max(1);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let tree = tree.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut hist = histogram();
                let mut i = w as u64 * 1_000_000_000;
                let mut events = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let mut atomic_batch = sled::Batch::default();
                    for _ in 0..per_call {
                        let e = stored_event(i, users);
                        // engage's own key and value encodings.
                        let (k, v) = (engage::layout::event_key(&e), engage::layout::encode_event(&e));
                        if atomic {
                            atomic_batch.insert(k, v);
                        } else {
                            tree.insert(k, v).expect("insert");
                        }
                        i += 1;
                    }
                    if atomic {
                        tree.apply_batch(atomic_batch).expect("apply_batch");
                    }
                    let (done_tx, done_rx) = std_mpsc::sync_channel(1);
                    tx.send(done_tx).expect("committer");
                    done_rx.recv().expect("flushed");
                    events += per_call as u64;
                    let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                }
                (events, hist)
            })
        })
        .collect();
    drop(tx);
    let mut total = 0;
    let mut hist = histogram();
    for t in threads {
        let (events, h) = t.join().expect("writer");
        total += events;
        hist.add(h).expect("merge");
    }
    let elapsed = start.elapsed();
    let _ = committer.join();
    Report {
        name: name.into(),
        events: total,
        elapsed,
        latency_us: hist,
    }
}

/// Lets the machine settle (the previous scenario's data directory is being deleted, sled's
/// background threads finish) so that one scenario's tail does not land in the next one.
/// The resident memory of process `pid` in KiB (0 when it cannot be read).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Creates `matching` triggers on the benchmark's event (each with a condition that holds and a
/// template) and `other` triggers on other event names, 64 calls at a time.
async fn create_triggers(addr: SocketAddr, matching: usize, other: usize) {
    use proto::trigger_service_client::TriggerServiceClient;
    let client = TriggerServiceClient::new(channel(addr).await);
    let specs: Vec<(String, bool)> = (0..matching)
        .map(|_| ("product_purchased".to_string(), true))
        .chain((0..other).map(|i| (format!("other_event_{i}"), false)))
        .collect();
    let mut pending = Vec::new();
    for chunk in specs.chunks(specs.len().div_ceil(64).max(1)) {
        let chunk = chunk.to_vec();
        let mut client = client.clone();
        pending.push(tokio::spawn(async move {
            for (event_name, with_condition) in chunk {
                let condition = with_condition.then(|| proto::Condition {
                    kind: Some(proto::condition::Kind::Attribute(proto::AttributeCondition {
                        attribute: "price".into(),
                        op: proto::Operator::Exists as i32,
                        value: None,
                        values: vec![],
                    })),
                });
                let trigger = proto::Trigger {
                    name: format!("bench {event_name}"),
                    event_name,
                    condition,
                    action: Some(proto::ActionTemplate {
                        r#type: "webhook".into(),
                        payload_template:
                            "{\"user\": \"{{ user_id }}\", \"sku\": \"{{ event.attributes.sku }}\"}".into(),
                        destination_id: String::new(),
                    }),
                    ..Default::default()
                };
                client
                    .create_trigger(proto::CreateTriggerRequest {
                        trigger: Some(trigger),
                    })
                    .await
                    .expect("create trigger");
            }
        }));
    }
    for p in pending {
        p.await.expect("create triggers");
    }
}

/// What an open-loop run measured: TrackEvent answers and, with a subscriber, actions
/// received, each from the moment its call was *scheduled* (so a stall counts for every call it
/// delays, not only for the one it hit).
struct OpenLoop {
    answered: Report,
    delivered: Option<Report>,
}

fn quantiles(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    )
}

/// Open-loop unary TrackEvent: call `i` is due at `start + i / rate` whatever the calls before
/// it are doing (a late sender sends at once, with the latency counted from the due time). With
/// `subscribe`, a subscriber receives each event's action (one matching trigger must exist) and
/// that latency is measured too, from the same due time. The echo server has no actions: without
/// `subscribe` only the answers are measured, the floor this client and the transport put under
/// every figure.
/// Where an open-loop run learns that an event's action arrived: nowhere, a subscriber of the
/// server's action stream, or the event ids a webhook receiver reports.
enum Arrivals {
    None,
    Subscriber,
    Ids(tokio::sync::mpsc::UnboundedReceiver<String>),
}

impl From<bool> for Arrivals {
    fn from(subscribe: bool) -> Self {
        if subscribe {
            Arrivals::Subscriber
        } else {
            Arrivals::None
        }
    }
}

async fn open_loop(
    addr: SocketAddr,
    secs: u64,
    rate: f64,
    users: u64,
    arrivals: impl Into<Arrivals>,
) -> OpenLoop {
    use proto::action_service_client::ActionServiceClient;
    use std::sync::{Arc, Mutex};
    let arrivals = arrivals.into();
    let subscribe = !matches!(arrivals, Arrivals::None);
    let due_of: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut stream = match &arrivals {
        Arrivals::Subscriber => Some(
            ActionServiceClient::new(channel(addr).await)
                .subscribe_actions(proto::SubscribeActionsRequest {
                    start: proto::StartFrom::Latest as i32,
                    ..Default::default()
                })
                .await
                .expect("subscribe")
                .into_inner(),
        ),
        _ => None,
    };
    let mut ids = match arrivals {
        Arrivals::Ids(rx) => Some(rx),
        _ => None,
    };
    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    let receiver = {
        let due_of = due_of.clone();
        tokio::spawn(async move {
            let mut hist = histogram();
            loop {
                let next = async {
                    match (stream.as_mut(), ids.as_mut()) {
                        (Some(stream), _) => match stream.message().await {
                            Ok(Some(action)) => Some(action.event_id),
                            _ => None,
                        },
                        (None, Some(ids)) => ids.recv().await,
                        (None, None) => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = &mut done => return hist,
                    id = next => match id {
                        Some(id) => {
                            let due = due_of.lock().expect("due map").remove(&id);
                            if let Some(due) = due {
                                let _ = hist.record(due.elapsed().as_micros().max(1) as u64);
                            }
                        }
                        None => return hist,
                    },
                }
            }
        })
    };
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(channel(addr).await);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let period = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * secs as f64) as u64;
    let mut calls = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let mut e = wire_event(i, users);
        e.event_id = format!("lat-{i}");
        if subscribe {
            due_of.lock().expect("due map").insert(e.event_id.clone(), due);
        }
        let body = Bytes::from(proto::TrackEventRequest { event: Some(e) }.encode_to_vec());
        let mut grpc = tonic::client::Grpc::new(channels[i as usize % channels.len()].clone());
        calls.push(tokio::spawn(async move {
            grpc.ready().await.expect("ready");
            let path =
                tonic::codegen::http::uri::PathAndQuery::from_static("/engage.v1.EventService/TrackEvent");
            grpc.unary(Request::new(body), path, RawCodec)
                .await
                .expect("TrackEvent");
            due.elapsed()
        }));
    }
    let mut answered = histogram();
    for c in calls {
        let _ = answered.record(c.await.expect("call").as_micros().max(1) as u64);
    }
    let elapsed = start.elapsed();
    // Every action arrives (a minute at most: a missing one is reported, not waited for).
    let waiting = Instant::now();
    while subscribe && !due_of.lock().expect("due map").is_empty() {
        if waiting.elapsed() > Duration::from_secs(60) {
            let missing = due_of.lock().expect("due map").len();
            println!("  {missing} actions never reached the subscriber");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = done_tx.send(());
    let delivered = receiver.await.expect("receiver");
    OpenLoop {
        answered: Report {
            name: "answered".into(),
            events: total,
            elapsed,
            latency_us: answered,
        },
        delivered: subscribe.then(|| Report {
            name: "delivered".into(),
            events: total,
            elapsed,
            latency_us: delivered,
        }),
    }
}

#[derive(clap::Args)]
struct OpenLoopArgs {
    /// Calls per second.
    #[arg(long, default_value_t = 6000.0)]
    rate: f64,
    /// Seconds per scenario.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Distinct users the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Rounds of the four scenarios, one after the other (the spread shows the noise).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: PathBuf,
    /// Drive a server already running at this address instead (one scenario; for profiling it
    /// with its metrics or perf), creating one matching trigger and a subscriber first.
    #[arg(long)]
    against: Option<SocketAddr>,
}

/// The open-loop scenarios at one rate: TrackEvent against engage and against the echo server,
/// then event → subscriber through one trigger (against the echo server's answers: no server
/// answers faster than the transport, and an action is durable one flush after its event).
async fn open_loop_run(a: OpenLoopArgs) {
    println!(
        "open loop: {} calls/s for {} s per scenario, {} users",
        a.rate, a.secs, a.users
    );
    if let Some(addr) = a.against {
        create_triggers(addr, 1, 0).await;
        let r = open_loop(addr, a.secs, a.rate, a.users, true).await;
        println!("TrackEvent:           {}", quantiles(&r.answered.latency_us));
        if let Some(d) = &r.delivered {
            println!("event -> subscriber:  {}", quantiles(&d.latency_us));
        }
        return;
    }
    // One scenario against a fresh process: its answers (and deliveries) printed as `label`.
    let scenario = |label: String, engage: bool, triggers: usize| {
        let bin = a.engage_bin.clone();
        let (secs, rate, users) = (a.secs, a.rate, a.users);
        async move {
            let proc = if engage { start_engage(&bin) } else { start_echo() };
            if triggers > 0 {
                create_triggers(proc.addr, triggers, 0).await;
                settle().await;
            }
            let r = open_loop(proc.addr, secs, rate, users, triggers > 0).await;
            println!("{label:<36} {}", quantiles(&r.answered.latency_us));
            if let Some(d) = &r.delivered {
                println!("{:<36} {}", "  event -> subscriber:", quantiles(&d.latency_us));
            }
            drop(proc);
            settle().await;
            r
        }
    };
    for round in 1..=a.rounds {
        let echo = scenario(format!("round {round} echo TrackEvent:"), false, 0).await;
        let plain = scenario(format!("round {round} engage TrackEvent:"), true, 0).await;
        let fired = scenario(format!("round {round} engage, 1 trigger:"), true, 1).await;
        let p99 = |r: &Report| r.latency_us.value_at_quantile(0.99) as f64;
        println!(
            "round {round} p99 ratios to echo: TrackEvent {:.1}x, event -> subscriber {:.1}x",
            p99(&plain.answered) / p99(&echo.answered),
            fired
                .delivered
                .as_ref()
                .map(|d| p99(d) / p99(&echo.answered))
                .unwrap_or(0.0),
        );
    }
}

/// A child process that printed its address; killed on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// The data directory of a server this run started.
    fn data_dir(&self) -> Option<std::path::PathBuf> {
        self._dir.as_ref().map(|d| d.path().to_path_buf())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_engage(bin: &PathBuf) -> Proc {
    start_engage_in(bin, tempfile::TempDir::new().expect("temp dir"))
}

/// Starts engage on an existing data directory (a restart).
fn start_engage_in(bin: &PathBuf, dir: tempfile::TempDir) -> Proc {
    start_engage_env(bin, dir, &[])
}

/// Starts engage with extra settings in its environment (`ENGAGE_*`, as its flags read them).
fn start_engage_env(bin: &PathBuf, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn,engage=info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (build it: cargo build --release)",
                bin.display()
            )
        });
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .find(|j| j["message"] == "engage started")
        .and_then(|j| j["listen"].as_str().and_then(|a| a.parse().ok()))
        .expect("engage start line");
    // Rollup rebuilds are worth seeing (they run in the writer); the rest is noise here.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("rollup rebuilt") {
                eprintln!("engage: {line}");
            }
        }
    });
    Proc {
        child,
        addr,
        _dir: Some(dir),
    }
}

fn start_echo() -> Proc {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args(["echo-server"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start echo server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("echo address");
    let addr = line.trim().parse().expect("echo address");
    Proc {
        child,
        addr,
        _dir: None,
    }
}

struct Echo;

#[tonic::async_trait]
impl EventService for Echo {
    async fn track_event(
        &self,
        request: Request<proto::TrackEventRequest>,
    ) -> Result<Response<proto::TrackEventResponse>, Status> {
        let e = request.into_inner().event.unwrap_or_default();
        Ok(Response::new(proto::TrackEventResponse {
            event_id: e.event_id,
            sequence: 1,
            duplicate: false,
            actions_fired: 0,
        }))
    }
    async fn track_events(
        &self,
        request: Request<proto::TrackEventsRequest>,
    ) -> Result<Response<proto::TrackEventsResponse>, Status> {
        let results = request
            .into_inner()
            .events
            .into_iter()
            .map(|e| proto::TrackEventResult {
                event_id: e.event_id,
                sequence: 1,
                accepted: true,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(proto::TrackEventsResponse { results }))
    }
    async fn get_user_timeline(
        &self,
        _: Request<proto::GetUserTimelineRequest>,
    ) -> Result<Response<proto::GetUserTimelineResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn delete_user(
        &self,
        _: Request<proto::DeleteUserRequest>,
    ) -> Result<Response<proto::DeleteUserResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

async fn echo_server(listen: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    println!("{}", listener.local_addr().expect("addr"));
    tonic::transport::Server::builder()
        .initial_stream_window_size(engage::server::STREAM_WINDOW)
        .initial_connection_window_size(engage::server::CONNECTION_WINDOW)
        .add_service(EventServiceServer::new(Echo).max_decoding_message_size(64 * 1024 * 1024))
        .serve_with_incoming(engage::server::incoming(listener))
        .await
        .expect("serve");
}

async fn run(args: RunArgs) {
    let wanted = |name: &str| args.only.is_empty() || name.contains(&args.only);
    let mut reports: HashMap<&str, Report> = HashMap::new();
    println!(
        "loadgen: {}s per scenario, batches of {} x{} in flight, unary x{} in flight, {} users",
        args.secs, args.batch_size, args.batch_in_flight, args.unary_in_flight, args.users
    );
    for name in ["engage batch", "engage unary", "echo batch", "echo unary"] {
        if !wanted(name) {
            continue;
        }
        let proc = if name.starts_with("engage") {
            start_engage(&args.engage_bin)
        } else {
            start_echo()
        };
        let (batch, in_flight) = if name.ends_with("batch") {
            (args.batch_size, args.batch_in_flight)
        } else {
            (0, args.unary_in_flight)
        };
        let r = grpc_load(name, proc.addr, args.secs, batch, in_flight, args.users).await;
        r.print();
        reports.insert(name, r);
    }
    // The Segment API's /v1/batch with the same events, batch size and calls in flight.
    if wanted("http batch") {
        let proc = start_engage(&args.engage_bin);
        let r = http::http_batch_load(
            "http batch",
            proc.addr,
            args.secs,
            args.batch_size,
            args.batch_in_flight,
            args.users,
        )
        .await;
        r.print();
        reports.insert("http batch", r);
        drop(proc);
        settle().await;
    }
    for name in ["sled batch", "sled unary", "sled atomic unary"] {
        if !wanted(name) {
            continue;
        }
        let (batch, writers) = if name.ends_with("batch") {
            (args.batch_size, args.batch_in_flight)
        } else {
            (1, args.unary_in_flight)
        };
        let (secs, users) = (args.secs, args.users);
        let atomic = name.contains("atomic");
        let r = tokio::task::spawn_blocking(move || sled_load(name, secs, batch, writers, users, atomic))
            .await
            .expect("sled load");
        r.print();
        reports.insert(name, r);
    }
    // Trigger costs, each against a no-trigger run right before it (same setup, same moment).
    for (name, matching, other) in [
        ("no triggers", 0, 0),
        ("10 matching triggers", 10, 0),
        ("no triggers (2)", 0, 0),
        ("10k other triggers", 0, 10_000),
    ] {
        if !(wanted(name) || name.starts_with("no triggers") && wanted("triggers")) {
            continue;
        }
        let proc = start_engage(&args.engage_bin);
        create_triggers(proc.addr, matching, other).await;
        settle().await;
        let r = grpc_load(
            name,
            proc.addr,
            args.secs,
            args.batch_size,
            args.batch_in_flight,
            args.users,
        )
        .await;
        r.print();
        reports.insert(name, r);
    }
    if wanted("unary 1 trigger") || wanted("action latency") {
        let proc = start_engage(&args.engage_bin);
        create_triggers(proc.addr, 1, 0).await;
        let r = grpc_load(
            "unary 1 trigger",
            proc.addr,
            args.secs,
            0,
            args.unary_in_flight,
            args.users,
        )
        .await;
        r.print();
        reports.insert("unary 1 trigger", r);
    }
    if wanted("action latency") {
        // Half the sustainable unary rate with one matching trigger (or --latency-rate).
        let rate = match (args.latency_rate, reports.get("unary 1 trigger")) {
            (r, _) if r > 0.0 => r,
            (_, Some(unary)) => unary.rate() / 2.0,
            _ => 5_000.0,
        };
        let proc = start_engage(&args.engage_bin);
        create_triggers(proc.addr, 1, 0).await;
        let r = open_loop(proc.addr, args.secs, rate, args.users, true).await;
        println!("  TrackEvent answered: {}", quantiles(&r.answered.latency_us));
        let mut delivered = r.delivered.expect("subscribed");
        delivered.name = "action latency".into();
        delivered.print();
        println!("  (an event's due time -> its action received by a subscriber, at {rate:.0} events/s)");
        drop(proc);
        settle().await;
        let echo = start_echo();
        let r = open_loop(echo.addr, args.secs, rate, args.users, false).await;
        println!("echo, same rate: {}", quantiles(&r.answered.latency_us));
    }
    println!();
    for (a, b) in [
        ("engage batch", "sled batch"),
        ("engage batch", "echo batch"),
        ("http batch", "engage batch"),
        ("engage unary", "echo unary"),
        ("engage unary", "sled unary"),
        ("sled atomic unary", "sled unary"),
        ("10 matching triggers", "no triggers"),
        ("10k other triggers", "no triggers (2)"),
    ] {
        if let (Some(x), Some(y)) = (reports.get(a), reports.get(b)) {
            println!("{a:<20} / {b:<12} = {:.2}", x.rate() / y.rate());
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match cli.command {
        Cmd::Run(args) => rt.block_on(run(args)),
        Cmd::EchoServer { listen } => rt.block_on(echo_server(listen)),
        Cmd::Segments(args) => rt.block_on(segments::run(args)),
        Cmd::Scale(args) => rt.block_on(scale::run(args)),
        Cmd::Timers(args) => rt.block_on(timers::run(args)),
        Cmd::History(args) => rt.block_on(history::run(args)),
        Cmd::OpenLoop(args) => rt.block_on(open_loop_run(args)),
        Cmd::RollupStall(args) => rt.block_on(rollup::run(args)),
        Cmd::Deliveries(args) => rt.block_on(deliveries::run(args)),
    }
}
