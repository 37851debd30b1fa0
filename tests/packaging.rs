//! What the packages ship: the binary runs on EL9's glibc, every manual page the
//! others reference exists, completions, the unit's privileges and its exposure
//! score, and a fresh install's empty policy directory. Unprivileged.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_flowd-rs");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/flowd-rs.service");

fn flowd(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["-c", "/dev/null"])
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// (major, minor) of a `GLIBC_2.34` version string.
fn glibc_version(s: &str) -> Option<(u32, u32)> {
    let v = s.strip_prefix("GLIBC_")?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[test]
fn the_binary_needs_no_glibc_newer_than_el9s_2_34() {
    // The same dependencies and symbols as the release binary packaging/build.sh
    // checks again: std and libbpf decide them, not the optimisation level.
    let o = Command::new("objdump")
        .args(["-T", BIN])
        .output()
        .expect("objdump (binutils) is needed to read the dynamic symbols");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let syms = text(&o.stdout);
    let newest = syms
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(glibc_version)
        .max()
        .expect("no GLIBC_ version in the dynamic symbols");
    assert!(
        newest <= (2, 34),
        "{BIN} asks for GLIBC_{}.{}: it would not start on EL9 (glibc 2.34). Symbols:\n{}",
        newest.0,
        newest.1,
        syms.lines()
            .filter(|l| l
                .split_whitespace()
                .any(|w| glibc_version(w.trim_matches(|c| c == '(' || c == ')'))
                    .is_some_and(|v| v > (2, 34))))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn man_dir_writes_a_page_for_every_page_referenced() {
    let dir = tempfile::tempdir().unwrap();
    let o = flowd(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut referenced = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let page = std::fs::read_to_string(e.unwrap().path()).unwrap();
        let mut rest = page.as_str();
        while let Some(i) = rest.find("flowd\\-rs") {
            rest = &rest[i..];
            let end = rest.find("(1)").unwrap_or(0);
            let name = &rest[..end];
            if end > 0
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '\\' || c == '-')
            {
                referenced.insert(name.replace("\\-", "-"));
            }
            rest = &rest[9..];
        }
    }
    for name in [
        "flowd-rs-run",
        "flowd-rs-policy-check",
        "flowd-rs-label-decode",
    ] {
        assert!(
            referenced.contains(name),
            "{name} not referenced: {referenced:?}"
        );
    }
    for name in &referenced {
        assert!(
            dir.path().join(format!("{name}.1")).exists(),
            "{name}(1) is referenced but was not written"
        );
    }
    assert!(
        !dir.path().join("flowd-rs-mark.1").exists(),
        "hidden command"
    );
    assert!(
        !dir.path().join("flowd-rs-help.1").exists(),
        "clap's help command"
    );
}

#[test]
fn completions_cover_the_subcommands_in_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef flowd-rs"),
        ("fish", "complete -c flowd-rs"),
    ] {
        let o = flowd(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", text(&o.stderr));
        let script = text(&o.stdout);
        assert!(script.contains(marker), "{shell}:\n{script}");
        for sub in ["inspect", "policy", "reload"] {
            assert!(script.contains(sub), "{shell} lacks {sub}");
        }
    }
}

#[test]
fn policy_check_of_a_fresh_install_warns_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("flowd-rs.toml");
    let missing = dir.path().join("policies.d");
    std::fs::write(&cfg, format!("[policy]\ndir = {:?}\n", missing)).unwrap();
    let o = Command::new(BIN)
        .args(["-c", cfg.to_str().unwrap(), "policy", "check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        text(&o.stdout).contains("no policies, nothing is tagged"),
        "{}",
        text(&o.stdout)
    );

    std::fs::create_dir(&missing).unwrap();
    std::fs::write(missing.join("README"), "not a policy").unwrap();
    std::fs::write(
        missing.join("atlas.toml.example"),
        "experiment = \"atlas\"\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["-c", cfg.to_str().unwrap(), "policy", "check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("OK, 0 files, 0 rules") && out.contains("no policies: nothing is tagged"),
        "{out}"
    );

    // A directory named on the command line must exist: a typo is an error.
    let o = flowd(&["policy", "check", missing.join("nope").to_str().unwrap()]);
    assert!(!o.status.success());
}

fn unit_values(key: &str) -> Vec<String> {
    std::fs::read_to_string(UNIT)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_unit_is_notify_unprivileged_and_holds_the_measured_capabilities() {
    assert_eq!(unit_values("Type"), ["notify"]);
    assert_eq!(unit_values("User"), ["flowd-rs"]);
    assert_eq!(unit_values("NoNewPrivileges"), ["yes"]);
    assert!(
        unit_values("ExecStartPre").is_empty(),
        "a fresh install must start"
    );
    assert_eq!(unit_values("ExecReload"), ["/usr/bin/flowd-rs reload"]);
    let set = |k| {
        let mut v: Vec<String> = unit_values(k)
            .join(" ")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    let want = [
        "CAP_BPF",
        "CAP_DAC_READ_SEARCH",
        "CAP_NET_ADMIN",
        "CAP_PERFMON",
        "CAP_SYS_PTRACE",
    ];
    assert_eq!(set("CapabilityBoundingSet"), want);
    assert_eq!(set("AmbientCapabilities"), want);
    // The sysusers entry creates the account the unit names.
    let sysusers =
        std::fs::read_to_string(Path::new(UNIT).with_file_name("flowd-rs.sysusers")).unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u flowd-rs ")),
        "{sysusers}"
    );
    assert!(
        sysusers.lines().any(|l| l.starts_with("g flowd ")),
        "{sysusers}"
    );
}

#[test]
fn systemd_analyze_rates_the_unit_at_most_3_5() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(UNIT, dir.path().join("flowd-rs.service")).unwrap();
    let o = Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=true",
            "--no-pager",
            "flowd-rs.service",
        ])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (systemd >= 250) is needed");
    let out = text(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score:\n{out}{}", text(&o.stderr)));
    let score: f64 = line
        .split(": ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"));
    assert!(score <= 3.5, "{line}\n{out}");
}

#[test]
fn under_the_journal_lines_carry_their_syslog_priority() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("flowd-rs.toml");
    std::fs::write(&cfg, "[marker]\nmap_capacity = 0\n").unwrap();
    let o = Command::new(BIN)
        .args(["-c", cfg.to_str().unwrap(), "run"])
        .env("JOURNAL_STREAM", "8:1234")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.starts_with("<3>flowd-rs: "), "{err}");
    let o = Command::new(BIN)
        .args(["-c", cfg.to_str().unwrap(), "run"])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert!(
        text(&o.stderr).starts_with("flowd-rs: "),
        "{}",
        text(&o.stderr)
    );
}
