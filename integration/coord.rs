//! Issue 16 (part B): leases, ownership epochs, fencing and the balancer
//! election on a real etcd (Debian's etcd-server, started by `local up`).

use crate::support::*;
use mosix::coord::ownership::{OwnerRecord, Owners};
use std::process::Command;
use std::time::{Duration, Instant};

const MOSIXD: &str = env!("CARGO_BIN_EXE_mosixd");
/// These tests run with etcd (the harness starts clusters without it).
const ETCD: &[&str] = &["--etcd-members", "1"];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn cluster_file(cl: &Cluster) -> mosix::core::cluster_file::ClusterFile {
    mosix::core::cluster_file::ClusterFile::load(&cl.file).unwrap()
}

/// The job's owner record in etcd.
fn owner(cl: &Cluster, job: &str) -> Option<OwnerRecord> {
    let cf = cluster_file(cl);
    rt().block_on(async {
        let s = mosix::coord::connect(&cf.etcd).await.unwrap();
        Owners::new(s, &cf.name).get(job).await.unwrap()
    })
}

fn set_owner(cl: &Cluster, job: &str, from: &OwnerRecord, to: &str) -> OwnerRecord {
    let cf = cluster_file(cl);
    rt().block_on(async {
        let s = mosix::coord::connect(&cf.etcd).await.unwrap();
        Owners::new(s, &cf.name)
            .move_to(job, from, to)
            .await
            .unwrap()
    })
}

fn etcd_ip(cl: &Cluster) -> String {
    let cf = cluster_file(cl);
    let e = cf
        .etcd
        .first()
        .expect("local up starts etcd by default")
        .clone();
    e.trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_string()
}

/// Cut `node` off etcd only (a blackhole route in its namespace): it still
/// reaches its peers and the shared path.
fn cut_from_etcd(cl: &Cluster, node: &str, cut: bool) {
    let o = Command::new("ip")
        .args(["-n", &cl.netns(node), "route"])
        .arg(if cut { "add" } else { "del" })
        .args(["blackhole", &format!("{}/32", etcd_ip(cl))])
        .output()
        .unwrap();
    assert!(o.status.success(), "ip route: {}", stderr(&o));
}

/// A `mos-balance serve` of the cluster (no rebalancing), killed when dropped.
struct Serving(std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_balancer(cl: &Cluster, port: u16) -> Serving {
    serve_balancer_logged(cl, port, None)
}

/// A balancer whose log goes to `log` (if given).
fn serve_balancer_logged(cl: &Cluster, port: u16, log: Option<&std::path::Path>) -> Serving {
    let err = match log {
        Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
        None => std::process::Stdio::null(),
    };
    Serving(
        Command::new(MOSBALANCE)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--no-auto",
            ])
            .env("MOSIX_CLUSTER", &cl.file)
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .expect("starting mos-balance serve"),
    )
}

/// Which balancer leads now, as etcd says.
fn balancer_leader(
    cf: &mosix::core::cluster_file::ClusterFile,
) -> Option<mosix::coord::election::Leader> {
    rt().block_on(async {
        let s = mosix::coord::connect(&cf.etcd).await.unwrap();
        mosix::coord::election::Election::new(s, &cf.name, "probe")
            .leader()
            .await
            .unwrap()
    })
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rfind(')').and_then(|i| s.get(i + 2..i + 3)) != Some("Z"))
        .unwrap_or(false)
}

/// Each process of the node with its state, and where each thread of
/// its agent waits (for a failure's message).
fn node_threads(cl: &Cluster, node: &str) -> String {
    let o = Command::new("ip")
        .args(["netns", "pids", &cl.netns(node)])
        .output()
        .unwrap();
    let mut out = String::new();
    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        out.push_str(&format!(
            "{pid}: {}\n",
            stat.split(' ').take(3).collect::<Vec<_>>().join(" ")
        ));
        if stat.contains("(mosixd)") {
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for t in tasks.flatten() {
                    let p = t.path();
                    let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                    let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
                    let st = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
                    let state = st
                        .rfind(')')
                        .and_then(|i| st.get(i + 2..i + 3))
                        .unwrap_or("?")
                        .to_string();
                    out.push_str(&format!(
                        "   task {:?} {} {state} {wchan}\n",
                        t.file_name(),
                        comm.trim()
                    ));
                }
            }
        }
    }
    out
}

