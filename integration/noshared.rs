//! Issue: no shared disk required. On a local cluster configured without a
//! shared path (`mosctl local up --no-shared`: each node its own state dir),
//! jobs migrate with their images streamed from agent to agent, and a failed
//! or interrupted hand-over leaves the job running on its source.

use crate::support::*;
use mosix::core::{JobId, JobState};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn is_image_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".img") || name == "MANIFEST.json" || name == "CLAIM"
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, out),
            Ok(t) if t.is_file() && is_image_file(&p) => out.push(p),
            _ => {}
        }
    }
}

/// Records every image file that appears anywhere the cluster or the test
/// could write (the cluster's run dir, the test's scratch dir, the default
/// shared root), polling while migrations run.
struct ImageWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<std::collections::BTreeSet<PathBuf>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ImageWatch {
    fn start(cl: &Cluster) -> Self {
        let roots = vec![
            PathBuf::from(format!("/run/mosix/{}", cl.name)),
            cl.shared.clone(),
            mosix::local::default_shared_root(&cl.name),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let (s2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                let mut found = vec![];
                for r in &roots {
                    walk(r, &mut found);
                }
                seen2.lock().unwrap().extend(found);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<PathBuf> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let v = self.seen.lock().unwrap().iter().cloned().collect();
        v
    }
}

/// The cluster has no shared path: no shared root in the cluster file or
/// the agents' arguments, each node its own state dir, the dirs disjoint;
/// and every image file ever seen was inside one node's own dir.
fn assert_no_shared_storage(cl: &Cluster, seen: &[PathBuf]) {
    let cf = mosix::core::cluster_file::ClusterFile::load(&cl.file).unwrap();
    assert!(cf.shared_root.is_none(), "cluster file names a shared root");
    let nodes = cl.node_names();
    let dirs: Vec<PathBuf> = nodes.iter().map(|n| cl.node_dir(n)).collect();
    for (n, d) in nodes.iter().zip(&dirs) {
        let args: Vec<String> = serde_json::from_slice(
            &std::fs::read(format!("/run/mosix/{}/{n}.args.json", cl.name)).unwrap(),
        )
        .unwrap();
        assert!(!args.iter().any(|a| a == "--shared"), "{n}: {args:?}");
        let i = args
            .iter()
            .position(|a| a == "--state-dir")
            .expect("--state-dir");
        assert_eq!(Path::new(&args[i + 1]), d, "{n} uses its own state dir");
    }
    for (i, a) in dirs.iter().enumerate() {
        for b in dirs.iter().skip(i + 1) {
            assert!(
                !a.starts_with(b) && !b.starts_with(a),
                "node dirs overlap: {a:?} {b:?}"
            );
        }
    }
    assert!(
        !mosix::local::default_shared_root(&cl.name).exists(),
        "no shared root was created"
    );
    let mut now = vec![];
    walk(&cl.shared, &mut now);
    walk(&mosix::local::jobs_dir(&cl.name), &mut now);
    assert!(
        now.is_empty(),
        "image files outside the nodes' dirs: {now:?}"
    );
    for p in seen {
        assert!(
            dirs.iter().any(|d| p.starts_with(d)),
            "image file {p:?} was written outside the nodes' own dirs {dirs:?}"
        );
    }
}

/// Image files of a job still in a node's dir (staging included).
fn job_images(cl: &Cluster, node: &str, job: &str) -> Vec<PathBuf> {
    let mut v = vec![];
    let d = cl.node_dir(node);
    walk(&d.join("images").join(job), &mut v);
    walk(&d.join("incoming").join(job), &mut v);
    walk(&d.join("incoming-pages").join(job), &mut v);
    v
}

/// Processes (host pids) that are the job: a PID-namespace init whose
/// stdout is the job's output file.
fn instances(stdout: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let fd1 = std::fs::read_link(format!("/proc/{pid}/fd/1"));
        let init = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("NSpid:") && l.split_whitespace().last() == Some("1"))
            })
            .unwrap_or(false);
        if init && fd1.map(|p| p == Path::new(stdout)).unwrap_or(false) {
            out.push(pid);
        }
    }
    out
}

fn counter(cl: &Cluster, port: &str, mem_mib: &str) -> (String, PathBuf) {
    // The job's own file: in /tmp, not on any shared path.
    let file = cl.shared.join(format!("counter-{port}.txt"));
    let job = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "counter",
        "--port",
        port,
        "--file",
        file.to_str().unwrap(),
        "--mem-mib",
        mem_mib,
    ]);
    cl.wait_for("counter to tick", 30, || ticks(&file).len() > 2);
    (job, file)
}

#[test]
fn no_shared_path_counter_migrates_a_b_a_with_memory_and_socket() {
    if !privileged() {
        return;
    }
    no_shared_a_b_a(&[], Pages::Streamed);
}

