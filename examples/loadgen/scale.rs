//! The cost curve: 10 million events into one server, measured at every million.
//!
//! ```text
//! cargo build --release --bin engage --example loadgen
//! target/release/examples/loadgen scale                 # 10M events, PostgreSQL at 1M and 10M
//! ```
//!
//! The data set is the segments benchmark's (`segments.rs`), grown in time rather than packed:
//! `--events` events of `--users` users over `--events / 1M × 30` days ending at AS_OF, so
//! every million covers 30 days at the segments benchmark's density, as a service that has run
//! for ten months would hold. Events carry client event ids and are sent in time order except
//! `--late` of them, each sent between one hour and seven days after its date (an app flushing
//! its offline queue, a retry); 1000 per TrackEvents, 4 calls in flight.
//!
//! After every million sent: that million's ingest rate, the server's RSS and its data
//! directory's bytes per event. After the first million and at the end: the five filters and
//! the chart (first call and median), as of the end of the data sent so far. Then a restart
//! (time from start to serving, idle RSS, the queries again). PostgreSQL 15 gets the same rows
//! (`bench/pg/run.sh`): the first million's as of then, and all of them as of the end, each
//! with the general and the covering indexes.

use std::path::PathBuf;
use std::time::Instant;

use engage::proto;

use super::segments::{
    define_numbers, disk_bytes, generate_over, measure, print_table, restart_and_measure, run_pg, send_batch,
    wire, write_csv, Generated, Pg, Rng, AS_OF, SPAN,
};

#[derive(clap::Args, Clone)]
pub struct ScaleArgs {
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    /// The share of events sent late (1 hour to 7 days after their date).
    #[arg(long, default_value_t = 0.1)]
    late: f64,
    /// Events between two measurements.
    #[arg(long, default_value_t = 1_000_000)]
    step: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip PostgreSQL.
    #[arg(long)]
    no_pg: bool,
    /// Where the CSVs for PostgreSQL go (`-1m.csv` and `-all.csv` appended).
    #[arg(long, default_value = "/tmp/engage-scale")]
    csv: String,
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: PathBuf,
}

fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// One step of the load.
struct Step {
    sent: u64,
    rate: f64,
    rss_mb: f64,
    disk_bytes: u64,
}

