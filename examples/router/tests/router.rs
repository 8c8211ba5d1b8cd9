//! The example router, run as its own process against a whole system, as
//! the README's walkthrough runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/support/mod.rs"]
mod support;

mod process;

use std::time::Duration;

use serde_json::json;
use support::{TestSystem, within};
use tokio::process::Command;

#[tokio::test]
async fn the_example_router_answers_echo_and_health() {
    let system = TestSystem::start().await;
    let (_router, _lines) = process::start_router(&system).await;

    let (mut client, _) = system.connect_found("alice", "acme").await;
    client
        .send_json(json!({"action": "echo", "id": "1", "payload": {"hi": [1, 2]}}))
        .await;
    assert_eq!(
        client.recv_json().await,
        json!({"type": "response", "request_id": "1", "success": true, "data": {"hi": [1, 2]}})
    );
    client
        .send_json(json!({"action": "health", "id": "2"}))
        .await;
    let health = client.recv_json().await;
    assert_eq!(health["request_id"], "2");
    assert_eq!(health["data"]["status"], "ok");
    assert_eq!(health["data"]["user_id"], "alice");
}

/// Ctrl-C ends the router while it is connected and serving, not only
/// while it waits to reconnect.
#[tokio::test]
async fn the_example_router_exits_on_sigint_while_connected() {
    let system = TestSystem::start().await;
    let (mut router, _lines) = process::start_router(&system).await;
    // Connected and answering.
    let (mut client, _) = system.connect_found("alice", "acme").await;
    client
        .send_json(json!({"action": "echo", "id": "1", "payload": 1}))
        .await;
    assert_eq!(client.recv_json().await["data"], 1);

    let pid = router.id().unwrap().to_string();
    let sent = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    let status = within("the router to exit on SIGINT", router.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    // And it is gone: the frame finds no router now.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            client
                .send_json(json!({"action": "echo", "id": "2", "payload": 2}))
                .await;
            let answer = client.recv_json().await;
            if answer["type"] == "error" {
                assert_eq!(answer["error"]["code"], "INVALID_ACTION", "{answer}");
                return;
            }
        }
    })
    .await
    .expect("the router's action is unanswered once it exited");
}
