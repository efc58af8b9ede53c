//! The local cluster: several nodes on one machine, the embedded default.
//!
//! Each node is a network namespace `mos-<cluster>-node<i>` with a veth into
//! the bridge `mb-<cluster>` (address `10.77.<k>.<i+1>/24`, the host is `.1`),
//! its own cgroup `mosix/<cluster>/node<i>` in the cpu and cpuacct
//! hierarchies (a CPU cap is a CFS quota there), a mount namespace of its own
//! with private `/tmp`, `/var/tmp`, `/run` and home ([`nodefs`]), and a real
//! `mosixd` that was moved into all three before it started (its CRIU and
//! jobs inherit them, so CRIU sees each job in its own mount namespace).
//! Everything is named after the cluster, so `down` can find and remove it
//! all even when the state file is gone after a crash.
//!
//! Storage: by default all nodes share one root (registry, images, job
//! output). With `shared_root: None` nothing is shared: each node gets its own
//! state dir `<run dir>/nodes/<node>` (its registry and images), and
//! migrations stream images from agent to agent. Job output goes to
//! `<run dir>/jobs`, given to every agent as `--jobs-dir`: CRIU reopens a
//! job's output by path, so it must be the same path on every node, and on one
//! machine the same path is the same directory (on a real cluster it is each
//! machine's own disk, and the migration carries the files along).

pub mod etcd;
pub mod fileserver;
pub mod net;
pub mod nodefs;

use crate::core::cluster_file::{ClusterFile, NodeEntry, TlsFiles};
use crate::core::NodeName;
use anyhow::{bail, Context};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const AGENT_PORT: u16 = 7000;
pub const METRICS_PORT: u16 = 9100;
pub const BALANCER_PORT: u16 = 7070;
const CGROUP_CONTROLLERS: &[&str] = &["cpu", "cpuacct"];

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub nodes: usize,
    /// CPU cap per node in cores (0 or missing = uncapped). Shorter lists repeat their last value.
    pub caps: Vec<f64>,
    /// Speed factor per node (missing = 1.0).
    pub speeds: Vec<f64>,
    /// The shared root every node uses; None: no shared path (see the module doc).
    pub shared_root: Option<PathBuf>,
    /// Host directories every node sees at the same path although nothing
    /// of the cluster lives there (like an NFS home on a real cluster);
    /// agents treat files there as portable (`mosixd --common-dir`).
    pub common: Vec<PathBuf>,
    /// How the nodes get what they share (the shared root, or without one
    /// the `common` dirs).
    pub shared_over: SharedOver,
    /// mTLS between every component (on by default).
    pub tls: bool,
    /// Directory holding `mosixd` (and the other binaries).
    pub bin_dir: PathBuf,
    pub criu: PathBuf,
    /// Allow post-copy migrations (agents get `--no-post-copy` if false).
    pub post_copy: bool,
    /// Agents get `--plain-pages` (see `AgentConfig::plain_pages`).
    pub plain_pages: bool,
    /// Seal images with the cluster key (agents get `--image-key`). Off only
    /// to measure what sealing costs: tampered images then go undetected.
    pub seal_images: bool,
    /// etcd members to start (0: none, the cluster runs without leases and
    /// fencing; see [`etcd`]).
    pub etcd_members: usize,
    /// The agents' `--lease-ttl` and `--fence-margin` (None: their defaults).
    pub lease_ttl: Option<f64>,
    pub fence_margin: Option<f64>,
    /// The agents' `--slots-per-core` (None: [`LOCAL_SLOTS_PER_CORE`]).
    pub slots_per_core: Option<f64>,
}

/// How the nodes of a local cluster reach their shared directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharedOver {
    /// The host's directory, bound into every node: one machine's disk.
    #[default]
    Local,
    /// sshfs from a file-server namespace on the bridge ([`fileserver`]).
    Sshfs,
}

pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 8
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("cluster name {name:?} must be 1-8 lowercase letters or digits (it becomes part of interface names)");
    }
    Ok(())
}

