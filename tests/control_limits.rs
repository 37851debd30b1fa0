//! The control socket against a hostile local client: a user other than root
//! holds at most `control.max_connections_per_user` connections (root's `status`
//! still answers), idle connections are closed after `control.idle_timeout_secs`,
//! both counted in `status`; `mark-add` is refused to anyone but root.
//! Privileged.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Daemon, Pair};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Connects to `sock` as uid `uid` (this thread only; the group stays root's, so
/// the 0660 socket lets it in, as it would a `control.group` member).
fn connect_as(uid: u32, sock: PathBuf) -> UnixStream {
    std::thread::spawn(move || {
        // SAFETY: setresuid on this thread alone, through the raw syscall.
        let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        assert_eq!(r, 0);
        UnixStream::connect(sock).unwrap()
    })
    .join()
    .unwrap()
}

fn control(d: &Daemon) -> Value {
    let v: Value = serde_json::from_str(&d.cli_ok(&["status"])).unwrap();
    v["status"]["control"].clone()
}

#[test]
fn a_user_is_capped_idle_connections_close_and_mark_add_is_for_root_only() {
    if !common::privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[control]\nmax_connections_per_user = 2\nidle_timeout_secs = 2\n",
            dir.path().join("none").display()
        ),
    );
    let sock = d.state_dir.join("control.sock");
    let mut held = [
        connect_as(NOBODY, sock.clone()),
        connect_as(NOBODY, sock.clone()),
    ];
    // The third is told why and closed.
    let mut third = connect_as(NOBODY, sock.clone());
    let mut answer = String::new();
    third.read_to_string(&mut answer).unwrap();
    assert!(
        answer.contains("too many connections from uid 65534"),
        "{answer:?}"
    );
    // Root is not capped: status answers while nobody holds its two.
    let c = control(&d);
    assert_eq!(c["refused"], 1, "{c}");
    assert!(c["open"].as_u64().unwrap() >= 2, "{c}");

    // A member of the control group may not set marks.
    held[0]
        .write_all(
            br#"{"v":1,"op":"mark-add","flow":{"proto":"tcp","local":"[fd00::1]:1","remote":"[fd00::2]:2"},"experiment":2,"activity":3}
"#,
        )
        .unwrap();
    let mut line = String::new();
    BufReader::new(&held[0]).read_line(&mut line).unwrap();
    assert!(
        line.contains("for root only") && line.contains("uid 65534"),
        "{line}"
    );

    // Idle ones are closed: the reads end.
    for s in &mut held {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while control(&d)["closed_idle"].as_u64() < Some(2) {
        assert!(Instant::now() < deadline, "{}", control(&d));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Their slots are free again.
    let mut again = connect_as(NOBODY, sock);
    again.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&again).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    d.stop();
}
