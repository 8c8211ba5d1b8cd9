//! Serving a gRPC service the way every Streamer process does.
//!
//! Every server carries `grpc.health.v1.Health` (status for "" and for each
//! service's full name) and server reflection (v1 and v1alpha, so both new
//! and older grpcurl builds can `list` and `describe`). Health follows a
//! [`Health`] check (the store answering): NOT_SERVING until it first
//! passes, NOT_SERVING while it fails (say, the DynamoDB tables are
//! unreachable), SERVING again when it passes, and NOT_SERVING for good the
//! moment shutdown begins, before the listener closes, so load balancers
//! stop sending new work while in-flight calls drain. Every call is counted
//! and timed per method and code ([`crate::grpc_metrics`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use streamer_api::errors::{Failure, Reason};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::grpc_metrics::GrpcMetricsLayer;
use crate::shutdown::Shutdown;
use crate::tls::ServerIo;
use crate::trust::{Trust, TrustLayer};

/// How long in-flight calls may take to finish once shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the kernel queues for a listener before it accepts them
/// (capped by `net.core.somaxconn`). The default 128 drops connections
/// when a few hundred clients arrive at once, as after an edge restart.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener (with [`LISTEN_BACKLOG`]), with a message that
/// names the address on failure.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bound().map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// What a server's health follows: a check run at start and then every
/// `interval`.
#[derive(Clone)]
pub struct Health {
    pub check: Arc<dyn Fn() -> BoxFuture<anyhow::Result<()>> + Send + Sync>,
    pub interval: Duration,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

/// How often a server checks what its health follows.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

impl Health {
    pub fn new<F, Fut>(check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self {
            check: Arc::new(move || Box::pin(check())),
            interval: HEALTH_INTERVAL,
        }
    }

    /// SERVING while `store` answers.
    pub fn of_store(store: crate::store::SharedStore) -> Self {
        Self::new(move || {
            let store = store.clone();
            async move {
                store
                    .ping()
                    .await
                    .map_err(|e| anyhow::anyhow!("store not reachable: {e}"))
            }
        })
    }
}

/// Serves `routes` on `listener` until `shutdown` is cancelled.
///
/// `services` are the full names of the services in `routes`; health
/// follows `health` (see the module). Every call passes `trust` first (see
/// [`crate::trust`]).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    services: &[&'static str],
    trust: Trust,
    health: Health,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_all(&reporter, services, ServingStatus::NotServing).await;

    // Reflection lists only what this server serves (the descriptor set
    // holds every Streamer service).
    let reflection = || {
        services.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(streamer_api::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection"),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let local = listener.local_addr()?;
    set_serving(local, false);
    let names = services.to_vec();
    // Status changes go through this lock, so the one made when shutdown
    // begins is the last.
    let changing = Arc::new(tokio::sync::Mutex::new(()));
    tokio::spawn(follow_health(
        health,
        reporter.clone(),
        names.clone(),
        local,
        changing.clone(),
        shutdown.clone(),
    ));

    let stopping = {
        let reporter = reporter.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            let _changing = changing.lock().await;
            set_serving(local, false);
            set_all(&reporter, &names, ServingStatus::NotServing).await;
        }
    };

    tracing::info!(
        address = %local,
        services = ?services,
        trust = trust.name(),
        tls = trust.tls().is_some(),
        "grpc server listening"
    );
    let incoming: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<ServerIo>> + Send>> =
        match trust.tls() {
            Some(tls) => Box::pin(tls.clone().accept(listener)),
            None => Box::pin(crate::tls::accepted(listener).map(|s| Ok(ServerIo::plain(s)))),
        };
    let measured: Vec<&str> = services
        .iter()
        .copied()
        .chain(["grpc.health.v1.Health"])
        .chain(["grpc.reflection.v1.ServerReflection"])
        .chain(["grpc.reflection.v1alpha.ServerReflection"])
        .collect();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Outermost, so that calls the trust check refuses are counted too.
        .layer(GrpcMetricsLayer::new(&measured))
        .layer(TrustLayer(trust))
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, stopping);

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            tracing::warn!(address = %local, "drain timed out; closing remaining calls");
        }
    }
    tracing::info!(address = %local, "grpc server stopped");
    Ok(())
}

