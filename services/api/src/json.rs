//! Lossless conversion between `serde_json::Value` and the protobuf
//! well-known `Value` / `Struct`, so that JSON written by a grpcurl user
//! reaches a WebSocket client byte-for-byte in meaning.
//!
//! Protobuf numbers are doubles: an integer beyond 2^53 loses precision on
//! the way through, exactly as it would in any JSON client in a browser.
//!
//! One nesting rule, [`MAX_DEPTH`], holds for every JSON value Streamer
//! carries (client frames, payloads, results, metadata): protobuf decoders
//! stop at 100 levels of nested messages, and each level of JSON costs two
//! or three of those, so a value that is accepted anywhere must still
//! decode at every later hop (the edge stream, a router's `Receive`, a
//! processor's `Claim`, `Watch`). Checked where a value first enters.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// JSON to protobuf.
pub fn to_proto(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_proto).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(object_to_struct(map)),
    };
    Value { kind: Some(kind) }
}

/// A JSON object to a protobuf `Struct`.
pub fn object_to_struct(map: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_proto(v))).collect(),
    }
}

/// Protobuf to JSON. A `Value` with no kind set is JSON `null`; a number
/// with no fractional part within the exact-integer range becomes a JSON
/// integer, so `{"n": 3}` comes back as `3`, not `3.0`.
pub fn from_proto(value: Value) -> serde_json::Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) => number(n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.into_iter().map(from_proto).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_to_object(s)),
    }
}

/// A protobuf `Struct` to a JSON object.
pub fn struct_to_object(s: Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, from_proto(v)))
        .collect()
}

/// The deepest nesting of arrays and objects accepted (`{"a":1}` is 1).
/// The tightest carrier, a processor's `ClaimResponse`, decodes objects
/// nested 32 deep; the margin leaves room for the contract to grow.
pub const MAX_DEPTH: usize = 24;

/// How deeply a JSON value nests arrays and objects.
pub fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Why a protobuf `Value` from a caller cannot be taken as JSON, if it
/// cannot: it nests deeper than [`MAX_DEPTH`], or it (or a value inside it)
/// has no kind set. An unset `Value` is not JSON `null` (that is
/// `null_value`); it is what a client library sends when it is handed a
/// plain object where it expects a `Value` it built.
pub fn unusable(value: &Value) -> Option<String> {
    if has_unset(value) {
        return Some(
            "holds a google.protobuf.Value with no kind set (JSON null is `null_value`): \
             build the Value with your library's JSON helper (e.g. Value.fromJavaScript, \
             json_format.ParseDict) rather than passing a plain object"
                .to_owned(),
        );
    }
    (proto_depth(value) > MAX_DEPTH)
        .then(|| format!("nests arrays and objects deeper than {MAX_DEPTH} levels"))
}

fn has_unset(value: &Value) -> bool {
    match &value.kind {
        None => true,
        Some(Kind::ListValue(list)) => list.values.iter().any(has_unset),
        Some(Kind::StructValue(s)) => s.fields.values().any(has_unset),
        Some(_) => false,
    }
}

/// How deeply a protobuf `Value` nests lists and structs, counted as the
/// JSON it stands for.
pub fn proto_depth(value: &Value) -> usize {
    match &value.kind {
        Some(Kind::ListValue(list)) => 1 + list.values.iter().map(proto_depth).max().unwrap_or(0),
        Some(Kind::StructValue(s)) => struct_depth(s),
        _ => 0,
    }
}

/// [`proto_depth`] of a `Struct` (an object: at least 1).
pub fn struct_depth(s: &Struct) -> usize {
    1 + s.fields.values().map(proto_depth).max().unwrap_or(0)
}

const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0; // 2^53

fn number(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() <= MAX_EXACT_INTEGER {
        // Exact: |n| <= 2^53 fits an i64 without rounding.
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_nested_json() {
        let original = json!({
            "type": "response",
            "n": 3,
            "neg": -7,
            "pi": 3.5,
            "ok": true,
            "none": null,
            "list": [1, "two", {"three": [3]}],
        });
        assert_eq!(from_proto(to_proto(original.clone())), original);
    }

    fn nested(levels: usize, array: bool) -> serde_json::Value {
        let mut value = json!(1);
        for _ in 0..levels {
            value = if array {
                json!([value])
            } else {
                json!({"a": value})
            };
        }
        value
    }

    #[test]
    fn depth_counts_containers_alike_in_json_and_protobuf() {
        for (value, expected) in [
            (json!(1), 0),
            (json!({}), 1),
            (json!([]), 1),
            (json!({"a": [1, {"b": {}}], "c": 2}), 4),
            (nested(MAX_DEPTH, false), MAX_DEPTH),
        ] {
            assert_eq!(depth(&value), expected, "{value}");
            assert_eq!(proto_depth(&to_proto(value.clone())), expected, "{value}");
        }
    }

    /// Whatever the rule accepts decodes at every hop that carries it.
    #[test]
    fn the_deepest_accepted_value_decodes_in_every_message_that_carries_it() {
        use crate::v1;
        use prost::Message;
        fn decodes<M: Message + Default>(message: M) -> bool {
            M::decode(message.encode_to_vec().as_slice()).is_ok()
        }
        for array in [false, true] {
            let value = || to_proto(nested(MAX_DEPTH, array));
            let request = || v1::Request {
                payload: Some(value()),
                result: Some(value()),
                ..Default::default()
            };
            assert!(decodes(v1::AttachRequest {
                event: Some(v1::attach_request::Event::Frame(v1::InboundFrame {
                    payload: Some(value()),
                    ..Default::default()
                })),
            }));
            assert!(decodes(v1::AttachResponse {
                command: Some(v1::attach_response::Command::Deliver(v1::Deliver {
                    payload: Some(v1::Payload {
                        body: Some(v1::payload::Body::Json(value())),
                    }),
                    ..Default::default()
                })),
            }));
            assert!(decodes(v1::InboundMessage {
                payload: Some(value()),
                ..Default::default()
            }));
            assert!(decodes(v1::ClaimResponse {
                item: Some(v1::claim_response::Item::Work(request())),
                ..Default::default()
            }));
            assert!(decodes(v1::WatchResponse {
                request: Some(request()),
            }));
        }
        // And the margin is real: far deeper values do not decode.
        let too_deep = v1::ClaimResponse {
            item: Some(v1::claim_response::Item::Work(v1::Request {
                payload: Some(to_proto(nested(4 * MAX_DEPTH, false))),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert!(!decodes(too_deep));
    }

    #[test]
    fn unset_value_is_null() {
        assert_eq!(from_proto(Value { kind: None }), serde_json::Value::Null);
    }

    #[test]
    fn non_finite_numbers_become_null() {
        let v = Value {
            kind: Some(Kind::NumberValue(f64::INFINITY)),
        };
        assert_eq!(from_proto(v), serde_json::Value::Null);
    }
}
