//! Proto ⇄ domain conversions. Conversions from the wire validate shape (a oneof that must be
//! set, a timestamp in range) and name the field at fault.

use crate::error::{invalid, Error};
use crate::model::{AttributeDefinition, AttributeType, Event, EventNameStats, NewEvent, Timestamp, Value};
use crate::proto;

/// A wire timestamp as a domain one; `field` names it in errors.
pub fn timestamp(field: &str, ts: &prost_types::Timestamp) -> Result<Timestamp, Error> {
    Timestamp::new(ts.seconds, ts.nanos).ok_or_else(|| {
        invalid(format!(
            "{field}: seconds {} / nanos {} is not a valid timestamp (years 1-9999, nanos 0-999999999)",
            ts.seconds, ts.nanos
        ))
    })
}

/// An optional wire timestamp.
pub fn opt_timestamp(field: &str, ts: &Option<prost_types::Timestamp>) -> Result<Option<Timestamp>, Error> {
    ts.as_ref().map(|t| timestamp(field, t)).transpose()
}

/// A domain timestamp on the wire.
pub fn to_proto_ts(ts: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ts.secs,
        nanos: ts.nanos as i32,
    }
}

/// A wire attribute value; an AttributeValue with no value set is rejected.
pub fn value(field: &str, v: &proto::AttributeValue) -> Result<Value, Error> {
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
pub fn to_proto_value(v: &Value) -> proto::AttributeValue {
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
pub fn new_event(e: proto::Event) -> Result<NewEvent, Error> {
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
pub fn to_proto_event(e: &Event) -> proto::Event {
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
pub fn attribute_type(field: &str, raw: i32) -> Result<AttributeType, Error> {
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
pub fn to_proto_type(t: AttributeType) -> proto::AttributeType {
    match t {
        AttributeType::String => proto::AttributeType::String,
        AttributeType::Number => proto::AttributeType::Number,
        AttributeType::Date => proto::AttributeType::Date,
        AttributeType::Boolean => proto::AttributeType::Boolean,
        AttributeType::Json => proto::AttributeType::Json,
    }
}

/// An attribute definition on the wire.
pub fn to_proto_definition(d: &AttributeDefinition) -> proto::AttributeDefinition {
    proto::AttributeDefinition {
        name: d.name.clone(),
        r#type: to_proto_type(d.attribute_type) as i32,
        description: d.description.clone(),
        auto_created: d.auto_created,
        created_at: Some(to_proto_ts(d.created_at)),
    }
}

/// An event name's statistics on the wire.
pub fn to_proto_name_summary(name: &str, s: &EventNameStats) -> proto::EventNameSummary {
    proto::EventNameSummary {
        name: name.to_string(),
        count: s.count,
        first_seen: Some(to_proto_ts(s.first_seen)),
        last_seen: Some(to_proto_ts(s.last_seen)),
    }
}
