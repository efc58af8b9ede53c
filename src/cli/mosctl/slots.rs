//! `mosctl slots`: every node's foreground-job slots and their use.
//!
//! A node has `max(1, round(capacity × slots_per_core))` slots (capacity in
//! cores × speed; `mosixd --slots-per-core`, 2 by default, 10 on a local
//! cluster). A foreground `mosrun` holds one while its job runs. `--total`
//! prints only the sum over the nodes that answered and are not blocked
//! (what `mosmake` gives make as `-j`; placement never uses a blocked node's
//! slots).

use crate::api::pb;
use crate::cli::common::Ctx;
use std::path::Path;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print only the total number of slots of the nodes that answer and
    /// are not blocked (`mosctl block`).
    #[arg(long, conflicts_with = "json")]
    pub total: bool,
    /// JSON: {"nodes":[{node,capacity,slots,used,background_load,blocked,up,error}],"total":N,"used":N}.
    #[arg(long)]
    pub json: bool,
}

async fn one(ctx: &Ctx, node: &str) -> Result<pb::NodeSlots, String> {
    let mut c = ctx.agent(node).await.map_err(|e| format!("{e:#}"))?;
    let mut req = tonic::Request::new(pb::GetSlotsRequest {});
    req.set_timeout(Duration::from_secs(2));
    c.get_slots(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    let names: Vec<String> = ctx.cf.nodes.iter().map(|n| n.name.to_string()).collect();
    let results = futures::future::join_all(
        names
            .iter()
            .map(|n| async { (n.clone(), one(&ctx, n).await) }),
    )
    .await;
    let total: u32 = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().filter(|s| !s.blocked).map(|s| s.slots))
        .sum();
    let used: u32 = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|s| s.used))
        .sum();
    if results.iter().all(|(_, r)| r.is_err()) {
        anyhow::bail!("no node of the cluster answered");
    }
    if a.total {
        println!("{total}");
        return Ok(());
    }
    if a.json {
        let nodes: Vec<serde_json::Value> = results
            .iter()
            .map(|(n, r)| match r {
                Ok(s) => serde_json::json!({
                    "node": n, "up": true, "capacity": s.capacity, "slots": s.slots,
                    "used": s.used, "background_load": s.background_load,
                    "blocked": s.blocked,
                }),
                Err(e) => serde_json::json!({"node": n, "up": false, "error": e}),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"nodes": nodes, "total": total, "used": used})
        );
        return Ok(());
    }
    println!(
        "{:<8} {:>6} {:>6} {:>5} {:>11}",
        "NODE", "CAP", "SLOTS", "USED", "BACKGROUND"
    );
    for (n, r) in &results {
        match r {
            Ok(s) => println!(
                "{:<8} {:>6.2} {:>6} {:>5} {:>11.2}{}",
                n,
                s.capacity,
                s.slots,
                s.used,
                s.background_load,
                if s.blocked { "  BLOCKED" } else { "" }
            ),
            Err(e) => println!("{n:<8} DOWN ({e})"),
        }
    }
    let blocked = results
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|s| s.blocked))
        .count();
    println!(
        "total: {total} slots, {used} in use{}",
        if blocked > 0 {
            " (blocked nodes not counted)"
        } else {
            ""
        }
    );
    Ok(())
}
