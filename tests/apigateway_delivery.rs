//! ConnectionService delivering to connections AWS API Gateway holds, over
//! its real gRPC API: `Send`, broadcasts, topic publishes, `IsActive` and
//! `Disconnect` become management API calls (to a fault-injecting server in
//! API Gateway's place), a 410 removes the connection, a message over
//! 128 KB is refused before any call, and neither a restart nor an edge can
//! take API Gateway's connections away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apigateway.rs"]
mod apigateway_support;
mod support;

use std::sync::Arc;
use std::time::Duration;

use apigateway_support::{FaultServer, ManualClock, Reply};
use axum::http::Method;
use futures::StreamExt as _;
use streamer_api::v1::{
    self, DeliveryOutcome, connection_service_client::ConnectionServiceClient,
    edge_service_client::EdgeServiceClient,
};
use streamer_connection::apigateway::{ApiGatewayConfig, PostPolicy, SdkManagementApi};
use streamer_connection::service::ConnectionConfig;
use streamer_core::shutdown::Shutdown;
use streamer_core::store::{
    APIGATEWAY_EDGE_ID, ApiGatewayConnection, ConnectionRecord, SharedStore, now_ms,
};
use support::within;
use tonic::transport::Channel;

/// A running ConnectionService (it stops with `shutdown`, or with the test).
struct System {
    client: ConnectionServiceClient<Channel>,
    edge_address: std::net::SocketAddr,
    store: SharedStore,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

/// ConnectionService alone, on an embedded store in `dir`, posting to
/// `server` for API Gateway.
async fn start(server: &FaultServer, dir: tempfile::TempDir) -> System {
    let store: SharedStore =
        Arc::new(streamer_core::store::EmbeddedStore::open(dir.path()).unwrap());
    start_on(server, store, dir).await
}

/// The same, on `store`.
async fn start_on(server: &FaultServer, store: SharedStore, dir: tempfile::TempDir) -> System {
    let config = ConnectionConfig {
        progress_endpoint: None,
        auth_endpoint: None,
        // As in `streamer all`: every edge's record is stale at a start.
        connections_stale_at_start: true,
        apigateway: Some(ApiGatewayConfig {
            endpoint: format!("http://{}/{{stage}}", server.address),
            policy: PostPolicy {
                attempt_timeout: Duration::from_secs(2),
                ..PostPolicy::default()
            },
            ..ApiGatewayConfig::new(Arc::new(SdkManagementApi::local()))
        }),
        ..ConnectionConfig::default()
    };
    // Retry waits are not slept.
    let config = ConnectionConfig {
        apigateway: config.apigateway.map(|a| ApiGatewayConfig {
            clock: ManualClock::new(),
            ..a
        }),
        ..config
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let edge_address = edge_listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(streamer::run_connection(
        listener,
        edge_listener,
        store.clone(),
        config,
        shutdown.clone(),
    ));
    // The listener accepts before the service serves; its first answer
    // comes once it has started (and settled what a previous run left).
    let mut client = ConnectionServiceClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy(),
    );
    let answer = within(
        "ConnectionService answers",
        client.is_active(v1::IsActiveRequest {
            connection_id: "nobody".into(),
        }),
    )
    .await;
    assert!(!answer.unwrap().into_inner().active);
    System {
        client,
        edge_address,
        store,
        shutdown,
        _dir: dir,
    }
}

/// A connection API Gateway holds, recorded as `$connect` records it.
fn apigateway_connection(id: &str, tenant: &str, user: &str) -> ConnectionRecord {
    let now = now_ms();
    ConnectionRecord {
        connection_id: id.into(),
        user_id: user.into(),
        tenant_id: tenant.into(),
        permissions: Vec::new(),
        topics: Vec::new(),
        edge_id: APIGATEWAY_EDGE_ID.into(),
        connected_at_ms: now,
        last_seen_ms: now,
        user_agent: String::new(),
        client_ip: "192.0.2.1".into(),
        apigateway: Some(ApiGatewayConnection {
            domain_name: "abc123.execute-api.eu-west-1.amazonaws.com".into(),
            stage: "prod".into(),
        }),
    }
}

/// Sends `payload` to `id` through ConnectionService: its outcome.
async fn send(system: &mut System, id: &str, payload: Option<v1::Payload>) -> DeliveryOutcome {
    system
        .client
        .send(v1::SendRequest {
            connection_id: id.into(),
            payload,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .outcome()
}

fn text(s: &str) -> Option<v1::Payload> {
    Some(v1::Payload {
        body: Some(v1::payload::Body::Text(s.into())),
    })
}

fn bodies(server: &FaultServer, id: &str) -> Vec<String> {
    server
        .calls(id)
        .into_iter()
        .filter(|c| c.method == Method::POST)
        .map(|c| String::from_utf8(c.body.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn sends_broadcasts_and_publishes_are_posted_to_api_gateway() {
    let server = FaultServer::start().await;
    let mut system = start(&server, tempfile::tempdir().unwrap()).await;
    for (id, tenant, user) in [
        ("Aa1=", "t1", "alice"),
        ("Bb2=", "t1", "bob"),
        ("Cc3=", "t2", "carol"),
    ] {
        system
            .store
            .put_connection(apigateway_connection(id, tenant, user))
            .await
            .unwrap();
    }

    assert_eq!(
        send(&mut system, "Aa1=", text("to alice")).await,
        DeliveryOutcome::Delivered
    );
    assert_eq!(server.calls("Aa1=")[0].stage, "prod");

    let tenant = system
        .client
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                tenant_id: "t1".into(),
            })),
            payload: text("to t1"),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tenant.delivered, 2, "{tenant:?}");
    let user = system
        .client
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::User(v1::UserTarget {
                tenant_id: "t1".into(),
                user_id: "bob".into(),
            })),
            payload: text("to bob"),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.delivered, 1, "{user:?}");

