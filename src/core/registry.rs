//! The job registry on the shared path (or, without one, each node's own
//! registry of the jobs that run on it; see `agent::direct`).
//!
//! Layout: `<shared>/registry/jobs/<job-id>.json`, one file per job, each a
//! serde_json [`JobRecord`]. One file per job means agents on different nodes
//! never contend for one file; the node a job runs on is its only writer,
//! except while a migration hands it over (see ARCHITECTURE.md).
//!
//! Writes are atomic: the record goes to a temporary file in the same
//! directory, is fsynced, renamed over the old one, and the directory is
//! fsynced. A reader therefore sees the old or the new record, never half.
//! The fsyncs (not the atomicity) can be turned off with
//! [`Registry::with_fsync`]: the agent does so when its images are not
//! fsynced either (`--image-sync close`), since a record that survives a
//! crash is no use without the images it points to.

use super::ids::JobId;
use super::job::JobRecord;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("job {0} not found in the registry")]
    NotFound(JobId),
    #[error("registry I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The writer is fenced (its etcd lease lapsed; see `coord`): the write
    /// was not made.
    #[error("registry write for job {0} refused: this node is fenced (its etcd lease could not be renewed in time)")]
    Fenced(JobId),
}

impl RegistryError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        RegistryError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    /// True when the disk is full, so callers can map it to RESOURCE_EXHAUSTED.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, RegistryError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }
}

/// Largest record we accept; anything bigger is not ours.
const MAX_RECORD_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
    fsync: bool,
    gate: WriteGate,
}

/// Whether writes may be committed now: set once by an agent that holds an
/// etcd lease (see `coord::lease`), shared by every clone of the registry.
/// Unset: always open (no etcd).
#[derive(Clone, Default)]
pub struct WriteGate(std::sync::Arc<std::sync::OnceLock<GateFn>>);

pub type GateFn = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for WriteGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "WriteGate(set)"
        } else {
            "WriteGate(open)"
        })
    }
}

impl WriteGate {
    pub fn set(&self, open: GateFn) {
        let _ = self.0.set(open);
    }
    pub fn is_open(&self) -> bool {
        self.0.get().is_none_or(|f| f())
    }
}

impl Registry {
    pub fn open(shared_root: &Path) -> Result<Self, RegistryError> {
        let dir = shared_root.join("registry").join("jobs");
        fs::create_dir_all(&dir).map_err(|e| RegistryError::io(&dir, e))?;
        Ok(Self {
            dir,
            fsync: true,
            gate: WriteGate::default(),
        })
    }

    /// Whether writes are fsynced (the default) or only atomic.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    fn path(&self, id: &JobId) -> PathBuf {
        // JobId is validated: no '/', no "..", so this stays inside `dir`.
        self.dir.join(format!("{id}.json"))
    }

    pub fn get(&self, id: &JobId) -> Result<JobRecord, RegistryError> {
        let path = self.path(id);
        match read_capped(&path) {
            Ok(bytes) => parse_record(&path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(RegistryError::NotFound(id.clone()))
            }
            Err(e) => Err(RegistryError::io(&path, e)),
        }
    }

    pub fn exists(&self, id: &JobId) -> bool {
        self.path(id).exists()
    }

    /// The gate every write of this registry (and its clones) passes.
    pub fn gate(&self) -> &WriteGate {
        &self.gate
    }

    /// Write a record atomically, bumping its generation. Refused while the
    /// gate is closed (a fenced node).
    pub fn put(&self, record: &mut JobRecord) -> Result<(), RegistryError> {
        if !self.gate.is_open() {
            return Err(RegistryError::Fenced(record.id.clone()));
        }
        record.generation += 1;
        let path = self.path(&record.id);
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| RegistryError::Corrupt {
            path: path.clone(),
            source: e,
        })?;
        write_atomic_with(&path, &bytes, self.fsync).map_err(|e| RegistryError::io(&path, e))
    }

    /// Delete a job's record (a job that moved to a node with a registry of
    /// its own takes its record along; see `agent::direct`). Absent is ok.
    pub fn remove(&self, id: &JobId) -> Result<(), RegistryError> {
        if !self.gate.is_open() {
            return Err(RegistryError::Fenced(id.clone()));
        }
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(RegistryError::io(&path, e)),
        }
        if !self.fsync {
            return Ok(());
        }
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| RegistryError::io(&self.dir, e))
    }

    /// Every parseable record. Corrupt files are skipped and reported in the
    /// second list so one bad file cannot hide the whole cluster.
    pub fn list(&self) -> Result<(Vec<JobRecord>, Vec<RegistryError>), RegistryError> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(|e| RegistryError::io(&self.dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| RegistryError::io(&self.dir, e))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // Temporary files of in-flight writes start with '.'.
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            match read_capped(&path) {
                Ok(bytes) => match parse_record(&path, &bytes) {
                    Ok(r) => out.push(r),
                    Err(e) => bad.push(e),
                },
                // Removed between readdir and open: not an error.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bad.push(RegistryError::io(&path, e)),
            }
        }
        out.sort_by(|a, b| {
            a.created_unix_ms
                .cmp(&b.created_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok((out, bad))
    }
}

fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "record larger than 4 MiB",
        ));
    }
    Ok(buf)
}

