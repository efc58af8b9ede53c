//! Step 2 and 3 of the protocol, the source's: dump the job with CRIU and
//! seal its images. Also a checkpoint that leaves the job running (`dump`)
//! and the first half of a freeze, which take the same path.
//!
//! Why a file of its own: everything that happens while the job is frozen on
//! the source is here, in order: announce the freeze to a gateway, record
//! phase `dumping`, start the early push and the seal's follower, hold the
//! job's frames, run CRIU, seal. The rest of the protocol (checks, hand-over,
//! confirm, roll back) is the parent module's.

use super::{
    dir_bytes, image_rel, remove_images_keep_logs, DumpResult, MigrationPhase, OnDumping,
    PendingMigration, UNSEALED,
};
use crate::agent::{io_error, Agent, AgentError, AgentResult};
use crate::core::{now_unix_ms, JobId, JobRecord, JobState, MigrationId, NodeName};
use crate::criu::{DumpSpec, PageServer};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

impl Agent {
    /// Checkpoint a running job. With `leave_running` it is a snapshot and the
    /// job keeps running; otherwise it is the first half of a move/freeze and
    /// the caller owns the record's next state.
    pub(super) async fn checkpoint(
        self: &Arc<Self>,
        rec: &mut JobRecord,
        pid: i32,
        mig: &MigrationId,
        to: Option<NodeName>,
        leave_running: bool,
        lazy: Option<PageServer>,
    ) -> AgentResult<DumpResult> {
        self.checkpoint_onto(rec, pid, mig, to, leave_running, lazy, None, None, None)
            .await
    }

    /// [`Self::checkpoint`] of a job leaving for `to`, calling `on_dumping`
    /// with the record once it says `dumping`, just before CRIU starts (an
    /// early push starts there: see [`super::direct::early`]). With
    /// `page_socket`, the pages go into it and the tree is left stopped
    /// (see [`super::direct::stream`]).
    pub(super) async fn checkpoint_calling(
        self: &Arc<Self>,
        rec: &mut JobRecord,
        pid: i32,
        mig: &MigrationId,
        to: NodeName,
        on_dumping: OnDumping<'_>,
        page_socket: Option<std::os::fd::RawFd>,
    ) -> AgentResult<DumpResult> {
        self.checkpoint_onto(
            rec,
            pid,
            mig,
            Some(to),
            false,
            None,
            None,
            Some(on_dumping),
            page_socket,
        )
        .await
    }

