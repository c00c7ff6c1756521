#!/usr/bin/env bash
# The proxy harness: direct, the ambassador (kernel forwarding on, the default), the
# ambassador relaying in user space (`--kernel-forward off`) and HAProxy (TCP mode, the
# reference) side by side in one run, on loopback only, every load bounded in time.
#
#   make bench-proxy            (or: bash benches/proxy/harness.sh)
#
# Measures per target: bulk throughput (iperf3, 1 and 8 streams), proxy CPU-seconds per GB,
# keep-alive request rate and p50/p99 latency (wrk against nginx serving a small file), new
# connection rate (wrk with `Connection: close`), proxy CPU per request and per new
# connection, proxy memory per idle connection (1,000 held open); and real clients:
# pgbench select-only against PostgreSQL (16 clients, long-lived connections and -C, a new
# connection per transaction) and redis-benchmark (GET and SET, 16 clients). Prints each as a
# ratio to direct and to HAProxy. Needs iperf3, wrk, nginx, haproxy, postgresql, redis
# (installed with apt when root).
#
# On loopback a fifth target, "amb-send": the ambassador with --kernel-senders, its clients and
# the backends in a cgroup of the harness's own (the backends answer it on 127.0.0.5, the others
# on 127.0.0.1, so only its connections are watched); BENCH_SENDERS=0 leaves it out.
#
# BENCH_SWEEP="2 4 8 16 50" adds keep-alive requests/s and machine CPU per request (wrk), and
# redis-benchmark GET requests/s, at each of those connection counts (which path wins depends
# on the load);
# BENCH_SWEEP_ONLY=1 measures that alone. BENCH_NGINX_SENDFILE=on has nginx send its files with
# sendfile (its own default is off; Debian's packaged nginx.conf turns it on).
set -euo pipefail
cd "$(dirname "$0")/../.."

SECS=${BENCH_SECS:-5}        # length of each load run
# Backends on another host: benches/multihost/harness.sh runs this script inside host a's
# namespace with the backends in host b's (BENCH_BACKEND_NS) at BENCH_BACKEND_IP.
BACKEND_IP=${BENCH_BACKEND_IP:-127.0.0.1}
# Used as `backend cmd &`: `exec` makes $! the command itself, so cleanup stops it.
backend() { if [ -n "${BENCH_BACKEND_NS:-}" ]; then exec ip netns exec "$BENCH_BACKEND_NS" "$@"; else exec "$@"; fi; }
IDLE=${BENCH_IDLE:-1000}     # idle connections for the memory figure
# The sender path's target (loopback only: its peers must run on this host, in its cgroup).
SEND=${BENCH_SENDERS:-1}; [ -n "${BENCH_BACKEND_NS:-}" ] && SEND=0
SEND_IP=127.0.0.5            # where the backends answer the amb-send target
RUNS=${BENCH_RUNS:-3}        # rounds over all targets; each figure is the median of the rounds

source benches/common.sh
need iperf3:iperf3 wrk:wrk nginx:nginx haproxy:haproxy redis-server:redis-server redis-benchmark:redis-tools pgbench:postgresql-client
need pg_ctlcluster:postgresql
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
bash scripts/setup.sh
cargo build --release -q -p ambassador
AMB=target/release/ambassador

start_etcd
CG=""
if [ "$SEND" = 1 ]; then
  CG=$(new_cgroup proxy); cgroups+=("$CG")
  # Backends run in the cgroup (their sockets accepted on $SEND_IP are the watched ones),
  # whichever target they serve: what the cgroup's program costs, every target pays.
  backend() { echo "$BASHPID" >"$CG/cgroup.procs"; exec "$@"; }
fi
# client TARGET CMD...: the amb-send target's clients run in the cgroup (its peers), the
# others' outside.
client() {
  local t=$1; shift
  if [ "$t" = send ]; then sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG" "$@"; else "$@"; fi
}

