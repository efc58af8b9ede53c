//! `mosctl jobs`

use crate::api::pb;
use crate::cli::common::{state_name, status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Include exited and failed jobs.
    #[arg(long, short)]
    pub all: bool,
    /// Only jobs on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    if let Some(n) = &a.node {
        // A node the cluster does not have has no jobs, but "no jobs" would
        // hide the typo.
        ctx.cf.node(n)?;
    }
    let mut c = ctx.any_agent().await?;
    let pb::ListJobsResponse { jobs, unlisted } = c
        .list_jobs(pb::ListJobsRequest {
            node: a.node.unwrap_or_default(),
            include_finished: a.all,
        })
        .await
        .map_err(|s| status_err("listing jobs", s))?
        .into_inner();
    // On stderr, so that --json stays one JSON document on stdout.
    for u in &unlisted {
        eprintln!(
            "warning: the jobs of {} are not listed: {}",
            u.node, u.reason
        );
    }
    if a.json {
        let v: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| {
                serde_json::json!({
                    "id": j.id, "node": j.node, "state": state_name(j.state), "pid": j.pid,
                    "argv": j.argv, "migrations": j.history.len(),
                    "exit_code": j.exit_code, "exit_signal": j.exit_signal, "error": j.error,
                    "service": j.service, "port": j.port,
                    "address": j.address, "mac": j.mac,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if jobs.is_empty() {
        println!(
            "no jobs{}",
            if a.all {
                ""
            } else {
                " running (use --all for finished ones)"
            }
        );
        return Ok(());
    }
    println!(
        "{:<13} {:<8} {:<10} {:>7} {:>5}  COMMAND",
        "JOB", "NODE", "STATE", "PID", "MIGR"
    );
    for j in &jobs {
        let state = match (state_name(j.state), j.exit_code, j.exit_signal) {
            ("exited", Some(c), _) => format!("exit {c}"),
            ("exited", _, Some(s)) => format!("signal {s}"),
            (s, _, _) => s.to_string(),
        };
        let service = if j.service.is_empty() {
            String::new()
        } else {
            format!("  [service {}:{}]", j.service, j.port)
        };
        let service = if j.address.is_empty() {
            service
        } else {
            format!("{service}  [address {}]", j.address)
        };
        println!(
            "{:<13} {:<8} {:<10} {:>7} {:>5}  {}{service}",
            j.id,
            j.node,
            state,
            j.pid,
            j.history.len(),
            j.argv.join(" ")
        );
    }
    Ok(())
}
