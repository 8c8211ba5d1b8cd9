//! `versus-nchan`: Streamer beside its peer, nginx with the nchan module,
//! measured in the same run by the same lean client.
//!
//! Each server runs as processes of its own on loopback: `streamer all`
//! (the binary `cargo bench` built, a fresh data directory), then nginx
//! with Debian's `libnginx-mod-nchan` on a configuration written for the
//! run (one worker per core). Both get WebSocket subscribers, and one
//! publisher on one connection: Streamer's is a tenant `Broadcast` to
//! ConnectionService (every subscriber of a set is a user of one tenant),
//! nchan's an HTTP POST to its publisher location (every subscriber of a
//! set is on one channel), on a kept-alive HTTP/1.1 connection. Each
//! publish waits for the server's answer before the next. Messages are 64
//! bytes. The subscribers are [`lean_ws`]'s, which read frame headers only.
//!
//! For each server, in this order:
//!
//! 1. **Memory before**: the resident memory of its processes once it stops
//!    moving.
//! 2. **Connect, open loop**: the largest set of subscribers connects at a
//!    fixed arrival rate (`--peer-connect-rate`), each connect started on
//!    schedule whatever the others do; the time of each from its TCP
//!    connect to the `101` (for Streamer the token is checked in between).
//! 3. **Idle memory**: with those subscribers connected and idle, memory
//!    again; the growth per connection.
//! 4. **Fan-out** to the same subscribers: after a warm-up message reached
//!    every one, `--peer-publishes` publishes in lockstep (the next when
//!    every subscriber has the previous); for each, the time from its send
//!    to the last subscriber's receipt.
//! 5. **Burst** to the same subscribers: `--peer-burst` publishes back to
//!    back, each sent once the server answered the previous; deliveries per
//!    second from the first send to the last receipt.
//! 6. **Fan-out** to each smaller set (`--peer-sockets`), freshly connected.
//!
//! Beside them, to read them by: each server's CPU time per connect and per
//! delivered message, and the CPU other work on the machine took while each
//! server was measured.
//!
//! A subscriber knows a publish by its place: the k-th 64-byte message on a
//! socket is the k-th measured publish (both servers keep a socket's order),
//! and a message of any other length is a warm-up. Streamer sends nothing on
//! its own after the upgrade but pings, which are answered.
//!
//! Switching Streamer's publisher to another RPC (a topic `Publish`) is a
//! change to [`StreamerPeer`]'s `subscribers` and `publish` alone.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};
use streamer_api::v1::{self, connection_service_client::ConnectionServiceClient};
use streamer_auth::dev::{DevKey, MintOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::idle_memory::StreamerProcess;
use super::lean_ws::{self, Tally};
use super::{Args, Summary, now_us, open_files_limit};

/// The length of every measured message.
const MESSAGE_LEN: usize = 64;
/// A warm-up message: any length but [`MESSAGE_LEN`].
const WARM_UP: &str = "warm-up";
/// Where Debian's `libnginx-mod-nchan` puts the module.
const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";
/// Subscribers this process holds at once (one descriptor each), under the
/// 20,000 open files a process may have; the servers' are in their own.
const MAX_SOCKETS: usize = 15_000;
/// One connect, from its TCP connect to the `101`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Where `--write-benchmarks` writes, relative to the repository.
const BENCHMARKS_MD: &str = "BENCHMARKS.md";
const PLOT_PNG: &str = "benches/peer-fanout.png";
const PLOT_SCRIPT: &str = "benches/plot_peer.py";
const BEGIN_MARK: &str = "<!-- peer:begin -->";
const END_MARK: &str = "<!-- peer:end -->";

// ---- the servers -------------------------------------------------------------

/// A server under test, as the benchmark drives it. A *group* is a set of
/// subscribers that one publish reaches.
trait Peer {
    fn name(&self) -> &'static str;
    /// Where its WebSocket subscribers connect.
    fn address(&self) -> SocketAddr;
    /// The request targets (path and query) of `n` subscribers of `group`.
    async fn subscribers(&mut self, group: &str, n: usize) -> anyhow::Result<Vec<String>>;
    /// Publishes `payload` to every subscriber of `group`; returns once the
    /// server has answered.
    async fn publish(&mut self, group: &str, payload: &str) -> anyhow::Result<()>;
    /// Its processes, for memory and profiles.
    fn pids(&self) -> Vec<u32>;
}

/// `streamer all` in its own process. A group is a tenant; each subscriber
/// is a user of it with a token of its own, minted with the development key
/// in the system's data directory, and publishing is a tenant `Broadcast`.
struct StreamerPeer {
    process: StreamerProcess,
    key: DevKey,
    connections: ConnectionServiceClient<Channel>,
}

impl StreamerPeer {
    async fn start() -> anyhow::Result<Self> {
        // The edge's cap defaults to 10,000 sockets; the open-files limit
        // still bounds it.
        let process = StreamerProcess::spawn(&["--max-connections", "20000"]).await?;
        let key = streamer_auth::dev::load_dev_key(process.data_dir.path())?;
        let connections =
            ConnectionServiceClient::connect(format!("http://{}", process.connection)).await?;
        Ok(Self {
            process,
            key,
            connections,
        })
    }
}

impl Peer for StreamerPeer {
    fn name(&self) -> &'static str {
        "Streamer"
    }

    fn address(&self) -> SocketAddr {
        self.process.gateway
    }

    async fn subscribers(&mut self, group: &str, n: usize) -> anyhow::Result<Vec<String>> {
        // RS256 signing takes about a millisecond: both cores, before the
        // clock starts.
        let halves = [(0, n / 2), (n / 2, n)].map(|(from, to)| {
            let key = self.key.clone();
            let group = group.to_owned();
            tokio::task::spawn_blocking(move || {
                (from..to)
                    .map(|i| {
                        key.mint(&MintOptions {
                            sub: format!("{group}-u{i}"),
                            tenant: group.clone(),
                            ..MintOptions::default()
                        })
                        .map(|token| format!("/?Authorization={token}"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
        });
        let mut targets = Vec::with_capacity(n);
        for half in halves {
            targets.extend(half.await??);
        }
        Ok(targets)
    }

    async fn publish(&mut self, group: &str, payload: &str) -> anyhow::Result<()> {
        self.connections
            .broadcast(v1::BroadcastRequest {
                target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                    tenant_id: group.to_owned(),
                })),
                payload: Some(v1::Payload {
                    body: Some(v1::payload::Body::Text(payload.to_owned())),
                }),
                tenant_id: String::new(),
            })
            .await?;
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.process.pid]
    }
}

/// nginx with nchan. A group is a channel: subscribers at `/sub/<group>`,
/// publishes POSTed to `/pub/<group>`.
struct NchanPeer {
    nginx: Nginx,
    publisher: HttpConnection,
}

impl NchanPeer {
    async fn start() -> anyhow::Result<Self> {
        let nginx = Nginx::start().await?;
        let publisher = HttpConnection::open(nginx.address).await?;
        Ok(Self { nginx, publisher })
    }
}

impl Peer for NchanPeer {
    fn name(&self) -> &'static str {
        "nchan"
    }

    fn address(&self) -> SocketAddr {
        self.nginx.address
    }

    async fn subscribers(&mut self, group: &str, n: usize) -> anyhow::Result<Vec<String>> {
        Ok(vec![format!("/sub/{group}"); n])
    }

    async fn publish(&mut self, group: &str, payload: &str) -> anyhow::Result<()> {
        let status = self
            .publisher
            .post(&format!("/pub/{group}"), payload.as_bytes())
            .await?;
        if !(200..300).contains(&status) {
            bail!("nchan answered a publish with HTTP {status}");
        }
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.nginx.master];
        pids.extend(children(self.nginx.master));
        pids
    }
}

