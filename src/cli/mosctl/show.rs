//! `mosctl show JOB`

use crate::cli::common::{human_bytes, state_name, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job id (or the host pid of a job's init).
    pub job: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    let j = ctx.find_job(&a.job).await?;
    if a.json {
        let rec = crate::core::JobRecord::try_from(j)?;
        println!("{}", serde_json::to_string_pretty(&rec)?);
        return Ok(());
    }
    println!("job      {}", j.id);
    println!("node     {}", j.node);
    println!("state    {}", state_name(j.state));
    println!("pid      {}", j.pid);
    println!("command  {}", j.argv.join(" "));
    if !j.service.is_empty() {
        println!("service  {} on port {}", j.service, j.port);
    }
    if j.address.is_empty() {
        println!("address  the node's (its connections cannot move with it)");
    } else {
        println!(
            "address  {}/{} mac {} via {} (its own: moves with the job)",
            j.address, j.address_prefix, j.mac, j.gateway
        );
    }
    println!("stdout   {}", j.stdout_path);
    if let Some(c) = j.exit_code {
        println!("exit     code {c}");
    }
    if let Some(s) = j.exit_signal {
        println!("exit     signal {s}");
    }
    if !j.error.is_empty() {
        println!("error    {}", j.error);
    }
    if let Some(c) = &j.checkpoint {
        let every = if c.every_ms > 0 {
            format!("every {} s, ", c.every_ms as f64 / 1000.0)
        } else {
            String::new()
        };
        if c.last_seq > 0 {
            println!(
                "ckpt     {every}keep {}; latest {} ({} ms ago, frozen {} ms, {}), {}",
                c.keep,
                c.last_seq,
                crate::core::now_unix_ms().saturating_sub(c.last_unix_ms),
                c.last_frozen_ms,
                human_bytes(c.last_bytes),
                c.mode
            );
        } else {
            println!("ckpt     {every}keep {}; none yet", c.keep);
        }
        if !c.last_error.is_empty() {
            println!("ckpt err {}", c.last_error);
        }
    }
    for m in &j.history {
        if m.restored_from_checkpoint > 0 {
            println!(
                "restart  {} -> {}  from checkpoint {}  restore {} ms  {}",
                m.from_node,
                m.to_node,
                m.restored_from_checkpoint,
                m.frozen_ms,
                human_bytes(m.image_bytes)
            );
            continue;
        }
        println!(
            "migrated {} -> {}  frozen {} ms  total {} ms  {}  {}{}",
            m.from_node,
            m.to_node,
            m.frozen_ms,
            m.total_ms,
            human_bytes(m.image_bytes),
            if m.ok { "ok" } else { "FAILED: " },
            m.error
        );
    }
    Ok(())
}
