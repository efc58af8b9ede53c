//! What the leading balancer does when a node's lease has expired: restart
//! the node's checkpointed jobs elsewhere, from their latest checkpoints.
//!
//! By the time this runs the leader has waited out the node's fencing
//! margin (`coord::fencing::FenceTiming::takeover_delay`): a node that is
//! only cut off has killed its jobs itself by then, so a restart cannot
//! make a second copy. Each restore is fenced twice more on the target:
//! by the leader's revision (a leader that lost its leadership meanwhile is
//! refused) and by the job's owner record, moved from the lost node to the
//! target with one compare-and-set (two restarts of one job cannot both
//! win). The restart logic is [`plan`]'s, shared with
//! `mosctl restore --node-is-down`; jobs without a checkpoint are recorded
//! lost, and every outcome is logged.

pub mod grpc;
pub mod plan;

use super::leader::{NodeLost, NodeLostHook};
use crate::api::client::{self, ClientTls};
use crate::api::pb;
use crate::core::cluster_file::ClusterFile;
use crate::core::JobRecord;
use grpc::GrpcRestartOps;
use plan::{restart_node_jobs, Outcome};
use std::sync::Arc;
use std::time::Duration;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The hook `mos-balance serve` gives its leadership.
pub fn restart_from_checkpoints(cf: ClusterFile, tls: Option<ClientTls>) -> NodeLostHook {
    Arc::new(move |lost: NodeLost| {
        let (cf, tls) = (cf.clone(), tls.clone());
        Box::pin(async move {
            let node = lost.node.clone();
            if cf.shared_root.is_none() {
                tracing::warn!(%node, "node LOST: its jobs are not restarted (no shared path, so no checkpoints)");
                return true;
            }
            let jobs = match jobs_on(&cf, tls.as_ref(), &node).await {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(%node, "node LOST: cannot list its jobs, none restarted yet: {e}");
                    return false;
                }
            };
            let view = super::view::poll(
                &cf,
                tls.as_ref(),
                crate::balancer::service::DEFAULT_POLL_DEADLINE,
            )
            .await;
            let ops = GrpcRestartOps {
                cf,
                tls,
                leader_revision: lost.leader_revision,
            };
            let out = restart_node_jobs(&ops, view.snapshot(0.0), &node, &jobs).await;
            if out.is_empty() {
                tracing::info!(%node, "node LOST: no job is recorded running on it");
            }
            let mut settled = true;
            for o in &out {
                match o {
                    Outcome::Restarted { .. } => tracing::warn!(%node, "node LOST: {}", o.line()),
                    Outcome::Failed { .. } => {
                        settled = false;
                        tracing::error!(%node, "node LOST: {} (tried again in {:?})", o.line(), super::leader::RETRY_EVERY)
                    }
                    _ => tracing::error!(%node, "node LOST: {}", o.line()),
                }
            }
            settled
        })
    })
}

/// The jobs recorded on `node`, from the first other agent that answers
/// (every agent reads the same registry).
async fn jobs_on(
    cf: &ClusterFile,
    tls: Option<&ClientTls>,
    node: &str,
) -> Result<Vec<JobRecord>, String> {
    let mut last = String::from("no other node in the cluster file");
    for n in cf.nodes.iter().filter(|n| n.name.as_str() != node) {
        let mut c = match client::pooled_agent(&n.endpoint, tls, CALL_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{}: {e:#}", n.name);
                continue;
            }
        };
        let mut req = tonic::Request::new(pb::ListJobsRequest {
            node: node.to_string(),
            include_finished: false,
        });
        req.set_timeout(CALL_TIMEOUT);
        match c.list_jobs(req).await {
            Ok(r) => {
                return r
                    .into_inner()
                    .jobs
                    .into_iter()
                    .map(|j| JobRecord::try_from(j).map_err(|e| e.to_string()))
                    .collect()
            }
            Err(s) => last = format!("{}: {}", n.name, s.message()),
        }
    }
    Err(last)
}
