//! Issue 14: `mosgw`, the HTTP front end that follows migrations. Real
//! binaries on a real local cluster: instances are `mosjob http` jobs
//! started with `mosrun --service`, and the gateway runs on the host.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MOSGW: &str = env!("CARGO_BIN_EXE_mosgw");

/// A running mosgw, killed by pid when dropped (also on panic).
struct Gw {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // A SIGSTOPped gateway must be woken to die promptly.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGCONT);
        }
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Gw {
    /// Start mosgw for service `web` (and any `extra` flags) and wait until
    /// it answers on its admin port.
    fn start(cl: &Cluster, extra: &[&str]) -> Gw {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = cl.shared.join(format!("mosgw-{}.log", http.port()));
        std::fs::create_dir_all(&cl.shared).unwrap();
        let svc = format!("web={http}");
        let admin_s = admin.to_string();
        let mut args = vec![
            "--cluster",
            cl.file.to_str().unwrap(),
            "--service",
            &svc,
            "--admin",
            &admin_s,
            "--poll-ms",
            "300",
        ];
        args.extend_from_slice(extra);
        let child = Command::new(MOSGW)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start mosgw");
        let gw = Gw {
            child,
            http,
            admin,
            log,
        };
        let t0 = Instant::now();
        while get(admin, "/status").is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "mosgw did not come up: {}",
                gw.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The instance table of service `web`: (job, node, state).
    fn table(&self) -> Vec<(String, String, String)> {
        let Some((200, body)) = get(self.admin, "/status") else {
            return vec![];
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["web"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        (
                            i["job"].as_str().unwrap_or("").to_string(),
                            i["node"].as_str().unwrap_or("").to_string(),
                            i["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn wait_active(&self, job: &str, node: &str) {
        let t0 = Instant::now();
        while !self
            .table()
            .iter()
            .any(|(j, n, s)| j == job && n == node && s == "active")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{job} not active on {node}: {:?}",
                self.table()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A keep-alive HTTP/1.1 client, just enough for these tests.
struct Client {
    addr: SocketAddr,
    conn: Option<TcpStream>,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// One request; Err on any transport failure (the connection is then
    /// dropped and the next call reconnects).
    fn request(&mut self, raw: &[u8]) -> Result<(u16, String), String> {
        let r = self.try_request(raw);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_request(&mut self, raw: &[u8]) -> Result<(u16, String), String> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            self.conn = Some(s);
        }
        let s = self.conn.as_mut().unwrap();
        s.write_all(raw).map_err(|e| format!("write: {e}"))?;
        read_response(s)
    }

    fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.request(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
    }
}

fn read_response(s: &mut TcpStream) -> Result<(u16, String), String> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "closed before a response: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).map_err(|e| format!("read body: {e}"))?;
        if n == 0 {
            return Err("closed mid-body".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok((
        code,
        String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned(),
    ))
}

/// One request on a fresh connection.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    Client::new(addr).get(path).ok()
}

/// Send raw bytes on a fresh connection and read what comes back until the
/// gateway closes (or `wait`).
fn raw_exchange(addr: SocketAddr, data: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(data);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn start_instance(cl: &Cluster, node: &str, port: u16, work_ms: u32) -> String {
    let p = port.to_string();
    let w = work_ms.to_string();
    cl.mosrun(&[
        "--node",
        node,
        "--service",
        "web",
        "--port",
        &p,
        "--",
        MOSJOB,
        "http",
        "--port",
        &p,
        "--work-ms",
        &w,
    ])
}

/// Loop GETs through the gateway on a thread until `stop`; returns
/// (ok, failures, answering addresses).
fn load_loop(
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>, std::collections::BTreeSet<String>)> {
    std::thread::spawn(move || {
        let mut c = Client::new(addr);
        let (mut ok, mut failed, mut seen) = (0, vec![], std::collections::BTreeSet::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match c.get("/") {
                Ok((200, body)) => {
                    ok += 1;
                    if let Some(a) = body.split_whitespace().next() {
                        seen.insert(a.to_string());
                    }
                }
                Ok((code, body)) => failed.push(format!("{code} {body}")),
                Err(e) => failed.push(e),
            }
        }
        (ok, failed, seen)
    })
}

#[test]
fn gateway_spreads_requests_over_nodes_and_ramps_up_a_new_instance() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let a = start_instance(&cl, "node1", 8181, 0);
    let access = cl.shared.join("access.log");
    let gw = Gw::start(
        &cl,
        &[
            "--slow-start-ms",
            "4000",
            "--access-log",
            access.to_str().unwrap(),
        ],
    );
    gw.wait_active(&a, "node1");
    // Let `a` finish its own slow start.
    std::thread::sleep(Duration::from_millis(4000));
    let b = start_instance(&cl, "node2", 8182, 0);
    gw.wait_active(&b, "node2");
    // Where b answers: its own address (the default), else node2's.
    let ip2 = cl.job_ip(&b);
    let mut c = Client::new(gw.http);
    let mut share = |n: usize| {
        let mut on_b = 0;
        for _ in 0..n {
            let (code, body) = c.get("/").expect("request through mosgw");
            assert_eq!(code, 200, "{body}");
            if body.contains(&format!("addr={ip2} ")) {
                on_b += 1;
            }
        }
        on_b
    };
    // Just after it appeared, the new instance gets (almost) nothing.
    let early = share(50);
    assert!(early <= 10, "new instance got {early}/50 during slow start");
    std::thread::sleep(Duration::from_millis(4000));
    // After it, from 4 clients at once: P2C weighs requests in flight, so
    // the two share the load even when one of them had a latency spike on
    // a busy machine. (One client alone would always find both idle, and
    // the one with the lower peak-EWMA latency would take everything.)
    let late: usize = (0..4)
        .map(|_| {
            let (addr, ip2) = (gw.http, ip2.clone());
            std::thread::spawn(move || {
                let mut c = Client::new(addr);
                (0..50)
                    .filter(|_| {
                        let (code, body) = c.get("/").expect("request through mosgw");
                        assert_eq!(code, 200, "{body}");
                        body.contains(&format!("addr={ip2} "))
                    })
                    .count()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .sum();
    assert!(
        (40..=160).contains(&late),
        "after slow start both instances share the traffic; the new one got {late}/200"
    );
    // One access-log line per request, naming the instance.
    let log = std::fs::read_to_string(&access).unwrap();
    assert_eq!(log.lines().count(), 250, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(" web GET \"/\" 200 ") && l.contains(&format!("instance={b}"))),
        "{log}"
    );
    // The balancer's view: each instance is its node's address and port.
    let t = gw.table();
    assert_eq!(t.len(), 2, "{t:?}");
    let metrics = get(gw.admin, "/metrics").unwrap().1;
    assert!(
        metrics.contains(&format!(
            "mosgw_requests_total{{code=\"200\",instance=\"{b}\",service=\"web\"}}"
        )),
        "per-instance metrics: {metrics}"
    );
}

/// Move the only instance of `web` node1 → node2 → node1 → node2 while a
/// client loops requests through the gateway (each move with `modes[i]`).
fn follow_migrations(cluster_args: &[&str], port: u16, modes: [&str; 3]) {
    let cl = Cluster::up(2, cluster_args);
    let job = start_instance(&cl, "node1", port, 1);
    let gw = Gw::start(&cl, &[]);
    gw.wait_active(&job, "node1");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loop_ = load_loop(gw.http, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    for (to, mode) in ["node2", "node1", "node2"].into_iter().zip(modes) {
        let o = cl.mosctl(&["migrate", mode, &job, to]);
        assert!(
            o.status.success(),
            "the migration succeeds: the gateway let go of its connections first: {}",
            stderr(&o)
        );
        gw.wait_active(&job, to);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, seen) = loop_.join().unwrap();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 50, "only {ok} requests");
    // An instance with its own address (the default) answers at it on
    // every node; one in its node's network at each node's address.
    let want = if cl.record(&job).net.is_some() { 1 } else { 2 };
    assert_eq!(
        seen.len(),
        want,
        "answers came from the job's address, or from both nodes': {seen:?}"
    );
    assert_eq!(cl.record(&job).node.as_str(), "node2");
    assert!(
        gw.log_text()
            .contains("let go of instance before its freeze"),
        "{}",
        gw.log_text()
    );
}

#[test]
fn gateway_follows_a_migrating_instance_and_no_request_fails() {
    if !privileged() {
        return;
    }
    follow_migrations(&[], 8183, ["--full-copy"; 3]);
}

/// The same through the other two dump paths: images streamed agent to
/// agent (no shared path) and post-copy (lazy pages).
#[test]
fn gateway_follows_direct_and_post_copy_migrations() {
    if !privileged() || !post_copy_capable() {
        return;
    }
    follow_migrations(
        &["--no-shared"],
        8188,
        ["--post-copy", "--full-copy", "--post-copy"],
    );
}

#[test]
fn gateway_retries_idempotent_requests_when_an_instance_is_killed() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let a = start_instance(&cl, "node1", 8184, 1);
    let b = start_instance(&cl, "node2", 8185, 1);
    let gw = Gw::start(&cl, &["--slow-start-ms", "0"]);
    gw.wait_active(&a, "node1");
    gw.wait_active(&b, "node2");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two clients, so both instances hold pooled connections when one dies.
    let l1 = load_loop(gw.http, stop.clone());
    let l2 = load_loop(gw.http, stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    let o = cl.mosctl(&["kill", &a]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t0 = Instant::now();
    while gw.table().iter().any(|(j, _, _)| *j == a) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the killed instance leaves the table: {:?}",
            gw.table()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in [l1, l2] {
        let (ok, failed, _) = l.join().unwrap();
        assert!(failed.is_empty(), "GETs are retried elsewhere: {failed:?}");
        assert!(ok > 20);
    }
    assert_eq!(gw.table().len(), 1, "{:?}", gw.table());
}

#[test]
fn a_gateway_dying_mid_freeze_does_not_block_the_migration() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let job = start_instance(&cl, "node1", 8186, 0);
    let gw = Gw::start(&cl, &[]);
    gw.wait_active(&job, "node1");
    // Pooled connections to the instance exist.
    let mut c = Client::new(gw.http);
    for _ in 0..5 {
        assert_eq!(c.get("/").unwrap().0, 200);
    }
    drop(c);
    // The gateway hangs (it will never acknowledge), then dies mid-freeze.
    let pid = gw.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t0 = Instant::now();
    let migrate = {
        let file = cl.file.clone();
        let job = job.clone();
        std::thread::spawn(move || {
            Command::new(MOSCTL)
                .args([
                    "--cluster",
                    file.to_str().unwrap(),
                    "migrate",
                    &job,
                    "node2",
                ])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    drop(gw);
    let o = migrate.join().unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the migration ended in bounded time: {took:?}"
    );
    // Completed, or rolled back with the job running on node1: never lost.
    let rec = cl.record(&job);
    eprintln!(
        "migration with a hung, then killed gateway: {} after {took:?}",
        if o.status.success() {
            "completed"
        } else {
            "rolled back"
        }
    );
    assert_eq!(rec.state, mosix::core::JobState::Running, "{rec:?}");
    if o.status.success() {
        assert_eq!(rec.node.as_str(), "node2");
    } else {
        assert_eq!(rec.node.as_str(), "node1", "{}", stderr(&o));
    }
    let ip = cl.job_ip(&job);
    let addr: SocketAddr = format!("{ip}:8186").parse().unwrap();
    assert_eq!(get(addr, "/").map(|r| r.0), Some(200), "the job answers");
    // With no gateway subscribed any more, nothing waits at all.
    let back = if rec.node.as_str() == "node1" {
        "node2"
    } else {
        "node1"
    };
    let t1 = Instant::now();
    let o = cl.mosctl(&["migrate", &job, back]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(t1.elapsed() < Duration::from_secs(5));
}

#[test]
fn gateway_answers_bad_input_with_the_right_status_and_keeps_serving() {
    if !privileged() {
        return;
    }
    // Bad configuration: a clear error and a failing exit status.
    for (args, want) in [
        (vec!["--service", "web"], "NAME=ADDR:PORT"),
        (
            vec!["--service", "web=127.0.0.1:1", "--max-header-bytes", "100"],
            "8192",
        ),
        (vec![], "no services"),
    ] {
        let o = Command::new(MOSGW).args(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    let cl = Cluster::up(1, &[]);
    let job = start_instance(&cl, "node1", 8187, 0);
    // A plain-TCP service: a counter job answers one line per connection.
    let raw = cl.mosrun(&[
        "--node",
        "node1",
        "--service",
        "raw",
        "--port",
        "8189",
        "--",
        MOSJOB,
        "counter",
        "--port",
        "8189",
    ]);
    // An instance that takes 2 s per request (the abandoned request below).
    cl.mosrun(&[
        "--node",
        "node1",
        "--service",
        "slow",
        "--port",
        "8191",
        "--",
        MOSJOB,
        "http",
        "--port",
        "8191",
        "--work-ms",
        "2000",
    ]);
    let raw_listen = format!("raw=127.0.0.1:{}", free_port());
    let empty = format!("empty=127.0.0.1:{}", free_port());
    let slow = format!("slow=127.0.0.1:{}", free_port());
    let gw = Gw::start(
        &cl,
        &[
            "--tcp-service",
            &raw_listen,
            "--service",
            &empty,
            "--service",
            &slow,
            "--header-timeout-ms",
            "1000",
            "--body-timeout-ms",
            "1000",
            "--max-body-bytes",
            "1000",
        ],
    );
    gw.wait_active(&job, "node1");
    // A fresh connection each time: an idle keep-alive connection is closed
    // after the (short, here) header timeout, as it should be.
    let still_serving = || {
        let (code, body) = get(gw.http, "/").expect("a good client is served");
        assert_eq!(code, 200, "{body}");
    };
    still_serving();
    let w = Duration::from_secs(5);
    let r = raw_exchange(gw.http, b"NOT HTTP AT ALL\r\n\r\n", w);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    still_serving();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let r = raw_exchange(gw.http, big.as_bytes(), w);
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    still_serving();
    let r = raw_exchange(
        gw.http,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n",
        w,
    );
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
        "b".repeat(0x800)
    );
    let r = raw_exchange(gw.http, chunked.as_bytes(), w);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    still_serving();
    // A slow client: half a request head, then nothing.
    let t0 = Instant::now();
    let r = raw_exchange(gw.http, b"GET / HTTP/1.1\r\nHost: t\r\n", w);
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(4));
    // ... and a slow body.
    let r = raw_exchange(
        gw.http,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly a part",
        w,
    );
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    still_serving();
    // A service with no instances: 503 and a sentence saying why.
    let empty_addr: SocketAddr = empty.trim_start_matches("empty=").parse().unwrap();
    let (code, body) = get(empty_addr, "/").unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("no running instances"), "{body}");
    still_serving();
    // A POST with a body within the limit goes through.
    let mut c = Client::new(gw.http);
    let (code, _) = c
        .request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    assert_eq!(code, 200);
    // The other framings a client may use: a chunked body; Expect:
    // 100-continue (the body sent only after the 100); two requests in one
    // write (pipelined); HEAD (no body); HTTP/1.0 (closed after the answer,
    // which carries a date).
    let (code, _) = c
        .request(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .unwrap();
    assert_eq!(code, 200);
    {
        let mut s = TcpStream::connect(gw.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
        let mut b = [0u8; 25];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b[..], b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"hello").unwrap();
        assert_eq!(read_response(&mut s).unwrap().0, 200);
    }
    let r = raw_exchange(
        gw.http,
        b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        w,
    );
    assert_eq!(r.matches("HTTP/1.1 200").count(), 2, "{r}");
    let r = raw_exchange(
        gw.http,
        b"HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        w,
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\n"), "a HEAD answer has no body: {r:?}");
    let t0 = Instant::now();
    let r = raw_exchange(gw.http, b"GET / HTTP/1.0\r\n\r\n", w);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.to_ascii_lowercase().contains("\r\ndate: "), "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "an HTTP/1.0 connection is closed after its answer"
    );
    // TCP mode: bytes both ways to the instance.
    let raw_addr: SocketAddr = raw_listen.trim_start_matches("raw=").parse().unwrap();
    let t0 = Instant::now();
    loop {
        let r = raw_exchange(raw_addr, b"", Duration::from_secs(3));
        if r.contains("counter=") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "TCP mode reaches {raw}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A client that gives up mid-request: its request leaves the instance's
    // in-flight count (it once stayed there for good, and phantom requests
    // made a calm service look saturated and drains wait their whole bound).
    let in_flight = |svc: &str| -> Option<u64> {
        let (code, body) = get(gw.admin, "/status")?;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v[svc].as_array()?.first()?["in_flight"].as_u64()
    };
    let slow_addr: SocketAddr = slow.trim_start_matches("slow=").parse().unwrap();
    cl.wait_for("the slow instance in the table", 10, || {
        in_flight("slow") == Some(0)
    });
    let mut quitter = TcpStream::connect(slow_addr).unwrap();
    quitter
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    cl.wait_for("the request to be in flight", 5, || {
        in_flight("slow") == Some(1)
    });
    drop(quitter);
    cl.wait_for(
        "the abandoned request to leave the in-flight count",
        10,
        || in_flight("slow") == Some(0),
    );
    still_serving();
    // A bad service declaration is refused with a reason, and nothing starts.
    for (svc, port, want) in [
        ("a b", "80", "may only hold"),
        ("web", "0", "not a TCP port"),
    ] {
        let o = run(
            MOSRUN,
            &[
                "--node",
                "node1",
                "--service",
                svc,
                "--port",
                port,
                "--",
                MOSJOB,
                "http",
            ],
            Some(&cl),
        );
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{svc} {port}: {}", stderr(&o));
    }
    // A foreground mosrun declares a service too.
    let mut fg = Command::new(MOSRUN)
        .args(["--cluster", cl.file.to_str().unwrap(), "--node", "node1"])
        .args([
            "--service",
            "fg",
            "--port",
            "8190",
            "--",
            MOSJOB,
            "http",
            "--port",
            "8190",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut fg_job = String::new();
    cl.wait_for("the foreground instance to be listed", 10, || {
        match cl.jobs_json().iter().find(|j| j["service"] == "fg") {
            Some(j) => {
                assert_eq!(j["port"], 8190);
                fg_job = j["id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    let o = cl.mosctl(&["kill", &fg_job]);
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = fg.wait();
    // The service is visible to outside tools through the agents' API.
    let o = cl.mosctl(&["show", &job]);
    assert!(
        stdout(&o).contains("service  web on port 8187"),
        "{}",
        stdout(&o)
    );
}
