//! The CRIU driver.
//!
//! Everything mosix asks of CRIU goes through [`CheckpointEngine`], so the
//! agent's protocol logic can be tested with [`fake::FakeEngine`] without root.
//! [`RealCriu`] talks CRIU's RPC (`rust-criu`'s message types) to a `criu
//! swrk` worker started ahead of time ([`swrk`]).
//!
//! Options chosen, and why:
//! - `manage_cgroups_mode = IGNORE` on dump and restore: a restored job must
//!   land in the *restoring* agent's cgroup, so the target node's CPU cap
//!   governs it (with the default mode it returns to the source's cgroup).
//! - `rst_sibling` on restore: the restored init becomes a child of the agent,
//!   so the agent can `waitpid` it and report its exit status. Its host pid is
//!   learned from CRIU's `post-restore` notification.
//! - `shell_job = false`: jobs are session leaders inside their own PID
//!   namespace, which is what CRIU needs to dump and re-create them anywhere.
//! - Logs go into the image directory (`dump.log`, `restore.log`) so a failed
//!   migration leaves its evidence beside its images; the error returned to the
//!   user quotes CRIU's own `Error` lines from that log.
//! - Pre-copy (`pre_dump`, and a dump with `prev_images_dir`) runs the CRIU
//!   command line, not RPC: see [`real`] for why.

pub mod fake;
pub mod host;
pub mod kdat;
pub mod real;
pub mod swrk;

pub use real::RealCriu;

use std::path::{Path, PathBuf};

