//! Migration policy: decides which jobs to move where, MOSIX style.
//!
//! The policy is a pure function of a [`ClusterSnapshot`] and a [`PolicyConfig`]:
//! no I/O, no clock reads, no randomness. Every decision is made on name/id
//! sorted data so that the same snapshot (in any input order) yields the same
//! [`Plan`].
//!
//! # Algorithm
//!
//! Only nodes that are `up` and have a finite, positive capacity take part.
//! The *normalised load* of a node is `load / capacity`, i.e. CPU demand per
//! unit of (speed-weighted) CPU. Planning runs on a simulated copy of the node
//! state: each chosen move subtracts the job's CPU demand and RSS from the
//! source and adds them to the target before the next decision is made.
//!
//! 1. **Memory ushering** (first, because memory pressure leads to swapping
//!    or OOM kills, which is far worse than CPU imbalance). Every node whose
//!    `mem_available / mem_total` is below `mem_low_watermark` (in name order)
//!    sheds migratable, unpinned jobs, largest RSS first, to the node with the
//!    most available memory that can take the job while keeping its reserve,
//!    until the source is back above the watermark. Residence time is ignored
//!    here: the situation is urgent.
//! 2. **Load balancing.** Repeatedly take the most loaded source that still has
//!    an eligible job (migratable, unpinned, resident for at least
//!    `min_residence_secs`, not moved yet in this plan). For each of its jobs
//!    and each candidate target compute
//!    `gain = max(src, dst) - max(src', dst')` on normalised loads. A move is
//!    acceptable only if the gain beats the hysteresis, the gain over the
//!    benefit horizon beats the migration cost (`fixed + rss / bandwidth`),
//!    the target keeps its memory reserve and neither node exceeds its
//!    concurrent-migration budget. The best acceptable move is applied to the
//!    simulation; a source without any acceptable move is retired for the
//!    rest of the plan. Planning stops when no source is left, no source can
//!    possibly gain more than the hysteresis, or `max_moves_per_plan` is hit.
//!
//! Hysteresis, minimum residence time and "each job at most once per plan"
//! together prevent ping-pong: a move that merely swaps which node is the
//! heavier one has zero gain and is never taken.
//!
//! # Cost
//!
//! Nodes are kept in ordered sets keyed by normalised load, so the heaviest
//! source and the lightest targets are found in `O(log n)`. Each iteration
//! either produces a move or retires a source, so the work is roughly
//! `O((moves + sources) × jobs_on_source × K)` plus an `O(n log n + jobs)`
//! set-up, where `K` is the small number of light targets examined per
//! source (see [`LB_TARGET_CANDIDATES`]).

mod snapshot;

pub use snapshot::{
    ClusterSnapshot, JobSnapshot, Move, MoveReason, NodeSnapshot, Plan, PolicyConfig,
};

use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Number of least-loaded targets examined per load-balancing decision.
///
/// Why not all nodes: the best target for shedding load is almost always among
/// the least loaded ones, and looking at every node would make each decision
/// `O(nodes)` (10,000 nodes × 100 jobs per source is too slow for a planner
/// that runs every few seconds). With unequal capacities a bigger node that is
/// slightly more loaded can occasionally be a better target; taking a few
/// candidates rather than just one covers that in practice.
pub const LB_TARGET_CANDIDATES: usize = 8;

/// Upper bound on how many light nodes are scanned (in load order) while
/// collecting the [`LB_TARGET_CANDIDATES`] that have memory for the source's
/// smallest eligible job. It keeps a memory-starved cluster from degrading
/// every decision into a full scan of all nodes.
pub const LB_TARGET_SCAN_LIMIT: usize = 256;

/// Bandwidth used when neither the snapshot nor the config offers a usable
/// value (both non-positive or NaN); same as the config default.
const FALLBACK_BANDWIDTH_BYTES_PER_SEC: f64 = 500e6;

/// normalised load = load / capacity
///
/// A NaN, infinite or negative load counts as 0. A node with unusable capacity
/// (zero, negative, NaN or infinite) gets `f64::INFINITY`: it cannot run
/// anything, so it must never look attractive.
pub fn normalised_load(node: &NodeSnapshot) -> f64 {
    if usable_capacity(node.capacity) {
        sane_amount(node.load) / node.capacity
    } else {
        f64::INFINITY
    }
}

/// Initial placement: best up node for a new job with this demand/memory (lowest normalised load after adding it, must have memory for it with reserve); None if no node fits.
///
/// Ties are broken by node name. The reserve is the same one load balancing
/// uses (see [`plan`]), so a freshly placed job does not immediately trigger
/// memory ushering.
pub fn place(
    snapshot: &ClusterSnapshot,
    config: &PolicyConfig,
    rss_bytes: u64,
    cpu_demand: f64,
) -> Option<String> {
    place_among(snapshot.nodes.iter(), config, rss_bytes, cpu_demand)
}

/// [`place`] among nodes held by reference (see [`NodeRef`]).
pub fn place_among<'a>(
    nodes: impl Iterator<Item = &'a NodeSnapshot>,
    config: &PolicyConfig,
    rss_bytes: u64,
    cpu_demand: f64,
) -> Option<String> {
    let demand = sane_amount(cpu_demand);
    let reserve = effective_reserve(config);
    let mut best: Option<(f64, &str)> = None;
    for node in nodes.filter(|n| is_usable(n) && !n.blocked) {
        if !fits(
            node.mem_available_bytes,
            node.mem_total_bytes,
            rss_bytes,
            reserve,
        ) {
            continue;
        }
        let score = (sane_amount(node.load) + demand) / node.capacity;
        // Comparing on (score, name) makes the answer independent of input
        // order, even with duplicate node entries.
        let better = match best {
            None => true,
            Some((s, name)) => match score.total_cmp(&s) {
                Ordering::Less => true,
                Ordering::Equal => node.name.as_str() < name,
                Ordering::Greater => false,
            },
        };
        if better {
            best = Some((score, node.name.as_str()));
        }
    }
    best.map(|(_, name)| name.to_string())
}

/// Plans memory ushering and load-balancing migrations for one round.
///
/// See the module documentation for the algorithm. Deviations from a naive
/// reading worth knowing about:
/// * the target memory reserve is `max(mem_reserve_fraction, mem_low_watermark)`
///   so that a load-balancing move can never push a node under the watermark
///   (which would make the next round usher the job straight back);
/// * only the [`LB_TARGET_CANDIDATES`] least-loaded targets with memory room are
///   considered for each load-balancing decision;
/// * a source that has no acceptable move is not reconsidered later in the same
///   plan (the next round will see it again);
/// * among moves with equal gain the currently lighter target wins, then the
///   target name, then the job that comes first in the try order (highest
///   demand, smallest rss, id), rather than plain job id;
/// * duplicate node names / job ids in the snapshot are collapsed to one entry
///   (the smallest under a total order of all fields), so garbage input can
///   neither move a job twice nor make the plan depend on input order.
pub fn plan(snapshot: &ClusterSnapshot, config: &PolicyConfig) -> Plan {
    let jobs: Vec<(&JobSnapshot, f64)> = snapshot.jobs.iter().map(|j| (j, 0.0)).collect();
    plan_inner(
        snapshot.nodes.iter(),
        &jobs,
        snapshot.bandwidth_bytes_per_sec,
        config,
    )
}

/// One node and its jobs, by reference: what a caller that keeps the
/// cluster's state per node (the balancer's load feed) plans from, so that a
/// round neither copies nor rebuilds 10,000 nodes' state.
#[derive(Debug, Clone, Copy)]
pub struct NodeRef<'a> {
    pub node: &'a NodeSnapshot,
    /// Jobs on this node (their `node` is this node's name).
    pub jobs: &'a [JobSnapshot],
    /// Seconds since the jobs' `residence_secs` were measured: added to them.
    pub age_secs: f64,
}

