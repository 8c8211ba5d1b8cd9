//! The end-to-end harness: a whole Streamer system in this process, on
//! listeners bound to `127.0.0.1:0` before the servers start (so there is
//! never a port race), with real gRPC clients and real WebSocket clients.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;
pub mod schema;

use std::future::Future;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use streamer::{RunningSystem, SystemAddrs, SystemConfig, SystemListeners};
use streamer_api::v1::{
    connection_service_client::ConnectionServiceClient,
    progress_service_client::ProgressServiceClient,
};
use streamer_auth::dev::{DevKey, MintOptions};
use streamer_core::shutdown::Shutdown;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::Channel;

/// How long any single awaited event may take before a test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Awaits `future`, failing the test with `what` if it takes too long.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(EVENT_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Re-checks `check` until it holds, failing after [`EVENT_TIMEOUT`]. For
/// state that has no event to await (a record removed by another process).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub struct TestSystem {
    pub addrs: SystemAddrs,
    pub data_dir: Option<tempfile::TempDir>,
    pub shutdown: Shutdown,
    system: Option<RunningSystem>,
    key: DevKey,
}

impl TestSystem {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a system whose configuration `adjust` may change first.
    pub async fn start_with(adjust: impl FnOnce(&mut SystemConfig)) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        Self::start_in(data_dir, adjust).await
    }

    /// Starts a system on an existing data directory (a restart).
    pub async fn start_in(
        data_dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut SystemConfig),
    ) -> Self {
        streamer_core::telemetry::init_logs(streamer_core::telemetry::LogFormat::Plain, "warn");
        let mut config = SystemConfig::development(data_dir.path().to_path_buf()).unwrap();
        config.store = test_store(data_dir.path()).await;
        adjust(&mut config);
        let key = streamer_auth::dev::load_dev_key(data_dir.path()).unwrap();
        let shutdown = Shutdown::new();
        let listeners = SystemListeners::ephemeral().await.unwrap();
        let system = streamer::start_system(listeners, config, shutdown.clone())
            .await
            .unwrap();
        let this = Self {
            addrs: system.addrs,
            data_dir: Some(data_dir),
            shutdown,
            system: Some(system),
            key,
        };
        this.wait_ready().await;
        this
    }

    /// Waits until the edge is attached to ConnectionService, so clients
    /// can connect.
    async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.addrs.gateway);
        eventually("the edge to attach", || {
            let url = url.clone();
            async move { http_status(&url).await == Some(200) }
        })
        .await;
    }

    /// Stops the system, re-raising any role's failure, and hands back the
    /// data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        let system = self.system.take().unwrap();
        within("the system to stop", system.join()).await.unwrap();
        self.data_dir.take().unwrap()
    }

    pub fn token(&self, sub: &str, tenant: &str) -> String {
        self.mint(MintOptions {
            sub: sub.into(),
            tenant: tenant.into(),
            ..MintOptions::default()
        })
    }

    pub fn mint(&self, options: MintOptions) -> String {
        self.key.mint(&options).unwrap()
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/?Authorization={token}", self.addrs.gateway)
    }

    /// Connects a WebSocket client for `sub` in `tenant`.
    pub async fn connect(&self, sub: &str, tenant: &str) -> WsClient {
        let url = self.ws_url(&self.token(sub, tenant));
        let (ws, _) = within(
            "the websocket to connect",
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("websocket connect");
        WsClient { ws }
    }

    /// Connects a client and finds its connection id (the user must have
    /// no other connection).
    pub async fn connect_found(&self, sub: &str, tenant: &str) -> (WsClient, String) {
        let client = self.connect(sub, tenant).await;
        let ids = user_connection_ids(&mut self.connections().await, tenant, sub).await;
        assert_eq!(ids.len(), 1, "{sub} should have exactly one connection");
        (client, ids[0].clone())
    }

    pub async fn connections(&self) -> ConnectionServiceClient<Channel> {
        ConnectionServiceClient::connect(format!("http://{}", self.addrs.connection))
            .await
            .unwrap()
    }

    pub async fn progress(&self) -> ProgressServiceClient<Channel> {
        ProgressServiceClient::connect(format!("http://{}", self.addrs.progress))
            .await
            .unwrap()
    }
}

/// The store the end-to-end tests run on: the embedded one, or with
/// `STREAMER_TEST_STORE=dynamodb` DynamoDB tables on a local moto server.
/// The tables are named after the data directory, so a restart on the same
/// directory finds the same state.
async fn test_store(data_dir: &std::path::Path) -> streamer::StoreChoice {
    match std::env::var("STREAMER_TEST_STORE").as_deref() {
        Ok("dynamodb") => {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            data_dir.hash(&mut hasher);
            let prefix = format!("t{:016x}-", hasher.finish());
            let endpoint = streamer_core::store::conformance::local_dynamodb::endpoint();
            let store = streamer_core::store::DynamoStore::local(&endpoint, &prefix);
            store.create_tables().await.unwrap();
            streamer::StoreChoice::Opened(std::sync::Arc::new(store))
        }
        Ok("embedded") | Err(_) => streamer::StoreChoice::Embedded,
        Ok(other) => panic!("STREAMER_TEST_STORE={other}: embedded or dynamodb"),
    }
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        // A test that panicked still stops its servers.
        self.shutdown.cancel();
    }
}

