//! The WebSocket protocol's schema, `docs/websocket.schema.json`: a valid
//! 2020-12 schema that documents every definition; the README's examples
//! meet it; it refuses what the protocol does not allow; and a real system,
//! driven through every kind of server message, writes only what it allows.
//! (Every other suite's `WsClient::recv_json` holds each message to it too.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use streamer_api::v1::{self, claim_response::Item};
use streamer_auth::dev::MintOptions;
use support::schema::{SCHEMA, assert_conforms, violations};
use support::{TestSystem, WsClient, within};

// ---------------------------------------------------------------------------
// (a) The schema itself.

#[test]
fn the_schema_is_a_valid_2020_12_schema() {
    assert_eq!(
        SCHEMA["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    if let Err(error) = jsonschema::draft202012::meta::validate(&SCHEMA) {
        panic!("docs/websocket.schema.json is not a valid 2020-12 schema: {error}");
    }
    // The check can fail: a schema with a misspelt type is refused.
    assert!(jsonschema::draft202012::meta::validate(&json!({"type": "strng"})).is_err());
    for entry in ["ClientFrame", "ServerMessage", "HttpRefusal"] {
        // Compiles, and is an entry point.
        let _ = support::schema::validator(entry);
    }
}

/// Every definition, every property and every `oneOf` branch that is not a
/// reference says what it is: the schema is documentation for other teams.
#[test]
fn every_definition_and_property_is_described() {
    fn walk(at: &str, schema: &Value, required: bool, undescribed: &mut Vec<String>) {
        let Some(object) = schema.as_object() else {
            return;
        };
        let described = object.get("description").is_some_and(Value::is_string);
        if required && !described && !object.contains_key("$ref") {
            undescribed.push(at.to_owned());
        }
        if let Some(properties) = object.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                walk(
                    &format!("{at}/properties/{name}"),
                    property,
                    true,
                    undescribed,
                );
            }
        }
        for keyword in ["oneOf", "anyOf", "allOf"] {
            for (i, branch) in object
                .get(keyword)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                walk(&format!("{at}/{keyword}/{i}"), branch, false, undescribed);
            }
        }
    }
    let mut undescribed = Vec::new();
    let defs = SCHEMA["$defs"].as_object().unwrap();
    for (name, definition) in defs {
        walk(
            &format!("#/$defs/{name}"),
            definition,
            true,
            &mut undescribed,
        );
    }
    assert!(
        undescribed.is_empty(),
        "without a description: {undescribed:#?}"
    );
    // Every server message type has its definition, and the one entry point
    // lists each.
    let listed: Vec<&str> = SCHEMA["$defs"]["ServerMessage"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|branch| branch["$ref"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [
            "#/$defs/Response",
            "#/$defs/Acknowledgment",
            "#/$defs/Progress",
            "#/$defs/Complete",
            "#/$defs/Error",
            "#/$defs/Message"
        ]
    );
}

/// The error codes the schema lists are exactly the implementation's.
#[test]
fn the_error_codes_are_the_implementations() {
    use streamer_core::client::ErrorCode;
    let codes: BTreeSet<&str> = [
        ErrorCode::Validation,
        ErrorCode::NotFound,
        ErrorCode::Internal,
        ErrorCode::RateLimited,
        ErrorCode::InvalidAction,
        ErrorCode::Unauthorized,
        ErrorCode::ProcessingFailed,
    ]
    .into_iter()
    .map(ErrorCode::as_str)
    .collect();
    let listed: BTreeSet<&str> = SCHEMA["$defs"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|code| code.as_str().unwrap())
        .collect();
    assert_eq!(listed, codes);
}

// ---------------------------------------------------------------------------
// (b) The README's examples.

