//! `flowd-rs import`: each fixture (the peers' documented sample configurations,
//! tests/fixtures/import/) becomes a configuration flowd-rs parses, policies that
//! validate, and exactly the expected report of keys without an equivalent.
//! Unprivileged.

use std::path::Path;
use std::process::Command;

use flowd::config::Config;
use flowd::policy::registry::Registry;
use flowd::policy::Policy;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/import");

/// Imports `file` with `flowd-rs import KIND`; returns the output directory and stdout.
fn import(kind: &str, file: &str) -> (tempfile::TempDir, String) {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_flowd-rs"))
        .args(["import", kind])
        .arg(Path::new(FIXTURES).join(kind).join(file))
        .arg("--output")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{kind} {file}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (out, String::from_utf8(o.stdout).unwrap())
}

/// The checks every fixture passes; returns the configuration and the policy's
/// rule count.
fn check(kind: &str, file: &str) -> (Config, usize) {
    let (out, printed) = import(kind, file);
    let stem = file.rsplit_once('.').unwrap().0;
    let expected = std::fs::read_to_string(
        Path::new(FIXTURES)
            .join(kind)
            .join(format!("{stem}.report")),
    )
    .unwrap();
    assert_eq!(printed, expected, "{kind} {file}: printed report");
    let written = std::fs::read_to_string(out.path().join("import-report.txt")).unwrap();
    assert_eq!(written, expected, "{kind} {file}: report file");
    let text = std::fs::read_to_string(out.path().join("flowd-rs.toml")).unwrap();
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("{kind} {file}: {e}\n{text}"));
    let policy = Policy::load_dir(&out.path().join("policies.d"), &Registry::bundled())
        .unwrap_or_else(|e| panic!("{kind} {file}: {e}"));
    let rules = policy.rules().len();
    (cfg, rules)
}

#[test]
fn flowd_go_full_sample() {
    let (cfg, rules) = check("flowd-go", "full.yaml");
    assert_eq!(
        cfg.announcements.pipe.unwrap(),
        Path::new("/var/run/flowd-go/np")
    );
    assert_eq!(
        cfg.announcements.http_listen.unwrap().to_string(),
        "127.0.0.1:7777"
    );
    assert_eq!(
        cfg.announcements.firefly_listen[0].to_string(),
        "127.0.0.1:10514"
    );
    assert!(cfg.fireflies.enabled && !cfg.fireflies.syslog_header);
    assert_eq!(cfg.fireflies.collectors[0].to_string(), "127.0.0.1:10514");
    assert_eq!(cfg.fireflies.ongoing_interval_s, 1);
    assert_eq!(cfg.fireflies.enrich, Some(flowd::config::EnrichMode::Lean));
    assert_eq!(cfg.marker.interfaces, ["eth0"]);
    assert_eq!(cfg.metrics.listen.to_string(), "127.0.0.1:8080");
    assert!(cfg.metrics.per_flow);
    assert_eq!(cfg.fireflies.stun.servers.len(), 2);
    assert_eq!(rules, 1, "the iperf3 plugin's rule");
}

#[test]
fn flowd_go_iperf3_sample() {
    let (cfg, rules) = check("flowd-go", "iperf3.yaml");
    // pipePath's default, relative to workDir's.
    assert_eq!(
        cfg.announcements.pipe.unwrap(),
        Path::new("/var/cache/flowd-go/np")
    );
    assert_eq!(
        cfg.fireflies.collectors[0].to_string(),
        "[2001:720:420:c002::a]:10515"
    );
    assert_eq!(
        cfg.fireflies.address_map().unwrap(),
        [(
            "150.244.247.148/32".parse().unwrap(),
            "10.0.0.1".parse().unwrap()
        )]
    );
    assert!(!cfg.metrics.enabled);
    assert_eq!(rules, 0);
}

#[test]
fn flowd_go_perfsonar_sample() {
    let (cfg, rules) = check("flowd-go", "perfsonar.yaml");
    assert_eq!(cfg.marker.strategy.to_string(), "hop-by-hop+destination");
    assert_eq!(cfg.marker.interfaces, ["eno1"]);
    assert_eq!(rules, 1, "one rule without match fields: every flow");
}

#[test]
fn flowd_go_enrichment_sample() {
    let (cfg, rules) = check("flowd-go", "enrichment.yaml");
    assert_eq!(
        cfg.fireflies.enrich, None,
        "no firefly backend: nothing to enrich"
    );
    assert_eq!(rules, 0);
}

#[test]
fn flowd_packaged_sample() {
    let (cfg, rules) = check("flowd", "flowd.cfg");
    assert!(cfg.fireflies.enabled && cfg.fireflies.to_remote);
    assert_eq!(rules, 0, "no experiment configured");
}

#[test]
fn flowd_netstat_sample() {
    let (cfg, rules) = check("flowd", "netstat.cfg");
    assert_eq!(
        cfg.fireflies.collectors[0].to_string(),
        "collector.example.org:10514"
    );
    assert_eq!(cfg.marker.interfaces, ["eth0"]);
    assert_eq!(cfg.metrics.listen.to_string(), "0.0.0.0:9000");
    assert_eq!(
        cfg.fireflies.stun.servers[0].to_string(),
        "stun.l.google.com:19305"
    );
    assert_eq!(rules, 1);
}

#[test]
fn flowd_np_api_sample() {
    let (cfg, _) = check("flowd", "np_api.cfg");
    assert_eq!(cfg.announcements.pipe.unwrap(), Path::new("/var/run/flowd"));
}

#[test]
fn an_import_never_overwrites() {
    let (out, _) = import("flowd", "np_api.cfg");
    let o = Command::new(env!("CARGO_BIN_EXE_flowd-rs"))
        .args(["import", "flowd"])
        .arg(Path::new(FIXTURES).join("flowd/np_api.cfg"))
        .arg("--output")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists: import into an empty directory"));
}
