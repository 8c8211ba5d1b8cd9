//! Mode `mtls`, tried from outside: a whole system serving gRPC over TLS,
//! its edge attached with its own certificate, and callers holding
//! certificates from the right CA, a wrong CA, or none.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use streamer::dial_addr;
use streamer_api::v1::{self, connection_service_client::ConnectionServiceClient};
use streamer_core::grpc;
use streamer_core::tls::issue::{Authority, Pem};
use streamer_core::tls::{Tls, TlsFiles};
use streamer_core::trust::{Role, Trust};
use support::{TestSystem, send, within};
use tonic::Code;
use tonic::transport::Channel;

/// A CA and a place to write the certificates it issues.
struct Pki {
    ca: Authority,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(name: &str) -> Self {
        Self {
            ca: Authority::new(name).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Files for `holder`: its certificate from this CA, trusting `trusted`.
    fn files(&self, holder: &str, roles: &[Role], tenants: &[&str], trusted: &Pki) -> TlsFiles {
        let tenants: Vec<String> = tenants.iter().map(|t| t.to_string()).collect();
        let hosts = ["localhost".to_string(), "127.0.0.1".to_string()];
        let pem = self.ca.issue(holder, roles, &tenants, &hosts).unwrap();
        write_files(self.dir.path(), holder, &pem, &trusted.ca.pem.cert)
    }

    /// A trust in mode `mtls` for `holder`, with this CA on both sides.
    fn trust(&self, holder: &str, roles: &[Role], tenants: &[&str]) -> Trust {
        Trust::mtls(Tls::load(&self.files(holder, roles, tenants, self)).unwrap())
    }
}

fn write_files(dir: &Path, holder: &str, pem: &Pem, ca: &str) -> TlsFiles {
    let dir = dir.join(holder);
    std::fs::create_dir_all(&dir).unwrap();
    let files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: dir.join("ca.crt"),
    };
    std::fs::write(&files.cert, &pem.cert).unwrap();
    std::fs::write(&files.key, &pem.key).unwrap();
    std::fs::write(&files.ca, ca).unwrap();
    files
}

async fn system(pki: &Pki) -> TestSystem {
    let trust = pki.trust("streamer", &[Role::Edge, Role::Backend], &[]);
    TestSystem::start_with(|config| config.trust = trust).await
}

fn connections(system: &TestSystem, trust: &Trust) -> ConnectionServiceClient<Channel> {
    let url = format!("https://{}", dial_addr(system.addrs.connection));
    let endpoint = grpc::endpoint(&url, trust).unwrap();
    ConnectionServiceClient::new(grpc::channel(&endpoint, trust))
}

async fn connection_of(backend: &mut ConnectionServiceClient<Channel>, tenant: &str) -> String {
    let listed = backend
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: tenant.into(),
            user_id: String::new(),
            page: None,
        })
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert_eq!(listed.len(), 1, "{listed:?}");
    listed[0].connection_id.clone()
}

