# The two commands a fresh machine needs:
#   make up     the main job on this host (a local etcd started for you)
#   make test   install what is missing, then fmt, clippy and every test
.PHONY: up test setup fmt lint unit bench bench-grid bench-proxy bench-udp bench-registrator bench-locknet bench-dns bench-multihost bench-router

CARGO ?= cargo

up:
	bash scripts/up.sh

test: setup fmt lint unit

setup:
	bash scripts/setup.sh

fmt:
	$(CARGO) fmt --all --check

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	bash scripts/test.sh

bench: setup
	$(CARGO) bench -p viking-benches --bench portalloc

bench-grid: setup
	$(CARGO) bench -p viking-benches --bench placement
	$(CARGO) bench -p viking-benches --bench scheduler
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p viking-benches --bench grid_real

bench-udp: setup
	bash benches/udp/harness.sh

bench-registrator: setup
	$(CARGO) bench -p viking-benches --bench registrator

bench-locknet: setup
	$(CARGO) bench -p viking-benches --bench locknet

bench-dns: setup
	bash benches/dns/harness.sh

bench-multihost: setup
	bash benches/multihost/harness.sh

bench-proxy: setup
	bash benches/proxy/harness.sh

bench-router: setup
	bash benches/router/harness.sh