/// The README's sections about the client protocol, each as its lines.
fn readme_sections() -> BTreeMap<String, Vec<String>> {
    let readme = include_str!("../README.md");
    let wanted = [
        "### Requests, routers and processors",
        "## The WebSocket protocol",
        "### Topics",
    ];
    let mut sections = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        if line.starts_with('#') {
            current = wanted.contains(&line).then(|| line.to_owned());
            continue;
        }
        if let Some(heading) = &current {
            sections
                .entry(heading.clone())
                .or_insert_with(Vec::new)
                .push(line.to_owned());
        }
    }
    // The refusals of step 7 ("See bad tokens refused"): the first JSON
    // block after it.
    let step = readme
        .find("**7. See bad tokens refused**")
        .expect("the README's step 7");
    sections.insert(
        "step 7".to_owned(),
        readme[step..].lines().map(str::to_owned).collect(),
    );
    sections
}

/// The lines of the ```json blocks in `lines` (only the first block when
/// `first_only`).
fn json_block_lines(lines: &[String], first_only: bool) -> Vec<String> {
    let mut found = Vec::new();
    let mut inside = false;
    for line in lines {
        if inside && line.trim() == "```" {
            inside = false;
            if first_only {
                break;
            }
        } else if inside {
            found.push(line.clone());
        } else if line.trim() == "```json" {
            inside = true;
        }
    }
    found
}

/// The inline code spans of `lines` that are JSON objects.
fn inline_objects(lines: &[String]) -> Vec<Value> {
    let mut found = Vec::new();
    for line in lines {
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1
                && span.starts_with('{')
                && let Ok(value) = serde_json::from_str::<Value>(span)
            {
                found.push(value);
            }
        }
    }
    found
}

/// What a README example is, by its shape.
fn classify(value: &Value) -> &'static str {
    if value.get("action").is_some() {
        "ClientFrame"
    } else if value.get("type").is_some() {
        "ServerMessage"
    } else if value.get("code").is_some() && value.get("error").is_some() {
        "HttpRefusal"
    } else {
        "unknown"
    }
}

/// The definition of a built-in action's answer `data`.
fn data_definition(action: &str) -> Option<&'static str> {
    Some(match action {
        "get_request" | "cancel_request" => "RequestState",
        "refresh" => "RefreshResult",
        "subscribe" => "SubscribeResult",
        "unsubscribe" => "UnsubscribeResult",
        _ => return None,
    })
}

#[test]
fn the_readmes_examples_meet_the_schema() {
    let mut checked: BTreeMap<&str, usize> = BTreeMap::new();
    for (heading, lines) in readme_sections() {
        let block = json_block_lines(&lines, heading == "step 7");
        assert!(!block.is_empty(), "{heading}: no JSON block found");
        // Which built-in action each client id asked for, to check the
        // answers' data.
        let mut actions: BTreeMap<String, String> = BTreeMap::new();
        for line in block {
            let line = line.trim();
            if line.is_empty() || line == "…" {
                continue;
            }
            let (server, text) = match line.strip_prefix("< ") {
                Some(text) => (true, text),
                None => (false, line),
            };
            let value: Value = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("{heading}: not JSON ({e}): {line}"));
            let kind = classify(&value);
            assert!(
                kind != "unknown" && (!server || kind == "ServerMessage"),
                "{heading}: neither a client frame, a server message nor a refusal: {line}"
            );
            assert_conforms(kind, &value);
            *checked.entry(kind).or_default() += 1;
            if kind == "ClientFrame"
                && let (Some(id), Some(action)) = (value["id"].as_str(), value["action"].as_str())
            {
                actions.insert(id.to_owned(), action.to_owned());
            }
            if value["type"] == "response"
                && let Some(action) = value["request_id"].as_str().and_then(|id| actions.get(id))
                && let Some(definition) = data_definition(action)
            {
                assert_conforms(definition, &value["data"]);
                *checked.entry(definition).or_default() += 1;
            }
        }
        // Frames written inline in the prose, such as cancel_request's.
        for value in inline_objects(&lines) {
            let kind = classify(&value);
            if kind == "ClientFrame" || kind == "ServerMessage" {
                assert_conforms(kind, &value);
                *checked.entry(kind).or_default() += 1;
            }
        }
    }
    // The README's examples are all there: a vanished block fails here.
    assert!(checked["ClientFrame"] >= 7, "{checked:?}");
    assert!(checked["ServerMessage"] >= 6, "{checked:?}");
    assert!(checked["HttpRefusal"] >= 3, "{checked:?}");
    assert!(checked["SubscribeResult"] >= 2, "{checked:?}");
}

