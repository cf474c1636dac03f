//! Compiles the .proto files with protox (pure Rust), so no system `protoc` is needed.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/eventter/v1/admin.proto",
        "proto/eventter/v1/messaging.proto",
        "proto/eventter/internal/v1/internal.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection (grpcurl works without .proto files).
    std::fs::write(out.join("eventter_descriptor.bin"), fds.encode_to_vec())?;
    // What reflection shows clients: everything but the node-to-node service, which
    // only cluster members may call (and so need not discover).
    let mut client_fds = fds.clone();
    client_fds.file.retain(|f| f.package() != "eventter.internal.v1");
    std::fs::write(out.join("eventter_client_descriptor.bin"), client_fds.encode_to_vec())?;
    // Payloads as `Bytes`: records move between files, replicas and clients without copies.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".eventter.v1.Message.data")
        .compile_fds(client_fds)?;
    // The node-to-node service with small first buffers (`src/codec.rs`): a node keeps
    // a replication stream open per open segment it is primary or replica of.
    let mut internal_fds = fds;
    internal_fds.file.retain(|f| f.package() == "eventter.internal.v1");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".eventter.internal.v1.Record.payload")
        .codec_path("crate::codec::NodeCodec")
        .compile_fds(internal_fds)?;
    Ok(())
}
