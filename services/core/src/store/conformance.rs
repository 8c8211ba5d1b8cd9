//! The one test suite every [`Store`] backend must pass.
//!
//! Each function takes a fresh, empty store and checks one behaviour the
//! services rely on. [`store_conformance_suite!`](crate::store_conformance_suite)
//! turns them into one `#[tokio::test]` each for a backend:
//!
//! ```ignore
//! streamer_core::store_conformance_suite!(my_fresh_store());
//! ```
//!
//! The expression is a future of `(SharedStore, guard)`, evaluated once per
//! test, so every test gets its own store; the guard (a temporary
//! directory, say) lives until the test ends. A behaviour added to [`Store`] gets its test here, never in a
//! backend's own tests, which are for what only that backend has (such as
//! the embedded store surviving a reopen).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{
    CONNECTION_TTL, ConnectionRecord, Durability, RequestRecord, RequestStatus, SharedStore,
    StoreError, now_ms,
};

/// Instantiates the conformance suite: one `#[tokio::test]` per behaviour,
/// each on the store that `$make` (an expression of a future of
/// `(SharedStore, guard)`) gives.
#[macro_export]
macro_rules! store_conformance_suite {
    ($make:expr) => {
        $crate::store_conformance_suite!(@tests $make;
            connection_round_trip,
            put_connection_replaces_and_reindexes,
            touch_slides_expiry_and_reports_missing,
            expired_connections_are_invisible_and_swept,
            lists_by_tenant_and_user_in_pages_and_isolates_tenants,
            lists_many_pages_in_order,
            connections_of_edge_and_the_edges,
            create_request_is_idempotent_per_user_and_client_id,
            concurrent_creates_of_one_client_id_make_one_request,
            update_is_conditional_on_version,
            concurrent_updates_of_one_version_have_one_winner,
            unfinished_requests_are_the_pending_and_processing_ones,
            revoked_tokens_are_denied_until_they_expire_and_then_swept,
            revoking_again_keeps_the_later_expiry
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard): ($crate::store::SharedStore, _) = $make.await;
                $crate::store::conformance::$name(store).await;
            }
        )*
    };
}

pub fn connection(id: &str, tenant: &str, user: &str) -> ConnectionRecord {
    ConnectionRecord {
        connection_id: id.into(),
        user_id: user.into(),
        tenant_id: tenant.into(),
        permissions: vec!["read".into()],
        edge_id: "edge-1".into(),
        connected_at_ms: now_ms(),
        last_seen_ms: now_ms(),
        user_agent: "test".into(),
        client_ip: "127.0.0.1".into(),
    }
}

pub fn request(id: &str, client_id: &str) -> RequestRecord {
    RequestRecord {
        id: id.into(),
        client_request_id: client_id.into(),
        user_id: "u1".into(),
        tenant_id: "t1".into(),
        connection_id: "c1".into(),
        action: "generate_report".into(),
        payload: serde_json::json!({"pages": 3}),
        metadata: Default::default(),
        status: RequestStatus::Pending,
        attempts: 0,
        max_attempts: 3,
        processor_id: None,
        lease_expires_at_ms: None,
        progress: None,
        result: None,
        error: None,
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
        sequence: 0,
        version: 0,
    }
}

fn ids(records: Vec<ConnectionRecord>) -> Vec<String> {
    records.into_iter().map(|c| c.connection_id).collect()
}

