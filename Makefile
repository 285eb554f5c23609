# lunsync: the two set-up commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DEB_PKGS = libiscsi-bin qemu-utils qemu-block-extra tgt tshark prometheus systemd fuse3
SHARED ?= ../shared
N ?= 100000

.PHONY: serve test test-unit test-e2e deps venv lint bench fuzz crash-trials powerloss soak clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

# Debian packages the end-to-end tests drive (real initiators and the peer target).
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: venv
	$(VENV)/bin/lunsync serve --demo

test: deps venv
	$(PY) -m pytest -q

test-unit: venv
	$(PY) -m pytest -q -m 'not e2e'

# mypy and lint-imports check the package as it is imported (lunsync.target, ...): the source directories are mapped
# onto those names by pyproject's package-dir, which neither tool can follow, so build/mypy holds a lunsync/ of
# symlinks to them. lint-imports enforces the layer contracts in pyproject's [tool.importlinter].
lint: venv
	$(VENV)/bin/ruff check target snapshots provider tests
	@mkdir -p build/mypy/lunsync && touch build/mypy/lunsync/__init__.py
	@for d in target snapshots provider; do ln -sfn ../../../$$d build/mypy/lunsync/$$d; done
	MYPYPATH=build/mypy $(VENV)/bin/mypy -p lunsync
	PYTHONPATH=build/mypy $(VENV)/bin/lint-imports --no-cache

bench: deps venv
	$(PY) tests/bench/run.py --shared $(SHARED)

# N inputs of scapy fuzz(), hypothesis PDU families and CDBs against a live daemon, with a verified qemu-io session.
fuzz: deps venv
	$(PY) tests/fuzz/run.py $(N)

# 64 sessions at QD32 of pattern-verified I/O over 4 LUNs, a snapshot and a resync half-way (DURATION in seconds).
DURATION ?= 300
soak: deps venv
	$(PY) tests/soak/run.py --duration $(DURATION)

# N kill -9 trials during writes (FUA, SYNCHRONIZE CACHE) and snapshot sets; 50 unless N is given here (N's own
# default is fuzz's). Fails on any lost acknowledged write or altered snapshot.
crash-trials: venv
	$(PY) tests/crash/run.py $(if $(filter command line,$(origin N)),$(N),50)

# A power-loss harness: the daemon's data dir on a recording FUSE file system during writes, snapshot sets, a clone
# fill and a resync; N cuts (50 unless N is given here) replay only what was synced, each checked on a restarted
# daemon, plus two negative controls that must be caught. Fails on any lost durable write or altered snapshot.
powerloss: deps venv
	$(PY) tests/powerloss/run.py $(if $(filter command line,$(origin N)),$(N),50)

clean:
	rm -rf $(VENV) lunsync-data build *.egg-info
