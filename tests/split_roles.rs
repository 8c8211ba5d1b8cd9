//! The roles as separate servers (as in a deployment), each on its own
//! listener and store:
//! - ConnectionService restarts while a request runs, and nothing the
//!   client was owed is lost: its connection is restored by the edge's
//!   re-attach, and the request's final message still arrives;
//! - the edge is slow to report deliveries (a proxy holds what it says to
//!   ConnectionService), so deliveries time out and are retried while the
//!   edge has in fact written them: the client still gets each message
//!   exactly once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use serde_json::json;
use streamer_api::v1::{self, claim_response::Item};
use streamer_core::shutdown::Shutdown;
use support::proxy::HoldingProxy;
use support::{WsClient, eventually, http_get, within};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn start_connection(
    listener: TcpListener,
    dir: &std::path::Path,
    progress: SocketAddr,
) -> (Shutdown, tokio::task::JoinHandle<anyhow::Result<()>>) {
    start_connection_with(listener, dir, progress, Default::default()).await
}

async fn start_connection_with(
    listener: TcpListener,
    dir: &std::path::Path,
    progress: SocketAddr,
    config: streamer_connection::ConnectionConfig,
) -> (Shutdown, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let shutdown = Shutdown::new();
    let store = streamer::open_embedded_store(dir).unwrap();
    let config = streamer_connection::ConnectionConfig {
        progress_endpoint: Some(format!("http://{progress}")),
        ..config
    };
    let task = tokio::spawn(streamer::run_connection(
        listener,
        store,
        config,
        shutdown.clone(),
    ));
    (shutdown, task)
}

