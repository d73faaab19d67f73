# pinwarden — set-up and test entry points (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-system-x86 libvirt-daemon-system libvirt-clients libvirt-dev pkg-config \
	python3-defusedxml python3-jeepney python3-prometheus-client \
	linux-image-amd64 busybox-static dbus sqlite3 \
	zsh systemd man-db groff-base \
	mmdebstrap qemu-utils e2fsprogs \
	rt-tests stress-ng
# (zsh: `zsh -n` of the generated completion; systemd: `systemd-analyze verify` of the units,
# which needs no systemd as PID 1; man-db, groff-base: rendering the generated man page;
# mmdebstrap, qemu-utils, e2fsprogs: the systemd lab's Debian root images; python3-*: the
# unprivileged-user tests run the system interpreter on our sources; rt-tests (cyclictest,
# the standard wake-up latency probe) and stress-ng (the neighbours' CPU, timer and I/O
# load): make bench-noise.)

# libvirt-python is built against the system's libvirt: take the binding of the same version.
LIBVIRT_PY = libvirt-python$$(v=$$(pkg-config --modversion libvirt 2>/dev/null) && echo "==$$v")

.PHONY: demo test lint bench bench-quick bench-host bench-cli bench-noise deps-system venv \
	clean man install-man

$(BIN)/pinwarden: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

venv: $(BIN)/pinwarden

## The main job: two tiny VMs (exclusive + shared) through pinwarden where libvirt runs here
## (root), else the same plan on the bundled example host.
demo: venv
	@started=""; \
	if [ "$$(id -u)" = 0 ] && pkg-config --exists libvirt 2>/dev/null; then \
		$(BIN)/python -c 'import libvirt' 2>/dev/null || \
			$(BIN)/pip install -q "$(LIBVIRT_PY)" || echo "libvirt-python did not build: offline demo"; \
		started=$$(scripts/libvirt-daemons) || true; \
	fi; \
	$(BIN)/pinwarden demo; status=$$?; \
	if [ -n "$$started" ]; then kill $$started; fi; \
	exit $$status

deps-system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		fi; \
	else echo "not root or no apt-get: skipping system packages ($(APT_PACKAGES))"; fi

$(VENV)/.test-deps: pyproject.toml | venv
	$(BIN)/pip install -q -e '.[test]' virtme-ng "$(LIBVIRT_PY)"
	touch $@

## Everything: system packages, the Python environment, all tests, ruff, mypy --strict.
test: deps-system $(VENV)/.test-deps
	$(BIN)/ruff check src tests
	$(BIN)/mypy --strict src/pinwarden
	PINWARDEN_REQUIRE_ALL=1 $(BIN)/pytest -q --durations=10

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests
	$(BIN)/mypy --strict src/pinwarden

## The man page, generated from the argument parser by argparse-manpage (scripts/manpage).
MAN := build/man/pinwarden.1
PREFIX ?= /usr/local
man: $(MAN)

$(MAN): $(VENV)/.docs-deps scripts/manpage man/pinwarden.1.include $(wildcard src/pinwarden/cli/*.py)
	mkdir -p $(dir $@)
	BIN=$(abspath $(BIN)) scripts/manpage $@

$(VENV)/.docs-deps: pyproject.toml | venv
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

## man pinwarden (and systemd's Documentation=man:pinwarden(1)) finds it there.
install-man: $(MAN)
	install -D -m 644 $(MAN) $(DESTDIR)$(PREFIX)/share/man/man1/pinwarden.1

## Allocator benchmark (bench/README.md): pinwarden vs Nova's own code vs a k8s baseline.
BENCH_VENV := bench/.venv
$(BENCH_VENV)/.deps: bench/requirements.txt pyproject.toml
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -r bench/requirements.txt -e .
	touch $@

## Real-host benchmarks: audit time against thread count; start overhead on real libvirt
## (root + libvirt: the test environment, `make test` installs it).
bench-host: $(VENV)/.test-deps
	: > bench/results/audit_scale.jsonl
	for n in $(AUDIT_THREADS); do \
		$(BIN)/python bench/audit_scale.py --threads $$n --repeat 3 >> bench/results/audit_scale.jsonl; done
	$(BIN)/python bench/start_overhead.py --runs $(START_RUNS) > bench/results/start_overhead.json
	cat bench/results/audit_scale.jsonl bench/results/start_overhead.json

## Command-line speed (issue #12, bench/README.md): pinwarden plan, status and --help against
## a bare Python, side by side, and policy.decide in process; no root, libvirt or VM needed.
CLI_RUNS ?= 21
bench-cli: venv
	$(BIN)/python bench/cli_speed.py --runs $(CLI_RUNS) --out bench/results/cli.json

bench: AUDIT_THREADS = 1000 5000 20000
bench: START_RUNS = 9
bench: $(BENCH_VENV)/.deps bench-host
	cd bench && .venv/bin/python -m pwbench full

bench-quick: AUDIT_THREADS = 2000
bench-quick: START_RUNS = 3
bench-quick: $(BENCH_VENV)/.deps bench-host
	cd bench && .venv/bin/python -m pwbench quick

## Wake-up latency under load (bench/README.md, "bench-noise"): cyclictest on a shared CPU,
## on an exclusive one, and on an exclusive one with host noise moved off, side by side; on
## this host and in the kernel lab (root, virtme-ng; 17 minutes here).
bench-noise: deps-system $(VENV)/.test-deps
	$(BIN)/python bench/noise.py all --spread --out bench/results/noise.json --md bench/results/noise.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build
