//! The store: where connections, edge leases, requests, subscriptions, topic
//! history and revoked token ids live.
//!
//! Services see only the [`Store`] traits (one per concern, [`Store`] being
//! all of them) and the records below. Two backends
//! implement it: [`EmbeddedStore`] (the default, a redb file in the data
//! directory) and, for several replicas, DynamoDB. Every state change of a
//! request is a conditional write on its `version`, so two writers never both
//! win; a loser gets [`StoreError::Conflict`] and re-reads. A process wraps
//! its backend in [`Instrumented`], which times every operation.

#[doc(hidden)]
pub mod conformance;
mod dynamodb;
mod embedded;
mod instrumented;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ids::{ClientRequestId, ConnectionId, EdgeId, RequestId, TenantId, UserId};

pub use dynamodb::{DynamoConfig, DynamoStore};
pub use embedded::EmbeddedStore;
pub use instrumented::Instrumented;

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

/// A new topic epoch: unique, so positions of a lost history never match.
fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
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
    pub connection_id: ConnectionId,
    pub user_id: UserId,
    pub tenant_id: TenantId,
    pub permissions: Vec<String>,
    /// The token's `topics` claim: patterns of the topics the client may
    /// subscribe itself to (see [`crate::topics`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// The edge process holding the socket; [`APIGATEWAY_EDGE_ID`] when AWS
    /// API Gateway holds it.
    pub edge_id: EdgeId,
    pub connected_at_ms: u64,
    pub last_seen_ms: u64,
    pub user_agent: String,
    pub client_ip: String,
    /// Where API Gateway holds the socket, for a connection made through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apigateway: Option<ApiGatewayConnection>,
}

/// The edge id of every connection AWS API Gateway holds. No process holds
/// a lease under it: such a connection ends with API Gateway's
/// `$disconnect`, a 410 from its management API, or its record's expiry,
/// never because a process went away.
pub const APIGATEWAY_EDGE_ID: &str = "apigateway";

/// Where a connection lives in API Gateway: the domain and stage of its
/// WebSocket API (its management endpoint is made from them) and API
/// Gateway's own id of it (the record's `connection_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiGatewayConnection {
    pub domain_name: String,
    pub stage: String,
}

impl ConnectionRecord {
    /// Whether AWS API Gateway holds the socket.
    pub fn is_apigateway(&self) -> bool {
        self.edge_id.as_str() == APIGATEWAY_EDGE_ID
    }

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
    pub id: RequestId,
    /// The client's id for it; unique per (tenant, user).
    pub client_request_id: ClientRequestId,
    pub user_id: UserId,
    pub tenant_id: TenantId,
    /// The connection updates go to: the latest one of the user that asked.
    pub connection_id: ConnectionId,
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
    /// Finished, and its final message not yet known to have reached the
    /// client (or known to be undeliverable): the request stays among the
    /// unfinished ones, and `lease_expires_at_ms` is the delivery's lease,
    /// so that a replica that dies before delivering it leaves it to another.
    #[serde(default)]
    pub final_pending: bool,
    /// The W3C Trace Context it was accepted in (empty when tracing was
    /// off): what its later work continues.
    #[serde(default, skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub trace_context: crate::trace::TraceContext,
    /// Bumped by every write; the condition of every update.
    pub version: u64,
}

impl RequestRecord {
    pub fn expires_at_ms(&self) -> u64 {
        self.updated_at_ms + REQUEST_TTL.as_millis() as u64
    }

    /// Not settled yet: still to be done, or its final message still to be
    /// delivered. What [`RequestStore::unfinished_requests`] returns.
    pub fn is_unsettled(&self) -> bool {
        !self.status.is_final() || self.final_pending
    }

