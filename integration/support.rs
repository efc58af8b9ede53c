//! Test harness: a local cluster per test, torn down by a guard that also
//! runs on panic, and helpers that drive the real binaries.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const MOSCTL: &str = env!("CARGO_BIN_EXE_mosctl");
pub const MOSRUN: &str = env!("CARGO_BIN_EXE_mosrun");
pub const MOSJOB: &str = env!("CARGO_BIN_EXE_mosjob");
pub const MOSBALANCE: &str = env!("CARGO_BIN_EXE_mos-balance");
pub const MOSMON: &str = env!("CARGO_BIN_EXE_mosmon");

/// Whether this machine can run privileged tests; if not, either skip with a
/// loud message or (when required) fail.
pub fn privileged() -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root".to_string())
    } else {
        let criu = mosix::criu::default_criu_path();
        match Command::new(&criu).arg("check").output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "`{} check` fails: {}",
                criu.display(),
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )),
            Err(e) => Some(format!(
                "no CRIU at {} ({e}); run `make setup`",
                criu.display()
            )),
        }
    };
    match why {
        None => true,
        Some(why) => {
            if std::env::var("MOSIX_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!("privileged test cannot run: {why} (MOSIX_REQUIRE_PRIVILEGED=1)");
            }
            eprintln!("\n!!!!!!!! SKIPPING privileged test: {why} !!!!!!!!\n");
            false
        }
    }
}

pub struct Cluster {
    pub name: String,
    pub file: PathBuf,
    /// The shared root; for a cluster without one (`--no-shared`), a scratch
    /// dir of the test's own that the cluster never uses.
    pub shared: PathBuf,
    /// Configured without a shared path: every node has its own state dir.
    pub no_shared: bool,
}

fn unique_name() -> String {
    let n = uuid::Uuid::new_v4().as_u128();
    format!("t{:07x}", (n & 0xfff_ffff) as u32)
}

pub fn run(cmd: &str, args: &[&str], cluster: Option<&Cluster>) -> Output {
    run_env(cmd, args, cluster, &[])
}

