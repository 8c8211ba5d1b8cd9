//! One client socket, from upgrade to close.
//!
//! Generic over any `Sink`/`Stream` of WebSocket messages, so the loop can
//! run over channels as well as over a real socket. The limits of
//! [`crate::limits`] are enforced here: the message rate, pings and the idle
//! timeout, and the close code that answers a bad frame.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::Message;
use futures::{Sink, SinkExt, Stream, StreamExt};
use streamer_api::v1::{self, attach_request::Event};
use tokio::time::Instant;

use crate::edge::{Edge, Outbound, Registered, close_message};
use crate::frames;
use crate::limits::{Admit, SocketLimits, TokenBucket, close, close_code_for};
use streamer_core::client::{self, ErrorCode};
use streamer_core::ids::{ClientRequestId, ConnectionId};
use tracing::Instrument as _;

/// Close code for a client that cannot keep up.
pub const CLOSE_SLOW_CONSUMER: u16 = close::POLICY;

/// Checks a token a client sends to extend its socket's life: its new
/// expiry when it is valid and names the same user and tenant, else why not.
pub type Refresh = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn Future<Output = Result<Instant, String>> + Send>>
        + Send
        + Sync,
>;

/// The built-in action that extends a socket's life with a fresh token.
pub const REFRESH_ACTION: &str = "refresh";

/// A socket's authentication: until when it holds, and how to renew it.
pub struct Session {
    /// When the token expires; `None`: it does not.
    pub expires_at: Option<Instant>,
    pub refresh: Refresh,
}

