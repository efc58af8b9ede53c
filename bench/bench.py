#!/usr/bin/env python3
"""mosix benchmark driver (run by scripts/bench.sh, i.e. `make bench`).

Phases (all by default; pick some with --phases a,b,...):
  plan       policy::plan on 10,000 nodes / 100,000 jobs       (mosbench plan)
  round      one balancer round against 1,000 simulated agents (mosbench sim-agents + round)
  scale      push (load feeds) vs poll at 100 / 1,000 / 10,000 simulated agents with mTLS
             (--scale-agents), round time and balancer CPU per 3 s interval
  migration  idle mosixd CPU/RSS, then migration vs bare CRIU at 64 MiB / 256 MiB / 1 GiB,
             then the post-copy check, on a 2-node local cluster
  balance    makespan of K CPU-bound jobs on a capped 4-node cluster, with and without
             the balancer, against the ideal
  checkpoint frozen time of one checkpoint (`mosctl checkpoint`, the job keeps running) of a
             64 MiB and a 1 GiB job vs the frozen time of a migration of the same job
  noshared   a 2-node cluster without a shared path (`mosctl local up --no-shared`: the
             agents stream the images): `mosctl migrate` vs CRIU's own way without shared
             storage (`criu page-server` on the target, `criu dump --page-server` on the
             source, the other image files copied, `criu restore` on the target)
  crowded    3 nodes capped at 0.5 core, 8 pinned CPU-bound jobs on node1; the balancer
             moves a small job off node1, again and again: its frozen time against the
             same job's move between the idle nodes, with the agents' step traces

Results go to bench-results/results.json; scripts/bench.sh then runs bench/report.py.
Everything started here is recorded in bench-results/run/pids so that the shell's
EXIT trap can kill it even if this driver dies.
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
MOSCTL = str(REL / "mosctl")
MOSRUN = str(REL / "mosrun")
MOSJOB = str(REL / "mosjob")
MOSIX_INIT = str(REL / "mosix-init")
MOSBAL = str(REL / "mos-balance")
MOSBENCH = str(REL / "mosbench")
# MOSIX_BENCH_CLUSTER: another name, to try a phase beside a running bench.
CLUSTER = os.environ.get("MOSIX_BENCH_CLUSTER", "bench")
CLUSTER_FILE = f"/run/mosix/{CLUSTER}/cluster.json"
OUT = ROOT / "bench-results"
RUN = OUT / "run"
PIDS = RUN / "pids"
BARE_DIR = ROOT / "criu-images" / "bench-bare"

ENV = dict(os.environ, MOSIX_CLUSTER=CLUSTER_FILE)
DEFAULT_PHASES = "plan,round,scale,migration,balance,checkpoint,noshared,crowded"
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def criu_path():
    p = ROOT / ".cache" / "criu" / "path"
    if p.is_file():
        return p.read_text().strip()
    return shutil.which("criu") or "criu"


CRIU = criu_path()

# Bare CRIU gets the same options our agent passes over RPC (src/criu/real.rs):
# log level 2 (the agent's default) into a log file, file locks, link remap, cgroups ignored.
CRIU_COMMON = ["-v2", "--file-locks", "--link-remap", "--manage-cgroups=ignore"]
# ...and the same CPU priority as the agent's CRIU workers (core::MIGRATION_NICE),
# set in the child before exec rather than with nice(1), which would add an exec.
CRIU_NICE = -10


def at_criu_nice():
    os.setpriority(os.PRIO_PROCESS, 0, CRIU_NICE)


# ---------------------------------------------------------------------------
# process bookkeeping
# ---------------------------------------------------------------------------

def become_subreaper():
    """CRIU's restore -d leaves the restored tree orphaned; as a subreaper we
    inherit it and can reap it, instead of leaving zombies on a pid 1 that
    does not reap."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception as e:  # noqa: BLE001
        log(f"warning: cannot become a child subreaper: {e}")


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def track(pid):
    RUN.mkdir(parents=True, exist_ok=True)
    with open(PIDS, "a") as f:
        f.write(f"{pid}\n")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return s[s.rfind(")") + 2] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def kill_wait(pid, sig=signal.SIGTERM, timeout=10.0):
    if not pid:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < end:
        reap()
        time.sleep(0.05)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while alive(pid):
            reap()
            time.sleep(0.05)
    reap()


def run(cmd, check=True, timeout=600, env=None, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def others_running():
    """Other local mosix clusters on this machine (e.g. integration tests of
    other sessions) compete for the same 2 cores; record them. Up means an
    agent of its `agents.pids` is alive: a directory alone may be a stale
    one or another bench's scratch files (`make bench-gw`'s)."""
    def up(name):
        try:
            pids = open(f"/run/mosix/{name}/agents.pids").read().split()
        except OSError:
            return False
        return any(p.isdigit() and os.path.exists(f"/proc/{p}") for p in pids)
    try:
        return sorted(n for n in os.listdir("/run/mosix") if n != CLUSTER and up(n))
    except FileNotFoundError:
        return []


def cpu_ticks():
    """(busy, total) CPU seconds of the whole machine so far (from /proc/stat)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(f[:8]) - f[3] - f[4]) / hz


def cluster_cpu_s(nodes):
    """CPU seconds used so far inside the bench cluster's node cgroups."""
    tot = 0
    for i in range(1, nodes + 1):
        try:
            tot += int(open(f"/sys/fs/cgroup/cpuacct/mosix/{CLUSTER}/node{i}/cpuacct.usage").read())
        except (FileNotFoundError, ValueError):
            pass
    return tot / 1e9


def busy_cores(secs=2.0):
    """CPU cores busy on the whole machine over `secs` (from /proc/stat)."""
    def snap():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = f[3] + f[4]
        return sum(f[:8]), idle
    a, ai = snap()
    time.sleep(secs)
    b, bi = snap()
    hz = os.sysconf("SC_CLK_TCK")
    return round(((b - a) - (bi - ai)) / hz / secs, 2)


def top_cpu(n=5):
    r = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True)
    return [l.strip()[:160] for l in r.stdout.splitlines()[1:n + 1]]


def background():
    return {"busy_cores": busy_cores(), "loadavg": loadavg(), "top": top_cpu(),
            "other_clusters": others_running()}


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


# ---------------------------------------------------------------------------
# cluster helpers
# ---------------------------------------------------------------------------

def cluster_down():
    run([MOSCTL, "local", "down", "--name", CLUSTER], check=False, timeout=60)


def cluster_up(nodes, caps=None, extra=(), agent_env=None):
    """A local cluster named CLUSTER. agent_env: more environment for its
    agents (they inherit mosctl's), e.g. RUST_LOG for their debug-level step
    traces in /run/mosix/CLUSTER/NODE.log."""
    cluster_down()
    cmd = [MOSCTL, "local", "up", "--name", CLUSTER, "--nodes", str(nodes), *extra]
    if "--no-shared" not in extra:
        # The project this driver belongs to (the binaries' default is the
        # project they were built in, which is not this one in a worktree).
        cmd += ["--shared", str(ROOT / "criu-images" / CLUSTER)]
    if caps:
        cmd += ["--cpu-caps", ",".join(str(c) for c in caps)]
    run(cmd, timeout=120, env=dict(ENV, **agent_env) if agent_env else None)
    cf = json.load(open(CLUSTER_FILE))
    pids = [int(x) for x in open(f"/run/mosix/{CLUSTER}/agents.pids").read().split()]
    return cf, pids


def mosrun(node, argv):
    # `--net node`: the job in its node's network namespace, like the bare
    # CRIU process these figures compare against (and as the kept figures
    # were measured); a job with its own address (the default since issue
    # 18) has its namespace dumped and restored too (bench/jobnet.py).
    # BENCH_JOB_NET=own measures such jobs instead (for A/Bs of our own
    # builds: bare CRIU's process keeps its node's network).
    net = os.environ.get("BENCH_JOB_NET", "node")
    r = run([MOSRUN, "-d", "--net", net, "--node", node, "--"] + argv)
    return r.stdout.strip().split()[0]


def show(job):
    return json.loads(run([MOSCTL, "show", job, "--json"]).stdout)


def jobs_all():
    return json.loads(run([MOSCTL, "jobs", "--all", "--json"]).stdout)


