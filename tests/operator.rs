//! The operator reads of SPEC §11: ListConsumers and GetActionStats.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;
use engage::proto::action_service_client::ActionServiceClient;
use tonic::transport::Channel;

async fn consumers(actions: &mut ActionServiceClient<Channel>) -> Vec<proto::Consumer> {
    actions
        .list_consumers(proto::ListConsumersRequest {})
        .await
        .unwrap()
        .into_inner()
        .consumers
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn consumers_are_listed_with_their_position_lag_and_times() {
    let server = TestServer::start().await;
    let mut triggers = server.triggers().await;
    create_trigger(&mut triggers, trigger("buy", "email", "{{ user_id }}"))
        .await
        .unwrap();
    let mut events = server.events().await;
    for u in ["a", "b", "c"] {
        fired(&mut events, event(u, "buy", &[])).await;
    }
    let mut actions = server.actions().await;
    // A named consumer is created by its first subscription.
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
    let listed = consumers(&mut actions).await;
    assert_eq!(listed.len(), 1);
    let c = &listed[0];
    assert_eq!((c.name.as_str(), c.acked_sequence, c.lag), ("mailer", 0, 3));
    assert!(c.created_at.is_some() && c.last_acked_at.is_none(), "{c:?}");
    actions
        .ack_actions(proto::AckActionsRequest {
            consumer: "mailer".into(),
            up_to_sequence: first.sequence,
        })
        .await
        .unwrap();
    let c = consumers(&mut actions).await.remove(0);
    assert_eq!((c.acked_sequence, c.lag), (1, 2));
    let acked = c.last_acked_at.unwrap().seconds;
    assert!(acked >= c.created_at.unwrap().seconds);
    // Kept across a restart.
    drop(stream);
    let server = server.restart().await;
    let c = consumers(&mut server.actions().await).await.remove(0);
    assert_eq!((c.acked_sequence, c.last_acked_at.unwrap().seconds), (1, acked));
}

#[tokio::test]
async fn actions_fired_are_counted_per_bucket_for_all_triggers_or_one() {
    let server = TestServer::start().await;
    let mut triggers = server.triggers().await;
    let email = create_trigger(&mut triggers, trigger("buy", "email", "x"))
        .await
        .unwrap();
    create_trigger(&mut triggers, trigger("buy", "sms", "x"))
        .await
        .unwrap();
    create_trigger(&mut triggers, trigger("visit", "log", "x"))
        .await
        .unwrap();
    let mut events = server.events().await;
    let started = now_secs();
    for u in ["a", "b"] {
        fired(&mut events, event(u, "buy", &[])).await;
    }
    fired(&mut events, event("a", "visit", &[])).await;
    let now = now_secs();
    if started.div_euclid(3600) != now.div_euclid(3600) {
        // The actions straddle an hour: the per-bucket checks below assume one hour.
        return;
    }
    let ask = |trigger_id: &str, from: i64, to: i64, g: proto::Granularity| proto::GetActionStatsRequest {
        trigger_id: trigger_id.into(),
        from: Some(ts(from)),
        to: Some(ts(to)),
        granularity: g as i32,
    };
    let mut actions = server.actions().await;
    let hour = now - now.rem_euclid(3600);
    let all = actions
        .get_action_stats(ask("", hour - 7200, hour + 3600, proto::Granularity::Hour))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.total, 5.0);
    assert_eq!(all.buckets.len(), 3);
    assert_eq!(
        all.buckets.iter().map(|b| b.events).collect::<Vec<_>>(),
        vec![0, 0, 5],
        "empty buckets included"
    );
    assert_eq!(all.buckets[2].start.unwrap().seconds, hour);
    let one = actions
        .get_action_stats(ask(&email.id, hour, hour + 3600, proto::Granularity::Unspecified))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((one.total, one.buckets.len()), (2.0, 1));
    // A range before the actions counts none.
    let before = actions
        .get_action_stats(ask("", now - 86_400 * 2, now - 86_400, proto::Granularity::Day))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.total, 0.0);
    let e = actions
        .get_action_stats(ask("", now, now, proto::Granularity::Hour))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("from:"), "{}", e.message());
}
