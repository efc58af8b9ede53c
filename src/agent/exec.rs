//! Foreground jobs, executing side: start a job here and stream it.
//!
//! A session (`Agent::exec`) is what the `Exec` RPC serves, and what a home
//! agent runs in-process when it places a job on its own node. It:
//! 1. takes one of this node's slots (refused with `NoSlot` when all are
//!    held; the home then places the job elsewhere or waits);
//! 2. launches the job like any other (own PID namespace, `mosix-init`),
//!    with a pipe as stdin, the caller's umask, uid and gid;
//! 3. streams the job's stdout and stderr. They stay files on the shared
//!    path (so the job can still migrate), and the session tails them by
//!    offset every [`TAIL_TICK`]; whoever runs the job after a migration
//!    appends to the same files, so nothing is lost or repeated;
//! 4. ends with the exit status as soon as the reaper sees the process end
//!    (an event, not a poll), after reading the files to their end. If the
//!    job migrated away, its end is read from the registry instead;
//! 5. kills the job when the caller goes away: the input stream ends, or
//!    is silent for [`CALLER_SILENCE`] (a cut network). No orphan is left.
//!
//! The messages ([`ExecIn`], [`ExecOut`]) are plain types; the gRPC layer
//! converts them (`api::convert_exec`).

use super::reaper::ExitStatus;
use super::{Agent, AgentError, LaunchExtras, LaunchFailure, LaunchRequest};
use crate::core::{JobId, JobState, NodeName};
use std::io::Read;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// How often a running job's output files are read: every 10 ms after
/// the job wrote something, backing off to every 100 ms while it is
/// silent (a compiler says nothing for seconds; sixteen sessions polling
/// at 10 ms would cost a capped node's agent CPU for nothing). The job's
/// end is an event, so it is never delayed by this.
pub const TAIL_TICK: Duration = Duration::from_millis(10);
const TAIL_MAX: Duration = Duration::from_millis(100);
/// How often each side of a session says it is still there.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A caller silent this long is gone (its node or the network is lost).
pub const CALLER_SILENCE: Duration = Duration::from_secs(5);
/// How often the end of a job that migrated away is looked up.
const REGISTRY_POLL: Duration = Duration::from_millis(200);
/// In a foreground job's output directory: the node whose agent holds its
/// session (see `Agent::recover`).
pub const SESSION_MARKER: &str = "foreground-session";
/// Largest chunk of output in one message.
const CHUNK: usize = 256 << 10;

/// What starts a session.
#[derive(Debug, Clone, Default)]
pub struct ExecStart {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub umask: Option<u32>,
    pub pinned: bool,
    pub non_migratable: bool,
    pub name: String,
    /// Hold one of this node's slots while the job runs.
    pub take_slot: bool,
    /// The service this job is an instance of (`mosrun --service`).
    pub service: Option<crate::core::ServiceDecl>,
    /// The job's nice value (`mosrun` carries its caller's, as a local
    /// fork would); never below the node's default for jobs.
    pub nice: Option<i32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExecIn {
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
    Heartbeat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub job: String,
    pub node: String,
    pub pid: i32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The job failed rather than exited (e.g. lost in a migration).
    pub error: String,
}

impl ExitInfo {
    /// The status a shell would give: the code, or 128+N for signal N.
    pub fn shell_status(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 125,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    CommandNotFound,
    NotExecutable,
    BadCwd,
    NoSlot,
    UnknownNode,
    NoNode,
    NodeLost,
    Invalid,
    Internal,
    /// The node is blocked (`mosctl block`): no new job there.
    NodeBlocked,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExecOut {
    Started(Started),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitInfo),
    Heartbeat,
    Failure(Failure),
}

/// This node's slots, as `GetSlots` reports them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSlots {
    pub node: String,
    pub capacity: f64,
    pub slots: u32,
    pub used: u32,
    pub background_load: f64,
    pub mem_available_bytes: u64,
    /// `mosctl block`: placement must not pick this node.
    pub blocked: bool,
    pub speed: f64,
}

/// Slots held by foreground jobs on this node.
#[derive(Debug, Default)]
pub struct SlotCounter {
    used: AtomicU32,
    /// f64 bits of the slots-per-core factor; 0 = the default.
    per_core: AtomicU64,
    /// Jobs holding a slot (their demand is not "background").
    jobs: Mutex<std::collections::BTreeSet<JobId>>,
}

/// One held slot; given back on drop (also on panic).
pub struct SlotGuard<'a> {
    counter: &'a SlotCounter,
    job: Option<JobId>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.counter.used.fetch_sub(1, Ordering::AcqRel);
        if let (Some(j), Ok(mut js)) = (self.job.take(), self.counter.jobs.lock()) {
            js.remove(&j);
        }
    }
}