fn node_log(cl: &Cluster, node: &str) -> String {
    std::fs::read_to_string(format!("/run/mosix/{}/{node}.log", cl.name)).unwrap_or_default()
}

fn sleeper(cl: &Cluster, node: &str) -> (String, i32) {
    let file = cl
        .shared
        .join(format!("ticks-{node}-{}.txt", uuid::Uuid::new_v4()));
    let job = counter(cl, node, "0", &file, &[], &[]);
    let pid = cl.record(&job).pid;
    assert!(pid > 0 && alive(pid));
    (job, pid)
}

#[test]
fn a_node_cut_off_etcd_fences_its_jobs_before_its_lease_expires() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, ETCD);
    let (job, pid) = sleeper(&cl, "node1");
    let before = owner(&cl, &job).expect("the job has an owner record");
    assert_eq!(before.node, "node1");
    cut_from_etcd(&cl, "node1", true);
    let cut = Instant::now();
    cl.wait_for("node1 to kill its job", 12, || !alive(pid));
    let fenced_after = cut.elapsed();
    // Default lease: TTL 10 s, fenced at 7 s after the last good renewal
    // (which was at most 3.3 s before the cut).
    assert!(
        fenced_after < Duration::from_secs(8),
        "fenced after {fenced_after:?}, not before the lease could expire"
    );
    assert!(node_log(&cl, "node1").contains("fenced"));
    // While it is cut off, the views show it LOST, although it answers.
    cl.wait_for("node1 to show LOST", 10, || {
        stdout(&cl.mosctl(&["load"])).contains("LOST")
    });
    // Nothing was written for the job meanwhile.
    assert_eq!(cl.record(&job).state, mosix::core::JobState::Running);
    // Heal: nobody took the job over, so node1 records it failed, with the
    // reason, after bumping the epoch; the copy it killed stays dead.
    cut_from_etcd(&cl, "node1", false);
    cl.wait_for("node1 to record the fenced job", 15, || {
        cl.record(&job).state == mosix::core::JobState::Failed
    });
    let rec = cl.record(&job);
    assert!(rec.error.contains("self-fencing"), "{}", rec.error);
    let after = owner(&cl, &job).unwrap();
    assert_eq!(after.node, "node1");
    assert!(after.epoch > before.epoch, "{after:?} vs {before:?}");
    assert!(!alive(pid));
    // The node takes jobs again.
    let (_j2, p2) = sleeper(&cl, "node1");
    assert!(alive(p2));
}

/// A SIGSTOPped agent cannot fence itself: its fence watchdog (a process
/// of its own, see coord::watchdog) kills the jobs at the agent's fencing
/// deadline, while the agent is still stopped and before etcd can expire
/// the lease. After SIGCONT the agent finds itself fenced and, as nobody
/// took the job over, records it failed.
#[test]
fn a_sigstopped_agents_jobs_are_killed_by_its_fence_watchdog_before_the_lease_expires() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, ETCD);
    let (job, pid) = sleeper(&cl, "node1");
    let agent = mosix::local::agent_pid(&cl.name, "node1").unwrap();
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    let stopped = Instant::now();
    // Default lease: TTL 10 s, fenced 7 s after the last good renewal
    // (which was at most 3.3 s before the stop).
    cl.wait_for("the watchdog to kill the job", 12, || !alive(pid));
    let took = stopped.elapsed();
    assert_eq!(proc_state(agent), Some('T'), "the agent is still stopped");
    unsafe { libc::kill(agent, libc::SIGCONT) };
    assert!(
        took < Duration::from_secs(10),
        "killed {took:?} after the stop, not before the lease could expire"
    );
    assert!(node_log(&cl, "node1").contains("fence watchdog: the agent did not renew"));
    cl.wait_for("the fenced job recorded", 15, || {
        cl.record(&job).state == mosix::core::JobState::Failed
    });
}

/// A process's state letter (`T`: stopped).
fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.get(s.rfind(')')? + 2..)?.chars().next()
}

