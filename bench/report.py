#!/usr/bin/env python3
"""Turn bench-results/results.json into targets (PASS/MISS, written back into
results.json), BENCHMARKS.md at the repo root, PNG plots (matplotlib, if
available; ASCII plots in the markdown otherwise) and a printed summary."""

import datetime
import os
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
RESULTS = OUT / "results.json"
MD = ROOT / "BENCHMARKS.md"


# Issue 17's full-copy goals (ours ÷ bare CRIU), by size in MiB; other sizes 1.00.
FULL_COPY_GOAL = {64: 0.85, 256: 1.0, 1024: 1.0}


def med(s):
    return None if not s else s["median"]


def fmt_ms(s, digits=0):
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def imb(x):
    return "∞" if x is None else f"{x:.2f}"


def pf(ok):
    # None: an informational row, shown but not counted as a target.
    return "INFO" if ok is None else ("PASS" if ok else "MISS")


def targets(r):
    t = []

    def add(area, what, measured, goal, ok, note=""):
        t.append({"area": area, "target": what, "measured": measured, "goal": goal,
                  "result": pf(ok), "note": note})

    # 1. migration vs bare CRIU
    mig = r.get("migration", {})
    sizes = mig.get("sizes", [])
    if not sizes:
        add("migration", "ours total / bare CRIU total", "not measured", "≤ 0.85 at 64 MiB, ≤ 1.00 above", False,
            r.get("errors", {}).get("migration", ""))
    for s in sizes:
        # Issue 17: faster than bare CRIU where a resident agent's fixed
        # costs matter (64 MiB), at least parity above.
        goal = FULL_COPY_GOAL.get(s["mib"], 1.0)
        add("migration", f"{s['mib']} MiB: ours total / bare CRIU total",
            f"{s['ratio_total']:.2f} ({med(s['ours_wall_ms']):.0f} ms vs {med(s['bare_total_ms']):.0f} ms)",
            f"≤ {goal:.2f}", s["ratio_total"] <= goal)

    # 2. post-copy: frozen 1 GiB ≤ 0.3 s, and (issue 17, replacing the
    # 1 GiB ÷ 64 MiB ratio) ≤ 0.75 × bare CRIU's lazy-pages frozen time.
    pc = r.get("post_copy")
    pc_sizes = ("64", "1024")
    if pc is None or not pc.get("available"):
        why = ("not measured", r.get("errors", {}).get("migration", "")) if pc is None else \
            ("not implemented", pc.get("error", ""))
        add("post-copy", "frozen time, 1 GiB", why[0], "≤ 0.3 s", False, why[1])
        for k in pc_sizes:
            add("post-copy", f"{k} MiB: ours frozen / bare CRIU lazy-pages frozen", why[0], "≤ 0.75", False, why[1])
    else:
        f1g = (pc.get("1024") or {}).get("frozen_ms")
        if f1g:
            add("post-copy", "frozen time, 1 GiB", f"{med(f1g) / 1000:.3f} s", "≤ 0.3 s", med(f1g) <= 300)
        else:
            add("post-copy", "frozen time, 1 GiB", "failed", "≤ 0.3 s", False, str(pc.get("1024")))
        for k in pc_sizes:
            d = pc.get(k) or {}
            what = f"{k} MiB: ours frozen / bare CRIU lazy-pages frozen"
            if d.get("frozen_ms") and d.get("bare_frozen_ms"):
                o, b = med(d["frozen_ms"]), med(d["bare_frozen_ms"])
                ratio = o / max(b, 1e-9)
                add("post-copy", what, f"{ratio:.2f} ({o:.0f} ms vs {b:.0f} ms)", "≤ 0.75", ratio <= 0.75)
            else:
                add("post-copy", what, "not measured" if not d else "failed", "≤ 0.75", False,
                    d.get("error", "") if d else "size not in --sizes")

    # 3. balancing
    b = r.get("balance", {})
    if "ratio_to_ideal" in b:
        add("balancing", f"makespan with balancer / ideal (K={b['k']}, N={b['nodes']})",
            f"{b['ratio_to_ideal']:.2f} ({b['balanced']['makespan_s']:.1f} s vs {b['ideal_s']:.1f} s)",
            "≤ 1.15", b["ratio_to_ideal"] <= 1.15)
        goal = 0.8 * b["nodes"]
        add("balancing", "speedup: no-balance makespan / balanced makespan",
            f"{b['speedup']:.2f} ({b['no_balance']['makespan_s']:.1f} s / {b['balanced']['makespan_s']:.1f} s)",
            f"≥ {goal:.1f} (0.8 × N)", b["speedup"] >= goal)
    else:
        err = r.get("errors", {}).get("balance", "")
        add("balancing", "makespan with balancer / ideal", "not measured", "≤ 1.15", False, err)
        add("balancing", "speedup vs no balancing", "not measured", "≥ 0.8 × N", False, err)

    # 4a. plan
    cases = r.get("plan", {}).get("cases", [])
    dflt = [c for c in cases if c["config"] == "default"]
    if dflt:
        worst = max(dflt, key=lambda c: c["median_ms"])
        cpu = f", thread CPU {worst['cpu_median_ms']:.1f} ms" if worst.get("cpu_median_ms") is not None else ""
        add("control plane", "policy::plan, 10,000 nodes / 100,000 jobs (default config, slowest shape)",
            f"{worst['median_ms']:.1f} ms median wall ({worst['shape']}{cpu})", "< 50 ms", worst["median_ms"] < 50)
    else:
        add("control plane", "policy::plan, 10k nodes / 100k jobs", "not measured", "< 50 ms", False,
            r.get("errors", {}).get("plan", ""))
    unl = [c for c in cases if c["config"] != "default"]
    if unl:
        worst = max(unl, key=lambda c: c["median_ms"])
        add("control plane", "policy::plan, same, max_moves_per_plan unlimited (informational)",
            f"{worst['median_ms']:.1f} ms median ({worst['shape']}, {worst['moves']} moves)", "< 50 ms",
            worst["median_ms"] < 50, "not what a balancer round runs; shown for headroom")

    # 4b. round
    rd = r.get("round", {})
    for variant, label in (("plain", "plain gRPC, as specified"), ("mtls", "mTLS, the local cluster's default (informational)")):
        d = rd.get(variant)
        if not d:
            if variant == "plain":
                add("control plane", "balancer round vs 1,000 agents", "not measured", "< 1 s, ≤ 10% of a core", False,
                    r.get("errors", {}).get("round", ""))
            continue
        add("control plane", f"one balancer round, {d['agents']} agents, {label}: wall time",
            f"{d['wall_median_s']:.3f} s median", "< 1 s", d["wall_median_s"] < 1.0)
        add("control plane", f"one balancer round, {d['agents']} agents, {label}: CPU per 3 s interval",
            f"{100 * d['cpu_fraction_of_interval']:.1f}% ({d['cpu_median_s']:.3f} CPU-s per round)",
            "≤ 10% of a core", d["cpu_fraction_of_interval"] <= 0.10,
            f"median of {len(d['rounds'])} rounds of one balancer process; its first round opens the "
            f"connections ({d['rounds'][0]['cpu_s']:.3f} CPU-s, {d['rounds'][0]['wall_s']:.3f} s) and later "
            "rounds reuse them")

    # 4b'. push vs poll at scale (mTLS)
    sc = r.get("round_scale") or []
    big = [d for d in sc if d.get("push") and d["agents"] >= 10000]
    if big:
        d = big[0]
        add("control plane", f"one balancer round, {d['agents']} agents, mTLS, load feeds (serve's default): wall time",
            f"{d['wall_median_s']:.3f} s median", "< 1 s", d["wall_median_s"] < 1.0,
            f"{d['agents_up_min']} of {d['agents']} agents up in every round")
        add("control plane", f"one balancer round, {d['agents']} agents, mTLS, load feeds: CPU per 3 s interval",
            f"{100 * d['cpu_fraction_of_interval']:.1f}% ({d['cpu_median_s']:.3f} CPU-s per interval, reports received included)",
            "≤ 10% of a core", d["cpu_fraction_of_interval"] <= 0.10,
            f"opening the {d['agents']} feeds took {d['open_s']:.1f} s and {d['open_cpu_s']:.1f} CPU-s, once")
    elif "round_scale" in r or r.get("errors", {}).get("scale"):
        add("control plane", "one balancer round, 10,000 agents, mTLS", "not measured", "< 1 s, ≤ 10% of a core", False,
            r.get("errors", {}).get("scale", ""))

    # 4c. idle agent
    idle = r.get("idle", {}).get("procs", [])
    if idle:
        cpu = max(p["cpu_pct_of_core"] for p in idle)
        rss = max(p["rss_max_mib"] for p in idle)
        add("control plane", "idle mosixd CPU (worst agent)", f"{cpu:.3f}% of a core over {idle[0]['wall_s']:.0f} s",
            "≤ 0.5%", cpu <= 0.5)
        add("control plane", "idle mosixd RSS (worst agent)", f"{rss:.1f} MiB", "≤ 30 MiB", rss <= 30)
    else:
        add("control plane", "idle mosixd CPU and RSS", "not measured", "≤ 0.5%, ≤ 30 MiB", False,
            r.get("errors", {}).get("migration", ""))
    # 5. the kernel build and placement (bench/kernel.py, bench-results/kernel.json)
    kernel_report.targets(add)

    # 6. checkpoints (issue 16): a checkpoint freezes no longer than a migration
    ck = r.get("checkpoint")
    if ck is not None:
        for mib, v in sorted(ck.items(), key=lambda kv: int(kv[0])):
            what = f"{mib} MiB: checkpoint frozen / migration frozen"
            if "error" in v:
                add("checkpoint", what, "failed", "≤ 1.00", False, v["error"])
                continue
            c, m = med(v["checkpoint_frozen_ms"]), med(v["migration_frozen_ms"])
            add("checkpoint", what, f"{c / max(m, 1e-9):.2f} ({c:.0f} ms vs {m:.0f} ms)", "≤ 1.00", c <= m)

    # 7. issue 17: without a shared path, CRIU's own way as the yardstick
    ns = r.get("noshared")
    nerr = r.get("errors", {}).get("noshared", "")
    if not ns or not ns.get("sizes"):
        add("no shared path", "ours total / CRIU page-server migration total", "not measured", "≤ 1.00", False,
            nerr or "phase not run")
    else:
        # Like for like: pages in plain text (ours with --plain-pages, bare
        # CRIU's page server), and pages encrypted (ours by default, over the
        # agents' mTLS; bare CRIU with its --tls).
        for s in ns.get("plain_sizes", []):
            what = f"{s['mib']} MiB, `--plain-pages`: ours total / CRIU page-server migration total"
            if "error" in s:
                add("no shared path", what, "failed", "≤ 1.00", False, s["error"][:300])
                continue
            add("no shared path", what,
                f"{s['ratio_total']:.2f} ({med(s['ours_wall_ms']):.0f} ms vs {med(s['bare_total_ms']):.0f} ms)",
                "≤ 1.00", s["ratio_total"] <= 1.0)
        if not ns.get("plain_sizes"):
            add("no shared path", "`--plain-pages`: ours total / CRIU page-server migration total", "not measured",
                "≤ 1.00", False, "not in this run")
        for s in ns["sizes"]:
            what = f"{s['mib']} MiB, encrypted (the default): ours total / CRIU page-server migration with its `--tls`"
            if "error" in s:
                add("no shared path", what, "failed", "≤ 1.00", False, s["error"][:300])
                continue
            if "ratio_total_vs_tls" not in s:
                continue
            add("no shared path", what,
                f"{s['ratio_total_vs_tls']:.2f} ({med(s['ours_wall_ms']):.0f} ms vs {med(s['bare_tls_total_ms']):.0f} ms)",
                "≤ 1.00", s["ratio_total_vs_tls"] <= 1.0,
                f"against plain-text bare CRIU: {s['ratio_total']:.2f} ({med(s['bare_total_ms']):.0f} ms)")

    # 8. issue 17: out of a crowded node
    cr = r.get("crowded")
    cerr = r.get("errors", {}).get("crowded", "")
    if not cr or not cr.get("crowded_frozen_ms") or not cr.get("idle_frozen_ms"):
        for q, goal in (("p50", "≤ 1.5"), ("p95", "≤ 2.5")):
            add("crowded node", f"frozen {q}: move off a crowded node / between idle nodes", "not measured",
                goal, False, (cerr or "phase not run")[:300])
    else:
        c, i = cr["crowded_frozen_ms"], cr["idle_frozen_ms"]
        note = cerr[:300] if cerr else ""
        add("crowded node", f"frozen p50: balancer's move off a crowded node / move between idle nodes (n={c['n']}/{i['n']})",
            f"{cr['ratio_p50']:.2f} ({c['p50']} ms vs {i['p50']} ms)", "≤ 1.5", cr["ratio_p50"] <= 1.5, note)
        add("crowded node", f"frozen p95: balancer's move off a crowded node / move between idle nodes (n={c['n']}/{i['n']})",
            f"{cr['ratio_p95']:.2f} ({c['p95']} ms vs {i['p95']} ms)", "≤ 2.5", cr["ratio_p95"] <= 2.5, note)

    return t


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------