#[tokio::test]
async fn over_mutual_tls_the_edge_attaches_and_a_backend_certificate_delivers() {
    let pki = Pki::new("Streamer test CA");
    let system = system(&pki).await;
    let mut client = system.connect("alice", "acme").await;

    let mut backend = connections(&system, &pki.trust("billing", &[Role::Backend], &[]));
    let alice = connection_of(&mut backend, "acme").await;
    let outcome = backend
        .send(send(&alice, json!({"over": "tls"})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.outcome(), v1::DeliveryOutcome::Delivered);
    let message = within("the delivery", client.recv_backend_json()).await;
    assert_eq!(message, json!({"over": "tls"}));
}

#[tokio::test]
async fn a_certificate_grants_only_its_roles_and_its_tenants() {
    let pki = Pki::new("Streamer test CA");
    let system = system(&pki).await;
    let _alice = system.connect("alice", "acme").await;
    let _bob = system.connect("bob", "globex").await;
    let mut admin = connections(&system, &pki.trust("admin", &[Role::Backend], &[]));
    let bob = connection_of(&mut admin, "globex").await;

    // A router's certificate may receive frames, not deliver.
    let mut router = connections(&system, &pki.trust("router", &[Role::Router], &[]));
    let denied = router.send(send(&bob, json!(1))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // A backend certificate bound to acme does not reach globex.
    let mut acme = connections(&system, &pki.trust("acme-app", &[Role::Backend], &["acme"]));
    let hidden = acme.send(send(&bob, json!(1))).await.unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    connection_of(&mut acme, "acme").await;

    // A server-only certificate (no role) is refused with the reason.
    let mut server_only = connections(&system, &pki.trust("auth", &[], &[]));
    let refused = server_only.send(send(&bob, json!(1))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("urn:streamer:role"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_or_plain_text_gets_no_connection() {
    let pki = Pki::new("Streamer test CA");
    let system = system(&pki).await;
    let _alice = system.connect("alice", "acme").await;
    let request = || v1::ListConnectionsRequest {
        tenant_id: "acme".into(),
        user_id: String::new(),
        page: None,
    };

    // Signed by another CA, though it trusts the right one for the server.
    let rogue = Pki::new("Rogue CA");
    let files = rogue.files("billing", &[Role::Backend], &[], &pki);
    let trust = Trust::mtls(Tls::load(&files).unwrap());
    let failed = connections(&system, &trust)
        .list_connections(request())
        .await
        .unwrap_err();
    assert!(format!("{failed:?}").contains("UnknownCA"), "{failed:?}");

    // A client that trusts another CA does not accept the server.
    let doubtful = rogue.trust("billing", &[Role::Backend], &[]);
    let failed = connections(&system, &doubtful)
        .list_connections(request())
        .await
        .unwrap_err();
    assert!(
        format!("{failed:?}").contains("UnknownIssuer"),
        "{failed:?}"
    );

    // Plain text to a TLS port.
    let plain = ConnectionServiceClient::new(
        Channel::from_shared(format!("http://{}", system.addrs.connection))
            .unwrap()
            .connect_lazy(),
    )
    .list_connections(request())
    .await
    .unwrap_err();
    assert_ne!(plain.code(), Code::Ok);

    // The right certificate still works on the same server.
    let mut good = connections(&system, &pki.trust("billing", &[Role::Backend], &[]));
    assert_eq!(
        good.list_connections(request())
            .await
            .unwrap()
            .into_inner()
            .connections
            .len(),
        1
    );
}

#[tokio::test]
async fn without_a_client_certificate_only_probes_answer() {
    let pki = Pki::new("Streamer test CA");
    let system = system(&pki).await;
    let channel = no_certificate_channel(&pki, system.addrs.connection);

    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "streamer.v1.ConnectionService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let refused = ConnectionServiceClient::new(channel)
        .send(send("c-1", json!(1)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("client certificate"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_edge_certificate_attaches_only_under_its_own_name() {
    use streamer_api::v1::{AttachRequest, EdgeHello, attach_request::Event, edge_service_client};
    let pki = Pki::new("Streamer test CA");
    let system = system(&pki).await;
    let trust = pki.trust("edge-b", &[Role::Edge], &[]);
    let url = format!("https://{}", dial_addr(system.addrs.edge));
    let endpoint = grpc::endpoint(&url, &trust).unwrap();
    let mut edges = edge_service_client::EdgeServiceClient::new(grpc::channel(&endpoint, &trust));
    let attach = |edge_id: &str| {
        tokio_stream::iter([AttachRequest {
            event: Some(Event::Hello(EdgeHello {
                edge_id: edge_id.into(),
                connections: Vec::new(),
                tokens: Default::default(),
                taken_at: None,
                apigateway: false,
            })),
        }])
        .chain(tokio_stream::pending())
    };
    use tokio_stream::StreamExt as _;

    // The system's own edge is "streamer/edge-…": another certificate may
    // not take it, nor a name outside its own.
    for taken in ["streamer", "streamer/edge-1", "edge-b-but-longer"] {
        let refused = edges.attach(attach(taken)).await;
        let status = match refused {
            Err(status) => status,
            Ok(response) => response
                .into_inner()
                .next()
                .await
                .expect("an answer")
                .unwrap_err(),
        };
        assert_eq!(status.code(), Code::PermissionDenied, "{taken}: {status:?}");
    }
    let accepted = edges.attach(attach("edge-b/pod-1")).await;
    assert!(accepted.is_ok(), "{accepted:?}");
}

/// A TLS channel that trusts the CA but presents no certificate, like a
/// health checker.
fn no_certificate_channel(pki: &Pki, addr: std::net::SocketAddr) -> Channel {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(pki.ca.pem.cert.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(dial_addr(addr)).await?;
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .connect_with_connector_lazy(connect)
}
