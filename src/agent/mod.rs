//! `mosixd`'s core: what one node's agent does.
//!
//! The agent owns the jobs whose processes run on its node: it launches them
//! ([`launcher`]), reaps them ([`reaper`]), samples their load ([`load`]), and
//! moves them with the dump → restore → confirm → clean-up protocol
//! ([`migration`]). Its operations are the plain enum [`AgentAction`]
//! ([`action`]); the gRPC layer (`api::server`) only converts to and from it.

pub mod action;
pub mod admin;
pub mod checkpoint;
pub mod error;
pub mod events;
pub mod exec;
pub mod fence_watchdog;
pub mod jobnet;
pub mod launcher;
pub mod load;
pub mod loadfeed;
pub mod metrics;
pub mod migration;
pub mod ownership;
pub mod peers;
pub mod portable;
pub mod precopy;
pub mod priority;
pub mod reaper;
pub mod recovery;
pub mod replay;
pub mod runner;
#[cfg(test)]
pub(crate) mod testing;

pub use action::{
    AgentAction, AgentReply, JobList, JobSelector, LaunchRequest, NodeAdminInfo, Unlisted,
};
pub use error::{AgentError, AgentResult};
/// Migration without a shared path (a child of [`migration`], whose steps it
/// reuses); re-exported here because the transport layers use its types.
pub use migration::direct;

use crate::core::registry::Registry;
use crate::core::{now_unix_ms, JobId, JobRecord, JobState, NodeName};
use crate::criu::CheckpointEngine;
use peers::Peers;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Static configuration of one agent (from flags or a config file).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: NodeName,
    /// The agent's root: registry (`registry/jobs`) and images (`images/`).
    /// With `shared`, a path every node shares (`mosixd --shared`); without,
    /// this node's own state dir (`mosixd --state-dir`).
    pub shared_root: PathBuf,
    /// Whether `shared_root` is shared by every node. When it is not, this
    /// node's registry holds the jobs that run here (a job's record travels
    /// with it), ListJobs/GetJob ask every node, and a migration streams the
    /// images to the target's own disk (see [`direct`]).
    pub shared: bool,
    /// Where a job's stdout/stderr live, and its init's working directory
    /// (`<root>/jobs` by default). CRIU reopens these by path on restore, so
    /// without a shared path every node needs the same `--jobs-dir` (on its
    /// own disk); the migration carries the files along.
    pub jobs_dir: PathBuf,
    /// cgroup (v1) path relative to each controller root, e.g. `mosix/local/node1`.
    /// When set, load is measured from this cgroup rather than the machine.
    pub cgroup_scope: Option<String>,
    /// Relative CPU speed of this node (MOSIX's speed factor).
    pub speed: f64,
    /// HMAC key for image manifests; None disables sealing (tests only).
    pub image_key: Option<crate::security::manifest::ClusterKey>,
    /// Address this node's CRIU page server listens on for post-copy
    /// migrations (the agent's own address); None disables post-copy.
    pub page_server_ip: Option<std::net::IpAddr>,
    /// Allow post-copy migrations (`mosixd --no-post-copy` turns them off).
    /// Even when allowed, they need userfaultfd and big pipes on both ends
    /// (see `criu::host`); otherwise requests for post-copy run as full copy.
    pub post_copy: bool,
    /// Without a shared path, carry a full copy's pages on a plain TCP
    /// connection between the two CRIUs instead of relaying them through
    /// both agents' mTLS connection (`mosixd --plain-pages`; used only when
    /// both nodes allow it, and the target has `page_server_ip`). Faster, as
    /// bare CRIU's own migration; the pages then cross the network neither
    /// encrypted nor authenticated, as post-copy's do (see
    /// `direct::stream`, "Plain pages").
    pub plain_pages: bool,
    /// Squeeze the node's other jobs during a dump that moves a job off a
    /// capped node (`mosixd --no-jobs-squeeze` turns it off; see
    /// `Agent::squeeze_jobs`).
    pub jobs_squeeze: bool,
    /// With a jobs group: turn on cgroup2's `favordynmods` at start, so that
    /// putting a job in or out of the group waits for no RCU grace period
    /// (`mosixd --no-cgroup-favordynmods` leaves the mount alone; see
    /// [`crate::core::cgroup`]).
    pub cgroup_favordynmods: bool,
    /// How sealed images are made durable before the hand-over; registry
    /// records follow the same choice.
    pub image_sync: ImageSync,
    /// Directories every node sees at the same path besides `shared_root`
    /// and `jobs_dir` (`mosixd --common-dir`): files open there do not pin
    /// a job to its node (see [`portable`]).
    pub common_dirs: Vec<PathBuf>,
    /// Jobs with their own address (`mosixd --job-net-pool …`); None: every
    /// job uses the node's network (see [`jobnet`]).
    pub job_net: Option<jobnet::JobNetConfig>,
    /// How long a source keeps asking a target that went silent during a
    /// move without a shared path whether it restored the job, before it
    /// records the job frozen here for a person to decide (`mosixd
    /// --settle-patience`, default [`direct::DEFAULT_SETTLE_PATIENCE`]).
    pub settle_patience: std::time::Duration,
}

