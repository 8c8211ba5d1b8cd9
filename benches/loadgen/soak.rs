//! The soak: well-behaved clients connect, send and drop at random while a
//! flood, a slowloris and oversized frames run beside them. At the end every
//! request the system accepted must have reached its client's final exactly
//! once, and the well-behaved clients' latency is set beside a quiet run's.
//!
//! Two phases, each on a fresh system, with the same seed and the same load:
//! quiet (the clients alone), then attacked. Every client draws its whole
//! plan (pauses, work, failures, drops) from its own generator, seeded from
//! the run's seed and the client's index, in a fixed order per request, so
//! both phases ask for the same things whatever the timing.
//!
//! One request, driven as the README's protocol allows:
//!
//! 1. The client sends the frame; the acknowledgment, progress and one final
//!    (`complete`, or an `error` with a `sequence`) follow on its socket.
//! 2. At its planned moment, if it has one, the client drops the socket
//!    without a close handshake, reconnects and asks `get_request`: the
//!    answer is the request's state, and its final follows on the new socket
//!    (marked `replay` if it had already finished). `NOT_FOUND` for a request
//!    never acknowledged means the frame went down with the socket: the
//!    client sends it again, with the same id.
//! 3. A socket the server closes, or a request without a final for the stall
//!    timeout, is resumed the same way.
//!
//! Accounting. A request is *accepted* once its acknowledgment or a
//! `get_request` answer for it was seen. Every accepted request must have
//! exactly one final before the grace period ends, with the result its plan
//! asked for; nothing may arrive for it afterwards; and the processor's
//! ledger of the finals it made must match the finals the clients saw, both
//! ways. Anything else fails the run.
//!
//! The attackers, in the attacked phase only:
//! - flooders: authenticated sockets that send frames as fast as the socket
//!   takes them; each must be answered `RATE_LIMITED` and closed 1008, and
//!   reconnects at once to go on;
//! - slowloris: plain TCP sockets that send half of an upgrade request, then
//!   one byte every `--soak-dribble-ms`; each must be closed by the edge
//!   within its header-read timeout (with some slack), and opens again;
//! - oversized: sockets that send one frame over the edge's frame limit;
//!   each must be closed 1009;
//! - silent: TCP sockets that connect and send nothing at all; held to the
//!   same limit as the slowloris (hyper's own header timer starts only once
//!   a first byte names the HTTP version, so the edge needs its own).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use streamer_api::v1::{
    self, claim_response::Item, progress_service_client::ProgressServiceClient,
};
use streamer_core::shutdown::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

use super::{
    Args, MAX_EXTERNAL_CLIENTS, MAX_IN_PROCESS_CLIENTS, Summary, Target, Ws, next_json,
    open_files_limit, per_second,
};

/// The action the soak's processor claims (its own, like the progress
/// scenario's).
const SOAK_ACTION: &str = "loadgen_soak";
/// A flooder's frames: an action nobody handles, so every frame the edge
/// lets through costs ConnectionService and ProgressService a look-up.
const FLOOD_ACTION: &str = "loadgen_flood";
/// How long a request's processing takes, drawn per request (ms).
const WORK_MS: (u64, u64) = (20, 200);
/// Progress reports per request, spread over its work.
const REPORTS: u32 = 3;
/// Pause after a failed connect, or a refused submission, before trying
/// again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Pause between an oversized sender's attempts.
const OVERSIZED_PAUSE: Duration = Duration::from_millis(500);
/// How long an attacker waits for the server's close once it stopped
/// being able to send.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Half of a WebSocket upgrade request: the request line and some headers,
/// never the blank line that ends them.
const HALF_UPGRADE: &[u8] = b"GET /?Authorization=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\
Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Slow: ";
/// Samples of violations kept per client (all are counted).
const VIOLATION_SAMPLES: usize = 10;

// ---- settings --------------------------------------------------------------

/// What one soak run does, resolved from the flags (smaller in a smoke run).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    seed: u64,
    clients: usize,
    phase: Duration,
    /// Mean pause between a client's requests; each is drawn from 0..2x.
    think: Duration,
    drop: f64,
    fail: f64,
    flooders: usize,
    slowloris: usize,
    silent: usize,
    dribble: Duration,
    oversized: usize,
    /// The edge's header-read timeout: set on an in-process system,
    /// expected of a running one.
    header_timeout: Duration,
    max_frame_bytes: usize,
    /// A request without its final this long after it was (re)sent is
    /// resumed on a new socket.
    stall: Duration,
    /// After the phase, how long clients may take to finish the requests
    /// they have in flight.
    grace: Duration,
    /// How long each client listens after its last request, for anything
    /// that should not come.
    linger: Duration,
}

impl Settings {
    pub(crate) fn from_args(args: &Args) -> anyhow::Result<Self> {
        let seed = args.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let smoke = !args.bench;
        let settings = Self {
            seed,
            clients: args.soak_clients,
            phase: Duration::from_secs_f64(args.soak_secs.max(0.1)),
            think: Duration::from_millis(args.soak_think_ms),
            drop: args.soak_drop.clamp(0.0, 1.0),
            fail: args.soak_fail.clamp(0.0, 1.0),
            flooders: args.soak_flooders,
            slowloris: args.soak_slowloris,
            silent: args.soak_silent,
            dribble: Duration::from_millis(args.soak_dribble_ms.max(1)),
            oversized: args.soak_oversized,
            header_timeout: Duration::from_millis(args.soak_header_timeout_ms.max(1)),
            max_frame_bytes: streamer_gateway::limits::SocketLimits::default().max_frame_bytes,
            stall: Duration::from_secs(if smoke { 5 } else { 15 }),
            grace: Duration::from_secs(if smoke { 10 } else { 30 }),
            linger: Duration::from_millis(300),
        };
        let sockets = settings.clients
            + settings.flooders
            + settings.slowloris
            + settings.silent
            + settings.oversized;
        let (limit, where_) = if args.external() {
            (MAX_EXTERNAL_CLIENTS, "per client process")
        } else {
            (MAX_IN_PROCESS_CLIENTS, "in-process (two sockets each)")
        };
        if settings.clients == 0 || sockets > limit {
            bail!(
                "the soak's sockets (clients + flooders + slowloris + silent + oversized = {sockets}) \
                 must be 1..={limit} {where_}: the open-files limit is {:?}",
                open_files_limit()
            );
        }
        Ok(settings)
    }

    /// How long a slowloris socket may stay open before it counts as held:
    /// the header-read timeout with half of it again, and a second, for
    /// timers on a busy machine.
    fn slowloris_limit(&self) -> Duration {
        self.header_timeout + self.header_timeout / 2 + Duration::from_secs(1)
    }
}

// ---- a seeded generator ----------------------------------------------------