pub fn state_dir(name: &str) -> PathBuf {
    Path::new("/run/mosix").join(name)
}

/// A node's Unix socket for `mosrun` (seen by every node: one machine).
pub fn run_socket_path(cluster: &str, node: &str) -> PathBuf {
    state_dir(cluster).join(format!("{node}.sock"))
}

/// Slots per core on a local cluster: its nodes are fractions of a core,
/// and with the default 2 a 0.6- and a 0.3-core node would both round to
/// one slot; 10 keeps their proportions (6 and 3).
pub const LOCAL_SLOTS_PER_CORE: f64 = 10.0;

pub fn cluster_file_path(name: &str) -> PathBuf {
    state_dir(name).join("cluster.json")
}

/// The default shared root of the local cluster: `criu-images/<name>` in the
/// project directory.
pub fn default_shared_root(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("criu-images")
        .join(name)
}

/// A node's own state dir when nothing is shared.
pub fn node_state_dir(cluster: &str, node: &str) -> PathBuf {
    state_dir(cluster).join("nodes").join(node)
}

/// Job output of a cluster without a shared path (see the module doc).
pub fn jobs_dir(cluster: &str) -> PathBuf {
    state_dir(cluster).join("jobs")
}

pub fn netns_name(cluster: &str, i: usize) -> String {
    format!("mos-{cluster}-node{i}")
}

fn cgroup_rel(cluster: &str, node: &str) -> String {
    format!("mosix/{cluster}/{node}")
}

fn cap_for(opts: &UpOptions, i: usize) -> f64 {
    opts.caps
        .get(i)
        .or(opts.caps.last())
        .copied()
        .unwrap_or(0.0)
}

