//! The ConnectionService: domain logic first, then the thin tonic adapter.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde_json::Value;
use streamer_api::v1::{
    self, DeliveryOutcome, DeliveryResult, InboundMessage,
    connection_service_server::{ConnectionService, ConnectionServiceServer},
    edge_command::Command,
    edge_service_server::EdgeServiceServer,
    progress_service_client::ProgressServiceClient,
};
use streamer_core::shutdown::Shutdown;
use streamer_core::store::{ConnectionRecord, SharedStore, now_ms};
use streamer_core::trust::{AuthedChannel, Caller, Role, Trust};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::client_messages::{self, ClientErrorCode};
use crate::edges::EdgeRegistry;
use crate::error::ConnectionError;
use crate::identities::IdentityCheck;
use crate::model::{
    BroadcastCommand, BroadcastTarget, DisconnectCommand, ListQuery, SendCommand,
    connection_to_proto, optional_id, required_id,
};
use crate::routers::{RouteError, RouterTable};

/// Actions Streamer answers itself (`refresh` at the edge); no router may
/// claim them.
pub const BUILTIN_ACTIONS: &[&str] = &["get_request", "cancel_request", "refresh"];

/// A connection's expiry slides at most this often, so busy sockets do not
/// turn every message into a store write.
const TOUCH_INTERVAL_MS: u64 = 60_000;
/// Commands queued per edge stream before senders wait.
pub(crate) const EDGE_QUEUE: usize = 4096;
/// Frames queued per router stream before it counts as busy.
const ROUTER_QUEUE: usize = 1024;
/// How often expired connection records are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Inbound frames are handled by this many ordered workers, each owning the
/// connections that hash to it: frames of one connection keep their order,
/// and the number of frames in flight is bounded.
const INBOUND_WORKERS: usize = 64;
/// Frames queued per worker before a client is told to slow down.
const INBOUND_QUEUE: usize = 256;
/// How long a call to ProgressService may take.
const PROGRESS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// ProgressService, for async actions and the built-in request actions.
    /// None: only routers handle frames.
    pub progress_endpoint: Option<String>,
    /// How long to wait for an edge to report a delivery.
    pub delivery_timeout: Duration,
    /// Every recorded connection is stale at start (true when the only edge
    /// runs in this same process, as in `streamer all`). Otherwise records
    /// of edges that do not re-attach within their lease are removed.
    pub connections_stale_at_start: bool,
    /// How long an edge counts as alive after a replica last heard from it
    /// (see [`crate::edge_stream`]). A stream reset (a proxy, a rollout)
    /// shorter than this loses none of the edge's connections; an edge gone
    /// for longer has them removed.
    pub edge_lease: Duration,
    /// Who may call this service, and how it presents itself to
    /// ProgressService and AuthService.
    pub trust: Trust,
    /// AuthService, which verifies again the token of every connection an
    /// edge announces (see [`crate::identities`]); not needed in trust mode
    /// none.
    pub auth_endpoint: Option<String>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            progress_endpoint: Some("http://127.0.0.1:50053".into()),
            delivery_timeout: Duration::from_secs(5),
            connections_stale_at_start: false,
            edge_lease: Duration::from_secs(30),
            trust: Trust::none(),
            auth_endpoint: Some("http://127.0.0.1:50051".into()),
        }
    }
}

/// A cheap-to-clone handle to the service.
#[derive(Clone)]
pub struct ConnectionServer {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) store: SharedStore,
    inbound: Vec<mpsc::Sender<Inbound>>,
    pub(crate) edges: EdgeRegistry,
    pub(crate) routers: RouterTable,
    progress: Option<ProgressServiceClient<AuthedChannel>>,
    pub(crate) identities: IdentityCheck,
    pub(crate) config: ConnectionConfig,
    pub(crate) shutdown: Shutdown,
}

