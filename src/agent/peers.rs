//! How an agent reaches other agents during a migration. A trait, so the
//! protocol can be unit-tested with in-process fakes, and free of transport
//! types; the real one, over tonic, is `api::peers::GrpcPeers`.

use super::direct::{PushPart, PushSummary, Resolution};
use super::migration::RestoreCall;
use super::{AgentError, AgentResult};
use crate::core::{JobId, JobRecord, MigrationId, MigrationRecord, NodeName};
use futures::future::BoxFuture;
use std::time::Duration;

/// How long the source waits for a target's post-copy Restore: the
/// target's daemon start (up to 15 s) and its 8 s restore deadline, plus a
/// margin.
pub const POST_COPY_RESTORE_CALL: Duration = Duration::from_secs(30);

/// What a migration's target answered to the ping before anything is
/// frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetInfo {
    /// It can take a post-copy migration (userfaultfd).
    pub post_copy: bool,
    /// It can give a job its own address, so a job with one may move there.
    pub job_addresses: bool,
}

pub trait Peers: Send + Sync + 'static {
    /// Whether `node` is part of the cluster.
    fn knows(&self, node: &NodeName) -> bool;
    /// Names of every node, for error messages.
    fn names(&self) -> Vec<String>;
    /// Cheap liveness check before the job is frozen; answers what the
    /// node can take ([`TargetInfo`]). A blocked node (`mosctl block`) is
    /// FailedPrecondition, naming the block.
    fn ping<'a>(&'a self, node: &'a NodeName) -> BoxFuture<'a, AgentResult<TargetInfo>>;
    /// Ask `node` to restore from images.
    fn restore<'a>(
        &'a self,
        node: &'a NodeName,
        call: RestoreCall,
    ) -> BoxFuture<'a, AgentResult<JobRecord>>;

    /// Pass a Migrate call on to `node`, the job's node, which runs it
    /// (and does not pass it on again). A transport that cannot (a test
    /// fake) keeps the default: the peer is unavailable.
    fn migrate_there<'a>(
        &'a self,
        node: &'a NodeName,
        _job: &'a JobId,
        _target: &'a NodeName,
        _mig: Option<MigrationId>,
        _mode: super::migration::Mode,
    ) -> BoxFuture<'a, AgentResult<(JobRecord, MigrationRecord)>> {
        Box::pin(async move { Err(unsupported(node)) })
    }

    // Without a shared path (see `agent::direct`). A transport that cannot
    // do these (a test fake) keeps the defaults: the peer is unavailable.

    /// `node`'s own jobs (ListLocalJobs).
    fn list_local_jobs<'a>(
        &'a self,
        node: &'a NodeName,
        _include_finished: bool,
    ) -> BoxFuture<'a, AgentResult<Vec<JobRecord>>> {
        Box::pin(async move { Err(unsupported(node)) })
    }
    /// Stream a migration's images and record to `node`: the messages
    /// `parts` yields, until it closes. The sender reads the files; if it
    /// stops before the end marker, the target keeps nothing.
    fn push_images<'a>(
        &'a self,
        node: &'a NodeName,
        _parts: tokio::sync::mpsc::Receiver<PushPart>,
    ) -> BoxFuture<'a, AgentResult<PushSummary>> {
        Box::pin(async move { Err(unsupported(node)) })
    }
    /// Open a page stream to `node` (see `direct::stream`): `open`, then
    /// whatever `data` yields, until it closes; the answers come back as
    /// they arrive.
    fn stream_pages<'a>(
        &'a self,
        node: &'a NodeName,
        _open: super::direct::stream::PageStreamOpen,
        _data: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> BoxFuture<'a, AgentResult<super::direct::stream::PageOutStream>> {
        Box::pin(async move { Err(unsupported(node)) })
    }
    /// Ask `node` whether a pushed migration landed there (if not, it drops
    /// its copy).
    fn resolve_migration<'a>(
        &'a self,
        node: &'a NodeName,
        _job: &'a JobId,
        _mig: &'a MigrationId,
    ) -> BoxFuture<'a, AgentResult<Resolution>> {
        Box::pin(async move { Err(unsupported(node)) })
    }

    // Foreground jobs (see `agent::exec` and `agent::runner`).
    /// Open a session on `node`: `start`, then whatever `input` carries.
    fn exec<'a>(
        &'a self,
        node: &'a NodeName,
        _start: super::exec::ExecStart,
        _input: tokio::sync::mpsc::Receiver<super::exec::ExecIn>,
    ) -> BoxFuture<'a, AgentResult<ExecStream>> {
        Box::pin(async move { Err(unsupported(node)) })
    }
    /// `node`'s slots (GetSlots), within `timeout`.
    fn slots<'a>(
        &'a self,
        node: &'a NodeName,
        _timeout: Duration,
    ) -> BoxFuture<'a, AgentResult<super::exec::NodeSlots>> {
        Box::pin(async move { Err(unsupported(node)) })
    }
    /// Signal a job on `node` (a foreground job that migrated there).
    fn signal_there<'a>(
        &'a self,
        node: &'a NodeName,
        _job: &'a JobId,
        _sig: i32,
    ) -> BoxFuture<'a, AgentResult<()>> {
        Box::pin(async move { Err(unsupported(node)) })
    }
}

/// Output of a foreground session on another node, as it arrives.
pub type ExecStream = futures::stream::BoxStream<'static, AgentResult<super::exec::ExecOut>>;

fn unsupported(node: &NodeName) -> AgentError {
    AgentError::Unavailable(format!("{node} cannot be reached for this call"))
}
