//! The store conformance suite on the DynamoDB backend, against a real
//! DynamoDB-protocol server (moto's server mode) that this test starts
//! itself, once per test process, on a free loopback port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use streamer_core::store::conformance::local_dynamodb;

use streamer_core::store::{ConnectionStore, DynamoStore, SharedStore, Store};

/// A store on its own fresh tables (a unique prefix on the shared server).
async fn fresh() -> (SharedStore, ()) {
    let endpoint = local_dynamodb::endpoint();
    let prefix = format!("t{}-", uuid::Uuid::new_v4().simple());
    let store = DynamoStore::local(&endpoint, &prefix);
    store.create_tables().await.unwrap();
    (Arc::new(store), ())
}

streamer_core::store_conformance_suite!(fresh());

#[tokio::test]
async fn creating_the_tables_again_changes_nothing() {
    let (store, ()) = fresh().await;
    store
        .put_connection(streamer_core::store::conformance::connection(
            "c1", "t1", "alice",
        ))
        .await
        .unwrap();
    let endpoint = local_dynamodb::endpoint();
    let again = DynamoStore::local(&endpoint, "unused-");
    again.create_tables().await.unwrap();
    again.create_tables().await.unwrap();
    assert!(store.get_connection(&"c1".into()).await.unwrap().is_some());
    store.ping().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let store = DynamoStore::local(&endpoint, "x-");
    let error = store.ping().await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    let error = store.get_connection(&"c1".into()).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(
        std::error::Error::source(&error).is_some(),
        "the SDK's error is kept"
    );
}

#[tokio::test]
async fn missing_tables_are_a_clear_error() {
    let store = DynamoStore::local(&local_dynamodb::endpoint(), "never-created-");
    let error = store.ping().await.unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    assert!(
        error.to_string().contains("never-created-connections"),
        "{error}"
    );
}