/// Live (not zombie) `mosjob` processes writing `file`: the job's copies.
fn copies(file: &std::path::Path) -> Vec<i32> {
    let f = file.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "mosjob")
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(f))
                && alive(*p)
        })
        .collect()
}

/// Issue 16's "SIGSTOP of an agent for longer than its lease, then
/// SIGCONT": zero duplicates. The stopped agent's fence watchdog kills the
/// job before the lease can expire; the leading balancer restarts it on
/// another node from its checkpoint; after SIGCONT exactly one copy runs
/// and the counter has no gap and no repeat.
#[test]
fn a_job_of_a_sigstopped_agent_runs_once_after_its_restart_elsewhere_and_sigcont() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, SHORT_LEASE);
    let (job, file) = checkpointed_counter(&cl, "node2", "8143");
    cl.wait_for("a checkpoint", 30, || {
        cl.record(&job).checkpoint.is_some_and(|c| c.last_seq >= 1)
    });
    let pid = cl.record(&job).pid;
    assert_eq!(copies(&file).len(), 1);
    let port = 20000 + (std::process::id() % 20000) as u16 + 13;
    let bal = serve_balancer(&cl, port);
    std::thread::sleep(Duration::from_secs(2));

    let agent = mosix::local::agent_pid(&cl.name, "node2").unwrap();
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    let stopped = Instant::now();
    // TTL 5 s, margin 2 s: fenced 3 s after the last good renewal.
    cl.wait_for("the watchdog to kill the job", 8, || !alive(pid));
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "killed {took:?} after the stop: not before the lease TTL"
    );
    assert_eq!(proc_state(agent), Some('T'), "the agent is still stopped");
    assert!(copies(&file).is_empty(), "{:?}", copies(&file));
    cl.wait_for("the job to run again elsewhere", 60, || {
        let r = cl.record(&job);
        r.state == mosix::core::JobState::Running && r.node.as_str() != "node2"
    });
    eprintln!(
        "running again {:?} after its agent's SIGSTOP",
        stopped.elapsed()
    );
    unsafe { libc::kill(agent, libc::SIGCONT) };
    let rec = cl.record(&job);
    let after = owner(&cl, &job).unwrap();
    assert_eq!(after.node, rec.node.as_str());
    // node2 comes back fenced, finds the job owned elsewhere, and leaves it.
    let n = ticks(&file).len();
    cl.wait_for("the counter to go on", 20, || ticks(&file).len() > n + 3);
    assert_eq!(copies(&file).len(), 1, "exactly one copy runs");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(copies(&file).len(), 1, "exactly one copy runs");
    let r = cl.record(&job);
    assert!(
        r.state == mosix::core::JobState::Running && r.node == rec.node,
        "{r:?}"
    );
    assert_contiguous(&ticks(&file));
    assert!(node_log(&cl, "node2").contains("fence watchdog: the agent did not renew"));
    drop(bal);
}

#[test]
fn a_restarted_agent_kills_a_job_it_no_longer_owns() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, ETCD);
    let (job, pid) = sleeper(&cl, "node1");
    let (kept, kept_pid) = sleeper(&cl, "node1");
    cl.restart_agent("node1", &["--kill-only"]);
    // While node1's agent is gone, the job is taken over elsewhere.
    let before = owner(&cl, &job).unwrap();
    let moved = set_owner(&cl, &job, &before, "node2");
    assert!(moved.epoch > before.epoch);
    cl.restart_agent("node1", &[]);
    cl.wait_for("the stale copy to be killed", 15, || !alive(pid));
    assert!(alive(kept_pid), "a job it still owns keeps running");
    assert_eq!(owner(&cl, &kept).unwrap().node, "node1");
    assert!(node_log(&cl, "node1").contains("stale copy"));
}

