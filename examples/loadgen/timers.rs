//! The timers benchmark: ingest with many pending timers, the memory they cost, and
//! how late timers fire.
//!
//! ```text
//! cargo build --release --bin engage --example loadgen
//! target/release/examples/loadgen timers
//! ```
//!
//! 1. **Ingest.** One fresh server: batched TrackEvents for `--secs` (the `engage batch` load:
//!    500 `product_purchased` events per call, 4 calls in flight); then `--pending` users each
//!    track a `cart_added` that arms a one-day timer; then the same batched load again. The
//!    ratio of the two rates is the cost of the pending timers.
//! 2. **Memory.** Resident memory (VmRSS) of two fresh servers after the same `--memory-events`
//!    `cart_added` events, one user each: one server holds a one-day delayed trigger on them
//!    (so as many timers are pending), the other none. The difference is what the pending timers
//!    cost in memory (sled's page cache is bounded by `--cache-mb` in both).
//! 3. **Precision.** `--precision-timers` timers due 3 to 5 s after arming, armed and fired
//!    while a background load of `--background-rate` events/s runs; lateness = `fired_at` − due.

use std::time::{Duration, Instant};

use engage::proto;
use engage::proto::trigger_service_client::TriggerServiceClient;
use hdrhistogram::Histogram;

#[derive(clap::Args, Clone)]
pub struct TimerArgs {
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long, default_value_t = 100_000)]
    pending: u64,
    #[arg(long, default_value_t = 1_000_000)]
    memory_events: u64,
    #[arg(long, default_value_t = 2_000)]
    precision_timers: u64,
    #[arg(long, default_value_t = 2_000.0)]
    background_rate: f64,
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: std::path::PathBuf,
}

fn delayed_trigger(delay: prost_types::Duration) -> proto::Trigger {
    proto::Trigger {
        name: "reminder".into(),
        event_name: "cart_added".into(),
        delay: Some(delay),
        action: Some(proto::ActionTemplate {
            r#type: "send_email".into(),
            payload_template: "{{ user_id }}".into(),
            destination_id: String::new(),
        }),
        ..Default::default()
    }
}

/// `count` cart_added events, one per user `prefix{i}`, in TrackEvents of 1000.
async fn carts(channel: &tonic::transport::Channel, prefix: &str, count: u64) {
    let mut c = proto::event_service_client::EventServiceClient::new(channel.clone());
    let mut i = 0;
    while i < count {
        let n = (count - i).min(1000);
        let events = (i..i + n)
            .map(|j| proto::Event {
                user_id: format!("{prefix}{j:08}"),
                name: "cart_added".into(),
                ..Default::default()
            })
            .collect();
        let r = c
            .track_events(proto::TrackEventsRequest { events })
            .await
            .expect("track")
            .into_inner();
        assert!(r.results.iter().all(|r| r.accepted));
        i += n;
    }
}

/// VmRSS (KiB) of a fresh server: idle, after `memory_events` cart events, and idle again after
/// a restart on the same data.
async fn memory(a: &TimerArgs, with_timers: bool) -> (u64, u64, u64) {
    let engage = super::start_engage(&a.engage_bin);
    let channel = super::channel(engage.addr).await;
    if with_timers {
        TriggerServiceClient::new(channel.clone())
            .create_trigger(proto::CreateTriggerRequest {
                trigger: Some(delayed_trigger(prost_types::Duration {
                    seconds: 86_400,
                    nanos: 0,
                })),
            })
            .await
            .expect("trigger");
    }
    let idle = super::rss_kib(engage.child.id());
    carts(&channel, "m", a.memory_events).await;
    let loaded = super::rss_kib(engage.child.id());
    // Restarted on the same data: what an idle server holding them needs.
    let mut engage = engage;
    let dir = engage._dir.take().expect("data dir");
    drop(engage);
    let engage = super::start_engage_in(&a.engage_bin, dir);
    let channel = super::channel(engage.addr).await;
    proto::schema_service_client::SchemaServiceClient::new(channel)
        .list_attributes(proto::ListAttributesRequest::default())
        .await
        .expect("list");
    super::settle().await;
    (idle, loaded, super::rss_kib(engage.child.id()))
}

