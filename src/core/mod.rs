//! Core model of mosix: identifiers, job records, errors. Free of transport
//! types so the agent, the balancer and the CLIs share one vocabulary.

pub mod cluster_file;
pub mod ids;
pub mod job;
pub mod procfs;
pub mod registry;

pub use ids::{JobId, MigrationId, NodeName};
pub use job::{JobRecord, JobState, MigrationRecord};

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

/// Set the nice value of process `pid` (its main thread). Best effort: a
/// stale pid fails harmlessly (ESRCH), and without the privilege to raise
/// a priority the process keeps the one it has.
pub fn set_nice(pid: i32, nice: i32) {
    if pid > 0 {
        // SAFETY: a plain syscall with no memory arguments.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice);
        }
    }
}