pub async fn connection_round_trip(store: SharedStore) {
    let record = connection("c1", "t1", "alice");
    store.put_connection(record.clone()).await.unwrap();
    assert_eq!(
        store.get_connection("c1").await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(store.get_connection("c2").await.unwrap(), None);
    assert_eq!(store.delete_connection("c1").await.unwrap(), Some(record));
    assert_eq!(store.get_connection("c1").await.unwrap(), None);
    assert!(
        store
            .list_connections("t1", None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .connections_of_edge("edge-1")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.delete_connection("c1").await.unwrap(), None);
}

pub async fn put_connection_replaces_and_reindexes(store: SharedStore) {
    store
        .put_connection(connection("c1", "t1", "alice"))
        .await
        .unwrap();
    let mut moved = connection("c1", "t2", "bob");
    moved.edge_id = "edge-2".into();
    store.put_connection(moved.clone()).await.unwrap();
    assert_eq!(store.get_connection("c1").await.unwrap(), Some(moved));
    assert!(
        store
            .list_connections("t1", None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list_connections("t2", Some("alice"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(store
            .list_connections("t2", Some("bob"), None, 10)
            .await
            .unwrap()),
        ["c1"]
    );
    assert!(
        store
            .connections_of_edge("edge-1")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.connections_of_edge("edge-2").await.unwrap(), ["c1"]);
}

pub async fn touch_slides_expiry_and_reports_missing(store: SharedStore) {
    let mut stale = connection("c1", "t1", "alice");
    stale.last_seen_ms = 1;
    store.put_connection(stale).await.unwrap();
    assert_eq!(
        store.get_connection("c1").await.unwrap(),
        None,
        "expired before the touch"
    );
    let now = now_ms();
    assert!(store.touch_connection("c1", now).await.unwrap());
    let touched = store.get_connection("c1").await.unwrap().unwrap();
    assert_eq!(touched.last_seen_ms, now);
    assert!(!store.touch_connection("nobody", now).await.unwrap());
    assert_eq!(
        store.get_connection("nobody").await.unwrap(),
        None,
        "a touch creates nothing"
    );
}

pub async fn expired_connections_are_invisible_and_swept(store: SharedStore) {
    let now = now_ms();
    let mut old = connection("c1", "t1", "alice");
    old.last_seen_ms = now - CONNECTION_TTL.as_millis() as u64 - 1_000;
    store.put_connection(old).await.unwrap();
    store
        .put_connection(connection("c2", "t1", "alice"))
        .await
        .unwrap();
    assert_eq!(store.get_connection("c1").await.unwrap(), None);
    assert_eq!(
        ids(store.list_connections("t1", None, None, 10).await.unwrap()),
        ["c2"]
    );
    assert_eq!(store.sweep_connections(now).await.unwrap(), 1);
    assert_eq!(store.sweep_connections(now).await.unwrap(), 0);
    assert!(store.get_connection("c2").await.unwrap().is_some());
}

pub async fn lists_by_tenant_and_user_in_pages_and_isolates_tenants(store: SharedStore) {
    for (id, tenant, user) in [
        ("c1", "t1", "alice"),
        ("c2", "t1", "bob"),
        ("c3", "t1", "alice"),
        ("c4", "t2", "alice"),
    ] {
        store
            .put_connection(connection(id, tenant, user))
            .await
            .unwrap();
    }
    assert_eq!(
        ids(store.list_connections("t1", None, None, 100).await.unwrap()),
        ["c1", "c2", "c3"]
    );
    assert_eq!(
        ids(store
            .list_connections("t1", Some("alice"), None, 100)
            .await
            .unwrap()),
        ["c1", "c3"]
    );
    assert_eq!(
        ids(store.list_connections("t1", None, None, 2).await.unwrap()),
        ["c1", "c2"]
    );
    assert_eq!(
        ids(store
            .list_connections("t1", None, Some("c2"), 2)
            .await
            .unwrap()),
        ["c3"]
    );
    assert_eq!(
        ids(store
            .list_connections("t1", Some("alice"), Some("c1"), 1)
            .await
            .unwrap()),
        ["c3"]
    );
    // A tenant or user that is a prefix of another sees nothing of it.
    assert!(
        store
            .list_connections("t", None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list_connections("t1", Some("ali"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn lists_many_pages_in_order(store: SharedStore) {
    let mut expected = Vec::new();
    for i in 0..45 {
        let id = format!("c{i:03}");
        store
            .put_connection(connection(&id, "t1", "alice"))
            .await
            .unwrap();
        expected.push(id);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_connections("t1", Some("alice"), after.as_deref(), 10)
            .await
            .unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after = Some(last.connection_id.clone());
        seen.extend(ids(page));
    }
    assert_eq!(seen, expected);
}

pub async fn connections_of_edge_and_the_edges(store: SharedStore) {
    for (id, edge) in [("c1", "edge-a"), ("c2", "edge-b"), ("c3", "edge-a")] {
        let mut record = connection(id, "t1", "alice");
        record.edge_id = edge.into();
        store.put_connection(record).await.unwrap();
    }
    let mut of_a = store.connections_of_edge("edge-a").await.unwrap();
    of_a.sort();
    assert_eq!(of_a, ["c1", "c3"]);
    assert!(
        store
            .connections_of_edge("edge-c")
            .await
            .unwrap()
            .is_empty()
    );
    let edges: BTreeSet<String> = store
        .connection_edges()
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(edges, ["edge-a".to_string(), "edge-b".to_string()].into());
}

pub async fn create_request_is_idempotent_per_user_and_client_id(store: SharedStore) {
    let first = store.create_request(request("r1", "job-1")).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.record.id, "r1");
    let again = store.create_request(request("r2", "job-1")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.record, first.record);
    assert!(store.get_request("r2").await.unwrap().is_none());
    let mut other_user = request("r3", "job-1");
    other_user.user_id = "u2".into();
    assert!(!store.create_request(other_user).await.unwrap().duplicate);
    let mut other_tenant = request("r4", "job-1");
    other_tenant.tenant_id = "t2".into();
    assert!(!store.create_request(other_tenant).await.unwrap().duplicate);
    assert_eq!(
        store
            .find_request("t1", "u1", "job-1")
            .await
            .unwrap()
            .unwrap()
            .id,
        "r1"
    );
    assert_eq!(
        store
            .find_request("t1", "u2", "job-1")
            .await
            .unwrap()
            .unwrap()
            .id,
        "r3"
    );
    assert!(
        store
            .find_request("t1", "u9", "job-1")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.get_request("r1").await.unwrap(), Some(first.record));
}

pub async fn concurrent_creates_of_one_client_id_make_one_request(store: SharedStore) {
    let attempts = (0..8).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .create_request(request(&format!("r{i}"), "job-1"))
                .await
        })
    });
    let mut winners = Vec::new();
    let mut seen = BTreeSet::new();
    for attempt in attempts {
        let created = attempt.await.unwrap().unwrap();
        seen.insert(created.record.id.clone());
        if !created.duplicate {
            winners.push(created.record.id);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create wins: {winners:?}");
    assert_eq!(
        seen.len(),
        1,
        "every caller is told of the one request: {seen:?}"
    );
}

pub async fn update_is_conditional_on_version(store: SharedStore) {
    let created = store
        .create_request(request("r1", "job-1"))
        .await
        .unwrap()
        .record;
    assert_eq!(created.version, 0);
    let mut a = created.clone();
    a.status = RequestStatus::Processing;
    let a = store
        .update_request(a, Durability::Immediate)
        .await
        .unwrap();
    assert_eq!(a.version, 1);
    assert_eq!(store.get_request("r1").await.unwrap(), Some(a.clone()));
    let mut stale = created;
    stale.status = RequestStatus::Cancelled;
    assert!(matches!(
        store.update_request(stale, Durability::Immediate).await,
        Err(StoreError::Conflict)
    ));
    let mut relaxed = a;
    relaxed.sequence = 7;
    let relaxed = store
        .update_request(relaxed, Durability::Relaxed)
        .await
        .unwrap();
    assert_eq!((relaxed.version, relaxed.sequence), (2, 7));
    let mut missing = request("r9", "job-9");
    missing.version = 0;
    assert!(matches!(
        store.update_request(missing, Durability::Immediate).await,
        Err(StoreError::Conflict)
    ));
}

pub async fn concurrent_updates_of_one_version_have_one_winner(store: SharedStore) {
    let created = store
        .create_request(request("r1", "job-1"))
        .await
        .unwrap()
        .record;
    let writers = (0..8u32).map(|i| {
        let store = Arc::clone(&store);
        let mut record = created.clone();
        record.attempts = i + 1;
        tokio::spawn(async move { store.update_request(record, Durability::Immediate).await })
    });
    let mut won = Vec::new();
    for writer in writers {
        match writer.await.unwrap() {
            Ok(record) => won.push(record),
            Err(StoreError::Conflict) => {}
            Err(other) => panic!("a racing writer got {other}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one writer wins");
    assert_eq!(store.get_request("r1").await.unwrap(), Some(won.remove(0)));
}

pub async fn unfinished_requests_are_the_pending_and_processing_ones(store: SharedStore) {
    let mut records = Vec::new();
    for (i, status) in [
        RequestStatus::Pending,
        RequestStatus::Processing,
        RequestStatus::Completed,
        RequestStatus::Failed,
        RequestStatus::Cancelled,
    ]
    .into_iter()
    .enumerate()
    {
        let created = store
            .create_request(request(&format!("r{i}"), &format!("job-{i}")))
            .await
            .unwrap();
        let mut record = created.record;
        if status != RequestStatus::Pending {
            record.status = status;
            record = store
                .update_request(record, Durability::Immediate)
                .await
                .unwrap();
        }
        records.push(record);
    }
    let mut unfinished: Vec<String> = store
        .unfinished_requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    unfinished.sort();
    assert_eq!(unfinished, ["r0", "r1"]);
    let mut done = records.remove(1);
    done.status = RequestStatus::Completed;
    store
        .update_request(done, Durability::Immediate)
        .await
        .unwrap();
    let unfinished: Vec<String> = store
        .unfinished_requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(unfinished, ["r0"]);
}

pub async fn revoked_tokens_are_denied_until_they_expire_and_then_swept(store: SharedStore) {
    let now = 1_000_000;
    store.revoke_token("jti-1", now + 60_000).await.unwrap();
    store.revoke_token("jti-2", now + 1).await.unwrap();
    assert!(store.is_token_revoked("jti-1", now).await.unwrap());
    assert!(store.is_token_revoked("jti-2", now).await.unwrap());
    assert!(!store.is_token_revoked("jti-3", now).await.unwrap());
    // An expired entry no longer denies, even before a sweep.
    assert!(!store.is_token_revoked("jti-2", now + 1).await.unwrap());

    assert_eq!(store.sweep_revoked_tokens(now).await.unwrap(), 0);
    assert_eq!(store.sweep_revoked_tokens(now + 1).await.unwrap(), 1);
    assert!(store.is_token_revoked("jti-1", now + 1).await.unwrap());
    assert_eq!(store.sweep_revoked_tokens(now + 60_000).await.unwrap(), 1);
    assert!(!store.is_token_revoked("jti-1", now).await.unwrap());
    assert_eq!(store.sweep_revoked_tokens(u64::MAX).await.unwrap(), 0);
}

pub async fn revoking_again_keeps_the_later_expiry(store: SharedStore) {
    let now = 1_000_000;
    store.revoke_token("jti", now + 10_000).await.unwrap();
    store.revoke_token("jti", now + 5_000).await.unwrap();
    assert!(store.is_token_revoked("jti", now + 7_000).await.unwrap());
    store.revoke_token("jti", now + 20_000).await.unwrap();
    // The old expiry sweeps nothing; the new one removes the entry once.
    assert_eq!(store.sweep_revoked_tokens(now + 10_000).await.unwrap(), 0);
    assert!(store.is_token_revoked("jti", now + 15_000).await.unwrap());
    assert_eq!(store.sweep_revoked_tokens(now + 20_000).await.unwrap(), 1);
    assert!(!store.is_token_revoked("jti", now).await.unwrap());
}

/// A local DynamoDB-protocol server for tests: moto's server mode, started
/// once per test process on a port the server picks itself (no race for a
/// free port), and gone when the process is: it exits when its stdin, a
/// pipe this process holds, closes. moto comes from PyPI
/// (`pip install "moto[server]"`); the README's test command installs it.
pub mod local_dynamodb {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Mutex, OnceLock};

    // One request at a time: moto's backends are not safe against
    // concurrent writers (a dictionary changed during iteration under 200
    // requests at once); DynamoDB itself is.
    const SERVER: &str = r#"
import logging, os, sys, threading
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_port, flush=True)
sys.stdin.read()
os._exit(0)
"#;

    struct Server {
        endpoint: String,
        /// Held so that its stdin stays open while the process lives.
        _child: Mutex<Child>,
    }

    /// The endpoint URL of the process's server, starting it on first use.
    pub fn endpoint() -> String {
        static SERVER_ONCE: OnceLock<Server> = OnceLock::new();
        SERVER_ONCE
            .get_or_init(|| {
                let mut child = Command::new("python3")
                    .args(["-c", SERVER])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("python3 runs");
                let stdout = child.stdout.take().expect("a stdout pipe");
                let mut line = String::new();
                BufReader::new(stdout)
                    .read_line(&mut line)
                    .expect("moto prints its port");
                let port: u16 = line.trim().parse().unwrap_or_else(|_| {
                    panic!("moto's server did not start (pip install \"moto[server]\"): {line:?}")
                });
                Server {
                    endpoint: format!("http://127.0.0.1:{port}"),
                    _child: Mutex::new(child),
                }
            })
            .endpoint
            .clone()
    }
}
