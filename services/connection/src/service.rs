//! The ConnectionService's configuration, its shared state and how it
//! starts; the domain code lives in [`crate::registry`],
//! [`crate::delivery`], [`crate::inbound`] and [`crate::edge_stream`], the
//! tonic adapter in [`crate::grpc`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use streamer_api::v1::{
    self, connection_service_server::ConnectionServiceServer,
    edge_service_server::EdgeServiceServer, progress_service_client::ProgressServiceClient,
};
use streamer_core::grpc::Balanced;
use streamer_core::ids::EdgeId;
use streamer_core::shutdown::Shutdown;
use streamer_core::store::SharedStore;
use streamer_core::trust::{AuthedChannel, Role, Trust};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::apigateway::{ApiGatewayConfig, ApiGatewayDelivery, CompositeDelivery};
use crate::delivery::{Delivery, EdgeDelivery};
use crate::edges::EdgeRegistry;
use crate::identities::IdentityCheck;
use crate::routers::RouterTable;
use crate::topics::{TOPIC_LOCKS, TopicsConfig};

/// Actions Streamer answers itself (`refresh` at the edge); no router may
/// claim them.
pub const BUILTIN_ACTIONS: &[&str] = &[
    "get_request",
    "cancel_request",
    "refresh",
    "subscribe",
    "unsubscribe",
];

/// A connection's expiry slides at most this often, so busy sockets do not
/// turn every message into a store write.
pub(crate) const TOUCH_INTERVAL_MS: u64 = 60_000;
/// Commands queued per edge stream before senders wait.
pub(crate) const EDGE_QUEUE: usize = 4096;
/// Frames queued per router stream before it counts as busy.
pub(crate) const ROUTER_QUEUE: usize = 1024;
/// How often expired connection records are swept.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Inbound frames are handled by this many ordered workers, each owning the
/// connections that hash to it: frames of one connection keep their order,
/// and the number of frames in flight is bounded.
pub(crate) const INBOUND_WORKERS: usize = 64;
/// Frames queued per worker before a client is told to slow down.
pub(crate) const INBOUND_QUEUE: usize = 256;
/// How long a call to ProgressService may take.
pub(crate) const PROGRESS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// ProgressService, for async actions and the built-in request actions:
    /// one URL, a DNS name that resolves to every replica, or a
    /// comma-separated list of URLs. None: only routers handle frames.
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
    /// Topic history, the topics clients may subscribe themselves to, and
    /// which topics conflate.
    pub topics: TopicsConfig,
    /// Connections held by AWS API Gateway are delivered to through its
    /// management API (see [`crate::apigateway`]); none: only edges'.
    pub apigateway: Option<ApiGatewayConfig>,
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
            topics: TopicsConfig::default(),
            apigateway: None,
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
    pub(crate) inbound: Vec<mpsc::Sender<Inbound>>,
    pub(crate) edges: Arc<EdgeRegistry>,
    /// How payloads reach sockets.
    pub(crate) delivery: Arc<dyn Delivery>,
    pub(crate) routers: RouterTable,
    /// Every ProgressService replica, called in turn.
    pub(crate) progress: Option<ProgressReplicas>,
    pub(crate) identities: IdentityCheck,
    pub(crate) config: ConnectionConfig,
    pub(crate) shutdown: Shutdown,
    pub(crate) drain: Drain,
    /// Order the publishes to each topic (see [`crate::topics`]).
    pub(crate) topic_locks: Vec<tokio::sync::Mutex<()>>,
}

/// How a replica stops without dropping a frame an edge handed it (see
/// [`ConnectionServer::drain_on_shutdown`]).
pub(crate) struct Drain {
    /// One token per edge stream that may still send frames.
    pub(crate) intake: TaskTracker,
    /// The inbound workers.
    pub(crate) workers: TaskTracker,
    /// Cancelled once no frame can arrive any more.
    pub(crate) quiet: CancellationToken,
    /// Cancelled once every frame received is handled: the edge and router
    /// streams end then.
    pub(crate) drained: CancellationToken,
}

/// How long a stopping replica waits for its edges to confirm that they
/// send it nothing more.
const INTAKE_GRACE: Duration = Duration::from_secs(2);
/// How long it then gives its workers to handle the frames already queued;
/// with the grace, within the servers' own drain
/// ([`streamer_core::grpc::DRAIN_TIMEOUT`]).
const FRAME_DRAIN: Duration = Duration::from_secs(7);

