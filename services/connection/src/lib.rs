//! ConnectionService: the registry of every open WebSocket connection, the
//! engine that delivers to them, and the router of what clients send.
//!
//! Layout:
//! - [`model`]: validation of every request on its way in (`TryFrom`).
//! - [`edges`]: the attached edges and the deliveries in flight to them.
//! - [`edge_stream`]: each edge's Attach stream, its announcements and its
//!   liveness lease.
//! - [`identities`]: AuthService's word on every connection an edge
//!   announces.
//! - [`routers`]: the routers listening on `Receive`, by action.
//! - [`service`]: the service's configuration and shared state.
//! - [`registry`]: finding connections within what a caller may reach.
//! - [`delivery`]: how payloads reach sockets, behind one interface.
//! - [`inbound`]: routing what clients send.
//! - [`topics`]: subscriptions, publishing, and bringing subscribers up to
//!   date from a topic's history.
//! - [`grpc`]: the thin tonic adapter.
//!
//! Invariants: a connection record exists only for a socket an edge holds
//! (edges announce sockets only after AuthService accepted their token,
//! which this service has AuthService check again unless its trust mode is
//! none, and records are removed when the socket or its edge goes); identity always
//! comes from that record, never from a frame; a call scoped to a tenant
//! only ever reaches that tenant's connections.

#![forbid(unsafe_code)]

pub mod apigateway;
pub mod delivery;
pub mod edge_stream;
pub mod edges;
pub mod error;
pub mod grpc;
pub mod identities;
pub mod inbound;
pub mod model;
pub mod registry;
pub mod routers;
pub mod service;
pub mod topics;

pub use error::ConnectionError;
pub use service::{BUILTIN_ACTIONS, ConnectionConfig, ConnectionServer};
pub use topics::TopicsConfig;
