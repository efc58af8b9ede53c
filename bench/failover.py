#!/usr/bin/env python3
"""make failover: issue 16's measurements (run by scripts/bench-failover.sh).

Phases (all by default; pick some with --phases a,b):
  deaths      a node dies (every process of it at once, agent included) with the default
              lease (TTL 10 s, margin 3 s): time to detection (the leading balancer logs the
              node LOST) and until its 256 MiB checkpointed job runs again elsewhere; the work
              lost (counter ticks rewound) against the checkpoint interval + checkpoint time.
              The node is brought back and the next round kills wherever the job runs now.
  faults      >= 200 injected faults on a 4-node cluster with 3 etcd members, two balancers
              and three checkpointed counter jobs, with short leases (TTL 3 s, margin 1 s) so
              that 200 faults fit in about 20 minutes. Kinds, in turn: an asymmetric partition
              of a node from etcd only (blackhole routes; it still reaches its peers and the
              shared path), SIGSTOP of an agent for longer than its lease then SIGCONT, a
              node's death, a kill of the etcd leader, and a kill of the leading balancer once
              it has found a node lost (in the middle of the restart). Duplicates are counted
              two ways: every 100 ms, how many live copies of each job's process exist on all
              nodes (more than one is a duplicate), and each job's counter file on the shared
              path, whose ticks must stay 1, 2, 3, ... (a repeat or a gap is a duplicate or a
              stale checkpoint that became latest).
  checkpoint  frozen time of one checkpoint of a 64 MiB and a 1 GiB job vs a migration of
              the same job (bench.py's phase, run here too so the failover results stand alone)

Writes bench-results/failover.json; bench/failover_report.py writes the text summary.
"""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MOSIX_BENCH_CLUSTER", "failover")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

CLUSTER = B.CLUSTER
RUNDIR = Path(f"/run/mosix/{CLUSTER}")
TICK_MS = 100
ANSI = re.compile(r"\x1b\[[0-9;]*m")
log = B.log


# ---------------------------------------------------------------------------
# cluster access
# ---------------------------------------------------------------------------

def cluster_file():
    return json.loads(Path(B.CLUSTER_FILE).read_text())


def shared():
    return Path(cluster_file()["shared_root"])


