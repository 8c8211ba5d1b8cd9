//! A server's health follows its check: NOT_SERVING until it passes,
//! NOT_SERVING while it fails, SERVING again when it passes, and
//! NOT_SERVING for good once shutdown begins.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use streamer_core::grpc::{self, Health};
use streamer_core::shutdown::Shutdown;
use streamer_core::trust::Trust;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

async fn status(client: &mut HealthClient<tonic::transport::Channel>) -> ServingStatus {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Polls until the status is `want` (the check runs every 20 ms).
async fn becomes(client: &mut HealthClient<tonic::transport::Channel>, want: ServingStatus) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while status(client).await != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("health never became {want:?}"));
}

#[tokio::test]
async fn health_follows_the_check_and_ends_not_serving() {
    let up = Arc::new(AtomicBool::new(false));
    let mut health = {
        let up = up.clone();
        Health::new(move || {
            let up = up.load(Ordering::SeqCst);
            async move {
                if up {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("the store is away"))
                }
            }
        })
    };
    health.interval = Duration::from_millis(20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(grpc::serve(
        listener,
        tonic::service::Routes::default(),
        &[],
        Trust::none(),
        health,
        shutdown.clone(),
    ));
    let mut client = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    );

    becomes(&mut client, ServingStatus::NotServing).await;
    up.store(true, Ordering::SeqCst);
    becomes(&mut client, ServingStatus::Serving).await;
    assert!(grpc::not_serving().is_empty());
    up.store(false, Ordering::SeqCst);
    becomes(&mut client, ServingStatus::NotServing).await;
    assert_eq!(grpc::not_serving(), [addr.to_string()]);
    up.store(true, Ordering::SeqCst);
    becomes(&mut client, ServingStatus::Serving).await;

    shutdown.cancel();
    server.await.unwrap().unwrap();
    assert_eq!(
        grpc::not_serving(),
        [addr.to_string()],
        "not serving once stopped"
    );
}
