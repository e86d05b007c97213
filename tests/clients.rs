//! Clients that no one here wrote, against a real server (SPEC §7): the official Segment SDKs for
//! Python and Node.js and RudderStack's Python SDK sending over the Segment API, and the browser
//! snippet in Debian's headless Chromium driven over WebDriver. `tests/clients/install.sh`
//! installs them, pinned, on first use (apt-get, a venv, npm ci).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use engage::proto;
use engage::proto::attribute_value::Value as V;
use serde_json::{json, Value as Json};
use tokio::net::TcpListener;

/// Where install.sh put the SDKs (once per test binary; Chromium is installed system-wide).
fn tools() -> &'static Path {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("clients");
        let status = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/install.sh"))
            .arg(&dir)
            .status()
            .expect("run tests/clients/install.sh");
        assert!(status.success(), "tests/clients/install.sh failed: {status}");
        dir
    })
}

fn script(name: &str) -> String {
    format!("{}/tests/clients/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// What an SDK script reports: the HTTP statuses it got, its body encodings, its errors.
#[derive(Debug)]
struct SdkRun {
    statuses: BTreeMap<String, u64>,
    encodings: Vec<String>,
    errors: Vec<String>,
}

/// Runs an SDK script to its end (it flushes before it exits).
async fn run_sdk(program: PathBuf, args: Vec<String>) -> SdkRun {
    let mut command = tokio::process::Command::new(&program);
    command.args(&args).kill_on_drop(true);
    // A hang is a failure, not a wait: the SDKs retry for hours by default.
    let out = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .unwrap_or_else(|_| panic!("{program:?} {args:?} did not finish"))
        .expect("run the SDK");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{program:?} failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no report from {program:?}: {stdout}"));
    SdkRun {
        statuses: serde_json::from_value(report["statuses"].clone()).unwrap(),
        encodings: serde_json::from_value(report["encodings"].clone()).unwrap(),
        errors: serde_json::from_value(report["errors"].clone()).unwrap(),
    }
}

const TICKS: usize = 18;

/// A server whose ingest key may send 4 events a second, 10 at once: the SDKs' batches of 5 get
/// 429 with Retry-After and must retry.
async fn rate_limited_server() -> (TestServer, tempfile::TempDir, String, String, String) {
    keyed_server(|a| {
        a.ingest_rate_per_key = 4;
        a.ingest_burst = 10;
    })
    .await
}

/// The types the SDK scripts' properties are coerced to (undefined ones would be STRING, §2).
async fn define_schema(server: &TestServer, admin: &str) {
    define_keyed(server, admin, "price", proto::AttributeType::Number).await;
    define_keyed(server, admin, "gift", proto::AttributeType::Boolean).await;
    define_keyed(server, admin, "n", proto::AttributeType::Number).await;
}

/// Every call of the SDK script landed once, typed by the schema, and nothing else did.
async fn check_sdk_events(server: &TestServer, read: &str, user: &str, run: &SdkRun) {
    assert!(run.errors.is_empty(), "the SDK reported errors: {run:?}");
    assert!(run.statuses.get("200").copied().unwrap_or(0) >= 1, "{run:?}");
    assert!(
        run.statuses.get("429").copied().unwrap_or(0) >= 1,
        "the rate limit never answered 429, so no retry was tested: {run:?}"
    );
    assert_eq!(
        run.statuses.keys().collect::<Vec<_>>(),
        ["200", "429"],
        "only successes and rate-limit answers: {run:?}"
    );

    let events = events_of(server, read, user).await;
    let named = |name: &str| events.iter().filter(|e| e.name == name).collect::<Vec<_>>();
    // identify, group and alias are answered and not stored.
    assert_eq!(events.len(), 1 + TICKS + 2, "{events:#?}");

    let order = named("order_completed");
    assert_eq!(order.len(), 1, "{events:#?}");
    let order = order[0];
    assert_eq!(order.event_id, format!("{user}-order"));
    assert_eq!(order.occurred_at, Some(ts(1_795_170_600)), "2026-11-20T10:30:00Z");
    assert_eq!(number(order, "price"), Some(39.0), "\"39\" typed by the schema");
    assert_eq!(
        string(order, "product_id").as_deref(),
        Some("p-1"),
        "normalized name"
    );
    assert_eq!(
        order.attributes["gift"].value,
        Some(V::BoolValue(true)),
        "{order:?}"
    );
    match &order.attributes["items"].value {
        Some(V::JsonValue(j)) => {
            assert_eq!(serde_json::from_str::<Json>(j).unwrap(), json!([{"sku": "a"}]))
        }
        other => panic!("items is not JSON: {other:?}"),
    }
    assert!(!order.attributes.contains_key("coupon"), "null is skipped");

    let ticks = named("tick");
    let mut seen: Vec<(String, f64)> = ticks
        .iter()
        .map(|e| (e.event_id.clone(), number(e, "n").expect("n is a number")))
        .collect();
    seen.sort_by(|a, b| a.1.total_cmp(&b.1));
    let expected: Vec<(String, f64)> = (0..TICKS)
        .map(|i| (format!("{user}-tick-{i}"), i as f64))
        .collect();
    assert_eq!(seen, expected, "every tick once, retried batches included");

    let page = named("page_viewed");
    assert_eq!(page.len(), 1, "{events:#?}");
    assert_eq!(string(page[0], "name").as_deref(), Some("Pricing"));
    assert_eq!(string(page[0], "category").as_deref(), Some("Docs"));
    assert_eq!(
        string(page[0], "url").as_deref(),
        Some("https://example.com/pricing")
    );
    let screen = named("screen_viewed");
    assert_eq!(screen.len(), 1, "{events:#?}");
    assert_eq!(string(screen[0], "name").as_deref(), Some("Home"));
    assert_eq!(string(screen[0], "orientation").as_deref(), Some("portrait"));

    // Without a userId the anonymousId is the user.
    let anon = events_of(server, read, &format!("{user}-anon")).await;
    assert_eq!(anon.len(), 1, "{anon:#?}");
    assert_eq!(anon[0].name, "signed_up");
    assert_eq!(string(&anon[0], "source").as_deref(), Some("sdk"));
}

async fn python_sdk(sdk: &str, user: &str) -> (TestServer, String, SdkRun) {
    let python = tools().join("venv/bin/python");
    let (server, _dir, ingest, read, admin) = rate_limited_server().await;
    define_schema(&server, &admin).await;
    let run = run_sdk(
        python,
        vec![
            script("python_sdk.py"),
            sdk.into(),
            format!("http://{}", server.addr),
            ingest,
            user.into(),
            TICKS.to_string(),
        ],
    )
    .await;
    (server, read, run)
}

#[tokio::test(flavor = "multi_thread")]
async fn segment_python_sdk_events_land_typed_once_through_gzip_and_retries() {
    let (server, read, run) = python_sdk("segment", "py-user").await;
    assert_eq!(run.encodings, ["gzip"], "the SDK was told to gzip");
    check_sdk_events(&server, &read, "py-user", &run).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rudderstack_python_sdk_events_land_typed_once() {
    let (server, read, run) = python_sdk("rudder", "rudder-user").await;
    assert_eq!(run.encodings, ["gzip"], "this SDK gzips by default");
    check_sdk_events(&server, &read, "rudder-user", &run).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn segment_node_sdk_events_land_typed_once_through_retries() {
    let node_modules = tools().join("node/node_modules");
    let (server, _dir, ingest, read, admin) = rate_limited_server().await;
    define_schema(&server, &admin).await;
    let run = {
        // An ES module finds packages from its own folder up: the script goes next to them.
        let copy = node_modules.with_file_name("node_sdk.mjs");
        std::fs::copy(script("node_sdk.mjs"), &copy).expect("copy node_sdk.mjs");
        run_sdk(
            PathBuf::from("node"),
            vec![
                copy.to_string_lossy().into_owned(),
                format!("http://{}", server.addr),
                ingest,
                "node-user".into(),
                TICKS.to_string(),
            ],
        )
        .await
    };
    check_sdk_events(&server, &read, "node-user", &run).await;
}

/// A WebDriver session on Debian's chromedriver and headless Chromium.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        tools();
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        let port = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("ChromeDriver was started successfully on port ")
                    .map(|p| p.trim_end_matches('.').to_string())
            })
            .expect("chromedriver's port");
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            _profile: profile,
        };
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let answer = browser.call(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
            }}}),
        );
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        browser
    }

    /// One WebDriver command; answers its `value`.
    fn call(&self, method: &str, path: &str, body: Json) -> Json {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string().into_bytes())
            .unwrap();
        let mut response = agent.run(request).expect("webdriver call");
        let status = response.status();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let json: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        json["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Json) -> Json {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    fn click(&self, css: &str) {
        let element = self.session_call("POST", "/element", json!({"using": "css selector", "value": css}));
        let id = element
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {element}"))
            .to_string();
        self.session_call("POST", &format!("/element/{id}/click"), json!({}));
    }

    /// Runs `body` as a function in the page; answers what it returns.
    fn run(&self, body: &str) -> Json {
        self.session_call("POST", "/execute/sync", json!({"script": body, "args": []}))
    }

    /// Opens a tab and switches to it.
    fn new_tab(&self) {
        let tab = self.session_call("POST", "/window/new", json!({"type": "tab"}));
        self.session_call("POST", "/window", json!({"handle": tab["handle"]}));
    }

    /// Closes the current tab and switches to the one left.
    fn close_tab(&self) {
        let left = self.session_call("DELETE", "/window", json!({}));
        self.session_call("POST", "/window", json!({"handle": left[0]}));
    }

    /// The requests this page made to `/v1/batch` (resource timing, whose entry comes once a
    /// body is read to its end, a moment after the snippet saw the answer; preflights are not
    /// in it).
    fn batch_requests(&self) -> u64 {
        self.run("return performance.getEntriesByType('resource').filter(e => e.name.endsWith('/v1/batch')).length")
            .as_u64()
            .expect("a count")
    }

    /// Events the snippet still holds (sent ones leave its localStorage queue).
    fn queued(&self) -> u64 {
        self.run("return JSON.parse(localStorage.getItem('engage_queue') || '[]').length")
            .as_u64()
            .expect("queue length")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.call("DELETE", &format!("/session/{}", self.session), json!({}))
            }));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Serves `html` to every request on `listener`: the web site, on an origin of its own.
