# notifd -- build, run, test and install.
#
#   make                    build the release binaries (target/release)
#   make run                run notifd in the foreground from ./run, no root
#                           needed, listening on 127.0.0.1 only
#   make test               fmt, clippy, cargo test, man page lint
#   make fuzz               a short run of each fuzz target (FUZZ_SECONDS each)
#   make soak               the soak test, SOAK_SECONDS long (not part of make test)
#   make install            install under $(DESTDIR)$(PREFIX) and $(SYSCONFDIR)
#   make install-init       install the init script (INIT=sysv|openrc|systemd)
#   make uninstall          remove what "make install" installed, and the init
#                           script of "make install-init" unless it was edited
#   make uninstall-init     remove the init script (INIT=...), edited or not
#
# "make install" never builds when the binaries exist, so "make && sudo make
# install" does not run cargo as root. NOTIFD_BIN and NOTIF_BIN name other
# binaries to install (tests/install.rs uses them).

CARGO ?= cargo
CARGO_TARGET_DIR ?= target
INSTALL ?= install
MANDOC ?= mandoc

PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
DESTDIR ?=

BINDIR = $(PREFIX)/bin
SBINDIR = $(PREFIX)/sbin
MANDIR = $(PREFIX)/share/man
DATADIR = $(PREFIX)/share/notifd

NOTIFD_BIN ?= $(CARGO_TARGET_DIR)/release/notifd
NOTIF_BIN ?= $(CARGO_TARGET_DIR)/release/notif

# The init system, guessed from the running host unless given.
INIT ?= $(shell if [ -d /run/systemd/system ]; then echo systemd; \
	elif [ -x /sbin/openrc-run ]; then echo openrc; else echo sysv; fi)

# The init scripts name the default paths /usr/local/sbin/notifd and
# /etc/notifd.conf, so they work as they are from the source tree; installed
# copies get the paths of this PREFIX and SYSCONFDIR.
SUBST = sed -e 's|/usr/local/sbin/notifd|$(SBINDIR)/notifd|g' \
	-e 's|/etc/notifd\.conf|$(SYSCONFDIR)/notifd.conf|g'

MAN1 = man/notif.1
MAN5 = man/notifd.conf.5
MAN7 = man/notifd-protocol.7
MAN8 = man/notifd.8
MANPAGES = $(MAN1) $(MAN5) $(MAN7) $(MAN8)

.PHONY: all build run test lint-man bench clean fuzz soak \
	install uninstall install-init uninstall-init

all: build

build:
	$(CARGO) build --release

# Built only when missing: see the note at the top.
$(NOTIFD_BIN) $(NOTIF_BIN):
	$(CARGO) build --release

## make run: a local configuration under ./run, regenerated only when the
## example is newer, so local edits to run/notifd.conf survive. A development
## run listens on 127.0.0.1 only (IPv4 loopback exists on every host, IPv6
## may not); edit host in run/notifd.conf to be reached from elsewhere.

run: build run/notifd.conf
	mkdir -p run/db run/spool
	exec $(CARGO_TARGET_DIR)/release/notifd -c run/notifd.conf

run/notifd.conf: notifd.conf.example
	mkdir -p run
	sed -e 's|^#database = .*|database = "db/notifd.db"|' \
	    -e 's|^#spool_dir = .*|spool_dir = "spool"|' \
	    -e 's|^#pid_file = .*|pid_file = "notifd.pid"|' \
	    -e 's|^#mail_transport = .*|mail_transport = "spool"|' \
	    -e 's|^#host = .*|host = "127.0.0.1"|' \
	    -e 's|^#port = .*|port = 7600|' \
	    notifd.conf.example > $@.tmp
	mv $@.tmp $@

## make test

# Tests that cannot run here (no ::1, not root, a missing tool) pass after saying
# why on stderr, which cargo hides for a passing test; each also appends its line
# to $(SKIPPED), printed here after the run, pass or fail.
SKIPPED = $(CARGO_TARGET_DIR)/tmp/skipped.txt
# cargo test's output, for the closing count.
TESTLOG = $(CARGO_TARGET_DIR)/tmp/test.log

test: lint-man
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	@rm -f $(SKIPPED) $(TESTLOG); mkdir -p $(CARGO_TARGET_DIR)/tmp
	@{ $(CARGO) test 2>&1; echo $$? > $(TESTLOG).status; } | tee $(TESTLOG); \
	st=$$(cat $(TESTLOG).status); \
	if [ -s $(SKIPPED) ]; then \
		skipped=$$(wc -l < $(SKIPPED)); \
		echo "skipped tests ($$skipped):"; sed 's/^/  /' $(SKIPPED); \
	else \
		skipped=0; echo "skipped tests: none"; \
	fi; \
	awk -v s=$$skipped '/^test result:/ { p += $$4; f += $$6 } \
		END { printf "total: %d passed, %d failed, %d skipped\n", p - s, f, s }' $(TESTLOG); \
	exit $$st

