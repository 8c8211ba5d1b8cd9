//! The WebSocket edge.
//!
//! It is deliberately thin: it authenticates a client through AuthService
//! before the upgrade, holds the socket, checks each frame's shape and size,
//! and relays everything else over one bidirectional `Attach` stream to
//! ConnectionService, which owns the registry, delivery and routing.
//!
//! Layout:
//! - [`frames`]: frame validation and the edge's own error messages.
//! - [`edge`]: local sockets, outbound queues, the Attach loop.
//! - [`audience`]: who a tenant, user or topic fan-out reaches here.
//! - [`outbox`]: each socket's bounded outbound queue, allocated only
//!   while messages wait.
//! - [`sequences`]: each sequenced message written to a socket at most
//!   once, in order.
//! - [`limits`]: what one client may cost the edge.
//! - [`socket`]: one socket's read and write loops.
//! - [`apigateway`]: the mode in which AWS API Gateway holds the sockets
//!   and this edge serves its integration endpoints instead.
//! - this file: configuration and the HTTP side (auth, upgrade, health).

#![forbid(unsafe_code)]

pub mod apigateway;
pub mod audience;
pub mod edge;
pub mod frames;
mod http;
pub mod limits;
pub mod outbox;
pub mod sequences;
pub mod socket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use streamer_api::v1::{
    self, TokenFailure, auth_service_client::AuthServiceClient,
    edge_service_client::EdgeServiceClient,
};
use streamer_core::grpc::{Balanced, replica_channel, url_list};
use streamer_core::ids::{ConnectionId, EdgeId, TenantId, UserId};
use streamer_core::shutdown::Shutdown;
use streamer_core::trust::{AuthedChannel, Role, Trust};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::edge::{Edge, RegisterError};
use crate::limits::{PerIpRate, SocketLimits};

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// AuthService: one URL, or several separated by commas. Each host is
    /// resolved again every few seconds and token checks are spread over
    /// every address (every AuthService replica), in turn.
    pub auth_endpoint: String,
    /// ConnectionService's internal edge stream (`EdgeService`): one URL, or several separated by
    /// commas. Each URL's host is resolved again every few seconds and the
    /// edge attaches to every address it resolves to (every replica behind
    /// a Kubernetes headless Service).
    pub connection_endpoint: String,
    /// Unique per edge process.
    pub edge_id: EdgeId,
    /// What one socket may cost: frame size, message rate, pings and idle
    /// timeout (see [`limits`]).
    pub limits: SocketLimits,
    /// Most sockets this edge holds at once; past it, 503.
    pub max_connections: usize,
    /// Most clients being authenticated and registered at once; past it,
    /// 503, so a flood of handshakes cannot crowd out the rest.
    pub max_handshakes: usize,
    /// New connections per second from one IP address (loopback exempt);
    /// 0: no limit. Past it, 503.
    pub connection_rate_per_ip: f64,
    /// New connections one address may open at once, above the rate.
    pub connection_burst_per_ip: u32,
    /// How long a client may take to send its request headers; past it
    /// the connection is closed (no slowloris).
    pub header_read_timeout: Duration,
    /// Origins a browser may connect from (`Origin` header, exactly as the
    /// browser sends it); empty: any. Clients that send no `Origin` (not a
    /// browser) are not affected.
    pub allowed_origins: Vec<String>,
    /// Messages queued per socket before its client counts as slow.
    pub outbound_queue: usize,
    /// The kernel's send buffer per socket, in bytes. None: the kernel
    /// tunes it (on Linux up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by
    /// default). What a client that stops reading can hold there, before
    /// its outbound queue fills and the slow-consumer policy applies.
    pub send_buffer: Option<usize>,
    /// How long AuthService and ConnectionService may take at connect time
    /// before the client gets 503.
    pub control_plane_timeout: Duration,
    /// How this edge presents itself to the control plane (role `edge`,
    /// named by its edge id).
    pub trust: Trust,
    /// Serve AWS API Gateway's integration endpoints instead of WebSockets
    /// (see [`apigateway`]).
    pub apigateway: Option<apigateway::IntegrationConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            auth_endpoint: "http://127.0.0.1:50051".into(),
            connection_endpoint: "http://127.0.0.1:50054".into(),
            edge_id: EdgeId::from(format!("edge-{}", uuid::Uuid::new_v4().simple())),
            limits: SocketLimits::default(),
            max_connections: 10_000,
            max_handshakes: 1_000,
            allowed_origins: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            connection_rate_per_ip: 20.0,
            connection_burst_per_ip: 100,
            outbound_queue: 1024,
            send_buffer: None,
            control_plane_timeout: Duration::from_secs(3),
            trust: Trust::none(),
            apigateway: None,
        }
    }
}

