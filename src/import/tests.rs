use super::flowd::{parse, Py};
use super::*;

#[test]
fn flowd_literals_parse_as_python_reads_them() {
    let keys = parse(
        "# comment\nPLUGIN='netstat'\nNETSTAT_EXPERIMENT = 2 # inline\n\
         NETSTAT_INTERNAL_NETWORKS=('192.168.0.0/16')\nNETWORK_INTERFACE=['eth0', \"eth1\",]\n\
         IP_DISCOVERY_ENABLED = False\nT=('a',)\n",
    )
    .unwrap();
    let v = |k: &str| keys.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(v("PLUGIN"), Py::Str("netstat".into()));
    assert_eq!(v("NETSTAT_EXPERIMENT"), Py::Int(2));
    // A parenthesised string without a comma is a string, not a tuple.
    assert_eq!(
        v("NETSTAT_INTERNAL_NETWORKS"),
        Py::Str("192.168.0.0/16".into())
    );
    assert_eq!(
        v("NETWORK_INTERFACE"),
        Py::List(vec![Py::Str("eth0".into()), Py::Str("eth1".into())])
    );
    assert_eq!(v("IP_DISCOVERY_ENABLED"), Py::Bool(false));
    assert_eq!(v("T"), Py::List(vec![Py::Str("a".into())]));
    assert!(parse("X = os.system('x')").is_err());
    assert!(parse("just text").is_err());
}

#[test]
fn flowd_go_strategies_and_paths() {
    let imp = from_flowd_go(
        "workDir: /srv/fg\nplugins:\n  namedPipe: {}\nbackends:\n  marker:\n    markingStrategy: hopByHopDestination\n    discoverInterfaces: true\n",
    )
    .unwrap();
    assert_eq!(
        imp.get("announcements", "pipe").unwrap().as_str(),
        Some("/srv/fg/np")
    );
    assert_eq!(
        imp.get("marker", "strategy").unwrap().as_str(),
        Some("hop-by-hop+destination")
    );
    assert_eq!(
        imp.get("marker", "interfaces")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(imp.unmapped[0].key, "workDir");
}

#[test]
fn flowd_go_bind_addresses_are_ip_addresses() {
    let imp = from_flowd_go(
        "plugins:\n  api:\n    bindAddress: localhost\n  firefly:\n    bindAddress: flowd.example\n",
    )
    .unwrap();
    assert_eq!(
        imp.get("announcements", "http_listen").unwrap().as_str(),
        Some("127.0.0.1:7777")
    );
    assert!(imp.get("announcements", "firefly_listen").is_none());
    assert_eq!(imp.unmapped[0].key, "plugins.firefly.bindAddress");
}
