use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use super::*;

/// A live loopback connection, asked for by its 5-tuple: the kernel's answer is
/// this socket's (its byte counts), rendered with flowd-go's names.
#[test]
fn a_targeted_request_answers_for_exactly_the_flow_asked() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(&[7u8; 12_345]).unwrap();
    let mut buf = vec![0u8; 12_345];
    server.read_exact(&mut buf).unwrap();
    let key = FlowKey::new(
        Protocol::Tcp,
        client.local_addr().unwrap(),
        client.peer_addr().unwrap(),
    );
    let mut q = TcpInfoQuery::new().unwrap();
    let facts = q.query(&key).unwrap().expect("the socket exists");
    assert!(
        facts.info.len() >= 232,
        "tcp_info of {} bytes",
        facts.info.len()
    );
    let cong = facts.cong.clone().expect("a congestion control");
    assert!(!cong.is_empty());
    let full: serde_json::Value = serde_json::from_str(&render(&facts, Mode::Full)).unwrap();
    assert_eq!(full["tcpInfo"]["bytesSent"], 12_345, "{full}");
    assert_eq!(
        full["tcpInfo"]["bytesAcked"], 12_346,
        "the SYN counts: {full}"
    );
    assert_eq!(full["tcpInfo"]["state"], 1, "established");
    assert_eq!(full["cong"]["algorithm"], cong.as_str());
    // The server end, asked from its side, sent nothing.
    let server_key = FlowKey::new(
        Protocol::Tcp,
        server.local_addr().unwrap(),
        server.peer_addr().unwrap(),
    );
    let s = render(&q.query(&server_key).unwrap().unwrap(), Mode::Full);
    let s: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(s["tcpInfo"]["bytesSent"], 0, "{s}");
    assert_eq!(s["tcpInfo"]["bytesRecv"], 12_345, "{s}");
    // A 5-tuple with no socket: gone, not an error.
    drop((client, server));
    let nobody = FlowKey::new(
        Protocol::Tcp,
        "127.0.0.1:9".parse().unwrap(),
        "127.0.0.1:10".parse().unwrap(),
    );
    assert_eq!(q.query(&nobody).unwrap(), None);
}

#[test]
fn lean_keeps_flowd_gos_lean_fields_full_has_every_tcp_info_field() {
    let mut info = vec![0u8; 232];
    info[2] = 3; // retransmits
    info[6] = 0x97; // snd_wscale 7, rcv_wscale 9
    info[68..72].copy_from_slice(&101_800u32.to_ne_bytes()); // rtt
    info[200..208].copy_from_slice(&745u64.to_ne_bytes()); // bytes_sent
    let facts = TcpFacts {
        info,
        cong: Some("cubic".into()),
    };
    let lean: serde_json::Value = serde_json::from_str(&render(&facts, Mode::Lean)).unwrap();
    let keys: Vec<&str> = lean["tcpInfo"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let mut want = vec![
        "Retransmits",
        "sndMss",
        "pMtu",
        "rtt",
        "rttVar",
        "sndSsThresh",
        "sndCwnd",
        "advMss",
        "minRtt",
        "deliveryRate",
        "bytesSent",
    ];
    want.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, want);
    assert_eq!(lean["tcpInfo"]["Retransmits"], 3);
    assert_eq!(lean["tcpInfo"]["rtt"], 101_800);
    assert_eq!(lean["tcpInfo"]["bytesSent"], 745);
    assert_eq!(lean["cong"], serde_json::json!({"algorithm": "cubic"}));
    let full: serde_json::Value = serde_json::from_str(&render(&facts, Mode::Full)).unwrap();
    assert_eq!(full["tcpInfo"].as_object().unwrap().len(), 56);
    assert_eq!(full["tcpInfo"]["sndWscale"], 7);
    assert_eq!(full["tcpInfo"]["rcvdWscale"], 9);
    assert_eq!(full["tcpInfo"]["retransmits"], 3);
    // An older kernel's shorter tcp_info: the fields it lacks are left out.
    let short = TcpFacts {
        info: facts.info[..104].to_vec(),
        cong: None,
    };
    let v: serde_json::Value = serde_json::from_str(&render(&short, Mode::Full)).unwrap();
    assert!(v["tcpInfo"].get("pacingRate").is_none() && v.get("cong").is_none());
    assert_eq!(v["tcpInfo"]["totalRetrans"], 0);
}