#[derive(Clone)]
struct AppState {
    edge: Arc<Edge>,
    auth: AuthReplicas,
    config: Arc<GatewayConfig>,
    sockets: TaskTracker,
    /// One permit per socket, held for its whole life.
    slots: Arc<Semaphore>,
    /// One permit per handshake in progress.
    handshakes: Arc<Semaphore>,
    /// New connections per client address.
    per_ip: Arc<PerIpRate>,
}

/// The read buffer each socket starts with, and the most it reads from the
/// kernel at once (see [`connect`]). Client frames are mostly well under
/// 1 KiB; a larger one is read in 1 KiB steps into a buffer grown to its
/// length (a 64 KiB frame takes 64 reads), which is the price of 1 KiB less
/// per idle socket than at 2 KiB.
pub const SOCKET_READ_BUFFER: usize = 1024;

/// A client per AuthService replica, taken in turn.
type AuthReplicas = Arc<Balanced<AuthServiceClient<AuthedChannel>>>;

/// AuthService's answer about `token`: from the next replica in turn, or,
/// when that one does not answer (it may have just gone), from one more.
/// None: no replica answered.
async fn validate(
    auth: &AuthReplicas,
    token: &str,
    timeout: Duration,
) -> Option<v1::ValidateTokenResponse> {
    let answer = auth
        .call(2, Duration::ZERO, |mut client| async move {
            let call =
                client.validate_token(streamer_core::trace::request(v1::ValidateTokenRequest {
                    token: token.to_owned(),
                }));
            match tokio::time::timeout(timeout, call).await {
                Ok(answer) => answer,
                Err(_) => Err(tonic::Status::deadline_exceeded("auth service timed out")),
            }
        })
        .await;
    match answer {
        Ok(answer) => Some(answer.into_inner()),
        Err(status) => {
            tracing::warn!(error = %status, "auth service call failed");
            None
        }
    }
}

/// Serves the edge on `listener` until `shutdown`, then closes every socket
/// with 1001 and waits (at most 10 s) for them to finish.
pub async fn serve(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let edge_id = config.trust.edge_id(&config.edge_id);
    let credentials = config.trust.credentials(edge_id.as_str(), &[Role::Edge]);
    let (trust, timeout) = (config.trust.clone(), config.control_plane_timeout);
    let auth = {
        let credentials = credentials.clone();
        Balanced::follow_list(
            &config.auth_endpoint,
            &trust,
            (timeout, None),
            move |channel| AuthServiceClient::with_interceptor(channel, credentials.clone()),
            shutdown.clone(),
        )
        .await?
    };
    let edge = match config.apigateway {
        Some(_) => Edge::integration(edge_id),
        None => Edge::new(edge_id, config.outbound_queue),
    };
    let dial = move |url: &str, address| {
        Ok(EdgeServiceClient::with_interceptor(
            replica_channel(url, address, &trust, timeout, None)?,
            credentials.clone(),
        ))
    };
    let upstream = tokio::spawn(edge.clone().follow_replicas(
        url_list(&config.connection_endpoint, &config.trust)?,
        dial,
        shutdown.clone(),
    ));
    let sockets = TaskTracker::new();
    let http_limits = (config.header_read_timeout, config.send_buffer);
    let ready = {
        let edge = edge.clone();
        move || ready(edge.clone())
    };
    let integration = config.apigateway.clone();
    let state = AppState {
        edge: edge.clone(),
        auth,
        slots: Arc::new(Semaphore::new(config.max_connections)),
        handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
        per_ip: Arc::new(PerIpRate::new(
            config.connection_rate_per_ip,
            config.connection_burst_per_ip,
        )),
        config: Arc::new(config),
        sockets: sockets.clone(),
    };
    let app = match integration {
        Some(integration) => apigateway::routes(apigateway::IntegrationState {
            edge: edge.clone(),
            auth: state.auth.clone(),
            config: state.config.clone(),
            integration: Arc::new(integration),
        }),
        None => Router::new()
            .route("/", get(connect))
            .route("/ws", get(connect))
            .with_state(state),
    }
    .route("/healthz", get(|| async { "ok" }))
    .route("/readyz", get(ready));
    let local = listener.local_addr()?;
    if edge.is_integration() {
        tracing::info!(address = %local, edge_id = %edge.edge_id, "API Gateway integration listening");
    } else {
        tracing::info!(address = %local, edge_id = %edge.edge_id, "websocket edge listening");
    }
    let stopping = shutdown.clone();
    http::serve(listener, app, http_limits, async move {
        stopping.cancelled().await
    })
    .await;

    edge.close_all(1001, "server shutting down");
    sockets.close();
    if tokio::time::timeout(Duration::from_secs(10), sockets.wait())
        .await
        .is_err()
    {
        tracing::warn!("sockets still open after 10 s; closing anyway");
    }
    let _ = upstream.await;
    tracing::info!(address = %local, "websocket edge stopped");
    Ok(())
}

