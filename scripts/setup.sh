#!/usr/bin/env bash
# Installs what viking needs to build and test on Debian/Ubuntu, idempotently.
#
#   protobuf-compiler  protoc, for etcd-client's build script
#   etcd-server        etcd: every test talks to a real etcd
#   etcd-client        etcdctl, for the scripts (Debian ships it apart from the server)
#   nftables iproute2  locknet and the network-namespace tests
#   curl               `make up` reads the ambassador's admin server
#
# As root it installs what is missing with apt; otherwise it prints the one command to run.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install Rust with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing ${need[*]}; install them with:" >&2
  echo "  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi

echo "setup: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/viking-apt.log 2>&1; then
  # A fresh machine may have no package lists yet.
  apt-get update -q >>/tmp/viking-apt.log 2>&1
  apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/viking-apt.log 2>&1 || {
    tail -20 /tmp/viking-apt.log >&2
    echo "setup: apt-get install ${need[*]} failed (log: /tmp/viking-apt.log)" >&2
    exit 1
  }
fi
# Debian's etcd-server starts a system etcd where systemd runs; the tests never use it
# (each starts its own on free ports), and `make up` reuses it when it answers on 2379.
for bin in protoc etcd etcdctl nft ip; do
  command -v "$bin" >/dev/null 2>&1 || { echo "setup: $bin still missing after install" >&2; exit 1; }
done
