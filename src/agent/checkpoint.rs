//! The agent's side of checkpoints ([`crate::checkpoint`]): taking one of a
//! job that runs here (on demand, or every interval its record asks for),
//! and restoring a job here from one.
//!
//! A checkpoint is a dump with `leave_running`, so the job only stops for
//! as long as CRIU holds it frozen, plus the copy of its output files at
//! CRIU's `post-dump` step. It goes to a temporary directory, is sealed
//! like migration images, and is renamed into place only when complete;
//! any failure (a full disk, CRIU) removes the temporary directory, leaves
//! the previous checkpoint the latest and the job running, and is recorded
//! in the job's `checkpoint.last_error`.
//!
//! A restore stages a copy of the checkpoint (hard links) as an ordinary
//! image directory and runs the usual restore on it (manifest check,
//! claim, CRIU, page check before resume), with the output files written
//! back after the manifest check. The checkpoint itself is never modified,
//! so it can be restored again. On any failure the job's record is left as
//! it was and nothing of the job runs here.

use super::migration::{
    image_rel, remove_images_in_background, remove_images_keep_logs, Arrival, CLAIM_FILE,
};
use super::{io_error, Agent, AgentError, AgentResult};
use crate::checkpoint::{self, outputs, CheckpointError, Meta, Store};
use crate::core::{
    now_unix_ms, CheckpointStatus, JobId, JobRecord, JobState, MigrationId, NodeName,
};
use crate::criu::{DumpSpec, PostDumpHook, DUMP_LOG, RESTORE_LOG};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A checkpoint taken.
#[derive(Debug, Clone)]
pub struct CheckpointDone {
    pub rec: JobRecord,
    pub seq: u64,
    pub frozen_ms: u64,
    pub bytes: u64,
    pub mode: String,
}

/// What a restore from a checkpoint did.
#[derive(Debug, Clone)]
pub enum FromCheckpoint {
    Running {
        rec: JobRecord,
        seq: u64,
    },
    /// No checkpoint, and its node was declared down: recorded lost.
    Lost(JobRecord),
}

impl From<CheckpointError> for AgentError {
    fn from(e: CheckpointError) -> Self {
        if e.is_disk_full() {
            return AgentError::ResourceExhausted(format!("disk is full: {e}"));
        }
        match e {
            CheckpointError::NoCheckpoint(_) | CheckpointError::Missing { .. } => {
                AgentError::NotFound(e.to_string())
            }
            CheckpointError::RestoreUnderWay { .. } => {
                AgentError::FailedPrecondition(e.to_string())
            }
            CheckpointError::Corrupt { .. } => AgentError::DataLoss(e.to_string()),
            CheckpointError::Io { .. } => AgentError::Internal(e.to_string()),
        }
    }
}

/// Write a staged checkpoint's output files back (its metadata names them).
pub(crate) fn put_back_outputs(dir: &Path) -> AgentResult<()> {
    let meta = Store::read_meta(dir)?;
    outputs::put_back(dir, &meta.outputs).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            AgentError::ResourceExhausted(format!("disk is full: {e}"))
        } else {
            io_error("output files", e)
        }
    })
}

/// Below this much free space a failed dump is put down to a full disk.
const LOW_SPACE: u64 = 1 << 20;

