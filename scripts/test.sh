#!/usr/bin/env bash
# Runs every test of the workspace once, in two tiers, and ends with one summary line over all
# test binaries ("N passed, N failed"), so a reader (or CI) sees the totals rather than the
# last binary's.
#
#   1. unit tests of every library (`cargo test --workspace --lib`), in a network namespace
#      with only loopback and without etcd, Docker or nft (scripts/unit-isolated.sh);
#   2. everything else: the binaries' own tests, the integration tests and the scenarios,
#      against real etcd, Docker and nftables; the ambassador's suite again with its kernel
#      path taking every connection at once and with it off. Doc comments hold no tests.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
bash scripts/unit-isolated.sh 2>&1 | tee "$log"
unit=${PIPESTATUS[0]}
# --no-fail-fast: one failing test binary does not hide the results of the others.
cargo test --workspace --locked --no-fail-fast --bins --test '*' "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
# The ambassador's suite twice more: with the kernel path taking every connection at once,
# and with it off (the daemon's env twins; its in-process tests read them too). The binary the
# run above built, run again as cargo runs it (from its package's directory): `cargo test -p
# ambassador` would build the dependencies again with that package's features alone.
amb_suite=$(cargo test --workspace --locked --bins --test '*' --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" \
            and "/ambassador#" in m["package_id"] and m.get("executable"):
        print(m["executable"])')
if [ -z "$amb_suite" ]; then
  echo "test.sh: the ambassador's integration test binary was not found" >&2
  status=1
fi
for mode in VIKING_KERNEL_FORWARD_AFTER=0 VIKING_KERNEL_FORWARD=off \
    "VIKING_KERNEL_FORWARD_AFTER=0 VIKING_KERNEL_SENDERS=host"; do
  [ -n "$amb_suite" ] || break
  echo "== the ambassador's suite with $mode"
  # shellcheck disable=SC2086 # a mode is one or more NAME=VALUE words
  (cd ambassador && env $mode "$amb_suite" "$@") 2>&1 | tee -a "$log"
  again=${PIPESTATUS[0]}
  [ "$again" -eq 0 ] || status=$again
done
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
[ "$unit" -eq 0 ] && [ "$status" -eq 0 ]
