//! Operations: health, reflection, restart, SIGTERM, unimplemented RPCs.

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;
use prost::Message;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving_for_every_service() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "engage.v1.EventService",
        "engage.v1.SchemaService",
        "engage.v1.ActionService",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_turns_not_serving_when_shutdown_starts() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.stop());
    let next = watch
        .message()
        .await
        .unwrap()
        .expect("a status update before the stream ends");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    stopping.await.unwrap();
}

fn decode_files(bytes: &[Vec<u8>]) -> Vec<prost_types::FileDescriptorProto> {
    bytes
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect()
}

fn check_event_descriptor(files: &[prost_types::FileDescriptorProto]) {
    let common = files
        .iter()
        .find(|f| f.name() == "engage/v1/common.proto")
        .expect("common.proto among the files");
    let event = common.message_type.iter().find(|m| m.name() == "Event").unwrap();
    let field = event.field.iter().find(|f| f.name() == "occurred_at").unwrap();
    assert_eq!(
        field.json_name(),
        "occurredAt",
        "descriptors keep JSON field names"
    );
    let comments = common
        .source_code_info
        .as_ref()
        .expect("source info for describe");
    assert!(comments
        .location
        .iter()
        .any(|l| l.leading_comments().contains("idempotency key")));
}

/// One test per reflection version: the two generated APIs are alike but distinct types.
macro_rules! reflection_test {
    ($test:ident, $version:ident) => {
        #[tokio::test(flavor = "multi_thread")]
        async fn $test() {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            let server = TestServer::start().await;
            let mut client = ServerReflectionClient::new(server.channel().await);
            let request = |m| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(m),
            };
            let requests = vec![
                request(MessageRequest::ListServices(String::new())),
                request(MessageRequest::FileContainingSymbol(
                    "engage.v1.Event".into(),
                )),
            ];
            let mut stream = client
                .server_reflection_info(tokio_stream::iter(requests))
                .await
                .unwrap()
                .into_inner();
            let Some(MessageResponse::ListServicesResponse(list)) =
                stream.message().await.unwrap().unwrap().message_response
            else {
                panic!("expected a service list")
            };
            let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            for want in [
                "engage.v1.ActionService",
                "engage.v1.EventService",
                "engage.v1.QueryService",
                "engage.v1.SchemaService",
                "engage.v1.TriggerService",
                "grpc.health.v1.Health",
                concat!(
                    "grpc.reflection.",
                    stringify!($version),
                    ".ServerReflection"
                ),
            ] {
                assert!(
                    names.iter().any(|n| n == want),
                    "{want} missing from {names:?}"
                );
            }
            let Some(MessageResponse::FileDescriptorResponse(files)) =
                stream.message().await.unwrap().unwrap().message_response
            else {
                panic!("expected file descriptors")
            };
            check_event_descriptor(&decode_files(&files.file_descriptor_proto));
        }
    };
}

reflection_test!(reflection_v1_lists_every_service_with_json_names, v1);
reflection_test!(reflection_v1alpha_serves_old_grpcurl, v1alpha);

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_events_schema_and_sequences() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    server
        .schema()
        .await
        .define_attribute(proto::DefineAttributeRequest {
            name: "price".into(),
            r#type: proto::AttributeType::Number as i32,
            description: "in dollars".into(),
        })
        .await
        .unwrap();
    let mut last = 0;
    for i in 0..10 {
        last = track(&mut c, event("keep", "buy", &[("price", s(&i.to_string()))]))
            .await
            .unwrap()
            .sequence;
    }
    let before = timeline(&mut c, "keep").await;
    let server = server.restart().await;
    let mut c = server.events().await;
    assert_eq!(timeline(&mut c, "keep").await, before);
    let attrs = server
        .schema()
        .await
        .list_attributes(proto::ListAttributesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .attributes;
    assert_eq!(attrs.len(), 1);
    assert_eq!(attrs[0].description, "in dollars");
    // Typing still applies, and the sequence continues.
    let r = track(&mut c, event("keep", "buy", &[("price", s("x"))])).await;
    assert!(r.is_err());
    let next = track(&mut c, event("keep", "buy", &[])).await.unwrap();
    assert_eq!(next.sequence, last + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_flushes_and_exits_zero() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = data_dir(&tmp);
    let child = ChildServer::spawn(&dir);
    let mut c = child.events().await;
    let r = track(&mut c, event_at("term", "e", "kept-1", 1_000))
        .await
        .unwrap();
    drop(c);
    let status = child.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let child = ChildServer::spawn(&dir);
    let mut c = child.events().await;
    let again = track(&mut c, event_at("term", "e", "kept-1", 1_000))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.sequence, r.sequence);
    assert_eq!(child.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_sets_defaults_that_flags_override_and_unknown_settings_are_refused() {
    let files = tempfile::tempdir().unwrap();
    let config = files.path().join("engage.toml");
    std::fs::write(
        &config,
        "max_batch_events = 2\nmax-attributes-per-event = 1\nshutdown_grace_secs = 3\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(
        data.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--max-attributes-per-event",
            "3",
        ],
    );
    let start = server.log.wait_for(|l| l.contains("engage started"));
    assert!(start.contains("max_batch_events: 2"), "{start}");
    let mut c = server.events().await;
    let batch = |n: usize| proto::TrackEventsRequest {
        events: (0..n).map(|_| event("u", "visit", &[])).collect(),
    };
    let s = c.track_events(batch(3)).await.unwrap_err();
    assert!(s.message().contains("max_batch_events"), "{}", s.message());
    c.track_events(batch(2)).await.expect("the file's limit");
    // The flag wins over the file.
    let e = event("u", "visit", &[("a", n(1.0)), ("b", n(2.0))]);
    track(&mut c, e)
        .await
        .expect("two attributes: the flag's 3, not the file's 1");
    drop(server);

    std::fs::write(&config, "max_batch_event = 2\n").unwrap();
    match start_or_exit(data.path(), &["--config", config.to_str().unwrap()]) {
        Outcome::Started(_) => panic!("started with an unknown setting"),
        Outcome::Exited(status, stderr) => {
            assert!(!status.success());
            assert!(stderr.contains("max_batch_event"), "{stderr}");
        }
    }
}
