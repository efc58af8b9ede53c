//! Iterative pre-copy: move most of a job's memory while it keeps running.
//!
//! A full-copy migration freezes the job for the whole memory dump. With
//! pre-copy (`Mode::PreCopy`, `mosctl migrate --pre-copy`) the source first
//! runs CRIU `pre-dump` rounds: round 1 writes all memory while the job runs
//! (it is frozen only while CRIU collects its pages into pipes) and turns on
//! the kernel's soft-dirty tracking; each later round writes only the pages
//! dirtied since the round before. The final dump, the only one that stops
//! the job, then writes just what was dirtied since the last round, on top
//! of the rounds (`--prev-images-dir`), and the usual seal → restore
//! follows. The target restores the whole chain; it needs no kernel feature
//! for that.
//!
//! # Stop rule ([`StopRule`], pure)
//!
//! After each round, given the bytes every round wrote so far:
//! 1. **Few pages left**: the last round wrote at most `few_bytes` (4 MiB by
//!    default): the final dump will be about as small, so more rounds cannot
//!    buy much.
//! 2. **Rounds stop shrinking**: the last round is not at least
//!    `min_shrink` (a quarter by default) smaller than the one before: the
//!    job dirties memory about as fast as we copy it, and further rounds
//!    would only repeat the same pages.
//! 3. **Enough rounds**: `max_rounds` (8 by default; at least 1) were run.
//!
//! Whichever holds first ends the loop, so it always ends, after at most
//! `max_rounds` rounds.
//!
//! # Images
//!
//! Rounds are subdirectories `pre-1/`, `pre-2/`, … of the migration's image
//! directory, each linked to the one before by a `parent` symlink that CRIU
//! makes (`pre-2/parent -> ../pre-1`), and the final dump links
//! `parent -> pre-N`. The manifest (format version 3, see
//! `security::manifest`) seals every file of every round and checks the
//! links structurally, so a tampered round is refused like a tampered dump.
//! Each round is hashed (and flushed, if the image-sync policy says so) right
//! after it is written, while the job still runs, so sealing after the final
//! dump only reuses those digests.
//!
//! # Fallback
//!
//! Pre-copy needs soft-dirty memory tracking on the *source* kernel
//! (`criu check --feature mem_dirty_track`). Without it, or when any round
//! fails, the rounds written so far are deleted and the job moves by an
//! ordinary full copy: a warning is logged and the returned migration record
//! says why (`fallback`). A pre-dump never stops the job (CRIU resumes it
//! even when the round fails), so a failed round costs time, never the job.

use super::migration::{image_rel, Mode};
use super::{io_error, Agent, AgentError, AgentResult};
use crate::core::{JobId, JobRecord, MigrationId, MigrationRecord};
use crate::criu::PreDumpSpec;
use crate::security::manifest::{self, Precomputed, MAX_CHAIN_ROUNDS};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// When to stop pre-dump rounds (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StopRule {
    /// Most rounds; 0 counts as 1, and never more than the manifest allows.
    pub max_rounds: u32,
    /// A round that wrote at most this many bytes leaves few pages: stop.
    pub few_bytes: u64,
    /// A round must be at least this fraction (0..=1) smaller than the one
    /// before, or rounds have stopped shrinking: stop.
    pub min_shrink: f64,
}

impl Default for StopRule {
    fn default() -> Self {
        Self {
            max_rounds: 8,
            // 1024 pages: a final dump this small freezes the job for
            // milliseconds on any disk.
            few_bytes: 4 << 20,
            min_shrink: 0.25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    FewPagesLeft,
    NotShrinking,
    MaxRounds,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::FewPagesLeft => "few pages left",
            StopReason::NotShrinking => "rounds stopped shrinking",
            StopReason::MaxRounds => "maximum number of rounds",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run another round.
    Continue,
    /// Do the final dump now.
    Stop(StopReason),
}

impl StopRule {
    /// The round limit actually applied.
    pub fn effective_max_rounds(&self) -> u32 {
        self.max_rounds.clamp(1, MAX_CHAIN_ROUNDS)
    }

    /// Decide after the rounds so far, given the bytes each wrote (oldest
    /// first). Before the first round there is nothing to judge: continue.
    pub fn decide(&self, rounds: &[u64]) -> Decision {
        let Some(&last) = rounds.last() else {
            return Decision::Continue;
        };
        if last <= self.few_bytes {
            return Decision::Stop(StopReason::FewPagesLeft);
        }
        if let [.., prev, _] = rounds {
            // A NaN or out-of-range fraction must not disable the rule.
            let shrink = if self.min_shrink.is_finite() {
                self.min_shrink.clamp(0.0, 1.0)
            } else {
                StopRule::default().min_shrink
            };
            if last as f64 > *prev as f64 * (1.0 - shrink) {
                return Decision::Stop(StopReason::NotShrinking);
            }
        }
        if rounds.len() as u64 >= u64::from(self.effective_max_rounds()) {
            return Decision::Stop(StopReason::MaxRounds);
        }
        Decision::Continue
    }
}

/// Rounds written and ready for the final dump on top of them.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    /// Bytes of pages each round wrote.
    pub rounds: Vec<u64>,
    pub stop: StopReason,
    /// Digests of every round's files, keyed by their manifest names.
    pub precomputed: BTreeMap<String, Precomputed>,
}

impl Chain {
    /// The last round, relative to the final dump's directory.
    pub fn parent_rel(&self) -> String {
        manifest::round_dir_name(self.rounds.len() as u32)
    }
}

/// What pre-copy did before the final dump.
#[derive(Debug, Clone)]
pub(crate) enum PreCopy {
    /// Not requested: an ordinary migration.
    NotAsked,
    Ran {
        chain: Chain,
        ended: Instant,
    },
    /// Requested but not done (why); the migration runs as full copy.
    FellBack {
        why: String,
        ended: Instant,
    },
}

impl PreCopy {
    pub fn chain(&self) -> Option<&Chain> {
        match self {
            PreCopy::Ran { chain, .. } => Some(chain),
            _ => None,
        }
    }

