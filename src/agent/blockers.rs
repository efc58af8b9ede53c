//! What a post-copy (lazy) restore cannot rebuild while the source still
//! holds it, found in /proc before anything is frozen.
//!
//! During a post-copy move the source's copy of the job stays frozen, with
//! its open files, until every page has gone out; the target restores at the
//! same time. CRIU 4.2.1 then fails or hangs on:
//! - a named FIFO with unread data: the restore writes the saved data into
//!   the same FIFO, which the frozen source still holds full ("Error
//!   splicing data: Resource temporarily unavailable"; with little data it
//!   succeeds and the FIFO holds the data twice);
//! - a file lock (POSIX, OFD or flock): the restored task waits in
//!   `fcntl_setlk` for the lock the frozen source holds, which is released
//!   only when the transfer ends: a deadlock;
//! - a lease: the restored task waits in `__break_lease` the same way.
//!
//! A full copy has none of these problems: the source is gone before the
//! target restores.
//!
//! Formats read: `/proc/<pid>/fdinfo/<fd>` lists one `lock:` line per lock
//! held through that file, as in /proc/locks:
//! `lock:\t1: POSIX  ADVISORY  WRITE 15207 fe:00:5373985 0 EOF`
//! (a waiter's line has `->` before the kind). A FIFO's unread bytes come
//! from FIONREAD on a non-blocking read-only open of `/proc/<pid>/fd/<fd>`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    FifoWithData {
        path: String,
        bytes: u64,
    },
    /// `kind` as /proc/locks names it: POSIX, OFDLCK, FLOCK.
    Lock {
        kind: String,
        path: String,
    },
    Lease {
        path: String,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::FifoWithData { path, bytes } => {
                write!(f, "a FIFO with {bytes} unread bytes ({path})")
            }
            Blocker::Lock { kind, path } => write!(f, "a {kind} lock on {path}"),
            Blocker::Lease { path } => write!(f, "a lease on {path}"),
        }
    }
}

/// "holds a FIFO with 65536 unread bytes (/x), a POSIX lock on /y".
pub fn describe(blockers: &[Blocker]) -> String {
    let items: Vec<String> = blockers.iter().map(|b| b.to_string()).collect();
    format!(
        "the job holds {}, which a post-copy restore cannot take over while the source still holds it",
        items.join(", ")
    )
}

/// The lock kinds in an fdinfo file's `lock:` lines (held, not waited for).
pub fn parse_fdinfo_locks(fdinfo: &str) -> Vec<String> {
    fdinfo
        .lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let _ordinal = words.next()?;
            let kind = words.next()?;
            (kind != "->").then(|| kind.to_string())
        })
        .collect()
}

/// Everything in the tree rooted at `root` (a host pid) that a lazy
/// restore cannot handle; empty if nothing (or the tree is gone).
pub fn lazy_restore_blockers(root: i32) -> Vec<Blocker> {
    let mut out: Vec<Blocker> = Vec::new();
    for pid in crate::core::procfs::tree_pids(root) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let name = fd.file_name();
            let Some(n) = name.to_str() else { continue };
            let path = std::fs::read_link(fd.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}"));
            for kind in parse_fdinfo_locks(info.as_deref().unwrap_or("")) {
                let b = if kind == "LEASE" || kind == "DELEG" {
                    Blocker::Lease { path: path.clone() }
                } else {
                    Blocker::Lock {
                        kind,
                        path: path.clone(),
                    }
                };
                if !out.contains(&b) {
                    out.push(b);
                }
            }
            // Anonymous pipes ("pipe:[N]") are rebuilt fresh; only a FIFO
            // reopened by its path is shared with the frozen source.
            if path.starts_with('/') {
                let seen = out
                    .iter()
                    .any(|o| matches!(o, Blocker::FifoWithData { path: p, .. } if *p == path));
                if !seen {
                    if let Some(bytes) = fifo_unread(&fd.path()).filter(|b| *b > 0) {
                        out.push(Blocker::FifoWithData { path, bytes });
                    }
                }
            }
        }
    }
    out
}

/// Unread bytes in the FIFO behind `fd_link` (a /proc/<pid>/fd/<n> link),
/// or None if it is not a FIFO. The non-blocking read-only open never
/// waits for a writer and consumes nothing.
fn fifo_unread(fd_link: &std::path::Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = std::fs::metadata(fd_link).ok()?;
    if !meta.file_type().is_fifo() {
        return None;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fd_link)
        .ok()?;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `n`, which outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) };
    (r == 0).then_some(n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lock_lines_are_read_and_waiters_skipped() {
        let info = "pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t5373985\n\
                    lock:\t1: POSIX  ADVISORY  WRITE 15207 fe:00:5373985 0 EOF\n\
                    lock:\t2: -> POSIX  ADVISORY  WRITE 15314 fe:00:5373985 0 EOF\n\
                    lock:\t3: LEASE  ACTIVE    WRITE 15207 fe:00:5373985 0 EOF\n";
        assert_eq!(parse_fdinfo_locks(info), vec!["POSIX", "LEASE"]);
        assert!(parse_fdinfo_locks("pos:\t0\nflags:\t0\n").is_empty());
        assert!(parse_fdinfo_locks("lock:\n").is_empty());
    }

    #[test]
    fn the_reason_names_each_blocker() {
        let d = describe(&[
            Blocker::FifoWithData {
                path: "/s/f".into(),
                bytes: 10,
            },
            Blocker::Lock {
                kind: "POSIX".into(),
                path: "/s/l".into(),
            },
            Blocker::Lease {
                path: "/s/e".into(),
            },
        ]);
        assert!(d.contains("a FIFO with 10 unread bytes (/s/f)"), "{d}");
        assert!(d.contains("a POSIX lock on /s/l"), "{d}");
        assert!(d.contains("a lease on /s/e"), "{d}");
    }

    /// The real /proc: a FIFO with data and a POSIX lock held by a child
    /// process are found; a plain process has none.
    #[test]
    fn a_real_fifo_with_data_and_a_real_lock_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("f");
        let lock = dir.path().join("l");
        let script = format!(
            "import os,fcntl,time\nos.mkfifo('{f}')\nr=os.open('{f}',os.O_RDONLY|os.O_NONBLOCK)\nw=os.open('{f}',os.O_WRONLY)\nos.write(w,b'x'*100)\nfd=os.open('{l}',os.O_RDWR|os.O_CREAT)\nfcntl.lockf(fd,fcntl.LOCK_EX)\nprint('ready',flush=True)\ntime.sleep(30)\n",
            f = fifo.display(),
            l = lock.display()
        );
        let Ok(mut child) = std::process::Command::new("python3")
            .arg("-c")
            .arg(&script)
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("SKIPPED a_real_fifo_with_data_and_a_real_lock_are_found: no python3");
            return;
        };
        let mut line = String::new();
        {
            use std::io::BufRead;
            let out = child.stdout.take().expect("stdout");
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let found = lazy_restore_blockers(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(line.trim(), "ready");
        assert!(
            found.contains(&Blocker::FifoWithData {
                path: fifo.display().to_string(),
                bytes: 100
            }),
            "{found:?}"
        );
        assert!(
            found.contains(&Blocker::Lock {
                kind: "POSIX".into(),
                path: lock.display().to_string()
            }),
            "{found:?}"
        );
        assert!(lazy_restore_blockers(std::process::id() as i32)
            .iter()
            .all(|b| !matches!(b, Blocker::FifoWithData { .. })));
    }
}
