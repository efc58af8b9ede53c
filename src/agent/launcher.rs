//! Launching a job so that CRIU can move it anywhere.
//!
//! The job's first process is created with `clone(CLONE_NEWPID)` straight from
//! the agent, so it is (a) the init of its own PID namespace — CRIU then
//! restores the same in-namespace pids on any node without clashing with the
//! target's pids — and (b) a direct child of the agent, which can `waitpid` it.
//! Inside, it calls `setsid()` so the session leader is inside the namespace
//! (CRIU refuses a session leader outside it). It keeps the agent's mount and
//! network namespaces: a job that shares the host's mount namespace dumps
//! cleanly, and the agent already lives in its node's network namespace.
//!
//! Between clone and exec the child only makes async-signal-safe calls on
//! data prepared beforehand, because the agent is multi-threaded.

use nix::sched::CloneFlags;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// The job's init (`mosix-init`) and the private directory it runs in.
    /// None runs the command itself as the namespace's init (tests only:
    /// CRIU cannot dump such a job if it is unprivileged).
    pub init: Option<(PathBuf, PathBuf)>,
    /// The job's nice value ([`crate::core::job_nice`]): the agent itself
    /// runs at a higher priority, which the job must not inherit.
    pub nice: i32,
    /// The job's stdin (a foreground job's pipe); None is /dev/null. The
    /// caller keeps it open until `launch` returns.
    pub stdin: Option<std::os::fd::RawFd>,
    /// The caller's umask (None: the agent's).
    pub umask: Option<u32>,
    /// Clone the job into a new, empty network namespace too
    /// (`CLONE_NEWNET`); it waits before exec until [`launch_then`]'s
    /// `setup` has given it an interface (see [`super::jobnet`]).
    pub own_netns: bool,
    /// An open `cgroup.procs` of the node's jobs group
    /// ([`crate::core::cgroup`]): the child joins it before it execs, so
    /// nothing of the job ever runs beside the agent. None: the agent's
    /// cgroup. The caller keeps it open until `launch` returns.
    pub cgroup_procs: Option<std::os::fd::RawFd>,
}

/// `mosix-init`, next to the running binary.
pub fn default_init() -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.parent()?.join("mosix-init");
    p.is_file().then_some(p)
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("empty command")]
    EmptyCommand,
    #[error("argument or environment contains a NUL byte")]
    Nul,
    #[error("command {0:?} not found in PATH")]
    NotFound(String),
    #[error("{0}: not an executable file")]
    NotExecutable(String),
    #[error("working directory {0}: {1}")]
    Cwd(PathBuf, std::io::Error),
    #[error("cannot open output file {0}: {1}")]
    Output(PathBuf, std::io::Error),
    #[error("clone(CLONE_NEWPID) failed: {0} (the agent must run as root)")]
    Clone(nix::Error),
    #[error("exec of {0:?} failed: {1}")]
    Exec(String, std::io::Error),
    #[error("launch pipe: {0}")]
    Pipe(std::io::Error),
    #[error("{0}")]
    Network(String),
    #[error("joining the node's jobs cgroup: {0}")]
    Cgroup(std::io::Error),
}

/// The executable for `cmd`, as a shell in `cwd` would find it: a path
/// with a '/' as given, relative ones (and relative PATH entries) against
/// the job's working directory, never the agent's (which is not the
/// caller's, e.g. `/` for an agent behind the sshfs mount wrapper).
fn resolve(cmd: &str, path_var: &str, cwd: &Path) -> Option<PathBuf> {
    if cmd.contains('/') {
        return Some(cwd.join(cmd));
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| cwd.join(d).join(cmd))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn open_output(path: &Path, uid: u32, gid: u32) -> Result<OwnedFd, LaunchError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| LaunchError::Output(path.to_path_buf(), e))?;
    // The job writes its own output; it must own the file after a uid switch.
    let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
    Ok(f.into())
}