/// How the images of a dump are made durable before the target restores
/// them (the source copy of the job is gone by then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageSync {
    /// fsync every image file and the directory.
    #[default]
    Fsync,
    /// Rely on the file system making files durable when CRIU closes them.
    /// Right for NFS (close-to-open: the client flushes and commits on
    /// close), where an extra fsync costs a second round trip, and for a
    /// local cluster, whose nodes all share one machine's fate anyway.
    OnClose,
}

/// A job process on this node that the agent watches.
#[derive(Debug, Clone)]
pub(crate) struct LocalJob {
    pub pid: i32,
    /// A dump is under way: its exit is expected and is not the job's end.
    pub dumping: bool,
    /// The process ended while a dump was under way (status kept for later).
    pub exited_during_dump: Option<reaper::ExitStatus>,
}

pub struct Agent {
    pub cfg: AgentConfig,
    pub registry: Registry,
    pub engine: Arc<dyn CheckpointEngine>,
    pub peers: Arc<dyn Peers>,
    pub(crate) local: Mutex<BTreeMap<JobId, LocalJob>>,
    /// Jobs with a dump/migrate/freeze/thaw under way (one at a time per job).
    busy: Mutex<BTreeSet<JobId>>,
    /// Bumped whenever `busy` changes, so that the load feed reports an
    /// operation's end at once: the job event of a migration is sent while
    /// its slot is still held, and a report from then would show the job
    /// busy until the next look, a second later (a balancer round lost).
    pub(crate) busy_changed: tokio::sync::watch::Sender<u64>,
    pub load: load::LoadSampler,
    pub stats: migration::MigrationStats,
    pub metrics: metrics::AgentMetrics,
    /// One CRIU operation at a time on this node: concurrent dumps from one
    /// network namespace were seen to fail in CRIU's parasite ("Can't
    /// retrieve FD from socket"), and they would only compete for the CPU.
    pub(crate) criu_lock: Arc<tokio::sync::Mutex<()>>,
    /// Serialises the read-modify-write of a job's end: the reaper (it
    /// exited) and the post-copy watcher (its memory never fully arrived)
    /// can both see the same end; without this, the later writer could
    /// overwrite the earlier verdict with a stale copy of the record.
    pub(crate) verdict_lock: Mutex<()>,
    /// Foreground jobs waiting for their process's end (see [`exec`]).
    pub(crate) exit_watch: Mutex<
        std::collections::HashMap<JobId, tokio::sync::oneshot::Sender<Option<reaper::ExitStatus>>>,
    >,
    /// Slots of this node held by foreground jobs, and the factor that
    /// derives the slot count from capacity (see [`crate::placement`]).
    pub(crate) slots: exec::SlotCounter,
    /// The home side of `mosrun`: the placement table (see [`runner`]).
    pub(crate) runner: runner::Runner,
    /// Job events for front ends and schedulers (`WatchEvents`), and the
    /// bounded wait for them before a service instance is frozen.
    pub events: events::Events,
    /// Blocked or not, and the speed an administrator set (persisted).
    pub admin: admin::AdminState,
    /// Lease, ownership and fencing on etcd, when configured (see
    /// [`ownership`]); set once at start, before the agent serves.
    pub(crate) coord: std::sync::OnceLock<Arc<ownership::AgentCoord>>,
    /// The node cgroup's child that holds the jobs, below the agent and its
    /// CRIU workers (see [`crate::core::cgroup`]); None without a node
    /// cgroup: jobs then share the agent's.
    pub(crate) jobs_group: Option<crate::core::cgroup::JobsGroup>,
    /// The jobs group's squeeze while moves off this node hold it.
    squeeze: crate::core::cgroup::SqueezeShare,
    /// Frames that reach a moving job's own address while it is frozen,
    /// kept to be sent on once it runs again (see [`replay`]).
    pub(crate) held_frames: replay::Held,
    /// Page images received over a page stream, waiting for the push of
    /// the same migration (see [`direct::stream`]).
    pub(crate) streamed_pages: direct::stream::Received,
    /// Migrations whose streamed pages this agent hashed as they arrived
    /// and sealed itself: their restore may consume the page images.
    pub(crate) hashed_on_arrival: direct::stream::HashedOnArrival,
}

