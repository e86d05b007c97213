//! Hostile and damaged input: nothing accepted can jam a reader, no client mistake answers
//! INTERNAL, no message repeats unbounded input, no damaged file panics.
// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use engage::proto;
use tonic::{Code, Status};

/// Sends `body` as the request of `path`, whatever it holds.
async fn raw_call(server: &TestServer, path: &'static str, body: Vec<u8>) -> Result<Bytes, Status> {
    raw_unary(server.channel().await, path, Bytes::from(body), None).await
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

/// An event with attributes whose names are built (the common `event` takes borrowed names).
fn event_with(
    user: &str,
    name: &str,
    attributes: impl IntoIterator<Item = (String, proto::AttributeValue)>,
) -> proto::Event {
    proto::Event {
        attributes: attributes.into_iter().collect(),
        ..event(user, name, &[])
    }
}

/// An event of about `bytes` bytes: JSON attributes of 60 KiB each (within every limit).
fn big_event(user: &str, name: &str, bytes: usize) -> proto::Event {
    let chunk = format!("\"{}\"", "j".repeat(60 * 1024));
    event_with(
        user,
        name,
        (0..bytes / (60 * 1024)).map(|i| (format!("a{i}"), j(&chunk))),
    )
}

/// An event with `n` STRING attributes of 8 KiB.
fn wide_event(user: &str, n: usize) -> proto::Event {
    event_with(
        user,
        "wide",
        (0..n).map(|i| (format!("s{i}"), s(&"s".repeat(8 * 1024)))),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_too_large_for_a_message_is_delivered_with_its_event_trimmed() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    // A payload of two large attributes: the action with the event's copy outgrows a message.
    create_trigger(
        &mut t,
        trigger("big", "x", "{{ event.attributes.a0 }}{{ event.attributes.a1 }}"),
    )
    .await
    .unwrap();
    // A template that repeats a large attribute: bounded by the payload limit, renders empty.
    create_trigger(
        &mut t,
        trigger(
            "big",
            "loop",
            "{% for i in range(100) %}{{ event.attributes.a0 }}{% endfor %}",
        ),
    )
    .await
    .unwrap();
    let mut c = server.events().await;
    assert_eq!(fired(&mut c, event("u", "small", &[])).await, 0);
    // 4.1 MB: within every limit, and so is its answer; its first action with a copy of it is not.
    let r = track(&mut c, big_event("u", "big", 4_150_000))
        .await
        .expect("a large event is accepted");
    assert_eq!(r.actions_fired, 2);
    assert_eq!(fired(&mut c, event("u", "big", &[])).await, 2);
    let mut a = server.actions().await;
    let mut stream = a
        .subscribe_actions(proto::SubscribeActionsRequest {
            start: proto::StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            stream
                .message()
                .await
                .expect("the stream moves")
                .expect("an action"),
        );
    }
    assert_eq!(
        got.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(got[0].event_truncated, "the action keeps its 4.1 MB event");
    let e = got[0].event.as_ref().expect("the event, without attributes");
    assert!(e.attributes.is_empty());
    assert_eq!(e.name, "big");
    assert_eq!(got[0].payload.len(), 2 * (60 * 1024 + 2), "the payload is whole");
    assert_eq!(got[1].payload, "", "a payload past its limit renders empty");
    assert!(!got[1].event_truncated, "with an empty payload the event fits");
    assert_eq!(got[1].event.as_ref().map(|e| e.attributes.len()), Some(67));
    assert!(!got[2].event_truncated && !got[3].event_truncated);
    // Listing works, pages cut short by the byte budget included ("": every user's).
    let all = user_actions(&mut a, "").await;
    assert_eq!(
        all.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        vec![4, 3, 2, 1]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_too_large_to_answer_is_refused_and_not_stored() {
    let server = TestServer::start().await;
    let values: Vec<proto::AttributeValue> = (0..246_600).map(|i| s(&format!("value-{i:07}"))).collect();
    let cond = proto::Condition {
        kind: Some(proto::condition::Kind::Attribute(proto::AttributeCondition {
            attribute: "color".into(),
            op: proto::Operator::In as i32,
            value: None,
            values,
        })),
    };
    let mut t = server.triggers().await;
    let mut tr = trigger("e", "x", "");
    tr.condition = Some(cond);
    let bytes = prost::Message::encoded_len(&tr);
    assert!(bytes > 4_190_300 && bytes < 4_194_000, "{bytes}");
    let err = create_trigger(&mut t, tr).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("trigger: "), "{}", err.message());
    let list = t
        .list_triggers(proto::ListTriggersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.triggers.is_empty(), "nothing stored");
}

#[tokio::test]
async fn conditions_are_bounded_in_nodes_depth_and_history_conditions() {
    let server = TestServer::start().await;
    let h = || {
        history_cond(history(
            "e",
            proto::Aggregate::Count,
            "",
            proto::Operator::Gte,
            1.0,
        ))
    };
    let any = |conditions| proto::Condition {
        kind: Some(proto::condition::Kind::Any(proto::ConditionList { conditions })),
    };
    let mut q = proto::query_service_client::QueryServiceClient::new(server.channel().await);
    for (filter, limit) in [
        (any((0..51).map(|_| h()).collect()), "max_history_conditions"),
        (nested_not(16), "max_condition_depth"),
        (
            any((0..1000).map(|_| nested_not(0)).collect()),
            "max_condition_nodes",
        ),
    ] {
        let err = q
            .filter_users(proto::FilterUsersRequest {
                filter: Some(filter.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with("filter: ") && err.message().contains(limit),
            "{}",
            err.message()
        );
        let mut t = server.triggers().await;
        let mut tr = trigger("e", "x", "");
        tr.condition = Some(filter);
        let err = create_trigger(&mut t, tr).await.unwrap_err();
        assert!(
            err.message().starts_with("trigger.condition: ") && err.message().contains(limit),
            "{}",
            err.message()
        );
    }
    // At the limits, accepted.
    q.filter_users(proto::FilterUsersRequest {
        filter: Some(any((0..50).map(|_| h()).collect())),
        ..Default::default()
    })
    .await
    .expect("50 history conditions");
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_stop_a_page_before_the_message_limit() {
    // A small message limit makes small data overflow one answer.
    let server = TestServer::start_with(|a| a.max_message_bytes = 64 * 1024).await;
    let mut c = server.events().await;
    // 600 attributes and 600 event names, through batches.
    for b in 0..6 {
        let events = (0..100)
            .map(|i| {
                let n = b * 100 + i;
                let attr = format!("attr_{n:04}_{}", "long".repeat(25));
                event("u", &format!("name_{n:04}"), &[(attr.as_str(), s("v"))])
            })
            .collect();
        let r = c
            .track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|r| r.accepted));
    }
    let mut schema = server.schema().await;
    let (mut attrs, mut names, mut pages) = (Vec::new(), Vec::new(), 0);
    let mut token = String::new();
    loop {
        let r = schema
            .list_attributes(proto::ListAttributesRequest {
                page_size: 0,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        attrs.extend(r.attributes.into_iter().map(|a| a.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(attrs.len(), 600);
    assert!(pages > 1, "600 attributes fit one 64 KiB answer?");
    let mut token = String::new();
    loop {
        let r = schema
            .list_event_names(proto::ListEventNamesRequest {
                page_size: 250,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.event_names.len() <= 250);
        names.extend(r.event_names.into_iter().map(|n| n.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(names.len(), 600);
    // Events of 56 KiB each: the default page of 50 would be 2.8 MB; each page stops in time.
    for _ in 0..3 {
        track(&mut c, wide_event("big-user", 7)).await.unwrap();
    }
    assert_eq!(timeline(&mut c, "big-user").await.len(), 3);
    // An event that could not fit an answer once stored is refused.
    let mut too_big = wide_event("big-user", 7);
    too_big.attributes.insert("t".into(), s(&"t".repeat(4000)));
    let err = track(&mut c, too_big).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("event: "), "{}", err.message());
}

/// A data directory holding 4 000 acknowledged events (written by a real server, stopped).
async fn filled_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = ChildServer::spawn(&data_dir(&tmp));
    let mut c = server.events().await;
    for b in 0..4 {
        let events = (0..1000)
            .map(|i| {
                event(
                    &format!("user-{}", (b * 1000 + i) % 97),
                    "tick",
                    &[("n", n(i as f64))],
                )
            })
            .collect();
        let r = c
            .track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|r| r.accepted));
    }
    drop(c);
    assert!(server.terminate().success());
    tmp
}

fn assert_clean_refusal(status: std::process::ExitStatus, stderr: &str, want: &str) {
    assert!(!status.success(), "exit {status}");
    assert_ne!(status.code(), Some(101), "a panic's exit code: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("engage failed") && last.contains(want),
        "last line: {last}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_file_cut_short_is_refused_naming_the_lost_writes() {
    let tmp = filled_dir().await;
    let dir = data_dir(&tmp);
    let db = dir.join("db");
    let len = std::fs::metadata(&db).expect("db").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open db")
        .set_len(len / 2)
        .expect("truncate");
    match start_or_exit(&dir, &[]) {
        Outcome::Started(_) => panic!("served a data directory that lost acknowledged writes"),
        Outcome::Exited(status, stderr) => {
            if stderr.contains("lost acknowledged writes") {
                assert_clean_refusal(status, &stderr, "but events up to 4000");
            } else {
                assert_clean_refusal(status, &stderr, "damaged");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_data_files_never_panic_and_never_serve_less_than_was_acknowledged() {
    let mut outcomes = Vec::new();
    for seed in 0..9u64 {
        let tmp = filled_dir().await;
        let dir = data_dir(&tmp);
        let db = dir.join("db");
        let mut bytes = std::fs::read(&db).expect("db");
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        if seed % 3 == 0 {
            // Bit flips, weighted to the end of the file where the newest writes are.
            for _ in 0..64 {
                let at = bytes.len() - 1 - next(bytes.len() / 4);
                bytes[at] ^= 1 << next(8);
            }
        } else if seed % 3 == 1 {
            // Bit flips anywhere, the start (sled's metadata) included.
            for _ in 0..256 {
                let at = next(bytes.len());
                bytes[at] ^= 1 << next(8);
            }
        } else {
            // A zeroed 64 KiB block.
            let at = next(bytes.len().saturating_sub(65_536).max(1));
            let end = (at + 65_536).min(bytes.len());
            for b in &mut bytes[at..end] {
                *b = 0;
            }
        }
        std::fs::write(&db, &bytes).expect("damage");
        match start_or_exit(&dir, &[]) {
            Outcome::Exited(status, stderr) => {
                let last = stderr.lines().last().unwrap_or_default().to_string();
                assert_clean_refusal(status, &stderr, "");
                outcomes.push(format!("seed {seed}: refused: {last}"));
            }
            Outcome::Started(server) => {
                // It may start only with everything acknowledged: the next event is 4001.
                let mut c = server.events().await;
                let r = track(&mut c, event("probe", "tick", &[])).await.expect("track");
                assert_eq!(
                    r.sequence, 4001,
                    "seed {seed}: served a store missing acknowledged events"
                );
                outcomes.push(format!("seed {seed}: served everything"));
            }
        }
    }
    eprintln!("{}", outcomes.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_data_loss_serves_what_is_left_and_resets_the_mark() {
    let tmp = filled_dir().await;
    let dir = data_dir(&tmp);
    // Lose everything sled holds, keep the mark: as a file cut to nothing would.
    for entry in std::fs::read_dir(&dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n != "engage.hwm") {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("rm");
            } else {
                std::fs::remove_file(&path).expect("rm");
            }
        }
    }
    match start_or_exit(&dir, &[]) {
        Outcome::Started(_) => panic!("served an emptied data directory"),
        Outcome::Exited(status, stderr) => assert_clean_refusal(status, &stderr, "lost acknowledged writes"),
    }
    let Outcome::Started(server) = start_or_exit(&dir, &["--accept-data-loss"]) else {
        panic!("--accept-data-loss did not start");
    };
    let mut c = server.events().await;
    assert_eq!(track(&mut c, event("u", "tick", &[])).await.unwrap().sequence, 1);
    drop(c);
    assert!(server.terminate().success());
    // From then on it starts without the flag.
    let Outcome::Started(server) = start_or_exit(&dir, &[]) else {
        panic!("the reset mark still refuses");
    };
    drop(server);
}

#[tokio::test]
async fn an_event_at_the_earliest_time_is_counted_once_and_seen_by_its_window() {
    let server = TestServer::start().await;
    let min = -62_135_596_800i64; // 0001-01-01T00:00:00Z
    let mut t = server.triggers().await;
    create_trigger(
        &mut t,
        proto::Trigger {
            condition: Some(history_cond(proto::HistoryCondition {
                within: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..history("first", proto::Aggregate::Count, "", proto::Operator::Gte, 1.0)
            })),
            ..trigger("first", "x", "")
        },
    )
    .await
    .unwrap();
    let mut c = server.events().await;
    assert_eq!(
        fired(&mut c, event_at("u", "first", "e1", min)).await,
        1,
        "the event is in its own window"
    );
    // A second event in the first hour, past the first minute: the partial-minute pieces at the
    // range's ends must not count the earliest one again.
    track(&mut c, event_at("u", "first", "e2", min + 90))
        .await
        .unwrap();
    let mut q = proto::query_service_client::QueryServiceClient::new(server.channel().await);
    let r = q
        .get_event_stats(proto::GetEventStatsRequest {
            event_name: "first".into(),
            from: Some(ts(min)),
            to: Some(ts(min + 3600)),
            granularity: proto::Granularity::Hour as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.total, 2.0, "{r:?}");
    assert_eq!(r.buckets[0].events, 2, "{r:?}");
}

#[tokio::test]
async fn names_that_could_not_be_named_back_and_impossible_dates_are_refused() {
    let server = TestServer::start().await;
    define(&server, "when", proto::AttributeType::Date).await;
    let mut c = server.events().await;
    let err = track(&mut c, event("u", "event.event.x", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("event.name: "), "{}", err.message());
    for date in ["2026-01-01T00:00:00+25:00", "2026-12-31T23:59:60Z"] {
        let err = track(&mut c, event("u", "e", &[("when", s(date))]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{date}");
        assert!(
            err.message().contains("attributes[\"when\"]"),
            "{}",
            err.message()
        );
    }
    assert!(timeline(&mut c, "u").await.is_empty(), "nothing stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_with_a_stalled_subscriber_keeps_to_one_grace_period() {
    let server = TestServer::start_with(|a| a.shutdown_grace_secs = 2).await;
    let mut t = server.triggers().await;
    // 6 KB payloads: the stream's windows and buffers fill long before the log is read.
    create_trigger(&mut t, trigger("tick", "count", &"p".repeat(6000)))
        .await
        .unwrap();
    let stalled = server
        .actions()
        .await
        .subscribe_actions(proto::SubscribeActionsRequest {
            start: proto::StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut c = server.events().await;
    for _ in 0..4 {
        let events = (0..500).map(|_| event("u", "tick", &[])).collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    drop(c);
    // The grace period is a deadline for the whole shutdown: calls, streams and engine.
    let started = std::time::Instant::now();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), server.stop()).await;
    assert!(stopped.is_ok(), "shutdown hung");
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(3900),
        "shutdown took {took:?} with a 2 s grace period"
    );
    drop(stalled);
}

/// The resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("rss")
        .parse()
        .expect("number");
    pages * 4096
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_subscribers_hold_a_bounded_number_of_bytes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = ChildServer::spawn_with(&data_dir(&tmp), &["--max-subscriber-buffer-bytes", "65536"]);
    let pid = server.child.id();
    let channel = server.channel().await;
    let mut t = proto::trigger_service_client::TriggerServiceClient::new(channel.clone());
    create_trigger(&mut t, trigger("tick", "count", &"p".repeat(6000)))
        .await
        .unwrap();
    let mut c = server.events().await;
    for _ in 0..4 {
        let events = (0..500).map(|_| event("u", "tick", &[])).collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    let subscribe = |channel: tonic::transport::Channel| async move {
        proto::action_service_client::ActionServiceClient::new(channel)
            .subscribe_actions(proto::SubscribeActionsRequest {
                start: proto::StartFrom::Earliest as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };
    let before = rss(pid);
    // 200 streams from the start of a 12 MB log that never read.
    let mut stalled = Vec::new();
    for _ in 0..200 {
        stalled.push(subscribe(server.channel().await).await);
    }
    // A subscriber that reads everything, while more actions fire: by the time it has them all,
    // the stalled readers have had every chance to fill whatever they may hold.
    let mut live = subscribe(channel.clone()).await;
    for _ in 0..2 {
        let events = (0..500).map(|_| event("u", "tick", &[])).collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    for _ in 0..3000 {
        live.message().await.unwrap().expect("an action");
    }
    let grown = rss(pid).saturating_sub(before);
    // Unbounded, each stalled stream held 320 actions of 6 KB (about 2 MB, 400 MB in all) besides
    // what HTTP/2 buffers.
    eprintln!("200 stalled subscribers: the server grew by {} MB", grown >> 20);
    assert!(
        grown < 200 << 20,
        "200 stalled subscribers took {} MB",
        grown >> 20
    );
    drop(stalled);
}

/// How often `needle` appears in the bytes of every file under `dir`: in the raw bytes, and in
/// every zstd frame found in them decompressed (sled compresses what it writes, so a plain
/// search alone would find nothing whatever the files hold).
fn raw_count(dir: &std::path::Path, needle: &[u8]) -> usize {
    let count = |bytes: &[u8]| bytes.windows(needle.len()).filter(|w| *w == needle).count();
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            n += raw_count(&path, needle);
        } else {
            let bytes = std::fs::read(&path).expect("read");
            n += count(&bytes);
            let magic = 0xFD2F_B528_u32.to_le_bytes();
            for at in 0..bytes.len().saturating_sub(magic.len()) {
                if bytes[at..at + 4] != magic {
                    continue;
                }
                let Ok(len) = zstd::zstd_safe::find_frame_compressed_size(&bytes[at..]) else {
                    continue;
                };
                if let Ok(plain) = zstd::stream::decode_all(&bytes[at..at + len]) {
                    n += count(&plain);
                }
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn after_erasure_and_compaction_no_file_holds_a_byte_of_the_user() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = data_dir(&tmp);
    let who = "erase-me-7f3a@example.com";
    let server = ChildServer::spawn(&dir);
    let mut c = server.events().await;
    for i in 0..300 {
        let user = if i % 3 == 0 {
            who.to_string()
        } else {
            format!("keep-{i}")
        };
        track(&mut c, event(&user, "visit", &[("email", s(&user))]))
            .await
            .unwrap();
    }
    c.delete_user(proto::DeleteUserRequest { user_id: who.into() })
        .await
        .unwrap();
    for i in 0..300 {
        track(&mut c, event(&format!("later-{i}"), "visit", &[]))
            .await
            .unwrap();
    }
    drop(c);
    assert!(server.terminate().success());
    let before = raw_count(&dir, who.as_bytes());
    assert!(before > 0, "the search finds the user's id before the compaction");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_engage"))
        .args(["compact", "--data-dir"])
        .arg(&dir)
        .status()
        .expect("engage compact");
    assert!(status.success());
    assert_eq!(
        raw_count(&dir, who.as_bytes()),
        0,
        "{before} copies before compaction"
    );
    // Everything else is still there, and the directory starts (its mark came along).
    let Outcome::Started(server) = start_or_exit(&dir, &[]) else {
        panic!("the compacted directory does not start");
    };
    let mut c = server.events().await;
    assert!(timeline(&mut c, who).await.is_empty());
    assert_eq!(timeline(&mut c, "keep-1").await.len(), 1);
    assert_eq!(
        track(&mut c, event("u", "visit", &[])).await.unwrap().sequence,
        601
    );
    eprintln!("the erased user's id: {before} copies in the files before compaction, 0 after");
}

#[tokio::test(flavor = "multi_thread")]
async fn erasing_a_large_user_lets_other_writes_through_between_slices() {
    let server = TestServer::start_with(|a| a.max_erase_events_per_group = 100).await;
    let mut c = server.events().await;
    for _ in 0..5 {
        let events = (0..1000)
            .map(|i| event("big", "visit", &[("n", n(i as f64))]))
            .collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    let mut eraser = server.events().await;
    let erase = tokio::spawn(async move {
        eraser
            .delete_user(proto::DeleteUserRequest {
                user_id: "big".into(),
            })
            .await
            .map(|r| r.into_inner().events_deleted)
    });
    // One write at a time from another user while the erasure runs: each is answered between
    // slices instead of waiting for all fifty (in one erasure group, 2 went through: the ones
    // sent before it reached the writer).
    let mut through = 0;
    while !erase.is_finished() {
        track(&mut c, event("other", "visit", &[])).await.unwrap();
        through += 1;
    }
    assert_eq!(erase.await.unwrap().unwrap(), 5000);
    eprintln!("{through} writes went through");
    assert!(
        through >= 10,
        "only {through} writes went through during a 50-slice erasure"
    );
    assert!(timeline(&mut c, "big").await.is_empty());
    assert_eq!(timeline(&mut c, "other").await.len(), through);
    let names = server
        .schema()
        .await
        .list_event_names(proto::ListEventNamesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names.event_names[0].count, through as u64,
        "the erased user's events are not counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erasure_a_stop_left_between_slices_is_finished_before_serving() {
    let server = TestServer::start_with(|a| a.max_erase_events_per_group = 100).await;
    let mut c = server.events().await;
    let events = (0..500)
        .map(|i| event("half", "visit", &[("n", n(i as f64))]))
        .collect();
    c.track_events(proto::TrackEventsRequest { events })
        .await
        .unwrap();
    track(&mut c, event("kept", "visit", &[])).await.unwrap();
    drop(c);
    let dir = server.stop().await;
    // What a crash after the first slices leaves: some events gone, the mark set.
    {
        let db = open_sled(dir.path());
        let tree = db.open_tree("engage").expect("tree");
        let mut removed = 0;
        for k in tree.scan_prefix(b"Thalf\0").keys().take(200) {
            tree.remove(k.expect("key")).expect("remove");
            removed += 1;
        }
        assert_eq!(removed, 200);
        tree.insert(b"Dhalf", &[][..]).expect("mark");
        db.flush().expect("flush");
    }
    let server = TestServer::start_in(dir).await;
    let mut c = server.events().await;
    assert!(
        timeline(&mut c, "half").await.is_empty(),
        "a half-erased user was served"
    );
    assert_eq!(timeline(&mut c, "kept").await.len(), 1);
    // The mark is gone: the next start has nothing to finish.
    let dir = server.stop().await;
    let db = open_sled(dir.path());
    assert!(db
        .open_tree("engage")
        .expect("tree")
        .get(b"Dhalf")
        .expect("get")
        .is_none());
}

/// `visits` visits of user "heavy", then a trigger on visit counting the user's visits within a
/// year: every later visit reads the whole window.
async fn heavy_user_with_a_windowed_trigger(
    server: &TestServer,
    visits: usize,
) -> engage::proto::event_service_client::EventServiceClient<tonic::transport::Channel> {
    let mut c = server.events().await;
    let events = (0..visits).map(|_| event("heavy", "visit", &[])).collect();
    c.track_events(proto::TrackEventsRequest { events })
        .await
        .unwrap();
    create_trigger(
        &mut server.triggers().await,
        proto::Trigger {
            condition: Some(history_cond(proto::HistoryCondition {
                within: Some(prost_types::Duration {
                    seconds: 365 * 86_400,
                    nanos: 0,
                }),
                ..history("visit", proto::Aggregate::Count, "", proto::Operator::Gte, 1.0)
            })),
            ..trigger("visit", "x", "")
        },
    )
    .await
    .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_history_would_cost_too_much_is_shed_and_others_go_on() {
    let server = TestServer::start_with(|a| a.max_history_events = 50).await;
    let mut c = heavy_user_with_a_windowed_trigger(&server, 60).await;
    let err = track(&mut c, event("heavy", "visit", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("event: ") && err.message().contains("max_history_events"),
        "{}",
        err.message()
    );
    assert_eq!(
        timeline(&mut c, "heavy").await.len(),
        60,
        "the shed event is not stored"
    );
    // A user with a short history is evaluated as ever.
    assert_eq!(fired(&mut c, event("light", "visit", &[])).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_heavy_with_history_is_stored_in_slices_and_other_writes_go_through() {
    let server = TestServer::start_with(|a| a.max_group_history_reads = 50).await;
    let mut c = heavy_user_with_a_windowed_trigger(&server, 100).await;
    // Every event of this batch reads over 100 stored events: each goes in a group of its own.
    let mut batcher = server.events().await;
    let batch = tokio::spawn(async move {
        let events = (0..200).map(|_| event("heavy", "visit", &[])).collect();
        batcher
            .track_events(proto::TrackEventsRequest { events })
            .await
            .map(|r| r.into_inner().results)
    });
    let mut through = 0;
    while !batch.is_finished() {
        track(&mut c, event("other", "ping", &[])).await.unwrap();
        through += 1;
    }
    let results = batch.await.unwrap().unwrap();
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(|r| r.accepted && r.actions_fired == 1));
    let sequences: Vec<u64> = results.iter().map(|r| r.sequence).collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "a batch keeps its order"
    );
    eprintln!("{through} writes went through");
    assert!(
        through >= 10,
        "only {through} writes went through during a 200-slice batch"
    );
    assert_eq!(timeline(&mut c, "heavy").await.len(), 300);
}

#[tokio::test]
async fn an_absence_check_reading_too_much_history_sheds_the_event() {
    let server = TestServer::start_with(|a| a.max_history_events = 50).await;
    let mut c = server.events().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let hour_ago = now - 7200;
    // 60 small purchases, all after the cart: none breaks "no big purchase within 1h".
    let events = (0..60)
        .map(|i| proto::Event {
            occurred_at: Some(ts(hour_ago + 1 + i)),
            ..event("heavy", "purchase", &[("size", s("small"))])
        })
        .collect();
    let results = c
        .track_events(proto::TrackEventsRequest { events })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results.iter().all(|r| r.accepted), "{:?}", results[0]);
    let mut t = server.triggers().await;
    create_trigger(
        &mut t,
        proto::Trigger {
            unless: Some(proto::AbsenceCheck {
                event_name: "purchase".into(),
                condition: Some(attr_cond("size", proto::Operator::Eq, s("big"))),
                within: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
            }),
            ..trigger("cart", "x", "")
        },
    )
    .await
    .unwrap();
    // The cart's hour has passed: settling it reads every purchase in the hour.
    let cart = |user: &str| proto::Event {
        occurred_at: Some(ts(hour_ago)),
        ..event(user, "cart", &[])
    };
    let err = track(&mut c, cart("heavy")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("absence check") && err.message().contains("max_history_events"),
        "{}",
        err.message()
    );
    assert_eq!(
        timeline(&mut c, "heavy").await.len(),
        60,
        "the shed event is not stored"
    );
    assert_eq!(fired(&mut c, cart("light")).await, 1);
}

/// The high-water mark catches up with the last acknowledged write while the server runs, once
/// writes go quiet (not only at a clean stop): a power loss after a quiet spell must be caught.
#[tokio::test(flavor = "multi_thread")]
async fn the_mark_catches_up_with_a_quiet_server_before_any_stop() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = data_dir(&tmp);
    let server = ChildServer::spawn(&dir);
    let mut c = server.events().await;
    for i in 0..3 {
        let r = track(&mut c, event(&format!("quiet-{i}"), "tick", &[]))
            .await
            .expect("track");
        assert_eq!(r.sequence, i + 1);
    }
    let mark = dir.join("engage.hwm");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = 0;
    while std::time::Instant::now() < deadline {
        if let Ok(bytes) = std::fs::read(&mark) {
            if bytes.len() >= 8 {
                seen = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
                if seen == 3 {
                    break;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 3, "the mark never reached the last acknowledged event");
    server.crash();
}

/// What sled recorded in a data directory's `conf` about compression.
fn compressed(dir: &std::path::Path) -> bool {
    let conf = std::fs::read(dir.join("conf")).expect("conf");
    let conf = String::from_utf8_lossy(&conf);
    match conf.lines().find_map(|l| l.strip_prefix("use_compression: ")) {
        Some("true") => true,
        Some("false") => false,
        other => panic!("use_compression in conf: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compression_is_chosen_when_a_directory_is_made_and_compaction_changes_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = data_dir(&tmp);
    let server = ChildServer::spawn_with(&dir, &["--compression", "none"]);
    let mut c = server.events().await;
    track(&mut c, event("kept", "visit", &[])).await.unwrap();
    drop(c);
    assert!(server.terminate().success());
    assert!(
        !compressed(&dir),
        "--compression none made a compressed directory"
    );
    // Started again with the default, it keeps what it was made with.
    let server = ChildServer::spawn(&dir);
    assert_eq!(timeline(&mut server.events().await, "kept").await.len(), 1);
    assert!(server.terminate().success());
    assert!(!compressed(&dir));
    // Compaction rewrites it compressed (its default), and everything is still there.
    // A directory made by a default start is compressed.
    let other = tmp.path().join("default");
    let server = ChildServer::spawn(&other);
    assert!(server.terminate().success());
    assert!(compressed(&other), "the default made an uncompressed directory");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_engage"))
        .args(["compact", "--compression", "zstd", "--data-dir"])
        .arg(&dir)
        .status()
        .expect("engage compact");
    assert!(status.success());
    assert!(compressed(&dir), "compaction did not compress");
    let server = ChildServer::spawn(&dir);
    assert_eq!(timeline(&mut server.events().await, "kept").await.len(), 1);
    server.crash();
}
