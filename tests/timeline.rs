//! GetUserTimeline paging and filters, and ListEventNames.

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;
use tonic::Code;

/// Tracks `count` events for `user`, alternating names, one per minute from t0; returns their
/// (occurred_at secs, sequence, name) oldest first.
async fn seed(server: &TestServer, user: &str, count: i64, t0: i64) -> Vec<(i64, u64, String)> {
    let mut c = server.events().await;
    let events: Vec<_> = (0..count)
        .map(|i| {
            let name = if i % 3 == 0 { "purchase" } else { "view" };
            event_at(user, name, "", t0 + i * 60)
        })
        .collect();
    let results = c
        .track_events(proto::TrackEventsRequest { events })
        .await
        .unwrap()
        .into_inner()
        .results;
    (0..count)
        .zip(results)
        .map(|(i, r)| {
            let name = if i % 3 == 0 { "purchase" } else { "view" };
            (t0 + i * 60, r.sequence, name.to_string())
        })
        .collect()
}

async fn all_pages(
    server: &TestServer,
    mut req: proto::GetUserTimelineRequest,
) -> (Vec<proto::Event>, usize) {
    let mut c = server.events().await;
    let mut out = Vec::new();
    let mut pages = 0;
    loop {
        let page = c.get_user_timeline(req.clone()).await.unwrap().into_inner();
        pages += 1;
        assert!(page.events.len() <= req.page_size.max(1) as usize);
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return (out, pages);
        }
        req.page_token = page.next_page_token;
    }
}

