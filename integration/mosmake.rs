//! `mosmake` end to end: a generated C project (a few dozen files, a plain
//! Makefile) built over a real local cluster, compared byte for byte with a
//! local `make` of the same tree at the same path (debug info embeds paths).

use crate::support::{self, privileged, stderr, Cluster};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MOSMAKE: &str = env!("CARGO_BIN_EXE_mosmake");

/// Write a C project: `files` modules in `src/`, four headers, `main.c`, and
/// a Makefile with automatic dependencies. `weight` scales each module's
/// code (and so its compile time).
fn gen_project(dir: &Path, files: usize, weight: usize) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join("include")).unwrap();
    for h in 0..4 {
        std::fs::write(
            dir.join(format!("include/part{h}.h")),
            format!(
                "#pragma once\n#define PART{h}_SALT {}\nint part{h}_mix(int x);\n",
                h * 7 + 3
            ),
        )
        .unwrap();
    }
    let mut main = String::from("#include <stdio.h>\n");
    for i in 0..files {
        let h = i % 4;
        let mut src = format!("#include \"part{h}.h\"\n");
        for f in 0..weight {
            src.push_str(&format!(
                "static int w{i}_{f}(int x) {{\n  int a = x;\n  for (int k = 0; k < {n}; k++) {{\n    switch ((a + k) % 5) {{\n      case 0: a = a * 3 + {f}; break;\n      case 1: a ^= a << 3; break;\n      case 2: a -= k * {i}; break;\n      case 3: a = (a >> 1) + PART{h}_SALT; break;\n      default: a += {f} * k;\n    }}\n  }}\n  return a;\n}}\n",
                n = 10 + f
            ));
        }
        src.push_str(&format!("int mod{i}(int x) {{\n  int s = 0;\n"));
        for f in 0..weight {
            src.push_str(&format!("  s += w{i}_{f}(x + {f});\n"));
        }
        src.push_str("  return s;\n}\n");
        if i < 4 {
            src.push_str(&format!(
                "int part{i}_mix(int x) {{ return x * {}; }}\n",
                i + 2
            ));
        }
        std::fs::write(dir.join(format!("src/mod{i}.c")), src).unwrap();
        main.push_str(&format!("int mod{i}(int);\n"));
    }
    main.push_str("int main(void) {\n  long s = 0;\n");
    for i in 0..files {
        main.push_str(&format!("  s += mod{i}({i});\n"));
    }
    main.push_str("  printf(\"sum %ld\\n\", s);\n  return 0;\n}\n");
    std::fs::write(dir.join("src/main.c"), main).unwrap();
    std::fs::write(
        dir.join("Makefile"),
        "CC = cc\nCFLAGS = -O2 -g -Wall -Iinclude\nSRCS = $(sort $(wildcard src/*.c))\n\
         OBJS = $(SRCS:src/%.c=obj/%.o)\nCCVER := $(shell $(CC) --version | head -1)\n\n\
         prog: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n\n\
         obj/%.o: src/%.c | obj\n\t$(CC) $(CFLAGS) -MMD -MP -c -o $@ $<\n\n\
         obj:\n\tmkdir -p obj\n\n\
         clean:\n\trm -rf obj prog\n\n-include $(OBJS:.o=.d)\n",
    )
    .unwrap();
}

/// The build's outputs (objects and the program), by name.
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir.join("obj")).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".o") {
            m.insert(n, std::fs::read(e.path()).unwrap());
        }
    }
    m.insert("prog".into(), std::fs::read(dir.join("prog")).unwrap());
    m
}

struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A process group of our own, killed as a whole by the guard (also on
/// panic), so a hung build never outlives the test.
struct Group(i32);
impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// `mosmake ARGS` in `dir`, inside `node`'s network namespace (so mosrun's
/// home agent is that node's), with a deadline.
fn mosmake_cmd(
    cl: &Cluster,
    node: &str,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", cl.netns(node)))
        .arg(MOSMAKE)
        .args(args)
        .current_dir(dir)
        .env("MOSIX_CLUSTER", &cl.file)
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run_with_deadline(mut c: Command, out_dir: &Path, tag: &str, secs: u64) -> Finished {
    let so = out_dir.join(format!("{tag}.stdout"));
    let se = out_dir.join(format!("{tag}.stderr"));
    c.stdin(Stdio::null())
        .stdout(std::fs::File::create(&so).unwrap())
        .stderr(std::fs::File::create(&se).unwrap())
        .process_group(0);
    let mut child = c.spawn().expect("spawning");
    let _group = Group(child.id() as i32);
    let status = support::wait_timeout(&mut child, secs);
    let f = Finished {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&so).unwrap_or_default(),
        stderr: std::fs::read_to_string(&se).unwrap_or_default(),
    };
    eprintln!("--- {tag}: exit {:?}\n{}{}", f.code, f.stdout, f.stderr);
    assert!(status.is_some(), "{tag}: no exit within {secs} s (hung)");
    f
}

fn local_make(dir: &Path, args: &[&str]) -> std::process::Output {
    let o = Command::new("make")
        .args(args)
        .current_dir(dir)
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .output()
        .unwrap();
    eprintln!(
        "--- local make {args:?}: {:?}\n{}",
        o.status.code(),
        stderr(&o)
    );
    o
}

fn stat_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn nodes_in(lines: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        let s = mosix::mosmake::stats::RunStat::parse(l).unwrap();
        *m.entry(s.node).or_insert(0) += 1;
    }
    m
}

