//! `mosctl local up|down|status`: the local cluster.

use crate::core::cluster_file::ClusterFile;
use crate::local;
use anyhow::{bail, Context};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedOverArg {
    Local,
    Sshfs,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create N nodes on this machine (network namespaces on a bridge, a real
    /// mosixd in each, mTLS, a shared image root under criu-images/, or with
    /// --no-shared a state dir of its own per node).
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Cluster name (1-8 lowercase letters/digits).
        #[arg(long, default_value = "local")]
        name: String,
        /// CPU cap per node in cores, comma-separated (e.g. 1,0.5,0.5,0.25);
        /// the last value repeats; 0 = uncapped.
        #[arg(long, value_delimiter = ',')]
        cpu_caps: Vec<f64>,
        /// Relative speed per node, comma-separated.
        #[arg(long, value_delimiter = ',')]
        speeds: Vec<f64>,
        /// Shared image root [default: criu-images/NAME in the project].
        #[arg(long, conflicts_with = "no_shared")]
        shared: Option<PathBuf>,
        /// No shared path: each node keeps its registry and images in its own
        /// state dir (/run/mosix/NAME/nodes/NODE), and migrations stream
        /// the images from agent to agent.
        #[arg(long)]
        no_shared: bool,
        /// A host directory every node sees at the same path, although the
        /// cluster keeps nothing there (like an NFS home on real machines);
        /// repeatable. Each node's /tmp, /var/tmp, /run and home are its
        /// own, so a directory under them is otherwise invisible to the
        /// nodes.
        #[arg(long = "common")]
        common: Vec<PathBuf>,
        /// How the nodes reach what they share (the shared path, or with
        /// --no-shared the --common dirs): `local` binds the host's
        /// directory into each node; `sshfs` serves it over the network
        /// from a file-server namespace on the cluster's bridge, and every
        /// node mounts it with sshfs (a real network file system: its
        /// caching, rename and exclusive-create semantics).
        #[arg(long, value_enum, default_value_t = SharedOverArg::Local)]
        shared_over: SharedOverArg,
        /// Plain-text gRPC instead of mTLS (not recommended).
        #[arg(long)]
        insecure: bool,
        /// CRIU binary [default: the project's local build].
        #[arg(long)]
        criu: Option<PathBuf>,
        /// Start the agents with --no-post-copy (post-copy requests then run
        /// as full copy, as on nodes without userfaultfd).
        #[arg(long)]
        no_post_copy: bool,
        /// Start the agents with --plain-pages: with --no-shared, a full
        /// copy's pages go on a plain TCP connection between the two CRIUs
        /// instead of through the agents' mTLS connection (faster; the
        /// pages are not encrypted on the wire).
        #[arg(long, requires = "no_shared")]
        plain_pages: bool,
        /// The agents' foreground slots per core of capacity (placement
        /// and `mosctl slots`) [default: 10, so that fractional-core nodes
        /// keep their proportions].
        #[arg(long, value_parser = parse_slots_per_core)]
        slots_per_core: Option<f64>,
        /// Start the agents without the image key: images are not sealed,
        /// so tampered or corrupt images are NOT detected. Only for
        /// measuring what sealing costs (`make bench` does); never for jobs
        /// you care about.
        #[arg(long)]
        unsealed_images: bool,
        /// etcd members to start, each in its own namespace on the bridge
        /// (Debian's etcd-server): agents then hold leases and fence
        /// themselves, jobs have owner records, balancers elect a leader.
        #[arg(long, default_value_t = 1, conflicts_with = "no_etcd")]
        etcd_members: usize,
        /// No etcd: everything works as without it, and a lost node is
        /// only reported (no fencing, no ownership records).
        #[arg(long)]
        no_etcd: bool,
        /// The agents' lease TTL in seconds (with etcd) [default: 10]: an
        /// agent that cannot renew kills its jobs TTL − margin after its
        /// last good renewal. Raise it on a heavily loaded machine, where
        /// a starved agent otherwise fences itself.
        #[arg(long)]
        lease_ttl: Option<f64>,
        /// The agents' fencing margin in seconds [default: 3].
        #[arg(long)]
        fence_margin: Option<f64>,
    },
    /// Restart one node's agent (kill -9, then start it again with the same
    /// arguments); its jobs keep running and are re-adopted.
    RestartAgent {
        /// The node, e.g. node2.
        node: String,
        /// Cluster name [default: the one in --cluster / $MOSIX_CLUSTER, else local].
        #[arg(long)]
        name: Option<String>,
        /// Start it with this CRIU binary instead.
        #[arg(long)]
        criu: Option<PathBuf>,
        /// Only kill it (simulates a crashed agent).
        #[arg(long)]
        kill_only: bool,
        /// Return once the agent is started, without waiting (up to 30 s)
        /// for it to answer, e.g. to watch a start that is meant to fail.
        #[arg(long, conflicts_with = "kill_only")]
        no_wait: bool,
        /// One more argument for this start of the agent only (repeatable),
        /// after those it was started with, e.g.
        /// `--agent-arg=--job-net-bridge=nosuchbr` for a node without a job
        /// bridge. The next plain restart drops it.
        #[arg(
            long = "agent-arg",
            allow_hyphen_values = true,
            conflicts_with = "kill_only"
        )]
        agent_args: Vec<String>,
    },
    /// Remove every namespace, link, cgroup and process of a local cluster.
    /// Works after a crash too.
    Down {
        /// Cluster name [default: the one in --cluster / $MOSIX_CLUSTER, else local].
        #[arg(long)]
        name: Option<String>,
        /// Keep the shared root (registry, images, job output), or without a
        /// shared path the nodes' state dirs.
        #[arg(long)]
        keep_data: bool,
    },
}

