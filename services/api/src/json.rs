//! Lossless conversion between `serde_json::Value` and the protobuf
//! well-known `Value` / `Struct`, so that JSON written by a grpcurl user
//! reaches a WebSocket client byte-for-byte in meaning.
//!
//! Protobuf numbers are doubles: an integer beyond 2^53 loses precision on
//! the way through, exactly as it would in any JSON client in a browser.

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