/// How the client's side of a socket ended.
enum ReadEnd {
    /// The client closed, with its close frame's code and reason.
    Closed(Option<(u16, String)>),
    /// The edge ends it for what the client did: this code and reason go
    /// in the close frame.
    Refused(u16, &'static str),
    /// The connection is gone; nothing can be sent.
    Lost,
}

/// How long a close frame may take to write before the socket is dropped.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs one socket: client frames go up as events, queued deliveries go
/// down. Returns when either side closes; the connection is then forgotten
/// locally and reported closed upstream.
///
/// Every idle socket holds this future, which is as large as its largest
/// await; the awaits that are rare or already allocate (closing, a token
/// refresh, handing a frame up) are boxed so they cost nothing while the
/// socket waits (3,152 bytes before, 1,888 after, release build).
pub async fn run<S>(
    socket: S,
    connection_id: ConnectionId,
    registered: Registered,
    edge: Arc<Edge>,
    limits: SocketLimits,
    session: Session,
) where
    S: Sink<Message> + Stream<Item = Result<Message, axum::Error>> + Send + 'static,
    S::Error: std::fmt::Display + Send,
{
    let (mut sink, mut stream) = socket.split();
    // When the client was last heard from (any frame, pongs included), in
    // milliseconds since `opened`; shared by the reader and the pinger.
    let opened = Instant::now();
    let last_heard = AtomicU64::new(0);
    let heard = || last_heard.store(opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    // The socket lives as long as its token, or a fresher one it sent.
    let expiry = Expiry::new(opened, session.expires_at);
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
        let mut ping =
            tokio::time::interval_at(opened + limits.ping_interval, limits.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once and kept across messages: a delivery wakes the task and
        // finds them registered already, instead of registering a timer and
        // a waiter afresh for every message.
        let timer = tokio::time::sleep_until(opened);
        tokio::pin!(timer);
        let cancelled = evict.cancelled();
        tokio::pin!(cancelled);
        // Returns the close code it ended with; breaks out on eviction.
        loop {
            let next = tokio::select! {
                biased;
                () = &mut cancelled => None,
                () = expiry.passed(timer.as_mut()) => {
                    metrics::counter!("streamer_gateway_expired_closes_total").increment(1);
                    let close = sink.send(close_message(close::POLICY, "token expired".into()));
                    let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, close)).await;
                    return close::POLICY;
                }
                next = outbound.recv() => Some(next),
                _ = ping.tick() => {
                    let silent = opened.elapsed().saturating_sub(std::time::Duration::from_millis(
                        last_heard.load(Ordering::Relaxed),
                    ));
                    if silent >= limits.idle_timeout {
                        metrics::counter!("streamer_gateway_idle_closes_total").increment(1);
                        let close = sink.send(close_message(close::GOING_AWAY, "idle timeout".into()));
                        let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, close)).await;
                        return close::GOING_AWAY;
                    }
                    Some(Some(Outbound::Message(Message::Ping(bytes::Bytes::new()))))
                }
            };
            let message = match next {
                None => break,
                Some(Some(Outbound::Message(message))) => message,
                Some(Some(Outbound::Close { code, reason })) => {
                    let close = sink.send(close_message(code, reason));
                    let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, close)).await;
                    return code;
                }
                Some(None) => return 1000,
            };
            // A client that stops reading blocks this send once the kernel's
            // buffer is full; eviction must still win, or its queue (and the
            // memory behind it) would stay pinned for as long as it lingers.
            let sent = tokio::select! {
                biased;
                () = &mut cancelled => None,
                sent = write_batch(&mut sink, message, &mut outbound) => Some(sent.is_ok()),
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
        let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, close)).await;
        CLOSE_SLOW_CONSUMER
    };

    let reader = async {
        let mut bucket = TokenBucket::new(limits.message_rate, limits.message_burst, opened);
        while let Some(message) = stream.next().await {
            heard();
            if matches!(message, Ok(Message::Text(_) | Message::Binary(_))) {
                match bucket.admit(Instant::now()) {
                    Admit::Accept => {}
                    Admit::Refuse => {
                        metrics::counter!("streamer_gateway_frames_refused_total", "reason" => "rate_limited")
                            .increment(1);
                        replies(frames::error_message(
                            &ClientRequestId::default(),
                            ErrorCode::RateLimited,
                            "too many messages; slow down",
                        ));
                        continue;
                    }
                    Admit::Close => {
                        metrics::counter!("streamer_gateway_rate_limit_closes_total").increment(1);
                        return ReadEnd::Refused(close::POLICY, "message rate limit exceeded");
                    }
                }
            }
            match message {
                Ok(Message::Text(text)) => {
                    metrics::counter!("streamer_gateway_frames_total").increment(1);
                    match frames::parse(text.as_str(), limits.max_frame_bytes) {
                        Ok(frame) if frame.action == REFRESH_ACTION => {
                            let answer = Box::pin(refresh(&session.refresh, &expiry, frame)).await;
                            replies(answer);
                            // The writer, polled in this same task, takes
                            // the new expiry on its next poll: make it now.
                            tokio::task::yield_now().await;
                        }
                        Ok(frame) => {
                            let span = frames::request_span(&connection_id, &frame);
                            let inbound = span.in_scope(|| {
                                frame
                                    .clone()
                                    .into_inbound(&connection_id, streamer_core::trace::current())
                            });
                            let emitted = Box::pin(edge.emit(Event::Frame(inbound)))
                                .instrument(span)
                                .await;
                            if !emitted {
                                replies(frames::error_message(
                                    &frame.id,
                                    ErrorCode::Internal,
                                    "control plane unavailable; try again",
                                ));
                            }
                        }
                        Err(error) => {
                            metrics::counter!("streamer_gateway_frames_refused_total", "reason" => "invalid")
                                .increment(1);
                            replies(frames::error_message(
                                &error.request_id,
                                ErrorCode::Validation,
                                &error.message,
                            ));
                        }
                    }
                }
                Ok(Message::Binary(_)) => {
                    replies(frames::error_message(
                        &ClientRequestId::default(),
                        ErrorCode::Validation,
                        frames::BINARY_REFUSED,
                    ));
                }
                Ok(Message::Close(frame)) => {
                    return ReadEnd::Closed(frame.map(|f| (f.code, f.reason.to_string())));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Err(error) => {
                    tracing::debug!(%error, connection_id = %connection_id, "socket read failed");
                    return match close_code_for(&error) {
                        Some(close::TOO_BIG) => ReadEnd::Refused(close::TOO_BIG, "frame too large"),
                        Some(close::INVALID_PAYLOAD) => {
                            ReadEnd::Refused(close::INVALID_PAYLOAD, "text frame is not UTF-8")
                        }
                        Some(code) => ReadEnd::Refused(code, "protocol error"),
                        None => ReadEnd::Lost,
                    };
                }
            }
        }
        ReadEnd::Lost
    };

    let (code, reason) = tokio::select! {
        code = writer => (u32::from(code), String::new()),
        end = reader => match end {
            ReadEnd::Closed(frame) => frame
                .map(|(code, reason)| (u32::from(code), reason))
                .unwrap_or((1005, String::new())),
            ReadEnd::Refused(code, reason) => {
                // What was already queued (the answers that told the client
                // why) goes out before the close frame, in the same order.
                let flush = async {
                    while let Some(Outbound::Message(message)) = outbound.try_recv() {
                        if sink.send(message).await.is_err() {
                            break;
                        }
                    }
                    let _ = sink.send(close_message(code, reason.into())).await;
                };
                let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, flush)).await;
                (u32::from(code), reason.to_owned())
            }
            ReadEnd::Lost => (1006, String::new()),
        },
    };
    // Completes the closing handshake whichever side began it, without
    // waiting on a client that does not read.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
    edge.forget(&connection_id);
    edge.emit(Event::Closed(v1::ConnectionClosed {
        connection_id: connection_id.to_string(),
        code,
        reason,
    }))
    .await;
    tracing::debug!(connection_id = %connection_id, code, "connection closed");
}

