//! Typed ingest (README: typing rules and limits): coercion, auto-creation, rejection, idempotency, batches, limits.

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;
use engage::proto::attribute_value::Value as V;
use tonic::Code;

async fn attributes(server: &TestServer) -> Vec<proto::AttributeDefinition> {
    server
        .schema()
        .await
        .list_attributes(proto::ListAttributesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .attributes
}

/// Tracks one event carrying `value` as attribute `attr` and returns the stored value.
async fn stored(server: &TestServer, attr: &str, value: proto::AttributeValue) -> Result<V, tonic::Status> {
    let mut c = server.events().await;
    let r = track(&mut c, event("coerce-user", "probe", &[(attr, value)])).await?;
    let events = timeline(&mut c, "coerce-user").await;
    let e = events
        .iter()
        .find(|e| e.sequence == r.sequence)
        .expect("stored event");
    Ok(e.attributes[attr].value.clone().expect("value"))
}

#[tokio::test(flavor = "multi_thread")]
async fn defined_attributes_are_coerced_to_their_type() {
    use proto::AttributeType as T;
    let server = TestServer::start().await;
    for (name, t) in [
        ("num", T::Number),
        ("flag", T::Boolean),
        ("when", T::Date),
        ("doc", T::Json),
        ("text", T::String),
    ] {
        define(&server, name, t).await;
    }
    let cases: Vec<(&str, proto::AttributeValue, V)> = vec![
        ("num", s("39"), V::NumberValue(39.0)),
        ("num", s(" 39.5 "), V::NumberValue(39.5)),
        ("num", s("-1.5e2"), V::NumberValue(-150.0)),
        ("num", n(7.25), V::NumberValue(7.25)),
        ("flag", s("TRUE"), V::BoolValue(true)),
        ("flag", s("false"), V::BoolValue(false)),
        ("flag", b(true), V::BoolValue(true)),
        ("when", s("2026-01-31"), V::DateValue(ts(1_769_817_600))),
        (
            "when",
            s("2026-01-31T01:00:00+01:00"),
            V::DateValue(ts(1_769_817_600)),
        ),
        ("when", d(1_769_817_600), V::DateValue(ts(1_769_817_600))),
        (
            "doc",
            j("{ \"a\": [1, 2] }"),
            V::JsonValue("{\"a\":[1,2]}".into()),
        ),
        ("doc", s("[true, null]"), V::JsonValue("[true,null]".into())),
        ("text", n(39.0), V::StringValue("39".into())),
        ("text", n(39.5), V::StringValue("39.5".into())),
        ("text", b(true), V::StringValue("true".into())),
        ("text", d(0), V::StringValue("1970-01-01T00:00:00Z".into())),
        ("text", j("{\"k\": 1}"), V::StringValue("{\"k\":1}".into())),
        ("text", s("teal"), V::StringValue("teal".into())),
    ];
    for (attr, input, want) in cases {
        let got = stored(&server, attr, input.clone()).await.expect("accepted");
        assert_eq!(got, want, "{attr} <- {input:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn uncoercible_values_reject_the_whole_event_naming_attribute_type_and_value() {
    use proto::AttributeType as T;
    let server = TestServer::start().await;
    for (name, t) in [
        ("num", T::Number),
        ("flag", T::Boolean),
        ("when", T::Date),
        ("doc", T::Json),
    ] {
        define(&server, name, t).await;
    }
    let cases: Vec<(&str, proto::AttributeValue, &str)> = vec![
        ("num", s("abc"), "\"abc\""),
        ("num", s("NaN"), "\"NaN\""),
        ("num", s("inf"), "\"inf\""),
        ("num", b(true), "true"),
        ("flag", s("yes"), "\"yes\""),
        ("flag", n(1.0), "1"),
        ("when", s("31/01/2026"), "\"31/01/2026\""),
        ("when", n(5.0), "5"),
        ("doc", s("{oops"), "\"{oops\""),
        ("doc", n(1.0), "1"),
    ];
    let mut c = server.events().await;
    for (attr, input, shown) in cases {
        let e = event("u1", "bad", &[(attr, input), ("fresh_attr", s("x"))]);
        let err = track(&mut c, e).await.expect_err("rejected");
        assert_eq!(err.code(), Code::InvalidArgument);
        let ty = match attr {
            "num" => "NUMBER",
            "flag" => "BOOLEAN",
            "when" => "DATE",
            _ => "JSON",
        };
        for part in [attr, ty, shown] {
            assert!(err.message().contains(part), "{:?} lacks {part}", err.message());
        }
    }
    // Nothing was stored: no event, no event name, no auto-created attribute.
    assert!(timeline(&mut c, "u1").await.is_empty());
    assert!(attributes(&server).await.iter().all(|a| a.name != "fresh_attr"));
    let names = server
        .schema()
        .await
        .list_event_names(proto::ListEventNamesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(names.event_names.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn non_finite_numbers_and_empty_values_are_rejected() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    let err = track(&mut c, event("u", "e", &[("x", n(f64::INFINITY))]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("attributes[\"x\"]"), "{}", err.message());
    let err = track(
        &mut c,
        event("u", "e", &[("x", proto::AttributeValue { value: None })]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("no value set"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn undefined_attributes_are_created_as_string_except_json() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    let r = track(
        &mut c,
        event(
            "u1",
            "event.app_created",
            &[
                ("price", s("39")),
                ("size", n(39.0)),
                ("meta", j("{\"a\": 1}")),
                ("express", b(true)),
            ],
        ),
    )
    .await
    .unwrap();
    assert!(!r.duplicate);
    let attrs = attributes(&server).await;
    let names: Vec<_> = attrs
        .iter()
        .map(|a| (a.name.as_str(), a.r#type, a.auto_created))
        .collect();
    use proto::AttributeType as T;
    assert_eq!(
        names,
        vec![
            ("express", T::String as i32, true),
            ("meta", T::Json as i32, true),
            ("price", T::String as i32, true),
            ("size", T::String as i32, true),
        ]
    );
    let e = &timeline(&mut c, "u1").await[0];
    assert_eq!(e.name, "app_created", "event. prefix is stripped");
    assert_eq!(e.attributes["price"].value, Some(V::StringValue("39".into())));
    assert_eq!(e.attributes["size"].value, Some(V::StringValue("39".into())));
    // From now on the auto-created STRING is a definition like any other.
    let r = track(&mut c, event("u1", "app_created", &[("size", n(40.5))]))
        .await
        .unwrap();
    let e = timeline(&mut c, "u1")
        .await
        .into_iter()
        .find(|e| e.sequence == r.sequence)
        .unwrap();
    assert_eq!(e.attributes["size"].value, Some(V::StringValue("40.5".into())));
}

#[tokio::test(flavor = "multi_thread")]
async fn redefining_with_another_type_fails_and_the_same_type_is_a_no_op() {
    let server = TestServer::start().await;
    let first = define(&server, "price", proto::AttributeType::Number).await;
    assert!(!first.auto_created);
    let again = define(&server, "price", proto::AttributeType::Number).await;
    assert_eq!(again, first);
    let err = try_define(&server, "price", proto::AttributeType::String as i32)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("price") && err.message().contains("NUMBER"));
    // Auto-created attributes are definitions too.
    let mut c = server.events().await;
    track(&mut c, event("u", "e", &[("color", n(3.0))]))
        .await
        .unwrap();
    let err = try_define(&server, "color", proto::AttributeType::Number as i32)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Bad definitions.
    for (name, t, field) in [
        ("1bad", proto::AttributeType::Number as i32, "name"),
        ("", proto::AttributeType::Number as i32, "name"),
        ("ok", 0, "type"),
        ("ok", 42, "type"),
    ] {
        let err = try_define(&server, name, t).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    assert_eq!(attributes(&server).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn price_39_is_a_number_only_when_defined_beforehand() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    track(&mut c, event("a", "buy", &[("price", s("39"))]))
        .await
        .unwrap();
    define(&server, "amount", proto::AttributeType::Number).await;
    track(&mut c, event("a", "buy", &[("amount", s("39"))]))
        .await
        .unwrap();
    let events = timeline(&mut c, "a").await;
    assert_eq!(
        events[0].attributes["price"].value,
        Some(V::StringValue("39".into()))
    );
    assert_eq!(events[1].attributes["amount"].value, Some(V::NumberValue(39.0)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_event_id_is_a_duplicate_with_the_original_sequence() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    let first = track(&mut c, event_at("u", "buy", "evt-1", 1_700_000_000))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.event_id, "evt-1");
    let mut retry = event_at("u", "buy", "evt-1", 1_700_000_000);
    retry.attributes.insert("changed".into(), s("x"));
    let again = track(&mut c, retry).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(timeline(&mut c, "u").await.len(), 1);
    assert!(attributes(&server).await.is_empty(), "a duplicate stores nothing");
    // Within one batch too, and across a restart.
    let batch = c
        .track_events(proto::TrackEventsRequest {
            events: vec![event_at("u", "buy", "evt-2", 1), event_at("u", "buy", "evt-2", 1)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(!batch[0].duplicate && batch[1].duplicate);
    assert_eq!(batch[0].sequence, batch[1].sequence);
    let server = server.restart().await;
    let mut c = server.events().await;
    let r = track(&mut c, event_at("u", "buy", "evt-1", 1_700_000_000))
        .await
        .unwrap();
    assert!(r.duplicate);
    assert_eq!(r.sequence, first.sequence);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_generated_ids_sort_by_time_and_sequences_increase() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    let mut last_id = String::new();
    let mut last_seq = 0;
    for _ in 0..50 {
        let r = track(&mut c, event("u", "tick", &[])).await.unwrap();
        assert_eq!(r.event_id.len(), 26, "a ULID");
        assert!(r.event_id > last_id, "{} after {last_id}", r.event_id);
        assert!(r.sequence > last_seq);
        last_id = r.event_id;
        last_seq = r.sequence;
    }
    let events = timeline(&mut c, "u").await;
    assert_eq!(events[0].sequence, 1, "sequences start at 1");
    let e = &events[0];
    assert!(e.received_at.is_some());
    assert_eq!(
        e.occurred_at, e.received_at,
        "occurred_at defaults to receive time"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_rejects_bad_events_alone_and_answers_in_order() {
    let server = TestServer::start().await;
    define(&server, "price", proto::AttributeType::Number).await;
    let mut c = server.events().await;
    let events = vec![
        event("a", "buy", &[("price", s("10"))]),
        event("a", "buy", &[("price", s("ten"))]),
        event("", "buy", &[]),
        event("b", "bad name!", &[]),
        event("b", "buy", &[("new_attr", s("x"))]),
    ];
    let results = c
        .track_events(proto::TrackEventsRequest { events })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 5);
    let accepted: Vec<_> = results.iter().map(|r| r.accepted).collect();
    assert_eq!(accepted, [true, false, false, false, true]);
    assert!(
        results[1].error.starts_with("events[1].attributes[\"price\"]"),
        "{}",
        results[1].error
    );
    assert!(
        results[2].error.starts_with("events[2].user_id"),
        "{}",
        results[2].error
    );
    assert!(
        results[3].error.starts_with("events[3].name"),
        "{}",
        results[3].error
    );
    assert_eq!(results[1].sequence, 0);
    assert!(results[4].sequence > results[0].sequence);
    assert!(results[4].error.is_empty());
    assert_eq!(timeline(&mut c, "a").await.len(), 1);
    assert_eq!(timeline(&mut c, "b").await.len(), 1);
}

async fn rejected(server: &TestServer, e: proto::Event) -> tonic::Status {
    let mut c = server.events().await;
    track(&mut c, e).await.expect_err("rejected")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_default_limit_is_enforced_with_a_message_naming_it() {
    let server = TestServer::start().await;
    let attrs: Vec<(String, proto::AttributeValue)> = (0..101).map(|i| (format!("a{i}"), n(1.0))).collect();
    let refs: Vec<(&str, proto::AttributeValue)> =
        attrs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let err = rejected(&server, event("u", "e", &refs)).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_attributes_per_event"),
        "{}",
        err.message()
    );
    // 100 is fine.
    let mut c = server.events().await;
    track(&mut c, event("ok", "e", &refs[..100])).await.unwrap();

    let long_name = "a".repeat(129);
    let err = rejected(&server, event("u", "e", &[(&long_name, n(1.0))])).await;
    assert!(
        err.message().contains("max_attribute_name_chars"),
        "{}",
        err.message()
    );

    let err = rejected(&server, event("u", "e", &[("big", s(&"x".repeat(8 * 1024 + 1)))])).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_string_value_bytes"),
        "{}",
        err.message()
    );
    track(&mut c, event("ok", "e", &[("big_ok", s(&"x".repeat(8 * 1024)))]))
        .await
        .unwrap();

    let big_json = format!("\"{}\"", "x".repeat(64 * 1024));
    let err = rejected(&server, event("u", "e", &[("doc", j(&big_json))])).await;
    assert!(
        err.message().contains("max_json_value_bytes"),
        "{}",
        err.message()
    );

    let mut future = event("u", "e", &[]);
    future.occurred_at = Some(ts(jiff::Timestamp::now().as_second() + 25 * 3600));
    let err = rejected(&server, future).await;
    assert!(err.message().contains("occurred_at") && err.message().contains("max_future_skew"));
    let mut soon = event("ok", "e", &[]);
    soon.occurred_at = Some(ts(jiff::Timestamp::now().as_second() + 23 * 3600));
    track(&mut c, soon).await.unwrap();

    let err = rejected(&server, event(&"u".repeat(257), "e", &[])).await;
    assert!(err.message().starts_with("event.user_id"), "{}", err.message());
    track(&mut c, event(&"é".repeat(128), "e", &[])).await.unwrap();
    let err = rejected(&server, event("u", &"n".repeat(129), &[])).await;
    assert!(err.message().starts_with("event.name"), "{}", err.message());
    let mut bad_id = event("u", "e", &[]);
    bad_id.event_id = "i".repeat(129);
    assert!(rejected(&server, bad_id)
        .await
        .message()
        .starts_with("event.event_id"));
    let mut bad_ts = event("u", "e", &[]);
    bad_ts.occurred_at = Some(prost_types::Timestamp {
        seconds: 0,
        nanos: -1,
    });
    assert!(rejected(&server, bad_ts)
        .await
        .message()
        .starts_with("event.occurred_at"));

    let batch: Vec<_> = (0..1001).map(|_| event("u", "e", &[])).collect();
    let err = c
        .track_events(proto::TrackEventsRequest { events: batch })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("max_batch_events"), "{}", err.message());

    // The transport's message cap answers OUT_OF_RANGE.
    let huge: Vec<_> = (0..40)
        .map(|i| (format!("h{i}"), s(&"x".repeat(8 * 1024))))
        .collect();
    let huge_refs: Vec<(&str, proto::AttributeValue)> =
        huge.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let batch: Vec<_> = (0..20).map(|_| event("u", "e", &huge_refs)).collect();
    let err = c
        .track_events(proto::TrackEventsRequest { events: batch })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());

    // Nothing from the rejected events was stored.
    assert!(timeline(&mut c, "u").await.is_empty());
    let a = attributes(&server).await;
    assert!(a
        .iter()
        .all(|d| !["big", "doc", "a100"].contains(&d.name.as_str())));
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_configurable() {
    let server = TestServer::start_with(|a| {
        a.max_attributes_per_event = 2;
        a.max_batch_events = 3;
    })
    .await;
    let mut c = server.events().await;
    let err = track(
        &mut c,
        event("u", "e", &[("a", n(1.0)), ("b", n(1.0)), ("c", n(1.0))]),
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("limit is 2"), "{}", err.message());
    let err = c
        .track_events(proto::TrackEventsRequest {
            events: (0..4).map(|_| event("u", "e", &[])).collect(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("limit is 3"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn track_event_without_an_event_names_the_field() {
    let server = TestServer::start().await;
    let err = server
        .events()
        .await
        .track_event(proto::TrackEventRequest { event: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("event"), "{}", err.message());
    let empty = server
        .events()
        .await
        .track_events(proto::TrackEventsRequest { events: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty());
}

#[tokio::test]
async fn a_track_event_without_an_event_names_the_field() {
    let server = TestServer::start().await;
    let s = server
        .events()
        .await
        .track_event(proto::TrackEventRequest { event: None })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert_eq!(s.message(), "event: required");
}
