//! `mosmon`: a live view of every node's load, like MOSIX's `mon`.
//!
//! Every interval it asks all agents for their load (concurrently, with a
//! deadline, so one dead node cannot stall the view) and one reachable agent
//! for the job registry, then shows per node: a load bar, the raw numbers,
//! the jobs running there and the migrations in flight.
//!
//! Three ways to show it:
//! - the interactive terminal view (ratatui), the default on a terminal;
//! - `--plain`: one plain-text snapshot per interval, for logs and scripts
//!   (also used automatically when stdout is not a terminal);
//! - `--once`: a single plain-text snapshot.
//!
//! The plain format is parsed by `make demo` and the integration tests, so
//! keep it stable (see [`render_plain`]):
//!
//! ```text
//! mosmon 12:34:56 cluster local
//! node1    [##############################]  load 4.00 cap 1.00 norm 4.00 jobs 4 mig 0 mem 20.1 GiB free
//! node2    [                              ]  load 0.00 cap 1.00 norm 0.00 jobs 0 mig 0 mem 20.3 GiB free
//! node3    DOWN (timed out)
//! node4    [                              ]  load 0.00 cap 1.00 norm 0.00 jobs 0 mig 0 mem 20.3 GiB free BLOCKED
//! total jobs 4, migrations in flight 0, imbalance inf
//! ```

use crate::api::pb;
use crate::cli::common::{human_bytes, poll_loads, state_name, status_err, Ctx};
use anyhow::{anyhow, bail, Context};
use clap::Parser;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, LineGauge, Paragraph, Row, Table};
use ratatui::{DefaultTerminal, Frame};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

/// Width of the plain-text load bar, in characters.
pub const BAR_WIDTH: usize = 30;

/// The bar is full at this normalised load at least, so that an idle or
/// evenly loaded cluster does not show full bars (a node at norm 1.0 is
/// exactly busy, not overloaded); a busier node stretches the scale.
pub const MIN_BAR_SCALE: f64 = 2.0;

/// How long one sample may take. Bounded separately from the interval: a
/// short interval must not make healthy but slow agents look down, and a dead
/// node must not freeze the view for long.
const POLL_DEADLINE: Duration = Duration::from_secs(2);

/// mosmon: watch every node's load, jobs and migrations live.
///
/// On a terminal it shows a live view (q or Esc to quit). When stdout is not
/// a terminal, or with --plain, it prints one plain-text snapshot per
/// interval instead; --once prints a single snapshot and exits.
///
/// Plain format: a header `mosmon HH:MM:SS cluster NAME`, one line per node
/// (`NAME [bar] load L cap C norm N jobs J mig M mem SIZE free`, or
/// `NAME DOWN (reason)`), then `total jobs N, migrations in flight M,
/// imbalance X` where imbalance is the highest over the lowest normalised
/// load of the nodes that are up (`inf` if the lowest is 0, `n/a` if no node
/// is up). The bar is full at normalised load 2.0, or at the busiest node's
/// if that is higher.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
pub struct Args {
    /// Cluster file [default: $MOSIX_CLUSTER or /run/mosix/local/cluster.json].
    #[arg(long, value_name = "PATH")]
    pub cluster: Option<PathBuf>,
    /// Seconds between refreshes (fractions allowed, must be > 0).
    #[arg(long, short, value_name = "SECS", default_value = "1.0", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print one plain-text snapshot and exit.
    #[arg(long, conflicts_with = "count")]
    pub once: bool,
    /// Print plain-text snapshots, one per interval, instead of the live view
    /// (for logs; the default when stdout is not a terminal).
    #[arg(long)]
    pub plain: bool,
    /// Stop after N plain-text snapshots (implies --plain) [default: never].
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

/// `--interval`: a positive, finite number of seconds.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    // Written so that NaN fails too.
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("must be more than 0 seconds, got {s}"));
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| format!("{s} seconds is too long"))?;
    // Sub-millisecond intervals round to zero in tokio's timer, which panics
    // on a zero period.
    if d < Duration::from_millis(1) {
        return Err(format!("must be at least 0.001 seconds, got {s}"));
    }
    Ok(d)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let ctx = Arc::new(Ctx::load(a.cluster.as_deref())?);
    if a.once {
        return run_plain(&ctx, a.interval, Some(1)).await;
    }
    if a.plain || a.count.is_some() {
        return run_plain(&ctx, a.interval, a.count).await;
    }
    if !std::io::stdout().is_terminal() {
        eprintln!("mosmon: stdout is not a terminal; printing plain snapshots (as with --plain)");
        return run_plain(&ctx, a.interval, None).await;
    }
    run_tui(ctx, a.interval).await
}