pub async fn run(a: ScaleArgs) {
    let t = Instant::now();
    let span = SPAN * ((a.events as i64 + 999_999) / 1_000_000).max(1);
    let events = generate_over(a.seed, a.events, a.users, AS_OF, span);
    // The order of sending: by date, a late event by its date plus its delay.
    let mut rng = Rng(a.seed ^ 0x1a7e);
    let late_below = (a.late.clamp(0.0, 1.0) * 1e6) as u64;
    let mut order: Vec<(i64, u32)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let delay = if rng.below(1_000_000) < late_below {
                3600 + rng.below(7 * 86_400 - 3600) as i64
            } else {
                0
            };
            (e.at + delay, i as u32)
        })
        .collect();
    order.sort_unstable();
    let sent_order: Vec<&Generated> = order.iter().map(|(_, i)| &events[*i as usize]).collect();
    drop(order);
    eprintln!(
        "generated {} events over {} days in {:.1?}",
        events.len(),
        span / 86_400,
        t.elapsed()
    );

    let engage = super::start_engage(&a.engage_bin);
    let pid = engage.child.id();
    let data_dir = engage.data_dir().expect("the server's data directory");
    let channel = super::channel(engage.addr).await;
    let ingest = proto::event_service_client::EventServiceClient::new(channel.clone())
        .max_decoding_message_size(64 << 20);
    let mut schema = proto::schema_service_client::SchemaServiceClient::new(channel.clone());
    define_numbers(&mut schema).await;

    let mut steps: Vec<Step> = Vec::new();
    let mut at_first_step = None;
    let mut first_step_as_of = 0;
    let mut peak_rss = 0u64;
    let mut sent = 0u64;
    let mut step_start = Instant::now();
    let mut load_secs = 0.0;
    let mut latest = i64::MIN;
    for chunk in sent_order.chunks(a.step.max(1000) as usize) {
        let mut in_flight = Vec::new();
        for batch in chunk.chunks(1000) {
            latest = latest.max(batch.iter().map(|e| e.at).max().unwrap_or(latest));
            let batch: Vec<proto::Event> = batch.iter().map(|e| wire(e)).collect();
            sent += batch.len() as u64;
            in_flight.push(send_batch(&ingest, batch));
            if in_flight.len() == 4 {
                in_flight.remove(0).await.expect("load task");
                peak_rss = peak_rss.max(super::rss_kib(pid));
            }
        }
        for task in in_flight {
            task.await.expect("load task");
        }
        let secs = step_start.elapsed().as_secs_f64();
        load_secs += secs;
        let rss = super::rss_kib(pid);
        peak_rss = peak_rss.max(rss);
        let (disk, _) = disk_bytes(&data_dir);
        let step = Step {
            sent,
            rate: chunk.len() as f64 / secs,
            rss_mb: rss as f64 / 1024.0,
            disk_bytes: disk,
        };
        println!(
            "engage: {} events sent, this step {:.0} events/s, RSS {:.0} MB, data directory {:.0} MB ({:.0} bytes per event)",
            step.sent,
            step.rate,
            step.rss_mb,
            disk as f64 / 1e6,
            disk as f64 / sent as f64
        );
        steps.push(step);
        if at_first_step.is_none() {
            // The end of the hour the data sent so far reaches (the chart is of whole hours;
            // an as_of before the latest event would keep all-history filters off the rollups,
            // which answer only from their cutoff on).
            first_step_as_of = (latest.div_euclid(3600) + 1) * 3600;
            at_first_step = Some(measure(&channel, &mut schema, first_step_as_of).await);
        }
        step_start = Instant::now();
    }
    println!(
        "engage load: {sent} events in {load_secs:.1} s = {:.0} events/s; peak RSS sampled during the load {:.0} MB",
        sent as f64 / load_secs,
        peak_rss as f64 / 1024.0
    );
    let at_end = measure(&channel, &mut schema, AS_OF).await;
    let (end_disk, _) = disk_bytes(&data_dir);
    drop((ingest, channel, schema));
    let restarted = restart_and_measure(engage, &a.engage_bin, AS_OF, sent).await;

    let (mut pg_first, mut pg_all) = (Pg::default(), Pg::default());
    if !a.no_pg {
        let first: Vec<&Generated> = sent_order.iter().copied().take(a.step as usize).collect();
        let csv = PathBuf::from(format!("{}-1m.csv", a.csv));
        write_csv(first, &csv).expect("write csv");
        pg_first = run_pg(&csv, Some(&rfc3339(first_step_as_of)));
        let _ = std::fs::remove_file(&csv);
        let csv = PathBuf::from(format!("{}-all.csv", a.csv));
        write_csv(sent_order.iter().copied(), &csv).expect("write csv");
        pg_all = run_pg(&csv, None);
        let _ = std::fs::remove_file(&csv);
    }

    println!(
        "\nThe cost curve ({} events, {} users, {:.0}% late):\n",
        sent,
        a.users,
        a.late * 100.0
    );
    println!("| events sent | ingest of this step (events/s) | / first step | RSS after the step (MB) | data directory bytes per event |");
    println!("|---:|---:|---:|---:|---:|");
    let first_rate = steps.first().map_or(1.0, |s| s.rate);
    for s in &steps {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.0} |",
            s.sent,
            s.rate,
            s.rate / first_rate,
            s.rss_mb,
            s.disk_bytes as f64 / s.sent as f64
        );
    }
    if let Some(total) = pg_all.table_bytes {
        println!(
            "\nengage data directory at the end / PostgreSQL table + indexes: {:.2} ({:.0} MB / {:.0} MB)",
            end_disk as f64 / total,
            end_disk as f64 / 1e6,
            total / 1e6
        );
    }
    if let Some(first) = &at_first_step {
        println!(
            "\nAt {} events, as of {}:",
            a.step.min(sent),
            rfc3339(first_step_as_of)
        );
        print_table("time order, a share late", first, None, &pg_first);
    }
    println!("\nAt {sent} events, as of {}:", rfc3339(AS_OF));
    print_table("time order, a share late", &at_end, Some(&restarted), &pg_all);
}
