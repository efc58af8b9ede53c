#!/usr/bin/env bash
# make bench-gw: mosgw side by side with Debian's nginx (least_conn, upstream
# keep-alive) and HAProxy (leastconn, random(2)) in front of the same
# backends, each proxy with one worker/thread pinned to CPU 0 and wrk pinned
# to CPU 1; then instances migrate under load through mosgw and through
# HAProxy (retry-on conn-failure + option redispatch), counting failures.
#
# Backends: 4 `mosjob http` instances (2 per node) of a 2-node local cluster.
# Results: bench-results/gw.txt (also printed). Everything started here is
# torn down at the end, also on error.
#
# Not measured here (yet): p99 at 50%/80% of nginx's maximum rate with a
# fixed-rate generator, and balancing quality on nodes of unequal capacity.
#
# Knobs: SECS (per throughput run, default 10), CONNS (default 64),
#        MIGRATIONS (default 50), MOSGW (binary; default target/release/mosgw,
#        built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
D=$ROOT/target/debug
NAME=benchgw
SECS=${SECS:-10}
CONNS=${CONNS:-64}
MIGRATIONS=${MIGRATIONS:-50}
RUN=/run/mosix/$NAME-bench
OUT=${OUT:-$ROOT/bench-results/gw.txt}
export MOSIX_CLUSTER=/run/mosix/$NAME/cluster.json
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  $D/mosctl local down --name $NAME >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

[ "$(id -u)" = 0 ] || { echo "bench-gw: must run as root" >&2; exit 1; }
need=()
for p in nginx haproxy wrk; do command -v $p >/dev/null || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  pkgs=("${need[@]/nginx/nginx-light}")
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
MOSGW=${MOSGW:-$ROOT/target/release/mosgw}
if [ ! -x "$MOSGW" ]; then
  cargo build --release --bin mosgw
fi
cargo build --bins >/dev/null
mkdir -p "$RUN" "$(dirname "$OUT")"

$D/mosctl local down --name $NAME >/dev/null 2>&1 || true
$D/mosctl local up --name $NAME --nodes 2 >/dev/null
IP1=$(python3 -c "import json;print(json.load(open('$MOSIX_CLUSTER'))['nodes'][0]['address'])")
IP2=$(python3 -c "import json;print(json.load(open('$MOSIX_CLUSTER'))['nodes'][1]['address'])")
DETACH=""
if $D/mosrun --help | grep -q -- '--detach'; then DETACH=-d; fi
JOBS=()
for spec in node1:8301 node1:8302 node2:8303 node2:8304; do
  node=${spec%:*}; port=${spec#*:}
  JOBS+=("$($D/mosrun $DETACH --node "$node" --service web --port "$port" -- \
    $D/mosjob http --port "$port" --work-ms 0 2>/dev/null)")
done
BACKENDS="$IP1:8301 $IP1:8302 $IP2:8303 $IP2:8304"
# One more service with a single instance: its requests must be held while it moves.
SOLO=$($D/mosrun $DETACH --node node1 --service solo --port 8309 -- \
  $D/mosjob http --port 8309 --work-ms 0 2>/dev/null)

# --- proxies ---------------------------------------------------------------
servers_nginx=""; for b in $BACKENDS; do servers_nginx+="    server $b;"$'\n'; done
cat >"$RUN/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $RUN/nginx.pid;
error_log $RUN/nginx.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  upstream web {
    least_conn;
$servers_nginx    keepalive 128;
  }
  server {
    listen 127.0.0.1:8401 reuseport;
    location / {
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout;
    }
  }
}
NGX
hap_servers() { local i=0; for b in $BACKENDS; do i=$((i+1)); echo "  server s$i $b check inter 500 fall 1 rise 1"; done; }
hap_all_servers() {
  local i=0
  for ip in $IP1 $IP2; do for port in 8301 8302 8303 8304; do
    i=$((i+1)); echo "  server a$i $ip:$port check inter 200 fall 1 rise 1"
  done; done
}
cat >"$RUN/haproxy.cfg" <<HAP
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response response-timeout
frontend lc
  bind 127.0.0.1:8402
  default_backend lc
