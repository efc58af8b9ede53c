//! `mosctl migrate JOB NODE`

use crate::api::pb;
use crate::cli::common::{human_bytes, status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job id (or the host pid of a job's init).
    pub job: String,
    /// Target node.
    pub node: String,
    /// Post-copy: restore at once and fetch memory on demand.
    ///
    /// A job that holds what a post-copy restore cannot take over while the
    /// source still holds it (a FIFO with unread data, a file lock, a lease)
    /// is refused, naming it; move it by full copy instead.
    #[arg(long, conflicts_with_all = ["full_copy", "pre_copy"])]
    pub post_copy: bool,
    /// With --post-copy: try even a job that would be refused. Such a move
    /// fails within seconds and the job resumes on its node, memory intact.
    #[arg(long, requires = "post_copy")]
    pub force: bool,
    /// Full copy: move all memory before restoring.
    #[arg(long, conflicts_with = "pre_copy")]
    pub full_copy: bool,
    /// Pre-copy: copy memory in rounds while the job runs, then freeze it
    /// only for what changed since. Needs memory tracking (soft-dirty) on
    /// the source kernel; without it the job moves as a full copy and this
    /// command says why.
    #[arg(long)]
    pub pre_copy: bool,
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let by_pid = a.job.parse::<i32>().is_ok();
    // A malformed job id is refused here, before anything is contacted.
    if !by_pid {
        crate::core::JobId::parse(&a.job)?;
    }
    let ctx = Ctx::load(cluster)?;
    // Validate the target before touching anything.
    ctx.cf.node(&a.node)?;
    let mode = if a.post_copy {
        pb::MigrationMode::PostCopy
    } else if a.full_copy {
        pb::MigrationMode::FullCopy
    } else if a.pre_copy {
        pb::MigrationMode::PreCopy
    } else {
        pb::MigrationMode::Auto
    };
    // A job id goes to any agent, which passes the call on to the job's node
    // itself (one connection and one call from here); a host pid must first
    // be found on the node where it runs.
    let (job_id, mut c) = if by_pid {
        let job = ctx.find_job(&a.job).await?;
        if job.node == a.node {
            anyhow::bail!("job {} is already on {}", job.id, a.node);
        }
        eprintln!("migrating {} from {} to {} ...", job.id, job.node, a.node);
        (job.id.clone(), ctx.agent(&job.node).await?)
    } else {
        eprintln!("migrating {} to {} ...", a.job, a.node);
        (a.job.clone(), ctx.any_agent().await?)
    };
    let r = c
        .migrate(pb::MigrateRequest {
            job_id: job_id.clone(),
            target_node: a.node.clone(),
            migration_id: String::new(),
            mode: mode as i32,
            only_here: false,
            force: a.force,
            leader_revision: 0,
        })
        .await
        .map_err(|s| status_err(&format!("migrating {job_id}"), s))?
        .into_inner();
    let m = r.migration.unwrap_or_default();
    println!(
        "migrated {} {} -> {}: frozen {} ms, total {} ms, images {}{}",
        job_id,
        m.from_node,
        m.to_node,
        m.frozen_ms,
        m.total_ms,
        human_bytes(m.image_bytes),
        if m.post_copy {
            " (post-copy)".to_string()
        } else if m.pre_copy_rounds > 0 {
            format!(
                " (pre-copy: {} round{}, {} copied while running)",
                m.pre_copy_rounds,
                if m.pre_copy_rounds == 1 { "" } else { "s" },
                human_bytes(m.pre_copy_bytes)
            )
        } else {
            String::new()
        }
    );
    if !m.fallback.is_empty() {
        println!("note: {}", m.fallback);
    }
    Ok(())
}
