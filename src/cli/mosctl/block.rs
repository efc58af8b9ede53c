//! `mosctl block NODE` and `mosctl unblock NODE` (MOSIX's `mosctl block`,
//! kubectl's cordon/uncordon).
//!
//! A blocked node takes no new job and no migration in: its agent refuses
//! them, and the balancer, placement and `mosctl drain` skip it. Jobs already
//! running there stay. The block is kept in the node's state and survives an
//! agent restart, so a node under maintenance is not refilled when its agent
//! comes back.

use crate::api::pb;
use crate::cli::common::{status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node (its name in the cluster file).
    pub node: String,
}

/// Set `blocked` on `node` through its own agent; the node's settings after.
pub async fn set_blocked(ctx: &Ctx, node: &str, blocked: bool) -> anyhow::Result<pb::NodeAdmin> {
    ctx.cf.node(node)?;
    let mut c = ctx.agent(node).await?;
    c.set_node_admin(pb::SetNodeAdminRequest {
        blocked: Some(blocked),
        speed: None,
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|s| {
        status_err(
            &format!("{} {node}", if blocked { "blocking" } else { "unblocking" }),
            s,
        )
    })
}

pub async fn block(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    set_blocked(&ctx, &a.node, true).await?;
    println!(
        "{0} blocked: it takes no new job or migration; its running jobs stay (`mosctl drain {0}` moves them off, `mosctl unblock {0}` lets jobs in again)",
        a.node
    );
    Ok(())
}

pub async fn unblock(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    set_blocked(&ctx, &a.node, false).await?;
    println!("{} unblocked: it takes jobs again", a.node);
    Ok(())
}
