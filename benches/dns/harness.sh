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

source benches/common.sh
need dnsperf:dnsperf dnsmasq:dnsmasq-base iperf3:iperf3
bash scripts/setup.sh
cargo build --release -q -p ambassador
AMB=target/release/ambassador

start_etcd

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
  --range 1-65535 --run-dir "$work/run" --admin "127.0.0.1:$ADMIN" --host bench >"$work/amb.log" 2>&1 &
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


echo "DNS: $SERVICES names, dnsperf -c 4 -q 200 for ${SECS}s, $ROUNDS alternating rounds"
: >"$work/amb.qps"; : >"$work/masq.qps"; : >"$work/amb.cpu"; : >"$work/masq.cpu"
for r in $(seq 1 "$ROUNDS"); do
  a=$(dnsperf_qps "$AMB_DNS" "$amb_pid"); m=$(dnsperf_qps "$MASQ" "$masq_pid")
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
