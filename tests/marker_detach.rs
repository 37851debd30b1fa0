//! Attach and detach leave interfaces exactly as found; crashes leave nothing that a
//! restart or `flowd-rs clean` cannot remove. Privileged.

mod common;

use std::process::Command;

use common::{Daemon, Netns, Pair, IF_A};
use nix::sys::signal::Signal;

fn qdiscs(ns: &Netns) -> String {
    ns.sh(&format!("tc qdisc show dev {IF_A}"))
}

fn egress_filters(ns: &Netns) -> String {
    ns.sh(&format!("tc filter show dev {IF_A} egress"))
}

/// Programs on the interface: TCX egress (asked of the kernel) and clsact egress.
fn bpf_on_iface(ns: &Netns) -> String {
    let tcx = ns.tcx_egress(IF_A);
    format!("tcx: {tcx:?}\nclsact: {}", egress_filters(ns))
}

#[test]
fn sigterm_detaches_tcx_and_leaves_qdiscs_as_found() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    if common::tcx_refused_where_missing(&pair, dir.path()) {
        return;
    }
    let before = qdiscs(&pair.a);
    let d = Daemon::start(&pair.a, dir.path(), "attach = \"tcx\"");
    assert!(
        bpf_on_iface(&pair.a).contains("flowd_mark"),
        "{}",
        bpf_on_iface(&pair.a)
    );
    d.stop();
    assert!(!bpf_on_iface(&pair.a).contains("flowd_mark"));
    assert_eq!(qdiscs(&pair.a), before);
}

#[test]
fn sigterm_removes_the_clsact_qdisc_it_created() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let before = qdiscs(&pair.a);
    assert!(!before.contains("clsact"));
    let d = Daemon::start(&pair.a, dir.path(), "attach = \"clsact\"");
    assert!(qdiscs(&pair.a).contains("clsact"));
    assert!(egress_filters(&pair.a).contains("flowd_mark"));
    d.stop();
    assert_eq!(qdiscs(&pair.a), before);
}

#[test]
fn sigterm_keeps_a_clsact_qdisc_that_was_there_before() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    pair.a.sh(&format!("tc qdisc add dev {IF_A} clsact"));
    let before = qdiscs(&pair.a);
    let d = Daemon::start(&pair.a, dir.path(), "attach = \"clsact\"");
    assert!(egress_filters(&pair.a).contains("flowd_mark"));
    d.stop();
    assert_eq!(qdiscs(&pair.a), before);
    assert!(qdiscs(&pair.a).contains("clsact"));
    assert_eq!(egress_filters(&pair.a).trim(), "");
}

#[test]
fn after_sigkill_a_restart_and_clean_both_succeed() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let before = qdiscs(&pair.a);
    let mut d = Daemon::start(&pair.a, dir.path(), "attach = \"clsact\"");
    d.signal(Signal::SIGKILL);
    d.child.wait().unwrap();
    // The crash left the filter and the qdisc behind.
    assert!(egress_filters(&pair.a).contains("flowd_mark"));

    // A restart with the same state directory succeeds and does not stack filters.
    let config = d.config.clone();
    let restart = Command::new("ip")
        .args(["netns", "exec", &pair.a.name, common::bin(), "-c"])
        .arg(&config)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = d.state_dir.join("control.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_ok()) {
        assert!(
            std::time::Instant::now() < deadline,
            "restart did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let filters = egress_filters(&pair.a);
    assert_eq!(filters.matches("handle 0xf10d").count(), 1, "{filters}");
    d.child = restart;
    d.signal(Signal::SIGKILL);
    d.child.wait().unwrap();

    let out = d.cli_ok(&["clean"]);
    assert!(out.contains("removed flowd-rs filters from: vfa"), "{out}");
    assert!(out.contains("removed clsact qdiscs from: vfa"), "{out}");
    assert_eq!(qdiscs(&pair.a), before);
    assert_eq!(d.cli_ok(&["clean"]).trim(), "nothing to clean");
}

#[test]
fn after_sigkill_tcx_leaves_nothing_attached() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    if common::tcx_refused_where_missing(&pair, dir.path()) {
        return;
    }
    let before = qdiscs(&pair.a);
    // Unpinned (a pinned link outlives a crash on purpose: marker_restart).
    let mut d = Daemon::start(&pair.a, dir.path(), "attach = \"tcx\"\npin_dir = \"\"");
    d.signal(Signal::SIGKILL);
    d.child.wait().unwrap();
    // Unpinned TCX links belong to the process's file descriptors.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while bpf_on_iface(&pair.a).contains("flowd_mark") {
        assert!(
            std::time::Instant::now() < deadline,
            "TCX link outlived its process"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(qdiscs(&pair.a), before);
    assert_eq!(d.cli_ok(&["clean"]).trim(), "nothing to clean");
}

#[test]
fn a_missing_interface_is_one_clear_error_and_nothing_is_attached() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let before = qdiscs(&pair.a);
    let err = common::run_expecting_error(
        &pair.a,
        dir.path(),
        "interfaces = [\"vfa\", \"nope0\"]",
        false,
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("flowd-rs: interface `nope0` does not exist (known: lo, vfa)"),
        "{err}"
    );
    assert_eq!(qdiscs(&pair.a), before);
    assert!(!bpf_on_iface(&pair.a).contains("flowd_mark"));
}

#[test]
fn missing_privileges_are_one_clear_error() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let err = common::run_expecting_error(&pair.a, dir.path(), "", true);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("flowd-rs: "), "{err}");
    assert!(last.contains("run as root"), "{err}");
}

#[test]
fn a_malformed_config_names_file_line_and_column() {
    // Unprivileged: the config is read before anything is touched.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[marker]\nstrategy = \"label\"\ninterface = [\"eth0\"]\n",
    )
    .unwrap();
    let out = Command::new(common::bin())
        .arg("-c")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "flowd-rs: {}:3:1: unknown field `interface`",
            cfg.display()
        )),
        "{err}"
    );
}

#[test]
fn pair_helper_cleans_up_namespaces() {
    if !common::privileged() {
        return;
    }
    let name = {
        let p = Pair::new();
        p.a.name.clone()
    };
    assert!(!std::path::Path::new("/var/run/netns").join(name).exists());
}
