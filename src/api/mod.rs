//! The gRPC layer: one file per service. Handlers convert and validate, call the domain and map
//! errors; they hold no business logic.

pub mod convert;
pub mod events;
pub mod pending;
pub mod schema;

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
