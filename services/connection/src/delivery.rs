//! Delivery: how a payload reaches sockets ([`Delivery`], one
//! implementation per transport: [`EdgeDelivery`] for the edges attached
//! to this replica), and what its outcome means for the records.
//!
//! Outcomes: DELIVERED; GONE when the socket is known not to be there (the
//! transport said so: its record is removed); UNAVAILABLE when the transport
//! could not tell (an edge not attached here, or no report in time: the
//! socket may well be there, so its record stays and a sender may retry);
//! THROTTLED when a slow consumer was closed instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use streamer_api::v1::{self, DeliveryOutcome, DeliveryResult, attach_response::Command};
use streamer_core::ids::{ConnectionId, EdgeId, TenantId};
use streamer_core::store::{ConnectionRecord, now_ms};
use streamer_core::trust::Caller;

use crate::edges::{EdgeLink, EdgeRegistry};
use crate::error::ConnectionError;
use crate::model::{BroadcastCommand, BroadcastTarget, DisconnectCommand, SendCommand};
use crate::service::{ConnectionServer, TOUCH_INTERVAL_MS};

/// A way to reach sockets.
#[async_trait::async_trait]
pub trait Delivery: Send + Sync + 'static {
    /// Writes `payload` to each of `targets` and reports each one's outcome
    /// (see the module doc; NOT_FOUND counts as GONE).
    async fn deliver(
        &self,
        targets: &[ConnectionRecord],
        payload: v1::Payload,
        sequence: Option<v1::Sequence>,
    ) -> Vec<DeliveryResult>;

    /// Closes one socket with a WebSocket close code; whether the transport
    /// took the command.
    async fn close(&self, target: &ConnectionRecord, code: u32, reason: String) -> bool;

    /// Whether the socket is there, as far as the transport can tell.
    async fn is_active(&self, target: &ConnectionRecord) -> bool;

    /// Hands `payload` to the transport for every socket `selector` picks
    /// (a tenant's, a user's, a topic's subscribers), and returns once it
    /// is handed over: fan-outs dispatched one after another are written
    /// in that order. The returned future gives the counts.
    async fn dispatch(
        &self,
        selector: Selector,
        payload: v1::Payload,
    ) -> BoxFuture<'static, Fanout>;

    /// Subscribes these sockets to a topic. Their messages of the topic
    /// are held back until a [`Delivery::replay`] for each brings it up to
    /// date. DELIVERED: subscribed.
    async fn watch(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        targets: &[ConnectionRecord],
    ) -> Vec<DeliveryResult>;

    /// Brings one subscribed socket up to date (see `v1::Replay`).
    async fn replay(&self, target: &ConnectionRecord, replay: v1::Replay) -> bool;

    /// Ends these sockets' subscriptions to a topic.
    async fn unwatch(&self, tenant_id: &TenantId, topic: &str, targets: &[ConnectionRecord]);
}

/// Which sockets a fan-out reaches.
pub type Selector = v1::fanout::Selector;

/// What a fan-out reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Sockets written to.
    pub delivered: u32,
    /// Slow consumers closed instead.
    pub throttled: u32,
    /// Edges with at least one socket written to.
    pub edges: u32,
    /// Edges that did not confirm in time (API Gateway counts as one when
    /// its connections could not be looked up).
    pub unavailable_edges: u32,
    /// API Gateway connections: gone (410; their records are removed),
    /// refused the message for good, or not reached now.
    pub gone: u32,
    pub rejected: u32,
    pub unavailable_connections: u32,
}

impl Fanout {
    /// The counts of two transports' fan-outs together.
    pub fn merge(self, other: Fanout) -> Fanout {
        Fanout {
            delivered: self.delivered + other.delivered,
            throttled: self.throttled + other.throttled,
            edges: self.edges + other.edges,
            unavailable_edges: self.unavailable_edges + other.unavailable_edges,
            gone: self.gone + other.gone,
            rejected: self.rejected + other.rejected,
            unavailable_connections: self.unavailable_connections + other.unavailable_connections,
        }
    }

    fn add(mut self, report: Option<v1::FanoutReport>) -> Self {
        match report {
            Some(report) => {
                self.delivered += report.delivered;
                self.throttled += report.throttled;
                self.edges += u32::from(report.delivered > 0);
            }
            None => self.unavailable_edges += 1,
        }
        self
    }
}

/// Delivery through the edges attached to this replica: one command per
/// edge, answered by the edge's report.
pub struct EdgeDelivery {
    edges: Arc<EdgeRegistry>,
    /// How long an edge has to report a delivery.
    timeout: Duration,
}

impl EdgeDelivery {
    pub fn new(edges: Arc<EdgeRegistry>, timeout: Duration) -> Self {
        Self { edges, timeout }
    }
}