/// SplitMix64: tiny, seedable, and the same on every platform, so a seed
/// names one run's plans exactly.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..=max (the modulo bias is negligible at these sizes).
    fn up_to(&mut self, max: u64) -> u64 {
        self.next_u64() % (max.saturating_add(1)).max(1)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// One request's plan, drawn in a fixed order whatever is used.
struct Plan {
    think: Duration,
    work_ms: u64,
    fail: bool,
    /// When to drop the socket: after sending the frame, and (only if the
    /// first happened) again after resuming.
    drops: [Option<Duration>; 2],
}

impl Plan {
    fn draw(rng: &mut SplitMix64, s: &Settings) -> Self {
        let think = Duration::from_millis(rng.up_to(2 * s.think.as_millis() as u64));
        let work_ms = WORK_MS.0 + rng.up_to(WORK_MS.1 - WORK_MS.0);
        let fail = rng.chance(s.fail);
        // Anywhere from before the acknowledgment to just after the final.
        let window = work_ms + 50;
        let first = rng.chance(s.drop);
        let first_at = Duration::from_millis(rng.up_to(window));
        let second = rng.chance(s.drop);
        let second_at = Duration::from_millis(rng.up_to(window));
        Self {
            think,
            work_ms,
            fail,
            drops: [
                first.then_some(first_at),
                (first && second).then_some(second_at),
            ],
        }
    }
}

// ---- the processor and its ledger ------------------------------------------

/// What the processor did with one request.
#[derive(Default, Clone, Copy)]
struct LedgerEntry {
    claims: u32,
    /// Complete or Fail calls the server accepted.
    finals: u32,
}

/// The processor's side of the accounting, keyed by (client, request n).
#[derive(Default)]
struct Ledger {
    /// A std mutex: held for one map update, never across an await.
    entries: Mutex<HashMap<(u64, u64), LedgerEntry>>,
    in_flight: AtomicU64,
    errors: AtomicU64,
}

impl Ledger {
    fn update(&self, key: (u64, u64), change: impl FnOnce(&mut LedgerEntry)) {
        if let Ok(mut entries) = self.entries.lock() {
            change(entries.entry(key).or_default());
        }
    }

    fn snapshot(&self) -> HashMap<(u64, u64), LedgerEntry> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// Claims [`SOAK_ACTION`]; each request reports [`REPORTS`] progress
/// updates spread over its `work_ms`, then completes with
/// `{"client", "n"}`, or fails with `SOAK_FAILURE` when its payload says
/// `fail`. Returns once the Claim stream is open.
async fn spawn_soak_processor(
    target: &Target,
    ledger: std::sync::Arc<Ledger>,
    stop: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let processor_id = format!("loadgen-soak-{}", std::process::id());
    let client = target.progress_client().await?;
    let mut work = client
        .clone()
        .claim(v1::ClaimRequest {
            processor_id: processor_id.clone(),
            actions: vec![SOAK_ACTION.into()],
            // The server hands out at most this many at once: the bound on
            // the tasks below.
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
                    eprintln!("soak processor: claim stream failed: {status}");
                    ledger.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => break,
            };
            let mut client = client.clone();
            let processor_id = processor_id.clone();
            let ledger = ledger.clone();
            ledger.in_flight.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if let Err(e) = soak_request(&mut client, &processor_id, request, &ledger).await {
                    eprintln!("soak processor: {e:#}");
                    ledger.errors.fetch_add(1, Ordering::Relaxed);
                }
                ledger.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }))
}

async fn soak_request(
    client: &mut ProgressServiceClient<Channel>,
    processor_id: &str,
    request: v1::Request,
    ledger: &Ledger,
) -> anyhow::Result<()> {
    let payload = request
        .payload
        .map(streamer_api::json::from_proto)
        .unwrap_or(Value::Null);
    let (Some(c), Some(n)) = (payload["client"].as_u64(), payload["n"].as_u64()) else {
        bail!("request {} has no client and n: {payload}", request.id);
    };
    let key = (c, n);
    ledger.update(key, |e| e.claims += 1);
    let step = Duration::from_millis(payload["work_ms"].as_u64().unwrap_or(0)) / REPORTS;
    let fail = payload["fail"].as_bool().unwrap_or(false);
    let id = request.id;
    let reports = {
        let id = id.clone();
        let reporter = processor_id.to_owned();
        futures::stream::unfold(1u32, move |k| {
            let id = id.clone();
            let reporter = reporter.clone();
            async move {
                if k > REPORTS {
                    return None;
                }
                tokio::time::sleep(step).await;
                let report = v1::ReportRequest {
                    id,
                    processor_id: reporter,
                    percentage: f64::from(k) * 100.0 / f64::from(REPORTS + 1),
                    message: format!("step {k} of {REPORTS}"),
                    metadata: None,
                };
                Some((report, k + 1))
            }
        })
    };
    client.report(reports).await?;
    if fail {
        client
            .fail(v1::FailRequest {
                id,
                processor_id: processor_id.to_owned(),
                error: Some(v1::RequestError {
                    code: "SOAK_FAILURE".into(),
                    message: "failed as planned".into(),
                    details: None,
                }),
                retryable: false,
            })
            .await?;
    } else {
        client
            .complete(v1::CompleteRequest {
                id,
                processor_id: processor_id.to_owned(),
                result: Some(streamer_api::json::to_proto(json!({"client": c, "n": n}))),
            })
            .await?;
    }
    ledger.update(key, |e| e.finals += 1);
    Ok(())
}

// ---- a well-behaved client -------------------------------------------------

/// What the well-behaved clients saw (one client's, or all of a phase's).
#[derive(Default)]
struct ClientReport {
    started: u64,
    /// Accepted, the acknowledgment seen.
    acknowledged: u64,
    /// Accepted, but the acknowledgment went down with a dropped socket:
    /// known through `get_request`.
    found_by_resume: u64,
    completed: u64,
    failed: u64,
    /// Accepted, and no final by the end of the grace period.
    lost: u64,
    /// Finals seen for a request that already had one.
    duplicate_finals: u64,
    /// Never accepted by the end of the grace period (not a loss: the
    /// client was never told the request existed).
    never_accepted: u64,
    drops: u64,
    stalls: u64,
    server_closes: u64,
    resumes: u64,
    replays: u64,
    /// Replayed finals that came before the answer to the `get_request`
    /// that caused them.
    replays_before_answer: u64,
    /// `get_request` answers showing an older state than messages that
    /// came before them on the same socket.
    answers_behind: u64,
    /// Frames sent again after `NOT_FOUND` or a refusal.
    resubmits: u64,
    /// Submissions answered with an error without a `sequence`, and
    /// `get_request`s answered with an error other than `NOT_FOUND`, by
    /// what and code.
    refusals: BTreeMap<String, u64>,
    connects: u64,
    connect_failures: u64,
    clean_latency: Vec<Duration>,
    resumed_latency: Vec<Duration>,
    connect_latency: Vec<Duration>,
    /// (client, n) of every request with a final, for the ledger check.
    finals: Vec<(u64, u64)>,
    violation_count: u64,
    violations: Vec<String>,
}

impl ClientReport {
    fn absorb(&mut self, other: Self) {
        self.started += other.started;
        self.acknowledged += other.acknowledged;
        self.found_by_resume += other.found_by_resume;
        self.completed += other.completed;
        self.failed += other.failed;
        self.lost += other.lost;
        self.duplicate_finals += other.duplicate_finals;
        self.never_accepted += other.never_accepted;
        self.drops += other.drops;
        self.stalls += other.stalls;
        self.server_closes += other.server_closes;
        self.resumes += other.resumes;
        self.replays += other.replays;
        self.replays_before_answer += other.replays_before_answer;
        self.answers_behind += other.answers_behind;
        self.resubmits += other.resubmits;
        for (code, count) in other.refusals {
            *self.refusals.entry(code).or_default() += count;
        }
        self.connects += other.connects;
        self.connect_failures += other.connect_failures;
        self.clean_latency.extend(other.clean_latency);
        self.resumed_latency.extend(other.resumed_latency);
        self.connect_latency.extend(other.connect_latency);
        self.finals.extend(other.finals);
        self.violation_count += other.violation_count;
        let room = VIOLATION_SAMPLES.saturating_sub(self.violations.len());
        self.violations
            .extend(other.violations.into_iter().take(room));
    }

    fn accepted(&self) -> u64 {
        self.acknowledged + self.found_by_resume
    }
}

