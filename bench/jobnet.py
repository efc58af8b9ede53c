#!/usr/bin/env python3
"""make bench-jobnet: what moving a job's address costs (issue 18).

A job with its own address (`mosrun -d --net own`) serving N established TCP
connections from a peer namespace on the cluster's bridge moves node1 <->
node2. A baseline job, the same server with no connection, moves too: once
before each measured move, so that both see the same machine (this VM's
speed drifts over minutes). Measured per N:
  - frozen time of each move, as `mosctl migrate` reports it; the extra
    frozen time is median(N) - median(the baseline's moves in N's window).
    N=0 is a control: a second job with no connection, whose extra shows
    the noise floor;
  - the peer's stall: the longest gap between answers on one connection
    that sends a byte every 5 ms and waits for its echo, per move;
  - resets: the peer namespace's TCP EstabResets + OutRsts, and any
    connection error the peer saw, over all moves.
Targets (issue 18): extra frozen <= 5 / 20 / 150 ms at 1 / 100 / 1000
connections; stall <= frozen + 200 ms; 0 resets over 100 moves.

With STEPS=1 the agents log their steps (debug), and the frozen time of
each N is split into them from the agents' logs: where the extra time of
many connections goes (CRIU's dump and restore, our seal and verification,
the address's hand-over).

Run by scripts/bench-jobnet.sh, which brings the cluster up and down.
Env: MOSCTL, MOSRUN, PEER_NS, PEER_IP, CONNS (e.g. "0,1,100,1000"), MOVES
(per N), OUT, STEPS, MOSIX_CLUSTER (the cluster file; the agents' logs are
beside it).
"""
import os
import re
import statistics
import subprocess
import sys
import time

# The agents' log format, read as the main bench reads it.
from bench import ANSI_RE, LOG_LINE_RE, log_time

MOSCTL = os.environ["MOSCTL"]
MOSRUN = os.environ["MOSRUN"]
PEER_NS = os.environ["PEER_NS"]
CONNS = [int(c) for c in os.environ.get("CONNS", "0,1,100,1000").split(",")]
MOVES = int(os.environ.get("MOVES", "20"))
RESET_MOVES = int(os.environ.get("RESET_MOVES", "100"))
OUT = os.environ.get("OUT", "bench-results/jobnet.txt")
STEPS = os.environ.get("STEPS") == "1"
LOGS = os.path.dirname(os.environ.get("MOSIX_CLUSTER", ""))
PY = "/usr/bin/python3"

SERVER = r"""
import resource,selectors,socket
s,h=resource.getrlimit(resource.RLIMIT_NOFILE);resource.setrlimit(resource.RLIMIT_NOFILE,(h,h))
sel=selectors.DefaultSelector();l=socket.socket();l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
l.bind(('0.0.0.0',9900));l.listen(2048);sel.register(l,selectors.EVENT_READ)
while True:
    for k,_ in sel.select():
        if k.fileobj is l:
            c,_=l.accept();sel.register(c,selectors.EVENT_READ)
        else:
            d=k.fileobj.recv(4096)
            if d: k.fileobj.sendall(d)
            else: sel.unregister(k.fileobj);k.fileobj.close()
"""

# The peer: N connections; the first one probes (a byte every 5 ms). On
# "m" it starts a window, on "r" it prints the window's longest gap (ms) and
# the errors seen so far.
CLIENT = r"""
import resource,socket,sys,threading,time
s,h=resource.getrlimit(resource.RLIMIT_NOFILE);resource.setrlimit(resource.RLIMIT_NOFILE,(h,h))
ip,n=sys.argv[1],int(sys.argv[2])
conns=[socket.create_connection((ip,9900)) for _ in range(n)]
print('ready',flush=True)
state={'gap':0.0,'errors':0,'last':time.time()}
def probe():
    c=conns[0]
    while True:
        try:
            c.sendall(b'x');b=c.recv(1)
            if b!=b'x': raise OSError('closed')
        except OSError:
            state['errors']+=1;return
        now=time.time();state['gap']=max(state['gap'],now-state['last']);state['last']=now
        time.sleep(0.005)
if n: threading.Thread(target=probe,daemon=True).start()
for line in sys.stdin:
    if line.startswith('m'): state['gap']=0.0
    # A probe still waiting for its echo is in a gap that has not ended:
    # count it too (a stall longer than the move plus the pause before "r"
    # would read as 0 otherwise).
    else: print('%.1f %d'%(max(state['gap'],time.time()-state['last'])*1000,state['errors']),flush=True)
"""


