//! Migration without a shared path: images go straight from agent to agent.
//!
//! A node started with `mosixd --state-dir DIR` (instead of `--shared`) keeps
//! its registry and its images on its own disk. Its registry holds the jobs
//! that run on it; a job's record travels with the job.
//!
//! **Full copy.** The source runs the usual steps of [`super`] (check, dump
//! into its own `images/<job>/<migration>/`, seal with the HMAC manifest,
//! record phase `dumped`), then streams the image files, pages included, the
//! job's stdout/stderr and its record to the target (`PushImages`, chunked).
//! The target writes them into a staging directory of its own state dir and,
//! only when the stream ended with an end marker matching what arrived, moves
//! them into `images/<job>/<migration>/` and the record into its registry.
//! Then the source asks for the `Restore` as usual; the target verifies the
//! manifest and restores from its own disk. The stream opens when the dump
//! starts, and the pages travel while CRIU writes them ([`early`]); if that
//! fails, the whole push runs after the seal.
//!
//! **Pages written once ([`stream`]).** A job in its node's network does
//! better: its dump sends the pages through the agents into a `criu
//! page-server` on the target, as CRIU's own migration without shared
//! storage does, and leaves the job's tree stopped. The source's complete
//! copy is then that tree, not its image files: SIGKILL once the target runs
//! the job, SIGCONT if it does not and never will (`SourceCopy`). The
//! push after it carries only the other image files. Jobs with their own
//! address keep their pages on the source as above (see [`stream`] for why).
//!
//! **Post-copy.** Memory already travels over CRIU's page server (lazy pages,
//! `checkpoint_lazy` / `start_lazy_daemon`), from the source's frozen copy;
//! only the small non-page image files are pushed before the lazy restore.
//!
//! **Safety without a shared `CLAIM`.** With a shared path, the claim file
//! makes sure only one node ever restores a set of images. Here each node has
//! its own copy, so the rule is: *the target restores only when the source
//! asks (`Restore`), and the source restores its own copy only when the
//! target has said it did not and never will.*
//! - The push failed: no `Restore` was ever sent, so the target cannot run
//!   the job. The source rolls back from its own images (and asks the target,
//!   best effort, to drop whatever it kept).
//! - `Restore` answered with the job: the source deletes its record and
//!   images. The target's record is now the job's.
//! - `Restore` failed or went unanswered: the source asks `ResolveMigration`,
//!   which the target answers under the job's lock: *landed* (restored here,
//!   remembered in `landed/<job>/<migration>` even after the job moves on), or
//!   *abandoned*, after it has deleted its copy and the record so nothing can
//!   restore it any more. Only then does the source roll back.
//! - The target does not answer: the job stays frozen on the source with its
//!   images (not running anywhere, not lost), and a background task keeps
//!   asking; a restarted source agent does the same (see `recover_direct`).
//!
//! Job listings: `ListJobs`/`GetJob` gather `ListLocalJobs` of every node;
//! a job seen twice during a hand-over is taken from the newer record.
//!
//! [`push`] holds the stream itself: its messages, the source's reader and
//! the target's staging receiver. This file is the source's half of the
//! protocol around it, `receive` the target's half, and `listing` the job
//! listings.

pub mod early;
mod listing;
pub mod push;
mod receive;
mod splice;
pub mod stream;
pub use listing::merge_records;
pub use push::*;

use super::{image_rel, remove_images_in_background, LazyDump, RestoreCall, CLAIM_FILE, UNSEALED};
use crate::agent::{io_error, Agent, AgentError, AgentResult};
use crate::core::ids::PlainFileName;
use crate::core::job::{MigrationPhase, PendingMigration};
use crate::core::{
    now_unix_ms, JobId, JobRecord, JobState, MigrationId, MigrationRecord, NodeName,
};
use crate::criu::PageServer;
use std::fs::{self};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long `migrate` waits for a target to say whether a failed Restore
/// landed, before leaving that to a background task.
const RESOLVE_PATIENCE: Duration = Duration::from_secs(30);
const RESOLVE_RETRY: Duration = Duration::from_secs(1);
/// How long the background task keeps asking before it freezes the job on
/// the source for a person to decide, unless the agent is told otherwise
/// (`AgentConfig::settle_patience`). A day: long enough for a person to
/// bring a crashed node back, and the job is not lost meanwhile (its copy
/// here is intact), only stopped.
pub const DEFAULT_SETTLE_PATIENCE: Duration = Duration::from_secs(24 * 3600);

/// What the source keeps of a job while its target may or may not run it
/// (see the safety rule above).
pub(crate) enum SourceCopy {
    /// Its sealed images, here.
    Images,
    /// Post-copy: the frozen tree, still serving its pages.
    Lazy(PageServer, LazyDump),
    /// Its pages were streamed (see [`stream`]): the tree, left stopped,
    /// and the rest of its images here.
    Stopped(stream::StoppedTree),
}

/// What the source learned from the target after a failed Restore.
enum Answer {
    Landed(Option<Box<JobRecord>>),
    Abandoned,
    Unknown(String),
}

impl Agent {
    // ---------------------------------------------------------- source side

