//! Delivery to the connections AWS API Gateway holds ([`ApiGatewayDelivery`]),
//! through its management API ([`post`]), and [`CompositeDelivery`], which
//! sends each connection's messages the way its record says: through its
//! edge, or through API Gateway.
//!
//! Rules:
//! 1. An API Gateway connection's record has edge id
//!    [`APIGATEWAY_EDGE_ID`] and says where it lives (domain and stage);
//!    its management endpoint is [`ApiGatewayConfig::endpoint`] with those
//!    filled in (`https://{domain}/{stage}` by default).
//! 2. Outcomes: a post delivered is DELIVERED; a 410 is GONE (the caller
//!    removes the record and its subscriptions); a message API Gateway will
//!    never take (over 128 KB, 403, another 4xx) is REJECTED; retries run
//!    out or an open breaker is UNAVAILABLE (see [`post`]).
//! 3. A tenant's, a user's or a topic's fan-out finds its API Gateway
//!    connections in the store (there is no edge holding an index of them)
//!    and posts to each. At most [`ApiGatewayConfig::workers`] posts are in
//!    flight in all, and a fan-out waits for a free worker before taking
//!    its next target: nothing queues without bound.
//! 4. A fan-out returns once every post of it has an outcome, so a topic's
//!    publishes (ordered on this replica, see [`crate::topics`]) reach each
//!    connection in order. API Gateway holds no live messages back while a
//!    subscriber catches up: `watch` is immediate and `replay` posts the
//!    answer, then the missed messages in order, and a publish during that
//!    replay may arrive before them. Each topic message carries its offset,
//!    so a client can put them back in order and drop one it has seen.
//! 5. A sequenced payload (ProgressService's) is posted like any other: API
//!    Gateway cannot tell whether an earlier post of it arrived, so a retry
//!    after UNAVAILABLE may arrive twice, with the same `sequence` for the
//!    client to recognize.

pub mod post;

pub use post::*;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt as _, stream};
use streamer_api::v1::{self, DeliveryOutcome, DeliveryResult};
use streamer_core::ids::{ConnectionId, TenantId, UserId};
use streamer_core::store::{APIGATEWAY_EDGE_ID, ConnectionRecord, SharedStore, StoreResult};
use tokio::sync::Semaphore;

use crate::delivery::{Delivery, EdgeDelivery, Fanout, Selector};

/// Connections read from the store per page of a fan-out.
const FANOUT_PAGE: usize = 500;

