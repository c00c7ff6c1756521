#!/usr/bin/env bash
# The router harness: direct, the router, nginx (proxy_pass with an upstream keepalive pool)
# and HAProxy (HTTP mode, http-reuse always) side by side in one run, on loopback only, every
# load bounded in time; the same backend (nginx serving a 1 KiB file) behind all of them.
# With BENCH_PINGORA=1, also a minimal pingora proxy (benches/router/pingora; needs cmake).
#
#   make bench-router            (or: bash benches/router/harness.sh)
#
# Per target: keep-alive and `Connection: close` requests over HTTP (wrk), keep-alive over
# HTTPS (TLS 1.3), TLS handshakes/s (HTTPS with `Connection: close`: every request a full
# handshake), HTTP/2 over TLS (h2load, 50 connections x 10 streams); p50/p99 latency, proxy
# CPU per request (the proxy's process and its children), proxy memory per idle keep-alive
# connection (1,000 held open after one request each, on the fresh process before any load). Every proxy runs on one thread
# (router --threads 1, nginx worker_processes 1, HAProxy nbthread 1) so the figures compare
# the work per request, not how many cores each takes.
set -euo pipefail
cd "$(dirname "$0")/../.."

SECS=${BENCH_SECS:-5}
IDLE=${BENCH_IDLE:-1000}
RUNS=${BENCH_RUNS:-3}

source benches/common.sh
need wrk:wrk nginx:nginx haproxy:haproxy h2load:nghttp2-client openssl:openssl
bash scripts/setup.sh
cargo build --profile release-lto -q -p router
ROUTER=target/release-lto/router
targets=(direct router nginx haproxy)
if [ "${BENCH_PINGORA:-0}" = 1 ]; then
  need cmake:cmake
  (cd benches/router/pingora && CARGO_TARGET_DIR="$PWD/../../../target/pingora" cargo build --release -q)
  PINGORA=target/pingora/release/pingora-probe
  targets+=(pingora)
fi

start_etcd

# A certificate for bench.test (self-signed: the clients do not verify).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
  -keyout "$work/bench.key" -out "$work/bench.crt" >/dev/null 2>&1
mkdir -p "$work/certs"
cp "$work/bench.crt" "$work/certs/bench.test.crt"; cp "$work/bench.key" "$work/certs/bench.test.key"
cat "$work/bench.crt" "$work/bench.key" >"$work/bench.pem"

# The backend: nginx with a 1 KiB file, plain and (for direct HTTPS) TLS.
B=$(free_port); BS=$(free_port)
make_www; mkdir -p "$work/b"
cat >"$work/b/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/b/nginx.pid;
error_log $work/b/nginx.err warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$B backlog=4096;
    listen 127.0.0.1:$BS ssl http2 backlog=4096;
    ssl_certificate $work/bench.crt; ssl_certificate_key $work/bench.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    root $work/www;
  }
}
EOF
nginx -c "$work/b/nginx.conf" -p "$work/b" >/dev/null 2>&1 &
pids+=($!)
wait_port "$B"; wait_port "$BS"

# The router: the route and the endpoint as viking deploy and the registrator write them.
R=$(free_port); RS=$(free_port); RA=$(free_port)
ctl put /viking/routes/bench.test '{"v":1,"stack":"bench","job":"web","port":80}'
ctl put /viking/services/bench/web/80-tcp/bench:000000000001:80 "{\"v\":1,\"host\":\"bench\",\"addr\":\"127.0.0.1\",\"port\":$B,\"container_id\":\"000000000001\"}"
env RUST_LOG=warn "$ROUTER" --etcd "http://127.0.0.1:$ETCD_PORT" --threads 1 \
  --http "127.0.0.1:$R" --https "127.0.0.1:$RS" --admin "127.0.0.1:$RA" --certs "$work/certs" \
  >"$work/router.log" 2>&1 &
ROUTER_PID=$!; pids+=($ROUTER_PID)
wait_port "$R"; wait_port "$RS"

