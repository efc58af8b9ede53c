#!/usr/bin/env bash
# make failover: issue 16's measurements (bench/failover.py; results in
# bench-results/failover.json and bench-results/failover.txt).
#
#   deaths      node deaths with the default lease: detection, restart, work lost
#   faults      >= 200 injected faults (partition from etcd, SIGSTOP of an agent,
#               node death, etcd leader kill, leading balancer kill mid-restart),
#               duplicates counted
#   checkpoint  checkpoint frozen time vs migration frozen time, 64 MiB and 1 GiB
#
# Needs root. Takes about 30 minutes on a 2-core machine (the faults: about 20).
# Knobs (environment): FAILOVER_ARGS="--faults 50 --deaths 5 --phases deaths,faults"
# Everything it starts is torn down at the end, also on error or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
M=$ROOT/target/release
NAME=failover
RUN=$ROOT/bench-results/run

if [ "$(id -u)" != 0 ]; then
  echo "failover: must run as root (local clusters need network namespaces, cgroups and CRIU)" >&2
  exit 1
fi
command -v etcdctl >/dev/null || { echo "failover: etcdctl missing; run make setup" >&2; exit 1; }

cleanup() {
  local rc=$?
  if [ -f "$RUN/pids" ]; then
    while read -r p; do
      [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] || continue
      if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qE 'mos-balance|mosjob|criu'; then
        kill -KILL "$p" 2>/dev/null || true
      fi
    done <"$RUN/pids"
    rm -f "$RUN/pids"
  fi
  "$M/mosctl" local down --name "$NAME" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$M/mosctl" local down --name "$NAME" >/dev/null 2>&1 || true
mkdir -p "$RUN"
rm -f "$RUN/pids"

echo "== mosix failover benchmark (results: bench-results/failover.json, failover.txt)"
rc=0
# shellcheck disable=SC2086
MOSIX_BENCH_CLUSTER=$NAME python3 bench/failover.py ${FAILOVER_ARGS:-} || rc=$?
python3 bench/failover_report.py bench-results/failover.json | tee bench-results/failover.txt
exit "$rc"