/// Objects equal a local build's; a second run rebuilds nothing; the jobs
/// ran on more than one node; a compile error is make's, with no hang.
#[test]
fn mosmake_builds_a_c_project_over_three_nodes() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, &[]);
    let dir = cl.shared.join("cproj");
    gen_project(&dir, 30, 6);

    let o = local_make(&dir, &["-j2"]);
    assert!(o.status.success());
    let local = outputs(&dir);
    assert_eq!(local.len(), 32);
    assert!(local_make(&dir, &["clean"]).status.success());

    let stats = cl.shared.join("cproj.stats");
    let stats_s = stats.to_string_lossy().into_owned();
    let env = [("MOSMAKE_STATS", stats_s.as_str())];
    // No -j: mosmake picks it from the cluster's slots.
    let f = run_with_deadline(
        mosmake_cmd(&cl, "node1", &dir, &[], &env),
        &cl.shared,
        "first",
        240,
    );
    assert_eq!(f.code, Some(0));
    assert!(
        f.stderr.contains("(the cluster's total slots)"),
        "no -j chosen from slots"
    );
    assert!(f.stderr.contains("mosmake: jobs per node: "));
    assert!(f.stderr.contains("per-start overhead: p50 "));
    let lines = stat_lines(&stats);
    assert_eq!(
        lines.len(),
        31,
        "one mosrun per compile (30 modules + main)"
    );
    let per_node = nodes_in(&lines);
    assert!(
        per_node.len() >= 2,
        "all compiles ran on one node: {per_node:?}"
    );
    let remote = outputs(&dir);
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        remote.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &local {
        assert!(
            remote[name] == *bytes,
            "{name} differs from the local build's"
        );
    }

    // Nothing to do: no compile, no new stats line, objects untouched.
    let mtime = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = mtime(dir.join("obj/mod0.o"));
    let f = run_with_deadline(
        mosmake_cmd(&cl, "node1", &dir, &["-j4"], &env),
        &cl.shared,
        "second",
        60,
    );
    assert_eq!(f.code, Some(0));
    assert!(f.stdout.contains("is up to date"), "make rebuilt something");
    assert!(f.stderr.contains(" 0 compile line(s) sent through mosrun"));
    assert_eq!(stat_lines(&stats).len(), 31);
    assert_eq!(mtime(dir.join("obj/mod0.o")), before);

    // A compile error: the compiler's message and make's exit status, as a
    // local make of the same tree gives them.
    std::fs::write(dir.join("src/mod7.c"), "int broken( { return }\n").unwrap();
    let o = local_make(&dir, &["-j4"]);
    let local_code = o.status.code();
    assert_eq!(local_code, Some(2));
    let local_err = stderr(&o);
    let compiler_msg = local_err
        .lines()
        .find(|l| l.contains("error:"))
        .expect("the compiler's error line")
        .to_string();
    let f = run_with_deadline(
        mosmake_cmd(&cl, "node1", &dir, &["-j4"], &env),
        &cl.shared,
        "broken",
        60,
    );
    assert_eq!(f.code, local_code, "mosmake's status is not make's");
    assert!(
        f.stderr.contains(&compiler_msg),
        "the compiler's message is missing"
    );
    assert!(f.stderr.contains("obj/mod7.o] Error 1"));
}

