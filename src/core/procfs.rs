//! Reading `/proc/<pid>/status`, which several parts consult for one field
//! each (a tracer, a parent, a namespace pid, a memory size), and
//! `/proc/<pid>/stat`'s fields (a nice value), and the two pidfd calls
//! (a handle on a process that its pid's reuse cannot redirect, and a copy
//! of one of its descriptors) that libc and nix do not wrap.

/// The value of `key` (without its colon, e.g. `"PPid"`) in
/// `/proc/<pid>/status`, trimmed; None if the process or the field is gone.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().to_string())
    })
}

/// [`status_field`] parsed as a number (the first word, so `"1234 kB"` is 1234).
pub fn status_number<T: std::str::FromStr>(pid: i32, key: &str) -> Option<T> {
    status_field(pid, key)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The fields of a `/proc/<pid>/stat` file after the command name (which may
/// hold spaces and parentheses): index 0 is the state (field 3 of proc(5)).
pub fn stat_fields(path: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The nice value of process or thread `tid` (field 19 of its `stat`;
/// getpriority(2) would need errno juggling, -1 being a valid answer).
pub fn nice(tid: i32) -> Option<i32> {
    stat_fields(&format!("/proc/{tid}/stat"))?
        .get(16)?
        .parse()
        .ok()
}

/// When process `pid` started, in clock ticks since boot (field 22 of its
/// `stat`): with the pid, it names one process for good, whatever reuses
/// the pid later.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(&format!("/proc/{pid}/stat"))?
        .get(19)?
        .parse()
        .ok()
}

/// The id of process or thread `tid` in its innermost PID namespace (the
/// last field of `NSpid`).
pub fn ns_pid(tid: i32) -> Option<i32> {
    status_field(tid, "NSpid")?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The process tracing `pid` (CRIU while it holds a dumped or restoring
/// tree), never this process itself, so a caller that kills it cannot
/// kill itself.
pub fn tracer(pid: i32) -> Option<i32> {
    status_number(pid, "TracerPid").filter(|t: &i32| *t > 0 && *t != std::process::id() as i32)
}

/// A pidfd for `pid` (pidfd_open(2)): it keeps naming this process even if
/// its number is reused, and polls readable once the process has exited.
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open has no memory-safety preconditions.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us, owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw as i32) })
}

/// A copy, in this process, of descriptor `fd` of the process behind
/// `pidfd` (pidfd_getfd(2); needs ptrace rights over it, that is root).
pub fn pidfd_getfd(
    pidfd: std::os::fd::BorrowedFd<'_>,
    fd: i32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: pidfd_getfd has no memory-safety preconditions.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us, owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw as i32) })
}

/// Every process of the tree rooted at `root` (host pids, `root` first),
/// following each thread's `children`. A process that ends meanwhile is
/// skipped; one forked meanwhile may be missed.
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        out.push(pid);
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(kids) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
                todo.extend(
                    kids.split_whitespace()
                        .filter_map(|k| k.parse::<i32>().ok()),
                );
            }
        }
    }
    out
}

/// The thread ids of process `pid`.
pub fn threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|t| t.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Resident memory of the whole tree rooted at `root`, in bytes (VmRSS of
/// each process; shared pages count once per process, which only matters
/// as an upper bound).
pub fn tree_rss_bytes(root: i32) -> u64 {
    tree_pids(root)
        .into_iter()
        .filter_map(|p| status_number::<u64>(p, "VmRSS"))
        .sum::<u64>()
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_tree_holds_us_and_our_child() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let tree = tree_pids(me);
        assert_eq!(tree.first(), Some(&me));
        assert!(tree.contains(&(child.id() as i32)), "{tree:?}");
        assert!(threads(me).contains(&me));
        assert!(tree_rss_bytes(me) > 0);
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree_pids(-5).is_empty());
    }

    #[test]
    fn reads_our_own_fields() {
        let me = std::process::id() as i32;
        assert_eq!(status_number::<i32>(me, "Pid"), Some(me));
        assert!(status_number::<u64>(me, "VmRSS").is_some_and(|kib| kib > 0));
        assert_eq!(status_field(me, "NoSuchField"), None);
        // A prefix of a real key is not that key.
        assert_eq!(status_field(me, "Vm"), None);
    }

    #[test]
    fn stat_fields_start_after_the_command_name() {
        let me = std::process::id();
        let f = stat_fields(&format!("/proc/{me}/stat")).expect("own stat");
        // Field 3 (state) is R or S for a running test; field 4 is the parent.
        assert!(["R", "S"].contains(&f[0].as_str()), "{f:?}");
        assert_eq!(
            f[1].parse::<u32>().ok(),
            Some(std::os::unix::process::parent_id())
        );
        assert!(stat_fields("/proc/0/stat").is_none());
    }

    #[test]
    fn nice_and_namespace_pid_of_ourselves() {
        let me = std::process::id() as i32;
        // SAFETY: getpriority has no memory arguments; errno is reset first.
        let want = unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, 0)
        };
        assert_eq!(nice(crate::core::current_tid()), Some(want));
        let innermost = status_field(me, "NSpid")
            .and_then(|v| v.split_whitespace().last()?.parse::<i32>().ok());
        assert!(ns_pid(me).is_some());
        assert_eq!(ns_pid(me), innermost);
        assert_eq!(nice(0), None);
        assert_eq!(ns_pid(0), None);
    }
}
