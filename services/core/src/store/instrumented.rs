//! A store that measures every operation of the store it wraps:
//! `streamer_store_operation_duration_seconds{backend,operation}` and
//! `streamer_store_errors_total{backend,operation}`, the operation being the
//! trait method's name. A [`StoreError::Conflict`] is a conditional write
//! that lost, an answer the caller acts on, so it is not counted as an error.
//!
//! Wrapping in one place measures both backends the same way, and each
//! backend stays free of metrics.

use std::time::{Duration, Instant};

use super::{
    ConnectionRecord, ConnectionStore, Created, Durability, EdgeRecord, EdgeStore, Heartbeat,
    Recovery, RequestRecord, RequestStore, Retention, Store, StoreError, StoreResult, Subscription,
    SubscriptionStore, TokenStore, TopicPosition, TopicStore,
};
use crate::ids::{ClientRequestId, ConnectionId, EdgeId, RequestId, TenantId, UserId};
use crate::metrics::{family_named, touch};

const DURATION: &str = "streamer_store_operation_duration_seconds";
const ERRORS: &str = "streamer_store_errors_total";

/// Every operation of the store traits, as its label.
pub const OPERATIONS: &[&str] = &[
    "ping",
    "flush",
    "put_connection",
    "get_connection",
    "delete_connection",
    "touch_connection",
    "list_connections",
    "connections_of_edge",
    "connection_edges",
    "sweep_connections",
    "heartbeat_edge",
    "get_edge",
    "lapsed_edges",
    "remove_edge",
    "release_edge",
    "create_request",
    "get_request",
    "find_request",
    "update_request",
    "unfinished_requests",
    "pending_requests",
    "lapsed_leases",
    "subscribe",
    "unsubscribe",
    "subscribers",
    "subscriptions_of",
    "append_topic",
    "topic_position",
    "topic_since",
    "revoke_token",
    "is_token_revoked",
    "sweep_revoked_tokens",
];

/// `inner`, measured under `backend` (`embedded`, `dynamodb`).
pub struct Instrumented<S> {
    inner: S,
    backend: &'static str,
}

impl<S: Store> Instrumented<S> {
    /// Wraps `inner` and creates its series at 0.
    pub fn new(inner: S, backend: &'static str) -> Self {
        if let (Some(duration), Some(errors)) = (family_named(DURATION), family_named(ERRORS)) {
            for operation in OPERATIONS {
                let labels = || {
                    vec![
                        metrics::Label::new("backend", backend),
                        metrics::Label::new("operation", *operation),
                    ]
                };
                touch(duration, labels());
                touch(errors, labels());
            }
        }
        Self { inner, backend }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn record<T>(&self, operation: &'static str, took: Duration, result: &StoreResult<T>) {
        metrics::histogram!(DURATION, "backend" => self.backend, "operation" => operation)
            .record(took.as_secs_f64());
        if matches!(
            result,
            Err(StoreError::Unavailable { .. } | StoreError::Backend { .. })
        ) {
            metrics::counter!(ERRORS, "backend" => self.backend, "operation" => operation)
                .increment(1);
        }
    }
}

/// Runs one operation of the wrapped store, measured.
macro_rules! measured {
    ($self:ident, $operation:ident ( $($arg:expr),* )) => {{
        let started = Instant::now();
        let result = $self.inner.$operation($($arg),*).await;
        $self.record(stringify!($operation), started.elapsed(), &result);
        result
    }};
}

#[async_trait::async_trait]
impl<S: Store> Store for Instrumented<S> {
    async fn ping(&self) -> StoreResult<()> {
        measured!(self, ping())
    }

    async fn flush(&self) -> StoreResult<()> {
        measured!(self, flush())
    }
}

#[async_trait::async_trait]
impl<S: Store> ConnectionStore for Instrumented<S> {
    async fn put_connection(&self, record: ConnectionRecord) -> StoreResult<()> {
        measured!(self, put_connection(record))
    }

    async fn get_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>> {
        measured!(self, get_connection(connection_id))
    }

    async fn delete_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>> {
        measured!(self, delete_connection(connection_id))
    }

    async fn touch_connection(
        &self,
        connection_id: &ConnectionId,
        now_ms: u64,
    ) -> StoreResult<bool> {
        measured!(self, touch_connection(connection_id, now_ms))
    }

    async fn list_connections(
        &self,
        tenant_id: &TenantId,
        user_id: Option<&UserId>,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        measured!(self, list_connections(tenant_id, user_id, after, limit))
    }

    async fn connections_of_edge(&self, edge_id: &EdgeId) -> StoreResult<Vec<ConnectionId>> {
        measured!(self, connections_of_edge(edge_id))
    }

    async fn connection_edges(&self) -> StoreResult<Vec<EdgeId>> {
        measured!(self, connection_edges())
    }

    async fn sweep_connections(&self, now_ms: u64) -> StoreResult<usize> {
        measured!(self, sweep_connections(now_ms))
    }
}

#[async_trait::async_trait]
impl<S: Store> EdgeStore for Instrumented<S> {
    async fn heartbeat_edge(
        &self,
        edge_id: &EdgeId,
        now_ms: u64,
        lease: Duration,
    ) -> StoreResult<Heartbeat> {
        measured!(self, heartbeat_edge(edge_id, now_ms, lease))
    }