/// Most messages a writer puts into one flush: a burst of deliveries to a
/// socket goes out in one write instead of one each, while a close or the
/// next ping waits for at most this many.
const WRITE_BATCH: usize = 64;

/// Writes `first` and whatever else waits in the queue now (up to
/// [`WRITE_BATCH`] messages), then flushes them in one go.
async fn write_batch<S>(
    sink: &mut S,
    first: Message,
    outbound: &mut crate::outbox::OutboxReceiver,
) -> Result<(), S::Error>
where
    S: Sink<Message> + Unpin,
{
    sink.feed(first).await?;
    for _ in 1..WRITE_BATCH {
        let Some(message) = outbound.try_recv_message() else {
            break;
        };
        sink.feed(message).await?;
    }
    sink.flush().await
}

/// When a socket's token expires, shared by its reader (a refresh moves it)
/// and its writer (which closes the socket once it passes).
///
/// Both halves run in the socket's one task, so the writer sees a change the
/// next time that task is polled: no channel, and nothing registered per
/// message.
struct Expiry {
    opened: Instant,
    /// Milliseconds from `opened`; `NEVER` for a token without expiry.
    at_ms: AtomicU64,
}

impl Expiry {
    const NEVER: u64 = u64::MAX;

    fn new(opened: Instant, at: Option<Instant>) -> Self {
        let expiry = Self {
            opened,
            at_ms: AtomicU64::new(Self::NEVER),
        };
        if let Some(at) = at {
            expiry.set(at);
        }
        expiry
    }

    fn set(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.opened).as_millis();
        let ms = u64::try_from(ms).unwrap_or(Self::NEVER - 1);
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Instant> {
        match self.at_ms.load(Ordering::Relaxed) {
            Self::NEVER => None,
            ms => Some(self.opened + std::time::Duration::from_millis(ms)),
        }
    }

    /// Completes once the expiry has passed, on `timer`, which follows the
    /// expiry as it moves; never while there is none.
    fn passed<'a>(
        &'a self,
        mut timer: std::pin::Pin<&'a mut tokio::time::Sleep>,
    ) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            let Some(at) = self.get() else {
                return std::task::Poll::Pending;
            };
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            timer.as_mut().poll(cx)
        })
    }
}

/// Answers a `refresh` frame: `{"payload":{"token":"<JWT>"}}`. A token
/// valid for the same user and tenant moves the socket's expiry; anything
/// else is UNAUTHORIZED and changes nothing.
async fn refresh(check: &Refresh, expiry: &Expiry, frame: frames::ClientFrame) -> String {
    let Some(token) = frame
        .payload
        .get("token")
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty())
    else {
        return frames::error_message(
            &frame.id,
            ErrorCode::Validation,
            "payload.token is required",
        );
    };
    match check(token.to_owned()).await {
        Ok(expires_at) => {
            expiry.set(expires_at);
            metrics::counter!("streamer_gateway_token_refreshes_total").increment(1);
            let remaining = expires_at.saturating_duration_since(Instant::now());
            client::response(
                &frame.id,
                serde_json::json!({"expires_in_seconds": remaining.as_secs()}),
            )
            .to_string()
        }
        Err(reason) => frames::error_message(&frame.id, ErrorCode::Unauthorized, &reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_expiry_timer_follows_the_expiry_later_and_sooner() {
        let opened = Instant::now();
        let expiry = Expiry::new(opened, Some(opened + Duration::from_secs(10)));
        let timer = tokio::time::sleep_until(opened);
        tokio::pin!(timer);
        let wait = |d| tokio::time::timeout(Duration::from_secs(d), std::future::pending::<()>());
        // A refresh at 5 s moves it to 20 s: nothing at 10 s.
        let _ = wait(5).await;
        expiry.set(opened + Duration::from_secs(20));
        assert!(
            tokio::time::timeout(Duration::from_secs(14), expiry.passed(timer.as_mut()))
                .await
                .is_err()
        );
        // At 19 s a shorter token moves it back to 19.5 s.
        expiry.set(opened + Duration::from_millis(19_500));
        tokio::time::timeout(Duration::from_secs(1), expiry.passed(timer.as_mut()))
            .await
            .expect("passes at the sooner expiry");
        assert_eq!(Instant::now(), opened + Duration::from_millis(19_500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_without_expiry_never_expires() {
        let opened = Instant::now();
        let expiry = Expiry::new(opened, None);
        let timer = tokio::time::sleep_until(opened);
        tokio::pin!(timer);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), expiry.passed(timer.as_mut()))
                .await
                .is_err()
        );
    }
}