// ---------------------------------------------------------------------------
// Sampling

/// One node as shown: what its agent reported, or why it did not answer.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub name: String,
    pub up: bool,
    /// Why the node is down (empty when up).
    pub error: String,
    pub load: f64,
    pub capacity: f64,
    /// Jobs running on the node now (frozen ones use no CPU and are not counted).
    pub jobs: u32,
    pub migrations: u32,
    pub mem_available: u64,
    /// Blocked by an administrator (`mosctl block`): takes no new job.
    pub blocked: bool,
}

impl NodeRow {
    /// Load per unit of capacity; 0 for a node that reports no capacity
    /// rather than a division by zero.
    pub fn norm(&self) -> f64 {
        if self.capacity > 0.0 && self.load.is_finite() {
            self.load / self.capacity
        } else {
            0.0
        }
    }
}

/// Everything one refresh shows.
#[derive(Debug, Clone)]
struct Snapshot {
    time: String,
    nodes: Vec<NodeRow>,
    /// Unfinished jobs from the registry (empty if it could not be read).
    jobs: Vec<pb::Job>,
    /// Why the registry could not be read; counts then come from the agents.
    jobs_error: Option<String>,
    total_jobs: usize,
    in_flight: usize,
}

/// Take one sample: all loads concurrently, then the registry from a node
/// that just answered.
async fn sample(ctx: &Ctx) -> Snapshot {
    let loads = poll_loads(ctx, POLL_DEADLINE).await;
    // Ask only nodes that are up: `Ctx::any_agent` would try dead ones first
    // and spend the whole deadline on them.
    let up: Vec<&str> = loads
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(n, _)| n.as_str())
        .collect();
    let jobs = list_jobs(ctx, &up).await;
    build_snapshot(local_hms(), loads, jobs)
}

/// Unfinished jobs from the registry, asking the given nodes in turn.
async fn list_jobs(ctx: &Ctx, nodes: &[&str]) -> Result<Vec<pb::Job>, String> {
    let mut last = "no node is reachable".to_string();
    for node in nodes {
        let r = tokio::time::timeout(POLL_DEADLINE, async {
            let mut c = ctx.agent(node).await?;
            c.list_jobs(pb::ListJobsRequest {
                node: String::new(),
                include_finished: false,
            })
            .await
            .map(|r| r.into_inner().jobs)
            .map_err(|s| status_err("listing jobs", s))
        })
        .await
        .unwrap_or_else(|_| Err(anyhow!("listing jobs on {node} timed out")));
        match r {
            Ok(jobs) => return Ok(jobs),
            Err(e) => {
                ctx.forget(node);
                last = format!("{e:#}");
            }
        }
    }
    Err(last)
}

fn is_state(j: &pb::Job, s: pb::JobState) -> bool {
    j.state == s as i32
}

/// Combine the agents' loads with the registry's jobs.
fn build_snapshot(
    time: String,
    loads: Vec<(String, Result<pb::NodeLoad, String>)>,
    jobs: Result<Vec<pb::Job>, String>,
) -> Snapshot {
    let (jobs, jobs_error) = match jobs {
        Ok(j) => (Some(j), None),
        Err(e) => (None, Some(e)),
    };
    let on_node = |node: &str, state: pb::JobState| -> u32 {
        jobs.iter()
            .flatten()
            .filter(|j| j.node == node && is_state(j, state))
            .count()
            .try_into()
            .unwrap_or(u32::MAX)
    };
    let mut agents_in_flight: usize = 0;
    let nodes: Vec<NodeRow> = loads
        .into_iter()
        .map(|(name, r)| match r {
            Ok(l) => {
                agents_in_flight += l.migrations_in_flight as usize;
                // The registry is the cluster-wide truth for which jobs are
                // where; the agent's own count is the fallback when the
                // registry cannot be read.
                let jobs_here = if jobs.is_some() {
                    on_node(&name, pb::JobState::Running) + on_node(&name, pb::JobState::Migrating)
                } else {
                    l.jobs_running
                };
                // The agent and the registry see the same migration from two
                // sides (the agent counts transfers it drives, the registry
                // marks the job migrating); adding them would count it twice,
                // and either may lag the other, so take the larger.
                let migrations = l
                    .migrations_in_flight
                    .max(on_node(&name, pb::JobState::Migrating));
                NodeRow {
                    name,
                    up: true,
                    error: String::new(),
                    load: l.load,
                    capacity: l.capacity,
                    jobs: jobs_here,
                    migrations,
                    mem_available: l.mem_available_bytes,
                    blocked: l.blocked,
                }
            }
            Err(e) => NodeRow {
                name,
                up: false,
                error: e,
                load: 0.0,
                capacity: 0.0,
                jobs: 0,
                migrations: 0,
                mem_available: 0,
                blocked: false,
            },
        })
        .collect();
    let (jobs, total_jobs, in_flight) = match jobs {
        Some(jobs) => {
            let migrating = jobs
                .iter()
                .filter(|j| is_state(j, pb::JobState::Migrating))
                .count();
            // Same reasoning as per node: one migration, two witnesses.
            let in_flight = migrating.max(agents_in_flight);
            let total = jobs.len();
            (jobs, total, in_flight)
        }
        None => {
            let total = nodes.iter().map(|n| n.jobs as usize).sum();
            (Vec::new(), total, agents_in_flight)
        }
    };
    Snapshot {
        time,
        nodes,
        jobs,
        jobs_error,
        total_jobs,
        in_flight,
    }
}

