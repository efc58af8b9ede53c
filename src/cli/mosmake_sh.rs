//! `mosmake-sh`: the SHELL that `mosmake` gives make (see [`crate::mosmake`]).
//!
//! Called as `mosmake-sh FLAGS… LINE` (make: `-c LINE`). It decides where the
//! line runs and then *replaces itself* (exec) with the real shell, or with
//! `mosrun … -- <real shell> FLAGS… LINE`: no process of ours stays between
//! make and the command, so make sees the command's own exit status and
//! signals. It starts no runtime and reads no cluster file: make calls it for
//! every line, so it must cost about as much as starting a shell.

use crate::mosmake::classify::{classify, Decision};
use crate::mosmake::{ENV_CC, ENV_LOG, ENV_RUN, ENV_SHELL};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;

const DEFAULT_SHELL: &str = "/bin/sh";

/// The line to decide on: the word after the first flag word holding `c`
/// (`-c`, `-ec`, `-e -c` …). None: not a `-c` call (a script or an
/// interactive shell), which always runs locally.
fn command_line(args: &[String]) -> Option<&str> {
    let i = args
        .iter()
        .position(|a| a.starts_with('-') && !a.starts_with("--") && a[1..].contains('c'))?;
    args.get(i + 1).map(String::as_str)
}

/// Append `R` or `L` for mosmake's summary. A failure to log must not fail
/// the build, so it is ignored.
fn log_decision(d: Decision) {
    let Some(path) = std::env::var_os(ENV_LOG) else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(if d == Decision::Remote {
            b"R\n"
        } else {
            b"L\n"
        });
    }
}

/// Point stdin at /dev/null: a remote compile reads no input (a line that
/// does is a probe and stays local), and make may have given this job its
/// own terminal stdin, which mosrun would otherwise keep reading from.
fn stdin_from_dev_null() {
    if let Ok(f) = std::fs::File::open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 0 of this single-threaded process, right
        // before exec; `f` is open for the call.
        unsafe { libc::dup2(f.as_raw_fd(), 0) };
    }
}

/// Run as `mosmake-sh`; returns only when exec failed (the exit status).
pub fn run(args: Vec<String>) -> i32 {
    let shell = std::env::var(ENV_SHELL).unwrap_or_else(|_| DEFAULT_SHELL.to_string());
    let run: Vec<String> = std::env::var(ENV_RUN)
        .unwrap_or_default()
        .split('\n')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let decision = match (command_line(&args), run.is_empty()) {
        (Some(line), false) => {
            let extra: Vec<String> = std::env::var(ENV_CC)
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect();
            classify(line, &extra)
        }
        _ => Decision::Local,
    };
    log_decision(decision);
    let err = match decision {
        Decision::Local => Command::new(&shell).args(&args).exec(),
        Decision::Remote => {
            stdin_from_dev_null();
            let mut c = Command::new(&run[0]);
            c.args(&run[1..]).arg(&shell).args(&args);
            c.exec()
        }
    };
    let prog: OsString = match decision {
        Decision::Local => shell.into(),
        Decision::Remote => run[0].clone().into(),
    };
    eprintln!("mosmake-sh: cannot run {}: {err}", prog.to_string_lossy());
    127
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_the_line_after_the_c_flag() {
        assert_eq!(command_line(&v(&["-c", "cc -c a.c"])), Some("cc -c a.c"));
        assert_eq!(command_line(&v(&["-ec", "x"])), Some("x"));
        assert_eq!(command_line(&v(&["-e", "-c", "x", "arg0"])), Some("x"));
        assert_eq!(command_line(&v(&["script.sh"])), None);
        assert_eq!(command_line(&v(&["-c"])), None);
        assert_eq!(command_line(&v(&["--norc"])), None);
    }
}
