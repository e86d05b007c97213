//! The gRPC layer: one file per service. Handlers convert and validate, call the domain and map
//! errors; they hold no business logic.

pub mod actions;
pub mod convert;
pub mod events;
pub mod query;
pub mod schema;
pub mod triggers;

use tonic::{Code, Status};

use crate::error::Error;

/// The one mapping from domain errors to gRPC statuses. Internal details are logged, never sent.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::OutOfRange(m) => Status::out_of_range(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Unimplemented(m) => Status::unimplemented(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::new(Code::Internal, "internal error")
            }
        }
    }
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

/// A requested page size: `default` for 0, at most 1000.
pub(crate) fn page_size(requested: u32, default: usize) -> usize {
    match requested {
        0 => default,
        n => (n as usize).min(1000),
    }
}

/// Opaque page tokens for listings keyed by a string: the position, bound to the listing's
/// `scope` (its filters) so that a token is refused by another listing.
pub(crate) struct PageToken;

impl PageToken {
    pub(crate) fn encode(position: &str, scope: &str) -> String {
        let mut bytes = Vec::with_capacity(position.len() + 9);
        bytes.push(1u8);
        bytes.extend_from_slice(&fnv(scope).to_be_bytes());
        bytes.extend_from_slice(position.as_bytes());
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn decode(token: &str, scope: &str) -> Result<Option<String>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || crate::error::invalid("page_token: not a token this request issued");
        if !token.len().is_multiple_of(2) || token.len() < 18 {
            return Err(bad());
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(token.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>, Error>>()?;
        let mut scope_hash = [0u8; 8];
        scope_hash.copy_from_slice(&bytes[1..9]);
        if bytes[0] != 1 || u64::from_be_bytes(scope_hash) != fnv(scope) {
            return Err(bad());
        }
        String::from_utf8(bytes[9..].to_vec())
            .map(Some)
            .map_err(|_| bad())
    }
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
