//! Jobs with their own address: a network namespace per job, so that its
//! established TCP connections survive a migration (issue 18).
//!
//! Why: a job in its node's network namespace answers at the node's
//! address, so on another node every connection it had points at the wrong
//! IP, and CRIU refuses to dump it at all. A job with its own namespace and
//! its own address (from a cluster pool, on a veth to the node's bridge
//! `mbr0`, with a MAC derived from the address) can take that address with
//! it: CRIU dumps the whole namespace (`tcp_established`, the namespace
//! locked with nftables while frozen, so no per-connection `inet CRIU-<id>`
//! table is left anywhere), and the target restores the interface with the
//! same MAC and IP as `external veth[eth0]:HOSTVETH@mbr0`, attached to its
//! own bridge. Only once the restored sockets exist is the address announced
//! (a gratuitous ARP from inside the job's namespace, so the bridges learn
//! the MAC's new port): anything answering for the IP earlier would reset
//! the peer's connections.
//!
//! What is promised: connections between the job and any other address of
//! the cluster's network (other jobs, the gateway, the world behind it).
//! Not promised: connections to a node's own address or localhost, which
//! are the node's and stay there; a job in its node's namespace with an
//! established TCP connection is refused before anything is frozen, naming
//! the connections ([`established_connections`]).
//!
//! Addresses are claimed with `O_EXCL` files under `<claims>/<ip>` (on the
//! shared path, or a directory every node sees) holding the job id; a job
//! releases its claim when it ends. A node without the bridge cannot give
//! jobs their own namespace: such a launch falls back to the node's network
//! and the agent says so.

mod conns;
mod link;

pub use conns::*;
pub use link::*;

use super::{AgentError, AgentResult};
use crate::core::{JobId, JobRecord};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The interface name inside every job's namespace.
pub const JOB_IFACE: &str = "eth0";

/// The bridge jobs' veths attach to unless configured otherwise.
pub const DEFAULT_BRIDGE: &str = "mbr0";

pub use crate::core::jobnet::{mac_for, JobNet};

/// The host side of a job's veth on whatever node runs it: derived from the
/// job id, so every node (and a rollback) names it the same way.
pub fn host_veth(job: &str) -> String {
    let mut s = String::from("mj");
    s.extend(job.chars().filter(|c| c.is_ascii_alphanumeric()).take(13));
    s
}

#[derive(Debug, thiserror::Error)]
pub enum JobNetError {
    #[error("no free address left in the job address pool {0}")]
    PoolExhausted(String),
    #[error("address claims under {0}: {1}")]
    Claims(PathBuf, std::io::Error),
    #[error("setting up the job's network: {0}")]
    Setup(String),
    #[error("bad job network setting: {0}")]
    Config(String),
}

/// A node's job network settings (`mosixd --job-net-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobNetConfig {
    /// The bridge in the node's namespace that job veths attach to.
    pub bridge: String,
    /// First and last address of the pool (inclusive).
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// Where address claims live: a directory every node sees.
    pub claims: PathBuf,
    /// Jobs get their own namespace unless they ask for the node's.
    pub default_own: bool,
}

