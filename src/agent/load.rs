//! Load metrics of one node.
//!
//! When several simulated nodes share one host, /proc/loadavg is shared too,
//! so a node's load is measured from its own jobs (and its cgroup, when the
//! agent has a `cgroup_scope`): the number of runnable threads of its jobs,
//! averaged over a short window. A CPU-bound job throttled by its node's CPU
//! cap is still runnable, so this counts *demand*, not what the cap lets
//! through. Capacity is the cgroup's CFS quota in cores (or the machine's
//! cores) times the node's speed factor. Memory comes from sysinfo.

use crate::core::procfs::stat_fields;
use crate::core::{JobId, NodeName};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

const WINDOW: usize = 3;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobUsage {
    pub job_id: String,
    pub rss_bytes: u64,
    pub cpu_cores: f64,
    pub runnable: u32,
    pub demand: f64,
    /// What the load feed adds from the job's record (see
    /// [`super::loadfeed`]); GetLoad leaves them at their defaults.
    pub flags: JobFlags,
}

/// A job's record, as far as the balancer plans from it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFlags {
    pub arrived_unix_ms: u64,
    pub pinned: bool,
    pub non_migratable: bool,
    pub post_copy_failed: bool,
    /// A dump, migration, freeze or thaw of it is under way.
    pub busy: bool,
    /// Not sampled yet: its demand is unknown.
    pub unsampled: bool,
    /// It has its own address: only a node that can give jobs theirs may
    /// take it.
    pub own_address: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLoad {
    pub node: String,
    pub load: f64,
    pub capacity: f64,
    pub cpu_usage: f64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub jobs_running: u32,
    pub migrations_in_flight: u32,
    pub migration_bandwidth_bps: f64,
    pub jobs: Vec<JobUsage>,
    pub timestamp_unix_ms: u64,
    pub supports_post_copy: bool,
    pub supports_pre_copy: bool,
    /// The node can give a job its own address (pool and bridge; see
    /// `agent::jobnet`), so a job with one may move here.
    pub job_addresses: bool,
    /// `mosctl block`: no new job or migration in.
    pub blocked: bool,
    /// The relative speed factor (capacity includes it).
    pub speed: f64,
}

#[derive(Default)]
struct State {
    /// Per job: recent runnable counts and the last CPU time seen (ticks).
    runnable: BTreeMap<JobId, VecDeque<u32>>,
    cpu_ticks: BTreeMap<JobId, (u64, std::time::Instant)>,
    usage: BTreeMap<JobId, JobUsage>,
    cgroup_usage_ns: Option<(u64, std::time::Instant)>,
    cpu_usage: f64,
    mem_total: u64,
    mem_available: u64,
    sys: Option<sysinfo::System>,
    machine_runnable: VecDeque<u32>,
}

