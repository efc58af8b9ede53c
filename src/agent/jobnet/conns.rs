//! The job's TCP connections: finding them (a job in its node's network
//! with one cannot move), and undoing what a dump that left the job's tree
//! stopped did to them when that tree runs on where it was: CRIU's network
//! lock, and each established socket in TCP repair mode.

use super::*;

/// Take CRIU's network lock off a job that resumes where it was dumped
/// without a restore (a source taking its stopped tree back), after
/// [`repair_off`]. A dump that did not leave the tree running keeps its
/// `inet CRIU…` table in the job's namespace for the restore to remove;
/// with no restore it would drop every packet of the job for good.
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
    use std::os::fd::{AsFd, OwnedFd};
    let mut seen = std::collections::BTreeSet::new();
    let mut cleared = 0;
    let mut failed = Vec::new();
    // The holder's pidfd, kept while its sockets (listed together) come.
    let mut holder: Option<(i32, OwnedFd)> = None;
    for s in tree_sockets(root) {
        if holder.as_ref().is_none_or(|(pid, _)| *pid != s.pid) {
            match crate::core::procfs::pidfd_open(s.pid) {
                Ok(fd) => holder = Some((s.pid, fd)),
                Err(_) => {
                    // Gone since the listing: its descriptors went with it.
                    holder = None;
                    continue;
                }
            }
        }
        let Some((_, pidfd)) = &holder else { continue };
        // A socket shared by several descriptors or processes is cleared
        // once.
        if !seen.insert(s.inode) {
            continue;
        }
        let sock = match crate::core::procfs::pidfd_getfd(pidfd.as_fd(), s.fd) {
            Ok(sock) => sock,
            Err(e) => {
                failed.push(format!("pid {} fd {}: {e}", s.pid, s.fd));
                continue;
            }
        };
        match clear_repair(&sock) {
            Ok(true) => cleared += 1,
            Ok(false) => {}
            Err(e) => failed.push(format!("pid {} fd {}: {e}", s.pid, s.fd)),
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
fn clear_repair(sock: &std::os::fd::OwnedFd) -> std::io::Result<bool> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpRepair};
    use std::os::fd::AsRawFd;
    let mut proto: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: proto and len are valid for the kernel to write an int into.
    // (nix has no option for SO_PROTOCOL.)
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut proto as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if proto != libc::IPPROTO_TCP || getsockopt(sock, TcpRepair)? != 1 {
        return Ok(false);
    }
    // TCP_REPAIR_OFF (0): unlike _NO_WP, the kernel probes the peer's
    // window at once, as after CRIU's restore.
    setsockopt(sock, TcpRepair, &0)?;
    Ok(true)
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

/// A socket open in a process tree: who holds it, as which fd.
struct TreeSocket {
    pid: i32,
    fd: i32,
    inode: u64,
}

/// The sockets open in the process tree rooted at `root`, a process's
/// together (a socket shared by several fds or tasks appears once per
/// holding fd).
fn tree_sockets(root: i32) -> Vec<TreeSocket> {
    let mut out = Vec::new();
    for pid in crate::core::procfs::tree_pids(root) {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in rd.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push(TreeSocket { pid, fd, inode });
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
    for TreeSocket { pid, inode, .. } in tree_sockets(root) {
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
    let mut out: Vec<u64> = tree_sockets(root)
        .into_iter()
        .map(|s| s.inode)
        .filter(|i| table.contains_key(i))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_parse() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:26F9 0100007F:B4C2 01 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 20 4 30 10 -1\n   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        let e = established_in(text);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, 12345);
        assert_eq!(e[0].1.to_string(), "127.0.0.1:9977");
    }
}
