//! Inbound routing: what a client sends, on its way to a router, to
//! ProgressService as a request, or to a built-in action; whatever cannot
//! be routed is answered to the client.

use serde_json::Value;
use streamer_api::errors;
use streamer_api::v1::{self, InboundMessage};
use streamer_core::ids::{ClientRequestId, ConnectionId, EdgeId};
use streamer_core::store::{ConnectionRecord, now_ms};
use streamer_core::trace;
use streamer_core::trust::Caller;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::routers::RouteError;
use crate::service::{ConnectionServer, Inbound, TOUCH_INTERVAL_MS};
use streamer_core::client::{self, ErrorCode};

/// Submits of one frame whose outcome stays unknown before the client is
/// told so.
const SUBMIT_ATTEMPTS: usize = 3;
const SUBMIT_FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(200);

impl ConnectionServer {
    /// Handles one shard's frames, one at a time, in arrival order, until
    /// no frame can arrive any more and the ones queued are handled.
    pub(crate) async fn inbound_worker(self, mut frames: mpsc::Receiver<Inbound>) {
        loop {
            let next = tokio::select! {
                next = frames.recv() => next,
                () = self.shared.drain.quiet.cancelled() => break,
            };
            let Some(Inbound { edge_id, frame }) = next else {
                return;
            };
            metrics::gauge!("streamer_inbound_queue_depth").decrement(1.0);
            self.inbound(&edge_id, frame).await;
        }
        while let Ok(Inbound { edge_id, frame }) = frames.try_recv() {
            metrics::gauge!("streamer_inbound_queue_depth").decrement(1.0);
            self.inbound(&edge_id, frame).await;
        }
    }

