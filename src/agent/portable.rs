//! Files that exist only on the job's node, found in /proc before anything
//! is frozen.
//!
//! CRIU reopens a job's files by path on the target node. A file under the
//! shared path, the jobs dir or a directory every node has (the system
//! directories, `--common-dir`) is there; a file under a directory that is
//! private to every machine — `/tmp`, `/var/tmp`, `/run`, `/dev/shm`,
//! `/root` — is not, and the restore would fail after the job was frozen and
//! dumped (the rollback then brings it back, but only after a pointless
//! freeze, and with CRIU's cryptic "Can't open file" as the only
//! explanation). So a migration first looks at every process of the job:
//! its open fds, its working directory, its executable and its mapped
//! files, and refuses with the paths when one of them is node-private. The
//! job keeps running where it is.
//!
//! What is deliberately not a blocker:
//! - pipes, sockets, anonymous inodes (`pipe:[N]`, `socket:[N]`,
//!   `anon_inode:…`): they have no path; CRIU rebuilds or refuses them itself;
//! - deleted files (`… (deleted)`) and memfds: CRIU carries their content in
//!   the images (ghost files), whatever directory they were in;
//! - devices and everything outside the private directories (`/dev/null`,
//!   `/usr/lib/…`, the project's binaries): the same on every node of a
//!   cluster by assumption, as the executables of the jobs must be.
//!
//! The list of private directories is the same on a real cluster and on the
//! local one, whose nodes get exactly these as their own (`local::nodefs`;
//! `/dev/shm` stays the host's there, so the check is stricter than the
//! simulation needs).

use std::fmt;
use std::path::{Path, PathBuf};

/// Directories no two machines share.
pub const NODE_PRIVATE_DIRS: &[&str] = &["/tmp", "/var/tmp", "/run", "/dev/shm", "/root"];

/// How a process of the job uses a node-private file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    Fd(i32),
    Cwd,
    Exe,
    Mapped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateFile {
    pub path: String,
    pub pid: i32,
    pub how: Use,
}

impl fmt::Display for PrivateFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.how {
            Use::Fd(n) => write!(f, "{} (fd {} of pid {})", self.path, n, self.pid),
            Use::Cwd => write!(f, "{} (working directory of pid {})", self.path, self.pid),
            Use::Exe => write!(f, "{} (executable of pid {})", self.path, self.pid),
            Use::Mapped => write!(f, "{} (mapped by pid {})", self.path, self.pid),
        }
    }
}

/// Whether a path as /proc shows it is only on this node. `portable` are
/// the directories every node has (shared root, jobs dir, common dirs).
pub fn is_node_private(path: &str, portable: &[PathBuf]) -> bool {
    if !path.starts_with('/') || path.ends_with(" (deleted)") || path.starts_with("/memfd:") {
        return false;
    }
    let p = Path::new(path);
    if portable.iter().any(|d| p.starts_with(d)) {
        return false;
    }
    NODE_PRIVATE_DIRS.iter().any(|d| p.starts_with(d))
}

/// The file-backed mappings of a `/proc/<pid>/maps` text (6th field on).
pub fn mapped_paths(maps: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path (the path may hold spaces)
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            match rest.find(' ') {
                Some(i) => rest = &rest[i..],
                None => {
                    rest = "";
                    break;
                }
            }
        }
        let path = rest.trim();
        if path.starts_with('/') && !out.iter().any(|o| o == path) {
            out.push(path.to_string());
        }
    }
    out
}

/// Every node-private file the tree rooted at `root` (a host pid) uses;
/// empty if none (or the tree is gone).
pub fn node_private_files(root: i32, portable: &[PathBuf]) -> Vec<PrivateFile> {
    let mut out: Vec<PrivateFile> = Vec::new();
    let mut push = |path: String, pid: i32, how: Use| {
        if is_node_private(&path, portable) && !out.iter().any(|o| o.path == path) {
            out.push(PrivateFile { path, pid, how });
        }
    };
    let link = |p: String| {
        std::fs::read_link(p)
            .map(|l| l.to_string_lossy().into_owned())
            .ok()
    };
    for pid in crate::core::procfs::tree_pids(root) {
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                let Some(n) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if let Some(path) = link(format!("/proc/{pid}/fd/{n}")) {
                    push(path, pid, Use::Fd(n));
                }
            }
        }
        if let Some(path) = link(format!("/proc/{pid}/cwd")) {
            push(path, pid, Use::Cwd);
        }
        if let Some(path) = link(format!("/proc/{pid}/exe")) {
            push(path, pid, Use::Exe);
        }
        if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            for path in mapped_paths(&maps) {
                push(path, pid, Use::Mapped);
            }
        }
    }
    out
}

