//! Hash image files while CRIU is still writing them.
//!
//! Sealing a 1 GiB dump after CRIU returns means reading the whole page file
//! again and flushing it to disk, all while the job is stopped. CRIU writes
//! memory pages sequentially and single-threaded, so a second thread can
//! follow each page file as it grows: hash the new bytes and start their
//! write-back (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). When CRIU is done,
//! only the tail is left to hash and only a little to flush.
//!
//! The result is a set of [`Precomputed`] digests that
//! [`super::manifest::write_manifest_with`] uses only if each file is still
//! the same inode with the same size. If CRIU ever rewrote bytes behind the
//! follower, the digest would be wrong and the target's verification would
//! refuse the images: a failed migration that rolls back, never a corrupt
//! restore.

use super::manifest::Precomputed;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// CRIU names memory images `pages-<n>.img`; those are the big ones. Takes
/// a plain name or a manifest's relative name (`pre-1/pages-1.img`, a
/// pre-copy round's pages), judged by its last component.
pub fn is_page_image(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.starts_with("pages-") && base.ends_with(".img")
}

const CHUNK: usize = 1 << 20;
/// Start write-back every this many bytes hashed.
const WRITEBACK_EVERY: u64 = 16 << 20;

struct Followed {
    file: File,
    dev: u64,
    ino: u64,
    hasher: blake3::Hasher,
    offset: u64,
    flushed: u64,
    writeback: bool,
}

