//! The `streamer.v1` API: the code generated from `proto/streamer/v1/*.proto`,
//! the file descriptor set that server reflection serves, and the conversions
//! between JSON and `google.protobuf.Value` that payloads need.
//!
//! This crate is used by every server, the gateway, the tests and the
//! benches. Keep it slim: no service logic lives here.

pub mod codec;
pub mod errors;
pub mod json;

/// Generated messages, clients and servers of package `streamer.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("streamer.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file, imports included,
/// for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/streamer_descriptor.bin"));

/// Full service names, as health checks and reflection know them.
pub mod service_names {
    pub const AUTH: &str = "streamer.v1.AuthService";
    pub const CONNECTION: &str = "streamer.v1.ConnectionService";
    pub const EDGE: &str = "streamer.v1.EdgeService";
    pub const PROGRESS: &str = "streamer.v1.ProgressService";
}
