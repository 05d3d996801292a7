//! Compiles `proto/agent.proto` into Rust (messages and async ttrpc stubs) in OUT_DIR.

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    println!("cargo:rerun-if-changed=proto/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("failed to compile proto/agent.proto; is protoc installed (apt-get install protobuf-compiler)?");

    // The generated files carry inner attributes (`#![allow(..)]`), which
    // `include!` cannot take; lib.rs sets the equivalent on the modules.
    for file in ["agent.rs", "agent_ttrpc.rs"] {
        let path = std::path::Path::new(&out_dir).join(file);
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("rewrite generated file");
    }
}
