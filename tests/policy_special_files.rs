//! Special files in the policy directory: a FIFO named `*.toml` makes a reload fail
//! with an error naming it (instead of blocking the daemon in open()), the previous
//! policy stays, and the control socket keeps answering. Privileged.

mod common;

use common::{Daemon, Pair};

const ATLAS: &str =
    "experiment = \"atlas\"\n[[rule]]\nname = \"to-5301\"\nactivity = 4\nremote_ports = [5301]\n";

#[test]
fn a_fifo_in_the_policy_directory_fails_the_reload_and_the_daemon_still_answers() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = common::policies_with(dir.path(), &[("atlas.toml", ATLAS)]);
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!("[policy]\ndir = \"{}\"\n", policies.display()),
    );
    let fifo = policies.join("zz.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let out = d.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("zz.toml") && err.contains("named pipe (FIFO)"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    assert_eq!(v["status"]["policy_rules"], 1, "{v}");
    assert_eq!(v["status"]["policy_reloads_failed"], 1, "{v}");
    d.stop();
}