/// "… has files that exist only on node1: /tmp/x (fd 3 of pid 12), …".
pub fn describe(job: &str, node: &str, files: &[PrivateFile]) -> String {
    const SHOWN: usize = 5;
    let mut items: Vec<String> = files.iter().take(SHOWN).map(|f| f.to_string()).collect();
    if files.len() > SHOWN {
        items.push(format!("and {} more", files.len() - SHOWN));
    }
    format!(
        "job {job} uses files that exist only on {node}: {}; another node would not find them \
         ({} are private to every machine). Keep a job's files on the shared path; the job keeps running on {node}",
        items.join(", "),
        NODE_PRIVATE_DIRS.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        let portable = vec![
            PathBuf::from("/tmp/mosix-it-x"),
            PathBuf::from("/run/mosix/c/jobs"),
        ];
        for p in [
            "/tmp/counter.txt",
            "/var/tmp/x",
            "/run/lock/y",
            "/root/.bashrc",
            "/dev/shm/seg",
            "/tmp/mosix-it-xy/z",
        ] {
            assert!(is_node_private(p, &portable), "{p}");
        }
        for p in [
            "/tmp/mosix-it-x/counter.txt",
            "/tmp/mosix-it-x",
            "/run/mosix/c/jobs/j1/stdout",
            "/dev/null",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/work/main/target/debug/mosjob",
            "/tmp/gone (deleted)",
            "/memfd:buf (deleted)",
            "pipe:[1234]",
            "socket:[99]",
            "anon_inode:[eventfd]",
            "/tmpfoo/x",
            "/runner/x",
        ] {
            assert!(!is_node_private(p, &portable), "{p}");
        }
    }

    #[test]
    fn parses_maps() {
        let maps = "\
5581f0a00000-5581f0a01000 r--p 00000000 fe:00 123 /usr/bin/python3.11
5581f0a01000-5581f0a02000 r-xp 00001000 fe:00 123 /usr/bin/python3.11
7f00 rw-s 00000000 00:01 5 /tmp/my file.dat
7f01 rw-p 00000000 00:00 0 
7ffd rw-p 00000000 00:00 0                          [stack]
";
        assert_eq!(
            mapped_paths(maps),
            vec!["/usr/bin/python3.11".to_string(), "/tmp/my file.dat".into()]
        );
    }

    #[test]
    fn finds_a_private_file_of_a_live_process_tree() {
        let dir = tempfile::Builder::new()
            .prefix("mosix-portable-")
            .tempdir_in("/tmp")
            .unwrap();
        let f = dir.path().join("held.txt");
        std::fs::write(&f, "x").unwrap();
        // A process holding the file open on fd 7.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 7<'{}'; exec sleep 30", f.display()))
            // Nothing else private: not the test's cwd (a checkout may be
            // under /tmp) nor its stdout (maybe a file there).
            .current_dir("/")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut found = Vec::new();
        while std::time::Instant::now() < deadline {
            found = node_private_files(pid, &[]);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let portable = node_private_files(pid, &[dir.path().to_path_buf()]);
        let _ = child.kill();
        let _ = child.wait();
        let want = f.display().to_string();
        assert!(
            found.iter().any(|p| p.path == want && p.how == Use::Fd(7)),
            "{found:?}"
        );
        let msg = describe("j1", "node1", &found);
        assert!(msg.contains(&want) && msg.contains("fd 7"), "{msg}");
        assert!(portable.is_empty(), "{portable:?}");
    }
}
