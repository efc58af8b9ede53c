//! `mosixd`: the agent on every node.

use crate::agent::{Agent, AgentConfig, ImageSync};
use crate::api::client::ClientTls;
use crate::api::pb::agent_server::AgentServer;
use crate::api::peers::GrpcPeers;
use crate::api::server::{AgentService, RunnerService};
use crate::core::cluster_file::ClusterFile;
use crate::core::NodeName;
use crate::criu::{CheckpointEngine, RealCriu};
use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// Read from the agent's environment (`--help` prints it).
const ENVIRONMENT: &str = "\
Environment:
  MOSIX_CRIU=PATH            CRIU to use when neither --criu nor the config names one
  MOSIX_CRIU_LOG_LEVEL=0-4   CRIU's log level (default 2; 4 for debugging)
  MOSIX_KEEP_CRIU_LOGS=1     keep dump.log/restore.log of successful moves too
  MOSIX_PAGE_STREAM=off      without a shared path, send a full copy's pages in the image
                             push instead of streaming them into the target's page server
  RUST_LOG=mosix=debug       the agent's own log level (default info), with every step's timing";

/// mosixd: the mosix agent. One runs on every node. It launches migratable
/// jobs, reports load, and dumps/restores/migrates jobs with CRIU.
#[derive(Parser, Debug)]
#[command(version, after_help = ENVIRONMENT)]
pub struct Args {
    /// Config file, TOML if its name ends in .toml (the packaged
    /// /etc/mosix/mosixd.toml), else JSON; flags given on the command line
    /// override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's name (must match the cluster file and the CN of its
    /// certificate) [default: the host name].
    #[arg(long)]
    pub node: Option<String>,
    /// gRPC listen address [default: this node's endpoint in the cluster
    /// file, else 127.0.0.1:7000].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Shared image root (NFS on a real cluster): registry, images, job output.
    #[arg(long, conflicts_with = "state_dir")]
    pub shared: Option<PathBuf>,
    /// No shared path: this node's own state dir (registry of the jobs on
    /// this node, images). Migrations then stream images straight to the
    /// target agent. Every node of the cluster must be configured this way.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Where jobs' stdout/stderr live [default: ROOT/jobs]. CRIU reopens
    /// them by path after a migration, so without a shared path give every
    /// node the same path (on its own disk); migrations carry the files.
    #[arg(long)]
    pub jobs_dir: Option<PathBuf>,
    /// CRIU binary [default: the project's local build from `make setup`].
    #[arg(long)]
    pub criu: Option<PathBuf>,
    /// cgroup v1 path of this node (e.g. mosix/local/node1); load and capacity
    /// are then measured from it. Needed when several nodes share one host.
    /// Jobs then run in its child `jobs` (cpu.shares 2, made at start), below
    /// the agent and CRIU: start mosixd inside this cgroup (a systemd unit's
    /// `Slice=`, or `echo $$ > .../cgroup.procs`). Without it jobs share the
    /// agent's cgroup.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Relative CPU speed of this node.
    #[arg(long)]
    pub speed: Option<f64>,
    /// Cluster file listing the peer nodes [default: $MOSIX_CLUSTER or /run/mosix/local/cluster.json].
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// Cluster CA certificate (PEM) for mTLS.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM) [default with --tls-ca: NODE.pem beside the CA].
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM) [default with --tls-ca: NODE.key beside the CA].
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Allow listening on a non-loopback address without TLS.
    #[arg(long)]
    pub insecure: bool,
    /// Cluster key for image manifests (64 hex chars, mode 0600).
    #[arg(long)]
    pub image_key: Option<PathBuf>,
    /// Prometheus metrics listen address (e.g. 0.0.0.0:9100).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Refuse post-copy (lazy pages) migrations: requests for post-copy then
    /// run as full copy. Post-copy is on by default where the kernel has
    /// userfaultfd (the agent raises fs.pipe-max-size to 4 MiB for CRIU).
    #[arg(long)]
    pub no_post_copy: bool,
    /// Without a shared path: carry a full copy's memory pages on a plain
    /// TCP connection from the source's CRIU to the target's page server
    /// (a one-time port on this node's --listen address, opened with a
    /// token sent over mTLS), instead of relaying them through both agents'
    /// mTLS connection. As fast as CRIU's own migration; the pages cross
    /// the network unencrypted, as post-copy's do. Use it on a trusted
    /// cluster network only. Used when both nodes have it.
    #[arg(long)]
    pub plain_pages: bool,
    /// With --cgroup and a CPU cap on the node: do not squeeze the node's
    /// other jobs to 1% of a core while a job is dumped to leave it (the
    /// squeeze makes moves off a crowded node about as fast as between idle
    /// nodes; see ARCHITECTURE.md, "Priorities on a crowded node").
    #[arg(long)]
    pub no_jobs_squeeze: bool,
    /// With --cgroup: leave the cgroup2 mount alone. By default the agent
    /// remounts it with `favordynmods` (if no cgroup2 mount has it), so that
    /// putting a job in or out of its cgroup waits for no RCU grace period
    /// (5.5 ms -> 0.2 ms per write here), at the cost of slightly dearer
    /// forks and exits host-wide. Kernel 6.18 keeps that until a reboot.
    #[arg(long)]
    pub no_cgroup_favordynmods: bool,
    /// How dumped images are made durable before the target restores them:
    /// `fsync` every file; `close` relies on the file system committing
    /// files when CRIU closes them (NFS does: close-to-open); `auto` picks
    /// `close` when the shared path is on NFS, else `fsync`. Registry
    /// records follow the same choice (they are atomic either way).
    #[arg(long, value_enum)]
    pub image_sync: Option<ImageSyncArg>,
    /// Unix socket for `mosrun` on this node (no TLS: the caller's uid/gid
    /// come from the socket's peer credentials). Also listed in the
    /// cluster file, so `mosrun` finds it.
    #[arg(long)]
    pub run_socket: Option<PathBuf>,
    /// Foreground-job slots per core of capacity: a node has
    /// max(1, round(capacity × this)) slots [default: 2].
    #[arg(long)]
    pub slots_per_core: Option<f64>,
    /// A directory every node sees at the same path with the same content
    /// (an NFS home, say), besides the shared root and the jobs dir;
    /// repeatable. A job with a file open under /tmp, /var/tmp, /run,
    /// /dev/shm or /root outside these is refused migration (see
    /// `agent::portable`).
    #[arg(long = "common-dir")]
    pub common_dir: Vec<PathBuf>,
    /// With etcd in the cluster file: this node's lease TTL in seconds. The
    /// agent renews every TTL/3 and, if it cannot, kills its jobs
    /// TTL − margin after the last good renewal [default: 10].
    #[arg(long)]
    pub lease_ttl: Option<f64>,
    /// Seconds of the lease the agent gives up to be sure its jobs are dead
    /// before etcd can expire the lease (clock drift, the kill itself, a
    /// loaded node) [default: 3].
    #[arg(long)]
    pub fence_margin: Option<f64>,
    /// Seconds to wait for etcd at start before giving up with an error
    /// [default: 5].
    #[arg(long)]
    pub etcd_wait: Option<f64>,
    /// Addresses for jobs with their own network namespace, FIRST-LAST
    /// (e.g. 10.77.1.100-10.77.1.239): such a job keeps its address, and
    /// its TCP connections, when it moves (detached jobs get one by default:
    /// see --job-net-default). Without it every job uses the node's network.
    #[arg(long)]
    pub job_net_pool: Option<String>,
    /// The jobs' default route (the gateway on the bridge's network).
    #[arg(long)]
    pub job_net_gateway: Option<std::net::Ipv4Addr>,
    /// Prefix length of the jobs' network [default: 24].
    #[arg(long)]
    pub job_net_prefix: Option<u8>,
    /// The bridge job veths attach to on this node [default: mbr0]. A node
    /// without it runs every job in its own network, and says so.
    #[arg(long)]
    pub job_net_bridge: Option<String>,
    /// Where address claims live, a directory every node sees
    /// [default: SHARED/jobnet/addrs].
    #[arg(long)]
    pub job_net_claims: Option<PathBuf>,
    /// Whether detached jobs get their own address unless they ask
    /// otherwise (`own`, the default when a pool is given) or only when they
    /// ask with `mosrun -d --net own` (`node`). Foreground jobs always use
    /// the node's network.
    #[arg(long, value_parser = ["own", "node"])]
    pub job_net_default: Option<String>,
    /// How long a source keeps asking a target that went silent in the
    /// middle of a move without a shared path whether it restored the job
    /// (e.g. 30m, 24h). Until then the job is stopped here, not lost, and
    /// the move settles as soon as the target answers; after it, the job is
    /// recorded frozen here, for a person to `mosctl thaw` once they know
    /// the target is gone for good [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_patience)]
    pub settle_patience: Option<Duration>,
}