/// The ids of one user's connections, as ListConnections reports them.
pub async fn user_connection_ids(
    connections: &mut ConnectionServiceClient<Channel>,
    tenant: &str,
    user: &str,
) -> Vec<String> {
    connections
        .list_connections(streamer_api::v1::ListConnectionsRequest {
            tenant_id: tenant.into(),
            user_id: user.into(),
            page: None,
        })
        .await
        .unwrap()
        .into_inner()
        .connections
        .into_iter()
        .map(|c| c.connection_id)
        .collect()
}

/// The status of a plain HTTP GET, or None when nothing answered.
pub async fn http_status(url: &str) -> Option<u16> {
    http_get(url).await.map(|(status, _)| status)
}

/// A plain HTTP/1.1 GET over a raw socket: status and body.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = TcpStream::connect(host).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((status, body))
}

pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next JSON message (pings and pongs skipped), one of the
    /// protocol's server messages: the test fails, with the schema's
    /// errors, when it is not a valid `ServerMessage` of
    /// `docs/websocket.schema.json`.
    pub async fn recv_json(&mut self) -> Value {
        let message = self.recv_backend_json().await;
        schema::assert_conforms("ServerMessage", &message);
        message
    }

    /// The next JSON message (pings and pongs skipped), not checked against
    /// the protocol's schema: for a payload a backend delivered with `Send`
    /// or `Broadcast`, whose shape is the backend's own.
    pub async fn recv_backend_json(&mut self) -> Value {
        loop {
            let message = within("a websocket message", self.ws.next())
                .await
                .expect("socket ended")
                .expect("socket failed");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match within("the socket to close", self.ws.next()).await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain until the server acknowledges.
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

/// A processor's Claim for one action.
pub fn claim_request(
    processor_id: &str,
    action: &str,
    max_in_flight: u32,
    lease_seconds: u32,
) -> streamer_api::v1::ClaimRequest {
    streamer_api::v1::ClaimRequest {
        processor_id: processor_id.into(),
        actions: vec![action.into()],
        max_in_flight,
        lease_seconds,
    }
}

/// A JSON payload for Send and Broadcast.
/// A `Send` of `value` to one connection, in whatever tenant it is.
pub fn send(connection_id: &str, value: Value) -> streamer_api::v1::SendRequest {
    streamer_api::v1::SendRequest {
        connection_id: connection_id.into(),
        payload: json_payload(value),
        tenant_id: String::new(),
        sequence: None,
    }
}

pub fn json_payload(value: Value) -> Option<streamer_api::v1::Payload> {
    Some(streamer_api::v1::Payload {
        body: Some(streamer_api::v1::payload::Body::Json(
            streamer_api::json::to_proto(value),
        )),
    })
}

/// A router's `Receive` stream, past its registration: frames for its
/// actions reach it from the moment [`receive`] returns.
#[derive(Debug)]
pub struct Router(tonic::Streaming<streamer_api::v1::ReceiveResponse>);

impl Router {
    /// The next frame a client sent (`None` when the stream ended).
    pub async fn next(
        &mut self,
    ) -> Option<Result<streamer_api::v1::InboundMessage, tonic::Status>> {
        use streamer_api::v1::receive_response::Event;
        match self.0.next().await? {
            Ok(streamer_api::v1::ReceiveResponse {
                event: Some(Event::Message(message)),
            }) => Some(Ok(message)),
            Ok(other) => panic!("only the first message is a registration: {other:?}"),
            Err(status) => Some(Err(status)),
        }
    }
}

/// Opens a router's `Receive` stream and waits for its registration.
pub async fn receive(
    client: &mut ConnectionServiceClient<Channel>,
    request: streamer_api::v1::ReceiveRequest,
) -> Router {
    use streamer_api::v1::receive_response::Event;
    let declared = request.actions.clone();
    let mut stream = client
        .receive(request)
        .await
        .expect("Receive opens")
        .into_inner();
    let first = within("the router's registration", stream.next()).await;
    match first {
        Some(Ok(streamer_api::v1::ReceiveResponse {
            event: Some(Event::Registered(registered)),
        })) => {
            assert_eq!(
                registered.actions, declared,
                "the registration names the actions"
            );
        }
        other => panic!("a Receive stream opens with its registration, got {other:?}"),
    }
    Router(stream)
}

/// Opens a processor's `Claim` stream and waits for its registration: its
/// actions are accepted by `Submit` from the moment this returns.
pub async fn claim(
    client: &mut ProgressServiceClient<Channel>,
    request: streamer_api::v1::ClaimRequest,
) -> tonic::Streaming<streamer_api::v1::ClaimResponse> {
    use streamer_api::v1::claim_response::Item;
    let actions = request.actions.clone();
    let mut stream = client
        .claim(request)
        .await
        .expect("Claim opens")
        .into_inner();
    let first = within("the processor's registration", stream.next()).await;
    match first {
        Some(Ok(streamer_api::v1::ClaimResponse {
            item: Some(Item::Registered(registered)),
            ..
        })) => assert_eq!(
            registered.actions, actions,
            "the registration names the actions"
        ),
        other => panic!("a Claim stream opens with its registration, got {other:?}"),
    }
    stream
}
