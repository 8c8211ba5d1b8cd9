//! Trust, tried as an attacker would, against a whole system in mode
//! `token`: real gRPC servers on ephemeral ports, real WebSocket clients,
//! and service tokens minted with (or without) the shared secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use streamer_api::errors::reason_of;
use streamer_api::v1::{
    self, claim_response::Item, connection_service_client::ConnectionServiceClient,
    edge_service_client::EdgeServiceClient, progress_service_client::ProgressServiceClient,
};
use streamer_core::trust::{Role, ServiceTokens, Trust};
use support::{TestSystem, json_payload, send, within};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const SECRET: &[u8] = b"a shared secret of at least thirty-two bytes";

fn tokens() -> ServiceTokens {
    ServiceTokens::from_secret(SECRET).unwrap()
}

async fn system() -> TestSystem {
    TestSystem::start_with(|config| {
        config.trust = Trust::token(tokens());
    })
    .await
}

fn mint(sub: &str, roles: &[Role], tenants: Option<&[&str]>) -> String {
    tokens()
        .mint(
            sub,
            roles,
            tenants.map(|t| t.iter().map(|s| s.to_string()).collect()),
            Duration::from_secs(600),
        )
        .unwrap()
}

/// Sends `authorization: Bearer <token>` on every call (none for `None`).
#[derive(Clone)]
struct Bearer(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()))
}

async fn connections(system: &TestSystem, token: Option<&str>) -> ConnectionServiceClient<Authed> {
    ConnectionServiceClient::with_interceptor(channel(system.addrs.connection).await, bearer(token))
}

async fn edges(system: &TestSystem, token: Option<&str>) -> EdgeServiceClient<Authed> {
    EdgeServiceClient::with_interceptor(channel(system.addrs.edge).await, bearer(token))
}

async fn progress(system: &TestSystem, token: Option<&str>) -> ProgressServiceClient<Authed> {
    ProgressServiceClient::with_interceptor(channel(system.addrs.progress).await, bearer(token))
}

/// The one connection of `user` in `tenant`, found with an all-tenants
/// backend token.
async fn connection_of(system: &TestSystem, tenant: &str, user: &str) -> String {
    let admin = mint("admin", &[Role::Backend], None);
    let listed = connections(system, Some(&admin))
        .await
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: tenant.into(),
            user_id: user.into(),
            page: None,
        })
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert_eq!(listed.len(), 1);
    listed[0].connection_id.clone()
}