def plots(r):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    made = []
    sizes = r.get("migration", {}).get("sizes", [])
    if sizes:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = [f"{s['mib']} MiB" for s in sizes]
        x = range(len(sizes))
        w = 0.25

        def errs(key):
            m = [s[key]["median"] for s in sizes]
            return m, [[mm - s[key]["min"] for mm, s in zip(m, sizes)], [s[key]["max"] - mm for mm, s in zip(m, sizes)]]

        m, e = errs("ours_frozen_ms")
        ax.bar([i - w for i in x], m, w, yerr=e, capsize=3, label="mosix: frozen", color="#8fb8de")
        m, e = errs("ours_wall_ms")
        ax.bar(list(x), m, w, yerr=e, capsize=3, label="mosix: total (wall)", color="#2c6fb0")
        dump = [s["bare_dump_ms"]["median"] for s in sizes]
        rest = [s["bare_restore_ms"]["median"] for s in sizes]
        ax.bar([i + w for i in x], dump, w, label="bare CRIU: dump", color="#f2a35e")
        ax.bar([i + w for i in x], rest, w, bottom=dump, label="bare CRIU: restore", color="#c0561b")
        for i, s in enumerate(sizes):
            ax.text(i, s["ours_wall_ms"]["max"] * 1.03, f"×{s['ratio_total']:.2f}", ha="center", fontsize=9)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels)
        ax.set_ylabel("ms (median, bars = min–max)")
        ax.set_title("Migration vs bare CRIU (label: mosix total / bare total)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = OUT / "migration.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    pc = r.get("post_copy") or {}
    pcs = sorted((int(k) for k in pc if k.isdigit() and "frozen_ms" in (pc.get(k) or {})))
    if sizes or pcs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if sizes:
            xs = [s["mib"] for s in sizes]
            ax.plot(xs, [s["ours_frozen_ms"]["median"] for s in sizes], "o-", label="mosix full copy", color="#2c6fb0")
            ax.plot(xs, [s["bare_total_ms"]["median"] for s in sizes], "s--", label="bare CRIU dump+restore", color="#c0561b")
        if pcs:
            ax.plot(pcs, [pc[str(k)]["frozen_ms"]["median"] for k in pcs], "o-", label="mosix post-copy", color="#2a9d55")
            bare = [k for k in pcs if "bare_frozen_ms" in pc[str(k)]]
            if bare:
                ax.plot(bare, [pc[str(k)]["bare_frozen_ms"]["median"] for k in bare], "s--",
                        label="bare CRIU post-copy", color="#7fbf7b")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("resident memory of the job (MiB)")
        ax.set_ylabel("frozen time (ms, median)")
        ax.set_title("Frozen time against memory size")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = OUT / "frozen.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    sc = r.get("round_scale") or []
    if sc:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for push, label, color in ((True, "push (load feeds)", "#2c6fb0"), (False, "poll", "#c0561b")):
            rows = sorted((d for d in sc if d.get("push") == push), key=lambda d: d["agents"])
            if not rows:
                continue
            xs = [d["agents"] for d in rows]
            axes[0].plot(xs, [d["wall_median_s"] for d in rows], "o-", label=label, color=color)
            axes[1].plot(xs, [100 * d["cpu_fraction_of_interval"] for d in rows], "o-", label=label, color=color)
        axes[0].axhline(1.0, color="k", ls="--", lw=1, label="target < 1 s")
        axes[1].axhline(10, color="k", ls="--", lw=1, label="target ≤ 10%")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("simulated agents (mTLS)")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("round time (s, median)")
        axes[1].set_ylabel("balancer CPU, % of a core per 3 s interval")
        axes[0].set_title("Round time")
        axes[1].set_title("Balancer CPU")
        fig.tight_layout()
        p = OUT / "control_plane.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    b = r.get("balance", {})
    if "balanced" in b and "no_balance" in b:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, key, title in ((axes[0], "balanced", "with balancer"), (axes[1], "no_balance", "no balancing")):
            tl = b[key]["timeline"]
            nodes = sorted({n for p in tl for n in p["running_per_node"]} | {f"node{i}" for i in range(1, b["nodes"] + 1)})
            ts = [p["t"] for p in tl]
            ys = [[p["running_per_node"].get(n, 0) for p in tl] for n in nodes]
            ax.stackplot(ts, ys, labels=nodes, step="post")
            ax.axvline(b["ideal_s"], color="k", ls="--", lw=1, label=f"ideal {b['ideal_s']:.0f} s")
            ax.axvline(b[key]["makespan_s"], color="r", ls=":", lw=1, label=f"makespan {b[key]['makespan_s']:.0f} s")
            ax.set_title(f"{title}: running jobs per node")
            ax.set_xlabel("s since the jobs were started on node1")
        axes[0].set_ylabel("running jobs")
        axes[0].legend(fontsize=8, loc="upper right")
        axes[1].legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        p = OUT / "balance.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def ascii_bars(rows, width=50):
    top = max((v for _, v in rows), default=1) or 1
    return "\n".join(f"{k:<24} {'#' * max(1, round(width * v / top)):<{width}} {v:.0f}" for k, v in rows)


# ---------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------

def hand_written_sections():
    """The `## …written by hand…` sections of the current BENCHMARKS.md, each
    up to the next `## ` heading, in order."""
    try:
        text = MD.read_text()
    except OSError:
        return []
    out, cur = [], None
    for line in text.split("\n"):
        if line.startswith("## "):
            if cur is not None:
                out.append("\n".join(cur).rstrip("\n") + "\n")
            cur = [line] if "written by hand" in line else None
        elif cur is not None:
            cur.append(line)
    if cur is not None:
        out.append("\n".join(cur).rstrip("\n") + "\n")
    return out


def bg_note(r, phase):
    """One sentence on the machine's load when a phase started."""
    b = (r.get("background") or {}).get(phase) or {}
    if not b:
        return ""
    oc = b.get("other_clusters") or []
    return (f"Machine load when the phase started: {b.get('busy_cores')} cores busy (of 2), loadavg "
            f"{' '.join(b.get('loadavg', []))}" + (f"; other local clusters up: {', '.join(oc)}" if oc else "") + ".")


def out_and_back(each):
    """Moves listed out, back, out, back, ... as "out/back" pairs."""
    return ", ".join(f"{a}/{b}" for a, b in zip(each[::2], each[1::2]))


def md_noshared(w, r):
    ns = r.get("noshared")
    w("## 1b. Migration without a shared path\n")
    if not ns:
        w(f"Not measured: {r.get('errors', {}).get('noshared', 'phase not run')}\n")
        return
    w("A 2-node local cluster made with `mosctl local up --no-shared`: each node keeps its registry and images in "
      "its own state dir (`/run/mosix/<cluster>/nodes/<node>`, same disk), and `mosctl migrate` makes the source "
      "agent dump and seal, stream the images to the target agent over mTLS, and ask it to restore. "
      "**Bare** is CRIU's own migration without shared storage, on a twin process (as in section 1): "
      "`criu page-server -D TARGET_DIR --address TARGET_IP --port P` started in the target's netns (timed from its "
      "start; `--status-fd` says when it listens), `criu dump -t PID -D SOURCE_DIR --page-server --address TARGET_IP "
      "--port P` in the source's netns (the pages go over TCP into the target's dir), the other image files copied "
      "from the source's dir into the target's (what a user does with scp; here a local copy), then `criu restore "
      "-D TARGET_DIR -d` in the target's netns; same CRIU options and priority as section 1. "
      "Each run is a round trip node1 → node2 → node1 per side, both legs count, who goes first rotates from run to run, "
      "after one untimed round trip per side. Median (min–max) in ms. " + bg_note(r, "noshared") + "\n")
    sizes = ns.get("sizes", [])
    ok = [s for s in sizes if "error" not in s]
    if ok:
        w("| Size | moves | ours frozen | ours total (wall) | bare: page server up | bare: dump | bare: copy rest | "
          "bare: restore | bare total | ratio ours/bare |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for s in ok:
            w(f"| {s['mib']} MiB | {s['moves']} | {fmt_ms(s['ours_frozen_ms'])} | {fmt_ms(s['ours_wall_ms'])} | "
              f"{fmt_ms(s['bare_listen_ms'])} | {fmt_ms(s['bare_dump_ms'])} | {fmt_ms(s['bare_copy_ms'], 1)} | "
              f"{fmt_ms(s['bare_restore_ms'])} | {fmt_ms(s['bare_total_ms'])} | **{s['ratio_total']:.2f}** |")
        steps = [s for s in ok if s.get("ours_steps_ms")]
        if steps:
            w("\nWhere our time goes (medians (min–max) in ms, from the agents' info lines of each move): the "
              "source's CRIU dump, whose pages go through both agents over mTLS into a page server on the target "
              "(the page stream; the target hashes them as they land), the seal after it (the other files' "
              "digests + HMAC manifest), the push of the other image files (the pages are there already), and the "
              "target's CRIU restore (the other files verified alongside). The rest of *ours total* is the CLI, "
              "the ping, the registry writes and the RPCs.\n")
            w("| Size | dump | seal | push | restore | bare: dump (pages over TCP) | bare: restore |")
            w("|---|---|---|---|---|---|---|")
            for s in steps:
                st = s["ours_steps_ms"]
                cell = lambda k, d=0: fmt_ms(st[k], d) if k in st else "–"  # noqa: E731
                w(f"| {s['mib']} MiB | {cell('agent_dump_ms')} | {cell('agent_seal_ms', 1)} | {cell('agent_push_ms')} | "
                  f"{cell('agent_restore_ms')} | {fmt_ms(s['bare_dump_ms'])} | {fmt_ms(s['bare_restore_ms'])} |")
        w("\nEvery move, in order (ms; out and back alternate; *o* = our side went first in that run):\n")
        for s in ok:
            w(f"- {s['mib']} MiB, ours: " + ours_moves(s))
            w(f"- {s['mib']} MiB, bare: " + out_and_back(s["bare_total_each_ms"]))
            if s.get("bare_tls_total_each_ms"):
                w(f"- {s['mib']} MiB, bare with `--tls`: " + out_and_back(s["bare_tls_total_each_ms"]))
        w("")
        tls = [s for s in ok if s.get("bare_tls_total_ms")]
        if tls:
            w("**Encrypted on the wire, as ours are.** Bare CRIU's pages above cross the network in plain text; "
              "ours cross it inside the agents' mTLS connection. CRIU has its own TLS for the page server "
              "(`--tls --tls-cacert --tls-cert --tls-key`, GnuTLS): a third twin process moved that way, each side "
              "with its node's certificate from the cluster's PKI, in the same runs (who goes first rotates over "
              "ours, bare, bare with TLS). The target above is against plain bare CRIU; this is for comparison.\n")
            w("| Size | bare `--tls`: dump | bare `--tls`: restore | bare `--tls` total | ours total | ratio ours / bare `--tls` |")
            w("|---|---|---|---|---|---|")
            for s in tls:
                w(f"| {s['mib']} MiB | {fmt_ms(s['bare_tls_dump_ms'])} | {fmt_ms(s['bare_tls_restore_ms'])} | "
                  f"{fmt_ms(s['bare_tls_total_ms'])} | {fmt_ms(s['ours_wall_ms'])} | **{s['ratio_total_vs_tls']:.2f}** |")
            w("")
        w("Images: ours " + "; ".join(f"{s['mib']} MiB: {s.get('ours_images')}" for s in ok) + "; bare " +
          "; ".join(f"{s['mib']} MiB: {(s.get('bare_image_bytes') or 0) / 2**20:.1f} MiB, of which "
                    f"{(s.get('bare_copied_bytes') or 0) / 2**10:.0f} KiB copied after the dump" for s in ok) + ".\n")
    for s in sizes:
        if "error" in s:
            w(f"- {s['mib']} MiB failed: `{s['error'][:500]}`")
    if len(ok) != len(sizes):
        w("")
    md_noshared_plain(w, ns.get("plain_sizes") or [])


def ours_moves(s):
    """Our side's moves of a noshared size, out/back, *o* where ours went first."""
    firsts = s.get("ours_first") or []
    each = s["ours_wall_each_ms"]
    return ", ".join(f"{a}/{b}" + ("o" if i < len(firsts) and firsts[i] else "")
                     for i, (a, b) in enumerate(zip(each[::2], each[1::2])))


def md_noshared_plain(w, sizes):
    """Section 1b's second cluster: the agents with --plain-pages."""
    if not sizes:
        return
    ok = [s for s in sizes if "error" not in s]
    w("**Pages in plain text, as bare CRIU's: `--plain-pages`.** The same phase again on a cluster whose agents "
      "run with `--plain-pages`: the target's agent opens a one-time port on its own address and sends it with a "
      "random token inside the agents' mTLS stream; the source's agent connects, presents the token, and joins "
      "the connection to its CRIU's page socket with `splice(2)` (no copy through the agent), so the pages go from "
      "CRIU's dump into the target's page server over plain TCP, as in bare CRIU's migration (everything else, the "
      "seal, the push and the restore, as above). Sides: ours and "
      "plain bare CRIU, who goes first alternating; this is the like-for-like target row.\n")
    if ok:
        w("| Size | moves | ours frozen | ours total (wall) | ours: dump | ours: restore | bare: dump | bare: restore | "
          "bare total | ratio ours/bare |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for s in ok:
            st = s.get("ours_steps_ms") or {}
            cell = lambda k: fmt_ms(st[k]) if k in st else "–"  # noqa: E731
            w(f"| {s['mib']} MiB | {s['moves']} | {fmt_ms(s['ours_frozen_ms'])} | {fmt_ms(s['ours_wall_ms'])} | "
              f"{cell('agent_dump_ms')} | {cell('agent_restore_ms')} | {fmt_ms(s['bare_dump_ms'])} | "
              f"{fmt_ms(s['bare_restore_ms'])} | {fmt_ms(s['bare_total_ms'])} | **{s['ratio_total']:.2f}** |")
        w("\nEvery move, in order (ms; out and back alternate; *o* = our side went first in that run):\n")
        for s in ok:
            w(f"- {s['mib']} MiB, ours with `--plain-pages`: " + ours_moves(s))
            w(f"- {s['mib']} MiB, bare: " + out_and_back(s["bare_total_each_ms"]))
        w("")
    for s in sizes:
        if "error" in s:
            w(f"- {s['mib']} MiB with `--plain-pages` failed: `{s['error'][:500]}`")


def md_memwrite(w, sizes):
    """Section 1's CRIU memory writes, and every move."""
    if any(s.get("ours_memwrite_ms") and s.get("bare_memwrite_ms") for s in sizes):
        w("\n**CRIU's memory write in both** (`memwrite_time` from CRIU's own `stats-dump` of each move: writing "
          "the job's pages into the image files, the job frozen; the agents run with `MOSIX_KEEP_CRIU_LOGS=1` so "
          "that their moves' statistics stay). It is the same work on both sides. When it is slow, that is the "
          "page cache taking new pages: on this VM the first touch of memory the host has taken back "
          "(virtio-balloon free page reporting) is slow. *Without the write* "
          "takes each side's median write off its median total; it is a diagnostic, not a target.\n")
        w("| Size | ours: memory write | bare: memory write | ours total − write | bare total − write | ratio without the write |")
        w("|---|---|---|---|---|---|")
        for s in sizes:
            ow, bw = s.get("ours_memwrite_ms"), s.get("bare_memwrite_ms")
            if not (ow and bw):
                continue
            o, b = med(s["ours_wall_ms"]) - med(ow), med(s["bare_total_ms"]) - med(bw)
            w(f"| {s['mib']} MiB | {fmt_ms(ow)} | {fmt_ms(bw)} | {o:.0f} | {b:.0f} | {o / max(b, 1e-9):.2f} |")
    lines = []
    for s in sizes:
        ob, bb = s.get("ours_out_wall_ms"), s.get("bare_out_total_ms")
        if not (ob and bb and s.get("ours_back_wall_ms") and s.get("bare_back_total_ms")):
            continue
        lines.append(f"- {s['mib']} MiB, ours (wall): " + ", ".join(
            f"{a:.0f}/{b:.0f}" for a, b in zip(ob["values"], s["ours_back_wall_ms"]["values"])))
        lines.append(f"- {s['mib']} MiB, bare: " + ", ".join(
            f"{a:.0f}/{b:.0f}" for a, b in zip(bb["values"], s["bare_back_total_ms"]["values"])))
        for side in ("ours", "bare"):
            mw = s.get(f"{side}_memwrite_ms")
            if mw:
                lines.append(f"- {s['mib']} MiB, {side}: CRIU's memory write: " + out_and_back(
                    [f"{x:.0f}" for x in mw["values"]]))
    if lines:
        w("\nEvery move, in order (ms; out/back; the runs alternate which side goes first, ours in the odd ones):\n")
        w("\n".join(lines))


def md_checkpoint(w, r):
    ck = r.get("checkpoint")
    if not ck:
        return
    w("## 1c. Checkpoints against migrations\n")
    w("A `mosjob mem --mib N` job on a 2-node local cluster (shared image root, as in section 1). Each run takes "
      "one checkpoint (`mosctl checkpoint JOB`: a dump with `--leave-running`, sealed, into the job's checkpoint "
      "store) and then one migration to the other node (`mosctl migrate`), after one untimed warm-up run; before "
      "each, the previous move's images are gone. *Frozen* is what mosctl reports for each. *CRIU's memory "
      "write* is `memwrite_time` from CRIU's own `stats-dump` of the same dump: the time it took to write the "
      "job's pages into the image files while the job was frozen (the agents run with `MOSIX_KEEP_CRIU_LOGS=1` "
      "so that the moves' statistics stay). Median (min–max) in ms. " + bg_note(r, "checkpoint") + "\n")
    w("| Size | runs | checkpoint frozen | migration frozen | ratio | CRIU's memory write: checkpoint | migration |")
    w("|---|---|---|---|---|---|---|")
    every = []
    for mib, v in sorted(ck.items(), key=lambda kv: int(kv[0])):
        if "error" in v:
            w(f"| {mib} MiB | | failed: {v['error']} | | | | |")
            continue
        c, m = v["checkpoint_frozen_ms"], v["migration_frozen_ms"]
        cw, mw = v.get("checkpoint_memwrite_ms"), v.get("migration_memwrite_ms")
        w(f"| {mib} MiB | {c['n']} | {fmt_ms(c)} | {fmt_ms(m)} | **{med(c) / max(med(m), 1e-9):.2f}** | "
          f"{fmt_ms(cw) if cw else 'n/a'} | {fmt_ms(mw) if mw else 'n/a'} |")
        every.append(f"- {mib} MiB, checkpoint / migration frozen: "
                     + ", ".join(f"{a}/{b}" for a, b in zip(c["values"], m["values"])))
        if cw and mw and len(cw["values"]) == len(mw["values"]):
            every.append(f"- {mib} MiB, CRIU's memory write, checkpoint / migration: "
                         + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(cw["values"], mw["values"])))
        elif cw:
            every.append(f"- {mib} MiB, CRIU's memory write of each checkpoint: "
                         + ", ".join(f"{x:.0f}" for x in cw["values"]))
    w("")
    if every:
        w("Every run, in order (ms):\n")
        w("\n".join(every) + "\n")
    w("A checkpoint's frozen time is mostly CRIU writing the pages into new page-cache pages. On this VM the "
      "host takes freed memory back (virtio-balloon free page reporting), and the first touch of such memory is "
      "slow: the same 64 MiB of pages took CRIU 17 ms to write in one checkpoint and 459 ms in another (2026-12-05). That, not the agent, is "
      "what spreads the frozen times, so the phase takes enough runs for the median to hold.\n")


def md_crowded(w, r):
    cr = r.get("crowded")
    w("## 3b. Out of a crowded node\n")
    if not cr:
        w(f"Not measured: {r.get('errors', {}).get('crowded', 'phase not run')}\n")
        return
    w(f"A {cr['nodes']}-node local cluster, every node capped at {cr['caps'][0]} core. node1 runs {cr['hogs']} "
      "CPU-bound jobs started with `mosrun --pinned` (the balancer may not move them), so it is crowded all along. "
      f"**Crowded**: a small CPU-bound job (`{cr['job']}`, a few MiB of images) is started on node1 and "
      "`mos-balance serve --interval 1 --min-residence 1` (as in section 3) moves it off; its frozen time is the one "
      "the balancer logs (`…: frozen N ms`, the source agent's figure); then it is killed and the next one started. "
      "**Idle**: the same kind of job started on node2 or node3, left running for a moment, then moved to the other "
      "with `mosctl migrate` (no balancer): half of these moves before the crowded ones and half after, with node1 "
      "still crowded, so the only difference is the source node's load. p50/p95 are nearest-rank percentiles. "
      "The agents run with `RUST_LOG=info,mosix::agent=debug` (their step traces) and `MOSIX_KEEP_CRIU_LOGS=1` "
      "(CRIU's `stats-dump`/`stats-restore` survive the move). " + bg_note(r, "crowded") + "\n")
    c, i = cr.get("crowded_frozen_ms"), cr.get("idle_frozen_ms")
    if c and i:
        w("| Moves | n | frozen p50 | frozen p95 | min–max |")
        w("|---|---|---|---|---|")
        w(f"| off the crowded node (balancer) | {c['n']} | {c['p50']} ms | {c['p95']} ms | {c['min']}–{c['max']} ms |")
        w(f"| between idle nodes (`mosctl migrate`) | {i['n']} | {i['p50']} ms | {i['p95']} ms | {i['min']}–{i['max']} ms |")
        w(f"| ratio | | **{cr['ratio_p50']:.2f}** (goal ≤ 1.5) | **{cr['ratio_p95']:.2f}** (goal ≤ 2.5) | |")
        w("")
    w("Every move, in order (frozen ms; for the crowded ones also the target and how long after its start the "
      "balancer moved it):\n")
    w("- crowded: " + (", ".join(f"{m['frozen_ms']} (→{m['to']}, {m['moved_after_s']} s)" for m in cr.get("crowded", []))
                       or "none"))
    w("- idle: " + (", ".join(f"{m['frozen_ms']} ({m['from']}→{m['to']})" for m in cr.get("idle", [])) or "none"))
    if cr.get("failures"):
        w("- failures: " + "; ".join(f"`{f[:300]}`" for f in cr["failures"]))
    w("")
    cfs = cr.get("node1_cfs_during_crowded_moves")
    w("Noise: each crowded move starts at whatever moment the balancer's round falls, inside node1's CPU cap "
      "(10 ms CFS periods, 5 ms of quota each). The node's jobs run in its child cgroup `jobs` (cpu.shares 2) below "
      "the agent and CRIU; the job being dumped is lifted beside CRIU (its parasite runs in the job's threads), and "
      "for the dump the other jobs are squeezed to 1% of a core, so CRIU gets the node's quota nearly whole "
      "(`core::cgroup`, ARCHITECTURE.md \"Priorities on a crowded node\"). A period whose quota the crowd spent "
      "before the dump began still stalls it until the next one. That, and the rest of the machine's load, is the "
      "spread below; p95 of a dozen moves is close to their maximum."
      + (f" While the balancer moved jobs off it, node1's cgroup ran out of quota in {cfs['throttled_periods']} of "
         f"{cfs['periods']} periods (throttled {cfs['throttled_s']:.1f} s in {cfs['window_s']:.0f} s)." if cfs else "")
      + "\n")
    steps = cr.get("steps_median_ms") or {}
    if any(v.get("crowded") is not None or v.get("idle") is not None for v in steps.values()):
        w("**Where the frozen time goes** (median ms per step, from the timestamps of the agents' step traces: "
          "source and target agents log on the same host clock; the frozen clock starts right after *target "
          "answered* and stops at *target restored*; medians of the steps need not add up to the median of "
          "the whole):\n")
        w("| Step | crowded | idle | crowded − idle |")
        w("|---|---|---|---|")

        def n(x):
            return "n/a" if x is None else f"{x:.1f}"
        for lab, v in steps.items():
            d = (v["crowded"] - v["idle"]) if v.get("crowded") is not None and v.get("idle") is not None else None
            w(f"| {lab} | {n(v.get('crowded'))} | {n(v.get('idle'))} | {n(d)} |")
        w("")
    ck = cr.get("criu_median_ms") or {}
    if any(v.get("crowded") is not None for v in ck.values()):
        names = {"freezing_us": "dump: freezing the tree", "frozen_us": "dump: frozen (CRIU's own count)",
                 "memdump_us": "dump: memory dump", "memwrite_us": "dump: memory write",
                 "forking_us": "restore: forking", "restore_us": "restore: whole restore"}
        w("CRIU's own statistics of the same moves (`stats-dump`, `stats-restore`; median ms):\n")
        w("| CRIU stage | crowded | idle |")
        w("|---|---|---|")
        for k, v in ck.items():
            f = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
            w(f"| {names.get(k, k)} | {f(v.get('crowded'))} | {f(v.get('idle'))} |")
        w("")


def markdown(r, tg, pngs):
    meta = r.get("meta", {})
    L = []
    w = L.append
    started = datetime.datetime.fromtimestamp(meta.get("started_unix", 0)).strftime("%Y-%m-%d %H:%M")
    total = sum(r.get("durations_s", {}).values())
    w("# mosix benchmarks\n")
    w(f"Generated by `make bench` (scripts/bench.sh → bench/bench.py, bench/report.py, `mosbench`) on {started}; "
      f"machine: {meta.get('cpus')} cores, {meta.get('mem_gib')} GiB, kernel {meta.get('kernel')}; "
      f"CRIU: {meta.get('criu_version', '?')}. Benchmark phases took {total:.0f} s "
      f"(plus the release build). Raw numbers: `bench-results/results.json`.\n")
    bg = r.get("background", {})
    busy = {k: v.get("busy_cores") for k, v in bg.items()}
    if any((v or 0) > 0.2 for v in busy.values()):
        w(f"> **Machine was not idle.** CPU cores busy just before each phase (other processes): "
          + ", ".join(f"{k} {v}" for k, v in busy.items())
          + ". Other activity competes for the same 2 cores; timing-sensitive results (balancing makespan, "
          "migration times) are affected. Top CPU users at the start of the run are listed at the end.\n")
    if r.get("errors"):
        w("> **Phases that failed:** " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()) + "\n")

    w("## Targets\n")
    w("| Area | Target | Measured | Goal | Result |")
    w("|---|---|---|---|---|")
    for t in tg:
        note = f" — {t['note']}" if t["note"] else ""
        w(f"| {t['area']} | {t['target']} | {t['measured']}{note} | {t['goal']} | **{t['result']}** |")
    npass = sum(t["result"] == "PASS" for t in tg)
    w(f"\n{npass} of {sum(t['result'] != 'INFO' for t in tg)} targets pass (INFO rows are measurements without a target).\n")

    # 1
    mig = r.get("migration", {})
    w("## 1. Migration vs bare CRIU\n")
    w("A `mosjob mem --mib N` process (N MiB allocated and dirtied, then idle) on a 2-node local cluster "
      "(`mosctl local up --name bench --nodes 2`, mTLS, shared image root `criu-images/bench` on the same disk). "
      "**Ours** = wall clock around `mosctl migrate JOB NODE` (CLI start, TLS connection, dump with page hashing alongside, HMAC manifest, "
      "restore RPC, manifest check, CRIU restore with page verification alongside, registry confirm); *frozen* is what mosctl reports. "
      "**Bare** = `criu dump -t PID -D DIR` in the source node's netns then `criu restore -D DIR -d` in the target's, on the same "
      "process tree `mosrun` makes (`mosix-init 0 0 DIR -- mosjob mem --mib N`: the job's init and the command under it, "
      "the init of its own pid namespace and session, started with `nsenter --net … unshare --pid --fork setsid`), "
      f"images under `criu-images/bench-bare/` (same file system), with the same options our agent passes over RPC "
      f"(`{' '.join(meta.get('bare_criu_options', []))}`) and at the same CPU priority as the agent's CRIU workers (nice -10). Each run is a round trip node1 → node2 → node1 per side, "
      "and both legs count (*moves* = 2 × runs per side). Each timed move starts with the previous move's images "
      "deleted: bare images are deleted synchronously, untimed; the agent deletes ours on a background thread "
      "after replying, and the bench waits for that before timing the next move. Runs alternate which of the two goes first, "
      "after one untimed round trip per side (this VM's balloon returns freed memory to the host, and the first "
      "touch of it is slow: whichever side moved first in a run was seen to take 2-3x as long for its first 1 GiB move). "
      "Numbers are median (min–max) in ms.\n")
    sizes = mig.get("sizes", [])
    if sizes:
        w("| Size | moves | ours frozen | ours total (wall) | bare dump | bare restore | bare total | ratio ours/bare |")
        w("|---|---|---|---|---|---|---|---|")
        for s in sizes:
            w(f"| {s['mib']} MiB | {s.get('moves', s['runs'])} | {fmt_ms(s['ours_frozen_ms'])} | {fmt_ms(s['ours_wall_ms'])} | "
              f"{fmt_ms(s['bare_dump_ms'])} | {fmt_ms(s['bare_restore_ms'])} | {fmt_ms(s['bare_total_ms'])} | "
              f"**{s['ratio_total']:.2f}** |")
        w("\nWhere our extra time goes (diagnostics, medians in ms). *Hash pages* and *verify* are "
          "`mosbench seal` on the bare run's own images (the agent's `security::manifest` code, BLAKE3 + HMAC): "
          "the CPU time that sealing needs per move on each side. The agent does it off the critical path "
          "(hashing while CRIU writes; verifying while CRIU restores, gated at CRIU's pre-resume), so on an idle "
          "multi-core node it costs no frozen time; on this 2-core machine it competes with CRIU and its "
          "parasite for the second core.\n")
        w("| Size | ours total − bare total | hash pages (CPU) | verify (CPU) | ours frozen / bare total | ours node1→node2 / back | bare node1→node2 / back |")
        w("|---|---|---|---|---|---|---|")
        for s in sizes:
            gap = med(s["ours_wall_ms"]) - med(s["bare_total_ms"])
            se, ve = (med(s.get(k)) for k in ("seal_cpu_ms", "verify_cpu_ms"))
            n = lambda x: "n/a" if x is None else f"{x:.0f}"  # noqa: E731
            w(f"| {s['mib']} MiB | {gap:.0f} | {n(se)} | {n(ve)} | {s['ratio_frozen']:.2f} | "
              f"{n(med(s.get('ours_out_wall_ms')))} / {med(s['ours_back_wall_ms']):.0f} | "
              f"{n(med(s.get('bare_out_total_ms')))} / {med(s['bare_back_total_ms']):.0f} |")
        md_memwrite(w, sizes)
        uns = mig.get("unsealed", [])
        if uns:
            w("\n**Diagnostic: the same moves with sealing off** (`mosctl local up --unsealed-images`: no image key, "
              "so nothing is hashed; not a mode for real use). Same procedure, bare CRIU measured again in the "
              "same loop:\n")
            w("| Size | moves | ours total (wall), sealing off | bare total | ratio, sealing off | ratio with sealing (table above) |")
            w("|---|---|---|---|---|---|")
            sealed = {x["mib"]: x for x in sizes}
            for u in uns:
                sr = sealed.get(u["mib"])
                w(f"| {u['mib']} MiB | {u.get('moves', u['runs'])} | {fmt_ms(u['ours_wall_ms'])} | {fmt_ms(u['bare_total_ms'])} | "
                  f"**{u['ratio_total']:.2f}** | {sr['ratio_total']:.2f} |" if sr else
                  f"| {u['mib']} MiB | {u['runs']} | {fmt_ms(u['ours_wall_ms'])} | {fmt_ms(u['bare_total_ms'])} | "
                  f"**{u['ratio_total']:.2f}** | n/a |")
        elif mig.get("unsealed_error"):
            w(f"\nSealing-off diagnostic failed: {mig['unsealed_error']}\n")
        w("")
        if any(p.name == "migration.png" for p in pngs):
            w(f"![migration vs bare CRIU]({os.path.relpath(OUT / 'migration.png', MD.parent)})\n")
        else:
            w("```")
            rows = []
            for s in sizes:
                rows += [(f"{s['mib']} MiB ours total", med(s["ours_wall_ms"])),
                         (f"{s['mib']} MiB bare total", med(s["bare_total_ms"]))]
            w(ascii_bars(rows))
            w("```\n")
    else:
        w(f"Not measured: {r.get('errors', {}).get('migration', 'phase not run')}\n")

    md_noshared(w, r)
    md_checkpoint(w, r)

    # 2
    w("## 2. Post-copy\n")
    pc = r.get("post_copy")
    if pc is None:
        w("Not measured.\n")
    elif not pc.get("available"):
        w(f"`mosctl migrate --post-copy` refuses: `{pc.get('error', '')}`. Post-copy is **not implemented**; "
          "both post-copy targets are recorded as MISS.\n")
    else:
        w("Post-copy (`mosctl migrate --post-copy`): the source dumps everything but memory and serves the "
          "pages from CRIU's page server; the target starts CRIU's lazy-pages daemon and restores at once; "
          "pages follow on demand (userfaultfd) and in the background. *Frozen* is from the start of the "
          "dump until the job runs on the target; *total* until the last page arrived. Bare CRIU does the "
          "same with the plain CLI (`criu dump --lazy-pages`, `criu lazy-pages`, `criu restore --lazy-pages`) "
          "on a twin process.\n")
        w("| Size | ours: frozen | ours: total | bare CRIU: frozen | bare CRIU: total |")
        w("|---|---|---|---|---|")
        for k in sorted((k for k in pc if k.isdigit()), key=int):
            d = pc.get(k) or {}
            if "frozen_ms" in d:
                bf = fmt_ms(d["bare_frozen_ms"]) if "bare_frozen_ms" in d else "–"
                bt = fmt_ms(d["bare_total_ms"]) if "bare_total_ms" in d else "–"
                w(f"| {k} MiB | {fmt_ms(d['frozen_ms'])} | {fmt_ms(d['total_ms'])} | {bf} | {bt} |")
            else:
                w(f"| {k} MiB | failed: {d.get('error', '?')} | | | |")
        w("")
        if (OUT / "frozen.png").exists():
            w(f"![frozen time against memory size]({os.path.relpath(OUT / 'frozen.png', MD.parent)})\n")

    # 3
    b = r.get("balance", {})
    w("## 3. Balancing quality\n")
    if "ratio_to_ideal" in b:
        w(f"K = {b['k']} CPU-bound jobs (`mosjob burn --work {b['units']}`, {b['t_single_s']:.1f} s alone on an uncapped core) "
          f"started on node1 of a {b['nodes']}-node local cluster with CPU caps {','.join(map(str, b['caps']))} "
          f"(total {sum(b['caps']):g} cores = the machine). Makespan = from the first `mosrun` until the last job's final output "
          "(its stdout mtime; every job confirmed `exited`). Balanced case: `mos-balance serve --interval 1 --min-residence 1`. "
          f"Ideal = K × t_single ÷ total cores = {b['k']} × {b['t_single_s']:.1f} ÷ {sum(b['caps']):g} = {b['ideal_s']:.1f} s.\n")
        w("| Case | makespan | vs ideal | migrations | first job done | last job done | CPU the cluster got (avg cores) | CPU busy outside the cluster (avg cores) |")
        w("|---|---|---|---|---|---|---|---|")
        w(f"| ideal | {b['ideal_s']:.1f} s | 1.00 | – | – | – | {sum(b['caps']):g} | 0 |")
        for key, label in (("balanced", "with balancer"), ("no_balance", "no balancing")):
            c = b[key]
            cpu = c.get("cpu", {})
            w(f"| {label} | {c['makespan_s']:.1f} s | {c['makespan_s'] / b['ideal_s']:.2f} | {c['migrations']} | "
              f"{c['job_end_s'][0]:.1f} s | {c['job_end_s'][-1]:.1f} s | {cpu.get('cluster_cores', float('nan')):.2f} | "
              f"{cpu.get('outside_cluster_cores', float('nan')):.2f} |")
        fz = b["balanced"].get("balancer_frozen_ms")
        if fz:
            w(f"\nFrozen time of the balancer's {len(fz)} migrations (ms, in order): {', '.join(map(str, fz))}. "
              "A burn job's images are only a few MiB; compare with the 64 MiB row of section 1 (uncapped nodes). "
              "The agent and CRIU run inside the node's capped cgroup, so on a saturated 0.5-core node they compete "
              "with the jobs they are moving; the agent, its CRIU workers and the job being dumped (whose threads run "
              "CRIU's parasite) run at nice -10, above the jobs (ARCHITECTURE.md, \"Priorities on a crowded node\").")
        sp = b["balanced"].get("spread_evenly_after_s")
        if sp is not None:
            w(f"\nWith the balancer, all {b['k']} jobs were spread evenly (at most one job difference between nodes) "
              f"{sp:.1f} s after they were started.")
        bc = b["balanced"].get("cpu", {})
        if bc and bc.get("outside_cluster_cores", 0) > 0.2:
            w(f"\n**Caveat:** during the balanced run the cluster's node cgroups got only {bc['cluster_cores']:.2f} cores "
              f"on average (caps allow {sum(b['caps']):g}), because {bc['outside_cluster_cores']:.2f} cores were busy outside "
              "the cluster (other processes on this machine, plus the balancer and the benchmark's own polling). The ideal "
              "assumes the full 2 cores, so this makespan is inflated by the machine's other load, not only by balancing.")
        w(f"\nSpeedup from balancing: {b['speedup']:.2f} (goal ≥ {0.8 * b['nodes']:.1f}; the best possible here is "
          f"{b['no_balance']['makespan_s'] / b['ideal_s']:.2f} = no-balance ÷ ideal).\n")
        if any(p.name == "balance.png" for p in pngs):
            w(f"![running jobs per node over time]({os.path.relpath(OUT / 'balance.png', MD.parent)})\n")
        else:
            w("```")
            w(ascii_bars([("ideal", b["ideal_s"]), ("with balancer", b["balanced"]["makespan_s"]),
                          ("no balancing", b["no_balance"]["makespan_s"])]))
            w("```\n")
    else:
        w(f"Not measured: {r.get('errors', {}).get('balance', 'phase not run')}\n")

    md_crowded(w, r)

    # 4
    w("## 4. Control plane\n")
    cases = r.get("plan", {}).get("cases", [])
    if cases:
        w("### 4a. Policy planning time (`balancer::policy::plan`, in-process, median of "
          f"{len(cases[0]['runs_ms'])} runs)\n")
        w("Synthetic clusters of 10,000 nodes (capacities 1/2/4/8) and 100,000 jobs: *hot-10pct* piles all jobs on "
          "1,000 nodes (100 each, much to move); *spread* puts 10 jobs on every node. *default* is the config a balancer "
          "round uses (at most 64 moves per plan); *unlimited-moves* lifts that cap. Nodes without jobs get a random "
          "background load of 0–3 cores, so the least loaded node is near 0 and the max/min imbalance stays huge; "
          "it is shown only to confirm the plan improves it.\n")
        w("| Shape | Config | median (wall) | min–max | median thread CPU | moves | imbalance before → after |")
        w("|---|---|---|---|---|---|---|")
        for c in cases:
            cpu = f"{c['cpu_median_ms']:.1f} ms" if c.get("cpu_median_ms") is not None else "n/a"
            w(f"| {c['shape']} | {c['config']} | {c['median_ms']:.1f} ms | {c['min_ms']:.1f}–{c['max_ms']:.1f} ms | {cpu} | "
              f"{c['moves']} | {imb(c['imbalance_before'])} → {imb(c['imbalance_after'])} |")
        w("")
    rd = r.get("round", {})
    if rd:
        w("### 4b. One balancer round against 1,000 agents\n")
        w("`mosbench sim-agents` serves the real `mosix.v1.Agent` gRPC API from 1,000 listeners on 127.0.0.1 in one "
          "process (GetLoad returns a NodeLoad with per-job usage, ListJobs the cluster's jobs, everything else is "
          "Unimplemented; 10 jobs per node on average, every 10th node 3× loaded, 11,000 jobs). `mosbench round`, a "
          "separate process, runs `view::poll(cluster, tls, 2 s)` + `snapshot` + `policy::plan` — a balancer round "
          "without migrations — and measures wall time and its own CPU time (getrusage, all threads). "
          "**≤ 10% of a core is read as CPU-seconds per round ÷ 3 s (the default `mos-balance serve --interval`) ≤ 0.10.** "
          "Both processes share the machine's 2 cores, so the agents' server-side work competes with the round. "
          "`poll` opens a new connection to every agent each round (and a second one for ListJobs), so with mTLS every "
          "round pays 1,000+ TLS handshakes.\n")
        w("| Transport | agents | jobs | rounds | wall median (min–max) | CPU median (min–max) | CPU ÷ 3 s |")
        w("|---|---|---|---|---|---|---|")
        for v, d in rd.items():
            w(f"| {v} | {d['agents']} | {d['rounds'][0]['jobs']} | {len(d['rounds'])} | "
              f"{d['wall_median_s']:.3f} s ({d['wall_min_s']:.3f}–{d['wall_max_s']:.3f}) | "
              f"{d['cpu_median_s']:.3f} s ({d['cpu_min_s']:.3f}–{d['cpu_max_s']:.3f}) | "
              f"{100 * d['cpu_fraction_of_interval']:.1f}% |")
        w("")
    sc = r.get("round_scale") or []
    if sc:
        w("### 4b'. Push vs poll at 100, 1,000 and 10,000 agents (mTLS)\n")
        w("The same simulated agents (one `mosbench sim-agents` process, mTLS, 10 jobs per node on average; "
          f"{sc[0].get('churn_pct', 1)}% of the nodes' loads move by 15–50% of capacity each second, so the feeds carry "
          "reports, not only heartbeats). **push** is `mos-balance serve`'s default: `mosbench round --feed` follows every "
          "agent's `WatchLoad` stream (`balancer::feed`, the agents' own `agent::loadfeed` code) and every 3 s plans "
          "straight from the latest reports; *round* is taking the view and planning, *CPU* is the balancer process's "
          "over the whole 3 s interval, receiving reports included, once the feeds are open (opening them is shown "
          "apart). **poll** is `serve --poll` and the one-shot tools: GetLoad from every agent plus one ListJobs per round "
          "(CPU per round ÷ 3 s). Both processes share the machine's 2 cores.\n")
        w("| agents | mode | agents up (min) | round median (min–max) | CPU per interval median (min–max) | ÷ 3 s | reports / heartbeats per interval | opening the feeds |")
        w("|---|---|---|---|---|---|---|---|")
        for d in sorted(sc, key=lambda d: (d["agents"], not d.get("push"))):
            rp = "—"
            op = "—"
            if d.get("push"):
                rs = d["rounds"]
                rp = f"{statistics.median([x['reports'] for x in rs]):.0f} / {statistics.median([x['heartbeats'] for x in rs]):.0f}"
                op = f"{d['open_s']:.1f} s, {d['open_cpu_s']:.2f} CPU-s"
            w(f"| {d['agents']} | {'push' if d.get('push') else 'poll'} | {d['agents_up_min']} | "
              f"{d['wall_median_s']:.4f} s ({d['wall_min_s']:.4f}–{d['wall_max_s']:.4f}) | "
              f"{d['cpu_median_s']:.3f} s ({d['cpu_min_s']:.3f}–{d['cpu_max_s']:.3f}) | "
              f"{100 * d['cpu_fraction_of_interval']:.1f}% | {rp} | {op} |")
        w("")
        if (OUT / "control_plane.png").exists():
            w("![round time and balancer CPU against agents](bench-results/control_plane.png)\n")
    idle = r.get("idle", {}).get("procs", [])
    if idle:
        w("### 4c. Idle `mosixd`\n")
        w("Both agents of the freshly started, empty 2-node cluster; utime+stime from /proc/PID/stat over the window, "
          f"VmRSS sampled every 0.5 s (clock tick {1000 / r['idle'].get('hz', 100):.0f} ms).\n")
        w("| pid | window | CPU | % of a core | RSS (max) | threads |")
        w("|---|---|---|---|---|---|")
        for p in idle:
            w(f"| {p['pid']} | {p['wall_s']:.0f} s | {p['cpu_s']:.2f} s | {p['cpu_pct_of_core']:.3f}% | "
              f"{p['rss_max_mib']:.1f} MiB | {p['threads']} |")
        w("")

    kernel_report.markdown(w)

    # Sections written by hand (mosgw, node loss) come from other targets'
    # runs; regenerating this file must not drop them.
    for sec in hand_written_sections():
        w(sec)

    w("## Notes\n")
    w("- Everything runs on one 2-core VM: the \"cluster\" nodes are network namespaces with cgroup CPU caps; "
      "migrations go through the page cache of one disk, so these are CPU/memory-bandwidth numbers, not network numbers.")
    w("- Run durations per phase (s): " + ", ".join(f"{k} {v}" for k, v in r.get("durations_s", {}).items()) + ".")
    if bg:
        first = next(iter(bg.values()))
        w("- Top CPU users (ps, lifetime %CPU) when the first phase started:")
        for line in first.get("top", []):
            w(f"    - `{line}`")
        oc = sorted({c for v in bg.values() for c in v.get("other_clusters", [])})
        if oc:
            w(f"- Other local mosix clusters were up during the run (other sessions' tests): {', '.join(oc)}.")
    w("")
    return "\n".join(L)


def main():
    global RESULTS, MD, OUT
    if len(sys.argv) > 1:  # report.py RESULTS.json [OUT.md] (for trying it on other results)
        RESULTS = Path(sys.argv[1])
        OUT = RESULTS.parent
        MD = Path(sys.argv[2]) if len(sys.argv) > 2 else OUT / "BENCHMARKS.md"
    r = json.loads(RESULTS.read_text())
    tg = targets(r)
    r["targets"] = tg
    r["targets_passed"] = sum(t["result"] == "PASS" for t in tg)
    r["targets_total"] = sum(t["result"] != "INFO" for t in tg)
    pngs = plots(r)
    r["plots"] = [os.path.relpath(p, ROOT) for p in pngs]
    RESULTS.write_text(json.dumps(r, indent=2))
    MD.write_text(markdown(r, tg, pngs))
    # Summary
    print()
    print("=" * 100)
    print("mosix benchmark summary (details: BENCHMARKS.md, raw: bench-results/results.json)")
    print("=" * 100)
    for t in tg:
        print(f"{t['result']:<5} {t['area']:<14} {t['target']}")
        print(f"{'':<20} measured {t['measured']}   goal {t['goal']}" + (f"   ({t['note']})" if t["note"] else ""))
    print("-" * 100)
    print(f"{r['targets_passed']} of {r['targets_total']} targets pass")
    sizes = r.get("migration", {}).get("sizes", [])
    if sizes:
        print("\nmigration (median ms)   ours frozen  ours total   bare dump  bare restore  bare total  ratio")
        for s in sizes:
            print(f"  {s['mib']:>5} MiB            {med(s['ours_frozen_ms']):>9.0f}  {med(s['ours_wall_ms']):>10.0f}  "
                  f"{med(s['bare_dump_ms']):>10.0f}  {med(s['bare_restore_ms']):>12.0f}  {med(s['bare_total_ms']):>10.0f}  "
                  f"{s['ratio_total']:>5.2f}")
    b = r.get("balance", {})
    if "ratio_to_ideal" in b:
        print(f"\nbalancing: ideal {b['ideal_s']:.1f} s, with balancer {b['balanced']['makespan_s']:.1f} s, "
              f"no balancing {b['no_balance']['makespan_s']:.1f} s, speedup {b['speedup']:.2f}")
    if pngs:
        print("plots: " + ", ".join(os.path.relpath(p, ROOT) for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
