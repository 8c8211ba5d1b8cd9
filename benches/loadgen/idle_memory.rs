//! `idle-memory`: what an idle authenticated connection costs the edge, and
//! whether that memory comes back when the sockets close.
//!
//! The system under test is the `streamer all` binary in a process of its
//! own (so its resident memory is its alone), on ephemeral loopback ports
//! and a fresh data directory. Each client mints its own token (one user per
//! socket, one tenant), upgrades, and then says nothing. Resident memory
//! (VmRSS) is read from /proc when it has settled: before any socket, and
//! with every socket open and idle. Then the sockets close; once the edge's
//! own gauge counts none left, resident memory is read again, and then
//! every half second for up to `--idle-return-secs` (default 30) until it
//! has come back (to within [`RETURNED`] of what the sockets took): an
//! allocator that gives memory back does it over a few seconds, not at the
//! instant of the free.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};
use streamer_auth::dev::MintOptions;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Args, Ws, open_files_limit};

/// Client sockets this process holds (one descriptor each), under the
/// 20,000 open files a process may have; the server's are in its own.
const MAX_IDLE_CLIENTS: usize = 15_000;

/// Memory counts as back when at most this share of what the sockets took
/// is still held.
const RETURNED: f64 = 0.05;

pub(crate) struct IdleMemoryResult {
    clients: usize,
    connect_window: Duration,
    base_kib: u64,
    open_kib: u64,
    /// When the edge counted the last socket closed.
    closed_kib: u64,
    /// At the end of the wait for memory to come back.
    returned_kib: u64,
    /// From the last close to `returned_kib`.
    return_wait: Duration,
    /// How long it could have been.
    return_patience: Duration,
}

impl IdleMemoryResult {
    fn per_connection_kib(&self) -> f64 {
        self.open_kib.saturating_sub(self.base_kib) as f64 / self.clients as f64
    }

    /// Of what the sockets took, the part still held when resident memory
    /// was `kib`.
    fn kept(&self, kib: u64) -> f64 {
        let taken = self.open_kib.saturating_sub(self.base_kib);
        if taken == 0 {
            return 0.0;
        }
        kib.saturating_sub(self.base_kib) as f64 / taken as f64
    }

    pub(crate) fn print(&self) {
        println!(
            "\nidle-memory: {} idle authenticated connections to `streamer all` (its own process)",
            self.clients
        );
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "  resident memory: {:.1} MiB before, {:.1} MiB with every socket open, \
             {:.1} MiB when the last one closed, {:.1} MiB {:.1} s later",
            mib(self.base_kib),
            mib(self.open_kib),
            mib(self.closed_kib),
            mib(self.returned_kib),
            self.return_wait.as_secs_f64()
        );
        println!(
            "  per idle connection: {:.1} KiB; connected in {:.1} s",
            self.per_connection_kib(),
            self.connect_window.as_secs_f64()
        );
        let kept = self.kept(self.returned_kib);
        println!(
            "  after close: {:.0}% of it still held at the last close, {:.0}% after {:.1} s \
             ({:.0}% given back{})",
            self.kept(self.closed_kib) * 100.0,
            kept * 100.0,
            self.return_wait.as_secs_f64(),
            (1.0 - kept) * 100.0,
            if kept <= RETURNED {
                String::new()
            } else {
                format!("; not back within {} s", self.return_patience.as_secs())
            }
        );
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "scenario": "idle-memory",
            "clients": self.clients,
            "rss_kib": {
                "before": self.base_kib,
                "open": self.open_kib,
                "closed": self.closed_kib,
                "returned": self.returned_kib,
            },
            "per_connection_kib": self.per_connection_kib(),
            "kept_at_close": self.kept(self.closed_kib),
            "kept_after_wait": self.kept(self.returned_kib),
            "return_wait_secs": self.return_wait.as_secs_f64(),
            "connect_secs": self.connect_window.as_secs_f64(),
        })
    }
}

/// The process's resident memory, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// Resident memory once it stops moving: two samples 500 ms apart within
/// 1% of each other (or the last sample after `patience`).
async fn settled_rss(pid: u32, patience: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + patience;
    let mut last = rss_kib(pid)?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pid)?;
        if now.abs_diff(last) * 100 <= last || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// The edge's count of open sockets (`streamer_gateway_connections{state="open"}`), read
/// from the Prometheus endpoint at `metrics`.
async fn edge_connections(metrics: &str) -> anyhow::Result<f64> {
    let mut stream = tokio::net::TcpStream::connect(metrics).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    text.lines()
        .find_map(|line| line.strip_prefix("streamer_gateway_connections{state=\"open\"} "))
        .and_then(|value| value.trim().parse().ok())
        .context("no streamer_gateway_connections in the metrics")
}

