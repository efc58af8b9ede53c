//! Issue 15: the Debian package, end to end. Build it (`scripts/package.sh
//! --debug`: the test's own debug binaries, stripped, to spare a release
//! build), install it with apt, check its units with `systemd-analyze
//! verify`, join two nodes to a cluster the way README's walkthrough does
//! (`mosctl certs` once, then each agent from the unit's own command line and
//! the installed config), see the usual joining mistakes refused with a
//! sentence that names them, migrate a job between the nodes, then `apt-get
//! purge` and compare listings of /usr, /etc and /var taken before the
//! install and after the purge.
//!
//! PID 1 here is not systemd, so the units' `ExecStart` lines are run by
//! hand, each node in its own network namespace on a bridge of the test's
//! own (10.79.K.0/24, names `pk<id>…`).
//!
//! What the listing leaves out, and why: apt's and dpkg's own bookkeeping
//! (/var/lib/dpkg, /var/lib/apt, /var/cache/apt, /var/log/apt,
//! /var/log/dpkg.log, /var/log/alternatives.log), debconf's cache
//! (/var/cache/debconf: apt rewrites it on every run), man-db's index
//! (/var/cache/man: its trigger runs for any package with man pages), and
//! /var/tmp (scratch space of every other process on the machine). An entry
//! is its path, type, mode, owner and, for a regular file, size.

use crate::support::*;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LISTING_SKIP: &[&str] = &[
    "/var/lib/dpkg",
    "/var/lib/apt",
    "/var/cache/apt",
    "/var/log/apt",
    "/var/log/dpkg.log",
    "/var/log/alternatives.log",
    "/var/cache/debconf",
    "/var/cache/man",
    "/var/tmp",
];

