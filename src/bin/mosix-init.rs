//! `mosix-init`: the init of every job's PID namespace.
//!
//! CRIU must give the namespace's init a /proc of its own namespace while it
//! dumps it; with the host's mount namespace that means mounting one, which
//! needs root and a writable working directory of its own. So the agent
//! starts this small root init, in the job's private directory on the shared
//! path, and it runs the user's command as the user's uid/gid:
//!
//!   mosix-init UID GID CWD -- CMD ARGS...
//!
//! It forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2/SIGQUIT to the command
//! (a namespace init would otherwise ignore them), reaps orphans like any
//! init, and exits with the command's exit code (128+N if a signal killed it).

use std::ffi::CString;

static mut CHILD: libc::pid_t = 0;

extern "C" fn forward(sig: libc::c_int) {
    // SAFETY: kill is async-signal-safe; CHILD is written once before handlers run.
    unsafe {
        let c = CHILD;
        if c > 0 {
            libc::kill(c, sig);
        }
    }
}

fn die(msg: &str) -> ! {
    eprintln!("mosix-init: {msg}");
    std::process::exit(127)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sep = args
        .iter()
        .position(|a| a == "--")
        .unwrap_or_else(|| die("usage: mosix-init UID GID CWD -- CMD ARGS..."));
    if sep != 4 || args.len() <= 5 {
        die("usage: mosix-init UID GID CWD -- CMD ARGS...");
    }
    let uid: u32 = args[1].parse().unwrap_or_else(|_| die("bad uid"));
    let gid: u32 = args[2].parse().unwrap_or_else(|_| die("bad gid"));
    let cwd = CString::new(args[3].as_bytes()).unwrap_or_else(|_| die("bad cwd"));
    let argv: Vec<CString> = args[5..]
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| die("NUL in argument")))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());

    // The agent is multi-threaded: an fd of another operation may have
    // leaked in between clone and exec. A job must hold nothing but its
    // stdio, or CRIU would find pipes and sockets it cannot move.
    // SAFETY: close_range has no memory-safety preconditions.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // SAFETY: plain fork/exec in a single-threaded process.
    let child = unsafe { libc::fork() };
    if child < 0 {
        die("fork failed");
    }
    if child == 0 {
        unsafe {
            if (uid != 0 || gid != 0)
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                die("cannot switch user");
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                die(&format!("cannot chdir to {}", args[3]));
            }
            libc::execvp(ptrs[0], ptrs.as_ptr());
        }
        die(&format!(
            "cannot exec {}: {}",
            args[5],
            std::io::Error::last_os_error()
        ));
    }
    unsafe {
        CHILD = child;
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGQUIT,
        ] {
            libc::signal(sig, forward as *const () as libc::sighandler_t);
        }
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            std::process::exit(127);
        }
        if pid == child {
            if libc::WIFEXITED(status) {
                std::process::exit(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                std::process::exit(128 + libc::WTERMSIG(status));
            }
        }
    }
}