impl JobNetConfig {
    /// `FIRST-LAST` (e.g. `10.77.1.100-10.77.1.239`).
    pub fn parse_pool(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), JobNetError> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| JobNetError::Config(format!("pool {s:?} is not FIRST-LAST")))?;
        let a: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| JobNetError::Config(format!("pool start {a:?} is not an IPv4 address")))?;
        let b: Ipv4Addr = b
            .trim()
            .parse()
            .map_err(|_| JobNetError::Config(format!("pool end {b:?} is not an IPv4 address")))?;
        if u32::from(b) < u32::from(a) {
            return Err(JobNetError::Config(format!(
                "pool {s:?} ends before it starts"
            )));
        }
        Ok((a, b))
    }

    pub fn pool_text(&self) -> String {
        format!("{}-{}", self.first, self.last)
    }

    /// Whether this node can give a job its own namespace now (its bridge
    /// exists in the agent's namespace).
    pub fn available(&self) -> bool {
        link_exists(&self.bridge)
    }

    /// Claim a free address for `job`, starting at a place derived from the
    /// job id so that concurrent launches rarely race for the same file.
    pub fn claim(&self, job: &str) -> Result<JobNet, JobNetError> {
        std::fs::create_dir_all(&self.claims)
            .map_err(|e| JobNetError::Claims(self.claims.clone(), e))?;
        let (a, b) = (u32::from(self.first), u32::from(self.last));
        let n = b - a + 1;
        let start = job
            .bytes()
            .fold(0u32, |h, c| h.wrapping_mul(31).wrapping_add(u32::from(c)))
            % n;
        for i in 0..n {
            let ip = Ipv4Addr::from(a + (start + i) % n);
            let path = self.claims.join(ip.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(job.as_bytes())
                        .map_err(|e| JobNetError::Claims(path.clone(), e))?;
                    return Ok(JobNet::new(ip, self.prefix, self.gateway));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(JobNetError::Claims(path, e)),
            }
        }
        Err(JobNetError::PoolExhausted(self.pool_text()))
    }

    /// Give `ip` back if `job` holds it (never another job's claim).
    pub fn release(&self, job: &str, ip: Ipv4Addr) {
        release_claim(&self.claims, job, ip)
    }
}

/// See [`JobNetConfig::release`].
pub fn release_claim(claims: &Path, job: &str, ip: Ipv4Addr) {
    let path = claims.join(ip.to_string());
    if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == job) {
        let _ = std::fs::remove_file(&path);
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), JobNetError> {
    run_with_input(cmd, None, what)
}

