#!/usr/bin/env bash
# The proxy harness: direct, the ambassador and HAProxy (TCP mode, the reference) side by
# side in one run, on loopback only, every load bounded in time.
#
#   make bench-proxy            (or: bash benches/proxy/harness.sh)
#
# Measures per target: bulk throughput (iperf3, 1 and 8 streams), proxy CPU-seconds per GB,
# keep-alive request rate and p50/p99 latency (wrk against nginx serving a small file), new
# connection rate (wrk with `Connection: close`), proxy CPU per request and per new
# connection, proxy memory per idle connection (1,000 held open). Prints each as a ratio to
# direct and to HAProxy. Needs iperf3, wrk, nginx, haproxy (installed with apt when root).
set -euo pipefail
cd "$(dirname "$0")/../.."

SECS=${BENCH_SECS:-5}        # length of each load run
# Backends on another host: benches/multihost/harness.sh runs this script inside host a's
# namespace with the backends in host b's (BENCH_BACKEND_NS) at BENCH_BACKEND_IP.
BACKEND_IP=${BENCH_BACKEND_IP:-127.0.0.1}
# Used as `backend cmd &`: `exec` makes $! the command itself, so cleanup stops it.
backend() { if [ -n "${BENCH_BACKEND_NS:-}" ]; then exec ip netns exec "$BENCH_BACKEND_NS" "$@"; else exec "$@"; fi; }
IDLE=${BENCH_IDLE:-1000}     # idle connections for the memory figure
RUNS=${BENCH_RUNS:-3}        # rounds over all targets; each figure is the median of the rounds

source benches/common.sh
need iperf3:iperf3 wrk:wrk nginx:nginx haproxy:haproxy
bash scripts/setup.sh
cargo build --release -q -p ambassador
AMB=target/release/ambassador

start_etcd

# Backends: iperf3 for bulk, nginx for requests.
IPERF=$(free_port); NGINX=$(free_port)
backend iperf3 -s -p "$IPERF" -B "$BACKEND_IP" >/dev/null 2>&1 &
pids+=($!)
mkdir -p "$work/www"
# nginx's workers run as nobody: they must get through the (0700) work dir to the file, or
# every request is answered 403 instead of the file.
chmod 711 "$work"; chmod 755 "$work/www"
head -c 1024 /dev/zero | tr '\0' 'x' >"$work/www/small.txt"
cat >"$work/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen $BACKEND_IP:$NGINX backlog=4096; root $work/www; }
}
EOF
backend nginx -c "$work/nginx.conf" -p "$work" >/dev/null 2>&1 &
pids+=($!)
wait_port "$IPERF" "$BACKEND_IP"; wait_port "$NGINX" "$BACKEND_IP"
status=$(curl -s -o /dev/null -w '%{http_code}' "http://$BACKEND_IP:$NGINX/small.txt" || true)
[ "$status" = 200 ] || { echo "harness: nginx answers $status, not 200, for small.txt" >&2; exit 1; }

# The ambassador: allocations and endpoints written as portalloc and registrator would.
A_IPERF=$(free_port); A_NGINX=$(free_port); ADMIN=$(free_port)
ctl put /viking/ports/alloc/bench/iperf/5201-tcp "{\"v\":1,\"port\":$A_IPERF}"
ctl put /viking/ports/alloc/bench/nginx/80-tcp "{\"v\":1,\"port\":$A_NGINX}"
ctl put /viking/services/bench/iperf/5201-tcp/bench:000000000001:5201 "{\"v\":1,\"host\":\"bench\",\"addr\":\"$BACKEND_IP\",\"port\":$IPERF,\"container_id\":\"000000000001\"}"
ctl put /viking/services/bench/nginx/80-tcp/bench:000000000002:80 "{\"v\":1,\"host\":\"bench\",\"addr\":\"$BACKEND_IP\",\"port\":$NGINX,\"container_id\":\"000000000002\"}"
# Its ports are free ones the kernel picked (ephemeral): --range takes them all; --run-dir
# keeps its bind lock apart from an ambassador that runs here for real.
env RUST_LOG=warn "$AMB" ${AMB_ARGS:-} --etcd "http://127.0.0.1:$ETCD_PORT" --host bench --bind 127.0.0.1 --dns off \
  --range 1-65535 --run-dir "$work/run" --admin "127.0.0.1:$ADMIN" >"$work/ambassador.log" 2>&1 &