/// Holds a job's operation slot; releases it on drop, also on panic.
pub(crate) struct BusyGuard<'a> {
    agent: &'a Agent,
    job: JobId,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.agent.busy.lock() {
            b.remove(&self.job);
        }
        self.agent
            .busy_changed
            .send_modify(|n| *n = n.wrapping_add(1));
    }
}

const MAX_ARGV_BYTES: usize = 1 << 20;

impl Agent {
    pub fn new(
        cfg: AgentConfig,
        engine: Arc<dyn CheckpointEngine>,
        peers: Arc<dyn Peers>,
    ) -> AgentResult<Arc<Self>> {
        let registry =
            Registry::open(&cfg.shared_root)?.with_fsync(cfg.image_sync == ImageSync::Fsync);
        let load = load::LoadSampler::new(cfg.cgroup_scope.clone(), cfg.speed);
        let admin = admin::AdminState::open(admin::AdminState::path_for(
            &cfg.shared_root,
            cfg.node.as_str(),
        ))
        .map_err(|e| AgentError::Internal(e.to_string()))?;
        // A speed set with `mosctl setspeed` outlives restarts: it wins
        // over the flag until it is set again.
        if let Some(s) = admin.get().speed {
            if s != cfg.speed {
                tracing::info!(
                    flag = cfg.speed,
                    set = s,
                    "using the speed set with mosctl setspeed"
                );
            }
            load.set_speed(s);
        }
        if admin.blocked() {
            tracing::warn!(node = %cfg.node, "{}", admin::blocked_message(cfg.node.as_str()));
        }
        let mut names = peers.names();
        if !names.iter().any(|n| n == cfg.node.as_str()) {
            names.push(cfg.node.to_string());
        }
        let runner = runner::Runner::new(names);
        let metrics = metrics::AgentMetrics::new(cfg.node.as_str())
            .map_err(|e| AgentError::Internal(format!("metrics: {e}")))?;
        let jobs_group = Self::jobs_group_for(cfg.cgroup_scope.as_deref(), cfg.cgroup_favordynmods);
        Ok(Arc::new(Self {
            cfg,
            registry,
            engine,
            peers,
            local: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
            busy_changed: tokio::sync::watch::Sender::new(0),
            load,
            stats: migration::MigrationStats::default(),
            metrics,
            criu_lock: Arc::new(tokio::sync::Mutex::new(())),
            verdict_lock: Mutex::new(()),
            exit_watch: Mutex::new(Default::default()),
            held_frames: Mutex::new(Default::default()),
            streamed_pages: Default::default(),
            hashed_on_arrival: Default::default(),
            slots: exec::SlotCounter::default(),
            runner,
            events: events::Events::default(),
            admin,
            coord: std::sync::OnceLock::new(),
            jobs_group,
            squeeze: Default::default(),
        }))
    }

