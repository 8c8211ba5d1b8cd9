//! The `streamer` binary's library half: how the roles are put together.
//!
//! Each role (`auth`, `connection`, `progress`, `gateway`) is a function that
//! serves one already-bound listener until a shutdown token is cancelled;
//! [`start_system`] runs all four in one process on one embedded store, the
//! way `streamer all` does. Tests and benches call the same functions with
//! listeners bound to `127.0.0.1:0`, so nothing races for a port.
//!
//! The command line itself (flags, `STREAMER_*` variables, the banner) lives
//! in [`cli`].

#![forbid(unsafe_code)]

pub mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use streamer_api::service_names;
use streamer_auth::{AuthConfig, AuthServer, TokenValidator};
use streamer_connection::{ConnectionConfig, ConnectionServer};
use streamer_core::grpc::Health;
use streamer_core::metrics::Role;
use streamer_core::shutdown::Shutdown;
use streamer_core::store::{DynamoConfig, DynamoStore, EmbeddedStore, Instrumented, SharedStore};
use streamer_core::trust::Trust;
use streamer_gateway::GatewayConfig;
use streamer_progress::{ProgressConfig, ProgressServer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Serves AuthService until `shutdown`, to the callers `trust` admits; the
/// deny-list of revoked tokens lives in `store`.
pub async fn run_auth(
    listener: TcpListener,
    store: SharedStore,
    config: AuthConfig,
    trust: Trust,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let validator = TokenValidator::new(config).context("cannot load the token keys")?;
    serve_auth(listener, store, validator, trust, shutdown).await
}

/// Serves AuthService with keys already loaded. Its background work (JWKS
/// refreshes, the sweep of expired revocations) runs exactly as long as it
/// serves.
async fn serve_auth(
    listener: TcpListener,
    store: SharedStore,
    validator: TokenValidator,
    trust: Trust,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    streamer_core::metrics::register(&[Role::Auth]);
    let server = AuthServer::new(validator, store.clone());
    let routes = tonic::service::Routes::new(server.clone().into_service());
    // Stopped when serving ends, also when it fails before any shutdown.
    let background = shutdown.child_token();
    let serving = async {
        let served = streamer_core::grpc::serve(
            listener,
            routes,
            &[service_names::AUTH],
            trust,
            Health::of_store(store),
            shutdown,
        )
        .await;
        background.cancel();
        served
    };
    let (served, ()) = tokio::join!(serving, server.maintain(background.clone()));
    served
}

/// Serves ConnectionService until `shutdown`: the public API on `listener`,
/// the internal edge stream (`EdgeService`) on `edge_listener`.
pub async fn run_connection(
    listener: TcpListener,
    edge_listener: TcpListener,
    store: SharedStore,
    config: ConnectionConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    streamer_core::metrics::register(&[Role::Connection]);
    let trust = config.trust.clone();
    let server = ConnectionServer::start(store.clone(), config, shutdown.clone()).await?;
    let public = streamer_core::grpc::serve(
        listener,
        tonic::service::Routes::new(server.clone().into_service()),
        &[service_names::CONNECTION],
        trust.clone(),
        Health::of_store(store.clone()),
        shutdown.clone(),
    );
    let internal = streamer_core::grpc::serve(
        edge_listener,
        tonic::service::Routes::new(server.clone().into_edge_service()),
        &[service_names::EDGE],
        trust,
        Health::of_store(store),
        shutdown,
    );
    tokio::try_join!(public, internal)?;
    // The frames edges handed over before the stop are handled (the
    // servers' drain already gave it the time).
    if tokio::time::timeout(std::time::Duration::from_secs(1), server.drained())
        .await
        .is_err()
    {
        tracing::warn!("connection service stopped before handling every frame it was handed");
    }
    Ok(())
}

/// Serves ProgressService until `shutdown`.
pub async fn run_progress(
    listener: TcpListener,
    store: SharedStore,
    config: ProgressConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    streamer_core::metrics::register(&[Role::Progress]);
    let trust = config.trust.clone();
    let server = ProgressServer::start(store.clone(), config, shutdown.clone()).await?;
    let routes = tonic::service::Routes::new(server.clone().into_service());
    let served = streamer_core::grpc::serve(
        listener,
        routes,
        &[service_names::PROGRESS],
        trust,
        Health::of_store(store),
        shutdown,
    )
    .await;
    // Outboxes and requeues finish their writes before the store is flushed.
    if tokio::time::timeout(streamer_core::grpc::DRAIN_TIMEOUT, server.stopped())
        .await
        .is_err()
    {
        tracing::warn!("progress tasks still running after the drain timeout");
    }
    served
}

/// Serves the WebSocket edge until `shutdown`.
pub async fn run_gateway(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    streamer_core::metrics::register(&[Role::Gateway]);
    streamer_gateway::serve(listener, config, shutdown).await
}

/// Opens the embedded store in `dir`, its operations measured.
pub fn open_embedded_store(dir: &std::path::Path) -> anyhow::Result<SharedStore> {
    let store = EmbeddedStore::open(dir)
        .with_context(|| format!("cannot open the embedded store in {}", dir.display()))?;
    Ok(Arc::new(Instrumented::new(store, "embedded")))
}

/// Which store a process keeps its state in.
#[derive(Clone, Default)]
pub enum StoreChoice {
    /// A redb file in the data directory: one process owns it.
    #[default]
    Embedded,
    /// DynamoDB tables, shared by every replica.
    DynamoDb(DynamoConfig),
    /// A store opened by the caller (tests, embedding), which this system
    /// alone uses.
    Opened(SharedStore),
}

impl std::fmt::Debug for StoreChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("Embedded"),
            Self::DynamoDb(config) => f.debug_tuple("DynamoDb").field(config).finish(),
            Self::Opened(_) => f.write_str("Opened"),
        }
    }
}

