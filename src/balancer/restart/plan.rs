//! Restart every job of a node that is down from its latest checkpoint:
//! the operator-fenced path (`mosctl restore --node-is-down NODE`), and
//! what the balancer will call once node leases tell it a node is gone.
//!
//! Transport-free: the caller lists the jobs, gives the cluster's
//! snapshot for placement, and says how to ask a node to restore a job
//! ([`RestartOps`]). Targets come from the drain planner (the policy's
//! `place` rule, each choice counted against its node at once), so the
//! jobs of one dead node spread over the others; a target that refuses
//! (blocked, unreachable, full) is dropped and the job tried elsewhere.

use crate::balancer::drain::DrainPlanner;
use crate::balancer::policy::{ClusterSnapshot, JobSnapshot};
use crate::core::{JobRecord, JobState};
use futures::future::BoxFuture;

/// What a node answered when asked to restore a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Restored {
    /// Running again on the node, from checkpoint `seq`.
    Running { seq: u64 },
    /// It had no checkpoint: recorded lost.
    Lost { why: String },
}

/// A refusal or failure of one restore call.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreFailure {
    pub message: String,
    /// The node itself is the problem (blocked, unreachable, out of
    /// memory or disk): another node may do.
    pub try_elsewhere: bool,
}

pub trait RestartOps: Send + Sync {
    /// Ask `node` to restore `job` from its latest checkpoint, asserting
    /// that `down` (the node the job is recorded on) is off.
    fn restore_on<'a>(
        &'a self,
        node: &'a str,
        job: &'a str,
        down: &'a str,
    ) -> BoxFuture<'a, Result<Restored, RestoreFailure>>;
}

/// What happened to one job of the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Restarted {
        job: String,
        node: String,
        seq: u64,
    },
    Lost {
        job: String,
        why: String,
    },
    /// Could not be restored now (every target refused, the checkpoint was
    /// refused, ...); the job's record is unchanged.
    Failed {
        job: String,
        error: String,
    },
    /// Not a job to restart (frozen on disk: it is not lost; thaw it).
    Skipped {
        job: String,
        why: String,
    },
}

impl Outcome {
    pub fn line(&self) -> String {
        match self {
            Outcome::Restarted { job, node, seq } => {
                format!("{job}: restarted on {node} from checkpoint {seq}")
            }
            Outcome::Lost { job, why } => format!("{job}: LOST ({why})"),
            Outcome::Failed { job, error } => format!("{job}: NOT restarted: {error}"),
            Outcome::Skipped { job, why } => format!("{job}: skipped: {why}"),
        }
    }
}

/// How placement sees a job whose node is down, so that no load sample
/// shows it: one CPU's demand, its memory unknown.
pub fn unseen_job(id: &str, node: &str) -> JobSnapshot {
    JobSnapshot {
        id: id.to_string(),
        node: node.to_string(),
        rss_bytes: 0,
        cpu_demand: 1.0,
        residence_secs: 0.0,
        pinned: false,
        migratable: true,
        post_copy_failed: false,
        own_address: false,
    }
}

/// Tries per job before giving up on it.
const TRIES: usize = 3;

