#!/usr/bin/env bash
# make bench-gw: mosgw side by side with Debian's nginx (least_conn, upstream
# keep-alive) and HAProxy (leastconn, random(2)) in front of the same
# backends, each proxy with one worker/thread pinned to CPU 0 and wrk pinned
# to CPU 1; then instances migrate under load through mosgw and through
# HAProxy (retry-on conn-failure + option redispatch), counting failures.
#
# Backends: 4 `mosjob http` instances (2 per node) of a 2-node local cluster.
# Results: bench-results/gw.txt (also printed). Everything started here is
# torn down at the end, also on error. One run at a time (a lock).
#
# Phases, in this order, each proxy in turn:
#  1. maximum rate (wrk, closed loop), small responses;
#  2. latency at fixed rates, 50% and 80% of nginx's maximum (oha -q with
#     latency correction: an open loop, so a slow answer cannot hide the
#     requests that would have queued behind it);
#  3. balancing quality: 4 instances of a service whose requests cost CPU
#     (`mosjob http --cpu-ms`), on node1 (1.0 core) and node2 (0.5 core, and
#     busy with CPU-bound jobs); p99 at a fixed rate, and the maximum rate,
#     each round with the share of requests node2's instances served and the
#     cores node2's CPU-bound jobs got meanwhile;
#  4. migrations under load (mosgw, then HAProxy with redispatch).
# oha comes from crates.io (`cargo install oha` into .cache/oha, once, about
# 10 minutes on 2 cores); Debian 12 has no fixed-rate HTTP generator.
#
# Knobs: SECS (per throughput run, default 10), CONNS (default 64),
#        MAX_ROUNDS (rounds of the maximum rate, default 5),
#        RATE_RUNS (rounds of the fixed-rate phase, default 7), BAL_ROUNDS
#        (rounds of the balancing phase's max rate, default 9; these two
#        rows moved either way from run to run with 5, see ratio-ci.py),
#        MIGRATIONS (default 50), MOSGW (binary; default target/release/mosgw,
#        built if missing), MOSGW_B (a second mosgw binary, run beside the
#        first as "mosgw B" in the max, rate and balance phases, to compare builds),
#        PHASES (default "max,rate,balance,migrate"),
#        KEEP_RUN=1 (keep /run/mosix/benchgw-bench: configs, logs, raw output),
#        ONLY (a regex on the proxies' names, e.g. ONLY=mosgw, for tuning;
#        the rates then come from the last full run's nginx figures).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Release binaries throughout: the backends (mosjob http) must not be the
# bottleneck of a proxy benchmark.
D=$ROOT/target/release
NAME=benchgw
PHASES=${PHASES:-max,rate,balance,migrate}
phase() { [[ ",$PHASES," == *",$1,"* ]]; }
OHA=$ROOT/.cache/oha/bin/oha
SECS=${SECS:-10}
CONNS=${CONNS:-64}
MIGRATIONS=${MIGRATIONS:-50}
RATE_RUNS=${RATE_RUNS:-7}
BAL_ROUNDS=${BAL_ROUNDS:-9}
RUN=/run/mosix/$NAME-bench
# nginx's figures of the last full run, for runs with ONLY (kept across runs).
LAST=$ROOT/.cache/bench-gw
OUT=${OUT:-$ROOT/bench-results/gw.txt}
export MOSIX_CLUSTER=/run/mosix/$NAME/cluster.json
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  $D/mosctl local down --name $NAME >/dev/null 2>&1 || true
  [ -n "${BENCH_CG:-}" ] && rmdir "$BENCH_CG" 2>/dev/null || true
  # The proxies' configs, logs and the load generators' raw output: kept
  # with KEEP_RUN=1 (e.g. to read why a run failed), else removed.
  [ "${KEEP_RUN:-0}" = 1 ] || rm -rf "$RUN"
}
[ "$(id -u)" = 0 ] || { echo "bench-gw: must run as root" >&2; exit 1; }
# One run at a time: a second would bring up the same cluster under the
# first and, on its way out, tear it down.
mkdir -p /run/mosix
exec 9>"/run/mosix/$NAME-bench.lock"
flock -n 9 || { echo "bench-gw: another bench-gw is running (cluster $NAME); wait for it to end" >&2; exit 1; }
trap cleanup EXIT INT TERM
need=()
for p in nginx haproxy wrk; do command -v $p >/dev/null || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  pkgs=("${need[@]/nginx/nginx-light}")
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
MOSGW=${MOSGW:-$ROOT/target/release/mosgw}
# `make bench-gw` builds first; run by hand, build only what is missing.
for b in mosctl mosrun mosjob mosixd mosgw mosix-init; do
  [ -x "$D/$b" ] || { cargo build --release --bins >/dev/null; break; }
