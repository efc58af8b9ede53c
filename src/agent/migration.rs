//! The migration protocol, run by the source agent:
//!
//! 1. **Check**: the job runs here, the target is known and answers, no other
//!    operation is under way on the job. Nothing is frozen before this.
//! 2. **Dump**: the registry records phase `dumping`; CRIU checkpoints the job
//!    into `<shared>/images/<job>/<migration>/` and kills it. If the dump
//!    fails, CRIU has resumed the job, which keeps running here. With
//!    [`Mode::PreCopy`], pre-dump rounds copy most memory first while the job
//!    runs, and this dump only adds the rest (see [`super::precopy`]).
//! 3. **Seal**: every image file is fsynced and a manifest with an HMAC under
//!    the cluster key is written (phase `dumped`). Only now is the source copy
//!    gone for good.
//! 4. **Restore** on the target, which verifies the manifest, claims the
//!    images (an exclusive `CLAIM` file, so two nodes can never both restore
//!    them), restores, and writes the record with the job on the target.
//! 5. **Confirm** that the registry shows the job running on the target, then
//!    **clean up** the images.
//!
//! If the restore fails, the source restores the job from the same images
//! (rollback). If that fails too, the job is marked failed and its images and
//! CRIU logs are kept for a person. A job is never lost, and the claim file
//! makes sure it never runs twice.
//!
//! Without a shared path the same steps run, with the images streamed to the
//! target in between: see [`direct`].
//!
//! Files: this one holds the protocol's frame (checks, hand-over, confirm,
//! roll back); `dump.rs` steps 2 and 3 on the source; `restore.rs` step 4 on
//! the target; `postcopy.rs` and `direct/` the variants.

// A child module, so it can call this protocol's steps as they are.
#[path = "direct/mod.rs"]
pub mod direct;
#[path = "dump.rs"]
mod dump;
#[path = "postcopy.rs"]
pub mod postcopy;
#[path = "restore.rs"]
mod restore;

pub(crate) use postcopy::LazyDump;
pub(crate) use restore::Arrival;

use super::{portable, Agent, AgentError, AgentResult};
use crate::core::job::{MigrationPhase, PendingMigration};
use crate::core::{JobId, JobRecord, JobState, MigrationId, MigrationRecord, NodeName};
use crate::criu::{PageServer, DUMP_LOG, LAZY_LOG, RESTORE_LOG};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Files in an image directory that are not covered by the manifest, because
/// they are written after it (logs, the claim).
pub const UNSEALED: &[&str] = &[
    DUMP_LOG,
    RESTORE_LOG,
    LAZY_LOG,
    CLAIM_FILE,
    "stats-restore",
    // Post-copy: CRIU writes these after the manifest (the dump's statistics
    // once all pages are served; the lazy-pages daemon's socket).
    crate::criu::DUMP_STATS,
    "lazy-pages.socket",
    // A move whose pages were streamed: the source's stopped tree, for its
    // recovery (see `direct::stream`); never leaves the source.
    super::direct::stream::STOPPED_TREE,
];
pub const CLAIM_FILE: &str = "CLAIM";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Auto,
    FullCopy,
    /// Post-copy, asked for explicitly: refused for a job that holds what a
    /// lazy restore cannot take over (see [`postcopy::blockers`]).
    PostCopy,
    /// [`Mode::PostCopy`] past that refusal (the move then fails, and the
    /// job resumes on its source).
    PostCopyForced,
    /// Post-copy where available and safe, full copy otherwise (the
    /// balancer's choice for large jobs).
    PostCopyIfSafe,
    /// Iterative pre-copy where the source kernel tracks dirty memory, else
    /// full copy (see `super::precopy`).
    PreCopy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RestoreCall {
    pub job: JobId,
    pub migration: MigrationId,
    pub page_server: Option<PageServer>,
    pub from: Option<NodeName>,
    pub frozen_before_ms: u64,
    pub image_bytes: u64,
}

/// See [`Agent::checkpoint_calling`].
pub(super) type OnDumping<'a> = Box<dyn FnOnce(&JobRecord) + Send + 'a>;

