//! Recovery after an agent restart (a crash, `kill -9`, a reboot of the agent).
//!
//! The registry says what every job should be doing; the node's processes say
//! what is. On start the agent reconciles the two for every job that involves
//! it, before it serves any request:
//!
//! - **Running here**: re-adopt the process (it is no longer our child, so it
//!   is watched through a pidfd) or, if it is gone, record that it ended.
//! - **Migrating, and the process runs here** (found by its stdout file, in
//!   this node's network namespace): the migration's last step happened; the
//!   job is recorded here and stale images are removed.
//! - **Migrating to here, images claimed by us, process not here**: we died
//!   during the restore; restore again (the claim is ours).
//! - **Migrating from here, unclaimed images**: the dump finished (or we seal
//!   it now if CRIU logged success) → roll back by restoring here. If the dump
//!   never finished and the process is gone, the job is marked failed and its
//!   images and CRIU log are kept for a person.
//!
//! A CRIU left running by the dead agent is waited for first, so recovery
//! never races a dump or restore that is still finishing.
//!
//! Without a shared path (`agent::direct`), a migration whose images were
//! sealed is settled by asking the target, never rolled back blindly, and an
//! unrestored copy pushed to this node is dropped.

use super::migration::{image_rel, Arrival, CLAIM_FILE};
use super::{reaper, Agent, LocalJob};
use crate::core::job::PendingMigration;
use crate::core::procfs::status_number;
use crate::core::{now_unix_ms, JobRecord, JobState, MigrationRecord};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn link(p: String) -> Option<std::path::PathBuf> {
    std::fs::read_link(p).ok()
}

/// The host pid of the job's init on this node: a PID-namespace init in our
/// network namespace whose stdout is the job's output file.
pub(crate) fn find_job_process(rec: &JobRecord) -> Option<i32> {
    let our_net = link("/proc/self/ns/net".into())?;
    let want = Path::new(&rec.stdout_path);
    let rd = std::fs::read_dir("/proc").ok()?;
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            link(format!("/proc/{pid}/fd/1")).as_deref() == Some(want)
                && link(format!("/proc/{pid}/ns/net")).as_ref() == Some(&our_net)
                && reaper::is_pidns_init(pid)
        })
}

/// Wait (bounded) until no CRIU left by a dead agent runs in our network
/// namespace. Our own children are not waited for: they are this agent's
/// idle spare CRIU worker (see `criu::swrk`), which waits for us.
fn wait_for_criu(limit: Duration) {
    let Some(our_net) = link("/proc/self/ns/net".into()) else {
        return;
    };
    let me = std::process::id() as i32;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let busy = std::fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .any(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .map(|c| c.trim() == "criu")
                            .unwrap_or(false)
                            && link(format!("/proc/{pid}/ns/net")).as_ref() == Some(&our_net)
                            && status_number::<i32>(pid, "PPid") != Some(me)
                    })
            })
            .unwrap_or(false);
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether CRIU finished the dump in `dir`. Its statistics file is written
/// only on success; the log says so too, but only at level 3 and above (the
/// agent logs at 2 by default, see `criu::real::DEFAULT_LOG_LEVEL`).
fn dump_succeeded(dir: &Path) -> bool {
    dir.join(crate::criu::DUMP_STATS).is_file()
        || std::fs::read_to_string(dir.join(crate::criu::DUMP_LOG))
            .map(|l| l.contains("Dumping finished successfully"))
            .unwrap_or(false)
}

impl Agent {
    /// Reconcile the registry with this node's processes (see module doc).
    pub async fn recover(self: &Arc<Self>) {
        let me = self.cfg.node.clone();
        self.drop_incoming();
        let Ok((all, _)) = self.registry.list() else {
            return;
        };
        let involved: Vec<JobRecord> = all
            .into_iter()
            .filter(|r| {
                r.node == me
                    || r.pending
                        .as_ref()
                        .is_some_and(|p| p.from == me || p.to.as_ref() == Some(&me))
            })
            .collect();
        if involved.iter().any(|r| r.state == JobState::Migrating) {
            let _ = tokio::task::spawn_blocking(|| wait_for_criu(Duration::from_secs(120))).await;
        }
        for rec in involved {
            match (&rec.state, rec.pending.clone()) {
                (JobState::Running, _) if rec.node == me => self.recover_running(rec),
                (JobState::Migrating, Some(p)) => self.recover_migration(rec, p).await,
                _ => {}
            }
        }
    }

    pub(crate) fn adopt_orphan(self: &Arc<Self>, rec: &JobRecord, pid: i32) {
        if let Ok(mut l) = self.local.lock() {
            l.insert(
                rec.id.clone(),
                LocalJob {
                    pid,
                    dumping: false,
                    exited_during_dump: None,
                },
            );
        }
        reaper::watch_adopted(self.clone(), rec.id.clone(), pid);
    }

