//! Generates the gRPC code and one file descriptor set (for reflection) from `proto/`.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine needs no system
//! package to build the workspace.

use std::{env, error::Error, path::PathBuf};

const PROTOS: &[&str] = &[
    "auth/v1/auth.proto",
    "profile/v1/profile.proto",
    "notes/v1/notes.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let well_known = protoc_bin_vendored::include_path()?;

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure()
        // RPCs a service has not implemented yet answer UNIMPLEMENTED, so services can grow
        // method by method.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("descriptor_set.bin"))
        .compile_with_config(config, &protos, &[root.clone(), well_known])?;
    Ok(())
}