/// The local wall-clock time as HH:MM:SS.
fn local_hms() -> String {
    // SAFETY: `time` with a null pointer only returns the time; `localtime_r`
    // writes into the `tm` we own and touches no shared state but the
    // timezone, which it initialises itself.
    let (ok, tm) = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        let ok = !libc::localtime_r(&now, &mut tm).is_null();
        (ok, tm)
    };
    if ok {
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    } else {
        // No usable timezone: UTC is still a correct clock.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!(
            "{:02}:{:02}:{:02}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60
        )
    }
}

// ---------------------------------------------------------------------------
// Plain text

/// The normalised load at which bars are full: [`MIN_BAR_SCALE`], or the
/// busiest up node's if higher, so every bar fits and stays comparable.
fn bar_scale(nodes: &[NodeRow]) -> f64 {
    nodes
        .iter()
        .filter(|n| n.up)
        .map(NodeRow::norm)
        .fold(MIN_BAR_SCALE, f64::max)
}

/// How many of `width` cells a bar at `norm` fills on `scale`.
fn bar_cells(norm: f64, scale: f64, width: usize) -> usize {
    let cells = (norm / scale * width as f64).round();
    // `as` saturates (and maps NaN to 0); the min keeps odd inputs in the bar.
    (cells as usize).min(width)
}

/// Highest over lowest normalised load of the up nodes: `inf` when some node
/// is idle while another is not, `1.00` when all are idle, `n/a` when none
/// is up.
pub fn imbalance_text(nodes: &[NodeRow]) -> String {
    let norms: Vec<f64> = nodes.iter().filter(|n| n.up).map(NodeRow::norm).collect();
    if norms.is_empty() {
        return "n/a".to_string();
    }
    let max = norms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = norms.iter().copied().fold(f64::INFINITY, f64::min);
    if min <= 0.0 {
        if max > 0.0 {
            "inf".to_string()
        } else {
            "1.00".to_string()
        }
    } else {
        format!("{:.2}", max / min)
    }
}

