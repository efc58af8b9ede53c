//! A node's CPU cgroup layout: the agent above its jobs.
//!
//! A node is left because it is crowded, and the move off it is done by CPU
//! the crowd wants too: the agent, its CRIU worker, and CRIU's parasite
//! running in the dumped job's threads. With the agent, CRIU and every job in
//! one cgroup, a CRIU worker at nice -10 weighs 9548 against 8 × 1024 for
//! eight CPU-bound jobs at nice 0: on a node capped at 0.5 core a move of a
//! small job was frozen 1.1 s (p50) against 0.15 s between idle nodes, and
//! the node's cgroup ran out of quota in every period of the dump.
//!
//! So a node's cgroup (the agent's `--cgroup`, in the cpu hierarchy) gets a
//! child, [`JOBS_GROUP`], holding its jobs, as systemd puts services in
//! slices and kubelet keeps system-reserved apart from pods:
//!
//! ```text
//! cpu:/<node cgroup>           quota = the node's cap; the agent, its CRIU workers
//!     └── jobs                 cpu.shares 2 (cgroup v1's minimum); every job
//! ```
//!
//! In cgroup v1 the tasks of a parent compete with its child groups by
//! weight: a task weighs per its nice level (1024 at nice 0), a child group
//! its `cpu.shares`. With the jobs at 2, whatever the agent level has to run
//! (a dump, a restore, a gRPC answer) gets the node's CPU nearly whole, and
//! the jobs share what it leaves, by their nice values as before. The cap
//! stays on the node's cgroup and covers both levels, so the node is no
//! bigger than before and its cpuacct (the load module's reading) still
//! counts everything: a parent's usage includes its children's.
//!
//! Where a job is put:
//! - at launch, by the job's first process itself before it execs (so
//!   nothing it forks ever runs outside the group);
//! - after a restore (a migration's target, a rollback on the source, a
//!   thaw, a checkpoint restart), at CRIU's `pre-resume` step, when the tree
//!   exists but none of it runs yet: CRIU restores with cgroups ignored, so
//!   the tree comes back in the restoring worker's group (the agent's);
//! - for its dump, the other way: the job is lifted to the agent's level
//!   ([`JobsGroup::lift_tree`]), because CRIU's parasite runs in the job's
//!   own threads and would otherwise get 2/1026 of the node against any
//!   agent-level work and a 1/(n+1) share among the crowd. A dump that
//!   succeeds ends the job here; one that fails (or is rolled back) puts the
//!   job back ([`JobsGroup::place_tree`]).
//!
//! Without a node cgroup (`mosixd` run without `--cgroup`) there is nothing
//! to arrange: jobs share the agent's cgroup as before, and the agent says
//! so in its log at start.
//!
//! Only the cpu hierarchy gets the child: cpuacct and the others keep the
//! whole node in one group, which is all they are read for.
//!
//! Every such move (a write to a `cgroup.procs`) took 5.5 ms (p50; up to 14)
//! on this machine, because the kernel takes one global lock for it,
//! `cgroup_threadgroup_rwsem`, and taking that for writing waits for an RCU
//! grace period. A move writes twice (a lift before the dump, a place at
//! pre-resume), and the place falls inside the frozen time. cgroup2's mount
//! option `favordynmods` is the kernel's switch for hosts that move tasks
//! between cgroups often: with it, such a write waits for no grace period,
//! at the cost of slightly dearer forks and exits (not measurable here:
//! fork + exit + wait of a Python process 1.15-1.18 ms before, 1.19-1.28 ms
//! after, each within the other's spread). The writes took 0.14-0.23 ms
//! (p50) after it, measured in the same minutes. The option belongs to the
//! cgroup2 root but the lock is global, so it helps the v1 cpu hierarchy
//! too. So an agent with a jobs group turns it on at start
//! ([`favor_dynmods`]: `mount -o remount,favordynmods` of the cgroup2
//! mount, which keeps the mount's other options) unless run with
//! `--no-cgroup-favordynmods`, and logs what it did. Kernel 6.18 keeps the
//! fast path until a reboot even if the option is taken off again (measured:
//! writes stayed at 0.2 ms after a remount without it).

use std::io::Write;
use std::path::{Path, PathBuf};

/// The child cgroup of a node's cgroup that holds its jobs.
pub const JOBS_GROUP: &str = "jobs";
/// `cpu.shares` of the jobs group: cgroup v1's minimum (see the module doc).
pub const JOBS_SHARES: u64 = 2;
/// Where the cpu hierarchy is mounted.
pub const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("node cgroup {0} does not exist")]
    NoNodeGroup(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A node's cgroup and its jobs group, in the cpu hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsGroup {
    node: PathBuf,
    jobs: PathBuf,
}

