//! Compiles the `.proto` contract with protox (pure Rust, no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["wsgw/v1/link.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Payloads become `bytes::Bytes`, so they pass through without copies.
    config.bytes(["."]);
    config.compile_fds(descriptors)?;
    Ok(())
}