fn listing() -> BTreeSet<String> {
    fn walk(p: &Path, out: &mut BTreeSet<String>) {
        if LISTING_SKIP.iter().any(|s| p == Path::new(s)) {
            return;
        }
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return;
        };
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "d"
        } else if ft.is_symlink() {
            "l"
        } else if ft.is_file() {
            "f"
        } else {
            "o"
        };
        let size = if ft.is_file() {
            m.len().to_string()
        } else {
            String::new()
        };
        out.insert(format!(
            "{} {kind} {:o} {}:{} {size}",
            p.display(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        ));
        if ft.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for root in ["/usr", "/etc", "/var"] {
        walk(Path::new(root), &mut out);
    }
    out
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    eprintln!(
        "$ {cmd} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = sh(cmd, args);
    assert!(o.status.success(), "{cmd} {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// Everything the test made outside the package: agents, namespaces, links;
/// and the package itself if the test failed before purging it.
struct Guard {
    id: String,
    agents: Vec<Child>,
    installed: bool,
}

impl Guard {
    fn netns(&self, i: usize) -> String {
        format!("pk{}n{i}", self.id)
    }
    fn stop_agents(&mut self) {
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.agents.clear();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_agents();
        for i in 1..=2 {
            let ns = self.netns(i);
            // Jobs left in the namespace (a failed test) die with it.
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = p.parse::<i32>() {
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("pk{}h{i}", self.id)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("pk{}br", self.id)])
            .status();
        let _ = std::fs::remove_file(format!("/run/mosix/pk{}-node2.sock", self.id));
        if self.installed {
            let _ = Command::new("apt-get")
                .args([
                    "purge",
                    "-y",
                    "-q",
                    "-o",
                    "DPkg::Lock::Timeout=120",
                    "mosix",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    }
}

fn exec_start(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart in {unit}"));
    line.split_whitespace().map(str::to_string).collect()
}

/// Start an agent from the unit's command line (plus per-node flags) in a
/// network namespace; its output goes to `log`.
fn start_agent(ns: &str, argv: &[String], extra: &[&str], log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .args(argv)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap()
}

/// Run an agent that must refuse to start; its stderr.
fn refused(ns: &str, argv: &[String], extra: &[&str]) -> String {
    let mut c = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .args(argv)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut s = String::new();
            use std::io::Read;
            c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
            eprintln!("mosixd {extra:?} refused ({st}): {s}");
            assert!(!st.success());
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("mosixd {extra:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mosctl(args: &[&str]) -> Output {
    let mut a = vec!["--cluster", "/etc/mosix/cluster.json"];
    a.extend_from_slice(args);
    sh("/usr/bin/mosctl", &a)
}

#[test]
fn package_installs_joins_two_nodes_migrates_and_purges() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    for tool in ["dpkg-deb", "apt-get", "nsenter", "ip"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .status
                .success(),
            "{tool} is needed"
        );
    }
    let st = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "mosix"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&st.stdout).contains("installed"),
        "the mosix package is already installed here; purge it first (apt-get purge mosix)"
    );
    assert!(
        !Path::new("/var/lib/mosix").exists() && !Path::new("/etc/mosix").exists(),
        "/var/lib/mosix or /etc/mosix exists before the install"
    );

    // Build the package from the test's own (debug) binaries.
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = ok(
        "bash",
        &[
            root.join("scripts/package.sh").to_str().unwrap(),
            "--debug",
            "--no-build",
            "--out",
            work.path().to_str().unwrap(),
        ],
    );
    let deb = PathBuf::from(out.lines().last().unwrap().trim());
    assert!(deb.is_file(), "package.sh printed {deb:?}");
    let contents = ok("dpkg-deb", &["--contents", deb.to_str().unwrap()]);
    for f in [
        "./usr/bin/mosixd",
        "./usr/bin/mosctl",
        "./usr/bin/mos-balance",
        "./usr/lib/mosix/criu",
        "./lib/systemd/system/mosixd.service",
        "./lib/systemd/system/mos-balance.service",
        "./etc/mosix/mosixd.toml",
        "./usr/share/man/man1/mosctl.1.gz",
    ] {
        assert!(contents.contains(f), "the package holds {f}");
    }
    eprintln!("package built after {:?}", t0.elapsed());

    let before = listing();
    let id = format!("{:04x}", uuid::Uuid::new_v4().as_u128() as u16);
    let k = 100 + (u16::from_str_radix(&id, 16).unwrap() % 150);
    let mut g = Guard {
        id: id.clone(),
        agents: Vec::new(),
        installed: true,
    };
    ok(
        "apt-get",
        &[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=120",
            deb.to_str().unwrap(),
        ],
    );
    assert!(
        Path::new("/var/lib/mosix").is_dir(),
        "postinst made the state dir"
    );
    let o = sh("/usr/lib/mosix/criu", &["--version"]);
    assert!(stdout(&o).contains("Version: 4."), "packaged CRIU runs");

    // The units, as systemd would load them.
    if Path::new("/usr/bin/systemd-analyze").exists() {
        ok(
            "systemd-analyze",
            &[
                "verify",
                "/lib/systemd/system/mosixd.service",
                "/lib/systemd/system/mos-balance.service",
            ],
        );
    } else {
        eprintln!("!!!!!!!! no systemd-analyze: unit files not verified !!!!!!!!");
    }
    let agent_argv = exec_start("/lib/systemd/system/mosixd.service");
    assert_eq!(agent_argv[0], "/usr/bin/mosixd");

    // Two "machines": network namespaces on a bridge.
    let br = format!("pk{id}br");
    let net = format!("10.79.{k}");
    ok("ip", &["link", "add", &br, "type", "bridge"]);
    ok("ip", &["addr", "add", &format!("{net}.1/24"), "dev", &br]);
    ok("ip", &["link", "set", &br, "up"]);
    for i in 1..=2 {
        let ns = g.netns(i);
        let (h, p) = (format!("pk{id}h{i}"), format!("pk{id}p{i}"));
        ok("ip", &["netns", "add", &ns]);
        ok(
            "ip",
            &["link", "add", &h, "type", "veth", "peer", "name", &p],
        );
        ok("ip", &["link", "set", &h, "master", &br, "up"]);
        ok("ip", &["link", "set", &p, "netns", &ns]);
        let in_ns = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &ns, "ip"];
            a.extend_from_slice(args);
            ok("ip", &a);
        };
        in_ns(&["addr", "add", &format!("{net}.{}/24", i + 1), "dev", &p]);
        in_ns(&["link", "set", &p, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
    }

    // The walkthrough's first step: CA, image key, node certificates and the
    // cluster file, one command.
    let (ip1, ip2) = (format!("{net}.2"), format!("{net}.3"));
    ok(
        "/usr/bin/mosctl",
        &[
            "certs",
            "--dir",
            "/etc/mosix/pki",
            "--name",
            &format!("pk{id}"),
            "--node",
            &format!("node1={ip1}"),
            "--node",
            &format!("node2={ip2}"),
            "--cluster-file",
            "/etc/mosix/cluster.json",
            "--shared",
            "/var/lib/mosix/shared",
        ],
    );
    // Another cluster's CA, for the mistakes below.
    let other = work.path().join("other");
    ok(
        "/usr/bin/mosctl",
        &[
            "certs",
            "--dir",
            other.to_str().unwrap(),
            "--name",
            "other",
            "--node",
            &format!("node1={ip1}"),
            "--node",
            &format!("node2={ip2}"),
            "--cluster-file",
            other.join("cluster.json").to_str().unwrap(),
        ],
    );
    let (ns1, ns2) = (g.netns(1), g.netns(2));
    let sock2 = format!("/run/mosix/pk{id}-node2.sock");
    let node2_args = ["--node", "node2", "--run-socket", &sock2];

    // Mistakes, each refused with a sentence that names it.
    let e = refused(&ns1, &agent_argv, &[]);
    assert!(
        e.contains("not a node name") || e.contains("does not exist"),
        "no --node: the host name is not a node with a certificate: {e}"
    );
    let e = refused(
        &ns1,
        &agent_argv,
        &[
            "--node",
            "node1",
            "--tls-cert",
            "/etc/mosix/pki/node2.pem",
            "--tls-key",
            "/etc/mosix/pki/node2.key",
        ],
    );
    assert!(
        e.contains("issued for node \"node2\""),
        "name mismatch: {e}"
    );
    let other_ca = other.join("ca.pem");
    let e = refused(
        &ns1,
        &agent_argv,
        &[
            "--node",
            "node1",
            "--tls-ca",
            other_ca.to_str().unwrap(),
            "--tls-cert",
            "/etc/mosix/pki/node1.pem",
            "--tls-key",
            "/etc/mosix/pki/node1.key",
        ],
    );
    assert!(
        e.contains("not signed by this cluster's CA"),
        "wrong CA: {e}"
    );

    // Node 1, from the unit's command line and the installed config.
    let logs = work.path();
    g.agents.push(start_agent(
        &ns1,
        &agent_argv,
        &["--node", "node1"],
        &logs.join("node1.log"),
    ));
    let marker = Path::new("/var/lib/mosix/shared/.mosix-cluster");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "node1 wrote no shared-path marker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Another cluster's node on this shared path is refused.
    let other_pki = |f: &str| other.join(f).to_str().unwrap().to_string();
    let e = refused(
        &ns2,
        &agent_argv,
        &[
            "--node",
            "node2",
            "--tls-ca",
            &other_pki("ca.pem"),
            "--tls-cert",
            &other_pki("node2.pem"),
            "--tls-key",
            &other_pki("node2.key"),
            "--run-socket",
            &sock2,
        ],
    );
    assert!(
        e.contains("belongs to another cluster"),
        "other cluster's path: {e}"
    );

    // Node 2 with a shared path that is not node1's file system: it runs,
    // and `mosctl load` names it.
    let elsewhere = work.path().join("not-shared");
    let mut a2 = node2_args.to_vec();
    a2.extend_from_slice(&["--shared", elsewhere.to_str().unwrap()]);
    g.agents.push(start_agent(
        &ns2,
        &agent_argv,
        &a2,
        &logs.join("node2-wrong.log"),
    ));
    let mut warned = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let o = stdout(&mosctl(&["load"]));
        if !o.contains("DOWN") && o.contains("warning: node node2") {
            warned = o;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        warned.contains("shared path is not the file system"),
        "mosctl load names node2's wrong shared path: {warned}"
    );
    let mut wrong = g.agents.pop().unwrap();
    let _ = wrong.kill();
    let _ = wrong.wait();

    // Node 2 right, and the cluster answers.
    g.agents.push(start_agent(
        &ns2,
        &agent_argv,
        &node2_args,
        &logs.join("node2.log"),
    ));
    let mut load = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        load = stdout(&mosctl(&["load"]));
        if load.contains("node1")
            && load.contains("node2")
            && !load.contains("DOWN")
            && !load.contains("warning")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        load.contains("node1") && load.contains("node2") && !load.contains("DOWN"),
        "mosctl load shows both nodes: {load}\nnode1: {}\nnode2: {}",
        std::fs::read_to_string(logs.join("node1.log")).unwrap_or_default(),
        std::fs::read_to_string(logs.join("node2.log")).unwrap_or_default()
    );
    assert!(!load.contains("warning"), "{load}");

    // A client of another cluster is told why it cannot talk to this one.
    let o = sh(
        "/usr/bin/mosctl",
        &[
            "--cluster",
            other.join("cluster.json").to_str().unwrap(),
            "load",
        ],
    );
    assert!(
        stdout(&o).contains("not signed by"),
        "wrong CA at the handshake: {}",
        stdout(&o)
    );

    // A job migrates between the installed agents (with the packaged CRIU).
    let cf = PathBuf::from("/etc/mosix/cluster.json");
    // On the shared path: a file under /tmp exists only on its node, and
    // the agent refuses to move a job that holds one.
    let counter = Path::new("/var/lib/mosix/shared").join("pkg-counter.txt");
    let o = Command::new("/usr/bin/mosrun")
        .args([
            "-d", "--node", "node1", "--", MOSJOB, "counter", "--port", "8080",
        ])
        .arg("--file")
        .arg(&counter)
        .env("MOSIX_CLUSTER", &cf)
        .output()
        .unwrap();
    assert!(o.status.success(), "mosrun: {}", stderr(&o));
    let job = stdout(&o).trim().to_string();
    let job = job
        .split_whitespace()
        .find(|w| w.starts_with('j'))
        .unwrap_or(&job)
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    while query_counter(&ip1, 8080).is_none() {
        assert!(Instant::now() < deadline, "the job answers on node1");
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = mosctl(&["migrate", &job, "node2"]);
    assert!(
        o.status.success(),
        "migrate: {}\nnode1: {}\nnode2: {}",
        stderr(&o),
        std::fs::read_to_string(logs.join("node1.log")).unwrap_or_default(),
        std::fs::read_to_string(logs.join("node2.log")).unwrap_or_default()
    );
    let (_, mem_ok) = query_counter(&ip2, 8080).expect("the job answers on node2");
    assert!(mem_ok, "its memory is intact");
    let o = mosctl(&["kill", "-s", "KILL", &job]);
    assert!(o.status.success(), "kill -s KILL: {}", stderr(&o));

    // Stop the agents, then purge.
    g.stop_agents();
    ok(
        "apt-get",
        &[
            "purge",
            "-y",
            "-q",
            "-o",
            "DPkg::Lock::Timeout=120",
            "mosix",
        ],
    );
    g.installed = false;
    for p in [
        "/var/lib/mosix",
        "/etc/mosix",
        "/usr/lib/mosix",
        "/run/mosix/mosixd.sock",
    ] {
        assert!(!Path::new(p).exists(), "purge left {p}");
    }
    let after = listing();
    let gone: Vec<_> = before.difference(&after).collect();
    let new: Vec<_> = after.difference(&before).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "/usr, /etc and /var differ after the purge:\nonly before: {gone:#?}\nonly after: {new:#?}"
    );
    eprintln!("package test done in {:?}", t0.elapsed());
}

/// Issue 15 papercuts: `mosctl local down` without `--name` takes down the
/// cluster of the cluster file it is given (not one named `local`), and
/// `make setup` (which ran before this suite) left no `sid` entry in the
/// system's package sources.
#[test]
fn local_down_follows_the_cluster_file_and_setup_leaves_no_sid_source() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(1, &[]);
    let ns = format!("mos-{}-", cl.name);
    let listed = || {
        let o = Command::new("ip").args(["netns", "list"]).output().unwrap();
        stdout(&o).contains(&ns)
    };
    assert!(listed(), "cluster {} is up", cl.name);
    let o = cl.mosctl(&["local", "down"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("cluster {} is down", cl.name)),
        "{}",
        stdout(&o)
    );
    assert!(!listed(), "namespaces of {} left behind", cl.name);

    for e in std::fs::read_dir("/etc/apt/sources.list.d")
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        assert!(
            !text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == "sid")),
            "{} names suite sid:\n{text}",
            e.path().display()
        );
    }
}
