//! `mosbench`: the Rust half of `make bench` (scripts/bench.sh drives it).
//!
//! - `plan`: time `balancer::policy::plan` on a synthetic 10,000-node,
//!   100,000-job cluster (median of several runs).
//! - `sim-agents`: serve the real `mosix.v1.Agent` gRPC API from many
//!   lightweight simulated agents on 127.0.0.1 (GetLoad and ListJobs answer,
//!   everything else is Unimplemented) and write a cluster file listing them.
//! - `round`: one balancer round without migrations (`view::poll` +
//!   `snapshot` + `policy::plan`) against a cluster file, timed in wall clock
//!   and in CPU time of this process (getrusage). With `--feed`, rounds as
//!   `mos-balance serve` runs them: follow the agents' load feeds and plan
//!   from them every `--interval`; CPU is then per interval.
//! - `sim-agents` also serves `WatchLoad` with the agent's own feed code;
//!   `--churn-pct P` moves P% of the nodes' loads by 15-50% each second.
//! - `proc-sample`: CPU (utime+stime) and VmRSS of a process over a window.
//!
//! Every subcommand prints one JSON object on stdout.

use mosix::agent::load::{JobFlags, JobUsage, NodeLoad};
use mosix::agent::loadfeed;
use mosix::api::pb;
use mosix::api::pb::agent_server::{Agent, AgentServer};
use mosix::balancer::policy::{self, ClusterSnapshot, JobSnapshot, NodeSnapshot, PolicyConfig};
use mosix::core::cluster_file::{ClusterFile, NodeEntry, TlsFiles};
use mosix::core::procfs::status_number;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg_opt(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Deterministic pseudo-random numbers (no dependency on `rand`'s API).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// Raise this process's open-file limit to `want` (soft and, as root, hard:
/// 10,000 simulated agents need 10,000 listening sockets plus one accepted
/// connection each, more than the usual hard limit of 20,000 leaves room
/// for); at least to the hard limit otherwise.
fn raise_nofile(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return;
        }
        if r.rlim_max < want {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(want);
            let raised = libc::rlimit {
                rlim_cur: want.min(nr_open),
                rlim_max: want.min(nr_open),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return;
            }
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Each simulated agent holds two descriptors (its listener and the
/// balancer's connection): say so when the limit cannot hold them all (a
/// container may refuse to raise the hard limit), since the last agents
/// would then never answer.
fn warn_if_short_of_fds(count: usize) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return;
    }
    let need = 2 * count as u64 + 64;
    if r.rlim_cur < need {
        eprintln!(
            "mosbench sim-agents: WARNING: open-file limit {} < {need} needed for {count} agents (a listener and a connection each); about {} agents will not answer. Split the agents over several processes.",
            r.rlim_cur,
            need.saturating_sub(r.rlim_cur) / 2 + 1
        );
    }
}

/// user + system CPU seconds of this process (all threads).
/// CPU seconds used by the calling thread.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn cpu_secs() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

// ---------------------------------------------------------------------------
// plan
// ---------------------------------------------------------------------------

/// 10,000 nodes with capacities 1/2/4/8; the first `hot` nodes carry
/// `jobs / hot` jobs each (the imbalance to fix), the others only background
/// load. Same shape as the policy's own `perf_10k_nodes_100k_jobs` test.
fn synthetic_cluster(n_nodes: usize, n_jobs: usize, hot: usize) -> ClusterSnapshot {
    let mut rng = Lcg(1);
    let per_hot = n_jobs.div_ceil(hot.max(1));
    let mut nodes = Vec::with_capacity(n_nodes);
    let mut jobs = Vec::with_capacity(n_jobs);
    for i in 0..n_nodes {
        let name = format!("node{i:05}");
        let mut load = rng.below(300) as f64 / 100.0;
        if i < hot {
            load = 0.0;
            for k in 0..per_hot {
                if jobs.len() >= n_jobs {
                    break;
                }
                let demand = 0.5 + rng.below(100) as f64 / 100.0;
                load += demand;
                jobs.push(JobSnapshot {
                    id: format!("job{i:05}-{k:04}"),
                    node: name.clone(),
                    rss_bytes: (1 + rng.below(1024)) * MIB,
                    cpu_demand: demand,
                    residence_secs: rng.below(100) as f64,
                    pinned: false,
                    migratable: true,
                    post_copy_failed: false,
                    own_address: false,
                });
            }
        }
        nodes.push(NodeSnapshot {
            name,
            up: true,
            capacity: [1.0, 2.0, 4.0, 8.0][i % 4],
            load,
            mem_total_bytes: 256 * GIB,
            mem_available_bytes: 200 * GIB,
            migrations_in_flight: rng.below(2) as u32,
            blocked: false,
            job_addresses: true,
        });
    }
    ClusterSnapshot {
        nodes,
        jobs,
        bandwidth_bytes_per_sec: 0.0,
    }
}

fn cmd_plan(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let n_nodes: usize = arg(args, "--nodes", 10_000);
    let n_jobs: usize = arg(args, "--jobs", 100_000);
    let runs: usize = arg(args, "--runs", 7);
    let mut cases = Vec::new();
    // Two shapes: jobs piled on 10% of the nodes (much to do), and jobs spread
    // over every node (mostly checking, little to move).
    for (shape, hot) in [("hot-10pct", n_nodes / 10), ("spread", n_nodes)] {
        let snap = synthetic_cluster(n_nodes, n_jobs, hot.max(1));
        for (label, cfg) in [
            ("default", PolicyConfig::default()),
            (
                "unlimited-moves",
                PolicyConfig {
                    max_moves_per_plan: usize::MAX,
                    ..PolicyConfig::default()
                },
            ),
        ] {
            let mut ms = Vec::with_capacity(runs);
            let mut cpu_ms = Vec::with_capacity(runs);
            let mut moves = 0;
            let mut imb = (0.0, 0.0);
            for _ in 0..runs {
                let c = thread_cpu_secs();
                let t = Instant::now();
                let p = policy::plan(&snap, &cfg);
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                cpu_ms.push((thread_cpu_secs() - c) * 1e3);
                moves = p.moves.len();
                imb = (p.imbalance_before, p.imbalance_after);
                std::hint::black_box(&p);
            }
            let (lo, hi) = min_max(&ms);
            eprintln!(
                "plan {shape:<9} {label:<15} {n_nodes} nodes {n_jobs} jobs: median {:.1} ms (min {lo:.1}, max {hi:.1}; thread CPU {:.1} ms), {moves} moves",
                median(&ms),
                median(&cpu_ms)
            );
            cases.push(json!({
                "shape": shape, "config": label, "nodes": n_nodes, "jobs": snap.jobs.len(),
                "runs_ms": ms, "median_ms": median(&ms), "min_ms": lo, "max_ms": hi,
                "cpu_median_ms": median(&cpu_ms),
                "moves": moves, "imbalance_before": imb.0, "imbalance_after": imb.1,
            }));
        }
    }
    Ok(json!({ "cases": cases }))
}

// ---------------------------------------------------------------------------
// sim-agents
// ---------------------------------------------------------------------------

struct Shared {
    /// What ListJobs answers: every job of the simulated cluster.
    all_jobs: pb::ListJobsResponse,
}

struct SimAgent {
    /// The node's state, which the churn task changes now and then.
    load: Arc<std::sync::Mutex<NodeLoad>>,
    shared: Arc<Shared>,
    seed: u64,
}

#[tonic::async_trait]
impl Agent for SimAgent {
    async fn checkpoint(
        &self,
        _r: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn restore_checkpoint(
        &self,
        _r: Request<pb::RestoreCheckpointRequest>,
    ) -> Result<Response<pb::RestoreCheckpointResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    type WatchEventsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::JobEvent, Status>> + Send>>;
    async fn watch_events(
        &self,
        _r: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn ack_freeze(
        &self,
        _r: Request<pb::AckFreezeRequest>,
    ) -> Result<Response<pb::AckFreezeResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn set_node_admin(
        &self,
        _r: Request<pb::SetNodeAdminRequest>,
    ) -> Result<Response<pb::NodeAdmin>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn set_pinned(
        &self,
        _r: Request<pb::SetPinnedRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    type ExecStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ExecOutput, Status>> + Send>>;
    async fn exec(
        &self,
        _r: Request<tonic::Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    type StreamPagesStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::PageStreamOut, Status>> + Send>>;
    async fn stream_pages(
        &self,
        _r: Request<tonic::Streaming<pb::PageStreamIn>>,
    ) -> Result<Response<Self::StreamPagesStream>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn get_slots(
        &self,
        _r: Request<pb::GetSlotsRequest>,
    ) -> Result<Response<pb::NodeSlots>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn get_load(
        &self,
        _r: Request<pb::GetLoadRequest>,
    ) -> Result<Response<pb::NodeLoad>, Status> {
        let mut l = self
            .load
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .clone();
        l.timestamp_unix_ms = mosix::core::now_unix_ms();
        Ok(Response::new(pb::NodeLoad::from(&l)))
    }
    type WatchLoadStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LoadReport, Status>> + Send>>;
    async fn watch_load(
        &self,
        _r: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        // The agent's own feed code, sampling the simulated state.
        use futures::StreamExt;
        let load = self.load.clone();
        let sample = move || -> loadfeed::Sample {
            let mut l = load.lock().map(|l| l.clone()).unwrap_or_default();
            l.timestamp_unix_ms = mosix::core::now_unix_ms();
            Box::pin(async move { l })
        };
        let s = loadfeed::stream(sample, None, self.seed).map(|u| Ok(pb::LoadReport::from(&u)));
        Ok(Response::new(Box::pin(s)))
    }
    async fn launch(&self, _r: Request<pb::LaunchRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn list_jobs(
        &self,
        r: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let node = r.into_inner().node;
        if node.is_empty() {
            return Ok(Response::new(self.shared.all_jobs.clone()));
        }
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self
                .shared
                .all_jobs
                .jobs
                .iter()
                .filter(|j| j.node == node)
                .cloned()
                .collect(),
            unlisted: vec![],
        }))
    }
    async fn get_job(&self, _r: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn dump(
        &self,
        _r: Request<pb::DumpRequest>,
    ) -> Result<Response<pb::DumpResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn restore(&self, _r: Request<pb::RestoreRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn migrate(
        &self,
        _r: Request<pb::MigrateRequest>,
    ) -> Result<Response<pb::MigrateResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn signal(&self, _r: Request<pb::SignalRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn freeze(&self, _r: Request<pb::FreezeRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn thaw(&self, _r: Request<pb::ThawRequest>) -> Result<Response<pb::Job>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn list_local_jobs(
        &self,
        r: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.list_jobs(r).await
    }
    async fn push_images(
        &self,
        _r: Request<tonic::Streaming<pb::ImageChunk>>,
    ) -> Result<Response<pb::PushImagesResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
    async fn resolve_migration(
        &self,
        _r: Request<pb::ResolveMigrationRequest>,
    ) -> Result<Response<pb::ResolveMigrationResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
}

/// Writes a CA, one server certificate (for every simulated agent) and a
/// client certificate into `dir`; returns the server identity and the files.
fn write_sim_pki(
    dir: &std::path::Path,
) -> anyhow::Result<(tonic::transport::ServerTlsConfig, TlsFiles)> {
    use mosix::security::pki;
    std::fs::create_dir_all(dir)?;
    let ca = pki::generate_ca("bench")?;
    let server = pki::issue_cert(
        &ca,
        "simagent",
        &[
            mosix::api::client::CLUSTER_TLS_NAME.to_string(),
            "127.0.0.1".to_string(),
        ],
        true,
        true,
    )?;
    let client = pki::issue_cert(&ca, "client", &[], true, false)?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    };
    std::fs::write(&files.ca, &ca.cert_pem)?;
    std::fs::write(&files.cert, &client.cert_pem)?;
    std::fs::write(&files.key, &client.key_pem)?;
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &server.cert_pem,
            &server.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&ca.cert_pem));
    Ok((tls, files))
}

async fn cmd_sim_agents(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let count: usize = arg(args, "--count", 1000);
    raise_nofile(3 * count as u64 + 1024);
    warn_if_short_of_fds(count);
    let churn_pct: f64 = arg(args, "--churn-pct", 1.0);
    let base_port: u16 = arg(args, "--base-port", 20000);
    let jobs_per_node: usize = arg(args, "--jobs-per-node", 10);
    let out: PathBuf = arg_opt(args, "--cluster-out")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("--cluster-out FILE is required"))?;
    let tls_dir = arg_opt(args, "--tls-dir").map(PathBuf::from);
    let now = mosix::core::now_unix_ms();
    let mut rng = Lcg(7);

    // Uneven load: every 10th node is hot (3x the jobs), some are idle.
    let mut per_node: Vec<Vec<JobUsage>> = Vec::with_capacity(count);
    let mut all = Vec::new();
    for i in 0..count {
        let name = format!("sim{i:04}");
        let n = match i % 10 {
            0 => jobs_per_node * 3,
            9 => 0,
            _ => jobs_per_node,
        };
        let mut usage = Vec::with_capacity(n);
        for k in 0..n {
            let id = format!("j{i:04}x{k:05}");
            let demand = 0.25 + rng.below(100) as f64 / 100.0;
            let rss = (16 + rng.below(512)) * MIB;
            let arrived = now - 5_000 - rng.below(600_000);
            usage.push(JobUsage {
                job_id: id.clone(),
                rss_bytes: rss,
                cpu_cores: demand.min(1.0),
                runnable: 1,
                demand,
                flags: JobFlags {
                    arrived_unix_ms: arrived,
                    ..Default::default()
                },
            });
            all.push(pb::Job {
                id,
                node: name.clone(),
                state: pb::JobState::Running as i32,
                pid: 10_000 + k as i32,
                argv: vec!["/usr/bin/simjob".into(), "--work".into(), "1000".into()],
                cwd: "/tmp".into(),
                uid: 0,
                gid: 0,
                stdout_path: format!("/srv/mosix/out/j{i:04}x{k:05}.out"),
                stderr_path: format!("/srv/mosix/out/j{i:04}x{k:05}.err"),
                created_unix_ms: arrived,
                arrived_unix_ms: arrived,
                ..Default::default()
            });
        }
        per_node.push(usage);
    }
    let shared = Arc::new(Shared {
        all_jobs: pb::ListJobsResponse {
            jobs: all,
            unlisted: vec![],
        },
    });

    let (server_tls, tls_files) = match &tls_dir {
        Some(d) => {
            let (s, f) = write_sim_pki(d)?;
            (Some(s), Some(f))
        }
        None => (None, None),
    };
    let scheme = if server_tls.is_some() {
        "https"
    } else {
        "http"
    };

    let mut listeners = Vec::with_capacity(count);
    let mut nodes = Vec::with_capacity(count);
    for i in 0..count {
        let port = base_port as usize + i;
        anyhow::ensure!(port <= u16::MAX as usize, "port range overflows");
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port as u16))
            .await
            .map_err(|e| anyhow::anyhow!("binding 127.0.0.1:{port}: {e}"))?;
        listeners.push(l);
        nodes.push(NodeEntry {
            name: mosix::core::NodeName::parse(&format!("sim{i:04}"))?,
            endpoint: format!("{scheme}://127.0.0.1:{port}"),
            address: "127.0.0.1".into(),
            metrics: None,
            run_socket: None,
        });
    }
    let cf = ClusterFile {
        name: "simbench".into(),
        shared_root: None,
        balancer: None,
        tls: tls_files,
        nodes,
        etcd: Vec::new(),
    };
    cf.save(&out)?;

    let mut states = Vec::with_capacity(count);
    for (i, l) in listeners.into_iter().enumerate() {
        let usage = std::mem::take(&mut per_node[i]);
        let load: f64 = usage.iter().map(|u| u.demand).sum();
        let state = Arc::new(std::sync::Mutex::new(NodeLoad {
            node: format!("sim{i:04}"),
            load,
            capacity: [1.0, 2.0, 4.0, 8.0][i % 4],
            cpu_usage: load.min(4.0),
            mem_total_bytes: 64 * GIB,
            mem_available_bytes: 48 * GIB,
            jobs_running: usage.len() as u32,
            migrations_in_flight: 0,
            migration_bandwidth_bps: 400e6,
            jobs: usage,
            timestamp_unix_ms: now,
            supports_post_copy: true,
            supports_pre_copy: true,
            job_addresses: false,
            blocked: false,
            speed: 1.0,
        }));
        states.push(state.clone());
        let agent = SimAgent {
            load: state,
            shared: shared.clone(),
            seed: i as u64,
        };
        let mut b = tonic::transport::Server::builder();
        if let Some(t) = &server_tls {
            b = b.tls_config(t.clone())?;
        }
        let svc = AgentServer::new(agent)
            .max_encoding_message_size(mosix::api::client::MAX_MESSAGE_BYTES);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        tokio::spawn(async move {
            if let Err(e) = b.add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("sim agent {i}: {e}");
            }
        });
    }
    // Churn: every second, churn_pct% of the nodes see their load move by
    // 15-50% of capacity (each such move is news for the load feed), back
    // and forth around where it started.
    if churn_pct > 0.0 {
        let states = states.clone();
        tokio::spawn(async move {
            let mut rng = Lcg(11);
            let base: Vec<f64> = states
                .iter()
                .map(|s| s.lock().map(|l| l.load).unwrap_or(0.0))
                .collect();
            let per_sec = ((states.len() as f64 * churn_pct / 100.0).round() as usize).max(1);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                for _ in 0..per_sec {
                    let i = rng.below(states.len() as u64) as usize;
                    if let Ok(mut l) = states[i].lock() {
                        let step = l.capacity * (0.15 + rng.below(36) as f64 / 100.0);
                        l.load = if l.load > base[i] {
                            base[i]
                        } else {
                            base[i] + step
                        };
                    }
                }
            }
        });
    }
    println!(
        "{}",
        json!({"ready": count, "cluster": out, "jobs": shared.all_jobs.jobs.len(), "tls": tls_dir.is_some(), "churn_pct": churn_pct})
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Serve until killed.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(serde_json::Value::Null)
}

// ---------------------------------------------------------------------------
// round
// ---------------------------------------------------------------------------

async fn cmd_round(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let path: PathBuf = arg_opt(args, "--cluster")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("--cluster FILE is required"))?;
    let rounds: usize = arg(args, "--rounds", 5);
    let deadline = Duration::from_millis(arg(args, "--deadline-ms", 2000));
    let cf = ClusterFile::load(&path)?;
    raise_nofile(2 * cf.nodes.len() as u64 + 1024);
    let tls = mosix::api::client::ClientTls::from_cluster(&cf)?;
    let cfg = PolicyConfig::default();
    if args.iter().any(|a| a == "--feed") {
        let interval = Duration::from_secs_f64(arg(args, "--interval", 3.0));
        return feed_rounds(&cf, tls, &cfg, rounds, interval).await;
    }
    let mut per = Vec::new();
    for r in 0..rounds {
        let c0 = cpu_secs();
        let t0 = Instant::now();
        let view = mosix::balancer::view::poll(&cf, tls.as_ref(), deadline).await;
        let t_poll = t0.elapsed().as_secs_f64();
        let snap = view.snapshot(0.0);
        let p = policy::plan(&snap, &cfg);
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_secs() - c0;
        let up = view.nodes.iter().filter(|n| n.load.is_ok()).count();
        let first_err = view
            .nodes
            .iter()
            .find_map(|n| n.load.as_ref().err().cloned());
        eprintln!(
            "round {r}: {up}/{} agents answered, {} jobs, {} moves, wall {:.3} s (poll {:.3} s), cpu {:.3} s{}",
            view.nodes.len(),
            view.jobs.len(),
            p.moves.len(),
            wall,
            t_poll,
            cpu,
            first_err.as_deref().map(|e| format!(" (first error: {e})")).unwrap_or_default()
        );
        per.push(json!({
            "wall_s": wall, "poll_s": t_poll, "cpu_s": cpu, "agents_up": up,
            "agents": view.nodes.len(), "jobs": view.jobs.len(), "moves": p.moves.len(),
            "first_error": first_err,
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Read back from the rows just written above, where both are numbers.
    let walls: Vec<f64> = per.iter().filter_map(|r| r["wall_s"].as_f64()).collect();
    let cpus: Vec<f64> = per.iter().filter_map(|r| r["cpu_s"].as_f64()).collect();
    let (wlo, whi) = min_max(&walls);
    let (clo, chi) = min_max(&cpus);
    Ok(json!({
        "mode": "poll", "agents": cf.nodes.len(), "tls": cf.tls.is_some(), "rounds": per,
        "wall_median_s": median(&walls), "wall_min_s": wlo, "wall_max_s": whi,
        "cpu_median_s": median(&cpus), "cpu_min_s": clo, "cpu_max_s": chi,
    }))
}

/// Rounds as `mos-balance serve` runs them by default: follow every agent's
/// load feed, and every `interval` plan from the latest reports. The round
/// time is taking the view and planning; the CPU is this process's over the
/// whole interval (receiving reports included), after the feeds opened.
async fn feed_rounds(
    cf: &ClusterFile,
    tls: Option<mosix::api::client::ClientTls>,
    cfg: &PolicyConfig,
    rounds: usize,
    interval: Duration,
) -> anyhow::Result<serde_json::Value> {
    use mosix::balancer::feed::Feed;
    let c0 = cpu_secs();
    let t0 = Instant::now();
    let feed = Feed::start(cf, tls);
    // Open: every node reported (or 60 s passed).
    while t0.elapsed() < Duration::from_secs(60) {
        if feed.view().up().count() == cf.nodes.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_s = t0.elapsed().as_secs_f64();
    let open_cpu = cpu_secs() - c0;
    eprintln!(
        "feed: {} of {} agents reporting after {open_s:.2} s ({open_cpu:.2} CPU-s)",
        feed.view().up().count(),
        cf.nodes.len()
    );
    let mut per = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    for r in 0..rounds {
        let (hb0, full0) = feed.reports();
        let c = cpu_secs();
        let t = Instant::now();
        let v = feed.view();
        let p = v.plan(cfg);
        let wall = t.elapsed().as_secs_f64();
        let round_cpu = cpu_secs() - c;
        let up = v.up().count();
        let jobs: usize = v.up().map(|n| n.jobs.len()).sum();
        let first_err = v.down().first().map(|(n, e)| format!("{n}: {e}"));
        drop(v);
        tick.tick().await;
        let cpu = cpu_secs() - c;
        let (hb1, full1) = feed.reports();
        eprintln!(
            "round {r}: {up}/{} agents up, {jobs} jobs, {} moves, wall {wall:.4} s (round CPU {round_cpu:.4} s), CPU over the {:.0} s interval {cpu:.3} s; {} reports + {} heartbeats in it{}",
            cf.nodes.len(),
            p.moves.len(),
            interval.as_secs_f64(),
            full1 - full0,
            hb1 - hb0,
            first_err.as_deref().map(|e| format!(" (first down: {e})")).unwrap_or_default()
        );
        per.push(json!({
            "wall_s": wall, "round_cpu_s": round_cpu, "cpu_s": cpu, "agents_up": up,
            "agents": cf.nodes.len(), "jobs": jobs, "moves": p.moves.len(),
            "reports": full1 - full0, "heartbeats": hb1 - hb0, "first_error": first_err,
        }));
    }
    let walls: Vec<f64> = per.iter().filter_map(|r| r["wall_s"].as_f64()).collect();
    let cpus: Vec<f64> = per.iter().filter_map(|r| r["cpu_s"].as_f64()).collect();
    let (wlo, whi) = min_max(&walls);
    let (clo, chi) = min_max(&cpus);
    Ok(json!({
        "mode": "feed", "agents": cf.nodes.len(), "tls": cf.tls.is_some(), "rounds": per,
        "interval_s": interval.as_secs_f64(), "open_s": open_s, "open_cpu_s": open_cpu,
        "wall_median_s": median(&walls), "wall_min_s": wlo, "wall_max_s": whi,
        "cpu_median_s": median(&cpus), "cpu_min_s": clo, "cpu_max_s": chi,
    }))
}

// ---------------------------------------------------------------------------
// proc-sample
// ---------------------------------------------------------------------------

fn proc_cpu_ticks(pid: i32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').ok_or_else(|| anyhow::anyhow!("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields 14 and 15 of stat are utime, stime; `rest` starts at field 3.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn cmd_proc_sample(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let secs: f64 = arg(args, "--secs", 30.0);
    let pids: Vec<i32> = arg_opt(args, "--pids")
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    anyhow::ensure!(!pids.is_empty(), "--pids P1,P2,... is required");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before: Vec<u64> = pids
        .iter()
        .map(|p| proc_cpu_ticks(*p))
        .collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let mut rss_max = vec![0u64; pids.len()];
    while t0.elapsed().as_secs_f64() < secs {
        for (i, p) in pids.iter().enumerate() {
            rss_max[i] = rss_max[i].max(status_number::<u64>(*p, "VmRSS").unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (i, p) in pids.iter().enumerate() {
        let cpu = (proc_cpu_ticks(*p)? - before[i]) as f64 / hz;
        let rss = status_number::<u64>(*p, "VmRSS").unwrap_or(0);
        out.push(json!({
            "pid": p, "wall_s": wall, "cpu_s": cpu, "cpu_pct_of_core": 100.0 * cpu / wall,
            "rss_mib": rss as f64 / 1024.0, "rss_max_mib": rss_max[i].max(rss) as f64 / 1024.0,
            "threads": status_number::<u64>(*p, "Threads"),
        }));
    }
    Ok(json!({ "hz": hz, "procs": out }))
}

// ---------------------------------------------------------------------------
// seal
// ---------------------------------------------------------------------------

/// Time the CPU work of the agent's image sealing (BLAKE3 of every file +
/// HMAC manifest, as on the source; no fsync, as under `--image-sync close`,
/// unless `--fsync`: then every file is made durable as under `--image-sync
/// fsync`) and verification (as on the target) on an image directory; the
/// manifest is removed again afterwards.
fn cmd_seal(args: &[String]) -> anyhow::Result<serde_json::Value> {
    use mosix::security::manifest::{self, ClusterKey};
    let dir: PathBuf = arg_opt(args, "--dir")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("--dir DIR is required"))?;
    let exclude = ["dump.log", "restore.log", "stats-dump", "stats-restore"];
    let key = ClusterKey::generate();
    let t = Instant::now();
    manifest::write_manifest_with(
        &dir,
        &key,
        "jbench",
        "mbench",
        &exclude,
        &Default::default(),
        args.iter().any(|a| a == "--fsync"),
    )?;
    let seal = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    manifest::verify_manifest(&dir, &key, "jbench", &exclude)?;
    let verify = t.elapsed().as_secs_f64() * 1e3;
    std::fs::remove_file(dir.join(manifest::MANIFEST_FILE_NAME))?;
    Ok(json!({ "seal_ms": seal, "verify_ms": verify }))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("plan") => cmd_plan(&args),
        Some("sim-agents") => cmd_sim_agents(&args).await,
        Some("round") => cmd_round(&args).await,
        Some("proc-sample") => cmd_proc_sample(&args),
        Some("seal") => cmd_seal(&args),
        _ => {
            eprintln!(
                "usage: mosbench plan [--nodes N] [--jobs N] [--runs N]\n       mosbench sim-agents --cluster-out FILE [--count N] [--base-port P] [--jobs-per-node N] [--tls-dir DIR] [--churn-pct P]\n       mosbench round --cluster FILE [--rounds N] [--deadline-ms MS] [--feed [--interval S]]\n       mosbench proc-sample --pids P1,P2 [--secs S]\n       mosbench seal --dir IMAGE_DIR [--fsync]"
            );
            return std::process::ExitCode::from(2);
        }
    };
    match r {
        Ok(serde_json::Value::Null) => std::process::ExitCode::SUCCESS,
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mosbench: {}", mosix::cli::common::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