#[async_trait::async_trait]
impl Delivery for EdgeDelivery {
    async fn deliver(
        &self,
        targets: &[ConnectionRecord],
        payload: v1::Payload,
        sequence: Option<v1::Sequence>,
    ) -> Vec<DeliveryResult> {
        let deliveries = by_edge(targets).into_iter().map(|(edge_id, ids)| {
            let payload = payload.clone();
            let sequence = sequence.clone();
            async move {
                match self.edges.get(edge_id) {
                    Some(link) => link.deliver(ids, payload, sequence, self.timeout).await,
                    // Not attached here, perhaps only for a moment: the
                    // records stay (their edge's lease decides).
                    None => EdgeLink::outcome_all(&ids, DeliveryOutcome::Unavailable),
                }
            }
        });
        futures::future::join_all(deliveries)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn close(&self, target: &ConnectionRecord, code: u32, reason: String) -> bool {
        match self.edges.get(&target.edge_id) {
            Some(link) => {
                link.command(Command::Close(v1::CloseConnection {
                    connection_id: target.connection_id.to_string(),
                    code,
                    reason,
                }))
                .await
            }
            None => false,
        }
    }

    async fn is_active(&self, target: &ConnectionRecord) -> bool {
        self.edges.get(&target.edge_id).is_some()
    }

    /// One `fanout` command to every edge attached here (an edge with no
    /// such socket answers 0 at once). An edge attached to no replica at
    /// this moment is not reached: its topic subscribers see the gap in
    /// offsets and recover the message from the history.
    async fn dispatch(
        &self,
        selector: Selector,
        payload: v1::Payload,
    ) -> BoxFuture<'static, Fanout> {
        let mut waits = Vec::new();
        for link in self.edges.all() {
            waits.push(
                link.dispatch_fan_out(selector.clone(), payload.clone(), self.timeout)
                    .await,
            );
        }
        Box::pin(async move {
            futures::future::join_all(waits)
                .await
                .into_iter()
                .fold(Fanout::default(), Fanout::add)
        })
    }