    async fn get_edge(&self, edge_id: &EdgeId) -> StoreResult<Option<EdgeRecord>> {
        measured!(self, get_edge(edge_id))
    }

    async fn lapsed_edges(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<EdgeRecord>> {
        measured!(self, lapsed_edges(now_ms, limit))
    }

    async fn remove_edge(&self, edge_id: &EdgeId, lease_expires_at_ms: u64) -> StoreResult<bool> {
        measured!(self, remove_edge(edge_id, lease_expires_at_ms))
    }

    async fn release_edge(&self, edge_id: &EdgeId) -> StoreResult<()> {
        measured!(self, release_edge(edge_id))
    }
}

#[async_trait::async_trait]
impl<S: Store> RequestStore for Instrumented<S> {
    async fn create_request(&self, record: RequestRecord) -> StoreResult<Created> {
        measured!(self, create_request(record))
    }

    async fn get_request(&self, id: &RequestId) -> StoreResult<Option<RequestRecord>> {
        measured!(self, get_request(id))
    }

    async fn find_request(
        &self,
        tenant_id: &TenantId,
        user_id: &UserId,
        client_request_id: &ClientRequestId,
    ) -> StoreResult<Option<RequestRecord>> {
        measured!(self, find_request(tenant_id, user_id, client_request_id))
    }

    async fn update_request(
        &self,
        record: RequestRecord,
        durability: Durability,
    ) -> StoreResult<RequestRecord> {
        measured!(self, update_request(record, durability))
    }

    async fn unfinished_requests(&self) -> StoreResult<Vec<RequestRecord>> {
        measured!(self, unfinished_requests())
    }

    async fn pending_requests(
        &self,
        action: &str,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        measured!(self, pending_requests(action, limit))
    }

    async fn lapsed_leases(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<RequestRecord>> {
        measured!(self, lapsed_leases(now_ms, limit))
    }
}

#[async_trait::async_trait]
impl<S: Store> SubscriptionStore for Instrumented<S> {
    async fn subscribe(&self, subscription: Subscription) -> StoreResult<bool> {
        measured!(self, subscribe(subscription))
    }

    async fn unsubscribe(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        connection_id: &ConnectionId,
    ) -> StoreResult<bool> {
        measured!(self, unsubscribe(tenant_id, topic, connection_id))
    }

    async fn subscribers(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<Subscription>> {
        measured!(self, subscribers(tenant_id, topic, after, limit))
    }

    async fn subscriptions_of(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Vec<Subscription>> {
        measured!(self, subscriptions_of(connection_id))
    }
}

#[async_trait::async_trait]
impl<S: Store> TopicStore for Instrumented<S> {
    async fn append_topic(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        payload: serde_json::Value,
        now_ms: u64,
        retention: Retention,
    ) -> StoreResult<TopicPosition> {
        measured!(
            self,
            append_topic(tenant_id, topic, payload, now_ms, retention)
        )
    }

    async fn topic_position(
        &self,
        tenant_id: &TenantId,
        topic: &str,
    ) -> StoreResult<TopicPosition> {
        measured!(self, topic_position(tenant_id, topic))
    }

    async fn topic_since(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        since: &TopicPosition,
        now_ms: u64,
        retention: Retention,
    ) -> StoreResult<Recovery> {
        measured!(
            self,
            topic_since(tenant_id, topic, since, now_ms, retention)
        )
    }
}

#[async_trait::async_trait]
impl<S: Store> TokenStore for Instrumented<S> {
    async fn revoke_token(&self, jti: &str, expires_at_ms: u64) -> StoreResult<()> {
        measured!(self, revoke_token(jti, expires_at_ms))
    }

    async fn is_token_revoked(&self, jti: &str, now_ms: u64) -> StoreResult<bool> {
        measured!(self, is_token_revoked(jti, now_ms))
    }

    async fn sweep_revoked_tokens(&self, now_ms: u64) -> StoreResult<usize> {
        measured!(self, sweep_revoked_tokens(now_ms))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn every_operation_is_timed_and_failures_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let dir = tempfile::tempdir().unwrap();
        let store = metrics::with_local_recorder(&recorder, || {
            Instrumented::new(
                super::super::EmbeddedStore::open(dir.path()).unwrap(),
                "embedded",
            )
        });
        let text = handle.render();
        for operation in OPERATIONS {
            assert!(
                text.contains(&format!(
                    "streamer_store_errors_total{{backend=\"embedded\",operation=\"{operation}\"}} 0"
                )),
                "{operation}:\n{text}"
            );
        }
        // The recorder is local to this thread; so is a current-thread
        // runtime's work.
        let _guard = metrics::set_default_local_recorder(&recorder);
        store.ping().await.unwrap();
        let text = handle.render();
        assert!(
            text.contains(
                "streamer_store_operation_duration_seconds_count{backend=\"embedded\",operation=\"ping\"} 1"
            ),
            "{text}"
        );
    }
}
