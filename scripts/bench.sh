#!/usr/bin/env bash
# make bench: migration vs bare CRIU (with and without a shared path),
# post-copy, balancing quality, moves off a crowded node, checkpoints and
# control-plane scale, side by side in one run.
#
#   bench/bench.py   runs the phases and writes bench-results/results.json
#   bench/report.py  adds PASS/MISS per target, writes BENCHMARKS.md and the
#                    plots in bench-results/, prints the summary
#   mosbench         (src/bin/mosbench.rs) the Rust parts: policy planning time,
#                    1,000 simulated agents, one balancer round, idle sampling
#
# Needs root (local clusters use network namespaces, cgroups and CRIU). Takes
# about 13-16 minutes on a 2-core machine (noshared and crowded add ~3-4).
# Everything it starts is torn down at the end, also on error or Ctrl-C: the
# `bench` local cluster, the simulated agents, the balancer, bare-CRIU
# processes (page servers too) and their images.
#
# Knobs (environment): BENCH_PHASES=plan,round,scale,migration,balance,checkpoint,noshared,crowded
#                      BENCH_SIZES=64x20,256x16,1024x12  (MiB x round trips)
#                      BENCH_ARGS="..."                (more bench.py flags, e.g.
#                        --noshared-sizes 64x8,1024x4 --crowded-moves 12)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
M=$ROOT/target/release
NAME=bench
RUN=$ROOT/bench-results/run
BUDGET_S=$((20 * 60))
start=$(date +%s)

if [ "$(id -u)" != 0 ]; then
  echo "bench: must run as root (local clusters need network namespaces, cgroups and CRIU)" >&2
  exit 1
fi
for b in mosctl mosrun mosixd mosjob mos-balance mosbench; do
  if [ ! -x "$M/$b" ]; then
    echo "bench: $M/$b is missing; building release binaries" >&2
    cargo build --release --bins
    break
  fi
done

cleanup() {
  local rc=$?
  # Everything the driver started (it records each pid); only kill a pid that
  # still runs one of our programs, in case the number was reused.
  if [ -f "$RUN/pids" ]; then
    while read -r p; do
      [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] || continue
      if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qE 'mosbench|mos-balance|mosjob|unshare|criu'; then
        kill -KILL "$p" 2>/dev/null || true
      fi
    done <"$RUN/pids"
    rm -f "$RUN/pids"
  fi
  "$M/mosctl" local down --name "$NAME" >/dev/null 2>&1 || true
  rm -rf "$ROOT/criu-images/bench-bare"
  if ip netns list 2>/dev/null | grep -q "^mos-$NAME-"; then
    echo "bench: WARNING: namespaces of cluster $NAME survived teardown:" >&2
    ip netns list | grep "^mos-$NAME-" >&2 || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Debris of an earlier run that was killed hard.
"$M/mosctl" local down --name "$NAME" >/dev/null 2>&1 || true
mkdir -p "$RUN"
rm -f "$RUN/pids"

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "== matplotlib not found; trying pip install (plots fall back to ASCII if this fails)"
  python3 -m pip install -q matplotlib >/dev/null 2>&1 || pip install -q matplotlib >/dev/null 2>&1 || true
fi

echo "== mosix benchmarks (results: bench-results/results.json, summary: BENCHMARKS.md)"
bench_rc=0
# shellcheck disable=SC2086
python3 bench/bench.py \
  --phases "${BENCH_PHASES:-plan,round,scale,migration,balance,checkpoint,noshared,crowded}" \
  --sizes "${BENCH_SIZES:-64x20,256x16,1024x12}" \
  ${BENCH_ARGS:-} || bench_rc=$?

python3 bench/report.py

elapsed=$(($(date +%s) - start))
echo
echo "bench.sh took ${elapsed} s (budget for all of make bench: ${BUDGET_S} s)"
if [ "$elapsed" -gt "$BUDGET_S" ]; then
  echo "bench: WARNING: over the 20-minute budget" >&2
fi
if [ "$bench_rc" != 0 ]; then
  echo "bench: some phases failed (see 'errors' in bench-results/results.json)" >&2
  exit "$bench_rc"
fi
