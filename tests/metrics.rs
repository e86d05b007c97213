//! Prometheus metrics (SPEC §8): a scripted workload against the binary, then a scrape over
//! HTTP with every value checked exactly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use engage::proto;
use engage::proto::action_service_client::ActionServiceClient;
use engage::proto::event_service_client::EventServiceClient;
use engage::proto::trigger_service_client::TriggerServiceClient;

/// The value of the series `name` with exactly `labels`, from a Prometheus text scrape.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: HashMap<&str, &str> = labels.iter().copied().collect();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, v) = line.rsplit_once(' ')?;
        let (n, got) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}')?;
                let got: HashMap<&str, &str> = body
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| {
                        let (k, v) = p.split_once("=\"")?;
                        Some((k, v.trim_end_matches('"')))
                    })
                    .collect();
                (n, got)
            }
            None => (series, HashMap::new()),
        };
        (n == name && got == want).then(|| v.parse().ok()).flatten()
    })
}

fn scrape(addr: &str) -> String {
    let mut response = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .expect("scrape");
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain")));
    response.body_mut().read_to_string().expect("body")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scrape_after_a_scripted_workload_shows_exact_values() {
    let keys = tempfile::tempdir().unwrap();
    let file = keys.path().join("keys.json");
    let admin = create_key(&file, "ops", "admin");
    let read = create_key(&file, "worker", "read");
    let web = create_key(&file, "web", "ingest");
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(
        data.path(),
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--api-keys-file",
            file.to_str().unwrap(),
            "--ingest-rate-per-key",
            "1",
            "--ingest-burst",
            "20",
        ],
    );
    let start: serde_json::Value =
        serde_json::from_str(&server.log.wait_for(|l| l.contains("engage started"))).unwrap();
    let metrics_addr = start["metrics_listen"].as_str().unwrap().to_string();
    assert!(metrics_addr.starts_with("127.0.0.1:"), "{start}");

    let channel = server.channel().await;
    let mut triggers = TriggerServiceClient::with_interceptor(channel.clone(), Bearer(admin.clone()));
    let fires = triggers
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(trigger("purchase", "email", "")),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    triggers
        .create_trigger(proto::CreateTriggerRequest {
            trigger: Some(proto::Trigger {
                delay: Some(prost_types::Duration {
                    seconds: 86_400,
                    nanos: 0,
                }),
                ..trigger("cart", "reminder", "")
            }),
        })
        .await
        .unwrap();
    let mut events = EventServiceClient::with_interceptor(channel.clone(), Bearer(admin.clone()));
    let one = |e: proto::Event| proto::TrackEventRequest { event: Some(e) };
    let purchase = |id: &str| proto::Event {
        event_id: id.into(),
        ..event("ann", "purchase", &[])
    };
    events.track_event(one(purchase("e1"))).await.unwrap();
    events.track_event(one(purchase("e2"))).await.unwrap();
    assert!(
        events
            .track_event(one(purchase("e1")))
            .await
            .unwrap()
            .into_inner()
            .duplicate
    );
    events.track_event(one(event("ann", "", &[]))).await.unwrap_err();
    let wide: Vec<(String, proto::AttributeValue)> = (0..101).map(|i| (format!("a{i}"), n(1.0))).collect();
    let wide = proto::Event {
        attributes: wide.into_iter().collect(),
        ..event("bob", "cart", &[])
    };
    let results = events
        .track_events(proto::TrackEventsRequest {
            events: vec![event("u1", "cart", &[]), event("u2", "cart", &[]), wide],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.iter().filter(|r| r.accepted).count(), 2);
    assert!(
        results[2].error.contains("max_attributes_per_event") || results[2].error.contains("at most"),
        "{}",
        results[2].error
    );
    // More than the burst: never admissible, a batch limit; every event counted.
    events
        .track_events(proto::TrackEventsRequest {
            events: (0..21).map(|_| event("c", "visit", &[])).collect(),
        })
        .await
        .unwrap_err();
    // Another key's whole burst, then a call over its rate (1 event/s: no cell comes back
    // within the test).
    let mut site = EventServiceClient::with_interceptor(channel.clone(), Bearer(web.clone()));
    site.track_events(proto::TrackEventsRequest {
        events: (0..20).map(|_| event("w", "visit", &[])).collect(),
    })
    .await
    .unwrap();
    let s = site
        .track_events(proto::TrackEventsRequest {
            events: (0..5).map(|_| event("w", "visit", &[])).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    // No key, and a key without the role.
    EventServiceClient::new(channel.clone())
        .track_event(one(event("x", "visit", &[])))
        .await
        .unwrap_err();
    EventServiceClient::with_interceptor(channel.clone(), Bearer(read.clone()))
        .track_event(one(event("x", "visit", &[])))
        .await
        .unwrap_err();
    // A named consumer that read both actions and acknowledged the first.
    let mut actions = ActionServiceClient::with_interceptor(channel.clone(), Bearer(read.clone()));
    let mut stream = actions
        .subscribe_actions(proto::SubscribeActionsRequest {
            consumer: "mailer".into(),
            start: proto::StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    stream.message().await.unwrap().unwrap();
    actions
        .ack_actions(proto::AckActionsRequest {
            consumer: "mailer".into(),
            up_to_sequence: first.sequence,
        })
        .await
        .unwrap();

    let text = tokio::task::spawn_blocking(move || scrape(&metrics_addr))
        .await
        .unwrap();
    let v = |name: &str, labels: &[(&str, &str)]| {
        value(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    assert_eq!(v("engage_events_stored_total", &[]), 24.0);
    assert_eq!(v("engage_events_duplicate_total", &[]), 1.0);
    for (reason, n) in [
        ("invalid", 1.0),
        ("limit", 22.0),
        ("rate_limited", 5.0),
        ("unauthenticated", 1.0),
        ("permission_denied", 1.0),
    ] {
        assert_eq!(
            v("engage_events_rejected_total", &[("reason", reason)]),
            n,
            "{reason}"
        );
    }
    assert_eq!(v("engage_actions_fired_total", &[("trigger_id", &fires)]), 2.0);
    assert_eq!(v("engage_timers_pending", &[]), 2.0);
    assert_eq!(v("engage_action_log_head_sequence", &[]), 2.0);
    assert_eq!(
        v("engage_consumer_acked_sequence", &[("consumer", "mailer")]),
        1.0
    );
    assert_eq!(v("engage_consumer_lag", &[("consumer", "mailer")]), 1.0);
    assert_eq!(v("engage_subscriptions_open", &[]), 1.0);
    let track = "engage.v1.EventService/TrackEvent";
    assert_eq!(
        v("engage_grpc_requests_total", &[("method", track), ("code", "OK")]),
        3.0
    );
    assert_eq!(
        v(
            "engage_grpc_requests_total",
            &[("method", track), ("code", "INVALID_ARGUMENT")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "engage_grpc_requests_total",
            &[("method", track), ("code", "UNAUTHENTICATED")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "engage_grpc_requests_total",
            &[("method", track), ("code", "PERMISSION_DENIED")]
        ),
        1.0
    );
    assert_eq!(
        v("engage_grpc_request_duration_seconds_count", &[("method", track)]),
        6.0
    );
    assert!(v("engage_flush_duration_seconds_count", &[]) >= 1.0);
    assert!(v("engage_write_group_size_count", &[]) >= 1.0);
    // Where writes spend their time: every stage of the write path has its histogram.
    for stage in ["queued", "build", "apply", "handoff", "answered"] {
        assert!(
            v("engage_write_stage_seconds_count", &[("stage", stage)]) >= 1.0,
            "{stage}"
        );
    }
    assert!(v("engage_storage_bytes", &[]) > 0.0);
    drop(stream);
}
