//! `mosjob`: workloads for tests, the demo and benchmarks. Each keeps state
//! that shows whether it survived a migration intact.
//!
//! - `counter`: a counter in memory, a file it appends to every tick, a
//!   listening TCP socket that answers `counter=N mem=ok|BAD` per connection,
//!   and optionally N MiB of memory whose checksum is verified on each query.
//!   `--hold fifo:PATH|lock:PATH|lease:PATH` also holds a full FIFO, a POSIX
//!   lock or a write lease (what a post-copy restore cannot take over), and
//!   the answer adds `hold=ok|BAD`: still holding it, FIFO data intact.
//! - `burn`: CPU-bound work, printing `progress N` lines (N only grows).
//! - `tree`: a parent with children and a pipe between them; exits with a code.
//! - `mem`: allocates and dirties N MiB, then idles (for migration benchmarks).
//! - `http`: a tiny HTTP/1.1 server (keep-alive, a thread per connection) for
//!   `mosgw` tests and the demo: each request spins for `--work-ms` of wall
//!   time, then burns `--cpu-ms` of its thread's CPU time (so it takes longer
//!   on a slow or crowded node), and is
//!   answered `addr=IP pid=PID n=N` (the node address it was reached at, its
//!   pid, requests served so far). Deliberately naive; never a parser to reuse.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fill page by page (a memset each), so even a debug build dirties 1 GiB fast.
fn fill(buf: &mut [u8], seed: u64) {
    for (i, page) in buf.chunks_mut(4096).enumerate() {
        page.fill(((i as u64).wrapping_mul(31).wrapping_add(seed) >> 1) as u8);
        // One odd byte per page so pages differ inside too.
        page[0] = (i as u8) ^ 0x5a;
    }
}

/// Checks every page's pattern; cheap enough to run on each query.
fn checksum(buf: &[u8]) -> u64 {
    buf.chunks(4096).fold(0xcbf29ce484222325u64, |h, p| {
        let first = p.first().copied().unwrap_or(0) as u64;
        let last = p.last().copied().unwrap_or(0) as u64;
        let mid = p.get(p.len() / 2).copied().unwrap_or(0) as u64;
        (h ^ (first | last << 8 | mid << 16)).wrapping_mul(0x100000001b3)
    })
}

fn counter(args: &[String]) -> i32 {
    let port: u16 = arg(args, "--port", 8080);
    let file: String = arg(args, "--file", String::new());
    let tick_ms: u64 = arg(args, "--tick-ms", 100);
    let mib: usize = arg(args, "--mem-mib", 0);
    let mut mem = vec![0u8; mib << 20];
    fill(&mut mem, 7);
    let expected = checksum(&mem);
    let listener = match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind :{port}: {e}");
            return 2;
        }
    };
    let _ = listener.set_nonblocking(true);
    let mut out = if file.is_empty() {
        None
    } else {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("open {file}: {e}");
                return 2;
            }
        }
    };
    // --busy: burn the CPU between ticks (a job the balancer wants to move).
    let busy = args.iter().any(|a| a == "--busy");
    let hold_spec: String = arg(args, "--hold", String::new());
    let mut hold = if hold_spec.is_empty() {
        None
    } else {
        match Hold::take(&hold_spec) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("--hold {hold_spec}: {e}");
                return 2;
            }
        }
    };
    let mut n: u64 = 0;
    println!("counter listening on :{port}");
    loop {
        n += 1;
        if let Some(f) = out.as_mut() {
            let _ = writeln!(f, "tick {n}");
        }
        while let Ok((mut s, _)) = listener.accept() {
            let ok = checksum(&mem) == expected;
            let _ = s.set_nonblocking(false);
            let held = match hold.as_mut().map(|h| h.intact()) {
                Some(true) => " hold=ok",
                Some(false) => " hold=BAD",
                None => "",
            };
            let _ = writeln!(s, "counter={n} mem={}{held}", if ok { "ok" } else { "BAD" });
        }
        if busy {
            let until = Instant::now() + Duration::from_millis(tick_ms);
            let mut state = n;
            while Instant::now() < until {
                work_unit(&mut state);
            }
        } else {
            std::thread::sleep(Duration::from_millis(tick_ms));
        }
    }
}