/// Which local cluster `down`/`restart-agent` mean: `--name`, else the
/// cluster named in the file that `--cluster` or `$MOSIX_CLUSTER` points at
/// (so `mosctl --cluster F local down` takes down F's cluster, not `local`),
/// else `local`. A `--name` that contradicts an explicit `--cluster` is
/// refused; over `$MOSIX_CLUSTER` (ambient, maybe stale) `--name` wins.
fn resolve_name(cluster: Option<&Path>, name: Option<String>) -> anyhow::Result<String> {
    let file = match (cluster, &name) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(n)) => return Ok(n.clone()),
        (None, None) => match std::env::var_os("MOSIX_CLUSTER") {
            Some(f) => PathBuf::from(f),
            None => return Ok("local".to_string()),
        },
    };
    let from_file = match ClusterFile::load(&file) {
        Ok(cf) => cf.name,
        // After a crash the file may be gone; a local cluster's file lives
        // at /run/mosix/<name>/cluster.json, so its path still names it.
        Err(e) => match file
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .filter(|n| local::cluster_file_path(n) == file)
        {
            Some(n) => n.to_string(),
            None => return Err(e).context("finding which local cluster to act on"),
        },
    };
    match name {
        Some(n) if n != from_file => bail!(
            "--name {n} contradicts the cluster file {} (cluster {from_file}); give one of them",
            file.display()
        ),
        _ => Ok(from_file),
    }
}

pub async fn run(cluster: Option<&Path>, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Up {
            nodes,
            name,
            cpu_caps,
            speeds,
            shared,
            no_shared,
            common,
            shared_over,
            insecure,
            criu,
            no_post_copy,
            plain_pages,
            slots_per_core,
            unsealed_images,
            etcd_members,
            no_etcd,
            lease_ttl,
            fence_margin,
        } => {
            let bin_dir = std::env::current_exe()
                .context("locating mosctl")?
                .parent()
                .map(PathBuf::from)
                .context("locating the binaries' directory")?;
            let opts = local::UpOptions {
                shared_root: (!no_shared)
                    .then(|| shared.unwrap_or_else(|| local::default_shared_root(&name))),
                common,
                shared_over: match shared_over {
                    SharedOverArg::Local => local::SharedOver::Local,
                    SharedOverArg::Sshfs => local::SharedOver::Sshfs,
                },
                name: name.clone(),
                nodes,
                caps: cpu_caps,
                speeds,
                tls: !insecure,
                bin_dir,
                criu: criu.unwrap_or_else(crate::criu::default_criu_path),
                post_copy: !no_post_copy,
                plain_pages,
                seal_images: !unsealed_images,
                etcd_members: if no_etcd { 0 } else { etcd_members },
                lease_ttl,
                fence_margin,
                slots_per_core,
            };
            let cf = local::up(&opts, &|s| eprintln!("  {s}")).await?;
            let path = local::cluster_file_path(&name);
            println!("cluster {name} is up: {} nodes", cf.nodes.len());
            for n in &cf.nodes {
                println!("  {:<8} {}", n.name, n.endpoint);
            }
            println!("cluster file: {}", path.display());
            if name != "local" {
                println!("use it with: export MOSIX_CLUSTER={}", path.display());
            }
            Ok(())
        }
        Cmd::RestartAgent {
            node,
            name,
            criu,
            kill_only,
            no_wait,
            agent_args,
        } => {
            let name = resolve_name(cluster, name)?;
            match local::restart_agent(&name, &node, criu.as_deref(), kill_only, &agent_args)? {
                Some(pid) => {
                    if !no_wait {
                        // As `up` does: when this returns, the agent
                        // answers, so a script can use it at once.
                        let path = local::cluster_file_path(&name);
                        let cf = ClusterFile::load(&path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        let entry = cf
                            .node(&node)
                            .with_context(|| format!("reading {}", path.display()))?
                            .clone();
                        local::wait_answering(
                            &cf,
                            &[(entry, pid)],
                            &local::state_dir(&name),
                            local::UP_PATIENCE,
                        )
                        .await
                        .with_context(|| format!("restarting the agent on {node} (pid {pid})"))?;
                    }
                    println!("agent on {node} restarted (pid {pid})");
                }
                None => println!("agent on {node} killed"),
            }
            Ok(())
        }
        Cmd::Down { name, keep_data } => {
            let name = resolve_name(cluster, name)?;
            local::down(&name, keep_data, &|s| eprintln!("  {s}"))?;
            println!("cluster {name} is down");
            Ok(())
        }
    }
}

fn parse_slots_per_core(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1000.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of slots per core (0 < N <= 1000)"
        )),
    }
}
