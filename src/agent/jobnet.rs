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
    run(
        Command::new("ip").args([
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            JOB_IFACE,
            "address",
            &net.mac,
            "netns",
            &pid.to_string(),
        ]),
        "creating the job's veth",
    )?;
    let inside = format!(
        "addr add {}/{} dev {JOB_IFACE}\nlink set lo up\nlink set {JOB_IFACE} up\nroute add default via {}\n",
        net.ip, net.prefix, net.gateway
    );
    let result = (|| {
        run(
            Command::new("ip").args(["link", "set", veth, "master", bridge, "up"]),
            "attaching the job's veth to the bridge",
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

/// Whether this process's network namespace has a link `name`. Not
/// `/sys/class/net`: an agent in a node's namespace sees the sysfs of
/// whoever mounted it, i.e. the host's links.
pub fn link_exists(name: &str) -> bool {
    link_index(name).is_ok()
}

/// The index of the link `name` in this thread's network namespace.
pub(crate) fn link_index(name: &str) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a link name"))?;
    // SAFETY: a NUL-terminated name that outlives the call; it only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// A raw packet socket for `protocol` (an `ETH_P_*` in network order; 0:
/// none, so that nothing is received until `bind` names a link and a
/// protocol).
pub(crate) fn packet_socket(protocol: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Delete a link of this node by name (a job's host veth); Ok if absent.
///
/// Through rtnetlink, not `ip link del`: a source deletes the veth of a job
/// it just dumped while the job is frozen, and forking and running `ip`
/// took ~15 ms of that here, the request itself well under one.
pub fn delete_link(name: &str) -> Result<(), JobNetError> {
    match rtnl_delete_link(Link::Name(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(JobNetError::Setup(format!(
            "deleting the job's veth {name}: {e}"
        ))),
    }
}

/// An interface, by name or by index.
#[derive(Debug, Clone, Copy)]
enum Link<'a> {
    Name(&'a str),
    Index(u32),
}

/// RTM_DELLINK of one interface in this process's network namespace, and
/// the kernel's answer (an errno, or 0).
fn rtnl_delete_link(link: Link<'_>) -> std::io::Result<()> {
    rtnl_link(libc::RTM_DELLINK, link, 0, 0)
}

/// Set one interface up or down (RTM_NEWLINK on IFF_UP).
fn rtnl_set_up(link: Link<'_>, up: bool) -> std::io::Result<()> {
    let flags = if up { libc::IFF_UP as u32 } else { 0 };
    rtnl_link(libc::RTM_NEWLINK, link, flags, libc::IFF_UP as u32)
}

/// One rtnetlink request about one interface (`kind`, with the ifinfomsg's
/// `flags` and `change` mask), and the kernel's answer (an errno, or 0).
fn rtnl_link(kind: u16, link: Link<'_>, flags: u32, change: u32) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // nlmsghdr (16 bytes), ifinfomsg (16: the index, or 0 and then one
    // attribute IFLA_IFNAME, rtattr (4) + the name + NUL, padded).
    const HDR: usize = 16;
    const IFINFO: usize = 16;
    let (index, name) = match link {
        Link::Index(i) => (i, &[][..]),
        Link::Name(n) => {
            let bytes = n.as_bytes();
            if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
                return Err(Error::new(ErrorKind::InvalidInput, "not an interface name"));
            }
            (0, bytes)
        }
    };
    let attr_len = if name.is_empty() {
        0
    } else {
        4 + name.len() + 1
    };
    let total = HDR + IFINFO + ((attr_len + 3) & !3);
    let mut msg = vec![0u8; total];
    msg[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&kind.to_ne_bytes());
    let nl_flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    msg[6..8].copy_from_slice(&nl_flags.to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family, pad, type (u16), the index (i32), flags, change.
    msg[HDR + 4..HDR + 8].copy_from_slice(&(index as i32).to_ne_bytes());
    msg[HDR + 8..HDR + 12].copy_from_slice(&flags.to_ne_bytes());
    msg[HDR + 12..HDR + 16].copy_from_slice(&change.to_ne_bytes());
    if !name.is_empty() {
        let a = HDR + IFINFO;
        msg[a..a + 2].copy_from_slice(&(attr_len as u16).to_ne_bytes());
        msg[a + 2..a + 4].copy_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
        msg[a + 4..a + 4 + name.len()].copy_from_slice(name);
    }
    // SAFETY: plain syscalls on a socket this function owns, with buffers
    // that outlive them.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: see above.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    loop {
        // SAFETY: see above.
        let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            let e = Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        // The answer to a request with NLM_F_ACK: NLMSG_ERROR, whose
        // payload starts with the errno (0: done).
        if n < HDR + 4 {
            return Err(Error::new(ErrorKind::InvalidData, "short netlink answer"));
        }
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        if kind != libc::NLMSG_ERROR as u16 {
            continue;
        }
        let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        return if errno == 0 {
            Ok(())
        } else {
            Err(Error::from_raw_os_error(-errno))
        };
    }
}

/// Cut a stopped source (post-copy, or streamed pages) off the network
/// (up = false) or put it back after a failed move (up = true).
///
/// Through rtnetlink, not `ip link set`: a source takes the link down
/// while the job is frozen (see [`delete_link`]).
pub fn set_link(name: &str, up: bool) {
    match rtnl_set_up(Link::Name(name), up) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
        Err(e) => tracing::warn!(
            "setting the job's veth {name} {}: {e}",
            if up { "up" } else { "down" }
        ),
    }
}

/// Take CRIU's network lock off a job that resumes where it was dumped
/// without a restore (a post-copy source taking its stopped tree back);
/// after [`repair_off`].
/// A dump that did not leave the tree running keeps its `inet CRIU…` table
/// in the job's namespace for the restore to remove; with no restore it
/// would drop every packet of the job for good.
pub fn unlock(pid: i32) -> Result<(), JobNetError> {
    let ns = format!("--net=/proc/{pid}/ns/net");
    let out = Command::new("nsenter")
        .args([ns.as_str(), "nft", "list", "tables"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| JobNetError::Setup(format!("nft list tables: {e}")))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family, name] = f[..] {
            if name.starts_with("CRIU") {
                run(
                    Command::new("nsenter").args([
                        ns.as_str(),
                        "nft",
                        "delete",
                        "table",
                        family,
                        name,
                    ]),
                    "removing CRIU's network lock",
                )?;
            }
        }
    }
    Ok(())
}

/// Take the job's established TCP connections out of repair mode: the
/// other half of what a dump that left its tree stopped (post-copy, or
/// streamed pages) did to them, for a tree that resumes here without a
/// restore. Returns how many sockets were in repair mode.
///
/// Why here: CRIU puts each established socket in repair mode to read its
/// state, and takes it out again only when the dump leaves the tree
/// running; a tree left stopped is the target's to restore, so its sockets
/// stay in repair mode, where the kernel sends nothing and the peer sees a
/// connection that never answers again. The flag belongs to the socket, so
/// a copy of the job's descriptor (`pidfd_getfd`, which needs what ptrace
/// does: root) clears it. Turning repair off sends the peer a window probe,
/// as CRIU's own `TCP_REPAIR_OFF` does. Call it before [`unlock`], in the
/// order CRIU itself undoes a dump.
pub fn repair_off(root: i32) -> Result<usize, JobNetError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut seen = std::collections::BTreeSet::new();
    let mut cleared = 0;
    let mut failed = Vec::new();
    for pid in crate::core::procfs::tree_pids(root) {
        // SAFETY: pidfd_open has no memory-safety preconditions.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if raw < 0 {
            // Gone since the listing: its descriptors went with it.
            continue;
        }
        // SAFETY: raw is a descriptor pidfd_open just gave us.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let Some(num) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            let link = link.to_string_lossy().into_owned();
            // A socket shared by several descriptors or processes is
            // cleared once.
            if !link.starts_with("socket:[") || !seen.insert(link) {
                continue;
            }
            // SAFETY: pidfd_getfd has no memory-safety preconditions.
            let dup =
                unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), num, 0) } as i32;
            if dup < 0 {
                failed.push(format!(
                    "pid {pid} fd {num}: {}",
                    std::io::Error::last_os_error()
                ));
                continue;
            }
            // SAFETY: dup is a descriptor pidfd_getfd just gave us.
            let sock = unsafe { OwnedFd::from_raw_fd(dup) };
            match clear_repair(&sock) {
                Ok(true) => cleared += 1,
                Ok(false) => {}
                Err(e) => failed.push(format!("pid {pid} fd {num}: {e}")),
            }
        }
    }
    if failed.is_empty() {
        Ok(cleared)
    } else {
        Err(JobNetError::Setup(format!(
            "taking the job's connections out of TCP repair mode ({cleared} done): {}",
            failed.join("; ")
        )))
    }
}

