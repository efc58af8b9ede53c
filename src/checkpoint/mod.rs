//! Periodic checkpoints of running jobs, and restarting jobs from them.
//!
//! Migration moves a job off a node that is alive. When a node dies, its
//! jobs die with it; a checkpoint taken beforehand lets them carry on
//! elsewhere, losing at most the work since that checkpoint.
//!
//! # Layout on the shared path
//!
//! ```text
//! <shared>/checkpoints/<job>/
//!     <seq>/                     one complete checkpoint (seq = 1, 2, 3, …; never reused)
//!         *.img                  CRIU's images (a full dump, taken with --leave-running)
//!         output-<i>.data        the job's output files as they were at the dump
//!         CHECKPOINT.json        [`store::Meta`]: job, node, time, frozen ms, mode, the
//!                                output files (path, size, owner, mode, copy's name)
//!         MANIFEST.json          BLAKE3 digest of every file above, HMAC under the
//!                                cluster key (`security::manifest`, as for migrations)
//!         dump.log               CRIU's log (not sealed)
//!     .tmp-<seq>-<id>/           a checkpoint being written; never read
//!     RESTORE.lock               a restore of the job is under way (O_EXCL)
//! ```
//!
//! **Atomic "latest".** A checkpoint is written into a `.tmp-*` directory,
//! sealed, and only then renamed to its number. The latest checkpoint is
//! the highest-numbered directory, so a checkpoint cut short (a full disk,
//! a CRIU failure, the node dying) is never seen: the previous one stays
//! the latest. Old ones are removed only after the new one is in place,
//! keeping the last K (`mosrun --checkpoint-keep`, default 3). A job that
//! exits with code 0 has its checkpoints removed; any other end keeps them
//! for a person.
//!
//! **Sealed.** The same manifest as migration images: a restore verifies
//! the HMAC, the file set and every digest (memory pages while CRIU
//! restores, before the job resumes), so a tampered or corrupt checkpoint
//! is refused (`DATA_LOSS`) and never runs. The output copies and the
//! metadata are sealed too.
//!
//! # Output files
//!
//! CRIU records the size of every regular file a job has open and refuses
//! to restore one whose size changed (criu#1258): a job's stdout and the
//! files it appends to always grow after a checkpoint. Two ways out: cut
//! the file back to the size at the dump, or keep a copy of its content
//! and put it back. We copy ([`outputs`]): cutting back is only right for
//! a file the job appends to; a job that rewrote, truncated or replaced a
//! file since the checkpoint would restore against content the checkpoint
//! never saw. The copy is taken at CRIU's `post-dump` step, while the job
//! is still frozen (CRIU resumes it after), so it matches the images
//! exactly; the price is copying the job's output on every checkpoint,
//! while it is frozen, which is small for the logs and counters jobs
//! usually write (a job with GiBs of output open should not be
//! checkpointed this way). On restore the copies are written back over
//! the files (whatever the dead node wrote after the checkpoint is work
//! the job redoes), then CRIU restores.
//!
//! # Incremental checkpoints
//!
//! Where the kernel tracks dirty memory (soft-dirty, `criu check --feature
//! mem_dirty_track`), CRIU can write only the pages dirtied since the last
//! checkpoint. Not implemented yet: every checkpoint is full, and the mode
//! recorded with each (`CheckpointStatus::mode`, `mosctl show`) says why:
//! on a kernel without tracking (this project's test machines) that is the
//! kernel; elsewhere, that incremental chains are not implemented (they
//! would need the manifest's chain layout and a retention that keeps the
//! chain's base).
//!
//! # Restart
//!
//! `mosctl restore JOB` restores one job from a checkpoint on a node; it
//! is refused while the job is recorded running anywhere, unless the
//! operator asserts that node is down (`--node-is-down`, like Kubernetes'
//! out-of-service taint). `balancer::restart` (`restart_node_jobs`) does it for every
//! job of a node that is down: each one with a checkpoint is restored on
//! the node the placement policy picks; each one without is recorded
//! lost (`FAILED`, error `lost: …`). Fencing (making sure a node that was
//! only cut off never runs a second copy, nor writes a checkpoint that
//! becomes the latest) is not done here: it needs the coordination of
//! issue 16's leases; until then the operator's assertion is the fence.

pub mod duration;
pub mod outputs;
pub mod store;

pub use store::{CheckpointError, Meta, OutputFile, Store};

/// How many checkpoints are kept when `mosrun --checkpoint-keep` is not given.
pub const DEFAULT_KEEP: u32 = 3;
/// The shortest interval accepted: a dump freezes the job, and CRIU's own
/// start-up costs tens of milliseconds.
pub const MIN_EVERY_MS: u64 = 1000;
/// Prefix of the error of a job recorded lost.
pub const LOST_PREFIX: &str = "lost:";

/// The mode of a full checkpoint on an engine with or without dirty-memory
/// tracking, as recorded and shown.
pub fn full_mode(dirty_tracking: bool) -> String {
    if dirty_tracking {
        "full (incremental checkpoints are not implemented yet)".into()
    } else {
        "full (incremental needs soft-dirty memory tracking, which this kernel lacks: \
         criu check --feature mem_dirty_track fails)"
            .into()
    }
}
