//! Issue 18: a job with its own address (`mosrun -d --net own`) keeps its
//! established TCP connections across migrations: full copy, post-copy,
//! without a shared path, and a rollback. The peer is a network namespace
//! of the test's own on the cluster's bridge (not a job, not a node), so its
//! TCP counters (`/proc/net/snmp`) see only this test's connections. After
//! every move nothing of the job's network may be left anywhere: no nft
//! table, no veth, no other namespace holding its address, one claim.

use crate::support::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PY: &str = "/usr/bin/python3";

/// A namespace on the cluster's bridge for the test's peer process, removed
/// with the cluster (`local down` deletes its `mos-<name>-` namespaces and
/// `mv-<name>-` links).
struct Peer {
    ns: String,
    ip: String,
}

impl Peer {
    fn new(cl: &Cluster) -> Peer {
        let node1 = cl.node_ip("node1");
        let k: u8 = node1.split('.').nth(2).unwrap().parse().unwrap();
        let ns = format!("mos-{}-peer", cl.name);
        let ip = format!("10.77.{k}.250");
        mosix::local::net::make_ns(&cl.name, &ns, &format!("mv-{}-p", cl.name), &ip, k)
            .expect("peer namespace");
        Peer { ns, ip }
    }

    /// A cluster of `nodes` (with `flags`) and a peer on its bridge: how
    /// every test here begins.
    fn with_cluster(nodes: usize, flags: &[&str]) -> (Cluster, Peer) {
        let cl = Cluster::up(nodes, flags);
        let peer = Peer::new(&cl);
        (cl, peer)
    }

    /// Run a python `script` in the peer's namespace and wait for its first
    /// line, which must be `listening`; the rest of its stdout is returned.
    fn serve(&self, script: &str) -> (Killed, BufReader<std::process::ChildStdout>) {
        let mut srv = Killed(
            self.cmd(PY)
                .args(["-c", script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut out = BufReader::new(srv.0.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "listening", "the peer's server did not start");
        (srv, out)
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns)).arg(prog);
        c
    }

    /// (EstabResets, OutRsts) of the peer's namespace.
    fn resets(&self) -> (u64, u64) {
        let o = self.cmd("cat").arg("/proc/net/snmp").output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let tcp: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| l.starts_with("Tcp:"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(tcp.len(), 2, "{text}");
        let get = |name: &str| {
            let i = tcp[0].iter().position(|h| *h == name).unwrap();
            tcp[1][i].parse::<u64>().unwrap()
        };
        (get("EstabResets"), get("OutRsts"))
    }
}

/// The job's own address, as `mosctl show --json` gives it.
fn address_of(cl: &Cluster, job: &str) -> String {
    let rec = cl.record(job);
    rec.net.expect("the job has its own address").ip.to_string()
}

fn claims_dir(cl: &Cluster) -> std::path::PathBuf {
    Path::new(&format!("/run/mosix/{}/jobnet/addrs", cl.name)).to_path_buf()
}

/// Wait (10 s) until no address of the pool is claimed any more.
fn wait_pool_empty(cl: &Cluster, what: &str) {
    cl.wait_for(what, 10, || {
        std::fs::read_dir(claims_dir(cl)).unwrap().count() == 0
    });
}

/// The network namespaces of every process on the machine that have `ip`
/// on an interface, as (a pid in it).
fn namespaces_with(ip: &str) -> Vec<i32> {
    let mut seen = BTreeSet::new();
    let mut holders = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let o = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["ip", "-4", "-o", "addr", "show"])
            .output();
        if let Ok(o) = o {
            if String::from_utf8_lossy(&o.stdout).contains(&format!(" {ip}/")) {
                holders.push(pid);
            }
        }
    }
    holders
}

