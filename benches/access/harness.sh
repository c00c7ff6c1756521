#!/usr/bin/env bash
# Link-scoped access on the connection path: new TCP connections per second through an
# ambassador with `--links enforced` and through one with `--links open`, side by side in
# alternating rounds, each with its CPU per connection. The client (wrk, `Connection:
# close`) runs in a network namespace of the harness's own whose address is registered as a
# container that may reach the service (its `viking.links` label), so the enforced
# ambassador looks every connection's source up in its table, as for a container; nginx
# (1 KiB file) is the backend. Every load is bounded in time.
#
#   make bench-access
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${BENCH_SECS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
source benches/common.sh
need wrk:wrk nginx:nginx
bash scripts/setup.sh
cargo build --release -q -p ambassador
AMB=target/release/ambassador
start_etcd

# The client's namespace, on a veth: 10.213.77.2 there; the host side has .1 (the enforced
# ambassador's bind address) and .3 (the open one's).
NS=vkaccess$$; HOSTSIDE=vkacc$$h
ip netns add "$NS"
trap 'cleanup; ip netns del "$NS" 2>/dev/null || true; ip link del "$HOSTSIDE" 2>/dev/null || true' EXIT INT TERM
ip link add "$HOSTSIDE" type veth peer name eth0 netns "$NS"
ip addr add 10.213.77.1/24 dev "$HOSTSIDE"; ip addr add 10.213.77.3/24 dev "$HOSTSIDE"
ip link set "$HOSTSIDE" up
ip netns exec "$NS" ip addr add 10.213.77.2/24 dev eth0
ip netns exec "$NS" ip link set eth0 up; ip netns exec "$NS" ip link set lo up

start_nginx

PORT=$(free_port)
ctl put /viking/ports/alloc/bench/web/80-tcp "{\"v\":1,\"port\":$PORT}"
ctl put /viking/services/bench/web/80-tcp/bench:000000000001:80 \
  "{\"v\":1,\"host\":\"bench\",\"addr\":\"127.0.0.1\",\"port\":$NGINX,\"container_id\":\"000000000001\"}"
ctl put /viking/containers/bench/000000000002 \
  '{"v":1,"stack":"","job":"","addrs":["10.213.77.2"],"links_label":["bench/web"],"name":"client"}'
start_amb() { # name bind links
  local admin; admin=$(free_port)
  "$AMB" --etcd "http://127.0.0.1:$ETCD_PORT" --bind "$2" --dns off --range 1-65535 --host bench \
    --run-dir "$work/run-$1" --admin "127.0.0.1:$admin" --links "$3" >"$work/$1.log" 2>&1 &
  pids+=($!)
  eval "${1}_pid=$!; ${1}_admin=$admin"
  wait_port "$PORT" "$2"
}
start_amb enforced 10.213.77.1 enforced
start_amb open 10.213.77.3 open
for t in enforced open; do
  addr=$([ $t = enforced ] && echo 10.213.77.1 || echo 10.213.77.3)
  ip netns exec "$NS" curl -fs -m 3 -o /dev/null "http://$addr:$PORT/small.txt" \
    || { echo "harness: the client gets no answer through the $t ambassador" >&2; tail "$work/$t.log" >&2; exit 1; }
done
# The enforced one knows the client as a container, and accepted it.
known=$(curl -fs "http://127.0.0.1:$enforced_admin/state" | python3 -c 'import json, sys; print(json.load(sys.stdin)["containers_known"])')
[ "$known" = 1 ] || { echo "harness: the enforced ambassador knows $known containers, not the client alone" >&2; exit 1; }

rate() { # name addr -> "connections/s CPU-µs-per-connection"
  local pid c0 c1 out
  pid=$(eval echo "\$${1}_pid"); c0=$(cpu_ticks "$pid")
  out=$(ip netns exec "$NS" wrk -t2 -c50 -d"${SECS}s" -H "Connection: close" "http://$2:$PORT/small.txt")
  c1=$(cpu_ticks "$pid")
  awk -v t=$((c1 - c0)) -v hz="$hz" '/^Requests\/sec/ {r=$2} /requests in/ {n=$1} END {printf "%.0f %.1f\n", r, t / hz * 1e6 / n}' <<<"$out"
}
echo "wrk -t2 -c50 -H 'Connection: close' for ${SECS}s from a registered container address; $ROUNDS rounds, the first of each alternating"
: >"$work/e"; : >"$work/o"; : >"$work/ec"; : >"$work/oc"
# A warm-up of each, not counted (the first connections of a process cost more); then the
# rounds, which of the two goes first alternating.
SECS=1 rate enforced 10.213.77.1 >/dev/null; SECS=1 rate open 10.213.77.3 >/dev/null
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then
    e=$(rate enforced 10.213.77.1); o=$(rate open 10.213.77.3)
  else
    o=$(rate open 10.213.77.3); e=$(rate enforced 10.213.77.1)
  fi
  echo "  round $r: enforced ${e% *}/s (${e#* } µs), open ${o% *}/s (${o#* } µs)"
  echo "${e% *}" >>"$work/e"; echo "${e#* }" >>"$work/ec"; echo "${o% *}" >>"$work/o"; echo "${o#* }" >>"$work/oc"
done
refused=$(curl -fs "http://127.0.0.1:$enforced_admin/metrics" | awk '/^ambassador_connections_refused_total/ {s += $2} END {print s + 0}')
[ "$refused" = 0 ] || { echo "harness: the enforced ambassador refused $refused connections" >&2; exit 1; }
e=$(median <"$work/e"); o=$(median <"$work/o"); ec=$(median <"$work/ec"); oc=$(median <"$work/oc")
awk -v e="$e" -v o="$o" -v ec="$ec" -v oc="$oc" 'BEGIN { printf "new connections/s median: enforced %.0f, open %.0f: %.3fx (CPU µs per connection %.1f / %.1f: %.3fx)\n", e, o, e/o, ec, oc, ec/oc }'