/// One request as its client follows it, across sockets.
#[derive(Default)]
struct RequestState {
    acknowledged: bool,
    found: bool,
    finals: u32,
    /// The highest progress `sequence` seen on any socket.
    max_progress: u64,
    /// The last `sequence` seen on the current socket.
    sequence_here: Option<u64>,
    acknowledged_here: bool,
    /// `NOT_FOUND` after it was accepted: lost for certain.
    vanished: bool,
    /// Its final was a replay.
    replayed: bool,
}

impl RequestState {
    fn accepted(&self) -> bool {
        self.acknowledged || self.found
    }
}

struct Client<'a> {
    index: u64,
    url: String,
    s: &'a Settings,
    ws: Option<Ws>,
    /// Requests whose final this client has seen.
    done: HashSet<u64>,
    out: ClientReport,
}

impl Client<'_> {
    fn violation(&mut self, what: String) {
        self.out.violation_count += 1;
        if self.out.violations.len() < VIOLATION_SAMPLES {
            self.out
                .violations
                .push(format!("client {}: {what}", self.index));
        }
    }

    /// Counts a refusal by what was refused and its code.
    fn refused(&mut self, what: &str, message: &Value) {
        let code = message["error"]["code"].as_str().unwrap_or("no code");
        *self
            .out
            .refusals
            .entry(format!("{what} {code}"))
            .or_default() += 1;
    }

    /// Connects unless connected; false when `hard` passed first.
    async fn ensure_connected(&mut self, hard: Instant) -> bool {
        while self.ws.is_none() {
            let start = Instant::now();
            if start >= hard {
                return false;
            }
            let connect = tokio_tungstenite::connect_async(self.url.as_str());
            match tokio::time::timeout_at(hard.into(), connect).await {
                Ok(Ok((ws, _))) => {
                    self.out.connects += 1;
                    self.out.connect_latency.push(start.elapsed());
                    self.ws = Some(ws);
                }
                Ok(Err(_)) => {
                    self.out.connect_failures += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends a text frame; false when the socket is gone.
    async fn send(&mut self, text: &str) -> bool {
        match self.ws.as_mut() {
            Some(ws) => ws.send(Message::Text(text.to_owned().into())).await.is_ok(),
            None => false,
        }
    }

    /// Checks a request message's `sequence`: increasing on this socket,
    /// and a final above every progress seen anywhere.
    fn check_sequence(&mut self, id: &str, st: &mut RequestState, message: &Value, kind: &str) {
        let Some(sequence) = message["sequence"].as_u64() else {
            self.violation(format!("{id}: {kind} without a sequence: {message}"));
            return;
        };
        if let Some(last) = st.sequence_here
            && sequence <= last
        {
            self.violation(format!(
                "{id}: {kind} sequence {sequence} not after {last} on the same socket"
            ));
        }
        st.sequence_here = Some(sequence);
        if kind == "progress" {
            st.max_progress = st.max_progress.max(sequence);
        } else if sequence <= st.max_progress {
            self.violation(format!(
                "{id}: final sequence {sequence} not above progress {}",
                st.max_progress
            ));
        }
    }

    /// The final of request `n`: it must be what its plan asked for.
    fn check_final(&mut self, n: u64, plan: &Plan, message: &Value, kind: &str) {
        let id = format!("r{n}");
        match (kind, plan.fail) {
            ("complete", false) => {
                let expected = json!({"client": self.index, "n": n});
                if message["result"] != expected {
                    self.violation(format!("{id}: wrong result: {message}"));
                }
                self.out.completed += 1;
            }
            ("error", true) => {
                let error = &message["error"];
                if error["code"] != "PROCESSING_FAILED"
                    || error["details"]["code"] != "SOAK_FAILURE"
                {
                    self.violation(format!("{id}: wrong failure: {message}"));
                }
                self.out.failed += 1;
            }
            _ => {
                self.violation(format!(
                    "{id}: planned to {}, got {message}",
                    if plan.fail { "fail" } else { "complete" }
                ));
            }
        }
    }

    /// A message for no request in flight: for an earlier one, it came
    /// after that request's final.
    fn stray(&mut self, message: &Value) {
        let rid = message["request_id"].as_str().unwrap_or_default();
        let kind = message["type"].as_str().unwrap_or_default();
        let earlier = rid.strip_prefix('r').and_then(|m| m.parse::<u64>().ok());
        match earlier {
            Some(m) if self.done.contains(&m) => {
                if kind == "complete" || (kind == "error" && message.get("sequence").is_some()) {
                    self.out.duplicate_finals += 1;
                }
                self.violation(format!("r{m}: {kind} after its final: {message}"));
            }
            // A request the client gave up on at the deadline: too late to
            // matter, and counted there.
            Some(_) => {}
            None => self.violation(format!("a message for no request: {message}")),
        }
    }

    /// Drives request `n` to its final, or to `hard`.
    async fn request(&mut self, n: u64, plan: &Plan, hard: Instant) {
        let id = format!("r{n}");
        let frame = json!({
            "action": SOAK_ACTION,
            "id": id,
            "payload": {"client": self.index, "n": n, "work_ms": plan.work_ms, "fail": plan.fail},
        })
        .to_string();
        self.out.started += 1;
        let mut st = RequestState::default();
        let mut drops = plan.drops.iter().flatten().copied();
        let mut interrupted = false;
        let mut query: Option<String> = None;
        let mut queries = 0u32;
        let mut resume = !self.ensure_connected(hard).await;
        let begun = Instant::now();
        if !resume {
            resume = !self.send(&frame).await;
        }
        let mut drop_at = drops.next().map(|d| Instant::now() + d);
        let mut stall_at = Instant::now() + self.s.stall;
        let mut final_at = None;
        // Until the final; and until the answer to a get_request, whose
        // replayed final may come first.
        while (st.finals == 0 || query.is_some()) && !st.vanished {
            if resume {
                resume = false;
                interrupted = true;
                self.ws = None;
                if !self.ensure_connected(hard).await {
                    break;
                }
                self.out.resumes += 1;
                queries += 1;
                let q = format!("q{n}-{queries}");
                let ask = json!({"action": "get_request", "id": q, "payload": {"request_id": id}});
                query = Some(q);
                st.sequence_here = None;
                st.acknowledged_here = false;
                if !self.send(&ask.to_string()).await {
                    resume = true;
                    continue;
                }
                drop_at = drops.next().map(|d| Instant::now() + d);
                stall_at = Instant::now() + self.s.stall;
            }
            let wake = drop_at.unwrap_or(hard).min(stall_at).min(hard);
            let Some(ws) = self.ws.as_mut() else {
                resume = true;
                continue;
            };
            let message = match tokio::time::timeout_at(wake.into(), next_json(ws)).await {
                Err(_) => {
                    let now = Instant::now();
                    if now >= hard {
                        break;
                    }
                    if st.finals > 0 {
                        self.violation(format!("{id}: get_request never answered"));
                        break;
                    }
                    if drop_at.is_some_and(|at| now >= at) {
                        self.out.drops += 1;
                        drop_at = None;
                    } else {
                        self.out.stalls += 1;
                    }
                    resume = true;
                    continue;
                }
                Ok(None | Some(Err(_))) => {
                    self.out.server_closes += 1;
                    if st.finals > 0 {
                        self.ws = None;
                        break;
                    }
                    resume = true;
                    continue;
                }
                Ok(Some(Ok(message))) => message,
            };
            let rid = message["request_id"].as_str().unwrap_or_default();
            let kind = message["type"].as_str().unwrap_or_default().to_owned();
            let sequenced = message.get("sequence").is_some();
            if rid == id && st.finals > 0 {
                // Only the answer to a get_request may follow the final.
                if kind == "complete" || (kind == "error" && sequenced) {
                    self.out.duplicate_finals += 1;
                }
                self.violation(format!("{id}: {kind} after its final: {message}"));
            } else if rid == id {
                match kind.as_str() {
                    "acknowledgment" => {
                        if st.acknowledged_here {
                            self.violation(format!("{id}: a second acknowledgment"));
                        }
                        if message["sequence"].as_u64() != Some(0) {
                            self.violation(format!("{id}: acknowledgment not at 0: {message}"));
                        }
                        st.acknowledged = true;
                        st.acknowledged_here = true;
                    }
                    "progress" => {
                        // After a resume, the request's messages may come
                        // before the answer to the get_request.
                        if !st.accepted() && query.is_none() {
                            self.violation(format!("{id}: progress before its acknowledgment"));
                        }
                        self.check_sequence(&id, &mut st, &message, &kind);
                    }
                    "complete" | "error" if kind == "complete" || sequenced => {
                        if !st.accepted() && query.is_none() {
                            self.violation(format!("{id}: final before its acknowledgment"));
                        }
                        self.check_sequence(&id, &mut st, &message, &kind);
                        self.check_final(n, plan, &message, &kind);
                        st.replayed = message["replay"] == true;
                        if st.replayed {
                            self.out.replays += 1;
                            self.out.replays_before_answer += u64::from(query.is_some());
                        }
                        // A replay can come before the answer it follows:
                        // either way the request was accepted.
                        st.found |= !st.acknowledged;
                        st.finals += 1;
                        final_at = Some(Instant::now());
                        drop_at = None;
                        stall_at = Instant::now() + self.s.stall;
                    }
                    "error" => {
                        // Refused before it was queued: send it again.
                        if st.accepted() {
                            self.violation(format!(
                                "{id}: refused after it was accepted: {message}"
                            ));
                        }
                        self.refused("submit", &message);
                        tokio::time::sleep(RETRY_PAUSE).await;
                        self.out.resubmits += 1;
                        resume = !self.send(&frame).await;
                        stall_at = Instant::now() + self.s.stall;
                    }
                    _ => self.violation(format!("{id}: unexpected {kind}: {message}")),
                }
            } else if query.as_deref() == Some(rid) {
                query = None;
                match (kind.as_str(), message["error"]["code"].as_str()) {
                    ("response", _) => {
                        let data = &message["data"];
                        let finished =
                            matches!(data["status"].as_str(), Some("completed" | "failed"));
                        // A replay is sent because the get_request found the
                        // request finished: its answer must say so. Any other
                        // message may overtake the answer, which then shows
                        // the state from before it.
                        if data["request_id"] != id.as_str() || (st.replayed && !finished) {
                            self.violation(format!("{id}: get_request answered {message}"));
                        }
                        let answered = data["sequence"].as_u64().unwrap_or_default();
                        if st.sequence_here.is_some_and(|seen| answered < seen) {
                            self.out.answers_behind += 1;
                        }
                        st.found = true;
                    }
                    ("error", Some("NOT_FOUND")) if st.accepted() => {
                        self.violation(format!("{id}: accepted, then NOT_FOUND"));
                        st.vanished = true;
                    }
                    ("error", Some("NOT_FOUND")) => {
                        // The frame went down with the socket.
                        self.out.resubmits += 1;
                        resume = !self.send(&frame).await;
                        stall_at = Instant::now() + self.s.stall;
                    }
                    _ => {
                        // get_request itself failed: ask again on a new socket.
                        self.refused("get_request", &message);
                        tokio::time::sleep(RETRY_PAUSE).await;
                        resume = true;
                    }
                }
            } else if kind == "error" && rid.is_empty() {
                self.violation(format!("a well-behaved client was refused: {message}"));
            } else {
                self.stray(&message);
            }
        }

        if st.acknowledged {
            self.out.acknowledged += 1;
        } else if st.found {
            self.out.found_by_resume += 1;
        }
        if st.finals > 0 {
            self.done.insert(n);
            self.out.finals.push((self.index, n));
            let latency = final_at.unwrap_or_else(Instant::now) - begun;
            if interrupted {
                self.out.resumed_latency.push(latency);
            } else {
                self.out.clean_latency.push(latency);
            }
        } else if st.accepted() {
            self.out.lost += 1;
            if !st.vanished {
                self.violation(format!("{id}: accepted, and no final by the deadline"));
            }
        } else {
            self.out.never_accepted += 1;
        }
    }

    /// Listens a little longer for anything that should not come, then
    /// closes.
    async fn linger(&mut self) {
        let Some(mut ws) = self.ws.take() else {
            return;
        };
        let until = Instant::now() + self.s.linger;
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout_at(until.into(), next_json(&mut ws)).await
        {
            self.stray(&message);
        }
        let _ = ws.close(None).await;
    }
}

/// One well-behaved client: think, request, repeat until `end`; finish the
/// request in flight by `hard`.
async fn run_client(
    index: u64,
    url: String,
    s: std::sync::Arc<Settings>,
    end: Instant,
    hard: Instant,
) -> ClientReport {
    // Each client's own stream of plans: the seed, then its index mixed in.
    let mut rng = SplitMix64::new(s.seed ^ SplitMix64::new(index).next_u64());
    let mut client = Client {
        index,
        url,
        s: &s,
        ws: None,
        done: HashSet::new(),
        out: ClientReport::default(),
    };
    // No connect up front: the first request connects, after the first
    // pause, so the clients arrive spread out rather than all at once.
    let mut n = 0;
    loop {
        let plan = Plan::draw(&mut rng, &s);
        let at = Instant::now() + plan.think;
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        n += 1;
        client.request(n, &plan, hard).await;
        if Instant::now() >= hard {
            break;
        }
    }
    client.linger().await;
    client.out
}

// ---- the attackers ---------------------------------------------------------

#[derive(Default)]
struct FloodReport {
    sockets: usize,
    sessions: u64,
    frames_sent: u64,
    rate_limited: u64,
    other_answers: u64,
    /// Sessions that ended with a close 1008 the client read.
    closed_1008: u64,
    /// Sessions the edge ended after RATE_LIMITED, whose close frame was
    /// lost to the reset that closing on unread frames causes.
    reset_after_rate_limited: u64,
    /// Sessions that ended without a single RATE_LIMITED first.
    ended_unwarned: u64,
    /// Sessions closed with a code other than 1008.
    closed_other: u64,
    other_codes: Vec<u16>,
    connect_failures: u64,
    /// Connect to the end, per session the edge ended.
    session_time: Vec<Duration>,
}

impl FloodReport {
    fn absorb(&mut self, other: Self) {
        self.sessions += other.sessions;
        self.frames_sent += other.frames_sent;
        self.rate_limited += other.rate_limited;
        self.other_answers += other.other_answers;
        self.closed_1008 += other.closed_1008;
        self.reset_after_rate_limited += other.reset_after_rate_limited;
        self.ended_unwarned += other.ended_unwarned;
        self.closed_other += other.closed_other;
        self.other_codes.extend(other.other_codes);
        self.other_codes.truncate(VIOLATION_SAMPLES);
        self.connect_failures += other.connect_failures;
        self.session_time.extend(other.session_time);
    }

    fn ended(&self) -> u64 {
        self.closed_1008 + self.reset_after_rate_limited + self.ended_unwarned
    }

    /// Every session the edge ended must have been a rate-limit close: by
    /// the edge's own count when it runs in this process (some of the
    /// sessions cut at the end may have been closed too), else by what the
    /// flooders read.
    fn failed(&self, edge_rate_limit_closes: Option<f64>) -> bool {
        let wrong = match edge_rate_limit_closes {
            Some(closes) => (closes as u64) < self.ended() || (closes as u64) > self.sessions,
            None => self.ended_unwarned > 0,
        };
        wrong || self.closed_other > 0 || (self.sessions > 0 && self.ended() == 0)
    }
}

/// Waits out `pause`, or less when `stop` comes first; true if stopped.
async fn pause_or_stop(pause: Duration, stop: &Shutdown) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => false,
        () = stop.cancelled() => true,
    }
}

/// Reads a socket until the server's close; the close code (None for a
/// close without one), or Err when it ended without a close frame. Counts
/// RATE_LIMITED and other text answers on the way.
async fn read_until_close(
    stream: &mut futures::stream::SplitStream<Ws>,
    rate_limited: &mut u64,
    other: &mut u64,
) -> Result<Option<u16>, ()> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                if text.as_str().contains("\"RATE_LIMITED\"") {
                    *rate_limited += 1;
                } else {
                    *other += 1;
                }
            }
            Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(()),
        }
    }
}