/// Parse a registry record; exposed for fuzzing/property tests.
pub fn parse_record(path: &Path, bytes: &[u8]) -> Result<JobRecord, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, bytes, true)
}

/// [`write_atomic`], with the fsyncs only if `fsync`.
pub fn write_atomic_with(path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("record");
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if fsync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if fsync {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::{JobState, NodeName};

    pub(crate) fn sample(id: &str) -> JobRecord {
        JobRecord {
            id: JobId::parse(id).unwrap(),
            name: String::new(),
            node: NodeName::parse("node1").unwrap(),
            state: JobState::Running,
            pid: 42,
            argv: vec!["sleep".into(), "1".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            stdout_path: "/tmp/o".into(),
            stderr_path: "/tmp/e".into(),
            created_unix_ms: 1,
            arrived_unix_ms: 1,
            exit_code: None,
            exit_signal: None,
            history: vec![],
            pending: None,
            pinned: false,
            non_migratable: false,
            error: String::new(),
            generation: 0,
            service: None,
            checkpoint: None,
            net: None,
        }
    }

    #[test]
    fn put_get_list_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let mut r = sample("j1");
        reg.put(&mut r).unwrap();
        assert_eq!(r.generation, 1);
        let got = reg.get(&r.id).unwrap();
        assert_eq!(got, r);
        let (all, bad) = reg.list().unwrap();
        assert_eq!(all.len(), 1);
        assert!(bad.is_empty());
        assert!(matches!(
            reg.get(&JobId::parse("j2").unwrap()),
            Err(RegistryError::NotFound(_))
        ));
        reg.remove(&r.id).unwrap();
        assert!(!reg.exists(&r.id));
        reg.remove(&r.id).unwrap();
    }

    #[test]
    fn corrupt_record_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let mut r = sample("j1");
        reg.put(&mut r).unwrap();
        fs::write(dir.path().join("registry/jobs/j2.json"), b"{not json").unwrap();
        let (all, bad) = reg.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(matches!(
            reg.get(&JobId::parse("j2").unwrap()),
            Err(RegistryError::Corrupt { .. })
        ));
    }

    #[test]
    fn parse_never_panics_on_mutations() {
        let base = serde_json::to_vec(&sample("j1")).unwrap();
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            let mut b = base.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % b.len();
                b[i] = (seed >> 32) as u8;
            }
            let _ = parse_record(Path::new("x"), &b);
        }
        // A traversal id inside an otherwise valid record is refused.
        let evil = String::from_utf8(base)
            .unwrap()
            .replace("\"j1\"", "\"../x\"");
        assert!(parse_record(Path::new("x"), evil.as_bytes()).is_err());
    }
}
