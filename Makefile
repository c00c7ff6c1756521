# The two commands a fresh machine needs:
#   make up     the main job on this host (a local etcd started for you)
#   make test   install what is missing, then fmt, clippy and every test
.PHONY: up test setup fmt lint unit install bench bench-grid bench-proxy bench-udp bench-access bench-registrator bench-locknet bench-dns bench-multihost bench-router bench-upgrade bench-ui

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

bench-access: setup
	bash benches/access/harness.sh

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

bench-upgrade: setup
	bash benches/upgrade/harness.sh

bench-ui: setup
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p viking-benches --bench ui

# make install [PREFIX=/usr/local] [DESTDIR=] [PROFILE=release-lto]: the binaries, their man
# pages (each binary's --man-page), viking's shell completions and the systemd units (their
# ExecStart pointed at PREFIX). /etc/default/viking is installed only when absent.
PREFIX ?= /usr/local
PROFILE ?= release-lto
BINS := viking ambassador registrator launcher router portalloc
install:
	$(CARGO) build --profile $(PROFILE) --workspace --bins
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/share/man/man1 \
	  $(DESTDIR)$(PREFIX)/lib/systemd/system \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions $(DESTDIR)$(PREFIX)/share/zsh/site-functions \
	  $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d $(DESTDIR)/etc/default
	for b in $(BINS); do \
	  install -m 0755 target/$(PROFILE)/$$b $(DESTDIR)$(PREFIX)/bin/$$b && \
	  target/$(PROFILE)/$$b --man-page >$(DESTDIR)$(PREFIX)/share/man/man1/$$b.1 || exit 1; \
	done
	install -m 0755 target/$(PROFILE)/locknet $(DESTDIR)$(PREFIX)/sbin/locknet
	target/$(PROFILE)/locknet --man-page >$(DESTDIR)$(PREFIX)/share/man/man1/locknet.1
	target/$(PROFILE)/viking completions bash >$(DESTDIR)$(PREFIX)/share/bash-completion/completions/viking
	target/$(PROFILE)/viking completions zsh >$(DESTDIR)$(PREFIX)/share/zsh/site-functions/_viking
	target/$(PROFILE)/viking completions fish >$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/viking.fish
	for u in examples/systemd/*.service; do \
	  sed -e 's|/usr/local/bin/|$(PREFIX)/bin/|; s|/usr/local/sbin/|$(PREFIX)/sbin/|' $$u \
	    >$(DESTDIR)$(PREFIX)/lib/systemd/system/$$(basename $$u) || exit 1; \
	done
	[ -e $(DESTDIR)/etc/default/viking ] || install -m 0644 examples/systemd/viking.default $(DESTDIR)/etc/default/viking