/// An authenticated socket that sends frames as fast as the socket takes
/// them, reading the answers beside; reconnects as soon as it is closed.
async fn flooder(url: String, stop: Shutdown) -> FloodReport {
    let mut out = FloodReport::default();
    let frame =
        json!({"action": FLOOD_ACTION, "id": "flood", "payload": {"junk": true}}).to_string();
    while !stop.is_cancelled() {
        let opened = Instant::now();
        let connected = tokio::select! {
            connected = tokio_tungstenite::connect_async(url.as_str()) => connected,
            () = stop.cancelled() => break,
        };
        let Ok((ws, _)) = connected else {
            out.connect_failures += 1;
            if pause_or_stop(RETRY_PAUSE, &stop).await {
                break;
            }
            continue;
        };
        out.sessions += 1;
        let (mut sink, mut stream) = ws.split();
        let (mut sent, mut rate_limited, mut other) = (0u64, 0u64, 0u64);
        let ended = {
            let sender = async {
                while sink.send(Message::Text(frame.clone().into())).await.is_ok() {
                    sent += 1;
                }
            };
            let reader = read_until_close(&mut stream, &mut rate_limited, &mut other);
            tokio::pin!(sender, reader);
            tokio::select! {
                ended = &mut reader => Some(ended),
                () = &mut sender => tokio::select! {
                    ended = tokio::time::timeout(CLOSE_WAIT, &mut reader) => Some(ended.unwrap_or(Err(()))),
                    () = stop.cancelled() => None,
                },
                () = stop.cancelled() => None,
            }
        };
        out.frames_sent += sent;
        out.rate_limited += rate_limited;
        out.other_answers += other;
        match ended {
            // Cut by the end of the attack: not an outcome.
            None => break,
            Some(Ok(code)) if code != Some(1008) => {
                out.closed_other += 1;
                out.other_codes.push(code.unwrap_or(1005));
            }
            Some(_) if rate_limited == 0 => out.ended_unwarned += 1,
            Some(Ok(_)) => {
                out.closed_1008 += 1;
                out.session_time.push(opened.elapsed());
            }
            Some(Err(())) => {
                out.reset_after_rate_limited += 1;
                out.session_time.push(opened.elapsed());
            }
        }
    }
    out
}