/// One socket: if it is TCP and in repair mode, take it out. Returns
/// whether it was.
fn clear_repair(sock: &impl std::os::fd::AsRawFd) -> std::io::Result<bool> {
    let get = |level: i32, opt: i32| -> std::io::Result<i32> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid for the kernel to write an int into.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(v)
        }
    };
    if get(libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP {
        return Ok(false);
    }
    if get(libc::SOL_TCP, libc::TCP_REPAIR)? != 1 {
        return Ok(false);
    }
    // TCP_REPAIR_OFF (0): unlike _NO_WP, the kernel probes the peer's
    // window at once, as after CRIU's restore.
    let off: libc::c_int = 0;
    // SAFETY: off is a valid int for the kernel to read.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_REPAIR,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// CRIU's `external` entry that restores the job's interface on this node.
pub fn external_veth(veth: &str, bridge: &str) -> String {
    format!("veth[{JOB_IFACE}]:{veth}@{bridge}")
}

/// One gratuitous ARP frame (an ARP request for `ip` from `ip`, broadcast).
fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target MAC stays zero
    f[38..42].copy_from_slice(&ip.octets());
    f
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

/// Announce the job's address from inside its namespace, now that its
/// sockets exist: the bridges on the way learn the MAC's new port. Runs on a
/// thread of its own (it enters the job's namespace, which a pooled thread
/// must never do), which answers once the frames are sent and only then
/// closes its packet socket: the kernel's close of a packet socket waits
/// for an RCU grace period (`synchronize_net` in `packet_release`), 6-24 ms
/// here, and the job's move need not wait for that.
pub fn announce(pid: i32, net: &JobNet) -> Result<(), JobNetError> {
    let mac = parse_mac(&net.mac).ok_or_else(|| JobNetError::Config(net.mac.clone()))?;
    let frame = garp_frame(mac, net.ip);
    let ns = format!("/proc/{pid}/ns/net");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut socket = None;
        let sent = send_garp(&ns, &frame, &mut socket);
        let _ = tx.send(sent);
        // Closed only now (see above).
        drop(socket);
    });
    rx.recv().map_err(|_| {
        JobNetError::Setup("the gratuitous ARP thread ended without an answer".into())
    })?
}

