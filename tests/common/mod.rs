//! Test harness: a real engage server on a pre-bound ephemeral loopback port with a temporary
//! data directory, and the generated clients to talk to it.
#![allow(dead_code)]
// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use engage::config::ServeArgs;
use engage::proto;
use engage::proto::action_service_client::ActionServiceClient;
use engage::proto::attribute_value::Value as V;
use engage::proto::event_service_client::EventServiceClient;
use engage::proto::schema_service_client::SchemaServiceClient;
use engage::proto::trigger_service_client::TriggerServiceClient;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Passes request and answer bytes through as they are (for calls by path, whatever the body).
#[derive(Clone, Copy)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
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
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// `request` with `authorization: Bearer secret` when a secret is given.
pub fn keyed<T>(mut request: tonic::Request<T>, secret: Option<&str>) -> tonic::Request<T> {
    if let Some(s) = secret {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {s}").parse().unwrap());
    }
    request
}

/// A unary call of `path` with `body` as its request, whatever it holds.
pub async fn raw_unary(
    channel: Channel,
    path: &str,
    body: bytes::Bytes,
    secret: Option<&str>,
) -> Result<bytes::Bytes, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path.to_string()).expect("path");
    grpc.unary(keyed(tonic::Request::new(body), secret), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// A call of `path` of any kind (unary or streaming: the wire is the same) with one request
/// message; answers once the server has answered its headers (Ok) or refused the call.
pub async fn raw_any(
    channel: Channel,
    path: &str,
    body: bytes::Bytes,
    secret: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path.to_string()).expect("path");
    let request = keyed(tonic::Request::new(tokio_stream::once(body)), secret);
    // A refused call (and a failed unary one) is answered trailers-only: an error here. An
    // accepted one answers headers first (a stream may then wait for actions: not read).
    grpc.streaming(request, path, RawCodec).await.map(|_| ())
}

/// Interceptor adding `authorization: Bearer` to every call of a generated client.
#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        Ok(keyed(request, Some(&self.0)))
    }
}

/// A server with a keys file of three keys: (server, the keys' directory, ingest, read, admin).
pub async fn keyed_server(
    edit: impl FnOnce(&mut engage::config::ServeArgs),
) -> (TestServer, tempfile::TempDir, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let ingest = create_key(&file, "site", "ingest");
    let read = create_key(&file, "worker", "read");
    let admin = create_key(&file, "ops", "admin");
    let server = TestServer::start_with(|a| {
        a.api_keys_file = Some(file.clone());
        edit(a);
    })
    .await;
    (server, dir, ingest, read, admin)
}