impl SlotCounter {
    pub fn per_core(&self) -> f64 {
        match self.per_core.load(Ordering::Relaxed) {
            0 => crate::placement::DEFAULT_SLOTS_PER_CORE,
            b => f64::from_bits(b),
        }
    }

    pub fn set_per_core(&self, f: f64) {
        if f.is_finite() && f > 0.0 {
            self.per_core.store(f.to_bits(), Ordering::Relaxed);
        }
    }

    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Acquire)
    }

    /// Take a slot if one of `slots` is free.
    fn take(&self, slots: u32) -> Option<SlotGuard<'_>> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < slots).then_some(u + 1)
            })
            .ok()
            .map(|_| SlotGuard {
                counter: self,
                job: None,
            })
    }
}

impl SlotGuard<'_> {
    fn hold_for(&mut self, job: &JobId) {
        if let Ok(mut js) = self.counter.jobs.lock() {
            js.insert(job.clone());
        }
        self.job = Some(job.clone());
    }
}

fn failure_of(e: LaunchFailure, cwd: &str, node: &NodeName) -> Failure {
    use super::launcher::LaunchError as L;
    match e {
        LaunchFailure::Launch(L::NotFound(c)) => Failure::new(
            FailureKind::CommandNotFound,
            format!("{c}: command not found"),
        ),
        LaunchFailure::Launch(L::NotExecutable(c)) => Failure::new(
            FailureKind::NotExecutable,
            format!("{c}: Permission denied"),
        ),
        LaunchFailure::Launch(L::Exec(c, io)) if io.raw_os_error() == Some(libc::ENOENT) => {
            Failure::new(
                FailureKind::CommandNotFound,
                format!("{c}: command not found"),
            )
        }
        LaunchFailure::Launch(L::Exec(c, io)) if io.raw_os_error() == Some(libc::EACCES) => {
            Failure::new(FailureKind::NotExecutable, format!("{c}: {io}"))
        }
        LaunchFailure::Launch(L::Cwd(_, io)) => Failure::new(
            FailureKind::BadCwd,
            format!("the working directory {cwd} cannot be used on {node}: {io} (is it on a path every node sees?)"),
        ),
        LaunchFailure::Agent(AgentError::InvalidArgument(m)) => {
            Failure::new(FailureKind::Invalid, m)
        }
        other => Failure::new(
            FailureKind::Internal,
            other.into_agent_error().to_string(),
        ),
    }
}

/// Reads a growing file from an offset.
struct Tail {
    file: Option<std::fs::File>,
    path: String,
    /// One read buffer for the session's life. A fresh 256 KiB one per
    /// read was an mmap and a munmap (with a TLB shootdown on every other
    /// CPU) per stream per tick: `perf` found it among the agents' top
    /// costs during a `mosmake` build, where each node runs many sessions.
    buf: Vec<u8>,
}

/// Bytes per read of a job's output (below glibc's mmap threshold).
const READ_BUF: usize = 64 << 10;

impl Tail {
    fn new(path: &str) -> Self {
        Self {
            file: std::fs::File::open(path).ok(),
            path: path.to_string(),
            buf: vec![0u8; READ_BUF.min(CHUNK)],
        }
    }