done
if [ ! -x "$OHA" ] && { phase rate || phase balance; }; then
  echo "== installing oha (a fixed-rate HTTP load generator) from crates.io into .cache/oha; once, ~10 min"
  cargo install oha --locked --root "$ROOT/.cache/oha" --target-dir "$ROOT/.cache/oha/build" >/dev/null
  rm -rf "$ROOT/.cache/oha/build"
fi
mkdir -p "$RUN" "$LAST" "$(dirname "$OUT")"

$D/mosctl local down --name $NAME >/dev/null 2>&1 || true
$D/mosctl local up --name $NAME --nodes 2 >/dev/null
# This machine is shared (builds, other engineers' test clusters): the
# proxies and load generators run in a cgroup of their own beside the
# backends' cluster, under mosix/, each with a high CPU weight, the same for
# every proxy. Weight only: with nothing else running it changes nothing.
# (Beside, not at the top: other local clusters are mosix/'s children too,
# and at the top they would compete with the proxies through mosix/'s
# weight; here they compete at 1024 against 262144.)
BENCH_CG=/sys/fs/cgroup/cpu/mosix/$NAME-clients
mkdir -p "$BENCH_CG" && echo 262144 >"$BENCH_CG/cpu.shares"
for g in mosix mosix/$NAME; do echo 262144 >/sys/fs/cgroup/cpu/$g/cpu.shares 2>/dev/null || true; done
# In that cgroup, then exec'd (the pid stays the command's).
PRIO="$ROOT/scripts/in-cgroup.sh $BENCH_CG"
IP1=$(python3 -c "import json;print(json.load(open('$MOSIX_CLUSTER'))['nodes'][0]['address'])")
IP2=$(python3 -c "import json;print(json.load(open('$MOSIX_CLUSTER'))['nodes'][1]['address'])")
DETACH=""
if $D/mosrun --help | grep -q -- '--detach'; then DETACH=-d; fi
# The backends run in their nodes' network (`--net node`), as when these
# figures were first kept: nginx and HAProxy reach them at the node
# addresses below, and a job with its own address (the default since issue
# 18, with a pool) would answer elsewhere and pay its own launch and move.
# Older mosruns have no --net and only that network.
NETNODE=""
if $D/mosrun --help | grep -q -- '--net '; then NETNODE="--net node"; fi
JOBS=()
for spec in node1:8301 node1:8302 node2:8303 node2:8304; do
  node=${spec%:*}; port=${spec#*:}
  JOBS+=("$($D/mosrun $DETACH $NETNODE --node "$node" --service web --port "$port" -- \
    $D/mosjob http --port "$port" --work-ms 0 2>/dev/null)")
done
BACKENDS="$IP1:8301 $IP1:8302 $IP2:8303 $IP2:8304"
# For the balancing phase: a service whose requests cost 2 ms of CPU each.
CPUJOBS=()
for spec in node1:8311 node1:8312 node2:8313 node2:8314; do
  node=${spec%:*}; port=${spec#*:}
  CPUJOBS+=("$($D/mosrun $DETACH $NETNODE --node "$node" --service cpu --port "$port" -- \
    $D/mosjob http --port "$port" --cpu-ms 2 2>/dev/null)")
done
CPU_BACKENDS="$IP1:8311 $IP1:8312 $IP2:8313 $IP2:8314"
# One more service with a single instance: its requests must be held while it moves.
SOLO=$($D/mosrun $DETACH $NETNODE --node node1 --service solo --port 8309 -- \
  $D/mosjob http --port 8309 --work-ms 0 2>/dev/null)

# --- proxies ---------------------------------------------------------------
servers_nginx=""; for b in $BACKENDS; do servers_nginx+="    server $b;"$'\n'; done
cpu_nginx=""; for b in $CPU_BACKENDS; do cpu_nginx+="    server $b;"$'\n'; done
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
  upstream cpu {
    least_conn;
$cpu_nginx    keepalive 128;
  }
  server {
    listen 127.0.0.1:8411 reuseport;
    location / {
      proxy_pass http://cpu;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout;
    }
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
hap_cpu_servers() { local i=0; for b in $CPU_BACKENDS; do i=$((i+1)); echo "  server c$i $b check inter 500 fall 1 rise 1"; done; }
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
frontend lccpu
  bind 127.0.0.1:8412
  default_backend lccpu
frontend r2cpu
  bind 127.0.0.1:8413
  default_backend r2cpu
backend lccpu
  balance leastconn
$(hap_cpu_servers)
backend r2cpu
  balance random(2)
$(hap_cpu_servers)
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
  $PRIO taskset -c 0 haproxy -f "$RUN/haproxy.cfg" -db >>"$RUN/haproxy.log" 2>&1 &
  HAP_PID=$!; PIDS+=($HAP_PID)
}
$PRIO taskset -c 0 nginx -c "$RUN/nginx.conf" -p "$RUN" >/dev/null 2>&1 &
NGX_PID=$!; PIDS+=($NGX_PID)
start_haproxy
$PRIO taskset -c 0 "$MOSGW" --service web=127.0.0.1:8404 --service solo=127.0.0.1:8406 \
  --service cpu=127.0.0.1:8414 \
  --admin 127.0.0.1:9404 >"$RUN/mosgw.log" 2>&1 &
GW_PID=$!; PIDS+=($GW_PID)
# MOSGW_B: a second mosgw build beside the first, for the web and cpu
# services (ports + 100), to compare two builds in the same minutes.
if [ -n "${MOSGW_B:-}" ]; then
  $PRIO taskset -c 0 "$MOSGW_B" --service web=127.0.0.1:8504 --service cpu=127.0.0.1:8514 \
    --admin 127.0.0.1:9504 \
    >"$RUN/mosgw-b.log" 2>&1 &
  GWB_PID=$!; PIDS+=($GWB_PID)
fi
UP_PORTS="8401 8402 8404"
if [ -n "${MOSGW_B:-}" ]; then UP_PORTS+=" 8504"; fi
up=""
for _ in $(seq 100); do
  up=1
  for port in $UP_PORTS; do curl -sf "127.0.0.1:$port/" >/dev/null || { up=""; break; }; done
  [ -n "$up" ] && break
  sleep 0.1
done
if [ -z "$up" ]; then
  echo "bench-gw: a proxy did not come up; see $RUN/{nginx.err,haproxy.log,mosgw.log,mosgw-b.log}" >&2
  exit 1
fi
sleep 1

wrk_run() { # port secs conns -> "rps p50 p99 errors"
  $PRIO taskset -c 1 wrk -t1 -c"$3" -d"$2s" --latency "http://127.0.0.1:$1/" >"$RUN/wrk-$1.out" 2>&1 || true
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

median_line() { # name "v1 v2 ..." -> the name, the median, every value
  python3 -c 'import statistics,sys; v=[int(x) for x in sys.argv[2].split()]; each=", ".join(map(str, v)); print(f"{sys.argv[1]:<26} {statistics.median(v):>10.0f}   ({each})")' "$1" "$2"
}

# The maximum rate of each proxy (NAME:PORT arguments) in ROUNDS rounds of
# wrk -cCONNS, after one warm-up each: every proxy once a round and the order
# turned by one each round, so that the VM's drift over the minutes is not
# put on whichever proxy runs last. Prints every run, then each proxy's
# median; RPS[name] keeps each round's req/s.
declare -A RPS=() SPLITS=()
rate_rounds() { # rounds conns proxy...
  local rounds=$1 conns=$2; shift 2
  local ps=("$@") n=$# r k p name port rps p50 p99 err before split
  RPS=()
  for p in "${ps[@]}"; do wrk_run "${p##*:}" 3 "$conns" >/dev/null; done
  for ((r = 0; r < rounds; r++)); do
    for ((k = 0; k < n; k++)); do
      p=${ps[$(((k + r) % n))]}
      name=${p%:*}; port=${p##*:}
      split=""
      if [ -n "${SPLIT:-}" ]; then before=$(split_sample); fi
      read -r rps p50 p99 err < <(wrk_run "$port" "$SECS" "$conns")
      if [ -n "${SPLIT:-}" ]; then split=$(split_diff "$before" "$(split_sample)"); fi
      printf "%-26s %10s %9s %9s %7s%s\n" "$name" "$rps" "$p50" "$p99" "$err" "$split"
      RPS[$name]+="$rps "
      if [ -n "$split" ]; then SPLITS[$name]+="${split// /,};"; fi
    done
  done
  echo "# max req/s, median over the rounds (each round's figure in brackets)"
  for p in "${ps[@]}"; do median_line "${p%:*}" "${RPS[${p%:*}]}"; done
  local vs=()
  for p in "${ps[@]}"; do
    if [ "${p%:*}" != "nginx least_conn" ]; then vs+=("${p%:*}" "${RPS[${p%:*}]}"); fi
  done
  if [ -n "${RPS["nginx least_conn"]:-}" ] && [ ${#vs[@]} -gt 0 ]; then
    echo "# each median against nginx's, and a 90% interval of that ratio over the rounds (scripts/ratio-ci.py)"
    python3 "$ROOT/scripts/ratio-ci.py" "nginx least_conn" "${RPS["nginx least_conn"]}" "${vs[@]}"
  fi
  if [ -n "${SPLIT:-}" ]; then
    echo "# median node2 % and CPU-bound jobs' cores over the rounds"
    for p in "${ps[@]}"; do
      python3 -c '
import statistics, sys
rows = [[float(x) for x in r.split(",") if x] for r in sys.argv[2].split(";") if r]
rows = [r for r in rows if len(r) == 2]
if not rows: print(f"{sys.argv[1]:<26} no split measured"); sys.exit()
print(f"{sys.argv[1]:<26} node2 {statistics.median(r[0] for r in rows):5.1f} %   jobs {statistics.median(r[1] for r in rows):.3f} cores")
' "${p%:*}" "${SPLITS[${p%:*}]:-}"
    done
  fi
}
# For the balancing phase (SPLIT set): where a round's requests went and
# what the CPU-bound jobs got meanwhile. A sample is each CPU backend's own
# count of requests served (its answer's n=, asked directly: one request
# each) and the CPU-bound jobs' CPU time in clock ticks (/proc/PID/stat).
split_sample() {
  local b n t=0 pid
  for b in $CPU_BACKENDS; do
    n=$(curl -s --max-time 5 "http://$b/" | sed -n 's/.*n=\([0-9]*\).*/\1/p')
    printf '%s ' "${n:-0}"
  done
  for pid in $(pgrep -f "mosjob burn"); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
split_diff() { # "before" "after" -> " node2 share %  CPU-bound jobs' cores"
  python3 - "$1" "$2" "$SECS" "$(getconf CLK_TCK)" <<'PY'
import sys
a, b = [list(map(int, x.split())) for x in sys.argv[1:3]]
secs, hz = float(sys.argv[3]), float(sys.argv[4])
# CPU_BACKENDS: two on node1, then two on node2; the last field is ticks.
d = [y - x for x, y in zip(a, b)]
n1, n2 = d[0] + d[1], d[2] + d[3]
share = 100.0 * n2 / (n1 + n2) if n1 + n2 > 0 else 0.0
print(f"   {share:6.1f} {d[4] / hz / secs:7.3f}")
PY
}
# nginx's highest (max) or lowest (min) round in RPS, 0 if it did not run;
# a failed run (0 req/s) does not count.
nginx_rounds() { # max|min
  local v
  v=$(printf '%s\n' ${RPS["nginx least_conn"]:-} | awk '$1 > 0' | sort -n | { if [ "$1" = max ]; then tail -1; else head -1; fi; })
  echo "${v:-0}"
}

oha_run() { # port rate secs conns -> "rps p50 p99 errors"
  $PRIO taskset -c 1 "$OHA" --no-tui --output-format json -z "$3s" -c "$4" -q "$2" --latency-correction \
    "http://127.0.0.1:$1/" >"$RUN/oha-$1-$2.json" 2>"$RUN/oha-$1-$2.err" || true
  python3 - "$RUN/oha-$1-$2.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception:
    print("0 0 0 failed"); sys.exit()
s, lp = j.get("summary", {}), j.get("latencyPercentiles", {})
codes = j.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if str(k).startswith(("2", "3")))
bad = sum(v for k, v in codes.items() if not str(k).startswith(("2", "3")))
# Requests still in flight when -z ends are "aborted due to deadline": not
# failures of the proxy.
errs = sum(v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k)
print(f"{s.get('requestsPerSec', 0):.0f} {1000 * (lp.get('p50') or 0):.2f} {1000 * (lp.get('p99') or 0):.2f} {bad + errs}")
PY
}

# The processes of a proxy (by its name in PROXIES): nginx's master and its
# worker, HAProxy's one process (both its frontends), mosgw's.
proxy_pids() {
  case "$1" in
    nginx*) echo "$NGX_PID" $(cat /proc/"$NGX_PID"/task/*/children 2>/dev/null) ;;
    haproxy*) echo "$HAP_PID" ;;
    "mosgw B") echo "${GWB_PID:-}" ;;
    mosgw) echo "$GW_PID" ;;
  esac
}
# CPU time, user + system, in clock ticks, of the given processes (all their
# threads).
cpu_ticks() {
  local t=0 p st f
  for p in "$@"; do
    st=$(cat /proc/"$p"/stat 2>/dev/null) || continue
    # Fields after the command name, which may hold spaces: state is
    # field 3 of stat(5), so utime (14) and stime (15) are 11 and 12 here.
    read -r -a f <<<"${st##*) }"
    t=$((t + f[11] + f[12]))
  done
  echo "$t"
}
TCK=$(getconf CLK_TCK)
PROXIES=("nginx least_conn:8401" "haproxy leastconn:8402" "haproxy random(2):8403" "mosgw:8404")
if [ -n "${MOSGW_B:-}" ]; then PROXIES+=("mosgw B:8504"); fi
# ONLY=regex keeps the proxies whose names match (tuning runs).
only() { for p in "$@"; do [[ "${p%:*}" =~ ${ONLY:-.} ]] && printf '%s\n' "$p"; done; return 0; }
mapfile -t PROXIES < <(only "${PROXIES[@]}")
if phase max; then
{
echo "# mosgw vs nginx vs HAProxy ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, proxy on CPU 0, wrk on CPU 1)"
echo "# backends: 4 x mosjob http (2 per node), wrk -t1 -c$CONNS -d${SECS}s, small responses"
echo "# mosgw binary: $MOSGW"
printf "%-26s %10s %9s %9s %7s\n" proxy "req/s" "p50 ms" "p99 ms" errors
rate_rounds "${MAX_ROUNDS:-5}" "$CONNS" "${PROXIES[@]}"
NGINX_MAX=$(nginx_rounds max)
# (an if, not &&: a false test as the block's last command would end the
# script under set -e when ONLY= leaves nginx out)
if [ "$NGINX_MAX" -gt 0 ]; then echo "$NGINX_MAX" >"$LAST/nginx-max"; fi
} | tee "$OUT"
else
  : >"$OUT"
fi

if phase rate; then
  NGINX_MAX=$(cat "$LAST/nginx-max" 2>/dev/null || echo 10000)
  {
  echo
  echo "# latency at fixed rates (oha -q, latency corrected, -c $CONNS, ${SECS}s, $RATE_RUNS rounds), % of nginx's best rate ($NGINX_MAX req/s)"
  echo "# proxy CPU: its processes' user + system time over the run (CPU 0 is the proxies' core;"
  echo "# what a proxy spends per request is taken from what the backends and the VM get there)"
  printf "%-26s %6s %8s %10s %9s %9s %7s %9s %8s\n" proxy "%max" "rate" "got req/s" "p50 ms" "p99 ms" errors "CPU %" "us/req"
  : >"$RUN/rate-p99"
  for pct in 50 80; do
    rate=$((NGINX_MAX * pct / 100))
    # RATE_RUNS rounds, the proxies interleaved in each: a p99 here is made
    # by the VM's stalls as much as by the proxy, so one 10 s run each is
    # not enough to tell two proxies apart.
    for r in $(seq "$RATE_RUNS"); do
      for p in "${PROXIES[@]}"; do
        name=${p%:*}; port=${p##*:}
        pp=$(proxy_pids "$name")
        # shellcheck disable=SC2086
        c0=$(cpu_ticks $pp)
        read -r rps p50 p99 err < <(oha_run "$port" "$rate" "$SECS" "$CONNS")
        # shellcheck disable=SC2086
        c1=$(cpu_ticks $pp)
        read -r cpu_pct us_req < <(python3 -c "
t = ($c1 - $c0) / $TCK
print(f'{100 * t / $SECS:.1f}', f'{1e6 * t / max(1, $rps * $SECS):.1f}')")
        printf "%-26s %6s %8s %10s %9s %9s %7s %9s %8s\n" "$name" "$pct" "$rate" "$rps" "$p50" "$p99" "$err" "$cpu_pct" "$us_req"
        echo "$name|$pct|$p99|$us_req" >>"$RUN/rate-p99"
      done
    done
  done
  echo "# median p99 over the $RATE_RUNS runs (ms), and the proxy's median CPU per request (us)"
  python3 - "$RUN/rate-p99" "$ROOT/scripts" <<'PY'
import statistics, sys
sys.path.insert(0, sys.argv[2])
ratio_ci = __import__("ratio-ci")
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1]) if l.strip()]
names = list(dict.fromkeys(r[0] for r in rows))
p99 = {(n, pct): [float(r[2]) for r in rows if r[0] == n and r[1] == pct] for n in names for pct in ("50", "80")}
for pct in ("50", "80"):
    for name in names:
        v = p99[(name, pct)]
        us = [float(r[3]) for r in rows if r[0] == name and r[1] == pct and len(r) > 3]
        if v:
            print(f"{name:<26} {pct:>6} {statistics.median(v):>9.2f}   ({', '.join(f'{x:.2f}' for x in v)})"
                  + (f"   CPU {statistics.median(us):.1f} us/req" if us else ""))
ref = "nginx least_conn"
if any(p99.get((ref, pct)) for pct in ("50", "80")):
    print("# each median p99 against nginx's, and a 90% interval of that ratio over the rounds (scripts/ratio-ci.py)")
    for pct in ("50", "80"):
        r = p99.get((ref, pct))
        for name in names:
            v = p99[(name, pct)]
            if name == ref or not r or not v:
                continue
            print(f"{name:<26} {pct:>6}   {ratio_ci.describe(r, v)}")
PY
  } | tee -a "$OUT"
fi

if phase balance; then
  # Unequal nodes: node1 gets a whole core, node2 half a core and two
  # CPU-bound jobs. The agents' load samples (a 3 s average) see it.
  CG=/sys/fs/cgroup/cpu/mosix/$NAME
  echo 10000 >"$CG/node1/cpu.cfs_period_us"; echo 10000 >"$CG/node1/cpu.cfs_quota_us"
  echo 10000 >"$CG/node2/cpu.cfs_period_us"; echo 5000 >"$CG/node2/cpu.cfs_quota_us"
  BURNERS=()
  for _ in 1 2; do BURNERS+=("$($D/mosrun -d $NETNODE --node node2 -- $D/mosjob burn 2>/dev/null)"); done
  sleep 5
  CPU_PROXIES=("nginx least_conn:8411" "haproxy leastconn:8412" "haproxy random(2):8413" "mosgw:8414")
  if [ -n "${MOSGW_B:-}" ]; then CPU_PROXIES+=("mosgw B:8514"); fi
  mapfile -t CPU_PROXIES < <(only "${CPU_PROXIES[@]}")
  {
  echo
  echo "# balancing quality: service cpu (2 ms of CPU per request), 2 instances on node1 (1.0 core),"
  echo "# 2 on node2 (0.5 core, also running 2 CPU-bound jobs); max rate (wrk -c16) in $BAL_ROUNDS rounds,"
  echo "# each proxy once a round, the order turned by one each round (a proxy measured last is not always"
  echo "# the one measured latest on a VM that drifts); then p99 at a fixed rate"
  echo "# node2 %: the round's requests that node2's instances served; jobs: the cores the two"
  echo "# CPU-bound jobs on node2 got meanwhile (a proxy that queued more on node2 would take it from them)"
  printf "%-26s %10s %9s %9s %7s %8s %7s\n" proxy "max req/s" "p50 ms" "p99 ms" errors "node2 %" jobs
  SPLIT=1 rate_rounds "$BAL_ROUNDS" 16 "${CPU_PROXIES[@]}"
  BAL_MIN=$(nginx_rounds min)
  if [ "$BAL_MIN" -gt 0 ]; then echo "$BAL_MIN" >"$LAST/bal-min"; else BAL_MIN=$(cat "$LAST/bal-min" 2>/dev/null || echo 600); fi
  rate=$((BAL_MIN * 6 / 10))
  echo "# fixed rate: $rate req/s (60% of nginx's lower max above), oha -c 32, ${SECS}s, three runs each"
  printf "%-26s %8s %10s %9s %9s %7s\n" proxy rate "got req/s" "p50 ms" "p99 ms" errors
  for r in 1 2 3; do
    for p in "${CPU_PROXIES[@]}"; do
      name=${p%:*}; port=${p##*:}
      read -r rps p50 p99 err < <(oha_run "$port" "$rate" "$SECS" 32)
      printf "%-26s %8s %10s %9s %9s %7s\n" "$name" "$rate" "$rps" "$p50" "$p99" "$err"
    done
  done
  } | tee -a "$OUT"
  for b in "${BURNERS[@]}"; do $D/mosctl kill "$b" >/dev/null 2>&1 || true; done
  echo -1 >"$CG/node1/cpu.cfs_quota_us"; echo -1 >"$CG/node2/cpu.cfs_quota_us"
  sleep 4
fi

if ! phase migrate; then exit 0; fi

# --- migrations under load ---------------------------------------------------
migrate_under_load() { # port label
  local port=$1 label=$2 n=0 okm=0
  $PRIO taskset -c 1 wrk -t1 -c16 -d600s --latency "http://127.0.0.1:$port/" >"$RUN/wrk-mig-$port.out" 2>&1 &
  local w=$!
  PIDS+=("$w") # not left running if the script stops early
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
$PRIO taskset -c 1 wrk -t1 -c4 -d600s --latency "http://127.0.0.1:8406/" >"$RUN/wrk-solo.out" 2>&1 &
w=$!
PIDS+=("$w")
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
