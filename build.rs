//! Compiles the wire-contract protos in `proto/` with protox (pure Rust, no system `protoc`)
//! and generates prost messages plus tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/altar/adm/v1/adm.proto",
        "proto/altar/grid/v1/grid.proto",
        "proto/altar/aesp/v1/aesp.proto",
        "proto/google/rpc/status.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // `build_transport(false)`: GridRuntime has an RPC named `Connect`, which collides with the
    // generated client's transport constructor `connect`. Clients are built with `new(channel)`.
    // `Schema.properties` as a BTreeMap: its encoding is then canonical (entries in key
    // order), which the pinned digest of a governed declaration relies on.
    tonic_prost_build::configure()
        .btree_map(".altar.adm.v1.Schema.properties")
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
