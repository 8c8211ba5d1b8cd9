//! Errors as a generated client sees them: every refusal of a real system
//! carries a `google.rpc.ErrorInfo` (reason, domain) a program can branch
//! on, an invalid argument a `google.rpc.BadRequest` naming the field, and
//! the two ways a processor's Complete can be refused are told apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use streamer_api::errors::DOMAIN;
use streamer_api::v1::{self, claim_response::Item};
use support::{TestSystem, within};
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The code, the ErrorInfo's reason and its metadata, checking the domain.
fn refusal(status: &Status) -> (Code, String, std::collections::HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo on {status:?}"));
    assert_eq!(info.domain, DOMAIN, "{status:?}");
    (status.code(), info.reason, info.metadata)
}

/// The one field violation of an INVALID_ARGUMENT.
fn violated_field(status: &Status) -> String {
    let details = status.get_error_details();
    let violations = &details
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest on {status:?}"))
        .field_violations;
    assert_eq!(violations.len(), 1, "{status:?}");
    violations[0].field.clone()
}

#[tokio::test]
async fn every_refusal_names_its_reason_and_an_invalid_argument_its_field() {
    let system = TestSystem::start().await;
    let (_alice, alice_id) = system.connect_found("alice", "acme").await;
    let mut connections = system.connections().await;
    let mut progress = system.progress().await;

    // ConnectionService: a missing field, an unknown connection, a page
    // token that is not one of ours.
    let status = connections
        .send(support::send("", json!({})))
        .await
        .unwrap_err();
    assert_eq!(refusal(&status).1, "INVALID_ARGUMENT");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "connection_id");
    assert!(
        status
            .message()
            .starts_with("invalid argument `connection_id`: "),
        "{status:?}"
    );
    let status = connections
        .send(support::send("no-such-connection", json!({})))
        .await
        .unwrap_err();
    assert_eq!(
        (refusal(&status).0, refusal(&status).1.as_str()),
        (Code::NotFound, "CONNECTION_NOT_FOUND")
    );
    let status = connections
        .list_connections(v1::ListConnectionsRequest {
            tenant_id: "acme".into(),
            user_id: String::new(),
            page: Some(v1::PageRequest {
                page_size: 10,
                page_token: "garbage".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&status), "page.page_token");

    // ProgressService: the same shapes, from the other service.
    let status = progress
        .claim(support::claim_request("p", "export", 1, 3601))
        .await
        .unwrap_err();
    assert_eq!(refusal(&status).1, "INVALID_ARGUMENT");
    assert_eq!(violated_field(&status), "lease_seconds");
    assert!(
        status
            .message()
            .starts_with("invalid argument `lease_seconds`: "),
        "{status:?}"
    );
    let status = progress
        .get(v1::GetRequest {
            selector: Some(v1::get_request::Selector::Id("no-such-request".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refusal(&status).0, refusal(&status).1.as_str()),
        (Code::NotFound, "REQUEST_NOT_FOUND")
    );
    let status = progress
        .submit(v1::SubmitRequest {
            connection_id: alice_id,
            action: "nobody_runs_this".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let (code, reason, metadata) = refusal(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::FailedPrecondition, "ACTION_NOT_HANDLED")
    );
    assert_eq!(metadata["action"], "nobody_runs_this");
}

/// The next item of a Claim stream.
async fn next(stream: &mut tonic::Streaming<v1::ClaimResponse>) -> Item {
    within("a claim item", stream.next())
        .await
        .unwrap()
        .unwrap()
        .item
        .unwrap()
}

#[tokio::test]
async fn completing_twice_and_completing_without_the_lease_are_told_apart() {
    let system = TestSystem::start().await;
    let (_alice, alice_id) = system.connect_found("alice", "acme").await;
    let mut progress = system.progress().await;
    // p1's lease is one second and it never reports: the request goes to p2.
    let mut first =
        support::claim(&mut progress, support::claim_request("p1", "export", 1, 1)).await;
    let submitted = progress
        .submit(v1::SubmitRequest {
            connection_id: alice_id,
            action: "export".into(),
            request_id: "e1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    let Item::Work(job) = next(&mut first).await else {
        panic!("expected work");
    };
    assert_eq!(job.id, submitted.id);
    // The lapse is an event p1 is told of.
    let Item::Cancelled(lapsed) = next(&mut first).await else {
        panic!("expected p1's lease to lapse");
    };
    assert_eq!(lapsed, job.id);
    let mut second =
        support::claim(&mut progress, support::claim_request("p2", "export", 1, 60)).await;
    let Item::Work(again) = next(&mut second).await else {
        panic!("expected the request again, at p2");
    };
    assert_eq!(again.id, job.id);

    let complete = |processor: &str| v1::CompleteRequest {
        id: job.id.clone(),
        processor_id: processor.into(),
        result: Some(streamer_api::json::to_proto(json!({"rows": 3}))),
    };
    let status = progress.complete(complete("p1")).await.unwrap_err();
    let (code, reason, metadata) = refusal(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::FailedPrecondition, "LEASE_NOT_HELD")
    );
    assert_eq!(metadata["id"], job.id);

    progress.complete(complete("p2")).await.unwrap();
    let status = progress.complete(complete("p2")).await.unwrap_err();
    let (code, reason, metadata) = refusal(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::FailedPrecondition, "REQUEST_ALREADY_FINISHED")
    );
    assert_eq!(metadata["status"], "completed");
    assert_eq!(metadata["id"], job.id);
}
