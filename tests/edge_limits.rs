//! No single client can hurt others: what the edge refuses, tried over
//! real sockets against a whole system.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use support::{TestSystem, eventually, http_get, http_status, within};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// The HTTP status of a refused upgrade, and its JSON body.
async fn refused(request: tungstenite::handshake::client::Request) -> (u16, serde_json::Value) {
    match tokio_tungstenite::connect_async(request).await {
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let body = serde_json::from_slice(&body).unwrap();
            support::schema::assert_conforms("HttpRefusal", &body);
            (response.status().as_u16(), body)
        }
        Ok(_) => panic!("the upgrade was accepted"),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_flooding_client_is_rate_limited_then_closed_and_others_are_not() {
    let system = TestSystem::start_with(|config| {
        config.gateway.limits.message_rate = 1.0;
        config.gateway.limits.message_burst = 5;
    })
    .await;
    let (mut calm, calm_id) = system.connect_found("calm", "acme").await;
    let mut flood = system.connect("flood", "acme").await;

    // Everything at once: the burst passes (and is answered INVALID_ACTION,
    // as no router handles it), the rest is refused, then the socket closes.
    for i in 0..50 {
        let frame = json!({"action": "nothing", "id": i.to_string()});
        if flood
            .ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut codes = Vec::new();
    let close = loop {
        match within("the flood's messages", flood.ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                let message: serde_json::Value = serde_json::from_str(&text).unwrap();
                codes.push(message["error"]["code"].as_str().unwrap().to_owned());
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close, Some(1008), "{codes:?}");
    assert!(codes.iter().any(|c| c == "RATE_LIMITED"), "{codes:?}");
    assert!(
        codes.iter().filter(|c| *c != "RATE_LIMITED").count() <= 6,
        "only about a burst passed: {codes:?}"
    );

    // The calm client was never affected.
    system
        .connections()
        .await
        .send(streamer_api::v1::SendRequest {
            connection_id: calm_id,
            payload: support::json_payload(json!({"calm": true})),
            tenant_id: String::new(),
            sequence: None,
        })
        .await
        .unwrap();
    assert_eq!(calm.recv_backend_json().await, json!({"calm": true}));
}

#[tokio::test]
async fn past_the_connection_cap_new_clients_get_503_while_the_rest_keeps_working() {
    let system = TestSystem::start_with(|config| config.gateway.max_connections = 2).await;
    let (mut first, first_id) = system.connect_found("a", "acme").await;
    let second = system.connect("b", "acme").await;

    let request = system
        .ws_url(&system.token("c", "acme"))
        .into_client_request()
        .unwrap();
    let (status, body) = refused(request).await;
    assert_eq!(status, 503);
    assert_eq!(body["code"], "UNAVAILABLE");

    // Health, readiness and the sockets already open are untouched.
    assert_eq!(
        http_status(&format!("http://{}/readyz", system.addrs.gateway)).await,
        Some(200)
    );
    let (status, _) = http_get(&format!("http://{}/healthz", system.addrs.gateway))
        .await
        .unwrap();
    assert_eq!(status, 200);
    system
        .connections()
        .await
        .send(streamer_api::v1::SendRequest {
            connection_id: first_id,
            payload: support::json_payload(json!({"still": "served"})),
            tenant_id: String::new(),
            sequence: None,
        })
        .await
        .unwrap();
    assert_eq!(first.recv_backend_json().await, json!({"still": "served"}));

    // A socket that leaves makes room.
    second.close().await;
    let url = system.ws_url(&system.token("c", "acme"));
    eventually("a slot to free up", || {
        let url = url.clone();
        async move { tokio_tungstenite::connect_async(url).await.is_ok() }
    })
    .await;
}

#[tokio::test]
async fn only_allowed_origins_may_connect_from_a_browser() {
    let system = TestSystem::start_with(|config| {
        config.gateway.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let with_origin = |origin: &str| {
        let mut request = system
            .ws_url(&system.token("alice", "acme"))
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        request
    };
    let (status, body) = refused(with_origin("https://evil.example")).await;
    assert_eq!(status, 403);
    assert_eq!(body["code"], "FORBIDDEN");

    assert!(
        tokio_tungstenite::connect_async(with_origin("https://app.example"))
            .await
            .is_ok()
    );
    // A client that is not a browser sends no Origin, and is not affected.
    let _ = system.connect("alice", "acme").await;
}

/// A client that completes the upgrade and then never reads nor writes
/// (a raw socket, so nothing answers pings on its behalf).
async fn silent_client(system: &TestSystem, user: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(system.addrs.gateway)
        .await
        .unwrap();
    let request = format!(
        "GET /?Authorization={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        system.token(user, "acme"),
        system.addrs.gateway
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Reads a server's frames until it closes; returns the close code.
async fn close_code(stream: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    within("the server to close", stream.read_to_end(&mut bytes))
        .await
        .unwrap();
    let mut rest = bytes.as_slice();
    while rest.len() >= 2 {
        let (opcode, len) = (rest[0] & 0x0f, usize::from(rest[1] & 0x7f));
        assert!(len < 126, "small control frames only");
        let payload = &rest[2..2 + len];
        if opcode == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
        rest = &rest[2 + len..];
    }
    panic!("no close frame in {bytes:?}");
}

#[tokio::test]
async fn a_silent_socket_is_pinged_then_closed_as_idle() {
    let system = TestSystem::start_with(|config| {
        config.gateway.limits.ping_interval = Duration::from_millis(250);
        config.gateway.limits.idle_timeout = Duration::from_millis(2000);
    })
    .await;
    // A client that reads answers the pings (tungstenite does)...
    let mut listening = system.connect("listening", "acme").await;
    let reading = tokio::spawn(async move {
        loop {
            match listening.ws.next().await {
                Some(Ok(Message::Ping(_))) => {}
                other => return other,
            }
        }
    });
    let mut silent = silent_client(&system, "silent").await;

    // ...the silent one answers none: it is closed as idle (1001).
    assert_eq!(close_code(&mut silent).await, 1001);
    let mut connections = system.connections().await;
    eventually("the idle connection's record to go", || {
        let mut connections = connections.clone();
        async move {
            support::user_connection_ids(&mut connections, "acme", "silent")
                .await
                .is_empty()
        }
    })
    .await;

    // The reading client stays open past the idle timeout many times over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!reading.is_finished(), "the reading client was closed");
    assert_eq!(
        support::user_connection_ids(&mut connections, "acme", "listening")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires_unless_the_client_refreshes_it() {
    use streamer_auth::dev::MintOptions;
    let system = TestSystem::start().await;
    let mint = |sub: &str, ttl: u64| {
        system.mint(MintOptions {
            sub: sub.into(),
            tenant: "acme".into(),
            ttl: Duration::from_secs(ttl),
            ..MintOptions::default()
        })
    };
    let open = |token: String| {
        let url = system.ws_url(&token);
        async move {
            let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            support::WsClient { ws }
        }
    };
    // Bob's token runs out well before alice's.
    let mut bob = open(mint("bob", 3)).await;
    let mut alice = open(mint("alice", 6)).await;

    // A token for someone else is refused, and changes nothing.
    bob.send_json(
        json!({"action": "refresh", "id": "f0", "payload": {"token": mint("alice", 3600)}}),
    )
    .await;
    let refused = bob.recv_json().await;
    assert_eq!(refused["request_id"], "f0");
    assert_eq!(refused["error"]["code"], "UNAUTHORIZED", "{refused}");
    // His own fresh token moves his socket's expiry.
    bob.send_json(
        json!({"action": "refresh", "id": "f1", "payload": {"token": mint("bob", 3600)}}),
    )
    .await;
    let refreshed = bob.recv_json().await;
    assert_eq!(refreshed["type"], "response", "{refreshed}");
    assert_eq!(refreshed["request_id"], "f1");
    assert!(refreshed["data"]["expires_in_seconds"].as_u64().unwrap() > 3000);

    // Alice never refreshed: her socket closes when her token expires.
    let (code, reason) = alice.expect_close().await;
    assert_eq!((code, reason.as_str()), (1008, "token expired"));

    // By then bob's first token had expired too; his socket lives on.
    let bob_id = support::user_connection_ids(&mut system.connections().await, "acme", "bob")
        .await
        .pop()
        .expect("bob is still connected");
    system
        .connections()
        .await
        .send(streamer_api::v1::SendRequest {
            connection_id: bob_id,
            payload: support::json_payload(json!({"still": "open"})),
            tenant_id: String::new(),
            sequence: None,
        })
        .await
        .unwrap();
    assert_eq!(bob.recv_backend_json().await, json!({"still": "open"}));
}

#[tokio::test]
async fn half_sent_or_unsent_headers_are_cut_off_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let system = TestSystem::start_with(|config| {
        config.gateway.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    // Slowloris: requests whose headers never end.
    let mut lorises = Vec::new();
    for _ in 0..50 {
        let mut stream = tokio::net::TcpStream::connect(system.addrs.gateway)
            .await
            .unwrap();
        stream
            .write_all(b"GET /?Authorization=x HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
            .await
            .unwrap();
        lorises.push(stream);
    }
    // And sockets that send nothing at all.
    for _ in 0..20 {
        lorises.push(
            tokio::net::TcpStream::connect(system.addrs.gateway)
                .await
                .unwrap(),
        );
    }
    // Each is closed by the edge (after, at most, a 408).
    for stream in &mut lorises {
        let mut rest = Vec::new();
        let ended = within(
            "a slow request to be cut off",
            stream.read_to_end(&mut rest),
        )
        .await;
        assert!(
            ended.is_err() || rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&rest)
        );
    }
    // Well-behaved clients were served all along.
    let _ = system.connect("alice", "acme").await;
}

#[tokio::test]
async fn a_browser_can_send_its_token_as_a_subprotocol_and_never_see_it_echoed() {
    let system = TestSystem::start().await;
    let url = format!("ws://{}/", system.addrs.gateway);
    let mut request = url.clone().into_client_request().unwrap();
    let offered = format!("streamer, bearer.{}", system.token("alice", "acme"));
    request
        .headers_mut()
        .insert("sec-websocket-protocol", offered.parse().unwrap());
    let (_ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "streamer"
    );
    // A bad token there is refused like any other.
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "streamer, bearer.nope".parse().unwrap(),
    );
    let (status, body) = refused(request).await;
    assert_eq!(status, 401);
    assert_eq!(body["reason"], "invalid_token");
}