/// Run `cmd` to its end, `input` (if any) on its stdin; its stderr names
/// the failure.
fn run_with_input(cmd: &mut Command, input: Option<&str>, what: &str) -> Result<(), JobNetError> {
    let fail = |e: std::io::Error| JobNetError::Setup(format!("{what}: {e}"));
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(fail)?;
    if let (Some(text), Some(mut i)) = (input, child.stdin.take()) {
        // Dropped at the end of this block: the child sees end of input.
        i.write_all(text.as_bytes()).map_err(fail)?;
    }
    let out = child.wait_with_output().map_err(fail)?;
    if !out.status.success() {
        return Err(JobNetError::Setup(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Give the freshly cloned job `pid` (in a new, empty network namespace)
/// its interface: a veth whose host side `veth` is on `bridge`, and inside
/// `eth0` with the fixed MAC, the address, loopback and the default route.
pub fn plumb(pid: i32, veth: &str, bridge: &str, net: &JobNet) -> Result<(), JobNetError> {
    let _ = delete_link(veth);
    // One `ip` for both host-side steps: the job waits for its exec until
    // this is done, and each `ip` run is a fork and exec (~2 ms here). In a
    // batch `ip` stops at the first line that fails and names it.
    let host = format!(
        "link add {veth} type veth peer name {JOB_IFACE} address {} netns {pid}\nlink set {veth} master {bridge} up\n",
        net.mac
    );
    let inside = format!(
        "addr add {}/{} dev {JOB_IFACE}\nlink set lo up\nlink set {JOB_IFACE} up\nroute add default via {}\n",
        net.ip, net.prefix, net.gateway
    );
    let result = (|| {
        run_with_input(
            Command::new("ip").args(["-batch", "-"]),
            Some(&host),
            "creating the job's veth on the bridge",
        )?;
        run_with_input(
            Command::new("nsenter")
                .arg(format!("--net=/proc/{pid}/ns/net"))
                .args(["ip", "-batch", "-"]),
            Some(&inside),
            "configuring the job's interface",
        )
    })();
    if result.is_err() {
        let _ = delete_link(veth);
    }
    result
}

/// CRIU's `external` entry that restores the job's interface on this node.
pub fn external_veth(veth: &str, bridge: &str) -> String {
    format!("veth[{JOB_IFACE}]:{veth}@{bridge}")
}

/// Whether `pid` lives in another network namespace than this process.
pub fn has_own_netns(pid: i32) -> bool {
    match (
        std::fs::read_link(format!("/proc/{pid}/ns/net")),
        std::fs::read_link("/proc/self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// A job just dumped away from this node: delete its veth on a thread of
/// its own, off the frozen path.
///
/// Why: deleting a network device waits for RCU grace periods in the
/// kernel (`unregister_netdevice`), 15-20 ms here, and the job is frozen
/// until its target restores it. Nothing needs the veth gone first: the
/// job's namespace is gone with its processes, so nothing answers through
/// it, and the target's gratuitous ARP moves the MAC on every bridge.
/// By index, not name: a rollback here makes a new veth of the same name,
/// which a late deletion must not take (a rollback's restore deletes a
/// stale one by name first, as every restore does).
pub fn left_here_soon(job: &JobId) {
    let veth = host_veth(job.as_str());
    let Ok(index) = link_index(&veth) else {
        // Gone already (the kernel deletes a veth whose peer's namespace
        // died).
        return;
    };
    let job = job.clone();
    let spawned = std::thread::Builder::new()
        .name("veth-delete".into())
        .spawn(move || match rtnl_delete_link(Link::Index(index)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => tracing::warn!(job = %job, "deleting the job's veth {veth}: {e}"),
        });
    if let Err(e) = spawned {
        tracing::warn!("deleting a job's veth: no thread ({e}); deleting it now");
        let _ = rtnl_delete_link(Link::Index(index));
    }
}

/// This node no longer runs `job`: delete its veth, or (`keep`, a stopped
/// post-copy source that may still take the job back) only take it down.
pub fn left_here(job: &JobId, keep: bool) {
    let veth = host_veth(job.as_str());
    if keep {
        set_link(&veth, false);
    } else if let Err(e) = delete_link(&veth) {
        tracing::warn!(job = %job, "{e}");
    }
}

impl super::Agent {
    /// The address a new job gets: its own (claimed from the pool) when it
    /// asked for one or the node's default says so and this node has the
    /// bridge; else None, the node's network, with a warning when it asked.
    pub(crate) fn job_net_for(
        &self,
        id: &JobId,
        asked: Option<bool>,
    ) -> AgentResult<Option<JobNet>> {
        let Some(c) = &self.cfg.job_net else {
            if asked == Some(true) {
                tracing::warn!(job = %id, node = %self.cfg.node, "no job address pool on this node (mosixd --job-net-pool): the job uses the node's network");
            }
            return Ok(None);
        };
        if !asked.unwrap_or(c.default_own) {
            return Ok(None);
        }
        if !c.available() {
            tracing::warn!(job = %id, node = %self.cfg.node, bridge = %c.bridge, "the job bridge does not exist on this node: the job uses the node's network, and its connections cannot move with it");
            return Ok(None);
        }
        c.claim(id.as_str()).map(Some).map_err(|e| match e {
            JobNetError::PoolExhausted(_) => AgentError::ResourceExhausted(e.to_string()),
            other => AgentError::Internal(other.to_string()),
        })
    }

    /// Give a job's address back to the pool (its end, or a failed launch).
    pub(crate) fn release_address(&self, id: &JobId, net: &JobNet) {
        if let Some(c) = &self.cfg.job_net {
            c.release(id.as_str(), net.ip);
        }
    }

    /// Refuse, before anything is frozen, a move that would break a TCP
    /// connection: one held by a job in its node's network namespace (its
    /// address stays behind, and CRIU cannot dump it).
    pub(crate) fn check_connections_can_move(&self, rec: &JobRecord, pid: i32) -> AgentResult<()> {
        if rec.net.is_some() && has_own_netns(pid) {
            return Ok(());
        }
        let conns = established_connections(pid);
        if conns.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = conns.iter().take(8).map(|c| c.to_string()).collect();
        Err(AgentError::FailedPrecondition(format!(
            "job {} holds {} established TCP connection(s) ({}{}) and uses its node's network, so they cannot move with it; start it with an address that moves (`mosrun -d --net own`, the default where nodes have a job address pool); it keeps running on {}",
            rec.id,
            conns.len(),
            shown.join(", "),
            if conns.len() > shown.len() { ", …" } else { "" },
            self.cfg.node
        )))
    }

    /// [`check_connections_can_move`](Self::check_connections_can_move)
    /// for a service instance, after its front ends were told it is about
    /// to be frozen and let go of their pooled connections (nothing is
    /// frozen yet); a refusal tells them it runs on here.
    pub(crate) fn check_service_connections(&self, rec: &JobRecord, pid: i32) -> AgentResult<()> {
        if rec.service.is_none() {
            return Ok(());
        }
        self.check_connections_can_move(rec, pid).inspect_err(|_| {
            self.events.running(rec, &self.cfg.node);
        })
    }

    /// Before restoring `job` here: if it has its own address, this node's
    /// end of its veth (stale links of the same name removed) and the
    /// bridge, as CRIU's `external` entry, plus the address.
    pub(crate) fn prepare_job_net(&self, job: &JobId) -> AgentResult<Option<(String, JobNet)>> {
        let Some(net) = self.registry.get(job)?.net else {
            return Ok(None);
        };
        let bridge = self
            .cfg
            .job_net
            .as_ref()
            .map_or(DEFAULT_BRIDGE, |c| c.bridge.as_str());
        if !link_exists(bridge) {
            return Err(AgentError::FailedPrecondition(format!(
                "job {job} has its own address {} but {} has no job bridge {bridge} to restore it on",
                net.ip, self.cfg.node
            )));
        }
        let veth = host_veth(job.as_str());
        delete_link(&veth).map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(Some((external_veth(&veth, bridge), net)))
    }

    /// A restore here failed: nothing of the job's interface may stay.
    pub(crate) fn job_net_failed(&self, job: &JobId, net: Option<&(String, JobNet)>) {
        if net.is_some() {
            left_here(job, false);
        }
    }

    /// The job runs here now, its sockets restored: announce its address.
    pub(crate) fn job_net_arrived(&self, job: &JobId, pid: i32, net: Option<&(String, JobNet)>) {
        if let Some((_, n)) = net {
            match announce(pid, n) {
                Ok(()) => tracing::debug!(job = %job, ip = %n.ip, "address announced"),
                Err(e) => tracing::warn!(job = %job, ip = %n.ip, "{e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_and_veth_names_are_fixed() {
        assert_eq!(mac_for(Ipv4Addr::new(10, 77, 1, 100)), "02:6d:0a:4d:01:64");
        assert_eq!(host_veth("j87c872429e"), "mjj87c872429e");
        assert!(host_veth("jabcdefabcdefabcdef").len() <= 15);
        assert_eq!(
            parse_mac("02:6d:0a:4d:01:64"),
            Some([2, 0x6d, 10, 77, 1, 100])
        );
        assert_eq!(
            external_veth("mjx", "mbr0"),
            "veth[eth0]:mjx@mbr0".to_string()
        );
    }

    #[test]
    fn pool_claims_are_exclusive_and_released_by_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let (first, last) = JobNetConfig::parse_pool("10.9.0.100-10.9.0.101").unwrap();
        let cfg = JobNetConfig {
            bridge: "mbr0".into(),
            first,
            last,
            prefix: 24,
            gateway: Ipv4Addr::new(10, 9, 0, 1),
            claims: dir.path().join("addrs"),
            default_own: false,
        };
        let a = cfg.claim("ja").unwrap();
        let b = cfg.claim("jb").unwrap();
        assert_ne!(a.ip, b.ip);
        assert!(matches!(
            cfg.claim("jc"),
            Err(JobNetError::PoolExhausted(_))
        ));
        cfg.release("jc", a.ip); // not its claim: kept
        assert!(cfg.claim("jc").is_err());
        cfg.release("ja", a.ip);
        assert_eq!(cfg.claim("jc").unwrap().ip, a.ip);
        assert!(JobNetConfig::parse_pool("10.9.0.5-10.9.0.1").is_err());
        assert!(JobNetConfig::parse_pool("nonsense").is_err());
    }
}