/// CRIU log file names, relative to the image directory.
pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";
pub const LAZY_LOG: &str = "lazy-pages.log";
pub const PRE_DUMP_LOG: &str = "pre-dump.log";
/// CRIU's statistics of a dump. CRIU 4.2.1 writes it only when the dump
/// succeeded (`cr_dump_finish`: `write_stats(DUMP_STATS)` in the success
/// branch), at any log level, so it tells a finished dump from an
/// interrupted one when the log is quiet.
pub const DUMP_STATS: &str = "stats-dump";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageServer {
    pub address: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct DumpSpec {
    /// Host pid of the job's init.
    pub pid: i32,
    pub image_dir: PathBuf,
    /// Keep the process running after the dump (snapshot, not move).
    pub leave_running: bool,
    /// Post-copy: serve memory from this page server instead of writing it.
    pub lazy: Option<PageServer>,
    /// Send the memory pages into this connected socket, to a `criu
    /// page-server` at its other end (CRIU's `--page-server --ps-socket`),
    /// instead of writing them into `image_dir`: see
    /// `agent::direct::stream`. The caller keeps it open until the dump
    /// returns. Not combinable with `lazy` or `prev_images_dir`; pair it
    /// with `keep_stopped`, since the pages are then nowhere on this node.
    pub page_socket: Option<std::os::fd::RawFd>,
    /// CRIU writes a byte here once everything but memory is dumped and the
    /// page server listens (post-copy). Must be inheritable (no CLOEXEC).
    pub status_fd: Option<i32>,
    /// Pre-copy: the last pre-dump round's directory, relative to
    /// `image_dir` (CRIU's `--prev-images-dir`). The dump then writes only
    /// the pages dirtied since that round (memory tracking) and links
    /// `image_dir/parent` to it. Not combinable with `lazy`.
    pub prev_images_dir: Option<String>,
    /// Leave the tree stopped (SIGSTOP, detached) instead of killing it
    /// when the dump succeeds (CRIU's `leave_stopped`). Post-copy uses it:
    /// CRIU calls a page transfer that simply ended a success, whether or
    /// not every page went out, and would then kill the only complete copy
    /// of the job. Stopped, the agent decides: SIGKILL once the target runs
    /// the job, SIGCONT if it does not. A failed dump resumes the tree as
    /// always.
    pub keep_stopped: bool,
    /// Give up on CRIU after this long: it is killed, which detaches it from
    /// the tree (the job runs on, as after any failed dump). None: no bound
    /// here (a post-copy dump, which ends when its page transfer does, is
    /// bounded by its caller). See [`deadline_for`].
    pub deadline: Option<std::time::Duration>,
    /// Called at CRIU's `post-dump` step: the images are complete and the
    /// tree is still frozen (CRIU resumes it, with `leave_running`, only
    /// after this returns). A checkpoint copies the job's output files
    /// here, so they match the images exactly. An `Err` fails the dump
    /// (and CRIU resumes the tree).
    pub post_dump: Option<PostDumpHook>,
    /// The job has its own network namespace (see `agent::jobnet`): dump it
    /// with its established TCP connections (`tcp_established`), the whole
    /// namespace locked with nftables while frozen (this machine has no
    /// iptables, and a namespace lock leaves no per-connection table).
    pub own_net: bool,
}

/// See [`DumpSpec::post_dump`].
#[derive(Clone)]
pub struct PostDumpHook(pub std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl PostDumpHook {
    pub fn new(f: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }
    pub fn run(&self) -> Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for PostDumpHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostDumpHook")
    }
}

/// One round of iterative pre-copy: CRIU's `pre-dump`.
#[derive(Debug, Clone)]
pub struct PreDumpSpec {
    /// Host pid of the job's init.
    pub pid: i32,
    /// This round's (new, empty) directory.
    pub image_dir: PathBuf,
    /// The previous round's directory relative to `image_dir`; None for the
    /// first round, which writes all memory.
    pub prev_images_dir: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RestoreSpec {
    pub image_dir: PathBuf,
    /// Post-copy: fetch pages from this source page server.
    pub lazy_from: Option<PageServer>,
    /// Called at CRIU's `pre-resume` step, after the process tree is rebuilt
    /// and before any of it runs; an `Err` aborts the restore (CRIU kills
    /// the tree). The agent uses it to finish verifying memory images in
    /// parallel with the restore.
    pub resume_gate: Option<ResumeGate>,
    /// Give up on CRIU after this long: CRIU and the half-restored tree are
    /// killed. A restore can hang for good, e.g. a restored task waiting for
    /// a file lock that the frozen source still holds. See [`deadline_for`].
    pub deadline: Option<std::time::Duration>,
    /// Polled while CRIU restores; `Some(reason)` aborts the restore like a
    /// passed deadline. Post-copy passes "the lazy-pages daemon exited":
    /// without it, the restored tasks would wait for their pages forever.
    pub abort_if: Option<AbortCheck>,
    /// A job with its own network namespace: CRIU's `external` entry that
    /// re-creates its interface here (`veth[eth0]:HOSTVETH@BRIDGE`, same MAC
    /// and address), with `tcp_established` and the nftables lock.
    pub external_veth: Option<String>,
    /// The `cgroup.procs` of the node's jobs group: at `pre-resume` the
    /// restored tree (which CRIU puts in the restoring worker's cgroup, the
    /// agent's) is moved there before any of it runs (see
    /// [`crate::core::cgroup`]). None: it stays in the worker's cgroup.
    pub jobs_cgroup: Option<PathBuf>,
    /// Free each page image as it is read (CRIU's `auto_dedup`): the
    /// restore then reuses the memory the images held. The images can never
    /// be restored again, so only for a copy that is not the job's last
    /// (see `agent::direct::stream::HashedOnArrival`).
    pub consume_pages: bool,
}

/// See [`RestoreSpec::abort_if`].
#[derive(Clone)]
pub struct AbortCheck(pub std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl AbortCheck {
    pub fn new(f: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }
    pub fn check(&self) -> Option<String> {
        (self.0)()
    }
}

impl std::fmt::Debug for AbortCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortCheck")
    }
}

/// Which CRIU call a deadline is for (see [`deadline_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriuCall {
    /// A dump that writes all memory (full copy, freeze, checkpoint).
    Dump,
    /// A restore that reads all memory from the images.
    Restore,
    /// A post-copy restore: no memory is read before the job resumes.
    LazyRestore,
    /// A post-copy page transfer, after the target restored the job.
    LazyTransfer,
    /// A pre-copy round (CRIU's command line).
    PreDump,
}