/// An nginx master process (and its workers) on a configuration of its
/// own in a temporary directory. Stopped when dropped, even on an error.
struct Nginx {
    child: std::process::Child,
    master: u32,
    address: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nginx {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // A free port, chosen by the kernel and handed to nginx: another
        // process could take it in between, which is unlikely enough.
        let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, nginx_config(dir.path(), address))?;
        let child = std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx")?;
        let master = child.id();
        let mut nginx = Self {
            child,
            master,
            address,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                bail!(
                    "nginx exited at once ({status}): {}",
                    std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default()
                );
            }
            if TcpStream::connect(address).await.is_ok() && !children(master).is_empty() {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {address} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let workers = children(self.master);
        // Fast shutdown: the master stops its workers, then itself.
        signal("TERM", self.master);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in std::iter::once(self.master).chain(workers) {
            if Path::new(&format!("/proc/{pid}")).exists() {
                signal("KILL", pid);
            }
        }
        let _ = self.child.wait();
    }
}

/// The whole configuration: one worker per core, loopback only, every path
/// in `dir`. nchan keeps its defaults, except that a new subscriber starts
/// with the next message rather than those already in the channel.
fn nginx_config(dir: &Path, address: SocketAddr) -> String {
    let dir = dir.display();
    format!(
        "load_module {NCHAN_MODULE};
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 20000;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {address};
        location ~ ^/sub/(\\w+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
        }}
        location ~ ^/pub/(\\w+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
        }}
    }}
}}
"
    )
}

/// The processes whose parent is `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // The name, in parentheses, may hold spaces: the
                    // parent is the second field after it.
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Sends a signal by name through `kill(1)`.
fn signal(name: &str, pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// One kept-alive HTTP/1.1 connection that POSTs and reads each answer
/// (its head, and a body of `Content-Length` bytes).
struct HttpConnection {
    address: SocketAddr,
    stream: TcpStream,
    /// Bytes read past the last answer.
    buffered: Vec<u8>,
}

impl HttpConnection {
    async fn open(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            address,
            stream,
            buffered: Vec::new(),
        })
    }

    /// POSTs `body` to `path`; the answer's status.
    async fn post(&mut self, path: &str, body: &[u8]) -> anyhow::Result<u16> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\n\
             Accept: text/plain\r\nContent-Length: {}\r\n\r\n",
            self.address,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.stream.write_all(&request).await?;
        let (head, mut rest) =
            lean_ws::read_head(&mut self.stream, std::mem::take(&mut self.buffered)).await?;
        let head = String::from_utf8_lossy(&head);
        let status = lean_ws::status_code(&head)?;
        let length: usize = lean_ws::header(&head, "content-length")
            .and_then(|value| value.parse().ok())
            .context("an answer without Content-Length")?;
        while rest.len() < length {
            let mut chunk = [0u8; 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the publisher's connection closed mid-answer");
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        self.buffered = rest.split_off(length);
        if lean_ws::header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            *self = Self::open(self.address).await?;
        }
        Ok(status)
    }
}

// ---- installing what it needs ------------------------------------------------

