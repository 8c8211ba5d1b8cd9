//! Issue: requests, routers and processors end to end — routing of client
//! frames, the async request lifecycle with reliable progress, persistence
//! across a restart, and isolation between users. Processors and routers
//! here are real gRPC clients built from the generated code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;

use serde_json::{Value, json};
use streamer_api::v1::{self, claim_response::Item};
use support::{TestSystem, WsClient, within};
use tokio_stream::StreamExt;

/// A processor that runs every request it is given: `steps` progress
/// reports, then Complete with `{"done": <payload>}`.
/// Returns once its Claim stream is open, so its actions are declared.
async fn spawn_processor(
    system: &TestSystem,
    id: &str,
    actions: &[&str],
    steps: u32,
    max_in_flight: u32,
) -> tokio::task::JoinHandle<()> {
    let id = id.to_owned();
    let actions: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
    let client = system.progress().await;
    let mut work = support::claim(
        &mut client.clone(),
        v1::ClaimRequest {
            processor_id: id.clone(),
            actions,
            max_in_flight,
            lease_seconds: 30,
        },
    )
    .await;
    tokio::spawn(async move {
        while let Some(Ok(item)) = work.next().await {
            let Some(Item::Work(request)) = item.item else {
                continue;
            };
            let mut client = client.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let reports = (1..=steps).map({
                    let id = id.clone();
                    let request_id = request.id.clone();
                    move |step| v1::ReportRequest {
                        id: request_id.clone(),
                        processor_id: id.clone(),
                        percentage: f64::from(step) * 100.0 / f64::from(steps),
                        message: format!("step {step} of {steps}"),
                        metadata: None,
                    }
                });
                client.report(tokio_stream::iter(reports)).await.unwrap();
                client
                    .complete(v1::CompleteRequest {
                        id: request.id.clone(),
                        processor_id: id,
                        result: Some(streamer_api::json::to_proto(json!({
                            "done": request.payload.map(streamer_api::json::from_proto),
                        }))),
                    })
                    .await
                    .unwrap();
            });
        }
    })
}

