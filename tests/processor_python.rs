//! The Python example processor (`examples/processor-python/`), run as its
//! own process against a whole system: what another team builds from our
//! protos alone must get a client its acknowledgment, progress and exactly
//! one outcome — through a processor crash, a client reconnect, another
//! user's prying and a cancellation.
//!
//! Needs `python3` with `examples/processor-python/requirements.txt`
//! installed (CI installs it before the tests). A missing install fails the
//! test with that hint; it is never skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{ExitStatus, Stdio};

use serde_json::{Value, json};
use streamer_api::v1;
use support::{TestSystem, WsClient, within};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/processor-python/processor.py"
);

/// Seconds per page: short enough for quick tests, long enough that a
/// multi-page report is still running when a test acts on it mid-run.
const STEP_DELAY: &str = "0.2";

/// The example processor as a child process.
struct PythonProcessor {
    name: String,
    child: Child,
    /// Its stderr, one log line at a time.
    log: mpsc::UnboundedReceiver<String>,
    /// Held so the pipe stays open for the processor's lifetime.
    _stdout: Lines<BufReader<ChildStdout>>,
}

impl PythonProcessor {
    /// Starts a processor named `name` (its `--id`) and returns once it
    /// printed `ready`: its Claim stream is open, so `generate_report` is a
    /// known action. The lease is left at its default (30 s, longer than
    /// any wait here) on purpose.
    async fn start(system: &TestSystem, name: &str) -> Self {
        Self::start_with_token(system, name, None).await
    }

    /// [`Self::start`], presenting a service token on every call.
    async fn start_with_token(system: &TestSystem, name: &str, token: Option<&str>) -> Self {
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .args(["--target", &system.addrs.progress.to_string()])
            .args(["--id", name, "--step-delay", STEP_DELAY])
            .env("STREAMER_SERVICE_TOKEN", token.unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 should be on PATH");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::unbounded_channel();
        let tag = name.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // Shown with the test's output when it fails.
                eprintln!("[{tag}] {line}");
                let _ = tx.send(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = within("the Python processor's ready line", stdout.next_line())
            .await
            .unwrap();
        assert_eq!(
            ready.as_deref(),
            Some("ready"),
            "{name} exited before it was ready; is \
             `pip install -r examples/processor-python/requirements.txt` done? \
             (its log is above)"
        );
        Self {
            name: name.to_owned(),
            child,
            log,
            _stdout: stdout,
        }
    }

    /// The first log line from now on that contains every one of `parts`.
    async fn wait_for_log(&mut self, parts: &[&str]) -> String {
        let what = format!("{} to log {parts:?}", self.name);
        within(&what, async {
            loop {
                let line = self.log.recv().await.expect("the processor's log ended");
                if parts.iter().all(|p| line.contains(p)) {
                    return line;
                }
            }
        })
        .await
    }

    /// Sends SIGKILL (no chance to say goodbye) and reaps the process.
    async fn kill(mut self) {
        self.child.start_kill().unwrap();
        within("the killed processor to exit", self.child.wait())
            .await
            .unwrap();
    }

    /// Sends SIGTERM and waits for the process to exit by itself.
    async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        within("the processor to exit on SIGTERM", self.child.wait())
            .await
            .unwrap()
    }
}

/// Sends `generate_report` with `payload` and returns the server id from
/// its acknowledgment.
async fn submit(client: &mut WsClient, id: &str, payload: Value) -> String {
    client
        .send_json(json!({"action": "generate_report", "id": id, "payload": payload}))
        .await;
    let ack = client.recv_json().await;
    assert_eq!(ack["type"], "acknowledgment", "{ack}");
    assert_eq!(ack["request_id"], id, "{ack}");
    assert_eq!(ack["status"], "queued", "{ack}");
    assert_eq!(ack["sequence"], 0, "{ack}");
    ack["id"].as_str().expect("a server id").to_owned()
}

/// Reads `request_id`'s messages after its acknowledgment up to its final
/// one, checking that nothing else arrives and that sequences strictly
/// increase. Returns the final message and the progress before it.
async fn follow(client: &mut WsClient, request_id: &str) -> (Value, Vec<Value>) {
    let mut progress = Vec::new();
    let mut last_sequence = 0;
    loop {
        let message = client.recv_json().await;
        assert_eq!(message["request_id"], request_id, "{message}");
        let sequence = message["sequence"].as_u64().expect("a sequence");
        assert!(
            sequence > last_sequence,
            "sequence went backwards: {message}"
        );
        last_sequence = sequence;
        match message["type"].as_str().unwrap() {
            "progress" => progress.push(message),
            "complete" | "error" => return (message, progress),
            other => panic!("unexpected {other}: {message}"),
        }
    }
}

/// Waits for `request_id`'s first progress message (it is running).
async fn first_progress(client: &mut WsClient, request_id: &str) -> Value {
    let message = client.recv_json().await;
    assert_eq!(message["type"], "progress", "{message}");
    assert_eq!(message["request_id"], request_id, "{message}");
    message
}

/// Asks `get_request` for `request_id` and expects its answer to be the
/// very next message: proof that nothing else (a second outcome, a late
/// progress) was on its way to this connection.
async fn probe(client: &mut WsClient, request_id: &str) -> Value {
    client
        .send_json(
            json!({"action": "get_request", "id": "probe", "payload": {"request_id": request_id}}),
        )
        .await;
    let answer = client.recv_json().await;
    assert_eq!(answer["type"], "response", "{answer}");
    assert_eq!(answer["request_id"], "probe", "{answer}");
    assert_eq!(answer["success"], true, "{answer}");
    answer["data"].clone()
}

fn report_result(server_id: &str, pages: u64) -> Value {
    json!({"report_url": format!("https://reports.example/{server_id}.pdf"), "pages": pages})
}

async fn get(system: &TestSystem, server_id: &str, owner: Option<(&str, &str)>) -> v1::Request {
    try_get(system, server_id, owner).await.unwrap()
}

async fn try_get(
    system: &TestSystem,
    server_id: &str,
    owner: Option<(&str, &str)>,
) -> Result<v1::Request, tonic::Status> {
    system
        .progress()
        .await
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Id(server_id.to_owned())),
            owner: owner.map(|(user, tenant)| v1::Identity {
                user_id: user.into(),
                tenant_id: tenant.into(),
                permissions: vec![],
                topics: vec![],
            }),
            deliver_to_connection_id: String::new(),
        })
        .await
        .map(|answer| answer.into_inner().request.unwrap_or_default())
}