    system
        .client
        .subscribe(v1::SubscribeRequest {
            tenant_id: "t1".into(),
            topic: "orders/42".into(),
            target: Some(v1::subscribe_request::Target::ConnectionId("Bb2=".into())),
        })
        .await
        .unwrap();
    let published = system
        .client
        .publish(v1::PublishRequest {
            tenant_id: "t1".into(),
            topic: "orders/42".into(),
            payload: text("shipped"),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.delivered, 1, "{published:?}");

    assert_eq!(bodies(&server, "Aa1="), vec!["to alice", "to t1"]);
    let bob = bodies(&server, "Bb2=");
    assert_eq!(bob[..2], ["to t1", "to bob"]);
    let message: serde_json::Value = serde_json::from_str(&bob[2]).unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["topic"], "orders/42");
    assert_eq!(message["offset"], 1);
    assert_eq!(message["data"], "shipped");
    assert_eq!(bob.len(), 3);
    assert!(
        server.calls("Cc3=").is_empty(),
        "another tenant's connection"
    );
}

#[tokio::test]
async fn a_connection_api_gateway_says_is_gone_is_removed_with_its_subscriptions() {
    let server = FaultServer::start().await;
    let mut system = start(&server, tempfile::tempdir().unwrap()).await;
    for id in ["Aa1=", "Bb2="] {
        system
            .store
            .put_connection(apigateway_connection(id, "t1", id))
            .await
            .unwrap();
    }
    system
        .client
        .subscribe(v1::SubscribeRequest {
            tenant_id: "t1".into(),
            topic: "news".into(),
            target: Some(v1::subscribe_request::Target::ConnectionId("Bb2=".into())),
        })
        .await
        .unwrap();

    server.script("Aa1=", [Reply::Status(410, "GoneException")]);
    assert_eq!(
        send(&mut system, "Aa1=", text("hello?")).await,
        DeliveryOutcome::Gone
    );
    assert!(
        system
            .store
            .get_connection(&"Aa1=".into())
            .await
            .unwrap()
            .is_none()
    );

    // In a fan-out too: counted, and the record and subscription go.
    server.script("Bb2=", [Reply::Status(410, "GoneException")]);
    let published = system
        .client
        .publish(v1::PublishRequest {
            tenant_id: "t1".into(),
            topic: "news".into(),
            payload: text("read all about it"),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.delivered, 0);
    assert!(
        system
            .store
            .get_connection(&"Bb2=".into())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        system
            .store
            .subscribers(&"t1".into(), "news", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_oversized_message_is_rejected_and_the_connection_stays() {
    let server = FaultServer::start().await;
    let mut system = start(&server, tempfile::tempdir().unwrap()).await;
    system
        .store
        .put_connection(apigateway_connection("Aa1=", "t1", "alice"))
        .await
        .unwrap();
    assert_eq!(
        send(&mut system, "Aa1=", text(&"x".repeat(200 * 1024))).await,
        DeliveryOutcome::Rejected
    );
    assert!(server.calls("Aa1=").is_empty());
    assert!(
        system
            .store
            .get_connection(&"Aa1=".into())
            .await
            .unwrap()
            .is_some()
    );

    server.script("Aa1=", [Reply::Status(403, "ForbiddenException")]);
    let broadcast = system
        .client
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                tenant_id: "t1".into(),
            })),
            payload: text("small"),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (broadcast.delivered, broadcast.rejected),
        (0, 1),
        "{broadcast:?}"
    );
}

