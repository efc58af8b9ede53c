#!/usr/bin/env python3
"""Text summary of bench-results/failover.json (make failover), with the
issue-16 targets marked PASS or MISS. Every run's value is shown."""

import json
import sys


def fmt(xs, unit="s", nd=1):
    return ", ".join(f"{x:.{nd}f}" for x in xs) + f" {unit}"


def mark(ok):
    return "PASS" if ok else "MISS"


def main(path):
    r = json.load(open(path))
    m = r.get("meta", {})
    print(f"mosix failover benchmark: kernel {m.get('kernel')}, {m.get('cpus')} CPUs, "
          f"load at start {m.get('loadavg_start')}, other clusters {m.get('others_running_at_start')}")
    for k, v in (r.get("errors") or {}).items():
        print(f"PHASE {k} FAILED: {v}")
    d = r.get("deaths")
    if d and d.get("detected_s"):
        rs = d["rounds"]
        print(f"\n## A node dies (all its processes at once), default lease (TTL 10 s, margin 3 s): "
              f"{len(rs)} deaths, a {d['mib']} MiB job checkpointed every {d['interval_s']:g} s")
        print(f"lease expired in etcd:  {fmt([x['lease_expired_s'] or 0 for x in rs])}")
        print(f"detected by the leader: {fmt([x['detected_s'] or 0 for x in rs])}")
        print(f"job running elsewhere:  {fmt([x['running_s'] for x in rs])}")
        print(f"work lost:              {fmt([x['work_lost_s'] for x in rs])} "
              f"(bound: interval + checkpoint time, {fmt([x['bound_s'] for x in rs], nd=2)})")
        det, run = d["detected_s"], d["running_s"]
        print(f"- detection p99 {det['p99']:.1f} s (target <= 16 s): {mark(det['p99'] <= 16)}")
        print(f"- running again p99 {run['p99']:.1f} s, max {run['max']:.1f} s (target <= 25 s): "
              f"{mark(run['max'] <= 25)}")
        print(f"- work lost within interval + checkpoint time in {d['work_lost_within_bound']}/{len(rs)} "
              f"deaths: {mark(d['work_lost_within_bound'] == len(rs))}")
        print(f"- counter contiguous after every restart: {mark(d['ticks_ok'])}")
        print("  (Kubernetes evicts after about 350 s; Slurm marks a node down after 300 s.)")
    f = r.get("faults")
    if f and "count" in f:
        print(f"\n## Injected faults: {f['count']} (lease TTL {f['ttl_s']:g} s, margin {f['margin_s']:g} s; "
              f"4 nodes, 3 etcd members, 2 balancers, 3 checkpointed counters)")
        for k, v in f["by_kind"].items():
            print(f"  {k:18} {v['n']:4}   with an error (see failover.json): {v['errors']}")
        print(f"- copies of a job seen at once, max per job: {list(f['max_copies'].values())}; "
              f"samples with a duplicate: {f['duplicate_samples']}")
        print(f"- faults after which a counter had a gap or a repeat: {f['ticks_broken']}")
        print(f"- jobs lost: {len(f['jobs_lost'])}; stale writes refused (agents' logs): "
              f"{f['refused_writes_logged']}")
        if f.get("settled_s"):
            s = f["settled_s"]
            print(f"- settled after a fault: median {s['median']:.1f} s, max {s['max']:.1f} s")
        ok = f["count"] >= 200 and f["duplicate_samples"] == 0 and f["ticks_broken"] == 0
        print(f"- zero duplicates over >= 200 faults: {mark(ok)}")
    c = r.get("checkpoint")
    if c:
        print("\n## Frozen time: one checkpoint (job keeps running) vs one migration of the same job")
        for mib, v in c.items():
            if "error" in v:
                print(f"  {mib} MiB: FAILED: {v['error']}")
                continue
            ck, mv = v["checkpoint_frozen_ms"], v["migration_frozen_ms"]
            print(f"  {mib} MiB: checkpoint {ck['values']} ms (median {ck['median']}), "
                  f"migration {mv['values']} ms (median {mv['median']}): "
                  f"{mark(ck['median'] <= mv['median'])}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-results/failover.json")