#[tokio::test]
async fn a_report_flows_through_the_python_processor_ack_progress_one_complete() {
    let system = TestSystem::start().await;
    let _processor = PythonProcessor::start(&system, "py-flow").await;
    let (mut client, _) = system.connect_found("alice", "acme").await;

    let server_id = submit(&mut client, "r1", json!({"pages": 3})).await;
    let (complete, progress) = follow(&mut client, "r1").await;
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["result"], report_result(&server_id, 3));
    assert!(complete["timestamp"].is_string(), "{complete}");
    assert!(!progress.is_empty(), "at least one progress message");
    let mut last_percentage = 0.0;
    for p in &progress {
        let percentage = p["percentage"].as_f64().unwrap();
        assert!(
            (last_percentage..=100.0).contains(&percentage),
            "percentages only grow, up to 100: {progress:?}"
        );
        last_percentage = percentage;
        assert!(p["message"].as_str().unwrap().starts_with("page "), "{p}");
    }

    // Nothing follows the outcome: the next message belongs to the next
    // request. That one's payload is invalid, which fails it for good.
    let bad_id = submit(&mut client, "r2", json!({"pages": 0})).await;
    let (error, progress) = follow(&mut client, "r2").await;
    assert!(progress.is_empty(), "{progress:?}");
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["code"], "PROCESSING_FAILED", "{error}");
    assert_eq!(
        error["error"]["details"]["code"], "INVALID_PAYLOAD",
        "{error}"
    );
    let stored = get(&system, &bad_id, None).await;
    assert_eq!(stored.status, v1::RequestStatus::Failed as i32);
    assert_eq!(stored.attempts, 1, "an invalid payload is not retried");
    assert_eq!(stored.error.unwrap().code, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn the_python_processor_presents_its_service_token_where_callers_are_checked() {
    let tokens = streamer_core::trust::ServiceTokens::from_secret(&[42u8; 32]).unwrap();
    let token = tokens
        .mint(
            "reports",
            &[streamer_core::trust::Role::Processor],
            None,
            std::time::Duration::from_secs(600),
        )
        .unwrap();
    let system = TestSystem::start_with(|config| {
        config.trust = streamer_core::trust::Trust::token(tokens);
    })
    .await;
    let _processor = PythonProcessor::start_with_token(&system, "py-token", Some(&token)).await;
    let mut client = system.connect("alice", "acme").await;
    let server_id = submit(&mut client, "r1", json!({"pages": 2})).await;
    let (complete, _) = follow(&mut client, "r1").await;
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["result"], report_result(&server_id, 2));
}