/// Reads messages until `request_id`'s final message, checking the order:
/// acknowledgment first, progress with increasing sequence, one final.
async fn follow_request(client: &mut WsClient, request_id: &str) -> (Value, Vec<Value>) {
    let ack = client.recv_json().await;
    assert_eq!(ack["type"], "acknowledgment", "{ack}");
    assert_eq!(ack["request_id"], request_id);
    assert_eq!(ack["status"], "queued");
    let mut progress = Vec::new();
    let mut last_sequence = 0;
    loop {
        let message = client.recv_json().await;
        assert_eq!(message["request_id"], request_id, "{message}");
        let sequence = message["sequence"].as_u64().unwrap();
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

#[tokio::test]
async fn a_routed_action_is_answered_by_its_router_and_routers_share_the_load() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let mut routers = Vec::new();
    for name in ["router-a", "router-b"] {
        routers.push(
            support::receive(
                &mut connections,
                v1::ReceiveRequest {
                    actions: vec!["echo".into()],
                    router_id: name.into(),
                },
            )
            .await,
        );
    }
    let (mut client, _) = system.connect_found("alice", "acme").await;
    let [mut router_a, mut router_b] = <[_; 2]>::try_from(routers).unwrap();
    let mut seen_by = [0u32; 2];
    for i in 0..10 {
        client
            .send_json(json!({"action": "echo", "id": format!("e{i}"), "payload": {"i": i}, "metadata": {"user_id": "mallory"}}))
            .await;
        // Whichever router got it answers it.
        let (index, frame) = within("a routed frame", async {
            tokio::select! {
                Some(Ok(f)) = router_a.next() => (0, f),
                Some(Ok(f)) = router_b.next() => (1, f),
            }
        })
        .await;
        seen_by[index] += 1;
        let identity = frame.identity.unwrap();
        assert_eq!(identity.user_id, "alice", "identity comes from the token");
        assert_eq!(identity.tenant_id, "acme");
        assert_eq!(frame.request_id, format!("e{i}"));
        connections
            .send(v1::SendRequest {
                connection_id: frame.connection_id,
                payload: support::json_payload(json!({
                    "type": "response",
                    "request_id": frame.request_id,
                    "success": true,
                    "data": frame.payload.map(streamer_api::json::from_proto),
                })),
                tenant_id: String::new(),
                sequence: None,
            })
            .await
            .unwrap();
        let response = client.recv_json().await;
        assert_eq!(response["type"], "response");
        assert_eq!(response["request_id"], format!("e{i}"));
        assert_eq!(response["data"], json!({"i": i}));
    }
    assert!(
        seen_by.iter().all(|n| *n > 0),
        "both routers got frames: {seen_by:?}"
    );

    // Built-in actions cannot be claimed by a router.
    let status = connections
        .receive(v1::ReceiveRequest {
            actions: vec!["get_request".into()],
            router_id: "greedy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn two_hundred_concurrent_requests_each_end_with_one_complete_after_their_progress() {
    let system = TestSystem::start_with(|config| {
        config.progress.async_actions = vec!["generate_report".into()];
    })
    .await;
    let mut processors = Vec::new();
    for i in 0..2 {
        processors
            .push(spawn_processor(&system, &format!("p{i}"), &["generate_report"], 5, 100).await);
    }

    const CLIENTS: usize = 50;
    const PER_CLIENT: usize = 4;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = system.connect(&format!("user-{c}"), "acme").await;
        tasks.push(tokio::spawn(async move {
            for r in 0..PER_CLIENT {
                client
                    .send_json(json!({"action": "generate_report", "id": format!("c{c}-r{r}"), "payload": {"n": r}}))
                    .await;
            }
            // Messages of this client's requests interleave; check each
            // request's own order.
            let mut state: HashMap<String, (u64, bool, usize)> = HashMap::new();
            let mut finished = 0;
            while finished < PER_CLIENT {
                let message = client.recv_json().await;
                let id = message["request_id"].as_str().unwrap().to_owned();
                let entry = state.entry(id.clone()).or_insert((0, false, 0));
                assert!(!entry.1, "a message after the final one: {message}");
                match message["type"].as_str().unwrap() {
                    "acknowledgment" => assert_eq!(entry.0, 0, "ack first"),
                    "progress" => {
                        let seq = message["sequence"].as_u64().unwrap();
                        assert!(seq > entry.0, "progress out of order: {message}");
                        entry.0 = seq;
                        entry.2 += 1;
                    }
                    "complete" => {
                        let seq = message["sequence"].as_u64().unwrap();
                        assert!(seq > entry.0, "complete before a progress: {message}");
                        let r: usize = id.rsplit('r').next().unwrap().parse().unwrap();
                        assert_eq!(message["result"], json!({"done": {"n": r}}));
                        entry.1 = true;
                        finished += 1;
                    }
                    other => panic!("unexpected {other}: {message}"),
                }
            }
            // Nothing follows a final message: the next thing this client
            // receives is the answer to a fresh question.
            client
                .send_json(json!({"action": "get_request", "id": "probe", "payload": {"request_id": format!("c{c}-r0")}}))
                .await;
            let next = client.recv_json().await;
            assert_eq!(next["type"], "response", "{next}");
            assert_eq!(next["data"]["status"], "completed");
            state.values().map(|s| s.2).sum::<usize>()
        }));
    }
    let mut progress_seen = 0;
    for task in tasks {
        progress_seen += within("a client's requests", task).await.unwrap();
    }
    assert!(progress_seen > 0, "clients saw progress");
    for p in processors {
        p.abort();
    }
}

#[tokio::test]
async fn nothing_is_lost_when_streamer_restarts_between_submit_and_complete() {
    let async_actions = |config: &mut streamer::SystemConfig| {
        config.progress.async_actions = vec!["generate_report".into()];
    };
    let system = TestSystem::start_with(async_actions).await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    client
        .send_json(json!({"action": "generate_report", "id": "durable-1", "payload": {"pages": 2}}))
        .await;
    let ack = client.recv_json().await;
    assert_eq!(ack["type"], "acknowledgment");
    let server_id = ack["id"].as_str().unwrap().to_owned();
    let dir = system.stop().await;
    drop(client);

    let system = TestSystem::start_in(dir, async_actions).await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    client
        .send_json(
            json!({"action": "get_request", "id": "q1", "payload": {"request_id": "durable-1"}}),
        )
        .await;
    let state = client.recv_json().await;
    assert_eq!(state["type"], "response", "{state}");
    assert_eq!(state["data"]["id"], server_id.as_str());
    assert_eq!(state["data"]["status"], "pending");

    // A processor that arrives after the restart runs it, and the updates
    // reach the client's new connection.
    let _processor = spawn_processor(&system, "late", &["generate_report"], 2, 1).await;
    let mut last = Value::Null;
    for _ in 0..10 {
        last = client.recv_json().await;
        if last["type"] == "complete" {
            break;
        }
        assert_eq!(last["type"], "progress", "{last}");
    }
    assert_eq!(last["type"], "complete", "{last}");
    assert_eq!(last["result"], json!({"done": {"pages": 2}}));
    let stored = system
        .progress()
        .await
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Id(server_id)),
            owner: None,
            deliver_to_connection_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(stored.status, v1::RequestStatus::Completed as i32);
    assert_eq!(stored.attempts, 1);
}

#[tokio::test]
async fn a_request_is_invisible_to_every_other_user() {
    let system = TestSystem::start_with(|config| {
        config.progress.async_actions = vec!["generate_report".into()];
    })
    .await;
    let (mut alice, _) = system.connect_found("alice", "acme").await;
    alice
        .send_json(json!({"action": "generate_report", "id": "secret", "payload": {}}))
        .await;
    let server_id = alice.recv_json().await["id"].as_str().unwrap().to_owned();

    for (user, tenant) in [("mallory", "acme"), ("alice", "globex")] {
        let (mut other, _) = system.connect_found(user, tenant).await;
        for action in ["get_request", "cancel_request"] {
            other
                .send_json(
                    json!({"action": action, "id": "x", "payload": {"request_id": "secret"}}),
                )
                .await;
            let answer = other.recv_json().await;
            assert_eq!(answer["type"], "error", "{answer}");
            assert_eq!(answer["error"]["code"], "NOT_FOUND", "{answer}");
        }
        let status = system
            .progress()
            .await
            .get(v1::GetRequest {
                selector: Some(v1::get_request::Selector::Id(server_id.clone())),
                owner: Some(v1::Identity {
                    user_id: user.into(),
                    tenant_id: tenant.into(),
                    permissions: vec![],
                    topics: vec![],
                }),
                deliver_to_connection_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
    // Alice still sees it, unchanged.
    alice
        .send_json(
            json!({"action": "get_request", "id": "mine", "payload": {"request_id": "secret"}}),
        )
        .await;
    let state = alice.recv_json().await;
    assert_eq!(state["data"]["status"], "pending", "{state}");
}

#[tokio::test]
async fn a_repeated_request_id_is_one_request() {
    let system = TestSystem::start_with(|config| {
        config.progress.async_actions = vec!["generate_report".into()];
    })
    .await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    for _ in 0..2 {
        client
            .send_json(json!({"action": "generate_report", "id": "once", "payload": {}}))
            .await;
    }
    // Frames of one connection are handled in order, so this answer comes
    // after both submits were.
    client
        .send_json(json!({"action": "get_request", "id": "q1", "payload": {"request_id": "once"}}))
        .await;
    let mut seen = Vec::new();
    while !(seen
        .iter()
        .any(|m: &serde_json::Value| m["type"] == "acknowledgment")
        && seen.iter().any(|m| m["type"] == "response"))
    {
        seen.push(client.recv_json().await);
    }
    let acks: Vec<_> = seen
        .iter()
        .filter(|m| m["type"] == "acknowledgment")
        .collect();
    assert_eq!(
        acks.len(),
        1,
        "one acknowledgment, not one per submit: {seen:?}"
    );
    let state = seen.iter().find(|m| m["type"] == "response").unwrap();
    assert_eq!(
        state["data"]["id"], acks[0]["id"],
        "the same request: {state}"
    );

    // A processor receives it once.
    let mut progress = system.progress().await;
    let mut work = support::claim(
        &mut progress,
        support::claim_request("solo", "generate_report", 10, 30),
    )
    .await;
    let mut next_work = async || {
        let item = within("work", work.next()).await.unwrap().unwrap();
        let Some(Item::Work(request)) = item.item else {
            panic!("expected work");
        };
        request
    };
    let request = next_work().await;
    assert_eq!(request.request_id, "once");
    assert_eq!(request.identity.unwrap().user_id, "alice");
    // Work is handed out oldest first: a second copy would come before this.
    client
        .send_json(json!({"action": "generate_report", "id": "fence", "payload": {}}))
        .await;
    assert_eq!(
        next_work().await.request_id,
        "fence",
        "no second copy of the request is handed out"
    );
}

#[tokio::test]
async fn request_actions_validate_their_payload() {
    let system = TestSystem::start().await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    client
        .send_json(json!({"action": "get_request", "id": "g"}))
        .await;
    let answer = client.recv_json().await;
    assert_eq!(answer["error"]["code"], "VALIDATION_ERROR", "{answer}");
    client
        .send_json(json!({"action": "get_request", "id": "g2", "payload": {"request_id": "never-submitted"}}))
        .await;
    let answer = client.recv_json().await;
    assert_eq!(answer["error"]["code"], "NOT_FOUND", "{answer}");
    // An action no router or processor declared.
    client
        .send_json(json!({"action": "generate_report", "id": "g3"}))
        .await;
    let answer = client.recv_json().await;
    assert_eq!(answer["request_id"], "g3");
    assert_eq!(answer["error"]["code"], "INVALID_ACTION", "{answer}");
}

#[tokio::test]
async fn a_single_request_flows_ack_progress_complete() {
    let system = TestSystem::start().await;
    let _processor = spawn_processor(&system, "p", &["generate_report"], 3, 1).await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    client
        .send_json(json!({"action": "generate_report", "id": "r1", "payload": {"pages": 3}}))
        .await;
    let (complete, progress) = follow_request(&mut client, "r1").await;
    assert_eq!(complete["type"], "complete");
    assert_eq!(complete["result"], json!({"done": {"pages": 3}}));
    assert!(complete["timestamp"].is_string());
    assert!(!progress.is_empty(), "at least one progress message");
    for p in &progress {
        assert!(p["percentage"].as_f64().unwrap() <= 100.0);
        assert!(p["message"].as_str().unwrap().starts_with("step"));
    }
}