# Backends: iperf3 for bulk, nginx for requests.
IPERF=$(free_port); NGINX=$(free_port)
backend iperf3 -s -p "$IPERF" -B "$BACKEND_IP" >/dev/null 2>&1 &
pids+=($!)
if [ "$SEND" = 1 ]; then backend iperf3 -s -p "$IPERF" -B "$SEND_IP" >/dev/null 2>&1 & pids+=($!); fi
SEND_LISTEN=""; [ "$SEND" = 1 ] && SEND_LISTEN="listen $SEND_IP:$NGINX backlog=4096;"
make_www
cat >"$work/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  sendfile ${BENCH_NGINX_SENDFILE:-off};
  keepalive_requests 1000000;
  server { listen $BACKEND_IP:$NGINX backlog=4096; $SEND_LISTEN root $work/www; }
}
EOF
backend nginx -c "$work/nginx.conf" -p "$work" >/dev/null 2>&1 &
pids+=($!)
# PostgreSQL (as its own user: it refuses root) and Redis, for the real clients.
PG=$(free_port); REDIS=$(free_port)
mkdir -p "$work/pg" "$work/pgsock"; chown postgres "$work/pg" "$work/pgsock"
runuser -u postgres -- "$PGBIN/initdb" -D "$work/pg" -A trust -U postgres >"$work/initdb.log" 2>&1
backend runuser -u postgres -- "$PGBIN/postgres" -D "$work/pg" -p "$PG" -k "$work/pgsock" \
  -c listen_addresses="$BACKEND_IP${CG:+,$SEND_IP}" -c max_connections=200 -c fsync=off >"$work/postgres.log" 2>&1 &
pids+=($!)
backend redis-server --port "$REDIS" --bind "$BACKEND_IP" ${CG:+$SEND_IP} --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
wait_port "$IPERF" "$BACKEND_IP"; wait_port "$NGINX" "$BACKEND_IP"
wait_port "$PG" "$BACKEND_IP"; wait_port "$REDIS" "$BACKEND_IP"
pgbench -i -s 10 -q -h "$BACKEND_IP" -p "$PG" -U postgres postgres >"$work/pgbench-init.log" 2>&1
status=$(curl -s -o /dev/null -w '%{http_code}' "http://$BACKEND_IP:$NGINX/small.txt" || true)
[ "$status" = 200 ] || { echo "harness: nginx answers $status, not 200, for small.txt" >&2; exit 1; }

# The ambassador: allocations and endpoints written as portalloc and registrator would.
A_IPERF=$(free_port); A_NGINX=$(free_port); A_PG=$(free_port); A_REDIS=$(free_port); ADMIN=$(free_port); ADMIN2=$(free_port)
ctl put /viking/ports/alloc/bench/iperf/5201-tcp "{\"v\":1,\"port\":$A_IPERF}"
ctl put /viking/ports/alloc/bench/nginx/80-tcp "{\"v\":1,\"port\":$A_NGINX}"
ctl put /viking/ports/alloc/bench/pg/5432-tcp "{\"v\":1,\"port\":$A_PG}"
ctl put /viking/ports/alloc/bench/redis/6379-tcp "{\"v\":1,\"port\":$A_REDIS}"
ctl put /viking/services/bench/pg/5432-tcp/bench:000000000003:5432 "{\"v\":1,\"host\":\"bench\",\"addr\":\"$BACKEND_IP\",\"port\":$PG,\"container_id\":\"000000000003\"}"
ctl put /viking/services/bench/redis/6379-tcp/bench:000000000004:6379 "{\"v\":1,\"host\":\"bench\",\"addr\":\"$BACKEND_IP\",\"port\":$REDIS,\"container_id\":\"000000000004\"}"
ctl put /viking/services/bench/iperf/5201-tcp/bench:000000000001:5201 "{\"v\":1,\"host\":\"bench\",\"addr\":\"$BACKEND_IP\",\"port\":$IPERF,\"container_id\":\"000000000001\"}"
ctl put /viking/services/bench/nginx/80-tcp/bench:000000000002:80 "{\"v\":1,\"host\":\"bench\",\"addr\":\"$BACKEND_IP\",\"port\":$NGINX,\"container_id\":\"000000000002\"}"
# Its ports are free ones the kernel picked (ephemeral): --range takes them all; --run-dir
# keeps its bind lock apart from an ambassador that runs here for real.
env RUST_LOG=warn "$AMB" ${AMB_ARGS:-} --etcd "http://127.0.0.1:$ETCD_PORT" --host bench --bind 127.0.0.1 --dns off \
  --range 1-65535 --run-dir "$work/run" --admin "127.0.0.1:$ADMIN" >"$work/ambassador.log" 2>&1 &
AMB_PID=$!; pids+=($AMB_PID)
# The same ambassador relaying in user space, on 127.0.0.2 with the same ports.
env RUST_LOG=warn "$AMB" ${AMB_ARGS:-} --kernel-forward off --etcd "http://127.0.0.1:$ETCD_PORT" --host bench --bind 127.0.0.2 --dns off \
  --range 1-65535 --run-dir "$work/run2" --admin "127.0.0.1:$ADMIN2" >"$work/ambassador-user.log" 2>&1 &