# nginx as the proxy.
N=$(free_port); NS=$(free_port)
mkdir -p "$work/n"
cat >"$work/n/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/n/nginx.pid;
error_log $work/n/nginx.err warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream be { server 127.0.0.1:$B; keepalive 64; }
  server {
    listen 127.0.0.1:$N backlog=4096;
    listen 127.0.0.1:$NS ssl http2 backlog=4096;
    ssl_certificate $work/bench.crt; ssl_certificate_key $work/bench.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
nginx -c "$work/n/nginx.conf" -p "$work/n" >/dev/null 2>&1 &
NGINX_PID=$!; pids+=($NGINX_PID)
wait_port "$N"; wait_port "$NS"

# HAProxy in HTTP mode.
H=$(free_port); HS=$(free_port)
cat >"$work/haproxy.cfg" <<EOF
global
  maxconn 9000
  nbthread 1
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  option forwardfor
  http-reuse always
  timeout connect 1s
  timeout client 30s
  timeout server 30s
frontend f
  bind 127.0.0.1:$H
  bind 127.0.0.1:$HS ssl crt $work/bench.pem alpn h2,http/1.1
  default_backend b
backend b
  server s 127.0.0.1:$B
EOF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
HA_PID=$!; pids+=($HA_PID)
wait_port "$H"; wait_port "$HS"

if [ -n "${PINGORA:-}" ]; then
  P=$(free_port)
  "$PINGORA" "127.0.0.1:$P" "127.0.0.1:$B" 1 >"$work/pingora.log" 2>&1 &
  PG_PID=$!; pids+=($PG_PID)
  wait_port "$P"
fi

http_port() { case "$1" in direct) echo "$B";; router) echo "$R";; nginx) echo "$N";; haproxy) echo "$H";; pingora) echo "${P:-}";; esac; }
https_port() { case "$1" in direct) echo "$BS";; router) echo "$RS";; nginx) echo "$NS";; haproxy) echo "$HS";; *) echo "";; esac; }
pid_of() { case "$1" in router) echo "$ROUTER_PID";; nginx) echo "$NGINX_PID";; haproxy) echo "$HA_PID";; pingora) echo "${PG_PID:-}";; *) echo "";; esac; }
# CPU ticks of a process and its children (nginx's worker is a child of its master).
tree_ticks() { local t=0 p; for p in $1 $(pgrep -P "$1" || true); do t=$((t + $(cpu_ticks "$p"))); done; echo "$t"; }
tree_rss() { local t=0 p; for p in $1 $(pgrep -P "$1" || true); do t=$((t + $(rss_kib "$p"))); done; echo "$t"; }

