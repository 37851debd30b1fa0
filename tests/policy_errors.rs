//! Every error message, exact text and exact `file:line:col`.
//!
//! Each case is one policy file `p/atlas.toml`; the expected list is every error the
//! loader must report for it, in order.

#[path = "common/policy.rs"]
mod common;

use flowd::policy::ErrorKind;

const CASES: &[(&str, &str, &[&str])] = &[
    (
        "toml_syntax_error",
        "experiment = \"atlas\"\n[[rule]\nname = \"x\"\n",
        &[
            "p/atlas.toml:2:8: TOML syntax error: unclosed array table, expected `]`",
        ],
    ),
    (
        "unknown_rule_field_suggests_and_lists_allowed",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nlocal_port = [1094]\n",
        &[
            "p/atlas.toml:5:1: unknown field `local_port`; did you mean `local_ports`? allowed fields here: `name`, `description`, `activity`, `scitag`, `priority`, `match_all`, `protocol`, `direction`, `local_cidrs`, `remote_cidrs`, `local_ports`, `remote_ports`, `users`, `groups`, `process`, `exe`, `cgroup`",
        ],
    ),
    (
        "unknown_top_level_field",
        "experiment = \"atlas\"\nexperimnt = 2\n",
        &[
            "p/atlas.toml:2:1: unknown field `experimnt`; did you mean `experiment`? allowed fields here: `experiment`, `enabled`, `description`, `rule`",
        ],
    ),
    (
        "bad_cidrs_each_reported",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nremote_cidrs = [\"10.0.0.0/33\", \"10.0.0.1/8\", \"!fe80::1/64\", \"2001:db8::/32\", \"host\"]\n",
        &[
            "p/atlas.toml:5:17: invalid CIDR \"10.0.0.0/33\": expected an address or address/prefix such as \"192.0.2.0/24\" or \"2001:db8::/32\", optionally preceded by \"!\" to exclude it",
            "p/atlas.toml:5:32: CIDR \"10.0.0.1/8\" has bits set after the prefix length; did you mean \"10.0.0.0/8\"?",
            "p/atlas.toml:5:46: CIDR \"!fe80::1/64\" has bits set after the prefix length; did you mean \"!fe80::/64\"?",
            "p/atlas.toml:5:78: invalid CIDR \"host\": expected an address or address/prefix such as \"192.0.2.0/24\" or \"2001:db8::/32\", optionally preceded by \"!\" to exclude it",
        ],
    ),
    (
        "bad_ports_each_reported",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nlocal_ports = [0, 65536, \"25000-20000\", \"a-b\", 1.5, \"1-70000\"]\n",
        &[
            "p/atlas.toml:5:16: port 0 is out of range; ports are 1-65535 (omit the field to match any port)",
            "p/atlas.toml:5:19: port 65536 is out of range; ports are 1-65535 (omit the field to match any port)",
            "p/atlas.toml:5:26: port range \"25000-20000\" is reversed; write \"20000-25000\"",
            "p/atlas.toml:5:41: invalid port range \"a-b\": expected a port number or a \"lo-hi\" range such as \"20000-25000\"",
            "p/atlas.toml:5:48: expected a port number or a \"lo-hi\" range string, not a float",
            "p/atlas.toml:5:53: port 70000 is out of range; ports are 1-65535 (omit the field to match any port)",
        ],
    ),
    (
        "unknown_experiment_suggests",
        "experiment = \"atlass\"\n",
        &[
            "p/atlas.toml:1:14: unknown experiment \"atlass\"; did you mean \"atlas\"?",
        ],
    ),
    (
        "unknown_experiment_lists_known",
        "experiment = \"zzz\"\n",
        &[
            "p/atlas.toml:1:14: unknown experiment \"zzz\"; known names: \"default\", \"atlas\", \"cms\", \"lhcb\", \"alice\", \"belleii\", \"ska\", \"dune\", \"lsst\", \"ilc\", \"auger\", \"juno\", \"nova\", \"xenon\"",
        ],
    ),
    (
        "unknown_activity_suggests",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = \"Production Inptu\"\n",
        &[
            "p/atlas.toml:4:12: unknown activity \"Production Inptu\" in experiment \"atlas\"; did you mean \"Production Input\" or \"Production Output\"?",
        ],
    ),
    (
        "activity_by_normalised_name_is_accepted",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = \"production_input\"\n",
        &[
        ],
    ),
    (
        "scitag_disagrees_with_experiment",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nscitag = 196\n",
        &[
            "p/atlas.toml:4:10: scitag 196 is experiment 3 (cms), activity 4, but this file is for experiment 2 (atlas); use `activity = 4` or move the rule to that experiment's file",
        ],
    ),
    (
        "duplicate_rule_name",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nlocal_ports = [1]\n[[rule]]\nname = \"x\"\nactivity = 1\nlocal_ports = [2]\n",
        &[
            "p/atlas.toml:7:8: duplicate rule name \"x\" (first used by the rule at line 2); rule names must be unique within a file",
        ],
    ),
    (
        "unknown_user_and_group",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nusers = [\"nobody-here\", 5]\ngroups = [\"nogroup-here\"]\n",
        &[
            "p/atlas.toml:5:10: unknown user \"nobody-here\": no such user on this host; fix the name, create the account, or give the numeric id",
            "p/atlas.toml:6:11: unknown group \"nogroup-here\": no such group on this host; fix the name, create the account, or give the numeric id",
        ],
    ),
    (
        "process_name_too_long",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nprocess = [\"globus-gridftp-server\", \"xrootd\"]\n",
        &[
            "p/atlas.toml:5:12: process name \"globus-gridftp-server\" is 21 bytes long, but the kernel keeps only the first 15 bytes of a command name, so it can never match; write \"globus-gridftp-\" or match on `exe` instead",
        ],
    ),
    (
        "relative_exe_path",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nexe = [\"usr/bin/xrootd\"]\n",
        &[
            "p/atlas.toml:5:8: exe path \"usr/bin/xrootd\" is not absolute; write the full path of the executable as /proc/PID/exe shows it, e.g. \"/usr/bin/xrootd\"",
        ],
    ),
    (
        "bad_cgroups",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\ncgroup = [\"system.slice\", \"/system.slice/xrootd@\", \"/a*/b\"]\n",
        &[
            "p/atlas.toml:5:11: cgroup \"system.slice\" is not absolute; write the cgroup v2 path as in /proc/PID/cgroup, e.g. \"/system.slice/xrootd.service\"",
            "p/atlas.toml:5:27: cgroup \"/system.slice/xrootd@\" ends in '@', which matches whole path components only and so never matches a unit instance; write \"/system.slice/xrootd@*\" to match every instance",
            "p/atlas.toml:5:52: cgroup \"/a*/b\": '*' is allowed only at the end of the last component",
        ],
    ),
    (
        "rule_without_tag",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\n",
        &[
            "p/atlas.toml:2:1: rule \"x\" has no tag; add `activity = \"...\"` (a name or an id) or `scitag = N`",
        ],
    ),
    (
        "rule_table_instead_of_array",
        "experiment = \"atlas\"\n[rule]\nname = \"x\"\n",
        &[
            "p/atlas.toml:2:1: rules are an array of tables: write `[[rule]]`, not `[rule]`",
        ],
    ),
    (
        "scalar_where_list_expected",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nprocess = \"xrootd\"\n",
        &[
            "p/atlas.toml:5:11: invalid type: string \"xrootd\", expected a list: write the value in brackets, e.g. `[\"value\"]`",
        ],
    ),
    (
        "empty_list",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nusers = []\n",
        &[
            "p/atlas.toml:5:9: `users` is an empty list, which matches nothing; remove the field to match any value",
        ],
    ),
    (
        "experiment_id_out_of_range",
        "experiment = 0\n",
        &[
            "p/atlas.toml:1:14: experiment id 0 is out of range; experiment ids are 1-511",
        ],
    ),
    (
        "experiment_wrong_type",
        "experiment = true\n",
        &[
            "p/atlas.toml:1:14: `experiment` must be a name such as \"atlas\" or an id such as 2, not a boolean",
        ],
    ),
    (
        "missing_experiment",
        "[[rule]]\nname = \"x\"\n",
        &[
            "p/atlas.toml:1:1: missing required field `experiment`",
        ],
    ),
    (
        "missing_rule_name",
        "experiment = \"atlas\"\n[[rule]]\nactivity = 1\n",
        &[
            "p/atlas.toml:2:1: missing required field `name`",
        ],
    ),
    (
        "activity_and_scitag_both",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 64\nscitag = 1\n",
        &[
            "p/atlas.toml:5:10: give either `activity` or `scitag`, not both",
        ],
    ),
    (
        "activity_id_out_of_range",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 64\n",
        &[
            "p/atlas.toml:4:12: activity id 64 is out of range; activity ids are 0-63",
        ],
    ),
    (
        "bad_scitag_protocol_direction",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nscitag = 5\nprotocol = \"sctp\"\ndirection = \"in\"\n",
        &[
            "p/atlas.toml:4:10: scitag 5 is not a valid tag; a scitag is experiment id (1-511) * 64 + activity id (0-63), i.e. 64-32767",
            "p/atlas.toml:5:12: unknown protocol \"sctp\"; expected \"tcp\" or \"udp\"",
            "p/atlas.toml:6:13: unknown direction \"in\"; expected \"outbound\" (this host connected) or \"inbound\" (this host accepted)",
        ],
    ),
    (
        "activity_name_for_experiment_not_in_registry",
        "experiment = 300\n[[rule]]\nname = \"x\"\nactivity = \"default\"\n",
        &[
            "p/atlas.toml:4:12: experiment 300 is not in the registry, so activity names cannot be resolved; give the activity id (0-63)",
        ],
    ),
    (
        "priority_out_of_range",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\npriority = 3000000000\n",
        &[
            "p/atlas.toml:5:12: priority 3000000000 is out of range; use a value between -2147483648 and 2147483647",
        ],
    ),
    (
        "duplicate_key_is_syntax_error",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nactivity = 2\n",
        &[
            "p/atlas.toml:5:1: TOML syntax error: duplicate key `activity`; a key may appear only once per table",
        ],
    ),
    (
        "wrong_type_in_rule",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\npriority = \"high\"\n",
        &[
            "p/atlas.toml:5:12: invalid type: string \"high\", expected an integer",
        ],
    ),
    (
        "unicode_columns_count_characters",
        "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = 1\nlocal_ports = [\"é\", 0]\n",
        &[
            "p/atlas.toml:5:16: invalid port range \"é\": expected a port number or a \"lo-hi\" range such as \"20000-25000\"",
            "p/atlas.toml:5:21: port 0 is out of range; ports are 1-65535 (omit the field to match any port)",
        ],
    ),
];

#[test]
fn every_error_message_is_exact() {
    let mut failures = Vec::new();
    for (name, text, expected) in CASES {
        let got = common::errors(&[("p/atlas.toml", text)]);
        if got != *expected {
            failures.push(format!(
                "case {name}:\n  expected {expected:#?}\n  got {got:#?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn loading_a_directory_collects_errors_of_all_files_in_file_order() {
    let got = common::errors(&[
        (
            "p/z.toml",
            "experiment = \"cms\"\n[[rule]]\nname = \"a\"\nactivity = 1\nlocal_ports = [0]\n",
        ),
        ("p/a.toml", "experiment = \"atlas\"\n[[rule]\n"),
        (
            "p/m.toml",
            "experiment = \"lhcb\"\n[[rule]]\nname = \"a\"\nactivity = \"nope\"\nexe = [\"x\"]\n",
        ),
    ]);
    assert_eq!(
        got,
        [
            "p/a.toml:2:8: TOML syntax error: unclosed array table, expected `]`",
            "p/m.toml:4:12: unknown activity \"nope\" in experiment \"lhcb\"; known names: \"default\", \"perfSONAR\", \"Cache\", \"Data Challenge\"",
            "p/m.toml:5:8: exe path \"x\" is not absolute; write the full path of the executable as /proc/PID/exe shows it, e.g. \"/usr/bin/xrootd\"",
            "p/z.toml:5:16: port 0 is out of range; ports are 1-65535 (omit the field to match any port)",
        ]
    );
}

#[test]
fn overlapping_rules_of_different_tags_across_files_name_both_locations() {
    let a = "experiment = \"atlas\"\n[[rule]]\nname = \"a\"\nactivity = 1\nlocal_ports = [1094]\n";
    let b = "experiment = \"cms\"\n\n[[rule]]\nname = \"b\"\nactivity = 1\nlocal_ports = [1094]\n";
    assert_eq!(
        common::errors(&[("p/atlas.toml", a), ("p/cms.toml", b)]),
        ["p/cms.toml:3:1: rule \"b\" (cms/default) can match the same sockets as rule \"a\" (atlas/default) at p/atlas.toml:2:1, with equal priority 0 and equal specificity (fields 1, prefix 0, ports 65535); give one of them a higher `priority` or narrow one so that they cannot overlap"]
    );
    let e = common::load(&[("p/atlas.toml", a), ("p/cms.toml", b)]).unwrap_err();
    assert_eq!(e.0[0].kind, ErrorKind::Conflict);
    assert_eq!((e.0[0].line, e.0[0].col), (3, 1));
}

#[test]
fn ambiguous_activity_name_is_an_error_naming_both() {
    let json = r#"{"version": 1, "experiments": [{"expName": "atlas", "expId": 2, "activities": [
        {"activityName": "Data Rebalancing", "activityId": 8},
        {"activityName": "Data rebalancing", "activityId": 7}]}]}"#;
    let reg = flowd::policy::Registry::from_json_bytes(json.as_bytes()).unwrap();
    let text = "experiment = \"atlas\"\n[[rule]]\nname = \"x\"\nactivity = \"data-rebalancing\"\n";
    let e = flowd::policy::Policy::from_sources_with(
        &[("p/atlas.toml".into(), text.to_owned())],
        &reg,
        &common::accounts(),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "p/atlas.toml:4:12: activity \"data-rebalancing\" is ambiguous in experiment \"atlas\": it matches \"Data Rebalancing\", \"Data rebalancing\"; write the name exactly or use the numeric id"
    );
    assert_eq!(e.0[0].kind, ErrorKind::AmbiguousName);
}

#[test]
fn disabled_file_is_validated_but_contributes_no_rules() {
    let bad = "experiment = \"atlas\"\nenabled = false\n[[rule]]\nname = \"x\"\nactivity = 99\n";
    assert_eq!(
        common::errors(&[("p/atlas.toml", bad)]),
        ["p/atlas.toml:5:12: activity id 99 is out of range; activity ids are 0-63"]
    );
    let off = "experiment = \"atlas\"\nenabled = false\n[[rule]]\nname = \"x\"\nactivity = 1\n";
    let p = common::load(&[("p/atlas.toml", off)]).unwrap();
    assert_eq!(p.rules().len(), 0);
}
