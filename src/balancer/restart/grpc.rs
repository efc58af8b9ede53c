//! [`RestartOps`] over gRPC: how `mosctl restore --node-is-down` and the
//! balancer's leader (after a node's lease expired) ask a node to restore
//! a job from its latest checkpoint. The restart logic itself is
//! transport-free ([`super::plan`]); this is only the call.

use super::plan::{RestartOps, RestoreFailure, Restored};
use crate::api::client::{self, status_text, ClientTls};
use crate::api::pb;
use crate::core::cluster_file::ClusterFile;
use futures::future::BoxFuture;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct GrpcRestartOps {
    pub cf: ClusterFile,
    pub tls: Option<ClientTls>,
    /// The balancer leader's revision the restores are fenced by (0 = an
    /// operator's command, not fenced by leadership).
    pub leader_revision: i64,
}

fn failure(s: tonic::Status) -> RestoreFailure {
    use tonic::Code;
    RestoreFailure {
        message: status_text(&s),
        // The node is the problem (blocked, unreachable, full): another may do.
        try_elsewhere: matches!(
            s.code(),
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
        ) || (s.code() == Code::FailedPrecondition
            && s.message().contains("blocked")),
    }
}

impl RestartOps for GrpcRestartOps {
    fn restore_on<'a>(
        &'a self,
        node: &'a str,
        job: &'a str,
        down: &'a str,
    ) -> BoxFuture<'a, Result<Restored, RestoreFailure>> {
        Box::pin(async move {
            let unreachable = |message: String| RestoreFailure {
                message,
                try_elsewhere: true,
            };
            let n = self.cf.node(node).map_err(|e| unreachable(e.to_string()))?;
            let mut c = client::pooled_agent(&n.endpoint, self.tls.as_ref(), CONNECT_TIMEOUT)
                .await
                .map_err(|e| {
                    unreachable(format!(
                        "node {node} ({}) is unreachable: {e:#}",
                        n.endpoint
                    ))
                })?;
            let r = c
                .restore_checkpoint(pb::RestoreCheckpointRequest {
                    job_id: job.to_string(),
                    seq: 0,
                    node_is_down: down.to_string(),
                    leader_revision: self.leader_revision,
                })
                .await
                .map_err(failure)?
                .into_inner();
            if r.lost {
                Ok(Restored::Lost {
                    why: r.job.map(|j| j.error).unwrap_or_default(),
                })
            } else {
                Ok(Restored::Running { seq: r.seq })
            }
        })
    }
}