/// A node dies while compiles run on it: the build still completes, and
/// the re-run is reported.
#[test]
fn mosmake_finishes_when_a_node_is_lost_mid_build() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(3, &[]);
    let dir = cl.shared.join("slowproj");
    // Heavier modules (about a second of compiling each) so compiles are
    // running on node3 when it dies.
    gen_project(&dir, 16, 40);
    let stats = cl.shared.join("slow.stats");
    let stats_s = stats.to_string_lossy().into_owned();
    let env = [("MOSMAKE_STATS", stats_s.as_str())];
    let mut c = mosmake_cmd(&cl, "node1", &dir, &["-j6"], &env);
    let so = cl.shared.join("lost.stdout");
    let se = cl.shared.join("lost.stderr");
    c.stdin(Stdio::null())
        .stdout(std::fs::File::create(&so).unwrap())
        .stderr(std::fs::File::create(&se).unwrap())
        .process_group(0);
    let mut child = c.spawn().unwrap();
    let _group = Group(child.id() as i32);

    // Wait for a compiler proper (cc1) running in node3's namespace.
    let netns = cl.netns("node3");
    let compiling_on_node3 = || {
        let o = Command::new("ip")
            .args(["netns", "pids", &netns])
            .output()
            .unwrap();
        support::stdout(&o).lines().any(|p| {
            std::fs::read_to_string(format!("/proc/{}/comm", p.trim()))
                .map(|c| c.trim() == "cc1")
                .unwrap_or(false)
        })
    };
    // Also stop waiting if the build ends first, and then say how it spread
    // (its stderr has the jobs per node), rather than time out blind.
    let mut ended = None;
    cl.wait_for("a compile running on node3", 180, || {
        ended = child.try_wait().unwrap();
        ended.is_some() || compiling_on_node3()
    });
    if let Some(status) = ended {
        panic!(
            "the build ended ({status:?}) before a compile was seen on node3:\n{}",
            std::fs::read_to_string(&se).unwrap_or_default()
        );
    }
    let killed = cl.kill_node_processes("node3");
    eprintln!("killed {killed} processes of node3");

    let status = support::wait_timeout(&mut child, 300).expect("the build hung after node3 died");
    let out = std::fs::read_to_string(&se).unwrap_or_default();
    eprintln!("--- mosmake: {status:?}\n{out}");
    assert_eq!(status.code(), Some(0), "the build did not complete");
    assert!(dir.join("prog").exists());
    let lines = stat_lines(&stats);
    assert_eq!(lines.len(), 17, "every compile finished once");
    let reruns: u32 = lines
        .iter()
        .map(|l| mosix::mosmake::stats::RunStat::parse(l).unwrap().reruns)
        .sum();
    assert!(
        reruns >= 1,
        "no compile was re-run, yet one was running on node3"
    );
    assert!(
        out.contains("was re-run"),
        "the re-run is not reported on stderr"
    );
    let per_node = nodes_in(&lines);
    assert!(!per_node.contains_key("node3") || per_node["node3"] < 17);
    let run = Command::new(dir.join("prog")).output().unwrap();
    assert!(support::stdout(&run).starts_with("sum "));
}

/// Bad input: a clear message and status 2, never a panic or a hang.
#[test]
fn mosmake_bad_input() {
    let dir = std::env::temp_dir().join(format!("mosmake-bad-{}", std::process::id()));
    gen_project(&dir, 2, 1);
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    let case = |args: &[&str], env: &[(&str, &str)], want: &str| {
        let mut c = Command::new(MOSMAKE);
        c.args(args)
            .current_dir(&dir)
            .env("MOSIX_CLUSTER", "/nonexistent/cluster.json")
            .env_remove("MAKEFLAGS");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let e = stderr(&o);
        eprintln!("--- mosmake {args:?} {env:?}: {:?}\n{e}", o.status.code());
        assert_eq!(o.status.code(), Some(2), "{args:?} {env:?}");
        assert!(e.contains(want), "{args:?} {env:?}: wanted {want:?}");
        assert!(!e.contains("panicked"));
    };
    case(&[], &[], "choosing -j from the cluster's slots");
    case(&["-j2"], &[("MOSMAKE_RUN", " ")], "MOSMAKE_RUN is empty");
    case(
        &["-j2"],
        &[("MOSMAKE_RUN", "/nonexistent/mosrun --")],
        "cannot find \"/nonexistent/mosrun\"",
    );
    case(
        &["-j2"],
        &[("MOSMAKE_MAKE", "no-such-make")],
        "cannot find \"no-such-make\"",
    );
    // make's own usage error keeps make's message and status.
    case(
        &["-j2", "--no-such-option"],
        &[],
        "unrecognized option '--no-such-option'",
    );
    assert!(!dir.join("obj").exists(), "nothing was built");
}

/// SIGTERM to mosmake stops the whole build: make gets it, each mosrun
/// passes it on, and no compiler is left running on any node.
#[test]
fn mosmake_stopped_leaves_no_compile_behind() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let dir = cl.shared.join("stopproj");
    gen_project(&dir, 12, 150);
    let mut c = mosmake_cmd(&cl, "node1", &dir, &["-j8"], &[]);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cl.shared.join("stop.stderr")).unwrap())
        .process_group(0);
    let mut child = c.spawn().unwrap();
    let _group = Group(child.id() as i32);
    let compilers = || -> Vec<String> {
        cl.node_names()
            .iter()
            .flat_map(|n| {
                let o = Command::new("ip")
                    .args(["netns", "pids", &cl.netns(n)])
                    .output()
                    .unwrap();
                support::stdout(&o)
                    .lines()
                    .filter(|p| {
                        std::fs::read_to_string(format!("/proc/{}/comm", p.trim()))
                            .map(|c| c.trim() == "cc1")
                            .unwrap_or(false)
                    })
                    .map(|p| format!("{n}:{}", p.trim()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    cl.wait_for("compiles running", 90, || !compilers().is_empty());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = support::wait_timeout(&mut child, 60).expect("mosmake did not stop after SIGTERM");
    eprintln!(
        "--- mosmake after SIGTERM: {status:?}\n{}",
        std::fs::read_to_string(cl.shared.join("stop.stderr")).unwrap_or_default()
    );
    assert_ne!(status.code(), Some(0), "a stopped build reported success");
    assert!(!dir.join("prog").exists());
    cl.wait_for("no compiler left on any node", 20, || {
        compilers().is_empty()
    });
}
