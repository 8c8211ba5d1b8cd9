//! The one way a Streamer service turns a failure into a gRPC status.
//!
//! Every error status carries a `google.rpc.ErrorInfo` whose `reason` is an
//! [`ErrorReason`](crate::v1::ErrorReason) name (without its prefix) and
//! whose `domain` is [`DOMAIN`]; an INVALID_ARGUMENT also carries a
//! `google.rpc.BadRequest` naming the field, and every status a caller
//! should retry (UNAVAILABLE, ABORTED, RESOURCE_EXHAUSTED) a
//! `google.rpc.RetryInfo`. Messages have one shape for every service:
//! "invalid argument `field`: what is wrong".

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use crate::v1::ErrorReason as Reason;

/// The `ErrorInfo.domain` of every status Streamer returns.
pub const DOMAIN: &str = "streamer.v1";

/// How long a caller waits before retrying when the failure names no delay.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The delay a retryable failure suggests unless it names its own: a write
/// that lost to concurrent writers may go again almost at once, a stopping
/// replica's caller goes to another replica at once; anything else waits.
fn retry_delay(reason: Reason) -> Duration {
    match reason {
        Reason::Contended => Duration::from_millis(50),
        Reason::ShuttingDown => Duration::from_millis(100),
        _ => DEFAULT_RETRY_DELAY,
    }
}

/// The reason as `ErrorInfo.reason` spells it: "CONNECTION_NOT_FOUND".
pub fn reason_name(reason: Reason) -> &'static str {
    let name = reason.as_str_name();
    name.strip_prefix("ERROR_REASON_").unwrap_or(name)
}

/// A failure on its way to becoming a [`Status`].
#[derive(Debug, Clone)]
pub struct Failure {
    code: Code,
    reason: Reason,
    message: String,
    metadata: HashMap<String, String>,
    violation: Option<(String, String)>,
    retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(code: Code, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            metadata: HashMap::new(),
            violation: None,
            retry_after: None,
        }
    }

    /// INVALID_ARGUMENT naming the field (as the proto names it, with a
    /// dotted path into nested messages: `page.page_token`).
    pub fn invalid_argument(field: &str, description: impl Into<String>) -> Self {
        let description = description.into();
        let mut failure = Self::new(
            Code::InvalidArgument,
            Reason::InvalidArgument,
            format!("invalid argument `{field}`: {description}"),
        );
        failure.violation = Some((field.to_owned(), description));
        failure
    }

    /// Adds an entry to the ErrorInfo's metadata.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.metadata.insert(key.to_owned(), value.into());
        self
    }

    /// When to retry, for a status a caller should retry.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }
}

/// Whether a caller should retry a status of this code (after its
/// RetryInfo's delay).
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Aborted | Code::ResourceExhausted
    )
}

impl From<Failure> for Status {
    fn from(failure: Failure) -> Self {
        let mut details =
            ErrorDetails::with_error_info(reason_name(failure.reason), DOMAIN, failure.metadata);
        if let Some((field, description)) = failure.violation {
            details.add_bad_request_violation(field, description);
        }
        if retryable(failure.code) {
            details.set_retry_info(Some(
                failure
                    .retry_after
                    .unwrap_or_else(|| retry_delay(failure.reason)),
            ));
        }
        Status::with_error_details(failure.code, failure.message, details)
    }
}

/// The `ErrorInfo.reason` of a status, when it carries one.
pub fn reason_of(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_argument_names_its_field_in_the_message_and_the_details() {
        let status = Status::from(Failure::invalid_argument("page.page_token", "is not ours"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid argument `page.page_token`: is not ours"
        );
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_ARGUMENT", DOMAIN)
        );
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "page.page_token");
        assert_eq!(violations[0].description, "is not ours");
        assert!(details.retry_info().is_none(), "not retryable");
    }

    #[test]
    fn a_retryable_status_says_when_to_retry() {
        let status = Status::from(Failure::new(
            Code::Unavailable,
            Reason::StoreUnavailable,
            "store unavailable",
        ));
        let retry = status.get_error_details().retry_info().cloned();
        assert_eq!(retry.and_then(|r| r.retry_delay), Some(DEFAULT_RETRY_DELAY));
        assert_eq!(reason_of(&status).as_deref(), Some("STORE_UNAVAILABLE"));

        let status = Status::from(
            Failure::new(Code::Aborted, Reason::Contended, "contended")
                .retry_after(Duration::from_millis(50)),
        );
        let retry = status.get_error_details().retry_info().cloned();
        assert_eq!(
            retry.and_then(|r| r.retry_delay),
            Some(Duration::from_millis(50))
        );
    }

    #[test]
    fn metadata_travels_in_the_error_info() {
        let status = Status::from(
            Failure::new(
                Code::FailedPrecondition,
                Reason::RequestAlreadyFinished,
                "already completed",
            )
            .with("status", "completed"),
        );
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "REQUEST_ALREADY_FINISHED");
        assert_eq!(
            info.metadata.get("status").map(String::as_str),
            Some("completed")
        );
    }

    #[test]
    fn every_reason_has_a_name_without_the_prefix() {
        for value in 1.. {
            let Ok(reason) = Reason::try_from(value) else {
                break;
            };
            let name = reason_name(reason);
            assert!(
                !name.starts_with("ERROR_REASON_") && !name.is_empty(),
                "{name}"
            );
        }
    }
}
