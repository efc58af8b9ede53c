//! The agent's side of the fence watchdog (see [`crate::coord::watchdog`]
//! for the process and its file): with etcd, the agent keeps the fence file
//! current and keeps one `mosix-watchdog` running beside it.
//!
//! - **Start** (right after the lease is granted, before recovery): the
//!   file gets the new deadline at once, listing the job inits the previous
//!   agent's file listed that still run (this agent has not re-adopted
//!   them yet, and they must stay guarded meanwhile); then the previous
//!   agent's watchdog, found by its pid file, is replaced by a new one.
//!   A quick restart therefore never fences: the new deadline is written
//!   before the old one passes. Once recovery is done, the file lists only
//!   this agent's own jobs.
//! - **Running**: every [`POLL`](crate::coord::watchdog::POLL), and at
//!   once when a job is adopted, the file is rewritten if the deadline (it
//!   moves at each good renewal) or the set of jobs changed. A watchdog
//!   that dies is started again.
//! - **Clean exit** (SIGTERM): with no job left, the file is removed (the
//!   watchdog exits on that) and the watchdog is stopped. With jobs left,
//!   they run on unattended (a restarted agent re-adopts them) while the
//!   lease, which is not given back, runs out: the watchdog stays armed and
//!   kills them at the deadline unless a new agent renews first, exactly as
//!   after a crash. Otherwise the balancer would restart them elsewhere
//!   while they still run here.
//!
//! The watchdog process is started in a process group of its own (signals
//! sent to the agent's group do not reach it), without a parent-death
//! signal (it must outlive the agent), and inherits the agent's network
//! namespace and cgroup, so `mosctl local down` finds and kills it; it is
//! in no job's process tree, so no dump or freeze of a job touches it.

