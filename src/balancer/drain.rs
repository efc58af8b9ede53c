//! Draining a node (MOSIX "expel", `kubectl drain`): which of its jobs can
//! move, and where each one goes.
//!
//! Pure, like [`super::policy`]: `mosctl drain` polls the cluster once,
//! blocks the node, then asks [`DrainPlanner::next_target`] for a target per
//! job as it starts each move. Every choice is counted against its target at
//! once (load and memory), so jobs started together spread over the cluster
//! instead of all landing on the node that looked emptiest in the one
//! sample, the same reason placement reserves slots before load samples show
//! them.

use super::policy::{place, ClusterSnapshot, JobSnapshot, PolicyConfig};

/// Why a job of the drained node stays where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stays {
    /// Pinned (MOSIX "stay"): never moved until unpinned.
    Pinned,
    /// Started with `mosrun --no-migrate`: never moved at all.
    NonMigratable,
}

impl Stays {
    /// The reason as `mosctl drain` prints it.
    pub fn describe(&self, job: &str) -> String {
        match self {
            Stays::Pinned => crate::agent::admin::pinned_message(job),
            Stays::NonMigratable => {
                format!("job {job} is non-migratable (started with mosrun --no-migrate)")
            }
        }
    }
}

/// Whether a running job of the drained node can be moved.
pub fn movable(job: &JobSnapshot) -> Result<(), Stays> {
    if !job.migratable {
        Err(Stays::NonMigratable)
    } else if job.pinned {
        Err(Stays::Pinned)
    } else {
        Ok(())
    }
}

/// Target choice for one drain, on a private copy of the snapshot.
pub struct DrainPlanner {
    snapshot: ClusterSnapshot,
    config: PolicyConfig,
}

impl DrainPlanner {
    /// `node` is the node being drained: never a target, whatever the
    /// snapshot says (it may predate the block).
    pub fn new(mut snapshot: ClusterSnapshot, node: &str) -> Self {
        for n in snapshot.nodes.iter_mut().filter(|n| n.name == node) {
            n.blocked = true;
        }
        Self {
            snapshot,
            config: PolicyConfig::default(),
        }
    }

    /// The best node for `job` now (up, not blocked, memory for it with the
    /// policy's reserve, lowest load per capacity after the move), counted
    /// against that node before the next call. None: no node can take it.
    pub fn next_target(&mut self, job: &JobSnapshot) -> Option<String> {
        // A job that has not been sampled yet is counted as one busy core,
        // as the balancer's view does.
        let demand = if job.cpu_demand.is_finite() && job.cpu_demand > 0.0 {
            job.cpu_demand
        } else {
            1.0
        };
        let to = if job.own_address {
            // Only a node that can give it its own address may take it.
            let mut s = self.snapshot.clone();
            for n in s.nodes.iter_mut().filter(|n| !n.job_addresses) {
                n.blocked = true;
            }
            place(&s, &self.config, job.rss_bytes, demand)?
        } else {
            place(&self.snapshot, &self.config, job.rss_bytes, demand)?
        };
        if let Some(n) = self.snapshot.nodes.iter_mut().find(|n| n.name == to) {
            n.load += demand;
            n.mem_available_bytes = n.mem_available_bytes.saturating_sub(job.rss_bytes);
        }
        Some(to)
    }

    /// A move to `node` failed: give back what [`next_target`] counted.
    ///
    /// [`next_target`]: Self::next_target
    pub fn undo(&mut self, node: &str, job: &JobSnapshot) {
        let demand = if job.cpu_demand.is_finite() && job.cpu_demand > 0.0 {
            job.cpu_demand
        } else {
            1.0
        };
        if let Some(n) = self.snapshot.nodes.iter_mut().find(|n| n.name == node) {
            n.load = (n.load - demand).max(0.0);
            n.mem_available_bytes = n.mem_available_bytes.saturating_add(job.rss_bytes);
        }
    }

    /// Never offer `node` again in this drain (it refused a job: blocked
    /// since the snapshot, or gone).
    pub fn exclude(&mut self, node: &str) {
        for n in self.snapshot.nodes.iter_mut().filter(|n| n.name == node) {
            n.blocked = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::policy::tests::node;
    use crate::balancer::policy::NodeSnapshot;

    fn job(id: &str) -> JobSnapshot {
        JobSnapshot {
            id: id.into(),
            node: "a".into(),
            rss_bytes: 1 << 20,
            cpu_demand: 1.0,
            residence_secs: 0.0,
            pinned: false,
            migratable: true,
            post_copy_failed: false,
            own_address: false,
        }
    }

    #[test]
    fn jobs_spread_by_capacity_and_skip_the_drained_and_blocked_nodes() {
        let snap = ClusterSnapshot {
            nodes: vec![
                // The drained node looks idle in a sample taken before the
                // block: still never a target.
                node("a", 8.0, 0.0),
                node("b", 1.0, 0.0),
                node("c", 2.0, 0.0),
                NodeSnapshot {
                    blocked: true,
                    ..node("d", 8.0, 0.0)
                },
            ],
            jobs: vec![],
            bandwidth_bytes_per_sec: 0.0,
        };
        let mut p = DrainPlanner::new(snap, "a");
        let got: Vec<String> = (0..6)
            .map(|i| p.next_target(&job(&format!("j{i}"))).unwrap())
            .collect();
        let on = |n: &str| got.iter().filter(|t| *t == n).count();
        assert_eq!((on("b"), on("c")), (2, 4), "{got:?}");
        // A refusing node is dropped; its reservation given back.
        p.undo("c", &job("j5"));
        p.exclude("c");
        assert_eq!(p.next_target(&job("j6")).as_deref(), Some("b"));
        p.exclude("b");
        assert_eq!(p.next_target(&job("j7")), None);
    }

    #[test]
    fn pinned_and_non_migratable_jobs_stay_with_a_reason() {
        let mut j = job("j1");
        assert_eq!(movable(&j), Ok(()));
        j.pinned = true;
        assert_eq!(movable(&j), Err(Stays::Pinned));
        assert!(Stays::Pinned.describe("j1").contains("mosctl unpin j1"));
        j.migratable = false;
        assert_eq!(movable(&j), Err(Stays::NonMigratable));
    }
}
