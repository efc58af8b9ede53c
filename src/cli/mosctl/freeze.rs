//! `mosctl freeze JOB` and `mosctl thaw JOB [NODE]`

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
    /// Node to thaw on [default: the node it was frozen on]. Given as in
    /// `mosctl migrate JOB NODE`, or as --node.
    #[arg(value_name = "NODE", conflicts_with = "node")]
    pub at: Option<String>,
    /// Node to thaw on (the same as the NODE argument).
    #[arg(long)]
    pub node: Option<String>,
}

impl ThawArgs {
    /// The node asked for, however it was given (None: where it was frozen).
    fn node(&self) -> Option<&str> {
        self.node.as_deref().or(self.at.as_deref())
    }
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
    let node = a.node().unwrap_or(job.node.as_str());
    let mut c = ctx.agent(node).await?;
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

#[cfg(test)]
mod tests {
    use crate::cli::mosctl::{Args, Cmd};
    use clap::Parser;

    fn thaw_node(argv: &[&str]) -> Result<Option<String>, clap::Error> {
        let a = Args::try_parse_from(argv)?;
        match a.cmd {
            Cmd::Thaw(t) => Ok(t.node().map(str::to_string)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn thaw_takes_its_node_as_migrate_does_or_as_an_option() {
        assert_eq!(thaw_node(&["mosctl", "thaw", "j1"]).unwrap(), None);
        assert_eq!(
            thaw_node(&["mosctl", "thaw", "j1", "node3"]).unwrap(),
            Some("node3".into())
        );
        assert_eq!(
            thaw_node(&["mosctl", "thaw", "j1", "--node", "node2"]).unwrap(),
            Some("node2".into())
        );
        // Two nodes at once is a mistake, not a choice between them.
        let e = thaw_node(&["mosctl", "thaw", "j1", "node3", "--node", "node2"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
