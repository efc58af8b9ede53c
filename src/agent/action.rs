//! The agent's operations: one plain enum ([`AgentAction`]), its answers
//! ([`AgentReply`]), and [`Agent::handle`], which carries one out.
//!
//! Why a file of its own: this is the agent's whole surface. The gRPC layer
//! (`api::server`) and the CLI's local paths only convert to and from these
//! types, so a reader can see every operation, and which part of the agent
//! does it, in one place, with no transport types in the way.

use super::{checkpoint, direct, load, migration, Agent, AgentResult};
use crate::core::{JobId, JobRecord, MigrationId, NodeName};
use std::sync::Arc;

/// One operation of the agent; transport-free.
#[derive(Debug, Clone)]
pub enum AgentAction {
    GetLoad,
    Launch(LaunchRequest),
    ListJobs {
        node: Option<NodeName>,
        include_finished: bool,
        /// Only this node's own records (ListLocalJobs), never asking peers.
        local_only: bool,
    },
    GetJob(JobSelector),
    Dump {
        job: JobId,
        migration: Option<MigrationId>,
        leave_running: bool,
    },
    Restore(migration::RestoreCall),
    Migrate {
        job: JobId,
        target: NodeName,
        migration: Option<MigrationId>,
        mode: migration::Mode,
        /// Refuse a job that is not on this node instead of passing the
        /// call on to the job's node.
        only_here: bool,
    },
    Signal {
        job: JobId,
        signal: i32,
    },
    Freeze(JobId),
    Thaw(JobId),
    /// Did a pushed migration land here? If not, drop it (see [`direct`]).
    ResolveMigration {
        job: JobId,
        migration: MigrationId,
    },
    /// Block/unblock this node, or change its speed (see [`admin`](super::admin)).
    SetNodeAdmin {
        blocked: Option<bool>,
        speed: Option<f64>,
    },
    /// Pin (MOSIX "stay") or unpin a job running on this node.
    SetPinned {
        job: JobId,
        pinned: bool,
    },
    /// Checkpoint a job running here, leaving it running (see [`checkpoint`]).
    Checkpoint(JobId),
    /// Restore a job here from a checkpoint (the latest when `seq` is None).
    RestoreCheckpoint {
        job: JobId,
        seq: Option<u64>,
        node_is_down: Option<NodeName>,
        /// The balancer leader's revision (0 = an operator's command).
        leader_revision: i64,
    },
}

#[derive(Debug, Clone)]
pub enum AgentReply {
    Load(load::NodeLoad),
    Job(Box<JobRecord>),
    Jobs(JobList),
    Dumped(migration::DumpResult),
    Migrated(Box<JobRecord>, crate::core::MigrationRecord),
    Resolved(direct::Resolution),
    Admin(NodeAdminInfo),
    Checkpointed(Box<checkpoint::CheckpointDone>),
    FromCheckpoint(Box<checkpoint::FromCheckpoint>),
}

/// A listing of jobs, and the nodes whose jobs it could not include.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobList {
    pub jobs: Vec<JobRecord>,
    /// Without a shared path each node answers for its own jobs; these did
    /// not, so the listing may lack their jobs. Always empty with one.
    pub unlisted: Vec<Unlisted>,
}

/// A node left out of a listing, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unlisted {
    pub node: NodeName,
    pub reason: String,
}

impl From<Vec<JobRecord>> for JobList {
    fn from(jobs: Vec<JobRecord>) -> Self {
        Self {
            jobs,
            unlisted: vec![],
        }
    }
}

/// A node's administrative settings as the API reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAdminInfo {
    pub node: String,
    pub blocked: bool,
    pub speed: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobSelector {
    Id(JobId),
    Pid(i32),
}

#[derive(Debug, Clone, Default)]
pub struct LaunchRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub pinned: bool,
    pub non_migratable: bool,
    pub name: String,
    /// The service this job serves, if any (`mosrun --service`).
    pub service: Option<crate::core::ServiceDecl>,
    /// Periodic checkpoints (`mosrun --checkpoint-every`), if any.
    pub checkpoint: Option<crate::core::CheckpointStatus>,
    /// Its own network namespace and address (`mosrun --net own`): Some(true);
    /// the node's network: Some(false); None: the node's default.
    pub own_net: Option<bool>,
}