frontend r2
  bind 127.0.0.1:8403
  default_backend r2
backend lc
  balance leastconn
$(hap_servers)
backend r2
  balance random(2)
$(hap_servers)
# For the migrations: HAProxy cannot follow a moved instance, so it is given
# every node:port an instance may answer at, with fast health checks.
frontend lcm
  bind 127.0.0.1:8407
  default_backend lcm
frontend scm
  bind 127.0.0.1:8405
  default_backend scm
backend lcm
  balance leastconn
$(hap_all_servers)
# No connection kept to a backend between requests (so CRIU can dump it).
backend scm
  balance leastconn
  option http-server-close
  http-reuse never
$(hap_all_servers)
HAP
start_haproxy() {
  taskset -c 0 haproxy -f "$RUN/haproxy.cfg" -db >>"$RUN/haproxy.log" 2>&1 &
  HAP_PID=$!; PIDS+=($HAP_PID)
}
taskset -c 0 nginx -c "$RUN/nginx.conf" -p "$RUN" >/dev/null 2>&1 &
NGX_PID=$!; PIDS+=($NGX_PID)
start_haproxy
taskset -c 0 "$MOSGW" --service web=127.0.0.1:8404 --service solo=127.0.0.1:8406 \
  --admin 127.0.0.1:9404 >"$RUN/mosgw.log" 2>&1 &
GW_PID=$!; PIDS+=($GW_PID)
up=""
for _ in $(seq 100); do
  if curl -sf 127.0.0.1:8401/ >/dev/null && curl -sf 127.0.0.1:8402/ >/dev/null \
    && curl -sf 127.0.0.1:8404/ >/dev/null; then up=1; break; fi
  sleep 0.1
done
if [ -z "$up" ]; then
  echo "bench-gw: a proxy did not come up; see $RUN/{nginx.err,haproxy.log,mosgw.log}" >&2
  exit 1
fi
sleep 1

wrk_run() { # port secs conns -> "rps p50 p99 errors"
  taskset -c 1 wrk -t1 -c"$3" -d"$2s" --latency "http://127.0.0.1:$1/" >"$RUN/wrk-$1.out" 2>&1 || true
  python3 - "$RUN/wrk-$1.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v); x = float(m.group(1))
    return x / 1000 if m.group(2) == "us" else x * 1000 if m.group(2) == "s" else x
if "Requests/sec" not in t:
    print("0 0 0 failed"); sys.exit()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1))
err = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", t))
s = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
if s: err += sum(int(x) for x in s.groups())
print(f"{rps:.0f} {p50:.2f} {p99:.2f} {err}")
PY
}

