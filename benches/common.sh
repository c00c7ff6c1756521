# Shared by the bench harnesses (sourced, not run): tools, a work dir cleaned up on exit with
# every process it started, free ports, CPU and memory readings, a private etcd.

# need CMD:PACKAGE ... : installs what is missing with apt when root, else says what to run.
need() {
  local missing=() pair
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "harness: missing ${missing[*]}; sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/viking-bench-apt.log 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/viking-bench-apt.log 2>&1; }
}

work=$(mktemp -d /tmp/viking-bench.XXXXXX)
pids=()
cgroups=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for c in "${cgroups[@]}"; do echo 1 >"$c/cgroup.kill" 2>/dev/null || true; rmdir "$c" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_port PORT [HOST]
wait_port() {
  local host=${2:-127.0.0.1}
  for _ in $(seq 1 200); do (exec 3<>/dev/tcp/"$host"/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "harness: nothing listens on $host:$1" >&2
  tail -n 5 "$work"/*.log "$work"/*.err 2>/dev/null >&2
  return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
hz=$(getconf CLK_TCK)

# make_www: $work/www with the 1 KiB small.txt every nginx backend serves. nginx's workers
# run as nobody: they must get through the (0700) work dir to the file, or every request is
# answered 403.
make_www() {
  mkdir -p "$work/www"
  chmod 711 "$work"; chmod 755 "$work/www"
  head -c 1024 /dev/zero | tr '\0' 'x' >"$work/www/small.txt"
}

# start_nginx: nginx (one worker) serving a 1 KiB small.txt on 127.0.0.1:$NGINX (set here).
start_nginx() {
  NGINX=$(free_port)
  make_www
  cat >"$work/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 8192; }
http { access_log off; server { listen 127.0.0.1:$NGINX backlog=4096; root $work/www; } }
CONF
  nginx -c "$work/nginx.conf" -p "$work" >/dev/null 2>&1 &
  pids+=($!)
  wait_port "$NGINX"
}

# A private etcd on a free loopback port: sets ETCD_PORT and defines ctl (etcdctl).
start_etcd() {
  ETCD_PORT=$(free_port)
  local peer; peer=$(free_port)
  etcd --name bench --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "bench=http://127.0.0.1:$peer" \
    --log-level error --logger zap >"$work/etcd.log" 2>&1 &
  pids+=($!)
  wait_port "$ETCD_PORT"
  export ETCDCTL_API=3
}
ctl() { etcdctl --endpoints "http://127.0.0.1:$ETCD_PORT" "$@" >/dev/null; }

# new_cgroup NAME: a cgroup (v2) of the harness's own, removed on exit; prints its path.
new_cgroup() {
  local root c
  root=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts)
  [ -n "$root" ] || { echo "harness: no cgroup v2 hierarchy mounted" >&2; return 1; }
  c="$root/viking-bench-$1-$$"
  mkdir -p "$c" && echo "$c"
}

# dnsperf_qps PORT PID [CGROUP]: dnsperf (-c 4 -q 200, $SECS s, queries from $work/queries)
# against 127.0.0.1:PORT, run inside CGROUP if given -> "queries/s CPU-µs-of-PID-per-query".
dnsperf_qps() {
  local before after out
  before=$(cpu_ticks "$2")
  out=$(sh -c '[ -z "$1" ] || echo $$ >"$1/cgroup.procs"; shift; exec "$@"' sh "${3:-}" \
    dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$SECS" -c 4 -q 200 2>/dev/null)
  after=$(cpu_ticks "$2")
  echo "$out" | awk -v t=$((after - before)) -v hz="$hz" \
    '/Queries completed/ {n=$3} /Queries per second/ {q=$4} END {printf "%.0f %.2f\n", q, t / hz * 1e6 / n}'
}
