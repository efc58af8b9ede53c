//! Issue: a live process migrates between two nodes through mosixd.

use crate::support::*;
use std::time::Duration;

#[test]
fn counter_with_file_and_socket_migrates_a_b_a() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let file = cl.shared.join("counter.txt");
    let job = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "counter",
        "--port",
        "8080",
        "--file",
        file.to_str().unwrap(),
    ]);
    let (ip1, ip2) = (cl.node_ip("node1"), cl.node_ip("node2"));
    cl.wait_for("counter to answer on node1", 10, || {
        query_counter(&ip1, 8080).is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    let (before, ok) = query_counter(&ip1, 8080).unwrap();
    assert!(ok);

    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("frozen"),
        "migrate reports the frozen time"
    );
    // The socket now answers at node2's address, and no longer at node1's.
    let (after, ok) = query_counter(&ip2, 8080).expect("counter answers on node2");
    assert!(ok, "memory checksum intact");
    assert!(
        after >= before,
        "counter continued ({before} -> {after}), not restarted"
    );
    assert!(
        query_counter(&ip1, 8080).is_none(),
        "nothing answers on node1 any more"
    );
    assert_eq!(cl.record(&job).node.as_str(), "node2");
    assert_eq!(cl.job_json(&job)["node"], "node2");
    let o = cl.mosctl(&["jobs"]);
    assert!(stdout(&o)
        .lines()
        .any(|l| l.starts_with(&job) && l.contains("node2") && l.contains("running")));

    std::thread::sleep(Duration::from_millis(500));
    let o = cl.mosctl(&["migrate", &job, "node1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (back, ok) = query_counter(&ip1, 8080).expect("counter answers on node1 again");
    assert!(
        ok && back > before,
        "counter kept counting: {before} -> {after} -> {back}"
    );
    let rec = cl.record(&job);
    assert_eq!(rec.node.as_str(), "node1");
    assert_eq!(rec.history.len(), 2);
    assert!(rec.history.iter().all(|m| m.ok));
    std::thread::sleep(Duration::from_millis(500));
    // The file was appended across both moves without a gap or a restart.
    assert_contiguous(&ticks(&file));
}

#[test]
fn process_tree_with_pipe_migrates_and_exit_status_is_reported() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let job = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "tree",
        "--children",
        "2",
        "--seconds",
        "4",
        "--exit-code",
        "7",
    ]);
    std::thread::sleep(Duration::from_millis(800));
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    cl.wait_for("tree job to exit", 20, || {
        cl.job_json(&job)["state"] == "exited"
    });
    let j = cl.job_json(&job);
    assert_eq!(j["node"], "node2");
    assert_eq!(
        j["exit_code"], 7,
        "exit status of the whole tree, reported on the new node: {j}"
    );
    let out = std::fs::read_to_string(cl.record(&job).stdout_path).unwrap();
    assert!(
        out.contains("children ok=true"),
        "children survived the move: {out}"
    );
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let job = cl.mosrun(&["--node", "node1", "--", MOSJOB, "counter", "--port", "8081"]);
    std::thread::sleep(Duration::from_millis(300));
    let before = cl.record(&job);
    let cases: &[(&[&str], &str)] = &[
        (
            &["migrate", "jdoesnotexist", "node2"],
            "no job jdoesnotexist",
        ),
        (&["migrate", &job, "node9"], "unknown node"),
        (&["migrate", "../../etc/passwd", "node2"], "invalid job id"),
        (&["migrate", "j1/../../x", "node2"], "invalid job id"),
        (&["migrate", "1", "node2"], "not a job managed by mosix"),
        (&["migrate", &job, "node1"], "already on node1"),
        (&["kill", "1"], "not a job managed by mosix"),
        (&["freeze", "../x"], "invalid job id"),
    ];
    for (args, expect) in cases {
        let o = cl.mosctl(args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            stderr(&o).contains(expect),
            "{args:?}: expected {expect:?} in {:?}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "no panic");
    }
    let after = cl.record(&job);
    assert_eq!(after.node, before.node);
    assert_eq!(after.pid, before.pid);
    assert_eq!(after.state, before.state);
    assert!(after.history.is_empty(), "no migration was recorded");
    assert!(
        query_counter(&cl.node_ip("node1"), 8081).is_some(),
        "job still running on node1"
    );
}
