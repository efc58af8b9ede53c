//! Issue: nothing lost, nothing duplicated — migration under faults.
//!
//! Every case checks the same invariants afterwards: the job runs exactly
//! once in the whole cluster (or is reported failed with its images kept),
//! its state continued (the counter file has no gap and no restart), and the
//! registry agrees with where the process really is.

use crate::support::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Processes (host pids) whose stdout is the job's output file.
fn instances(cl: &Cluster, job: &str) -> Vec<i32> {
    let want = cl.record(job).stdout_path;
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let fd1 = std::fs::read_link(format!("/proc/{pid}/fd/1"));
        let nspid1 = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("NSpid:") && l.split_whitespace().last() == Some("1"))
            })
            .unwrap_or(false);
        if fd1.map(|p| p == Path::new(&want)).unwrap_or(false) && nspid1 {
            out.push(pid);
        }
    }
    out
}

/// Which node a pid belongs to (see `Cluster::node_of_pid`).
fn node_of_pid(cl: &Cluster, pid: i32, _nodes: usize) -> Option<String> {
    cl.node_of_pid(pid)
}

/// The invariants: exactly once, registry agrees, state continued.
fn assert_exactly_once(cl: &Cluster, job: &str, file: &Path, nodes: usize) -> String {
    let mut last = vec![];
    for _ in 0..100 {
        last = instances(cl, job);
        let rec = cl.record(job);
        if last.len() == 1 && rec.state == mosix::core::JobState::Running {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        last.len(),
        1,
        "job {job} must run exactly once, found {last:?}"
    );
    let rec = cl.record(job);
    assert_eq!(rec.state, mosix::core::JobState::Running, "{rec:?}");
    let node = node_of_pid(cl, last[0], nodes).expect("process is on a node");
    assert_eq!(rec.node.as_str(), node, "registry agrees with reality");
    assert_eq!(rec.pid, last[0], "registry has the live pid");
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(file));
    node
}

fn counter_job(cl: &Cluster, mem_mib: &str, port: &str) -> (String, std::path::PathBuf) {
    let file = cl.shared.join(format!("counter-{port}.txt"));
    let job = counter(cl, "node1", port, &file, &[], &["--mem-mib", mem_mib]);
    (job, file)
}

fn spawn_migrate(cl: &Cluster, job: &str, to: &str) -> std::process::Child {
    Command::new(MOSCTL)
        .args(["migrate", job, to])
        .env("MOSIX_CLUSTER", &cl.file)
        .spawn()
        .unwrap()
}

#[test]
fn kill9_of_source_agent_during_dump() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let (job, file) = counter_job(&cl, "768", "8091");
    let mut m = spawn_migrate(&cl, &job, "node2");
    std::thread::sleep(Duration::from_millis(250));
    cl.restart_agent("node1", &[]);
    let _ = m.wait();
    assert_exactly_once(&cl, &job, &file, 2);
}

#[test]
fn kill9_of_target_agent_during_restore() {
    if !privileged() {
        return;
    }
    kill9_of_target_agent_during_restore_with(&[]);
}

/// The same with the shared directories served over sshfs from a
/// file-server namespace (a real network file system).
#[test]
fn kill9_of_target_agent_during_restore_over_sshfs() {
    if !privileged() || !sshfs_capable() {
        return;
    }
    kill9_of_target_agent_during_restore_with(&["--shared-over", "sshfs"]);
}

fn kill9_of_target_agent_during_restore_with(extra: &[&str]) {
    let cl = Cluster::up(2, extra);
    let (job, file) = counter_job(&cl, "768", "8092");
    let mut m = spawn_migrate(&cl, &job, "node2");
    // Wait until the dump is done and the target is restoring (or has).
    cl.wait_for("dump to finish", 30, || {
        cl.record(&job)
            .pending
            .map(|p| p.phase != mosix::core::job::MigrationPhase::Dumping)
            .unwrap_or(true)
    });
    std::thread::sleep(Duration::from_millis(100));
    cl.restart_agent("node2", &[]);
    let _ = m.wait();
    assert_exactly_once(&cl, &job, &file, 2);
}