async fn ready(edge: Arc<Edge>) -> Response {
    if edge.is_attached() {
        // Which replicas, for whoever looks (a rollout, a test).
        let replicas = edge.attached_replicas();
        (
            StatusCode::OK,
            format!("ready: attached to {replicas} connection service replica(s)"),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not attached to connection service",
        )
            .into_response()
    }
}

fn unauthorized(reason: &str, message: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": message, "code": "UNAUTHORIZED", "reason": reason })),
    )
        .into_response()
}

fn forbidden(message: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({ "error": message, "code": "FORBIDDEN" })),
    )
        .into_response()
}

fn unavailable(message: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        Json(json!({ "error": message, "code": "UNAVAILABLE" })),
    )
        .into_response()
}

/// The subprotocol the edge speaks, selected when a client offers it.
pub const SUBPROTOCOL: &str = "streamer";
/// A subprotocol `bearer.<JWT>` carries the token for browsers, which
/// cannot set an `Authorization` header on a WebSocket and should not put
/// it in the URL (where proxies log it).
const SUBPROTOCOL_TOKEN_PREFIX: &str = "bearer.";

/// The token from `?Authorization=`, `?token=`, `Authorization: Bearer`, or
/// a `bearer.<JWT>` entry of `Sec-WebSocket-Protocol`.
fn token(query: &std::collections::HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
    let from_subprotocol = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix(SUBPROTOCOL_TOKEN_PREFIX)
                .map(str::to_owned)
        });
    if from_subprotocol.is_some() {
        return from_subprotocol.filter(|t| !t.is_empty());
    }
    let from_query = query
        .get("Authorization")
        .or_else(|| query.get("authorization"))
        .or_else(|| query.get("token"))
        .cloned();
    let from_header = || {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_owned())
    };
    from_query
        .or_else(from_header)
        .map(|t| t.strip_prefix("Bearer ").map(str::to_owned).unwrap_or(t))
        .filter(|t| !t.is_empty())
}

/// The monotonic instant of a wall-clock timestamp (now, if it is past).
fn instant_of(at: prost_types::Timestamp) -> Option<tokio::time::Instant> {
    let at = std::time::SystemTime::try_from(at).ok()?;
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(tokio::time::Instant::now() + left)
}

/// The socket a `refresh` is for, and whom it was opened for.
struct Subject {
    edge: Arc<Edge>,
    connection_id: ConnectionId,
    user_id: UserId,
    tenant_id: TenantId,
}

/// Validates the fresh tokens one socket's client sends: they must be
/// valid, and name the user and tenant the socket was opened for. An
/// accepted token is the one the edge announces the connection with from
/// then on.
fn refresher(auth: AuthReplicas, timeout: Duration, subject: Subject) -> socket::Refresh {
    let subject = Arc::new(subject);
    Arc::new(move |token| {
        let auth = auth.clone();
        let subject = subject.clone();
        Box::pin(async move {
            let Some(answer) = validate(&auth, &token, timeout).await else {
                return Err("authentication service unavailable; try again".to_owned());
            };
            let claims = match answer.claims {
                Some(claims) if answer.valid => claims,
                _ => {
                    let failure = TokenFailure::try_from(answer.failure).unwrap_or_default();
                    return Err(refusal(failure, &answer.message).1);
                }
            };
            if subject.user_id != *claims.user_id || subject.tenant_id != *claims.tenant_id {
                return Err("the token is for another user or tenant".to_owned());
            }
            let expires_at = claims
                .expires_at
                .and_then(instant_of)
                .ok_or_else(|| "the token has no expiry".to_owned())?;
            subject.edge.refreshed(&subject.connection_id, token);
            Ok(expires_at)
        })
    })
}

