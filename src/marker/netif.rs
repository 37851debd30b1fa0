//! Interface facts from rtnetlink: which links to mark on, and what TC state they
//! are in (is there a clsact qdisc, which filters hang off it).

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::tc::TcAttribute;
use rtnetlink::Handle;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

/// An rtnetlink handle whose connection task runs on the current tokio runtime.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every link, by index.
pub async fn links(h: &Handle) -> Result<BTreeMap<u32, String>> {
    let mut out = BTreeMap::new();
    let mut s = h.link().get().execute();
    while let Some(msg) = s.try_next().await.context("listing links")? {
        let name = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        if let Some(name) = name {
            out.insert(msg.header.index, name);
        }
    }
    Ok(out)
}

/// The interfaces to mark on: those named, each of which must exist, or, when none
/// is named, every interface with a global-scope IPv6 address (ULA included, since
/// it is global scope too).
pub async fn resolve(h: &Handle, names: &[String]) -> Result<Vec<Interface>> {
    let links = links(h).await?;
    if !names.is_empty() {
        let mut out = Vec::new();
        for name in names {
            match links.iter().find(|(_, n)| *n == name) {
                Some((index, _)) => out.push(Interface {
                    name: name.clone(),
                    index: *index,
                }),
                None => bail!(
                    "interface `{name}` does not exist (known: {})",
                    links.values().cloned().collect::<Vec<_>>().join(", ")
                ),
            }
        }
        return Ok(out);
    }
    let mut with_global_v6 = std::collections::BTreeSet::new();
    let mut s = h.address().get().execute();
    while let Some(msg) = s.try_next().await.context("listing addresses")? {
        if msg.header.scope != AddressScope::Universe {
            continue;
        }
        let v6 = msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V6(ip)) if !ip.is_loopback()));
        if v6 {
            with_global_v6.insert(msg.header.index);
        }
    }
    let out: Vec<Interface> = with_global_v6
        .into_iter()
        .filter_map(|index| {
            links.get(&index).map(|name| Interface {
                name: name.clone(),
                index,
            })
        })
        .collect();
    if out.is_empty() {
        bail!("no interface has a global IPv6 address: name the interfaces to mark on in [marker] interfaces");
    }
    Ok(out)
}

/// Whether `ifindex` has a clsact qdisc.
pub async fn has_clsact(h: &Handle, ifindex: u32) -> Result<bool> {
    let mut s = h.qdisc().get().index(ifindex as i32).execute();
    while let Some(msg) = s.try_next().await.context("listing qdiscs")? {
        if msg.header.index != ifindex as i32 {
            continue;
        }
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Number of filters on the clsact ingress and egress hooks of `ifindex`.
pub async fn clsact_filter_count(h: &Handle, ifindex: u32) -> Result<usize> {
    let mut n = 0;
    for egress in [false, true] {
        let req = h.traffic_filter(ifindex as i32).get();
        let req = if egress { req.egress() } else { req.ingress() };
        let mut s = req.execute();
        while let Some(msg) = s.try_next().await.context("listing tc filters")? {
            // A dump lists one message per filter chain element; those with a kind
            // are filters.
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(_)))
            {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Whether interface `ifindex` exists in the calling thread's network namespace.
pub fn index_exists(ifindex: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname writes at most.
    !unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null()
}

/// The MTU of interface `name` in the calling thread's network namespace
/// (SIOCGIFMTU: /sys/class/net may show another namespace's interfaces).
pub fn mtu(name: &str) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind("[::1]:0")
        .or_else(|_| std::net::UdpSocket::bind("127.0.0.1:0"))?;
    // SAFETY: ifreq is plain data; the name is copied NUL-terminated within bounds.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        let bytes = name.as_bytes();
        if bytes.len() >= req.ifr_name.len() {
            return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(req.ifr_ifru.ifru_mtu as u32)
    }
}
