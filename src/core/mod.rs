//! Core model of mosix: identifiers, job records, errors. Free of transport
//! types so the agent, the balancer and the CLIs share one vocabulary.

pub mod cluster_file;
pub mod ids;
pub mod job;
pub mod registry;

pub use ids::{JobId, MigrationId, NodeName};
pub use job::{JobRecord, JobState, MigrationRecord};

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