/// Something a post-copy restore cannot take over (see `agent::blockers`).
enum Hold {
    /// A FIFO filled to capacity with a known pattern: (read end, write
    /// end, bytes in it).
    Fifo(std::fs::File, std::fs::File, usize),
    /// A file we hold a POSIX lock or a lease on, and the lock kind
    /// /proc names.
    Locked(std::fs::File, &'static str),
}

fn fifo_byte(i: usize) -> u8 {
    (i % 251) as u8
}

impl Hold {
    fn take(spec: &str) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
        let (kind, path) = spec.split_once(':').ok_or_else(|| bad("want KIND:PATH"))?;
        match kind {
            "fifo" => {
                let c = std::ffi::CString::new(path).map_err(|_| bad("NUL in path"))?;
                // SAFETY: mkfifo reads a valid NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(e);
                    }
                }
                let r = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)?;
                let mut w = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)?;
                let mut n = 0;
                loop {
                    let chunk: Vec<u8> = (n..n + 4096).map(fifo_byte).collect();
                    match w.write(&chunk) {
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                Ok(Hold::Fifo(r, w, n))
            }
            "lock" | "lease" => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                let fd = f.as_raw_fd();
                // SAFETY: fcntl on our own open fd with plain integer or
                // flock-struct arguments.
                let r = if kind == "lock" {
                    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                    fl.l_type = libc::F_WRLCK as i16;
                    fl.l_whence = libc::SEEK_SET as i16;
                    unsafe { libc::fcntl(fd, libc::F_SETLK, &fl) }
                } else {
                    // A lease holder is told of a break by SIGIO, whose
                    // default action kills; lease users handle it.
                    unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
                    unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) }
                };
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(Hold::Locked(
                    f,
                    if kind == "lock" { "POSIX" } else { "LEASE" },
                ))
            }
            _ => Err(bad("KIND is fifo, lock or lease")),
        }
    }

    /// Still held, and a FIFO still holds exactly its pattern (read out and
    /// written back, so the check leaves it as it was).
    fn intact(&mut self) -> bool {
        use std::os::fd::AsRawFd;
        match self {
            Hold::Fifo(r, w, n) => {
                let mut buf = vec![0u8; *n + 4096];
                let got = r.read(&mut buf).unwrap_or(0);
                let same = got == *n
                    && buf[..got]
                        .iter()
                        .enumerate()
                        .all(|(i, b)| *b == fifo_byte(i));
                let _ = w.write_all(&buf[..got]);
                same
            }
            Hold::Locked(f, kind) => {
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd()))
                    .unwrap_or_default();
                info.lines()
                    .filter(|l| l.starts_with("lock:"))
                    .any(|l| l.split_whitespace().nth(2) == Some(kind))
            }
        }
    }
}

/// One unit of CPU work (about 10 ms of a core on this class of machine).
fn work_unit(state: &mut u64) {
    for _ in 0..2_000_000 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
}

fn burn(args: &[String]) -> i32 {
    let work: u64 = arg(args, "--work", 0);
    let mut state = 1u64;
    let mut done = 0u64;
    let mut last = Instant::now();
    loop {
        work_unit(&mut state);
        done += 1;
        if last.elapsed() >= Duration::from_millis(250) || (work > 0 && done >= work) {
            println!("progress {done}");
            let _ = std::io::stdout().flush();
            last = Instant::now();
        }
        if work > 0 && done >= work {
            println!("done {done} {}", state & 1);
            return 0;
        }
    }
}

