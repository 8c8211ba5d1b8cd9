//! The service's own types, and the conversions to and from the wire.
//!
//! Every `TryFrom<proto>` here is where validation happens: the lifecycle
//! only ever sees a command that is well formed, and a malformed call is
//! INVALID_ARGUMENT before anything is read or written.

use std::time::Duration;

use serde_json::{Map, Value};
use streamer_api::json::{
    MAX_DEPTH, from_proto, object_to_struct, struct_depth, struct_to_object, to_proto,
};
use streamer_api::v1;
use streamer_core::ids::{ClientRequestId, ConnectionId, RequestId, TenantId, UserId};
use streamer_core::store::{RequestError, RequestRecord, RequestStatus};
use streamer_core::timestamp;

use crate::error::ProgressError;

/// The most actions one processor may declare.
const MAX_ACTIONS: usize = 256;
/// The most requests one processor may hold at once.
pub(crate) const MAX_IN_FLIGHT: u32 = 1000;
/// The longest lease a processor may ask for.
pub(crate) const MAX_LEASE_SECONDS: u32 = 3600;

/// A name the store can index: non-empty, and usable as one (see
/// [`streamer_core::ids::unusable`]). It comes out as the type the
/// caller names: an id ([`RequestId`], [`ConnectionId`], …) or a `String`.
fn name<T: From<String>>(field: &'static str, value: String) -> Result<T, ProgressError> {
    if value.is_empty() {
        return Err(ProgressError::invalid(field, "is required"));
    }
    optional_name(field, value)
}

/// Like [`name`], but empty is let through (the caller decides what it
/// means).
fn optional_name<T: From<String>>(field: &'static str, value: String) -> Result<T, ProgressError> {
    if let Some(why) = streamer_core::ids::unusable(&value) {
        return Err(ProgressError::invalid(field, why));
    }
    Ok(T::from(value))
}

/// A JSON object from the wire, within the one nesting rule.
fn object(
    field: &'static str,
    s: Option<prost_types::Struct>,
) -> Result<Map<String, Value>, ProgressError> {
    match s {
        Some(s) if struct_depth(&s) > MAX_DEPTH => Err(too_deep(field)),
        Some(s) => Ok(struct_to_object(s)),
        None => Ok(Map::new()),
    }
}

/// A JSON value from the wire, within the one nesting rule.
fn json(field: &'static str, v: Option<prost_types::Value>) -> Result<Value, ProgressError> {
    match v {
        Some(v) => match streamer_api::json::unusable(&v) {
            Some(why) => Err(ProgressError::invalid(field, why)),
            None => Ok(from_proto(v)),
        },
        None => Ok(Value::Null),
    }
}

fn too_deep(field: &'static str) -> ProgressError {
    ProgressError::invalid(
        field,
        format!("nests arrays and objects deeper than {MAX_DEPTH} levels"),
    )
}

/// The identity a caller scopes a lookup to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub tenant_id: TenantId,
    pub user_id: UserId,
}

impl Owner {
    pub(crate) fn owns(&self, record: &RequestRecord) -> bool {
        self.tenant_id == record.tenant_id && self.user_id == record.user_id
    }
}