    /// The lease someone holds on it (a processor's on its work, or a
    /// replica's on delivering its final message), if any: what
    /// [`RequestStore::lapsed_leases`] looks at.
    pub fn held_until_ms(&self) -> Option<u64> {
        let held = self.status == RequestStatus::Processing || self.final_pending;
        self.lease_expires_at_ms.filter(|_| held)
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

/// An edge process's liveness lease: it holds its sockets only while
/// `lease_expires_at_ms` is in the future. Heartbeats push it out; an edge
/// whose lease lapsed is dead, and whoever removes its record (exactly one
/// caller wins) removes its connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeRecord {
    pub edge_id: EdgeId,
    /// When this lease began: the first heartbeat after the edge started or
    /// after its previous lease lapsed.
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    pub lease_expires_at_ms: u64,
}

/// What [`EdgeStore::heartbeat_edge`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// The lease was held and is now extended.
    Extended,
    /// There was no live lease (first heartbeat, or the lease lapsed): a new
    /// one began. Connections announced under the old one may be gone.
    Started,
}

/// A connection's subscription to a topic of its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub tenant_id: TenantId,
    pub topic: String,
    pub connection_id: ConnectionId,
    pub user_id: UserId,
    pub subscribed_at_ms: u64,
}

/// Where a topic's history stands: the `offset` of its latest message
/// (0 before the first) within an `epoch` that changes whenever the history
/// was lost, so a position from an older epoch is never taken for a current
/// one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPosition {
    pub epoch: String,
    pub offset: u64,
}

/// One message of a topic's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicMessage {
    pub offset: u64,
    pub payload: serde_json::Value,
    pub published_at_ms: u64,
}

/// How much of each topic's history is kept: the last `max_messages`, none
/// older than `max_age`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_messages: u64,
    pub max_age: Duration,
}

impl Retention {
    /// The oldest offset still kept when the latest is `latest`, by count.
    pub fn oldest_kept(&self, latest: u64) -> u64 {
        latest
            .saturating_sub(self.max_messages.saturating_sub(1))
            .max(1)
    }

    /// Whether a message published at `published_at_ms` is still kept.
    pub fn keeps(&self, published_at_ms: u64, now_ms: u64) -> bool {
        published_at_ms + self.max_age.as_millis() as u64 > now_ms
    }
}

/// What [`TopicStore::topic_since`] found after a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// Where the topic stands now.
    pub position: TopicPosition,
    /// Every kept message after the asked position, in offset order.
    pub messages: Vec<TopicMessage>,
    /// True when `messages` is everything published after the asked
    /// position: same epoch, and nothing in between was dropped by the
    /// retention. False: the client missed messages that are gone.
    pub recovered: bool,
}

impl Recovery {
    /// The one rule both backends apply: `read` is what the backend found
    /// after `since.offset` in `position`'s epoch (in offset order, perhaps
    /// with messages the retention no longer keeps but nobody removed yet).
    pub fn of(
        position: TopicPosition,
        since: &TopicPosition,
        read: Vec<TopicMessage>,
        retention: Retention,
        now_ms: u64,
    ) -> Self {
        if since.epoch != position.epoch || since.offset > position.offset {
            // Offsets of another epoch mean nothing here.
            return Self {
                position,
                messages: Vec::new(),
                recovered: false,
            };
        }
        let oldest = retention.oldest_kept(position.offset);
        let messages: Vec<TopicMessage> = read
            .into_iter()
            .filter(|m| {
                m.offset > since.offset
                    && m.offset >= oldest
                    && retention.keeps(m.published_at_ms, now_ms)
            })
            .collect();
        let recovered = match messages.first() {
            Some(first) => first.offset == since.offset + 1,
            None => since.offset == position.offset,
        };
        Self {
            position,
            messages,
            recovered,
        }
    }
}

/// Checks the backend is reachable and makes relaxed writes durable.
#[async_trait::async_trait]
pub trait Store:
    ConnectionStore + EdgeStore + RequestStore + SubscriptionStore + TopicStore + TokenStore
{
    /// Checks the backend is reachable (health turns SERVING on success).
    async fn ping(&self) -> StoreResult<()>;

    /// Makes every relaxed write durable. Called on shutdown.
    async fn flush(&self) -> StoreResult<()>;
}