#[tokio::test]
async fn a_connection_service_restart_loses_neither_the_socket_nor_the_final_message() {
    streamer_core::telemetry::init_logs(streamer_core::telemetry::LogFormat::Plain, "warn");
    let data = tempfile::tempdir().unwrap();
    let key = streamer_auth::dev::ensure_dev_key(data.path()).unwrap();
    let (auth_l, conn_l, progress_l, gateway_l) = (
        listener().await,
        listener().await,
        listener().await,
        listener().await,
    );
    let (auth, conn, progress, gateway) = (
        auth_l.local_addr().unwrap(),
        conn_l.local_addr().unwrap(),
        progress_l.local_addr().unwrap(),
        gateway_l.local_addr().unwrap(),
    );
    let others = Shutdown::new();
    tokio::spawn(streamer::run_auth(
        auth_l,
        streamer_auth::AuthConfig::new([streamer_auth::dev::public_key_path(data.path())]),
        Default::default(),
        others.clone(),
    ));
    let progress_store = streamer::open_embedded_store(&data.path().join("progress")).unwrap();
    tokio::spawn(streamer::run_progress(
        progress_l,
        progress_store,
        streamer_progress::ProgressConfig {
            connection_endpoint: format!("http://{conn}"),
            ..Default::default()
        },
        others.clone(),
    ));
    tokio::spawn(streamer::run_gateway(
        gateway_l,
        streamer_gateway::GatewayConfig {
            auth_endpoint: format!("http://{auth}"),
            connection_endpoint: format!("http://{conn}"),
            ..Default::default()
        },
        others.clone(),
    ));
    let conn_dir = data.path().join("connection");
    let (conn_shutdown, conn_task) = start_connection(conn_l, &conn_dir, progress).await;
    let ready = format!("http://{gateway}/readyz");
    let attached = || {
        let ready = ready.clone();
        async move { http_get(&ready).await.map(|r| r.0) == Some(200) }
    };
    eventually("the edge to attach", attached).await;

    // A processor takes the client's request.
    let mut processor =
        v1::progress_service_client::ProgressServiceClient::connect(format!("http://{progress}"))
            .await
            .unwrap();
    let mut work = processor
        .claim(v1::ClaimRequest {
            processor_id: "p".into(),
            actions: vec!["generate_report".into()],
            max_in_flight: 1,
            lease_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    let token = key
        .mint(&streamer_auth::dev::MintOptions {
            sub: "alice".into(),
            tenant: "acme".into(),
            ..Default::default()
        })
        .unwrap();
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{gateway}/?Authorization={token}"))
            .await
            .unwrap();
    let mut client = WsClient { ws };
    client
        .send_json(json!({"action": "generate_report", "id": "r1", "payload": {}}))
        .await;
    assert_eq!(client.recv_json().await["type"], "acknowledgment");
    let Some(Ok(v1::ClaimResponse {
        item: Some(Item::Work(request)),
    })) = within("work", work.next()).await
    else {
        panic!("expected work");
    };

    // ConnectionService goes away; the edge detaches but keeps the socket.
    conn_shutdown.cancel();
    within("connection service to stop", conn_task)
        .await
        .unwrap()
        .unwrap();
    eventually("the edge to notice", || async { !attached().await }).await;

    // The processor completes while ConnectionService is down...
    processor
        .complete(v1::CompleteRequest {
            id: request.id.clone(),
            processor_id: "p".into(),
            result: Some(streamer_api::json::to_proto(json!({"ok": true}))),
        })
        .await
        .unwrap();

    // The outage lasts a few seconds (this is the scenario's length, not a
    // synchronisation: a short blip would hide a retry budget that is too
    // small, as the first one, 1.5 s, was).
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    // ...and ConnectionService comes back on the same address and store.
    let again = TcpListener::bind(conn).await.unwrap();
    let (conn_shutdown, conn_task) = start_connection(again, &conn_dir, progress).await;
    eventually("the edge to re-attach", attached).await;

    // The final message was not dropped: it reaches the same socket.
    let complete = client.recv_json().await;
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["request_id"], "r1");
    assert_eq!(complete["result"], json!({"ok": true}));

    // The restored record is the live socket: it is listed and reachable.
    let mut connections =
        v1::connection_service_client::ConnectionServiceClient::connect(format!("http://{conn}"))
            .await
            .unwrap();
    let listed = support::user_connection_ids(&mut connections, "acme", "alice").await;
    assert_eq!(listed.len(), 1);
    connections
        .send(v1::SendRequest {
            connection_id: listed[0].clone(),
            payload: support::json_payload(json!({"still": "here"})),
            tenant_id: String::new(),
            sequence: None,
        })
        .await
        .unwrap();
    assert_eq!(client.recv_json().await, json!({"still": "here"}));

    // A socket that closes while the edge is detached is not left behind:
    // the next hello reconciles the records.
    conn_shutdown.cancel();
    within("connection service to stop", conn_task)
        .await
        .unwrap()
        .unwrap();
    client.close().await;
    let again = TcpListener::bind(conn).await.unwrap();
    let (conn_shutdown, conn_task) = start_connection(again, &conn_dir, progress).await;
    eventually("the edge to re-attach", attached).await;
    let mut connections =
        v1::connection_service_client::ConnectionServiceClient::connect(format!("http://{conn}"))
            .await
            .unwrap();
    let listed = support::user_connection_ids(&mut connections, "acme", "alice").await;
    assert!(listed.is_empty(), "{listed:?}");

    conn_shutdown.cancel();
    others.cancel();
    within("connection service to stop", conn_task)
        .await
        .unwrap()
        .unwrap();
}

/// With the edge's reports held: the message being delivered reaches the
/// client (the edge writes it), ConnectionService hears nothing and times
/// out, and the sender retries until a second delivery command has reached
/// the edge. Then a marker is sent down the same ordered stream, behind
/// that retry. Returns everything the client got before the marker.
async fn retried_then_marker(
    proxy: &HoldingProxy,
    client: &mut WsClient,
    connections: &v1::connection_service_client::ConnectionServiceClient<tonic::transport::Channel>,
    connection_id: &str,
    number: u32,
) -> Vec<serde_json::Value> {
    let mut seen = vec![client.recv_json().await];
    let before = proxy.downstream_bytes();
    // More than a PING frame: a whole delivery command.
    eventually("the delivery to be retried", || async {
        proxy.downstream_bytes() > before + 64
    })
    .await;
    let marker = json!({"marker": number});
    let send = v1::SendRequest {
        connection_id: connection_id.to_owned(),
        payload: support::json_payload(marker.clone()),
        tenant_id: String::new(),
        sequence: None,
    };
    // The answer waits on the held reports too: only the marker's arrival
    // matters, so the call runs on its own.
    let mut connections = connections.clone();
    tokio::spawn(async move { connections.send(send).await });
    loop {
        let message = client.recv_json().await;
        if message == marker {
            return seen;
        }
        seen.push(message);
    }
}

#[tokio::test]
async fn a_slow_edge_gets_each_message_to_the_client_exactly_once_in_order() {
    streamer_core::telemetry::init_logs(streamer_core::telemetry::LogFormat::Plain, "error");
    let data = tempfile::tempdir().unwrap();
    let key = streamer_auth::dev::ensure_dev_key(data.path()).unwrap();
    let (auth_l, conn_l, progress_l, gateway_l) = (
        listener().await,
        listener().await,
        listener().await,
        listener().await,
    );
    let (auth, conn, progress, gateway) = (
        auth_l.local_addr().unwrap(),
        conn_l.local_addr().unwrap(),
        progress_l.local_addr().unwrap(),
        gateway_l.local_addr().unwrap(),
    );
    // The edge reaches ConnectionService only through the proxy.
    let proxy = HoldingProxy::start(conn).await;
    let shutdown = Shutdown::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(streamer::run_auth(
        auth_l,
        streamer_auth::AuthConfig::new([streamer_auth::dev::public_key_path(data.path())]),
        Default::default(),
        shutdown.clone(),
    ));
    tokio::spawn(streamer::run_progress(
        progress_l,
        streamer::open_embedded_store(&data.path().join("progress")).unwrap(),
        streamer_progress::ProgressConfig {
            connection_endpoint: format!("http://{conn}"),
            progress_rate: 0.0,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    tokio::spawn(streamer::run_gateway(
        gateway_l,
        streamer_gateway::GatewayConfig {
            auth_endpoint: format!("http://{auth}"),
            connection_endpoint: format!("http://{}", proxy.addr),
            ..Default::default()
        },
        shutdown.clone(),
    ));
    let (conn_shutdown, _conn_task) = start_connection_with(
        conn_l,
        &data.path().join("connection"),
        progress,
        streamer_connection::ConnectionConfig {
            // Short, so the held reports are late many times over.
            delivery_timeout: std::time::Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let _stop_connection = conn_shutdown.drop_guard();
    let ready = format!("http://{gateway}/readyz");
    eventually("the edge to attach", || {
        let ready = ready.clone();
        async move { http_get(&ready).await.map(|r| r.0) == Some(200) }
    })
    .await;

    let token = key
        .mint(&streamer_auth::dev::MintOptions {
            sub: "alice".into(),
            tenant: "acme".into(),
            ..Default::default()
        })
        .unwrap();
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{gateway}/?Authorization={token}"))
            .await
            .unwrap();
    let mut client = WsClient { ws };
    let mut connections =
        v1::connection_service_client::ConnectionServiceClient::connect(format!("http://{conn}"))
            .await
            .unwrap();
    let connection_id = support::user_connection_ids(&mut connections, "acme", "alice")
        .await
        .pop()
        .unwrap();
    let mut progress_client =
        v1::progress_service_client::ProgressServiceClient::connect(format!("http://{progress}"))
            .await
            .unwrap();
    let mut work = progress_client
        .claim(v1::ClaimRequest {
            processor_id: "p".into(),
            actions: vec!["generate_report".into()],
            max_in_flight: 1,
            lease_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();

    // 1. The acknowledgment: written once, though sent again and again.
    proxy.hold();
    let submitted = {
        let (mut p, connection_id) = (progress_client.clone(), connection_id.clone());
        tokio::spawn(async move {
            p.submit(v1::SubmitRequest {
                connection_id,
                action: "generate_report".into(),
                request_id: "r1".into(),
                ..Default::default()
            })
            .await
        })
    };
    let seen = retried_then_marker(&proxy, &mut client, &connections, &connection_id, 1).await;
    proxy.release();
    assert_eq!(seen.len(), 1, "one acknowledgment: {seen:?}");
    assert_eq!(seen[0]["type"], "acknowledgment", "{seen:?}");
    let submitted = within("submit", submitted)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(!submitted.duplicate);
    let submitted = submitted.request.unwrap();
    let Some(Ok(v1::ClaimResponse {
        item: Some(Item::Work(request)),
    })) = within("work", work.next()).await
    else {
        panic!("expected work");
    };
    assert_eq!(request.id, submitted.id);

    // 2. Progress, with nothing held.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reporting = {
        let mut p = progress_client.clone();
        tokio::spawn(async move {
            p.report(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    tx.send(v1::ProgressReport {
        id: request.id.clone(),
        processor_id: "p".into(),
        percentage: 50.0,
        message: "half".into(),
        metadata: None,
    })
    .await
    .unwrap();
    let half = client.recv_json().await;
    assert_eq!(half["type"], "progress", "{half}");
    assert_eq!(half["sequence"], 1);
    drop(tx);
    within("the report stream to end", reporting)
        .await
        .unwrap()
        .unwrap();

    // 3. The final message: written once, though sent again and again.
    proxy.hold();
    let completed = {
        let mut p = progress_client.clone();
        let complete = v1::CompleteRequest {
            id: request.id.clone(),
            processor_id: "p".into(),
            result: Some(streamer_api::json::to_proto(json!({"ok": true}))),
        };
        tokio::spawn(async move { p.complete(complete).await })
    };
    let seen = retried_then_marker(&proxy, &mut client, &connections, &connection_id, 2).await;
    proxy.release();
    within("complete", completed).await.unwrap().unwrap();
    assert_eq!(seen.len(), 1, "one final message: {seen:?}");
    assert_eq!(seen[0]["type"], "complete", "{seen:?}");
    assert_eq!(seen[0]["sequence"], 2);
    assert_eq!(seen[0]["result"], json!({"ok": true}));
}