    /// Everything written since the last read, in chunks.
    fn read_new(&mut self) -> Vec<Vec<u8>> {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let mut out = Vec::new();
        let Some(f) = self.file.as_mut() else {
            return out;
        };
        loop {
            match f.read(&mut self.buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.push(self.buf[..n].to_vec()),
            }
        }
        out
    }
}

impl Agent {
    /// Slots per core of capacity (`mosixd --slots-per-core`).
    pub fn set_slots_per_core(&self, f: f64) {
        self.slots.set_per_core(f);
    }

    /// This node's slots and their use.
    pub fn node_slots(&self) -> NodeSlots {
        let load = self.node_load();
        let held = self
            .slots
            .jobs
            .lock()
            .map(|j| j.clone())
            .unwrap_or_default();
        let background_load: f64 = load
            .jobs
            .iter()
            .filter(|u| !JobId::parse(&u.job_id).is_ok_and(|j| held.contains(&j)))
            .map(|u| u.demand)
            .sum();
        NodeSlots {
            node: self.cfg.node.to_string(),
            capacity: load.capacity,
            slots: crate::placement::slots_for(load.capacity, self.slots.per_core()),
            used: self.slots.used(),
            background_load,
            mem_available_bytes: load.mem_available_bytes,
            blocked: load.blocked,
            speed: load.speed,
        }
    }