def wait_file_contains(path, needle, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if needle in Path(path).read_text():
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not show {needle!r} within {timeout}s")


MIGRATED_RE = re.compile(r"frozen (\d+) ms, total (\d+) ms, images ([0-9.]+ \S+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def last_restore_ms(node, job):
    """restore_ms the target agent logged for its last restore of `job` (CRIU restore only)."""
    try:
        text = ANSI_RE.sub("", Path(f"/run/mosix/{CLUSTER}/{node}.log").read_text())
    except FileNotFoundError:
        return None
    m = re.findall(rf"restored job={job} pid=\d+(?: verify_ms=\d+)? restore_ms=(\d+)", text)
    return int(m[-1]) if m else None


def last_move_numbers(job):
    """What the agents logged (info level) of `job`'s last move: the source's
    CRIU dump and seal ("dumped and sealed dump_ms= seal_us="), its push of
    the images without a shared path ("images pushed push_ms="), and the
    target's restore ("restored verify_ms= restore_ms="). Each the last such
    line in any node's log; None where a line is missing."""
    out = {"agent_dump_ms": None, "agent_seal_ms": None, "agent_push_ms": None, "agent_restore_ms": None}
    best = {}
    pats = {
        "sealed": rf"dumped and sealed job={re.escape(job)} dump_ms=(\d+)(?: follow_tail_us=\d+)? seal_us=(\d+)",
        "pushed": rf"images pushed job={re.escape(job)} .*?push_ms=(\d+)",
        "restored": rf"restored job={re.escape(job)} pid=\d+(?: verify_ms=\d+)? restore_ms=(\d+)",
    }
    for log in Path(f"/run/mosix/{CLUSTER}").glob("node*.log"):
        try:
            lines = ANSI_RE.sub("", log.read_text(errors="replace")).splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            for key, pat in pats.items():
                m = re.search(pat, line)
                if m and (key not in best or line[:30] > best[key][0]):
                    best[key] = (line[:30], m.groups())
    if "sealed" in best:
        out["agent_dump_ms"] = int(best["sealed"][1][0])
        out["agent_seal_ms"] = int(best["sealed"][1][1]) / 1000
    if "pushed" in best:
        out["agent_push_ms"] = int(best["pushed"][1][0])
    if "restored" in best:
        out["agent_restore_ms"] = int(best["restored"][1][0])
    return out


def wait_images_gone(job, timeout=30.0):
    """The agent deletes a move's images on a background thread after it
    replied. Wait until that is done, so each timed move starts as bare
    CRIU's does (the bench deletes bare images synchronously, untimed)
    instead of sharing the CPU and page allocator with the deletion of the
    previous GiB."""
    shared = json.loads(Path(CLUSTER_FILE).read_text()).get("shared_root")
    if shared:
        roots = [Path(shared) / "images" / job]
    else:
        # --no-shared: each node keeps its images in its own state dir.
        roots = [d / "images" / job for d in Path(f"/run/mosix/{CLUSTER}/nodes").glob("*")]
    end = time.monotonic() + timeout

    def busy(root):
        try:
            # (Dirs left with only CRIU logs, under MOSIX_KEEP_CRIU_LOGS, count as gone.)
            return any(p.is_dir() and any(p.glob("*.img")) for p in root.iterdir())
        except FileNotFoundError:
            return False
    while time.monotonic() < end:
        if not any(busy(r) for r in roots):
            return
        time.sleep(0.01)


def migrate(job, to, extra=()):
    wait_images_gone(job)
    t = time.monotonic()
    r = run([MOSCTL, "migrate", *extra, job, to], check=False, timeout=600)
    wall = (time.monotonic() - t) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"mosctl migrate {job} {to} failed: {r.stderr.strip()}")
    m = MIGRATED_RE.search(r.stdout)
    if not m:
        raise RuntimeError(f"cannot parse mosctl migrate output: {r.stdout!r}")
    return {"wall_ms": wall, "frozen_ms": int(m.group(1)), "total_ms": int(m.group(2)),
            "images": m.group(3), "restore_ms": last_restore_ms(to, job)}


# ---------------------------------------------------------------------------
# bare CRIU
# ---------------------------------------------------------------------------

class BareJob:
    """The same process tree that `mosrun` makes of `mosjob mem` (its init
    `mosix-init`, in the job's own directory, and the command under it), the
    init of its own pid namespace and session, in a node's network namespace,
    moved between nodes with plain `criu`."""

    def __init__(self, mib, node="node1", tag=""):
        self.mib = mib
        self.dir = BARE_DIR / f"{mib}{tag}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.out = self.dir / "stdout"
        inner = (f"cd {self.dir} && exec {MOSIX_INIT} 0 0 {self.dir} -- {MOSJOB} mem --mib {mib} "
                 f"</dev/null >{self.out} 2>{self.dir / 'stderr'}")
        self.unshare = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{node}", "unshare", "--pid", "--fork",
             "setsid", "bash", "-c", inner],
            stdin=subprocess.DEVNULL, stdout=open(self.dir / "unshare.log", "w"), stderr=subprocess.STDOUT)
        track(self.unshare.pid)
        self.pid = None
        end = time.monotonic() + 10
        while time.monotonic() < end and not self.pid:
            try:
                kids = open(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children").read().split()
                self.pid = int(kids[0]) if kids else None
            except FileNotFoundError:
                break
            time.sleep(0.02)
        if not self.pid:
            raise RuntimeError("bare job: no pid-namespace init under unshare")
        track(self.pid)
        self.node = node
        wait_file_contains(self.out, "ready", 120)

    def move(self, to):
        img = self.dir / "img"
        shutil.rmtree(img, ignore_errors=True)
        img.mkdir()
        t = time.monotonic()
        r = subprocess.run(["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{self.node}", CRIU, "dump",
                            "-t", str(self.pid), "-D", str(img), "-o", "dump.log", *CRIU_COMMON],
                           capture_output=True, text=True, preexec_fn=at_criu_nice)
        dump = (time.monotonic() - t) * 1000
        if r.returncode != 0:
            raise RuntimeError(f"bare criu dump failed: {r.stderr.strip()[-1500:]}\n"
                               f"{(img / 'dump.log').read_text()[-1500:] if (img / 'dump.log').exists() else ''}")
        image_bytes = sum(f.stat().st_size for f in img.iterdir() if f.is_file())
        self.collect_dumped()
        restore = self.restore(to, img, "bare criu restore")
        # Diagnostic only (not part of bare total): the CPU the agent's seal
        # (hash + HMAC manifest) and verify (hash again) need on these images.
        # Measured after the restore, so that bare CRIU's restore follows its
        # dump at once, as ours does.
        sv = json.loads(run([MOSBENCH, "seal", "--dir", str(img)]).stdout)
        memwrite = memwrite_ms(img / "stats-dump")
        shutil.rmtree(img, ignore_errors=True)
        return {"dump_ms": dump, "restore_ms": restore, "total_ms": dump + restore,
                "image_bytes": image_bytes,
                "seal_cpu_ms": sv["seal_ms"], "verify_cpu_ms": sv["verify_ms"],
                "memwrite_ms": memwrite}

    def move_lazy(self, to, port):
        """Bare CRIU post-copy: `criu dump --lazy-pages` serving pages from the
        source node, `criu lazy-pages` + `criu restore --lazy-pages` on the
        target. frozen = dump start until the restore returned (the job runs
        again); total = until the source's page server has sent every page."""
        img = self.dir / "img"
        shutil.rmtree(img, ignore_errors=True)
        img.mkdir()
        cf = json.loads(Path(CLUSTER_FILE).read_text())
        src_ip = next(n["address"] for n in cf["nodes"] if n["name"] == self.node)
        rd, wr = os.pipe()
        t = time.monotonic()
        dump = subprocess.Popen(["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{self.node}", CRIU, "dump",
                                 "-t", str(self.pid), "-D", str(img), "-o", "dump.log", *CRIU_COMMON,
                                 "--lazy-pages", "--address", src_ip, "--port", str(port),
                                 "--status-fd", str(wr)],
                                pass_fds=(wr,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=at_criu_nice)
        track(dump.pid)
        os.close(wr)
        ready = os.read(rd, 1)
        os.close(rd)
        if not ready:
            dump.wait()
            raise RuntimeError(f"bare lazy dump failed: {(img / 'dump.log').read_text()[-1500:]}")
        dumped = (time.monotonic() - t) * 1000
        if self.unshare and self.unshare.poll() is None:
            pass  # the tree is frozen under CRIU until every page is served
        daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{to}", CRIU, "lazy-pages",
                                   "--page-server", "--address", src_ip, "--port", str(port),
                                   "-D", str(img), "-o", "lazy.log", "-v4"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=at_criu_nice)
        track(daemon.pid)
        end = time.monotonic() + 15
        while not (img / "lazy-pages.socket").exists() and time.monotonic() < end:
            time.sleep(0.002)
        pidfile = self.dir / "restored.pid"
        pidfile.unlink(missing_ok=True)
        r = subprocess.run(["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{to}", CRIU, "restore",
                            "-D", str(img), "-o", "restore.log", *CRIU_COMMON, "-d", "--lazy-pages",
                            "--pidfile", str(pidfile)], capture_output=True, text=True, preexec_fn=at_criu_nice)
        frozen = (time.monotonic() - t) * 1000
        if r.returncode != 0:
            dump.kill()
            daemon.kill()
            raise RuntimeError(f"bare lazy restore failed: {(img / 'restore.log').read_text()[-1500:]}")
        dump.wait(timeout=600)
        total = (time.monotonic() - t) * 1000
        daemon.wait(timeout=60)
        self.collect_dumped()
        self.pid = int(pidfile.read_text().strip())
        track(self.pid)
        self.node = to
        shutil.rmtree(img, ignore_errors=True)
        return {"dump_ready_ms": dumped, "frozen_ms": frozen, "total_ms": total}

    def move_noshared(self, to, port, tls=False):
        """CRIU's own migration without shared storage: `criu page-server`
        in the target node's netns, receiving the pages into the target's
        image dir; `criu dump --page-server` in the source's, writing the
        other image files into the source's dir; those copied to the target
        (a user would scp them); `criu restore` in the target's netns. Total
        = from starting the page server until the restore returned."""
        cf = json.loads(Path(CLUSTER_FILE).read_text())
        dst_ip = next(n["address"] for n in cf["nodes"] if n["name"] == to)
        src, dst = self.dir / "img-src", self.dir / "img-dst"
        for d in (src, dst):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        rd, wr = os.pipe()
        t = time.monotonic()
        ps = subprocess.Popen(["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{to}", CRIU, "page-server",
                               "-D", str(dst), "-o", "page-server.log", "-v2",
                               "--address", dst_ip, "--port", str(port), "--status-fd", str(wr),
                               *(bare_tls(to, server=True) if tls else [])],
                              pass_fds=(wr,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=at_criu_nice)
        track(ps.pid)
        os.close(wr)
        import select
        ready = os.read(rd, 1) if select.select([rd], [], [], 15)[0] else b""
        os.close(rd)
        if not ready:
            ps.kill()
            ps.wait()
            log_ = dst / "page-server.log"
            raise RuntimeError(f"bare page-server failed: {log_.read_text()[-1500:] if log_.exists() else ''}")
        listening = (time.monotonic() - t) * 1000
        t_dump = time.monotonic()
        r = subprocess.run(["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{self.node}", CRIU, "dump",
                            "-t", str(self.pid), "-D", str(src), "-o", "dump.log", *CRIU_COMMON,
                            "--page-server", "--address", dst_ip, "--port", str(port),
                            *(bare_tls(self.node) if tls else [])],
                           capture_output=True, text=True, preexec_fn=at_criu_nice)
        dump = (time.monotonic() - t_dump) * 1000
        if r.returncode != 0:
            ps.kill()
            ps.wait()
            raise RuntimeError(f"bare dump --page-server failed: {r.stderr.strip()[-1500:]}\n"
                               f"{(src / 'dump.log').read_text()[-1500:] if (src / 'dump.log').exists() else ''}")
        # The page server ends when the dump closes its connection.
        try:
            ps.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ps.kill()
            ps.wait()
            raise RuntimeError("bare page-server did not exit after the dump")
        if ps.returncode != 0:
            raise RuntimeError(f"bare page-server exited {ps.returncode}: "
                               f"{(dst / 'page-server.log').read_text()[-1500:]}")
        t_copy = time.monotonic()
        copied = 0
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".log") and not (dst / f.name).exists():
                shutil.copy(f, dst / f.name)
                copied += f.stat().st_size
        copy = (time.monotonic() - t_copy) * 1000
        self.collect_dumped()
        restore = self.restore(to, dst, "bare restore (no shared path)")
        end = time.monotonic()
        received = sum(f.stat().st_size for f in dst.iterdir() if f.is_file() and not f.name.endswith(".log"))
        for d in (src, dst):
            shutil.rmtree(d, ignore_errors=True)
        return {"listen_ms": listening, "dump_ms": dump, "copy_ms": copy, "restore_ms": restore,
                "total_ms": (end - t) * 1000, "copied_bytes": copied, "image_bytes": received}

    def collect_dumped(self):
        """The dump killed the tree; collect the unshare parent of the first run."""
        if self.unshare and self.unshare.poll() is None:
            try:
                self.unshare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        reap()

    def restore(self, to, img, what):
        """`criu restore -d` of `img` in node `to`'s network namespace; the
        restored tree becomes this job. Returns the restore's wall ms."""
        pidfile = self.dir / "restored.pid"
        pidfile.unlink(missing_ok=True)
        t = time.monotonic()
        r = subprocess.run(["nsenter", f"--net=/run/netns/mos-{CLUSTER}-{to}", CRIU, "restore",
                            "-D", str(img), "-o", "restore.log", *CRIU_COMMON, "-d",
                            "--pidfile", str(pidfile)],
                           capture_output=True, text=True, preexec_fn=at_criu_nice)
        ms = (time.monotonic() - t) * 1000
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed: {r.stderr.strip()[-1500:]}\n"
                               f"{(img / 'restore.log').read_text()[-1500:] if (img / 'restore.log').exists() else ''}")
        self.pid = int(pidfile.read_text().strip())
        track(self.pid)
        self.node = to
        return ms

    def kill(self):
        if self.pid:
            kill_wait(self.pid, signal.SIGKILL)
        if self.unshare and self.unshare.poll() is None:
            kill_wait(self.unshare.pid, signal.SIGKILL)
        reap()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------

