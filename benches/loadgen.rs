//! The whole-system load generator: real WebSocket clients and a real gRPC
//! processor against a real Streamer, measuring what a user of the system
//! sees.
//!
//! By default each run starts a fresh system in this process on ephemeral
//! loopback ports (the same `streamer::start_system` that `streamer all`
//! uses), so one command measures everything; `--gateway`, `--connection`,
//! `--progress` and `--data-dir` point it at a system that is already
//! running instead (the data directory holds the development key that
//! tokens are minted with).
//!
//! Scenarios (see `benches/README.md` for the exact commands):
//!
//! - `progress`: N clients each submit M requests of an action that an
//!   in-bench processor claims; it streams P progress reports per request as
//!   fast as it can, then completes. Measured: completed requests/s,
//!   delivered progress messages/s, submit-to-complete latency, and the
//!   latency of each delivered progress message from the processor's Report
//!   send to the client (the processor stamps it in the progress metadata).
//!   The protocol is checked as it runs: acknowledgment first, sequences
//!   increasing, exactly one `complete` per request, nothing after it.
//! - `broadcast`: K clients of one tenant; tenant broadcasts in lockstep
//!   (time until the last client has each one) and in a burst (deliveries/s),
//!   then unary `Send` latency to one connection.
//! - `soak` (in `soak.rs`): well-behaved clients that connect, send and
//!   drop at random, first alone, then beside a flood, a slowloris and
//!   oversized frames; every accepted request must reach its client's final
//!   exactly once, and the clients' latency is set beside the quiet run's.
//! - `store-cost` (in `store_cost.rs`): the DynamoDB calls, and the request
//!   units derived from them, of each product operation, on a local moto
//!   server; then the same operations timed on moto and on the embedded
//!   store. Not part of `all` (it needs moto), except in the smoke run,
//!   which runs it when python3 can import moto.
//! - `idle-memory` (in `idle_memory.rs`): N idle authenticated connections
//!   to `streamer all` running as a process of its own; its resident memory
//!   per connection, and how much of it stays once they close.
//! - `versus-nchan` (in `peer.rs`, with the client of `lean_ws.rs`):
//!   Streamer and nginx with nchan, each in processes of its own, measured
//!   in the same run by the same lean client: fan-out to 100, 1,000 and
//!   10,000 sockets, a burst of publishes, idle memory per connection, and
//!   an open-loop connect rate. Installs nginx and the module when they are
//!   missing; `--write-benchmarks` puts the figures in BENCHMARKS.md with a
//!   plot. Not part of `all`, except in the smoke run (Streamer alone when
//!   nginx is not installed).
//! - `all` (the default): `progress` at the default rate limit, `progress`
//!   unlimited, `broadcast`, `soak` and `idle-memory`, each on a fresh
//!   system.
//!
//! Every run is bounded by counts and by `--timeout-secs`, uses loopback
//! only, and exits by itself. Run by `cargo test --benches` (without the
//! `--bench` flag that `cargo bench` passes), it does a small smoke run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// Not `benches/soak.rs`: Cargo would take a file there for a bench target.
#[path = "loadgen/idle_memory.rs"]
mod idle_memory;
#[path = "loadgen/lean_ws.rs"]
mod lean_ws;
#[path = "loadgen/peer.rs"]
mod peer;
#[path = "loadgen/soak.rs"]
mod soak;
#[path = "loadgen/store_cost.rs"]
mod store_cost;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use streamer::{RunningSystem, SystemConfig, SystemListeners};
use streamer_api::v1::{
    self, claim_response::Item, connection_service_client::ConnectionServiceClient,
    progress_service_client::ProgressServiceClient,
};
use streamer_auth::dev::{DevKey, MintOptions};
use streamer_core::shutdown::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::Channel;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The action the in-bench processor claims. Its own name, so a processor
/// of a running system never takes the bench's work (nor the reverse).
const ACTION: &str = "loadgen_report";
/// Sockets per process stay well under the 20,000 open-files limit; in one
/// process each connection is two sockets (client and server end).
const MAX_IN_PROCESS_CLIENTS: usize = 4000;
const MAX_EXTERNAL_CLIENTS: usize = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// progress at the default rate, progress unlimited, broadcast, then
    /// soak.
    All,
    Progress,
    Broadcast,
    /// Well-behaved clients, quiet and then beside attackers.
    Soak,
    /// Resident memory of the edge per idle connection.
    IdleMemory,
    /// DynamoDB calls per product operation (needs moto); not in `all`.
    StoreCost,
    /// Streamer beside nginx with nchan (installed when missing): fan-out,
    /// burst, idle memory, open-loop connects; not in `all`.
    VersusNchan,
}

/// A role whose listener `--listener-nodelay` can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Auth,
    Connection,
    Progress,
    Gateway,
    All,
}

/// Whole-system load generator for Streamer.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen")]
struct Args {
    /// What to run.
    #[arg(value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,

    /// Target a running system's WebSocket edge (host:port) instead of
    /// starting one in-process; needs --connection, --progress, --data-dir.
    #[arg(long, requires_all = ["connection", "progress", "data_dir"])]
    gateway: Option<SocketAddr>,
    /// ConnectionService of the running system.
    #[arg(long)]
    connection: Option<SocketAddr>,
    /// ProgressService of the running system.
    #[arg(long)]
    progress: Option<SocketAddr>,
    /// The running system's data directory (for its development key).
    #[arg(long)]
    data_dir: Option<PathBuf>,

