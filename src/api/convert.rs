//! Proto ⇄ domain conversions. Conversions from the wire validate shape (a oneof that must be
//! set, a timestamp in range) and name the field at fault.

use crate::domain::condition::{Aggregate, Operator, RawCondition};
use crate::domain::model::{
    AttributeDefinition, AttributeType, Event, EventNameStats, FiredAction, NewEvent, Timestamp, Trigger,
    Value,
};
use crate::error::{invalid, Error};
use crate::proto;

/// A wire timestamp as a domain one; `field` names it in errors.
pub(crate) fn timestamp(field: &str, ts: &prost_types::Timestamp) -> Result<Timestamp, Error> {
    Timestamp::new(ts.seconds, ts.nanos).ok_or_else(|| {
        invalid(format!(
            "{field}: seconds {} / nanos {} is not a valid timestamp (years 1-9999, nanos 0-999999999)",
            ts.seconds, ts.nanos
        ))
    })
}

/// An optional wire timestamp.
pub(crate) fn opt_timestamp(
    field: &str,
    ts: &Option<prost_types::Timestamp>,
) -> Result<Option<Timestamp>, Error> {
    ts.as_ref().map(|t| timestamp(field, t)).transpose()
}

/// A domain timestamp on the wire.
pub(crate) fn to_proto_ts(ts: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ts.secs,
        nanos: ts.nanos as i32,
    }
}

/// A wire attribute value; an AttributeValue with no value set is rejected.
pub(crate) fn value(field: &str, v: &proto::AttributeValue) -> Result<Value, Error> {
    use proto::attribute_value::Value as V;
    match &v.value {
        None => Err(invalid(format!("{field}: no value set"))),
        Some(V::StringValue(s)) => Ok(Value::String(s.clone())),
        Some(V::NumberValue(n)) if n.is_finite() => Ok(Value::Number(*n)),
        Some(V::NumberValue(n)) => Err(invalid(format!("{field}: number {n} is not finite"))),
        Some(V::BoolValue(b)) => Ok(Value::Bool(*b)),
        Some(V::DateValue(ts)) => Ok(Value::Date(timestamp(field, ts)?)),
        Some(V::JsonValue(s)) => Ok(Value::Json(s.clone())),
    }
}

/// A domain value on the wire.
pub(crate) fn to_proto_value(v: &Value) -> proto::AttributeValue {
    use proto::attribute_value::Value as V;
    let value = match v {
        Value::String(s) => V::StringValue(s.clone()),
        Value::Number(n) => V::NumberValue(*n),
        Value::Bool(b) => V::BoolValue(*b),
        Value::Date(ts) => V::DateValue(to_proto_ts(*ts)),
        Value::Json(s) => V::JsonValue(s.clone()),
    };
    proto::AttributeValue { value: Some(value) }
}

/// A wire event as submitted; field names in errors are relative to the event.
pub(crate) fn new_event(e: proto::Event) -> Result<NewEvent, Error> {
    let occurred_at = opt_timestamp("occurred_at", &e.occurred_at)?;
    let mut attributes = Vec::with_capacity(e.attributes.len());
    for (name, v) in &e.attributes {
        attributes.push((name.clone(), value(&format!("attributes[{name:?}]"), v)?));
    }
    Ok(NewEvent {
        event_id: e.event_id,
        user_id: e.user_id,
        name: e.name,
        occurred_at,
        attributes,
    })
}

/// A stored event on the wire.
pub(crate) fn to_proto_event(e: &Event) -> proto::Event {
    proto::Event {
        event_id: e.event_id.clone(),
        user_id: e.user_id.clone(),
        name: e.name.clone(),
        occurred_at: Some(to_proto_ts(e.occurred_at)),
        attributes: e
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), to_proto_value(v)))
            .collect(),
        received_at: Some(to_proto_ts(e.received_at)),
        sequence: e.sequence,
    }
}

/// A wire attribute type; UNSPECIFIED and unknown numbers are rejected.
pub(crate) fn attribute_type(field: &str, raw: i32) -> Result<AttributeType, Error> {
    use proto::AttributeType as P;
    match P::try_from(raw) {
        Ok(P::String) => Ok(AttributeType::String),
        Ok(P::Number) => Ok(AttributeType::Number),
        Ok(P::Date) => Ok(AttributeType::Date),
        Ok(P::Boolean) => Ok(AttributeType::Boolean),
        Ok(P::Json) => Ok(AttributeType::Json),
        Ok(P::Unspecified) => Err(invalid(format!(
            "{field}: must be set (STRING, NUMBER, DATE, BOOLEAN or JSON)"
        ))),
        Err(_) => Err(invalid(format!("{field}: unknown attribute type {raw}"))),
    }
}

