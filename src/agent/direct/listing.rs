//! Job listings without a shared path: each node's registry holds the jobs
//! that run on it, so `ListJobs`/`GetJob` gather every node's
//! `ListLocalJobs`, and a job seen twice during a hand-over is taken from
//! the newer record.

use crate::agent::{Agent, AgentError, AgentResult, JobList, Unlisted};
use crate::core::registry::RegistryError;
use crate::core::{JobId, JobRecord, NodeName};
use std::collections::BTreeMap;
use std::time::Duration;

/// Deadline of one node's ListLocalJobs when listing the cluster. A busy
/// node on a slow machine was seen to take over 2 s to answer; a node that
/// is down is seen at once (connection refused), not at the deadline. Under
/// the balancer's 5 s poll deadline (`balancer::service::DEFAULT_POLL_DEADLINE`),
/// so that a poll gets the listing with the silent node named in it, not
/// no answer at all.
const PEER_LIST_TIMEOUT: Duration = Duration::from_secs(4);

/// Of several nodes' records of the same jobs, keep one per job: the newest
/// (highest generation), and on a tie the one from the node the record says
/// the job is on. `lists` pairs each answering node with its records.
pub fn merge_records(lists: Vec<(NodeName, Vec<JobRecord>)>) -> Vec<JobRecord> {
    let mut best: BTreeMap<JobId, (u64, bool, JobRecord)> = BTreeMap::new();
    for (from, recs) in lists {
        for r in recs {
            let key = (r.generation, r.node == from);
            match best.get(&r.id) {
                Some((g, own, _)) if (*g, *own) >= key => {}
                _ => {
                    best.insert(r.id.clone(), (key.0, key.1, r));
                }
            }
        }
    }
    let mut out: Vec<JobRecord> = best.into_values().map(|(_, _, r)| r).collect();
    out.sort_by(|a, b| {
        a.created_unix_ms
            .cmp(&b.created_unix_ms)
            .then_with(|| a.id.cmp(&b.id))
    });
    out
}

impl Agent {
    /// This node's own jobs: records here whose node is this node (a copy
    /// pushed here is not ours until it is restored).
    pub(crate) fn list_local(
        &self,
        node: Option<NodeName>,
        include_finished: bool,
    ) -> AgentResult<Vec<JobRecord>> {
        if node.as_ref().is_some_and(|n| n != &self.cfg.node) {
            return Ok(vec![]);
        }
        self.list_jobs(Some(self.cfg.node.clone()), include_finished)
    }

    /// Every node's own jobs, merged. Nodes that do not answer are left out,
    /// as the balancer leaves out a down node, and named in the listing so
    /// that whoever reads it knows it may lack their jobs.
    pub(crate) async fn list_cluster(
        &self,
        node: Option<NodeName>,
        include_finished: bool,
    ) -> AgentResult<JobList> {
        let me = self.cfg.node.clone();
        let mut lists = vec![(me.clone(), self.list_local(None, include_finished)?)];
        let peers: Vec<NodeName> = self
            .peers
            .names()
            .iter()
            .filter_map(|n| NodeName::parse(n).ok())
            .filter(|n| n != &me && node.as_ref().is_none_or(|want| want == n))
            .collect();
        let asks = peers.iter().map(|p| async move {
            let r = tokio::time::timeout(
                PEER_LIST_TIMEOUT,
                self.peers.list_local_jobs(p, include_finished),
            )
            .await
            .unwrap_or_else(|_| Err(AgentError::Unavailable("no answer in time".into())));
            (p.clone(), r)
        });
        let mut unlisted = vec![];
        for (p, r) in futures::future::join_all(asks).await {
            match r {
                Ok(jobs) => lists.push((p, jobs)),
                Err(e) => {
                    tracing::warn!(node = %p, "its jobs are not listed: {e}");
                    unlisted.push(Unlisted {
                        node: p,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let jobs = merge_records(lists)
            .into_iter()
            .filter(|r| node.as_ref().is_none_or(|n| &r.node == n))
            .collect();
        Ok(JobList { jobs, unlisted })
    }

    /// A job by id, wherever it is.
    pub(crate) async fn get_job_cluster(&self, id: &JobId) -> AgentResult<JobRecord> {
        let here = match self.registry.get(id) {
            Ok(r) if r.node == self.cfg.node => return Ok(r),
            Ok(r) => Some(r),
            Err(RegistryError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let listed = self.list_cluster(None, true).await?;
        let mut found = listed.jobs.into_iter().find(|r| &r.id == id);
        // A record here that names another node (a copy in transit) only if
        // no node has the job as its own.
        if found.is_none() {
            found = here;
        }
        match found {
            Some(r) => Ok(r),
            // Not "no such job": it may be on a node that did not answer.
            None if !listed.unlisted.is_empty() => Err(AgentError::Unavailable(format!(
                "job {id} is not on any node that answered, and {} did not: {}",
                if listed.unlisted.len() == 1 {
                    "one node"
                } else {
                    "some nodes"
                },
                listed
                    .unlisted
                    .iter()
                    .map(|u| format!("{} ({})", u.node, u.reason))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            None => Err(AgentError::NotFound(format!("no job {id} in the cluster"))),
        }
    }

    /// Thaw needs the images, which stay on the node that froze the job.
    pub(crate) fn check_thaw_here(&self, job: &JobId) -> AgentResult<()> {
        match self.registry.get(job) {
            Ok(r) if r.node == self.cfg.node => Ok(()),
            _ => Err(AgentError::FailedPrecondition(format!(
                "job {job} was not frozen on {}: without a shared path its images stay on the node that froze it; thaw it there (`mosctl thaw {job}` without --node)",
                self.cfg.node
            ))),
        }
    }
}
