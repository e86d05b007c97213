//! The Segment HTTP tracking API (SPEC §7): `/v1/track`, `/v1/page`, `/v1/screen`,
//! `/v1/identify`, `/v1/group`, `/v1/alias` and `/v1/batch`, so Segment and RudderStack SDKs send
//! events to engage by changing only their host and write key.
//!
//! Messages become the same `NewEvent`s a TrackEvents call makes, checked by the same
//! `rules::prepare` and stored by the same writer path and group commit: there is no second
//! ingest implementation. The answer is 200 only once the accepted messages are durable.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value as Json};

use crate::access::{Access, Caller, Limited};
use crate::api::caller_of;
use crate::domain::model::{NewEvent, Timestamp, Value};
use crate::domain::rules;
use crate::engine::Ingest;
use crate::error::Error;

/// What the endpoints need.
#[derive(Clone)]
pub(crate) struct SegmentApi {
    pub(crate) ingest: Ingest,
    pub(crate) access: Arc<Access>,
    pub(crate) max_body_bytes: usize,
}

/// The endpoints, as an axum router.
pub(crate) fn router(api: SegmentApi) -> axum::Router {
    use axum::routing::post;
    let route = |kind: &'static str| {
        let api = api.clone();
        post(move |request: http::Request<Body>| {
            let api = api.clone();
            async move { api.handle(kind, request).await }
        })
    };
    axum::Router::new()
        .route("/v1/track", route("track"))
        .route("/v1/page", route("page"))
        .route("/v1/screen", route("screen"))
        .route("/v1/identify", route("identify"))
        .route("/v1/group", route("group"))
        .route("/v1/alias", route("alias"))
        .route("/v1/batch", route("batch"))
}

/// A JSON answer.
pub(crate) fn answer(status: StatusCode, body: Json) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, json!({ "error": message.into() }))
}

impl SegmentApi {
    async fn handle(&self, kind: &'static str, request: http::Request<Body>) -> Response {
        let caller = caller_of(request.extensions().get::<Caller>());
        let (parts, body) = request.into_parts();
        let bytes = match self.read_body(&parts.headers, body).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let limits = self.ingest.limits();
        let messages = match parse(kind, &bytes, limits.max_batch_events) {
            Ok(m) => m,
            Err(Refusal::Shape(why)) => return error(StatusCode::BAD_REQUEST, why),
            Err(Refusal::TooMany) => {
                let limit = limits.max_batch_events;
                // Counted like check_batch_size's refusal (the rest of the batch is not read).
                crate::telemetry::rejected(crate::telemetry::Rejection::Limit, limit as u64 + 1);
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("batch: more than {limit} events, limit is {limit} (max_batch_events)"),
                );
            }
        };
        let now = Timestamp::now();
        // Positions kept: index i of the answer is message i of the batch.
        let mut stored = Vec::new();
        let mut rejected = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match m {
                Ok(m) => {
                    if let Some(e) = to_event(m) {
                        stored.push((i, e.and_then(|e| rules::prepare(e, limits, now))));
                    }
                }
                Err(why) => rejected.push(json!({ "index": i, "error": why })),
            }
        }
        if let Err(limited) = self.access.admit(&caller, "batch", stored.len()) {
            return refused(limited);
        }
        let (indexes, events): (Vec<usize>, Vec<_>) = stored.into_iter().unzip();
        let results = match self.ingest.track(events).await {
            Ok(r) => r,
            Err(e) => {
                let status = match e {
                    Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                return error(status, tonic::Status::from(e).message().to_string());
            }
        };
        // A message that failed for the storage, not for itself, fails the call: 503 (or 500),
        // which every SDK retries; the messages stored already answer "duplicate" by messageId.
        if let Some(e) = results.iter().find_map(|r| {
            r.as_ref()
                .err()
                .filter(|e| matches!(e, Error::Unavailable(_) | Error::Internal(_)))
        }) {
            let status = match e {
                Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            return error(status, tonic::Status::from(e.clone()).message().to_string());
        }
        for (i, r) in indexes.into_iter().zip(results) {
            if let Err(e) = r {
                let message = tonic::Status::from(e.within(&format!("batch[{i}]")))
                    .message()
                    .to_string();
                rejected.push(json!({ "index": i, "error": message }));
            }
        }
        rejected.sort_by_key(|r| r["index"].as_u64());
        if rejected.is_empty() {
            answer(StatusCode::OK, json!({ "success": true }))
        } else {
            answer(StatusCode::OK, json!({ "success": true, "rejected": rejected }))
        }
    }

    /// The body, gunzipped when it says so; 413 past `max_body_bytes` (compressed or not).
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Response> {
        let max = self.max_body_bytes;
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: larger than {max} bytes (max_message_bytes)"),
            )
        };
        let raw = http_body_util::Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    too_large()
                } else {
                    error(StatusCode::BAD_REQUEST, "body: could not be read")
                }
            })?
            .to_bytes();
        let encoding = headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .trim()
            .to_ascii_lowercase();
        match encoding.as_str() {
            "identity" | "" => Ok(raw.to_vec()),
            "gzip" | "x-gzip" => {
                let mut out = Vec::new();
                let mut decoder = flate2::read::GzDecoder::new(&raw[..]).take(max as u64 + 1);
                decoder
                    .read_to_end(&mut out)
                    .map_err(|_| error(StatusCode::BAD_REQUEST, "body: not valid gzip"))?;
                if out.len() > max {
                    return Err(too_large());
                }
                Ok(out)
            }
            other => Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content-encoding: {other:?} is not supported (gzip or none)"),
            )),
        }
    }
}

