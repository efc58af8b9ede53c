#!/usr/bin/env python3
"""How sure a ratio of two medians is, over a handful of noisy rounds.

Usage: ratio-ci.py REF "v1 v2 ..." NAME "v1 v2 ..." [NAME "..." ...]

For each NAME, prints the ratio of its median to REF's median, and a 90%
bootstrap interval of that ratio: both groups' rounds resampled with
replacement (4000 times, a fixed seed so a results file can be checked
again), the 5th and 95th percentiles of the resampled ratios.

Why: on this VM one round of a proxy can land 10% off the others because of
what the scheduler did meanwhile (BENCHMARKS.md 22), so a median of five
rounds moves from run to run by more than the gap between two proxies that
are equally good. The interval says how far it can move: a target such as
"no lower" is missed for certain only when the whole interval is below 1.
"""

import random
import statistics
import sys


def interval(ref, vals, n=4000, seed=1):
    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        r = statistics.median(rng.choices(ref, k=len(ref)))
        v = statistics.median(rng.choices(vals, k=len(vals)))
        if r > 0:
            ratios.append(v / r)
    ratios.sort()
    if not ratios:
        return None
    return ratios[int(0.05 * len(ratios))], ratios[int(0.95 * len(ratios)) - 1]


def describe(ref, vals):
    """ "1.003x   90% interval 0.971-1.037": the ratio of the medians, and how
    far it could move."""
    ci = interval(ref, vals)
    span = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "n/a"
    return f"{statistics.median(vals) / statistics.median(ref):.3f}x   90% interval {span}"


def parse(s):
    return [float(x) for x in s.replace(",", " ").split() if float(x) > 0]


def main(argv):
    if len(argv) < 4 or len(argv) % 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    ref_name, ref = argv[0], parse(argv[1])
    if not ref:
        print(f"# no rounds of {ref_name} to compare with")
        return 0
    for name, s in zip(argv[2::2], argv[3::2]):
        vals = parse(s)
        if not vals:
            print(f"{name:<26} vs {ref_name}: no rounds")
            continue
        print(f"{name:<26} vs {ref_name}: {describe(ref, vals)} ({len(vals)} and {len(ref)} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
