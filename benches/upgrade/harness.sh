#!/usr/bin/env bash
# The upgrade harness (issue 20): wrk with `Connection: close` (-c 50) through the ambassador
# for $SECS s, once undisturbed and once with an upgrade (`ambassador --upgrade`, the same
# hand-over SIGUSR2 starts) every 2 s; requests/s of the second against the first, and the
# socket errors of each. Loopback only; every load bounded in time.
#
#   make bench-upgrade            (or: bash benches/upgrade/harness.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."

SECS=${BENCH_SECS:-20}
EVERY=${BENCH_UPGRADE_EVERY:-2}
RUNS=${BENCH_RUNS:-3}        # pairs of runs; each figure is the median

source benches/common.sh
need wrk:wrk nginx:nginx
bash scripts/setup.sh
cargo build --release -q -p ambassador
AMB=target/release/ambassador

start_etcd
start_nginx

PORT=$(free_port); ADMIN=$(free_port)
ctl put /viking/ports/alloc/bench/nginx/80-tcp "{\"v\":1,\"port\":$PORT}"
ctl put /viking/services/bench/nginx/80-tcp/bench:000000000002:80 "{\"v\":1,\"host\":\"bench\",\"addr\":\"127.0.0.1\",\"port\":$NGINX,\"container_id\":\"000000000002\"}"
args=(--etcd "http://127.0.0.1:$ETCD_PORT" --host bench --bind 127.0.0.1 --dns off
  --range 1-65535 --run-dir "$work/run" --admin "127.0.0.1:$ADMIN" --grace 5s)
env RUST_LOG=warn,runtime::handover=info "$AMB" "${args[@]}" >"$work/ambassador-0.log" 2>&1 &
pids+=($!)
wait_port "$PORT"

# wrk_close -> "requests/s socket-errors"
wrk_close() {
  wrk -t 2 -c 50 -d "${SECS}s" -H 'Connection: close' "http://127.0.0.1:$PORT/small.txt" 2>&1 |
    awk '/Requests\/sec/ {r=$2}
         /Socket errors/ {gsub(",", ""); e=$4+$6+$8+$10}
         /Non-2xx/ {e+=$NF}
         END {printf "%.0f %d\n", r, e}'
}

upgrades=0
plain=(); upgraded=(); plain_err=0; upgraded_err=0
for run in $(seq 1 "$RUNS"); do
  read -r rps err < <(wrk_close)
  plain+=("$rps"); plain_err=$((plain_err + err))
  # The same load with an upgrade every $EVERY s (each new process tracked for clean-up).
  (
    end=$((SECONDS + SECS - 1))
    n=0
    while [ $SECONDS -lt $end ]; do
      sleep "$EVERY"
      n=$((n + 1))
      env RUST_LOG=warn,runtime::handover=info "$AMB" "${args[@]}" --upgrade >>"$work/ambassador-up.log" 2>&1 &
      echo $! >>"$work/upgrade.pids"
    done
  ) &
  loop=$!
  read -r rps err < <(wrk_close)
  wait "$loop"
  while read -r p; do pids+=("$p"); done <"$work/upgrade.pids"
  upgrades=$((upgrades + $(wc -l <"$work/upgrade.pids")))
  rm -f "$work/upgrade.pids"
  upgraded+=("$rps"); upgraded_err=$((upgraded_err + err))
done
took=$(grep -c 'took over' "$work/ambassador-up.log" || true)
failed=$(grep -c 'not taking over\|hand-over failed\|refused the upgrade' "$work/ambassador-up.log" || true)
p=$(printf '%s\n' "${plain[@]}" | median); u=$(printf '%s\n' "${upgraded[@]}" | median)
echo
echo "wrk -c 50 Connection: close, ${SECS} s, median of $RUNS runs each ($(date -u +%F))"
printf '| %-34s | %12s | %13s |\n' "run" "requests/s" "socket errors"
printf '| %-34s | %12s | %13s |\n' "no upgrade" "$p" "$plain_err"
printf '| %-34s | %12s | %13s |\n' "an upgrade every ${EVERY} s" "$u" "$upgraded_err"
awk -v u="$u" -v p="$p" 'BEGIN {printf "ratio: %.3f\n", u / p}'
echo "upgrades started: $upgrades, took over: $took, failed: $failed"
