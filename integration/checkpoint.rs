//! Checkpoints and restarts from them (issue 16, part A): a job with
//! `--checkpoint-every` survives the death of its node; a job without a
//! checkpoint is reported lost; bad input and a full disk are refused
//! cleanly, with no job half-restored.

use crate::support::*;
use std::path::{Path, PathBuf};

use std::time::Duration;

fn last_seq(cl: &Cluster, job: &str) -> u64 {
    cl.record(job).checkpoint.map(|c| c.last_seq).unwrap_or(0)
}

fn checkpoint_dirs(cl: &Cluster, job: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(cl.shared.join("checkpoints").join(job))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The job's port answers on `node`: it runs there. A job with its own
/// address (the default) answers at it wherever it runs, so the record must
/// also place it on `node`; one in its node's network answers at `node`'s.
fn answers(cl: &Cluster, job: &str, node: &str, port: u16) -> Option<u64> {
    let rec = cl.record(job);
    let ip = match &rec.net {
        Some(n) if rec.node.as_str() == node => n.ip.to_string(),
        Some(_) => return None,
        None => cl.node_ip(node),
    };
    query_counter(&ip, port).map(|(n, ok)| {
        assert!(ok, "memory checksum broken");
        n
    })
}

#[test]
fn node_death_restarts_checkpointed_job_and_reports_the_other_lost() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, &[]);
    let file = cl.shared.join("ckpt-counter.txt");
    let other = cl.shared.join("plain-counter.txt");
    let job = counter(
        &cl,
        "node1",
        "8131",
        &file,
        &["--checkpoint-every", "2s", "--checkpoint-keep", "2"],
        &[],
    );
    let plain = counter(&cl, "node1", "8132", &other, &[], &[]);
    cl.wait_for("two periodic checkpoints", 40, || last_seq(&cl, &job) >= 2);
    let rec = cl.record(&job);
    let st = rec.checkpoint.clone().unwrap();
    assert_eq!((st.every_ms, st.keep), (2000, 2));
    assert!(st.mode.starts_with("full"), "{st:?}");
    assert!(st.last_error.is_empty(), "{st:?}");
    // Keep the last 2: never more than that on disk.
    cl.wait_for("a third checkpoint", 20, || last_seq(&cl, &job) >= 3);
    let dirs = checkpoint_dirs(&cl, &job);
    assert!(
        dirs.iter().filter(|d| d.parse::<u64>().is_ok()).count() <= 2,
        "{dirs:?}"
    );
    let show = stdout(&cl.mosctl(&["show", &job]));
    assert!(show.contains("ckpt") && show.contains("keep 2"), "{show}");

    // Both have their own address (the default on a local cluster).
    let net_before = cl.record(&job).net;
    assert!(net_before.is_some() && cl.record(&plain).net.is_some());

    // The node dies: every process of it, agent included.
    std::thread::sleep(Duration::from_millis(800));
    assert!(cl.kill_node_processes("node1") > 0);
    let ticks_at_death = ticks(&file).len();
    let seq_before = last_seq(&cl, &job);

    let o = cl.mosctl(&["restore", "--node-is-down", "node1"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains(&format!("{job}: restarted on")), "{out}");
    assert!(out.contains(&format!("{plain}: LOST")), "{out}");
    assert!(
        out.contains("1 restarted, 1 lost, 0 not restarted"),
        "{out}"
    );

    // The checkpointed job runs again elsewhere, from its last checkpoint.
    let rec = cl.record(&job);
    assert_eq!(rec.state, mosix::core::JobState::Running);
    assert_ne!(rec.node.as_str(), "node1");
    let m = rec.history.last().unwrap();
    assert!(
        m.restored_from_checkpoint >= seq_before && m.from.as_str() == "node1",
        "{m:?}"
    );
    assert_eq!(rec.net, net_before, "restarted with the same address");
    let node = rec.node.to_string();
    cl.wait_for("the counter to go on", 20, || {
        ticks(&file).len() > ticks_at_death + 5
    });
    // No gap and no repeat: the file was put back as it was at the
    // checkpoint, and the counter went on from the checkpoint's value.
    assert_contiguous(&ticks(&file));
    let n = answers(&cl, &job, &node, 8131).expect("the restored job answers on its new node");
    assert!(n as usize >= ticks_at_death, "{n} < {ticks_at_death}");
    let show = stdout(&cl.mosctl(&["show", &job]));
    assert!(
        show.contains(&format!("restart  node1 -> {node}  from checkpoint")),
        "{show}"
    );

    // The uncheckpointed job is reported lost, clearly.
    let lost = cl.record(&plain);
    assert_eq!(lost.state, mosix::core::JobState::Failed);
    assert!(
        lost.error.starts_with("lost:") && lost.error.contains("no checkpoint"),
        "{}",
        lost.error
    );
    let lost_ip = lost.net.as_ref().expect("its address is still recorded").ip;
    let claim = std::path::PathBuf::from(format!("/run/mosix/{}/jobnet/addrs/{lost_ip}", cl.name));
    assert!(
        !claim.exists(),
        "the lost job's address went back to the pool"
    );

    // The interval went with the job: its new node checkpoints it.
    let restored_from = m.restored_from_checkpoint;
    cl.wait_for("a checkpoint on the new node", 20, || {
        last_seq(&cl, &job) > restored_from
    });
    // Now it runs: a plain restore is refused, and changes nothing.
    let o = cl.mosctl(&["restore", &job]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("still running"), "{}", stderr(&o));
    assert_eq!(cl.record(&job).node.as_str(), node);
    assert_contiguous(&ticks(&file));
}

