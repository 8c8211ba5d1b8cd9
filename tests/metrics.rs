//! Every role's `/metrics`, each role its own `streamer` process as in a
//! deployment, after real traffic: a WebSocket client connects and a bad
//! token is refused, a Send, a tenant broadcast, an action answered by a
//! router, a request run by a processor with progress and its completion,
//! a topic publish, a processor's lease that lapses, a slow consumer closed,
//! and an edge that dies, its lease lapsing.
//!
//! Before any traffic each role already exports every family of the
//! catalogue it owns (created at 0), each with `# HELP` and `# TYPE`; after
//! it, each family named below has moved on the role that owns it. On
//! every scrape: no family outside the catalogue, label values in
//! snake_case (gRPC's own service and method names aside), histograms with
//! buckets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::{Value, json};
use streamer_api::v1::{
    self, DeliveryOutcome, claim_response::Item,
    connection_service_client::ConnectionServiceClient,
    progress_service_client::ProgressServiceClient,
};
use streamer_auth::dev::MintOptions;
use streamer_core::metrics::{FAMILIES, Kind, Role};
use support::{WsClient, eventually, http_get, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_stream::StreamExt;

const STREAMER: &str = env!("CARGO_BIN_EXE_streamer");

/// One role's process and where it listens, as its log says.
struct Process {
    child: Child,
    /// `message` of each "... listening" log line (with the services of a
    /// gRPC server) to the address it names.
    listening: HashMap<String, SocketAddr>,
}

impl Process {
    fn at(&self, what: &str) -> SocketAddr {
        *self
            .listening
            .get(what)
            .unwrap_or_else(|| panic!("no {what:?} in {:?}", self.listening))
    }

    fn metrics(&self) -> String {
        format!("http://{}/metrics", self.at("metrics listening"))
    }
}

/// Starts `streamer ROLE ARGS...` and reads its JSON log until it names
/// each of `expect`'s listeners.
async fn launch(role: &str, args: &[String], expect: &[&str]) -> Process {
    let mut child = Command::new(STREAMER)
        .arg(role)
        .args(args)
        .env("STREAMER_LOG", "info")
        .env("STREAMER_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut listening = HashMap::new();
    within(&format!("`streamer {role}` to listen"), async {
        while !expect.iter().all(|e| listening.contains_key(*e)) {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("`streamer {role}` ended"));
            let Ok(log) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let (Some(message), Some(address)) = (log["message"].as_str(), log["address"].as_str())
            else {
                continue;
            };
            let key = match log["services"].as_str() {
                Some(services) if services.contains("EdgeService") => "edge listening",
                _ => message,
            };
            listening.insert(key.to_owned(), address.parse().unwrap());
        }
    })
    .await;
    // Keep reading so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Process { child, listening }
}

/// A port that forwards to an address known only later: ProgressService
/// and ConnectionService each need the other's URL at start.
async fn forwarder() -> (SocketAddr, watch::Sender<Option<SocketAddr>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (target, known) = watch::channel(None);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut known = known.clone();
            tokio::spawn(async move {
                let Ok(target) = known.wait_for(Option::is_some).await.map(|t| t.unwrap()) else {
                    return;
                };
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, target)
}

/// One sample of a scrape.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape: its samples and its `# HELP`/`# TYPE` lines by family.
struct Scrape {
    samples: Vec<Sample>,
    help: HashMap<String, String>,
    types: HashMap<String, String>,
}

fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape {
        samples: Vec::new(),
        help: HashMap::new(),
        types: HashMap::new(),
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            scrape.help.insert(name.into(), help.into());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            scrape.types.insert(name.into(), kind.into());
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            scrape.samples.push(Sample {
                name: name.into(),
                labels,
                value: value.parse().unwrap(),
            });
        }
    }
    scrape
}

async fn scrape(process: &Process) -> Scrape {
    let (status, body) = http_get(&process.metrics()).await.unwrap();
    assert_eq!(status, 200);
    parse(&body)
}