/// Open WebSocket connections: who holds which socket on which edge.
#[async_trait::async_trait]
pub trait ConnectionStore: Send + Sync + 'static {
    /// Inserts or replaces a connection record (its subscriptions stay).
    async fn put_connection(&self, record: ConnectionRecord) -> StoreResult<()>;

    /// A live (unexpired) connection record.
    async fn get_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>>;

    /// Removes a record and its subscriptions, returning it if it existed.
    async fn delete_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>>;

    /// Slides a connection's expiry; false when it does not exist.
    async fn touch_connection(
        &self,
        connection_id: &ConnectionId,
        now_ms: u64,
    ) -> StoreResult<bool>;

    /// A tenant's live connections (or one user's), in connection-id order,
    /// starting after `after`.
    async fn list_connections(
        &self,
        tenant_id: &TenantId,
        user_id: Option<&UserId>,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<ConnectionRecord>>;

    /// The ids of the connections an edge holds.
    async fn connections_of_edge(&self, edge_id: &EdgeId) -> StoreResult<Vec<ConnectionId>>;

    /// The distinct edges that hold recorded connections (at start only: on
    /// DynamoDB this reads a whole index).
    async fn connection_edges(&self) -> StoreResult<Vec<EdgeId>>;

    /// Deletes expired connection records and their subscriptions; returns
    /// how many connections.
    async fn sweep_connections(&self, now_ms: u64) -> StoreResult<usize>;
}

/// Edge liveness leases.
#[async_trait::async_trait]
pub trait EdgeStore: Send + Sync + 'static {
    /// Holds `edge_id`'s lease until `now_ms + lease`: extends a live lease,
    /// or starts a new one when there is none (never shortens one).
    async fn heartbeat_edge(
        &self,
        edge_id: &EdgeId,
        now_ms: u64,
        lease: Duration,
    ) -> StoreResult<Heartbeat>;

    /// The edge's lease record, lapsed or not.
    async fn get_edge(&self, edge_id: &EdgeId) -> StoreResult<Option<EdgeRecord>>;

    /// Edges whose lease lapsed at or before `now_ms`, the longest-lapsed
    /// first, at most `limit`.
    async fn lapsed_edges(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<EdgeRecord>>;

    /// Removes an edge's record if its lease is still the lapsed one that was
    /// read (`lease_expires_at_ms`): of several callers racing to clean up a
    /// dead edge exactly one gets true, and an edge that came back in the
    /// meantime keeps its record.
    async fn remove_edge(&self, edge_id: &EdgeId, lease_expires_at_ms: u64) -> StoreResult<bool>;

    /// Removes an edge's record whatever its lease (a clean shutdown).
    async fn release_edge(&self, edge_id: &EdgeId) -> StoreResult<()>;
}

/// Long-running requests and their leases.
#[async_trait::async_trait]
pub trait RequestStore: Send + Sync + 'static {
    /// Inserts a new request unless its (tenant, user, client id) exists.
    async fn create_request(&self, record: RequestRecord) -> StoreResult<Created>;

    async fn get_request(&self, id: &RequestId) -> StoreResult<Option<RequestRecord>>;

    /// Finds a request by the client's id within its user.
    async fn find_request(
        &self,
        tenant_id: &TenantId,
        user_id: &UserId,
        client_request_id: &ClientRequestId,
    ) -> StoreResult<Option<RequestRecord>>;

    /// Writes `record` if the stored version is still `record.version`;
    /// returns it with the version bumped. [`StoreError::Conflict`] otherwise.
    /// This is how work is claimed: of processors racing to move one PENDING
    /// version to PROCESSING, exactly one wins.
    async fn update_request(
        &self,
        record: RequestRecord,
        durability: Durability,
    ) -> StoreResult<RequestRecord>;

    /// Every unsettled request ([`RequestRecord::is_unsettled`]: PENDING,
    /// PROCESSING, or final with its final message pending), for recovery
    /// at start.
    async fn unfinished_requests(&self) -> StoreResult<Vec<RequestRecord>>;

    /// PENDING requests for `action`, the oldest first, at most `limit`.
    async fn pending_requests(&self, action: &str, limit: usize)
    -> StoreResult<Vec<RequestRecord>>;

    /// Requests whose lease ([`RequestRecord::held_until_ms`]: a
    /// processor's, or a final message's delivery) ended at or before
    /// `now_ms`, the longest-lapsed first, at most `limit`.
    async fn lapsed_leases(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<RequestRecord>>;
}

