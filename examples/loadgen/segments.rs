//! The segments benchmark: the same 1M events in engage and in PostgreSQL 15, the five
//! example filters and the 24-hour hourly chart timed in both, reported as engage/PostgreSQL.
//!
//! ```text
//! cargo build --release --bin engage --example loadgen
//! target/release/examples/loadgen segments
//! ```
//!
//! The dataset is generated here (deterministic, seed `--seed`): `--users` users `u000000`...,
//! `--events` events uniform over the 30 days before AS_OF = 2026-11-01T00:00:00Z, 10 event names
//! (product_purchased: product, category, color, price; payment: amount, method; cart_added:
//! product, category, price; 7 others with a page). The events are written as CSV for
//! `bench/pg/run.sh` (which loads them into a throwaway PostgreSQL 15 cluster with the indexes
//! a competent user would create, see `bench/pg/indexes.sql`, then again with the covering
//! indexes of `bench/pg/covering.sql`) and sent to a fresh engage, 1000 per TrackEvents, 4 calls
//! in flight: in time order, or with `--shuffled` in random order (late arrivals at their
//! worst). After the load: the data directory's bytes and the server's memory. Every query is
//! then called once (its first call, timed), 2 times untimed and 7 times timed in each system
//! (client wall time: gRPC over loopback for engage, psql over a Unix socket for PostgreSQL);
//! medians are compared. `--restart` stops engage and measures its start, its idle memory and
//! the queries once more. Both systems' totals are printed side by side: they must agree.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use engage::proto;
use engage::proto::condition::Kind;
use engage::proto::query_service_client::QueryServiceClient;

/// 2026-11-01T00:00:00Z.
pub(crate) const AS_OF: i64 = 1_793_491_200;
pub(crate) const SPAN: i64 = 30 * 86_400;

#[derive(clap::Args, Clone)]
pub struct SegmentArgs {
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to write the CSV for PostgreSQL.
    #[arg(long, default_value = "/tmp/engage-segments.csv")]
    csv: PathBuf,
    /// Skip PostgreSQL (engage figures only).
    #[arg(long)]
    no_pg: bool,
    /// Only load the events into engage and report the ingest rate (works with binaries that
    /// predate QueryService, for comparing ingest).
    #[arg(long)]
    load_only: bool,
    /// After the load, measure a backup of the loaded server (`engage backup`) while ingest
    /// goes on: its time and size, and ingest before and during it.
    #[arg(long)]
    backup: bool,
    /// Send the events in random order instead of time order (late arrivals, backfills).
    #[arg(long)]
    shuffled: bool,
    /// After the queries, stop the server (SIGTERM), start it again on the same data and
    /// measure the first calls and the medians once more.
    #[arg(long)]
    restart: bool,
    /// Keep engage's data directory (its path is printed) instead of removing it at the end.
    #[arg(long, conflicts_with = "restart")]
    keep_data: bool,
    #[arg(long, default_value = "target/release/engage")]
    engage_bin: PathBuf,
}

/// splitmix64: a tiny deterministic generator (the dataset must be the same on every run).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
    /// A price-like number with two decimals in [lo, hi).
    fn money(&mut self, lo: u64, hi: u64) -> f64 {
        (lo * 100 + self.below((hi - lo) * 100)) as f64 / 100.0
    }
}

const NAMES: [&str; 10] = [
    "product_purchased",
    "payment",
    "cart_added",
    "page_viewed",
    "signup",
    "login",
    "search",
    "wishlist_added",
    "review_posted",
    "refund",
];

#[derive(Clone)]
enum Attr {
    S(String),
    N(f64),
}

