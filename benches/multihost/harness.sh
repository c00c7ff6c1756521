#!/usr/bin/env bash
# Cross-host: the proxy harness (benches/proxy/harness.sh) with its clients, the ambassador
# and HAProxy on host a and its backends on host b, two network namespaces linked by a veth
# pair. "direct" is the client on a straight to b; the ambassador and HAProxy sit on a, where
# a container on a would reach them. Needs root.
#
#   make bench-multihost       (or: bash benches/multihost/harness.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."

a=vkbench-a
b=vkbench-b
cleanup() { ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
cleanup
ip netns add "$a"
ip netns add "$b"
for ns in "$a" "$b"; do ip netns exec "$ns" ip link set lo up; done
ip link add eth0 netns "$a" type veth peer name eth0 netns "$b"
ip netns exec "$a" ip addr add 10.250.0.1/24 dev eth0
ip netns exec "$b" ip addr add 10.250.0.2/24 dev eth0
ip netns exec "$a" ip link set eth0 up
ip netns exec "$b" ip link set eth0 up

BENCH_BACKEND_NS="$b" BENCH_BACKEND_IP=10.250.0.2 BENCH_WHERE="a -> b over veth" \
  ip netns exec "$a" bash benches/proxy/harness.sh
