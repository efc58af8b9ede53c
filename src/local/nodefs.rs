//! A node's own file system view, so that simulated nodes behave like
//! separate machines.
//!
//! Without this, every node of a local cluster sees the host's whole file
//! system: a job that writes `/tmp/x` on node1 finds the same `/tmp/x` after
//! a migration to node2, which no pair of real machines would give it, so
//! tests and demos passed that would fail on a real cluster. Each node's
//! agent therefore starts in a mount namespace of its own (everything it
//! starts, CRIU and jobs, inherits it), where per-node directories under
//! `<node state dir>/fs/` are bind-mounted over `/tmp`, `/var/tmp`, `/root`
//! (home) and `/run`. What nodes still have in common, as real machines do:
//! the read-only system directories and the rest of the host's tree (so the
//! binaries stay where they were built), the shared path and any `--common`
//! directory (bound back at the same path when they lie under a private
//! directory), and `/run/mosix` (cluster file, certificates, `mosrun`'s Unix
//! sockets: the host's tools must reach them at the same paths).
//!
//! CRIU is happy with this because the agent, CRIU and the job share one
//! mount namespace: it only refuses to dump a job whose mount namespace
//! differs from its own (ARCHITECTURE.md, "A job's processes").
//!
//! Propagation: the namespace's mounts are made slaves (`MS_REC|MS_SLAVE`)
//! before anything is mounted, so nothing leaks back to the host. Nothing is
//! persisted: the namespace lives as long as a process of the node does
//! (`local down` kills them all, which frees every mount of it), and
//! `restart-agent` enters the namespace of the agent it replaces (or of a
//! job still running there).

use anyhow::{bail, Context};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The node-private directories: (path, directory under `fs/`, mode).
/// `/run` comes last: the others' sources lie under it.
pub const PRIVATE: &[(&str, &str, u32)] = &[
    ("/tmp", "tmp", 0o1777),
    ("/var/tmp", "var-tmp", 0o1777),
    ("/root", "home", 0o700),
    ("/run", "run", 0o755),
];

/// Reachable from every node at the same path: the cluster's run dirs.
const RUN_MOSIX: &str = "/run/mosix";

/// Where node `node`'s private directories live on the host.
pub fn fs_dir(cluster: &str, node: &str) -> PathBuf {
    super::node_state_dir(cluster, node).join("fs")
}

/// One bind mount to make inside the new namespace.
#[derive(Debug)]
struct Bind {
    source: CString,
    target: CString,
    /// "bind /tmp/x on /tmp/x" as bytes, for the node's log on failure.
    what: Vec<u8>,
}

/// The mounts that make a node's view, prepared (directories created,
/// strings converted) before the fork, so that the child only makes
/// syscalls.
#[derive(Debug)]
pub struct Plan {
    binds: Vec<Bind>,
    /// Run inside the new namespace before the program (network mounts).
    mount_commands: Vec<Vec<String>>,
}

fn cstr(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("NUL in {}", p.display()))
}

fn bind(source: &Path, target: &Path) -> anyhow::Result<Bind> {
    Ok(Bind {
        source: cstr(source)?,
        target: cstr(target)?,
        what: format!(
            "mosix node setup: bind {} on {} failed: ",
            source.display(),
            target.display()
        )
        .into_bytes(),
    })
}

fn mkdir_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

/// What every node of a cluster shares, saved in the cluster's state dir
/// so that a node that lost all its processes can be rebuilt.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Shared {
    /// Host directories bound into every node at the same path (the shared
    /// root, `--common` dirs); absolute.
    pub bound: Vec<PathBuf>,
    /// Directories each node mounts itself over the network, with these
    /// commands (see `fileserver`); only their mount points are made here.
    pub network: Vec<PathBuf>,
    pub mount_commands: Vec<Vec<String>>,
}

