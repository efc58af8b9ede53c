//! Issue: pre-copy where the kernel has it (`criu check --feature
//! mem_dirty_track`), a clean fallback to full copy where it does not.
//!
//! The same test covers both: on a kernel without soft-dirty tracking (the
//! development machine) it asserts the fallback is reported and the job
//! moves intact as a full copy; on one with it, that the job moves
//! pre-copied.

use crate::support::*;
use std::process::Command;
use std::time::Duration;

fn kernel_tracks_dirty_memory() -> bool {
    let criu = mosix::criu::default_criu_path();
    let ok = Command::new(&criu)
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    eprintln!(
        "{} check --feature mem_dirty_track: {}",
        criu.display(),
        if ok {
            "supported: expecting a pre-copied migration"
        } else {
            "not supported: expecting the fallback to full copy"
        }
    );
    ok
}

#[test]
fn pre_copy_migration_moves_a_counter_intact_or_falls_back_to_full_copy() {
    if !privileged() {
        return;
    }
    let tracking = kernel_tracks_dirty_memory();
    let cl = Cluster::up(2, &[]);
    let file = cl.shared.join("counter.txt");
    let job = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "counter",
        "--port",
        "8090",
        "--file",
        file.to_str().unwrap(),
    ]);
    // Its own address (the default), the same on both nodes.
    let ip = cl.job_ip(&job);
    cl.wait_for("counter to answer on node1", 10, || {
        query_counter(&ip, 8090).is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    let (before, ok) = query_counter(&ip, 8090).unwrap();
    assert!(ok);

    let o = cl.mosctl(&["migrate", "--pre-copy", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    if tracking {
        assert!(
            out.contains("(pre-copy: ") && !out.contains("full copy instead"),
            "a pre-copied migration is reported: {out}"
        );
    } else {
        assert!(
            out.contains("full copy instead")
                && out.contains("cannot track dirty memory")
                && out.contains("mem_dirty_track"),
            "the fallback and its reason are reported: {out}"
        );
        assert!(!out.contains("(pre-copy: "), "{out}");
    }

    // Moved intact either way: same counter, memory checksum good, the
    // socket re-bound on node2 only, the file continued without a gap.
    let (after, ok) = query_counter(&ip, 8090).expect("counter answers on node2");
    assert!(ok, "memory checksum intact");
    assert!(after >= before, "counter continued ({before} -> {after})");
    assert!(
        query_counter(&cl.node_ip("node1"), 8090).is_none(),
        "nothing answers at node1's address"
    );
    let rec = cl.record(&job);
    assert_eq!(rec.node.as_str(), "node2");
    assert_eq!(rec.history.len(), 1);
    assert!(rec.history[0].ok);
    // No pre-dump rounds are left behind on the shared path.
    let images = cl.shared.join("images").join(&job);
    cl.wait_for("images to be cleaned up", 10, || {
        std::fs::read_dir(&images).map_or(true, |rd| rd.count() == 0)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_contiguous(&ticks(&file));
}

/// The real engine's pre-dump round (CRIU's command line): without memory
/// tracking it fails cleanly and the process keeps running; with it, the
/// round writes pages and the process keeps running too.
#[test]
fn real_pre_dump_round_never_stops_the_process() {
    use mosix::criu::{CheckpointEngine, PreDumpSpec, RealCriu};
    if !privileged() {
        return;
    }
    let tracking = kernel_tracks_dirty_memory();
    let engine = RealCriu::new(mosix::criu::default_criu_path());
    assert_eq!(engine.features().mem_dirty_track, tracking);
    // A session leader, as mosix jobs are (CRIU refuses other sessions'
    // members without --shell-job).
    let mut child = Command::new("setsid")
        .args(["sleep", "600"])
        .spawn()
        .expect("setsid sleep");
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let round = dir.path().join("pre-1");
    std::fs::create_dir(&round).unwrap();
    let r = engine.pre_dump(&PreDumpSpec {
        pid,
        image_dir: round.clone(),
        prev_images_dir: None,
    });
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the process survived the pre-dump round ({r:?})");
    match r {
        Ok(bytes) => {
            assert!(tracking, "pre-dump succeeded without memory tracking?");
            assert!(bytes > 0, "round 1 writes the process's memory");
        }
        Err(e) => {
            assert!(!tracking, "pre-dump failed although tracking works: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("pre-dump") && msg.contains("Tracking memory is not available"),
                "CRIU's own reason is quoted: {msg}"
            );
        }
    }
}
