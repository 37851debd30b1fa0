//! The module graph is part of the design: this test reads every `crate::` path in
//! `src/` and fails when a module imports one of a higher layer, or when modules of
//! one layer import each other in a cycle. The layering is written down here, once.
//!
//! Run with `--nocapture` to print the graph's figures (edges, back edges, cycles).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Lowest first. A module may use its own layer and those below; within a layer,
/// imports must not form a cycle.
const LAYERS: &[(&str, &[&str])] = &[
    // What every layer speaks: sockets, tags, owner facts, announcements.
    ("model", &["model"]),
    // Contracts and plumbing with no behaviour of the daemon's: the control
    // protocol's types and client, the skeletons, the configuration and its
    // defaults, the local endpoints' permissions, what the running kernel offers,
    // the service manager's readiness protocol.
    (
        "contracts",
        &["api", "bpf", "config", "endpoint", "features", "notify"],
    ),
    // Sources of facts, and the rules that judge them.
    ("sources", &["discovery", "enrich", "policy"]),
    ("flows", &["flows"]),
    // From flows to marks: the decision and the kernel side that applies it.
    ("marking", &["marking", "marker"]),
    // What the daemon sends and hears besides marks.
    ("io", &["firefly", "metrics", "announce"]),
    // The single owner of state.
    ("engine", &["engine"]),
    ("control", &["control"]),
    ("daemon", &["daemon"]),
    // User interfaces.
    ("ui", &["check", "cli", "import", "inspect", "main"]),
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|(_, ms)| ms.contains(&module))
        .unwrap_or_else(|| {
            panic!("module `{module}` has no layer: add it to LAYERS in tests/architecture.rs")
        })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/discovery/tracker.rs` ->
/// `discovery`, `src/main.rs` -> `main`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Is this file test code (a `#[cfg(test)]` module in its own file)? Tests may
/// reach anywhere.
fn is_test_file(file: &Path) -> bool {
    let name = file.file_name().unwrap().to_string_lossy();
    name == "tests.rs" || name.ends_with("_tests.rs")
}

/// The modules a file names through `crate::X` (or `flowd::X` in the binary), in
/// code: comments and doc links do not count. Code after a `#[cfg(test)]` line is
/// test code and does not count either.
fn imports(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap();
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

struct Graph {
    /// module -> modules it imports (excluding itself).
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn read(src: &Path) -> Graph {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files.iter().filter(|f| !is_test_file(f)) {
            let module = module_of(src, file);
            // lib.rs only declares the modules.
            if module == "lib" {
                continue;
            }
            let text = fs::read_to_string(file).unwrap();
            let prefix = if module == "main" {
                "flowd::"
            } else {
                "crate::"
            };
            let set = edges.entry(module.clone()).or_default();
            for target in imports(&text, prefix) {
                if target != module {
                    set.insert(target);
                }
            }
        }
        Graph { edges }
    }

    fn edge_count(&self) -> usize {
        self.edges.values().map(BTreeSet::len).sum()
    }

    /// Edges from a module to one of a higher layer.
    fn back_edges(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (from, tos) in &self.edges {
            for to in tos {
                if layer_of(to) > layer_of(from) {
                    out.push((from.clone(), to.clone()));
                }
            }
        }
        out
    }

    /// Every strongly connected component of more than one module (Tarjan).
    fn cycles(&self) -> Vec<Vec<String>> {
        struct State<'a> {
            g: &'a Graph,
            index: BTreeMap<&'a str, usize>,
            low: BTreeMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on_stack: BTreeSet<&'a str>,
            next: usize,
            out: Vec<Vec<String>>,
        }
        fn visit<'a>(s: &mut State<'a>, v: &'a str) {
            s.index.insert(v, s.next);
            s.low.insert(v, s.next);
            s.next += 1;
            s.stack.push(v);
            s.on_stack.insert(v);
            let g = s.g;
            for w in g.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if s.low[v] == s.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = s.stack.pop() {
                    s.on_stack.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    s.out.push(scc);
                }
            }
        }
        let mut s = State {
            g: self,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            next: 0,
            out: Vec::new(),
        };
        for v in self.edges.keys() {
            if !s.index.contains_key(v.as_str()) {
                visit(&mut s, v);
            }
        }
        s.out
    }
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_a_higher_layer() {
    let g = Graph::read(&src_dir());
    let back = g.back_edges();
    println!(
        "module graph: {} modules, {} edges, {} back edges, {} cycles",
        g.edges.len(),
        g.edge_count(),
        back.len(),
        g.cycles().len()
    );
    assert!(
        back.is_empty(),
        "imports that point up the layers (see LAYERS in tests/architecture.rs): {back:?}"
    );
}

#[test]
fn modules_import_each_other_without_cycles() {
    let cycles = Graph::read(&src_dir()).cycles();
    assert!(
        cycles.is_empty(),
        "import cycles between modules: {cycles:?}"
    );
}

#[test]
fn every_module_has_a_layer() {
    for module in Graph::read(&src_dir()).edges.keys() {
        layer_of(module);
    }
}

/// The checker itself: a back edge and a cycle in a made-up tree are found, and
/// comments, doc links and test code are not imports.
#[test]
fn the_checker_finds_back_edges_and_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    fs::create_dir(src.join("engine")).unwrap();
    fs::write(
        src.join("model.rs"),
        "use crate::engine::X;\n// crate::daemon in a comment\n",
    )
    .unwrap();
    fs::write(src.join("engine/mod.rs"), "use crate::model::Y;\n").unwrap();
    fs::write(
        src.join("flows.rs"),
        "/// [`crate::engine`]\nuse crate::model::Z;\n#[cfg(test)]\nmod t { use crate::daemon::W; }\n",
    )
    .unwrap();
    let g = Graph::read(src);
    assert_eq!(
        g.back_edges(),
        vec![("model".to_string(), "engine".to_string())]
    );
    assert_eq!(
        g.cycles(),
        vec![vec!["engine".to_string(), "model".to_string()]]
    );
    assert_eq!(g.edges["flows"], BTreeSet::from(["model".to_string()]));
}
