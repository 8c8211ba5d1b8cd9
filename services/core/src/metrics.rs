//! Every metric family Streamer exports, named once.
//!
//! The [`FAMILIES`] table is the catalogue: each family's name, type, HELP
//! text, labels and the roles that export it. Code records through the
//! `metrics` macros with these names; [`register`], called as a role starts,
//! describes the role's families (so `/metrics` carries `# HELP` and
//! `# TYPE`) and creates every series whose label values are known in
//! advance at 0, so a rate or an alert works before the first event.
//! `streamer metrics` prints the table; the chart's alerts and dashboard are
//! checked against it.
//!
//! Conventions (Prometheus'): a unit in the name (`_seconds`, `_bytes`),
//! `_total` on counters and only on counters, durations as histograms in
//! seconds with the buckets of [`DURATION_BUCKETS`], label values in
//! snake_case from bounded sets (never an id). Two families take their label
//! values from what the process serves rather than from this table: the
//! gRPC server's (one series per method it serves, see
//! [`crate::grpc_metrics`]) and the store's (one per operation of its
//! backend, see [`crate::store::Instrumented`]); both are created at 0 by
//! their owners.

use metrics::Unit;

/// What exports a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Auth,
    Connection,
    Progress,
    Gateway,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Auth, Role::Connection, Role::Progress, Role::Gateway];

    pub fn name(self) -> &'static str {
        match self {
            Role::Auth => "auth",
            Role::Connection => "connection",
            Role::Progress => "progress",
            Role::Gateway => "gateway",
        }
    }
}

/// A family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A label and every value it takes; no values: they are the served
/// methods or the store's operations, created by their owners.
#[derive(Debug)]
pub struct Label {
    pub name: &'static str,
    pub values: &'static [&'static str],
}

/// One metric family.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [Label],
    pub roles: &'static [Role],
    /// Described and recorded by another crate (the process metrics): only
    /// listed here.
    pub external: bool,
}

/// Histogram buckets for every `_seconds` family: 0.5 ms to 10 s, dense
/// where a send, a store call or a gRPC call usually falls.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const fn label(name: &'static str, values: &'static [&'static str]) -> Label {
    Label { name, values }
}

const fn family(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    labels: &'static [Label],
    roles: &'static [Role],
) -> Family {
    Family {
        name,
        kind,
        help,
        labels,
        roles,
        external: false,
    }
}

const fn process(name: &'static str, kind: Kind, help: &'static str) -> Family {
    Family {
        name,
        kind,
        help,
        labels: &[],
        roles: &Role::ALL,
        external: true,
    }
}

use Kind::{Counter, Gauge, Histogram};
use Role::{Auth, Connection, Gateway, Progress};

const GRPC_SERVERS: &[Role] = &[Auth, Connection, Progress];

