#!/usr/bin/env bash
# make demo: the Linux Journal experiment on one machine.
#
# A 4-node local cluster with unequal CPU caps (0.75, 0.5, 0.5, 0.25 cores).
# Eight CPU-bound jobs start on node1, as the kernel compile started on node 14;
# the balancer spreads them, and the load view is shown along the way, like the
# article's Figures 3 to 6. Everything is torn down at the end, also on error.
# SHARED_OVER=sshfs serves the cluster's shared path over sshfs from a
# file-server namespace (a real network file system) instead of binding it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Absolute: an agent started through the sshfs wrapper does not run in this
# directory, and resolves a relative command against its own.
M=$PWD/target/debug
NAME=demo
JOBS=${JOBS:-8}
export MOSIX_CLUSTER=/run/mosix/$NAME/cluster.json
BAL_PID=""

cleanup() {
  [ -n "$BAL_PID" ] && kill "$BAL_PID" 2>/dev/null && wait "$BAL_PID" 2>/dev/null || true
  $M/mosctl local down --name $NAME >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

$M/mosctl local down --name $NAME >/dev/null 2>&1 || true
echo "== Bringing up 4 nodes with CPU caps 0.75, 0.5, 0.5, 0.25 cores (shared path over ${SHARED_OVER:-local})"
$M/mosctl local up --name $NAME --nodes 4 --cpu-caps 0.75,0.5,0.5,0.25 --shared-over "${SHARED_OVER:-local}"

echo
echo "== Starting $JOBS CPU-bound jobs on node1 (like the kernel compile started on node 14)"
for _ in $(seq "$JOBS"); do
  $M/mosrun -d --node node1 -- $M/mosjob burn 2>/dev/null | tr '\n' ' '
done
echo
sleep 3
echo
echo "== Figure 3: all the load is on node1"
$M/mosmon --once

echo
echo "== Starting the balancer (mos-balance serve, a round every 2 s)"
$M/mos-balance serve --interval 2 --min-residence 2 >/run/mosix/$NAME/balancer.log 2>&1 &
BAL_PID=$!
start=$(date +%s.%N)

imbalance() {
  $M/mos-balance --dry-run --json --min-residence 1000000 2>/dev/null \
    | python3 -c '
import json, sys
d = json.load(sys.stdin)
v = d["plan"]["imbalance_before"]
# A node that did not answer is not balanced, whatever the others show.
down = [n["name"] for n in d["nodes"] if not n["up"]]
print("inf" if v is None or down else v)'
}

fig=4
balanced_at=""
for i in $(seq 1 60); do
  sleep 2
  now=$(date +%s.%N)
  t=$(python3 -c "print(f'{$now-$start:.1f}')")
  imb=$(imbalance)
  if [ "$fig" -le 5 ] && { [ "$i" = 1 ] || [ "$i" = 3 ]; }; then
    echo
    echo "== Figure $fig: ${t}s after the balancer started (imbalance $imb)"
    $M/mosmon --once
    fig=$((fig + 1))
  fi
  if python3 -c "import sys; sys.exit(0 if float('$imb') <= 1.5 else 1)"; then
    if [ -n "$balanced_at" ]; then break; fi
    balanced_at=$t
  else
    balanced_at=""
  fi
done

echo
echo "== Figure 6: the load is spread evenly"
$M/mosmon --once
echo
if [ -n "$balanced_at" ]; then
  echo "balanced in ${balanced_at} s (max/min normalised load $(imbalance) <= 1.5)"
  echo "migrations carried out by the balancer:"
  grep -c "frozen" /run/mosix/$NAME/balancer.log || true
else
  echo "NOT balanced within 120 s (imbalance $(imbalance))" >&2
  exit 1
fi