    /// When the job's frozen time can start at the earliest: after the
    /// rounds (it ran through them), else when the migration started.
    pub fn frozen_since(&self, started: Instant) -> Instant {
        match self {
            PreCopy::NotAsked => started,
            PreCopy::Ran { ended, .. } | PreCopy::FellBack { ended, .. } => *ended,
        }
    }

    /// Record on the migration how it ran.
    pub fn annotate(&self, mut m: MigrationRecord) -> MigrationRecord {
        match self {
            PreCopy::NotAsked => {}
            PreCopy::Ran { chain, .. } => {
                m.pre_copy_rounds = chain.rounds.len() as u32;
                m.pre_copy_bytes = chain.rounds.iter().sum();
            }
            PreCopy::FellBack { why, .. } => m.fallback = why.clone(),
        }
        m
    }
}

/// Remove pre-dump rounds (and the final dump's link to them) from an image
/// directory: after a fallback, so the full copy gets a flat directory, and
/// after a failed final dump. Never follows a link.
pub(crate) fn discard_rounds(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(ft) = e.file_type() else { continue };
        if name == manifest::PARENT_LINK && ft.is_symlink() {
            let _ = std::fs::remove_file(e.path());
        } else if name.starts_with("pre-") && ft.is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> AgentResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("worker thread failed: {e}")))
}

impl Agent {
    /// Run pre-copy rounds if `mode` asks for them (see the module docs),
    /// then refresh `rec`/`pid`: the job ran on meanwhile and may have ended,
    /// in which case the error says so and nothing else happens.
    pub(crate) async fn pre_copy_if_asked(
        self: &Arc<Self>,
        mode: Mode,
        rec: &mut JobRecord,
        pid: &mut i32,
        mig: &MigrationId,
    ) -> AgentResult<PreCopy> {
        if mode != Mode::PreCopy {
            return Ok(PreCopy::NotAsked);
        }
        let job = rec.id.clone();
        let pre = self.pre_copy(&job, *pid, mig).await;
        match self.local_running(&job) {
            Ok((r, p)) => {
                *rec = r;
                *pid = p;
                Ok(pre)
            }
            Err(e) => {
                discard_rounds(&self.image_dir(&image_rel(&job, mig)));
                Err(e.context(&format!("job {job} changed during pre-copy; not migrated")))
            }
        }
    }

    /// The rounds; never fails: a problem is a fallback to full copy.
    async fn pre_copy(self: &Arc<Self>, job: &JobId, pid: i32, mig: &MigrationId) -> PreCopy {
        let fell_back = |why: String| {
            tracing::warn!(job = %job, "{why}");
            PreCopy::FellBack {
                why,
                ended: Instant::now(),
            }
        };
        if !self.engine.features().mem_dirty_track {
            return fell_back(format!(
                "pre-copy unavailable on {}: its kernel cannot track dirty memory (`criu check --feature mem_dirty_track` fails: no soft-dirty bits); the job moved as a full copy instead",
                self.cfg.node
            ));
        }
        let dir = self.image_dir(&image_rel(job, mig));
        // Rounds left by an earlier attempt of the same migration id.
        discard_rounds(&dir);
        let rule = StopRule::default();
        let mut chain = Chain {
            rounds: Vec::new(),
            stop: StopReason::MaxRounds,
            precomputed: BTreeMap::new(),
        };
        let t0 = Instant::now();
        loop {
            let k = chain.rounds.len() as u32 + 1;
            let t_round = Instant::now();
            match self.pre_dump_round(pid, &dir, k).await {
                Ok((bytes, digests)) => {
                    tracing::info!(job = %job, round = k, bytes, ms = t_round.elapsed().as_millis() as u64, "pre-dump round");
                    chain.rounds.push(bytes);
                    chain.precomputed.extend(digests);
                }
                Err(e) => {
                    discard_rounds(&dir);
                    return fell_back(format!(
                        "pre-copy round {k} failed on {} ({e}); the job kept running and moved as a full copy instead",
                        self.cfg.node
                    ));
                }
            }
            if let Decision::Stop(reason) = rule.decide(&chain.rounds) {
                chain.stop = reason;
                break;
            }
        }
        tracing::info!(
            job = %job,
            rounds = chain.rounds.len(),
            bytes = chain.rounds.iter().sum::<u64>(),
            last_round_bytes = chain.rounds.last().copied().unwrap_or(0),
            ms = t0.elapsed().as_millis() as u64,
            "pre-copy done ({})",
            chain.stop.as_str()
        );
        PreCopy::Ran {
            chain,
            ended: Instant::now(),
        }
    }

