//! `mosctl setspeed NODE FACTOR` (MOSIX's `mosctl setspeed`): a node's
//! relative CPU speed.
//!
//! Capacity is the node's cores × its speed, and both the balancer (load per
//! capacity) and placement (slots from capacity) divide by it: a node set to
//! 2 gets about twice the work of an equal node at 1. The factor takes effect
//! at once and is kept in the node's state, so it outlives an agent restart
//! (and wins over `mosixd --speed` until it is set again).

use crate::api::pb;
use crate::cli::common::{status_err, Ctx};
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node (its name in the cluster file).
    pub node: String,
    /// Relative speed: a positive number, 1 for an ordinary node, 2 for one
    /// twice as fast per core.
    #[arg(value_parser = parse_speed)]
    pub factor: f64,
}

fn parse_speed(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if crate::agent::admin::valid_speed(v) {
        Ok(v)
    } else {
        Err(format!("{s} is not a positive finite number"))
    }
}

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    ctx.cf.node(&a.node)?;
    let mut c = ctx.agent(&a.node).await?;
    let r = c
        .set_node_admin(pb::SetNodeAdminRequest {
            blocked: None,
            speed: Some(a.factor),
        })
        .await
        .map_err(|s| status_err(&format!("setting the speed of {}", a.node), s))?
        .into_inner();
    let cap = c
        .get_load(pb::GetLoadRequest {})
        .await
        .map(|l| format!(" (capacity {:.2})", l.into_inner().capacity))
        .unwrap_or_default();
    println!("{}: speed {}{cap}", r.node, r.speed);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn speeds_must_be_positive_finite_numbers() {
        assert_eq!(super::parse_speed("1.5"), Ok(1.5));
        for bad in ["0", "-1", "nan", "inf", "fast", ""] {
            assert!(super::parse_speed(bad).is_err(), "{bad}");
        }
    }
}
