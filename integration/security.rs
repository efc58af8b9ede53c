//! Security and bad input on the control plane: mTLS is enforced, an agent
//! will not run open on the network, sealed images are verified before a
//! restore, pids mosix does not manage are refused, and malformed RPCs get a
//! clear status without hurting the agent.

use crate::support::*;
use mosix::api::client::{ClientTls, CLUSTER_TLS_NAME};
use mosix::api::pb;
use mosix::api::pb::agent_client::AgentClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const MOSIXD: &str = env!("CARGO_BIN_EXE_mosixd");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The client TLS files that `local up` (or [`Agentd`]) wrote into `pki`.
fn client_tls(pki: &Path) -> ClientTls {
    ClientTls {
        ca_pem: read(&pki.join("ca.pem")),
        cert_pem: read(&pki.join("client.pem")),
        key_pem: read(&pki.join("client.key")),
    }
}

/// Connect with an explicit TLS setup (or none) and ask for GetLoad and
/// ListJobs. Ok only if both were answered; a hang is reported as an error
/// that says so.
async fn try_agent(endpoint: &str, tls: Option<ClientTlsConfig>) -> Result<String, String> {
    let attempt = async {
        let mut ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("endpoint: {e}"))?
            .connect_timeout(Duration::from_secs(3));
        if let Some(t) = tls {
            ep = ep.tls_config(t).map_err(|e| format!("tls config: {e}"))?;
        }
        let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
        let mut c = AgentClient::new(ch);
        let load = c
            .get_load(pb::GetLoadRequest {})
            .await
            .map_err(|s| format!("GetLoad: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        c.list_jobs(pb::ListJobsRequest::default())
            .await
            .map_err(|s| format!("ListJobs: {:?}: {}", s.code(), s.message()))?;
        Ok(load.node)
    };
    match tokio::time::timeout(Duration::from_secs(15), attempt).await {
        Ok(r) => r,
        Err(_) => Err("HUNG: no answer and no error within 15s".to_string()),
    }
}

fn assert_refused(what: &str, r: Result<String, String>) {
    match r {
        Ok(node) => panic!("{what}: the agent ({node}) answered an unauthenticated client"),
        Err(e) => {
            eprintln!("{what}: refused as expected: {e}");
            assert!(!e.starts_with("HUNG"), "{what}: {e}");
        }
    }
}

/// Every way of calling without a valid cluster client certificate must be
/// refused; the cluster's own client certificate must work.
async fn check_mtls(endpoint: &str, pki: &Path, node: &str) {
    let ca = Certificate::from_pem(read(&pki.join("ca.pem")));
    let http = endpoint.replacen("https://", "http://", 1);
    assert_ne!(http, endpoint, "endpoint {endpoint} is not https");

    // (a) Plain HTTP/2 to the TLS port.
    assert_refused("plain http", try_agent(&http, None).await);

    // (b) TLS that trusts the cluster CA but shows no client certificate.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name(CLUSTER_TLS_NAME);
    assert_refused(
        "TLS without client cert",
        try_agent(endpoint, Some(no_cert)).await,
    );

    // (c) A client certificate from another CA (same name and usage as the
    // real one: only the issuer differs).
    let evil_ca = mosix::security::pki::generate_ca("evil").unwrap();
    let evil =
        mosix::security::pki::issue_cert(&evil_ca, "mosix-client", &[], true, false).unwrap();
    let foreign = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(Identity::from_pem(&evil.cert_pem, &evil.key_pem))
        .domain_name(CLUSTER_TLS_NAME);
    assert_refused(
        "client cert of a foreign CA",
        try_agent(endpoint, Some(foreign)).await,
    );

    // (c') The foreign CA's certificate and key, presented as if it were a
    // node's own certificate, together with the foreign CA itself.
    let evil_node = mosix::security::pki::issue_cert(
        &evil_ca,
        node,
        &[CLUSTER_TLS_NAME.to_string()],
        true,
        true,
    )
    .unwrap();
    let foreign_node = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .ca_certificate(Certificate::from_pem(&evil_ca.cert_pem))
        .identity(Identity::from_pem(&evil_node.cert_pem, &evil_node.key_pem))
        .domain_name(CLUSTER_TLS_NAME);
    assert_refused(
        "node cert of a foreign CA",
        try_agent(endpoint, Some(foreign_node)).await,
    );

    // (e) The server is authenticated too: a client with a good certificate
    // that trusts only another CA must not talk to the real agent.
    let own = client_tls(pki);
    let wrong_trust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&evil_ca.cert_pem))
        .identity(Identity::from_pem(&own.cert_pem, &own.key_pem))
        .domain_name(CLUSTER_TLS_NAME);
    assert_refused(
        "client that does not trust the cluster CA",
        try_agent(endpoint, Some(wrong_trust)).await,
    );

    // (d) Control: the cluster's client certificate works, through the
    // library's own connector as the CLI uses it.
    let ok = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(Identity::from_pem(&own.cert_pem, &own.key_pem))
        .domain_name(CLUSTER_TLS_NAME);
    assert_eq!(try_agent(endpoint, Some(ok)).await.as_deref(), Ok(node));
    let mut c = mosix::api::client::agent(endpoint, Some(&own), Duration::from_secs(3))
        .await
        .expect("connect with the cluster client cert");
    let load = c
        .get_load(pb::GetLoadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(load.node, node);
    c.list_jobs(pb::ListJobsRequest::default()).await.unwrap();
}

