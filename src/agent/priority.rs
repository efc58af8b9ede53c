//! Dump priority: the job being dumped gets the CRIU worker's priority.
//!
//! While CRIU dumps a job, much of the work runs *inside the job*: CRIU's
//! parasite code executes in the job's own threads, at the job's own nice
//! value. A node is left because it is crowded, so at nice 0 those threads
//! get 1/(n+1) of a node with n busy jobs, and on a CPU-capped node the
//! parasite's round trips wait out CFS throttling periods: a job of a few
//! hundred KiB was measured frozen 0.35–1.0 s leaving a 0.5-core node with 8
//! CPU-bound jobs, 0.25–0.34 s with its threads raised to the worker's nice.
//!
//! So just before the final dump the agent raises every thread of the job
//! tree to [`crate::criu::swrk::WORKER_NICE`] (never lowers one) and keeps
//! what it changed as `(namespace tid, nice)` pairs in the job's pending
//! migration. CRIU records each thread's nice in its images, so the restored
//! job would keep the raised value: after a restore, wherever it happens
//! (the target, a rollback on the source, a thaw), the saved values are put
//! back by namespace tid, which CRIU restores unchanged inside the job's own
//! PID namespace. If the dump fails, CRIU resumes the job in place and the
//! agent puts the saved values back the same way.
//!
//! A thread that appears or ends in between is simply not touched: the job is
//! about to be frozen, and a nice value is a hint, not job state.

use crate::core::procfs;

/// Raise every thread of the tree rooted at `root` (a host pid) whose nice
/// value is above `to` to `to`. Returns `(namespace tid, original nice)` of
/// each thread raised, for the job's record: what [`put_back`] restores.
pub fn raise(root: i32, to: i32) -> Vec<(i32, i32)> {
    let mut saved = Vec::new();
    for (host_tid, ns_tid) in threads_of_tree(root) {
        let Some(nice) = procfs::nice(host_tid) else {
            continue;
        };
        if nice > to && crate::core::set_nice_checked(host_tid, to) {
            saved.push((ns_tid, nice));
        }
    }
    saved
}

/// After a restore, or when a failed dump left the job running here: give
/// the threads of the tree rooted at `root` the nice values `saved` holds
/// for their namespace tids. Returns how many were set.
pub fn put_back(root: i32, saved: &[(i32, i32)]) -> usize {
    if saved.is_empty() {
        return 0;
    }
    let mut n = 0;
    for (host_tid, ns_tid) in threads_of_tree(root) {
        if let Some(&(_, nice)) = saved.iter().find(|(t, _)| *t == ns_tid) {
            if crate::core::set_nice_checked(host_tid, nice) {
                n += 1;
            }
        }
    }
    n
}

/// `(host tid, namespace tid)` of every thread of every process in the tree.
fn threads_of_tree(root: i32) -> Vec<(i32, i32)> {
    procfs::tree_pids(root)
        .into_iter()
        .flat_map(procfs::threads)
        .filter_map(|tid| Some((tid, procfs::ns_pid(tid)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_threads_are_found_with_their_namespace_ids() {
        let me = std::process::id() as i32;
        let threads = threads_of_tree(me);
        assert!(threads.iter().any(|&(host, _)| host == me));
        // Without a PID namespace of our own, the namespace tid is the host tid.
        let in_host_ns =
            procfs::status_field(me, "NSpid").is_some_and(|v| v.split_whitespace().count() == 1);
        if in_host_ns {
            assert!(threads.iter().all(|&(h, n)| h == n), "{threads:?}");
        }
    }

    #[test]
    fn raise_and_put_back_change_only_threads_above_the_target() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP raise_and_put_back: raising a priority needs root (CAP_SYS_NICE)");
            return;
        }
        let ours = procfs::nice(crate::core::current_tid());
        // A child process of our own, so that nothing of the test runner is
        // reniced: it sleeps at nice 5.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        crate::core::set_nice(pid, 5);
        assert_eq!(procfs::nice(pid), Some(5));

        // Raising to 10 would lower it: untouched.
        assert!(raise(pid, 10).is_empty());
        assert_eq!(procfs::nice(pid), Some(5));

        // Raising to 2 (root may always go up in priority).
        let saved = raise(pid, 2);
        assert_eq!(procfs::nice(pid), Some(2));
        assert_eq!(saved, vec![(pid, 5)]);

        // put_back matches by namespace tid; an unknown tid sets nothing.
        assert_eq!(put_back(pid, &[(pid + 100_000, 7)]), 0);
        assert_eq!(procfs::nice(pid), Some(2));
        assert_eq!(put_back(pid, &saved), 1);
        assert_eq!(procfs::nice(pid), Some(5));
        let _ = child.kill();
        let _ = child.wait();
        // Nothing of the test process itself was touched.
        assert_eq!(procfs::nice(crate::core::current_tid()), ours);
    }
}