/// Enter the namespace `ns` (this thread only), open a packet socket on its
/// interface into `socket` (left open for the caller to close) and send
/// `frame` twice.
fn send_garp(ns: &str, frame: &[u8; 42], socket: &mut Option<OwnedFd>) -> Result<(), JobNetError> {
    let f = std::fs::File::open(ns).map_err(|e| JobNetError::Setup(format!("{ns}: {e}")))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| JobNetError::Setup(format!("setns {ns}: {e}")))?;
    let idx = link_index(JOB_IFACE)
        .map_err(|e| JobNetError::Setup(format!("no {JOB_IFACE} in the job's namespace: {e}")))?;
    let proto = (libc::ETH_P_ARP as u16).to_be();
    let fd = socket.insert(
        packet_socket(proto).map_err(|e| JobNetError::Setup(format!("packet socket: {e}")))?,
    );
    let mut err = None;
    for _ in 0..2 {
        if let Err(e) = send_link_frame(fd, idx as i32, proto, [0xff; 6], frame) {
            err = Some(e);
        }
    }
    match err {
        Some(e) => Err(JobNetError::Setup(format!("gratuitous ARP: {e}"))),
        None => Ok(()),
    }
}

/// Send one whole Ethernet `frame` out of the link `ifindex` to `dest`, as
/// `protocol` (an `ETH_P_*` in network order): the gratuitous ARP here, and
/// the frames `replay` sends again.
pub(crate) fn send_link_frame(
    fd: &OwnedFd,
    ifindex: i32,
    protocol: u16,
    dest: [u8; 6],
    frame: &[u8],
) -> std::io::Result<()> {
    // SAFETY: an all-zero sockaddr_ll is valid; its fields are set below.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = protocol;
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&dest);
    // SAFETY: sends our own buffer, with its length, to a sockaddr_ll of
    // the size given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An established TCP connection of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub pid: i32,
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {} (pid {})", self.local, self.remote, self.pid)
    }
}

fn parse_addr(hex: &str) -> Option<std::net::SocketAddr> {
    let (a, p) = hex.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let ip: std::net::IpAddr = match a.len() {
        8 => Ipv4Addr::from(u32::from_be(u32::from_str_radix(a, 16).ok()?)).into(),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(b);
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// Established TCP sockets (inode → local, remote) in a `/proc/net/tcp*`
/// table's text.
fn established_in(text: &str) -> Vec<(u64, std::net::SocketAddr, std::net::SocketAddr)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 || f[3] != "01" {
                return None;
            }
            Some((f[9].parse().ok()?, parse_addr(f[1])?, parse_addr(f[2])?))
        })
        .collect()
}

/// Established TCP sockets (inode → local, remote) of `root`'s network
/// namespace, by inode.
fn established_table(
    root: i32,
) -> std::collections::HashMap<u64, (std::net::SocketAddr, std::net::SocketAddr)> {
    let mut table = std::collections::HashMap::new();
    for t in ["tcp", "tcp6"] {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{root}/net/{t}")) {
            table.extend(established_in(&s).into_iter().map(|(i, l, r)| (i, (l, r))));
        }
    }
    table
}