fn open_cgroup_procs(rel: &str) -> anyhow::Result<Vec<OwnedFd>> {
    CGROUP_CONTROLLERS
        .iter()
        .map(|c| {
            let p = format!("/sys/fs/cgroup/{c}/{rel}/cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map(OwnedFd::from)
                .with_context(|| format!("opening {p}"))
        })
        .collect()
}

fn make_cgroup(rel: &str, cap_cores: f64) -> anyhow::Result<()> {
    for c in CGROUP_CONTROLLERS {
        let dir = format!("/sys/fs/cgroup/{c}/{rel}");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {dir}"))?;
    }
    if cap_cores > 0.0 {
        // A 10 ms CFS period, not the default 100 ms: a node that has used
        // its quota waits for the next period, so with 100 ms a 0.3-core
        // node stalls everything in it (its agent too) for up to 70 ms at a
        // time, and every foreground start there paid for it (p50 76-97 ms
        // during the kernel build). With 10 ms a capped node is a slower
        // machine rather than a stuttering one. The kernel's minimum quota
        // is 1 ms, so caps below 0.1 core round up to 0.1.
        let period = 10_000u64;
        let quota = (cap_cores * period as f64).round().max(1000.0) as u64;
        let base = format!("/sys/fs/cgroup/cpu/{rel}");
        std::fs::write(format!("{base}/cpu.cfs_period_us"), period.to_string())
            .context("setting cfs period")?;
        std::fs::write(format!("{base}/cpu.cfs_quota_us"), quota.to_string())
            .context("setting cfs quota")?;
    }
    Ok(())
}

/// Bring up a local cluster; `progress` is told each step.
pub async fn up(opts: &UpOptions, progress: &dyn Fn(&str)) -> anyhow::Result<ClusterFile> {
    validate_name(&opts.name)?;
    if opts.nodes == 0 || opts.nodes > 200 {
        bail!("--nodes must be between 1 and 200");
    }
    if net::exists_any(&opts.name)? || state_dir(&opts.name).exists() {
        bail!(
            "a local cluster named {:?} already exists (or left debris after a crash); run `mosctl local down --name {}` first",
            opts.name,
            opts.name
        );
    }
    let mosixd = opts.bin_dir.join("mosixd");
    if !mosixd.is_file() {
        bail!(
            "mosixd not found at {} (build with `cargo build`)",
            mosixd.display()
        );
    }
    let result = up_inner(opts, &mosixd, progress).await;
    if result.is_err() {
        progress("bring-up failed; removing what was created");
        let _ = down(&opts.name, false, &|_| {});
    }
    result
}

async fn up_inner(
    opts: &UpOptions,
    mosixd: &Path,
    progress: &dyn Fn(&str),
) -> anyhow::Result<ClusterFile> {
    let sd = state_dir(&opts.name);
    std::fs::create_dir_all(&sd).with_context(|| format!("creating {}", sd.display()))?;
    // Absolute, symlink-free paths: the nodes get them bound back at the
    // same place, and agents compare open files' paths against them.
    let mut opts = opts.clone();
    if let Some(root) = &opts.shared_root {
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating shared root {}", root.display()))?;
        opts.shared_root = Some(
            std::fs::canonicalize(root)
                .with_context(|| format!("resolving shared root {}", root.display()))?,
        );
    }
    for c in opts.common.iter_mut() {
        *c = std::fs::canonicalize(&*c)
            .with_context(|| format!("resolving common directory {}", c.display()))?;
    }
    let opts = &opts;
    let mut shared = nodefs::Shared::default();
    match opts.shared_over {
        SharedOver::Local => shared.bound = common_dirs(opts),
        SharedOver::Sshfs => {
            fileserver::check_tools()?;
            shared.network = common_dirs(opts);
            if shared.network.is_empty() {
                bail!("--shared-over sshfs needs a shared path or a --common directory to serve");
            }
        }
    }
    if let Some(root) = &opts.shared_root {
        // Remember what we own, so `down` only deletes a shared root it created.
        std::fs::write(sd.join("shared_root"), root.to_string_lossy().as_bytes())?;
    } else {
        progress("no shared path: each node keeps its registry and images in its own state dir");
    }

    let k = net::pick_subnet(&opts.name)?;
    progress(&format!("bridge mb-{} on 10.77.{k}.0/24", opts.name));
    net::make_bridge(&opts.name, k)?;
    if opts.shared_over == SharedOver::Sshfs {
        let m = fileserver::start(&opts.name, k, &shared.network)?;
        progress(&format!(
            "file server {} ({}) serving {} over sshfs",
            fileserver::netns(&opts.name),
            m.server,
            shared
                .network
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        shared.mount_commands = m.commands();
    }
    std::fs::write(
        sd.join("shared.json"),
        serde_json::to_vec(&shared).context("encoding the shared dirs")?,
    )?;
    let etcd_endpoints = if opts.etcd_members > 0 {
        let t = Instant::now();
        let e = etcd::start(&opts.name, k, opts.etcd_members, &sd).await?;
        progress(&format!(
            "etcd: {} member(s) at {} (answering after {} ms)",
            e.len(),
            e.join(","),
            t.elapsed().as_millis()
        ));
        e
    } else {
        progress("no etcd (--no-etcd): no leases or fencing; a lost node is only reported");
        Vec::new()
    };

    let mut nodes = Vec::new();
    for i in 1..=opts.nodes {
        let node = NodeName::parse(&format!("node{i}"))?;
        let ip = format!("10.77.{k}.{}", i + 1);
        net::make_node(&opts.name, i, &ip, k)?;
        make_cgroup(&cgroup_rel(&opts.name, node.as_str()), cap_for(opts, i - 1))?;
        let scheme = if opts.tls { "https" } else { "http" };
        nodes.push(NodeEntry {
            name: node,
            endpoint: format!("{scheme}://{ip}:{AGENT_PORT}"),
            address: ip.clone(),
            metrics: Some(format!("http://{ip}:{METRICS_PORT}/metrics")),
            run_socket: Some(run_socket_path(&opts.name, &format!("node{i}"))),
        });
    }

    let pki_dir = sd.join("pki");
    let tls = if opts.tls {
        progress("cluster CA and node certificates (mTLS)");
        let specs: Vec<(String, Vec<String>)> = nodes
            .iter()
            .map(|n| {
                (
                    n.name.to_string(),
                    vec![
                        n.address.clone(),
                        crate::api::client::CLUSTER_TLS_NAME.to_string(),
                    ],
                )
            })
            .chain(std::iter::once((
                "balancer".to_string(),
                vec![
                    format!("10.77.{k}.1"),
                    crate::api::client::CLUSTER_TLS_NAME.to_string(),
                ],
            )))
            .collect();
        crate::security::pki::write_cluster_pki(&pki_dir, &opts.name, &specs)
            .context("writing the cluster PKI")?;
        Some(TlsFiles {
            ca: pki_dir.join("ca.pem"),
            cert: pki_dir.join("client.pem"),
            key: pki_dir.join("client.key"),
        })
    } else {
        None
    };
    // A new local cluster has a new CA: it takes over its shared root, so a
    // marker left by an earlier run (--keep-data, a crash) is not "another
    // cluster" (see security::membership).
    if let Some(root) = &opts.shared_root {
        let _ = std::fs::remove_file(root.join(crate::security::membership::MARKER_FILE));
    }
    let key_path = sd.join("image.key");
    crate::security::manifest::ClusterKey::generate()
        .save(&key_path)
        .context("writing the image key")?;

    let cf = ClusterFile {
        name: opts.name.clone(),
        shared_root: opts.shared_root.clone(),
        balancer: Some(format!(
            "{}://10.77.{k}.1:{BALANCER_PORT}",
            if opts.tls { "https" } else { "http" }
        )),
        tls,
        nodes: nodes.clone(),
        etcd: etcd_endpoints,
    };
    let cf_path = cluster_file_path(&opts.name);
    cf.save(&cf_path).context("writing the cluster file")?;

    let mut pids = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        progress(&format!("starting mosixd on {} ({})", n.name, n.address));
        let mut cmd = Command::new(mosixd);
        cmd.arg("--node")
            .arg(n.name.as_str())
            .arg("--listen")
            .arg(format!("{}:{AGENT_PORT}", n.address));
        match &opts.shared_root {
            Some(root) => {
                cmd.arg("--shared").arg(root);
            }
            None => {
                cmd.arg("--state-dir")
                    .arg(node_state_dir(&opts.name, n.name.as_str()))
                    .arg("--jobs-dir")
                    .arg(jobs_dir(&opts.name));
            }
        }
        cmd.arg("--criu")
            .arg(&opts.criu)
            .arg("--cgroup")
            .arg(cgroup_rel(&opts.name, n.name.as_str()))
            .arg("--cluster")
            .arg(&cf_path)
            .arg("--metrics")
            .arg(format!("{}:{METRICS_PORT}", n.address))
            // All nodes of a local cluster live and die with this one
            // machine, so an fsync before the hand-over protects nothing
            // that a crash would not take anyway (see ImageSync).
            .arg("--image-sync")
            .arg("close")
            .arg("--slots-per-core")
            .arg(
                opts.slots_per_core
                    .unwrap_or(LOCAL_SLOTS_PER_CORE)
                    .to_string(),
            );
        if let Some(sock) = &n.run_socket {
            cmd.arg("--run-socket").arg(sock);
        }
        // Jobs may have their own address (`mosrun -d --net own`), from a
        // pool of the bridge's subnet, routed through the host's bridge.
        cmd.arg("--job-net-pool")
            .arg(net::job_pool(k))
            .arg("--job-net-gateway")
            .arg(format!("10.77.{k}.1"))
            .arg("--job-net-claims")
            .arg(sd.join("jobnet/addrs"));
        for c in &opts.common {
            cmd.arg("--common-dir").arg(c);
        }
        if !opts.post_copy {
            cmd.arg("--no-post-copy");
        }
        if opts.plain_pages {
            cmd.arg("--plain-pages");
        }
        if let Some(t) = opts.lease_ttl {
            cmd.arg("--lease-ttl").arg(t.to_string());
        }
        if let Some(m) = opts.fence_margin {
            cmd.arg("--fence-margin").arg(m.to_string());
        }
        if opts.seal_images {
            cmd.arg("--image-key").arg(&key_path);
        }
        if let Some(s) = opts.speeds.get(i) {
            cmd.arg("--speed").arg(s.to_string());
        }
        if opts.tls {
            cmd.arg("--tls-ca")
                .arg(pki_dir.join("ca.pem"))
                .arg("--tls-cert")
                .arg(pki_dir.join(format!("{}.pem", n.name)))
                .arg("--tls-key")
                .arg(pki_dir.join(format!("{}.key", n.name)));
        } else {
            cmd.arg("--insecure");
        }
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        std::fs::write(
            sd.join(format!("{}.args.json", n.name)),
            serde_json::to_vec(&args)?,
        )?;
        let plan = nodefs::plan(&opts.name, n.name.as_str(), &shared)?;
        let pid = spawn_in_node(
            &mut cmd,
            &opts.name,
            i + 1,
            n.name.as_str(),
            &sd,
            NodeMounts::New(plan),
        )?;
        pids.push(pid);
    }
    std::fs::write(
        sd.join("agents.pids"),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;

    progress("waiting for agents to answer");
    let started: Vec<(NodeEntry, i32)> = nodes.iter().cloned().zip(pids.iter().copied()).collect();
    wait_answering(&cf, &started, &sd, UP_PATIENCE).await?;
    Ok(cf)
}

/// How long `up` and `restart-agent` wait for an agent to answer: a start
/// takes well under a second on an idle machine, seconds on a loaded one.
pub const UP_PATIENCE: Duration = Duration::from_secs(30);

/// Wait until every one of `nodes` (each with the pid of the agent just
/// started for it) answers a `GetLoad` over the cluster's own transport
/// (mTLS or not), so that whoever called `up` or `restart-agent` can use the
/// agent at once. An agent that exits, or is silent past `patience`, is an
/// error that quotes the end of its log, which is where it says why.
pub async fn wait_answering(
    cf: &ClusterFile,
    nodes: &[(NodeEntry, i32)],
    state_dir: &Path,
    patience: Duration,
) -> anyhow::Result<()> {
    let tls = crate::api::client::ClientTls::from_cluster(cf)?;
    let deadline = Instant::now() + patience;
    for (n, pid) in nodes {
        let log_tail = || {
            let log = state_dir.join(format!("{}.log", n.name));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // Non-empty lines, and enough of them for a whole usage error
            // (clap's is 4) with the old agent's last words after it: its
            // CRIU workers may write to the log as they die.
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .filter(|l| !l.trim().is_empty())
                .take(10)
                .collect();
            format!(
                "its log ({}) ends with: {}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        };
        loop {
            let ok = async {
                let mut c =
                    crate::api::client::agent(&n.endpoint, tls.as_ref(), Duration::from_secs(1))
                        .await?;
                c.get_load(crate::api::pb::GetLoadRequest {}).await?;
                anyhow::Ok(())
            }
            .await;
            match ok {
                Ok(()) => break,
                // An agent that exited is our zombie until we exit, which
                // `alive` counts as dead.
                Err(_) if !alive(*pid) => {
                    bail!("mosixd on {} exited at its start; {}", n.name, log_tail());
                }
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "mosixd on {} did not answer within {}s: {e:#}; {}",
                        n.name,
                        patience.as_secs(),
                        log_tail()
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}

/// What every node sees at the same path: the shared root and the
/// `--common` dirs.
fn common_dirs(opts: &UpOptions) -> Vec<PathBuf> {
    opts.shared_root
        .iter()
        .chain(opts.common.iter())
        .cloned()
        .collect()
}

/// How a process started in a node gets the node's mount namespace.
pub enum NodeMounts {
    /// Make the node's namespace (its first process).
    New(nodefs::Plan),
    /// Join the namespace a process of the node already has.
    Enter(std::fs::File),
}

/// Start a process inside node `i`: its network namespace (setns only), its
/// mount namespace (see [`nodefs`]), its cgroups, a session of its own,
/// output to `<state>/<node>.log`.
pub fn spawn_in_node(
    cmd: &mut Command,
    cluster: &str,
    i: usize,
    node: &str,
    state_dir: &Path,
    mounts: NodeMounts,
) -> anyhow::Result<i32> {
    let ns_path = format!("/run/netns/{}", netns_name(cluster, i));
    let ns = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
    let procs = open_cgroup_procs(&cgroup_rel(cluster, node))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join(format!("{node}.log")))?;
    let ns_fd = ns.as_raw_fd();
    let proc_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let (plan, mnt_ns) = match mounts {
        NodeMounts::New(p) => (Some(p), None),
        NodeMounts::Enter(f) => (None, Some(f)),
    };
    // Network mounts are made by a shell inside the new namespace, which
    // then execs the program.
    let mut wrapped = plan.as_ref().and_then(|p| p.wrap(cmd));
    let cmd = wrapped.as_mut().unwrap_or(cmd);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mnt_fd = mnt_ns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure only makes async-signal-safe syscalls on fds that
    // stay open until spawn returns, and on strings prepared beforehand.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = mnt_fd {
                if libc::setns(fd, libc::CLONE_NEWNS) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(p) = &plan {
                p.apply_in_child()?;
            }
            for fd in &proc_fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?} in {node}", cmd.get_program()))?;
    let pid = child.id() as i32;
    // Detached: the process outlives us; `down` kills it by netns and cgroup.
    drop(child);
    drop(ns);
    drop(mnt_ns);
    drop(procs);
    Ok(pid)
}

/// The agent process of a node (a `mosixd` in the node's namespace).
pub fn agent_pid(cluster: &str, node: &str) -> Option<i32> {
    let i: usize = node.strip_prefix("node")?.parse().ok()?;
    net::netns_pids(&netns_name(cluster, i))
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == "mosixd")
                .unwrap_or(false)
        })
}

/// Restart one node's agent with the arguments it was started with (a new
/// CRIU path may be given, e.g. to test a failing CRIU, and `extra`
/// arguments for this start only). Jobs keep running; the new agent
/// re-adopts them and finishes any half-done migration.
pub fn restart_agent(
    cluster: &str,
    node: &str,
    criu: Option<&Path>,
    kill_only: bool,
    extra: &[String],
) -> anyhow::Result<Option<i32>> {
    validate_name(cluster)?;
    let n = NodeName::parse(node)?;
    let i: usize = n
        .as_str()
        .strip_prefix("node")
        .and_then(|x| x.parse().ok())
        .with_context(|| format!("{node} is not a local-cluster node name"))?;
    let sd = state_dir(cluster);
    let args_path = sd.join(format!("{node}.args.json"));
    let mut args: Vec<String> = serde_json::from_slice(
        &std::fs::read(&args_path)
            .with_context(|| format!("no such node {node} in cluster {cluster}"))?,
    )?;
    // The node's mount namespace outlives its agent as long as a process of
    // the node runs (CRIU, jobs): the new agent must join it, or it could
    // not dump the jobs it re-adopts. Held open across the kill.
    let old = agent_pid(cluster, node);
    let mnt_ns = old
        .into_iter()
        .chain(node_cgroup_pids(cluster, node))
        .find_map(nodefs::foreign_mnt_ns);
    if let Some(old) = old {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(old) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if kill_only {
        return Ok(None);
    }
    if let Some(c) = criu {
        if let Some(pos) = args.iter().position(|a| a == "--criu") {
            if let Some(v) = args.get_mut(pos + 1) {
                *v = c.to_string_lossy().into_owned();
            }
        }
    }
    let mosixd = std::env::current_exe()?
        .parent()
        .map(|d| d.join("mosixd"))
        .context("locating mosixd")?;
    let mut cmd = Command::new(mosixd);
    // Not written back to the args file: a later restart starts the agent
    // as `up` did.
    cmd.args(&args).args(extra);
    let mounts = match mnt_ns {
        Some(f) => NodeMounts::Enter(f),
        None => {
            // Nothing of the node runs: it "reboots" with a fresh namespace
            // (its private dirs keep their files, as a disk would).
            let shared: nodefs::Shared = serde_json::from_slice(
                &std::fs::read(sd.join("shared.json"))
                    .with_context(|| format!("reading {}/shared.json", sd.display()))?,
            )
            .context("decoding shared.json")?;
            NodeMounts::New(nodefs::plan(cluster, node, &shared)?)
        }
    };
    let pid = spawn_in_node(&mut cmd, cluster, i, node, &sd, mounts)?;
    Ok(Some(pid))
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub processes: usize,
    pub namespaces: usize,
    pub links: usize,
    pub cgroups: usize,
}

/// Remove every namespace, link, cgroup and process of the cluster. Works
/// from names alone, so it also cleans up after a crash.
pub fn down(name: &str, keep_data: bool, progress: &dyn Fn(&str)) -> anyhow::Result<DownReport> {
    validate_name(name)?;
    let mut rep = DownReport::default();
    let sd = state_dir(name);
    let namespaces = net::list_netns(name)?;

    // Every process we started lives in one of the nodes' namespaces or
    // cgroups (jobs inherit both from their agent). Kill until none is left.
    // A process in uninterruptible sleep (CRIU writing a GiB, a FUSE mount
    // going away) dies only when its I/O returns, which on a loaded machine
    // takes seconds: hence the generous bound.
    let deadline = Instant::now() + KILL_PATIENCE;
    loop {
        let mut pids: Vec<i32> = Vec::new();
        if let Ok(s) = std::fs::read_to_string(sd.join("agents.pids")) {
            pids.extend(
                s.lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .filter(|p| alive(*p)),
            );
        }
        for ns in &namespaces {
            pids.extend(net::netns_pids(ns));
        }
        pids.extend(cgroup_pids(name));
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| *p > 1 && *p != std::process::id() as i32);
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        rep.processes = rep.processes.max(pids.len());
        if Instant::now() > deadline {
            bail!(
                "processes {pids:?} survive SIGKILL after {} s (stuck in the kernel, e.g. on I/O); run `mosctl local down --name {name}` again once they are gone",
                KILL_PATIENCE.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if rep.processes > 0 {
        progress(&format!("killed {} processes", rep.processes));
    }
    // From here on every step is tried even if one before it failed, and
    // the errors are reported together: what one `down` leaves, the next
    // one finds by name and removes.
    let mut errors: Vec<String> = Vec::new();
    for ns in &namespaces {
        match retry_briefly(|| net::delete_netns(ns)) {
            Ok(()) => rep.namespaces += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    match net::delete_links(name) {
        Ok(n) => rep.links += n,
        Err(e) => errors.push(format!("{e:#}")),
    }
    match remove_cgroups(name) {
        Ok(n) => rep.cgroups += n,
        Err(e) => errors.push(format!("{e:#}")),
    }
    if !errors.is_empty() {
        bail!(
            "`down` of {name} left something behind (run it again to retry): {}",
            errors.join("; ")
        );
    }
    if !keep_data {
        if let Ok(root) = std::fs::read_to_string(sd.join("shared_root")) {
            let root = PathBuf::from(root.trim());
            // Only the directory `up` created, and only if it looks like ours.
            if root.join("registry").is_dir() || root.join("images").is_dir() {
                let _ = std::fs::remove_dir_all(&root);
            }
        }
    }
    let own_data = keep_data && (sd.join("nodes").is_dir() || sd.join("jobs").is_dir());
    if own_data {
        // No shared path: the nodes' data lives in the run dir; keep only it.
        for e in std::fs::read_dir(&sd)?.flatten() {
            let n = e.file_name();
            if n != "nodes" && n != "jobs" {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        progress(&format!(
            "kept the nodes' state dirs and job output in {} (remove it before the next `local up --name {name}`)",
            sd.display()
        ));
    } else if sd.exists() {
        std::fs::remove_dir_all(&sd).with_context(|| format!("removing {}", sd.display()))?;
    }
    progress(&format!(
        "removed {} namespaces, {} links, {} cgroups",
        rep.namespaces, rep.links, rep.cgroups
    ));
    Ok(rep)
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes: it holds no resources we remove.
    // But a thread group's leader shows "Z" as soon as its own thread has
    // exited, while its other threads may still be exiting and holding the
    // process's files: a killed agent's listening socket, which the agent
    // restarted after it then failed to bind (EADDRINUSE, seen in CI). So
    // it is alive until the leader is the only thread left.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rfind(')').and_then(|i| s.get(i + 2..i + 3)) != Some("Z")
                || std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| d.count() > 1)
        }
        Err(_) => false,
    }
}

/// The processes in a node's cpu cgroup and its jobs group (its agent, CRIU
/// and jobs; not the `ip netns exec` helpers that only share its network
/// namespace).
fn node_cgroup_pids(cluster: &str, node: &str) -> Vec<i32> {
    let base = PathBuf::from(format!("/sys/fs/cgroup/cpu/{}", cgroup_rel(cluster, node)));
    cgroup_tree(&base)
        .iter()
        .flat_map(|d| procs_in(d))
        .collect()
}

/// The live processes listed in a cgroup directory's `cgroup.procs`.
fn procs_in(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|p| alive(*p))
        .collect()
}

/// A cgroup directory and every cgroup below it, deepest first (the order
/// `rmdir` needs: a cgroup with children cannot be removed). A node's
/// cgroup has a child of its own, the agent's jobs group
/// ([`crate::core::cgroup`]).
fn cgroup_tree(base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(base) {
        for e in rd.flatten() {
            // Cgroup directories hold only files and child cgroups.
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(cgroup_tree(&e.path()));
            }
        }
    }
    if base.is_dir() {
        out.push(base.to_path_buf());
    }
    out
}

fn cgroup_pids(cluster: &str) -> Vec<i32> {
    CGROUP_CONTROLLERS
        .iter()
        .flat_map(|c| cgroup_tree(Path::new(&format!("/sys/fs/cgroup/{c}/mosix/{cluster}"))))
        .flat_map(|d| procs_in(&d))
        .collect()
}

/// How long `down` keeps killing the cluster's processes before it gives up.
const KILL_PATIENCE: Duration = Duration::from_secs(30);

/// Try `f` for up to about 5 s, for kernel objects that are released a
/// moment after their last user is gone (a cgroup, a namespace).
fn retry_briefly<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn remove_cgroups(cluster: &str) -> anyhow::Result<usize> {
    let mut n = 0;
    for c in CGROUP_CONTROLLERS {
        let base = PathBuf::from(format!("/sys/fs/cgroup/{c}/mosix/{cluster}"));
        // Deepest first: a node's jobs group before the node, the nodes
        // before the cluster's own group.
        for d in cgroup_tree(&base) {
            // A killed task leaves its cgroup a moment after it is gone from
            // `cgroup.procs`; until then rmdir says EBUSY.
            retry_briefly(|| {
                std::fs::remove_dir(&d).with_context(|| format!("removing cgroup {}", d.display()))
            })?;
            n += 1;
        }
        // The shared parent goes when the last cluster is gone.
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{c}/mosix"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_tree_lists_children_before_their_parents() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().join("c");
        for d in ["c/node1/jobs", "c/node2/jobs", "c/node2/other"] {
            std::fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
        }
        std::fs::write(base.join("node1/cgroup.procs"), "1\n").expect("write");
        let tree = cgroup_tree(&base);
        assert_eq!(tree.len(), 6, "{tree:?}");
        assert_eq!(tree.last(), Some(&base));
        let pos = |p: &str| {
            tree.iter()
                .position(|d| d == &tmp.path().join(p))
                .expect("listed")
        };
        assert!(pos("c/node1/jobs") < pos("c/node1"));
        assert!(pos("c/node2/jobs") < pos("c/node2"));
        assert!(pos("c/node2/other") < pos("c/node2"));
        assert!(pos("c/node2") < pos("c"));
        // Removing in that order works (as rmdir on cgroupfs needs).
        for d in &tree {
            let _ = std::fs::remove_file(d.join("cgroup.procs"));
            std::fs::remove_dir(d).expect("children were removed first");
        }
        assert!(cgroup_tree(&base).is_empty());
    }
}