/// The client's token and what AuthService says it holds, or the answer
/// that refuses the client: 401 with the reason (no token, or not a valid
/// one), 503 when AuthService does not answer. The WebSocket edge and API
/// Gateway's integration check clients with this one function.
async fn authenticate(
    auth: &AuthReplicas,
    query: &std::collections::HashMap<String, String>,
    headers: &HeaderMap,
    timeout: Duration,
) -> Result<(String, v1::Claims), Box<Response>> {
    let Some(token) = token(query, headers) else {
        metrics::counter!("streamer_gateway_auth_failures_total", "reason" => "missing_token")
            .increment(1);
        return Err(Box::new(unauthorized("missing_token", "missing token")));
    };
    let Some(answer) = validate(auth, &token, timeout).await else {
        metrics::counter!("streamer_gateway_auth_failures_total", "reason" => "auth_unavailable")
            .increment(1);
        return Err(Box::new(unavailable("authentication service unavailable")));
    };
    match answer.claims {
        Some(claims) if answer.valid => Ok((token, claims)),
        _ => {
            let failure = TokenFailure::try_from(answer.failure).unwrap_or_default();
            let (reason, message) = refusal(failure, &answer.message);
            metrics::counter!("streamer_gateway_auth_failures_total", "reason" => reason)
                .increment(1);
            Err(Box::new(unauthorized(reason, &message)))
        }
    }
}

/// The record a new connection is announced with: now, for the identity
/// its token's `claims` name (the client's user agent and address cut to
/// 256 and 64 characters).
fn new_record(
    connection_id: &ConnectionId,
    edge_id: &EdgeId,
    claims: v1::Claims,
    user_agent: &str,
    client_ip: &str,
) -> v1::Connection {
    let now = prost_types::Timestamp::from(std::time::SystemTime::now());
    v1::Connection {
        connection_id: connection_id.to_string(),
        identity: Some(v1::Identity {
            user_id: claims.user_id,
            tenant_id: claims.tenant_id,
            permissions: claims.permissions,
            topics: claims.topics,
        }),
        edge_id: edge_id.to_string(),
        connected_at: Some(now),
        last_seen: Some(now),
        user_agent: user_agent.chars().take(256).collect(),
        client_ip: client_ip.chars().take(64).collect(),
        expires_at: None,
        apigateway: None,
    }
}

/// A socket being authenticated and announced: counted in
/// `streamer_gateway_connections{state="opening"}` while it lives.
struct Opening;

impl Opening {
    fn start() -> Self {
        metrics::gauge!("streamer_gateway_connections", "state" => "opening").increment(1.0);
        Opening
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        metrics::gauge!("streamer_gateway_connections", "state" => "opening").decrement(1.0);
    }
}

/// The short reason and the message of a refusal.
fn refusal(failure: TokenFailure, message: &str) -> (&'static str, String) {
    match failure {
        TokenFailure::Missing => ("missing_token", "missing token".into()),
        TokenFailure::Expired => ("token_expired", "token expired".into()),
        TokenFailure::TenantNotAllowed => ("tenant_not_allowed", "tenant not allowed".into()),
        TokenFailure::Revoked => ("token_revoked", "token revoked".into()),
        _ => ("invalid_token", format!("invalid token: {message}")),
    }
}