impl Scrape {
    /// The family a sample belongs to (a histogram's `_bucket`, `_sum` and
    /// `_count` belong to the histogram).
    fn family_of(&self, sample: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && self.types.get(base).map(String::as_str) == Some("histogram")
            {
                return base.to_owned();
            }
        }
        sample.to_owned()
    }

    /// Whether `family` moved: a counter or gauge above 0, a histogram
    /// with an observation, on some series whose labels include `with`.
    fn moved(&self, family: &str, with: &[(&str, &str)]) -> bool {
        let name = match self.types.get(family).map(String::as_str) {
            Some("histogram") => format!("{family}_count"),
            _ => family.to_owned(),
        };
        self.samples.iter().any(|s| {
            s.name == name
                && s.value > 0.0
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// What every scrape of `role` must be, traffic or not.
    fn check_shape(&self, role: Role) {
        let snake = |v: &str| {
            v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        for sample in &self.samples {
            let family = self.family_of(&sample.name);
            let entry = FAMILIES
                .iter()
                .find(|f| f.name == family)
                .unwrap_or_else(|| panic!("{family} is not in the catalogue"));
            assert!(entry.roles.contains(&role), "{family} on {role:?}");
            assert!(self.help.contains_key(&family), "{family} has no HELP");
            assert_eq!(
                self.types.get(&family).map(String::as_str),
                Some(entry.kind.name()),
                "{family}'s TYPE"
            );
            for (label, value) in &sample.labels {
                // Bucket bounds and the version are numbers; gRPC names
                // its services and methods its own way.
                if ["le", "version", "service", "method"].contains(&label.as_str()) {
                    continue;
                }
                assert!(snake(value), "{}{{{label}={value:?}}}", sample.name);
            }
        }
        for family in FAMILIES.iter().filter(|f| f.roles.contains(&role)) {
            // Only the DynamoDB store calls DynamoDB; these roles run on
            // the embedded one.
            if family.name == "streamer_dynamodb_calls_total" {
                continue;
            }
            assert!(
                self.types.contains_key(family.name),
                "{role:?} lacks {} before it moved",
                family.name
            );
            if family.kind == Kind::Histogram {
                let bucket = format!("{}_bucket", family.name);
                assert!(
                    self.samples.iter().any(|s| s.name == bucket
                        && s.labels.get("le").map(String::as_str) == Some("+Inf")),
                    "{} has no buckets",
                    family.name
                );
            }
            // Every value of every label, where the catalogue lists them
            // all (gRPC methods and store operations are their owners').
            let listed = family.labels.iter().all(|l| !l.values.is_empty());
            for label in family.labels.iter().filter(|_| listed) {
                for value in label.values {
                    assert!(
                        self.samples
                            .iter()
                            .any(|s| self.family_of(&s.name) == family.name
                                && s.labels.get(label.name) == Some(&value.to_string())),
                        "{}{{{}={value:?}}} is not created at 0",
                        family.name,
                        label.name
                    );
                }
            }
        }
    }
}

/// Waits until every family of `expected` moved on `process`; the message
/// names those that did not.
async fn all_moved(process: &Process, role: Role, expected: &[(&str, &[(&str, &str)])]) {
    let mut missing = Vec::new();
    let moved = tokio::time::timeout(support::EVENT_TIMEOUT, async {
        loop {
            let scrape = scrape(process).await;
            scrape.check_shape(role);
            missing = expected
                .iter()
                .filter(|(family, with)| !scrape.moved(family, with))
                .map(|(family, with)| {
                    let seen: Vec<String> = scrape
                        .samples
                        .iter()
                        .filter(|s| s.name.starts_with(family) && s.value > 0.0)
                        .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
                        .collect();
                    format!("{family}{with:?} (moved: {seen:?})")
                })
                .collect();
            if missing.is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(moved.is_ok(), "{role:?}: did not move: {missing:?}");
}

#[tokio::test]
async fn every_role_exports_every_family_and_each_moves_with_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let key = streamer_auth::dev::ensure_dev_key(dir.path()).unwrap();
    let path = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    let any = "127.0.0.1:0".to_owned();
    let flags = |pairs: &[(&str, String)]| -> Vec<String> {
        pairs
            .iter()
            .flat_map(|(flag, value)| [format!("--{flag}"), value.clone()])
            .collect()
    };
    let public_key = streamer_auth::dev::public_key_path(dir.path());

    let auth = launch(
        "auth",
        &flags(&[
            ("listen", any.clone()),
            ("metrics-listen", any.clone()),
            ("data-dir", path("auth")),
            ("auth-keys", public_key.to_str().unwrap().to_owned()),
        ]),
        &["grpc server listening", "metrics listening"],
    )
    .await;
    let (connection_port, connection_known) = forwarder().await;
    let progress = launch(
        "progress",
        &flags(&[
            ("listen", any.clone()),
            ("metrics-listen", any.clone()),
            ("data-dir", path("progress")),
            ("connection-url", format!("http://{connection_port}")),
            // Slow enough that a burst of reports coalesces.
            ("progress-rate", "1".into()),
        ]),
        &["grpc server listening", "metrics listening"],
    )
    .await;
    let connection = launch(
        "connection",
        &flags(&[
            ("listen", any.clone()),
            ("edge-listen", any.clone()),
            ("metrics-listen", any.clone()),
            ("data-dir", path("connection")),
            // Short, so that an edge that dies lapses soon.
            ("edge-lease-secs", "3".into()),
            (
                "auth-url",
                format!("http://{}", auth.at("grpc server listening")),
            ),
            (
                "progress-url",
                format!("http://{}", progress.at("grpc server listening")),
            ),
        ]),
        &[
            "grpc server listening",
            "edge listening",
            "metrics listening",
        ],
    )
    .await;
    connection_known.send_replace(Some(connection.at("grpc server listening")));
    let mut gateway = launch(
        "gateway",
        &flags(&[
            ("listen", any.clone()),
            ("metrics-listen", any.clone()),
            (
                "auth-url",
                format!("http://{}", auth.at("grpc server listening")),
            ),
            (
                "connection-edge-url",
                format!("http://{}", connection.at("edge listening")),
            ),
            // A client that reads nothing is a slow consumer soon.
            ("outbound-queue", "4".into()),
        ]),
        &["websocket edge listening", "metrics listening"],
    )
    .await;
    let edge = gateway.at("websocket edge listening");
    eventually("the edge to attach", || async move {
        http_get(&format!("http://{edge}/readyz"))
            .await
            .map(|r| r.0)
            == Some(200)
    })
    .await;

    // Before any traffic: every family, at 0, in shape.
    for (process, role) in [
        (&auth, Role::Auth),
        (&connection, Role::Connection),
        (&progress, Role::Progress),
        (&gateway, Role::Gateway),
    ] {
        scrape(process).await.check_shape(role);
    }

    // A client connects; an expired token is refused.
    let token = |sub: &str, expired: bool| {
        key.mint(&MintOptions {
            sub: sub.into(),
            tenant: "acme".into(),
            expired,
            ..MintOptions::default()
        })
        .unwrap()
    };
    let ws = |token: String| format!("ws://{edge}/?Authorization={token}");
    let connect = |sub: &'static str| {
        let url = ws(token(sub, false));
        async move {
            let (ws, _) = within(
                "a websocket to connect",
                tokio_tungstenite::connect_async(url),
            )
            .await
            .unwrap();
            WsClient { ws }
        }
    };
    let (status, _) = http_get(&format!(
        "http://{edge}/?Authorization={}",
        token("eve", true)
    ))
    .await
    .unwrap();
    assert_eq!(status, 401);
    let mut alice = connect("alice").await;
    let url = format!("http://{}", connection.at("grpc server listening"));
    let mut connections = ConnectionServiceClient::connect(url).await.unwrap();
    let alice_id = support::user_connection_ids(&mut connections, "acme", "alice")
        .await
        .pop()
        .unwrap();

    // A Send and a tenant broadcast.
    connections
        .send(support::send(&alice_id, json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(alice.recv_backend_json().await, json!({"n": 1}));
    connections
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                tenant_id: "acme".into(),
            })),
            payload: support::json_payload(json!({"n": 2})),
            tenant_id: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(alice.recv_backend_json().await, json!({"n": 2}));

    // An action a router answers.
    let mut router = support::receive(
        &mut connections,
        v1::ReceiveRequest {
            actions: vec!["echo".into()],
            router_id: "router".into(),
        },
    )
    .await;
    alice
        .send_json(json!({"action": "echo", "id": "e1", "payload": {"x": 1}}))
        .await;
    let frame = within("the routed frame", router.next())
        .await
        .unwrap()
        .unwrap();
    connections
        .send(support::send(
            &frame.connection_id,
            json!({"type": "response", "request_id": frame.request_id, "success": true, "data": null}),
        ))
        .await
        .unwrap();
    assert_eq!(alice.recv_json().await["request_id"], "e1");

    // A request a processor runs: a burst of progress, then its result.
    let url = format!("http://{}", progress.at("grpc server listening"));
    let mut processor = ProgressServiceClient::connect(url).await.unwrap();
    let mut work = support::claim(
        &mut processor,
        support::claim_request("processor", "generate_report", 1, 30),
    )
    .await;
    alice
        .send_json(json!({"action": "generate_report", "id": "r1", "payload": {}}))
        .await;
    let request = loop {
        let item = within("work", work.next()).await.unwrap().unwrap();
        if let Some(Item::Work(request)) = item.item {
            break request;
        }
    };
    let id = request.id.clone();
    let report = move |step: u32| v1::ReportRequest {
        id: id.clone(),
        processor_id: "processor".into(),
        percentage: f64::from(step) * 10.0,
        message: format!("step {step}"),
        metadata: None,
    };
    // One progress report, delivered; then a burst, of which all but the
    // latest wait (one message a second) and are replaced.
    processor
        .report(tokio_stream::iter([report(1)]))
        .await
        .unwrap();
    within("the first progress message", async {
        while alice.recv_json().await["type"] != "progress" {}
    })
    .await;
    processor
        .report(tokio_stream::iter((2..=6).map(report)))
        .await
        .unwrap();
    processor
        .complete(v1::CompleteRequest {
            id: request.id.clone(),
            processor_id: "processor".into(),
            result: Some(streamer_api::json::to_proto(json!({"done": true}))),
        })
        .await
        .unwrap();
    within("the request's final message", async {
        loop {
            let message = alice.recv_json().await;
            if message["type"] == "complete" {
                break;
            }
        }
    })
    .await;

    // A topic publish.
    connections
        .subscribe(v1::SubscribeRequest {
            tenant_id: "acme".into(),
            topic: "news".into(),
            target: Some(v1::subscribe_request::Target::UserId("alice".into())),
        })
        .await
        .unwrap();
    connections
        .publish(v1::PublishRequest {
            tenant_id: "acme".into(),
            topic: "news".into(),
            payload: support::json_payload(json!("hello")),
            key: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(alice.recv_json().await["type"], "message");

    // A processor that takes work and never reports: its one-second lease
    // lapses.
    let mut sleepy = support::claim(
        &mut processor,
        support::claim_request("sleepy", "export", 1, 1),
    )
    .await;
    alice
        .send_json(json!({"action": "export", "id": "x1", "payload": {}}))
        .await;
    within("the export's work", async {
        while !matches!(
            sleepy.next().await.unwrap().unwrap().item,
            Some(Item::Work(_))
        ) {}
    })
    .await;

    // A slow consumer, closed (and its connection removed).
    let mut slow = connect("slow").await;
    let slow_id = support::user_connection_ids(&mut connections, "acme", "slow")
        .await
        .pop()
        .unwrap();
    let big = "x".repeat(256 * 1024);
    let mut throttled = false;
    for _ in 0..2000 {
        let sent = connections
            .send(support::send(&slow_id, json!({ "blob": big })))
            .await
            .unwrap();
        if sent.get_ref().outcome == DeliveryOutcome::Throttled as i32 {
            throttled = true;
            break;
        }
    }
    assert!(throttled, "the slow consumer was never throttled");
    assert_eq!(slow.expect_close().await.0, 1008);

    let grpc = |method: &'static str| -> [(&'static str, &'static str); 2] {
        [("method", method), ("code", "ok")]
    };
    let validate = grpc("ValidateToken");
    all_moved(
        &auth,
        Role::Auth,
        &[
            ("streamer_build_info", &[]),
            ("process_resident_memory_bytes", &[]),
            ("process_open_fds", &[]),
            ("process_start_time_seconds", &[]),
            ("streamer_auth_validations_total", &[("result", "valid")]),
            ("streamer_auth_validations_total", &[("result", "refused")]),
            ("streamer_auth_failures_total", &[("reason", "expired")]),
            ("streamer_grpc_server_handled_total", &validate),
            (
                "streamer_grpc_server_handling_seconds",
                &[("method", "ValidateToken")],
            ),
            (
                "streamer_store_operation_duration_seconds",
                &[("backend", "embedded")],
            ),
        ],
    )
    .await;
    let send = grpc("Send");
    let publish = grpc("Publish");
    all_moved(
        &connection,
        Role::Connection,
        &[
            ("streamer_build_info", &[]),
            ("process_resident_memory_bytes", &[]),
            ("streamer_connections_opened_total", &[]),
            ("streamer_connections_closed_total", &[]),
            ("streamer_deliveries_total", &[("outcome", "delivered")]),
            ("streamer_deliveries_total", &[("outcome", "throttled")]),
            ("streamer_send_duration_seconds", &[]),
            ("streamer_fanouts_total", &[("selector", "tenant")]),
            ("streamer_fanouts_total", &[("selector", "topic")]),
            (
                "streamer_fanout_duration_seconds",
                &[("selector", "tenant")],
            ),
            ("streamer_fanout_duration_seconds", &[("selector", "topic")]),
            ("streamer_edges_attached", &[]),
            ("streamer_inbound_frames_total", &[]),
            ("streamer_subscriptions_total", &[]),
            ("streamer_topic_messages_total", &[]),
            ("streamer_grpc_server_handled_total", &send),
            ("streamer_grpc_server_handled_total", &publish),
            (
                "streamer_grpc_server_handling_seconds",
                &[("method", "Broadcast")],
            ),
            (
                "streamer_store_operation_duration_seconds",
                &[("operation", "put_connection")],
            ),
        ],
    )
    .await;
    let claim = grpc("Claim");
    all_moved(
        &progress,
        Role::Progress,
        &[
            ("streamer_build_info", &[]),
            ("process_resident_memory_bytes", &[]),
            ("streamer_progress_requests_submitted_total", &[]),
            ("streamer_progress_requests_dispatched_total", &[]),
            (
                "streamer_progress_requests_finished_total",
                &[("status", "completed")],
            ),
            (
                "streamer_progress_delivered_total",
                &[("kind", "acknowledgment")],
            ),
            ("streamer_progress_delivered_total", &[("kind", "progress")]),
            ("streamer_progress_delivered_total", &[("kind", "final")]),
            ("streamer_progress_coalesced_total", &[]),
            ("streamer_progress_processors", &[]),
            ("streamer_progress_leases_lapsed_total", &[]),
            ("streamer_grpc_server_handled_total", &grpc("Complete")),
            (
                "streamer_store_operation_duration_seconds",
                &[("operation", "create_request")],
            ),
        ],
    )
    .await;
    all_moved(
        &gateway,
        Role::Gateway,
        &[
            ("streamer_build_info", &[]),
            ("process_resident_memory_bytes", &[]),
            ("streamer_gateway_connections", &[("state", "open")]),
            (
                "streamer_gateway_auth_failures_total",
                &[("reason", "token_expired")],
            ),
            ("streamer_gateway_frames_total", &[]),
            ("streamer_gateway_slow_consumer_closes_total", &[]),
        ],
    )
    .await;
    // The processor's Claim stream is open: counted when it ends.
    let scrape_progress = scrape(&progress).await;
    assert!(!scrape_progress.moved("streamer_grpc_server_handled_total", &claim));
    drop(work);
    all_moved(
        &progress,
        Role::Progress,
        &[(
            "streamer_grpc_server_handled_total",
            &[("method", "Claim"), ("code", "cancelled")],
        )],
    )
    .await;

    // The edge dies without detaching: its lease lapses.
    gateway.child.start_kill().unwrap();
    all_moved(
        &connection,
        Role::Connection,
        &[("streamer_edges_lapsed_total", &[])],
    )
    .await;
}

/// The README's table names every family of the catalogue.
#[test]
fn the_readme_lists_every_family() {
    let readme = include_str!("../README.md");
    for family in FAMILIES {
        assert!(
            readme.contains(&format!("`{}`", family.name)),
            "README.md does not list {}",
            family.name
        );
    }
}
