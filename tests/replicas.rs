//! Two ConnectionService replicas on one DynamoDB-protocol server (moto,
//! started by the test), and edges attached to both:
//! - a `Send`, a tenant `Broadcast` or a topic `Publish` made through
//!   either replica reaches every intended socket, on either edge, exactly
//!   once;
//! - a replica that stops takes no socket with it: the edges stay attached
//!   to the other, which still reaches every client;
//! - an edge that vanishes without a word (its streams reset) has its
//!   connections removed once its lease lapses, by whichever replica gets
//!   there first;
//! - a processor on one ProgressService replica gets work submitted through
//!   another, and work held by a processor whose replica went away is taken
//!   back when its lease lapses and done elsewhere: its final arrives once;
//! - a ConnectionService replica that follows every ProgressService replica
//!   queues each request through another when the one in turn is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::json;
use streamer_api::v1::{
    self, claim_response::Item, connection_service_client::ConnectionServiceClient,
    progress_service_client::ProgressServiceClient,
};
use streamer_core::shutdown::Shutdown;
use streamer_core::store::conformance::local_dynamodb;
use streamer_core::store::{DynamoStore, SharedStore};
use support::{WsClient, eventually, http_get, json_payload, within};
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// How long an edge lives without a replica hearing from it: short, so the
/// lapse is seen within the test.
const EDGE_LEASE: Duration = Duration::from_secs(3);

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn addr(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().unwrap()
}