/// Whether nginx and the nchan module are here; installs them with apt
/// (quietly; an `apt-get update` first only when the install fails) when
/// `install` says so.
fn ensure_nchan(install: bool) -> anyhow::Result<bool> {
    let present = || {
        Path::new(NCHAN_MODULE).exists()
            && std::process::Command::new("nginx")
                .arg("-v")
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    };
    if present() {
        return Ok(true);
    }
    if !install {
        return Ok(false);
    }
    println!("versus-nchan: installing nginx and libnginx-mod-nchan (apt-get)");
    let apt_install = || {
        quiet(
            std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "nginx", "libnginx-mod-nchan"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if apt_install().is_err() {
        quiet(std::process::Command::new("apt-get").args(["update", "-qq"]))?;
        apt_install()?;
    }
    if !present() {
        bail!("nginx or {NCHAN_MODULE} is still missing after apt-get install");
    }
    Ok(true)
}

/// Whether python3 can import matplotlib; installs it with pip when not.
fn ensure_matplotlib() -> anyhow::Result<()> {
    let present = || {
        std::process::Command::new("python3")
            .args(["-c", "import matplotlib"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !present() {
        println!("versus-nchan: installing matplotlib (pip)");
        quiet(std::process::Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "matplotlib",
        ]))?;
    }
    Ok(())
}

/// Runs a command with its output kept, shown only when it fails.
fn quiet(command: &mut std::process::Command) -> anyhow::Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Raises this process's soft open-files limit to its hard limit (the
/// servers, started from here, inherit it).
fn raise_open_files() -> anyhow::Result<u64> {
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    rlimit::Resource::NOFILE.set(hard, hard)?;
    Ok(hard)
}

// ---- memory --------------------------------------------------------------------

/// Resident memory of a set of processes, in KiB: RSS counts a page shared
/// by several processes in each of them, PSS divides it among them.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    pss_kib: u64,
}

fn memory(pids: &[u32]) -> anyhow::Result<Memory> {
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let mut total = Memory::default();
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        total.rss_kib += field(&status, "VmRSS:").context("no VmRSS")?;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        total.pss_kib += field(&rollup, "Pss:").context("no Pss")?;
    }
    Ok(total)
}

/// Memory once it stops moving: two samples 500 ms apart within 1% (or
/// the last one after `patience`).
async fn settled_memory(pids: &[u32], patience: Duration) -> anyhow::Result<Memory> {
    let deadline = Instant::now() + patience;
    let mut last = memory(pids)?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = memory(pids)?;
        if now.rss_kib.abs_diff(last.rss_kib) * 100 <= last.rss_kib || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

// ---- the subscribers -------------------------------------------------------------

/// A set of connected subscribers: their reader tasks (aborting one closes
/// its socket) and what they received.
struct Subscribers {
    group: String,
    readers: Vec<JoinHandle<()>>,
    tally: Arc<Tally>,
    connected: usize,
}

impl Subscribers {
    async fn close(self) {
        for reader in &self.readers {
            reader.abort();
        }
        for reader in self.readers {
            let _ = reader.await;
        }
    }
}

/// How an open-loop connect went.
#[derive(Debug, Clone, Default)]
struct ConnectFigures {
    rate: f64,
    attempted: usize,
    latency: Summary,
    failures: usize,
    /// A few of the failures, for the report.
    failure_samples: Vec<String>,
    /// How late the client started a connect, at worst (its own timer).
    schedule_lag_max: Duration,
    /// The first scheduled start to the last `101`.
    window: Duration,
}

/// Connects `targets` open loop, at `rate` per second: the i-th connect
/// starts at i / rate seconds whatever became of the others. Each
/// subscriber reads on from its `101`, counting into `tally`.
async fn connect_open_loop(
    address: SocketAddr,
    group: &str,
    targets: Vec<String>,
    rate: f64,
    tally: Arc<Tally>,
) -> (Subscribers, ConnectFigures) {
    let attempted = targets.len();
    let (done, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let begin = Instant::now() + Duration::from_millis(50);
    let mut readers = Vec::with_capacity(attempted);
    let mut schedule_lag_max = Duration::ZERO;
    for (i, target) in targets.into_iter().enumerate() {
        let due = begin + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        schedule_lag_max = schedule_lag_max.max(due.elapsed());
        let done = done.clone();
        let tally = tally.clone();
        readers.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = tokio::time::timeout(CONNECT_TIMEOUT, lean_ws::connect(address, &target))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no 101 within {CONNECT_TIMEOUT:?}")));
            let latency = started.elapsed();
            match outcome {
                Ok((stream, first)) => {
                    let _ = done.send(Ok((latency, Instant::now())));
                    // The collector waits for every sender to go.
                    drop(done);
                    lean_ws::subscribe(stream, first, tally).await;
                }
                Err(e) => {
                    let _ = done.send(Err(format!("{e:#}")));
                }
            }
        }));
    }
    drop(done);
    let mut latencies = Vec::with_capacity(attempted);
    let mut failure_samples = Vec::new();
    let mut failures = 0;
    let mut last = begin;
    while let Some(outcome) = outcomes.recv().await {
        match outcome {
            Ok((latency, at)) => {
                latencies.push(latency);
                last = last.max(at);
            }
            Err(e) => {
                failures += 1;
                if failure_samples.len() < 5 && !failure_samples.contains(&e) {
                    failure_samples.push(e);
                }
            }
        }
    }
    let connected = latencies.len();
    tally.expect(connected);
    (
        Subscribers {
            group: group.to_owned(),
            readers,
            tally,
            connected,
        },
        ConnectFigures {
            rate,
            attempted,
            latency: Summary::of(latencies),
            failures,
            failure_samples,
            schedule_lag_max,
            window: last - begin,
        },
    )
}

/// Connects `targets`, `concurrency` at a time; every one must succeed.
async fn connect_closed_loop(
    address: SocketAddr,
    group: &str,
    targets: Vec<String>,
    concurrency: usize,
    tally: Arc<Tally>,
) -> anyhow::Result<Subscribers> {
    let sockets: Vec<(TcpStream, Vec<u8>)> = futures::stream::iter(targets)
        .map(|target| async move {
            tokio::time::timeout(CONNECT_TIMEOUT, lean_ws::connect(address, &target))
                .await
                .context("no 101 in time")?
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let connected = sockets.len();
    tally.expect(connected);
    let readers = sockets
        .into_iter()
        .map(|(stream, first)| tokio::spawn(lean_ws::subscribe(stream, first, tally.clone())))
        .collect();
    Ok(Subscribers {
        group: group.to_owned(),
        readers,
        tally,
        connected,
    })
}

/// The message of measured publish `index`: [`MESSAGE_LEN`] bytes.
fn message(index: usize) -> String {
    let text = format!("publish {index:08} ");
    format!("{text:x<MESSAGE_LEN$}")
}

/// Publishes through `peer`, giving up at `deadline` if the server does
/// not answer.
async fn publish<P: Peer>(
    peer: &mut P,
    group: &str,
    payload: &str,
    deadline: Instant,
) -> anyhow::Result<()> {
    let name = peer.name();
    tokio::time::timeout_at(deadline.into(), peer.publish(group, payload))
        .await
        .with_context(|| format!("{name} did not answer a publish by the deadline"))?
}

/// Publishes warm-up messages until every subscriber has one: it proves
/// each subscription is in place on the server before anything is timed.
async fn warm_up<P: Peer>(
    peer: &mut P,
    set: &Subscribers,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        publish(peer, &set.group, WARM_UP, deadline).await?;
        let round = (Instant::now() + Duration::from_secs(1)).min(deadline);
        if set
            .tally
            .wait_until(round, |t| t.warmed() >= set.connected || t.ended() > 0)
            .await
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: {} of {} subscribers had a warm-up message by the deadline",
                peer.name(),
                set.tally.warmed(),
                set.connected
            );
        }
    }
    if set.tally.ended() > 0 {
        bail!(
            "{}: the server closed {} subscribers",
            peer.name(),
            set.tally.ended()
        );
    }
    Ok(())
}