#[tokio::test]
async fn is_active_asks_api_gateway_and_disconnect_deletes_the_connection() {
    let server = FaultServer::start().await;
    let mut system = start(&server, tempfile::tempdir().unwrap()).await;
    for id in ["Aa1=", "Bb2="] {
        system
            .store
            .put_connection(apigateway_connection(id, "t1", id))
            .await
            .unwrap();
    }
    let active = |id: &str| v1::IsActiveRequest {
        connection_id: id.into(),
    };
    assert!(
        system
            .client
            .is_active(active("Aa1="))
            .await
            .unwrap()
            .into_inner()
            .active
    );
    server.script("Bb2=", [Reply::Status(410, "GoneException")]);
    assert!(
        !system
            .client
            .is_active(active("Bb2="))
            .await
            .unwrap()
            .into_inner()
            .active
    );

    system
        .client
        .disconnect(v1::DisconnectRequest {
            connection_id: "Aa1=".into(),
            reason: "bye".into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap();
    let methods: Vec<Method> = server.calls("Aa1=").into_iter().map(|c| c.method).collect();
    assert_eq!(methods, vec![Method::GET, Method::DELETE]);
    assert!(
        system
            .store
            .get_connection(&"Aa1=".into())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_restart_leaves_api_gateways_connections_and_removes_the_edges() {
    let server = FaultServer::start().await;
    let first = start(&server, tempfile::tempdir().unwrap()).await;
    let store = first.store.clone();
    store
        .put_connection(apigateway_connection("Aa1=", "t1", "alice"))
        .await
        .unwrap();
    store
        .put_connection(ConnectionRecord {
            edge_id: "edge-1".into(),
            apigateway: None,
            ..apigateway_connection("on-an-edge", "t1", "bob")
        })
        .await
        .unwrap();
    let System { shutdown, _dir, .. } = first;
    shutdown.cancel();

    // A new ConnectionService on the same store: the edge's connection was
    // this process's and is stale; API Gateway's is not.
    let mut second = start_on(&server, store, _dir).await;
    assert!(
        second
            .store
            .get_connection(&"on-an-edge".into())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        send(&mut second, "Aa1=", text("still here")).await,
        DeliveryOutcome::Delivered
    );
}

#[tokio::test]
async fn no_edge_may_attach_under_api_gateways_edge_id() {
    let server = FaultServer::start().await;
    let system = start(&server, tempfile::tempdir().unwrap()).await;
    let mut edges = EdgeServiceClient::connect(format!("http://{}", system.edge_address))
        .await
        .unwrap();
    let hello = v1::AttachRequest {
        event: Some(v1::attach_request::Event::Hello(v1::EdgeHello {
            edge_id: APIGATEWAY_EDGE_ID.into(),
            ..Default::default()
        })),
    };
    let status = edges
        .attach(futures::stream::iter([hello]).chain(futures::stream::pending()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("reserved"), "{status:?}");
}
