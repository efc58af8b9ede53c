#!/usr/bin/env bash
# make bench-jobnet: what moving a job's own address costs (issue 18); see
# bench/jobnet.py for what is measured and the targets.
#
# A 2-node local cluster (no CPU caps) and a peer namespace on its bridge;
# everything started here is torn down at the end, also on error.
# Knobs: CONNS (default 0,1,100,1000), MOVES (per N, default 20),
#        RESET_MOVES (moves of the 1-connection job, default 100),
#        BIN (binaries, default target/release, built if missing),
#        OUT (default bench-results/jobnet.txt),
#        STEPS=1: the agents log their steps (debug) and the script keeps
#        their logs beside OUT (OUT.node1.log, OUT.node2.log).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/release}
NAME=benchnet
[ "$(id -u)" = 0 ] || { echo "bench-jobnet: must run as root" >&2; exit 1; }
if [ ! -x "$BIN/mosctl" ]; then
  echo "== building release binaries"
  cargo build --release --bins
fi
export MOSIX_CLUSTER=/run/mosix/$NAME/cluster.json

OUT=${OUT:-$ROOT/bench-results/jobnet.txt}
cleanup() {
  if [ "${STEPS:-0}" = 1 ]; then
    for n in node1 node2; do cp "/run/mosix/$NAME/$n.log" "$OUT.$n.log" 2>/dev/null || true; done
  fi
  "$BIN/mosctl" local down --name $NAME >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM
cleanup
if [ "${STEPS:-0}" = 1 ]; then export RUST_LOG=info,mosix::agent=debug; fi
"$BIN/mosctl" local up --name $NAME --nodes 2 --no-etcd ${SHARED:+--shared "$SHARED"} >/dev/null

# The peer: a namespace on the cluster's bridge (named so that `local down`
# removes it), at .250 of the cluster's subnet.
NODE1=$(python3 -c "import json;print([n['address'] for n in json.load(open('$MOSIX_CLUSTER'))['nodes']][0])")
K=$(echo "$NODE1" | cut -d. -f3)
PEER_NS=mos-$NAME-peer
PEER_IP=10.77.$K.250
ip netns add "$PEER_NS"
ip link add "mv-$NAME-p" type veth peer name eth0 netns "$PEER_NS"
ip link set "mv-$NAME-p" master "mb-$NAME" up
ip -n "$PEER_NS" addr add "$PEER_IP/24" dev eth0
ip -n "$PEER_NS" link set eth0 up
ip -n "$PEER_NS" link set lo up

MOSCTL=$BIN/mosctl MOSRUN=$BIN/mosrun PEER_NS=$PEER_NS PEER_IP=$PEER_IP \
  OUT=$OUT python3 bench/jobnet.py