// ---------------------------------------------------------------------------
// (c) What the schema refuses.

/// One valid message of each server type, as the implementation writes them.
fn valid_server_messages() -> Vec<Value> {
    vec![
        json!({"type": "response", "request_id": "r1", "success": true, "data": {"x": 1}}),
        json!({"type": "acknowledgment", "request_id": "r1", "id": "019ab2f4-5c6d-7e8f-9a0b-1c2d3e4f5a6b",
               "status": "queued", "sequence": 0, "timestamp": "2026-01-15T10:00:00.120Z"}),
        json!({"type": "progress", "request_id": "r1", "percentage": 20.0, "message": "page 1 of 5",
               "timestamp": "2026-01-15T10:00:01Z", "sequence": 1, "metadata": {"page": 1}}),
        json!({"type": "complete", "request_id": "r1", "result": null,
               "timestamp": "2026-01-15T10:00:02.500Z", "sequence": 2}),
        json!({"type": "error", "error": {"code": "VALIDATION_ERROR", "message": "malformed JSON"}}),
        json!({"type": "error", "request_id": "r1", "error": {"code": "PROCESSING_FAILED",
               "message": "request cancelled", "details": {"status": "cancelled"}},
               "timestamp": "2026-01-15T10:00:02.500Z", "sequence": 3, "replay": true}),
        json!({"type": "message", "topic": "orders/42", "epoch": "e1", "offset": 1, "data": "x"}),
    ]
}

/// `base` with `change` made to it.
fn changed(base: &Value, change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut value = base.clone();
    change(value.as_object_mut().unwrap());
    value
}

/// Asserts `value` is not a valid `definition`, and that the schema says
/// why in words containing `because` (so the refusal is the one meant).
fn assert_refused(definition: &str, value: &Value, because: &str) {
    let errors = violations(definition, value);
    assert!(
        !errors.is_empty(),
        "{definition} accepted what it must refuse: {value}"
    );
    assert!(
        errors.iter().any(|e| e.contains(because)),
        "{definition} refused {value}, but not for {because:?}: {errors:#?}"
    );
}

