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

/// Run the calling thread (and any process it starts from now on) at the
/// lowest CPU priority, nice 19. For work nothing waits for — deleting a
/// migration's images, warming up the next CRIU worker — which would
/// otherwise compete on small machines with the migration that is still
/// in flight. Best effort: on failure the thread keeps its priority.
pub fn background_priority() {
    // SAFETY: plain syscalls on this thread's own id. Linux applies nice
    // per thread for PRIO_PROCESS with a thread id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Move process `pid` to nice 19 (see [`background_priority`]), e.g. a
/// CRIU worker that has answered and only has its own teardown left.
pub fn lower_priority_of(pid: i32) {
    if pid > 0 {
        // SAFETY: a plain syscall; a stale pid fails harmlessly (ESRCH).
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, 19);
        }
    }
}
