//! ProgressService: the lifecycle of long-running requests.
//!
//! A router submits a request for a client's connection; processors claim
//! it under a lease, report progress, and complete or fail it; the client
//! receives an `acknowledgment`, rate-limited and coalesced `progress`, and
//! exactly one final `complete` or `error`, in that order, through
//! ConnectionService.
//!
//! Layout:
//! - [`model`]: the service's commands, validated out of the wire types
//!   (`TryFrom`, where INVALID_ARGUMENT comes from).
//! - `lifecycle`: every state change (conditional writes on the store), the
//!   dispatcher that hands PENDING work to processors round robin, and the
//!   sweeper that takes back lapsed leases.
//! - `outbox`: one sender task per request that talks to its client, in
//!   order, rate-limited, with the final message never dropped.
//! - the JSON the client sees: `streamer_core::client`.
//! - `connections`: the ConnectionService client (identity and delivery).
//! - `grpc`: the thin tonic adapter.
//!
//! Invariants: the store is the truth and every transition is a
//! conditional write, so a request finishes at most once even with several
//! replicas; user and tenant come from the connection's verified identity,
//! never from the caller; nothing is sent to a client after its request's
//! final message.

#![forbid(unsafe_code)]

mod connections;
mod error;
mod grpc;
mod lifecycle;
pub mod model;
mod outbox;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use streamer_api::v1::progress_service_server::ProgressServiceServer;
use streamer_core::shutdown::Shutdown;
use streamer_core::store::SharedStore;
use tokio_util::task::TaskTracker;

pub use error::ProgressError;

use crate::connections::ConnectionDirectory;
use crate::lifecycle::Lifecycle;

/// How the service runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressConfig {
    /// ConnectionService: one URL (e.g. `http://127.0.0.1:50052`), a DNS
    /// name that resolves to every replica, or a comma-separated list of
    /// URLs. Connected lazily, so the two may start in any order.
    pub connection_endpoint: String,
    /// Most progress messages per second per request sent to the client;
    /// 0 (or less) means no limit.
    pub progress_rate: f64,
    /// The lease of a processor that asks for none.
    pub default_lease: Duration,
    /// Hand-outs before a request whose leases keep lapsing fails.
    pub max_attempts: u32,
    /// Actions Submit accepts even before any processor declared them.
    /// With several replicas, list every async action here: a replica
    /// otherwise knows only the actions of the processors it serves.
    pub async_actions: Vec<String>,
    /// How often the store is asked for PENDING work of the actions this
    /// replica's processors run (work submitted through another replica)
    /// and for leases lapsed anywhere (a replica that died holding them).
    pub store_poll: Duration,
    /// Who may call this service, and how it presents itself to
    /// ConnectionService.
    pub trust: streamer_core::trust::Trust,
}

impl Default for ProgressConfig {
    fn default() -> Self {
        Self {
            connection_endpoint: "http://127.0.0.1:50052".to_owned(),
            progress_rate: 10.0,
            default_lease: Duration::from_secs(30),
            max_attempts: 3,
            async_actions: Vec::new(),
            store_poll: Duration::from_millis(500),
            trust: streamer_core::trust::Trust::none(),
        }
    }
}

impl ProgressConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_attempts >= 1, "max_attempts must be at least 1");
        let max_lease = Duration::from_secs(u64::from(model::MAX_LEASE_SECONDS));
        anyhow::ensure!(
            self.default_lease >= Duration::from_secs(1) && self.default_lease <= max_lease,
            "default_lease must be 1 s..=1 h, not {:?}",
            self.default_lease
        );
        // 0 (or less) means unlimited; a positive rate below one message a
        // minute would make the interval overflow a Duration for tiny values.
        anyhow::ensure!(
            self.progress_rate.is_finite()
                && (self.progress_rate <= 0.0 || self.progress_rate >= 1.0 / 60.0),
            "progress_rate must be 0 (unlimited) or at least 1/60 per second, not {}",
            self.progress_rate
        );
        Ok(())
    }
}

/// The running service. A cheap-to-clone handle.
#[derive(Clone)]
pub struct ProgressServer {
    lifecycle: Arc<Lifecycle>,
    tasks: TaskTracker,
}

impl ProgressServer {
    /// Loads unfinished requests from the store (PENDING ones are queued
    /// again; PROCESSING ones keep their lease until it lapses, so a
    /// processor that reconnects can still complete them) and starts the
    /// dispatcher and the lease sweeper. Every background task ends when
    /// `shutdown` is cancelled.
    pub async fn start(
        store: SharedStore,
        config: ProgressConfig,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let connections =
            ConnectionDirectory::follow(&config.connection_endpoint, &config.trust, &shutdown)
                .await?;
        let tasks = TaskTracker::new();
        let lifecycle = Arc::new(Lifecycle::new(
            store,
            config,
            connections,
            shutdown,
            tasks.clone(),
        ));
        lifecycle.start().await?;
        Ok(Self { lifecycle, tasks })
    }

    pub fn into_service(self) -> ProgressServiceServer<Self> {
        ProgressServiceServer::new(self)
    }

    /// Resolves once every background task has ended (after shutdown).
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}