USER_PID=$!; pids+=($USER_PID)
wait_port "$A_IPERF"; wait_port "$A_NGINX"; wait_port "$A_PG"; wait_port "$A_REDIS"
wait_port "$A_PG" 127.0.0.2; wait_port "$A_REDIS" 127.0.0.2
if [ "$SEND" = 1 ]; then
  # amb-send: its own etcd, whose endpoints are the backends' $SEND_IP addresses.
  E2=$(free_port); E2P=$(free_port)
  etcd --name bench2 --data-dir "$work/etcd2" --listen-client-urls "http://127.0.0.1:$E2" \
    --advertise-client-urls "http://127.0.0.1:$E2" --listen-peer-urls "http://127.0.0.1:$E2P" \
    --initial-advertise-peer-urls "http://127.0.0.1:$E2P" --initial-cluster "bench2=http://127.0.0.1:$E2P" \
    --log-level error --logger zap >"$work/etcd2.log" 2>&1 &
  pids+=($!); wait_port "$E2"
  ctl2() { etcdctl --endpoints "http://127.0.0.1:$E2" "$@" >/dev/null; }
  for s in iperf/5201:$A_IPERF:$IPERF:1 nginx/80:$A_NGINX:$NGINX:2 pg/5432:$A_PG:$PG:3 redis/6379:$A_REDIS:$REDIS:4; do
    IFS=: read -r name alloc port n <<<"$s"
    ctl2 put "/viking/ports/alloc/bench/$name-tcp" "{\"v\":1,\"port\":$alloc}"
    ctl2 put "/viking/services/bench/$name-tcp/bench:00000000000$n:${name#*/}" "{\"v\":1,\"host\":\"bench\",\"addr\":\"$SEND_IP\",\"port\":$port,\"container_id\":\"00000000000$n\"}"
  done
  ADMIN3=$(free_port)
  env RUST_LOG=warn "$AMB" ${AMB_ARGS:-} --kernel-senders "$CG" --etcd "http://127.0.0.1:$E2" --host bench --bind 127.0.0.3 --dns off \
    --range 1-65535 --run-dir "$work/run3" --admin "127.0.0.1:$ADMIN3" >"$work/ambassador-send.log" 2>&1 &
  SEND_PID=$!; pids+=($SEND_PID)
  wait_port "$A_PG" 127.0.0.3; wait_port "$A_REDIS" 127.0.0.3; wait_port "$A_NGINX" 127.0.0.3; wait_port "$A_IPERF" 127.0.0.3
  if grep -q "unavailable" "$work/ambassador-send.log"; then
    echo "harness: the amb-send ambassador has no sender path:" >&2; grep "unavailable" "$work/ambassador-send.log" >&2; exit 1
  fi
fi
if grep -q "kernel forwarding unavailable" "$work/ambassador.log"; then
  echo "harness: the ambassador could not forward in the kernel:" >&2; grep "kernel forwarding" "$work/ambassador.log" >&2; exit 1
fi

# HAProxy in TCP mode, the reference.
H_IPERF=$(free_port); H_NGINX=$(free_port); H_PG=$(free_port); H_REDIS=$(free_port)
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
listen pg
  bind 127.0.0.1:$H_PG
  server s $BACKEND_IP:$PG
listen redis
  bind 127.0.0.1:$H_REDIS
  server s $BACKEND_IP:$REDIS
EOF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
HA_PID=$!; pids+=($HA_PID)
wait_port "$H_IPERF"; wait_port "$H_NGINX"; wait_port "$H_PG"; wait_port "$H_REDIS"

declare -A R   # results: R[target.metric]
targets=(direct ambassador user haproxy)
[ "$SEND" = 1 ] && targets+=(send)
port_of() { case "$1.$2" in direct.iperf) echo "$IPERF";; direct.nginx) echo "$NGINX";;
  direct.pg) echo "$PG";; direct.redis) echo "$REDIS";;
  ambassador.iperf|user.iperf) echo "$A_IPERF";; ambassador.nginx|user.nginx) echo "$A_NGINX";;
  ambassador.pg|user.pg|send.pg) echo "$A_PG";; ambassador.redis|user.redis|send.redis) echo "$A_REDIS";;
  send.iperf) echo "$A_IPERF";; send.nginx) echo "$A_NGINX";;
  haproxy.iperf) echo "$H_IPERF";; haproxy.nginx) echo "$H_NGINX";;
  haproxy.pg) echo "$H_PG";; haproxy.redis) echo "$H_REDIS";; esac; }
