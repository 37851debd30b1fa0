//! A state directory deleted under a running daemon: the daemon makes its control
//! socket again (it stays controllable), and a second daemon started in the same
//! network namespace is refused instead of attaching to the same interfaces.
//! Privileged.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Pair};

#[test]
fn a_deleted_state_dir_neither_orphans_the_daemon_nor_admits_a_second_one() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let policies = dir.path().join("none");
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!("[policy]\ndir = \"{}\"\n", policies.display()),
    );
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    let sock = d.state_dir.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "control socket not made again:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.cli_ok(&["status"]).contains("\"pid\""));

    // A second daemon, same namespace, its own (fresh) state directory.
    let config = dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[policy]\ndir = \"{}\"\n",
            dir.path().join("state-second").display(),
            policies.display()
        ),
    )
    .unwrap();
    let mut second = Command::new("nsenter")
        .arg(format!("--net={}", pair.a.path().display()))
        .arg(common::bin())
        .arg("-c")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second daemon in the same namespace kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("another flowd-rs daemon runs in this network namespace"),
        "{err}"
    );
    d.stop();
}