/// Make node `node`'s private directories (kept across agent restarts) and
/// plan its mounts.
pub fn plan(cluster: &str, node: &str, shared: &Shared) -> anyhow::Result<Plan> {
    let mut p = plan_in(&fs_dir(cluster, node), &shared.bound, &shared.network)?;
    p.mount_commands = shared.mount_commands.clone();
    Ok(p)
}

/// Where `dir` is in the node's view, as a host path: under `fs` if it is
/// below a private directory (None if it is one), else itself.
fn in_view(fs: &Path, dir: &Path) -> anyhow::Result<Option<(PathBuf, bool)>> {
    if !dir.is_absolute() {
        bail!("shared directory {} must be absolute", dir.display());
    }
    if dir.starts_with(RUN_MOSIX) {
        return Ok(Some((dir.to_path_buf(), false)));
    }
    let Some((top, sub, _)) = PRIVATE.iter().find(|(d, _, _)| dir.starts_with(d)) else {
        return Ok(Some((dir.to_path_buf(), false)));
    };
    let rel = dir.strip_prefix(top).unwrap_or(dir);
    if rel.as_os_str().is_empty() {
        bail!(
            "{} cannot be shared between nodes: it is private to each node",
            dir.display()
        );
    }
    Ok(Some((fs.join(sub).join(rel), true)))
}

fn plan_in(fs: &Path, common: &[PathBuf], network: &[PathBuf]) -> anyhow::Result<Plan> {
    let mut binds = Vec::new();
    for (_, sub, mode) in PRIVATE {
        mkdir_mode(&fs.join(sub), *mode)?;
    }
    for n in network {
        if let Some((mp, _)) = in_view(fs, n)? {
            std::fs::create_dir_all(&mp).with_context(|| format!("creating {}", mp.display()))?;
        }
    }
    // Common dirs under a private one: bound into the node's copy of that
    // directory first, so the big bind below carries them along.
    for c in common {
        let Some((mp, true)) = in_view(fs, c)? else {
            continue;
        };
        std::fs::create_dir_all(&mp).with_context(|| format!("creating {}", mp.display()))?;
        binds.push(bind(c, &mp)?);
    }
    let run_mosix = fs.join("run").join("mosix");
    std::fs::create_dir_all(&run_mosix)
        .with_context(|| format!("creating {}", run_mosix.display()))?;
    binds.push(bind(Path::new(RUN_MOSIX), &run_mosix)?);
    // CRIU's kernel-feature cache: valid for this boot on the whole
    // machine; without it every node's first CRIU call redoes the checks.
    let kdat = Path::new("/run/criu.kdat");
    if kdat.is_file() {
        let _ = std::fs::copy(kdat, fs.join("run").join("criu.kdat"));
    }
    for (dir, sub, _) in PRIVATE {
        binds.push(bind(&fs.join(sub), Path::new(dir))?);
    }
    Ok(Plan {
        binds,
        mount_commands: Vec::new(),
    })
}