    /// [`Self::checkpoint`], on top of pre-copy rounds if `pre` has some.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn checkpoint_onto(
        self: &Arc<Self>,
        rec: &mut JobRecord,
        pid: i32,
        mig: &MigrationId,
        to: Option<NodeName>,
        leave_running: bool,
        lazy: Option<PageServer>,
        pre: Option<&crate::agent::precopy::Chain>,
        on_dumping: Option<OnDumping<'_>>,
        page_socket: Option<std::os::fd::RawFd>,
    ) -> AgentResult<DumpResult> {
        self.engine.available()?;
        let rel = image_rel(&rec.id, mig);
        let dir = self.image_dir(&rel);
        let spread =
            crate::criu::create_image_dir(&dir).map_err(|e| io_error("create image dir", e))?;
        // Recovery reads this file as "the dump finished"; one left by an
        // earlier attempt under the same migration id must not say so.
        let _ = std::fs::remove_file(dir.join(crate::criu::DUMP_STATS));
        if to.is_none() && !spread {
            // A checkpoint. A migration made them before its frozen clock
            // started (`migrate`).
            self.precreate_connection_images(rec, pid, &dir);
        }
        let started = now_unix_ms();
        // A move, not a freeze to disk: frames reaching the job meanwhile
        // are kept for it (see `replay`).
        let moving = !leave_running && to.is_some();
        if !leave_running {
            self.announce_freeze(rec, pid, to.as_ref()).await;
            self.check_service_connections(rec, pid)?;
            rec.state = JobState::Migrating;
            rec.pending = Some(PendingMigration {
                id: mig.clone(),
                from: self.cfg.node.clone(),
                to,
                phase: MigrationPhase::Dumping,
                image_dir: rel.clone(),
                started_unix_ms: started,
                post_copy: lazy.is_some(),
                nice_before_dump: self.before_dump(pid),
            });
            self.record_dumping(rec, pid)?;
            if let Some(f) = on_dumping {
                f(rec);
            }
        }
        tracing::debug!(job = %rec.id, "step: registry updated, dumping");
        let t0 = Instant::now();
        let engine = self.engine.clone();
        let spec = DumpSpec {
            pid,
            page_socket,
            image_dir: dir.clone(),
            leave_running,
            lazy,
            status_fd: None,
            prev_images_dir: pre.map(|c| c.parent_rel()),
            keep_stopped: page_socket.is_some(),
            post_dump: None,
            deadline: Some(crate::criu::deadline_for(
                crate::criu::CriuCall::Dump,
                crate::core::procfs::tree_rss_bytes(pid),
            )),
            own_net: rec.net.is_some(),
        };
        // Hash (and start flushing) the page images while CRIU writes them,
        // so sealing after the dump only has the tail left to do.
        let fsync = self.cfg.image_sync == crate::agent::ImageSync::Fsync;
        let follower =
            (self.cfg.image_key.is_some() && spec.lazy.is_none() && spec.page_socket.is_none())
                .then(|| crate::security::follow::FollowHasher::start(&dir, fsync));
        let result = {
            let _one = self.criu_lock.lock().await;
            // Only for a dump that takes the job away: a checkpoint's job
            // stays, and nothing here is worth stopping the others for.
            let _squeeze = (!leave_running).then(|| self.squeeze_jobs()).flatten();
            if moving {
                self.hold_frames(rec);
            }
            Self::blocking(move || engine.dump(&spec)).await?
        };
        let frozen_ms = t0.elapsed().as_millis() as u64;
        tracing::debug!(job = %rec.id, "step: criu dump returned");
        let t_follow = Instant::now();
        let mut precomputed = match (&result, follower) {
            (Ok(()), Some(f)) => Self::blocking(move || f.finish()).await?,
            _ => Default::default(),
        };
        let follow_tail_us = t_follow.elapsed().as_micros() as u64;
        if let Some(c) = pre {
            // The rounds were hashed while the job still ran.
            precomputed.extend(c.precomputed.clone());
        }
        if let Err(e) = result {
            if pre.is_some() {
                crate::agent::precopy::discard_rounds(&dir);
            }
            if leave_running {
                remove_images_keep_logs(&dir);
            } else {
                // CRIU resumed it here: what reached it meanwhile is due.
                self.resend_held(&rec.id);
                self.dump_failed(rec, pid, &dir)?;
            }
            return Err(AgentError::from(e).context(&format!(
                "dump of job {} failed; it keeps running on {}",
                rec.id, self.cfg.node
            )));
        }
        // Left stopped (streamed pages), the process is still ours until
        // the target runs the job (see `direct::stream`).
        let stopped = page_socket.is_some();
        if !leave_running && !stopped {
            // The process is gone; it is no longer ours to reap.
            if let Ok(mut l) = self.local.lock() {
                l.remove(&rec.id);
            }
        }
        if !leave_running && rec.net.is_some() {
            if stopped {
                // The stopped tree must not answer for the address the
                // target is about to take (ARP is not under CRIU's lock):
                // its link comes back if the move fails, as in post-copy.
                crate::agent::jobnet::left_here(&rec.id, true);
            } else {
                // Its namespace is gone with it; its veth must not linger
                // here.
                crate::agent::jobnet::left_here_soon(&rec.id);
            }
        }
        let t_seal = Instant::now();
        let image_bytes = self.seal(&dir, &rec.id, mig, precomputed).await?;
        tracing::info!(
            job = %rec.id,
            dump_ms = frozen_ms,
            follow_tail_us,
            seal_us = t_seal.elapsed().as_micros() as u64,
            "dumped and sealed"
        );
        Ok(DumpResult {
            image_dir: rel,
            image_bytes,
            frozen_ms,
        })
    }

    /// An own-address job's connections' image files, made empty while it
    /// still runs, so that the freeze does not pay for creating them (see
    /// [`crate::criu::precreate_tcp_stream_images`]). Best effort: without
    /// them CRIU creates the files itself, while the job is frozen.
    pub(super) fn precreate_connection_images(&self, rec: &JobRecord, pid: i32, dir: &Path) {
        if rec.net.is_none() {
            return;
        }
        let t = Instant::now();
        let inodes = crate::agent::jobnet::established_inodes(pid);
        match crate::criu::precreate_tcp_stream_images(dir, &inodes) {
            Ok(n) => tracing::debug!(
                job = %rec.id,
                files = n,
                us = t.elapsed().as_micros() as u64,
                "tcp-stream images created before the freeze"
            ),
            Err(e) => {
                tracing::warn!(job = %rec.id, "creating tcp-stream images before the freeze: {e}; CRIU creates them while the job is frozen")
            }
        }
    }

    /// Tell front ends that `rec` is about to be frozen and, for a service
    /// instance, wait (bounded) until they let go of it: see [`crate::agent::events`].
    pub(crate) async fn announce_freeze(&self, rec: &JobRecord, pid: i32, to: Option<&NodeName>) {
        let w = self
            .events
            .before_freeze(rec, pid, &self.cfg.node, to)
            .await;
        if rec.service.is_some() {
            if w.timed_out.is_empty() && !w.still_connected {
                tracing::info!(job = %rec.id, released = w.released, waited_ms = w.waited.as_millis() as u64, "front ends let go of the instance");
            } else {
                tracing::warn!(job = %rec.id, timed_out = ?w.timed_out, still_connected = w.still_connected, waited_ms = w.waited.as_millis() as u64, "dumping without every front end's release");
            }
        }
    }

    /// Record the dump that is about to stop the job (its pending migration
    /// carries the nice values [`crate::agent::priority::raise`] changed). If the record
    /// cannot be written (a full disk), nothing is dumped and the job keeps
    /// running here as it was, its priority included.
    pub(super) fn record_dumping(&self, rec: &mut JobRecord, pid: i32) -> AgentResult<()> {
        if let Err(e) = self.registry.put(rec) {
            if let Some(p) = rec.pending.take() {
                self.after_dump(pid, &p.nice_before_dump);
            }
            rec.state = JobState::Running;
            self.events.running(rec, &self.cfg.node);
            return Err(e.into());
        }
        self.set_dumping(&rec.id, true);
        Ok(())
    }

    /// A dump that stops the job failed: CRIU has resumed the job (or it
    /// ended by itself meanwhile). Drop the partial images first — a full
    /// disk is a common cause and the registry write needs room — then
    /// record the job as running here again (or its exit).
    pub(super) fn dump_failed(&self, rec: &mut JobRecord, pid: i32, dir: &Path) -> AgentResult<()> {
        remove_images_keep_logs(dir);
        let exited = self.set_dumping(&rec.id, false);
        if let Some(p) = rec.pending.take() {
            self.after_dump(pid, &p.nice_before_dump);
        }
        rec.state = JobState::Running;
        self.registry.put(rec)?;
        if exited.is_none() {
            self.events.running(rec, &self.cfg.node);
        }
        if let Some(st) = exited {
            if let Ok(mut l) = self.local.lock() {
                l.remove(&rec.id);
            }
            self.record_exit(&rec.id, pid, Some(st));
        }
        Ok(())
    }

    /// Make the images durable and unforgeable: fsync + HMAC manifest.
    /// `precomputed` holds digests hashed while CRIU wrote (see
    /// `security::follow`); other files are hashed now. Returns the images'
    /// size: the manifest's sum, or without an image key (nothing sealed)
    /// the directory's.
    pub(crate) async fn seal(
        &self,
        dir: &Path,
        job: &JobId,
        mig: &MigrationId,
        precomputed: std::collections::BTreeMap<String, crate::security::manifest::Precomputed>,
    ) -> AgentResult<u64> {
        let Some(key) = self.cfg.image_key.clone() else {
            return Ok(dir_bytes(dir));
        };
        let (dir, job, mig) = (dir.to_path_buf(), job.to_string(), mig.to_string());
        let fsync = self.cfg.image_sync == crate::agent::ImageSync::Fsync;
        Self::blocking(move || {
            crate::security::manifest::write_manifest_with(
                &dir,
                &key,
                &job,
                &mig,
                UNSEALED,
                &precomputed,
                fsync,
            )
        })
        .await?
        .map(|m| m.bytes())
        .map_err(|e| {
            let msg = e.to_string();
            if msg.contains("No space left") {
                AgentError::ResourceExhausted(format!("sealing images: {msg}"))
            } else {
                AgentError::Internal(format!("sealing images: {msg}"))
            }
        })
    }

    /// Dump RPC.
    pub async fn dump(
        self: &Arc<Self>,
        job: &JobId,
        mig: Option<MigrationId>,
        leave_running: bool,
    ) -> AgentResult<DumpResult> {
        if !leave_running {
            // A dump that stops the job is a freeze; one code path for both.
            let rec = self.freeze(job).await?;
            let rel = rec
                .pending
                .as_ref()
                .map(|p| p.image_dir.clone())
                .unwrap_or_default();
            let dir = self.image_dir(&rel);
            return Ok(DumpResult {
                image_bytes: dir_bytes(&dir),
                image_dir: rel,
                frozen_ms: 0,
            });
        }
        let _busy = self.claim(job)?;
        let (mut rec, pid) = self.local_running(job)?;
        let mig = mig.unwrap_or_else(MigrationId::generate);
        if self
            .image_dir(&image_rel(job, &mig))
            .join("MANIFEST.json")
            .exists()
        {
            // Idempotent retry of the same snapshot.
            let dir = self.image_dir(&image_rel(job, &mig));
            return Ok(DumpResult {
                image_dir: image_rel(job, &mig),
                image_bytes: dir_bytes(&dir),
                frozen_ms: 0,
            });
        }
        self.checkpoint(&mut rec, pid, &mig, None, true, None).await
    }
}
