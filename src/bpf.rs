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

/// Sends libbpf's own messages to tracing instead of raw stderr, so they carry the
/// daemon's format and level (libbpf warns, for example, when TCX is refused before
/// flowd-rs falls back to clsact).
pub fn route_libbpf_logs() {
    use libbpf_rs::PrintLevel;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Debug, |level, msg| {
            let msg = msg.trim_end();
            match level {
                PrintLevel::Warn => tracing::warn!(target: "libbpf", "{msg}"),
                PrintLevel::Info => tracing::debug!(target: "libbpf", "{msg}"),
                _ => tracing::trace!(target: "libbpf", "{msg}"),
            }
        })));
    });
}