/// A domain attribute type on the wire.
pub(crate) fn to_proto_type(t: AttributeType) -> proto::AttributeType {
    match t {
        AttributeType::String => proto::AttributeType::String,
        AttributeType::Number => proto::AttributeType::Number,
        AttributeType::Date => proto::AttributeType::Date,
        AttributeType::Boolean => proto::AttributeType::Boolean,
        AttributeType::Json => proto::AttributeType::Json,
    }
}

/// An attribute definition on the wire.
pub(crate) fn to_proto_definition(d: &AttributeDefinition) -> proto::AttributeDefinition {
    proto::AttributeDefinition {
        name: d.name.clone(),
        r#type: to_proto_type(d.attribute_type) as i32,
        description: d.description.clone(),
        auto_created: d.auto_created,
        created_at: Some(to_proto_ts(d.created_at)),
    }
}

/// An event name's statistics on the wire.
pub(crate) fn to_proto_name_summary(name: &str, s: &EventNameStats) -> proto::EventNameSummary {
    proto::EventNameSummary {
        name: name.to_string(),
        count: s.count,
        first_seen: Some(to_proto_ts(s.first_seen)),
        last_seen: Some(to_proto_ts(s.last_seen)),
    }
}

/// A wire duration in nanoseconds; `field` names it in errors. Must be positive.
pub(crate) fn positive_duration(field: &str, d: &prost_types::Duration) -> Result<i128, Error> {
    if !(0..1_000_000_000).contains(&d.nanos) || d.seconds < 0 {
        return Err(invalid(format!(
            "{field}: seconds {} / nanos {} is not a valid positive duration",
            d.seconds, d.nanos
        )));
    }
    let nanos = d.seconds as i128 * 1_000_000_000 + d.nanos as i128;
    if nanos == 0 {
        return Err(invalid(format!("{field}: must be longer than zero")));
    }
    Ok(nanos)
}

/// Statistics buckets on the wire (GetEventStats, GetActionStats): the buckets and the total.
pub(crate) fn to_proto_stats(stats: crate::read::stats::Stats) -> (Vec<proto::StatsBucket>, f64) {
    let buckets = stats
        .buckets
        .into_iter()
        .map(|b| proto::StatsBucket {
            start: Some(to_proto_ts(b.start)),
            value: b.value,
            events: b.events,
        })
        .collect();
    (buckets, stats.total)
}

/// Nanoseconds as a wire duration.
pub(crate) fn to_proto_duration(nanos: i128) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

fn operator(field: &str, raw: i32) -> Result<Option<Operator>, Error> {
    use proto::Operator as P;
    Ok(match P::try_from(raw) {
        Ok(P::Unspecified) => None,
        Ok(P::Eq) => Some(Operator::Eq),
        Ok(P::Ne) => Some(Operator::Ne),
        Ok(P::Gt) => Some(Operator::Gt),
        Ok(P::Gte) => Some(Operator::Gte),
        Ok(P::Lt) => Some(Operator::Lt),
        Ok(P::Lte) => Some(Operator::Lte),
        Ok(P::Contains) => Some(Operator::Contains),
        Ok(P::StartsWith) => Some(Operator::StartsWith),
        Ok(P::In) => Some(Operator::In),
        Ok(P::Exists) => Some(Operator::Exists),
        Ok(P::NotExists) => Some(Operator::NotExists),
        Err(_) => return Err(invalid(format!("{field}: unknown operator {raw}"))),
    })
}

fn to_proto_operator(op: Option<Operator>) -> i32 {
    use proto::Operator as P;
    (match op {
        None => P::Unspecified,
        Some(Operator::Eq) => P::Eq,
        Some(Operator::Ne) => P::Ne,
        Some(Operator::Gt) => P::Gt,
        Some(Operator::Gte) => P::Gte,
        Some(Operator::Lt) => P::Lt,
        Some(Operator::Lte) => P::Lte,
        Some(Operator::Contains) => P::Contains,
        Some(Operator::StartsWith) => P::StartsWith,
        Some(Operator::In) => P::In,
        Some(Operator::Exists) => P::Exists,
        Some(Operator::NotExists) => P::NotExists,
    }) as i32
}

/// A wire aggregate; UNSPECIFIED is `None` (the caller picks the default).
pub(crate) fn aggregate(field: &str, raw: i32) -> Result<Option<Aggregate>, Error> {
    use proto::Aggregate as P;
    Ok(match P::try_from(raw) {
        Ok(P::Unspecified) => None,
        Ok(P::Count) => Some(Aggregate::Count),
        Ok(P::Sum) => Some(Aggregate::Sum),
        Ok(P::Min) => Some(Aggregate::Min),
        Ok(P::Max) => Some(Aggregate::Max),
        Ok(P::Avg) => Some(Aggregate::Avg),
        Ok(P::DistinctUsers) => Some(Aggregate::DistinctUsers),
        Err(_) => return Err(invalid(format!("{field}: unknown aggregate {raw}"))),
    })
}