/// The same with the test's own directory (the counter's file) served to
/// the nodes over sshfs, and the page stream turned off: the pages go in
/// the early push, while CRIU writes them on the source.
#[test]
fn no_shared_path_counter_migrates_a_b_a_over_sshfs() {
    if !privileged() || !sshfs_capable() {
        return;
    }
    no_shared_a_b_a(&["--shared-over", "sshfs"], Pages::EarlyPush);
}

/// How a full copy's pages reach the target.
#[derive(PartialEq)]
enum Pages {
    /// Into its page server (`direct::stream`), the default.
    Streamed,
    /// In a push that starts during the dump (`MOSIX_PAGE_STREAM=off`).
    EarlyPush,
}

fn no_shared_a_b_a(extra: &[&str], pages: Pages) {
    let mut flags = vec!["--no-shared"];
    flags.extend_from_slice(extra);
    let env: &[(&str, &str)] = match pages {
        Pages::Streamed => &[],
        Pages::EarlyPush => &[("MOSIX_PAGE_STREAM", "off")],
    };
    let cl = Cluster::up_env(2, &flags, env);
    let watch = ImageWatch::start(&cl);
    let (job, file) = counter(&cl, "8181", "64");
    let id = JobId::parse(&job).unwrap();
    // The job's own address (the default), the same on every node.
    let ip = cl.job_ip(&job);
    cl.wait_for("counter to answer on node1", 10, || {
        query_counter(&ip, 8181).is_some()
    });
    let (before, ok) = query_counter(&ip, 8181).unwrap();
    assert!(ok);
    // The job is recorded on node1 only.
    assert!(cl.node_registry("node1").exists(&id));
    assert!(!cl.node_registry("node2").exists(&id));

    let o = cl.mosctl(&["migrate", "--full-copy", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("frozen"), "{}", stdout(&o));
    let (after, ok) = query_counter(&ip, 8181).expect("counter answers on node2");
    assert!(ok, "memory checksum intact");
    // The pages went while CRIU wrote them (streamed, or in an early
    // push), not after.
    let log = std::fs::read_to_string(format!("/run/mosix/{}/node1.log", cl.name)).unwrap();
    // The log's fields are coloured: `early` ESC[0m ESC[2m = ESC[0m `true`.
    let plain = |l: &str| l.replace("\u{1b}[0m", "").replace("\u{1b}[2m", "");
    let how = match pages {
        Pages::Streamed => "streamed=true",
        Pages::EarlyPush => "early=true",
    };
    assert!(
        log.lines()
            .map(plain)
            .any(|l| l.contains("images pushed") && l.contains(how)),
        "no {how} push in node1's log:\n{log}"
    );
    assert!(!log.contains("the early push failed"), "{log}");
    assert!(after >= before, "counter continued ({before} -> {after})");
    assert!(
        query_counter(&cl.node_ip("node1"), 8181).is_none(),
        "nothing answers at node1's address"
    );

    // The record travelled with the job: node2 has it, node1 not any more.
    let r2 = cl.node_registry("node2").get(&id).unwrap();
    assert_eq!(r2.node.as_str(), "node2");
    assert_eq!(r2.state, JobState::Running);
    assert!(r2.pending.is_none());
    let m = r2.history.last().unwrap();
    assert!(m.ok && !m.post_copy, "{m:?}");
    assert!(
        m.image_bytes >= 64 << 20,
        "memory went through the images: {m:?}"
    );
    assert!(
        !cl.node_registry("node1").exists(&id),
        "node1 dropped its record"
    );
    // The images landed in node2's own dir (which remembers it), and both
    // copies are cleaned up.
    assert!(cl
        .node_dir("node2")
        .join("landed")
        .join(&job)
        .join(m.id.as_str())
        .exists());
    cl.wait_for("images cleaned up on both nodes", 20, || {
        job_images(&cl, "node1", &job).is_empty() && job_images(&cl, "node2", &job).is_empty()
    });
    // Listing and lookup ask every node.
    assert_eq!(cl.job_json(&job)["node"], "node2");
    let o = cl.mosctl(&["jobs"]);
    assert!(stdout(&o)
        .lines()
        .any(|l| l.starts_with(&job) && l.contains("node2") && l.contains("running")));
    let o = cl.mosctl(&["show", &job]);
    assert!(
        o.status.success() && stdout(&o).contains("node2"),
        "{}",
        stdout(&o)
    );

    std::thread::sleep(Duration::from_millis(500));
    let o = cl.mosctl(&["migrate", &job, "node1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (back, ok) = query_counter(&ip, 8181).expect("counter answers on node1 again");
    assert!(ok && back > before, "{before} -> {after} -> {back}");
    let rec = cl.record(&job);
    assert_eq!(rec.node.as_str(), "node1");
    assert_eq!(rec.history.len(), 2);
    assert!(rec.history.iter().all(|m| m.ok));
    assert!(!cl.node_registry("node2").exists(&id));
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));
    let seen = watch.stop();
    assert!(!seen.is_empty(), "the watcher saw the images");
    assert_no_shared_storage(&cl, &seen);
}

/// A counter in its node's network (no address of its own): the jobs whose
/// full copies stream their pages (see `agent::direct::stream`).
fn counter_in_node_net(cl: &Cluster, port: &str, mem_mib: &str) -> (String, PathBuf) {
    let file = cl.shared.join(format!("counter-{port}.txt"));
    let job = crate::support::counter(
        cl,
        "node1",
        port,
        &file,
        &["--net", "node"],
        &["--mem-mib", mem_mib],
    );
    (job, file)
}

/// `mosctl migrate --full-copy JOB NODE`, started in the background.
fn migrate_in_background(cl: &Cluster, job: &str, node: &str) -> std::process::Child {
    std::process::Command::new(MOSCTL)
        .args(["migrate", "--full-copy", job, node])
        .env("MOSIX_CLUSTER", &cl.file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until node1's log says that the images were pushed after a page
/// stream: the moment between the push and the Restore's answer.
fn wait_for_streamed_push(cl: &Cluster) {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !node_log(cl, "node1")
        .lines()
        .any(|l| l.contains("images pushed") && l.contains("streamed=true"))
    {
        assert!(std::time::Instant::now() < until, "no push in node1's log");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// After a move whose outcome had to be settled between node1 and node2:
/// within `wait_s` the job runs on one node, answers there on `port` with
/// all its memory and a counter no lower than `before`, as exactly one
/// instance, and the other node does not record it.
fn assert_settled_once(cl: &Cluster, job: &str, port: u16, before: u64, wait_s: u64) {
    let id = JobId::parse(job).unwrap();
    let rec_now = || cl.record(job);
    cl.wait_for("the job to settle on one node", wait_s, || {
        let r = rec_now();
        r.state == JobState::Running && r.pending.is_none()
    });
    let rec = rec_now();
    let (here, other) = if rec.node.as_str() == "node1" {
        ("node1", "node2")
    } else {
        ("node2", "node1")
    };
    let (now, ok) =
        query_counter(&cl.node_ip(here), port).expect("the job answers where it is recorded");
    assert!(ok && now >= before, "{before} -> {now}");
    cl.wait_for("exactly one instance", 20, || {
        instances(&rec.stdout_path).len() == 1
    });
    assert!(
        !cl.node_registry(other).exists(&id),
        "{other} still records the job"
    );
    eprintln!("settled on {here}");
}

fn node_log(cl: &Cluster, node: &str) -> String {
    let log = std::fs::read_to_string(format!("/run/mosix/{}/{node}.log", cl.name)).unwrap();
    // The log's fields are coloured.
    log.replace("\u{1b}[0m", "").replace("\u{1b}[2m", "")
}

fn is_page_file(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("pages-"))
}

/// A full copy streams the job's memory into the target's page server: the
/// pages are written on the target only, never on the source; the target's
/// restore consumes them; the memory arrives whole; and the source's stopped
/// copy of the job is gone once the target runs it. Then back the same way.
#[test]
fn no_shared_path_full_copy_streams_pages_to_the_target_only() {
    streams_pages_to_the_target_only(&["--no-shared"], 8186);
}

/// The same with `--plain-pages` on both nodes: the pages go on a plain TCP
/// connection between the two CRIUs, opened with the target's token, and
/// everything else is as above.
#[test]
fn no_shared_path_plain_pages_go_between_the_two_crius() {
    streams_pages_to_the_target_only(&["--no-shared", "--plain-pages"], 8196);
}

fn streams_pages_to_the_target_only(extra: &[&str], port: u16) {
    if !privileged() {
        return;
    }
    let plain = extra.contains(&"--plain-pages");
    let cl = Cluster::up(2, extra);
    let (job, file) = counter_in_node_net(&cl, &port.to_string(), "64");
    let (ip1, ip2) = (cl.node_ip("node1"), cl.node_ip("node2"));
    cl.wait_for("counter to answer on node1", 10, || {
        query_counter(&ip1, port).is_some()
    });
    let (before, _) = query_counter(&ip1, port).unwrap();
    let watch = ImageWatch::start(&cl);
    let o = cl.mosctl(&["migrate", "--full-copy", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seen = watch.stop();
    let (after, ok) = query_counter(&ip2, port).expect("counter answers on node2");
    assert!(ok, "memory checksum intact");
    assert!(after >= before, "{before} -> {after}");
    let log1 = node_log(&cl, "node1");
    assert!(
        log1.lines()
            .any(|l| l.contains("images pushed") && l.contains("streamed=true")),
        "no page stream in node1's log:\n{log1}"
    );
    let log2 = node_log(&cl, "node2");
    assert!(
        log2.lines()
            .any(|l| l.contains("pages received over the page stream")
                && l.contains(&format!("plain={plain}"))),
        "node2 took no page stream (plain={plain}):\n{log2}"
    );
    // Hashed on arrival by node2 itself: its restore consumed them (CRIU's
    // auto-dedup), and the checksum above shows the memory came back whole.
    assert!(
        log2.lines()
            .any(|l| l.contains("restored") && l.contains("pages_consumed=true")),
        "node2's restore did not consume the streamed pages:\n{log2}"
    );
    let (d1, d2) = (cl.node_dir("node1"), cl.node_dir("node2"));
    let on = |d: &Path| {
        seen.iter()
            .filter(|p| p.starts_with(d) && is_page_file(p))
            .count()
    };
    assert_eq!(on(&d1), 0, "page images written on the source: {seen:?}");
    assert!(on(&d2) > 0, "no page images seen on the target: {seen:?}");
    let rec = cl.record(&job);
    let m = rec.history.last().unwrap();
    assert!(m.ok && !m.post_copy, "{m:?}");
    assert!(m.image_bytes >= 64 << 20, "the pages count: {m:?}");
    cl.wait_for("the source's stopped copy to end", 10, || {
        instances(&rec.stdout_path).len() == 1
    });
    assert_no_shared_storage(&cl, &seen);

    let o = cl.mosctl(&["migrate", &job, "node1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        node_log(&cl, "node1")
            .lines()
            .any(|l| l.contains("pages received over the page stream")
                && l.contains(&format!("plain={plain}"))),
        "node1 took no page stream on the way back (plain={plain})"
    );
    let (back, ok) = query_counter(&ip1, port).expect("counter answers on node1 again");
    assert!(ok && back > before, "{before} -> {after} -> {back}");
    cl.wait_for("one instance, images cleaned up", 20, || {
        instances(&rec.stdout_path).len() == 1
            && job_images(&cl, "node1", &job).is_empty()
            && job_images(&cl, "node2", &job).is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_contiguous(&ticks(&file));
}

/// The pages were streamed and the push went through, but the target's
/// restore fails: the source's stopped tree runs on, with all its memory,
/// and nothing of it is left on the target. A target whose page server
/// cannot start refuses the stream, and the move falls back to pushing the
/// images, whose restore fails there too: the job is restored here.
#[test]
fn no_shared_path_streamed_pages_failed_restore_resumes_the_source_tree() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    let (job, file) = counter_in_node_net(&cl, "8187", "32");
    let id = JobId::parse(&job).unwrap();
    let ip1 = cl.node_ip("node1");
    cl.wait_for("counter", 10, || query_counter(&ip1, 8187).is_some());
    // node2's CRIU serves pages but fails every `swrk` call: its restore.
    let wrapper = cl.shared.join("criu-no-swrk.sh");
    let criu = mosix::criu::default_criu_path();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ \"$1\" = swrk ] && exit 1\nexec {} \"$@\"\n",
            criu.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", wrapper.to_str().unwrap()])
        .status()
        .unwrap();
    cl.restart_agent("node2", &["--criu", wrapper.to_str().unwrap()]);
    let (before, _) = query_counter(&ip1, 8187).unwrap();
    let o = cl.mosctl(&["migrate", "--full-copy", &job, "node2"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("resumed on node1"),
        "says where the job is: {err}"
    );
    assert!(
        node_log(&cl, "node1")
            .lines()
            .any(|l| l.contains("images pushed") && l.contains("streamed=true")),
        "the pages were streamed"
    );
    let (now, ok) = query_counter(&ip1, 8187).expect("the job answers on node1");
    assert!(ok && now >= before, "{before} -> {now}");
    let rec = cl.node_registry("node1").get(&id).unwrap();
    assert_eq!(rec.state, JobState::Running);
    assert_eq!(rec.node.as_str(), "node1");
    assert!(!rec.history.last().unwrap().ok, "failed attempt recorded");
    assert!(!cl.node_registry("node2").exists(&id));
    assert_eq!(instances(&rec.stdout_path).len(), 1, "runs exactly once");
    cl.wait_for("node2 to drop its copy", 20, || {
        job_images(&cl, "node2", &job).is_empty()
    });

    // A page server that cannot start: no stream, the images go in the
    // push, and the restore there fails too.
    cl.restart_agent("node2", &["--criu", "/bin/false"]);
    let o = cl.mosctl(&["migrate", "--full-copy", &job, "node2"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        node_log(&cl, "node1").contains("the pages go in the push: no page stream to node2"),
        "the stream was refused up front"
    );
    let (again, ok) = query_counter(&ip1, 8187).expect("the job answers on node1");
    assert!(ok && again >= now);
    assert_eq!(instances(&rec.stdout_path).len(), 1, "runs exactly once");
    assert_eq!(
        cl.node_registry("node1").get(&id).unwrap().state,
        JobState::Running
    );

    // And with a working CRIU again, it moves.
    cl.restart_agent("node2", &[]);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, ok) = query_counter(&cl.node_ip("node2"), 8187).expect("answers on node2");
    assert!(ok);
    std::thread::sleep(Duration::from_millis(300));
    assert_contiguous(&ticks(&file));
}

/// The source's agent dies in the middle of a streamed move, its dump
/// under way and the pages on their way: its CRIU fails the dump and lets
/// the job go, and the agent, back, finds the job running here, with all
/// its memory, exactly once; the target keeps nothing.
#[test]
fn no_shared_path_source_dying_mid_stream_keeps_the_job() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    let (job, file) = counter_in_node_net(&cl, "8188", "256");
    let id = JobId::parse(&job).unwrap();
    let ip1 = cl.node_ip("node1");
    cl.wait_for("counter", 10, || query_counter(&ip1, 8188).is_some());
    let (before, _) = query_counter(&ip1, 8188).unwrap();
    // 100 Mbit/s out of node1: the 256 MiB stream takes about 20 s.
    cl.throttle_egress("node1", "100mbit");
    let m = migrate_in_background(&cl, &job, "node2");
    let staging = cl.node_dir("node2").join("incoming-pages").join(&job);
    cl.wait_for("the page stream to start", 60, || staging.is_dir());
    std::thread::sleep(Duration::from_secs(1));
    // node1's agent dies in the middle of the stream.
    cl.restart_agent("node1", &["--kill-only"]);
    let out = m.wait_with_output().unwrap();
    assert!(!out.status.success());
    cl.restart_agent("node1", &[]);
    cl.wait_for("the job to answer on node1", 60, || {
        query_counter(&ip1, 8188).is_some_and(|(_, ok)| ok)
    });
    let (now, _) = query_counter(&ip1, 8188).unwrap();
    assert!(now >= before, "{before} -> {now}");
    let rec = cl.node_registry("node1").get(&id).unwrap();
    assert_eq!(rec.state, JobState::Running, "{rec:?}");
    assert_eq!(rec.node.as_str(), "node1");
    assert_eq!(instances(&rec.stdout_path).len(), 1, "runs exactly once");
    assert!(!cl.node_registry("node2").exists(&id));
    cl.wait_for("node2 to drop the streamed pages", 30, || {
        job_images(&cl, "node2", &job).is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));
}

/// The source's agent dies once the pages were streamed and the rest
/// pushed, while the target restores: the source's copy is then its stopped
/// tree. Back, the agent asks the target and either ends that tree (the job
/// landed) or lets it run on (it did not): either way the job runs exactly
/// once, with all its memory, and one node records it.
#[test]
fn no_shared_path_source_dying_after_the_push_settles_with_the_target() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    let (job, file) = counter_in_node_net(&cl, "8189", "256");
    let ip1 = cl.node_ip("node1");
    cl.wait_for("counter", 10, || query_counter(&ip1, 8189).is_some());
    let (before, _) = query_counter(&ip1, 8189).unwrap();
    let m = migrate_in_background(&cl, &job, "node2");
    // Caught between the push and the Restore's answer: node2's agent is
    // stopped as soon as node1 has pushed, node1's is killed, then node2
    // goes on (and restores, or has) while node1 comes back.
    let node2 = mosix::local::agent_pid(&cl.name, "node2").expect("node2's agent");
    wait_for_streamed_push(&cl);
    let signal = |pid: i32, s| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s);
    signal(node2, nix::sys::signal::Signal::SIGSTOP).unwrap();
    cl.restart_agent("node1", &["--kill-only"]);
    let _ = m.wait_with_output().unwrap();
    signal(node2, nix::sys::signal::Signal::SIGCONT).unwrap();
    cl.restart_agent("node1", &[]);
    assert_settled_once(&cl, &job, 8189, before, 60);
    // Which way it went, for the log: killed before the move ended, the
    // restarted agent asked the target.
    assert!(
        node_log(&cl, "node1").contains("was under way when this agent stopped"),
        "the restarted source did not have to ask node2"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));
}

/// Move `job` from node1 to node2 and kill node2's agent once the pages
/// were streamed and the rest pushed. After 30 s of asking a node that is
/// down, the move must fail saying that its outcome is not known yet and
/// that the job is not lost.
fn move_and_lose_the_target(cl: &Cluster, job: &str) {
    let mut m = migrate_in_background(cl, job, "node2");
    wait_for_streamed_push(cl);
    cl.restart_agent("node2", &["--kill-only"]);
    if wait_timeout(&mut m, 120).is_none() {
        let _ = m.kill();
        panic!("mosctl migrate did not return within 120 s of the target's death");
    }
    let o = m.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the move cannot have succeeded: {err}");
    assert!(
        err.contains("not known yet") && err.contains("The job is not lost"),
        "{err}"
    );
}

/// The target's agent dies once the pages were streamed and the rest
/// pushed, and stays down past the 30 s that `migrate` asks it for. The
/// move returns saying the outcome is not known yet and the job is not
/// lost; the source keeps its stopped tree and a background task keeps
/// asking. Once the target is back and answers, the job runs exactly once,
/// on the node that records it, with every tick in order.
#[test]
fn no_shared_path_target_down_past_the_moves_patience_settles_in_the_background() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    let (job, file) = counter_in_node_net(&cl, "8193", "64");
    let id = JobId::parse(&job).unwrap();
    let ip1 = cl.node_ip("node1");
    cl.wait_for("counter", 10, || query_counter(&ip1, 8193).is_some());
    let (before, _) = query_counter(&ip1, 8193).unwrap();
    move_and_lose_the_target(&cl, &job);
    // Still the source's, with the reason, while node2 is down (read from
    // node1's registry: a listing would ask node2 too).
    let rec = cl.node_registry("node1").get(&id).unwrap();
    assert_eq!(rec.node.as_str(), "node1", "{rec:?}");
    assert!(
        rec.error.contains("has not said whether it restored"),
        "{rec:?}"
    );
    // A listing while node2 is down lists node1's jobs and says, on
    // stderr, that node2's are missing; a job that no node that answered
    // has may be on node2, which is not "no such job".
    let o = cl.mosctl(&["jobs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&job), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("the jobs of node2 are not listed"),
        "{}",
        stderr(&o)
    );
    let o = cl.mosctl(&["show", "j00000000ff"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("node2") && stderr(&o).contains("did not"),
        "{}",
        stderr(&o)
    );
    cl.restart_agent("node2", &[]);
    assert_settled_once(&cl, &job, 8193, before, 90);
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));
}

/// The same, but the target never comes back. Past the source's settle
/// patience (5 s here, a day by default) the job is recorded frozen on the
/// source with its stopped tree and a message that names `mosctl thaw`;
/// thawing it there lets the job run on, with its memory and every tick in
/// order.
#[test]
fn no_shared_path_target_silent_past_the_settle_patience_leaves_the_job_frozen_for_thaw() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    cl.restart_agent("node1", &["--agent-arg=--settle-patience=5s"]);
    // `restart-agent` returns only once the new agent answers.
    assert_eq!(
        node_log(&cl, "node1").matches("mosixd serving").count(),
        2,
        "node1's agent serves again when restart-agent returns"
    );
    let (job, file) = counter_in_node_net(&cl, "8194", "64");
    let id = JobId::parse(&job).unwrap();
    let ip1 = cl.node_ip("node1");
    cl.wait_for("counter", 20, || query_counter(&ip1, 8194).is_some());
    let (before, _) = query_counter(&ip1, 8194).unwrap();
    move_and_lose_the_target(&cl, &job);
    // Not yet frozen: the background task asks for 5 s more.
    let rec = |cl: &Cluster| cl.node_registry("node1").get(&id).unwrap();
    cl.wait_for("the job recorded frozen on node1", 60, || {
        rec(&cl).state == JobState::Frozen
    });
    let r = rec(&cl);
    assert_eq!(r.node.as_str(), "node1", "{r:?}");
    assert!(
        r.error.contains("never said whether it restored") && r.error.contains("mosctl thaw"),
        "{r:?}"
    );
    assert!(
        node_log(&cl, "node1")
            .contains("the job is recorded frozen here with its stopped processes"),
        "node1's log does not say why"
    );
    // Stopped all along: nothing answers.
    assert!(
        query_counter(&ip1, 8194).is_none(),
        "the job ran on while frozen"
    );
    // A person decides node2 is gone for good.
    let o = cl.mosctl(&["thaw", &job, "node1"]);
    assert!(o.status.success(), "thaw: {}", stderr(&o));
    cl.wait_for("the counter to answer after the thaw", 20, || {
        query_counter(&ip1, 8194).is_some_and(|(_, ok)| ok)
    });
    let (after, ok) = query_counter(&ip1, 8194).unwrap();
    assert!(ok && after >= before, "{before} -> {after}");
    let r = rec(&cl);
    assert_eq!(r.state, JobState::Running, "{r:?}");
    assert!(r.pending.is_none(), "{r:?}");
    assert_eq!(instances(&r.stdout_path).len(), 1, "runs exactly once");
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));
}

#[test]
fn no_shared_path_post_copy_moves_all_memory() {
    if !privileged() || !post_copy_capable() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    let watch = ImageWatch::start(&cl);
    let (job, file) = counter(&cl, "8182", "256");
    // The job's own address (the default), the same on every node.
    let ip = cl.job_ip(&job);
    cl.wait_for("counter", 20, || query_counter(&ip, 8182).is_some());
    let (before, _) = query_counter(&ip, 8182).unwrap();
    let o = cl.mosctl(&["migrate", "--post-copy", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("post-copy"), "{}", stdout(&o));
    // Each query checksums all 256 MiB: every page came from node1's page
    // server, the rest of the images through the push.
    let (after, mem_ok) = query_counter(&ip, 8182).expect("answers on node2");
    assert!(mem_ok, "memory intact after post-copy");
    assert!(after >= before);
    let rec = cl.record(&job);
    assert_eq!(rec.node.as_str(), "node2");
    let m = rec.history.last().unwrap();
    assert!(m.post_copy, "{m:?}");
    assert!(
        m.image_bytes < 64 << 20,
        "no memory in the pushed images: {m:?}"
    );
    let id = JobId::parse(&job).unwrap();
    assert!(!cl.node_registry("node1").exists(&id));
    cl.wait_for("images cleaned up once every page was served", 30, || {
        job_images(&cl, "node1", &job).is_empty() && job_images(&cl, "node2", &job).is_empty()
    });
    // And back as a full copy, from the memory post-copy brought over.
    let o = cl.mosctl(&["migrate", &job, "node1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, mem_ok) = query_counter(&ip, 8182).expect("answers on node1");
    assert!(mem_ok);
    std::thread::sleep(Duration::from_millis(300));
    assert_contiguous(&ticks(&file));
    let seen = watch.stop();
    assert_no_shared_storage(&cl, &seen);
}

#[test]
fn no_shared_path_failed_restore_on_target_leaves_job_running_on_source() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    let watch = ImageWatch::start(&cl);
    let (job, file) = counter(&cl, "8183", "16");
    let id = JobId::parse(&job).unwrap();
    let ip = cl.job_ip(&job);
    // node2's agent gets a CRIU that fails every call: it receives the
    // images, and its restore fails.
    cl.restart_agent("node2", &["--criu", "/bin/false"]);
    let (before, _) = query_counter(&ip, 8183).unwrap();
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("restored on node1"),
        "says where the job is: {err}"
    );
    let (now, mem_ok) = query_counter(&ip, 8183).expect("the job answers on node1");
    assert!(mem_ok && now >= before, "{before} -> {now}");
    let rec = cl.node_registry("node1").get(&id).unwrap();
    assert_eq!(rec.node.as_str(), "node1");
    assert_eq!(rec.state, JobState::Running);
    assert!(!rec.history.last().unwrap().ok, "failed attempt recorded");
    // node2 dropped its copy and keeps no record: it can never run the job.
    assert!(!cl.node_registry("node2").exists(&id));
    assert!(job_images(&cl, "node2", &job).is_empty());
    assert_eq!(
        instances(&rec.stdout_path).len(),
        1,
        "the job runs exactly once"
    );
    assert_eq!(cl.job_json(&job)["node"], "node1");
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));

    // With a working CRIU again, the same job moves.
    cl.restart_agent("node2", &[]);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, mem_ok) = query_counter(&cl.job_ip(&job), 8183).expect("answers on node2");
    assert!(mem_ok);
    std::thread::sleep(Duration::from_millis(300));
    assert_contiguous(&ticks(&file));
    let seen = watch.stop();
    assert_no_shared_storage(&cl, &seen);
}

