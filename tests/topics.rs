//! Topics end to end, through real WebSocket clients and the gRPC API:
//! subscribing by RPC and by client action, publishing within a tenant,
//! recovering what a reconnecting client missed, and slow subscribers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures::StreamExt as _;
use serde_json::{Value, json};
use streamer_api::v1::{self, connection_service_client::ConnectionServiceClient};
use streamer_auth::dev::MintOptions;
use streamer_core::store::Retention;
use support::{TestSystem, WsClient, json_payload, within};
use tonic::Code;
use tonic::transport::Channel;

type Connections = ConnectionServiceClient<Channel>;

fn subscribe(tenant: &str, topic: &str, connection_id: &str) -> v1::SubscribeRequest {
    v1::SubscribeRequest {
        tenant_id: tenant.into(),
        topic: topic.into(),
        target: Some(v1::subscribe_request::Target::ConnectionId(
            connection_id.into(),
        )),
    }
}

async fn publish(
    connections: &mut Connections,
    tenant: &str,
    topic: &str,
    data: Value,
) -> v1::PublishResponse {
    connections
        .publish(v1::PublishRequest {
            tenant_id: tenant.into(),
            topic: topic.into(),
            payload: json_payload(data),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// One page of a tenant's subscriptions, by topic or by connection.
async fn listed(
    connections: &mut Connections,
    selector: v1::list_subscriptions_request::Selector,
) -> Vec<v1::Subscription> {
    connections
        .list_subscriptions(v1::ListSubscriptionsRequest {
            tenant_id: "acme".into(),
            selector: Some(selector),
            page: None,
        })
        .await
        .unwrap()
        .into_inner()
        .subscriptions
}

/// Proves nothing else is on its way to a client: a marker sent after
/// everything else is the next thing it gets.
async fn nothing_more(connections: &mut Connections, client: &mut WsClient, connection_id: &str) {
    connections
        .send(support::send(connection_id, json!({"marker": true})))
        .await
        .unwrap();
    assert_eq!(client.recv_backend_json().await, json!({"marker": true}));
}

/// A client whose token allows `topics`.
async fn connect_with_topics(system: &TestSystem, user: &str, topics: &[&str]) -> WsClient {
    let token = system.mint(MintOptions {
        sub: user.into(),
        tenant: "acme".into(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..MintOptions::default()
    });
    let (ws, _) = within(
        "the websocket to connect",
        tokio_tungstenite::connect_async(system.ws_url(&token)),
    )
    .await
    .unwrap();
    WsClient { ws }
}

/// The client subscribes itself; returns its answer.
async fn client_subscribe(client: &mut WsClient, id: &str, payload: Value) -> Value {
    client
        .send_json(json!({"action": "subscribe", "id": id, "payload": payload}))
        .await;
    let answer = client.recv_json().await;
    assert_eq!(answer["request_id"], id, "{answer}");
    answer
}

/// The client subscribes itself again from where it stood; returns its
/// answer.
async fn resubscribe(
    client: &mut WsClient,
    id: &str,
    topic: &str,
    epoch: &str,
    offset: u64,
) -> Value {
    let since = json!({"epoch": epoch, "offset": offset});
    client_subscribe(client, id, json!({"topic": topic, "since": since})).await
}

/// The next `count` topic messages' offsets and data.
async fn messages(client: &mut WsClient, count: usize) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    for _ in 0..count {
        let message = client.recv_json().await;
        assert_eq!(message["type"], "message", "{message}");
        got.push((message["offset"].as_u64().unwrap(), message["data"].clone()));
    }
    got
}

#[tokio::test]
async fn a_publish_reaches_exactly_the_topics_subscribers_and_never_another_tenant() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let (mut alice, alice_id) = system.connect_found("alice", "acme").await;
    let (mut bob, bob_id) = system.connect_found("bob", "acme").await;
    let (mut carol, carol_id) = system.connect_found("carol", "globex").await;

    let subscribed = connections
        .subscribe(subscribe("acme", "orders/42", &alice_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(subscribed.connection_ids, std::slice::from_ref(&alice_id));
    let epoch = subscribed.position.unwrap().epoch;
    // The same topic name in another tenant is another topic.
    connections
        .subscribe(subscribe("globex", "orders/42", &carol_id))
        .await
        .unwrap();

    let published = publish(&mut connections, "acme", "orders/42", json!({"total": 3})).await;
    assert_eq!(published.delivered, 1);
    assert_eq!(published.edges, 1);
    assert_eq!(published.position.as_ref().unwrap().offset, 1);
    assert_eq!(
        alice.recv_json().await,
        json!({"type": "message", "topic": "orders/42", "epoch": epoch, "offset": 1,
               "data": {"total": 3}})
    );
    nothing_more(&mut connections, &mut bob, &bob_id).await;
    nothing_more(&mut connections, &mut carol, &carol_id).await;

    // Listed by topic and by connection; a subscription ends with its
    // connection.
    use v1::list_subscriptions_request::Selector;
    let by_topic = listed(&mut connections, Selector::Topic("orders/42".into())).await;
    let ids: Vec<&str> = by_topic.iter().map(|s| s.connection_id.as_str()).collect();
    assert_eq!(ids, [alice_id.as_str()]);
    assert_eq!(by_topic[0].user_id, "alice");
    let of_alice = listed(&mut connections, Selector::ConnectionId(alice_id.clone())).await;
    assert_eq!(of_alice.len(), 1);
    assert_eq!(of_alice[0].topic, "orders/42");

    alice.close().await;
    support::eventually("alice's subscription to end", || {
        let mut connections = connections.clone();
        async move {
            listed(&mut connections, Selector::Topic("orders/42".into()))
                .await
                .is_empty()
        }
    })
    .await;
    let published = publish(&mut connections, "acme", "orders/42", json!({"total": 4})).await;
    assert_eq!((published.delivered, published.edges), (0, 0));
}

#[tokio::test]
async fn every_connection_of_a_user_is_subscribed_and_unsubscribed_at_once() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let mut first = system.connect("alice", "acme").await;
    let mut second = system.connect("alice", "acme").await;
    let by_user = |user: &str| v1::SubscribeRequest {
        tenant_id: "acme".into(),
        topic: "news".into(),
        target: Some(v1::subscribe_request::Target::UserId(user.into())),
    };
    let subscribed = connections
        .subscribe(by_user("alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(subscribed.connection_ids.len(), 2);
    let published = publish(&mut connections, "acme", "news", json!("hello")).await;
    assert_eq!(published.delivered, 2);
    for client in [&mut first, &mut second] {
        assert_eq!(messages(client, 1).await, [(1, json!("hello"))]);
    }

    let ended = connections
        .unsubscribe(v1::UnsubscribeRequest {
            tenant_id: "acme".into(),
            topic: "news".into(),
            target: Some(v1::unsubscribe_request::Target::UserId("alice".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.connection_ids.len(), 2);
    let published = publish(&mut connections, "acme", "news", json!("gone")).await;
    assert_eq!(published.delivered, 0);
}

#[tokio::test]
async fn a_client_subscribes_itself_only_where_its_token_or_a_rule_allows() {
    let system = TestSystem::start_with(|config| {
        config.connection.topics.client_topics = vec!["users/{user_id}/**".into()];
    })
    .await;
    let mut connections = system.connections().await;
    let mut alice = connect_with_topics(&system, "alice", &["orders/*"]).await;

    let answer = client_subscribe(&mut alice, "s1", json!({"topic": "orders/42"})).await;
    assert_eq!(answer["type"], "response", "{answer}");
    assert_eq!(answer["data"]["topic"], "orders/42");
    assert_eq!(answer["data"]["offset"], 0);
    assert!(answer["data"]["epoch"].is_string(), "{answer}");

    // Outside its claim: refused, and not subscribed.
    let refused = client_subscribe(&mut alice, "s2", json!({"topic": "invoices/1"})).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"]["code"], "UNAUTHORIZED");
    assert_eq!(
        publish(&mut connections, "acme", "invoices/1", json!(1))
            .await
            .delivered,
        0
    );

    // The configured rule: its own user's topics, not another's.
    let own = client_subscribe(&mut alice, "s3", json!({"topic": "users/alice/inbox"})).await;
    assert_eq!(own["type"], "response", "{own}");
    let other = client_subscribe(&mut alice, "s4", json!({"topic": "users/bob/inbox"})).await;
    assert_eq!(other["error"]["code"], "UNAUTHORIZED", "{other}");

    // Malformed requests are answered, and change nothing.
    for (id, payload) in [
        ("b1", json!({})),
        ("b2", json!({"topic": ""})),
        ("b3", json!({"topic": 7})),
        ("b4", json!({"topic": "orders/1", "since": {"epoch": 1}})),
        ("b5", json!({"topic": "orders/1", "since": "yesterday"})),
    ] {
        let answer = client_subscribe(&mut alice, id, payload).await;
        assert_eq!(answer["error"]["code"], "VALIDATION_ERROR", "{answer}");
    }

    publish(&mut connections, "acme", "orders/42", json!({"n": 1})).await;
    assert_eq!(messages(&mut alice, 1).await, [(1, json!({"n": 1}))]);

    alice
        .send_json(json!({"action": "unsubscribe", "id": "u1", "payload": {"topic": "orders/42"}}))
        .await;
    let answer = alice.recv_json().await;
    assert_eq!(
        answer["data"],
        json!({"topic": "orders/42", "unsubscribed": true})
    );
    assert_eq!(
        publish(&mut connections, "acme", "orders/42", json!({"n": 2}))
            .await
            .delivered,
        0
    );
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed_in_order_then_new_messages() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let mut alice = connect_with_topics(&system, "alice", &["news"]).await;
    let answer = client_subscribe(&mut alice, "s1", json!({"topic": "news"})).await;
    let epoch = answer["data"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish(&mut connections, "acme", "news", json!(n)).await;
    }
    let seen = messages(&mut alice, 3).await;
    assert_eq!(seen.last().unwrap().0, 3);
    alice.close().await;

    // Missed while away.
    for n in 4..=6 {
        publish(&mut connections, "acme", "news", json!(n)).await;
    }
    let mut alice = connect_with_topics(&system, "alice", &["news"]).await;
    let answer = resubscribe(&mut alice, "s2", "news", &epoch, 3).await;
    assert_eq!(answer["data"]["recovered"], true, "{answer}");
    assert_eq!(answer["data"]["offset"], 6);
    publish(&mut connections, "acme", "news", json!(7)).await;
    assert_eq!(
        messages(&mut alice, 4).await,
        [(4, json!(4)), (5, json!(5)), (6, json!(6)), (7, json!(7))]
    );
}

#[tokio::test]
async fn messages_published_while_a_client_recovers_come_once_and_in_order() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let mut alice = connect_with_topics(&system, "alice", &["ticks"]).await;
    let epoch =
        client_subscribe(&mut alice, "s0", json!({"topic": "ticks"})).await["data"]["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    alice.close().await;
    for n in 1..=50 {
        publish(&mut connections, "acme", "ticks", json!(n)).await;
    }
    // A publisher keeps going while the client comes back from offset 10.
    let publisher = {
        let mut connections = connections.clone();
        tokio::spawn(async move {
            for n in 51..=150 {
                publish(&mut connections, "acme", "ticks", json!(n)).await;
            }
        })
    };
    let mut alice = connect_with_topics(&system, "alice", &["ticks"]).await;
    let answer = resubscribe(&mut alice, "s1", "ticks", &epoch, 10).await;
    assert_eq!(answer["data"]["recovered"], true, "{answer}");
    within("the publisher", publisher).await.unwrap();
    let offsets: Vec<u64> = messages(&mut alice, 140)
        .await
        .into_iter()
        .map(|(offset, data)| {
            assert_eq!(data, json!(offset));
            offset
        })
        .collect();
    assert_eq!(offsets, (11..=150).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_gap_the_history_no_longer_covers_is_reported_not_hidden() {
    let system = TestSystem::start_with(|config| {
        config.connection.topics.retention = Retention {
            max_messages: 3,
            max_age: std::time::Duration::from_secs(3600),
        };
    })
    .await;
    let mut connections = system.connections().await;
    let mut epoch = String::new();
    for n in 1..=10 {
        let published = publish(&mut connections, "acme", "news", json!(n)).await;
        epoch = published.position.unwrap().epoch;
    }
    let mut alice = connect_with_topics(&system, "alice", &["news"]).await;
    // Offsets 3..7 are gone: told so, and given what is kept.
    let answer = resubscribe(&mut alice, "s1", "news", &epoch, 2).await;
    assert_eq!(answer["data"]["recovered"], false, "{answer}");
    assert_eq!(
        messages(&mut alice, 3).await,
        [(8, json!(8)), (9, json!(9)), (10, json!(10))]
    );
    // A position of another epoch (a lost history) recovers nothing.
    let answer = resubscribe(&mut alice, "s2", "news", "some-other-epoch", 9).await;
    assert_eq!(answer["data"]["recovered"], false, "{answer}");
    assert_eq!(answer["data"]["epoch"], epoch.as_str());
}

#[tokio::test]
async fn topic_history_survives_a_restart() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let mut epoch = String::new();
    for n in 1..=3 {
        epoch = publish(&mut connections, "acme", "news", json!(n))
            .await
            .position
            .unwrap()
            .epoch;
    }
    let data_dir = system.stop().await;
    let system = TestSystem::start_in(data_dir, |_| {}).await;
    let mut connections = system.connections().await;
    let published = publish(&mut connections, "acme", "news", json!(4)).await;
    assert_eq!(
        published.position.unwrap(),
        v1::TopicPosition {
            epoch: epoch.clone(),
            offset: 4
        }
    );
    let mut alice = connect_with_topics(&system, "alice", &["news"]).await;
    let answer = resubscribe(&mut alice, "s1", "news", &epoch, 1).await;
    assert_eq!(answer["data"]["recovered"], true, "{answer}");
    assert_eq!(
        messages(&mut alice, 3).await,
        [(2, json!(2)), (3, json!(3)), (4, json!(4))]
    );
}

/// The error a call was refused with.
fn status<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    result.expect_err("expected an error")
}

#[tokio::test]
async fn bad_topic_calls_are_refused_with_the_reason() {
    let system = TestSystem::start().await;
    let mut connections = system.connections().await;
    let (_alice, alice_id) = system.connect_found("alice", "acme").await;
    let binary = status(
        connections
            .publish(v1::PublishRequest {
                tenant_id: "acme".into(),
                topic: "news".into(),
                payload: Some(v1::Payload {
                    body: Some(v1::payload::Body::Binary(vec![1, 2])),
                }),
                key: String::new(),
            })
            .await,
    );
    assert_eq!(binary.code(), Code::InvalidArgument, "{binary:?}");
    let no_topic = status(
        connections
            .subscribe(subscribe("acme", "", &alice_id))
            .await,
    );
    assert_eq!(no_topic.code(), Code::InvalidArgument, "{no_topic:?}");
    let control = status(
        connections
            .subscribe(subscribe("acme", "a\u{1f}b", &alice_id))
            .await,
    );
    assert_eq!(control.code(), Code::InvalidArgument, "{control:?}");
    let unknown = status(
        connections
            .subscribe(subscribe("acme", "news", "no-such-connection"))
            .await,
    );
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    // Another tenant's connection is not found either.
    let elsewhere = status(
        connections
            .subscribe(subscribe("globex", "news", &alice_id))
            .await,
    );
    assert_eq!(elsewhere.code(), Code::NotFound, "{elsewhere:?}");
    let no_target = status(
        connections
            .subscribe(v1::SubscribeRequest {
                tenant_id: "acme".into(),
                topic: "news".into(),
                target: None,
            })
            .await,
    );
    assert_eq!(no_target.code(), Code::InvalidArgument, "{no_target:?}");
    let no_selector = status(
        connections
            .list_subscriptions(v1::ListSubscriptionsRequest {
                tenant_id: "acme".into(),
                selector: None,
                page: None,
            })
            .await,
    );
    assert_eq!(no_selector.code(), Code::InvalidArgument, "{no_selector:?}");
    // Nothing was subscribed or published by any of it.
    let published = publish(&mut connections, "acme", "news", json!(1)).await;
    assert_eq!(published.position.unwrap().offset, 1);
    assert_eq!(published.delivered, 0);
}

/// A client of `user` in acme whose socket takes in only a few KiB before
/// it must be read, so that a client that does not read falls behind
/// after a few messages.
async fn connect_small_window(system: &TestSystem, user: &str) -> WsClient {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(system.addrs.gateway).await.unwrap();
    let url = system.ws_url(&system.token(user, "acme"));
    let (ws, _) = within(
        "the websocket to connect",
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)),
    )
    .await
    .unwrap();
    WsClient { ws }
}

/// The only connection of `user` in acme.
async fn connection_of(connections: &mut Connections, user: &str) -> String {
    let ids = support::user_connection_ids(connections, "acme", user).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids[0].clone()
}

/// 1,000 subscribers and one that never reads: the stalled one is closed
/// (1008) once its queue is full, and every other one gets every message in
/// order while it happens.
#[tokio::test]
async fn a_subscriber_that_never_reads_is_closed_and_delays_nobody() {
    const READERS: usize = 1000;
    const MESSAGES: u64 = 200;
    let system = TestSystem::start_with(|config| {
        config.gateway.outbound_queue = 16;
        config.gateway.send_buffer = Some(16 * 1024);
        config.gateway.max_handshakes = 1000;
        config.gateway.connection_rate_per_ip = 0.0;
    })
    .await;
    let mut connections = system.connections().await;
    let mut stalled = connect_small_window(&system, "stalled").await;
    let stalled_id = connection_of(&mut connections, "stalled").await;
    connections
        .subscribe(subscribe("acme", "feed", &stalled_id))
        .await
        .unwrap();
    // Each reader reads from the start (answering the edge's pings while
    // the others are set up), until it has every message.
    let mut receivers = Vec::new();
    for n in 0..READERS {
        let mut reader = system.connect(&format!("reader-{n}"), "acme").await;
        receivers.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            while offsets.len() < MESSAGES as usize {
                match reader.ws.next().await {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                        let message: Value = serde_json::from_str(&text).unwrap();
                        offsets.push(message["offset"].as_u64().unwrap());
                    }
                    Some(Ok(_)) => {}
                    other => panic!("reader {n} ended: {other:?}"),
                }
            }
            offsets
        }));
    }
    for n in 0..READERS {
        connections
            .subscribe(v1::SubscribeRequest {
                tenant_id: "acme".into(),
                topic: "feed".into(),
                target: Some(v1::subscribe_request::Target::UserId(format!("reader-{n}"))),
            })
            .await
            .unwrap();
    }
    let pad = "x".repeat(1024);
    let mut throttled = 0;
    for n in 1..=MESSAGES {
        let published = publish(
            &mut connections,
            "acme",
            "feed",
            json!({"n": n, "pad": pad}),
        )
        .await;
        throttled += published.throttled;
    }
    assert_eq!(throttled, 1, "the stalled subscriber is closed once");
    for receiver in receivers {
        let offsets = within("a reader's messages", receiver).await.unwrap();
        assert_eq!(offsets, (1..=MESSAGES).collect::<Vec<_>>());
    }
    // The stalled socket, read at last, has ended: with the policy's close
    // frame if that fitted in its buffers in time, or cut off.
    loop {
        match within("the stalled socket to end", stalled.ws.next()).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => break,
        }
    }
}

/// On a conflated topic a subscriber that falls behind is not closed: the
/// messages waiting for it are replaced by newer ones of the same key, and
/// it ends with the latest value.
#[tokio::test]
async fn a_conflated_topic_ends_with_the_latest_value() {
    const MESSAGES: u64 = 1000;
    let system = TestSystem::start_with(|config| {
        config.gateway.outbound_queue = 4;
        config.gateway.send_buffer = Some(16 * 1024);
        config.connection.topics.conflated = vec!["prices/*".into()];
    })
    .await;
    let mut connections = system.connections().await;
    let mut slow = connect_small_window(&system, "slow").await;
    let slow_id = connection_of(&mut connections, "slow").await;
    connections
        .subscribe(subscribe("acme", "prices/eur", &slow_id))
        .await
        .unwrap();
    let pad = "x".repeat(1024);
    for n in 1..=MESSAGES {
        let published = publish(
            &mut connections,
            "acme",
            "prices/eur",
            json!({"n": n, "pad": pad}),
        )
        .await;
        assert_eq!(published.throttled, 0);
    }
    // Read at last: offsets only go up, some were conflated away, and the
    // last one is the latest value.
    let mut last = 0;
    let mut received = 0;
    while last < MESSAGES {
        let message = slow.recv_json().await;
        let offset = message["offset"].as_u64().unwrap();
        assert!(offset > last, "{offset} after {last}");
        assert_eq!(message["data"]["n"], offset);
        last = offset;
        received += 1;
    }
    assert!(received < MESSAGES, "nothing was conflated: {received}");
    nothing_more(&mut connections, &mut slow, &slow_id).await;
}
