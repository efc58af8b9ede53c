//! Reaping: every job the agent runs, launched or restored, is its child, and
//! one thread per job blocks in `waitpid` on it. When the process ends, its
//! exit status goes into the registry — unless the end was a dump, which the
//! migration code accounts for itself.

use super::Agent;
use crate::core::{JobId, JobState};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

pub(crate) fn watch_child(agent: Arc<Agent>, id: JobId, pid: i32) {
    let job = id.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let status = loop {
                match waitpid(Pid::from_raw(pid), None) {
                    Ok(WaitStatus::Exited(_, code)) => break Some(ExitStatus::Code(code)),
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        break Some(ExitStatus::Signal(sig as i32))
                    }
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    // Not our child (e.g. already reaped): nothing to report.
                    Err(_) => break None,
                }
            };
            agent.on_exit(&job, pid, status);
        });
    if let Err(e) = spawned {
        tracing::error!(job = %id, pid, "cannot start reaper thread: {e}");
    }
}

impl Agent {
    pub(crate) fn on_exit(&self, id: &JobId, pid: i32, status: Option<ExitStatus>) {
        {
            let Ok(mut local) = self.local.lock() else {
                return;
            };
            match local.get_mut(id) {
                Some(j) if j.pid == pid => {
                    if j.dumping {
                        // Either CRIU killed it after a dump (expected), or it
                        // ended on its own during the dump; keep the status
                        // for the migration code to decide.
                        j.exited_during_dump = status;
                        return;
                    }
                    local.remove(id);
                }
                // A stale process (already handed over): not the job any more.
                _ => return,
            }
        }
        // SIGKILLed while this node is fenced: the fence watchdog killed it
        // while the agent was stopped (the reaper can see the end before the
        // agent's own fence runs). Its loss is recorded at rejoin, like any
        // fenced job's, not as an ordinary exit (no write is allowed now).
        if !(status == Some(ExitStatus::Signal(libc::SIGKILL)) && self.note_fenced_exit(id)) {
            self.record_exit(id, pid, status);
        }
        // A foreground job's session waits for this (after the record, so
        // whoever hears of the end finds it recorded).
        let watcher = self.exit_watch.lock().ok().and_then(|mut m| m.remove(id));
        if let Some(w) = watcher {
            let _ = w.send(status);
        }
    }

    pub(crate) fn record_exit(&self, id: &JobId, pid: i32, status: Option<ExitStatus>) {
        let _verdict = self.verdict_lock.lock();
        let Ok(mut rec) = self.registry.get(id) else {
            return;
        };
        // A job already marked failed (e.g. post-copy pages lost) keeps
        // that verdict; its forced end is not an ordinary exit.
        if rec.node != self.cfg.node || rec.pid != pid || rec.state == JobState::Failed {
            return;
        }
        rec.state = JobState::Exited;
        rec.pid = 0;
        match status {
            Some(ExitStatus::Code(c)) => rec.exit_code = Some(c),
            Some(ExitStatus::Signal(s)) => rec.exit_signal = Some(s),
            None => rec.error = "exit status unknown (process was not our child)".into(),
        }
        if let Err(e) = self.registry.put(&mut rec) {
            tracing::error!(job = %id, "cannot record exit: {e}");
        }
        self.events.ended(&rec, &self.cfg.node);
        tracing::info!(job = %id, pid, ?status, "job ended");
        self.release_owner(id);
        if let Some(n) = &rec.net {
            // Its address goes back to the pool, its veth with its namespace.
            self.release_address(id, n);
            super::jobnet::left_here(id, false);
        }
        if rec.exit_code == Some(0) && self.cfg.shared {
            // A job that finished its work needs no restart: its
            // checkpoints go (other ends keep them for a person).
            let dir = crate::checkpoint::Store::new(&self.cfg.shared_root).job_dir(id);
            if dir.exists() {
                let _ = std::thread::Builder::new()
                    .name("rm-checkpoints".into())
                    .spawn(move || std::fs::remove_dir_all(dir));
            }
        }
    }
}

/// Whether `pid` is the init of a PID namespace other than ours, i.e. looks
/// like a mosix job (guards against a recycled pid after an agent restart).
pub(crate) fn is_pidns_init(pid: i32) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid"));
    let ours = std::fs::read_link("/proc/self/ns/pid");
    let nspid_is_1 = crate::core::procfs::ns_pid(pid) == Some(1);
    matches!((theirs, ours), (Ok(a), Ok(b)) if a != b) && nspid_is_1
}

/// Watch a process that is not our child: poll a pidfd until it exits.
pub(crate) fn watch_adopted(agent: Arc<Agent>, id: JobId, pid: i32) {
    let job = id.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("adopt-{pid}"))
        .spawn(move || {
            if let Ok(fd) = crate::core::procfs::pidfd_open(pid) {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                use std::os::fd::AsFd;
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                // Readable once the process has exited; only a signal
                // interrupts the wait early.
                while let Err(nix::errno::Errno::EINTR) = poll(&mut fds, PollTimeout::NONE) {}
            } else {
                while nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
            agent.on_exit(&job, pid, None);
        });
    if let Err(e) = spawned {
        tracing::error!(job = %id, pid, "cannot start watcher thread: {e}");
    }
}