def phase_plan(res, args):
    log("plan: policy::plan on 10,000 nodes / 100,000 jobs")
    r = run([MOSBENCH, "plan", "--nodes", "10000", "--jobs", "100000", "--runs", str(args.plan_runs)])
    sys.stderr.write(r.stderr)
    res["plan"] = json.loads(r.stdout)


def start_sim(count, base_port, cluster_out, tls_dir=None, churn_pct=None):
    for attempt in range(5):
        port = base_port + attempt * (count + 500)
        if port + count > 65000:
            port = 20000 + attempt * 97
        cmd = [MOSBENCH, "sim-agents", "--count", str(count), "--base-port", str(port),
               "--jobs-per-node", "10", "--cluster-out", str(cluster_out)]
        if churn_pct is not None:
            cmd += ["--churn-pct", str(churn_pct)]
        if tls_dir:
            cmd += ["--tls-dir", str(tls_dir)]
        errf = open(RUN / "sim-agents.err", "w")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True)
        track(p.pid)
        line = p.stdout.readline()
        if line.strip().startswith("{") and '"ready"' in line:
            return p, json.loads(line)
        kill_wait(p.pid)
        log(f"round: sim agents could not start on ports {port}+: "
            f"{(RUN / 'sim-agents.err').read_text().strip()[-300:]}")
    raise RuntimeError("cannot start simulated agents")


def phase_round(res, args):
    out = {}
    for variant, tls in (("plain", False), ("mtls", True)):
        log(f"round: {args.agents} simulated agents ({variant}), {args.rounds} rounds")
        cf = RUN / f"sim-cluster-{variant}.json"
        sim, info = start_sim(args.agents, 20000, cf, RUN / "sim-pki" if tls else None)
        try:
            r = run([MOSBENCH, "round", "--cluster", str(cf), "--rounds", str(args.rounds)], timeout=300)
            sys.stderr.write(r.stderr)
            d = json.loads(r.stdout)
            d["sim_jobs"] = info["jobs"]
            # The balancer's default interval is 3 s (mos-balance serve --interval).
            d["cpu_fraction_of_interval"] = d["cpu_median_s"] / 3.0
            out[variant] = d
        finally:
            kill_wait(sim.pid)
            shutil.rmtree(RUN / "sim-pki", ignore_errors=True)
    res["round"] = out


def phase_scale(res, args):
    """The control plane at 100, 1,000 and 10,000 simulated agents, with mTLS:
    `mos-balance serve`'s default (following the agents' pushed load feeds,
    `mosbench round --feed`) and the old polling (`mosbench round`), side by
    side. Push: the round time is taking the view and planning; CPU is the
    balancer process's over each whole 3 s interval (receiving reports
    included), once the feeds are open. Poll: a round's time and CPU.
    Each simulated node's load moves by 15-50% of capacity about once per
    100 s (--churn-pct 1), so the feed carries real reports, not only
    heartbeats."""
    rows = []
    for count in args.scale_agents:
        cf = RUN / f"sim-cluster-scale-{count}.json"
        log(f"scale: {count} simulated agents (mTLS), push and poll")
        sim, info = start_sim(count, 20000, cf, RUN / "sim-pki", churn_pct=args.churn_pct)
        try:
            for mode in ("push", "poll"):
                cmd = [MOSBENCH, "round", "--cluster", str(cf), "--rounds", str(args.rounds)]
                if mode == "push":
                    cmd += ["--feed", "--interval", "3"]
                r = run(cmd, timeout=600)
                sys.stderr.write(r.stderr)
                d = json.loads(r.stdout)
                d["push"] = mode == "push"
                d["sim_jobs"] = info["jobs"]
                d["churn_pct"] = args.churn_pct
                d["cpu_fraction_of_interval"] = d["cpu_median_s"] / 3.0
                d["agents_up_min"] = min(x["agents_up"] for x in d["rounds"])
                rows.append(d)
        finally:
            kill_wait(sim.pid)
            shutil.rmtree(RUN / "sim-pki", ignore_errors=True)
    res["round_scale"] = rows


def warm_up(job, bare, extra=()):
    """One untimed round trip per side before the timed runs. This machine is
    a VM whose balloon reports freed memory to the host; the first touch of
    such memory faults in the host, and writing 1 GiB of images into it can
    take 4x as long. Whoever moved first would pay it. Returns the times."""
    return {"ours": [migrate(job, "node2", extra)["wall_ms"], migrate(job, "node1", extra)["wall_ms"]],
            "bare": [bare.move("node2")["total_ms"], bare.move("node1")["total_ms"]]}


