"""The wheel a Linux machine builds, read back as pip on Windows or macOS would read it: every dependency that only
the daemon needs, or that has no build on some platform, carries an environment marker, and the client's own
dependencies carry none."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT = {"httpx", "rich"}  # what `lunsync` needs for every command but `serve`
NO_WINDOWS_BUILD = {"uvloop"}  # no wheel and no source build on Windows: must never be asked for there
PLATFORMS = {
    "win32": {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt"},
    "darwin": {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix"},
    "linux": {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"},
}


@pytest.fixture(scope="module")
def requirements(tmp_path_factory: pytest.TempPathFactory) -> list[Requirement]:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the test extra carries setuptools and wheel, so this needs no index. LUNSYNC_PURE=1 as
    # `make wheel`: the wheel that other platforms install is the pure one.
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(REPO_ROOT)], capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "LUNSYNC_PURE": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    wheels = list(out.glob("lunsync-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
        assert any(n.startswith("lunsync/provider/cli") for n in z.namelist()), "the client is not in the wheel"
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    assert reqs, "the wheel declares no dependencies"
    return [r for r in reqs if not (r.marker and "extra" in str(r.marker))]


def installs_on(req: Requirement, platform: str) -> bool:
    return req.marker is None or req.marker.evaluate({**PLATFORMS[platform], "extra": ""})


def test_every_server_only_dependency_has_a_platform_marker(requirements: list[Requirement]) -> None:
    unmarked = [str(r) for r in requirements if r.name not in CLIENT and r.marker is None]
    assert not unmarked, f"server-only dependencies without an environment marker: {unmarked}"
    for r in requirements:
        if r.name not in CLIENT:
            assert "sys_platform" in str(r.marker), f"{r}: the marker should name the platform"


def test_windows_and_macos_get_the_client_and_nothing_without_a_build(requirements: list[Requirement]) -> None:
    names = {r.name for r in requirements}
    assert CLIENT <= names, f"the client's dependencies are missing: {CLIENT - names}"
    for platform in ("win32", "darwin"):
        got = {r.name for r in requirements if installs_on(r, platform)}
        assert got == CLIENT, f"pip on {platform} would install {sorted(got)}"
        assert not got & NO_WINDOWS_BUILD
    linux = {r.name for r in requirements if installs_on(r, "linux")}
    assert linux == names, f"Linux (the daemon's platform) misses {sorted(names - linux)}"