#[derive(Clone)]
pub(crate) struct Generated {
    pub(crate) id: String,
    user: String,
    name: &'static str,
    pub(crate) at: i64,
    attrs: Vec<(&'static str, Attr)>,
}

fn generate(a: &SegmentArgs) -> Vec<Generated> {
    let mut out = generate_over(a.seed, a.events, a.users, AS_OF, SPAN);
    // Events arrive roughly in time order, as from a live source.
    out.sort_by_key(|e| e.at);
    out
}

/// `events` events of `users` users, dated uniformly over `(end - span, end]`, in generation
/// order (not sorted).
pub(crate) fn generate_over(seed: u64, events: u64, users: u64, end: i64, span: i64) -> Vec<Generated> {
    let mut rng = Rng(seed);
    let cats = ["shoes", "shirts", "hats", "bags", "socks"];
    let colors = ["blue", "red", "green", "black", "white"];
    let methods = ["card", "paypal", "bank", "apple_pay"];
    (0..events)
        .map(|i| {
            let user = format!("u{:06}", rng.below(users));
            let name = NAMES[rng.below(10) as usize];
            let at = end - rng.below(span as u64) as i64;
            let attrs = match name {
                "product_purchased" => vec![
                    ("product", Attr::S(format!("p{:04}", rng.below(1000)))),
                    ("category", Attr::S(rng.pick(&cats).into())),
                    ("color", Attr::S(rng.pick(&colors).into())),
                    ("price", Attr::N(rng.money(5, 300))),
                ],
                "payment" => vec![
                    ("amount", Attr::N(rng.money(1, 1000))),
                    ("method", Attr::S(rng.pick(&methods).into())),
                ],
                "cart_added" => vec![
                    ("product", Attr::S(format!("p{:04}", rng.below(1000)))),
                    ("category", Attr::S(rng.pick(&cats).into())),
                    ("price", Attr::N(rng.money(5, 300))),
                ],
                _ => vec![("page", Attr::S(format!("/page/{}", rng.below(500))))],
            };
            Generated {
                id: format!("e{i:08}"),
                user,
                name,
                at,
                attrs,
            }
        })
        .collect()
}

fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub(crate) fn write_csv<'a>(
    events: impl IntoIterator<Item = &'a Generated>,
    path: &PathBuf,
) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "event_id,user_id,name,occurred_at,attributes")?;
    for e in events {
        let mut json = serde_json::Map::new();
        for (k, v) in &e.attrs {
            let v = match v {
                Attr::S(s) => serde_json::Value::String(s.clone()),
                Attr::N(n) => serde_json::json!(n),
            };
            json.insert(k.to_string(), v);
        }
        let json = serde_json::Value::Object(json).to_string().replace('"', "\"\"");
        writeln!(f, "{},{},{},{},\"{json}\"", e.id, e.user, e.name, rfc3339(e.at))?;
    }
    f.flush()
}

pub(crate) fn wire(e: &Generated) -> proto::Event {
    proto::Event {
        event_id: e.id.clone(),
        user_id: e.user.clone(),
        name: e.name.into(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: e.at,
            nanos: 0,
        }),
        attributes: e
            .attrs
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Attr::S(s) => proto::attribute_value::Value::StringValue(s.clone()),
                    Attr::N(n) => proto::attribute_value::Value::NumberValue(*n),
                };
                (k.to_string(), proto::AttributeValue { value: Some(value) })
            })
            .collect(),
        ..Default::default()
    }
}

fn history(
    name: &str,
    filter: Option<proto::Condition>,
    agg: proto::Aggregate,
    attr: &str,
    op: proto::Operator,
    value: f64,
    within_days: i64,
) -> proto::Condition {
    proto::Condition {
        kind: Some(Kind::History(Box::new(proto::HistoryCondition {
            event_name: name.into(),
            r#where: filter.map(Box::new),
            aggregate: agg as i32,
            attribute: attr.into(),
            op: op as i32,
            value,
            within: (within_days > 0).then(|| prost_types::Duration {
                seconds: within_days * 86_400,
                nanos: 0,
            }),
        }))),
    }
}

fn attr(name: &str, op: proto::Operator, value: proto::attribute_value::Value) -> proto::Condition {
    proto::Condition {
        kind: Some(Kind::Attribute(proto::AttributeCondition {
            attribute: name.into(),
            op: op as i32,
            value: Some(proto::AttributeValue { value: Some(value) }),
            values: vec![],
        })),
    }
}

fn all(conditions: Vec<proto::Condition>) -> proto::Condition {
    proto::Condition {
        kind: Some(Kind::All(proto::ConditionList { conditions })),
    }
}

fn not(c: proto::Condition) -> proto::Condition {
    proto::Condition {
        kind: Some(Kind::Not(Box::new(c))),
    }
}