#[derive(Default)]
struct SlowlorisReport {
    sockets: usize,
    opened: u64,
    /// Open to closed by the server, per socket.
    close_times: Vec<Duration>,
    /// Of those, how many had a `408` first.
    answered_408: u64,
    /// Closed, but only after the limit.
    closed_late: u64,
    /// Still open when the attack ended; and of those, open past the limit.
    open_at_end: u64,
    held_past_limit: u64,
    longest_open_at_end: Duration,
    bytes_dribbled: u64,
    connect_failures: u64,
}

impl SlowlorisReport {
    fn absorb(&mut self, other: Self) {
        self.opened += other.opened;
        self.close_times.extend(other.close_times);
        self.answered_408 += other.answered_408;
        self.closed_late += other.closed_late;
        self.open_at_end += other.open_at_end;
        self.held_past_limit += other.held_past_limit;
        self.longest_open_at_end = self.longest_open_at_end.max(other.longest_open_at_end);
        self.bytes_dribbled += other.bytes_dribbled;
        self.connect_failures += other.connect_failures;
    }

    fn failed(&self) -> bool {
        self.closed_late > 0 || self.held_past_limit > 0
    }
}

/// A TCP socket that sends half an upgrade request, then a byte every
/// `dribble`, until the server closes it; then again, until `stop`. A
/// `silent` one sends nothing at all.
async fn slowloris(
    addr: SocketAddr,
    start_after: Duration,
    silent: bool,
    s: std::sync::Arc<Settings>,
    stop: Shutdown,
) -> SlowlorisReport {
    let mut out = SlowlorisReport::default();
    let limit = s.slowloris_limit();
    if pause_or_stop(start_after, &stop).await {
        return out;
    }
    while !stop.is_cancelled() {
        let opened = Instant::now();
        let connected = tokio::select! {
            connected = TcpStream::connect(addr) => connected,
            () = stop.cancelled() => break,
        };
        let Ok(mut stream) = connected else {
            out.connect_failures += 1;
            if pause_or_stop(RETRY_PAUSE, &stop).await {
                break;
            }
            continue;
        };
        out.opened += 1;
        // A write that fails means the server closed: the read below says so.
        if !silent {
            let _ = stream.write_all(HALF_UPGRADE).await;
        }
        let mut dribble = tokio::time::interval_at((opened + s.dribble).into(), s.dribble);
        let (mut reader, mut writer) = stream.split();
        let mut buf = [0u8; 512];
        let mut answered = false;
        loop {
            tokio::select! {
                read = reader.read(&mut buf) => match read {
                    Ok(0) | Err(_) => {
                        let held = opened.elapsed();
                        out.close_times.push(held);
                        out.answered_408 += u64::from(answered);
                        out.closed_late += u64::from(held > limit);
                        break;
                    }
                    Ok(n) => answered |= buf[..n].starts_with(b"HTTP/1.1 408"),
                },
                _ = dribble.tick(), if !silent => {
                    if writer.write_all(b"a").await.is_ok() {
                        out.bytes_dribbled += 1;
                    }
                }
                () = stop.cancelled() => {
                    let held = opened.elapsed();
                    out.open_at_end += 1;
                    out.held_past_limit += u64::from(held > limit);
                    out.longest_open_at_end = out.longest_open_at_end.max(held);
                    return out;
                }
            }
        }
    }
    out
}

#[derive(Default)]
struct OversizedReport {
    sockets: usize,
    sent: u64,
    closed_1009: u64,
    closed_other: u64,
    other_codes: Vec<u16>,
    ended_without_close: u64,
    connect_failures: u64,
}

impl OversizedReport {
    fn absorb(&mut self, other: Self) {
        self.sent += other.sent;
        self.closed_1009 += other.closed_1009;
        self.closed_other += other.closed_other;
        self.other_codes.extend(other.other_codes);
        self.other_codes.truncate(VIOLATION_SAMPLES);
        self.ended_without_close += other.ended_without_close;
        self.connect_failures += other.connect_failures;
    }

    fn failed(&self) -> bool {
        self.closed_other > 0 || (self.sent > 0 && self.closed_1009 == 0)
    }
}