/// Every CRIU call the agent makes is bounded, so that one stuck CRIU can
/// never hold a job, or the node's CRIU lock, for long. A bound is a fixed
/// allowance for CRIU's own start-up and work that does not grow with the
/// job (kernel probes, /proc parsing, forking the tree), plus the job's
/// memory at a rate far below what this machine does. Measured here: a
/// 1 GiB full dump takes 0.6 s and its restore 1.0 s (~1 GiB/s); a
/// post-copy restore of the same job 0.2 s; a lazy transfer of 1 GiB about
/// 1 s. So the bounds are 20-100x what a healthy call takes, and a call
/// that passes one is stuck, not slow.
/// - dump, restore, pre-dump: 60 s + 1 s per 16 MiB (1 GiB: 124 s);
/// - post-copy restore: 8 s flat, since no memory is read before the job
///   resumes; it is what bounds a hung post-copy (a restored task waiting
///   for a lock the frozen source holds), and the source waits for it with
///   its page server open, so it is kept short;
/// - post-copy transfer: 30 s + 1 s per 16 MiB.
pub fn deadline_for(call: CriuCall, bytes: u64) -> std::time::Duration {
    use std::time::Duration;
    let per_size = Duration::from_secs(bytes / (16 << 20));
    match call {
        CriuCall::Dump | CriuCall::Restore | CriuCall::PreDump => {
            Duration::from_secs(60) + per_size
        }
        CriuCall::LazyRestore => Duration::from_secs(8),
        CriuCall::LazyTransfer => Duration::from_secs(30) + per_size,
    }
}