for t in "${targets[@]}"; do
  s=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "http://127.0.0.1:$(http_port "$t")/small.txt" || true)
  [ "$s" = 200 ] || { echo "harness: $t answers $s, not 200" >&2; tail -5 "$work"/*.log >&2; exit 1; }
done

us() { python3 -c "import sys,re; v=sys.argv[1]; m=re.match(r'([0-9.]+)(us|ms|s)', v); print('%.0f' % (float(m.group(1))*{'us':1,'ms':1e3,'s':1e6}[m.group(2)]) if m else '')" "$1"; }

declare -A R_  # R_[target.metric]
wrk_run() { # target key url [header...]
  local t=$1 key=$2 url=$3; shift 3
  local pid c0 c1 out rps total p50 p99
  pid=$(pid_of "$t"); [ -n "$pid" ] && c0=$(tree_ticks "$pid")
  out=$(wrk -t2 -c50 -d"${SECS}s" --latency -H 'Host: bench.test' "$@" "$url")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  R_[$t.$key]=$rps; R_[$t.${key}p50]=$(us "$p50"); R_[$t.${key}p99]=$(us "$p99")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "harness: $t $key: $(grep -E 'Non-2xx|Socket errors' <<<"$out")" >&2; fi
  if [ -n "$pid" ]; then c1=$(tree_ticks "$pid"); R_[$t.${key}cpu]=$(python3 -c "print('%.1f' % ((($c1-$c0)/$hz)/$total*1e6))"); fi
}

h2_run() { # target
  local t=$1 port pid c0 c1 out rps total
  port=$(https_port "$t"); [ -z "$port" ] && return 0
  pid=$(pid_of "$t"); [ -n "$pid" ] && c0=$(tree_ticks "$pid")
  out=$(h2load -c 50 -m 10 -t 2 -D "$SECS" -H ':authority: bench.test' "https://127.0.0.1:$port/small.txt" 2>&1)
  rps=$(awk '/^finished in/ {gsub(",","",$4); print $4}' <<<"$out")
  total=$(awk '/^requests:/ {print $8}' <<<"$out")
  R_[$t.h2]=$rps
  if ! grep -q " 0 failed, 0 errored" <<<"$out"; then echo "harness: $t h2: $(grep '^requests:' <<<"$out")" >&2; fi
  if [ -n "$pid" ] && [ "${total:-0}" -gt 0 ]; then c1=$(tree_ticks "$pid"); R_[$t.h2cpu]=$(python3 -c "print('%.1f' % ((($c1-$c0)/$hz)/$total*1e6))"); fi
}

idle_memory() { # target -> KiB per idle keep-alive connection
  local t=$1 pid before after
  pid=$(pid_of "$t"); [ -z "$pid" ] && return 0
  before=$(tree_rss "$pid")
  python3 - "$(http_port "$t")" "$IDLE" "$work/idle.$t" <<'EOF' &
import socket, sys, time
port, n, flag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /small.txt HTTP/1.1\r\nHost: bench.test\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 1024:
        got += s.recv(4096)
    socks.append(s)
open(flag, "w").close()
time.sleep(3)
EOF
  local holder=$!
  for _ in $(seq 1 400); do [ -e "$work/idle.$t" ] && break; sleep 0.05; done
  sleep 1
  after=$(tree_rss "$pid")
  wait "$holder" || true
  R_[$t.idle]=$(python3 -c "print('%.2f' % (($after-$before)/$IDLE))")
}

metrics=(ka kap50 kap99 kacpu close closep99 closecpu tls tlsp99 tlscpu hs hscpu h2 h2cpu)
declare -A ALL
for r in $(seq 1 "$RUNS"); do
  for t in "${targets[@]}"; do
    echo "harness: round $r/$RUNS, measuring $t" >&2
    # First, on the fresh process: after the loads the allocator (and nginx's and HAProxy's
    # pools) would serve the idle connections from memory the loads freed, and show nothing.
    [ "$r" = 1 ] && idle_memory "$t"
    sleep 0.3; wrk_run "$t" ka "http://127.0.0.1:$(http_port "$t")/small.txt"
    sleep 0.3; wrk_run "$t" close "http://127.0.0.1:$(http_port "$t")/small.txt" -H "Connection: close"
    if [ -n "$(https_port "$t")" ]; then
      sleep 0.3; wrk_run "$t" tls "https://127.0.0.1:$(https_port "$t")/small.txt"
      sleep 0.3; wrk_run "$t" hs "https://127.0.0.1:$(https_port "$t")/small.txt" -H "Connection: close"
      sleep 0.3; h2_run "$t"
    fi
    for m in "${metrics[@]}"; do [ -n "${R_[$t.$m]:-}" ] && ALL[$t.$m]+="${R_[$t.$m]}"$'\n'; done
  done
done
for t in "${targets[@]}"; do
  for m in "${metrics[@]}"; do [ -n "${ALL[$t.$m]:-}" ] && R_[$t.$m]=$(printf '%s' "${ALL[$t.$m]}" | median); done
done

ratio() { python3 -c "a,b='$1','$2'; print('%.2f' % (float(a)/float(b)) if a and b and float(b) else '-')"; }
extra=""; [ -n "${PINGORA:-}" ] && extra=pingora
printf '\n%-36s %10s %10s %10s %10s %10s %9s %9s\n' "metric (same run, loopback)" direct router nginx haproxy "$extra" "r/nginx" "r/haproxy"
row() {
  local d=${R_[direct.$2]:-} a=${R_[router.$2]:-} n=${R_[nginx.$2]:-} h=${R_[haproxy.$2]:-} p=${R_[pingora.$2]:-}
  printf '%-36s %10s %10s %10s %10s %10s %9s %9s\n' "$1" "${d:--}" "${a:--}" "${n:--}" "${h:--}" "${p:-}" "$(ratio "$a" "$n")" "$(ratio "$a" "$h")"
}
row "HTTP keep-alive requests/s" ka
row "HTTP keep-alive p50 (µs)" kap50
row "HTTP keep-alive p99 (µs)" kap99
row "proxy CPU µs per request" kacpu
row "HTTP Connection: close requests/s" close
row "Connection: close p99 (µs)" closep99
row "proxy CPU µs per new connection" closecpu
row "HTTPS keep-alive requests/s" tls
row "HTTPS keep-alive p99 (µs)" tlsp99
row "proxy CPU µs per HTTPS request" tlscpu
row "TLS handshakes/s (HTTPS, close)" hs
row "proxy CPU µs per TLS handshake" hscpu
row "HTTP/2 requests/s (h2load -m 10)" h2
row "proxy CPU µs per HTTP/2 request" h2cpu
row "proxy KiB per idle keep-alive conn" idle
echo
echo "(medians of ${RUNS} rounds; ${SECS}s per load run; wrk -t2 -c50; h2load -c50 -m10 -t2; ${IDLE} idle connections, round 1, before the loads;"
echo " every proxy on one thread; backend nginx, 1 KiB file; direct HTTPS is the backend's own TLS)"
