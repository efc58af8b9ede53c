//! `mosmake [make args…]`: run GNU make with its compile jobs on the best
//! nodes (the design is in [`crate::mosmake`]). Every argument goes to make;
//! mosmake's own knobs are environment variables.
//!
//! Exit status: make's (or 128+N if make died of signal N); 2 when mosmake
//! itself cannot start the build (no make, no mosrun, no cluster to ask for
//! `-j`), like make's own usage errors.

use crate::mosmake::args::{take_shell_override, user_sets_jobs};
use crate::mosmake::stats::Summary;
use crate::mosmake::{DEFAULT_RUN, ENV_CC, ENV_LOG, ENV_RUN, ENV_RUN_STATS, ENV_SHELL};
use anyhow::{bail, Context};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

/// make's pid, for the signal handler (0: not started yet).
static MAKE_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = MAKE_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// SIGINT/SIGTERM/SIGHUP to mosmake go to make, which stops its jobs (each
/// `mosrun` passes them on to its job) and exits; mosmake then reports and
/// exits with make's status. A terminal's Ctrl-C reaches make directly too;
/// a second copy is harmless.
fn install_signal_forwarding() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a plain C handler that only loads an atomic and calls kill.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// `prog` as a path: as given if it has a `/`, else a sibling of this
/// executable (the build's own binaries go together), else from `PATH`.
fn resolve_program(prog: &str, prefer_sibling: bool) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return is_executable(&p).then_some(p);
    }
    if prefer_sibling {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            let p = dir.join(prog);
            if is_executable(&p) {
                return Some(p);
            }
        }
    }
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(prog))
                .find(|p| is_executable(p))
        })
        .unwrap_or(None)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The cluster's total slots, from `mosctl slots --total`.