# Any mandoc message at level "warning" or above fails the build. Style
# messages (level "style", below "warning") are not reported at this level;
# among them is "referenced manual not found", which depends on the manuals
# installed on the build host rather than on ours. Without mandoc the lint
# is skipped with one line, so that "make test" runs on a machine that has
# only the Rust toolchain and make; CI installs mandoc, so CI always lints.
lint-man:
	@if ! command -v $(MANDOC) >/dev/null 2>&1; then \
		echo "lint-man: skipped, $(MANDOC) not found (to lint the man pages: apt-get install mandoc)"; \
		exit 0; \
	fi; \
	out=$$($(MANDOC) -Tlint -W warning $(MANPAGES) 2>&1); st=$$?; \
	if [ -n "$$out" ] || [ $$st -ne 0 ]; then \
		printf '%s\n' "$$out"; echo "lint-man: mandoc reported problems" >&2; exit 1; \
	fi

bench:
	bash bench/run.sh

## make fuzz FUZZ_SECONDS=60: each target of fuzz/ in turn, from its corpus and seeds.
## cargo-fuzz passes -Z flags to rustc; RUSTC_BOOTSTRAP=1 lets a stable compiler take
## them. Without an ASan runtime the build is retried with FUZZ_SANITIZER=none. A crash
## stops the run; its input is in fuzz/artifacts/<target>/.

FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= protocol_line ipc_frame config_text http_request
FUZZ_SANITIZER ?= address

fuzz:
	@if ! $(CARGO) fuzz --version >/dev/null 2>&1; then \
		echo "fuzz: cargo-fuzz is missing; installing it: $(CARGO) install --locked cargo-fuzz"; \
		$(CARGO) install --locked cargo-fuzz || exit 1; \
	fi
	@san=$(FUZZ_SANITIZER); \
	if ! RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -a --sanitizer $$san; then \
		[ "$$san" != none ] || exit 1; \
		echo "fuzz: the build with --sanitizer $$san failed; retrying with --sanitizer none"; \
		san=none; RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -a --sanitizer none || exit 1; \
	fi; \
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t || exit 1; \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s (sanitizer $$san)"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -a --sanitizer $$san $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=30 -print_final_stats=1 || exit 1; \
	done; \
	echo "fuzz: $(FUZZ_TARGETS): $(FUZZ_SECONDS) s each, no crash"

## make soak SOAK_SECONDS=600: hundreds of clients against the release daemon while
## its children are killed, then the checks of tests/soak.rs.

SOAK_SECONDS ?= 600

soak:
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --test soak -- --ignored --nocapture

clean:
	$(CARGO) clean
	rm -rf run

## make install / uninstall

# Folders are created only when missing: "install -d" would also reset the
# mode of existing ones (such as a 2775 /usr/local/bin).
install: $(NOTIFD_BIN) $(NOTIF_BIN)
	@for d in $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) \
		$(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 \
		$(DESTDIR)$(MANDIR)/man7 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(DATADIR)/init \
		$(DESTDIR)$(SYSCONFDIR); do \
		[ -d "$$d" ] || (set -x; $(INSTALL) -d -m 0755 "$$d") || exit 1; \
	done
	$(INSTALL) -m 0755 $(NOTIFD_BIN) $(DESTDIR)$(SBINDIR)/notifd
	$(INSTALL) -m 0755 $(NOTIF_BIN) $(DESTDIR)$(BINDIR)/notif
	$(INSTALL) -m 0644 $(MAN1) $(DESTDIR)$(MANDIR)/man1/notif.1
	$(INSTALL) -m 0644 $(MAN5) $(DESTDIR)$(MANDIR)/man5/notifd.conf.5
	$(INSTALL) -m 0644 $(MAN7) $(DESTDIR)$(MANDIR)/man7/notifd-protocol.7
	$(INSTALL) -m 0644 $(MAN8) $(DESTDIR)$(MANDIR)/man8/notifd.8
	$(INSTALL) -m 0644 notifd.conf.example $(DESTDIR)$(DATADIR)/notifd.conf.example
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	for f in notifd.init notifd.openrc notifd.service; do \
		$(SUBST) init/$$f > "$$tmp/$$f" || exit 1; \
	done && \
	set -x && \
	$(INSTALL) -m 0755 "$$tmp/notifd.init" $(DESTDIR)$(DATADIR)/init/notifd.init && \
	$(INSTALL) -m 0755 "$$tmp/notifd.openrc" $(DESTDIR)$(DATADIR)/init/notifd.openrc && \
	$(INSTALL) -m 0644 "$$tmp/notifd.service" $(DESTDIR)$(DATADIR)/init/notifd.service && \
	set +x
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/notifd.conf ]; then \
		echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/notifd.conf"; \
	else \
		set -x; $(INSTALL) -m 0644 notifd.conf.example $(DESTDIR)$(SYSCONFDIR)/notifd.conf; \
	fi