/// `--settle-patience`: a duration as people write them, at least a second.
fn parse_patience(s: &str) -> Result<Duration, String> {
    let d = crate::checkpoint::duration::parse(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is too short: give at least 1s"));
    }
    Ok(d)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node: Option<String>,
    pub listen: Option<SocketAddr>,
    pub shared: Option<PathBuf>,
    /// The file form of `--state-dir` (no shared path).
    pub state_dir: Option<PathBuf>,
    pub jobs_dir: Option<PathBuf>,
    pub criu: Option<PathBuf>,
    pub cgroup: Option<String>,
    pub speed: Option<f64>,
    pub cluster: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
    pub image_key: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// `false` is the file form of `--no-post-copy`.
    pub post_copy: Option<bool>,
    /// `true` is the file form of `--plain-pages`.
    #[serde(default)]
    pub plain_pages: bool,
    /// `false`: the file form of `--no-jobs-squeeze`.
    pub jobs_squeeze: Option<bool>,
    /// `false`: the file form of `--no-cgroup-favordynmods`.
    pub cgroup_favordynmods: Option<bool>,
    pub image_sync: Option<ImageSyncArg>,
    pub run_socket: Option<PathBuf>,
    pub slots_per_core: Option<f64>,
    #[serde(default)]
    pub common_dirs: Vec<PathBuf>,
    pub lease_ttl: Option<f64>,
    pub fence_margin: Option<f64>,
    pub etcd_wait: Option<f64>,
    /// The file forms of the `--job-net-*` flags (see `agent::jobnet`).
    pub job_net_pool: Option<String>,
    pub job_net_gateway: Option<std::net::Ipv4Addr>,
    pub job_net_prefix: Option<u8>,
    pub job_net_bridge: Option<String>,
    pub job_net_claims: Option<PathBuf>,
    pub job_net_default: Option<JobNetDefault>,
    /// The file form of `--settle-patience` ("24h", "30m").
    pub settle_patience: Option<String>,
}