#[test]
fn wrong_server_messages_are_refused() {
    let [
        response,
        ack,
        progress,
        complete,
        frame_error,
        failed,
        message,
    ] = <[Value; 7]>::try_from(valid_server_messages()).unwrap();
    // The bases are valid, so each refusal below is the change's doing.
    for base in [
        &response,
        &ack,
        &progress,
        &complete,
        &frame_error,
        &failed,
        &message,
    ] {
        assert_conforms("ServerMessage", base);
    }
    let cases = [
        (
            "Progress",
            changed(&progress, |m| {
                m.remove("sequence");
            }),
            "\"sequence\" is a required property",
        ),
        (
            "ServerMessage",
            changed(&progress, |m| {
                m.insert("type".into(), json!("notice"));
            }),
            "oneOf",
        ),
        (
            "FrameError",
            changed(&frame_error, |m| {
                m.insert("error".into(), json!({"code": "TEAPOT", "message": "no"}));
            }),
            "TEAPOT",
        ),
        (
            "FrameError",
            changed(&frame_error, |m| {
                m.insert(
                    "error".into(),
                    json!({"code": "PROCESSING_FAILED", "message": "no"}),
                );
            }),
            "PROCESSING_FAILED",
        ),
        (
            "Acknowledgment",
            changed(&ack, |m| {
                m.insert("sequence".into(), json!(1));
            }),
            "0 was expected",
        ),
        (
            "Acknowledgment",
            changed(&ack, |m| {
                m.insert("status".into(), json!("pending"));
            }),
            "\"queued\" was expected",
        ),
        (
            "Progress",
            changed(&progress, |m| {
                m.insert("percentage".into(), json!(101));
            }),
            "maximum",
        ),
        (
            "Progress",
            changed(&progress, |m| {
                m.insert("eta".into(), json!(3));
            }),
            "Additional properties",
        ),
        (
            "Progress",
            changed(&progress, |m| {
                m.insert("metadata".into(), json!({}));
            }),
            "less than 1 property",
        ),
        (
            "Progress",
            changed(&progress, |m| {
                m.insert("timestamp".into(), json!("2026-01-15T10:00:01+00:00"));
            }),
            "does not match",
        ),
        (
            "Complete",
            changed(&complete, |m| {
                m.insert("replay".into(), json!(false));
            }),
            "true was expected",
        ),
        (
            "Complete",
            changed(&complete, |m| {
                m.insert("sequence".into(), json!(0));
            }),
            "minimum",
        ),
        (
            "RequestFailed",
            changed(&failed, |m| {
                m.remove("timestamp");
            }),
            "\"timestamp\" is a required property",
        ),
        (
            "RequestFailed",
            changed(&failed, |m| {
                m["error"]["details"] = json!({"status": "cancelled", "by": "x"});
            }),
            "oneOf",
        ),
        (
            "Response",
            changed(&response, |m| {
                m.insert("success".into(), json!(false));
            }),
            "true was expected",
        ),
        (
            "Message",
            changed(&message, |m| {
                m.insert("offset".into(), json!(0));
            }),
            "minimum",
        ),
        (
            "Message",
            changed(&message, |m| {
                m.remove("epoch");
            }),
            "\"epoch\" is a required property",
        ),
    ];
    for (definition, value, because) in cases {
        assert_refused(definition, &value, because);
        // The entry point refuses it as well.
        assert!(
            !violations("ServerMessage", &value).is_empty(),
            "ServerMessage accepted {value}"
        );
    }
}

#[test]
fn wrong_client_frames_and_refusals_are_refused() {
    let frame =
        json!({"action": "echo", "id": "r1", "payload": {"x": 1}, "metadata": {"trace": "t"}});
    assert_conforms("ClientFrame", &frame);
    let cases = [
        (json!({"id": "r1"}), "\"action\" is a required property"),
        (json!({"action": ""}), "shorter than 1"),
        (json!({"action": "   "}), "does not match"),
        (json!({"action": 5}), "is not of type \"string\""),
        (json!({"action": "a\u{7}b"}), "not allowed"),
        (json!({"action": "a", "id": {}}), "is not of type"),
        (json!({"action": "a", "metadata": []}), "is not of type"),
        (
            json!({"action": "get_request", "id": "g", "payload": {}}),
            "\"request_id\" is a required property",
        ),
        (
            json!({"action": "cancel_request", "id": "c"}),
            "\"payload\" is a required property",
        ),
        (
            json!({"action": "refresh", "payload": {"token": ""}}),
            "shorter than 1",
        ),
        (
            json!({"action": "subscribe", "payload": {"since": {"epoch": "e", "offset": 1}}}),
            "\"topic\" is a required property",
        ),
        (
            json!({"action": "subscribe", "payload": {"topic": "t", "since": {"epoch": "e", "offset": -1}}}),
            "anyOf",
        ),
        (
            json!({"action": "unsubscribe", "payload": {"topic": "a\nb"}}),
            "not allowed",
        ),
    ];
    for (value, because) in cases {
        assert_refused("ClientFrame", &value, because);
    }
    let refusal =
        json!({"error": "token expired", "code": "UNAUTHORIZED", "reason": "token_expired"});
    assert_conforms("HttpRefusal", &refusal);
    assert_refused(
        "Unauthorized",
        &changed(&refusal, |m| {
            m.insert("reason".into(), json!("bad_luck"));
        }),
        "bad_luck",
    );
    assert_refused(
        "Unauthorized",
        &changed(&refusal, |m| {
            m.remove("reason");
        }),
        "\"reason\" is a required property",
    );
    assert!(
        !violations(
            "HttpRefusal",
            &changed(&refusal, |m| {
                m.insert("code".into(), json!("NOPE"));
            })
        )
        .is_empty()
    );
}

