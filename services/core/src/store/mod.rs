//! The store: where connection records, requests and revoked token ids live.
//!
//! Services see only the [`Store`] trait and the records below. Two backends
//! implement it: [`EmbeddedStore`] (the default, a redb file in the data
//! directory) and, for several replicas, DynamoDB. Every state change of a
//! request is a conditional write on its `version`, so two writers never both
//! win; a loser gets [`StoreError::Conflict`] and re-reads.

#[doc(hidden)]
pub mod conformance;
mod dynamodb;
mod embedded;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use dynamodb::{DynamoConfig, DynamoStore};
pub use embedded::EmbeddedStore;

/// How long a connection record lives after its last activity.
pub const CONNECTION_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a request is kept after its last change.
pub const REQUEST_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Milliseconds since the Unix epoch, the store's one clock unit.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The source of a [`StoreError`]: whatever the backend reported.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write lost: the record changed since it was read. The
    /// caller re-reads and decides again.
    #[error("conflicting update: the record changed since it was read")]
    Conflict,
    /// The backend could not answer now (throttled, timed out, unreachable)
    /// and the same call may succeed later: see [`StoreError::is_retryable`].
    #[error("store unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// Anything else: corrupt data, a refused request, a failed disk.
    #[error("store backend failed: {message}")]
    Backend {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl StoreError {
    pub fn backend(message: impl Into<String>) -> Self {
        Self::Backend {
            message: message.into(),
            source: None,
        }
    }

    /// A failure with the backend's own error kept as its source.
    pub fn backend_from(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub fn unavailable_from(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Whether the same call, unchanged, may succeed later (after a backoff).
    /// A [`StoreError::Conflict`] is not: the caller must re-read first.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A shared handle to whichever backend is configured.
pub type SharedStore = Arc<dyn Store>;

/// One open WebSocket connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub connection_id: String,
    pub user_id: String,
    pub tenant_id: String,
    pub permissions: Vec<String>,
    /// The edge process holding the socket.
    pub edge_id: String,
    pub connected_at_ms: u64,
    pub last_seen_ms: u64,
    pub user_agent: String,
    pub client_ip: String,
}

impl ConnectionRecord {
    /// The sliding expiry: [`CONNECTION_TTL`] after the last activity.
    pub fn expires_at_ms(&self) -> u64 {
        self.last_seen_ms + CONNECTION_TTL.as_millis() as u64
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms() <= now_ms
    }
}

/// Where a request is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RequestStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl RequestStatus {
    /// Completed, failed and cancelled requests never change again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// The latest progress a processor reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressState {
    pub percentage: f64,
    pub message: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub updated_at_ms: u64,
    pub sequence: u64,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestError {
    pub code: String,
    pub message: String,
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// A long-running request and everything known about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Server-assigned, globally unique.
    pub id: String,
    /// The client's id for it; unique per (tenant, user).
    pub client_request_id: String,
    pub user_id: String,
    pub tenant_id: String,
    /// The connection updates go to: the latest one of the user that asked.
    pub connection_id: String,
    pub action: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub status: RequestStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    pub processor_id: Option<String>,
    pub lease_expires_at_ms: Option<u64>,
    pub progress: Option<ProgressState>,
    pub result: Option<serde_json::Value>,
    pub error: Option<RequestError>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The sequence number of the last update given to the client.
    pub sequence: u64,
    /// Bumped by every write; the condition of every update.
    pub version: u64,
}

impl RequestRecord {
    pub fn expires_at_ms(&self) -> u64 {
        self.updated_at_ms + REQUEST_TTL.as_millis() as u64
    }
}

/// What [`Store::create_request`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub record: RequestRecord,
    /// True when a request with the same (tenant, user, client id) existed:
    /// `record` is that one, unchanged.
    pub duplicate: bool,
}

/// How much a write must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk before the call returns: state transitions.
    Immediate,
    /// May be lost in a crash (not in a clean shutdown, which calls
    /// [`Store::flush`]): progress ticks and connection activity, which are
    /// frequent and superseded by the next one.
    Relaxed,
}

/// The storage interface every backend implements.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks the backend is reachable (health turns SERVING on success).
    async fn ping(&self) -> StoreResult<()>;

    /// Makes every relaxed write durable. Called on shutdown.
    async fn flush(&self) -> StoreResult<()>;

    // ---- connections ----

    /// Inserts or replaces a connection record.
    async fn put_connection(&self, record: ConnectionRecord) -> StoreResult<()>;

    /// A live (unexpired) connection record.
    async fn get_connection(&self, connection_id: &str) -> StoreResult<Option<ConnectionRecord>>;

    /// Removes a record, returning it if it existed.
    async fn delete_connection(&self, connection_id: &str)
    -> StoreResult<Option<ConnectionRecord>>;

    /// Slides a connection's expiry; false when it does not exist.
    async fn touch_connection(&self, connection_id: &str, now_ms: u64) -> StoreResult<bool>;

    /// A tenant's live connections (or one user's), in connection-id order,
    /// starting after `after`.
    async fn list_connections(
        &self,
        tenant_id: &str,
        user_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnectionRecord>>;

    /// The ids of the connections an edge holds.
    async fn connections_of_edge(&self, edge_id: &str) -> StoreResult<Vec<String>>;

    /// The distinct edges that hold recorded connections.
    async fn connection_edges(&self) -> StoreResult<Vec<String>>;

    /// Deletes expired connection records; returns how many.
    async fn sweep_connections(&self, now_ms: u64) -> StoreResult<usize>;

    // ---- requests ----

    /// Inserts a new request unless its (tenant, user, client id) exists.
    async fn create_request(&self, record: RequestRecord) -> StoreResult<Created>;

    async fn get_request(&self, id: &str) -> StoreResult<Option<RequestRecord>>;

    /// Finds a request by the client's id within its user.
    async fn find_request(
        &self,
        tenant_id: &str,
        user_id: &str,
        client_request_id: &str,
    ) -> StoreResult<Option<RequestRecord>>;

    /// Writes `record` if the stored version is still `record.version`;
    /// returns it with the version bumped. [`StoreError::Conflict`] otherwise.
    async fn update_request(
        &self,
        record: RequestRecord,
        durability: Durability,
    ) -> StoreResult<RequestRecord>;

    /// Every request not yet final (PENDING or PROCESSING), for recovery at start.
    async fn unfinished_requests(&self) -> StoreResult<Vec<RequestRecord>>;

    // ---- revoked tokens ----

    /// Puts a token id (`jti`) on the deny-list until `expires_at_ms`,
    /// durably. Revoking an id again keeps the later of the two expiries,
    /// so a second call can never shorten a revocation.
    async fn revoke_token(&self, jti: &str, expires_at_ms: u64) -> StoreResult<()>;

    /// Whether `jti` is on the deny-list with an expiry after `now_ms`.
    async fn is_token_revoked(&self, jti: &str, now_ms: u64) -> StoreResult<bool>;

    /// Deletes deny-list entries that expired at or before `now_ms`; returns
    /// how many.
    async fn sweep_revoked_tokens(&self, now_ms: u64) -> StoreResult<usize>;
}
