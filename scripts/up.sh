#!/usr/bin/env bash
# The main job on one host: `viking up` (a local etcd unless one answers on 127.0.0.1:2379,
# the ambassador, the registrator, the launcher and the router, in one process), the hello
# examples deployed and run through the grid, the app's container fetching from its backend
# through the ambassador, and the backend's domain served by the router on 127.0.0.1:8080.
# Ctrl-C stops all of it: the example containers, viking up and the etcd it started.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/images.sh
cargo build --release -q -p hq
viking=${CARGO_TARGET_DIR:-target}/release/viking
admin=${VIKING_ADMIN:-127.0.0.1:9100}
router=${VIKING_UP_ROUTER_HTTP:-127.0.0.1:8080}

# The registrator registers endpoints at the default route's address; on a box without one
# (offline), this host alone is the cluster and loopback will do.
addr=()
[ -n "$(ip route show default 2>/dev/null)" ] || addr=(--addr 127.0.0.1)
"$viking" up --admin "$admin" "${addr[@]}" --router --router-http "$router" --router-https off &
up=$!
logs=""
cleanup() {
  trap - EXIT INT TERM
  [ -n "$logs" ] && kill "$logs" 2>/dev/null || true
  echo "up: stopping the examples and viking"
  "$viking" stop app >/dev/null 2>&1 || true
  "$viking" stop shared >/dev/null 2>&1 || true
  kill -INT "$up" 2>/dev/null || true
  wait "$up" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

for _ in $(seq 1 300); do
  curl -fs "http://$admin/healthz" >/dev/null 2>&1 && break
  kill -0 "$up" 2>/dev/null || { echo "up: viking up exited (see above)" >&2; exit 1; }
  sleep 0.1
done

echo "up: deploying and running examples/hello (shared/web x2, app/client linking to it)"
"$viking" deploy examples/hello/shared examples/hello/app
"$viking" run shared app
echo
"$viking" ps
echo
echo "up: app/client's containers get (viking env app/client):"
"$viking" env app/client
echo
echo "up: the router serves shared/web's domain (curl -H 'Host: hello.localhost' http://$router/):"
for _ in $(seq 1 50); do
  answer=$(curl -fs -H 'Host: hello.localhost' "http://$router/" 2>/dev/null) && break
  sleep 0.2
done
echo "up:   ${answer:-no answer yet; see viking routes}"
echo
echo "up: app/client fetches \$SHARED_WEB_PORT_80 through the ambassador every 2 s; each"
echo "up: answer is the hostname of the shared/web container that served it. Ctrl-C stops."
"$viking" logs app/client --follow --tail 5 &
logs=$!
wait "$up"
