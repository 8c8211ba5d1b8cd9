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

use std::time::Duration;

use crate::ids::{ConnectionId, EdgeId, RequestId};

use super::{
    CONNECTION_TTL, ConnectionRecord, Durability, Heartbeat, RequestRecord, RequestStatus,
    Retention, SharedStore, StoreError, Subscription, TopicPosition, now_ms,
};

/// Instantiates the conformance suite: one `#[tokio::test]` per behaviour,
/// each on the store that `$make` (an expression of a future of
/// `(SharedStore, guard)`) gives.
#[macro_export]
macro_rules! store_conformance_suite {
    ($make:expr) => {
        $crate::store_conformance_suite!(@tests $make;
            connection_round_trip,
            an_api_gateway_connection_keeps_where_it_lives,
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
            revoking_again_keeps_the_later_expiry,
            edge_leases_start_extend_and_lapse,
            removing_a_lapsed_edge_has_one_winner_and_spares_a_revived_one,
            pending_work_by_action_oldest_first,
            concurrent_claims_of_pending_work_have_one_winner,
            lapsed_leases_are_found_by_query,
            subscriptions_need_a_live_connection_of_the_tenant,
            subscribers_page_in_order_and_isolate_tenants_and_topics,
            subscriptions_go_with_their_connection,
            topic_offsets_are_contiguous_within_an_epoch,
            topic_recovery_says_when_history_no_longer_covers_the_gap,
            concurrent_appends_get_distinct_contiguous_offsets,
            an_undelivered_final_stays_unsettled_and_leased
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
        topics: Vec::new(),
        edge_id: "edge-1".into(),
        connected_at_ms: now_ms(),
        last_seen_ms: now_ms(),
        user_agent: "test".into(),
        client_ip: "127.0.0.1".into(),
        apigateway: None,
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
        final_pending: false,
        trace_context: Default::default(),
        version: 0,
    }
}

fn ids(records: Vec<ConnectionRecord>) -> Vec<ConnectionId> {
    records.into_iter().map(|c| c.connection_id).collect()
}

pub async fn an_api_gateway_connection_keeps_where_it_lives(store: SharedStore) {
    let record = ConnectionRecord {
        edge_id: super::APIGATEWAY_EDGE_ID.into(),
        apigateway: Some(super::ApiGatewayConnection {
            domain_name: "abc123.execute-api.eu-west-1.amazonaws.com".into(),
            stage: "prod".into(),
        }),
        ..connection("Xk3J8cD2oAMCJ_Q=", "t1", "alice")
    };
    store.put_connection(record.clone()).await.unwrap();
    let read = store
        .get_connection(&"Xk3J8cD2oAMCJ_Q=".into())
        .await
        .unwrap()
        .unwrap();
    assert!(read.is_apigateway());
    assert_eq!(read, record);
    assert_eq!(
        store
            .connections_of_edge(&super::APIGATEWAY_EDGE_ID.into())
            .await
            .unwrap(),
        vec![ConnectionId::from("Xk3J8cD2oAMCJ_Q=")]
    );
    // An edge's record has none.
    store
        .put_connection(connection("c1", "t1", "bob"))
        .await
        .unwrap();
    let edge = store.get_connection(&"c1".into()).await.unwrap().unwrap();
    assert!(!edge.is_apigateway());
    assert_eq!(edge.apigateway, None);
}

pub async fn connection_round_trip(store: SharedStore) {
    let record = connection("c1", "t1", "alice");
    store.put_connection(record.clone()).await.unwrap();
    assert_eq!(
        store.get_connection(&"c1".into()).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(store.get_connection(&"c2".into()).await.unwrap(), None);
    assert_eq!(
        store.delete_connection(&"c1".into()).await.unwrap(),
        Some(record)
    );
    assert_eq!(store.get_connection(&"c1".into()).await.unwrap(), None);
    assert!(
        store
            .list_connections(&"t1".into(), None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .connections_of_edge(&"edge-1".into())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.delete_connection(&"c1".into()).await.unwrap(), None);
}

pub async fn put_connection_replaces_and_reindexes(store: SharedStore) {
    store
        .put_connection(connection("c1", "t1", "alice"))
        .await
        .unwrap();
    let mut moved = connection("c1", "t2", "bob");
    moved.edge_id = "edge-2".into();
    store.put_connection(moved.clone()).await.unwrap();
    assert_eq!(
        store.get_connection(&"c1".into()).await.unwrap(),
        Some(moved)
    );
    assert!(
        store
            .list_connections(&"t1".into(), None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list_connections(&"t2".into(), Some(&"alice".into()), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(store
            .list_connections(&"t2".into(), Some(&"bob".into()), None, 10)
            .await
            .unwrap()),
        ["c1"]
    );
    assert!(
        store
            .connections_of_edge(&"edge-1".into())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.connections_of_edge(&"edge-2".into()).await.unwrap(),
        ["c1"]
    );
}

pub async fn touch_slides_expiry_and_reports_missing(store: SharedStore) {
    let mut stale = connection("c1", "t1", "alice");
    stale.last_seen_ms = 1;
    store.put_connection(stale).await.unwrap();
    assert_eq!(
        store.get_connection(&"c1".into()).await.unwrap(),
        None,
        "expired before the touch"
    );
    let now = now_ms();
    assert!(store.touch_connection(&"c1".into(), now).await.unwrap());
    let touched = store.get_connection(&"c1".into()).await.unwrap().unwrap();
    assert_eq!(touched.last_seen_ms, now);
    assert!(!store.touch_connection(&"nobody".into(), now).await.unwrap());
    assert_eq!(
        store.get_connection(&"nobody".into()).await.unwrap(),
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
    assert_eq!(store.get_connection(&"c1".into()).await.unwrap(), None);
    assert_eq!(
        ids(store
            .list_connections(&"t1".into(), None, None, 10)
            .await
            .unwrap()),
        ["c2"]
    );
    assert_eq!(store.sweep_connections(now).await.unwrap(), 1);
    assert_eq!(store.sweep_connections(now).await.unwrap(), 0);
    assert!(store.get_connection(&"c2".into()).await.unwrap().is_some());
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
        ids(store
            .list_connections(&"t1".into(), None, None, 100)
            .await
            .unwrap()),
        ["c1", "c2", "c3"]
    );
    assert_eq!(
        ids(store
            .list_connections(&"t1".into(), Some(&"alice".into()), None, 100)
            .await
            .unwrap()),
        ["c1", "c3"]
    );
    assert_eq!(
        ids(store
            .list_connections(&"t1".into(), None, None, 2)
            .await
            .unwrap()),
        ["c1", "c2"]
    );
    assert_eq!(
        ids(store
            .list_connections(&"t1".into(), None, Some(&"c2".into()), 2)
            .await
            .unwrap()),
        ["c3"]
    );
    assert_eq!(
        ids(store
            .list_connections(&"t1".into(), Some(&"alice".into()), Some(&"c1".into()), 1)
            .await
            .unwrap()),
        ["c3"]
    );
    // A tenant or user that is a prefix of another sees nothing of it.
    assert!(
        store
            .list_connections(&"t".into(), None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list_connections(&"t1".into(), Some(&"ali".into()), None, 10)
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
        expected.push(ConnectionId::from(id));
    }
    let mut seen = Vec::new();
    let mut after: Option<ConnectionId> = None;
    loop {
        let page = store
            .list_connections(&"t1".into(), Some(&"alice".into()), after.as_ref(), 10)
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
    let mut of_a = store.connections_of_edge(&"edge-a".into()).await.unwrap();
    of_a.sort();
    assert_eq!(of_a, ["c1", "c3"]);
    assert!(
        store
            .connections_of_edge(&"edge-c".into())
            .await
            .unwrap()
            .is_empty()
    );
    let edges: BTreeSet<EdgeId> = store
        .connection_edges()
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(edges, ["edge-a".into(), "edge-b".into()].into());
}

pub async fn create_request_is_idempotent_per_user_and_client_id(store: SharedStore) {
    let first = store.create_request(request("r1", "job-1")).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.record.id, "r1");
    let again = store.create_request(request("r2", "job-1")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.record, first.record);
    assert!(store.get_request(&"r2".into()).await.unwrap().is_none());
    let mut other_user = request("r3", "job-1");
    other_user.user_id = "u2".into();
    assert!(!store.create_request(other_user).await.unwrap().duplicate);
    let mut other_tenant = request("r4", "job-1");
    other_tenant.tenant_id = "t2".into();
    assert!(!store.create_request(other_tenant).await.unwrap().duplicate);
    assert_eq!(
        store
            .find_request(&"t1".into(), &"u1".into(), &"job-1".into())
            .await
            .unwrap()
            .unwrap()
            .id,
        "r1"
    );
    assert_eq!(
        store
            .find_request(&"t1".into(), &"u2".into(), &"job-1".into())
            .await
            .unwrap()
            .unwrap()
            .id,
        "r3"
    );
    assert!(
        store
            .find_request(&"t1".into(), &"u9".into(), &"job-1".into())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.get_request(&"r1".into()).await.unwrap(),
        Some(first.record)
    );
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
    assert_eq!(
        store.get_request(&"r1".into()).await.unwrap(),
        Some(a.clone())
    );
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
    assert_eq!(
        store.get_request(&"r1".into()).await.unwrap(),
        Some(won.remove(0))
    );
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
    let mut unfinished: Vec<RequestId> = store
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
    let unfinished: Vec<RequestId> = store
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

pub async fn edge_leases_start_extend_and_lapse(store: SharedStore) {
    let lease = Duration::from_secs(30);
    let t0 = now_ms();
    assert_eq!(
        store
            .heartbeat_edge(&"edge-a".into(), t0, lease)
            .await
            .unwrap(),
        Heartbeat::Started
    );
    assert_eq!(
        store
            .heartbeat_edge(&"edge-a".into(), t0 + 10_000, lease)
            .await
            .unwrap(),
        Heartbeat::Extended
    );
    let edge = store.get_edge(&"edge-a".into()).await.unwrap().unwrap();
    assert_eq!(
        (
            edge.started_at_ms,
            edge.heartbeat_at_ms,
            edge.lease_expires_at_ms
        ),
        (t0, t0 + 10_000, t0 + 40_000)
    );
    // A heartbeat never shortens a lease.
    assert_eq!(
        store
            .heartbeat_edge(&"edge-a".into(), t0 + 11_000, Duration::from_secs(1))
            .await
            .unwrap(),
        Heartbeat::Extended
    );
    let edge = store.get_edge(&"edge-a".into()).await.unwrap().unwrap();
    assert_eq!(edge.lease_expires_at_ms, t0 + 40_000);
    assert_eq!(store.get_edge(&"edge-z".into()).await.unwrap(), None);

    store
        .heartbeat_edge(&"edge-b".into(), t0, lease)
        .await
        .unwrap();
    assert!(
        store
            .lapsed_edges(t0 + 29_999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let lapsed: Vec<EdgeId> = store
        .lapsed_edges(t0 + 40_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.edge_id)
        .collect();
    assert_eq!(lapsed, ["edge-b", "edge-a"], "the longest-lapsed first");
    assert_eq!(store.lapsed_edges(t0 + 40_000, 1).await.unwrap().len(), 1);

    // The connections of a lapsed edge are found through the edge.
    let mut record = connection("c1", "t1", "alice");
    record.edge_id = "edge-b".into();
    store.put_connection(record).await.unwrap();
    assert_eq!(
        store.connections_of_edge(&"edge-b".into()).await.unwrap(),
        ["c1"]
    );

    // A heartbeat after the lease lapsed starts a new one.
    assert_eq!(
        store
            .heartbeat_edge(&"edge-b".into(), t0 + 31_000, lease)
            .await
            .unwrap(),
        Heartbeat::Started
    );
    let edge = store.get_edge(&"edge-b".into()).await.unwrap().unwrap();
    assert_eq!(edge.started_at_ms, t0 + 31_000);
    store.release_edge(&"edge-b".into()).await.unwrap();
    assert_eq!(store.get_edge(&"edge-b".into()).await.unwrap(), None);
    assert!(
        store
            .lapsed_edges(u64::MAX / 2, 10)
            .await
            .unwrap()
            .iter()
            .all(|e| e.edge_id != "edge-b")
    );
}

pub async fn removing_a_lapsed_edge_has_one_winner_and_spares_a_revived_one(store: SharedStore) {
    let lease = Duration::from_secs(5);
    let t0 = now_ms();
    store
        .heartbeat_edge(&"edge-a".into(), t0, lease)
        .await
        .unwrap();
    store
        .heartbeat_edge(&"edge-b".into(), t0, lease)
        .await
        .unwrap();
    let lapsed = store.lapsed_edges(t0 + 5_000, 10).await.unwrap();
    assert_eq!(lapsed.len(), 2);

    let removers = (0..8).map(|_| {
        let store = Arc::clone(&store);
        let lease = lapsed[0].lease_expires_at_ms;
        let edge = lapsed[0].edge_id.clone();
        tokio::spawn(async move { store.remove_edge(&edge, lease).await })
    });
    let mut wins = 0;
    for remover in removers {
        if remover.await.unwrap().unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "exactly one cleaner removes a dead edge");
    assert_eq!(store.get_edge(&lapsed[0].edge_id).await.unwrap(), None);

    // The other edge came back after it was read as lapsed: it stays.
    let revived = &lapsed[1];
    store
        .heartbeat_edge(&revived.edge_id, t0 + 6_000, lease)
        .await
        .unwrap();
    assert!(
        !store
            .remove_edge(&revived.edge_id, revived.lease_expires_at_ms)
            .await
            .unwrap()
    );
    assert!(store.get_edge(&revived.edge_id).await.unwrap().is_some());
}

/// A request of `action` created at `created_at_ms`.
fn request_at(id: &str, action: &str, created_at_ms: u64) -> RequestRecord {
    let mut record = request(id, &format!("job-{id}"));
    record.action = action.into();
    record.created_at_ms = created_at_ms;
    record
}

fn request_ids(records: Vec<RequestRecord>) -> Vec<RequestId> {
    records.into_iter().map(|r| r.id).collect()
}

pub async fn pending_work_by_action_oldest_first(store: SharedStore) {
    let t0 = now_ms();
    for (id, action, age) in [
        ("r1", "report", 30),
        ("r2", "export", 20),
        ("r3", "report", 10),
        ("r4", "report", 40),
    ] {
        store
            .create_request(request_at(id, action, t0 - age))
            .await
            .unwrap();
    }
    assert_eq!(
        request_ids(store.pending_requests("report", 10).await.unwrap()),
        ["r4", "r1", "r3"]
    );
    assert_eq!(
        request_ids(store.pending_requests("report", 2).await.unwrap()),
        ["r4", "r1"]
    );
    assert_eq!(
        request_ids(store.pending_requests("export", 10).await.unwrap()),
        ["r2"]
    );
    assert!(
        store
            .pending_requests("other", 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Claimed or finished work is no longer pending; work handed back is.
    let mut claimed = store.get_request(&"r4".into()).await.unwrap().unwrap();
    claimed.status = RequestStatus::Processing;
    claimed.lease_expires_at_ms = Some(t0 + 60_000);
    let claimed = store
        .update_request(claimed, Durability::Immediate)
        .await
        .unwrap();
    let mut done = store.get_request(&"r3".into()).await.unwrap().unwrap();
    done.status = RequestStatus::Cancelled;
    store
        .update_request(done, Durability::Immediate)
        .await
        .unwrap();
    assert_eq!(
        request_ids(store.pending_requests("report", 10).await.unwrap()),
        ["r1"]
    );
    let mut back = claimed;
    back.status = RequestStatus::Pending;
    back.lease_expires_at_ms = None;
    store
        .update_request(back, Durability::Immediate)
        .await
        .unwrap();
    assert_eq!(
        request_ids(store.pending_requests("report", 10).await.unwrap()),
        ["r4", "r1"]
    );
}

pub async fn concurrent_claims_of_pending_work_have_one_winner(store: SharedStore) {
    store
        .create_request(request_at("r1", "report", now_ms()))
        .await
        .unwrap();
    let claimers = (0..8).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut work = store.pending_requests("report", 1).await?;
            let Some(mut record) = work.pop() else {
                return Ok(None);
            };
            record.status = RequestStatus::Processing;
            record.processor_id = Some(format!("p{i}"));
            record.lease_expires_at_ms = Some(now_ms() + 30_000);
            match store.update_request(record, Durability::Immediate).await {
                Ok(claimed) => Ok(Some(claimed)),
                Err(StoreError::Conflict) => Ok(None),
                Err(other) => Err(other),
            }
        })
    });
    let mut winners = Vec::new();
    for claimer in claimers {
        if let Some(claimed) = claimer.await.unwrap().unwrap() {
            winners.push(claimed);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one processor claims the work");
    let stored = store.get_request(&"r1".into()).await.unwrap().unwrap();
    assert_eq!(stored.processor_id, winners[0].processor_id);
    assert!(
        store
            .pending_requests("report", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn lapsed_leases_are_found_by_query(store: SharedStore) {
    let now = now_ms();
    for (id, lease) in [
        ("r1", now - 1_000),
        ("r2", now + 60_000),
        ("r3", now - 2_000),
    ] {
        let mut record = store
            .create_request(request_at(id, "report", now))
            .await
            .unwrap()
            .record;
        record.status = RequestStatus::Processing;
        record.lease_expires_at_ms = Some(lease);
        store
            .update_request(record, Durability::Immediate)
            .await
            .unwrap();
    }
    store
        .create_request(request_at("r4", "report", now))
        .await
        .unwrap();
    assert_eq!(
        request_ids(store.lapsed_leases(now, 10).await.unwrap()),
        ["r3", "r1"]
    );
    assert_eq!(
        request_ids(store.lapsed_leases(now, 1).await.unwrap()),
        ["r3"]
    );
    // A lease renewed, or work finished, is no longer lapsed.
    let mut renewed = store.get_request(&"r3".into()).await.unwrap().unwrap();
    renewed.lease_expires_at_ms = Some(now + 30_000);
    store
        .update_request(renewed, Durability::Relaxed)
        .await
        .unwrap();
    let mut done = store.get_request(&"r1".into()).await.unwrap().unwrap();
    done.status = RequestStatus::Completed;
    store
        .update_request(done, Durability::Immediate)
        .await
        .unwrap();
    assert!(store.lapsed_leases(now, 10).await.unwrap().is_empty());
    assert_eq!(
        request_ids(store.lapsed_leases(now + 60_000, 10).await.unwrap()),
        ["r3", "r2"]
    );
}

fn subscription(tenant: &str, topic: &str, connection: &str) -> Subscription {
    Subscription {
        tenant_id: tenant.into(),
        topic: topic.into(),
        connection_id: connection.into(),
        user_id: "alice".into(),
        subscribed_at_ms: now_ms(),
    }
}

fn subscriber_ids(subscriptions: Vec<Subscription>) -> Vec<ConnectionId> {
    subscriptions.into_iter().map(|s| s.connection_id).collect()
}

pub async fn subscriptions_need_a_live_connection_of_the_tenant(store: SharedStore) {
    store
        .put_connection(connection("c1", "t1", "alice"))
        .await
        .unwrap();
    let mut stale = connection("c2", "t1", "alice");
    stale.last_seen_ms = 1;
    store.put_connection(stale).await.unwrap();

    let first = subscription("t1", "orders/42", "c1");
    assert!(store.subscribe(first.clone()).await.unwrap());
    // Again: no change, the first record stays.
    let mut again = first.clone();
    again.subscribed_at_ms += 5_000;
    assert!(store.subscribe(again).await.unwrap());
    assert_eq!(
        store
            .subscribers(&"t1".into(), "orders/42", None, 10)
            .await
            .unwrap(),
        vec![first]
    );
    assert!(
        !store
            .subscribe(subscription("t2", "orders/42", "c1"))
            .await
            .unwrap(),
        "another tenant's connection"
    );
    assert!(
        !store
            .subscribe(subscription("t1", "orders/42", "c2"))
            .await
            .unwrap(),
        "an expired connection"
    );
    assert!(
        !store
            .subscribe(subscription("t1", "orders/42", "c9"))
            .await
            .unwrap(),
        "no connection"
    );
    assert!(
        store
            .subscribers(&"t2".into(), "orders/42", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        subscriber_ids(
            store
                .subscribers(&"t1".into(), "orders/42", None, 10)
                .await
                .unwrap()
        ),
        ["c1"]
    );

    assert!(
        store
            .unsubscribe(&"t1".into(), "orders/42", &"c1".into())
            .await
            .unwrap()
    );
    assert!(
        !store
            .unsubscribe(&"t1".into(), "orders/42", &"c1".into())
            .await
            .unwrap()
    );
    assert!(
        store
            .subscribers(&"t1".into(), "orders/42", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .subscriptions_of(&"c1".into())
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn subscribers_page_in_order_and_isolate_tenants_and_topics(store: SharedStore) {
    let mut expected = Vec::new();
    for i in 0..25 {
        let id = format!("c{i:02}");
        store
            .put_connection(connection(&id, "t1", "alice"))
            .await
            .unwrap();
        assert!(
            store
                .subscribe(subscription("t1", "news", &id))
                .await
                .unwrap()
        );
        expected.push(ConnectionId::from(id));
    }
    store
        .put_connection(connection("d1", "t2", "bob"))
        .await
        .unwrap();
    assert!(
        store
            .subscribe(subscription("t2", "news", "d1"))
            .await
            .unwrap()
    );
    assert!(
        store
            .subscribe(subscription("t1", "news/sport", "c00"))
            .await
            .unwrap()
    );
    assert!(
        store
            .subscribe(subscription("t1", "new", "c01"))
            .await
            .unwrap()
    );

    let mut seen = Vec::new();
    let mut after: Option<ConnectionId> = None;
    loop {
        let page = store
            .subscribers(&"t1".into(), "news", after.as_ref(), 10)
            .await
            .unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after = Some(last.connection_id.clone());
        seen.extend(subscriber_ids(page));
    }
    assert_eq!(seen, expected);
    assert_eq!(
        subscriber_ids(
            store
                .subscribers(&"t2".into(), "news", None, 10)
                .await
                .unwrap()
        ),
        ["d1"]
    );
    let topics: Vec<String> = store
        .subscriptions_of(&"c00".into())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.topic)
        .collect();
    assert_eq!(topics, ["news", "news/sport"]);
}

pub async fn subscriptions_go_with_their_connection(store: SharedStore) {
    for id in ["c1", "c2", "c3"] {
        store
            .put_connection(connection(id, "t1", "alice"))
            .await
            .unwrap();
        for topic in ["a", "b"] {
            assert!(
                store
                    .subscribe(subscription("t1", topic, id))
                    .await
                    .unwrap()
            );
        }
    }
    // Replacing a record (an edge announcing it again) keeps them.
    let mut moved = connection("c1", "t1", "alice");
    moved.edge_id = "edge-2".into();
    store.put_connection(moved).await.unwrap();
    assert_eq!(store.subscriptions_of(&"c1".into()).await.unwrap().len(), 2);

    // Deleting it removes them.
    store.delete_connection(&"c1".into()).await.unwrap();
    assert!(
        store
            .subscriptions_of(&"c1".into())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        subscriber_ids(
            store
                .subscribers(&"t1".into(), "a", None, 10)
                .await
                .unwrap()
        ),
        ["c2", "c3"]
    );

    // So does the sweep of an expired one.
    let mut stale = connection("c2", "t1", "alice");
    stale.last_seen_ms = 1;
    store.put_connection(stale).await.unwrap();
    assert_eq!(store.sweep_connections(now_ms()).await.unwrap(), 1);
    for topic in ["a", "b"] {
        assert_eq!(
            subscriber_ids(
                store
                    .subscribers(&"t1".into(), topic, None, 10)
                    .await
                    .unwrap()
            ),
            ["c3"]
        );
    }
}

fn retention(max_messages: u64, max_age_secs: u64) -> Retention {
    Retention {
        max_messages,
        max_age: Duration::from_secs(max_age_secs),
    }
}

fn offsets(recovery: &super::Recovery) -> Vec<u64> {
    recovery.messages.iter().map(|m| m.offset).collect()
}

pub async fn topic_offsets_are_contiguous_within_an_epoch(store: SharedStore) {
    let keep = retention(100, 3_600);
    let now = now_ms();
    let start = store.topic_position(&"t1".into(), "orders").await.unwrap();
    assert_eq!(start.offset, 0);
    assert_eq!(
        store.topic_position(&"t1".into(), "orders").await.unwrap(),
        start
    );
    for (i, n) in [1u64, 2, 3].into_iter().enumerate() {
        let position = store
            .append_topic(
                &"t1".into(),
                "orders",
                serde_json::json!({"n": n}),
                now + i as u64,
                keep,
            )
            .await
            .unwrap();
        assert_eq!(
            position,
            TopicPosition {
                epoch: start.epoch.clone(),
                offset: n
            }
        );
    }
    // Another tenant's topic of the same name is another topic.
    let other = store
        .append_topic(&"t2".into(), "orders", serde_json::json!({}), now, keep)
        .await
        .unwrap();
    assert_eq!(other.offset, 1);
    assert_ne!(other.epoch, start.epoch);

    let since_one = TopicPosition {
        epoch: start.epoch.clone(),
        offset: 1,
    };
    let recovery = store
        .topic_since(&"t1".into(), "orders", &since_one, now, keep)
        .await
        .unwrap();
    assert!(recovery.recovered);
    assert_eq!(offsets(&recovery), [2, 3]);
    assert_eq!(recovery.messages[0].payload, serde_json::json!({"n": 2}));
    assert_eq!(recovery.position.offset, 3);

    let current = store
        .topic_since(&"t1".into(), "orders", &start, now, keep)
        .await
        .unwrap();
    assert!(current.recovered);
    assert_eq!(offsets(&current), [1, 2, 3]);
    let up_to_date = store
        .topic_since(&"t1".into(), "orders", &recovery.position, now, keep)
        .await
        .unwrap();
    assert!(up_to_date.recovered && up_to_date.messages.is_empty());
}

pub async fn topic_recovery_says_when_history_no_longer_covers_the_gap(store: SharedStore) {
    let now = now_ms();
    let keep_three = retention(3, 3_600);
    let start = store.topic_position(&"t1".into(), "alerts").await.unwrap();
    for n in 1..=5u64 {
        store
            .append_topic(
                &"t1".into(),
                "alerts",
                serde_json::json!(n),
                now,
                keep_three,
            )
            .await
            .unwrap();
    }
    let at = |offset| TopicPosition {
        epoch: start.epoch.clone(),
        offset,
    };
    // Messages 1 and 2 are gone: a client at 0 or 1 missed something.
    let gap = store
        .topic_since(&"t1".into(), "alerts", &at(1), now, keep_three)
        .await
        .unwrap();
    assert!(!gap.recovered);
    assert_eq!(offsets(&gap), [3, 4, 5], "what is kept still comes");
    let covered = store
        .topic_since(&"t1".into(), "alerts", &at(2), now, keep_three)
        .await
        .unwrap();
    assert!(covered.recovered);
    assert_eq!(offsets(&covered), [3, 4, 5]);

    // A position from another epoch (a history that was lost) or from the
    // future is never taken for a current one.
    for since in [
        TopicPosition {
            epoch: "another".into(),
            offset: 4,
        },
        at(9),
    ] {
        let lost = store
            .topic_since(&"t1".into(), "alerts", &since, now, keep_three)
            .await
            .unwrap();
        assert!(!lost.recovered, "{since:?}");
        assert!(lost.messages.is_empty());
        assert_eq!(lost.position, at(5));
    }

    // By age: an hour later nothing is kept.
    let later = now + 3_600_000;
    let aged = store
        .topic_since(&"t1".into(), "alerts", &at(3), later, keep_three)
        .await
        .unwrap();
    assert!(!aged.recovered);
    assert!(aged.messages.is_empty());
    let caught_up = store
        .topic_since(&"t1".into(), "alerts", &at(5), later, keep_three)
        .await
        .unwrap();
    assert!(caught_up.recovered, "nothing was missed");
}

pub async fn concurrent_appends_get_distinct_contiguous_offsets(store: SharedStore) {
    let keep = retention(100, 3_600);
    let start = store.topic_position(&"t1".into(), "busy").await.unwrap();
    let appends = (0..12u64).map(|n| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .append_topic(&"t1".into(), "busy", serde_json::json!(n), now_ms(), keep)
                .await
        })
    });
    let mut given = BTreeSet::new();
    for append in appends {
        let position = append.await.unwrap().unwrap();
        assert_eq!(position.epoch, start.epoch);
        assert!(
            given.insert(position.offset),
            "offset {} given twice",
            position.offset
        );
    }
    assert_eq!(given, (1..=12).collect());
    let all = store
        .topic_since(&"t1".into(), "busy", &start, now_ms(), keep)
        .await
        .unwrap();
    assert!(all.recovered);
    assert_eq!(offsets(&all), (1..=12).collect::<Vec<_>>());
    let payloads: BTreeSet<u64> = all
        .messages
        .iter()
        .map(|m| m.payload.as_u64().unwrap())
        .collect();
    assert_eq!(payloads, (0..12).collect(), "every message once");
}

pub async fn an_undelivered_final_stays_unsettled_and_leased(store: SharedStore) {
    let now = now_ms();
    let mut record = store
        .create_request(request_at("r1", "report", now))
        .await
        .unwrap()
        .record;
    record.status = RequestStatus::Completed;
    record.final_pending = true;
    record.lease_expires_at_ms = Some(now - 1);
    let record = store
        .update_request(record, Durability::Immediate)
        .await
        .unwrap();
    assert_eq!(
        request_ids(store.unfinished_requests().await.unwrap()),
        ["r1"]
    );
    assert_eq!(
        request_ids(store.lapsed_leases(now, 10).await.unwrap()),
        ["r1"]
    );
    assert!(
        store
            .pending_requests("report", 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Delivered: settled, neither unfinished nor leased any more.
    let mut delivered = record;
    delivered.final_pending = false;
    delivered.lease_expires_at_ms = None;
    store
        .update_request(delivered, Durability::Relaxed)
        .await
        .unwrap();
    assert!(store.unfinished_requests().await.unwrap().is_empty());
    assert!(
        store
            .lapsed_leases(u64::MAX / 2, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A local DynamoDB-protocol server for tests, which also serves API
/// Gateway's management API (`/@connections/{id}`, with the stage left out
/// of the endpoint: moto routes on the path) and lets a test read back what
/// was posted to a connection at `GET /_streamer/apigateway/connections/{id}`
/// (404 for one it never saw): moto's server mode, started
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
from moto.apigatewaymanagementapi.models import apigatewaymanagementapi_backends
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
moto = DomainDispatcherApplication(create_backend_app)
READ_BACK = "/_streamer/apigateway/connections/"
def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if not path.startswith(READ_BACK):
        return moto(environ, start_response)
    connection_id = path[len(READ_BACK):]
    for regions in list(apigatewaymanagementapi_backends.values()):
        for backend in list(regions.values()):
            if connection_id in backend.connections:
                start_response("200 OK", [("Content-Type", "application/octet-stream")])
                return [bytes(backend.connections[connection_id].data)]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no such connection"]
server = make_server("127.0.0.1", 0, app, threaded=False)
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
