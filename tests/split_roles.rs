//! The roles as separate servers (as in a deployment), each on its own
//! listener and store:
//! - ConnectionService restarts while a request runs, and nothing the
//!   client was owed is lost: its connection is restored by the edge's
//!   re-attach, and the request's final message still arrives;
//! - the edge is slow to report deliveries (a proxy holds what it says to
//!   ConnectionService), so deliveries time out and are retried while the
//!   edge has in fact written them: the client still gets each message
//!   exactly once, in order;
//! - subscriptions survive a ConnectionService restart.

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

/// AuthService, ProgressService and the edge as separate servers, each on
/// its own listener (and store); ConnectionService's listener is bound but
/// left to the test, which starts (and restarts) it as it needs.
struct SplitRoles {
    data: tempfile::TempDir,
    key: streamer_auth::dev::DevKey,
    conn_listeners: Option<(TcpListener, TcpListener)>,
    conn: SocketAddr,
    /// ConnectionService's edge stream.
    edge: SocketAddr,
    progress: SocketAddr,
    gateway: SocketAddr,
    /// Stops the roles it started when the test ends.
    shutdown: Shutdown,
}

impl Drop for SplitRoles {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl SplitRoles {
    /// Starts the roles; `edge_dials` maps ConnectionService's edge-stream
    /// address to the one the edge dials (itself, or a proxy in front of it).
    async fn start<F, Fut>(progress: streamer_progress::ProgressConfig, edge_dials: F) -> Self
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = SocketAddr>,
    {
        streamer_core::telemetry::init_logs(streamer_core::telemetry::LogFormat::Plain, "error");
        let data = tempfile::tempdir().unwrap();
        let key = streamer_auth::dev::ensure_dev_key(data.path()).unwrap();
        let (auth_l, conn_l, edge_l, progress_l, gateway_l) = (
            listener().await,
            listener().await,
            listener().await,
            listener().await,
            listener().await,
        );
        let addr = |l: &TcpListener| l.local_addr().unwrap();
        let (auth, conn, edge, progress_addr, gateway) = (
            addr(&auth_l),
            addr(&conn_l),
            addr(&edge_l),
            addr(&progress_l),
            addr(&gateway_l),
        );
        let edge_target = edge_dials(edge).await;
        let shutdown = Shutdown::new();
        tokio::spawn(streamer::run_auth(
            auth_l,
            streamer::open_embedded_store(&data.path().join("auth")).unwrap(),
            streamer_auth::AuthConfig::new([streamer_auth::dev::public_key_path(data.path())]),
            Default::default(),
            shutdown.clone(),
        ));
        tokio::spawn(streamer::run_progress(
            progress_l,
            streamer::open_embedded_store(&data.path().join("progress")).unwrap(),
            streamer_progress::ProgressConfig {
                connection_endpoint: format!("http://{conn}"),
                ..progress
            },
            shutdown.clone(),
        ));
        tokio::spawn(streamer::run_gateway(
            gateway_l,
            streamer_gateway::GatewayConfig {
                auth_endpoint: format!("http://{auth}"),
                connection_endpoint: format!("http://{edge_target}"),
                ..Default::default()
            },
            shutdown.clone(),
        ));
        Self {
            data,
            key,
            conn_listeners: Some((conn_l, edge_l)),
            conn,
            edge,
            progress: progress_addr,
            gateway,
            shutdown,
        }
    }

    /// Starts ConnectionService: on the listener bound at start the first
    /// time, on the same address again after that.
    async fn start_connection(
        &mut self,
        config: streamer_connection::ConnectionConfig,
    ) -> (Shutdown, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let (listener, edge_listener) = match self.conn_listeners.take() {
            Some(listeners) => listeners,
            None => (
                TcpListener::bind(self.conn).await.unwrap(),
                TcpListener::bind(self.edge).await.unwrap(),
            ),
        };
        let store = streamer::open_embedded_store(&self.data.path().join("connection")).unwrap();
        let config = streamer_connection::ConnectionConfig {
            progress_endpoint: Some(format!("http://{}", self.progress)),
            ..config
        };
        let shutdown = Shutdown::new();
        let task = tokio::spawn(streamer::run_connection(
            listener,
            edge_listener,
            store,
            config,
            shutdown.clone(),
        ));
        (shutdown, task)
    }

