#!/usr/bin/env bash
# Installs what viking needs to build and test on Debian/Ubuntu, idempotently.
#
#   protobuf-compiler  protoc, for etcd-client's build script
#   libprotobuf-dev    protobuf's well-known .proto files, which etcd-client's protos import
#                      (a Recommends of protobuf-compiler, so not pulled in below)
#   etcd-server        etcd: every test talks to a real etcd
#   etcd-client        etcdctl, for the scripts (Debian ships it apart from the server)
#   nftables iproute2  locknet and the network-namespace tests
#   curl               `make up` reads the ambassador's admin server
#   docker.io          dockerd: the registrator and `viking run` talk to a real Docker
#   busybox-static     the tests' and examples' images are built from it (no registry)
#   dnsutils           dig, the real DNS client the ambassador's DNS tests use
#   dnsmasq-base       dnsmasq, the real DNS server behind the ambassador's UDP tests
#   openssl            the router's tests make their CA and certificates with it
#   nghttp2-client     h2load, the HTTP/1.1 and HTTP/2 load client of the router's tests
#   wrk                the load behind the router's rolling-update test
#   python3-websockets a real WebSocket client and echo server (Debian's /usr/bin/python3)
#
# As root it installs what is missing with apt and starts dockerd if none answers;
# otherwise it prints the one command to run.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import websockets' 2>/dev/null || need+=(python3-websockets)
# The UI's browser test: headless Chromium through its WebDriver.
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install Rust with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi

if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing ${need[*]}; install them with:" >&2
  echo "  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi

if [ ${#need[@]} -gt 0 ]; then
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
fi
# Debian's etcd-server starts a system etcd where systemd runs; the tests never use it
# (each starts its own on free ports), and `make up` reuses it when it answers on 2379.
for bin in protoc etcd etcdctl nft ip dockerd; do
  command -v "$bin" >/dev/null 2>&1 || { echo "setup: $bin still missing after install" >&2; exit 1; }
done

# A Docker daemon must answer. Where systemd runs, it starts docker.service; elsewhere
# (containers, CI sandboxes) we start dockerd ourselves and leave it running for later runs.
docker_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if ! docker_answers; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: no Docker daemon answers; start it with: sudo systemctl start docker" >&2
    exit 1
  fi
  if [ "$(systemctl is-system-running 2>/dev/null || true)" = running ] || \
     [ "$(systemctl is-system-running 2>/dev/null || true)" = degraded ]; then
    systemctl start docker >/dev/null 2>&1 || true
  fi
  if ! docker_answers; then
    echo "setup: starting dockerd (log: /var/log/viking-dockerd.log)" >&2
    nohup dockerd >>/var/log/viking-dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 150); do
      docker_answers && break
      sleep 0.2
    done
  fi
  docker_answers || {
    tail -20 /var/log/viking-dockerd.log >&2 || true
    echo "setup: dockerd did not start (log: /var/log/viking-dockerd.log)" >&2
    exit 1
  }
fi
