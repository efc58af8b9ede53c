//! Core model of mosix: identifiers, job records, errors. Free of transport
//! types so the agent, the balancer and the CLIs share one vocabulary.

pub mod cgroup;
pub mod cluster_file;
pub mod ids;
pub mod job;
pub mod jobnet;
pub mod procfs;
pub mod registry;

pub use ids::{JobId, MigrationId, NodeName};
pub use job::{CheckpointStatus, JobRecord, JobState, MigrationRecord, ServiceDecl};
pub use jobnet::JobNet;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Scheduling class of one thread (`tid`, 0 = the calling thread): `idle`
/// puts it in `SCHED_IDLE`, where it runs only on a CPU nothing else wants;
/// otherwise back to normal time sharing. Best effort, like [`set_nice`].
/// Only for threads that no other thread waits on while they are idle:
/// raise it back first (priority inversion otherwise).
pub fn set_thread_idle(tid: i32, idle: bool) {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration.
    unsafe {
        libc::sched_setscheduler(tid, policy, &param);
    }
}

/// The calling thread's kernel thread id.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The nice value of everything that moves jobs: the agent's threads, its
/// CRIU workers at work, the job being dumped (`agent::priority`). A node
/// is left because it is crowded; at the jobs' own priority the agent and
/// CRIU would get 1/(n+1) of a node with n busy jobs, and on a CPU-capped
/// node they would wait out CFS throttling periods while the job is frozen.
pub const MIGRATION_NICE: i32 = -10;

/// The nice value jobs are started at: the agent's own, from before
/// [`raise_own_priority`].
static JOB_NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The nice value a new job starts at (see [`raise_own_priority`]).
pub fn job_nice() -> i32 {
    JOB_NICE.load(std::sync::atomic::Ordering::Relaxed)
}

/// For `mosixd`, before it starts any thread (threads inherit their
/// creator's nice value): remember the nice value it was started with for
/// its jobs, and raise its own to `to` if that is higher. Without the
/// privilege to raise it, nothing changes.
pub fn raise_own_priority(to: i32) {
    let Some(base) = procfs::nice(current_tid()) else {
        return;
    };
    JOB_NICE.store(base, std::sync::atomic::Ordering::Relaxed);
    if base > to {
        set_nice_checked(current_tid(), to);
    }
}

/// Set the nice value of process `pid` (its main thread). Best effort: a
/// stale pid fails harmlessly (ESRCH), and without the privilege to raise
/// a priority the process keeps the one it has.
pub fn set_nice(pid: i32, nice: i32) {
    set_nice_checked(pid, nice);
}

/// [`set_nice`] for one thread (`pid` may be any tid), telling whether it took.
pub fn set_nice_checked(pid: i32, nice: i32) -> bool {
    // SAFETY: a plain syscall with no memory arguments.
    pid > 0 && unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) } == 0
}