/// A rate-limit refusal as HTTP: 429 with `Retry-After` (whole seconds, at least 1), or 400
/// for a call larger than the burst.
fn refused(limited: Limited) -> Response {
    match limited {
        Limited::RetryAfter { wait, message } => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, message);
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
            r
        }
        Limited::TooLarge(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// One message: its type and its fields, or why it is not a message (rejected alone).
type Message = Result<(String, Map<String, Json>), String>;

/// The messages of a body: one for a single call, the `batch` of `/v1/batch` (each with its
/// `type`). A body that is not JSON of that shape, or a batch of more than `max` messages, is
/// the whole call's error; a batch is refused at its `max + 1`th message, before the rest is
/// built (a small gzip body of empty messages must not cost its inflated size many times over).
fn parse(kind: &str, bytes: &[u8], max: usize) -> Result<Vec<Message>, Refusal> {
    if kind != "batch" {
        let body: Json =
            serde_json::from_slice(bytes).map_err(|e| Refusal::Shape(format!("body: not JSON ({e})")))?;
        let Json::Object(body) = body else {
            return Err(Refusal::Shape("body: must be a JSON object".into()));
        };
        return Ok(vec![Ok((kind.to_string(), body))]);
    }
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let batch = serde::de::DeserializeSeed::deserialize(BatchBody { max, over: &over }, &mut de)
        .and_then(|b| de.end().map(|()| b));
    let batch = match batch {
        Ok(Some(b)) => b,
        Ok(None) => return Err(Refusal::Shape("batch: must be an array of messages".into())),
        Err(_) if over.get() => return Err(Refusal::TooMany),
        Err(e) if e.is_data() => return Err(Refusal::Shape(format!("body: not a batch ({e})"))),
        Err(e) => return Err(Refusal::Shape(format!("body: not JSON ({e})"))),
    };
    Ok(batch
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let Json::Object(m) = m else {
                return Err(format!("batch[{i}]: must be an object"));
            };
            match m.get("type") {
                Some(Json::String(t)) => Ok((t.to_ascii_lowercase(), m)),
                _ => Err(format!(
                    "batch[{i}].type: required (track, page, screen, identify, group or alias)"
                )),
            }
        })
        .collect())
}

/// Why a body is refused whole.
enum Refusal {
    /// Not JSON of the right shape (400).
    Shape(String),
    /// More messages than `max_batch_events` (400).
    TooMany,
}

/// `{"batch": [...], ...}`: the batch's elements, at most `max` of them (`over` says it was the
/// count that failed); other top-level fields (`sentAt`, `writeKey`, `context`) are skipped.
struct BatchBody<'a> {
    max: usize,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BatchBody<'_> {
    type Value = Option<Vec<Json>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BatchBody<'_> {
    type Value = Option<Vec<Json>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object with a batch array")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut batch = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "batch" && batch.is_none() {
                batch = Some(map.next_value_seed(Elements {
                    max: self.max,
                    over: self.over,
                })?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(batch)
    }
}

struct Elements<'a> {
    max: usize,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Elements<'_> {
    type Value = Vec<Json>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Elements<'_> {
    type Value = Vec<Json>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of messages")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(m) = seq.next_element::<Json>()? {
            if out.len() == self.max {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many messages"));
            }
            out.push(m);
        }
        Ok(out)
    }
}

