//! The trigger engine (`proto/engage/v1/triggers.proto`, evaluation semantics).

// Test helpers: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use engage::proto;
use engage::proto::{Aggregate as A, Operator as Op};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn two_triggers_on_one_event_both_fire_with_rendered_payloads() {
    let server = TestServer::start().await;
    define(&server, "price", proto::AttributeType::Number).await;
    let mut t = server.triggers().await;
    let email = create_trigger(
        &mut t,
        trigger(
            "event.purchase",
            "send_email",
            "Hi {{ user_id }}, thanks for {{ event.attributes.product }} at ${{ event.attributes.price }} \
             ({{ event.name }}, {{ trigger.name }}){% if event.attributes.express %} express{% endif %}",
        ),
    )
    .await
    .unwrap();
    assert!(!email.id.is_empty());
    assert_eq!(email.event_name, "purchase");
    let hook = create_trigger(
        &mut t,
        trigger("purchase", "webhook", "{{ event.event_id }}|{{ trigger.id }}"),
    )
    .await
    .unwrap();
    let mut c = server.events().await;
    let mut e = event_at("ann", "purchase", "order-7", 1_700_000_000);
    e.attributes.insert("price".into(), s("39"));
    e.attributes.insert("product".into(), s("Blue shoes"));
    e.attributes.insert("express".into(), b(true));
    let r = track(&mut c, e).await.unwrap();
    assert_eq!(r.actions_fired, 2);
    let mut a = server.actions().await;
    let mut actions = user_actions(&mut a, "ann").await;
    actions.reverse();
    assert_eq!(actions.len(), 2);
    assert_eq!(actions[0].trigger_id, email.id);
    assert_eq!(actions[0].r#type, "send_email");
    assert_eq!(
        actions[0].payload,
        "Hi ann, thanks for Blue shoes at $39 (purchase, send_email on event.purchase) express"
    );
    assert_eq!(actions[1].payload, format!("order-7|{}", hook.id));
    assert_eq!(actions[1].sequence, actions[0].sequence + 1);
    assert_eq!(actions[0].event_id, "order-7");
    let ev = actions[0].event.as_ref().unwrap();
    assert_eq!(ev.sequence, r.sequence);
    assert!(!actions[0].action_id.is_empty() && actions[0].action_id != actions[1].action_id);
    // Another event name fires nothing; a duplicate fires nothing.
    assert_eq!(fired(&mut c, event("ann", "view", &[])).await, 0);
    let again = track(&mut c, event_at("ann", "purchase", "order-7", 1_700_000_000))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.actions_fired, 0);
    assert_eq!(user_actions(&mut a, "ann").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn triggers_never_fire_retroactively() {
    let server = TestServer::start().await;
    let mut c = server.events().await;
    for i in 0..3 {
        track(&mut c, event_at("bob", "purchase", "", 1_000 + i))
            .await
            .unwrap();
    }
    let mut t = server.triggers().await;
    let mut more_than_two = trigger("purchase", "vip", "");
    more_than_two.condition = Some(history_cond(history("purchase", A::Count, "", Op::Gt, 2.0)));
    create_trigger(&mut t, more_than_two).await.unwrap();
    let mut a = server.actions().await;
    assert!(
        user_actions(&mut a, "bob").await.is_empty(),
        "nothing fires on creation"
    );
    // The next event fires, and history includes the events stored before the trigger.
    assert_eq!(fired(&mut c, event_at("bob", "purchase", "", 2_000)).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn history_count_fires_on_the_nth_event() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut nth = trigger("purchase", "loyal", "{{ user_id }}");
    nth.condition = Some(history_cond(history(
        "purchase",
        A::Unspecified,
        "",
        Op::Gte,
        3.0,
    )));
    create_trigger(&mut t, nth).await.unwrap();
    let mut c = server.events().await;
    let counts: Vec<u32> = {
        let mut v = Vec::new();
        for i in 0..5 {
            v.push(fired(&mut c, event_at("cy", "purchase", "", 1_000 + i)).await);
        }
        v
    };
    assert_eq!(counts, [0, 0, 1, 1, 1]);
    // Within one batch too: the group sees its own earlier events.
    let results = c
        .track_events(proto::TrackEventsRequest {
            events: (0..4)
                .map(|i| event_at("dee", "purchase", "", 1_000 + i))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let counts: Vec<u32> = results.iter().map(|r| r.actions_fired).collect();
    assert_eq!(counts, [0, 0, 1, 1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn history_windows_where_and_number_aggregates() {
    let server = TestServer::start().await;
    define(&server, "amount", proto::AttributeType::Number).await;
    let mut t = server.triggers().await;
    // One payment over 500 within the last hour (the event itself counts).
    let mut big = history("payment", A::Count, "", Op::Gte, 1.0);
    big.r#where = Some(Box::new(attr_cond("amount", Op::Gt, s("500"))));
    big.within = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    let mut big_payment = trigger("payment", "big", "");
    big_payment.condition = Some(history_cond(big));
    let big_id = create_trigger(&mut t, big_payment).await.unwrap().id;
    // Spent over 1000 in total.
    let mut spender = trigger("payment", "spender", "");
    spender.condition = Some(history_cond(history("payment", A::Sum, "amount", Op::Gt, 1000.0)));
    spender.once_per_user = true;
    let spender_id = create_trigger(&mut t, spender).await.unwrap().id;

    let mut c = server.events().await;
    let pay = |user: &str, amount: f64, at: i64| {
        let mut e = event_at(user, "payment", "", at);
        e.attributes.insert("amount".into(), n(amount));
        e
    };
    let t0 = 1_700_000_000;
    let mut fired_by = Vec::new();
    for (amount, at) in [
        (600.0, t0),
        (100.0, t0 + 1800),
        (100.0, t0 + 7200),
        (400.0, t0 + 7300),
        (50.0, t0 + 7400),
    ] {
        track(&mut c, pay("eve", amount, at)).await.unwrap();
        let mut a = server.actions().await;
        let triggers: Vec<String> = user_actions(&mut a, "eve")
            .await
            .into_iter()
            .map(|a| a.trigger_id)
            .collect();
        fired_by.push((
            triggers.iter().filter(|t| **t == big_id).count(),
            triggers.iter().filter(|t| **t == spender_id).count(),
        ));
    }
    // big: fires at t0 (600 in window), t0+1800 (600 still in window), not at t0+7200 (600 out).
    // spender: total passes 1000 at the 4th payment (1200), once per user.
    assert_eq!(fired_by, [(1, 0), (2, 0), (2, 0), (2, 1), (2, 1)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn attribute_conditions_read_the_triggering_event() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut blue_shoes = trigger("purchase", "promo", "");
    blue_shoes.condition = Some(all(vec![
        attr_cond("color", Op::Eq, s("blue")),
        attr_cond("price", Op::Gt, n(150.0)),
    ]));
    create_trigger(&mut t, blue_shoes).await.unwrap();
    let mut c = server.events().await;
    let buy = |color: &str, price: f64| event("fay", "purchase", &[("color", s(color)), ("price", n(price))]);
    // price is not defined, so a number creates... a STRING attribute: define it first.
    define(&server, "price", proto::AttributeType::Number).await;
    assert_eq!(fired(&mut c, buy("blue", 200.0)).await, 1);
    assert_eq!(fired(&mut c, buy("blue", 100.0)).await, 0);
    assert_eq!(fired(&mut c, buy("red", 200.0)).await, 0);
    assert_eq!(fired(&mut c, event("fay", "purchase", &[])).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cooldown_and_once_per_user_limit_firings_per_user() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut once = trigger("login", "welcome", "");
    once.once_per_user = true;
    create_trigger(&mut t, once).await.unwrap();
    let mut cool = trigger("login", "digest", "");
    cool.cooldown = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    create_trigger(&mut t, cool).await.unwrap();
    let mut c = server.events().await;
    let counts: Vec<u32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(fired(&mut c, event("gus", "login", &[])).await);
        }
        v
    };
    assert_eq!(counts, [2, 0, 0]);
    assert_eq!(fired(&mut c, event("hal", "login", &[])).await, 2, "per user");
    // Kept across a restart.
    let server = server.restart().await;
    let mut c = server.events().await;
    assert_eq!(fired(&mut c, event("gus", "login", &[])).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_update_and_delete_change_what_fires() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut c = server.events().await;
    let created = create_trigger(&mut t, trigger("click", "ping", "v1"))
        .await
        .unwrap();
    assert_eq!(fired(&mut c, event("ida", "click", &[])).await, 1);

    let mut paused = created.clone();
    paused.paused = true;
    let updated = t
        .update_trigger(proto::UpdateTriggerRequest {
            trigger: Some(paused),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.paused);
    assert_eq!(updated.created_at, created.created_at);
    let secs = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
    assert!(secs(&updated.updated_at) >= secs(&created.updated_at));
    assert_eq!(fired(&mut c, event("ida", "click", &[])).await, 0);

    let mut v2 = created.clone();
    v2.action = Some(proto::ActionTemplate {
        r#type: "ping".into(),
        payload_template: "v2".into(),
        destination_id: String::new(),
    });
    v2.event_name = "tap".into();
    t.update_trigger(proto::UpdateTriggerRequest { trigger: Some(v2) })
        .await
        .unwrap();
    assert_eq!(fired(&mut c, event("ida", "click", &[])).await, 0);
    assert_eq!(fired(&mut c, event("ida", "tap", &[])).await, 1);
    let mut a = server.actions().await;
    assert_eq!(user_actions(&mut a, "ida").await[0].payload, "v2");

    t.delete_trigger(proto::DeleteTriggerRequest {
        id: created.id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(fired(&mut c, event("ida", "tap", &[])).await, 0);
    let err = t
        .get_trigger(proto::GetTriggerRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = t
        .delete_trigger(proto::DeleteTriggerRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = t
        .update_trigger(proto::UpdateTriggerRequest {
            trigger: Some(created),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Fired actions outlive their trigger.
    assert_eq!(user_actions(&mut a, "ida").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn crud_lists_in_creation_order_with_paging_and_a_name_filter() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let name = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(create_trigger(&mut t, trigger(name, "x", "")).await.unwrap().id);
    }
    let list = |event_name: &str, page_size: u32, page_token: String| proto::ListTriggersRequest {
        page_size,
        page_token,
        event_name: event_name.into(),
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = t.list_triggers(list("", 3, token)).await.unwrap().into_inner();
        assert!(page.triggers.len() <= 3);
        seen.extend(page.triggers.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
    let odd = t
        .list_triggers(list("event.odd", 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(odd.triggers.len(), 3);
    assert!(odd.triggers.iter().all(|t| t.event_name == "odd"));
    let got = t
        .get_trigger(proto::GetTriggerRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.event_name, "even");
    // Kept across a restart, index included.
    let server = server.restart().await;
    let mut t = server.triggers().await;
    assert_eq!(
        t.list_triggers(list("", 0, String::new()))
            .await
            .unwrap()
            .into_inner()
            .triggers
            .len(),
        7
    );
    let mut c = server.events().await;
    assert_eq!(fired(&mut c, event("u", "odd", &[])).await, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_condition_round_trips_as_submitted() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut h = history("payment", A::Count, "", Op::Gte, 1.0);
    h.r#where = Some(Box::new(attr_cond("amount", Op::Gt, n(500.0))));
    h.within = Some(prost_types::Duration {
        seconds: 60,
        nanos: 5,
    });
    let mut tr = trigger("payment", "x", "");
    tr.condition = Some(all(vec![
        history_cond(h),
        attr_cond("currency", Op::Eq, s("EUR")),
    ]));
    tr.cooldown = Some(prost_types::Duration {
        seconds: 10,
        nanos: 0,
    });
    let created = create_trigger(&mut t, tr.clone()).await.unwrap();
    assert_eq!(created.condition, tr.condition);
    assert_eq!(created.cooldown, tr.cooldown);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_triggers_name_the_part_that_is_wrong_and_store_nothing() {
    let server = TestServer::start().await;
    define(&server, "color", proto::AttributeType::String).await;
    let with = |edit: &dyn Fn(&mut proto::Trigger)| {
        let mut t = trigger("purchase", "send_email", "Hi {{ user_id }}");
        edit(&mut t);
        t
    };
    let cond = |c: proto::Condition| move |t: &mut proto::Trigger| t.condition = Some(c.clone());
    let in_without_values = proto::Condition {
        kind: Some(proto::condition::Kind::Attribute(proto::AttributeCondition {
            attribute: "color".into(),
            op: Op::In as i32,
            value: None,
            values: vec![],
        })),
    };
    let cases: Vec<(proto::Trigger, Code, &str)> = vec![
        (
            with(&|t| t.event_name.clear()),
            Code::InvalidArgument,
            "trigger.event_name",
        ),
        (
            with(&|t| t.action = None),
            Code::InvalidArgument,
            "trigger.action",
        ),
        (
            with(&|t| t.action.as_mut().unwrap().r#type.clear()),
            Code::InvalidArgument,
            "trigger.action.type",
        ),
        (
            with(&|t| t.action.as_mut().unwrap().payload_template = "{{ user_id ".into()),
            Code::InvalidArgument,
            "trigger.action.payload_template",
        ),
        (
            with(&cond(attr_cond("color", Op::Gt, s("b")))),
            Code::InvalidArgument,
            "trigger.condition.attribute.op",
        ),
        (
            with(&cond(attr_cond("color", Op::Unspecified, s("b")))),
            Code::InvalidArgument,
            "trigger.condition.attribute.op",
        ),
        (
            with(&cond(in_without_values.clone())),
            Code::InvalidArgument,
            "trigger.condition.attribute.values",
        ),
        (
            with(&cond(all(vec![
                attr_cond("ok", Op::Eq, s("x")),
                attr_cond("bad name", Op::Eq, s("x")),
            ]))),
            Code::InvalidArgument,
            "trigger.condition.all.conditions[1].attribute.attribute",
        ),
        (
            with(&cond(history_cond(history(
                "purchase",
                A::Sum,
                "color",
                Op::Gt,
                1.0,
            )))),
            Code::InvalidArgument,
            "trigger.condition.history.attribute",
        ),
        (
            with(&cond(history_cond(history(
                "purchase",
                A::DistinctUsers,
                "",
                Op::Gt,
                1.0,
            )))),
            Code::InvalidArgument,
            "trigger.condition.history.aggregate",
        ),
        (
            with(&cond(history_cond(history(
                "purchase",
                A::Count,
                "",
                Op::Contains,
                1.0,
            )))),
            Code::InvalidArgument,
            "trigger.condition.history.op",
        ),
        (
            with(&cond(history_cond(history("", A::Count, "", Op::Gt, 1.0)))),
            Code::InvalidArgument,
            "trigger.condition.history.event_name",
        ),
        (
            with(&cond(proto::Condition { kind: None })),
            Code::InvalidArgument,
            "trigger.condition",
        ),
        (
            with(&|t| {
                t.cooldown = Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                })
            }),
            Code::InvalidArgument,
            "trigger.cooldown",
        ),
        (
            with(&|t| t.delay = Some(prost_types::Duration { seconds: 0, nanos: 0 })),
            Code::InvalidArgument,
            "trigger.delay",
        ),
        // The name is checked first: with a bad event name and no action too, it is the name.
        (
            with(&|t| {
                t.name = "n".repeat(257);
                t.event_name.clear();
                t.action = None;
            }),
            Code::InvalidArgument,
            "trigger.name",
        ),
    ];
    let mut t = server.triggers().await;
    for (tr, code, field) in cases {
        let err = create_trigger(&mut t, tr).await.unwrap_err();
        assert_eq!(err.code(), code, "{field}: {}", err.message());
        assert!(
            err.message().starts_with(field),
            "{:?} should start with {field}",
            err.message()
        );
    }
    let list = t
        .list_triggers(proto::ListTriggersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.triggers.is_empty(), "nothing stored");
    let err = t
        .create_trigger(proto::CreateTriggerRequest { trigger: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn running_aggregates_are_rebuilt_after_maintenance_pauses() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut c = server.events().await;
    let count_over = |n: f64| {
        let mut tr = trigger("buy", "milestone", "");
        tr.condition = Some(history_cond(history("buy", A::Count, "", Op::Gt, n)));
        tr
    };
    // Maintained while the first trigger exists...
    let first = create_trigger(&mut t, count_over(100.0)).await.unwrap();
    for i in 0..3 {
        track(&mut c, event_at("jo", "buy", "", 1_000 + i)).await.unwrap();
    }
    // ...not while no trigger needs it...
    t.delete_trigger(proto::DeleteTriggerRequest { id: first.id })
        .await
        .unwrap();
    for i in 3..6 {
        track(&mut c, event_at("jo", "buy", "", 1_000 + i)).await.unwrap();
    }
    // ...and a new trigger must count all six, not the three the old aggregate saw.
    create_trigger(&mut t, count_over(6.0)).await.unwrap();
    assert_eq!(fired(&mut c, event_at("jo", "buy", "", 2_000)).await, 1);
    let server = server.restart().await;
    let mut c = server.events().await;
    assert_eq!(fired(&mut c, event_at("jo", "buy", "", 2_001)).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn all_history_ignores_events_after_the_reference_time() {
    // A backfilled event (older occurred_at) must not count events that happened after it.
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    let mut tr = trigger("buy", "third", "");
    tr.condition = Some(history_cond(history("buy", A::Count, "", Op::Gte, 3.0)));
    create_trigger(&mut t, tr).await.unwrap();
    let mut c = server.events().await;
    assert_eq!(fired(&mut c, event_at("kai", "buy", "", 5_000)).await, 0);
    assert_eq!(fired(&mut c, event_at("kai", "buy", "", 6_000)).await, 0);
    // Third event overall, but at its time only one earlier purchase existed.
    assert_eq!(fired(&mut c, event_at("kai", "buy", "", 1_000)).await, 0);
    assert_eq!(fired(&mut c, event_at("kai", "buy", "", 7_000)).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_condition_on_a_not_yet_defined_attribute_keeps_matching_after_auto_creation() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    // `amount` is not defined: compared as a NUMBER because 500 is one.
    let mut big = trigger("payment", "big", "{{ event.attributes.amount }}");
    big.condition = Some(attr_cond("amount", Op::Gt, n(500.0)));
    create_trigger(&mut t, big).await.unwrap();
    let mut c = server.events().await;
    // The first event creates `amount` as STRING ("600"); the trigger still compares numbers.
    assert_eq!(
        fired(&mut c, event("lu", "payment", &[("amount", n(600.0))])).await,
        1
    );
    assert_eq!(
        fired(&mut c, event("lu", "payment", &[("amount", s("450"))])).await,
        0
    );
    assert_eq!(
        fired(&mut c, event("lu", "payment", &[("amount", s("1000.5"))])).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_of_another_event_name_counts_that_name() {
    let server = TestServer::start().await;
    let mut t = server.triggers().await;
    // On checkout: fire when the user bought at least twice before (all history).
    let mut repeat = trigger("checkout", "repeat_buyer", "");
    repeat.condition = Some(history_cond(history("buy", A::Count, "", Op::Gte, 2.0)));
    create_trigger(&mut t, repeat).await.unwrap();
    let mut c = server.events().await;
    track(&mut c, event_at("mo", "buy", "", 1_000)).await.unwrap();
    assert_eq!(fired(&mut c, event_at("mo", "checkout", "", 1_001)).await, 0);
    track(&mut c, event_at("mo", "buy", "", 1_002)).await.unwrap();
    assert_eq!(fired(&mut c, event_at("mo", "checkout", "", 1_003)).await, 1);
    // The aggregate written back by that evaluation stays right as more purchases come in and
    // across a restart.
    let server = server.restart().await;
    let mut c = server.events().await;
    assert_eq!(fired(&mut c, event_at("mo", "checkout", "", 1_004)).await, 1);
    assert_eq!(fired(&mut c, event_at("nell", "checkout", "", 1_004)).await, 0);
}