/// Nothing of `job`'s network is left anywhere but on `on`: its veth only
/// there, no nft table in any node's or the job's namespace, exactly one
/// namespace holding its address (the job's), one claim.
fn assert_no_leftovers(cl: &Cluster, job: &str, on: &str) {
    let veth = mosix::agent::jobnet::host_veth(job);
    let ip = address_of(cl, job);
    let rec = cl.record(job);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut problems = Vec::new();
        for node in cl.node_names() {
            let ns = cl.netns(&node);
            let link = Command::new("ip")
                .args(["-n", &ns, "link", "show", &veth])
                .output()
                .unwrap()
                .status
                .success();
            if link != (node == on) {
                problems.push(format!("veth {veth} on {node}: {link}"));
            }
            let t = Command::new("ip")
                .args(["netns", "exec", &ns, "nft", "list", "tables"])
                .output()
                .unwrap();
            let tables = String::from_utf8_lossy(&t.stdout).trim().to_string();
            if !tables.is_empty() {
                problems.push(format!("nft tables in {node}: {tables}"));
            }
        }
        let t = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", rec.pid))
            .args(["nft", "list", "tables"])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&t.stdout).trim().to_string();
        if !tables.is_empty() {
            problems.push(format!("nft tables in the job's namespace: {tables}"));
        }
        let holders = namespaces_with(&ip);
        if holders.len() != 1 {
            problems.push(format!(
                "{} namespaces hold {ip} (pids {holders:?})",
                holders.len()
            ));
        }
        let claims: Vec<String> = std::fs::read_dir(claims_dir(cl))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if claims != vec![ip.clone()] {
            problems.push(format!("claims {claims:?}"));
        }
        if problems.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leftovers of {job} after moving to {on}: {problems:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn migrate(cl: &Cluster, job: &str, to: &str, extra: &[&str]) {
    let mut args = vec!["migrate", job, to];
    args.extend_from_slice(extra);
    let o = cl.mosctl(&args);
    assert!(o.status.success(), "migrate to {to}: {}", stderr(&o));
    assert_eq!(cl.record(job).node.as_str(), to);
}

/// 40 MiB of pseudo-random bytes, 64 KiB every 10 ms, to the first
/// client; then their digest on stdout.
const TRANSFER_SERVER: &str = r#"
import socket,hashlib,random,time
s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9600));s.listen()
print('listening',flush=True)
c,_=s.accept();r=random.Random(18);h=hashlib.sha256()
for i in range(640):
    b=r.randbytes(65536);h.update(b);c.sendall(b);time.sleep(0.01)
c.shutdown(socket.SHUT_WR);print(h.hexdigest(),flush=True);c.recv(1)
"#;

/// The job: downloads from the peer through one connection, writes the
/// digest and the byte count.
const TRANSFER_CLIENT: &str = r#"
import socket,hashlib
c=socket.create_connection(('PEER',9600));h=hashlib.sha256();n=0
while True:
    b=c.recv(65536)
    if not b: break
    h.update(b);n+=len(b)
open('RESULT','w').write('%s %d' % (h.hexdigest(),n))
"#;

const ECHO_SERVER: &str = r#"
import socket
s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9700));s.listen()
while True:
    c,_=s.accept()
    while True:
        d=c.recv(4096)
        if not d: break
        c.sendall(d)
"#;

/// The peer's client: a line in, the same line back, on one connection;
/// it exits (and the test fails) on any error.
const ECHO_CLIENT: &str = r#"
import socket,sys
c=socket.create_connection(('ADDR',9700));c.settimeout(20);f=c.makefile('rwb')
for line in sys.stdin:
    f.write(line.encode());f.flush();back=f.readline().decode()
    print('ok' if back==line else 'BAD '+repr(back),flush=True)