/// Restart the jobs of `down` among `jobs` (any list of records; those not
/// on `down`, or finished, are ignored).
pub async fn restart_node_jobs(
    ops: &dyn RestartOps,
    snapshot: ClusterSnapshot,
    down: &str,
    jobs: &[JobRecord],
) -> Vec<Outcome> {
    let mut planner = DrainPlanner::new(snapshot.clone(), down);
    planner.exclude(down);
    let mut out = Vec::new();
    for rec in jobs.iter().filter(|r| r.node.as_str() == down) {
        let job = rec.id.to_string();
        match rec.state {
            JobState::Running | JobState::Migrating => {}
            JobState::Frozen => {
                out.push(Outcome::Skipped {
                    job: job.clone(),
                    why: format!(
                        "frozen on disk, not lost: `mosctl thaw {job} --node NODE` brings it back"
                    ),
                });
                continue;
            }
            JobState::Exited | JobState::Failed => continue,
        }
        let snap = snapshot
            .jobs
            .iter()
            .find(|j| j.id == job)
            .cloned()
            .unwrap_or_else(|| unseen_job(&job, down));
        let mut last = String::from("no node is up with room for it");
        let mut outcome = None;
        for _ in 0..TRIES {
            let Some(target) = planner.next_target(&snap) else {
                break;
            };
            match ops.restore_on(&target, &job, down).await {
                Ok(Restored::Running { seq }) => {
                    outcome = Some(Outcome::Restarted {
                        job: job.clone(),
                        node: target,
                        seq,
                    });
                    break;
                }
                Ok(Restored::Lost { why }) => {
                    planner.undo(&target, &snap);
                    outcome = Some(Outcome::Lost {
                        job: job.clone(),
                        why,
                    });
                    break;
                }
                Err(f) => {
                    planner.undo(&target, &snap);
                    last = format!("{target}: {}", f.message);
                    if !f.try_elsewhere {
                        break;
                    }
                    planner.exclude(&target);
                }
            }
        }
        out.push(outcome.unwrap_or(Outcome::Failed { job, error: last }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::policy::NodeSnapshot;
    use crate::core::{JobId, NodeName};
    use std::sync::Mutex;

    struct Fake {
        calls: Mutex<Vec<(String, String)>>,
    }

    impl RestartOps for Fake {
        fn restore_on<'a>(
            &'a self,
            node: &'a str,
            job: &'a str,
            _down: &'a str,
        ) -> BoxFuture<'a, Result<Restored, RestoreFailure>> {
            self.calls
                .lock()
                .unwrap()
                .push((node.to_string(), job.to_string()));
            Box::pin(async move {
                match (node, job) {
                    ("node2", _) => Err(RestoreFailure {
                        message: "node2 is blocked".into(),
                        try_elsewhere: true,
                    }),
                    (_, "nock") => Ok(Restored::Lost {
                        why: "no checkpoint".into(),
                    }),
                    (_, "bad") => Err(RestoreFailure {
                        message: "images refused".into(),
                        try_elsewhere: false,
                    }),
                    _ => Ok(Restored::Running { seq: 4 }),
                }
            })
        }
    }

    fn node(name: &str, load: f64) -> NodeSnapshot {
        NodeSnapshot {
            name: name.into(),
            up: true,
            capacity: 1.0,
            load,
            mem_total_bytes: 8 << 30,
            mem_available_bytes: 8 << 30,
            migrations_in_flight: 0,
            blocked: false,
            job_addresses: true,
        }
    }

    fn rec(id: &str, node: &str, state: JobState) -> JobRecord {
        let mut r: JobRecord = serde_json::from_value(serde_json::json!({
            "id": id, "node": node, "state": "running", "pid": 1, "argv": ["x"],
            "cwd": "/", "uid": 0, "gid": 0, "stdout_path": "", "stderr_path": "",
            "created_unix_ms": 1, "arrived_unix_ms": 1
        }))
        .unwrap();
        r.id = JobId::parse(id).unwrap();
        r.node = NodeName::parse(node).unwrap();
        r.state = state;
        r
    }

    #[tokio::test]
    async fn every_job_of_the_node_is_restarted_lost_or_reported() {
        let snap = ClusterSnapshot {
            nodes: vec![node("node1", 0.0), node("node2", 0.0), node("node3", 0.5)],
            jobs: vec![],
            bandwidth_bytes_per_sec: 0.0,
        };
        let jobs = vec![
            rec("ok", "node1", JobState::Running),
            rec("nock", "node1", JobState::Running),
            rec("bad", "node1", JobState::Running),
            rec("frz", "node1", JobState::Frozen),
            rec("done", "node1", JobState::Exited),
            rec("other", "node3", JobState::Running),
        ];
        let f = Fake {
            calls: Mutex::new(vec![]),
        };
        let out = restart_node_jobs(&f, snap, "node1", &jobs).await;
        assert_eq!(
            out[0],
            Outcome::Restarted {
                job: "ok".into(),
                node: "node3".into(),
                seq: 4
            }
        );
        assert!(matches!(&out[1], Outcome::Lost { job, .. } if job == "nock"));
        assert!(
            matches!(&out[2], Outcome::Failed { job, error } if job == "bad" && error.contains("images refused"))
        );
        assert!(matches!(&out[3], Outcome::Skipped { job, .. } if job == "frz"));
        assert_eq!(out.len(), 4);
        let calls = f.calls.lock().unwrap();
        // node1 (down) is never asked; node2 refused once and was dropped.
        assert!(calls.iter().all(|(n, _)| n != "node1"), "{calls:?}");
        assert_eq!(calls.iter().filter(|(n, _)| n == "node2").count(), 1);
    }
}
