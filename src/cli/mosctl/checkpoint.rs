//! `mosctl checkpoint JOB`: checkpoint a running job now, without stopping it.

use crate::api::pb;
use crate::cli::common::{human_bytes, status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job id (or the host pid of a job's init).
    pub job: String,
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    let job = ctx.find_job(&a.job).await?;
    let mut c = ctx.agent(&job.node).await?;
    let r = c
        .checkpoint(pb::CheckpointRequest {
            job_id: job.id.clone(),
        })
        .await
        .map_err(|s| status_err(&format!("checkpointing {}", job.id), s))?
        .into_inner();
    println!(
        "checkpoint {} of {} on {}: frozen {} ms, {}, {}; `mosctl restore {}` brings the job back from it",
        r.seq,
        job.id,
        job.node,
        r.frozen_ms,
        human_bytes(r.bytes),
        r.mode,
        job.id
    );
    Ok(())
}