pub async fn run(a: TimerArgs) {
    // 1. Ingest with pending timers.
    let engage = super::start_engage(&a.engage_bin);
    let channel = super::channel(engage.addr).await;
    super::settle().await;
    let before = super::grpc_load("no timers", engage.addr, a.secs, 500, 4, 10_000).await;
    before.print();
    TriggerServiceClient::new(channel.clone())
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(delayed_trigger(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            })),
        })
        .await
        .expect("trigger");
    let t = Instant::now();
    carts(&channel, "p", a.pending).await;
    println!(
        "armed {} timers in {:.1} s ({:.0}/s)",
        a.pending,
        t.elapsed().as_secs_f64(),
        a.pending as f64 / t.elapsed().as_secs_f64()
    );
    super::settle().await;
    let after = super::grpc_load("timers pending", engage.addr, a.secs, 500, 4, 10_000).await;
    after.print();
    println!(
        "ingest with {} pending timers / before them: {:.2}",
        a.pending,
        after.rate() / before.rate()
    );
    drop(engage);

    // 2. Memory.
    let (idle_a, with, restarted_with) = memory(&a, true).await;
    let (idle_b, without, restarted_without) = memory(&a, false).await;
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "VmRSS with {n} pending timers / without, after {n} cart events: fresh {:.1} / {:.1} MiB; loaded {:.1} / {:.1} MiB; restarted idle {:.1} / {:.1} MiB (difference {:+.1} MiB)",
        mib(idle_a),
        mib(idle_b),
        mib(with),
        mib(without),
        mib(restarted_with),
        mib(restarted_without),
        mib(restarted_with) - mib(restarted_without),
        n = a.memory_events,
    );

    // 3. Precision under a background load.
    let engage = super::start_engage(&a.engage_bin);
    let channel = super::channel(engage.addr).await;
    TriggerServiceClient::new(channel.clone())
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(delayed_trigger(prost_types::Duration { seconds: 3, nanos: 0 })),
        })
        .await
        .expect("trigger");
    let mut actions = proto::action_service_client::ActionServiceClient::new(channel.clone())
        .subscribe_actions(proto::SubscribeActionsRequest {
            start: proto::StartFrom::Latest as i32,
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let background = tokio::spawn(super::open_loop(
        engage.addr,
        12,
        a.background_rate,
        10_000,
        false,
    ));
    // Armed over 2 s: due 3 to 5 s from now.
    let arm = {
        let channel = channel.clone();
        let count = a.precision_timers;
        tokio::spawn(async move {
            let per = 2_000 / count.max(1);
            for i in 0..count {
                carts(&channel, &format!("q{i}-"), 1).await;
                tokio::time::sleep(Duration::from_millis(per)).await;
            }
        })
    };
    let mut late = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut early = 0;
    for _ in 0..a.precision_timers {
        let action = tokio::time::timeout(Duration::from_secs(30), actions.message())
            .await
            .expect("a timer did not fire within 30 s")
            .expect("stream")
            .expect("open");
        let (Some(e), Some(fired)) = (action.event.as_ref(), action.fired_at) else {
            continue;
        };
        let occurred = e.occurred_at.unwrap_or_default();
        let due_ns = (occurred.seconds + 3) as i128 * 1_000_000_000 + occurred.nanos as i128;
        let fired_ns = fired.seconds as i128 * 1_000_000_000 + fired.nanos as i128;
        let late_us = (fired_ns - due_ns) / 1000;
        if late_us < 0 {
            early += 1;
        } else {
            let _ = late.record(late_us.max(1) as u64);
        }
    }
    arm.await.expect("arming");
    let _ = background.await;
    println!(
        "timer lateness under {} events/s ({} timers): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; fired early: {early}",
        a.background_rate,
        a.precision_timers,
        late.value_at_quantile(0.5) as f64 / 1000.0,
        late.value_at_quantile(0.99) as f64 / 1000.0,
        late.max() as f64 / 1000.0
    );
}
