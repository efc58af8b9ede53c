//! `mosrun`: start a migratable job on a node, or on the best node.

use crate::api::pb;
use crate::balancer::policy;
use crate::cli::common::{status_err, Ctx};
use anyhow::{bail, Context};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// mosrun: run a command as a migratable mosix job and print its id.
///
/// Without --node the job starts on the node the balancer would choose (the
/// lowest load per capacity with memory to spare).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, trailing_var_arg = true)]
pub struct Args {
    /// Cluster file [default: $MOSIX_CLUSTER or /run/mosix/local/cluster.json].
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// Start on this node.
    #[arg(long, conflicts_with = "best")]
    pub node: Option<String>,
    /// Start on the best node (the default when --node is not given).
    #[arg(long)]
    pub best: bool,
    /// Never move this job automatically (manual migration still works).
    #[arg(long)]
    pub pinned: bool,
    /// Never move this job at all.
    #[arg(long)]
    pub no_migrate: bool,
    /// A label for the job.
    #[arg(long, default_value = "")]
    pub name: String,
    /// The job is an instance of this service (mosgw sends the service's
    /// traffic to it); needs --port.
    #[arg(long, requires = "port")]
    pub service: Option<String>,
    /// The TCP port the service instance listens on (on its node's address).
    #[arg(long, requires = "service")]
    pub port: Option<u16>,
    /// Expected memory of the job in MiB, for placement.
    #[arg(long, default_value_t = 0)]
    pub mem_mib: u64,
    /// The command and its arguments (after --).
    #[arg(required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// The node the policy would place a new job on, from the same cluster view
/// the balancer polls.
pub async fn best_node(ctx: &Ctx, rss: u64) -> anyhow::Result<String> {
    let view = crate::balancer::view::poll(&ctx.cf, ctx.tls.as_ref(), Duration::from_secs(2)).await;
    policy::place(
        &view.snapshot(0.0),
        &policy::PolicyConfig::default(),
        rss,
        1.0,
    )
    .context("no node is up with memory for this job")
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(a.cluster.as_deref())?;
    if a.command.is_empty() || a.command[0].is_empty() {
        bail!("give the command to run after --");
    }
    let node = match a.node {
        Some(n) => {
            ctx.cf.node(&n)?;
            n
        }
        None => best_node(&ctx, a.mem_mib << 20).await?,
    };
    let cwd = std::env::current_dir()
        .context("current directory")?
        .to_string_lossy()
        .into_owned();
    let mut c = ctx.agent(&node).await?;
    let job = c
        .launch(pb::LaunchRequest {
            argv: a.command,
            env: std::env::vars().collect(),
            cwd,
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            pinned: a.pinned,
            non_migratable: a.no_migrate,
            name: a.name,
            service: a.service.unwrap_or_default(),
            port: a.port.map(u32::from).unwrap_or(0),
        })
        .await
        .map_err(|s| status_err(&format!("launching on {node}"), s))?
        .into_inner();
    eprintln!(
        "started {} on {} (pid {}); output: {}",
        job.id, job.node, job.pid, job.stdout_path
    );
    println!("{}", job.id);
    Ok(())
}
