# lunsync: the two set-up commands are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The compiled build (mypyc; see setup.py) lives in its own venv as a regular install, so no native module ever sits
# next to a source file the editable .venv runs.
NATIVE ?= .venv-native
NPY     = $(NATIVE)/bin/python
SOURCES = $(shell find target snapshots provider -name '*.py') setup.py
DEB_PKGS = libiscsi-bin qemu-utils qemu-block-extra tgt tshark prometheus systemd fuse3 g++-mingw-w64-x86-64 \
           binutils-mingw-w64-x86-64 wine wine64 libfuse3-dev pkg-config ceph-mon ceph-mgr ceph-osd ceph-common \
           python3-rados python3-rbd xfsprogs
SHARED ?= ../shared
N ?= 100000

.PHONY: serve test test-unit test-e2e deps venv native ceph-bindings lint bench fuzz crash-trials powerloss soak faults clean windows wheel wheels install \
        uninstall

# The editable venv runs the sources as they are (LUNSYNC_PURE=1: nothing compiled).
$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	LUNSYNC_PURE=1 $(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

# python3-rados and python3-rbd are built for Debian's /usr/bin/python3; the venv runs another CPython 3.11 build.
# An extension module loads in any CPython with the same ABI tag (EXT_SUFFIX), so the venv gets exactly these two,
# through a .pth naming a directory of links to them, once the tag is checked; never the whole dist-packages, whose
# other packages would shadow the venv's own.
CEPH_BINDINGS = $(abspath $(VENV))/ceph-bindings
ceph-bindings: venv deps
	@suffix=$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	mkdir -p $(CEPH_BINDINGS); \
	for m in rados rbd; do \
	  so=/usr/lib/python3/dist-packages/$$m$$suffix; \
	  if [ ! -f $$so ]; then echo "$$so is missing: python3-$$m is not built for this venv's ABI ($$suffix)"; exit 1; fi; \
	  ln -sfn $$so $(CEPH_BINDINGS)/$$m$$suffix; \
	done; \
	for py in $(PY) $(wildcard $(NPY)); do \
	  site=$$($$py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  echo "$(CEPH_BINDINGS)" > $$site/debian-ceph-bindings.pth; \
	  $$py -c 'import rados, rbd' || exit 1; \
	done

$(NATIVE)/.stamp: pyproject.toml $(SOURCES)
	@test -x $(NPY) || $(PYTHON) -m venv $(NATIVE)
	$(NPY) -m pip install -q --upgrade pip
	rm -rf build/wheel build/lib.* build/bdist.* && $(NPY) -m pip wheel -q --no-deps -w build/wheel .
	$(NPY) -m pip install -q --force-reinstall --no-deps build/wheel/lunsync-*.whl
	$(NPY) -m pip install -q "$$(ls build/wheel/lunsync-*.whl)[test]"
	$(NPY) -c 'from lunsync.target import native; assert native.compiled(), native.describe()'
	touch $@

native: $(NATIVE)/.stamp

# Debian packages the end-to-end tests drive (real initiators and the peer target).
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# --- installing on a host -------------------------------------------------------------------------------------------
# make install [PREFIX=/usr/local] [LUNSYNC_HOME=/opt/lunsync] [DESTDIR=] [PIP_ARGS=]: a venv in LUNSYNC_HOME with the
# wheel built from this tree, PREFIX/bin/lunsync linked to it, the systemd unit, and the sysusers.d and tmpfiles.d
# entries under PREFIX/lib (systemd reads /usr/local/lib/...). DESTDIR stages it all under another root (packaging,
# tests); the venv's scripts then name their final paths. PIP_ARGS go to pip (e.g. --no-index --find-links
# dist/wheels for a host without network).
PREFIX       ?= /usr/local
LUNSYNC_HOME ?= /opt/lunsync
DESTDIR      ?=
PIP_ARGS     ?=
VERSION       = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL         = dist/lunsync-$(VERSION)-py3-none-any.whl

# The project's own wheel, built from this tree with the venv's setuptools and wheel (no index needed).
wheel: venv
	LUNSYNC_PURE=1 $(PY) -m pip wheel -q --no-deps --no-build-isolation --wheel-dir dist .

# Every wheel the container (or an offline host) needs, into dist/wheels: this needs network, the image build does not.
wheels: wheel
	$(PY) -m pip wheel -q --wheel-dir dist/wheels $(WHEEL)

install: wheel
	$(PYTHON) -m venv $(DESTDIR)$(LUNSYNC_HOME)
	$(DESTDIR)$(LUNSYNC_HOME)/bin/python -m pip install -q --upgrade $(PIP_ARGS) $(WHEEL)
	@# A staged venv's scripts and activate files name the staging path; make them name the final one.
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlI --null -F "$(DESTDIR)$(LUNSYNC_HOME)" $(DESTDIR)$(LUNSYNC_HOME)/bin | \
	    xargs -0 -r sed -i "s|$(DESTDIR)$(LUNSYNC_HOME)|$(LUNSYNC_HOME)|g"; \
	fi
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/systemd/system $(DESTDIR)$(PREFIX)/lib/sysusers.d \
	  $(DESTDIR)$(PREFIX)/lib/tmpfiles.d $(DESTDIR)$(PREFIX)/share/doc/lunsync
	ln -sfn $(LUNSYNC_HOME)/bin/lunsync $(DESTDIR)$(PREFIX)/bin/lunsync
	sed -e 's|/usr/local/bin/lunsync|$(PREFIX)/bin/lunsync|' -e 's|/usr/local/share/doc/lunsync|$(PREFIX)/share/doc/lunsync|' \
	  deploy/lunsync.service > $(DESTDIR)$(PREFIX)/lib/systemd/system/lunsync.service
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/systemd/system/lunsync.service
	install -m 0644 deploy/lunsync.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/lunsync.conf
	install -m 0644 deploy/lunsync.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/lunsync.conf
	install -m 0644 README.md deploy/lunsync.example.toml deploy/prometheus.yml deploy/lunsync.rules.yml \
	  deploy/grafana-dashboard.json $(DESTDIR)$(PREFIX)/share/doc/lunsync/
	@if [ -z "$(DESTDIR)" ]; then \
	  echo "installed; now: systemd-sysusers && systemd-tmpfiles --create lunsync.conf && systemctl daemon-reload" \
	       "&& systemctl enable --now lunsync"; \
	fi

uninstall:
	rm -rf $(DESTDIR)$(LUNSYNC_HOME)
	rm -f $(DESTDIR)$(PREFIX)/bin/lunsync $(DESTDIR)$(PREFIX)/lib/systemd/system/lunsync.service \
	  $(DESTDIR)$(PREFIX)/lib/sysusers.d/lunsync.conf $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/lunsync.conf
	rm -rf $(DESTDIR)$(PREFIX)/share/doc/lunsync

serve: venv
	$(VENV)/bin/lunsync serve --demo

# The conformance and multipath suites and the protocol-facing e2e tests, which `make test` runs a second time on a
# daemon split into a control process and two workers (serve --workers 2; about 3 minutes here).
WORKERS_E2E = tests/e2e/test_conformance.py tests/e2e/test_qemu.py tests/e2e/test_discovery.py tests/e2e/test_auth.py \
	tests/e2e/test_inq.py tests/e2e/test_security.py tests/e2e/test_malformed.py tests/e2e/test_wire.py
# The whole suite on the compiled build, the unit tests again on the pure sources (both builds must hold), then
# WORKERS_E2E with --workers 2.
test: deps venv native windows ceph-bindings
	$(NPY) -m pytest -q
	$(PY) -m pytest -q -m 'not e2e'
	LUNSYNC_E2E_WORKERS=2 $(NPY) -m pytest -q $(WORKERS_E2E)

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

# On the compiled build; the table's heading names the build it measured.
bench: deps native ceph-bindings
	$(NPY) tests/bench/run.py --shared $(SHARED)

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

# The Windows VSS hardware provider (provider/windows/), cross-compiled and statically linked so the host needs no
# MinGW runtime: the DLL, its installer and the VSS-order harness the tests run under Wine.
WIN_SRC  = provider/windows
WIN_OUT  = build/windows
WIN_CXX ?= x86_64-w64-mingw32-g++
WIN_FLAGS = -std=c++17 -O2 -Wall -Wextra -Werror -municode -static -static-libgcc -static-libstdc++ -s
WIN_LIBS  = -lwinhttp -lole32 -loleaut32 -luuid -ladvapi32
WIN_HDRS = $(wildcard $(WIN_SRC)/*.h)
WIN_COMMON = $(WIN_OUT)/client.o $(WIN_OUT)/json.o $(WIN_OUT)/guids.o

windows: $(WIN_OUT)/lunsync-vss.dll $(WIN_OUT)/lunsync-vss.exe $(WIN_OUT)/lunsync-vss-harness.exe

$(WIN_OUT)/%.o: $(WIN_SRC)/%.cpp $(WIN_HDRS)
	@mkdir -p $(WIN_OUT)
	$(WIN_CXX) $(WIN_FLAGS) -c -o $@ $<

$(WIN_OUT)/lunsync-vss.dll: $(WIN_OUT)/provider.o $(WIN_COMMON) $(WIN_SRC)/lunsync-vss.def
	$(WIN_CXX) $(WIN_FLAGS) -shared -o $@ $^ $(WIN_LIBS)

$(WIN_OUT)/lunsync-vss.exe: $(WIN_OUT)/install.o $(WIN_COMMON)
	$(WIN_CXX) $(WIN_FLAGS) -o $@ $^ $(WIN_LIBS)

$(WIN_OUT)/lunsync-vss-harness.exe: $(WIN_OUT)/harness.o $(WIN_COMMON)
	$(WIN_CXX) $(WIN_FLAGS) -o $@ $^ $(WIN_LIBS)

# The fault suite: storage faults injected by the FUSE layer (tests/fusefs.py: EIO, ENOSPC, EROFS, latency, a hang, per
# file and byte range) under the data dir, a pool and a LUN, small tmpfs pools, unbounded API input, racing API calls
# and catalog scale. Needs root and /dev/fuse. `make test` runs the same tests with a 6 s hang instead of 20 s.
FAULTS_HANG_S ?= 20
faults: deps venv
	FAULTS_HANG_S=$(FAULTS_HANG_S) $(PY) -m pytest -q -m faults

clean:
	rm -rf $(VENV) $(NATIVE) lunsync-data build dist *.egg-info
