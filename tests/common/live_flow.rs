//! A live, marked iperf3 flow from A to B, for the tests and benches that watch
//! marking across a daemon's restart: a bpf filesystem of the caller's own, the
//! flow's announcement, the iperf3 pair and A's drop counter.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use flowd::model::tag::Tag;

use super::{Daemon, Netns, Pair, ADDR_A, ADDR_B, IF_A};

/// A bpf filesystem of the caller's own (pins of parallel tests never meet, and
/// nothing outlives the test): mounted on creation, unmounted when dropped.
pub struct BpfFs(PathBuf);

impl BpfFs {
    pub fn new(dir: &Path) -> BpfFs {
        let path = dir.join("bpffs");
        std::fs::create_dir_all(&path).unwrap();
        super::sh(&format!("mount -t bpf bpf {}", path.display()));
        BpfFs(path)
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.0.join("flowd-rs")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The TCP flow from `[ADDR_A]:cport` to `[ADDR_B]:sport`.
#[derive(Debug, Clone, Copy)]
pub struct LiveFlow {
    pub cport: u16,
    pub sport: u16,
    pub tag: Tag,
}

impl LiveFlow {
    /// Announces the flow with its tag (`flowd-rs mark add`).
    pub fn mark(&self, d: &Daemon) {
        d.cli_ok(&[
            "mark",
            "add",
            "tcp",
            &format!("[{ADDR_A}]:{}", self.cport),
            &format!("[{ADDR_B}]:{}", self.sport),
            "--experiment",
            &self.tag.experiment.to_string(),
            "--activity",
            &self.tag.activity.to_string(),
        ]);
    }

    /// iperf3 at 100 Mbit/s for `secs` seconds: (server on B, client on A), the
    /// client started once the server listens.
    pub fn iperf(&self, pair: &Pair, secs: u32) -> (Child, Child) {
        let sport = self.sport.to_string();
        let server = pair
            .b
            .command("iperf3")
            .args(["-s", "-1", "-B", &ADDR_B.to_string(), "-p", &sport])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3, see .ci/setup)");
        for _ in 0..200 {
            if pair.b.sh("ss -Hltn").contains(&format!(":{sport}")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let client = pair
            .a
            .command("iperf3")
            .args(["-c", &ADDR_B.to_string(), "-p", &sport])
            .args(["--cport", &self.cport.to_string(), "-t", &secs.to_string()])
            .args(["-b", "100M"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        (server, client)
    }
}

/// Packets A's interface dropped on the way out.
pub fn tx_dropped(ns: &Netns) -> u64 {
    ns.sh(&format!("cat /sys/class/net/{IF_A}/statistics/tx_dropped"))
        .trim()
        .parse()
        .unwrap()
}
