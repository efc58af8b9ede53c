//! The file work behind a manifest: hashing image files (many small ones
//! several at a time), flushing them, and writing files atomically.

use super::{io_err, ManifestError};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Image files can be gigabytes (memory pages), so they are hashed in chunks.
const HASH_BUF_BYTES: usize = 1024 * 1024;

/// Streams `dir/name` through BLAKE3. `lmeta` is the lstat result from the
/// directory scan; the opened file must be that same inode, so a file
/// swapped for a symlink after the scan is caught. Returns the open file so
/// the caller can fsync it without reopening.
pub(super) fn hash_file(
    dir: &Path,
    name: &str,
    lmeta: &Metadata,
) -> Result<(u64, [u8; 32], File), ManifestError> {
    let path = dir.join(name);
    let mut file = open_same(dir, name, lmeta)?;
    let mut hasher = blake3::Hasher::new();
    // Sized to the file: most image files are a few hundred bytes (one per
    // connection of an own-address job), and zeroing a 1 MiB buffer for
    // each of a thousand of them cost more than hashing them (the +1 lets
    // a file of exactly that size reach EOF in one read).
    let want = usize::try_from(lmeta.len())
        .unwrap_or(usize::MAX)
        .saturating_add(1)
        .clamp(4096, HASH_BUF_BYTES);
    let mut buf = vec![0u8; want];
    let mut total: u64 = 0;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hasher.finalize().into(), file))
}

/// A file's size and BLAKE3 digest, as read.
pub(super) type Digest = (u64, [u8; 32]);

/// Files that one hashing thread takes before more threads are worth it.
pub(super) const HASH_FILES_PER_THREAD: usize = 64;
/// Most threads hashing a directory's files at once.
pub(super) const HASH_THREADS: usize = 4;

/// [`hash_file`] of each file, in order, several files at a time when there
/// are many. Why: a job with its own address dumps one small
/// `tcp-stream-*.img` per connection, and at 1,000 connections hashing them
/// one after the other (open, read, close each) was ~17 ms of frozen time
/// when sealing and again when verifying. Files are handed out one by one
/// from a shared counter, so one large file does not hold up the rest.
pub(super) fn hash_files_parallel(
    dir: &Path,
    files: &[(&str, &Metadata)],
) -> Vec<Result<Digest, ManifestError>> {
    let one = |(name, meta): &(&str, &Metadata)| {
        hash_file(dir, name, meta).map(|(size, digest, _file)| (size, digest))
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(HASH_THREADS)
        .min(files.len() / HASH_FILES_PER_THREAD);
    if threads <= 1 {
        return files.iter().map(one).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<Result<Digest, ManifestError>>> =
        (0..files.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break };
                        mine.push((i, one(f)));
                    }
                    mine
                })
            })
            .collect();
        for w in workers {
            // A worker that panicked leaves its files as None, reported
            // below as an error rather than a missing digest.
            if let Ok(mine) = w.join() {
                for (i, r) in mine {
                    out[i] = Some(r);
                }
            }
        }
    });
    out.into_iter()
        .zip(files)
        .map(|(r, (name, _))| {
            r.unwrap_or_else(|| {
                Err(ManifestError::Io {
                    path: dir.join(name),
                    source: io::Error::other("a hashing thread panicked"),
                })
            })
        })
        .collect()
}

/// Open `dir/name`, insisting it is the regular file `lmeta` described.
pub(super) fn open_same(dir: &Path, name: &str, lmeta: &Metadata) -> Result<File, ManifestError> {
    let path = dir.join(name);
    let file = File::open(&path).map_err(io_err(&path))?;
    let fmeta = file.metadata().map_err(io_err(&path))?;
    if !fmeta.is_file() || !same_inode(lmeta, &fmeta) {
        return Err(ManifestError::NotRegularFile {
            name: name.to_string(),
        });
    }
    Ok(file)
}

pub(super) fn same_inode(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

pub(super) fn temp_path_for(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    Ok(path.with_file_name(tmp_name))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Threads that fsync a dump's files at once (see [`sync_all_parallel`]).
pub(super) const SYNC_THREADS: usize = 16;

/// fsync every file, several at a time. A dump can hold a thousand small
/// files (one `tcp-stream-*.img` per established connection of a job with
/// its own address), and one after the other each fsync waits for its own
/// device cache flush (and, on a journaling file system, its own commit):
/// 1,000 freshly written 300-byte files took 100-108 ms here one by one,
/// 25-29 ms from 16 threads (64 threads: 44-47 ms), because concurrent
/// flushes and commits are merged by the block layer and the journal.
/// `syncfs` would be faster still (3-5 ms) but waits for every dirty page of
/// the whole file system, other jobs' included: unbounded.
pub(super) fn sync_all_parallel(dir: &Path, names: Vec<&str>) -> Result<(), ManifestError> {
    let sync = |name: &str| {
        let path = dir.join(name);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(path))
    };
    if names.len() <= 1 {
        return names.into_iter().try_for_each(sync);
    }
    let threads = names.len().min(SYNC_THREADS);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<&str> = names.iter().skip(t).step_by(threads).copied().collect();
                s.spawn(move || mine.into_iter().try_for_each(sync))
            })
            .collect();
        let mut first = Ok(());
        for w in workers {
            let r = w.join().unwrap_or_else(|_| {
                Err(ManifestError::Io {
                    path: dir.to_path_buf(),
                    source: io::Error::other("an fsync thread panicked"),
                })
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

/// fsync a directory so that renames/creations inside it survive a crash.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replaces `path` with `bytes`: write a temp file (created with
/// `mode`, never wider) in the same directory, fsync it, rename it over
/// `path`, fsync the directory. Readers see either the old or the new file,
/// never a partial one, even across a crash.
///
/// The temp name is fixed (`.<name>.tmp`) rather than random so a crash
/// leaves at most one stale temp file, which the next call removes.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_file_atomic_with(path, bytes, mode, true)
}

/// [`write_file_atomic`], with the fsyncs only if `durable`: still atomic
/// for readers, but a crash may leave the old file.
pub(super) fn write_file_atomic_with(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durable: bool,
) -> io::Result<()> {
    let tmp = temp_path_for(path)?;
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let result = (|| {
        // create_new: never write through a pre-existing file or symlink
        // that someone planted at the temp name.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode passed to open is filtered by the umask; set it
        // explicitly so the result does not depend on the caller's umask.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        if durable {
            sync_dir(parent_dir(path))?;
        }
        Ok(())
    })();
    if result.is_err() {
        // Best effort: do not leave a half-written temp file behind.
        let _ = fs::remove_file(&tmp);
    }
    result
}