    /// The files of one push: the sealed image directory (not the logs and
    /// other files written after the seal) and the job's output.
    fn push_plan(&self, rec: &JobRecord, dir: &Path, mig: &MigrationId) -> AgentResult<PushPlan> {
        let mut files = Vec::new();
        let rd = fs::read_dir(dir).map_err(|e| io_error("listing the images to send", e))?;
        for e in rd {
            let e = e.map_err(|e| io_error("listing the images to send", e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if UNSEALED.contains(&name.as_str()) {
                continue;
            }
            let meta = fs::symlink_metadata(e.path())
                .map_err(|e| io_error("listing the images to send", e))?;
            if !meta.is_file() {
                return Err(AgentError::FailedPrecondition(format!(
                    "{} holds {name:?}, which is not a plain file (a pre-copy chain?); only flat image directories can be sent without a shared path",
                    dir.display()
                )));
            }
            let name = PlainFileName::parse(&name).map_err(|e| {
                AgentError::Internal(format!("unexpected file in {}: {e}", dir.display()))
            })?;
            files.push(PlannedFile {
                area: FileArea::Image,
                name,
                path: e.path(),
                size: meta.len(),
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        for (name, path) in [("stdout", &rec.stdout_path), ("stderr", &rec.stderr_path)] {
            if let Ok(meta) = fs::metadata(path) {
                files.push(PlannedFile {
                    area: FileArea::JobOutput,
                    name: PlainFileName::parse(name)?,
                    path: PathBuf::from(path),
                    size: meta.len(),
                });
            }
        }
        let record_json = serde_json::to_vec(rec)
            .map_err(|e| AgentError::Internal(format!("encoding the job record: {e}")))?;
        Ok(PushPlan {
            begin: PushBegin {
                job: rec.id.clone(),
                migration: mig.clone(),
                from: self.cfg.node.clone(),
                total_bytes: files.iter().map(|f| f.size).sum(),
                record_json,
                early: false,
                pages_streamed: false,
            },
            files,
        })
    }

    /// The usual push: `plan`'s files, read on a blocking thread a few
    /// chunks ahead of the network. If reading fails, the stream ends
    /// without its end marker and the target keeps nothing.
    async fn push(&self, target: &NodeName, plan: PushPlan) -> AgentResult<PushSummary> {
        let (tx, rx) = tokio::sync::mpsc::channel(WRITE_AHEAD_CHUNKS);
        let reader = tokio::task::spawn_blocking(move || -> AgentResult<()> {
            for part in plan.into_parts(SEND_CHUNK_BYTES) {
                if tx.blocking_send(part?).is_err() {
                    // The call ended (the target refused): it says why.
                    break;
                }
            }
            Ok(())
        });
        let sent = self.peers.push_images(target, rx).await;
        reader
            .await
            .map_err(|e| AgentError::Internal(format!("image reader failed: {e}")))??;
        sent
    }

    /// Migrate without a shared path (see the module doc): dump and seal
    /// here, push, Restore there; roll back here only when the target has
    /// said it does not and will not run the job.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn migrate_direct(
        self: &Arc<Self>,
        rec: JobRecord,
        pid: i32,
        target: &NodeName,
        mig: MigrationId,
        started: Instant,
        post_copy: bool,
        mode: super::Mode,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        // Pre-copy leaves a chain of image directories (rounds linked by
        // `parent`), which the push does not carry: say so, move in full.
        let fallback = (mode == super::Mode::PreCopy).then(|| {
            "pre-copy is not available without a shared path (its chain of pre-dump rounds is not streamed); moved as a full copy".to_string()
        });
        let r = self
            .migrate_direct_once(rec, pid, target, mig, started, post_copy)
            .await;
        r.map(|(rec, mut m)| {
            if let Some(why) = fallback {
                m.fallback = why;
            }
            (rec, m)
        })
    }

    async fn migrate_direct_once(
        self: &Arc<Self>,
        mut rec: JobRecord,
        pid: i32,
        target: &NodeName,
        mig: MigrationId,
        mut started: Instant,
        post_copy: bool,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        let job = rec.id.clone();
        let failed = |stage: &str| {
            self.metrics
                .migration_failures
                .with_label_values(&[stage])
                .inc()
        };
        // A full copy's pages start for the target as CRIU writes them:
        // into its page server if it takes a page stream, else in an early
        // push.
        let mut early: Option<early::EarlyPush> = None;
        let tunnel = if !post_copy && stream::wanted() {
            let t = self.open_page_stream(&rec, pid, &mig, target).await;
            // The job ran while the target started its page server: the
            // frozen clock starts now.
            started = Instant::now();
            t
        } else {
            None
        };
        let (dumped, copy) = if post_copy {
            let (d, ps, l) = self
                .checkpoint_lazy(&mut rec, pid, &mig, target)
                .await
                .inspect_err(|_| failed("dump"))?;
            (d, SourceCopy::Lazy(ps, l))
        } else if let Some(tunnel) = tunnel {
            let tree = stream::StoppedTree::of(pid).ok_or_else(|| {
                AgentError::FailedPrecondition(format!("job {job} ended before its dump"))
            })?;
            let dir = self.image_dir(&image_rel(&rec.id, &mig));
            let on_dumping: super::OnDumping<'_> = Box::new(move |r: &JobRecord| {
                if let Err(e) = tree.record(&dir) {
                    tracing::warn!(job = %r.id, "recording the tree to be left stopped: {e}");
                }
            });
            let mut d = self
                .checkpoint_calling(
                    &mut rec,
                    pid,
                    &mig,
                    target.clone(),
                    on_dumping,
                    Some(tunnel.criu_fd()),
                )
                .await
                .inspect_err(|_| failed("dump"))?;
            match tunnel.finish().await {
                Ok(bytes) => d.image_bytes += bytes,
                Err(e) => {
                    // The target lost the pages: it has no record and can
                    // never run the job. Let the stopped tree go on here.
                    failed("push");
                    self.spawn_resolve(target, &job, &mig);
                    let cause = e.context(&format!("streaming the pages to {target}"));
                    return self
                        .undo_direct(
                            &job,
                            target,
                            &mig,
                            started,
                            cause,
                            SourceCopy::Stopped(tree),
                        )
                        .await;
                }
            }
            (d, SourceCopy::Stopped(tree))
        } else {
            let (peers, to, from) = (self.peers.clone(), target.clone(), self.cfg.node.clone());
            let dir = self.image_dir(&image_rel(&rec.id, &mig));
            let slot = &mut early;
            let m = mig.clone();
            let on_dumping: super::OnDumping<'_> = Box::new(move |r: &JobRecord| {
                let est = early::estimate(pid, &[&r.stdout_path, &r.stderr_path]);
                match early::EarlyPush::start(peers, to, r, &m, from, &dir, est) {
                    Ok(e) => *slot = Some(e),
                    Err(e) => {
                        tracing::warn!(job = %r.id, "pushing pages during the dump: {e}; they go after it")
                    }
                }
            });
            let d = self
                .checkpoint_calling(&mut rec, pid, &mig, target.clone(), on_dumping, None)
                .await
                .inspect_err(|_| failed("dump"))?;
            (d, SourceCopy::Images)
        };
        let ps = match &copy {
            SourceCopy::Lazy(ps, _) => Some(ps.clone()),
            _ => None,
        };
        let streamed = matches!(copy, SourceCopy::Stopped(_));
        let mut call = self
            .hand_over(&mut rec, &mig, started, dumped.image_bytes, ps, target)
            .await?;
        let dir = self.image_dir(&dumped.image_dir);
        let t_push = Instant::now();
        // Whether the pages went during the dump (for the log).
        let mut pushed_early = false;
        let plan = self.push_plan(&rec, &dir, &mig).map(|mut p| {
            p.begin.pages_streamed = streamed;
            p
        });
        let pushed = match (plan, early) {
            (Ok(plan), Some(e)) => match e.finish(plan.clone()).await {
                Ok(s) => {
                    pushed_early = true;
                    Ok(s)
                }
                Err(why) => {
                    // The target kept nothing of it: push the sealed
                    // images the usual way.
                    tracing::warn!(job = %job, to = %target, "the early push failed ({why}); pushing again after the dump");
                    self.push(target, plan).await
                }
            },
            (Ok(plan), None) => self.push(target, plan).await,
            (Err(e), _) => Err(e),
        };
        let summary = match pushed {
            Ok(s) => s,
            Err(e) => {
                failed("push");
                // No Restore was sent: the target cannot run the job, so
                // restoring it here is safe. Let it drop what it kept.
                self.spawn_resolve(target, &job, &mig);
                let cause = e.context(&format!("sending the images to {target}"));
                return self
                    .undo_direct(&job, target, &mig, started, cause, copy)
                    .await;
            }
        };
        tracing::info!(
            job = %job,
            to = %target,
            files = summary.files,
            bytes = summary.bytes,
            push_ms = t_push.elapsed().as_millis() as u64,
            early = pushed_early,
            streamed,
            "images pushed"
        );
        call.frozen_before_ms = started.elapsed().as_millis() as u64;
        let image_bytes = dumped.image_bytes;
        match self.peers.restore(target, call).await {
            Ok(landed) => {
                let frozen_ms = started.elapsed().as_millis() as u64;
                self.finish_direct(
                    &job,
                    target,
                    &mig,
                    Some(landed),
                    started,
                    frozen_ms,
                    image_bytes,
                    copy,
                )
                .await
            }
            Err(cause) => {
                failed("restore");
                tracing::warn!(job = %job, to = %target, "restore on target failed or went unanswered, asking it: {cause}");
                match self.ask_target(target, &job, &mig, RESOLVE_PATIENCE).await {
                    Answer::Landed(r) => {
                        let frozen_ms = started.elapsed().as_millis() as u64;
                        let r = r.map(|b| *b);
                        self.finish_direct(
                            &job,
                            target,
                            &mig,
                            r,
                            started,
                            frozen_ms,
                            image_bytes,
                            copy,
                        )
                        .await
                    }
                    Answer::Abandoned => {
                        self.undo_direct(&job, target, &mig, started, cause, copy)
                            .await
                    }
                    Answer::Unknown(why) => {
                        let msg = format!(
                            "migration {mig} to {target}: {target} has not said whether it restored the job ({cause}; then {why}); the job stays frozen on {} with its images until it does",
                            self.cfg.node
                        );
                        if let Ok(mut r) = self.registry.get(&job) {
                            r.error = msg.clone();
                            let _ = self.registry.put(&mut r);
                        }
                        self.spawn_settle(
                            job.clone(),
                            target.clone(),
                            mig.clone(),
                            started,
                            image_bytes,
                            copy,
                        );
                        Err(AgentError::Aborted(format!(
                            "migration of job {job} to {target}: the outcome is not known yet. The job is not lost: {msg}, and it is settled (restored here, or confirmed there) as soon as {target} answers"
                        )))
                    }
                }
            }
        }
    }

    /// Ask the target whether the migration landed, until it answers or
    /// `patience` runs out.
    async fn ask_target(
        &self,
        target: &NodeName,
        job: &JobId,
        mig: &MigrationId,
        patience: Duration,
    ) -> Answer {
        let deadline = Instant::now() + patience;
        loop {
            match self.peers.resolve_migration(target, job, mig).await {
                Ok(Resolution::Landed(r)) => return Answer::Landed(r),
                Ok(Resolution::Abandoned) => return Answer::Abandoned,
                Err(e) if Instant::now() >= deadline => return Answer::Unknown(e.to_string()),
                Err(e) => tracing::debug!(job = %job, "asking {target}: {e}"),
            }
            tokio::time::sleep(RESOLVE_RETRY).await;
        }
    }

