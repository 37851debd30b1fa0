//! Shared helpers for the privileged integration tests: gating, network namespaces,
//! packet captures, and running the daemon.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

pub mod live_flow;
mod patience;
pub mod sockdiag;
pub mod tracker;
pub use patience::patient;

/// Whether privileged tests run. In CI (`FLOWD_PRIVILEGED_TESTS=1`) they must: a
/// missing privilege is then a failure, not a skip.
pub fn privileged() -> bool {
    let required = std::env::var("FLOWD_PRIVILEGED_TESTS").is_ok_and(|v| v == "1");
    let root = nix::unistd::geteuid().is_root();
    if required {
        assert!(
            root,
            "FLOWD_PRIVILEGED_TESTS=1 but the tests do not run as root"
        );
        return true;
    }
    if !root {
        eprintln!("skipped: needs root (CI sets FLOWD_PRIVILEGED_TESTS=1 to make this a failure)");
    }
    root
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace of our own, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "fl{tag}{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Inode of the namespace: what the tracker and sock_diag report as `netns`.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).expect("netns file").ino()
    }

    /// `ip -n <ns> ARGS...`
    pub fn ip(&self, args: &[&str]) {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        let out = c.output().expect("ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Routes 10.201.0.0/24 to a veth peer that silently discards: SYNs sent there
    /// get no answer (connect timeout) without firewall rules.
    pub fn add_black_hole(&self) {
        self.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        self.ip(&["link", "set", "v0", "up"]);
        self.ip(&["link", "set", "v1", "up"]);
        self.ip(&["addr", "add", "10.200.0.1/24", "dev", "v0"]);
        self.ip(&[
            "neigh",
            "add",
            "10.200.0.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "v0",
            "nud",
            "permanent",
        ]);
        self.ip(&["route", "add", "10.201.0.0/24", "via", "10.200.0.2"]);
    }

    /// Runs `f` inside this namespace and waits for its result.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.run(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Runs `f` on a thread that lives in this namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// `ip netns exec <ns> <program>`.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn sh(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} sh -c '{cmd}'", self.name))
    }

    /// The index of interface `ifname` in the namespace.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        self.sh(&format!("cat /sys/class/net/{ifname}/ifindex"))
            .trim()
            .parse()
            .unwrap()
    }

    /// The programs attached to `ifname`'s TCX egress, as the kernel lists them.
    pub fn tcx_egress(&self, ifname: &str) -> Vec<String> {
        let ifindex = self.ifindex(ifname);
        self.run(move || flowd::marker::attach::tcx_egress_programs(ifindex).unwrap())
            .join()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A daemon that died with its marker pinned under the default pin_dir (a
        // test that kills it) leaves the namespace's pins behind, maps and all:
        // nothing would reuse them once the namespace is gone.
        if let Ok(m) = std::fs::metadata(format!("/run/netns/{}", self.name)) {
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/flowd-rs/net{}", m.ino()));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two hosts joined by a veth pair: `a` (fd00:f1::1 on `veth_a`) and `b`
/// (fd00:f1::2 on `veth_b`), plus 10.201.0.1/2 for IPv4.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
}

pub const IF_A: &str = "vfa";
pub const IF_B: &str = "vfb";
pub const ADDR_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, 1);
pub const ADDR_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, 2);

impl Pair {
    pub fn new() -> Pair {
        let a = Netns::new("a");
        let b = Netns::new("b");
        sh(&format!(
            "ip link add {IF_A} netns {} type veth peer name {IF_B} netns {}",
            a.name, b.name
        ));
        for (ns, ifname, v6, v4) in [
            (&a, IF_A, ADDR_A, "10.201.0.1"),
            (&b, IF_B, ADDR_B, "10.201.0.2"),
        ] {
            sh(&format!(
                "ip -n {} addr add {v6}/64 dev {ifname} nodad",
                ns.name
            ));
            sh(&format!("ip -n {} addr add {v4}/24 dev {ifname}", ns.name));
            sh(&format!("ip -n {} link set {ifname} up", ns.name));
        }
        Pair { a, b }
    }
}