/// See [`RestoreSpec::resume_gate`].
#[derive(Clone)]
pub struct ResumeGate(pub std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl ResumeGate {
    pub fn new(f: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }
    pub fn check(&self) -> Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for ResumeGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeGate")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Host pid of the restored init (a child of the calling process).
    pub pid: i32,
}

/// Kernel features relevant to migration modes, from `criu check --feature`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// userfaultfd and big enough pipes: post-copy (lazy pages) works.
    pub lazy_pages: bool,
    /// soft-dirty memory tracking: iterative pre-copy works.
    pub mem_dirty_track: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("CRIU not found or not executable at {0} (run `make setup`, or pass --criu)")]
    Missing(PathBuf),
    #[error("CRIU {op} failed: {detail}")]
    Failed { op: &'static str, detail: String },
    /// The resume gate refused: the restored tree was killed before it ran.
    #[error("restore stopped before the job resumed: {0}")]
    Refused(String),
    #[error("CRIU {op}: no space left on the image disk: {detail}")]
    DiskFull { op: &'static str, detail: String },
    /// CRIU passed its deadline or was told to stop (see
    /// [`RestoreSpec::abort_if`]); it was killed.
    #[error("CRIU {op} stopped: {detail}")]
    Stopped { op: &'static str, detail: String },
    #[error("CRIU {op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
}

/// What the agent needs from a checkpoint/restore implementation.
pub trait CheckpointEngine: Send + Sync + 'static {
    /// Checkpoint the process tree rooted at `spec.pid` into `spec.image_dir`.
    /// Unless `leave_running`, the tree is gone when this returns Ok. On Err
    /// the tree is still running (CRIU resumes it).
    fn dump(&self, spec: &DumpSpec) -> Result<(), CriuError>;
    /// Restore from `spec.image_dir`; the restored init is our child.
    fn restore(&self, spec: &RestoreSpec) -> Result<RestoreOutcome, CriuError>;
    fn features(&self) -> Features;
    /// Post-copy, target side: start CRIU's lazy-pages daemon for
    /// `image_dir`, fetching memory from the source's page server; returns
    /// once it listens for the restore.
    fn start_lazy_daemon(
        &self,
        image_dir: &Path,
        from: &PageServer,
    ) -> Result<std::process::Child, CriuError>;
    /// A full copy without a shared path, target side: start `criu
    /// page-server`, writing the page images it is sent over `socket` (a
    /// connected stream socket of ours, inherited under the same number)
    /// into `image_dir`, its log into `log`; returns once it serves. It ends
    /// by itself once the dumping CRIU closes the transfer. See
    /// `agent::direct::stream`. The default: this engine cannot.
    fn page_server(
        &self,
        image_dir: &Path,
        socket: std::os::fd::RawFd,
        log: &Path,
    ) -> Result<std::process::Child, CriuError> {
        let _ = (image_dir, socket, log);
        Err(CriuError::Failed {
            op: "page-server",
            detail: "this checkpoint engine has no page server".into(),
        })
    }
    /// Whether the engine is usable at all (binary present).
    fn available(&self) -> Result<(), CriuError>;
    /// One pre-copy round: write the job's memory (all of it in the first
    /// round, then what was dirtied since the previous one) while the job
    /// keeps running; it is frozen only while CRIU collects the pages. Turns
    /// on the kernel's dirty-memory tracking for the next round. Returns
    /// the bytes of page images written. On Err the job is still running.
    /// Only meaningful where [`Features::mem_dirty_track`]; the default is
    /// for engines without pre-copy.
    fn pre_dump(&self, spec: &PreDumpSpec) -> Result<u64, CriuError> {
        let _ = spec;
        Err(CriuError::Failed {
            op: "pre-dump",
            detail: "this checkpoint engine has no pre-dump".into(),
        })
    }
}

/// Total size of the page images (`pages-*.img`) in one directory: what a
/// pre-dump round wrote.
/// CRIU's image of one established TCP socket: `tcp-stream-<inode, hex>.img`
/// (`CR_FD_TCP_STREAM`, one file per connection).
pub fn tcp_stream_image(inode: u64) -> String {
    format!("tcp-stream-{inode:x}.img")
}

/// Create, empty, the `tcp-stream` images CRIU is about to write for these
/// socket inodes, before the job is frozen. Returns how many were created.
///
/// Why: CRIU creates one file per established connection while the job is
/// frozen, and on this project's file system (ext4 without a journal) each
/// new inode is a scan: `find_inode_bit` skips every inode freed in the last
/// 30-60 s (`recently_deleted`), and every move deletes the previous move's
/// images. Measured at 1,000 connections: the dump's frozen part was
/// 0.56-0.76 s, 0.19-0.25 s with the files already there (CRIU opens them
/// `O_WRONLY|O_CREAT|O_TRUNC`, so an existing file is simply reused); on NFS
/// each create is a round trip. A file left empty (its socket closed before
/// the freeze) is never read: CRIU opens a `tcp-stream` image only for a
/// socket in its `inetsk` image.
pub fn precreate_tcp_stream_images(dir: &Path, inodes: &[u64]) -> std::io::Result<usize> {
    let mut made = 0;
    for &ino in inodes {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(tcp_stream_image(ino)))
        {
            Ok(_) => made += 1,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(made)
}

/// ext4's "top of a directory hierarchy" inode flag (`chattr +T`,
/// `FS_TOPDIR_FL` in `linux/fs.h`).
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Create a move's image directory, `<job dir>/<migration>`, first marking
/// the job's directory (its parent) as the top of a hierarchy where the file
/// system has such a mark (ext4's `+T`). Returns whether it has: the new
/// directory then starts in block groups of its own, and [`precreate_tcp_stream_images`]
/// is not needed.
///
/// Why: ext4 allocates a new file's inode in its directory's block group,
/// scanning the group's inode bitmap from its start, and without a journal
/// (this project's machines) it skips, with a look at the inode table,
/// every inode freed less than 60 s ago (6 min while that table block is
/// dirty): `find_inode_bit` → `recently_deleted`. Every move deletes the
/// previous move's images, which sit in that same group, so a job with
/// 1,000 connections, whose dump makes 1,000 `tcp-stream` files, paid that
/// scan a thousand times inside the freeze. Making the files before the
/// freeze avoided the scan but had a cost of its own there: CRIU opens them
/// `O_TRUNC`, and truncating an ext4 file to 0 marks it to be written back
/// at close (`auto_da_alloc`), 1,000 block-I/O submissions while frozen
/// (perf, BENCHMARKS.md section 8). Under a `+T` directory ext4 places each
/// new subdirectory with its Orlov allocator in a block group with few
/// directories, chosen from a hash of its name, away from the last move's
/// freed inodes; CRIU's own creates are then cheap. Best effort: on another
/// file system (NFS, tmpfs, FUSE) the flag is refused and nothing changes.
pub fn create_image_dir(dir: &Path) -> std::io::Result<bool> {
    let spread = match dir.parent() {
        Some(parent) => {
            std::fs::create_dir_all(parent)?;
            mark_top_dir(parent)
        }
        None => false,
    };
    std::fs::create_dir_all(dir)?;
    Ok(spread)
}

/// Set [`FS_TOPDIR_FL`] on `dir` if it lacks it; whether it has it now.
fn mark_top_dir(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(dir) else {
        return false;
    };
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which
    // points at a live local; the fd is open for the whole call.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
        return false;
    }
    if flags & FS_TOPDIR_FL != 0 {
        return true;
    }
    flags |= FS_TOPDIR_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, as above.
    unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) == 0 }
}