    /// The jobs group under the node cgroup `scope` (made if missing). Not
    /// fatal without one: jobs then share the agent's cgroup, as they did
    /// before the group existed, and a move off a crowded node is slower.
    fn jobs_group_for(
        scope: Option<&str>,
        favordynmods: bool,
    ) -> Option<crate::core::cgroup::JobsGroup> {
        let Some(scope) = scope else {
            tracing::info!(
                "no node cgroup (--cgroup): jobs share the agent's cgroup, so a move off a crowded node competes with them for the CPU"
            );
            return None;
        };
        match crate::core::cgroup::JobsGroup::for_node(scope) {
            Ok(g) => {
                tracing::info!(
                    jobs = %g.jobs_dir().display(),
                    shares = crate::core::cgroup::JOBS_SHARES,
                    "jobs run in a child cgroup of the node's, below the agent and CRIU"
                );
                if favordynmods {
                    Self::favor_dynmods();
                }
                Some(g)
            }
            Err(e) => {
                tracing::warn!(
                    "no jobs cgroup under {scope} ({e}): jobs share the agent's cgroup, so a move off a crowded node competes with them for the CPU"
                );
                None
            }
        }
    }

    /// Turn on cgroup2's `favordynmods` (see [`crate::core::cgroup`]): a
    /// move writes the job's pids into `cgroup.procs` twice, and each write
    /// otherwise waits for an RCU grace period. Not fatal: moves still work,
    /// ~10 ms slower.
    fn favor_dynmods() {
        use crate::core::cgroup::DynMods;
        match crate::core::cgroup::favor_dynmods() {
            Ok(DynMods::AlreadyOn(at)) => {
                tracing::debug!(mount = %at.display(), "cgroup2 has favordynmods already")
            }
            Ok(DynMods::TurnedOn(at)) => tracing::info!(
                mount = %at.display(),
                "remounted cgroup2 with favordynmods: moving a job in or out of the jobs cgroup no longer waits for an RCU grace period (--no-cgroup-favordynmods leaves the mount alone)"
            ),
            Ok(DynMods::NoCgroup2) => tracing::info!(
                "no cgroup2 mount to set favordynmods on: each move of a job in or out of the jobs cgroup waits for an RCU grace period (a few ms)"
            ),
            Err(e) => tracing::warn!(
                "could not set favordynmods on cgroup2 ({e}): each move of a job in or out of the jobs cgroup waits for an RCU grace period (a few ms)"
            ),
        }
    }

    /// Before the dump that moves the job rooted at `pid`: lift it to the
    /// agent's cgroup level and raise its threads to the CRIU worker's nice
    /// (CRIU's parasite runs in them). Returns what [`Self::after_dump`]
    /// puts back (the nice values; the cgroup is always the jobs group).
    pub(crate) fn before_dump(&self, pid: i32) -> Vec<(i32, i32)> {
        if let Some(g) = &self.jobs_group {
            if let Err(e) = g.lift_tree(pid) {
                tracing::warn!(
                    pid,
                    "could not lift the job out of the jobs cgroup for its dump: {e}"
                );
            }
        }
        priority::raise(pid, crate::criu::swrk::WORKER_NICE)
    }

    /// The job rooted at `pid` runs here again after a dump (CRIU resumed
    /// it, or restored it): its nice values back, and into the jobs group.
    pub(crate) fn after_dump(&self, pid: i32, nice_before_dump: &[(i32, i32)]) {
        priority::put_back(pid, nice_before_dump);
        self.place_in_jobs_group(pid);
    }

    /// For the dump that moves a job off this node: on a node with a CPU
    /// cap, the other jobs get 1% of a core until the guard is dropped, so
    /// that CRIU (and its parasite in the lifted job) get the node's quota
    /// nearly whole. Shares alone cannot do that: they weigh tasks on one
    /// CPU, while the cap is one quota for all of them, and the jobs on the
    /// other CPUs used it up in every period (see [`crate::core::cgroup`]).
    /// `mosixd --no-jobs-squeeze` turns it off (to measure what it buys).
    ///
    /// Held for a move's whole frozen window on this node (see
    /// `migration::migrate`), not only its dump: after the dump, the seal,
    /// the hand-over record and the wait for the target's answer each ran
    /// out of the node's quota and waited for the next CFS period (10 ms on
    /// a local cluster) once the jobs had it back, ~40 ms of a 160 ms move
    /// off a crowded node (BENCHMARKS.md, 3b). Holders share one squeeze
    /// (see [`crate::core::cgroup::SqueezeShare`]).
    pub(crate) fn squeeze_jobs(&self) -> Option<crate::core::cgroup::SqueezeHold> {
        if !self.cfg.jobs_squeeze {
            return None;
        }
        self.squeeze.hold(self.jobs_group.as_ref()?)
    }

