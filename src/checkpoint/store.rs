//! The checkpoint directories of each job on the shared path: numbering,
//! the atomic rename into place, retention, metadata, staging a checkpoint
//! for a restore, and the restore lock. See the module doc of
//! [`crate::checkpoint`] for the layout.

use crate::core::JobId;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

pub const META_FILE: &str = "CHECKPOINT.json";
pub const TMP_PREFIX: &str = ".tmp-";
pub const RESTORE_LOCK: &str = "RESTORE.lock";
/// Version of [`Meta`]'s format.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("job {0} has no checkpoint")]
    NoCheckpoint(String),
    #[error("job {job} has no checkpoint {seq} (it has: {have})")]
    Missing { job: String, seq: u64, have: String },
    #[error("checkpoint I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint metadata {path} is unreadable: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("another restore of job {job} is under way ({owner}); if that node died mid-restore, remove {path}")]
    RestoreUnderWay {
        job: String,
        owner: String,
        path: PathBuf,
    },
}

impl CheckpointError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }
}

/// `CHECKPOINT.json`: what a checkpoint holds besides CRIU's images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub job: String,
    pub seq: u64,
    /// The node the job ran on when it was taken.
    pub node: String,
    pub taken_unix_ms: u64,
    /// How long CRIU had the job frozen (dump and output copies).
    pub frozen_ms: u64,
    /// "full …" or "incremental" (see [`super::full_mode`]).
    pub mode: String,
    pub outputs: Vec<OutputFile>,
}