    /// progress: WebSocket clients.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// progress: requests each client submits (all at once).
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// progress: progress reports the processor sends per request.
    #[arg(long, default_value_t = 20)]
    updates: u32,
    /// progress: the server's per-request progress rate limit (in-process
    /// only; 0 = unlimited). Unset: 10, or both 10 and 0 for `all`.
    #[arg(long)]
    progress_rate: Option<f64>,
    /// progress: processor instances (each one Claim stream).
    #[arg(long, default_value_t = 1)]
    processors: usize,

    /// broadcast: connected clients of the tenant.
    #[arg(long, default_value_t = 1000)]
    broadcast_clients: usize,
    /// broadcast: tenant broadcasts in each phase (lockstep, burst).
    #[arg(long, default_value_t = 20)]
    broadcasts: usize,
    /// broadcast: unary Send calls to one connection.
    #[arg(long, default_value_t = 1000)]
    sends: usize,
    /// broadcast: WebSocket connects in flight at once while ramping up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,

    /// soak: well-behaved WebSocket clients.
    #[arg(long, default_value_t = 200)]
    soak_clients: usize,
    /// soak: seconds of each phase (quiet, then attacked).
    #[arg(long, default_value_t = 60.0)]
    soak_secs: f64,
    /// soak: mean pause between a client's requests, in ms (each drawn
    /// from 0 to twice this).
    #[arg(long, default_value_t = 2000)]
    soak_think_ms: u64,
    /// soak: probability that a client drops its socket during a request
    /// (and, having done so, again after resuming).
    #[arg(long, default_value_t = 0.1)]
    soak_drop: f64,
    /// soak: probability that the processor fails a request.
    #[arg(long, default_value_t = 0.05)]
    soak_fail: f64,
    /// soak: flooding sockets in the attacked phase.
    #[arg(long, default_value_t = 4)]
    soak_flooders: usize,
    /// soak: slowloris sockets in the attacked phase.
    #[arg(long, default_value_t = 300)]
    soak_slowloris: usize,
    /// soak: sockets that connect and send nothing, in the attacked phase.
    #[arg(long, default_value_t = 20)]
    soak_silent: usize,
    /// soak: ms between the bytes a slowloris socket dribbles.
    #[arg(long, default_value_t = 3000)]
    soak_dribble_ms: u64,
    /// soak: sockets sending frames over the size limit in the attacked phase.
    #[arg(long, default_value_t = 1)]
    soak_oversized: usize,
    /// soak: the edge's header-read timeout in ms: set on an in-process
    /// system, expected of a running one.
    #[arg(long, default_value_t = 10_000)]
    soak_header_timeout_ms: u64,
    /// soak: seed of every client's plan (printed; random when unset).
    #[arg(long)]
    seed: Option<u64>,

    /// idle-memory: idle authenticated connections.
    #[arg(long, default_value_t = 10_000)]
    idle_clients: usize,
    /// idle-memory: seconds, after the last socket closed, to wait for the
    /// memory they took to come back.
    #[arg(long, default_value_t = 30)]
    idle_return_secs: u64,

    /// store-cost: tenant sizes, ascending: clients connect up to each size,
    /// then the tenant broadcasts to them.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100])]
    store_cost_clients: Vec<usize>,
    /// store-cost: seconds the system idles after the operations, to count
    /// its background calls.
    #[arg(long, default_value_t = 60.0)]
    store_cost_idle_secs: f64,

    /// versus-nchan: subscriber sets to fan out to; the largest also
    /// connects open loop, is measured idle and takes the burst.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 10_000])]
    peer_sockets: Vec<usize>,
    /// versus-nchan: publishes in lockstep to each set.
    #[arg(long, default_value_t = 100)]
    peer_publishes: usize,
    /// versus-nchan: publishes back to back to the largest set.
    #[arg(long, default_value_t = 20)]
    peer_burst: usize,
    /// versus-nchan: connects per second, open loop, of the largest set.
    #[arg(long, default_value_t = 2000.0)]
    peer_connect_rate: f64,
    /// versus-nchan: `perf record -g` the streamer process into this
    /// directory, during the open-loop connects (`connect.perf.data`) and
    /// the largest set's lockstep fan-out (`fanout.perf.data`); installs
    /// linux-perf when missing.
    #[arg(long)]
    peer_perf: Option<PathBuf>,
    /// versus-nchan: rewrite its section of BENCHMARKS.md and draw
    /// benches/peer-fanout.png (installs matplotlib when missing).
    #[arg(long)]
    write_benchmarks: bool,

    /// Give up on a run (and report what is missing) after this long.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Also print the results as one JSON document on stdout.
    #[arg(long)]
    json: bool,
    /// Experiment (in-process only): set TCP_NODELAY on the four listening
    /// sockets, which Linux passes on to the sockets they accept, to see what
    /// Nagle's algorithm on the servers' side of each connection costs.
    /// Comma-separated roles: auth, connection, progress, gateway, or all.
    #[arg(long, value_enum, value_delimiter = ',')]
    listener_nodelay: Vec<Role>,
    /// Tenant the clients belong to.
    #[arg(long, default_value = "loadgen")]
    tenant: String,