#[test]
fn kill9_of_balancer_mid_plan() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, &[]);
    let mut jobs = vec![];
    for p in ["8101", "8102", "8103", "8104"] {
        jobs.push(counter_job(&cl, "128", p));
    }
    let mut b = Command::new(MOSBALANCE)
        .args(["--min-residence", "0"])
        .env("MOSIX_CLUSTER", &cl.file)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let _ = b.kill();
    let _ = b.wait();
    std::thread::sleep(Duration::from_secs(3));
    for (job, file) in &jobs {
        assert_exactly_once(&cl, job, file, 3);
    }
}

#[test]
fn target_restore_failure_rolls_back_to_source() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let (job, file) = counter_job(&cl, "16", "8093");
    // node2's agent gets a CRIU that fails every call.
    cl.restart_agent("node2", &["--criu", "/bin/false"]);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("restored on node1"),
        "says where the job is: {err}"
    );
    let node = assert_exactly_once(&cl, &job, &file, 2);
    assert_eq!(node, "node1");
    let rec = cl.record(&job);
    assert!(!rec.history.last().unwrap().ok, "failed attempt recorded");
}

#[test]
fn target_network_cut_leaves_job_untouched() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let (job, file) = counter_job(&cl, "16", "8094");
    let ns = cl.netns("node2");
    assert!(Command::new("ip")
        .args(["-n", &ns, "link", "set", "eth0", "down"])
        .status()
        .unwrap()
        .success());
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unreachable") && stderr(&o).contains("not touched"),
        "{}",
        stderr(&o)
    );
    assert_eq!(assert_exactly_once(&cl, &job, &file, 2), "node1");
    assert!(cl.record(&job).history.is_empty());
}

#[test]
fn criu_missing_or_failing_dump_keeps_job_running() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let (job, file) = counter_job(&cl, "16", "8095");
    // An agent that cannot start: `restart-agent` says so at once, with
    // the agent's own words, instead of leaving the caller to find out.
    let o = cl.try_restart_agent("node1", &["--agent-arg=--no-such-flag"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("mosixd on node1 exited at its start")
            && err.contains("unexpected argument '--no-such-flag'"),
        "{err}"
    );
    // CRIU missing on the source. No pause after the restart: it returns
    // once the agent answers.
    cl.restart_agent("node1", &["--criu", "/nonexistent/criu"]);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("CRIU not found"), "{}", stderr(&o));
    assert_eq!(assert_exactly_once(&cl, &job, &file, 2), "node1");
    // A job in its node's network holding an established TCP connection:
    // refused before anything is frozen, the connection named (issue 18;
    // it used to be CRIU's own refusal), and the job runs on.
    cl.restart_agent("node1", &[]);
    let py = cl.mosrun(&[
        "--node", "node1", "--net", "node", "--", "python3", "-c",
        "import socket,time\ns=socket.socket();s.bind(('127.0.0.1',9977));s.listen()\nc=socket.create_connection(('127.0.0.1',9977));a,_=s.accept()\nprint('ready',flush=True)\ntime.sleep(1000)",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let o = cl.mosctl(&["migrate", &py, "node2"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("established TCP connection")
            && err.contains("127.0.0.1:9977")
            && err.contains("keeps running on node1"),
        "the connection named: {err}"
    );
    assert_eq!(cl.record(&py).state, mosix::core::JobState::Running);
    assert_eq!(cl.record(&py).node.as_str(), "node1");
    assert_exactly_once(&cl, &job, &file, 2);
}

#[test]
fn full_shared_disk_fails_cleanly_and_loses_nothing() {
    if !privileged() {
        return;
    }
    // The counter's file is not on the small shared disk, but in a
    // directory every node sees (their /tmp is their own).
    let disk = small_disk("tmpfs", "24m");
    let (shared, common) = (&disk.shared, &disk.common);
    let cl = Cluster::up(
        2,
        &[
            "--shared",
            shared.to_str().unwrap(),
            "--common",
            common.to_str().unwrap(),
        ],
    );
    let file = common.join(format!("counter-{}.txt", cl.name));
    let job = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "counter",
        "--port",
        "8096",
        "--file",
        file.to_str().unwrap(),
        "--mem-mib",
        "64",
    ]);
    cl.wait_for("counter to tick", 20, || ticks(&file).len() > 3);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("ResourceExhausted") || err.contains("No space left") || err.contains("full"),
        "{err}"
    );
    assert_eq!(assert_exactly_once(&cl, &job, &file, 2), "node1");
    // The dump raised the job's threads to the agent's priority; the failed
    // dump must have given them their own back.
    let threads = nice_by_ns_pid(cl.record(&job).pid);
    assert!(threads.len() >= 2, "{threads:?}");
    assert!(threads.iter().all(|&(_, nice)| nice == 0), "{threads:?}");
    // The dump lifted the job out of node1's jobs cgroup (CRIU's parasite
    // runs in its threads); the failed dump must have put it back.
    let want = format!("/mosix/{}/node1/jobs", cl.name);
    let pids = mosix::core::procfs::tree_pids(cl.record(&job).pid);
    assert!(pids.len() >= 2, "{pids:?}");
    for p in pids {
        assert_eq!(
            mosix::core::cgroup::cpu_cgroup_of(p).as_deref(),
            Some(want.as_str()),
            "process {p} of {job}"
        );
    }
    let _ = std::fs::remove_file(&file);
}

