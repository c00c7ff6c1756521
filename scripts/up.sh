#!/usr/bin/env bash
# The main job on one host, as far as viking goes today: a local etcd (started for you
# unless one already answers on 127.0.0.1:2379), the HQ deploying the design notes' example
# stacks (ports allocated, docker-link env shown), the ambassador listening on every
# allocated port, and the registrator turning what Docker runs here into endpoints.
# Ctrl-C stops what this started.
#
# `viking up` and `viking run` come with their own issue; this script grows with them.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -q -p portalloc -p hq -p ambassador -p registrator
portalloc=target/release/portalloc
viking=target/release/viking
ambassador=target/release/ambassador
registrator=target/release/registrator

endpoint=${VIKING_ETCD:-http://127.0.0.1:2379}
data=${VIKING_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/viking}
started=""
amb=""
reg=""
cleanup() {
  if [ -n "$reg" ]; then
    echo "up: stopping the registrator (pid $reg)"
    kill "$reg" 2>/dev/null || true
    wait "$reg" 2>/dev/null || true
  fi
  if [ -n "$amb" ]; then
    echo "up: stopping the ambassador (pid $amb)"
    kill "$amb" 2>/dev/null || true
    wait "$amb" 2>/dev/null || true
  fi
  if [ -n "$started" ]; then
    echo "up: stopping etcd (pid $started)"
    kill "$started" 2>/dev/null || true
    wait "$started" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 0' INT TERM

if ETCDCTL_API=3 etcdctl --endpoints "$endpoint" endpoint health >/dev/null 2>&1; then
  echo "up: using the etcd that answers at $endpoint"
else
  if [ "$endpoint" != "http://127.0.0.1:2379" ]; then
    echo "up: no etcd answers at $endpoint (VIKING_ETCD); start it or unset VIKING_ETCD" >&2
    exit 1
  fi
  mkdir -p "$data"
  echo "up: starting etcd with its data in $data/etcd (log: $data/etcd.log)"
  etcd --name viking --data-dir "$data/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster viking=http://127.0.0.1:2380 >"$data/etcd.log" 2>&1 &
  started=$!
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$endpoint" endpoint health >/dev/null 2>&1 && break
    kill -0 "$started" 2>/dev/null || { tail -20 "$data/etcd.log" >&2; echo "up: etcd exited" >&2; exit 1; }
    sleep 0.1
  done
fi

export VIKING_ETCD="$endpoint"
echo "up: deploying the design notes' example stacks (idempotent: the same ports every run)"
"$viking" deploy examples/design-notes/shared examples/design-notes/app
echo
"$viking" ps
echo
echo "up: the env app/web's containers get:"
"$viking" env app/web
echo
echo "up: ambassador ports:"
"$portalloc" list
echo
# The ambassador: on docker0's address where Docker runs, else on loopback for a look.
bind=$( (ip -4 -o addr show docker0 2>/dev/null || true) | awk '{print $4}' | cut -d/ -f1)
bind=${bind:-127.0.0.1}
admin=${VIKING_ADMIN:-127.0.0.1:9100}
"$ambassador" --bind "$bind" --admin "$admin" &
amb=$!
for _ in $(seq 1 100); do
  curl -fs "http://$admin/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "up: the ambassador listens on $bind for every allocated port; its state (http://$admin/state):"
curl -fs "http://$admin/state" || echo "up: the ambassador did not answer on $admin (see its log above)"
echo
# The registrator: what Docker runs here becomes endpoints (address: the default route's
# interface, else loopback on a machine without one).
addr_flag=()
ip route show default 2>/dev/null | grep -q . || addr_flag=(--addr 127.0.0.1)
"$registrator" "${addr_flag[@]}" &
reg=$!
echo "up: the registrator follows Docker: containers with published ports become endpoints"
echo "up: (try: docker run -d -l viking.stack=shared -l viking.job=mongo -p 27017 <image>)"
echo "up: etcd at $endpoint; try: $viking graph, $viking env app/middleware --format docker, curl http://$admin/metrics"
echo "up: Ctrl-C stops what this started"
wait