#[test]
fn a_migration_moves_ownership_the_epoch_grows_and_the_record_goes_with_the_job() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, ETCD);
    let (job, _) = sleeper(&cl, "node1");
    let a = owner(&cl, &job).unwrap();
    assert_eq!(a.node, "node1");
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b = owner(&cl, &job).unwrap();
    assert_eq!(b.node, "node2");
    assert!(b.epoch > a.epoch);
    let o = cl.mosctl(&["migrate", &job, "node1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = owner(&cl, &job).unwrap();
    assert_eq!(c.node, "node1");
    assert!(c.epoch > b.epoch);
    // A job that has ended owns nothing: its record goes, so a node that is
    // later switched off is not taken for a lost node with jobs.
    let o = cl.mosctl(&["kill", &job]);
    assert!(o.status.success(), "{}", stderr(&o));
    cl.wait_for("the ended job's owner record to go", 10, || {
        owner(&cl, &job).is_none()
    });
}

#[test]
fn the_balancer_leader_is_killed_and_a_standby_takes_over() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(1, ETCD);
    let cf = cluster_file(&cl);
    let leader = || balancer_leader(&cf);
    let base = 20000 + (std::process::id() % 20000) as u16;
    let (a, b) = (serve_balancer(&cl, base), serve_balancer(&cl, base + 1));
    let (pa, pb) = (a.0.id(), b.0.id());
    cl.wait_for("a leader", 15, || leader().is_some());
    let first = leader().unwrap();
    let leader_pid = if first.id.contains(&format!(":{pa}:")) {
        pa
    } else {
        pb
    };
    let standby_pid = if leader_pid == pa { pb } else { pa };
    assert!(first.id.contains(&format!(":{leader_pid}:")), "{first:?}");
    unsafe { libc::kill(leader_pid as i32, libc::SIGKILL) };
    let t = Instant::now();
    cl.wait_for("the standby to lead", 10, || {
        leader().is_some_and(|l| l.id.contains(&format!(":{standby_pid}:")))
    });
    let took = t.elapsed();
    let second = leader().unwrap();
    assert!(second.revision > first.revision, "the fencing token grows");
    assert!(took < Duration::from_secs(6), "took over after {took:?}");
    eprintln!("standby took over {took:?} after the leader's death");
    drop((a, b));
}

#[test]
fn etcd_unreachable_at_agent_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cf = dir.path().join("cluster.json");
    std::fs::write(
        &cf,
        r#"{"name":"x","nodes":[{"name":"node1","endpoint":"http://127.0.0.1:1","address":"127.0.0.1"}],"etcd":["http://127.0.0.1:9"]}"#,
    )
    .unwrap();
    let t = Instant::now();
    let o = Command::new(MOSIXD)
        .args([
            "--node",
            "node1",
            "--listen",
            "127.0.0.1:0",
            "--etcd-wait",
            "1",
        ])
        .arg("--shared")
        .arg(dir.path().join("shared"))
        .arg("--cluster")
        .arg(&cf)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("cannot reach etcd"), "{err}");
    assert!(
        err.contains("remove \"etcd\" from the cluster file"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// Issue 16's restart on node loss, end to end: a node dies (every process
/// of it, agent included); its lease expires in etcd; the leading balancer
/// waits out the fencing margin and restarts the node's checkpointed job
/// elsewhere from its latest checkpoint, moving its ownership by CAS; a job
/// without a checkpoint is recorded lost.
#[test]
fn the_leading_balancer_restarts_a_dead_nodes_checkpointed_job_elsewhere() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, SHORT_LEASE);
    let (job, file) = checkpointed_counter(&cl, "node2", "8141");
    let plain = cl.mosrun(&["--node", "node2", "--", MOSJOB, "burn"]);
    cl.wait_for("a checkpoint", 30, || {
        cl.record(&job).checkpoint.is_some_and(|c| c.last_seq >= 1)
    });
    let before = owner(&cl, &job).expect("the job has an owner record");
    assert_eq!(before.node, "node2");
    let port = 20000 + (std::process::id() % 20000) as u16 + 7;
    let bal = serve_balancer(&cl, port);
    std::thread::sleep(Duration::from_secs(2));

    assert!(cl.kill_node_processes("node2") > 0);
    let died = Instant::now();
    cl.wait_for("the job to run again elsewhere", 60, || {
        let r = cl.record(&job);
        r.state == mosix::core::JobState::Running && r.node.as_str() != "node2"
    });
    let took = died.elapsed();
    eprintln!("running again {took:?} after its node's death (lease TTL 5 s, margin 2 s)");
    let rec = cl.record(&job);
    let m = rec.history.last().unwrap();
    assert!(
        m.from.as_str() == "node2" && m.restored_from_checkpoint >= 1,
        "{m:?}"
    );
    // Its ownership moved with one CAS: a new owner, a later epoch.
    let after = owner(&cl, &job).unwrap();
    assert_eq!(after.node, rec.node.as_str());
    assert!(after.epoch > before.epoch, "{before:?} -> {after:?}");
    // It goes on counting from its checkpoint, with no gap and no repeat.
    let n = ticks(&file).len();
    cl.wait_for("the counter to go on", 20, || ticks(&file).len() > n + 3);
    assert_contiguous(&ticks(&file));
    // The job without a checkpoint is recorded lost, clearly.
    cl.wait_for("the other job to be recorded lost", 20, || {
        cl.record(&plain).state == mosix::core::JobState::Failed
    });
    let lost = cl.record(&plain);
    assert!(lost.error.starts_with("lost:"), "{}", lost.error);
    drop(bal);
    // Detection to restart within the bounds the defaults promise, scaled
    // to this test's TTL: lease TTL + margin + the restore itself.
    assert!(took < Duration::from_secs(40), "{took:?}");
}