/// Fan-out to one set of subscribers, in lockstep.
#[derive(Debug, Clone, Default)]
struct FanoutFigures {
    sockets: usize,
    publishes: usize,
    /// Each publish's send to the last subscriber's receipt.
    last: Summary,
    /// Each publish's send to the first subscriber's receipt: the way
    /// through the server before any socket is written.
    first: Summary,
    /// Each publish's send to the server's answer.
    answer: Summary,
    /// Subscribers without a publish when the wait ended (should be 0).
    missing: usize,
}

/// `publishes` publishes to `set`, each after every subscriber has the
/// previous one; they fill the set's slots from `first_slot`.
async fn fan_out<P: Peer>(
    peer: &mut P,
    set: &Subscribers,
    first_slot: usize,
    publishes: usize,
    deadline: Instant,
) -> anyhow::Result<FanoutFigures> {
    let mut last = Vec::with_capacity(publishes);
    let mut first = Vec::with_capacity(publishes);
    let mut answer = Vec::with_capacity(publishes);
    let mut missing = 0;
    for slot in first_slot..first_slot + publishes {
        let sent = now_us();
        publish(peer, &set.group, &message(slot), deadline).await?;
        answer.push(Duration::from_micros(now_us() - sent));
        let n = set.connected;
        if !set
            .tally
            .wait_until(deadline, |t| t.received(slot) >= n || t.ended() > 0)
            .await
            || set.tally.ended() > 0
        {
            missing = n - set.tally.received(slot).min(n);
            break;
        }
        last.push(Duration::from_micros(
            set.tally.last_us(slot).saturating_sub(sent),
        ));
        first.push(Duration::from_micros(
            set.tally.first_us(slot).saturating_sub(sent),
        ));
    }
    Ok(FanoutFigures {
        sockets: set.connected,
        publishes,
        last: Summary::of(last),
        first: Summary::of(first),
        answer: Summary::of(answer),
        missing,
    })
}

/// A burst of publishes to one set.
#[derive(Debug, Clone, Default)]
struct BurstFigures {
    sockets: usize,
    publishes: usize,
    delivered: u64,
    expected: u64,
    /// The first send to the last receipt.
    window: Duration,
}

impl BurstFigures {
    fn per_second(&self) -> f64 {
        super::per_second(self.delivered, self.window)
    }
}

/// `publishes` publishes back to back (each once the server answered the
/// previous), into the set's slots from `first_slot`; then waits for every
/// delivery.
async fn burst<P: Peer>(
    peer: &mut P,
    set: &Subscribers,
    first_slot: usize,
    publishes: usize,
    deadline: Instant,
) -> anyhow::Result<BurstFigures> {
    let slots = first_slot..first_slot + publishes;
    let start = now_us();
    for slot in slots.clone() {
        publish(peer, &set.group, &message(slot), deadline).await?;
    }
    let n = set.connected;
    set.tally
        .wait_until(deadline, |t| {
            t.ended() > 0 || slots.clone().all(|slot| t.received(slot) >= n)
        })
        .await;
    let delivered = slots
        .clone()
        .map(|slot| set.tally.received(slot) as u64)
        .sum();
    let last = slots
        .map(|slot| set.tally.last_us(slot))
        .max()
        .unwrap_or(start);
    Ok(BurstFigures {
        sockets: n,
        publishes,
        delivered,
        expected: (n * publishes) as u64,
        window: Duration::from_micros(last.saturating_sub(start)),
    })
}

// ---- one server, every figure ------------------------------------------------------

/// Every figure of one server.
#[derive(Debug, Clone, Default)]
struct PeerRun {
    name: &'static str,
    connect: ConnectFigures,
    memory_sockets: usize,
    /// The server's CPU time (user and system, all its processes) per
    /// connect of the open loop, in microseconds.
    cpu_per_connect_us: f64,
    /// The same per message delivered in the largest set's lockstep
    /// fan-out.
    cpu_per_delivery_us: f64,
    memory_before: Memory,
    memory_idle: Memory,
    /// Ascending by sockets.
    fanout: Vec<FanoutFigures>,
    burst: BurstFigures,
    /// Measured messages nobody published, over all sets (should be 0).
    unexpected: u64,
    /// Cores that other processes of the machine kept busy, on average,
    /// while this server was measured.
    others_cores: f64,
}

impl PeerRun {
    fn per_connection_kib(&self) -> f64 {
        per_connection(
            self.memory_before.rss_kib,
            self.memory_idle.rss_kib,
            self.memory_sockets,
        )
    }

    fn per_connection_pss_kib(&self) -> f64 {
        per_connection(
            self.memory_before.pss_kib,
            self.memory_idle.pss_kib,
            self.memory_sockets,
        )
    }

    fn largest(&self) -> Option<&FanoutFigures> {
        self.fanout.last()
    }

    fn missing(&self) -> u64 {
        self.fanout.iter().map(|f| f.missing as u64).sum::<u64>()
            + (self.burst.expected - self.burst.delivered.min(self.burst.expected))
    }
}

fn per_connection(before: u64, after: u64, sockets: usize) -> f64 {
    if sockets == 0 {
        0.0
    } else {
        after.saturating_sub(before) as f64 / sockets as f64
    }
}

