#!/usr/bin/env bash
# The fast tier, proved isolated: every library's unit tests (`cargo test --workspace --lib`)
# run in a network namespace of their own with only loopback up, with etcd, Docker and nft
# not on the PATH and DOCKER_HOST pointing nowhere. They need none of them; this shows it.
#
# Needs unshare (util-linux) and either root or unprivileged user namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --lib --locked --no-run -q
mapfile -t bins < <(cargo test --workspace --lib --locked --no-run --message-format=json 2>/dev/null |
  grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
[ ${#bins[@]} -gt 0 ] || { echo "unit-isolated: no unit test binaries found" >&2; exit 1; }

# A PATH with everything the machine has but etcd, Docker and nft.
shadow=$(mktemp -d)
trap 'rm -rf "$shadow"' EXIT
for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
  [ -d "$dir" ] || continue
  for f in "$dir"/*; do
    name=${f##*/}
    case $name in etcd*|docker*|dockerd|containerd*|nft) continue ;; esac
    [ -e "$shadow/$name" ] || ln -s "$f" "$shadow/$name"
  done
done

run() {
  ip link set lo up
  for cmd in etcd docker dockerd nft; do
    if command -v "$cmd" >/dev/null 2>&1; then echo "unit-isolated: $cmd is on the PATH" >&2; exit 1; fi
  done
  status=0
  for bin in "$@"; do
    "$bin" -q || status=1
  done
  exit $status
}
flags=-n
[ "$(id -u)" -eq 0 ] || flags=-rn
PATH=$shadow DOCKER_HOST=unix:///nonexistent/docker.sock \
  unshare $flags bash -c "$(declare -f run); run \"\$@\"" unit-isolated "${bins[@]}"