/// [`run`], with `env` added to the command's environment.
pub fn run_env(
    cmd: &str,
    args: &[&str],
    cluster: Option<&Cluster>,
    env: &[(&str, &str)],
) -> Output {
    let mut c = Command::new(cmd);
    c.args(args);
    c.envs(env.iter().copied());
    if let Some(cl) = cluster {
        c.env("MOSIX_CLUSTER", &cl.file);
    }
    let out = c.output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    eprintln!(
        "$ {} {}\n{}{}",
        Path::new(cmd).file_name().unwrap().to_string_lossy(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

impl Cluster {
    pub fn up(nodes: usize, extra: &[&str]) -> Cluster {
        Self::up_env(nodes, extra, &[])
    }

    /// [`Cluster::up`], with `env` in every agent's environment (for
    /// example `MOSIX_PAGE_STREAM=off`).
    pub fn up_env(nodes: usize, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        let name = unique_name();
        let shared = std::env::temp_dir().join(format!("mosix-it-{name}"));
        let n = nodes.to_string();
        let shared_s = shared.to_string_lossy().into_owned();
        let no_shared = extra.contains(&"--no-shared");
        let own_shared = !extra.contains(&"--shared") && !no_shared;
        let mut args = vec!["local", "up", "--name", &name, "--nodes", &n];
        // MOSIX_IT_SHARED_OVER=sshfs runs every test's cluster with its
        // shared directories on sshfs (a few tests do so anyway).
        let over = std::env::var("MOSIX_IT_SHARED_OVER").unwrap_or_default();
        if !over.is_empty() && !extra.contains(&"--shared-over") {
            args.extend_from_slice(&["--shared-over", &over]);
        }
        if own_shared {
            args.extend_from_slice(&["--shared", &shared_s]);
        }
        // Without a shared path, the test's scratch dir (counter files)
        // must still be seen by every node: their /tmp is their own.
        if no_shared {
            args.extend_from_slice(&["--common", &shared_s]);
        }
        // A checkout under a directory each node has its own of (`git clone
        // . /tmp/fresh`): the nodes must still see the binaries and the
        // tests' working directory, as an NFS home gives real machines.
        let checkout = env!("CARGO_MANIFEST_DIR");
        if ["/tmp/", "/var/tmp/", "/root/"]
            .iter()
            .any(|p| checkout.starts_with(p))
        {
            args.extend_from_slice(&["--common", checkout]);
        }
        // Tests run without etcd unless they ask for it (`--etcd-members N`,
        // the coord tests): on a loaded machine an agent starved for longer
        // than its lease rightly fences its jobs, which is not what the
        // other tests are about.
        if !extra
            .iter()
            .any(|a| *a == "--etcd-members" || *a == "--no-etcd")
        {
            args.push("--no-etcd");
        }
        args.extend_from_slice(extra);
        // A `--shared` in `extra` wins (clap takes the last one).
        let shared = extra
            .iter()
            .position(|a| *a == "--shared")
            .and_then(|i| extra.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or(shared);
        let cl = Cluster {
            file: PathBuf::from(format!("/run/mosix/{name}/cluster.json")),
            name: name.clone(),
            shared,
            no_shared,
        };
        if no_shared {
            std::fs::create_dir_all(&cl.shared).unwrap();
        }
        let over_sshfs = args.windows(2).any(|w| w == ["--shared-over", "sshfs"]);
        let o = run_env(MOSCTL, &args, None, env);
        assert!(o.status.success(), "local up failed: {}", stderr(&o));
        if over_sshfs {
            cl.assert_nodes_mount_over_sshfs();
        }
        cl
    }

    /// Every agent sees the shared dir (or the test's scratch dir without
    /// one) as an sshfs mount, not the host's directory.
    pub fn assert_nodes_mount_over_sshfs(&self) {
        let pids =
            std::fs::read_to_string(format!("/run/mosix/{}/agents.pids", self.name)).unwrap();
        let dir = self.shared.to_string_lossy().into_owned();
        for pid in pids.split_whitespace() {
            let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
            assert!(
                mounts.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.get(4) == Some(&dir.as_str()) && l.contains(" - fuse.sshfs ")
                }),
                "agent {pid} does not see {dir} over sshfs"
            );
        }
    }

    /// The host-side link of the cluster's file server (`--shared-over
    /// sshfs`): down, the server is cut off from every node.
    pub fn set_fileserver_link(&self, up: bool) {
        let o = Command::new("ip")
            .args(["link", "set", &format!("mv-{}-fs", self.name)])
            .arg(if up { "up" } else { "down" })
            .output()
            .unwrap();
        assert!(o.status.success(), "ip link: {}", stderr(&o));
    }

    pub fn mosctl(&self, args: &[&str]) -> Output {
        run(MOSCTL, args, Some(self))
    }

    /// Start a job in the background (`mosrun -d`); returns its id.
    pub fn mosrun(&self, args: &[&str]) -> String {
        let mut a = vec!["-d"];
        a.extend_from_slice(args);
        let o = run(MOSRUN, &a, Some(self));
        assert!(o.status.success(), "mosrun failed: {}", stderr(&o));
        stdout(&o).trim().to_string()
    }

    /// Restart `node`'s agent (`mosctl local restart-agent NODE --name …`)
    /// with `extra` flags for that start (`--criu PATH`, `--kill-only`,
    /// `--agent-arg=…`), and insist that it worked.
    pub fn restart_agent(&self, node: &str, extra: &[&str]) {
        let o = self.try_restart_agent(node, extra);
        assert!(o.status.success(), "{}", stderr(&o));
    }

    /// The same restart, for a test that expects it to fail: its output.
    pub fn try_restart_agent(&self, node: &str, extra: &[&str]) -> Output {
        let mut a = vec!["local", "restart-agent", node, "--name", &self.name];
        a.extend_from_slice(extra);
        self.mosctl(&a)
    }

    /// Which node a process belongs to: the node whose cpu cgroup holds it
    /// (a job with its own address is in no node's network namespace, but
    /// always in its node's cgroup: its agent's, or its restorer's).
    pub fn node_of_pid(&self, pid: i32) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let prefix = format!("/mosix/{}/", self.name);
        text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            if !ctl.split(',').any(|c| c == "cpu") {
                return None;
            }
            // `node1`, or `node1/jobs` (the node's jobs group, see
            // `core::cgroup`): the node is the first part.
            let node = path.strip_prefix(&prefix)?.split('/').next()?;
            (!node.is_empty()).then(|| node.to_string())
        })
    }

    /// Where a detached job answers: its own address if it has one (the
    /// default on a local cluster), else the address of the node it runs on.
    pub fn job_ip(&self, job: &str) -> String {
        let rec = self.record(job);
        match rec.net {
            Some(n) => n.ip.to_string(),
            None => self.node_ip(rec.node.as_str()),
        }
    }

    pub fn node_ip(&self, node: &str) -> String {
        let cf = mosix::core::cluster_file::ClusterFile::load(&self.file).unwrap();
        cf.node(node).unwrap().address.clone()
    }

    /// The registry record of a job, read straight from the shared path, or
    /// without one from the nodes' own registries (the newest copy, as
    /// ListJobs picks it).
    pub fn record(&self, job: &str) -> mosix::core::JobRecord {
        let id = mosix::core::JobId::parse(job).unwrap();
        if !self.no_shared {
            let reg = mosix::core::registry::Registry::open(&self.shared).unwrap();
            return reg.get(&id).unwrap();
        }
        let lists = self
            .node_names()
            .into_iter()
            .map(|n| {
                let recs = self
                    .node_registry(&n)
                    .get(&id)
                    .map(|r| vec![r])
                    .unwrap_or_default();
                (mosix::core::NodeName::parse(&n).unwrap(), recs)
            })
            .collect();
        mosix::agent::direct::merge_records(lists)
            .pop()
            .unwrap_or_else(|| panic!("no node has a record of job {job}"))
    }

    /// Names of the cluster's nodes.
    pub fn node_names(&self) -> Vec<String> {
        let cf = mosix::core::cluster_file::ClusterFile::load(&self.file).unwrap();
        cf.nodes.iter().map(|n| n.name.to_string()).collect()
    }

    /// A node's own state dir (cluster without a shared path).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        mosix::local::node_state_dir(&self.name, node)
    }

    /// Where a node keeps its private `/tmp` (see `local::nodefs`): a
    /// path `/tmp/x` written on the node is `<this>/x` on the host.
    pub fn node_tmp(&self, node: &str) -> PathBuf {
        mosix::local::nodefs::fs_dir(&self.name, node).join("tmp")
    }

    /// A node's own registry (cluster without a shared path).
    pub fn node_registry(&self, node: &str) -> mosix::core::registry::Registry {
        assert!(
            self.no_shared,
            "only nodes without a shared path have their own registry"
        );
        mosix::core::registry::Registry::open(&self.node_dir(node)).unwrap()
    }

    pub fn jobs_json(&self) -> Vec<serde_json::Value> {
        let o = self.mosctl(&["jobs", "--all", "--json"]);
        assert!(o.status.success());
        serde_json::from_slice(&o.stdout).unwrap()
    }

    pub fn job_json(&self, job: &str) -> serde_json::Value {
        self.jobs_json()
            .into_iter()
            .find(|j| j["id"] == job)
            .unwrap_or_else(|| panic!("job {job} not listed"))
    }

    /// Wait until `f` is true or panic after `secs`.
    pub fn wait_for(&self, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("timed out after {secs}s waiting for {what}");
    }

    pub fn netns(&self, node: &str) -> String {
        format!("mos-{}-{}", self.name, node)
    }

    /// Limit what leaves `node` to `rate` (tc's token bucket on its eth0),
    /// so a transfer provably takes a while.
    pub fn throttle_egress(&self, node: &str, rate: &str) {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns(node)])
            .args([
                "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
            ])
            .args(["burst", "64kb", "latency", "200ms"])
            .output()
            .unwrap();
        assert!(o.status.success(), "tc: {}", stderr(&o));
    }

    /// SIGKILL every process of a node (agent, CRIU, jobs): the node dies.
    /// Its processes are those in its network namespace and those in its
    /// cpu cgroup: a job with its own address lives in a network namespace
    /// of its own, but in its node's cgroup (its agent's, or its restorer's).
    /// Returns how many were killed.
    pub fn kill_node_processes(&self, node: &str) -> usize {
        let o = Command::new("ip")
            .args(["netns", "pids", &self.netns(node)])
            .output()
            .unwrap();
        // The node's cgroup and its jobs group below it (see
        // `core::cgroup`): own-address jobs are in no node namespace.
        let cg: String = ["", "/jobs"]
            .iter()
            .map(|sub| {
                std::fs::read_to_string(format!(
                    "/sys/fs/cgroup/cpu/mosix/{}/{node}{sub}/cgroup.procs",
                    self.name
                ))
                .unwrap_or_default()
            })
            .collect();
        let mut pids: Vec<i32> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .chain(cg.lines())
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        // All stopped first, then all killed, as a power loss: killed one
        // by one, the agent could see its job's SIGKILL before its own and
        // record the job exited.
        for sig in [libc::SIGSTOP, libc::SIGKILL] {
            for &p in &pids {
                unsafe { libc::kill(p, sig) };
            }
        }
        pids.len()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A second try finishes what a first one on a loaded machine left
        // (`down` works from names, and says what it could not remove).
        for attempt in 1..=2 {
            match Command::new(MOSCTL)
                .args(["local", "down", "--name", &self.name])
                .output()
            {
                Ok(o) if o.status.success() => break,
                Ok(o) => eprintln!(
                    "WARNING: `mosctl local down --name {}` failed (attempt {attempt} of 2): {}",
                    self.name,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("WARNING: running mosctl local down: {e}"),
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir_all(&self.shared);
    }
}

/// Wait up to `secs` for `child` to end: its status, or None if it still
/// runs then (the caller says what that means, and kills it if it must).
pub fn wait_timeout(
    child: &mut std::process::Child,
    secs: u64,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// sshfs tests need sshfs, sshd and FUSE (`make setup` installs them):
/// skip loudly without, fail if MOSIX_REQUIRE_PRIVILEGED=1.
pub fn sshfs_capable() -> bool {
    let missing: Vec<&str> = ["/usr/bin/sshfs", "/usr/sbin/sshd", "/dev/fuse"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("MOSIX_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("MOSIX_REQUIRE_PRIVILEGED is set but {missing:?} are missing (run `make setup`)");
    }
    eprintln!("\n!!!!!!!! SKIPPING sshfs test: {missing:?} missing; run `make setup` !!!!!!!!\n");
    false
}

/// Post-copy needs userfaultfd; CI has it, so only a machine without it skips.
pub fn post_copy_capable() -> bool {
    let criu = mosix::criu::default_criu_path();
    let ok = Command::new(&criu)
        .args(["check", "--feature", "uffd-noncoop"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok && std::env::var("MOSIX_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!(
            "MOSIX_REQUIRE_PRIVILEGED is set but {} reports no uffd-noncoop",
            criu.display()
        );
    }
    if !ok {
        eprintln!(
            "SKIPPED: {} reports no userfaultfd (uffd-noncoop); post-copy cannot run here",
            criu.display()
        );
    }
    ok
}

/// Ask a counter job over TCP: returns (counter, mem_ok).
pub fn query_counter(ip: &str, port: u16) -> Option<(u64, bool)> {
    use std::io::Read;
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let n = buf
        .split_whitespace()
        .find_map(|w| w.strip_prefix("counter="))?
        .parse()
        .ok()?;
    Some((n, buf.contains("mem=ok")))
}

/// A `mosjob counter` on `node` writing ticks to `file` (mosrun flags in
/// `extra`, more `mosjob counter` arguments in `job_args`), once it has
/// ticked a few times; its job id.
pub fn counter(
    cl: &Cluster,
    node: &str,
    port: &str,
    file: &Path,
    extra: &[&str],
    job_args: &[&str],
) -> String {
    let mut a = vec!["--node", node];
    a.extend_from_slice(extra);
    a.extend_from_slice(&[
        "--",
        MOSJOB,
        "counter",
        "--port",
        port,
        "--file",
        file.to_str().unwrap(),
    ]);
    a.extend_from_slice(job_args);
    let job = cl.mosrun(&a);
    cl.wait_for("counter to tick", 20, || ticks(file).len() > 3);
    job
}

/// The tick numbers a counter job wrote to its file.
pub fn ticks(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// Ticks must be 1, 2, 3, ... with no gap and no restart.
pub fn assert_contiguous(t: &[u64]) {
    assert!(!t.is_empty(), "no ticks written");
    for (i, v) in t.iter().enumerate() {
        assert_eq!(
            *v,
            i as u64 + 1,
            "tick sequence broken at line {i}: {:?}",
            &t[i.saturating_sub(3)..(i + 3).min(t.len())]
        );
    }
}

/// Every thread of the process tree rooted at `root`: (namespace pid, nice).
pub fn nice_by_ns_pid(root: i32) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let tid: i32 = tid.parse().unwrap_or(-1);
            let ns = mosix::core::procfs::ns_pid(tid).unwrap_or(-1);
            let nice = mosix::core::procfs::nice(tid).unwrap_or(99);
            out.push((ns, nice));
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
                .unwrap_or_default();
            todo.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
    }
    out.sort();
    out
}

/// A small tmpfs for a shared path that fills up (`shared`, inside it), and
/// a plain directory beside it that every node sees (`common`, for files
/// that must not be on the full disk). Unmounted and removed when dropped;
/// declare it before the cluster, so the cluster goes first.
pub struct SmallDisk {
    pub mnt: PathBuf,
    pub shared: PathBuf,
    pub common: PathBuf,
}

pub fn small_disk(tag: &str, size: &str) -> SmallDisk {
    let mnt = std::env::temp_dir().join(format!("mosix-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    let common = mnt.with_extension("common");
    std::fs::create_dir_all(&common).unwrap();
    SmallDisk {
        shared: mnt.join("root"),
        mnt,
        common,
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_dir_all(&self.common);
    }
}