/// How ConnectionService reaches API Gateway's connections.
#[derive(Clone)]
pub struct ApiGatewayConfig {
    /// The management endpoint of a connection: `{domain}` and `{stage}`
    /// are replaced by its record's.
    pub endpoint: String,
    /// Posts in flight at once, over every delivery and fan-out.
    pub workers: usize,
    pub policy: PostPolicy,
    pub api: Arc<dyn ManagementApi>,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for ApiGatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiGatewayConfig")
            .field("endpoint", &self.endpoint)
            .field("workers", &self.workers)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ApiGatewayConfig {
    pub const DEFAULT_ENDPOINT: &'static str = "https://{domain}/{stage}";
    pub const DEFAULT_WORKERS: usize = 64;

    /// The defaults, posting through `api`.
    pub fn new(api: Arc<dyn ManagementApi>) -> Self {
        Self {
            endpoint: Self::DEFAULT_ENDPOINT.into(),
            workers: Self::DEFAULT_WORKERS,
            policy: PostPolicy::default(),
            api,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Delivery to API Gateway's connections (see the module doc).
pub struct ApiGatewayDelivery {
    poster: Poster,
    endpoint: String,
    /// One permit per post in flight, over every caller.
    workers: Arc<Semaphore>,
    /// Posts one caller starts at once (no more can be in flight anyway).
    per_caller: usize,
    store: SharedStore,
}

impl ApiGatewayDelivery {
    pub fn new(config: ApiGatewayConfig, store: SharedStore) -> Self {
        Self {
            poster: Poster::new(config.api, config.clock, config.policy),
            endpoint: config.endpoint,
            workers: Arc::new(Semaphore::new(config.workers.max(1))),
            per_caller: config.workers.max(1),
            store,
        }
    }

    /// Where `record`'s connection is reached; none for a record that does
    /// not say (it cannot be posted to).
    fn target(&self, record: &ConnectionRecord) -> Option<Target> {
        let at = record.apigateway.as_ref()?;
        Some(Target {
            endpoint: self
                .endpoint
                .replace("{domain}", &at.domain_name)
                .replace("{stage}", &at.stage),
            connection_id: record.connection_id.to_string(),
        })
    }

    /// Posts `data` to one connection on a worker (rule 3).
    async fn post(&self, record: &ConnectionRecord, data: Bytes) -> DeliveryOutcome {
        let Some(target) = self.target(record) else {
            return DeliveryOutcome::Gone;
        };
        // Closed only when the delivery is dropped, which ends the caller too.
        let Ok(_worker) = self.workers.acquire().await else {
            return DeliveryOutcome::Unavailable;
        };
        match self.poster.post(&target, data).await {
            PostOutcome::Delivered => DeliveryOutcome::Delivered,
            PostOutcome::Gone => DeliveryOutcome::Gone,
            PostOutcome::Rejected(why) => {
                tracing::warn!(connection_id = %record.connection_id, %why, "API Gateway refused a message");
                DeliveryOutcome::Rejected
            }
            PostOutcome::Unavailable(why) => {
                tracing::debug!(connection_id = %record.connection_id, %why, "API Gateway post failed");
                DeliveryOutcome::Unavailable
            }
        }
    }

    /// Posts `data` to each of `records`, as many at once as there are
    /// workers; one outcome each.
    async fn post_each(&self, records: &[ConnectionRecord], data: Bytes) -> Vec<DeliveryResult> {
        stream::iter(records.iter().cloned())
            .map(|record| {
                let data = data.clone();
                async move {
                    DeliveryResult {
                        outcome: self.post(&record, data).await as i32,
                        connection_id: record.connection_id.into_string(),
                    }
                }
            })
            .buffer_unordered(self.per_caller)
            .collect()
            .await
    }

    /// The API Gateway connections `selector` picks, from the store, one
    /// page at a time.
    async fn selected(&self, selector: &Selector) -> StoreResult<Vec<ConnectionRecord>> {
        let mut found = Vec::new();
        let mut after: Option<ConnectionId> = None;
        loop {
            let page = match selector {
                Selector::Tenant(t) => self.connections_page(&t.tenant_id, None, after).await?,
                Selector::User(u) => {
                    let user = UserId::from(u.user_id.as_str());
                    self.connections_page(&u.tenant_id, Some(&user), after)
                        .await?
                }
                Selector::Topic(t) => self.subscribers_page(t, after).await?,
            };
            found.extend(
                page.records
                    .into_iter()
                    .filter(ConnectionRecord::is_apigateway),
            );
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(found),
            }
        }
    }

    /// One page of a tenant's (or one of its users') connections.
    async fn connections_page(
        &self,
        tenant_id: &str,
        user_id: Option<&UserId>,
        after: Option<ConnectionId>,
    ) -> StoreResult<Page> {
        let records = self
            .store
            .list_connections(
                &TenantId::from(tenant_id),
                user_id,
                after.as_ref(),
                FANOUT_PAGE,
            )
            .await?;
        let last = records.last().map(|r| r.connection_id.clone());
        let read = records.len();
        Ok(Page::of(records, last, read))
    }

    /// The records of one page of a topic's subscribers (a connection gone
    /// meanwhile is simply not there).
    async fn subscribers_page(
        &self,
        topic: &v1::TopicMessageRef,
        after: Option<ConnectionId>,
    ) -> StoreResult<Page> {
        let subscriptions = self
            .store
            .subscribers(
                &TenantId::from(topic.tenant_id.as_str()),
                &topic.topic,
                after.as_ref(),
                FANOUT_PAGE,
            )
            .await?;
        let last = subscriptions.last().map(|s| s.connection_id.clone());
        let read = subscriptions.len();
        let mut records = Vec::with_capacity(subscriptions.len());
        for subscription in subscriptions {
            if let Some(record) = self
                .store
                .get_connection(&subscription.connection_id)
                .await?
            {
                records.push(record);
            }
        }
        Ok(Page::of(records, last, read))
    }

    /// Removes what a 410 says is gone: the record (its subscriptions go
    /// with it).
    async fn forget_gone(&self, results: &[DeliveryResult]) {
        for result in results {
            if result.outcome == DeliveryOutcome::Gone as i32 {
                let id = ConnectionId::from(result.connection_id.as_str());
                if let Err(error) = self.store.delete_connection(&id).await {
                    tracing::warn!(%error, connection_id = %id, "cannot remove a connection API Gateway says is gone");
                }
            }
        }
    }
}

/// One page of a fan-out's targets, and where the next one starts (none
/// after the last page).
struct Page {
    records: Vec<ConnectionRecord>,
    next: Option<ConnectionId>,
}

impl Page {
    /// The `records` of a page of `read` entries (at most `FANOUT_PAGE`)
    /// whose last id is `last`: a page shorter than that is the last one.
    fn of(records: Vec<ConnectionRecord>, last: Option<ConnectionId>, read: usize) -> Self {
        Self {
            records,
            next: last.filter(|_| read == FANOUT_PAGE),
        }
    }
}

/// The bytes API Gateway posts for `payload`.
fn bytes_of(payload: v1::Payload) -> Bytes {
    match payload.body {
        Some(v1::payload::Body::Json(value)) => {
            Bytes::from(streamer_api::json::from_proto(value).to_string())
        }
        Some(v1::payload::Body::Text(text)) => Bytes::from(text),
        Some(v1::payload::Body::Binary(bytes)) => Bytes::from(bytes),
        None => Bytes::new(),
    }
}

#[async_trait::async_trait]
impl Delivery for ApiGatewayDelivery {
    /// A sequenced payload is posted like any other (rule 5).
    async fn deliver(
        &self,
        targets: &[ConnectionRecord],
        payload: v1::Payload,
        _sequence: Option<v1::Sequence>,
    ) -> Vec<DeliveryResult> {
        self.post_each(targets, bytes_of(payload)).await
    }

    /// `DeleteConnection`; API Gateway sends no close frame, so the code
    /// and reason do not reach the client.
    async fn close(&self, target: &ConnectionRecord, _code: u32, _reason: String) -> bool {
        let Some(at) = self.target(target) else {
            return false;
        };
        match self.poster.delete(&at).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(connection_id = %target.connection_id, ?error, "DeleteConnection failed");
                false
            }
        }
    }

    async fn is_active(&self, target: &ConnectionRecord) -> bool {
        let Some(at) = self.target(target) else {
            return false;
        };
        // When API Gateway cannot be asked, the record says it is there.
        self.poster.is_active(&at).await.unwrap_or(true)
    }

    async fn dispatch(
        &self,
        selector: Selector,
        payload: v1::Payload,
    ) -> BoxFuture<'static, Fanout> {
        let records = match self.selected(&selector).await {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "cannot find the API Gateway connections of a fan-out");
                // Counted as one transport that did not confirm.
                let unreached = Fanout {
                    unavailable_edges: 1,
                    ..Fanout::default()
                };
                return Box::pin(std::future::ready(unreached));
            }
        };
        let results = self.post_each(&records, bytes_of(payload)).await;
        self.forget_gone(&results).await;
        let mut fanout = Fanout::default();
        for result in &results {
            match DeliveryOutcome::try_from(result.outcome).unwrap_or_default() {
                DeliveryOutcome::Delivered => fanout.delivered += 1,
                DeliveryOutcome::Gone => fanout.gone += 1,
                DeliveryOutcome::Rejected => fanout.rejected += 1,
                _ => fanout.unavailable_connections += 1,
            }
        }
        Box::pin(std::future::ready(fanout))
    }

    async fn watch(
        &self,
        _tenant_id: &TenantId,
        _topic: &str,
        targets: &[ConnectionRecord],
    ) -> Vec<DeliveryResult> {
        targets
            .iter()
            .map(|t| DeliveryResult {
                connection_id: t.connection_id.to_string(),
                outcome: DeliveryOutcome::Delivered as i32,
            })
            .collect()
    }

    async fn replay(&self, target: &ConnectionRecord, replay: v1::Replay) -> bool {
        let mut frames: Vec<Bytes> = replay.answer.into_iter().map(bytes_of).collect();
        frames.extend(
            replay
                .messages
                .into_iter()
                .filter_map(|m| m.payload)
                .map(bytes_of),
        );
        for frame in frames {
            if self.post(target, frame).await != DeliveryOutcome::Delivered {
                return false;
            }
        }
        true
    }

    async fn unwatch(&self, _tenant_id: &TenantId, _topic: &str, _targets: &[ConnectionRecord]) {}
}

