//! Micro-benchmarks of the hot paths every message crosses, one criterion
//! group per subsystem:
//!
//! - `json_proto`: `serde_json::Value` <-> protobuf `Value` (every payload a
//!   router or processor sends, and every client frame going up `Attach`);
//! - `frames`: parsing and validating one client frame at the edge;
//! - `auth`: RS256 validation of a development token (every WebSocket
//!   upgrade);
//! - `store`: the embedded (redb) store's connection and request writes,
//!   with relaxed and immediate durability.
//!
//! Run with `cargo bench --bench micro` (see `benches/README.md`). Each
//! benchmark measures for 2 s after a 1 s warm-up so the suite finishes in
//! about two minutes on two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use streamer_auth::dev::MintOptions;
use streamer_auth::{AuthConfig, TokenValidator};
use streamer_core::ids::ConnectionId;
use streamer_core::store::{
    ConnectionRecord, ConnectionStore, Durability, EmbeddedStore, RequestRecord, RequestStatus,
    RequestStore, Store, now_ms,
};

/// Short measurements: these are regression guards, not a paper.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

/// A payload the size of a typical progress or response message.
fn small_payload() -> Value {
    json!({
        "type": "progress",
        "request_id": "r1",
        "percentage": 42.5,
        "message": "rendering page 3 of 7",
        "metadata": {"stage": "render", "page": 3, "retry": false},
    })
}

/// A ~16 KiB payload: a report of 128 rows of mixed fields.
fn large_payload() -> Value {
    let rows: Vec<Value> = (0..128)
        .map(|i| {
            json!({
                "id": i,
                "name": format!("row-{i:04}"),
                "score": f64::from(i) * 1.25,
                "ok": i % 2 == 0,
                "tags": ["alpha", "beta"],
                "note": "lorem ipsum dolor sit amet",
            })
        })
        .collect();
    let value = json!({"type": "complete", "request_id": "r1", "result": {"rows": rows}});
    let bytes = value.to_string().len();
    assert!(
        (14 * 1024..=18 * 1024).contains(&bytes),
        "large payload is {bytes} bytes, expected about 16 KiB"
    );
    value
}