/// Short node leases, so that a lost node is found in seconds.
const SHORT_LEASE: &[&str] = &[
    "--etcd-members",
    "1",
    "--lease-ttl",
    "5",
    "--fence-margin",
    "2",
];

/// A counter job on `node` that checkpoints every second, and its file.
fn checkpointed_counter(cl: &Cluster, node: &str, port: &str) -> (String, std::path::PathBuf) {
    let file = cl.shared.join(format!("lost-counter-{port}.txt"));
    let job = counter(cl, node, port, &file, &["--checkpoint-every", "1s"], &[]);
    (job, file)
}

/// Issue 16's "a kill of the leading balancer in the middle of a restart":
/// the leader has found the lost node and is waiting out its fencing
/// margin when it is SIGKILLed; the standby takes over, finds the same
/// node by comparing owner records with live leases (not by an expiry
/// event it never saw), and finishes the restart. Exactly one copy runs:
/// the counter has no gap and no repeat.
#[test]
fn the_leading_balancer_dies_mid_restart_and_the_standby_finishes_it() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, SHORT_LEASE);
    let cf = cluster_file(&cl);
    let (job, file) = checkpointed_counter(&cl, "node3", "8142");
    cl.wait_for("a checkpoint", 30, || {
        cl.record(&job).checkpoint.is_some_and(|c| c.last_seq >= 1)
    });
    let before = owner(&cl, &job).expect("the job has an owner record");
    let base = 20000 + (std::process::id() % 20000) as u16 + 11;
    let logs = [cl.shared.join("bal-a.log"), cl.shared.join("bal-b.log")];
    let a = serve_balancer_logged(&cl, base, Some(&logs[0]));
    let b = serve_balancer_logged(&cl, base + 1, Some(&logs[1]));
    cl.wait_for("a leader", 15, || balancer_leader(&cf).is_some());
    let first = balancer_leader(&cf).unwrap();
    let (leader, standby, standby_log) = if first.id.contains(&format!(":{}:", a.0.id())) {
        (a, b, &logs[1])
    } else {
        (b, a, &logs[0])
    };
    let leader_log = if standby_log == &logs[0] {
        &logs[1]
    } else {
        &logs[0]
    };

    assert!(cl.kill_node_processes("node3") > 0);
    let died = Instant::now();
    cl.wait_for("the leader to find the node lost", 30, || {
        std::fs::read_to_string(leader_log).is_ok_and(|l| l.contains("node LOST"))
    });
    // Mid-restart: found, not yet restarted (the fencing margin runs).
    assert!(
        !std::fs::read_to_string(leader_log)
            .unwrap()
            .contains("restarted on"),
        "the leader restarted the job before it could be killed"
    );
    drop(leader);
    cl.wait_for("the job to run again elsewhere", 60, || {
        let r = cl.record(&job);
        r.state == mosix::core::JobState::Running && r.node.as_str() != "node3"
    });
    eprintln!(
        "running again {:?} after its node's death, its first balancer killed mid-restart",
        died.elapsed()
    );
    let log = std::fs::read_to_string(standby_log).unwrap();
    assert!(log.contains("restarted on"), "{log}");
    let after = owner(&cl, &job).unwrap();
    assert!(after.epoch > before.epoch && after.node != "node3");
    let n = ticks(&file).len();
    cl.wait_for("the counter to go on", 20, || ticks(&file).len() > n + 3);
    assert_contiguous(&ticks(&file));
    drop(standby);
}

