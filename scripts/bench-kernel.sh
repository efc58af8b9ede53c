#!/usr/bin/env bash
# make bench-kernel (also run by make bench): the article's experiment,
# measured — a tinyconfig kernel build with plain make on node1 alone vs
# mosmake over 4 capped nodes, the per-start overhead of mosrun --best, and
# the skew of a 16-way burst (bench/kernel.py; numbers go to
# bench-results/kernel.json, then bench/report.py rewrites BENCHMARKS.md).
#
# Needs root. Takes about 12-15 minutes on a 2-core machine (the build on
# node1 alone, capped at 0.6 cores, is most of it). Everything it starts is
# torn down at the end, also on error or Ctrl-C: the `kbench` local cluster
# (its namespaces and cgroups hold every process of the builds) and the
# kernel tree on its shared path.
#
# Knobs (environment): KBENCH_ARGS="..." (more bench/kernel.py flags, e.g.
# --phases starts,burst to skip the kernel build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
M=$ROOT/target/release
NAME=kbench
# shellcheck source=scripts/kernel-lib.sh
. "$ROOT/scripts/kernel-lib.sh"

if [ "$(id -u)" != 0 ]; then
  echo "bench-kernel: must run as root (local clusters need network namespaces, cgroups and CRIU)" >&2
  exit 1
fi
for b in mosctl mosrun mosixd mosmake mosmake-sh; do
  if [ ! -x "$M/$b" ]; then
    echo "bench-kernel: $M/$b is missing; building release binaries" >&2
    cargo build --release --bins
    break
  fi
done

cleanup() {
  local rc=$?
  kernel_stash "$ROOT/criu-images/$NAME/src"
  "$M/mosctl" local down --name "$NAME" >/dev/null 2>&1 || true
  if ip netns list 2>/dev/null | grep -q "^mos-$NAME-"; then
    echo "bench-kernel: WARNING: namespaces of cluster $NAME survived teardown" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kernel_deps
kernel_tarball
start=$(date +%s)
rc=0
# shellcheck disable=SC2086
python3 bench/kernel.py ${KBENCH_ARGS:-} || rc=$?
python3 bench/report.py >/dev/null || true
python3 - <<'PY'
import json
k = json.load(open("bench-results/kernel.json"))
r = json.load(open("bench-results/results.json"))
for t in r.get("targets", []):
    if t["area"] in ("kernel build", "placement"):
        print(f"{t['result']:<5} {t['target']}\n      measured {t['measured']}   goal {t['goal']}")
PY
echo "bench-kernel.sh took $(($(date +%s) - start)) s"
exit "$rc"
