"""``make install`` into a staging root (DESTDIR): the venv, the binary, the systemd unit, and the sysusers.d and
tmpfiles.d entries land where systemd looks; ``systemd-analyze verify`` passes on the installed unit with its
hardening score kept; systemd-sysusers and systemd-tmpfiles, run on that root, make the account and the data dir.
Also: the wheel the Containerfile installs builds from this tree and holds the package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.harness import REPO_ROOT

# Not a unit test: it builds a wheel and a venv (~20 s), so it stays out of the quick `-m 'not e2e'` run.
pytestmark = pytest.mark.e2e
PREFIX, HOME = "/usr/local", "/opt/lunsync"
EXPOSURE_MAX = 4.3  # systemd-analyze security's score of the shipped unit: hardening may only improve


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    dest = tmp_path_factory.mktemp("root")
    # --no-deps: the layout and the unit are what is tested here, without fetching every dependency again.
    p = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "install", f"DESTDIR={dest}", "PIP_ARGS=--no-deps"],
                       capture_output=True, text=True, check=False, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    yield dest


def test_install_places_venv_binary_unit_sysusers_and_tmpfiles(root: Path) -> None:
    binary = root / PREFIX.lstrip("/") / "bin" / "lunsync"
    assert os.readlink(binary) == f"{HOME}/bin/lunsync"
    venv = root / HOME.lstrip("/")
    script = (venv / "bin" / "lunsync").read_text()
    assert script.startswith(f"#!{HOME}/bin/python\n"), script[:80]
    assert not [f for f in (venv / "bin").iterdir() if f.is_file() and str(root) in f.read_text(errors="ignore")]
    lib = root / PREFIX.lstrip("/") / "lib"
    unit = (lib / "systemd/system/lunsync.service").read_text()
    assert f"ExecStart={PREFIX}/bin/lunsync serve --data-dir /var/lib/lunsync" in unit
    assert (lib / "sysusers.d/lunsync.conf").exists() and (lib / "tmpfiles.d/lunsync.conf").exists()
    assert (root / PREFIX.lstrip("/") / "share/doc/lunsync/lunsync.rules.yml").exists()
    # The installed package runs (from the staged venv's interpreter: its shebang names the final path).
    p = subprocess.run([str(venv / "bin/python"), str(venv / "bin/lunsync"), "serve", "--help"],
                       capture_output=True, text=True, check=False, timeout=60)
    assert p.returncode == 0 and "--log-format" in p.stdout, p.stderr


def test_systemd_analyze_verify_passes_on_the_installed_unit_and_hardening_holds(root: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify follows the unit's default dependencies (sysinit.target, ...): give the root the host's units.
    units = Path("/usr/lib/systemd/system")
    if not (units / "sysinit.target").exists():
        pytest.skip("no systemd units on this host to resolve default dependencies against")
    (root / "usr/lib/systemd").mkdir(parents=True, exist_ok=True)
    if not (root / "usr/lib/systemd/system").exists():
        shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    unit = f"{PREFIX}/lib/systemd/system/lunsync.service"
    p = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", unit], capture_output=True, text=True,
                       check=False, timeout=120)
    ours = [line for line in (p.stdout + p.stderr).splitlines() if "lunsync" in line]
    assert p.returncode == 0 and not ours, ours or p.stderr[-2000:]
    p = subprocess.run([analyze, "security", "--offline=yes", f"--root={root}", unit], capture_output=True,
                       text=True, check=False, timeout=120)
    m = re.search(r"Overall exposure level for lunsync\.service: (\d+\.\d)", p.stdout)
    assert m is not None, p.stdout[-1000:] + p.stderr
    assert float(m[1]) <= EXPOSURE_MAX, p.stdout


def test_sysusers_and_tmpfiles_make_the_account_and_the_data_dir(root: Path) -> None:
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    (root / "etc").mkdir(exist_ok=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    p = subprocess.run([sysusers, f"--root={root}"], capture_output=True, text=True, check=False, timeout=60)
    assert p.returncode == 0, p.stderr
    entry = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("lunsync:"))
    uid = int(entry.split(":")[2])
    assert entry.endswith(":/var/lib/lunsync:/usr/sbin/nologin")
    assert any(line.startswith("disk:") and "lunsync" in line for line in (root / "etc/group").read_text().splitlines())
    p = subprocess.run([tmpfiles, f"--root={root}", "--create", "lunsync.conf"], capture_output=True, text=True,
                       check=False, timeout=60)
    assert p.returncode == 0, p.stderr
    st = (root / "var/lib/lunsync").stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, uid)


def test_the_wheel_builds_and_the_containerfile_installs_it_offline(root: Path) -> None:
    wheels = sorted((REPO_ROOT / "dist").glob("lunsync-*-py3-none-any.whl"))  # built by make install above
    assert wheels
    with zipfile.ZipFile(wheels[-1]) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "lunsync = lunsync.provider.cli:main" in z.read(entry).decode()
    assert {"lunsync/provider/cli.py", "lunsync/target/portal.py", "lunsync/snapshots/backup.py"} <= names
    text = (REPO_ROOT / "deploy/Containerfile").read_text()
    assert re.search(r"^RUN --mount=type=bind,source=dist/wheels,", text, re.MULTILINE), "the host's wheels"
    assert "--no-index" in text and "pip wheel" not in text and not re.search(r"^RUN .*apt-get", text, re.MULTILINE)