/// Tell the node's log (the child's stderr) what failed, with the errno,
/// without allocating (we are between fork and exec).
fn log_error(prefix: &[u8]) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    let mut code = e.raw_os_error().unwrap_or(0).unsigned_abs();
    let mut buf = [0u8; 16];
    let mut i = buf.len() - 1;
    buf[i] = b'\n';
    loop {
        i -= 1;
        buf[i] = b'0' + (code % 10) as u8;
        code /= 10;
        if code == 0 || i == 0 {
            break;
        }
    }
    // SAFETY: write(2) on the child's stderr of buffers we own.
    unsafe {
        libc::write(2, prefix.as_ptr().cast(), prefix.len());
        libc::write(2, b"errno ".as_ptr().cast(), 6);
        libc::write(2, buf[i..].as_ptr().cast(), buf.len() - i);
    }
    e
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Plan {
    /// The program to start: `cmd` itself, or a shell that first runs the
    /// network mounts inside the node's namespace and then execs `cmd`
    /// (same pid, so the agent's pid is still the one spawned).
    pub fn wrap(&self, cmd: &std::process::Command) -> Option<std::process::Command> {
        if self.mount_commands.is_empty() {
            return None;
        }
        let mut script: Vec<String> = self
            .mount_commands
            .iter()
            .map(|c| {
                let c = c
                    .iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ");
                // Once more after a pause: a mount can fail on a busy host.
                format!("{{ {c} || {{ sleep 2 && {c}; }}; }}")
            })
            .collect();
        script.push("exec \"$0\" \"$@\"".to_string());
        let mut w = std::process::Command::new("/bin/sh");
        w.arg("-c")
            .arg(script.join(" && "))
            .arg(cmd.get_program())
            .args(cmd.get_args());
        Some(w)
    }

    /// In a freshly forked child (`pre_exec`): a new mount namespace whose
    /// mounts are slaves of the host's, then the binds, then `/` as cwd
    /// (the old cwd may be hidden now).
    ///
    /// Only async-signal-safe syscalls, no allocation.
    pub fn apply_in_child(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls on NUL-terminated strings owned by `self`.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(log_error(
                    b"mosix node setup: unshare(CLONE_NEWNS) failed: ",
                ));
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(log_error(b"mosix node setup: making / a slave failed: "));
            }
            for b in &self.binds {
                if libc::mount(
                    b.source.as_ptr(),
                    b.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(log_error(&b.what));
                }
            }
            if libc::chdir(c"/".as_ptr()) != 0 {
                return Err(log_error(b"mosix node setup: chdir / failed: "));
            }
        }
        Ok(())
    }
}

/// The mount namespace of a process, if it differs from ours.
pub fn foreign_mnt_ns(pid: i32) -> Option<std::fs::File> {
    let ours = std::fs::metadata("/proc/self/ns/mnt").ok()?;
    let p = format!("/proc/{pid}/ns/mnt");
    let theirs = std::fs::metadata(&p).ok()?;
    use std::os::unix::fs::MetadataExt;
    if ours.ino() == theirs.ino() && ours.dev() == theirs.dev() {
        return None;
    }
    std::fs::File::open(p).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_binds_common_dirs_before_covering_their_parent() {
        let dir = tempfile::tempdir().unwrap();
        let fs = dir.path().join("fs");
        let p = plan_in(
            &fs,
            &[
                PathBuf::from("/tmp/mosix-x/root"),
                PathBuf::from("/work"),
                PathBuf::from("/run/mosix/c/jobs"),
            ],
            &[PathBuf::from("/tmp/over-net")],
        )
        .unwrap();
        assert!(fs.join("tmp/over-net").is_dir(), "mount point made");
        let pairs: Vec<(String, String)> = p
            .binds
            .iter()
            .map(|b| {
                (
                    b.source.to_string_lossy().into_owned(),
                    b.target.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let f = |s: &str| fs.join(s).display().to_string();
        let want = vec![
            ("/tmp/mosix-x/root".to_string(), f("tmp/mosix-x/root")),
            ("/run/mosix".into(), f("run/mosix")),
            (f("tmp"), "/tmp".into()),
            (f("var-tmp"), "/var/tmp".into()),
            (f("home"), "/root".into()),
            (f("run"), "/run".into()),
        ];
        assert_eq!(pairs, want);
        assert!(fs.join("tmp/mosix-x/root").is_dir());
        assert!(plan_in(&fs, &[PathBuf::from("/tmp")], &[]).is_err());
        assert!(plan_in(&fs, &[PathBuf::from("rel")], &[]).is_err());
        assert!(plan_in(&fs, &[], &[PathBuf::from("/run")]).is_err());
        assert!(p.wrap(&std::process::Command::new("x")).is_none());
    }

    #[test]
    fn wrap_runs_the_mounts_then_execs_the_program() {
        let p = Plan {
            binds: Vec::new(),
            mount_commands: vec![vec!["echo".into(), "it's".into()]],
        };
        let mut c = std::process::Command::new("echo");
        c.arg("a b");
        let out = p.wrap(&c).unwrap().output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's\na b\n");
    }
}