impl JobsGroup {
    /// Make (or take over) the jobs group of the node cgroup `scope`
    /// (relative to the cpu hierarchy's root `root`, e.g. `mosix/c/node1`).
    /// Its shares are set to [`JOBS_SHARES`]; its period follows the node's,
    /// and it has no quota of its own: the node's cap governs.
    pub fn setup(root: &Path, scope: &str) -> Result<Self, CgroupError> {
        let node = root.join(scope.trim_matches('/'));
        if !node.join("cgroup.procs").is_file() {
            return Err(CgroupError::NoNodeGroup(node));
        }
        let jobs = node.join(JOBS_GROUP);
        std::fs::create_dir_all(&jobs).map_err(io_err(&jobs))?;
        write_value(&jobs.join("cpu.shares"), &JOBS_SHARES.to_string())?;
        // No quota of its own: the node's applies to both levels.
        let quota = jobs.join("cpu.cfs_quota_us");
        if quota.is_file() {
            write_value(&quota, "-1")?;
        }
        Ok(Self { node, jobs })
    }

    /// [`Self::setup`] in the machine's cpu hierarchy.
    pub fn for_node(scope: &str) -> Result<Self, CgroupError> {
        Self::setup(Path::new(CPU_ROOT), scope)
    }

    /// The jobs group's directory.
    pub fn jobs_dir(&self) -> &Path {
        &self.jobs
    }

    /// The `cgroup.procs` a process writes `0` to, to join the jobs group.
    pub fn jobs_procs(&self) -> PathBuf {
        self.jobs.join("cgroup.procs")
    }

    /// Put every process of the tree rooted at `root` (a host pid) in the
    /// jobs group. Returns how many were moved.
    pub fn place_tree(&self, root: i32) -> Result<usize, CgroupError> {
        move_tree(&self.jobs_procs(), root)
    }

    /// Lift every process of the tree rooted at `root` to the node's own
    /// level, beside the agent (for its dump). Returns how many were moved.
    pub fn lift_tree(&self, root: i32) -> Result<usize, CgroupError> {
        move_tree(&self.node.join("cgroup.procs"), root)
    }

    /// While the returned guard lives, the jobs get at most
    /// [`SQUEEZE_QUOTA_US`] per [`SQUEEZE_PERIOD_US`] (1% of a core) of a
    /// node with a CPU cap; dropping it gives them the node's whole cap back.
    /// None on a node without a cap (nothing to squeeze: see the module doc)
    /// or when the quota cannot be set.
    pub fn squeeze(&self) -> Option<Squeeze> {
        let capped = std::fs::read_to_string(self.node.join("cpu.cfs_quota_us"))
            .ok()
            .and_then(|q| q.trim().parse::<i64>().ok())
            .is_some_and(|q| q > 0);
        if !capped {
            return None;
        }
        let s = Squeeze {
            quota: self.jobs.join("cpu.cfs_quota_us"),
            period: self.jobs.join("cpu.cfs_period_us"),
            old_period: std::fs::read_to_string(self.jobs.join("cpu.cfs_period_us"))
                .ok()?
                .trim()
                .to_string(),
        };
        // Period first: the quota is checked against it.
        let set = write_value(&s.period, &SQUEEZE_PERIOD_US.to_string())
            .and_then(|()| write_value(&s.quota, &SQUEEZE_QUOTA_US.to_string()));
        match set {
            Ok(()) => Some(s),
            Err(e) => {
                tracing::warn!("could not squeeze the jobs cgroup: {e}");
                drop(s);
                None
            }
        }
    }
}

/// The jobs' CFS quota and period while squeezed ([`JobsGroup::squeeze`]):
/// the kernel's minimum quota (1 ms) over a 100 ms period.
pub const SQUEEZE_QUOTA_US: u64 = 1_000;
pub const SQUEEZE_PERIOD_US: u64 = 100_000;

/// The jobs group squeezed (see [`JobsGroup::squeeze`]); dropping it lifts
/// the squeeze. An agent that dies holding one leaves the quota set: the next
/// [`JobsGroup::setup`] removes it.
#[derive(Debug)]
pub struct Squeeze {
    quota: PathBuf,
    period: PathBuf,
    old_period: String,
}

