//! CRIU's kernel-feature cache ("kdat"), kept by the agent.
//!
//! **Why.** Every `criu dump` and `criu restore` starts by probing the
//! kernel (`kerndat_init`: userfaultfd, memfd, mount ids, netlink, vDSO …).
//! Measured here, that costs about 35 ms per call, paid twice per migration.
//! CRIU caches the result in `/run/criu.kdat`, but it *writes* that file only
//! when `/run` is a tmpfs (so a reboot, which may bring another kernel,
//! clears it). On a machine whose `/run` is an ordinary directory — this
//! one, where PID 1 is not systemd — CRIU probes afresh every time.
//!
//! CRIU *reads* the cache from any file system. So the agent makes the
//! file itself: it runs `criu check` in a private mount namespace with a
//! tmpfs on `/run` (there CRIU writes the cache), copies the bytes out and
//! puts them at `/run/criu.kdat` in its own view. Beside it, a stamp
//! ([`STAMP_NAME`]) records what the cache is valid for: the boot (kernel boot
//! id), the kernel release and the CRIU binary (size and mtime). At every
//! agent start the stamp is compared, and the cache made again when any of
//! them changed — the refresh CRIU gets from a tmpfs, done explicitly.
//! CRIU guards itself as well: a cache from another CRIU build has another
//! magic, and CRIU throws it away (and then probes, as without a cache).
//!
//! On a local cluster each node's `/run` is private (`local::nodefs`), so
//! the cache lives beside that node's agent only. Where `/run` is a tmpfs
//! (any systemd host, where the packaged `mosixd.service` runs) CRIU keeps
//! the cache itself and the agent leaves it alone.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where CRIU (built with its default `RUNDIR`, as `make setup` builds it)
/// looks for the cache: [`CACHE_NAME`] in this directory.
pub const RUN_DIR: &str = "/run";
/// The cache's file name (CRIU's `KERNDAT_CACHE_NAME`).
pub const CACHE_NAME: &str = "criu.kdat";
/// Beside the cache: what it was made for (see the module doc).
pub const STAMP_NAME: &str = "criu.kdat.mosix";

/// What [`ensure`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KdatCache {
    /// `/run` is a tmpfs: CRIU keeps its cache there itself.
    CriuKeepsIt,
    /// The cache on disk was made for this boot, kernel and CRIU.
    Kept,
    /// The cache was (re)made now; the string says why.
    Made(String),
}

/// Make sure CRIU at `criu` finds a valid kernel-feature cache in `run`
/// (normally `/run`). Blocking: runs `criu check` once when the cache must
/// be made (a few hundred ms).
pub fn ensure(criu: &Path) -> Result<KdatCache, String> {
    ensure_in(criu, Path::new(RUN_DIR), &current_stamp(criu)?)
}

fn ensure_in(criu: &Path, run: &Path, stamp: &str) -> Result<KdatCache, String> {
    if is_tmpfs(run) {
        return Ok(KdatCache::CriuKeepsIt);
    }
    let cache = run.join(CACHE_NAME);
    let stamp_file = run.join(STAMP_NAME);
    let why = match std::fs::read_to_string(&stamp_file) {
        Ok(old) if old == stamp && cache.metadata().is_ok_and(|m| m.len() > 0) => {
            return Ok(KdatCache::Kept)
        }
        Ok(old) if old == stamp => "the cache file is missing".to_string(),
        Ok(_) => "the boot, the kernel or CRIU changed".to_string(),
        Err(_) => "there was none".to_string(),
    };
    let bytes = probe(criu)?;
    write_atomic(&cache, &bytes)?;
    write_atomic(&stamp_file, stamp.as_bytes())?;
    Ok(KdatCache::Made(why))
}

/// This boot, this kernel, this CRIU binary.
fn current_stamp(criu: &Path) -> Result<String, String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| format!("cannot read the boot id: {e}"))?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("cannot read the kernel release: {e}"))?;
    let m = std::fs::metadata(criu).map_err(|e| format!("{}: {e}", criu.display()))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!(
        "boot {}\nkernel {}\ncriu {} {} bytes, mtime {mtime}\n",
        boot.trim(),
        release.trim(),
        criu.display(),
        m.len()
    ))
}

