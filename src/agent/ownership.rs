//! The agent's side of `coord`: its node lease, its jobs' owner records,
//! self-fencing, and the check that runs before anything else when it
//! starts or comes back.
//!
//! The rules, in the order they matter:
//!
//! 1. **Fence on time.** When the lease cannot be renewed until
//!    `TTL − margin` after the last good renewal, every job here is
//!    SIGKILLed (each job is the init of its own PID namespace, so its
//!    whole tree dies with it), and the registry's write gate closes: no
//!    record, and no checkpoint made latest ([`Agent::may_publish`] is the
//!    check a checkpoint writer calls), is committed for them.
//! 2. **Come back carefully.** At start (after a crash or restart: jobs may
//!    have run on without us) and after a fence, the agent first asks etcd
//!    who owns each job it has: one it no longer owns is killed at once (a
//!    stale copy: another node runs it now); one nobody owns is claimed.
//!    A job it killed while fenced and still owns (nobody took it over) is
//!    recorded as failed, with the reason, after one compare-and-set that
//!    bumps the epoch (so a concurrent restart elsewhere and this record
//!    cannot both win); its owner record stays with this node so a restore
//!    from a checkpoint can move it.
//! 3. **Move with one CAS.** A migration moves the owner to the target once
//!    the images are sealed and before the target restores them (so the
//!    target runs it only as owner); a rollback moves it back before the
//!    source restores; a failed move is rolled back (the job is restored
//!    here from the same images).

use super::checkpoint::FromCheckpoint;
use super::fence_watchdog::{self, FenceWatch};
use super::{Agent, AgentError, AgentResult};
use crate::coord::fencing::FenceTiming;
use crate::coord::lease::{self, FenceHandler, LeaseHolder};
use crate::coord::ownership::{OwnerRecord, Owners};
use crate::coord::store::{Store, SystemClock};
use crate::coord::{election::Election, CoordError};
use crate::core::{JobId, JobState, NodeName};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The agent's coordination state (present only with etcd configured).
pub struct AgentCoord {
    pub holder: Arc<LeaseHolder>,
    pub owners: Owners,
    pub election: Election,
    /// To ask which nodes hold a lease (a restart's fence).
    store: Arc<dyn Store>,
    cluster: String,
    /// Jobs SIGKILLed by the last fence, reconciled at rejoin.
    fenced_jobs: Mutex<Vec<JobId>>,
    /// Owner epochs this node holds, as last seen.
    epochs: Mutex<HashMap<JobId, i64>>,
    /// The fence file and its watchdog process (None only in tests).
    pub fence: Option<Arc<FenceWatch>>,
    /// The agent's runtime: a job's end may be seen on a plain thread (an
    /// adopted job's pidfd watcher), and its owner record is dropped here.
    rt: tokio::runtime::Handle,
}

impl AgentCoord {
    /// Count `job` among the jobs the last fence killed (once).
    fn note_fenced(&self, job: &JobId) {
        if let Ok(mut f) = self.fenced_jobs.lock() {
            if !f.contains(job) {
                f.push(job.clone());
            }
        }
    }

    pub fn epoch(&self, job: &JobId) -> Option<i64> {
        self.epochs.lock().ok()?.get(job).copied()
    }
    fn set_epoch(&self, job: &JobId, epoch: Option<i64>) {
        if let Ok(mut m) = self.epochs.lock() {
            match epoch {
                Some(e) => m.insert(job.clone(), e),
                None => m.remove(job),
            };
        }
    }
}

fn coord_err(e: CoordError) -> AgentError {
    match e {
        CoordError::NotOwner { .. } => AgentError::FailedPrecondition(e.to_string()),
        _ => AgentError::Unavailable(e.to_string()),
    }
}

struct Handler(Weak<Agent>);

impl FenceHandler for Handler {
    fn fence(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(a) = self.0.upgrade() {
                a.fence_jobs().await;
            }
        })
    }
    fn rejoined(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(a) = self.0.upgrade() {
                if let Err(e) = a.reconcile_ownership().await {
                    tracing::error!("reconciling job ownership after the fence: {e}");
                }
            }
        })
    }
}

