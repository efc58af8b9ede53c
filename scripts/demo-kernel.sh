#!/usr/bin/env bash
# make demo-kernel: the article's headline experiment, for real.
#
# A Linux kernel (Debian 12's linux-source-6.1, tinyconfig) is built with
# mosmake started on node1 of a 4-node local cluster with unequal CPU caps;
# the source is on the cluster's shared path, as it was on the article's
# shared disk. mosmon snapshots during the build show the compile load
# spreading over the nodes (the article's Figures 3-6). It ends with the
# makespan and the jobs per node. Everything is torn down at the end, also on
# error or Ctrl-C.
#
# Knobs: CAPS (default 0.6,0.5,0.4,0.3 cores: under the machine's 2 cores, so
# make, mosrun and the agents have room), EVERY (seconds between snapshots).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
M=$ROOT/target/debug
NAME=kdemo
CAPS=${CAPS:-0.6,0.5,0.4,0.3}
EVERY=${EVERY:-15}
export MOSIX_CLUSTER=/run/mosix/$NAME/cluster.json
SHARED=$ROOT/criu-images/$NAME
MAKE_PID=""
# shellcheck source=scripts/kernel-lib.sh
. "$ROOT/scripts/kernel-lib.sh"

cleanup() {
  local rc=$?
  if [ -n "$MAKE_PID" ] && kill -0 "$MAKE_PID" 2>/dev/null; then
    kill -TERM "$MAKE_PID" 2>/dev/null || true
    sleep 2
  fi
  # The kernel tree is kept aside for the next run (a rename), then `down`
  # kills whatever is left in the cluster's namespaces and cgroups (mosmake
  # ran in node1's) and removes the shared path.
  kernel_stash "$SHARED/src"
  $M/mosctl local down --name $NAME >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$(id -u)" != 0 ]; then
  echo "demo-kernel: must run as root (network namespaces, cgroups, CRIU)" >&2
  exit 1
fi
kernel_deps
kernel_tarball

$M/mosctl local down --name $NAME >/dev/null 2>&1 || true
echo "== Bringing up 4 nodes with CPU caps $CAPS cores (shared path $SHARED)"
$M/mosctl local up --name $NAME --nodes 4 --cpu-caps "$CAPS" --shared "$SHARED"
echo
echo "== Slots per node (placement counts a compile against its node's slots when it starts)"
$M/mosctl slots
echo
echo "== Putting a clean $KERNEL_PKG tree into the shared path"
t=$(date +%s)
kernel_unpack "$SHARED/src"
SRC=$SHARED/src/$KERNEL_PKG
echo "ready in $(($(date +%s) - t)) s: $SRC"
echo
echo "== make tinyconfig (on node1)"
(in_node $NAME node1 make -C "$SRC" -s tinyconfig) >/run/mosix/$NAME/tinyconfig.log 2>&1 ||
  { cat /run/mosix/$NAME/tinyconfig.log; exit 1; }
grep -c '=y$' "$SRC/.config" | sed 's/^/options set: /'

echo
echo "== mosmake from node1: compile jobs start on the best nodes"
LOG=/run/mosix/$NAME/mosmake.log
start=$(date +%s.%N)
in_node $NAME node1 $M/mosmake -C "$SRC" >"$LOG" 2>&1 &
MAKE_PID=$!

elapsed() { python3 -c "print(f'{$(date +%s.%N) - $start:.0f}')"; }
snap=1
while kill -0 "$MAKE_PID" 2>/dev/null; do
  sleep "$EVERY"
  kill -0 "$MAKE_PID" 2>/dev/null || break
  echo
  echo "== Snapshot $snap (like the article's Figures 3-6): $(elapsed) s into the build; make's latest line: $(grep -E '^  [A-Z]' "$LOG" | tail -1 | sed 's/^ *//')"
  $M/mosmon --once || true
  snap=$((snap + 1))
done
rc=0
wait "$MAKE_PID" || rc=$?
MAKE_PID=""
echo
echo "== mosmake exited with status $rc after $(elapsed) s; its report:"
grep -E '^mosmake:|re-run|node lost|lost node' "$LOG" || true
if [ "$rc" != 0 ]; then
  echo "== the build FAILED; the end of its log:" >&2
  tail -30 "$LOG" >&2
  exit "$rc"
fi
echo
ls -l "$SRC/arch/x86/boot/bzImage"
echo "objects built: $(find "$SRC" -name '*.o' | wc -l)"
