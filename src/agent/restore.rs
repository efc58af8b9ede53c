//! The target's half of the migration protocol (steps 4 and 5 of
//! [`super`]): verify the images, claim them, restore the job with CRIU and
//! record it here. The same path brings a job back from its images in every
//! other case too (a thaw, a rollback on the source, recovery after an
//! agent restart, a restart from a checkpoint), so [`Arrival`] says which
//! one it was, for the job's history.

use super::{create_claim, dir_bytes, image_rel, postcopy, RestoreCall, CLAIM_FILE, UNSEALED};
use crate::agent::{io_error, Agent, AgentError, AgentResult};
use crate::core::{
    now_unix_ms, JobId, JobRecord, JobState, MigrationId, MigrationRecord, NodeName,
};
use crate::criu::{AbortCheck, PageServer, RestoreSpec, ResumeGate};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How the restored job came to be on this node; decides its history entry.
#[derive(Debug, Clone)]
pub(crate) enum Arrival {
    Migrated {
        from: NodeName,
        frozen_before_ms: u64,
        image_bytes: u64,
        post_copy: bool,
    },
    RolledBack {
        to: NodeName,
        error: String,
        frozen_before_ms: u64,
    },
    Thawed,
    /// From a checkpoint (see [`crate::checkpoint`]): the images are a
    /// staged copy of checkpoint `seq`, whose output files are written back
    /// once the images are verified and before CRIU reopens them.
    Restarted {
        from: NodeName,
        seq: u64,
    },
}