def rec(job):
    """The job's record, read from the registry on the shared path."""
    for _ in range(5):
        try:
            return json.loads((shared() / "registry" / "jobs" / f"{job}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.02)  # a rename in progress
    return {}


def etcdctl(*args, timeout=5):
    eps = ",".join(cluster_file()["etcd"])
    return subprocess.run(["etcdctl", "--endpoints", eps, "--command-timeout=2s", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, ETCDCTL_API="3"))


def live_nodes():
    r = etcdctl("get", "--prefix", "--keys-only", f"/mosix/{CLUSTER}/nodes/")
    if r.returncode != 0:
        return None
    pre = f"/mosix/{CLUSTER}/nodes/"
    return {l[len(pre):] for l in r.stdout.split() if l.startswith(pre)}


def netns(node):
    return f"mos-{CLUSTER}-{node}"


def ns_pids(ns):
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def argv(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def agent_pid(node):
    for p in ns_pids(netns(node)):
        a = argv(p)
        if a and os.path.basename(a[0]) == b"mosixd":
            return p
    return None


def copies(files, nodes):
    """Live processes running each counter (argv[0] mosjob, not its init),
    over every node: more than one for a file is a duplicate."""
    n = {f: 0 for f in files}
    for node in nodes:
        for p in ns_pids(netns(node)):
            a = argv(p)
            # (A stopped copy counts: it resumes.)
            if not a or os.path.basename(a[0]) != b"mosjob" or not B.alive(p):
                continue
            for f in files:
                if f.encode() in a:
                    n[f] += 1
    return n


def ticks(path):
    try:
        return [int(l[5:]) for l in Path(path).read_text().splitlines() if l.startswith("tick ")]
    except (FileNotFoundError, ValueError):
        return []


def broken(t):
    """Where the ticks stop being 1, 2, 3, ... (None if they never do)."""
    for i, v in enumerate(t):
        if v != i + 1:
            return {"at_line": i, "around": t[max(0, i - 3):i + 3]}
    return None


def kill_node(node):
    """Every process of the node at once, as a power loss: all stopped
    first, then all killed. Killed one by one, the agent could see its
    job's SIGKILL before its own and record the job exited."""
    pids = ns_pids(netns(node))
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
    return len(pids)


def wait(what, timeout, pred, every=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def revive(node):
    B.run([B.MOSCTL, "local", "restart-agent", node, "--name", CLUSTER], timeout=60)
    wait(f"{node}'s lease", 30, lambda: node in (live_nodes() or set()), every=0.2)


def start_balancer(port, logfile):
    f = open(logfile, "a")
    p = subprocess.Popen([B.MOSBAL, "serve", "--listen", f"127.0.0.1:{port}", "--no-auto"],
                         env=B.ENV, stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL)
    B.track(p.pid)
    time.sleep(0.5)
    if p.poll() is not None:
        raise RuntimeError(f"mos-balance serve on port {port} exited at once: "
                           + Path(logfile).read_text()[-500:])
    return p


def leading_balancer_pid():
    r = etcdctl("get", "--print-value-only", f"/mosix/{CLUSTER}/balancer/leader")
    m = re.search(r":(\d+):", r.stdout)
    return int(m.group(1)) if m else None


def log_has(path, offset, *needles):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = ANSI.sub("", f.read().decode(errors="replace"))
    except FileNotFoundError:
        return False
    return any(all(n in l for n in needles) for l in text.splitlines())


def size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def counter(node, file, every, extra=()):
    # `--net node`, as the kept figures were measured: kill_node() takes the
    # node's network namespace's processes, which a job with its own address
    # (the default since issue 18) is not among.
    return B.run([B.MOSRUN, "-d", "--net", "node", "--node", node, "--checkpoint-every", every, "--checkpoint-keep", "2",
                  "--", B.MOSJOB, "counter", "--port", "0", "--file", str(file),
                  "--tick-ms", str(TICK_MS), *extra]).stdout.strip().split()[0]


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"n": len(xs), "median": statistics.median(xs), "p99": pct(xs, 0.99), "max": max(xs),
            "min": min(xs), "values": [round(x, 3) for x in xs]}


# ---------------------------------------------------------------------------
# deaths: detection and restart with the defaults
# ---------------------------------------------------------------------------

def phase_deaths(res, args):
    log(f"deaths: 4-node cluster, 1 etcd member, default leases; {args.deaths} node deaths")
    B.cluster_up(4, extra=["--etcd-members", "1"])
    out = res["deaths"] = {"rounds": [], "interval_s": args.interval, "mib": args.mib}
    ballog = B.RUN / "failover-deaths-balancer.log"
    ballog.unlink(missing_ok=True)
    bal = start_balancer(args.port, ballog)
    file = shared() / "failover-deaths.txt"
    job = counter("node2", file, f"{int(args.interval * 1000)}ms", ["--mem-mib", str(args.mib)])
    try:
        wait("the job's first checkpoint", 120,
             lambda: (rec(job).get("checkpoint") or {}).get("last_seq", 0) >= 1, every=0.2)
        for r in range(args.deaths):
            victim = rec(job)["node"]
            seq0 = rec(job)["checkpoint"]["last_seq"]
            wait("a newer checkpoint", 60,
                 lambda: rec(job)["checkpoint"]["last_seq"] > seq0, every=0.1)
            # Die at a random point of the checkpoint interval.
            time.sleep(random.uniform(0, args.interval))
            ck = rec(job)["checkpoint"]
            before = ticks(file)[-1]
            off = size(ballog)
            t0 = time.monotonic()
            kill_node(victim)
            expired = detected = running = None
            low = before
            while time.monotonic() - t0 < 120:
                now = time.monotonic() - t0
                t = ticks(file)
                if t:
                    low = min(low, t[-1])
                if expired is None and victim not in (live_nodes() or {victim}):
                    expired = now
                if detected is None and log_has(ballog, off, "node LOST", f"node={victim}"):
                    detected = now
                x = rec(job)
                if x.get("state") == "running" and x.get("node") != victim:
                    running = now
                    break
                time.sleep(0.05)
            if running is None:
                raise RuntimeError(f"round {r + 1}: job not running again 120 s after {victim} died")
            # The first ticks after the restore show where it resumed.
            time.sleep(0.3)
            t = ticks(file)
            low = min(low, t[-1] if t else low)
            lost_s = (before - low) * TICK_MS / 1000
            row = {"victim": victim, "to": rec(job)["node"], "lease_expired_s": expired,
                   "detected_s": detected, "running_s": running, "work_lost_s": lost_s,
                   "checkpoint_frozen_ms": ck.get("last_frozen_ms"),
                   "bound_s": args.interval + (ck.get("last_frozen_ms") or 0) / 1000,
                   "ticks_ok": broken(t) is None}
            out["rounds"].append(row)
            log(f"  death {r + 1}: {victim} -> {row['to']}: lease expired {expired:.1f} s, "
                f"detected {detected:.1f} s, running again {running:.1f} s, work lost {lost_s:.1f} s")
            revive(victim)
    finally:
        B.run([B.MOSCTL, "kill", job], check=False)
        B.kill_wait(bal.pid)
        B.cluster_down()
    rs = out["rounds"]
    out["detected_s"] = summary([x["detected_s"] for x in rs])
    out["running_s"] = summary([x["running_s"] for x in rs])
    out["lease_expired_s"] = summary([x["lease_expired_s"] for x in rs])
    out["work_lost_s"] = summary([x["work_lost_s"] for x in rs])
    out["work_lost_within_bound"] = sum(x["work_lost_s"] <= x["bound_s"] + TICK_MS / 1000 for x in rs)
    out["ticks_ok"] = all(x["ticks_ok"] for x in rs)


# ---------------------------------------------------------------------------
# faults: 200 of five kinds, duplicates counted
# ---------------------------------------------------------------------------

KINDS = ["partition", "sigstop", "node-kill", "etcd-leader-kill", "balancer-kill"]


class Faults:
    def __init__(self, args):
        self.args = args
        self.nodes = [f"node{i}" for i in range(1, 5)]
        self.ttl, self.margin = args.fault_ttl, args.fault_margin
        self.logs = [B.RUN / f"failover-bal{i}.log" for i in (1, 2)]
        for l in self.logs:
            l.unlink(missing_ok=True)
        self.bals = {}
        self.max_copies = {}
        self.dup_samples = 0
        self.etcd_ips = [e.split("//")[1].split(":")[0] for e in cluster_file()["etcd"]]

    def start_bals(self):
        for i, l in enumerate(self.logs):
            p = self.bals.get(i)
            if p is None or p.poll() is not None:
                self.bals[i] = start_balancer(self.args.port + 1 + i, l)

    def sample(self):
        """One duplicate check: copies of each job's process right now."""
        n = copies(self.files, self.nodes)
        for f, c in n.items():
            self.max_copies[f] = max(self.max_copies.get(f, 0), c)
            if c > 1:
                self.dup_samples += 1
                log(f"  DUPLICATE: {c} copies of the job writing {f}")

    def hold(self, secs):
        end = time.monotonic() + secs
        while time.monotonic() < end:
            self.sample()
            time.sleep(0.1)

    def job_on(self, node):
        return [j for j in self.jobs if rec(j).get("node") == node]

    def victim(self):
        """A node that runs at least one job, picked at random."""
        busy = sorted({rec(j).get("node") for j in self.jobs if rec(j).get("state") == "running"})
        return random.choice(busy or self.nodes[1:])

    def partition(self, node, cut):
        for ip in self.etcd_ips:
            subprocess.run(["ip", "-n", netns(node), "route", "add" if cut else "del", "blackhole", f"{ip}/32"],
                           capture_output=True)

    def hold_time(self):
        # Shorter than the fencing deadline, past it, and past the expiry
        # plus the balancer's margin (so the job restarts elsewhere).
        return random.uniform(0.5 * self.ttl, self.ttl + 3 + 4)

    def inject(self, kind):
        detail = {"kind": kind}
        if kind == "partition":
            v = self.victim()
            t = self.hold_time()
            detail.update(node=v, held_s=round(t, 2))
            self.partition(v, True)
            try:
                self.hold(t)
            finally:
                self.partition(v, False)
        elif kind == "sigstop":
            v = self.victim()
            pid = agent_pid(v)
            t = self.hold_time()
            detail.update(node=v, held_s=round(t, 2))
            if pid:
                os.kill(pid, signal.SIGSTOP)
                try:
                    self.hold(t)
                finally:
                    os.kill(pid, signal.SIGCONT)
        elif kind == "node-kill":
            v = self.victim()
            detail.update(node=v)
            kill_node(v)
            try:
                wait("its jobs elsewhere", 40, lambda: (self.sample(), not any(
                    rec(j).get("node") == v and rec(j).get("state") == "running" for j in self.jobs))[1], every=0.1)
            except RuntimeError as e:
                detail["error"] = str(e)
            revive(v)
        elif kind == "etcd-leader-kill":
            r = etcdctl("endpoint", "status", "--cluster", "-w", "json")
            try:
                st = json.loads(r.stdout)
                leader = next(s for s in st if s["Status"]["header"]["member_id"] == s["Status"]["leader"])
                ip = leader["Endpoint"].split("//")[1].split(":")[0]
                i = self.etcd_ips.index(ip) + 1
            except (ValueError, StopIteration, KeyError, json.JSONDecodeError) as e:
                detail["error"] = f"no etcd leader found: {e}: {r.stderr.strip()}"
                return detail
            ns = f"mos-{CLUSTER}-etcd{i}"
            pid = next((p for p in ns_pids(ns) if argv(p) and argv(p)[0].endswith(b"etcd")), None)
            detail.update(member=i)
            if pid:
                cmd = [a.decode() for a in argv(pid) if a]
                os.kill(pid, signal.SIGKILL)
                self.hold(random.uniform(0.5, 3))
                with open(RUNDIR / f"etcd{i}.log", "a") as lf:
                    subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=lf, stderr=lf,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        elif kind == "balancer-kill":
            v = self.victim()
            detail.update(node=v)
            offs = [size(l) for l in self.logs]
            self.partition(v, True)
            try:
                # Whichever balancer leads when the node is found (an etcd
                # leader change may have moved the leadership meanwhile).
                wait("a leader to find the node lost", 30, lambda: (self.sample(), any(
                    log_has(l, o, "node LOST", f"node={v}") for l, o in zip(self.logs, offs)))[1], every=0.1)
                # Somewhere in the margin or the restore itself.
                self.hold(random.uniform(0, self.margin + 3))
                lead = leading_balancer_pid()
                which = next((i for i, p in self.bals.items() if p.pid == lead), None)
                if which is not None:
                    B.kill_wait(self.bals[which].pid, signal.SIGKILL)
                    detail["killed_balancer"] = which + 1
                else:
                    detail["error"] = "no leading balancer found"
                wait("its jobs elsewhere", 40, lambda: (self.sample(), not any(
                    rec(j).get("node") == v and rec(j).get("state") == "running" for j in self.jobs))[1], every=0.1)
            except RuntimeError as e:
                detail["error"] = str(e)
            finally:
                self.partition(v, False)
            self.start_bals()
        return detail

    def settle(self):
        """Every job running and ticking, every node live again."""
        t0 = time.monotonic()
        for n in self.nodes:
            if agent_pid(n) is None:
                revive(n)
        lens = {f: len(ticks(f)) for f in self.files}

        def ok():
            self.sample()
            live = live_nodes() or set()
            return (all(n in live for n in self.nodes)
                    and all(rec(j).get("state") == "running" for j in self.jobs)
                    and all(len(ticks(f)) >= lens[f] + 3 for f in self.files))
        wait("the cluster to settle", self.args.settle_timeout, ok, every=0.1)
        return time.monotonic() - t0


def phase_faults(res, args):
    log(f"faults: 4 nodes, 3 etcd members, lease TTL {args.fault_ttl} s margin {args.fault_margin} s; "
        f"{args.faults} faults")
    B.cluster_up(4, extra=["--etcd-members", "3", "--lease-ttl", str(args.fault_ttl),
                           "--fence-margin", str(args.fault_margin)])
    f = Faults(args)
    f.start_bals()
    out = res["faults"] = {"ttl_s": args.fault_ttl, "margin_s": args.fault_margin, "injected": [],
                           "by_kind": {}}
    sh = shared()
    f.files = [str(sh / f"failover-fault-{i}.txt") for i in (2, 3, 4)]
    f.jobs = [counter(f"node{i}", sh / f"failover-fault-{i}.txt", "1s") for i in (2, 3, 4)]
    lost = []
    try:
        wait("checkpoints of every job", 60, lambda: all(
            (rec(j).get("checkpoint") or {}).get("last_seq", 0) >= 1 for j in f.jobs), every=0.2)
        for i in range(args.faults):
            kind = KINDS[i % len(KINDS)]
            t = time.monotonic()
            d = f.inject(kind)
            try:
                d["settled_s"] = round(f.settle(), 2)
            except RuntimeError as e:
                d["error"] = (d.get("error", "") + f"; {e}").strip("; ")
                # A job recorded lost or failed is replaced so the run goes on.
                for k, j in enumerate(f.jobs):
                    r = rec(j)
                    if r.get("state") in ("failed", "exited"):
                        lost.append({"job": j, "state": r.get("state"), "error": r.get("error"),
                                     "after_fault": i + 1})
                        log(f"  job {j} {r.get('state')}: {r.get('error')}; replaced by a new one")
                        new = sh / f"failover-fault-r{i}-{k}.txt"
                        f.files[k] = str(new)
                        f.jobs[k] = counter(random.choice(f.nodes), new, "1s")
                        wait("the new job's first checkpoint", 60, lambda: (
                            rec(f.jobs[k]).get("checkpoint") or {}).get("last_seq", 0) >= 1, every=0.2)
                for n in f.nodes:
                    if n not in (live_nodes() or set()):
                        try:
                            revive(n)
                        except RuntimeError:
                            pass
            d["took_s"] = round(time.monotonic() - t, 2)
            bad = {fl: broken(ticks(fl)) for fl in f.files}
            d["ticks_broken"] = {k: v for k, v in bad.items() if v}
            out["injected"].append(d)
            k = out["by_kind"].setdefault(kind, {"n": 0, "errors": 0})
            k["n"] += 1
            k["errors"] += "error" in d
            log(f"  fault {i + 1}/{args.faults} {kind} {d.get('node', d.get('member', ''))}: "
                f"settled in {d.get('settled_s', '-')} s"
                + (f"  ERROR {d['error']}" if "error" in d else "")
                + (f"  TICKS BROKEN {d['ticks_broken']}" if d["ticks_broken"] else ""))
            res["faults_partial"] = True
    finally:
        for p in f.bals.values():
            B.kill_wait(p.pid, signal.SIGKILL)
        refused = 0
        for n in f.nodes:
            try:
                refused += len(re.findall(r"refused: this node is fenced|not publishing the checkpoint|stale balancer leader",
                                          ANSI.sub("", (RUNDIR / f"{n}.log").read_text())))
            except FileNotFoundError:
                pass
        for j in f.jobs:
            B.run([B.MOSCTL, "kill", j], check=False)
        B.cluster_down()
    res.pop("faults_partial", None)
    out["count"] = len(out["injected"])
    out["duplicate_samples"] = f.dup_samples
    out["max_copies"] = f.max_copies
    out["ticks_broken"] = sum(bool(d["ticks_broken"]) for d in out["injected"])
    out["jobs_lost"] = lost
    out["refused_writes_logged"] = refused
    out["errors"] = sum("error" in d for d in out["injected"])
    out["settled_s"] = summary([d.get("settled_s") for d in out["injected"]])


def phase_checkpoint(res, args):
    B.phase_checkpoint(res, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="deaths,faults,checkpoint")
    ap.add_argument("--out", default=str(B.OUT / "failover.json"))
    ap.add_argument("--deaths", type=int, default=10, help="node deaths with the default lease")
    ap.add_argument("--mib", type=int, default=256, help="memory of the job that dies")
    ap.add_argument("--interval", type=float, default=5.0, help="its checkpoint interval, s")
    ap.add_argument("--faults", type=int, default=200)
    ap.add_argument("--fault-ttl", type=float, default=3.0)
    ap.add_argument("--fault-margin", type=float, default=1.0)
    ap.add_argument("--settle-timeout", type=float, default=60.0)
    ap.add_argument("--port", type=int, default=29300)
    ap.add_argument("--ckpt-sizes", default="64x15,1024x3", type=B.parse_sizes)
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("failover: must run as root (local clusters need network namespaces, cgroups and CRIU)")
    random.seed(args.seed)
    B.become_subreaper()
    B.RUN.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res["meta"] = {"started_unix": time.time(), "host": os.uname().nodename, "kernel": os.uname().release,
                   "cpus": os.cpu_count(), "loadavg_start": B.loadavg(), "seed": args.seed,
                   "others_running_at_start": B.others_running()}
    errors = res["errors"] = {}
    phases = {"deaths": phase_deaths, "faults": phase_faults, "checkpoint": phase_checkpoint}
    try:
        for name in args.phases.split(","):
            t = time.monotonic()
            res.setdefault("background", {})[name] = B.background()
            try:
                phases[name](res, args)
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
                log(f"PHASE {name} FAILED: {e}")
            res.setdefault("durations_s", {})[name] = round(time.monotonic() - t, 1)
            out.write_text(json.dumps(res, indent=2))
    finally:
        B.cluster_down()
        B.reap()
    res["meta"]["finished_unix"] = time.time()
    out.write_text(json.dumps(res, indent=2))
    log(f"results written to {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