    async fn edge_attached(&self) -> bool {
        http_get(&format!("http://{}/readyz", self.gateway))
            .await
            .map(|r| r.0)
            == Some(200)
    }

    /// A WebSocket client for alice of acme.
    async fn connect_alice(&self) -> WsClient {
        let token = self
            .key
            .mint(&streamer_auth::dev::MintOptions {
                sub: "alice".into(),
                tenant: "acme".into(),
                ..Default::default()
            })
            .unwrap();
        let url = format!("ws://{}/?Authorization={token}", self.gateway);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        WsClient { ws }
    }

    async fn connections(
        &self,
    ) -> v1::connection_service_client::ConnectionServiceClient<tonic::transport::Channel> {
        v1::connection_service_client::ConnectionServiceClient::connect(format!(
            "http://{}",
            self.conn
        ))
        .await
        .unwrap()
    }

    async fn progress(
        &self,
    ) -> v1::progress_service_client::ProgressServiceClient<tonic::transport::Channel> {
        v1::progress_service_client::ProgressServiceClient::connect(format!(
            "http://{}",
            self.progress
        ))
        .await
        .unwrap()
    }
}

/// The next work item of a Claim stream.
async fn next_work(work: &mut tonic::Streaming<v1::ClaimResponse>) -> v1::Request {
    let Some(Ok(v1::ClaimResponse {
        item: Some(Item::Work(request)),
        ..
    })) = within("work", work.next()).await
    else {
        panic!("expected work");
    };
    request
}

#[tokio::test]
async fn a_connection_service_restart_loses_neither_the_socket_nor_the_final_message() {
    let mut roles = SplitRoles::start(Default::default(), |conn| async move { conn }).await;
    let (conn_shutdown, conn_task) = roles.start_connection(Default::default()).await;
    eventually("the edge to attach", || roles.edge_attached()).await;

    // A processor takes the client's request.
    let mut processor = roles.progress().await;
    let mut work = support::claim(
        &mut processor,
        support::claim_request("p", "generate_report", 1, 60),
    )
    .await;
    let mut client = roles.connect_alice().await;
    client
        .send_json(json!({"action": "generate_report", "id": "r1", "payload": {}}))
        .await;
    assert_eq!(client.recv_json().await["type"], "acknowledgment");
    let request = next_work(&mut work).await;

    // ConnectionService goes away; the edge detaches but keeps the socket.
    conn_shutdown.cancel();
    within("connection service to stop", conn_task)
        .await
        .unwrap()
        .unwrap();
    eventually("the edge to notice", || async {
        !roles.edge_attached().await
    })
    .await;

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
    let (conn_shutdown, conn_task) = roles.start_connection(Default::default()).await;
    eventually("the edge to re-attach", || roles.edge_attached()).await;

    // The final message was not dropped: it reaches the same socket.
    let complete = client.recv_json().await;
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["request_id"], "r1");
    assert_eq!(complete["result"], json!({"ok": true}));

    // The restored record is the live socket: it is listed and reachable.
    let mut connections = roles.connections().await;
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
    assert_eq!(client.recv_backend_json().await, json!({"still": "here"}));

    // A socket that closes while the edge is detached is not left behind:
    // the next hello reconciles the records.
    conn_shutdown.cancel();
    within("connection service to stop", conn_task)
        .await
        .unwrap()
        .unwrap();
    client.close().await;
    let (conn_shutdown, conn_task) = roles.start_connection(Default::default()).await;
    eventually("the edge to re-attach", || roles.edge_attached()).await;
    let mut connections = roles.connections().await;
    let listed = support::user_connection_ids(&mut connections, "acme", "alice").await;
    assert!(listed.is_empty(), "{listed:?}");