/// Each connection's messages through its own transport: its edge, or API
/// Gateway (rule 1).
pub struct CompositeDelivery {
    edges: EdgeDelivery,
    apigateway: ApiGatewayDelivery,
}

impl CompositeDelivery {
    pub fn new(edges: EdgeDelivery, apigateway: ApiGatewayDelivery) -> Self {
        Self { edges, apigateway }
    }

    fn transport(&self, record: &ConnectionRecord) -> &dyn Delivery {
        if record.edge_id.as_str() == APIGATEWAY_EDGE_ID {
            &self.apigateway
        } else {
            &self.edges
        }
    }

    /// `targets` split by transport, keeping their order within each.
    fn split(targets: &[ConnectionRecord]) -> (Vec<ConnectionRecord>, Vec<ConnectionRecord>) {
        targets.iter().cloned().partition(|r| !r.is_apigateway())
    }
}

#[async_trait::async_trait]
impl Delivery for CompositeDelivery {
    async fn deliver(
        &self,
        targets: &[ConnectionRecord],
        payload: v1::Payload,
        sequence: Option<v1::Sequence>,
    ) -> Vec<DeliveryResult> {
        let (edges, apigateway) = Self::split(targets);
        let (mut a, b) = futures::join!(
            self.edges
                .deliver(&edges, payload.clone(), sequence.clone()),
            self.apigateway.deliver(&apigateway, payload, sequence),
        );
        a.extend(b);
        // In the order asked.
        let mut by_id: HashMap<String, DeliveryResult> = a
            .into_iter()
            .map(|r| (r.connection_id.clone(), r))
            .collect();
        targets
            .iter()
            .filter_map(|t| by_id.remove(t.connection_id.as_str()))
            .collect()
    }

