//! The fence watchdog: a small process per agent (like sanlock's `wdmd`)
//! that enforces the agent's fencing deadline when the agent cannot.
//!
//! Self-fencing ([`super::fencing`]) runs inside the agent: an agent that is
//! SIGSTOPped, SIGKILLed or crashed kills nothing, while its jobs run on.
//! Once its lease expires the leading balancer restarts those jobs on
//! another node, and two copies would run. So the agent hands the deadline
//! to a separate process, `mosix-watchdog`, which needs nothing from it
//! but a file: it reads the file every [`POLL`], and once the clock passes
//! the deadline it SIGKILLs the listed job inits (each the init of its own
//! PID namespace, so its whole tree dies with it).
//!
//! ## The fence file
//!
//! Node-local (by default `/run/mosix/<cluster>/<node>.fence`), written by
//! the agent after every good lease renewal and whenever its set of jobs
//! changes, always as a whole (temp file + rename: the watchdog never sees
//! half a file). Text, one item per line:
//!
//! ```text
//! mosix-fence 1
//! node node2
//! deadline 1234567890123
//! kill 4242:98765
//! kill 4250:98771
//! ```
//!
//! - `deadline`: CLOCK_MONOTONIC in nanoseconds, the moment the agent's own
//!   watchdog fences: the send time of the last good renewal + TTL −
//!   margin. Both processes read the same clock (the agent's
//!   [`super::store::SystemClock`] is CLOCK_MONOTONIC), so no conversion
//!   and no wall-clock step can move it.
//! - `kill PID:STARTTIME`: a job init, with its start time (field 22 of
//!   `/proc/PID/stat`, clock ticks since boot). A pid is only killed while
//!   its start time still matches: a pid reused by another process after
//!   the job ended is left alone.
//! - Unknown lines are ignored (a newer agent may say more); a file without
//!   the header or a deadline is refused, and the watchdog keeps enforcing
//!   the last good one.
//!
//! The watchdog's rule, [`to_kill`], is level-triggered: while the deadline
//! is past, every listed init that still runs is killed, on every poll; it
//! logs one line per batch. A newer deadline (a restarted agent renewed)
//! disarms it. The file's removal stops it: an agent that exits cleanly
//! with no job left removes the file. A pid file beside it
//! (`<node>.watchdog.pid`, `PID:STARTTIME`) lets a restarted agent find and
//! replace the watchdog of its predecessor: never two at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the watchdog reads the file and the clock.
pub const POLL: Duration = Duration::from_millis(100);

const HEADER: &str = "mosix-fence 1";

/// A job init to kill, identified across pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Victim {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`.
    pub starttime: u64,
}

/// The contents of a fence file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FenceFile {
    /// For the log line only.
    pub node: String,
    /// CLOCK_MONOTONIC nanoseconds after which the victims must not run.
    pub deadline_ns: u64,
    pub kill: Vec<Victim>,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("fence file line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("fence file has no `{0}` line")]
    Missing(&'static str),
    #[error("{what} {}: {err}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("cannot start the fence watchdog {}: {err}", path.display())]
    Spawn { path: PathBuf, err: std::io::Error },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WatchdogError {
    let path = path.to_path_buf();
    move |err| WatchdogError::Io { what, path, err }
}

impl FenceFile {
    pub fn render(&self) -> String {
        let mut s = format!(
            "{HEADER}\nnode {}\ndeadline {}\n",
            self.node, self.deadline_ns
        );
        for v in &self.kill {
            s.push_str(&format!("kill {}:{}\n", v.pid, v.starttime));
        }
        s
    }

    pub fn parse(text: &str) -> Result<Self, WatchdogError> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, l)) if l.trim() == HEADER => {}
            _ => {
                return Err(WatchdogError::Parse {
                    line: 1,
                    reason: format!("expected `{HEADER}`"),
                })
            }
        }
        let mut f = FenceFile::default();
        let mut deadline = None;
        for (i, l) in lines {
            let bad = |reason: &str| WatchdogError::Parse {
                line: i + 1,
                reason: format!("{reason}: {l:?}"),
            };
            let (key, rest) = l.trim().split_once(' ').unwrap_or((l.trim(), ""));
            match key {
                "node" => f.node = rest.trim().to_string(),
                "deadline" => {
                    deadline = Some(rest.trim().parse().map_err(|_| bad("bad deadline"))?)
                }
                "kill" => {
                    let (p, s) = rest
                        .trim()
                        .split_once(':')
                        .ok_or_else(|| bad("not PID:STARTTIME"))?;
                    let pid: i32 = p.parse().map_err(|_| bad("bad pid"))?;
                    if pid <= 1 {
                        // Never kill init or every process (-1, 0).
                        return Err(bad("pid must be above 1"));
                    }
                    let starttime = s.parse().map_err(|_| bad("bad start time"))?;
                    f.kill.push(Victim { pid, starttime });
                }
                _ => {}
            }
        }
        f.deadline_ns = deadline.ok_or(WatchdogError::Missing("deadline"))?;
        Ok(f)
    }
}

