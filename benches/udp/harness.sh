#!/usr/bin/env bash
# UDP through the ambassador beside nginx's stream module and socat, in one run, on loopback
# (benches/benches/udp.rs says what is measured); then dnsperf against Debian's dnsmasq,
# directly, through an ambassador UDP port, and balanced by the same ambassador in the kernel
# (`--udp-kernel`: dnsperf runs in a cgroup the ambassador's programs are attached to), in
# alternating rounds. Installs the references when root. Every load is bounded in time.
#
#   make bench-udp
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${BENCH_SECS:-10}       # length of each dnsperf run
ROUNDS=${BENCH_ROUNDS:-3}
source benches/common.sh
need nginx:nginx socat:socat dnsperf:dnsperf dnsmasq:dnsmasq-base
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need no-such-command:libnginx-mod-stream
bash scripts/setup.sh
cargo build --release -q -p ambassador
cargo bench -q -p viking-benches --bench udp

# dnsperf: dnsmasq direct vs dnsmasq behind the ambassador (a UDP service port).
AMB=target/release/ambassador
start_etcd
: >"$work/queries"; : >"$work/hosts"
for i in $(seq 1 100); do
  echo "name$i.bench.test A" >>"$work/queries"
  echo "127.0.0.1 name$i.bench.test" >>"$work/hosts"
done
MASQ=$(free_port)
dnsmasq --keep-in-foreground --port="$MASQ" --listen-address=127.0.0.1 --bind-interfaces \
  --no-resolv --no-hosts --addn-hosts="$work/hosts" --cache-size=10000 --user=root \
  --pid-file="$work/dnsmasq.pid" >"$work/dnsmasq.log" 2>&1 &
pids+=($!)
PORT=$(free_port); ADMIN=$(free_port)
CG=$(new_cgroup udp); cgroups+=("$CG")
ctl put "/viking/ports/alloc/bench/dns/53-udp" "{\"v\":1,\"port\":$PORT}"
ctl put "/viking/services/bench/dns/53-udp/bench:000000000001:53" \
  "{\"v\":1,\"host\":\"bench\",\"addr\":\"127.0.0.1\",\"port\":$MASQ,\"container_id\":\"000000000001\"}"
"$AMB" --etcd "http://127.0.0.1:$ETCD_PORT" --bind 127.0.0.1 --dns off --threads 1 \
  --range 1-65535 --run-dir "$work/run" --admin "127.0.0.1:$ADMIN" --host bench \
  --udp-kernel "$CG" >"$work/amb.log" 2>&1 &
pids+=($!)
amb_pid=$!
for _ in $(seq 1 100); do
  dig @127.0.0.1 -p "$PORT" +short +tries=1 +time=1 name1.bench.test 2>/dev/null | grep -q 127.0.0.1 && break
  sleep 0.1
done
dig @127.0.0.1 -p "$PORT" +short name1.bench.test | grep -q 127.0.0.1 || { echo "harness: no answer through the ambassador" >&2; tail "$work/amb.log" >&2; exit 1; }

grep -q "balanced by the kernel" "$work/amb.log" || { echo "harness: --udp-kernel not taken" >&2; tail "$work/amb.log" >&2; exit 1; }

echo "dnsperf -c 4 -q 200 for ${SECS}s against dnsmasq: direct, through the ambassador, and balanced by it in the kernel; $ROUNDS alternating rounds"
: >"$work/direct"; : >"$work/amb"; : >"$work/cpu"; : >"$work/kernel"
for r in $(seq 1 "$ROUNDS"); do
  d=$(dnsperf_qps "$MASQ" "$amb_pid"); a=$(dnsperf_qps "$PORT" "$amb_pid"); k=$(dnsperf_qps "$PORT" "$amb_pid" "$CG")
  echo "  round $r: direct ${d% *} q/s, through the ambassador ${a% *} q/s (ambassador ${a#* } CPU-µs/query), kernel ${k% *} q/s (ambassador ${k#* } CPU-µs/query)"
  echo "${d% *}" >>"$work/direct"; echo "${a% *}" >>"$work/amb"; echo "${a#* }" >>"$work/cpu"; echo "${k% *}" >>"$work/kernel"
done
d=$(median <"$work/direct"); a=$(median <"$work/amb"); c=$(median <"$work/cpu"); k=$(median <"$work/kernel")
awk -v d="$d" -v a="$a" -v c="$c" -v k="$k" 'BEGIN { printf "dnsperf median: direct %.0f q/s, through the ambassador %.0f q/s: %.2fx (ambassador %.2f CPU-µs per query); --udp-kernel %.0f q/s: %.2fx\n", d, a, a/d, c, k, k/d }'