/// The edge's own frame parser and the schema's `RequestFrame` agree on
/// which frames are well formed (nesting depth aside, which a schema does
/// not bound).
#[test]
fn the_frame_rules_match_the_edges_parser() {
    let frames = [
        json!({"action": "echo"}),
        json!({"action": "echo", "id": "r1", "payload": [1, 2], "metadata": {"a": 1}}),
        json!({"action": "echo", "id": 7, "payload": null, "metadata": null}),
        json!({"action": "echo", "id": null, "extra": true}),
        json!({"action": "x".repeat(256)}),
        json!({"action": "x".repeat(257)}),
        json!({"action": ""}),
        json!({"action": " \t"}),
        json!({"action": "a\u{0}b"}),
        json!({"action": "a\u{85}b"}),
        json!({"action": null}),
        json!({"action": ["echo"]}),
        json!({"id": "r1"}),
        json!({"action": "echo", "id": true}),
        json!({"action": "echo", "id": ["r1"]}),
        json!({"action": "echo", "metadata": "m"}),
        json!({"action": "echo", "metadata": [1]}),
        json!(["echo"]),
        json!("echo"),
    ];
    for frame in frames {
        let parsed = streamer_gateway::frames::parse(&frame.to_string(), 1 << 20);
        let errors = violations("RequestFrame", &frame);
        assert_eq!(
            parsed.is_ok(),
            errors.is_empty(),
            "the edge says {parsed:?}, the schema says {errors:?}, of {frame}"
        );
    }
}

// ---------------------------------------------------------------------------
// (d) A real system, through every kind of server message.

/// What a test saw of the schema: the definitions and error codes that real
/// messages were checked against.
#[derive(Default)]
struct Seen {
    definitions: BTreeSet<&'static str>,
    codes: BTreeSet<String>,
    replays: usize,
}

impl Seen {
    /// Checks `message` against the definition of its kind (and the entry
    /// point), and counts it.
    fn message(&mut self, definition: &'static str, message: &Value) {
        assert_conforms("ServerMessage", message);
        assert_conforms(definition, message);
        self.definitions.insert(definition);
        if let Some(code) = message["error"]["code"].as_str() {
            self.codes.insert(code.to_owned());
        }
        if definition == "RequestFailed" {
            let details = &message["error"]["details"];
            let kind = if details["status"] == "cancelled" {
                "CancelledDetails"
            } else {
                "FailedDetails"
            };
            assert_conforms(kind, details);
            self.definitions.insert(kind);
        }
        if message["replay"] == true {
            self.replays += 1;
        }
    }

    /// Checks a built-in action's answer, and its data.
    fn response(&mut self, data: &'static str, message: &Value) {
        self.message("Response", message);
        assert_conforms(data, &message["data"]);
        self.definitions.insert(data);
    }
}

/// Sends `frame` and returns the next message.
async fn ask(client: &mut WsClient, frame: Value) -> Value {
    client.send_json(frame).await;
    client.recv_json().await
}

/// The next `n` messages, by type (then request id), whatever their order.
async fn next_messages(client: &mut WsClient, n: usize) -> BTreeMap<String, Value> {
    let mut got = BTreeMap::new();
    for _ in 0..n {
        let message = client.recv_json().await;
        let key = message["type"].as_str().unwrap().to_owned();
        assert!(
            got.insert(key, message.clone()).is_none(),
            "two of a kind: {message}"
        );
    }
    got
}

