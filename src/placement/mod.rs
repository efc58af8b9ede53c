//! Placement of foreground jobs (`mosrun`): which node starts the next job.
//!
//! Why a table of slots and reservations, and not "the least loaded node":
//! `make -j16` starts sixteen compilers within a millisecond, and load
//! samples are a second old. Acting on the sample would send all sixteen to
//! the node that looked idle. So, as icecream, Sparrow and the Kubernetes
//! scheduler do:
//! - every node has a number of **slots** derived from its capacity
//!   ([`slots_for`]); a foreground job holds one while it runs;
//! - a placement is counted against its node **the moment it is decided**
//!   ([`Table::reserve`]), before any load sample could show it;
//! - when every slot is taken, the caller **waits** ([`Decision::Wait`])
//!   rather than overload a node;
//! - among equally good nodes the choice is **random**, so two homes deciding
//!   at once do not herd onto the same node.
//!
//! The table belongs to one home agent. It knows its own reservations
//! exactly; other homes' jobs reach it through each node's reported slot use
//! (refreshed every second). The executing node enforces its slots itself
//! (refusing a job when full), so several homes can never overfill a node.
//!
//! Pure: no transport, no clock, no randomness of its own (the caller passes
//! a random index function), so every rule is unit-tested.

use std::collections::BTreeMap;

/// Slots per core of capacity when the agent is not told otherwise
/// (`mosixd --slots-per-core`): about two compiles per core keeps a real
/// node busy while some of them wait for I/O.
pub const DEFAULT_SLOTS_PER_CORE: f64 = 2.0;

/// Slots of a node: `max(1, round(capacity × slots_per_core))`.
///
/// Capacity is in cores × speed (as in `NodeLoad`). With fractional cores
/// (the local cluster's 0.6/0.5/0.4/0.3-core nodes) a small factor rounds
/// every node to the same 1 or 2 slots and loses the proportions, so the
/// local cluster uses 10 per core (6/5/4/3 slots there).
pub fn slots_for(capacity: f64, slots_per_core: f64) -> u32 {
    let s = (capacity.max(0.0) * slots_per_core.max(0.0)).round();
    if s.is_finite() && s >= 1.0 {
        s.min(u32::MAX as f64) as u32
    } else {
        1
    }
}

/// What a node last reported about itself (`GetSlots`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeInfo {
    /// Cores × speed.
    pub capacity: f64,
    pub slots: u32,
    /// Slots held by running foreground jobs (every home's).
    pub used: u32,
    /// CPU demand of the node's other jobs (detached, migrated in), in cores.
    pub background: f64,
    /// Blocked by an administrator (`mosctl block`): never chosen.
    pub blocked: bool,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    /// None: never heard from (or not since it was lost).
    info: Option<NodeInfo>,
    up: bool,
    /// Foreground jobs this home placed there that still run.
    own: u32,
    /// `own` when `info` arrived: the part of `info.used` that is ours.
    own_at_sample: u32,
    /// The node refused a job for want of a slot: full until the next sample.
    full: bool,
}

/// Where the caller wants its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want<'a> {
    Best,
    Node(&'a str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it there; the slot is already reserved.
    Place(String),
    /// Every eligible node is full: wait for a slot.
    Wait,
    /// The asked-for node is not part of the cluster.
    UnknownNode,
    /// No eligible node is up (or the asked-for one is down).
    NoNode,
    /// The asked-for node is blocked (`mosctl block`), or every node that
    /// is up is.
    Blocked,
}

#[derive(Debug, Clone, Default)]
pub struct Table {
    nodes: BTreeMap<String, Entry>,
}

