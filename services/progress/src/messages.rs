//! The JSON messages the client receives, in the original Streamer
//! clients' shapes. `sequence` orders them within a request: the
//! acknowledgment is 0, every later update has a larger number (progress
//! that was coalesced away leaves a gap).

use serde_json::{Map, Value, json};
use streamer_core::store::{RequestRecord, RequestStatus};
use streamer_core::timestamp;

/// ISO-8601 UTC, e.g. `2025-01-02T03:04:05.678Z`.
pub(crate) fn iso8601(ms: u64) -> String {
    timestamp(ms).to_string()
}

/// The first message of every request. Its timestamp is the request's
/// creation, so a retry of it is the same message.
pub(crate) fn acknowledgment(record: &RequestRecord) -> Value {
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
pub(crate) fn progress(record: &RequestRecord) -> Option<Value> {
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
pub(crate) fn final_message(record: &RequestRecord, replay: bool) -> Option<Value> {
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
            Some(error(record, message, details))
        }
        RequestStatus::Cancelled => {
            let mut details = Map::new();
            details.insert("status".to_owned(), Value::from("cancelled"));
            if let Some(reason) = record.error.as_ref().map(|e| &e.details)
                && let Some(reason) = reason.get("reason")
            {
                details.insert("reason".to_owned(), reason.clone());
            }
            Some(error(record, "request cancelled", details))
        }
    }
}

fn error(record: &RequestRecord, message: &str, details: Map<String, Value>) -> Value {
    json!({
        "type": "error",
        "request_id": record.client_request_id,
        "error": {
            "code": "PROCESSING_FAILED",
            "message": message,
            "details": details,
        },
        "timestamp": iso8601(record.updated_at_ms),
        "sequence": record.sequence,
    })
}