fn json_proto(c: &mut Criterion) {
    let mut group = c.benchmark_group("json_proto");
    for (name, payload) in [("small", small_payload()), ("16KiB", large_payload())] {
        let bytes = payload.to_string().len() as u64;
        group.throughput(Throughput::Bytes(bytes));
        let proto = streamer_api::json::to_proto(payload.clone());
        // The conversions consume their input, so the clone is set up
        // outside the measured closure.
        group.bench_function(format!("to_proto/{name}"), |b| {
            b.iter_batched(
                || payload.clone(),
                |v| black_box(streamer_api::json::to_proto(v)),
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("from_proto/{name}"), |b| {
            b.iter_batched(
                || proto.clone(),
                |v| black_box(streamer_api::json::from_proto(v)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames");
    let small = json!({
        "action": "generate_report",
        "id": "r1",
        "payload": {"pages": 3, "format": "pdf"},
        "metadata": {"trace": "abc"},
    })
    .to_string();
    let large = json!({"action": "upload", "id": "r2", "payload": large_payload()}).to_string();
    let max = 1024 * 1024;
    for (name, text) in [("small", &small), ("16KiB", &large)] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| black_box(streamer_gateway::frames::parse(black_box(text), max)))
        });
    }
    // The refusal path: a malformed frame must be cheap to answer.
    let malformed = "{\"action\":";
    group.throughput(Throughput::Bytes(malformed.len() as u64));
    group.bench_function("parse/malformed", |b| {
        b.iter(|| black_box(streamer_gateway::frames::parse(black_box(malformed), max)))
    });
    group.finish();
}

fn auth(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = streamer_auth::dev::ensure_dev_key(dir.path()).unwrap();
    let validator = TokenValidator::new(AuthConfig::new([key.public_key_path.clone()])).unwrap();
    let token = key
        .mint(&MintOptions {
            sub: "bench-user".into(),
            tenant: "bench".into(),
            ..MintOptions::default()
        })
        .unwrap();
    assert!(
        validator.validate(&token).is_ok(),
        "the bench token must verify"
    );
    // Change one character early in the signature (the last segment): still
    // canonical base64url, so the RSA check itself runs and fails. (The
    // last character would only touch padding bits, and a non-canonical
    // encoding is refused before any RSA work.)
    let at = token.rfind('.').unwrap() + 10;
    let flipped = if &token[at..=at] == "A" { "B" } else { "A" };
    let bad_signature = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
    assert!(
        validator.validate(&bad_signature).is_err(),
        "the altered token must be refused"
    );

    let mut group = c.benchmark_group("auth");
    group.bench_function("validate_rs256/valid", |b| {
        b.iter(|| black_box(validator.validate(black_box(&token))).is_ok())
    });
    group.bench_function("validate_rs256/bad_signature", |b| {
        b.iter(|| black_box(validator.validate(black_box(&bad_signature))).is_err())
    });
    // Signing is what `streamer token` and test clients pay, not the server;
    // shown for scale.
    group.bench_function("mint_rs256", |b| {
        b.iter(|| black_box(key.mint(&MintOptions::default()).unwrap()))
    });
    group.finish();
}

fn connection(id: &str) -> ConnectionRecord {
    let now = now_ms();
    ConnectionRecord {
        connection_id: id.into(),
        user_id: "bench-user".into(),
        tenant_id: "bench".into(),
        permissions: vec!["read".into(), "write".into()],
        topics: Vec::new(),
        edge_id: "edge-bench".into(),
        connected_at_ms: now,
        last_seen_ms: now,
        user_agent: "criterion".into(),
        client_ip: "127.0.0.1".into(),
        apigateway: None,
    }
}

fn request(id: &str) -> RequestRecord {
    let now = now_ms();
    RequestRecord {
        id: id.into(),
        client_request_id: format!("client-{id}").into(),
        user_id: "bench-user".into(),
        tenant_id: "bench".into(),
        connection_id: "c-bench".into(),
        action: "generate_report".into(),
        payload: json!({"pages": 3}),
        metadata: serde_json::Map::new(),
        status: RequestStatus::Processing,
        attempts: 1,
        max_attempts: 3,
        processor_id: Some("p1".into()),
        lease_expires_at_ms: Some(now + 30_000),
        progress: None,
        result: None,
        error: None,
        created_at_ms: now,
        updated_at_ms: now,
        sequence: 0,
        final_pending: false,
        trace_context: Default::default(),
        version: 0,
    }
}

fn store(c: &mut Criterion) {
    // The store runs redb on tokio's blocking pool, as in the services.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    // Some neighbours, so the tables are not trivially small.
    runtime.block_on(async {
        for i in 0..1000 {
            store
                .put_connection(connection(&format!("c-{i:05}")))
                .await
                .unwrap();
        }
        store.put_connection(connection("c-read")).await.unwrap();
    });

    let mut group = c.benchmark_group("store");
    // Each call is one (immediate, fsynced) write transaction for the put
    // and one for the delete: what a WebSocket connect + disconnect costs.
    group.bench_function("put_delete_connection", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let store = store.clone();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    let id = ConnectionId::from(format!("c-churn-{i}"));
                    store.put_connection(connection(id.as_str())).await.unwrap();
                    store.delete_connection(&id).await.unwrap();
                }
                start.elapsed()
            }
        })
    });
    group.bench_function("get_connection", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let store = store.clone();
            let id = ConnectionId::from("c-read");
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(store.get_connection(&id).await.unwrap());
                }
                start.elapsed()
            }
        })
    });
    // A progress tick (relaxed) versus a state transition (immediate): the
    // versioned read-check-write of one request.
    for (name, durability) in [
        ("relaxed", Durability::Relaxed),
        ("immediate", Durability::Immediate),
    ] {
        let id = format!("req-{name}");
        let created = runtime
            .block_on(store.create_request(request(&id)))
            .unwrap();
        let current = Arc::new(std::sync::Mutex::new(created.record));
        group.bench_function(format!("update_request/{name}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let store = store.clone();
                let current = current.clone();
                async move {
                    let mut record = current.lock().unwrap().clone();
                    let start = Instant::now();
                    for _ in 0..iters {
                        record.sequence += 1;
                        record.updated_at_ms = now_ms();
                        record = store.update_request(record, durability).await.unwrap();
                    }
                    let elapsed = start.elapsed();
                    *current.lock().unwrap() = record;
                    elapsed
                }
            })
        });
    }
    group.finish();
    runtime.block_on(store.flush()).unwrap();
}

criterion_group! {
    name = benches;
    config = config();
    targets = json_proto, frames, auth, store
}
criterion_main!(benches);
