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
use crate::api::{caller_of, check_batch_size};
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
        let messages = match parse(kind, &bytes) {
            Ok(m) => m,
            Err(why) => return error(StatusCode::BAD_REQUEST, why),
        };
        if let Err(e) = check_batch_size("batch", messages.len(), self.ingest.limits()) {
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
        let now = Timestamp::now();
        // Positions kept: index i of the answer is message i of the batch.
        let mut stored = Vec::new();
        let mut rejected = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match to_event(m) {
                Ok(Some(e)) => stored.push((i, e.and_then(|e| rules::prepare(e, self.ingest.limits(), now)))),
                Ok(None) => {}
                Err(e) => stored.push((i, Err(e))),
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
        for (i, r) in indexes.into_iter().zip(results) {
            if let Err(e) = r {
                let message = tonic::Status::from(e.within(&format!("batch[{i}]")))
                    .message()
                    .to_string();
                rejected.push(json!({ "index": i, "error": message }));
            }
        }
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

/// The messages of a body: one for a single call, the `batch` of `/v1/batch` (each with its
/// `type`). A body that is not JSON of that shape is the whole call's error.
/// One message: its type and its fields.
type Message = (String, Map<String, Json>);

fn parse(kind: &str, bytes: &[u8]) -> Result<Vec<Message>, String> {
    let body: Json = serde_json::from_slice(bytes).map_err(|e| format!("body: not JSON ({e})"))?;
    let Json::Object(mut body) = body else {
        return Err("body: must be a JSON object".into());
    };
    if kind != "batch" {
        return Ok(vec![(kind.to_string(), body)]);
    }
    let Some(Json::Array(batch)) = body.remove("batch") else {
        return Err("batch: must be an array of messages".into());
    };
    let mut out = Vec::with_capacity(batch.len());
    for (i, m) in batch.into_iter().enumerate() {
        let Json::Object(m) = m else {
            return Err(format!("batch[{i}]: must be an object"));
        };
        let kind = match m.get("type") {
            Some(Json::String(t)) => t.to_ascii_lowercase(),
            _ => {
                return Err(format!(
                    "batch[{i}].type: required (track, page, screen, identify, group or alias)"
                ))
            }
        };
        out.push((kind, m));
    }
    Ok(out)
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
fn to_event((kind, m): &Message) -> Result<Option<Result<NewEvent, Error>>, Error> {
    let name = match kind.as_str() {
        "track" => match m.get("event") {
            Some(Json::String(e)) => normalized(e, event_name_char),
            _ => {
                return Ok(Some(Err(crate::error::invalid(
                    "event: required for a track message",
                ))))
            }
        },
        "page" => "page_viewed".to_string(),
        "screen" => "screen_viewed".to_string(),
        "identify" | "group" | "alias" => return Ok(None),
        other => {
            return Ok(Some(Err(crate::error::invalid(format!(
                "type: {other:?} is not a message type (track, page, screen, identify, group or alias)"
            )))))
        }
    };
    let Some(user_id) = text(m, "userId").or_else(|| text(m, "anonymousId")) else {
        return Ok(Some(Err(crate::error::invalid(
            "userId: required (or anonymousId)",
        ))));
    };
    let occurred_at = match m.get("timestamp") {
        None | Some(Json::Null) => None,
        Some(Json::String(t)) => match Timestamp::parse(t) {
            Some(ts) => Some(ts),
            None => {
                return Ok(Some(Err(crate::error::invalid(format!(
                    "timestamp: {t:?} is not an ISO 8601 time"
                )))))
            }
        },
        Some(_) => {
            return Ok(Some(Err(crate::error::invalid(
                "timestamp: must be an ISO 8601 string",
            ))))
        }
    };
    let mut attributes = Vec::new();
    if let Some(props) = m.get("properties") {
        let Json::Object(props) = props else {
            return Ok(Some(Err(crate::error::invalid("properties: must be an object"))));
        };
        for (k, v) in props {
            if let Some(value) = value(v) {
                attributes.push((normalized(k, attribute_char), value));
            }
        }
    }
    if kind != "track" {
        for field in ["name", "category"] {
            if let Some(Json::String(s)) = m.get(field) {
                attributes.retain(|(k, _)| k != field);
                attributes.push((field.to_string(), Value::String(s.clone())));
            }
        }
    }
    Ok(Some(Ok(NewEvent {
        event_id: text(m, "messageId").unwrap_or_default(),
        user_id,
        name,
        occurred_at,
        attributes,
    })))
}

/// A property as a value: strings, numbers and booleans as such, objects and arrays as JSON,
/// null skipped.
fn value(v: &Json) -> Option<Value> {
    match v {
        Json::Null => None,
        Json::String(s) => Some(Value::String(s.clone())),
        Json::Number(n) => n.as_f64().map(Value::Number),
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
