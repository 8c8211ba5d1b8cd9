//! Compiles `proto/streamer/v1/*.proto` with protox (pure Rust, no system
//! `protoc`) and generates the tonic clients and servers from the result.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "streamer/v1/common.proto",
    "streamer/v1/auth.proto",
    "streamer/v1/connection.proto",
    "streamer/v1/edge.proto",
    "streamer/v1/progress.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("streamer_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::StreamerCodec")
        .compile_fds(fds)?;
    Ok(())
}
