//! Evaluation, precedence, conflict detection and explanations.

#[path = "common/policy.rs"]
mod common;

use std::path::Path;

use common::{load, sock};
use flowd::model::socket::{Direction, Protocol};
use flowd::policy::{Outcome, Policy, Registry, SocketAttrs, StaticAccounts};

const ATLAS: &str = r#"
experiment = "atlas"

[[rule]]
name = "xrootd-data"
activity = "Production Input"
protocol = "tcp"
local_ports = [1094]

[[rule]]
name = "cern"
activity = "T0 Export"
local_ports = [1094]
remote_cidrs = ["188.184.0.0/15", "!188.184.108.0/24"]

[[rule]]
name = "debug"
activity = "Debug"
priority = 5
remote_cidrs = ["2001:db8::/32"]
"#;

fn xrootd_sock(remote: &str) -> SocketAttrs {
    sock(Protocol::Tcp, "192.0.2.10:1094", remote, Direction::Inbound)
}

#[test]
fn first_match_in_precedence_order_wins() {
    let p = load(&[("p/atlas.toml", ATLAS)]).unwrap();
    // Both "xrootd-data" (protocol + port: 2 fields) and "cern" (port + cidr: 2 fields,
    // prefix 111) match; "cern" is more specific by prefix.
    let v = p.evaluate(&xrootd_sock("188.185.1.2:40000")).unwrap();
    assert_eq!(
        (v.tag.experiment, v.tag.activity, v.rule.to_string()),
        (2, 20, "atlas.toml:cern".to_owned())
    );
    // Excluded sub-range falls through to the generic rule.
    let v = p.evaluate(&xrootd_sock("188.184.108.7:40000")).unwrap();
    assert_eq!(v.rule.to_string(), "atlas.toml:xrootd-data");
    assert_eq!(v.tag.activity, 15);
    // Priority beats specificity.
    let v = p
        .evaluate(&sock(
            Protocol::Tcp,
            "[2001:db8::1]:1094",
            "[2001:db8::2]:5000",
            Direction::Inbound,
        ))
        .unwrap();
    assert_eq!(v.rule.to_string(), "atlas.toml:debug");
    assert!(p
        .evaluate(&sock(
            Protocol::Udp,
            "192.0.2.10:53",
            "192.0.2.1:53",
            Direction::Outbound
        ))
        .is_none());
}

#[test]
fn rule_order_then_file_order_break_remaining_ties() {
    // Same tag, same priority and specificity: no conflict, first rule wins.
    let a = "experiment = 2\n[[rule]]\nname = \"one\"\nactivity = 1\nlocal_ports = [1]\n[[rule]]\nname = \"two\"\nactivity = 1\nlocal_ports = [1]\n";
    let b = "experiment = 2\n[[rule]]\nname = \"three\"\nactivity = 1\nlocal_ports = [1]\n";
    let p = load(&[("p/b.toml", b), ("p/a.toml", a)]).unwrap();
    let names: Vec<String> = p.rules().map(|r| r.id.to_string()).collect();
    assert_eq!(names, ["a.toml:one", "a.toml:two", "b.toml:three"]);
    let v = p
        .evaluate(&sock(
            Protocol::Tcp,
            "192.0.2.1:1",
            "192.0.2.2:9",
            Direction::Inbound,
        ))
        .unwrap();
    assert_eq!(v.rule.to_string(), "a.toml:one");
}

#[test]
fn specificity_counts_fields_then_prefix_then_port_narrowness() {
    let t = r#"
experiment = 2
[[rule]]
name = "wide-ports"
activity = 1
local_ports = ["1000-2000"]
[[rule]]
name = "narrow-ports"
activity = 2
local_ports = ["1000-1100"]
[[rule]]
name = "two-fields"
activity = 3
local_ports = ["1-65535"]
protocol = "tcp"
"#;
    let p = load(&[("p/x.toml", t)]).unwrap();
    let names: Vec<&str> = p.rules().map(|r| &*r.id.name).collect();
    assert_eq!(names, ["two-fields", "narrow-ports", "wide-ports"]);
    let s: Vec<String> = p.rules().map(|r| r.specificity.to_string()).collect();
    assert_eq!(
        s,
        [
            "fields 2, prefix 0, ports 1",
            "fields 1, prefix 0, ports 65435",
            "fields 1, prefix 0, ports 64535"
        ]
    );
}

