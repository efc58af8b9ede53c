//! The job's output files in a checkpoint: found in /proc while the job is
//! frozen, copied into the checkpoint, written back before a restore. Why a
//! copy and not a truncation: see the module doc of [`crate::checkpoint`].

use super::store::OutputFile;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Regular files that some process of the tree rooted at `root` has open
/// for writing: `(the /proc/<pid>/fd/<n> link to read it through, its
/// path)`, one per file (the first fd seen).
pub fn open_for_writing(root: i32) -> Vec<(String, String)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for pid in crate::core::procfs::tree_pids(root) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let n = fd.file_name().to_string_lossy().into_owned();
            let link = format!("/proc/{pid}/fd/{n}");
            let Ok(target) = fs::read_link(&link) else {
                continue;
            };
            let path = target.to_string_lossy().into_owned();
            // Pipes, sockets, anonymous inodes, deleted files: not files
            // anyone can put back by path.
            if !path.starts_with('/') || path.ends_with(" (deleted)") {
                continue;
            }
            if !fs::metadata(&link).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let writable = fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}"))
                .ok()
                .and_then(|s| flags_of_fdinfo(&s))
                .is_some_and(|f| f & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32);
            if writable && seen.insert(path.clone()) {
                out.push((link, path));
            }
        }
    }
    out
}

/// The `flags:` line of `/proc/<pid>/fdinfo/<fd>` (octal).
pub fn flags_of_fdinfo(s: &str) -> Option<u32> {
    s.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

/// Copy every output file of the (frozen) tree into `dir` as
/// `output-<i>.data`. Called at CRIU's post-dump step.
pub fn capture(root: i32, dir: &Path) -> io::Result<Vec<OutputFile>> {
    let mut files = Vec::new();
    for (i, (link, path)) in open_for_writing(root).into_iter().enumerate() {
        let copy = format!("output-{i}.data");
        let meta = fs::metadata(&link)?;
        let size = fs::copy(&link, dir.join(&copy))
            .map_err(|e| io::Error::new(e.kind(), format!("copying output file {path}: {e}")))?;
        files.push(OutputFile {
            path,
            size,
            copy,
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.permissions().mode() & 0o7777,
        });
    }
    Ok(files)
}

/// Write each copy back over its file (creating it, with its owner and
/// mode, if it is gone), so that the files are exactly as they were at the
/// dump when CRIU reopens them.
pub fn put_back(dir: &Path, files: &[OutputFile]) -> io::Result<()> {
    for f in files {
        // The name comes from sealed metadata, but stay inside `dir` anyway.
        if f.copy.contains('/') || f.copy.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad output copy name {:?}", f.copy),
            ));
        }
        let mut src = fs::File::open(dir.join(&f.copy))?;
        let existed = Path::new(&f.path).exists();
        if let Some(parent) = Path::new(&f.path).parent() {
            fs::create_dir_all(parent)?;
        }
        let mut dst = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(f.mode)
            .open(&f.path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.path)))?;
        let n = io::copy(&mut src, &mut dst)
            .map_err(|e| io::Error::new(e.kind(), format!("writing back {}: {e}", f.path)))?;
        if n != f.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: copy holds {n} bytes, {} recorded", f.path, f.size),
            ));
        }
        dst.sync_all()?;
        if !existed {
            let _ = std::os::unix::fs::chown(&f.path, Some(f.uid), Some(f.gid));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn fdinfo_flags_are_octal() {
        assert_eq!(
            flags_of_fdinfo("pos:\t0\nflags:\t0102001\nmnt_id:\t1\n"),
            Some(0o102001)
        );
        assert_eq!(flags_of_fdinfo("pos: 0\n"), None);
    }

    #[test]
    fn our_own_writable_file_is_found_and_put_back() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("out.txt");
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"tick 1\ntick 2\n").unwrap();
        let _ro = fs::File::open(&path).unwrap();
        let me = std::process::id() as i32;
        let found = open_for_writing(me);
        let p = path.to_string_lossy().into_owned();
        assert_eq!(
            found.iter().filter(|(_, x)| *x == p).count(),
            1,
            "{found:?}"
        );
        let ck = t.path().join("ck");
        fs::create_dir(&ck).unwrap();
        let files: Vec<_> = capture(me, &ck)
            .unwrap()
            .into_iter()
            .filter(|o| o.path == p)
            .collect();
        assert_eq!(files[0].size, 14);
        // The job went on writing (and the node died): put back.
        f.write_all(b"tick 3\n").unwrap();
        put_back(&ck, &files).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "tick 1\ntick 2\n");
        // Gone altogether: recreated.
        fs::remove_file(&path).unwrap();
        put_back(&ck, &files).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "tick 1\ntick 2\n");
    }
}
