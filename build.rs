//! Compiles every `bpf/*.bpf.c` into a libbpf-rs skeleton in OUT_DIR, and nothing else.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    println!("cargo:rerun-if-changed=bpf");
    let mut sources: Vec<PathBuf> = std::fs::read_dir("bpf")
        .expect("bpf/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".bpf.c"))
            .expect("bpf source name")
            .to_string();
        SkeletonBuilder::new()
            .source(&src)
            .clang_args(["-I", "bpf", "-Wall", "-Wno-unused-function"])
            .build_and_generate(out.join(format!("{stem}.skel.rs")))
            .unwrap_or_else(|e| panic!("building BPF skeleton {}: {e}", src.display()));
    }
}
