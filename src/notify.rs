//! The systemd notification protocol (`Type=notify`), written by hand: one datagram
//! of `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET`. This is the whole
//! protocol as far as flowd-rs uses it (READY, RELOADING, STOPPING, STATUS), so a
//! crate would add a dependency for twenty lines.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`) every
//! call does nothing; a failed send is logged once at debug level and never stops
//! the daemon.

use std::os::unix::net::UnixDatagram;

/// `READY=1`: the marker is attached and the first sock_diag dump reconciled, so
/// `systemctl start` returns once marking is live.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}\n"));
}

/// `RELOADING=1` before a policy reload; [`ready`] after it. MONOTONIC_USEC lets
/// systemd >= 253 tell this reload from an earlier one.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\n"));
}

/// `STOPPING=1`: detaching; `systemctl status` shows it while the marks go.
pub fn stopping() {
    send("STOPPING=1\n");
}

fn send(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_to(&path, msg) {
        tracing::debug!(socket = ?path, error = %e, "systemd notification not sent");
    }
}

/// Sends `msg` to `path`; a leading `@` names a Linux abstract socket.
pub fn send_to(path: &std::ffi::OsStr, msg: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::SocketAddr;
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1\nSTATUS=x\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("flowd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }
}