/// The watchdog's decision: which of the listed pids to SIGKILL at
/// `now_ns`, given each pid's current start time (None: gone or a zombie).
/// Nothing before the deadline; after it, every victim still running as
/// the process the agent listed.
pub fn to_kill(f: &FenceFile, now_ns: u64, starttime_of: impl Fn(i32) -> Option<u64>) -> Vec<i32> {
    if now_ns <= f.deadline_ns {
        return Vec::new();
    }
    f.kill
        .iter()
        .filter(|v| starttime_of(v.pid) == Some(v.starttime))
        .map(|v| v.pid)
        .collect()
}

/// State and start time from the text of `/proc/PID/stat` (the command
/// name in parentheses may hold spaces and parentheses itself).
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    // Field 3 is the state; field 22 the start time.
    let state = fields.next()?.chars().next()?;
    let starttime = fields.nth(18)?.parse().ok()?;
    Some((state, starttime))
}

/// The start time of a live process (None if it is gone or a zombie:
/// nothing left to kill).
pub fn proc_starttime(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    match parse_stat(&s)? {
        ('Z' | 'X', _) => None,
        (_, t) => Some(t),
    }
}

/// CLOCK_MONOTONIC, the clock of every lease deadline.
pub fn monotonic_now() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => Duration::from(t),
        // Cannot fail on Linux with this clock id; a zero would only make
        // every deadline look far away, so say it loudly.
        Err(e) => {
            tracing::error!("clock_gettime(CLOCK_MONOTONIC): {e}");
            Duration::ZERO
        }
    }
}

pub fn as_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Replace `path` with `contents` in one step (temp file + rename).
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), WatchdogError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, contents).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

/// The fence file, or None if there is none.
pub fn read(path: &Path) -> Result<Option<FenceFile>, WatchdogError> {
    match std::fs::read_to_string(path) {
        Ok(s) => FenceFile::parse(&s).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", path)(e)),
    }
}

/// The pid file of the watchdog guarding `fence_file`.
pub fn pid_file(fence_file: &Path) -> PathBuf {
    fence_file.with_extension("watchdog.pid")
}

/// Record the running watchdog.
pub fn record_pid(pid_file: &Path, pid: i32) -> Result<(), WatchdogError> {
    let st = proc_starttime(pid).unwrap_or(0);
    write_atomic(pid_file, &format!("{pid}:{st}\n"))
}

