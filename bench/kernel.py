#!/usr/bin/env python3
"""The article's experiment, measured: a tinyconfig Linux kernel built on a capped
4-node local cluster (run by scripts/bench-kernel.sh, i.e. `make bench-kernel`,
and by `make bench`).

Phases (all by default; pick some with --phases a,b,...):
  starts   per-start overhead of `mosrun --best -- true`, alone (sequential) and 16
           at once, from mosrun's own MOSIX_RUN_STATS lines (start_ms, place_ms);
           the CPU the mosrun clients use per start (rusage of the children)
  burst    a 16-way burst of `mosrun --best -- sleep S`: jobs per node against the
           node's slots, and the skew over the burst's first second
  kernel   (a) plain `make -jN` on node1 alone, inside node1's cgroup (its cap);
           (b) `mosmake` from node1 over the 4 nodes. ideal = max(critical path,
           total CPU-s of (a) / total capacity)

Results: bench-results/kernel.json (bench/report.py folds them into BENCHMARKS.md).
Each variant of the kernel build runs once per bench run (minutes each); every run
is kept in the results file's "history" so a reader sees all of them.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
MOSCTL, MOSRUN, MOSMAKE = (str(REL / b) for b in ("mosctl", "mosrun", "mosmake"))
NAME = "kbench"
CLUSTER_FILE = f"/run/mosix/{NAME}/cluster.json"
SHARED = ROOT / "criu-images" / NAME
OUT = ROOT / "bench-results"
RESULTS = OUT / "kernel.json"
KERNEL_TARBALL = ROOT / ".cache" / "linux-source" / "linux-source-6.1.tar.xz"
# Where the tree is kept between runs (scripts/kernel-lib.sh, kernel_stash): deleting
# 1.2 GB of small files with the cluster's shared path takes minutes on a busy disk.
STASH = ROOT / ".cache" / "linux-source" / "tree" / "linux-source-6.1"
ENV = dict(os.environ, MOSIX_CLUSTER=CLUSTER_FILE)
ENV.pop("MAKEFLAGS", None)
ENV.pop("MFLAGS", None)
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def run(cmd, check=True, timeout=600, env=None, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def pct(xs, p):
    """Nearest-rank percentile, as mosmake's summary computes it."""
    if not xs:
        return None
    v = sorted(xs)
    k = max(1, min(len(v), int(-(-p * len(v) // 100))))
    return v[k - 1]


def in_node(node):
    """preexec_fn: move the child into the node's cgroups (its CPU cap governs it);
    the command itself is wrapped in nsenter for the node's network namespace."""
    def f():
        for c in ("cpu", "cpuacct"):
            with open(f"/sys/fs/cgroup/{c}/mosix/{NAME}/{node}/cgroup.procs", "w") as fh:
                fh.write(str(os.getpid()))
    return f


def node_argv(node, argv):
    return ["nsenter", f"--net=/run/netns/mos-{NAME}-{node}", *argv]


def node_cpu_s():
    """CPU seconds used so far in each node's cgroup (jobs, agents, and whatever
    in_node put there)."""
    out = {}
    base = f"/sys/fs/cgroup/cpuacct/mosix/{NAME}"
    for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            out[d] = int(open(f"{base}/{d}/cpuacct.usage").read()) / 1e9
        except (OSError, ValueError):
            pass
    return out


def agents_cpu_s():
    """CPU seconds used so far by each node's mosixd (utime + stime), to tell
    the agents' cost from the jobs' within a node's cgroup."""
    out = {}
    base = f"/sys/fs/cgroup/cpu/mosix/{NAME}"
    hz = os.sysconf("SC_CLK_TCK")
    for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            pids = open(f"{base}/{d}/cgroup.procs").read().split()
        except OSError:
            continue
        for p in pids:
            try:
                if open(f"/proc/{p}/comm").read().strip() != "mosixd":
                    continue
                f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
                out[d] = out.get(d, 0.0) + (int(f[11]) + int(f[12])) / hz
            except (OSError, ValueError, IndexError):
                pass
    return out


def machine_busy_s():
    """CPU seconds the whole machine has been busy (from /proc/stat)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cluster_up(caps, slots_per_core=None):
    run([MOSCTL, "local", "down", "--name", NAME], check=False, timeout=120)
    extra = ["--slots-per-core", str(slots_per_core)] if slots_per_core else []
    run([MOSCTL, "local", "up", "--name", NAME, "--nodes", str(len(caps)),
         "--cpu-caps", ",".join(str(c) for c in caps), "--shared", str(SHARED), *extra], timeout=180)
    # The caps are what the nodes may use; this makes sure they can. Other work
    # on this shared machine (builds, other local clusters, whose groups have
    # the default 1024 shares) otherwise takes its share of the 2 cores while a
    # node waits below its cap. Weight only, no cap: with nothing else running
    # it changes nothing.
    # Both levels: mosix/ competes with the machine's other tasks, mosix/kbench
    # with other clusters.
    for g in ("mosix", f"mosix/{NAME}"):
        try:
            with open(f"/sys/fs/cgroup/cpu/{g}/cpu.shares", "w") as fh:
                fh.write("262144")
        except OSError as e:
            log(f"could not raise the cpu.shares of {g}: {e}")


def slots():
    j = json.loads(run([MOSCTL, "slots", "--json"]).stdout)
    return int(j["total"]), {n["node"]: int(n.get("slots", 0)) for n in j["nodes"] if n.get("up", True)}


def parse_stats(text):
    out = []
    for line in text.splitlines():
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        try:
            out.append({"node": kv["node"], "job": kv.get("job", ""), "place_ms": float(kv["place_ms"]),
                        "start_ms": float(kv["start_ms"]), "total_ms": float(kv["total_ms"]),
                        "exit": int(kv["exit"]), "reruns": int(kv.get("reruns", 0)),
                        "cpu_ms": float(kv["cpu_ms"]) if "cpu_ms" in kv else None})
        except (KeyError, ValueError):
            pass
    return out


def mosruns(n_parallel, argv, stats_file):
    """Start n mosrun --best in the same instant from node1; wait for all."""
    env = dict(ENV, MOSIX_RUN_STATS=str(stats_file))
    procs = [subprocess.Popen(node_argv("node1", [MOSRUN, "--best", "--", *argv]), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(n_parallel)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    bad = [(p.returncode, e.strip()[-300:]) for p, e in zip(procs, errs) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"mosrun failed: {bad[:3]}")


def phase_starts(res, args):
    sf = OUT / "run" / "starts.stats"
    sf.parent.mkdir(parents=True, exist_ok=True)
    sf.write_text("")
    mosruns(1, ["true"], sf)  # warm: first connection, page cache
    sf.write_text("")
    c0, w0 = children_cpu(), time.monotonic()
    for _ in range(args.alone):
        mosruns(1, ["true"], sf)
    cpu = children_cpu() - c0
    wall_ms = (time.monotonic() - w0) * 1000 / args.alone
    alone = parse_stats(sf.read_text())
    sf.write_text("")
    for _ in range(args.bursts):
        mosruns(16, ["true"], sf)
        time.sleep(0.5)
    burst = parse_stats(sf.read_text())
    res["starts"] = {
        "alone": {"n": len(alone), "start_ms": [r["start_ms"] for r in alone],
                  "place_ms": [r["place_ms"] for r in alone],
                  "p50": pct([r["start_ms"] for r in alone], 50), "p99": pct([r["start_ms"] for r in alone], 99),
                  "place_p99": pct([r["place_ms"] for r in alone], 99),
                  "client_wall_ms": wall_ms,
                  "client_cpu_ms_per_start": cpu * 1000 / args.alone},
        "sixteen": {"n": len(burst), "p50": pct([r["start_ms"] for r in burst], 50),
                    "p99": pct([r["start_ms"] for r in burst], 99),
                    "place_p99": pct([r["place_ms"] for r in burst], 99)},
    }
    log(f"starts: alone p50 {res['starts']['alone']['p50']} ms p99 {res['starts']['alone']['p99']} ms, "
        f"16 at once p50 {res['starts']['sixteen']['p50']} p99 {res['starts']['sixteen']['p99']}, "
        f"client CPU {res['starts']['alone']['client_cpu_ms_per_start']:.1f} ms/start")


def phase_burst(res, args, caps):
    total, per = slots()
    sf = OUT / "run" / "burst.stats"
    sf.write_text("")
    secs = args.burst_secs
    mosruns(16, ["sleep", str(secs)], sf)
    rs = parse_stats(sf.read_text())
    nodes = [f"node{i + 1}" for i in range(len(caps))]
    cap = dict(zip(nodes, caps))
    # Each job ran from start_ms to total_ms after its mosrun started, and all 16
    # mosruns started together: the running jobs per node over time follow.
    def running(node, t_ms):
        return sum(1 for r in rs if r["node"] == node and r["start_ms"] <= t_ms < r["total_ms"])
    grid = [t * 10.0 for t in range(0, int(secs * 100) + 200)]
    peak = {n: max(running(n, t) for t in grid) for n in nodes}
    first = [t for t in grid if t <= 1000.0]
    # Time-averaged running jobs per unit of capacity over the first second.
    per_cap = {n: statistics.mean(running(n, t) for t in first) / cap[n] for n in nodes}
    mean = statistics.mean(per_cap.values())
    skew = max(per_cap.values()) / mean if mean > 0 else None
    res["burst"] = {"slots_total": total, "slots": per, "jobs_per_node": {n: sum(r["node"] == n for r in rs) for n in nodes},
                    "peak_running": peak, "over_slots": [n for n in nodes if peak[n] > per.get(n, 0)],
                    "per_capacity_first_s": per_cap, "skew": skew, "runs": len(rs)}
    log(f"burst: slots {per}, peak running {peak}, skew {skew}")


def build_variant(label, argv, src, stats_file=None):
    """One timed build from node1 (in its cgroup). Returns wall, CPU of the
    children (make and everything local), and mosmake's report lines."""
    run(node_argv("node1", ["make", "-C", str(src), "-s", "mrproper"]), preexec_fn=in_node("node1"), timeout=900)
    run(node_argv("node1", ["make", "-C", str(src), "-s", "tinyconfig"]), preexec_fn=in_node("node1"), timeout=900)
    env = dict(ENV)
    times = []
    stop = threading.Event()
    if stats_file:
        stats_file.write_text("")
        env["MOSMAKE_STATS"] = str(stats_file)

        def watch():
            # Timestamp each stats line as it appears: a job ended then, and
            # started total_ms earlier. That gives the build's concurrency profile.
            seen = 0
            while not stop.is_set():
                lines = stats_file.read_text().splitlines()
                now = time.monotonic()
                for l in lines[seen:]:
                    times.append((now, l))
                seen = len(lines)
                time.sleep(0.05)
        th = threading.Thread(target=watch, daemon=True)
    log(f"kernel ({label}): {' '.join(argv)}")
    logf = OUT / "run" / f"kernel-{label}.log"
    profile = OUT / "run" / f"kernel-{label}.cores.tsv"

    def sample_cores():
        # Cores each node's cgroup got, per second: where the build waited.
        prev, tp = node_cpu_s(), time.monotonic()
        with open(profile, "w") as fh:
            fh.write("t_s\t" + "\t".join(sorted(prev)) + "\n")
            while not stop.wait(1.0):
                cur, tc = node_cpu_s(), time.monotonic()
                fh.write(f"{tc - t0:.0f}\t" + "\t".join(
                    f"{(cur[n] - prev.get(n, 0.0)) / (tc - tp):.2f}" for n in sorted(cur)) + "\n")
                fh.flush()
                prev, tp = cur, tc
    sampler = threading.Thread(target=sample_cores, daemon=True)
    c0 = children_cpu()
    n0, m0, g0 = node_cpu_s(), machine_busy_s(), agents_cpu_s()
    t0 = time.monotonic()
    sampler.start()
    if stats_file:
        th.start()
    with open(logf, "w") as fh:
        p = subprocess.run(node_argv("node1", argv), env=env, stdout=fh, stderr=subprocess.STDOUT,
                           preexec_fn=in_node("node1"), timeout=3600)
    wall = time.monotonic() - t0
    cpu = children_cpu() - c0
    n1, m1, g1 = node_cpu_s(), machine_busy_s(), agents_cpu_s()
    stop.set()
    # What the nodes actually got: on this shared 2-core machine other work
    # (other sessions' builds) competes with the capped nodes, and a node only
    # gets its cap if the machine has it to give.
    used = {n: n1[n] - n0.get(n, 0.0) for n in n1}
    ours = sum(used.values())
    contention = {"node_cores": {n: u / wall for n, u in used.items()},
                  "cluster_cores": ours / wall,
                  "other_cores": max(0.0, (m1 - m0) - ours) / wall,
                  # Within the nodes' CPU: what the agents themselves used.
                  "agents_cpu_s": {n: g1[n] - g0.get(n, 0.0) for n in g1},
                  "node_cpu_s": used,
                  "loadavg_end": open("/proc/loadavg").read().split()[:3]}
    text = logf.read_text(errors="replace")
    if p.returncode != 0 or not (src / "arch/x86/boot/bzImage").exists():
        raise RuntimeError(f"kernel build ({label}) failed ({p.returncode}): {text[-1500:]}")
    objs = sum(1 for _ in src.rglob("*.o"))
    out = {"wall_s": wall, "children_cpu_s": cpu, "objects": objs, "contention": contention,
           "report": [l for l in text.splitlines() if l.startswith("mosmake:") or "re-run" in l]}
    if stats_file:
        time.sleep(0.2)
        rs = parse_stats(stats_file.read_text())
        ends = {}
        for t, l in times:
            ends.setdefault(l, t)
        iv = []
        for l, t_end in ends.items():
            r = parse_stats(l)
            if r:
                iv.append((t_end - t0 - r[0]["total_ms"] / 1000, t_end - t0))
        out["remote_jobs"] = len(rs)
        out["jobs_per_node"] = {}
        for r in rs:
            out["jobs_per_node"][r["node"]] = out["jobs_per_node"].get(r["node"], 0) + 1
        out["start_ms_p50"] = pct([r["start_ms"] for r in rs], 50)
        out["start_ms_p99"] = pct([r["start_ms"] for r in rs], 99)
        out["reruns"] = sum(r["reruns"] for r in rs)
        out["longest_job_s"] = max((r["total_ms"] for r in rs), default=0) / 1000
        out["home_cpu_ms_per_start"] = cpu * 1000 / max(1, len(rs))
        own = [r["cpu_ms"] for r in rs if r["cpu_ms"] is not None]
        # The mosrun clients alone (each reports its own rusage), without make
        # and the local steps of the build.
        out["mosrun_cpu_ms_per_start"] = sum(own) / len(own) if own else None
        # Serial head and tail: before two remote compiles first overlap and
        # after they last do, the build ran (almost) one step at a time.
        step = 0.1
        pts = [i * step for i in range(int(wall / step) + 1)]
        conc = [sum(1 for a, b in iv if a <= t < b) for t in pts]
        par = [t for t, c in zip(pts, conc) if c >= 2]
        out["serial_head_s"] = par[0] if par else wall
        out["serial_tail_s"] = wall - par[-1] if par else 0.0
    log(f"kernel ({label}): {wall:.1f} s wall, {cpu:.1f} CPU-s in the children, {objs} objects; "
        f"the nodes got {contention['cluster_cores']:.2f} cores on average, other work on the machine "
        f"{contention['other_cores']:.2f}")
    return out


def phase_kernel(res, args, caps):
    if not KERNEL_TARBALL.exists():
        raise RuntimeError(f"{KERNEL_TARBALL} missing (scripts/bench-kernel.sh fetches it)")
    src_root = SHARED / "src"
    src = src_root / "linux-source-6.1"
    src_root.mkdir(parents=True, exist_ok=True)
    if not src.exists() and STASH.exists():
        log("moving the kept kernel tree into the shared path (each build starts with make mrproper)")
        os.rename(STASH, src)
    if not src.exists():
        log("unpacking the kernel source into the shared path")
        run(["tar", "-C", str(src_root), "-xf", str(KERNEL_TARBALL)], timeout=900)
    k = {}
    cap_total = sum(caps)
    if "a" in args.variants.split(","):
        a = build_variant("a", ["make", "-C", str(src), f"-j{args.local_jobs}"], src)
    else:
        # Tuning runs of (b) alone: (a) from the last full run, and said so.
        a = dict(json.loads(RESULTS.read_text())["kernel"]["a"]) if RESULTS.exists() else None
        if not a:
            raise RuntimeError("--variants b needs an earlier run's (a) in " + str(RESULTS))
        a["reused_from_earlier_run"] = True
    # Total CPU of the build, from (a): everything make ran, locally.
    k["a"] = a
    k["total_cpu_s"] = a["children_cpu_s"]
    jflag = [f"-j{args.b_jobs}"] if args.b_jobs else []
    b = build_variant("b", [MOSMAKE, "-C", str(src), *jflag], src, stats_file=OUT / "run" / "kernel-b.stats")
    k["b"] = b
    cp = b["serial_head_s"] + b["serial_tail_s"] + b["longest_job_s"]
    k["critical_path_est_s"] = cp
    k["capacity_total"] = cap_total
    k["capacity_node1"] = caps[0]
    k["work_over_capacity_s"] = k["total_cpu_s"] / cap_total
    k["ideal_s"] = max(cp, k["work_over_capacity_s"])
    k["ratio_to_ideal"] = b["wall_s"] / k["ideal_s"]
    k["speedup"] = a["wall_s"] / b["wall_s"]
    k["speedup_goal"] = 0.8 * cap_total / caps[0]
    res["kernel"] = k
    log(f"kernel: (a) {a['wall_s']:.1f} s, (b) {b['wall_s']:.1f} s, ideal {k['ideal_s']:.1f} s "
        f"(critical path est. {cp:.1f} s, work/capacity {k['work_over_capacity_s']:.1f} s), "
        f"ratio {k['ratio_to_ideal']:.2f}, speedup {k['speedup']:.2f} (goal ≥ {k['speedup_goal']:.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="starts,burst,kernel")
    ap.add_argument("--caps", default="0.6,0.5,0.4,0.3")
    ap.add_argument("--alone", type=int, default=200)
    ap.add_argument("--bursts", type=int, default=4)
    ap.add_argument("--burst-secs", type=float, default=3.0)
    ap.add_argument("--local-jobs", type=int, default=2)
    ap.add_argument("--b-jobs", type=int, default=0,
                    help="-j for mosmake in (b) (default: mosmake picks the cluster's total slots)")
    ap.add_argument("--slots-per-core", type=float, default=None,
                    help="the agents' slots per core (default: mosctl local up's)")
    ap.add_argument("--variants", default="a,b",
                    help="kernel builds to run; b alone reuses the last run's (a), for tuning only")
    args = ap.parse_args()
    caps = [float(c) for c in args.caps.split(",")]
    phases = args.phases.split(",")
    OUT.mkdir(exist_ok=True)
    (OUT / "run").mkdir(exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "caps": caps, "errors": {},
           "loadavg_before": open("/proc/loadavg").read().split()[:3],
           "other_clusters": sorted(n for n in os.listdir("/run/mosix") if n != NAME) if os.path.isdir("/run/mosix") else []}
    rc = 0
    try:
        cluster_up(caps, args.slots_per_core)
        for ph, fn in (("starts", lambda: phase_starts(res, args)),
                       ("burst", lambda: phase_burst(res, args, caps)),
                       ("kernel", lambda: phase_kernel(res, args, caps))):
            if ph in phases:
                try:
                    fn()
                except Exception as e:  # one phase failing must not lose the others' numbers
                    log(f"{ph} FAILED: {e}")
                    res["errors"][ph] = str(e)[-2000:]
                    rc = 1
    finally:
        src = SHARED / "src" / "linux-source-6.1"
        if src.exists():
            STASH.parent.mkdir(parents=True, exist_ok=True)
            if STASH.exists():
                run(["rm", "-rf", str(STASH)], check=False, timeout=900)
            os.rename(src, STASH)
        run([MOSCTL, "local", "down", "--name", NAME], check=False, timeout=900)
    res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    # Keep earlier runs' numbers next to this one's: every run is shown.
    hist = old.get("history", [])
    if old.get("date"):
        hist.append({k: v for k, v in old.items() if k != "history"})
    res["history"] = hist[-10:]
    RESULTS.write_text(json.dumps(res, indent=2))
    log(f"results: {RESULTS.relative_to(ROOT)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
