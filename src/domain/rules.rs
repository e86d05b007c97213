//! Every validation rule of the service, in one place: ids, names, limits on events and
//! batches, trigger fields, page sizes. Messages name the field at fault (the caller passes its
//! path) and the limit that was exceeded.

use crate::domain::model::{AttributeType, NewEvent, Timestamp, Value};
use crate::domain::{template, typing};
use crate::error::{invalid, Error};

/// Limits on events and batches (configurable by flags).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_attributes_per_event: usize,
    pub max_attribute_name_chars: usize,
    pub max_string_value_bytes: usize,
    pub max_json_value_bytes: usize,
    pub max_batch_events: usize,
    pub max_future_skew_secs: i64,
    /// The largest message accepted or sent: every stored thing must fit one answer.
    pub max_message_bytes: usize,
    /// Most conditions (nodes) in one trigger's condition, absence check or filter.
    pub max_condition_nodes: usize,
    /// Deepest nesting of all/any/not/where in one condition.
    pub max_condition_depth: usize,
    /// Most history conditions in one trigger or filter.
    pub max_history_conditions: usize,
    /// Most of a user's events one write group of DeleteUser erases (the rest in later ones).
    pub max_erase_events_per_group: usize,
    /// Most of a user's stored events one event's evaluation reads (its history conditions with
    /// a window or `where`, and its absence checks, together); an event that would need more is
    /// refused (RESOURCE_EXHAUSTED).
    pub max_history_events: usize,
    /// Most history reads one write group does: once reached, a TrackEvents batch goes on in
    /// the next group, so other writes go through between its slices.
    pub max_group_history_reads: usize,
}

impl Limits {
    /// The largest rendered payload: a quarter of a message, so an action with its event fits.
    pub(crate) fn max_payload_bytes(&self) -> usize {
        self.max_message_bytes / 4
    }

    /// The largest item one answer may hold, leaving room for the answer's other fields.
    pub(crate) fn max_item_bytes(&self) -> usize {
        self.max_message_bytes.saturating_sub(ANSWER_HEADROOM_BYTES)
    }
}

/// Bytes of a message kept free for the fields around its items (tokens, counts, framing).
const ANSWER_HEADROOM_BYTES: usize = 4096;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_attributes_per_event: 100,
            max_attribute_name_chars: 128,
            max_string_value_bytes: 8 * 1024,
            max_json_value_bytes: 64 * 1024,
            max_batch_events: 1000,
            max_future_skew_secs: 24 * 3600,
            max_message_bytes: 4 * 1024 * 1024,
            max_condition_nodes: 1000,
            max_condition_depth: 16,
            max_history_conditions: 50,
            max_erase_events_per_group: 10_000,
            max_history_events: 100_000,
            max_group_history_reads: 100_000,
        }
    }
}

/// Longest accepted client event id, in characters.
pub(crate) const MAX_EVENT_ID_CHARS: usize = 128;
/// Longest accepted user id, in bytes.
pub(crate) const MAX_USER_ID_BYTES: usize = 256;
/// Longest event name (and consumer name), in characters.
pub(crate) const MAX_EVENT_NAME_CHARS: usize = 128;
/// Longest attribute description, in characters.
pub(crate) const MAX_DESCRIPTION_CHARS: usize = 1024;
/// Longest trigger name, in characters.
pub(crate) const MAX_TRIGGER_NAME_CHARS: usize = 256;
/// Longest action type, in characters.
pub(crate) const MAX_ACTION_TYPE_CHARS: usize = 128;
/// Largest payload template, in bytes.
pub(crate) const MAX_TEMPLATE_BYTES: usize = 64 * 1024;
/// Largest page of any listing.
pub(crate) const MAX_PAGE_SIZE: usize = 1000;

/// A requested page size: `default` for 0, at most [`MAX_PAGE_SIZE`].
pub(crate) fn page_size(requested: u32, default: usize) -> usize {
    match requested {
        0 => default,
        n => (n as usize).min(MAX_PAGE_SIZE),
    }
}

/// Checks a user id: 1-256 bytes of UTF-8, no NUL.
pub(crate) fn check_user_id(field: &str, user_id: &str) -> Result<(), Error> {
    if user_id.is_empty() {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(invalid(format!(
            "{field}: {} bytes, at most {MAX_USER_ID_BYTES} allowed",
            user_id.len()
        )));
    }
    if user_id.contains('\0') {
        return Err(invalid(format!("{field}: must not contain NUL")));
    }
    Ok(())
}