/// Stop the watchdog a pid file names, if it still runs (same start time)
/// and is a watchdog; wait (bounded) until it is gone. Returns its pid.
pub fn stop_recorded(pid_file: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let (p, s) = text.trim().split_once(':')?;
    let (pid, st): (i32, u64) = (p.parse().ok()?, s.parse().ok()?);
    if pid <= 1 || proc_starttime(pid) != Some(st) {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "mosix-watchdog" {
        return None;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while proc_starttime(pid) == Some(st) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(pid)
}

/// The watchdog process: poll `path` until it is removed, SIGKILLing
/// what [`to_kill`] says. A file that cannot be read or parsed leaves the
/// last good one in force (fail closed).
pub fn run(path: &Path) -> Result<(), WatchdogError> {
    let mut last: Option<FenceFile> = None;
    let mut complained = false;
    let mut logged: Vec<i32> = Vec::new();
    tracing::info!(file = %path.display(), "fence watchdog running");
    loop {
        match read(path) {
            Ok(Some(f)) => {
                if last
                    .as_ref()
                    .is_some_and(|l| l.deadline_ns != f.deadline_ns)
                {
                    logged.clear();
                }
                last = Some(f);
                complained = false;
            }
            Ok(None) => {
                tracing::info!(file = %path.display(), "fence file removed (the agent stopped cleanly): fence watchdog exiting");
                return Ok(());
            }
            Err(e) => {
                if !complained {
                    tracing::error!("{e}; enforcing the last good deadline");
                    complained = true;
                }
            }
        }
        if let Some(f) = &last {
            let now = as_ns(monotonic_now());
            let pids = to_kill(f, now, proc_starttime);
            for p in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if !pids.is_empty() && pids != logged {
                tracing::error!(
                    node = %f.node,
                    late_s = Duration::from_nanos(now.saturating_sub(f.deadline_ns)).as_secs_f64(),
                    killed = ?pids,
                    "fence watchdog: the agent did not renew its etcd lease by its fencing deadline (it is stopped, hung or dead): fenced, SIGKILLed its job inits so that no copy runs on once the lease expires"
                );
                logged = pids;
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(deadline_ns: u64, kill: &[(i32, u64)]) -> FenceFile {
        FenceFile {
            node: "node2".into(),
            deadline_ns,
            kill: kill
                .iter()
                .map(|&(pid, starttime)| Victim { pid, starttime })
                .collect(),
        }
    }

    #[test]
    fn the_file_round_trips_and_bad_ones_are_refused() {
        let f = file(1_234_567_890, &[(4242, 98765), (4250, 98771)]);
        let text = f.render();
        assert!(text.starts_with("mosix-fence 1\n"));
        assert_eq!(FenceFile::parse(&text).unwrap(), f);
        // A newer agent's extra lines are ignored.
        let more = format!("{text}future thing\n");
        assert_eq!(FenceFile::parse(&more).unwrap(), f);
        assert!(FenceFile::parse("").is_err());
        assert!(FenceFile::parse("mosix-fence 2\ndeadline 1\n").is_err());
        assert!(matches!(
            FenceFile::parse("mosix-fence 1\nnode n\n"),
            Err(WatchdogError::Missing("deadline"))
        ));
        assert!(FenceFile::parse("mosix-fence 1\ndeadline x\n").is_err());
        assert!(FenceFile::parse("mosix-fence 1\ndeadline 5\nkill 12\n").is_err());
        assert!(FenceFile::parse("mosix-fence 1\ndeadline 5\nkill a:1\n").is_err());
        for p in ["-1", "0", "1"] {
            assert!(
                FenceFile::parse(&format!("mosix-fence 1\ndeadline 5\nkill {p}:1\n")).is_err(),
                "pid {p} would kill far more than a job"
            );
        }
        let empty = FenceFile::parse("mosix-fence 1\ndeadline 7\n").unwrap();
        assert!(empty.kill.is_empty());
    }

    #[test]
    fn nothing_is_killed_before_the_deadline_and_every_listed_job_after() {
        let f = file(1_000, &[(100, 5), (200, 6)]);
        let running = |p: i32| match p {
            100 => Some(5),
            200 => Some(6),
            _ => None,
        };
        assert!(to_kill(&f, 999, running).is_empty());
        assert!(
            to_kill(&f, 1_000, running).is_empty(),
            "at the deadline: not yet"
        );
        assert_eq!(to_kill(&f, 1_001, running), vec![100, 200]);
    }

    #[test]
    fn a_reused_pid_or_a_gone_process_is_left_alone() {
        let f = file(10, &[(100, 5), (200, 6), (300, 7)]);
        // 100 is another process now (a later start time), 200 is gone or
        // a zombie, 300 is still the job.
        let now = |p: i32| match p {
            100 => Some(9999),
            300 => Some(7),
            _ => None,
        };
        assert_eq!(to_kill(&f, 11, now), vec![300]);
    }

    #[test]
    fn stat_lines_give_state_and_start_time() {
        // A command name with spaces and parentheses.
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 98765)));
        assert_eq!(parse_stat("4242 (x) Z 1 2"), None, "too short");
        assert_eq!(parse_stat("garbage"), None);
        // This very process.
        let me = std::process::id() as i32;
        let st = proc_starttime(me).unwrap();
        let f = file(0, &[(me, st)]);
        assert_eq!(to_kill(&f, 1, proc_starttime), vec![me]);
    }

    #[test]
    fn the_file_is_replaced_whole_and_its_removal_reads_as_none() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let p = dir.join("node2.fence");
        assert!(read(&p).unwrap().is_none());
        let f = file(42, &[(1000, 1)]);
        write_atomic(&p, &f.render()).unwrap();
        assert_eq!(read(&p).unwrap(), Some(f));
        assert_eq!(pid_file(&p), dir.join("node2.watchdog.pid"));
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    }
}
