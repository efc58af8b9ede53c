//! Issue 13 (part A): foreground `mosrun` and burst-safe placement, end to
//! end through the binaries on real local clusters.

use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `mosrun ARGS` for cluster `cl`, not yet waited for.
fn spawn(cl: &Cluster, args: &[&str], stdin: Stdio) -> Child {
    spawn_stats(cl, args, stdin, None)
}

/// The same, appending its stats line to `stats`.
fn spawn_stats(
    cl: &Cluster,
    args: &[&str],
    stdin: Stdio,
    stats: Option<&std::path::Path>,
) -> Child {
    let mut c = Command::new(MOSRUN);
    if let Some(p) = stats {
        c.env("MOSIX_RUN_STATS", p);
    }
    c.args(args)
        .env("MOSIX_CLUSTER", &cl.file)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning mosrun")
}

/// Kills a child on drop (also on panic), by pid.
struct Reap(Option<Child>);

impl Reap {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child")
    }
    fn finish(mut self, secs: u64) -> (i32, String, String) {
        let mut c = self.0.take().expect("child");
        let Some(status) = wait_timeout(&mut c, secs) else {
            let _ = c.kill();
            let _ = c.wait();
            panic!("mosrun did not end within {secs}s");
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = c.stdout.take() {
            o.read_to_string(&mut out).unwrap();
        }
        if let Some(mut e) = c.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        eprintln!("mosrun: status {status:?}\nstdout: {out}\nstderr: {err}");
        (status.code().unwrap_or(-1), out, err)
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Read lines of the child's stdout until one equals `want`.
fn wait_line(r: &mut impl BufRead, want: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).unwrap();
        assert!(n > 0, "stdout ended before {want:?}");
        if line.trim_end() == want {
            return;
        }
    }
}