/// One output file of the job, copied at the dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// The path the job had open (as the agent sees it; CRIU reopens it by
    /// this path).
    pub path: String,
    /// Its size at the dump, and the name of the copy in the checkpoint.
    pub size: u64,
    pub copy: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The checkpoints of every job under one shared root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(shared_root: &Path) -> Self {
        Self {
            root: shared_root.join("checkpoints"),
        }
    }

    pub fn job_dir(&self, job: &JobId) -> PathBuf {
        // JobId is validated: no '/', no "..".
        self.root.join(job.as_str())
    }

    pub fn dir(&self, job: &JobId, seq: u64) -> PathBuf {
        self.job_dir(job).join(seq.to_string())
    }

    /// Complete checkpoints of `job`, oldest first.
    pub fn list(&self, job: &JobId) -> Result<Vec<u64>, CheckpointError> {
        let dir = self.job_dir(job);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CheckpointError::io(&dir, e)),
        };
        let mut seqs: Vec<u64> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                // Canonical decimal only ("007" is nobody's name).
                let n: u64 = name.parse().ok()?;
                (n > 0 && n.to_string() == name && e.path().is_dir()).then_some(n)
            })
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// The checkpoint `seq`, or the latest when None.
    pub fn find(&self, job: &JobId, seq: Option<u64>) -> Result<u64, CheckpointError> {
        let have = self.list(job)?;
        match seq {
            None => have
                .last()
                .copied()
                .ok_or_else(|| CheckpointError::NoCheckpoint(job.to_string())),
            Some(s) if have.contains(&s) => Ok(s),
            Some(s) if have.is_empty() => Err(CheckpointError::Missing {
                job: job.to_string(),
                seq: s,
                have: "none".into(),
            }),
            Some(s) => Err(CheckpointError::Missing {
                job: job.to_string(),
                seq: s,
                have: have
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The number of the next checkpoint: above every one on disk and
    /// above `floor` (the record's latest), so a number is never reused.
    pub fn next_seq(&self, job: &JobId, floor: u64) -> Result<u64, CheckpointError> {
        let top = self.list(job)?.last().copied().unwrap_or(0);
        Ok(top.max(floor) + 1)
    }

    /// A fresh temporary directory for checkpoint `seq`. Leftovers of
    /// earlier attempts (an agent that died mid-checkpoint) are removed
    /// first: only the job's node checkpoints it, one at a time.
    pub fn begin(&self, job: &JobId, seq: u64, tag: &str) -> Result<PathBuf, CheckpointError> {
        let jd = self.job_dir(job);
        fs::create_dir_all(&jd).map_err(|e| CheckpointError::io(&jd, e))?;
        self.remove_temporaries(job);
        let tmp = jd.join(format!("{TMP_PREFIX}{seq}-{tag}"));
        fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
        Ok(tmp)
    }

    pub fn remove_temporaries(&self, job: &JobId) {
        if let Ok(rd) = fs::read_dir(self.job_dir(job)) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Put a complete, sealed checkpoint in place: one rename, so readers
    /// see the previous latest or this one, never half of it.
    pub fn commit(
        &self,
        job: &JobId,
        tmp: &Path,
        seq: u64,
        fsync: bool,
    ) -> Result<PathBuf, CheckpointError> {
        let dst = self.dir(job, seq);
        fs::rename(tmp, &dst).map_err(|e| CheckpointError::io(&dst, e))?;
        if fsync {
            if let Ok(d) = fs::File::open(self.job_dir(job)) {
                let _ = d.sync_all();
            }
        }
        Ok(dst)
    }

    /// Keep the newest `keep` checkpoints (at least 1); returns the removed.
    pub fn prune(&self, job: &JobId, keep: u32) -> Vec<u64> {
        let Ok(have) = self.list(job) else {
            return Vec::new();
        };
        let keep = keep.max(1) as usize;
        let drop_n = have.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for &s in &have[..drop_n] {
            if fs::remove_dir_all(self.dir(job, s)).is_ok() {
                removed.push(s);
            }
        }
        removed
    }

    pub fn write_meta(dir: &Path, meta: &Meta) -> Result<(), CheckpointError> {
        let path = dir.join(META_FILE);
        let json = serde_json::to_vec_pretty(meta).map_err(|e| CheckpointError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        fs::write(&path, json).map_err(|e| CheckpointError::io(&path, e))
    }

    pub fn read_meta(dir: &Path) -> Result<Meta, CheckpointError> {
        let path = dir.join(META_FILE);
        let bytes = fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let m: Meta = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if m.format != FORMAT {
            return Err(CheckpointError::Corrupt {
                path,
                why: format!("format {} (this agent reads {FORMAT})", m.format),
            });
        }
        Ok(m)
    }

    /// Make a restore's own copy of checkpoint `from` in `to` (a fresh
    /// image directory): hard links, so a GiB costs nothing, and the
    /// checkpoint itself stays untouched (the claim and CRIU's restore log
    /// go into `to`), ready for another restore. Plain files only; logs
    /// are left out. A copy where links are not possible.
    pub fn stage(from: &Path, to: &Path, skip: &[&str]) -> Result<(), CheckpointError> {
        fs::create_dir_all(to).map_err(|e| CheckpointError::io(to, e))?;
        let rd = fs::read_dir(from).map_err(|e| CheckpointError::io(from, e))?;
        for e in rd {
            let e = e.map_err(|e| CheckpointError::io(from, e))?;
            let name = e.file_name();
            if skip.iter().any(|s| name.to_string_lossy() == *s) {
                continue;
            }
            let src = e.path();
            // A link or a directory is nothing a checkpoint holds: leave
            // it for the manifest check to refuse.
            let ft = e.file_type().map_err(|e| CheckpointError::io(&src, e))?;
            let dst = to.join(&name);
            if !ft.is_file() {
                continue;
            }
            if fs::hard_link(&src, &dst).is_err() {
                fs::copy(&src, &dst).map_err(|e| CheckpointError::io(&dst, e))?;
            }
        }
        Ok(())
    }

    /// One restore of `job` at a time, cluster-wide: an `O_EXCL` file
    /// (atomic on local file systems and NFSv3+), removed when the guard
    /// drops.
    pub fn lock_restore(&self, job: &JobId, owner: &str) -> Result<RestoreLock, CheckpointError> {
        let jd = self.job_dir(job);
        fs::create_dir_all(&jd).map_err(|e| CheckpointError::io(&jd, e))?;
        let path = jd.join(RESTORE_LOCK);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                use std::io::Write;
                let _ = writeln!(f, "{owner}");
                Ok(RestoreLock { path })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = fs::read_to_string(&path).unwrap_or_default();
                Err(CheckpointError::RestoreUnderWay {
                    job: job.to_string(),
                    owner: owner.trim().to_string(),
                    path,
                })
            }
            Err(e) => Err(CheckpointError::io(&path, e)),
        }
    }
}

/// See [`Store::lock_restore`].
pub struct RestoreLock {
    path: PathBuf,
}

impl Drop for RestoreLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobId {
        JobId::parse("j1").unwrap()
    }

    #[test]
    fn numbering_commit_and_retention() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path());
        assert!(matches!(
            s.find(&job(), None),
            Err(CheckpointError::NoCheckpoint(_))
        ));
        for _ in 0..5 {
            let seq = s.next_seq(&job(), 0).unwrap();
            let tmp = s.begin(&job(), seq, "x").unwrap();
            fs::write(tmp.join("a.img"), b"x").unwrap();
            // A half-written one is never listed.
            assert!(!s.list(&job()).unwrap().contains(&seq));
            s.commit(&job(), &tmp, seq, false).unwrap();
            s.prune(&job(), 3);
        }
        assert_eq!(s.list(&job()).unwrap(), vec![3, 4, 5]);
        assert_eq!(s.find(&job(), None).unwrap(), 5);
        assert_eq!(s.find(&job(), Some(4)).unwrap(), 4);
        let e = s.find(&job(), Some(1)).unwrap_err().to_string();
        assert!(
            e.contains("no checkpoint 1") && e.contains("3, 4, 5"),
            "{e}"
        );
        // Numbers are never reused, even below the record's latest.
        assert_eq!(s.next_seq(&job(), 9).unwrap(), 10);
        // A stale temporary is cleared by the next begin.
        let stale = s.begin(&job(), 6, "old").unwrap();
        s.begin(&job(), 6, "new").unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn the_restore_lock_is_exclusive_and_released() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::new(t.path());
        let l = s.lock_restore(&job(), "node2").unwrap();
        let e = s.lock_restore(&job(), "node3").err().unwrap().to_string();
        assert!(e.contains("node2") && e.contains("under way"), "{e}");
        drop(l);
        s.lock_restore(&job(), "node3").unwrap();
    }

    #[test]
    fn staging_links_files_and_skips_logs() {
        let t = tempfile::tempdir().unwrap();
        let from = t.path().join("c");
        fs::create_dir(&from).unwrap();
        fs::write(from.join("pages-1.img"), b"p").unwrap();
        fs::write(from.join("dump.log"), b"l").unwrap();
        let to = t.path().join("s");
        Store::stage(&from, &to, &["dump.log"]).unwrap();
        assert_eq!(fs::read(to.join("pages-1.img")).unwrap(), b"p");
        assert!(!to.join("dump.log").exists());
    }
}
