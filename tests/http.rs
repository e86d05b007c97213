//! The HTTP side of the listener (SPEC §7): the Segment tracking API over HTTP/1.1 (ureq) and
//! HTTP/2 (hyper), gzip, per-message rejection, idempotency, every refusal changing nothing,
//! grpc-web and CORS.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;
use serde_json::{json, Value as Json};

/// An HTTP/1.1 answer: status, headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `method path` with `headers` and `body`, over HTTP/1.1 with a real client.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let url = format!("http://{addr}{path}");
    let method = method.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = http::Request::builder().method(method.as_str()).uri(&url);
        for (k, v) in &headers {
            request = request.header(k, v);
        }
        let mut response = agent.run(request.body(body).unwrap()).expect("http call");
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        Answer {
            status: response.status().as_u16(),
            headers,
            body: String::from_utf8_lossy(&response.body_mut().read_to_vec().unwrap_or_default())
                .into_owned(),
        }
    })
    .await
    .unwrap()
}

async fn post(server: &TestServer, path: &str, key: Option<&str>, body: Json) -> Answer {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    http(server.addr, "POST", path, &headers, body.to_string().into_bytes()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn segment_messages_become_typed_events_and_bad_ones_are_listed() {
    let (server, _dir, ingest, read, admin) = keyed_server(|_| {}).await;
    define_keyed(&server, &admin, "price", proto::AttributeType::Number).await;
    let a = post(
        &server,
        "/v1/track",
        Some(&ingest),
        json!({"userId": "ann", "event": "Order Completed", "messageId": "m1",
               "timestamp": "2026-11-30T10:00:00Z",
               "properties": {"price": "39", "Product ID": "SKU-1", "gift": true, "tags": ["a"], "none": null}}),
    )
    .await;
    assert_eq!(
        (a.status, a.json()),
        (200, json!({"success": true})),
        "{}",
        a.body
    );
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "anon-1", "name": "Home", "category": "Docs", "properties": {"path": "/"}},
        {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com"}},
        {"type": "track", "userId": "ann", "event": "!!!"},
        {"type": "track", "event": "no_user"},
        {"type": "track", "userId": "ann", "event": "paid", "properties": {"price": "many"}},
        {"type": "screen", "userId": "ann", "name": "Cart"},
        {"type": "group", "userId": "ann", "groupId": "g"},
        {"type": "alias", "userId": "ann", "previousId": "anon-1"},
        7,
        {"userId": "ann", "event": "no_type"},
        {"type": "track", "userId": "ann", "event": "twice", "properties": {"Product ID": "a", "product_id": "b"}},
        {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "m1"},
        {"type": "track", "userId": "ann", "event": "order_id", "messageId": "m2", "properties": null,
         "timestamp": "2026-11-30T11:00:00"},
        {"type": "track", "userId": "ann", "event": "order_id", "messageId": "m2"},
        {"type": "track", "userId": "ann", "event": "big", "properties": {"id": 12345678901234567891u64, "small": 7}}
    ]});
    let a = post(&server, "/v1/batch", Some(&ingest), batch).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let answer = a.json();
    assert_eq!(answer["success"], true);
    let rejected: Vec<u64> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    // A message that is not one (no object, no type) or whose properties collide is rejected
    // alone; the repeated messageIds (m1 of the earlier call, m2 twice here) are not.
    assert_eq!(rejected, vec![2, 3, 4, 8, 9, 10], "{answer}");
    let error_of = |k: usize| answer["rejected"][k]["error"].as_str().unwrap().to_string();
    assert!(error_of(2).contains("price"), "{answer}");
    assert!(error_of(3).contains("batch[8]"), "{answer}");
    assert!(error_of(4).contains("batch[9].type"), "{answer}");
    assert!(
        error_of(5).contains("\"Product ID\" and \"product_id\""),
        "{answer}"
    );

    let ann = events_of(&server, &read, "ann").await;
    let names: Vec<&str> = ann.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["order_completed", "order_id", "screen_viewed", "big"],
        "{ann:?}"
    );
    // A timestamp without an offset is UTC; null properties are none.
    assert_eq!(ann[1].occurred_at.as_ref().unwrap().seconds, 1_796_032_800 + 3600);
    assert!(ann[1].attributes.is_empty());
    // An integer a double cannot hold keeps its digits (as text: `id` is undefined, so STRING).
    assert_eq!(string(&ann[3], "id").as_deref(), Some("12345678901234567891"));
    assert_eq!(string(&ann[3], "small").as_deref(), Some("7"));
    let order = &ann[0];
    assert_eq!(order.event_id, "m1");
    assert_eq!(order.occurred_at.as_ref().unwrap().seconds, 1_796_032_800);
    assert_eq!(number(order, "price"), Some(39.0), "typed by the schema");
    assert_eq!(string(order, "product_id").as_deref(), Some("SKU-1"));
    assert!(!order.attributes.contains_key("none"), "null is skipped");
    assert_eq!(string(&ann[2], "name").as_deref(), Some("Cart"));
    let anon = events_of(&server, &read, "anon-1").await;
    assert_eq!(anon.len(), 1);
    assert_eq!(anon[0].name, "page_viewed");
    assert_eq!(string(&anon[0], "category").as_deref(), Some("Docs"));
    assert_eq!(string(&anon[0], "path").as_deref(), Some("/"));

    // The same messageId again stores nothing.
    let again = post(
        &server,
        "/v1/track",
        Some(&ingest),
        json!({"userId": "ann", "event": "Order Completed", "messageId": "m1"}),
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(events_of(&server, &read, "ann").await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_bodies_basic_auth_and_http2_are_accepted() {
    let (server, _dir, ingest, read, _admin) = keyed_server(|_| {}).await;
    use std::io::Write;
    let body = json!({"batch": [{"type": "track", "userId": "zed", "event": "zipped"}]}).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ingest}:"))
    );
    let a = http(
        server.addr,
        "POST",
        "/v1/batch",
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
            ("authorization", &basic),
        ],
        gz.finish().unwrap(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // HTTP/2 (prior knowledge, as a proxy in front would speak it) on the same port.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{}/v1/track", server.addr))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {ingest}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"userId": "zed", "event": "over_h2"}).to_string(),
        )))
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let names: Vec<String> = events_of(&server, &read, "zed")
        .await
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["zipped", "over_h2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_http_input_gets_a_clear_answer_and_changes_nothing() {
    let (server, _dir, ingest, read, _admin) = keyed_server(|a| {
        a.max_message_bytes = 64 * 1024;
        a.max_batch_events = 5;
        a.ingest_rate_per_key = 1;
        a.ingest_burst = 5;
    })
    .await;
    let track = json!({"userId": "bob", "event": "x"});
    // (what, extra headers, body, status, what the error says)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("malformed JSON", vec![], b"{not json".to_vec(), 400, "not JSON"),
        ("a wrong shape", vec![], br#"{"batch": {"a": 1}}"#.to_vec(), 400, "batch"),
        ("a body that is no batch", vec![], br#"[1]"#.to_vec(), 400, "batch"),
        ("a body over the limit", vec![], vec![b' '; 70 * 1024], 413, "max_message_bytes"),
        // 1 MiB of spaces in ~1 KiB of gzip: refused past the limit, never inflated whole.
        ("a gzip bomb", vec![("content-encoding", "gzip".into())], gzip(&vec![b' '; 1 << 20]), 413, "max_message_bytes"),
        // Many messages in a small body: refused at the sixth, before the rest is built.
        (
            "a batch of many empty messages",
            vec![("content-encoding", "gzip".into())],
            gzip(format!("{{\"batch\": [{}{{}}]}}", "{},".repeat(20_000)).as_bytes()),
            400,
            "max_batch_events",
        ),
        (
            "a batch over max_batch_events",
            vec![],
            json!({"batch": (0..6).map(|_| json!({"type": "track", "userId": "bob", "event": "x"})).collect::<Vec<_>>()})
                .to_string()
                .into_bytes(),
            400,
            "max_batch_events",
        ),
        ("bad gzip", vec![("content-encoding", "gzip".into())], b"not gzip".to_vec(), 400, "gzip"),
        ("no key", vec![("authorization", String::new())], track.to_string().into_bytes(), 401, "ingest role"),
        ("a wrong key", vec![("authorization", "Bearer engage_00".into())], track.to_string().into_bytes(), 401, "ingest role"),
        ("a key without ingest", vec![("authorization", format!("Bearer {read}"))], track.to_string().into_bytes(), 403, "ingest role"),
    ];
    for (what, extra, body, status, says) in cases {
        let path = if status == 413 || what.contains("batch") || what.contains("shape") {
            "/v1/batch"
        } else {
            "/v1/track"
        };
        let bearer = format!("Bearer {ingest}");
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        if !extra.iter().any(|(k, _)| *k == "authorization") {
            headers.push(("authorization", &bearer));
        }
        for (k, v) in &extra {
            if !v.is_empty() {
                headers.push((k, v));
            }
        }
        let a = http(server.addr, "POST", path, &headers, body).await;
        assert_eq!(a.status, status, "{what}: {}", a.body);
        assert!(
            a.json()["error"].as_str().unwrap().contains(says),
            "{what}: {}",
            a.body
        );
    }
    assert!(
        events_of(&server, &read, "bob").await.is_empty(),
        "a refused call stored something"
    );
    // Over the rate: 429 with Retry-After, nothing stored.
    let five = json!({"batch": (0..5).map(|i| json!({"type": "track", "userId": "rita", "event": "x", "messageId": format!("r{i}")})).collect::<Vec<_>>()});
    assert_eq!(post(&server, "/v1/batch", Some(&ingest), five).await.status, 200);
    let a = post(
        &server,
        "/v1/track",
        Some(&ingest),
        json!({"userId": "rita", "event": "late"}),
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(a
        .header("retry-after")
        .is_some_and(|v| v.parse::<u64>().unwrap() >= 1));
    assert_eq!(events_of(&server, &read, "rita").await.len(), 5);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A grpc-web frame: flag, length, message.
fn frame(flag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_web_serves_unary_and_streaming_calls_with_cors() {
    use prost::Message;
    let (server, _dir, ingest, read, admin) =
        keyed_server(|a| a.cors_allowed_origins = "https://shop.example".into()).await;
    let mut triggers = engage::proto::trigger_service_client::TriggerServiceClient::with_interceptor(
        server.channel().await,
        Bearer(admin.clone()),
    );
    triggers
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(trigger("visit", "x", "{{ user_id }}")),
        })
        .await
        .unwrap();
    // A preflight from the allowed origin.
    let pre = http(
        server.addr,
        "OPTIONS",
        "/engage.v1.EventService/TrackEvent",
        &[
            ("origin", "https://shop.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type,x-grpc-web",
            ),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://shop.example"),
        "{:?}",
        pre.headers
    );
    let other = http(
        server.addr,
        "OPTIONS",
        "/v1/batch",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(other.header("access-control-allow-origin"), None);

    let request = proto::TrackEventRequest {
        event: Some(event("web", "visit", &[])),
    };
    let bearer = format!("Bearer {ingest}");
    let a = http(
        server.addr,
        "POST",
        "/engage.v1.EventService/TrackEvent",
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
            ("origin", "https://shop.example"),
            ("authorization", &bearer),
        ],
        frame(0, &request.encode_to_vec()),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some("https://shop.example")
    );
    // ureq reads text: the answer frame's length prefix, then the message, then the trailers.
    assert!(a.body.contains("grpc-status:0"), "{:?}", a.body);
    // A stream: the first action arrives as a frame (read from a raw HTTP/1.1 request).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let body = frame(
        0,
        &proto::SubscribeActionsRequest {
            start: proto::StartFrom::Earliest as i32,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let head = format!(
        "POST /engage.v1.ActionService/SubscribeActions HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\nauthorization: Bearer {read}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("web") {
        // A stream that sends nothing is a failure, not a hang.
        let n = tokio::time::timeout(std::time::Duration::from_secs(60), tcp.read(&mut buf))
            .await
            .expect("the stream sent nothing for a minute")
            .unwrap();
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn the_snippet_is_served_without_a_key() {
    let (server, _dir, _ingest, _read, _admin) = keyed_server(|_| {}).await;
    let a = http(server.addr, "GET", "/snippet.js", &[], Vec::new()).await;
    assert_eq!(a.status, 200);
    assert!(a
        .header("content-type")
        .unwrap()
        .starts_with("application/javascript"));
    assert!(a.body.contains("engage.init") && a.body.contains("/v1/batch"));
    let missing = http(server.addr, "GET", "/nothing", &[], Vec::new()).await;
    assert_eq!(missing.status, 401, "unknown paths need admin: {}", missing.body);
}
