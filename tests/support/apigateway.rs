//! API Gateway's side for tests: a fault-injecting server in place of its
//! management API, a clock the test moves, and reading back what moto's
//! management API received. Included by the tests that need it (not by
//! `support`, which other crates' tests include too).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use streamer_connection::apigateway::{Clock, Target};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the fault server answers to one call.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 (204 for a delete).
    Ok,
    /// This status, with the error type API Gateway names it by.
    Status(u16, &'static str),
    /// No answer for this long (the caller times out first).
    Silence(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    pub stage: String,
    pub connection_id: String,
    pub body: Bytes,
}

#[derive(Default)]
struct Script {
    replies: HashMap<String, VecDeque<Reply>>,
    calls: Vec<Call>,
}

/// An HTTP server in API Gateway's place: `/{stage}/@connections/{id}`,
/// answering each connection's calls from its script (then 200).
pub struct FaultServer {
    pub address: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl FaultServer {
    pub async fn start() -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = axum::Router::new()
            .route("/{stage}/@connections/{id}", axum::routing::any(answer))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { address, script }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/prod", self.address)
    }

    pub fn target(&self, connection_id: &str) -> Target {
        Target {
            endpoint: self.endpoint(),
            connection_id: connection_id.into(),
        }
    }

    pub fn script(&self, connection_id: &str, replies: impl IntoIterator<Item = Reply>) {
        self.script
            .lock()
            .unwrap()
            .replies
            .entry(connection_id.into())
            .or_default()
            .extend(replies);
    }

    pub fn calls(&self, connection_id: &str) -> Vec<Call> {
        self.script
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.connection_id == connection_id)
            .cloned()
            .collect()
    }
}

async fn answer(
    State(script): State<Arc<Mutex<Script>>>,
    method: Method,
    Path((stage, connection_id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let reply = {
        let mut script = script.lock().unwrap();
        script.calls.push(Call {
            method: method.clone(),
            stage,
            connection_id: connection_id.clone(),
            body,
        });
        script
            .replies
            .get_mut(&connection_id)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Reply::Ok)
    };
    match reply {
        Reply::Ok if method == Method::DELETE => StatusCode::NO_CONTENT.into_response(),
        Reply::Ok if method == Method::GET => (
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"identity":{"sourceIp":"192.0.2.1","userAgent":"test"}}"#,
        )
            .into_response(),
        Reply::Ok => StatusCode::OK.into_response(),
        Reply::Status(status, error_type) => (
            StatusCode::from_u16(status).unwrap(),
            [
                ("content-type", "application/json"),
                ("x-amzn-errortype", error_type),
            ],
            format!(r#"{{"message":"{error_type} from the test server"}}"#),
        )
            .into_response(),
        Reply::Silence(duration) => {
            tokio::time::sleep(duration).await;
            StatusCode::OK.into_response()
        }
    }
}

/// A clock that waits for nothing: a sleep moves it on and is noted.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Instant>,
    slept: Mutex<Vec<Duration>>,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new(Instant::now()),
            slept: Mutex::new(Vec::new()),
        })
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap() += by;
    }

    pub fn slept(&self) -> Vec<Duration> {
        self.slept.lock().unwrap().clone()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap()
    }

    fn sleep(
        &self,
        duration: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        self.advance(duration);
        self.slept.lock().unwrap().push(duration);
        Box::pin(std::future::ready(()))
    }
}

pub fn message(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// What moto kept of the posts to `connection_id` (None: it never saw it).
pub async fn moto_read_back(endpoint: &str, connection_id: &str) -> Option<Vec<u8>> {
    let address = endpoint.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET /_streamer/apigateway/connections/{connection_id} HTTP/1.0\r\nHost: {address}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    match head.split_whitespace().nth(1) {
        Some("200") => Some(response[split + 4..].to_vec()),
        Some("404") => None,
        other => panic!("read-back answered {other:?}: {head}"),
    }
}

/// POSTs `body` (JSON) to `path` on `address` over plain HTTP/1.1, with
/// `headers` (`name: value` lines); the status and the body.
pub async fn post_json(
    address: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let body = body.to_string();
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n{headers}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// A whole system whose ConnectionService posts to API Gateway's management
/// API at `endpoint` (`{domain}` and `{stage}` filled in from each
/// connection; retry waits not slept), and an edge in integration mode
/// attached to it, accepting `secret`: the system and the integration's
/// address.
pub async fn system_with_integration(
    endpoint: String,
    secret: &str,
) -> (crate::support::TestSystem, SocketAddr) {
    let system = crate::support::TestSystem::start_with(|config| {
        config.connection.apigateway = Some(streamer_connection::apigateway::ApiGatewayConfig {
            endpoint,
            clock: ManualClock::new(),
            ..streamer_connection::apigateway::ApiGatewayConfig::new(Arc::new(
                streamer_connection::apigateway::SdkManagementApi::local(),
            ))
        });
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let config = streamer_gateway::GatewayConfig {
        auth_endpoint: format!("http://{}", system.addrs.auth),
        connection_endpoint: format!("http://{}", system.addrs.edge),
        apigateway: Some(streamer_gateway::apigateway::IntegrationConfig {
            secrets: vec![secret.into()],
        }),
        ..streamer_gateway::GatewayConfig::default()
    };
    tokio::spawn(streamer::run_gateway(
        listener,
        config,
        system.shutdown.clone(),
    ));
    let ready = format!("http://{address}/readyz");
    crate::support::eventually("the integration to attach", || {
        let ready = ready.clone();
        async move { crate::support::http_status(&ready).await == Some(200) }
    })
    .await;
    (system, address)
}
