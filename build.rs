//! Compiles `proto/mosix/v1/*.proto` into Rust (tonic + prost) and a file
//! descriptor set for gRPC server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("mosix_v1_descriptor.bin"))
        // Image chunks: decoded as slices of the received buffer, not copied.
        .bytes(".mosix.v1.FileData.data")
        .bytes(".mosix.v1.PageStreamIn")
        .bytes(".mosix.v1.PageStreamOut")
        .compile_protos(
            &[
                "proto/mosix/v1/agent.proto",
                "proto/mosix/v1/balancer.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