def compare_with_bare(sizes, label=""):
    """For each (MiB, runs): our `mosctl migrate` of a `mosjob mem` job and a
    bare `criu dump` + `criu restore` of an identical process, interleaved,
    on the cluster that is up. Each run is a round trip node1 -> node2 ->
    node1 per side, and both legs count: the medians are over 2 x runs moves
    per side (this VM's noise is large; more moves give a steadier median).
    Returns one stats dict per size."""
    out = []
    for mib, runs in sizes:
        log(f"migration{label}: {mib} MiB x {runs} runs (ours and bare CRIU, interleaved)")
        job = mosrun("node1", [MOSJOB, "mem", "--mib", str(mib)])
        rec = show(job)
        wait_file_contains(rec["stdout_path"], "ready", 120)
        bare = BareJob(mib)
        ours_out, ours_back, bares_out, bares_back = [], [], [], []
        warm = {}
        try:
            warm = warm_up(job, bare)
            log(f"  warm-up (untimed): ours {warm['ours'][0]:.0f}/{warm['ours'][1]:.0f} ms, "
                f"bare {warm['bare'][0]:.0f}/{warm['bare'][1]:.0f} ms")
            for i in range(runs):
                def do_ours():
                    ours_out.append(migrate(job, "node2"))
                    ours_back.append(migrate(job, "node1"))

                def do_bare():
                    bares_out.append(bare.move("node2"))
                    bares_back.append(bare.move("node1"))

                # Alternate who goes first, so neither always gets the warmer cache.
                for f in ((do_ours, do_bare) if i % 2 == 0 else (do_bare, do_ours)):
                    f()
                o, ob, b, bb = ours_out[-1], ours_back[-1], bares_out[-1], bares_back[-1]
                log(f"  run {i + 1}/{runs}: ours {o['wall_ms']:.0f} + {ob['wall_ms']:.0f} ms "
                    f"(frozen {o['frozen_ms']} + {ob['frozen_ms']}); bare {b['total_ms']:.0f} + {bb['total_ms']:.0f} ms "
                    f"(dump {b['dump_ms']:.0f} + restore {b['restore_ms']:.0f}, "
                    f"dump {bb['dump_ms']:.0f} + restore {bb['restore_ms']:.0f})")
            # The job must still be running after all the round trips.
            ok = show(job)["state"] == "running"
            # CRIU's memory write of our timed moves (the warm-up's two first).
            ours_write = memwrites_ms(job)[2:]
        finally:
            run([MOSCTL, "kill", job], check=False)
            bare.kill()
        ours, bares = ours_out + ours_back, bares_out + bares_back
        s = {
            "mib": mib, "runs": runs, "moves": len(ours), "job_ok_after": ok, "warmup_ms": warm,
            "ours_frozen_ms": stats([o["frozen_ms"] for o in ours]),
            "ours_total_ms": stats([o["total_ms"] for o in ours]),
            "ours_wall_ms": stats([o["wall_ms"] for o in ours]),
            "ours_criu_restore_ms": stats([o["restore_ms"] for o in ours]),
            "ours_out_wall_ms": stats([o["wall_ms"] for o in ours_out]),
            "ours_back_wall_ms": stats([o["wall_ms"] for o in ours_back]),
            "bare_dump_ms": stats([b["dump_ms"] for b in bares]),
            "bare_restore_ms": stats([b["restore_ms"] for b in bares]),
            "bare_total_ms": stats([b["total_ms"] for b in bares]),
            "bare_out_total_ms": stats([b["total_ms"] for b in bares_out]),
            "bare_back_total_ms": stats([b["total_ms"] for b in bares_back]),
            "seal_cpu_ms": stats([b["seal_cpu_ms"] for b in bares]),
            "verify_cpu_ms": stats([b["verify_cpu_ms"] for b in bares]),
            # CRIU's memory write (stats-dump's memwrite_time) of each move:
            # ours in the order made, bare as out, back, out, back.
            "ours_memwrite_ms": stats(ours_write),
            "bare_memwrite_ms": stats([b["memwrite_ms"] for bo in zip(bares_out, bares_back) for b in bo]),
            "ours_images": ours[0]["images"] if ours else None,
            "bare_image_bytes": bares[0]["image_bytes"] if bares else None,
        }
        s["ratio_total"] = s["ours_wall_ms"]["median"] / s["bare_total_ms"]["median"]
        s["ratio_frozen"] = s["ours_frozen_ms"]["median"] / s["bare_total_ms"]["median"]
        out.append(s)
        log(f"  {mib} MiB{label}: ours total {s['ours_wall_ms']['median']:.0f} ms vs bare {s['bare_total_ms']['median']:.0f} ms "
            f"-> ratio {s['ratio_total']:.2f}")
    return out


def phase_migration(res, args):
    log("migration: 2-node local cluster")
    # MOSIX_KEEP_CRIU_LOGS: each move's CRIU statistics stay beside its logs
    # (the images go as usual), for CRIU's memory write of ours and bare's.
    cf, agent_pids = cluster_up(2, agent_env={"MOSIX_KEEP_CRIU_LOGS": "1"})
    mig = {"sizes": [], "others_running": others_running(), "loadavg_start": loadavg()}
    res["migration"] = mig

    # -- idle mosixd first, while the cluster is brand new and empty ---------
    time.sleep(3)
    log(f"idle: sampling mosixd {agent_pids} for {args.idle_secs} s")
    r = run([MOSBENCH, "proc-sample", "--pids", ",".join(map(str, agent_pids)),
             "--secs", str(args.idle_secs)], timeout=args.idle_secs + 60)
    res["idle"] = json.loads(r.stdout)
    res["idle"]["loadavg"] = loadavg()

    # -- ours vs bare ---------------------------------------------------------
    mig["sizes"] = compare_with_bare(args.sizes)

    # -- post-copy -------------------------------------------------------------
    log("post-copy: probing `mosctl migrate --post-copy`")
    pc = {"available": False}
    res["post_copy"] = pc
    job = mosrun("node1", [MOSJOB, "mem", "--mib", "64"])
    try:
        wait_file_contains(show(job)["stdout_path"], "ready", 60)
        r = run([MOSCTL, "migrate", "--post-copy", job, "node2"], check=False)
        if r.returncode != 0:
            pc["error"] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
            log(f"post-copy: not available: {pc['error']}")
        else:
            pc["available"] = True
            run([MOSCTL, "migrate", "--full-copy", job, "node1"], check=False)
    finally:
        run([MOSCTL, "kill", job], check=False)
    if pc["available"]:
        for mib, runs in args.sizes:
            # Up to 7 moves per size: with 3, one slow move moved the median
            # of the 1 GiB frozen time across the 0.3 s target.
            runs = min(runs, 7)
            job = mosrun("node1", [MOSJOB, "mem", "--mib", str(mib)])
            bare = None
            try:
                wait_file_contains(show(job)["stdout_path"], "ready", 120)
                bare = BareJob(mib)
                vals, bares = [], []
                warm_up(job, bare, ["--full-copy"])
                for i in range(runs):
                    vals.append(migrate(job, "node2", ["--post-copy"]))
                    migrate(job, "node1", ["--full-copy"])
                    bares.append(bare.move_lazy("node2", 27100 + i))
                    bare.move("node1")
                    log(f"  post-copy {mib} MiB run {i + 1}: ours frozen {vals[-1]['frozen_ms']} ms "
                        f"total {vals[-1]['total_ms']} ms; bare frozen {bares[-1]['frozen_ms']:.0f} ms "
                        f"total {bares[-1]['total_ms']:.0f} ms")
                pc[f"{mib}"] = {"frozen_ms": stats([v["frozen_ms"] for v in vals]),
                                "total_ms": stats([v["total_ms"] for v in vals]),
                                "wall_ms": stats([v["wall_ms"] for v in vals]),
                                "bare_frozen_ms": stats([b["frozen_ms"] for b in bares]),
                                "bare_total_ms": stats([b["total_ms"] for b in bares])}
                log(f"post-copy {mib} MiB: frozen median {pc[f'{mib}']['frozen_ms']['median']} ms")
            except Exception as e:  # noqa: BLE001
                pc[f"{mib}"] = {"error": str(e)}
                log(f"post-copy {mib} MiB failed: {e}")
            finally:
                run([MOSCTL, "kill", job], check=False)
                if bare:
                    bare.kill()
    # -- diagnostic: the same full-copy moves with sealing off ----------------
    # Not a mode anyone should run: it shows how much of the gap to bare CRIU
    # is the cost of hashing every image page (BLAKE3 on the source while
    # CRIU writes, on the target while CRIU restores) on this machine's cores.
    if args.unsealed_sizes:
        cluster_down()
        cluster_up(2, extra=["--unsealed-images"])
        try:
            mig["unsealed"] = compare_with_bare(args.unsealed_sizes, label=" (sealing off)")
        except Exception as e:  # noqa: BLE001
            mig["unsealed_error"] = str(e)
            log(f"unsealed diagnostic failed: {e}")
    mig["loadavg_end"] = loadavg()
    cluster_down()


CHECKPOINT_RE = re.compile(r"checkpoint (\d+) of \S+ on \S+: frozen (\d+) ms")