/// Which connections listen to which topics of their tenant.
#[async_trait::async_trait]
pub trait SubscriptionStore: Send + Sync + 'static {
    /// Subscribes a live connection of `subscription.tenant_id` (again: no
    /// change); false when there is no such live connection in that tenant.
    async fn subscribe(&self, subscription: Subscription) -> StoreResult<bool>;

    /// Whether the subscription existed.
    async fn unsubscribe(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        connection_id: &ConnectionId,
    ) -> StoreResult<bool>;

    /// A topic's subscriptions in connection-id order, after `after`.
    async fn subscribers(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<Subscription>>;

    /// A connection's subscriptions in topic order.
    async fn subscriptions_of(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Vec<Subscription>>;
}

/// Each topic's recent history, for clients that reconnect.
#[async_trait::async_trait]
pub trait TopicStore: Send + Sync + 'static {
    /// Appends a message at the next offset (offsets are contiguous; of
    /// concurrent appends each gets its own) and drops what `retention` no
    /// longer keeps; returns the message's position.
    async fn append_topic(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        payload: serde_json::Value,
        now_ms: u64,
        retention: Retention,
    ) -> StoreResult<TopicPosition>;

    /// Where the topic stands (a topic never published to gets its epoch
    /// now, at offset 0).
    async fn topic_position(&self, tenant_id: &TenantId, topic: &str)
    -> StoreResult<TopicPosition>;

    /// The kept messages after `since`, and whether they are all that was
    /// published after it ([`Recovery::of`]).
    async fn topic_since(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        since: &TopicPosition,
        now_ms: u64,
        retention: Retention,
    ) -> StoreResult<Recovery>;
}

/// The deny-list of revoked token ids.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids are types in the process and plain strings in the store: a
    /// record encodes as it always did, and a record written before the
    /// types existed reads back.
    #[test]
    fn records_encode_ids_as_plain_strings() {
        let connection = r#"{"connection_id":"c1","user_id":"alice","tenant_id":"acme","permissions":["read"],"edge_id":"edge-1","connected_at_ms":1,"last_seen_ms":2,"user_agent":"ua","client_ip":"127.0.0.1"}"#;
        let record: ConnectionRecord = serde_json::from_str(connection).unwrap();
        assert_eq!(record.connection_id, "c1");
        assert_eq!(record.edge_id, "edge-1");
        assert_eq!(serde_json::to_string(&record).unwrap(), connection);

        let request = r#"{"id":"r1","client_request_id":"job-1","user_id":"alice","tenant_id":"acme","connection_id":"c1","action":"report","payload":null,"metadata":{},"status":"Pending","attempts":0,"max_attempts":3,"processor_id":null,"lease_expires_at_ms":null,"progress":null,"result":null,"error":null,"created_at_ms":1,"updated_at_ms":1,"sequence":0,"final_pending":false,"version":0}"#;
        let record: RequestRecord = serde_json::from_str(request).unwrap();
        assert_eq!(
            (record.id.as_str(), record.client_request_id.as_str()),
            ("r1", "job-1")
        );
        assert_eq!(serde_json::to_string(&record).unwrap(), request);

        let edge =
            r#"{"edge_id":"edge-1","started_at_ms":1,"heartbeat_at_ms":2,"lease_expires_at_ms":3}"#;
        let record: EdgeRecord = serde_json::from_str(edge).unwrap();
        assert_eq!(serde_json::to_string(&record).unwrap(), edge);

        let subscription = r#"{"tenant_id":"acme","topic":"news","connection_id":"c1","user_id":"alice","subscribed_at_ms":1}"#;
        let record: Subscription = serde_json::from_str(subscription).unwrap();
        assert_eq!(serde_json::to_string(&record).unwrap(), subscription);
    }
}