#[test]
fn no_shared_path_target_dying_mid_push_leaves_job_on_source() {
    if !privileged() {
        return;
    }
    // The push, not the page stream (which the mid-stream tests cover).
    let cl = Cluster::up_env(2, &["--no-shared"], &[("MOSIX_PAGE_STREAM", "off")]);
    let (job, file) = counter(&cl, "8184", "256");
    let id = JobId::parse(&job).unwrap();
    let ip = cl.job_ip(&job);
    // 100 Mbit/s out of node1: the 256 MiB push takes about 20 s.
    cl.throttle_egress("node1", "100mbit");
    let m = migrate_in_background(&cl, &job, "node2");
    let incoming = cl.node_dir("node2").join("incoming").join(&job);
    cl.wait_for("the push to start", 60, || incoming.is_dir());
    std::thread::sleep(Duration::from_secs(1));
    // node2's agent dies in the middle of the stream.
    cl.restart_agent("node2", &["--kill-only"]);
    let out = m.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("$ mosctl migrate --full-copy {job} node2\n{err}");
    assert!(err.contains("sending the images to node2"), "{err}");
    assert!(err.contains("restored on node1"), "{err}");
    let (_, mem_ok) = query_counter(&ip, 8184).expect("the job answers on node1");
    assert!(mem_ok);
    let rec = cl.node_registry("node1").get(&id).unwrap();
    assert_eq!(rec.state, JobState::Running);
    assert_eq!(
        instances(&rec.stdout_path).len(),
        1,
        "the job runs exactly once"
    );
    // node2 comes back and keeps nothing of the broken push.
    cl.restart_agent("node2", &[]);
    cl.wait_for("node2 to drop the partial push", 20, || {
        job_images(&cl, "node2", &job).is_empty()
    });
    assert!(!cl.node_registry("node2").exists(&id));
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));
}