    /// Passed by `cargo bench`; without it (`cargo test --benches`) the run
    /// is a small smoke test.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn external(&self) -> bool {
        self.gateway.is_some()
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// `cargo test --benches`: tiny counts, just proof that it works.
    fn shrink_for_smoke(&mut self) {
        self.clients = self.clients.min(4);
        self.requests = self.requests.min(2);
        self.updates = self.updates.min(5);
        self.broadcast_clients = self.broadcast_clients.min(10);
        self.broadcasts = self.broadcasts.min(3);
        self.sends = self.sends.min(10);
        self.soak_clients = self.soak_clients.min(8);
        self.soak_secs = self.soak_secs.min(1.5);
        self.soak_think_ms = self.soak_think_ms.min(100);
        self.soak_flooders = self.soak_flooders.min(1);
        self.soak_slowloris = self.soak_slowloris.min(20);
        self.soak_silent = self.soak_silent.min(2);
        self.soak_dribble_ms = self.soak_dribble_ms.min(300);
        self.soak_oversized = self.soak_oversized.min(1);
        self.soak_header_timeout_ms = self.soak_header_timeout_ms.min(1000);
        self.idle_clients = self.idle_clients.min(50);
        self.idle_return_secs = self.idle_return_secs.min(2);
        self.store_cost_clients = vec![2, 5];
        self.store_cost_idle_secs = self.store_cost_idle_secs.min(1.0);
        self.peer_sockets = vec![5, 20];
        self.peer_publishes = self.peer_publishes.min(3);
        self.peer_burst = self.peer_burst.min(3);
        self.peer_connect_rate = self.peer_connect_rate.min(200.0);
        self.write_benchmarks = false;
        self.timeout_secs = self.timeout_secs.min(30);
    }
}

// ---- clock -----------------------------------------------------------------

/// One monotonic epoch for the process, so a timestamp the processor puts
/// in a progress report can be compared with the client's clock.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

// ---- statistics ------------------------------------------------------------

/// Percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Default)]
struct Summary {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        // Nearest-rank percentile.
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            ms(samples[rank - 1])
        };
        Self {
            count: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: ms(samples[samples.len() - 1]),
        }
    }

    fn to_json(&self) -> Value {
        json!({"count": self.count, "p50_ms": self.p50, "p90_ms": self.p90,
               "p99_ms": self.p99, "max_ms": self.max})
    }

    fn row(&self, name: &str) -> String {
        format!(
            "  {name:<34} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            self.count, self.p50, self.p90, self.p99, self.max
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn latency_header() -> String {
    format!(
        "  {:<34} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "n", "p50", "p90", "p99", "max"
    )
}

fn per_second(count: u64, window: Duration) -> f64 {
    if window.is_zero() {
        0.0
    } else {
        count as f64 / window.as_secs_f64()
    }
}

// ---- the system under test -------------------------------------------------

/// Where the system is, and the key to mint its tokens with. Owns the
/// system when it runs in this process.
struct Target {
    gateway: SocketAddr,
    connection: SocketAddr,
    progress: SocketAddr,
    key: DevKey,
    in_process: Option<InProcess>,
}

struct InProcess {
    system: RunningSystem,
    shutdown: Shutdown,
    _data_dir: tempfile::TempDir,
}

impl Target {
    /// A fresh in-process system (adjusted by `adjust`), or the running one
    /// the flags name.
    async fn open(args: &Args, adjust: impl FnOnce(&mut SystemConfig)) -> anyhow::Result<Self> {
        if let (Some(gateway), Some(connection), Some(progress), Some(data_dir)) =
            (args.gateway, args.connection, args.progress, &args.data_dir)
        {
            let key = streamer_auth::dev::load_dev_key(data_dir)
                .with_context(|| format!("no development key in {}", data_dir.display()))?;
            return Ok(Self {
                gateway,
                connection,
                progress,
                key,
                in_process: None,
            });
        }
        let data_dir = tempfile::tempdir()?;
        let mut config = SystemConfig::development(data_dir.path().to_path_buf())?;
        adjust(&mut config);
        let key = streamer_auth::dev::load_dev_key(data_dir.path())?;
        let shutdown = Shutdown::new();
        let listeners = if args.listener_nodelay.is_empty() {
            SystemListeners::ephemeral().await?
        } else {
            nodelay_listeners(&args.listener_nodelay)?
        };
        let system = streamer::start_system(listeners, config, shutdown.clone()).await?;
        let addrs = system.addrs;
        let target = Self {
            gateway: addrs.gateway,
            connection: addrs.connection,
            progress: addrs.progress,
            key,
            in_process: Some(InProcess {
                system,
                shutdown,
                _data_dir: data_dir,
            }),
        };
        target.wait_ready().await?;
        Ok(target)
    }

    /// Waits until the edge answers `/readyz` (it is attached to
    /// ConnectionService), so clients can connect.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while http_status(self.gateway, "/readyz").await != Some(200) {
            if Instant::now() > deadline {
                bail!("the edge at {} never became ready", self.gateway);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops an in-process system and waits for it.
    async fn close(self) -> anyhow::Result<()> {
        if let Some(running) = self.in_process {
            running.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(30), running.system.join())
                .await
                .context("the system did not stop within 30 s")??;
        }
        Ok(())
    }

    fn token(&self, sub: &str, tenant: &str) -> anyhow::Result<String> {
        Ok(self.key.mint(&MintOptions {
            sub: sub.into(),
            tenant: tenant.into(),
            ..MintOptions::default()
        })?)
    }

    async fn connect(&self, token: &str) -> anyhow::Result<Ws> {
        let url = format!("ws://{}/?Authorization={token}", self.gateway);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(30),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .context("websocket connect timed out")??;
        Ok(ws)
    }

    async fn progress_client(&self) -> anyhow::Result<ProgressServiceClient<Channel>> {
        Ok(ProgressServiceClient::connect(format!("http://{}", self.progress)).await?)
    }

    async fn connection_client(&self) -> anyhow::Result<ConnectionServiceClient<Channel>> {
        Ok(ConnectionServiceClient::connect(format!("http://{}", self.connection)).await?)
    }
}

/// Like `SystemListeners::ephemeral`, with TCP_NODELAY set on the
/// listening sockets of `roles` (inherited by accepted sockets on Linux).
fn nodelay_listeners(roles: &[Role]) -> anyhow::Result<SystemListeners> {
    let bind = |role: Role| -> anyhow::Result<tokio::net::TcpListener> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_nodelay(roles.contains(&role) || roles.contains(&Role::All))?;
        socket.bind(([127, 0, 0, 1], 0).into())?;
        Ok(socket.listen(1024)?)
    };
    Ok(SystemListeners {
        auth: bind(Role::Auth)?,
        connection: bind(Role::Connection)?,
        edge: bind(Role::Connection)?,
        progress: bind(Role::Progress)?,
        gateway: bind(Role::Gateway)?,
    })
}

/// The status of a plain HTTP/1.1 GET, or None when nothing answered.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// The next text message as JSON (pings, pongs and binary skipped); None
/// when the socket ended.
async fn next_json(ws: &mut Ws) -> Option<anyhow::Result<Value>> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => {
                return Some(serde_json::from_str(&text).map_err(Into::into));
            }
            Ok(Message::Close(frame)) => {
                return Some(Err(anyhow::anyhow!("server closed the socket: {frame:?}")));
            }
            Ok(_) => continue,
            Err(e) => return Some(Err(e.into())),
        }
    }
}