/// Issue 16's "a kill of the etcd leader (with 3 members)": the two others
/// elect a new leader in about a second, well inside the agents' fencing
/// deadline (TTL − margin = 7 s), so no agent fences and no job dies; the
/// cluster keeps moving jobs and their ownership.
#[test]
fn killing_the_etcd_leader_of_three_members_fences_nothing() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--etcd-members", "3"]);
    let cf = cluster_file(&cl);
    let (job, pid) = sleeper(&cl, "node1");
    let before = owner(&cl, &job).unwrap();
    let o = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &cf.etcd.join(","),
            "endpoint",
            "status",
            "-w",
            "json",
        ])
        .output()
        .expect("etcdctl (make setup installs etcd-client)");
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let leader = st
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
        .expect("one member is the leader");
    let epid = mosix::local::etcd::member_pid(&cl.name, leader + 1).expect("the leader's pid");
    unsafe { libc::kill(epid, libc::SIGKILL) };
    // Longer than the lease TTL: any agent that could not renew would
    // have fenced by now.
    std::thread::sleep(Duration::from_secs(11));
    assert!(
        alive(pid),
        "the job was killed:\n{}",
        node_log(&cl, "node1")
    );
    assert!(
        !node_log(&cl, "node1").contains("fenced: job killed"),
        "{}",
        node_log(&cl, "node1")
    );
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after = owner(&cl, &job).unwrap();
    assert_eq!(after.node, "node2");
    assert!(after.epoch > before.epoch);
}

/// A partition shorter than the balancer's takeover: the node fences its
/// checkpointed job, and after the heal, nobody having taken it over, the
/// node itself restarts it from its latest checkpoint. Exactly one copy
/// runs, with only the work since that checkpoint lost; a restart
/// elsewhere that names the node down while it holds a lease again is
/// refused.
#[test]
fn after_a_short_partition_the_node_restarts_its_fenced_checkpointed_job() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, SHORT_LEASE);
    let (job, file) = checkpointed_counter(&cl, "node1", "8143");
    cl.wait_for("a checkpoint", 30, || {
        cl.record(&job).checkpoint.is_some_and(|c| c.last_seq >= 1)
    });
    let pid = cl.record(&job).pid;
    cut_from_etcd(&cl, "node1", true);
    cl.wait_for("node1 to kill its job", 10, || !alive(pid));
    cut_from_etcd(&cl, "node1", false);
    let t = Instant::now();
    while !{
        let r = cl.record(&job);
        r.state == mosix::core::JobState::Running && r.pid != pid && r.pid > 0
    } {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the job did not run again on node1: {:?}\n{}\n{}",
            cl.record(&job),
            node_log(&cl, "node1"),
            node_threads(&cl, "node1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rec = cl.record(&job);
    assert_eq!(rec.node.as_str(), "node1");
    let m = rec.history.last().unwrap();
    assert!(m.restored_from_checkpoint >= 1, "{m:?}");
    assert_eq!(owner(&cl, &job).unwrap().node, "node1");
    let n = ticks(&file).len();
    cl.wait_for("the counter to go on", 20, || ticks(&file).len() > n + 3);
    assert_contiguous(&ticks(&file));
    // node1 is up: a restore that calls it down is refused, and changes
    // nothing.
    let o = cl.mosctl(&[
        "restore",
        &job,
        "--node-is-down",
        "node1",
        "--node",
        "node2",
    ]);
    assert!(!o.status.success());
    assert_eq!(cl.record(&job).node.as_str(), "node1");
}
