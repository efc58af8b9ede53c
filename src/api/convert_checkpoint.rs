//! proto ↔ core conversion for checkpoints (see [`crate::checkpoint`]).

use super::convert::InvalidRequest;
use super::pb;
use crate::agent::checkpoint::{CheckpointDone, FromCheckpoint};
use crate::agent::AgentAction;
use crate::checkpoint::{DEFAULT_KEEP, MIN_EVERY_MS};
use crate::core::{CheckpointStatus, JobId, NodeName};

/// Longest checkpoint history a job may ask to keep.
pub const MAX_KEEP: u32 = 1000;

fn bad(field: &'static str, why: impl ToString) -> InvalidRequest {
    InvalidRequest {
        field,
        why: why.to_string(),
    }
}

/// A Launch's checkpoint settings: None without an interval.
pub fn launch_policy(every_ms: u64, keep: u32) -> Result<Option<CheckpointStatus>, InvalidRequest> {
    if every_ms == 0 {
        if keep != 0 {
            return Err(bad(
                "checkpoint_keep",
                "only with checkpoint_every_ms (a checkpoint interval)",
            ));
        }
        return Ok(None);
    }
    if every_ms < MIN_EVERY_MS {
        return Err(bad(
            "checkpoint_every_ms",
            format!("{every_ms} ms is below the shortest interval, {MIN_EVERY_MS} ms"),
        ));
    }
    if keep > MAX_KEEP {
        return Err(bad(
            "checkpoint_keep",
            format!("{keep} is more than {MAX_KEEP}"),
        ));
    }
    Ok(Some(CheckpointStatus {
        every_ms,
        keep: if keep == 0 { DEFAULT_KEEP } else { keep },
        ..Default::default()
    }))
}

impl From<&CheckpointStatus> for pb::CheckpointStatus {
    fn from(s: &CheckpointStatus) -> Self {
        pb::CheckpointStatus {
            every_ms: s.every_ms,
            keep: s.keep,
            last_seq: s.last_seq,
            last_unix_ms: s.last_unix_ms,
            last_frozen_ms: s.last_frozen_ms,
            last_bytes: s.last_bytes,
            mode: s.mode.clone(),
            last_error: s.last_error.clone(),
        }
    }
}

impl From<pb::CheckpointStatus> for CheckpointStatus {
    fn from(s: pb::CheckpointStatus) -> Self {
        CheckpointStatus {
            every_ms: s.every_ms,
            keep: s.keep,
            last_seq: s.last_seq,
            last_unix_ms: s.last_unix_ms,
            last_frozen_ms: s.last_frozen_ms,
            last_bytes: s.last_bytes,
            mode: s.mode,
            last_error: s.last_error,
        }
    }
}

impl TryFrom<pb::CheckpointRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::CheckpointRequest) -> Result<Self, InvalidRequest> {
        Ok(AgentAction::Checkpoint(
            JobId::parse(&r.job_id).map_err(|e| bad("job_id", e))?,
        ))
    }
}

impl TryFrom<pb::RestoreCheckpointRequest> for AgentAction {
    type Error = InvalidRequest;
    fn try_from(r: pb::RestoreCheckpointRequest) -> Result<Self, InvalidRequest> {
        Ok(AgentAction::RestoreCheckpoint {
            job: JobId::parse(&r.job_id).map_err(|e| bad("job_id", e))?,
            seq: (r.seq != 0).then_some(r.seq),
            node_is_down: if r.node_is_down.is_empty() {
                None
            } else {
                Some(NodeName::parse(&r.node_is_down).map_err(|e| bad("node_is_down", e))?)
            },
            leader_revision: r.leader_revision,
        })
    }
}

impl From<&CheckpointDone> for pb::CheckpointResponse {
    fn from(d: &CheckpointDone) -> Self {
        pb::CheckpointResponse {
            job: Some(pb::Job::from(&d.rec)),
            seq: d.seq,
            frozen_ms: d.frozen_ms,
            bytes: d.bytes,
            mode: d.mode.clone(),
        }
    }
}

impl From<&FromCheckpoint> for pb::RestoreCheckpointResponse {
    fn from(f: &FromCheckpoint) -> Self {
        match f {
            FromCheckpoint::Running { rec, seq } => pb::RestoreCheckpointResponse {
                job: Some(pb::Job::from(rec)),
                seq: *seq,
                lost: false,
            },
            FromCheckpoint::Lost(rec) => pb::RestoreCheckpointResponse {
                job: Some(pb::Job::from(rec)),
                seq: 0,
                lost: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_policy_checks_its_fields() {
        assert_eq!(launch_policy(0, 0).unwrap(), None);
        assert!(launch_policy(0, 2).is_err());
        assert!(launch_policy(10, 0)
            .unwrap_err()
            .to_string()
            .contains("shortest"));
        assert!(launch_policy(5000, MAX_KEEP + 1).is_err());
        let p = launch_policy(30_000, 0).unwrap().unwrap();
        assert_eq!((p.every_ms, p.keep), (30_000, DEFAULT_KEEP));
        let s = CheckpointStatus {
            every_ms: 1,
            keep: 2,
            last_seq: 3,
            last_unix_ms: 4,
            last_frozen_ms: 5,
            last_bytes: 6,
            mode: "full".into(),
            last_error: "x".into(),
        };
        assert_eq!(CheckpointStatus::from(pb::CheckpointStatus::from(&s)), s);
    }

    #[test]
    fn restore_request_is_validated() {
        let ok = AgentAction::try_from(pb::RestoreCheckpointRequest {
            job_id: "j1".into(),
            seq: 0,
            node_is_down: "node1".into(),
            leader_revision: 0,
        })
        .unwrap();
        assert!(matches!(
            ok,
            AgentAction::RestoreCheckpoint {
                seq: None,
                node_is_down: Some(_),
                ..
            }
        ));
        for (job, node) in [("../x", ""), ("j1", "a/b")] {
            assert!(AgentAction::try_from(pb::RestoreCheckpointRequest {
                job_id: job.into(),
                seq: 1,
                node_is_down: node.into(),
                leader_revision: 0,
            })
            .is_err());
        }
    }
}
