//! The policy's input and output: a [`ClusterSnapshot`] of nodes and jobs,
//! the [`PolicyConfig`], and the [`Plan`] of [`Move`]s it returns.
//!
//! Plain data, serde-able, with no behaviour of their own: the balancer
//! builds snapshots from the agents' loads, the planning bench (`mosbench`)
//! from generated clusters, and the tests by hand, and all of them read the
//! same plan. The algorithm that turns one into the other is the parent
//! module's.

use serde::{Deserialize, Serialize};

/// State of one node as seen by the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    pub name: String,
    pub up: bool,
    /// cores x relative speed; > 0
    pub capacity: f64,
    /// runnable tasks on the node (smoothed), i.e. CPU demand in cores
    pub load: f64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// migrations already running to or from this node
    pub migrations_in_flight: u32,
    /// blocked by an administrator (`mosctl block`): its jobs may leave, but
    /// nothing is ever placed or moved onto it
    #[serde(default)]
    pub blocked: bool,
    /// it can give a job its own address (network namespace on the job
    /// bridge): the only kind of node an own-address job may move to
    #[serde(default)]
    pub job_addresses: bool,
}

/// State of one job as seen by the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSnapshot {
    pub id: String,
    pub node: String,
    pub rss_bytes: u64,
    /// CPU demand of the job in cores (≈1.0 for a CPU-bound single-threaded job; runnable thread count)
    pub cpu_demand: f64,
    /// seconds since the job arrived on its current node (start or last migration)
    pub residence_secs: f64,
    /// never moved automatically
    pub pinned: bool,
    /// never moved at all
    pub migratable: bool,
    /// its last move was a post-copy that failed (it resumed where it was):
    /// the next move is a full copy, whatever its size
    #[serde(default)]
    pub post_copy_failed: bool,
    /// it has its own address, which only a node with `job_addresses` can
    /// host (elsewhere the agent refuses the move before the freeze)
    #[serde(default)]
    pub own_address: bool,
}

/// Everything the policy needs to know about the cluster at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    pub nodes: Vec<NodeSnapshot>,
    pub jobs: Vec<JobSnapshot>,
    /// measured migration bandwidth (bytes/s) from earlier migrations; 0 or negative = unknown → use config default
    pub bandwidth_bytes_per_sec: f64,
}

/// Tunables of the policy. See [`PolicyConfig::default`] for sensible values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// a move must reduce the normalised-load gap by more than this (hysteresis), e.g. 0.25
    pub hysteresis: f64,
    /// jobs that arrived less than this many seconds ago are not moved (anti ping-pong), e.g. 10.0
    pub min_residence_secs: f64,
    /// at most this many migrations per node (in flight + planned) at once, e.g. 2
    pub max_concurrent_per_node: u32,
    /// how long (s) we expect a job to keep running when judging gain vs cost, e.g. 60.0
    pub benefit_horizon_secs: f64,
    /// fixed cost per migration in seconds (freeze/restore overhead), e.g. 0.3
    pub fixed_cost_secs: f64,
    /// bandwidth to assume when none measured, bytes/s, e.g. 500e6
    pub default_bandwidth_bytes_per_sec: f64,
    /// a node whose mem_available/mem_total falls below this is "low on memory" → memory ushering, e.g. 0.10
    pub mem_low_watermark: f64,
    /// a target must keep at least this fraction of its memory free after receiving a job, e.g. 0.10
    pub mem_reserve_fraction: f64,
    /// jobs with rss above this should use post-copy migration, e.g. 256 MiB
    pub post_copy_threshold_bytes: u64,
    /// at most this many moves in one plan, e.g. 64
    pub max_moves_per_plan: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            hysteresis: 0.25,
            min_residence_secs: 5.0,
            max_concurrent_per_node: 2,
            benefit_horizon_secs: 60.0,
            fixed_cost_secs: 0.3,
            default_bandwidth_bytes_per_sec: 500e6,
            mem_low_watermark: 0.10,
            mem_reserve_fraction: 0.10,
            post_copy_threshold_bytes: 256 << 20,
            max_moves_per_plan: 64,
        }
    }
}

/// Why a move was planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveReason {
    LoadBalance,
    MemoryUshering,
}

/// One planned migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub job_id: String,
    pub from: String,
    pub to: String,
    pub reason: MoveReason,
    /// reduction of the max normalised load of the pair, in "normalised load" units
    pub expected_gain: f64,
    /// estimated cost in seconds (fixed + rss / bandwidth)
    pub estimated_cost_secs: f64,
    pub post_copy: bool,
}

/// Result of one planning round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub moves: Vec<Move>,
    /// max/min normalised load over up nodes before and after applying the plan (f64::INFINITY if min is 0 and max > 0; 1.0 if all zero)
    pub imbalance_before: f64,
    pub imbalance_after: f64,
}