/// `make soak`: 200 round-trip migrations of a stateful job (a counter and
/// 32 MiB of patterned memory), checking its memory checksum and counter
/// after every move. Zero failures allowed.
#[test]
#[ignore = "long: run with `make soak`"]
fn soak_200_round_trips() {
    if !privileged() {
        return;
    }
    let rounds: usize = std::env::var("MOSIX_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let cl = Cluster::up(2, &[]);
    let (job, file) = counter_job(&cl, "32", "8110");
    let mut last = 0u64;
    let started = std::time::Instant::now();
    for r in 0..rounds {
        let to = if r % 2 == 0 { "node2" } else { "node1" };
        let o = Command::new(MOSCTL)
            .args(["migrate", &job, to])
            .env("MOSIX_CLUSTER", &cl.file)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "round {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (n, mem_ok) = query_counter(&cl.job_ip(&job), 8110)
            .unwrap_or_else(|| panic!("round {r}: no answer on {to}"));
        assert!(mem_ok, "round {r}: memory checksum mismatch");
        assert!(n >= last, "round {r}: counter went back {last} -> {n}");
        last = n;
        if r % 20 == 0 {
            eprintln!(
                "soak: {r}/{rounds} round trips, {:.0}s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    assert_eq!(cl.record(&job).history.len(), rounds);
    assert_exactly_once(&cl, &job, &file, 2);
    eprintln!(
        "soak: {rounds} migrations, 0 failures, {:.0}s",
        started.elapsed().as_secs_f64()
    );
}

/// The file server of a shared path on sshfs goes away (its link is cut)
/// while a job runs: a migration fails within bounded time with an I/O
/// error and leaves the job where it is; once the server is back the
/// registry answers again and the job migrates. The job's own writes made
/// during the outage are lost (its open handle died with the SFTP session)
/// until the restore reopens the file: see ARCHITECTURE.md.
#[test]
fn shared_path_server_outage_fails_migration_cleanly_and_recovers() {
    if !privileged() || !sshfs_capable() {
        return;
    }
    let cl = Cluster::up(2, &["--shared-over", "sshfs"]);
    let (job, file) = counter_job(&cl, "16", "8097");
    cl.set_fileserver_link(false);
    let t0 = std::time::Instant::now();
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    let took = t0.elapsed();
    cl.set_fileserver_link(true);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("Input/output error") || stderr(&o).contains("Transport endpoint"),
        "{}",
        stderr(&o)
    );
    assert!(took < Duration::from_secs(60), "failed only after {took:?}");
    cl.wait_for("the registry to answer again", 30, || {
        cl.mosctl(&["jobs"]).status.success()
    });
    let rec = cl.record(&job);
    assert_eq!(rec.node.as_str(), "node1");
    assert_eq!(rec.state, mosix::core::JobState::Running);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cl.record(&job).node.as_str(), "node2");
    let n = ticks(&file).len();
    cl.wait_for("the restored job to write its file again", 20, || {
        ticks(&file).len() > n
    });
}
