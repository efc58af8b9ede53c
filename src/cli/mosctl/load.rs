//! `mosctl load`: every node's load once, and any node whose shared path is
//! not the cluster's (see security::membership).

use crate::cli::common::{human_bytes, poll_loads, Ctx};
use std::path::Path;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn run(cluster: Option<&Path>, _a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    println!(
        "{:<8} {:>6} {:>6} {:>6} {:>5} {:>11}",
        "NODE", "LOAD", "CAP", "NORM", "JOBS", "MEM FREE"
    );
    let mut answered = Vec::new();
    for (name, r) in poll_loads(&ctx, Duration::from_secs(2)).await {
        if r.is_ok() {
            answered.push(name.to_string());
        }
        match r {
            Ok(l) => println!(
                "{:<8} {:>6.2} {:>6.2} {:>6.2} {:>5} {:>11}{}",
                name,
                l.load,
                l.capacity,
                if l.capacity > 0.0 {
                    l.load / l.capacity
                } else {
                    0.0
                },
                l.jobs_running,
                human_bytes(l.mem_available_bytes),
                if l.blocked { "  BLOCKED" } else { "" }
            ),
            Err(e) => println!("{name:<8} DOWN ({e})"),
        }
    }
    // A node whose agent answers but never wrote its presence file into the
    // shared path as this machine sees it has another file system there.
    if let Some(shared) = &ctx.cf.shared_root {
        let missing = crate::security::membership::nodes_missing_from_shared(
            shared,
            answered.iter().map(String::as_str),
        );
        for n in missing.unwrap_or_default() {
            println!(
                "warning: node {n} is up but its shared path is not the file system at {} here (no {}/{n} from it): mount the cluster's shared file system there on {n} and restart its agent",
                shared.display(),
                crate::security::membership::NODES_DIR
            );
        }
    }
    Ok(())
}