"#;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn redis_client_keeps_its_connection_over_20_moves() {
    if !privileged() {
        return;
    }
    let (cl, peer) = Peer::with_cluster(3, &[]);
    let o = run(
        MOSRUN,
        &[
            "-d",
            "--node",
            "node1",
            "--net",
            "own",
            "--",
            "redis-server",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
        Some(&cl),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let job = stdout(&o).trim().to_string();
    let ip = address_of(&cl, &job);
    assert!(
        stderr(&o).contains(&format!("address {ip}")),
        "{}",
        stderr(&o)
    );
    let ping = || {
        peer.cmd("redis-cli")
            .args(["-h", &ip, "PING"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    };
    cl.wait_for("redis to answer", 20, ping);
    let before = peer.resets();
    // One connection, INCR every 10 ms, for as long as the test runs.
    let mut cli = Killed(
        peer.cmd("redis-cli")
            .args(["-h", &ip, "-r", "-1", "-i", "0.01", "INCR", "counter"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = cli.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<u64> = Vec::new();
    let drain = |seen: &mut Vec<u64>, until_more: bool| {
        let want = seen.len() + 3;
        let limit = Instant::now() + Duration::from_secs(10);
        loop {
            while let Ok(l) = rx.try_recv() {
                let n: u64 = l
                    .trim()
                    .trim_start_matches("(integer) ")
                    .parse()
                    .unwrap_or_else(|_| panic!("redis-cli said {l:?}"));
                seen.push(n);
            }
            if !until_more || seen.len() >= want {
                return;
            }
            assert!(
                Instant::now() < limit,
                "the counter stopped growing at {:?}",
                seen.last()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    drain(&mut seen, true);
    let nodes = ["node2", "node3", "node1"];
    for i in 0..20 {
        let to = nodes[i % 3];
        migrate(&cl, &job, to, &[]);
        // The client's next answers come through the same connection.
        drain(&mut seen, true);
        assert_no_leftovers(&cl, &job, to);
    }
    drain(&mut seen, false);
    assert!(
        cli.0.try_wait().unwrap().is_none(),
        "redis-cli ended: the connection broke"
    );
    // Always growing by one: no INCR lost, none repeated, no reconnect.
    for w in seen.windows(2) {
        assert_eq!(w[1], w[0] + 1, "counter jumped: {w:?}");
    }
    let info = peer
        .cmd("redis-cli")
        .args(["-h", &ip, "INFO", "stats"])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(
        info.contains("total_connections_received:3\r")
            || info.contains("total_connections_received:3\n"),
        "one PING while starting, the client's one connection, this INFO: {info}"
    );
    assert_eq!(peer.resets(), before, "the peer saw resets");
    assert_eq!(cl.record(&job).history.len(), 20);
    // The client's INCRs that reached the job while it was frozen were kept
    // by the source and sent on once it ran (`agent::replay`): on some of
    // the 20 moves at least, and (the counter above) never counted twice.
    let resent = (1..=3)
        .map(|n| std::fs::read_to_string(format!("/run/mosix/{}/node{n}.log", cl.name)).unwrap())
        .flat_map(|log| {
            log.lines()
                .filter(|l| l.contains("frames that reached it while frozen sent again"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .count();
    assert!(
        resent > 0,
        "no move sent on the frames kept during its freeze"
    );
    drop(cli);
    let o = cl.mosctl(&["kill", &job]);
    assert!(o.status.success());
    wait_pool_empty(&cl, "the address to go back to the pool");
}

/// A job's own outbound connection, to a server outside the cluster's jobs,
/// carries a long transfer while the job moves by full copy and by
/// post-copy; the job's checksum matches the server's.
#[test]
fn outbound_transfer_keeps_its_checksum_across_full_and_post_copy_moves() {
    if !privileged() {
        return;
    }
    let (cl, peer) = Peer::with_cluster(2, &[]);
    // The server: 40 MiB of pseudo-random bytes, 64 KiB every 10 ms, then
    // its digest on stdout.
    let (mut srv, mut srv_out) = peer.serve(TRANSFER_SERVER);
    let result = cl.shared.join("transfer.sha256");
    let client = TRANSFER_CLIENT
        .replace("PEER", &peer.ip)
        .replace("RESULT", &result.display().to_string());
    let job = cl.mosrun(&["--node", "node1", "--net", "own", "--", PY, "-c", &client]);
    std::thread::sleep(Duration::from_millis(800));
    migrate(&cl, &job, "node2", &["--full-copy"]);
    assert_no_leftovers(&cl, &job, "node2");
    std::thread::sleep(Duration::from_millis(500));
    let post = if post_copy_capable() {
        "--post-copy"
    } else {
        "--full-copy"
    };
    migrate(&cl, &job, "node1", &[post]);
    assert_no_leftovers(&cl, &job, "node1");
    std::thread::sleep(Duration::from_millis(500));
    migrate(&cl, &job, "node2", &["--full-copy"]);
    assert_no_leftovers(&cl, &job, "node2");
    let mut digest = String::new();
    srv_out.read_line(&mut digest).unwrap();
    cl.wait_for("the job to write its checksum", 30, || result.exists());
    std::thread::sleep(Duration::from_millis(100));
    let got = std::fs::read_to_string(&result).unwrap();
    assert_eq!(got, format!("{} {}", digest.trim(), 640 * 65536));
    let _ = srv.0.stdin.take();
    wait_pool_empty(&cl, "the job to end and give its address back");
}

/// Without a shared path (images pushed agent to agent), an echo
/// connection survives moves both ways, and a move whose restore fails on
/// the target rolls back to the source with the connection intact: a full
/// copy (pages streamed, so its stopped tree resumed) and a post-copy move
/// (the same).
#[test]
fn echo_connection_survives_direct_moves_and_a_rollback() {
    if !privileged() {
        return;
    }
    let (cl, peer) = Peer::with_cluster(2, &["--no-shared"]);
    let server = ECHO_SERVER;
    let job = cl.mosrun(&["--node", "node1", "--net", "own", "--", PY, "-c", server]);
    let ip = address_of(&cl, &job);
    // The peer's client: a line in, the same line back, on one connection;
    // it exits (and the test fails) on any error.
    let client = ECHO_CLIENT.replace("ADDR", &ip);
    let mut cli = None;
    cl.wait_for("the echo server to answer", 20, || {
        let mut c = peer
            .cmd(PY)
            .args(["-c", &client])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        if c.try_wait().unwrap().is_none() {
            cli = Some(Killed(c));
            true
        } else {
            false
        }
    });
    let mut cli = cli.unwrap();
    let mut input = cli.0.stdin.take().unwrap();
    let mut output = BufReader::new(cli.0.stdout.take().unwrap());
    let mut n = 0;
    let mut echo = |what: &str| {
        n += 1;
        writeln!(input, "line {n} {what}").unwrap();
        let mut back = String::new();
        output.read_line(&mut back).unwrap();
        assert_eq!(back.trim(), "ok", "echo after {what}");
    };
    echo("start");
    let before = peer.resets();
    migrate(&cl, &job, "node2", &[]);
    echo("node2");
    assert_no_leftovers(&cl, &job, "node2");
    migrate(&cl, &job, "node1", &[]);
    echo("node1");
    assert_no_leftovers(&cl, &job, "node1");
    // node2's CRIU now fails every restore: the move rolls back.
    let real =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/criu/path"))
            .expect("make setup records CRIU's path");
    let wrapper = cl.shared.join("failing-criu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# A CRIU whose RPC worker fails at once.\nif [ \"$1\" = swrk ]; then exit 1; fi\nexec {} \"$@\"\n",
            real.trim()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    cl.restart_agent("node2", &["--criu", wrapper.to_str().unwrap()]);
    let o = cl.mosctl(&["migrate", &job, "node2"]);
    assert!(!o.status.success(), "the restore on node2 must fail");
    // Its pages were streamed (node2's page server is not its RPC worker),
    // so node1's copy was the stopped tree, not images: resumed, not
    // restored, and its connection taken out of repair mode by the agent.
    assert!(
        stderr(&o).contains("resumed on node1 with all its memory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(cl.record(&job).node.as_str(), "node1");
    echo("rollback");
    assert_no_leftovers(&cl, &job, "node1");
    if post_copy_capable() {
        // Post-copy keeps the source's tree stopped instead of restoring
        // it from images: taking it back must undo what the dump left on
        // its connections (TCP repair mode, CRIU's lock), or the echo
        // below never comes back.
        let o = cl.mosctl(&["migrate", &job, "node2", "--post-copy"]);
        assert!(
            !o.status.success(),
            "the post-copy restore on node2 must fail"
        );
        assert_eq!(cl.record(&job).node.as_str(), "node1");
        echo("post-copy rollback");
        assert_no_leftovers(&cl, &job, "node1");
    }
    assert_eq!(peer.resets(), before, "the peer saw resets");
}

/// A job in its node's network with an established connection is refused
/// before anything is frozen, naming the connection; a job's own address
/// is shown by mosrun, `mosctl jobs` and `mosctl show`.
#[test]
fn node_network_job_with_a_connection_is_refused_and_addresses_are_shown() {
    if !privileged() {
        return;
    }
    let (cl, peer) = Peer::with_cluster(2, &[]);
    let _srv = peer.serve(
        "import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9800));s.listen()\nprint('listening',flush=True)\nc,_=s.accept();time.sleep(600)\n",
    );
    let client = format!(
        "import socket,time\nc=socket.create_connection(('{}',9800))\ntime.sleep(600)\n",
        peer.ip
    );
    let plain = cl.mosrun(&["--node", "node1", "--net", "node", "--", PY, "-c", &client]);
    assert!(cl.record(&plain).net.is_none());
    std::thread::sleep(Duration::from_millis(800));
    let o = cl.mosctl(&["migrate", &plain, "node2"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("established TCP connection")
            && err.contains(&format!("{}:9800", peer.ip))
            && err.contains("--net own")
            && err.contains("keeps running on node1"),
        "{err}"
    );
    let rec = cl.record(&plain);
    assert_eq!(rec.node.as_str(), "node1");
    assert_eq!(rec.state, mosix::core::JobState::Running);
    assert!(
        rec.history.is_empty(),
        "nothing was frozen: {:?}",
        rec.history
    );

    let own = cl.mosrun(&["--node", "node1", "--net", "own", "--", PY, "-c", &client]);
    let net = cl.record(&own).net.expect("own address");
    let jobs = stdout(&cl.mosctl(&["jobs"]));
    assert!(jobs.contains(&format!("[address {}]", net.ip)), "{jobs}");
    let listed = cl.jobs_json();
    let entry = listed.iter().find(|j| j["id"] == own.as_str()).unwrap();
    assert_eq!(entry["address"], net.ip.to_string());
    assert_eq!(entry["mac"], net.mac);
    let show = stdout(&cl.mosctl(&["show", &own]));
    assert!(
        show.contains(&format!("address  {}/24 mac {}", net.ip, net.mac)),
        "{show}"
    );
    let show = stdout(&cl.mosctl(&["show", &plain]));
    assert!(show.contains("address  the node's"), "{show}");
    // Its connection moves with it.
    std::thread::sleep(Duration::from_millis(500));
    migrate(&cl, &own, "node2", &[]);
    assert_no_leftovers(&cl, &own, "node2");
    let o = cl.mosctl(&["kill", &plain]);
    assert!(o.status.success());
}

/// Own addresses are the default where a node has a pool and a bridge, and
/// `--net node` opts out; a node without the bridge falls back to its own
/// network and says so (mosrun's note), and such a job still migrates (it
/// holds no connection) and answers at each node's address.
#[test]
fn a_node_without_the_bridge_falls_back_to_its_network_and_says_so() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let sleeper = [PY, "-c", "import time;time.sleep(600)"];
    let mut a = vec!["--node", "node1", "--"];
    a.extend_from_slice(&sleeper);
    let dflt = cl.mosrun(&a);
    assert!(
        cl.record(&dflt).net.is_some(),
        "a detached job gets its own address by default"
    );
    let mut a = vec!["--node", "node1", "--net", "node", "--"];
    a.extend_from_slice(&sleeper);
    let opted_out = cl.mosrun(&a);
    assert!(cl.record(&opted_out).net.is_none(), "--net node opts out");

    // node2's agent now looks for a bridge that does not exist.
    cl.restart_agent("node2", &["--agent-arg=--job-net-bridge=nosuchbr"]);
    let o = run(
        MOSRUN,
        &[
            "-d", "--node", "node2", "--net", "own", "--", MOSJOB, "counter", "--port", "8191",
        ],
        Some(&cl),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let job = stdout(&o).trim().to_string();
    let err = stderr(&o);
    assert!(
        err.contains("note: node2 cannot give jobs their own address")
            && err.contains(&format!("{job} uses the node's network")),
        "mosrun says so: {err}"
    );
    let rec = cl.record(&job);
    assert!(rec.net.is_none(), "{:?}", rec.net);
    assert_eq!(rec.node.as_str(), "node2");
    let show = stdout(&cl.mosctl(&["show", &job]));
    assert!(show.contains("address  the node's"), "{show}");
    let ip2 = cl.node_ip("node2");
    cl.wait_for("the job to answer at node2's address", 10, || {
        query_counter(&ip2, 8191).is_some()
    });
    // Without --net, node2 also uses its network, silently (the agent's
    // log has the warning).
    let mut a = vec!["--node", "node2", "--"];
    a.extend_from_slice(&sleeper);
    assert!(cl.record(&cl.mosrun(&a)).net.is_none());

    // It holds no connection: it moves, and answers at node1's address.
    migrate(&cl, &job, "node1", &[]);
    let (_, ok) = query_counter(&cl.node_ip("node1"), 8191).expect("answers on node1");
    assert!(ok);
    assert!(cl.record(&job).net.is_none());
    // A job with its own address cannot be restored where there is no
    // bridge: refused before it is frozen (the target's ping says so; no
    // failed attempt in its history), and it keeps running on node1 with
    // its address.
    let pid_before = cl.record(&dflt).pid;
    let o = cl.mosctl(&["migrate", &dflt, "node2"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("node2 cannot give jobs their own address"),
        "{}",
        stderr(&o)
    );
    let rec = cl.record(&dflt);
    assert!(
        rec.history.iter().all(|m| m.to.as_str() != "node2"),
        "refused before the freeze, so no attempt is recorded: {:?}",
        rec.history
    );
    assert_eq!(rec.pid, pid_before);
    assert_eq!(
        (rec.node.as_str(), rec.state),
        ("node1", mosix::core::JobState::Running)
    );
    assert_no_leftovers(&cl, &dflt, "node1");
}