/// A frame on its way to an inbound worker, with the edge it came from.
struct Inbound {
    edge_id: String,
    frame: v1::InboundFrame,
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl ConnectionServer {
    /// Builds the service, settles the edges a previous run left (see
    /// [`ConnectionConfig::connections_stale_at_start`]) and starts its
    /// sweepers (which end with `shutdown`). The ProgressService channel
    /// connects lazily.
    pub async fn start(
        store: SharedStore,
        config: ConnectionConfig,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        let server = Self::new(store, config, shutdown)?;
        server.adopt_edges().await?;
        Ok(server)
    }

    /// Builds the service and starts its expiry sweeper (which ends with
    /// `shutdown`). The ProgressService channel connects lazily.
    pub fn new(
        store: SharedStore,
        config: ConnectionConfig,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        let progress = match &config.progress_endpoint {
            Some(url) => {
                let endpoint = streamer_core::grpc::endpoint(url, &config.trust)?
                    .connect_timeout(Duration::from_secs(3))
                    .timeout(PROGRESS_CALL_TIMEOUT);
                Some(ProgressServiceClient::with_interceptor(
                    streamer_core::grpc::channel(&endpoint, &config.trust),
                    config
                        .trust
                        .credentials("connection-service", &[Role::Backend]),
                ))
            }
            None => None,
        };
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..INBOUND_WORKERS)
            .map(|_| mpsc::channel(INBOUND_QUEUE))
            .unzip();
        let server = Self {
            shared: Arc::new(Shared {
                store,
                inbound: senders,
                edges: EdgeRegistry::default(),
                routers: RouterTable::default(),
                progress,
                identities: IdentityCheck::new(&config)?,
                config,
                shutdown,
            }),
        };
        tokio::spawn(server.clone().sweep_expired());
        tokio::spawn(server.clone().keep_edge_leases());
        for receiver in receivers {
            tokio::spawn(server.clone().inbound_worker(receiver));
        }
        Ok(server)
    }

    pub fn into_service(self) -> ConnectionServiceServer<Self> {
        ConnectionServiceServer::new(self)
    }

    /// The internal edge stream, served on a listener of its own.
    pub fn into_edge_service(self) -> EdgeServiceServer<Self> {
        EdgeServiceServer::new(self)
    }

    /// Handles one shard's frames, one at a time, in arrival order.
    async fn inbound_worker(self, mut frames: mpsc::Receiver<Inbound>) {
        loop {
            let next = tokio::select! {
                next = frames.recv() => next,
                () = self.shared.shutdown.cancelled() => return,
            };
            let Some(Inbound { edge_id, frame }) = next else {
                return;
            };
            self.inbound(&edge_id, frame).await;
        }
    }