impl Followed {
    /// Hash whatever was appended since the last call; true if it made progress.
    fn advance(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let mut progressed = false;
        loop {
            let n = match self.file.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.hasher.update(&buf[..n]);
            self.offset += n as u64;
            progressed = true;
            if self.writeback && self.offset - self.flushed >= WRITEBACK_EVERY {
                // Only starts write-back; the final fsync in the manifest
                // writer waits for it. Failure just means less head start.
                // SAFETY: plain syscall on an fd we own.
                unsafe {
                    libc::sync_file_range(
                        self.file.as_raw_fd(),
                        self.flushed as libc::off64_t,
                        (self.offset - self.flushed) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
                self.flushed = self.offset;
            }
        }
        Ok(progressed)
    }
}

/// A thread hashing the page images in one directory as they grow.
pub struct FollowHasher {
    stop: Arc<AtomicBool>,
    /// The thread's kernel tid (0 until it has started).
    tid: Arc<std::sync::atomic::AtomicI32>,
    thread: Option<std::thread::JoinHandle<BTreeMap<String, Precomputed>>>,
}

impl FollowHasher {
    /// Start following `dir`; with `writeback`, also start flushing what
    /// was hashed (for a manifest written with fsync). If the thread cannot
    /// be started, the result is simply empty and the manifest writer
    /// hashes everything itself.
    pub fn start(dir: &Path, writeback: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let (d, s, t) = (dir.to_path_buf(), stop.clone(), tid.clone());
        let thread = std::thread::Builder::new()
            .name("seal-follow".into())
            .spawn(move || {
                // Only on CPU time the dump leaves over: on a small node,
                // hashing beside CRIU slowed its page writing ~3x (measured
                // at 64 MiB on 2 cores). `finish` raises it back, so the
                // tail is hashed at full speed.
                t.store(crate::core::current_tid(), Ordering::Release);
                crate::core::set_thread_idle(0, true);
                if s.load(Ordering::Acquire) {
                    // `finish` came before the tid was known to it.
                    crate::core::set_thread_idle(0, false);
                }
                follow(d, s, writeback)
            })
            .ok();
        Self { stop, tid, thread }
    }

    /// The writer is done: hash the tails and return the digests.
    pub fn finish(mut self) -> BTreeMap<String, Precomputed> {
        self.stop.store(true, Ordering::Release);
        let tid = self.tid.load(Ordering::Acquire);
        if tid > 0 {
            // Waited on from now: no longer idle (see `start`), and at the
            // priority of the rest of the migration: the job is frozen
            // until this returns, and on a crowded node a follower at the
            // jobs' priority was measured taking 60-80 ms for a 300 KiB tail.
            crate::core::set_thread_idle(tid, false);
            crate::core::set_nice(tid, crate::core::MIGRATION_NICE);
        }
        self.thread
            .take()
            .and_then(|t| {
                // Wake it from its pause now rather than when it ends:
                // the job is frozen until this returns.
                t.thread().unpark();
                t.join().ok()
            })
            .unwrap_or_default()
    }
}

impl Drop for FollowHasher {
    fn drop(&mut self) {
        // An abandoned follower (dump failed) must not spin forever.
        self.stop.store(true, Ordering::Release);
    }
}

fn follow(dir: PathBuf, stop: Arc<AtomicBool>, writeback: bool) -> BTreeMap<String, Precomputed> {
    let mut files: BTreeMap<String, Followed> = BTreeMap::new();
    let mut broken: Vec<String> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Read the flag before the pass: a pass that starts after the writer
        // finished sees every byte, so it can be the last.
        let last = stop.load(Ordering::Acquire);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let Ok(name) = e.file_name().into_string() else {
                    continue;
                };
                if !is_page_image(&name) || files.contains_key(&name) || broken.contains(&name) {
                    continue;
                }
                let opened = File::open(e.path()).and_then(|f| {
                    let m = f.metadata()?;
                    Ok((f, m))
                });
                if let Ok((file, m)) = opened {
                    if m.is_file() {
                        files.insert(
                            name,
                            Followed {
                                file,
                                dev: m.dev(),
                                ino: m.ino(),
                                hasher: blake3::Hasher::new(),
                                offset: 0,
                                flushed: 0,
                                writeback,
                            },
                        );
                    }
                }
            }
        }
        let mut progressed = false;
        let names: Vec<String> = files.keys().cloned().collect();
        for name in names {
            let ok = match files.get_mut(&name) {
                Some(f) => f.advance(&mut buf),
                None => continue,
            };
            match ok {
                Ok(p) => progressed |= p,
                Err(_) => {
                    // Leave this one to the manifest writer.
                    files.remove(&name);
                    broken.push(name);
                }
            }
        }
        if last {
            break;
        }
        if !progressed {
            // Woken early by `finish`.
            std::thread::park_timeout(Duration::from_millis(2));
        }
    }
    files
        .into_iter()
        .map(|(name, f)| {
            (
                name,
                Precomputed {
                    dev: f.dev,
                    ino: f.ino,
                    size: f.offset,
                    blake3: f.hasher.finalize().into(),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn digest_of_a_growing_file_matches_a_hash_of_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = FollowHasher::start(dir.path(), true);
        let mut w = File::create(dir.path().join("pages-1.img")).unwrap();
        let mut expected = blake3::Hasher::new();
        for i in 0..40u8 {
            let chunk = vec![i; 300_000];
            w.write_all(&chunk).unwrap();
            expected.update(&chunk);
            if i % 8 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        std::fs::write(dir.path().join("core-1.img"), b"not followed").unwrap();
        drop(w);
        let got = f.finish();
        assert_eq!(got.len(), 1, "only page images: {:?}", got.keys());
        let p = &got["pages-1.img"];
        assert_eq!(p.size, 40 * 300_000);
        assert_eq!(p.blake3, <[u8; 32]>::from(expected.finalize()));
    }

    #[test]
    fn a_file_rewritten_behind_the_follower_is_not_trusted_by_the_manifest() {
        use crate::security::manifest::{verify_manifest, write_manifest_with, ClusterKey};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        std::fs::write(&path, vec![1u8; 100_000]).unwrap();
        let f = FollowHasher::start(dir.path(), false);
        std::thread::sleep(Duration::from_millis(50));
        // Same size and inode, different content: the follower's digest is
        // stale, so the manifest is wrong and verification must refuse it.
        let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all(&[2u8; 10]).unwrap();
        drop(w);
        let pre = f.finish();
        let key = ClusterKey::generate();
        write_manifest_with(dir.path(), &key, "j1", "m1", &[], &pre, false).unwrap();
        assert!(verify_manifest(dir.path(), &key, "j1", &[]).is_err());
    }
}
