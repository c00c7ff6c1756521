#!/usr/bin/env bash
# Builds viking/busybox, the image of the examples and the tests, from the host's static
# busybox (Debian's busybox-static): no registry is needed. Idempotent: skipped when the
# daemon (DOCKER_HOST, or the local socket) already has this version of it.
set -euo pipefail

image=viking/busybox:latest
version=1   # bump when what goes into the image changes

have=$(docker image inspect --format '{{index .Config.Labels "viking.image"}}' "$image" 2>/dev/null || true)
[ "$have" = "$version" ] && exit 0

[ -x /bin/busybox ] || { echo "images: /bin/busybox missing; apt-get install busybox-static" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/www" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo "viking" > "$root/www/index.html"
tar -C "$root" -c . | docker import -c 'CMD ["/bin/sh"]' -c "LABEL viking.image=$version" - "$image" >/dev/null
echo "images: built $image" >&2