impl StoreChoice {
    /// Opens the store: the embedded one in `dir`, or the DynamoDB tables
    /// (which must exist: `streamer dynamodb create-tables`), its operations
    /// measured (a store opened by the caller is as the caller made it).
    pub async fn open(&self, dir: &std::path::Path) -> anyhow::Result<SharedStore> {
        match self {
            Self::Embedded => open_embedded_store(dir),
            Self::DynamoDb(config) => Ok(Arc::new(Instrumented::new(
                DynamoStore::connect(config).await?,
                "dynamodb",
            ))),
            Self::Opened(store) => Ok(store.clone()),
        }
    }
}

/// The listeners of a whole system, bound by the caller.
#[derive(Debug)]
pub struct SystemListeners {
    pub auth: TcpListener,
    pub connection: TcpListener,
    /// ConnectionService's internal edge stream.
    pub edge: TcpListener,
    pub progress: TcpListener,
    pub gateway: TcpListener,
}

impl SystemListeners {
    /// Binds them all on 127.0.0.1 with ephemeral ports.
    pub async fn ephemeral() -> anyhow::Result<Self> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Ok(Self {
            auth: streamer_core::grpc::bind(any).await?,
            connection: streamer_core::grpc::bind(any).await?,
            edge: streamer_core::grpc::bind(any).await?,
            progress: streamer_core::grpc::bind(any).await?,
            gateway: streamer_core::grpc::bind(any).await?,
        })
    }
}

/// Everything `streamer all` needs besides its listeners. The URLs by which
/// the roles reach each other are filled in from the listeners.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    pub data_dir: PathBuf,
    /// Where the state lives (the embedded store in `data_dir` by default).
    pub store: StoreChoice,
    pub auth: AuthConfig,
    pub connection: ConnectionConfig,
    pub progress: ProgressConfig,
    pub gateway: GatewayConfig,
    /// How every role authenticates its callers (and presents itself to
    /// the others); it replaces the `trust` of each role's config.
    pub trust: Trust,
}