/// [`plan`] over nodes held by reference: the same decisions as [`plan`] on
/// a snapshot of the same nodes and jobs (with residence advanced by each
/// node's `age_secs`).
pub fn plan_nodes(
    nodes: &[NodeRef<'_>],
    bandwidth_bytes_per_sec: f64,
    config: &PolicyConfig,
) -> Plan {
    let jobs: Vec<(&JobSnapshot, f64)> = nodes
        .iter()
        .flat_map(|n| {
            let age = if n.age_secs.is_finite() && n.age_secs > 0.0 {
                n.age_secs
            } else {
                0.0
            };
            n.jobs.iter().map(move |j| (j, age))
        })
        .collect();
    plan_inner(
        nodes.iter().map(|n| n.node),
        &jobs,
        bandwidth_bytes_per_sec,
        config,
    )
}

fn plan_inner<'a>(
    nodes: impl Iterator<Item = &'a NodeSnapshot>,
    jobs: &[(&'a JobSnapshot, f64)],
    bandwidth_bytes_per_sec: f64,
    config: &PolicyConfig,
) -> Plan {
    let mut state = State::new(nodes, jobs);
    let ctx = Ctx::new(bandwidth_bytes_per_sec, config);
    let imbalance_before = state.imbalance();
    let mut moves = Vec::new();
    usher_memory(&mut state, &ctx, &mut moves);
    balance_load(&mut state, &ctx, &mut moves);
    let imbalance_after = state.imbalance();
    Plan {
        moves,
        imbalance_before,
        imbalance_after,
    }
}

// ---------------------------------------------------------------------------
// Input sanitising
// ---------------------------------------------------------------------------

fn usable_capacity(capacity: f64) -> bool {
    capacity.is_finite() && capacity > 0.0
}

fn is_usable(node: &NodeSnapshot) -> bool {
    node.up && usable_capacity(node.capacity)
}

/// Loads and demands: anything that is not a finite positive number is 0, so
/// garbage input can neither attract nor repel work.
fn sane_amount(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

/// `a > b`, spelled out so that callers negating it read as "NaN rejects":
/// `!greater(gain, h)` is true for NaN gains, unlike `gain <= h`.
fn greater(a: f64, b: f64) -> bool {
    a > b
}

/// Reserve fraction a target must keep free. Using at least the low watermark
/// stops load balancing from creating a node that ushering would drain again.
fn effective_reserve(config: &PolicyConfig) -> f64 {
    // f64::max ignores a NaN operand; if both are NaN the comparison in
    // `fits` is always false, i.e. nothing fits, which is the safe outcome.
    config.mem_reserve_fraction.max(config.mem_low_watermark)
}

/// Whether `rss` bytes can be added while keeping `reserve × total` free.
fn fits(available: u64, total: u64, rss: u64, reserve: f64) -> bool {
    (available as f64 - rss as f64) >= reserve * total as f64
}

/// Total order over every field, used only to pick deterministically among
/// duplicate entries with the same name.
fn cmp_nodes(a: &NodeSnapshot, b: &NodeSnapshot) -> Ordering {
    a.name
        .cmp(&b.name)
        .then(a.capacity.total_cmp(&b.capacity))
        .then(a.load.total_cmp(&b.load))
        .then(a.mem_total_bytes.cmp(&b.mem_total_bytes))
        .then(a.mem_available_bytes.cmp(&b.mem_available_bytes))
        .then(a.migrations_in_flight.cmp(&b.migrations_in_flight))
        .then(a.blocked.cmp(&b.blocked))
}

/// Total order over every field, used only to pick deterministically among
/// duplicate entries with the same id.
fn cmp_jobs(a: &JobSnapshot, b: &JobSnapshot) -> Ordering {
    a.id.cmp(&b.id)
        .then(a.node.cmp(&b.node))
        .then(a.rss_bytes.cmp(&b.rss_bytes))
        .then(a.cpu_demand.total_cmp(&b.cpu_demand))
        .then(a.residence_secs.total_cmp(&b.residence_secs))
        .then(a.pinned.cmp(&b.pinned))
        .then(a.migratable.cmp(&b.migratable))
}

/// Hash map used only for name/id lookups while building the simulation.
/// Never iterated to make a decision.
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The Fx hash (as used inside rustc): several times faster than SipHash on
/// short keys such as job ids, which matters when indexing ~100k jobs per
/// plan. It is not DoS resistant; ids and node names come from the cluster
/// itself, and a bad distribution would only cost time, never correctness.
#[derive(Default)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            for (dst, src) in word.iter_mut().zip(chunk) {
                *dst = *src;
            }
            self.add(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Config values derived once per plan.
struct Ctx {
    hysteresis: f64,
    min_residence_secs: f64,
    max_conc: u32,
    horizon_secs: f64,
    fixed_cost_secs: f64,
    bandwidth: f64,
    low_watermark: f64,
    reserve: f64,
    post_copy_threshold: u64,
    max_moves: usize,
}

impl Ctx {
    fn new(bandwidth_bytes_per_sec: f64, config: &PolicyConfig) -> Self {
        let usable_bw = |b: f64| b.is_finite() && b > 0.0;
        let bandwidth = if usable_bw(bandwidth_bytes_per_sec) {
            bandwidth_bytes_per_sec
        } else if usable_bw(config.default_bandwidth_bytes_per_sec) {
            config.default_bandwidth_bytes_per_sec
        } else {
            FALLBACK_BANDWIDTH_BYTES_PER_SEC
        };
        Ctx {
            // A negative or NaN hysteresis would allow zero-gain swaps, i.e.
            // ping-pong; never go below "strictly positive gain".
            hysteresis: if config.hysteresis >= 0.0 {
                config.hysteresis
            } else {
                0.0
            },
            // NaN here makes `residence >= NaN` false: nothing is moved for
            // load, which is the conservative outcome.
            min_residence_secs: config.min_residence_secs,
            max_conc: config.max_concurrent_per_node,
            horizon_secs: config.benefit_horizon_secs,
            fixed_cost_secs: sane_amount(config.fixed_cost_secs),
            bandwidth,
            low_watermark: config.mem_low_watermark,
            reserve: effective_reserve(config),
            post_copy_threshold: config.post_copy_threshold_bytes,
            max_moves: config.max_moves_per_plan,
        }
    }

    fn cost_secs(&self, rss: u64) -> f64 {
        self.fixed_cost_secs + rss as f64 / self.bandwidth
    }
}

// ---------------------------------------------------------------------------
// Simulation state
// ---------------------------------------------------------------------------

/// Ordered-set key: lightest node first, ties by name (index order == name order).
#[derive(Debug, Clone, Copy)]
struct LightKey {
    norm: f64,
    idx: usize,
}

impl Ord for LightKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.norm
            .total_cmp(&other.norm)
            .then(self.idx.cmp(&other.idx))
    }
}
impl PartialOrd for LightKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for LightKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for LightKey {}

/// Ordered-set key: heaviest node first, ties by name.
#[derive(Debug, Clone, Copy)]
struct HeavyKey {
    norm: f64,
    idx: usize,
}

impl Ord for HeavyKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .norm
            .total_cmp(&self.norm)
            .then(self.idx.cmp(&other.idx))
    }
}
impl PartialOrd for HeavyKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for HeavyKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for HeavyKey {}

/// Mutable copy of the cluster that planned moves are applied to.
struct State<'a> {
    /// Usable nodes sorted by name, so an index comparison is a name comparison.
    nodes: Vec<&'a NodeSnapshot>,
    load: Vec<f64>,
    avail: Vec<u64>,
    /// in-flight + planned migrations touching the node
    conc: Vec<u32>,
    /// Deduplicated jobs that live on usable nodes.
    jobs: Vec<&'a JobSnapshot>,
    job_node: Vec<usize>,
    job_demand: Vec<f64>,
    moved: Vec<bool>,
    /// Residence of each job in seconds, as of now.
    residence: Vec<f64>,
    /// Job indices per node, in load-balancing preference order:
    /// highest demand, then smallest rss, then id.
    jobs_on: Vec<Vec<usize>>,
}

