//! Post-copy (lazy pages), both halves, and what happens when it fails.
//!
//! **Source.** CRIU dumps everything but memory and then serves the job's
//! pages from a page server while the tree stays frozen here, its memory
//! still mapped (CRIU holds it in page pipes; nothing is unmapped). The
//! dump is asked to *leave the tree stopped* when the transfer ends
//! (`leave_stopped`) instead of killing it, because CRIU calls a transfer
//! that simply ended (the peer closed its socket) a success, whether or not
//! a page ever went out: with the default it would kill the only complete
//! copy of a job whose restore failed. So the agent, not CRIU, decides
//! what becomes of the source's copy:
//! - the target runs the job: every task of the source copy gets SIGSTOP at
//!   once (CRIU still holds them; the signal waits, so however CRIU lets go
//!   of them, they never run again), then SIGKILL when the transfer ends;
//! - the target does not run it (its restore failed, hung or went
//!   unanswered): the page server is aborted (`Agent::abort_lazy`), CRIU
//!   lets go of the tree, the tasks get SIGCONT and the job runs on here
//!   with all its memory. The record and the history say so, with the
//!   target's CRIU error lines; the balancer's next move of it is a full
//!   copy.
//!
//! The node's CRIU lock is held only until the page server is up (the
//! parasite work that concurrent dumps trip over is over by then), not for
//! the whole transfer, and every wait here is bounded (see
//! [`crate::criu::deadline_for`]).
//!
//! **Target.** The restore runs with a deadline ([`CriuCall::LazyRestore`])
//! and is stopped as soon as the lazy-pages daemon fails; the daemon is
//! watched afterwards too (`Agent::watch_lazy_daemon`).
//!
//! **Not walking into it.** Some things a lazy restore cannot rebuild while
//! the source still holds them: a FIFO with unread data (the restore's
//! write into the same FIFO fails, or doubles the data), a file lock or a
//! lease (the restored task waits for the frozen source's lock: a
//! deadlock). [`blockers`] finds them in /proc before anything is frozen;
//! an explicit post-copy request is then refused unless forced, and the
//! balancer's (post-copy where safe) falls back to full copy, with the
//! reason in the migration record.

#[path = "blockers.rs"]
pub mod blockers;

use super::{image_rel, DumpResult, CLAIM_FILE};
use crate::agent::{io_error, reaper, Agent, AgentError, AgentResult};
use crate::core::job::{MigrationPhase, PendingMigration};
use crate::core::{
    now_unix_ms, JobId, JobRecord, JobState, MigrationId, MigrationRecord, NodeName,
};
use crate::criu::{deadline_for, CriuCall, DumpSpec, PageServer, LAZY_LOG};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an aborted page server gets to end by itself before CRIU is
/// killed (it only has to notice a closed connection).
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// How long CRIU gets to let go of the tree once killed.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// After a failed or unanswered Restore, how long the source waits for the
/// target to let go of the images' claim (the target's own restore deadline
/// is [`CriuCall::LazyRestore`]; this leaves a margin on top).
const CLAIM_PATIENCE: Duration = Duration::from_secs(12);

/// A post-copy dump still serving pages.
pub(crate) struct LazyDump {
    handle: tokio::task::JoinHandle<Result<(), crate::criu::CriuError>>,
    pub(crate) pid: i32,
    page_server: PageServer,
    rss_bytes: u64,
}

/// What became of a post-copy whose Restore call failed (shared path).
enum Settled {
    /// The target restored the job after all (its reply was lost).
    Landed,
    /// The target does not run it and never will: the claim is ours.
    Ours,
}