fn to_proto_aggregate(a: Option<Aggregate>) -> i32 {
    use proto::Aggregate as P;
    (match a {
        None => P::Unspecified,
        Some(Aggregate::Count) => P::Count,
        Some(Aggregate::Sum) => P::Sum,
        Some(Aggregate::Min) => P::Min,
        Some(Aggregate::Max) => P::Max,
        Some(Aggregate::Avg) => P::Avg,
        Some(Aggregate::DistinctUsers) => P::DistinctUsers,
    }) as i32
}

/// Converts a wire condition at `field` and validates it for `place` against the schema the
/// engine knows: the submitted form (to answer reads) and the validated one (to evaluate).
pub(crate) fn validated_condition(
    ingest: &crate::engine::Ingest,
    field: &str,
    c: &proto::Condition,
    place: crate::domain::condition::Place,
) -> Result<(RawCondition, crate::domain::condition::Condition), Error> {
    let raw = raw_condition(field, c)?;
    crate::domain::condition::check_size(&raw, field, ingest.limits())?;
    let valid = crate::domain::condition::validate(
        &raw,
        field,
        place,
        &|name| ingest.attribute_type(name),
        ingest.limits().max_attribute_name_chars,
    )?;
    Ok((raw, valid))
}

/// A wire condition as submitted (validation is the domain's: `condition::validate`).
pub(crate) fn raw_condition(field: &str, c: &proto::Condition) -> Result<RawCondition, Error> {
    use proto::condition::Kind;
    let list = |l: &proto::ConditionList, kind: &str| -> Result<Vec<RawCondition>, Error> {
        l.conditions
            .iter()
            .enumerate()
            .map(|(i, c)| raw_condition(&format!("{field}.{kind}.conditions[{i}]"), c))
            .collect()
    };
    Ok(match &c.kind {
        None => RawCondition::Empty,
        Some(Kind::All(l)) => RawCondition::All(list(l, "all")?),
        Some(Kind::Any(l)) => RawCondition::Any(list(l, "any")?),
        Some(Kind::Not(inner)) => {
            RawCondition::Not(Some(Box::new(raw_condition(&format!("{field}.not"), inner)?)))
        }
        Some(Kind::Attribute(a)) => {
            let f = format!("{field}.attribute");
            RawCondition::Attribute {
                attribute: a.attribute.clone(),
                op: operator(&format!("{f}.op"), a.op)?,
                value: a
                    .value
                    .as_ref()
                    .map(|v| value(&format!("{f}.value"), v))
                    .transpose()?,
                values: a
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| value(&format!("{f}.values[{i}]"), v))
                    .collect::<Result<_, _>>()?,
            }
        }
        Some(Kind::History(h)) => {
            let f = format!("{field}.history");
            RawCondition::History {
                event_name: h.event_name.clone(),
                filter: h
                    .r#where
                    .as_ref()
                    .map(|w| raw_condition(&format!("{f}.where"), w).map(Box::new))
                    .transpose()?,
                aggregate: aggregate(&format!("{f}.aggregate"), h.aggregate)?,
                attribute: h.attribute.clone(),
                op: operator(&format!("{f}.op"), h.op)?,
                value: h.value,
                within_nanos: h
                    .within
                    .as_ref()
                    .map(|d| positive_duration(&format!("{f}.within"), d))
                    .transpose()?,
            }
        }
    })
}

/// A submitted condition back on the wire, as it was sent.
pub(crate) fn to_proto_condition(c: &RawCondition) -> proto::Condition {
    use proto::condition::Kind;
    let list = |items: &[RawCondition]| proto::ConditionList {
        conditions: items.iter().map(to_proto_condition).collect(),
    };
    let kind = match c {
        RawCondition::Empty => None,
        RawCondition::All(items) => Some(Kind::All(list(items))),
        RawCondition::Any(items) => Some(Kind::Any(list(items))),
        RawCondition::Not(inner) => Some(Kind::Not(Box::new(
            inner.as_deref().map(to_proto_condition).unwrap_or_default(),
        ))),
        RawCondition::Attribute {
            attribute,
            op,
            value,
            values,
        } => Some(Kind::Attribute(proto::AttributeCondition {
            attribute: attribute.clone(),
            op: to_proto_operator(*op),
            value: value.as_ref().map(to_proto_value),
            values: values.iter().map(to_proto_value).collect(),
        })),
        RawCondition::History {
            event_name,
            filter,
            aggregate,
            attribute,
            op,
            value,
            within_nanos,
        } => Some(Kind::History(Box::new(proto::HistoryCondition {
            event_name: event_name.clone(),
            r#where: filter.as_deref().map(|f| Box::new(to_proto_condition(f))),
            aggregate: to_proto_aggregate(*aggregate),
            attribute: attribute.clone(),
            op: to_proto_operator(*op),
            value: *value,
            within: within_nanos.map(to_proto_duration),
        }))),
    };
    proto::Condition { kind }
}

