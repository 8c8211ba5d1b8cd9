//! One client request is one trace: a WebSocket client puts its own span's
//! `traceparent` in a frame's metadata, the request goes through the edge,
//! ConnectionService and the example router (run as its own process), or
//! through ProgressService and the Python example processor (its own
//! process too), and an OTLP receiver here gets the spans, flushed when the
//! system's traces shut down, all in the client's trace and each the child
//! of the hop before it.
//!
//! Needs `python3` with `examples/processor-python/requirements.txt`
//! installed (CI installs it before the tests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/support/mod.rs"]
mod support;

#[path = "../../../tests/support/otlp.rs"]
mod otlp;

mod process;

use std::process::Stdio;

use otlp::{Receiver, Trace};
use serde_json::json;
use streamer_core::telemetry::{self, LogFormat, Traces};
use support::{TestSystem, within};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const PROCESSOR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../processor-python/processor.py"
);

async fn start_processor(system: &TestSystem) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut processor = Command::new("python3")
        .arg(PROCESSOR)
        .args(["--target", &system.addrs.progress.to_string()])
        .args(["--id", "tracer", "--step-delay", "0.05"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 should be on PATH");
    let mut lines = BufReader::new(processor.stdout.take().unwrap()).lines();
    let ready = within("the processor's ready line", lines.next_line())
        .await
        .unwrap();
    assert_eq!(
        ready.as_deref(),
        Some("ready"),
        "the processor exited before it was ready; is \
         `pip install -r examples/processor-python/requirements.txt` done?"
    );
    (processor, lines)
}

#[tokio::test]
async fn one_client_request_is_one_trace_across_every_hop() {
    let receiver = Receiver::default();
    let collector = receiver.serve().await;
    let traces = Traces::otlp(&format!("http://{collector}"), "streamer").unwrap();
    assert!(traces.enabled());
    telemetry::init_with(LogFormat::Json, "warn", &traces);

    let system = TestSystem::start().await;
    let (_router, _router_out) = process::start_router(&system).await;
    let (_processor, _processor_out) = start_processor(&system).await;
    let (mut client, connection_id) = system.connect_found("alice", "acme").await;

    // A router's action, in the client's trace 4bf9…
    let (echo_trace, echo_parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    client
        .send_json(json!({
            "action": "echo", "id": "e1", "payload": {"hi": 1},
            "metadata": {"traceparent": format!("00-{echo_trace}-{echo_parent}-01")},
        }))
        .await;
    let answer = client.recv_json().await;
    assert_eq!(answer["request_id"], "e1", "{answer}");
    assert_eq!(answer["data"], json!({"hi": 1}), "{answer}");

    // A processor's job, in trace 0af7…
    let (job_trace, job_parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    client
        .send_json(json!({
            "action": "generate_report", "id": "job-1", "payload": {"pages": 2},
            "metadata": {"traceparent": format!("00-{job_trace}-{job_parent}-01")},
        }))
        .await;
    loop {
        let message = client.recv_json().await;
        assert_eq!(message["request_id"], "job-1", "{message}");
        match message["type"].as_str().unwrap() {
            "acknowledgment" | "progress" => {}
            "complete" => break,
            other => panic!("unexpected {other}: {message}"),
        }
    }

    // An upgrade whose request carries a `traceparent` header.
    let (connect_trace, connect_parent) = ("7e0c5b7d2f3a4c1b9d8e6f5a4b3c2d1e", "1f2e3d4c5b6a7988");
    let mut upgrade = system
        .ws_url(&system.token("bob", "acme"))
        .into_client_request()
        .unwrap();
    upgrade.headers_mut().insert(
        "traceparent",
        format!("00-{connect_trace}-{connect_parent}-01")
            .parse()
            .unwrap(),
    );
    let (_bob, _) = within("bob to connect", tokio_tungstenite::connect_async(upgrade))
        .await
        .unwrap();

    // A span ends once its work is done, which may be just after the client
    // has its message: flush until the last hop of each request is in.
    support::eventually("the last spans of both requests", || async {
        traces.flush().await;
        let job = receiver.trace(job_trace);
        let echo = receiver.trace(echo_trace);
        job.iter()
            .any(|s| s.name == "progress.deliver" && s.attributes["kind"] == "final")
            && echo.iter().any(|s| s.name == "connection.send")
            && receiver
                .trace(connect_trace)
                .iter()
                .any(|s| s.name == "edge.connect")
    })
    .await;

    // Shutting the traces down exports what is still buffered: the edge's
    // span of a frame ends before the frame goes on, so it is buffered by
    // the time the answer arrives.
    let (last_trace, last_parent) = ("5b8aa5a2d2c872e8321cf37308d69df2", "051581bf3cb55c13");
    client
        .send_json(json!({
            "action": "echo", "id": "e2", "payload": 2,
            "metadata": {"traceparent": format!("00-{last_trace}-{last_parent}-01")},
        }))
        .await;
    assert_eq!(client.recv_json().await["request_id"], "e2");
    within("the traces to shut down", traces.shutdown()).await;
    Trace(receiver.trace(last_trace)).child(last_parent, "edge.request");

    let connect = Trace(receiver.trace(connect_trace));
    let upgrade = connect.child(connect_parent, "edge.connect");
    assert_eq!(upgrade.attributes["tenant_id"], "acme");
    let validate = connect.child(&upgrade.span_id, "auth.validate_token");
    assert_eq!(validate.attributes["valid"], "true");

    let echo = Trace(receiver.trace(echo_trace));
    let edge = echo.child(echo_parent, "edge.request");
    assert_eq!(edge.service, "streamer");
    assert_eq!(edge.attributes["connection_id"], connection_id);
    assert_eq!(edge.attributes["request_id"], "e1");
    let route = echo.child(&edge.span_id, "connection.route");
    assert_eq!(route.attributes["tenant_id"], "acme");
    assert_eq!(route.attributes["action"], "echo");
    // The router passed the context it was given on to its Send.
    let send = echo.child(&route.span_id, "connection.send");
    assert_eq!(send.attributes["connection_id"], connection_id);
    echo.child(&send.span_id, "edge.deliver");

    let job = Trace(receiver.trace(job_trace));
    let edge = job.child(job_parent, "edge.request");
    assert_eq!(edge.attributes["request_id"], "job-1");
    let route = job.child(&edge.span_id, "connection.route");
    let submit = job.child(&route.span_id, "progress.submit");
    assert_eq!(submit.attributes["request_id"], "job-1");
    let dispatch = job.child(&submit.span_id, "progress.dispatch");
    assert_eq!(dispatch.attributes["tenant_id"], "acme");
    assert_eq!(dispatch.attributes["processor_id"], "tracer");
    // The processor sent the request's context with its calls.
    assert_eq!(
        job.children(&submit.span_id, "progress.report").len(),
        2,
        "one span per page:\n{}",
        job.dump()
    );
    let complete = job.child(&submit.span_id, "progress.complete");
    // The acknowledgment goes out in the submit's trace, the final message
    // in the completion's; each reaches the socket through ConnectionService
    // and the edge.
    for parent in [&submit.span_id, &complete.span_id] {
        let deliver = job.child(parent, "progress.deliver");
        let send = job.child(&deliver.span_id, "connection.send");
        job.child(&send.span_id, "edge.deliver");
    }
    let final_deliver = job.child(&complete.span_id, "progress.deliver");
    assert_eq!(final_deliver.attributes["kind"], "final");
    assert_eq!(final_deliver.attributes["tenant_id"], "acme");
}