host_of() { case "$1" in direct) echo "$BACKEND_IP";; user) echo 127.0.0.2;; send) echo 127.0.0.3;; *) echo 127.0.0.1;; esac; }
pid_of() { case "$1" in ambassador) echo "$AMB_PID";; user) echo "$USER_PID";; haproxy) echo "$HA_PID";; send) echo "$SEND_PID";; *) echo "";; esac; }

bulk() { # target streams -> Gbit/s, and CPU-s/GB of the proxy
  local t=$1 n=$2 pid c0 c1 out gbps bytes
  pid=$(pid_of "$t"); [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
  out=$(client "$t" iperf3 -c "$(host_of "$t")" -p "$(port_of "$t" iperf)" -t "$SECS" -P "$n" -J)
  gbps=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' <<<"$out")
  bytes=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_received"]["bytes"])' <<<"$out")
  R[$t.bulk$n]=$gbps
  if [ -n "$pid" ]; then c1=$(cpu_ticks "$pid"); R[$t.cpugb$n]=$(python3 -c "print('%.3f' % ((($c1-$c0)/$hz)/($bytes/1e9)))"); fi
}

us() { # wrk's 850.00us / 1.12ms / 1.20s -> microseconds
  python3 -c "import sys,re; v=sys.argv[1]; m=re.match(r'([0-9.]+)(us|ms|s)', v); print('%.0f' % (float(m.group(1))*{'us':1,'ms':1e3,'s':1e6}[m.group(2)]) if m else '')" "$1"
}

# Busy CPU ticks of the whole machine (all processes, the kernel's threads and interrupts):
# the kernel path forwards in softirq and kworker context, which no process's own counters
# show, so per-request figures are also given for the machine as a whole (client and server
# included, alike for every target: the differences between targets are the proxies').
machine_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8}' /proc/stat; }

