//! Issue 17 (out of a crowded node): a node's jobs run in a child cgroup of
//! the node's, `<node>/jobs`, below the agent and its CRIU workers (see
//! `mosix::core::cgroup`). A launched job is in its node's jobs group, a
//! migrated job is in its *target's* jobs group (not the agent's level,
//! where CRIU's restore would leave it), and `local down` removes the
//! nested groups too.

use crate::support::*;
use std::path::Path;

/// The cpu cgroup of every process of the tree rooted at `root`.
fn tree_cgroups(root: i32) -> Vec<(i32, String)> {
    mosix::core::procfs::tree_pids(root)
        .into_iter()
        .map(|p| {
            (
                p,
                mosix::core::cgroup::cpu_cgroup_of(p).unwrap_or_else(|| "?".into()),
            )
        })
        .collect()
}

fn assert_tree_in(cl: &Cluster, job: &str, node: &str) {
    let want = format!("/mosix/{}/{node}/jobs", cl.name);
    let rec = cl.record(job);
    assert_eq!(rec.node.as_str(), node);
    let cgs = tree_cgroups(rec.pid);
    assert!(
        cgs.len() >= 4,
        "init, the command and its two children: {cgs:?}"
    );
    assert!(
        cgs.iter().all(|(_, cg)| *cg == want),
        "every process of {job} in {want}: {cgs:?}"
    );
}

/// A move off a capped node squeezes its other jobs (a quota of their own)
/// until it ends; once `mosctl migrate` has answered, no jobs group may be
/// left with one.
fn assert_not_squeezed(cluster: &str) {
    for node in ["node1", "node2"] {
        let q = format!("/sys/fs/cgroup/cpu/mosix/{cluster}/{node}/jobs/cpu.cfs_quota_us");
        let quota = std::fs::read_to_string(&q).unwrap();
        assert_eq!(quota.trim(), "-1", "{q}: still squeezed after the move");
    }
}

#[test]
fn jobs_run_in_their_nodes_jobs_cgroup_across_migrations() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &["--cpu-caps", "0.5"]);
    let name = cl.name.clone();
    // The agents stay at the node's own level, above the jobs.
    let agents = std::fs::read_to_string(format!("/run/mosix/{name}/agents.pids")).unwrap();
    for (i, pid) in agents.split_whitespace().enumerate() {
        let pid: i32 = pid.parse().unwrap();
        assert_eq!(
            mosix::core::cgroup::cpu_cgroup_of(pid).as_deref(),
            Some(format!("/mosix/{name}/node{}", i + 1).as_str()),
            "agent {pid}"
        );
    }
    // The agents turned on cgroup2's favordynmods (where there is a cgroup2
    // mount), so that the jobs group's cgroup.procs writes in every move
    // wait for no RCU grace period.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let cg2 = mosix::core::cgroup::cgroup2_mounts(&info);
    if cg2.is_empty() {
        eprintln!("SKIP (favordynmods part): no cgroup2 mount on this host");
    } else {
        assert!(cg2.iter().any(|(_, on)| *on), "no favordynmods: {cg2:?}");
    }
    for node in ["node1", "node2"] {
        let jobs = format!("/sys/fs/cgroup/cpu/mosix/{name}/{node}/jobs");
        let shares = std::fs::read_to_string(format!("{jobs}/cpu.shares")).unwrap();
        assert_eq!(shares.trim(), "2", "{jobs}");
    }

    let job = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "tree",
        "--children",
        "2",
        "--seconds",
        "120",
    ]);
    cl.wait_for("the job's tree to start", 10, || {
        tree_cgroups(cl.record(&job).pid).len() >= 4
    });
    assert_tree_in(&cl, &job, "node1");

    // Restored on node2 by node2's CRIU worker (which sits at node2's own
    // level): the tree must end up in node2's jobs group.
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_tree_in(&cl, &job, "node2");
    assert_not_squeezed(&name);
    // And back: node1's jobs group again, not where the dump lifted it.
    let o = cl.mosctl(&["migrate", &job, "node1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_tree_in(&cl, &job, "node1");
    assert_not_squeezed(&name);

    // `local down` removes the nested groups too, children first.
    let o = run(MOSCTL, &["local", "down", "--name", &name], None);
    assert!(o.status.success(), "{}", stderr(&o));
    for c in ["cpu", "cpuacct"] {
        let base = format!("/sys/fs/cgroup/{c}/mosix/{name}");
        assert!(!Path::new(&base).exists(), "{base} survived local down");
    }
}
