//! [`RealCriu`]: the CRIU driver: dumps and restores are CRIU RPC requests
//! (`rust-criu`'s generated `rpc.proto` types) to a warm `criu swrk` worker
//! (see [`super::swrk`] for why not `rust-criu`'s own client).
//!
//! **Pre-copy goes through the command line.** It was written when
//! `rust-criu` 0.6.1's client drove every call, and that client cannot
//! send CRIU's `PRE_DUMP` request and has no setter for `track_mem` (only
//! `set_parent_img`); a dump on top of pre-dumped parents without
//! `track_mem` would not consult the soft-dirty bits, i.e. copy everything
//! again. Our worker could now send both, but this machine's kernel has no
//! soft-dirty tracking to test that with, so the tested command-line path
//! stays. Pre-dump rounds run `criu pre-dump --track-mem`, and the final
//! dump of a pre-copied job runs `criu dump --track-mem --prev-images-dir`
//! with the same options the RPC dump sets (file locks, link remap, cgroups
//! ignored, not a shell job: the CLI's default). Every other dump stays on
//! RPC, whose status fd and notifications the other paths rely on.

use super::swrk::{Spare, SwrkError, Watch, Worker};
use super::{
    log_excerpt, page_image_bytes, CheckpointEngine, CriuError, DumpSpec, Features, PreDumpSpec,
    RestoreOutcome, RestoreSpec, DUMP_LOG, PRE_DUMP_LOG, RESTORE_LOG,
};
use rust_criu::rust_criu_protobuf::rpc;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

#[derive(Clone)]
pub struct RealCriu {
    path: PathBuf,
    features: Features,
    /// The next dump or restore's warm `criu swrk` (see [`super::swrk`]).
    spare: Arc<Spare>,
}

impl std::fmt::Debug for RealCriu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealCriu")
            .field("path", &self.path)
            .field("features", &self.features)
            .finish()
    }
}

/// CRIU's log level for dumps and restores unless `MOSIX_CRIU_LOG_LEVEL`
/// (0-4) in the agent's environment says otherwise. Level 2 (errors and
/// warnings, CRIU's own default) says why a dump or restore failed. Level 4
/// (debug) writes a line per VMA, fd and page batch, ~1,500 lines for a
/// 64 MiB job; measured with bare CRIU it added ~6 ms to each move of a job
/// with its `mosix-init`, all while the job is frozen. Set 4 to debug CRIU.
pub const DEFAULT_LOG_LEVEL: i32 = 2;

/// The log level from `MOSIX_CRIU_LOG_LEVEL`, or [`DEFAULT_LOG_LEVEL`];
/// read once per agent, not on every request (and warned about once).
pub fn log_level() -> i32 {
    static LEVEL: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| parse_log_level(std::env::var("MOSIX_CRIU_LOG_LEVEL").ok().as_deref()))
}

fn parse_log_level(v: Option<&str>) -> i32 {
    match v.map(str::trim) {
        None | Some("") => DEFAULT_LOG_LEVEL,
        Some(s) => match s.parse::<i32>() {
            Ok(n) if (0..=4).contains(&n) => n,
            _ => {
                tracing::warn!(
                    value = s,
                    "MOSIX_CRIU_LOG_LEVEL must be 0-4; using {DEFAULT_LOG_LEVEL}"
                );
                DEFAULT_LOG_LEVEL
            }
        },
    }
}

/// A request of `kind` on the images in `dir`, with the options every
/// request shares: logs at [`log_level`] into `log` there, jobs are not
/// shell jobs, file locks and link remaps are handled, cgroups are ignored
/// (see the module docs of [`super`]).
fn request(kind: rpc::Criu_req_type, dir: &std::fs::File, log: &str) -> rpc::Criu_req {
    let mut opts = rpc::Criu_opts::new();
    opts.set_images_dir_fd(dir.as_raw_fd());
    opts.set_log_level(log_level());
    opts.set_log_file(log.to_string());
    opts.set_shell_job(false);
    opts.set_file_locks(true);
    opts.set_link_remap(true);
    opts.set_manage_cgroups_mode(rpc::Criu_cg_mode::IGNORE);
    let mut req = rpc::Criu_req::new();
    req.set_type(kind);
    req.opts = protobuf::MessageField::some(opts);
    req
}