fn is_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Run `criu check` where `/run` is a fresh tmpfs, and return the cache it
/// wrote there.
fn probe(criu: &Path) -> Result<Vec<u8>, String> {
    // Prepared before the fork: the child may only make raw syscalls.
    let (root, run, tmpfs) = (c("/")?, c(RUN_DIR)?, c("tmpfs")?);
    let opts = c("mode=0700")?;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "\"$0\" check >/dev/null 2>&1; exec cat {RUN_DIR}/{CACHE_NAME}"
        ))
        .arg(criu)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: unshare(2) and mount(2) on data prepared above; no
    // allocation or lock between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing mounted here may reach the agent's namespace.
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                tmpfs.as_ptr(),
                run.as_ptr(),
                tmpfs.as_ptr(),
                0,
                opts.as_ptr().cast(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {} check in a private /run: {e}", criu.display()))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(format!(
            "{} check left no kernel-feature cache in a private tmpfs /run",
            criu.display()
        ));
    }
    Ok(out.stdout)
}

fn c(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|e| e.to_string())
}

/// Write `path` whole or not at all (CRIU may read it at any moment).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = PathBuf::from(format!("{}.tmp.{}", path.display(), std::process::id()));
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    r.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for CRIU running `script`.
    fn fake_criu(dir: &Path, script: &str) -> PathBuf {
        let p = dir.join("criu");
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p
    }

    /// One whose `check` writes a cache into /run, as CRIU does on a tmpfs.
    fn caching_criu(dir: &Path, payload: &str) -> PathBuf {
        fake_criu(
            dir,
            &format!("[ \"$1\" = check ] && printf '{payload}' > /run/{CACHE_NAME}"),
        )
    }

    /// A scratch directory and the `run` directory in it; None (with a
    /// SKIP line) without root, which the probe's mount namespace needs.
    fn scratch() -> Option<(tempfile::TempDir, PathBuf)> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (a private mount namespace)");
            return None;
        }
        // Under target/, not /tmp: a tmpfs /tmp would look like a /run
        // where CRIU keeps the cache itself, and the test would skip.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        Some((dir, run))
    }

    #[test]
    fn made_once_kept_while_the_stamp_holds_and_remade_when_it_changes() {
        let Some((dir, run)) = scratch() else { return };
        if is_tmpfs(&run) {
            eprintln!("SKIP: the temporary directory is on a tmpfs");
            return;
        }
        let criu = caching_criu(dir.path(), "KDAT1");
        let r = ensure_in(&criu, &run, "boot a\n").unwrap();
        assert!(matches!(r, KdatCache::Made(_)), "{r:?}");
        assert_eq!(std::fs::read(run.join(CACHE_NAME)).unwrap(), b"KDAT1");
        assert_eq!(ensure_in(&criu, &run, "boot a\n").unwrap(), KdatCache::Kept);
        // Another boot (or kernel, or CRIU): made again.
        let criu = caching_criu(dir.path(), "KDAT2");
        let r = ensure_in(&criu, &run, "boot b\n").unwrap();
        assert_eq!(
            r,
            KdatCache::Made("the boot, the kernel or CRIU changed".into())
        );
        assert_eq!(std::fs::read(run.join(CACHE_NAME)).unwrap(), b"KDAT2");
        // CRIU threw the cache away (another build's): made again.
        std::fs::remove_file(run.join(CACHE_NAME)).unwrap();
        let r = ensure_in(&criu, &run, "boot b\n").unwrap();
        assert_eq!(r, KdatCache::Made("the cache file is missing".into()));
        // The agent's own /run was never touched by the probe's tmpfs.
        assert!(!is_tmpfs(&run));
    }

    #[test]
    fn a_criu_that_writes_no_cache_is_an_error_and_leaves_nothing() {
        let Some((dir, run)) = scratch() else { return };
        let criu = fake_criu(dir.path(), "exit 1");
        let e = ensure_in(&criu, &run, "boot a\n").unwrap_err();
        assert!(e.contains("left no kernel-feature cache"), "{e}");
        assert!(!run.join(CACHE_NAME).exists());
        assert!(!run.join(STAMP_NAME).exists());
    }

    #[test]
    fn the_stamp_names_boot_kernel_and_binary() {
        let dir = tempfile::tempdir().unwrap();
        let criu = caching_criu(dir.path(), "x");
        let s = current_stamp(&criu).unwrap();
        assert!(s.starts_with("boot ") && s.contains("\nkernel ") && s.contains("bytes, mtime"));
        assert!(current_stamp(&dir.path().join("missing")).is_err());
    }
}
