//! The `streamer` binary as a newcomer meets it: `streamer all` on a fresh
//! data directory prints a banner whose token and copy-paste commands work
//! exactly as printed (run here through a shell, with the real grpcurl and
//! the real `python3 -m websockets` client), and `streamer token` mints
//! tokens the system accepts or refuses as asked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "support/otlp.rs"]
mod otlp;

use std::process::Stdio;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use support::{http_get, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const STREAMER: &str = env!("CARGO_BIN_EXE_streamer");

struct Banner {
    lines: Vec<String>,
}

impl Banner {
    fn value(&self, label: &str) -> String {
        self.lines
            .iter()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(label)
                    .map(|rest| rest.trim().to_owned())
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {label:?} line in the banner:\n{}",
                    self.lines.join("\n")
                )
            })
    }

    fn command(&self, starts_with: &str) -> String {
        self.lines
            .iter()
            .map(|l| l.trim())
            .find(|l| l.starts_with(starts_with))
            .unwrap_or_else(|| panic!("no {starts_with:?} command in the banner"))
            .to_owned()
    }
}

/// Starts `streamer all` on ephemeral ports in a fresh data directory and
/// reads its banner.
async fn start_all(data_dir: &std::path::Path) -> (Child, Banner) {
    start_all_with(data_dir, &[]).await
}

/// [`start_all`], with these environment variables as well.
async fn start_all_with(data_dir: &std::path::Path, env: &[(&str, &str)]) -> (Child, Banner) {
    let mut child = Command::new(STREAMER)
        .args(["all", "--data-dir"])
        .arg(data_dir)
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
        .env("STREAMER_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    within("the banner", async {
        while let Some(line) = out.next_line().await.unwrap() {
            let done = line.trim_start().starts_with("grpcurl") && line.contains("Broadcast");
            lines.push(line);
            if done {
                break;
            }
        }
    })
    .await;
    // Keep reading so the process never writes into a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    (child, Banner { lines })
}

