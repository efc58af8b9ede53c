//! `mosrun`: run a command on the best node (or a given one), in the
//! foreground as if it ran here, or in the background with `-d`.
//!
//! Foreground: mosrun talks to its **home agent** (see [`home_node`]) over
//! the agent's Unix socket (`Runner.Run`; no TLS, the agent takes our
//! uid/gid from the socket) or, if the node has no socket, over mTLS. The
//! agent places the job, starts it and streams it back; see
//! `agent::runner` and ARCHITECTURE.md ("Foreground jobs and placement").
//!
//! Stats: with `MOSIX_RUN_STATS=FILE`, one line per run is appended with a
//! single `write` (O_APPEND), so concurrent mosruns never interleave:
//! `node=N job=J place_ms=F start_ms=F total_ms=F exit=N reruns=K queue_ms=F cpu_ms=F`
//! (`start_ms`: from mosrun's start until the job's process existed on its
//! node; `place_ms`: the placement decision; `queue_ms`: waiting for a slot).

use crate::api::pb;
use crate::balancer::policy;
use crate::cli::common::{error_chain, status_err, Ctx};
use crate::core::cluster_file::{ClusterFile, NodeEntry};
use anyhow::{bail, Context};
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Exit status of mosrun's own failures (like `docker run`).
pub const EXIT_MOSRUN: i32 = 125;
/// A shell's "found but cannot execute".
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// A shell's "command not found".
pub const EXIT_NOT_FOUND: i32 = 127;

/// mosrun: run a command on the best node of the cluster, as if it ran here.
///
/// By default mosrun waits for the job: its stdout and stderr stream to
/// ours, our stdin is forwarded (EOF included), SIGINT/SIGTERM/SIGHUP go
/// to the job, and the job is killed if mosrun dies. The cwd, environment,
/// umask, uid and gid are kept (the cwd must be on a path the node sees).
/// With -d it starts the job in the background and prints its id.
///
/// Exit status: the job's, or 128+N if signal N killed it; 127 if the
/// command is not found, 126 if it cannot be executed; 125 if mosrun itself
/// failed (bad usage, unknown node, no reachable node, a working directory
/// the node cannot see, the job's node lost without --rerun-on-node-loss).
///
/// Home agent: --home, else $MOSIX_NODE, else the node whose address is on
/// one of our interfaces (inside a local-cluster node's network namespace,
/// that node), else the cluster file's first node. It places the job on a
/// free slot (see `mosctl slots`), waiting for one when all are taken.
///
/// With MOSIX_RUN_STATS=FILE, one line per run is appended to FILE:
/// node=N job=J place_ms=F start_ms=F total_ms=F exit=N reruns=K queue_ms=F cpu_ms=F
#[derive(Parser, Debug)]
#[command(version, about, long_about, trailing_var_arg = true)]
pub struct Args {
    /// Cluster file [default: $MOSIX_CLUSTER or /run/mosix/local/cluster.json].
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// Start on this node.
    #[arg(long, conflicts_with = "best")]
    pub node: Option<String>,
    /// Start on the best node (the default when --node is not given).
    #[arg(long)]
    pub best: bool,
    /// Start the job in the background: print its id and return.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// If the job's node is lost (its agent unreachable or silent), start
    /// the job again on another node (for jobs that are safe to repeat,
    /// like compiles). Its output is held back until it ends (up to 16 MiB),
    /// so a re-run repeats none of it. A notice is printed on stderr.
    #[arg(long, conflicts_with = "detach")]
    pub rerun_on_node_loss: bool,
    /// Do not read stdin: the job's stdin is empty (like `ssh -n`).
    #[arg(short = 'n', long, conflicts_with = "detach")]
    pub no_stdin: bool,
    /// The home agent's node [default: $MOSIX_NODE, else the local node].
    #[arg(long)]
    pub home: Option<String>,
    /// Pin the job to its node (MOSIX's "stay"): never moved, by the
    /// balancer, a drain or `mosctl migrate`, until `mosctl unpin`.
    #[arg(long)]
    pub pinned: bool,
    /// Never move this job at all.
    #[arg(long)]
    pub no_migrate: bool,
    /// A label for the job.
    #[arg(long, default_value = "")]
    pub name: String,
    /// The job is an instance of this service (mosgw sends the service's
    /// traffic to it); needs --port.
    #[arg(long, requires = "port")]
    pub service: Option<String>,
    /// The TCP port the service instance listens on (on its node's address).
    #[arg(long, requires = "service")]
    pub port: Option<u16>,
    /// Run the job N steps nicer than this mosrun, as `nice -n N` would
    /// (the job keeps mosrun's own nice value by default, like a local
    /// child; mosmake uses 10 so that its compiles yield to the make that
    /// drives them). Values beyond 19 are 19; a node never runs a job at a
    /// higher priority than its default.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        conflicts_with = "detach"
    )]
    pub nice: i32,
    /// Expected memory of the job in MiB, for placement (with -d).
    #[arg(long, default_value_t = 0)]
    pub mem_mib: u64,
    /// Checkpoint the job every DURATION (30s, 5m, 1h30m; at least 1s) to
    /// the shared path without stopping it, so that `mosctl restore` can
    /// bring it back if its node dies, losing only the work since the last
    /// checkpoint. Each freezes the job as long as a migration's dump. The
    /// interval stays with the job when it moves. Needs -d: a foreground
    /// job streams through this mosrun, which no checkpoint brings back.
    #[arg(long, value_name = "DURATION", value_parser = parse_every, requires = "detach")]
    pub checkpoint_every: Option<Duration>,
    /// How many checkpoints to keep (with --checkpoint-every) [default: 3].
    #[arg(
        long,
        value_name = "K",
        requires = "checkpoint_every",
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub checkpoint_keep: Option<u32>,
    /// `own`: the job gets its own network namespace and address, which
    /// move with it, so its established TCP connections survive migration
    /// (on a node whose agent has a job address pool and bridge; elsewhere
    /// it falls back to the node's network and mosrun says so). `node`: the
    /// node's network (the opt-out). Default: the node's default, `own`
    /// where its agent has a job address pool (see `mosixd
    /// --job-net-default`). Needs -d: a foreground job always uses the
    /// node's network.
    #[arg(long, value_parser = ["own", "node"], requires = "detach")]
    pub net: Option<String>,
    /// The command and its arguments (after --).
    #[arg(required = true, num_args = 1..)]
    pub command: Vec<String>,
}

