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

/// How long a source copy may take to die after its SIGKILL before the move
/// reports anyway. A killed tree exits in milliseconds; on a loaded node
/// with a CPU cap it can take a scheduling period or two.
pub(crate) const COPY_EXIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// End the source's copy of a job that now runs on its target: SIGKILL the
/// init of its PID namespace (which ends every process in it) and wait,
/// up to `within`, until it has exited. Why wait: a move that reports "ok"
/// while the old tree is still dying lets anyone who looks at once (a
/// user's `ps`, a test, a scheduler counting processes) see the job twice.
/// The old tree was stopped before the target ran the job and never runs
/// user code again, so the wait is about what others see, and it comes
/// after the freeze: it adds nothing to the job's pause.
///
/// `start` (the process's start time, when the caller knows it) keeps a
/// reused pid from being killed. Returns whether the copy is gone.
pub(crate) async fn end_source_copy(
    pid: i32,
    start: Option<u64>,
    within: std::time::Duration,
) -> bool {
    if pid <= 0 {
        return true;
    }
    // The pidfd first: it names this process even if the pid is reused
    // once it has been reaped.
    let Ok(fd) = crate::core::procfs::pidfd_open(pid) else {
        return true; // already gone
    };
    if let Some(s) = start {
        if crate::core::procfs::start_time(pid) != Some(s) {
            return true; // the pid is another process's now
        }
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    let waited = tokio::task::spawn_blocking(move || wait_exit(&fd, Some(within)))
        .await
        .unwrap_or(false);
    if !waited {
        tracing::warn!(
            pid,
            "the source's copy of a moved job did not exit within {within:?} of its SIGKILL"
        );
    }
    waited
}

/// Block until the process behind `pidfd` has exited (a pidfd is readable
/// from then on; for a PID namespace's init, once every process in it has),
/// or until `within` has passed (`None`: no limit). A signal does not end
/// the wait early. Returns whether it exited.
fn wait_exit(pidfd: &std::os::fd::OwnedFd, within: Option<std::time::Duration>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let end = within.map(|w| std::time::Instant::now() + w);
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    loop {
        let timeout = match end {
            None => PollTimeout::NONE,
            Some(end) => {
                let left = end.saturating_duration_since(std::time::Instant::now());
                PollTimeout::from(u16::try_from(left.as_millis()).unwrap_or(u16::MAX))
            }
        };
        match poll(&mut fds, timeout) {
            Ok(n) if n > 0 => return true,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
            // Timed out: done if the deadline has passed (a wait longer
            // than poll's u16 milliseconds goes round again).
            Ok(_) => {
                if end.is_some_and(|e| std::time::Instant::now() >= e) {
                    return false;
                }
            }
        }
    }
}

/// Watch a process that is not our child: poll a pidfd until it exits.
pub(crate) fn watch_adopted(agent: Arc<Agent>, id: JobId, pid: i32) {
    let job = id.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("adopt-{pid}"))
        .spawn(move || {
            if let Ok(fd) = crate::core::procfs::pidfd_open(pid) {
                wait_exit(&fd, None);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stopped_sleep() -> std::process::Child {
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        child
    }

    #[tokio::test]
    async fn a_stopped_copy_is_gone_when_end_source_copy_returns() {
        let mut child = stopped_sleep();
        let pid = child.id() as i32;
        let start = crate::core::procfs::start_time(pid);
        assert!(end_source_copy(pid, start, Duration::from_secs(5)).await);
        // Exited (a zombie until reaped): no descriptors, and waitpid has
        // its status at once.
        assert!(std::fs::read_link(format!("/proc/{pid}/fd/1")).is_err());
        let st = child.try_wait().unwrap().expect("exited");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn another_process_behind_a_reused_pid_is_left_alone() {
        let mut child = stopped_sleep();
        let pid = child.id() as i32;
        let start = crate::core::procfs::start_time(pid).unwrap();
        assert!(end_source_copy(pid, Some(start + 1), Duration::from_secs(1)).await);
        assert!(child.try_wait().unwrap().is_none(), "not killed");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