fn serve_page(listener: std::net::TcpListener, html: String) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let _ = std::io::Write::write_all(
                &mut stream,
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                    html.len()
                )
                .as_bytes(),
            );
        }
    });
}

/// The product's own example, with the snippet in place of its script.
fn shop_page(engage: SocketAddr, key: &str) -> String {
    format!(
        r##"<!doctype html>
<html><head>
<script src="http://{engage}/snippet.js"></script>
<script>engage.init({{key: "{key}", host: "http://{engage}"}});</script>
</head><body>
<a href="#" id="look" onclick="engage('event.page_opened')">LOOK</a>
<a href="#" id="buy" onclick="engage('event.name_your_event_here', {{'price': '10'}})">CLICK ME!</a>
</body></html>"##
    )
}

/// A browser on a shop page (its own origin, allowed by CORS) and a keyed server.
struct Shop {
    browser: Browser,
    url: String,
    args: engage::config::ServeArgs,
    server: TestServer,
    read: String,
    _keys: tempfile::TempDir,
}

async fn shop() -> Shop {
    shop_with(|_| {}).await
}

async fn shop_with(edit: impl FnOnce(&mut engage::config::ServeArgs)) -> Shop {
    let site = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://{}", site.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let ingest = create_key(&keys, "site", "ingest");
    let read = create_key(&keys, "worker", "read");
    let admin = create_key(&keys, "ops", "admin");
    let data = tempfile::tempdir().unwrap();
    let mut args = common::args(data.path());
    args.api_keys_file = Some(keys);
    args.cors_allowed_origins = origin.clone();
    edit(&mut args);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TestServer::start_on(listener, data, args.clone());
    define_keyed(&server, &admin, "price", proto::AttributeType::Number).await;
    serve_page(site, shop_page(server.addr, &ingest));
    let browser = tokio::task::block_in_place(Browser::start);
    Shop {
        browser,
        url: format!("{origin}/shop.html"),
        args,
        server,
        read,
        _keys: dir,
    }
}