#[test]
fn no_shared_path_push_refuses_bad_input_and_changes_nothing() {
    if !privileged() {
        return;
    }
    use mosix::api::pb;
    use pb::image_chunk::Part;
    let cl = Cluster::up(2, &["--no-shared"]);
    let (job, _file) = counter(&cl, "8185", "8");
    let id = JobId::parse(&job).unwrap();
    let before = cl.node_registry("node1").get(&id).unwrap();
    // A record as the source would send it, migrating to `to`.
    let forged = |to: &str| {
        let mut r = before.clone();
        r.state = JobState::Migrating;
        r.generation += 1;
        r.pending = Some(mosix::core::job::PendingMigration {
            id: mosix::core::MigrationId::parse("mfake").unwrap(),
            from: mosix::core::NodeName::parse("node1").unwrap(),
            to: Some(mosix::core::NodeName::parse(to).unwrap()),
            phase: mosix::core::job::MigrationPhase::Dumped,
            image_dir: format!("images/{job}/mfake"),
            started_unix_ms: 0,
            post_copy: false,
            nice_before_dump: Vec::new(),
        });
        serde_json::to_vec(&r).unwrap()
    };
    let begin = |record: Vec<u8>, total: u64| pb::ImageChunk {
        part: Some(Part::Begin(pb::PushBegin {
            job_id: job.clone(),
            migration_id: "mfake".into(),
            from_node: "node1".into(),
            total_bytes: total,
            record_json: record,
            early: false,
            pages_streamed: false,
        })),
    };
    let file = |name: &str, size: u64, data: &[u8]| pb::ImageChunk {
        part: Some(Part::File(pb::FileData {
            name: name.into(),
            area: pb::FileArea::Image as i32,
            offset: 0,
            data: data.to_vec().into(),
            size,
            growing: false,
        })),
    };
    let end = |files: u32, total: u64| pb::ImageChunk {
        part: Some(Part::End(pb::PushEnd {
            files,
            total_bytes: total,
            ..Default::default()
        })),
    };
    let cases: Vec<(&str, Vec<pb::ImageChunk>, tonic::Code, &str)> = vec![
        (
            "not migrating here",
            vec![begin(forged("node1"), 1)],
            tonic::Code::FailedPrecondition,
            "not migrating to this node",
        ),
        (
            "the job's real record",
            vec![begin(serde_json::to_vec(&before).unwrap(), 1)],
            tonic::Code::FailedPrecondition,
            "no migration under way",
        ),
        (
            "a path for a name",
            vec![begin(forged("node2"), 2), file("../../etc/x", 2, b"xx")],
            tonic::Code::InvalidArgument,
            "file.name",
        ),
        (
            "a file cut short",
            vec![
                begin(forged("node2"), 10),
                file("core-1.img", 10, b"xx"),
                end(1, 2),
            ],
            tonic::Code::InvalidArgument,
            "ended after 2 of its 10 bytes",
        ),
        (
            "the sender vanishing before the end",
            vec![begin(forged("node2"), 2), file("core-1.img", 2, b"xx")],
            tonic::Code::Aborted,
            "ended before their end marker",
        ),
        (
            "more than fits",
            vec![begin(forged("node2"), 1 << 50)],
            tonic::Code::ResourceExhausted,
            "more than the",
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cf = mosix::core::cluster_file::ClusterFile::load(&cl.file).unwrap();
    let tls = mosix::api::client::ClientTls::from_cluster(&cf).unwrap();
    rt.block_on(async {
        let mut c = mosix::api::client::agent(
            &cf.node("node2").unwrap().endpoint,
            tls.as_ref(),
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        for (what, msgs, code, want) in cases {
            let s = c
                .push_images(futures::stream::iter(msgs))
                .await
                .expect_err(what);
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(s.message().contains(want), "{what}: {:?}", s.message());
        }
        // Nothing to resolve: the target says so and keeps nothing.
        let r = c
            .resolve_migration(pb::ResolveMigrationRequest {
                job_id: job.clone(),
                migration_id: "mfake".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.landed);
    });
    assert!(!cl.node_registry("node2").exists(&id));
    assert!(job_images(&cl, "node2", &job).is_empty());
    let after = cl.node_registry("node1").get(&id).unwrap();
    assert_eq!(after, before, "the job's record is untouched");
    let (_, ok) = query_counter(&cl.job_ip(&job), 8185).expect("still running on node1");
    assert!(ok);
}

/// The balancer takes its job list from one agent; without a shared path
/// that agent gathers every node's jobs, so jobs that moved stay listed
/// (once each) and the balancer keeps seeing the whole cluster.
#[test]
fn no_shared_path_balancer_spreads_jobs_and_lists_each_once() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--no-shared"]);
    let jobs: Vec<String> = (0..4)
        .map(|_| cl.mosrun(&["--node", "node1", "--", MOSJOB, "burn"]))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let on = |node: &str| {
        cl.jobs_json()
            .iter()
            .filter(|j| j["state"] == "running" && j["node"] == node)
            .count()
    };
    loop {
        let o = run(MOSBALANCE, &["--min-residence", "2"], Some(&cl));
        assert!(o.status.success(), "a round failed: {}", stderr(&o));
        if on("node1") == 2 && on("node2") == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not balanced in time: {} on node1, {} on node2",
            on("node1"),
            on("node2")
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    let listed = cl.jobs_json();
    assert_eq!(listed.len(), 4, "every job listed exactly once: {listed:?}");
    for j in &jobs {
        let rec = cl.record(j);
        assert_eq!(rec.state, JobState::Running);
        assert_eq!(instances(&rec.stdout_path).len(), 1, "{j} runs once");
        // Its record lives on its node only.
        let other = if rec.node.as_str() == "node1" {
            "node2"
        } else {
            "node1"
        };
        assert!(!cl.node_registry(other).exists(&JobId::parse(j).unwrap()));
    }
}