#[test]
fn tampered_missing_and_unknown_checkpoints_are_refused_and_nothing_runs() {
    if !privileged() {
        return;
    }
    // Bad durations and a foreground job with a checkpoint interval.
    for (args, why) in [
        (
            vec!["-d", "--checkpoint-every", "5x", "--", "true"],
            "unknown unit",
        ),
        (
            vec!["-d", "--checkpoint-every", "30", "--", "true"],
            "unit is needed",
        ),
        (
            vec!["-d", "--checkpoint-every", "10ms", "--", "true"],
            "too short",
        ),
        (vec!["--checkpoint-every", "30s", "--", "true"], "--detach"),
    ] {
        let o = run(MOSRUN, &args, None);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }
    let cl = Cluster::up(2, &[]);
    let file = cl.shared.join("tamper-counter.txt");
    let job = counter(&cl, "node1", "8133", &file, &[], &[]);
    for want in ["checkpoint 1 of", "checkpoint 2 of"] {
        let o = cl.mosctl(&["checkpoint", &job]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains(want), "{}", stdout(&o));
    }
    let o = cl.mosctl(&["checkpoint", "jnosuchjob"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("jnosuchjob"), "{}", stderr(&o));

    assert!(cl.kill_node_processes("node1") > 0);
    let before = cl.record(&job);

    // Unknown job, missing checkpoint.
    let o = cl.mosctl(&["restore", "jnosuchjob", "--node-is-down", "node1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("jnosuchjob"), "{}", stderr(&o));
    let o = cl.mosctl(&[
        "restore",
        &job,
        "--checkpoint",
        "99",
        "--node-is-down",
        "node1",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("no checkpoint 99") && e.contains("1, 2") && e.contains("NotFound"),
        "{e}"
    );

    // A flipped byte in the latest checkpoint's memory: refused, the job
    // never runs from it, the record is unchanged.
    let ck = cl.shared.join("checkpoints").join(&job).join("2");
    let pages = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages image");
    flip_byte(&pages);
    let o = cl.mosctl(&["restore", &job, "--node-is-down", "node1"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("DataLoss") || e.contains("refused"), "{e}");
    let after = cl.record(&job);
    assert_eq!(
        (after.node.clone(), after.state),
        (before.node.clone(), before.state)
    );
    assert!(
        query_counter(&cl.job_ip(&job), 8133).is_none()
            && query_counter(&cl.node_ip("node2"), 8133).is_none(),
        "a refused restore left the job running"
    );
    // A tampered metadata file (the output files' list) is refused too.
    let meta = cl
        .shared
        .join("checkpoints")
        .join(&job)
        .join("1")
        .join("CHECKPOINT.json");
    let m = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, m.replace("\"mode\"", " \"mode\"")).unwrap();
    let o = cl.mosctl(&[
        "restore",
        &job,
        "--checkpoint",
        "1",
        "--node-is-down",
        "node1",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("DataLoss"), "{}", stderr(&o));
    std::fs::write(&meta, m).unwrap();
    assert_eq!(cl.record(&job).node, before.node);

    // The intact checkpoint 1 restores.
    let o = cl.mosctl(&[
        "restore",
        &job,
        "--checkpoint",
        "1",
        "--node-is-down",
        "node1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("from checkpoint 1"), "{}", stdout(&o));
    let n0 = ticks(&file).len();
    cl.wait_for("the counter to go on", 20, || ticks(&file).len() > n0 + 3);
    assert_contiguous(&ticks(&file));
    assert!(answers(&cl, &job, "node2", 8133).is_some());
    // No staged image is left behind (the refused restores keep their
    // restore.log for a person, as failed migrations do).
    cl.wait_for("staged images removed", 10, || {
        img_files(&cl.shared.join("images").join(&job)).is_empty()
    });
}

/// CRIU image files (`*.img`) anywhere under `dir`.
fn img_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "img") {
                out.push(p);
            }
        }
    }
    out
}

fn flip_byte(p: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let at = len / 2;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}

#[test]
fn full_disk_during_a_checkpoint_keeps_the_previous_latest_and_the_job() {
    if !privileged() {
        return;
    }
    let disk = small_disk("ckpt-tmpfs", "24m");
    let (mnt, shared, common) = (&disk.mnt, &disk.shared, &disk.common);
    let cl = Cluster::up(
        2,
        &[
            "--shared",
            shared.to_str().unwrap(),
            "--common",
            common.to_str().unwrap(),
        ],
    );
    let file = common.join("full-counter.txt");
    let job = counter(&cl, "node1", "8134", &file, &[], &[]);
    let o = cl.mosctl(&["checkpoint", &job]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Fill the disk.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let buf = vec![0x5au8; 1 << 20];
        while f.write_all(&buf).is_ok() {}
        let _ = f.sync_all();
    }
    let o = cl.mosctl(&["checkpoint", &job]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("ResourceExhausted") || e.contains("No space left"),
        "{e}"
    );
    assert!(e.contains("latest checkpoint is still checkpoint 1"), "{e}");
    // Checkpoint 1 is still the latest; nothing half-written is left (a
    // failed attempt keeps only CRIU's log, until the next attempt).
    let dirs = checkpoint_dirs(&cl, &job);
    assert_eq!(
        dirs.iter()
            .filter(|d| !d.starts_with('.'))
            .collect::<Vec<_>>(),
        vec!["1"],
        "{dirs:?}"
    );
    for d in dirs.iter().filter(|d| d.starts_with(".tmp-")) {
        let left = img_files(&cl.shared.join("checkpoints").join(&job).join(d));
        assert!(left.is_empty(), "{left:?}");
    }
    // The job runs on, where it was.
    let n = ticks(&file).len();
    cl.wait_for("the counter to go on", 10, || ticks(&file).len() > n + 3);
    assert!(answers(&cl, &job, "node1", 8134).is_some());
    assert_eq!(cl.record(&job).state, mosix::core::JobState::Running);
    // Room again: the next checkpoint is 2.
    std::fs::remove_file(&filler).unwrap();
    let o = cl.mosctl(&["checkpoint", &job]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("checkpoint 2 of"), "{}", stdout(&o));
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_interval_survives_a_migration_and_a_clean_exit_removes_the_checkpoints() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let file = cl.shared.join("moving-counter.txt");
    let job = counter(
        &cl,
        "node1",
        "8135",
        &file,
        &["--checkpoint-every", "1s"],
        &[],
    );
    cl.wait_for("a checkpoint on node1", 20, || last_seq(&cl, &job) >= 1);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The new node goes on checkpointing it (the metadata names the node).
    let meta_node = |seq: u64| -> Option<String> {
        let p = cl
            .shared
            .join("checkpoints")
            .join(&job)
            .join(seq.to_string())
            .join("CHECKPOINT.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        v["node"].as_str().map(str::to_string)
    };
    cl.wait_for("a checkpoint taken on node2", 20, || {
        meta_node(last_seq(&cl, &job)).as_deref() == Some("node2")
    });
    assert_eq!(cl.record(&job).checkpoint.unwrap().every_ms, 1000);

    // A job that ends with code 0 leaves no checkpoint behind.
    let t = cl.mosrun(&[
        "--node",
        "node1",
        "--",
        MOSJOB,
        "tree",
        "--children",
        "1",
        "--seconds",
        "4",
        "--exit-code",
        "0",
    ]);
    let o = cl.mosctl(&["checkpoint", &t]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = cl.shared.join("checkpoints").join(&t);
    assert!(dir.join("1").is_dir());
    cl.wait_for("the tree to exit", 20, || {
        cl.record(&t).state == mosix::core::JobState::Exited
    });
    assert_eq!(cl.record(&t).exit_code, Some(0));
    cl.wait_for("its checkpoints removed", 10, || !dir.exists());
}