impl<'a> State<'a> {
    /// `jobs`: each with the seconds to add to its residence.
    fn new(
        all_nodes: impl Iterator<Item = &'a NodeSnapshot>,
        jobs_in: &[(&'a JobSnapshot, f64)],
    ) -> Self {
        let mut nodes: Vec<&NodeSnapshot> = all_nodes.filter(|n| is_usable(n)).collect();
        nodes.sort_by(|a, b| cmp_nodes(a, b));
        // Keep one entry per name (the first in the total order) so that
        // duplicates cannot make the result depend on input order.
        nodes.dedup_by(|later, earlier| later.name == earlier.name);
        let mut index: FastMap<&str, usize> =
            FastMap::with_capacity_and_hasher(nodes.len(), Default::default());
        for (i, n) in nodes.iter().enumerate() {
            index.insert(n.name.as_str(), i);
        }

        // Deduplicate jobs by id: id -> position in the snapshot. The winner
        // of each id is fixed by `cmp_jobs`, not by input order.
        let mut winner: FastMap<&str, usize> =
            FastMap::with_capacity_and_hasher(jobs_in.len(), Default::default());
        // Node index of every job that lives on a usable node.
        let mut node_of: Vec<Option<usize>> = Vec::with_capacity(jobs_in.len());
        for (pos, &(job, _)) in jobs_in.iter().enumerate() {
            let node = index.get(job.node.as_str()).copied();
            node_of.push(node);
            if node.is_none() {
                continue; // job on a down/unknown/unusable node: ignored
            }
            match winner.entry(job.id.as_str()) {
                Entry::Vacant(e) => {
                    e.insert(pos);
                }
                Entry::Occupied(mut e) => {
                    if cmp_jobs(job, jobs_in[*e.get()].0) == Ordering::Less {
                        e.insert(pos);
                    }
                }
            }
        }
        // Flagging winners is order-independent, so walking the map is fine.
        let mut keep = vec![false; jobs_in.len()];
        for &pos in winner.values() {
            if let Some(k) = keep.get_mut(pos) {
                *k = true;
            }
        }

        let mut jobs = Vec::with_capacity(winner.len());
        let mut job_node = Vec::with_capacity(winner.len());
        let mut job_demand = Vec::with_capacity(winner.len());
        let mut job_rss = Vec::with_capacity(winner.len());
        let mut residence = Vec::with_capacity(winner.len());
        let mut jobs_on: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
        for ((&(job, age), node), keep) in jobs_in.iter().zip(node_of).zip(keep) {
            if let (Some(node), true) = (node, keep) {
                let j = jobs.len();
                jobs.push(job);
                residence.push(job.residence_secs + age);
                job_node.push(node);
                job_demand.push(sane_amount(job.cpu_demand));
                job_rss.push(job.rss_bytes);
                jobs_on[node].push(j);
            }
        }
        // Sorting by a key that ends in the (unique) id makes the order
        // independent of the input order. Demand and rss are read from dense
        // vectors: chasing each job's snapshot for them is cache-unfriendly.
        for list in &mut jobs_on {
            list.sort_unstable_by(|&a, &b| {
                job_demand[b]
                    .total_cmp(&job_demand[a])
                    .then(job_rss[a].cmp(&job_rss[b]))
                    .then_with(|| jobs[a].id.cmp(&jobs[b].id))
            });
        }

        State {
            load: nodes.iter().map(|n| sane_amount(n.load)).collect(),
            avail: nodes.iter().map(|n| n.mem_available_bytes).collect(),
            conc: nodes.iter().map(|n| n.migrations_in_flight).collect(),
            moved: vec![false; jobs.len()],
            residence,
            nodes,
            jobs,
            job_node,
            job_demand,
            jobs_on,
        }
    }

    fn norm(&self, i: usize) -> f64 {
        self.load[i] / self.nodes[i].capacity
    }

    fn light_key(&self, i: usize) -> LightKey {
        LightKey {
            norm: self.norm(i),
            idx: i,
        }
    }

    fn heavy_key(&self, i: usize) -> HeavyKey {
        HeavyKey {
            norm: self.norm(i),
            idx: i,
        }
    }

    fn has_conc_room(&self, i: usize, ctx: &Ctx) -> bool {
        self.conc[i] < ctx.max_conc
    }

    /// Whether node `i` may be a target now: not blocked, with room for
    /// one more migration.
    fn can_receive(&self, i: usize, ctx: &Ctx) -> bool {
        !self.nodes[i].blocked && self.has_conc_room(i, ctx)
    }

    /// Whether node `t` can host job `j` at all (its own address).
    fn may_host(&self, t: usize, j: usize) -> bool {
        !self.jobs[j].own_address || self.nodes[t].job_addresses
    }

    fn fits(&self, t: usize, rss: u64, ctx: &Ctx) -> bool {
        fits(
            self.avail[t],
            self.nodes[t].mem_total_bytes,
            rss,
            ctx.reserve,
        )
    }

    fn is_low_on_memory(&self, i: usize, ctx: &Ctx) -> bool {
        let total = self.nodes[i].mem_total_bytes;
        // Unknown memory size (0) cannot be judged; leave such nodes alone.
        total > 0 && (self.avail[i] as f64) < ctx.low_watermark * total as f64
    }

    /// Reduction of the pair's max normalised load if demand `d` moves s → t.
    fn gain(&self, s: usize, t: usize, d: f64) -> f64 {
        let cs = self.nodes[s].capacity;
        let ct = self.nodes[t].capacity;
        let before = (self.load[s] / cs).max(self.load[t] / ct);
        // The node's load may be smaller than the sum of its jobs' demand
        // (smoothing, stale data); never let it go negative.
        let after = (sane_amount(self.load[s] - d) / cs).max((self.load[t] + d) / ct);
        before - after
    }

    fn eligible_for_balance(&self, j: usize, ctx: &Ctx) -> bool {
        let job = self.jobs[j];
        !self.moved[j]
            && job.migratable
            && !job.pinned
            && self.residence[j] >= ctx.min_residence_secs
            && self.job_demand[j] > 0.0
    }

    /// Applies the move to the simulation and records it.
    fn apply(&mut self, j: usize, t: usize, reason: MoveReason, ctx: &Ctx) -> Move {
        let s = self.job_node[j];
        let d = self.job_demand[j];
        let rss = self.jobs[j].rss_bytes;
        let expected_gain = self.gain(s, t, d);
        self.load[s] = sane_amount(self.load[s] - d);
        self.load[t] += d;
        self.avail[s] = self.avail[s].saturating_add(rss);
        self.avail[t] = self.avail[t].saturating_sub(rss);
        self.conc[s] = self.conc[s].saturating_add(1);
        self.conc[t] = self.conc[t].saturating_add(1);
        self.moved[j] = true;
        Move {
            job_id: self.jobs[j].id.clone(),
            from: self.nodes[s].name.clone(),
            to: self.nodes[t].name.clone(),
            reason,
            expected_gain,
            estimated_cost_secs: ctx.cost_secs(rss),
            post_copy: rss >= ctx.post_copy_threshold && !self.jobs[j].post_copy_failed,
        }
    }

    /// max/min normalised load over usable nodes.
    fn imbalance(&self) -> f64 {
        let mut max = 0.0_f64;
        let mut min = f64::INFINITY;
        for i in 0..self.nodes.len() {
            let n = self.norm(i);
            max = max.max(n);
            min = min.min(n);
        }
        if self.nodes.is_empty() || max <= 0.0 {
            1.0
        } else if min <= 0.0 {
            f64::INFINITY
        } else {
            max / min
        }
    }
}

// ---------------------------------------------------------------------------
// Memory ushering
// ---------------------------------------------------------------------------

fn usher_memory(state: &mut State<'_>, ctx: &Ctx, moves: &mut Vec<Move>) {
    // Targets with concurrency room, most available memory first, ties by name.
    let mut by_mem: BTreeSet<(std::cmp::Reverse<u64>, usize)> = (0..state.nodes.len())
        .filter(|&i| state.can_receive(i, ctx))
        .map(|i| (std::cmp::Reverse(state.avail[i]), i))
        .collect();

    for src in 0..state.nodes.len() {
        if !state.is_low_on_memory(src, ctx) {
            continue;
        }
        // Jobs without RSS free no memory, so they are useless here.
        let mut candidates: Vec<usize> = state.jobs_on[src]
            .iter()
            .copied()
            .filter(|&j| {
                let job = state.jobs[j];
                !state.moved[j] && job.migratable && !job.pinned && job.rss_bytes > 0
            })
            .collect();
        // Largest first: fewest migrations to get back above the watermark.
        candidates.sort_by(|&a, &b| {
            state.jobs[b]
                .rss_bytes
                .cmp(&state.jobs[a].rss_bytes)
                .then(state.jobs[a].id.cmp(&state.jobs[b].id))
        });

        for j in candidates {
            if moves.len() >= ctx.max_moves {
                return;
            }
            if !state.is_low_on_memory(src, ctx) || !state.has_conc_room(src, ctx) {
                break;
            }
            let rss = state.jobs[j].rss_bytes;
            let mut target = None;
            for &(std::cmp::Reverse(avail), t) in &by_mem {
                if avail < rss {
                    break; // sorted by available memory: nobody further can fit it
                }
                if t != src && state.fits(t, rss, ctx) && state.may_host(t, j) {
                    target = Some(t);
                    break;
                }
            }
            // If this job fits nowhere a smaller one still might: keep going.
            let Some(t) = target else { continue };
            by_mem.remove(&(std::cmp::Reverse(state.avail[src]), src));
            by_mem.remove(&(std::cmp::Reverse(state.avail[t]), t));
            moves.push(state.apply(j, t, MoveReason::MemoryUshering, ctx));
            for i in [src, t] {
                if state.can_receive(i, ctx) {
                    by_mem.insert((std::cmp::Reverse(state.avail[i]), i));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Load balancing
// ---------------------------------------------------------------------------

fn balance_load(state: &mut State<'_>, ctx: &Ctx, moves: &mut Vec<Move>) {
    let n = state.nodes.len();
    // Nodes with concurrency room, lightest first: candidate targets.
    let mut targets: BTreeSet<LightKey> = (0..n)
        .filter(|&i| state.can_receive(i, ctx))
        .map(|i| state.light_key(i))
        .collect();
    // Nodes with concurrency room and something movable, heaviest first.
    let mut sources: BTreeSet<HeavyKey> = (0..n)
        .filter(|&i| {
            state.has_conc_room(i, ctx)
                && state.jobs_on[i]
                    .iter()
                    .any(|&j| state.eligible_for_balance(j, ctx))
        })
        .map(|i| state.heavy_key(i))
        .collect();

    // Termination: every iteration either records a move (bounded by
    // max_moves) or removes a source that is never re-added.
    while moves.len() < ctx.max_moves {
        let Some(&top) = sources.first() else { break };
        let Some(&lightest) = targets.first() else {
            break;
        };
        // For any s → t move with s heavier than t, the pair's new max is
        // above t's old load, so gain < norm(s) - norm(t). If even the
        // heaviest source cannot beat the hysteresis against the lightest
        // target, nobody can.
        if !greater(top.norm - lightest.norm, ctx.hysteresis) {
            break;
        }
        let Some((j, t)) = best_move_from(state, ctx, &targets, top.idx) else {
            // Retired for this plan: targets only get fuller from here on.
            sources.remove(&top);
            continue;
        };
        let s = top.idx;
        let t_was_source = sources.remove(&state.heavy_key(t));
        sources.remove(&top);
        targets.remove(&state.light_key(s));
        targets.remove(&state.light_key(t));
        moves.push(state.apply(j, t, MoveReason::LoadBalance, ctx));
        for i in [s, t] {
            if state.can_receive(i, ctx) {
                targets.insert(state.light_key(i));
            }
        }
        if state.has_conc_room(s, ctx) {
            sources.insert(state.heavy_key(s));
        }
        if t_was_source && state.has_conc_room(t, ctx) {
            sources.insert(state.heavy_key(t));
        }
    }
}

/// Best acceptable (job, target) for source `s`, if any.
fn best_move_from(
    state: &State<'_>,
    ctx: &Ctx,
    targets: &BTreeSet<LightKey>,
    s: usize,
) -> Option<(usize, usize)> {
    if !state.has_conc_room(s, ctx) {
        return None;
    }
    let s_norm = state.norm(s);
    let candidates: Vec<usize> = state.jobs_on[s]
        .iter()
        .copied()
        .filter(|&j| state.eligible_for_balance(j, ctx))
        .collect();
    let min_rss = candidates.iter().map(|&j| state.jobs[j].rss_bytes).min()?;

    // The K lightest targets that could hold at least the smallest candidate.
    let mut chosen_targets = Vec::with_capacity(LB_TARGET_CANDIDATES);
    for key in targets.iter().take(LB_TARGET_SCAN_LIMIT) {
        if key.idx == s {
            continue;
        }
        if !greater(s_norm - key.norm, ctx.hysteresis) {
            break; // gain < s_norm - t_norm: this and all heavier targets fail
        }
        if state.fits(key.idx, min_rss, ctx) {
            chosen_targets.push(key.idx);
            if chosen_targets.len() >= LB_TARGET_CANDIDATES {
                break;
            }
        }
    }
    if chosen_targets.is_empty() {
        return None;
    }

    // (gain, target, job). Ties: lighter target, then lower target index
    // (= name), then the job earlier in try order (highest demand, smallest
    // rss, then id): with equal gain the smaller job is the cheaper migration.
    let mut best: Option<(f64, usize, usize)> = None;
    let mut prev_class: Option<(u64, u64, bool)> = None;
    for &j in &candidates {
        let d = state.job_demand[j];
        let rss = state.jobs[j].rss_bytes;
        // Jobs with equal demand and rss behave identically; the list is
        // sorted so the first of them has the smallest id and would win any
        // tie, so the rest need not be evaluated.
        let class = (d.to_bits(), rss, state.jobs[j].own_address);
        if prev_class == Some(class) {
            continue;
        }
        prev_class = Some(class);
        let cost = ctx.cost_secs(rss);
        for &t in &chosen_targets {
            if !state.fits(t, rss, ctx) || !state.may_host(t, j) {
                continue;
            }
            let gain = state.gain(s, t, d);
            if !greater(gain, ctx.hysteresis) || !greater(gain * ctx.horizon_secs, cost) {
                continue;
            }
            let better = match best {
                None => true,
                Some((bg, bt, _)) => match gain.total_cmp(&bg) {
                    Ordering::Greater => true,
                    Ordering::Less => false,
                    // Equal gain is common while the source stays the
                    // heavier node of the pair. Prefer the currently lighter
                    // target (spreads work instead of stacking it on the
                    // alphabetically first idle node), then the lower name;
                    // for the same target the job seen first keeps it.
                    Ordering::Equal => match state.norm(t).total_cmp(&state.norm(bt)) {
                        Ordering::Less => true,
                        Ordering::Greater => false,
                        Ordering::Equal => t < bt,
                    },
                },
            };
            if better {
                best = Some((gain, t, j));
            }
        }
    }
    best.map(|(_, t, j)| (j, t))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// An idle, unblocked node with 16 GiB (12 free); also the drain tests'.
    pub(crate) fn node(name: &str, capacity: f64, load: f64) -> NodeSnapshot {
        NodeSnapshot {
            name: name.to_string(),
            up: true,
            capacity,
            load,
            mem_total_bytes: 16 * GIB,
            mem_available_bytes: 12 * GIB,
            migrations_in_flight: 0,
            blocked: false,
            job_addresses: true,
        }
    }

    fn job(id: &str, node: &str, demand: f64) -> JobSnapshot {
        JobSnapshot {
            id: id.to_string(),
            node: node.to_string(),
            rss_bytes: 64 * MIB,
            cpu_demand: demand,
            residence_secs: 100.0,
            pinned: false,
            migratable: true,
            post_copy_failed: false,
            own_address: false,
        }
    }

    fn snap(nodes: Vec<NodeSnapshot>, jobs: Vec<JobSnapshot>) -> ClusterSnapshot {
        ClusterSnapshot {
            nodes,
            jobs,
            bandwidth_bytes_per_sec: 0.0,
        }
    }

    /// `count` jobs of demand 1.0 on `node`, ids `{prefix}{i:02}`.
    fn jobs_on(prefix: &str, node: &str, count: usize) -> Vec<JobSnapshot> {
        (0..count)
            .map(|i| job(&format!("{prefix}{i:02}"), node, 1.0))
            .collect()
    }

    /// Applies a plan as if every migration completed instantly.
    fn apply(s: &mut ClusterSnapshot, plan: &Plan) {
        for m in &plan.moves {
            let j = s
                .jobs
                .iter_mut()
                .find(|j| j.id == m.job_id)
                .expect("planned job exists");
            assert_eq!(j.node, m.from, "move source must be the job's node");
            j.node = m.to.clone();
            j.residence_secs = 0.0;
            let d = j.cpu_demand.max(0.0);
            let rss = j.rss_bytes;
            let from = s.nodes.iter_mut().find(|n| n.name == m.from).expect("from");
            from.load -= d;
            from.mem_available_bytes += rss;
            let to = s.nodes.iter_mut().find(|n| n.name == m.to).expect("to");
            to.load += d;
            to.mem_available_bytes -= rss;
        }
    }

    fn advance(s: &mut ClusterSnapshot, secs: f64) {
        for j in &mut s.jobs {
            j.residence_secs += secs;
        }
    }

    fn count_on(s: &ClusterSnapshot, name: &str) -> usize {
        s.jobs.iter().filter(|j| j.node == name).count()
    }

    fn norm_of(s: &ClusterSnapshot, name: &str) -> f64 {
        normalised_load(s.nodes.iter().find(|n| n.name == name).expect("node"))
    }

    /// Runs plan/apply rounds until a plan is empty; returns rounds with moves.
    fn converge(s: &mut ClusterSnapshot, cfg: &PolicyConfig, max_rounds: usize) -> usize {
        for round in 0..max_rounds {
            let p = plan(s, cfg);
            if p.moves.is_empty() {
                return round;
            }
            apply(s, &p);
            advance(s, 30.0);
        }
        panic!("did not converge within {max_rounds} rounds");
    }

    fn assert_concurrency(s: &ClusterSnapshot, p: &Plan, cfg: &PolicyConfig) {
        for n in &s.nodes {
            let touching = p
                .moves
                .iter()
                .filter(|m| m.from == n.name || m.to == n.name)
                .count() as u32;
            if touching > 0 {
                assert!(
                    n.migrations_in_flight + touching <= cfg.max_concurrent_per_node,
                    "node {} has {} in flight + {} planned",
                    n.name,
                    n.migrations_in_flight,
                    touching
                );
            }
        }
    }

    /// Tiny deterministic PRNG so tests need no extra crates.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let k = self.below(i + 1);
                v.swap(i, k);
            }
        }
    }

    // 1.
    #[test]
    fn equal_nodes_converge_and_stay_stable() {
        let cfg = PolicyConfig::default();
        let mut s = snap(
            vec![
                node("node1", 1.0, 8.0),
                node("node2", 1.0, 0.0),
                node("node3", 1.0, 0.0),
                node("node4", 1.0, 0.0),
            ],
            jobs_on("j", "node1", 8),
        );
        let first = plan(&s, &cfg);
        assert!(!first.moves.is_empty());
        assert!(first.imbalance_before.is_infinite());
        let rounds = converge(&mut s, &cfg, 6);
        assert!(rounds <= 5, "took {rounds} rounds");
        for name in ["node1", "node2", "node3", "node4"] {
            assert_eq!(count_on(&s, name), 2, "{name}");
        }
        for _ in 0..5 {
            let p = plan(&s, &cfg);
            assert!(p.moves.is_empty(), "ping-pong: {:?}", p.moves);
            assert_eq!(p.imbalance_before, 1.0);
            advance(&mut s, 30.0);
        }
    }

    // 2.
    #[test]
    fn unequal_capacities_get_proportional_share() {
        let cfg = PolicyConfig::default();
        let mut s = snap(
            vec![
                node("a", 2.0, 0.0),
                node("b", 1.0, 0.0),
                node("c", 1.0, 0.0),
                node("d", 0.5, 9.0),
            ],
            jobs_on("j", "d", 9),
        );
        converge(&mut s, &cfg, 20);
        let norms: Vec<f64> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| norm_of(&s, n))
            .collect();
        let max = norms.iter().cloned().fold(f64::MIN, f64::max);
        let min = norms.iter().cloned().fold(f64::MAX, f64::min);
        assert!(min > 0.0 && max / min <= 1.5, "norms {norms:?}");
        // Bigger node ends up with more jobs than the smallest one.
        assert!(count_on(&s, "a") > count_on(&s, "d"));
        let p = plan(&s, &cfg);
        assert!(p.moves.is_empty());
        assert!(p.imbalance_before <= 1.5);
    }

    // 3.
    #[test]
    fn hysteresis_blocks_swapping_moves() {
        let cfg = PolicyConfig::default();
        let s = snap(
            vec![node("a", 1.0, 2.0), node("b", 1.0, 1.0)],
            vec![
                job("a1", "a", 1.0),
                job("a2", "a", 1.0),
                job("b1", "b", 1.0),
            ],
        );
        assert!(plan(&s, &cfg).moves.is_empty());
        // Control: with 3 vs 1 the same setup does move.
        let s = snap(
            vec![node("a", 1.0, 3.0), node("b", 1.0, 1.0)],
            vec![
                job("a1", "a", 1.0),
                job("a2", "a", 1.0),
                job("a3", "a", 1.0),
                job("b1", "b", 1.0),
            ],
        );
        assert_eq!(plan(&s, &cfg).moves.len(), 1);

        // Positive but small gains: every possible move gains exactly 0.2.
        let s = snap(
            vec![node("a", 1.0, 2.0), node("b", 1.0, 1.0)],
            vec![
                job("a1", "a", 1.0),
                job("a2", "a", 0.8),
                job("a3", "a", 0.2),
                job("b1", "b", 1.0),
            ],
        );
        assert!(plan(&s, &cfg).moves.is_empty());
        let low = PolicyConfig {
            hysteresis: 0.1,
            ..cfg
        };
        assert_eq!(plan(&s, &low).moves.len(), 1);
    }

    // 4.
    #[test]
    fn young_jobs_are_not_moved() {
        let cfg = PolicyConfig::default();
        let mut jobs = jobs_on("j", "a", 4);
        for j in &mut jobs {
            j.residence_secs = cfg.min_residence_secs - 1.0;
        }
        let mut s = snap(vec![node("a", 1.0, 4.0), node("b", 1.0, 0.0)], jobs);
        assert!(plan(&s, &cfg).moves.is_empty());
        // One job old enough: only it may move.
        s.jobs[2].residence_secs = cfg.min_residence_secs;
        let p = plan(&s, &cfg);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].job_id, "j02");
        assert_eq!(p.moves[0].reason, MoveReason::LoadBalance);
    }

    // 5.
    #[test]
    fn pinned_and_non_migratable_jobs_stay() {
        let cfg = PolicyConfig::default();
        let mut jobs = jobs_on("j", "a", 6);
        for (i, j) in jobs.iter_mut().enumerate() {
            if i % 2 == 0 {
                j.pinned = true;
            } else {
                j.migratable = false;
            }
        }
        let nodes = vec![
            node("a", 1.0, 6.0),
            node("b", 1.0, 0.0),
            node("c", 1.0, 0.0),
        ];
        let s = snap(nodes.clone(), jobs.clone());
        assert!(plan(&s, &cfg).moves.is_empty());

        // Also under memory pressure.
        let mut low = nodes.clone();
        low[0].mem_available_bytes = GIB / 2;
        assert!(plan(&snap(low, jobs.clone()), &cfg).moves.is_empty());

        // Mixed: only the free job moves.
        jobs.push(job("free", "a", 1.0));
        let mut nodes = nodes;
        nodes[0].load = 7.0;
        let p = plan(&snap(nodes, jobs), &cfg);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].job_id, "free");
    }

    // 6a.
    #[test]
    fn target_without_memory_is_never_chosen() {
        let cfg = PolicyConfig::default();
        let mut big = job("big", "src", 2.0);
        big.rss_bytes = 6 * GIB;
        let mut tiny = node("tiny", 1.0, 0.0); // least loaded, but only 4 GiB free
        tiny.mem_available_bytes = 4 * GIB;
        let s = snap(
            vec![node("src", 1.0, 5.0), tiny.clone(), node("roomy", 1.0, 1.0)],
            vec![
                big.clone(),
                job("s1", "src", 1.0),
                job("s2", "src", 1.0),
                job("s3", "src", 1.0),
            ],
        );
        let p = plan(&s, &cfg);
        // big → tiny would gain 2.0 and win the tie against big → roomy as the
        // lighter target, were memory ignored.
        assert_eq!(p.moves[0].job_id, "big", "{:?}", p.moves);
        assert_eq!(p.moves[0].to, "roomy");
        for m in &p.moves {
            assert!(!(m.job_id == "big" && m.to == "tiny"), "{m:?}");
        }
        // Only the big job and no room anywhere else: nothing moves.
        let s = snap(vec![node("src", 1.0, 4.0), tiny], vec![big]);
        assert!(plan(&s, &cfg).moves.is_empty());
    }

    // 6b.
    #[test]
    fn low_memory_node_gets_jobs_ushered_off() {
        let cfg = PolicyConfig::default();
        let mut low = node("low", 1.0, 1.0);
        low.mem_available_bytes = GIB / 2; // ~3% free, watermark 10%
        let mut jobs = Vec::new();
        for (i, rss) in [GIB, 2 * GIB, 512 * MIB].iter().enumerate() {
            let mut j = job(&format!("m{i}"), "low", 0.3);
            j.rss_bytes = *rss;
            j.residence_secs = 1.0; // young: ushering ignores residence
            jobs.push(j);
        }
        let mut other = node("other", 1.0, 1.0);
        other.mem_available_bytes = 8 * GIB;
        // Most free bytes of all, but 20 GiB of 1 TiB is below its own reserve,
        // so it cannot take anything.
        let mut huge = node("huge", 1.0, 1.0);
        huge.mem_total_bytes = 1024 * GIB;
        huge.mem_available_bytes = 20 * GIB;
        let mut s = snap(vec![low, node("roomy", 1.0, 1.0), other, huge], jobs);
        let p = plan(&s, &cfg);
        // Largest first; 2 GiB lifts "low" to 2.5 GiB ≥ 1.6 GiB, so one move suffices.
        assert_eq!(p.moves.len(), 1, "{:?}", p.moves);
        let m = &p.moves[0];
        assert_eq!(m.reason, MoveReason::MemoryUshering);
        assert_eq!(m.job_id, "m1");
        assert_eq!(m.to, "roomy"); // 12 GiB free beats 8 GiB; "huge" has no room
        apply(&mut s, &p);
        let low = s.nodes.iter().find(|n| n.name == "low").expect("low");
        assert!(low.mem_available_bytes as f64 >= 0.10 * low.mem_total_bytes as f64);
        advance(&mut s, 1.0);
        assert!(plan(&s, &cfg).moves.is_empty(), "no ushering back");
    }

    // 7.
    #[test]
    fn concurrency_limit_respected() {
        let cfg = PolicyConfig::default();
        let mut busy = node("busy", 1.0, 10.0);
        busy.migrations_in_flight = 1;
        let s = snap(
            vec![
                busy,
                node("t1", 1.0, 0.0),
                node("t2", 1.0, 0.0),
                node("t3", 1.0, 0.0),
            ],
            jobs_on("j", "busy", 10),
        );
        let p = plan(&s, &cfg);
        assert_eq!(p.moves.len(), 1);
        assert_concurrency(&s, &p, &cfg);

        // Randomised cluster with in-flight migrations and low-memory nodes.
        let mut rng = Lcg(7);
        let mut nodes = Vec::new();
        let mut jobs = Vec::new();
        for i in 0..30 {
            let name = format!("n{i:02}");
            let count = if i < 10 {
                6 + rng.below(6)
            } else {
                rng.below(2)
            };
            let mut n = node(&name, 1.0, count as f64);
            n.migrations_in_flight = rng.below(3) as u32;
            if i % 7 == 0 {
                n.mem_available_bytes = GIB / 4;
                n.migrations_in_flight = 1; // room for exactly one more
            }
            nodes.push(n);
            for k in 0..count {
                let mut j = job(&format!("{name}-{k}"), &name, 1.0);
                j.rss_bytes = (1 + rng.below(512)) as u64 * MIB;
                jobs.push(j);
            }
        }
        let s = snap(nodes, jobs);
        let p = plan(&s, &cfg);
        assert!(!p.moves.is_empty());
        assert!(p
            .moves
            .iter()
            .any(|m| m.reason == MoveReason::MemoryUshering));
        assert_concurrency(&s, &p, &cfg);
    }

    // 8.
    #[test]
    fn huge_job_not_moved_for_small_gain() {
        let cfg = PolicyConfig::default();
        let mut huge = job("huge", "a", 1.0);
        huge.rss_bytes = 100 * GIB;
        let mut a = node("a", 1.0, 3.0);
        a.mem_total_bytes = 512 * GIB;
        a.mem_available_bytes = 300 * GIB;
        let mut b = a.clone();
        b.name = "b".into();
        b.load = 1.0;
        let mut s = snap(vec![a, b], vec![huge, job("b1", "b", 1.0)]);
        s.bandwidth_bytes_per_sec = 1e6;
        // Gain would be 1.0 (3,1 → 2,2) but cost is ~107,000 s.
        assert!(plan(&s, &cfg).moves.is_empty());
        // Control: a small job in the same spot is moved.
        s.jobs[0].rss_bytes = MIB;
        let p = plan(&s, &cfg);
        assert_eq!(p.moves.len(), 1);
        assert!(p.moves[0].estimated_cost_secs < 2.0);
        assert!((p.moves[0].expected_gain - 1.0).abs() < 1e-9);
    }

    // 9.
    #[test]
    fn plan_is_independent_of_input_order() {
        let cfg = PolicyConfig::default();
        let mut rng = Lcg(42);
        let mut nodes = Vec::new();
        let mut jobs = Vec::new();
        for i in 0..40 {
            let name = format!("n{i:02}");
            // Many equal loads and equal jobs to exercise tie-breaking.
            let count = if i % 3 == 0 { 6 } else { rng.below(3) };
            let mut n = node(&name, [1.0, 2.0, 0.5][i % 3], count as f64);
            if i == 9 {
                n.mem_available_bytes = GIB / 8;
            }
            nodes.push(n);
            for k in 0..count {
                let mut j = job(&format!("{name}-{k}"), &name, 1.0);
                j.rss_bytes = [64 * MIB, 128 * MIB][rng.below(2)];
                jobs.push(j);
            }
        }
        // A duplicate id and a duplicate node name must not break determinism.
        let mut dup = jobs[0].clone();
        dup.node = "n03".into();
        jobs.push(dup);
        let mut dup_node = nodes[5].clone();
        dup_node.load = 9.0;
        nodes.push(dup_node);

        let base = snap(nodes, jobs);
        let expected = plan(&base, &cfg);
        assert!(expected.moves.len() > 5);
        for seed in 0..10 {
            let mut rng = Lcg(seed);
            let mut s = base.clone();
            rng.shuffle(&mut s.nodes);
            rng.shuffle(&mut s.jobs);
            assert_eq!(plan(&s, &cfg), expected, "seed {seed}");
        }
    }

    // 10.
    #[test]
    fn down_and_broken_nodes_take_no_part() {
        let cfg = PolicyConfig::default();
        let mut down_busy = node("down_busy", 1.0, 8.0);
        down_busy.up = false;
        let mut down_idle = node("a_down_idle", 4.0, 0.0);
        down_idle.up = false;
        let s = snap(
            vec![
                down_busy,
                down_idle,
                node("busy", 1.0, 6.0),
                node("idle", 1.0, 0.0),
                node("zero_cap", 0.0, 0.0),
                node("nan_cap", f64::NAN, 0.0),
                node("neg_cap", -1.0, 0.0),
                node("inf_cap", f64::INFINITY, 0.0),
                node("nan_load", 1.0, f64::NAN),
            ],
            [
                jobs_on("d", "down_busy", 8),
                jobs_on("b", "busy", 6),
                jobs_on("z", "zero_cap", 2),
                jobs_on("x", "nowhere", 2),
            ]
            .concat(),
        );
        let p = plan(&s, &cfg);
        assert!(!p.moves.is_empty());
        for m in &p.moves {
            assert_eq!(m.from, "busy", "{m:?}");
            assert!(m.to == "idle" || m.to == "nan_load", "{m:?}");
        }
        assert!(p.imbalance_before.is_infinite());
        assert!(p.imbalance_after.is_finite());
        assert_eq!(normalised_load(&node("x", 0.0, 1.0)), f64::INFINITY);
        assert_eq!(normalised_load(&node("x", 2.0, f64::NAN)), 0.0);

        // Garbage everywhere: must not panic or hang.
        let mut nasty = job("nasty", "busy", f64::NAN);
        nasty.residence_secs = f64::NAN;
        let mut inf_job = job("inf", "busy", f64::INFINITY);
        inf_job.rss_bytes = u64::MAX;
        let mut s2 = s.clone();
        s2.jobs.push(nasty);
        s2.jobs.push(inf_job);
        s2.bandwidth_bytes_per_sec = f64::NAN;
        let bad_cfg = PolicyConfig {
            hysteresis: f64::NAN,
            min_residence_secs: f64::NAN,
            benefit_horizon_secs: f64::INFINITY,
            fixed_cost_secs: f64::NAN,
            default_bandwidth_bytes_per_sec: -1.0,
            mem_low_watermark: f64::NAN,
            mem_reserve_fraction: f64::NAN,
            ..PolicyConfig::default()
        };
        let _ = plan(&s2, &bad_cfg);
        let _ = plan(&s2, &cfg);
        let _ = place(&s2, &bad_cfg, 1, f64::NAN);
        let empty = plan(&snap(vec![], vec![]), &cfg);
        assert!(empty.moves.is_empty());
        assert_eq!(empty.imbalance_before, 1.0);
    }

    // 11.
    #[test]
    fn place_picks_least_loaded_node_with_memory() {
        let cfg = PolicyConfig::default();
        let mut full = node("a_full", 4.0, 0.0);
        full.mem_available_bytes = 3 * GIB; // reserve is 1.6 GiB
        let mut down = node("b_down", 4.0, 0.0);
        down.up = false;
        let s = snap(
            vec![
                full,
                down,
                node("slow", 1.0, 1.0),   // (1+1)/1 = 2
                node("fast", 4.0, 3.0),   // (3+1)/4 = 1
                node("fast2", 4.0, 3.0),  // tie with fast → name order
                node("broken", 0.0, 0.0), // unusable
            ],
            vec![],
        );
        assert_eq!(place(&s, &cfg, 2 * GIB, 1.0), Some("fast".to_string()));
        // Small job fits on the empty, memory-poor node.
        assert_eq!(place(&s, &cfg, 10 * MIB, 1.0), Some("a_full".to_string()));
        assert_eq!(place(&s, &cfg, 100 * GIB, 1.0), None);
        assert_eq!(place(&snap(vec![], vec![]), &cfg, 0, 1.0), None);
    }

    // 12.
    #[test]
    fn post_copy_flag_follows_threshold() {
        let cfg = PolicyConfig::default();
        let mut jobs = jobs_on("j", "a", 4);
        jobs[0].rss_bytes = cfg.post_copy_threshold_bytes; // at threshold
        jobs[1].rss_bytes = cfg.post_copy_threshold_bytes - 1;
        jobs[2].rss_bytes = 2 * GIB;
        jobs[3].rss_bytes = MIB;
        let s = snap(
            vec![
                node("a", 1.0, 4.0),
                node("b", 1.0, 0.0),
                node("c", 1.0, 0.0),
            ],
            jobs,
        );
        let cfg = PolicyConfig {
            max_concurrent_per_node: 10,
            ..cfg
        };
        let p = plan(&s, &cfg);
        assert!(p.moves.len() >= 2);
        for m in &p.moves {
            let j = s.jobs.iter().find(|j| j.id == m.job_id).expect("job");
            assert_eq!(m.post_copy, j.rss_bytes >= cfg.post_copy_threshold_bytes);
        }
        let mut big = s.clone();
        for j in &mut big.jobs {
            j.rss_bytes = GIB;
        }
        assert!(plan(&big, &cfg).moves.iter().all(|m| m.post_copy));
        assert!(!plan(&s, &cfg).moves.iter().all(|m| m.post_copy));

        // Exactly at the threshold counts as large; one byte less does not.
        for (rss, expected) in [
            (cfg.post_copy_threshold_bytes, true),
            (cfg.post_copy_threshold_bytes - 1, false),
        ] {
            let mut j = job("one", "a", 1.0);
            j.rss_bytes = rss;
            let s = snap(vec![node("a", 1.0, 2.0), node("b", 1.0, 0.0)], vec![j]);
            let p = plan(&s, &cfg);
            assert_eq!(p.moves.len(), 1);
            assert_eq!(p.moves[0].post_copy, expected);
        }
    }

    /// A job whose last move was a failed post-copy moves next by full
    /// copy, however large; its neighbour of the same size does not.
    #[test]
    fn a_failed_post_copy_is_retried_as_full_copy() {
        let cfg = PolicyConfig::default();
        let mut jobs = jobs_on("j", "a", 2);
        for j in &mut jobs {
            j.rss_bytes = GIB;
        }
        jobs[0].post_copy_failed = true;
        let s = snap(
            vec![
                node("a", 1.0, 3.0),
                node("b", 1.0, 0.0),
                node("c", 1.0, 0.0),
            ],
            jobs,
        );
        let cfg = PolicyConfig {
            max_concurrent_per_node: 10,
            ..cfg
        };
        let p = plan(&s, &cfg);
        assert_eq!(p.moves.len(), 2, "{p:?}");
        for m in &p.moves {
            assert_eq!(m.post_copy, m.job_id != s.jobs[0].id, "{m:?}");
        }
    }

    #[test]
    fn imbalance_after_matches_applied_plan() {
        let cfg = PolicyConfig::default();
        let mut s = snap(
            vec![
                node("a", 2.0, 8.0),
                node("b", 1.0, 1.0),
                node("c", 1.0, 2.0),
            ],
            [
                jobs_on("a", "a", 8),
                jobs_on("b", "b", 1),
                jobs_on("c", "c", 2),
            ]
            .concat(),
        );
        let p = plan(&s, &cfg);
        assert!(!p.moves.is_empty());
        assert!((p.imbalance_before - 4.0).abs() < 1e-9);
        apply(&mut s, &p);
        let again = plan(
            &s,
            &PolicyConfig {
                max_moves_per_plan: 0,
                ..cfg.clone()
            },
        );
        assert!(again.moves.is_empty());
        assert!((again.imbalance_before - p.imbalance_after).abs() < 1e-12);
        assert!(p.imbalance_after < p.imbalance_before);
    }

    #[test]
    fn max_moves_per_plan_respected() {
        let cfg = PolicyConfig {
            max_moves_per_plan: 3,
            max_concurrent_per_node: 100,
            ..PolicyConfig::default()
        };
        let mut nodes = vec![node("a", 1.0, 20.0)];
        for i in 0..10 {
            nodes.push(node(&format!("t{i}"), 1.0, 0.0));
        }
        let p = plan(&snap(nodes, jobs_on("j", "a", 20)), &cfg);
        assert_eq!(p.moves.len(), 3);
    }

    // 13.
    #[test]
    #[ignore]
    fn perf_10k_nodes_100k_jobs() {
        let mut rng = Lcg(1);
        let mut nodes = Vec::with_capacity(10_000);
        let mut jobs = Vec::with_capacity(100_000);
        for i in 0..10_000 {
            let name = format!("node{i:05}");
            let mut load = (rng.below(300) as f64) / 100.0;
            if i < 1_000 {
                load = 0.0;
                for k in 0..100 {
                    let mut j = job(&format!("job{i:05}-{k:03}"), &name, 0.0);
                    j.cpu_demand = 0.5 + rng.below(100) as f64 / 100.0;
                    j.rss_bytes = (1 + rng.below(1024)) as u64 * MIB;
                    j.residence_secs = rng.below(100) as f64;
                    load += j.cpu_demand;
                    jobs.push(j);
                }
            }
            let mut n = node(&name, [1.0, 2.0, 4.0, 8.0][i % 4], load);
            n.mem_total_bytes = 256 * GIB;
            n.mem_available_bytes = 200 * GIB;
            n.migrations_in_flight = rng.below(2) as u32;
            nodes.push(n);
        }
        let s = snap(nodes, jobs);
        for (label, cfg) in [
            ("default config", PolicyConfig::default()),
            (
                "unlimited moves",
                PolicyConfig {
                    max_moves_per_plan: usize::MAX,
                    ..PolicyConfig::default()
                },
            ),
        ] {
            let mut times = Vec::new();
            let mut count = 0;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                let p = plan(&s, &cfg);
                times.push(start.elapsed());
                count = p.moves.len();
            }
            let first = times[0];
            times.sort();
            println!(
                "10k nodes / 100k jobs, {label}: {count} moves, first call {first:?}, \
                 median of 5 {:?}, best {:?}",
                times[2], times[0]
            );
            assert!(count > 0);
        }
    }
    #[test]
    fn own_address_jobs_only_go_to_nodes_that_can_host_them() {
        let cfg = PolicyConfig::default();
        let bare = |n: NodeSnapshot| NodeSnapshot {
            job_addresses: false,
            ..n
        };
        let own = |j: JobSnapshot| JobSnapshot {
            own_address: true,
            ..j
        };
        // b is the lightest and biggest, but has no job bridge: the
        // own-address jobs go to c, the plain ones may still go to b.
        let mut jobs: Vec<JobSnapshot> = jobs_on("o", "a", 3).into_iter().map(own).collect();
        jobs.extend(jobs_on("p", "a", 3));
        let s = snap(
            vec![
                node("a", 1.0, 6.0),
                bare(node("b", 4.0, 0.0)),
                node("c", 1.0, 0.0),
            ],
            jobs,
        );
        let p = plan(&s, &cfg);
        assert!(
            p.moves.iter().any(|m| m.job_id.starts_with('o')),
            "{:?}",
            p.moves
        );
        for m in &p.moves {
            if m.job_id.starts_with('o') {
                assert_eq!(m.to, "c", "{m:?}");
            }
        }
        assert!(p.moves.iter().any(|m| m.to == "b"), "{:?}", p.moves);
        // Only bridge-less targets: an own-address job stays.
        let s = snap(
            vec![node("a", 1.0, 4.0), bare(node("b", 4.0, 0.0))],
            jobs_on("o", "a", 4).into_iter().map(own).collect(),
        );
        assert!(plan(&s, &cfg).moves.is_empty());
        // Draining picks a node that can host it, or none.
        let s = snap(
            vec![
                node("a", 1.0, 1.0),
                bare(node("b", 4.0, 0.0)),
                node("c", 1.0, 0.5),
            ],
            vec![],
        );
        let mut d = crate::balancer::drain::DrainPlanner::new(s.clone(), "a");
        assert_eq!(
            d.next_target(&own(job("o", "a", 1.0))).as_deref(),
            Some("c")
        );
        assert_eq!(d.next_target(&job("p", "a", 1.0)).as_deref(), Some("b"));
    }

    #[test]
    fn blocked_nodes_receive_nothing_but_may_shed_load() {
        let cfg = PolicyConfig::default();
        let blocked = |n: NodeSnapshot| NodeSnapshot { blocked: true, ..n };
        // b is the idle node that would take a's surplus, but it is blocked:
        // everything goes to c, and nothing to b.
        let s = snap(
            vec![
                node("a", 1.0, 6.0),
                blocked(node("b", 4.0, 0.0)),
                node("c", 1.0, 0.0),
            ],
            jobs_on("j", "a", 6),
        );
        let p = plan(&s, &cfg);
        assert!(!p.moves.is_empty());
        assert!(p.moves.iter().all(|m| m.to == "c"), "{:?}", p.moves);
        // Placement of a new job skips it too.
        assert_eq!(place(&s, &cfg, 0, 1.0).as_deref(), Some("c"));
        // Every node but the loaded one blocked: no move at all.
        let s = snap(
            vec![node("a", 1.0, 6.0), blocked(node("b", 4.0, 0.0))],
            jobs_on("j", "a", 6),
        );
        assert!(plan(&s, &cfg).moves.is_empty());
        assert_eq!(place(&s, &cfg, 0, 1.0).as_deref(), Some("a"));
        // A blocked node may still shed load to the others.
        let s = snap(
            vec![blocked(node("a", 1.0, 4.0)), node("b", 1.0, 0.0)],
            jobs_on("j", "a", 4),
        );
        let p = plan(&s, &cfg);
        assert!(!p.moves.is_empty());
        assert!(p.moves.iter().all(|m| m.from == "a" && m.to == "b"));
        // Memory ushering never picks a blocked target either.
        let mut nodes = vec![
            node("a", 1.0, 1.0),
            blocked(node("b", 1.0, 0.0)),
            node("c", 1.0, 0.0),
        ];
        nodes[0].mem_available_bytes = GIB / 2;
        nodes[1].mem_available_bytes = 15 * GIB;
        let mut jobs = jobs_on("m", "a", 2);
        for j in &mut jobs {
            j.rss_bytes = 2 * GIB;
            j.cpu_demand = 0.0;
        }
        let p = plan(&snap(nodes, jobs), &cfg);
        assert!(!p.moves.is_empty());
        assert!(
            p.moves
                .iter()
                .all(|m| m.reason == MoveReason::MemoryUshering && m.to == "c"),
            "{:?}",
            p.moves
        );
    }
}