/// One plain-text snapshot (see the module docs for the format). Ends with a
/// newline.
pub fn render_plain(
    cluster_name: &str,
    time: &str,
    nodes: &[NodeRow],
    total_jobs: usize,
    in_flight: usize,
) -> String {
    use std::fmt::Write as _;
    let scale = bar_scale(nodes);
    let mut out = format!("mosmon {time} cluster {cluster_name}\n");
    // `write!` into a String cannot fail; the results are ignored for that reason.
    for n in nodes {
        if !n.up {
            let _ = writeln!(out, "{:<8} DOWN ({})", n.name, n.error);
            continue;
        }
        let fill = bar_cells(n.norm(), scale, BAR_WIDTH);
        let _ = writeln!(
            out,
            "{:<8} [{}{}]  load {:.2} cap {:.2} norm {:.2} jobs {} mig {} mem {} free{}",
            n.name,
            "#".repeat(fill),
            " ".repeat(BAR_WIDTH - fill),
            n.load,
            n.capacity,
            n.norm(),
            n.jobs,
            n.migrations,
            human_bytes(n.mem_available),
            if n.blocked { " BLOCKED" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "total jobs {total_jobs}, migrations in flight {in_flight}, imbalance {}",
        imbalance_text(nodes)
    );
    out
}

/// Print `count` snapshots (or forever), one per interval.
async fn run_plain(ctx: &Ctx, interval: Duration, count: Option<u64>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(interval);
    // A slow sample (a dead node's deadline) delays the next one rather than
    // triggering a burst of catch-up samples.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut printed: u64 = 0;
    loop {
        tick.tick().await;
        let s = sample(ctx).await;
        let mut text = render_plain(&ctx.cf.name, &s.time, &s.nodes, s.total_jobs, s.in_flight);
        if printed > 0 {
            // A blank line between snapshots keeps a log readable; every
            // snapshot still starts with its `mosmon` header.
            text.insert(0, '\n');
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            // `mosmon --plain | head` closing the pipe is a normal end.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// Terminal view

/// Restores the terminal however the view ends (return, `?`, panic unwinding)
/// and stops the input thread first, so it cannot swallow keystrokes meant
/// for the shell afterwards.
struct TerminalGuard {
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if terminal_gone() {
            // Nothing to restore, and the reader may be stuck in crossterm's
            // poll on the dead pty: joining it would hang; exiting ends it.
            return;
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        ratatui::restore();
    }
}

/// Read terminal events on a plain thread: crossterm's reads block, and a
/// plain thread (unlike `spawn_blocking`) does not hold up the runtime's
/// shutdown. It polls with a timeout so it notices `stop`.
fn spawn_input_reader(
    tx: mpsc::UnboundedSender<std::io::Result<Event>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mosmon-input".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // A hung-up terminal (e.g. its tmux session killed without
                // a SIGHUP reaching us) makes crossterm's poll spin inside
                // itself; ask the kernel directly and stop instead.
                let mut pfd = libc::pollfd {
                    fd: 0,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let r = unsafe { libc::poll(&mut pfd, 1, 0) };
                let hup = (r > 0
                    && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
                    || terminal_gone();
                let ev = match event::poll(Duration::from_millis(100)) {
                    _ if hup => Err(std::io::Error::other("the terminal is gone")),
                    Ok(false) => continue,
                    Ok(true) => event::read(),
                    Err(e) => Err(e),
                };
                let failed = ev.is_err();
                if tx.send(ev).is_err() || failed {
                    return;
                }
            }
        })
}

/// The pty behind stdin was removed (seen when tmux kills a pane).
fn terminal_gone() -> bool {
    std::fs::read_link("/proc/self/fd/0")
        .map(|p| p.to_string_lossy().ends_with(" (deleted)"))
        .unwrap_or(false)
}

struct App {
    cluster: String,
    interval: Duration,
    snap: Option<Snapshot>,
}

async fn run_tui(ctx: Arc<Ctx>, interval: Duration) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    // The guard exists before the terminal is touched so that a half-done
    // init (raw mode on, alternate screen failed) is undone too.
    let mut guard = TerminalGuard {
        stop: stop.clone(),
        reader: None,
    };
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let (key_tx, mut key_rx) = mpsc::unbounded_channel();
    guard.reader = Some(spawn_input_reader(key_tx, stop).context("starting the input thread")?);

    // Sampling runs in its own task so keys stay responsive while a slow
    // node is being waited for.
    let (snap_tx, mut snap_rx) = watch::channel::<Option<Snapshot>>(None);
    let (now_tx, mut now_rx) = mpsc::channel::<()>(1);
    let sampler = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(()) = now_rx.recv() => {}
                }
                let s = sample(&ctx).await;
                if snap_tx.send(Some(s)).is_err() {
                    return;
                }
            }
        })
    };
    let r = tui_loop(
        &mut terminal,
        App {
            cluster: ctx.cf.name.clone(),
            interval,
            snap: None,
        },
        &mut snap_rx,
        &mut key_rx,
        &now_tx,
    )
    .await;
    sampler.abort();
    drop(guard);
    r
}

