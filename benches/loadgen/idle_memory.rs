//! `idle-memory`: what an idle authenticated connection costs the edge, and
//! whether that memory comes back when the sockets close.
//!
//! The system under test is the `streamer all` binary in a process of its
//! own (so its resident memory is its alone), on ephemeral loopback ports
//! and a fresh data directory. Each client mints its own token (one user per
//! socket, one tenant), upgrades, and then says nothing. Resident memory
//! (VmRSS) is read from /proc when it has settled: before any socket, with
//! every socket open and idle, and after they all closed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};
use streamer_auth::dev::MintOptions;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Args, Ws, open_files_limit};

/// Client sockets this process holds (one descriptor each), under the
/// 20,000 open files a process may have; the server's are in its own.
const MAX_IDLE_CLIENTS: usize = 15_000;

pub(crate) struct IdleMemoryResult {
    clients: usize,
    connect_window: Duration,
    base_kib: u64,
    open_kib: u64,
    closed_kib: u64,
}

impl IdleMemoryResult {
    fn per_connection_kib(&self) -> f64 {
        self.open_kib.saturating_sub(self.base_kib) as f64 / self.clients as f64
    }

    /// Of what the sockets took, the part still held once they closed.
    fn kept_after_close(&self) -> f64 {
        let taken = self.open_kib.saturating_sub(self.base_kib);
        if taken == 0 {
            return 0.0;
        }
        self.closed_kib.saturating_sub(self.base_kib) as f64 / taken as f64
    }

    pub(crate) fn print(&self) {
        println!(
            "\nidle-memory: {} idle authenticated connections to `streamer all` (its own process)",
            self.clients
        );
        println!(
            "  resident memory: {:.1} MiB before, {:.1} MiB with every socket open, {:.1} MiB after they closed",
            self.base_kib as f64 / 1024.0,
            self.open_kib as f64 / 1024.0,
            self.closed_kib as f64 / 1024.0
        );
        println!(
            "  per idle connection: {:.1} KiB; kept after close: {:.0}% of it; connected in {:.1} s",
            self.per_connection_kib(),
            self.kept_after_close() * 100.0,
            self.connect_window.as_secs_f64()
        );
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "scenario": "idle-memory",
            "clients": self.clients,
            "rss_kib": {"before": self.base_kib, "open": self.open_kib, "closed": self.closed_kib},
            "per_connection_kib": self.per_connection_kib(),
            "kept_after_close": self.kept_after_close(),
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
        let (gateway, connection) = tokio::time::timeout(Duration::from_secs(60), async {
            let (mut gateway, mut connection) = (None, None);
            while let Some(line) = lines.next_line().await? {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("WebSocket") {
                    gateway = rest
                        .trim()
                        .strip_prefix("ws://")
                        .and_then(|url| url.split('/').next())
                        .and_then(|address| address.parse().ok());
                } else if let Some(rest) = line.strip_prefix("ConnectionService") {
                    connection = rest.trim().parse().ok();
                }
                if let (Some(gateway), Some(connection)) = (gateway, connection) {
                    return Ok::<_, anyhow::Error>((gateway, connection));
                }
            }
            bail!("streamer ended before its banner named the edge and ConnectionService")
        })
        .await
        .context("no banner within 60 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            pid,
            gateway,
            connection,
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
    let streamer = StreamerProcess::spawn(&[]).await?;
    let (pid, gateway) = (streamer.pid, streamer.gateway);
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closed_kib = settled_rss(pid, Duration::from_secs(20)).await?;
    streamer.stop().await;
    Ok(IdleMemoryResult {
        clients: n,
        connect_window,
        base_kib,
        open_kib,
        closed_kib,
    })
}
