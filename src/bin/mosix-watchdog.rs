//! `mosix-watchdog`: enforces an agent's fencing deadline while the agent
//! cannot (stopped, hung, killed). Started by `mosixd` when etcd is
//! configured; see `mosix::coord::watchdog` for the file it reads.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

/// mosix-watchdog: SIGKILLs this node's job inits once the agent's fencing
/// deadline (in the fence file) has passed without a newer one. mosixd
/// starts and replaces it; it exits when the fence file is removed.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The agent's fence file.
    #[arg(long)]
    file: PathBuf,
}

fn main() -> anyhow::Result<()> {
    mosix::cli::init_tracing();
    let a = Args::parse();
    mosix::coord::watchdog::run(&a.file)
        .with_context(|| format!("fence watchdog on {}", a.file.display()))
}