impl TryFrom<v1::Identity> for Owner {
    type Error = ProgressError;
    fn try_from(identity: v1::Identity) -> Result<Self, Self::Error> {
        Ok(Self {
            user_id: name("owner.user_id", identity.user_id)?,
            tenant_id: optional_name("owner.tenant_id", identity.tenant_id)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Submit {
    pub connection_id: ConnectionId,
    pub action: String,
    /// The client's id; `None` when the client gave none.
    pub request_id: Option<ClientRequestId>,
    pub payload: Value,
    pub metadata: Map<String, Value>,
}

impl TryFrom<v1::SubmitRequest> for Submit {
    type Error = ProgressError;
    fn try_from(r: v1::SubmitRequest) -> Result<Self, Self::Error> {
        let request_id: ClientRequestId = optional_name("request_id", r.request_id)?;
        Ok(Self {
            connection_id: name("connection_id", r.connection_id)?,
            action: name("action", r.action)?,
            request_id: (!request_id.is_empty()).then_some(request_id),
            payload: json("payload", r.payload)?,
            metadata: object("metadata", r.metadata)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Claim {
    pub processor_id: String,
    pub actions: Vec<String>,
    pub max_in_flight: usize,
    /// `None`: the server's default lease.
    pub lease: Option<Duration>,
}

impl TryFrom<v1::ClaimRequest> for Claim {
    type Error = ProgressError;
    fn try_from(r: v1::ClaimRequest) -> Result<Self, Self::Error> {
        if r.actions.is_empty() {
            return Err(ProgressError::invalid(
                "actions",
                "at least one is required",
            ));
        }
        if r.actions.len() > MAX_ACTIONS {
            return Err(ProgressError::invalid(
                "actions",
                format!("at most {MAX_ACTIONS} are allowed"),
            ));
        }
        // In the order declared, each once (at most MAX_ACTIONS: cheap).
        let mut actions: Vec<String> = Vec::with_capacity(r.actions.len());
        for action in r.actions {
            let action = name("actions", action)?;
            if !actions.contains(&action) {
                actions.push(action);
            }
        }
        if r.max_in_flight > MAX_IN_FLIGHT {
            return Err(ProgressError::invalid(
                "max_in_flight",
                format!("must be at most {MAX_IN_FLIGHT}"),
            ));
        }
        if r.lease_seconds > MAX_LEASE_SECONDS {
            return Err(ProgressError::invalid(
                "lease_seconds",
                format!("must be 1..={MAX_LEASE_SECONDS} (0 for the default)"),
            ));
        }
        Ok(Self {
            processor_id: name("processor_id", r.processor_id)?,
            actions,
            max_in_flight: r.max_in_flight.max(1) as usize,
            lease: (r.lease_seconds > 0).then(|| Duration::from_secs(u64::from(r.lease_seconds))),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub id: RequestId,
    pub processor_id: String,
    pub percentage: f64,
    pub message: String,
    pub metadata: Map<String, Value>,
}

impl TryFrom<v1::ReportRequest> for Report {
    type Error = ProgressError;
    fn try_from(r: v1::ReportRequest) -> Result<Self, Self::Error> {
        // The negated range check also refuses NaN.
        if !(0.0..=100.0).contains(&r.percentage) {
            return Err(ProgressError::invalid("percentage", "must be 0..=100"));
        }
        Ok(Self {
            id: name("id", r.id)?,
            processor_id: name("processor_id", r.processor_id)?,
            percentage: r.percentage,
            message: r.message,
            metadata: object("metadata", r.metadata)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Complete {
    pub id: RequestId,
    pub processor_id: String,
    pub result: Value,
}

/// Why a progress report was refused; the `Report` stream goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotFound,
    AlreadyFinished,
    LeaseNotHeld,
}

impl From<Refused> for v1::ReportRejectionReason {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::NotFound => Self::NotFound,
            Refused::AlreadyFinished => Self::AlreadyFinished,
            Refused::LeaseNotHeld => Self::LeaseNotHeld,
        }
    }
}

impl TryFrom<v1::CompleteRequest> for Complete {
    type Error = ProgressError;
    fn try_from(r: v1::CompleteRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            id: name("id", r.id)?,
            processor_id: name("processor_id", r.processor_id)?,
            result: json("result", r.result)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Fail {
    pub id: RequestId,
    pub processor_id: String,
    pub error: RequestError,
    pub retryable: bool,
}

impl TryFrom<v1::FailRequest> for Fail {
    type Error = ProgressError;
    fn try_from(r: v1::FailRequest) -> Result<Self, Self::Error> {
        let error = r.error.unwrap_or_default();
        Ok(Self {
            id: name("id", r.id)?,
            processor_id: name("processor_id", r.processor_id)?,
            error: RequestError {
                code: if error.code.is_empty() {
                    "PROCESSING_FAILED".to_owned()
                } else {
                    error.code
                },
                message: if error.message.is_empty() {
                    "processing failed".to_owned()
                } else {
                    error.message
                },
                details: object("error.details", error.details)?,
            },
            retryable: r.retryable,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Cancel {
    pub id: RequestId,
    pub reason: String,
    pub owner: Option<Owner>,
}

impl TryFrom<v1::CancelRequest> for Cancel {
    type Error = ProgressError;
    fn try_from(r: v1::CancelRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            id: name("id", r.id)?,
            reason: r.reason,
            owner: r.owner.map(Owner::try_from).transpose()?,
        })
    }
}

/// How a caller names a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Id(RequestId),
    Client {
        tenant_id: TenantId,
        user_id: UserId,
        request_id: ClientRequestId,
    },
}

#[derive(Debug, Clone)]
pub struct Lookup {
    pub selector: Selector,
    pub owner: Option<Owner>,
    /// Resume delivery on this connection.
    pub deliver_to: Option<ConnectionId>,
}

impl TryFrom<v1::GetRequest> for Lookup {
    type Error = ProgressError;
    fn try_from(r: v1::GetRequest) -> Result<Self, Self::Error> {
        let selector = match r.selector {
            Some(v1::get_request::Selector::Id(id)) => Selector::Id(name("id", id)?),
            Some(v1::get_request::Selector::Client(c)) => Selector::Client {
                tenant_id: optional_name("client.tenant_id", c.tenant_id)?,
                user_id: name("client.user_id", c.user_id)?,
                request_id: name("client.request_id", c.request_id)?,
            },
            None => {
                return Err(ProgressError::invalid(
                    "selector",
                    "id or client is required",
                ));
            }
        };
        let deliver_to: ConnectionId =
            optional_name("deliver_to_connection_id", r.deliver_to_connection_id)?;
        Ok(Self {
            selector,
            owner: r.owner.map(Owner::try_from).transpose()?,
            deliver_to: (!deliver_to.is_empty()).then_some(deliver_to),
        })
    }
}

impl TryFrom<v1::WatchRequest> for Lookup {
    type Error = ProgressError;
    /// A watch names its request as `Get` does, and never moves delivery.
    fn try_from(r: v1::WatchRequest) -> Result<Self, Self::Error> {
        use v1::get_request::Selector as Get;
        use v1::watch_request::Selector as Watch;
        Self::try_from(v1::GetRequest {
            selector: r.selector.map(|selector| match selector {
                Watch::Id(id) => Get::Id(id),
                Watch::Client(client) => Get::Client(client),
            }),
            owner: r.owner,
            deliver_to_connection_id: String::new(),
        })
    }
}

pub(crate) fn status_to_proto(status: RequestStatus) -> v1::RequestStatus {
    match status {
        RequestStatus::Pending => v1::RequestStatus::Pending,
        RequestStatus::Processing => v1::RequestStatus::Processing,
        RequestStatus::Completed => v1::RequestStatus::Completed,
        RequestStatus::Failed => v1::RequestStatus::Failed,
        RequestStatus::Cancelled => v1::RequestStatus::Cancelled,
    }
}

/// A stored request as the wire shows it.
pub(crate) fn request_to_proto(r: RequestRecord) -> v1::Request {
    v1::Request {
        id: r.id.into(),
        request_id: r.client_request_id.into(),
        identity: Some(v1::Identity {
            user_id: r.user_id.into(),
            tenant_id: r.tenant_id.into(),
            permissions: Vec::new(),
            topics: Vec::new(),
        }),
        connection_id: r.connection_id.into(),
        action: r.action,
        payload: Some(to_proto(r.payload)),
        metadata: Some(object_to_struct(r.metadata)),
        status: status_to_proto(r.status) as i32,
        attempts: r.attempts,
        progress: r.progress.map(|p| v1::Progress {
            percentage: p.percentage,
            message: p.message,
            metadata: Some(object_to_struct(p.metadata)),
            updated_at: Some(timestamp(p.updated_at_ms)),
            sequence: p.sequence,
        }),
        result: r.result.map(to_proto),
        error: r.error.map(|e| v1::RequestError {
            code: e.code,
            message: e.message,
            details: Some(object_to_struct(e.details)),
        }),
        created_at: Some(timestamp(r.created_at_ms)),
        updated_at: Some(timestamp(r.updated_at_ms)),
        processor_id: r.processor_id.unwrap_or_default(),
        lease_expires_at: r.lease_expires_at_ms.map(timestamp),
        sequence: r.sequence,
        trace_context: r.trace_context,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_defaults_and_limits() {
        let claim = Claim::try_from(v1::ClaimRequest {
            processor_id: "p".into(),
            actions: vec!["a".into()],
            max_in_flight: 0,
            lease_seconds: 0,
        })
        .unwrap();
        assert_eq!(claim.max_in_flight, 1);
        assert_eq!(claim.lease, None);

        for bad in [
            v1::ClaimRequest {
                processor_id: String::new(),
                actions: vec!["a".into()],
                ..Default::default()
            },
            v1::ClaimRequest {
                processor_id: "p".into(),
                actions: vec![],
                ..Default::default()
            },
            v1::ClaimRequest {
                processor_id: "p".into(),
                actions: vec!["a".into()],
                lease_seconds: 3601,
                ..Default::default()
            },
            v1::ClaimRequest {
                processor_id: "p".into(),
                actions: vec!["a".into()],
                max_in_flight: 1001,
                ..Default::default()
            },
        ] {
            let err = Claim::try_from(bad).unwrap_err();
            assert!(
                matches!(err, ProgressError::InvalidArgument { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn report_percentage_must_be_in_range() {
        for pct in [-0.5, 100.5, f64::NAN] {
            let err = Report::try_from(v1::ReportRequest {
                id: "r".into(),
                processor_id: "p".into(),
                percentage: pct,
                ..Default::default()
            })
            .unwrap_err();
            assert!(matches!(
                err,
                ProgressError::InvalidArgument {
                    field: "percentage",
                    ..
                }
            ));
        }
    }

    #[test]
    fn submit_refuses_nul_in_request_id_and_empties_become_none() {
        let err = Submit::try_from(v1::SubmitRequest {
            connection_id: "c".into(),
            action: "a".into(),
            request_id: "x\0y".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(
            err,
            ProgressError::InvalidArgument {
                field: "request_id",
                ..
            }
        ));
        let ok = Submit::try_from(v1::SubmitRequest {
            connection_id: "c".into(),
            action: "a".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.request_id, None);
        assert_eq!(ok.payload, Value::Null);
    }

    #[test]
    fn an_unset_value_is_refused_not_taken_as_null() {
        let unset = || Some(prost_types::Value { kind: None });
        let error = Complete::try_from(v1::CompleteRequest {
            id: "r1".into(),
            processor_id: "p".into(),
            result: unset(),
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("result"), "{error}");
        assert!(error.contains("no kind set"), "{error}");
        let error = Submit::try_from(v1::SubmitRequest {
            connection_id: "c".into(),
            action: "a".into(),
            payload: unset(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("payload"), "{error}");
        // Absent is null; `null_value` is null.
        let null = Complete::try_from(v1::CompleteRequest {
            id: "r1".into(),
            processor_id: "p".into(),
            result: Some(streamer_api::json::to_proto(Value::Null)),
        })
        .unwrap();
        assert_eq!(null.result, Value::Null);
    }
}
