//! The JSON messages ConnectionService itself writes to clients: answers to
//! the built-in actions and errors for frames it could not route. Shapes are
//! the WebSocket protocol's (`type: response | error`).

use serde_json::{Value, json};
use streamer_api::v1;

/// Error codes of the WebSocket protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrorCode {
    Validation,
    NotFound,
    Internal,
    RateLimited,
    InvalidAction,
}

impl ClientErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validation => "VALIDATION_ERROR",
            Self::NotFound => "NOT_FOUND",
            Self::Internal => "INTERNAL_ERROR",
            Self::RateLimited => "RATE_LIMITED",
            Self::InvalidAction => "INVALID_ACTION",
        }
    }
}

/// `{"type":"error","request_id":...,"error":{"code","message"}}`; the
/// `request_id` is omitted when the frame had no id.
pub fn error(request_id: &str, code: ClientErrorCode, message: impl Into<String>) -> Value {
    let mut value = json!({
        "type": "error",
        "error": { "code": code.as_str(), "message": message.into() },
    });
    if !request_id.is_empty() {
        value["request_id"] = Value::String(request_id.to_owned());
    }
    value
}

/// `{"type":"response","request_id","success":true,"data"}`.
pub fn response(request_id: &str, data: Value) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_omits_an_empty_request_id() {
        let e = error("", ClientErrorCode::Validation, "bad");
        assert!(e.get("request_id").is_none());
        assert_eq!(e["error"]["code"], "VALIDATION_ERROR");
        let e = error("r1", ClientErrorCode::InvalidAction, "nope");
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