/// `job_net_default` in a config file: the values `--job-net-default` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobNetDefault {
    Own,
    Node,
}

impl JobNetDefault {
    fn as_flag(self) -> String {
        match self {
            JobNetDefault::Own => "own".into(),
            JobNetDefault::Node => "node".into(),
        }
    }
}

impl FileConfig {
    /// Parse a JSON config file; exposed for property tests.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        serde_json::from_slice(bytes)
            .context("agent config is not valid JSON of the expected shape")
    }

    /// Parse a TOML config file (the packaged /etc/mosix/mosixd.toml: the
    /// Rust ecosystem's usual format, and one that takes comments).
    pub fn parse_toml(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).context("agent config is not valid TOML of the expected shape")
    }

    /// Parse by the file's name: `*.toml` as TOML, anything else as JSON.
    pub fn parse_path(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<Self> {
        if path.extension().is_some_and(|e| e == "toml") {
            Self::parse_toml(std::str::from_utf8(bytes).context("agent config is not UTF-8")?)
        } else {
            Self::parse(bytes)
        }
    }
}

fn merge(a: Args) -> anyhow::Result<Args> {
    let Some(path) = a.config.clone() else {
        return Ok(a);
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let f =
        FileConfig::parse_path(&path, &bytes).with_context(|| format!("in {}", path.display()))?;
    // A root given on the command line replaces the file's, whichever kind.
    let cli_root = a.shared.is_some() || a.state_dir.is_some();
    Ok(Args {
        config: a.config,
        node: a.node.or(f.node),
        listen: a.listen.or(f.listen),
        shared: if cli_root { a.shared } else { f.shared },
        state_dir: if cli_root { a.state_dir } else { f.state_dir },
        jobs_dir: a.jobs_dir.or(f.jobs_dir),
        criu: a.criu.or(f.criu),
        cgroup: a.cgroup.or(f.cgroup),
        speed: a.speed.or(f.speed),
        cluster: a.cluster.or(f.cluster),
        tls_ca: a.tls_ca.or(f.tls_ca),
        tls_cert: a.tls_cert.or(f.tls_cert),
        tls_key: a.tls_key.or(f.tls_key),
        insecure: a.insecure || f.insecure,
        image_key: a.image_key.or(f.image_key),
        metrics: a.metrics.or(f.metrics),
        no_post_copy: a.no_post_copy || f.post_copy == Some(false),
        plain_pages: a.plain_pages || f.plain_pages,
        no_jobs_squeeze: a.no_jobs_squeeze || f.jobs_squeeze == Some(false),
        no_cgroup_favordynmods: a.no_cgroup_favordynmods || f.cgroup_favordynmods == Some(false),
        image_sync: a.image_sync.or(f.image_sync),
        run_socket: a.run_socket.or(f.run_socket),
        slots_per_core: a.slots_per_core.or(f.slots_per_core),
        common_dir: if a.common_dir.is_empty() {
            f.common_dirs
        } else {
            a.common_dir
        },
        lease_ttl: a.lease_ttl.or(f.lease_ttl),
        fence_margin: a.fence_margin.or(f.fence_margin),
        etcd_wait: a.etcd_wait.or(f.etcd_wait),
        job_net_pool: a.job_net_pool.or(f.job_net_pool),
        job_net_gateway: a.job_net_gateway.or(f.job_net_gateway),
        job_net_prefix: a.job_net_prefix.or(f.job_net_prefix),
        job_net_bridge: a.job_net_bridge.or(f.job_net_bridge),
        job_net_claims: a.job_net_claims.or(f.job_net_claims),
        job_net_default: a
            .job_net_default
            .or(f.job_net_default.map(JobNetDefault::as_flag)),
        settle_patience: match (a.settle_patience, f.settle_patience) {
            (Some(d), _) => Some(d),
            (None, Some(s)) => Some(
                parse_patience(&s)
                    .map_err(|e| anyhow::anyhow!("settle_patience: {e}"))
                    .with_context(|| format!("in {}", path.display()))?,
            ),
            (None, None) => None,
        },
    })
}

/// The job network settings from the flags (see `agent::jobnet`).
fn job_net_config(
    a: &Args,
    root: &std::path::Path,
    shared: bool,
) -> anyhow::Result<Option<crate::agent::jobnet::JobNetConfig>> {
    let Some(pool) = &a.job_net_pool else {
        return Ok(None);
    };
    let (first, last) = crate::agent::jobnet::JobNetConfig::parse_pool(pool)?;
    let gateway = a
        .job_net_gateway
        .context("--job-net-pool needs --job-net-gateway (the jobs' default route)")?;
    let claims = match (&a.job_net_claims, shared) {
        (Some(c), _) => c.clone(),
        (None, true) => root.join("jobnet/addrs"),
        (None, false) => bail!(
            "--job-net-pool without a shared path needs --job-net-claims DIR, a directory every node sees"
        ),
    };
    let c = crate::agent::jobnet::JobNetConfig {
        bridge: a
            .job_net_bridge
            .clone()
            .unwrap_or_else(|| crate::agent::jobnet::DEFAULT_BRIDGE.to_string()),
        first,
        last,
        prefix: a.job_net_prefix.unwrap_or(24),
        gateway,
        claims,
        // Own by default once a pool is configured (issue 18: each job gets
        // its own address); `node` keeps the pre-issue-18 behaviour.
        default_own: a.job_net_default.as_deref() != Some("node"),
    };
    if c.available() {
        tracing::info!(pool = %c.pool_text(), bridge = %c.bridge, default_own = c.default_own, "jobs may have their own address");
    } else {
        tracing::warn!(bridge = %c.bridge, "no job bridge {} on this node: jobs here use the node's network, and their TCP connections cannot move with them", c.bridge);
    }
    Ok(Some(c))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let a = merge(args)?;
    let node = match a.node.as_deref() {
        Some(n) => NodeName::parse(n)?,
        None => {
            let host =
                nix::unistd::gethostname().context("no --node, and the host name is unreadable")?;
            let host = host.to_string_lossy();
            // The short name: node certificates are issued for node names.
            let short = host.split('.').next().unwrap_or_default();
            NodeName::parse(short).with_context(|| {
                format!("no --node given, and the host name {host:?} is not a node name")
            })?
        }
    };
    let cluster_path = ClusterFile::locate(a.cluster.as_deref());
    let cluster_file = ClusterFile::load(&cluster_path);
    let listen = match (a.listen, &cluster_file) {
        (Some(l), _) => l,
        (None, Ok(cf)) => match cf.node(node.as_str()) {
            Ok(n) => endpoint_addr(&n.endpoint).with_context(|| {
                format!(
                    "no --listen given, and node {node}'s endpoint {:?} in {} is not ADDR:PORT",
                    n.endpoint,
                    cluster_path.display()
                )
            })?,
            Err(_) => SocketAddr::from(([127, 0, 0, 1], 7000)),
        },
        (None, Err(_)) => SocketAddr::from(([127, 0, 0, 1], 7000)),
    };
    let (shared, is_shared) = match (&a.shared, &a.state_dir) {
        (Some(s), None) => (s.clone(), true),
        (None, Some(d)) => (d.clone(), false),
        (Some(_), Some(_)) => bail!("give --shared or --state-dir, not both"),
        (None, None) => bail!(
            "give --shared DIR (a path every node shares: registry, images) or --state-dir DIR (this node's own disk; images then go straight from agent to agent)"
        ),
    };
    std::fs::create_dir_all(&shared).with_context(|| {
        format!(
            "creating {} {}",
            if is_shared {
                "shared root"
            } else {
                "state dir"
            },
            shared.display()
        )
    })?;
    let jobs_dir = a.jobs_dir.clone().unwrap_or_else(|| shared.join("jobs"));
    let tls_files = match (&a.tls_ca, &a.tls_cert, &a.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some((ca.clone(), cert.clone(), key.clone())),
        // `mosctl certs` writes NODE.pem/NODE.key beside ca.pem: one config
        // file then serves every node.
        (Some(ca), None, None) if a.config.is_some() => {
            let dir = ca.parent().unwrap_or(std::path::Path::new("."));
            Some((
                ca.clone(),
                dir.join(format!("{node}.pem")),
                dir.join(format!("{node}.key")),
            ))
        }
        (None, None, None) => None,
        _ => bail!("--tls-ca, --tls-cert and --tls-key go together"),
    };
    if let Some((ca, cert, _)) = &tls_files {
        if ca.exists() && cert.exists() {
            crate::security::membership::check_node_certificate(
                ca,
                cert,
                node.as_str(),
                unix_now(),
            )?;
        } else {
            for f in [ca, cert] {
                if !f.exists() {
                    bail!(
                        "{} does not exist: give this node its files from the cluster's CA directory (`mosctl certs` writes ca.pem, NODE.pem and NODE.key)",
                        f.display()
                    );
                }
            }
        }
    }
    if is_shared {
        let ca_fp = match &tls_files {
            Some((ca, _, _)) => Some(crate::security::membership::ca_fingerprint(ca)?),
            None => None,
        };
        let cluster_name = cluster_file
            .as_ref()
            .map(|cf| cf.name.clone())
            .unwrap_or_else(|_| "mosix".to_string());
        match crate::security::membership::claim_shared_path(
            &shared,
            &cluster_name,
            ca_fp.as_deref(),
            node.as_str(),
        )? {
            crate::security::membership::SharedClaim::Joined => {}
            crate::security::membership::SharedClaim::Created => tracing::warn!(
                "the shared path {} had no cluster marker: wrote {}. Right for the first node of a new cluster; on any other node it means {} is not the file system the other nodes share (`mosctl load` names such nodes)",
                shared.display(),
                shared.join(crate::security::membership::MARKER_FILE).display(),
                shared.display()
            ),
        }
    }
    if tls_files.is_none() && !listen.ip().is_loopback() && !a.insecure {
        bail!(
            "refusing to listen on {listen} without TLS: give --tls-ca/--tls-cert/--tls-key, or --insecure to accept unauthenticated control of this node"
        );
    }
    let criu_path = a
        .criu
        .clone()
        .unwrap_or_else(crate::criu::default_criu_path);
    let engine = RealCriu::new(criu_path.clone());
    if let Err(e) = engine.available() {
        // Still start: load, listing and launch work without CRIU; dumps
        // will fail with this same clear message.
        tracing::warn!("{e}");
    }
    let image_key = match &a.image_key {
        Some(p) => Some(
            crate::security::manifest::ClusterKey::load(p)
                .with_context(|| format!("loading image key {}", p.display()))?,
        ),
        None => {
            tracing::warn!("no --image-key: image manifests are not sealed or verified");
            None
        }
    };
    let client_tls = match &tls_files {
        Some((ca, cert, key)) => Some(ClientTls::load(&crate::core::cluster_file::TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        })?),
        None => None,
    };
    let etcd = cluster_file
        .as_ref()
        .ok()
        .filter(|cf| !cf.etcd.is_empty())
        .map(|cf| (cf.name.clone(), cf.etcd.clone()));
    let timing = {
        let d = crate::coord::fencing::FenceTiming::default();
        let secs = |v: Option<f64>, d: Duration, flag: &str| -> anyhow::Result<Duration> {
            match v {
                None => Ok(d),
                Some(x) if x.is_finite() && x > 0.0 => Ok(Duration::from_secs_f64(x)),
                Some(x) => bail!("--{flag} must be a positive number of seconds, not {x}"),
            }
        };
        crate::coord::fencing::FenceTiming::new(
            secs(a.lease_ttl, d.ttl, "lease-ttl")?,
            secs(a.fence_margin, d.margin, "fence-margin")?,
        )?
    };
    let endpoints: BTreeMap<NodeName, String> = match cluster_file {
        Ok(cf) => cf.nodes.into_iter().map(|n| (n.name, n.endpoint)).collect(),
        Err(e) => {
            tracing::warn!("no peers: {e}");
            BTreeMap::new()
        }
    };
    let peers = Arc::new(GrpcPeers::new(endpoints, client_tls));
    let image_sync = match a.image_sync.unwrap_or(ImageSyncArg::Auto) {
        ImageSyncArg::Fsync => ImageSync::Fsync,
        ImageSyncArg::Close => ImageSync::OnClose,
        ImageSyncArg::Auto if on_nfs(&shared) => ImageSync::OnClose,
        ImageSyncArg::Auto => ImageSync::Fsync,
    };
    tracing::info!(?image_sync, "image durability");
    let job_net = job_net_config(&a, &shared, is_shared)?;
    let cfg = AgentConfig {
        node: node.clone(),
        shared_root: shared,
        shared: is_shared,
        jobs_dir,
        cgroup_scope: a.cgroup.clone(),
        speed: a.speed.unwrap_or(1.0),
        image_key,
        page_server_ip: (!listen.ip().is_unspecified()).then(|| listen.ip()),
        post_copy: !a.no_post_copy,
        plain_pages: a.plain_pages,
        jobs_squeeze: !a.no_jobs_squeeze,
        cgroup_favordynmods: !a.no_cgroup_favordynmods,
        image_sync,
        common_dirs: a.common_dir.clone(),
        job_net,
        settle_patience: a
            .settle_patience
            .unwrap_or(crate::agent::direct::DEFAULT_SETTLE_PATIENCE),
    };
    if cfg.plain_pages && cfg.page_server_ip.is_none() {
        // The target's one-time port is on its own address; a wildcard
        // listen address names none, so this node relays as if unset.
        tracing::warn!(
            "--plain-pages needs --listen on this node's own address (not {}): pages sent to this node are relayed over mTLS",
            listen.ip()
        );
    }
    if cfg.plain_pages && cfg.shared {
        tracing::warn!(
            "--plain-pages has no effect with --shared: images go through the shared path"
        );
    }
    let agent = Agent::new(cfg, Arc::new(engine), peers).map_err(|e| anyhow::anyhow!("{e}"))?;
    // With etcd: a lease first (or a clear error), then recovery, then the
    // ownership check that kills any job this node no longer owns, all
    // before the agent serves anything.
    let store = match &etcd {
        Some((cluster, eps)) => {
            let wait = Duration::from_secs_f64(a.etcd_wait.unwrap_or(5.0).max(0.0));
            let store = crate::coord::connect_within(eps, wait).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach etcd ({e}). The cluster file {} lists etcd endpoints for cluster {cluster}, so this agent must hold a lease before it runs jobs (it would otherwise run them unfenced). Start etcd, or remove \"etcd\" from the cluster file to run without leases and fencing",
                    cluster_path.display()
                )
            })?;
            Some((cluster.clone(), store))
        }
        None => {
            tracing::info!("no etcd in the cluster file: no node lease, no fencing (a lost node is only reported)");
            None
        }
    };
    if let Some((cluster, store)) = &store {
        agent
            .attach_coord(
                store.clone(),
                cluster,
                timing,
                Some(crate::agent::fence_watchdog::default_fence_file(
                    cluster,
                    node.as_str(),
                )),
            )
            .await
            .map_err(|e| anyhow::anyhow!("taking a node lease in etcd: {e}"))?;
    }
    agent.recover().await;
    if store.is_some() {
        agent
            .reconcile_ownership()
            .await
            .map_err(|e| anyhow::anyhow!("checking job ownership in etcd: {e}"))?;
        agent.fence_adopted_all();
    }
    if let Some(k) = a.slots_per_core {
        if !(k.is_finite() && k > 0.0) {
            bail!("--slots-per-core must be a positive number, not {k}");
        }
        agent.set_slots_per_core(k);
    }
    agent.start_placement();
    if agent.cfg.shared {
        agent.spawn_checkpoint_ticker();
    }
    if let Some(path) = &a.run_socket {
        serve_run_socket(agent.clone(), path)?;
    }

    // Sample load once a second, off the async threads (it reads /proc).
    let sampler = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let a = sampler.clone();
            let _ = tokio::task::spawn_blocking(move || a.sample_load()).await;
        }
    });
    if let Some(m) = a.metrics {
        crate::agent::metrics::serve(agent.clone(), m).await?;
    }

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServer<AgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection service")?;
    let mut builder = Server::builder()
        .timeout(Duration::from_secs(600))
        // A foreground job's Exec stream holds one of these for the job's
        // whole life, and a home agent multiplexes all its jobs on a node
        // (and its GetSlots samples) over one connection: 64 would stall
        // the 65th compile and then the samples.
        .concurrency_limit_per_connection(1024)
        // A pushed image (migration without a shared path) arrives in
        // chunks of `direct::SEND_CHUNK_BYTES`. With hyper's default 1 MiB
        // receive window the sender stops after each chunk until this side
        // has read it and said so (a WINDOW_UPDATE round trip per MiB);
        // wider windows keep a few chunks in flight. That bought nothing
        // while the receiver wrote each chunk before reading the next; with
        // its writer thread it took the push of 1 GiB from 1.3-1.6 s to
        // 1.0-1.1 s (BENCHMARKS.md 1b).
        .initial_stream_window_size(Some(crate::api::client::PUSH_WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * crate::api::client::PUSH_WINDOW_BYTES))
        .max_frame_size(Some(crate::api::client::MAX_FRAME_BYTES));
    if let Some((ca, cert, key)) = &tls_files {
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
            ))
            .client_ca_root(Certificate::from_pem(
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            ));
        builder = builder.tls_config(tls).context("TLS config")?;
    }
    let runner = crate::api::pb::runner_server::RunnerServer::new(RunnerService {
        agent: agent.clone(),
        local_socket: false,
    });
    let for_exit = agent.clone();
    let svc = AgentServer::new(AgentService { agent })
        .max_decoding_message_size(crate::api::client::MAX_MESSAGE_BYTES);
    tracing::info!(%node, %listen, criu = %criu_path.display(), tls = tls_files.is_some(), shared_path = is_shared, "mosixd serving");
    builder
        .add_service(health)
        .add_service(reflection)
        .add_service(svc)
        .add_service(runner)
        .serve_with_shutdown(listen, shutdown_signal())
        .await
        .with_context(|| format!("serving on {listen}"))?;
    for_exit.stop_fence_watchdog();
    Ok(())
}