async fn tui_loop(
    terminal: &mut DefaultTerminal,
    mut app: App,
    snap_rx: &mut watch::Receiver<Option<Snapshot>>,
    key_rx: &mut mpsc::UnboundedReceiver<std::io::Result<Event>>,
    now_tx: &mpsc::Sender<()>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // In raw mode Ctrl-C arrives as a key, but a `kill` or a closed terminal
    // still sends signals; end cleanly on them so the terminal is restored.
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    // crossterm's poll can spin forever on a pty that was removed (a killed
    // tmux pane) without a SIGHUP reaching us: check once a second.
    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    loop {
        terminal
            .draw(|f| draw(f, &app))
            .context("drawing the terminal view")?;
        tokio::select! {
            r = snap_rx.changed() => {
                if r.is_err() {
                    bail!("the sampler stopped");
                }
                app.snap = snap_rx.borrow_and_update().clone();
            }
            ev = key_rx.recv() => match ev {
                None => bail!("terminal input closed"),
                Some(Err(e)) => return Err(e).context("reading terminal input"),
                Some(Ok(Event::Key(k))) if k.kind == KeyEventKind::Press => match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Char('r') => {
                        // A refresh already queued is as good as a second one.
                        let _ = now_tx.try_send(());
                    }
                    _ => {}
                },
                // Resizes and the rest: just redraw.
                Some(Ok(_)) => {}
            },
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
            _ = watchdog.tick() => {
                if terminal_gone() {
                    bail!("the terminal is gone");
                }
            }
        }
    }
}

/// Green while a node has spare capacity, yellow when it is full, red when
/// jobs are waiting for CPU.
fn load_color(norm: f64) -> Color {
    if norm < 0.8 {
        Color::Green
    } else if norm <= 1.0 {
        Color::Yellow
    } else {
        Color::Red
    }
}

fn draw(f: &mut Frame, app: &App) {
    let area = f.area();
    let n_nodes = app.snap.as_ref().map_or(1, |s| s.nodes.len().max(1));
    let rows = u16::try_from(n_nodes).unwrap_or(u16::MAX);
    let [header, bars, table, jobs, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(rows.saturating_add(2)),
        Constraint::Length(rows.saturating_add(3)),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);

    let bold = Style::new().add_modifier(Modifier::BOLD);
    let dim = Style::new().fg(Color::DarkGray);
    let mut head = vec![
        Span::styled("mosmon", bold),
        Span::raw(format!("  cluster {}", app.cluster)),
    ];
    if let Some(s) = &app.snap {
        head.push(Span::raw(format!("  {}", s.time)));
    }
    head.push(Span::styled(
        format!("  every {:.1}s", app.interval.as_secs_f64()),
        dim,
    ));
    f.render_widget(Paragraph::new(Line::from(head)), header);

    let footer_keys = Line::from(vec![
        Span::styled(" q", bold),
        Span::raw("/"),
        Span::styled("Esc", bold),
        Span::raw(" quit  "),
        Span::styled("r", bold),
        Span::raw(" refresh now"),
    ]);
    let [keys_area, totals_area] =
        Layout::horizontal([Constraint::Length(27), Constraint::Min(0)]).areas(footer);
    f.render_widget(Paragraph::new(footer_keys), keys_area);

    let Some(s) = &app.snap else {
        f.render_widget(
            Paragraph::new("sampling the nodes...").block(Block::bordered().title(" Load ")),
            bars,
        );
        return;
    };

    draw_bars(f, bars, s);
    draw_node_table(f, table, s);
    draw_jobs(f, jobs, s);

    let totals = format!(
        "total jobs {}  migrations in flight {}  imbalance {} ",
        s.total_jobs,
        s.in_flight,
        imbalance_text(&s.nodes)
    );
    f.render_widget(
        Paragraph::new(Line::from(totals).right_aligned()).style(bold),
        totals_area,
    );
}

