//! The job record: everything the cluster knows about one migratable job.
//! Stored as JSON in the registry (see [`super::registry`]).

use super::ids::{JobId, MigrationId, NodeName};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    /// A migration (or freeze) is under way; `JobRecord::pending` says which.
    Migrating,
    /// Checkpointed to disk and stopped (MOSIX "freeze").
    Frozen,
    Exited,
    /// The job could not be brought back; images and logs are kept.
    Failed,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Exited | JobState::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Migrating => "migrating",
            JobState::Frozen => "frozen",
            JobState::Exited => "exited",
            JobState::Failed => "failed",
        }
    }
}

/// Phase of a migration in progress; written to the registry before each step
/// so a restarted agent knows how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The source is checkpointing. The job may still be running on the source.
    Dumping,
    /// Images are complete and sealed; the source copy is gone.
    Dumped,
    /// The target is restoring.
    Restoring,
    /// The images are sealed and the job is frozen on disk.
    Frozen,
}

/// A migration that has started but not finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingMigration {
    pub id: MigrationId,
    pub from: NodeName,
    /// None for a freeze.
    pub to: Option<NodeName>,
    pub phase: MigrationPhase,
    /// Relative to the shared root, e.g. `images/j123/2`.
    pub image_dir: String,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub post_copy: bool,
    /// `(namespace tid, nice)` of the job's threads whose priority was
    /// raised for the dump (`agent::priority`); a restore puts them back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nice_before_dump: Vec<(i32, i32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: MigrationId,
    pub from: NodeName,
    pub to: NodeName,
    pub started_unix_ms: u64,
    pub frozen_ms: u64,
    pub total_ms: u64,
    pub ok: bool,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub image_bytes: u64,
    #[serde(default)]
    pub post_copy: bool,
    /// Pre-copy rounds run before the final dump (0: none).
    #[serde(default)]
    pub pre_copy_rounds: u32,
    /// Bytes of memory those rounds copied while the job ran.
    #[serde(default)]
    pub pre_copy_bytes: u64,
    /// Why the requested mode did not run and the job moved as a full copy
    /// ("" if it ran as requested).
    #[serde(default)]
    pub fallback: String,
    /// A restart from this checkpoint (its sequence number), not a live
    /// move; 0 for a migration. See `crate::checkpoint`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restored_from_checkpoint: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A job's periodic checkpoints (`mosrun --checkpoint-every`) and its
/// latest checkpoint. Kept in the record, so it travels with the job: the
/// node it migrates to, or is restored on, keeps checkpointing it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// Interval in ms; 0 = only on demand (`mosctl checkpoint`).
    pub every_ms: u64,
    /// How many checkpoints to keep.
    pub keep: u32,
    /// Latest complete checkpoint's sequence number (0 = none yet).
    #[serde(default)]
    pub last_seq: u64,
    #[serde(default)]
    pub last_unix_ms: u64,
    #[serde(default)]
    pub last_frozen_ms: u64,
    #[serde(default)]
    pub last_bytes: u64,
    /// "full" or "incremental", with the reason for a fallback.
    #[serde(default)]
    pub mode: String,
    /// The last attempt's error ("" when it succeeded).
    #[serde(default)]
    pub last_error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    #[serde(default)]
    pub name: String,
    pub node: NodeName,
    pub state: JobState,
    /// Host pid of the job's init on `node`; 0 when not running.
    pub pid: i32,
    pub argv: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub stdout_path: String,
    pub stderr_path: String,
    pub created_unix_ms: u64,
    /// When the job arrived on its current node (start or last migration).
    pub arrived_unix_ms: u64,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub exit_signal: Option<i32>,
    #[serde(default)]
    pub history: Vec<MigrationRecord>,
    #[serde(default)]
    pub pending: Option<PendingMigration>,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub non_migratable: bool,
    #[serde(default)]
    pub error: String,
    /// Bumped on every write; lets readers notice concurrent updates.
    #[serde(default)]
    pub generation: u64,
    /// The job is an instance of this network service (`mosrun --service`):
    /// front ends such as `mosgw` send the service's traffic to
    /// `node address:port`, and are told before the job is frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceDecl>,
    /// Checkpoint settings and the latest checkpoint (None: never
    /// checkpointed and no interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,
    /// The job's own address (its own network namespace), which moves with
    /// it; None: it uses its node's network (see `agent::jobnet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::core::JobNet>,
}

/// A job's declaration that it serves a named service on a TCP port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDecl {
    pub name: String,
    pub port: u16,
}

impl ServiceDecl {
    /// Longest service name accepted (it becomes a metrics label).
    pub const MAX_NAME: usize = 64;

    /// Checks a declaration from outside: a short name of letters, digits,
    /// `-`, `_` or `.`, and a non-zero port.
    pub fn new(name: &str, port: u32) -> Result<Self, String> {
        if name.is_empty() || name.len() > Self::MAX_NAME {
            return Err(format!(
                "service name must be 1 to {} characters",
                Self::MAX_NAME
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "service name {name:?} may only hold letters, digits, '-', '_' and '.'"
            ));
        }
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {port} is not a TCP port (1-65535)"))?;
        Ok(Self {
            name: name.to_string(),
            port,
        })
    }
}

impl JobRecord {
    /// Next image generation number for this job (`images/<job>/<n>`).
    pub fn next_image_generation(&self) -> usize {
        self.history.len() + 1
    }
}