def phase_checkpoint(res, args):
    """Issue 16's target: a checkpoint freezes a job no longer than a
    migration of it does. Alternates one checkpoint and one move per run."""
    log("checkpoint: 2-node local cluster")
    # MOSIX_KEEP_CRIU_LOGS: the moves' CRIU statistics stay beside their
    # logs (the images go as usual), to set CRIU's own memory-write time of
    # each checkpoint beside each move's.
    cluster_up(2, agent_env={"MOSIX_KEEP_CRIU_LOGS": "1"})
    out = {}
    res["checkpoint"] = out
    shared = Path(json.loads(Path(CLUSTER_FILE).read_text())["shared_root"])
    for mib, runs in args.ckpt_sizes:
        job = mosrun("node1", [MOSJOB, "mem", "--mib", str(mib)])
        try:
            wait_file_contains(show(job)["stdout_path"], "ready", 120)
            ck, mv, ck_write = [], [], []
            node = "node1"
            # Run 0 is an untimed warm-up, as in the migration phase: this
            # VM's balloon hands freed memory back to the host, and the first
            # checkpoint and move of a GiB fault it all in again.
            for i in range(runs + 1):
                # As before every timed move: the previous move's images
                # are deleted in the background after it replied, and a GiB
                # of that competing for the CPU and the page allocator was
                # counted against the checkpoint, not the move.
                wait_images_gone(job)
                r = run([MOSCTL, "checkpoint", job], check=False, timeout=600)
                m = CHECKPOINT_RE.search(r.stdout)
                if r.returncode != 0 or not m:
                    raise RuntimeError(f"mosctl checkpoint {job}: {r.stderr.strip() or r.stdout!r}")
                ck_ms = int(m.group(2))
                ck_w = memwrite_ms(shared / "checkpoints" / job / m.group(1) / "stats-dump")
                # Keep only this one on disk (a GiB job would keep 3 GiB).
                for old in (shared / "checkpoints" / job).iterdir():
                    if old.name.isdigit() and old.name != m.group(1):
                        shutil.rmtree(old, ignore_errors=True)
                node = "node2" if node == "node1" else "node1"
                mv_ms = migrate(job, node)["frozen_ms"]
                if i == 0:
                    log(f"  {mib} MiB warm-up (untimed): checkpoint frozen {ck_ms} ms, migration frozen {mv_ms} ms")
                    continue
                ck.append(ck_ms)
                mv.append(mv_ms)
                if ck_w is not None:
                    ck_write.append(ck_w)
                log(f"  {mib} MiB run {i}: checkpoint frozen {ck_ms} ms "
                    f"(CRIU's memory write {ck_w or 0:.0f} ms), migration frozen {mv_ms} ms")
            # The moves' own, in order; the warm-up's is the first.
            mv_write = memwrites_ms(job)
            out[f"{mib}"] = {"checkpoint_frozen_ms": stats(ck), "migration_frozen_ms": stats(mv),
                             "checkpoint_memwrite_ms": stats(ck_write) if ck_write else None,
                             "migration_memwrite_ms": stats(mv_write[1:]) if len(mv_write) > 1 else None}
        except Exception as e:  # noqa: BLE001
            out[f"{mib}"] = {"error": str(e)}
            log(f"checkpoint {mib} MiB failed: {e}")
        finally:
            run([MOSCTL, "kill", job], check=False)
            # A GiB job keeps 3 GiB of checkpoints: never leave them.
            shutil.rmtree(shared / "checkpoints" / job, ignore_errors=True)
    cluster_down()