    /// Put the job tree rooted at `pid` in the jobs group (a no-op without
    /// one, or if it is there already).
    pub(crate) fn place_in_jobs_group(&self, pid: i32) {
        if let Some(g) = &self.jobs_group {
            if let Err(e) = g.place_tree(pid) {
                tracing::warn!(pid, "could not put the job in the jobs cgroup: {e}");
            }
        }
    }

    /// Checkpoints live on the shared path, so that any node can restart
    /// a job from them; a node's own state dir would die with the node.
    fn checkpoints_need_shared(&self) -> AgentResult<()> {
        if self.cfg.shared {
            Ok(())
        } else {
            Err(AgentError::FailedPrecondition(format!(
                "checkpoints need a shared path (mosixd --shared); {} has none",
                self.cfg.node
            )))
        }
    }

    pub(crate) fn claim(&self, job: &JobId) -> AgentResult<BusyGuard<'_>> {
        let mut b = self
            .busy
            .lock()
            .map_err(|_| AgentError::Internal("busy lock poisoned".into()))?;
        if !b.insert(job.clone()) {
            return Err(AgentError::FailedPrecondition(format!(
                "job {job} has another operation under way; try again when it finishes"
            )));
        }
        drop(b);
        self.busy_changed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(BusyGuard {
            agent: self,
            job: job.clone(),
        })
    }

    pub(crate) fn local_pid(&self, job: &JobId) -> Option<i32> {
        self.local.lock().ok()?.get(job).map(|j| j.pid)
    }

    /// Take one load sample of this node's jobs (blocking: reads /proc).
    pub fn sample_load(&self) {
        let jobs: Vec<(JobId, i32)> = self
            .local
            .lock()
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.pid)).collect())
            .unwrap_or_default();
        self.load.sample(&jobs);
    }

    pub fn node_load(&self) -> load::NodeLoad {
        let jobs: Vec<(JobId, i32)> = self
            .local
            .lock()
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.pid)).collect())
            .unwrap_or_default();
        let mut nl = self.load.snapshot(&self.cfg.node, &jobs);
        nl.blocked = self.admin.blocked();
        nl.speed = self.load.speed();
        nl.migrations_in_flight = self.stats.in_flight();
        nl.migration_bandwidth_bps = self.stats.bandwidth();
        let f = self.engine.features();
        nl.supports_post_copy = f.lazy_pages;
        nl.supports_pre_copy = f.mem_dirty_track;
        nl.job_addresses = self.cfg.job_net.as_ref().is_some_and(|c| c.available());
        nl
    }

    /// This node's administrative settings.
    pub fn node_admin(&self) -> NodeAdminInfo {
        NodeAdminInfo {
            node: self.cfg.node.to_string(),
            blocked: self.admin.blocked(),
            speed: self.load.speed(),
        }
    }

    /// Block/unblock this node or change its speed; persisted first.
    pub fn set_node_admin(
        &self,
        blocked: Option<bool>,
        speed: Option<f64>,
    ) -> AgentResult<NodeAdminInfo> {
        let s = self.admin.set(blocked, speed).map_err(|e| match e {
            admin::AdminError::BadSpeed(_) => AgentError::InvalidArgument(e.to_string()),
            other => AgentError::Internal(other.to_string()),
        })?;
        if let Some(v) = s.speed {
            self.load.set_speed(v);
        }
        let info = self.node_admin();
        tracing::info!(
            node = %self.cfg.node,
            blocked = info.blocked,
            speed = info.speed,
            "node settings changed"
        );
        Ok(info)
    }

    /// Refuse a new job or an incoming migration while this node is blocked.
    pub(crate) fn check_not_blocked(&self) -> AgentResult<()> {
        if self.admin.blocked() {
            return Err(AgentError::FailedPrecondition(admin::blocked_message(
                self.cfg.node.as_str(),
            )));
        }
        Ok(())
    }

    /// Pin or unpin a job that runs on this node (its record says so; the
    /// balancer and Migrate read it from there).
    pub fn set_pinned(&self, id: &JobId, pinned: bool) -> AgentResult<JobRecord> {
        let _busy = self.claim(id)?;
        // The reaper writes a job's end under this lock: without it, an
        // exit recorded between our read and our write would be undone.
        let _verdict = self.verdict_lock.lock();
        let (mut rec, _pid) = self.local_running(id)?;
        if rec.pinned != pinned {
            rec.pinned = pinned;
            self.registry.put(&mut rec)?;
            tracing::info!(job = %id, pinned, "job pin changed");
        }
        Ok(rec)
    }

    /// Start a migratable job on this node.
    pub async fn launch(self: &Arc<Self>, req: LaunchRequest) -> AgentResult<JobRecord> {
        self.check_not_blocked()?;
        self.check_not_fenced()?;
        let rec = self
            .launch_with(req, LaunchExtras::default())
            .map_err(|e| e.into_agent_error())?;
        // With etcd, a job runs only with an owner record: without one, a
        // restart after a lost lease could not tell who may run it.
        if let Err(e) = self.claim_owner(&rec.id).await {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(rec.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(e.context(&format!(
                "job {} stopped at once: its owner could not be recorded in etcd",
                rec.id
            )));
        }
        Ok(rec)
    }

    /// [`launch`](Self::launch) with a foreground job's extras; the error
    /// keeps the launcher's reason, so a caller can tell "command not found"
    /// from "not executable" from a bad cwd (a shell's 127/126).
    pub(crate) fn launch_with(
        self: &Arc<Self>,
        req: LaunchRequest,
        extras: LaunchExtras,
    ) -> Result<JobRecord, LaunchFailure> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(LaunchFailure::Agent(AgentError::InvalidArgument(
                "argv must not be empty".into(),
            )));
        }
        let total: usize = req.argv.iter().map(|a| a.len()).sum::<usize>()
            + req
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if total > MAX_ARGV_BYTES {
            return Err(LaunchFailure::Agent(AgentError::InvalidArgument(
                "argv and environment exceed 1 MiB".into(),
            )));
        }
        if req.env.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err(LaunchFailure::Agent(AgentError::InvalidArgument(
                "environment names must be non-empty and contain no '='".into(),
            )));
        }
        if req.name.len() > 256 {
            return Err(LaunchFailure::Agent(AgentError::InvalidArgument(
                "name longer than 256 bytes".into(),
            )));
        }
        let cwd = if req.cwd.is_empty() {
            "/".to_string()
        } else {
            req.cwd.clone()
        };
        if !cwd.starts_with('/') {
            return Err(LaunchFailure::Agent(AgentError::InvalidArgument(format!(
                "cwd {cwd:?} must be an absolute path"
            ))));
        }
        let id = JobId::generate();
        let out_dir = self.cfg.jobs_dir.join(id.as_str());
        std::fs::create_dir_all(&out_dir)
            .map_err(|e| LaunchFailure::Agent(io_error("create job output dir", e)))?;
        let spec = launcher::LaunchSpec {
            argv: req.argv.clone(),
            env: req.env.clone(),
            cwd: cwd.clone().into(),
            uid: req.uid,
            gid: req.gid,
            stdout: out_dir.join("stdout"),
            stderr: out_dir.join("stderr"),
            init: launcher::default_init().map(|i| (i, out_dir.clone())),
            // A caller may lower its job's priority, never raise it above
            // what every job here gets.
            nice: extras.nice.map_or(crate::core::job_nice(), |n| {
                n.clamp(crate::core::job_nice(), 19)
            }),
            stdin: extras.stdin,
            umask: extras.umask,
            own_netns: false,
            cgroup_procs: None,
        };
        let net = self
            .job_net_for(&id, req.own_net)
            .map_err(LaunchFailure::Agent)?;
        let mut spec = spec;
        spec.own_netns = net.is_some();
        // Opened here, written by the child before exec (see the launcher).
        let cgroup_procs = match &self.jobs_group {
            Some(g) => Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(g.jobs_procs())
                    .map_err(|e| {
                        LaunchFailure::Agent(io_error(
                            &format!("opening {}", g.jobs_procs().display()),
                            e,
                        ))
                    })?,
            ),
            None => None,
        };
        spec.cgroup_procs = cgroup_procs.as_ref().map(|f| {
            use std::os::fd::AsRawFd;
            f.as_raw_fd()
        });
        // Watch for the exit before the process exists: a `true` can end
        // before `launch` returns.
        if let Some(w) = extras.watch {
            if let Ok(mut m) = self.exit_watch.lock() {
                m.insert(id.clone(), w);
            }
        }
        let plumb = |pid: i32| match (&net, &self.cfg.job_net) {
            (Some(n), Some(c)) => jobnet::plumb(pid, &jobnet::host_veth(id.as_str()), &c.bridge, n)
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        let pid = launcher::launch_then(&spec, &plumb).map_err(|e| {
            if let Ok(mut m) = self.exit_watch.lock() {
                m.remove(&id);
            }
            if let Some(n) = &net {
                self.release_address(&id, n);
            }
            LaunchFailure::Launch(e)
        })?;
        let now = now_unix_ms();
        let mut rec = JobRecord {
            id: id.clone(),
            name: req.name,
            node: self.cfg.node.clone(),
            state: JobState::Running,
            pid,
            argv: req.argv,
            cwd,
            uid: req.uid,
            gid: req.gid,
            stdout_path: spec.stdout.to_string_lossy().into_owned(),
            stderr_path: spec.stderr.to_string_lossy().into_owned(),
            created_unix_ms: now,
            arrived_unix_ms: now,
            exit_code: None,
            exit_signal: None,
            history: vec![],
            pending: None,
            pinned: req.pinned,
            non_migratable: req.non_migratable,
            error: String::new(),
            generation: 0,
            service: req.service,
            checkpoint: req.checkpoint,
            net,
        };
        self.adopt_child(&id, pid);
        if let Err(e) = self.registry.put(&mut rec) {
            // Without a record nobody could find or move the job: undo.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(LaunchFailure::Agent(
                AgentError::from(e).context("recording the new job"),
            ));
        }
        tracing::info!(job = %id, pid, "launched");
        self.events.running(&rec, &self.cfg.node);
        if self.coord().is_some() {
            // Every launch path (foreground jobs too) records its owner;
            // `launch` also waits for it and refuses on failure.
            let (a, job) = (self.clone(), id.clone());
            tokio::spawn(async move {
                if let Err(e) = a.claim_owner(&job).await {
                    tracing::warn!(job = %job, "owner record not written yet: {e}");
                }
            });
        }
        Ok(rec)
    }

    /// Start watching a child process as job `id`.
    pub(crate) fn adopt_child(self: &Arc<Self>, id: &JobId, pid: i32) {
        if self.check_not_fenced().is_err() {
            // A restore that finished while the node fenced itself: the
            // fence has run already, so this copy must not live on.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            tracing::error!(job = %id, pid, "fenced: a job that arrived during the fence was killed");
        }
        if let Ok(mut l) = self.local.lock() {
            l.insert(
                id.clone(),
                LocalJob {
                    pid,
                    dumping: false,
                    exited_during_dump: None,
                },
            );
        }
        // The watchdog must know of it before anything can stop us.
        self.publish_fence();
        reaper::watch_child(self.clone(), id.clone(), pid);
    }

    pub fn list_jobs(
        &self,
        node: Option<NodeName>,
        include_finished: bool,
    ) -> AgentResult<Vec<JobRecord>> {
        let (all, bad) = self.registry.list()?;
        for e in bad {
            tracing::warn!("skipping registry record: {e}");
        }
        Ok(all
            .into_iter()
            .filter(|r| node.as_ref().is_none_or(|n| &r.node == n))
            .filter(|r| include_finished || !r.state.is_finished())
            .collect())
    }

    pub fn get_job(&self, sel: &JobSelector) -> AgentResult<JobRecord> {
        match sel {
            JobSelector::Id(id) => Ok(self.registry.get(id)?),
            JobSelector::Pid(pid) => {
                let found = self.local.lock().ok().and_then(|l| {
                    l.iter()
                        .find(|(_, j)| j.pid == *pid)
                        .map(|(k, _)| k.clone())
                });
                match found {
                    Some(id) => Ok(self.registry.get(&id)?),
                    None => Err(AgentError::PermissionDenied(format!(
                        "pid {pid} is not a job managed by mosix on {}; only jobs started with mosrun (or restored by mosix) can be inspected, dumped, signalled or migrated",
                        self.cfg.node
                    ))),
                }
            }
        }
    }

    /// The node a job is on, if that is another node of the cluster. None
    /// when it is here, unknown, or the lookup fails: the local migration
    /// then reports why.
    async fn node_of_job_elsewhere(self: &Arc<Self>, id: &JobId) -> Option<NodeName> {
        // A job whose process this agent manages is here: no record to read
        // (the local migration reads it anyway).
        if self.local_pid(id).is_some() {
            return None;
        }
        let rec = if self.cfg.shared {
            self.registry.get(id).ok()?
        } else {
            self.get_job_cluster(id).await.ok()?
        };
        (rec.node != self.cfg.node && self.peers.knows(&rec.node)).then_some(rec.node)
    }

    /// The record of a job that must be running on this node.
    pub(crate) fn local_running(&self, id: &JobId) -> AgentResult<(JobRecord, i32)> {
        let rec = self.registry.get(id)?;
        if rec.node != self.cfg.node {
            return Err(AgentError::FailedPrecondition(format!(
                "job {id} is on {}, not on {}",
                rec.node, self.cfg.node
            )));
        }
        if rec.state != JobState::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "job {id} is {}, not running",
                rec.state.as_str()
            )));
        }
        let pid = self.local_pid(id).ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "job {id} is recorded on {} but this agent does not manage its process",
                self.cfg.node
            ))
        })?;
        Ok((rec, pid))
    }

    pub fn signal(&self, id: &JobId, signal: i32) -> AgentResult<JobRecord> {
        if !(1..=64).contains(&signal) {
            return Err(AgentError::InvalidArgument(format!(
                "signal {signal} out of range 1..=64"
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(|_| {
            AgentError::InvalidArgument(format!("signal {signal} is not supported"))
        })?;
        let _busy = self.claim(id)?;
        let (rec, pid) = self.local_running(id)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| AgentError::Internal(format!("kill({pid}, {signal}): {e}")))?;
        Ok(rec)
    }
}

/// What a foreground launch adds to a plain one.
#[derive(Debug, Default)]
pub(crate) struct LaunchExtras {
    pub stdin: Option<std::os::fd::RawFd>,
    pub umask: Option<u32>,
    /// Requested nice value; raised to the node's default if below it.
    pub nice: Option<i32>,
    /// Told the job's exit status when its process ends here (not when a
    /// dump ends it: the job then lives on elsewhere).
    pub watch: Option<tokio::sync::oneshot::Sender<Option<reaper::ExitStatus>>>,
}

/// Why a launch failed: the launcher's own reason, or any other error.
#[derive(Debug)]
pub(crate) enum LaunchFailure {
    Launch(launcher::LaunchError),
    Agent(AgentError),
}

impl LaunchFailure {
    pub(crate) fn into_agent_error(self) -> AgentError {
        match self {
            LaunchFailure::Agent(e) => e,
            LaunchFailure::Launch(e) => match e {
                launcher::LaunchError::Output(_, ref io)
                    if io.raw_os_error() == Some(libc::ENOSPC) =>
                {
                    AgentError::ResourceExhausted(e.to_string())
                }
                launcher::LaunchError::Clone(_)
                | launcher::LaunchError::Pipe(_)
                | launcher::LaunchError::Cgroup(_) => AgentError::Internal(e.to_string()),
                _ => AgentError::InvalidArgument(e.to_string()),
            },
        }
    }
}

pub(crate) fn io_error(what: &str, e: std::io::Error) -> AgentError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        AgentError::ResourceExhausted(format!("{what}: disk is full: {e}"))
    } else {
        AgentError::Internal(format!("{what}: {e}"))
    }
}

/// Run `f` in a network namespace of its own, on a thread of its own, so a
/// test's links and bridges never touch the machine's; false (and a loud
/// SKIPPED) where that needs root and the test lacks it.
#[cfg(test)]
pub(crate) fn in_own_netns(f: impl FnOnce() + Send + 'static) -> bool {
    // SAFETY: a plain query.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root (a network namespace of its own)");
        return false;
    }
    std::thread::spawn(move || {
        // SAFETY: changes only this thread's network namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap();
    true
}