/// An authenticated socket that sends one frame just over the edge's limit
/// and reads until it is closed; then again, until `stop`.
async fn oversized(url: String, max_frame_bytes: usize, stop: Shutdown) -> OversizedReport {
    let mut out = OversizedReport::default();
    let frame = json!({
        "action": FLOOD_ACTION,
        "id": "big",
        "payload": {"junk": "a".repeat(max_frame_bytes + 1024)},
    })
    .to_string();
    while !stop.is_cancelled() {
        let connected = tokio::select! {
            connected = tokio_tungstenite::connect_async(url.as_str()) => connected,
            () = stop.cancelled() => break,
        };
        let Ok((ws, _)) = connected else {
            out.connect_failures += 1;
            if pause_or_stop(RETRY_PAUSE, &stop).await {
                break;
            }
            continue;
        };
        let (mut sink, mut stream) = ws.split();
        let (mut answers, mut other) = (0u64, 0u64);
        let ended = {
            // The server closes as soon as it reads the frame's header, so
            // its close is read while the rest is still being written.
            let sender = async {
                // Failing is fine: the reader reports how it ended.
                let _ = sink.send(Message::Text(frame.clone().into())).await;
                std::future::pending::<()>().await;
            };
            let reader = tokio::time::timeout(
                CLOSE_WAIT,
                read_until_close(&mut stream, &mut answers, &mut other),
            );
            tokio::select! {
                ended = reader => Some(ended.unwrap_or(Err(()))),
                () = sender => None,
                () = stop.cancelled() => None,
            }
        };
        match ended {
            None => break,
            Some(Ok(Some(1009))) => out.closed_1009 += 1,
            Some(Ok(code)) => {
                out.closed_other += 1;
                out.other_codes.push(code.unwrap_or(1005));
            }
            Some(Err(())) => out.ended_without_close += 1,
        }
        out.sent += 1;
        if pause_or_stop(OVERSIZED_PAUSE, &stop).await {
            break;
        }
    }
    out
}

// ---- the servers' own counters ---------------------------------------------

const RATE_LIMIT_CLOSES: &str = "streamer_gateway_rate_limit_closes_total";

/// The servers' counters the soak reports, with a label for each.
const SERVER_COUNTERS: [(&str, &str); 8] = [
    ("rate-limit closes (1008)", RATE_LIMIT_CLOSES),
    (
        "frames refused RATE_LIMITED",
        "streamer_gateway_frames_refused_total{reason=\"rate_limited\"}",
    ),
    (
        "slow-consumer closes (1008)",
        "streamer_gateway_slow_consumer_closes_total",
    ),
    ("idle closes (1001)", "streamer_gateway_idle_closes_total"),
    (
        "refused at capacity (503)",
        "streamer_gateway_connections_refused_total{reason=\"capacity\"}",
    ),
    (
        "refused, too many handshakes (503)",
        "streamer_gateway_connections_refused_total{reason=\"handshakes\"}",
    ),
    ("accept errors", "streamer_gateway_accept_errors_total"),
    // ConnectionService's: frames its inbound workers had no room for,
    // answered RATE_LIMITED with the frame's id.
    (
        "frames refused, workers full (RATE_LIMITED)",
        "streamer_inbound_rejected_total{reason=\"overloaded\"}",
    ),
];

/// The counters now, from this process's metrics recorder (the one
/// `streamer all` serves on `/metrics`); they count every system this
/// process ran, so a phase reports what they moved by.
fn server_counters() -> HashMap<&'static str, f64> {
    let text = streamer_core::telemetry::metrics_recorder().render();
    SERVER_COUNTERS
        .iter()
        .map(|(_, name)| {
            let value = text
                .lines()
                .find_map(|line| {
                    line.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0.0);
            (*name, value)
        })
        .collect()
}

/// Connections the kernel dropped because a listening socket's accept
/// queue was full (`TcpExt: ListenOverflows`, Linux), on the whole machine.
fn listen_overflows() -> Option<f64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

// ---- one phase -------------------------------------------------------------

/// What one phase (quiet or attacked) saw.
struct Phase {
    attacked: bool,
    window: Duration,
    clients: ClientReport,
    processor_claims: u64,
    processor_finals: u64,
    processor_errors: u64,
    /// Requests the processor was handed more than once.
    reclaimed: u64,
    /// Requests the server let the processor finish more than once.
    processor_double_finals: u64,
    /// Finals the processor made that no client saw.
    unseen_finals: u64,
    /// Finals a client saw that the processor never made.
    phantom_finals: u64,
    flood: FloodReport,
    slowloris: SlowlorisReport,
    /// Sockets that connect and send nothing.
    silent: SlowlorisReport,
    oversized: OversizedReport,
    /// What the servers' counters moved by in this phase (in-process only).
    counters: Option<HashMap<&'static str, f64>>,
    /// Connections the kernel dropped for a full accept queue during this
    /// phase, on the whole machine (Linux).
    listen_overflows: Option<f64>,
}

impl Phase {
    /// The side-by-side table's rows for this phase.
    fn rows(&self) -> Vec<(&'static str, String)> {
        let c = &self.clients;
        let n = |v: u64| v.to_string();
        let two = |a: u64, b: u64| format!("{a} / {b}");
        let three = |a: u64, b: u64, c: u64| format!("{a} / {b} / {c}");
        vec![
            (
                "phase + time to finish (s)",
                format!("{:.1}", self.window.as_secs_f64()),
            ),
            ("requests started", n(c.started)),
            ("accepted (acknowledged + only by resume)", n(c.accepted())),
            (
                "  acknowledged / found by get_request",
                two(c.acknowledged, c.found_by_resume),
            ),
            ("finals seen: complete / failed", two(c.completed, c.failed)),
            (
                "finals per second",
                format!("{:.1}", per_second(c.completed + c.failed, self.window)),
            ),
            ("LOST (accepted, no final)", n(c.lost)),
            ("DUPLICATED finals", n(c.duplicate_finals)),
            ("never accepted by the deadline", n(c.never_accepted)),
            (
                "drops / stalls / server closes",
                three(c.drops, c.stalls, c.server_closes),
            ),
            (
                "resumed / replayed finals (before the answer)",
                format!(
                    "{} / {} ({})",
                    c.resumes, c.replays, c.replays_before_answer
                ),
            ),
            (
                "get_request answers behind messages before them",
                n(c.answers_behind),
            ),
            (
                "sent again (NOT_FOUND, refused) / refusals",
                two(c.resubmits, c.refusals.values().sum()),
            ),
            (
                "connects / failed connects",
                two(c.connects, c.connect_failures),
            ),
            (
                "processor: claims / finals / errors",
                three(
                    self.processor_claims,
                    self.processor_finals,
                    self.processor_errors,
                ),
            ),
            (
                "  handed out twice / finished twice",
                two(self.reclaimed, self.processor_double_finals),
            ),
            (
                "finals no client saw / no processor made",
                two(self.unseen_finals, self.phantom_finals),
            ),
            ("protocol violations", n(c.violation_count)),
        ]
    }

    fn accounting_failed(&self) -> bool {
        let c = &self.clients;
        c.lost > 0
            || c.duplicate_finals > 0
            || c.violation_count > 0
            || self.unseen_finals > 0
            || self.phantom_finals > 0
            || self.processor_double_finals > 0
            || self.processor_errors > 0
    }

    fn attack_failed(&self) -> bool {
        let closes = self
            .counters
            .as_ref()
            .map(|e| e.get(RATE_LIMIT_CLOSES).copied().unwrap_or_default());
        self.attacked
            && (self.flood.failed(closes)
                || self.slowloris.failed()
                || self.silent.failed()
                || self.oversized.failed())
    }
}