/// Serve `Runner` on a Unix socket: `mosrun`'s fast path, no TLS.
/// Anyone on the node may connect (mode 0666), and runs jobs as themselves:
/// the service takes uid/gid from the peer credentials.
fn serve_run_socket(agent: Arc<Agent>, path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a predecessor (kill -9) would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the run socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {}", path.display()))?;
    let svc = crate::api::pb::runner_server::RunnerServer::new(RunnerService {
        agent,
        local_socket: true,
    });
    let shown = path.display().to_string();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        if let Err(e) = Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("run socket {shown}: {e}");
        }
    });
    tracing::info!(socket = %path.display(), "serving mosrun on the local socket");
    Ok(())
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down; jobs keep running");
}

#[cfg(test)]
mod tests {
    use super::FileConfig;

    #[test]
    fn config_parses_and_refuses_unknown_fields() {
        let c = FileConfig::parse(
            br#"{"node":"node1","listen":"127.0.0.1:7000","shared":"/srv/mosix","speed":1.5}"#,
        )
        .unwrap();
        assert_eq!(c.node.as_deref(), Some("node1"));
        assert!(
            FileConfig::parse(br#"{"nodee":"x"}"#).is_err(),
            "typos are errors"
        );
        assert!(FileConfig::parse(br#"{"listen":"not an address"}"#).is_err());
        assert!(FileConfig::parse(b"").is_err());
        let c = FileConfig::parse(
            br#"{"node":"node1","state_dir":"/var/lib/mosix","jobs_dir":"/var/lib/mosix-jobs"}"#,
        )
        .unwrap();
        assert_eq!(
            c.state_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/mosix"))
        );
        assert!(c.shared.is_none());
    }

    #[test]
    fn the_packaged_toml_config_parses() {
        let c = FileConfig::parse_toml(include_str!("../../packaging/mosixd.toml")).unwrap();
        assert!(c.node.is_none(), "the node name defaults to the host name");
        assert_eq!(
            c.shared.as_deref(),
            Some(std::path::Path::new("/var/lib/mosix/shared"))
        );
        assert_eq!(
            c.criu.as_deref(),
            Some(std::path::Path::new("/usr/lib/mosix/criu"))
        );
        assert!(c.tls_ca.is_some() && c.tls_cert.is_none());
        assert!(
            c.job_net_pool.is_none(),
            "own addresses are opt-in per cluster"
        );
        // The commented job network example is valid once uncommented.
        let uncommented: String = include_str!("../../packaging/mosixd.toml")
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| r.starts_with("job_net_") || r.starts_with("settle_patience"))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let j = FileConfig::parse_toml(&uncommented).unwrap();
        assert!(j.job_net_pool.is_some() && j.job_net_gateway.is_some());
        assert!(j.job_net_bridge.is_some() && j.job_net_default.is_some());
        assert_eq!(j.settle_patience.as_deref(), Some("24h"));
        assert!(
            FileConfig::parse_toml("nodee = \"x\"").is_err(),
            "typos are errors"
        );
        let p = std::path::Path::new("a.toml");
        assert!(FileConfig::parse_path(p, b"node = \"n1\"").is_ok());
        assert!(FileConfig::parse_path(std::path::Path::new("a.json"), b"node = 1").is_err());
    }

    #[test]
    fn the_jobs_squeeze_is_on_unless_a_flag_or_the_file_turns_it_off() {
        use super::{merge, Args};
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let args = |extra: &[&str], file: &str| {
            let path = dir.path().join("m.toml");
            std::fs::write(&path, file).unwrap();
            let mut v = vec!["mosixd", "--config", path.to_str().unwrap()];
            v.extend_from_slice(extra);
            merge(Args::parse_from(v)).unwrap()
        };
        assert!(!args(&[], "").no_jobs_squeeze);
        assert!(!args(&[], "jobs_squeeze = true").no_jobs_squeeze);
        assert!(args(&[], "jobs_squeeze = false").no_jobs_squeeze);
        assert!(args(&["--no-jobs-squeeze"], "").no_jobs_squeeze);
        assert!(FileConfig::parse_toml("jobs_squeeze = 0").is_err());
        assert!(!args(&[], "").no_cgroup_favordynmods);
        assert!(args(&[], "cgroup_favordynmods = false").no_cgroup_favordynmods);
        assert!(args(&["--no-cgroup-favordynmods"], "").no_cgroup_favordynmods);
        // Plain pages: off unless the flag or the file says so.
        assert!(!args(&[], "").plain_pages);
        assert!(args(&[], "plain_pages = true").plain_pages);
        assert!(args(&["--plain-pages"], "").plain_pages);
        assert!(!args(&[], "plain_pages = false").plain_pages);
        // The packaged file documents it, commented out.
        let packaged = include_str!("../../packaging/mosixd.toml");
        assert!(packaged.contains("#plain_pages = false"));
    }

    #[test]
    fn the_settle_patience_comes_from_a_flag_or_the_file_and_bad_values_are_refused() {
        use super::{merge, Args};
        use clap::Parser;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        let with = |file: &str, extra: &[&str]| {
            std::fs::write(&path, file).unwrap();
            let mut v = vec!["mosixd", "--config", path.to_str().unwrap()];
            v.extend_from_slice(extra);
            merge(Args::try_parse_from(v).map_err(|e| anyhow::anyhow!("{e}"))?)
        };
        assert_eq!(with("", &[]).unwrap().settle_patience, None);
        assert_eq!(
            with("settle_patience = \"30m\"", &[])
                .unwrap()
                .settle_patience,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            with("settle_patience = \"30m\"", &["--settle-patience", "1h30m"])
                .unwrap()
                .settle_patience,
            Some(Duration::from_secs(5400)),
            "the flag wins"
        );
        let e = with("settle_patience = \"soon\"", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("settle_patience"), "{e:#}");
        let e = with("", &["--settle-patience", "500ms"]).unwrap_err();
        assert!(e.to_string().contains("at least 1s"), "{e}");
        assert!(with("", &["--settle-patience", "10"]).is_err(), "no unit");
    }

    #[test]
    fn job_net_settings_come_from_the_file_unless_a_flag_overrides_them() {
        use super::{merge, Args, JobNetDefault};
        use clap::Parser;
        let toml = "job_net_pool = \"10.0.0.100-10.0.0.239\"\njob_net_gateway = \"10.0.0.1\"\njob_net_prefix = 16\njob_net_bridge = \"br9\"\njob_net_claims = \"/srv/claims\"\njob_net_default = \"node\"\n";
        let c = FileConfig::parse_toml(toml).unwrap();
        assert_eq!(c.job_net_pool.as_deref(), Some("10.0.0.100-10.0.0.239"));
        assert_eq!(
            c.job_net_gateway,
            Some(std::net::Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(c.job_net_prefix, Some(16));
        assert_eq!(c.job_net_bridge.as_deref(), Some("br9"));
        assert_eq!(
            c.job_net_claims.as_deref(),
            Some(std::path::Path::new("/srv/claims"))
        );
        assert_eq!(c.job_net_default, Some(JobNetDefault::Node));
        let j = FileConfig::parse(
            br#"{"job_net_pool":"10.1.0.2-10.1.0.9","job_net_gateway":"10.1.0.1","job_net_default":"own"}"#,
        )
        .unwrap();
        assert_eq!(j.job_net_default, Some(JobNetDefault::Own));
        assert!(
            FileConfig::parse(br#"{"job_net_default":"both"}"#).is_err(),
            "only own or node"
        );
        assert!(FileConfig::parse(br#"{"job_net_gateway":"not an ip"}"#).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mosixd.toml");
        std::fs::write(&path, toml).unwrap();
        let from_file = merge(Args::parse_from([
            "mosixd",
            "--config",
            path.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(
            from_file.job_net_pool.as_deref(),
            Some("10.0.0.100-10.0.0.239")
        );
        assert_eq!(from_file.job_net_prefix, Some(16));
        assert_eq!(from_file.job_net_bridge.as_deref(), Some("br9"));
        assert_eq!(from_file.job_net_default.as_deref(), Some("node"));
        let flags_win = merge(Args::parse_from([
            "mosixd",
            "--config",
            path.to_str().unwrap(),
            "--job-net-default",
            "own",
            "--job-net-bridge",
            "mbr0",
        ]))
        .unwrap();
        assert_eq!(flags_win.job_net_default.as_deref(), Some("own"));
        assert_eq!(flags_win.job_net_bridge.as_deref(), Some("mbr0"));
        assert_eq!(
            flags_win.job_net_gateway,
            Some(std::net::Ipv4Addr::new(10, 0, 0, 1))
        );
    }

    #[test]
    fn a_pool_makes_own_addresses_the_default_unless_node_is_asked() {
        use super::{job_net_config, Args};
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let cfg = |extra: &[&str]| {
            let mut v = vec![
                "mosixd",
                "--job-net-pool",
                "10.0.0.100-10.0.0.101",
                "--job-net-gateway",
                "10.0.0.1",
            ];
            v.extend_from_slice(extra);
            job_net_config(&Args::parse_from(v), dir.path(), true)
                .unwrap()
                .unwrap()
        };
        assert!(cfg(&[]).default_own);
        assert!(cfg(&["--job-net-default", "own"]).default_own);
        assert!(!cfg(&["--job-net-default", "node"]).default_own);
        assert!(
            job_net_config(&Args::parse_from(["mosixd"]), dir.path(), true)
                .unwrap()
                .is_none(),
            "no pool, no own addresses"
        );
    }

    #[test]
    fn config_mutations_never_panic() {
        let base = br#"{"node":"node1","listen":"127.0.0.1:7000","shared":"/srv","cgroup":"a/b","speed":2.0,"insecure":true}"#.to_vec();
        let mut seed: u64 = 0x2545F4914F6CDD1D;
        for _ in 0..3000 {
            let mut b = base.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % b.len();
                b[i] = (seed >> 40) as u8;
            }
            let _ = FileConfig::parse(&b);
        }
    }
}

/// `--image-sync` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSyncArg {
    Auto,
    Fsync,
    Close,
}

/// `host:port` of an endpoint URL such as `https://10.0.0.1:7000`.
fn endpoint_addr(endpoint: &str) -> Option<SocketAddr> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    rest.trim_end_matches('/').parse().ok()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether `path` is on NFS (statfs magic), where close() commits data.
fn on_nfs(path: &std::path::Path) -> bool {
    const NFS_SUPER_MAGIC: i64 = 0x6969;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == NFS_SUPER_MAGIC)
        .unwrap_or(false)
}