fn json_payload(value: Value) -> Option<v1::Payload> {
    Some(v1::Payload {
        body: Some(v1::payload::Body::Json(streamer_api::json::to_proto(value))),
    })
}

/// The soft open-files limit of this process, from /proc (Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---- scenario: progress ----------------------------------------------------

/// What the processors did.
#[derive(Default)]
struct ProcessorCounters {
    claimed: AtomicU64,
    reports_accepted: AtomicU64,
    reports_rejected: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
}

/// Claims [`ACTION`] and runs every request it is handed: `updates` progress
/// reports on one Report stream, as fast as the stream takes them, each
/// stamped with `sent_us` when tonic pulls it for sending, then Complete
/// with `{"n": <payload n>}`. Returns once the Claim stream is open, so the
/// action is declared before any client asks for it.
async fn spawn_processor(
    target: &Target,
    processor_id: String,
    updates: u32,
    counters: Arc<ProcessorCounters>,
    stop: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = target.progress_client().await?;
    let mut work = client
        .clone()
        .claim(v1::ClaimRequest {
            processor_id: processor_id.clone(),
            actions: vec![ACTION.into()],
            max_in_flight: 1000,
            lease_seconds: 60,
        })
        .await?
        .into_inner();
    // Load starts once the server says the processor is registered.
    match work.next().await {
        Some(Ok(v1::ClaimResponse {
            item: Some(Item::Registered(_)),
            ..
        })) => {}
        other => anyhow::bail!("expected the processor's registration, got {other:?}"),
    }
    Ok(tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                () = stop.cancelled() => break,
                item = work.next() => item,
            };
            let request = match item {
                Some(Ok(v1::ClaimResponse {
                    item: Some(Item::Work(request)),
                    ..
                })) => request,
                Some(Ok(_)) => continue,
                Some(Err(status)) => {
                    eprintln!("processor {processor_id}: claim stream failed: {status}");
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => break,
            };
            counters.claimed.fetch_add(1, Ordering::Relaxed);
            let mut client = client.clone();
            let processor_id = processor_id.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    run_request(&mut client, &processor_id, request, updates, &counters).await
                {
                    eprintln!("processor {processor_id}: {e:#}");
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }))
}