/// Waits until the snippet has sent everything it queued (a minute at most).
async fn wait_until_sent(b: &Browser) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::task::block_in_place(|| b.queued()) != 0 {
        assert!(Instant::now() < deadline, "the snippet never emptied its queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `user` has `n` events (a minute at most).
async fn wait_for_events(server: &TestServer, key: &str, user: &str, n: usize) -> Vec<proto::Event> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = events_of(server, key, user).await;
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snippet_click_becomes_a_typed_event_and_identify_switches_the_user() {
    let shop = shop().await;
    let b = &shop.browser;
    tokio::task::block_in_place(|| {
        b.goto(&shop.url);
        b.click("#look");
        b.run("engage.identify('visitor-1')");
        b.click("#buy");
        // Leaving the page at once: the pagehide flush (keepalive) must still deliver.
        b.goto("about:blank");
    });
    let events = wait_for_events(&shop.server, &shop.read, "visitor-1", 1).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].name, "name_your_event_here", "event. is stripped");
    assert_eq!(
        number(&events[0], "price"),
        Some(10.0),
        "'10' is a NUMBER after DefineAttribute: {:?}",
        events[0]
    );
    let anonymous = tokio::task::block_in_place(|| {
        b.goto(&shop.url);
        b.run("return localStorage.getItem('engage_anonymous_id')")
    });
    let anonymous = anonymous.as_str().expect("an anonymous id").to_string();
    let before = wait_for_events(&shop.server, &shop.read, &anonymous, 1).await;
    assert_eq!(before.len(), 1, "{before:#?}");
    assert_eq!(
        before[0].name, "page_opened",
        "before identify the anonymous id is the user"
    );
    // The page that sent them at pagehide never saw the answer, so they were still queued: this
    // page sent them again, and the messageIds made that store nothing.
    wait_until_sent(b).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::task::block_in_place(|| b.batch_requests()) == 0 {
        assert!(Instant::now() < deadline, "the queued events were not sent again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(events_of(&shop.server, &shop.read, "visitor-1").await.len(), 1);
    assert_eq!(events_of(&shop.server, &shop.read, &anonymous).await.len(), 1);
}

/// A server stopped, its port held by a listener that closes every connection at once (so a
/// browser's requests fail as against a dead host) and counts them.
struct Outage {
    data: tempfile::TempDir,
    attempts: tokio::sync::mpsc::UnboundedReceiver<()>,
    /// Ends the holder, which hands its listener back (no rebind: another socket could take
    /// the port in between).
    stop: tokio::sync::oneshot::Sender<()>,
    holder: tokio::task::JoinHandle<TcpListener>,
}

impl Outage {
    async fn begin(server: TestServer) -> Self {
        let addr = server.addr;
        let data = server.stop().await;
        let down = TcpListener::bind(addr).await.expect("hold the port");
        let (tried, attempts) = tokio::sync::mpsc::unbounded_channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let holder = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return down,
                    accepted = down.accept() => {
                        if let Ok((socket, _)) = accepted {
                            drop(socket);
                            let _ = tried.send(());
                        }
                    }
                }
            }
        });
        Outage {
            data,
            attempts,
            stop,
            holder,
        }
    }

    /// Waits for a request that failed against the dead port.
    async fn attempted(&mut self) {
        self.attempts.recv().await.expect("the snippet tried to send");
    }

    /// Starts the server again on the same port and data.
    async fn end(self, args: engage::config::ServeArgs) -> TestServer {
        let _ = self.stop.send(());
        let listener = self.holder.await.expect("the port's holder");
        TestServer::start_on(listener, self.data, args)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snippet_keeps_an_event_while_the_server_is_down_and_sends_it_once() {
    let Shop {
        browser: b,
        url,
        args,
        server,
        read,
        _keys,
    } = shop().await;
    tokio::task::block_in_place(|| {
        b.goto(&url);
        b.run("engage.identify('visitor-2')");
    });
    let mut outage = Outage::begin(server).await;
    tokio::task::block_in_place(|| b.click("#buy"));
    outage.attempted().await;
    assert_eq!(tokio::task::block_in_place(|| b.queued()), 1, "kept while down");
    let server = outage.end(args).await;
    let events = wait_for_events(&server, &read, "visitor-2", 1).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(number(&events[0], "price"), Some(10.0));
    // Sent: the snippet's queue empties; nothing is left to send twice.
    wait_until_sent(&b).await;
    // One more flush of anything left must not store the event again.
    tokio::task::block_in_place(|| b.run("engage.flush()"));
    let events = events_of(&server, &read, "visitor-2").await;
    assert_eq!(events.len(), 1, "exactly once: {events:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn snippet_sends_a_burst_in_batches_of_twenty() {
    let shop = shop().await;
    let b = &shop.browser;
    tokio::task::block_in_place(|| {
        b.goto(&shop.url);
        b.run("engage.identify('visitor-3'); for (let i = 0; i < 100; i++) engage('event.burst', {n: String(i)});");
    });
    let events = wait_for_events(&shop.server, &shop.read, "visitor-3", 100).await;
    assert_eq!(events.len(), 100);
    wait_until_sent(b).await;
    let posts = || tokio::task::block_in_place(|| b.batch_requests());
    let deadline = Instant::now() + Duration::from_secs(60);
    while posts() < 5 {
        assert!(Instant::now() < deadline, "fewer than 5 requests");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(posts(), 5, "100 events in 5 batches of 20");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tabs_queue_apart_and_a_closed_tab_loses_nothing() {
    let Shop {
        browser: b,
        url,
        args,
        server,
        read,
        _keys,
    } = shop().await;
    tokio::task::block_in_place(|| {
        b.goto(&url);
        b.run("engage.identify('visitor-4')");
        b.new_tab();
        b.goto(&url);
    });
    let mut outage = Outage::begin(server).await;
    // Both tabs queue an event while the server is down; the second tab's write to the shared
    // queue must not drop the first one's.
    tokio::task::block_in_place(|| b.click("#look"));
    outage.attempted().await;
    tokio::task::block_in_place(|| {
        b.close_tab();
        b.click("#buy");
    });
    let server = outage.end(args).await;
    let events = wait_for_events(&server, &read, "visitor-4", 1).await;
    assert_eq!(events.len(), 1, "the open tab's event: {events:#?}");
    // The closed tab's event waits in storage for the next page of the site.
    tokio::task::block_in_place(|| b.goto(&url));
    let events = wait_for_events(&server, &read, "visitor-4", 2).await;
    let mut names: Vec<_> = events.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["name_your_event_here", "page_opened"], "{events:#?}");
    wait_until_sent(&b).await;
    assert_eq!(events_of(&server, &read, "visitor-4").await.len(), 2, "each once");
}

#[tokio::test(flavor = "multi_thread")]
async fn snippet_splits_batches_the_server_finds_too_large() {
    // Each call may carry at most 6 events: the snippet's batches of 20 are refused (400) until
    // it sends smaller ones.
    let shop = shop_with(|a| {
        a.ingest_rate_per_key = 10_000;
        a.ingest_burst = 6;
    })
    .await;
    let b = &shop.browser;
    tokio::task::block_in_place(|| {
        b.goto(&shop.url);
        b.run("engage.identify('visitor-5'); for (let i = 0; i < 20; i++) engage('event.burst', {n: String(i)});");
    });
    let events = wait_for_events(&shop.server, &shop.read, "visitor-5", 20).await;
    assert_eq!(events.len(), 20, "none dropped: {events:#?}");
}

/// Every command of README's walkthrough, as written, with the real grpcurl 1.8.6 (reflection
/// v1alpha) and curl, against the engage binary (scripts/check-readme).
#[test]
fn readme_walkthrough_runs_with_the_real_grpcurl() {
    let tools = tools();
    // A free port for the script's server (it binds the port itself).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new("bash")
        .arg(script("../../scripts/check-readme"))
        .env("ENGAGE_BIN", env!("CARGO_BIN_EXE_engage"))
        .env("ENGAGE_README_PORT", port.to_string())
        .env("ENGAGE_CLIENTS_DIR", tools)
        .output()
        .expect("run scripts/check-readme");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("every README command succeeded"),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