#[derive(Debug, Clone, PartialEq)]
pub struct DumpResult {
    pub image_dir: String,
    pub image_bytes: u64,
    pub frozen_ms: u64,
}

/// Counters the balancer reads through GetLoad.
#[derive(Default)]
pub struct MigrationStats {
    in_flight: AtomicU32,
    /// Bytes per second of recent migrations (EWMA), 0 = unknown.
    bandwidth: Mutex<f64>,
}

impl MigrationStats {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth.lock().map(|b| *b).unwrap_or(0.0)
    }
    fn observe(&self, bytes: u64, secs: f64) {
        // Small images say nothing about bandwidth: their time is CRIU's
        // fixed cost (freezing, parsing /proc), already in the policy's
        // fixed_cost_secs.
        if secs <= 0.0 || bytes < (32 << 20) {
            return;
        }
        if let Ok(mut b) = self.bandwidth.lock() {
            let sample = bytes as f64 / secs;
            *b = if *b == 0.0 {
                sample
            } else {
                0.7 * *b + 0.3 * sample
            };
        }
    }
}

struct InFlight<'a>(&'a MigrationStats);
impl<'a> InFlight<'a> {
    fn new(s: &'a MigrationStats) -> Self {
        s.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(s)
    }
}
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a job's images for one migration live, relative to the shared root.
pub fn image_rel(job: &JobId, mig: &MigrationId) -> String {
    format!("images/{job}/{mig}")
}

pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// How long the deletion of a finished migration's images waits, so that
/// the reply to the migration's caller is not slowed by it (measured: the
/// last ~4 ms between the agent's log of the move and `mosctl` exiting).
const DELETE_IMAGES_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Delete a migration's images on a thread of its own: deleting a GiB takes
/// a while and nothing waits for it. (Not at a low priority: a starved
/// thread in the middle of truncating a big file holds file-system journal
/// resources that registry writes wait for.) `MOSIX_KEEP_CRIU_LOGS` in the
/// agent's environment keeps `dump.log`/`restore.log` of successful moves
/// too, to compare CRIU's own timings.
pub(crate) fn remove_images_in_background(dir: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("rm-images".into())
        .spawn(move || {
            // Let the reply go out first: freeing a GiB of page cache takes
            // a core for a while, and the caller is waiting on that reply.
            std::thread::sleep(DELETE_IMAGES_AFTER);
            if std::env::var_os("MOSIX_KEEP_CRIU_LOGS").is_some() {
                remove_images_keep_logs(&dir);
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to delete images: {e}");
    }
}

/// After a failed dump: drop the partial images, keep CRIU's log (the error
/// message points at it).
pub(crate) fn remove_images_keep_logs(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            if !UNSEALED.iter().any(|u| name == *u) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Whether CRIU's lazy-pages log shows every page of every process
/// delivered. At `-v4` it logs `UFFD transferred pages: (copied/total)` per
/// process when it lets go of it: at the end of the transfer, or when the
/// process ended before its memory had all arrived (copied < total). No
/// such line: nothing says the transfer fell short.
fn lazy_transfer_complete(log: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(log) else {
        return true;
    };
    let short = |line: &str| -> Option<bool> {
        let (_, rest) = line.split_once("UFFD transferred pages: (")?;
        let (counts, _) = rest.split_once(')')?;
        let (copied, total) = counts.split_once('/')?;
        Some(copied.trim().parse::<u64>().ok()? < total.trim().parse::<u64>().ok()?)
    };
    !text.lines().any(|l| short(l) == Some(true))
}

/// Create a claim file with O_EXCL (atomic on local file systems, NFSv3+
/// and sshfs) holding `line`: Ok for the one node that gets it,
/// `AlreadyExists` for everyone after. Writing the line is best
/// effort: the claim is the file's existence.
pub(super) fn create_claim(path: &Path, line: &str) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let _ = writeln!(f, "{line}");
    Ok(f)
}

impl Agent {
    pub(crate) fn image_dir(&self, rel: &str) -> PathBuf {
        self.cfg.shared_root.join(rel)
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> AgentResult<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| AgentError::Internal(format!("worker thread failed: {e}")))
    }

    fn set_dumping(&self, job: &JobId, on: bool) -> Option<super::reaper::ExitStatus> {
        let mut l = self.local.lock().ok()?;
        let j = l.get_mut(job)?;
        j.dumping = on;
        if on {
            None
        } else {
            j.exited_during_dump.take()
        }
    }

    /// Freeze: checkpoint to disk and stop. The job uses nothing until thawed.
    pub async fn freeze(self: &Arc<Self>, job: &JobId) -> AgentResult<JobRecord> {
        let _busy = self.claim(job)?;
        let (mut rec, pid) = self.local_running(job)?;
        if rec.non_migratable {
            return Err(AgentError::FailedPrecondition(format!(
                "job {job} is marked non-migratable"
            )));
        }
        let mig = MigrationId::generate();
        let _f = InFlight::new(&self.stats);
        self.checkpoint(&mut rec, pid, &mig, None, false, None)
            .await?;
        rec.state = JobState::Frozen;
        rec.pid = 0;
        if let Some(p) = rec.pending.as_mut() {
            p.phase = MigrationPhase::Frozen;
        }
        self.registry.put(&mut rec)?;
        tracing::info!(job = %job, "frozen");
        Ok(rec)
    }

    /// Thaw a frozen job on this node.
    pub async fn thaw(self: &Arc<Self>, job: &JobId) -> AgentResult<JobRecord> {
        let _busy = self.claim(job)?;
        let rec = self.registry.get(job)?;
        let pending = match (&rec.state, &rec.pending) {
            (JobState::Frozen, Some(p)) => p.clone(),
            _ => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {job} is {}, not frozen",
                    rec.state.as_str()
                )))
            }
        };
        // A move whose pages were streamed keeps no pages here: the job is
        // its stopped tree, which runs on instead.
        if let Some(r) = self.thaw_streamed(job, &pending).await {
            return r;
        }
        self.restore_here(job, &pending.id, None, Arrival::Thawed)
            .await
    }

    /// The directories whose files every node has: the shared root (when
    /// it is shared), the jobs dir and `--common-dir`s.
    fn portable_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.cfg.jobs_dir.clone()];
        if self.cfg.shared {
            dirs.push(self.cfg.shared_root.clone());
        }
        dirs.extend(self.cfg.common_dirs.iter().cloned());
        dirs
    }

    /// Migrate RPC (run on the source node).
    pub async fn migrate(
        self: &Arc<Self>,
        job: &JobId,
        target: &NodeName,
        mig: Option<MigrationId>,
        mode: Mode,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        tracing::debug!(job = %job, "step: migrate call received");
        if !self.peers.knows(target) {
            return Err(AgentError::NotFound(format!(
                "unknown node {target}; the cluster has: {}",
                self.peers.names().join(", ")
            )));
        }
        let _busy = self.claim(job)?;
        let (mut rec, pid) = self.local_running(job)?;
        if target == &self.cfg.node {
            return Err(AgentError::FailedPrecondition(format!(
                "job {job} is already on {target}"
            )));
        }
        if rec.non_migratable {
            return Err(AgentError::FailedPrecondition(format!(
                "job {job} is marked non-migratable"
            )));
        }
        if rec.pinned {
            return Err(AgentError::FailedPrecondition(
                super::admin::pinned_message(job.as_str()),
            ));
        }
        // Files only this node has would not be found by the restore on the
        // target (see `portable`): refuse before anything is frozen.
        let private = portable::node_private_files(pid, &self.portable_dirs());
        if !private.is_empty() {
            return Err(AgentError::FailedPrecondition(portable::describe(
                job.as_str(),
                self.cfg.node.as_str(),
                &private,
            )));
        }
        // Connections that cannot move with it (see `jobnet`), also
        // before anything is frozen. A service instance is checked once
        // its front ends have let go of it (`checkpoint_onto`).
        if rec.service.is_none() {
            self.check_connections_can_move(&rec, pid)?;
        }
        // What a lazy restore cannot take over while the source still holds
        // it (see `postcopy::blockers`), looked at before anything is frozen.
        let wants_post_copy = matches!(
            mode,
            Mode::PostCopy | Mode::PostCopyForced | Mode::PostCopyIfSafe
        );
        let blockers = if wants_post_copy {
            postcopy::blockers::lazy_restore_blockers(pid)
        } else {
            Vec::new()
        };
        let mut fallback = String::new();
        if !blockers.is_empty() {
            let why = postcopy::blockers::describe(&blockers);
            match mode {
                Mode::PostCopy => {
                    return Err(AgentError::FailedPrecondition(format!(
                        "post-copy of job {job} refused: {why}; move it by full copy (the default), or force post-copy (`mosctl migrate --post-copy --force`) to try anyway"
                    )))
                }
                Mode::PostCopyForced => {
                    tracing::warn!(job = %job, "post-copy forced although {why}");
                }
                _ => {
                    fallback = postcopy::fallback_note(&blockers);
                    tracing::warn!(job = %job, "{fallback}");
                }
            }
        }
        // A capped node's other jobs are squeezed for the whole move (see
        // `squeeze_jobs`), from before the ping: once squeezed, they run on
        // to the scheduler's next tick and the node's quota to its next
        // period, ~8 ms that were frozen time when the squeeze came with the
        // dump, and pass while the job still runs now. Post-copy takes it
        // for its dump only (its transfer may last seconds).
        let _squeeze = (!wants_post_copy).then(|| self.squeeze_jobs()).flatten();
        let mig = mig.unwrap_or_else(MigrationId::generate);
        // Nothing is frozen until the target has answered.
        let answer = self
            .peers
            .ping(target)
            .await
            .map_err(|e| e.context(&format!("job {job} was not touched")))?;
        // A job with its own address needs a target that can re-create its
        // interface (the bridge): else the restore would fail after the
        // freeze and the move roll back. Refused here, before anything.
        if let Some(net) = rec.net.as_ref().filter(|_| !answer.job_addresses) {
            return Err(AgentError::FailedPrecondition(format!(
                "job {job} has its own address {}, and {target} cannot give jobs their own address (no job address pool there, or its bridge is missing; see its agent's log); it keeps running on {}",
                net.ip, self.cfg.node
            )));
        }
        let target_post_copy = answer.post_copy;
        tracing::debug!(job = %job, "step: target answered");
        // Made while the job still runs, so before the frozen clock starts:
        // at 1,000 connections on an ext4 without a journal this took
        // longer than the freeze itself (BENCHMARKS.md, section 8).
        let mig_dir = self.image_dir(&image_rel(job, &mig));
        let precreated = rec.net.is_some()
            && match crate::criu::create_image_dir(&mig_dir) {
                // A directory in block groups of its own: CRIU's creates
                // there are cheap, and made files would cost more.
                Ok(true) => true,
                Ok(false) => {
                    self.precreate_connection_images(&rec, pid, &mig_dir);
                    true
                }
                Err(_) => false,
            };
        let _f = InFlight::new(&self.stats);
        let started = Instant::now();
        let post_copy = wants_post_copy
            && fallback.is_empty()
            && {
                let ok = self.cfg.post_copy
                    && target_post_copy
                    && self.engine.features().lazy_pages
                    && self.cfg.page_server_ip.is_some();
                if !ok {
                    tracing::warn!(job = %job, "post-copy unavailable (turned off with --no-post-copy, no userfaultfd or big pipes on one end, or no page-server address); full copy instead");
                }
                ok
            };
        // A full copy holds the squeeze to its end, with or without a shared
        // path: taken above already, unless post-copy was asked for and is
        // not possible.
        let _squeezed = (!post_copy).then(|| self.squeeze_jobs()).flatten();
        let note = |(r, mut m): (JobRecord, MigrationRecord)| {
            if m.fallback.is_empty() {
                m.fallback = fallback.clone();
            }
            (r, m)
        };
        if !self.cfg.shared {
            return self
                .migrate_direct(rec, pid, target, mig, started, post_copy, mode)
                .await
                .map(note);
        }
        if post_copy {
            return self.migrate_post_copy(rec, pid, target, mig, started).await;
        }
        // Pre-copy rounds while the job runs, or why not (then full copy).
        let mut pid = pid;
        let pre = self
            .pre_copy_if_asked(mode, &mut rec, &mut pid, &mig)
            .await
            .inspect_err(|_| {
                if precreated {
                    // Nothing was dumped: only the empty files made above.
                    let _ = std::fs::remove_dir_all(&mig_dir);
                }
            })?;
        let frozen_since = pre.frozen_since(started);
        let dumped = self
            .checkpoint_onto(
                &mut rec,
                pid,
                &mig,
                Some(target.clone()),
                false,
                None,
                pre.chain(),
                None,
                None,
            )
            .await
            .inspect_err(|_| {
                self.metrics
                    .migration_failures
                    .with_label_values(&["dump"])
                    .inc()
            })?;
        let call = match self
            .hand_over(
                &mut rec,
                &mig,
                frozen_since,
                dumped.image_bytes,
                None,
                target,
            )
            .await
        {
            Ok(c) => c,
            // The ownership did not move (or the record was refused): the
            // job comes back here from the same images.
            Err(e) => return self.roll_back(job, target, &mig, started, e).await,
        };
        tracing::debug!(job = %job, "step: handed over, calling the target");
        let dir = self.image_dir(&dumped.image_dir);
        match self.peers.restore(target, call).await {
            Ok(_) => {
                let frozen_ms = frozen_since.elapsed().as_millis() as u64;
                tracing::debug!(job = %job, "step: target restored");
                self.stats
                    .observe(dumped.image_bytes, frozen_ms as f64 / 1000.0);
                self.confirm_and_clean(job, target, &dir, started, frozen_ms, false)
                    .map(|(r, m)| note((r, pre.annotate(m))))
            }
            Err(e) => {
                self.metrics
                    .migration_failures
                    .with_label_values(&["restore"])
                    .inc();
                let r = self.roll_back(job, target, &mig, started, e).await;
                self.observe_failed_total(job, started);
                r
            }
        }
    }

    /// A move that did not land: its whole duration, as `rolled_back` if
    /// the job runs here again, else `failed`.
    pub(super) fn observe_failed_total(&self, job: &JobId, started: Instant) {
        let outcome = if self.local_pid(job).is_some() {
            "rolled_back"
        } else {
            "failed"
        };
        self.metrics
            .migration_seconds
            .with_label_values(&["total", outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The images are sealed: record phase `dumped` and build the target's
    /// Restore call.
    async fn hand_over(
        &self,
        rec: &mut JobRecord,
        mig: &MigrationId,
        started: Instant,
        image_bytes: u64,
        page_server: Option<PageServer>,
        target: &NodeName,
    ) -> AgentResult<RestoreCall> {
        // With etcd the target becomes the owner, with a new epoch, by one
        // CAS before it restores anything (see `ownership`).
        self.move_owner_to(&rec.id, target.as_str()).await?;
        if let Some(p) = rec.pending.as_mut() {
            p.phase = MigrationPhase::Dumped;
        }
        self.registry.put(rec)?;
        Ok(RestoreCall {
            job: rec.id.clone(),
            migration: mig.clone(),
            page_server,
            from: Some(self.cfg.node.clone()),
            frozen_before_ms: started.elapsed().as_millis() as u64,
            image_bytes,
        })
    }

    /// Confirm through the registry, the cluster's source of truth, that the
    /// job runs on the target; then remove the images and report.
    fn confirm_and_clean(
        &self,
        job: &JobId,
        target: &NodeName,
        dir: &Path,
        started: Instant,
        frozen_ms: u64,
        post_copy: bool,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        // The target answered that the job runs there.
        self.resend_held(job);
        let landed = self.registry.get(job)?;
        if landed.node != *target || landed.state != JobState::Running {
            return Err(AgentError::Aborted(format!(
                "migration of job {job} to {target} did not complete: the registry shows it {} on {}{}",
                landed.state.as_str(),
                landed.node,
                if landed.error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", landed.error)
                }
            )));
        }
        remove_images_in_background(dir.to_path_buf());
        let total_ms = started.elapsed().as_millis() as u64;
        let mut m =
            landed.history.last().cloned().ok_or_else(|| {
                AgentError::Internal("restored job has no migration record".into())
            })?;
        self.record_landed(&mut m, frozen_ms, total_ms, post_copy);
        tracing::info!(job = %job, to = %target, frozen_ms, total_ms, post_copy, "migrated");
        Ok((landed, m))
    }

    /// A confirmed move: fill in the record's times and count it in metrics.
    /// Shared by the shared-path and the direct (no shared path) protocols.
    pub(crate) fn record_landed(
        &self,
        m: &mut crate::core::job::MigrationRecord,
        frozen_ms: u64,
        total_ms: u64,
        post_copy: bool,
    ) {
        m.frozen_ms = frozen_ms;
        m.total_ms = total_ms;
        m.post_copy = post_copy;
        let hist = &self.metrics.migration_seconds;
        hist.with_label_values(&["frozen", "ok"])
            .observe(frozen_ms as f64 / 1000.0);
        hist.with_label_values(&["total", "ok"])
            .observe(total_ms as f64 / 1000.0);
    }

    /// The target failed: bring the job back here from the same images.
    async fn roll_back(
        self: &Arc<Self>,
        job: &JobId,
        target: &NodeName,
        mig: &MigrationId,
        started: Instant,
        cause: AgentError,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        tracing::warn!(job = %job, to = %target, "restore on target failed, rolling back: {cause}");
        if let Err(e) = self.take_owner_back(job).await {
            // Someone else owns the job now (or etcd is unreachable): a
            // restore here could make a second copy. Keep the images.
            let dir = self.image_dir(&image_rel(job, mig));
            return Err(AgentError::Aborted(format!(
                "migration of job {job} to {target} failed ({cause}), and it is not restored on {}: {e}; images are kept in {}",
                self.cfg.node,
                dir.display()
            )));
        }
        let arrival = Arrival::RolledBack {
            to: target.clone(),
            error: cause.to_string(),
            frozen_before_ms: started.elapsed().as_millis() as u64,
        };
        match self.restore_here(job, mig, None, arrival).await {
            Ok(_) => {
                self.resend_held(job);
                let _ = std::fs::remove_dir_all(self.image_dir(&image_rel(job, mig)));
                Err(AgentError::Aborted(format!(
                    "migration of job {job} to {target} failed: {cause}; the job was restored on {} and keeps running there",
                    self.cfg.node
                )))
            }
            Err(back) => {
                let dir = self.image_dir(&image_rel(job, mig));
                let msg = format!(
                    "migration of job {job} to {target} failed ({cause}) and restoring it on {} failed too ({back}); images and CRIU logs are kept in {}",
                    self.cfg.node,
                    dir.display()
                );
                if let Ok(mut rec) = self.registry.get(job) {
                    // Only mark failed if no node holds the claim: a target
                    // that did restore (e.g. its reply was lost) owns the job.
                    if !dir.join(CLAIM_FILE).exists() {
                        rec.state = JobState::Failed;
                        rec.pid = 0;
                        rec.error = msg.clone();
                        let _ = self.registry.put(&mut rec);
                        if let Some(n) = &rec.net {
                            self.release_address(&rec.id, n);
                        }
                    }
                }
                Err(AgentError::Aborted(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lazy_transfer_complete;

    #[test]
    fn lazy_log_with_a_short_transfer_is_incomplete() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("lazy-pages.log");
        std::fs::write(
            &log,
            "(00.100) uffd: 1-12: UFFD transferred pages: (65536/65536)\n\
             (00.200) uffd: 2-13: UFFD transferred pages: (1200/65536)\n",
        )
        .unwrap();
        assert!(!lazy_transfer_complete(&log));
        std::fs::write(
            &log,
            "(00.100) uffd: 1-12: UFFD transferred pages: (65536/65536)\n\
             (00.300) uffd: 2-13: UFFD transferred pages: (77/77)\n",
        )
        .unwrap();
        assert!(lazy_transfer_complete(&log));
        // No log at all: nothing says the transfer fell short.
        assert!(lazy_transfer_complete(&d.path().join("missing.log")));
    }
}