fn parse_every(s: &str) -> Result<Duration, String> {
    let d = crate::checkpoint::duration::parse(s)?;
    if d.as_millis() < u128::from(crate::checkpoint::MIN_EVERY_MS) {
        return Err(format!(
            "{s} is too short: checkpoints freeze the job; use at least 1s"
        ));
    }
    Ok(d)
}

/// The node the policy would place a new job on, from the same cluster view
/// the balancer polls.
pub async fn best_node(ctx: &Ctx, rss: u64) -> anyhow::Result<String> {
    let view = ctx.poll_view().await;
    let down: Vec<String> = view
        .down()
        .into_iter()
        .map(|(n, e)| format!("{n}: {e}"))
        .collect();
    policy::place(
        &view.snapshot(0.0),
        &policy::PolicyConfig::default(),
        rss,
        1.0,
    )
    .with_context(|| {
        if down.is_empty() {
            "no node is up with memory for this job".to_string()
        } else {
            format!(
                "no node is up with memory for this job (down: {})",
                down.join("; ")
            )
        }
    })
}

/// Run mosrun; returns the exit status. `t0` is when the process started.
pub async fn run(a: Args, t0: Instant) -> anyhow::Result<i32> {
    if a.command.is_empty() || a.command[0].is_empty() {
        bail!("give the command to run after --");
    }
    if a.detach {
        detached(a).await?;
        return Ok(0);
    }
    foreground(a, t0).await
}

async fn detached(a: Args) -> anyhow::Result<()> {
    let ctx = Ctx::load(a.cluster.as_deref())?;
    let node = match a.node {
        Some(n) => {
            ctx.cf.node(&n)?;
            n
        }
        None => best_node(&ctx, a.mem_mib << 20).await?,
    };
    let cwd = std::env::current_dir()
        .context("current directory")?
        .to_string_lossy()
        .into_owned();
    let mut c = ctx.agent(&node).await?;
    let job = c
        .launch(pb::LaunchRequest {
            argv: a.command,
            env: std::env::vars().collect(),
            cwd,
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            pinned: a.pinned,
            non_migratable: a.no_migrate,
            name: a.name,
            service: a.service.unwrap_or_default(),
            port: a.port.map(u32::from).unwrap_or(0),
            checkpoint_every_ms: a
                .checkpoint_every
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            checkpoint_keep: a.checkpoint_keep.unwrap_or(0),
            net: a.net.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| status_err(&format!("launching on {node}"), s))?
        .into_inner();
    eprintln!(
        "started {} on {} (pid {}); output: {}{}",
        job.id,
        job.node,
        job.pid,
        job.stdout_path,
        if job.address.is_empty() {
            String::new()
        } else {
            format!("; address {}", job.address)
        }
    );
    if a.net.as_deref() == Some("own") && job.address.is_empty() {
        eprintln!(
            "mosrun: note: {} cannot give jobs their own address (no job address pool or bridge there); {} uses the node's network, and its TCP connections cannot move with it",
            job.node, job.id
        );
    }
    println!("{}", job.id);
    Ok(())
}

/// Which agent mosrun talks to; see the command's help.
pub fn home_node<'a>(cf: &'a ClusterFile, flag: Option<&str>) -> anyhow::Result<&'a NodeEntry> {
    let env = std::env::var("MOSIX_NODE").ok().filter(|s| !s.is_empty());
    if let Some(n) = flag.or(env.as_deref()) {
        return Ok(cf.node(n)?);
    }
    // An address is ours if we can bind to it (cheaper than listing the
    // interfaces, and it answers for this network namespace).
    let local = cf.nodes.iter().find(|n| {
        n.address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| std::net::UdpSocket::bind((ip, 0)).is_ok())
    });
    local
        .or(cf.nodes.first())
        .context("the cluster file lists no node")
}