#[allow(clippy::unnecessary_cast)] // the types differ between platforms
fn free_bytes(p: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(p).ok()?;
    Some((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// How often the agent looks for jobs whose checkpoint is due.
const TICK: Duration = Duration::from_secs(1);

impl Agent {
    fn store(&self) -> Store {
        Store::new(&self.cfg.shared_root)
    }

    /// Checkpoint a job running here, without stopping it.
    pub async fn checkpoint_job(self: &Arc<Self>, job: &JobId) -> AgentResult<CheckpointDone> {
        let _busy = self.claim(job)?;
        let (rec, pid) = self.local_running(job)?;
        self.engine.available()?;
        let r = self.checkpoint_running(&rec, pid).await;
        if let Err(e) = &r {
            let msg = e.to_string();
            tracing::warn!(job = %job, "{msg}");
            self.update_checkpoint_status(job, |st| st.last_error = msg.clone());
        }
        r
    }

    async fn checkpoint_running(
        self: &Arc<Self>,
        rec: &JobRecord,
        pid: i32,
    ) -> AgentResult<CheckpointDone> {
        let job = &rec.id;
        let store = self.store();
        let status = rec.checkpoint.clone().unwrap_or_default();
        let seq = store.next_seq(job, status.last_seq)?;
        let mig = MigrationId::generate();
        let tmp = store.begin(job, seq, mig.as_str())?;
        let tracking = self.engine.features().mem_dirty_track;
        let mode = checkpoint::full_mode(tracking);
        if status.mode != mode {
            tracing::warn!(job = %job, "checkpoints are {mode}");
        }
        let previous = if status.last_seq > 0 {
            format!("checkpoint {}", status.last_seq)
        } else {
            "none".to_string()
        };
        let fail = |e: AgentError, tmp: &Path| {
            // A full disk often leaves CRIU unable to say so (its log is
            // empty): ask the file system.
            let e = match (e, free_bytes(tmp)) {
                (AgentError::Aborted(m), Some(free)) if free < LOW_SPACE => {
                    AgentError::ResourceExhausted(format!(
                        "no space left on the checkpoint disk ({free} bytes free): {m}"
                    ))
                }
                (e, _) => e,
            };
            // CRIU's log stays for a person (the next attempt clears it);
            // no image of a failed checkpoint is kept.
            remove_images_keep_logs(tmp);
            e.context(&format!(
                "checkpoint of job {job} failed; it keeps running on {}, and its latest checkpoint is still {previous}",
                self.cfg.node
            ))
        };
        let captured: Arc<Mutex<Vec<checkpoint::OutputFile>>> = Arc::default();
        let hook = {
            let (captured, dir) = (captured.clone(), tmp.clone());
            PostDumpHook::new(move || {
                let files = outputs::capture(pid, &dir).map_err(|e| e.to_string())?;
                if let Ok(mut c) = captured.lock() {
                    *c = files;
                }
                Ok(())
            })
        };
        let spec = DumpSpec {
            pid,
            page_socket: None,
            image_dir: tmp.clone(),
            leave_running: true,
            lazy: None,
            status_fd: None,
            prev_images_dir: None,
            keep_stopped: false,
            deadline: Some(crate::criu::deadline_for(
                crate::criu::CriuCall::Dump,
                crate::core::procfs::tree_rss_bytes(pid),
            )),
            post_dump: Some(hook),
            own_net: rec.net.is_some(),
        };
        let fsync = self.cfg.image_sync == super::ImageSync::Fsync;
        let follower = self
            .cfg
            .image_key
            .is_some()
            .then(|| crate::security::follow::FollowHasher::start(&tmp, fsync));
        let engine = self.engine.clone();
        let t0 = Instant::now();
        let result = {
            let _one = self.criu_lock.lock().await;
            tokio::task::spawn_blocking(move || engine.dump(&spec))
                .await
                .map_err(|e| AgentError::Internal(format!("worker thread failed: {e}")))?
        };
        let frozen_ms = t0.elapsed().as_millis() as u64;
        let precomputed = match (&result, follower) {
            (Ok(()), Some(f)) => tokio::task::spawn_blocking(move || f.finish())
                .await
                .map_err(|e| AgentError::Internal(format!("worker thread failed: {e}")))?,
            _ => Default::default(),
        };
        if let Err(e) = result {
            return Err(fail(AgentError::from(e), &tmp));
        }
        let outputs = captured.lock().map(|c| c.clone()).unwrap_or_default();
        let taken = now_unix_ms();
        let meta = Meta {
            format: checkpoint::store::FORMAT,
            job: job.to_string(),
            seq,
            node: self.cfg.node.to_string(),
            taken_unix_ms: taken,
            frozen_ms,
            mode: mode.clone(),
            outputs,
        };
        if let Err(e) = Store::write_meta(&tmp, &meta) {
            return Err(fail(e.into(), &tmp));
        }
        let bytes = match self.seal(&tmp, job, &mig, precomputed).await {
            Ok(bytes) => bytes,
            Err(e) => return Err(fail(e, &tmp)),
        };
        // Fencing: only the job's owner, at its epoch and not fenced, makes a
        // checkpoint the latest (a node cut off from etcd must not publish
        // one taken from a copy that another node may have replaced).
        if let Err(e) = self.may_publish(job, None).await {
            return Err(fail(
                e.context("not publishing the checkpoint: this node may not write for the job"),
                &tmp,
            ));
        }
        if let Err(e) = store.commit(job, &tmp, seq, fsync) {
            return Err(fail(e.into(), &tmp));
        }
        let keep = if status.keep == 0 {
            checkpoint::DEFAULT_KEEP
        } else {
            status.keep
        };
        let removed = store.prune(job, keep);
        tracing::info!(job = %job, seq, frozen_ms, bytes, ?removed, "checkpoint taken");
        let rec = self
            .update_checkpoint_status(job, |st| {
                st.last_seq = seq;
                st.last_unix_ms = taken;
                st.last_frozen_ms = frozen_ms;
                st.last_bytes = bytes;
                st.mode = mode.clone();
                st.last_error.clear();
            })
            .unwrap_or_else(|| rec.clone());
        Ok(CheckpointDone {
            rec,
            seq,
            frozen_ms,
            bytes,
            mode,
        })
    }

    /// Update the checkpoint status of a job that still runs here (under
    /// the verdict lock, re-reading the record, so an exit recorded
    /// meanwhile is never overwritten). None if it was not written.
    fn update_checkpoint_status(
        &self,
        job: &JobId,
        f: impl FnOnce(&mut CheckpointStatus),
    ) -> Option<JobRecord> {
        let _v = self.verdict_lock.lock().ok()?;
        let mut rec = self.registry.get(job).ok()?;
        if rec.node != self.cfg.node || rec.state != JobState::Running {
            return None;
        }
        let st = rec.checkpoint.get_or_insert_with(|| CheckpointStatus {
            keep: checkpoint::DEFAULT_KEEP,
            ..Default::default()
        });
        f(st);
        match self.registry.put(&mut rec) {
            Ok(()) => Some(rec),
            Err(e) => {
                tracing::warn!(job = %job, "recording the checkpoint status: {e}");
                None
            }
        }
    }

    /// Restore `job` on this node from checkpoint `seq` (the latest when
    /// None). See the RestoreCheckpoint RPC for the rules.
    pub async fn restore_checkpoint(
        self: &Arc<Self>,
        job: &JobId,
        seq: Option<u64>,
        node_is_down: Option<NodeName>,
    ) -> AgentResult<FromCheckpoint> {
        if node_is_down.as_ref() == Some(&self.cfg.node) {
            return Err(AgentError::FailedPrecondition(format!(
                "this is {}, the node you declared down; restore the job on another node",
                self.cfg.node
            )));
        }
        let _busy = self.claim(job)?;
        let rec = self.registry.get(job)?;
        match (rec.state, &node_is_down) {
            (JobState::Running | JobState::Migrating, Some(d)) if *d == rec.node => {}
            (JobState::Running | JobState::Migrating, Some(d)) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {job} is recorded on {}, not on {d}; refusing to restore it",
                    rec.node
                )))
            }
            (JobState::Running | JobState::Migrating, None) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {job} is still {} on {}; a restore would run it twice. Stop it first (`mosctl kill {job}`), or, if {} is down, say so: `mosctl restore {job} --node-is-down {}`",
                    rec.state.as_str(),
                    rec.node,
                    rec.node,
                    rec.node
                )))
            }
            (JobState::Failed, _) => {}
            (JobState::Frozen, _) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {job} is frozen, not lost: `mosctl thaw {job}` brings it back"
                )))
            }
            (JobState::Exited, _) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "job {job} has exited; there is nothing to restore"
                )))
            }
        }
        let store = self.store();
        let _lock = store.lock_restore(job, &format!("{} at {}", self.cfg.node, now_unix_ms()))?;
        let seq = match store.find(job, seq) {
            Ok(s) => s,
            Err(CheckpointError::NoCheckpoint(_)) if node_is_down.is_some() => {
                return self
                    .mark_lost(job, node_is_down.as_ref())
                    .map(FromCheckpoint::Lost);
            }
            Err(e) => return Err(e.into()),
        };
        // Not while blocked; a lost job is recorded whatever the block.
        self.check_not_blocked()?;
        self.engine.available()?;
        let mig = MigrationId::generate();
        let staged = self.image_dir(&image_rel(job, &mig));
        if let Err(e) = Store::stage(
            &store.dir(job, seq),
            &staged,
            &[DUMP_LOG, RESTORE_LOG, CLAIM_FILE],
        ) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(AgentError::from(e).context(&format!(
                "staging checkpoint {seq} of job {job}; its record is unchanged"
            )));
        }
        let taken = match self.take_owner_for_restart(job, &rec.node).await {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staged);
                return Err(e);
            }
        };
        let arrival = Arrival::Restarted {
            from: rec.node.clone(),
            seq,
        };
        match self.restore_here(job, &mig, None, arrival).await {
            Ok(rec) => {
                remove_images_in_background(staged);
                tracing::info!(job = %job, seq, from = %rec.node, "restarted from checkpoint");
                Ok(FromCheckpoint::Running { rec, seq })
            }
            Err(e) => {
                if let Some(mine) = &taken {
                    self.give_owner_back(job, mine, &rec.node).await;
                }
                // restore.log stays for a person; the checkpoint is intact.
                remove_images_keep_logs(&staged);
                let e = e.context(&format!(
                    "restore of job {job} from checkpoint {seq} on {} failed; its record is unchanged ({} on {})",
                    self.cfg.node,
                    rec.state.as_str(),
                    rec.node
                ));
                tracing::warn!(job = %job, "{e}");
                Err(e)
            }
        }
    }

    fn mark_lost(&self, job: &JobId, down: Option<&NodeName>) -> AgentResult<JobRecord> {
        let _v = self
            .verdict_lock
            .lock()
            .map_err(|_| AgentError::Internal("verdict lock poisoned".into()))?;
        let mut rec = self.registry.get(job)?;
        let down = down
            .map(|d| d.to_string())
            .unwrap_or_else(|| rec.node.to_string());
        rec.state = JobState::Failed;
        rec.pid = 0;
        rec.pending = None;
        rec.error = format!(
            "{} node {down} was declared down and job {job} had no checkpoint to restart from",
            checkpoint::LOST_PREFIX
        );
        self.registry.put(&mut rec)?;
        tracing::warn!(job = %job, "{}", rec.error);
        if let Some(n) = &rec.net {
            // Nothing will ever restore it: its address goes back to the
            // pool (a job with a checkpoint keeps its claim until restarted).
            self.release_address(job, n);
        }
        Ok(rec)
    }

    /// Checkpoint, every interval its record asks for, each job that runs
    /// here. The interval is in the record, so it follows the job across
    /// migrations and restarts.
    pub fn spawn_checkpoint_ticker(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_try: std::collections::HashMap<JobId, u64> = Default::default();
            // Jobs whose record has no interval: it is set at launch and never
            // changes, so their records are not read again every second (a
            // read of the shared path, which over a network file system can
            // stall this task's thread).
            let mut never: std::collections::HashSet<JobId> = Default::default();
            loop {
                tokio::time::sleep(TICK).await;
                let Some(agent) = me.upgrade() else { return };
                // Fenced: its jobs are being killed and nothing may be
                // published; a checkpoint would only hold the job busy
                // while the rejoin wants to restart it.
                if agent.coord().is_some_and(|c| !c.holder.may_write()) {
                    continue;
                }
                let ids: Vec<JobId> = agent
                    .local
                    .lock()
                    .map(|l| l.keys().cloned().collect())
                    .unwrap_or_default();
                last_try.retain(|k, _| ids.contains(k));
                never.retain(|k| ids.contains(k));
                let now = now_unix_ms();
                for id in ids {
                    if never.contains(&id) {
                        continue;
                    }
                    let Ok(rec) = agent.registry.get(&id) else {
                        continue;
                    };
                    let Some(st) = rec.checkpoint.as_ref().filter(|s| s.every_ms > 0) else {
                        never.insert(id);
                        continue;
                    };
                    if rec.state != JobState::Running || rec.node != agent.cfg.node {
                        continue;
                    }
                    let since = st
                        .last_unix_ms
                        .max(rec.created_unix_ms)
                        .max(last_try.get(&id).copied().unwrap_or(0));
                    if now.saturating_sub(since) < st.every_ms {
                        continue;
                    }
                    last_try.insert(id.clone(), now);
                    let a = agent.clone();
                    tokio::spawn(async move {
                        match a.checkpoint_job(&id).await {
                            Ok(_) => {}
                            // Busy with a migration: the next tick tries again.
                            Err(AgentError::FailedPrecondition(m)) => {
                                tracing::debug!(job = %id, "periodic checkpoint skipped: {m}")
                            }
                            Err(_) => {} // logged and recorded by checkpoint_job
                        }
                    });
                }
            }
        });
    }
}
