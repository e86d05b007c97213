//! SubscribeActions, AckActions, ListFiredActions and retention (`proto/engage/v1/actions.proto`).

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use engage::proto;
use engage::proto::StartFrom;
use tonic::Code;
use tonic::Streaming;

fn sub(consumer: &str, start: StartFrom, after_sequence: u64) -> proto::SubscribeActionsRequest {
    proto::SubscribeActionsRequest {
        consumer: consumer.into(),
        start: start as i32,
        after_sequence,
        ..Default::default()
    }
}

async fn open(server: &TestServer, req: proto::SubscribeActionsRequest) -> Streaming<proto::FiredAction> {
    server
        .actions()
        .await
        .subscribe_actions(req)
        .await
        .expect("subscribe")
        .into_inner()
}

async fn next(stream: &mut Streaming<proto::FiredAction>) -> proto::FiredAction {
    stream.message().await.expect("stream item").expect("stream open")
}

/// Tracks `count` "tick" events for `user`, one call each; answers the actions fired.
async fn ticks(server: &TestServer, user: &str, count: usize) -> u32 {
    let mut c = server.events().await;
    let mut total = 0;
    for _ in 0..count {
        total += fired(&mut c, event(user, "tick", &[])).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn catch_up_then_live_under_concurrent_ingest_has_no_gap_and_no_duplicate() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, trigger("tick", "count", "{{ user_id }}"))
        .await
        .unwrap();
    const WRITERS: usize = 6;
    const BATCHES: usize = 12;
    const PER_BATCH: usize = 50;
    let total = (WRITERS * BATCHES * PER_BATCH) as u64;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let channel = server.channel().await;
        writers.push(tokio::spawn(async move {
            let mut c = proto::event_service_client::EventServiceClient::new(channel);
            for _ in 0..BATCHES {
                let events = (0..PER_BATCH)
                    .map(|_| event(&format!("w{w}"), "tick", &[]))
                    .collect();
                c.track_events(proto::TrackEventsRequest { events })
                    .await
                    .unwrap();
            }
        }));
    }
    // Subscribers join at different moments of the ingest: from the start of the log, and from
    // whatever is latest when they connect; each must see a gap-free run to the end.
    let mut from_start = open(&server, sub("", StartFrom::Earliest, 0)).await;
    let mut latest = open(&server, sub("", StartFrom::Latest, 0)).await;
    let mut expected = 1;
    while expected <= total {
        let a = next(&mut from_start).await;
        assert_eq!(a.sequence, expected, "gap or duplicate");
        expected += 1;
    }
    let first = next(&mut latest).await.sequence;
    let mut expected = first + 1;
    while expected <= total {
        assert_eq!(next(&mut latest).await.sequence, expected);
        expected += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_never_reads_does_not_slow_ingest_and_gets_everything_later() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, trigger("tick", "count", ""))
        .await
        .unwrap();
    let mut stalled = open(&server, sub("", StartFrom::Earliest, 0)).await;
    // Far more actions than any buffer between the log and this client.
    let mut c = server.events().await;
    for _ in 0..20 {
        let events = (0..500).map(|_| event("slow", "tick", &[])).collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    for expected in 1..=10_000 {
        assert_eq!(next(&mut stalled).await.sequence, expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_by_trigger_and_action_type() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let email = create_trigger(&mut t, trigger("tick", "send_email", ""))
        .await
        .unwrap();
    let hook = create_trigger(&mut t, trigger("tick", "webhook", ""))
        .await
        .unwrap();
    let mut emails = open(
        &server,
        proto::SubscribeActionsRequest {
            start: StartFrom::Earliest as i32,
            action_types: vec!["send_email".into()],
            ..Default::default()
        },
    )
    .await;
    let mut hooks = open(
        &server,
        proto::SubscribeActionsRequest {
            start: StartFrom::Earliest as i32,
            trigger_ids: vec![hook.id.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ticks(&server, "u", 3).await, 6);
    for _ in 0..3 {
        assert_eq!(next(&mut emails).await.trigger_id, email.id);
        assert_eq!(next(&mut hooks).await.r#type, "webhook");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_named_consumer_resumes_after_its_ack_across_a_restart() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, trigger("tick", "mail", "")).await.unwrap();
    ticks(&server, "old", 2).await;
    // A new consumer starts at LATEST: it misses what fired before it existed...
    let mut s = open(&server, sub("mailer", StartFrom::Unspecified, 0)).await;
    ticks(&server, "u", 5).await;
    let got: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(next(&mut s).await.sequence);
        }
        v
    };
    assert_eq!(got, [3, 4, 5, 6, 7]);
    drop(s);
    // ...and a reconnect before any ack misses nothing.
    let mut s = open(&server, sub("mailer", StartFrom::Unspecified, 0)).await;
    assert_eq!(next(&mut s).await.sequence, 3);
    drop(s);
    let mut a = server.actions().await;
    let acked = a
        .ack_actions(proto::AckActionsRequest {
            consumer: "mailer".into(),
            up_to_sequence: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.acked_sequence, 5);
    // An older ack answers the current position.
    let older = a
        .ack_actions(proto::AckActionsRequest {
            consumer: "mailer".into(),
            up_to_sequence: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(older.acked_sequence, 5);
    let server = server.restart().await;
    let mut s = open(&server, sub("mailer", StartFrom::Unspecified, 0)).await;
    assert_eq!(next(&mut s).await.sequence, 6);
    assert_eq!(next(&mut s).await.sequence, 7);
    // An explicit start chooses where this stream begins without moving the position.
    let mut from_two = open(&server, sub("mailer", StartFrom::Sequence, 1)).await;
    assert_eq!(next(&mut from_two).await.sequence, 2);
    drop(from_two);
    let mut s = open(&server, sub("mailer", StartFrom::Unspecified, 0)).await;
    assert_eq!(next(&mut s).await.sequence, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_and_starts_are_checked() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, trigger("tick", "mail", "")).await.unwrap();
    ticks(&server, "u", 3).await;
    let mut a = server.actions().await;
    let ack = |consumer: &str, up_to_sequence| proto::AckActionsRequest {
        consumer: consumer.into(),
        up_to_sequence,
    };
    let err = a.ack_actions(ack("ghost", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().starts_with("consumer"));
    let err = a.ack_actions(ack("", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let _s = open(&server, sub("worker", StartFrom::Earliest, 0)).await;
    let err = a.ack_actions(ack("worker", 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(err.message().contains('3'), "{}", err.message());
    assert_eq!(
        a.ack_actions(ack("worker", 3))
            .await
            .unwrap()
            .into_inner()
            .acked_sequence,
        3
    );
    let err = a
        .subscribe_actions(sub("", StartFrom::Sequence, 9))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = a
        .subscribe_actions(sub("bad name!", StartFrom::Latest, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("consumer"));
}

#[tokio::test(flavor = "multi_thread")]
async fn list_fired_actions_pages_by_user_and_trigger_newest_first() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let one = create_trigger(&mut t, trigger("tick", "one", "")).await.unwrap();
    let two = create_trigger(&mut t, trigger("tick", "two", "")).await.unwrap();
    ticks(&server, "kim", 4).await;
    ticks(&server, "lee", 3).await;
    let mut a = server.actions().await;
    let page = |user: &str, trigger_id: &str, page_size, page_token: String| proto::ListFiredActionsRequest {
        user_id: user.into(),
        trigger_id: trigger_id.into(),
        page_size,
        page_token,
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let p = a
            .list_fired_actions(page("kim", "", 3, token))
            .await
            .unwrap()
            .into_inner();
        seen.extend(p.actions.iter().map(|a| (a.sequence, a.user_id.clone())));
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!(seen.len(), 8);
    assert!(seen.windows(2).all(|w| w[0].0 > w[1].0), "newest first");
    assert!(seen.iter().all(|(_, u)| u == "kim"));
    let by_trigger = a
        .list_fired_actions(page("", &two.id, 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_trigger.actions.len(), 7);
    assert!(by_trigger.actions.iter().all(|a| a.trigger_id == two.id));
    let both = a
        .list_fired_actions(page("lee", &one.id, 2, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(both.actions.len(), 2);
    assert!(both
        .actions
        .iter()
        .all(|a| a.trigger_id == one.id && a.user_id == "lee"));
    let rest = a
        .list_fired_actions(page("lee", &one.id, 2, both.next_page_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.actions.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let err = a
        .list_fired_actions(page("kim", "", 2, both.next_page_token))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a token is bound to its listing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_actions_are_gone_and_older_starts_are_out_of_range() {
    let server = TestServer::start_with(|a| {
        a.action_retention_secs = 0;
        a.retention_check_secs = 1;
    })
    .await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, trigger("tick", "mail", "")).await.unwrap();
    ticks(&server, "u", 3).await;
    let mut a = server.actions().await;
    // Wait for the expiry pass (it runs every second) to remove the three actions.
    let mut polls = 0;
    while !user_actions(&mut a, "u").await.is_empty() {
        polls += 1;
        assert!(polls < 200, "actions never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = a
        .subscribe_actions(sub("", StartFrom::Sequence, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("earliest available sequence is 4"),
        "{}",
        err.message()
    );
    // A refused subscription leaves nothing behind: the named consumer was not created.
    let err = a
        .subscribe_actions(sub("late", StartFrom::Sequence, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = a
        .ack_actions(proto::AckActionsRequest {
            consumer: "late".into(),
            up_to_sequence: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    // EARLIEST starts at what is kept: the next action, 4.
    let mut s = open(&server, sub("", StartFrom::Earliest, 0)).await;
    ticks(&server, "u", 1).await;
    assert_eq!(next(&mut s).await.sequence, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_open_streams_cleanly() {
    let server = TestServer::start().await;
    let mut s = open(&server, sub("", StartFrom::Latest, 0)).await;
    let stopping = tokio::spawn(server.stop());
    assert!(s.message().await.expect("clean end").is_none(), "stream ended");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disconnected_subscriber_releases_its_slot() {
    let server = TestServer::start_with(|a| a.max_subscribers = 1).await;
    let first = open(&server, sub("", StartFrom::Latest, 0)).await;
    let err = server
        .actions()
        .await
        .subscribe_actions(sub("", StartFrom::Latest, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    drop(first);
    // The server notices the disconnect asynchronously: retry until the slot is free.
    let mut tries = 0;
    loop {
        match server
            .actions()
            .await
            .subscribe_actions(sub("", StartFrom::Latest, 0))
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                tries += 1;
                assert!(tries < 200, "slot never released");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_is_not_held_by_a_subscriber_that_stopped_reading() {
    // A grace period far longer than the guard below: only ending the stream can let it stop.
    let server = TestServer::start_with(|a| a.shutdown_grace_secs = 3600).await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, trigger("tick", "count", ""))
        .await
        .unwrap();
    let stalled = open(&server, sub("", StartFrom::Earliest, 0)).await;
    let mut c = server.events().await;
    for _ in 0..4 {
        let events = (0..500).map(|_| event("u", "tick", &[])).collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    drop(c);
    // The stream's buffers are full and nobody reads: stopping must still complete, with the
    // stream still held by the client. (The timeout is a hang guard, not a speed check.)
    let stopped = tokio::time::timeout(Duration::from_secs(120), server.stop()).await;
    assert!(stopped.is_ok(), "shutdown waited for a stalled subscriber");
    drop(stalled);
}