def run_burn(units):
    """(wall s, CPU s) of one `mosjob burn` run on the host (no cap). The CPU
    time is the work on one full core even when other processes compete."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    subprocess.run([MOSJOB, "burn", "--work", str(units)], stdout=subprocess.DEVNULL, check=True)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def makespan_case(name, k, units, balanced, timeout, res_case):
    bal = None
    if balanced:
        blog = open(RUN / "balancer.log", "w")
        bal = subprocess.Popen([MOSBAL, "serve", "--interval", "1", "--min-residence", "1"],
                               stdout=blog, stderr=subprocess.STDOUT, env=ENV)
        track(bal.pid)
        time.sleep(1.5)
        if bal.poll() is not None:
            raise RuntimeError(f"mos-balance serve exited: {(RUN / 'balancer.log').read_text()[-500:]}")
    try:
        busy0, cl0 = cpu_ticks(), cluster_cpu_s(4)
        t_start_wall = time.time()
        t_start = time.monotonic()
        jobs = [mosrun("node1", [MOSJOB, "burn", "--work", str(units)]) for _ in range(k)]
        stdout_paths = {j: show(j)["stdout_path"] for j in jobs}
        timeline = []
        while True:
            js = {j["id"]: j for j in jobs_all() if j["id"] in stdout_paths}
            t = time.monotonic() - t_start
            per_node = {}
            for j in js.values():
                if j["state"] not in ("exited", "failed"):
                    per_node[j["node"]] = per_node.get(j["node"], 0) + 1
            timeline.append({"t": round(t, 2), "running_per_node": per_node})
            states = [j["state"] for j in js.values()]
            if len(js) == k and all(s in ("exited", "failed") for s in states):
                break
            if t > timeout:
                raise RuntimeError(f"{name}: jobs not done after {timeout:.0f} s: {states}")
            time.sleep(1.0)
        # Each job's last write ("done N") is its end; its stdout mtime is exact.
        ends = [os.stat(p).st_mtime for p in stdout_paths.values()]
        makespan = max(ends) - t_start_wall
        elapsed = time.monotonic() - t_start
        busy, cl = cpu_ticks() - busy0, cluster_cpu_s(4) - cl0
        res_case["cpu"] = {
            "window_s": elapsed,
            "cluster_cores": cl / elapsed,         # jobs + agents in the node cgroups
            "machine_busy_cores": busy / elapsed,
            "outside_cluster_cores": max(0.0, busy - cl) / elapsed,  # balancer, CLI polling, other sessions
        }
        final = {j["id"]: j for j in jobs_all() if j["id"] in stdout_paths}
        spread_at = next((p["t"] for p in timeline
                          if sum(p["running_per_node"].values()) == k
                          and len(p["running_per_node"]) == 4
                          and max(p["running_per_node"].values()) - min(p["running_per_node"].values()) <= 1), None)
        res_case.update({
            "makespan_s": makespan,
            "spread_evenly_after_s": spread_at,
            "job_end_s": sorted(e - t_start_wall for e in ends),
            "migrations": sum(j["migrations"] for j in final.values()),
            "failed": sum(1 for j in final.values() if j["state"] == "failed" or j.get("exit_code") not in (0, None)),
            "timeline": timeline,
        })
        log(f"balance: {name}: makespan {makespan:.1f} s, {res_case['migrations']} migrations; "
            f"cluster got {res_case['cpu']['cluster_cores']:.2f} cores on average, "
            f"{res_case['cpu']['outside_cluster_cores']:.2f} cores busy outside it")
    finally:
        if bal:
            kill_wait(bal.pid)
            text = ANSI_RE.sub("", (RUN / "balancer.log").read_text())
            res_case["balancer_log_moves"] = text.count("frozen")
            # Frozen time of each move the balancer made (burn jobs have a tiny RSS).
            res_case["balancer_frozen_ms"] = [int(x) for x in re.findall(r": frozen (\d+) ms", text)]


def phase_balance(res, args):
    k, n, cap = args.jobs, 4, 0.5
    b = {"k": k, "nodes": n, "caps": [cap] * n, "others_running": others_running(), "loadavg_start": loadavg()}
    res["balance"] = b
    log("balance: calibrating `mosjob burn` on an uncapped core")
    probe_units = 1000
    _, t_probe = run_burn(probe_units)
    while t_probe < 1.0:
        probe_units *= 4 if t_probe < 0.25 else 2
        _, t_probe = run_burn(probe_units)
    units = max(100, round(args.single_secs * probe_units / t_probe))
    wall_single, t_single = run_burn(units)
    b.update({"units": units, "probe_units": probe_units, "probe_cpu_s": t_probe,
              "t_single_s": t_single, "t_single_wall_s": wall_single})
    total_cores = cap * n
    ideal = k * t_single / total_cores
    b["ideal_s"] = ideal
    log(f"balance: {units} units = {t_single:.1f} CPU-s on one core (wall {wall_single:.1f} s); "
        f"ideal makespan {ideal:.1f} s")
    cluster_up(n, [cap] * n)
    try:
        b["balanced"] = {}
        makespan_case("with balancer", k, units, True, ideal * 5 + 60, b["balanced"])
        b["no_balance"] = {}
        no_bal_expect = k * t_single / cap
        makespan_case("no balancing", k, units, False, no_bal_expect * 2 + 60, b["no_balance"])
    finally:
        b["loadavg_end"] = loadavg()
        cluster_down()
    b["ratio_to_ideal"] = b["balanced"]["makespan_s"] / ideal
    b["speedup"] = b["no_balance"]["makespan_s"] / b["balanced"]["makespan_s"]


# ---------------------------------------------------------------------------
# issue 17: without a shared path; out of a crowded node
# ---------------------------------------------------------------------------

def bare_tls(node, server=False):
    """CRIU's own encrypted migration (`--tls`, GnuTLS, each side the node's
    certificate from the cluster's PKI): what bare CRIU costs with the pages
    encrypted on the wire, as ours are."""
    pki = f"/run/mosix/{CLUSTER}/pki"
    # The page server checks the client's certificate against its own
    # --address (the listening one), which names the target, not the source.
    return ["--tls", "--tls-cacert", f"{pki}/ca.pem", "--tls-cert", f"{pki}/{node}.pem",
            "--tls-key", f"{pki}/{node}.key", *(["--tls-no-cn-verify"] if server else [])]


def noshared_size(mib, runs, next_port, plain=False):
    """Our `mosctl migrate` (the agents stream the images) against CRIU's
    page-server migration of an identical process, in plain text and with
    CRIU's `--tls`, interleaved; each run a round trip per side, both legs
    counted, who goes first rotating over the three. plain: the cluster's
    agents run with --plain-pages (the pages go between the two CRIUs on a
    plain TCP connection, as bare CRIU's do), and the sides are ours and
    plain bare CRIU only."""
    label = "ours with --plain-pages, bare CRIU page-server" if plain else \
        "ours, bare CRIU page-server, and bare with its --tls"
    log(f"noshared: {mib} MiB x {runs} runs ({label}; interleaved)")
    job = mosrun("node1", [MOSJOB, "mem", "--mib", str(mib)])
    bare = bare_t = None
    ours_out, ours_back, bares_out, bares_back, tls_out, tls_back = [], [], [], [], [], []
    try:
        wait_file_contains(show(job)["stdout_path"], "ready", 120)
        bare = BareJob(mib)
        bare_t = None if plain else BareJob(mib, tag="-tls")
        # One untimed round trip per side first (see warm_up).
        warm = {"ours": [migrate(job, "node2")["wall_ms"], migrate(job, "node1")["wall_ms"]],
                "bare": [bare.move_noshared("node2", next_port())["total_ms"],
                         bare.move_noshared("node1", next_port())["total_ms"]]}
        if bare_t:
            warm["bare_tls"] = [bare_t.move_noshared("node2", next_port(), tls=True)["total_ms"],
                                bare_t.move_noshared("node1", next_port(), tls=True)["total_ms"]]
        log(f"  warm-up (untimed): " + ", ".join(f"{k} {v[0]:.0f}/{v[1]:.0f} ms" for k, v in warm.items()))
        for i in range(runs):
            def do_ours():
                ours_out.append(migrate(job, "node2"))
                ours_out[-1].update(last_move_numbers(job))
                ours_back.append(migrate(job, "node1"))
                ours_back[-1].update(last_move_numbers(job))

            def do_bare():
                bares_out.append(bare.move_noshared("node2", next_port()))
                bares_back.append(bare.move_noshared("node1", next_port()))

            def do_tls():
                tls_out.append(bare_t.move_noshared("node2", next_port(), tls=True))
                tls_back.append(bare_t.move_noshared("node1", next_port(), tls=True))

            # Who goes first rotates, so that no side always follows another.
            sides = (do_ours, do_bare) if plain else (do_ours, do_bare, do_tls)
            n = len(sides)
            for f in sides[i % n:] + sides[:i % n]:
                f()
            o, ob, b, bb = ours_out[-1], ours_back[-1], bares_out[-1], bares_back[-1]
            tls_note = ""
            if not plain:
                t, tb = tls_out[-1], tls_back[-1]
                tls_note = (f"; bare --tls {t['total_ms']:.0f} + {tb['total_ms']:.0f} ms "
                            f"(dump {t['dump_ms']:.0f}, {tb['dump_ms']:.0f})")
            log(f"  run {i + 1}/{runs}: ours {o['wall_ms']:.0f} + {ob['wall_ms']:.0f} ms "
                f"(frozen {o['frozen_ms']} + {ob['frozen_ms']}); bare {b['total_ms']:.0f} + {bb['total_ms']:.0f} ms "
                f"(dump {b['dump_ms']:.0f}, copy {b['copy_ms']:.0f}, restore {b['restore_ms']:.0f}; "
                f"dump {bb['dump_ms']:.0f}, copy {bb['copy_ms']:.0f}, restore {bb['restore_ms']:.0f})" + tls_note)
        ok = show(job)["state"] == "running"
    finally:
        run([MOSCTL, "kill", job], check=False)
        for b in (bare, bare_t):
            if b:
                b.kill()
    ours, bares = ours_out + ours_back, bares_out + bares_back
    s = {
        "mib": mib, "runs": runs, "moves": len(ours), "job_ok_after": ok, "warmup_ms": warm,
        "ours_frozen_ms": stats([o["frozen_ms"] for o in ours]),
        "ours_total_ms": stats([o["total_ms"] for o in ours]),
        "ours_wall_ms": stats([o["wall_ms"] for o in ours]),
        "ours_criu_restore_ms": stats([o["restore_ms"] for o in ours]),
        # Where our time goes, from the agents' info lines (see last_move_numbers).
        "ours_steps_ms": {k: stats([o[k] for o in ours if o.get(k) is not None])
                          for k in ("agent_dump_ms", "agent_seal_ms", "agent_push_ms", "agent_restore_ms")
                          if any(o.get(k) is not None for o in ours)},
        "bare_listen_ms": stats([b["listen_ms"] for b in bares]),
        "bare_dump_ms": stats([b["dump_ms"] for b in bares]),
        "bare_copy_ms": stats([b["copy_ms"] for b in bares]),
        "bare_restore_ms": stats([b["restore_ms"] for b in bares]),
        "bare_total_ms": stats([b["total_ms"] for b in bares]),
        "plain_pages": plain,
        "first_side": [(("ours", "bare") if plain else ("ours", "bare", "bare_tls"))[i % (2 if plain else 3)]
                       for i in range(runs)],
        # Every move, in order (out, back, out, back, ...), to show every run.
        "ours_wall_each_ms": [round(x["wall_ms"]) for pair in zip(ours_out, ours_back) for x in pair],
        "bare_total_each_ms": [round(x["total_ms"]) for pair in zip(bares_out, bares_back) for x in pair],
        "ours_first": [i % (2 if plain else 3) == 0 for i in range(runs)],
        "ours_images": ours[0]["images"] if ours else None,
        "bare_image_bytes": bares[0]["image_bytes"] if bares else None,
        "bare_copied_bytes": bares[0]["copied_bytes"] if bares else None,
    }
    if tls_out:
        s.update({
            "bare_tls_dump_ms": stats([b["dump_ms"] for b in tls_out + tls_back]),
            "bare_tls_restore_ms": stats([b["restore_ms"] for b in tls_out + tls_back]),
            "bare_tls_total_ms": stats([b["total_ms"] for b in tls_out + tls_back]),
            "bare_tls_total_each_ms": [round(x["total_ms"]) for pair in zip(tls_out, tls_back) for x in pair],
        })
    s["ratio_total"] = s["ours_wall_ms"]["median"] / s["bare_total_ms"]["median"]
    tls_note = ""
    if tls_out:
        s["ratio_total_vs_tls"] = s["ours_wall_ms"]["median"] / s["bare_tls_total_ms"]["median"]
        tls_note = f"; vs bare --tls {s['bare_tls_total_ms']['median']:.0f} ms -> {s['ratio_total_vs_tls']:.2f}"
    log(f"  noshared {mib} MiB{' (--plain-pages)' if plain else ''}: ours total {s['ours_wall_ms']['median']:.0f} ms "
        f"vs bare {s['bare_total_ms']['median']:.0f} ms -> ratio {s['ratio_total']:.2f}" + tls_note)
    return s


def agent_log_tail(nodes, lines=25):
    """The last lines of each agent's log (for a failure's record)."""
    out = {}
    for i in range(1, nodes + 1):
        try:
            text = ANSI_RE.sub("", Path(f"/run/mosix/{CLUSTER}/node{i}.log").read_text(errors="replace"))
            out[f"node{i}"] = [line[:400] for line in text.splitlines()[-lines:]]
        except OSError:
            pass
    return out


def phase_noshared(res, args):
    """Issue 17: without a shared path, a full copy no slower than CRIU's own
    shared-storage-free migration (page server on the target)."""
    out = {"others_running": others_running(), "loadavg_start": loadavg()}
    res["noshared"] = out
    port = [27300]

    def next_port():
        # A fresh port per move: no wait on a socket of the previous one.
        port[0] = 27300 + (port[0] - 27300 + 1) % 500
        return port[0]
    # Twice: the agents as they come (pages relayed over mTLS), then with
    # --plain-pages (the pages on a plain TCP connection between the two
    # CRIUs, as bare CRIU's go: like for like).
    try:
        for key, plain in (("sizes", False), ("plain_sizes", True)):
            how = " with --plain-pages" if plain else ""
            log(f"noshared: 2-node local cluster without a shared path (--no-shared){how}")
            out[key] = []
            cluster_up(2, extra=["--no-shared"] + (["--plain-pages"] if plain else []))
            try:
                for mib, runs in args.noshared_sizes:
                    try:
                        out[key].append(noshared_size(mib, runs, next_port, plain=plain))
                    except Exception as e:  # noqa: BLE001
                        out[key].append({"mib": mib, "runs": runs, "error": str(e),
                                         "agent_log_tail": agent_log_tail(2)})
                        log(f"noshared {mib} MiB{how} failed: {e}")
            finally:
                cluster_down()
    finally:
        out["loadavg_end"] = loadavg()


# The agents' step traces (src/agent/migration.rs, at debug level, and two info
# lines), in the order a full-copy move with a shared path passes them.
# (side, how the line is recognised, name)
STEP_MARKS = [
    ("src", "step: migrate call received", "call"),
    ("src", "step: target answered", "answered"),  # the frozen clock starts here
    ("src", "step: registry updated, dumping", "dumping"),
    ("src", "step: criu dump returned", "dumped"),
    ("src", "dumped and sealed", "sealed"),
    ("src", "step: handed over, calling the target", "handed"),
    ("dst", "step: restore call received", "rcall"),
    ("dst", "step: images verified and claimed", "claimed"),
    ("dst", "step: criu restore returned", "restored_criu"),
    ("dst", "restored", "recorded"),
    ("src", "step: target restored", "back"),  # ... and stops here
]
# The spans between consecutive marks, as the report names them.
STEP_SPANS = [
    ("call", "answered", "ping the target (not frozen)"),
    ("answered", "dumping", "freeze prep: front ends, registry, priority"),
    ("dumping", "dumped", "CRIU dump (incl. waiting for the node's CRIU lock)"),
    ("dumped", "sealed", "seal: hash tail + HMAC manifest"),
    ("sealed", "handed", "hand-over record (+ owner CAS with etcd)"),
    ("handed", "rcall", "Restore RPC reaches the target"),
    ("rcall", "claimed", "target: verify manifest + claim images"),
    ("claimed", "restored_criu", "CRIU restore (incl. waiting for the CRIU lock)"),
    ("restored_criu", "recorded", "target: adopt, registry, events"),
    ("recorded", "back", "Restore reply reaches the source"),
]
LOG_LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z?\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+(.*)$")


def log_time(ts):
    """Unix seconds of a tracing timestamp (UTC, up to ns digits)."""
    import datetime
    base, _, frac = ts.partition(".")
    t = datetime.datetime.fromisoformat(base).replace(tzinfo=datetime.timezone.utc).timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def agent_events(nodes):
    """(unix s, node, level, text) of every agent log line that names a job."""
    ev = []
    for i in range(1, nodes + 1):
        node = f"node{i}"
        try:
            text = ANSI_RE.sub("", Path(f"/run/mosix/{CLUSTER}/{node}.log").read_text(errors="replace"))
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            m = LOG_LINE_RE.match(line)
            if m and "job=" in line:
                ev.append((log_time(m.group(1)), node, m.group(2), m.group(3)))
    ev.sort()
    return ev


def move_steps(events, job, after=0.0):
    """The marks of the first move of `job` after unix time `after`, from
    the agents' logs: {mark: unix s}, plus the numbers the two info lines
    carry (dump_ms, seal_us, verify_ms, restore_ms)."""
    jre = re.compile(rf"\bjob={re.escape(job)}(?![\w.-])")
    mine = [e for e in events if e[0] >= after and jre.search(e[3])]

    def hit(name, needle, text):
        if name == "recorded":
            return re.search(r"(^|: )restored job=", text) is not None
        return needle in text
    out, extra = {}, {}
    prev = after
    for _side, needle, name in STEP_MARKS:
        # Each mark: the first line after the previous mark found (a mark
        # the agent did not log is skipped).
        for t, _node, _lvl, text in mine:
            if t >= prev and hit(name, needle, text):
                out[name] = prev = t
                for key in ("dump_ms", "seal_us", "verify_ms", "restore_ms", "follow_tail_us"):
                    m = re.search(rf"\b{key}=(\d+)", text)
                    if m:
                        extra[key] = int(m.group(1))
                break
    spans = {}
    for a, b, label in STEP_SPANS:
        if a in out and b in out:
            spans[label] = round((out[b] - out[a]) * 1000, 2)
    if "answered" in out and "back" in out:
        spans["frozen by the traces (answered → target restored)"] = round((out["back"] - out["answered"]) * 1000, 2)
    return {"spans_ms": spans, "agent": extra, "marks_found": len(out)}


def criu_stats(job):
    """CRIU's own statistics of `job`'s moves (the agents keep stats-dump and
    stats-restore with MOSIX_KEEP_CRIU_LOGS): microseconds, per migration, in
    the order they were made."""
    shared = json.loads(Path(CLUSTER_FILE).read_text()).get("shared_root")
    if not shared:
        return []
    out = []

    def taken(d):
        # Migration ids are random: order the moves by when CRIU wrote them.
        try:
            return (d / "stats-dump").stat().st_mtime
        except OSError:
            return d.stat().st_mtime

    for d in sorted((Path(shared) / "images" / job).glob("*"), key=taken):
        rec = {}
        for name, fields in (("stats-dump", {1: "freezing_us", 2: "frozen_us", 3: "memdump_us", 4: "memwrite_us",
                                              5: "pages_scanned", 7: "pages_written"}),
                             ("stats-restore", {3: "forking_us", 4: "restore_us", 5: "pages_restored"})):
            try:
                rec.update(decode_stats(d / name, fields))
            except (OSError, ValueError, IndexError):
                pass
        if rec:
            out.append(rec)
    return out


def memwrite_ms(stats_dump):
    """CRIU's memory write (`memwrite_time` of a `stats-dump` file) in ms, or
    None if the file is missing or unreadable."""
    try:
        us = decode_stats(stats_dump, {4: "memwrite_us"}).get("memwrite_us")
    except (OSError, ValueError, IndexError):
        return None
    return None if us is None else round(us / 1000, 1)


def memwrites_ms(job):
    """CRIU's memory write of each of `job`'s moves, in ms, in order."""
    return [round(x["memwrite_us"] / 1000, 1) for x in criu_stats(job) if "memwrite_us" in x]


def decode_stats(path, fields):
    """CRIU's stats image: two magic u32s, then one u32-length-prefixed
    stats_entry { optional dump = 1; optional restore = 2 } whose message
    holds varint fields (stats.proto)."""
    b = Path(path).read_bytes()[8:]
    n = int.from_bytes(b[:4], "little")
    msg = b[4:4 + n]

    def varint(buf, i):
        v, shift = 0, 0
        while True:
            c = buf[i]
            i += 1
            v |= (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                return v, i

    def fields_of(buf):
        i, out = 0, {}
        while i < len(buf):
            key, i = varint(buf, i)
            f, wt = key >> 3, key & 7
            if wt == 0:
                v, i = varint(buf, i)
                out[f] = v
            elif wt == 2:
                ln, i = varint(buf, i)
                out[f] = buf[i:i + ln]
                i += ln
            else:
                raise ValueError(f"unexpected wire type {wt}")
        return out
    outer = fields_of(msg)
    inner = fields_of(outer.get(1) or outer.get(2) or b"")
    return {name: inner[f] for f, name in fields.items() if f in inner}


CROWDED_WORK = 10 ** 12  # `mosjob burn --work`: far more than any phase lasts
BAL_MOVE_RE = re.compile(r"\] (\S+) (\S+) -> (\S+): frozen (\d+) ms")
BAL_FAIL_RE = re.compile(r"\] (\S+) (\S+) -> (\S+) failed: (.*)")


def pct(xs, p):
    """The p-th percentile (nearest rank) of xs."""
    xs = sorted(xs)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))
    return xs[int(k)]


def summarise_crowded(out):
    """p50/p95 of both kinds of move, their ratios, median per step."""
    c = [m["frozen_ms"] for m in out["crowded"]]
    b = [m["frozen_ms"] for m in out["idle"]]
    for key, xs in (("crowded_frozen_ms", c), ("idle_frozen_ms", b)):
        out[key] = dict(stats(xs) or {}, p50=pct(xs, 50), p95=pct(xs, 95)) if xs else None
    if c and b:
        out["ratio_p50"] = pct(c, 50) / max(pct(b, 50), 1e-9)
        out["ratio_p95"] = pct(c, 95) / max(pct(b, 95), 1e-9)
        log(f"crowded: frozen p50 {pct(c, 50)} ms vs idle {pct(b, 50)} ms ({out['ratio_p50']:.2f}x), "
            f"p95 {pct(c, 95)} vs {pct(b, 95)} ms ({out['ratio_p95']:.2f}x)")
    # Median per step, crowded vs idle.
    labels = [lab for _, _, lab in STEP_SPANS] + ["frozen by the traces (answered → target restored)"]
    ck = ["freezing_us", "frozen_us", "memdump_us", "memwrite_us", "forking_us", "restore_us"]
    out["steps_median_ms"] = {
        lab: {side: (statistics.median(v) if (v := [m["spans_ms"][lab] for m in out[side]
                                                    if lab in m.get("spans_ms", {})]) else None)
              for side in ("crowded", "idle")}
        for lab in labels}
    out["criu_median_ms"] = {
        k: {side: (statistics.median(v) / 1000 if (v := [m["criu"][k] for m in out[side]
                                                         if k in m.get("criu", {})]) else None)
            for side in ("crowded", "idle")}
        for k in ck}


def cfs_stat(node):
    """cpu.stat of a node's cgroup (nr_periods, nr_throttled, throttled_time ns)."""
    try:
        text = Path(f"/sys/fs/cgroup/cpu/mosix/{CLUSTER}/{node}/cpu.stat").read_text()
    except OSError:
        return None
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}