async fn connect(ctx: &Ctx, home: &NodeEntry) -> anyhow::Result<Channel> {
    if let Some(sock) = home.run_socket.clone().filter(|p| p.exists()) {
        let shown = sock.display().to_string();
        // The URI is a placeholder: the connector ignores it.
        let ch = tonic::transport::Endpoint::from_static("http://mosix.local")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .with_context(|| format!("home agent {} ({shown}) is unreachable", home.name))?;
        return Ok(ch);
    }
    crate::api::client::channel(
        &home.endpoint,
        ctx.tls.as_ref(),
        crate::cli::common::CONNECT_TIMEOUT,
    )
    .await
    .with_context(|| {
        format!(
            "home agent {} ({}) is unreachable",
            home.name, home.endpoint
        )
    })
}

/// Write all of `b` to fd `fd` (our stdout/stderr, unbuffered: output
/// must appear as the job writes it). A closed pipe drops the rest.
fn write_fd(fd: i32, mut b: &[u8]) {
    while !b.is_empty() {
        // SAFETY: b is a valid buffer for its length.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        b = &b[n as usize..];
    }
}

/// Forward our stdin on a thread of its own (a blocking read), EOF included.
fn forward_stdin(tx: mpsc::Sender<pb::RunInput>) {
    use pb::run_input::Msg;
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                // SAFETY: buf is valid for its length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                let msg = if n > 0 {
                    Msg::Stdin(buf[..n as usize].to_vec())
                } else if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                } else {
                    Msg::StdinEof(true)
                };
                let eof = matches!(msg, Msg::StdinEof(_));
                if tx.blocking_send(pb::RunInput { msg: Some(msg) }).is_err() || eof {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("mosrun: cannot forward stdin: {e}");
    }
}

#[derive(Default)]
struct Stats {
    node: String,
    job: String,
    place_ms: f64,
    queue_ms: f64,
    start_ms: f64,
    /// Starts again after a lost node or home agent (each one a notice).
    reruns: u32,
}

impl Stats {
    /// Append the run's line to $MOSIX_RUN_STATS, in one write.
    fn write(&self, t0: Instant, exit: i32) {
        let Some(path) = std::env::var_os("MOSIX_RUN_STATS").filter(|p| !p.is_empty()) else {
            return;
        };
        let line = format!(
            "node={} job={} place_ms={:.3} start_ms={:.3} total_ms={:.3} exit={} reruns={} queue_ms={:.3} cpu_ms={:.3}\n",
            if self.node.is_empty() { "-" } else { &self.node },
            if self.job.is_empty() { "-" } else { &self.job },
            self.place_ms,
            self.start_ms,
            t0.elapsed().as_secs_f64() * 1e3,
            exit,
            self.reruns,
            self.queue_ms,
            own_cpu_ms(),
        );
        use std::io::Write;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            eprintln!(
                "mosrun: cannot append to MOSIX_RUN_STATS={}: {e}",
                PathBuf::from(path).display()
            );
        }
    }
}

/// CPU this mosrun used so far (user + system, all its threads): what a
/// start costs the home node beyond the job itself.
fn own_cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// Our stdin as the home agent gets it: kept for a re-run through another
/// home (with --rerun-on-node-loss), up to a limit.
#[derive(Default)]
struct StdinCopy {
    chunks: Vec<Vec<u8>>,
    bytes: usize,
    eof: bool,
    complete: bool,
}

const MAX_STDIN_COPY: usize = 64 << 20;

