//! Destinations (SPEC §9): webhooks engage delivers itself, against real HTTP receivers (axum
//! servers on ephemeral loopback ports) started in each test. Signatures are checked with an
//! implementation of the Standard Webhooks scheme written here, not the server's.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use engage::proto;
use engage::proto::destination_service_client::DestinationServiceClient;
use tonic::transport::Channel;

/// What a receiver answers to its n-th request (0-based).
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    RetryAfter(u16, u64),
    /// No answer for this long, then 200.
    Hang(Duration),
}

/// One request a receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: String,
    at: Instant,
    /// Requests in progress when this one arrived (itself included).
    concurrent: usize,
}

type Script = Arc<dyn Fn(usize, &Received) -> Answer + Send + Sync>;

#[derive(Clone)]
struct Shared {
    got: Arc<Mutex<Vec<Received>>>,
    count: Arc<tokio::sync::watch::Sender<usize>>,
    script: Arc<Mutex<Script>>,
    in_progress: Arc<std::sync::atomic::AtomicUsize>,
}

/// A webhook receiver on an ephemeral loopback port.
struct Receiver {
    url: String,
    shared: Shared,
}

async fn receive(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    use std::sync::atomic::Ordering;
    let concurrent = s.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
    let r = Received {
        headers,
        body,
        at: Instant::now(),
        concurrent,
    };
    /// Counts the request as ended however the handler ends (a client that gives up drops it).
    struct Ending(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Ending {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let _ending = Ending(s.in_progress.clone());
    let n = {
        let mut got = s.got.lock().unwrap();
        got.push(r.clone());
        got.len() - 1
    };
    let script = s.script.lock().unwrap().clone();
    let answer = script(n, &r);
    s.count.send_modify(|c| *c += 1);
    if let Answer::Hang(d) = answer {
        tokio::time::sleep(d).await;
    }
    match answer {
        Answer::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Answer::RetryAfter(code, secs) => (
            StatusCode::from_u16(code).unwrap(),
            [("retry-after", secs.to_string())],
            "slow down",
        )
            .into_response(),
        Answer::Hang(_) => StatusCode::OK.into_response(),
    }
}

impl Receiver {
    async fn start(script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Shared {
            got: Arc::default(),
            count: Arc::new(tokio::sync::watch::channel(0).0),
            script: Arc::new(Mutex::new(Arc::new(script))),
            in_progress: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url: format!("http://{addr}/hook"),
            shared,
        }
    }

    fn answer(&self, script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static) {
        *self.shared.script.lock().unwrap() = Arc::new(script);
    }

    /// Waits until `n` requests arrived (at most two minutes).
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let mut rx = self.shared.count.subscribe();
        tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("receiver got {} of {n} requests", self.got().len()))
            .unwrap();
        self.got()
    }

    fn got(&self) -> Vec<Received> {
        self.shared.got.lock().unwrap().clone()
    }
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Standard Webhooks verification, written from the specification: the signed content is
/// `{id}.{timestamp}.{body}`, the key the base64 after `whsec_`, the header a space-separated
/// list of `v1,BASE64(HMAC-SHA256)`.
fn verify(secret: &str, r: &Received) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let content = format!(
        "{}.{}.{}",
        header(r, "webhook-id"),
        header(r, "webhook-timestamp"),
        r.body
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(content.as_bytes());
    let expected = b64.encode(mac.finalize().into_bytes());
    header(r, "webhook-signature")
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A server that may deliver to loopback, with retries 20 ms, 40 ms, ... apart.
async fn server() -> TestServer {
    TestServer::start_with(|a| {
        a.allow_private_destinations = true;
        a.delivery_backoff_base_ms = 20;
    })
    .await
}

async fn destinations(channel: Channel) -> DestinationServiceClient<Channel> {
    DestinationServiceClient::new(channel)
}

fn destination(url: &str) -> proto::Destination {
    proto::Destination {
        name: "hook".into(),
        url: url.into(),
        ..Default::default()
    }
}

async fn create(c: &mut DestinationServiceClient<Channel>, d: proto::Destination) -> proto::Destination {
    c.create_destination(proto::CreateDestinationRequest { destination: Some(d) })
        .await
        .expect("create destination")
        .into_inner()
}

/// A trigger on `buy` delivering `{"user": ..., "sku": ...}` to `destination`.
async fn deliver_buys(server: &TestServer, destination: &str) -> proto::Trigger {
    let mut t = trigger(
        "buy",
        "webhook",
        r#"{"user": "{{ user_id }}", "sku": "{{ event.attributes.sku }}"}"#,
    );
    t.action.as_mut().unwrap().destination_id = destination.into();
    create_trigger(&mut server.triggers().await, t)
        .await
        .expect("trigger")
}

async fn buy(server: &TestServer, user: &str, sku: &str) {
    let fired = fired(&mut server.events().await, event(user, "buy", &[("sku", s(sku))])).await;
    assert_eq!(fired, 1);
}

/// `n` users buy at once (one TrackEvents), each firing one action.
async fn buys(server: &TestServer, n: usize) {
    let batch = (0..n)
        .map(|i| event(&format!("u{i}"), "buy", &[("sku", s("x"))]))
        .collect();
    server
        .events()
        .await
        .track_events(proto::TrackEventsRequest { events: batch })
        .await
        .unwrap();
}

async fn dead_letters(c: &mut DestinationServiceClient<Channel>, id: &str) -> Vec<proto::DeadLetter> {
    c.list_dead_letters(proto::ListDeadLettersRequest {
        destination_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("dead letters")
    .into_inner()
    .dead_letters
}

/// Polls `health` of a destination until it is `want` (at most a minute).
async fn wait_health(c: &mut DestinationServiceClient<Channel>, id: &str, want: proto::DestinationHealth) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = c
            .get_destination(proto::GetDestinationRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if d.health == want as i32 {
            return;
        }
        assert!(Instant::now() < deadline, "health stayed {:?}", d.health());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_action_is_delivered_once_with_its_headers_and_a_signature_a_receiver_verifies() {
    let receiver = Receiver::start(|_, _| Answer::Status(200)).await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let d = create(
        &mut c,
        proto::Destination {
            signing_secret: SECRET.into(),
            headers: [("X-Api-Key".to_string(), "k1".to_string())].into(),
            ..destination(&receiver.url)
        },
    )
    .await;
    // The secret is write-only.
    assert!(d.signing_secret.is_empty() && d.signed, "{d:?}");
    assert_eq!(d.max_attempts, 12);
    assert_eq!(d.concurrency, 8);
    assert_eq!(d.timeout.unwrap().seconds, 10);
    assert_eq!(d.health(), proto::DestinationHealth::Healthy);
    let t = deliver_buys(&server, &d.id).await;
    assert_eq!(t.action.as_ref().unwrap().destination_id, d.id);

    buy(&server, "ann", "sku-1").await;
    let got = receiver.wait_for(1).await;
    let r = &got[0];
    let actions = user_actions(&mut server.actions().await, "ann").await;
    assert_eq!(actions.len(), 1);
    let a = &actions[0];
    assert_eq!(header(r, "webhook-id"), a.action_id);
    assert_eq!(header(r, "engage-sequence"), a.sequence.to_string());
    assert_eq!(header(r, "content-type"), "application/json");
    assert_eq!(header(r, "x-api-key"), "k1");
    assert!(header(r, "user-agent").starts_with("engage/"), "{:?}", r.headers);
    assert_eq!(r.body, a.payload);
    assert_eq!(r.body, r#"{"user": "ann", "sku": "sku-1"}"#);
    let stamp: i64 = header(r, "webhook-timestamp").parse().unwrap();
    assert!((stamp - a.fired_at.unwrap().seconds).abs() < 300);
    assert!(
        verify(SECRET, r),
        "signature {:?}",
        header(r, "webhook-signature")
    );
    let mut tampered = r.clone();
    tampered.body.push(' ');
    assert!(!verify(SECRET, &tampered));

    // An update with an empty secret keeps the old one; a plain-text payload is text/plain.
    let mut changed = d.clone();
    changed.name = "renamed".into();
    let changed = c
        .update_destination(proto::UpdateDestinationRequest {
            destination: Some(changed),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(changed.signed && changed.name == "renamed");
    let mut text = trigger("note", "webhook", "hello {{ user_id }}");
    text.action.as_mut().unwrap().destination_id = d.id.clone();
    create_trigger(&mut server.triggers().await, text).await.unwrap();
    fired(&mut server.events().await, event("bob", "note", &[])).await;
    let got = receiver.wait_for(2).await;
    assert_eq!(got[1].body, "hello bob");
    assert_eq!(header(&got[1], "content-type"), "text/plain; charset=utf-8");
    assert!(verify(SECRET, &got[1]));
    // Delivered once: the first action was not sent again before the second arrived.
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(dead_letters(&mut c, &d.id).await.is_empty());
}

#[tokio::test]
async fn failures_are_retried_with_the_same_webhook_id_until_delivered() {
    // 500, 503, a timeout, then 200.
    let receiver = Receiver::start(|n, _| match n {
        0 => Answer::Status(500),
        1 => Answer::Status(503),
        2 => Answer::Hang(Duration::from_secs(2)),
        _ => Answer::Status(200),
    })
    .await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let d = create(
        &mut c,
        proto::Destination {
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            ..destination(&receiver.url)
        },
    )
    .await;
    deliver_buys(&server, &d.id).await;
    buy(&server, "ann", "x").await;
    let got = receiver.wait_for(4).await;
    let ids: HashSet<&str> = got.iter().map(|r| header(r, "webhook-id")).collect();
    assert_eq!(ids.len(), 1, "one action, attempted four times");
    // Never sooner than half the nominal delay: 20, 40, 80 ms nominal.
    for (i, pair) in got.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(10 << i),
            "attempt {} came {gap:?} after the one before",
            i + 2
        );
    }
    // Delivered: nothing dead-lettered, and a further action goes through at once.
    buy(&server, "bob", "y").await;
    let got = receiver.wait_for(5).await;
    assert_eq!(got.len(), 5);
    assert!(dead_letters(&mut c, &d.id).await.is_empty());
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let receiver = Receiver::start(|n, _| match n {
        0 => Answer::RetryAfter(429, 1),
        _ => Answer::Status(200),
    })
    .await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let d = create(&mut c, destination(&receiver.url)).await;
    deliver_buys(&server, &d.id).await;
    buy(&server, "ann", "x").await;
    let got = receiver.wait_for(2).await;
    // The backoff alone would retry after 10-30 ms; Retry-After said a second.
    let gap = got[1].at.duration_since(got[0].at);
    assert!(gap >= Duration::from_millis(1000), "retried after {gap:?}");
    assert_eq!(header(&got[0], "webhook-id"), header(&got[1], "webhook-id"));
}

#[tokio::test]
async fn a_410_is_dead_lettered_at_once_and_a_redrive_delivers_it() {
    let receiver = Receiver::start(|_, _| Answer::Status(410)).await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let d = create(&mut c, destination(&receiver.url)).await;
    deliver_buys(&server, &d.id).await;
    buy(&server, "ann", "x").await;
    receiver.wait_for(1).await;
    // The dead letter is written after the answer: wait for it through the API.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dead = dead_letters(&mut c, &d.id).await;
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    let dl = &dead[0];
    assert_eq!((dl.attempts, dl.last_status), (1, 410));
    assert!(dl.last_error.contains("410"), "{}", dl.last_error);
    assert_eq!(dl.action.as_ref().unwrap().user_id, "ann");
    assert_eq!(receiver.got().len(), 1, "a 410 is not retried");

    receiver.answer(|_, _| Answer::Status(204));
    let redriven = c
        .redrive_dead_letters(proto::RedriveDeadLettersRequest {
            destination_id: d.id.clone(),
            sequences: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven, 1);
    let got = receiver.wait_for(2).await;
    assert_eq!(
        header(&got[1], "webhook-id"),
        dl.action.as_ref().unwrap().action_id
    );
    assert!(dead_letters(&mut c, &d.id).await.is_empty());
    // Unknown destinations are NOT_FOUND for reads and redrives.
    let e = c
        .list_dead_letters(proto::ListDeadLettersRequest {
            destination_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn out_of_attempts_an_action_is_dead_lettered_with_its_last_error() {
    // Every attempt times out: no HTTP answer, status 0.
    let receiver = Receiver::start(|_, _| Answer::Hang(Duration::from_secs(3))).await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let d = create(
        &mut c,
        proto::Destination {
            max_attempts: 2,
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            ..destination(&receiver.url)
        },
    )
    .await;
    deliver_buys(&server, &d.id).await;
    buy(&server, "ann", "x").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dead = dead_letters(&mut c, &d.id).await;
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].attempts, dead[0].last_status), (2, 0));
    assert!(dead[0].last_error.contains("timeout"), "{}", dead[0].last_error);
    assert!(dead[0].last_attempt_at.unwrap().seconds >= dead[0].first_attempt_at.unwrap().seconds);
}

#[tokio::test]
async fn a_paused_destination_keeps_its_queue_and_delivers_it_when_resumed() {
    let paused_rx = Receiver::start(|_, _| Answer::Status(200)).await;
    let live_rx = Receiver::start(|_, _| Answer::Status(200)).await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let paused = create(
        &mut c,
        proto::Destination {
            paused: true,
            ..destination(&paused_rx.url)
        },
    )
    .await;
    let live = create(&mut c, destination(&live_rx.url)).await;
    deliver_buys(&server, &paused.id).await;
    let mut later = trigger("ping", "webhook", "{{ user_id }}");
    later.action.as_mut().unwrap().destination_id = live.id.clone();
    create_trigger(&mut server.triggers().await, later).await.unwrap();
    for u in ["a", "b", "c"] {
        buy(&server, u, "x").await;
    }
    // An action fired after the three reaches the live destination: the paused one sent nothing.
    fired(&mut server.events().await, event("z", "ping", &[])).await;
    live_rx.wait_for(1).await;
    assert!(paused_rx.got().is_empty());

    let mut resumed = paused.clone();
    resumed.paused = false;
    c.update_destination(proto::UpdateDestinationRequest {
        destination: Some(resumed),
    })
    .await
    .unwrap();
    let got = paused_rx.wait_for(3).await;
    let mut users: Vec<String> = got
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["user"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    users.sort();
    assert_eq!(users, ["a", "b", "c"]);
}

/// A destination whose every attempt fails (`receiver`), given `n` actions at once: waits
/// until it is `health`, then for more requests, and checks the last four came one at a time,
/// each at least half its nominal wait (20 ms, 40 ms, ... doubling with each failure) after the
/// one before: a throttled destination is not hammered. Answers the destination's id.
async fn throttled(
    server: &TestServer,
    receiver: &Receiver,
    n: usize,
    health: proto::DestinationHealth,
) -> (DestinationServiceClient<Channel>, String) {
    let mut c = destinations(server.channel().await).await;
    let d = create(
        &mut c,
        proto::Destination {
            max_attempts: 100,
            ..destination(&receiver.url)
        },
    )
    .await;
    deliver_buys(server, &d.id).await;
    buys(server, n).await;
    wait_health(&mut c, &d.id, health).await;
    // The attempts in flight when it turned `health` had arrived (loopback) and end; the
    // requests after them are the throttled ones.
    let at = receiver.got().len();
    let got = receiver.wait_for(at + 5).await;
    let paced = &got[got.len() - 4..];
    for p in paced {
        assert_eq!(p.concurrent, 1, "an attempt overlapped another request");
    }
    for (i, pair) in paced.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(10 << i),
            "attempt {} came {gap:?} after the one before",
            i + 2
        );
    }
    (c, d.id)
}

#[tokio::test]
async fn a_suspended_destination_is_probed_one_attempt_at_a_time_and_recovers() {
    let receiver = Receiver::start(|_, _| Answer::Status(500)).await;
    // Suspended as soon as it is failing (5 failures in a row).
    let server = TestServer::start_with(|a| {
        a.allow_private_destinations = true;
        a.delivery_backoff_base_ms = 20;
        a.delivery_suspend_after_secs = 0;
    })
    .await;
    let (mut c, id) = throttled(&server, &receiver, 20, proto::DestinationHealth::Suspended).await;

    // Recovery: a success makes it healthy, and every action is delivered.
    receiver.answer(|_, _| Answer::Status(200));
    let switched = receiver.got().len();
    wait_health(&mut c, &id, proto::DestinationHealth::Healthy).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: HashSet<String> = receiver.got()[switched..]
            .iter()
            .map(|r| header(r, "webhook-id").to_string())
            .collect();
        if delivered.len() == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} distinct actions seen",
            delivered.len()
        );
        receiver.wait_for(receiver.got().len() + 1).await;
    }
}

#[tokio::test]
async fn destinations_are_validated_and_one_in_use_is_not_deleted() {
    // The default server refuses private addresses.
    let server = TestServer::start().await;
    let mut c = destinations(server.channel().await).await;
    let refuse = |d: proto::Destination| {
        let mut c = c.clone();
        async move {
            c.create_destination(proto::CreateDestinationRequest { destination: Some(d) })
                .await
                .unwrap_err()
        }
    };
    for (url, field) in [
        ("http://127.0.0.1:9/x", "destination.url"),
        ("http://localhost:9/x", "destination.url"),
        ("http://[::1]/x", "destination.url"),
        ("http://169.254.169.254/latest", "destination.url"),
        ("ftp://example.com/", "destination.url"),
        ("not a url", "destination.url"),
    ] {
        let e = refuse(destination(url)).await;
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(e.message().starts_with(field), "{url}: {}", e.message());
    }
    let ok = "https://hooks.example.com/in";
    let cases: Vec<(proto::Destination, &str)> = vec![
        (
            proto::Destination {
                name: String::new(),
                ..destination(ok)
            },
            "destination.name",
        ),
        (
            proto::Destination {
                headers: [("webhook-id".to_string(), "x".to_string())].into(),
                ..destination(ok)
            },
            "destination.headers",
        ),
        (
            proto::Destination {
                headers: [("bad header".to_string(), "x".to_string())].into(),
                ..destination(ok)
            },
            "destination.headers",
        ),
        (
            proto::Destination {
                signing_secret: "whsec_***".into(),
                ..destination(ok)
            },
            "destination.signing_secret",
        ),
        (
            proto::Destination {
                concurrency: 100_000,
                ..destination(ok)
            },
            "destination.concurrency",
        ),
        (
            proto::Destination {
                timeout: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..destination(ok)
            },
            "destination.timeout",
        ),
    ];
    for (d, field) in cases {
        let e = refuse(d).await;
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let listed = c
        .list_destinations(proto::ListDestinationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.destinations.is_empty(), "nothing was stored");

    // A trigger naming an unknown destination is refused; one in use blocks deletion.
    let mut t = trigger("buy", "webhook", "{}");
    t.action.as_mut().unwrap().destination_id = "missing".into();
    let e = create_trigger(&mut server.triggers().await, t.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("trigger.action.destination_id"),
        "{}",
        e.message()
    );
    let d = create(&mut c, destination(ok)).await;
    t.action.as_mut().unwrap().destination_id = d.id.clone();
    let t = create_trigger(&mut server.triggers().await, t).await.unwrap();
    let e = c
        .delete_destination(proto::DeleteDestinationRequest { id: d.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains(&t.id), "{}", e.message());
    server
        .triggers()
        .await
        .delete_trigger(proto::DeleteTriggerRequest { id: t.id.clone() })
        .await
        .unwrap();
    c.delete_destination(proto::DeleteDestinationRequest { id: d.id.clone() })
        .await
        .unwrap();
    let e = c
        .get_destination(proto::GetDestinationRequest { id: d.id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

/// A child server that may deliver to loopback, with its metrics listener's address.
fn metrics_child(dir: &std::path::Path) -> (ChildServer, String) {
    let child = ChildServer::spawn_with(
        dir,
        &["--allow-private-destinations", "--metrics-listen", "127.0.0.1:0"],
    );
    let start: serde_json::Value =
        serde_json::from_str(&child.log.wait_for(|l| l.contains("engage started"))).unwrap();
    let metrics = start["metrics_listen"].as_str().unwrap().to_string();
    (child, metrics)
}

/// Scrapes `metrics` until every line of `want` is in the text (at most a minute).
async fn wait_metrics(metrics: &str, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = tokio::task::spawn_blocking({
            let metrics = metrics.to_string();
            move || {
                ureq::get(&format!("http://{metrics}/metrics"))
                    .call()
                    .unwrap()
                    .body_mut()
                    .read_to_string()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let missing: Vec<&String> = want
            .iter()
            .filter(|w| !text.lines().any(|l| l == w.as_str()))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} in\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_user_drops_the_users_pending_deliveries_and_dead_letters() {
    // The retrying destination asks to be retried in 10 minutes for every action of "gone";
    // the dead one answers 410.
    let retrying = Receiver::start(|_, r| {
        if r.body.contains("gone") {
            Answer::RetryAfter(503, 600)
        } else {
            Answer::Status(200)
        }
    })
    .await;
    let dead = Receiver::start(|_, _| Answer::Status(410)).await;
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let (child, metrics) = metrics_child(&dir);
    let channel = child.channel().await;
    let mut c = DestinationServiceClient::new(channel.clone());
    let r = create(&mut c, destination(&retrying.url)).await;
    let x = create(&mut c, destination(&dead.url)).await;
    let mut triggers = engage::proto::trigger_service_client::TriggerServiceClient::new(channel);
    for (kind, d) in [("webhook", &r), ("gone", &x)] {
        let mut t = trigger("buy", kind, "{{ user_id }}");
        t.action.as_mut().unwrap().destination_id = d.id.clone();
        create_trigger(&mut triggers, t).await.unwrap();
    }
    let mut events = child.events().await;
    assert_eq!(fired(&mut events, event("gone", "buy", &[])).await, 2);
    retrying.wait_for(1).await;
    dead.wait_for(1).await;
    // One retry pending at r, one dead letter at x.
    let queue = |n: u32| format!("engage_delivery_queue{{destination_id=\"{}\"}} {n}", r.id);
    wait_metrics(&metrics, &[queue(1)]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while dead_letters(&mut c, &x.id).await.is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    events
        .delete_user(proto::DeleteUserRequest {
            user_id: "gone".into(),
        })
        .await
        .unwrap();
    assert!(dead_letters(&mut c, &x.id).await.is_empty());
    // The pending retry is gone from storage: after a restart (which loads the retries) r's
    // queue empties once a later action is delivered, and the erased user's was not sent.
    assert!(child.terminate().success());
    let (child, metrics) = metrics_child(&dir);
    assert_eq!(
        fired(&mut child.events().await, event("kept", "buy", &[])).await,
        2
    );
    let got = retrying.wait_for(2).await;
    assert!(got[1].body.contains("kept"), "{got:?}");
    wait_metrics(&metrics, &[queue(0)]).await;
    dead.wait_for(2).await;
    let got = retrying.got();
    assert_eq!(
        got.iter().filter(|r| r.body.contains("gone")).count(),
        1,
        "{got:?}"
    );
}

#[tokio::test]
async fn after_kill_9_during_deliveries_every_action_is_delivered() {
    let receiver = Receiver::start(|_, _| Answer::Hang(Duration::from_millis(5))).await;
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let flags = ["--allow-private-destinations"];
    let child = ChildServer::spawn_with(&dir, &flags);
    let channel = child.channel().await;
    let mut c = DestinationServiceClient::new(channel.clone());
    let d = create(&mut c, destination(&receiver.url)).await;
    let mut t = trigger("buy", "webhook", "{{ event.event_id }}");
    t.action.as_mut().unwrap().destination_id = d.id.clone();
    create_trigger(
        &mut engage::proto::trigger_service_client::TriggerServiceClient::new(channel.clone()),
        t,
    )
    .await
    .unwrap();
    let total = 400;
    let mut events = child.events().await;
    for chunk in 0..(total / 100) {
        let batch: Vec<proto::Event> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                proto::Event {
                    event_id: format!("e{n}"),
                    ..event(&format!("u{}", n % 37), "buy", &[])
                }
            })
            .collect();
        let answer = events
            .track_events(proto::TrackEventsRequest { events: batch })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.results.len(), 100);
    }
    // Mid-delivery: some delivered, most not.
    receiver.wait_for(60).await;
    child.crash();
    let before = receiver.got().len();
    let child = ChildServer::spawn_with(&dir, &flags);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen: HashSet<String> = receiver.got().iter().map(|r| r.body.clone()).collect();
        if seen.len() == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {total} actions delivered",
            seen.len()
        );
        receiver.wait_for(receiver.got().len() + 1).await;
    }
    let got = receiver.got();
    let mut times: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *times.entry(r.body.clone()).or_default() += 1;
    }
    // Only what was in flight at the crash (and not yet recorded) repeats.
    let repeated = times.values().filter(|n| **n > 1).count();
    assert!(
        repeated <= before,
        "{repeated} repeated after {before} before the crash"
    );
    eprintln!(
        "kill -9 after {before} requests: {} requests for {total} actions, {repeated} repeated",
        got.len()
    );
    drop(child);
}

#[tokio::test]
async fn at_most_concurrency_deliveries_run_at_once() {
    let receiver = Receiver::start(|_, _| Answer::Hang(Duration::from_millis(30))).await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let d = create(
        &mut c,
        proto::Destination {
            concurrency: 3,
            ..destination(&receiver.url)
        },
    )
    .await;
    deliver_buys(&server, &d.id).await;
    buys(&server, 30).await;
    let got = receiver.wait_for(30).await;
    let most = got.iter().map(|r| r.concurrent).max().unwrap();
    assert_eq!(most, 3, "at most `concurrency` at once, and that many used");
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_and_dead_letters_are_in_the_metrics() {
    let ok = Receiver::start(|_, _| Answer::Status(200)).await;
    let gone = Receiver::start(|_, _| Answer::Status(410)).await;
    let tmp = tempfile::TempDir::new().unwrap();
    let (child, metrics) = metrics_child(&data_dir(&tmp));
    let channel = child.channel().await;
    let mut c = DestinationServiceClient::new(channel.clone());
    let mut triggers = engage::proto::trigger_service_client::TriggerServiceClient::new(channel);
    let good = create(&mut c, destination(&ok.url)).await;
    let bad = create(&mut c, destination(&gone.url)).await;
    for (name, d) in [("buy", &good), ("sell", &bad)] {
        let mut t = trigger(name, "webhook", "{{ user_id }}");
        t.action.as_mut().unwrap().destination_id = d.id.clone();
        create_trigger(&mut triggers, t).await.unwrap();
    }
    let mut events = child.events().await;
    fired(&mut events, event("ann", "buy", &[])).await;
    fired(&mut events, event("ann", "sell", &[])).await;
    ok.wait_for(1).await;
    gone.wait_for(1).await;
    // Changes are audited.
    let line = child
        .log
        .wait_for(|l| l.contains("\"audit\"") && l.contains("DestinationService/CreateDestination"));
    assert!(line.contains(&good.id) && line.contains("\"OK\""), "{line}");
    let want = [
        format!(
            "engage_deliveries_total{{destination_id=\"{}\",outcome=\"delivered\"}} 1",
            good.id
        ),
        format!(
            "engage_deliveries_total{{destination_id=\"{}\",outcome=\"dead_letter\"}} 1",
            bad.id
        ),
        format!("engage_dead_letters{{destination_id=\"{}\"}} 1", bad.id),
        format!("engage_delivery_queue{{destination_id=\"{}\"}} 0", good.id),
        format!(
            "engage_delivery_latency_seconds_count{{destination_id=\"{}\"}} 1",
            good.id
        ),
    ];
    wait_metrics(&metrics, &want).await;
}

#[tokio::test]
async fn a_clean_restart_sends_nothing_twice() {
    let receiver = Receiver::start(|_, _| Answer::Status(200)).await;
    let flags = |a: &mut engage::config::ServeArgs| a.allow_private_destinations = true;
    let server = TestServer::start_with(flags).await;
    let mut c = destinations(server.channel().await).await;
    let d = create(&mut c, destination(&receiver.url)).await;
    deliver_buys(&server, &d.id).await;
    for i in 0..5 {
        buy(&server, &format!("u{i}"), "x").await;
    }
    receiver.wait_for(5).await;
    let dir = server.stop().await;
    let mut restarted = args(dir.path());
    flags(&mut restarted);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TestServer::start_on(listener, dir, restarted);
    // What the stop recorded is not sent again: the next request is the new action's.
    buy(&server, "after", "y").await;
    let got = receiver.wait_for(6).await;
    assert!(got[5].body.contains("after"), "{:?}", got[5].body);
    let ids: HashSet<&str> = got.iter().map(|r| header(r, "webhook-id")).collect();
    assert_eq!(ids.len(), 6);
}

#[tokio::test]
async fn a_failing_destination_gets_one_attempt_at_a_time_not_every_new_action() {
    let receiver = Receiver::start(|_, _| Answer::Status(503)).await;
    let server = server().await;
    throttled(&server, &receiver, 200, proto::DestinationHealth::Failing).await;
    // Far fewer requests than the 200 actions waiting.
    assert!(receiver.got().len() < 100, "{} requests", receiver.got().len());
}

#[tokio::test]
async fn a_hanging_destination_does_not_hold_up_another() {
    let stuck = Receiver::start(|_, _| Answer::Hang(Duration::from_secs(30))).await;
    let fine = Receiver::start(|_, _| Answer::Status(200)).await;
    let server = server().await;
    let mut c = destinations(server.channel().await).await;
    let slow = create(&mut c, destination(&stuck.url)).await;
    let fast = create(&mut c, destination(&fine.url)).await;
    deliver_buys(&server, &slow.id).await;
    let mut other = trigger("buy", "notify", "{{ user_id }}");
    other.action.as_mut().unwrap().destination_id = fast.id.clone();
    create_trigger(&mut server.triggers().await, other).await.unwrap();
    // Every slot of the stuck destination is taken, and more of its actions wait.
    buys(&server, 20).await;
    stuck.wait_for(8).await;
    // The other destination gets all of its actions meanwhile.
    let got = fine.wait_for(20).await;
    assert_eq!(got.len(), 20);
    assert_eq!(stuck.got().len(), 8, "the stuck one holds only its own 8 slots");
}