/// Start the job; returns its host pid. Exec errors are reported back through
/// a close-on-exec pipe, so "command not found" is an error here, not a job
/// that dies at once.
pub fn launch(spec: &LaunchSpec) -> Result<i32, LaunchError> {
    launch_then(spec, &|_| Ok(()))
}

/// [`launch`], calling `setup(pid)` after the clone and before the job may
/// exec (with [`LaunchSpec::own_netns`], the job waits for it). A failed
/// setup kills the child and fails the launch.
pub fn launch_then(
    spec: &LaunchSpec,
    setup: &dyn Fn(i32) -> Result<(), String>,
) -> Result<i32, LaunchError> {
    let first = spec.argv.first().ok_or(LaunchError::EmptyCommand)?;
    let path_var = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let exe =
        resolve(first, path_var, &spec.cwd).ok_or_else(|| LaunchError::NotFound(first.clone()))?;
    // A path given with a '/' is not checked by `resolve`: tell "no such
    // file" (a shell's 127) from "not executable" (126) here, because past
    // this point `mosix-init` can only report a failed exec as 127.
    match std::fs::metadata(&exe) {
        Err(_) => return Err(LaunchError::NotFound(first.clone())),
        Ok(m) => {
            use std::os::unix::fs::PermissionsExt;
            if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
                return Err(LaunchError::NotExecutable(first.clone()));
            }
        }
    }
    if !spec.cwd.is_dir() {
        return Err(LaunchError::Cwd(
            spec.cwd.clone(),
            std::io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }

    // With an init, the namespace's pid 1 is `mosix-init UID GID CWD -- CMD`,
    // running as root in the job's private directory; it switches user.
    let (exe, argv, cwd, uid, gid) = match &spec.init {
        Some((init, dir)) => {
            let mut a = vec![
                init.to_string_lossy().into_owned(),
                spec.uid.to_string(),
                spec.gid.to_string(),
                spec.cwd.to_string_lossy().into_owned(),
                "--".to_string(),
                exe.to_string_lossy().into_owned(),
            ];
            a.extend(spec.argv.iter().skip(1).cloned());
            (init.clone(), a, dir.clone(), 0, 0)
        }
        None => (exe, spec.argv.clone(), spec.cwd.clone(), spec.uid, spec.gid),
    };
    let c_exe = CString::new(exe.as_os_str().as_bytes()).map_err(|_| LaunchError::Nul)?;
    let c_argv: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| LaunchError::Nul)?;
    let c_env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .map_err(|_| LaunchError::Nul)?;
    let c_cwd = CString::new(cwd.as_os_str().as_bytes()).map_err(|_| LaunchError::Nul)?;
    let mut argv_ptrs: Vec<*const libc::c_char> = c_argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    let devnull = std::fs::File::open("/dev/null").map_err(LaunchError::Pipe)?;
    let out = open_output(&spec.stdout, spec.uid, spec.gid)?;
    let err = open_output(&spec.stderr, spec.uid, spec.gid)?;
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| LaunchError::Pipe(e.into()))?;
    // The parent's go-ahead after `setup` (a byte, or EOF: give up).
    let (go_rd, go_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| LaunchError::Pipe(e.into()))?;
    let (fd_go, fd_go_wr, wait_go) = (go_rd.as_raw_fd(), go_wr.as_raw_fd(), spec.own_netns);

    let umask = spec.umask.map(|m| (m & 0o777) as libc::mode_t);
    let (fd_in, fd_out, fd_err, fd_wr) = (
        spec.stdin.unwrap_or(devnull.as_raw_fd()),
        out.as_raw_fd(),
        err.as_raw_fd(),
        wr.as_raw_fd(),
    );
    let switch_user = unsafe { libc::geteuid() } == 0 && (uid != 0 || gid != 0);
    let nice = spec.nice;
    let cgroup_procs = spec.cgroup_procs;

    let child = Box::new(move || -> isize {
        // SAFETY: only async-signal-safe libc calls on memory prepared above.
        unsafe {
            let fail = |step: i32| -> isize {
                let code = *libc::__errno_location();
                let word = [step, code];
                libc::write(fd_wr, word.as_ptr().cast(), std::mem::size_of_val(&word));
                libc::_exit(127)
            };
            if wait_go {
                libc::close(fd_go_wr);
                let mut b = 0u8;
                if libc::read(fd_go, (&mut b as *mut u8).cast(), 1) != 1 {
                    libc::_exit(126);
                }
            }
            // "0" is the writer itself; its threads and every later child
            // follow it. Before the user switch: it needs root.
            if let Some(fd) = cgroup_procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return fail(6);
                }
            }
            if libc::setsid() < 0 {
                return fail(1);
            }
            // Lowering one's own priority needs no privilege.
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Rust ignores SIGPIPE; an exec'd job must get the default back.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if let Some(m) = umask {
                libc::umask(m);
            }
            if libc::dup2(fd_in, 0) < 0 || libc::dup2(fd_out, 1) < 0 || libc::dup2(fd_err, 2) < 0 {
                return fail(2);
            }
            if switch_user {
                if libc::setgroups(0, std::ptr::null()) < 0 || libc::setgid(gid) < 0 {
                    return fail(3);
                }
                if libc::setuid(uid) < 0 {
                    return fail(3);
                }
            }
            if libc::chdir(c_cwd.as_ptr()) < 0 {
                return fail(4);
            }
            libc::execve(c_exe.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr());
            fail(5)
        }
    });

    let mut stack = vec![0u8; 256 * 1024];
    // SAFETY: the child gets a copy of our memory (no CLONE_VM) and only runs
    // the closure above, which execs or _exits.
    let pid = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            if spec.own_netns {
                CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNET
            } else {
                CloneFlags::CLONE_NEWPID
            },
            Some(libc::SIGCHLD),
        )
    }
    .map_err(LaunchError::Clone)?;
    drop(wr);
    drop(go_rd);
    if let Err(why) = setup(pid.as_raw()) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(LaunchError::Network(why));
    }
    if spec.own_netns {
        let _ = nix::unistd::write(&go_wr, &[1u8]);
    }
    drop(go_wr);

    let mut word = [0i32; 2];
    let n = nix::unistd::read(&rd, bytemuck_slice(&mut word)).unwrap_or(0);
    if n == std::mem::size_of_val(&word) {
        // The child failed before exec and has exited: reap it here.
        let _ = nix::sys::wait::waitpid(pid, None);
        let io = std::io::Error::from_raw_os_error(word[1]);
        let what = match word[0] {
            4 => return Err(LaunchError::Cwd(spec.cwd.clone(), io)),
            6 => return Err(LaunchError::Cgroup(io)),
            3 => format!("{first} (switching to uid {uid} gid {gid})"),
            _ => first.clone(),
        };
        return Err(LaunchError::Exec(what, io));
    }
    Ok(pid.as_raw())
}

fn bytemuck_slice(words: &mut [i32; 2]) -> &mut [u8] {
    // SAFETY: [i32; 2] is 8 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), 8) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_finds_sh_and_not_junk() {
        let root = Path::new("/");
        assert!(resolve("sh", "/usr/bin:/bin", root).is_some());
        assert!(resolve("definitely-not-a-command-xyz", "/usr/bin:/bin", root).is_none());
        assert_eq!(resolve("/bin/sh", "", root), Some(PathBuf::from("/bin/sh")));
        // Relative to the job's directory, not this process's.
        assert_eq!(
            resolve("./bin/sh", "", Path::new("/usr")),
            Some(PathBuf::from("/usr/./bin/sh"))
        );
        assert!(resolve("sh", "bin", Path::new("/usr")).is_some());
    }

    #[test]
    fn empty_command_is_refused() {
        let spec = LaunchSpec {
            argv: vec![],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            stdout: "/dev/null".into(),
            stderr: "/dev/null".into(),
            init: None,
            nice: 0,
            stdin: None,
            umask: None,
            own_netns: false,
            cgroup_procs: None,
        };
        assert!(matches!(launch(&spec), Err(LaunchError::EmptyCommand)));
    }
}
