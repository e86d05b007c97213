//! Hostile and damaged input: nothing accepted can jam a reader, no client mistake answers
//! INTERNAL, no message repeats unbounded input, no damaged file panics.
// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use engage::proto;
use tonic::{Code, Status};

/// Sends `body` as the request of `path`, whatever it holds.
async fn raw_call(server: &TestServer, path: &'static str, body: Vec<u8>) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(Bytes::from(body)),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

#[derive(Clone, Copy)]
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

/// A condition nested `depth` levels deep in `not`.
fn nested_not(depth: usize) -> proto::Condition {
    let mut c = history_cond(history(
        "purchase",
        proto::Aggregate::Count,
        "",
        proto::Operator::Gte,
        1.0,
    ));
    for _ in 0..depth {
        c = proto::Condition {
            kind: Some(proto::condition::Kind::Not(Box::new(c))),
        };
    }
    c
}

#[tokio::test]
async fn requests_that_do_not_decode_are_invalid_argument_with_a_short_message() {
    let server = TestServer::start().await;
    // A field 3 (name) holding invalid UTF-8 inside an Event inside TrackEventRequest.
    let event = [0x1a, 0x02, 0xff, 0xfe];
    let mut body = vec![0x0a, event.len() as u8];
    body.extend_from_slice(&event);
    let bad_utf8 = raw_call(&server, "/engage.v1.EventService/TrackEvent", body).await;
    // Truncated: a length prefix promising more bytes than follow.
    let truncated = raw_call(
        &server,
        "/engage.v1.EventService/TrackEvent",
        vec![0x0a, 0x40, 0x01],
    )
    .await;
    // A wrong wire type: field 1 as a varint where a message is expected.
    let wire_type = raw_call(
        &server,
        "/engage.v1.SchemaService/DefineAttribute",
        vec![0x0d, 1, 2, 3, 4],
    )
    .await;
    for (what, result) in [
        ("utf-8", bad_utf8),
        ("truncated", truncated),
        ("wire type", wire_type),
    ] {
        let err = result.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().starts_with("request: "),
            "{what}: {}",
            err.message()
        );
        assert!(!err.message().contains("Protobuf"), "{what}: {}", err.message());
    }
    // Nested deeper than the decoder allows.
    let mut q = proto::query_service_client::QueryServiceClient::new(server.channel().await);
    let err = q
        .filter_users(proto::FilterUsersRequest {
            filter: Some(nested_not(120)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("nested too deeply"), "{}", err.message());
    // Nothing was stored by any of them.
    let mut events = server.events().await;
    let names = server
        .schema()
        .await
        .list_event_names(proto::ListEventNamesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(names.event_names.is_empty());
    assert!(timeline(&mut events, "u").await.is_empty());
}

#[tokio::test]
async fn error_messages_never_repeat_unbounded_input() {
    let server = TestServer::start().await;
    let long = "x".repeat(200_000);
    let mut t = server.triggers().await;
    let err = t
        .get_trigger(proto::GetTriggerRequest { id: long.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().len() <= 1024, "{} bytes", err.message().len());
    assert!(err.message().starts_with("id: "), "{}", &err.message()[..40]);
    let err = server
        .schema()
        .await
        .define_attribute(proto::DefineAttributeRequest {
            name: long.clone(),
            r#type: proto::AttributeType::String as i32,
            description: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() <= 1024, "{} bytes", err.message().len());
    // The per-event errors of a batch too.
    let mut events = server.events().await;
    let r = events
        .track_events(proto::TrackEventsRequest {
            events: vec![event("u", &long[..100_000], &[])],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.results[0].accepted);
    assert!(
        r.results[0].error.len() <= 1024,
        "{} bytes",
        r.results[0].error.len()
    );
    assert!(
        r.results[0].error.starts_with("events[0].name"),
        "{}",
        &r.results[0].error[..40]
    );
}