async fn run_request(
    client: &mut ProgressServiceClient<Channel>,
    processor_id: &str,
    request: v1::Request,
    updates: u32,
    counters: &ProcessorCounters,
) -> anyhow::Result<()> {
    let n = request
        .payload
        .map(streamer_api::json::from_proto)
        .and_then(|p| p.get("n").cloned())
        .unwrap_or(Value::Null);
    let id = request.id.clone();
    let reporter = processor_id.to_owned();
    // `iter(..).map(..)` is lazy: each report is built, and its timestamp
    // taken, only when the Report stream is ready to send it.
    let reports = futures::stream::iter(1..=updates).map(move |step| {
        let mut metadata = serde_json::Map::new();
        metadata.insert("sent_us".into(), Value::from(now_us()));
        v1::ReportRequest {
            id: id.clone(),
            processor_id: reporter.clone(),
            percentage: f64::from(step) * 100.0 / f64::from(updates),
            message: format!("step {step} of {updates}"),
            metadata: Some(streamer_api::json::object_to_struct(metadata)),
        }
    });
    let summary = client.report(reports).await?.into_inner();
    counters
        .reports_accepted
        .fetch_add(summary.accepted, Ordering::Relaxed);
    counters
        .reports_rejected
        .fetch_add(summary.rejected, Ordering::Relaxed);
    client
        .complete(v1::CompleteRequest {
            id: request.id,
            processor_id: processor_id.to_owned(),
            result: Some(streamer_api::json::to_proto(json!({ "n": n }))),
        })
        .await?;
    counters.completed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// One request as its client saw it.
#[derive(Default)]
struct RequestTrace {
    submitted: Option<Instant>,
    acknowledged: bool,
    last_sequence: u64,
    progress: u64,
    completes: u32,
    completed_at: Option<Instant>,
}

/// What one progress client saw.
#[derive(Default)]
struct ClientOutcome {
    first_submit: Option<Instant>,
    last_complete: Option<Instant>,
    completed: u64,
    progress: u64,
    complete_latency: Vec<Duration>,
    progress_latency: Vec<Duration>,
    violations: Vec<String>,
}

/// Submits `requests` requests at once, then reads until each has its
/// `complete`, checking the protocol; then listens `linger` longer for
/// anything that should not come.
async fn progress_client(
    mut ws: Ws,
    client: usize,
    requests: usize,
    deadline: Instant,
    linger: Duration,
) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    let mut traces: HashMap<String, RequestTrace> = HashMap::new();
    for r in 0..requests {
        let id = format!("c{client}-r{r}");
        let frame = json!({"action": ACTION, "id": id, "payload": {"n": r}});
        let sent = Instant::now();
        out.first_submit.get_or_insert(sent);
        if let Err(e) = ws.send(Message::Text(frame.to_string().into())).await {
            out.violations.push(format!("{id}: submit failed: {e}"));
        }
        traces.entry(id).or_default().submitted = Some(sent);
    }
    let mut finished = 0;
    let mut linger_until: Option<Instant> = None;
    loop {
        let until = linger_until.unwrap_or(deadline);
        let message = match tokio::time::timeout_at(until.into(), next_json(&mut ws)).await {
            Err(_) => break, // deadline, or the end of the linger
            Ok(None) => {
                out.violations
                    .push(format!("client {client}: socket ended"));
                break;
            }
            Ok(Some(Err(e))) => {
                out.violations.push(format!("client {client}: {e:#}"));
                break;
            }
            Ok(Some(Ok(message))) => message,
        };
        let received = Instant::now();
        let received_us = now_us();
        let id = message["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Some(trace) = traces.get_mut(&id) else {
            out.violations.push(format!(
                "client {client}: message for no request: {message}"
            ));
            continue;
        };
        let kind = message["type"].as_str().unwrap_or_default();
        let sequence = message["sequence"].as_u64();
        if trace.completes > 0 {
            out.violations
                .push(format!("{id}: {kind} after its complete: {message}"));
            if kind == "complete" {
                trace.completes += 1;
            }
            continue;
        }
        match kind {
            "acknowledgment" => {
                if trace.acknowledged {
                    out.violations.push(format!("{id}: second acknowledgment"));
                }
                trace.acknowledged = true;
            }
            "progress" | "complete" => {
                if !trace.acknowledged {
                    out.violations
                        .push(format!("{id}: {kind} before its acknowledgment"));
                }
                match sequence {
                    Some(s) if s > trace.last_sequence => trace.last_sequence = s,
                    _ => out.violations.push(format!(
                        "{id}: {kind} sequence {sequence:?} not after {}",
                        trace.last_sequence
                    )),
                }
                if kind == "progress" {
                    trace.progress += 1;
                    out.progress += 1;
                    match message["metadata"]["sent_us"].as_u64() {
                        Some(sent) => out
                            .progress_latency
                            .push(Duration::from_micros(received_us.saturating_sub(sent))),
                        None => out
                            .violations
                            .push(format!("{id}: progress without sent_us")),
                    }
                } else {
                    trace.completes = 1;
                    trace.completed_at = Some(received);
                    finished += 1;
                    out.completed += 1;
                    out.last_complete = Some(received);
                    if let Some(submitted) = trace.submitted {
                        out.complete_latency.push(received - submitted);
                    }
                    let expected: usize = id
                        .rsplit('r')
                        .next()
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(usize::MAX);
                    if message["result"]["n"].as_u64() != Some(expected as u64) {
                        out.violations
                            .push(format!("{id}: wrong result: {message}"));
                    }
                    if finished == requests {
                        linger_until = Some(Instant::now() + linger);
                    }
                }
            }
            _ => out
                .violations
                .push(format!("{id}: unexpected {kind}: {message}")),
        }
    }
    for (id, trace) in &traces {
        if trace.completes == 0 {
            out.violations.push(format!(
                "{id}: no complete (got {} progress)",
                trace.progress
            ));
        }
    }
    let _ = ws.close(None).await;
    out
}

struct ProgressResult {
    /// The server's progress rate limit; None when it is a running
    /// system's own (unknown here).
    rate: Option<f64>,
    clients: usize,
    requests: usize,
    updates: u32,
    processors: usize,
    completed: u64,
    expected: u64,
    progress_delivered: u64,
    reports_accepted: u64,
    reports_rejected: u64,
    processor_errors: u64,
    window: Duration,
    complete_latency: Summary,
    progress_latency: Summary,
    violations: Vec<String>,
}