pub fn page_image_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(crate::security::follow::is_page_image)
                })
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// CRIU's own error lines from a log, so users see *why* (e.g. "Can't fork
/// for 6975: File exists"), not just an errno.
pub fn log_excerpt(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return format!("(no CRIU log at {})", log.display());
    };
    // CRIU logs this on every run here, harmlessly (root lacks
    // CAP_SYS_RESOURCE); quoting it would hide the real error.
    let noise = |l: &&str| l.contains("RLIMIT_NOFILE");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error (") || l.starts_with("Error"))
        .filter(|l| !noise(l))
        .collect();
    let pick: Vec<&str> = if errors.is_empty() {
        text.lines()
            .filter(|l| !noise(l))
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        errors.iter().rev().take(4).rev().copied().collect()
    };
    let mut s = pick.join(" | ");
    if s.len() > 1500 {
        s.truncate(1500);
    }
    format!("{s} (log: {})", log.display())
}

/// Where to find CRIU when no flag or config names it: `$MOSIX_CRIU`, else
/// the project-local build recorded by `make setup` (`.cache/criu/path`),
/// else `criu` on PATH.
pub fn default_criu_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MOSIX_CRIU") {
        return PathBuf::from(p);
    }
    let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/criu/path");
    if let Ok(s) = std::fs::read_to_string(&recorded) {
        let p = PathBuf::from(s.trim());
        if p.is_file() {
            return p;
        }
    }
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
    ] {
        let p = Path::new(dir).join("criu");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("criu")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_stream_images_are_made_empty_and_existing_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(tcp_stream_image(0x5c06a8), "tcp-stream-5c06a8.img");
        std::fs::write(dir.path().join("tcp-stream-1f.img"), b"kept").unwrap();
        assert_eq!(
            precreate_tcp_stream_images(dir.path(), &[31, 32]).unwrap(),
            1
        );
        assert_eq!(
            std::fs::read(dir.path().join("tcp-stream-1f.img")).unwrap(),
            b"kept"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("tcp-stream-20.img"))
                .unwrap()
                .len(),
            0
        );
        assert!(precreate_tcp_stream_images(&dir.path().join("missing"), &[1]).is_err());
    }

    /// The inode flags of `dir`, read by `lsattr` rather than by the code
    /// under test; `None` where the file system has none.
    fn lsattr_has_top_dir(dir: &Path) -> Option<bool> {
        let out = std::process::Command::new("lsattr")
            .arg("-d")
            .arg(dir)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let attrs = text.split_whitespace().next()?;
        out.status.success().then(|| attrs.contains('T'))
    }

    #[test]
    fn image_dirs_spread_where_the_file_system_can() {
        let root = tempfile::tempdir().unwrap();
        let job = root.path().join("job-1");
        let dir = job.join("mig-1");
        let spread = create_image_dir(&dir).unwrap();
        assert!(dir.is_dir());
        assert_eq!(lsattr_has_top_dir(&job).unwrap_or(false), spread);
        // ext4, the file system of this project's machines and of CI, has
        // the flag: there it must be set.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(root.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
        if st.f_type == libc::EXT4_SUPER_MAGIC {
            assert!(spread, "ext4 refused +T on {}", job.display());
        } else {
            eprintln!(
                "note: {} is not ext4; +T not required",
                root.path().display()
            );
        }
        // A second move of the same job: the flag is there already.
        assert_eq!(create_image_dir(&job.join("mig-2")).unwrap(), spread);
        // A file system without the flag (tmpfs): the dir is made all the same.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let t = tempfile::tempdir_in(shm).unwrap();
            let d = t.path().join("job").join("mig");
            let spread = create_image_dir(&d).unwrap();
            assert!(d.is_dir());
            assert_eq!(
                lsattr_has_top_dir(&t.path().join("job")).unwrap_or(false),
                spread
            );
        }
    }

    #[test]
    fn excerpt_prefers_error_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        std::fs::write(
            &log,
            "(00.1) info\n(00.2) Error (criu/cr-restore.c:1): Can't fork for 6975: File exists\n(00.3) bye\n",
        )
        .unwrap();
        let e = log_excerpt(&log);
        assert!(e.contains("Can't fork for 6975"), "{e}");
        assert!(!e.contains("bye"), "{e}");
        assert!(log_excerpt(&dir.path().join("nope")).contains("no CRIU log"));
    }
}