/// Waits until the edge counts no socket open.
async fn all_closed(metrics: &str, patience: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        let open = edge_connections(metrics).await?;
        if open == 0.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the edge still counts {open} sockets open {patience:?} after they closed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `streamer all` binary that `cargo bench` built, running as a
/// process of its own on ephemeral loopback ports and a fresh data
/// directory (which holds the development key its tokens are minted with).
/// Killed when dropped.
pub(crate) struct StreamerProcess {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    /// The WebSocket edge.
    pub(crate) gateway: SocketAddr,
    /// ConnectionService.
    pub(crate) connection: SocketAddr,
    /// The Prometheus endpoint.
    pub(crate) metrics: SocketAddr,
    pub(crate) data_dir: tempfile::TempDir,
}

impl StreamerProcess {
    /// Starts `streamer all` with `extra` flags and waits for its banner,
    /// which it prints once everything listens.
    pub(crate) async fn spawn(extra: &[&str]) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir()?;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamer"))
            .arg("all")
            .arg("--data-dir")
            .arg(data_dir.path())
            .args([
                "--auth-listen",
                "127.0.0.1:0",
                "--connection-listen",
                "127.0.0.1:0",
                "--connection-edge-listen",
                "127.0.0.1:0",
                "--progress-listen",
                "127.0.0.1:0",
                "--gateway-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("STREAMER_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the streamer binary")?;
        let pid = child.id().context("streamer exited at once")?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let (gateway, connection, metrics) = tokio::time::timeout(Duration::from_secs(60), async {
            let address = |rest: &str, scheme: &str| {
                rest.trim()
                    .strip_prefix(scheme)
                    .and_then(|url| url.split('/').next())
                    .and_then(|address| address.parse::<SocketAddr>().ok())
            };
            let (mut gateway, mut connection, mut metrics) = (None, None, None);
            while let Some(line) = lines.next_line().await? {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("WebSocket") {
                    gateway = address(rest, "ws://");
                } else if let Some(rest) = line.strip_prefix("ConnectionService") {
                    connection = rest.trim().parse().ok();
                } else if let Some(rest) = line.strip_prefix("Metrics") {
                    metrics = address(rest, "http://");
                }
                if let (Some(gateway), Some(connection), Some(metrics)) =
                    (gateway, connection, metrics)
                {
                    return Ok::<_, anyhow::Error>((gateway, connection, metrics));
                }
            }
            bail!("streamer ended before its banner named the edge, ConnectionService and metrics")
        })
        .await
        .context("no banner within 60 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            pid,
            gateway,
            connection,
            metrics,
            data_dir,
        })
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub(crate) async fn run_idle_memory(args: &Args) -> anyhow::Result<IdleMemoryResult> {
    let n = args.idle_clients;
    if n == 0 || n > MAX_IDLE_CLIENTS {
        bail!(
            "--idle-clients must be 1..={MAX_IDLE_CLIENTS}: the open-files limit is {:?}",
            open_files_limit()
        );
    }
    // The edge's default cap is 10,000 sockets.
    let cap = n.to_string();
    let streamer = StreamerProcess::spawn(&["--max-connections", &cap]).await?;
    let (pid, gateway, metrics) = (streamer.pid, streamer.gateway, streamer.metrics.to_string());
    let key = streamer_auth::dev::load_dev_key(streamer.data_dir.path())?;
    let tokens: Vec<String> = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|c| {
                key.mint(&MintOptions {
                    sub: format!("idle-u{c}"),
                    tenant: "idle".into(),
                    ..MintOptions::default()
                })
            })
            .collect::<Result<_, _>>()
    })
    .await??;

    let base_kib = settled_rss(pid, Duration::from_secs(10)).await?;
    // The client's own buffers stay small: the client is not measured, but
    // it shares the machine.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let started = Instant::now();
    let gateway = &gateway;
    let sockets: Vec<Ws> = futures::stream::iter(tokens)
        .map(|token| async move {
            let url = format!("ws://{gateway}/?Authorization={token}");
            let (ws, _) = tokio::time::timeout(
                Duration::from_secs(30),
                tokio_tungstenite::connect_async_with_config(url, Some(config), false),
            )
            .await
            .context("websocket connect timed out")??;
            Ok::<_, anyhow::Error>(ws)
        })
        .buffered(args.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let connect_window = started.elapsed();
    let open_kib = settled_rss(pid, Duration::from_secs(20)).await?;
    drop(sockets);
    // The edge notices each close as it reads it.
    all_closed(&metrics, Duration::from_secs(30)).await?;
    let closed = Instant::now();
    let closed_kib = rss_kib(pid)?;
    let return_patience = Duration::from_secs(args.idle_return_secs);
    let back = base_kib + ((open_kib.saturating_sub(base_kib)) as f64 * RETURNED) as u64;
    let mut returned_kib = closed_kib;
    while returned_kib > back && closed.elapsed() < return_patience {
        tokio::time::sleep(Duration::from_millis(500)).await;
        returned_kib = rss_kib(pid)?;
    }
    let return_wait = closed.elapsed();
    streamer.stop().await;
    Ok(IdleMemoryResult {
        clients: n,
        connect_window,
        base_kib,
        open_kib,
        closed_kib,
        returned_kib,
        return_wait,
        return_patience,
    })
}