#[tokio::test]
async fn a_killed_python_processor_s_request_is_finished_by_the_next_one() {
    // The lease stays at 30 s, longer than any wait below: the work comes
    // back because the dead processor's Claim stream ended, not because
    // its lease lapsed.
    let system = TestSystem::start().await;
    let first = PythonProcessor::start(&system, "py-doomed").await;
    let (mut client, _) = system.connect_found("alice", "acme").await;

    let server_id = submit(&mut client, "r-crash", json!({"pages": 20})).await;
    first_progress(&mut client, "r-crash").await;
    first.kill().await;

    let mut second = PythonProcessor::start(&system, "py-heir").await;
    second
        .wait_for_log(&["job started", &server_id, "attempt=2"])
        .await;
    let (outcome, _) = follow(&mut client, "r-crash").await;
    assert_eq!(outcome["type"], "complete", "{outcome}");
    assert_eq!(outcome["result"], report_result(&server_id, 20));

    // Exactly one outcome: the next message is the probe's answer.
    let state = probe(&mut client, "r-crash").await;
    assert_eq!(state["status"], "completed", "{state}");
    let stored = get(&system, &server_id, None).await;
    assert_eq!(stored.status, v1::RequestStatus::Completed as i32);
    assert_eq!(stored.attempts, 2, "one attempt each");
}

#[tokio::test]
async fn a_client_that_reconnects_gets_the_state_and_then_the_outcome() {
    let system = TestSystem::start().await;
    let _processor = PythonProcessor::start(&system, "py-resume").await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    let server_id = submit(&mut client, "r-resume", json!({"pages": 10})).await;
    first_progress(&mut client, "r-resume").await;
    client.close().await;

    // A new connection of the same user asks where its request is. The
    // answer and the request's later updates race to the socket, so their
    // order is not fixed; their content is.
    let mut client = system.connect("alice", "acme").await;
    client
        .send_json(
            json!({"action": "get_request", "id": "q1", "payload": {"request_id": "r-resume"}}),
        )
        .await;
    let mut state = None;
    let mut outcome = None;
    while state.is_none() || outcome.is_none() {
        let message = client.recv_json().await;
        match (message["type"].as_str(), message["request_id"].as_str()) {
            (Some("response"), Some("q1")) if state.is_none() => {
                assert_eq!(message["success"], true, "{message}");
                state = Some(message["data"].clone());
            }
            (Some("progress"), Some("r-resume")) if outcome.is_none() => {}
            (Some("complete"), Some("r-resume")) if outcome.is_none() => outcome = Some(message),
            _ => panic!("unexpected message: {message}"),
        }
    }
    let state = state.unwrap();
    assert_eq!(state["id"], server_id.as_str(), "{state}");
    assert_eq!(state["request_id"], "r-resume", "{state}");
    assert!(
        ["processing", "completed"].contains(&state["status"].as_str().unwrap()),
        "{state}"
    );
    assert_eq!(outcome.unwrap()["result"], report_result(&server_id, 10));
    assert_eq!(probe(&mut client, "r-resume").await["status"], "completed");
    client.close().await;

    // Reconnecting after it finished: the state, and the outcome sent
    // again to the new connection, once.
    let mut client = system.connect("alice", "acme").await;
    client
        .send_json(
            json!({"action": "get_request", "id": "q2", "payload": {"request_id": "r-resume"}}),
        )
        .await;
    let mut messages = [client.recv_json().await, client.recv_json().await];
    messages.sort_by_key(|m| m["type"].as_str().unwrap_or_default().to_owned());
    let [complete, response] = messages;
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["request_id"], "r-resume", "{complete}");
    assert_eq!(complete["result"], report_result(&server_id, 10));
    assert_eq!(response["type"], "response", "{response}");
    assert_eq!(response["request_id"], "q2", "{response}");
    assert_eq!(response["data"]["status"], "completed", "{response}");
    assert_eq!(response["data"]["result"], report_result(&server_id, 10));
    // The same connection asking again is not sent the outcome twice.
    assert_eq!(probe(&mut client, "r-resume").await["status"], "completed");
}

