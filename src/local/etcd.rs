//! The local cluster's etcd: one member (or three with `--etcd-members 3`),
//! each in its own network namespace `mos-<cluster>-etcd<i>` on the
//! cluster's bridge at `10.77.<k>.<240+i>`, data under the cluster's run
//! dir (tmpfs: a member starts in well under a second).
//!
//! Its own namespace, not the host's, so a test can cut one node off etcd
//! alone (a blackhole route to these addresses in the node's namespace)
//! while the node still reaches its peers and the shared path; and named
//! like the nodes' namespaces, so `down` finds and kills it with them.

use super::net;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// Host part of member 1's address; members are .241, .242, …
const HOST_BASE: u8 = 240;
pub const MAX_MEMBERS: usize = 7;

pub fn netns(cluster: &str, i: usize) -> String {
    format!("mos-{cluster}-etcd{i}")
}

pub fn address(k: u8, i: usize) -> String {
    format!("10.77.{k}.{}", HOST_BASE as usize + i)
}

pub fn data_dir(state_dir: &Path, i: usize) -> PathBuf {
    state_dir.join("etcd").join(format!("e{i}"))
}

/// Where the etcd binary is (Debian's `etcd-server`, from `make setup`).
pub fn binary() -> anyhow::Result<PathBuf> {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("etcd not found (install Debian's etcd-server: `make setup`), or start the cluster with --no-etcd")
}

/// Start `members` etcd members; returns their client endpoints once they
/// answer.
pub async fn start(
    cluster: &str,
    k: u8,
    members: usize,
    state_dir: &Path,
) -> anyhow::Result<Vec<String>> {
    if members == 0 || members > MAX_MEMBERS {
        bail!("--etcd-members must be between 1 and {MAX_MEMBERS}");
    }
    let etcd = binary()?;
    let initial: Vec<String> = (1..=members)
        .map(|i| format!("e{i}=http://{}:{PEER_PORT}", address(k, i)))
        .collect();
    let mut endpoints = Vec::new();
    for i in 1..=members {
        let ip = address(k, i);
        net::make_ns(
            cluster,
            &netns(cluster, i),
            &format!("mv-{cluster}-e{i}"),
            &ip,
            k,
        )?;
        let dir = data_dir(state_dir, i);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.join(format!("etcd{i}.log")))?;
        let client = format!("http://{ip}:{CLIENT_PORT}");
        let peer = format!("http://{ip}:{PEER_PORT}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns(cluster, i)])
            .arg(&etcd)
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &format!("mosix-{cluster}")])
            // The defaults (100 ms heartbeat, 1 s election): a dead leader
            // is replaced in about a second, well inside a lease.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // etcd's answers gate every agent's lease: it runs at the agents'
        // priority, not at whatever nice value `local up` was started with
        // (a test under `nice 19` beside CPU-bound jobs left it starved:
        // "compare-and-set: no answer within 1500 ms").
        let nice = crate::core::MIGRATION_NICE;
        // SAFETY: only async-signal-safe syscalls, no allocation.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                // ioprio_set(IOPRIO_WHO_PROCESS, self, best-effort class, level 0)
                libc::syscall(libc::SYS_ioprio_set, 1, 0, 2 << 13);
                Ok(())
            });
        }
        // Detached: `down` kills it through its network namespace.
        cmd.spawn()
            .with_context(|| format!("starting etcd member e{i}"))?;
        endpoints.push(client);
    }
    crate::coord::connect_within(&endpoints, Duration::from_secs(30))
        .await
        .map_err(|e| {
            let tail = std::fs::read_to_string(state_dir.join("etcd1.log")).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(3).collect();
            anyhow::anyhow!(
                "etcd did not answer: {e}; etcd1.log ends with: {}",
                tail.join(" | ")
            )
        })?;
    Ok(endpoints)
}

/// The pid of member `i` (an `etcd` in its namespace), for fault tests.
pub fn member_pid(cluster: &str, i: usize) -> Option<i32> {
    net::netns_pids(&netns(cluster, i)).into_iter().find(|p| {
        std::fs::read_to_string(format!("/proc/{p}/comm"))
            .map(|c| c.trim() == "etcd")
            .unwrap_or(false)
    })
}