/// Whether perf runs here; installs it with apt when not.
fn ensure_perf() -> anyhow::Result<()> {
    let present = std::process::Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        println!("versus-nchan: installing linux-perf (apt-get)");
        quiet(
            std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "linux-perf"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

/// A `perf record -g` of one process, written out when stopped.
struct Profile {
    perf: tokio::process::Child,
}

impl Profile {
    /// Starts recording `pid` into `dir/<phase>.perf.data`, when there is a
    /// `dir`.
    async fn start(dir: Option<&Path>, phase: &str, pid: u32) -> anyhow::Result<Option<Self>> {
        let Some(dir) = dir else {
            return Ok(None);
        };
        std::fs::create_dir_all(dir)?;
        let perf = tokio::process::Command::new("perf")
            .args([
                "record",
                "-q",
                "-g",
                "-F",
                "999",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(dir.join(format!("{phase}.perf.data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start perf")?;
        // perf takes a moment to attach.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Some(Self { perf }))
    }

    async fn stop(profile: Option<Self>) {
        let Some(mut profile) = profile else {
            return;
        };
        if let Some(pid) = profile.perf.id() {
            signal("INT", pid);
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), profile.perf.wait()).await;
    }
}

/// Runs every phase against one server (see the module doc), then stops it.
async fn measure<P: Peer>(
    mut peer: P,
    args: &Args,
    sizes: &[usize],
    profile: Option<&Path>,
) -> anyhow::Result<PeerRun> {
    let name = peer.name();
    let cpu_before = CpuTimes::now(&peer.pids())?;
    let deadline = || Instant::now() + args.timeout();
    let publishes = args.peer_publishes;
    let largest = *sizes.last().context("no --peer-sockets")?;
    println!("versus-nchan: {name}: {largest} subscribers, open loop");
    let memory_before = settled_memory(&peer.pids(), Duration::from_secs(10)).await?;

    let group = format!("g{largest}");
    let targets = peer.subscribers(&group, largest).await?;
    let tally = Arc::new(Tally::new(publishes + args.peer_burst, MESSAGE_LEN));
    let recording = Profile::start(profile, "connect", peer.pids()[0]).await?;
    let ticks_before = server_ticks(&peer.pids())?;
    let (set, connect) = connect_open_loop(
        peer.address(),
        &group,
        targets,
        args.peer_connect_rate,
        tally,
    )
    .await;
    let connect_cpu = server_ticks(&peer.pids())?.saturating_sub(ticks_before);
    Profile::stop(recording).await;
    if set.connected == 0 {
        bail!(
            "{name}: no subscriber connected: {:?}",
            connect.failure_samples
        );
    }
    let memory_sockets = set.connected;
    let memory_idle = settled_memory(&peer.pids(), Duration::from_secs(20)).await?;

    println!("versus-nchan: {name}: fan-out to {}", set.connected);
    warm_up(&mut peer, &set, deadline()).await?;
    let recording = Profile::start(profile, "fanout", peer.pids()[0]).await?;
    let ticks_before = server_ticks(&peer.pids())?;
    let largest_fanout = fan_out(&mut peer, &set, 0, publishes, deadline()).await?;
    let fanout_cpu = server_ticks(&peer.pids())?.saturating_sub(ticks_before);
    Profile::stop(recording).await;
    let (set_connected, largest_sockets) = (set.connected, largest_fanout.sockets);
    let largest_missing = largest_fanout.missing > 0;
    let burst = burst(&mut peer, &set, publishes, args.peer_burst, deadline()).await?;
    let mut unexpected = set.tally.unexpected();
    set.close().await;

    let mut fanout = Vec::new();
    for &size in sizes.iter().rev().skip(1) {
        println!("versus-nchan: {name}: fan-out to {size}");
        let group = format!("g{size}");
        let targets = peer.subscribers(&group, size).await?;
        let tally = Arc::new(Tally::new(publishes, MESSAGE_LEN));
        let set = connect_closed_loop(
            peer.address(),
            &group,
            targets,
            args.connect_concurrency,
            tally,
        )
        .await?;
        warm_up(&mut peer, &set, deadline()).await?;
        fanout.push(fan_out(&mut peer, &set, 0, publishes, deadline()).await?);
        unexpected += set.tally.unexpected();
        set.close().await;
    }
    fanout.reverse();
    fanout.push(largest_fanout);
    let others_cores = CpuTimes::now(&peer.pids())?.others_since(&cpu_before);
    Ok(PeerRun {
        name,
        memory_sockets,
        cpu_per_connect_us: per_event_us(connect_cpu, set_connected),
        cpu_per_delivery_us: per_event_us(
            fanout_cpu,
            largest_sockets * (publishes - usize::from(largest_missing)),
        ),
        connect,
        memory_before,
        memory_idle,
        fanout,
        burst,
        unexpected,
        others_cores,
    })
}

/// CPU time of the whole machine and of this benchmark's own processes
/// (itself and a server's), in clock ticks: what is left is other work
/// sharing the cores (and time the hypervisor stole), which the figures
/// should be read beside.
struct CpuTimes {
    /// Every core's busy time.
    busy: u64,
    /// Every core's time, idle included.
    total: u64,
    /// This process's and the server's.
    ours: u64,
}

impl CpuTimes {
    fn now(server: &[u32]) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is in
        // user). Interrupt time is nobody's in particular: on loopback it is
        // mostly this benchmark's own traffic, so it is left out of `busy`.
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
        let busy = at(0) + at(1) + at(2) + at(7);
        let total = ticks.iter().take(8).sum();
        let mut ours = process_ticks("self")?;
        for pid in server {
            ours += process_ticks(&pid.to_string())?;
        }
        Ok(Self { busy, total, ours })
    }

    /// Cores busy with other work since `before`, on average.
    fn others_since(&self, before: &Self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let elapsed = self.total.saturating_sub(before.total) as f64 / cores;
        let others = (self.busy.saturating_sub(before.busy))
            .saturating_sub(self.ours.saturating_sub(before.ours));
        if elapsed == 0.0 {
            0.0
        } else {
            others as f64 / elapsed
        }
    }
}

/// User and system time of a server's processes, in clock ticks.
fn server_ticks(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|pid| process_ticks(&pid.to_string())).sum()
}

/// Clock ticks (USER_HZ, 100 a second on Linux) per event, in microseconds.
fn per_event_us(ticks: u64, events: usize) -> f64 {
    if events == 0 {
        0.0
    } else {
        ticks as f64 * 10_000.0 / events as f64
    }
}

/// User and system time of a process (all its threads), in clock ticks.
fn process_ticks(pid: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no name in /proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n - 3).and_then(|t| t.parse::<u64>().ok());
    Ok(field(14).unwrap_or(0) + field(15).unwrap_or(0))
}

// ---- the scenario --------------------------------------------------------------------

pub(crate) struct VersusResult {
    streamer: PeerRun,
    nchan: Option<PeerRun>,
    /// Why nchan did not run (a smoke run without nginx).
    nchan_skipped: Option<String>,
    environment: Environment,
}

/// Where and when the run happened.
#[derive(Debug, Clone, Default)]
struct Environment {
    date: String,
    commit: String,
    cpu: String,
    cores: usize,
    memory: String,
    nginx: String,
    nchan: String,
    rustc: String,
    open_files: u64,
    load_before: String,
    load_after: String,
    command: String,
}

pub(crate) async fn run_versus_nchan(args: &Args) -> anyhow::Result<VersusResult> {
    let mut sizes = args.peer_sockets.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() || sizes[0] == 0 || sizes[sizes.len() - 1] > MAX_SOCKETS {
        bail!("--peer-sockets must be 1..={MAX_SOCKETS} each");
    }
    if args.peer_publishes == 0
        || !args.peer_connect_rate.is_finite()
        || args.peer_connect_rate <= 0.0
    {
        bail!("--peer-publishes and --peer-connect-rate must be above 0");
    }
    let open_files = raise_open_files()?;
    if open_files < (sizes[sizes.len() - 1] + 1000) as u64 {
        bail!(
            "the open-files limit ({:?}) cannot hold {} sockets",
            open_files_limit(),
            sizes[sizes.len() - 1]
        );
    }
    // A smoke run installs nothing: it measures nchan only where it is.
    let nchan_here = ensure_nchan(args.bench)?;
    if args.peer_perf.is_some() {
        ensure_perf()?;
    }
    if args.write_benchmarks {
        if !nchan_here {
            bail!("--write-benchmarks needs nchan");
        }
        ensure_matplotlib()?;
    }
    let mut environment = Environment::gather(open_files);

    let streamer = StreamerPeer::start().await?;
    let streamer = measure(streamer, args, &sizes, args.peer_perf.as_deref()).await?;
    let (nchan, nchan_skipped) = if nchan_here {
        let nchan = NchanPeer::start().await?;
        (Some(measure(nchan, args, &sizes, None).await?), None)
    } else {
        (
            None,
            Some(
                "nginx with libnginx-mod-nchan is not installed (a smoke run installs nothing)"
                    .to_owned(),
            ),
        )
    };
    environment.load_after = load_average();
    let result = VersusResult {
        streamer,
        nchan,
        nchan_skipped,
        environment,
    };
    if args.write_benchmarks {
        result.write_benchmarks()?;
    }
    Ok(result)
}

impl Environment {
    fn gather(open_files: u64) -> Self {
        let run = |program: &str, args: &[&str]| -> String {
            std::process::Command::new(program)
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .map(|o| {
                    // `nginx -v` answers on stderr.
                    let text = if o.stdout.is_empty() {
                        o.stderr
                    } else {
                        o.stdout
                    };
                    String::from_utf8_lossy(&text).trim().to_owned()
                })
                .unwrap_or_default()
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        // What this benchmark writes itself does not make the tree dirty.
        let dirty = run("git", &["status", "--porcelain", "--untracked-files=no"])
            .lines()
            .any(|line| !line.ends_with(BENCHMARKS_MD) && !line.ends_with(PLOT_PNG));
        let command: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        Self {
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: format!(
                "`{}`{}",
                run("git", &["rev-parse", "--short", "HEAD"]),
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
                .unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|m| m.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kib| format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
                .unwrap_or_default(),
            nginx: run("nginx", &["-v"])
                .trim_start_matches("nginx version: nginx/")
                .to_owned(),
            nchan: run(
                "dpkg-query",
                &["-W", "-f", "${Version}", "libnginx-mod-nchan"],
            ),
            rustc: run("rustc", &["--version"]),
            open_files,
            load_before: load_average(),
            load_after: String::new(),
            command: format!("cargo bench --bench loadgen -- {}", command.join(" ")),
        }
    }
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- the report ------------------------------------------------------------------------

/// One figure of both servers.
struct Row {
    figure: String,
    streamer: f64,
    nchan: Option<f64>,
    /// Decimals to show.
    decimals: usize,
    target: Option<Target>,
}

/// A target from the product's list, on the row it applies to.
struct Target {
    text: &'static str,
    met: fn(streamer: f64, ratio: Option<f64>) -> bool,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.nchan
            .filter(|&n| n > 0.0)
            .map(|nchan| self.streamer / nchan)
    }

    fn verdict(&self) -> &'static str {
        match &self.target {
            None => "",
            Some(target) if (target.met)(self.streamer, self.ratio()) => "met",
            Some(_) => "**missed**",
        }
    }
}

fn number(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    // Thousands separators in the integer part.
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

impl VersusResult {
    fn rows(&self) -> Vec<Row> {
        let s = &self.streamer;
        let n = self.nchan.as_ref();
        let mut rows = Vec::new();
        let rate = number(s.connect.rate, 0);
        let largest = s.largest().map_or(0, |f| f.sockets);
        let connect = |pick: fn(&Summary) -> f64| {
            (
                pick(&s.connect.latency),
                n.map(|n| pick(&n.connect.latency)),
            )
        };
        for (label, pick, target) in [
            ("p50", (|l: &Summary| l.p50) as fn(&Summary) -> f64, None),
            (
                "p99",
                |l: &Summary| l.p99,
                Some(Target {
                    text: "< 5 ms (JWT checked)",
                    met: |s, _| s < 5.0,
                }),
            ),
            ("max", |l: &Summary| l.max, None),
        ] {
            let (streamer, nchan) = connect(pick);
            rows.push(Row {
                figure: format!("connect, open loop {rate}/s: {label} (ms)"),
                streamer,
                nchan,
                decimals: 2,
                target,
            });
        }
        rows.push(Row {
            figure: "connect failures".into(),
            streamer: s.connect.failures as f64,
            nchan: n.map(|n| n.connect.failures as f64),
            decimals: 0,
            target: None,
        });
        rows.push(Row {
            figure: format!(
                "idle memory per connection, RSS (KiB; {} sockets)",
                number(s.memory_sockets as f64, 0)
            ),
            streamer: s.per_connection_kib(),
            nchan: n.map(PeerRun::per_connection_kib),
            decimals: 1,
            target: Some(Target {
                text: "≤ 10 KiB",
                met: |s, _| s <= 10.0,
            }),
        });
        rows.push(Row {
            figure: "idle memory per connection, PSS (KiB)".into(),
            streamer: s.per_connection_pss_kib(),
            nchan: n.map(PeerRun::per_connection_pss_kib),
            decimals: 1,
            target: None,
        });
        rows.push(Row {
            figure: "server CPU per connect, open loop (µs)".into(),
            streamer: s.cpu_per_connect_us,
            nchan: n.map(|n| n.cpu_per_connect_us),
            decimals: 0,
            target: None,
        });
        rows.push(Row {
            figure: format!(
                "server CPU per delivery, fan-out to {} (µs)",
                number(largest as f64, 0)
            ),
            streamer: s.cpu_per_delivery_us,
            nchan: n.map(|n| n.cpu_per_delivery_us),
            decimals: 1,
            target: None,
        });
        for (i, fanout) in s.fanout.iter().enumerate() {
            let theirs = n.and_then(|n| n.fanout.get(i));
            let sockets = number(fanout.sockets as f64, 0);
            for (label, pick) in [
                ("p50", (|l: &Summary| l.p50) as fn(&Summary) -> f64),
                ("p99", |l: &Summary| l.p99),
                ("max", |l: &Summary| l.max),
            ] {
                let target = (fanout.sockets == largest && label == "p99").then_some(Target {
                    text: "≤ 50 ms and ≤ 0.5× nchan",
                    met: |s, ratio| s <= 50.0 && ratio.is_some_and(|r| r <= 0.5),
                });
                rows.push(Row {
                    figure: format!("fan-out to {sockets}, time to last socket: {label} (ms)"),
                    streamer: pick(&fanout.last),
                    nchan: theirs.map(|f| pick(&f.last)),
                    decimals: 2,
                    target,
                });
            }
            rows.push(Row {
                figure: format!("fan-out to {sockets}, time to first socket: p50 (ms)"),
                streamer: fanout.first.p50,
                nchan: theirs.map(|f| f.first.p50),
                decimals: 2,
                target: None,
            });
        }
        rows.push(Row {
            figure: format!(
                "burst of {} publishes to {}: deliveries/s",
                s.burst.publishes,
                number(s.burst.sockets as f64, 0)
            ),
            streamer: s.burst.per_second(),
            nchan: n.map(|n| n.burst.per_second()),
            decimals: 0,
            target: Some(Target {
                text: "≥ 2× nchan",
                met: |_, ratio| ratio.is_some_and(|r| r >= 2.0),
            }),
        });
        rows
    }

    pub(crate) fn failed(&self) -> bool {
        std::iter::once(&self.streamer)
            .chain(&self.nchan)
            .any(|run| run.missing() > 0 || run.unexpected > 0)
    }

    pub(crate) fn print(&self) {
        println!();
        println!(
            "== versus-nchan: Streamer beside nginx {} with nchan {}, same client, same run",
            self.environment.nginx, self.environment.nchan
        );
        if let Some(why) = &self.nchan_skipped {
            println!("  nchan skipped: {why}");
        }
        println!(
            "  {:<60} {:>12} {:>12} {:>9}  target",
            "figure", "Streamer", "nchan", "ratio"
        );
        for row in self.rows() {
            println!(
                "  {:<60} {:>12} {:>12} {:>9}  {} {}",
                row.figure,
                number(row.streamer, row.decimals),
                row.nchan.map_or("-".into(), |v| number(v, row.decimals)),
                row.ratio().map_or("-".into(), |r| format!("{r:.2}x")),
                row.target.as_ref().map_or("", |t| t.text),
                row.verdict().trim_matches('*')
            );
        }
        for run in std::iter::once(&self.streamer).chain(&self.nchan) {
            println!(
                "  {}: connects {} of {} in {:.2} s (client's schedule at worst {:.2} ms late); \
                 memory {:.1} -> {:.1} MiB RSS; missing {}, unexpected {}; other work on the \
                 machine meanwhile: {:.2} cores",
                run.name,
                run.connect.attempted - run.connect.failures,
                run.connect.attempted,
                run.connect.window.as_secs_f64(),
                run.connect.schedule_lag_max.as_secs_f64() * 1000.0,
                run.memory_before.rss_kib as f64 / 1024.0,
                run.memory_idle.rss_kib as f64 / 1024.0,
                run.missing(),
                run.unexpected,
                run.others_cores
            );
            for failure in &run.connect.failure_samples {
                println!("    connect failure: {failure}");
            }
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let run_json = |run: &PeerRun| {
            json!({
                "connect": {
                    "rate_per_s": run.connect.rate,
                    "attempted": run.connect.attempted,
                    "failures": run.connect.failures,
                    "latency": run.connect.latency.to_json(),
                    "schedule_lag_max_ms": run.connect.schedule_lag_max.as_secs_f64() * 1000.0,
                },
                "memory": {
                    "sockets": run.memory_sockets,
                    "before_kib": {"rss": run.memory_before.rss_kib, "pss": run.memory_before.pss_kib},
                    "idle_kib": {"rss": run.memory_idle.rss_kib, "pss": run.memory_idle.pss_kib},
                    "per_connection_kib": run.per_connection_kib(),
                    "per_connection_pss_kib": run.per_connection_pss_kib(),
                },
                "fanout": run.fanout.iter().map(|f| json!({
                    "sockets": f.sockets,
                    "publishes": f.publishes,
                    "time_to_last_socket": f.last.to_json(),
                    "time_to_first_socket": f.first.to_json(),
                    "publish_answer": f.answer.to_json(),
                    "missing": f.missing,
                })).collect::<Vec<_>>(),
                "burst": {
                    "sockets": run.burst.sockets,
                    "publishes": run.burst.publishes,
                    "delivered": run.burst.delivered,
                    "expected": run.burst.expected,
                    "window_s": run.burst.window.as_secs_f64(),
                    "deliveries_per_s": run.burst.per_second(),
                },
                "unexpected": run.unexpected,
                "cpu_per_connect_us": run.cpu_per_connect_us,
                "cpu_per_delivery_us": run.cpu_per_delivery_us,
                "others_cores": run.others_cores,
            })
        };
        json!({
            "scenario": "versus-nchan",
            "streamer": run_json(&self.streamer),
            "nchan": self.nchan.as_ref().map(run_json),
        })
    }

    /// The section of BENCHMARKS.md between the markers, in Markdown.
    fn section(&self) -> String {
        let e = &self.environment;
        let mut md = String::new();
        let _ = writeln!(md, "{BEGIN_MARK}");
        let _ = writeln!(
            md,
            "<!-- Written by `cargo bench --bench loadgen -- versus-nchan --write-benchmarks`; \
             edit the benchmark, not this section. -->"
        );
        let _ = writeln!(
            md,
            "## Versus nchan: fan-out, burst, idle memory, connects\n"
        );
        let _ = writeln!(
            md,
            "Streamer and nginx with nchan, one after the other in the same run, driven by \
             the same client (raw sockets, frame headers only); how it works is in \
             [`benches/README.md`](benches/README.md#versus-nchan). Each ratio is Streamer's \
             figure over nchan's (below 1: Streamer is faster or smaller; for deliveries/s, \
             above 1 is better). Messages are 64 bytes.\n"
        );
        let _ = writeln!(md, "| | |\n|---|---|");
        let _ = writeln!(md, "| command | `{}` |", e.command);
        let _ = writeln!(md, "| date | {} |", e.date);
        let _ = writeln!(md, "| commit | {} |", e.commit);
        let _ = writeln!(
            md,
            "| machine | {} cores (`{}`), {} RAM; {}; {} open files per process |",
            e.cores,
            e.cpu,
            e.memory,
            e.rustc,
            number(e.open_files as f64, 0)
        );
        let _ = writeln!(
            md,
            "| peer | nginx {} (`worker_processes auto`: {} workers), `libnginx-mod-nchan` {} |",
            e.nginx, e.cores, e.nchan
        );
        let _ = writeln!(
            md,
            "| Streamer | `streamer all` in its own process, embedded store |"
        );
        let _ = writeln!(
            md,
            "| load (1, 5, 15 min) | {} before, {} after |\n",
            e.load_before, e.load_after
        );
        let _ = writeln!(
            md,
            "| figure | Streamer | nchan | Streamer / nchan | target | |\n|---|---|---|---|---|---|"
        );
        for row in self.rows() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                row.figure,
                number(row.streamer, row.decimals),
                row.nchan.map_or("-".into(), |v| number(v, row.decimals)),
                row.ratio().map_or("-".into(), |r| format!("{r:.2}×")),
                row.target.as_ref().map_or("", |t| t.text),
                row.verdict()
            );
        }
        let _ = writeln!(md);
        for run in std::iter::once(&self.streamer).chain(&self.nchan) {
            let _ = writeln!(
                md,
                "{}: resident memory {:.1} MiB before the subscribers, {:.1} MiB with {} idle \
                 (PSS {:.1} → {:.1} MiB); connects {} of {} ({} failed) in {:.2} s, the \
                 client's start at worst {:.2} ms behind its schedule; missing deliveries {}, \
                 unexpected messages {}; other work kept {:.2} of the {} cores busy meanwhile.\n",
                run.name,
                run.memory_before.rss_kib as f64 / 1024.0,
                run.memory_idle.rss_kib as f64 / 1024.0,
                number(run.memory_sockets as f64, 0),
                run.memory_before.pss_kib as f64 / 1024.0,
                run.memory_idle.pss_kib as f64 / 1024.0,
                number((run.connect.attempted - run.connect.failures) as f64, 0),
                number(run.connect.attempted as f64, 0),
                number(run.connect.failures as f64, 0),
                run.connect.window.as_secs_f64(),
                run.connect.schedule_lag_max.as_secs_f64() * 1000.0,
                run.missing(),
                run.unexpected,
                run.others_cores,
                e.cores
            );
        }
        let _ = writeln!(
            md,
            "![Time until the last socket has the message, p50 and p99, against the number \
             of sockets, Streamer and nchan]({PLOT_PNG})\n"
        );
        let _ = writeln!(md, "{END_MARK}");
        md
    }

    /// Rewrites the section of BENCHMARKS.md (added before its caveats the
    /// first time) and draws the plot.
    fn write_benchmarks(&self) -> anyhow::Result<()> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = root.join(BENCHMARKS_MD);
        let text = std::fs::read_to_string(&path)?;
        let section = self.section();
        let text = match (text.find(BEGIN_MARK), text.find(END_MARK)) {
            (Some(begin), Some(end)) if begin < end => {
                let end = end + END_MARK.len();
                let end = end + usize::from(text[end..].starts_with('\n'));
                format!("{}{section}{}", &text[..begin], &text[end..])
            }
            _ => match text.find("\n## Caveats") {
                Some(at) => format!("{}\n{section}{}", &text[..at], &text[at..]),
                None => format!("{text}\n{section}"),
            },
        };
        std::fs::write(&path, text)?;
        println!("versus-nchan: wrote the section of {}", path.display());
        self.plot(&root)
    }

    /// Draws time-to-last-socket against sockets with the plot script.
    fn plot(&self, root: &Path) -> anyhow::Result<()> {
        let series = |run: &PeerRun| {
            json!({
                "name": run.name,
                "sockets": run.fanout.iter().map(|f| f.sockets).collect::<Vec<_>>(),
                "p50_ms": run.fanout.iter().map(|f| f.last.p50).collect::<Vec<_>>(),
                "p99_ms": run.fanout.iter().map(|f| f.last.p99).collect::<Vec<_>>(),
            })
        };
        let data = json!({
            "title": format!(
                "Fan-out: publish to the last socket's receipt ({} publishes, 64 B)",
                self.streamer.fanout.first().map_or(0, |f| f.publishes)
            ),
            "subtitle": format!(
                "{}, {}",
                self.environment.date,
                self.environment.commit.replace('`', "")
            ),
            "series": std::iter::once(&self.streamer).chain(&self.nchan).map(series).collect::<Vec<_>>(),
        });
        let data_file = tempfile::NamedTempFile::new()?;
        std::fs::write(data_file.path(), serde_json::to_vec(&data)?)?;
        quiet(
            std::process::Command::new("python3")
                .arg(root.join(PLOT_SCRIPT))
                .arg(data_file.path())
                .arg(root.join(PLOT_PNG)),
        )?;
        println!("versus-nchan: drew {}", root.join(PLOT_PNG).display());
        Ok(())
    }
}