    /// Send `sig` to a job wherever it runs now (a foreground job may have
    /// migrated). Best effort: a job that already ended needs nothing.
    async fn signal_job(self: &Arc<Self>, job: &JobId, sig: i32) {
        if let Some(pid) = self.local_pid(job) {
            if let Ok(s) = nix::sys::signal::Signal::try_from(sig) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s);
            }
            return;
        }
        if let Ok(rec) = self.registry.get(job) {
            if rec.state == JobState::Running && rec.node != self.cfg.node {
                if let Err(e) = self.peers.signal_there(&rec.node, job, sig).await {
                    tracing::warn!(job = %job, node = %rec.node, "cannot signal the job: {e}");
                }
            }
        }
    }

    /// Start a foreground session; see the module doc. Ends when the job
    /// does, or when `input` closes (the job is then killed).
    pub fn exec(
        self: &Arc<Self>,
        start: ExecStart,
        input: mpsc::Receiver<ExecIn>,
    ) -> mpsc::Receiver<ExecOut> {
        let (tx, rx) = mpsc::channel(64);
        let agent = self.clone();
        tokio::spawn(async move { agent.session(start, input, tx).await });
        rx
    }

    async fn session(
        self: Arc<Self>,
        start: ExecStart,
        mut input: mpsc::Receiver<ExecIn>,
        out: mpsc::Sender<ExecOut>,
    ) {
        if let Err(e) = self.check_not_blocked() {
            let _ = out
                .send(ExecOut::Failure(Failure::new(
                    FailureKind::NodeBlocked,
                    e.to_string(),
                )))
                .await;
            return;
        }
        let mut slot = None;
        if start.take_slot {
            let slots = crate::placement::slots_for(self.load.capacity(), self.slots.per_core());
            match self.slots.take(slots) {
                Some(g) => slot = Some(g),
                None => {
                    let _ = out
                        .send(ExecOut::Failure(Failure::new(
                            FailureKind::NoSlot,
                            format!("all {slots} slots of {} are taken", self.cfg.node),
                        )))
                        .await;
                    return;
                }
            }
        }
        let (rd, wr) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                let _ = out
                    .send(ExecOut::Failure(Failure::new(
                        FailureKind::Internal,
                        format!("stdin pipe: {e}"),
                    )))
                    .await;
                return;
            }
        };
        let (watch_tx, mut exit_rx) = tokio::sync::oneshot::channel();
        let cwd = start.cwd.clone();
        let req = LaunchRequest {
            argv: start.argv,
            env: start.env,
            cwd: start.cwd,
            uid: start.uid,
            gid: start.gid,
            pinned: start.pinned,
            // Without a shared path the job's output after a move would be
            // written on the target's own disk, out of this session's
            // sight (and its end recorded there): such a job stays here.
            non_migratable: start.non_migratable || !self.cfg.shared,
            name: start.name,
            service: start.service,
            // A foreground job streams through its mosrun's pipes, which
            // no checkpoint can bring back.
            checkpoint: None,
            // A foreground job stays where it started: no address to move.
            own_net: Some(false),
        };
        let extras = LaunchExtras {
            stdin: Some(std::os::fd::AsRawFd::as_raw_fd(&rd)),
            umask: start.umask,
            nice: start.nice,
            watch: Some(watch_tx),
        };
        let launched = self.launch_with(req, extras);
        drop(rd);
        let rec = match launched {
            Ok(r) => r,
            Err(e) => {
                let _ = out
                    .send(ExecOut::Failure(failure_of(e, &cwd, &self.cfg.node)))
                    .await;
                return;
            }
        };
        let job = rec.id.clone();
        if let Some(g) = slot.as_mut() {
            g.hold_for(&job);
        }
        // Which agent holds the job's session: if that agent restarts, the
        // session (and the caller's stream) is gone, and its recovery must
        // kill the job rather than adopt an orphan.
        if let Some(dir) = std::path::Path::new(&rec.stdout_path).parent() {
            if let Err(e) = std::fs::write(dir.join(SESSION_MARKER), self.cfg.node.as_str()) {
                tracing::warn!(job = %job, "cannot mark the job foreground: {e}");
            }
        }
        let _ = out
            .send(ExecOut::Started(Started {
                job: job.to_string(),
                node: self.cfg.node.to_string(),
                pid: rec.pid,
            }))
            .await;

        // stdin: a task of its own, so a job that does not read its stdin
        // never blocks the session (a full pipe); dropping the sender is EOF.
        let mut stdin_tx = match tokio::net::unix::pipe::Sender::from_owned_fd(wr) {
            Ok(mut w) => {
                let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                tokio::spawn(async move {
                    while let Some(b) = rx.recv().await {
                        if w.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                });
                Some(tx)
            }
            Err(e) => {
                tracing::warn!(job = %job, "no stdin for the job: {e}");
                None
            }
        };

        let mut so = Tail::new(&rec.stdout_path);
        let mut se = Tail::new(&rec.stderr_path);
        let mut wait = TAIL_TICK;
        let mut last_in = Instant::now();
        let mut last_out = Instant::now();
        let mut last_registry = Instant::now();
        let end: Option<ExitInfo> = loop {
            tokio::select! {
                st = &mut exit_rx => {
                    break Some(match st {
                        Ok(Some(ExitStatus::Code(c))) => ExitInfo { code: Some(c), ..Default::default() },
                        Ok(Some(ExitStatus::Signal(s))) => ExitInfo { signal: Some(s), ..Default::default() },
                        _ => ExitInfo { error: "exit status unknown".into(), ..Default::default() },
                    });
                }
                m = input.recv() => match m {
                    None => break None,
                    Some(ExecIn::Stdin(b)) => {
                        last_in = Instant::now();
                        if let Some(t) = &stdin_tx {
                            let _ = t.send(b);
                        }
                    }
                    Some(ExecIn::StdinEof) => {
                        last_in = Instant::now();
                        stdin_tx = None;
                    }
                    Some(ExecIn::Signal(s)) => {
                        last_in = Instant::now();
                        self.signal_job(&job, s).await;
                    }
                    Some(ExecIn::Heartbeat) => last_in = Instant::now(),
                },
                _ = tokio::time::sleep(wait) => {
                    match forward(&out, &mut so, &mut se).await {
                        None => break None,
                        Some(0) => wait = (wait * 2).min(TAIL_MAX),
                        Some(_) => wait = TAIL_TICK,
                    }
                    if last_in.elapsed() > CALLER_SILENCE {
                        tracing::warn!(job = %job, "the caller has been silent for {CALLER_SILENCE:?}: killing the job");
                        break None;
                    }
                    if last_out.elapsed() >= HEARTBEAT {
                        last_out = Instant::now();
                        if out.send(ExecOut::Heartbeat).await.is_err() {
                            break None;
                        }
                    }
                    if last_registry.elapsed() >= REGISTRY_POLL && self.local_pid(&job).is_none() {
                        last_registry = Instant::now();
                        if let Some(info) = self.ended_elsewhere(&job) {
                            break Some(info);
                        }
                    }
                }
            }
        };
        drop(stdin_tx);
        if let Ok(mut m) = self.exit_watch.lock() {
            m.remove(&job);
        }
        match end {
            Some(info) => {
                forward(&out, &mut so, &mut se).await;
                let delivered = out.send(ExecOut::Exit(info)).await.is_ok();
                if delivered {
                    self.forget_finished(&job);
                }
            }
            None => {
                // The caller is gone: no orphan.
                tracing::info!(job = %job, "foreground caller gone: killing the job");
                self.signal_job(&job, libc::SIGKILL).await;
            }
        }
        drop(slot);
    }

    /// Remove a foreground job's record and output once its caller has
    /// its output and status: a parallel build starts thousands of jobs,
    /// and the registry (which the balancer and `mosctl jobs` read whole)
    /// and the shared path would keep all of them. A job whose end was not
    /// delivered (killed, failed) is kept for inspection.
    fn forget_finished(self: &Arc<Self>, job: &JobId) {
        let agent = self.clone();
        let job = job.clone();
        tokio::task::spawn_blocking(move || {
            match agent.registry.get(&job) {
                Ok(rec) if rec.state == JobState::Exited => {}
                _ => return,
            }
            if let Err(e) = agent.registry.remove(&job) {
                tracing::warn!(job = %job, "cannot remove the finished job's record: {e}");
                return;
            }
            let _ = std::fs::remove_dir_all(agent.cfg.jobs_dir.join(job.as_str()));
        });
    }

    /// The end of a job whose process is not here (it migrated away), from
    /// its record.
    fn ended_elsewhere(&self, job: &JobId) -> Option<ExitInfo> {
        let rec = self.registry.get(job).ok()?;
        match rec.state {
            JobState::Exited => Some(ExitInfo {
                code: rec.exit_code,
                signal: rec.exit_signal,
                error: String::new(),
            }),
            JobState::Failed => Some(ExitInfo {
                error: if rec.error.is_empty() {
                    "the job failed".into()
                } else {
                    rec.error
                },
                ..Default::default()
            }),
            _ => None,
        }
    }
}

