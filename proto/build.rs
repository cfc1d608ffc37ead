//! Compiles proto/ with the pure-Rust protox compiler (no system protoc) and writes the
//! descriptor set that server reflection serves.

use std::{env, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "interpose/common/v1/common.proto",
    "interpose/registry/v1/registry.proto",
    "interpose/intercept/v1/intercept.proto",
    "interpose/export/v1/export.proto",
    "interpose/ca/v1/ca.proto",
    "interpose/replay/v1/replay.proto",
    "interpose/registry/store/v1/store.proto",
];

/// Payload fields generated as `bytes::Bytes` rather than `Vec<u8>`: a payload then moves
/// from the relay through the reporter, gRPC and the registry by reference count, and a
/// decoded one is a slice of the received frame, not a copy.
const BYTES_FIELDS: &[&str] = &[
    ".interpose.common.v1.Packet",
    ".interpose.intercept.v1.Verdict.data",
    ".interpose.intercept.v1.ForwardRequest.data",
    ".interpose.export.v1.ExportChunk.data",
    ".interpose.registry.store.v1.StoredPacket",
    ".interpose.replay.v1.ServerData.data",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(FILES, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("interpose_descriptor.bin"), fds.encode_to_vec())?;
    let builder = BYTES_FIELDS
        .iter()
        .fold(tonic_prost_build::configure(), |b, path| b.bytes(path));
    builder
        .build_server(true)
        .build_client(true)
        // Malformed messages are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::ProstCodec")
        .compile_fds(fds)?;
    Ok(())
}