fn cluster_slots() -> anyhow::Result<u32> {
    let mosctl = resolve_program("mosctl", true).context("cannot find mosctl")?;
    let out = Command::new(&mosctl)
        .args(["slots", "--total"])
        .output()
        .with_context(|| format!("running {}", mosctl.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`mosctl slots --total` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let n: u32 = text
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .with_context(|| format!("`mosctl slots --total` printed no number: {text:?}"))?;
    if n == 0 {
        bail!("the cluster has no free slots (no node is up?)");
    }
    Ok(n)
}

/// A fresh file in the temp dir, created exclusively (never someone else's).
fn scratch_file(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir();
    for i in 0..100u32 {
        let p = dir.join(format!("mosmake-{}-{i}.{what}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }
    bail!("cannot create a scratch file in {}", dir.display())
}

/// Removes mosmake's scratch files however the run ends.
struct Scratch(Vec<PathBuf>);
impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The targets whose recipes go through `mosmake-sh` unless
/// `MOSMAKE_TARGETS` says otherwise: objects, the only place compiles are
/// (see [`crate::mosmake`] for why not every recipe).
pub const DEFAULT_TARGETS: &str = "%.o";

/// make's arguments that hook `mosmake-sh` in: for each target pattern of
/// `targets` (default [`DEFAULT_TARGETS`]) a pattern-specific
/// `SHELL` (`--eval`, which make passes on to every sub-make); `all` makes it
/// every recipe's and every `$(shell …)`'s shell (`SHELL=` on the command
/// line). A user's own `SHELL=` stays the shell of everything else.
pub fn hook_args(
    sh: &Path,
    targets: Option<&str>,
    user_shell: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    // Make expands `$` in the value: a literal one is written `$$`.
    let sh = sh.to_string_lossy().replace('$', "$$");
    if sh.chars().any(char::is_whitespace) {
        bail!("mosmake-sh's path {sh:?} contains white space, which make cannot take as a SHELL");
    }
    let targets = targets
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or(DEFAULT_TARGETS);
    if targets == "all" {
        return Ok(vec![format!("SHELL={sh}")]);
    }
    let mut out = Vec::new();
    for pat in targets.split_whitespace() {
        if pat.contains([':', '=', '#', ';']) {
            bail!("MOSMAKE_TARGETS: {pat:?} is not a target pattern (e.g. %.o)");
        }
        // `override`: a SHELL= on make's command line would otherwise win.
        out.push(format!("--eval={pat}: override SHELL := {sh}"));
    }
    if let Some(u) = user_shell {
        out.push(format!("SHELL={u}"));
    }
    Ok(out)
}

/// Run mosmake; returns the exit status to leave with.
pub fn run(mut args: Vec<String>) -> anyhow::Result<i32> {
    let sh = resolve_program("mosmake-sh", true)
        .context("cannot find mosmake-sh (it is installed next to mosmake)")?;
    let run_spec = std::env::var("MOSMAKE_RUN").unwrap_or_else(|_| DEFAULT_RUN.to_string());
    let mut run: Vec<String> = run_spec.split_whitespace().map(String::from).collect();
    if run.is_empty() {
        bail!("MOSMAKE_RUN is empty; it is the command that runs a compile remotely (default: {DEFAULT_RUN})");
    }
    let runner = resolve_program(&run[0], run[0] == "mosrun")
        .with_context(|| format!("cannot find {:?} (MOSMAKE_RUN={run_spec:?})", run[0]))?;
    run[0] = runner.to_string_lossy().into_owned();
    let make_name = std::env::var("MOSMAKE_MAKE").unwrap_or_else(|_| "make".to_string());
    let make = resolve_program(&make_name, false).with_context(|| {
        format!("cannot find {make_name:?} (install GNU make, or set MOSMAKE_MAKE)")
    })?;
    let user_shell = take_shell_override(&mut args);
    let shell = user_shell.clone().unwrap_or_else(|| "/bin/sh".to_string());
    let hook = hook_args(
        &sh,
        std::env::var("MOSMAKE_TARGETS").ok().as_deref(),
        user_shell.as_deref(),
    )?;

    let jobs_flag = if user_sets_jobs(&args, std::env::var("MAKEFLAGS").ok().as_deref()) {
        "-j as given".to_string()
    } else {
        let n = cluster_slots().context(
            "choosing -j from the cluster's slots (is the cluster up? MOSIX_CLUSTER names its file; or give -j N)",
        )?;
        eprintln!("mosmake: -j{n} (the cluster's total slots)");
        args.insert(0, format!("-j{n}"));
        format!("-j{n}")
    };

    let mut scratch = Scratch(Vec::new());
    let log = scratch_file("decisions")?;
    scratch.0.push(log.clone());
    let stats = match std::env::var_os("MOSMAKE_STATS") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = scratch_file("stats")?;
            scratch.0.push(p.clone());
            p
        }
    };
    // Lines from an earlier run in a kept stats file are not this run's.
    let stats_start = std::fs::metadata(&stats).map(|m| m.len()).unwrap_or(0);

    install_signal_forwarding();
    let started = Instant::now();
    let mut child = Command::new(&make)
        .args(&args)
        .args(&hook)
        .env(ENV_SHELL, &shell)
        .env(ENV_RUN, run.join("\n"))
        .env(ENV_LOG, &log)
        .env(ENV_CC, std::env::var("MOSMAKE_CC").unwrap_or_default())
        .env(ENV_RUN_STATS, &stats)
        .spawn()
        .with_context(|| format!("starting {}", make.display()))?;
    MAKE_PID.store(child.id() as i32, Ordering::SeqCst);
    let status = child.wait().context("waiting for make")?;
    MAKE_PID.store(0, Ordering::SeqCst);

    let text = std::fs::read(&stats)
        .map(|b| String::from_utf8_lossy(&b[(stats_start as usize).min(b.len())..]).into_owned())
        .unwrap_or_default();
    let mut summary = Summary::from_text(&text);
    summary.add_decisions(&std::fs::read_to_string(&log).unwrap_or_default());
    summary.makespan_s = started.elapsed().as_secs_f64();
    summary.jobs_flag = jobs_flag;
    eprint!("{}", summary.render());
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_get_the_hook_and_everything_else_keeps_the_shell() {
        let sh = Path::new("/usr/lib/mosix/mosmake-sh");
        assert_eq!(
            hook_args(sh, None, None).unwrap(),
            ["--eval=%.o: override SHELL := /usr/lib/mosix/mosmake-sh"]
        );
        assert_eq!(
            hook_args(sh, Some("%.o %.lo"), Some("/bin/bash")).unwrap(),
            [
                "--eval=%.o: override SHELL := /usr/lib/mosix/mosmake-sh",
                "--eval=%.lo: override SHELL := /usr/lib/mosix/mosmake-sh",
                "SHELL=/bin/bash"
            ]
        );
        assert_eq!(
            hook_args(sh, Some(" all "), None).unwrap(),
            ["SHELL=/usr/lib/mosix/mosmake-sh"]
        );
        let e = hook_args(sh, Some("%.o: x"), None).unwrap_err();
        assert!(e.to_string().contains("not a target pattern"), "{e}");
        assert!(hook_args(Path::new("/a b/mosmake-sh"), None, None).is_err());
        assert_eq!(
            hook_args(Path::new("/x$y/sh"), Some("%.o"), None).unwrap(),
            ["--eval=%.o: override SHELL := /x$$y/sh"]
        );
    }
}
