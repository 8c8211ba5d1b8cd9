//! Posting to API Gateway's connections through the real AWS SDK: against
//! moto's management API for the happy path, and against a fault-injecting
//! server answering as API Gateway does (410, 429, 5xx, 403, 413, silence)
//! for the rest. Waits and the breaker's clock are controlled, not slept.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/apigateway.rs"]
mod apigateway_support;
mod support;

use std::sync::Arc;
use std::time::Duration;

use apigateway_support::{FaultServer, ManualClock, Reply, message, moto_read_back};
use axum::http::Method;
use bytes::Bytes;
use streamer_connection::apigateway::{
    MAX_MESSAGE_BYTES, PostOutcome, PostPolicy, Poster, SdkManagementApi, Target,
};

fn poster(clock: Arc<ManualClock>, policy: PostPolicy) -> Poster {
    Poster::new(Arc::new(SdkManagementApi::local()), clock, policy)
}

#[tokio::test]
async fn a_post_reaches_the_connection_path_signed_and_whole() {
    let server = FaultServer::start().await;
    let poster = poster(ManualClock::new(), PostPolicy::default());
    // API Gateway's ids end in `=`: it must arrive as sent.
    let id = "Xk3J8cD2oAMCJ_Q=";
    let outcome = poster
        .post(&server.target(id), message(r#"{"type":"hello"}"#))
        .await;
    assert_eq!(outcome, PostOutcome::Delivered);
    let calls = server.calls(id);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, Method::POST);
    assert_eq!(calls[0].stage, "prod");
    assert_eq!(calls[0].body, message(r#"{"type":"hello"}"#));
}

#[tokio::test]
async fn gone_is_told_at_once() {
    let server = FaultServer::start().await;
    let clock = ManualClock::new();
    let poster = poster(clock.clone(), PostPolicy::default());
    server.script("c1", [Reply::Status(410, "GoneException")]);
    assert_eq!(
        poster.post(&server.target("c1"), message("x")).await,
        PostOutcome::Gone
    );
    assert_eq!(server.calls("c1").len(), 1);
    assert!(clock.slept().is_empty());
}

#[tokio::test]
async fn throttling_is_retried_after_growing_jittered_waits() {
    let server = FaultServer::start().await;
    let clock = ManualClock::new();
    let poster = poster(clock.clone(), PostPolicy::default());
    server.script(
        "c1",
        [
            Reply::Status(429, "LimitExceededException"),
            Reply::Status(429, "LimitExceededException"),
        ],
    );
    assert_eq!(
        poster.post(&server.target("c1"), message("x")).await,
        PostOutcome::Delivered
    );
    assert_eq!(server.calls("c1").len(), 3);
    let slept = clock.slept();
    assert_eq!(slept.len(), 2, "{slept:?}");
    assert!(
        (Duration::from_millis(75)..=Duration::from_millis(125)).contains(&slept[0]),
        "{slept:?}"
    );
    assert!(
        (Duration::from_millis(150)..=Duration::from_millis(250)).contains(&slept[1]),
        "{slept:?}"
    );
}

#[tokio::test]
async fn server_errors_give_up_after_three_attempts() {
    let server = FaultServer::start().await;
    let clock = ManualClock::new();
    let poster = poster(clock.clone(), PostPolicy::default());
    server.script(
        "c1",
        [
            Reply::Status(500, "InternalServerErrorException"),
            Reply::Status(502, "BadGateway"),
            Reply::Status(503, "ServiceUnavailable"),
        ],
    );
    let outcome = poster.post(&server.target("c1"), message("x")).await;
    assert!(
        matches!(&outcome, PostOutcome::Unavailable(why) if why.contains("503")),
        "{outcome:?}"
    );
    assert_eq!(server.calls("c1").len(), 3);
    assert_eq!(clock.slept().len(), 2);
}

#[tokio::test]
async fn forbidden_and_too_large_fail_at_once() {
    let server = FaultServer::start().await;
    let clock = ManualClock::new();
    let poster = poster(clock.clone(), PostPolicy::default());
    for (id, status, error_type) in [
        ("c403", 403, "ForbiddenException"),
        ("c413", 413, "PayloadTooLargeException"),
        ("c400", 400, "BadRequestException"),
    ] {
        server.script(id, [Reply::Status(status, error_type)]);
        let outcome = poster.post(&server.target(id), message("x")).await;
        assert!(
            matches!(&outcome, PostOutcome::Rejected(why) if why.contains(&status.to_string())),
            "{id}: {outcome:?}"
        );
        assert_eq!(server.calls(id).len(), 1, "{id}");
    }
    assert!(clock.slept().is_empty());
}

#[tokio::test]
async fn a_message_over_128_kb_is_refused_before_any_call() {
    let server = FaultServer::start().await;
    let poster = poster(ManualClock::new(), PostPolicy::default());
    let largest = Bytes::from(vec![b'a'; MAX_MESSAGE_BYTES]);
    assert_eq!(
        poster.post(&server.target("c1"), largest.clone()).await,
        PostOutcome::Delivered
    );
    assert_eq!(server.calls("c1")[0].body.len(), MAX_MESSAGE_BYTES);
    let over = Bytes::from(vec![b'a'; MAX_MESSAGE_BYTES + 1]);
    let outcome = poster.post(&server.target("c2"), over).await;
    assert!(
        matches!(&outcome, PostOutcome::Rejected(why) if why.contains("131073")),
        "{outcome:?}"
    );
    assert!(server.calls("c2").is_empty());
}

#[tokio::test]
async fn a_silent_server_times_out_each_attempt() {
    let server = FaultServer::start().await;
    let clock = ManualClock::new();
    let policy = PostPolicy {
        attempt_timeout: Duration::from_millis(200),
        ..PostPolicy::default()
    };
    let poster = poster(clock.clone(), policy);
    server.script(
        "c1",
        std::iter::repeat_n(Reply::Silence(Duration::from_secs(5)), 3),
    );
    let outcome = poster.post(&server.target("c1"), message("x")).await;
    assert!(
        matches!(&outcome, PostOutcome::Unavailable(why) if why.contains("no answer")),
        "{outcome:?}"
    );
    assert_eq!(server.calls("c1").len(), 3);
}

#[tokio::test]
async fn the_breaker_opens_after_three_failures_and_half_opens_after_its_delay() {
    let server = FaultServer::start().await;
    let clock = ManualClock::new();
    let poster = poster(clock.clone(), PostPolicy::default());
    let broken = server.target("broken");
    let healthy = server.target("healthy");
    let failing = || std::iter::repeat_n(Reply::Status(503, "ServiceUnavailable"), 3);
    for _ in 0..3 {
        server.script("broken", failing());
        let outcome = poster.post(&broken, message("x")).await;
        assert!(
            matches!(outcome, PostOutcome::Unavailable(_)),
            "{outcome:?}"
        );
    }
    assert_eq!(server.calls("broken").len(), 9);

    // Open: no call, and the healthy connection beside it is untouched.
    let outcome = poster.post(&broken, message("x")).await;
    assert!(
        matches!(&outcome, PostOutcome::Unavailable(why) if why.contains("breaker")),
        "{outcome:?}"
    );
    assert_eq!(server.calls("broken").len(), 9);
    assert!(!poster.is_active(&broken).await.unwrap());
    assert_eq!(server.calls("broken").len(), 9, "IsActive asks nothing");
    assert_eq!(
        poster.post(&healthy, message("x")).await,
        PostOutcome::Delivered
    );

    // Just before the delay: still open.
    clock.advance(Duration::from_secs(29));
    assert!(matches!(
        poster.post(&broken, message("x")).await,
        PostOutcome::Unavailable(_)
    ));
    assert_eq!(server.calls("broken").len(), 9);

    // Half-open: one post goes; it fails, and the breaker opens again.
    clock.advance(Duration::from_secs(1));
    server.script("broken", failing());
    assert!(matches!(
        poster.post(&broken, message("x")).await,
        PostOutcome::Unavailable(_)
    ));
    assert_eq!(server.calls("broken").len(), 12);
    assert!(matches!(
        poster.post(&broken, message("x")).await,
        PostOutcome::Unavailable(_)
    ));
    assert_eq!(server.calls("broken").len(), 12);

    // After another delay the trial succeeds and closes it for good.
    clock.advance(Duration::from_secs(30));
    assert_eq!(
        poster.post(&broken, message("x")).await,
        PostOutcome::Delivered
    );
    assert_eq!(
        poster.post(&broken, message("y")).await,
        PostOutcome::Delivered
    );
    assert_eq!(server.calls("broken").len(), 14);
}

#[tokio::test]
async fn delete_and_get_ask_api_gateway_and_gone_means_ended() {
    let server = FaultServer::start().await;
    let poster = poster(ManualClock::new(), PostPolicy::default());
    assert!(poster.is_active(&server.target("c1")).await.unwrap());
    server.script("c2", [Reply::Status(410, "GoneException")]);
    assert!(!poster.is_active(&server.target("c2")).await.unwrap());
    poster.delete(&server.target("c1")).await.unwrap();
    server.script("c3", [Reply::Status(410, "GoneException")]);
    poster.delete(&server.target("c3")).await.unwrap();
    server.script("c4", [Reply::Status(403, "ForbiddenException")]);
    let error = poster.delete(&server.target("c4")).await.unwrap_err();
    assert_eq!(error.status, Some(403));
    let methods: Vec<Method> = ["c1", "c2", "c3"]
        .iter()
        .flat_map(|id| server.calls(id))
        .map(|c| c.method)
        .collect();
    assert_eq!(
        methods,
        vec![Method::GET, Method::DELETE, Method::GET, Method::DELETE]
    );
}

#[test]
fn backoff_doubles_within_its_jitter_and_never_passes_the_cap() {
    use rand::SeedableRng as _;
    let policy = PostPolicy::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for attempt in 1..=20u32 {
        let nominal = (policy.base * 2u32.pow(attempt.min(16) - 1)).min(policy.cap);
        let (low, high) = (nominal.mul_f64(0.75), nominal.mul_f64(1.25).min(policy.cap));
        let mut seen = (Duration::MAX, Duration::ZERO);
        for _ in 0..2_000 {
            let wait = policy.backoff(attempt, &mut rng);
            assert!(low <= wait && wait <= high, "attempt {attempt}: {wait:?}");
            seen = (seen.0.min(wait), seen.1.max(wait));
        }
        // The jitter is used, both ways.
        assert!(seen.0 < nominal.mul_f64(0.8), "attempt {attempt}: {seen:?}");
        if nominal < policy.cap {
            assert!(seen.1 > nominal.mul_f64(1.2), "attempt {attempt}: {seen:?}");
        }
    }
}

#[tokio::test]
async fn moto_receives_posts_in_order_and_forgets_a_deleted_connection() {
    let endpoint = streamer_core::store::conformance::local_dynamodb::endpoint();
    let api = SdkManagementApi::local();
    let poster = Poster::new(Arc::new(api), ManualClock::new(), PostPolicy::default());
    let id = format!("moto{}", uuid::Uuid::new_v4().simple());
    // moto serves the management API at its root: no stage in the endpoint.
    let target = Target {
        endpoint: endpoint.clone(),
        connection_id: id.clone(),
    };
    for text in [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#] {
        assert_eq!(
            poster.post(&target, message(text)).await,
            PostOutcome::Delivered
        );
    }
    assert_eq!(
        moto_read_back(&endpoint, &id).await.as_deref(),
        Some(br#"{"n":1}{"n":2}{"n":3}"#.as_slice())
    );
    assert!(poster.is_active(&target).await.unwrap());
    poster.delete(&target).await.unwrap();
    assert_eq!(moto_read_back(&endpoint, &id).await, None);
}