fn keys(events: &[proto::Event]) -> Vec<(i64, u64)> {
    events
        .iter()
        .map(|e| (e.occurred_at.unwrap().seconds, e.sequence))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_newest_first_by_default_and_oldest_first_on_request() {
    let server = TestServer::start().await;
    let t0 = 1_700_000_000;
    let expected = seed(&server, "alice", 23, t0).await;
    seed(&server, "alicf", 5, t0).await;
    seed(&server, "alic", 5, t0).await;
    let mut want: Vec<(i64, u64)> = expected.iter().map(|(t, s, _)| (*t, *s)).collect();

    let req = proto::GetUserTimelineRequest {
        user_id: "alice".into(),
        page_size: 5,
        ..Default::default()
    };
    let (events, pages) = all_pages(&server, req.clone()).await;
    want.reverse();
    assert_eq!(keys(&events), want);
    assert_eq!(pages, 5);
    assert!(events.iter().all(|e| e.user_id == "alice"));

    let (events, _) = all_pages(
        &server,
        proto::GetUserTimelineRequest {
            oldest_first: true,
            ..req
        },
    )
    .await;
    want.reverse();
    assert_eq!(keys(&events), want);
}

#[tokio::test(flavor = "multi_thread")]
async fn ties_on_occurred_at_are_ordered_by_sequence() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    let mut seqs = Vec::new();
    for _ in 0..4 {
        seqs.push(
            track(&mut c, event_at("u", "same", "", 1_000))
                .await
                .unwrap()
                .sequence,
        );
    }
    let (events, _) = all_pages(
        &server,
        proto::GetUserTimelineRequest {
            user_id: "u".into(),
            page_size: 3,
            ..Default::default()
        },
    )
    .await;
    seqs.reverse();
    assert_eq!(events.iter().map(|e| e.sequence).collect::<Vec<_>>(), seqs);
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_by_name_and_half_open_range_in_both_orders() {
    let server = TestServer::start().await;
    let t0 = 1_700_000_000;
    let all = seed(&server, "bob", 40, t0).await;
    let from = t0 + 5 * 60;
    let to = t0 + 30 * 60;
    for oldest_first in [false, true] {
        let (events, _) = all_pages(
            &server,
            proto::GetUserTimelineRequest {
                user_id: "bob".into(),
                event_name: "event.purchase".into(),
                from: Some(ts(from)),
                to: Some(ts(to)),
                page_size: 2,
                oldest_first,
                ..Default::default()
            },
        )
        .await;
        let mut want: Vec<(i64, u64)> = all
            .iter()
            .filter(|(t, _, n)| n == "purchase" && *t >= from && *t < to)
            .map(|(t, s, _)| (*t, *s))
            .collect();
        if !oldest_first {
            want.reverse();
        }
        assert!(!want.is_empty());
        assert_eq!(keys(&events), want, "oldest_first={oldest_first}");
        assert!(events.iter().all(|e| e.name == "purchase"));
    }
    // Only `from`, only `to`.
    let (events, _) = all_pages(
        &server,
        proto::GetUserTimelineRequest {
            user_id: "bob".into(),
            from: Some(ts(t0 + 39 * 60)),
            page_size: 10,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.len(), 1);
    let (events, _) = all_pages(
        &server,
        proto::GetUserTimelineRequest {
            user_id: "bob".into(),
            to: Some(ts(t0 + 60)),
            page_size: 10,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn page_size_defaults_to_50_and_caps_at_1000() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    for chunk in 0..2 {
        let events = (0..600)
            .map(|i| event_at("big", "e", "", chunk * 1000 + i))
            .collect();
        c.track_events(proto::TrackEventsRequest { events })
            .await
            .unwrap();
    }
    let page = c
        .get_user_timeline(proto::GetUserTimelineRequest {
            user_id: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 50);
    assert!(!page.next_page_token.is_empty());
    let page = c
        .get_user_timeline(proto::GetUserTimelineRequest {
            user_id: "big".into(),
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_timeline_requests_name_the_field() {
    let server = TestServer::start().await;
    seed(&server, "carol", 3, 1_000).await;
    let mut c = server.events().await;
    let page = c
        .get_user_timeline(proto::GetUserTimelineRequest {
            user_id: "carol".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cases = [
        (proto::GetUserTimelineRequest::default(), "user_id"),
        (
            proto::GetUserTimelineRequest {
                user_id: "carol".into(),
                from: Some(ts(10)),
                to: Some(ts(10)),
                ..Default::default()
            },
            "from",
        ),
        (
            proto::GetUserTimelineRequest {
                user_id: "carol".into(),
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            // A token is bound to its request: another user cannot reuse it.
            proto::GetUserTimelineRequest {
                user_id: "dave".into(),
                page_size: 1,
                page_token: page.next_page_token.clone(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            proto::GetUserTimelineRequest {
                user_id: "carol".into(),
                event_name: "no spaces".into(),
                ..Default::default()
            },
            "event_name",
        ),
    ];
    for (req, field) in cases {
        let err = c.get_user_timeline(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(field),
            "{} should name {field}",
            err.message()
        );
    }
    let unknown = c
        .get_user_timeline(proto::GetUserTimelineRequest {
            user_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unknown.events.is_empty() && unknown.next_page_token.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn list_event_names_counts_and_first_last_seen() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    for (user, name, t) in [
        ("a", "view", 500),
        ("b", "view", 100),
        ("a", "purchase", 300),
        ("c", "view", 900),
        ("c", "event.purchase", 200),
    ] {
        track(&mut c, event_at(user, name, "", t)).await.unwrap();
    }
    // A duplicate and a rejected event count nothing.
    track(&mut c, event_at("a", "signup", "once", 50)).await.unwrap();
    track(&mut c, event_at("a", "signup", "once", 50)).await.unwrap();
    track(&mut c, event_at("", "ghost", "", 50)).await.unwrap_err();
    let summary = |server: &TestServer| {
        let server_addr = server.addr;
        async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{server_addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            proto::schema_service_client::SchemaServiceClient::new(channel)
                .list_event_names(proto::ListEventNamesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .event_names
                .into_iter()
                .map(|s| {
                    (
                        s.name,
                        s.count,
                        s.first_seen.unwrap().seconds,
                        s.last_seen.unwrap().seconds,
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let want = vec![
        ("purchase".to_string(), 2, 200, 300),
        ("signup".to_string(), 1, 50, 50),
        ("view".to_string(), 3, 100, 900),
    ];
    assert_eq!(summary(&server).await, want);
    let server = server.restart().await;
    assert_eq!(summary(&server).await, want, "kept across a restart");
}

/// Oracle test: random events for two users, random filters and page sizes; paging through the
/// server must return exactly what sorting and filtering the input gives.
#[test]
fn paging_matches_a_sorted_filtered_oracle() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start());
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    let case = (
        proptest::collection::vec((0i64..20, 0usize..3, any::<bool>()), 1..60),
        proptest::option::of(0i64..20),
        proptest::option::of(0i64..20),
        1u32..7,
        any::<bool>(),
        0usize..4,
    );
    let round = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&case, |(events, from, to, page_size, oldest_first, name_pick)| {
            let round = round.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let names = ["a", "b", "c"];
            let user = format!("oracle-{round}");
            let mut stored = Vec::new();
            rt.block_on(async {
                let mut c = server.events().await;
                let batch = events
                    .iter()
                    .map(|(t, n, other)| {
                        let u = if *other { format!("{user}x") } else { user.clone() };
                        event_at(&u, names[*n], "", 1_000 + t)
                    })
                    .collect();
                let results = c
                    .track_events(proto::TrackEventsRequest { events: batch })
                    .await
                    .unwrap()
                    .into_inner()
                    .results;
                for ((t, n, other), r) in events.iter().zip(results) {
                    if !other {
                        stored.push((1_000 + t, r.sequence, names[*n]));
                    }
                }
            });
            let name = names.get(name_pick).copied().unwrap_or("");
            let (from, to) = (from.map(|f| 1_000 + f), to.map(|t| 1_000 + t));
            let mut want: Vec<(i64, u64)> = stored
                .iter()
                .filter(|(t, _, n)| {
                    (name.is_empty() || *n == name)
                        && from.is_none_or(|f| *t >= f)
                        && to.is_none_or(|e| *t < e)
                })
                .map(|(t, s, _)| (*t, *s))
                .collect();
            want.sort();
            if !oldest_first {
                want.reverse();
            }
            let req = proto::GetUserTimelineRequest {
                user_id: user.clone(),
                event_name: name.into(),
                from: from.map(ts),
                to: to.map(ts),
                page_size,
                oldest_first,
                ..Default::default()
            };
            if matches!((from, to), (Some(f), Some(t)) if f >= t) {
                let err =
                    rt.block_on(async { server.events().await.get_user_timeline(req).await.unwrap_err() });
                prop_assert_eq!(err.code(), Code::InvalidArgument);
                return Ok(());
            }
            let (got, _) = rt.block_on(all_pages(&server, req));
            prop_assert_eq!(keys(&got), want);
            Ok(())
        })
        .unwrap();
}