/// Kill a restored tree that must not run, and CRIU, its tracer. The tree
/// is still stopped under CRIU's ptrace at `pre-resume`, so SIGKILL makes it
/// die without running a single instruction. Failing the notification
/// alone does not stop it: CRIU 4.2.1 only logs a failed pre-resume script
/// and resumes the tasks anyway. And CRIU's own clean-up after a dead tree
/// deadlocks (it waits for the init, which waits for children that are
/// zombies traced by CRIU), so the tracer is killed too; its death releases
/// the tree.
fn kill_restored_tree(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if pid <= 0 {
        return;
    }
    let tracer = crate::core::procfs::tracer(pid);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    if let Some(t) = tracer {
        let _ = kill(Pid::from_raw(t), Signal::SIGKILL);
    }
}

/// The kernel functions the tasks of the tree rooted at `root` sleep in
/// (`/proc/<tid>/wchan`), distinct, e.g. `fcntl_setlk`.
fn waiting_in(root: i32) -> Vec<String> {
    if root <= 0 {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    for pid in crate::core::procfs::tree_pids(root) {
        for tid in crate::core::procfs::threads(pid) {
            if let Ok(w) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan")) {
                let w = w.trim().to_string();
                if !w.is_empty() && w != "0" && !out.contains(&w) {
                    out.push(w);
                }
            }
        }
    }
    out
}

/// Reap a killed restored init (our child thanks to `rst_sibling`); give up
/// after a while rather than hang the agent (the reaper gets it later).
fn reap_killed(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    for _ in 0..500 {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(10)),
            _ => return,
        }
    }
}

impl RealCriu {
    /// Probe the binary's kernel features once; a missing binary yields an
    /// engine whose every call fails with [`CriuError::Missing`].
    pub fn new(path: PathBuf) -> Self {
        let uffd = check_feature(&path, "uffd-noncoop");
        // userfaultfd alone is not enough: see `host` for the pipe size.
        let pipes = if uffd {
            super::host::ensure_pipe_max_size()
                .inspect_err(|why| tracing::warn!("post-copy disabled: {why}"))
                .is_ok()
        } else {
            false
        };
        let features = Features {
            lazy_pages: uffd && pipes,
            mem_dirty_track: check_feature(&path, "mem_dirty_track"),
        };
        // Off the start path: made once per boot/kernel/CRIU, a few hundred
        // ms; until it is there a call just probes, as without it.
        if path.is_file() {
            let criu = path.clone();
            let _ = std::thread::Builder::new()
                .name("criu-kdat".into())
                .spawn(move || match super::kdat::ensure(&criu) {
                    Ok(super::kdat::KdatCache::Made(why)) => tracing::info!(
                        "made CRIU's kernel-feature cache {}/{} ({why}): saves ~35 ms per dump and restore",
                        super::kdat::RUN_DIR,
                        super::kdat::CACHE_NAME
                    ),
                    Ok(state) => tracing::debug!("CRIU kernel-feature cache: {state:?}"),
                    Err(e) => tracing::warn!(
                        "no CRIU kernel-feature cache, every dump and restore probes the kernel: {e}"
                    ),
                });
        }
        let spare = Spare::new(path.clone());
        let me = Self {
            path,
            features,
            spare,
        };
        if me.available().is_ok() {
            me.spare.refill();
        }
        me
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A worker for one dump or restore: the warm spare if there is one.
    fn worker(&self, op: &'static str) -> Result<Worker, CriuError> {
        self.available()?;
        self.spare.take().map_err(|e| CriuError::Failed {
            op,
            detail: e.to_string(),
        })
    }
}

fn check_feature(path: &Path, feature: &str) -> bool {
    Command::new(path)
        .args(["check", "--feature", feature])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn failure(op: &'static str, err: SwrkError, log: &Path) -> CriuError {
    if let SwrkError::Stopped(why) = &err {
        return CriuError::Stopped {
            op,
            detail: format!("{why}; CRIU was killed: {}", log_excerpt(log)),
        };
    }
    classify(op, format!("{err}: {}", log_excerpt(log)))
}

fn classify(op: &'static str, detail: String) -> CriuError {
    if detail.contains("No space left on device") || detail.contains("errno 28") {
        CriuError::DiskFull { op, detail }
    } else {
        CriuError::Failed { op, detail }
    }
}

/// A relative path inside the image tree for `--prev-images-dir`: CRIU
/// resolves it against `-D` and stores it verbatim as the `parent` link,
/// which the manifest then checks; an absolute path would also break a
/// restore on another node.
fn check_prev(op: &'static str, prev: &str) -> Result<(), CriuError> {
    if prev.is_empty() || prev.starts_with('/') || prev.contains('\0') {
        return Err(CriuError::Failed {
            op,
            detail: format!("previous images dir {prev:?} must be a relative path"),
        });
    }
    Ok(())
}

enum Bounded {
    Io(std::io::Error),
    Late(std::time::Duration),
}

/// Wait for a CRIU command line, killing it once `deadline` has passed.
/// Its stderr is drained on a thread, so a chatty CRIU cannot block on a
/// full pipe while we wait.
fn wait_bounded(
    mut child: std::process::Child,
    deadline: std::time::Duration,
) -> Result<std::process::Output, Bounded> {
    use std::io::Read;
    let mut err_pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let until = std::time::Instant::now() + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() >= until => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                return Err(Bounded::Late(deadline));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => return Err(Bounded::Io(e)),
        }
    };
    let stderr = reader.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    })
}

