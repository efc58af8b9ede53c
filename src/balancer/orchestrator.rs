//! Carrying out a plan. Each move is one `Migrate` call to the source agent,
//! which runs the dump → restore → confirm → clean-up protocol itself (and
//! rolls back on failure), so a balancer that dies mid-plan leaves no move
//! half done: agents finish what they started. The orchestrator runs moves
//! concurrently (the policy already bounds migrations per node), reports
//! progress as each finishes, and collects failures by job.

use super::policy::{Move, Plan};
use crate::api::client::{self, ClientTls};
use crate::api::pb;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::BTreeMap;
use std::time::Duration;

/// One finished move.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub mv: Move,
    pub result: Result<pb::Migration, String>,
}

/// How a move is carried out; a trait so the orchestration can be tested
/// with a fake.
pub trait Migrator: Send + Sync {
    fn migrate<'a>(&'a self, mv: &'a Move) -> BoxFuture<'a, Result<pb::Migration, String>>;
}

/// Migrations over gRPC to the source agents.
pub struct GrpcMigrator {
    pub endpoints: BTreeMap<String, String>,
    pub tls: Option<ClientTls>,
    pub timeout: Duration,
    /// The leader's revision in etcd, sent with every move (agents refuse
    /// a stale leader's); 0 without etcd.
    pub leader_revision: i64,
}

impl Migrator for GrpcMigrator {
    fn migrate<'a>(&'a self, mv: &'a Move) -> BoxFuture<'a, Result<pb::Migration, String>> {
        Box::pin(async move {
            let ep = self
                .endpoints
                .get(&mv.from)
                .ok_or_else(|| format!("unknown node {}", mv.from))?;
            let mut c = client::agent(ep, self.tls.as_ref(), Duration::from_secs(3))
                .await
                .map_err(|e| format!("{} unreachable: {e:#}", mv.from))?;
            let mut req = tonic::Request::new(pb::MigrateRequest {
                job_id: mv.job_id.clone(),
                target_node: mv.to.clone(),
                migration_id: String::new(),
                // Post-copy where it is safe for the job: the agent falls
                // back to full copy for one that holds what a lazy restore
                // cannot take over, and says so in the migration record.
                mode: if mv.post_copy {
                    pb::MigrationMode::PostCopyIfSafe
                } else {
                    pb::MigrationMode::Auto
                } as i32,
                // The plan moves the job from where it saw it; if it has
                // moved since, the move is refused, not redirected.
                only_here: true,
                force: false,
                leader_revision: self.leader_revision,
            });
            req.set_timeout(self.timeout);
            c.migrate(req)
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
                .and_then(|r| {
                    r.into_inner()
                        .migration
                        .ok_or_else(|| "no migration record".into())
                })
        })
    }
}

/// Run every move of the plan; `progress` hears about each as it ends.
pub async fn execute(
    plan: &Plan,
    migrator: &dyn Migrator,
    max_parallel: usize,
    progress: &(dyn Fn(&Outcome, usize, usize) + Sync),
) -> Vec<Outcome> {
    let total = plan.moves.len();
    let mut pending = plan.moves.iter();
    let mut running = FuturesUnordered::new();
    let mut done = Vec::with_capacity(total);
    let start = |mv: &'_ Move| {
        let mv = mv.clone();
        async move {
            let result = migrator.migrate(&mv).await;
            Outcome { mv, result }
        }
    };
    for mv in pending.by_ref().take(max_parallel.max(1)) {
        running.push(start(mv));
    }
    while let Some(out) = running.next().await {
        progress(&out, done.len() + 1, total);
        done.push(out);
        if let Some(mv) = pending.next() {
            running.push(start(mv));
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::super::policy::MoveReason;
    use super::*;
    use std::sync::Mutex;

    struct Fake {
        fail: Vec<String>,
        calls: Mutex<Vec<String>>,
        in_flight: Mutex<(usize, usize)>,
    }

    impl Migrator for Fake {
        fn migrate<'a>(&'a self, mv: &'a Move) -> BoxFuture<'a, Result<pb::Migration, String>> {
            Box::pin(async move {
                {
                    let mut f = self.in_flight.lock().unwrap();
                    f.0 += 1;
                    f.1 = f.1.max(f.0);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.calls.lock().unwrap().push(mv.job_id.clone());
                self.in_flight.lock().unwrap().0 -= 1;
                if self.fail.contains(&mv.job_id) {
                    Err("injected".into())
                } else {
                    Ok(pb::Migration {
                        from_node: mv.from.clone(),
                        to_node: mv.to.clone(),
                        ok: true,
                        ..Default::default()
                    })
                }
            })
        }
    }

    fn mv(job: &str) -> Move {
        Move {
            job_id: job.into(),
            from: "a".into(),
            to: "b".into(),
            reason: MoveReason::LoadBalance,
            expected_gain: 1.0,
            estimated_cost_secs: 0.1,
            post_copy: false,
        }
    }

    #[tokio::test]
    async fn runs_every_move_bounded_and_reports_failures() {
        let plan = Plan {
            moves: (0..7).map(|i| mv(&format!("j{i}"))).collect(),
            imbalance_before: 2.0,
            imbalance_after: 1.0,
        };
        let fake = Fake {
            fail: vec!["j3".into()],
            calls: Mutex::new(vec![]),
            in_flight: Mutex::new((0, 0)),
        };
        let seen = Mutex::new(0usize);
        let out = execute(&plan, &fake, 3, &|_, i, n| {
            assert_eq!(n, 7);
            *seen.lock().unwrap() = i;
        })
        .await;
        assert_eq!(out.len(), 7);
        assert_eq!(*seen.lock().unwrap(), 7);
        assert_eq!(fake.calls.lock().unwrap().len(), 7);
        assert!(fake.in_flight.lock().unwrap().1 <= 3, "parallelism bounded");
        let failed: Vec<_> = out
            .iter()
            .filter(|o| o.result.is_err())
            .map(|o| o.mv.job_id.clone())
            .collect();
        assert_eq!(failed, vec!["j3".to_string()]);
    }

    #[tokio::test]
    async fn empty_plan_does_nothing() {
        let plan = Plan {
            moves: vec![],
            imbalance_before: 1.0,
            imbalance_after: 1.0,
        };
        let fake = Fake {
            fail: vec![],
            calls: Mutex::new(vec![]),
            in_flight: Mutex::new((0, 0)),
        };
        assert!(execute(&plan, &fake, 2, &|_, _, _| {}).await.is_empty());
        assert!(fake.calls.lock().unwrap().is_empty());
    }
}