impl StdinCopy {
    fn push(&mut self, b: &[u8]) {
        self.bytes += b.len();
        if self.bytes > MAX_STDIN_COPY {
            self.complete = false;
            self.chunks.clear();
        } else if self.complete {
            self.chunks.push(b.to_vec());
        }
    }
}

/// Where our own stdin stands: not read before the job first started (a
/// queued job must not swallow input meant for later), then read by a
/// thread, then done (EOF, or -n).
enum StdinState {
    NotYet,
    Reading(mpsc::Receiver<pb::RunInput>),
    Done,
}

/// How one conversation with a home agent ended.
enum Ended {
    /// The job's status (or mosrun's failure status), all said.
    Status(i32),
    /// The home agent went away before the end: (its node, why).
    HomeLost(String, String),
}

async fn foreground(a: Args, t0: Instant) -> anyhow::Result<i32> {
    use pb::run_input::Msg as In;
    let ctx = Ctx::load(a.cluster.as_deref())?;
    if let Some(n) = &a.node {
        ctx.cf.node(n)?;
    }
    let home = home_node(&ctx.cf, a.home.as_deref())?;
    // The home first, then the others in the cluster file's order: if the
    // home agent is down, another agent places the job.
    let mut homes: Vec<&NodeEntry> = vec![home];
    homes.extend(ctx.cf.nodes.iter().filter(|n| n.name != home.name));
    let cwd = std::env::current_dir()
        .context("the current directory is not usable")?
        .to_string_lossy()
        .into_owned();
    // SAFETY: umask has no preconditions; it is set back at once.
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    let start = pb::RunStart {
        exec: Some(pb::ExecStart {
            argv: a.command.clone(),
            env: std::env::vars_os()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        v.to_string_lossy().into_owned(),
                    )
                })
                .collect(),
            cwd,
            // The Unix socket path replaces these with the peer credentials.
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            umask: Some(umask as u32),
            pinned: a.pinned,
            non_migratable: a.no_migrate,
            name: a.name.clone(),
            take_slot: true,
            nice: Some(
                (crate::core::procfs::nice(std::process::id() as i32).unwrap_or(0) + a.nice)
                    .clamp(-20, 19),
            ),
            service: a.service.clone().unwrap_or_default(),
            port: a.port.map(u32::from).unwrap_or(0),
        }),
        node: a.node.clone().unwrap_or_default(),
        rerun_on_node_loss: a.rerun_on_node_loss,
    };
    let mut sigs = Signals::new()?;
    let mut st = Stats::default();
    let mut copy = StdinCopy {
        complete: true,
        eof: a.no_stdin,
        ..Default::default()
    };
    // Our stdin, read once (from the job's first start) whatever home we
    // talk to.
    let mut stdin_rx = if a.no_stdin {
        StdinState::Done
    } else {
        StdinState::NotYet
    };
    let mut next = 0;
    loop {
        // Connect to the first home that answers.
        let mut channel = None;
        while next < homes.len() {
            let h = homes[next];
            next += 1;
            match connect(&ctx, h).await {
                Ok(ch) => {
                    channel = Some((h, ch));
                    break;
                }
                Err(e) if next < homes.len() => {
                    eprintln!("mosrun: {}; trying {}", error_chain(&e), homes[next].name)
                }
                Err(e) => eprintln!("mosrun: {}", error_chain(&e)),
            }
        }
        let Some((h, ch)) = channel else {
            eprintln!("mosrun: no node of the cluster is reachable");
            st.write(t0, EXIT_MOSRUN);
            return Ok(EXIT_MOSRUN);
        };
        let (tx, rx) = mpsc::channel::<pb::RunInput>(64);
        let mut first = vec![In::Start(start.clone())];
        first.extend(copy.chunks.iter().cloned().map(In::Stdin));
        if copy.eof {
            first.push(In::StdinEof(true));
        }
        for m in first {
            tx.send(pb::RunInput { msg: Some(m) }).await.ok();
        }
        match converse(
            &a,
            h,
            ch,
            tx,
            rx,
            &mut sigs,
            &mut st,
            &mut copy,
            &mut stdin_rx,
            t0,
        )
        .await?
        {
            Ended::Status(code) => {
                st.write(t0, code);
                return Ok(code);
            }
            Ended::HomeLost(node, why) => {
                let rerun = a.rerun_on_node_loss && copy.complete && next < homes.len();
                if !rerun {
                    eprintln!("mosrun: lost the connection to the home agent {node}: {why}");
                    st.write(t0, EXIT_MOSRUN);
                    return Ok(EXIT_MOSRUN);
                }
                eprintln!(
                    "mosrun: home agent {node} lost ({why}); re-running through {}",
                    homes[next].name
                );
                st.reruns += 1;
            }
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, to pass on to the job.
struct Signals(Vec<(tokio::signal::unix::Signal, i32)>);

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut v = Vec::new();
        for (kind, n) in [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
            (SignalKind::hangup(), libc::SIGHUP),
        ] {
            v.push((signal(kind).context("installing signal handlers")?, n));
        }
        Ok(Self(v))
    }

    async fn recv(&mut self) -> i32 {
        let [(a, na), (b, nb), (c, nc)] = &mut self.0[..] else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = a.recv() => *na,
            _ = b.recv() => *nb,
            _ = c.recv() => *nc,
        }
    }
}