requests() { # target kind(ka|close) -> req/s, p50, p99, CPU µs per request
  local t=$1 kind=$2 pid c0 c1 m0 m1 out hdr=()
  [ "$kind" = close ] && hdr=(-H "Connection: close")
  m0=$(machine_ticks)
  pid=$(pid_of "$t"); [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
  out=$(client "$t" wrk -t2 -c"${BENCH_WRK_C:-50}" -d"${SECS}s" --latency "${hdr[@]}" "http://$(host_of "$t"):$(port_of "$t" nginx)/small.txt")
  local rps p50 p99 total
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  R[$t.$kind]=$rps; R[$t.${kind}p50]=$(us "$p50"); R[$t.${kind}p99]=$(us "$p99")
  m1=$(machine_ticks); R[$t.${kind}mcpu]=$(python3 -c "print('%.1f' % ((($m1-$m0)/$hz)/$total*1e6))")
  if [ -n "$pid" ]; then c1=$(cpu_ticks "$pid"); R[$t.${kind}cpu]=$(python3 -c "print('%.1f' % ((($c1-$c0)/$hz)/$total*1e6))"); fi
}

pg() { # target mode(pg|pgc) -> transactions/s, proxy CPU µs per transaction
  local t=$1 mode=$2 pid c0 c1 m0 m1 out tps n flags=()
  [ "$mode" = pgc ] && flags=(-C)
  m0=$(machine_ticks)
  pid=$(pid_of "$t"); [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
  out=$(client "$t" timeout $((SECS + 30)) pgbench -n -S -c 16 -j 2 -T "$SECS" "${flags[@]}" -h "$(host_of "$t")" -p "$(port_of "$t" pg)" -U postgres postgres 2>&1)
  tps=$(awk '/^tps = / {printf "%.0f", $3}' <<<"$out")
  n=$(awk '/number of transactions actually processed/ {print $6}' <<<"$out")
  [ -n "$tps" ] || { echo "harness: pgbench against $t failed: $out" >&2; return 0; }
  R[$t.$mode]=$tps
  m1=$(machine_ticks); R[$t.${mode}mcpu]=$(python3 -c "print('%.1f' % ((($m1-$m0)/$hz)/$n*1e6))")
  if [ -n "$pid" ]; then c1=$(cpu_ticks "$pid"); R[$t.${mode}cpu]=$(python3 -c "print('%.1f' % ((($c1-$c0)/$hz)/$n*1e6))"); fi
}

redis() { # target -> GET requests/s, SET requests/s
  local t=$1 out
  out=$(client "$t" timeout 60 redis-benchmark -h "$(host_of "$t")" -p "$(port_of "$t" redis)" -c 16 -n "${BENCH_REDIS_N:-200000}" -t get,set --csv 2>/dev/null)
  R[$t.rget]=$(awk -F'"' '$2=="GET" {printf "%.0f", $4}' <<<"$out")
  R[$t.rset]=$(awk -F'"' '$2=="SET" {printf "%.0f", $4}' <<<"$out")
}

slab_kib() { awk '/^Slab:/ {print $2}' /proc/meminfo; }
idle_memory() { # target -> KiB per idle connection held by the proxy, and the kernel's slab
  # growth per connection (all sockets of the chain: client, proxy's two, nginx's)
  local t=$1 pid before after
  pid=$(pid_of "$t"); [ -z "$pid" ] && return 0
  before=$(rss_kib "$pid"); slab0=$(slab_kib)
  client "$t" python3 - "$(host_of "$t")" "$(port_of "$t" nginx)" "$IDLE" "$work/idle.$t" <<'EOF' &
import socket, sys, time, os
host, port, n, flag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
socks = []
for _ in range(n):
    s = socket.create_connection((host, port)); socks.append(s)
open(flag, "w").close()
time.sleep(3)
EOF
  local holder=$!
  for _ in $(seq 1 200); do [ -e "$work/idle.$t" ] && break; sleep 0.05; done
  sleep 1
  after=$(rss_kib "$pid"); slab1=$(slab_kib)
  wait "$holder" || true
  R[$t.idle]=$(python3 -c "print('%.2f' % (($after-$before)/$IDLE))")
  R[$t.kidle]=$(python3 -c "print('%.2f' % (($slab1-$slab0)/$IDLE))")
}

# Rounds over all targets, so a slow spell of the machine hits every target alike; the
# figures are medians over the rounds. Idle memory is read once, in the first round: later
# rounds would reuse memory the first one freed and look better than a fresh process would.
metrics=(idle kidle bulk1 cpugb1 bulk8 cpugb8 ka kap50 kap99 kacpu kamcpu close closep50 closep99 closecpu closemcpu pg pgcpu pgmcpu pgc pgccpu pgcmcpu rget rset)
declare -A ALL # ALL[target.metric]: the rounds' figures, one per line
for r in $(seq 1 "$RUNS"); do
  [ -n "${BENCH_SWEEP_ONLY:-}" ] && break
  for t in "${targets[@]}"; do
    echo "harness: round $r/$RUNS, measuring $t" >&2
    # A pause before each load run: each starts from a quiet proxy, not in the wake of the
    # last one (the ambassador decides every 100 ms how many threads take new connections).
    sleep 0.3; bulk "$t" 1; sleep 0.3; bulk "$t" 8
    sleep 0.3; requests "$t" ka; sleep 0.3; requests "$t" close
    sleep 0.3; pg "$t" pg; sleep 0.3; pg "$t" pgc; sleep 0.3; redis "$t"
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

sweep() { # target connections -> keep-alive req/s and machine CPU µs per request
  local t=$1 c=$2 m0 m1 out total
  m0=$(machine_ticks)
  out=$(client "$t" wrk -t2 -c"$c" -d"${SECS}s" "http://$(host_of "$t"):$(port_of "$t" nginx)/small.txt")
  m1=$(machine_ticks)
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  R[$t.sw$c]=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  R[$t.swm$c]=$(python3 -c "print('%.1f' % ((($m1-$m0)/$hz)/$total*1e6))")
  out=$(client "$t" timeout 60 redis-benchmark -h "$(host_of "$t")" -p "$(port_of "$t" redis)" -c "$c" -n "${BENCH_REDIS_N:-200000}" -t get --csv 2>/dev/null)
  R[$t.swr$c]=$(awk -F'"' '$2=="GET" {printf "%.0f", $4}' <<<"$out")
}
SWEEP=(${BENCH_SWEEP:-})
if [ "${#SWEEP[@]}" -gt 0 ]; then
  for r in $(seq 1 "$RUNS"); do
    for c in "${SWEEP[@]}"; do
      for t in "${targets[@]}"; do
        echo "harness: sweep round $r/$RUNS, $c connections, $t" >&2
        sleep 0.3; sweep "$t" "$c"
        for m in sw$c swm$c swr$c; do ALL[$t.$m]+="${R[$t.$m]}"$'\n'; done
      done
    done
  done
  for t in "${targets[@]}"; do
    for c in "${SWEEP[@]}"; do
      for m in sw$c swm$c swr$c; do R[$t.$m]=$(printf '%s' "${ALL[$t.$m]}" | median); done
    done
  done
fi

ratio() { python3 -c "a,b='$1','$2'; print('%.2f' % (float(a)/float(b)) if a and b and float(b) else '-')"; }
where=${BENCH_WHERE:-loopback}
row() { # label key
  local d=${R[direct.$2]:-} a=${R[ambassador.$2]:-} u=${R[user.$2]:-} h=${R[haproxy.$2]:-} s=${R[send.$2]:-}
  printf '%-34s %10s %10s %10s %10s %10s %8s %8s %8s %8s\n' "$1" "${d:--}" "${a:--}" "${u:--}" "${h:--}" "${s:--}" "$(ratio "$a" "$d")" "$(ratio "$a" "$h")" "$(ratio "$u" "$h")" "$(ratio "$s" "$h")"
}
if [ -z "${BENCH_SWEEP_ONLY:-}" ]; then
printf '\n%-34s %10s %10s %10s %10s %10s %8s %8s %8s %8s\n' "metric (same run, $where)" direct ambassador "amb-user" haproxy "amb-send" "amb/dir" "amb/hap" "user/hap" "send/hap"
row "bulk 1 stream (Gbit/s)" bulk1
row "bulk 8 streams (Gbit/s)" bulk8
row "proxy CPU-s per GB, 1 stream" cpugb1
row "proxy CPU-s per GB, 8 streams" cpugb8
row "keep-alive requests/s" ka
row "keep-alive p50 latency (µs)" kap50
row "keep-alive p99 latency (µs)" kap99
row "proxy CPU µs per request" kacpu
row "machine CPU µs per request" kamcpu
row "new connections/s" close
row "new-connection p99 latency (µs)" closep99
row "proxy CPU µs per new connection" closecpu
row "machine CPU µs per new connection" closemcpu
row "proxy KiB per idle connection" idle
row "kernel slab KiB per idle conn." kidle
row "pgbench -S 16 clients (tps)" pg
row "proxy CPU µs per pgbench tx" pgcpu
row "machine CPU µs per pgbench tx" pgmcpu
row "pgbench -S -C 16 clients (tps)" pgc
row "proxy CPU µs per -C pgbench tx" pgccpu
row "machine CPU µs per -C pgbench tx" pgcmcpu
row "redis-benchmark GET (req/s)" rget
row "redis-benchmark SET (req/s)" rset
fi
if [ "${#SWEEP[@]}" -gt 0 ]; then
  printf '\n%-34s %10s %10s %10s %10s %10s %8s %8s %8s %8s\n' "keep-alive by connections" direct ambassador "amb-user" haproxy "amb-send" "amb/dir" "amb/hap" "amb/user" "send/hap"
  for c in "${SWEEP[@]}"; do
    for k in sw swm swr; do
      d=${R[direct.$k$c]:-} a=${R[ambassador.$k$c]:-} u=${R[user.$k$c]:-} h=${R[haproxy.$k$c]:-} s=${R[send.$k$c]:-}
      case $k in
        sw) label="-c$c wrk requests/s";; swm) label="-c$c wrk machine CPU µs/req";;
        swr) label="-c$c redis GET requests/s";;
      esac
      printf '%-34s %10s %10s %10s %10s %10s %8s %8s %8s %8s\n' "$label" "${d:--}" "${a:--}" "${u:--}" "${h:--}" "${s:--}" "$(ratio "$a" "$d")" "$(ratio "$a" "$h")" "$(ratio "$a" "$u")" "$(ratio "$s" "$h")"
    done
  done
fi
echo
echo "(medians of ${RUNS} rounds; ${SECS}s per load run; ${IDLE} idle connections, read in round 1; wrk -t2 -c${BENCH_WRK_C:-50}; iperf3 -t ${SECS};"
echo " pgbench -n -S -c 16 -j 2 -T ${SECS} at scale 10; redis-benchmark -c 16 -n ${BENCH_REDIS_N:-200000} -t get,set;"
amb_threads=$(curl -s "http://127.0.0.1:$ADMIN/state" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["accepted_per_thread"]))' || echo "?")
echo " host congestion control $(cat /proc/sys/net/ipv4/tcp_congestion_control), the ambassador's on local hops ${VIKING_LOCAL_CONGESTION:-cubic};"
echo " the ambassador's threads $amb_threads, HAProxy's its default)"
