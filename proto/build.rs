//! Compiles `distcache/v1/*.proto` with protox (a pure-Rust protobuf compiler, so no system `protoc` is needed)
//! and generates the tonic client and server code plus the file descriptor set served by gRPC reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["distcache/v1/cache.proto", "distcache/v1/peer.proto"];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("distcache_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().bytes(".distcache.v1").compile_fds(fds)?;
    Ok(())
}
