//! The one error type of the service, and the one place that decides which
//! gRPC status each case becomes.

use streamer_api::errors::{Failure, Reason};
use streamer_core::ids::{ConnectionId, RequestId};
use streamer_core::store::{RequestStatus, StoreError};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// A field of the call is missing or out of range.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// No such request, or it belongs to someone else (the two are
    /// deliberately indistinguishable, so ids reveal nothing).
    #[error("request not found")]
    RequestNotFound,

    /// The connection named by the caller does not exist (or is another
    /// user's, for a resume).
    #[error("connection {:?} not found", .0.as_str())]
    ConnectionNotFound(ConnectionId),

    /// Nothing would ever run the action.
    #[error("no processor handles action {0:?}")]
    UnknownAction(String),

    /// The request already reached a final state.
    #[error("request {id} is already {status}: a request is completed at most once")]
    AlreadyFinished { id: RequestId, status: &'static str },

    /// The caller does not hold the request's lease.
    #[error("processor {processor_id:?} does not hold the lease of request {id}")]
    NotLeaseHolder { id: RequestId, processor_id: String },

    /// Conditional writes kept losing to other writers.
    #[error("{0} is being changed concurrently; retry")]
    Contended(String),

    /// The store failed.
    #[error("store unavailable: {0}")]
    Store(String),

    /// ConnectionService could not be reached or failed.
    #[error("connection service unavailable: {0}")]
    ConnectionService(String),

    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ProgressError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn already_finished(id: &RequestId, status: RequestStatus) -> Self {
        Self::AlreadyFinished {
            id: id.clone(),
            status: status_name(status),
        }
    }
}

/// The lowercase name of a status, for messages and the client protocol.
pub(crate) fn status_name(status: RequestStatus) -> &'static str {
    match status {
        RequestStatus::Pending => "queued",
        RequestStatus::Processing => "processing",
        RequestStatus::Completed => "completed",
        RequestStatus::Failed => "failed",
        RequestStatus::Cancelled => "cancelled",
    }
}

impl From<StoreError> for ProgressError {
    fn from(error: StoreError) -> Self {
        match error {
            // Callers retry conflicts themselves; one that escapes means the
            // retries ran out, which the caller may try again.
            StoreError::Conflict => Self::Contended("the request".to_owned()),
            other => Self::Store(other.to_string()),
        }
    }
}

impl From<ProgressError> for tonic::Status {
    fn from(error: ProgressError) -> Self {
        let message = error.to_string();
        let failure = match error {
            ProgressError::InvalidArgument { field, reason } => {
                Failure::invalid_argument(field, reason)
            }
            ProgressError::RequestNotFound => {
                Failure::new(Code::NotFound, Reason::RequestNotFound, message)
            }
            ProgressError::ConnectionNotFound(_) => {
                Failure::new(Code::NotFound, Reason::ConnectionNotFound, message)
            }
            ProgressError::UnknownAction(action) => {
                Failure::new(Code::FailedPrecondition, Reason::ActionNotHandled, message)
                    .with("action", action)
            }
            ProgressError::AlreadyFinished { id, status } => Failure::new(
                Code::FailedPrecondition,
                Reason::RequestAlreadyFinished,
                message,
            )
            .with("id", id.as_str())
            .with("status", status),
            ProgressError::NotLeaseHolder { id, .. } => {
                Failure::new(Code::FailedPrecondition, Reason::LeaseNotHeld, message)
                    .with("id", id.as_str())
            }
            ProgressError::Contended(_) => Failure::new(Code::Aborted, Reason::Contended, message),
            ProgressError::Store(_) => {
                Failure::new(Code::Unavailable, Reason::StoreUnavailable, message)
            }
            ProgressError::ConnectionService(_) => {
                Failure::new(Code::Unavailable, Reason::DependencyUnavailable, message)
            }
            ProgressError::ShuttingDown => {
                Failure::new(Code::Unavailable, Reason::ShuttingDown, message)
            }
        };
        failure.into()
    }
}
