//! AWS API Gateway's integration end to end: a whole system whose
//! ConnectionService delivers through API Gateway's management API (a
//! fault-injecting server in its place), and an edge in integration mode
//! called as API Gateway calls it (`$connect`, `$default`, `$disconnect`
//! with API Gateway's event shape). Tokens are checked as the WebSocket
//! edge checks them, frames take the same routing, answers and deliveries
//! come back as posts to the connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apigateway.rs"]
mod apigateway_support;
mod support;

use apigateway_support::{FaultServer, post_json, system_with_integration};
use serde_json::{Value, json};
use streamer_api::v1;
use streamer_auth::dev::MintOptions;
use streamer_gateway::apigateway::SECRET_HEADER;
use support::{TestSystem, eventually, within};

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes";

struct Integration {
    system: TestSystem,
    management: FaultServer,
    address: std::net::SocketAddr,
}

/// The system, API Gateway's management API in its place, and the
/// integration attached to the system.
async fn start() -> Integration {
    let management = FaultServer::start().await;
    let endpoint = format!("http://{}/{{stage}}", management.address);
    let (system, address) = system_with_integration(endpoint, SECRET).await;
    Integration {
        system,
        management,
        address,
    }
}

/// The event API Gateway sends for `route` on connection `id`.
fn event(route: &str, id: &str, token: Option<&str>, body: Option<&str>) -> Value {
    let mut event = json!({
        "requestContext": {
            "routeKey": route,
            "eventType": match route { "$connect" => "CONNECT", "$disconnect" => "DISCONNECT", _ => "MESSAGE" },
            "connectionId": id,
            "domainName": "abc123.execute-api.eu-west-1.amazonaws.com",
            "stage": "prod",
            "apiId": "abc123",
            "identity": {"sourceIp": "198.51.100.7", "userAgent": "test-client/1.0"},
        },
        "isBase64Encoded": false,
    });
    if let Some(token) = token {
        event["queryStringParameters"] = json!({ "Authorization": token });
    }
    if let Some(body) = body {
        event["body"] = json!(body);
    }
    event
}

impl Integration {
    /// POSTs `event` to the integration's `path` with `secret`: status and
    /// JSON body.
    async fn call(&self, path: &str, event: &Value, secret: Option<&str>) -> (u16, Value) {
        let headers: Vec<(&str, &str)> = secret.map(|s| (SECRET_HEADER, s)).into_iter().collect();
        let (status, body) = within(
            "the integration answers",
            post_json(self.address, path, event, &headers),
        )
        .await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn connect(&self, id: &str, token: Option<&str>) -> (u16, Value) {
        self.call(
            "/apigateway/connect",
            &event("$connect", id, token, None),
            Some(SECRET),
        )
        .await
    }

    async fn frame(&self, id: &str, frame: &str) -> u16 {
        self.call(
            "/apigateway/default",
            &event("$default", id, None, Some(frame)),
            Some(SECRET),
        )
        .await
        .0
    }

    /// What was posted to `id`, as JSON, once there are `n` posts.
    async fn posted(&self, id: &str, n: usize) -> Vec<Value> {
        eventually("posts to the connection", || async {
            self.management.calls(id).len() >= n
        })
        .await;
        self.management
            .calls(id)
            .into_iter()
            .map(|c| serde_json::from_slice(&c.body).unwrap())
            .collect()
    }
}

#[tokio::test]
async fn connect_checks_the_token_and_records_where_api_gateway_holds_it() {
    let it = start().await;
    let token = it.system.token("alice", "acme");
    let (status, _) = it.connect("Xk3J8cD2oAMCJ_Q=", Some(&token)).await;
    assert_eq!(status, 200);

    let mut connections = it.system.connections().await;
    let record = connections
        .get_connection(v1::GetConnectionRequest {
            connection_id: "Xk3J8cD2oAMCJ_Q=".into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap();
    assert_eq!(record.edge_id, "apigateway");
    assert_eq!(record.client_ip, "198.51.100.7");
    let location = record.apigateway.unwrap();
    assert_eq!(location.stage, "prod");
    assert_eq!(
        location.domain_name,
        "abc123.execute-api.eu-west-1.amazonaws.com"
    );
    assert_eq!(record.identity.unwrap().user_id, "alice");

    let sent = connections
        .send(support::send("Xk3J8cD2oAMCJ_Q=", json!({"hello": "alice"})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.outcome(), v1::DeliveryOutcome::Delivered);
    let posted = it.posted("Xk3J8cD2oAMCJ_Q=", 1).await;
    assert_eq!(posted, vec![json!({"hello": "alice"})]);
    assert_eq!(it.management.calls("Xk3J8cD2oAMCJ_Q=")[0].stage, "prod");
}

#[tokio::test]
async fn bad_tokens_and_unauthenticated_calls_are_refused_and_record_nothing() {
    let it = start().await;
    let (status, body) = it.connect("c-none", None).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("missing_token"))
    );
    let expired = it.system.mint(MintOptions {
        sub: "bob".into(),
        tenant: "acme".into(),
        expired: true,
        ..MintOptions::default()
    });
    let (status, body) = it.connect("c-expired", Some(&expired)).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("token_expired"))
    );
    let (status, body) = it.connect("c-garbage", Some("not.a.token")).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("invalid_token"))
    );

    // Not API Gateway: no secret, or a wrong one; a malformed event.
    let token = it.system.token("carol", "acme");
    let connect = event("$connect", "c-secret", Some(&token), None);
    assert_eq!(it.call("/apigateway/connect", &connect, None).await.0, 403);
    let wrong = "x".repeat(40);
    assert_eq!(
        it.call("/apigateway/connect", &connect, Some(&wrong))
            .await
            .0,
        403
    );
    let (status, body) = it
        .call(
            "/apigateway/connect",
            &json!({"not": "an event"}),
            Some(SECRET),
        )
        .await;
    assert_eq!(status, 400, "{body}");

    let mut connections = it.system.connections().await;
    let listed = connections
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.connections.is_empty(), "{listed:?}");
}