/// Runs `health` until shutdown and turns the servers' status with it,
/// logging each change.
async fn follow_health(
    health: Health,
    reporter: HealthReporter,
    names: Vec<&'static str>,
    local: SocketAddr,
    changing: Arc<tokio::sync::Mutex<()>>,
    shutdown: Shutdown,
) {
    let mut serving: Option<bool> = None;
    loop {
        let result = tokio::select! {
            result = (health.check)() => result,
            () = shutdown.cancelled() => return,
        };
        let now = result.is_ok();
        if serving != Some(now) {
            let _changing = changing.lock().await;
            if shutdown.is_cancelled() {
                return;
            }
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&reporter, &names, status).await;
            set_serving(local, now);
            match result {
                Ok(()) => tracing::info!(address = %local, "serving"),
                Err(error) => {
                    tracing::error!(address = %local, error = %format!("{error:#}"), "not serving")
                }
            }
            serving = Some(now);
        }
        tokio::select! {
            () = tokio::time::sleep(health.interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Whether each gRPC server of this process is serving, by address: what
/// the metrics listener's `/readyz` reports.
static SERVING: std::sync::Mutex<Vec<(SocketAddr, bool)>> = std::sync::Mutex::new(Vec::new());

fn set_serving(address: SocketAddr, serving: bool) {
    let mut all = SERVING.lock().unwrap_or_else(|e| e.into_inner());
    match all.iter_mut().find(|(a, _)| *a == address) {
        Some(entry) => entry.1 = serving,
        None => all.push((address, serving)),
    }
}

/// The addresses of this process's gRPC servers that are not serving.
pub fn not_serving() -> Vec<String> {
    SERVING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, serving)| !serving)
        .map(|(address, _)| address.to_string())
        .collect()
}

async fn set_all(reporter: &HealthReporter, services: &[&'static str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in services {
        reporter.set_service_status(*name, status).await;
    }
}

/// An endpoint for `url` with what every Streamer client sets: no Nagle,
/// and HTTP/2 keepalives that find a half-open connection (so an edge
/// re-attaches instead of believing it is attached). The caller adds its
/// own timeouts. `https://` when `trust` has TLS, `http://` otherwise.
pub fn endpoint(url: &str, trust: &Trust) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("invalid URL {url:?}: {e}"))?;
    match (trust.tls().is_some(), endpoint.uri().scheme_str()) {
        (true, Some("https")) | (false, Some("http")) => {}
        (true, _) => anyhow::bail!("{url}: TLS is configured, so the URL must be https://"),
        (false, Some("https")) => {
            anyhow::bail!("{url}: an https:// URL needs TLS (--tls-cert, --tls-key, --tls-ca)")
        }
        (false, _) => anyhow::bail!("{url}: the URL must be http:// (or https:// with TLS)"),
    }
    Ok(endpoint
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// A channel to `endpoint` that connects on first use (so a process may
/// start before the services it calls), over TLS when `trust` has it.
pub fn channel(endpoint: &Endpoint, trust: &Trust) -> Channel {
    match trust.tls() {
        Some(tls) => endpoint.connect_with_connector_lazy(tls.connector()),
        None => endpoint.connect_lazy(),
    }
}

/// A channel to one `address` that `endpoint`'s host resolves to (one
/// replica of several behind one name), over TLS when `trust` has it, with
/// the certificate still verified against the host's name. Connects on
/// first use.
pub fn channel_to(endpoint: &Endpoint, address: SocketAddr, trust: &Trust) -> Channel {
    match trust.tls() {
        Some(tls) => endpoint.connect_with_connector_lazy(tls.connector().to_address(address)),
        None => endpoint.connect_with_connector_lazy(tower::service_fn(
            move |_: http::Uri| async move {
                let tcp = tokio::net::TcpStream::connect(address).await?;
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
            },
        )),
    }
}

/// A URI's host as a name or address to dial (an IPv6 literal without
/// its brackets).
pub(crate) fn host_of(uri: &http::Uri) -> Option<&str> {
    uri.host()
        .map(|host| host.trim_start_matches('[').trim_end_matches(']'))
}

/// Every address `url`'s host resolves to now (several for a name such as
/// a Kubernetes headless Service, one for an IP address).
pub async fn resolve(url: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid URL {url:?}: {e}"))?;
    let host = host_of(&uri).ok_or_else(|| anyhow::anyhow!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    let mut addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot resolve {host}: {e}"))?
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// The URLs of a comma-separated list (one URL, a DNS name that resolves
/// to every replica, or several URLs), each checked now so that a bad one
/// stops the process at start.
pub fn url_list(list: &str, trust: &Trust) -> anyhow::Result<Vec<String>> {
    let urls: Vec<String> = list
        .split(',')
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect();
    anyhow::ensure!(!urls.is_empty(), "no URL in {list:?}");
    for url in &urls {
        endpoint(url, trust)?;
    }
    Ok(urls)
}

/// A lazily connecting channel to the replica at `address`, reached as
/// `url` names it (the authority, and the name its TLS certificate is
/// checked against): each connect bounded by `connect`, each call by
/// `call` when given.
pub fn replica_channel(
    url: &str,
    address: SocketAddr,
    trust: &Trust,
    connect: Duration,
    call: Option<Duration>,
) -> anyhow::Result<Channel> {
    let mut endpoint = endpoint(url, trust)?.connect_timeout(connect);
    if let Some(call) = call {
        endpoint = endpoint.timeout(call);
    }
    Ok(channel_to(&endpoint, address, trust))
}

/// A call that failed without saying what happened: the server went away,
/// or did not answer in time. Made again (on another replica) only when
/// it is safe to repeat.
pub fn outcome_unknown(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
    )
}

/// How often [`follow_addresses`] resolves its URLs again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

/// Every address `urls` resolve to, each with the URL it came from,
/// resolved now and again every [`RESOLVE_INTERVAL`] until `shutdown`: one
/// name (a Kubernetes headless Service) or a list of URLs names the
/// replicas of a service, and this follows them as they come and go. A
/// resolution that fails keeps the addresses known before it.
pub async fn follow_addresses(
    urls: Vec<String>,
    shutdown: Shutdown,
) -> tokio::sync::watch::Receiver<std::collections::BTreeMap<SocketAddr, String>> {
    /// What the URLs resolve to now, and whether every one resolved.
    async fn resolve_all(
        urls: &[String],
    ) -> (std::collections::BTreeMap<SocketAddr, String>, bool) {
        let mut found = std::collections::BTreeMap::new();
        let mut complete = true;
        for url in urls {
            match resolve(url).await {
                Ok(addresses) => {
                    for address in addresses {
                        found.entry(address).or_insert_with(|| url.clone());
                    }
                }
                Err(error) => {
                    complete = false;
                    tracing::warn!(%url, %error, "cannot resolve");
                }
            }
        }
        (found, complete)
    }
    let (first, _) = resolve_all(&urls).await;
    let (tx, rx) = tokio::sync::watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RESOLVE_INTERVAL) => {}
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
            }
            let (found, complete) = resolve_all(&urls).await;
            tx.send_if_modified(|known| {
                let next = if complete {
                    found
                } else {
                    // Partly resolved: add what was found, drop nothing.
                    let mut merged = known.clone();
                    merged.extend(found);
                    merged
                };
                let changed = *known != next;
                *known = next;
                changed
            });
        }
    });
    rx
}

