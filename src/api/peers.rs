//! [`Peers`] over gRPC: how a real agent reaches the others, from the
//! cluster file's node list. The agent's protocol code sees only the trait
//! (`agent::peers`), so that it has no transport types in it.

use crate::agent::direct::{PushPart, PushSummary, Resolution};
use crate::agent::migration::RestoreCall;
use crate::agent::peers::{ExecStream, Peers, TargetInfo, POST_COPY_RESTORE_CALL};
use crate::agent::{AgentError, AgentResult};
use crate::api::client::{self, ClientTls};
use crate::core::{JobId, JobRecord, MigrationId, MigrationRecord, NodeName};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::time::Duration;

/// Peers over gRPC, from the cluster file's node list.
pub struct GrpcPeers {
    endpoints: BTreeMap<NodeName, String>,
    tls: Option<ClientTls>,
    pub ping_timeout: Duration,
    pub restore_timeout: Duration,
    /// Deadline of a whole image push (the server's own limit is 600 s).
    pub push_timeout: Duration,
    /// Deadline of a Migrate passed on to the job's node: a whole migration,
    /// pre-copy rounds included.
    pub migrate_timeout: Duration,
}

impl GrpcPeers {
    pub fn new(endpoints: BTreeMap<NodeName, String>, tls: Option<ClientTls>) -> Self {
        Self {
            endpoints,
            tls,
            ping_timeout: Duration::from_secs(3),
            restore_timeout: Duration::from_secs(300),
            push_timeout: Duration::from_secs(590),
            migrate_timeout: Duration::from_secs(3600),
        }
    }

    async fn client(
        &self,
        node: &NodeName,
    ) -> AgentResult<(
        &str,
        crate::api::pb::agent_client::AgentClient<tonic::transport::Channel>,
    )> {
        let ep = self.endpoint(node)?;
        let c = client::pooled_agent(ep, self.tls.as_ref(), self.ping_timeout)
            .await
            .map_err(|e| AgentError::Unavailable(format!("{node} unreachable: {e:#}")))?;
        Ok((ep, c))
    }

    async fn get_load(&self, node: &NodeName, ep: &str) -> AgentResult<TargetInfo> {
        let mut c = client::pooled_agent(ep, self.tls.as_ref(), self.ping_timeout)
            .await
            .map_err(|e| AgentError::Unavailable(format!("{node} unreachable: {e:#}")))?;
        let mut req = tonic::Request::new(crate::api::pb::GetLoadRequest {});
        req.set_timeout(self.ping_timeout);
        let load = c
            .get_load(req)
            .await
            .map_err(|s| AgentError::Unavailable(format!("{node} unreachable: {}", s.message())))?
            .into_inner();
        // A blocked node takes no migration: say so before anything is
        // frozen (its Restore would refuse it anyway).
        if load.blocked {
            return Err(AgentError::FailedPrecondition(
                crate::agent::admin::blocked_message(node.as_str()),
            ));
        }
        Ok(TargetInfo {
            post_copy: load.supports_post_copy,
            job_addresses: load.job_addresses,
        })
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

    fn ping<'a>(&'a self, node: &'a NodeName) -> BoxFuture<'a, AgentResult<TargetInfo>> {
        Box::pin(async move {
            let ep = self.endpoint(node)?;
            // Over the pooled channel (a TLS handshake saved on every
            // migration); a stale one (the peer restarted) fails once, so
            // connect afresh and ask again: GetLoad has no side effects.
            match self.get_load(node, ep).await {
                Ok(l) => Ok(l),
                Err(e @ AgentError::FailedPrecondition(_)) => Err(e),
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
            let lazy = call.page_server.is_some();
            let mut req = tonic::Request::new(crate::api::pb::RestoreRequest::from(&call));
            // A post-copy restore reads no memory and the target bounds it
            // to seconds; meanwhile the job is frozen here, so a target that
            // hangs is given up on sooner (see ARCHITECTURE.md, "Bounds on
            // CRIU").
            req.set_timeout(if lazy {
                self.restore_timeout.min(POST_COPY_RESTORE_CALL)
            } else {
                self.restore_timeout
            });
            let job = c
                .restore(req)
                .await
                .map_err(crate::api::convert::status_to_agent_error)?
                .into_inner();
            JobRecord::try_from(job).map_err(|e| AgentError::Internal(e.to_string()))
        })
    }

    fn migrate_there<'a>(
        &'a self,
        node: &'a NodeName,
        job: &'a JobId,
        target: &'a NodeName,
        mig: Option<MigrationId>,
        mode: crate::agent::migration::Mode,
    ) -> BoxFuture<'a, AgentResult<(JobRecord, MigrationRecord)>> {
        Box::pin(async move {
            let (_, mut c) = self.client(node).await?;
            let mut req = tonic::Request::new(crate::api::pb::MigrateRequest {
                job_id: job.to_string(),
                target_node: target.to_string(),
                migration_id: mig.map(|m| m.to_string()).unwrap_or_default(),
                mode: crate::api::pb::MigrationMode::from(mode) as i32,
                only_here: true,
                force: crate::api::convert::mode_forced(mode),
                leader_revision: 0,
            });
            req.set_timeout(self.migrate_timeout);
            // The owner's answer, refusals included, is the caller's answer.
            let r = c
                .migrate(req)
                .await
                .map_err(crate::api::convert::status_to_agent_error)?
                .into_inner();
            let bad = |e: String| AgentError::Internal(format!("{node} answered Migrate with {e}"));
            let rec = JobRecord::try_from(r.job.ok_or_else(|| bad("no job".into()))?)
                .map_err(|e| bad(e.to_string()))?;
            let m = MigrationRecord::try_from(
                r.migration
                    .ok_or_else(|| bad("no migration record".into()))?,
            )
            .map_err(|e| bad(e.to_string()))?;
            Ok((rec, m))
        })
    }

