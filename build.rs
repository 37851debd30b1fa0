//! Compiles every `bpf/*.bpf.c` (the daemon's programs) and `benches/bpf/*.bpf.c` (reference
//! programs only the benches load) into libbpf-rs skeletons in OUT_DIR, and nothing else.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-changed=benches/bpf");
    let mut sources: Vec<PathBuf> = ["bpf", "benches/bpf"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}/: {e}")))
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