    /// Best effort, in the background: let the target drop a copy it holds
    /// (or, after a landed post-copy, the images nothing reads any more).
    /// Retried a little: the target refuses while it is still busy with the
    /// job (a push it is finishing).
    fn spawn_resolve(self: &Arc<Self>, target: &NodeName, job: &JobId, mig: &MigrationId) {
        let (agent, target, job, mig) = (self.clone(), target.clone(), job.clone(), mig.clone());
        tokio::spawn(async move {
            let mut last = None;
            for _ in 0..10 {
                match agent.peers.resolve_migration(&target, &job, &mig).await {
                    Ok(_) => return,
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(RESOLVE_RETRY).await;
            }
            if let Some(e) = last {
                tracing::info!(job = %job, "could not tell {target} to drop its copy of migration {mig}: {e}");
            }
        });
    }

    /// The job runs on the target: drop our record and images (after the
    /// last page was served, for post-copy) and report.
    #[allow(clippy::too_many_arguments)]
    async fn finish_direct(
        self: &Arc<Self>,
        job: &JobId,
        target: &NodeName,
        mig: &MigrationId,
        landed: Option<JobRecord>,
        started: Instant,
        frozen_ms: u64,
        image_bytes: u64,
        copy: SourceCopy,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        let post_copy = matches!(copy, SourceCopy::Lazy(..));
        let ours = self.registry.get(job).ok();
        match copy {
            SourceCopy::Lazy(_, l) => {
                if let Err(e) = self.finish_lazy(job, l).await {
                    // The target has the job (and records it failed).
                    self.forget_here(job, mig);
                    return Err(e);
                }
                self.spawn_resolve(target, job, mig);
            }
            SourceCopy::Stopped(tree) => {
                self.drop_stopped_tree(job, &tree).await;
                self.stats.observe(image_bytes, frozen_ms as f64 / 1000.0);
            }
            SourceCopy::Images => self.stats.observe(image_bytes, frozen_ms as f64 / 1000.0),
        }
        self.forget_here(job, mig);
        let total_ms = started.elapsed().as_millis() as u64;
        let mut m = MigrationRecord {
            id: mig.clone(),
            from: self.cfg.node.clone(),
            to: target.clone(),
            started_unix_ms: now_unix_ms().saturating_sub(total_ms),
            frozen_ms,
            total_ms,
            ok: true,
            error: String::new(),
            image_bytes,
            post_copy,
            pre_copy_rounds: 0,
            pre_copy_bytes: 0,
            fallback: String::new(),
            restored_from_checkpoint: 0,
        };
        let landed = match landed {
            Some(r) => {
                if let Some(h) = r.history.iter().rev().find(|h| h.id == *mig) {
                    m = h.clone();
                }
                r
            }
            // Landed, and moved on since: only our old record is left.
            None => {
                let mut r = ours.ok_or_else(|| {
                    AgentError::Internal(format!(
                        "job {job} landed on {target} but no record of it is left"
                    ))
                })?;
                r.node = target.clone();
                r.state = JobState::Running;
                r.pid = 0;
                r.pending = None;
                r.error.clear();
                r.history.push(m.clone());
                r
            }
        };
        self.resend_held(job);
        self.record_landed(&mut m, frozen_ms, total_ms, post_copy);
        tracing::info!(job = %job, to = %target, frozen_ms, total_ms, post_copy, "migrated without a shared path");
        Ok((landed, m))
    }

    /// Our record and images of a job that now lives elsewhere.
    fn forget_here(&self, job: &JobId, mig: &MigrationId) {
        if let Err(e) = self.registry.remove(job) {
            tracing::error!(job = %job, "cannot remove the record of a job that moved away: {e}");
        }
        remove_images_in_background(self.image_dir(&image_rel(job, mig)));
    }

    /// The target does not and will not run the job: restore it here from
    /// our own images (or, post-copy, let the frozen copy run on: see
    /// `postcopy`).
    async fn undo_direct(
        self: &Arc<Self>,
        job: &JobId,
        target: &NodeName,
        mig: &MigrationId,
        started: Instant,
        cause: AgentError,
        copy: SourceCopy,
    ) -> AgentResult<(JobRecord, MigrationRecord)> {
        let r = match copy {
            SourceCopy::Images => self.roll_back(job, target, mig, started, cause).await,
            SourceCopy::Lazy(_, l) => Err(self
                .resume_after_failed_post_copy(job, target, mig, started, cause, l)
                .await),
            SourceCopy::Stopped(tree) => Err(self
                .resume_after_failed_stream(job, target, mig, started, cause, tree)
                .await),
        };
        self.observe_failed_total(job, started);
        r
    }

    /// Keep asking the target in the background, then finish or roll back.
    /// If it never answers, the job is recorded frozen here, for a person to
    /// thaw once they know the target is gone for good.
    fn spawn_settle(
        self: &Arc<Self>,
        job: JobId,
        target: NodeName,
        mig: MigrationId,
        started: Instant,
        image_bytes: u64,
        copy: SourceCopy,
    ) {
        let agent = self.clone();
        tokio::spawn(async move {
            match agent
                .ask_target(&target, &job, &mig, agent.cfg.settle_patience)
                .await
            {
                Answer::Landed(r) => {
                    let frozen_ms = started.elapsed().as_millis() as u64;
                    let r = r.map(|b| *b);
                    match agent
                        .finish_direct(
                            &job,
                            &target,
                            &mig,
                            r,
                            started,
                            frozen_ms,
                            image_bytes,
                            copy,
                        )
                        .await
                    {
                        Ok(_) => tracing::info!(job = %job, "settled: the job runs on {target}"),
                        Err(e) => tracing::warn!(job = %job, "settled on {target}: {e}"),
                    }
                }
                Answer::Abandoned => {
                    let cause = AgentError::Unavailable(format!(
                        "{target} did not answer the restore, and then dropped its copy"
                    ));
                    match agent
                        .undo_direct(&job, &target, &mig, started, cause, copy)
                        .await
                    {
                        Ok(_) => {}
                        Err(e) => tracing::warn!(job = %job, "settled: {e}"),
                    }
                }
                Answer::Unknown(why) => {
                    // Streamed pages: the copy here is the stopped tree, not
                    // images, and thaw lets it run on (`thaw_streamed`).
                    let (copy_here, thaw_does) = match copy {
                        SourceCopy::Stopped(_) => ("its stopped processes", "resumes"),
                        _ => ("its images", "restores"),
                    };
                    tracing::error!(job = %job, "{target} never said whether it restored migration {mig} ({why}); the job is recorded frozen here with {copy_here}");
                    if let Ok(mut r) = agent.registry.get(&job) {
                        r.state = JobState::Frozen;
                        if let Some(p) = r.pending.as_mut() {
                            p.phase = MigrationPhase::Frozen;
                        }
                        r.error = format!(
                            "{target} never said whether it restored migration {mig}; if {target} is gone for good, `mosctl thaw {job}` {thaw_does} the job here"
                        );
                        let _ = agent.registry.put(&mut r);
                    }
                }
            }
        });
    }

    /// `mosctl thaw` of a job frozen here after a move whose pages were
    /// streamed went unanswered: there are no pages here to restore, and
    /// the job is its stopped tree, which runs on (as after a failed
    /// stream). None if the move did not stream.
    pub(crate) async fn thaw_streamed(
        self: &Arc<Self>,
        job: &JobId,
        p: &PendingMigration,
    ) -> Option<AgentResult<JobRecord>> {
        let dir = self.image_dir(&image_rel(job, &p.id));
        let tree = stream::StoppedTree::read(&dir)?;
        let target = p.to.clone().unwrap_or_else(|| self.cfg.node.clone());
        let cause = AgentError::Aborted(format!(
            "{target} never said whether it restored the job, and it was thawed on {} by hand",
            self.cfg.node
        ));
        let err = self
            .resume_after_failed_stream(job, &target, &p.id, Instant::now(), cause, tree)
            .await;
        Some(match self.registry.get(job) {
            Ok(r) if r.state == JobState::Running && r.node == self.cfg.node => Ok(r),
            // The tree was gone: recorded failed, and the error says so.
            _ => Err(err),
        })
    }

    /// At start, before serving: pushes that were being received when the
    /// agent stopped are gone with their senders (who rolled back).
    pub(crate) fn drop_incoming(&self) {
        if self.cfg.shared {
            return;
        }
        for d in [INCOMING, stream::INCOMING_PAGES] {
            match remove_dir_if_any(&self.cfg.shared_root.join(d)) {
                Ok(()) => {}
                Err(e) => tracing::warn!("cannot clear interrupted pushes: {e}"),
            }
        }
    }

    /// Recovery after a restart, before anything else looks at the job: a
    /// move from here whose pages were streamed (see [`stream`]) left the
    /// job's tree stopped here, which must not be taken for the job running
    /// here again. Returns true if it took the job over.
    /// - The push had begun (phase `dumped`): the target may run the job;
    ///   ask it, as after an unanswered Restore, with the stopped tree as
    ///   our copy.
    /// - It had not: the target has no record and never will run the job.
    ///   The tree runs on (SIGCONT), and the usual recovery finds it running
    ///   here.
    pub(crate) fn recover_streamed(
        self: &Arc<Self>,
        rec: &JobRecord,
        p: &PendingMigration,
    ) -> bool {
        if self.cfg.shared || p.from != self.cfg.node {
            return false;
        }
        let dir = self.image_dir(&image_rel(&rec.id, &p.id));
        let Some(tree) = stream::StoppedTree::read(&dir) else {
            return false;
        };
        if matches!(p.phase, MigrationPhase::Dumped | MigrationPhase::Frozen) {
            // Pushed (the target may run the job), or frozen here after the
            // target never answered: ask it again, never resume blindly.
            return self.recover_direct(rec, p);
        }
        if tree.is_there() {
            tracing::info!(job = %rec.id, pid = tree.pid, "migration {} stopped before its push; the job runs on here", p.id);
            super::postcopy::resume_stopped_tree(&rec.id, tree.pid);
        }
        false
    }

    /// Recovery after a restart, for migrations without a shared path.
    /// Returns true if it took the job over (the shared-path recovery must
    /// then leave it alone).
    /// - We are the source and the images were sealed (maybe pushed, maybe
    ///   restored there): ask the target, in the background, as after an
    ///   unanswered Restore.
    /// - We are the target and had not claimed the pushed copy: drop it. Only
    ///   the source's Restore could start it; finding it gone, the source
    ///   restores the job from its own images. (A copy we had claimed was
    ///   being restored when we died: the shared-path recovery finishes it.)
    pub(crate) fn recover_direct(self: &Arc<Self>, rec: &JobRecord, p: &PendingMigration) -> bool {
        if self.cfg.shared {
            return false;
        }
        let me = &self.cfg.node;
        // Frozen with a target: a move whose outcome its target never told
        // (see `spawn_settle`); the target may still run the job.
        if p.from == *me && matches!(p.phase, MigrationPhase::Dumped | MigrationPhase::Frozen) {
            let Some(target) = p.to.clone().filter(|t| t != me) else {
                return false;
            };
            tracing::info!(job = %rec.id, "migration {} to {target} was under way when this agent stopped; asking {target}", p.id);
            let dir = self.image_dir(&image_rel(&rec.id, &p.id));
            let copy = match stream::StoppedTree::read(&dir) {
                Some(tree) => SourceCopy::Stopped(tree),
                None => SourceCopy::Images,
            };
            self.spawn_settle(
                rec.id.clone(),
                target,
                p.id.clone(),
                Instant::now(),
                0,
                copy,
            );
            return true;
        }
        if p.to.as_ref() == Some(me) && p.from != *me {
            let dir = self.image_dir(&image_rel(&rec.id, &p.id));
            if dir.join(CLAIM_FILE).exists() {
                return false;
            }
            if rec.node != *me {
                let _ = self.registry.remove(&rec.id);
            }
            let _ = fs::remove_dir_all(&dir);
            tracing::info!(job = %rec.id, "dropped the unrestored images pushed by {} before this agent stopped", p.from);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentConfig;
    use crate::core::registry::Registry;
    use std::collections::BTreeMap;

    fn cfg(root: &Path, node: &str) -> AgentConfig {
        crate::agent::testing::config(root, node)
    }

    const JOB: &str = "j0123456789";
    const MIG: &str = "m1";

    fn record(root: &Path, to: &str) -> JobRecord {
        let out = root.join("jobs").join(JOB);
        JobRecord {
            id: JobId::parse(JOB).unwrap(),
            name: String::new(),
            node: NodeName::parse("node1").unwrap(),
            state: JobState::Migrating,
            pid: 0,
            argv: vec!["x".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            stdout_path: out.join("stdout").to_string_lossy().into_owned(),
            stderr_path: out.join("stderr").to_string_lossy().into_owned(),
            created_unix_ms: 1,
            arrived_unix_ms: 1,
            exit_code: None,
            exit_signal: None,
            history: vec![],
            pending: Some(PendingMigration {
                id: MigrationId::parse(MIG).unwrap(),
                from: NodeName::parse("node1").unwrap(),
                to: Some(NodeName::parse(to).unwrap()),
                phase: MigrationPhase::Dumped,
                image_dir: format!("images/{JOB}/{MIG}"),
                started_unix_ms: 1,
                post_copy: false,
                nice_before_dump: Vec::new(),
            }),
            pinned: false,
            non_migratable: false,
            error: String::new(),
            generation: 3,
            service: None,
            checkpoint: None,
            net: None,
        }
    }

    fn begin_for(rec: &JobRecord, total: u64) -> PushBegin {
        PushBegin {
            job: rec.id.clone(),
            migration: MigrationId::parse(MIG).unwrap(),
            from: NodeName::parse("node1").unwrap(),
            total_bytes: total,
            record_json: serde_json::to_vec(rec).unwrap(),
            early: false,
            pages_streamed: false,
        }
    }

    fn limits() -> ReceiveLimits {
        ReceiveLimits {
            max_bytes: 1 << 30,
            free_bytes: None,
        }
    }

    fn chunk(name: &str, offset: u64, size: u64, data: &[u8]) -> FileChunk {
        FileChunk {
            name: PlainFileName::parse(name).unwrap(),
            area: FileArea::Image,
            offset,
            size,
            data: bytes::Bytes::copy_from_slice(data),
            growing: false,
        }
    }

    fn nothing_kept(root: &Path) {
        let n2 = root.join("node2");
        assert!(!n2.join(INCOMING).join(JOB).exists(), "staging removed");
        assert!(!n2.join("images").join(JOB).join(MIG).exists(), "no images");
        assert!(
            !n2.join("registry/jobs")
                .join(format!("{JOB}.json"))
                .exists(),
            "no record"
        );
    }

    /// A source image directory, planned and streamed through a receiver:
    /// every byte arrives, in place, with the record.
    #[test]
    fn plan_and_receive_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let rec = record(root, "node2");
        let src = root.join("node1/images").join(JOB).join(MIG);
        fs::create_dir_all(&src).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(src.join("pages-1.img"), &big).unwrap();
        fs::write(src.join("core-1.img"), b"core").unwrap();
        fs::write(src.join("empty.img"), b"").unwrap();
        fs::write(src.join("dump.log"), b"log is not sent").unwrap();
        let out = root.join("jobs").join(JOB);
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("stdout"), b"hello\n").unwrap();

        // The source's agent plans the push (same code as migrate_direct).
        let mut files: Vec<PlannedFile> = ["core-1.img", "empty.img", "pages-1.img"]
            .iter()
            .map(|n| PlannedFile {
                area: FileArea::Image,
                name: PlainFileName::parse(n).unwrap(),
                path: src.join(n),
                size: fs::metadata(src.join(n)).unwrap().len(),
            })
            .collect();
        files.push(PlannedFile {
            area: FileArea::JobOutput,
            name: PlainFileName::parse("stdout").unwrap(),
            path: out.join("stdout"),
            size: 6,
        });
        let total = files.iter().map(|f| f.size).sum();
        let plan = PushPlan {
            begin: begin_for(&rec, total),
            files,
        };
        let parts: Vec<PushPart> = plan.into_parts(1 << 20).map(|p| p.unwrap()).collect();
        assert!(matches!(parts.first(), Some(PushPart::Begin(_))));
        assert!(
            matches!(parts.last(), Some(PushPart::End(e)) if e.files == 4 && e.total_bytes == total)
        );
        // 3 MB of pages in 1 MiB chunks, and the empty file as one chunk.
        let chunks = parts
            .iter()
            .filter(|p| matches!(p, PushPart::File(_)))
            .count();
        assert_eq!(chunks, 3 + 1 + 1 + 1);

        let c2 = cfg(root, "node2");
        let reg = Registry::open(&c2.shared_root).unwrap();
        let mut it = parts.into_iter();
        let Some(PushPart::Begin(b)) = it.next() else {
            panic!()
        };
        let mut rx = PushReceiver::start(&c2, b, None, limits()).unwrap();
        for p in it {
            match p {
                PushPart::File(c) => rx.accept(c).unwrap(),
                PushPart::End(e) => {
                    let s = rx.complete(e, &reg, None).unwrap();
                    assert_eq!(s.files, 4);
                    break;
                }
                PushPart::Begin(_) => panic!(),
            }
        }
        let dst = root.join("node2/images").join(JOB).join(MIG);
        assert_eq!(fs::read(dst.join("pages-1.img")).unwrap(), big);
        assert_eq!(fs::read(dst.join("core-1.img")).unwrap(), b"core");
        assert_eq!(fs::read(dst.join("empty.img")).unwrap(), b"");
        assert!(!dst.join("dump.log").exists());
        assert_eq!(fs::read(out.join("stdout")).unwrap(), b"hello\n");
        let got = reg.get(&rec.id).unwrap();
        assert_eq!(got.pending, rec.pending);
        assert!(!root.join("node2").join(INCOMING).join(JOB).exists());
    }

    #[test]
    fn refuses_a_job_not_migrating_here() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let c2 = cfg(root, "node2");
        // Migrating to node3, pushed to node2.
        let rec = record(root, "node3");
        let e = PushReceiver::start(&c2, begin_for(&rec, 1), None, limits())
            .err()
            .unwrap();
        assert!(matches!(e, AgentError::FailedPrecondition(_)), "{e:?}");
        assert!(e.to_string().contains("not migrating to this node"), "{e}");
        // Not migrating at all.
        let mut rec = record(root, "node2");
        rec.state = JobState::Running;
        rec.pending = None;
        let e = PushReceiver::start(&c2, begin_for(&rec, 1), None, limits())
            .err()
            .unwrap();
        assert!(e.to_string().contains("no migration under way"), "{e}");
        // Another migration than the one under way.
        let rec = record(root, "node2");
        let mut b = begin_for(&rec, 1);
        b.migration = MigrationId::parse("m2").unwrap();
        let e = PushReceiver::start(&c2, b, None, limits()).err().unwrap();
        assert!(e.to_string().contains("migration under way is m1"), "{e}");
        // Coming from somewhere else than the record says.
        let mut b = begin_for(&rec, 1);
        b.from = NodeName::parse("node3").unwrap();
        assert!(PushReceiver::start(&c2, b, None, limits()).is_err());
        // A record that is not one.
        let mut b = begin_for(&rec, 1);
        b.record_json = b"{\"id\":\"../../etc\"}".to_vec();
        let e = PushReceiver::start(&c2, b, None, limits()).err().unwrap();
        assert!(matches!(e, AgentError::InvalidArgument(_)), "{e:?}");
        nothing_kept(root);
    }

    #[test]
    fn refuses_stale_pushes_and_foreign_output_paths() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let c2 = cfg(root, "node2");
        let rec = record(root, "node2");
        let mut newer = rec.clone();
        newer.generation = 9;
        let e = PushReceiver::start(&c2, begin_for(&rec, 1), Some(&newer), limits())
            .err()
            .unwrap();
        assert!(e.to_string().contains("stale or replayed"), "{e}");
        let mut running_here = rec.clone();
        running_here.node = NodeName::parse("node2").unwrap();
        running_here.state = JobState::Running;
        running_here.generation = 1;
        let e = PushReceiver::start(&c2, begin_for(&rec, 1), Some(&running_here), limits())
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("already recorded on this node"),
            "{e}"
        );
        // Output somewhere else than this node's --jobs-dir: never written.
        let mut evil = rec.clone();
        evil.stdout_path = "/etc/passwd".into();
        let e = PushReceiver::start(&c2, begin_for(&evil, 1), None, limits())
            .err()
            .unwrap();
        assert!(e.to_string().contains("--jobs-dir"), "{e}");
        nothing_kept(root);
    }

    #[test]
    fn refuses_oversize_totals_up_front() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let c2 = cfg(root, "node2");
        let rec = record(root, "node2");
        let e = PushReceiver::start(&c2, begin_for(&rec, 2 << 30), None, limits())
            .err()
            .unwrap();
        assert!(matches!(e, AgentError::ResourceExhausted(_)), "{e:?}");
        let tight = ReceiveLimits {
            max_bytes: 1 << 30,
            free_bytes: Some(100 << 20),
        };
        let e = PushReceiver::start(&c2, begin_for(&rec, 50 << 20), None, tight)
            .err()
            .unwrap();
        assert!(e.to_string().contains("bytes free"), "{e}");
        nothing_kept(root);
    }

    /// Every malformed stream is refused with a clear error, and whatever
    /// was written is gone once the receiver is dropped.
    /// An early push: page images arrive while they grow, interleaved, and
    /// the end marker brings their sizes and the sealed record; every way
    /// of getting that wrong is refused and leaves nothing.
    #[test]
    fn an_early_push_takes_growing_pages_and_the_sealed_record_at_its_end() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let c2 = cfg(root, "node2");
        let reg = Registry::open(&c2.shared_root).unwrap();
        let sealed = record(root, "node2");
        let mut dumping = sealed.clone();
        dumping.pending.as_mut().unwrap().phase = MigrationPhase::Dumping;
        dumping.generation = 2;
        let begin = |r: &JobRecord, early: bool| PushBegin {
            early,
            ..begin_for(r, 10)
        };
        let grow = |name: &str, offset: u64, data: &[u8]| FileChunk {
            growing: true,
            ..chunk(name, offset, 0, data)
        };
        let end = |files: u32, total: u64, r: &JobRecord, grown: &[(&str, u64)]| PushEnd {
            files,
            total_bytes: total,
            record_json: serde_json::to_vec(r).unwrap(),
            grown: grown
                .iter()
                .map(|(n, s)| (PlainFileName::parse(n).unwrap(), *s))
                .collect(),
        };
        let start = |r: &JobRecord, early: bool| {
            PushReceiver::start(&c2, begin(r, early), None, limits()).unwrap()
        };

        let mut rx = start(&dumping, true);
        rx.accept(grow("pages-1.img", 0, b"ab")).unwrap();
        rx.accept(grow("pages-2.img", 0, b"x")).unwrap();
        rx.accept(grow("pages-1.img", 2, b"cd")).unwrap();
        rx.accept(chunk("core-1.img", 0, 4, b"core")).unwrap();
        let grown = [("pages-1.img", 4), ("pages-2.img", 1)];
        let s = rx.complete(end(3, 9, &sealed, &grown), &reg, None).unwrap();
        assert_eq!(s, PushSummary { files: 3, bytes: 9 });
        let images = c2.shared_root.join("images").join(JOB).join(MIG);
        assert_eq!(fs::read(images.join("pages-1.img")).unwrap(), b"abcd");
        assert_eq!(fs::read(images.join("pages-2.img")).unwrap(), b"x");
        assert_eq!(fs::read(images.join("core-1.img")).unwrap(), b"core");
        let kept = reg.get(&sealed.id).unwrap();
        assert_eq!(kept.pending.unwrap().phase, MigrationPhase::Dumped);
        fs::remove_dir_all(c2.shared_root.join("images")).unwrap();
        reg.remove(&sealed.id).unwrap();
        nothing_kept(root);

        // An early begin whose record is already sealed, or not early at all
        // while dumping: the phase must match.
        for (r, early) in [(&sealed, true), (&dumping, false)] {
            let e = PushReceiver::start(&c2, begin(r, early), None, limits())
                .err()
                .unwrap();
            assert!(e.to_string().contains("not migrating in phase"), "{e}");
        }
        type Case = (&'static str, bool, Vec<FileChunk>, PushEnd);
        let one = [("pages-1.img", 2)];
        let cases: Vec<Case> = vec![
            (
                "growing in a push that is not early",
                false,
                vec![grow("pages-1.img", 0, b"ab")],
                end(1, 2, &sealed, &[]),
            ),
            (
                "only page images may be sent while they grow",
                true,
                vec![grow("core-1.img", 0, b"ab")],
                end(1, 2, &sealed, &[]),
            ),
            (
                "starts at offset 2",
                true,
                vec![grow("pages-1.img", 2, b"ab")],
                end(1, 2, &sealed, &one),
            ),
            (
                "expected 2",
                true,
                vec![grow("pages-1.img", 0, b"ab"), grow("pages-1.img", 3, b"c")],
                end(1, 3, &sealed, &one),
            ),
            (
                "both growing and whole",
                true,
                vec![
                    grow("pages-1.img", 0, b"ab"),
                    chunk("pages-1.img", 0, 2, b"ab"),
                ],
                end(1, 2, &sealed, &one),
            ),
            (
                "gives no final size",
                true,
                vec![grow("pages-1.img", 0, b"ab")],
                end(1, 2, &sealed, &[]),
            ),
            (
                "ended after 2 of its 5 bytes",
                true,
                vec![grow("pages-1.img", 0, b"ab")],
                end(1, 2, &sealed, &[("pages-1.img", 5)]),
            ),
            (
                "not sent growing",
                true,
                vec![grow("pages-1.img", 0, b"ab")],
                end(2, 2, &sealed, &[("pages-1.img", 2), ("pages-2.img", 0)]),
            ),
            (
                "not migrating in phase Dumped",
                true,
                vec![grow("pages-1.img", 0, b"ab")],
                end(1, 2, &dumping, &one),
            ),
        ];
        for (why, early, chunks, e) in cases {
            let r = if early { &dumping } else { &sealed };
            let mut rx = start(r, early);
            let got = chunks
                .into_iter()
                .try_for_each(|c| rx.accept(c))
                .and_then(|()| rx.complete(e, &reg, None).map(|_| ()));
            let err = got.expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            nothing_kept(root);
        }
        // A push that is not early, with an early push's end marker.
        let mut rx = start(&sealed, false);
        rx.accept(chunk("core-1.img", 0, 10, b"0123456789"))
            .unwrap();
        let e = rx
            .complete(end(1, 10, &sealed, &[]), &reg, None)
            .unwrap_err();
        assert!(e.to_string().contains("early push's fields"), "{e}");
        nothing_kept(root);
    }

    #[test]
    fn refuses_bad_chunks_and_keeps_nothing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let c2 = cfg(root, "node2");
        let rec = record(root, "node2");
        let start =
            |total| PushReceiver::start(&c2, begin_for(&rec, total), None, limits()).unwrap();
        type Case = (&'static str, u64, Vec<FileChunk>);
        let out = |name: &str| FileChunk {
            area: FileArea::JobOutput,
            ..chunk(name, 0, 1, b"x")
        };
        let cases: Vec<Case> = vec![
            (
                "is not an image file",
                9,
                vec![chunk(CLAIM_FILE, 0, 1, b"x")],
            ),
            ("may only be stdout or stderr", 9, vec![out("core-1.img")]),
            ("starts at offset 5", 99, vec![chunk("a.img", 5, 10, b"xx")]),
            (
                "expected 2",
                99,
                vec![chunk("a.img", 0, 10, b"xx"), chunk("a.img", 4, 10, b"xx")],
            ),
            (
                "longer than its size",
                99,
                vec![chunk("a.img", 0, 1, b"xx")],
            ),
            (
                "changed from 10 to 11",
                99,
                vec![chunk("a.img", 0, 10, b"xx"), chunk("a.img", 2, 11, b"xx")],
            ),
            (
                "ended after 2 of its 10 bytes",
                99,
                vec![chunk("a.img", 0, 10, b"xx"), chunk("b.img", 0, 2, b"xx")],
            ),
            (
                "sent twice",
                99,
                vec![
                    chunk("a.img", 0, 2, b"xx"),
                    chunk("b.img", 0, 2, b"xx"),
                    chunk("a.img", 0, 2, b"xx"),
                ],
            ),
            (
                "more bytes than the 3 announced",
                3,
                vec![chunk("a.img", 0, 2, b"xx"), chunk("b.img", 0, 2, b"xx")],
            ),
        ];
        for (want, total, chunks) in cases {
            let mut rx = start(total);
            let mut err = None;
            for c in chunks {
                if let Err(e) = rx.accept(c) {
                    err = Some(e);
                    break;
                }
            }
            let e = err.unwrap_or_else(|| panic!("expected {want:?}"));
            assert!(matches!(e, AgentError::InvalidArgument(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{want:?} not in {e}");
            drop(rx);
            nothing_kept(root);
        }
        let mut big = chunk("a.img", 0, 10 << 20, &[]);
        big.data = vec![0; MAX_CHUNK_BYTES + 1].into();
        let mut rx = start(20 << 20);
        assert!(rx.accept(big).is_err());
        drop(rx);
        // An end marker that does not match what arrived.
        let reg = Registry::open(&c2.shared_root).unwrap();
        let mut rx = start(2);
        rx.accept(chunk("a.img", 0, 2, b"xx")).unwrap();
        let e = rx
            .complete(
                PushEnd {
                    files: 2,
                    total_bytes: 2,
                    ..Default::default()
                },
                &reg,
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("sent 2 files"), "{e}");
        // Fewer bytes than announced.
        let mut rx = start(5);
        rx.accept(chunk("a.img", 0, 2, b"xx")).unwrap();
        let e = rx
            .complete(
                PushEnd {
                    files: 1,
                    total_bytes: 2,
                    ..Default::default()
                },
                &reg,
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("5 bytes were announced"), "{e}");
        // A stream cut short: dropped without an end marker.
        let mut rx = start(4);
        rx.accept(chunk("a.img", 0, 4, b"xx")).unwrap();
        drop(rx);
        nothing_kept(root);
    }

    #[test]
    fn merge_keeps_the_newest_record() {
        let t = tempfile::tempdir().unwrap();
        let rec = record(t.path(), "node2");
        let (n1, n2) = (
            NodeName::parse("node1").unwrap(),
            NodeName::parse("node2").unwrap(),
        );
        let mut landed = rec.clone();
        landed.node = n2.clone();
        landed.state = JobState::Running;
        landed.pending = None;
        landed.generation = 5;
        let got = merge_records(vec![
            (n1.clone(), vec![rec.clone()]),
            (n2.clone(), vec![landed.clone()]),
        ]);
        assert_eq!(got, vec![landed.clone()]);
        let got = merge_records(vec![
            (n2.clone(), vec![landed.clone()]),
            (n1.clone(), vec![rec.clone()]),
        ]);
        assert_eq!(got, vec![landed]);
        // On a tie, the node the record names wins.
        let mut other = rec.clone();
        other.error = "copy".into();
        let got = merge_records(vec![(n2, vec![other]), (n1, vec![rec.clone()])]);
        assert_eq!(got, vec![rec]);
    }

    fn agent(root: &Path) -> Arc<Agent> {
        crate::agent::testing::lone_agent(root, "node2")
    }

    /// Through the agent: a stream that breaks off keeps nothing; a whole
    /// one is stored; then ResolveMigration drops it (it never landed) so a
    /// Restore of it is refused.
    #[tokio::test]
    async fn agent_receives_resolves_and_never_restores_a_dropped_copy() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let a = agent(root);
        let rec = record(root, "node2");
        let parts = vec![
            Ok(PushPart::Begin(begin_for(&rec, 4))),
            Ok(PushPart::File(chunk("core-1.img", 0, 4, b"co"))),
        ];
        let e = a
            .receive_push(futures::stream::iter(parts))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("ended before their end marker"),
            "{e}"
        );
        nothing_kept(root);
        let parts = vec![
            Ok(PushPart::Begin(begin_for(&rec, 4))),
            Ok(PushPart::File(chunk("core-1.img", 0, 4, b"co"))),
            Err(AgentError::Unavailable("connection reset".into())),
        ];
        let e = a
            .receive_push(futures::stream::iter(parts))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nothing was kept"), "{e}");
        nothing_kept(root);
        // A bad chunk stops the writer: its error is the answer, whether
        // more chunks or the end marker follow it.
        for tail in [
            vec![],
            vec![Ok(PushPart::File(chunk("core-1.img", 3, 4, b"e")))],
            vec![Err(AgentError::Unavailable("connection reset".into()))],
            vec![Ok(PushPart::End(PushEnd {
                files: 1,
                total_bytes: 4,
                ..Default::default()
            }))],
        ] {
            let mut parts = vec![
                Ok(PushPart::Begin(begin_for(&rec, 4))),
                Ok(PushPart::File(chunk("core-1.img", 0, 4, b"co"))),
                Ok(PushPart::File(chunk("core-1.img", 3, 4, b"r"))),
            ];
            parts.extend(tail);
            let e = a
                .receive_push(futures::stream::iter(parts))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("at offset 3, expected 2"), "{e}");
            nothing_kept(root);
        }

        let parts = vec![
            Ok(PushPart::Begin(begin_for(&rec, 4))),
            Ok(PushPart::File(chunk("core-1.img", 0, 4, b"core"))),
            Ok(PushPart::End(PushEnd {
                files: 1,
                total_bytes: 4,
                ..Default::default()
            })),
        ];
        let s = a.receive_push(futures::stream::iter(parts)).await.unwrap();
        assert_eq!(s, PushSummary { files: 1, bytes: 4 });
        assert!(root
            .join("node2/images")
            .join(JOB)
            .join(MIG)
            .join("core-1.img")
            .exists());
        // The copy in transit is not listed as node2's job.
        assert!(a.list_local(None, true).unwrap().is_empty());

        let mig = MigrationId::parse(MIG).unwrap();
        let r = a.resolve_migration(&rec.id, &mig).await.unwrap();
        assert_eq!(r, Resolution::Abandoned);
        nothing_kept(root);
        let call = RestoreCall {
            job: rec.id.clone(),
            migration: mig.clone(),
            page_server: None,
            from: Some(NodeName::parse("node1").unwrap()),
            frozen_before_ms: 0,
            image_bytes: 4,
        };
        assert!(a.restore_pushed(call).await.is_err());
        // Still abandoned when asked again (idempotent).
        assert_eq!(
            a.resolve_migration(&rec.id, &mig).await.unwrap(),
            Resolution::Abandoned
        );
        // Once landed, always landed, even after the job moved on.
        a.mark_landed(&rec.id, &mig);
        assert_eq!(
            a.resolve_migration(&rec.id, &mig).await.unwrap(),
            Resolution::Landed(None)
        );
    }

    // ---- The protocol end to end: two in-process agents with nothing
    // shared (but the job output dir, as on one machine), the fake engine,
    // and peers that call each other directly, with faults on demand.

    use crate::agent::migration::Mode;
    use crate::agent::{AgentAction, AgentReply};
    use crate::criu::fake::FakeEngine;
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Direct {
        agents: Mutex<BTreeMap<NodeName, Arc<Agent>>>,
        /// The target restores, and its reply is lost on the way back.
        lose_restore_reply: AtomicBool,
        /// The stream breaks off after this many messages.
        cut_push_after: Mutex<Option<usize>>,
        /// Each push seen: (early, growing chunks).
        pushes: Mutex<Vec<(bool, usize)>>,
        /// A node still named among the peers that answers nothing.
        silent: Mutex<Option<NodeName>>,
    }

    impl Direct {
        fn get(&self, node: &NodeName) -> AgentResult<Arc<Agent>> {
            if self.silent.lock().unwrap().as_ref() == Some(node) {
                return Err(AgentError::Unavailable("no answer in time".into()));
            }
            self.agents
                .lock()
                .ok()
                .and_then(|m| m.get(node).cloned())
                .ok_or_else(|| AgentError::Unavailable(format!("{node} unreachable")))
        }
    }

    impl crate::agent::peers::Peers for Direct {
        fn knows(&self, node: &NodeName) -> bool {
            self.get(node).is_ok()
        }
        fn names(&self) -> Vec<String> {
            let m = self.agents.lock().unwrap();
            m.keys().map(|n| n.to_string()).collect()
        }
        fn ping<'a>(
            &'a self,
            node: &'a NodeName,
        ) -> BoxFuture<'a, AgentResult<crate::agent::peers::TargetInfo>> {
            Box::pin(async move { self.get(node).map(|_| Default::default()) })
        }
        fn restore<'a>(
            &'a self,
            node: &'a NodeName,
            call: RestoreCall,
        ) -> BoxFuture<'a, AgentResult<JobRecord>> {
            Box::pin(async move {
                let r = match self.get(node)?.handle(AgentAction::Restore(call)).await? {
                    AgentReply::Job(j) => *j,
                    other => return Err(AgentError::Internal(format!("{other:?}"))),
                };
                if self.lose_restore_reply.load(Ordering::SeqCst) {
                    return Err(AgentError::Unavailable("the reply was lost".into()));
                }
                Ok(r)
            })
        }
        fn list_local_jobs<'a>(
            &'a self,
            node: &'a NodeName,
            include_finished: bool,
        ) -> BoxFuture<'a, AgentResult<Vec<JobRecord>>> {
            Box::pin(async move { self.get(node)?.list_local(None, include_finished) })
        }
        fn push_images<'a>(
            &'a self,
            node: &'a NodeName,
            mut rx: tokio::sync::mpsc::Receiver<PushPart>,
        ) -> BoxFuture<'a, AgentResult<PushSummary>> {
            Box::pin(async move {
                let target = self.get(node)?;
                let mut parts: Vec<AgentResult<PushPart>> = Vec::new();
                let (mut early, mut growing) = (false, 0);
                while let Some(p) = rx.recv().await {
                    match &p {
                        PushPart::Begin(b) => early = b.early,
                        PushPart::File(c) if c.growing => growing += 1,
                        _ => {}
                    }
                    parts.push(Ok(p));
                }
                self.pushes.lock().unwrap().push((early, growing));
                if let Some(n) = *self.cut_push_after.lock().unwrap() {
                    parts.truncate(n);
                }
                target.receive_push(futures::stream::iter(parts)).await
            })
        }
        fn resolve_migration<'a>(
            &'a self,
            node: &'a NodeName,
            job: &'a JobId,
            mig: &'a MigrationId,
        ) -> BoxFuture<'a, AgentResult<Resolution>> {
            Box::pin(async move { self.get(node)?.resolve_migration(job, mig).await })
        }
    }

    struct Pair {
        dir: tempfile::TempDir,
        peers: Arc<Direct>,
        src: Arc<Agent>,
        dst: Arc<Agent>,
        src_engine: Arc<FakeEngine>,
        dst_engine: Arc<FakeEngine>,
        pids: Mutex<Vec<i32>>,
    }

    fn n(s: &str) -> NodeName {
        NodeName::parse(s).unwrap()
    }

    fn pair() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::security::manifest::ClusterKey::generate();
        let peers = Arc::new(Direct::default());
        let conf = |node: &str| AgentConfig {
            image_key: Some(key.clone()),
            ..cfg(dir.path(), node)
        };
        let (src_engine, dst_engine) = (
            Arc::new(FakeEngine::default()),
            Arc::new(FakeEngine::default()),
        );
        let src = Agent::new(conf("node1"), src_engine.clone(), peers.clone()).unwrap();
        let dst = Agent::new(conf("node2"), dst_engine.clone(), peers.clone()).unwrap();
        peers.agents.lock().unwrap().insert(n("node1"), src.clone());
        peers.agents.lock().unwrap().insert(n("node2"), dst.clone());
        Pair {
            dir,
            peers,
            src,
            dst,
            src_engine,
            dst_engine,
            pids: Mutex::new(vec![]),
        }
    }

    impl Pair {
        /// A running job on node1: a `sleep` child the agent watches.
        fn start_job(&self) -> JobId {
            #[allow(clippy::zombie_processes)]
            let child = crate::criu::fake::stand_in("60").unwrap();
            let pid = child.id() as i32;
            self.pids.lock().unwrap().push(pid);
            let id = JobId::generate();
            let out = self.dir.path().join("jobs").join(id.as_str());
            fs::create_dir_all(&out).unwrap();
            fs::write(out.join("stdout"), b"tick 1\n").unwrap();
            let mut rec = record(self.dir.path(), "node2");
            rec.id = id.clone();
            rec.state = JobState::Running;
            rec.pid = pid;
            rec.pending = None;
            rec.generation = 0;
            rec.stdout_path = out.join("stdout").to_string_lossy().into_owned();
            rec.stderr_path = out.join("stderr").to_string_lossy().into_owned();
            self.src.registry.put(&mut rec).unwrap();
            self.src.adopt_child(&id, pid);
            id
        }

        async fn migrate(
            &self,
            job: &JobId,
            mode: Mode,
        ) -> AgentResult<(JobRecord, MigrationRecord)> {
            let r = self.src.migrate(job, &n("node2"), None, mode).await;
            for a in [&self.src, &self.dst] {
                if let Ok(rec) = a.registry.get(job) {
                    self.pids.lock().unwrap().push(rec.pid);
                }
            }
            r
        }

        fn nothing_on_target(&self, job: &JobId) {
            let d = self.dir.path().join("node2");
            assert!(!self.dst.registry.exists(job), "target keeps no record");
            let mut imgs = vec![];
            for sub in ["images", INCOMING] {
                if let Ok(rd) = fs::read_dir(d.join(sub).join(job.as_str())) {
                    imgs.extend(rd.flatten().map(|e| e.path()));
                }
            }
            assert!(imgs.is_empty(), "target keeps no images: {imgs:?}");
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            // Agents and peers refer to each other.
            self.peers.agents.lock().unwrap().clear();
            for &pid in self.pids.lock().unwrap().iter().filter(|p| **p > 0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    #[tokio::test]
    async fn full_copy_moves_the_job_and_its_record() {
        let p = pair();
        let job = p.start_job();
        let (rec, m) = p.migrate(&job, Mode::FullCopy).await.unwrap();
        assert_eq!(rec.node, n("node2"));
        assert_eq!(rec.state, JobState::Running);
        assert!(m.ok && m.from == n("node1") && m.to == n("node2"), "{m:?}");
        // One push, opened as the dump started, the pages sent growing.
        assert_eq!(*p.peers.pushes.lock().unwrap(), [(true, 1)]);
        assert!(m.image_bytes > 0 && m.fallback.is_empty(), "{m:?}");
        assert!(!p.src.registry.exists(&job), "the record left with the job");
        let there = p.dst.registry.get(&job).unwrap();
        assert_eq!(
            (there.node.clone(), there.pending.clone()),
            (n("node2"), None)
        );
        assert!(there.generation > 0);
        assert_eq!(p.dst_engine.restores.load(Ordering::SeqCst), 1);
        assert_eq!(p.src_engine.restores.load(Ordering::SeqCst), 0);
        // Either node lists it once, on node2, and finds it.
        for a in [&p.src, &p.dst] {
            let l = a.list_cluster(None, false).await.unwrap();
            assert!(l.unlisted.is_empty(), "{l:?}");
            let l = l.jobs;
            assert_eq!(l.len(), 1, "{l:?}");
            assert_eq!(l[0].node, n("node2"));
            assert_eq!(a.get_job_cluster(&job).await.unwrap().node, n("node2"));
        }
        // node2 stops answering: node1's listing names it, and a lookup of
        // the job there says it may be on node2, not that it does not exist.
        *p.peers.silent.lock().unwrap() = Some(n("node2"));
        let l = p.src.list_cluster(None, false).await.unwrap();
        assert!(l.jobs.is_empty(), "{l:?}");
        assert_eq!(l.unlisted.len(), 1, "{l:?}");
        assert_eq!(l.unlisted[0].node, n("node2"));
        assert!(l.unlisted[0].reason.contains("no answer"), "{l:?}");
        match p.src.get_job_cluster(&job).await {
            Err(AgentError::Unavailable(m)) => {
                assert!(m.contains("node2") && m.contains("did not"), "{m}")
            }
            other => panic!("expected Unavailable naming node2, got {other:?}"),
        }
        *p.peers.silent.lock().unwrap() = None;
        // The target remembers it landed, even once the job moves on.
        let r = p.dst.resolve_migration(&job, &m.id).await.unwrap();
        assert!(matches!(r, Resolution::Landed(Some(_))), "{r:?}");
        // A pre-copy request says why it ran as a full copy.
        let job2 = p.start_job();
        let (_, m2) = p.migrate(&job2, Mode::PreCopy).await.unwrap();
        assert!(m2.fallback.contains("without a shared path"), "{m2:?}");
    }

    #[tokio::test]
    async fn a_failed_restore_rolls_back_and_the_target_keeps_nothing() {
        let p = pair();
        let job = p.start_job();
        p.dst_engine.fail_restores.store(1, Ordering::SeqCst);
        let e = p.migrate(&job, Mode::FullCopy).await.unwrap_err();
        assert!(e.to_string().contains("restored on node1"), "{e}");
        let rec = p.src.registry.get(&job).unwrap();
        assert_eq!(
            (rec.node.clone(), rec.state),
            (n("node1"), JobState::Running)
        );
        assert!(!rec.history.last().unwrap().ok);
        assert_eq!(p.src_engine.restores.load(Ordering::SeqCst), 1);
        p.nothing_on_target(&job);
    }

    /// A move whose target never said whether it restored the job was
    /// recorded frozen on its source (`spawn_settle`). A restarted source
    /// asks the target again, and never restores its own copy meanwhile:
    /// the target may run the job.
    #[tokio::test]
    async fn a_move_frozen_for_an_unanswered_target_is_asked_about_again() {
        let p = pair();
        let mut rec = record(p.dir.path(), "node2");
        rec.state = JobState::Frozen;
        rec.pending.as_mut().unwrap().phase = MigrationPhase::Frozen;
        p.src.registry.put(&mut rec).unwrap();
        let pending = rec.pending.clone().unwrap();
        // node2 still does not answer.
        p.peers.agents.lock().unwrap().remove(&n("node2"));
        assert!(
            p.src.recover_direct(&rec, &pending),
            "the source must take the move over and ask"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(p.src_engine.restores.load(Ordering::SeqCst), 0);
        assert_eq!(p.src.registry.get(&rec.id).unwrap().state, JobState::Frozen);
        // A freeze by hand (no target) is not a move: left to the usual
        // recovery.
        let mut frozen = rec.clone();
        frozen.pending.as_mut().unwrap().to = None;
        assert!(!p
            .src
            .recover_direct(&frozen, frozen.pending.as_ref().unwrap()));
    }

    /// The init of a PID namespace (as a job's is), stopped as a streamed
    /// dump leaves it: `unshare --pid --fork sleep`'s child. None without
    /// the privilege to make one.
    fn stopped_pidns_init() -> Option<(std::process::Child, i32)> {
        let mut u = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "sleep", "60"])
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let until = Instant::now() + Duration::from_secs(5);
        let init = loop {
            let kids = fs::read_to_string(format!("/proc/{}/task/{}/children", u.id(), u.id()))
                .unwrap_or_default();
            if let Some(p) = kids.split_whitespace().next().and_then(|p| p.parse().ok()) {
                if crate::agent::reaper::is_pidns_init(p) {
                    break p;
                }
            }
            if Instant::now() > until || u.try_wait().ok().flatten().is_some() {
                let _ = u.kill();
                let _ = u.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .ok()?;
        // Stopped once the signal is taken, a moment later.
        while proc_state(init) != Some('T') && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        Some((u, init))
    }

    /// `/proc/<pid>/stat`'s state letter.
    fn proc_state(pid: i32) -> Option<char> {
        let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        s.rsplit(')')
            .next()?
            .split_whitespace()
            .next()?
            .chars()
            .next()
    }

    /// `mosctl thaw` of a job frozen after a streamed move went unanswered:
    /// its source holds no pages, only the stopped tree, which must run on
    /// (not a restore of images without pages); with the tree gone, the job
    /// is recorded failed, saying so.
    #[tokio::test]
    async fn thaw_after_an_unanswered_stream_resumes_the_stopped_tree() {
        let Some((mut unshare, init)) = stopped_pidns_init() else {
            eprintln!("SKIPPED: cannot make a PID namespace here (needs root)");
            return;
        };
        assert_eq!(proc_state(init), Some('T'), "the tree starts stopped");
        let p = pair();
        let frozen = |id: &str| {
            let mut rec = record(p.dir.path(), "node2");
            rec.id = JobId::parse(id).unwrap();
            rec.state = JobState::Frozen;
            let rel = image_rel(&rec.id, &rec.pending.as_ref().unwrap().id);
            let pm = rec.pending.as_mut().unwrap();
            pm.phase = MigrationPhase::Frozen;
            pm.image_dir = rel.clone();
            p.src.registry.put(&mut rec).unwrap();
            let dir = p.src.image_dir(&rel);
            fs::create_dir_all(&dir).unwrap();
            (rec, dir)
        };
        let (rec, dir) = frozen("jthawstream1");
        stream::StoppedTree::of(init).unwrap().record(&dir).unwrap();
        let back = p.src.thaw(&rec.id).await.unwrap();
        assert_eq!(
            (back.node.clone(), back.state),
            (n("node1"), JobState::Running)
        );
        assert_eq!(back.pid, init);
        assert_ne!(proc_state(init), Some('T'), "the tree runs on");
        assert_eq!(
            p.src_engine.restores.load(Ordering::SeqCst),
            0,
            "nothing restored"
        );
        let m = back.history.last().unwrap();
        assert!(!m.ok && m.error.contains("thawed"), "{m:?}");
        // The tree is gone: failed, and the error says so.
        let _ = unshare.kill();
        let _ = unshare.wait();
        let (rec2, dir2) = frozen("jthawstream2");
        stream::StoppedTree {
            pid: init,
            start: 1,
        }
        .record(&dir2)
        .unwrap();
        let e = p.src.thaw(&rec2.id).await.unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
        assert_eq!(
            p.src.registry.get(&rec2.id).unwrap().state,
            JobState::Failed
        );
        assert_eq!(p.src_engine.restores.load(Ordering::SeqCst), 0);
    }

    /// The Restore happened but its reply was lost: the source must learn
    /// that from the target and never restore its own copy as well.
    #[tokio::test]
    async fn a_lost_restore_reply_is_settled_never_run_twice() {
        let p = pair();
        let job = p.start_job();
        p.peers.lose_restore_reply.store(true, Ordering::SeqCst);
        let (rec, m) = p.migrate(&job, Mode::FullCopy).await.unwrap();
        assert_eq!(rec.node, n("node2"));
        assert!(m.ok);
        assert_eq!(p.dst_engine.restores.load(Ordering::SeqCst), 1);
        assert_eq!(
            p.src_engine.restores.load(Ordering::SeqCst),
            0,
            "no second copy"
        );
        assert!(!p.src.registry.exists(&job));
    }

    /// The link breaks during the push: nothing stays on the target, the
    /// job is restored on the source.
    #[tokio::test]
    async fn a_push_cut_short_rolls_back_and_the_target_keeps_nothing() {
        let p = pair();
        let job = p.start_job();
        *p.peers.cut_push_after.lock().unwrap() = Some(2);
        let e = p.migrate(&job, Mode::FullCopy).await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("sending the images to node2"), "{msg}");
        assert!(
            msg.contains("end marker") && msg.contains("restored on node1"),
            "{msg}"
        );
        assert_eq!(p.dst_engine.restores.load(Ordering::SeqCst), 0);
        let rec = p.src.registry.get(&job).unwrap();
        assert_eq!(rec.state, JobState::Running);
        p.nothing_on_target(&job);
        // And the next try goes through.
        *p.peers.cut_push_after.lock().unwrap() = None;
        let (rec, _) = p.migrate(&job, Mode::FullCopy).await.unwrap();
        assert_eq!(rec.node, n("node2"));
    }
}