    conn_shutdown.cancel();
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
        let message = client.recv_backend_json().await;
        if message == marker {
            return seen;
        }
        support::schema::assert_conforms("ServerMessage", &message);
        seen.push(message);
    }
}

#[tokio::test]
async fn a_slow_edge_gets_each_message_to_the_client_exactly_once_in_order() {
    // The edge reaches ConnectionService only through the proxy.
    let mut proxy = None;
    let mut roles = SplitRoles::start(
        streamer_progress::ProgressConfig {
            progress_rate: 0.0,
            ..Default::default()
        },
        |conn| {
            let proxy = &mut proxy;
            async move { proxy.insert(HoldingProxy::start(conn).await).addr }
        },
    )
    .await;
    let proxy = proxy.unwrap();
    let (conn_shutdown, _conn_task) = roles
        .start_connection(streamer_connection::ConnectionConfig {
            // Short, so the held reports are late many times over.
            delivery_timeout: std::time::Duration::from_millis(200),
            ..Default::default()
        })
        .await;
    let _stop_connection = conn_shutdown.drop_guard();
    eventually("the edge to attach", || roles.edge_attached()).await;

    let mut client = roles.connect_alice().await;
    let connections = roles.connections().await;
    let connection_id = support::user_connection_ids(&mut connections.clone(), "acme", "alice")
        .await
        .pop()
        .unwrap();
    let mut progress_client = roles.progress().await;
    let mut work = support::claim(
        &mut progress_client,
        support::claim_request("p", "generate_report", 1, 60),
    )
    .await;

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
    let request = next_work(&mut work).await;
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
    tx.send(v1::ReportRequest {
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

/// Subscriptions live in the store and in the edge's own index, so a
/// ConnectionService restart loses neither: a publish after it still
/// reaches the subscriber, and the subscription is still listed.
#[tokio::test]
async fn subscriptions_survive_a_connection_service_restart() {
    let mut roles = SplitRoles::start(Default::default(), |conn| async move { conn }).await;
    let (conn_shutdown, conn_task) = roles.start_connection(Default::default()).await;
    eventually("the edge to attach", || roles.edge_attached()).await;
    let mut client = roles.connect_alice().await;
    let mut connections = roles.connections().await;
    let alice = support::user_connection_ids(&mut connections, "acme", "alice").await;
    connections
        .subscribe(v1::SubscribeRequest {
            tenant_id: "acme".into(),
            topic: "news".into(),
            target: Some(v1::subscribe_request::Target::ConnectionId(
                alice[0].clone(),
            )),
        })
        .await
        .unwrap();

    conn_shutdown.cancel();
    within("connection service to stop", conn_task)
        .await
        .unwrap()
        .unwrap();
    let (conn_shutdown, conn_task) = roles.start_connection(Default::default()).await;
    eventually("the edge to re-attach", || roles.edge_attached()).await;

    let mut connections = roles.connections().await;
    let published = connections
        .publish(v1::PublishRequest {
            tenant_id: "acme".into(),
            topic: "news".into(),
            payload: support::json_payload(json!("after the restart")),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.delivered, 1);
    let message = client.recv_json().await;
    assert_eq!(message["data"], "after the restart", "{message}");
    let listed = connections
        .list_subscriptions(v1::ListSubscriptionsRequest {
            tenant_id: "acme".into(),
            selector: Some(v1::list_subscriptions_request::Selector::Topic(
                "news".into(),
            )),
            page: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions.len(), 1);
    assert_eq!(listed.subscriptions[0].connection_id, alice[0]);

    conn_shutdown.cancel();
    within("connection service to stop", conn_task)
        .await
        .unwrap()
        .unwrap();
}
