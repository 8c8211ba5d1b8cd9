//! The integration of AWS API Gateway WebSocket APIs: the HTTP endpoints
//! API Gateway's `$connect`, `$disconnect` and `$default` routes call.
//!
//! API Gateway holds the sockets; this edge holds none. It checks the
//! client's token exactly as the WebSocket edge does and announces the
//! connection (with its API Gateway location) over the same `Attach`
//! stream, hands client frames to the same inbound routing, and reports
//! disconnects. ConnectionService delivers to these connections through
//! API Gateway's management API.
//!
//! Rules:
//! 1. Every request must carry one of the configured shared secrets in
//!    `x-streamer-apigateway-secret` (compared in constant time); anything
//!    else is 403 and changes nothing. API Gateway sets it from a stage
//!    variable in the integration's request parameters.
//! 2. The body is the event API Gateway builds for the route: `requestContext`
//!    (`connectionId`, `routeKey`, `domainName`, `stage`, `identity`), and for
//!    `$connect` the client's `headers` and `queryStringParameters`, for
//!    `$default` the frame as `body` (base64 when `isBase64Encoded`). A
//!    malformed event is 400.
//! 3. `$connect`: the token (query `Authorization` or `token`, or
//!    `Authorization: Bearer`) is validated by AuthService; a refusal is 401
//!    with the edge's reasons, an unreachable control plane 503, success
//!    200 once ConnectionService has recorded the connection.
//! 4. `$default`: the frame is checked as the edge checks it; a malformed
//!    one is answered to the client (through ConnectionService, which posts
//!    it) with a VALIDATION error; a good one goes to the inbound routing.
//!    `refresh` has no use here (API Gateway ends every connection after
//!    2 hours whatever the token says) and is answered so.
//! 5. `$disconnect` reports the connection closed; always 200 (API Gateway
//!    calls it at most once and does not retry).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use streamer_api::v1::{self, attach_request::Event};
use streamer_core::client::ErrorCode;
use streamer_core::ids::{ClientRequestId, ConnectionId};

use crate::edge::{Edge, RegisterError};
use crate::frames;
use crate::socket::REFRESH_ACTION;
use crate::{AuthReplicas, GatewayConfig, authenticate, new_record, unavailable};
use tracing::Instrument as _;

/// The header that carries the shared secret.
pub const SECRET_HEADER: &str = "x-streamer-apigateway-secret";

/// API Gateway's connection ids are short; anything much longer is not one.
const MAX_CONNECTION_ID: usize = 128;

/// How the integration knows a request comes from API Gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct IntegrationConfig {
    /// Any of these is accepted (two during a rotation).
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for IntegrationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntegrationConfig")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl IntegrationConfig {
    /// Reads the secrets from a file, one per line (blank lines skipped);
    /// each must be at least 32 bytes.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the API Gateway secret file {}: {e}",
                path.display()
            )
        })?;
        let secrets: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        anyhow::ensure!(
            !secrets.is_empty(),
            "the API Gateway secret file {} holds no secret",
            path.display()
        );
        anyhow::ensure!(
            secrets.iter().all(|s| s.len() >= 32),
            "every API Gateway secret must be at least 32 bytes"
        );
        Ok(Self { secrets })
    }

    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers.get(SECRET_HEADER) else {
            return false;
        };
        self.secrets.iter().fold(false, |any, secret| {
            any | same(secret.as_bytes(), given.as_bytes())
        })
    }
}

/// Equal bytes, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
pub(crate) struct IntegrationState {
    pub(crate) edge: Arc<Edge>,
    pub(crate) auth: AuthReplicas,
    pub(crate) config: Arc<GatewayConfig>,
    pub(crate) integration: Arc<IntegrationConfig>,
}

/// The routes API Gateway's integrations call.
pub(crate) fn routes(state: IntegrationState) -> Router {
    Router::new()
        .route("/apigateway/connect", post(connect))
        .route("/apigateway/disconnect", post(disconnect))
        .route("/apigateway/default", post(default))
        .with_state(state)
}

/// The event API Gateway sends (rule 2).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiGatewayEvent {
    request_context: RequestContext,
    #[serde(default)]
    headers: Option<HashMap<String, String>>,
    #[serde(default)]
    query_string_parameters: Option<HashMap<String, String>>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    is_base64_encoded: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestContext {
    connection_id: String,
    #[serde(default)]
    domain_name: String,
    #[serde(default)]
    stage: String,
    #[serde(default)]
    identity: Identity,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Identity {
    #[serde(default)]
    source_ip: String,
    #[serde(default)]
    user_agent: String,
}

fn forbidden() -> Response {
    metrics::counter!("streamer_apigateway_requests_refused_total").increment(1);
    (
        StatusCode::FORBIDDEN,
        Json(json!({"error": "integration request not authenticated", "code": "FORBIDDEN"})),
    )
        .into_response()
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": message, "code": "VALIDATION_ERROR"})),
    )
        .into_response()
}

fn ok() -> Response {
    (StatusCode::OK, Json(json!({}))).into_response()
}

