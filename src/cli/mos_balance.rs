//! `mos-balance`: one rebalancing pass (default), or the balancer service.

use crate::api::client::ClientTls;
use crate::api::pb::balancer_server::BalancerServer;
use crate::balancer::policy::{self, PolicyConfig};
use crate::balancer::service::{Balancer, BalancerService, RoundReport};
use crate::core::cluster_file::ClusterFile;
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// mos-balance: spread the load of a mosix cluster.
///
/// Without a subcommand it runs one pass: poll every agent, compute a plan,
/// print it, and carry it out (unless --dry-run). It exits non-zero if any
/// migration failed, naming it. `mos-balance serve` runs the balancer as a
/// service that rebalances continuously and answers schedulers over gRPC.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
pub struct Args {
    /// Cluster file [default: $MOSIX_CLUSTER or /run/mosix/local/cluster.json].
    #[arg(long, global = true)]
    pub cluster: Option<PathBuf>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print the plan and move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// How long each agent has to answer a poll (GetLoad, ListJobs), and
    /// `serve`'s first round for every load feed to report, before the
    /// agent counts as down. E.g. 5, 5s, 500ms.
    #[arg(long, global = true, default_value = "5s", value_parser = crate::cli::common::parse_duration)]
    pub agent_timeout: Duration,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// A move must cut the normalised-load gap by more than this.
    #[arg(long, global = true, default_value_t = PolicyConfig::default().hysteresis)]
    pub hysteresis: f64,
    /// Seconds a job stays on a node before it may move again.
    #[arg(long, global = true, default_value_t = PolicyConfig::default().min_residence_secs)]
    pub min_residence: f64,
    /// Concurrent migrations per node.
    #[arg(long, global = true, default_value_t = PolicyConfig::default().max_concurrent_per_node)]
    pub max_concurrent: u32,
    /// Jobs larger than this many MiB move with post-copy.
    #[arg(long, global = true, default_value_t = PolicyConfig::default().post_copy_threshold_bytes >> 20)]
    pub post_copy_mib: u64,
}

