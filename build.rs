//! Compiles keygate's own protocol (`proto/keygate/sync/v1/sync.proto`) with protox, a pure-Rust
//! protobuf compiler, so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["keygate/sync/v1/sync.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // A full snapshot is sent to every client that needs one: `Bytes` shares it.
        .bytes(".keygate.sync.v1.Full.document")
        .bytes(".keygate.sync.v1.Delta")
        .build_client(true)
        // The hub frames its answers itself (src/sync/wire.rs), sending a full snapshot from
        // its one copy of the document.
        .build_server(false)
        .compile_fds(files)?;
    Ok(())
}
