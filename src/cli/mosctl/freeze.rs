//! `mosctl freeze JOB` and `mosctl thaw JOB [--node NODE]`

use crate::api::pb;
use crate::cli::common::{status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct FreezeArgs {
    /// Job id (or the host pid of a job's init).
    pub job: String,
}

#[derive(clap::Args, Debug)]
pub struct ThawArgs {
    /// Job id.
    pub job: String,
    /// Node to thaw on [default: the node it was frozen on].
    #[arg(long)]
    pub node: Option<String>,
}

pub async fn freeze(cluster: Option<&Path>, a: FreezeArgs) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    let job = ctx.find_job(&a.job).await?;
    let mut c = ctx.agent(&job.node).await?;
    c.freeze(pb::FreezeRequest {
        job_id: job.id.clone(),
    })
    .await
    .map_err(|s| status_err(&format!("freezing {}", job.id), s))?;
    println!(
        "frozen {} (was on {}); `mosctl thaw {}` brings it back",
        job.id, job.node, job.id
    );
    Ok(())
}

pub async fn thaw(cluster: Option<&Path>, a: ThawArgs) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    let job = ctx.find_job(&a.job).await?;
    let node = a.node.unwrap_or_else(|| job.node.clone());
    let mut c = ctx.agent(&node).await?;
    let j = c
        .thaw(pb::ThawRequest {
            job_id: job.id.clone(),
        })
        .await
        .map_err(|s| status_err(&format!("thawing {}", job.id), s))?
        .into_inner();
    println!("thawed {} on {} (pid {})", j.id, j.node, j.pid);
    Ok(())
}