    fn recover_running(self: &Arc<Self>, mut rec: JobRecord) {
        let pid = if rec.pid > 0 && reaper::is_pidns_init(rec.pid) {
            Some(rec.pid)
        } else {
            find_job_process(&rec)
        };
        match pid {
            Some(pid) => {
                if pid != rec.pid {
                    rec.pid = pid;
                    let _ = self.registry.put(&mut rec);
                }
                self.adopt_orphan(&rec, pid);
                if self.session_was_here(&rec) {
                    // A foreground job whose session (and so its caller's
                    // stream) died with our predecessor: no orphan.
                    tracing::warn!(job = %rec.id, pid, "foreground job lost its session with the previous agent: killing it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return;
                }
                tracing::info!(job = %rec.id, pid, "re-adopted job after restart");
            }
            None => self.record_exit(&rec.id, rec.pid, None),
        }
    }

    /// Whether `rec` is a foreground job whose session this node's agent held.
    fn session_was_here(&self, rec: &JobRecord) -> bool {
        std::path::Path::new(&rec.stdout_path)
            .parent()
            .and_then(|d| std::fs::read_to_string(d.join(super::exec::SESSION_MARKER)).ok())
            .is_some_and(|n| n.trim() == self.cfg.node.as_str())
    }

    async fn recover_migration(self: &Arc<Self>, mut rec: JobRecord, p: PendingMigration) {
        let me = self.cfg.node.clone();
        let rel = image_rel(&rec.id, &p.id);
        let dir = self.image_dir(&rel);
        if self.recover_streamed(&rec, &p) {
            return;
        }
        if let Some(pid) = find_job_process(&rec) {
            // The job runs here: whatever step was last, it completed.
            tracing::info!(job = %rec.id, pid, "migration {} found complete on restart", p.id);
            // Restored here, or resumed by CRIU after a failed dump: either
            // way its threads may still carry the dump's raised priority.
            self.after_dump(pid, &p.nice_before_dump);
            if p.to.as_ref() == Some(&me) {
                rec.history.push(MigrationRecord {
                    id: p.id.clone(),
                    from: p.from.clone(),
                    to: me.clone(),
                    started_unix_ms: p.started_unix_ms,
                    frozen_ms: 0,
                    total_ms: now_unix_ms().saturating_sub(p.started_unix_ms),
                    ok: true,
                    error: "completed by recovery after an agent restart".into(),
                    image_bytes: 0,
                    post_copy: p.post_copy,
                    pre_copy_rounds: 0,
                    pre_copy_bytes: 0,
                    fallback: String::new(),
                    restored_from_checkpoint: 0,
                });
            }
            rec.node = me;
            rec.state = JobState::Running;
            rec.pid = pid;
            rec.pending = None;
            rec.arrived_unix_ms = now_unix_ms();
            if self.registry.put(&mut rec).is_ok() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            self.adopt_orphan(&rec, pid);
            return;
        }
        // Without a shared path the other node holds a copy of its own.
        if self.recover_direct(&rec, &p) {
            return;
        }
        let claim = std::fs::read_to_string(dir.join(CLAIM_FILE)).ok();
        let claimed_by = claim
            .as_deref()
            .and_then(|c| c.split_whitespace().next())
            .map(str::to_string);
        if p.to.as_ref() == Some(&me) && claimed_by.as_deref() == Some(me.as_str()) {
            // We died while restoring: finish the job's move here.
            let _ = std::fs::remove_file(dir.join(CLAIM_FILE));
            let arrival = Arrival::Migrated {
                from: p.from.clone(),
                frozen_before_ms: 0,
                image_bytes: 0,
                post_copy: false,
            };
            match self.restore_here(&rec.id, &p.id, None, arrival).await {
                Ok(_) => tracing::info!(job = %rec.id, "restore finished by recovery"),
                Err(e) => {
                    tracing::warn!(job = %rec.id, "recovery restore failed, left for the source: {e}")
                }
            }
            return;
        }
        if p.from != me || claimed_by.is_some() {
            // Another node holds the images; it recovers them.
            return;
        }
        let sealed = dir.join("MANIFEST.json").exists();
        if !sealed && dump_succeeded(&dir) {
            if let Err(e) = self.seal(&dir, &rec.id, &p.id, Default::default()).await {
                tracing::warn!(job = %rec.id, "cannot seal images on recovery: {e}");
            }
        }
        if sealed || dump_succeeded(&dir) {
            let arrival = Arrival::RolledBack {
                to: p.to.clone().unwrap_or_else(|| me.clone()),
                error: "source agent restarted during the migration".into(),
                frozen_before_ms: 0,
            };
            match self.restore_here(&rec.id, &p.id, None, arrival).await {
                Ok(_) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    tracing::info!(job = %rec.id, "rolled back on restart");
                    return;
                }
                Err(e) => tracing::error!(job = %rec.id, "rollback on restart failed: {e}"),
            }
        }
        if let Ok(mut r) = self.registry.get(&rec.id) {
            r.state = JobState::Failed;
            r.pid = 0;
            r.error = format!(
                "the agent on {me} restarted during migration {} and the job could not be brought back; images and CRIU logs are kept in {}",
                p.id,
                dir.display()
            );
            let _ = self.registry.put(&mut r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_counts_as_finished_by_its_statistics_or_its_log() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join(crate::criu::DUMP_LOG);
        assert!(!dump_succeeded(d.path()), "nothing written yet");
        // Level 2: errors only, and an interrupted dump writes no statistics.
        std::fs::write(&log, "(00.1) Error (criu/cr-dump.c:1): Dumping FAILED.\n").unwrap();
        assert!(!dump_succeeded(d.path()));
        std::fs::write(d.path().join(crate::criu::DUMP_STATS), b"\x08\x01").unwrap();
        assert!(
            dump_succeeded(d.path()),
            "statistics are written only on success"
        );
        std::fs::remove_file(d.path().join(crate::criu::DUMP_STATS)).unwrap();
        std::fs::write(&log, "(00.2) Dumping finished successfully\n").unwrap();
        assert!(dump_succeeded(d.path()), "a level-3 log says so too");
    }
}