impl RealCriu {
    /// Run the CRIU command line `args` against `image_dir`, logging to
    /// `log` there; on failure quote the log's error lines.
    fn run_cli(
        &self,
        op: &'static str,
        args: &[String],
        image_dir: &Path,
        log: &str,
        deadline: std::time::Duration,
    ) -> Result<(), CriuError> {
        self.available()?;
        let child = Command::new(&self.path)
            .args(args)
            .arg("-D")
            .arg(image_dir)
            .args(["-o", log, "-v4"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| CriuError::Io { op, source: e })?;
        let out = wait_bounded(child, deadline).map_err(|e| match e {
            Bounded::Io(source) => CriuError::Io { op, source },
            Bounded::Late(d) => CriuError::Stopped {
                op,
                detail: format!(
                    "criu {} did not finish within {} s and was killed: {}",
                    args.first().map(String::as_str).unwrap_or(""),
                    d.as_secs(),
                    log_excerpt(&image_dir.join(log))
                ),
            },
        })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        Err(classify(
            op,
            format!(
                "criu {} exited with {}{}: {}",
                args.first().map(String::as_str).unwrap_or(""),
                out.status,
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", stderr.lines().last().unwrap_or(""))
                },
                log_excerpt(&image_dir.join(log))
            ),
        ))
    }

    /// The final dump of a pre-copied job (see the module docs for why it
    /// is not RPC).
    fn dump_onto_parent(&self, spec: &DumpSpec, prev: &str) -> Result<(), CriuError> {
        check_prev("dump", prev)?;
        if spec.lazy.is_some() || spec.status_fd.is_some() {
            return Err(CriuError::Failed {
                op: "dump",
                detail: "a dump on top of pre-copy rounds cannot be lazy (post-copy)".into(),
            });
        }
        let mut args: Vec<String> = vec![
            "dump".into(),
            "-t".into(),
            spec.pid.to_string(),
            "--track-mem".into(),
            "--prev-images-dir".into(),
            prev.into(),
            "--file-locks".into(),
            "--link-remap".into(),
            "--manage-cgroups=ignore".into(),
        ];
        if spec.leave_running {
            args.push("--leave-running".into());
        }
        if spec.own_net {
            args.extend([
                "--tcp-established".into(),
                "--network-lock".into(),
                "nftables".into(),
            ]);
        }
        let deadline = spec
            .deadline
            .unwrap_or_else(|| super::deadline_for(super::CriuCall::Dump, 0));
        self.run_cli("dump", &args, &spec.image_dir, DUMP_LOG, deadline)
    }
}