/// A `mosixd` run directly (no namespaces, no cgroups) on a loopback port
/// with mTLS, for tests that need no root. Killed and reaped on drop.
struct Agentd {
    child: Child,
    dir: tempfile::TempDir,
    endpoint: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Agentd {
    fn start() -> Agentd {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        mosix::security::pki::write_cluster_pki(
            &pki,
            "sec",
            &[(
                "node1".to_string(),
                vec!["127.0.0.1".to_string(), CLUSTER_TLS_NAME.to_string()],
            )],
        )
        .unwrap();
        let key = dir.path().join("image.key");
        mosix::security::manifest::ClusterKey::generate()
            .save(&key)
            .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("mosixd.log")).unwrap();
        let child = Command::new(MOSIXD)
            .args(["--node", "node1", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--shared")
            .arg(dir.path().join("shared"))
            .arg("--cluster")
            .arg(dir.path().join("no-cluster.json"))
            .arg("--image-key")
            .arg(&key)
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.join("node1.pem"))
            .arg("--tls-key")
            .arg(pki.join("node1.key"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut a = Agentd {
            child,
            dir,
            endpoint: format!("https://127.0.0.1:{port}"),
        };
        let tls = a.tls();
        let rt = runtime();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = rt.block_on(async {
                let mut c =
                    mosix::api::client::agent(&a.endpoint, Some(&tls), Duration::from_secs(1))
                        .await?;
                c.get_load(pb::GetLoadRequest {}).await?;
                anyhow::Ok(())
            });
            if ok.is_ok() {
                return a;
            }
            if let Some(st) = a.child.try_wait().unwrap() {
                panic!("mosixd exited ({st}) at start: {}", a.log());
            }
            assert!(
                Instant::now() < deadline,
                "mosixd did not answer in 20s: {:?}; log: {}",
                ok.err(),
                a.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn tls(&self) -> ClientTls {
        client_tls(&self.pki())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosixd.log")).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Agentd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for a child to exit, killing it after `secs`; returns its status and
/// output, or None if it had to be killed.
fn wait_exit(mut child: Child, secs: u64) -> Option<std::process::Output> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

// ---------------------------------------------------------------------------
// 1. mTLS

#[test]
fn unauthenticated_clients_are_refused_by_a_local_cluster_agent() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(1, &[]);
    let cf = mosix::core::cluster_file::ClusterFile::load(&cl.file).unwrap();
    let endpoint = cf.node("node1").unwrap().endpoint.clone();
    assert!(endpoint.starts_with("https://"), "TLS is on by default");
    let pki = PathBuf::from(format!("/run/mosix/{}/pki", cl.name));
    runtime().block_on(check_mtls(&endpoint, &pki, "node1"));
}

#[test]
fn unauthenticated_clients_are_refused_by_a_standalone_agent() {
    let a = Agentd::start();
    runtime().block_on(check_mtls(&a.endpoint, &a.pki(), "node1"));
}

// ---------------------------------------------------------------------------
// 2. No open agent on the network

#[test]
fn agent_refuses_a_non_loopback_address_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    let no_cluster = dir.path().join("no-cluster.json");
    let spawn = |extra: &[&str]| {
        Command::new(MOSIXD)
            .args(["--node", "n1", "--shared"])
            .arg(&shared)
            .arg("--cluster")
            .arg(&no_cluster)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    for listen in ["10.255.255.1:7999", "0.0.0.0:7999", "[::]:7999"] {
        let t0 = Instant::now();
        let out = wait_exit(spawn(&["--listen", listen]), 10)
            .unwrap_or_else(|| panic!("mosixd --listen {listen} without TLS kept running"));
        let err = stderr(&out);
        eprintln!("--listen {listen}: {err}");
        assert!(!out.status.success(), "--listen {listen} must be refused");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "refused quickly, not after trying"
        );
        assert!(
            err.contains("without TLS") && err.contains("--insecure") && err.contains("--tls-ca"),
            "the refusal names the way out: {err}"
        );
    }

    // Half a TLS setup is refused too, not silently run in clear text.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, b"").unwrap();
    let out = wait_exit(
        spawn(&[
            "--listen",
            "10.255.255.1:7999",
            "--tls-ca",
            ca.to_str().unwrap(),
        ]),
        10,
    )
    .expect("mosixd with only --tls-ca kept running");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("go together"), "{}", stderr(&out));

    // Loopback without TLS is accepted, and serves.
    let port = free_port();
    let mut child = spawn(&["--listen", &format!("127.0.0.1:{port}")]);
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(20);
    let answered = loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("mosixd on loopback exited ({st}): {}", stderr(&out));
        }
        let ok = rt.block_on(try_agent(&format!("http://127.0.0.1:{port}"), None));
        if ok.is_ok() || Instant::now() > deadline {
            break ok;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answered.as_deref(), Ok("n1"), "loopback agent answers");
    assert!(still_running, "loopback agent keeps running");
}

// ---------------------------------------------------------------------------
// 3. Sealed images

fn flip_byte(path: &Path, at: u64) -> u8 {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
    f.sync_all().unwrap();
    b[0]
}

#[test]
fn tampered_or_extended_images_are_refused_and_the_job_stays_frozen() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let job = cl.mosrun(&["--node", "node1", "--", MOSJOB, "counter", "--port", "8082"]);
    // Its own address (the default), wherever it runs.
    let ip1 = cl.job_ip(&job);
    cl.wait_for("counter to answer on node1", 10, || {
        query_counter(&ip1, 8082).is_some()
    });
    let freeze = |cl: &Cluster| {
        let o = cl.mosctl(&["freeze", &job]);
        assert!(o.status.success(), "freeze: {}", stderr(&o));
        let rec = cl.record(&job);
        assert_eq!(rec.state, mosix::core::JobState::Frozen);
        let p = rec
            .pending
            .clone()
            .expect("a frozen job has pending images");
        (cl.shared.join(&p.image_dir), p.id)
    };
    // A thaw that must be refused (on either node) and change nothing.
    let refused = |cl: &Cluster, dir: &Path, mig: &mosix::core::MigrationId, expect: &[&str]| {
        for node in ["node1", "node2"] {
            let o = cl.mosctl(&["thaw", &job, "--node", node]);
            let err = stderr(&o);
            assert!(!o.status.success(), "thaw on {node} must be refused");
            assert!(
                err.contains("images refused") && err.contains("DataLoss"),
                "thaw on {node}: {err}"
            );
            for e in expect {
                assert!(err.contains(e), "thaw on {node}: expected {e:?} in {err}");
            }
            let rec = cl.record(&job);
            assert_eq!(rec.state, mosix::core::JobState::Frozen, "still frozen");
            assert_eq!(rec.node.as_str(), "node1");
            assert_eq!(rec.pending.as_ref().map(|p| &p.id), Some(mig));
            assert!(
                !dir.join("CLAIM").exists(),
                "refused images are not claimed"
            );
            assert!(
                query_counter(&ip1, 8082).is_none()
                    && query_counter(&cl.node_ip("node2"), 8082).is_none(),
                "nothing was restored"
            );
        }
        assert_eq!(cl.job_json(&job)["state"], "frozen");
    };
    let thaw_ok = |cl: &Cluster| {
        let o = cl.mosctl(&["thaw", &job]);
        assert!(o.status.success(), "thaw: {}", stderr(&o));
        cl.wait_for("counter to answer after thaw", 10, || {
            query_counter(&ip1, 8082).is_some_and(|(_, ok)| ok)
        });
        assert_eq!(cl.record(&job).state, mosix::core::JobState::Running);
    };

    // One flipped byte in a page image.
    let (dir, mig) = freeze(&cl);
    let mut imgs: Vec<(PathBuf, u64)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .map(|p| {
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .filter(|(_, len)| *len > 0)
        .collect();
    assert!(!imgs.is_empty(), "no *.img in {}", dir.display());
    // Prefer the page data: the largest pages-*.img.
    imgs.sort_by_key(|(p, len)| {
        (
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-"),
            *len,
        )
    });
    let (victim, len) = imgs.last().cloned().unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    eprintln!("tampering with {name} ({len} bytes)");
    let at = len / 2;
    let orig = flip_byte(&victim, at);
    refused(&cl, &dir, &mig, &[&name, "BLAKE3"]);
    assert_eq!(flip_byte(&victim, at), orig ^ 0x5a);
    thaw_ok(&cl);

    // A file added to the image directory.
    let (dir, mig) = freeze(&cl);
    let extra = dir.join("zz-extra.img");
    std::fs::write(&extra, b"not part of the dump").unwrap();
    refused(&cl, &dir, &mig, &["zz-extra.img", "not listed"]);
    std::fs::remove_file(&extra).unwrap();

    // A forged manifest: the attacker edits a digest to match his own file.
    let manifest = dir.join("MANIFEST.json");
    let good = std::fs::read(&manifest).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&good).unwrap();
    m["files"][0]["blake3"] = serde_json::Value::String("00".repeat(32));
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    refused(&cl, &dir, &mig, &["HMAC"]);
    std::fs::write(&manifest, &good).unwrap();

    // Untouched again: the thaw works and the counter carries on.
    thaw_ok(&cl);
    let (n, ok) = query_counter(&ip1, 8082).unwrap();
    assert!(ok && n > 0, "counter {n} mem_ok={ok}");
}

// ---------------------------------------------------------------------------
// 4. Pids mosix does not manage

#[test]
fn unmanaged_pids_are_refused_and_the_agent_survives() {
    if !privileged() {
        return;
    }
    let cl = Cluster::up(2, &[]);
    let pids = std::fs::read_to_string(format!("/run/mosix/{}/agents.pids", cl.name)).unwrap();
    let agent: i32 = pids.lines().next().unwrap().trim().parse().unwrap();
    // It is the agent of node1: it runs in node1's namespace.
    let o = run("ip", &["netns", "pids", &cl.netns("node1")], None);
    assert!(
        stdout(&o)
            .split_whitespace()
            .any(|p| p == agent.to_string()),
        "pid {agent} is not in {}",
        cl.netns("node1")
    );
    let me = std::process::id().to_string();
    let agent_s = agent.to_string();
    let cases: &[&[&str]] = &[
        &["migrate", "1", "node2"],
        &["kill", &agent_s],
        &["kill", "--signal", "15", &agent_s],
        &["freeze", &agent_s],
        &["migrate", &agent_s, "node2"],
        &["show", &agent_s],
        &["kill", &me],
    ];
    for args in cases {
        let o = cl.mosctl(args);
        assert!(!o.status.success(), "{args:?} must be refused");
        assert!(
            stderr(&o).contains("not a job managed by mosix"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let stat = std::fs::read_to_string(format!("/proc/{agent}/stat"))
        .expect("the agent process still exists");
    let st = stat.rsplit(')').next().unwrap().split_whitespace().next();
    assert_ne!(st, Some("Z"), "the agent is not a zombie");
    // And it still answers.
    let o = cl.mosctl(&["load"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cf = mosix::core::cluster_file::ClusterFile::load(&cl.file).unwrap();
    let tls = ClientTls::from_cluster(&cf).unwrap();
    let ep = cf.node("node1").unwrap().endpoint.clone();
    let load = runtime().block_on(async {
        let mut c = mosix::api::client::agent(&ep, tls.as_ref(), Duration::from_secs(3))
            .await
            .unwrap();
        // Over the API the refusal is PERMISSION_DENIED.
        let s = c
            .get_job(pb::GetJobRequest {
                selector: Some(pb::get_job_request::Selector::Pid(agent)),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        c.get_load(pb::GetLoadRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(load.node, "node1");
}

// ---------------------------------------------------------------------------
// 5. Bad input on every RPC

type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;

/// One RPC with bad input: must fail with one of `codes` within 10 s, and the
/// agent must answer GetLoad afterwards.
async fn expect_status(c: &AgentClient<Channel>, what: &str, call: Call, codes: &[Code]) {
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10s"));
    let s = match r {
        Ok(()) => panic!("{what}: accepted, expected {codes:?}"),
        Err(s) => s,
    };
    let msg: String = s.message().chars().take(200).collect();
    eprintln!("{what}: {:?} {msg:?} in {:?}", s.code(), t0.elapsed());
    assert!(
        codes.contains(&s.code()),
        "{what}: got {:?} ({msg}), expected one of {codes:?}",
        s.code()
    );
    assert!(
        s.message().len() < 4096,
        "{what}: the error does not echo huge input back ({} bytes)",
        s.message().len()
    );
    let mut c = c.clone();
    let load = tokio::time::timeout(Duration::from_secs(10), c.get_load(pb::GetLoadRequest {}))
        .await
        .unwrap_or_else(|_| panic!("after {what}: GetLoad hung"))
        .unwrap_or_else(|s| panic!("after {what}: GetLoad failed: {s:?}"));
    assert_eq!(load.into_inner().node, "node1");
}

fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

async fn bad_input_cases(c: AgentClient<Channel>) {
    use pb::get_job_request::Selector;
    const INVALID: &[Code] = &[Code::InvalidArgument];
    const NOT_FOUND: &[Code] = &[Code::NotFound];
    // Too big for the wire or for the agent: either is a fine refusal.
    const TOO_BIG: &[Code] = &[
        Code::InvalidArgument,
        Code::OutOfRange,
        Code::ResourceExhausted,
    ];
    let huge = format!("j{}", "a".repeat(100 * 1024));
    // Unknown jobs on the checkpoint RPCs.
    for (label, call) in [
        (
            "Checkpoint unknown job",
            Box::pin({
                let mut k = c.clone();
                async move {
                    ok(k.checkpoint(pb::CheckpointRequest {
                        job_id: "jnosuch".into(),
                    })
                    .await)
                }
            }) as Call,
        ),
        (
            "RestoreCheckpoint unknown job",
            Box::pin({
                let mut k = c.clone();
                async move {
                    ok(k.restore_checkpoint(pb::RestoreCheckpointRequest {
                        leader_revision: 0,
                        job_id: "jnosuch".into(),
                        seq: 3,
                        node_is_down: String::new(),
                    })
                    .await)
                }
            }) as Call,
        ),
    ] {
        expect_status(&c, label, call, NOT_FOUND).await;
    }
    let ids: &[(&str, &str)] = &[
        ("empty", ""),
        ("100 KB", &huge),
        ("../", "../../etc/passwd"),
        ("embedded ../", "j1/../../x"),
        ("absolute", "/etc/passwd"),
        ("NUL", "j1\0x"),
    ];

    for (label, id) in ids {
        let id = id.to_string();
        let mut k = c.clone();
        let i = id.clone();
        let call: Call = Box::pin(async move {
            ok(k.get_job(pb::GetJobRequest {
                selector: Some(Selector::JobId(i)),
            })
            .await)
        });
        expect_status(&c, &format!("GetJob id {label}"), call, INVALID).await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call = Box::pin(async move {
            ok(k.dump(pb::DumpRequest {
                job_id: i,
                ..Default::default()
            })
            .await)
        });
        expect_status(&c, &format!("Dump id {label}"), call, INVALID).await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call =
            Box::pin(async move { ok(k.checkpoint(pb::CheckpointRequest { job_id: i }).await) });
        expect_status(&c, &format!("Checkpoint id {label}"), call, INVALID).await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call = Box::pin(async move {
            ok(k.restore_checkpoint(pb::RestoreCheckpointRequest {
                leader_revision: 0,
                job_id: i,
                seq: 0,
                node_is_down: "node9".into(),
            })
            .await)
        });
        expect_status(&c, &format!("RestoreCheckpoint id {label}"), call, INVALID).await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call = Box::pin(async move {
            ok(k.restore_checkpoint(pb::RestoreCheckpointRequest {
                leader_revision: 0,
                job_id: "j1".into(),
                seq: 1,
                node_is_down: i,
            })
            .await)
        });
        // An empty node name means "none": then the unknown job is the refusal.
        expect_status(
            &c,
            &format!("RestoreCheckpoint node_is_down {label}"),
            call,
            &[Code::InvalidArgument, Code::NotFound],
        )
        .await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call = Box::pin(async move {
            ok(k.restore(pb::RestoreRequest {
                job_id: i,
                migration_id: "m1".into(),
                ..Default::default()
            })
            .await)
        });
        expect_status(&c, &format!("Restore id {label}"), call, INVALID).await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call = Box::pin(async move {
            ok(k.migrate(pb::MigrateRequest {
                job_id: i,
                target_node: "node2".into(),
                ..Default::default()
            })
            .await)
        });
        // An unknown target may be noticed first; both are refusals.
        expect_status(
            &c,
            &format!("Migrate id {label}"),
            call,
            &[Code::InvalidArgument, Code::NotFound],
        )
        .await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call = Box::pin(async move {
            ok(k.signal(pb::SignalRequest {
                job_id: i,
                signal: 15,
            })
            .await)
        });
        expect_status(&c, &format!("Signal id {label}"), call, INVALID).await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call =
            Box::pin(async move { ok(k.freeze(pb::FreezeRequest { job_id: i }).await) });
        expect_status(&c, &format!("Freeze id {label}"), call, INVALID).await;
        let (mut k, i) = (c.clone(), id.clone());
        let call: Call = Box::pin(async move { ok(k.thaw(pb::ThawRequest { job_id: i }).await) });
        expect_status(&c, &format!("Thaw id {label}"), call, INVALID).await;
    }

    // Well-formed ids of jobs that do not exist.
    let mut k = c.clone();
    let call: Call = Box::pin(async move {
        ok(k.get_job(pb::GetJobRequest {
            selector: Some(Selector::JobId("jnosuchjob".into())),
        })
        .await)
    });
    expect_status(&c, "GetJob unknown job", call, NOT_FOUND).await;
    let mut k = c.clone();
    let call: Call = Box::pin(async move {
        ok(k.freeze(pb::FreezeRequest {
            job_id: "jnosuchjob".into(),
        })
        .await)
    });
    expect_status(&c, "Freeze unknown job", call, NOT_FOUND).await;
    let mut k = c.clone();
    let call: Call = Box::pin(async move {
        ok(k.thaw(pb::ThawRequest {
            job_id: "jnosuchjob".into(),
        })
        .await)
    });
    expect_status(&c, "Thaw unknown job", call, NOT_FOUND).await;
    let mut k = c.clone();
    let call: Call = Box::pin(async move {
        ok(k.signal(pb::SignalRequest {
            job_id: "jnosuchjob".into(),
            signal: 9,
        })
        .await)
    });
    expect_status(&c, "Signal unknown job", call, NOT_FOUND).await;

    // GetJob selectors.
    let mut k = c.clone();
    let call: Call =
        Box::pin(async move { ok(k.get_job(pb::GetJobRequest { selector: None }).await) });
    expect_status(&c, "GetJob no selector", call, INVALID).await;
    for pid in [-5, 0, i32::MIN] {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            ok(k.get_job(pb::GetJobRequest {
                selector: Some(Selector::Pid(pid)),
            })
            .await)
        });
        expect_status(&c, &format!("GetJob pid {pid}"), call, INVALID).await;
    }
    for pid in [1, i32::MAX] {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            ok(k.get_job(pb::GetJobRequest {
                selector: Some(Selector::Pid(pid)),
            })
            .await)
        });
        expect_status(
            &c,
            &format!("GetJob pid {pid}"),
            call,
            &[Code::PermissionDenied],
        )
        .await;
    }

    // Migrate: modes, targets, migration ids. (3 is pre-copy, 4 post-copy
    // if safe; 5 is the first value past the enum.)
    for mode in [99, -1, 5] {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            ok(k.migrate(pb::MigrateRequest {
                job_id: "jnosuchjob".into(),
                target_node: "node1".into(),
                mode,
                ..Default::default()
            })
            .await)
        });
        expect_status(&c, &format!("Migrate mode {mode}"), call, INVALID).await;
    }
    for target in ["", "../x", "node1/../../etc"] {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            ok(k.migrate(pb::MigrateRequest {
                job_id: "jnosuchjob".into(),
                target_node: target.into(),
                ..Default::default()
            })
            .await)
        });
        expect_status(&c, &format!("Migrate target {target:?}"), call, INVALID).await;
    }
    let mut k = c.clone();
    let call: Call = Box::pin(async move {
        ok(k.migrate(pb::MigrateRequest {
            job_id: "jnosuchjob".into(),
            target_node: "node9".into(),
            ..Default::default()
        })
        .await)
    });
    expect_status(&c, "Migrate to unknown node", call, NOT_FOUND).await;
    let mut k = c.clone();
    let call: Call = Box::pin(async move {
        ok(k.migrate(pb::MigrateRequest {
            job_id: "jnosuchjob".into(),
            target_node: "node1".into(),
            migration_id: "../../m".into(),
            ..Default::default()
        })
        .await)
    });
    expect_status(&c, "Migrate migration id ../", call, INVALID).await;
    let mut k = c.clone();
    let call: Call = Box::pin(async move {
        ok(k.dump(pb::DumpRequest {
            job_id: "jnosuchjob".into(),
            migration_id: "../../m".into(),
            leave_running: true,
        })
        .await)
    });
    expect_status(&c, "Dump migration id ../", call, INVALID).await;

    // Signals.
    for sig in [0, 65, 1000, -9, i32::MAX] {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            ok(k.signal(pb::SignalRequest {
                job_id: "jnosuchjob".into(),
                signal: sig,
            })
            .await)
        });
        expect_status(&c, &format!("Signal {sig}"), call, INVALID).await;
    }

    // Restore: the image directory is derived, never taken from the caller.
    let restores: &[(&str, pb::RestoreRequest, &[Code])] = &[
        (
            "image_dir ../../etc",
            pb::RestoreRequest {
                job_id: "j1".into(),
                migration_id: "m1".into(),
                image_dir: "../../etc".into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "absolute image_dir",
            pb::RestoreRequest {
                job_id: "j1".into(),
                migration_id: "m1".into(),
                image_dir: "/etc".into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "image_dir of another job",
            pb::RestoreRequest {
                job_id: "j1".into(),
                migration_id: "m1".into(),
                image_dir: "images/j2/m1".into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "empty migration_id",
            pb::RestoreRequest {
                job_id: "j1".into(),
                image_dir: "images/j1/".into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "page_server not ip:port",
            pb::RestoreRequest {
                job_id: "j1".into(),
                migration_id: "m1".into(),
                page_server: "evil.example; rm -rf /".into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "from_node ../x",
            pb::RestoreRequest {
                job_id: "j1".into(),
                migration_id: "m1".into(),
                from_node: "../x".into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "unknown job, right image_dir",
            pb::RestoreRequest {
                job_id: "jnosuchjob".into(),
                migration_id: "m1".into(),
                image_dir: "images/jnosuchjob/m1".into(),
                ..Default::default()
            },
            NOT_FOUND,
        ),
    ];
    for (label, req, codes) in restores {
        let (mut k, req) = (c.clone(), req.clone());
        let call: Call = Box::pin(async move { ok(k.restore(req).await) });
        expect_status(&c, &format!("Restore {label}"), call, codes).await;
    }

    // Launch: nothing may start.
    let launches: Vec<(&str, pb::LaunchRequest, &[Code])> = vec![
        ("empty argv", pb::LaunchRequest::default(), INVALID),
        (
            "empty argv[0]",
            pb::LaunchRequest {
                argv: vec![String::new(), "x".into()],
                ..Default::default()
            },
            INVALID,
        ),
        (
            "2 MiB argv",
            pb::LaunchRequest {
                argv: vec!["/bin/true".into(), "x".repeat(2 << 20)],
                ..Default::default()
            },
            TOO_BIG,
        ),
        (
            "100k arguments",
            pb::LaunchRequest {
                argv: std::iter::once("/bin/true".to_string())
                    .chain(std::iter::repeat_n("0123456789abcdef".to_string(), 100_000))
                    .collect(),
                ..Default::default()
            },
            TOO_BIG,
        ),
        (
            "relative cwd",
            pb::LaunchRequest {
                argv: vec!["/bin/true".into()],
                cwd: "../..".into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "env name with =",
            pb::LaunchRequest {
                argv: vec!["/bin/true".into()],
                env: [("A=B".to_string(), "x".to_string())].into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "empty env name",
            pb::LaunchRequest {
                argv: vec!["/bin/true".into()],
                env: [(String::new(), "x".to_string())].into(),
                ..Default::default()
            },
            INVALID,
        ),
        (
            "1 KB name",
            pb::LaunchRequest {
                argv: vec!["/bin/true".into()],
                name: "n".repeat(1024),
                ..Default::default()
            },
            INVALID,
        ),
    ];
    for (label, req, codes) in launches {
        let mut k = c.clone();
        let call: Call = Box::pin(async move { ok(k.launch(req).await) });
        expect_status(&c, &format!("Launch {label}"), call, codes).await;
    }

    // ListJobs.
    for node in ["../x", "/", "node1\0"] {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            ok(k.list_jobs(pb::ListJobsRequest {
                node: node.into(),
                include_finished: true,
            })
            .await)
        });
        expect_status(&c, &format!("ListJobs node {node:?}"), call, INVALID).await;
    }
    let mut k = c.clone();
    let big = "n".repeat(100 * 1024);
    let call: Call = Box::pin(async move {
        ok(k.list_jobs(pb::ListJobsRequest {
            node: big,
            include_finished: false,
        })
        .await)
    });
    expect_status(&c, "ListJobs node 100 KB", call, INVALID).await;

    // Deadlines that are over before the agent gets to the request: refused
    // with the deadline, or with the request's own refusal if that came
    // first. Even 2 MiB can: tokio's timers tick every millisecond, so a
    // 1 ns deadline fires at the next tick on either side, and loopback
    // carried the 2 MiB, and the agent refused it, within one (seen in a CI
    // run on 2026-12-04).
    const DEADLINE: &[Code] = &[
        Code::Cancelled,
        Code::DeadlineExceeded,
        Code::InvalidArgument,
    ];
    for i in 0..5 {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            let mut r = tonic::Request::new(pb::LaunchRequest {
                argv: vec!["/bin/true".into(), "x".repeat(2 << 20)],
                ..Default::default()
            });
            r.set_timeout(Duration::from_nanos(1));
            ok(k.launch(r).await)
        });
        expect_status(
            &c,
            &format!("expired deadline, 2 MiB Launch #{i}"),
            call,
            DEADLINE,
        )
        .await;
    }
    // A small one may be answered before the timer fires (gRPC allows it);
    // it must still come back at once with the deadline or its own refusal.
    for i in 0..5 {
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            let mut r = tonic::Request::new(pb::ThawRequest {
                job_id: "../x".into(),
            });
            r.set_timeout(Duration::from_nanos(1));
            ok(k.thaw(r).await)
        });
        expect_status(
            &c,
            &format!("expired deadline, Thaw ../x #{i}"),
            call,
            &[
                Code::Cancelled,
                Code::DeadlineExceeded,
                Code::InvalidArgument,
            ],
        )
        .await;
        let mut k = c.clone();
        let call: Call = Box::pin(async move {
            let mut r = tonic::Request::new(pb::GetJobRequest {
                selector: Some(Selector::JobId("jnosuchjob".into())),
            });
            r.set_timeout(Duration::from_nanos(1));
            ok(k.get_job(r).await)
        });
        expect_status(
            &c,
            &format!("expired deadline, GetJob unknown #{i}"),
            call,
            &[Code::Cancelled, Code::DeadlineExceeded, Code::NotFound],
        )
        .await;
    }

    // Nothing was launched or recorded by any of the above.
    let mut k = c.clone();
    let jobs = k
        .list_jobs(pb::ListJobsRequest {
            node: String::new(),
            include_finished: true,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "bad input created jobs: {jobs:?}");
}

#[test]
fn bad_input_on_every_rpc_gets_a_fitting_status_and_the_agent_survives() {
    let mut a = Agentd::start();
    let tls = a.tls();
    let rt = runtime();
    rt.block_on(async {
        let c = mosix::api::client::agent(&a.endpoint, Some(&tls), Duration::from_secs(3))
            .await
            .unwrap();
        bad_input_cases(c).await;
    });
    assert!(a.alive(), "mosixd died: {}", a.log());
    let log = a.log();
    assert!(!log.contains("panicked"), "mosixd panicked: {log}");
}

// ---------------------------------------------------------------------------
// 6. A caller that gives up (deadline, hang-up) does not strand its job

#[test]
fn a_freeze_or_migration_whose_caller_gives_up_still_completes() {
    if !privileged() {
        return;
    }
    use mosix::core::JobState;
    let cl = Cluster::up(2, &[]);
    let job = cl.mosrun(&["--node", "node1", "--", MOSJOB, "counter", "--port", "8084"]);
    // Its own address (the default) wherever it runs, else the node's.
    let own = cl.job_ip(&job);
    let ip = |n: &str| {
        if cl.record(&job).net.is_some() {
            own.clone()
        } else {
            cl.node_ip(n)
        }
    };
    cl.wait_for("counter to answer on node1", 10, || {
        query_counter(&ip("node1"), 8084).is_some()
    });
    let cf = mosix::core::cluster_file::ClusterFile::load(&cl.file).unwrap();
    let tls = ClientTls::from_cluster(&cf).unwrap();
    let rt = runtime();
    // Send one RPC with a deadline that ends during the operation; return
    // how it came back.
    let call = |node: &str, deadline: Duration, migrate_to: Option<&str>| -> Result<(), Code> {
        let ep = cf.node(node).unwrap().endpoint.clone();
        let job = job.clone();
        let to = migrate_to.map(str::to_string);
        rt.block_on(async {
            let mut c = mosix::api::client::agent(&ep, tls.as_ref(), Duration::from_secs(3))
                .await
                .unwrap();
            let r = match to {
                None => {
                    let mut r = tonic::Request::new(pb::FreezeRequest { job_id: job });
                    r.set_timeout(deadline);
                    ok(c.freeze(r).await)
                }
                Some(to) => {
                    let mut r = tonic::Request::new(pb::MigrateRequest {
                        job_id: job,
                        target_node: to,
                        ..Default::default()
                    });
                    r.set_timeout(deadline);
                    ok(c.migrate(r).await)
                }
            };
            r.map_err(|s| s.code())
        })
    };
    // Migrations and freezes under way on either node.
    let in_flight = || -> u32 {
        rt.block_on(async {
            let mut n = 0;
            for node in ["node1", "node2"] {
                let ep = cf.node(node).unwrap().endpoint.clone();
                let mut c = mosix::api::client::agent(&ep, tls.as_ref(), Duration::from_secs(3))
                    .await
                    .unwrap();
                n += c
                    .get_load(pb::GetLoadRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .migrations_in_flight;
            }
            n
        })
    };
    // The operation goes on after its caller gave up. Once it is over, the
    // job must be in a state it can be used from: never stuck "migrating"
    // with its process gone.
    let settle = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut quiet = 0;
        while quiet < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let busy = cl.record(&job).state == JobState::Migrating || in_flight() > 0;
            quiet = if busy { 0 } else { quiet + 1 };
        }
        let rec = cl.record(&job);
        eprintln!("{what}: job is {:?} on {}", rec.state, rec.node);
        assert!(
            matches!(rec.state, JobState::Running | JobState::Frozen),
            "{what}: job left {:?} (pending {:?})",
            rec.state,
            rec.pending
        );
        rec
    };
    let mut last = 0;
    let mut answers = |node: &str, what: &str| {
        cl.wait_for(
            &format!("counter to answer on {node} after {what}"),
            10,
            || query_counter(&ip(node), 8084).is_some(),
        );
        let (n, ok) = query_counter(&ip(node), 8084).unwrap();
        assert!(
            ok && n >= last,
            "{what}: counter {last} -> {n}, mem ok {ok}"
        );
        last = n;
    };
    answers("node1", "start");

    let mut cut_short = 0;
    for ms in [1u64, 10, 30, 80] {
        let what = format!("freeze with a {ms} ms deadline");
        let r = call("node1", Duration::from_millis(ms), None);
        eprintln!("{what}: {r:?}");
        if let Err(code) = r {
            assert!(
                [Code::Cancelled, Code::DeadlineExceeded].contains(&code),
                "{what}: {code:?}"
            );
            cut_short += 1;
        }
        if settle(&what).state == JobState::Frozen {
            let o = cl.mosctl(&["thaw", &job]);
            assert!(o.status.success(), "{what}: thaw: {}", stderr(&o));
        }
        answers("node1", &what);
    }
    assert!(cut_short > 0, "no freeze was cut short by its deadline");

    let mut on = "node1";
    for ms in [10u64, 40, 100, 250] {
        let to = if on == "node1" { "node2" } else { "node1" };
        let what = format!("migrate {on} -> {to} with a {ms} ms deadline");
        let r = call(on, Duration::from_millis(ms), Some(to));
        eprintln!("{what}: {r:?}");
        if let Err(code) = r {
            assert!(
                [Code::Cancelled, Code::DeadlineExceeded].contains(&code),
                "{what}: {code:?}"
            );
        }
        let rec = settle(&what);
        assert_eq!(rec.state, JobState::Running, "{what}");
        on = if rec.node.as_str() == "node1" {
            "node1"
        } else {
            "node2"
        };
        answers(on, &what);
    }
    let rec = cl.record(&job);
    assert!(
        rec.history.iter().all(|m| m.ok),
        "no migration failed: {:?}",
        rec.history
    );
}