async fn run_progress(args: &Args, rate: f64) -> anyhow::Result<ProgressResult> {
    let target = Target::open(args, |config| config.progress.progress_rate = rate).await?;
    if args.external() && args.progress_rate.is_some() {
        eprintln!(
            "note: --progress-rate applies only to an in-process system; the running one uses its own"
        );
    }
    let counters = Arc::new(ProcessorCounters::default());
    let stop = Shutdown::new();
    let mut processors = Vec::new();
    for p in 0..args.processors {
        let id = format!("loadgen-p{p}-{}", std::process::id());
        processors.push(
            spawn_processor(&target, id, args.updates, counters.clone(), stop.clone()).await?,
        );
    }
    // Connect every client before the clock starts.
    let run = std::process::id();
    let mut sockets = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let token = target.token(&format!("loadgen-{run}-u{c}"), &args.tenant)?;
        sockets.push(target.connect(&token).await?);
    }
    let deadline = Instant::now() + args.timeout();
    let linger = Duration::from_millis(300);
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(c, ws)| tokio::spawn(progress_client(ws, c, args.requests, deadline, linger)))
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await?);
    }
    stop.cancel();
    for processor in processors {
        let _ = processor.await;
    }
    target.close().await?;

    let first = outcomes.iter().filter_map(|o| o.first_submit).min();
    let last = outcomes.iter().filter_map(|o| o.last_complete).max();
    let window = match (first, last) {
        (Some(first), Some(last)) => last - first,
        _ => Duration::ZERO,
    };
    let mut result = ProgressResult {
        rate: (!args.external()).then_some(rate),
        clients: args.clients,
        requests: args.requests,
        updates: args.updates,
        processors: args.processors,
        completed: 0,
        expected: (args.clients * args.requests) as u64,
        progress_delivered: 0,
        reports_accepted: counters.reports_accepted.load(Ordering::Relaxed),
        reports_rejected: counters.reports_rejected.load(Ordering::Relaxed),
        processor_errors: counters.errors.load(Ordering::Relaxed),
        window,
        complete_latency: Summary::default(),
        progress_latency: Summary::default(),
        violations: Vec::new(),
    };
    let mut complete_latency = Vec::new();
    let mut progress_latency = Vec::new();
    for outcome in outcomes {
        result.completed += outcome.completed;
        result.progress_delivered += outcome.progress;
        complete_latency.extend(outcome.complete_latency);
        progress_latency.extend(outcome.progress_latency);
        result.violations.extend(outcome.violations);
    }
    result.complete_latency = Summary::of(complete_latency);
    result.progress_latency = Summary::of(progress_latency);
    Ok(result)
}