/// Remove the page images of `dir`, once a restore has consumed them.
fn drop_page_images(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if crate::security::follow::is_page_image(&e.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Agent {
    /// Verify the manifest and every image CRIU parses now; the memory
    /// pages are hashed on a separate thread while CRIU restores, and the
    /// returned gate holds the restored job at CRIU's pre-resume step until
    /// that check passed (or kills it if it failed). Tampered pages are thus
    /// never run, and verification costs no time when it is faster than the
    /// restore. With `pages_hashed_on_arrival` (see
    /// [`crate::agent::direct::stream::HashedOnArrival`]) the pages are not
    /// read again: everything else is checked as always. Also returns the
    /// images' size as the manifest lists it (None without an image key).
    async fn verify(
        &self,
        dir: &Path,
        job: &JobId,
        pages_hashed_on_arrival: bool,
    ) -> AgentResult<(Option<ResumeGate>, Option<u64>)> {
        let Some(key) = self.cfg.image_key.clone() else {
            return Ok((None, None));
        };
        let (dir, job) = (dir.to_path_buf(), job.to_string());
        let (manifest, deferred) = Self::blocking(move || {
            crate::security::manifest::verify_manifest_deferring(
                &dir,
                &key,
                &job,
                UNSEALED,
                crate::security::follow::is_page_image,
            )
        })
        .await?
        .map_err(|e| AgentError::DataLoss(format!("images refused: {e}")))?;
        let bytes = Some(manifest.bytes());
        if pages_hashed_on_arrival {
            return Ok((None, bytes));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        std::thread::Builder::new()
            .name("verify-pages".into())
            .spawn(move || {
                let _ = tx.send(deferred.check().map_err(|e| e.to_string()));
            })
            .map_err(|e| io_error("starting page verification", e))?;
        let rx = std::sync::Mutex::new(rx);
        let gate = ResumeGate::new(move || {
            let rx = rx
                .lock()
                .map_err(|_| "verification state poisoned".to_string())?;
            rx.recv()
                .unwrap_or_else(|_| Err("page verification thread died".into()))
        });
        Ok((Some(gate), bytes))
    }

    /// Restore RPC (the target's half of a migration).
    pub async fn restore(self: &Arc<Self>, call: RestoreCall) -> AgentResult<JobRecord> {
        let _busy = self.claim(&call.job)?;
        tracing::debug!(job = %call.job, "step: restore call received");
        let rec = self.registry.get(&call.job)?;
        // Idempotency: a retried Restore of a migration that already landed
        // here returns the job instead of restoring it twice.
        if rec.node == self.cfg.node
            && rec.state == JobState::Running
            && rec.history.last().is_some_and(|m| m.id == call.migration)
        {
            return Ok(rec);
        }
        // No migration in while blocked. The source asked first (its ping
        // reads GetLoad's `blocked`), so this only catches a block set since.
        self.check_not_blocked()?;
        match &rec.pending {
            Some(p) if p.id == call.migration => {}
            _ => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {} has no migration {} waiting to be restored",
                    call.job, call.migration
                )))
            }
        }
        let from = call.from.clone().unwrap_or_else(|| rec.node.clone());
        let arrival = Arrival::Migrated {
            from,
            frozen_before_ms: call.frozen_before_ms,
            image_bytes: call.image_bytes,
            post_copy: call.page_server.is_some(),
        };
        self.check_not_fenced()?;
        let r = self
            .restore_here(&call.job, &call.migration, call.page_server, arrival)
            .await;
        if r.is_ok() {
            self.note_arrival(&call.job).await;
        }
        r
    }

    /// Claim the images, restore them on this node, record the job here.
    pub(crate) async fn restore_here(
        self: &Arc<Self>,
        job: &JobId,
        mig: &MigrationId,
        lazy_from: Option<PageServer>,
        arrival: Arrival,
    ) -> AgentResult<JobRecord> {
        self.engine.available()?;
        if matches!(arrival, Arrival::RolledBack { .. }) {
            // With etcd: the owner may be the target already (the CAS ran
            // before its restore failed, or before we restarted): take it
            // back first, or this copy would be killed as a stale one.
            self.take_owner_back(job).await?;
        }
        let rel = image_rel(job, mig);
        let dir = self.image_dir(&rel);
        if !dir.is_dir() {
            return Err(AgentError::NotFound(format!(
                "no images for job {job} at {}",
                dir.display()
            )));
        }
        if lazy_from.is_some() {
            // A daemon socket left by an earlier attempt is not an image file.
            let _ = std::fs::remove_file(dir.join("lazy-pages.socket"));
        }
        // Streamed pages that this agent hashed as it wrote them (one
        // restore only, a full copy's): not read twice, and consumed by the
        // restore, since the source still holds the job's own copy.
        let consume_pages = lazy_from.is_none()
            && matches!(arrival, Arrival::Migrated { .. })
            && self.hashed_on_arrival.take(job, mig);
        let t_verify = Instant::now();
        let (resume_gate, verified_bytes) = self.verify(&dir, job, consume_pages).await?;
        // The images' size, for the restore's deadline and the job's history.
        let image_bytes = verified_bytes.unwrap_or_else(|| dir_bytes(&dir));
        let verify_ms = t_verify.elapsed().as_millis() as u64;
        self.claim_images(&dir, mig)?;
        tracing::debug!(job = %job, "step: images verified and claimed");
        let release = |dir: &Path| {
            let _ = std::fs::remove_file(dir.join(CLAIM_FILE));
            let _ = std::fs::remove_file(dir.join("lazy-pages.socket"));
        };
        if let Arrival::Restarted { seq, .. } = &arrival {
            // The metadata and the copies are sealed: verified just above.
            // (Pages are checked during the restore, gated before resume.)
            if let Err(e) = crate::agent::checkpoint::put_back_outputs(&dir) {
                release(&dir);
                return Err(e.context(&format!(
                    "putting back the output files of checkpoint {seq} of job {job}"
                )));
            }
        }
        // A job with its own address: this node's end of its veth (see
        // `jobnet`), before anything of it runs here.
        let net_here = match self.prepare_job_net(job) {
            Ok(n) => n,
            Err(e) => {
                release(&dir);
                return Err(e);
            }
        };
        let t0 = Instant::now();
        let mut daemon = None;
        if let Some(ps) = lazy_from.clone() {
            let (engine, d) = (self.engine.clone(), dir.clone());
            match Self::blocking(move || engine.start_lazy_daemon(&d, &ps)).await? {
                Ok(child) => daemon = Some(Arc::new(Mutex::new(child))),
                Err(e) => {
                    release(&dir);
                    self.job_net_failed(job, net_here.as_ref());
                    let e = AgentError::from(e).context(&format!(
                        "post-copy restore of job {job} on {} failed",
                        self.cfg.node
                    ));
                    tracing::warn!(job = %job, "{e}");
                    return Err(e);
                }
            }
        }
        // A lazy restore whose daemon failed would wait for pages forever;
        // one that exits successfully may simply have been quick.
        let abort_if = daemon.clone().map(|d| {
            AbortCheck::new(move || {
                let st = d.lock().ok()?.try_wait().ok()??;
                (!st.success()).then(|| {
                    format!("the lazy-pages daemon exited ({st}) before the restore finished")
                })
            })
        });
        let engine = self.engine.clone();
        let spec = RestoreSpec {
            image_dir: dir.clone(),
            lazy_from: lazy_from.clone(),
            resume_gate,
            deadline: Some(postcopy::restore_deadline(lazy_from.is_some(), image_bytes)),
            abort_if,
            external_veth: net_here.as_ref().map(|(v, _)| v.clone()),
            jobs_cgroup: self.jobs_group.as_ref().map(|g| g.jobs_procs()),
            consume_pages,
        };
        let result = if lazy_from.is_some() {
            // Not under the CRIU lock: pages come from another node, and
            // a post-copy restore is short and bounded.
            Self::blocking(move || engine.restore(&spec)).await?
        } else {
            let _one = self.criu_lock.lock().await;
            Self::blocking(move || engine.restore(&spec)).await?
        };
        let restore_ms = t0.elapsed().as_millis() as u64;
        tracing::debug!(job = %job, "step: criu restore returned");
        if consume_pages {
            // CRIU punched holes in them as it read: whatever happened, this
            // copy is not whole any more, so nothing may restore it again
            // (on failure the source still holds the job).
            drop_page_images(&dir);
        }
        let kill_daemon = |daemon: Option<Arc<Mutex<std::process::Child>>>| {
            if let Some(d) = daemon {
                if let Ok(mut d) = d.lock() {
                    let _ = d.kill();
                    let _ = d.wait();
                }
            }
        };
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                kill_daemon(daemon);
                self.job_net_failed(job, net_here.as_ref());
                // Release the claim so the source can roll back.
                release(&dir);
                let e = AgentError::from(e)
                    .context(&format!("restore of job {job} on {} failed", self.cfg.node));
                tracing::warn!(job = %job, restore_ms, "{e}");
                return Err(e);
            }
        };
        if lazy_from.is_some() && matches!(arrival, Arrival::Migrated { .. }) {
            // A source whose Restore call gave up takes the job back and
            // clears its pending migration: then this copy must not run.
            let taken_back = self
                .registry
                .get(job)
                .map(|r| r.pending.as_ref().map(|p| &p.id) != Some(mig))
                .unwrap_or(false);
            if taken_back {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(outcome.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                kill_daemon(daemon);
                let msg = format!(
                    "job {job} was restored on {} after its source had taken it back; this copy was killed",
                    self.cfg.node
                );
                tracing::warn!(job = %job, "{msg}");
                return Err(AgentError::Aborted(msg));
            }
        }
        self.adopt_child(job, outcome.pid);
        self.job_net_arrived(job, outcome.pid, net_here.as_ref());
        if let Some(d) = daemon {
            self.watch_lazy_daemon(job.clone(), outcome.pid, d, dir.clone());
        }
        let mut rec = self.registry.get(job)?;
        match &rec.pending {
            Some(p) => self.after_dump(outcome.pid, &p.nice_before_dump),
            // CRIU put it in the jobs group at pre-resume already; this
            // covers an engine without that step.
            None => self.place_in_jobs_group(outcome.pid),
        }
        let now = now_unix_ms();
        let started = rec
            .pending
            .as_ref()
            .map(|p| p.started_unix_ms)
            .unwrap_or(now);
        match arrival {
            Arrival::Migrated {
                from,
                frozen_before_ms,
                image_bytes,
                post_copy,
            } => rec.history.push(MigrationRecord {
                id: mig.clone(),
                from,
                to: self.cfg.node.clone(),
                started_unix_ms: started,
                frozen_ms: frozen_before_ms + restore_ms,
                total_ms: frozen_before_ms + restore_ms,
                ok: true,
                error: String::new(),
                image_bytes,
                post_copy,
                pre_copy_rounds: 0,
                pre_copy_bytes: 0,
                fallback: String::new(),
                restored_from_checkpoint: 0,
            }),
            Arrival::RolledBack {
                to,
                error,
                frozen_before_ms,
            } => rec.history.push(MigrationRecord {
                id: mig.clone(),
                from: self.cfg.node.clone(),
                to,
                started_unix_ms: started,
                frozen_ms: frozen_before_ms + restore_ms,
                total_ms: now.saturating_sub(started),
                ok: false,
                error,
                image_bytes,
                post_copy: false,
                pre_copy_rounds: 0,
                pre_copy_bytes: 0,
                fallback: String::new(),
                restored_from_checkpoint: 0,
            }),
            Arrival::Thawed => {}
            Arrival::Restarted { from, seq } => {
                rec.history.push(MigrationRecord {
                    id: mig.clone(),
                    from,
                    to: self.cfg.node.clone(),
                    started_unix_ms: now.saturating_sub(restore_ms),
                    frozen_ms: restore_ms,
                    total_ms: restore_ms,
                    ok: true,
                    error: String::new(),
                    image_bytes,
                    post_copy: false,
                    pre_copy_rounds: 0,
                    pre_copy_bytes: 0,
                    fallback: String::new(),
                    restored_from_checkpoint: seq,
                });
                rec.exit_code = None;
                rec.exit_signal = None;
            }
        }
        rec.node = self.cfg.node.clone();
        rec.state = JobState::Running;
        rec.pid = outcome.pid;
        rec.pending = None;
        rec.arrived_unix_ms = now;
        rec.error.clear();
        self.registry.put(&mut rec)?;
        self.events.running(&rec, &self.cfg.node);
        tracing::info!(
            job = %job,
            pid = outcome.pid,
            verify_ms,
            restore_ms,
            pages_consumed = consume_pages,
            "restored"
        );
        Ok(rec)
    }

    /// Take the images for this node. `O_EXCL` create is atomic on local file
    /// systems and on NFSv3+, so exactly one node can restore a set of images.
    fn claim_images(&self, dir: &Path, mig: &MigrationId) -> AgentResult<()> {
        let path = dir.join(CLAIM_FILE);
        match create_claim(&path, &format!("{} {}", self.cfg.node, mig)) {
            Ok(f) => {
                // O_EXCL already made the claim exclusive; the flush only
                // matters for a crash of the image server, and follows the
                // images' durability policy (after a fresh dump it can wait
                // on a journal commit of everything CRIU wrote).
                if self.cfg.image_sync == crate::agent::ImageSync::Fsync {
                    let _ = f.sync_all();
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                Err(AgentError::FailedPrecondition(format!(
                    "images of migration {mig} are already claimed by {}; refusing to restore them twice",
                    owner.split_whitespace().next().unwrap_or("another node")
                )))
            }
            Err(e) => Err(io_error("claim images", e)),
        }
    }
}
