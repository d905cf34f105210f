//! Compiles the protobuf API with protox, a pure-Rust compiler, so building
//! needs no system `protoc`, and keeps the descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/billing/coordinator/v1/coordinator.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds the migrations at compile time; without this a
    // new migration file would not reach an incremental build.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("coordinator_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
