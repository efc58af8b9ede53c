//! Issue: node administration, as MOSIX's mosctl had it — block/unblock,
//! drain (expel), setspeed, pin/unpin (stay) — through the real binaries.

use crate::support::*;
use mosix::core::JobState;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The line `mosctl load` prints for `node`.
fn load_line(cl: &Cluster, node: &str) -> String {
    let o = cl.mosctl(&["load"]);
    stdout(&o)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(node))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn drain_moves_four_jobs_off_live_and_a_pinned_job_stays() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, &[]);
    let files: Vec<PathBuf> = (0..4)
        .map(|i| cl.shared.join(format!("drain{i}.txt")))
        .collect();
    let jobs: Vec<String> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let port = (8101 + i).to_string();
            cl.mosrun(&[
                "--node",
                "node1",
                "--",
                MOSJOB,
                "counter",
                "--port",
                &port,
                "--file",
                f.to_str().unwrap(),
            ])
        })
        .collect();
    cl.wait_for("every counter to tick", 15, || {
        files.iter().all(|f| ticks(f).len() >= 3)
    });
    let before: Vec<usize> = files.iter().map(|f| ticks(f).len()).collect();

    let o = cl.mosctl(&["drain", "node1", "--max-parallel", "2", "--timeout", "2m"]);
    assert!(o.status.success(), "drain failed: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("node1 blocked"), "{out}");
    assert!(out.contains("drained node1: 4 jobs moved"), "{out}");
    for j in &jobs {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("moved {j} node1 -> ")))
            .unwrap_or_else(|| panic!("no line for the move of {j}: {out}"));
        assert!(line.contains(" ms"), "frozen time reported: {line}");
        let rec = cl.record(j);
        assert_ne!(rec.node.as_str(), "node1", "{j} left node1");
        assert!(line.contains(&format!("-> {}:", rec.node)), "{line}");
        assert_eq!(rec.state, JobState::Running);
        let m = rec.history.last().expect("a migration recorded");
        assert!(m.ok && m.from.as_str() == "node1", "{m:?}");
    }
    // Each counter kept its state: it goes on from where it was, with no
    // gap and no restart in the file it appends to.
    std::thread::sleep(Duration::from_millis(600));
    for (f, b) in files.iter().zip(&before) {
        let t = ticks(f);
        assert!(t.len() > *b, "{} kept ticking after the drain", f.display());
        assert_contiguous(&t);
    }
    // The node stays blocked after a drain, and mosmon shows it.
    let o = run(MOSMON, &["--once"], Some(&cl));
    let mon = stdout(&o);
    assert!(
        mon.lines()
            .any(|l| l.starts_with("node1 ") && l.ends_with(" BLOCKED")),
        "{mon}"
    );
    assert!(
        mon.lines()
            .filter(|l| l.starts_with("node2 ") || l.starts_with("node3 "))
            .all(|l| !l.contains("BLOCKED")),
        "{mon}"
    );

    // Pin (MOSIX "stay"): neither migrate nor drain moves the job.
    let o = cl.mosctl(&["unblock", "node1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = cl.mosrun(&["--node", "node1", "--", MOSJOB, "counter", "--port", "8109"]);
    let o = cl.mosctl(&["pin", &p]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("pinned to node1"), "{}", stdout(&o));
    assert!(cl.record(&p).pinned);
    let o = cl.mosctl(&["migrate", &p, "node2"]);
    assert!(!o.status.success(), "a pinned job was migrated");
    assert!(
        stderr(&o).contains(&format!("job {p} is pinned"))
            && stderr(&o).contains(&format!("mosctl unpin {p}")),
        "the refusal names the pin: {}",
        stderr(&o)
    );
    let o = cl.mosctl(&["drain", "node1"]);
    assert!(!o.status.success(), "drain must fail when a job stays");
    assert!(
        stdout(&o).contains(&format!("could not move {p}: job {p} is pinned")),
        "drain names the job and why: {}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("1 job could not move off node1"),
        "{}",
        stderr(&o)
    );
    let rec = cl.record(&p);
    assert_eq!(rec.node.as_str(), "node1");
    assert_eq!(rec.state, JobState::Running, "left running");
    assert!(rec.history.is_empty());
    // Unpinned, it moves again (to an open node).
    let o = cl.mosctl(&["unpin", &p]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cl.mosctl(&["migrate", &p, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cl.record(&p).node.as_str(), "node2");
}

#[test]
fn a_blocked_node_gets_nothing_from_placement_balancer_or_migrate_even_after_a_restart() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, &[]);
    // Clear refusals of bad input.
    let o = cl.mosctl(&["block", "node9"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("node9"), "{}", stderr(&o));
    for bad in ["0", "-1", "nan", "fast"] {
        let o = cl.mosctl(&["setspeed", "node3", bad]);
        assert!(!o.status.success(), "speed {bad} accepted");
    }

    let burners: Vec<String> = (0..4)
        .map(|_| cl.mosrun(&["--node", "node1", "--", MOSJOB, "burn"]))
        .collect();
    let o = cl.mosctl(&["block", "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cl.mosctl(&["setspeed", "node3", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("node3: speed 2"), "{}", stdout(&o));

    // Both settings outlive an agent restart.
    cl.restart_agent("node2", &[]);
    cl.restart_agent("node3", &[]);
    cl.wait_for("node2 back, still blocked", 20, || {
        load_line(&cl, "node2").ends_with("BLOCKED")
    });
    let cap = |n: &str| -> f64 {
        load_line(&cl, n)
            .split_whitespace()
            .nth(2)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0)
    };
    // Read until both answer in one round (a busy machine can make one
    // miss a `load` round); a speed that did not survive never matches.
    let mut caps = (0.0, 0.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        caps = (cap("node1"), cap("node3"));
        if caps.0 > 0.0 && (caps.1 - 2.0 * caps.0).abs() < 0.05 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let (c1, c3) = caps;
    assert!(
        (c3 - 2.0 * c1).abs() < 0.05,
        "node3's speed 2 survived its restart: capacity {c3} vs node1's {c1}"
    );

    // A migration to it is refused, naming the block; the job stays put.
    let o = cl.mosctl(&["migrate", &burners[0], "node2"]);
    assert!(!o.status.success(), "migrated onto a blocked node");
    assert!(
        stderr(&o).contains("node2 is blocked (mosctl unblock node2 to allow jobs in)")
            && stderr(&o).contains("FailedPrecondition"),
        "{}",
        stderr(&o)
    );
    assert_eq!(cl.record(&burners[0]).node.as_str(), "node1");
    assert!(cl.record(&burners[0]).history.is_empty());

    // Placement: detached (the balancer's rule) and foreground (the slot
    // table) never pick it, though it is the emptiest node by name order.
    for _ in 0..2 {
        let j = cl.mosrun(&["--best", "--", MOSJOB, "counter", "--port", "0"]);
        assert_ne!(cl.record(&j).node.as_str(), "node2", "-d --best chose it");
    }
    let dir = std::env::temp_dir().join(format!("mosix-admin-{}", cl.name));
    std::fs::create_dir_all(&dir).unwrap();
    let kids: Vec<_> = (0..6)
        .map(|i| {
            Command::new(MOSRUN)
                .args(["-n", "--best", "--", "sleep", "0.3"])
                .env("MOSIX_CLUSTER", &cl.file)
                .env("MOSIX_RUN_STATS", dir.join(format!("{i}.stats")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "run {i}: {}", stderr(&o));
        let stats = std::fs::read_to_string(dir.join(format!("{i}.stats"))).unwrap();
        assert!(!stats.contains("node=node2 "), "placed on node2: {stats}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let o = Command::new(MOSRUN)
        .args(["-n", "--node", "node2", "--", "true"])
        .env("MOSIX_CLUSTER", &cl.file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "mosrun --node node2 ran on a blocked node"
    );
    assert!(stderr(&o).contains("node2 is blocked"), "{}", stderr(&o));

    // The balancer spreads node1's burners, but never onto node2.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..2 {
        let o = run(MOSBALANCE, &["--min-residence", "0"], Some(&cl));
        assert!(o.status.success(), "{}", stderr(&o));
        std::thread::sleep(Duration::from_secs(1));
    }
    let nodes: Vec<String> = burners
        .iter()
        .map(|j| cl.record(j).node.to_string())
        .collect();
    assert!(
        nodes.iter().all(|n| n != "node2"),
        "the balancer moved a job to the blocked node: {nodes:?}"
    );
    assert!(
        nodes.iter().any(|n| n == "node3"),
        "the balancer did move load (to node3): {nodes:?}"
    );

    // Unblocked, it takes migrations again.
    let o = cl.mosctl(&["unblock", "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = burners
        .iter()
        .find(|j| cl.record(j).node.as_str() == "node1")
        .unwrap_or(&burners[0]);
    let o = cl.mosctl(&["migrate", j, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cl.record(j).node.as_str(), "node2");
}