    /// Queues a frame on its connection's worker without waiting; a full
    /// worker answers the client RATE_LIMITED instead of stalling the edge.
    pub(crate) fn enqueue_frame(&self, edge_id: &str, frame: v1::InboundFrame) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        frame.connection_id.hash(&mut hasher);
        let shard = (hasher.finish() as usize) % self.shared.inbound.len();
        let inbound = Inbound {
            edge_id: edge_id.to_owned(),
            frame,
        };
        if let Err(mpsc::error::TrySendError::Full(Inbound { frame, .. })) =
            self.shared.inbound[shard].try_send(inbound)
        {
            metrics::counter!("streamer_inbound_rejected_total", "reason" => "overloaded")
                .increment(1);
            let this = self.clone();
            tokio::spawn(async move {
                let message = client_messages::error(
                    &frame.request_id,
                    ClientErrorCode::RateLimited,
                    "too many frames in flight; try again",
                );
                this.reply(&frame.connection_id, message).await;
            });
        }
    }

    async fn sweep_expired(self) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shared.shutdown.cancelled() => return,
            }
            match self.shared.store.sweep_connections(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "swept expired connections"),
                Err(error) => tracing::warn!(%error, "connection sweep failed"),
            }
        }
    }

    /// A live record, scoped to `tenant` when given and always to the
    /// tenants `caller` may reach. One outside that scope is NOT_FOUND, so
    /// a caller learns nothing of other tenants' connections.
    async fn find(
        &self,
        connection_id: &str,
        tenant: Option<&str>,
        caller: &Caller,
    ) -> Result<ConnectionRecord, ConnectionError> {
        self.shared
            .store
            .get_connection(connection_id)
            .await?
            .filter(|r| tenant.is_none_or(|t| t == r.tenant_id) && caller.reaches(&r.tenant_id))
            .ok_or_else(|| ConnectionError::NotFound(connection_id.to_owned()))
    }

    /// A whole tenant (or one of its users) is addressed: the caller must
    /// be allowed to reach it.
    fn check_reach(caller: &Caller, tenant_id: &str) -> Result<(), ConnectionError> {
        if caller.reaches(tenant_id) {
            Ok(())
        } else {
            Err(ConnectionError::PermissionDenied(format!(
                "this credential ({}) may not reach tenant {tenant_id:?}",
                caller.subject
            )))
        }
    }

    /// Delivers one payload to these connections, one command per edge, and
    /// returns an outcome per connection. Records whose socket the edge
    /// says it does not hold are removed (GONE); an edge that is detached
    /// or did not answer in time leaves its records alone (UNAVAILABLE).
    async fn deliver(
        &self,
        records: Vec<ConnectionRecord>,
        payload: v1::Payload,
        sequence: Option<v1::Sequence>,
    ) -> Vec<DeliveryResult> {
        let now = now_ms();
        let mut by_edge: HashMap<String, Vec<ConnectionRecord>> = HashMap::new();
        for record in records {
            by_edge
                .entry(record.edge_id.clone())
                .or_default()
                .push(record);
        }
        let deliveries = by_edge.into_iter().map(|(edge_id, records)| {
            let payload = payload.clone();
            let sequence = sequence.clone();
            async move {
                let ids: Vec<String> = records.iter().map(|r| r.connection_id.clone()).collect();
                let results = match self.shared.edges.get(&edge_id) {
                    Some(link) => {
                        link.deliver(ids, payload, sequence, self.shared.config.delivery_timeout)
                            .await
                    }
                    // Detached, perhaps only for a moment (see EDGE_GRACE):
                    // the records stay.
                    None => ids
                        .into_iter()
                        .map(|connection_id| DeliveryResult {
                            connection_id,
                            outcome: DeliveryOutcome::Unavailable as i32,
                        })
                        .collect(),
                };
                (records, results)
            }
        });
        let mut all = Vec::new();
        for (records, mut results) in futures::future::join_all(deliveries).await {
            let last_seen: HashMap<&str, u64> = records
                .iter()
                .map(|r| (r.connection_id.as_str(), r.last_seen_ms))
                .collect();
            for result in &mut results {
                match DeliveryOutcome::try_from(result.outcome).unwrap_or_default() {
                    // The edge itself says the socket is not there.
                    DeliveryOutcome::NotFound | DeliveryOutcome::Gone => {
                        if let Err(error) = self
                            .shared
                            .store
                            .delete_connection(&result.connection_id)
                            .await
                        {
                            tracing::warn!(%error, connection_id = %result.connection_id, "cannot remove stale connection");
                        }
                        result.outcome = DeliveryOutcome::Gone as i32;
                    }
                    DeliveryOutcome::Delivered => {
                        let seen = last_seen.get(result.connection_id.as_str()).copied();
                        if seen.is_some_and(|s| now.saturating_sub(s) > TOUCH_INTERVAL_MS) {
                            let _ = self
                                .shared
                                .store
                                .touch_connection(&result.connection_id, now)
                                .await;
                        }
                    }
                    _ => {}
                }
                let outcome = DeliveryOutcome::try_from(result.outcome).unwrap_or_default();
                metrics::counter!("streamer_deliveries_total", "outcome" => outcome.as_str_name())
                    .increment(1);
            }
            all.extend(results);
        }
        all
    }

    async fn send(
        &self,
        cmd: SendCommand,
        caller: &Caller,
    ) -> Result<DeliveryOutcome, ConnectionError> {
        let record = self
            .find(&cmd.connection_id, cmd.tenant_id.as_deref(), caller)
            .await?;
        let results = self.deliver(vec![record], cmd.payload, cmd.sequence).await;
        Ok(results
            .first()
            .and_then(|r| DeliveryOutcome::try_from(r.outcome).ok())
            .unwrap_or(DeliveryOutcome::Unavailable))
    }

    async fn all_connections(
        &self,
        tenant: &str,
        user: Option<&str>,
    ) -> Result<Vec<ConnectionRecord>, ConnectionError> {
        const PAGE: usize = 1000;
        let mut out: Vec<ConnectionRecord> = Vec::new();
        loop {
            let after = out.last().map(|r| r.connection_id.clone());
            let page = self
                .shared
                .store
                .list_connections(tenant, user, after.as_deref(), PAGE)
                .await?;
            let done = page.len() < PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    async fn broadcast(
        &self,
        cmd: BroadcastCommand,
        caller: &Caller,
    ) -> Result<Vec<DeliveryResult>, ConnectionError> {
        let (records, mut missing) = match cmd.target {
            BroadcastTarget::Connections(ids) => {
                let mut records = Vec::with_capacity(ids.len());
                let mut missing = Vec::new();
                for id in ids {
                    match self.find(&id, cmd.tenant_id.as_deref(), caller).await {
                        Ok(record) => records.push(record),
                        Err(ConnectionError::NotFound(_)) => missing.push(DeliveryResult {
                            connection_id: id,
                            outcome: DeliveryOutcome::NotFound as i32,
                        }),
                        Err(other) => return Err(other),
                    }
                }
                (records, missing)
            }
            BroadcastTarget::User { tenant_id, user_id } => {
                Self::check_reach(caller, &tenant_id)?;
                (
                    self.all_connections(&tenant_id, Some(&user_id)).await?,
                    Vec::new(),
                )
            }
            BroadcastTarget::Tenant(tenant_id) => {
                Self::check_reach(caller, &tenant_id)?;
                (self.all_connections(&tenant_id, None).await?, Vec::new())
            }
        };
        let mut results = self.deliver(records, cmd.payload, None).await;
        results.append(&mut missing);
        Ok(results)
    }

    async fn disconnect(
        &self,
        cmd: DisconnectCommand,
        caller: &Caller,
    ) -> Result<(), ConnectionError> {
        let record = self
            .find(&cmd.connection_id, cmd.tenant_id.as_deref(), caller)
            .await?;
        if let Some(link) = self.shared.edges.get(&record.edge_id) {
            link.command(Command::Close(v1::CloseConnection {
                connection_id: record.connection_id.clone(),
                code: 1000,
                reason: cmd.reason,
            }))
            .await;
        }
        self.shared
            .store
            .delete_connection(&record.connection_id)
            .await?;
        tracing::info!(connection_id = %record.connection_id, "connection disconnected by request");
        Ok(())
    }

    /// Writes a JSON message to one client, best effort (used for answers to
    /// frames; a client that left meanwhile simply misses it).
    async fn reply(&self, connection_id: &str, message: Value) {
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

    /// Routes one client frame: built-in actions, then routers, then the
    /// async request queue; anything else is INVALID_ACTION.
    async fn inbound(&self, edge_id: &str, frame: v1::InboundFrame) {
        let record = match self
            .find(&frame.connection_id, None, Caller::everyone())
            .await
        {
            // Only the edge holding a socket speaks for it.
            Ok(record) if record.edge_id == edge_id => record,
            Ok(_) => {
                tracing::warn!(edge_id, connection_id = %frame.connection_id, "frame from an edge that does not hold the connection; dropped");
                return;
            }
            Err(_) => return, // closed meanwhile
        };
        let now = now_ms();
        if now.saturating_sub(record.last_seen_ms) > TOUCH_INTERVAL_MS {
            let _ = self
                .shared
                .store
                .touch_connection(&record.connection_id, now)
                .await;
        }
        metrics::counter!("streamer_inbound_frames_total").increment(1);
        let request_id = frame.request_id.clone();
        let answer = match frame.action.as_str() {
            "get_request" | "cancel_request" => self.request_action(&record, frame).await,
            _ => self.route(&record, frame).await,
        };
        if let Some(message) = answer {
            self.reply(&record.connection_id, message).await;
        } else {
            tracing::trace!(request_id = %request_id, "frame routed");
        }
    }

    async fn route(&self, record: &ConnectionRecord, frame: v1::InboundFrame) -> Option<Value> {
        let request_id = frame.request_id.clone();
        let action = frame.action.clone();
        let message = InboundMessage {
            connection_id: record.connection_id.clone(),
            identity: Some(v1::Identity {
                user_id: record.user_id.clone(),
                tenant_id: record.tenant_id.clone(),
                permissions: record.permissions.clone(),
            }),
            action: frame.action,
            request_id: frame.request_id,
            payload: frame.payload,
            metadata: frame.metadata,
            received_at: frame.received_at,
        };
        let message = match self.shared.routers.dispatch(message) {
            Ok(_) => return None,
            Err((RouteError::Busy, _)) => {
                metrics::counter!("streamer_inbound_rejected_total", "reason" => "busy")
                    .increment(1);
                return Some(client_messages::error(
                    &request_id,
                    ClientErrorCode::RateLimited,
                    format!("every router for action {action:?} is busy; try again"),
                ));
            }
            Err((RouteError::NoRouter, message)) => message,
        };
        let invalid = || {
            client_messages::error(
                &request_id,
                ClientErrorCode::InvalidAction,
                format!("no handler for action {action:?}"),
            )
        };
        let Some(mut progress) = self.shared.progress.clone() else {
            return Some(invalid());
        };
        let submitted = progress
            .submit(v1::SubmitRequest {
                connection_id: message.connection_id,
                action: message.action,
                request_id: message.request_id,
                payload: message.payload,
                metadata: message.metadata,
            })
            .await;
        match submitted {
            // ProgressService acknowledges to the client itself, so the
            // acknowledgment is ordered before the request's progress.
            Ok(_) => None,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Some(invalid()),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                Some(client_messages::error(
                    &request_id,
                    ClientErrorCode::Validation,
                    status.message().to_owned(),
                ))
            }
            Err(status) => {
                tracing::warn!(error = %status, action = %action, "submit failed");
                Some(client_messages::error(
                    &request_id,
                    ClientErrorCode::Internal,
                    "the request could not be queued; try again",
                ))
            }
        }
    }

    /// `get_request` and `cancel_request`, with `{"request_id": ...}` as
    /// payload, always scoped to the connection's own user.
    async fn request_action(
        &self,
        record: &ConnectionRecord,
        frame: v1::InboundFrame,
    ) -> Option<Value> {
        let id = frame.request_id.as_str();
        let payload = frame.payload.map(streamer_api::json::from_proto);
        let Some(target) = payload
            .as_ref()
            .and_then(|p| p.get("request_id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        else {
            return Some(client_messages::error(
                id,
                ClientErrorCode::Validation,
                "payload.request_id is required",
            ));
        };
        let Some(mut progress) = self.shared.progress.clone() else {
            return Some(client_messages::error(
                id,
                ClientErrorCode::InvalidAction,
                "requests are not enabled on this deployment",
            ));
        };
        let owner = v1::Identity {
            user_id: record.user_id.clone(),
            tenant_id: record.tenant_id.clone(),
            permissions: Vec::new(),
        };
        let get = v1::GetRequest {
            selector: Some(v1::get_request::Selector::Client(v1::ClientRequestRef {
                tenant_id: record.tenant_id.clone(),
                user_id: record.user_id.clone(),
                request_id: target.to_owned(),
            })),
            owner: Some(owner.clone()),
            // A client asking about its request wants its updates here.
            deliver_to_connection_id: if frame.action == "get_request" {
                record.connection_id.clone()
            } else {
                String::new()
            },
        };
        let result = match progress.get(get).await {
            Ok(found) if frame.action == "cancel_request" => progress
                .cancel(v1::CancelRequest {
                    id: found.into_inner().id,
                    reason: "cancelled by the client".into(),
                    owner: Some(owner),
                })
                .await
                .map(Response::into_inner),
            other => other.map(Response::into_inner),
        };
        Some(match result {
            Ok(request) => client_messages::response(id, client_messages::request_state(request)),
            Err(status) => {
                let code = match status.code() {
                    tonic::Code::NotFound => ClientErrorCode::NotFound,
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                        ClientErrorCode::Validation
                    }
                    _ => ClientErrorCode::Internal,
                };
                client_messages::error(id, code, status.message().to_owned())
            }
        })
    }
}

fn counts(results: &[DeliveryResult]) -> v1::BroadcastResponse {
    let mut response = v1::BroadcastResponse::default();
    for r in results {
        match DeliveryOutcome::try_from(r.outcome).unwrap_or_default() {
            DeliveryOutcome::Delivered => response.delivered += 1,
            DeliveryOutcome::NotFound => response.not_found += 1,
            DeliveryOutcome::Gone => response.gone += 1,
            DeliveryOutcome::Throttled => response.throttled += 1,
            DeliveryOutcome::Unavailable => response.unavailable += 1,
            DeliveryOutcome::Unspecified => {}
        }
    }
    response.results = results.to_vec();
    response
}

#[tonic::async_trait]
impl ConnectionService for ConnectionServer {
    async fn send(
        &self,
        request: Request<v1::SendRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let caller = Caller::of(&request);
        let outcome = self.send(request.into_inner().try_into()?, &caller).await?;
        Ok(Response::new(v1::SendResponse {
            outcome: outcome as i32,
        }))
    }

    async fn broadcast(
        &self,
        request: Request<v1::BroadcastRequest>,
    ) -> Result<Response<v1::BroadcastResponse>, Status> {
        let caller = Caller::of(&request);
        let results = self
            .broadcast(request.into_inner().try_into()?, &caller)
            .await?;
        Ok(Response::new(counts(&results)))
    }

    async fn is_active(
        &self,
        request: Request<v1::IsActiveRequest>,
    ) -> Result<Response<v1::IsActiveResponse>, Status> {
        let caller = Caller::of(&request);
        let id = required_id("connection_id", request.into_inner().connection_id)?;
        let active = match self.find(&id, None, &caller).await {
            Ok(record) => self.shared.edges.get(&record.edge_id).is_some(),
            Err(ConnectionError::NotFound(_)) => false,
            Err(error) => return Err(error.into()),
        };
        Ok(Response::new(v1::IsActiveResponse { active }))
    }

    async fn get_connection(
        &self,
        request: Request<v1::GetConnectionRequest>,
    ) -> Result<Response<v1::Connection>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let id = required_id("connection_id", r.connection_id)?;
        let tenant = optional_id("tenant_id", r.tenant_id)?;
        let record = self.find(&id, tenant.as_deref(), &caller).await?;
        Ok(Response::new(connection_to_proto(record)))
    }

    async fn list_connections(
        &self,
        request: Request<v1::ListConnectionsRequest>,
    ) -> Result<Response<v1::ListConnectionsResponse>, Status> {
        let caller = Caller::of(&request);
        let query: ListQuery = request.into_inner().try_into()?;
        Self::check_reach(&caller, &query.tenant_id)?;
        let mut records = self
            .shared
            .store
            .list_connections(
                &query.tenant_id,
                query.user_id.as_deref(),
                query.after.as_deref(),
                query.page_size + 1,
            )
            .await
            .map_err(ConnectionError::from)?;
        let next_page_token = if records.len() > query.page_size {
            records.truncate(query.page_size);
            records
                .last()
                .map(|r| r.connection_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListConnectionsResponse {
            connections: records.into_iter().map(connection_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn disconnect(
        &self,
        request: Request<v1::DisconnectRequest>,
    ) -> Result<Response<v1::DisconnectResponse>, Status> {
        let caller = Caller::of(&request);
        self.disconnect(request.into_inner().try_into()?, &caller)
            .await?;
        Ok(Response::new(v1::DisconnectResponse {}))
    }

    type ReceiveStream = BoxStream<InboundMessage>;

    async fn receive(
        &self,
        request: Request<v1::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        if r.actions.is_empty() {
            return Err(ConnectionError::invalid("actions", "declare at least one action").into());
        }
        let mut actions = Vec::with_capacity(r.actions.len());
        for action in r.actions {
            let action = required_id("actions", action)?;
            if BUILTIN_ACTIONS.contains(&action.as_str()) {
                return Err(ConnectionError::invalid(
                    "actions",
                    format!("{action:?} is answered by Streamer itself"),
                )
                .into());
            }
            actions.push(action);
        }
        let router_id = optional_id("router_id", r.router_id)?.unwrap_or_else(|| "router".into());
        let (tx, rx) = mpsc::channel(ROUTER_QUEUE);
        let key = self
            .shared
            .routers
            .register(&router_id, &actions, caller.tenants.clone(), tx);
        tracing::info!(router_id = %router_id, actions = ?actions, tenants = ?caller.tenants, "router attached");

        // Unregisters the router when its stream is dropped, whatever ends it.
        struct Unregister(Arc<Shared>, u64, String);
        impl Drop for Unregister {
            fn drop(&mut self) {
                self.0.routers.unregister(self.1);
                tracing::info!(router_id = %self.2, "router detached");
            }
        }
        let guard = Unregister(self.shared.clone(), key, router_id);
        let stream = ReceiverStream::new(rx)
            .take_until(self.shared.shutdown.clone().cancelled_owned())
            .map(move |item| {
                let _keep = &guard;
                item
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
