//! Compiles the `.proto` contract with protox (pure Rust, no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["wsgw/v1/link.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Payloads become `bytes::Bytes`, so they pass through without copies.
    config.bytes(["."]);
    // A hello is sent once per link; boxing it and a resume's open keeps
    // every `Frame` (and a link queue slot) small.
    config.boxed(".wsgw.v1.SessionResume.open");
    config.boxed(".wsgw.v1.Frame.body.hello");
    config.compile_fds(descriptors)?;
    Ok(())
}
