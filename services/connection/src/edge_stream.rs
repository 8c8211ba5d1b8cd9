//! The edges' side of ConnectionService: each edge's `Attach` stream, what
//! the edge announces on it, and the edge's liveness lease.
//!
//! An edge attaches to every ConnectionService replica. Each replica that
//! holds an edge's stream renews the edge's lease in the store every third
//! of [`ConnectionConfig::edge_lease`](crate::ConnectionConfig::edge_lease);
//! so the edge is alive while any replica hears from it, and no replica is
//! special. Every replica also looks for lapsed leases: of the replicas
//! that find one, exactly one removes the lease (a conditional write) and
//! with it the dead edge's connections.
//!
//! The `hello` that opens a stream reconciles the store with the edge's own
//! list: connections it holds that have no record are verified (with
//! AuthService, unless trust mode is none) and recorded; records of this edge
//! that it no longer holds, opened before its list was taken, are removed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use streamer_api::errors::{Failure, Reason};
use streamer_api::v1::{
    self, AttachRequest, attach_request::Event, attach_response::Command,
    edge_service_server::EdgeService,
};
use streamer_core::ids::{ConnectionId, EdgeId};
use streamer_core::store::{APIGATEWAY_EDGE_ID, ConnectionRecord, EdgeRecord, Heartbeat, now_ms};
use streamer_core::trust::Caller;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::edges::{EdgeLink, Report};
use crate::error::ConnectionError;
use crate::model::{connection_from_edge, required_id};
use crate::service::{BoxStream, ConnectionServer, EDGE_QUEUE};

/// Lapsed edges handled per sweep.
const LAPSED_PER_SWEEP: usize = 100;

fn timestamp_ms(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
}

impl ConnectionServer {
    /// At start: records left by a previous run are stale at once when the
    /// only edge ran in this process (`streamer all`); otherwise an edge
    /// that holds records but has no lease (records written before leases
    /// existed) gets one now, so it is removed if it never comes back.
    pub(crate) async fn adopt_edges(&self) -> anyhow::Result<()> {
        let store = &self.shared.store;
        let lease = self.shared.config.edge_lease;
        for edge_id in store.connection_edges().await? {
            // API Gateway holds these sockets, not a process of ours: they
            // neither go stale with a restart nor take a lease.
            if edge_id.as_str() == APIGATEWAY_EDGE_ID {
                continue;
            }
            if self.shared.config.connections_stale_at_start {
                for id in store.connections_of_edge(&edge_id).await? {
                    store.delete_connection(&id).await?;
                }
                store.release_edge(&edge_id).await?;
            } else if store.get_edge(&edge_id).await?.is_none() {
                store.heartbeat_edge(&edge_id, now_ms(), lease).await?;
            }
        }
        Ok(())
    }