#[tokio::test]
async fn frames_are_routed_and_answered_through_api_gateway() {
    let it = start().await;
    let token = it.system.mint(MintOptions {
        sub: "dave".into(),
        tenant: "acme".into(),
        topics: vec!["orders/*".into()],
        ..MintOptions::default()
    });
    assert_eq!(it.connect("Dd4=", Some(&token)).await.0, 200);

    // A malformed frame is answered by the integration, posted back.
    assert_eq!(it.frame("Dd4=", "{not json").await, 200);
    let posted = it.posted("Dd4=", 1).await;
    assert_eq!(posted[0]["type"], "error");
    assert_eq!(posted[0]["error"]["code"], "VALIDATION_ERROR");

    // A built-in action goes to ConnectionService, which answers by post.
    let subscribe = json!({"action": "subscribe", "id": "s1", "payload": {"topic": "orders/42"}});
    assert_eq!(it.frame("Dd4=", &subscribe.to_string()).await, 200);
    let posted = it.posted("Dd4=", 2).await;
    assert_eq!(posted[1]["type"], "response", "{posted:?}");
    assert_eq!(posted[1]["request_id"], "s1");
    assert_eq!(posted[1]["success"], true);

    // An action nobody serves is refused to the client the same way.
    let unknown = json!({"action": "no_such_action", "id": "u1", "payload": {}});
    assert_eq!(it.frame("Dd4=", &unknown.to_string()).await, 200);
    let posted = it.posted("Dd4=", 3).await;
    assert_eq!(posted[2]["type"], "error", "{posted:?}");
    assert_eq!(posted[2]["request_id"], "u1");

    // The subscription is live: a publish reaches it.
    let mut connections = it.system.connections().await;
    let published = connections
        .publish(v1::PublishRequest {
            tenant_id: "acme".into(),
            topic: "orders/42".into(),
            payload: support::json_payload(json!({"status": "shipped"})),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.delivered, 1);
    let posted = it.posted("Dd4=", 4).await;
    assert_eq!(posted[3]["type"], "message");
    assert_eq!(posted[3]["data"], json!({"status": "shipped"}));
}

#[tokio::test]
async fn disconnect_removes_the_connection() {
    let it = start().await;
    let token = it.system.token("erin", "acme");
    assert_eq!(it.connect("Ee5=", Some(&token)).await.0, 200);
    let (status, _) = it
        .call(
            "/apigateway/disconnect",
            &event("$disconnect", "Ee5=", None, None),
            Some(SECRET),
        )
        .await;
    assert_eq!(status, 200);
    let mut connections = it.system.connections().await;
    eventually("the record to go", || {
        let mut connections = connections.clone();
        async move {
            connections
                .is_active(v1::IsActiveRequest {
                    connection_id: "Ee5=".into(),
                })
                .await
                .is_ok_and(|a| !a.into_inner().active)
                && connections
                    .get_connection(v1::GetConnectionRequest {
                        connection_id: "Ee5=".into(),
                        tenant_id: String::new(),
                    })
                    .await
                    .is_err()
        }
    })
    .await;
    let gone = connections
        .send(support::send("Ee5=", json!({"late": true})))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
}
