//! The WebSocket protocol's schema, `docs/websocket.schema.json`, compiled
//! once per test binary, and the checks that hold messages to it.

use std::sync::LazyLock;

use serde_json::Value;

/// The schema document, as the repository has it.
pub const SCHEMA_TEXT: &str = include_str!("../../docs/websocket.schema.json");

/// The schema document, parsed.
pub static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    serde_json::from_str(SCHEMA_TEXT).expect("docs/websocket.schema.json is not JSON")
});

/// A validator for every subschema, keyed by its pointer (`#/$defs/Name`).
static VALIDATORS: LazyLock<jsonschema::ValidatorMap> = LazyLock::new(|| {
    jsonschema::draft202012::options()
        .build_map(&SCHEMA)
        .unwrap_or_else(|error| panic!("docs/websocket.schema.json does not compile: {error}"))
});

/// The validator of the schema's `$defs/<name>`.
pub fn validator(name: &str) -> &'static jsonschema::Validator {
    VALIDATORS
        .get(&format!("#/$defs/{name}"))
        .unwrap_or_else(|| panic!("docs/websocket.schema.json has no $defs/{name}"))
}

/// Why `value` is not a valid `$defs/<name>`: one line per schema error,
/// empty when it is valid.
pub fn violations(name: &str, value: &Value) -> Vec<String> {
    validator(name)
        .iter_errors(value)
        .map(|error| {
            format!(
                "{name}: at {:?}: {error} (schema {})",
                error.instance_path().as_str(),
                error.schema_path().as_str()
            )
        })
        .collect()
}

/// The definition a server message of this `type` must meet, for a more
/// telling error than `oneOf`'s "valid under none".
fn definition_for(message: &Value) -> Option<&'static str> {
    Some(match message.get("type")?.as_str()? {
        "response" => "Response",
        "acknowledgment" => "Acknowledgment",
        "progress" => "Progress",
        "complete" => "Complete",
        "error" if message.get("sequence").is_some() => "RequestFailed",
        "error" => "FrameError",
        "message" => "Message",
        _ => return None,
    })
}

/// Fails the test, with the schema's errors and the value, unless `value`
/// is a valid `$defs/<name>`.
pub fn assert_conforms(name: &str, value: &Value) {
    let mut errors = violations(name, value);
    if errors.is_empty() {
        return;
    }
    if name == "ServerMessage"
        && let Some(definition) = definition_for(value)
    {
        errors.extend(violations(definition, value));
    }
    panic!(
        "not a valid {name} of docs/websocket.schema.json:\n  {}\nthe message: {value}",
        errors.join("\n  ")
    );
}