impl Agent {
    /// Carry out one action.
    pub async fn handle(self: &Arc<Self>, action: AgentAction) -> AgentResult<AgentReply> {
        match action {
            AgentAction::GetLoad => Ok(AgentReply::Load(self.node_load())),
            AgentAction::Launch(req) => {
                self.launch(req).await.map(|r| AgentReply::Job(Box::new(r)))
            }
            AgentAction::ListJobs {
                node,
                include_finished,
                local_only,
            } => if local_only {
                self.list_local(node, include_finished).map(JobList::from)
            } else if self.cfg.shared {
                self.list_jobs(node, include_finished).map(JobList::from)
            } else {
                // No shared registry: every node answers for its own jobs.
                self.list_cluster(node, include_finished).await
            }
            .map(AgentReply::Jobs),
            AgentAction::GetJob(JobSelector::Id(id)) if !self.cfg.shared => self
                .get_job_cluster(&id)
                .await
                .map(|r| AgentReply::Job(Box::new(r))),
            AgentAction::GetJob(sel) => self.get_job(&sel).map(|r| AgentReply::Job(Box::new(r))),
            AgentAction::Dump {
                job,
                migration,
                leave_running,
            } => self
                .dump(&job, migration, leave_running)
                .await
                .map(AgentReply::Dumped),
            AgentAction::Restore(call) if !self.cfg.shared => self
                .restore_pushed(call)
                .await
                .map(|r| AgentReply::Job(Box::new(r))),
            AgentAction::Restore(call) => self
                .restore(call)
                .await
                .map(|r| AgentReply::Job(Box::new(r))),
            AgentAction::Migrate {
                job,
                target,
                migration,
                mode,
                only_here,
            } => {
                let elsewhere = if only_here {
                    None
                } else {
                    self.node_of_job_elsewhere(&job).await
                };
                match elsewhere {
                    // Over the agents' warm channel: a caller that asked the
                    // wrong node (mosctl asks the first one) pays no second
                    // lookup and no second handshake.
                    Some(node) => {
                        tracing::debug!(job = %job, to = %node, "passing Migrate on to the job's node");
                        self.peers
                            .migrate_there(&node, &job, &target, migration, mode)
                            .await
                    }
                    None => self.migrate(&job, &target, migration, mode).await,
                }
                .map(|(r, m)| AgentReply::Migrated(Box::new(r), m))
            }
            AgentAction::Signal { job, signal } => self
                .signal(&job, signal)
                .map(|r| AgentReply::Job(Box::new(r))),
            AgentAction::Freeze(job) => self
                .freeze(&job)
                .await
                .map(|r| AgentReply::Job(Box::new(r))),
            AgentAction::Thaw(job) => {
                // Thawing a job frozen elsewhere brings it in: not while
                // blocked.
                if self
                    .registry
                    .get(&job)
                    .is_ok_and(|r| r.node != self.cfg.node)
                {
                    self.check_not_blocked()?;
                }
                if !self.cfg.shared {
                    self.check_thaw_here(&job)?;
                }
                self.thaw(&job).await.map(|r| AgentReply::Job(Box::new(r)))
            }
            AgentAction::ResolveMigration { job, migration } => self
                .resolve_migration(&job, &migration)
                .await
                .map(AgentReply::Resolved),
            AgentAction::SetNodeAdmin { blocked, speed } => {
                self.set_node_admin(blocked, speed).map(AgentReply::Admin)
            }
            AgentAction::SetPinned { job, pinned } => self
                .set_pinned(&job, pinned)
                .map(|r| AgentReply::Job(Box::new(r))),
            AgentAction::Checkpoint(job) => {
                self.checkpoints_need_shared()?;
                self.checkpoint_job(&job)
                    .await
                    .map(|d| AgentReply::Checkpointed(Box::new(d)))
            }
            AgentAction::RestoreCheckpoint {
                job,
                seq,
                node_is_down,
                leader_revision,
            } => {
                self.checkpoints_need_shared()?;
                self.check_leader_revision(leader_revision).await?;
                self.restore_checkpoint(&job, seq, node_is_down)
                    .await
                    .map(|r| AgentReply::FromCheckpoint(Box::new(r)))
            }
        }
    }
}