/// A user's timeline, oldest first, read with `key`.
pub async fn events_of(server: &TestServer, key: &str, user: &str) -> Vec<proto::Event> {
    let mut c = EventServiceClient::with_interceptor(server.channel().await, Bearer(key.to_string()));
    c.get_user_timeline(proto::GetUserTimelineRequest {
        user_id: user.into(),
        page_size: 1000,
        oldest_first: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events
}

/// DefineAttribute with `key`.
pub async fn define_keyed(server: &TestServer, key: &str, name: &str, t: proto::AttributeType) {
    SchemaServiceClient::with_interceptor(server.channel().await, Bearer(key.to_string()))
        .define_attribute(proto::DefineAttributeRequest {
            name: name.into(),
            r#type: t as i32,
            description: String::new(),
        })
        .await
        .expect("define");
}

/// A NUMBER attribute of an event.
pub fn number(e: &proto::Event, name: &str) -> Option<f64> {
    match e.attributes.get(name)?.value.as_ref()? {
        V::NumberValue(n) => Some(*n),
        _ => None,
    }
}

/// A STRING attribute of an event.
pub fn string(e: &proto::Event, name: &str) -> Option<String> {
    match e.attributes.get(name)?.value.as_ref()? {
        V::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// `engage keys ARGS` through the binary: (exit success, stdout, stderr).
pub fn engage_keys(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_engage"))
        .arg("keys")
        .args(args)
        .env_remove("ENGAGE_API_KEYS_FILE")
        .output()
        .expect("run engage keys");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Creates a key through the binary; answers its secret.
pub fn create_key(file: &Path, name: &str, role: &str) -> String {
    let (ok, out, err) = engage_keys(&[
        "create",
        "--file",
        file.to_str().unwrap(),
        "--name",
        name,
        "--role",
        role,
    ]);
    assert!(ok, "engage keys create failed: {err}");
    out.trim().to_string()
}

/// An in-process server; `stop` shuts it down gracefully and hands back its data directory.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), engage::server::ServerError>>>,
}

/// Server flags for tests: the defaults with `dir` as data directory.
pub fn args(dir: &Path) -> ServeArgs {
    let mut args = ServeArgs::defaults();
    args.data_dir = dir.to_path_buf();
    args.shutdown_grace_secs = 5;
    args
}

impl TestServer {
    /// Starts a server on a fresh temporary data directory.
    pub async fn start() -> Self {
        Self::start_in(TempDir::new().expect("temp dir")).await
    }

    /// Starts a server with custom flags on a fresh temporary data directory.
    pub async fn start_with(edit: impl FnOnce(&mut ServeArgs)) -> Self {
        let dir = TempDir::new().expect("temp dir");
        let mut a = args(dir.path());
        edit(&mut a);
        Self::launch(dir, a).await
    }

    /// Starts a server on an existing data directory (a restart).
    pub async fn start_in(dir: TempDir) -> Self {
        let a = args(dir.path());
        Self::launch(dir, a).await
    }

    async fn launch(dir: TempDir, args: ServeArgs) -> Self {
        // Bound before the server starts: clients can connect at once, no port race.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, dir, args)
    }

    /// Starts a server on `listener` (for example the address of a server stopped before, so
    /// that clients that knew it find the new one) with `args` on `dir`.
    pub fn start_on(listener: TcpListener, dir: TempDir, args: ServeArgs) -> Self {
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engage::server::serve(listener, args, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn events(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(self.channel().await)
    }

    pub async fn schema(&self) -> SchemaServiceClient<Channel> {
        SchemaServiceClient::new(self.channel().await)
    }

    pub async fn triggers(&self) -> TriggerServiceClient<Channel> {
        TriggerServiceClient::new(self.channel().await)
    }

    pub async fn actions(&self) -> ActionServiceClient<Channel> {
        ActionServiceClient::new(self.channel().await)
    }

    /// Shuts down gracefully and returns the data directory.
    pub async fn stop(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
        // Take the directory without running Drop's cleanup.
        let dir = TempDir::new().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }

    /// Stops and starts again on the same data directory.
    pub async fn restart(self) -> Self {
        let dir = self.stop().await;
        Self::start_in(dir).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The `engage` binary as a child process, for signal and crash tests.
pub struct ChildServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every stderr line after the start line, as it comes.
    pub log: Log,
}

/// A child's log lines, with a way to wait for one.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>);

impl Log {
    fn push(&self, line: String) {
        self.0 .0.lock().unwrap().push(line);
        self.0 .1.notify_all();
    }

    /// Waits for a line that `matches` (at most a minute: a hang is a failure, not a wait).
    pub fn wait_for(&self, matches: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut lines = self.0 .0.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| matches(l)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no such log line; got:\n{}", lines.join("\n"));
            lines = self.0 .1.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }
}

impl ChildServer {
    /// Starts `engage serve` on port 0 in `dir` and waits for its start line (JSON logs) to learn
    /// the bound address.
    pub fn spawn(dir: &Path) -> Self {
        Self::spawn_with(dir, &[])
    }

    /// Like [`ChildServer::spawn`], with extra flags.
    pub fn spawn_with(dir: &Path, extra: &[&str]) -> Self {
        match start_or_exit(dir, extra) {
            Outcome::Started(server) => server,
            Outcome::Exited(status, stderr) => panic!("engage did not start ({status}): {stderr}"),
        }
    }

    pub async fn events(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        self.child.wait().expect("wait")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn crash(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn s(v: &str) -> proto::AttributeValue {
    proto::AttributeValue {
        value: Some(V::StringValue(v.into())),
    }
}
pub fn n(v: f64) -> proto::AttributeValue {
    proto::AttributeValue {
        value: Some(V::NumberValue(v)),
    }
}
pub fn b(v: bool) -> proto::AttributeValue {
    proto::AttributeValue {
        value: Some(V::BoolValue(v)),
    }
}
pub fn d(secs: i64) -> proto::AttributeValue {
    proto::AttributeValue {
        value: Some(V::DateValue(ts(secs))),
    }
}
pub fn j(v: &str) -> proto::AttributeValue {
    proto::AttributeValue {
        value: Some(V::JsonValue(v.into())),
    }
}
pub fn ts(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

/// An event with attributes.
pub fn event(user: &str, name: &str, attrs: &[(&str, proto::AttributeValue)]) -> proto::Event {
    proto::Event {
        user_id: user.into(),
        name: name.into(),
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

/// An event with an id and an occurrence time.
pub fn event_at(user: &str, name: &str, id: &str, secs: i64) -> proto::Event {
    proto::Event {
        event_id: id.into(),
        occurred_at: Some(ts(secs)),
        ..event(user, name, &[])
    }
}

pub async fn track(
    client: &mut EventServiceClient<Channel>,
    e: proto::Event,
) -> Result<proto::TrackEventResponse, tonic::Status> {
    client
        .track_event(proto::TrackEventRequest { event: Some(e) })
        .await
        .map(|r| r.into_inner())
}

/// Tracks an event and answers how many actions it fired.
pub async fn fired(client: &mut EventServiceClient<Channel>, e: proto::Event) -> u32 {
    track(client, e).await.expect("track").actions_fired
}

/// Every event of a user, oldest first, read through paging.
pub async fn timeline(client: &mut EventServiceClient<Channel>, user: &str) -> Vec<proto::Event> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .get_user_timeline(proto::GetUserTimelineRequest {
                user_id: user.into(),
                page_size: 1000,
                page_token: token,
                oldest_first: true,
                ..Default::default()
            })
            .await
            .expect("timeline")
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// A path inside a temp dir for a child server's data.
pub fn data_dir(tmp: &TempDir) -> PathBuf {
    tmp.path().join("data")
}

/// Connects to an address.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// A trigger on `event_name` firing `action_type` with `template`.
pub fn trigger(event_name: &str, action_type: &str, template: &str) -> proto::Trigger {
    proto::Trigger {
        name: format!("{action_type} on {event_name}"),
        event_name: event_name.into(),
        action: Some(proto::ActionTemplate {
            r#type: action_type.into(),
            payload_template: template.into(),
            destination_id: String::new(),
        }),
        ..Default::default()
    }
}

pub async fn create_trigger(
    c: &mut TriggerServiceClient<Channel>,
    t: proto::Trigger,
) -> Result<proto::Trigger, tonic::Status> {
    c.create_trigger(proto::CreateTriggerRequest { trigger: Some(t) })
        .await
        .map(|r| r.into_inner())
}

/// `attribute op value`.
pub fn attr_cond(attribute: &str, op: proto::Operator, value: proto::AttributeValue) -> proto::Condition {
    proto::Condition {
        kind: Some(proto::condition::Kind::Attribute(proto::AttributeCondition {
            attribute: attribute.into(),
            op: op as i32,
            value: Some(value),
            values: vec![],
        })),
    }
}

/// A history condition.
pub fn history(
    event_name: &str,
    aggregate: proto::Aggregate,
    attribute: &str,
    op: proto::Operator,
    value: f64,
) -> proto::HistoryCondition {
    proto::HistoryCondition {
        event_name: event_name.into(),
        r#where: None,
        aggregate: aggregate as i32,
        attribute: attribute.into(),
        op: op as i32,
        value,
        within: None,
    }
}

pub fn history_cond(h: proto::HistoryCondition) -> proto::Condition {
    proto::Condition {
        kind: Some(proto::condition::Kind::History(Box::new(h))),
    }
}

pub fn all(conditions: Vec<proto::Condition>) -> proto::Condition {
    proto::Condition {
        kind: Some(proto::condition::Kind::All(proto::ConditionList { conditions })),
    }
}

/// Every fired action of a user, newest first, through paging.
pub async fn user_actions(c: &mut ActionServiceClient<Channel>, user: &str) -> Vec<proto::FiredAction> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_fired_actions(proto::ListFiredActionsRequest {
                user_id: user.into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list actions")
            .into_inner();
        out.extend(page.actions);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// DefineAttribute with a raw type number (to test bad ones).
pub async fn try_define(
    server: &TestServer,
    name: &str,
    t: i32,
) -> Result<proto::AttributeDefinition, tonic::Status> {
    server
        .schema()
        .await
        .define_attribute(proto::DefineAttributeRequest {
            name: name.into(),
            r#type: t,
            description: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Defines an attribute's type.
pub async fn define(server: &TestServer, name: &str, t: proto::AttributeType) -> proto::AttributeDefinition {
    try_define(server, name, t as i32).await.expect("define")
}

/// How a server started on a data directory ended up.
pub enum Outcome {
    Started(ChildServer),
    /// The exit status and everything the server printed.
    Exited(std::process::ExitStatus, String),
}

/// Starts `engage serve` on port 0 in `dir` and waits until it either logs its start line (JSON
/// logs, which tell the bound address) or exits.
pub fn start_or_exit(dir: &Path, extra: &[&str]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_engage"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn engage");
    let stderr = child.stderr.take().expect("stderr");
    let mut text = String::new();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.expect("read stderr");
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
            if json["message"] == "engage started" {
                let addr = json["listen"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .expect("address");
                // Keep draining so the child never blocks on a full pipe.
                let log = Log::default();
                log.push(line.clone());
                let kept = log.clone();
                std::thread::spawn(move || {
                    for l in lines.map_while(Result::ok) {
                        kept.push(l);
                    }
                });
                return Outcome::Started(ChildServer { child, addr, log });
            }
        }
        text.push_str(&line);
        text.push('\n');
    }
    // stderr closed: the process is exiting.
    let status = child.wait().expect("wait");
    Outcome::Exited(status, text)
}

/// Opens a stopped server's data directory with sled directly, with the segment size and
/// compression recorded in it (sled refuses to open a directory with others).
pub fn open_sled(dir: &std::path::Path) -> sled::Db {
    let conf = std::fs::read(dir.join("conf")).expect("sled conf");
    let conf = String::from_utf8_lossy(&conf);
    let recorded = |name: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("{name} in conf"))
    };
    let segment_size = recorded("segment_size: ").parse::<usize>().expect("segment_size");
    let compressed = recorded("use_compression: ")
        .parse::<bool>()
        .expect("use_compression");
    sled::Config::new()
        .path(dir)
        .segment_size(segment_size)
        .use_compression(compressed)
        .open()
        .expect("open sled")
}