fn tree(args: &[String]) -> i32 {
    let children: usize = arg(args, "--children", 2);
    let seconds: u64 = arg(args, "--seconds", 3);
    let code: i32 = arg(args, "--exit-code", 7);
    let mut fds = [0i32; 2];
    // SAFETY: plain pipe/fork in a single-threaded program.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return 2;
    }
    let mut kids = vec![];
    for c in 0..children {
        match unsafe { libc::fork() } {
            0 => {
                unsafe { libc::close(fds[0]) };
                let deadline = Instant::now() + Duration::from_secs(seconds);
                while Instant::now() < deadline {
                    let msg = [c as u8];
                    unsafe { libc::write(fds[1], msg.as_ptr().cast(), 1) };
                    std::thread::sleep(Duration::from_millis(100));
                }
                unsafe { libc::_exit(0) };
            }
            pid if pid > 0 => kids.push(pid),
            _ => return 2,
        }
    }
    unsafe { libc::close(fds[1]) };
    let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let mut got = 0usize;
    let mut buf = [0u8; 64];
    while let Ok(k) = pipe.read(&mut buf) {
        if k == 0 {
            break;
        }
        got += k;
    }
    let mut all_ok = true;
    for k in kids {
        let mut st = 0;
        unsafe { libc::waitpid(k, &mut st, 0) };
        all_ok &= libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0;
    }
    println!("tree done: {got} messages, children ok={all_ok}");
    if all_ok && got > 0 {
        code
    } else {
        3
    }
}

fn mem(args: &[String]) -> i32 {
    let mib: usize = arg(args, "--mib", 64);
    let mut m = vec![0u8; mib << 20];
    fill(&mut m, 3);
    println!("ready {mib} MiB checksum {:x}", checksum(&m));
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        std::hint::black_box(&m);
    }
}

/// One request head and body off a keep-alive connection; None at EOF or
/// on garbage (the connection is then closed).
fn read_request(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<(bool, usize)> {
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 << 10 {
            return None;
        }
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let close = head
        .lines()
        .any(|l| l.starts_with("connection:") && l.contains("close"));
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    buf.drain(..head_end + len);
    Some((close, len))
}

/// CPU time of the calling thread, µs.
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn http(args: &[String]) -> i32 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let port: u16 = arg(args, "--port", 8080);
    let work_ms: u64 = arg(args, "--work-ms", 0);
    // CPU time rather than wall time: on a slow or crowded node the same
    // request then takes longer, as real work would.
    let cpu_us: u64 = (arg::<f64>(args, "--cpu-ms", 0.0) * 1000.0) as u64;
    let listener = match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind :{port}: {e}");
            return 2;
        }
    };
    let served = Arc::new(AtomicU64::new(0));
    for conn in listener.incoming() {
        let Ok(mut s) = conn else {
            continue;
        };
        let served = served.clone();
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = Vec::new();
            while let Some((close, _)) = read_request(&mut s, &mut buf) {
                let t0 = Instant::now();
                let mut x = 0u64;
                while t0.elapsed() < Duration::from_millis(work_ms) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                let c0 = thread_cpu_us();
                while thread_cpu_us().saturating_sub(c0) < cpu_us {
                    for _ in 0..1000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
                let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                let addr = s
                    .local_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let body = format!("addr={addr} pid={} n={n}\n", std::process::id());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
                    body.len(),
                    if close { "connection: close\r\n" } else { "" }
                );
                if s.write_all(resp.as_bytes()).is_err() || close {
                    break;
                }
            }
            // Dropping the stream closes it at once: a connection the gateway
            // closed before a freeze must not linger on this side either.
        });
    }
    0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("counter") => counter(&args),
        Some("burn") => burn(&args),
        Some("tree") => tree(&args),
        Some("mem") => mem(&args),
        Some("http") => http(&args),
        _ => {
            eprintln!(
                "usage: mosjob counter [--port P] [--file F] [--tick-ms MS] [--mem-mib N]\n       mosjob burn [--work UNITS]\n       mosjob tree [--children N] [--seconds S] [--exit-code C]\n       mosjob mem [--mib N]\n       mosjob http [--port P] [--work-ms MS] [--cpu-ms MS]"
            );
            2
        }
    };
    std::process::exit(code);
}
