//! The domain's error type: what went wrong in the user's terms. The one mapping to a gRPC status
//! lives in `api`; internal details are logged there and never sent to clients.

/// An error the service answers. Messages are lowercase, name the field or limit at fault, and
/// have no trailing punctuation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    /// A fault of the server (storage, a bug): logged in full, answered as a plain INTERNAL.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The same error with `prefix` (a field path such as `events[3]`) before its message (a
    /// message starting with `:` is about the whole of what `prefix` names).
    pub fn within(self, prefix: &str) -> Self {
        let join = |m: String| {
            if m.starts_with(['.', '[', ':']) {
                format!("{prefix}{m}")
            } else {
                format!("{prefix}.{m}")
            }
        };
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(join(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(join(m)),
            Error::NotFound(m) => Error::NotFound(join(m)),
            Error::OutOfRange(m) => Error::OutOfRange(join(m)),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(join(m)),
            other => other,
        }
    }
}

/// An INVALID_ARGUMENT error.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// An error with its causes, in one line (`outer: cause: root cause`).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