/// One Run stream with one home agent, until the job's end or the home's.
#[allow(clippy::too_many_arguments)]
async fn converse(
    a: &Args,
    home: &NodeEntry,
    ch: Channel,
    tx: mpsc::Sender<pb::RunInput>,
    rx: mpsc::Receiver<pb::RunInput>,
    sigs: &mut Signals,
    st: &mut Stats,
    copy: &mut StdinCopy,
    stdin_rx: &mut StdinState,
    t0: Instant,
) -> anyhow::Result<Ended> {
    use pb::run_input::Msg as In;
    use pb::run_output::Msg as Out;
    let lost = |why: String| Ok(Ended::HomeLost(home.name.to_string(), why));
    let mut client = pb::runner_client::RunnerClient::new(ch)
        .max_decoding_message_size(crate::api::client::MAX_MESSAGE_BYTES);
    let mut outs = match client
        .run(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::Unavailable => return lost(s.message().to_string()),
        Err(s) => return Err(status_err(&format!("home agent {}", home.name), s)),
    };
    loop {
        tokio::select! {
            m = outs.message() => {
                let o = match m {
                    Ok(Some(o)) => o,
                    Ok(None) => return lost("it ended the run without an exit status".into()),
                    Err(s) => return lost(s.message().to_string()),
                };
                match o.msg {
                    Some(Out::Placed(p)) => {
                        st.node = p.node;
                        st.place_ms = p.place_ms;
                        st.queue_ms += p.queued_ms;
                    }
                    Some(Out::Started(s)) => {
                        st.job = s.job_id;
                        st.node = s.node;
                        if st.start_ms == 0.0 {
                            st.start_ms = t0.elapsed().as_secs_f64() * 1e3;
                        }
                        if matches!(stdin_rx, StdinState::NotYet) {
                            let (stx, srx) = mpsc::channel(16);
                            forward_stdin(stx);
                            *stdin_rx = StdinState::Reading(srx);
                        }
                    }
                    Some(Out::Stdout(b)) => write_fd(1, &b),
                    Some(Out::Stderr(b)) => write_fd(2, &b),
                    // Every notice is a lost node and a new start elsewhere.
                    Some(Out::Notice(n)) => {
                        st.reruns += 1;
                        eprintln!("mosrun: {n}");
                    }
                    Some(Out::Exit(e)) => {
                        let code = match (e.exit_code, e.exit_signal) {
                            (Some(c), _) => c,
                            (None, Some(s)) => 128 + s,
                            (None, None) => EXIT_MOSRUN,
                        };
                        if !e.error.is_empty() {
                            eprintln!("mosrun: job {} failed: {}", st.job, e.error);
                        }
                        return Ok(Ended::Status(code));
                    }
                    Some(Out::Failure(f)) => {
                        let code = match pb::FailureKind::try_from(f.kind) {
                            Ok(pb::FailureKind::CommandNotFound) => EXIT_NOT_FOUND,
                            Ok(pb::FailureKind::NotExecutable) => EXIT_NOT_EXECUTABLE,
                            _ => EXIT_MOSRUN,
                        };
                        eprintln!("mosrun: {}", f.message);
                        return Ok(Ended::Status(code));
                    }
                    None => {}
                }
            }
            m = async {
                match stdin_rx {
                    StdinState::Reading(r) => r.recv().await,
                    _ => std::future::pending().await,
                }
            } => {
                match &m {
                    Some(pb::RunInput { msg: Some(In::Stdin(b)) }) if a.rerun_on_node_loss => copy.push(b),
                    Some(pb::RunInput { msg: Some(In::StdinEof(_)) }) => copy.eof = true,
                    _ => {}
                }
                match m {
                    Some(m) => { let _ = tx.send(m).await; }
                    // The reader thread ended after EOF: nothing more.
                    None => *stdin_rx = StdinState::Done,
                }
            }
            sig = sigs.recv() => {
                let _ = tx
                    .send(pb::RunInput { msg: Some(In::Signal(sig)) })
                    .await;
            }
        }
    }
}