/// One bar per node, on the same scale as the plain output.
fn draw_bars(f: &mut Frame, area: Rect, s: &Snapshot) {
    let scale = bar_scale(&s.nodes);
    let block = Block::bordered().title(format!(" Load per capacity (full bar = {scale:.2}) "));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let name_w = s
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(0)
        .max(6);
    for (i, n) in s.nodes.iter().enumerate() {
        let Ok(dy) = u16::try_from(i) else { break };
        if dy >= inner.height {
            break;
        }
        let row = Rect {
            y: inner.y + dy,
            height: 1,
            ..inner
        };
        let label = format!("{:<name_w$}", n.name);
        if !n.up {
            let line = Line::from(vec![
                Span::raw(label),
                Span::styled(
                    format!(" DOWN ({})", n.error),
                    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                ),
            ]);
            f.render_widget(Paragraph::new(line), row);
            continue;
        }
        let [gauge, text] =
            Layout::horizontal([Constraint::Min(10), Constraint::Length(34)]).areas(row);
        let norm = n.norm();
        let ratio = if scale > 0.0 {
            (norm / scale).clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Block characters rather than colour alone, so the bars read on
        // monochrome terminals and in captured text.
        f.render_widget(
            LineGauge::default()
                .ratio(if ratio.is_finite() { ratio } else { 0.0 })
                .label(label)
                .filled_symbol("█")
                .unfilled_symbol("░")
                .filled_style(Style::new().fg(load_color(norm)))
                .unfilled_style(Style::new().fg(Color::DarkGray)),
            gauge,
        );
        f.render_widget(
            Paragraph::new(format!(
                " norm {:>5.2}  ({:.2} / {:.2} cap){}",
                norm,
                n.load,
                n.capacity,
                if n.blocked { " BLOCKED" } else { "" }
            )),
            text,
        );
    }
}

/// Jobs, migrations and memory per node.
fn draw_node_table(f: &mut Frame, area: Rect, s: &Snapshot) {
    let header = Row::new([
        "NODE", "STATE", "LOAD", "CAP", "NORM", "JOBS", "MIG", "MEM FREE",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = s.nodes.iter().map(|n| {
        if n.up {
            let mig_style = if n.migrations > 0 {
                Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)
            } else {
                Style::new()
            };
            Row::new([
                Cell::from(n.name.clone()),
                if n.blocked {
                    Cell::from("BLOCKED")
                        .style(Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD))
                } else {
                    Cell::from("up").style(Style::new().fg(Color::Green))
                },
                Cell::from(format!("{:.2}", n.load)),
                Cell::from(format!("{:.2}", n.capacity)),
                Cell::from(format!("{:.2}", n.norm())).style(Style::new().fg(load_color(n.norm()))),
                Cell::from(n.jobs.to_string()),
                Cell::from(n.migrations.to_string()).style(mig_style),
                Cell::from(human_bytes(n.mem_available)),
            ])
        } else {
            Row::new([
                Cell::from(n.name.clone()),
                Cell::from("DOWN").style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
                Cell::from("-"),
                Cell::from("-"),
                Cell::from("-"),
                Cell::from("-"),
                Cell::from("-"),
                Cell::from("-"),
            ])
        }
    });
    let name_w = s
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let widths = [
        Constraint::Length(u16::try_from(name_w).unwrap_or(u16::MAX)),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(4),
        Constraint::Length(11),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title(" Nodes ")),
        area,
    );
}

