//! Generates the agent's ttrpc services from `protos/*.proto` (pure Rust, no protoc).
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let protos = ["protos/health.proto", "protos/agent.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    Codegen::new()
        .out_dir(&out)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc code generation failed");

    // The generated files start with inner attributes (`#![allow(...)]`), which
    // `include!` does not accept; the including module carries equivalent allows.
    for entry in std::fs::read_dir(&out).expect("read OUT_DIR") {
        let path = entry.expect("read OUT_DIR entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read generated file");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
                .collect();
            std::fs::write(&path, kept.join("\n")).expect("write generated file");
        }
    }
}