/// The next work item of a Claim stream.
async fn next_work(work: &mut tonic::Streaming<v1::ClaimResponse>) -> v1::Request {
    loop {
        let item = within("work", work.next()).await.unwrap().unwrap();
        if let Some(Item::Work(request)) = item.item {
            return request;
        }
    }
}

#[tokio::test]
async fn a_real_system_writes_only_what_the_schema_allows() {
    let system = TestSystem::start_with(|config| {
        config.progress.async_actions = vec!["queued_only".into()];
    })
    .await;
    let mut seen = Seen::default();
    let mut progress_service = system.progress().await;
    let mut work = support::claim(
        &mut progress_service,
        support::claim_request("p", "generate_report", 10, 30),
    )
    .await;
    let token = |user: &str| {
        system.mint(MintOptions {
            sub: user.into(),
            tenant: "acme".into(),
            topics: vec!["orders/*".into()],
            ..MintOptions::default()
        })
    };
    let connect = async |user: &str| {
        let (ws, _) = within(
            "the websocket to connect",
            tokio_tungstenite::connect_async(system.ws_url(&token(user))),
        )
        .await
        .unwrap();
        WsClient { ws }
    };
    let mut client = connect("alice").await;

    // Refused frames: VALIDATION_ERROR with and without the frame's id,
    // and for a binary frame.
    client.send_text("{not json").await;
    let error = client.recv_json().await;
    assert_eq!(error["error"]["code"], "VALIDATION_ERROR", "{error}");
    assert!(error.get("request_id").is_none(), "{error}");
    seen.message("FrameError", &error);
    let error = ask(&mut client, json!({"id": "v1", "payload": {}})).await;
    assert_eq!(
        (&error["request_id"], &error["error"]["code"]),
        (&json!("v1"), &json!("VALIDATION_ERROR"))
    );
    seen.message("FrameError", &error);
    client
        .ws
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            vec![1, 2].into(),
        ))
        .await
        .unwrap();
    let error = client.recv_json().await;
    assert_eq!(error["error"]["code"], "VALIDATION_ERROR", "{error}");
    seen.message("FrameError", &error);
    // A built-in action without what it needs.
    let error = ask(&mut client, json!({"action": "get_request", "id": "g0"})).await;
    assert_eq!(error["error"]["code"], "VALIDATION_ERROR", "{error}");
    seen.message("FrameError", &error);

    // INVALID_ACTION, for a numeric id too (answered as its text).
    let error = ask(&mut client, json!({"action": "no_such_action", "id": 7})).await;
    assert_eq!(
        (&error["request_id"], &error["error"]["code"]),
        (&json!("7"), &json!("INVALID_ACTION"))
    );
    seen.message("FrameError", &error);

    // NOT_FOUND.
    let error = ask(
        &mut client,
        json!({"action": "get_request", "id": "g1", "payload": {"request_id": "never"}}),
    )
    .await;
    assert_eq!(error["error"]["code"], "NOT_FOUND", "{error}");
    seen.message("FrameError", &error);

    // UNAUTHORIZED: a topic the token does not allow, and a refresh with
    // someone else's token; a refresh with a fresh token of its own.
    let error = ask(
        &mut client,
        json!({"action": "subscribe", "id": "s0", "payload": {"topic": "invoices/1"}}),
    )
    .await;
    assert_eq!(error["error"]["code"], "UNAUTHORIZED", "{error}");
    seen.message("FrameError", &error);
    let error = ask(
        &mut client,
        json!({"action": "refresh", "id": "f0", "payload": {"token": token("bob")}}),
    )
    .await;
    assert_eq!(error["error"]["code"], "UNAUTHORIZED", "{error}");
    seen.message("FrameError", &error);
    let refreshed = ask(
        &mut client,
        json!({"action": "refresh", "id": "f1", "payload": {"token": token("alice")}}),
    )
    .await;
    seen.response("RefreshResult", &refreshed);

    // Topics: subscribe (without an id: answered with an empty
    // request_id), a message, subscribe again from there, unsubscribe.
    let subscribed = ask(
        &mut client,
        json!({"action": "subscribe", "payload": {"topic": "orders/42"}}),
    )
    .await;
    assert_eq!(subscribed["request_id"], "", "{subscribed}");
    assert!(subscribed["data"].get("recovered").is_none());
    seen.response("SubscribeResult", &subscribed);
    let mut connections = system.connections().await;
    connections
        .publish(v1::PublishRequest {
            tenant_id: "acme".into(),
            topic: "orders/42".into(),
            payload: support::json_payload(json!({"status": "shipped"})),
            key: String::new(),
        })
        .await
        .unwrap();
    let message = client.recv_json().await;
    seen.message("Message", &message);
    let since = json!({"epoch": message["epoch"], "offset": message["offset"]});
    let resubscribed = ask(
        &mut client,
        json!({"action": "subscribe", "id": "s2", "payload": {"topic": "orders/42", "since": since}}),
    )
    .await;
    assert_eq!(resubscribed["data"]["recovered"], true, "{resubscribed}");
    seen.response("SubscribeResult", &resubscribed);
    let unsubscribed = ask(
        &mut client,
        json!({"action": "unsubscribe", "id": "u1", "payload": {"topic": "orders/42"}}),
    )
    .await;
    seen.response("UnsubscribeResult", &unsubscribed);

    // A request: acknowledgment, progress with and without metadata,
    // complete; then its state.
    let ack = ask(
        &mut client,
        json!({"action": "generate_report", "id": "r1", "payload": {"pages": 2}}),
    )
    .await;
    seen.message("Acknowledgment", &ack);
    let request = next_work(&mut work).await;
    for (step, metadata) in [(1, Some(json!({"page": 1}))), (2, None)] {
        progress_service
            .report(tokio_stream::iter([v1::ReportRequest {
                id: request.id.clone(),
                processor_id: "p".into(),
                percentage: f64::from(step) * 50.0,
                message: format!("page {step} of 2"),
                metadata: metadata
                    .and_then(|m| m.as_object().cloned())
                    .map(streamer_api::json::object_to_struct),
            }]))
            .await
            .unwrap();
        let progress = client.recv_json().await;
        assert_eq!(progress["message"], format!("page {step} of 2"));
        assert_eq!(progress.get("metadata").is_some(), step == 1, "{progress}");
        seen.message("Progress", &progress);
    }
    progress_service
        .complete(v1::CompleteRequest {
            id: request.id.clone(),
            processor_id: "p".into(),
            result: Some(streamer_api::json::to_proto(json!({"url": "x"}))),
        })
        .await
        .unwrap();
    let complete = client.recv_json().await;
    seen.message("Complete", &complete);
    let state = ask(
        &mut client,
        json!({"action": "get_request", "id": "q1", "payload": {"request_id": "r1"}}),
    )
    .await;
    assert_eq!(state["data"]["status"], "completed", "{state}");
    seen.response("RequestState", &state);

    // A request that fails: PROCESSING_FAILED with the processor's code.
    let ack = ask(
        &mut client,
        json!({"action": "generate_report", "id": "r2", "payload": {}}),
    )
    .await;
    seen.message("Acknowledgment", &ack);
    let request = next_work(&mut work).await;
    progress_service
        .fail(v1::FailRequest {
            id: request.id.clone(),
            processor_id: "p".into(),
            error: Some(v1::RequestError {
                code: "RENDER_FAILED".into(),
                message: "the renderer is down".into(),
                details: Some(streamer_api::json::object_to_struct(
                    json!({"page": 3}).as_object().cloned().unwrap(),
                )),
            }),
            retryable: false,
        })
        .await
        .unwrap();
    let failed = client.recv_json().await;
    assert_eq!(
        failed["error"]["details"]["code"], "RENDER_FAILED",
        "{failed}"
    );
    seen.message("RequestFailed", &failed);
    let state = ask(
        &mut client,
        json!({"action": "get_request", "id": "q2", "payload": {"request_id": "r2"}}),
    )
    .await;
    assert_eq!(state["data"]["status"], "failed", "{state}");
    seen.response("RequestState", &state);

    // A request cancelled while queued, sent without an id (Streamer makes
    // one up): its state, and its final error, in either order.
    let ack = ask(&mut client, json!({"action": "queued_only"})).await;
    seen.message("Acknowledgment", &ack);
    let made_up = ack["request_id"].as_str().unwrap().to_owned();
    client
        .send_json(
            json!({"action": "cancel_request", "id": "c1", "payload": {"request_id": made_up}}),
        )
        .await;
    let both = next_messages(&mut client, 2).await;
    assert_eq!(both["response"]["data"]["status"], "cancelled");
    seen.response("RequestState", &both["response"]);
    seen.message("RequestFailed", &both["error"]);

    // A request that finishes while its client is away: asked for from a
    // new connection, its final message comes again, marked as a replay.
    let ack = ask(
        &mut client,
        json!({"action": "generate_report", "id": "r3", "payload": {}}),
    )
    .await;
    seen.message("Acknowledgment", &ack);
    let request = next_work(&mut work).await;
    client.close().await;
    progress_service
        .complete(v1::CompleteRequest {
            id: request.id.clone(),
            processor_id: "p".into(),
            result: None,
        })
        .await
        .unwrap();
    let mut client = connect("alice").await;
    client
        .send_json(json!({"action": "get_request", "id": "q3", "payload": {"request_id": "r3"}}))
        .await;
    let both = next_messages(&mut client, 2).await;
    assert_eq!(both["complete"]["replay"], true, "{both:?}");
    seen.response("RequestState", &both["response"]);
    seen.message("Complete", &both["complete"]);

    // Every server definition met a real message.
    let server_definitions: BTreeSet<&str> = [
        "Response",
        "Acknowledgment",
        "Progress",
        "Complete",
        "FrameError",
        "RequestFailed",
        "FailedDetails",
        "CancelledDetails",
        "Message",
        "RequestState",
        "RefreshResult",
        "SubscribeResult",
        "UnsubscribeResult",
    ]
    .into();
    assert_eq!(seen.definitions, server_definitions);
    let codes: BTreeSet<String> = [
        "VALIDATION_ERROR",
        "INVALID_ACTION",
        "NOT_FOUND",
        "UNAUTHORIZED",
        "PROCESSING_FAILED",
    ]
    .map(String::from)
    .into();
    assert_eq!(seen.codes, codes);
    assert_eq!(seen.replays, 1);
}

/// RATE_LIMITED, from the edge: a frame past the socket's burst.
#[tokio::test]
async fn a_rate_limited_frame_is_answered_as_the_schema_says() {
    let system = TestSystem::start_with(|config| {
        config.gateway.limits.message_rate = 1.0;
        config.gateway.limits.message_burst = 2;
    })
    .await;
    let mut client = system.connect("alice", "acme").await;
    for i in 0..3 {
        client
            .send_json(json!({"action": "no_such_action", "id": format!("x{i}")}))
            .await;
    }
    // Each message is checked by recv_json; one of the three is the refusal.
    let mut codes = BTreeSet::new();
    for _ in 0..3 {
        let message = client.recv_json().await;
        assert_conforms("FrameError", &message);
        codes.insert(message["error"]["code"].as_str().unwrap().to_owned());
    }
    assert!(codes.contains("RATE_LIMITED"), "{codes:?}");
}
