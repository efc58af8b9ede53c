//! `mosctl`: manage jobs and the local cluster. One file per subcommand.

pub mod block;
pub mod certs;
pub mod checkpoint;
pub mod drain;
pub mod freeze;
pub mod jobs;
pub mod kill;
pub mod load;
pub mod local;
pub mod migrate;
pub mod pin;
pub mod restore;
pub mod setspeed;
pub mod show;
pub mod slots;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// mosctl: manage a mosix cluster: list, migrate, freeze, checkpoint and
/// signal jobs; block, drain and tune nodes; bring a local cluster up and
/// down.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Cluster file [default: $MOSIX_CLUSTER or /run/mosix/local/cluster.json].
    #[arg(long, global = true)]
    pub cluster: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List jobs with their node and state.
    Jobs(jobs::Args),
    /// Show one job in detail, with its migration history.
    Show(show::Args),
    /// Move a job to another node now; reports how long it was frozen.
    Migrate(migrate::Args),
    /// Freeze a job to disk (it stops and uses no CPU or memory).
    Freeze(freeze::FreezeArgs),
    /// Bring a frozen job back, on its old node or another.
    Thaw(freeze::ThawArgs),
    /// Checkpoint a running job now, without stopping it (to the shared
    /// path; `mosrun --checkpoint-every` does it periodically).
    Checkpoint(checkpoint::Args),
    /// Bring a job back from a checkpoint (after its node died), or, with
    /// --node-is-down NODE, every job of a node you assert is off.
    Restore(restore::Args),
    /// Send a signal to a job (default SIGKILL: a job is its PID namespace's
    /// init and ignores signals it has no handler for).
    Kill(kill::Args),
    /// Show every node's load once.
    Load(load::Args),
    /// Every node's foreground-job slots (what `mosrun` places into) and
    /// their use; `--total` prints just the sum.
    Slots(slots::Args),
    /// Block a node (kubectl's cordon): no new jobs or migrations in; its
    /// running jobs stay. Kept across agent restarts.
    Block(block::Args),
    /// Let a blocked node take jobs again (kubectl's uncordon).
    Unblock(block::Args),
    /// Block a node, then move every job off it live, a few at a time
    /// (MOSIX's expel, kubectl's drain); names each job that cannot move.
    Drain(drain::Args),
    /// Set a node's relative CPU speed (capacity = cores x speed); kept
    /// across agent restarts.
    Setspeed(setspeed::Args),
    /// Pin a running job to its node (MOSIX's "stay"): neither the balancer,
    /// a drain nor `mosctl migrate` moves it.
    Pin(pin::Args),
    /// Let a pinned job move again.
    Unpin(pin::Args),
    /// Generate a cluster CA, node and client certificates and the image key.
    Certs(certs::Args),
    /// A local cluster of several nodes on this machine.
    #[command(subcommand)]
    Local(local::Cmd),
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let cluster = a.cluster.as_deref();
    match a.cmd {
        Cmd::Jobs(x) => jobs::run(cluster, x).await,
        Cmd::Show(x) => show::run(cluster, x).await,
        Cmd::Migrate(x) => migrate::run(cluster, x).await,
        Cmd::Freeze(x) => freeze::freeze(cluster, x).await,
        Cmd::Thaw(x) => freeze::thaw(cluster, x).await,
        Cmd::Checkpoint(x) => checkpoint::run(cluster, x).await,
        Cmd::Restore(x) => restore::run(cluster, x).await,
        Cmd::Kill(x) => kill::run(cluster, x).await,
        Cmd::Load(x) => load::run(cluster, x).await,
        Cmd::Slots(x) => slots::run(cluster, x).await,
        Cmd::Local(x) => local::run(cluster, x).await,
        Cmd::Certs(x) => certs::run(x),
        Cmd::Block(x) => block::block(cluster, x).await,
        Cmd::Unblock(x) => block::unblock(cluster, x).await,
        Cmd::Drain(x) => drain::run(cluster, x).await,
        Cmd::Setspeed(x) => setspeed::run(cluster, x).await,
        Cmd::Pin(x) => pin::pin(cluster, x).await,
        Cmd::Unpin(x) => pin::unpin(cluster, x).await,
    }
}
