#!/usr/bin/env bash
# The DNS harness: the ambassador's service DNS and Debian's dnsmasq serving the same names
# from a hosts file, side by side in one run (alternating rounds, medians), with dnsperf; then
# the ambassador's TCP throughput (iperf3 through one of its ports) alone and while its DNS
# is loaded. Loopback only; every load bounded in time.
#
#   make bench-dns            (or: bash benches/dns/harness.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."

SECS=${BENCH_SECS:-10}       # length of each load run
ROUNDS=${BENCH_ROUNDS:-3}
SERVICES=${BENCH_SERVICES:-100}

need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v iperf3 >/dev/null || need+=(iperf3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/viking-bench-apt.log 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/viking-bench-apt.log 2>&1; }
  else
    echo "harness: missing ${need[*]}; sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi
bash scripts/setup.sh
cargo build --release -q -p ambassador
AMB=target/release/ambassador

work=$(mktemp -d /tmp/viking-dns-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "harness: nothing listens on $1" >&2; return 1; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

ETCD_PORT=$(free_port); PEER_PORT=$(free_port)
etcd --name bench --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-cluster "bench=http://127.0.0.1:$PEER_PORT" \
  --log-level error --logger zap >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_port "$ETCD_PORT"
export ETCDCTL_API=3
ctl() { etcdctl --endpoints "http://127.0.0.1:$ETCD_PORT" "$@" >/dev/null; }

IPERF=$(free_port)
iperf3 -s -p "$IPERF" -B 127.0.0.1 >/dev/null 2>&1 &
pids+=($!)

# The same names for both servers: svcN.bench.viking.internal -> 127.0.0.1.
: >"$work/queries"; : >"$work/hosts"
first_port=""
for i in $(seq 1 "$SERVICES"); do
  port=$(free_port)
  [ -n "$first_port" ] || first_port=$port
  ctl put "/viking/ports/alloc/bench/svc$i/80-tcp" "{\"v\":1,\"port\":$port}"
  ctl put "/viking/services/bench/svc$i/80-tcp/bench:$(printf '%012x' "$i"):80" \
    "{\"v\":1,\"host\":\"bench\",\"addr\":\"127.0.0.1\",\"port\":$IPERF,\"container_id\":\"$(printf '%012x' "$i")\"}"
  echo "svc$i.bench.viking.internal A" >>"$work/queries"
  echo "127.0.0.1 svc$i.bench.viking.internal" >>"$work/hosts"
done

AMB_DNS=$(free_port); ADMIN=$(free_port)
"$AMB" --etcd "http://127.0.0.1:$ETCD_PORT" --bind 127.0.0.1 --dns "127.0.0.1:$AMB_DNS" \
  --admin "127.0.0.1:$ADMIN" --host bench >"$work/amb.log" 2>&1 &
pids+=($!)
amb_pid=$!
wait_port "$first_port"

MASQ=$(free_port)
dnsmasq --keep-in-foreground --port="$MASQ" --listen-address=127.0.0.1 --bind-interfaces \
  --no-resolv --no-hosts --addn-hosts="$work/hosts" --cache-size=10000 --user=root \
  --pid-file="$work/dnsmasq.pid" >"$work/dnsmasq.log" 2>&1 &
pids+=($!)
masq_pid=$!
sleep 0.5
dig @127.0.0.1 -p "$AMB_DNS" +short svc1.bench.viking.internal | grep -q 127.0.0.1 || { echo "harness: the ambassador does not answer DNS" >&2; exit 1; }
dig @127.0.0.1 -p "$MASQ" +short svc1.bench.viking.internal | grep -q 127.0.0.1 || { echo "harness: dnsmasq does not answer" >&2; exit 1; }

qps() { # port pid -> "queries/s server-CPU-µs/query"
  local before after out
  before=$(cpu_ticks "$2")
  out=$(dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$SECS" -c 4 -q 200 2>/dev/null)
  after=$(cpu_ticks "$2")
  echo "$out" | awk -v t=$((after - before)) -v hz="$hz" \
    '/Queries completed/ {n=$3} /Queries per second/ {q=$4} END {printf "%.0f %.2f\n", q, t / hz * 1e6 / n}'
}

echo "DNS: $SERVICES names, dnsperf -c 4 -q 200 for ${SECS}s, $ROUNDS alternating rounds"
: >"$work/amb.qps"; : >"$work/masq.qps"; : >"$work/amb.cpu"; : >"$work/masq.cpu"
for r in $(seq 1 "$ROUNDS"); do
  a=$(qps "$AMB_DNS" "$amb_pid"); m=$(qps "$MASQ" "$masq_pid")
  echo "  round $r: ambassador ${a% *} q/s ${a#* } CPU-µs/q, dnsmasq ${m% *} q/s ${m#* } CPU-µs/q"
  echo "${a% *}" >>"$work/amb.qps"; echo "${m% *}" >>"$work/masq.qps"
  echo "${a#* }" >>"$work/amb.cpu"; echo "${m#* }" >>"$work/masq.cpu"
done
a=$(median <"$work/amb.qps"); m=$(median <"$work/masq.qps")
ac=$(median <"$work/amb.cpu"); mc=$(median <"$work/masq.cpu")
awk -v a="$a" -v m="$m" -v ac="$ac" -v mc="$mc" 'BEGIN { printf "DNS median: ambassador %.0f q/s, dnsmasq %.0f q/s: %.2fx; server CPU per query %.2f vs %.2f µs: %.2fx\n", a, m, a/m, ac, mc, ac/mc }'

gbps() { iperf3 -c 127.0.0.1 -p "$first_port" -t "$SECS" -J 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }
alone=$(gbps)
dnsperf -s 127.0.0.1 -p "$AMB_DNS" -d "$work/queries" -l "$((SECS + 2))" -c 4 -q 200 >"$work/loaded.dnsperf" 2>&1 &
perf=$!
sleep 1
loaded=$(gbps)
wait "$perf" || true
during=$(awk '/Queries per second/ {print $4}' "$work/loaded.dnsperf")
awk -v a="$alone" -v l="$loaded" -v q="$during" 'BEGIN { printf "TCP through the ambassador: alone %.2f Gbit/s, with its DNS loaded %.2f Gbit/s (%.2fx); DNS meanwhile %.0f q/s\n", a, l, l/a, q }'
