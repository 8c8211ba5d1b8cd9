//! Every JSON message a client receives over its WebSocket, built in this
//! one place whichever process writes it (the edge, ConnectionService or
//! ProgressService), in the protocol's shapes:
//!
//! - `error` and `response`: answers to a client's frame;
//! - `acknowledgment`, `progress`, and one final `complete` or `error`: a
//!   request's updates. `sequence` orders them within a request: the
//!   acknowledgment is 0, every later update has a larger number (progress
//!   that was coalesced away leaves a gap).

use serde_json::{Map, Value, json};
use streamer_api::v1;

use crate::ids::ClientRequestId;
use crate::store::{RequestRecord, RequestStatus};
use crate::timestamp;

/// Error codes of the WebSocket protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Validation,
    NotFound,
    Internal,
    RateLimited,
    InvalidAction,
    Unauthorized,
    ProcessingFailed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validation => "VALIDATION_ERROR",
            Self::NotFound => "NOT_FOUND",
            Self::Internal => "INTERNAL_ERROR",
            Self::RateLimited => "RATE_LIMITED",
            Self::InvalidAction => "INVALID_ACTION",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::ProcessingFailed => "PROCESSING_FAILED",
        }
    }
}

/// `{"type":"error","request_id":...,"error":{"code","message"}}`, for the
/// client's frame `request_id`; the `request_id` is omitted when the frame
/// had no id.
pub fn error(request_id: &ClientRequestId, code: ErrorCode, message: impl Into<String>) -> Value {
    let mut value = json!({
        "type": "error",
        "error": { "code": code.as_str(), "message": message.into() },
    });
    if !request_id.is_empty() {
        value["request_id"] = Value::String(request_id.to_string());
    }
    value
}

/// `{"type":"response","request_id","success":true,"data"}`, answering the
/// client's frame `request_id`.
pub fn response(request_id: &ClientRequestId, data: Value) -> Value {
    json!({
        "type": "response",
        "request_id": request_id,
        "success": true,
        "data": data,
    })
}

fn rfc3339(ts: Option<prost_types::Timestamp>) -> Value {
    ts.map(|t| Value::String(t.to_string()))
        .unwrap_or(Value::Null)
}

