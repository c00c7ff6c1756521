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
sleep 0.5
dig @127.0.0.1 -p "$AMB_DNS" +short svc1.bench.viking.internal | grep -q 127.0.0.1 || { echo "harness: the ambassador does not answer DNS" >&2; exit 1; }
dig @127.0.0.1 -p "$MASQ" +short svc1.bench.viking.internal | grep -q 127.0.0.1 || { echo "harness: dnsmasq does not answer" >&2; exit 1; }

qps() { # port -> queries per second (and lost %) over SECS
  dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$SECS" -c 4 -q 200 2>/dev/null \
    | awk '/Queries per second/ {q=$4} /Queries lost/ {l=$4} END {print q, l}'
}

echo "DNS: $SERVICES names, dnsperf -c 4 -q 200 for ${SECS}s, $ROUNDS alternating rounds"
: >"$work/amb.qps"; : >"$work/masq.qps"
for r in $(seq 1 "$ROUNDS"); do
  a=$(qps "$AMB_DNS"); m=$(qps "$MASQ")
  echo "  round $r: ambassador ${a% *} q/s (lost ${a#* }), dnsmasq ${m% *} q/s (lost ${m#* })"
  echo "${a% *}" >>"$work/amb.qps"; echo "${m% *}" >>"$work/masq.qps"
done
a=$(median <"$work/amb.qps"); m=$(median <"$work/masq.qps")
awk -v a="$a" -v m="$m" 'BEGIN { printf "DNS median: ambassador %.0f q/s, dnsmasq %.0f q/s: %.2fx\n", a, m, a/m }'

gbps() { iperf3 -c 127.0.0.1 -p "$first_port" -t "$SECS" -J 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }
alone=$(gbps)
dnsperf -s 127.0.0.1 -p "$AMB_DNS" -d "$work/queries" -l "$((SECS + 2))" -c 4 -q 200 >"$work/loaded.dnsperf" 2>&1 &
perf=$!
sleep 1
loaded=$(gbps)
wait "$perf" || true
during=$(awk '/Queries per second/ {print $4}' "$work/loaded.dnsperf")
awk -v a="$alone" -v l="$loaded" -v q="$during" 'BEGIN { printf "TCP through the ambassador: alone %.2f Gbit/s, with its DNS loaded %.2f Gbit/s (%.2fx); DNS meanwhile %.0f q/s\n", a, l, l/a, q }'