#[tokio::test]
async fn a_call_without_a_valid_token_is_unauthenticated_and_probes_need_none() {
    let system = system().await;
    // The system's own roles authenticate to each other: clients connect.
    let mut alice = system.connect("alice", "acme").await;
    let id = connection_of(&system, "acme", "alice").await;

    let forged = ServiceTokens::from_secret(b"another secret, also thirty-two bytes long")
        .unwrap()
        .mint("mallory", &[Role::Backend], None, Duration::from_secs(600))
        .unwrap();
    for token in [None, Some(forged.as_str()), Some("not-a-jwt")] {
        let status = connections(&system, token)
            .await
            .send(send(&id, json!({"x": 1})))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{token:?}: {status:?}"
        );
        // Told apart by the ErrorInfo's reason: none sent, or a bad one.
        let reason = if token.is_none() {
            "CREDENTIALS_MISSING"
        } else {
            "CREDENTIALS_INVALID"
        };
        assert_eq!(reason_of(&status).as_deref(), Some(reason), "{status:?}");
        let status = progress(&system, token)
            .await
            .get(v1::GetRequest {
                selector: Some(v1::get_request::Selector::Id("x".into())),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{token:?}: {status:?}"
        );
    }

    // Kubernetes' gRPC probes and grpcurl's `list` need no credential.
    for addr in [
        system.addrs.auth,
        system.addrs.connection,
        system.addrs.progress,
    ] {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    // A valid backend token delivers.
    let backend = mint("billing", &[Role::Backend], None);
    connections(&system, Some(&backend))
        .await
        .send(send(&id, json!({"hello": "alice"})))
        .await
        .unwrap();
    assert_eq!(alice.recv_backend_json().await, json!({"hello": "alice"}));
}

#[tokio::test]
async fn each_role_may_call_only_what_it_needs() {
    let system = system().await;
    let backend = mint("billing", &[Role::Backend], None);
    let router = mint("router", &[Role::Router], None);
    let processor = mint("reports", &[Role::Processor], None);

    // A backend cannot pose as an edge, a router or a processor.
    let hello = v1::AttachRequest {
        event: Some(v1::attach_request::Event::Hello(v1::EdgeHello {
            edge_id: "billing".into(),
            connections: vec![],
            tokens: Default::default(),
            taken_at: None,
            apigateway: false,
        })),
    };
    let status = edges(&system, Some(&backend))
        .await
        .attach(tokio_stream::iter(vec![hello]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = connections(&system, Some(&backend))
        .await
        .receive(v1::ReceiveRequest {
            actions: vec!["echo".into()],
            router_id: "sneaky".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = progress(&system, Some(&backend))
        .await
        .claim(support::claim_request("sneaky", "generate_report", 1, 30))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The edge stream is not part of the public API at all.
    let public = EdgeServiceClient::with_interceptor(
        channel(system.addrs.connection).await,
        bearer(Some(&mint("edge-1", &[Role::Edge], None))),
    )
    .attach(tokio_stream::iter(Vec::<v1::AttachRequest>::new()))
    .await
    .unwrap_err();
    assert_eq!(public.code(), Code::Unimplemented, "{public:?}");

    // A router and a processor cannot deliver or look requests up.
    let status = connections(&system, Some(&router))
        .await
        .send(send("any", json!({})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("backend"), "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("ROLE_NOT_ALLOWED"),
        "{status:?}"
    );
    let status = progress(&system, Some(&processor))
        .await
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Id("x".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn a_backend_bound_to_a_tenant_reaches_only_that_tenant() {
    let system = TestSystem::start_with(|config| {
        config.trust = Trust::token(tokens());
        config.progress.async_actions = vec!["generate_report".into()];
    })
    .await;
    let mut alice = system.connect("alice", "acme").await;
    let mut bob = system.connect("bob", "globex").await;
    let alice_id = connection_of(&system, "acme", "alice").await;
    let bob_id = connection_of(&system, "globex", "bob").await;
    let acme = mint("acme-backend", &[Role::Backend], Some(&["acme"]));
    let mut client = connections(&system, Some(&acme)).await;

    // Another tenant's connection does not exist, whatever the call.
    let status = client
        .send(send(&bob_id, json!({"x": 1})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .get_connection(v1::GetConnectionRequest {
            connection_id: bob_id.clone(),
            tenant_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .disconnect(v1::DisconnectRequest {
            connection_id: bob_id.clone(),
            reason: "bye".into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let active = client
        .is_active(v1::IsActiveRequest {
            connection_id: bob_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .active;
    assert!(!active);
    let broadcast = client
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Connections(
                v1::ConnectionIds {
                    ids: vec![alice_id.clone(), bob_id.clone()],
                },
            )),
            payload: json_payload(json!({"to": "both?"})),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((broadcast.delivered, broadcast.not_found), (1, 1));

    // A whole other tenant is refused outright.
    let status = client
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                tenant_id: "globex".into(),
            })),
            payload: json_payload(json!({"x": 1})),
            tenant_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = client
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: "globex".into(),
            user_id: String::new(),
            page: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("SCOPE_NOT_ALLOWED"),
        "{status:?}"
    );

    // Nor can it queue work on, or look up, another tenant's client.
    let mut requests = progress(&system, Some(&acme)).await;
    let status = requests
        .submit(v1::SubmitRequest {
            connection_id: bob_id.clone(),
            action: "generate_report".into(),
            request_id: "r1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let admin = mint("admin", &[Role::Backend], None);
    let bobs = progress(&system, Some(&admin))
        .await
        .submit(v1::SubmitRequest {
            connection_id: bob_id.clone(),
            action: "generate_report".into(),
            request_id: "r1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(bob.recv_json().await["type"], "acknowledgment");
    let status = requests
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Id(bobs.id.clone())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = requests
        .cancel(v1::CancelRequest {
            id: bobs.id.clone(),
            reason: "mine now".into(),
            owner: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // Its own tenant works...
    client
        .send(send(&alice_id, json!({"only": "alice"})))
        .await
        .unwrap();
    assert_eq!(alice.recv_backend_json().await, json!({"to": "both?"}));
    assert_eq!(alice.recv_backend_json().await, json!({"only": "alice"}));
    // ...and bob got nothing from it: the next thing he gets is this.
    connections(&system, Some(&admin))
        .await
        .send(send(&bob_id, json!({"fence": true})))
        .await
        .unwrap();
    assert_eq!(bob.recv_backend_json().await, json!({"fence": true}));
}

#[tokio::test]
async fn a_processor_cannot_report_on_or_complete_work_another_credential_holds() {
    let system = TestSystem::start_with(|config| {
        config.trust = Trust::token(tokens());
        config.progress.async_actions = vec!["generate_report".into()];
    })
    .await;
    let mut alice = system.connect("alice", "acme").await;
    let alice_id = connection_of(&system, "acme", "alice").await;
    let reports = mint("reports", &[Role::Processor], None);
    let evil = mint("evil", &[Role::Processor], None);

    let mut work = progress(&system, Some(&reports))
        .await
        .claim(support::claim_request("worker-1", "generate_report", 1, 60))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(v1::ClaimResponse {
        item: Some(Item::Registered(registered)),
        ..
    })) = within("the registration", work.next()).await
    else {
        panic!("a Claim stream opens with its registration");
    };
    // Registered under the credential's holder, as its work will be held.
    assert_eq!(registered.processor_id, "reports/worker-1");
    let admin = mint("admin", &[Role::Backend], None);
    progress(&system, Some(&admin))
        .await
        .submit(v1::SubmitRequest {
            connection_id: alice_id,
            action: "generate_report".into(),
            request_id: "r1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(alice.recv_json().await["type"], "acknowledgment");
    let Some(Ok(v1::ClaimResponse {
        item: Some(Item::Work(job)),
        ..
    })) = within("work", work.next()).await
    else {
        panic!("expected work");
    };
    // The work is held by the credential's holder, not just an id anyone
    // could repeat.
    assert_eq!(job.processor_id, "reports/worker-1");

    // Another processor credential, repeating the same processor id,
    // cannot complete it with a forged result.
    let forged = v1::CompleteRequest {
        id: job.id.clone(),
        processor_id: "worker-1".into(),
        result: Some(streamer_api::json::to_proto(
            json!({"report_url": "https://evil.example/phish"}),
        )),
    };
    let status = progress(&system, Some(&evil))
        .await
        .complete(forged.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // The real holder completes it, and that is what alice gets.
    progress(&system, Some(&reports))
        .await
        .complete(v1::CompleteRequest {
            result: Some(streamer_api::json::to_proto(
                json!({"report_url": "https://reports.example/1"}),
            )),
            ..forged
        })
        .await
        .unwrap();
    let complete = alice.recv_json().await;
    assert_eq!(complete["type"], "complete");
    assert_eq!(
        complete["result"]["report_url"],
        "https://reports.example/1"
    );
}

#[tokio::test]
async fn an_edge_cannot_take_over_another_edges_id_or_connections() {
    let system = system().await;
    let mut alice = system.connect("alice", "acme").await;
    let alice_id = connection_of(&system, "acme", "alice").await;
    let admin = mint("admin", &[Role::Backend], None);
    let real_edge = connections(&system, Some(&admin))
        .await
        .get_connection(v1::GetConnectionRequest {
            connection_id: alice_id.clone(),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap()
        .edge_id;

    // An edge credential cannot attach under another edge's id...
    let rogue = mint("rogue-edge", &[Role::Edge], None);
    let hello = |edge_id: &str, connections: Vec<v1::Connection>| v1::AttachRequest {
        event: Some(v1::attach_request::Event::Hello(v1::EdgeHello {
            edge_id: edge_id.into(),
            connections,
            tokens: Default::default(),
            taken_at: None,
            apigateway: false,
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(&real_edge, vec![])).await.unwrap();
    let status = edges(&system, Some(&rogue))
        .await
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // ...nor, under its own, re-announce alice's connection (or announce a
    // new identity for it) to take her messages.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let stolen = v1::Connection {
        connection_id: alice_id.clone(),
        identity: Some(v1::Identity {
            user_id: "alice".into(),
            tenant_id: "acme".into(),
            permissions: vec!["admin".into()],
            topics: vec![],
        }),
        ..Default::default()
    };
    tx.send(hello("rogue-edge", vec![stolen.clone()]))
        .await
        .unwrap();
    let mut commands = edges(&system, Some(&rogue))
        .await
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(v1::AttachRequest {
        event: Some(v1::attach_request::Event::Opened(v1::ConnectionOpened {
            connection: Some(stolen),
            token: system.token("alice", "acme"),
        })),
    })
    .await
    .unwrap();
    let refused = within("the rogue announcement's answer", commands.message())
        .await
        .unwrap()
        .unwrap();
    let Some(v1::attach_response::Command::Close(close)) = refused.command else {
        panic!("expected a close, got {refused:?}");
    };
    assert_eq!(close.connection_id, alice_id);

    // Alice's record and messages stay hers.
    let outcome = connections(&system, Some(&admin))
        .await
        .send(send(&alice_id, json!({"still": "yours"})))
        .await
        .unwrap()
        .into_inner()
        .outcome();
    assert_eq!(outcome, v1::DeliveryOutcome::Delivered);
    assert_eq!(alice.recv_backend_json().await, json!({"still": "yours"}));
    drop(tx);
}

#[tokio::test]
async fn an_edge_credential_cannot_announce_an_identity_without_its_token() {
    use v1::attach_response::Command;
    let system = system().await;
    let rogue = mint("rogue-edge", &[Role::Edge], None);
    let admin = mint("admin", &[Role::Backend], None);
    let identity = |user: &str, tenant: &str, permissions: &[&str]| v1::Identity {
        user_id: user.into(),
        tenant_id: tenant.into(),
        permissions: permissions.iter().map(|p| p.to_string()).collect(),
        topics: vec![],
    };
    let connection = |id: &str, identity: v1::Identity| v1::Connection {
        connection_id: id.into(),
        identity: Some(identity),
        ..Default::default()
    };
    let opened = |connection: v1::Connection, token: String| v1::AttachRequest {
        event: Some(v1::attach_request::Event::Opened(v1::ConnectionOpened {
            connection: Some(connection),
            token,
        })),
    };

    // A hello that re-announces a connection nobody verified gets it closed.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(v1::AttachRequest {
        event: Some(v1::attach_request::Event::Hello(v1::EdgeHello {
            edge_id: "rogue-edge".into(),
            connections: vec![connection("carol-1", identity("carol", "acme", &[]))],
            tokens: [("carol-1".to_string(), "not a token".to_string())].into(),
            taken_at: None,
            apigateway: false,
        })),
    })
    .await
    .unwrap();
    let mut commands = edges(&system, Some(&rogue))
        .await
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let Command::Close(close) = next_command(&mut commands, "the hello's refusal").await else {
        panic!("expected a close");
    };
    assert_eq!(
        (close.connection_id.as_str(), close.code),
        ("carol-1", 1008)
    );

    // An opened with no token, a forged one, or someone else's is refused.
    let bob = identity("bob", "globex", &["admin"]);
    for (id, token) in [
        ("bob-1", String::new()),
        ("bob-2", "eyJhbGciOiJub25lIn0.e30.".to_string()),
        ("bob-3", system.token("alice", "acme")),
    ] {
        tx.send(opened(connection(id, bob.clone()), token))
            .await
            .unwrap();
        let Command::Close(close) = next_command(&mut commands, "the refusal").await else {
            panic!("expected a close for {id}");
        };
        assert_eq!(
            (close.connection_id.as_str(), close.code),
            (id, 1008),
            "{close:?}"
        );
    }

    // Bob's own token registers him, with the token's permissions (the
    // development token's read and write), not the admin the edge claimed.
    tx.send(opened(
        connection("bob-4", bob.clone()),
        system.token("bob", "globex"),
    ))
    .await
    .unwrap();
    let Command::Registered(registered) = next_command(&mut commands, "the registration").await
    else {
        panic!("expected bob-4 to be registered");
    };
    assert_eq!(registered.connection_id, "bob-4");
    let mut backend = connections(&system, Some(&admin)).await;
    let recorded = backend
        .get_connection(v1::GetConnectionRequest {
            connection_id: "bob-4".into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap();
    assert_eq!(
        recorded.identity.unwrap(),
        identity("bob", "globex", &["read", "write"])
    );
    for refused in ["carol-1", "bob-1", "bob-2", "bob-3"] {
        let status = backend
            .get_connection(v1::GetConnectionRequest {
                connection_id: refused.into(),
                tenant_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{refused}");
    }
    drop(tx);
}

/// The next command other than the router advertisement every stream gets.
async fn next_command(
    commands: &mut tonic::Streaming<v1::AttachResponse>,
    what: &str,
) -> v1::attach_response::Command {
    loop {
        let command = within(what, commands.message())
            .await
            .unwrap()
            .unwrap()
            .command
            .unwrap();
        if !matches!(command, v1::attach_response::Command::Routes(_)) {
            return command;
        }
    }
}
