//! Fuzzing of everything that takes client input, as property tests: arbitrary bytes into the
//! request decoders and on through conversion and the stateless checks; arbitrary well-formed
//! events, conditions and templates through typing, validation, evaluation and rendering. None
//! may panic, and what is accepted must behave (a coerced value coerces to itself, a validated
//! condition evaluates). Cases per property: `ENGAGE_FUZZ_CASES` (default 512 in CI; see the
//! README for a longer run by hand).

use std::collections::BTreeMap;

use proptest::prelude::*;
use prost::Message;

use crate::api::convert;
use crate::domain::condition::{self, Place};
use crate::domain::model::{AttributeType, Event, Timestamp, Value};
use crate::domain::rules::{self, Limits};
use crate::domain::{template, typing};
use crate::proto;

fn cases() -> u32 {
    std::env::var("ENGAGE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512)
}

fn value() -> impl Strategy<Value = proto::AttributeValue> {
    use proto::attribute_value::Value as V;
    prop_oneof![
        ".{0,40}".prop_map(V::StringValue),
        any::<f64>().prop_map(V::NumberValue),
        any::<bool>().prop_map(V::BoolValue),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| V::DateValue(prost_types::Timestamp { seconds, nanos })),
        prop_oneof![Just("{\"a\": [1, 2]}".to_string()), ".{0,20}".prop_map(|s| s)].prop_map(V::JsonValue),
    ]
    .prop_map(|v| proto::AttributeValue { value: Some(v) })
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("price".to_string()),
        Just("color".to_string()),
        "[a-z_]{1,8}",
        ".{0,12}"
    ]
}

fn wire_event() -> impl Strategy<Value = proto::Event> {
    (
        ".{0,10}",
        ".{0,10}",
        prop_oneof![
            Just("purchase".to_string()),
            Just("event.purchase".to_string()),
            ".{0,12}"
        ],
        proptest::option::of((any::<i64>(), any::<i32>())),
        proptest::collection::hash_map(name(), value(), 0..6),
    )
        .prop_map(|(event_id, user_id, name, at, attributes)| proto::Event {
            event_id,
            user_id,
            name,
            occurred_at: at.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
            attributes,
            ..Default::default()
        })
}

fn op() -> impl Strategy<Value = i32> {
    prop_oneof![0..=11i32, any::<i32>()]
}

fn wire_condition() -> impl Strategy<Value = proto::Condition> {
    use proto::condition::Kind;
    let leaf = prop_oneof![
        Just(proto::Condition { kind: None }),
        (
            name(),
            op(),
            proptest::option::of(value()),
            proptest::collection::vec(value(), 0..3)
        )
            .prop_map(|(attribute, op, value, values)| proto::Condition {
                kind: Some(Kind::Attribute(proto::AttributeCondition {
                    attribute,
                    op,
                    value,
                    values,
                })),
            }),
        (
            name(),
            0..=7i32,
            name(),
            op(),
            any::<f64>(),
            proptest::option::of(0..100_000i64)
        )
            .prop_map(
                |(event_name, aggregate, attribute, op, value, within)| proto::Condition {
                    kind: Some(Kind::History(Box::new(proto::HistoryCondition {
                        event_name,
                        r#where: None,
                        aggregate,
                        attribute,
                        op,
                        value,
                        within: within.map(|s| prost_types::Duration { seconds: s, nanos: 0 }),
                    }))),
                }
            ),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|conditions| proto::Condition {
                kind: Some(Kind::All(proto::ConditionList { conditions }))
            }),
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|conditions| proto::Condition {
                kind: Some(Kind::Any(proto::ConditionList { conditions }))
            }),
            inner.prop_map(|c| proto::Condition {
                kind: Some(Kind::Not(Box::new(c)))
            }),
        ]
    })
}

fn stored_event(attributes: BTreeMap<String, Value>) -> Event {
    Event {
        event_id: "e".into(),
        user_id: "u".into(),
        name: "purchase".into(),
        occurred_at: Timestamp::MIN,
        received_at: Timestamp::MIN,
        sequence: 1,
        attributes,
    }
}