    /// Pre-dump round `k` into `dir/pre-k`, then hash it while the job
    /// runs. Returns the bytes of pages written and the round's digests.
    async fn pre_dump_round(
        self: &Arc<Self>,
        pid: i32,
        dir: &Path,
        k: u32,
    ) -> AgentResult<(u64, BTreeMap<String, Precomputed>)> {
        self.engine.available()?;
        let round = manifest::round_dir_name(k);
        let round_dir = dir.join(&round);
        std::fs::create_dir_all(&round_dir).map_err(|e| io_error("create pre-dump dir", e))?;
        let spec = PreDumpSpec {
            pid,
            image_dir: round_dir.clone(),
            prev_images_dir: (k > 1).then(|| format!("../{}", manifest::round_dir_name(k - 1))),
        };
        let fsync = self.cfg.image_sync == super::ImageSync::Fsync;
        let follower = self
            .cfg
            .image_key
            .is_some()
            .then(|| crate::security::follow::FollowHasher::start(&round_dir, fsync));
        let engine = self.engine.clone();
        let result = {
            let _one = self.criu_lock.lock().await;
            blocking(move || engine.pre_dump(&spec)).await?
        };
        let known = match (&result, follower) {
            (Ok(_), Some(f)) => blocking(move || f.finish()).await?,
            _ => BTreeMap::new(),
        };
        let bytes = result?;
        if self.cfg.image_key.is_none() {
            return Ok((bytes, BTreeMap::new()));
        }
        let prefix = format!("{round}/");
        let digests = blocking(move || manifest::hash_ahead(&round_dir, &prefix, &known, fsync))
            .await?
            .map_err(|e| AgentError::Internal(format!("hashing pre-dump round {k}: {e}")))?;
        Ok((bytes, digests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn run(rule: &StopRule, sizes: impl IntoIterator<Item = u64>) -> (Vec<u64>, StopReason) {
        let mut done = Vec::new();
        for s in sizes {
            done.push(s);
            if let Decision::Stop(r) = rule.decide(&done) {
                return (done, r);
            }
        }
        panic!("rule did not stop after {} rounds: {done:?}", done.len());
    }

    #[test]
    fn nothing_to_judge_before_the_first_round() {
        assert_eq!(StopRule::default().decide(&[]), Decision::Continue);
    }

    #[test]
    fn stops_when_few_pages_are_left() {
        let r = StopRule::default();
        let (done, why) = run(&r, [512 * MIB, 40 * MIB, 3 * MIB, 1]);
        assert_eq!(why, StopReason::FewPagesLeft);
        assert_eq!(done.len(), 3);
        // A small job: one round holds everything.
        assert_eq!(
            r.decide(&[2 * MIB]),
            Decision::Stop(StopReason::FewPagesLeft)
        );
        // Exactly at the threshold counts as few.
        assert_eq!(
            r.decide(&[100 * MIB, r.few_bytes]),
            Decision::Stop(StopReason::FewPagesLeft)
        );
    }

    #[test]
    fn stops_when_rounds_stop_shrinking() {
        let r = StopRule::default();
        // The job dirties memory as fast as we copy it.
        let (done, why) = run(&r, [512 * MIB, 300 * MIB, 290 * MIB, 10 * MIB]);
        assert_eq!(why, StopReason::NotShrinking);
        assert_eq!(done.len(), 3);
        // Growing is not shrinking either.
        assert_eq!(
            r.decide(&[100 * MIB, 120 * MIB]),
            Decision::Stop(StopReason::NotShrinking)
        );
        // Exactly a quarter smaller is enough to go on.
        assert_eq!(r.decide(&[100 * MIB, 75 * MIB]), Decision::Continue);
        assert_eq!(
            r.decide(&[100 * MIB, 75 * MIB + 1]),
            Decision::Stop(StopReason::NotShrinking)
        );
    }

    #[test]
    fn stops_after_max_rounds() {
        let r = StopRule::default();
        // Halving every round from 4 GiB never gets below 4 MiB in 8 rounds.
        let (done, why) = run(&r, (0..).map(|i| (4096 * MIB) >> i));
        assert_eq!(why, StopReason::MaxRounds);
        assert_eq!(done.len(), 8);
        let one = StopRule { max_rounds: 1, ..r };
        assert_eq!(one.decide(&[GIB]), Decision::Stop(StopReason::MaxRounds));
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn odd_settings_stay_safe() {
        let zero = StopRule {
            max_rounds: 0,
            ..StopRule::default()
        };
        assert_eq!(zero.effective_max_rounds(), 1);
        assert_eq!(zero.decide(&[GIB]), Decision::Stop(StopReason::MaxRounds));
        let huge = StopRule {
            max_rounds: u32::MAX,
            ..StopRule::default()
        };
        assert_eq!(huge.effective_max_rounds(), MAX_CHAIN_ROUNDS);
        // A NaN fraction falls back to the default, not to "never stop".
        let nan = StopRule {
            min_shrink: f64::NAN,
            ..StopRule::default()
        };
        assert_eq!(
            nan.decide(&[GIB, GIB]),
            Decision::Stop(StopReason::NotShrinking)
        );
        // min_shrink above 1 means "never good enough": stop at round 2.
        let strict = StopRule {
            min_shrink: 7.0,
            ..StopRule::default()
        };
        assert_eq!(
            strict.decide(&[GIB, 100 * MIB]),
            Decision::Stop(StopReason::NotShrinking)
        );
        // A negative one means any non-growing round will do.
        let lax = StopRule {
            min_shrink: -1.0,
            ..StopRule::default()
        };
        assert_eq!(lax.decide(&[GIB, GIB]), Decision::Continue);
        assert_eq!(
            lax.decide(&[GIB, GIB + 1]),
            Decision::Stop(StopReason::NotShrinking)
        );
    }

    /// Property-style: for random rules and random round sizes, the loop
    /// always stops, never runs more than the round limit, and every
    /// decision is justified by its rule.
    #[test]
    fn always_stops_within_max_rounds_and_for_a_stated_reason() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for _ in 0..5000 {
            let rule = StopRule {
                max_rounds: (next() % 20) as u32,
                few_bytes: next() % (64 * MIB),
                min_shrink: (next() % 1000) as f64 / 1000.0,
            };
            let max = rule.effective_max_rounds() as usize;
            let mut done: Vec<u64> = Vec::new();
            let mut size = next() % (8 * GIB);
            let reason = loop {
                // Sizes that shrink, hold or grow, at random.
                size = match next() % 4 {
                    0 => size / 2,
                    1 => size,
                    2 => size.saturating_add(next() % GIB),
                    _ => next() % (2 * GIB),
                };
                done.push(size);
                assert!(done.len() <= max, "{rule:?} ran {} rounds", done.len());
                match rule.decide(&done) {
                    Decision::Continue => {
                        let last = *done.last().unwrap();
                        assert!(last > rule.few_bytes);
                        assert!(done.len() < max);
                        if done.len() >= 2 {
                            let prev = done[done.len() - 2] as f64;
                            assert!(last as f64 <= prev * (1.0 - rule.min_shrink));
                        }
                    }
                    Decision::Stop(r) => break r,
                }
            };
            let last = *done.last().unwrap();
            match reason {
                StopReason::FewPagesLeft => assert!(last <= rule.few_bytes),
                StopReason::NotShrinking => {
                    let prev = done[done.len() - 2] as f64;
                    assert!(last as f64 > prev * (1.0 - rule.min_shrink));
                }
                StopReason::MaxRounds => assert_eq!(done.len(), max),
            }
        }
    }

    #[test]
    fn discard_removes_rounds_and_the_link_only() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        for k in 1..=2 {
            std::fs::create_dir(d.path().join(format!("pre-{k}"))).unwrap();
            std::fs::write(d.path().join(format!("pre-{k}/pages-1.img")), b"p").unwrap();
        }
        std::os::unix::fs::symlink("pre-2", d.path().join("parent")).unwrap();
        // A link named like a round must not be followed into elsewhere.
        std::os::unix::fs::symlink(outside.path(), d.path().join("pre-3")).unwrap();
        std::fs::write(d.path().join("dump.log"), b"log").unwrap();
        discard_rounds(d.path());
        let left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(left.contains(&"dump.log".to_string()));
        assert!(!left
            .iter()
            .any(|n| n == "parent" || n == "pre-1" || n == "pre-2"));
        assert!(outside.path().join("keep").exists());
    }
}

/// The loop and its fallbacks, driven through a real source and target agent
/// (one shared directory, in-process peers) with the fake engine.
#[cfg(test)]
mod agent_tests {
    use super::*;
    use crate::agent::peers::Peers;
    use crate::agent::AgentConfig;
    use crate::core::{now_unix_ms, JobState, NodeName};
    use crate::criu::fake::{FakeEngine, FakeRound};
    use futures::future::BoxFuture;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;

    type Tamper = Box<dyn Fn(&Path) + Send + Sync>;

    /// Agents by node; `tamper` edits the sealed images before a restore.
    #[derive(Default)]
    struct InProcess(Mutex<BTreeMap<NodeName, Arc<Agent>>>, Mutex<Option<Tamper>>);

    impl InProcess {
        fn get(&self, node: &NodeName) -> AgentResult<Arc<Agent>> {
            self.0
                .lock()
                .ok()
                .and_then(|m| m.get(node).cloned())
                .ok_or_else(|| AgentError::Unavailable(format!("{node} unreachable")))
        }
    }

    impl Peers for InProcess {
        fn knows(&self, node: &NodeName) -> bool {
            self.get(node).is_ok()
        }
        fn names(&self) -> Vec<String> {
            self.0
                .lock()
                .map(|m| m.keys().map(|n| n.to_string()).collect())
                .unwrap_or_default()
        }
        fn ping<'a>(
            &'a self,
            node: &'a NodeName,
        ) -> BoxFuture<'a, AgentResult<crate::agent::peers::TargetInfo>> {
            Box::pin(async move { self.get(node).map(|_| Default::default()) })
        }
        fn restore<'a>(
            &'a self,
            node: &'a NodeName,
            call: super::super::migration::RestoreCall,
        ) -> BoxFuture<'a, AgentResult<JobRecord>> {
            Box::pin(async move {
                let agent = self.get(node)?;
                if let Some(f) = self.1.lock().ok().and_then(|mut t| t.take()) {
                    f(&agent.image_dir(&image_rel(&call.job, &call.migration)));
                }
                agent.restore(call).await
            })
        }
        fn migrate_there<'a>(
            &'a self,
            node: &'a NodeName,
            job: &'a JobId,
            target: &'a NodeName,
            mig: Option<MigrationId>,
            mode: Mode,
        ) -> BoxFuture<'a, AgentResult<(JobRecord, MigrationRecord)>> {
            Box::pin(async move {
                let agent = self.get(node)?;
                match agent
                    .handle(crate::agent::AgentAction::Migrate {
                        job: job.clone(),
                        target: target.clone(),
                        migration: mig,
                        mode,
                        only_here: true,
                    })
                    .await?
                {
                    crate::agent::AgentReply::Migrated(r, m) => Ok((*r, m)),
                    other => Err(AgentError::Internal(format!("{other:?}"))),
                }
            })
        }
    }

    struct Two {
        peers: Arc<InProcess>,
        shared: tempfile::TempDir,
        src: Arc<Agent>,
        src_engine: Arc<FakeEngine>,
        dst_engine: Arc<FakeEngine>,
        pids: Mutex<Vec<i32>>,
    }

    fn node(n: &str) -> NodeName {
        NodeName::parse(n).unwrap()
    }

    fn two(src_engine: FakeEngine) -> Two {
        let shared = tempfile::tempdir().unwrap();
        let key = crate::security::manifest::ClusterKey::generate();
        let peers = Arc::new(InProcess::default());
        // One shared path for both nodes, sealed with one key.
        let cfg = |n: &str| AgentConfig {
            shared_root: shared.path().to_path_buf(),
            shared: true,
            image_key: Some(key.clone()),
            ..crate::agent::testing::config(shared.path(), n)
        };
        let src_engine = Arc::new(src_engine);
        let dst_engine = Arc::new(FakeEngine::default());
        let src = Agent::new(cfg("node1"), src_engine.clone(), peers.clone()).unwrap();
        let dst = Agent::new(cfg("node2"), dst_engine.clone(), peers.clone()).unwrap();
        if let Ok(mut m) = peers.0.lock() {
            m.insert(node("node1"), src.clone());
            m.insert(node("node2"), dst);
        }
        Two {
            peers,
            shared,
            src,
            src_engine,
            dst_engine,
            pids: Mutex::new(Vec::new()),
        }
    }

    impl Two {
        /// A running job on node1: a `sleep` child the agent watches.
        fn start_job(&self) -> (JobId, i32) {
            // Reaped by the agent's reaper thread (waitpid), like a job.
            #[allow(clippy::zombie_processes)]
            let child = crate::criu::fake::stand_in("60").unwrap();
            let pid = child.id() as i32;
            self.pids.lock().unwrap().push(pid);
            let id = JobId::generate();
            let now = now_unix_ms();
            let mut rec = JobRecord {
                id: id.clone(),
                name: String::new(),
                node: node("node1"),
                state: JobState::Running,
                pid,
                argv: vec!["sleep".into(), "60".into()],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                stdout_path: String::new(),
                stderr_path: String::new(),
                created_unix_ms: now,
                arrived_unix_ms: now,
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
            };
            self.src.registry.put(&mut rec).unwrap();
            self.src.adopt_child(&id, pid);
            (id, pid)
        }

        async fn migrate(
            &self,
            job: &JobId,
            mode: Mode,
        ) -> AgentResult<(JobRecord, MigrationRecord)> {
            let r = self.src.migrate(job, &node("node2"), None, mode).await;
            if let Ok(rec) = self.src.registry.get(job) {
                self.pids.lock().unwrap().push(rec.pid);
            }
            r
        }

        fn rounds_left(&self, job: &JobId) -> Vec<String> {
            let mut found = Vec::new();
            let jobs = self.shared.path().join("images").join(job.as_str());
            for m in std::fs::read_dir(jobs).into_iter().flatten().flatten() {
                for e in std::fs::read_dir(m.path()).into_iter().flatten().flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("pre-") || n == "parent" {
                        found.push(n);
                    }
                }
            }
            found
        }
    }

    impl Drop for Two {
        fn drop(&mut self) {
            for &pid in self.pids.lock().unwrap().iter().filter(|p| **p > 0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    fn alive(pid: i32) -> bool {
        super::super::reaper::is_pidns_init(pid)
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
    }

    /// A pre-copied migration landed on node2 after `rounds` rounds.
    fn assert_pre_copied(t: &Two, job: &JobId, m: &MigrationRecord, rounds: u32, bytes: u64) {
        assert_eq!(m.pre_copy_rounds, rounds, "{m:?}");
        assert_eq!(m.pre_copy_bytes, bytes, "{m:?}");
        assert!(m.fallback.is_empty(), "{m:?}");
        assert_eq!(t.src_engine.pre_dumps.load(Ordering::SeqCst), rounds);
        assert_eq!(
            *t.src_engine.dump_parents.lock().unwrap(),
            vec![Some(format!("pre-{rounds}"))],
            "one final dump, on top of the last round"
        );
        // The target verified the sealed chain and restored it.
        assert_eq!(t.dst_engine.restores.load(Ordering::SeqCst), 1);
        let rec = t.src.registry.get(job).unwrap();
        assert_eq!((rec.node.as_str(), rec.state), ("node2", JobState::Running));
    }

    use std::sync::atomic::Ordering;

    /// Any agent takes a Migrate: one without the job passes it on to the
    /// job's node, once; with `only_here` it refuses and names that node.
    #[tokio::test]
    async fn migrate_sent_to_another_node_is_passed_on_to_the_jobs_node() {
        let t = two(FakeEngine::default());
        let (job, _) = t.start_job();
        let node2 = t.peers.get(&node("node2")).unwrap();
        let ask = |only_here| crate::agent::AgentAction::Migrate {
            job: job.clone(),
            target: node("node2"),
            migration: None,
            mode: Mode::FullCopy,
            only_here,
        };
        let e = node2.handle(ask(true)).await.unwrap_err();
        assert!(e.to_string().contains("is on node1"), "{e}");
        assert_eq!(t.src_engine.dumps.load(Ordering::SeqCst), 0);
        match node2.handle(ask(false)).await.unwrap() {
            crate::agent::AgentReply::Migrated(rec, m) => {
                assert_eq!((m.from.as_str(), m.to.as_str()), ("node1", "node2"));
                assert_eq!((rec.node.as_str(), rec.state), ("node2", JobState::Running));
                t.pids.lock().unwrap().push(rec.pid);
            }
            other => panic!("{other:?}"),
        }
        // node1 dumped it (the call reached the job's node), node2 restored.
        assert_eq!(t.src_engine.dumps.load(Ordering::SeqCst), 1);
        assert_eq!(t.dst_engine.restores.load(Ordering::SeqCst), 1);
        // Now on node2: asking node1 to move it to node2 is passed on and
        // refused there, by the job's node.
        let e = t.src.handle(ask(false)).await.unwrap_err();
        assert!(e.to_string().contains("already on node2"), "{e}");
    }

    #[tokio::test]
    async fn rounds_stop_when_few_pages_are_left() {
        let t = two(FakeEngine::with_pre_copy(&[
            FakeRound::Bytes(300 * MIB),
            FakeRound::Bytes(40 * MIB),
            FakeRound::Bytes(MIB),
            FakeRound::Bytes(MIB),
        ]));
        let (job, _) = t.start_job();
        let (_, m) = t.migrate(&job, Mode::PreCopy).await.unwrap();
        assert_pre_copied(&t, &job, &m, 3, 341 * MIB);
    }

    #[tokio::test]
    async fn rounds_stop_when_they_stop_shrinking() {
        let t = two(FakeEngine::with_pre_copy(&[
            FakeRound::Bytes(300 * MIB),
            FakeRound::Bytes(100 * MIB),
            FakeRound::Bytes(95 * MIB),
            FakeRound::Bytes(MIB),
        ]));
        let (job, _) = t.start_job();
        let (_, m) = t.migrate(&job, Mode::PreCopy).await.unwrap();
        assert_pre_copied(&t, &job, &m, 3, 495 * MIB);
    }

    #[tokio::test]
    async fn rounds_stop_at_the_round_limit() {
        let max = StopRule::default().max_rounds;
        let script: Vec<FakeRound> = (0..max + 3)
            .map(|i| FakeRound::Bytes((4096 * MIB) >> i))
            .collect();
        let t = two(FakeEngine::with_pre_copy(&script));
        let (job, _) = t.start_job();
        let (_, m) = t.migrate(&job, Mode::PreCopy).await.unwrap();
        let bytes = (0..max).map(|i| (4096 * MIB) >> i).sum();
        assert_pre_copied(&t, &job, &m, max, bytes);
    }

    #[tokio::test]
    async fn without_memory_tracking_no_pre_dump_is_tried_and_it_runs_as_full_copy() {
        let t = two(FakeEngine::default());
        let (job, _) = t.start_job();
        let (rec, m) = t.migrate(&job, Mode::PreCopy).await.unwrap();
        assert_eq!(t.src_engine.pre_dumps.load(Ordering::SeqCst), 0);
        assert_eq!(*t.src_engine.dump_parents.lock().unwrap(), vec![None]);
        assert_eq!(m.pre_copy_rounds, 0);
        assert!(
            m.fallback.contains("cannot track dirty memory")
                && m.fallback.contains("mem_dirty_track")
                && m.fallback.contains("full copy"),
            "{m:?}"
        );
        assert_eq!((rec.node.as_str(), rec.state), ("node2", JobState::Running));
    }

    #[tokio::test]
    async fn a_failed_round_falls_back_to_full_copy_and_the_job_keeps_running() {
        for (script, failed) in [
            (vec![FakeRound::Fail], 1),
            (vec![FakeRound::Bytes(300 * MIB), FakeRound::Fail], 2),
        ] {
            let t = two(FakeEngine::with_pre_copy(&script));
            let (job, pid) = t.start_job();
            let (rec, m) = t.migrate(&job, Mode::PreCopy).await.unwrap();
            assert_eq!(t.src_engine.pre_dumps.load(Ordering::SeqCst), failed);
            // The full dump found the job alive (the fake refuses a dead
            // pid, like CRIU) and wrote a flat dump: no rounds, no parent.
            assert_eq!(*t.src_engine.dump_parents.lock().unwrap(), vec![None]);
            assert_eq!(t.src_engine.dumps.load(Ordering::SeqCst), 1);
            assert!(
                m.fallback.contains(&format!("round {failed} failed"))
                    && m.fallback.contains("kept running"),
                "{m:?}"
            );
            assert_eq!(m.pre_copy_rounds, 0);
            assert_eq!((rec.node.as_str(), rec.state), ("node2", JobState::Running));
            assert_ne!(rec.pid, pid);
        }
    }

    #[tokio::test]
    async fn a_failed_round_alone_leaves_the_job_running_here() {
        // The same fallback, with the full dump failing too: the job must
        // still be the running one on node1, and no rounds may be left.
        let e = FakeEngine::with_pre_copy(&[FakeRound::Bytes(300 * MIB), FakeRound::Fail]);
        e.fail_dumps.store(1, Ordering::SeqCst);
        let t = two(e);
        let (job, pid) = t.start_job();
        let err = t.migrate(&job, Mode::PreCopy).await.unwrap_err();
        assert!(err.to_string().contains("keeps running on node1"), "{err}");
        assert!(alive(pid), "the job survived the failed round and dump");
        let rec = t.src.registry.get(&job).unwrap();
        assert_eq!(
            (rec.node.as_str(), rec.state, rec.pid),
            ("node1", JobState::Running, pid)
        );
        assert!(t.rounds_left(&job).is_empty(), "{:?}", t.rounds_left(&job));
    }

    #[tokio::test]
    async fn a_failed_final_dump_keeps_the_job_and_drops_the_rounds() {
        let e = FakeEngine::with_pre_copy(&[FakeRound::Bytes(300 * MIB), FakeRound::Bytes(MIB)]);
        e.fail_dumps.store(1, Ordering::SeqCst);
        let t = two(e);
        let (job, pid) = t.start_job();
        let err = t.migrate(&job, Mode::PreCopy).await.unwrap_err();
        assert!(err.to_string().contains("keeps running on node1"), "{err}");
        assert!(alive(pid));
        assert_eq!(t.src.local_pid(&job), Some(pid));
        assert!(t.rounds_left(&job).is_empty(), "{:?}", t.rounds_left(&job));
    }

    #[tokio::test]
    async fn a_failed_restore_rolls_back_from_the_chain() {
        let t = two(FakeEngine::with_pre_copy(&[
            FakeRound::Bytes(300 * MIB),
            FakeRound::Bytes(MIB),
        ]));
        t.dst_engine.fail_restores.store(1, Ordering::SeqCst);
        let (job, _) = t.start_job();
        let err = t.migrate(&job, Mode::PreCopy).await.unwrap_err();
        assert!(err.to_string().contains("restored on node1"), "{err}");
        // The source verified and restored the same two-round chain.
        assert_eq!(t.src_engine.restores.load(Ordering::SeqCst), 1);
        let rec = t.src.registry.get(&job).unwrap();
        t.pids.lock().unwrap().push(rec.pid);
        assert_eq!((rec.node.as_str(), rec.state), ("node1", JobState::Running));
    }

    #[tokio::test]
    async fn a_tampered_round_is_refused_and_never_restored() {
        let t = two(FakeEngine::with_pre_copy(&[
            FakeRound::Bytes(300 * MIB),
            FakeRound::Bytes(MIB),
        ]));
        *t.peers.1.lock().unwrap() = Some(Box::new(|dir: &Path| {
            std::fs::write(dir.join("pre-1/pagemap-1.img"), b"forged").unwrap();
        }));
        let (job, _) = t.start_job();
        let err = t.migrate(&job, Mode::PreCopy).await.unwrap_err();
        assert!(
            err.to_string().contains("pre-1/pagemap-1.img"),
            "names the tampered file: {err}"
        );
        assert_eq!(t.dst_engine.restores.load(Ordering::SeqCst), 0);
        assert_eq!(t.src_engine.restores.load(Ordering::SeqCst), 0);
        // Neither node would restore it: the images stay for a person.
        let rec = t.src.registry.get(&job).unwrap();
        assert_eq!(rec.state, JobState::Failed);
    }

    #[tokio::test]
    async fn other_modes_never_pre_dump() {
        for mode in [Mode::Auto, Mode::FullCopy] {
            let t = two(FakeEngine::with_pre_copy(&[FakeRound::Bytes(MIB)]));
            let (job, _) = t.start_job();
            let (_, m) = t.migrate(&job, mode).await.unwrap();
            assert_eq!(t.src_engine.pre_dumps.load(Ordering::SeqCst), 0);
            assert_eq!(*t.src_engine.dump_parents.lock().unwrap(), vec![None]);
            assert!(m.fallback.is_empty() && m.pre_copy_rounds == 0, "{m:?}");
        }
    }
    /// Node administration: a target blocked after the source's look
    /// refuses the restore, naming the block, and the job resumes on its
    /// node; a pinned job is refused before anything is frozen.
    #[tokio::test]
    async fn a_blocked_target_refuses_and_a_pinned_job_is_not_moved() {
        let t = two(FakeEngine::default());
        let dst = t.peers.get(&node("node2")).unwrap();
        dst.set_node_admin(Some(true), None).unwrap();
        let (job, _) = t.start_job();
        let err = t.migrate(&job, Mode::FullCopy).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("node2 is blocked (mosctl unblock node2 to allow jobs in)"),
            "{err}"
        );
        assert_eq!(t.dst_engine.restores.load(Ordering::SeqCst), 0);
        let rec = t.src.registry.get(&job).unwrap();
        t.pids.lock().unwrap().push(rec.pid);
        assert_eq!((rec.node.as_str(), rec.state), ("node1", JobState::Running));
        // Nor does a blocked node start a job.
        let e = dst
            .launch(crate::agent::LaunchRequest {
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, AgentError::FailedPrecondition(m) if m.contains("node2 is blocked")),
            "{e:?}"
        );

        // A pinned job: refused, naming the pin, and nothing dumped.
        dst.set_node_admin(Some(false), None).unwrap();
        let (pinned, _) = t.start_job();
        assert!(t.src.set_pinned(&pinned, true).unwrap().pinned);
        let dumps = t.src_engine.dump_parents.lock().unwrap().len();
        let err = t.migrate(&pinned, Mode::FullCopy).await.unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "job {pinned} is pinned to its node (mosctl unpin {pinned}"
            )),
            "{err}"
        );
        assert_eq!(t.src_engine.dump_parents.lock().unwrap().len(), dumps);
        assert!(
            t.src.registry.get(&pinned).unwrap().pinned,
            "the pin is recorded"
        );
        // Unpinned, and the target unblocked: it moves.
        t.src.set_pinned(&pinned, false).unwrap();
        let (rec, _) = t.migrate(&pinned, Mode::FullCopy).await.unwrap();
        assert_eq!(rec.node.as_str(), "node2");
    }
}
