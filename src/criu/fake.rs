//! A fake [`CheckpointEngine`] for unit tests of the migration protocol: it
//! writes a marker "image", "restores" by spawning `sleep`, and fails on
//! command so every failure branch can be exercised without root or CRIU.
//!
//! Pre-copy: [`FakeEngine::pre_dump_script`] scripts the bytes each round
//! reports (or a failure), so tests can drive the round loop through every
//! stop rule; rounds and the final dump lay out their directories and
//! `parent` links the way CRIU does, and a restore follows the chain, so the
//! sealing and verification of chains run for real.

use super::{
    CheckpointEngine, CriuError, DumpSpec, Features, PreDumpSpec, RestoreOutcome, RestoreSpec,
};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The page image a fake dump writes, and in how many 4 KiB pieces.
pub const FAKE_PAGES: &str = "pages-1.img";
pub const FAKE_PAGE_PIECES: usize = 16;

/// What one scripted pre-dump round does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeRound {
    /// Succeed, reporting this many bytes of pages written.
    Bytes(u64),
    /// Fail like CRIU would (the job keeps running).
    Fail,
}

#[derive(Default)]
pub struct FakeEngine {
    /// Fail the next N dumps.
    pub fail_dumps: AtomicU32,
    /// Fail the next N restores.
    pub fail_restores: AtomicU32,
    pub dumps: AtomicU32,
    pub restores: AtomicU32,
    pub children: Mutex<Vec<std::process::Child>>,
    /// What `features()` reports.
    pub features: Mutex<Features>,
    /// Pre-dump rounds, in order; when empty, a round reports 0 bytes.
    pub pre_dump_script: Mutex<VecDeque<FakeRound>>,
    /// Pre-dump calls made (failed ones included).
    pub pre_dumps: AtomicU32,
    /// The `prev_images_dir` of every dump, in order.
    pub dump_parents: Mutex<Vec<Option<String>>>,
}

impl FakeEngine {
    /// An engine whose kernel tracks dirty memory, with scripted rounds.
    pub fn with_pre_copy(rounds: &[FakeRound]) -> Self {
        let e = Self::default();
        if let Ok(mut f) = e.features.lock() {
            f.mem_dirty_track = true;
        }
        if let Ok(mut s) = e.pre_dump_script.lock() {
            s.extend(rounds.iter().copied());
        }
        e
    }

