//! A real network file system for the local cluster's shared directories:
//! `mosctl local up --shared-over sshfs`.
//!
//! The kernel here has FUSE but no NFS or 9p client, so the network file
//! system is sshfs (FUSE, SFTP over SSH). A file-server namespace
//! `mos-<cluster>-fs` on the cluster's bridge (address `.250`) runs an
//! OpenSSH `sshd` that serves the host's directories; every node mounts each
//! shared directory (the shared root, or without one the `--common` dirs)
//! with sshfs, from its own network and mount namespaces, at the same path.
//! The host keeps its direct view of the directories: it plays the file
//! server's disk (tests read the registry there).
//!
//! This exercises what a local directory hides: other nodes' writes seen
//! only through the network, caches, rename and exclusive create done by a
//! server, and a server that can go away (tests kill its `sshd`). The
//! mount options and why each is needed are in [`SSHFS_OPTIONS`] and
//! ARCHITECTURE.md ("The shared path over a network file system").

use anyhow::{bail, Context};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The file server's host part in the cluster's /24 (nodes are .2 to .201).
pub const HOST_PART: u8 = 250;

/// sshfs options every node mounts with, measured on sshfs 3.7.3 / OpenSSH
/// 9.2 (see ARCHITECTURE.md):
/// - `dir_cache=no`, `attr_timeout=0`, `entry_timeout=0`,
///   `negative_timeout=0`: with the defaults, a file another node removed
///   still "exists" here for up to 20 s (sshfs's directory cache), which
///   the registry's and the claim files' `exists` checks cannot afford;
/// - `allow_other`: jobs run as their caller's uid, not the mounting root;
/// - `reconnect`, `ServerAliveInterval=2`, `ServerAliveCountMax=3`,
///   `ConnectTimeout=20`: a server that went away is noticed within ~6 s
///   and a reconnect attempt gives up after 20 s, so calls fail with EIO
///   instead of hanging (without `ConnectTimeout` the first call during an
///   outage took 79 s to fail: TCP's connect timeout), and the mount works
///   again once the server is back. Not less than 20 s: the timeout also
///   covers SSH's key exchange, and with 5 s a node's mount failed on this
///   2-core machine under load ("Connection reset by peer"). Files open
///   across the outage stay broken (SFTP handles die with the session)
///   until reopened;
/// - rename over an existing file and `O_EXCL` create need no workaround:
///   OpenSSH's server has `posix-rename@openssh.com`, and SFTP's EXCL flag
///   is an `O_EXCL` open on the server; `fsync@openssh.com` makes fsync
///   reach the server's disk.
pub const SSHFS_OPTIONS: &str =
    "allow_other,reconnect,ServerAliveInterval=2,ServerAliveCountMax=3,ConnectTimeout=20,\
dir_cache=no,attr_timeout=0,entry_timeout=0,negative_timeout=0,\
StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,LogLevel=ERROR,BatchMode=yes";

pub fn netns(cluster: &str) -> String {
    format!("mos-{cluster}-fs")
}

pub fn veth(cluster: &str) -> String {
    format!("mv-{cluster}-fs")
}

fn dir(cluster: &str) -> PathBuf {
    super::state_dir(cluster).join("fileserver")
}

pub fn address(k: u8) -> String {
    format!("10.77.{k}.{HOST_PART}")
}

/// What a node needs to mount the server's directories.
#[derive(Debug, Clone)]
pub struct Mounts {
    pub server: String,
    pub key: PathBuf,
    pub dirs: Vec<PathBuf>,
}

impl Mounts {
    /// One sshfs command line per directory.
    pub fn commands(&self) -> Vec<Vec<String>> {
        self.dirs
            .iter()
            .map(|d| {
                // The FUSE client runs in the node's cgroup, like the agent,
                // and at the agent's priority: at nice 0 the node's own
                // CPU-bound jobs starved it, and with it every read of the
                // shared path (the agent stopped answering).
                vec![
                    "nice".to_string(),
                    "-n".to_string(),
                    crate::core::MIGRATION_NICE.to_string(),
                    "sshfs".to_string(),
                    format!("root@{}:{}", self.server, d.display()),
                    d.display().to_string(),
                    "-o".to_string(),
                    format!("{SSHFS_OPTIONS},IdentityFile={}", self.key.display()),
                ]
            })
            .collect()
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?} (install it: `make setup`)", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Check the tools are there before anything is created.
pub fn check_tools() -> anyhow::Result<()> {
    for t in ["/usr/sbin/sshd", "/usr/bin/sshfs", "/usr/bin/ssh-keygen"] {
        if !Path::new(t).is_file() {
            bail!("--shared-over sshfs needs {t} (Debian packages openssh-server and sshfs: `make setup`)");
        }
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("--shared-over sshfs needs FUSE (/dev/fuse)");
    }
    Ok(())
}

/// Start the file server of `cluster` on subnet `k`, serving `dirs`.
pub fn start(cluster: &str, k: u8, dirs: &[PathBuf]) -> anyhow::Result<Mounts> {
    let d = dir(cluster);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let host_key = d.join("host_key");
    let client_key = d.join("client_key");
    for key in [&host_key, &client_key] {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(key))?;
    }
    let authorized = d.join("authorized_keys");
    std::fs::copy(client_key.with_extension("pub"), &authorized)
        .context("writing authorized_keys")?;
    let addr = address(k);
    let config = d.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {addr}:22\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nUseDNS no\n\
             MaxStartups 100\nSubsystem sftp internal-sftp\n",
            host_key.display(),
            authorized.display()
        ),
    )?;
    // sshd insists on its privilege-separation directory.
    std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
    super::net::make_ns(cluster, &netns(cluster), &veth(cluster), &addr, k)?;
    let ns_path = format!("/run/netns/{}", netns(cluster));
    let ns = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
    let ns_fd = ns.as_raw_fd();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("sshd.log"))?;
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setns and setsid only, on an fd open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting sshd for the file server")?;
    std::fs::write(d.join("sshd.pid"), child.id().to_string())?;
    drop(child);
    drop(ns);
    let sa: std::net::SocketAddr = format!("{addr}:22").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(500)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the file server's sshd does not answer on {sa}; see {}",
                d.join("sshd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Mounts {
        server: addr,
        key: client_key,
        dirs: dirs.to_vec(),
    })
}

/// The file server's listening sshd (tests kill it to see what a server
/// that goes away does).
pub fn sshd_pid(cluster: &str) -> Option<i32> {
    std::fs::read_to_string(dir(cluster).join("sshd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