impl ProgressResult {
    fn print(&self) {
        let rate = match self.rate {
            Some(rate) if rate > 0.0 => format!("{rate}/s per request"),
            Some(_) => "unlimited".to_owned(),
            None => "as configured on the running system".to_owned(),
        };
        println!();
        println!(
            "== progress: {} clients x {} requests x {} updates, {} processor(s), progress rate {rate}",
            self.clients, self.requests, self.updates, self.processors
        );
        println!(
            "  completed                          {:>8} of {} in {:.3} s",
            self.completed,
            self.expected,
            self.window.as_secs_f64()
        );
        println!(
            "  requests/s (submit..last complete) {:>11.1}",
            per_second(self.completed, self.window)
        );
        println!(
            "  progress delivered                 {:>8} of {} reported ({:.1}% passed coalescing)",
            self.progress_delivered,
            self.reports_accepted,
            percent(self.progress_delivered, self.reports_accepted)
        );
        println!(
            "  progress messages/s delivered      {:>11.1}",
            per_second(self.progress_delivered, self.window)
        );
        println!(
            "  reports rejected / processor errors {:>7} / {}",
            self.reports_rejected, self.processor_errors
        );
        println!("{}", latency_header());
        println!("{}", self.complete_latency.row("submit -> complete"));
        println!(
            "{}",
            self.progress_latency
                .row("Report send -> progress received")
        );
        println!(
            "  protocol violations                {:>8}",
            self.violations.len()
        );
        for v in self.violations.iter().take(10) {
            println!("    - {v}");
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "scenario": "progress",
            "progress_rate": self.rate,
            "clients": self.clients,
            "requests_per_client": self.requests,
            "updates_per_request": self.updates,
            "processors": self.processors,
            "completed": self.completed,
            "expected": self.expected,
            "window_s": self.window.as_secs_f64(),
            "requests_per_s": per_second(self.completed, self.window),
            "progress_delivered": self.progress_delivered,
            "progress_per_s": per_second(self.progress_delivered, self.window),
            "reports_accepted": self.reports_accepted,
            "reports_rejected": self.reports_rejected,
            "processor_errors": self.processor_errors,
            "complete_latency": self.complete_latency.to_json(),
            "progress_latency": self.progress_latency.to_json(),
            "violations": self.violations.len(),
            "violation_samples": self.violations.iter().take(10).collect::<Vec<_>>(),
        })
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

// ---- scenario: broadcast ---------------------------------------------------

/// A bench message a client received: which broadcast (or Send), and when.
struct Receipt {
    kind: ReceiptKind,
    index: usize,
    at: Instant,
}

#[derive(PartialEq, Eq)]
enum ReceiptKind {
    Broadcast,
    Send,
}

/// Reads one client's socket until `stop`, reporting every bench message.
async fn broadcast_listener(
    mut ws: Ws,
    receipts: mpsc::UnboundedSender<Receipt>,
    unexpected: Arc<AtomicU64>,
    stop: Shutdown,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = next_json(&mut ws) => message,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(_)) | None => {
                unexpected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let at = Instant::now();
        let kind = match message["type"].as_str() {
            Some("loadgen_broadcast") => ReceiptKind::Broadcast,
            Some("loadgen_send") => ReceiptKind::Send,
            _ => {
                unexpected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let index = message["index"].as_u64().unwrap_or(u64::MAX) as usize;
        let _ = receipts.send(Receipt { kind, index, at });
    }
    let _ = ws.close(None).await;
}

struct BroadcastResult {
    clients: usize,
    connect_window: Duration,
    broadcasts: usize,
    lockstep_rpc: Summary,
    lockstep_fanout: Summary,
    lockstep_missing: u64,
    burst_window: Duration,
    burst_deliveries: u64,
    burst_missing: u64,
    not_delivered: u64,
    send_rpc: Summary,
    send_receipt: Summary,
    unexpected: u64,
}

async fn run_broadcast(args: &Args) -> anyhow::Result<BroadcastResult> {
    let k = args.broadcast_clients;
    let (limit, where_) = if args.external() {
        (MAX_EXTERNAL_CLIENTS, "per client process")
    } else {
        (MAX_IN_PROCESS_CLIENTS, "in-process (two sockets each)")
    };
    if k == 0 || k > limit {
        bail!(
            "--broadcast-clients must be 1..={limit} {where_}: the open-files limit is {:?}; \
             for more, target a running system (--gateway ...) from several loadgen processes",
            open_files_limit()
        );
    }
    let target = Target::open(args, |_| {}).await?;
    let run = std::process::id();
    // A tenant of its own, so a running system's other clients are not in it.
    let tenant = format!("{}-{run}", args.tenant);

    // Ramp up: mint (RS256 signing is ~ms each, so on the blocking pool in
    // parallel) and connect with bounded concurrency.
    let key = target.key.clone();
    let tokens: Vec<String> = {
        let tenant = tenant.clone();
        tokio::task::spawn_blocking(move || {
            (0..k)
                .map(|c| {
                    key.mint(&MintOptions {
                        sub: format!("bcast-u{c}"),
                        tenant: tenant.clone(),
                        ..MintOptions::default()
                    })
                })
                .collect::<Result<_, _>>()
        })
        .await??
    };
    let connect_start = Instant::now();
    let target_ref = &target;
    let sockets: Vec<Ws> = futures::stream::iter(tokens)
        .map(|token| async move { target_ref.connect(&token).await })
        .buffered(args.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let connect_window = connect_start.elapsed();

    let (receipts_tx, mut receipts) = mpsc::unbounded_channel();
    let unexpected = Arc::new(AtomicU64::new(0));
    let stop = Shutdown::new();
    let listeners: Vec<_> = sockets
        .into_iter()
        .map(|ws| {
            tokio::spawn(broadcast_listener(
                ws,
                receipts_tx.clone(),
                unexpected.clone(),
                stop.clone(),
            ))
        })
        .collect();
    drop(receipts_tx);

    let mut connections = target.connection_client().await?;
    let probe = connections
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: tenant.clone(),
            user_id: "bcast-u0".into(),
            page: None,
        })
        .await?
        .into_inner()
        .connections
        .into_iter()
        .next()
        .context("the probe client's connection is not listed")?
        .connection_id;

    let broadcast = |index: usize| v1::BroadcastRequest {
        target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
            tenant_id: tenant.clone(),
        })),
        payload: json_payload(json!({"type": "loadgen_broadcast", "index": index})),
        tenant_id: String::new(),
    };
    let deadline = Instant::now() + args.timeout();
    let mut not_delivered = 0u64;

    // Phase 1, lockstep: one broadcast at a time; the next starts when every
    // client has the previous one. Fan-out = RPC start to the last receipt.
    let mut lockstep_rpc = Vec::new();
    let mut lockstep_fanout = Vec::new();
    let mut lockstep_missing = 0u64;
    for index in 0..args.broadcasts {
        let start = Instant::now();
        let response = connections.broadcast(broadcast(index)).await?.into_inner();
        lockstep_rpc.push(start.elapsed());
        not_delivered += (k as u64).saturating_sub(u64::from(response.delivered));
        let mut got = 0;
        let mut last = start;
        while got < k {
            match tokio::time::timeout_at(deadline.into(), receipts.recv()).await {
                Ok(Some(r)) if r.kind == ReceiptKind::Broadcast && r.index == index => {
                    got += 1;
                    last = r.at;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        lockstep_missing += (k - got) as u64;
        if got == k {
            lockstep_fanout.push(last - start);
        }
    }

    // Phase 2, burst: every broadcast back to back, then wait for all
    // deliveries. Throughput = deliveries / (first RPC .. last receipt).
    let offset = args.broadcasts;
    let burst_start = Instant::now();
    for index in offset..offset + args.broadcasts {
        let response = connections.broadcast(broadcast(index)).await?.into_inner();
        not_delivered += (k as u64).saturating_sub(u64::from(response.delivered));
    }
    let expected = (k * args.broadcasts) as u64;
    let mut burst_deliveries = 0u64;
    let mut burst_last = burst_start;
    while burst_deliveries < expected {
        match tokio::time::timeout_at(deadline.into(), receipts.recv()).await {
            Ok(Some(r)) if r.kind == ReceiptKind::Broadcast && r.index >= offset => {
                burst_deliveries += 1;
                burst_last = r.at;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let burst_window = burst_last - burst_start;

    // Phase 3: unary Send to the probe connection, one at a time; RPC
    // latency, and the time until the client has it.
    let mut send_rpc = Vec::new();
    let mut send_receipt = Vec::new();
    for index in 0..args.sends {
        let start = Instant::now();
        let response = connections
            .send(v1::SendRequest {
                connection_id: probe.clone(),
                payload: json_payload(json!({"type": "loadgen_send", "index": index})),
                tenant_id: tenant.clone(),
                sequence: None,
            })
            .await?
            .into_inner();
        send_rpc.push(start.elapsed());
        if response.outcome != v1::DeliveryOutcome::Delivered as i32 {
            not_delivered += 1;
            continue;
        }
        loop {
            match tokio::time::timeout_at(deadline.into(), receipts.recv()).await {
                Ok(Some(r)) if r.kind == ReceiptKind::Send && r.index == index => {
                    send_receipt.push(r.at - start);
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }

    stop.cancel();
    for listener in listeners {
        let _ = listener.await;
    }
    target.close().await?;
    Ok(BroadcastResult {
        clients: k,
        connect_window,
        broadcasts: args.broadcasts,
        lockstep_rpc: Summary::of(lockstep_rpc),
        lockstep_fanout: Summary::of(lockstep_fanout),
        lockstep_missing,
        burst_window,
        burst_deliveries,
        burst_missing: expected - burst_deliveries,
        not_delivered,
        send_rpc: Summary::of(send_rpc),
        send_receipt: Summary::of(send_receipt),
        unexpected: unexpected.load(Ordering::Relaxed),
    })
}

impl BroadcastResult {
    fn print(&self) {
        println!();
        println!(
            "== broadcast: {} clients of one tenant, {} broadcasts per phase",
            self.clients, self.broadcasts
        );
        println!(
            "  connect ramp                       {:>8} sockets in {:.3} s ({:.0}/s)",
            self.clients,
            self.connect_window.as_secs_f64(),
            per_second(self.clients as u64, self.connect_window)
        );
        println!(
            "  burst deliveries/s                 {:>11.0} ({} deliveries in {:.3} s)",
            per_second(self.burst_deliveries, self.burst_window),
            self.burst_deliveries,
            self.burst_window.as_secs_f64()
        );
        println!(
            "  missing (lockstep / burst)         {:>8} / {}",
            self.lockstep_missing, self.burst_missing
        );
        println!(
            "  not DELIVERED by the RPC / unexpected messages {} / {}",
            self.not_delivered, self.unexpected
        );
        println!("{}", latency_header());
        println!("{}", self.lockstep_rpc.row("Broadcast RPC (lockstep)"));
        println!(
            "{}",
            self.lockstep_fanout.row("Broadcast -> last client has it")
        );
        println!("{}", self.send_rpc.row("Send RPC"));
        println!("{}", self.send_receipt.row("Send -> client has it"));
    }

    fn to_json(&self) -> Value {
        json!({
            "scenario": "broadcast",
            "clients": self.clients,
            "connect_s": self.connect_window.as_secs_f64(),
            "connects_per_s": per_second(self.clients as u64, self.connect_window),
            "broadcasts_per_phase": self.broadcasts,
            "lockstep_rpc": self.lockstep_rpc.to_json(),
            "lockstep_fanout": self.lockstep_fanout.to_json(),
            "lockstep_missing": self.lockstep_missing,
            "burst_deliveries": self.burst_deliveries,
            "burst_s": self.burst_window.as_secs_f64(),
            "burst_deliveries_per_s": per_second(self.burst_deliveries, self.burst_window),
            "burst_missing": self.burst_missing,
            "not_delivered": self.not_delivered,
            "unexpected_messages": self.unexpected,
            "send_rpc": self.send_rpc.to_json(),
            "send_receipt": self.send_receipt.to_json(),
        })
    }
}

// ---- main ------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if !args.bench {
        args.shrink_for_smoke();
    }
    epoch();
    // The servers' logs would drown the tables; warnings still show.
    streamer_core::telemetry::init_logs(streamer_core::telemetry::LogFormat::Plain, "warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mode = if args.external() {
        format!(
            "running system (edge {})",
            args.gateway.map(|a| a.to_string()).unwrap_or_default()
        )
    } else {
        "in-process system on loopback".to_owned()
    };
    println!(
        "loadgen: {mode}; {} cores; open-files limit {:?}{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        open_files_limit(),
        if args.bench {
            ""
        } else {
            " (smoke run: no --bench flag)"
        }
    );
    if !args.listener_nodelay.is_empty() {
        println!(
            "experiment: TCP_NODELAY on the listening sockets of {:?}",
            args.listener_nodelay
        );
    }
    let rates = match (args.scenario, args.progress_rate) {
        (_, Some(rate)) => vec![rate],
        (Scenario::All, None) => vec![10.0, 0.0],
        (_, None) => vec![10.0],
    };
    let mut results = Vec::new();
    let mut failed = false;
    if matches!(args.scenario, Scenario::All | Scenario::Progress) {
        for rate in rates {
            let result = run_progress(&args, rate).await?;
            result.print();
            failed |= !result.violations.is_empty() || result.completed != result.expected;
            results.push(result.to_json());
        }
    }
    if matches!(args.scenario, Scenario::All | Scenario::Broadcast) {
        let result = run_broadcast(&args).await?;
        result.print();
        failed |= result.lockstep_missing + result.burst_missing > 0;
        results.push(result.to_json());
    }
    if matches!(args.scenario, Scenario::All | Scenario::Soak) {
        let result = soak::run_soak(&args).await?;
        result.print();
        failed |= result.failed();
        results.push(result.to_json());
    }
    if matches!(args.scenario, Scenario::All | Scenario::IdleMemory) {
        let result = idle_memory::run_idle_memory(&args).await?;
        result.print();
        results.push(result.to_json());
    }
    // Not in `all` but for the smoke run: it needs moto (and skips itself
    // when moto is missing there).
    let cost =
        args.scenario == Scenario::StoreCost || (args.scenario == Scenario::All && !args.bench);
    if cost && let Some(result) = store_cost::run_store_cost(&args).await? {
        result.print();
        failed |= result.failed();
        results.push(result.to_json());
    }
    // Not in `all` but for the smoke run: it installs packages and takes
    // minutes (the smoke run installs nothing and skips nchan when nginx is
    // not here).
    if args.scenario == Scenario::VersusNchan || (args.scenario == Scenario::All && !args.bench) {
        let result = peer::run_versus_nchan(&args).await?;
        result.print();
        failed |= result.failed();
        results.push(result.to_json());
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "runs": results }))?
        );
    }
    if failed {
        bail!(
            "some requests or deliveries were missing or out of protocol, or an attacker \
             was not refused as expected (see above)"
        );
    }
    Ok(())
}
