//! The one-shot commands (`policy check`, `policy explain`, `label`, `registry
//! update`): each reads files or arguments, prints, and returns.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::model::facts::OwnerFacts;
use crate::model::socket::{Direction, FlowKey, Protocol};
use crate::model::tag::{decode, Tag};
use crate::policy::{OfflineAccounts, Policy, Registry, SocketAttrs};

/// The registry the configuration names, else the bundled snapshot.
pub fn registry(cfg: &Config) -> Result<Registry> {
    match &cfg.policy.registry {
        Some(p) => Registry::from_file(p).with_context(|| format!("registry {}", p.display())),
        None => Ok(Registry::bundled()),
    }
}

/// `policy check`: validates every file; prints each error as `file:line:col: message`.
/// Returns whether the directory is valid.
/// With `offline`, user and group names this host does not know are accepted.
/// `in_kernel` is the configuration's `marker.in_kernel_decisions`: whether any rule can
/// be first-packet exact at all.
pub fn policy_check(
    dir: &Path,
    reg: &Registry,
    offline: bool,
    in_kernel: bool,
    out: &mut impl Write,
) -> Result<bool> {
    if !dir.is_dir() {
        bail!("{}: not a directory of policy files", dir.display());
    }
    let loaded = if offline {
        Policy::load_dir_with(dir, reg, &OfflineAccounts::default())
    } else {
        Policy::load_dir(dir, reg)
    };
    match loaded {
        Ok(p) => {
            let files: std::collections::BTreeSet<_> =
                p.rules().map(|r| r.id.file.clone()).collect();
            writeln!(
                out,
                "{}: OK, {} files, {} rules, version {}",
                dir.display(),
                files.len(),
                p.rules().len(),
                p.version()
            )?;
            if p.rules().len() == 0 {
                writeln!(
                    out,
                    "  no policies: nothing is tagged (the daemon runs, marking nothing)"
                )?;
            }
            // With marker.in_kernel_decisions (the default): which rules the kernel
            // decides before a flow's first packet leaves.
            let compiled = crate::policy::kernel::KernelPolicy::compile(p.rules());
            if in_kernel {
                let exact = compiled.exactness.iter().filter(|e| e.is_exact()).count();
                writeln!(
                    out,
                    "  {exact} of {} rules first-packet exact (in-kernel decisions, limit {} rules)",
                    p.rules().len(),
                    crate::policy::kernel::MAX_RULES
                )?;
            } else {
                writeln!(
                    out,
                    "  in-kernel decisions are off (marker.in_kernel_decisions = false): every rule is decided in userspace, first packets unmarked"
                )?;
            }
            for (r, ex) in p.rules().zip(&compiled.exactness) {
                let tag = reg.name_of(r.experiment, r.activity);
                let exact = if in_kernel {
                    ex.describe()
                } else {
                    "decided in userspace".to_owned()
                };
                writeln!(
                    out,
                    "  {}  priority {}  -> {}  [{}]",
                    r.id, r.priority, tag, exact
                )?;
            }
            Ok(true)
        }
        Err(errs) => {
            for e in &errs.0 {
                writeln!(out, "{e}")?;
            }
            writeln!(out, "{}: {} error(s)", dir.display(), errs.0.len())?;
            Ok(false)
        }
    }
}

/// What `policy explain` is told about the socket.
#[derive(Debug, Clone)]
pub struct ExplainArgs {
    pub proto: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Option<String>,
    pub uid: Option<String>,
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    pub cgroup: Option<String>,
}

pub fn policy_explain(
    dir: &Path,
    reg: &Registry,
    a: &ExplainArgs,
    out: &mut impl Write,
) -> Result<()> {
    let policy = Policy::load_dir(dir, reg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let proto = match a.proto.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        p => bail!("unknown protocol `{p}`: use tcp or udp"),
    };
    let direction = match a.direction.as_deref() {
        None => Direction::Unknown,
        Some("outbound" | "out") => Direction::Outbound,
        Some("inbound" | "in") => Direction::Inbound,
        Some(d) => bail!("unknown direction `{d}`: use outbound or inbound"),
    };
    let uid = match &a.uid {
        None => None,
        Some(u) => Some(match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => nix::unistd::User::from_name(u)
                .with_context(|| format!("looking up user {u}"))?
                .with_context(|| format!("no user named `{u}`"))?
                .uid
                .as_raw(),
        }),
    };
    let key = FlowKey::new(proto, a.local, a.remote);
    let attrs = SocketAttrs {
        proto,
        local: key.local(),
        remote: key.remote(),
        direction,
        uid,
        owner: OwnerFacts {
            gid: None,
            comm: a.comm.clone(),
            exe: a.exe.clone(),
            cgroup: a.cgroup.clone(),
        },
    };
    write!(out, "{}", policy.explain(&attrs))?;
    Ok(())
}

/// `label decode`: one line per label, e.g. `0x1000c  atlas (2) / Data Brokering (3)  entropy 0b00000`.
pub fn label_decode(labels: &[String], reg: &Registry, out: &mut impl Write) -> Result<()> {
    for text in labels {
        let t = text.trim();
        let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => t.parse::<u32>(),
        }
        .with_context(|| format!("`{t}` is not a flow label (decimal or 0x-hex)"))?;
        if v > 0xF_FFFF {
            bail!("{t}: a flow label has 20 bits (at most 0xfffff)");
        }
        let d = decode(v);
        match d.tag {
            Some(tag) => {
                let n = reg.name_of(tag.experiment, tag.activity);
                writeln!(
                    out,
                    "{v:#07x}  {} ({}) / {} ({})  scitag {}  entropy {:#07b}",
                    n.experiment,
                    tag.experiment,
                    n.activity,
                    tag.activity,
                    tag.scitag(),
                    d.entropy
                )?
            }
            None => writeln!(out, "{v:#07x}  not a SciTags label (experiment field is 0)")?,
        }
    }
    Ok(())
}

/// `label encode EXPERIMENT ACTIVITY`: names or ids, as policies take them.
pub fn label_encode(
    exp: &str,
    act: &str,
    entropy: u8,
    reg: &Registry,
    out: &mut impl Write,
) -> Result<()> {
    let e = match exp.parse::<u16>() {
        Ok(id) => id,
        Err(_) => reg.experiment(exp).map_err(|e| anyhow::anyhow!("{e}"))?.id,
    };
    let a = match act.parse::<u8>() {
        Ok(id) => id,
        Err(_) => reg.activity(e, act).map_err(|e| anyhow::anyhow!("{e}"))?.id,
    };
    let tag = Tag::new(e, a)?;
    if entropy > 0x1f {
        bail!("entropy {entropy} does not fit 5 bits (0..=31)");
    }
    writeln!(out, "{:#07x}", tag.label(entropy))?;
    Ok(())
}

/// `registry update`: downloads, validates and atomically replaces `output`; the old
/// file stays when anything is wrong.
pub fn registry_update(url: &str, output: &Path, out: &mut impl Write) -> Result<()> {
    let body = ureq::get(url)
        .call()
        .with_context(|| format!("downloading {url}"))?
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_vec()
        .with_context(|| format!("reading {url}"))?;
    let reg = Registry::from_json_bytes(&body)
        .with_context(|| format!("{url}: not a valid SciTags registry"))?;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        output
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("registry")
    ));
    std::fs::write(&tmp, &body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("replacing {}", output.display()))?;
    writeln!(
        out,
        "{}: registry with {} experiments written",
        output.display(),
        reg.experiments.len()
    )?;
    Ok(())
}