/// An event or property name made valid the way SPEC §7 says, when it is not already: lower
/// case, each run of characters a name may not hold replaced by `_`, `_` trimmed at both ends.
fn normalized(raw: &str, allowed: impl Fn(char) -> bool) -> String {
    if !raw.is_empty() && raw.chars().all(&allowed) {
        return raw.to_string();
    }
    let mut out = String::with_capacity(raw.len());
    let mut in_run = false;
    for c in raw.to_lowercase().chars() {
        if allowed(c) {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('_');
            in_run = true;
        }
    }
    out.trim_matches('_').to_string()
}

fn event_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

fn attribute_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn text(m: &Map<String, Json>, field: &str) -> Option<String> {
    match m.get(field) {
        Some(Json::String(s)) if !s.is_empty() => Some(s.clone()),
        // Some SDKs send numeric ids.
        Some(Json::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The event a message stores (`None` for identify, group and alias: answered, not stored).
fn to_event((kind, m): &(String, Map<String, Json>)) -> Option<Result<NewEvent, Error>> {
    let invalid = |m: String| Some(Err(crate::error::invalid(m)));
    let name = match kind.as_str() {
        "track" => match m.get("event") {
            Some(Json::String(e)) => normalized(e, event_name_char),
            _ => return invalid("event: required for a track message".into()),
        },
        "page" => "page_viewed".to_string(),
        "screen" => "screen_viewed".to_string(),
        "identify" | "group" | "alias" => return None,
        other => {
            return invalid(format!(
                "type: {other:?} is not a message type (track, page, screen, identify, group or alias)"
            ))
        }
    };
    let Some(user_id) = text(m, "userId").or_else(|| text(m, "anonymousId")) else {
        return invalid("userId: required (or anonymousId)".into());
    };
    let occurred_at = match m.get("timestamp") {
        None | Some(Json::Null) => None,
        // ISO 8601 without an offset is read as UTC (what Segment does with it).
        Some(Json::String(t)) => {
            match Timestamp::parse(t).or_else(|| Timestamp::parse(&format!("{}Z", t.trim()))) {
                Some(ts) => Some(ts),
                None => return invalid(format!("timestamp: {t:?} is not an ISO 8601 time")),
            }
        }
        Some(_) => return invalid("timestamp: must be an ISO 8601 string".into()),
    };
    let mut attributes: Vec<(String, Value)> = Vec::new();
    match m.get("properties") {
        None | Some(Json::Null) => {}
        Some(Json::Object(props)) => {
            // Two properties that normalize to one name would silently lose one of them.
            let mut raw_names: std::collections::HashMap<String, &str> = Default::default();
            for (k, v) in props {
                let name = normalized(k, attribute_char);
                if let Some(first) = raw_names.insert(name.clone(), k) {
                    return invalid(format!(
                        "properties: {first:?} and {k:?} are both the attribute {name:?}"
                    ));
                }
                if let Some(value) = value(v) {
                    attributes.push((name, value));
                }
            }
        }
        Some(_) => return invalid("properties: must be an object".into()),
    }
    if kind != "track" {
        for field in ["name", "category"] {
            if let Some(Json::String(s)) = m.get(field) {
                attributes.retain(|(k, _)| k != field);
                attributes.push((field.to_string(), Value::String(s.clone())));
            }
        }
    }
    Some(Ok(NewEvent {
        event_id: text(m, "messageId").unwrap_or_default(),
        user_id,
        name,
        occurred_at,
        attributes,
    }))
}

/// A property as a value: strings, numbers and booleans as such, objects and arrays as JSON,
/// null skipped. An integer a double cannot hold exactly (an order id of 20 digits) keeps its
/// digits as text, which a NUMBER attribute still accepts.
fn value(v: &Json) -> Option<Value> {
    const EXACT: u64 = 1 << 53;
    match v {
        Json::Null => None,
        Json::String(s) => Some(Value::String(s.clone())),
        Json::Number(n) => {
            let exact = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u <= EXACT,
                (None, Some(i)) => i.unsigned_abs() <= EXACT,
                _ => true,
            };
            if exact {
                n.as_f64().map(Value::Number)
            } else {
                Some(Value::String(n.to_string()))
            }
        }
        Json::Bool(b) => Some(Value::Bool(*b)),
        other => Some(Value::Json(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_only_when_invalid() {
        assert_eq!(normalized("Order Completed", event_name_char), "order_completed");
        assert_eq!(normalized("Product ID", attribute_char), "product_id");
        assert_eq!(normalized("  --Weird!!name--  ", attribute_char), "weird_name");
        assert_eq!(
            normalized("checkout.started", event_name_char),
            "checkout.started"
        );
        assert_eq!(normalized("CamelCase", attribute_char), "CamelCase");
        assert_eq!(normalized("!!!", attribute_char), "");
    }
}