async fn connect(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // Capacity first: past it, nothing else is spent on the caller (not
    // even an AuthService call). The slot is held for the socket's life.
    let Ok(slot) = state.slots.clone().try_acquire_owned() else {
        metrics::counter!("streamer_gateway_connections_refused_total", "reason" => "capacity")
            .increment(1);
        return unavailable("this edge is at capacity; try again");
    };
    if !state.per_ip.admit(peer.ip(), tokio::time::Instant::now()) {
        metrics::counter!("streamer_gateway_connections_refused_total", "reason" => "address_rate")
            .increment(1);
        return unavailable("too many new connections from this address; try again");
    }
    let Ok(permit) = state.handshakes.clone().try_acquire_owned() else {
        metrics::counter!("streamer_gateway_connections_refused_total", "reason" => "handshakes")
            .increment(1);
        return unavailable("too many connections being opened; try again");
    };
    let handshake = (permit, Opening::start());
    if let Some(origin) = headers.get(header::ORIGIN)
        && !state.config.allowed_origins.is_empty()
        && !state
            .config
            .allowed_origins
            .iter()
            .any(|allowed| origin.as_bytes() == allowed.as_bytes())
    {
        metrics::counter!("streamer_gateway_connections_refused_total", "reason" => "origin")
            .increment(1);
        return forbidden("origin not allowed");
    }
    // Then authentication: an unauthenticated caller learns nothing else,
    // not even whether it spoke WebSocket correctly.
    let timeout = state.config.control_plane_timeout;
    // The upgrade's span: a child of the caller's when its request carries a
    // `traceparent` header.
    let span = tracing::info_span!(
        "edge.connect",
        otel.kind = "server",
        connection_id = tracing::field::Empty,
        tenant_id = tracing::field::Empty,
    );
    streamer_core::trace::continue_from(&span, [streamer_core::trace::from_headers(&headers)]);
    let (token, claims) = match authenticate(&state.auth, &query, &headers, timeout)
        .instrument(span.clone())
        .await
    {
        Ok(checked) => checked,
        Err(refused) => return *refused,
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };

    let connection_id = ConnectionId::from(uuid::Uuid::new_v4().to_string());
    let session = socket::Session {
        expires_at: claims.expires_at.and_then(instant_of),
        refresh: refresher(
            state.auth.clone(),
            timeout,
            Subject {
                edge: state.edge.clone(),
                connection_id: connection_id.clone(),
                user_id: UserId::from(claims.user_id.as_str()),
                tenant_id: TenantId::from(claims.tenant_id.as_str()),
            },
        ),
    };
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let record = new_record(
        &connection_id,
        &state.edge.edge_id,
        claims,
        user_agent,
        &peer.ip().to_string(),
    );
    span.record("connection_id", connection_id.as_str());
    if let Some(identity) = &record.identity {
        span.record("tenant_id", identity.tenant_id.as_str());
    }
    let registered = match state
        .edge
        .register(record, token, timeout)
        .instrument(span)
        .await
    {
        Ok(registered) => registered,
        Err(RegisterError::Detached) => {
            return unavailable("connection service unavailable");
        }
        Err(RegisterError::Refused) => {
            return unavailable("connection could not be registered");
        }
    };
    tracing::info!(connection_id = %connection_id, client_ip = %peer.ip(), "client connected");
    drop(handshake);

    let edge = state.edge.clone();
    let failed_edge = state.edge.clone();
    let failed_id = connection_id.clone();
    let limits = state.config.limits;
    let sockets = state.sockets.clone();
    upgrade
        // Never the token's entry: that would echo it back in a header.
        .protocols([SUBPROTOCOL])
        // The limit holds as the frame arrives: nothing larger is buffered,
        // and the socket is closed with 1009.
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        // What an idle socket costs is mostly its read buffer, allocated
        // whole at the upgrade: 128 KiB by default. Client frames are small;
        // a larger one grows the buffer for as long as it needs.
        .read_buffer_size(SOCKET_READ_BUFFER)
        .on_failed_upgrade(move |error| {
            tracing::info!(%error, connection_id = %failed_id, "upgrade failed");
            failed_edge.forget(&failed_id);
            let edge = failed_edge.clone();
            let id = failed_id.clone();
            tokio::spawn(async move {
                edge.emit(v1::attach_request::Event::Closed(v1::ConnectionClosed {
                    connection_id: id.into(),
                    code: 1006,
                    reason: "upgrade failed".into(),
                }))
                .await;
            });
        })
        .on_upgrade(move |socket| {
            sockets.track_future(async move {
                socket::run(socket, connection_id, registered, edge, limits, session).await;
                drop(slot);
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comes_from_query_or_header() {
        let mut query = std::collections::HashMap::new();
        let mut headers = HeaderMap::new();
        assert_eq!(token(&query, &headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(token(&query, &headers).as_deref(), Some("abc"));
        query.insert("token".into(), "def".into());
        assert_eq!(token(&query, &headers).as_deref(), Some("def"));
        query.insert("Authorization".into(), "Bearer ghi".into());
        assert_eq!(token(&query, &headers).as_deref(), Some("ghi"));
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "streamer, bearer.jkl".parse().unwrap(),
        );
        assert_eq!(token(&query, &headers).as_deref(), Some("jkl"));
    }

    #[test]
    fn refusals_name_the_reason() {
        assert_eq!(refusal(TokenFailure::Expired, "x").0, "token_expired");
        assert_eq!(refusal(TokenFailure::Missing, "x").0, "missing_token");
        assert_eq!(
            refusal(TokenFailure::TenantNotAllowed, "x").0,
            "tenant_not_allowed"
        );
        assert_eq!(refusal(TokenFailure::Revoked, "x").0, "token_revoked");
        let (reason, message) = refusal(TokenFailure::BadSignature, "signature does not verify");
        assert_eq!(reason, "invalid_token");
        assert!(message.contains("signature"));
    }
}
