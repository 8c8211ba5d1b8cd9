//! Issue: the contract, the four processes, and connections end to end:
//! real servers on ephemeral ports, real WebSocket clients, generated
//! tonic clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use streamer_api::v1::{self, DeliveryOutcome};
use streamer_auth::dev::MintOptions;
use support::{TestSystem, eventually, http_get, json_payload, send, within};
use tokio_tungstenite::tungstenite;

#[tokio::test]
async fn a_valid_token_connects_and_receives_a_send() {
    let system = TestSystem::start().await;
    let (mut client, id) = system.connect_found("alice", "acme").await;
    let mut connections = system.connections().await;
    let outcome = connections
        .send(send(&id, json!({"type": "response", "data": {"n": 1}})))
        .await
        .unwrap()
        .into_inner()
        .outcome;
    assert_eq!(outcome, DeliveryOutcome::Delivered as i32);
    // A backend's payload arrives as it was written, whatever its shape.
    assert_eq!(
        client.recv_backend_json().await,
        json!({"type": "response", "data": {"n": 1}})
    );

    let record = connections
        .get_connection(v1::GetConnectionRequest {
            connection_id: id.clone(),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap();
    let identity = record.identity.unwrap();
    assert_eq!(
        (identity.user_id.as_str(), identity.tenant_id.as_str()),
        ("alice", "acme")
    );
    assert_eq!(identity.permissions, ["read", "write"]);
    assert_eq!(record.client_ip, "127.0.0.1");
    assert!(record.expires_at.unwrap().seconds > record.last_seen.unwrap().seconds + 86_000);
    assert!(
        connections
            .is_active(v1::IsActiveRequest { connection_id: id })
            .await
            .unwrap()
            .into_inner()
            .active
    );
}

#[tokio::test]
async fn text_and_binary_payloads_arrive_as_such() {
    let system = TestSystem::start().await;
    let (mut client, id) = system.connect_found("alice", "acme").await;
    let mut connections = system.connections().await;
    for body in [
        v1::payload::Body::Text("plain words".into()),
        v1::payload::Body::Binary(vec![0, 1, 2, 255]),
    ] {
        connections
            .send(v1::SendRequest {
                connection_id: id.clone(),
                payload: Some(v1::Payload { body: Some(body) }),
                tenant_id: String::new(),
                sequence: None,
            })
            .await
            .unwrap();
    }
    use futures::StreamExt;
    let first = within("text", client.ws.next()).await.unwrap().unwrap();
    assert_eq!(first, tungstenite::Message::Text("plain words".into()));
    let second = within("binary", client.ws.next()).await.unwrap().unwrap();
    assert_eq!(
        second,
        tungstenite::Message::Binary(vec![0u8, 1, 2, 255].into())
    );
}

/// Broadcasts to a marker, then sends every socket a second marker: a
/// socket's first message tells whether the broadcast reached it, because
/// deliveries to one socket keep their order.
async fn received_broadcast(
    system: &TestSystem,
    clients: &mut [(support::WsClient, String)],
    target: v1::broadcast_request::Target,
) -> (Vec<bool>, v1::BroadcastResponse) {
    let mut connections = system.connections().await;
    let response = connections
        .broadcast(v1::BroadcastRequest {
            target: Some(target),
            payload: json_payload(json!({"kind": "broadcast"})),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut reached = Vec::new();
    for (client, id) in clients.iter_mut() {
        connections
            .send(send(id, json!({"kind": "marker"})))
            .await
            .unwrap();
        let first = client.recv_backend_json().await;
        if first["kind"] == "broadcast" {
            assert_eq!(client.recv_backend_json().await["kind"], "marker");
            reached.push(true);
        } else {
            assert_eq!(first["kind"], "marker");
            reached.push(false);
        }
    }
    (reached, response)
}

#[tokio::test]
async fn user_and_tenant_broadcasts_reach_exactly_the_right_sockets() {
    let system = TestSystem::start().await;
    let mut clients = Vec::new();
    // alice twice in acme, bob in acme, alice in globex (same user id, other tenant).
    clients.push(system.connect_found("alice", "acme").await);
    let second_alice = system.connect("alice", "acme").await;
    let mut connections = system.connections().await;
    let alice_ids = support::user_connection_ids(&mut connections, "acme", "alice").await;
    let second_id = alice_ids
        .iter()
        .find(|id| **id != clients[0].1)
        .unwrap()
        .clone();
    clients.push((second_alice, second_id));
    clients.push(system.connect_found("bob", "acme").await);
    clients.push(system.connect_found("alice", "globex").await);

    let (reached, response) = received_broadcast(
        &system,
        &mut clients,
        v1::broadcast_request::Target::User(v1::UserTarget {
            tenant_id: "acme".into(),
            user_id: "alice".into(),
        }),
    )
    .await;
    assert_eq!(reached, [true, true, false, false]);
    assert_eq!(response.delivered, 2);
    // A user or tenant is one fan-out per edge, answered with counts.
    assert!(response.results.is_empty(), "{:?}", response.results);

    let (reached, response) = received_broadcast(
        &system,
        &mut clients,
        v1::broadcast_request::Target::Tenant(v1::TenantTarget {
            tenant_id: "acme".into(),
        }),
    )
    .await;
    assert_eq!(reached, [true, true, true, false]);
    assert_eq!(response.delivered, 3);

    // A list of ids scoped to a tenant skips the other tenant's connection.
    let ids = clients.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>();
    let response = connections
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Connections(
                v1::ConnectionIds {
                    ids: [ids.clone(), vec!["no-such-connection".into()]].concat(),
                },
            )),
            payload: json_payload(json!({"kind": "list"})),
            tenant_id: "globex".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.delivered, 1);
    assert_eq!(response.not_found, 4);
    let delivered: Vec<_> = response
        .results
        .iter()
        .filter(|r| r.outcome == DeliveryOutcome::Delivered as i32)
        .map(|r| r.connection_id.clone())
        .collect();
    assert_eq!(delivered, [ids[3].clone()]);
}

#[tokio::test]
async fn a_call_scoped_to_one_tenant_never_reaches_another() {
    let system = TestSystem::start().await;
    let (_client, id) = system.connect_found("alice", "acme").await;
    let mut connections = system.connections().await;
    let status = connections
        .send(v1::SendRequest {
            tenant_id: "globex".into(),
            ..send(&id, json!({"x": 1}))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = connections
        .get_connection(v1::GetConnectionRequest {
            connection_id: id.clone(),
            tenant_id: "globex".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = connections
        .disconnect(v1::DisconnectRequest {
            connection_id: id.clone(),
            reason: "x".into(),
            tenant_id: "globex".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let listed = connections
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: "globex".into(),
            user_id: String::new(),
            page: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.connections.is_empty());
}

#[tokio::test]
async fn list_connections_pages_through_a_tenant() {
    let system = TestSystem::start().await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(system.connect(&format!("user-{i}"), "acme").await);
    }
    let mut connections = system.connections().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = connections
            .list_connections(v1::ListConnectionsRequest {
                tenant_id: "acme".into(),
                user_id: String::new(),
                page: Some(v1::PageRequest {
                    page_size: 2,
                    page_token: token.clone(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.connections.len() <= 2);
        seen.extend(page.connections.into_iter().map(|c| c.connection_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "every connection exactly once: {seen:?}");

    // Tokens are opaque, and only good for the listing that issued them.
    let first = connections
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: "acme".into(),
            user_id: String::new(),
            page: Some(v1::PageRequest {
                page_size: 2,
                page_token: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        first
            .connections
            .iter()
            .all(|c| !first.next_page_token.contains(&c.connection_id)),
        "the token does not show the last id: {}",
        first.next_page_token
    );
    let last_id = first.connections[1].connection_id.clone();
    for (user_id, page_token) in [
        ("user-1", first.next_page_token.clone()),
        ("", "garbage".to_owned()),
        ("", last_id),
    ] {
        let status = connections
            .list_connections(v1::ListConnectionsRequest {
                tenant_id: "acme".into(),
                user_id: user_id.into(),
                page: Some(v1::PageRequest {
                    page_size: 2,
                    page_token: page_token.clone(),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{page_token}: {status:?}"
        );
        assert!(status.message().contains("page.page_token"), "{status:?}");
    }
}

/// What a client library sends when handed a plain object for a
/// `google.protobuf.Value`: a Value with no kind. Refused, and nothing is
/// delivered; the next good message is the first the socket gets.
#[tokio::test]
async fn an_unset_value_payload_is_refused_and_not_delivered() {
    let system = TestSystem::start().await;
    let (mut client, id) = system.connect_found("alice", "acme").await;
    let mut connections = system.connections().await;
    let unset = Some(v1::Payload {
        body: Some(v1::payload::Body::Json(prost_types::Value { kind: None })),
    });
    let status = connections
        .send(v1::SendRequest {
            connection_id: id.clone(),
            payload: unset.clone(),
            tenant_id: String::new(),
            sequence: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("no kind set"), "{status:?}");
    let status = connections
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                tenant_id: "acme".into(),
            })),
            payload: unset,
            tenant_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    connections
        .send(v1::SendRequest {
            connection_id: id,
            payload: json_payload(json!({"n": 1})),
            tenant_id: String::new(),
            sequence: None,
        })
        .await
        .unwrap();
    assert_eq!(client.recv_backend_json().await, json!({"n": 1}));
}

async fn refused(system: &TestSystem, url: String) -> (u16, serde_json::Value) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("the connection should have been refused"),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.body().clone().unwrap_or_default();
            let _ = system;
            let body = serde_json::from_slice(&body).unwrap();
            support::schema::assert_conforms("HttpRefusal", &body);
            (status, body)
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn each_bad_token_gets_401_naming_its_reason() {
    let system = TestSystem::start_with(|config| {
        config.auth.allowed_tenants = Some(vec!["acme".into()]);
    })
    .await;
    let gateway = system.addrs.gateway;

    // Missing: no token at all, and an empty one.
    for url in [
        format!("ws://{gateway}/"),
        format!("ws://{gateway}/?Authorization="),
    ] {
        let (status, body) = refused(&system, url).await;
        assert_eq!(status, 401);
        assert_eq!(body["code"], "UNAUTHORIZED");
        assert_eq!(body["reason"], "missing_token");
        assert_eq!(body["error"], "missing token");
    }

    let expired = system.mint(MintOptions {
        tenant: "acme".into(),
        expired: true,
        ..MintOptions::default()
    });
    let (status, body) = refused(&system, system.ws_url(&expired)).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("token_expired"))
    );
    assert_eq!(body["error"], "token expired");

    let other_tenant = system.token("alice", "globex");
    let (status, body) = refused(&system, system.ws_url(&other_tenant)).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("tenant_not_allowed"))
    );

    // Invalid: garbage, a tampered signature, a token from another key.
    let valid = system.token("alice", "acme");
    let mut tampered = valid.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let stranger = {
        let dir = tempfile::tempdir().unwrap();
        streamer_auth::dev::ensure_dev_key(dir.path())
            .unwrap()
            .mint(&MintOptions {
                tenant: "acme".into(),
                ..MintOptions::default()
            })
            .unwrap()
    };
    let not_yet = system.mint(MintOptions {
        tenant: "acme".into(),
        not_before: Some(std::time::Duration::from_secs(3600)),
        ..MintOptions::default()
    });
    for token in [
        "garbage",
        tampered.as_str(),
        stranger.as_str(),
        not_yet.as_str(),
    ] {
        let (status, body) = refused(&system, system.ws_url(token)).await;
        assert_eq!(status, 401, "{token}");
        assert_eq!(body["reason"], "invalid_token", "{token}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with("invalid token"));
    }

    // The header form and the `token` parameter are accepted.
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{gateway}/"))
            .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {valid}").parse().unwrap());
    within("header auth", tokio_tungstenite::connect_async(request))
        .await
        .unwrap();
    within(
        "token parameter",
        tokio_tungstenite::connect_async(format!("ws://{gateway}/?token={valid}")),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unreachable_control_plane_answers_503() {
    // A gateway whose AuthService and ConnectionService are not listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let shutdown = streamer_core::shutdown::Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = streamer_gateway::GatewayConfig {
        auth_endpoint: dead.clone(),
        connection_endpoint: dead,
        ..Default::default()
    };
    let gateway = tokio::spawn(streamer::run_gateway(listener, config, shutdown.clone()));
    let (status, body) = within(
        "a 503",
        http_get(&format!("http://{addr}/?Authorization=x")),
    )
    .await
    .unwrap();
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    support::schema::assert_conforms("Unavailable", &body);
    assert_eq!(body["code"], "UNAVAILABLE");
    assert_eq!(
        http_get(&format!("http://{addr}/readyz")).await.unwrap().0,
        503
    );
    shutdown.cancel();
    within("the gateway to stop", gateway)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unknown_connection_ids_are_not_found() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let code = connections
        .send(send("no-such-connection", json!({})))
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, tonic::Code::NotFound);
    let code = connections
        .get_connection(v1::GetConnectionRequest {
            connection_id: "no-such-connection".into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, tonic::Code::NotFound);
    let code = connections
        .disconnect(v1::DisconnectRequest {
            connection_id: "no-such-connection".into(),
            reason: String::new(),
            tenant_id: String::new(),
        })
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, tonic::Code::NotFound);
    let active = connections
        .is_active(v1::IsActiveRequest {
            connection_id: "no-such-connection".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .active;
    assert!(!active);
}

#[tokio::test]
async fn malformed_grpc_arguments_are_invalid_argument() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let statuses = vec![
        connections
            .send(v1::SendRequest::default())
            .await
            .unwrap_err(),
        connections
            .send(v1::SendRequest {
                connection_id: "c".into(),
                payload: None,
                tenant_id: String::new(),
                sequence: None,
            })
            .await
            .unwrap_err(),
        connections
            .broadcast(v1::BroadcastRequest {
                target: None,
                payload: json_payload(json!({})),
                tenant_id: String::new(),
            })
            .await
            .unwrap_err(),
        connections
            .broadcast(v1::BroadcastRequest {
                target: Some(v1::broadcast_request::Target::User(v1::UserTarget {
                    tenant_id: "acme".into(),
                    user_id: String::new(),
                })),
                payload: json_payload(json!({})),
                tenant_id: String::new(),
            })
            .await
            .unwrap_err(),
        connections
            .list_connections(v1::ListConnectionsRequest::default())
            .await
            .unwrap_err(),
        connections
            .list_connections(v1::ListConnectionsRequest {
                tenant_id: "acme".into(),
                user_id: String::new(),
                page: Some(v1::PageRequest {
                    page_size: 5000,
                    page_token: String::new(),
                }),
            })
            .await
            .unwrap_err(),
        connections
            .get_connection(v1::GetConnectionRequest {
                connection_id: "a\0b".into(),
                tenant_id: String::new(),
            })
            .await
            .unwrap_err(),
        connections
            .disconnect(v1::DisconnectRequest::default())
            .await
            .unwrap_err(),
        connections
            .is_active(v1::IsActiveRequest::default())
            .await
            .unwrap_err(),
    ];
    for status in statuses {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("invalid argument"), "{status:?}");
    }
    let status = connections
        .receive(v1::ReceiveRequest {
            actions: vec![],
            router_id: "r".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn disconnect_closes_the_socket_with_its_reason() {
    let system = TestSystem::start().await;
    let (mut client, id) = system.connect_found("alice", "acme").await;
    let mut connections = system.connections().await;
    connections
        .disconnect(v1::DisconnectRequest {
            connection_id: id.clone(),
            reason: "session revoked".into(),
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        client.expect_close().await,
        (1000, "session revoked".to_owned())
    );
    let code = connections
        .get_connection(v1::GetConnectionRequest {
            connection_id: id,
            tenant_id: String::new(),
        })
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, tonic::Code::NotFound);
}

#[tokio::test]
async fn a_client_closing_its_socket_removes_its_record() {
    let system = TestSystem::start().await;
    let (client, id) = system.connect_found("alice", "acme").await;
    client.close().await;
    let connections = system.connections().await;
    eventually("the record to be removed", || {
        let mut connections = connections.clone();
        let id = id.clone();
        async move {
            connections
                .get_connection(v1::GetConnectionRequest {
                    connection_id: id,
                    tenant_id: String::new(),
                })
                .await
                .is_err_and(|s| s.code() == tonic::Code::NotFound)
        }
    })
    .await;
    let outcome = system
        .connections()
        .await
        .send(send(&id, json!({})))
        .await
        .unwrap_err();
    assert_eq!(outcome.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_socket_stays_open() {
    let system =
        TestSystem::start_with(|config| config.gateway.limits.max_frame_bytes = 2048).await;
    let (mut client, id) = system.connect_found("alice", "acme").await;

    client.send_text("{not json").await;
    let error = client.recv_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "VALIDATION_ERROR");

    client.send_json(json!({"id": "r1", "payload": {}})).await;
    let error = client.recv_json().await;
    assert_eq!(error["request_id"], "r1");
    assert_eq!(error["error"]["code"], "VALIDATION_ERROR");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("action")
    );

    // Nested past the one rule (60 levels once cut the edge's stream off):
    // the sender gets an error, and the edge stays attached.
    let mut deep = json!(1);
    for _ in 0..60 {
        deep = json!({"a": deep});
    }
    for _ in 0..20 {
        client
            .send_json(json!({"action": "echo", "id": "deep", "payload": deep}))
            .await;
        let error = client.recv_json().await;
        assert_eq!(error["request_id"], "deep");
        assert_eq!(error["error"]["code"], "VALIDATION_ERROR");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("deeper than"),
            "{error}"
        );
    }

    // Frames still reach ConnectionService (which answers this one).
    client
        .send_json(json!({"action": "no_such_action", "id": "r2"}))
        .await;
    let error = client.recv_json().await;
    assert_eq!(error["request_id"], "r2");
    assert_eq!(error["error"]["code"], "INVALID_ACTION");

    // A backend's payload is held to the same rule, whether it still
    // decodes or not.
    let mut just_too_deep = json!(1);
    for _ in 0..=streamer_api::json::MAX_DEPTH {
        just_too_deep = json!([just_too_deep]);
    }
    for payload in [just_too_deep, deep] {
        let status = system
            .connections()
            .await
            .send(send(&id, payload))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let limit = format!("{} levels", streamer_api::json::MAX_DEPTH);
        assert!(status.message().contains(&limit), "{status:?}");
    }

    // Still open and still reachable.
    system
        .connections()
        .await
        .send(send(&id, json!({"still": "here"})))
        .await
        .unwrap();
    assert_eq!(client.recv_backend_json().await, json!({"still": "here"}));

    // A frame over the limit is refused as it arrives: the socket closes
    // with 1009 (message too big).
    client
        .send_json(json!({"action": "echo", "id": "big", "payload": "x".repeat(3000)}))
        .await;
    let (code, _) = client.expect_close().await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn a_slow_consumer_is_closed_and_reported_throttled() {
    let system = TestSystem::start_with(|config| config.gateway.outbound_queue = 4).await;
    let (mut client, id) = system.connect_found("slow", "acme").await;
    let mut connections = system.connections().await;
    // The client reads nothing; once the socket buffers and the 4-message
    // queue are full, a delivery is refused and the socket closed.
    let big = "x".repeat(256 * 1024);
    let mut throttled = false;
    for _ in 0..2000 {
        match connections.send(send(&id, json!({ "blob": big }))).await {
            Ok(r) if r.get_ref().outcome == DeliveryOutcome::Throttled as i32 => {
                throttled = true;
                break;
            }
            Ok(_) => {}
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    assert!(throttled, "the slow consumer was never throttled");
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("slow consumer"), "{reason}");
}

#[tokio::test]
async fn every_server_answers_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let system = TestSystem::start().await;
    for (addr, service) in [
        (system.addrs.auth, "streamer.v1.AuthService"),
        (system.addrs.connection, "streamer.v1.ConnectionService"),
        (system.addrs.progress, "streamer.v1.ProgressService"),
    ] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        for name in ["", service] {
            eventually("SERVING", || {
                let mut health = health.clone();
                async move {
                    health
                        .check(HealthCheckRequest {
                            service: name.into(),
                        })
                        .await
                        .map(|r| r.into_inner().status == ServingStatus::Serving as i32)
                        .unwrap_or(false)
                }
            })
            .await;
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let system = TestSystem::start().await;
    let (mut client, _) = system.connect_found("alice", "acme").await;
    system.shutdown.cancel();
    assert_eq!(client.expect_close().await.0, 1001);
    system.stop().await;
}