impl Drop for Squeeze {
    fn drop(&mut self) {
        if let Err(e) = write_value(&self.quota, "-1") {
            tracing::error!("the jobs cgroup stays squeezed: {e}");
        }
        let _ = write_value(&self.period, &self.old_period);
    }
}

/// One squeeze of a jobs group, shared by whoever needs it at the moment:
/// the first holder squeezes the jobs, the last to let go lifts it.
///
/// Why shared: a move holds the squeeze for its whole frozen window (the
/// dump, the seal, the hand-over record, the wait for the target's
/// restore), and the dump inside it, or a second move off the node at the
/// same time, takes it too. With a guard each, the first to finish lifted
/// the squeeze under the others. Taking and lifting happen under one lock,
/// so a lift never lands after the next holder's squeeze.
#[derive(Debug, Default, Clone)]
pub struct SqueezeShare(std::sync::Arc<std::sync::Mutex<(usize, Option<Squeeze>)>>);

/// One holder of a [`SqueezeShare`]; dropping the last one lifts the squeeze.
#[derive(Debug)]
pub struct SqueezeHold(SqueezeShare);

impl SqueezeShare {
    /// Hold the squeeze of `group`, squeezing it if nobody holds it yet.
    /// None where [`JobsGroup::squeeze`] gives none (a node without a cap).
    pub fn hold(&self, group: &JobsGroup) -> Option<SqueezeHold> {
        let mut held = self.0.lock().ok()?;
        if held.0 == 0 {
            held.1 = Some(group.squeeze()?);
        }
        held.0 += 1;
        Some(SqueezeHold(self.clone()))
    }

    /// How many hold it now.
    #[cfg(test)]
    fn holders(&self) -> usize {
        self.0.lock().map(|h| h.0).unwrap_or(0)
    }
}

impl Drop for SqueezeHold {
    fn drop(&mut self) {
        if let Ok(mut held) = (self.0).0.lock() {
            held.0 = held.0.saturating_sub(1);
            if held.0 == 0 {
                // Lifted here, under the lock (see `SqueezeShare`).
                held.1 = None;
            }
        }
    }
}

fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err(path))
}

/// Move every process of the tree rooted at `root` into the cgroup whose
/// `cgroup.procs` is `procs` (a process moves with all its threads). A
/// process that ended meanwhile is skipped; any other failure stops the move
/// and is returned. Returns how many processes were moved.
pub fn move_tree(procs: &Path, root: i32) -> Result<usize, CgroupError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(procs)
        .map_err(io_err(procs))?;
    let mut n = 0;
    for pid in crate::core::procfs::tree_pids(root) {
        // One pid per write(2): the kernel takes one per call.
        match f.write_all(pid.to_string().as_bytes()) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(io_err(procs)(e)),
        }
    }
    Ok(n)
}

/// The cgroup of `pid` in the cpu hierarchy (`/mosix/c/node1/jobs`), from
/// `/proc/<pid>/cgroup`.
pub fn cpu_cgroup_of(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_string())
    })
}

/// What [`favor_dynmods`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DynMods {
    /// The cgroup2 mount at this path has `favordynmods` already.
    AlreadyOn(PathBuf),
    /// The cgroup2 mount at this path was remounted with it.
    TurnedOn(PathBuf),
    /// No cgroup2 mount to set it on (a cgroup v1-only host): writes stay slow.
    NoCgroup2,
}

/// The cgroup2 mounts listed in a `/proc/self/mountinfo` text: each mount
/// point and whether its super options hold `favordynmods`.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<(PathBuf, bool)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            if right.next()? != "cgroup2" {
                return None;
            }
            let super_opts = right.nth(1).unwrap_or("");
            let on = super_opts.split(',').any(|o| o == "favordynmods");
            Some((PathBuf::from(unescape_mountinfo(mount_point)), on))
        })
        .collect()
}