def sh(*args):
    return subprocess.run(args, capture_output=True, text=True)


def peer_resets():
    t = sh("nsenter", f"--net=/run/netns/{PEER_NS}", "cat", "/proc/net/snmp").stdout
    rows = [l.split() for l in t.splitlines() if l.startswith("Tcp:")]
    get = lambda k: int(rows[1][rows[0].index(k)])
    return get("EstabResets") + get("OutRsts")


def start_job():
    """A detached own-address echo server on node1: (job id, its address)."""
    o = sh(MOSRUN, "-d", "--node", "node1", "--net", "own", "--", PY, "-c", SERVER)
    if o.returncode != 0:
        sys.exit(f"mosrun: {o.stderr}")
    return o.stdout.strip(), re.search(r"address (\S+)", o.stderr).group(1)


class Mover:
    """One job moving node1 <-> node2; `move()` returns its frozen ms."""

    def __init__(self, job, what):
        self.job, self.what, self.here, self.moves = job, what, "node1", 0

    def move(self):
        to = "node2" if self.here == "node1" else "node1"
        r = sh(MOSCTL, "migrate", self.job, to)
        if r.returncode != 0:
            sys.exit(f"move {self.moves} of the {self.what} failed: {r.stderr}")
        self.here, self.moves = to, self.moves + 1
        return int(re.search(r"frozen (\d+) ms", r.stdout + r.stderr).group(1))


def one(n, moves, base):
    """`moves` moves of a new job with n connections, each after a move of
    the baseline job (no connections), so that both see the same machine:
    the extra frozen time is measured against moves made seconds apart."""
    job, ip = start_job()
    time.sleep(1)
    cli = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{PEER_NS}", PY, "-c", CLIENT, ip, str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert cli.stdout.readline().strip() == "ready"
    before = peer_resets()
    frozen, stalls, baseline, errors = [], [], [], 0
    it = Mover(job, f"{n}-connection job")
    for _ in range(moves):
        baseline.append(base.move())
        cli.stdin.write("m\n"); cli.stdin.flush()
        frozen.append(it.move())
        time.sleep(0.3)
        cli.stdin.write("r\n"); cli.stdin.flush()
        gap, errors = cli.stdout.readline().split()
        stalls.append(float(gap))
        errors = int(errors)
    resets = peer_resets() - before
    cli.kill(); cli.wait()
    sh(MOSCTL, "kill", job)
    return frozen, baseline, stalls, resets + errors, job


# The agents' log lines that mark a move's steps, in order. The frozen clock
# (what `mosctl migrate` reports) runs from "images made" (the connections'
# image files, made while the job still runs) to "back".
MARKS = [
    ("answered", "step: target answered"),
    ("images made", "tcp-stream images created before the freeze"),
    ("dumping", "step: registry updated, dumping"),
    ("dumped", "step: criu dump returned"),
    ("sealed", "dumped and sealed"),
    ("handed", "step: handed over, calling the target"),
    ("target called", "step: restore call received"),
    ("verified", "step: images verified and claimed"),
    ("restored", "step: criu restore returned"),
    ("announced", "address announced"),
    ("recorded", "restored job="),
    ("back", "step: target restored"),
]
SPAN_NAMES = {
    "images made": "connections' image files (job running)",
    "dumping": "freeze prep (front ends, registry)",
    "dumped": "CRIU dump",
    "sealed": "seal (hash tail, manifest)",
    "handed": "hand-over record",
    "target called": "Restore RPC",
    "verified": "target: verify manifest, claim",
    "restored": "CRIU restore",
    "announced": "address up + gratuitous ARP",
    "recorded": "target: registry, events",
    "back": "reply to the source",
}