fn status_name(status: i32) -> &'static str {
    match v1::RequestStatus::try_from(status) {
        Ok(v1::RequestStatus::Pending) => "pending",
        Ok(v1::RequestStatus::Processing) => "processing",
        Ok(v1::RequestStatus::Completed) => "completed",
        Ok(v1::RequestStatus::Failed) => "failed",
        Ok(v1::RequestStatus::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// A request's state as a client sees it (no processor or lease details).
pub fn request_state(r: v1::Request) -> Value {
    use streamer_api::json::{from_proto, struct_to_object};
    let progress = r.progress.map(|p| {
        json!({
            "percentage": p.percentage,
            "message": p.message,
            "metadata": p.metadata.map(struct_to_object).unwrap_or_default(),
            "timestamp": rfc3339(p.updated_at),
            "sequence": p.sequence,
        })
    });
    let error = r.error.map(|e| {
        json!({
            "code": e.code,
            "message": e.message,
            "details": e.details.map(struct_to_object).unwrap_or_default(),
        })
    });
    json!({
        "id": r.id,
        "request_id": r.request_id,
        "action": r.action,
        "status": status_name(r.status),
        "attempts": r.attempts,
        "progress": progress,
        "result": r.result.map(from_proto),
        "error": error,
        "created_at": rfc3339(r.created_at),
        "updated_at": rfc3339(r.updated_at),
        "sequence": r.sequence,
    })
}

/// ISO-8601 UTC, e.g. `2025-01-02T03:04:05.678Z`.
pub fn iso8601(ms: u64) -> String {
    timestamp(ms).to_string()
}

/// The first message of every request. Its timestamp is the request's
/// creation, so a retry of it is the same message.
pub fn acknowledgment(record: &RequestRecord) -> Value {
    json!({
        "type": "acknowledgment",
        "request_id": record.client_request_id,
        "id": record.id,
        "status": "queued",
        "sequence": 0,
        "timestamp": iso8601(record.created_at_ms),
    })
}

/// The latest progress of `record`, when it has any.
pub fn progress(record: &RequestRecord) -> Option<Value> {
    let p = record.progress.as_ref()?;
    let mut message = json!({
        "type": "progress",
        "request_id": record.client_request_id,
        "percentage": p.percentage,
        "message": p.message,
        "timestamp": iso8601(p.updated_at_ms),
        "sequence": p.sequence,
    });
    if !p.metadata.is_empty() {
        message["metadata"] = Value::Object(p.metadata.clone());
    }
    Some(message)
}

/// The one final message of a finished request; `None` while it runs.
/// A `replay` (sent again to a client that resumed on a new connection) is
/// the same message, marked `"replay": true`.
pub fn final_message(record: &RequestRecord, replay: bool) -> Option<Value> {
    let mut message = final_message_of(record)?;
    if replay {
        message["replay"] = Value::Bool(true);
    }
    Some(message)
}

fn final_message_of(record: &RequestRecord) -> Option<Value> {
    match record.status {
        RequestStatus::Pending | RequestStatus::Processing => None,
        RequestStatus::Completed => Some(json!({
            "type": "complete",
            "request_id": record.client_request_id,
            "result": record.result.clone().unwrap_or(Value::Null),
            "timestamp": iso8601(record.updated_at_ms),
            "sequence": record.sequence,
        })),
        RequestStatus::Failed => {
            let (code, message, extra) = match &record.error {
                Some(e) => (e.code.as_str(), e.message.as_str(), e.details.clone()),
                None => ("PROCESSING_FAILED", "processing failed", Map::new()),
            };
            let mut details = Map::new();
            details.insert("code".to_owned(), Value::from(code));
            // The processor's own details, but never over its code.
            for (k, v) in extra {
                details.entry(k).or_insert(v);
            }
            Some(processing_failed(record, message, details))
        }
        RequestStatus::Cancelled => {
            let mut details = Map::new();
            details.insert("status".to_owned(), Value::from("cancelled"));
            if let Some(reason) = record.error.as_ref().map(|e| &e.details)
                && let Some(reason) = reason.get("reason")
            {
                details.insert("reason".to_owned(), reason.clone());
            }
            Some(processing_failed(record, "request cancelled", details))
        }
    }
}

fn processing_failed(record: &RequestRecord, message: &str, details: Map<String, Value>) -> Value {
    json!({
        "type": "error",
        "request_id": record.client_request_id,
        "error": {
            "code": ErrorCode::ProcessingFailed.as_str(),
            "message": message,
            "details": details,
        },
        "timestamp": iso8601(record.updated_at_ms),
        "sequence": record.sequence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_omits_an_empty_request_id() {
        let e = error(&ClientRequestId::default(), ErrorCode::Validation, "bad");
        assert!(e.get("request_id").is_none());
        assert_eq!(e["error"]["code"], "VALIDATION_ERROR");
        let e = error(&"r1".into(), ErrorCode::InvalidAction, "nope");
        assert_eq!(e["request_id"], "r1");
        assert_eq!(e["error"]["code"], "INVALID_ACTION");
    }

    #[test]
    fn request_state_names_status_and_result() {
        let state = request_state(v1::Request {
            id: "srv".into(),
            request_id: "mine".into(),
            status: v1::RequestStatus::Completed as i32,
            result: Some(streamer_api::json::to_proto(json!({"url": "x"}))),
            ..Default::default()
        });
        assert_eq!(state["status"], "completed");
        assert_eq!(state["result"]["url"], "x");
        assert_eq!(state["request_id"], "mine");
    }
}