impl Table {
    pub fn new<I: IntoIterator<Item = String>>(names: I) -> Self {
        Self {
            nodes: names.into_iter().map(|n| (n, Entry::default())).collect(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// A fresh sample from `node`, or None if it did not answer (down).
    pub fn update(&mut self, node: &str, info: Option<NodeInfo>) {
        if let Some(e) = self.nodes.get_mut(node) {
            e.up = info.is_some();
            e.info = info;
            e.own_at_sample = e.own;
            e.full = false;
        }
    }

    /// The node was lost (its agent stopped answering mid-job): no more
    /// jobs there until a sample says it is back.
    pub fn mark_down(&mut self, node: &str) {
        if let Some(e) = self.nodes.get_mut(node) {
            e.up = false;
        }
    }

    /// The node refused a job for want of a slot (another home filled it).
    pub fn mark_full(&mut self, node: &str) {
        if let Some(e) = self.nodes.get_mut(node) {
            e.full = true;
        }
    }

    pub fn is_up(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|e| e.up)
    }

    /// Whether any node has been heard from yet.
    pub fn any_sample(&self) -> bool {
        self.nodes.values().any(|e| e.info.is_some())
    }

    /// Slots of `node` in use as far as this home knows: its own running
    /// jobs, plus what the node reported beyond the own jobs it counted then.
    pub fn used(&self, node: &str) -> u32 {
        self.nodes.get(node).map_or(0, |e| {
            let others = e.info.map_or(0, |i| i.used.saturating_sub(e.own_at_sample));
            e.own + others
        })
    }

    fn free(&self, name: &str, e: &Entry) -> bool {
        match e.info {
            Some(i) => e.up && !e.full && !i.blocked && self.used(name) < i.slots,
            None => false,
        }
    }

    /// Expected demand per capacity on `node` if one more job went there.
    fn score(&self, name: &str, e: &Entry) -> f64 {
        let i = e.info.unwrap_or(NodeInfo {
            capacity: 0.0,
            slots: 0,
            used: 0,
            background: 0.0,
            blocked: false,
        });
        (self.used(name) as f64 + 1.0 + i.background.max(0.0)) / i.capacity.max(1e-6)
    }

    /// Decide, and reserve the chosen node's slot at once. `pick(n)` returns
    /// a random index below `n` (the tie break).
    pub fn choose(&mut self, want: Want<'_>, pick: &mut dyn FnMut(usize) -> usize) -> Decision {
        let node = match want {
            Want::Node(n) => {
                let Some(e) = self.nodes.get(n) else {
                    return Decision::UnknownNode;
                };
                if !e.up {
                    return Decision::NoNode;
                }
                if e.info.is_some_and(|i| i.blocked) {
                    return Decision::Blocked;
                }
                if !self.free(n, e) {
                    return Decision::Wait;
                }
                n.to_string()
            }
            Want::Best => {
                let mut best: Vec<(&String, f64)> = Vec::new();
                let mut any_up = false;
                let mut any_open = false;
                for (name, e) in &self.nodes {
                    any_up |= e.up;
                    any_open |= e.up && e.info.is_some_and(|i| !i.blocked);
                    if !self.free(name, e) {
                        continue;
                    }
                    let s = self.score(name, e);
                    match best.first() {
                        Some(&(_, b)) if s > b + 1e-9 => {}
                        Some(&(_, b)) if s < b - 1e-9 => best = vec![(name, s)],
                        _ => best.push((name, s)),
                    }
                }
                if best.is_empty() {
                    return if any_up && !any_open && self.any_sample() {
                        Decision::Blocked
                    } else if any_up {
                        Decision::Wait
                    } else {
                        Decision::NoNode
                    };
                }
                let i = pick(best.len()).min(best.len() - 1);
                best[i].0.clone()
            }
        };
        self.reserve(&node);
        Decision::Place(node)
    }

    /// Count a job against `node` (done by [`choose`](Self::choose)).
    pub fn reserve(&mut self, node: &str) {
        if let Some(e) = self.nodes.get_mut(node) {
            e.own += 1;
        }
    }

    /// A job this home placed on `node` ended (or never started).
    pub fn release(&mut self, node: &str) {
        if let Some(e) = self.nodes.get_mut(node) {
            // `own_at_sample` stays: what the sample counted beyond our
            // own jobs (other homes' jobs) has not changed.
            e.own = e.own.saturating_sub(1);
        }
    }

    /// Free slots over all up nodes (for `mosctl slots`-like summaries).
    pub fn total_slots(&self) -> u32 {
        self.nodes
            .values()
            .filter(|e| e.up)
            .filter_map(|e| e.info.map(|i| i.slots))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(capacity: f64, slots: u32) -> Option<NodeInfo> {
        Some(NodeInfo {
            capacity,
            slots,
            used: 0,
            background: 0.0,
            blocked: false,
        })
    }

    fn table(caps: &[f64], per_core: f64) -> Table {
        let mut t = Table::new((1..=caps.len()).map(|i| format!("node{i}")));
        for (i, c) in caps.iter().enumerate() {
            t.update(&format!("node{}", i + 1), info(*c, slots_for(*c, per_core)));
        }
        t
    }

    fn first(_: usize) -> usize {
        0
    }

    #[test]
    fn slot_formula() {
        assert_eq!(slots_for(0.6, 10.0), 6);
        assert_eq!(slots_for(0.3, 10.0), 3);
        assert_eq!(slots_for(4.0, 2.0), 8);
        assert_eq!(slots_for(0.3, 2.0), 1, "at least one slot");
        assert_eq!(slots_for(0.0, 2.0), 1);
        assert_eq!(slots_for(f64::NAN, 2.0), 1);
        assert_eq!(slots_for(-3.0, 2.0), 1);
        assert_eq!(slots_for(1.24, 2.0), 2);
        assert_eq!(slots_for(1.26, 2.0), 3);
    }

    #[test]
    fn a_burst_spreads_by_capacity_and_never_exceeds_slots() {
        let caps = [0.6, 0.5, 0.4, 0.3];
        let mut t = table(&caps, 10.0);
        let mut placed: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..16 {
            match t.choose(Want::Best, &mut first) {
                Decision::Place(n) => *placed.entry(n).or_default() += 1,
                d => panic!("16 jobs fit in 18 slots, got {d:?}"),
            }
        }
        let per_cap: Vec<f64> = caps
            .iter()
            .enumerate()
            .map(|(i, c)| placed[&format!("node{}", i + 1)] as f64 / c)
            .collect();
        let mean = per_cap.iter().sum::<f64>() / 4.0;
        let max = per_cap.iter().cloned().fold(0.0, f64::max);
        assert!(max / mean <= 1.25, "skew {}: {placed:?}", max / mean);
        for (i, c) in caps.iter().enumerate() {
            assert!(placed[&format!("node{}", i + 1)] <= slots_for(*c, 10.0));
        }
        // Two more fill the cluster; the next one waits.
        assert!(matches!(
            t.choose(Want::Best, &mut first),
            Decision::Place(_)
        ));
        assert!(matches!(
            t.choose(Want::Best, &mut first),
            Decision::Place(_)
        ));
        assert_eq!(t.choose(Want::Best, &mut first), Decision::Wait);
        // A job ends: its slot is free again, on that node.
        t.release("node3");
        assert_eq!(
            t.choose(Want::Best, &mut first),
            Decision::Place("node3".into())
        );
    }

    #[test]
    fn reservations_count_before_the_next_sample() {
        let mut t = table(&[1.0, 1.0], 2.0);
        // A stale sample says both are idle; two jobs must still go to
        // different nodes, and the third and fourth fill the rest.
        let a = t.choose(Want::Best, &mut first);
        let b = t.choose(Want::Best, &mut first);
        assert_ne!(a, b);
        t.choose(Want::Best, &mut first);
        t.choose(Want::Best, &mut first);
        assert_eq!(t.used("node1"), 2);
        assert_eq!(t.choose(Want::Best, &mut first), Decision::Wait);
        // The next sample reports our two jobs on node1: not counted twice.
        t.update(
            "node1",
            Some(NodeInfo {
                capacity: 1.0,
                slots: 2,
                used: 2,
                background: 0.0,
                blocked: false,
            }),
        );
        assert_eq!(t.used("node1"), 2);
        t.release("node1");
        assert_eq!(t.used("node1"), 1);
    }

    #[test]
    fn other_homes_jobs_count_through_samples() {
        let mut t = table(&[1.0, 1.0], 2.0);
        t.update(
            "node1",
            Some(NodeInfo {
                capacity: 1.0,
                slots: 2,
                used: 2,
                background: 0.0,
                blocked: false,
            }),
        );
        for _ in 0..2 {
            assert_eq!(
                t.choose(Want::Best, &mut first),
                Decision::Place("node2".into())
            );
        }
        assert_eq!(t.choose(Want::Best, &mut first), Decision::Wait);
        // The node itself refused us: full until the next sample.
        let mut t = table(&[1.0], 2.0);
        t.mark_full("node1");
        assert_eq!(t.choose(Want::Best, &mut first), Decision::Wait);
        t.update("node1", info(1.0, 2));
        assert!(matches!(
            t.choose(Want::Best, &mut first),
            Decision::Place(_)
        ));
    }

    #[test]
    fn ties_are_broken_at_random() {
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..4 {
            let mut t = table(&[0.5, 0.5, 0.5, 0.5], 10.0);
            let mut pick = |n: usize| k % n;
            match t.choose(Want::Best, &mut pick) {
                Decision::Place(n) => seen.insert(n),
                d => panic!("{d:?}"),
            };
        }
        assert_eq!(seen.len(), 4, "each tied node can be picked: {seen:?}");
        // Not a tie: the bigger node wins whatever the pick.
        let mut t = table(&[0.5, 1.0], 10.0);
        let mut last = |n: usize| n - 1;
        assert_eq!(
            t.choose(Want::Best, &mut last),
            Decision::Place("node2".into())
        );
    }

    #[test]
    fn background_load_steers_away() {
        let mut t = table(&[1.0, 1.0], 10.0);
        t.update(
            "node1",
            Some(NodeInfo {
                capacity: 1.0,
                slots: 10,
                used: 0,
                background: 4.0,
                blocked: false,
            }),
        );
        assert_eq!(
            t.choose(Want::Best, &mut first),
            Decision::Place("node2".into())
        );
    }

    #[test]
    fn asked_for_nodes_unknown_down_full() {
        let mut t = table(&[1.0, 1.0], 1.0);
        assert_eq!(
            t.choose(Want::Node("node9"), &mut first),
            Decision::UnknownNode
        );
        assert_eq!(
            t.choose(Want::Node("node2"), &mut first),
            Decision::Place("node2".into())
        );
        assert_eq!(t.choose(Want::Node("node2"), &mut first), Decision::Wait);
        t.mark_down("node1");
        assert_eq!(t.choose(Want::Node("node1"), &mut first), Decision::NoNode);
        // node2 is full and node1 down: wait (node2 will free up).
        assert_eq!(t.choose(Want::Best, &mut first), Decision::Wait);
        t.mark_down("node2");
        assert_eq!(t.choose(Want::Best, &mut first), Decision::NoNode);
        // Never heard from: not a candidate.
        let mut t = Table::new(["a".to_string()]);
        assert_eq!(t.choose(Want::Best, &mut first), Decision::NoNode);
        assert!(!t.any_sample());
    }

    fn blocked_info(capacity: f64, slots: u32) -> Option<NodeInfo> {
        info(capacity, slots).map(|i| NodeInfo { blocked: true, ..i })
    }

    #[test]
    fn a_blocked_node_is_never_chosen() {
        // node2 is the biggest and idle, but blocked.
        let mut t = table(&[0.5, 4.0, 0.5], 10.0);
        t.update("node2", blocked_info(4.0, 40));
        for _ in 0..10 {
            match t.choose(Want::Best, &mut first) {
                Decision::Place(n) => assert_ne!(n, "node2"),
                d => panic!("10 jobs fit in node1 and node3: {d:?}"),
            }
        }
        // Full elsewhere: wait, rather than use the blocked node.
        assert_eq!(t.choose(Want::Best, &mut first), Decision::Wait);
        // Asked for by name: refused as blocked, not "wait".
        assert_eq!(t.choose(Want::Node("node2"), &mut first), Decision::Blocked);
        assert_eq!(t.used("node2"), 0, "nothing reserved on the blocked node");
        // Unblocked by the next sample: chosen again.
        t.update("node2", info(4.0, 40));
        assert_eq!(
            t.choose(Want::Node("node2"), &mut first),
            Decision::Place("node2".into())
        );
        // Every node that is up is blocked: say so instead of waiting forever.
        let mut t = table(&[1.0, 1.0], 2.0);
        t.update("node1", blocked_info(1.0, 2));
        t.update("node2", blocked_info(1.0, 2));
        assert_eq!(t.choose(Want::Best, &mut first), Decision::Blocked);
    }
}