    async fn watch(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        targets: &[ConnectionRecord],
    ) -> Vec<DeliveryResult> {
        let by_edge = by_edge(targets);
        let watches = by_edge.into_iter().map(|(edge_id, ids)| async move {
            match self.edges.get(edge_id) {
                Some(link) => link.watch(tenant_id, topic, ids, self.timeout).await,
                None => EdgeLink::outcome_all(&ids, DeliveryOutcome::Unavailable),
            }
        });
        futures::future::join_all(watches)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn replay(&self, target: &ConnectionRecord, replay: v1::Replay) -> bool {
        match self.edges.get(&target.edge_id) {
            Some(link) => link.command(Command::Replay(replay)).await,
            None => false,
        }
    }

    async fn unwatch(&self, tenant_id: &TenantId, topic: &str, targets: &[ConnectionRecord]) {
        for (edge_id, ids) in by_edge(targets) {
            if let Some(link) = self.edges.get(edge_id) {
                link.command(Command::Unwatch(v1::Unwatch {
                    tenant_id: tenant_id.to_string(),
                    topic: topic.to_owned(),
                    connection_ids: ids.into_iter().map(ConnectionId::into_string).collect(),
                }))
                .await;
            }
        }
    }
}

/// The targets' ids, by the edge that holds them.
fn by_edge(targets: &[ConnectionRecord]) -> HashMap<&EdgeId, Vec<ConnectionId>> {
    let mut by_edge: HashMap<&EdgeId, Vec<ConnectionId>> = HashMap::new();
    for target in targets {
        by_edge
            .entry(&target.edge_id)
            .or_default()
            .push(target.connection_id.clone());
    }
    by_edge
}

/// What a broadcast reached.
#[derive(Debug)]
pub enum Broadcasted {
    /// One outcome per connection named.
    Each(Vec<DeliveryResult>),
    /// A user or tenant: counts.
    Counted(Fanout),
}

impl ConnectionServer {
    /// Delivers one payload to these connections and returns an outcome
    /// per connection: records the transport says are gone are removed
    /// (GONE), and records of sockets that got it have their expiry slid
    /// (at most every [`TOUCH_INTERVAL_MS`]).
    pub(crate) async fn deliver(
        &self,
        records: Vec<ConnectionRecord>,
        payload: v1::Payload,
        sequence: Option<v1::Sequence>,
    ) -> Vec<DeliveryResult> {
        let now = now_ms();
        let started = std::time::Instant::now();
        let mut results = self
            .shared
            .delivery
            .deliver(&records, payload, sequence)
            .await;
        metrics::histogram!("streamer_send_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let last_seen: HashMap<&str, u64> = records
            .iter()
            .map(|r| (r.connection_id.as_str(), r.last_seen_ms))
            .collect();
        for result in &mut results {
            match DeliveryOutcome::try_from(result.outcome).unwrap_or_default() {
                // The transport itself says the socket is not there.
                DeliveryOutcome::NotFound | DeliveryOutcome::Gone => {
                    let connection_id = ConnectionId::from(result.connection_id.as_str());
                    if let Err(error) = self.shared.store.delete_connection(&connection_id).await {
                        tracing::warn!(%error, connection_id = %result.connection_id, "cannot remove stale connection");
                    }
                    result.outcome = DeliveryOutcome::Gone as i32;
                }
                DeliveryOutcome::Delivered => {
                    let seen = last_seen.get(result.connection_id.as_str()).copied();
                    if seen.is_some_and(|s| now.saturating_sub(s) > TOUCH_INTERVAL_MS) {
                        let connection_id = ConnectionId::from(result.connection_id.as_str());
                        let _ = self
                            .shared
                            .store
                            .touch_connection(&connection_id, now)
                            .await;
                    }
                }
                _ => {}
            }
            let outcome = DeliveryOutcome::try_from(result.outcome).unwrap_or_default();
            metrics::counter!("streamer_deliveries_total", "outcome" => streamer_core::metrics::delivery_outcome(outcome))
                .increment(1);
        }
        results
    }

    pub(crate) async fn send(
        &self,
        cmd: SendCommand,
        caller: &Caller,
    ) -> Result<DeliveryOutcome, ConnectionError> {
        let record = self
            .find(&cmd.connection_id, cmd.tenant_id.as_ref(), caller)
            .await?;
        let results = self.deliver(vec![record], cmd.payload, cmd.sequence).await;
        Ok(results
            .first()
            .and_then(|r| DeliveryOutcome::try_from(r.outcome).ok())
            .unwrap_or(DeliveryOutcome::Unavailable))
    }

    /// A broadcast to a list of connections answers for each one; one to a
    /// user or a tenant is one fan-out, answered with counts.
    pub(crate) async fn broadcast(
        &self,
        cmd: BroadcastCommand,
        caller: &Caller,
    ) -> Result<Broadcasted, ConnectionError> {
        let selector = match cmd.target {
            BroadcastTarget::Connections(ids) => {
                let mut records = Vec::with_capacity(ids.len());
                let mut missing = Vec::new();
                for id in ids {
                    match self.find(&id, cmd.tenant_id.as_ref(), caller).await {
                        Ok(record) => records.push(record),
                        Err(ConnectionError::NotFound(_)) => missing.push(DeliveryResult {
                            connection_id: id.into(),
                            outcome: DeliveryOutcome::NotFound as i32,
                        }),
                        Err(other) => return Err(other),
                    }
                }
                let mut results = self.deliver(records, cmd.payload, None).await;
                results.append(&mut missing);
                return Ok(Broadcasted::Each(results));
            }
            BroadcastTarget::User { tenant_id, user_id } => {
                Self::check_reach(caller, &tenant_id)?;
                Selector::User(v1::UserTarget {
                    tenant_id: tenant_id.into(),
                    user_id: user_id.into(),
                })
            }
            BroadcastTarget::Tenant(tenant_id) => {
                Self::check_reach(caller, &tenant_id)?;
                Selector::Tenant(v1::TenantTarget {
                    tenant_id: tenant_id.into(),
                })
            }
        };
        Ok(Broadcasted::Counted(
            self.fan_out(selector, cmd.payload).await,
        ))
    }

    /// One fan-out, counted in the metrics.
    pub(crate) async fn fan_out(&self, selector: Selector, payload: v1::Payload) -> Fanout {
        let kind = match &selector {
            Selector::Tenant(_) => "tenant",
            Selector::User(_) => "user",
            Selector::Topic(_) => "topic",
        };
        let started = std::time::Instant::now();
        let fanout = self.shared.delivery.dispatch(selector, payload).await.await;
        Self::count(kind, fanout, started);
        fanout
    }

    /// Counts a fan-out's outcome, and the time since it `started`, in the
    /// metrics.
    pub(crate) fn count(kind: &'static str, fanout: Fanout, started: std::time::Instant) {
        metrics::histogram!("streamer_fanout_duration_seconds", "selector" => kind)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("streamer_fanouts_total", "selector" => kind).increment(1);
        metrics::counter!("streamer_deliveries_total", "outcome" => "delivered")
            .increment(u64::from(fanout.delivered));
        metrics::counter!("streamer_deliveries_total", "outcome" => "throttled")
            .increment(u64::from(fanout.throttled));
    }

    pub(crate) async fn disconnect(
        &self,
        cmd: DisconnectCommand,
        caller: &Caller,
    ) -> Result<(), ConnectionError> {
        let record = self
            .find(&cmd.connection_id, cmd.tenant_id.as_ref(), caller)
            .await?;
        self.shared.delivery.close(&record, 1000, cmd.reason).await;
        self.shared
            .store
            .delete_connection(&record.connection_id)
            .await?;
        tracing::info!(connection_id = %record.connection_id, "connection disconnected by request");
        Ok(())
    }

    /// Writes a JSON message to one client, best effort (used for answers to
    /// frames; a client that left meanwhile simply misses it).
    pub(crate) async fn reply(&self, connection_id: &ConnectionId, message: Value) {
        let Ok(record) = self.find(connection_id, None, Caller::everyone()).await else {
            return;
        };
        // Text, not a protobuf Struct, so the client sees the protocol's
        // field order (`type` first) rather than sorted keys.
        let payload = v1::Payload {
            body: Some(v1::payload::Body::Text(message.to_string())),
        };
        self.deliver(vec![record], payload, None).await;
    }
}