/// The five example filters of the README (segments section).
pub fn filters() -> Vec<(&'static str, &'static str, proto::Condition)> {
    use proto::attribute_value::Value as V;
    use proto::Aggregate as A;
    use proto::Operator as O;
    vec![
        (
            "q1",
            "bought more than five products",
            history("product_purchased", None, A::Count, "", O::Gt, 5.0, 0),
        ),
        (
            "q2",
            "one payment over 500",
            history(
                "payment",
                Some(attr("amount", O::Gt, V::NumberValue(500.0))),
                A::Count,
                "",
                O::Gte,
                1.0,
                0,
            ),
        ),
        (
            "q3",
            "bought blue shoes over $150 this week",
            history(
                "product_purchased",
                Some(all(vec![
                    attr("color", O::Eq, V::StringValue("blue".into())),
                    attr("category", O::Eq, V::StringValue("shoes".into())),
                    attr("price", O::Gt, V::NumberValue(150.0)),
                ])),
                A::Count,
                "",
                O::Gte,
                1.0,
                7,
            ),
        ),
        (
            "q4",
            "added to cart but bought nothing in 3 days",
            all(vec![
                history("cart_added", None, A::Count, "", O::Gte, 1.0, 3),
                not(history("product_purchased", None, A::Count, "", O::Gte, 1.0, 3)),
            ]),
        ),
        (
            "q5",
            "spent over 1000 in total",
            history("payment", None, A::Sum, "amount", O::Gt, 1000.0, 0),
        ),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn time<F, Fut, T>(mut f: F) -> (f64, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    for _ in 0..2 {
        f().await;
    }
    let mut runs = Vec::new();
    let mut last = None;
    for _ in 0..7 {
        let t = Instant::now();
        last = Some(f().await);
        runs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (median(runs), last.expect("seven runs"))
}

/// One query's figures in one system.
#[derive(Clone, Copy, Default)]
pub(crate) struct Timed {
    /// The first call (for engage: the first after a load or a restart).
    pub(crate) first_ms: f64,
    /// The median of the timed calls (after warm-up).
    pub(crate) median_ms: f64,
    pub(crate) total: u64,
}

/// Every query once (each one's first call), then each one timed (see [`time`]).
pub(crate) async fn measure(
    channel: &tonic::transport::Channel,
    schema: &mut proto::schema_service_client::SchemaServiceClient<tonic::transport::Channel>,
    as_of_secs: i64,
) -> HashMap<&'static str, Timed> {
    let client = QueryServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let as_of = Some(prost_types::Timestamp {
        seconds: as_of_secs,
        nanos: 0,
    });
    let filter_call = |filter: proto::Condition| {
        let mut c = client.clone();
        async move {
            c.filter_users(proto::FilterUsersRequest {
                filter: Some(filter),
                as_of,
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .expect("filter users")
            .into_inner()
            .total_count
        }
    };
    let stats_call = || {
        let mut c = client.clone();
        async move {
            let r = c
                .get_event_stats(proto::GetEventStatsRequest {
                    event_name: "product_purchased".into(),
                    from: Some(prost_types::Timestamp {
                        seconds: as_of_secs - 86_400,
                        nanos: 0,
                    }),
                    to: as_of,
                    granularity: proto::Granularity::Hour as i32,
                    aggregate: proto::Aggregate::Count as i32,
                    attribute: String::new(),
                })
                .await
                .expect("stats")
                .into_inner();
            assert_eq!(r.buckets.len(), 24);
            r.total as u64
        }
    };
    let mut out: HashMap<&'static str, Timed> = HashMap::new();
    // First calls, in order: the first all-history query of a name may find its rollup missing.
    for (id, _, filter) in filters() {
        let t = Instant::now();
        filter_call(filter).await;
        out.entry(id).or_default().first_ms = t.elapsed().as_secs_f64() * 1000.0;
    }
    let t = Instant::now();
    stats_call().await;
    out.entry("stats24h").or_default().first_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Steady state: wait for the writer to get past whatever those calls queued (a
    // DefineAttribute is answered by the writer after every job queued before it).
    schema
        .define_attribute(proto::DefineAttributeRequest {
            name: "price".into(),
            r#type: proto::AttributeType::Number as i32,
            description: String::new(),
        })
        .await
        .expect("define attribute");
    for (id, _, filter) in filters() {
        let (ms, total) = time(|| filter_call(filter.clone())).await;
        let e = out.entry(id).or_default();
        e.median_ms = ms;
        e.total = total;
    }
    let (ms, total) = time(stats_call).await;
    let e = out.entry("stats24h").or_default();
    e.median_ms = ms;
    e.total = total;
    out
}

/// The bytes of every file under `dir`: (apparent, allocated on disk).
pub(crate) fn disk_bytes(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = entry.metadata() else { continue };
        if m.is_dir() {
            let (a, b) = disk_bytes(&entry.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + m.len(), total.1 + m.blocks() * 512);
        }
    }
    total
}

/// Asks engage to stop (SIGTERM, as an operator would) and waits for it.
fn stop(engage: &mut super::Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &engage.child.id().to_string()])
        .status();
    let _ = engage.child.wait();
}

pub(crate) async fn define_numbers(
    schema: &mut proto::schema_service_client::SchemaServiceClient<tonic::transport::Channel>,
) {
    // Numbers must be defined as NUMBER: an undefined attribute is created as STRING.
    for name in ["price", "amount"] {
        schema
            .define_attribute(proto::DefineAttributeRequest {
                name: name.into(),
                r#type: proto::AttributeType::Number as i32,
                description: String::new(),
            })
            .await
            .expect("define attribute");
    }
}

pub async fn run(a: SegmentArgs) {
    let t = Instant::now();
    let mut events = generate(&a);
    if a.shuffled {
        // Late arrivals at their worst: every event at a random point of the load.
        let mut rng = Rng(a.seed ^ 0x5eed);
        for i in (1..events.len()).rev() {
            events.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let order = if a.shuffled { "shuffled" } else { "time order" };
    eprintln!("generated {} events in {:.1?}", events.len(), t.elapsed());
    if !a.no_pg && !a.load_only {
        write_csv(&events, &a.csv).expect("write csv");
    }
    let mut engage = super::start_engage(&a.engage_bin);
    let channel = super::channel(engage.addr).await;
    let ingest = proto::event_service_client::EventServiceClient::new(channel.clone())
        .max_decoding_message_size(64 << 20);
    let mut schema = proto::schema_service_client::SchemaServiceClient::new(channel.clone());
    define_numbers(&mut schema).await;
    let t = Instant::now();
    let batches: Vec<Vec<proto::Event>> = events
        .chunks(1000)
        .map(|c| c.iter().map(wire).collect())
        .collect();
    let mut in_flight = Vec::new();
    let mut sent = 0u64;
    for batch in batches {
        sent += batch.len() as u64;
        in_flight.push(send_batch(&ingest, batch));
        if in_flight.len() == 4 {
            in_flight.remove(0).await.expect("load task");
        }
    }
    for task in in_flight {
        task.await.expect("load task");
    }
    let load = t.elapsed();
    println!(
        "engage load: {sent} events in {:.1} s = {:.0} events/s (TrackEvents of 1000, 4 in flight, {order})",
        load.as_secs_f64(),
        sent as f64 / load.as_secs_f64()
    );
    let data_dir = engage.data_dir().expect("the server's data directory");
    let (apparent, allocated) = disk_bytes(&data_dir);
    println!(
        "engage data directory after the load: {:.0} MB ({:.0} bytes per event; {:.0} MB allocated); server RSS {:.0} MB",
        apparent as f64 / 1e6,
        apparent as f64 / sent as f64,
        allocated as f64 / 1e6,
        super::rss_kib(engage.child.id()) as f64 / 1024.0
    );
    if a.keep_data {
        if let Some(dir) = engage._dir.take() {
            println!("engage data directory kept: {}", dir.keep().display());
        }
    }
    if a.backup {
        measure_backup(&a, &engage, &ingest, &events).await;
    }
    if a.load_only || a.backup {
        return;
    }
    let loaded = measure(&channel, &mut schema, AS_OF).await;
    let mut restarted = None;
    if a.restart {
        drop((ingest, channel, schema));
        restarted = Some(restart_and_measure(engage, &a.engage_bin, AS_OF, sent).await);
    } else {
        drop(engage);
    }
    let mut pg = Pg::default();
    if !a.no_pg {
        pg = run_pg(&a.csv, None);
        if let Some(total) = pg.table_bytes {
            println!(
                "engage data directory / PostgreSQL table + indexes: {:.2}",
                apparent as f64 / total
            );
        }
    }
    print_table(order, &loaded, restarted.as_ref(), &pg);
}

/// Sends one TrackEvents batch in a task of its own; the task panics if an event is refused.
pub(crate) fn send_batch(
    ingest: &proto::event_service_client::EventServiceClient<tonic::transport::Channel>,
    events: Vec<proto::Event>,
) -> tokio::task::JoinHandle<()> {
    let mut client = ingest.clone();
    tokio::spawn(async move {
        let r = client
            .track_events(proto::TrackEventsRequest { events })
            .await
            .expect("track events")
            .into_inner();
        assert!(r.results.iter().all(|r| r.accepted), "an event was rejected");
    })
}

/// Stops `engage` (SIGTERM; its clients must be dropped), starts it again on its data
/// directory and measures the queries as of `as_of`, printing the time from start to serving,
/// the idle RSS and the directory's size after the stop (per event of `events`).
pub(crate) async fn restart_and_measure(
    mut engage: super::Proc,
    bin: &PathBuf,
    as_of: i64,
    events: u64,
) -> HashMap<&'static str, Timed> {
    stop(&mut engage);
    let dir = engage._dir.take().expect("data dir");
    drop(engage);
    let (apparent, _) = disk_bytes(dir.path());
    let t = Instant::now();
    let again = super::start_engage_in(bin, dir);
    let serving = t.elapsed();
    let channel = super::channel(again.addr).await;
    let mut schema = proto::schema_service_client::SchemaServiceClient::new(channel.clone());
    let idle = super::rss_kib(again.child.id());
    println!(
        "engage restart: serving {:.0} ms after the start; RSS idle {:.0} MB; data directory {:.0} MB after the stop ({:.0} bytes per event)",
        serving.as_secs_f64() * 1000.0,
        idle as f64 / 1024.0,
        apparent as f64 / 1e6,
        apparent as f64 / events.max(1) as f64
    );
    measure(&channel, &mut schema, as_of).await
}

/// PostgreSQL's figures: per query with the general indexes and with the covering ones, and
/// its table's bytes with the general indexes.
#[derive(Default)]
pub(crate) struct Pg {
    general: HashMap<String, Timed>,
    covering: HashMap<String, Timed>,
    pub(crate) table_bytes: Option<f64>,
}

/// Runs `bench/pg/run.sh` on `csv` (queries at `as_of`, RFC 3339; its default when `None`),
/// printing its other lines.
pub(crate) fn run_pg(csv: &PathBuf, as_of: Option<&str>) -> Pg {
    let mut pg = Pg::default();
    let mut cmd = Command::new("bash");
    cmd.arg("bench/pg/run.sh").arg(csv);
    if let Some(as_of) = as_of {
        cmd.env("AS_OF", as_of);
    }
    let out = cmd.output().expect("run bench/pg/run.sh");
    assert!(
        out.status.success(),
        "bench/pg/run.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in BufReader::new(&out.stdout[..]).lines().map_while(Result::ok) {
        let Ok(j) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let (Some(q), Some(ms)) = (j["query"].as_str(), j["median_ms"].as_f64()) {
            let timed = Timed {
                first_ms: j["first_ms"].as_f64().unwrap_or(0.0),
                median_ms: ms,
                total: j["total"].as_u64().unwrap_or(0),
            };
            if j["variant"] == "covering" {
                pg.covering.insert(q.to_string(), timed);
            } else {
                pg.general.insert(q.to_string(), timed);
            }
        } else {
            if let Some(total) = j["table"]["total_bytes"].as_f64() {
                pg.table_bytes = Some(total);
            }
            println!("postgres: {line}");
        }
    }
    pg
}

/// The comparison table: engage after the load (and after a restart) against PostgreSQL.
pub(crate) fn print_table(
    order: &str,
    loaded: &HashMap<&'static str, Timed>,
    restarted: Option<&HashMap<&'static str, Timed>>,
    pg: &Pg,
) {
    let (pg, pg_covering) = (&pg.general, &pg.covering);
    let ratio = |e: f64, p: Option<f64>| match p {
        Some(p) if p > 0.0 => format!("{:.2}", e / p),
        _ => "-".into(),
    };
    let ms = |p: Option<f64>| p.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!("\nData sent in {order}. Milliseconds; ratios are engage / PostgreSQL (medians; first calls against PostgreSQL's first call).\n");
    println!("| query | engage first | engage median | PG first | PG median | PG covering median | median / PG | median / PG covering | first / PG first | engage first after restart | engage median after restart | engage total | PG total |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut names: Vec<(&str, &str)> = filters().iter().map(|(id, what, _)| (*id, *what)).collect();
    names.push(("stats24h", "products sold in the last 24 hours, per hour"));
    for (id, what) in names {
        let e = loaded[id];
        let p = pg.get(id).copied();
        let c = pg_covering.get(id).copied();
        let r = restarted.as_ref().map(|r| r[id]);
        println!(
            "| {id} {what} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            e.first_ms,
            e.median_ms,
            ms(p.map(|p| p.first_ms)),
            ms(p.map(|p| p.median_ms)),
            ms(c.map(|c| c.median_ms)),
            ratio(e.median_ms, p.map(|p| p.median_ms)),
            ratio(e.median_ms, c.map(|c| c.median_ms)),
            ratio(e.first_ms, p.map(|p| p.first_ms)),
            ms(r.map(|r| r.first_ms)),
            ms(r.map(|r| r.median_ms)),
            e.total,
            p.map_or("-".into(), |p| p.total.to_string()),
        );
    }
}

/// Ingests batches of `events` (new ids each time) for `secs`, or until `stop` turns true;
/// answers events per second.
async fn ingest_for(
    ingest: &proto::event_service_client::EventServiceClient<tonic::transport::Channel>,
    events: &[Generated],
    secs: f64,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> f64 {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut round = 0u64;
    while start.elapsed().as_secs_f64() < secs && !stop.as_ref().is_some_and(|s| *s.borrow()) {
        let batch: Vec<proto::Event> = events
            .iter()
            .skip(((round * 1000) % events.len() as u64) as usize)
            .take(1000)
            .map(|e| proto::Event {
                event_id: String::new(),
                ..wire(e)
            })
            .collect();
        sent += batch.len() as u64;
        round += 1;
        ingest
            .clone()
            .track_events(proto::TrackEventsRequest { events: batch })
            .await
            .expect("track events");
    }
    sent as f64 / start.elapsed().as_secs_f64()
}

/// What a backup of the loaded server costs: its time and size, and ingest during it.
async fn measure_backup(
    a: &SegmentArgs,
    engage: &super::Proc,
    ingest: &proto::event_service_client::EventServiceClient<tonic::transport::Channel>,
    events: &[Generated],
) {
    let before = ingest_for(ingest, events, 5.0, None).await;
    let target = tempfile::TempDir::new().expect("backup dir");
    let to = target.path().join("backup");
    let data_dir = engage.data_dir().expect("the server's data directory");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let during = {
        let ingest = ingest.clone();
        let events = events.to_vec();
        tokio::spawn(async move { ingest_for(&ingest, &events, 3600.0, Some(stop_rx)).await })
    };
    let started = Instant::now();
    let bin = a.engage_bin.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["backup", "--data-dir"])
            .arg(&data_dir)
            .arg("--to")
            .arg(&to)
            .output()
            .expect("engage backup")
    })
    .await
    .expect("backup task");
    let took = started.elapsed();
    let _ = stop_tx.send(true);
    let during = during.await.expect("ingest task");
    assert!(
        out.status.success(),
        "engage backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let description: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("backup description");
    println!(
        "backup of {} events: {:.1} s end to end ({} ms in the server, its longest slice held writes {} ms), {} keys, {:.0} MB; ingest {:.0} events/s before, {:.0} events/s while it ran ({:.2})",
        description["event_seq"],
        took.as_secs_f64(),
        description["millis"],
        description["longest_slice_ms"],
        description["keys"],
        description["bytes"].as_f64().unwrap_or(0.0) / 1e6,
        before,
        during,
        during / before
    );
}