#[tokio::test]
async fn another_user_is_told_a_python_processed_request_does_not_exist() {
    let system = TestSystem::start().await;
    let _processor = PythonProcessor::start(&system, "py-private").await;
    let (mut alice, _) = system.connect_found("alice", "acme").await;
    let server_id = submit(&mut alice, "r-private", json!({"pages": 2})).await;
    let (outcome, _) = follow(&mut alice, "r-private").await;
    assert_eq!(outcome["type"], "complete", "{outcome}");

    for (user, tenant) in [("mallory", "acme"), ("alice", "globex")] {
        let (mut other, _) = system.connect_found(user, tenant).await;
        other
            .send_json(json!({"action": "get_request", "id": "peek", "payload": {"request_id": "r-private"}}))
            .await;
        let answer = other.recv_json().await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["request_id"], "peek", "{answer}");
        assert_eq!(answer["error"]["code"], "NOT_FOUND", "{answer}");
        let status = try_get(&system, &server_id, Some((user, tenant)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{user}@{tenant}");
    }
    // Its owner still finds it, finished.
    let stored = get(&system, &server_id, Some(("alice", "acme"))).await;
    assert_eq!(stored.status, v1::RequestStatus::Completed as i32);
    assert_eq!(probe(&mut alice, "r-private").await["status"], "completed");
}

#[tokio::test]
async fn cancel_request_stops_the_python_processor_mid_run() {
    let system = TestSystem::start().await;
    let mut processor = PythonProcessor::start(&system, "py-cancel").await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    let server_id = submit(&mut client, "r-cancel", json!({"pages": 100})).await;
    first_progress(&mut client, "r-cancel").await;

    client
        .send_json(
            json!({"action": "cancel_request", "id": "c1", "payload": {"request_id": "r-cancel"}}),
        )
        .await;
    // The answer to cancel_request and the request's outcome race to the
    // socket; progress may come before the outcome, nothing after it.
    let mut answer = None;
    let mut outcome = None;
    while answer.is_none() || outcome.is_none() {
        let message = client.recv_json().await;
        match (message["type"].as_str(), message["request_id"].as_str()) {
            (Some("response"), Some("c1")) if answer.is_none() => answer = Some(message),
            (Some("progress"), Some("r-cancel")) if outcome.is_none() => {}
            (Some("error"), Some("r-cancel")) if outcome.is_none() => outcome = Some(message),
            _ => panic!("unexpected message: {message}"),
        }
    }
    let (answer, outcome) = (answer.unwrap(), outcome.unwrap());
    assert_eq!(answer["data"]["status"], "cancelled", "{answer}");
    assert_eq!(
        outcome["error"]["details"]["status"], "cancelled",
        "{outcome}"
    );

    // The processor heard it and stopped the job, short of its last page.
    let stopped = processor
        .wait_for_log(&["job stopped", "reason=cancelled", &server_id])
        .await;
    assert!(!stopped.contains("pages_done=100"), "{stopped}");
    let stored = get(&system, &server_id, None).await;
    assert_eq!(stored.status, v1::RequestStatus::Cancelled as i32);
    assert_eq!(stored.error.unwrap().code, "CANCELLED");
    // No outcome after the cancellation, and none will come: the job is over.
    assert_eq!(probe(&mut client, "r-cancel").await["status"], "cancelled");
}

#[tokio::test]
async fn sigterm_stops_the_python_processor_cleanly_and_its_work_moves_on() {
    let system = TestSystem::start().await;
    let mut first = PythonProcessor::start(&system, "py-leaving").await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    let server_id = submit(&mut client, "r-term", json!({"pages": 20})).await;
    first_progress(&mut client, "r-term").await;

    first
        .wait_for_log(&["job started", &server_id, "attempt=1"])
        .await;
    let status = first.terminate().await;
    assert!(status.success(), "exit status on SIGTERM: {status}");

    // Its Claim stream closed, so the request is queued again at once.
    let mut second = PythonProcessor::start(&system, "py-arriving").await;
    second
        .wait_for_log(&["job started", &server_id, "attempt=2"])
        .await;
    let (outcome, _) = follow(&mut client, "r-term").await;
    assert_eq!(outcome["type"], "complete", "{outcome}");
    assert_eq!(get(&system, &server_id, None).await.attempts, 2);
}
