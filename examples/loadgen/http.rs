//! The Segment API's `/v1/batch` under load: the same events as the gRPC batch scenario, as
//! Segment `track` messages in JSON over HTTP/1.1 keep-alive connections (what the SDKs use).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::{histogram, wire_event, Report};

/// One `/v1/batch` body: `batch` track messages with the events of `wire_event`.
fn segment_body(base: u64, batch: usize, users: u64) -> Bytes {
    let messages: Vec<serde_json::Value> = (0..batch as u64)
        .map(|k| {
            let e = wire_event(base + k, users);
            let mut properties = serde_json::Map::new();
            for (name, value) in e.attributes {
                let json = match value.value {
                    Some(engage::proto::attribute_value::Value::NumberValue(n)) => serde_json::json!(n),
                    Some(engage::proto::attribute_value::Value::StringValue(s)) => serde_json::json!(s),
                    _ => continue,
                };
                properties.insert(name, json);
            }
            serde_json::json!({
                "type": "track", "userId": e.user_id, "event": e.name, "properties": properties,
            })
        })
        .collect();
    Bytes::from(serde_json::to_vec(&serde_json::json!({ "batch": messages })).expect("json"))
}

/// `in_flight` loops, each on its own HTTP/1.1 connection, posting `/v1/batch` bodies of `batch`
/// messages until the deadline. Messages carry no messageId, so a resent body stores new events.
pub(crate) async fn http_batch_load(
    name: &str,
    addr: SocketAddr,
    secs: u64,
    batch: usize,
    in_flight: usize,
    users: u64,
) -> Report {
    let bodies: std::sync::Arc<Vec<Bytes>> = std::sync::Arc::new(
        (0..64u64)
            .map(|r| segment_body(r * batch as u64, batch, users))
            .collect(),
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..in_flight {
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            let mut hist = histogram();
            let mut events = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                let body = bodies[i % bodies.len()].clone();
                i += 1;
                let t = Instant::now();
                sender.ready().await.expect("ready");
                let request = http::Request::post("/v1/batch")
                    .header(http::header::HOST, addr.to_string())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body))
                    .expect("request");
                let response = sender.send_request(request).await.expect("post");
                let status = response.status();
                let answer = response.into_body().collect().await.expect("body").to_bytes();
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                let answer: serde_json::Value = serde_json::from_slice(&answer).expect("json answer");
                assert!(
                    status.is_success() && answer["success"] == true && answer.get("rejected").is_none(),
                    "{status} {answer}"
                );
                events += batch as u64;
            }
            (events, hist)
        }));
    }
    Report::gather(name, start, tasks).await
}
