//! The agent's gRPC services (`Agent`, `Runner`): convert requests into
//! [`AgentAction`]s (via [`super::convert`]) and replies back. No logic
//! lives here: the agent itself has no transport types.

use crate::agent::{Agent, AgentAction, AgentReply};
use crate::api::convert::{agent_error_to_status, InvalidRequest};
use crate::api::convert_exec::{ExecInput, RunInput};
use crate::api::pb;
use crate::api::pb::agent_server::Agent as AgentApi;
use futures::StreamExt;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

type OutStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

pub struct AgentService {
    pub agent: Arc<Agent>,
}

impl AgentService {
    async fn run(&self, action: AgentAction) -> Result<AgentReply, Status> {
        // On a task of its own: tonic drops this future when the caller's
        // deadline passes or it hangs up, and a freeze or migration dropped
        // between dump and seal would leave the job stuck "migrating" with its
        // process gone. The operation finishes; only the reply is lost.
        let agent = self.agent.clone();
        tokio::spawn(async move { agent.handle(action).await })
            .await
            .map_err(|e| Status::internal(format!("agent operation failed: {e}")))?
            .map_err(agent_error_to_status)
    }

    async fn jobs(&self, action: AgentAction) -> Result<Response<pb::ListJobsResponse>, Status> {
        match self.run(action).await? {
            AgentReply::Jobs(list) => Ok(Response::new(pb::ListJobsResponse::from(&list))),
            other => Err(unexpected(&other)),
        }
    }