/// One client per replica of a service (every address its URLs resolve
/// to, followed as they change), handed out in turn: calls spread over
/// every replica instead of riding one HTTP/2 connection to one of them.
pub struct Balanced<T> {
    clients: std::sync::RwLock<Vec<(SocketAddr, T)>>,
    next: std::sync::atomic::AtomicUsize,
}

impl<T: Clone + Send + Sync + 'static> Balanced<T> {
    /// Follows `urls` (see [`follow_addresses`]) until `shutdown`, making
    /// a client for each new address with `make`.
    pub async fn follow<F>(urls: Vec<String>, make: F, shutdown: Shutdown) -> Arc<Self>
    where
        F: Fn(&str, SocketAddr) -> anyhow::Result<T> + Send + Sync + 'static,
    {
        let mut addresses = follow_addresses(urls, shutdown).await;
        let balanced = Arc::new(Self {
            clients: std::sync::RwLock::new(Vec::new()),
            next: std::sync::atomic::AtomicUsize::new(0),
        });
        let current = addresses.borrow_and_update().clone();
        balanced.update(&current, &make);
        let weak = Arc::downgrade(&balanced);
        tokio::spawn(async move {
            while addresses.changed().await.is_ok() {
                let Some(balanced) = weak.upgrade() else {
                    return;
                };
                let current = addresses.borrow_and_update().clone();
                balanced.update(&current, &make);
            }
        });
        balanced
    }

    /// Follows every replica `list` names (see [`url_list`]) until
    /// `shutdown`, with one client per address, made by `client` from a
    /// [`replica_channel`] bounded by `connect` and `call`.
    pub async fn follow_list<F>(
        list: &str,
        trust: &Trust,
        (connect, call): (Duration, Option<Duration>),
        client: F,
        shutdown: Shutdown,
    ) -> anyhow::Result<Arc<Self>>
    where
        F: Fn(Channel) -> T + Send + Sync + 'static,
    {
        let urls = url_list(list, trust)?;
        let trust = trust.clone();
        Ok(Self::follow(
            urls,
            move |url, address| {
                Ok(client(replica_channel(
                    url, address, &trust, connect, call,
                )?))
            },
            shutdown,
        )
        .await)
    }

    fn update<F>(&self, addresses: &std::collections::BTreeMap<SocketAddr, String>, make: &F)
    where
        F: Fn(&str, SocketAddr) -> anyhow::Result<T>,
    {
        let mut clients = self.clients.write().unwrap_or_else(|e| e.into_inner());
        clients.retain(|(address, _)| addresses.contains_key(address));
        for (address, url) in addresses {
            if clients.iter().any(|(known, _)| known == address) {
                continue;
            }
            match make(url, *address) {
                Ok(client) => clients.push((*address, client)),
                Err(error) => tracing::error!(%url, %address, %error, "cannot make a client"),
            }
        }
        clients.sort_by_key(|(address, _)| *address);
    }

    /// Makes `call` on the next replica in turn and, while its outcome is
    /// unknown (see [`outcome_unknown`]), again on the following replica,
    /// waiting `backoff` (doubled each time) before each new attempt, at
    /// most `attempts` calls in all. Only for calls that are safe to repeat.
    /// No replica known: UNAVAILABLE.
    pub async fn call<R, F, Fut>(
        &self,
        attempts: usize,
        mut backoff: Duration,
        mut call: F,
    ) -> Result<R, tonic::Status>
    where
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Result<R, tonic::Status>>,
    {
        let replicas = self.in_turn();
        if replicas.is_empty() {
            return Err(Failure::new(
                tonic::Code::Unavailable,
                Reason::DependencyUnavailable,
                "no replica of the service is known",
            )
            .into());
        }
        let mut attempt = 0;
        loop {
            let client = replicas[attempt % replicas.len()].clone();
            attempt += 1;
            match call(client).await {
                Err(status) if outcome_unknown(&status) && attempt < attempts => {
                    tracing::info!(error = %status, attempt, "outcome unknown; calling the next replica");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                answer => return answer,
            }
        }
    }

    /// Every replica's client, starting with the next one in turn: a caller
    /// whose first choice does not answer tries the following one.
    pub fn in_turn(&self) -> Vec<T> {
        let clients = self.clients.read().unwrap_or_else(|e| e.into_inner());
        if clients.is_empty() {
            return Vec::new();
        }
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..clients.len())
            .map(|i| clients[(turn + i) % clients.len()].1.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A few hundred clients arriving at once (an edge restart) all get
    /// through the kernel's queue while nothing accepts yet; with the
    /// default backlog of 128 the rest would wait for SYN retries (1 s+).
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_listen_queue() {
        let listener = bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..400).map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_millis(800),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
            })
        });
        let mut held = Vec::new();
        for connect in connects {
            held.push(connect.await.unwrap().expect("connected in time").unwrap());
        }
        assert_eq!(held.len(), 400);
        drop(listener);
    }

    /// Two replicas, as a list of URLs names them; each "client" is its
    /// address.
    async fn two_replicas(shutdown: Shutdown) -> Arc<Balanced<SocketAddr>> {
        let urls = vec!["http://127.0.0.1:1".into(), "http://127.0.0.2:2".into()];
        Balanced::follow(urls, |_, address| Ok(address), shutdown).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_answer_goes_on_to_the_next_replica() {
        let shutdown = Shutdown::new();
        let replicas = two_replicas(shutdown.clone()).await;
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for _ in 0..4 {
            let mut called = Vec::new();
            let answer = replicas
                .call(3, Duration::from_millis(200), |address| {
                    called.push(address);
                    async move {
                        if address == gone {
                            Err(tonic::Status::unavailable("connection refused"))
                        } else {
                            Ok(address)
                        }
                    }
                })
                .await;
            assert_eq!(answer.unwrap(), "127.0.0.2:2".parse().unwrap());
            assert_eq!(called.last(), Some(&"127.0.0.2:2".parse().unwrap()));
            assert!(called.len() <= 2, "called {called:?}");
        }
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_final_and_attempts_are_bounded() {
        let shutdown = Shutdown::new();
        let replicas = two_replicas(shutdown.clone()).await;
        // A refusal is an answer: no other replica is asked.
        let mut calls = 0;
        let refused: Result<(), _> = replicas
            .call(3, Duration::ZERO, |_| {
                calls += 1;
                async { Err(tonic::Status::failed_precondition("already finished")) }
            })
            .await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(calls, 1);
        // Nobody answers: exactly `attempts` calls, alternating replicas.
        let mut called = Vec::new();
        let unanswered: Result<(), _> = replicas
            .call(3, Duration::from_millis(200), |address| {
                called.push(address);
                async { Err(tonic::Status::deadline_exceeded("timed out")) }
            })
            .await;
        assert_eq!(
            unanswered.unwrap_err().code(),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(called.len(), 3);
        assert_ne!(called[0], called[1]);
        assert_eq!(called[0], called[2]);
        shutdown.cancel();
    }
}