async fn run_phase(
    args: &Args,
    s: &std::sync::Arc<Settings>,
    attacked: bool,
) -> anyhow::Result<Phase> {
    let header_timeout = s.header_timeout;
    let target = Target::open(args, |config| {
        config.gateway.header_read_timeout = header_timeout;
    })
    .await?;
    let ledger = std::sync::Arc::new(Ledger::default());
    let stop_processor = Shutdown::new();
    let processor = spawn_soak_processor(&target, ledger.clone(), stop_processor.clone()).await?;

    // Tokens first (RS256 signing is ~1 ms each): one user per client, so
    // request ids are the client's own.
    let run = std::process::id();
    let tenant = format!("{}-soak-{run}", args.tenant);
    let key = target.key.clone();
    let names: Vec<String> = (0..s.clients)
        .map(|c| format!("soak-u{c}"))
        .chain((0..s.flooders).map(|f| format!("soak-flood{f}")))
        .chain((0..s.oversized).map(|o| format!("soak-big{o}")))
        .collect();
    let urls: Vec<String> = {
        let tenant = tenant.clone();
        let gateway = target.gateway;
        tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .map(|sub| {
                    key.mint(&streamer_auth::dev::MintOptions {
                        sub,
                        tenant: tenant.clone(),
                        ..streamer_auth::dev::MintOptions::default()
                    })
                    .map(|token| format!("ws://{gateway}/?Authorization={token}"))
                })
                .collect::<Result<_, _>>()
        })
        .await??
    };
    let (client_urls, rest) = urls.split_at(s.clients);
    let (flood_urls, big_urls) = rest.split_at(s.flooders);

    let counters_before = (!args.external()).then(server_counters);
    let overflows_before = listen_overflows();
    let start = Instant::now();
    let end = start + s.phase;
    let hard = end + s.grace;
    let stop_attack = Shutdown::new();
    let mut floods = Vec::new();
    let mut lorises = Vec::new();
    let mut silents = Vec::new();
    let mut bigs = Vec::new();
    if attacked {
        for url in flood_urls {
            floods.push(tokio::spawn(flooder(url.clone(), stop_attack.clone())));
        }
        for i in 0..s.slowloris {
            // Spread over one dribble interval, so they are not in lockstep.
            let after = s.dribble.mul_f64(i as f64 / s.slowloris as f64);
            lorises.push(tokio::spawn(slowloris(
                target.gateway,
                after,
                false,
                s.clone(),
                stop_attack.clone(),
            )));
        }
        for _ in 0..s.silent {
            silents.push(tokio::spawn(slowloris(
                target.gateway,
                Duration::ZERO,
                true,
                s.clone(),
                stop_attack.clone(),
            )));
        }
        for url in big_urls {
            bigs.push(tokio::spawn(oversized(
                url.clone(),
                s.max_frame_bytes,
                stop_attack.clone(),
            )));
        }
    }
    let clients: Vec<_> = client_urls
        .iter()
        .enumerate()
        .map(|(c, url)| tokio::spawn(run_client(c as u64, url.clone(), s.clone(), end, hard)))
        .collect();

    // The attack lasts as long as the clients send.
    tokio::time::sleep_until(end.into()).await;
    stop_attack.cancel();
    let mut flood = FloodReport {
        sockets: floods.len(),
        ..FloodReport::default()
    };
    for task in floods {
        flood.absorb(task.await?);
    }
    let mut loris = SlowlorisReport {
        sockets: lorises.len(),
        ..SlowlorisReport::default()
    };
    for task in lorises {
        loris.absorb(task.await?);
    }
    let mut silent = SlowlorisReport {
        sockets: silents.len(),
        ..SlowlorisReport::default()
    };
    for task in silents {
        silent.absorb(task.await?);
    }
    let mut big = OversizedReport {
        sockets: bigs.len(),
        ..OversizedReport::default()
    };
    for task in bigs {
        big.absorb(task.await?);
    }
    let mut report = ClientReport::default();
    for task in clients {
        report.absorb(task.await?);
    }
    let window = start.elapsed();

    // Every final a client saw was made by a Complete or Fail call that may
    // still be returning: let them land before reading the ledger.
    let settle = Instant::now() + Duration::from_secs(5);
    while ledger.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_processor.cancel();
    let _ = processor.await;
    target.close().await?;

    let counters = counters_before.map(|before| {
        let after = server_counters();
        after
            .into_iter()
            .map(|(name, value)| (name, value - before.get(name).copied().unwrap_or_default()))
            .collect()
    });
    let listen_overflows = listen_overflows()
        .zip(overflows_before)
        .map(|(after, before)| after - before);
    let entries = ledger.snapshot();
    let seen: HashSet<(u64, u64)> = report.finals.iter().copied().collect();
    let finished: HashSet<(u64, u64)> = entries
        .iter()
        .filter(|(_, e)| e.finals > 0)
        .map(|(k, _)| *k)
        .collect();
    Ok(Phase {
        attacked,
        window,
        processor_claims: entries.values().map(|e| u64::from(e.claims)).sum(),
        processor_finals: entries.values().map(|e| u64::from(e.finals)).sum(),
        processor_errors: ledger.errors.load(Ordering::Relaxed),
        reclaimed: entries.values().filter(|e| e.claims > 1).count() as u64,
        processor_double_finals: entries.values().filter(|e| e.finals > 1).count() as u64,
        unseen_finals: finished.difference(&seen).count() as u64,
        phantom_finals: seen.difference(&finished).count() as u64,
        clients: report,
        flood,
        slowloris: loris,
        silent,
        counters,
        listen_overflows,
        oversized: big,
    })
}

// ---- the scenario ----------------------------------------------------------

pub(crate) struct SoakResult {
    settings: Settings,
    quiet: Phase,
    attacked: Phase,
}

pub(crate) async fn run_soak(args: &Args) -> anyhow::Result<SoakResult> {
    let settings = std::sync::Arc::new(Settings::from_args(args)?);
    println!();
    println!(
        "soak: seed {} (rerun the same plans with --seed {}); quiet phase, then attacked ...",
        settings.seed, settings.seed
    );
    let quiet = run_phase(args, &settings, false)
        .await
        .context("the quiet phase")?;
    let attacked = run_phase(args, &settings, true)
        .await
        .context("the attacked phase")?;
    Ok(SoakResult {
        settings: Settings::clone(&settings),
        quiet,
        attacked,
    })
}

fn pair(label: &str, quiet: impl Display, attacked: impl Display) -> String {
    format!("  {label:<48} {quiet:>14} {attacked:>14}")
}

/// Latency rows with room for the phase in the label.
fn latency_header() -> String {
    format!(
        "  {:<48} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "n", "p50", "p90", "p99", "max"
    )
}

fn latency_row(name: &str, samples: &[Duration]) -> String {
    let s = Summary::of(samples.to_vec());
    format!(
        "  {name:<48} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        s.count, s.p50, s.p90, s.p99, s.max
    )
}

impl SoakResult {
    pub(crate) fn failed(&self) -> bool {
        self.quiet.accounting_failed()
            || self.attacked.accounting_failed()
            || self.attacked.attack_failed()
    }