use super::Agent;
use crate::coord::watchdog::{self, FenceFile, Victim, WatchdogError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The fence file of `node` in cluster `cluster` on this machine.
pub fn default_fence_file(cluster: &str, node: &str) -> PathBuf {
    Path::new("/run/mosix")
        .join(cluster)
        .join(format!("{node}.fence"))
}

/// `mosix-watchdog`, next to the running binary (like `mosix-init`).
pub fn default_binary() -> Option<PathBuf> {
    let p = std::env::current_exe()
        .ok()?
        .parent()?
        .join("mosix-watchdog");
    p.is_file().then_some(p)
}

pub struct FenceWatch {
    node: String,
    file: PathBuf,
    pid_file: PathBuf,
    binary: PathBuf,
    /// Job inits the previous agent's file listed, guarded until recovery
    /// has re-adopted what it will (then None).
    inherited: Mutex<Option<Vec<Victim>>>,
    /// What was written last: (deadline, sorted pids) and the start times.
    last: Mutex<Option<(u64, Vec<i32>)>>,
    starttimes: Mutex<std::collections::HashMap<i32, u64>>,
    stopping: AtomicBool,
}

impl FenceWatch {
    /// Prepare to guard `file`; reads what a previous agent left there.
    pub fn new(node: &str, file: PathBuf, binary: PathBuf) -> Result<Self, WatchdogError> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|err| WatchdogError::Io {
                what: "creating the fence file's directory",
                path: dir.to_path_buf(),
                err,
            })?;
        }
        let inherited = match watchdog::read(&file) {
            Ok(Some(f)) => f
                .kill
                .into_iter()
                .filter(|v| watchdog::proc_starttime(v.pid) == Some(v.starttime))
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!("ignoring the previous agent's fence file: {e}");
                Vec::new()
            }
        };
        if !inherited.is_empty() {
            tracing::info!(
                jobs = inherited.len(),
                "the previous agent's jobs stay guarded by the fence watchdog until re-adopted"
            );
        }
        Ok(Self {
            node: node.to_string(),
            pid_file: watchdog::pid_file(&file),
            file,
            binary,
            inherited: Mutex::new(Some(inherited)),
            last: Mutex::new(None),
            starttimes: Mutex::new(Default::default()),
            stopping: AtomicBool::new(false),
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Write the file if the deadline or the jobs changed.
    pub fn publish(&self, deadline: Duration, mut pids: Vec<i32>) -> Result<(), WatchdogError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        pids.sort_unstable();
        pids.dedup();
        let key = (watchdog::as_ns(deadline), pids);
        let Ok(mut last) = self.last.lock() else {
            return Ok(());
        };
        if last.as_ref() == Some(&key) {
            return Ok(());
        }
        let mut kill: Vec<Victim> = {
            let Ok(mut st) = self.starttimes.lock() else {
                return Ok(());
            };
            st.retain(|p, _| key.1.contains(p));
            key.1
                .iter()
                .filter_map(|&pid| {
                    let t = match st.get(&pid) {
                        Some(t) => *t,
                        None => {
                            let t = watchdog::proc_starttime(pid)?;
                            st.insert(pid, t);
                            t
                        }
                    };
                    Some(Victim { pid, starttime: t })
                })
                .collect()
        };
        if let Ok(Some(inh)) = self.inherited.lock().as_deref() {
            kill.extend(inh.iter().copied());
        }
        kill.sort_unstable();
        kill.dedup();
        let f = FenceFile {
            node: self.node.clone(),
            deadline_ns: key.0,
            kill,
        };
        watchdog::write_atomic(&self.file, &f.render())?;
        *last = Some(key);
        Ok(())
    }

    /// Recovery is done: only this agent's own jobs are listed from now on.
    pub fn adopted_all(&self) {
        if let Ok(mut i) = self.inherited.lock() {
            *i = None;
        }
        // Force a rewrite at the next publish.
        if let Ok(mut l) = self.last.lock() {
            *l = None;
        }
    }

    /// Replace any watchdog a previous agent left, start ours, and start it
    /// again should it die. The file must exist first (the watchdog exits
    /// when there is none).
    pub fn start(self: &Arc<Self>) -> Result<(), WatchdogError> {
        if let Some(old) = watchdog::stop_recorded(&self.pid_file) {
            tracing::info!(pid = old, "replaced the previous agent's fence watchdog");
        }
        let child = self.spawn()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("fence-watchdog".into())
            .spawn(move || me.supervise(child))
            .map_err(|err| WatchdogError::Spawn {
                path: self.binary.clone(),
                err,
            })?;
        Ok(())
    }

    fn spawn(&self) -> Result<std::process::Child, WatchdogError> {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(&self.binary)
            .arg("--file")
            .arg(&self.file)
            .stdin(std::process::Stdio::null())
            // Its own process group: a signal to the agent's group (a
            // terminal's ^Z, `kill -STOP -PGID`) must not stop it too.
            .process_group(0)
            .spawn()
            .map_err(|err| WatchdogError::Spawn {
                path: self.binary.clone(),
                err,
            })?;
        let pid = child.id() as i32;
        watchdog::record_pid(&self.pid_file, pid)?;
        tracing::info!(pid, file = %self.file.display(), "fence watchdog started");
        Ok(child)
    }

    /// Reap the watchdog (it is our child) and start it again if it died
    /// while we still need it.
    fn supervise(&self, mut child: std::process::Child) {
        loop {
            let status = child.wait();
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::error!(
                ?status,
                "the fence watchdog ended unexpectedly: starting it again"
            );
            child = loop {
                std::thread::sleep(Duration::from_millis(200));
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                match self.spawn() {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::error!("{e}; trying again in a second");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
        }
    }

    /// The agent exits cleanly (see the module doc).
    pub fn stop(&self, jobs_left: usize) {
        if jobs_left > 0 {
            tracing::warn!(
                jobs = jobs_left,
                file = %self.file.display(),
                "leaving the fence watchdog armed: it kills the jobs still here at the lease deadline unless a new agent renews first"
            );
            return;
        }
        self.stopping.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.file);
        let _ = watchdog::stop_recorded(&self.pid_file);
        let _ = std::fs::remove_file(&self.pid_file);
        tracing::info!("no job left: fence watchdog stopped, fence file removed");
    }
}

impl Agent {
    /// Bring the fence file up to date now (no-op without etcd).
    pub(crate) fn publish_fence(&self) {
        let Some(c) = self.coord() else {
            return;
        };
        let Some(w) = c.fence.as_ref() else {
            return;
        };
        let pids: Vec<i32> = self
            .local
            .lock()
            .map(|l| l.values().map(|j| j.pid).collect())
            .unwrap_or_default();
        if let Err(e) = w.publish(c.holder.fence_deadline(), pids) {
            tracing::error!("cannot update the fence file: {e}");
        }
    }

    /// Recovery is done: stop guarding the previous agent's job list.
    pub fn fence_adopted_all(&self) {
        if let Some(w) = self.coord().and_then(|c| c.fence.as_ref()) {
            w.adopted_all();
            self.publish_fence();
        }
    }

    /// The agent exits cleanly: stop the watchdog, unless jobs remain.
    pub fn stop_fence_watchdog(&self) {
        if let Some(w) = self.coord().and_then(|c| c.fence.as_ref()) {
            let n = self.local.lock().map(|l| l.len()).unwrap_or(0);
            w.stop(n);
        }
    }
}