impl SystemConfig {
    /// Defaults, with the development key of `data_dir` (created if absent).
    pub fn development(data_dir: PathBuf) -> anyhow::Result<Self> {
        streamer_auth::dev::ensure_dev_key(&data_dir)
            .context("cannot create the development key")?;
        Ok(Self {
            auth: AuthConfig::new([streamer_auth::dev::public_key_path(&data_dir)]),
            data_dir,
            store: StoreChoice::Embedded,
            connection: ConnectionConfig::default(),
            progress: ProgressConfig::default(),
            gateway: GatewayConfig::default(),
            trust: Trust::none(),
        })
    }
}

/// Where a running system listens.
#[derive(Debug, Clone, Copy)]
pub struct SystemAddrs {
    pub auth: SocketAddr,
    pub connection: SocketAddr,
    pub edge: SocketAddr,
    pub progress: SocketAddr,
    pub gateway: SocketAddr,
}

/// A running system: its addresses and its tasks.
pub struct RunningSystem {
    pub addrs: SystemAddrs,
    tasks: JoinSet<anyhow::Result<()>>,
    store: SharedStore,
    shutdown: Shutdown,
}

impl RunningSystem {
    /// Waits for every role to stop, makes the store's relaxed writes
    /// durable, and returns the first error; a role that panicked is
    /// re-raised as an error. A role that fails stops the others, since a
    /// system missing one role cannot do its work.
    pub async fn join(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(result) = self.tasks.join_next().await {
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(join) => Err(anyhow::anyhow!("a role panicked: {join}")),
            };
            if let Err(error) = outcome {
                self.shutdown.cancel();
                tracing::error!(error = %format!("{error:#}"), "role failed");
                first_error.get_or_insert(error);
            }
        }
        self.store.flush().await.context("cannot flush the store")?;
        first_error.map_or(Ok(()), Err)
    }
}

/// An address other local processes can dial for a listener's address
/// (0.0.0.0 becomes 127.0.0.1).
pub fn dial_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

/// Starts all four roles on one embedded store in `config.data_dir`.
pub async fn start_system(
    listeners: SystemListeners,
    mut config: SystemConfig,
    shutdown: Shutdown,
) -> anyhow::Result<RunningSystem> {
    let addrs = SystemAddrs {
        auth: listeners.auth.local_addr()?,
        connection: listeners.connection.local_addr()?,
        edge: listeners.edge.local_addr()?,
        progress: listeners.progress.local_addr()?,
        gateway: listeners.gateway.local_addr()?,
    };
    let scheme = if config.trust.tls().is_some() {
        "https"
    } else {
        "http"
    };
    let url = |addr| format!("{scheme}://{}", dial_addr(addr));
    config.connection.progress_endpoint = Some(url(addrs.progress));
    config.connection.auth_endpoint = Some(url(addrs.auth));
    // The only edge is this process's own, new one: nothing recorded before
    // belongs to a live socket. Not so on DynamoDB tables, which other
    // processes may share.
    config.connection.connections_stale_at_start =
        !matches!(config.store, StoreChoice::DynamoDb(_));
    config.progress.connection_endpoint = url(addrs.connection);
    config.gateway.auth_endpoint = url(addrs.auth);
    config.gateway.connection_endpoint = url(addrs.edge);
    config.connection.trust = config.trust.clone();
    config.progress.trust = config.trust.clone();
    config.gateway.trust = config.trust.clone();

    let store = config.store.open(&config.data_dir).await?;
    // Fail fast on a bad key configuration, before anything listens.
    let validator = TokenValidator::new(config.auth).context("cannot load the token keys")?;

    let mut tasks = JoinSet::new();
    tasks.spawn(serve_auth(
        listeners.auth,
        store.clone(),
        validator,
        config.trust.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(run_connection(
        listeners.connection,
        listeners.edge,
        store.clone(),
        config.connection,
        shutdown.clone(),
    ));
    tasks.spawn(run_progress(
        listeners.progress,
        store.clone(),
        config.progress,
        shutdown.clone(),
    ));
    tasks.spawn(run_gateway(
        listeners.gateway,
        config.gateway,
        shutdown.clone(),
    ));
    Ok(RunningSystem {
        addrs,
        tasks,
        store,
        shutdown,
    })
}
