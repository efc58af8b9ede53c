//! Issue: a failed post-copy restore must not wedge the source node or
//! misreport the job. Jobs that hold what a lazy restore cannot take over
//! while the source still holds it (a full FIFO, a POSIX lock, a lease):
//! refused, forced (bounded failure, the job resumes on its source with its
//! state), and moved by the balancer (falls back to full copy).

use crate::support::*;
use std::time::{Duration, Instant};

/// The whole answer of a counter job (`counter=N mem=ok hold=ok`).
fn ask(ip: &str, port: u16) -> Option<String> {
    use std::io::Read;
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}

fn counter_of(answer: &str) -> u64 {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("counter="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// CRIU processes of this cluster other than idle spare workers: a dump,
/// restore or lazy-pages daemon still running, or a zombie nobody reaped.
fn busy_criu(cl: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for node in cl.node_names() {
        let o = std::process::Command::new("ip")
            .args(["netns", "pids", &cl.netns(&node)])
            .output()
            .expect("ip netns pids");
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "criu" {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.chars().next()))
                .flatten()
                .unwrap_or('?');
            if state == 'Z' || !cmd.contains(" swrk ") {
                out.push(format!("{node}: {pid} {state} {cmd}"));
            }
        }
    }
    out
}

fn agent_log(cl: &Cluster, node: &str) -> String {
    std::fs::read_to_string(format!("/run/mosix/{}/{node}.log", cl.name)).unwrap_or_default()
}

#[test]
fn forced_post_copy_of_a_fifo_a_lock_and_a_lease_fails_fast_and_the_job_runs_on() {
    if !privileged() || !post_copy_capable() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    // A plain job on the same node: it must move right after each failure.
    let plain = cl.mosrun(&["--node", "node1", "--", MOSJOB, "counter", "--port", "8301"]);
    // (kind, port, what the target's failure shows: CRIU's error line, or
    // where the hung restored task waited).
    let cases = [
        ("fifo", 8302u16, "Error (criu"),
        ("lock", 8303, "fcntl_setlk"),
        ("lease", 8304, "__break_lease"),
    ];
    let mut plain_on = "node1";
    for (kind, port, evidence) in cases {
        let path = cl.shared.join(format!("hold-{kind}"));
        let spec = format!("{kind}:{}", path.display());
        let port_s = port.to_string();
        let job = cl.mosrun(&[
            "--node",
            "node1",
            "--",
            MOSJOB,
            "counter",
            "--port",
            &port_s,
            "--mem-mib",
            "64",
            "--hold",
            &spec,
        ]);
        cl.wait_for(kind, 20, || {
            ask(&cl.job_ip(&job), port).is_some_and(|a| a.contains("hold=ok"))
        });

        // Asked for plainly, post-copy is refused, naming the reason, and
        // nothing is touched.
        let o = cl.mosctl(&["migrate", "--post-copy", &job, "node2"]);
        assert!(!o.status.success(), "{kind}: refused");
        let err = stderr(&o);
        let named = match kind {
            "fifo" => "FIFO with",
            "lock" => "POSIX lock",
            _ => "lease",
        };
        assert!(
            err.contains("refused") && err.contains(named),
            "{kind}: {err}"
        );
        assert!(
            cl.record(&job).history.is_empty(),
            "{kind}: refusal touched nothing"
        );

        // Forced: it fails, within a few seconds, and says where the job is.
        let before = counter_of(&ask(&cl.job_ip(&job), port).expect("answers"));
        let t0 = Instant::now();
        let o = cl.mosctl(&["migrate", "--post-copy", "--force", &job, "node2"]);
        let took = t0.elapsed();
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "{kind}: forced post-copy cannot succeed: {err}"
        );
        assert!(
            took < Duration::from_secs(20),
            "{kind}: took {took:?}: {err}"
        );
        assert!(
            err.contains("resumed on node1 with all its memory"),
            "{kind}: {err}"
        );

        // The record is the truth: running on node1, nothing pending, the
        // failed post-copy in its history with the target's evidence.
        let rec = cl.record(&job);
        assert_eq!(rec.node.as_str(), "node1", "{kind}: {rec:?}");
        assert_eq!(rec.state, mosix::core::JobState::Running, "{kind}: {rec:?}");
        assert!(rec.pending.is_none(), "{kind}: {rec:?}");
        assert!(rec.pid > 0 && std::path::Path::new(&format!("/proc/{}", rec.pid)).exists());
        let m = rec.history.last().expect("history");
        assert!(!m.ok && m.post_copy, "{kind}: {m:?}");
        assert!(m.error.contains(evidence), "{kind}: {}", m.error);
        assert!(m.error.contains("resumed on node1"), "{kind}: {}", m.error);

        // State intact: memory checksum, the FIFO's data, the lock, the
        // lease; and the counter went on.
        let a = ask(&cl.job_ip(&job), port).expect("answers on node1");
        assert!(a.contains("mem=ok") && a.contains("hold=ok"), "{kind}: {a}");
        assert!(counter_of(&a) >= before, "{kind}: {a}");

        // No CRIU left behind on either node.
        let mut left = busy_criu(&cl);
        for _ in 0..50 {
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            left = busy_criu(&cl);
        }
        assert!(left.is_empty(), "{kind}: CRIU left: {left:?}");

        // Both agents logged it.
        let (l1, l2) = (agent_log(&cl, "node1"), agent_log(&cl, "node2"));
        assert!(
            l1.lines()
                .any(|l| l.contains(job.as_str()) && l.contains("post-copy migration failed")),
            "{kind}: node1's log:\n{l1}"
        );
        assert!(
            l2.lines()
                .any(|l| l.contains(job.as_str()) && l.contains("failed")),
            "{kind}: node2's log:\n{l2}"
        );

        // The node is not wedged: another job migrates at once.
        let to = if plain_on == "node1" {
            "node2"
        } else {
            "node1"
        };
        let t0 = Instant::now();
        let o = cl.mosctl(&["migrate", &plain, to]);
        assert!(o.status.success(), "{kind}: next migration: {}", stderr(&o));
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{kind}: {:?}",
            t0.elapsed()
        );
        plain_on = to;

        // And the job itself still moves, by full copy, with its state.
        let o = cl.mosctl(&["migrate", &job, "node2"]);
        assert!(o.status.success(), "{kind}: full copy: {}", stderr(&o));
        let a = ask(&cl.job_ip(&job), port).expect("answers on node2");
        assert!(a.contains("mem=ok") && a.contains("hold=ok"), "{kind}: {a}");
        let _ = cl.mosctl(&["kill", &job]);
    }
}