/// A client per ProgressService replica, taken in turn.
pub(crate) type ProgressReplicas = Arc<Balanced<ProgressServiceClient<AuthedChannel>>>;

/// Follows every ProgressService replica `list` names (see
/// [`ConnectionConfig::progress_endpoint`]) until `shutdown`.
async fn progress_replicas(
    list: &str,
    trust: &Trust,
    shutdown: &Shutdown,
) -> anyhow::Result<ProgressReplicas> {
    let credentials = trust.credentials("connection-service", &[Role::Backend]);
    Balanced::follow_list(
        list,
        trust,
        (Duration::from_secs(3), Some(PROGRESS_CALL_TIMEOUT)),
        move |channel| ProgressServiceClient::with_interceptor(channel, credentials.clone()),
        shutdown.clone(),
    )
    .await
}

/// A frame on its way to an inbound worker, with the edge it came from.
pub(crate) struct Inbound {
    pub(crate) edge_id: EdgeId,
    pub(crate) frame: v1::InboundFrame,
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
        let server = Self::new(store, config, shutdown).await?;
        server.adopt_edges().await?;
        Ok(server)
    }

    /// Builds the service and starts its expiry sweeper (which ends with
    /// `shutdown`). ProgressService's replicas are followed from here on,
    /// their channels connecting lazily.
    pub async fn new(
        store: SharedStore,
        config: ConnectionConfig,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        let progress = match &config.progress_endpoint {
            Some(list) => Some(progress_replicas(list, &config.trust, &shutdown).await?),
            None => None,
        };
        let edges = Arc::new(EdgeRegistry::default());
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..INBOUND_WORKERS)
            .map(|_| mpsc::channel(INBOUND_QUEUE))
            .unzip();
        let by_edge = EdgeDelivery::new(edges.clone(), config.delivery_timeout);
        let delivery: Arc<dyn Delivery> = match &config.apigateway {
            Some(apigateway) => Arc::new(CompositeDelivery::new(
                by_edge,
                ApiGatewayDelivery::new(apigateway.clone(), store.clone()),
            )),
            None => Arc::new(by_edge),
        };
        let server = Self {
            shared: Arc::new(Shared {
                store,
                inbound: senders,
                edges,
                delivery,
                routers: RouterTable::default(),
                progress,
                identities: IdentityCheck::new(&config, &shutdown).await?,
                config,
                shutdown,
                drain: Drain {
                    intake: TaskTracker::new(),
                    workers: TaskTracker::new(),
                    quiet: CancellationToken::new(),
                    drained: CancellationToken::new(),
                },
                topic_locks: (0..TOPIC_LOCKS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
            }),
        };
        tokio::spawn(server.clone().sweep_expired());
        tokio::spawn(server.clone().keep_edge_leases());
        for receiver in receivers {
            server
                .shared
                .drain
                .workers
                .spawn(server.clone().inbound_worker(receiver));
        }
        tokio::spawn(server.clone().drain_on_shutdown());
        Ok(server)
    }

    /// At shutdown, hands every frame an edge already sent this replica to
    /// its handler before the replica lets go of the edges:
    /// 1. each edge stream tells its edge to send nothing more here
    ///    (`drain`), while it keeps carrying out this replica's commands;
    ///    the edge moves its connections' events to the other replicas and
    ///    answers `drained` after the last frame it sent here;
    /// 2. once every edge answered (or [`INTAKE_GRACE`] passed), the
    ///    workers handle what is queued and end (within [`FRAME_DRAIN`]);
    /// 3. then the edge and router streams end.
    async fn drain_on_shutdown(self) {
        let drain = &self.shared.drain;
        self.shared.shutdown.cancelled().await;
        drain.intake.close();
        if tokio::time::timeout(INTAKE_GRACE, drain.intake.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                edges = drain.intake.len(),
                "edges did not confirm the drain in time"
            );
        }
        drain.quiet.cancel();
        drain.workers.close();
        if tokio::time::timeout(FRAME_DRAIN, drain.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("queued frames not all handled before the replica stopped");
        }
        drain.drained.cancel();
    }

    /// Resolves once the replica has stopped and handled every frame it
    /// was handed (see [`Self::drain_on_shutdown`]).
    pub async fn drained(&self) {
        self.shared.drain.drained.cancelled().await;
    }

    pub fn into_service(self) -> ConnectionServiceServer<Self> {
        ConnectionServiceServer::new(self)
    }

    /// The internal edge stream, served on a listener of its own.
    pub fn into_edge_service(self) -> EdgeServiceServer<Self> {
        EdgeServiceServer::new(self)
    }
}