/// A tcpdump capture running in a namespace until `finish`.
pub struct Capture {
    child: Child,
    file: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Capture {
    pub fn start(ns: &Netns, ifname: &str, filter: &str, dir: &Path) -> Capture {
        let file = dir.join(format!(
            "{ifname}-{}.pcap",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = ns
            .command("tcpdump")
            .args([
                "-i",
                ifname,
                "-Z",
                "root",
                "--immediate-mode",
                "-U",
                "-n",
                "-s",
                "256",
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        // tcpdump says "listening on" once the capture is live.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + patient(Duration::from_secs(10));
        while Instant::now() < deadline {
            line.clear();
            if err.read_line(&mut line).unwrap_or(0) == 0 || line.contains("listening on") {
                break;
            }
        }
        assert!(
            line.contains("listening on"),
            "tcpdump did not start: {line}"
        );
        let stderr = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            rest
        });
        Capture {
            child,
            file,
            stderr: Some(stderr),
        }
    }

    /// Stops tcpdump (SIGINT flushes the file) and returns the captured packets.
    pub fn finish(mut self) -> Vec<Packet> {
        // Give packets in flight a moment to reach the capture.
        std::thread::sleep(patient(Duration::from_millis(200)));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        // ip netns exec forwards the signal to tcpdump by exec'ing it.
        let _ = self.child.wait();
        let summary = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        // "N packets dropped by kernel": a capture that lost packets proves nothing.
        let dropped = summary
            .lines()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        assert_eq!(
            dropped,
            Some(0),
            "tcpdump lost packets or did not report: {summary}"
        );
        read_pcap(&self.file)
    }
}

/// One captured IPv6 packet, decoded as far as the tests need.
#[derive(Debug, Clone)]
pub struct Packet {
    pub flow_label: u32,
    /// The IPv6 header's next-header field.
    pub next_header: u8,
    pub payload_len: u16,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Bytes from the start of the IPv6 header.
    pub l3: Vec<u8>,
}

impl Packet {
    /// The first byte of the TCP payload, if the segment carries data (TCP right
    /// behind the fixed IPv6 header, as the label strategy leaves it).
    pub fn tcp_payload_first_byte(&self) -> Option<u8> {
        let doff = usize::from(*self.l3.get(40 + 12)? >> 4) * 4;
        if usize::from(self.payload_len) <= doff {
            return None;
        }
        self.l3.get(40 + doff).copied()
    }
}

/// The records of a classic pcap file (what tcpdump -w writes): the bytes captured
/// of each packet. Any byte order, micro- or nanosecond stamps.
fn pcap_records(bytes: &[u8]) -> Vec<&[u8]> {
    assert!(bytes.len() >= 24, "pcap file too short");
    let magic = u32::from_le_bytes(bytes[..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => panic!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |o: usize| {
        let b: [u8; 4] = bytes[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let incl = u32_at(off + 8) as usize;
        let start = off + 16;
        assert!(
            start + incl <= bytes.len(),
            "pcap record cut short at {off}"
        );
        out.push(&bytes[start..start + incl]);
        off = start + incl;
    }
    out
}

/// Reads IPv6 packets (Ethernet link type) from a pcap file; skips everything else.
/// Captures are cut at 256 bytes: headers only, so tcpdump's buffer holds many
/// packets and a burst of GSO packets is not dropped.
pub fn read_pcap(path: &Path) -> Vec<Packet> {
    let bytes = std::fs::read(path).expect("pcap file");
    let mut out = Vec::new();
    for d in pcap_records(&bytes) {
        if d.len() < 14 + 40 || d[12..14] != [0x86, 0xdd] {
            continue;
        }
        let ip = &d[14..];
        let flow_label = u32::from_be_bytes([0, ip[1] & 0x0f, ip[2], ip[3]]);
        let src_ip = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst_ip = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        // Skip our own option headers (8 bytes each) to find the ports.
        let mut next = ip[6];
        let mut off = 40;
        while (next == 0 || next == 60) && ip.len() >= off + 8 {
            next = ip[off];
            off += (ip[off + 1] as usize + 1) * 8;
        }
        let (sp, dp) = if ip.len() >= off + 4 {
            (
                u16::from_be_bytes([ip[off], ip[off + 1]]),
                u16::from_be_bytes([ip[off + 2], ip[off + 3]]),
            )
        } else {
            (0, 0)
        };
        out.push(Packet {
            flow_label,
            next_header: ip[6],
            payload_len: u16::from_be_bytes([ip[4], ip[5]]),
            src: SocketAddr::new(src_ip.into(), sp),
            dst: SocketAddr::new(dst_ip.into(), dp),
            l3: ip.to_vec(),
        });
    }
    out
}

pub fn write_policy(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// `dir`/policies.d holding `files` (name, text).
pub fn policies_with(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let policies = dir.join("policies.d");
    std::fs::create_dir(&policies).unwrap();
    for (name, text) in files {
        write_policy(&policies, name, text);
    }
    policies
}

/// A running `flowd-rs run` inside a namespace, with its own state directory.
pub struct Daemon {
    pub child: Child,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub ns: String,
    ns_path: PathBuf,
    log: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flowd-rs")
}

impl Daemon {
    /// Starts the daemon in `ns` with `marker_toml` as its [marker] section (no
    /// policy: marks come from `mark add`), and waits for its control socket.
    pub fn start(ns: &Netns, dir: &Path, marker_toml: &str) -> Daemon {
        let policies = dir.join(format!(
            "no-policies-{}",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        Daemon::start_with(
            ns,
            dir,
            &format!(
                "[policy]\ndir = \"{}\"\n[marker]\n{marker_toml}\n",
                policies.display()
            ),
        )
    }

    /// Starts the daemon in `ns` with `config_toml` (sections) after its state_dir.
    /// It runs through nsenter rather than `ip netns exec`, which would hide the
    /// host's cgroup2 mount the tracker attaches to.
    pub fn start_with(ns: &Netns, dir: &Path, config_toml: &str) -> Daemon {
        Daemon::start_via(&[], ns, dir, config_toml)
    }

    /// Like [`Daemon::start_with`], run through the command `wrapper` (e.g. `unshare
    /// -m sh -c '...; exec "$@"' sh` to give the daemon a mount namespace of its own).
    ///
    /// Unless `config_toml` says otherwise (`detach_on_exit`, `pin_dir`), the daemon
    /// detaches everything at exit, as `systemctl stop` does: what most tests check
    /// is that a stop leaves the interfaces as found. marker_restart checks the
    /// hand-over a plain SIGTERM does by default.
    pub fn start_via(wrapper: &[&str], ns: &Netns, dir: &Path, config_toml: &str) -> Daemon {
        let state_dir = dir.join(format!("state-{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        let config = dir.join(format!(
            "flowd-{}.toml",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let config_toml =
            if config_toml.contains("detach_on_exit") || config_toml.contains("pin_dir") {
                config_toml.to_string()
            } else if config_toml.contains("[marker]\n") {
                config_toml.replacen("[marker]\n", "[marker]\ndetach_on_exit = true\n", 1)
            } else {
                format!("{config_toml}\n[marker]\ndetach_on_exit = true\n")
            };
        std::fs::write(
            &config,
            format!("state_dir = \"{}\"\n{config_toml}\n", state_dir.display()),
        )
        .unwrap();
        Daemon::spawn(wrapper, ns.path(), &ns.name, dir, config, state_dir, &[])
    }

    /// Starts the daemon in `ns` with the configuration file `config` as it is
    /// (its state_dir included).
    pub fn start_config(ns: &Netns, dir: &Path, config: &Path) -> Daemon {
        let text = std::fs::read_to_string(config).unwrap();
        let state_dir = text
            .lines()
            .find_map(|l| l.strip_prefix("state_dir = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("state_dir in the configuration");
        Daemon::spawn(
            &[],
            ns.path(),
            &ns.name,
            dir,
            config.to_path_buf(),
            PathBuf::from(state_dir),
            &[],
        )
    }

    /// A restart: stops this daemon (SIGTERM, clean exit), then starts another
    /// with its configuration and state directory, and `env` added. Returns the
    /// stopped one's log and the new daemon.
    pub fn restart(self, dir: &Path, env: &[(&str, &str)]) -> (String, Daemon) {
        let (ns_path, ns, config, state_dir) = (
            self.ns_path.clone(),
            self.ns.clone(),
            self.config.clone(),
            self.state_dir.clone(),
        );
        let log = self.stop();
        let next = Daemon::spawn(&[], ns_path, &ns, dir, config, state_dir, env);
        (log, next)
    }

    fn spawn(
        wrapper: &[&str],
        ns_path: PathBuf,
        ns_name: &str,
        dir: &Path,
        config: PathBuf,
        state_dir: PathBuf,
        env: &[(&str, &str)],
    ) -> Daemon {
        let log = dir.join(format!(
            "daemon-{}.log",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A killed daemon's socket would pass for the new one's.
        let _ = std::fs::remove_file(state_dir.join("control.sock"));
        let (program, pre) = wrapper.split_first().unwrap_or((&"nsenter", &[]));
        let mut cmd = Command::new(program);
        cmd.args(pre);
        if !wrapper.is_empty() {
            cmd.arg("nsenter");
        }
        let child = cmd
            .envs(env.iter().copied())
            .arg(format!("--net={}", ns_path.display()))
            .arg(bin())
            .args(["--log-level", "info", "-c"])
            .arg(&config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn flowd-rs");
        let mut d = Daemon {
            child,
            config,
            state_dir,
            ns: ns_name.to_string(),
            ns_path,
            log,
        };
        let sock = d.state_dir.join("control.sock");
        let deadline = Instant::now() + patient(Duration::from_secs(20));
        while !sock.exists() {
            // A daemon that refused to start says why at once, rather than at the deadline.
            if let Some(status) = d.child.try_wait().expect("wait for flowd-rs") {
                panic!("daemon exited ({status}) before it started:\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `flowd-rs -c <config> <args>` in the daemon's namespace.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, bin(), "-c"])
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flowd-rs {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> String {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait().unwrap();
        let log = self.log();
        assert!(status.success(), "daemon exited with {status}:\n{log}");
        log
    }
}

impl Drop for Daemon {
    /// A failing test must not leave a daemon behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A server in `server` on [ADDR_B]:`port`, listening when this returns, that
/// accepts one connection and reads it to EOF; joins to the byte count.
pub fn serve_once(server: &Netns, port: u16) -> std::thread::JoinHandle<usize> {
    serve_once_at(server, SocketAddr::new(ADDR_B.into(), port))
}

/// [`serve_once`] on any address of `server`.
pub fn serve_once_at(server: &Netns, at: SocketAddr) -> std::thread::JoinHandle<usize> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = server.run(move || {
        let l = TcpListener::bind(at).expect("bind server");
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().expect("accept");
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).expect("read");
        buf.len()
    });
    rx.recv().unwrap();
    h
}

/// Switches the calling thread (only) to `uid`: the raw syscall, unlike libc's
/// setresuid, does not propagate to the other threads of the test process.
pub fn become_uid(uid: u32) {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    assert_eq!(rc, 0, "setresuid({uid}) failed");
}

/// Like [`become_uid`], but also drops the root group and supplementary groups:
/// an outsider in every respect (for permission tests).
pub fn become_outsider(uid: u32) {
    // SAFETY: plain syscalls with integer arguments and an empty group list.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
            0
        );
        assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
    }
    become_uid(uid);
}

/// Sends `payload` over TCP from `client_ns` ([ADDR_A]:`sport`) to a listener in
/// `server_ns` on [ADDR_B]:`dport`; returns once the server has read it all.
pub fn tcp_transfer(client_ns: &Netns, server_ns: &Netns, sport: u16, dport: u16, payload: usize) {
    transfer(
        client_ns,
        server_ns,
        SocketAddr::new(ADDR_A.into(), sport),
        SocketAddr::new(ADDR_B.into(), dport),
        payload,
        None,
    );
}

/// Sends `payload` over TCP from `client_ns` (bound to `from`) to a one-shot
/// listener in `server_ns` on `to`, from a thread whose comm is `comm` when given
/// (what the tracker reports as the socket owner's process name); returns once the
/// server has read it all and the client has the server's FIN.
pub fn transfer(
    client_ns: &Netns,
    server_ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    payload: usize,
    comm: Option<&'static std::ffi::CStr>,
) {
    let server = serve_once_at(server_ns, to);
    let client = client_ns.run(move || {
        use std::io::Write;
        if let Some(name) = comm {
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of up to 16 bytes.
            assert_eq!(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }, 0);
        }
        let domain = socket2::Domain::for_address(from);
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&from.into()).expect("bind client");
        s.connect(&to.into()).expect("connect");
        let mut s: std::net::TcpStream = s.into();
        s.write_all(&vec![0x5a; payload]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // Wait for the server's FIN so the whole exchange is on the wire.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    client.join().unwrap();
    assert_eq!(server.join().unwrap(), payload);
}

/// SO_COOKIE of a socket: the key both the tracker and sock_diag report.
/// GET /metrics from inside the daemon's namespace (it listens on its loopback,
/// at the default address).
pub fn scrape_metrics(ns: &Netns) -> String {
    use std::io::{Read, Write};
    ns.run(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9617").expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    })
    .join()
    .unwrap()
}

pub fn cookie(fd: &impl AsRawFd) -> u64 {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, output buffer of the size passed.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(
        r,
        0,
        "getsockopt(SO_COOKIE): {}",
        std::io::Error::last_os_error()
    );
    v
}

/// Inode of a socket fd (what /proc/PID/fd shows as socket:[N]).
pub fn inode(fd: &impl std::os::fd::AsFd) -> u64 {
    nix::sys::stat::fstat(fd).expect("fstat").st_ino
}

/// Runs the daemon in `ns` with `marker_toml` (as nobody, without capabilities,
/// when `as_nobody`), asserts that it refuses to start, and returns what it said.
pub fn run_expecting_error(
    ns: &Netns,
    dir: &std::path::Path,
    marker_toml: &str,
    as_nobody: bool,
) -> String {
    let state = dir.join("state-err");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let cfg = dir.join("err.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[marker]\n{marker_toml}\n",
            state.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]);
    if as_nobody {
        c.args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ]);
    }
    let out = c
        .arg(bin())
        .arg("-c")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// On a kernel without TCX links (before 6.6), checks that a daemon told
/// `attach = "tcx"` refuses in one line naming the feature and leaves nothing on
/// the interface, and returns true: the caller's TCX test has nothing more to do.
/// Returns false where the kernel has TCX.
pub fn tcx_refused_where_missing(pair: &Pair, dir: &Path) -> bool {
    use flowd::features::{Feature, KernelFeatures};
    if KernelFeatures::detect().has(Feature::Tcx) {
        return false;
    }
    let err = run_expecting_error(&pair.a, dir, "attach = \"tcx\"", false);
    assert!(
        err.contains("lacks TCX links (Linux >= 6.6)"),
        "no clear refusal: {err}"
    );
    assert_eq!(pair.a.sh(&format!("tc filter show dev {IF_A} egress")), "");
    true
}