    /// Like CRIU, refuse to work on a process that is not there.
    fn alive(op: &'static str, pid: i32) -> Result<(), CriuError> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).map_err(|e| {
            CriuError::Failed {
                op,
                detail: format!("no process {pid}: {e}"),
            }
        })
    }

    /// Like CRIU with `--prev-images-dir`: link `dir/parent` to it.
    fn link_parent(op: &'static str, dir: &Path, prev: &Option<String>) -> Result<(), CriuError> {
        if let Some(prev) = prev {
            if !dir.join(prev).is_dir() {
                return Err(CriuError::Failed {
                    op,
                    detail: format!("Invalid parent image directory provided: {prev}"),
                });
            }
            std::os::unix::fs::symlink(prev, dir.join("parent"))
                .map_err(|e| CriuError::Io { op, source: e })?;
        }
        Ok(())
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        if let Ok(mut kids) = self.children.lock() {
            for c in kids.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl CheckpointEngine for FakeEngine {
    fn dump(&self, spec: &DumpSpec) -> Result<(), CriuError> {
        if Self::take(&self.fail_dumps) {
            return Err(CriuError::Failed {
                op: "dump",
                detail: "injected dump failure".into(),
            });
        }
        Self::alive("dump", spec.pid)?;
        if spec.page_socket.is_some() {
            return Err(CriuError::Failed {
                op: "dump",
                detail: "the fake CRIU has no page server to send pages to".into(),
            });
        }
        self.dumps.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut p) = self.dump_parents.lock() {
            p.push(spec.prev_images_dir.clone());
        }
        Self::link_parent("dump", &spec.image_dir, &spec.prev_images_dir)?;
        std::fs::write(spec.image_dir.join("core-1.img"), spec.pid.to_string()).map_err(|e| {
            CriuError::Io {
                op: "dump",
                source: e,
            }
        })?;
        // Memory pages, written in pieces as CRIU does, so that whatever
        // follows a dump's page images (hashing, an early push) sees them
        // grow.
        let pages = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(spec.image_dir.join(FAKE_PAGES))?;
            for i in 0..FAKE_PAGE_PIECES {
                f.write_all(&[i as u8; 4096])?;
                f.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(())
        };
        pages().map_err(|e| CriuError::Io {
            op: "dump",
            source: e,
        })?;
        if let Some(h) = &spec.post_dump {
            h.run()
                .map_err(|detail| CriuError::Failed { op: "dump", detail })?;
        }
        if !spec.leave_running {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(spec.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(())
    }

    fn restore(&self, spec: &RestoreSpec) -> Result<RestoreOutcome, CriuError> {
        if Self::take(&self.fail_restores) {
            return Err(CriuError::Failed {
                op: "restore",
                detail: "injected restore failure".into(),
            });
        }
        if !spec.image_dir.join("core-1.img").exists() {
            return Err(CriuError::Failed {
                op: "restore",
                detail: "no images".into(),
            });
        }
        // Like CRIU, read older pages through the parent links.
        let mut dir = spec.image_dir.clone();
        for _ in 0..crate::security::manifest::MAX_CHAIN_ROUNDS {
            if !dir.join("parent").exists() {
                break;
            }
            dir = dir.join("parent");
            if !dir.join("pages-1.img").is_file() {
                return Err(CriuError::Failed {
                    op: "restore",
                    detail: format!("no pages in parent {}", dir.display()),
                });
            }
        }
        if let Some(gate) = &spec.resume_gate {
            gate.check().map_err(CriuError::Refused)?;
        }
        self.restores.fetch_add(1, Ordering::SeqCst);
        let child = stand_in("600").map_err(|e| CriuError::Io {
            op: "restore",
            source: e,
        })?;
        let pid = child.id() as i32;
        if let Ok(mut kids) = self.children.lock() {
            kids.push(child);
        }
        Ok(RestoreOutcome { pid })
    }

    fn features(&self) -> Features {
        self.features.lock().map(|f| *f).unwrap_or_default()
    }

    fn pre_dump(&self, spec: &PreDumpSpec) -> Result<u64, CriuError> {
        self.pre_dumps.fetch_add(1, Ordering::SeqCst);
        if !self.features().mem_dirty_track {
            // What CRIU says when asked for --track-mem without soft-dirty.
            return Err(CriuError::Failed {
                op: "pre-dump",
                detail: "Tracking memory is not available".into(),
            });
        }
        let round = self
            .pre_dump_script
            .lock()
            .ok()
            .and_then(|mut s| s.pop_front())
            .unwrap_or(FakeRound::Bytes(0));
        let bytes = match round {
            FakeRound::Bytes(b) => b,
            FakeRound::Fail => {
                return Err(CriuError::Failed {
                    op: "pre-dump",
                    detail: "injected pre-dump failure".into(),
                })
            }
        };
        // Never stops the job, like a real pre-dump.
        Self::alive("pre-dump", spec.pid)?;
        Self::link_parent("pre-dump", &spec.image_dir, &spec.prev_images_dir)?;
        let io = |e| CriuError::Io {
            op: "pre-dump",
            source: e,
        };
        // A small stand-in for the pages: the scripted size is what counts.
        std::fs::write(spec.image_dir.join("pages-1.img"), bytes.to_le_bytes()).map_err(io)?;
        std::fs::write(spec.image_dir.join("pagemap-1.img"), spec.pid.to_string()).map_err(io)?;
        std::fs::write(spec.image_dir.join(super::PRE_DUMP_LOG), "fake pre-dump\n").map_err(io)?;
        Ok(bytes)
    }

    fn start_lazy_daemon(
        &self,
        _image_dir: &std::path::Path,
        _from: &super::PageServer,
    ) -> Result<std::process::Child, CriuError> {
        Err(CriuError::Failed {
            op: "lazy-pages",
            detail: "the fake engine has no post-copy".into(),
        })
    }

    fn available(&self) -> Result<(), CriuError> {
        Ok(())
    }
}

/// A `sleep` standing in for a job in tests: it inherits nothing of the
/// test process that a migration would refuse as node-private (its cwd,
/// which may be a checkout under /tmp, or a stdout redirected to a file
/// there), as a job started by an agent would not.
pub fn stand_in(secs: &str) -> std::io::Result<std::process::Child> {
    use std::process::Stdio;
    std::process::Command::new("sleep")
        .arg(secs)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