/// The socket inodes open in the process tree rooted at `root`, with the
/// pid holding each (a socket shared by several fds or tasks appears once
/// per holder).
fn tree_socket_inodes(root: i32) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    for pid in crate::core::procfs::tree_pids(root) {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((pid, inode));
            }
        }
    }
    out
}

/// The established TCP connections held by the process tree rooted at
/// `root` (its fds' socket inodes looked up in its namespace's tables).
pub fn established_connections(root: i32) -> Vec<Connection> {
    let table = established_table(root);
    let mut out = Vec::new();
    for (pid, inode) in tree_socket_inodes(root) {
        if let Some((l, r)) = table.get(&inode) {
            let c = Connection {
                pid,
                local: *l,
                remote: *r,
            };
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// The inodes of the established TCP sockets the tree rooted at `root`
/// holds, each once: the sockets CRIU writes a `tcp-stream` image for.
pub fn established_inodes(root: i32) -> Vec<u64> {
    let table = established_table(root);
    let mut out: Vec<u64> = tree_socket_inodes(root)
        .into_iter()
        .map(|(_, i)| i)
        .filter(|i| table.contains_key(i))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
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
    fn a_link_is_set_down_and_up_and_a_missing_one_is_no_error() {
        crate::agent::in_own_netns(|| {
            let ip = |args: &[&str]| Command::new("ip").args(args).output().unwrap();
            let add = [
                "link",
                "add",
                "mjuptest",
                "type",
                "veth",
                "peer",
                "name",
                "mjuptestp",
            ];
            assert!(ip(&add).status.success());
            let is_up = || {
                let o = ip(&["-o", "link", "show", "mjuptest"]);
                let l = String::from_utf8_lossy(&o.stdout).into_owned();
                let flags = l
                    .split('<')
                    .nth(1)
                    .and_then(|f| f.split('>').next())
                    .unwrap_or("");
                flags.split(',').any(|f| f == "UP")
            };
            assert!(!is_up(), "a new veth starts down");
            set_link("mjuptest", true);
            assert!(is_up());
            set_link("mjuptest", false);
            assert!(!is_up());
            delete_link("mjuptest").unwrap();
            // Gone: nothing to do, and no panic.
            set_link("mjuptest", true);
        });
    }

    #[test]
    fn a_link_is_deleted_by_name_and_a_missing_one_is_no_error() {
        // In a network namespace of the test's own thread (and of the `ip`
        // it runs), so the machine's links are never touched.
        crate::agent::in_own_netns(|| {
            let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap();
            // A veth pair, like a job's (this kernel has no dummy links).
            let add = [
                "link",
                "add",
                "mjdeltest",
                "type",
                "veth",
                "peer",
                "name",
                "mjdeltestp",
            ];
            assert!(ip(&add).success());
            assert!(link_exists("mjdeltest"));
            delete_link("mjdeltest").unwrap();
            assert!(!link_exists("mjdeltest") && !link_exists("mjdeltestp"));
            // Already gone: nothing to do.
            delete_link("mjdeltest").unwrap();
            // By index, as a job's leaving does in the background: that
            // link only, never a new one of the same name.
            assert!(ip(&add).success());
            let old = link_index("mjdeltest").unwrap();
            delete_link("mjdeltest").unwrap();
            assert!(ip(&add).success());
            let e = rtnl_delete_link(Link::Index(old)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
            assert!(link_exists("mjdeltest"), "the new link of that name stays");
            let new = link_index("mjdeltest").unwrap();
            rtnl_delete_link(Link::Index(new)).unwrap();
            assert!(!link_exists("mjdeltest"));
            let e = delete_link("an-interface-name-too-long").unwrap_err();
            assert!(e.to_string().contains("not an interface name"), "{e}");
            // The loopback cannot be deleted: the kernel's refusal comes back.
            assert!(delete_link("lo").is_err());
        });
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

    #[test]
    fn proc_net_tcp_lines_parse() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:26F9 0100007F:B4C2 01 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 20 4 30 10 -1\n   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        let e = established_in(text);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, 12345);
        assert_eq!(e[0].1.to_string(), "127.0.0.1:9977");
    }

    #[test]
    fn garp_frame_announces_the_address() {
        let f = garp_frame([2, 0x6d, 10, 77, 1, 100], Ipv4Addr::new(10, 77, 1, 100));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[28..32], &[10, 77, 1, 100]);
        assert_eq!(&f[38..42], &[10, 77, 1, 100]);
    }
}
