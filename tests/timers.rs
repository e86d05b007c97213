//! Delayed and absence triggers with durable timers (`Trigger.delay` and `.unless` in `proto/engage/v1/triggers.proto`).
//!
//! Timers here are due a second or two after their event. No test sleeps to synchronise: each
//! waits for the action it expects on a subscription stream, and proves that something did NOT
//! fire by a *control* timer due later (timers fire in due order, so when the control's action
//! arrives, every earlier timer has fired or never will).

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use engage::proto;
use engage::proto::action_service_client::ActionServiceClient;
use engage::proto::trigger_service_client::TriggerServiceClient;
use engage::proto::StartFrom;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

fn secs(s: i64) -> prost_types::Duration {
    prost_types::Duration { seconds: s, nanos: 0 }
}

fn millis(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// "Added to cart, no purchase within `within`": the abandoned-cart automation.
fn abandoned_cart(within: prost_types::Duration) -> proto::Trigger {
    proto::Trigger {
        unless: Some(proto::AbsenceCheck {
            event_name: "product_purchased".into(),
            condition: None,
            within: Some(within),
        }),
        ..trigger(
            "cart_added",
            "send_email",
            "{\"to\": \"{{ user_id }}\", \"product\": \"{{ event.attributes.product }}\"}",
        )
    }
}

async fn stream(channel: Channel) -> Streaming<proto::FiredAction> {
    ActionServiceClient::new(channel)
        .subscribe_actions(proto::SubscribeActionsRequest {
            start: StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next action, failing after 20 s (a timer that never fires).
async fn next(s: &mut Streaming<proto::FiredAction>) -> proto::FiredAction {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("no action within 20 s")
        .expect("stream item")
        .expect("stream open")
}

/// Actions until (and including) the first for `user`.
async fn until_user(s: &mut Streaming<proto::FiredAction>, user: &str) -> Vec<proto::FiredAction> {
    let mut seen = Vec::new();
    loop {
        let a = next(s).await;
        let done = a.user_id == user;
        seen.push(a);
        if done {
            return seen;
        }
    }
}

fn cart(user: &str, product: &str) -> proto::Event {
    event(user, "cart_added", &[("product", s(product))])
}

async fn fired_now(
    c: &mut engage::proto::event_service_client::EventServiceClient<Channel>,
    e: proto::Event,
) -> u32 {
    fired(c, e).await
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_cart_fires_for_the_user_who_did_not_buy_only() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let trigger = create_trigger(&mut t, abandoned_cart(secs(1))).await.unwrap();
    assert_eq!(
        trigger.unless.as_ref().and_then(|u| u.within),
        Some(secs(1)),
        "stored as given"
    );
    let mut s = stream(server.channel().await).await;
    let mut c = server.events().await;
    // Arming fires nothing now.
    assert_eq!(fired_now(&mut c, cart("buyer", "boots")).await, 0);
    assert_eq!(fired_now(&mut c, cart("idle", "scarf")).await, 0);
    // The buyer buys inside the window: their timer is cancelled.
    assert_eq!(
        fired_now(&mut c, event("buyer", "product_purchased", &[])).await,
        0
    );
    let seen = until_user(&mut s, "idle").await;
    assert_eq!(seen.len(), 1, "the buyer's earlier timer must not fire: {seen:?}");
    let a = &seen[0];
    assert_eq!(a.trigger_id, trigger.id);
    assert_eq!(a.payload, "{\"to\": \"idle\", \"product\": \"scarf\"}");
    let event = a.event.as_ref().expect("the triggering event");
    assert_eq!(event.name, "cart_added");
    // Fired no earlier than due: one second after the cart event.
    let due = event.occurred_at.unwrap().seconds * 1_000_000_000
        + event.occurred_at.unwrap().nanos as i64
        + 1_000_000_000;
    let fired_at = a.fired_at.unwrap().seconds * 1_000_000_000 + a.fired_at.unwrap().nanos as i64;
    assert!(fired_at >= due, "fired {} ns before it was due", due - fired_at);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeat_restarts_the_window_and_one_timer_remains() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, abandoned_cart(millis(1500)))
        .await
        .unwrap();
    let mut s = stream(server.channel().await).await;
    let mut c = server.events().await;
    fired_now(&mut c, cart("ann", "hat")).await;
    fired_now(&mut c, cart("ann", "coat")).await;
    // The control's timer is due after both of ann's.
    fired_now(&mut c, cart("control", "sock")).await;
    let seen = until_user(&mut s, "control").await;
    let ann: Vec<_> = seen.iter().filter(|a| a.user_id == "ann").collect();
    assert_eq!(ann.len(), 1, "one reminder after the last cart change: {seen:?}");
    assert!(
        ann[0].payload.contains("coat"),
        "rendered from the last event: {}",
        ann[0].payload
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delay_fires_later_and_a_past_due_timer_settles_at_once() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let delayed = proto::Trigger {
        delay: Some(secs(1)),
        ..trigger("signup", "welcome", "hello {{ user_id }}")
    };
    create_trigger(&mut t, delayed).await.unwrap();
    let mut s = stream(server.channel().await).await;
    let mut c = server.events().await;
    assert_eq!(fired_now(&mut c, event("new", "signup", &[])).await, 0);
    let a = next(&mut s).await;
    assert_eq!((a.user_id.as_str(), a.payload.as_str()), ("new", "hello new"));
    // An event dated long enough ago is due when it arrives: it fires at once.
    let old = proto::Event {
        occurred_at: Some(ts(1_700_000_000)),
        ..event("late", "signup", &[])
    };
    assert_eq!(fired_now(&mut c, old).await, 1);
    assert_eq!(next(&mut s).await.user_id, "late");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absence_already_broken_when_armed_never_fires() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, abandoned_cart(secs(3600))).await.unwrap();
    let mut c = server.events().await;
    // A purchase dated after the cart event arrives first (out of order), then the cart: the
    // window already holds a purchase, so nothing is armed or fired.
    let at = |user: &str, name: &str, when: i64| proto::Event {
        occurred_at: Some(ts(when)),
        ..event(user, name, &[("product", s("x"))])
    };
    assert_eq!(
        fired_now(&mut c, at("bea", "product_purchased", 1_700_000_100)).await,
        0
    );
    assert_eq!(fired_now(&mut c, at("bea", "cart_added", 1_700_000_000)).await, 0);
    // Long past its window without a purchase: settled at once, fires.
    assert_eq!(fired_now(&mut c, at("cid", "cart_added", 1_700_000_000)).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pausing_deleting_and_erasure_cancel_pending_timers() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let paused = create_trigger(&mut t, abandoned_cart(secs(1))).await.unwrap();
    let deleted = create_trigger(
        &mut t,
        proto::Trigger {
            delay: Some(secs(1)),
            ..trigger("cart_added", "deleted", "")
        },
    )
    .await
    .unwrap();
    let kept = create_trigger(
        &mut t,
        proto::Trigger {
            delay: Some(secs(2)),
            ..trigger("cart_added", "kept", "")
        },
    )
    .await
    .unwrap();
    let mut s = stream(server.channel().await).await;
    let mut c = server.events().await;
    fired_now(&mut c, cart("u1", "a")).await;
    fired_now(&mut c, cart("gone", "b")).await;
    t.update_trigger(proto::UpdateTriggerRequest {
        trigger: Some(proto::Trigger {
            paused: true,
            ..paused.clone()
        }),
    })
    .await
    .unwrap();
    t.delete_trigger(proto::DeleteTriggerRequest {
        id: deleted.id.clone(),
    })
    .await
    .unwrap();
    c.delete_user(proto::DeleteUserRequest {
        user_id: "gone".into(),
    })
    .await
    .unwrap();
    // Only the kept trigger's timer for u1 remains (gone's was erased).
    let a = next(&mut s).await;
    assert_eq!(
        (a.trigger_id.as_str(), a.user_id.as_str()),
        (kept.id.as_str(), "u1")
    );
    // And nothing else is pending: a fresh control timer is the very next action.
    fired_now(&mut c, cart("control", "c")).await;
    let b = next(&mut s).await;
    assert_eq!(
        (b.trigger_id.as_str(), b.user_id.as_str()),
        (kept.id.as_str(), "control")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn once_per_user_applies_when_the_timer_fires() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let once = proto::Trigger {
        delay: Some(millis(500)),
        once_per_user: true,
        ..trigger("visit", "once", "")
    };
    create_trigger(&mut t, once).await.unwrap();
    let mut s = stream(server.channel().await).await;
    let mut c = server.events().await;
    fired_now(&mut c, event("v", "visit", &[])).await;
    assert_eq!(next(&mut s).await.user_id, "v");
    // A second visit arms again, but the firing is refused when due; the control shows it.
    fired_now(&mut c, event("v", "visit", &[])).await;
    fired_now(&mut c, event("w", "visit", &[])).await;
    assert_eq!(next(&mut s).await.user_id, "w");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_delay_and_unless_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    let mut t: TriggerServiceClient<Channel> = server.triggers().await;
    let cases = vec![
        (
            proto::Trigger {
                delay: Some(secs(-1)),
                ..trigger("a", "x", "")
            },
            "trigger.delay",
        ),
        (
            proto::Trigger {
                unless: Some(proto::AbsenceCheck {
                    event_name: "b".into(),
                    condition: None,
                    within: None,
                }),
                ..trigger("a", "x", "")
            },
            "trigger.unless.within: required",
        ),
        (
            proto::Trigger {
                unless: Some(proto::AbsenceCheck {
                    event_name: String::new(),
                    condition: None,
                    within: Some(secs(1)),
                }),
                ..trigger("a", "x", "")
            },
            "trigger.unless.event_name",
        ),
        (
            proto::Trigger {
                unless: Some(proto::AbsenceCheck {
                    event_name: "b".into(),
                    condition: Some(history_cond(history(
                        "c",
                        proto::Aggregate::Count,
                        "",
                        proto::Operator::Gt,
                        1.0,
                    ))),
                    within: Some(secs(1)),
                }),
                ..trigger("a", "x", "")
            },
            "trigger.unless.condition.history",
        ),
    ];
    for (trigger, field) in cases {
        let err = create_trigger(&mut t, trigger).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {}", err.message());
        assert!(
            err.message().starts_with(field),
            "expected {field}, got {}",
            err.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timers_survive_kill_9_and_each_fires_exactly_once() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = ChildServer::spawn(dir.path());
    let mut t = TriggerServiceClient::new(server.channel().await);
    let short = create_trigger(
        &mut t,
        proto::Trigger {
            delay: Some(millis(300)),
            ..trigger("cart_added", "short", "")
        },
    )
    .await
    .unwrap();
    let long = create_trigger(&mut t, abandoned_cart(secs(4))).await.unwrap();
    let mut c = server.events().await;
    let users: Vec<String> = (0..20).map(|i| format!("k{i:02}")).collect();
    for u in &users {
        fired_now(&mut c, cart(u, "p")).await;
    }
    let armed_at = std::time::Instant::now();
    server.crash();
    // The downtime covers the short timers' due time (this wait builds the scenario; it
    // synchronises nothing).
    tokio::time::sleep(Duration::from_millis(400).saturating_sub(armed_at.elapsed())).await;
    let server = ChildServer::spawn(dir.path());
    let mut s = stream(server.channel().await).await;
    let mut seen = std::collections::BTreeMap::<(String, String), u32>::new();
    while seen.len() < users.len() * 2 {
        let a = next(&mut s).await;
        *seen.entry((a.trigger_id.clone(), a.user_id.clone())).or_default() += 1;
    }
    for u in &users {
        for id in [&short.id, &long.id] {
            assert_eq!(seen.get(&(id.clone(), u.clone())), Some(&1), "{u} {id}");
        }
    }
    // Nothing fires twice: after a control timer, still exactly one action per (trigger, user).
    fired_now(&mut server.events().await, cart("control", "p")).await;
    loop {
        let a = next(&mut s).await;
        if a.user_id == "control" {
            break;
        }
        *seen.entry((a.trigger_id.clone(), a.user_id.clone())).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_event_does_not_replace_a_newer_pending_timer() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    create_trigger(&mut t, abandoned_cart(secs(1))).await.unwrap();
    let mut s = stream(server.channel().await).await;
    let mut c = server.events().await;
    let dated = |user: &str, product: &str, nanos_ago: i64| {
        let at = now_nanos() - nanos_ago;
        proto::Event {
            occurred_at: Some(prost_types::Timestamp {
                seconds: at.div_euclid(1_000_000_000),
                nanos: at.rem_euclid(1_000_000_000) as i32,
            }),
            ..cart(user, product)
        }
    };
    fired_now(&mut c, cart("ola", "new")).await;
    fired_now(&mut c, cart("pia", "new")).await;
    // Arriving late, dated inside the pending timer's span: it neither fires nor moves the timer.
    assert_eq!(fired_now(&mut c, dated("pia", "old", 500_000_000)).await, 0);
    // Arriving late, dated an hour ago: its own window closed long before the pending timer's
    // event, so it is a cart of its own, settled at once (it fires); the pending timer stays.
    assert_eq!(fired_now(&mut c, dated("ola", "old", 3_600_000_000_000)).await, 1);
    fired_now(&mut c, cart("control", "x")).await;
    let seen = until_user(&mut s, "control").await;
    let of = |user: &str| -> Vec<String> {
        seen.iter()
            .filter(|a| a.user_id == user)
            .map(|a| a.payload.clone())
            .collect()
    };
    assert_eq!(of("pia").len(), 1, "{seen:?}");
    assert!(of("pia")[0].contains("new"));
    let ola = of("ola");
    assert_eq!(ola.len(), 2, "{seen:?}");
    assert!(ola[0].contains("old") && ola[1].contains("new"), "{ola:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_a_trigger_cancels_the_timers_it_armed() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let changed = create_trigger(&mut t, abandoned_cart(secs(1))).await.unwrap();
    let mut s = stream(server.channel().await).await;
    let mut c = server.events().await;
    fired_now(&mut c, cart("before", "a")).await;
    // A rename is a change: the pending timer is cancelled; the trigger keeps working.
    t.update_trigger(proto::UpdateTriggerRequest {
        trigger: Some(proto::Trigger {
            name: "renamed".into(),
            ..changed.clone()
        }),
    })
    .await
    .unwrap();
    fired_now(&mut c, cart("after", "b")).await;
    let a = next(&mut s).await;
    assert_eq!(
        (a.user_id.as_str(), a.trigger_name.as_str()),
        ("after", "renamed")
    );
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}
