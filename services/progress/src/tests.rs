//! End-to-end tests of the service over real gRPC: a real embedded store in
//! a temporary directory, a real ProgressService server, and a small real
//! ConnectionService that knows the connections a test registers and
//! records every payload sent to them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use streamer_api::json::{from_proto, to_proto};
use streamer_api::v1;
use streamer_api::v1::connection_service_server::{ConnectionService, ConnectionServiceServer};
use streamer_api::v1::progress_service_client::ProgressServiceClient;
use streamer_core::shutdown::Shutdown;
use streamer_core::store::{EmbeddedStore, SharedStore};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{ProgressConfig, ProgressServer};

/// Long enough for a slow CI machine; a passing test never waits for it.
const PATIENCE: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ---- a real ConnectionService that records deliveries ----

#[derive(Clone)]
struct FakeConnections {
    known: Arc<Mutex<HashMap<String, v1::Identity>>>,
    sent: mpsc::UnboundedSender<(String, Value)>,
    /// Every send's identity, in arrival order: (connection, stream, number).
    identities: Arc<Mutex<Vec<(String, String, u64)>>>,
    /// How many of the next sends are written but answered UNAVAILABLE, as
    /// an edge whose report came too late.
    unconfirmed: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl ConnectionService for FakeConnections {
    async fn send(
        &self,
        request: Request<v1::SendRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let request = request.into_inner();
        let known = self
            .known
            .lock()
            .unwrap()
            .get(&request.connection_id)
            .cloned();
        match known {
            Some(identity)
                if request.tenant_id.is_empty() || request.tenant_id == identity.tenant_id =>
            {
                let json = match request.payload.and_then(|p| p.body) {
                    Some(v1::payload::Body::Text(text)) => {
                        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
                        // The protocol's `type` comes first, as written.
                        assert!(text.starts_with(r#"{"type":"#), "{text}");
                        json
                    }
                    other => panic!("expected a JSON text payload, got {other:?}"),
                };
                let sequence = request.sequence.expect("every message is sequenced");
                self.identities.lock().unwrap().push((
                    request.connection_id.clone(),
                    sequence.stream,
                    sequence.number,
                ));
                let _ = self.sent.send((request.connection_id, json));
                let unconfirmed = self
                    .unconfirmed
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok();
                let outcome = if unconfirmed {
                    v1::DeliveryOutcome::Unavailable
                } else {
                    v1::DeliveryOutcome::Delivered
                };
                Ok(Response::new(v1::SendResponse {
                    outcome: outcome as i32,
                }))
            }
            _ => Err(Status::not_found("no such connection")),
        }
    }
    async fn broadcast(
        &self,
        _: Request<v1::BroadcastRequest>,
    ) -> Result<Response<v1::BroadcastResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn is_active(
        &self,
        _: Request<v1::IsActiveRequest>,
    ) -> Result<Response<v1::IsActiveResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn get_connection(
        &self,
        request: Request<v1::GetConnectionRequest>,
    ) -> Result<Response<v1::GetConnectionResponse>, Status> {
        let id = request.into_inner().connection_id;
        let identity = self.known.lock().unwrap().get(&id).cloned();
        match identity {
            Some(identity) => Ok(Response::new(v1::GetConnectionResponse {
                connection: Some(v1::Connection {
                    connection_id: id,
                    identity: Some(identity),
                    ..Default::default()
                }),
            })),
            None => Err(Status::not_found("no such connection")),
        }
    }
    async fn list_connections(
        &self,
        _: Request<v1::ListConnectionsRequest>,
    ) -> Result<Response<v1::ListConnectionsResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn disconnect(
        &self,
        _: Request<v1::DisconnectRequest>,
    ) -> Result<Response<v1::DisconnectResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn subscribe(
        &self,
        _: Request<v1::SubscribeRequest>,
    ) -> Result<Response<v1::SubscribeResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn unsubscribe(
        &self,
        _: Request<v1::UnsubscribeRequest>,
    ) -> Result<Response<v1::UnsubscribeResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn publish(
        &self,
        _: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn list_subscriptions(
        &self,
        _: Request<v1::ListSubscriptionsRequest>,
    ) -> Result<Response<v1::ListSubscriptionsResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    type ReceiveStream = tokio_stream::Empty<Result<v1::ReceiveResponse, Status>>;
    async fn receive(
        &self,
        _: Request<v1::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        Err(Status::unimplemented("test"))
    }
}

/// Binds first, then serves on the bound listener: no port race.
async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

struct Harness {
    dir: tempfile::TempDir,
    fake: FakeConnections,
    sent: mpsc::UnboundedReceiver<(String, Value)>,
    _connection_shutdown: tokio_util::sync::DropGuard,
    config: ProgressConfig,
    progress: Option<Running>,
}

struct Running {
    client: ProgressServiceClient<Channel>,
    shutdown: Shutdown,
    join: JoinHandle<()>,
    server: ProgressServer,
}

impl Running {
    async fn start(dir: &Path, config: ProgressConfig) -> Self {
        let store: SharedStore = Arc::new(EmbeddedStore::open(dir).unwrap());
        let shutdown = Shutdown::new();
        let server = ProgressServer::start(store, config, shutdown.clone())
            .await
            .unwrap();
        let (listener, addr) = bind().await;
        let service = server.clone().into_service();
        let stop = shutdown.clone();
        let join = tokio::spawn(async move {
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        let client = ProgressServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self {
            client,
            shutdown,
            join,
            server,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        drop(self.client);
        within("the server to stop", self.join).await.unwrap();
        within("background tasks to end", self.server.stopped()).await;
    }
}

impl Harness {
    async fn start() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(tune: impl FnOnce(&mut ProgressConfig)) -> Self {
        let (sent_tx, sent) = mpsc::unbounded_channel();
        let fake = FakeConnections {
            known: Arc::default(),
            sent: sent_tx,
            identities: Arc::default(),
            unconfirmed: Arc::default(),
        };
        let (listener, addr) = bind().await;
        let connection_shutdown = Shutdown::new();
        let service = ConnectionServiceServer::new(fake.clone());
        let stop = connection_shutdown.clone();
        tokio::spawn(async move {
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        let mut config = ProgressConfig {
            connection_endpoint: format!("http://{addr}"),
            async_actions: vec!["report".to_owned()],
            ..ProgressConfig::default()
        };
        tune(&mut config);
        let dir = tempfile::tempdir().unwrap();
        let progress = Running::start(dir.path(), config.clone()).await;
        let harness = Self {
            dir,
            fake,
            sent,
            _connection_shutdown: connection_shutdown.drop_guard(),
            config,
            progress: Some(progress),
        };
        harness.connect("c1", "t1", "u1");
        harness
    }

    fn connect(&self, connection: &str, tenant: &str, user: &str) {
        self.fake.known.lock().unwrap().insert(
            connection.to_owned(),
            v1::Identity {
                user_id: user.to_owned(),
                tenant_id: tenant.to_owned(),
                permissions: vec![],
                topics: vec![],
            },
        );
    }

    fn client(&self) -> ProgressServiceClient<Channel> {
        self.progress
            .as_ref()
            .expect("server running")
            .client
            .clone()
    }

    /// Stops the server, reopens the store from its directory, and starts
    /// a new server on it.
    async fn restart(&mut self) {
        if let Some(old) = self.progress.take() {
            old.stop().await;
        }
        self.progress = Some(Running::start(self.dir.path(), self.config.clone()).await);
    }

    /// The next message a client was sent: (connection, message).
    async fn message(&mut self) -> (String, Value) {
        within("a client message", self.sent.recv()).await.unwrap()
    }

    /// Messages up to and including the first `complete` or `error`.
    async fn until_final(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let (_, message) = self.message().await;
            let kind = message["type"].as_str().unwrap_or_default().to_owned();
            out.push(message);
            if kind == "complete" || kind == "error" {
                return out;
            }
        }
    }

    /// Proves nothing more was sent for `request_id`: a new request's
    /// acknowledgment travels the same path, and every message of the old
    /// one would have been queued before it.
    async fn assert_nothing_more_for(&mut self, request_id: &str) {
        let fence = self.submit("c1", "report", "fence").await;
        assert!(!fence.duplicate);
        loop {
            let (_, message) = self.message().await;
            assert_ne!(
                message["request_id"], request_id,
                "sent after final: {message}"
            );
            if message["request_id"] == "fence" && message["type"] == "acknowledgment" {
                return;
            }
        }
    }

    async fn submit(&self, connection: &str, action: &str, request_id: &str) -> v1::SubmitResponse {
        self.client()
            .submit(v1::SubmitRequest {
                connection_id: connection.to_owned(),
                action: action.to_owned(),
                request_id: request_id.to_owned(),
                payload: Some(to_proto(json!({"pages": 3}))),
                metadata: None,
            })
            .await
            .unwrap()
            .into_inner()
    }
}

async fn claim(
    client: &mut ProgressServiceClient<Channel>,
    processor: &str,
    lease_seconds: u32,
) -> Streaming<v1::ClaimResponse> {
    let mut stream = client
        .claim(v1::ClaimRequest {
            processor_id: processor.to_owned(),
            actions: vec!["report".to_owned()],
            max_in_flight: 1,
            lease_seconds,
        })
        .await
        .unwrap()
        .into_inner();
    registered(&mut stream).await;
    stream
}

/// Reads a Claim stream's first message, which must be its registration.
async fn registered(stream: &mut Streaming<v1::ClaimResponse>) -> v1::ProcessorRegistered {
    match next_item(stream).await {
        v1::claim_response::Item::Registered(registered) => registered,
        other => panic!("a Claim stream opens with its registration, got {other:?}"),
    }
}

async fn next_item(stream: &mut Streaming<v1::ClaimResponse>) -> v1::claim_response::Item {
    within("a claim item", stream.message())
        .await
        .unwrap()
        .expect("claim stream ended")
        .item
        .unwrap()
}

/// The next message of a Claim stream, which must tell it to stop work:
/// the request's id and why.
async fn next_notice(stream: &mut Streaming<v1::ClaimResponse>) -> (String, v1::CancelReason) {
    let notice = within("a cancel notice", stream.message())
        .await
        .unwrap()
        .expect("claim stream ended");
    let reason = notice.cancel_reason();
    match notice.item {
        Some(v1::claim_response::Item::Cancelled(id)) => (id, reason),
        other => panic!("expected a cancel notice, got {other:?}"),
    }
}

async fn next_work(stream: &mut Streaming<v1::ClaimResponse>) -> v1::Request {
    match next_item(stream).await {
        v1::claim_response::Item::Work(work) => work,
        other => panic!("expected work, got {other:?}"),
    }
}

fn report(id: &str, processor: &str, percentage: f64) -> v1::ReportRequest {
    v1::ReportRequest {
        id: id.to_owned(),
        processor_id: processor.to_owned(),
        percentage,
        message: format!("{percentage}%"),
        metadata: None,
    }
}

async fn complete(
    client: &mut ProgressServiceClient<Channel>,
    id: &str,
    processor: &str,
) -> Result<v1::Request, Status> {
    client
        .complete(v1::CompleteRequest {
            id: id.to_owned(),
            processor_id: processor.to_owned(),
            result: Some(to_proto(json!({"url": "https://example.com/r.pdf"}))),
        })
        .await
        .map(|answer| answer.into_inner().request.unwrap_or_default())
}

fn sequences(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| {
            m["sequence"]
                .as_u64()
                .expect("every message has a sequence")
        })
        .collect()
}

fn assert_increasing(values: &[u64]) {
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "sequences not increasing: {values:?}"
    );
}

// ---- the tests ----

#[tokio::test]
async fn submit_acknowledges_with_identity_from_the_connection() {
    let mut h = Harness::start().await;
    let reply = h.submit("c1", "report", "r1").await;
    let request = reply.request.unwrap();
    assert!(!reply.duplicate);
    assert_eq!(request.request_id, "r1");
    assert_eq!(request.status(), v1::RequestStatus::Pending);
    let identity = request.identity.unwrap();
    assert_eq!(
        (identity.tenant_id.as_str(), identity.user_id.as_str()),
        ("t1", "u1")
    );

    let (connection, ack) = h.message().await;
    assert_eq!(connection, "c1");
    assert_eq!(ack["type"], "acknowledgment");
    assert_eq!(ack["request_id"], "r1");
    assert_eq!(ack["id"], request.id.as_str());
    assert_eq!(ack["status"], "queued");
    assert_eq!(ack["sequence"], 0);
    assert!(ack["timestamp"].as_str().unwrap().ends_with('Z'), "{ack}");
    assert!(ack.get("duplicate").is_none());
}

#[tokio::test]
async fn submit_without_request_id_generates_one() {
    let h = Harness::start().await;
    let request = h.submit("c1", "report", "").await.request.unwrap();
    assert!(
        uuid::Uuid::parse_str(&request.request_id).is_ok(),
        "{}",
        request.request_id
    );
}

#[tokio::test]
async fn submit_on_unknown_connection_is_not_found() {
    let h = Harness::start().await;
    let status = h
        .client()
        .submit(v1::SubmitRequest {
            connection_id: "nobody".into(),
            action: "report".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn unknown_action_is_failed_precondition_until_a_processor_declares_it() {
    let h = Harness::start().await;
    let status = h
        .client()
        .submit(v1::SubmitRequest {
            connection_id: "c1".into(),
            action: "transcode".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "no processor handles action \"transcode\""
    );

    let mut client = h.client();
    let mut work = client
        .claim(v1::ClaimRequest {
            processor_id: "p1".into(),
            actions: vec!["transcode".into(), "transcode".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Once the stream says it is registered, the action is accepted: no
    // retry, no wait.
    let registration = registered(&mut work).await;
    assert_eq!(registration.actions, ["transcode"], "each action once");
    assert_eq!(registration.processor_id, "p1");
    assert_eq!(registration.max_in_flight, 1, "the default");
    assert_eq!(registration.lease_seconds, 30, "the default");
    let submitted = h.submit("c1", "transcode", "t-1").await.request.unwrap();
    assert_eq!(next_work(&mut work).await.id, submitted.id);
}

#[tokio::test]
async fn repeated_submit_is_idempotent() {
    let mut h = Harness::start().await;
    let first = h.submit("c1", "report", "same").await;
    let (_, ack) = h.message().await;
    assert_eq!(ack["type"], "acknowledgment");

    // Made again for the same connection (ConnectionService's retry of a
    // Submit whose answer was lost): the caller is told, and the
    // acknowledgment goes again with the same sequence number, in case the
    // replica that queued the request died before sending it; the edge
    // writes a number at most once, so a client that had it sees nothing.
    let second = h.submit("c1", "report", "same").await;
    assert!(second.duplicate);
    let id = first.request.unwrap().id;
    assert_eq!(second.request.unwrap().id, id);
    let (_, again) = h.message().await;
    assert_eq!(again["type"], "acknowledgment");
    assert_eq!(again["sequence"], ack["sequence"]);
    let numbers: Vec<_> = h.fake.identities.lock().unwrap().clone();
    assert_eq!(
        numbers,
        vec![
            ("c1".to_owned(), id.clone(), 0),
            ("c1".to_owned(), id.clone(), 0)
        ]
    );

    // The same user asking again from another connection hears nothing:
    // the acknowledgment is not moved to it.
    h.connect("c1-later", "t1", "u1");
    let third = h.submit("c1-later", "report", "same").await;
    assert!(third.duplicate);
    h.assert_nothing_more_for("same").await;

    // Another user's identical client id is another request.
    h.connect("c2", "t1", "u2");
    let other = h.submit("c2", "report", "same").await;
    assert!(!other.duplicate);
}

#[tokio::test]
async fn invalid_arguments_are_refused() {
    let h = Harness::start().await;
    let mut client = h.client();

    let status = client
        .submit(v1::SubmitRequest {
            action: "report".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    for bad in [
        v1::ClaimRequest {
            actions: vec!["report".into()],
            ..Default::default()
        },
        v1::ClaimRequest {
            processor_id: "p".into(),
            ..Default::default()
        },
        v1::ClaimRequest {
            processor_id: "p".into(),
            actions: vec!["report".into()],
            lease_seconds: 3601,
            ..Default::default()
        },
        v1::ClaimRequest {
            processor_id: "p".into(),
            actions: vec!["report".into()],
            max_in_flight: 1001,
            ..Default::default()
        },
    ] {
        let status = client.claim(bad.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }

    let status = client.get(v1::GetRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let status = client
        .report(tokio_stream::iter(vec![report("x", "p", 150.0)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("percentage"), "{status:?}");

    // JSON nested past the one rule, in every field that carries JSON.
    let mut deep = json!(1);
    for _ in 0..=streamer_api::json::MAX_DEPTH {
        deep = json!({"a": deep});
    }
    let status = client
        .submit(v1::SubmitRequest {
            connection_id: "c1".into(),
            action: "report".into(),
            payload: Some(to_proto(deep.clone())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("payload"), "{status:?}");
    let status = client
        .complete(v1::CompleteRequest {
            id: "x".into(),
            processor_id: "p".into(),
            result: Some(to_proto(deep)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("result"), "{status:?}");
}

#[tokio::test]
async fn progress_then_exactly_one_complete_in_order() {
    let mut h = Harness::start().await;
    let mut client = h.client();
    let mut work = claim(&mut client, "p1", 0).await;
    let request = h.submit("c1", "report", "r1").await.request.unwrap();
    let job = next_work(&mut work).await;
    assert_eq!(job.id, request.id);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.processor_id, "p1");
    assert_eq!(from_proto(job.payload.unwrap()), json!({"pages": 3}));

    let reports: Vec<_> = [20.0, 40.0, 60.0, 80.0, 100.0]
        .into_iter()
        .map(|p| report(&job.id, "p1", p))
        .collect();
    let summary = client
        .report(tokio_stream::iter(reports))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.accepted, summary.rejected), (5, 0));
    let done = complete(&mut client, &job.id, "p1").await.unwrap();
    assert_eq!(done.status(), v1::RequestStatus::Completed);
    assert_eq!(done.progress.unwrap().percentage, 100.0);

    let messages = h.until_final().await;
    assert_eq!(messages[0]["type"], "acknowledgment");
    let progress: Vec<_> = messages
        .iter()
        .filter(|m| m["type"] == "progress")
        .collect();
    assert!(!progress.is_empty(), "no progress in {messages:?}");
    assert!(progress.iter().all(|m| m["request_id"] == "r1"));
    let last = messages.last().unwrap();
    assert_eq!(last["type"], "complete");
    assert_eq!(last["result"], json!({"url": "https://example.com/r.pdf"}));
    assert_eq!(last["sequence"], done.sequence);
    assert_increasing(&sequences(&messages));
    h.assert_nothing_more_for("r1").await;
}

#[tokio::test]
async fn fast_reports_are_coalesced_and_the_final_message_comes_last() {
    let mut h = Harness::start().await;
    let mut client = h.client();
    let mut work = claim(&mut client, "p1", 0).await;
    h.submit("c1", "report", "r1").await;
    let job = next_work(&mut work).await;

    let reports: Vec<_> = (1..=100)
        .map(|i| report(&job.id, "p1", f64::from(i)))
        .collect();
    let summary = client
        .report(tokio_stream::iter(reports))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 100);
    let done = complete(&mut client, &job.id, "p1").await.unwrap();
    assert_eq!(done.sequence, 101);

    let messages = h.until_final().await;
    let progress: Vec<&Value> = messages
        .iter()
        .filter(|m| m["type"] == "progress")
        .collect();
    assert!(!progress.is_empty());
    assert!(
        progress.len() <= 20,
        "100 reports at 10/s should coalesce, got {} progress messages",
        progress.len()
    );
    let percentages: Vec<f64> = progress
        .iter()
        .map(|m| m["percentage"].as_f64().unwrap())
        .collect();
    assert!(
        percentages.windows(2).all(|w| w[0] < w[1]),
        "{percentages:?}"
    );
    assert_eq!(messages.last().unwrap()["type"], "complete");
    assert_increasing(&sequences(&messages));
    h.assert_nothing_more_for("r1").await;
}

#[tokio::test]
async fn a_dropped_claim_stream_gives_the_work_to_another_processor() {
    let mut h = Harness::start().await;
    let mut client = h.client();
    let mut first = claim(&mut client, "p1", 0).await;
    h.submit("c1", "report", "r1").await;
    let job = next_work(&mut first).await;
    assert_eq!(job.attempts, 1);

    let mut second = claim(&mut client, "p2", 0).await;
    drop(first);
    let again = next_work(&mut second).await;
    assert_eq!(again.id, job.id);
    assert_eq!(again.attempts, 2);
    assert_eq!(again.processor_id, "p2");

    complete(&mut client, &job.id, "p2").await.unwrap();
    let late = complete(&mut client, &job.id, "p1").await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");

    let messages = h.until_final().await;
    assert_eq!(
        messages.iter().filter(|m| m["type"] == "complete").count(),
        1
    );
    h.assert_nothing_more_for("r1").await;
}

#[tokio::test]
async fn a_lapsed_lease_is_handed_out_again() {
    let h = Harness::start().await;
    let mut client = h.client();
    let mut first = claim(&mut client, "p1", 1).await;
    h.submit("c1", "report", "r1").await;
    let job = next_work(&mut first).await;
    let mut second = claim(&mut client, "p2", 30).await;

    // p1 never reports: its one-second lease lapses, and it is told why.
    assert_eq!(
        next_notice(&mut first).await,
        (job.id.clone(), v1::CancelReason::LeaseLapsed)
    );
    let again = next_work(&mut second).await;
    assert_eq!(again.id, job.id);
    assert_eq!(again.attempts, 2);

    let summary = client
        .report(tokio_stream::iter(vec![
            report(&job.id, "p1", 50.0),
            report(&job.id, "p1", 60.0),
            report(&job.id, "p2", 50.0),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.accepted, summary.rejected), (1, 2));
    // The lapsed processor learns why: the lease is someone else's now.
    assert_eq!(
        summary.rejections,
        [v1::ReportRejection {
            id: job.id.clone(),
            reason: v1::ReportRejectionReason::LeaseNotHeld.into(),
            count: 2,
        }]
    );
}

#[tokio::test]
async fn the_last_lapsed_attempt_fails_with_timeout() {
    let mut h = Harness::with(|c| c.max_attempts = 1).await;
    let mut client = h.client();
    let mut work = claim(&mut client, "p1", 1).await;
    h.submit("c1", "report", "r1").await;
    let job = next_work(&mut work).await;

    let messages = h.until_final().await;
    let error = messages.last().unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "PROCESSING_FAILED");
    assert_eq!(error["error"]["details"]["code"], "TIMEOUT");

    let got = client
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Id(job.id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(got.status(), v1::RequestStatus::Failed);
    assert_eq!(got.error.unwrap().code, "TIMEOUT");
}

#[tokio::test]
async fn fail_retryable_requeues_then_final_failure_reaches_the_client() {
    let mut h = Harness::start().await;
    let mut client = h.client();
    let mut work = claim(&mut client, "p1", 0).await;
    h.submit("c1", "report", "r1").await;
    let job = next_work(&mut work).await;

    let error = |retryable| v1::FailRequest {
        id: job.id.clone(),
        processor_id: "p1".into(),
        error: Some(v1::RequestError {
            code: "UPSTREAM_DOWN".into(),
            message: "the renderer is down".into(),
            details: Some(streamer_api::json::object_to_struct(
                json!({"host": "r1"}).as_object().unwrap().clone(),
            )),
        }),
        retryable,
    };
    let requeued = client
        .fail(error(true))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(requeued.status(), v1::RequestStatus::Pending);
    let again = next_work(&mut work).await;
    assert_eq!(again.attempts, 2);

    let failed = client
        .fail(error(false))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(failed.status(), v1::RequestStatus::Failed);

    let messages = h.until_final().await;
    let last = messages.last().unwrap();
    assert_eq!(
        last["error"],
        json!({
            "code": "PROCESSING_FAILED",
            "message": "the renderer is down",
            "details": {"code": "UPSTREAM_DOWN", "host": "r1"},
        })
    );
    let twice = client.fail(error(false)).await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    assert!(twice.message().contains("at most once"), "{twice:?}");
}

#[tokio::test]
async fn cancel_tells_the_processor_and_the_client() {
    let mut h = Harness::start().await;
    let mut client = h.client();
    let mut work = claim(&mut client, "p1", 0).await;
    h.submit("c1", "report", "r1").await;
    let job = next_work(&mut work).await;

    // Another user may not cancel it, and learns nothing.
    let status = client
        .cancel(v1::CancelRequest {
            id: job.id.clone(),
            reason: String::new(),
            owner: Some(v1::Identity {
                user_id: "u2".into(),
                tenant_id: "t1".into(),
                permissions: vec![],
                topics: vec![],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let cancelled = client
        .cancel(v1::CancelRequest {
            id: job.id.clone(),
            reason: "user closed the tab".into(),
            owner: Some(v1::Identity {
                user_id: "u1".into(),
                tenant_id: "t1".into(),
                permissions: vec![],
                topics: vec![],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(cancelled.status(), v1::RequestStatus::Cancelled);
    assert_eq!(
        next_notice(&mut work).await,
        (job.id.clone(), v1::CancelReason::Cancelled)
    );

    let messages = h.until_final().await;
    let last = messages.last().unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["error"]["message"], "request cancelled");
    assert_eq!(last["error"]["details"]["status"], "cancelled");

    let late = complete(&mut client, &job.id, "p1").await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let summary = client
        .report(tokio_stream::iter(vec![
            report(&job.id, "p1", 10.0),
            report("no-such-request", "p1", 10.0),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.rejected, 2);
    let reasons: Vec<_> = summary
        .rejections
        .iter()
        .map(|r| (r.id.as_str(), r.reason(), r.count))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                job.id.as_str(),
                v1::ReportRejectionReason::AlreadyFinished,
                1
            ),
            ("no-such-request", v1::ReportRejectionReason::NotFound, 1),
        ]
    );
}

#[tokio::test]
async fn get_never_reveals_another_users_request() {
    let h = Harness::start().await;
    h.connect("c2", "t1", "u2");
    let request = h.submit("c1", "report", "r1").await.request.unwrap();
    let mut client = h.client();

    let owner = |user: &str| v1::Identity {
        user_id: user.into(),
        tenant_id: "t1".into(),
        permissions: vec![],
        topics: vec![],
    };
    let by_id = |user: &str| v1::GetRequest {
        selector: Some(v1::get_request::Selector::Id(request.id.clone())),
        owner: Some(owner(user)),
        deliver_to_connection_id: String::new(),
    };
    let mine = client
        .get(by_id("u1"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(mine.id, request.id);
    assert_eq!(
        client.get(by_id("u2")).await.unwrap_err().code(),
        Code::NotFound
    );

    let by_client = |user: &str| v1::GetRequest {
        selector: Some(v1::get_request::Selector::Client(v1::ClientRequestRef {
            tenant_id: "t1".into(),
            user_id: user.into(),
            request_id: "r1".into(),
        })),
        ..Default::default()
    };
    assert_eq!(
        client
            .get(by_client("u1"))
            .await
            .unwrap()
            .into_inner()
            .request
            .unwrap()
            .id,
        request.id
    );
    assert_eq!(
        client.get(by_client("u2")).await.unwrap_err().code(),
        Code::NotFound
    );

    // Delivery may not move to another user's connection.
    let status = client
        .get(v1::GetRequest {
            deliver_to_connection_id: "c2".into(),
            ..by_id("u1")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let missing = client
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Id("nope".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn a_resumed_client_gets_the_same_final_message_again_marked_as_a_replay() {
    let mut h = Harness::start().await;
    let mut client = h.client();
    let mut work = claim(&mut client, "p1", 0).await;
    h.submit("c1", "report", "r1").await;
    let job = next_work(&mut work).await;
    let done = complete(&mut client, &job.id, "p1").await.unwrap();
    let first = h.until_final().await;
    let original = first.last().unwrap().clone();
    assert_eq!(original["type"], "complete");
    assert!(original.get("replay").is_none(), "{original}");

    h.connect("c1-again", "t1", "u1");
    let get = |connection: &str| v1::GetRequest {
        selector: Some(v1::get_request::Selector::Id(job.id.clone())),
        owner: None,
        deliver_to_connection_id: connection.into(),
    };
    let resumed = client
        .get(get("c1-again"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(resumed.connection_id, "c1-again");
    // Moving where messages go is not a change of the request.
    assert_eq!(resumed.updated_at, done.updated_at);
    let (connection, replay) = h.message().await;
    assert_eq!(connection, "c1-again");
    assert_eq!(replay["replay"], true, "{replay}");
    let mut same = replay.clone();
    same.as_object_mut().unwrap().remove("replay");
    assert_eq!(same, original, "the replay is the same message");
    assert_eq!(
        h.fake.identities.lock().unwrap().last().unwrap(),
        &("c1-again".to_owned(), job.id.clone(), done.sequence),
        "with the same identity"
    );

    // Asking again from the same connection sends nothing new.
    client.get(get("c1-again")).await.unwrap();
    h.assert_nothing_more_for("r1").await;
}

#[tokio::test]
async fn an_unconfirmed_delivery_is_retried_with_the_same_identity() {
    let mut h = Harness::start().await;
    // The next two sends reach the socket but their reports come too late.
    h.fake
        .unconfirmed
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let request = h.submit("c1", "report", "r1").await.request.unwrap();
    let attempts = [h.message().await, h.message().await, h.message().await];
    for (connection, message) in &attempts {
        assert_eq!(connection, "c1");
        assert_eq!(message, &attempts[0].1, "a retry is the same message");
    }
    assert_eq!(attempts[0].1["type"], "acknowledgment");
    let identities = h.fake.identities.lock().unwrap().clone();
    assert_eq!(
        identities,
        vec![("c1".to_owned(), request.id.clone(), 0); 3]
    );
    // Once confirmed, the acknowledgment is not sent again.
    h.assert_nothing_more_for("r1").await;
}

#[tokio::test]
async fn watch_streams_changes_until_the_request_finishes() {
    let h = Harness::start().await;
    let mut client = h.client();
    let request = h.submit("c1", "report", "r1").await.request.unwrap();
    let mut updates = client
        .watch(v1::WatchRequest {
            selector: Some(v1::watch_request::Selector::Id(request.id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let now = within("watch", updates.message()).await.unwrap().unwrap();
    assert_eq!(now.request.unwrap().status(), v1::RequestStatus::Pending);

    let mut work = claim(&mut client, "p1", 0).await;
    let job = next_work(&mut work).await;
    complete(&mut client, &job.id, "p1").await.unwrap();

    let mut statuses = Vec::new();
    while let Some(update) = within("watch", updates.message()).await.unwrap() {
        statuses.push(update.request.unwrap().status());
    }
    assert_eq!(
        statuses,
        vec![v1::RequestStatus::Processing, v1::RequestStatus::Completed]
    );
}

#[tokio::test]
async fn a_restart_keeps_queued_work_and_leases() {
    let mut h = Harness::start().await;
    let mut client = h.client();
    // p1 stays connected until the server goes away, as a processor would.
    let mut held_by_p1 = claim(&mut client, "p1", 60).await;
    h.submit("c1", "report", "held").await;
    let held = next_work(&mut held_by_p1).await;
    let queued = h.submit("c1", "report", "queued").await.request.unwrap();

    h.restart().await;
    // The old server's shutdown ended p1's stream without taking its work back.
    let end = within("the claim stream to end", held_by_p1.message()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    let mut client = h.client();

    // The processor that held a lease before the restart may still finish.
    let done = complete(&mut client, &held.id, "p1").await.unwrap();
    assert_eq!(done.status(), v1::RequestStatus::Completed);

    // Queued work waited in the store for a processor.
    let mut work = claim(&mut client, "p2", 0).await;
    let job = next_work(&mut work).await;
    assert_eq!(job.id, queued.id);
    assert_eq!(job.attempts, 1);
    complete(&mut client, &job.id, "p2").await.unwrap();
}

#[tokio::test]
async fn a_gone_connection_loses_only_its_messages_and_the_client_can_resume() {
    let mut h = Harness::start().await;
    h.connect("c-old", "t1", "u1");
    let mut client = h.client();
    let mut work = claim(&mut client, "p1", 0).await;
    h.submit("c-old", "report", "r1").await;
    let (connection, ack) = h.message().await;
    assert_eq!(
        (connection.as_str(), ack["type"].as_str()),
        ("c-old", Some("acknowledgment"))
    );
    let job = next_work(&mut work).await;

    // The socket closes; the processor finishes anyway.
    h.fake.known.lock().unwrap().remove("c-old");
    let done = complete(&mut client, &job.id, "p1").await.unwrap();
    assert_eq!(done.status(), v1::RequestStatus::Completed);

    // The client reconnects and asks by its own request id.
    h.connect("c-new", "t1", "u1");
    client
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Client(v1::ClientRequestRef {
                tenant_id: "t1".into(),
                user_id: "u1".into(),
                request_id: "r1".into(),
            })),
            owner: None,
            deliver_to_connection_id: "c-new".into(),
        })
        .await
        .unwrap();
    let (connection, message) = h.message().await;
    assert_eq!(connection, "c-new");
    assert_eq!(message["type"], "complete");
    assert_eq!(message["sequence"], done.sequence);
}
