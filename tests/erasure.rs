//! DeleteUser: right to erasure.

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;
use tonic::Code;

async fn delete(server: &TestServer, user: &str) -> Result<u64, tonic::Status> {
    server
        .events()
        .await
        .delete_user(proto::DeleteUserRequest { user_id: user.into() })
        .await
        .map(|r| r.into_inner().events_deleted)
}

async fn names(server: &TestServer) -> Vec<(String, u64)> {
    server
        .schema()
        .await
        .list_event_names(proto::ListEventNamesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .event_names
        .into_iter()
        .map(|n| (n.name, n.count))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_user_erases_the_user_everywhere_and_nobody_else() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut once = trigger("buy", "welcome", "Hello {{ user_id }}");
    once.once_per_user = true;
    let once = create_trigger(&mut t, once).await.unwrap();
    let mut c = server.events().await;
    for user in ["ann", "bob"] {
        for i in 0..3 {
            track(
                &mut c,
                event_at(user, "buy", &format!("{user}-buy-{i}"), 1_000 + i),
            )
            .await
            .unwrap();
        }
        track(&mut c, event_at(user, "view", &format!("{user}-view"), 2_000))
            .await
            .unwrap();
    }
    let mut a = server.actions().await;
    let ann_action = user_actions(&mut a, "ann").await.remove(0);
    assert_eq!(
        names(&server).await,
        [("buy".to_string(), 6), ("view".to_string(), 2)]
    );

    assert_eq!(delete(&server, "ann").await.unwrap(), 4);

    assert!(timeline(&mut c, "ann").await.is_empty());
    assert_eq!(timeline(&mut c, "bob").await.len(), 4, "other users untouched");
    assert_eq!(
        names(&server).await,
        [("buy".to_string(), 3), ("view".to_string(), 1)]
    );
    // Actions keep their sequence but lose the user's data.
    assert!(user_actions(&mut a, "ann").await.is_empty());
    assert_eq!(user_actions(&mut a, "bob").await[0].payload, "Hello bob");
    let by_trigger = a
        .list_fired_actions(proto::ListFiredActionsRequest {
            trigger_id: once.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    let erased = by_trigger
        .iter()
        .find(|x| x.sequence == ann_action.sequence)
        .unwrap();
    assert!(erased.user_id.is_empty() && erased.payload.is_empty() && erased.event.is_none());
    let mut stream = a
        .subscribe_actions(proto::SubscribeActionsRequest {
            start: proto::StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.sequence, ann_action.sequence);
    assert!(
        first.user_id.is_empty() && first.event.is_none(),
        "the log stays gap-free"
    );

    // Erasure forgets event ids and firing history: a retry is a new event, and fires again.
    let retry = track(&mut c, event_at("ann", "buy", "ann-buy-0", 1_000))
        .await
        .unwrap();
    assert!(!retry.duplicate);
    assert_eq!(retry.actions_fired, 1, "once_per_user starts over");
    let bob_retry = track(&mut c, event_at("bob", "buy", "bob-buy-0", 1_000))
        .await
        .unwrap();
    assert!(bob_retry.duplicate, "other users' ids are kept");

    // Kept across a restart.
    let server = server.restart().await;
    let mut c = server.events().await;
    assert_eq!(timeline(&mut c, "ann").await.len(), 1);
    assert_eq!(timeline(&mut c, "bob").await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn history_forgets_an_erased_user() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut third = trigger("buy", "third", "");
    third.condition = Some(history_cond(history(
        "buy",
        proto::Aggregate::Count,
        "",
        proto::Operator::Eq,
        3.0,
    )));
    create_trigger(&mut t, third).await.unwrap();
    let mut c = server.events().await;
    for i in 0..2 {
        track(&mut c, event_at("cy", "buy", "", 1_000 + i)).await.unwrap();
    }
    delete(&server, "cy").await.unwrap();
    // Two more: the count restarts from zero, so the third purchase overall does not fire.
    assert_eq!(fired(&mut c, event_at("cy", "buy", "", 2_000)).await, 0);
    assert_eq!(fired(&mut c, event_at("cy", "buy", "", 2_001)).await, 0);
    assert_eq!(fired(&mut c, event_at("cy", "buy", "", 2_002)).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_unknown_user_answers_zero_and_a_bad_id_names_the_field() {
    let server = TestServer::start().await;
    assert_eq!(delete(&server, "nobody").await.unwrap(), 0);
    let err = delete(&server, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("user_id"));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_erasure_no_key_or_value_on_disk_holds_the_user_id() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    // Timers of a live trigger, of a trigger deleted afterwards, and fired actions.
    let delayed = proto::Trigger {
        delay: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        ..trigger("cart_added", "remind", "{{ user_id }}")
    };
    create_trigger(&mut t, delayed.clone()).await.unwrap();
    let doomed = create_trigger(&mut t, delayed).await.unwrap();
    create_trigger(&mut t, trigger("cart_added", "now", "{{ user_id }} now"))
        .await
        .unwrap();
    let mut c = server.events().await;
    let who = "erase-me-7f3a";
    for (i, name) in ["cart_added", "page_viewed", "cart_added"].iter().enumerate() {
        let e = proto::Event {
            event_id: format!("ev-{i}"),
            ..event(who, name, &[("note", s(&format!("{who} wrote this")))])
        };
        track(&mut c, e).await.unwrap();
    }
    track(&mut c, event("someone-else", "cart_added", &[]))
        .await
        .unwrap();
    // Rollups and caches built from the user's data are erased too.
    let mut q = proto::query_service_client::QueryServiceClient::new(server.channel().await);
    let all_history = history_cond(history(
        "cart_added",
        proto::Aggregate::Count,
        "",
        proto::Operator::Gte,
        1.0,
    ));
    for _ in 0..2 {
        q.filter_users(proto::FilterUsersRequest {
            filter: Some(all_history.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    t.delete_trigger(proto::DeleteTriggerRequest { id: doomed.id })
        .await
        .unwrap();
    assert_eq!(delete(&server, who).await.unwrap(), 3);
    let users = q
        .filter_users(proto::FilterUsersRequest {
            filter: Some(all_history),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user_ids;
    assert_eq!(users, vec!["someone-else"]);
    let dir = server.stop().await;
    let db = open_sled(dir.path());
    let needle = who.as_bytes();
    let holds = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for tree in db.tree_names() {
        for kv in db.open_tree(&tree).expect("tree").iter() {
            let (k, v) = kv.expect("entry");
            assert!(
                !holds(&k) && !holds(&v),
                "the erased user survives in {:?}: key {:?}",
                String::from_utf8_lossy(&tree),
                String::from_utf8_lossy(&k)
            );
        }
    }
}
