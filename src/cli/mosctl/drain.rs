//! `mosctl drain NODE` (MOSIX's "expel", kubectl's drain): block the node,
//! then move every job off it live.
//!
//! Draining a node for maintenance is the everyday reason to want live
//! migration, so it is one command: the node is blocked first (nothing new
//! arrives while it empties; it stays blocked afterwards, until `mosctl
//! unblock`), then its running jobs move, at most `--max-parallel` at a time,
//! each to the node the balancer's placement rule picks (counted as it is
//! picked, see `balancer::drain`). One line per move; a job that cannot move
//! (pinned, non-migratable, no node can take it, the move failed) is named
//! with the reason and left running where it is, and the exit status is then
//! non-zero. Jobs that arrived while the drain ran (a migration in flight
//! when the block came) are picked up by a second look.

use crate::api::pb;
use crate::balancer::drain::{movable, DrainPlanner};
use crate::balancer::policy::JobSnapshot;
use crate::cli::common::{parse_duration, status_err, Ctx};
use anyhow::bail;
use futures::StreamExt;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  mosctl drain node2 --max-parallel 2 --timeout 5m\n\n\
The node stays blocked after the drain; `mosctl unblock NODE` lets jobs in again.\n\
Exit status: 0 when every job moved, 1 when any job is still on the node."
)]
pub struct Args {
    /// The node to empty (its name in the cluster file).
    pub node: String,
    /// Moves under way at once (a node runs one CRIU dump at a time; more
    /// overlaps one job's restore with the next one's dump).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_parallel: u32,
    /// Give up after this long: no new move starts, and a move still under
    /// way is reported (its agent finishes it). E.g. 90, 90s, 5m, 1h.
    /// Default: no limit.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

/// What became of one job.
enum Outcome {
    Moved,
    Stayed(String),
}

/// How many times a job is tried on another target after its target refused
/// it (blocked since the sample, or unreachable).
const TARGET_TRIES: usize = 3;
/// How many looks at the node for jobs still there (new arrivals).
const PASSES: usize = 3;

pub async fn run(cluster: Option<&Path>, a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(cluster)?;
    ctx.cf.node(&a.node)?;
    let t0 = Instant::now();
    let deadline = a.timeout.map(|t| t0 + t);
    super::block::set_blocked(&ctx, &a.node, true).await?;
    println!("{} blocked: no new jobs or migrations in", a.node);

    let mut seen: BTreeSet<String> = BTreeSet::new();
    let (mut moved, mut stayed) = (0usize, Vec::<(String, String)>::new());
    for _ in 0..PASSES {
        let view = ctx.poll_view().await;
        if view
            .nodes
            .iter()
            .any(|n| n.name == a.node && n.load.is_err())
        {
            bail!("{} does not answer; nothing was moved", a.node);
        }
        let snap = view.snapshot(0.0);
        let todo: Vec<JobSnapshot> = snap
            .jobs
            .iter()
            .filter(|j| j.node == a.node && !seen.contains(&j.id))
            .cloned()
            .collect();
        if todo.is_empty() {
            break;
        }
        seen.extend(todo.iter().map(|j| j.id.clone()));
        let planner = Mutex::new(DrainPlanner::new(snap, &a.node));
        let results: Vec<(String, Outcome)> = futures::stream::iter(todo)
            .map(|job| {
                let (ctx, planner, node) = (&ctx, &planner, a.node.as_str());
                async move {
                    let id = job.id.clone();
                    (id, move_one(ctx, planner, node, job, deadline).await)
                }
            })
            .buffer_unordered(a.max_parallel as usize)
            .collect()
            .await;
        for (id, o) in results {
            match o {
                Outcome::Moved => moved += 1,
                Outcome::Stayed(why) => stayed.push((id, why)),
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if stayed.is_empty() {
        println!(
            "drained {}: {moved} job{} moved in {secs:.1} s; it stays blocked (`mosctl unblock {}` lets jobs in again)",
            a.node,
            if moved == 1 { "" } else { "s" },
            a.node
        );
        return Ok(());
    }
    bail!(
        "{} job{} could not move off {} and still run{} there ({moved} moved in {secs:.1} s): {}",
        stayed.len(),
        if stayed.len() == 1 { "" } else { "s" },
        a.node,
        if stayed.len() == 1 { "s" } else { "" },
        stayed
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Move one job off `node`, trying another target if the chosen one
/// refuses. Prints the outcome's line as soon as it is known.
async fn move_one(
    ctx: &Ctx,
    planner: &Mutex<DrainPlanner>,
    node: &str,
    job: JobSnapshot,
    deadline: Option<Instant>,
) -> Outcome {
    let stay = |why: String| {
        println!(
            "could not move {}: {why}; it keeps running on {node}",
            job.id
        );
        Outcome::Stayed(why)
    };
    if let Err(s) = movable(&job) {
        return stay(s.describe(&job.id));
    }
    let mut last = String::new();
    for _ in 0..TARGET_TRIES {
        let remaining = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(r) if !r.is_zero() => Some(r),
                _ => return stay("the drain's --timeout passed before its move started".into()),
            },
            None => None,
        };
        let Some(to) = planner.lock().ok().and_then(|mut p| p.next_target(&job)) else {
            return stay(if last.is_empty() {
                "no other node can take it (every other node is down, blocked or short of memory)"
                    .into()
            } else {
                last
            });
        };
        let mut c = match ctx.agent(node).await {
            Ok(c) => c,
            Err(e) => return stay(format!("{e:#}")),
        };
        let mut req = tonic::Request::new(pb::MigrateRequest {
            job_id: job.id.clone(),
            target_node: to.clone(),
            migration_id: String::new(),
            mode: pb::MigrationMode::Auto as i32,
            only_here: false,
            force: false,
            leader_revision: 0,
        });
        if let Some(r) = remaining {
            req.set_timeout(r);
        }
        match c.migrate(req).await {
            Ok(r) => {
                let m = r.into_inner().migration.unwrap_or_default();
                println!(
                    "moved {} {} -> {}: frozen {} ms, total {} ms",
                    job.id, m.from_node, m.to_node, m.frozen_ms, m.total_ms
                );
                return Outcome::Moved;
            }
            Err(s) => {
                if let Ok(mut p) = planner.lock() {
                    p.undo(&to, &job);
                }
                let target_refused = matches!(s.code(), tonic::Code::Unavailable)
                    || (s.code() == tonic::Code::FailedPrecondition
                        && s.message().contains(&format!("{to} is blocked")));
                if s.code() == tonic::Code::DeadlineExceeded {
                    return stay(format!(
                        "its move to {to} was still under way at the drain's --timeout (the agent finishes it; see `mosctl show {}`)",
                        job.id
                    ));
                }
                let err = status_err(&format!("moving it to {to}"), s);
                if !target_refused {
                    return stay(format!("{err:#}"));
                }
                if let Ok(mut p) = planner.lock() {
                    p.exclude(&to);
                }
                last = format!("{err:#}");
            }
        }
    }
    stay(last)
}