/// A ConnectionService replica, restartable on the same addresses.
struct Replica {
    api: SocketAddr,
    edge: SocketAddr,
    shutdown: Shutdown,
    config: streamer_connection::ConnectionConfig,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A ProgressService replica, restartable on the same address.
struct ProgressReplica {
    addr: SocketAddr,
    shutdown: Shutdown,
    config: streamer_progress::ProgressConfig,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

struct Cluster {
    _data: tempfile::TempDir,
    /// AuthService replicas: their address and what stops each.
    auth: Vec<(SocketAddr, Shutdown)>,
    key: streamer_auth::dev::DevKey,
    store: SharedStore,
    replicas: Vec<Replica>,
    progress: Vec<ProgressReplica>,
    gateways: Vec<SocketAddr>,
    shutdown: Shutdown,
}

/// The async action the tests' processors run.
const ACTION: &str = "report";

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Cluster {
    /// `replicas` ConnectionService replicas, `progress` ProgressService
    /// replicas (ConnectionService replica i submits through ProgressService
    /// replica i + 1, so work crosses replicas) and `edges` edges attached
    /// to every ConnectionService replica, with one AuthService.
    async fn start(replicas: usize, progress: usize, edges: usize) -> Self {
        Self::start_with(1, replicas, progress, edges).await
    }

    /// The same with `auth` AuthService replicas, every edge using them all.
    async fn start_with(auth: usize, replicas: usize, progress: usize, edges: usize) -> Self {
        streamer_core::telemetry::init_logs(
            streamer_core::telemetry::LogFormat::Plain,
            &std::env::var("TEST_LOG").unwrap_or("error".into()),
        );
        let data = tempfile::tempdir().unwrap();
        let key = streamer_auth::dev::ensure_dev_key(data.path()).unwrap();
        let shutdown = Shutdown::new();
        let prefix = format!("replicas-{}-", uuid::Uuid::new_v4().simple());
        let dynamo = DynamoStore::local(&local_dynamodb::endpoint(), &prefix);
        dynamo.create_tables().await.unwrap();
        let store: SharedStore = Arc::new(dynamo);

        let mut auth_replicas = Vec::new();
        for i in 0..auth {
            let auth_l = listener().await;
            let stop = shutdown.child_token();
            auth_replicas.push((addr(&auth_l), stop.clone()));
            tokio::spawn(streamer::run_auth(
                auth_l,
                streamer::open_embedded_store(&data.path().join(format!("auth-{i}"))).unwrap(),
                streamer_auth::AuthConfig::new([streamer_auth::dev::public_key_path(data.path())]),
                Default::default(),
                stop,
            ));
        }
        let auth = auth_replicas[0].0;
        let every_auth = auth_replicas
            .iter()
            .map(|(a, _)| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut api_listeners = Vec::new();
        for _ in 0..replicas {
            api_listeners.push(listener().await);
        }
        let mut progress_replicas = Vec::new();
        for i in 0..progress {
            let progress_l = listener().await;
            let mut replica = ProgressReplica {
                addr: addr(&progress_l),
                shutdown: shutdown.child_token(),
                config: streamer_progress::ProgressConfig {
                    connection_endpoint: format!("http://{}", addr(&api_listeners[i % replicas])),
                    async_actions: vec![ACTION.into()],
                    store_poll: Duration::from_millis(200),
                    ..Default::default()
                },
                task: None,
            };
            replica.task = Some(tokio::spawn(streamer::run_progress(
                progress_l,
                store.clone(),
                replica.config.clone(),
                replica.shutdown.clone(),
            )));
            progress_replicas.push(replica);
        }
        let mut started = Vec::new();
        for (i, api_l) in api_listeners.into_iter().enumerate() {
            let edge_l = listener().await;
            let mut replica = Replica {
                api: addr(&api_l),
                edge: addr(&edge_l),
                shutdown: shutdown.child_token(),
                config: streamer_connection::ConnectionConfig {
                    progress_endpoint: (progress > 0)
                        .then(|| format!("http://{}", progress_replicas[(i + 1) % progress].addr)),
                    auth_endpoint: Some(format!("http://{auth}")),
                    edge_lease: EDGE_LEASE,
                    ..Default::default()
                },
                task: None,
            };
            replica.task = Some(tokio::spawn(streamer::run_connection(
                api_l,
                edge_l,
                store.clone(),
                replica.config.clone(),
                replica.shutdown.clone(),
            )));
            started.push(replica);
        }
        let every_replica = started
            .iter()
            .map(|r| format!("http://{}", r.edge))
            .collect::<Vec<_>>()
            .join(",");
        let mut gateways = Vec::new();
        for _ in 0..edges {
            let gateway_l = listener().await;
            gateways.push(addr(&gateway_l));
            tokio::spawn(streamer::run_gateway(
                gateway_l,
                streamer_gateway::GatewayConfig {
                    auth_endpoint: every_auth.clone(),
                    connection_endpoint: every_replica.clone(),
                    ..Default::default()
                },
                shutdown.clone(),
            ));
        }
        let cluster = Self {
            _data: data,
            auth: auth_replicas,
            key,
            store,
            replicas: started,
            progress: progress_replicas,
            gateways,
            shutdown,
        };
        for gateway in &cluster.gateways {
            cluster.wait_attached(*gateway, replicas).await;
        }
        cluster
    }

    /// Stops ConnectionService replica `i` and starts it again on the same
    /// addresses and store.
    async fn restart_connection(&mut self, i: usize) {
        let replica = &mut self.replicas[i];
        replica.shutdown.cancel();
        if let Some(task) = replica.task.take() {
            within("a connection replica to stop", task)
                .await
                .unwrap()
                .unwrap();
        }
        let (api_l, edge_l) = (
            TcpListener::bind(replica.api).await.unwrap(),
            TcpListener::bind(replica.edge).await.unwrap(),
        );
        replica.shutdown = self.shutdown.child_token();
        replica.task = Some(tokio::spawn(streamer::run_connection(
            api_l,
            edge_l,
            self.store.clone(),
            replica.config.clone(),
            replica.shutdown.clone(),
        )));
    }

    /// Stops ProgressService replica `i` and starts it again on the same
    /// address and store.
    async fn restart_progress(&mut self, i: usize) {
        let replica = &mut self.progress[i];
        replica.shutdown.cancel();
        if let Some(task) = replica.task.take() {
            within("a progress replica to stop", task)
                .await
                .unwrap()
                .unwrap();
        }
        let listener = TcpListener::bind(replica.addr).await.unwrap();
        replica.shutdown = self.shutdown.child_token();
        replica.task = Some(tokio::spawn(streamer::run_progress(
            listener,
            self.store.clone(),
            replica.config.clone(),
            replica.shutdown.clone(),
        )));
    }

    /// Until the edge at `gateway` is attached to `replicas` replicas.
    async fn wait_attached(&self, gateway: SocketAddr, replicas: usize) {
        let want = format!("attached to {replicas} connection");
        eventually(&format!("edge {gateway} attached to {replicas}"), || {
            let want = want.clone();
            async move {
                http_get(&format!("http://{gateway}/readyz"))
                    .await
                    .is_some_and(|(status, body)| status == 200 && body.contains(&want))
            }
        })
        .await;
    }

    /// A client of `user` (tenant acme) on the edge at `gateway`, with its
    /// connection id.
    async fn connect(&self, gateway: SocketAddr, user: &str) -> (WsClient, String) {
        let token = self
            .key
            .mint(&streamer_auth::dev::MintOptions {
                sub: user.into(),
                tenant: "acme".into(),
                ..Default::default()
            })
            .unwrap();
        let url = format!("ws://{gateway}/?Authorization={token}");
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut connections = self.connections(0).await;
        let ids = support::user_connection_ids(&mut connections, "acme", user).await;
        assert_eq!(ids.len(), 1, "{user} has one connection");
        (WsClient { ws }, ids[0].clone())
    }

    async fn progress(&self, replica: usize) -> ProgressServiceClient<Channel> {
        ProgressServiceClient::connect(format!("http://{}", self.progress[replica].addr))
            .await
            .unwrap()
    }

    async fn connections(&self, replica: usize) -> ConnectionServiceClient<Channel> {
        ConnectionServiceClient::connect(format!("http://{}", self.replicas[replica].api))
            .await
            .unwrap()
    }
}

/// Six clients, three on each of two edges.
async fn clients(cluster: &Cluster) -> BTreeMap<String, (WsClient, String)> {
    let mut clients = BTreeMap::new();
    for (i, gateway) in cluster.gateways.iter().enumerate() {
        for n in 0..3 {
            let user = format!("user-{i}-{n}");
            let client = cluster.connect(*gateway, &user).await;
            clients.insert(user, client);
        }
    }
    clients
}

/// A broadcast of `value` to tenant acme, and what became of it.
async fn to_acme(
    connections: &mut ConnectionServiceClient<Channel>,
    value: serde_json::Value,
) -> v1::BroadcastResponse {
    connections
        .broadcast(v1::BroadcastRequest {
            target: Some(v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                tenant_id: "acme".into(),
            })),
            payload: json_payload(value),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// What `client` receives next, within the test's patience.
async fn next(client: &mut WsClient) -> serde_json::Value {
    within("a message", client.recv_json()).await
}

/// What `client` receives next, a payload a backend delivered with `Send`
/// or `Broadcast` (whose shape is the backend's own).
async fn next_delivered(client: &mut WsClient) -> serde_json::Value {
    within("a message", client.recv_backend_json()).await
}

/// Nothing more arrives at `client` for a moment (after a marker sent
/// through the same path, so anything sent before it has arrived).
async fn nothing_more(cluster: &Cluster, user: &str, client: &mut WsClient, id: &str) {
    let mut connections = cluster.connections(0).await;
    let sent = connections
        .send(support::send(id, json!({"marker": user})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.outcome(), v1::DeliveryOutcome::Delivered);
    assert_eq!(
        next_delivered(client).await,
        json!({"marker": user}),
        "no duplicate before the marker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_and_broadcasts_through_either_replica_reach_each_socket_exactly_once() {
    let cluster = Cluster::start(2, 0, 2).await;
    let mut clients = clients(&cluster).await;

    for replica in 0..2 {
        let mut connections = cluster.connections(replica).await;
        for (user, (_, id)) in &clients {
            let sent = connections
                .send(support::send(id, json!({"to": user, "via": replica})))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                sent.outcome(),
                v1::DeliveryOutcome::Delivered,
                "{user} via {replica}"
            );
        }
        let broadcast = to_acme(&mut connections, json!({"all": replica})).await;
        assert_eq!(broadcast.delivered, 6, "via {replica}: {broadcast:?}");
        assert_eq!(
            broadcast.unavailable + broadcast.gone + broadcast.not_found,
            0
        );
    }
    for (user, (client, id)) in &mut clients {
        for replica in 0..2 {
            assert_eq!(
                next_delivered(client).await,
                json!({"to": user, "via": replica})
            );
            assert_eq!(next_delivered(client).await, json!({"all": replica}));
        }
        nothing_more(&cluster, user, client, id).await;
    }
}

/// Subscribers on two edges, subscribed through one replica (by RPC and by
/// client action): publishes through either replica reach each of them
/// once, in offset order, and one topic's offsets are shared by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_publishes_through_either_replica_reach_every_subscriber_once_in_order() {
    let cluster = Cluster::start(2, 0, 2).await;
    let mut clients = clients(&cluster).await;
    let mut first = cluster.connections(0).await;
    for (user, (client, id)) in clients.iter_mut() {
        if user.ends_with("-0") {
            client
                .send_json(json!({"action": "subscribe", "id": "s", "payload": {"topic": "news"}}))
                .await;
            // Refused: their tokens allow no topic.
            assert_eq!(next(client).await["error"]["code"], "UNAUTHORIZED");
        }
        first
            .subscribe(v1::SubscribeRequest {
                tenant_id: "acme".into(),
                topic: "news".into(),
                target: Some(v1::subscribe_request::Target::ConnectionId(id.clone())),
            })
            .await
            .unwrap();
    }
    for n in 1..=10u64 {
        let mut connections = cluster.connections((n % 2) as usize).await;
        let published = connections
            .publish(v1::PublishRequest {
                tenant_id: "acme".into(),
                topic: "news".into(),
                payload: json_payload(json!(n)),
                key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(published.position.unwrap().offset, n);
        assert_eq!((published.delivered, published.edges), (6, 2), "{n}");
    }
    for (user, (client, id)) in &mut clients {
        for n in 1..=10u64 {
            let message = next(client).await;
            assert_eq!(
                (&message["offset"], &message["data"]),
                (&json!(n), &json!(n)),
                "{user}"
            );
        }
        nothing_more(&cluster, user, client, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_takes_no_socket_with_it() {
    let cluster = Cluster::start(2, 0, 2).await;
    let mut clients = clients(&cluster).await;

    cluster.replicas[1].shutdown.cancel();
    for gateway in &cluster.gateways {
        cluster.wait_attached(*gateway, 1).await;
    }
    // Longer than the lease: the surviving replica keeps every edge alive.
    tokio::time::sleep(EDGE_LEASE * 2).await;

    let mut connections = cluster.connections(0).await;
    let broadcast = to_acme(&mut connections, json!({"after": "stop"})).await;
    assert_eq!(broadcast.delivered, 6, "{broadcast:?}");
    for (user, (client, id)) in &mut clients {
        assert_eq!(
            next_delivered(client).await,
            json!({"after": "stop"}),
            "{user}"
        );
        nothing_more(&cluster, user, client, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_vanishes_has_its_connections_removed_once_its_lease_lapses() {
    let cluster = Cluster::start(2, 0, 1).await;
    let (_alive, alive_id) = cluster.connect(cluster.gateways[0], "alive").await;

    // A ghost edge: it attaches to both replicas, announces two sockets,
    // then its streams reset, as when its process is killed.
    let ghost: Vec<_> = ["ghost-1", "ghost-2"]
        .iter()
        .map(|id| v1::Connection {
            connection_id: (*id).into(),
            identity: Some(v1::Identity {
                user_id: "ghost".into(),
                tenant_id: "acme".into(),
                permissions: vec![],
                topics: vec![],
            }),
            ..Default::default()
        })
        .collect();
    // On a runtime of its own, so that dropping it closes its sockets the
    // way a killed process's close.
    let edges: Vec<SocketAddr> = cluster.replicas.iter().map(|r| r.edge).collect();
    let (attached_tx, attached) = tokio::sync::oneshot::channel();
    let (kill, killed) = std::sync::mpsc::channel::<()>();
    let ghost_process = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let streams = runtime.block_on(async move {
            let mut streams = Vec::new();
            for edge in edges {
                let mut client =
                    v1::edge_service_client::EdgeServiceClient::connect(format!("http://{edge}"))
                        .await
                        .unwrap();
                let hello = v1::AttachRequest {
                    event: Some(v1::attach_request::Event::Hello(v1::EdgeHello {
                        edge_id: "ghost-edge".into(),
                        connections: ghost.clone(),
                        tokens: Default::default(),
                        taken_at: None,
                        apigateway: false,
                    })),
                };
                let events = tokio_stream::StreamExt::chain(
                    tokio_stream::iter([hello]),
                    tokio_stream::pending(),
                );
                streams.push(client.attach(events).await.unwrap());
            }
            streams
        });
        let _ = attached_tx.send(());
        let _ = killed.recv();
        runtime.shutdown_background();
        drop(streams);
    });
    within("the ghost to attach", attached).await.unwrap();
    let listed = |store: SharedStore| async move {
        let mut ids: Vec<streamer_core::ids::ConnectionId> = store
            .list_connections(&"acme".into(), Some(&"ghost".into()), None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.connection_id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(listed(cluster.store.clone()).await, ["ghost-1", "ghost-2"]);
    let edge = cluster
        .store
        .get_edge(&"ghost-edge".into())
        .await
        .unwrap()
        .unwrap();
    assert!(edge.lease_expires_at_ms > streamer_core::store::now_ms());

    let vanished = std::time::Instant::now();
    kill.send(()).unwrap();
    ghost_process.join().unwrap();
    eventually("the ghost's connections to go", || {
        let store = cluster.store.clone();
        async move { listed(store).await.is_empty() }
    })
    .await;
    // Not before the lease ran out, and not long after (a renewal tick,
    // then a sweep tick, each a third of the lease).
    let gone_after = vanished.elapsed();
    assert!(
        gone_after >= EDGE_LEASE - Duration::from_millis(1_100),
        "removed after {gone_after:?}, before the lease could lapse"
    );
    assert!(
        cluster
            .store
            .get_edge(&"ghost-edge".into())
            .await
            .unwrap()
            .is_none()
    );
    // The live edge and its client are untouched.
    let mut connections = cluster.connections(1).await;
    let sent = connections
        .send(support::send(&alive_id, json!({"still": "here"})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.outcome(), v1::DeliveryOutcome::Delivered);
}

/// The next work item of a Claim stream.
async fn next_work(work: &mut tonic::Streaming<v1::ClaimResponse>) -> v1::Request {
    loop {
        match within("work", work.message()).await.unwrap() {
            Some(v1::ClaimResponse {
                item: Some(Item::Work(request)),
                ..
            }) => return request,
            Some(_) => continue,
            None => panic!("the Claim stream ended"),
        }
    }
}

fn complete(id: &str, processor: &str) -> v1::CompleteRequest {
    v1::CompleteRequest {
        id: id.into(),
        processor_id: processor.into(),
        result: Some(streamer_api::json::to_proto(json!({"done": processor}))),
    }
}

/// One ConnectionService replica submitting through ProgressService 1, a
/// processor on ProgressService 0 with room for `max_in_flight`, and a
/// client whose request `job-1` the processor now holds.
async fn work_across_replicas(
    max_in_flight: u32,
) -> (
    Cluster,
    ProgressServiceClient<Channel>,
    tonic::Streaming<v1::ClaimResponse>,
    WsClient,
    v1::Request,
) {
    let cluster = Cluster::start(1, 2, 1).await;
    let mut processor = cluster.progress(0).await;
    let mut work = support::claim(
        &mut processor,
        support::claim_request("p0", ACTION, max_in_flight, 60),
    )
    .await;
    let (mut client, _) = cluster.connect(cluster.gateways[0], "alice").await;
    client
        .send_json(json!({"action": ACTION, "id": "job-1", "payload": {}}))
        .await;
    assert_eq!(next(&mut client).await["type"], "acknowledgment");
    let request = next_work(&mut work).await;
    (cluster, processor, work, client, request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_on_one_progress_replica_does_work_submitted_through_another() {
    let (_cluster, mut processor, _work, mut client, request) = work_across_replicas(4).await;
    processor
        .complete(complete(&request.id, "p0"))
        .await
        .unwrap();
    let done = next(&mut client).await;
    assert_eq!(done["type"], "complete", "{done}");
    assert_eq!(done["request_id"], "job-1");
    assert_eq!(done["result"], json!({"done": "p0"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_goes_on_to_another_progress_replica_when_one_is_gone() {
    let mut cluster = Cluster::start(1, 2, 1).await;
    // The connection replica follows both progress replicas, in turn.
    let both = format!(
        "http://{},http://{}",
        cluster.progress[0].addr, cluster.progress[1].addr
    );
    cluster.replicas[0].config.progress_endpoint = Some(both);
    cluster.restart_connection(0).await;
    cluster.wait_attached(cluster.gateways[0], 1).await;
    let mut processor = cluster.progress(0).await;
    let mut work =
        support::claim(&mut processor, support::claim_request("p0", ACTION, 8, 60)).await;
    // Progress replica 1 goes away: every other Submit meets it first.
    cluster.progress[1].shutdown.cancel();
    within(
        "progress replica 1 to stop",
        cluster.progress[1].task.take().unwrap(),
    )
    .await
    .unwrap()
    .unwrap();

    let (mut client, _) = cluster.connect(cluster.gateways[0], "alice").await;
    let jobs: Vec<String> = (1..=4).map(|n| format!("job-{n}")).collect();
    for job in &jobs {
        client
            .send_json(json!({"action": ACTION, "id": job, "payload": {}}))
            .await;
    }
    for _ in &jobs {
        let request = next_work(&mut work).await;
        processor
            .complete(complete(&request.id, "p0"))
            .await
            .unwrap();
    }
    let mut acknowledged = Vec::new();
    let mut completed = Vec::new();
    while completed.len() < jobs.len() {
        let message = next(&mut client).await;
        let id = message["request_id"].as_str().unwrap().to_owned();
        match message["type"].as_str() {
            Some("acknowledgment") => acknowledged.push(id),
            Some("complete") => completed.push(id),
            _ => panic!("unexpected: {message}"),
        }
    }
    acknowledged.sort();
    completed.sort();
    assert_eq!(acknowledged, jobs, "each queued once, and acknowledged");
    assert_eq!(completed, jobs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_for_an_action_one_progress_replica_knows_is_never_refused() {
    // An action no replica lists in --async-actions: only the processor's
    // registration on replica 0 makes it known, there alone.
    const CLAIMED: &str = "claimed_on_one_replica";
    let mut cluster = Cluster::start(1, 2, 1).await;
    let both = format!(
        "http://{},http://{}",
        cluster.progress[0].addr, cluster.progress[1].addr
    );
    cluster.replicas[0].config.progress_endpoint = Some(both);
    cluster.restart_connection(0).await;
    cluster.wait_attached(cluster.gateways[0], 1).await;
    let mut processor = cluster.progress(0).await;
    let mut work =
        support::claim(&mut processor, support::claim_request("p0", CLAIMED, 8, 60)).await;
    // Replica 1 alone refuses it...
    let (mut client, connection_id) = cluster.connect(cluster.gateways[0], "alice").await;
    let refused = cluster
        .progress(1)
        .await
        .submit(v1::SubmitRequest {
            connection_id,
            action: CLAIMED.into(),
            request_id: "direct".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        streamer_api::errors::reason_of(&refused).as_deref(),
        Some("ACTION_NOT_HANDLED")
    );
    // ...yet every frame a client sends, whichever replica ConnectionService
    // asks first (in turn), is queued and reaches the processor.
    let jobs: Vec<String> = (1..=4).map(|n| format!("job-{n}")).collect();
    for job in &jobs {
        client
            .send_json(json!({"action": CLAIMED, "id": job, "payload": {}}))
            .await;
    }
    let mut acknowledged = Vec::new();
    for _ in &jobs {
        let message = next(&mut client).await;
        assert_eq!(message["type"], "acknowledgment", "{message}");
        acknowledged.push(message["request_id"].as_str().unwrap().to_owned());
    }
    acknowledged.sort();
    assert_eq!(acknowledged, jobs, "each queued once");
    let mut worked: Vec<String> = Vec::new();
    for _ in &jobs {
        worked.push(next_work(&mut work).await.request_id);
    }
    worked.sort();
    assert_eq!(worked, jobs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_held_on_a_replica_that_goes_away_is_taken_back_by_its_lease() {
    let cluster = Cluster::start(1, 2, 1).await;
    let mut first = cluster.progress(0).await;
    let mut first_work =
        support::claim(&mut first, support::claim_request("p0", ACTION, 4, 2)).await;
    let (mut client, _) = cluster.connect(cluster.gateways[0], "alice").await;
    client
        .send_json(json!({"action": ACTION, "id": "job-1", "payload": {}}))
        .await;
    assert_eq!(next(&mut client).await["type"], "acknowledgment");
    let held = next_work(&mut first_work).await;
    assert_eq!(held.attempts, 1);

    // ProgressService 0 goes away with its processor and the work it held;
    // the lease (2 s) is in the store.
    cluster.progress[0].shutdown.cancel();
    drop(first_work);
    let mut second = cluster.progress(1).await;
    let mut second_work =
        support::claim(&mut second, support::claim_request("p1", ACTION, 4, 60)).await;
    let again = next_work(&mut second_work).await;
    assert_eq!(again.id, held.id);
    assert_eq!(again.attempts, 2, "handed out again after its lease lapsed");
    second.complete(complete(&again.id, "p1")).await.unwrap();
    let done = next(&mut client).await;
    assert_eq!(done["type"], "complete", "{done}");
    assert_eq!(done["result"], json!({"done": "p1"}));
    // Exactly one final: the lost attempt's processor cannot finish it now.
    let late = second.complete(complete(&again.id, "p0")).await;
    assert!(late.is_err(), "{late:?}");
    let mut connections = cluster.connections(0).await;
    let ids = support::user_connection_ids(&mut connections, "acme", "alice").await;
    nothing_more(&cluster, "alice", &mut client, &ids[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_on_one_replica_gets_frames_from_every_connection() {
    let cluster = Cluster::start(2, 0, 2).await;
    // The router listens on replica 1 only.
    let mut router = cluster.connections(1).await;
    let mut frames = support::receive(
        &mut router,
        v1::ReceiveRequest {
            actions: vec!["echo".into()],
            router_id: "only-on-1".into(),
        },
    )
    .await;
    let mut clients = clients(&cluster).await;
    // Until every edge knows where the router is: a probe frame answered.
    for (user, (client, id)) in &mut clients {
        client
            .send_json(json!({"action": "echo", "id": format!("probe-{user}"), "payload": {}}))
            .await;
        let frame = within("the probe at the router", frames.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&frame.connection_id, id, "{user}'s probe");
        assert_eq!(frame.request_id, format!("probe-{user}"));
    }
    // Every connection's frames, whichever replica its events go to, reach
    // the one router, once each.
    for (user, (client, _)) in &mut clients {
        for n in 0..3 {
            client
                .send_json(
                    json!({"action": "echo", "id": format!("{user}-{n}"), "payload": {"n": n}}),
                )
                .await;
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..clients.len() * 3 {
        let frame = within("a frame at the router", frames.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            seen.insert(frame.request_id.clone()),
            "{} twice",
            frame.request_id
        );
    }
    let expected: std::collections::BTreeSet<String> = clients
        .keys()
        .flat_map(|user| (0..3).map(move |n| format!("{user}-{n}")))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_spreads_token_checks_over_auth_replicas_and_survives_one_going() {
    let cluster = Cluster::start_with(2, 1, 0, 1).await;
    // With both up, clients connect whichever replica checks their token.
    for n in 0..2 {
        cluster
            .connect(cluster.gateways[0], &format!("before-{n}"))
            .await;
    }
    // One AuthService replica goes; the edge, still taking it in turn, is
    // answered by the other when it does not answer: every client connects.
    cluster.auth[0].1.cancel();
    for n in 0..4 {
        cluster
            .connect(cluster.gateways[0], &format!("after-{n}"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_replica_reaches_the_processor_and_frees_its_slot() {
    // The processor has room for one request.
    let (_cluster, mut processor, mut work, mut client, held) = work_across_replicas(1).await;
    client
        .send_json(
            json!({"action": "cancel_request", "id": "c-1", "payload": {"request_id": "job-1"}}),
        )
        .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(next(&mut client).await["type"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(
        seen,
        ["error", "response"],
        "the cancel's answer and the final"
    );

    // Replica 0 could not be told; the processor's next report tells it.
    let summary = processor
        .report(tokio_stream::iter([v1::ReportRequest {
            id: held.id.clone(),
            processor_id: "p0".into(),
            percentage: 50.0,
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.accepted, summary.rejected), (0, 1));
    let notice = within("the cancel notice", work.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notice.item, Some(Item::Cancelled(held.id.clone())));
    assert_eq!(
        notice.cancel_reason(),
        v1::CancelReason::Cancelled,
        "cancelled, not taken back"
    );
    // Its one slot is free again: the next request reaches it.
    client
        .send_json(json!({"action": ACTION, "id": "job-2", "payload": {}}))
        .await;
    assert_eq!(next(&mut client).await["type"], "acknowledgment");
    let next_one = next_work(&mut work).await;
    assert_ne!(next_one.id, held.id);
}

/// A processor that completes whatever it is given, claiming on the
/// ProgressService replicas in turn: when its stream ends (its replica
/// restarts), it claims on the next one.
fn spawn_processor(
    replicas: Vec<SocketAddr>,
    id: &str,
    stop: Shutdown,
) -> tokio::task::JoinHandle<()> {
    let id = id.to_owned();
    tokio::spawn(async move {
        for turn in 0.. {
            if stop.is_cancelled() {
                return;
            }
            let address = replicas[turn % replicas.len()];
            let claimed = async {
                let mut client = ProgressServiceClient::connect(format!("http://{address}"))
                    .await
                    .ok()?;
                let work = client
                    .claim(support::claim_request(&id, ACTION, 8, 3))
                    .await
                    .ok()?
                    .into_inner();
                Some((client, work))
            };
            let Some((mut client, mut work)) = claimed.await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            loop {
                let next = tokio::select! {
                    next = work.message() => next,
                    () = stop.cancelled() => return,
                };
                match next {
                    Ok(Some(v1::ClaimResponse {
                        item: Some(Item::Work(request)),
                        ..
                    })) => {
                        // A refusal (the lease went elsewhere) is fine.
                        let _ = client.complete(complete(&request.id, &id)).await;
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_connection_and_progress_replicas_loses_no_accepted_request() {
    let mut cluster = Cluster::start(2, 2, 2).await;
    let stop_processors = Shutdown::new();
    let progress: Vec<SocketAddr> = cluster.progress.iter().map(|p| p.addr).collect();
    let processors: Vec<_> = (0..2)
        .map(|n| {
            let mut order = progress.clone();
            order.rotate_left(n);
            spawn_processor(order, &format!("p{n}"), stop_processors.clone())
        })
        .collect();

    const REQUESTS: usize = 20;
    let mut clients = Vec::new();
    for (i, gateway) in cluster.gateways.clone().into_iter().enumerate() {
        for n in 0..2 {
            let (client, _) = cluster.connect(gateway, &format!("user-{i}-{n}")).await;
            clients.push(client);
        }
    }
    // Each client submits a request every 150 ms while replicas restart,
    // and reads until every acknowledged request has its final (or a
    // generous deadline passes).
    let traffic: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            tokio::spawn(async move {
                let mut acknowledged = std::collections::BTreeSet::new();
                let mut finals: BTreeMap<String, usize> = BTreeMap::new();
                let mut sent = 0;
                let mut tick = tokio::time::interval(Duration::from_millis(150));
                let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
                loop {
                    let done_sending = sent == REQUESTS;
                    if done_sending && acknowledged.iter().all(|id| finals.contains_key(id)) {
                        break;
                    }
                    tokio::select! {
                        _ = tick.tick(), if !done_sending => {
                            client
                                .send_json(json!({"action": ACTION, "id": format!("c{c}-r{sent}"), "payload": {}}))
                                .await;
                            sent += 1;
                        }
                        message = client.ws.next() => {
                            let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = message else {
                                continue;
                            };
                            let message: serde_json::Value = serde_json::from_str(&text).unwrap();
                            let id = message["request_id"].as_str().unwrap_or_default().to_owned();
                            match message["type"].as_str() {
                                Some("acknowledgment") => { acknowledged.insert(id); }
                                Some("complete") => *finals.entry(id).or_default() += 1,
                                _ => {}
                            }
                        }
                        () = tokio::time::sleep_until(deadline) => break,
                    }
                }
                (acknowledged, finals, client)
            })
        })
        .collect();

    for i in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.restart_connection(i).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.restart_progress(i).await;
    }

    let mut after = Vec::new();
    for client in traffic {
        let (acknowledged, finals, client) = client.await.unwrap();
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|id| !finals.contains_key(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "acknowledged without a final: {missing:?}"
        );
        for (id, count) in &finals {
            assert_eq!(*count, 1, "{id}: one final, never two");
        }
        after.push(client);
    }
    // Requests sent while a replica stopped may have been refused (the
    // client told, or not answered: it retries). After the restarts every
    // client is served again.
    for (c, client) in after.iter_mut().enumerate() {
        let id = format!("c{c}-after");
        client
            .send_json(json!({"action": ACTION, "id": id, "payload": {}}))
            .await;
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let message = next(client).await;
            if message["request_id"] == id.as_str() {
                seen.push(message["type"].as_str().unwrap_or_default().to_owned());
            }
        }
        assert_eq!(seen, ["acknowledgment", "complete"], "{id}");
    }
    stop_processors.cancel();
    for processor in processors {
        processor.await.unwrap();
    }
}

/// A ProgressService that takes its time over each Submit and records
/// the client ids it was handed, in order; it answers nothing else.
#[derive(Clone)]
struct SlowProgress {
    submitted: tokio::sync::mpsc::UnboundedSender<String>,
}

#[tonic::async_trait]
impl v1::progress_service_server::ProgressService for SlowProgress {
    async fn submit(
        &self,
        request: tonic::Request<v1::SubmitRequest>,
    ) -> Result<tonic::Response<v1::SubmitResponse>, tonic::Status> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = self.submitted.send(request.into_inner().request_id);
        Ok(tonic::Response::new(v1::SubmitResponse::default()))
    }

    type ClaimStream = futures::stream::Empty<Result<v1::ClaimResponse, tonic::Status>>;

    async fn claim(
        &self,
        _: tonic::Request<v1::ClaimRequest>,
    ) -> Result<tonic::Response<Self::ClaimStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("claim"))
    }

    async fn report(
        &self,
        _: tonic::Request<tonic::Streaming<v1::ReportRequest>>,
    ) -> Result<tonic::Response<v1::ReportResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("report"))
    }

    async fn complete(
        &self,
        _: tonic::Request<v1::CompleteRequest>,
    ) -> Result<tonic::Response<v1::CompleteResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("complete"))
    }

    async fn fail(
        &self,
        _: tonic::Request<v1::FailRequest>,
    ) -> Result<tonic::Response<v1::FailResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fail"))
    }

    async fn cancel(
        &self,
        _: tonic::Request<v1::CancelRequest>,
    ) -> Result<tonic::Response<v1::CancelResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("cancel"))
    }

    async fn get(
        &self,
        _: tonic::Request<v1::GetRequest>,
    ) -> Result<tonic::Response<v1::GetResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("get"))
    }

    type WatchStream = futures::stream::Empty<Result<v1::WatchResponse, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<v1::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("watch"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_handles_every_frame_it_was_handed_first() {
    let mut cluster = Cluster::start(1, 0, 1).await;
    let (submitted_tx, mut submitted) = tokio::sync::mpsc::unbounded_channel();
    let slow_l = listener().await;
    let slow = addr(&slow_l);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::progress_service_server::ProgressServiceServer::new(
                SlowProgress {
                    submitted: submitted_tx,
                },
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(slow_l)),
    );
    cluster.replicas[0].config.progress_endpoint = Some(format!("http://{slow}"));
    cluster.restart_connection(0).await;
    cluster.wait_attached(cluster.gateways[0], 1).await;
    let (mut client, _) = cluster.connect(cluster.gateways[0], "alice").await;

    // Six requests from one connection: its worker takes them one at a
    // time, 300 ms each, so most are still queued when the replica stops.
    let jobs: Vec<String> = (1..=6).map(|n| format!("job-{n}")).collect();
    for job in &jobs {
        client
            .send_json(json!({"action": ACTION, "id": job, "payload": {}}))
            .await;
    }
    let first = within("the first submit", submitted.recv()).await.unwrap();
    assert_eq!(first, "job-1");
    let stopping = std::time::Instant::now();
    cluster.replicas[0].shutdown.cancel();
    within(
        "the replica to stop",
        cluster.replicas[0].task.take().unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    let stopped_after = stopping.elapsed();

    // Each frame the edge handed over is submitted before the replica ends,
    // in order; one the edge had not handed over yet is answered by the
    // edge itself (nothing to attach to): none is dropped unanswered.
    let mut handled = vec![first];
    while let Ok(job) = submitted.try_recv() {
        handled.push(job);
    }
    assert_eq!(handled, jobs[..handled.len()], "in order");
    for job in &jobs[handled.len()..] {
        let answer = next(&mut client).await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["request_id"], json!(job), "{answer}");
    }
    assert!(
        handled.len() >= 2,
        "the queued frames were handled, not dropped: {handled:?}"
    );
    assert!(
        stopped_after < Duration::from_secs(10),
        "stopped after {stopped_after:?}"
    );
}