AMB_PID=$!; pids+=($AMB_PID)
wait_port "$A_IPERF"; wait_port "$A_NGINX"

# HAProxy in TCP mode, the reference.
H_IPERF=$(free_port); H_NGINX=$(free_port)
cat >"$work/haproxy.cfg" <<EOF
global
  maxconn 9000
defaults
  mode tcp
  timeout connect 1s
  timeout client 1h
  timeout server 1h
listen iperf
  bind 127.0.0.1:$H_IPERF
  server s $BACKEND_IP:$IPERF
listen nginx
  bind 127.0.0.1:$H_NGINX
  server s $BACKEND_IP:$NGINX
EOF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
HA_PID=$!; pids+=($HA_PID)
wait_port "$H_IPERF"; wait_port "$H_NGINX"

declare -A R   # results: R[target.metric]
targets=(direct ambassador haproxy)
port_of() { case "$1.$2" in direct.iperf) echo "$IPERF";; direct.nginx) echo "$NGINX";;
  ambassador.iperf) echo "$A_IPERF";; ambassador.nginx) echo "$A_NGINX";;
  haproxy.iperf) echo "$H_IPERF";; haproxy.nginx) echo "$H_NGINX";; esac; }
host_of() { [ "$1" = direct ] && echo "$BACKEND_IP" || echo 127.0.0.1; }
pid_of() { case "$1" in ambassador) echo "$AMB_PID";; haproxy) echo "$HA_PID";; *) echo "";; esac; }

bulk() { # target streams -> Gbit/s, and CPU-s/GB of the proxy
  local t=$1 n=$2 pid c0 c1 out gbps bytes
  pid=$(pid_of "$t"); [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
  out=$(iperf3 -c "$(host_of "$t")" -p "$(port_of "$t" iperf)" -t "$SECS" -P "$n" -J)
  gbps=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' <<<"$out")
  bytes=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_received"]["bytes"])' <<<"$out")
  R[$t.bulk$n]=$gbps
  if [ -n "$pid" ]; then c1=$(cpu_ticks "$pid"); R[$t.cpugb$n]=$(python3 -c "print('%.3f' % ((($c1-$c0)/$hz)/($bytes/1e9)))"); fi
}

us() { # wrk's 850.00us / 1.12ms / 1.20s -> microseconds
  python3 -c "import sys,re; v=sys.argv[1]; m=re.match(r'([0-9.]+)(us|ms|s)', v); print('%.0f' % (float(m.group(1))*{'us':1,'ms':1e3,'s':1e6}[m.group(2)]) if m else '')" "$1"
}

requests() { # target kind(ka|close) -> req/s, p50, p99, CPU µs per request
  local t=$1 kind=$2 pid c0 c1 out hdr=()
  [ "$kind" = close ] && hdr=(-H "Connection: close")
  pid=$(pid_of "$t"); [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
  out=$(wrk -t2 -c50 -d"${SECS}s" --latency "${hdr[@]}" "http://$(host_of "$t"):$(port_of "$t" nginx)/small.txt")
  local rps p50 p99 total
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  R[$t.$kind]=$rps; R[$t.${kind}p50]=$(us "$p50"); R[$t.${kind}p99]=$(us "$p99")
  if [ -n "$pid" ]; then c1=$(cpu_ticks "$pid"); R[$t.${kind}cpu]=$(python3 -c "print('%.1f' % ((($c1-$c0)/$hz)/$total*1e6))"); fi
}

idle_memory() { # target -> KiB per idle connection held by the proxy
  local t=$1 pid before after
  pid=$(pid_of "$t"); [ -z "$pid" ] && return 0
  before=$(rss_kib "$pid")
  python3 - "$(port_of "$t" nginx)" "$IDLE" "$work/idle.$t" <<'EOF' &
import socket, sys, time, os
port, n, flag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port)); socks.append(s)
open(flag, "w").close()
time.sleep(3)
EOF
  local holder=$!
  for _ in $(seq 1 200); do [ -e "$work/idle.$t" ] && break; sleep 0.05; done
  sleep 1
  after=$(rss_kib "$pid")
  wait "$holder" || true
  R[$t.idle]=$(python3 -c "print('%.2f' % (($after-$before)/$IDLE))")
}