/// The running job whose argv contains `marker`: (id, node, pid).
fn running_job(cl: &Cluster, marker: &str) -> Option<(String, String, i32)> {
    cl.jobs_json().into_iter().find_map(|j| {
        let hit = j["state"] == "running"
            && j["argv"]
                .as_array()?
                .iter()
                .any(|a| a.as_str().is_some_and(|s| s.contains(marker)));
        hit.then(|| {
            (
                j["id"].as_str().unwrap().to_string(),
                j["node"].as_str().unwrap().to_string(),
                j["pid"].as_i64().unwrap() as i32,
            )
        })
    })
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn foreground_semantics_exit_signals_streams_stdin_and_no_orphan() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let mosrun = |args: &[&str]| -> (i32, String, String) {
        let o = run(MOSRUN, args, Some(&cl));
        (o.status.code().unwrap_or(-1), stdout(&o), stderr(&o))
    };

    // The exit code, and 128+N for a death by signal N.
    assert_eq!(mosrun(&["-n", "--", "sh", "-c", "exit 7"]).0, 7);
    assert_eq!(
        mosrun(&["-n", "--node", "node2", "--", "sh", "-c", "kill -KILL $$"]).0,
        137
    );
    // stdout and stderr kept apart, each in order, on the remote node too.
    let (code, out, err) = mosrun(&[
        "-n",
        "--node",
        "node2",
        "--",
        "sh",
        "-c",
        "echo out1; echo err1 >&2; echo out2; echo err2 >&2",
    ]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "out1\nout2\n", "err1\nerr2\n")
    );
    // cwd, environment and umask are kept.
    // On the shared path: each node's /tmp is its own.
    let dir = cl.shared.join("fg-cwd");
    std::fs::create_dir_all(&dir).unwrap();
    let o = Command::new("sh")
        .args([
            "-c",
            &format!(
                "umask 027; exec {MOSRUN} -n --node node2 -- sh -c 'pwd; echo $FG_VAR; umask'"
            ),
        ])
        .current_dir(&dir)
        .env("MOSIX_CLUSTER", &cl.file)
        .env("FG_VAR", "kept")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        stdout(&o),
        format!("{}\nkept\n0027\n", dir.display()),
        "{}",
        stderr(&o)
    );
    // The nice value is kept like the umask (`nice -n 3 mosrun` runs the job
    // 3 nicer), `--nice N` adds to it, and a caller cannot get a job a higher
    // priority than the node's default (the nice the agent was started with;
    // its own -10 is not inherited). Field 19 of /proc/self/stat is the nice
    // value.
    let nice_of = |pre: &str, args: &str| {
        let o = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "{pre} {MOSRUN} -n --node node2 {args} -- sh -c 'cut -d\" \" -f19 /proc/self/stat'"
                ),
            ])
            .env("MOSIX_CLUSTER", &cl.file)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    // Relative to this test's own nice value (a CI may run it niced).
    let base: i32 = std::fs::read_to_string("/proc/self/stat")
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    // The agents were started by this test, so their jobs' default nice is
    // `base` too: a job is never given a higher priority than that.
    let want = |n: i32| n.clamp(base, 19).to_string();
    assert_eq!(nice_of("", ""), want(base));
    assert_eq!(nice_of("nice -n 3", ""), want(base + 3));
    assert_eq!(nice_of("", "--nice 10"), want(base + 10));
    assert_eq!(nice_of("nice -n 15", "--nice 10"), "19");
    assert_eq!(nice_of("", "--nice -20"), want(base));

    // stdin through a pipe, EOF included (`cat` ends only on EOF).
    let mut c = Reap(Some(spawn(
        &cl,
        &["--node", "node2", "--", "sh", "-c", "cat; echo END"],
        Stdio::piped(),
    )));
    {
        let mut w = c.child().stdin.take().unwrap();
        w.write_all(b"hello\nworld\n").unwrap();
    } // closed: EOF
    let (code, out, _) = c.finish(20);
    assert_eq!((code, out.as_str()), (0, "hello\nworld\nEND\n"));

    // SIGINT reaches the job, which handles it and exits 5.
    let mut c = Reap(Some(spawn(
        &cl,
        &[
            "-n",
            "--node",
            "node2",
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 5' INT; echo ready; while :; do sleep 0.1; done",
        ],
        Stdio::null(),
    )));
    let mut r = BufReader::new(c.child().stdout.take().unwrap());
    wait_line(&mut r, "ready");
    unsafe { libc::kill(c.child().id() as i32, libc::SIGINT) };
    let (code, _, _) = c.finish(20);
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!((code, rest.as_str()), (5, "got-int\n"));

    // Killing mosrun kills the job: no orphan on its node.
    let marker = format!("fg-orphan-{}", cl.name);
    let mut c = Reap(Some(spawn(
        &cl,
        &[
            "-n",
            "--node",
            "node2",
            "--",
            "sh",
            "-c",
            &format!("echo ready; exec sleep 300 # {marker}"),
        ],
        Stdio::null(),
    )));
    let mut r = BufReader::new(c.child().stdout.take().unwrap());
    wait_line(&mut r, "ready");
    let (job, node, pid) = running_job(&cl, &marker).expect("the job runs");
    assert_eq!(node, "node2");
    assert!(alive(pid));
    unsafe { libc::kill(c.child().id() as i32, libc::SIGKILL) };
    cl.wait_for("the job to die with its mosrun", 10, || !alive(pid));
    cl.wait_for("the job's end to be recorded", 10, || {
        cl.job_json(&job)["state"] != "running"
    });
    drop(c);

    // A long job the balancer would move keeps streaming: nothing lost or
    // repeated across a migration; its stdin reads EOF after the move
    // (CRIU restores the pipe without its writer, which stayed behind).
    let marker = format!("fg-move-{}", cl.name);
    let script = format!(
        "i=0; while [ $i -lt 25 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done; \
         read x; echo read-rc=$? # {marker}"
    );
    let mut c = Reap(Some(spawn(
        &cl,
        &["--node", "node1", "--", "sh", "-c", &script],
        Stdio::piped(),
    )));
    let _keep_open = c.child().stdin.take();
    let mut r = BufReader::new(c.child().stdout.take().unwrap());
    wait_line(&mut r, "tick 3");
    let (job, _, _) = running_job(&cl, &marker).expect("the job runs");
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "migrate: {}", stderr(&o));
    let (code, _, _) = c.finish(30);
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    let want: String = (4..25).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(code, 0);
    assert_eq!(rest, format!("{want}read-rc=1\n"));
}