/// The registry's jobs, migrations in flight first since they are what
/// changes.
fn draw_jobs(f: &mut Frame, area: Rect, s: &Snapshot) {
    let block = Block::new().borders(Borders::ALL);
    if let Some(e) = &s.jobs_error {
        f.render_widget(
            Paragraph::new(format!("job registry unavailable: {e}"))
                .style(Style::new().fg(Color::Red))
                .block(block.title(" Jobs ")),
            area,
        );
        return;
    }
    let count = |st: pb::JobState| s.jobs.iter().filter(|j| is_state(j, st)).count();
    let title = format!(
        " Jobs: {} ({} migrating, {} frozen) ",
        s.jobs.len(),
        count(pb::JobState::Migrating),
        count(pb::JobState::Frozen)
    );
    let mut jobs: Vec<&pb::Job> = s.jobs.iter().collect();
    jobs.sort_by(|a, b| {
        let rank = |j: &pb::Job| !is_state(j, pb::JobState::Migrating);
        (rank(a), &a.node, &a.id).cmp(&(rank(b), &b.node, &b.id))
    });
    let header = Row::new(["JOB", "NODE", "STATE", "MIGR", "COMMAND"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = jobs.into_iter().map(|j| {
        let st = state_name(j.state);
        let style = match st {
            "migrating" => Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
            "frozen" => Style::new().fg(Color::Blue),
            _ => Style::new(),
        };
        let label = if j.name.is_empty() {
            j.argv.join(" ")
        } else {
            format!("[{}] {}", j.name, j.argv.join(" "))
        };
        Row::new([
            Cell::from(j.id.clone()),
            Cell::from(j.node.clone()),
            Cell::from(st).style(style),
            Cell::from(moves_cell(j)),
            Cell::from(label),
        ])
    });
    let widths = [
        Constraint::Length(13),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(4),
        Constraint::Min(10),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(block.title(title)),
        area,
    );
}

/// Migrations of a job, and restarts from checkpoints after a node died
/// (`3+1R`).
fn moves_cell(j: &pb::Job) -> String {
    let restarts = j
        .history
        .iter()
        .filter(|m| m.restored_from_checkpoint > 0)
        .count();
    let moves = j.history.len() - restarts;
    if restarts == 0 {
        moves.to_string()
    } else {
        format!("{moves}+{restarts}R")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, load: f64, capacity: f64) -> NodeRow {
        NodeRow {
            name: name.into(),
            up: true,
            error: String::new(),
            load,
            capacity,
            jobs: 0,
            migrations: 0,
            mem_available: 1 << 30,
            blocked: false,
        }
    }

    fn down(name: &str, why: &str) -> NodeRow {
        NodeRow {
            name: name.into(),
            up: false,
            error: why.into(),
            load: 0.0,
            capacity: 0.0,
            jobs: 0,
            migrations: 0,
            mem_available: 0,
            blocked: false,
        }
    }

    /// The part between the brackets of a node line.
    fn bar(line: &str) -> &str {
        let a = line.find('[').map_or(0, |i| i + 1);
        let b = line.find(']').unwrap_or(a);
        &line[a..b]
    }

    #[test]
    fn exact_format() {
        let mut n = up("node1", 4.0, 1.0);
        n.jobs = 4;
        n.mem_available = 20 * (1 << 30);
        let out = render_plain("demo", "12:34:56", &[n, up("node2", 0.0, 1.0)], 4, 0);
        assert_eq!(
            out,
            format!(
                "mosmon 12:34:56 cluster demo\n\
                 node1    [{}]  load 4.00 cap 1.00 norm 4.00 jobs 4 mig 0 mem 20.0 GiB free\n\
                 node2    [{}]  load 0.00 cap 1.00 norm 0.00 jobs 0 mig 0 mem 1.0 GiB free\n\
                 total jobs 4, migrations in flight 0, imbalance inf\n",
                "#".repeat(30),
                " ".repeat(30)
            )
        );
    }

    #[test]
    fn a_blocked_node_is_marked() {
        let mut n = up("node2", 0.0, 1.0);
        n.blocked = true;
        let out = render_plain("c", "t", &[up("node1", 1.0, 1.0), n], 0, 0);
        let lines: Vec<&str> = out.lines().collect();
        assert!(!lines[1].ends_with("BLOCKED"), "{}", lines[1]);
        assert!(lines[2].ends_with(" free BLOCKED"), "{}", lines[2]);
    }

    #[test]
    fn bar_full_at_two_by_default() {
        let out = render_plain(
            "c",
            "00:00:00",
            &[up("a", 1.0, 1.0), up("b", 2.0, 1.0), up("c", 0.5, 1.0)],
            0,
            0,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            bar(lines[1]),
            format!("{}{}", "#".repeat(15), " ".repeat(15))
        );
        assert_eq!(bar(lines[2]), "#".repeat(30));
        assert_eq!(bar(lines[3]).trim_end().len(), 8); // 7.5 rounds to 8
        for l in &lines[1..4] {
            assert_eq!(bar(l).len(), BAR_WIDTH);
        }
    }

    #[test]
    fn bar_scales_to_busiest_node() {
        // norm 4 is the scale: 4 -> full, 1 -> a quarter (7.5 -> 8 cells).
        let out = render_plain("c", "t", &[up("a", 8.0, 2.0), up("b", 1.0, 1.0)], 0, 0);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(bar(lines[1]), "#".repeat(30));
        assert_eq!(bar(lines[2]).trim_end(), "#".repeat(8));
        assert!(lines[1].contains("norm 4.00"));
    }

    #[test]
    fn down_node_line_and_ignored_in_scale_and_imbalance() {
        let out = render_plain(
            "c",
            "t",
            &[
                up("node1", 1.0, 1.0),
                down("node3", "timed out"),
                up("node2", 2.0, 1.0),
            ],
            3,
            1,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[2], "node3    DOWN (timed out)");
        assert_eq!(bar(lines[3]), "#".repeat(30));
        assert_eq!(
            lines[4],
            "total jobs 3, migrations in flight 1, imbalance 2.00"
        );
    }

    #[test]
    fn imbalance_cases() {
        assert_eq!(
            imbalance_text(&[up("a", 0.0, 1.0), up("b", 0.0, 2.0)]),
            "1.00"
        );
        assert_eq!(
            imbalance_text(&[up("a", 0.0, 1.0), up("b", 1.0, 1.0)]),
            "inf"
        );
        assert_eq!(
            imbalance_text(&[up("a", 3.0, 2.0), up("b", 1.0, 2.0)]),
            "3.00"
        );
        assert_eq!(imbalance_text(&[up("a", 1.0, 1.0)]), "1.00");
        assert_eq!(imbalance_text(&[down("a", "x")]), "n/a");
        assert_eq!(imbalance_text(&[]), "n/a");
        let out = render_plain("c", "t", &[down("a", "x")], 0, 0);
        assert!(out.ends_with("imbalance n/a\n"), "{out}");
    }

    #[test]
    fn zero_capacity_does_not_panic() {
        let nodes = [up("a", 3.0, 0.0), up("b", 1.0, 1.0)];
        let out = render_plain("c", "t", &nodes, 0, 0);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].contains("cap 0.00 norm 0.00"), "{out}");
        assert_eq!(bar(lines[1]), " ".repeat(30));
        assert!(out.ends_with("imbalance inf\n"), "{out}");
        // Odd agent values must not break the bar either.
        let odd = [
            up("a", f64::NAN, 1.0),
            up("b", f64::INFINITY, 1.0),
            up("c", -1.0, 1.0),
        ];
        let out = render_plain("c", "t", &odd, 0, 0);
        for l in out.lines().skip(1).take(3) {
            assert_eq!(bar(l).len(), BAR_WIDTH, "{out}");
        }
    }

    #[test]
    fn interval_parsing() {
        assert_eq!(parse_interval("1.0"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("0.25"), Ok(Duration::from_millis(250)));
        for bad in ["0", "-1", "abc", "NaN", "inf", "0.0000001"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }

    fn job(id: &str, node: &str, state: pb::JobState) -> pb::Job {
        pb::Job {
            id: id.into(),
            node: node.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn load(node: &str, load: f64, running: u32, in_flight: u32) -> pb::NodeLoad {
        pb::NodeLoad {
            node: node.into(),
            load,
            capacity: 1.0,
            jobs_running: running,
            migrations_in_flight: in_flight,
            ..Default::default()
        }
    }

    #[test]
    fn snapshot_counts_from_registry() {
        use pb::JobState::*;
        let s = build_snapshot(
            "t".into(),
            vec![
                ("node1".into(), Ok(load("node1", 2.0, 9, 1))),
                ("node2".into(), Ok(load("node2", 0.0, 9, 0))),
                ("node3".into(), Err("down".into())),
            ],
            Ok(vec![
                job("a", "node1", Running),
                job("b", "node1", Migrating),
                job("c", "node2", Frozen),
                job("d", "node3", Running),
            ]),
        );
        let jobs: Vec<u32> = s.nodes.iter().map(|n| n.jobs).collect();
        let mig: Vec<u32> = s.nodes.iter().map(|n| n.migrations).collect();
        assert_eq!(jobs, [2, 0, 0]);
        assert_eq!(mig, [1, 0, 0]);
        assert_eq!(s.total_jobs, 4);
        // One migration seen by both the agent and the registry counts once.
        assert_eq!(s.in_flight, 1);
        assert!(!s.nodes[2].up);
    }

    #[test]
    fn snapshot_falls_back_to_agents_without_registry() {
        let s = build_snapshot(
            "t".into(),
            vec![
                ("node1".into(), Ok(load("node1", 2.0, 2, 1))),
                ("node2".into(), Ok(load("node2", 0.0, 1, 1))),
            ],
            Err("no node is reachable".into()),
        );
        assert_eq!(s.total_jobs, 3);
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.jobs_error.as_deref(), Some("no node is reachable"));
    }

    #[test]
    fn tui_draws_without_panicking() {
        use ratatui::backend::TestBackend;
        use ratatui::Terminal;
        let s = build_snapshot(
            "12:00:00".into(),
            vec![
                ("node1".into(), Ok(load("node1", 3.0, 1, 0))),
                ("node2".into(), Err("timed out".into())),
            ],
            Ok(vec![job("j1", "node1", pb::JobState::Migrating)]),
        );
        for (w, h) in [(100, 30), (20, 5), (1, 1)] {
            let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
            for snap in [None, Some(s.clone())] {
                let app = App {
                    cluster: "c".into(),
                    interval: Duration::from_secs(1),
                    snap,
                };
                t.draw(|f| draw(f, &app)).unwrap();
            }
        }
    }
}
