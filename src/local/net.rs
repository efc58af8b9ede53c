//! Network plumbing of the local cluster through iproute2 (`ip`).

use super::netns_name;
use anyhow::{bail, Context};
use std::process::Command;

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2: `make setup`)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bridge(cluster: &str) -> String {
    format!("mb-{cluster}")
}

fn host_veth(cluster: &str, i: usize) -> String {
    format!("mv-{cluster}-{i}")
}

/// Whether anything of this cluster exists (namespaces or bridge).
pub fn exists_any(cluster: &str) -> anyhow::Result<bool> {
    Ok(!list_netns(cluster)?.is_empty() || link_exists(&bridge(cluster)))
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// A /24 in 10.77.0.0/16 that no interface on this host uses yet; the
/// cluster named "local" prefers 10.77.1.0/24.
pub fn pick_subnet(cluster: &str) -> anyhow::Result<u8> {
    let used = ip(&["-o", "-4", "addr", "show"])?;
    let start: u32 = if cluster == "local" {
        1
    } else {
        2 + cluster
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
            % 240
    };
    for off in 0..250u32 {
        let k = ((start - 1 + off) % 250 + 1) as u8;
        if !used.contains(&format!(" 10.77.{k}.")) {
            return Ok(k);
        }
    }
    bail!("no free 10.77.x.0/24 subnet left on this host")
}

pub fn make_bridge(cluster: &str, k: u8) -> anyhow::Result<()> {
    let br = bridge(cluster);
    ip(&["link", "add", &br, "type", "bridge"])?;
    ip(&["addr", "add", &format!("10.77.{k}.1/24"), "dev", &br])?;
    ip(&["link", "set", &br, "up"])?;
    Ok(())
}

pub fn make_node(cluster: &str, i: usize, addr: &str, k: u8) -> anyhow::Result<()> {
    let ns = netns_name(cluster, i);
    make_ns(cluster, &ns, &host_veth(cluster, i), addr, k)?;
    make_job_bridge(&ns, addr, k)
}

/// The node's job bridge (see `agent::jobnet`): `mbr0` takes the node's
/// address and `eth0` becomes its port, so a job's veth on `mbr0` is on
/// the cluster's network with an address of its own.
fn make_job_bridge(ns: &str, addr: &str, k: u8) -> anyhow::Result<()> {
    let br = crate::agent::jobnet::DEFAULT_BRIDGE;
    let cidr = format!("{addr}/24");
    // The bridge keeps eth0's MAC for good: left to itself it takes the
    // lowest MAC of its ports, so a job veth attached later would change
    // the node's MAC under every neighbour's ARP cache.
    let link = ip(&["-n", ns, "-o", "link", "show", "eth0"])?;
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .context("eth0 has no MAC address")?
        .to_string();
    ip(&[
        "-n", ns, "link", "add", br, "address", &mac, "type", "bridge",
    ])?;
    ip(&["-n", ns, "addr", "del", &cidr, "dev", "eth0"])?;
    ip(&["-n", ns, "link", "set", "eth0", "master", br])?;
    ip(&["-n", ns, "addr", "add", &cidr, "dev", br])?;
    ip(&["-n", ns, "link", "set", br, "up"])?;
    ip(&[
        "-n",
        ns,
        "route",
        "replace",
        "default",
        "via",
        &format!("10.77.{k}.1"),
    ])?;
    Ok(())
}

/// The job address pool of a local cluster on 10.77.`k`.0/24: FIRST-LAST.
pub fn job_pool(k: u8) -> String {
    format!("10.77.{k}.100-10.77.{k}.239")
}

/// A network namespace `ns` on the cluster's bridge through the host-side
/// veth `veth` (named `mv-<cluster>-…`, so `down` finds it), with `addr`.
pub fn make_ns(cluster: &str, ns: &str, veth: &str, addr: &str, k: u8) -> anyhow::Result<()> {
    let (ns, veth) = (ns.to_string(), veth.to_string());
    ip(&["netns", "add", &ns])?;
    ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    ip(&["link", "set", &veth, "master", &bridge(cluster)])?;
    ip(&["link", "set", &veth, "up"])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &format!("10.77.{k}.1"),
    ])?;
    Ok(())
}

pub fn list_netns(cluster: &str) -> anyhow::Result<Vec<String>> {
    let prefix = format!("mos-{cluster}-");
    // `ip netns list` prints "name (id: N)"; read /run/netns directly instead.
    let mut out: Vec<String> = match std::fs::read_dir("/run/netns") {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with(&prefix))
            .collect(),
        Err(_) => vec![],
    };
    out.sort();
    Ok(out)
}

pub fn netns_pids(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

pub fn delete_netns(ns: &str) -> anyhow::Result<()> {
    ip(&["netns", "del", ns]).map(|_| ())
}

/// Delete the bridge and any veth left behind; returns how many.
pub fn delete_links(cluster: &str) -> anyhow::Result<usize> {
    let mut n = 0;
    let prefix = format!("mv-{cluster}-");
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && ip(&["link", "del", &name]).is_ok() {
                n += 1;
            }
        }
    }
    let br = bridge(cluster);
    if link_exists(&br) {
        ip(&["link", "del", &br])?;
        n += 1;
    }
    Ok(n)
}