#[test]
fn the_balancer_moves_jobs_holding_a_fifo_or_a_lock_by_full_copy() {
    if !privileged() || !post_copy_capable() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let mut jobs = Vec::new();
    for (kind, port) in [("fifo", 8311u16), ("lock", 8312)] {
        let spec = format!("{kind}:{}", cl.shared.join(format!("b-{kind}")).display());
        let port_s = port.to_string();
        let job = cl.mosrun(&[
            "--node",
            "node1",
            "--",
            MOSJOB,
            "counter",
            "--busy",
            "--port",
            &port_s,
            "--mem-mib",
            "32",
            "--hold",
            &spec,
        ]);
        cl.wait_for(kind, 20, || {
            ask(&cl.job_ip(&job), port).is_some_and(|a| a.contains("hold=ok"))
        });
        jobs.push((job, port));
    }
    // Let the agents see two busy jobs on node1 and none on node2.
    std::thread::sleep(Duration::from_secs(4));
    // Every move is a large one: post-copy where safe.
    let o = run(
        MOSBALANCE,
        &["--min-residence", "0", "--post-copy-mib", "0"],
        Some(&cl),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("post-copy not used"),
        "fallback reported: {err}"
    );
    let moved: Vec<_> = jobs
        .iter()
        .filter(|(j, _)| cl.record(j).node.as_str() == "node2")
        .collect();
    assert!(!moved.is_empty(), "a job moved: {err}");
    for (job, port) in moved {
        let m = cl.record(job).history.last().cloned().expect("history");
        assert!(m.ok && !m.post_copy, "moved by full copy: {m:?}");
        let a = ask(&cl.job_ip(job), *port).expect("answers on node2");
        assert!(a.contains("mem=ok") && a.contains("hold=ok"), "{a}");
    }
}

/// The target's CRIU is made to hang: its RPC worker (`criu swrk`) is a
/// wrapper that never answers. The post-copy restore's deadline stops it,
/// and the job runs on at its source, memory and counter intact.
#[test]
fn a_target_restore_that_hangs_is_stopped_and_the_job_runs_on_its_source() {
    if !privileged() || !post_copy_capable() {
        return;
    }
    let real = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/criu/path"),
    )
    .expect("make setup records CRIU's path");
    let cl = Cluster::up(2, &[]);
    let wrapper = cl.shared.join("hanging-criu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# A CRIU whose RPC worker never answers.\nif [ \"$1\" = swrk ]; then exec sleep 3600; fi\nexec {} \"$@\"\n",
            real.trim()
        ),
    )
    .expect("write wrapper");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    cl.restart_agent("node2", &["--criu", wrapper.to_str().expect("utf-8 path")]);
    let job = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "counter",
        "--port",
        "8321",
        "--mem-mib",
        "64",
    ]);
    cl.wait_for("counter", 20, || ask(&cl.job_ip(&job), 8321).is_some());
    let before = counter_of(&ask(&cl.job_ip(&job), 8321).expect("answers"));
    let t0 = Instant::now();
    let o = cl.mosctl(&["migrate", "--post-copy", &job, "node2"]);
    let took = t0.elapsed();
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "the hung restore cannot succeed: {err}"
    );
    assert!(took < Duration::from_secs(25), "bounded: {took:?}: {err}");
    assert!(err.contains("deadline passed"), "{err}");
    assert!(
        err.contains("resumed on node1 with all its memory"),
        "{err}"
    );
    let rec = cl.record(&job);
    assert_eq!(rec.node.as_str(), "node1", "{rec:?}");
    assert_eq!(rec.state, mosix::core::JobState::Running, "{rec:?}");
    let m = rec.history.last().expect("history");
    assert!(!m.ok && m.post_copy, "{m:?}");
    let a = ask(&cl.job_ip(&job), 8321).expect("answers on node1");
    assert!(a.contains("mem=ok"), "{a}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        counter_of(&ask(&cl.job_ip(&job), 8321).expect("answers")) > before,
        "the counter goes on"
    );
}