pub struct LoadSampler {
    scope: Option<String>,
    /// f64 bits of the speed factor: `mosctl setspeed` changes it at runtime.
    speed: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn ns_inode(pid: i32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Host pids by PID namespace, one readlink per pid: a job's whole process
/// tree is the set of pids in its init's namespace. (Looking the namespace of
/// every pid up again for every job made a sample cost jobs × pids readlinks:
/// 18 compiles on a machine of 600 processes read /proc 10,000 times a
/// second, inside the nodes' CPU caps.)
fn pids_by_ns(all: &[i32]) -> HashMap<std::path::PathBuf, Vec<i32>> {
    let mut m: HashMap<std::path::PathBuf, Vec<i32>> = HashMap::new();
    for &p in all {
        if let Some(ns) = ns_inode(p) {
            m.entry(ns).or_default().push(p);
        }
    }
    m
}

/// All host pids in the job's PID namespace (the job's whole process tree).
fn job_pids(init: i32, by_ns: &HashMap<std::path::PathBuf, Vec<i32>>) -> Vec<i32> {
    ns_inode(init)
        .and_then(|ns| by_ns.get(&ns).cloned())
        .unwrap_or_default()
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

struct ProcSample {
    ticks: u64,
    rss: u64,
    runnable: u32,
}

fn sample_pid(pid: i32, page: u64) -> Option<ProcSample> {
    let f = stat_fields(&format!("/proc/{pid}/stat"))?;
    // After "pid (comm) ": state=0, utime=11, stime=12, rss=21 (in pages).
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let rss = f.get(21)?.parse::<u64>().ok()? * page;
    let mut runnable = 0;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            let p = format!("/proc/{pid}/task/{}/stat", t.file_name().to_string_lossy());
            if stat_fields(&p).and_then(|f| f.first().cloned()).as_deref() == Some("R") {
                runnable += 1;
            }
        }
    }
    Some(ProcSample {
        ticks,
        rss,
        runnable,
    })
}

fn read_u64(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl LoadSampler {
    pub fn new(scope: Option<String>, speed: f64) -> Self {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        Self {
            scope,
            speed: std::sync::atomic::AtomicU64::new(speed.to_bits()),
            state: Mutex::new(State::default()),
        }
    }

    /// The node's relative speed factor.
    pub fn speed(&self) -> f64 {
        f64::from_bits(self.speed.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Change the speed factor (ignored unless a positive finite number).
    pub fn set_speed(&self, speed: f64) {
        if speed.is_finite() && speed > 0.0 {
            self.speed
                .store(speed.to_bits(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Cores this node may use (the cgroup's CFS quota, else the machine's)
    /// times the speed factor.
    pub fn capacity(&self) -> f64 {
        let machine = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        let cores = self
            .scope
            .as_ref()
            .and_then(|s| {
                let q = read_u64(&format!("/sys/fs/cgroup/cpu/{s}/cpu.cfs_quota_us"))?;
                let p = read_u64(&format!("/sys/fs/cgroup/cpu/{s}/cpu.cfs_period_us"))?;
                (q > 0 && p > 0).then(|| (q as f64 / p as f64).min(machine))
            })
            .unwrap_or(machine);
        cores * self.speed()
    }

    /// Take one sample of the given jobs (id, host pid of init).
    pub fn sample(&self, jobs: &[(JobId, i32)]) {
        let page = page_size();
        let hz = clock_ticks();
        // Only when there are jobs: an idle node reads no /proc/*/ns.
        let by_ns = if jobs.is_empty() {
            HashMap::new()
        } else {
            pids_by_ns(&all_pids())
        };
        let now = std::time::Instant::now();
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let mut usage = BTreeMap::new();
        for (id, init) in jobs {
            let mut ticks = 0;
            let mut rss = 0;
            let mut runnable = 0;
            for p in job_pids(*init, &by_ns) {
                if let Some(s) = sample_pid(p, page) {
                    ticks += s.ticks;
                    rss += s.rss;
                    runnable += s.runnable;
                }
            }
            let cpu = match st.cpu_ticks.get(id) {
                Some((t0, at)) if ticks >= *t0 => {
                    let dt = now.duration_since(*at).as_secs_f64();
                    if dt > 0.0 {
                        (ticks - t0) as f64 / hz / dt
                    } else {
                        0.0
                    }
                }
                _ => 0.0,
            };
            st.cpu_ticks.insert(id.clone(), (ticks, now));
            let hist = st.runnable.entry(id.clone()).or_default();
            hist.push_back(runnable);
            while hist.len() > WINDOW {
                hist.pop_front();
            }
            let demand = hist.iter().map(|&r| r as f64).sum::<f64>() / hist.len() as f64;
            usage.insert(
                id.clone(),
                JobUsage {
                    job_id: id.to_string(),
                    rss_bytes: rss,
                    cpu_cores: cpu,
                    runnable,
                    demand,
                    flags: JobFlags::default(),
                },
            );
        }
        // Forget jobs that left.
        st.runnable.retain(|k, _| usage.contains_key(k));
        st.cpu_ticks.retain(|k, _| usage.contains_key(k));
        st.usage = usage;

        // CPU usage of the node: its cgroup's cpuacct, else the machine's.
        if let Some(scope) = &self.scope {
            if let Some(ns) = read_u64(&format!("/sys/fs/cgroup/cpuacct/{scope}/cpuacct.usage")) {
                let ns = ns as u64;
                if let Some((n0, at)) = st.cgroup_usage_ns {
                    let dt = now.duration_since(at).as_secs_f64();
                    if dt > 0.0 && ns >= n0 {
                        st.cpu_usage = (ns - n0) as f64 / 1e9 / dt;
                    }
                }
                st.cgroup_usage_ns = Some((ns, now));
            }
        }
        let sys = st.sys.get_or_insert_with(sysinfo::System::new);
        sys.refresh_memory();
        sys.refresh_cpu_usage();
        let (total, avail) = (sys.total_memory(), sys.available_memory());
        let machine_cpu = sys.global_cpu_usage() as f64 / 100.0 * sys.cpus().len() as f64;
        st.mem_total = total;
        st.mem_available = avail;
        if self.scope.is_none() {
            st.cpu_usage = machine_cpu;
            // procs_running counts every runnable task on the machine,
            // including the sampler itself.
            let running = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("procs_running "))
                        .and_then(|v| v.trim().parse::<u32>().ok())
                })
                .unwrap_or(1)
                .saturating_sub(1);
            st.machine_runnable.push_back(running);
            while st.machine_runnable.len() > WINDOW {
                st.machine_runnable.pop_front();
            }
        }
    }

    pub fn snapshot(&self, node: &NodeName, jobs: &[(JobId, i32)]) -> NodeLoad {
        let capacity = self.capacity();
        let Ok(st) = self.state.lock() else {
            return NodeLoad::default();
        };
        let usages: Vec<JobUsage> = jobs
            .iter()
            .map(|(id, _)| {
                st.usage.get(id).cloned().unwrap_or(JobUsage {
                    job_id: id.to_string(),
                    flags: JobFlags {
                        unsampled: true,
                        ..Default::default()
                    },
                    ..Default::default()
                })
            })
            .collect();
        // A job not sampled yet (up to a second after it started or
        // arrived) counts as one busy core, as the balancer counts it: the
        // node that just took a job must not look emptier than it is to
        // `mosctl load`, mosmon or mosgw. Its own demand stays 0 and
        // `unsampled`, so the slot accounting reads what was measured.
        let job_load: f64 = usages
            .iter()
            .map(|u| if u.flags.unsampled { 1.0 } else { u.demand })
            .sum();
        let load = if self.scope.is_some() || st.machine_runnable.is_empty() {
            job_load
        } else {
            let m = st.machine_runnable.iter().map(|&r| r as f64).sum::<f64>()
                / st.machine_runnable.len() as f64;
            m.max(job_load)
        };
        NodeLoad {
            node: node.to_string(),
            load,
            capacity,
            cpu_usage: st.cpu_usage,
            mem_total_bytes: st.mem_total,
            mem_available_bytes: st.mem_available,
            jobs_running: jobs.len() as u32,
            jobs: usages,
            timestamp_unix_ms: crate::core::now_unix_ms(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_own_process_tree() {
        // This test process is not a pid-ns init, but job_pids still finds
        // every process sharing our pid namespace, including ourselves.
        let me = std::process::id() as i32;
        let s = LoadSampler::new(None, 2.0);
        let id = JobId::parse("jself").unwrap();
        s.sample(&[(id.clone(), me)]);
        let nl = s.snapshot(&NodeName::parse("n").unwrap(), &[(id, me)]);
        assert_eq!(nl.jobs.len(), 1);
        assert!(nl.jobs[0].rss_bytes > 0);
        assert!(nl.mem_total_bytes > 0);
        assert!(nl.capacity >= 2.0, "speed factor applied: {}", nl.capacity);
    }

    #[test]
    fn a_job_not_sampled_yet_counts_as_one_busy_core_in_the_node_load() {
        let me = std::process::id() as i32;
        // With a cgroup scope, the node's load is its jobs' alone.
        let s = LoadSampler::new(Some("mosix-test-none".into()), 1.0);
        let node = NodeName::parse("n").unwrap();
        let id = JobId::parse("jnew").unwrap();
        let nl = s.snapshot(&node, &[(id.clone(), me)]);
        assert_eq!(nl.load, 1.0, "{nl:?}");
        assert!(nl.jobs[0].flags.unsampled && nl.jobs[0].demand == 0.0);
        // Once sampled, its measured demand counts, whatever it is.
        s.sample(&[(id.clone(), me)]);
        let nl = s.snapshot(&node, &[(id, me)]);
        assert!(!nl.jobs[0].flags.unsampled);
        assert_eq!(nl.load, nl.jobs[0].demand);
    }
}