/// Rules 1 and 2: the event, or the answer that refuses the request.
fn event_of(
    state: &IntegrationState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(ApiGatewayEvent, ConnectionId), Box<Response>> {
    if !state.integration.admits(headers) {
        return Err(Box::new(forbidden()));
    }
    let event: ApiGatewayEvent = serde_json::from_slice(body)
        .map_err(|e| Box::new(bad_request(format!("not an API Gateway event: {e}"))))?;
    let id = &event.request_context.connection_id;
    if id.is_empty() || id.len() > MAX_CONNECTION_ID || id.chars().any(char::is_control) {
        return Err(Box::new(bad_request(
            "requestContext.connectionId is missing or not an API Gateway connection id".into(),
        )));
    }
    let id = ConnectionId::from(id.as_str());
    Ok((event, id))
}

/// `$connect` (rule 3).
async fn connect(
    State(state): State<IntegrationState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (event, connection_id) = match event_of(&state, &headers, &body) {
        Ok(parsed) => parsed,
        Err(refused) => return *refused,
    };
    let context = &event.request_context;
    if context.domain_name.is_empty() || context.stage.is_empty() {
        return bad_request("requestContext.domainName and stage are required".into());
    }
    // The client's own headers and query, as the WebSocket edge reads them.
    let mut client_headers = HeaderMap::new();
    for (name, value) in event.headers.iter().flatten() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            client_headers.insert(name, value);
        }
    }
    let query = event.query_string_parameters.clone().unwrap_or_default();
    let timeout = state.config.control_plane_timeout;
    let (token, claims) = match authenticate(&state.auth, &query, &client_headers, timeout).await {
        Ok(checked) => checked,
        Err(refused) => return *refused,
    };
    let record = v1::Connection {
        apigateway: Some(v1::ApiGatewayLocation {
            domain_name: context.domain_name.clone(),
            stage: context.stage.clone(),
        }),
        ..new_record(
            &connection_id,
            &state.edge.edge_id,
            claims,
            &context.identity.user_agent,
            &context.identity.source_ip,
        )
    };
    match state.edge.register_remote(record, token, timeout).await {
        Ok(()) => {
            tracing::info!(connection_id = %connection_id, "API Gateway connection registered");
            ok()
        }
        Err(RegisterError::Detached) => unavailable("connection service unavailable"),
        Err(RegisterError::Refused) => unavailable("connection could not be registered"),
    }
}

/// `$disconnect` (rule 5).
async fn disconnect(
    State(state): State<IntegrationState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (_, connection_id) = match event_of(&state, &headers, &body) {
        Ok(parsed) => parsed,
        Err(refused) => return *refused,
    };
    let reported = state
        .edge
        .emit(Event::Closed(v1::ConnectionClosed {
            connection_id: connection_id.to_string(),
            code: 1001,
            reason: "API Gateway disconnected".into(),
        }))
        .await;
    if !reported {
        // The record expires, or the next post to it answers 410.
        tracing::warn!(connection_id = %connection_id, "disconnect not reported: detached");
    }
    ok()
}

/// `$default` (rule 4).
async fn default(
    State(state): State<IntegrationState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (event, connection_id) = match event_of(&state, &headers, &body) {
        Ok(parsed) => parsed,
        Err(refused) => return *refused,
    };
    let body = event.body.unwrap_or_default();
    let text = if event.is_base64_encoded {
        match base64::engine::general_purpose::STANDARD.decode(body.as_bytes()) {
            Ok(bytes) => String::from_utf8(bytes).ok(),
            Err(_) => return bad_request("body is not base64".into()),
        }
    } else {
        Some(body)
    };
    let answer = match text {
        None => Some(frames::error_message(
            &ClientRequestId::default(),
            ErrorCode::Validation,
            frames::BINARY_REFUSED,
        )),
        Some(text) => match frames::parse(&text, state.config.limits.max_frame_bytes) {
            Ok(frame) if frame.action == REFRESH_ACTION => Some(frames::error_message(
                &frame.id,
                ErrorCode::Validation,
                "refresh is not used behind AWS API Gateway: it ends every connection after 2 hours",
            )),
            Ok(frame) => {
                metrics::counter!("streamer_gateway_frames_total").increment(1);
                let span = frames::request_span(&connection_id, &frame);
                let inbound = span.in_scope(|| {
                    frame.into_inbound(&connection_id, streamer_core::trace::current())
                });
                let emitted = state
                    .edge
                    .emit(Event::Frame(inbound))
                    .instrument(span)
                    .await;
                if !emitted {
                    return unavailable("connection service unavailable");
                }
                None
            }
            Err(error) => {
                metrics::counter!("streamer_gateway_frames_refused_total", "reason" => "invalid")
                    .increment(1);
                Some(frames::error_message(
                    &error.request_id,
                    ErrorCode::Validation,
                    &error.message,
                ))
            }
        },
    };
    if let Some(answer) = answer {
        let reply = Event::Reply(v1::Reply {
            connection_id: connection_id.to_string(),
            payload: Some(v1::Payload {
                body: Some(v1::payload::Body::Text(answer)),
            }),
        });
        if !state.edge.emit(reply).await {
            return unavailable("connection service unavailable");
        }
    }
    ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn secret_files_need_long_secrets() {
        let dir = std::env::temp_dir().join(format!("apigw-{}", uuid::Uuid::new_v4()));
        std::fs::write(&dir, "short\n").unwrap();
        assert!(IntegrationConfig::from_file(&dir).is_err());
        let long = "x".repeat(32);
        std::fs::write(&dir, format!("\n{long}\n{long}y\n")).unwrap();
        let config = IntegrationConfig::from_file(&dir).unwrap();
        assert_eq!(config.secrets.len(), 2);
        let mut headers = HeaderMap::new();
        assert!(!config.admits(&headers));
        headers.insert(SECRET_HEADER, HeaderValue::from_str(&long).unwrap());
        assert!(config.admits(&headers));
        headers.insert(SECRET_HEADER, HeaderValue::from_static("wrong"));
        assert!(!config.admits(&headers));
        std::fs::remove_file(&dir).unwrap();
    }
}
