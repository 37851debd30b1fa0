//! The one-shot commands, as an operator or a CI pipeline runs them. Unprivileged.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};

fn flowd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowd-rs"))
        // No system configuration leaks into the tests.
        .args(["-c", "/dev/null"])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn shipped_example_policies_pass_check_offline() {
    let o = flowd(&[
        "policy",
        "check",
        "--offline",
        concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
    ]);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains(": OK, 4 files"), "{}", stdout(&o));
}

#[test]
fn policy_check_says_per_rule_whether_it_is_first_packet_exact() {
    let o = flowd(&[
        "policy",
        "check",
        "--offline",
        concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
    ]);
    let out = stdout(&o);
    assert!(out.contains("8 of 13 rules first-packet exact"), "{out}");
    let line = |name: &str| out.lines().find(|l| l.contains(name)).unwrap().to_owned();
    // Ports and addresses only: decided in the kernel.
    assert!(
        line("xrootd-tier0-export").contains("[first-packet exact (decided in the kernel)]"),
        "{out}"
    );
    // Needs the process name.
    assert!(
        line("xrootd-tpc-pull").contains("needs process facts"),
        "{out}"
    );
    // Kernel-decidable, but below rules needing process facts that overlap it.
    assert!(
        line("xrootd-fallback").contains("except for sockets atlas.toml:xrootd-tpc-pull"),
        "{out}"
    );

    // With the switch off, nothing is.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("flowd.toml");
    std::fs::write(&cfg, "[marker]\nin_kernel_decisions = false\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_flowd-rs"))
        .arg("-c")
        .arg(&cfg)
        .args([
            "policy",
            "check",
            "--offline",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
        ])
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(out.contains("in-kernel decisions are off"), "{out}");
    assert!(!out.contains("first-packet exact ("), "{out}");
}

#[test]
fn policy_check_reports_file_line_column_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("atlas.toml"),
        "experiment = \"atlas\"\n[[rule]]\nname = \"a\"\nactivity = \"default\"\nremote_ports = [\"2000-1000\"]\n",
    )
    .unwrap();
    let o = flowd(&["policy", "check", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with(&format!(
            "{}:5:17: ",
            dir.path().join("atlas.toml").display()
        )),
        "{out}"
    );
    assert!(out.trim_end().ends_with("1 error(s)"), "{out}");
}

#[test]
fn policy_explain_names_the_winning_rule() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("atlas.toml"),
        "experiment = \"atlas\"\n[[rule]]\nname = \"xrootd\"\nactivity = \"Data Consolidation\"\nlocal_ports = [1094]\n\
         [[rule]]\nname = \"v6-only\"\nactivity = \"Debug\"\nremote_cidrs = [\"2001:db8::/32\"]\n",
    )
    .unwrap();
    let o = flowd(&[
        "policy",
        "explain",
        "tcp",
        "10.0.0.1:1094",
        "10.0.0.2:40000",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("verdict: atlas/Data Consolidation (2/4) by atlas.toml:xrootd"),
        "{out}"
    );
    assert!(out.contains("atlas.toml:v6-only"), "{out}");
}

#[test]
fn labels_decode_and_encode() {
    let o = flowd(&["label", "decode", "0x1000c", "590099"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o),
        "0x1000c  atlas (2) / Data Brokering (3)  scitag 131  entropy 0b00000\n\
         0x90113  atlas (2) / Data Consolidation (4)  scitag 132  entropy 0b10111\n"
    );
    let o = flowd(&[
        "label",
        "encode",
        "atlas",
        "data consolidation",
        "--entropy",
        "23",
    ]);
    assert_eq!(stdout(&o), "0x90113\n");
    let o = flowd(&["label", "encode", "atlass", "default"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("atlas"),
        "suggests the close match"
    );
}

/// Serves `body` once over HTTP on loopback; returns the URL.
fn serve_once(body: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/api.json", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut req = [0u8; 4096];
        let _ = c.read(&mut req);
        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(&body).unwrap();
    });
    url
}

#[test]
fn registry_update_validates_before_replacing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("registry.json");
    let good = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/policy/scitags-registry.json"
    ))
    .unwrap();
    let o = flowd(&[
        "registry",
        "update",
        "--url",
        &serve_once(good.clone()),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), good);
    assert!(stdout(&o).contains("14 experiments"));

    let bad =
        br#"{"version": 1, "experiments": [{"expName": "x", "expId": 999, "activities": []}]}"#
            .to_vec();
    let o = flowd(&[
        "registry",
        "update",
        "--url",
        &serve_once(bad),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a valid SciTags registry"));
    assert_eq!(std::fs::read(&out).unwrap(), good, "the old file stays");
}

#[test]
fn the_man_page_documents_every_command_files_and_signals() {
    // No configuration is read: a broken one must not hide the manual.
    let o = Command::new(env!("CARGO_BIN_EXE_flowd-rs"))
        .args(["-c", "/nonexistent/flowd-rs.toml", "man"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = stdout(&o);
    assert!(page.contains(".TH flowd-rs 1"), "{page}");
    for cmd in [
        "run", "clean", "status", "inspect", "reload", "policy", "label", "registry", "man",
    ] {
        assert!(
            page.contains(&format!("flowd\\-rs\\-{cmd}(1)")),
            "{cmd} missing:\n{page}"
        );
    }
    assert!(
        !page.contains("flowd\\-rs\\-mark(1)"),
        "the hidden test command is not documented"
    );
    for section in [
        ".SH OPTIONS",
        ".SH FILES",
        ".SH SIGNALS",
        "control.sock",
        "SIGHUP",
    ] {
        assert!(page.contains(section), "{section} missing:\n{page}");
    }
}