    async fn job(&self, action: AgentAction) -> Result<Response<pb::Job>, Status> {
        match self.run(action).await? {
            AgentReply::Job(r) => Ok(Response::new(pb::Job::from(r.as_ref()))),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &AgentReply) -> Status {
    Status::internal(format!("unexpected reply {r:?}"))
}

fn job_id(s: &str) -> Result<crate::core::JobId, Status> {
    crate::core::JobId::parse(s).map_err(|e| {
        Status::from(InvalidRequest {
            field: "job_id",
            why: e.to_string(),
        })
    })
}

/// A `WatchEvents` stream: the subscription lives as long as the stream, so
/// a caller that hangs up is dropped from every freeze that waits for it.
type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        r: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let name = r.into_inner().subscriber;
        if name.len() > 256 {
            return Err(Status::from(InvalidRequest {
                field: "subscriber",
                why: "longer than 256 bytes".into(),
            }));
        }
        let sub = self.agent.events.subscribe(&name);
        let s = futures::stream::unfold(sub, |mut sub| async move {
            loop {
                match sub.rx.recv().await {
                    Ok(e) => return Some((Ok(pb::JobEvent::from(&e)), sub)),
                    // Fell behind: skip to what is current; the caller
                    // re-reads the job list anyway.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(s)))
    }

    type WatchLoadStream = OutStream<pb::LoadReport>;

    async fn watch_load(
        &self,
        _r: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        use futures::StreamExt;
        let s = self.agent.load_feed().map(|u| Ok(pb::LoadReport::from(&u)));
        Ok(Response::new(Box::pin(s)))
    }

    async fn ack_freeze(
        &self,
        r: Request<pb::AckFreezeRequest>,
    ) -> Result<Response<pb::AckFreezeResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(pb::AckFreezeResponse {
            accepted: self.agent.events.ack(&r.subscriber, r.freeze_id),
        }))
    }

    type ExecStream = OutStream<pb::ExecOutput>;

    async fn exec(
        &self,
        r: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut inbound = r.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty Exec stream"))?;
        let ExecInput::Start(start) = ExecInput::try_from(first)? else {
            return Err(Status::invalid_argument(
                "the first ExecInput must be `start`",
            ));
        };
        let (tx, rx) = mpsc::channel(256);
        // The caller's end of the stream (cleanly or not) drops `tx`: the
        // session then kills the job.
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match ExecInput::try_from(m) {
                    Ok(ExecInput::In(i)) => {
                        if tx.send(i).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        });
        let outs = tokio_stream::wrappers::ReceiverStream::new(self.agent.exec(start, rx))
            .map(|o| Ok(pb::ExecOutput::from(&o)));
        Ok(Response::new(Box::pin(outs)))
    }

    async fn get_slots(
        &self,
        _r: Request<pb::GetSlotsRequest>,
    ) -> Result<Response<pb::NodeSlots>, Status> {
        let agent = self.agent.clone();
        let s = tokio::task::spawn_blocking(move || agent.node_slots())
            .await
            .map_err(|e| Status::internal(format!("sampling slots: {e}")))?;
        Ok(Response::new(pb::NodeSlots::from(&s)))
    }

    async fn get_load(
        &self,
        _r: Request<pb::GetLoadRequest>,
    ) -> Result<Response<pb::NodeLoad>, Status> {
        match self.run(AgentAction::GetLoad).await? {
            AgentReply::Load(l) => Ok(Response::new(pb::NodeLoad::from(&l))),
            other => Err(unexpected(&other)),
        }
    }

    async fn launch(&self, r: Request<pb::LaunchRequest>) -> Result<Response<pb::Job>, Status> {
        self.job(AgentAction::try_from(r.into_inner())?).await
    }

    async fn list_jobs(
        &self,
        r: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.jobs(AgentAction::try_from(r.into_inner())?).await
    }

    async fn get_job(&self, r: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        self.job(AgentAction::try_from(r.into_inner())?).await
    }

    async fn dump(
        &self,
        r: Request<pb::DumpRequest>,
    ) -> Result<Response<pb::DumpResponse>, Status> {
        match self.run(AgentAction::try_from(r.into_inner())?).await? {
            AgentReply::Dumped(d) => Ok(Response::new(pb::DumpResponse::from(&d))),
            other => Err(unexpected(&other)),
        }
    }

    async fn restore(&self, r: Request<pb::RestoreRequest>) -> Result<Response<pb::Job>, Status> {
        let call = crate::agent::migration::RestoreCall::try_from(r.into_inner())?;
        self.job(AgentAction::Restore(call)).await
    }

    async fn migrate(
        &self,
        r: Request<pb::MigrateRequest>,
    ) -> Result<Response<pb::MigrateResponse>, Status> {
        let r = r.into_inner();
        // A balancer leader's move is fenced by its leadership revision.
        self.agent
            .check_leader_revision(r.leader_revision)
            .await
            .map_err(crate::api::convert::agent_error_to_status)?;
        match self.run(AgentAction::try_from(r)?).await? {
            AgentReply::Migrated(job, m) => Ok(Response::new(pb::MigrateResponse {
                job: Some(pb::Job::from(job.as_ref())),
                migration: Some(pb::Migration::from(&m)),
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn signal(&self, r: Request<pb::SignalRequest>) -> Result<Response<pb::Job>, Status> {
        self.job(AgentAction::try_from(r.into_inner())?).await
    }

    async fn freeze(&self, r: Request<pb::FreezeRequest>) -> Result<Response<pb::Job>, Status> {
        self.job(AgentAction::Freeze(job_id(&r.into_inner().job_id)?))
            .await
    }

    async fn thaw(&self, r: Request<pb::ThawRequest>) -> Result<Response<pb::Job>, Status> {
        self.job(AgentAction::Thaw(job_id(&r.into_inner().job_id)?))
            .await
    }

    async fn list_local_jobs(
        &self,
        r: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let action = match AgentAction::try_from(r.into_inner())? {
            AgentAction::ListJobs {
                node,
                include_finished,
                ..
            } => AgentAction::ListJobs {
                node,
                include_finished,
                local_only: true,
            },
            other => other,
        };
        self.jobs(action).await
    }

    async fn push_images(
        &self,
        r: Request<Streaming<pb::ImageChunk>>,
    ) -> Result<Response<pb::PushImagesResponse>, Status> {
        let parts = r.into_inner().map(|m| match m {
            Ok(c) => crate::agent::direct::PushPart::try_from(c)
                .map_err(|e| crate::agent::AgentError::InvalidArgument(e.to_string())),
            Err(s) => Err(crate::agent::AgentError::Unavailable(format!(
                "the sender's stream broke: {}",
                s.message()
            ))),
        });
        // On a task of its own, like every action: a receiver dropped half
        // way would still clean up, but the commit must not be cut short.
        let agent = self.agent.clone();
        let summary = tokio::spawn(async move { agent.receive_push(Box::pin(parts)).await })
            .await
            .map_err(|e| Status::internal(format!("receiving images failed: {e}")))?
            .map_err(agent_error_to_status)?;
        Ok(Response::new(pb::PushImagesResponse::from(&summary)))
    }

    type StreamPagesStream = OutStream<pb::PageStreamOut>;

    async fn stream_pages(
        &self,
        r: Request<Streaming<pb::PageStreamIn>>,
    ) -> Result<Response<Self::StreamPagesStream>, Status> {
        use crate::agent::direct::stream::PageStreamIn;
        let mut inbound = r.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty StreamPages stream"))?;
        let PageStreamIn::Open(open) = PageStreamIn::try_from(first)? else {
            return Err(Status::invalid_argument(
                "the first PageStreamIn must be `open`",
            ));
        };
        let data = inbound
            .map(|m| match m.map(PageStreamIn::try_from) {
                Ok(Ok(PageStreamIn::Data(b))) => Ok(b),
                Ok(Ok(PageStreamIn::Open(_))) => Err(crate::agent::AgentError::InvalidArgument(
                    "a second `open` in a page stream".into(),
                )),
                Ok(Err(e)) => Err(crate::agent::AgentError::InvalidArgument(e.to_string())),
                Err(s) => Err(crate::agent::AgentError::Unavailable(format!(
                    "the sender's stream broke: {}",
                    s.message()
                ))),
            })
            .boxed();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.agent.clone().serve_page_stream(open, data, tx));
        let outs = tokio_stream::wrappers::ReceiverStream::new(rx).map(|o| match o {
            Ok(o) => Ok(pb::PageStreamOut::from(o)),
            Err(e) => Err(agent_error_to_status(e)),
        });
        Ok(Response::new(Box::pin(outs)))
    }

    async fn set_node_admin(
        &self,
        r: Request<pb::SetNodeAdminRequest>,
    ) -> Result<Response<pb::NodeAdmin>, Status> {
        match self.run(AgentAction::try_from(r.into_inner())?).await? {
            AgentReply::Admin(a) => Ok(Response::new(pb::NodeAdmin::from(&a))),
            other => Err(unexpected(&other)),
        }
    }

    async fn set_pinned(
        &self,
        r: Request<pb::SetPinnedRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.job(AgentAction::try_from(r.into_inner())?).await
    }

    async fn resolve_migration(
        &self,
        r: Request<pb::ResolveMigrationRequest>,
    ) -> Result<Response<pb::ResolveMigrationResponse>, Status> {
        match self.run(AgentAction::try_from(r.into_inner())?).await? {
            AgentReply::Resolved(res) => {
                Ok(Response::new(pb::ResolveMigrationResponse::from(&res)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn checkpoint(
        &self,
        r: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        match self.run(AgentAction::try_from(r.into_inner())?).await? {
            AgentReply::Checkpointed(d) => {
                Ok(Response::new(pb::CheckpointResponse::from(d.as_ref())))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn restore_checkpoint(
        &self,
        r: Request<pb::RestoreCheckpointRequest>,
    ) -> Result<Response<pb::RestoreCheckpointResponse>, Status> {
        match self.run(AgentAction::try_from(r.into_inner())?).await? {
            AgentReply::FromCheckpoint(f) => Ok(Response::new(
                pb::RestoreCheckpointResponse::from(f.as_ref()),
            )),
            other => Err(unexpected(&other)),
        }
    }
}

/// `mosrun`'s entry point (`Runner`). On the local Unix socket the job runs
/// as the connecting process's uid/gid (SO_PEERCRED), whatever the request
/// says; on the gRPC port (mTLS) a cluster certificate is trusted like root,
/// as for `Launch`.
pub struct RunnerService {
    pub agent: Arc<Agent>,
    pub local_socket: bool,
}

#[tonic::async_trait]
impl pb::runner_server::Runner for RunnerService {
    type RunStream = OutStream<pb::RunOutput>;

    async fn run(
        &self,
        r: Request<Streaming<pb::RunInput>>,
    ) -> Result<Response<Self::RunStream>, Status> {
        let cred = if self.local_socket {
            let c = r
                .extensions()
                .get::<tonic::transport::server::UdsConnectInfo>()
                .and_then(|i| i.peer_cred)
                .ok_or_else(|| {
                    Status::permission_denied("no peer credentials on the local socket")
                })?;
            Some((c.uid(), c.gid()))
        } else {
            None
        };
        let mut inbound = r.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty Run stream"))?;
        let RunInput::Start(mut start) = RunInput::try_from(first)? else {
            return Err(Status::invalid_argument(
                "the first RunInput must be `start`",
            ));
        };
        if let Some((uid, gid)) = cred {
            start.exec.uid = uid;
            start.exec.gid = gid;
        }
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match RunInput::try_from(m) {
                    Ok(RunInput::In(i)) => {
                        if tx.send(i).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        });
        let outs = tokio_stream::wrappers::ReceiverStream::new(self.agent.run(start, rx))
            .map(|o| Ok(pb::RunOutput::from(&o)));
        Ok(Response::new(Box::pin(outs)))
    }
}