#[test]
fn a_16_way_burst_respects_slots_and_a_full_cluster_queues() {
    if !privileged() {
        return;
    }
    // Slots: round(cap × 10) = 2, 2, 3, 3: ten in all, for sixteen jobs.
    let cl = Cluster::up(4, &["--cpu-caps", "0.2,0.2,0.3,0.3"]);
    let o = cl.mosctl(&["slots", "--total"]);
    assert_eq!(stdout(&o).trim(), "10", "{}", stderr(&o));
    let o = cl.mosctl(&["slots", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["total"], 10);
    assert_eq!(v["nodes"][3]["slots"], 3);
    let slots = [("node1", 2), ("node2", 2), ("node3", 3), ("node4", 3)];
    let dir = std::env::temp_dir().join(format!("mosix-burst-{}", cl.name));
    std::fs::create_dir_all(&dir).unwrap();
    let t0 = Instant::now();
    let mut kids: Vec<Reap> = (0..16)
        .map(|i| {
            Reap(Some(
                Command::new(MOSRUN)
                    .args([
                        "-n",
                        "--best",
                        "--",
                        "sh",
                        "-c",
                        "date +%s%N; sleep 1.2; date +%s%N",
                    ])
                    .env("MOSIX_CLUSTER", &cl.file)
                    .env("MOSIX_RUN_STATS", dir.join(format!("{i}.stats")))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            ))
        })
        .collect();
    let results: Vec<(i32, String, String)> = kids.drain(..).map(|k| k.finish(60)).collect();
    let took = t0.elapsed();
    // (node, start ns, end ns, queued ms) of every job.
    let mut runs = Vec::new();
    let mut jobs = Vec::new();
    for (i, (code, out, err)) in results.iter().enumerate() {
        assert_eq!(*code, 0, "job {i}: {err}");
        let stats = std::fs::read_to_string(dir.join(format!("{i}.stats"))).unwrap();
        assert_eq!(stats.lines().count(), 1, "one stats line per run: {stats}");
        let field = |k: &str| -> String {
            stats
                .split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in {stats}"))
                .to_string()
        };
        for k in ["job", "place_ms", "start_ms", "total_ms", "reruns"] {
            field(k);
        }
        assert_eq!(field("exit"), "0");
        let t: Vec<u128> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
        let queued: f64 = field("queue_ms").parse().unwrap();
        runs.push((field("node"), t[0], t[1], queued));
        jobs.push(field("job"));
    }
    // Once their callers have their status, finished jobs leave no record.
    let reg = mosix::core::registry::Registry::open(&cl.shared).unwrap();
    cl.wait_for("finished foreground jobs to be forgotten", 10, || {
        jobs.iter()
            .all(|j| !reg.exists(&mosix::core::JobId::parse(j).unwrap()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    // No node ever ran more jobs at once than it has slots.
    for (node, n) in slots {
        let mine: Vec<_> = runs.iter().filter(|r| r.0 == node).collect();
        assert!(!mine.is_empty(), "{node} got no job: {runs:?}");
        for a in &mine {
            let at_once = mine.iter().filter(|b| b.1 <= a.1 && a.1 < b.2).count();
            assert!(
                at_once <= n,
                "{node} ran {at_once} jobs at once, slots {n}: {runs:?}"
            );
        }
    }
    // Ten slots for sixteen jobs of 1.2 s: six waited for a slot, and the
    // burst took two rounds.
    let waited = runs.iter().filter(|r| r.3 > 500.0).count();
    assert!(waited >= 6, "only {waited} jobs queued: {runs:?}");
    assert!(took >= Duration::from_millis(2400), "took {took:?}");
}

#[test]
fn bad_input_gets_a_clear_error_and_status() {
    if !privileged() {
        return;
    }
    // No reachable node: a cluster file whose only agent is not there.
    let dir = std::env::temp_dir().join(format!("mosix-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cf = dir.join("cluster.json");
    std::fs::write(
        &cf,
        r#"{"name":"gone","nodes":[{"name":"node1","endpoint":"http://127.0.0.1:1","address":"127.0.0.1"}]}"#,
    )
    .unwrap();
    let o = Command::new(MOSRUN)
        .args(["-n", "--", "true"])
        .env("MOSIX_CLUSTER", &cf)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("unreachable"), "{}", stderr(&o));

    let cl = Cluster::up(2, &[]);
    let check = |args: &[&str], code: i32, msg: &str| {
        let o = run(MOSRUN, args, Some(&cl));
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    };
    check(
        &["-n", "--", "no-such-cmd-xyz"],
        127,
        "mosrun: no-such-cmd-xyz: command not found",
    );
    check(
        &["-n", "--node", "node2", "--", "/no/such/file"],
        127,
        "command not found",
    );
    let plain = cl.shared.join("noexec");
    std::fs::write(&plain, "echo should not run\n").unwrap();
    let plain_s = plain.to_string_lossy().into_owned();
    check(&["-n", "--", &plain_s], 126, "Permission denied");
    let _ = std::fs::remove_file(&plain);
    check(
        &["-n", "--node", "node9", "--", "true"],
        125,
        "unknown node",
    );
    check(&["-n", "--bogus-flag", "--", "true"], 125, "bogus");

    // A working directory the node cannot see: a tmpfs mounted in a mount
    // namespace of mosrun's own.
    let base = std::env::temp_dir().join(format!("mosix-cwd-{}", cl.name));
    std::fs::create_dir_all(&base).unwrap();
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none {b} && mkdir {b}/private && cd {b}/private && exec {MOSRUN} -n -- true",
            b = base.display()
        ))
        .env("MOSIX_CLUSTER", &cl.file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&base);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("working directory") && stderr(&o).contains("private"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_job_whose_node_is_lost_is_rerun_only_when_asked() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(4, &[]);
    // With --rerun-on-node-loss: node2's agent dies mid-job; the job runs
    // again on another node, the event is reported, its output appears once.
    let marker = format!("fg-rerun-{}", cl.name);
    let stats = std::env::temp_dir().join(format!("mosix-rerun-{}.stats", cl.name));
    let c = Reap(Some(spawn_stats(
        &cl,
        &[
            "-n",
            "--node",
            "node2",
            "--rerun-on-node-loss",
            "--",
            "sh",
            "-c",
            &format!("echo start; sleep 2; echo done # {marker}"),
        ],
        Stdio::null(),
        Some(&stats),
    )));
    let mut first = None;
    cl.wait_for("the job on node2", 20, || {
        first = running_job(&cl, &marker).filter(|j| j.1 == "node2");
        first.is_some()
    });
    // node2's agent is killed (and started again): the job's session died
    // with it, so the new agent kills the copy it finds rather than adopt
    // an orphan.
    cl.restart_agent("node2", &[]);
    let (code, out, err) = c.finish(40);
    assert_eq!((code, out.as_str()), (0, "start\ndone\n"), "{err}");
    assert!(
        err.contains("mosrun: node node2 lost (") && err.contains("); re-running on node"),
        "{err}"
    );
    let pid = first.unwrap().2;
    cl.wait_for("node2's copy to be killed", 15, || !alive(pid));
    let line = std::fs::read_to_string(&stats).unwrap();
    let _ = std::fs::remove_file(&stats);
    assert!(line.contains(" exit=0 reruns=1 "), "{line}");

    // node3's network is cut mid-job: its silence gives it away (4 s), the
    // job runs again elsewhere, and node3's agent, hearing nothing from
    // the home for 5 s, kills its copy: no orphan.
    let marker = format!("fg-cut-{}", cl.name);
    let c = Reap(Some(spawn(
        &cl,
        &[
            "-n",
            "--node",
            "node3",
            "--rerun-on-node-loss",
            "--",
            "sh",
            "-c",
            &format!("echo start; sleep 3; echo done # {marker}"),
        ],
        Stdio::null(),
    )));
    let mut first = None;
    cl.wait_for("the job on node3", 20, || {
        first = running_job(&cl, &marker).filter(|j| j.1 == "node3");
        first.is_some()
    });
    let cut = Command::new("ip")
        .args([
            "netns",
            "exec",
            &cl.netns("node3"),
            "ip",
            "link",
            "set",
            "eth0",
            "down",
        ])
        .status()
        .unwrap();
    assert!(cut.success());
    let (code, out, err) = c.finish(40);
    assert_eq!((code, out.as_str()), (0, "start\ndone\n"), "{err}");
    assert!(
        err.contains("mosrun: node node3 lost (no word from it for 4 s); re-running on node"),
        "{err}"
    );
    let pid = first.unwrap().2;
    cl.wait_for("the cut-off copy to be killed", 15, || !alive(pid));

    // Without it: a clear error, status 125, never silent.
    let marker = format!("fg-norerun-{}", cl.name);
    let mut c = Reap(Some(spawn(
        &cl,
        &[
            "-n",
            "--node",
            "node4",
            "--",
            "sh",
            "-c",
            &format!("echo start; sleep 30 # {marker}"),
        ],
        Stdio::null(),
    )));
    let mut r = BufReader::new(c.child().stdout.take().unwrap());
    wait_line(&mut r, "start");
    assert!(cl.kill_node_processes("node4") > 0);
    let (code, _, err) = c.finish(30);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("node node4 lost"), "{err}");

    // The home agent (node1) dies mid-job: mosrun runs the job again
    // through another agent, its stdin replayed, its output shown once.
    let marker = format!("fg-home-{}", cl.name);
    let mut c = Reap(Some(spawn(
        &cl,
        &[
            "--node",
            "node2",
            "--rerun-on-node-loss",
            "--",
            "sh",
            "-c",
            &format!("cat; echo start; sleep 2; echo done # {marker}"),
        ],
        Stdio::piped(),
    )));
    c.child().stdin.take().unwrap().write_all(b"in1\n").unwrap();
    cl.wait_for("the job on node2", 20, || {
        running_job(&cl, &marker).is_some_and(|j| j.1 == "node2")
    });
    cl.restart_agent("node1", &["--kill-only"]);
    let (code, out, err) = c.finish(40);
    assert_eq!((code, out.as_str()), (0, "in1\nstart\ndone\n"), "{err}");
    assert!(
        err.contains("mosrun: home agent node1 lost (") && err.contains("re-running through node2"),
        "{err}"
    );
}
