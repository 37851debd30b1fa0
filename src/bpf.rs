//! The generated BPF skeletons (see build.rs), included once so the rest of the crate
//! names kernel-shared types through them.

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code
)]
pub mod marker {
    include!(concat!(env!("OUT_DIR"), "/marker.skel.rs"));
}

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code
)]
pub mod tracker {
    include!(concat!(env!("OUT_DIR"), "/tracker.skel.rs"));
}

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code
)]
pub mod sockiter {
    include!(concat!(env!("OUT_DIR"), "/sockiter.skel.rs"));
}

/// Sends libbpf's own messages to tracing instead of raw stderr, so they carry the
/// daemon's format and level (libbpf warns, for example, when TCX is refused before
/// flowd-rs falls back to clsact). Warnings are also kept (see [`refusal`]) so that a
/// failed load can name the program the verifier refused and why.
pub fn route_libbpf_logs() {
    use libbpf_rs::PrintLevel;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Debug, |level, msg| {
            let msg = msg.trim_end();
            match level {
                PrintLevel::Warn => {
                    keep_warning(msg);
                    tracing::warn!(target: "libbpf", "{msg}")
                }
                PrintLevel::Info => tracing::debug!(target: "libbpf", "{msg}"),
                _ => tracing::trace!(target: "libbpf", "{msg}"),
            }
        })));
    });
}

/// The last libbpf warnings, newest last (a verifier log arrives as one message).
static WARNINGS: std::sync::Mutex<std::collections::VecDeque<String>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

fn keep_warning(msg: &str) {
    let mut w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
    if w.len() == 64 {
        w.pop_front();
    }
    w.push_back(msg.to_string());
}

/// Forgets the warnings kept so far: call before a load whose failure is to be
/// explained by [`refusal`].
pub fn clear_refusals() {
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// A program the kernel's verifier refused during the last load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The program's function name in bpf/*.bpf.c.
    pub program: String,
    /// The verifier's last lines: the instruction refused and the reason.
    pub last_lines: Vec<String>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the kernel's verifier refused BPF program {}: {}",
            self.program,
            self.last_lines.join(" / ")
        )
    }
}

/// The program whose load failed since [`clear_refusals`], and its verifier log's
/// last lines, read from libbpf's warnings (routed by [`route_libbpf_logs`]).
pub fn refusal() -> Option<Refusal> {
    let w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
    parse_refusal(w.iter().map(String::as_str))
}

/// libbpf reports a refused program as `prog 'NAME': BPF program load failed: ...`,
/// then the log between `-- BEGIN PROG LOAD LOG --` and `-- END PROG LOAD LOG --`.
fn parse_refusal<'a>(messages: impl Iterator<Item = &'a str>) -> Option<Refusal> {
    let text: Vec<&str> = messages.flat_map(str::lines).collect();
    let failed = text
        .iter()
        .rposition(|l| l.contains("BPF program load failed"))?;
    let program = text[failed]
        .split('\'')
        .nth(1)
        .unwrap_or("(unnamed)")
        .to_string();
    let log: Vec<&str> = text[failed..]
        .iter()
        .skip_while(|l| !l.contains("BEGIN PROG LOAD LOG"))
        .skip(1)
        .take_while(|l| !l.contains("END PROG LOAD LOG"))
        .map(|l| l.trim())
        // The verifier's closing statistics say nothing about the cause.
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
        })
        .collect();
    let mut last_lines: Vec<String> = log
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|l| l.to_string())
        .collect();
    if last_lines.is_empty() {
        last_lines.push(
            text[failed]
                .split("load failed: ")
                .nth(1)
                .unwrap_or("no verifier log")
                .to_string(),
        );
    }
    Some(Refusal {
        program,
        last_lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_program_and_the_verifier_reason() {
        let msgs = [
            "libbpf: prog 'flowd_cache_counts': BPF program load failed: Permission denied",
            "libbpf: prog 'flowd_cache_counts': -- BEGIN PROG LOAD LOG --\n0: R1=ctx() R10=fp0\n; int flowd_cache_counts(...)\n12: (85) call bpf_map_lookup_elem#1\nR2 type=buf expected=fp, pkt, pkt_meta, map_key, map_value\nprocessed 14 insns (limit 1000000)\n-- END PROG LOAD LOG --",
            "libbpf: prog 'flowd_cache_counts': failed to load: -13",
            "libbpf: failed to load object 'marker_bpf'",
        ];
        let r = parse_refusal(msgs.into_iter()).unwrap();
        assert_eq!(r.program, "flowd_cache_counts");
        assert_eq!(
            r.last_lines,
            [
                "; int flowd_cache_counts(...)",
                "12: (85) call bpf_map_lookup_elem#1",
                "R2 type=buf expected=fp, pkt, pkt_meta, map_key, map_value"
            ]
        );
        assert!(r
            .to_string()
            .starts_with("the kernel's verifier refused BPF program flowd_cache_counts: ; int"));
    }

    #[test]
    fn no_refusal_without_a_failed_program() {
        assert_eq!(
            parse_refusal(["libbpf: Kernel error message: TCX not supported"].into_iter()),
            None
        );
        let r = parse_refusal(
            ["libbpf: prog 'flowd_mark': BPF program load failed: Operation not permitted"]
                .into_iter(),
        )
        .unwrap();
        assert_eq!(r.last_lines, ["Operation not permitted"]);
    }
}
