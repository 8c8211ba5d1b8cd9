//! Every way a ConnectionService call can fail, and the one place that
//! decides which gRPC status each becomes.

use streamer_core::ids::ConnectionId;
use streamer_core::store::StoreError;

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
        match error {
            ConnectionError::InvalidArgument { .. } => tonic::Status::invalid_argument(message),
            ConnectionError::NotFound(_) => tonic::Status::not_found(message),
            ConnectionError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            ConnectionError::EdgeProtocol(_) => tonic::Status::failed_precondition(message),
            ConnectionError::ShuttingDown | ConnectionError::Unavailable(_) => {
                tonic::Status::unavailable(message)
            }
            ConnectionError::Store(StoreError::Conflict) => tonic::Status::aborted(message),
            ConnectionError::Store(_) => tonic::Status::unavailable(message),
        }
    }
}