    pub(crate) fn print(&self) {
        let s = &self.settings;
        let (q, a) = (&self.quiet, &self.attacked);
        let (qc, ac) = (&q.clients, &a.clients);
        println!();
        println!(
            "== soak: {} clients, {} s quiet then {} s attacked; think 0..{} ms, drop {:.0}%, fail {:.0}%; seed {}",
            s.clients,
            s.phase.as_secs_f64(),
            s.phase.as_secs_f64(),
            2 * s.think.as_millis(),
            s.drop * 100.0,
            s.fail * 100.0,
            s.seed
        );
        println!("{}", pair("", "quiet", "attacked"));
        for ((label, quiet), (_, attacked)) in q.rows().into_iter().zip(a.rows()) {
            println!("{}", pair(label, quiet, attacked));
        }
        for (phase, c) in [("quiet", qc), ("attacked", ac)] {
            if !c.refusals.is_empty() {
                println!("  refusals, {phase}: {:?}", c.refusals);
            }
        }
        println!("{}", latency_header());
        for (name, quiet, attacked) in [
            (
                "submit -> final, uninterrupted",
                &qc.clean_latency,
                &ac.clean_latency,
            ),
            (
                "submit -> final, resumed",
                &qc.resumed_latency,
                &ac.resumed_latency,
            ),
            (
                "WebSocket connect",
                &qc.connect_latency,
                &ac.connect_latency,
            ),
        ] {
            println!("{}", latency_row(&format!("{name}, quiet"), quiet));
            println!("{}", latency_row(&format!("{name}, attacked"), attacked));
        }

        let (f, o) = (&a.flood, &a.oversized);
        println!("  what the attackers got (attacked phase):");
        println!(
            "    flood: {} sockets, {} sessions, {} frames sent ({:.0}/s); answers read: {} RATE_LIMITED, {} other",
            f.sockets,
            f.sessions,
            f.frames_sent,
            per_second(f.frames_sent, s.phase),
            f.rate_limited,
            f.other_answers
        );
        println!(
            "    flood sessions ended by the edge: {} with a close 1008 read, {} reset after RATE_LIMITED before the close could be read; \
             {} ended without a RATE_LIMITED, {} closed with another code {:?}; {} failed connects",
            f.closed_1008,
            f.reset_after_rate_limited,
            f.ended_unwarned,
            f.closed_other,
            f.other_codes,
            f.connect_failures
        );
        for (name, l) in [("slowloris", &a.slowloris), ("silent", &a.silent)] {
            if l.sockets == 0 {
                continue;
            }
            println!(
                "    {name}: {} sockets, {} opened, {} closed by the edge ({} after a 408), {} bytes dribbled; \
                 {} closed past the limit of {:.1} s; {} still open at the end, {} of them past the limit (the oldest {:.1} s); {} failed connects",
                l.sockets,
                l.opened,
                l.close_times.len(),
                l.answered_408,
                l.bytes_dribbled,
                l.closed_late,
                s.slowloris_limit().as_secs_f64(),
                l.open_at_end,
                l.held_past_limit,
                l.longest_open_at_end.as_secs_f64(),
                l.connect_failures
            );
        }
        println!(
            "    oversized: {} sockets, {} frames of {} KiB; {} closed 1009, {} with another code {:?}, {} ended without a close frame",
            o.sockets,
            o.sent,
            (s.max_frame_bytes + 1024) / 1024,
            o.closed_1009,
            o.closed_other,
            o.other_codes,
            o.ended_without_close
        );
        if let (Some(qe), Some(ae)) = (&q.counters, &a.counters) {
            println!("  the servers' own counters (in-process):");
            for (label, name) in SERVER_COUNTERS {
                println!(
                    "{}",
                    pair(
                        &format!("  {label}"),
                        qe.get(name).copied().unwrap_or_default(),
                        ae.get(name).copied().unwrap_or_default()
                    )
                );
            }
        }
        if let (Some(qo), Some(ao)) = (q.listen_overflows, a.listen_overflows) {
            println!(
                "{}",
                pair("  listen-queue overflows (kernel, whole machine)", qo, ao)
            );
        }
        println!("{}", latency_header());
        println!(
            "{}",
            latency_row("flood: connect -> ended by the edge", &f.session_time)
        );
        for (name, l) in [("slowloris", &a.slowloris), ("silent", &a.silent)] {
            if l.sockets > 0 {
                println!(
                    "{}",
                    latency_row(
                        &format!(
                            "{name}: open -> closed (timeout {:.1} s)",
                            s.header_timeout.as_secs_f64()
                        ),
                        &l.close_times
                    )
                );
            }
        }
        for (phase, report) in [("quiet", qc), ("attacked", ac)] {
            for v in &report.violations {
                println!("    - {phase}: {v}");
            }
        }
        println!(
            "  accounting: {}; attackers: {}",
            if q.accounting_failed() || a.accounting_failed() {
                "FAILED"
            } else {
                "every accepted request had exactly one final"
            },
            if a.attack_failed() {
                "FAILED (see above)"
            } else {
                "refused as expected"
            }
        );
    }

    pub(crate) fn to_json(&self) -> Value {
        let s = &self.settings;
        let phase = |p: &Phase| {
            let c = &p.clients;
            json!({
                "window_s": p.window.as_secs_f64(),
                "started": c.started,
                "accepted": c.accepted(),
                "acknowledged": c.acknowledged,
                "found_by_resume": c.found_by_resume,
                "completed": c.completed,
                "failed": c.failed,
                "lost": c.lost,
                "duplicate_finals": c.duplicate_finals,
                "never_accepted": c.never_accepted,
                "drops": c.drops,
                "stalls": c.stalls,
                "server_closes": c.server_closes,
                "resumes": c.resumes,
                "replays": c.replays,
                "replays_before_answer": c.replays_before_answer,
                "answers_behind": c.answers_behind,
                "resubmits": c.resubmits,
                "refusals": c.refusals,
                "connects": c.connects,
                "connect_failures": c.connect_failures,
                "processor_claims": p.processor_claims,
                "processor_finals": p.processor_finals,
                "processor_errors": p.processor_errors,
                "reclaimed": p.reclaimed,
                "processor_double_finals": p.processor_double_finals,
                "unseen_finals": p.unseen_finals,
                "phantom_finals": p.phantom_finals,
                "violations": c.violation_count,
                "violation_samples": c.violations,
                "latency_uninterrupted": Summary::of(c.clean_latency.clone()).to_json(),
                "latency_resumed": Summary::of(c.resumed_latency.clone()).to_json(),
                "connect_latency": Summary::of(c.connect_latency.clone()).to_json(),
                "server_counters": p.counters,
                "listen_overflows": p.listen_overflows,
            })
        };
        let sockets = |l: &SlowlorisReport| {
            json!({
                "sockets": l.sockets, "opened": l.opened, "closed": l.close_times.len(),
                "answered_408": l.answered_408, "closed_late": l.closed_late,
                "open_at_end": l.open_at_end, "held_past_limit": l.held_past_limit,
                "longest_open_at_end_s": l.longest_open_at_end.as_secs_f64(),
                "close_time": Summary::of(l.close_times.clone()).to_json(),
            })
        };
        let (f, o) = (&self.attacked.flood, &self.attacked.oversized);
        json!({
            "scenario": "soak",
            "seed": s.seed,
            "clients": s.clients,
            "phase_s": s.phase.as_secs_f64(),
            "think_mean_ms": s.think.as_millis() as u64,
            "drop": s.drop,
            "fail": s.fail,
            "quiet": phase(&self.quiet),
            "attacked": phase(&self.attacked),
            "flood": {
                "sockets": f.sockets, "sessions": f.sessions, "frames_sent": f.frames_sent,
                "rate_limited": f.rate_limited, "other_answers": f.other_answers,
                "closed_1008": f.closed_1008,
                "reset_after_rate_limited": f.reset_after_rate_limited,
                "ended_unwarned": f.ended_unwarned, "closed_other": f.closed_other,
                "connect_failures": f.connect_failures,
                "session": Summary::of(f.session_time.clone()).to_json(),
            },
            "header_timeout_s": s.header_timeout.as_secs_f64(),
            "slowloris_limit_s": s.slowloris_limit().as_secs_f64(),
            "slowloris": sockets(&self.attacked.slowloris),
            "silent": sockets(&self.attacked.silent),
            "oversized": {
                "sockets": o.sockets, "sent": o.sent, "closed_1009": o.closed_1009,
                "closed_other": o.closed_other, "ended_without_close": o.ended_without_close,
            },
            "failed": self.failed(),
        })
    }
}