# Rounds over all targets, so a slow spell of the machine hits every target alike; the
# figures are medians over the rounds. Idle memory is read once, in the first round: later
# rounds would reuse memory the first one freed and look better than a fresh process would.
metrics=(bulk1 cpugb1 bulk8 cpugb8 ka kap50 kap99 kacpu close closep50 closep99 closecpu)
declare -A ALL # ALL[target.metric]: the rounds' figures, one per line
for r in $(seq 1 "$RUNS"); do
  for t in "${targets[@]}"; do
    echo "harness: round $r/$RUNS, measuring $t" >&2
    # A pause before each load run: each starts from a quiet proxy, not in the wake of the
    # last one (the ambassador decides every 100 ms how many threads take new connections).
    sleep 0.3; bulk "$t" 1; sleep 0.3; bulk "$t" 8
    sleep 0.3; requests "$t" ka; sleep 0.3; requests "$t" close
    [ "$r" = 1 ] && idle_memory "$t"
    for m in "${metrics[@]}"; do
      [ -n "${R[$t.$m]:-}" ] && ALL[$t.$m]+="${R[$t.$m]}"$'\n'
    done
  done
done
for t in "${targets[@]}"; do
  for m in "${metrics[@]}"; do
    [ -n "${ALL[$t.$m]:-}" ] && R[$t.$m]=$(printf '%s' "${ALL[$t.$m]}" | median)
  done
done

ratio() { python3 -c "a,b='$1','$2'; print('%.2f' % (float(a)/float(b)) if a and b and float(b) else '-')"; }
where=${BENCH_WHERE:-loopback}
printf '\n%-34s %12s %12s %12s %10s %10s\n' "metric (same run, $where)" direct ambassador haproxy "amb/direct" "amb/haproxy"
row() { # label key [lower-is-better]
  local d=${R[direct.$2]:-} a=${R[ambassador.$2]:-} h=${R[haproxy.$2]:-}
  printf '%-34s %12s %12s %12s %10s %10s\n' "$1" "${d:--}" "${a:--}" "${h:--}" "$(ratio "$a" "$d")" "$(ratio "$a" "$h")"
}
row "bulk 1 stream (Gbit/s)" bulk1
row "bulk 8 streams (Gbit/s)" bulk8
row "proxy CPU-s per GB, 1 stream" cpugb1
row "proxy CPU-s per GB, 8 streams" cpugb8
row "keep-alive requests/s" ka
row "keep-alive p50 latency (µs)" kap50
row "keep-alive p99 latency (µs)" kap99
row "proxy CPU µs per request" kacpu
row "new connections/s" close
row "new-connection p99 latency (µs)" closep99
row "proxy CPU µs per new connection" closecpu
row "proxy KiB per idle connection" idle
echo
echo "(medians of ${RUNS} rounds; ${SECS}s per load run; ${IDLE} idle connections, read in round 1; wrk -t2 -c50; iperf3 -t ${SECS};"
amb_threads=$(curl -s "http://127.0.0.1:$ADMIN/state" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["accepted_per_thread"]))' || echo "?")
echo " host congestion control $(cat /proc/sys/net/ipv4/tcp_congestion_control), the ambassador's on local hops ${VIKING_LOCAL_CONGESTION:-cubic};"
echo " the ambassador's threads $amb_threads, HAProxy's its default)"