impl CheckpointEngine for RealCriu {
    fn pre_dump(&self, spec: &PreDumpSpec) -> Result<u64, CriuError> {
        let mut args: Vec<String> = vec![
            "pre-dump".into(),
            "-t".into(),
            spec.pid.to_string(),
            "--track-mem".into(),
        ];
        if let Some(prev) = &spec.prev_images_dir {
            check_prev("pre-dump", prev)?;
            args.push("--prev-images-dir".into());
            args.push(prev.clone());
        }
        let deadline = super::deadline_for(
            super::CriuCall::PreDump,
            crate::core::procfs::tree_rss_bytes(spec.pid),
        );
        self.run_cli("pre-dump", &args, &spec.image_dir, PRE_DUMP_LOG, deadline)?;
        Ok(page_image_bytes(&spec.image_dir))
    }

    fn available(&self) -> Result<(), CriuError> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
            _ => Err(CriuError::Missing(self.path.clone())),
        }
    }

    fn features(&self) -> Features {
        self.features
    }

    fn start_lazy_daemon(
        &self,
        image_dir: &Path,
        from: &super::PageServer,
    ) -> Result<std::process::Child, CriuError> {
        self.available()?;
        let socket = image_dir.join("lazy-pages.socket");
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(&self.path)
            .args(["lazy-pages", "--page-server", "--address"])
            .arg(&from.address)
            .arg("--port")
            .arg(from.port.to_string())
            .arg("-D")
            .arg(image_dir)
            .arg("-o")
            .arg(super::LAZY_LOG)
            .arg("-v4")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| CriuError::Io {
                op: "lazy-pages",
                source: e,
            })?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(CriuError::Failed {
                    op: "lazy-pages",
                    detail: format!(
                        "daemon exited ({st}): {}",
                        log_excerpt(&image_dir.join(super::LAZY_LOG))
                    ),
                });
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CriuError::Failed {
                    op: "lazy-pages",
                    detail: "daemon did not start listening within 15 s".into(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(child)
    }

    fn page_server(
        &self,
        image_dir: &Path,
        socket: std::os::fd::RawFd,
        log: &Path,
    ) -> Result<std::process::Child, CriuError> {
        use std::io::Read;
        self.available()?;
        let io = |e: std::io::Error| CriuError::Io {
            op: "page-server",
            source: e,
        };
        // CRIU writes a byte here once it serves (`--status-fd`): its start
        // (~20 ms) then happens before the dump, not inside the freeze.
        let (mut ready, status) = std::io::pipe().map_err(io)?;
        let status_fd = status.as_raw_fd();
        let mut cmd = Command::new(&self.path);
        cmd.args(["page-server", "--ps-socket"])
            .arg(socket.to_string())
            .arg("--status-fd")
            .arg(status_fd.to_string())
            .arg("-D")
            .arg(image_dir)
            .arg("-o")
            .arg(log)
            .arg(format!("-v{}", log_level()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        super::swrk::inherit_fds(&mut cmd, vec![socket, status_fd]);
        let mut child = cmd.spawn().map_err(io)?;
        drop(status);
        // Above the jobs, as a dump's worker: it writes a moving job's memory.
        crate::core::set_nice(child.id() as i32, super::swrk::WORKER_NICE);
        // One byte when it serves; EOF if it exited first. Bounded: CRIU
        // reads nothing but its own start-up here.
        let mut byte = [0u8; 1];
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = std::thread::Builder::new()
            .name("ps-status".into())
            .spawn(move || {
                let _ = tx.send(ready.read(&mut byte).map(|n| n == 1));
            });
        let why = match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(Ok(true)) => return Ok(child),
            Ok(_) => format!("it exited at start: {}", log_excerpt(log)),
            Err(_) => "it did not start within 10 s".to_string(),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(CriuError::Failed {
            op: "page-server",
            detail: why,
        })
    }

    fn dump(&self, spec: &DumpSpec) -> Result<(), CriuError> {
        if let Some(prev) = &spec.prev_images_dir {
            return self.dump_onto_parent(spec, prev);
        }
        let worker = match spec.page_socket {
            Some(fd) => {
                self.available()?;
                let w = Worker::spawn_with_fd(&self.path, fd).map_err(|e| CriuError::Failed {
                    op: "dump",
                    detail: e.to_string(),
                })?;
                crate::core::set_nice(w.pid(), super::swrk::WORKER_NICE);
                w
            }
            None => self.worker("dump")?,
        };
        let dir = std::fs::File::open(&spec.image_dir).map_err(|e| CriuError::Io {
            op: "dump",
            source: e,
        })?;
        let mut req = request(rpc::Criu_req_type::DUMP, &dir, DUMP_LOG);
        let opts = req.opts.mut_or_insert_default();
        opts.set_pid(spec.pid);
        opts.set_leave_running(spec.leave_running);
        if spec.keep_stopped {
            opts.set_leave_stopped(true);
        }
        if let Some(ps) = &spec.lazy {
            opts.set_lazy_pages(true);
            let mut info = rpc::Criu_page_server_info::new();
            info.set_address(ps.address.clone());
            info.set_port(i32::from(ps.port));
            opts.ps = protobuf::MessageField::some(info);
        }
        if let Some(fd) = spec.page_socket {
            let mut info = rpc::Criu_page_server_info::new();
            info.set_fd(fd);
            opts.ps = protobuf::MessageField::some(info);
        }
        if let Some(fd) = spec.status_fd {
            opts.set_status_fd(fd);
        }
        if spec.post_dump.is_some() {
            opts.set_notify_scripts(true);
        }
        if spec.own_net {
            opts.set_tcp_established(true);
            opts.set_network_lock(rpc::Criu_network_lock_method::NFTABLES);
        }
        let watch = Watch {
            deadline: spec.deadline.map(|d| std::time::Instant::now() + d),
            abort_if: None,
        };
        let mut hook_failed = None;
        let result = worker.call_watched(
            &req,
            &mut |script, _| {
                // post-dump: images complete, tree still frozen (see
                // DumpSpec::post_dump).
                match (&spec.post_dump, script) {
                    (Some(h), "post-dump") => match h.run() {
                        Ok(()) => true,
                        Err(why) => {
                            hook_failed = Some(why);
                            false
                        }
                    },
                    _ => true,
                }
            },
            &watch,
        );
        self.spare.refill();
        if let Some(why) = hook_failed {
            // CRIU resumed the tree (a failed post-dump script undoes the
            // dump's final state) and reports a failure of its own.
            let op = "dump";
            return Err(if why.contains("No space left") {
                CriuError::DiskFull { op, detail: why }
            } else {
                CriuError::Failed { op, detail: why }
            });
        }
        // A killed dump worker released the tree: ptrace detaches on the
        // tracer's death and the tasks run on, as after any failed dump.
        result
            .map(|_| ())
            .map_err(|e| failure("dump", e, &spec.image_dir.join(DUMP_LOG)))
    }

    fn restore(&self, spec: &RestoreSpec) -> Result<RestoreOutcome, CriuError> {
        let worker = self.worker("restore")?;
        let dir = std::fs::File::open(&spec.image_dir).map_err(|e| CriuError::Io {
            op: "restore",
            source: e,
        })?;
        let mut req = request(rpc::Criu_req_type::RESTORE, &dir, RESTORE_LOG);
        let opts = req.opts.mut_or_insert_default();
        opts.set_rst_sibling(true);
        opts.set_notify_scripts(true);
        if spec.lazy_from.is_some() {
            opts.set_lazy_pages(true);
        }
        if spec.consume_pages {
            // CRIU punches each page image's holes as it reads them, in
            // steps of 1 MiB (`pagemap.c`, `punch_hole`).
            opts.set_auto_dedup(true);
        }
        if let Some(ext) = &spec.external_veth {
            opts.set_tcp_established(true);
            opts.set_network_lock(rpc::Criu_network_lock_method::NFTABLES);
            opts.external.push(ext.clone());
        }
        let mut restored = 0;
        let mut refusal = None;
        let watch = Watch {
            deadline: spec.deadline.map(|d| std::time::Instant::now() + d),
            abort_if: spec.abort_if.as_ref().map(|a| &*a.0 as _),
        };
        let result = worker.call_watched(
            &req,
            &mut |script, notify| {
                // CRIU names the restored init's pid at setup-namespaces (right
                // after forking it) and again at post-restore; knowing it early
                // lets a stopped restore kill a tree that never got further.
                if (script == "setup-namespaces" || script == "post-restore") && notify.has_pid() {
                    restored = notify.pid();
                }
                if script == "pre-resume" {
                    if let Some(Err(why)) = spec.resume_gate.as_ref().map(|g| g.check()) {
                        kill_restored_tree(restored);
                        refusal = Some(why);
                        return false;
                    }
                    // Every task exists and none runs yet: whatever it
                    // forks later is born in the jobs group too. A failure
                    // leaves it at the agent's level, still under the
                    // node's cap: worth a warning, not the job.
                    if let (Some(procs), true) = (&spec.jobs_cgroup, restored > 0) {
                        if let Err(e) = crate::core::cgroup::move_tree(procs, restored) {
                            tracing::warn!(
                                pid = restored,
                                "restored job left out of the jobs cgroup: {e}"
                            );
                        }
                    }
                }
                true
            },
            &watch,
        );
        self.spare.refill();
        if let Err(SwrkError::Stopped(why)) = &result {
            // The worker is dead; the half-restored tree is not (its tasks
            // may be blocked, e.g. on a file lock). It is our child
            // (rst_sibling) and the init of its own PID namespace, so
            // killing it takes every task of the tree along. Where its
            // tasks were stuck says why (fcntl_setlk: a lock).
            let stuck = waiting_in(restored);
            kill_restored_tree(restored);
            if restored > 0 {
                reap_killed(restored);
            }
            return Err(CriuError::Stopped {
                op: "restore",
                detail: format!(
                    "{why}; CRIU and the half-restored job were killed{}: {}",
                    if stuck.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (its tasks were waiting in the kernel in {})",
                            stuck.join(", ")
                        )
                    },
                    log_excerpt(&spec.image_dir.join(RESTORE_LOG))
                ),
            });
        }
        if result.is_err() && restored > 0 {
            // CRIU killed the tree it could not finish; its init is our
            // child (rst_sibling), so the zombie is ours to collect.
            reap_killed(restored);
        }
        if let Some(why) = refusal {
            // The gate killed the tree before it ran; the init is our
            // child (rst_sibling): reap it.
            if restored > 0 {
                reap_killed(restored);
            }
            return Err(CriuError::Refused(why));
        }
        result.map_err(|e| failure("restore", e, &spec.image_dir.join(RESTORE_LOG)))?;
        if restored <= 0 {
            return Err(CriuError::Failed {
                op: "restore",
                detail: "CRIU reported success but sent no post-restore pid".into(),
            });
        }
        Ok(RestoreOutcome { pid: restored })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_defaults_and_refuses_nonsense() {
        assert_eq!(parse_log_level(None), DEFAULT_LOG_LEVEL);
        assert_eq!(parse_log_level(Some("")), DEFAULT_LOG_LEVEL);
        assert_eq!(parse_log_level(Some("4")), 4);
        assert_eq!(parse_log_level(Some(" 0 ")), 0);
        assert_eq!(parse_log_level(Some("5")), DEFAULT_LOG_LEVEL);
        assert_eq!(parse_log_level(Some("-1")), DEFAULT_LOG_LEVEL);
        assert_eq!(parse_log_level(Some("debug")), DEFAULT_LOG_LEVEL);
    }
}