/// mountinfo writes a space, tab, newline and backslash in a path as `\040`
/// and the like (three octal digits).
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Turn on cgroup2's `favordynmods` (see the module doc) if no cgroup2
/// mount has it. `mount(8)` does the remount: it passes the mount's current
/// options along with the new one, where a bare mount(2) would reset them
/// (nsdelegate, nosuid and the like on a systemd host).
pub fn favor_dynmods() -> Result<DynMods, CgroupError> {
    let info_path = Path::new("/proc/self/mountinfo");
    let info = std::fs::read_to_string(info_path).map_err(io_err(info_path))?;
    let mounts = cgroup2_mounts(&info);
    if let Some((path, _)) = mounts.iter().find(|(_, on)| *on) {
        return Ok(DynMods::AlreadyOn(path.clone()));
    }
    let Some((path, _)) = mounts.into_iter().next() else {
        return Ok(DynMods::NoCgroup2);
    };
    let out = std::process::Command::new("mount")
        .args(["-o", "remount,favordynmods"])
        .arg(&path)
        .output()
        .map_err(io_err(&path))?;
    if !out.status.success() {
        return Err(CgroupError::Io {
            path,
            source: std::io::Error::other(format!(
                "mount -o remount,favordynmods: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        });
    }
    Ok(DynMods::TurnedOn(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_needs_the_node_group_and_makes_the_jobs_group() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = JobsGroup::setup(tmp.path(), "mosix/x/node1").unwrap_err();
        assert!(matches!(err, CgroupError::NoNodeGroup(_)), "{err}");

        // A stand-in for a cgroup directory: its control files exist.
        let node = tmp.path().join("mosix/x/node1");
        std::fs::create_dir_all(&node).expect("mkdir");
        std::fs::write(node.join("cgroup.procs"), "").expect("write");
        let g = JobsGroup::setup(tmp.path(), "/mosix/x/node1/").expect("setup");
        assert_eq!(g.jobs_dir(), node.join("jobs"));
        let shares = std::fs::read_to_string(node.join("jobs/cpu.shares")).expect("shares");
        assert_eq!(shares, JOBS_SHARES.to_string());
        assert_eq!(g.jobs_procs(), node.join("jobs/cgroup.procs"));
    }

    #[test]
    fn a_shared_squeeze_is_lifted_by_its_last_holder_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = tmp.path().join("mosix/x/node1");
        std::fs::create_dir_all(node.join("jobs")).expect("mkdir");
        std::fs::write(node.join("cgroup.procs"), "").expect("write");
        let quota = node.join("jobs/cpu.cfs_quota_us");
        let period = node.join("jobs/cpu.cfs_period_us");
        std::fs::write(&quota, "-1").expect("write");
        std::fs::write(&period, "10000").expect("write");
        let g = JobsGroup::setup(tmp.path(), "mosix/x/node1").expect("setup");
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        let share = SqueezeShare::default();

        // No cap on the node: nothing to squeeze, nobody holds it.
        std::fs::write(node.join("cpu.cfs_quota_us"), "-1").expect("write");
        assert!(share.hold(&g).is_none());
        assert_eq!(share.holders(), 0);

        std::fs::write(node.join("cpu.cfs_quota_us"), "5000").expect("write");
        let move_ = share.hold(&g).expect("squeezed");
        assert_eq!(read(&quota), SQUEEZE_QUOTA_US.to_string());
        assert_eq!(read(&period), SQUEEZE_PERIOD_US.to_string());
        // The dump inside the move takes it too, and lets go first.
        let dump = share.hold(&g).expect("held again");
        assert_eq!(share.holders(), 2);
        drop(dump);
        assert_eq!(
            read(&quota),
            SQUEEZE_QUOTA_US.to_string(),
            "lifted under the move"
        );
        drop(move_);
        assert_eq!(share.holders(), 0);
        assert_eq!(read(&quota), "-1");
        assert_eq!(read(&period), "10000");
        // And it can be taken again.
        let again = share.hold(&g).expect("squeezed again");
        assert_eq!(read(&quota), SQUEEZE_QUOTA_US.to_string());
        drop(again);
        assert_eq!(read(&quota), "-1");
    }

    #[test]
    fn the_cpu_line_of_proc_cgroup_is_found() {
        // Every process is in some cpu cgroup where the hierarchy exists.
        if Path::new(CPU_ROOT).join("cgroup.procs").is_file() {
            let me = std::process::id() as i32;
            let cg = cpu_cgroup_of(me).expect("our cpu cgroup");
            assert!(cg.starts_with('/'), "{cg}");
        }
    }

    #[test]
    fn cgroup2_mounts_are_found_with_their_favordynmods() {
        let info = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 22 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
36 22 0:31 / /mnt/my\\040cg rw,nosuid shared:9 master:1 - cgroup2 none rw,nsdelegate,favordynmods,memory_recursiveprot
";
        assert_eq!(
            cgroup2_mounts(info),
            vec![
                (PathBuf::from("/sys/fs/cgroup/unified"), false),
                (PathBuf::from("/mnt/my cg"), true),
            ]
        );
        assert!(cgroup2_mounts("garbage\n\n1 2 3 - cgroup2").is_empty());
        assert_eq!(unescape_mountinfo("a\\134b\\0"), "a\\b\\0");
    }
}