def step_spans(job):
    """{span: [ms per move]} of `job`'s moves, from both agents' logs."""
    ev = []
    for node in ("node1", "node2"):
        try:
            text = open(os.path.join(LOGS, f"{node}.log"), errors="replace").read()
        except OSError:
            continue
        for line in ANSI_RE.sub("", text).splitlines():
            m = LOG_LINE_RE.match(line)
            if m and re.search(rf"\bjob={job}\b", line):
                ev.append((log_time(m.group(1)), m.group(3)))
    ev.sort()
    moves, cur = [], None
    for t, text in ev:
        if "step: migrate call received" in text:
            cur = {}
            moves.append(cur)
        elif cur is not None:
            for name, needle in MARKS:
                if needle in text and name not in cur:
                    cur[name] = t
                    break
    spans = {}
    names = [n for n, _ in MARKS]
    for m in moves:
        if "back" not in m:
            continue
        prev = None
        for name in names:
            if name in m:
                if prev is not None:
                    spans.setdefault(name, []).append((m[name] - m[prev]) * 1000)
                prev = name
    return spans


def steps_table(per_n):
    """Median per step and N, and each N's difference from N=0."""
    ns = list(per_n)
    fmt = "{:<42}" + " {:>9}" * len(ns)
    heads = ["baseline" if n == "base" else f"N={n}" for n in ns]
    out = ["# where the frozen time goes (p50 per step, ms, from the agents' logs; the frozen",
           "# clock starts after the first row):",
           "# " + fmt.format("step", *heads)]
    for name, label in SPAN_NAMES.items():
        row = [statistics.median(per_n[n][name]) if per_n[n].get(name) else None for n in ns]
        if all(v is None for v in row):
            continue
        out.append("# " + fmt.format(label, *["" if v is None else f"{v:.1f}" for v in row]))
    return out


def main():
    lines = [f"# make bench-jobnet {time.strftime('%Y-%m-%d %H:%M')}: {MOVES} moves per N "
             f"(node1 <-> node2), N = established connections of the moved job; each move follows "
             f"one of the baseline job (N=0), whose moves in that window are the N's baseline"]
    fmt = "{:>6} {:>12} {:>14} {:>12} {:>14} {:>16} {:>7}"
    lines.append(fmt.format("N", "frozen p50", "baseline p50", "extra p50", "stall p50/max",
                            "stall-frozen max", "resets"))
    base_job, _ = start_job()
    base = Mover(base_job, "baseline job (no connections)")
    per_n = {}
    for n in CONNS:
        moves = RESET_MOVES if n == 1 else MOVES
        frozen, baseline, stalls, resets, job = one(n, moves, base)
        if STEPS:
            per_n[n] = step_spans(job)
        med, bmed = statistics.median(frozen), statistics.median(baseline)
        st = "" if n == 0 else f"{statistics.median(stalls):.0f}/{max(stalls):.0f} ms"
        over = "" if n == 0 else f"{max(s - f for s, f in zip(stalls, frozen)):.0f} ms"
        lines.append(fmt.format(n, f"{med:.0f} ms", f"{bmed:.0f} ms", f"{med - bmed:.0f} ms", st, over,
                                resets))
        print(lines[-1], flush=True)
        lines.append(f"#   frozen, each move: {' '.join(map(str, frozen))}")
        lines.append(f"#   baseline, each move: {' '.join(map(str, baseline))}")
        if n:
            lines.append(f"#   peer's stall, each move: {' '.join(f'{s:.0f}' for s in stalls)}")
    sh(MOSCTL, "kill", base_job)
    if STEPS:
        per_n["base"] = step_spans(base_job)
    lines.append("targets: extra <= 5 / 20 / 150 ms at 1 / 100 / 1000; stall - frozen <= 200 ms; "
                 f"0 resets ({RESET_MOVES} moves at N=1)")
    if STEPS:
        lines += steps_table(per_n)
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