impl PolicyArgs {
    pub fn config(&self) -> anyhow::Result<PolicyConfig> {
        if !self.hysteresis.is_finite() || self.hysteresis < 0.0 {
            bail!("--hysteresis must be a number >= 0");
        }
        if !self.min_residence.is_finite() || self.min_residence < 0.0 {
            bail!("--min-residence must be a number of seconds >= 0");
        }
        if self.max_concurrent == 0 {
            bail!("--max-concurrent must be at least 1");
        }
        Ok(PolicyConfig {
            hysteresis: self.hysteresis,
            min_residence_secs: self.min_residence,
            max_concurrent_per_node: self.max_concurrent,
            post_copy_threshold_bytes: self.post_copy_mib << 20,
            ..PolicyConfig::default()
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the balancer service: rebalance every --interval and serve gRPC.
    ///
    /// By default it follows every agent's load feed (WatchLoad): agents
    /// push a complete report when their load moves by more than 10% of
    /// capacity or their jobs change, and a heartbeat every ~10 s; a round
    /// plans from the latest reports without asking anyone. A node whose
    /// feed breaks, or stays silent for 25 s, is down until it reports again.
    Serve {
        /// gRPC listen address [default: the cluster file's balancer address].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Seconds between rounds.
        #[arg(long, default_value_t = 3.0)]
        interval: f64,
        /// Only serve the API; never rebalance by itself.
        #[arg(long)]
        no_auto: bool,
        /// Prometheus metrics address (e.g. 127.0.0.1:9200).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Allow a non-loopback listen address without TLS.
        #[arg(long)]
        insecure: bool,
        /// Poll every agent (GetLoad, ListJobs) each round instead of
        /// following their load feeds: for agents too old to push.
        #[arg(long)]
        poll: bool,
    },
}

fn print_report(r: &RoundReport, dry_run: bool) {
    println!(
        "{:<8} {:>6} {:>6} {:>6} {:>5}",
        "NODE", "LOAD", "CAP", "NORM", "JOBS"
    );
    for n in &r.view.nodes {
        match &n.load {
            Ok(l) => {
                let jobs = r.view.jobs.iter().filter(|j| j.node == n.name).count();
                println!(
                    "{:<8} {:>6.2} {:>6.2} {:>6.2} {:>5}{}",
                    n.name,
                    l.load,
                    l.capacity,
                    if l.capacity > 0.0 {
                        l.load / l.capacity
                    } else {
                        0.0
                    },
                    jobs,
                    if l.blocked { "  BLOCKED" } else { "" }
                )
            }
            Err(e) => println!("{:<8} DOWN ({e})", n.name),
        }
    }
    if r.plan.moves.is_empty() {
        if r.plan.imbalance_before <= 1.5 {
            println!(
                "cluster is balanced (imbalance {:.2}); nothing to do",
                r.plan.imbalance_before
            );
        } else {
            println!(
                "no move is worth making now (imbalance {:.2}): jobs arrived too recently (min residence), are pinned or non-migratable, or no move beats its cost; nothing to do",
                r.plan.imbalance_before
            );
        }
        return;
    }
    println!(
        "plan: {} move(s), imbalance {:.2} -> {:.2}{}",
        r.plan.moves.len(),
        r.plan.imbalance_before,
        r.plan.imbalance_after,
        if dry_run {
            " (dry run: nothing moved)"
        } else {
            ""
        }
    );
    println!(
        "{:<13} {:<8} {:<8} {:<15} {:>6} {:>8}",
        "JOB", "FROM", "TO", "REASON", "GAIN", "COST s"
    );
    for m in &r.plan.moves {
        println!(
            "{:<13} {:<8} {:<8} {:<15} {:>6.2} {:>8.2}{}",
            m.job_id,
            m.from,
            m.to,
            format!("{:?}", m.reason),
            m.expected_gain,
            m.estimated_cost_secs,
            if m.post_copy { " post-copy" } else { "" }
        );
    }
}

fn report_json(r: &RoundReport) -> serde_json::Value {
    serde_json::json!({
        "nodes": r.view.nodes.iter().map(|n| serde_json::json!({
            "name": n.name,
            "up": n.load.is_ok(),
            "load": n.load.as_ref().map(|l| l.load).unwrap_or(0.0),
            "capacity": n.load.as_ref().map(|l| l.capacity).unwrap_or(0.0),
            "jobs": r.view.jobs.iter().filter(|j| j.node == n.name).count(),
        })).collect::<Vec<_>>(),
        "plan": serde_json::to_value(&r.plan).unwrap_or_default(),
        "results": r.outcomes.iter().map(|o| serde_json::json!({
            "job": o.mv.job_id, "from": o.mv.from, "to": o.mv.to,
            "ok": o.result.is_ok(),
            "error": o.result.as_ref().err(),
            "frozen_ms": o.result.as_ref().map(|m| m.frozen_ms).unwrap_or(0),
        })).collect::<Vec<_>>(),
    })
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let path = ClusterFile::locate(a.cluster.as_deref());
    let cf = ClusterFile::load(&path)?;
    let tls = ClientTls::from_cluster(&cf)?;
    let config = a.policy.config()?;
    match a.cmd {
        None => one_pass(cf, tls, config, a.agent_timeout, a.dry_run, a.json).await,
        Some(Cmd::Serve {
            listen,
            interval,
            no_auto,
            metrics,
            insecure,
            poll,
        }) => {
            serve(
                cf,
                tls,
                config,
                a.agent_timeout,
                listen,
                interval,
                no_auto,
                metrics,
                insecure,
                poll,
            )
            .await
        }
    }
}

async fn one_pass(
    cf: ClusterFile,
    tls: Option<ClientTls>,
    config: PolicyConfig,
    agent_timeout: Duration,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut b = Balancer::new(cf, tls, config)?;
    b.poll_deadline = agent_timeout;
    let progress = |o: &crate::balancer::orchestrator::Outcome, i: usize, n: usize| {
        if json {
            return;
        }
        match &o.result {
            Ok(m) => eprintln!(
                "[{i}/{n}] {} {} -> {}: ok, frozen {} ms{}",
                o.mv.job_id,
                o.mv.from,
                o.mv.to,
                m.frozen_ms,
                if m.fallback.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", m.fallback)
                }
            ),
            Err(e) => eprintln!(
                "[{i}/{n}] {} {} -> {}: FAILED: {e}",
                o.mv.job_id, o.mv.from, o.mv.to
            ),
        }
    };
    if !dry_run && !json {
        // Show the plan before the (possibly long) migrations start.
        let v = b.poll().await;
        let plan = b.plan_for(&v);
        if !plan.moves.is_empty() {
            eprintln!("carrying out {} move(s)...", plan.moves.len());
        }
    }
    let r = b.round(dry_run, &progress).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report_json(&r))?);
    } else {
        print_report(&r, dry_run);
    }
    let failures = r.failures();
    if !failures.is_empty() {
        bail!(
            "{} migration(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    if r.view.nodes.iter().all(|n| n.load.is_err()) {
        bail!("no node answered");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    cf: ClusterFile,
    tls: Option<ClientTls>,
    config: PolicyConfig,
    agent_timeout: Duration,
    listen: Option<SocketAddr>,
    interval: f64,
    no_auto: bool,
    metrics: Option<SocketAddr>,
    insecure: bool,
    poll: bool,
) -> anyhow::Result<()> {
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
    if !interval.is_finite() || interval <= 0.0 {
        bail!("--interval must be a positive number of seconds");
    }
    let listen = match listen {
        Some(l) => l,
        None => cf
            .balancer
            .as_deref()
            .and_then(|e| e.split("://").nth(1))
            .and_then(|hp| hp.parse().ok())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], crate::local::BALANCER_PORT))),
    };
    let server_tls = match &cf.tls {
        Some(t) => {
            let dir = t.ca.parent().map(PathBuf::from).unwrap_or_default();
            Some(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(
                        std::fs::read(dir.join("balancer.pem")).context("reading balancer.pem")?,
                        std::fs::read(dir.join("balancer.key")).context("reading balancer.key")?,
                    ))
                    .client_ca_root(Certificate::from_pem(
                        std::fs::read(&t.ca).context("reading CA")?,
                    )),
            )
        }
        None => None,
    };
    if server_tls.is_none() && !listen.ip().is_loopback() && !insecure {
        bail!("refusing to listen on {listen} without TLS (the cluster file has no tls section); pass --insecure to allow it");
    }
    let etcd = (!cf.etcd.is_empty()).then(|| (cf.name.clone(), cf.etcd.clone()));
    // The leader restarts a lost node's checkpointed jobs (balancer::restart).
    let on_node_lost = crate::balancer::restart::restart_from_checkpoints(cf.clone(), tls.clone());
    let mut balancer = Balancer::new(cf, tls, config)?;
    balancer.poll_deadline = agent_timeout;
    let balancer = Arc::new(balancer);
    if !poll {
        balancer.follow_feeds();
    }
    if let Some((cluster, eps)) = etcd {
        // Several balancers may serve: one leads (see balancer::leader).
        let store = crate::coord::connect_within(&eps, Duration::from_secs(5))
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach etcd to elect a leading balancer: {e}"))?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = format!("{host}:{}:{listen}", std::process::id());
        let l = crate::balancer::leader::Leadership::start(store, &cluster, &id, on_node_lost)
            .await
            .map_err(|e| anyhow::anyhow!("joining the balancer election: {e}"))?;
        tracing::info!(%id, "campaigning to lead the balancers; standing by until elected");
        let _ = balancer.leadership.set(l);
    }
    if let Some(m) = metrics {
        let b = balancer.clone();
        crate::agent::metrics::serve_registry(
            Arc::new(move || crate::agent::metrics::render(&b.metrics.registry)),
            m,
        )
        .await?;
    }
    if !no_auto {
        tokio::spawn(
            balancer
                .clone()
                .run_forever(Duration::from_secs_f64(interval)),
        );
    }
    let mut builder = Server::builder();
    if let Some(t) = server_tls {
        builder = builder.tls_config(t)?;
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BalancerServer<BalancerService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tracing::info!(%listen, "mos-balance serving");
    builder
        .add_service(health)
        .add_service(reflection)
        .add_service(BalancerServer::new(BalancerService { balancer }))
        .serve_with_shutdown(listen, crate::cli::mosixd::shutdown_signal())
        .await
        .with_context(|| format!("serving on {listen}"))?;
    Ok(())
}

/// The policy, re-exported for `mosrun --best` and tests.
pub use policy::place;
