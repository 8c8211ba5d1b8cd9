//! One client socket, from upgrade to close.
//!
//! Generic over any `Sink`/`Stream` of WebSocket messages, so the loop is
//! tested with channels as well as over a real socket.

use std::sync::Arc;

use axum::extract::ws::Message;
use futures::{Sink, SinkExt, Stream, StreamExt};
use streamer_api::v1::{self, edge_event::Event};

use crate::edge::{Edge, Outbound, Registered, close_message};
use crate::frames;

/// Close code for a client that cannot keep up.
pub const CLOSE_SLOW_CONSUMER: u16 = 1008;

/// How long a close frame may take to write before the socket is dropped.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs one socket: client frames go up as events, queued deliveries go
/// down. Returns when either side closes; the connection is then forgotten
/// locally and reported closed upstream.
pub async fn run<S, E>(
    socket: S,
    connection_id: String,
    registered: Registered,
    edge: Arc<Edge>,
    max_frame_bytes: usize,
) where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Send + 'static,
    S::Error: std::fmt::Display + Send,
    E: std::fmt::Display + Send,
{
    let (mut sink, mut stream) = socket.split();
    let Registered {
        mut outbound,
        evict,
    } = registered;
    let replies = {
        // The reader answers bad frames through the same queue as
        // deliveries, so the client sees everything in one order.
        let edge = edge.clone();
        let id = connection_id.clone();
        move |text: String| edge.push(&id, Outbound::Message(Message::Text(text.into())), None)
    };

    let writer = async {
        // Returns the close code it ended with; breaks out on eviction.
        loop {
            let next = tokio::select! {
                biased;
                () = evict.cancelled() => None,
                next = outbound.recv() => Some(next),
            };
            let message = match next {
                None => break,
                Some(Some(Outbound::Message(message))) => message,
                Some(Some(Outbound::Close { code, reason })) => {
                    let close = sink.send(close_message(code, reason));
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
                    return code;
                }
                Some(None) => return 1000,
            };
            // A client that stops reading blocks this send once the kernel's
            // buffer is full; eviction must still win, or its queue (and the
            // memory behind it) would stay pinned for as long as it lingers.
            let sent = tokio::select! {
                biased;
                () = evict.cancelled() => None,
                sent = sink.send(message) => Some(sent.is_ok()),
            };
            match sent {
                None => break,
                Some(true) => {}
                Some(false) => return 1006,
            }
        }
        let close = sink.send(close_message(
            CLOSE_SLOW_CONSUMER,
            "slow consumer: outbound queue full".into(),
        ));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
        CLOSE_SLOW_CONSUMER
    };

    let reader = async {
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(text)) => {
                    metrics::counter!("streamer_gateway_frames_total").increment(1);
                    match frames::parse(text.as_str(), max_frame_bytes) {
                        Ok(frame) => {
                            let inbound = frame.clone().into_inbound(&connection_id);
                            if !edge.emit(Event::Frame(inbound)).await {
                                replies(frames::error_message(
                                    &frame.id,
                                    "INTERNAL_ERROR",
                                    "control plane unavailable; try again",
                                ));
                            }
                        }
                        Err(error) => {
                            metrics::counter!("streamer_gateway_frames_refused_total").increment(1);
                            replies(frames::error_message(
                                &error.request_id,
                                "VALIDATION_ERROR",
                                &error.message,
                            ));
                        }
                    }
                }
                Ok(Message::Binary(_)) => {
                    replies(frames::error_message(
                        "",
                        "VALIDATION_ERROR",
                        "binary frames are not accepted; send JSON text",
                    ));
                }
                Ok(Message::Close(frame)) => {
                    return frame.map(|f| (f.code, f.reason.to_string()));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Err(error) => {
                    tracing::debug!(%error, connection_id = %connection_id, "socket read failed");
                    return None;
                }
            }
        }
        None
    };

    let (code, reason) = tokio::select! {
        code = writer => (u32::from(code), String::new()),
        closed = reader => closed
            .map(|(code, reason)| (u32::from(code), reason))
            .unwrap_or((1006, String::new())),
    };
    // Completes the closing handshake whichever side began it, without
    // waiting on a client that does not read.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
    edge.forget(&connection_id);
    edge.emit(Event::Closed(v1::ConnectionClosed {
        connection_id: connection_id.clone(),
        code,
        reason,
    }))
    .await;
    tracing::debug!(connection_id = %connection_id, code, "connection closed");
}