/// Types the schema knows in these tests: price is a NUMBER, the rest undefined.
fn type_of(name: &str) -> Option<AttributeType> {
    (name == "price").then_some(AttributeType::Number)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Arbitrary bytes into every request decoder that takes free-form input: decoding may
    /// fail, nothing panics, and what decodes passes through conversion and the checks.
    #[test]
    fn arbitrary_bytes_never_panic_the_decoders_or_the_checks(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(r) = proto::TrackEventsRequest::decode(bytes.as_slice()) {
            for e in r.events {
                if let Ok(e) = convert::new_event(e) {
                    let _ = rules::prepare(e, &Limits::default(), Timestamp::now());
                }
            }
        }
        if let Ok(r) = proto::FilterUsersRequest::decode(bytes.as_slice()) {
            if let Some(c) = r.filter {
                if let Ok(raw) = convert::raw_condition("filter", &c) {
                    let _ = condition::check_size(&raw, "filter", &Limits::default());
                    let _ = condition::validate(&raw, "filter", Place::Filter, &type_of, 128);
                }
            }
        }
        let _ = proto::CreateTriggerRequest::decode(bytes.as_slice());
        let _ = proto::GetUserTimelineRequest::decode(bytes.as_slice());
    }

    /// Well-formed events with arbitrary content: accepted ones type cleanly, and a typed value
    /// coerces to itself.
    #[test]
    fn events_are_typed_or_refused_and_typed_values_are_stable(e in wire_event()) {
        let Ok(new) = convert::new_event(e) else { return Ok(()) };
        let Ok(prepared) = rules::prepare(new, &Limits::default(), Timestamp::now()) else { return Ok(()) };
        for (name, value) in &prepared.attributes {
            let ty = type_of(name).unwrap_or_else(|| typing::type_for_undefined(value));
            if let Ok(typed) = rules::typed_value(&Limits::default(), name, ty, value) {
                prop_assert_eq!(typing::coerce(ty, &typed).ok(), Some(typed.clone()));
            }
        }
    }

    /// Arbitrary condition trees: validation never panics, and a valid condition evaluates on
    /// any event (history answered by a stub) without panicking.
    #[test]
    fn conditions_validate_or_are_refused_and_valid_ones_evaluate(c in wire_condition(), e in wire_event()) {
        for (field, place) in [("trigger.condition", Place::Trigger), ("filter", Place::Filter), ("where", Place::Where)] {
            let Ok(raw) = convert::raw_condition(field, &c) else { continue };
            if condition::check_size(&raw, field, &Limits::default()).is_err() {
                continue;
            }
            if let Ok(valid) = condition::validate(&raw, field, place, &type_of, 128) {
                let mut attributes = BTreeMap::new();
                if let Ok(new) = convert::new_event(e.clone()) {
                    for (k, v) in new.attributes {
                        attributes.insert(k, v);
                    }
                }
                let _ = condition::eval(&valid, &stored_event(attributes), &mut |_| true);
            }
        }
    }

    /// Arbitrary template sources: checking never panics, and a template that checks renders
    /// within its limit.
    #[test]
    fn templates_check_and_render_within_their_limit(source in prop_oneof![
        ".{0,60}",
        Just("{% for i in range(1000000) %}{{ event.attributes.name }}{% endfor %}".to_string()),
        Just("{{ event.attributes.price * 2 }} {{ user_id | upper }} {{ nope.x.y }}".to_string()),
        "\\{\\{ [a-z_.]{0,20} \\}\\}",
    ]) {
        if template::check(&source).is_ok() {
            let mut t = template::Templates::default();
            t.set("t", &source);
            let mut attributes = BTreeMap::new();
            attributes.insert("name".to_string(), Value::String("x".repeat(1000)));
            attributes.insert("price".to_string(), Value::Number(39.5));
            let event = template::EventContext::new(&stored_event(attributes));
            let out = t.render("t", "n", &event, 4096);
            prop_assert!(out.len() <= 4096);
        }
    }
}
