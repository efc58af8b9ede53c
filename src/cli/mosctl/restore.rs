//! `mosctl restore JOB [--checkpoint N] [--node NODE]` and
//! `mosctl restore --node-is-down NODE`: bring jobs back from their
//! checkpoints. The logic for a whole node is the library's
//! (`balancer::restart::plan::restart_node_jobs`); this file only reaches the
//! agents and prints.

use crate::api::pb;
use crate::balancer::restart::grpc::GrpcRestartOps;
use crate::balancer::restart::plan::{self as restart, Outcome};
use crate::cli::common::{status_err, Ctx};
use crate::core::JobRecord;
use anyhow::{anyhow, bail, Context};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job id. Without it, --node-is-down restores every job of that node.
    pub job: Option<String>,
    /// Checkpoint number to restore [default: the job's latest].
    #[arg(long, value_name = "N", requires = "job")]
    pub checkpoint: Option<u64>,
    /// Node to restore on [default: the one the placement policy picks].
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// You assert that NODE is off (powered down, or all its processes
    /// killed), like Kubernetes' out-of-service taint: its jobs are then
    /// restored elsewhere from their latest checkpoints, and those without
    /// one are recorded lost. mosix cannot check this: if NODE still runs a
    /// job, the job then runs twice. Without a JOB, every job recorded on
    /// NODE; with one, that job only.
    #[arg(long, value_name = "NODE")]
    pub node_is_down: Option<String>,
}

/// The cluster's snapshot for placement, restricted to `only` if given.
async fn snapshot(
    ctx: &Ctx,
    only: Option<&str>,
) -> anyhow::Result<crate::balancer::policy::ClusterSnapshot> {
    if let Some(n) = only {
        ctx.cf.node(n)?;
    }
    let view = ctx.poll_view().await;
    let mut s = view.snapshot(0.0);
    if let Some(n) = only {
        s.nodes.retain(|x| x.name == n);
    }
    Ok(s)
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    if a.job.is_none() && a.node_is_down.is_none() {
        bail!("name a job to restore, or a node whose jobs to restore with --node-is-down NODE");
    }
    let ctx = Ctx::load(cluster)?;
    if let Some(d) = &a.node_is_down {
        ctx.cf.node(d)?;
        if a.node.as_deref() == Some(d.as_str()) {
            bail!("--node {d} is the node you declared down");
        }
    }
    match (&a.job, &a.node_is_down) {
        (None, None) => {
            bail!("name a job to restore, or a node whose jobs to restore with --node-is-down NODE")
        }
        (None, Some(down)) => whole_node(&ctx, down, a.node.as_deref()).await,
        (Some(job), _) => one_job(&ctx, job, &a).await,
    }
}

async fn one_job(ctx: &Ctx, spec: &str, a: &Args) -> anyhow::Result<()> {
    let job = ctx.find_job(spec).await?;
    let node = match &a.node {
        Some(n) => {
            ctx.cf.node(n)?;
            n.clone()
        }
        None => {
            let mut planner =
                crate::balancer::drain::DrainPlanner::new(snapshot(ctx, None).await?, &job.node);
            planner.exclude(&job.node);
            let snap = restart::unseen_job(&job.id, &job.node);
            planner
                .next_target(&snap)
                .ok_or_else(|| anyhow!("no node is up with room for job {}", job.id))?
        }
    };
    let mut c = ctx.agent(&node).await?;
    let r = c
        .restore_checkpoint(pb::RestoreCheckpointRequest {
            leader_revision: 0,
            job_id: job.id.clone(),
            seq: a.checkpoint.unwrap_or(0),
            node_is_down: a.node_is_down.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| status_err(&format!("restoring {} on {node}", job.id), s))?
        .into_inner();
    let j = r.job.unwrap_or_default();
    if r.lost {
        println!("{}: LOST ({})", job.id, j.error);
    } else {
        println!(
            "restored {} on {} from checkpoint {} (pid {}; was on {})",
            job.id, j.node, r.seq, j.pid, job.node
        );
    }
    Ok(())
}

async fn whole_node(ctx: &Ctx, down: &str, only: Option<&str>) -> anyhow::Result<()> {
    let mut c = ctx.any_agent().await?;
    let jobs: Vec<JobRecord> = c
        .list_jobs(pb::ListJobsRequest {
            node: down.to_string(),
            include_finished: false,
        })
        .await
        .map_err(|s| status_err("listing jobs", s))?
        .into_inner()
        .jobs
        .into_iter()
        .map(JobRecord::try_from)
        .collect::<Result<_, _>>()
        .context("a job record from the agents")?;
    let snap = snapshot(ctx, only).await?;
    let ops = GrpcRestartOps {
        cf: ctx.cf.clone(),
        tls: ctx.tls.clone(),
        leader_revision: 0,
    };
    let out = restart::restart_node_jobs(&ops, snap, down, &jobs).await;
    if out.is_empty() {
        println!("no job is recorded running on {down}");
        return Ok(());
    }
    let mut failed = 0;
    let (mut ok, mut lost) = (0, 0);
    for o in &out {
        println!("{}", o.line());
        match o {
            Outcome::Restarted { .. } => ok += 1,
            Outcome::Lost { .. } => lost += 1,
            Outcome::Failed { .. } => failed += 1,
            Outcome::Skipped { .. } => {}
        }
    }
    println!("{down}: {ok} restarted, {lost} lost, {failed} not restarted");
    if failed > 0 {
        bail!("{failed} job(s) of {down} could not be restarted (see above); run the command again once the cause is fixed");
    }
    Ok(())
}
