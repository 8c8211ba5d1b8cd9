//! Real WebSocket clients behind an API Gateway stand-in: it holds the
//! sockets, calls the integration's `$connect`, `$default` and
//! `$disconnect` with API Gateway's event shape, and serves the
//! `@connections` management API that ConnectionService posts to,
//! forwarding each post to its socket (410 once the socket is gone), as the
//! documented service does. Through it: tokens are checked with the edge's
//! reasons, a router answers, a processor's progress and result arrive in
//! order, a topic publish arrives, and a client that vanished without
//! `$disconnect` is removed on its first 410.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apigateway.rs"]
mod apigateway_support;
mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use apigateway_support::{post_json, system_with_integration};
use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use streamer_api::v1;
use streamer_api::v1::progress_service_client::ProgressServiceClient;
use streamer_auth::dev::MintOptions;
use streamer_gateway::apigateway::SECRET_HEADER;
use support::{TestSystem, WsClient, eventually, within};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite;

const SECRET: &str = "the-stand-in-and-the-integration-share-this";
const STAGE: &str = "prod";

/// API Gateway in miniature (see the module doc).
#[derive(Clone)]
struct StandIn {
    /// Where the integration listens.
    integration: SocketAddr,
    /// This server's own address: the connections' domain name.
    address: Arc<Mutex<Option<SocketAddr>>>,
    sockets: Arc<Mutex<HashMap<String, mpsc::Sender<AxumMessage>>>>,
    /// Connections whose client vanished: no `$disconnect` is sent.
    vanished: Arc<Mutex<HashSet<String>>>,
}

