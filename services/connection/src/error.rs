//! Every way a ConnectionService call can fail, and the one place that
//! decides which gRPC status each becomes.

use streamer_api::errors::{Failure, Reason};
use streamer_core::ids::ConnectionId;
use streamer_core::store::StoreError;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("connection {:?} not found", .0.as_str())]
    NotFound(ConnectionId),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("edge stream protocol violation: {0}")]
    EdgeProtocol(String),
    #[error("service is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ConnectionError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<ConnectionError> for tonic::Status {
    fn from(error: ConnectionError) -> Self {
        let message = error.to_string();
        let failure = match error {
            ConnectionError::InvalidArgument { field, reason } => {
                Failure::invalid_argument(field, reason)
            }
            ConnectionError::NotFound(_) => {
                Failure::new(Code::NotFound, Reason::ConnectionNotFound, message)
            }
            ConnectionError::PermissionDenied(_) => {
                Failure::new(Code::PermissionDenied, Reason::ScopeNotAllowed, message)
            }
            ConnectionError::EdgeProtocol(_) => Failure::new(
                Code::FailedPrecondition,
                Reason::EdgeProtocolViolation,
                message,
            ),
            ConnectionError::ShuttingDown => {
                Failure::new(Code::Unavailable, Reason::ShuttingDown, message)
            }
            ConnectionError::Unavailable(_) => {
                Failure::new(Code::Unavailable, Reason::DependencyUnavailable, message)
            }
            ConnectionError::Store(StoreError::Conflict) => {
                Failure::new(Code::Aborted, Reason::Contended, message)
            }
            ConnectionError::Store(_) => {
                Failure::new(Code::Unavailable, Reason::StoreUnavailable, message)
            }
        };
        failure.into()
    }
}
