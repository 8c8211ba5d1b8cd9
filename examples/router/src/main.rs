//! A small router: answers the `echo` and `health` actions that clients send.
//!
//! Routers never touch sockets. They open `ConnectionService.Receive`,
//! declaring the actions they answer, and reply to each frame with
//! `ConnectionService.Send`. Start it against `streamer all`:
//!
//! ```text
//! cargo run --release -p streamer-example-router
//! ```
//!
//! Then a client frame `{"action":"echo","id":"1","payload":{"hi":1}}` is
//! answered with `{"type":"response","request_id":"1","success":true,"data":{"hi":1}}`.
//! Run two of them and the frames are shared between them.
//!
//! Against a deployment that checks callers (`--trust token`), give it a
//! service token with the roles it needs in `STREAMER_SERVICE_TOKEN`:
//! `streamer service-token --sub router --roles router,backend`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use streamer_api::v1::receive_response::Event;
use streamer_api::v1::{self, InboundMessage, connection_service_client::ConnectionServiceClient};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Presents the service token, when there is one, on every call.
#[derive(Clone)]
struct ServiceToken(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for ServiceToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

type Client = ConnectionServiceClient<InterceptedService<Channel, ServiceToken>>;

const ACTIONS: &[&str] = &["echo", "health"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .skip_while(|a| a != "--connection")
        .nth(1)
        .or_else(|| std::env::var("STREAMER_CONNECTION_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:50052".into());
    let router_id = format!("example-router-{}", std::process::id());
    let channel = Channel::from_shared(url.clone())?.connect_lazy();
    let token = match std::env::var("STREAMER_SERVICE_TOKEN") {
        Ok(token) if !token.is_empty() => Some(format!("Bearer {token}").parse()?),
        _ => None,
    };
    let client = ConnectionServiceClient::with_interceptor(channel, ServiceToken(token));
    // Ctrl-C (SIGINT) ends the router whatever it is doing: serving,
    // reconnecting or waiting to. One listener for the whole run: once a
    // process listens for it, SIGINT no longer ends it by default.
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        let served = tokio::select! {
            served = serve(client.clone(), &router_id) => served,
            _ = &mut stop => break,
        };
        match served {
            Ok(()) => eprintln!("router: stream ended; reconnecting"),
            Err(status) => eprintln!(
                "router: {url}: {}; retrying in {backoff:?}",
                status.message()
            ),
        }
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    eprintln!("router: stopped");
    Ok(())
}

/// Receives frames until the stream ends, answering each on its own task.
async fn serve(mut client: Client, router_id: &str) -> Result<(), tonic::Status> {
    let mut frames = client
        .receive(v1::ReceiveRequest {
            actions: ACTIONS.iter().map(|a| a.to_string()).collect(),
            router_id: router_id.to_owned(),
        })
        .await?
        .into_inner();
    while let Some(event) = frames.message().await? {
        let mut frame = match event.event {
            // The first message: frames for ACTIONS reach this router now.
            Some(Event::Registered(registered)) => {
                println!("ready: {router_id} answers {:?}", registered.actions);
                continue;
            }
            Some(Event::Message(frame)) => frame,
            None => continue,
        };
        let client = client.clone();
        tokio::spawn(async move {
            let connection_id = frame.connection_id.clone();
            let trace_context = std::mem::take(&mut frame.trace_context);
            let reply = answer(frame);
            if let Err(status) = send(client, &connection_id, reply, trace_context).await {
                eprintln!(
                    "router: reply to {connection_id} failed: {}",
                    status.message()
                );
            }
        });
    }
    Ok(())
}

/// The response to one frame, in the WebSocket protocol's `response` shape.
fn answer(frame: InboundMessage) -> Value {
    let data = match frame.action.as_str() {
        "echo" => frame
            .payload
            .map(streamer_api::json::from_proto)
            .unwrap_or(Value::Null),
        "health" => json!({
            "status": "ok",
            "user_id": frame.identity.map(|i| i.user_id).unwrap_or_default(),
            "time": SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        }),
        other => {
            return json!({
                "type": "error",
                "request_id": frame.request_id,
                "error": {"code": "INVALID_ACTION", "message": format!("unexpected action {other:?}")},
            });
        }
    };
    json!({
        "type": "response",
        "request_id": frame.request_id,
        "success": true,
        "data": data,
    })
}

/// Sends `message` to the connection. The frame's `trace_context` goes
/// along as the call's metadata, so the reply is part of the client's
/// trace (a router with its own tracing would send its own span's
/// context instead).
async fn send(
    mut client: Client,
    connection_id: &str,
    message: Value,
    trace_context: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(v1::SendRequest {
        connection_id: connection_id.to_owned(),
        payload: Some(v1::Payload {
            body: Some(v1::payload::Body::Json(streamer_api::json::to_proto(
                message,
            ))),
        }),
        tenant_id: String::new(),
        sequence: None,
    });
    for (key, value) in trace_context {
        if let (Ok(key), Ok(value)) = (
            key.parse::<tonic::metadata::AsciiMetadataKey>(),
            value.parse::<AsciiMetadataValue>(),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    client.send(request).await.map(drop)
}
