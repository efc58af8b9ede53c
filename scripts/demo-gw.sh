#!/usr/bin/env bash
# make demo-gw: mosgw in front of a small HTTP service whose instances the
# balancer moves while wrk keeps a steady load on it.
#
# A 3-node local cluster (each node capped at 0.5 core). Four instances of
# `mosjob http` (each request burns a few ms of CPU) start on node1; mosgw
# balances HTTP requests over them; wrk puts load through mosgw; the
# balancer (mos-balance serve) moves instances off the crowded node. Every
# few seconds the script prints requests per node (from mosgw's metrics and
# instance table), then the failed-request count (wrk's and mosgw's).
# Everything is torn down at the end, also on error.
set -euo pipefail
cd "$(dirname "$0")/.."
M=./target/debug
NAME=demogw
SECS=${SECS:-30}
WORK_MS=${WORK_MS:-4}
export MOSIX_CLUSTER=/run/mosix/$NAME/cluster.json
GW=127.0.0.1:8200
ADMIN=127.0.0.1:9200
BAL_PID=""
GW_PID=""
WRK_PID=""

cleanup() {
  for p in $WRK_PID $BAL_PID $GW_PID; do kill "$p" 2>/dev/null || true; done
  for p in $WRK_PID $BAL_PID $GW_PID; do wait "$p" 2>/dev/null || true; done
  $M/mosctl local down --name $NAME >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

if ! command -v wrk >/dev/null; then
  echo "== Installing wrk (the load generator)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

$M/mosctl local down --name $NAME >/dev/null 2>&1 || true
echo "== Bringing up 3 nodes, each capped at 0.5 core"
$M/mosctl local up --name $NAME --nodes 3 --cpu-caps 0.5 >/dev/null
# mosrun runs in the background by default here; newer ones need -d.
DETACH=""
if $M/mosrun --help | grep -q -- '--detach'; then DETACH=-d; fi

echo "== Starting 4 instances of service 'web' on node1 (mosjob http, ${WORK_MS} ms CPU per request)"
for port in 8201 8202 8203 8204; do
  $M/mosrun $DETACH --node node1 --service web --port $port -- \
    $M/mosjob http --port $port --work-ms "$WORK_MS" 2>/dev/null | tr '\n' ' '
done
echo
$M/mosgw --service web=$GW --admin $ADMIN --slow-start-ms 2000 >/run/mosix/$NAME/mosgw.log 2>&1 &
GW_PID=$!
for _ in $(seq 50); do curl -sf http://$ADMIN/status >/dev/null && break; sleep 0.1; done
sleep 1
echo "== mosgw listens on $GW; its instance table:"
curl -s http://$ADMIN/status | python3 -c '
import json,sys
for i in json.load(sys.stdin)["web"]: print("   ", i["job"], i["node"], i["addr"], i["state"])'

echo "== wrk: 8 connections for ${SECS}s through mosgw; the balancer starts"
# wrk's timeout, 10 s rather than its 2 s: wrk counts a response slower than
# that as a "timeout" error but still takes it, and on this 2-core machine a
# request at an instance on a half-core node can take 1-2 s while the
# migrations run (mosgw's latency histogram puts that time at the instance,
# with no retries or errors). Slow is not failed; the latency distribution
# shows it.
wrk -t1 -c8 -d"${SECS}s" --timeout 10s --latency http://$GW/ >/run/mosix/$NAME/wrk.out 2>&1 &
WRK_PID=$!
$M/mos-balance serve --interval 2 --min-residence 4 >/run/mosix/$NAME/balancer.log 2>&1 &
BAL_PID=$!

per_node() {
  python3 - "$ADMIN" <<'PY'
import json, re, sys, urllib.request
admin = sys.argv[1]
status = json.load(urllib.request.urlopen(f"http://{admin}/status"))["web"]
node = {i["job"]: i["node"] for i in status}
per, failed = {}, 0  # requests per instance (all codes), non-200 count
for line in urllib.request.urlopen(f"http://{admin}/metrics").read().decode().splitlines():
    m = re.match(r'mosgw_requests_total\{code="(\d+)",instance="([^"]*)",service="web"\} (\d+)', line)
    if not m: continue
    code, inst, n = m.group(1), m.group(2), int(m.group(3))
    if code != "200": failed += n
    per[inst] = per.get(inst, 0) + n
print(json.dumps({"per_inst": per, "node": node, "failed": failed,
                  "where": sorted(f'{i["node"]}:{i["state"]}' for i in status)}))
PY
}

prev="{}"
start=$(date +%s)
printf "%6s  %-40s %s\n" "t(s)" "requests/s per node" "instances (node:state)"
while kill -0 $WRK_PID 2>/dev/null; do
  sleep 3
  kill -0 $WRK_PID 2>/dev/null || break
  cur=$(per_node)
  python3 - "$prev" "$cur" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
p, c, t = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
# An instance's requests since the last sample count for the node it is on
# now (it moved at most once in between: the balancer's minimum residence).
pp, rate = p.get("per_inst", {}), {}
for inst, n in c["per_inst"].items():
    node = c["node"].get(inst, "?")
    rate[node] = rate.get(node, 0) + (n - pp.get(inst, 0)) / 3
rates = "  ".join(f"{n}={v:.0f}" for n, v in sorted(rate.items()))
print(f"{t:>6}  {rates:<40} {' '.join(c['where'])}")
PY
  prev=$cur
done
wait $WRK_PID || true
WRK_PID=""
echo
echo "== wrk's summary"
cat /run/mosix/$NAME/wrk.out
echo
echo "== Migrations carried out by the balancer: $(grep -c 'frozen' /run/mosix/$NAME/balancer.log || true)"
echo "== Instances let go of before a freeze (mosgw): $(grep -c 'let go of instance' /run/mosix/$NAME/mosgw.log || true)"
final=$(per_node)
failed=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['failed'])" "$final")
wrk_err=$(grep -E 'Non-2xx|Socket errors' /run/mosix/$NAME/wrk.out || true)
echo "== Failed requests: mosgw answered $failed non-200; wrk: ${wrk_err:-no errors}"
[ "$failed" = 0 ] && [ -z "$wrk_err" ]