    async fn close(&self, target: &ConnectionRecord, code: u32, reason: String) -> bool {
        self.transport(target).close(target, code, reason).await
    }

    async fn is_active(&self, target: &ConnectionRecord) -> bool {
        self.transport(target).is_active(target).await
    }

    async fn dispatch(
        &self,
        selector: Selector,
        payload: v1::Payload,
    ) -> BoxFuture<'static, Fanout> {
        let edges = self.edges.dispatch(selector.clone(), payload.clone()).await;
        let apigateway = self.apigateway.dispatch(selector, payload).await;
        Box::pin(async move {
            let (a, b) = futures::join!(edges, apigateway);
            a.merge(b)
        })
    }

    async fn watch(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        targets: &[ConnectionRecord],
    ) -> Vec<DeliveryResult> {
        let (edges, apigateway) = Self::split(targets);
        let mut results = self.edges.watch(tenant_id, topic, &edges).await;
        results.extend(self.apigateway.watch(tenant_id, topic, &apigateway).await);
        results
    }

    async fn replay(&self, target: &ConnectionRecord, replay: v1::Replay) -> bool {
        self.transport(target).replay(target, replay).await
    }

    async fn unwatch(&self, tenant_id: &TenantId, topic: &str, targets: &[ConnectionRecord]) {
        let (edges, _) = Self::split(targets);
        self.edges.unwatch(tenant_id, topic, &edges).await;
    }
}