    /// Renews the leases of the edges attached here and removes lapsed
    /// ones, every third of the lease, until shutdown.
    pub(crate) async fn keep_edge_leases(self) {
        let mut tick = tokio::time::interval(self.shared.config.edge_lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shared.shutdown.cancelled() => return,
            }
            for link in self.shared.edges.all() {
                self.renew(&link).await;
            }
            if let Err(error) = self.remove_lapsed_edges().await {
                tracing::warn!(%error, "cannot look for lapsed edges");
            }
        }
    }

    /// Renews one attached edge's lease. A lease that had lapsed (this
    /// replica could not reach the store for a while, and another may have
    /// removed the edge's connections meanwhile) ends the stream, so the
    /// edge attaches again and announces what it holds.
    async fn renew(&self, link: &EdgeLink) {
        let renewed = self
            .shared
            .store
            .heartbeat_edge(&link.edge_id, now_ms(), self.shared.config.edge_lease)
            .await;
        match renewed {
            Ok(Heartbeat::Extended) => {}
            Ok(Heartbeat::Started) => {
                tracing::warn!(edge_id = %link.edge_id, "edge lease had lapsed; asking the edge to announce its connections again");
                link.end(
                    Failure::new(
                        tonic::Code::Unavailable,
                        Reason::DependencyUnavailable,
                        "this edge's lease lapsed: attach again and announce its connections",
                    )
                    .into(),
                );
            }
            Err(error) => {
                tracing::warn!(edge_id = %link.edge_id, %error, "cannot renew edge lease");
            }
        }
    }

    async fn remove_lapsed_edges(&self) -> Result<(), ConnectionError> {
        let store = &self.shared.store;
        for edge in store.lapsed_edges(now_ms(), LAPSED_PER_SWEEP).await? {
            if edge.edge_id.as_str() == APIGATEWAY_EDGE_ID {
                continue;
            }
            if let Some(link) = self.shared.edges.get(&edge.edge_id) {
                // Attached here after all (a renewal failed): renew now.
                self.renew(&link).await;
                continue;
            }
            if store
                .remove_edge(&edge.edge_id, edge.lease_expires_at_ms)
                .await?
            {
                let removed = self.remove_connections_of(&edge).await?;
                metrics::counter!("streamer_edges_lapsed_total").increment(1);
                tracing::info!(edge_id = %edge.edge_id, removed, "edge lease lapsed; its connections are gone");
            }
        }
        Ok(())
    }

    /// Removes the records a lapsed edge left. A record written after the
    /// lease lapsed belongs to the edge's next life (it came back and
    /// announced it) and stays.
    async fn remove_connections_of(&self, edge: &EdgeRecord) -> Result<usize, ConnectionError> {
        let store = &self.shared.store;
        let mut removed = 0;
        for id in store.connections_of_edge(&edge.edge_id).await? {
            let Some(record) = store.get_connection(&id).await? else {
                continue;
            };
            if record.edge_id == edge.edge_id && record.last_seen_ms < edge.lease_expires_at_ms {
                store.delete_connection(&id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Tells the edge which actions have a router on this replica, now and
    /// at each change, until its stream ends: the edge sends those frames
    /// here, so a router on any replica gets frames from every edge.
    async fn advertise_routes(self, link: Arc<EdgeLink>) {
        let mut actions = self.shared.routers.actions();
        loop {
            let current: Vec<String> = actions.borrow_and_update().iter().cloned().collect();
            if !link
                .command(Command::Routes(v1::RouterActions { actions: current }))
                .await
            {
                return;
            }
            tokio::select! {
                changed = actions.changed() => if changed.is_err() { return },
                () = link.closed() => return,
                () = self.shared.shutdown.cancelled() => return,
            }
        }
    }

    async fn run_edge(self, link: Arc<EdgeLink>, mut events: Streaming<AttachRequest>) {
        let edge_id = link.edge_id.clone();
        // Held while this edge may still send frames (see
        // `ConnectionServer::drain_on_shutdown`).
        let mut intake = Some(self.shared.drain.intake.token());
        let mut draining = false;
        loop {
            let event = tokio::select! {
                event = events.message() => event,
                () = self.shared.shutdown.cancelled(), if !draining => {
                    draining = true;
                    link.command_nowait(Command::Drain(v1::Drain {}));
                    continue;
                }
                () = self.shared.drain.drained.cancelled() => break,
            };
            let event = match event {
                Ok(Some(AttachRequest { event: Some(event) })) => event,
                Ok(Some(AttachRequest { event: None })) => continue,
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(edge_id = %edge_id, error = %status, "edge stream failed");
                    break;
                }
            };
            match event {
                Event::Hello(_) => {
                    tracing::warn!(edge_id = %edge_id, "edge sent a second hello; ignored");
                }
                Event::Opened(opened) => self.edge_opened(&link, opened).await,
                Event::Closed(closed) => self.edge_closed(&link, closed).await,
                Event::Frame(frame) => self.enqueue_frame(&link.holder(), frame),
                Event::Reply(reply) => self.edge_reply(&link, reply).await,
                Event::Delivered(report) => {
                    link.report(report.delivery_id, Report::Delivered(report.results));
                }
                Event::FannedOut(report) => {
                    link.report(report.delivery_id, Report::FannedOut(report))
                }
                Event::Drained(v1::Drained {}) => {
                    tracing::info!(edge_id = %edge_id, "edge drained");
                    intake = None;
                }
            }
        }
        drop(intake);
        link.abandon();
        if self.shared.edges.detach(&link) {
            // Its lease is no longer renewed here; if no other replica
            // holds the edge either, the lease lapses and its connections
            // go (see `remove_lapsed_edges`).
            tracing::info!(edge_id = %edge_id, "edge detached");
        }
    }

    /// Whether a connection an edge announces is recorded as another
    /// edge's: sockets never move between edges, so such an announcement is
    /// a takeover attempt (or an id collision) and is refused.
    async fn held_elsewhere(
        &self,
        record: &ConnectionRecord,
        edge_id: &EdgeId,
    ) -> Result<bool, ConnectionError> {
        Ok(self
            .shared
            .store
            .get_connection(&record.connection_id)
            .await?
            .is_some_and(|existing| existing.edge_id != *edge_id))
    }

    async fn edge_opened(&self, link: &EdgeLink, opened: v1::ConnectionOpened) {
        let announced_id = opened
            .connection
            .as_ref()
            .map(|c| c.connection_id.clone())
            .unwrap_or_default();
        let record = match opened
            .connection
            .ok_or_else(|| ConnectionError::EdgeProtocol("opened without a connection".into()))
            .and_then(|c| connection_from_edge(c, &link.holder(), now_ms()))
            .and_then(|record| {
                // API Gateway's integration opens only API Gateway's
                // connections, and no other edge may.
                if record.apigateway.is_some() == link.apigateway {
                    Ok(record)
                } else if link.apigateway {
                    Err(ConnectionError::EdgeProtocol(
                        "API Gateway's integration opened a connection without its location".into(),
                    ))
                } else {
                    Err(ConnectionError::EdgeProtocol(
                        "only API Gateway's integration opens API Gateway's connections".into(),
                    ))
                }
            }) {
            Ok(record) => match self.shared.identities.verify(record, &opened.token).await {
                Ok(record) => record,
                Err(refusal) => {
                    tracing::warn!(edge_id = %link.edge_id, connection_id = %announced_id, ?refusal, "edge announced a connection whose token does not hold; refused");
                    let (code, reason) = refusal.close();
                    link.command_nowait(Command::Close(v1::CloseConnection {
                        connection_id: announced_id,
                        code,
                        reason,
                    }));
                    return;
                }
            },
            Err(error) => {
                tracing::warn!(edge_id = %link.edge_id, %error, "edge announced an invalid connection");
                // Answer at once, so the client is refused now rather
                // than when the edge's wait runs out.
                link.command_nowait(Command::Close(v1::CloseConnection {
                    connection_id: announced_id,
                    code: 1008,
                    reason: "identity not usable".into(),
                }));
                return;
            }
        };
        let connection_id = record.connection_id.clone();
        match self.held_elsewhere(&record, &link.holder()).await {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                tracing::warn!(edge_id = %link.edge_id, connection_id = %connection_id, "edge announced a connection id that another edge holds; refused");
                link.command_nowait(Command::Close(v1::CloseConnection {
                    connection_id: connection_id.into(),
                    code: 1008,
                    reason: "connection id in use".into(),
                }));
                return;
            }
        }
        let command = match self.shared.store.put_connection(record).await {
            Ok(()) => {
                metrics::counter!("streamer_connections_opened_total").increment(1);
                Command::Registered(v1::ConnectionRegistered {
                    connection_id: connection_id.into(),
                })
            }
            Err(error) => {
                tracing::error!(%error, connection_id = %connection_id, "cannot record connection");
                Command::Close(v1::CloseConnection {
                    connection_id: connection_id.into(),
                    code: 1011,
                    reason: "connection registry unavailable".into(),
                })
            }
        };
        link.command_nowait(command);
    }

    async fn edge_closed(&self, link: &EdgeLink, closed: v1::ConnectionClosed) {
        // Only the edge that holds a connection may remove it.
        let connection_id = ConnectionId::from(closed.connection_id);
        match self.shared.store.get_connection(&connection_id).await {
            Ok(Some(record)) if record.edge_id == link.holder() => {
                if let Err(error) = self.shared.store.delete_connection(&connection_id).await {
                    tracing::warn!(%error, connection_id = %connection_id, "cannot remove closed connection");
                }
                metrics::counter!("streamer_connections_closed_total").increment(1);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot read closed connection"),
        }
    }

    /// Delivers an answer API Gateway's integration could not write itself
    /// (it holds no socket) to one of API Gateway's connections.
    async fn edge_reply(&self, link: &EdgeLink, reply: v1::Reply) {
        let connection_id = ConnectionId::from(reply.connection_id);
        let record = match self.shared.store.get_connection(&connection_id).await {
            Ok(Some(record)) if link.apigateway && record.edge_id == link.holder() => record,
            Ok(_) => {
                tracing::warn!(edge_id = %link.edge_id, connection_id = %connection_id, "reply for a connection this edge does not speak for; dropped");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, connection_id = %connection_id, "cannot read the connection of a reply");
                return;
            }
        };
        if let Some(payload) = reply.payload {
            self.deliver(vec![record], payload, None).await;
        }
    }

    /// Makes the store agree with what an attaching edge holds (see the
    /// module doc); returns the connections whose tokens no longer hold, to
    /// be closed once the stream is open.
    async fn reconcile(
        &self,
        edge_id: &EdgeId,
        hello: v1::EdgeHello,
    ) -> Result<Vec<(ConnectionId, crate::identities::Refusal)>, Status> {
        let store = &self.shared.store;
        let now = now_ms();
        let taken_at = hello.taken_at.as_ref().map_or(now, timestamp_ms);
        let recorded: HashSet<ConnectionId> = store
            .connections_of_edge(edge_id)
            .await
            .map_err(ConnectionError::from)?
            .into_iter()
            .collect();
        let mut tokens = hello.tokens;
        let mut held = HashSet::new();
        let mut unknown = Vec::new();
        for connection in hello.connections {
            match connection_from_edge(connection, edge_id, now) {
                Ok(record) => {
                    held.insert(record.connection_id.clone());
                    if !recorded.contains(&record.connection_id) {
                        let token = tokens
                            .remove(record.connection_id.as_str())
                            .unwrap_or_default();
                        unknown.push((record, token));
                    }
                }
                Err(error) => tracing::warn!(%error, "edge re-announced an invalid connection"),
            }
        }
        // Without AuthService's word nothing is recorded, and the edge
        // attaches again later.
        let (verified, refused) =
            self.shared
                .identities
                .verify_all(unknown)
                .await
                .map_err(|refusal| {
                    Status::from(Failure::new(
                        tonic::Code::Unavailable,
                        Reason::DependencyUnavailable,
                        format!("cannot verify the connections this edge holds now: {refusal:?}"),
                    ))
                })?;
        let mut restored = 0;
        for record in verified {
            if self.held_elsewhere(&record, edge_id).await? {
                tracing::warn!(edge_id = edge_id.as_str(), connection_id = %record.connection_id, "edge re-announced another edge's connection; ignored");
                continue;
            }
            store
                .put_connection(record)
                .await
                .map_err(ConnectionError::from)?;
            restored += 1;
        }
        // Records of sockets that closed while the edge could not say so.
        let mut removed = 0;
        for id in recorded.difference(&held) {
            let stale = store
                .get_connection(id)
                .await
                .map_err(ConnectionError::from)?
                .is_some_and(|r| r.edge_id == *edge_id && r.connected_at_ms < taken_at);
            if stale {
                store
                    .delete_connection(id)
                    .await
                    .map_err(ConnectionError::from)?;
                removed += 1;
            }
        }
        tracing::info!(
            edge_id = edge_id.as_str(),
            held = held.len(),
            restored,
            removed,
            "edge attached"
        );
        Ok(refused)
    }
}

#[tonic::async_trait]
impl EdgeService for ConnectionServer {
    type AttachStream = BoxStream<v1::AttachResponse>;

    async fn attach(
        &self,
        request: Request<Streaming<AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        // A stopping replica takes no new edge (see `drain_on_shutdown`).
        if self.shared.shutdown.is_cancelled() {
            return Err(ConnectionError::ShuttingDown.into());
        }
        let caller = Caller::of(&request);
        let mut events = request.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), events.message()).await {
            Ok(Ok(Some(AttachRequest {
                event: Some(Event::Hello(hello)),
            }))) => hello,
            _ => {
                return Err(ConnectionError::EdgeProtocol(
                    "the first message of Attach must be `hello`".into(),
                )
                .into());
            }
        };
        let edge_id: EdgeId = required_id("hello.edge_id", hello.edge_id.clone())?;
        // API Gateway's connections are kept under a reserved edge id; an
        // edge attaching under it would have them all reconciled away.
        if edge_id.as_str() == APIGATEWAY_EDGE_ID {
            return Err(ConnectionError::invalid(
                "hello.edge_id",
                "is reserved for the connections AWS API Gateway holds",
            )
            .into());
        }
        // An authenticated edge speaks only as itself: its id is its
        // credential's name (or a name under it), so no other caller can
        // take its sockets over.
        if !caller.may_attach_as(&edge_id) {
            return Err(ConnectionError::PermissionDenied(format!(
                "this credential ({0}) may attach only as edge {0:?} or {0:?}/<name>, not {1:?}",
                caller.subject,
                edge_id.as_str()
            ))
            .into());
        }
        // The lease first: from here on no replica takes this edge for dead
        // and removes what the reconciliation is about to record.
        self.shared
            .store
            .heartbeat_edge(&edge_id, now_ms(), self.shared.config.edge_lease)
            .await
            .map_err(ConnectionError::from)?;
        let apigateway = hello.apigateway;
        if apigateway && self.shared.config.apigateway.is_none() {
            return Err(ConnectionError::EdgeProtocol(
                "this ConnectionService does not deliver through AWS API Gateway: start it with \
                 --apigateway to accept API Gateway's integration"
                    .into(),
            )
            .into());
        }
        let refused = self.reconcile(&edge_id, hello).await?;
        let (tx, rx) = mpsc::channel(EDGE_QUEUE);
        let link = self.shared.edges.attach(edge_id.clone(), apigateway, tx);
        for (connection_id, refusal) in refused {
            tracing::warn!(edge_id = %edge_id, connection_id = %connection_id, ?refusal, "edge re-announced a connection whose token does not hold; closing it");
            let (code, reason) = refusal.close();
            link.command_nowait(Command::Close(v1::CloseConnection {
                connection_id: connection_id.into(),
                code,
                reason,
            }));
        }
        tokio::spawn(self.clone().advertise_routes(link.clone()));
        tokio::spawn(self.clone().run_edge(link, events));
        let stream =
            ReceiverStream::new(rx).take_until(self.shared.drain.drained.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }
}
