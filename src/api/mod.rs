//! The gRPC layer: one file per service. Handlers convert and check, call the engine or a
//! read path, and map errors; they hold no business logic.

pub(crate) mod actions;
pub(crate) mod codec;
pub(crate) mod convert;
pub(crate) mod destinations;
pub(crate) mod events;
#[cfg(test)]
mod fuzz;
pub(crate) mod gate;
pub(crate) mod http;
pub(crate) mod query;
pub(crate) mod schema;
pub(crate) mod segment;
pub(crate) mod triggers;

use tonic::{Code, Status};

use crate::domain::bytes::{fnv1a, hex, unhex};
use crate::error::{invalid, Error};

/// Longest message a status carries, in bytes: messages quote input (ids, names), and a client
/// refuses metadata far smaller than the largest input.
const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`MAX_STATUS_MESSAGE_BYTES`] at a character boundary, marked with `…`.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let mut at = MAX_STATUS_MESSAGE_BYTES - '…'.len_utf8();
        while !message.is_char_boundary(at) {
            at -= 1;
        }
        message.truncate(at);
        message.push('…');
    }
    message
}

/// The one mapping from domain errors to gRPC statuses. Internal details are logged, never sent;
/// messages are bounded.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(bounded(m)),
            Error::FailedPrecondition(m) => Status::failed_precondition(bounded(m)),
            Error::NotFound(m) => Status::not_found(bounded(m)),
            Error::OutOfRange(m) => Status::out_of_range(bounded(m)),
            Error::ResourceExhausted(m) => Status::resource_exhausted(bounded(m)),
            Error::Unimplemented(m) => Status::unimplemented(bounded(m)),
            Error::Unavailable(m) => Status::unavailable(bounded(m)),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::new(Code::Internal, "internal error")
            }
        }
    }
}

/// The target of audit lines (under `engage`, so `RUST_LOG=engage=...` keeps them).
pub(crate) const AUDIT: &str = "engage::audit";

/// The caller the gate admitted (anonymous when the server has no keys), from a request's
/// extensions. A call that did not pass the gate (none does) is an unknown caller with the least
/// role, never an admin.
pub(crate) fn caller_of(admitted: Option<&crate::access::Caller>) -> crate::access::Caller {
    admitted.cloned().unwrap_or_else(|| crate::access::Caller {
        name: "unknown".into(),
        role: crate::access::Role::Ingest,
        peer: None,
    })
}

/// [`caller_of`] a gRPC request.
pub(crate) fn caller<T>(request: &tonic::Request<T>) -> crate::access::Caller {
    caller_of(request.extensions().get::<crate::access::Caller>())
}

/// A rate-limit refusal as a gRPC status (with `RetryInfo` when a wait will do).
pub(crate) fn limited_status(limited: crate::access::Limited) -> Status {
    match limited {
        crate::access::Limited::RetryAfter { wait, message } => {
            use tonic_types::StatusExt;
            Status::with_error_details(
                Code::ResourceExhausted,
                message,
                tonic_types::ErrorDetails::with_retry_info(Some(wait)),
            )
        }
        crate::access::Limited::TooLarge(message) => Status::invalid_argument(message),
    }
}

/// Refuses a call of more than `max_batch_events` events (counted as a limit); `field` names
/// the list (`events`, `batch`).
pub(crate) fn check_batch_size(
    field: &str,
    n: usize,
    limits: &crate::domain::rules::Limits,
) -> Result<(), Error> {
    let limit = limits.max_batch_events;
    if n <= limit {
        return Ok(());
    }
    crate::telemetry::rejected(crate::telemetry::Rejection::Limit, n as u64);
    Err(invalid(format!(
        "{field}: {n} events, limit is {limit} (max_batch_events)"
    )))
}

/// Logs one `audit` line: the key's name and role (when known), the peer, the method, what it
/// was about and the outcome (a gRPC code name).
pub(crate) fn audit_line(
    key: &str,
    role: Option<crate::access::Role>,
    peer: Option<std::net::SocketAddr>,
    method: &str,
    resource: &str,
    outcome: &str,
) {
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    let role = role.map_or("", crate::access::Role::as_str);
    tracing::info!(target: AUDIT, %key, %role, %peer, method, resource = %bounded(resource.to_string()), outcome, "audit");
}

/// The audit line of a call that changes configuration or erases data, from its result.
pub(crate) fn audit<T>(
    caller: &crate::access::Caller,
    method: &str,
    target: &str,
    result: &Result<T, Status>,
) {
    let outcome = match result {
        Ok(_) => "OK",
        Err(s) => crate::telemetry::code_name(s.code() as i32),
    };
    audit_line(
        &caller.name,
        Some(caller.role),
        caller.peer,
        method,
        target,
        outcome,
    );
}

/// Runs blocking storage reads off the async runtime.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::from(Error::Internal(format!("blocking task: {e}"))))?
        .map_err(Status::from)
}

/// How many of `items` (in order) one answer holds within `budget` bytes: each costs its
/// encoded size plus its field's tag and length. At least one, so a listing always moves (every
/// stored item is bounded to fit an answer alone).
pub(crate) fn fitting<T: prost::Message>(items: &[T], budget: usize) -> usize {
    let mut used = 0;
    for (i, item) in items.iter().enumerate() {
        let len = item.encoded_len();
        used += len + 1 + prost::length_delimiter_len(len);
        if used > budget && i > 0 {
            return i;
        }
    }
    items.len()
}

/// Opaque page tokens for listings keyed by a string: the position, bound to the listing's
/// `scope` (its filters) so that a token is refused by another listing.
pub(crate) struct PageToken;

impl PageToken {
    pub(crate) fn encode(position: &str, scope: &str) -> String {
        let mut bytes = Vec::with_capacity(position.len() + 9);
        bytes.push(1u8);
        bytes.extend_from_slice(&fnv1a(scope.as_bytes()).to_be_bytes());
        bytes.extend_from_slice(position.as_bytes());
        hex(&bytes)
    }

    pub(crate) fn decode(token: &str, scope: &str) -> Result<Option<String>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || invalid("page_token: not a token this request issued");
        let bytes = unhex(token).filter(|b| b.len() >= 9).ok_or_else(bad)?;
        let mut scope_hash = [0u8; 8];
        scope_hash.copy_from_slice(&bytes[1..9]);
        if bytes[0] != 1 || u64::from_be_bytes(scope_hash) != fnv1a(scope.as_bytes()) {
            return Err(bad());
        }
        String::from_utf8(bytes[9..].to_vec())
            .map(Some)
            .map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("short".into()), "short");
        let cut = bounded("é".repeat(1000));
        assert!(cut.len() <= MAX_STATUS_MESSAGE_BYTES);
        assert!(cut.ends_with('…'));
    }
}
