//! The systemd notification protocol as the packaged unit (`Type=notify`) sees it:
//! READY=1 only once the marker is attached and the first dump has marked what
//! already existed, RELOADING=1 then READY=1 around a reload, STOPPING=1 at stop.
//! Privileged: a daemon in a namespace pair.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

/// The next notification; `log` gives the daemon's log for the failure message.
fn next(rx: &UnixDatagram, log: &dyn Fn() -> String) -> String {
    let mut buf = [0u8; 512];
    let n = rx
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification ({e}); daemon log:\n{}", log()));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_follows_the_first_dump_and_reloads_and_stops_are_announced() {
    if !privileged() {
        return;
    }
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    // A connection that exists before the daemon starts: only the first dump finds it.
    let server = pair.b.run(|| {
        let l = TcpListener::bind(SocketAddr::new(ADDR_B.into(), 5301)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 1];
        let _ = s.read(&mut buf); // held open until the client closes
    });
    std::thread::sleep(Duration::from_millis(200));
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let client = pair.a.run(move || {
        let mut s = TcpStream::connect(SocketAddr::new(ADDR_B.into(), 5301)).unwrap();
        let _ = hold_rx.recv();
        let _ = s.write_all(b"x");
    });
    let policies = policies_with(
        dir.path(),
        &[(
            "atlas.toml",
            "experiment = \"atlas\"\n[[rule]]\nname = \"existing\"\n\
             activity = \"Data Consolidation\"\nremote_ports = [5301]\n",
        )],
    );
    let notify = dir.path().join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // The daemon inherits it, as from systemd (this test binary starts one daemon).
    std::env::set_var("NOTIFY_SOCKET", &notify);
    let d = Daemon::start_with(
        &pair.a,
        dir.path(),
        &format!(
            "[policy]\ndir = \"{}\"\n[marker]\ninterfaces = [\"{IF_A}\"]\n[metrics]\nenabled = false\n",
            policies.display()
        ),
    );

    let ready = next(&rx, &|| d.log());
    assert!(
        ready.starts_with("READY=1\nSTATUS=marking, policy "),
        "{ready:?}"
    );
    // At READY the pre-existing connection is already tagged.
    let flows = d.cli_ok(&["inspect", "--once", "--json"]);
    let flow = flows
        .lines()
        .find(|l| l.contains(":5301"))
        .unwrap_or_else(|| panic!("no flow to 5301 at READY:\n{flows}"));
    assert!(flow.contains("\"experiment_name\":\"atlas\""), "{flow}");
    assert!(
        d.cli_ok(&["status"]).contains(IF_A),
        "marker not attached at READY"
    );

    d.signal(nix::sys::signal::Signal::SIGHUP);
    let r = next(&rx, &|| d.log());
    assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r:?}");
    assert!(next(&rx, &|| d.log()).starts_with("READY=1\n"));
    // `systemctl reload` runs `flowd-rs reload`: the same, synchronously.
    d.cli_ok(&["reload"]);
    assert!(next(&rx, &|| d.log()).starts_with("RELOADING=1\n"));
    assert!(next(&rx, &|| d.log()).starts_with("READY=1\n"));

    hold_tx.send(()).unwrap();
    client.join().unwrap();
    server.join().unwrap();
    let log = d.stop();
    assert_eq!(next(&rx, &|| log.clone()), "STOPPING=1\n");
}