/// Strips the `event.` prefix browser snippets write and checks the event-name rules:
/// 1-128 characters, letters, digits and `_ . : -`. `field` names the field in messages.
pub(crate) fn normalize_event_name(field: &str, raw: &str) -> Result<String, Error> {
    let name = raw.strip_prefix("event.").unwrap_or(raw);
    if name.starts_with("event.") {
        // Stored, it could never be named back: every name loses one `event.` on the way in.
        return Err(invalid(format!(
            "{field}: {raw:?} would be stored as {name:?}, which no request can name (event. is stripped once)"
        )));
    }
    let chars = name.chars().count();
    if chars == 0 {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    if chars > MAX_EVENT_NAME_CHARS {
        return Err(invalid(format!(
            "{field}: {chars} characters, at most {MAX_EVENT_NAME_CHARS} allowed"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(invalid(format!(
            "{field}: {name:?} contains {bad:?}; allowed are letters, digits and _ . : -"
        )));
    }
    Ok(name.to_string())
}

/// An optional event-name filter: empty stays empty (no filter), anything else is normalized.
pub(crate) fn optional_event_name(field: &str, raw: &str) -> Result<String, Error> {
    if raw.is_empty() {
        Ok(String::new())
    } else {
        normalize_event_name(field, raw)
    }
}

/// Checks the attribute-name rules: letters, digits and `_`, starting with a letter or `_`,
/// 1 to `max_chars` characters (so templates can write `event.attributes.NAME`). `field` names
/// the field in messages; it is only evaluated on failure (this runs per attribute on ingest).
pub(crate) fn check_attribute_name(
    field: impl Fn() -> String,
    name: &str,
    max_chars: usize,
) -> Result<(), Error> {
    let chars = name.chars().count();
    let problem = if chars == 0 {
        "attribute name must not be empty".to_string()
    } else if chars > max_chars {
        format!("attribute name is {chars} characters, limit is {max_chars} (max_attribute_name_chars)")
    } else if !name.starts_with(|c: char| c.is_alphabetic() || c == '_')
        || !name.chars().all(|c| c.is_alphanumeric() || c == '_')
    {
        format!("attribute name {name:?} must be letters, digits and _, starting with a letter or _")
    } else {
        return Ok(());
    };
    Err(invalid(format!("{}: {problem}", field())))
}

/// Checks the attribute of an aggregate that needs a NUMBER (SUM, MIN, MAX, AVG): a valid name
/// whose type, if defined, is NUMBER (an undefined one may still become one).
pub(crate) fn check_number_attribute(
    field: &str,
    aggregate: impl std::fmt::Display,
    attribute: &str,
    type_of: &dyn Fn(&str) -> Option<AttributeType>,
    max_attribute_name_chars: usize,
) -> Result<(), Error> {
    check_attribute_name(|| field.to_string(), attribute, max_attribute_name_chars)?;
    if let Some(t) = type_of(attribute).filter(|t| *t != AttributeType::Number) {
        return Err(invalid(format!(
            "{field}: {aggregate} needs a NUMBER attribute, {attribute:?} is {t}"
        )));
    }
    Ok(())
}

/// Checks a consumer name: the event-name rules (letters, digits, `_ . : -`, 1-128 characters),
/// without the `event.` prefix that event names may carry.
pub(crate) fn check_consumer(field: &str, name: &str) -> Result<(), Error> {
    if name.starts_with("event.") {
        return Err(invalid(format!("{field}: must not start with \"event.\"")));
    }
    normalize_event_name(field, name).map(|_| ())
}

/// Checks an attribute description's length.
pub(crate) fn check_description(field: &str, description: &str) -> Result<(), Error> {
    let chars = description.chars().count();
    if chars > MAX_DESCRIPTION_CHARS {
        return Err(invalid(format!(
            "{field}: {chars} characters, at most {MAX_DESCRIPTION_CHARS} allowed"
        )));
    }
    Ok(())
}

/// Checks a trigger's name (`f` is the trigger's field path).
pub(crate) fn check_trigger_name(f: &str, name: &str) -> Result<(), Error> {
    let name_chars = name.chars().count();
    if name_chars > MAX_TRIGGER_NAME_CHARS {
        return Err(invalid(format!(
            "{f}.name: {name_chars} characters, at most {MAX_TRIGGER_NAME_CHARS} allowed"
        )));
    }
    Ok(())
}

/// Checks a trigger's action type and payload template (`f` is the trigger's field path).
pub(crate) fn check_action(f: &str, action_type: &str, template_source: &str) -> Result<(), Error> {
    let type_chars = action_type.chars().count();
    if type_chars == 0 {
        return Err(invalid(format!("{f}.action.type: must not be empty")));
    }
    if type_chars > MAX_ACTION_TYPE_CHARS {
        return Err(invalid(format!(
            "{f}.action.type: {type_chars} characters, at most {MAX_ACTION_TYPE_CHARS} allowed"
        )));
    }
    if template_source.len() > MAX_TEMPLATE_BYTES {
        return Err(invalid(format!(
            "{f}.action.payload_template: {} bytes, at most {MAX_TEMPLATE_BYTES} allowed",
            template_source.len()
        )));
    }
    template::check(template_source).map_err(|e| invalid(format!("{f}.action.payload_template: {e}")))
}

/// An event that passed the stateless checks; attributes still need typing.
#[derive(Debug, Clone)]
pub(crate) struct PreparedEvent {
    pub(crate) event_id: Option<String>,
    pub(crate) user_id: String,
    pub(crate) name: String,
    pub(crate) occurred_at: Option<Timestamp>,
    pub(crate) attributes: Vec<(String, Value)>,
}

/// The stateless checks of one event: ids, name, time, attribute names, counts and sizes.
/// Field names in errors are relative to the event (`user_id`, `attributes["price"]`).
pub(crate) fn prepare(event: NewEvent, limits: &Limits, now: Timestamp) -> Result<PreparedEvent, Error> {
    let event_id = match event.event_id.chars().count() {
        0 => None,
        n if n > MAX_EVENT_ID_CHARS => {
            return Err(invalid(format!(
                "event_id: {n} characters, at most {MAX_EVENT_ID_CHARS} allowed"
            )))
        }
        _ => Some(event.event_id),
    };
    check_user_id("user_id", &event.user_id)?;
    let name = normalize_event_name("name", &event.name)?;
    if let Some(at) = event.occurred_at {
        let latest = now.plus_secs(limits.max_future_skew_secs);
        if at > latest {
            return Err(invalid(format!(
                "occurred_at: {at} is more than {}s in the future (max_future_skew)",
                limits.max_future_skew_secs
            )));
        }
    }
    let count = event.attributes.len();
    if count > limits.max_attributes_per_event {
        return Err(invalid(format!(
            "attributes: {count} attributes, limit is {} (max_attributes_per_event)",
            limits.max_attributes_per_event
        )));
    }
    for (attr, value) in &event.attributes {
        let field = || format!("attributes[{attr:?}]");
        check_attribute_name(field, attr, limits.max_attribute_name_chars)?;
        let (len, limit, limit_name) = match value {
            Value::Json(s) => (s.len(), limits.max_json_value_bytes, "max_json_value_bytes"),
            // A string may still become JSON; its final size is checked after typing.
            Value::String(s) => (
                s.len(),
                limits.max_json_value_bytes.max(limits.max_string_value_bytes),
                "max_json_value_bytes",
            ),
            _ => (0, usize::MAX, ""),
        };
        if len > limit {
            return Err(invalid(format!(
                "{}: value is {len} bytes, limit is {limit} ({limit_name})",
                field()
            )));
        }
    }
    Ok(PreparedEvent {
        event_id,
        user_id: event.user_id,
        name,
        occurred_at: event.occurred_at,
        attributes: event.attributes,
    })
}

/// Types an attribute value for storage: coerced to `ty`, then checked against the size limit
/// of its stored type. `name` is the attribute's name.
pub(crate) fn typed_value(
    limits: &Limits,
    name: &str,
    ty: AttributeType,
    value: &Value,
) -> Result<Value, Error> {
    let typed = typing::coerce(ty, value).map_err(|e| {
        invalid(format!(
            "attributes[{name:?}]: attribute {name:?} is {}, cannot coerce {}",
            e.expected, e.shown
        ))
    })?;
    let (len, limit, limit_name) = match &typed {
        Value::String(s) => (s.len(), limits.max_string_value_bytes, "max_string_value_bytes"),
        Value::Json(s) => (s.len(), limits.max_json_value_bytes, "max_json_value_bytes"),
        _ => return Ok(typed),
    };
    if len > limit {
        return Err(invalid(format!(
            "attributes[{name:?}]: value is {len} bytes, limit is {limit} ({limit_name})"
        )));
    }
    Ok(typed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            normalize_event_name("name", "event.product_purchased").unwrap(),
            "product_purchased"
        );
        assert!(normalize_event_name("name", "event.").is_err());
        assert!(normalize_event_name("name", "a b").is_err());
        assert!(normalize_event_name("name", &"x".repeat(129)).is_err());
        assert!(normalize_event_name("name", "event.event.x").is_err());
        assert_eq!(normalize_event_name("name", "event.event").unwrap(), "event");
        let field = || "a".to_string();
        assert!(check_attribute_name(field, "_price2", 128).is_ok());
        assert!(check_attribute_name(field, "2price", 128).is_err());
        assert!(check_attribute_name(field, "pri-ce", 128).is_err());
    }

    #[test]
    fn page_sizes_default_and_clamp() {
        assert_eq!(page_size(0, 50), 50);
        assert_eq!(page_size(7, 50), 7);
        assert_eq!(page_size(5000, 50), MAX_PAGE_SIZE);
    }
}