// Label value sets shared by several families.
pub const DELIVERY_OUTCOMES: &[&str] = &[
    "delivered",
    "not_found",
    "gone",
    "throttled",
    "unavailable",
    "rejected",
];
pub const FANOUT_SELECTORS: &[&str] = &["tenant", "user", "topic"];
pub const TOKEN_FAILURES: &[&str] = &[
    "missing",
    "malformed",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "tenant_not_allowed",
    "unsupported_algorithm",
    "unknown_key",
    "missing_claim",
    "revoked",
    "invalid",
];
pub const EDGE_AUTH_FAILURES: &[&str] = &[
    "missing_token",
    "token_expired",
    "tenant_not_allowed",
    "token_revoked",
    "invalid_token",
    "auth_unavailable",
];
pub const PROGRESS_KINDS: &[&str] = &["acknowledgment", "progress", "final"];
pub const FINAL_STATUSES: &[&str] = &["completed", "failed", "cancelled"];
pub const GRPC_CODES: &[&str] = &[
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// The catalogue.
pub const FAMILIES: &[Family] = &[
    // ---- every role ----
    family(
        "streamer_build_info",
        Gauge,
        "Always 1; its labels name the running build.",
        &[label("version", &[])],
        &Role::ALL,
    ),
    process(
        "process_cpu_seconds_total",
        Counter,
        "Total user and system CPU time spent in seconds.",
    ),
    process(
        "process_resident_memory_bytes",
        Gauge,
        "Resident memory size in bytes.",
    ),
    process(
        "process_virtual_memory_bytes",
        Gauge,
        "Virtual memory size in bytes.",
    ),
    process(
        "process_virtual_memory_max_bytes",
        Gauge,
        "Maximum amount of virtual memory available in bytes.",
    ),
    process(
        "process_open_fds",
        Gauge,
        "Number of open file descriptors.",
    ),
    process(
        "process_max_fds",
        Gauge,
        "Maximum number of open file descriptors.",
    ),
    process(
        "process_start_time_seconds",
        Gauge,
        "Start time of the process since unix epoch in seconds.",
    ),
    process(
        "process_threads",
        Gauge,
        "Number of OS threads in the process.",
    ),
    // ---- gRPC servers (AuthService, ConnectionService, ProgressService) ----
    family(
        "streamer_grpc_server_handled_total",
        Counter,
        "gRPC calls finished, by method and status code (a streaming call counts when its stream ends).",
        &[
            label("service", &[]),
            label("method", &[]),
            label("code", GRPC_CODES),
        ],
        GRPC_SERVERS,
    ),
    family(
        "streamer_grpc_server_handling_seconds",
        Histogram,
        "Time from a gRPC call's arrival to its end (a streaming call's whole life).",
        &[label("service", &[]), label("method", &[])],
        GRPC_SERVERS,
    ),
    family(
        "streamer_grpc_refused_total",
        Counter,
        "gRPC calls refused before reaching a service: no or a bad credential, or a role not allowed to call the method.",
        &[label("code", &["unauthenticated", "permission_denied"])],
        GRPC_SERVERS,
    ),
    family(
        "streamer_grpc_tls_handshake_failures_total",
        Counter,
        "TLS handshakes with gRPC callers that failed.",
        &[],
        GRPC_SERVERS,
    ),
    // ---- the store ----
    family(
        "streamer_store_operation_duration_seconds",
        Histogram,
        "Time a store operation took, by backend and operation.",
        &[label("backend", &[]), label("operation", &[])],
        GRPC_SERVERS,
    ),
    family(
        "streamer_store_errors_total",
        Counter,
        "Store operations that failed (a lost conditional write is an answer, not an error), by backend and operation.",
        &[label("backend", &[]), label("operation", &[])],
        GRPC_SERVERS,
    ),
    family(
        "streamer_dynamodb_calls_total",
        Counter,
        "DynamoDB API calls, each billed (a call's SDK retries count once), by API operation and outcome.",
        &[label("operation", &[]), label("outcome", &["ok", "error"])],
        GRPC_SERVERS,
    ),
    // ---- AuthService ----
    family(
        "streamer_auth_validations_total",
        Counter,
        "Tokens AuthService checked, by result.",
        &[label("result", &["valid", "refused"])],
        &[Auth],
    ),
    family(
        "streamer_auth_failures_total",
        Counter,
        "Tokens AuthService refused, by reason.",
        &[label("reason", TOKEN_FAILURES)],
        &[Auth],
    ),
    family(
        "streamer_auth_revocations_total",
        Counter,
        "Tokens put on the deny-list.",
        &[],
        &[Auth],
    ),
    // ---- ConnectionService ----
    family(
        "streamer_connections_opened_total",
        Counter,
        "Connections recorded as their edges announced them.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_connections_closed_total",
        Counter,
        "Connections removed as their edges reported them closed.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_deliveries_total",
        Counter,
        "Messages for one connection each, by outcome.",
        &[label("outcome", DELIVERY_OUTCOMES)],
        &[Connection],
    ),
    family(
        "streamer_send_duration_seconds",
        Histogram,
        "Time from a targeted send (Send, a broadcast to listed connections, a request's message) to the edges' reports.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_fanouts_total",
        Counter,
        "Fan-outs (a broadcast to a user or a tenant, a topic publish), by selector.",
        &[label("selector", FANOUT_SELECTORS)],
        &[Connection],
    ),
    family(
        "streamer_fanout_duration_seconds",
        Histogram,
        "Time from a fan-out's start to every edge's count, by selector.",
        &[label("selector", FANOUT_SELECTORS)],
        &[Connection],
    ),
    family(
        "streamer_delivery_report_timeouts_total",
        Counter,
        "Deliveries an edge did not report in time.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_edges_attached",
        Gauge,
        "Edges with a stream to this ConnectionService.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_edges_lapsed_total",
        Counter,
        "Edges whose lease lapsed, their connections removed.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_inbound_frames_total",
        Counter,
        "Client frames routed.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_inbound_queue_depth",
        Gauge,
        "Client frames waiting to be routed.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_inbound_rejected_total",
        Counter,
        "Client frames answered RATE_LIMITED, by reason (the inbound queue full, or every router of the action busy).",
        &[label("reason", &["overloaded", "busy"])],
        &[Connection],
    ),
    family(
        "streamer_subscriptions_total",
        Counter,
        "Topic subscriptions made.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_subscriptions_refused_total",
        Counter,
        "Topic subscriptions refused.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_topic_messages_total",
        Counter,
        "Messages published to topics.",
        &[],
        &[Connection],
    ),
    family(
        "streamer_apigateway_posts_total",
        Counter,
        "Posts to API Gateway's connections, by outcome.",
        &[label(
            "outcome",
            &[
                "delivered",
                "gone",
                "rejected",
                "unavailable",
                "too_large",
                "breaker_open",
            ],
        )],
        &[Connection],
    ),
    family(
        "streamer_apigateway_breaker_opened_total",
        Counter,
        "Times a connection's breaker opened after failed posts.",
        &[],
        &[Connection],
    ),
    // ---- ProgressService ----
    family(
        "streamer_progress_requests_submitted_total",
        Counter,
        "Requests submitted.",
        &[],
        &[Progress],
    ),
    family(
        "streamer_progress_requests_dispatched_total",
        Counter,
        "Requests handed to a processor.",
        &[],
        &[Progress],
    ),
    family(
        "streamer_progress_requests_finished_total",
        Counter,
        "Requests that reached a final status, by status.",
        &[label("status", FINAL_STATUSES)],
        &[Progress],
    ),
    family(
        "streamer_progress_queue_depth",
        Gauge,
        "Requests this replica tracks, by state: waiting for a processor, or held by one.",
        &[label("state", &["pending", "processing"])],
        &[Progress],
    ),
    family(
        "streamer_progress_leases_lapsed_total",
        Counter,
        "Processor leases that lapsed, their requests queued again or failed.",
        &[],
        &[Progress],
    ),
    family(
        "streamer_progress_processors",
        Gauge,
        "Processor sessions claiming work from this replica.",
        &[],
        &[Progress],
    ),
    family(
        "streamer_progress_delivered_total",
        Counter,
        "Messages of requests delivered to their clients, by kind.",
        &[label("kind", PROGRESS_KINDS)],
        &[Progress],
    ),
    family(
        "streamer_progress_coalesced_total",
        Counter,
        "Progress updates replaced by a newer one before they were sent.",
        &[],
        &[Progress],
    ),
    family(
        "streamer_progress_dropped_total",
        Counter,
        "Messages of requests not delivered (the connection gone or unreachable), by kind.",
        &[label("kind", PROGRESS_KINDS)],
        &[Progress],
    ),
    // ---- the WebSocket edge ----
    family(
        "streamer_gateway_connections",
        Gauge,
        "Client sockets on this edge, by state: being authenticated and announced, or open.",
        &[label("state", &["opening", "open"])],
        &[Gateway],
    ),
    family(
        "streamer_gateway_connections_refused_total",
        Counter,
        "Client sockets refused before authentication, by reason.",
        &[label(
            "reason",
            &["capacity", "address_rate", "handshakes", "origin"],
        )],
        &[Gateway],
    ),
    family(
        "streamer_gateway_auth_failures_total",
        Counter,
        "Clients refused by the edge's token check, by reason.",
        &[label("reason", EDGE_AUTH_FAILURES)],
        &[Gateway],
    ),
    family(
        "streamer_gateway_frames_total",
        Counter,
        "Client frames accepted and handed to ConnectionService.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_frames_refused_total",
        Counter,
        "Client frames refused, by reason.",
        &[label("reason", &["invalid", "rate_limited"])],
        &[Gateway],
    ),
    family(
        "streamer_gateway_slow_consumer_closes_total",
        Counter,
        "Sockets closed (1008) because their outbound queue was full.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_rate_limit_closes_total",
        Counter,
        "Sockets closed for sending too many frames.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_expired_closes_total",
        Counter,
        "Sockets closed because their token expired.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_idle_closes_total",
        Counter,
        "Sockets closed for not answering pings.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_token_refreshes_total",
        Counter,
        "Tokens refreshed on open sockets.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_conflated_total",
        Counter,
        "Messages of conflated topics replaced by a newer one before they were written.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_duplicates_dropped_total",
        Counter,
        "Sequenced messages already written, dropped.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_sequence_streams_forgotten_total",
        Counter,
        "Sequenced streams forgotten for lack of room.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_accept_errors_total",
        Counter,
        "TCP accepts that failed (such as running out of file descriptors).",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_gateway_silent_connections_closed_total",
        Counter,
        "TCP connections closed for sending no request in time.",
        &[],
        &[Gateway],
    ),
    family(
        "streamer_apigateway_requests_refused_total",
        Counter,
        "Calls to the API Gateway integration refused for a bad or missing secret.",
        &[],
        &[Gateway],
    ),
];

/// The family named `name`.
pub fn family_named(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// Describes the families of `roles` and creates, at 0, every series whose
/// label values the catalogue lists; sets `streamer_build_info`. Safe to
/// call again (for each role of a process that runs several). Installs the
/// process's recorder first if nothing has yet (see [`touch`]).
pub fn register(roles: &[Role]) {
    crate::telemetry::metrics_recorder();
    for family in FAMILIES
        .iter()
        .filter(|f| !f.external && f.roles.iter().any(|r| roles.contains(r)))
    {
        describe(family);
        if family.labels.iter().all(|l| !l.values.is_empty()) {
            for labels in combinations(family.labels) {
                touch(family, labels);
            }
        }
    }
    metrics::gauge!("streamer_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

fn describe(family: &Family) {
    let unit = if family.name.ends_with("_seconds") {
        Some(Unit::Seconds)
    } else {
        None
    };
    match (family.kind, unit) {
        (Counter, _) => metrics::describe_counter!(family.name, family.help),
        (Gauge, _) => metrics::describe_gauge!(family.name, family.help),
        (Histogram, Some(unit)) => metrics::describe_histogram!(family.name, unit, family.help),
        (Histogram, None) => metrics::describe_histogram!(family.name, family.help),
    }
}

/// Creates one series at 0 (a histogram with no observation). The
/// process's recorder is installed first: a series created before it would
/// be created in nothing, and appear only with its first event.
pub(crate) fn touch(family: &Family, labels: Vec<metrics::Label>) {
    crate::telemetry::metrics_recorder();
    match family.kind {
        Counter => {
            let _ = metrics::counter!(family.name, labels);
        }
        Gauge => {
            let _ = metrics::gauge!(family.name, labels);
        }
        Histogram => {
            let _ = metrics::histogram!(family.name, labels);
        }
    }
}

/// Every combination of the labels' values (one empty set for no labels).
fn combinations(labels: &[Label]) -> Vec<Vec<metrics::Label>> {
    labels.iter().fold(vec![Vec::new()], |sets, label| {
        sets.into_iter()
            .flat_map(|set| {
                label.values.iter().map(move |value| {
                    let mut set = set.clone();
                    set.push(metrics::Label::new(label.name, *value));
                    set
                })
            })
            .collect()
    })
}

/// A gRPC status code as a label value.
pub fn grpc_code(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// A delivery's outcome as a label value.
pub fn delivery_outcome(outcome: streamer_api::v1::DeliveryOutcome) -> &'static str {
    use streamer_api::v1::DeliveryOutcome;
    match outcome {
        DeliveryOutcome::Delivered => "delivered",
        DeliveryOutcome::NotFound => "not_found",
        DeliveryOutcome::Gone => "gone",
        DeliveryOutcome::Throttled => "throttled",
        // An outcome never set is a delivery that did not happen.
        DeliveryOutcome::Unavailable | DeliveryOutcome::Unspecified => "unavailable",
        DeliveryOutcome::Rejected => "rejected",
    }
}

/// Why AuthService refused a token, as a label value.
pub fn token_failure(failure: streamer_api::v1::TokenFailure) -> &'static str {
    use streamer_api::v1::TokenFailure;
    match failure {
        TokenFailure::Missing => "missing",
        TokenFailure::Malformed => "malformed",
        TokenFailure::BadSignature => "bad_signature",
        TokenFailure::Expired => "expired",
        TokenFailure::NotYetValid => "not_yet_valid",
        TokenFailure::WrongIssuer => "wrong_issuer",
        TokenFailure::WrongAudience => "wrong_audience",
        TokenFailure::TenantNotAllowed => "tenant_not_allowed",
        TokenFailure::UnsupportedAlgorithm => "unsupported_algorithm",
        TokenFailure::UnknownKey => "unknown_key",
        TokenFailure::MissingClaim => "missing_claim",
        TokenFailure::Revoked => "revoked",
        TokenFailure::Unspecified => "invalid",
    }
}

/// The catalogue as text, one family a line: name, type, labels
/// (comma-separated, each with its values when the catalogue lists them:
/// `outcome=delivered|gone`), roles (comma-separated), HELP; fields
/// separated by tabs. What `streamer metrics` prints.
pub fn catalogue_text() -> String {
    FAMILIES
        .iter()
        .map(|f| {
            let labels: Vec<String> = f
                .labels
                .iter()
                .map(|l| match l.values {
                    [] => l.name.to_owned(),
                    values => format!("{}={}", l.name, values.join("|")),
                })
                .collect();
            let roles: Vec<&str> = f.roles.iter().map(|r| r.name()).collect();
            format!(
                "{}\t{}\t{}\t{}\t{}\n",
                f.name,
                f.kind.name(),
                labels.join(","),
                roles.join(","),
                f.help
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn snake_case(s: &str) -> bool {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            assert!(seen.insert(f.name), "{} twice", f.name);
            assert!(snake_case(f.name), "{}", f.name);
            assert!(!f.help.is_empty(), "{} has no HELP", f.name);
            assert_eq!(
                f.kind == Counter,
                f.name.ends_with("_total"),
                "{}: `_total` is for counters only",
                f.name
            );
            if f.kind == Histogram {
                assert!(f.name.ends_with("_seconds"), "{}: a unit", f.name);
            }
            for l in f.labels {
                assert!(snake_case(l.name), "{}: {}", f.name, l.name);
                for v in l.values {
                    assert!(snake_case(v), "{}{{{}={v:?}}}", f.name, l.name);
                }
            }
        }
    }

    #[test]
    fn registered_families_render_with_help_type_and_zeroes() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(DURATION_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || register(&Role::ALL));
        let text = handle.render();
        for f in FAMILIES.iter().filter(|f| !f.external) {
            let known = f.labels.iter().all(|l| !l.values.is_empty());
            if !known && f.name != "streamer_build_info" {
                continue;
            }
            assert!(
                text.contains(&format!("# HELP {} ", f.name)),
                "{}:\n{text}",
                f.name
            );
            assert!(
                text.contains(&format!("# TYPE {} {}", f.name, f.kind.name())),
                "{}",
                f.name
            );
        }
        assert!(text.contains("streamer_deliveries_total{outcome=\"throttled\"} 0"));
        assert!(text.contains(
            "streamer_fanout_duration_seconds_bucket{selector=\"topic\",le=\"0.005\"} 0"
        ));
        assert!(text.contains("streamer_build_info{version=\""));
    }
}