/// Sends SIGTERM and expects a clean exit.
async fn terminate(streamer: &mut Child) {
    let pid = streamer.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = within("streamer to exit", streamer.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}

/// The banner's demo token (on its own line after the label).
fn demo_token(banner: &Banner) -> String {
    let token = banner.value("Demo token").to_owned();
    if token.is_empty() || token.starts_with('(') {
        let at = banner
            .lines
            .iter()
            .position(|l| l.starts_with("Demo token"))
            .unwrap();
        banner.lines[at + 2].trim().to_owned()
    } else {
        token
    }
}

async fn shell(command: &str) -> (bool, String) {
    let output = within(command, Command::new("bash").args(["-c", command]).output())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test]
async fn streamer_all_prints_commands_that_work_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut streamer, banner) = start_all(dir.path()).await;
    assert!(
        dir.path().join("keys/dev.pem").exists(),
        "first run creates the dev key"
    );
    let ws = banner.value("WebSocket");
    let gateway = ws
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    let token = demo_token(&banner);
    assert_eq!(
        token.split('.').count(),
        3,
        "the demo token is a JWT: {token}"
    );

    // Wait until the edge is attached.
    let ready = format!("http://{gateway}/readyz");
    support::eventually("the edge to be ready", || {
        let ready = ready.clone();
        async move { http_get(&ready).await.map(|r| r.0) == Some(200) }
    })
    .await;

    // The printed WebSocket client, fed by a pipe we keep open.
    let client_command = banner.command("python3 -m websockets");
    let mut client = Command::new("bash")
        .args(["-c", &client_command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Its exit noise when the server goes away is not ours to show.
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _keep_stdin_open = client.stdin.take().unwrap();
    let mut client_out = BufReader::new(client.stdout.take().unwrap()).lines();
    let connected = within("the websocket client to connect", client_out.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(connected.starts_with("Connected to"), "{connected}");

    // The printed grpcurl commands.
    let (ok, listed) = shell(&banner.command("grpcurl -plaintext -d '{\"tenant_id\"")).await;
    assert!(ok, "{listed}");
    assert!(listed.contains("\"userId\": \"demo-user\""), "{listed}");
    let (ok, broadcast) = shell(&banner.command("grpcurl -plaintext -d '{\"tenant\"")).await;
    assert!(ok, "{broadcast}");
    assert!(broadcast.contains("\"delivered\": 1"), "{broadcast}");
    let received = within("the broadcast at the client", async {
        loop {
            let line = client_out.next_line().await.unwrap().unwrap();
            if line.contains("hello") {
                return line;
            }
        }
    })
    .await;
    assert!(received.contains(r#"{"hello":"world"}"#), "{received}");

    // grpcurl works by reflection alone, on every server.
    for label in ["AuthService", "ConnectionService", "ProgressService"] {
        let addr = banner.value(label);
        let (ok, services) = shell(&format!("grpcurl -plaintext {addr} list")).await;
        assert!(ok, "{services}");
        assert!(
            services.contains(&format!("streamer.v1.{label}")),
            "{services}"
        );
        assert!(services.contains("grpc.health.v1.Health"), "{services}");
        let (ok, health) = shell(&format!(
            "grpcurl -plaintext {addr} grpc.health.v1.Health/Check"
        ))
        .await;
        assert!(ok && health.contains("SERVING"), "{health}");
    }
    let conn = banner.value("ConnectionService");
    let (ok, described) = shell(&format!(
        "grpcurl -plaintext {conn} describe streamer.v1.ConnectionService.Broadcast"
    ))
    .await;
    assert!(ok && described.contains("BroadcastRequest"), "{described}");
    let (ok, refused) = shell(&format!(
        "grpcurl -plaintext -d '{{\"connection_id\":\"nope\"}}' {conn} streamer.v1.ConnectionService/GetConnection"
    ))
    .await;
    assert!(!ok && refused.contains("NotFound"), "{refused}");

    // Prometheus metrics are served.
    let metrics = banner.value("Metrics");
    let metrics = metrics.strip_prefix("http://").unwrap();
    let (status, body) = http_get(&format!("http://{metrics}")).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("streamer_deliveries_total"), "{body}");

    // `streamer token` mints with the same key: valid and expired.
    let mint = |extra: &[&str]| {
        let output = std::process::Command::new(STREAMER)
            .args(["token", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let other = mint(&[
        "--sub",
        "bob",
        "--tenant",
        "globex",
        "--permissions",
        "admin",
    ]);
    let (ok, _) = shell(&format!(
        "python3 -c \"import asyncio, websockets; asyncio.run(websockets.connect('ws://{gateway}/?Authorization={other}').__aenter__())\""
    ))
    .await;
    assert!(ok, "a minted token connects");
    let expired = mint(&["--expired"]);
    let (status, body) = http_get(&format!("http://{gateway}/?Authorization={expired}"))
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert!(body.contains("token_expired"), "{body}");

    // SIGTERM: a clean exit, and the client sees 1001.
    terminate(&mut streamer).await;
    let closed = within("the client to see the close", async {
        loop {
            match client_out.next_line().await.unwrap() {
                Some(line) if line.contains("Connection closed") => return line,
                Some(_) => continue,
                None => return String::new(),
            }
        }
    })
    .await;
    assert!(closed.contains("1001"), "{closed}");
    let _ = tokio::time::timeout(Duration::from_secs(5), client.wait()).await;
}

#[test]
fn help_explains_every_role() {
    let output = std::process::Command::new(STREAMER)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for role in ["auth", "connection", "progress", "gateway", "all", "token"] {
        assert!(help.contains(role), "{role} missing from:\n{help}");
    }
    let output = std::process::Command::new(STREAMER)
        .args(["all", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for env in [
        "STREAMER_DATA_DIR",
        "STREAMER_AUTH_KEYS",
        "STREAMER_PROGRESS_RATE",
        "STREAMER_ALLOWED_TENANTS",
    ] {
        assert!(help.contains(env), "{env} missing from:\n{help}");
    }
}

#[test]
fn invalid_configuration_stops_at_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(STREAMER)
        .args(["progress", "--lease-secs", "0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--lease-secs"), "{stderr}");
    let output = std::process::Command::new(STREAMER)
        .args([
            "auth",
            "--auth-keys",
            "/no/such/key.pem",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("/no/such/key.pem"), "{stderr}");

    // A gRPC port open beyond loopback with nobody checking callers is
    // refused unless asked for; so is a token mode without its secret.
    for (args, expected) in [
        (&["connection", "--listen", "0.0.0.0:0"][..], "--trust"),
        (
            &["connection", "--listen", "127.0.0.1:0", "--trust", "token"][..],
            "--service-secret-file",
        ),
    ] {
        let output = std::process::Command::new(STREAMER)
            .args(args)
            .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Starts `streamer` with `args` and `env`, and waits for a log line that
/// contains `line`; then stops it.
async fn starts_and_logs(args: &[&str], env: &[(&str, &str)], line: &str) {
    let mut child = Command::new(STREAMER)
        .args(args)
        .envs(env.iter().copied())
        .env("STREAMER_LOG_FORMAT", "plain")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = within(&format!("`{}` to log {line:?}", args.join(" ")), async {
        loop {
            let next = tokio::select! {
                l = out.next_line() => l,
                l = err.next_line() => l,
            };
            match next.unwrap() {
                Some(l) if l.contains(line) => return true,
                Some(l) => seen.push(l),
                None => return false,
            }
        }
    })
    .await;
    assert!(
        found,
        "{args:?} ended without {line:?}:\n{}",
        seen.join("\n")
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn the_api_gateway_mode_starts_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    // No instance metadata to ask on this machine: the region and the
    // credentials come from the environment only.
    let aws = [
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_ACCESS_KEY_ID", "local"),
        ("AWS_SECRET_ACCESS_KEY", "local"),
    ];
    let connection = [
        "connection",
        "--apigateway",
        "--listen",
        "127.0.0.1:0",
        "--edge-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ];
    let with_region: Vec<(&str, &str)> = aws
        .iter()
        .copied()
        .chain([("AWS_REGION", "eu-west-1")])
        .collect();
    starts_and_logs(&connection, &with_region, "EdgeService").await;
    let output = std::process::Command::new(STREAMER)
        .args(connection)
        .envs(aws)
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("AWS_REGION"), "{stderr}");

    let secret = dir.path().join("apigateway.secret");
    std::fs::write(&secret, "too short\n").unwrap();
    let gateway = |secret: &std::path::Path| {
        vec![
            "gateway".to_owned(),
            "--apigateway-secret-file".to_owned(),
            secret.to_str().unwrap().to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--metrics-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ]
    };
    let output = std::process::Command::new(STREAMER)
        .args(gateway(&secret))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    std::fs::write(&secret, format!("{}\n", "s".repeat(40))).unwrap();
    let args = gateway(&secret);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    starts_and_logs(&args, &[], "API Gateway integration listening").await;
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, `streamer all` exports its spans
/// there under the service name `streamer`, and SIGTERM flushes what the
/// batch exporter still holds (its interval is set far beyond the test).
#[tokio::test]
async fn streamer_all_exports_traces_to_the_otlp_endpoint_and_flushes_them_at_exit() {
    let receiver = otlp::Receiver::default();
    let collector = format!("http://{}", receiver.serve().await);
    let dir = tempfile::tempdir().unwrap();
    let (mut streamer, banner) = start_all_with(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    )
    .await;
    let ws = banner
        .value("WebSocket")
        .replace("<token>", &demo_token(&banner));
    let ready = format!("http://{}/readyz", ws.split('/').nth(2).unwrap());
    support::eventually("the edge to be ready", || {
        let ready = ready.clone();
        async move { http_get(&ready).await.map(|r| r.0) == Some(200) }
    })
    .await;
    let (mut client, _) = within(
        "the client to connect",
        tokio_tungstenite::connect_async(ws),
    )
    .await
    .unwrap();
    let (trace_id, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let frame = serde_json::json!({
        "action": "no_such_action", "id": "t1",
        "metadata": {"traceparent": format!("00-{trace_id}-{parent}-01")},
    });
    client
        .send(tokio_tungstenite::tungstenite::Message::Text(
            frame.to_string().into(),
        ))
        .await
        .unwrap();
    let answer = within("the answer", client.next()).await.unwrap().unwrap();
    assert!(
        answer.to_text().unwrap().contains("INVALID_ACTION"),
        "{answer}"
    );
    assert!(
        receiver.trace(trace_id).is_empty(),
        "nothing is exported before the batch interval or the exit"
    );

    terminate(&mut streamer).await;

    let trace = otlp::Trace(receiver.trace(trace_id));
    let edge = trace.child(parent, "edge.request");
    assert_eq!(edge.service, "streamer");
    assert_eq!(edge.attributes["request_id"], "t1");
    let route = trace.child(&edge.span_id, "connection.route");
    assert_eq!(route.attributes["tenant_id"], "demo-tenant");
}