/// Send `sig` to every process of the tree rooted at `root`.
pub(crate) fn signal_tree(root: i32, sig: nix::sys::signal::Signal) {
    for pid in crate::core::procfs::tree_pids(root) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Let a tree that a dump left stopped here run on, without a restore:
/// undo what the dump did to a job with its own address (its connections
/// in TCP repair mode, CRIU's lock, its link taken down), in the order
/// CRIU undoes a dump, then SIGCONT.
pub(crate) fn resume_stopped_tree(job: &JobId, pid: i32) {
    if crate::agent::jobnet::has_own_netns(pid) {
        match crate::agent::jobnet::repair_off(pid) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(job = %job, "{n} connection(s) out of TCP repair mode"),
            Err(e) => tracing::warn!(job = %job, "{e}"),
        }
        if let Err(e) = crate::agent::jobnet::unlock(pid) {
            tracing::warn!(job = %job, "{e}");
        }
    }
    crate::agent::jobnet::set_link(&crate::agent::jobnet::host_veth(job.as_str()), true);
    signal_tree(pid, nix::sys::signal::Signal::SIGCONT);
}

impl Agent {
    /// Post-copy, source side: dump everything but memory, then serve the
    /// memory from a CRIU page server. Returns once the page server listens.
    pub(crate) async fn checkpoint_lazy(
        self: &Arc<Self>,
        rec: &mut JobRecord,
        pid: i32,
        mig: &MigrationId,
        to: &NodeName,
    ) -> AgentResult<(DumpResult, PageServer, LazyDump)> {
        self.engine.available()?;
        let ip = self
            .cfg
            .page_server_ip
            .ok_or_else(|| AgentError::FailedPrecondition("no page-server address".into()))?;
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| io_error("choosing a page-server port", e))?
            .port();
        let ps = PageServer {
            address: ip.to_string(),
            port,
        };
        let rel = image_rel(&rec.id, mig);
        let dir = self.image_dir(&rel);
        crate::criu::create_image_dir(&dir).map_err(|e| io_error("create image dir", e))?;
        let rss_bytes = crate::core::procfs::tree_rss_bytes(pid);
        self.announce_freeze(rec, pid, Some(to)).await;
        self.check_service_connections(rec, pid)?;
        rec.state = JobState::Migrating;
        rec.pending = Some(PendingMigration {
            id: mig.clone(),
            from: self.cfg.node.clone(),
            to: Some(to.clone()),
            phase: MigrationPhase::Dumping,
            image_dir: rel.clone(),
            started_unix_ms: now_unix_ms(),
            post_copy: true,
            nice_before_dump: self.before_dump(pid),
        });
        self.record_dumping(rec, pid)?;
        let (rd, wr) = nix::unistd::pipe().map_err(|e| io_error("status pipe", e.into()))?;
        let guard = self.criu_lock.clone().lock_owned().await;
        let engine = self.engine.clone();
        let spec = DumpSpec {
            pid,
            page_socket: None,
            image_dir: dir.clone(),
            leave_running: false,
            lazy: Some(ps.clone()),
            status_fd: Some(std::os::fd::AsRawFd::as_raw_fd(&wr)),
            prev_images_dir: None,
            keep_stopped: true,
            // The call ends with the page transfer: bounded by our caller
            // (finish_lazy / abort_lazy), and until the page server is up
            // by the wait just below.
            deadline: None,
            post_dump: None,
            own_net: rec.net.is_some(),
        };
        let t0 = Instant::now();
        // Frames reaching it from here on are sent on once it runs on the
        // target (`confirm_and_clean`), as in a full copy (see `replay`).
        self.hold_frames(rec);
        // Until the page server is up (the frozen part), as in a full copy.
        let squeeze = self.squeeze_jobs();
        let handle = tokio::task::spawn_blocking(move || {
            let r = engine.dump(&spec);
            drop(wr);
            r
        });
        let until_ready = deadline_for(CriuCall::Dump, rss_bytes);
        let ready = Self::blocking(move || {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use std::os::fd::AsFd;
            let until = Instant::now() + until_ready;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // CRIU is stuck before the page server: kill it, which
                    // releases the tree (the job runs on) and ends the call.
                    if let Some(t) = crate::core::procfs::tracer(pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(t),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    return false;
                }
                let ms = left.as_millis().min(1000) as u16;
                let mut fds = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                    Ok(_) => {
                        let mut b = [0u8; 1];
                        return matches!(nix::unistd::read(&rd, &mut b), Ok(1));
                    }
                    Err(_) => return false,
                }
            }
        })
        .await?;
        // The parasite work is over once the page server listens; serving
        // pages must not hold up the node's other migrations.
        drop(squeeze);
        drop(guard);
        if !ready {
            let err = match handle.await {
                Ok(Err(e)) => AgentError::from(e),
                Ok(Ok(())) => AgentError::Aborted("CRIU ended without serving pages".into()),
                Err(e) => AgentError::Internal(format!("dump task: {e}")),
            };
            self.dump_failed(rec, pid, &dir)?;
            return Err(err.context(&format!(
                "post-copy dump of job {} failed; it keeps running on {}",
                rec.id, self.cfg.node
            )));
        }
        let frozen_ms = t0.elapsed().as_millis() as u64;
        if rec.net.is_some() {
            // The stopped source must not answer for the address the
            // target is about to take (its link comes back on a rollback).
            crate::agent::jobnet::left_here(&rec.id, true);
        }
        let image_bytes = self.seal(&dir, &rec.id, mig, Default::default()).await?;
        Ok((
            DumpResult {
                image_dir: rel,
                image_bytes,
                frozen_ms,
            },
            ps.clone(),
            LazyDump {
                handle,
                pid,
                page_server: ps,
                rss_bytes,
            },
        ))
    }

    /// Post-copy, source side, after the target restored the job: wait
    /// (bounded) until every page was served, then kill the old copy.
    ///
    /// Its tasks are stopped first: CRIU still holds them, so the SIGSTOP
    /// waits, and whichever way CRIU lets go of them (stopped after a
    /// transfer that ended, resumed after one that failed, detached by its
    /// own death) they never run again here: the job runs on the target.
    /// If the transfer failed, the target's daemon failed too, and the
    /// target reports the job failed rather than run it on missing memory.
    pub(crate) async fn finish_lazy(
        self: &Arc<Self>,
        job: &JobId,
        lazy: LazyDump,
    ) -> AgentResult<()> {
        signal_tree(lazy.pid, nix::sys::signal::Signal::SIGSTOP);
        let limit = deadline_for(CriuCall::LazyTransfer, lazy.rss_bytes);
        let (ok, why) = self.end_dump(lazy.handle, lazy.pid, limit).await;
        let _ = self.set_dumping(job, false);
        if let Ok(mut l) = self.local.lock() {
            l.remove(job);
        }
        reaper::end_source_copy(lazy.pid, None, reaper::COPY_EXIT_PATIENCE).await;
        crate::agent::jobnet::left_here(job, false);
        if ok {
            return Ok(());
        }
        tracing::error!(job = %job, "post-copy page transfer failed after the job started on the target: {why}");
        Err(AgentError::Aborted(format!(
            "post-copy page transfer of job {job} failed after it had started on the target ({why}); the job is stopped and reported failed rather than run with missing memory or resumed twice"
        )))
    }

    /// Wait for a post-copy dump to end, killing CRIU if it has not after
    /// `limit`. Returns whether CRIU reported success, and why not.
    async fn end_dump(
        &self,
        mut handle: tokio::task::JoinHandle<Result<(), crate::criu::CriuError>>,
        pid: i32,
        limit: Duration,
    ) -> (bool, String) {
        let first = tokio::time::timeout(limit, &mut handle).await;
        let r = match first {
            Ok(r) => r,
            Err(_) => {
                let tracer = crate::core::procfs::tracer(pid);
                tracing::warn!(
                    pid,
                    ?tracer,
                    "post-copy dump still running after {} s; killing CRIU",
                    limit.as_secs()
                );
                if let Some(t) = tracer {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(t),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                match tokio::time::timeout(KILL_GRACE, &mut handle).await {
                    Ok(r) => r,
                    Err(_) => {
                        return (
                            false,
                            format!("CRIU did not end within {} s", limit.as_secs()),
                        )
                    }
                }
            }
        };
        match r {
            Ok(Ok(())) => (true, String::new()),
            Ok(Err(e)) => (false, e.to_string()),
            Err(e) => (false, format!("dump task: {e}")),
        }
    }

    /// Post-copy, source side, when the target does not run the job: make
    /// CRIU let go of the frozen tree and let it run on here. Returns the
    /// job's pid if it is alive.
    ///
    /// CRIU's page server either still waits for the target's daemon (the
    /// restore failed before handing over its tasks, so the daemon never
    /// connected) or serves one that is stuck. A connection that closes at
    /// once ends the first; CRIU, its transfer "done", leaves the tree
    /// stopped. If that does not end it, CRIU is killed, which detaches it
    /// from the tree (the kernel resumes ptrace-stopped tasks when their
    /// tracer dies; their memory was never unmapped). Either way the tasks
    /// then get SIGCONT.
    async fn abort_lazy(&self, job: &JobId, lazy: LazyDump) -> Option<i32> {
        let addr = format!("{}:{}", lazy.page_server.address, lazy.page_server.port);
        let poke = Self::blocking(move || {
            if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
                let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1));
            }
        });
        let _ = poke.await;
        let (_, why) = self.end_dump(lazy.handle, lazy.pid, ABORT_GRACE).await;
        if !why.is_empty() {
            tracing::info!(job = %job, "post-copy page server ended: {why}");
        }
        self.release_stopped_tree(job, lazy.pid)
    }

    /// A tree a dump left stopped, that CRIU no longer holds: let it run on
    /// here. Returns the job's pid if it is alive.
    pub(crate) fn release_stopped_tree(&self, job: &JobId, pid: i32) -> Option<i32> {
        let exited = self.set_dumping(job, false);
        let alive = exited.is_none() && reaper::is_pidns_init(pid);
        if alive {
            resume_stopped_tree(job, pid);
            return Some(pid);
        }
        if let Ok(mut l) = self.local.lock() {
            l.remove(job);
        }
        if let Some(st) = exited {
            self.record_exit(job, pid, Some(st));
        }
        None
    }

    /// A move whose pages were streamed (see `direct::stream`) landed: the
    /// stopped tree here is not the job any more.
    pub(crate) async fn drop_stopped_tree(
        &self,
        job: &JobId,
        tree: &super::direct::stream::StoppedTree,
    ) {
        let _ = self.set_dumping(job, false);
        if let Ok(mut l) = self.local.lock() {
            l.remove(job);
        }
        reaper::end_source_copy(tree.pid, Some(tree.start), reaper::COPY_EXIT_PATIENCE).await;
        // A job with its own address: its veth goes too (a no-op without).
        crate::agent::jobnet::left_here_soon(job);
    }

    /// A move whose pages were streamed failed, and the target does not
    /// and will not run the job: let its stopped tree run on here.
    pub(crate) async fn resume_after_failed_stream(
        self: &Arc<Self>,
        job: &JobId,
        target: &NodeName,
        mig: &MigrationId,
        started: Instant,
        cause: AgentError,
        tree: super::direct::stream::StoppedTree,
    ) -> AgentError {
        self.own_again_before_resuming(job, target).await;
        let pid = if tree.is_there() {
            self.release_stopped_tree(job, tree.pid)
        } else {
            None
        };
        let adopt = pid.is_some()
            && self
                .local
                .lock()
                .map(|l| !l.contains_key(job))
                .unwrap_or(false);
        let err = self
            .resumed_here(job, target, mig, started, cause, pid, false)
            .await;
        if let (true, Some(pid), Ok(rec)) = (adopt, pid, self.registry.get(job)) {
            // Stopped under an agent that has restarted since: watch it anew.
            if rec.state == JobState::Running {
                self.adopt_orphan(&rec, pid);
            }
        }
        err
    }

    /// The target does not run the job and never will: take it back.
    /// Records the truth (running here with all its memory, or failed with
    /// the images kept) and returns the migration's error.
    pub(crate) async fn resume_after_failed_post_copy(
        self: &Arc<Self>,
        job: &JobId,
        target: &NodeName,
        mig: &MigrationId,
        started: Instant,
        cause: AgentError,
        lazy: LazyDump,
    ) -> AgentError {
        self.own_again_before_resuming(job, target).await;
        let pid = self.abort_lazy(job, lazy).await;
        self.resumed_here(job, target, mig, started, cause, pid, true)
            .await
    }

    /// Before a tree left stopped here runs on: with etcd the target became
    /// the job's owner before its restore, so the ownership comes back here
    /// too (logged, not fatal, as the tree is the job's only copy).
    async fn own_again_before_resuming(&self, job: &JobId, target: &NodeName) {
        if let Err(e) = self.take_owner_back(job).await {
            tracing::error!(job = %job, "the job resumes here but its ownership could not be taken back from {target}: {e}");
        }
    }

    /// The end of a failed move whose source kept the job's tree stopped
    /// (post-copy, or streamed pages): record the truth, running here with
    /// all its memory (`pid`), or failed if the tree is gone.
    #[allow(clippy::too_many_arguments)]
    async fn resumed_here(
        self: &Arc<Self>,
        job: &JobId,
        target: &NodeName,
        mig: &MigrationId,
        started: Instant,
        cause: AgentError,
        pid: Option<i32>,
        post_copy: bool,
    ) -> AgentError {
        let what = if post_copy {
            "post-copy migration"
        } else {
            "migration"
        };
        let dir = self.image_dir(&image_rel(job, mig));
        let image_bytes = super::dir_bytes(&dir);
        let frozen_ms = started.elapsed().as_millis() as u64;
        let mut rec = match self.registry.get(job) {
            Ok(r) => r,
            Err(e) => {
                return AgentError::Aborted(format!(
                    "{what} of job {job} to {target} failed ({cause}), and its record cannot be read ({e})"
                ))
            }
        };
        let Some(pid) = pid else {
            if rec.state == JobState::Exited {
                return AgentError::Aborted(format!(
                    "{what} of job {job} to {target} failed ({cause}); the job had ended meanwhile"
                ));
            }
            let msg = format!(
                "{what} of job {job} to {target} failed ({cause}) and its processes on {} were gone when it was taken back; images and CRIU logs are kept in {}",
                self.cfg.node,
                dir.display()
            );
            rec.state = JobState::Failed;
            rec.pid = 0;
            rec.pending = None;
            rec.error = msg.clone();
            let _ = self.registry.put(&mut rec);
            if let Some(n) = &rec.net {
                self.release_address(&rec.id, n);
            }
            tracing::error!(job = %job, "{msg}");
            return AgentError::Aborted(msg);
        };
        if let Some(p) = &rec.pending {
            self.after_dump(pid, &p.nice_before_dump);
        }
        let started_unix_ms = rec
            .pending
            .as_ref()
            .map(|p| p.started_unix_ms)
            .unwrap_or_else(now_unix_ms);
        let error = format!(
            "{cause}; the job resumed on {} with all its memory",
            self.cfg.node
        );
        rec.history.push(MigrationRecord {
            id: mig.clone(),
            from: self.cfg.node.clone(),
            to: target.clone(),
            started_unix_ms,
            frozen_ms,
            total_ms: frozen_ms,
            ok: false,
            error: error.clone(),
            image_bytes,
            post_copy,
            pre_copy_rounds: 0,
            pre_copy_bytes: 0,
            fallback: String::new(),
            restored_from_checkpoint: 0,
        });
        rec.node = self.cfg.node.clone();
        rec.state = JobState::Running;
        rec.pid = pid;
        rec.pending = None;
        rec.error.clear();
        if let Err(e) = self.registry.put(&mut rec) {
            tracing::error!(job = %job, "cannot record the job back on {}: {e}", self.cfg.node);
        }
        if let Some(n) = &rec.net {
            // The target's restore had the same MAC on its own bridge, and
            // the bridges on the way may have learnt that port: announce the
            // address from here again, or it stays unreachable until their
            // entries age out (seen: a job that never answered again).
            match crate::agent::jobnet::announce(pid, n) {
                Ok(()) => tracing::debug!(job = %job, ip = %n.ip, "address announced again"),
                Err(e) => tracing::warn!(job = %job, ip = %n.ip, "{e}"),
            }
        }
        self.events.running(&rec, &self.cfg.node);
        let _ = std::fs::remove_dir_all(&dir);
        tracing::warn!(job = %job, to = %target, frozen_ms, "{what} failed; the job resumed here: {cause}");
        let next = if post_copy {
            " (its next automatic move will be a full copy)"
        } else {
            ""
        };
        AgentError::Aborted(format!(
            "{what} of job {job} to {target} failed: {cause}; the job resumed on {} with all its memory after {frozen_ms} ms frozen{next}",
            self.cfg.node
        ))
    }

    /// With a shared path, after the target's Restore failed or went
    /// unanswered: did it land after all (its reply lost), or is it ours?
    /// The target claims the images before it restores and releases the
    /// claim when it fails; taking the claim ourselves makes sure it never
    /// restores them later. A target that keeps the claim beyond its own
    /// restore deadline is dead or stuck: its restore cannot finish without
    /// our page server, which is about to close, and a copy that did would
    /// find the job taken back (see `restore_here`).
    async fn settle_claim(&self, job: &JobId, target: &NodeName, mig: &MigrationId) -> Settled {
        let claim = self.image_dir(&image_rel(job, mig)).join(CLAIM_FILE);
        let until = Instant::now() + CLAIM_PATIENCE;
        loop {
            if let Ok(rec) = self.registry.get(job) {
                if rec.node == *target
                    && rec.state == JobState::Running
                    && rec.history.last().is_some_and(|m| m.id == *mig)
                {
                    return Settled::Landed;
                }
            }
            match super::create_claim(&claim, &format!("{} {} taken-back", self.cfg.node, mig)) {
                Ok(_) => return Settled::Ours,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::warn!(job = %job, "cannot claim the images back: {e}");
                    return Settled::Ours;
                }
            }
            if Instant::now() >= until {
                tracing::warn!(job = %job, to = %target, "the target still holds the images' claim after {} s; taking the job back", CLAIM_PATIENCE.as_secs());
                return Settled::Ours;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The whole post-copy move with a shared path.
    pub(crate) async fn migrate_post_copy(
        self: &Arc<Self>,
        mut rec: JobRecord,
        pid: i32,
        target: &NodeName,
        mig: MigrationId,
        started: Instant,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        let job = rec.id.clone();
        let (dumped, ps, lazy) = self
            .checkpoint_lazy(&mut rec, pid, &mig, target)
            .await
            .inspect_err(|_| {
                self.metrics
                    .migration_failures
                    .with_label_values(&["dump"])
                    .inc()
            })?;
        let call = self
            .hand_over(
                &mut rec,
                &mig,
                started,
                dumped.image_bytes,
                Some(ps),
                target,
            )
            .await?;
        let dir = self.image_dir(&dumped.image_dir);
        let landed = match self.peers.restore(target, call).await {
            Ok(_) => Ok(()),
            Err(cause) => match self.settle_claim(&job, target, &mig).await {
                Settled::Landed => {
                    tracing::warn!(job = %job, "the target's Restore reply was lost ({cause}), but the job landed there");
                    Ok(())
                }
                Settled::Ours => Err(cause),
            },
        };
        match landed {
            Ok(()) => {
                let frozen_ms = started.elapsed().as_millis() as u64;
                self.finish_lazy(&job, lazy).await?;
                self.confirm_and_clean(&job, target, &dir, started, frozen_ms, true)
            }
            Err(cause) => {
                self.metrics
                    .migration_failures
                    .with_label_values(&["restore"])
                    .inc();
                Err(self
                    .resume_after_failed_post_copy(&job, target, &mig, started, cause, lazy)
                    .await)
            }
        }
    }

    /// Post-copy, target side: the restored job runs while its memory
    /// arrives. If the lazy-pages daemon fails (the source died, the network
    /// broke), pages are missing: the job is stopped and reported failed
    /// rather than left to run on zero-filled memory.
    pub(crate) fn watch_lazy_daemon(
        self: &Arc<Self>,
        job: JobId,
        pid: i32,
        daemon: Arc<std::sync::Mutex<std::process::Child>>,
        dir: PathBuf,
    ) {
        let agent = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("lazy-{pid}"))
            .spawn(move || {
                let ok = loop {
                    let st = daemon.lock().map(|mut d| d.try_wait());
                    match st {
                        Ok(Ok(Some(s))) => break s.success(),
                        Ok(Ok(None)) => std::thread::sleep(Duration::from_millis(50)),
                        _ => break false,
                    }
                };
                let _ = std::fs::remove_file(dir.join("lazy-pages.socket"));
                // The daemon also ends with success when the job ended first
                // (its pages are then dropped): that end is only trusted if
                // every page had arrived by then.
                if ok && super::lazy_transfer_complete(&dir.join(LAZY_LOG)) {
                    return;
                }
                // Record the verdict before the kill, so the reaper, seeing a
                // job already failed, does not call it an ordinary exit.
                let verdict = agent.verdict_lock.lock();
                if let Ok(mut rec) = agent.registry.get(&job) {
                    // Only if the job is still recorded here: a source that
                    // resumed its copy has taken the job back already. A job
                    // that already died (typically on a missing page: a
                    // crash) before this thread woke failed the same way;
                    // its recorded end is kept in the message.
                    let ended_here = rec.state == JobState::Exited
                        && rec
                            .history
                            .last()
                            .is_some_and(|m| m.post_copy && m.to == agent.cfg.node);
                    let ours = rec.node == agent.cfg.node && (rec.pid == pid || ended_here);
                    if ours {
                        let ended = if ended_here {
                            format!(
                                " (it had already ended: exit code {:?}, signal {:?})",
                                rec.exit_code, rec.exit_signal
                            )
                        } else {
                            String::new()
                        };
                        rec.state = JobState::Failed;
                        rec.pid = 0;
                        rec.error = format!(
                            "post-copy: not every memory page arrived; the job was stopped on {} rather than run with missing memory{ended} (log: {})",
                            agent.cfg.node,
                            dir.join(LAZY_LOG).display()
                        );
                        let _ = agent.registry.put(&mut rec);
                        if let Some(n) = &rec.net {
                            agent.release_address(&rec.id, n);
                        }
                    }
                }
                drop(verdict);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                tracing::error!(job = %job, "post-copy page transfer failed; job stopped");
            });
        if let Err(e) = spawned {
            tracing::error!("cannot watch lazy-pages daemon: {e}");
        }
    }
}

/// Whether a restore of `call` is a post-copy one (its pages come from a
/// page server), for the target's restore deadline.
pub(crate) fn restore_deadline(call_is_lazy: bool, image_bytes: u64) -> Duration {
    if call_is_lazy {
        deadline_for(CriuCall::LazyRestore, image_bytes)
    } else {
        deadline_for(CriuCall::Restore, image_bytes)
    }
}

/// The history entry of a post-copy move that fell back to full copy.
pub(crate) fn fallback_note(blockers: &[blockers::Blocker]) -> String {
    format!(
        "post-copy not used: {}; moved by full copy",
        blockers::describe(blockers)
    )
}
