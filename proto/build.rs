//! Compiles `schema/ferry.proto` with the pure-Rust `protox`, so a fresh
//! machine needs no `protoc` binary to build ferry.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=schema/ferry.proto");
    let fds = protox::compile(["schema/ferry.proto"], ["schema"])?;
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