    /// Queues a frame on its connection's worker without waiting; a full
    /// worker answers the client RATE_LIMITED instead of stalling the edge.
    pub(crate) fn enqueue_frame(&self, edge_id: &EdgeId, frame: v1::InboundFrame) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        frame.connection_id.hash(&mut hasher);
        let shard = (hasher.finish() as usize) % self.shared.inbound.len();
        let inbound = Inbound {
            edge_id: edge_id.clone(),
            frame,
        };
        // Counted before it is queued, so the worker never takes it off
        // first.
        metrics::gauge!("streamer_inbound_queue_depth").increment(1.0);
        let queued = self.shared.inbound[shard].try_send(inbound);
        if queued.is_err() {
            metrics::gauge!("streamer_inbound_queue_depth").decrement(1.0);
        }
        if let Err(mpsc::error::TrySendError::Full(Inbound { frame, .. })) = queued {
            metrics::counter!("streamer_inbound_rejected_total", "reason" => "overloaded")
                .increment(1);
            let this = self.clone();
            tokio::spawn(async move {
                let message = client::error(
                    &ClientRequestId::from(frame.request_id),
                    ErrorCode::RateLimited,
                    "too many frames in flight; try again",
                );
                this.reply(&ConnectionId::from(frame.connection_id), message)
                    .await;
            });
        }
    }

    /// Routes one client frame: built-in actions, then routers, then the
    /// async request queue; anything else is INVALID_ACTION. Its span
    /// continues the edge's (or, from an edge that traces nothing, the
    /// client's own `metadata.traceparent`).
    pub(crate) async fn inbound(&self, edge_id: &EdgeId, frame: v1::InboundFrame) {
        let span = tracing::info_span!(
            "connection.route",
            otel.kind = "server",
            connection_id = %frame.connection_id,
            request_id = %frame.request_id,
            action = %frame.action,
            tenant_id = tracing::field::Empty,
        );
        trace::continue_from(
            &span,
            [
                trace::from_map(&frame.trace_context),
                trace::from_struct(frame.metadata.as_ref()),
            ],
        );
        self.route_frame(edge_id, frame).instrument(span).await;
    }

    async fn route_frame(&self, edge_id: &EdgeId, frame: v1::InboundFrame) {
        let connection_id = ConnectionId::from(frame.connection_id.as_str());
        let record = match self.find(&connection_id, None, Caller::everyone()).await {
            // Only the edge holding a socket speaks for it.
            Ok(record) if record.edge_id == *edge_id => record,
            Ok(_) => {
                tracing::warn!(edge_id = edge_id.as_str(), connection_id = %connection_id, "frame from an edge that does not hold the connection; dropped");
                return;
            }
            Err(_) => return, // closed meanwhile
        };
        tracing::Span::current().record("tenant_id", record.tenant_id.as_str());
        let now = now_ms();
        if now.saturating_sub(record.last_seen_ms) > TOUCH_INTERVAL_MS {
            let _ = self
                .shared
                .store
                .touch_connection(&record.connection_id, now)
                .await;
        }
        metrics::counter!("streamer_inbound_frames_total").increment(1);
        let request_id = frame.request_id.clone();
        let answer = match frame.action.as_str() {
            "get_request" | "cancel_request" => self.request_action(&record, frame).await,
            "subscribe" => self.client_subscribe(&record, frame).await,
            "unsubscribe" => self.client_unsubscribe(&record, frame).await,
            _ => self.route(&record, frame).await,
        };
        if let Some(message) = answer {
            self.reply(&record.connection_id, message).await;
        } else {
            tracing::trace!(request_id = %request_id, "frame routed");
        }
    }

    pub(crate) async fn route(
        &self,
        record: &ConnectionRecord,
        frame: v1::InboundFrame,
    ) -> Option<Value> {
        let request_id = ClientRequestId::from(frame.request_id.as_str());
        let action = frame.action.clone();
        let message = InboundMessage {
            connection_id: record.connection_id.to_string(),
            identity: Some(v1::Identity {
                user_id: record.user_id.to_string(),
                tenant_id: record.tenant_id.to_string(),
                permissions: record.permissions.clone(),
                topics: record.topics.clone(),
            }),
            action: frame.action,
            request_id: frame.request_id,
            payload: frame.payload,
            metadata: frame.metadata,
            received_at: frame.received_at,
            trace_context: trace::current(),
        };
        let message = match self.shared.routers.dispatch(message) {
            Ok(_) => return None,
            Err((RouteError::Busy, _)) => {
                metrics::counter!("streamer_inbound_rejected_total", "reason" => "busy")
                    .increment(1);
                return Some(client::error(
                    &request_id,
                    ErrorCode::RateLimited,
                    format!("every router for action {action:?} is busy; try again"),
                ));
            }
            Err((RouteError::NoRouter, message)) => message,
        };
        let invalid = || {
            client::error(
                &request_id,
                ErrorCode::InvalidAction,
                format!("no handler for action {action:?}"),
            )
        };
        let Some(progress) = &self.shared.progress else {
            return Some(invalid());
        };
        // The client's id makes Submit idempotent (one request per user and
        // id), so a Submit whose outcome is unknown (a ProgressService
        // replica went away mid-call) is safely made again, on the next
        // replica; a frame without an id gets one here, for the same reason.
        let request_id = ClientRequestId::from(if message.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            message.request_id
        });
        let submit = v1::SubmitRequest {
            connection_id: message.connection_id,
            action: message.action,
            request_id: request_id.to_string(),
            payload: message.payload,
            metadata: message.metadata,
        };
        let mut submitted = progress
            .call(SUBMIT_ATTEMPTS, SUBMIT_FIRST_BACKOFF, |mut client| {
                let submit = submit.clone();
                async move { client.submit(trace::request(submit)).await }
            })
            .await;
        // A replica knows the actions of its own processors (and of
        // --async-actions): before telling the client that nothing runs the
        // action, ask every replica once. A refused Submit changed nothing,
        // and Submit is idempotent on the client's id.
        if submitted.as_ref().is_err_and(action_not_handled) {
            for mut client in progress.in_turn() {
                submitted = client.submit(trace::request(submit.clone())).await;
                if !submitted.as_ref().is_err_and(action_not_handled) {
                    break;
                }
            }
        }
        match submitted {
            // ProgressService acknowledges to the client itself, so the
            // acknowledgment is ordered before the request's progress.
            Ok(_) => None,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Some(invalid()),
            Err(status) if status.code() == tonic::Code::InvalidArgument => Some(client::error(
                &request_id,
                ErrorCode::Validation,
                status.message().to_owned(),
            )),
            Err(status) => {
                tracing::warn!(error = %status, action = %action, "submit failed");
                Some(client::error(
                    &request_id,
                    ErrorCode::Internal,
                    "the request service did not answer, so the request may or may not be \
                     queued: send it again with the same id (it is queued at most once) or \
                     ask with get_request",
                ))
            }
        }
    }

    /// `get_request` and `cancel_request`, with `{"request_id": ...}` as
    /// payload, always scoped to the connection's own user.
    pub(crate) async fn request_action(
        &self,
        record: &ConnectionRecord,
        frame: v1::InboundFrame,
    ) -> Option<Value> {
        let id = &ClientRequestId::from(frame.request_id.as_str());
        let payload = frame.payload.map(streamer_api::json::from_proto);
        let Some(target) = payload
            .as_ref()
            .and_then(|p| p.get("request_id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        else {
            return Some(client::error(
                id,
                ErrorCode::Validation,
                "payload.request_id is required",
            ));
        };
        let Some(progress) = &self.shared.progress else {
            return Some(client::error(
                id,
                ErrorCode::InvalidAction,
                "requests are not enabled on this deployment",
            ));
        };
        let owner = v1::Identity {
            user_id: record.user_id.to_string(),
            tenant_id: record.tenant_id.to_string(),
            permissions: Vec::new(),
            topics: Vec::new(),
        };
        let get = v1::GetRequest {
            selector: Some(v1::get_request::Selector::Client(v1::ClientRequestRef {
                tenant_id: record.tenant_id.to_string(),
                user_id: record.user_id.to_string(),
                request_id: target.to_owned(),
            })),
            owner: Some(owner.clone()),
            // A client asking about its request wants its updates here.
            deliver_to_connection_id: if frame.action == "get_request" {
                record.connection_id.to_string()
            } else {
                String::new()
            },
        };
        // Both calls go on to another replica when one does not answer. A
        // cancel made again finds the request cancelled when the first one
        // took effect unseen: that is its answer, not "already finished".
        let cancel = frame.action == "cancel_request";
        let mut again = false;
        let result = progress
            .call(SUBMIT_ATTEMPTS, SUBMIT_FIRST_BACKOFF, |mut client| {
                let (get, owner) = (get.clone(), owner.clone());
                let again = std::mem::replace(&mut again, true);
                async move {
                    let found = client.get(get).await?.into_inner().request;
                    let found = found.unwrap_or_default();
                    let cancelled = found.status() == v1::RequestStatus::Cancelled;
                    if !cancel || (again && cancelled) {
                        return Ok(found);
                    }
                    let cancelled = client
                        .cancel(v1::CancelRequest {
                            id: found.id,
                            reason: "cancelled by the client".into(),
                            owner: Some(owner),
                        })
                        .await?;
                    Ok(cancelled.into_inner().request.unwrap_or_default())
                }
            })
            .await;
        Some(match result {
            Ok(request) => client::response(id, client::request_state(request)),
            Err(status) => {
                let code = match status.code() {
                    tonic::Code::NotFound => ErrorCode::NotFound,
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                        ErrorCode::Validation
                    }
                    _ => ErrorCode::Internal,
                };
                client::error(id, code, status.message().to_owned())
            }
        })
    }
}

/// Whether a Submit was refused because its replica knows no processor of
/// the action.
fn action_not_handled(status: &tonic::Status) -> bool {
    errors::reason_of(status).as_deref()
        == Some(errors::reason_name(errors::Reason::ActionNotHandled))
}