impl StandIn {
    async fn start(integration: SocketAddr) -> (Self, SocketAddr) {
        let stand_in = Self {
            integration,
            address: Arc::default(),
            sockets: Arc::default(),
            vanished: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/{stage}", axum::routing::get(upgrade))
            .route("/{stage}/@connections/{id}", axum::routing::any(management))
            .with_state(stand_in.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        *stand_in.address.lock().unwrap() = Some(address);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (stand_in, address)
    }

    fn context(&self, route: &str, id: &str) -> Value {
        let domain = self.address.lock().unwrap().unwrap().to_string();
        json!({
            "routeKey": route,
            "eventType": match route { "$connect" => "CONNECT", "$disconnect" => "DISCONNECT", _ => "MESSAGE" },
            "connectionId": id,
            "domainName": domain,
            "stage": STAGE,
            "apiId": "standin",
            "identity": {"sourceIp": "127.0.0.1", "userAgent": "stand-in"},
        })
    }

    async fn call(&self, route: &str, event: Value) -> (u16, String) {
        let path = match route {
            "$connect" => "/apigateway/connect",
            "$disconnect" => "/apigateway/disconnect",
            _ => "/apigateway/default",
        };
        post_json(self.integration, path, &event, &[(SECRET_HEADER, SECRET)]).await
    }

    /// The client's network goes away without a goodbye: the socket is
    /// dropped and API Gateway never calls `$disconnect`.
    fn vanish(&self, id: &str) {
        self.vanished.lock().unwrap().insert(id.to_owned());
        self.sockets.lock().unwrap().remove(id);
    }
}

async fn upgrade(
    State(stand_in): State<StandIn>,
    Path(stage): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    assert_eq!(stage, STAGE);
    let id = format!("{}=", &uuid::Uuid::new_v4().simple().to_string()[..15]);
    let client_headers: HashMap<String, String> = headers
        .iter()
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect();
    let event = json!({
        "requestContext": stand_in.context("$connect", &id),
        "headers": client_headers,
        "queryStringParameters": query,
        "isBase64Encoded": false,
    });
    let (status, body) = stand_in.call("$connect", event).await;
    if status != 200 {
        return (StatusCode::from_u16(status).unwrap(), body).into_response();
    }
    ws.on_upgrade(move |socket| run_socket(stand_in, id, socket))
}

/// Frames up to `$default`, posts down to the socket, `$disconnect` at
/// the end (unless the client vanished).
async fn run_socket(stand_in: StandIn, id: String, socket: WebSocket) {
    let (tx, mut rx) = mpsc::channel::<AxumMessage>(256);
    stand_in.sockets.lock().unwrap().insert(id.clone(), tx);
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            down = rx.recv() => match down {
                Some(message) => {
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
                // Deleted, or vanished.
                None => {
                    if !stand_in.vanished.lock().unwrap().contains(&id) {
                        let _ = sink.send(AxumMessage::Close(None)).await;
                    }
                    break;
                }
            },
            up = stream.next() => match up {
                Some(Ok(AxumMessage::Text(text))) => {
                    let event = json!({
                        "requestContext": stand_in.context("$default", &id),
                        "body": text.as_str(),
                        "isBase64Encoded": false,
                    });
                    let (status, _) = stand_in.call("$default", event).await;
                    assert_eq!(status, 200);
                }
                Some(Ok(AxumMessage::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    stand_in.sockets.lock().unwrap().remove(&id);
    if !stand_in.vanished.lock().unwrap().contains(&id) {
        let event = json!({ "requestContext": stand_in.context("$disconnect", &id) });
        stand_in.call("$disconnect", event).await;
    }
}

/// `@connections/{id}`: POST writes to the socket, GET asks, DELETE
/// closes; a connection it does not hold is 410 Gone.
async fn management(
    State(stand_in): State<StandIn>,
    method: Method,
    Path((_stage, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let sender = stand_in.sockets.lock().unwrap().get(&id).cloned();
    let Some(sender) = sender else {
        return (
            StatusCode::GONE,
            [("x-amzn-errortype", "GoneException")],
            r#"{"message":"gone"}"#,
        )
            .into_response();
    };
    match method {
        Method::POST => {
            let text = String::from_utf8(body.to_vec()).unwrap();
            let _ = sender.send(AxumMessage::Text(text.into())).await;
            StatusCode::OK.into_response()
        }
        Method::DELETE => {
            stand_in.sockets.lock().unwrap().remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => (StatusCode::OK, "{}").into_response(),
    }
}

struct Deployment {
    system: TestSystem,
    stand_in: StandIn,
    url: String,
}

async fn deploy() -> Deployment {
    let (system, integration) =
        system_with_integration("http://{domain}/{stage}".into(), SECRET).await;
    let (stand_in, address) = StandIn::start(integration).await;
    Deployment {
        system,
        stand_in,
        url: format!("ws://{address}/{STAGE}"),
    }
}

impl Deployment {
    async fn connect(&self, token: &str) -> (WsClient, String) {
        let before: HashSet<String> = self
            .stand_in
            .sockets
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let url = format!("{}?Authorization={token}", self.url);
        let (ws, _) = within("the upgrade", tokio_tungstenite::connect_async(url))
            .await
            .unwrap();
        let mut id = None;
        eventually("the stand-in to hold the socket", || {
            let now: HashSet<String> = self
                .stand_in
                .sockets
                .lock()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            id = now.difference(&before).next().cloned();
            std::future::ready(id.is_some())
        })
        .await;
        (WsClient { ws }, id.unwrap())
    }
}

#[tokio::test]
async fn a_bad_token_is_refused_at_the_upgrade_with_its_reason() {
    let it = deploy().await;
    let expired = it.system.mint(MintOptions {
        sub: "mallory".into(),
        tenant: "acme".into(),
        expired: true,
        ..MintOptions::default()
    });
    for (token, reason) in [
        (expired.as_str(), "token_expired"),
        ("garbage", "invalid_token"),
    ] {
        let url = format!("{}?Authorization={token}", it.url);
        let refused = tokio_tungstenite::connect_async(url).await.unwrap_err();
        let tungstenite::Error::Http(response) = refused else {
            panic!("not an HTTP refusal: {refused:?}");
        };
        assert_eq!(response.status(), 401);
        let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
        support::schema::assert_conforms("Unauthorized", &body);
        assert_eq!(body["reason"], reason);
    }
    assert!(it.stand_in.sockets.lock().unwrap().is_empty());
}

#[tokio::test]
async fn routers_processors_and_topics_reach_a_client_behind_api_gateway() {
    let it = deploy().await;
    let token = it.system.mint(MintOptions {
        sub: "alice".into(),
        tenant: "acme".into(),
        topics: vec!["orders/*".into()],
        ..MintOptions::default()
    });
    let (mut client, id) = it.connect(&token).await;
    let mut connections = it.system.connections().await;

    // A router answers a sync action, with the token's identity.
    let mut router = support::receive(
        &mut connections,
        v1::ReceiveRequest {
            actions: vec!["echo".into()],
            router_id: "echo-router".into(),
        },
    )
    .await;
    client
        .send_json(json!({"action": "echo", "id": "e1", "payload": {"n": 1}}))
        .await;
    let frame = within("the routed frame", router.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame.connection_id, id);
    assert_eq!(frame.identity.unwrap().user_id, "alice");
    connections
        .send(support::send(
            &frame.connection_id,
            json!({"type": "response", "request_id": "e1", "success": true, "data": {"n": 1}}),
        ))
        .await
        .unwrap();
    let answer = client.recv_json().await;
    assert_eq!(answer["request_id"], "e1");
    assert_eq!(answer["data"], json!({"n": 1}));

    // A processor's progress and result arrive in order.
    let progress = ProgressServiceClient::connect(format!("http://{}", it.system.addrs.progress))
        .await
        .unwrap();
    let mut work = support::claim(
        &mut progress.clone(),
        support::claim_request("worker", "report", 1, 30),
    )
    .await;
    client
        .send_json(json!({"action": "report", "id": "r1", "payload": {"pages": 2}}))
        .await;
    let request = loop {
        let item = within("work", work.next()).await.unwrap().unwrap();
        if let Some(v1::claim_response::Item::Work(request)) = item.item {
            break request;
        }
    };
    let mut reporter = progress.clone();
    let request_id = request.id.clone();
    let reports = (1..=2).map(move |step| v1::ReportRequest {
        id: request_id.clone(),
        processor_id: "worker".into(),
        percentage: f64::from(step) * 50.0,
        message: format!("page {step}"),
        metadata: None,
    });
    reporter.report(tokio_stream::iter(reports)).await.unwrap();
    reporter
        .complete(v1::CompleteRequest {
            id: request.id.clone(),
            processor_id: "worker".into(),
            result: Some(streamer_api::json::to_proto(json!({"pages": 2}))),
        })
        .await
        .unwrap();
    let ack = client.recv_json().await;
    assert_eq!(
        (ack["type"].as_str(), ack["request_id"].as_str()),
        (Some("acknowledgment"), Some("r1"))
    );
    let mut last = ack["sequence"].as_u64().unwrap_or(0);
    let complete = loop {
        let message = client.recv_json().await;
        let sequence = message["sequence"].as_u64().unwrap();
        assert!(sequence > last, "in order: {message}");
        last = sequence;
        match message["type"].as_str().unwrap() {
            "progress" => continue,
            "complete" => break message,
            other => panic!("unexpected {other}: {message}"),
        }
    };
    assert_eq!(complete["result"], json!({"pages": 2}));

    // A topic the token allows: subscribed by the client, published to.
    client
        .send_json(json!({"action": "subscribe", "id": "s1", "payload": {"topic": "orders/42"}}))
        .await;
    let subscribed = client.recv_json().await;
    assert_eq!(
        (subscribed["type"].as_str(), subscribed["success"].as_bool()),
        (Some("response"), Some(true))
    );
    connections
        .publish(v1::PublishRequest {
            tenant_id: "acme".into(),
            topic: "orders/42".into(),
            payload: support::json_payload(json!({"status": "shipped"})),
            key: String::new(),
        })
        .await
        .unwrap();
    let message = client.recv_json().await;
    assert_eq!(message["type"], "message");
    assert_eq!(message["data"], json!({"status": "shipped"}));
}

#[tokio::test]
async fn a_client_gone_without_disconnect_is_removed_on_its_first_410() {
    let it = deploy().await;
    let (_client, id) = it.connect(&it.system.token("bob", "acme")).await;
    it.stand_in.vanish(&id);
    let mut connections = it.system.connections().await;
    let sent = connections
        .send(support::send(&id, json!({"anyone": "there?"})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.outcome(), v1::DeliveryOutcome::Gone);
    let status = connections
        .get_connection(v1::GetConnectionRequest {
            connection_id: id.clone(),
            tenant_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn a_closed_client_is_removed_and_disconnect_closes_a_socket() {
    let it = deploy().await;
    let (client, id) = it.connect(&it.system.token("carol", "acme")).await;
    let mut connections = it.system.connections().await;
    client.close().await;
    eventually("the record to go after $disconnect", || {
        let mut connections = connections.clone();
        let id = id.clone();
        async move {
            connections
                .get_connection(v1::GetConnectionRequest {
                    connection_id: id,
                    tenant_id: String::new(),
                })
                .await
                .is_err()
        }
    })
    .await;

    let (mut client, id) = it.connect(&it.system.token("dave", "acme")).await;
    connections
        .disconnect(v1::DisconnectRequest {
            connection_id: id.clone(),
            reason: "bye".into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap();
    client.expect_close().await;
}
