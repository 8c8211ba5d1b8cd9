//! What the edge reads from clients and writes to them, independent of any
//! socket: frame validation and the edge's own error messages.

use serde_json::Value;
use streamer_api::{json, v1};
use streamer_core::client::{self, ErrorCode};
use streamer_core::ids::{ClientRequestId, ConnectionId};

/// A client frame that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub action: String,
    /// The client's id for the frame; empty when it gave none.
    pub id: ClientRequestId,
    pub payload: Value,
    pub metadata: serde_json::Map<String, Value>,
}

/// Why a frame was refused; the edge answers it with a VALIDATION_ERROR
/// and keeps the socket open.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub request_id: ClientRequestId,
    pub message: String,
}

/// Parses and checks one text frame.
pub fn parse(text: &str, max_bytes: usize) -> Result<ClientFrame, FrameError> {
    let refuse = |request_id: &ClientRequestId, message: String| FrameError {
        request_id: request_id.clone(),
        message,
    };
    let none = ClientRequestId::default();
    if text.len() > max_bytes {
        return Err(refuse(
            &none,
            format!(
                "frame of {} bytes exceeds the limit of {max_bytes} bytes",
                text.len()
            ),
        ));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| refuse(&none, format!("malformed JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(refuse(&none, "a frame must be a JSON object".into()));
    };
    let id = ClientRequestId::from(match object.remove("id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(refuse(&none, "`id` must be a string".into())),
    });
    let action = match object.remove("action") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(refuse(&id, "`action` is required".into()));
        }
        Some(_) => return Err(refuse(&id, "`action` must be a string".into())),
    };
    if streamer_core::ids::unusable(&action).is_some() {
        return Err(refuse(&id, "`action` is not a valid action name".into()));
    }
    let metadata = match object.remove("metadata") {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(m @ Value::Object(_)) => m,
        Some(_) => return Err(refuse(&id, "`metadata` must be an object".into())),
    };
    let payload = object.remove("payload").unwrap_or(Value::Null);
    // The one nesting rule: what the edge accepts, every later hop decodes.
    for (field, value) in [("payload", &payload), ("metadata", &metadata)] {
        if json::depth(value) > json::MAX_DEPTH {
            return Err(refuse(
                &id,
                format!(
                    "`{field}` nests arrays and objects deeper than {} levels",
                    json::MAX_DEPTH
                ),
            ));
        }
    }
    let Value::Object(metadata) = metadata else {
        return Err(refuse(&id, "`metadata` must be an object".into()));
    };
    Ok(ClientFrame {
        action,
        id,
        payload,
        metadata,
    })
}

/// `{"type":"error",...}` as the text the socket gets (see
/// [`streamer_core::client`]).
/// What a client is told when it sends a binary frame.
pub const BINARY_REFUSED: &str = "binary frames are not accepted; send JSON text";

pub fn error_message(request_id: &ClientRequestId, code: ErrorCode, message: &str) -> String {
    client::error(request_id, code, message).to_string()
}

/// The edge's span for a client frame: the first of the request's trace,
/// or a child of the client's own span when the frame's `metadata` carries
/// its `traceparent`.
pub fn request_span(connection_id: &ConnectionId, frame: &ClientFrame) -> tracing::Span {
    let span = tracing::info_span!(
        "edge.request",
        otel.kind = "server",
        connection_id = %connection_id,
        request_id = %frame.id,
        action = %frame.action,
    );
    streamer_core::trace::continue_from(
        &span,
        [streamer_core::trace::from_client_metadata(&frame.metadata)],
    );
    span
}