def phase_crowded(res, args):
    """Issue 17: out of a crowded node. node1 (0.5 core) runs 8 pinned
    CPU-bound jobs; a small CPU-bound job started there is moved off by the
    balancer, again and again; the same kind of job is moved between the
    idle nodes (node2 <-> node3) by `mosctl migrate` as the baseline (half
    before, half after, node1 crowded all along). The agents log at debug
    level, so every move's frozen time can be split into its steps."""
    n, cap = 3, 0.5
    out = {"nodes": n, "caps": [cap] * n, "hogs": args.crowded_hogs, "moves_asked": args.crowded_moves,
           "job": f"mosjob burn --work {CROWDED_WORK}", "others_running": others_running(),
           "loadavg_start": loadavg(), "crowded": [], "idle": [], "failures": []}
    res["crowded"] = out
    cluster_up(n, [cap] * n, agent_env={"RUST_LOG": "info,mosix::agent=debug", "MOSIX_KEEP_CRIU_LOGS": "1"})
    hogs = []
    bal = None
    blog_path = RUN / "crowded-balancer.log"
    small = [MOSJOB, "burn", "--work", str(CROWDED_WORK)]

    def idle_moves(count, first_src):
        for i in range(count):
            src = first_src if i % 2 == 0 else ("node3" if first_src == "node2" else "node2")
            dst = "node3" if src == "node2" else "node2"
            job = mosrun(src, small)
            try:
                time.sleep(args.crowded_residence)
                t = time.time()
                m = migrate(job, dst)
                out["idle"].append({"job": job, "from": src, "to": dst, "frozen_ms": m["frozen_ms"],
                                    "wall_ms": round(m["wall_ms"], 1), "t_unix": t})
                log(f"  idle {src} -> {dst}: frozen {m['frozen_ms']} ms")
            except Exception as e:  # noqa: BLE001
                out["failures"].append(f"idle move of {job}: {e}")
                log(f"  idle move failed: {e}")
            finally:
                run([MOSCTL, "kill", job], check=False)
                wait_images_gone(job)

    def crowded_moves(count):
        nonlocal bal
        blog = open(blog_path, "w")
        bal = subprocess.Popen([MOSBAL, "serve", "--interval", "1", "--min-residence", "1"],
                               stdout=blog, stderr=subprocess.STDOUT, env=ENV)
        track(bal.pid)
        time.sleep(1.5)
        if bal.poll() is not None:
            raise RuntimeError(f"mos-balance serve exited: {blog_path.read_text()[-500:]}")
        try:
            for _ in range(count):
                t = time.time()
                job = mosrun("node1", small)
                try:
                    end = time.monotonic() + args.crowded_timeout
                    got = None
                    while time.monotonic() < end and not got:
                        text = ANSI_RE.sub("", blog_path.read_text(errors="replace"))
                        for m in BAL_MOVE_RE.finditer(text):
                            if m.group(1) == job:
                                got = {"job": job, "from": m.group(2), "to": m.group(3),
                                       "frozen_ms": int(m.group(4)), "moved_after_s": round(time.time() - t, 2),
                                       "t_unix": t}
                        for m in BAL_FAIL_RE.finditer(text):
                            if m.group(1) == job:
                                out["failures"].append(f"balancer's move of {job}: {m.group(4)}")
                        time.sleep(0.1)
                    if got:
                        out["crowded"].append(got)
                        log(f"  crowded {got['from']} -> {got['to']}: frozen {got['frozen_ms']} ms "
                            f"(moved {got['moved_after_s']} s after its start)")
                    else:
                        out["failures"].append(f"{job} was not moved off node1 within {args.crowded_timeout} s")
                        log(f"  {job} was not moved within {args.crowded_timeout} s")
                finally:
                    run([MOSCTL, "kill", job], check=False)
                    wait_images_gone(job)
        finally:
            kill_wait(bal.pid)
            bal = None
            out["balancer_log_tail"] = ANSI_RE.sub("", blog_path.read_text(errors="replace"))[-3000:]

    try:
        log(f"crowded: {args.crowded_hogs} pinned burn jobs on node1 (cap {cap} core)")
        for _ in range(args.crowded_hogs):
            r = run([MOSRUN, "-d", "--net", "node", "--node", "node1", "--pinned", "--"] + small)  # as mosrun()
            hogs.append(r.stdout.strip().split()[0])
        time.sleep(4)  # the agents' load window (3 samples) fills
        half = args.crowded_moves // 2
        log(f"crowded: baseline, {half} moves between the idle nodes")
        idle_moves(half, "node2")
        log(f"crowded: {args.crowded_moves} balancer moves off node1")
        thr0 = cfs_stat("node1")
        t0 = time.monotonic()
        crowded_moves(args.crowded_moves)
        thr1 = cfs_stat("node1")
        if thr0 and thr1:
            # How often node1's cgroup ran out of its quota while the balancer moved jobs off it.
            out["node1_cfs_during_crowded_moves"] = {
                "window_s": round(time.monotonic() - t0, 2),
                "periods": thr1.get("nr_periods", 0) - thr0.get("nr_periods", 0),
                "throttled_periods": thr1.get("nr_throttled", 0) - thr0.get("nr_throttled", 0),
                "throttled_s": round((thr1.get("throttled_time", 0) - thr0.get("throttled_time", 0)) / 1e9, 3)}
        log(f"crowded: baseline, {args.crowded_moves - half} more moves between the idle nodes")
        idle_moves(args.crowded_moves - half, "node3")
        # Still crowded at the end? (every hog still running on node1)
        js = {j["id"]: j for j in jobs_all()}
        out["hogs_running_at_end"] = sum(1 for h in hogs if js.get(h, {}).get("state") == "running"
                                         and js.get(h, {}).get("node") == "node1")
    finally:
        if bal:
            kill_wait(bal.pid)
        try:
            events = agent_events(n)
            for rec in out["crowded"] + out["idle"]:
                rec.update(move_steps(events, rec["job"], rec["t_unix"] - 1))
                cs = criu_stats(rec["job"])
                if cs:
                    rec["criu"] = cs[-1]
        except Exception as e:  # noqa: BLE001
            out["failures"].append(f"reading the step traces: {type(e).__name__}: {e}")
        for h in hogs:
            run([MOSCTL, "kill", h], check=False)
        out["loadavg_end"] = loadavg()
        cluster_down()
        summarise_crowded(out)
    c, b = out["crowded"], out["idle"]
    if len(c) < args.crowded_moves or len(b) < args.crowded_moves:
        raise RuntimeError(f"crowded: {len(c)} of {args.crowded_moves} balancer moves and {len(b)} of "
                           f"{args.crowded_moves} idle moves measured: {'; '.join(out['failures'])[:1500]}")


