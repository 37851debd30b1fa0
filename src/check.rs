//! `flowd-rs check`: whether this kernel can run the configuration, without starting
//! anything. Prints the kernel feature table, then loads (never attaches) the marker
//! and the tracker as the daemon would, so that a program the verifier refuses is
//! named before installation rather than at the first start.

use std::io::Write;

use anyhow::Result;

use crate::config::{Config, TrackerSetting};
use crate::discovery::tracker::{check_programs, TrackerConfig, TrackerMode};
use crate::features::{Feature, KernelFeatures};
use crate::marker;

/// Writes the report to `out`; `Ok(false)` when the daemon could not run `cfg` here.
pub fn run(cfg: &Config, out: &mut dyn Write) -> Result<bool> {
    crate::bpf::route_libbpf_logs();
    let k = KernelFeatures::detect();
    if k.unprivileged {
        writeln!(
            out,
            "flowd-rs check needs root (CAP_BPF, CAP_NET_ADMIN): the kernel answers no probe otherwise"
        )?;
        return Ok(false);
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    writeln!(out, "kernel {release}")?;
    write!(out, "{}", k.render())?;
    let mut ok = true;
    if let Some(missing) = k.missing_required() {
        writeln!(out, "cannot run: {missing}")?;
        return Ok(false);
    }

    let (opts, fallbacks) = marker::options_for(cfg, &[], k)?;
    match marker::load(&opts) {
        Ok(_) => writeln!(out, "marker: loads")?,
        Err(e) => {
            writeln!(out, "marker: does not load: {e:#}")?;
            ok = false;
        }
    }
    for f in fallbacks {
        writeln!(out, "marker fallback: {f}")?;
    }

    let mode = match cfg.discovery.tracker {
        TrackerSetting::Full => TrackerMode::Full,
        TrackerSetting::TracepointOnly => TrackerMode::TracepointOnly,
        TrackerSetting::Disabled => TrackerMode::Disabled,
    };
    if mode == TrackerMode::Disabled {
        writeln!(out, "tracker: disabled by configuration")?;
    } else if !k.has(Feature::RingBuffer) {
        writeln!(
            out,
            "tracker fallback: off, sockets found by sock_diag polling (no {})",
            Feature::RingBuffer.name()
        )?;
    } else {
        let tcfg = TrackerConfig {
            mode,
            ring_bytes: cfg.discovery.ring_buffer_bytes,
            cgroup2_path: cfg.discovery.cgroup2.clone(),
            udp: cfg.discovery.udp,
            only_netns: None,
        };
        match check_programs(&tcfg) {
            Ok(progs) => {
                for (name, loaded) in &progs {
                    let state = if *loaded {
                        "loads"
                    } else {
                        "REFUSED (disabled at start; see the log above)"
                    };
                    writeln!(out, "tracker: {name}: {state}")?;
                }
                let tcp = |n: &str| progs.iter().any(|(p, l)| *l && p.starts_with(n));
                if !tcp("flowd_tcp_state") && !tcp("flowd_sockops") {
                    writeln!(
                        out,
                        "tracker: no TCP source loads: the daemon would not start"
                    )?;
                    ok = false;
                }
            }
            Err(e) => {
                writeln!(out, "tracker: does not load: {e}")?;
                ok = false;
            }
        }
    }
    writeln!(
        out,
        "{}",
        if ok {
            "this configuration runs on this kernel"
        } else {
            "this configuration cannot run on this kernel"
        }
    )?;
    Ok(ok)
}