#[test]
fn conflicts_respect_negation_and_disjoint_fields() {
    let conflict = |a: &str, b: &str| {
        let fa = format!("experiment = 2\n[[rule]]\nname = \"a\"\nactivity = 1\n{a}\n");
        let fb = format!("experiment = 3\n[[rule]]\nname = \"b\"\nactivity = 1\n{b}\n");
        !common::errors(&[("p/a.toml", &fa), ("p/b.toml", &fb)]).is_empty()
    };
    // Disjoint because the negation removes the whole intersection.
    assert!(!conflict(
        r#"remote_cidrs = ["10.0.0.0/8", "!10.1.0.0/16"]"#,
        r#"remote_cidrs = ["10.1.0.0/16"]"#
    ));
    // Negations covering the intersection only together.
    assert!(!conflict(
        r#"remote_cidrs = ["10.0.0.0/16", "!10.0.0.0/17"]"#,
        r#"remote_cidrs = ["10.0.0.0/16", "!10.0.128.0/17"]"#
    ));
    // One address left over -> overlap.
    assert!(conflict(
        r#"remote_cidrs = ["10.0.0.0/16", "!10.0.0.0/17"]"#,
        r#"remote_cidrs = ["10.0.0.0/16", "!10.0.128.0/18"]"#
    ));
    // Only-negative sets overlap each other (they share almost everything).
    assert!(conflict(
        r#"remote_cidrs = ["!10.0.0.0/8"]"#,
        r#"remote_cidrs = ["!11.0.0.0/8"]"#
    ));
    // Families never overlap.
    assert!(!conflict(
        r#"remote_cidrs = ["0.0.0.0/0"]"#,
        r#"remote_cidrs = ["::/0"]"#
    ));
    assert!(conflict(
        r#"local_ports = ["1-10"]"#,
        r#"local_ports = ["10-19"]"#
    ));
    assert!(!conflict(
        r#"local_ports = ["1-10"]"#,
        r#"local_ports = ["11-20"]"#
    ));
    assert!(!conflict(r#"users = ["xrootd"]"#, r#"users = ["dcache"]"#));
    assert!(conflict(r#"users = ["xrootd", 5]"#, r#"users = [996]"#));
    assert!(conflict(
        r#"cgroup = ["/system.slice/xrootd@*"]"#,
        r#"cgroup = ["/system.slice/xrootd@atlas.service/sub"]"#
    ));
    assert!(!conflict(
        r#"cgroup = ["/system.slice/xrootd@*"]"#,
        r#"cgroup = ["/system.slice/dcache.service"]"#
    ));
    assert!(!conflict(r#"protocol = "tcp""#, r#"protocol = "udp""#));
    // A field constrained by only one side does not separate them.
    assert!(conflict(
        "protocol = \"tcp\"\nlocal_ports = [1]",
        "direction = \"inbound\"\nlocal_ports = [1]"
    ));
}

#[test]
fn unknown_socket_facts_do_not_match_constraints_on_them() {
    let t = "experiment = 2\n[[rule]]\nname = \"u\"\nactivity = 1\nusers = [\"xrootd\"]\n[[rule]]\nname = \"d\"\nactivity = 1\ndirection = \"outbound\"\n";
    let p = load(&[("p/a.toml", t)]).unwrap();
    let mut s = sock(
        Protocol::Tcp,
        "192.0.2.1:1",
        "192.0.2.2:2",
        Direction::Unknown,
    );
    assert!(p.evaluate(&s).is_none());
    s.uid = Some(996);
    assert_eq!(p.evaluate(&s).unwrap().rule.to_string(), "a.toml:u");
}

#[test]
fn process_exe_cgroup_matching() {
    let t = r#"
experiment = 2
[[rule]]
name = "proc"
activity = 1
process = ["xrootd"]
exe = ["/usr/bin/xrootd"]
cgroup = ["/system.slice/xrootd@*", "/system.slice/cmsd.service"]
"#;
    let p = load(&[("p/a.toml", t)]).unwrap();
    assert!(!p.rules().next().unwrap().kernel_decidable());
    let mut s = sock(
        Protocol::Tcp,
        "192.0.2.1:1",
        "192.0.2.2:2",
        Direction::Inbound,
    );
    s.owner.comm = Some("xrootd".into());
    s.owner.exe = Some("/usr/bin/xrootd".into());
    for (cg, want) in [
        ("/system.slice/xrootd@atlas.service", true),
        ("/system.slice/xrootd@atlas.service/payload", true),
        ("/system.slice/cmsd.service", true),
        ("/system.slice/cmsd.service2", false),
        ("/system.slice/xrootd.service", false),
        ("/user.slice", false),
    ] {
        s.owner.cgroup = Some(cg.into());
        assert_eq!(p.evaluate(&s).is_some(), want, "{cg}");
    }
}

#[test]
fn kernel_decidable_excludes_userspace_only_fields() {
    let t = "experiment = 2\n[[rule]]\nname = \"k\"\nactivity = 1\nlocal_ports = [1]\nusers = [0]\nremote_cidrs = [\"::/0\"]\n[[rule]]\nname = \"g\"\nactivity = 1\ngroups = [0]\n";
    let p = load(&[("p/a.toml", t)]).unwrap();
    let flags: Vec<(String, bool)> = p
        .rules()
        .map(|r| (r.id.name.to_string(), r.kernel_decidable()))
        .collect();
    assert_eq!(flags, [("k".to_owned(), true), ("g".to_owned(), false)]);
}

#[test]
fn explain_lists_every_rule_with_its_outcome() {
    let p = load(&[("p/atlas.toml", ATLAS)]).unwrap();
    let mut s = xrootd_sock("188.185.1.2:40000");
    s.uid = Some(996);
    let e = p.explain(&s);
    assert_eq!(e.verdict, p.evaluate(&s));
    assert_eq!(
        e.to_string(),
        "socket: tcp 192.0.2.10:1094 -> 188.185.1.2:40000 inbound uid=996 gid=? comm=? exe=? cgroup=?\n\
         verdict: atlas/T0 Export (2/20) by atlas.toml:cern\n\
         \x20 1. atlas.toml:debug [atlas/Debug, priority 5]: no match: remote_cidrs: remote 188.185.1.2 not in [2001:db8::/32]\n\
         \x20 2. atlas.toml:cern [atlas/T0 Export, priority 0]: matched (chosen)\n\
         \x20 3. atlas.toml:xrootd-data [atlas/Production Input, priority 0]: matched but lower precedence than atlas.toml:cern\n"
    );
    let e = p.explain(&xrootd_sock("188.184.108.9:1"));
    assert_eq!(
        e.entries[1].outcome,
        Outcome::Failed {
            field: flowd::policy::Field::RemoteCidrs,
            reason: "remote 188.184.108.9 is excluded by !188.184.108.0/24".into()
        }
    );
    let e = p.explain(&sock(
        Protocol::Udp,
        "192.0.2.10:1094",
        "192.0.2.1:9",
        Direction::Inbound,
    ));
    assert!(e
        .to_string()
        .contains("verdict: untagged (no rule matched)"));
    assert_eq!(
        e.entries[2].outcome.to_string(),
        "no match: protocol: protocol udp is not tcp"
    );
}

#[test]
fn explain_reports_unknown_facts() {
    let t = "experiment = 2\n[[rule]]\nname = \"u\"\nactivity = 1\nusers = [\"xrootd\"]\n";
    let p = load(&[("p/a.toml", t)]).unwrap();
    let mut s = sock(
        Protocol::Tcp,
        "192.0.2.1:1",
        "192.0.2.2:2",
        Direction::Inbound,
    );
    assert_eq!(
        p.explain(&s).entries[0].outcome.to_string(),
        "no match: users: uid unknown"
    );
    s.uid = Some(1000);
    assert_eq!(
        p.explain(&s).entries[0].outcome.to_string(),
        "no match: users: uid 1000 not in [xrootd(996)]"
    );
}

#[test]
fn version_is_a_content_hash() {
    let a = load(&[("p/atlas.toml", ATLAS)]).unwrap();
    let b = load(&[("q/atlas.toml", ATLAS)]).unwrap();
    let c = load(&[("p/atlas.toml", &format!("{ATLAS}\n"))]).unwrap();
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
    assert_eq!(a.version().len(), 16);
}

#[test]
fn example_policies_validate_together() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let p = Policy::load_dir_with(&dir, &Registry::bundled(), &common::accounts())
        .unwrap_or_else(|e| panic!("example policies must validate:\n{e}"));
    assert!(p.rules().len() >= 10);
    let mut s = sock(
        Protocol::Tcp,
        "192.0.2.10:1094",
        "198.51.100.7:40000",
        Direction::Inbound,
    );
    s.uid = Some(996);
    assert_eq!(
        p.evaluate(&s).unwrap().rule.to_string(),
        "atlas.toml:xrootd-reads"
    );
    let mut s = sock(
        Protocol::Tcp,
        "192.0.2.10:22000",
        "198.51.100.7:40000",
        Direction::Inbound,
    );
    s.owner.comm = Some("globus-gridftp-".into());
    let v = p.evaluate(&s).unwrap();
    assert_eq!((v.tag.experiment, v.tag.activity), (3, 12));
}

#[test]
fn load_dir_skips_non_toml_and_reports_missing_dir() {
    let dir = std::env::temp_dir().join(format!("flowd-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README"), "not a policy").unwrap();
    std::fs::write(dir.join(".atlas.toml.swp"), "garbage").unwrap();
    std::fs::write(dir.join("atlas.toml"), ATLAS).unwrap();
    let p = Policy::load_dir_with(&dir, &Registry::bundled(), &StaticAccounts::default()).unwrap();
    assert_eq!(p.rules().len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
    let e = Policy::load_dir(&dir, &Registry::bundled()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:1:1: cannot read:", dir.display())),
        "{e}"
    );
}

#[test]
fn system_accounts_resolve_root() {
    let t = "experiment = 2\n[[rule]]\nname = \"r\"\nactivity = 1\nusers = [\"root\"]\ngroups = [\"root\"]\n";
    let p = Policy::from_sources(&[("p/a.toml".into(), t.into())], &Registry::bundled()).unwrap();
    let m = &p.rules().next().unwrap().matcher;
    assert_eq!(m.users.as_ref().unwrap()[0].id, 0);
    assert_eq!(m.groups.as_ref().unwrap()[0].id, 0);
}

#[test]
fn cidr_matching_is_family_exact_and_accepts_bare_addresses() {
    let t = "experiment = 2\n[[rule]]\nname = \"h\"\nactivity = 1\nremote_cidrs = [\"192.0.2.7\", \"2001:db8::7\"]\n";
    let p = load(&[("p/a.toml", t)]).unwrap();
    let hit = |r: &str| {
        p.evaluate(&sock(Protocol::Tcp, "[::1]:1", r, Direction::Outbound))
            .is_some()
    };
    assert!(hit("192.0.2.7:1"));
    assert!(hit("[2001:db8::7]:1"));
    assert!(!hit("[::ffff:192.0.2.7]:1"));
    assert!(!hit("192.0.2.8:1"));
}

const MATCH_ALL: &str = r#"
experiment = "default"

[[rule]]
name = "everything"
activity = "perfSONAR"
match_all = true
"#;

#[test]
fn match_all_is_below_every_rule_whatever_the_priority_and_takes_the_rest() {
    let low = ATLAS.replace("priority = 5", "priority = -100");
    let p = load(&[("p/atlas.toml", &low), ("p/00-perfsonar.toml", MATCH_ALL)]).unwrap();
    // Last in precedence even though its file sorts first and atlas has -100.
    let last = p.rules().last().unwrap();
    assert!(last.match_all);
    assert_eq!(last.id.to_string(), "00-perfsonar.toml:everything");
    let v = p
        .evaluate(&sock(
            Protocol::Tcp,
            "[2001:db8::1]:5000",
            "[2001:db8::2]:5000",
            Direction::Inbound,
        ))
        .unwrap();
    // Priority -100 still beats the match-all rule.
    assert_eq!(v.rule.to_string(), "atlas.toml:debug");
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let v = p
            .evaluate(&sock(
                proto,
                "[fd00::1]:40000",
                "[fd00::2]:53",
                Direction::Outbound,
            ))
            .unwrap();
        assert_eq!(v.rule.to_string(), "00-perfsonar.toml:everything");
        assert_eq!((v.tag.experiment, v.tag.activity), (1, 2));
    }
    // Compiled into the kernel as the last rule, with its tag as the default mark.
    let k = flowd::policy::kernel::KernelPolicy::compile(p.rules());
    assert_eq!(k.match_all, Some((1, 2)));
    assert_eq!(k.rules.len(), 4);
}

#[test]
fn match_all_takes_no_field_no_priority_and_one_tag_per_host() {
    let with_field = format!("{MATCH_ALL}local_ports = [1]\n");
    let e = common::errors(&[("p/ps.toml", &with_field)]);
    assert!(
        e[0].contains("takes no match field and no `priority`"),
        "{e:?}"
    );
    let with_priority = format!("{MATCH_ALL}priority = 1\n");
    assert!(common::errors(&[("p/ps.toml", &with_priority)])[0].contains("no `priority`"));
    let other = MATCH_ALL.replace("perfSONAR", "Cache");
    let e = common::errors(&[("p/a.toml", MATCH_ALL), ("p/b.toml", &other)]);
    assert!(
        e[0].contains("are both `match_all` with different tags"),
        "{e:?}"
    );
    // The same tag twice is no conflict.
    assert!(load(&[("p/a.toml", MATCH_ALL), ("p/b.toml", MATCH_ALL)]).is_ok());
    // Without it, no kernel default.
    let p = load(&[("p/atlas.toml", ATLAS)]).unwrap();
    assert_eq!(
        flowd::policy::kernel::KernelPolicy::compile(p.rules()).match_all,
        None
    );
}
