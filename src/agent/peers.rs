//! How an agent reaches other agents during a migration. A trait, so the
//! protocol can be unit-tested with in-process fakes; [`GrpcPeers`] is the
//! real one over tonic.

use super::migration::RestoreCall;
use super::{AgentError, AgentResult};
use crate::api::client::{self, ClientTls};
use crate::core::{JobRecord, NodeName};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::time::Duration;

pub trait Peers: Send + Sync + 'static {
    /// Whether `node` is part of the cluster.
    fn knows(&self, node: &NodeName) -> bool;
    /// Names of every node, for error messages.
    fn names(&self) -> Vec<String>;
    /// Cheap liveness check before the job is frozen; answers whether the
    /// node can take a post-copy migration (userfaultfd).
    fn ping<'a>(&'a self, node: &'a NodeName) -> BoxFuture<'a, AgentResult<bool>>;
    /// Ask `node` to restore from images.
    fn restore<'a>(
        &'a self,
        node: &'a NodeName,
        call: RestoreCall,
    ) -> BoxFuture<'a, AgentResult<JobRecord>>;
}

/// Peers over gRPC, from the cluster file's node list.
pub struct GrpcPeers {
    endpoints: BTreeMap<NodeName, String>,
    tls: Option<ClientTls>,
    pub ping_timeout: Duration,
    pub restore_timeout: Duration,
}

impl GrpcPeers {
    pub fn new(endpoints: BTreeMap<NodeName, String>, tls: Option<ClientTls>) -> Self {
        Self {
            endpoints,
            tls,
            ping_timeout: Duration::from_secs(3),
            restore_timeout: Duration::from_secs(300),
        }
    }

    async fn get_load(&self, node: &NodeName, ep: &str) -> AgentResult<bool> {
        let mut c = client::pooled_agent(ep, self.tls.as_ref(), self.ping_timeout)
            .await
            .map_err(|e| AgentError::Unavailable(format!("{node} unreachable: {e:#}")))?;
        let mut req = tonic::Request::new(crate::api::pb::GetLoadRequest {});
        req.set_timeout(self.ping_timeout);
        let load = c.get_load(req).await.map_err(|s| {
            AgentError::Unavailable(format!("{node} unreachable: {}", s.message()))
        })?;
        Ok(load.into_inner().supports_post_copy)
    }

    fn endpoint(&self, node: &NodeName) -> AgentResult<&str> {
        self.endpoints
            .get(node)
            .map(String::as_str)
            .ok_or_else(|| AgentError::NotFound(format!("unknown node {node}")))
    }
}

impl Peers for GrpcPeers {
    fn knows(&self, node: &NodeName) -> bool {
        self.endpoints.contains_key(node)
    }

    fn names(&self) -> Vec<String> {
        self.endpoints.keys().map(|n| n.to_string()).collect()
    }

    fn ping<'a>(&'a self, node: &'a NodeName) -> BoxFuture<'a, AgentResult<bool>> {
        Box::pin(async move {
            let ep = self.endpoint(node)?;
            // Over the pooled channel (a TLS handshake saved on every
            // migration); a stale one (the peer restarted) fails once, so
            // connect afresh and ask again: GetLoad has no side effects.
            match self.get_load(node, ep).await {
                Ok(l) => Ok(l),
                Err(_) => {
                    client::forget(ep);
                    self.get_load(node, ep).await
                }
            }
        })
    }

    fn restore<'a>(
        &'a self,
        node: &'a NodeName,
        call: RestoreCall,
    ) -> BoxFuture<'a, AgentResult<JobRecord>> {
        Box::pin(async move {
            let ep = self.endpoint(node)?;
            // The channel the ping just used. Should it fail anyway, the
            // migration rolls back (Restore is idempotent on the target).
            let mut c = client::pooled_agent(ep, self.tls.as_ref(), self.ping_timeout)
                .await
                .map_err(|e| AgentError::Unavailable(format!("{node} unreachable: {e:#}")))?;
            let mut req = tonic::Request::new(crate::api::pb::RestoreRequest::from(&call));
            req.set_timeout(self.restore_timeout);
            let job = c
                .restore(req)
                .await
                .map_err(crate::api::convert::status_to_agent_error)?
                .into_inner();
            JobRecord::try_from(job).map_err(|e| AgentError::Internal(e.to_string()))
        })
    }
}
