//! `mosctl load`: every node's load once.

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
    for (name, r) in poll_loads(&ctx, Duration::from_secs(2)).await {
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
    Ok(())
}