/// Send what the job wrote since last time: how many bytes, or None if
/// the caller is gone.
async fn forward(out: &mpsc::Sender<ExecOut>, so: &mut Tail, se: &mut Tail) -> Option<usize> {
    let mut n = 0;
    for b in so.read_new() {
        n += b.len();
        out.send(ExecOut::Stdout(b)).await.ok()?;
    }
    for b in se.read_new() {
        n += b.len();
        out.send(ExecOut::Stderr(b)).await.ok()?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_given_back() {
        let c = SlotCounter::default();
        let a = c.take(2).expect("first");
        let b = c.take(2).expect("second");
        assert!(c.take(2).is_none(), "third of two");
        drop(a);
        assert_eq!(c.used(), 1);
        assert!(c.take(2).is_some());
        drop(b);
        assert_eq!(c.per_core(), crate::placement::DEFAULT_SLOTS_PER_CORE);
        c.set_per_core(10.0);
        c.set_per_core(f64::NAN);
        assert_eq!(c.per_core(), 10.0);
    }

    #[test]
    fn shell_status() {
        let e = |code, signal| ExitInfo {
            code,
            signal,
            error: String::new(),
        };
        assert_eq!(e(Some(3), None).shell_status(), 3);
        assert_eq!(e(None, Some(9)).shell_status(), 137);
        assert_eq!(e(None, None).shell_status(), 125);
    }
}
