//! What every Streamer service shares.
//!
//! - [`ids`]: the identifiers (connections, edges, tenants, users, requests),
//!   one type each.
//! - [`store`]: the storage interface and its embedded (redb) backend.
//! - [`grpc`]: serving a tonic service with health, reflection and graceful
//!   shutdown, the same way in every process.
//! - [`telemetry`]: structured logs and the Prometheus endpoint.
//! - [`metrics`]: the catalogue of every metric family; [`grpc_metrics`],
//!   the gRPC servers' metrics per method and code.
//! - [`shutdown`]: the one future that says "stop".
//! - [`topics`]: topic names, subscription patterns, the subscriber's message.
//! - [`trust`]: caller authentication and which role may call what.
//!
//! Invariant: nothing here knows about a particular service; services depend
//! on this crate, never the other way around.

#![forbid(unsafe_code)]

pub mod client;
pub mod grpc;
pub mod grpc_metrics;
pub mod ids;
pub mod metrics;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topics;
pub mod trace;
pub mod trust;

/// A timestamp for the wire from the store's milliseconds.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}
