//! Compiles `proto/engage/v1/*.proto` with protox (pure Rust: no system `protoc`), generates the
//! tonic/prost code, and writes the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "engage/v1/common.proto",
    "engage/v1/events.proto",
    "engage/v1/schema.proto",
    "engage/v1/triggers.proto",
    "engage/v1/actions.proto",
    "engage/v1/query.proto",
    "engage/v1/destinations.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build 0.14 ignores emit_rerun_if_changed: say it ourselves.
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?
        .file_descriptor_set();

    // compile_fds does not write file_descriptor_set_path: write the bytes reflection serves.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("engage_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        // Decoding failures are INVALID_ARGUMENT, not INTERNAL (see src/api/codec.rs).
        .codec_path("crate::api::codec::StrictCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