impl Agent {
    pub fn coord(&self) -> Option<&Arc<AgentCoord>> {
        self.coord.get()
    }

    /// Take a node lease, close the registry's gate while it is not held,
    /// kill any job this node no longer owns, and start the renewer and the
    /// watchdog; with `fence_file`, also the fence watchdog process (see
    /// [`fence_watchdog`]), the deadline written before it starts. Runs
    /// before the agent serves anything.
    pub async fn attach_coord(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        cluster: &str,
        timing: FenceTiming,
        fence_file: Option<std::path::PathBuf>,
    ) -> Result<(), CoordError> {
        let node = self.cfg.node.as_str();
        let value = serde_json::json!({
            "node": node,
            "pid": std::process::id(),
            "ttl_s": timing.ttl.as_secs(),
            // The leading balancer waits this long again after the lease
            // expires before it restarts the node's jobs elsewhere.
            "margin_ms": u64::try_from(timing.margin.as_millis()).unwrap_or(u64::MAX),
        })
        .to_string()
        .into_bytes();
        let holder = LeaseHolder::acquire(
            store.clone(),
            Arc::new(SystemClock),
            timing,
            crate::coord::node_key(cluster, node),
            value,
        )
        .await?;
        let fence = match fence_file {
            Some(file) => Some(start_fence_watch(node, file, &holder)?),
            None => None,
        };
        let gate = Arc::downgrade(&holder);
        self.registry.gate().set(Arc::new(move || {
            gate.upgrade().is_none_or(|h| h.may_write())
        }));
        let c = Arc::new(AgentCoord {
            holder: holder.clone(),
            owners: Owners::new(store.clone(), cluster),
            election: Election::new(store.clone(), cluster, ""),
            store,
            cluster: cluster.to_string(),
            fenced_jobs: Mutex::new(Vec::new()),
            epochs: Mutex::new(HashMap::new()),
            fence,
            rt: tokio::runtime::Handle::current(),
        });
        let fenced_by_watchdog = c.fence.is_some();
        let _ = self.coord.set(c);
        tracing::info!(
            lease = holder.lease_id(),
            ttl_s = timing.ttl.as_secs_f64(),
            fence_after_s = timing.fence_after().as_secs_f64(),
            "holding a node lease in etcd"
        );
        self.reconcile_ownership().await?;
        lease::spawn(holder, Arc::new(Handler(Arc::downgrade(self))));
        if fenced_by_watchdog {
            // Renewals move the deadline; jobs come and go: keep the file
            // current (a write only when something changed).
            let a = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::coord::watchdog::POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                    match a.upgrade() {
                        Some(a) => a.publish_fence(),
                        None => return,
                    }
                }
            });
        }
        Ok(())
    }

    /// Whether this node may commit a write for `job` now: it holds its
    /// lease (not fenced) and, with etcd, owns the job at `epoch` (or at
    /// the epoch it knows, if None). The check a checkpoint writer makes
    /// before a checkpoint becomes the job's latest. Without etcd: Ok.
    pub async fn may_publish(&self, job: &JobId, epoch: Option<i64>) -> AgentResult<i64> {
        let Some(c) = self.coord() else {
            return Ok(0);
        };
        if !c.holder.may_write() {
            return Err(AgentError::Unavailable(CoordError::Fenced.to_string()));
        }
        let epoch = match epoch.or_else(|| c.epoch(job)) {
            Some(e) => e,
            None => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {job}: this node holds no owner epoch for it"
                )))
            }
        };
        c.owners
            .check(job.as_str(), self.cfg.node.as_str(), epoch)
            .await
            .map_err(coord_err)?;
        Ok(epoch)
    }

    /// Refuse to start anything while fenced.
    pub(crate) fn check_not_fenced(&self) -> AgentResult<()> {
        match self.coord() {
            Some(c) if !c.holder.may_write() => {
                Err(AgentError::Unavailable(CoordError::Fenced.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// A job that ended here needs no owner any more: drop its record, in
    /// the background and best effort (only if this node still owns it).
    /// A record left behind would make a node that is later switched off
    /// look lost with jobs, and send the leading balancer after them.
    pub(crate) fn release_owner(&self, job: &JobId) {
        let Some(c) = self.coord() else {
            return;
        };
        let (c, me, id) = (c.clone(), self.cfg.node.to_string(), job.clone());
        c.rt.clone().spawn(async move {
            match c.owners.get(id.as_str()).await {
                Ok(Some(o)) if o.node == me => match c.owners.release(id.as_str(), &o).await {
                    Ok(_) => c.set_epoch(&id, None),
                    Err(e) => tracing::debug!(job = %id, "dropping the owner record: {e}"),
                },
                Ok(_) => c.set_epoch(&id, None),
                Err(e) => tracing::debug!(job = %id, "reading the owner record: {e}"),
            }
        });
    }

    /// Record this node as the owner of a job it just started.
    pub(crate) async fn claim_owner(&self, job: &JobId) -> AgentResult<()> {
        let Some(c) = self.coord() else {
            return Ok(());
        };
        // A slow answer is not a refusal: try a few times (the claim is
        // idempotent) before the caller gives the job up.
        let mut last = None;
        for _ in 0..3 {
            match c.owners.claim(job.as_str(), self.cfg.node.as_str()).await {
                Ok(o) => {
                    c.set_epoch(job, Some(o.epoch));
                    return Ok(());
                }
                Err(e @ CoordError::NotOwner { .. }) => return Err(coord_err(e)),
                Err(e) => last = Some(e),
            }
        }
        Err(coord_err(
            last.unwrap_or(CoordError::Unavailable("no answer".into())),
        ))
    }

    /// Migration step: the images are sealed; make `target` the owner with
    /// one CAS. Err: nothing moved (the caller rolls back).
    pub(crate) async fn move_owner_to(&self, job: &JobId, target: &str) -> AgentResult<()> {
        let Some(c) = self.coord() else {
            return Ok(());
        };
        let me = self.cfg.node.as_str();
        let from = match c.epoch(job) {
            Some(epoch) => OwnerRecord {
                node: me.to_string(),
                epoch,
            },
            None => match c.owners.get(job.as_str()).await.map_err(coord_err)? {
                Some(o) => o,
                // A job from before etcd: claim it first.
                None => c.owners.claim(job.as_str(), me).await.map_err(coord_err)?,
            },
        };
        if from.node != me {
            return Err(AgentError::FailedPrecondition(format!(
                "job {job}: etcd says {} owns it (epoch {}), not {me}; not moved",
                from.node, from.epoch
            )));
        }
        let to = c
            .owners
            .move_to(job.as_str(), &from, target)
            .await
            .map_err(|e| {
                coord_err(e).context(&format!("moving the ownership of job {job} to {target}"))
            })?;
        c.set_epoch(job, None);
        tracing::info!(job = %job, to = target, epoch = to.epoch, "ownership moved");
        Ok(())
    }

    /// Before a rollback restores a job here: take the ownership back from
    /// `target` (one CAS), unless we still hold it.
    pub(crate) async fn take_owner_back(&self, job: &JobId) -> AgentResult<()> {
        self.take_owner(job, None).await.map(|_| ())
    }

    /// Before a restart from a checkpoint runs the job here: take its
    /// ownership from `from`, the node it is recorded on (dead, or declared
    /// down), with one CAS. If another node owns it by now (another restart
    /// won), refuse: the job would run twice. Returns what to give back if
    /// the restore then fails (so another node may try).
    pub(crate) async fn take_owner_for_restart(
        &self,
        job: &JobId,
        from: &NodeName,
    ) -> AgentResult<Option<OwnerRecord>> {
        let taken = self.take_owner(job, Some(from)).await?;
        if let Some(o) = &taken {
            tracing::info!(job = %job, from = %from, epoch = o.epoch, "ownership taken for a restart");
        }
        Ok(taken)
    }

    /// Make this node the job's owner: kept if it is already, claimed if
    /// nobody is, otherwise moved here with one CAS; with `only_from`, only
    /// from that node (any other owner is refused). None without etcd.
    async fn take_owner(
        &self,
        job: &JobId,
        only_from: Option<&NodeName>,
    ) -> AgentResult<Option<OwnerRecord>> {
        let Some(c) = self.coord() else {
            return Ok(None);
        };
        let me = self.cfg.node.as_str();
        let now = match c.owners.get(job.as_str()).await.map_err(coord_err)? {
            Some(o) if o.node == me => o,
            Some(o) if only_from.is_none_or(|f| o.node == f.as_str()) => {
                // A restart takes a job from a node that is down. If that
                // node holds a lease again it is up and restarts its own
                // fenced jobs (`reconcile_ownership`); both would run one.
                // Read after the owner record: if the node took its lease
                // and bumped the epoch since, the CAS below fails instead.
                if let Some(from) = only_from {
                    let live = crate::coord::live_nodes(&*c.store, &c.cluster)
                        .await
                        .map_err(coord_err)?;
                    if live.contains(from.as_str()) {
                        return Err(AgentError::FailedPrecondition(format!(
                            "{from} holds an etcd lease: it is up, not down, and restarts its own jobs; job {job} is not restarted here"
                        )));
                    }
                }
                c.owners
                    .move_to(job.as_str(), &o, me)
                    .await
                    .map_err(coord_err)?
            }
            Some(o) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {job} is owned by {} (epoch {}), not by {}: it was restarted there already; not running it twice",
                    o.node,
                    o.epoch,
                    only_from.map_or("", |f| f.as_str())
                )))
            }
            None => c.owners.claim(job.as_str(), me).await.map_err(coord_err)?,
        };
        c.set_epoch(job, Some(now.epoch));
        Ok(Some(now))
    }

    /// A restart that took the ownership failed: hand it back to `from`,
    /// so the job's owner is again the node it is recorded on.
    pub(crate) async fn give_owner_back(&self, job: &JobId, mine: &OwnerRecord, from: &NodeName) {
        let Some(c) = self.coord() else {
            return;
        };
        c.set_epoch(job, None);
        if let Err(e) = c.owners.move_to(job.as_str(), mine, from.as_str()).await {
            tracing::warn!(job = %job, "giving the ownership back to {from} after a failed restart: {e}");
        }
    }

    /// A job arrived here by a migration: remember the epoch the source
    /// gave us (best effort: a miss is re-read when needed).
    pub(crate) async fn note_arrival(&self, job: &JobId) {
        let Some(c) = self.coord() else {
            return;
        };
        if let Ok(Some(o)) = c.owners.get(job.as_str()).await {
            if o.node == self.cfg.node.as_str() {
                c.set_epoch(job, Some(o.epoch));
            }
        }
    }

    /// SIGKILL every job here and count them among the fenced jobs (settled
    /// at rejoin); returns them.
    fn kill_every_job(&self) -> Vec<(JobId, i32)> {
        let jobs: Vec<(JobId, i32)> = self
            .local
            .lock()
            .map(|l| l.iter().map(|(id, j)| (id.clone(), j.pid)).collect())
            .unwrap_or_default();
        for (id, pid) in &jobs {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            tracing::error!(job = %id, pid, "fenced: job killed (this node lost its etcd lease)");
        }
        if let Some(c) = self.coord() {
            for (id, _) in &jobs {
                c.note_fenced(id);
            }
        }
        jobs
    }

    /// The fence: SIGKILL every job here and wait (bounded) for them to go.
    pub(crate) async fn fence_jobs(&self) {
        let jobs = self.kill_every_job();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline && jobs.iter().any(|(_, p)| alive(*p)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::error!(
            jobs = jobs.len(),
            "fenced: every job here is stopped; no write is committed until a new lease is held"
        );
    }

    /// A job ended by SIGKILL: if this node is fenced, count it among the
    /// fenced jobs (reconciled at rejoin) and say so.
    pub(crate) fn note_fenced_exit(&self, id: &JobId) -> bool {
        let Some(c) = self.coord() else {
            return false;
        };
        if c.holder.may_write() {
            return false;
        }
        c.note_fenced(id);
        tracing::error!(job = %id, "fenced: job killed while this node could not renew its lease (by the fence watchdog if the agent was stopped)");
        // The fence watchdog acted before this agent's own watchdog did:
        // complete the fence here. A renewal that was in flight during a
        // partition may still succeed after the heal and move the deadline
        // back, and the agent would then never pass through its fence and
        // rejoin, leaving this job recorded running with no process.
        if c.holder.force_fence() {
            self.kill_every_job();
            c.holder.fenced_done();
            tracing::error!("fenced (the fence watchdog acted first): no write is committed until a new lease is held");
        }
        true
    }

    /// Who owns what, at start or after a fence (see the module doc).
    pub async fn reconcile_ownership(self: &Arc<Self>) -> Result<(), CoordError> {
        let Some(c) = self.coord() else {
            return Ok(());
        };
        let me = self.cfg.node.as_str().to_string();
        let jobs: Vec<(JobId, i32)> = self
            .local
            .lock()
            .map(|l| l.iter().map(|(id, j)| (id.clone(), j.pid)).collect())
            .unwrap_or_default();
        for (id, pid) in jobs {
            match c.owners.get(id.as_str()).await? {
                Some(o) if o.node == me => c.set_epoch(&id, Some(o.epoch)),
                Some(o) => {
                    // Forget it first: its exit is then "a stale process",
                    // and nothing is written for a job we do not own.
                    if let Ok(mut l) = self.local.lock() {
                        l.remove(&id);
                    }
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    c.set_epoch(&id, None);
                    tracing::warn!(job = %id, pid, owner = %o.node, epoch = o.epoch, "killed a stale copy: etcd says another node owns this job");
                }
                None => {
                    let o = c.owners.claim(id.as_str(), &me).await?;
                    c.set_epoch(&id, Some(o.epoch));
                }
            }
        }
        self.kill_stale_copies(c).await;
        let fenced: Vec<JobId> = c
            .fenced_jobs
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        for id in fenced {
            // On a task of its own: a restore takes seconds, and this runs
            // in the lease's loop, which must go on renewing meanwhile.
            let me = self.clone();
            tokio::spawn(async move { me.settle_fenced_job(id).await });
        }
        Ok(())
    }

    /// A job this node killed while fenced: if another node took it over
    /// meanwhile, nothing to do; if it is still ours, bump its epoch by CAS
    /// (so a restart elsewhere that read the old one fails), record the
    /// loss, and restart it here from its latest checkpoint, if it has one:
    /// a partition shorter than the balancer's takeover loses only the work
    /// since that checkpoint, and exactly one copy runs after the heal.
    async fn settle_fenced_job(self: Arc<Self>, id: JobId) {
        let Some(c) = self.coord() else {
            return;
        };
        let me = self.cfg.node.as_str().to_string();
        let o = match c.owners.get(id.as_str()).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(job = %id, "a fenced job's owner cannot be read; it stays as recorded: {e}");
                return;
            }
        };
        if o.node != me {
            tracing::info!(job = %id, owner = %o.node, "a job fenced here was taken over by another node");
            return;
        }
        let bumped = match c.owners.move_to(id.as_str(), &o, &me).await {
            Ok(b) => b,
            Err(e) => {
                tracing::info!(job = %id, "not recording the fenced job: {e}");
                return;
            }
        };
        c.set_epoch(&id, Some(bumped.epoch));
        // The gate may close again for a moment (a renewal that was slow
        // right after the new lease): retry, do not drop the verdict.
        let mut recorded = false;
        for _ in 0..20 {
            match self.record_fenced(&id, &me) {
                Ok(done) => {
                    recorded = done;
                    break;
                }
                Err(e) => {
                    tracing::warn!(job = %id, "recording the fenced job, will retry: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
        if !recorded || !self.cfg.shared {
            return;
        }
        // An operation begun before the fence (a checkpoint of the killed
        // job) may still hold the job for a moment: wait for it.
        for _ in 0..40 {
            match self.restore_checkpoint(&id, None, None).await {
                Ok(FromCheckpoint::Running { seq, .. }) => {
                    tracing::warn!(job = %id, seq, "fenced job restarted here from its latest checkpoint");
                }
                Ok(FromCheckpoint::Lost(_)) => {}
                Err(AgentError::FailedPrecondition(e)) if e.contains("under way") => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Err(AgentError::NotFound(e)) => {
                    tracing::warn!(job = %id, "fenced job not restarted: {e}")
                }
                Err(e) => tracing::error!(job = %id, "fenced job not restarted: {e}"),
            }
            return;
        }
        tracing::error!(job = %id, "fenced job not restarted: another operation held it for 10 s");
    }

    /// Record a fenced job failed; Ok(false) if its record is not ours to
    /// change (it is recorded elsewhere, or not running).
    fn record_fenced(&self, id: &JobId, me: &str) -> AgentResult<bool> {
        let _v = self
            .verdict_lock
            .lock()
            .map_err(|_| AgentError::Internal("verdict lock poisoned".into()))?;
        let mut rec = self.registry.get(id)?;
        if rec.node != self.cfg.node || rec.state != JobState::Running {
            return Ok(false);
        }
        rec.state = JobState::Failed;
        rec.pid = 0;
        rec.error = format!(
            "killed by self-fencing on {me}: the node could not renew its etcd lease in time; nobody took the job over (it is restarted here from its latest checkpoint, if it has one)"
        );
        self.registry.put(&mut rec)?;
        Ok(true)
    }

    /// Copies of jobs the registry places on another node whose process
    /// still runs here (this agent was gone while the job was restarted
    /// elsewhere): killed if etcd says another node owns them.
    async fn kill_stale_copies(&self, c: &AgentCoord) {
        let Ok((all, _)) = self.registry.list() else {
            return;
        };
        let me = self.cfg.node.as_str();
        for rec in all {
            if rec.state != JobState::Running || rec.node == self.cfg.node {
                continue;
            }
            let r = rec.clone();
            let Ok(Some(pid)) =
                tokio::task::spawn_blocking(move || super::recovery::find_job_process(&r)).await
            else {
                continue;
            };
            match c.owners.get(rec.id.as_str()).await {
                Ok(Some(o)) if o.node != me => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    tracing::warn!(job = %rec.id, pid, owner = %o.node, "killed a stale copy left here: etcd says {} owns the job", o.node);
                }
                _ => {}
            }
        }
    }

    /// A request fenced by a balancer's leadership revision: refuse it if a
    /// newer leader exists (0: not from a balancer leader; accepted).
    pub async fn check_leader_revision(&self, revision: i64) -> AgentResult<()> {
        if revision == 0 {
            return Ok(());
        }
        let Some(c) = self.coord() else {
            return Ok(());
        };
        match c.election.leader().await.map_err(coord_err)? {
            Some(l) if l.revision == revision => Ok(()),
            Some(l) => Err(AgentError::FailedPrecondition(format!(
                "request from a stale balancer leader (revision {revision}); the leader now is {} (revision {})",
                l.id, l.revision
            ))),
            None => Err(AgentError::FailedPrecondition(format!(
                "request from balancer leadership revision {revision}, but no balancer leads now"
            ))),
        }
    }
}

/// The fence file with the new lease's deadline (and the previous agent's
/// jobs, not yet re-adopted), then the watchdog process.
fn start_fence_watch(
    node: &str,
    file: std::path::PathBuf,
    holder: &LeaseHolder,
) -> Result<Arc<FenceWatch>, CoordError> {
    let binary = fence_watchdog::default_binary().ok_or_else(|| {
        CoordError::Config(
            "mosix-watchdog is not installed beside mosixd; with etcd it enforces the fencing deadline while the agent cannot (stopped, hung, killed), and without it a stopped agent's jobs could run twice".into(),
        )
    })?;
    let w = Arc::new(
        FenceWatch::new(node, file, binary).map_err(|e| CoordError::Config(e.to_string()))?,
    );
    w.publish(holder.fence_deadline(), Vec::new())
        .map_err(|e| CoordError::Config(e.to_string()))?;
    w.start().map_err(|e| CoordError::Config(e.to_string()))?;
    Ok(w)
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rfind(')').and_then(|i| s.get(i + 2..i + 3)) != Some("Z"),
        Err(_) => false,
    }
}