# The configuration goes only if it is still the shipped example; it is
# compared before the example itself is removed. Likewise the init script
# that "make install-init" put in place goes only if it is still ours (the
# source with this PREFIX and SYSCONFDIR substituted), whatever INIT was:
# left behind, it would start a binary that is gone.
uninstall:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	for f in notifd.init notifd.openrc notifd.service; do \
		$(SUBST) init/$$f > "$$tmp/$$f" || exit 1; \
	done && \
	for dst in $(DESTDIR)/etc/init.d/notifd $(DESTDIR)/etc/systemd/system/notifd.service; do \
		[ -e "$$dst" ] || continue; \
		if ! cmp -s "$$dst" "$$tmp/notifd.init" && ! cmp -s "$$dst" "$$tmp/notifd.openrc" && \
		    ! cmp -s "$$dst" "$$tmp/notifd.service"; then \
			echo "keeping $$dst: it differs from what make install-init installs"; \
			continue; \
		fi; \
		(set -x; rm -f "$$dst") || exit 1; \
		case "$$dst" in \
		*.service) echo "then: systemctl daemon-reload" ;; \
		*) echo "then: update-rc.d notifd remove (Debian), chkconfig --del notifd or rc-update del notifd" ;; \
		esac; \
	done
	@if [ -f $(DESTDIR)$(SYSCONFDIR)/notifd.conf ] && \
	    [ -f $(DESTDIR)$(DATADIR)/notifd.conf.example ] && \
	    cmp -s $(DESTDIR)$(SYSCONFDIR)/notifd.conf $(DESTDIR)$(DATADIR)/notifd.conf.example; then \
		set -x; rm -f $(DESTDIR)$(SYSCONFDIR)/notifd.conf; \
	elif [ -e $(DESTDIR)$(SYSCONFDIR)/notifd.conf ]; then \
		echo "keeping $(DESTDIR)$(SYSCONFDIR)/notifd.conf: it differs from the example"; \
	fi
	rm -f $(DESTDIR)$(SBINDIR)/notifd $(DESTDIR)$(BINDIR)/notif \
		$(DESTDIR)$(MANDIR)/man1/notif.1 \
		$(DESTDIR)$(MANDIR)/man5/notifd.conf.5 \
		$(DESTDIR)$(MANDIR)/man7/notifd-protocol.7 \
		$(DESTDIR)$(MANDIR)/man8/notifd.8 \
		$(DESTDIR)$(DATADIR)/notifd.conf.example \
		$(DESTDIR)$(DATADIR)/init/notifd.init \
		$(DESTDIR)$(DATADIR)/init/notifd.openrc \
		$(DESTDIR)$(DATADIR)/init/notifd.service
	rmdir $(DESTDIR)$(DATADIR)/init $(DESTDIR)$(DATADIR) 2>/dev/null || :

## make install-init INIT=sysv|openrc|systemd

install-init:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	case "$(INIT)" in \
	sysv) src=notifd.init; dir=/etc/init.d; dst=notifd; mode=0755 ;; \
	openrc) src=notifd.openrc; dir=/etc/init.d; dst=notifd; mode=0755 ;; \
	systemd) src=notifd.service; dir=/etc/systemd/system; dst=notifd.service; mode=0644 ;; \
	*) echo "install-init: INIT must be sysv, openrc or systemd, not '$(INIT)'" >&2; exit 2 ;; \
	esac && \
	$(SUBST) init/$$src > "$$tmp/$$src" && \
	set -x && \
	{ [ -d $(DESTDIR)$$dir ] || $(INSTALL) -d -m 0755 $(DESTDIR)$$dir; } && \
	$(INSTALL) -m $$mode "$$tmp/$$src" $(DESTDIR)$$dir/$$dst && \
	set +x
	@case "$(INIT)" in \
	sysv) echo "then: update-rc.d notifd defaults (Debian) or chkconfig --add notifd" ;; \
	openrc) echo "then: rc-update add notifd default" ;; \
	systemd) echo "then: systemctl daemon-reload && systemctl enable --now notifd" ;; \
	esac

uninstall-init:
	@case "$(INIT)" in \
	sysv|openrc) set -x; rm -f $(DESTDIR)/etc/init.d/notifd ;; \
	systemd) set -x; rm -f $(DESTDIR)/etc/systemd/system/notifd.service ;; \
	*) echo "uninstall-init: INIT must be sysv, openrc or systemd, not '$(INIT)'" >&2; exit 2 ;; \
	esac