{
echo "# mosgw vs nginx vs HAProxy ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, proxy on CPU 0, wrk on CPU 1)"
echo "# backends: 4 x mosjob http (2 per node), wrk -t1 -c$CONNS -d${SECS}s, small responses"
echo "# mosgw binary: $MOSGW"
printf "%-26s %10s %9s %9s %7s\n" proxy "req/s" "p50 ms" "p99 ms" errors
for p in "nginx least_conn:8401" "haproxy leastconn:8402" "haproxy random(2):8403" "mosgw:8404"; do
  name=${p%:*}; port=${p##*:}
  wrk_run "$port" 3 "$CONNS" >/dev/null   # warm-up
  read -r rps p50 p99 err < <(wrk_run "$port" "$SECS" "$CONNS")
  printf "%-26s %10s %9s %9s %7s\n" "$name" "$rps" "$p50" "$p99" "$err"
done
} | tee "$OUT"

# --- migrations under load ---------------------------------------------------
migrate_under_load() { # port label
  local port=$1 label=$2 n=0 okm=0
  taskset -c 1 wrk -t1 -c16 -d600s --latency "http://127.0.0.1:$port/" >"$RUN/wrk-mig-$port.out" 2>&1 &
  local w=$!
  sleep 1
  while [ $n -lt "$MIGRATIONS" ]; do
    for j in "${JOBS[@]}"; do
      [ $n -ge "$MIGRATIONS" ] && break
      cur=$($D/mosctl show "$j" | awk '/^node/{print $2}')
      to=node1; [ "$cur" = node1 ] && to=node2
      # Each instance has its own port, so any node can take it.
      if $D/mosctl migrate "$j" "$to" >/dev/null 2>&1; then okm=$((okm+1)); fi
      n=$((n+1))
    done
  done
  kill -INT $w 2>/dev/null || true; wait $w 2>/dev/null || true
  python3 - "$RUN/wrk-mig-$port.out" "$label" "$n" "$okm" <<'PY' | tee -a "$OUT"
import re, sys
t = open(sys.argv[1]).read()
reqs = re.search(r"(\d+) requests in", t)
err = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", t))
s = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
if s: err += sum(int(x) for x in s.groups())
p99 = re.search(r"^\s+99%\s+(\S+)", t, re.M)
print(f"{sys.argv[2]:<34} migrations {sys.argv[4]}/{sys.argv[3]} ok, requests {reqs.group(1) if reqs else '?'}, failed {err}, p99 {p99.group(1) if p99 else '?'}")
PY
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
echo | tee -a "$OUT"
echo "# migrations of the instances under a steady load (wrk -c16), one proxy at a time" | tee -a "$OUT"
echo "# (a proxy's idle keep-alive connections to an instance make CRIU refuse its dump:" | tee -a "$OUT"
echo "#  such a migration rolls back and the job stays where it was)" | tee -a "$OUT"
# Other proxies' pooled connections would block every dump: only one runs.
stop $NGX_PID; stop $HAP_PID
sleep 1
migrate_under_load 8404 "mosgw"
# The only instance of a service moves: its requests are held meanwhile.
taskset -c 1 wrk -t1 -c4 -d600s --latency "http://127.0.0.1:8406/" >"$RUN/wrk-solo.out" 2>&1 &
w=$!
sleep 1
: >"$RUN/solo-migrations.txt"
for i in $(seq 10); do
  to=node2; [ $((i % 2)) = 0 ] && to=node1
  $D/mosctl migrate "$SOLO" "$to" >>"$RUN/solo-migrations.txt" 2>&1 || true
  sleep 0.5
done
kill -INT $w 2>/dev/null || true; wait $w 2>/dev/null || true
python3 - "$RUN/wrk-solo.out" "$RUN/solo-migrations.txt" <<'PY' | tee -a "$OUT"
import re, sys
t = open(sys.argv[1]).read(); m = open(sys.argv[2]).read()
def ms(v):
    x = re.match(r"([\d.]+)(us|ms|s)", v); f = float(x.group(1))
    return f / 1000 if x.group(2) == "us" else f * 1000 if x.group(2) == "s" else f
frozen = [int(x) for x in re.findall(r"frozen (\d+) ms", m)]
mx = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", t)
p50 = re.search(r"^\s+50%\s+(\S+)", t, re.M)
err = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", t))
s = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
if s: err += sum(int(x) for x in s.groups())
if frozen and mx and p50:
    added = ms(mx.group(1)) - ms(p50.group(1))
    print(f"mosgw, only instance moving           {len(frozen)}/10 migrations ok, failed {err}, "
          f"max frozen {max(frozen)} ms, worst added latency {added:.0f} ms "
          f"(target: <= max frozen + 50 ms)")
else:
    print("mosgw, only instance moving: no result", frozen, bool(mx), bool(p50))
PY
stop $GW_PID
start_haproxy
sleep 2
migrate_under_load 8407 "haproxy leastconn+redispatch"
migrate_under_load 8405 "haproxy server-close+redispatch"
