//! Compiles `proto/` with protox (pure Rust, no system protoc) and generates
//! prost types plus tonic clients and servers into OUT_DIR.
//!
//! Two descriptor sets are written: the public API alone (what reflection
//! on a public port may show) and every file, internal services included
//! (for the internal listener).

use prost::Message as _;
use std::path::PathBuf;

const PUBLIC: [&str; 4] = [
    "natter/sessions/v1/sessions.proto",
    "natter/chats/v1/chats.proto",
    "natter/messages/v1/messages.proto",
    "natter/assistant/v1/assistant.proto",
];
const INTERNAL: [&str; 3] = [
    "natter/sessions/v1/sessions_internal.proto",
    "natter/chats/v1/chats_internal.proto",
    "natter/messages/v1/messages_internal.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for file in PUBLIC.iter().chain(&INTERNAL) {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let public = protox::compile(PUBLIC, [&root])?;
    std::fs::write(out.join("natter_public_descriptor.bin"), public.encode_to_vec())?;
    let all = protox::compile(PUBLIC.iter().chain(&INTERNAL), [&root])?;
    std::fs::write(out.join("natter_descriptor.bin"), all.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(all)?;
    Ok(())
}