def parse_sizes(s):
    out = []
    for part in filter(None, s.split(",")):
        mib, _, runs = part.partition("x")
        out.append((int(mib), int(runs or 3)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default=DEFAULT_PHASES)
    ap.add_argument("--out", default=str(OUT / "results.json"))
    ap.add_argument("--sizes", default="64x20,256x16,1024x12", type=parse_sizes,
                    help="MiBxRUNS,... for the migration phase")
    ap.add_argument("--unsealed-sizes", default="64x3,256x3,1024x3", type=parse_sizes,
                    help="MiBxRUNS,... for the sealing-off diagnostic ('' to skip)")
    ap.add_argument("--ckpt-sizes", default="64x15,1024x6", type=parse_sizes,
                    help="MiBxRUNS,... for the checkpoint phase")
    ap.add_argument("--noshared-sizes", default="64x8,1024x4", type=parse_sizes,
                    help="MiBxRUNS,... for the noshared phase (round trips)")
    ap.add_argument("--crowded-moves", type=int, default=12,
                    help="crowded phase: balancer moves off the crowded node (and as many between idle nodes)")
    ap.add_argument("--crowded-hogs", type=int, default=8, help="crowded phase: pinned CPU-bound jobs on node1")
    ap.add_argument("--crowded-residence", type=float, default=1.5,
                    help="crowded phase: seconds an idle-baseline job runs before it is moved")
    ap.add_argument("--crowded-timeout", type=float, default=60,
                    help="crowded phase: seconds to wait for the balancer to move a job")
    ap.add_argument("--idle-secs", type=float, default=30)
    ap.add_argument("--plan-runs", type=int, default=11)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale-agents", default="100,1000,10000",
                    type=lambda v: [int(x) for x in v.split(",") if x],
                    help="agent counts of the control-plane scale runs (push vs poll, mTLS)")
    ap.add_argument("--churn-pct", type=float, default=1.0,
                    help="%% of simulated nodes whose load moves each second")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--single-secs", type=float, default=10.0)
    args = ap.parse_args()

    if os.geteuid() != 0:
        sys.exit("bench: must run as root (local clusters need network namespaces, cgroups and CRIU)")
    become_subreaper()
    RUN.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    # Merge into an existing results file so a partial re-run keeps the rest.
    res = json.loads(out.read_text()) if out.exists() and args.phases != DEFAULT_PHASES else {}
    res.setdefault("meta", {})
    res["meta"].update({
        "started_unix": time.time(),
        "host": os.uname().nodename, "kernel": os.uname().release, "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "criu": CRIU, "criu_version": run([CRIU, "--version"], check=False).stdout.strip().replace("\n", " "),
        "bare_criu_options": CRIU_COMMON, "bare_criu_nice": CRIU_NICE,
        "others_running_at_start": others_running(), "loadavg_start": loadavg(),
    })
    durations = res.setdefault("durations_s", {})
    phases = {"plan": phase_plan, "round": phase_round, "scale": phase_scale, "migration": phase_migration,
              "balance": phase_balance, "checkpoint": phase_checkpoint, "noshared": phase_noshared,
              "crowded": phase_crowded}
    errors = res.setdefault("errors", {})
    try:
        for name in args.phases.split(","):
            t = time.monotonic()
            errors.pop(name, None)
            res.setdefault("background", {})[name] = background()
            log(f"{name}: machine busy before start: {res['background'][name]['busy_cores']} cores")
            try:
                phases[name](res, args)
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
                log(f"PHASE {name} FAILED: {e}")
            durations[name] = round(time.monotonic() - t, 1)
            OUT.mkdir(exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
    finally:
        cluster_down()
        shutil.rmtree(BARE_DIR, ignore_errors=True)
        reap()
    res["meta"]["finished_unix"] = time.time()
    out.write_text(json.dumps(res, indent=2))
    log(f"results written to {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