impl ClientFrame {
    /// The frame as it goes up the Attach stream, in the trace
    /// `trace_context`.
    pub fn into_inbound(
        self,
        connection_id: &ConnectionId,
        trace_context: streamer_core::trace::TraceContext,
    ) -> v1::InboundFrame {
        v1::InboundFrame {
            connection_id: connection_id.to_string(),
            action: self.action,
            request_id: self.id.into(),
            payload: Some(streamer_api::json::to_proto(self.payload)),
            metadata: Some(streamer_api::json::object_to_struct(self.metadata)),
            received_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            trace_context,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_full_frame() {
        let f = parse(
            r#"{"action":"echo","id":"r1","payload":{"x":1},"metadata":{"trace":"t"}}"#,
            1024,
        )
        .unwrap();
        assert_eq!(f.action, "echo");
        assert_eq!(f.id, "r1");
        assert_eq!(f.payload, json!({"x": 1}));
        assert_eq!(f.metadata["trace"], "t");
    }

    #[test]
    fn refuses_bad_frames_with_a_reason() {
        let cases = [
            ("not json", "malformed JSON"),
            ("[1,2]", "JSON object"),
            (r#"{"id":"r1"}"#, "`action` is required"),
            (r#"{"action":""}"#, "`action` is required"),
            (r#"{"action":5}"#, "must be a string"),
            (r#"{"action":"a","metadata":[]}"#, "`metadata`"),
            (r#"{"action":"a","id":{}}"#, "`id`"),
        ];
        for (text, expected) in cases {
            let err = parse(text, 1024).unwrap_err();
            assert!(err.message.contains(expected), "{text}: {}", err.message);
        }
        // The id is echoed when it could be read.
        assert_eq!(parse(r#"{"id":"r9"}"#, 1024).unwrap_err().request_id, "r9");
    }

    #[test]
    fn refuses_oversized_frames() {
        let text = format!(r#"{{"action":"a","payload":"{}"}}"#, "x".repeat(100));
        assert!(parse(&text, 50).unwrap_err().message.contains("exceeds"));
        assert!(parse(&text, 1000).is_ok());
    }

    #[test]
    fn refuses_payloads_nested_deeper_than_the_one_rule() {
        let nested = |levels: usize| {
            let mut value = json!(1);
            for _ in 0..levels {
                value = json!({"a": value});
            }
            value
        };
        let frame = |field: &str, levels: usize| {
            let mut frame = json!({"action": "a", "id": "r1"});
            frame[field] = nested(levels);
            frame.to_string()
        };
        for field in ["payload", "metadata"] {
            assert!(parse(&frame(field, json::MAX_DEPTH), 1 << 20).is_ok());
            let err = parse(&frame(field, json::MAX_DEPTH + 1), 1 << 20).unwrap_err();
            assert!(err.message.contains("deeper than"), "{}", err.message);
            assert!(err.message.contains(field), "{}", err.message);
            assert_eq!(err.request_id, "r1");
        }
    }

    #[test]
    fn numeric_ids_become_strings() {
        assert_eq!(parse(r#"{"action":"a","id":7}"#, 100).unwrap().id, "7");
    }

    /// Arbitrary JSON, nested up to `depth` levels (past the limit, too).
    fn json_value(depth: u32) -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(depth, 256, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever the client sends, the parser answers without panicking.
        #[test]
        fn any_text_is_parsed_or_refused_never_a_panic(text in ".{0,300}") {
            let _ = parse(&text, 1024);
        }

        /// Around the limit: a chain of arrays and objects is accepted
        /// exactly when it is within the rule, and then decodes upstream.
        #[test]
        fn nesting_is_accepted_exactly_within_the_rule(wraps in proptest::collection::vec(proptest::bool::ANY, 0..40)) {
            use prost::Message as _;
            let payload = wraps.iter().fold(json!(1), |inner, object| {
                if *object { json!({"k": inner}) } else { json!([inner]) }
            });
            let frame = json!({"action": "a", "payload": payload}).to_string();
            let parsed = parse(&frame, usize::MAX);
            proptest::prop_assert_eq!(parsed.is_ok(), wraps.len() <= json::MAX_DEPTH);
            if let Ok(parsed) = parsed {
                let event = v1::AttachRequest {
                    event: Some(v1::attach_request::Event::Frame(parsed.into_inbound(&"c1".into(), Default::default()))),
                };
                proptest::prop_assert!(v1::AttachRequest::decode(event.encode_to_vec().as_slice()).is_ok());
            }
        }

        /// The one rule: what the edge accepts, every later hop decodes.
        #[test]
        fn an_accepted_frame_always_decodes_upstream(
            payload in json_value(40),
            metadata in json_value(40),
            action in "[a-z_]{1,12}",
        ) {
            use prost::Message as _;
            let mut frame = json!({"action": action, "id": "r1", "payload": payload});
            if metadata.is_object() {
                frame["metadata"] = metadata;
            }
            if let Ok(parsed) = parse(&frame.to_string(), usize::MAX) {
                let event = v1::AttachRequest {
                    event: Some(v1::attach_request::Event::Frame(parsed.into_inbound(&"c1".into(), Default::default()))),
                };
                let bytes = event.encode_to_vec();
                proptest::prop_assert!(v1::AttachRequest::decode(bytes.as_slice()).is_ok());
            }
        }
    }
}
