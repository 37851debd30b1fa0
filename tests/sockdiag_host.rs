//! Unprivileged: sock_diag dumps of the current namespace need no capability, so these
//! run everywhere (loopback sockets of our own, looked up by cookie).

mod common;

use std::net::{TcpListener, TcpStream};

use common::{cookie, inode};
use flowd::discovery::sockdiag::{SockDiag, SockDiagError};
use flowd::model::socket::{Direction, FlowKey, Protocol, SockState};

#[test]
fn dump_of_own_namespace_finds_our_loopback_connection() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    let mut sd = SockDiag::new().unwrap();
    let mut out = Vec::new();
    sd.dump(&mut out).unwrap();
    let o = out
        .iter()
        .find(|o| o.cookie == cookie(&c))
        .expect("client in dump");
    let key = FlowKey::new(
        Protocol::Tcp,
        c.local_addr().unwrap(),
        c.peer_addr().unwrap(),
    );
    assert_eq!(o.key, key);
    assert_eq!(
        (o.state, o.direction, o.inode),
        (SockState::Established, Direction::Outbound, inode(&c))
    );
    let o = out
        .iter()
        .find(|o| o.cookie == cookie(&s))
        .expect("server in dump");
    assert_eq!(o.direction, Direction::Inbound);
    // Buffers are reused: a second dump into the same Vec gives the same sockets.
    let n = out.len();
    sd.dump(&mut out).unwrap();
    assert!(out.iter().any(|o| o.cookie == cookie(&c)));
    assert!(out.len().abs_diff(n) < 1000);
    assert_eq!(sd.stats().dump_errors, 0);
}

#[test]
fn poller_for_missing_namespace_is_an_error_naming_the_path() {
    let e = SockDiag::in_netns("/nonexistent/netns/x")
        .err()
        .expect("must fail");
    assert!(matches!(e, SockDiagError::Netns { .. }));
    assert!(!e.is_incomplete_dump());
    assert!(e.to_string().contains("/nonexistent/netns/x"), "{e}");
}