/// A stored trigger on the wire.
pub(crate) fn to_proto_trigger(t: &Trigger) -> proto::Trigger {
    proto::Trigger {
        id: t.id.clone(),
        name: t.name.clone(),
        paused: t.paused,
        event_name: t.event_name.clone(),
        condition: t.raw_condition.as_ref().map(to_proto_condition),
        action: Some(proto::ActionTemplate {
            r#type: t.action.action_type.clone(),
            payload_template: t.action.payload_template.clone(),
            destination_id: t.destination_id.clone(),
        }),
        delay: t.delay_nanos.map(to_proto_duration),
        unless: t.unless.as_ref().map(|u| proto::AbsenceCheck {
            event_name: u.event_name.clone(),
            condition: u.raw_condition.as_ref().map(to_proto_condition),
            within: Some(to_proto_duration(u.within_nanos)),
        }),
        cooldown: t.cooldown_nanos.map(to_proto_duration),
        once_per_user: t.once_per_user,
        created_at: Some(to_proto_ts(t.created_at)),
        updated_at: Some(to_proto_ts(t.updated_at)),
    }
}

/// A fired action on the wire, in at most `max_bytes`: an action whose event would make it
/// larger carries the event without its attributes, marked `event_truncated` (the payload is
/// bounded when rendered, so that is always enough).
pub(crate) fn to_proto_action(a: &FiredAction, max_bytes: usize) -> proto::FiredAction {
    let mut action = proto::FiredAction {
        sequence: a.sequence,
        action_id: a.action_id.clone(),
        trigger_id: a.trigger_id.clone(),
        trigger_name: a.trigger_name.clone(),
        r#type: a.action_type.clone(),
        user_id: a.user_id.clone(),
        event_id: a.event_id.clone(),
        fired_at: Some(to_proto_ts(a.fired_at)),
        payload: a.payload.clone(),
        event: a.event.as_ref().map(to_proto_event),
        event_truncated: false,
    };
    // The bound is exact enough for nearly every action: only a large one is measured.
    if a.approx_size() <= max_bytes {
        return action;
    }
    if prost::Message::encoded_len(&action) > max_bytes {
        if let Some(event) = &mut action.event {
            event.attributes.clear();
            action.event_truncated = true;
        }
    }
    // Only an action stored before payloads were bounded (or under a larger message limit) can
    // still be too large: it goes out with its payload empty rather than stop its stream.
    if prost::Message::encoded_len(&action) > max_bytes {
        tracing::warn!(
            sequence = a.sequence,
            bytes = a.payload.len(),
            "an action's payload is larger than a message; sent empty"
        );
        action.payload.clear();
    }
    action
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn action(payload_bytes: usize, attribute_bytes: usize) -> FiredAction {
        let mut attributes = BTreeMap::new();
        attributes.insert("a".to_string(), Value::String("a".repeat(attribute_bytes)));
        FiredAction {
            sequence: 7,
            action_id: "x".into(),
            trigger_id: "t".into(),
            trigger_name: "n".into(),
            action_type: "email".into(),
            user_id: "u".into(),
            event_id: "e".into(),
            fired_at: Timestamp::MIN,
            payload: "p".repeat(payload_bytes),
            event: Some(Event {
                event_id: "e".into(),
                user_id: "u".into(),
                name: "n".into(),
                occurred_at: Timestamp::MIN,
                received_at: Timestamp::MIN,
                sequence: 1,
                attributes,
            }),
            destination_id: String::new(),
        }
    }

    #[test]
    fn an_action_always_fits_the_size_it_is_sent_in() {
        let fits = to_proto_action(&action(100, 100), 10_000);
        assert!(!fits.event_truncated && fits.payload.len() == 100);
        let trimmed = to_proto_action(&action(100, 20_000), 10_000);
        assert!(trimmed.event_truncated);
        assert_eq!(trimmed.event.map(|e| e.attributes.len()), Some(0));
        assert_eq!(trimmed.payload.len(), 100);
        // A payload stored before payloads were bounded.
        let old = to_proto_action(&action(20_000, 100), 10_000);
        assert!(old.payload.is_empty());
        assert!(prost::Message::encoded_len(&old) <= 10_000);
    }
}
