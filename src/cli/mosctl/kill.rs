//! `mosctl kill JOB [--signal N]`

use crate::api::pb;
use crate::cli::common::{status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job id (or the host pid of a job's init).
    pub job: String,
    /// Signal number.
    #[arg(long, short, default_value_t = 9)]
    pub signal: i32,
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    let job = ctx.find_job(&a.job).await?;
    let mut c = ctx.agent(&job.node).await?;
    c.signal(pb::SignalRequest {
        job_id: job.id.clone(),
        signal: a.signal,
    })
    .await
    .map_err(|s| status_err(&format!("signalling {}", job.id), s))?;
    println!("sent signal {} to {} on {}", a.signal, job.id, job.node);
    Ok(())
}