    fn list_local_jobs<'a>(
        &'a self,
        node: &'a NodeName,
        include_finished: bool,
    ) -> BoxFuture<'a, AgentResult<Vec<JobRecord>>> {
        Box::pin(async move {
            let (ep, mut c) = self.client(node).await?;
            let mut req = tonic::Request::new(crate::api::pb::ListJobsRequest {
                node: String::new(),
                include_finished,
            });
            req.set_timeout(self.ping_timeout);
            let jobs = match c.list_local_jobs(req).await {
                Ok(r) => r.into_inner().jobs,
                Err(s) => {
                    client::forget(ep);
                    return Err(crate::api::convert::status_to_agent_error(s));
                }
            };
            jobs.into_iter()
                .map(|j| JobRecord::try_from(j).map_err(|e| AgentError::Internal(e.to_string())))
                .collect()
        })
    }

    fn push_images<'a>(
        &'a self,
        node: &'a NodeName,
        parts: tokio::sync::mpsc::Receiver<PushPart>,
    ) -> BoxFuture<'a, AgentResult<PushSummary>> {
        Box::pin(async move {
            use tokio_stream::StreamExt;
            let (ep, mut c) = self.client(node).await?;
            let stream = tokio_stream::wrappers::ReceiverStream::new(parts)
                .map(crate::api::pb::ImageChunk::from);
            let mut req = tonic::Request::new(stream);
            req.set_timeout(self.push_timeout);
            let sent = c.push_images(req).await;
            match sent {
                Ok(r) => Ok(r.into_inner().into()),
                Err(s) => {
                    client::forget(ep);
                    use tonic::Code;
                    Err(match s.code() {
                        // Not an answer of the target's: the stream broke.
                        Code::Unknown
                        | Code::Unavailable
                        | Code::Cancelled
                        | Code::DeadlineExceeded => AgentError::Unavailable(format!(
                            "the connection to {node} broke during the transfer ({:?}: {})",
                            s.code(),
                            s.message()
                        )),
                        _ => crate::api::convert::status_to_agent_error(s),
                    })
                }
            }
        })
    }

    fn stream_pages<'a>(
        &'a self,
        node: &'a NodeName,
        open: crate::agent::direct::stream::PageStreamOpen,
        data: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> BoxFuture<'a, AgentResult<crate::agent::direct::stream::PageOutStream>> {
        use crate::agent::direct::stream::{PageStreamIn, PageStreamOut};
        use futures::StreamExt;
        Box::pin(async move {
            let first = crate::api::pb::PageStreamIn::from(PageStreamIn::Open(open));
            let rest = tokio_stream::wrappers::ReceiverStream::new(data)
                .map(|b| crate::api::pb::PageStreamIn::from(PageStreamIn::Data(b)));
            let reqs = futures::stream::iter([first]).chain(rest);
            let (ep, mut c) = self.client(node).await?;
            let resp = match c.stream_pages(reqs).await {
                Ok(r) => r,
                Err(s) => {
                    use tonic::Code;
                    if matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ) {
                        client::forget(ep);
                    }
                    return Err(crate::api::convert::status_to_agent_error(s));
                }
            };
            let node = node.clone();
            Ok(resp
                .into_inner()
                .map(move |m| match m {
                    Ok(o) => PageStreamOut::try_from(o)
                        .map_err(|e| AgentError::Internal(format!("from {node}: {e}"))),
                    Err(s) => Err(crate::api::convert::status_to_agent_error(s)),
                })
                .boxed())
        })
    }

    fn resolve_migration<'a>(
        &'a self,
        node: &'a NodeName,
        job: &'a JobId,
        mig: &'a MigrationId,
    ) -> BoxFuture<'a, AgentResult<Resolution>> {
        Box::pin(async move {
            let (ep, mut c) = self.client(node).await?;
            let mut req = tonic::Request::new(crate::api::pb::ResolveMigrationRequest {
                job_id: job.to_string(),
                migration_id: mig.to_string(),
            });
            req.set_timeout(self.ping_timeout * 3);
            match c.resolve_migration(req).await {
                Ok(r) => Resolution::try_from(r.into_inner())
                    .map_err(|e| AgentError::Internal(e.to_string())),
                Err(s) => {
                    // A restarted peer: connect afresh next time.
                    client::forget(ep);
                    Err(crate::api::convert::status_to_agent_error(s))
                }
            }
        })
    }
    fn exec<'a>(
        &'a self,
        node: &'a NodeName,
        start: crate::agent::exec::ExecStart,
        input: tokio::sync::mpsc::Receiver<crate::agent::exec::ExecIn>,
    ) -> BoxFuture<'a, AgentResult<ExecStream>> {
        use futures::StreamExt;
        Box::pin(async move {
            let first = crate::api::pb::ExecInput::from(&start);
            let rest = tokio_stream::wrappers::ReceiverStream::new(input)
                .map(|m| crate::api::pb::ExecInput::from(&m));
            let reqs = futures::stream::iter([first]).chain(rest);
            let (ep, mut c) = self.client(node).await?;
            let resp = match c.exec(reqs).await {
                Ok(r) => r,
                Err(s) => {
                    // A stale pooled channel (the peer restarted): the next
                    // call connects afresh; the caller places the job again.
                    client::forget(ep);
                    return Err(AgentError::Unavailable(format!(
                        "{node} unreachable: {}",
                        s.message()
                    )));
                }
            };
            let node = node.clone();
            Ok(resp
                .into_inner()
                .map(move |m| match m {
                    Ok(o) => crate::agent::exec::ExecOut::try_from(o)
                        .map_err(|e| AgentError::Internal(format!("from {node}: {e}"))),
                    Err(s) => Err(AgentError::Unavailable(s.message().to_string())),
                })
                .boxed())
        })
    }

    fn slots<'a>(
        &'a self,
        node: &'a NodeName,
        timeout: Duration,
    ) -> BoxFuture<'a, AgentResult<crate::agent::exec::NodeSlots>> {
        Box::pin(async move {
            let (ep, mut c) = self.client(node).await?;
            let mut req = tonic::Request::new(crate::api::pb::GetSlotsRequest {});
            req.set_timeout(timeout);
            match c.get_slots(req).await {
                Ok(r) => Ok(crate::agent::exec::NodeSlots::from(r.into_inner())),
                Err(s) => {
                    client::forget(ep);
                    Err(AgentError::Unavailable(format!(
                        "{node} unreachable: {}",
                        s.message()
                    )))
                }
            }
        })
    }

    fn signal_there<'a>(
        &'a self,
        node: &'a NodeName,
        job: &'a JobId,
        sig: i32,
    ) -> BoxFuture<'a, AgentResult<()>> {
        Box::pin(async move {
            let (_, mut c) = self.client(node).await?;
            c.signal(crate::api::pb::SignalRequest {
                job_id: job.to_string(),
                signal: sig,
            })
            .await
            .map(|_| ())
            .map_err(|s| AgentError::Unavailable(format!("{node}: {}", s.message())))
        })
    }
}
