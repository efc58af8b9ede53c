//! Node administration, as MOSIX's `mosctl` had it: `block` (no new jobs or
//! migrations in), `setspeed` (the node's relative speed).
//!
//! Why here and persisted: a node is blocked for maintenance, and
//! maintenance restarts things. A block that an agent restart forgot would
//! let the balancer refill the node the moment it came back, so the settings
//! live in a small file under the agent's root (`admin/<node>.json`, written
//! atomically: temporary file + rename) and are read at start. The file is
//! keyed by node name, so it works the same on a shared path and on a node's
//! own state dir.
//!
//! The agent enforces the block where jobs arrive (Launch, Exec, Restore,
//! PushImages); the balancer and placement read it from `GetLoad` and
//! `GetSlots` and skip the node, so a refusal is only ever a race.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What an administrator has set on a node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// No new job or migration in (`mosctl block`).
    #[serde(default)]
    pub blocked: bool,
    /// Relative CPU speed (`mosctl setspeed`); None: the agent's `--speed`.
    #[serde(default)]
    pub speed: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("speed {0} is not a positive finite number")]
    BadSpeed(f64),
    #[error("reading node settings {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node settings {path} are not valid JSON: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing node settings {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether `s` may be a node's speed factor.
pub fn valid_speed(s: f64) -> bool {
    s.is_finite() && s > 0.0
}

/// The sentence every refusal of a blocked node carries.
pub fn blocked_message(node: &str) -> String {
    format!("{node} is blocked (mosctl unblock {node} to allow jobs in)")
}

/// The sentence every refusal to move a pinned job carries.
pub fn pinned_message(job: &str) -> String {
    format!("job {job} is pinned to its node (mosctl unpin {job} to let it move)")
}

/// A node's settings, in memory and in their file.
pub struct AdminState {
    path: PathBuf,
    cur: Mutex<Settings>,
}

impl AdminState {
    /// The settings file of `node` under the agent's root.
    pub fn path_for(root: &Path, node: &str) -> PathBuf {
        root.join("admin").join(format!("{node}.json"))
    }

    /// Read the node's settings (none yet: not blocked, the flag's speed).
    pub fn open(path: PathBuf) -> Result<Self, AdminError> {
        let cur = match std::fs::read(&path) {
            Ok(b) => {
                let s: Settings =
                    serde_json::from_slice(&b).map_err(|source| AdminError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                Settings {
                    // A hand-edited bad speed is ignored rather than fatal.
                    speed: s.speed.filter(|v| valid_speed(*v)),
                    ..s
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Settings {
                blocked: false,
                speed: None,
            },
            Err(source) => return Err(AdminError::Read { path, source }),
        };
        Ok(Self {
            path,
            cur: Mutex::new(cur),
        })
    }

    pub fn get(&self) -> Settings {
        self.cur.lock().map(|s| *s).unwrap_or(Settings {
            blocked: false,
            speed: None,
        })
    }

    pub fn blocked(&self) -> bool {
        self.get().blocked
    }

    /// Change what is given, write the file, then make it current: a
    /// setting that could not be saved is not applied (it would be lost
    /// at the next restart without anyone knowing).
    pub fn set(&self, blocked: Option<bool>, speed: Option<f64>) -> Result<Settings, AdminError> {
        if let Some(s) = speed {
            if !valid_speed(s) {
                return Err(AdminError::BadSpeed(s));
            }
        }
        let mut cur = self.cur.lock().unwrap_or_else(|p| p.into_inner());
        let next = Settings {
            blocked: blocked.unwrap_or(cur.blocked),
            speed: speed.or(cur.speed),
        };
        write_atomic(&self.path, &next)?;
        *cur = next;
        Ok(next)
    }
}

fn write_atomic(path: &Path, s: &Settings) -> Result<(), AdminError> {
    let err = |source| AdminError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
    let body = serde_json::to_vec_pretty(s).map_err(|e| err(std::io::Error::other(e)))?;
    let res = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_a_reopen_and_bad_speeds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = AdminState::path_for(dir.path(), "node2");
        let a = AdminState::open(path.clone()).unwrap();
        assert_eq!(
            a.get(),
            Settings {
                blocked: false,
                speed: None
            }
        );
        a.set(Some(true), None).unwrap();
        a.set(None, Some(1.5)).unwrap();
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                a.set(None, Some(bad)),
                Err(AdminError::BadSpeed(_))
            ));
        }
        let b = AdminState::open(path.clone()).unwrap();
        assert_eq!(
            b.get(),
            Settings {
                blocked: true,
                speed: Some(1.5)
            }
        );
        b.set(Some(false), None).unwrap();
        assert!(!AdminState::open(path.clone()).unwrap().blocked());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_silent_unblock() {
        let dir = tempfile::tempdir().unwrap();
        let path = AdminState::path_for(dir.path(), "n");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            AdminState::open(path),
            Err(AdminError::Corrupt { .. })
        ));
    }
}
