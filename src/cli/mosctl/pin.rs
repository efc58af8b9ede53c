//! `mosctl pin JOB` and `mosctl unpin JOB` (MOSIX's "stay"): keep a running
//! job on its node.
//!
//! A pinned job is never moved: the balancer leaves it, `mosctl drain` names
//! it and leaves it running, and `mosctl migrate` is refused naming the pin
//! (unpin it first; there is deliberately no override, so a pin is a promise
//! a script can rely on). The pin is in the job's record, so it holds across
//! agent restarts; `mosrun --pinned` starts a job pinned.

use crate::api::pb;
use crate::cli::common::{status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job id (or the host pid of a job's init).
    pub job: String,
}

async fn set(cluster: Option<&Path>, a: Args, pinned: bool) -> anyhow::Result<pb::Job> {
    if a.job.parse::<i32>().is_err() {
        crate::core::JobId::parse(&a.job)?;
    }
    let ctx = Ctx::load(cluster)?;
    let job = ctx.find_job(&a.job).await?;
    let mut c = ctx.agent(&job.node).await?;
    c.set_pinned(pb::SetPinnedRequest {
        job_id: job.id.clone(),
        pinned,
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|s| {
        status_err(
            &format!(
                "{} {}",
                if pinned { "pinning" } else { "unpinning" },
                job.id
            ),
            s,
        )
    })
}

pub async fn pin(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let j = set(cluster, a, true).await?;
    println!(
        "{} pinned to {}: it will not be moved (`mosctl unpin {}` lets it move)",
        j.id, j.node, j.id
    );
    Ok(())
}

pub async fn unpin(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let j = set(cluster, a, false).await?;
    println!("{} unpinned: it may move again (on {})", j.id, j.node);
    Ok(())
}
