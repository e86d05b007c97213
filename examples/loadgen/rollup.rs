//! The rollup-stall benchmark: TrackEvent latency at a fixed rate while all-history queries make
//! the server (re)build a rollup over the events already stored.
//!
//! ```text
//! cargo build --release --bin engage --example loadgen
//! target/release/examples/loadgen rollup-stall --preload 500000 --rounds 3 \
//!     --baseline-bin /tmp/engage-old
//! ```
//!
//! Each scenario starts a fresh server, stores `--preload` `product_purchased` events (batches
//! of 500), then sends TrackEvent open-loop at `--rate` for `--secs` while a client asks
//! FilterUsers "bought at least 3 times, ever" every `--query-every-ms`. The first query finds
//! no rollup and asks for one over every stored event; later ones find it lagging (new events
//! arrive all the time) and ask for a refresh. With `--baseline-bin`, each round runs the same
//! against that binary right after, so the two are compared at the same moment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use engage::proto;
use engage::proto::query_service_client::QueryServiceClient;

use super::{channel, encoded_requests, open_loop, quantiles, settle, start_engage, RawCodec};

#[derive(clap::Args, Clone)]
pub struct RollupArgs {
    /// Calls per second.
    #[arg(long, default_value_t = 3000.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Events stored before the measured run.
    #[arg(long, default_value_t = 500_000)]
    preload: u64,
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    #[arg(long, default_value_t = 500)]
    query_every_ms: u64,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: PathBuf,
    /// Another engage binary, run after each round's (for example the previous release).
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
}

async fn preload(addr: SocketAddr, events: u64, users: u64) {
    let requests = encoded_requests(events.div_ceil(500), 500, users);
    let mut grpc = tonic::client::Grpc::new(channel(addr).await).max_decoding_message_size(64 << 20);
    for body in requests {
        grpc.ready().await.expect("ready");
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/engage.v1.EventService/TrackEvents");
        grpc.unary(tonic::Request::new(body), path, RawCodec)
            .await
            .expect("preload");
    }
}

fn bought_three_times() -> proto::Condition {
    proto::Condition {
        kind: Some(proto::condition::Kind::History(Box::new(
            proto::HistoryCondition {
                event_name: "product_purchased".into(),
                aggregate: proto::Aggregate::Count as i32,
                op: proto::Operator::Gte as i32,
                value: 3.0,
                ..Default::default()
            },
        ))),
    }
}

/// One scenario; answers TrackEvent's p99 in microseconds.
async fn scenario(bin: &PathBuf, a: &RollupArgs, label: &str) -> u64 {
    let proc = start_engage(bin);
    let loaded = Instant::now();
    preload(proc.addr, a.preload, a.users).await;
    let load_secs = loaded.elapsed().as_secs_f64();
    settle().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let querier = {
        let (addr, every, stop) = (proc.addr, a.query_every_ms, stop.clone());
        tokio::spawn(async move {
            let mut client = QueryServiceClient::new(channel(addr).await);
            let mut times = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                client
                    .filter_users(proto::FilterUsersRequest {
                        filter: Some(bought_three_times()),
                        page_size: 10,
                        ..Default::default()
                    })
                    .await
                    .expect("FilterUsers");
                times.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(every)).await;
            }
            times
        })
    };
    let r = open_loop(proc.addr, a.secs, a.rate, a.users, false).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let times = querier.await.expect("querier");
    let first = times.first().map_or(0.0, |t| t.as_secs_f64() * 1000.0);
    println!(
        "{label:<28} TrackEvent {} | {} queries, first {first:.0} ms | preload {load_secs:.1} s",
        quantiles(&r.answered.latency_us),
        times.len()
    );
    drop(proc);
    settle().await;
    r.answered.latency_us.value_at_quantile(0.99)
}

pub async fn run(a: RollupArgs) {
    println!(
        "rollup stall: {} stored events, TrackEvent at {}/s for {} s, FilterUsers every {} ms",
        a.preload, a.rate, a.secs, a.query_every_ms
    );
    for round in 1..=a.rounds {
        let new = scenario(&a.engage_bin, &a, &format!("round {round} engage:")).await;
        if let Some(base) = &a.baseline_bin {
            let old = scenario(base, &a, &format!("round {round} baseline:")).await;
            println!(
                "round {round} TrackEvent p99 engage / baseline = {:.2}",
                new as f64 / old.max(1) as f64
            );
        }
    }
}
