//! The live view in a real pseudo-terminal: `flowd-rs inspect` runs in a private tmux
//! server (160x40) against a fake control socket; the test types keys with
//! `send-keys` and reads the screen with `capture-pane`. No root needed; skipped with
//! a message when tmux is not installed.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::fake_daemon::{self, FakeDaemon};

/// A tmux server of our own (`-L`), killed on drop: other tmux sessions are untouched.
struct Tmux {
    socket: String,
    /// The server's socket file, removed on drop (kill-server leaves it behind).
    socket_path: Option<String>,
}

impl Tmux {
    fn start(command: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("SKIPPED: tmux is not installed (apt-get install -y tmux)");
            return None;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let mut t = Tmux {
            socket: format!("flowd-inspect-test-{}-{n}", std::process::id()),
            socket_path: None,
        };
        // A plain sh as the pane's program: its prompt shows when inspect gives the
        // terminal back.
        t.run(&[
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "40",
            "-s",
            "t",
            "env PS1='prompt$ ' sh",
        ]);
        t.socket_path = Some(
            t.run(&["display-message", "-p", "#{socket_path}"])
                .trim()
                .to_string(),
        );
        t.wait_for("the shell prompt", 10, |s| s.starts_with("prompt$"));
        t.run(&["send-keys", "-t", "t", "-l", command]);
        t.run(&["send-keys", "-t", "t", "Enter"]);
        Some(t)
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    fn alternate_screen(&self) -> bool {
        self.run(&["display-message", "-p", "-t", "t", "#{alternate_on}"])
            .trim()
            == "1"
    }

    fn keys(&self, literal: &str) {
        self.run(&["send-keys", "-t", "t", "-l", literal]);
    }

    fn key(&self, name: &str) {
        self.run(&["send-keys", "-t", "t", name]);
    }

    /// Polls the screen until `cond` holds; panics with the screen after `secs`.
    fn wait_for(&self, what: &str, secs: u64, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if cond(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn command(socket: &Path, extra: &str) -> String {
    format!(
        "{} inspect --interval-ms 200 {extra}; echo EXIT=$?",
        support::flowd_rs(socket)
    )
}

fn socket() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("control.sock");
    (dir, p)
}

/// The shell printed inspect's exit status on a line of its own.
fn exited(screen: &str) -> bool {
    screen.lines().any(|l| l.starts_with("EXIT="))
}

fn rows_with(screen: &str, needle: &str) -> usize {
    screen.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn live_view_shows_flows_filters_details_survives_the_daemon_and_restores_the_terminal() {
    let (_dir, sock) = socket();
    let mut daemon = FakeDaemon::start(&sock, fake_daemon::flows(6));
    let Some(tmux) = Tmux::start(&command(&sock, "")) else {
        return;
    };

    // First screen: status, totals per experiment, rows sorted by bytes.
    let s = tmux.wait_for("the flow table", 10, |s| s.contains("1234/xrootd"));
    assert!(
        tmux.alternate_screen(),
        "inspect should draw on the alternate screen"
    );
    assert!(s.contains("flowd-rs 0.1.0-fake pid 4242 up 1h02m │ flow-label on eth0(tcx) │ policy p-fake-1 (2 files, 9 rules)"), "{s}");
    assert!(s.contains("cms 2 flows, 700 pkts, 1.0 MiB │ atlas 2 flows, 500 pkts, 732.4 KiB │ untagged 2 flows"), "{s}");
    assert!(
        s.contains("sort: BYTES ▼ │ filter: none │ 6 shown of 6 received (4 tagged of 6 tracked)"),
        "{s}"
    );
    let lines: Vec<&str> = s.lines().collect();
    assert!(
        lines[4].contains("1236/sshd") && lines[4].contains("878.9 KiB"),
        "{s}"
    );
    assert!(
        lines[9].contains("1234/xrootd") && lines[9].contains("146.5 KiB"),
        "{s}"
    );

    // Filter: only atlas flows remain.
    tmux.keys("/");
    tmux.keys("exp:atlas");
    tmux.wait_for("the filter input line", 5, |s| {
        s.contains("filter> exp:atlas█")
    });
    tmux.key("Enter");
    let s = tmux.wait_for("the filter applied", 5, |s| {
        s.contains("filter: exp:atlas │ 2 shown")
    });
    assert_eq!(rows_with(&s, "1234/xrootd"), 2, "{s}");
    assert_eq!(rows_with(&s, "sshd"), 0, "{s}");
    assert_eq!(rows_with(&s, "fts_url_copy"), 0, "{s}");

    // Detail pane of the selected (biggest atlas) flow, with the daemon's events.
    tmux.key("Enter");
    let s = tmux.wait_for("the detail pane with events", 5, |s| {
        s.contains("seen by tracker")
    });
    assert!(s.contains("flow 1003 (Enter/Esc to close)"), "{s}");
    assert!(s.contains("label 0x1000c = 00 010000000 0 000011 00: experiment 2 (bits 17..9, reversed), activity 3 (bits 7..2), entropy 0b00000"), "{s}");
    assert!(s.contains("tcp rtt 1.5 ms ± 0.2  cwnd 10"), "{s}");
    assert!(
        s.contains("tagged atlas/datachallenge by atlas.toml:xrootd-data"),
        "{s}"
    );

    // The daemon goes away: said on the status line, data kept, no crash.
    daemon.stop();
    let s = tmux.wait_for("the lost daemon", 5, |s| s.contains("DAEMON UNREACHABLE"));
    assert!(s.contains("the daemon is not running"), "{s}");
    assert_eq!(rows_with(&s, "1234/xrootd"), 2, "{s}");
    // ... and comes back: the view recovers by itself.
    let _daemon = FakeDaemon::start(&sock, fake_daemon::flows(6));
    tmux.wait_for("the daemon back", 5, |s| {
        !s.contains("DAEMON UNREACHABLE") && s.contains("policy p-fake-1")
    });

    // Quit: the shell's screen comes back, inspect exited 0.
    tmux.keys("q");
    let s = tmux.wait_for("the shell prompt", 5, exited);
    assert!(s.lines().any(|l| l == "EXIT=0"), "{s}");
    assert!(!tmux.alternate_screen(), "alternate screen not left:\n{s}");
    // capture-pane trims trailing blanks: the fresh prompt reads `prompt$`.
    assert_eq!(s.lines().nth(2), Some("prompt$"), "{s}");
    assert!(
        !s.contains("PROTO"),
        "table left on the normal screen:\n{s}"
    );
}

#[test]
fn live_view_without_a_daemon_prints_the_message_and_never_takes_the_screen() {
    let (_dir, sock) = socket();
    let Some(tmux) = Tmux::start(&command(&sock, "")) else {
        return;
    };
    let s = tmux.wait_for("the exit", 10, exited);
    assert!(s.lines().any(|l| l == "EXIT=1"), "{s}");
    let one_line = s.replace('\n', "");
    assert!(
        one_line.contains("flowd-rs: the daemon is not running (no control socket at"),
        "{s}"
    );
    assert!(!tmux.alternate_screen());
}

#[test]
fn sort_keys_change_the_order_and_the_header() {
    let (_dir, sock) = socket();
    let _daemon = FakeDaemon::start(&sock, fake_daemon::flows(6));
    let Some(tmux) = Tmux::start(&command(&sock, "--tagged")) else {
        return;
    };
    let s = tmux.wait_for("the table", 10, |s| s.contains("4 shown of 4"));
    assert_eq!(
        rows_with(&s, "sshd"),
        0,
        "--tagged hides untagged flows:\n{s}"
    );
    tmux.keys("r");
    let s = tmux.wait_for("ascending bytes", 5, |s| s.contains("sort: BYTES ▲"));
    let lines: Vec<&str> = s.lines().collect();
    assert!(lines[4].contains("146.5 KiB"), "{s}");
    tmux.keys("5");
    let s = tmux.wait_for("sort by process", 5, |s| s.contains("sort: PID/COMM ▲"));
    let lines: Vec<&str> = s.lines().collect();
    assert!(
        lines[4].contains("1235/fts_url_copy") && lines[6].contains("1234/xrootd"),
        "{s}"
    );
    assert!(
        lines[4].contains("[2001:db8:1::10]:40001 [2001:db8:2::20]:1094"),
        "{s}"
    );
    tmux.keys("q");
    let s = tmux.wait_for("exit", 5, exited);
    assert!(s.lines().any(|l| l == "EXIT=0"), "{s}");
}

#[test]
fn a_panic_in_the_live_view_gives_the_terminal_back_first() {
    let exe = Path::new(env!("CARGO_BIN_EXE_flowd-rs"))
        .parent()
        .unwrap()
        .join("examples/tui_panic");
    if !exe.exists() {
        eprintln!(
            "SKIPPED: {} not built (cargo test builds examples)",
            exe.display()
        );
        return;
    }
    let Some(tmux) = Tmux::start(&format!("{}; echo EXIT=$?", exe.display())) else {
        return;
    };
    tmux.wait_for("the view", 10, |s| s.contains("ABOUT TO PANIC"));
    assert!(tmux.alternate_screen());
    let s = tmux.wait_for("the exit", 10, exited);
    assert!(s.lines().any(|l| l == "EXIT=101"), "{s}");
    assert!(s.contains("deliberate panic inside the live view"), "{s}");
    assert!(!s.contains("ABOUT TO PANIC"), "{s}");
    assert!(!tmux.alternate_screen(), "alternate screen not left:\n{s}");
}

#[test]
fn sigterm_ends_the_live_view_cleanly() {
    let (_dir, sock) = socket();
    let _daemon = FakeDaemon::start(&sock, fake_daemon::flows(3));
    let Some(tmux) = Tmux::start(&command(&sock, "")) else {
        return;
    };
    tmux.wait_for("the table", 10, |s| s.contains("3 shown of 3"));
    let pane: u32 = tmux
        .run(&["display-message", "-p", "-t", "t", "#{pane_pid}"])
        .trim()
        .parse()
        .unwrap();
    // The pane runs sh; inspect is its child.
    let children = std::fs::read_to_string(format!("/proc/{pane}/task/{pane}/children")).unwrap();
    let pid = children.split_whitespace().next().expect("inspect's pid");
    assert!(Command::new("kill")
        .args(["-TERM", pid])
        .status()
        .unwrap()
        .success());
    let s = tmux.wait_for("the exit", 5, exited);
    assert!(s.lines().any(|l| l == "EXIT=0"), "{s}");
    assert!(!tmux.alternate_screen(), "alternate screen not left:\n{s}");
}
