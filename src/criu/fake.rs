//! A fake [`CheckpointEngine`] for unit tests of the migration protocol: it
//! writes a marker "image", "restores" by spawning `sleep`, and fails on
//! command so every failure branch can be exercised without root or CRIU.

use super::{CheckpointEngine, CriuError, DumpSpec, Features, RestoreOutcome, RestoreSpec};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct FakeEngine {
    /// Fail the next N dumps.
    pub fail_dumps: AtomicU32,
    /// Fail the next N restores.
    pub fail_restores: AtomicU32,
    pub dumps: AtomicU32,
    pub restores: AtomicU32,
    pub children: Mutex<Vec<std::process::Child>>,
}

impl FakeEngine {
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
        self.dumps.fetch_add(1, Ordering::SeqCst);
        std::fs::write(spec.image_dir.join("core-1.img"), spec.pid.to_string()).map_err(|e| {
            CriuError::Io {
                op: "dump",
                source: e,
            }
        })?;
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
        if let Some(gate) = &spec.resume_gate {
            gate.check().map_err(CriuError::Refused)?;
        }
        self.restores.fetch_add(1, Ordering::SeqCst);
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .map_err(|e| CriuError::Io {
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
        Features::default()
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
