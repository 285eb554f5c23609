"""The ``lunsync`` client where the daemon cannot run: a subprocess whose interpreter pretends to be Windows (its
``sys.platform``, and no uvloop, no fcntl, no os.preadv, none of the daemon's dependencies) imports the CLI, manages
a real daemon over its API, and gets one clear line from ``lunsync serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from api_harness import ApiDaemon
from lunsync.provider import cli

# Run in the child before anything of lunsync is imported: the modules a Windows install does not have raise
# ImportError, as they would there.
_PRETEND = textwrap.dedent("""
    import importlib.abc, os, sys
    BLOCKED = {"uvloop", "fcntl", "resource", "termios", "fastapi", "uvicorn", "prometheus_client", "aiofiles",
               "crc32c"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"No module named {name!r} (blocked: not on this platform)")
            return None
    for b in list(sys.modules):
        if any(b == x or b.startswith(x + ".") for x in BLOCKED):
            del sys.modules[b]
    sys.meta_path.insert(0, Block())
    for name in ("preadv", "pwritev", "copy_file_range"):
        if hasattr(os, name):
            delattr(os, name)
    # The standard library and the client's dependencies probe the real platform when first imported (ssl loads
    # Windows' certificate store on win32); they install on Windows, so import them first: what is tested is
    # lunsync's own imports.
    import asyncio, ssl, httpx, rich.console
    sys.platform = PLATFORM
    from lunsync.provider.cli import main
    rc = main(sys.argv[1:])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"uvloop", "fastapi", "uvicorn", "aiofiles"})
    assert not loaded, loaded
    sys.exit(rc)
""")


def pretend(platform: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = f"PLATFORM = {platform!r}\n" + _PRETEND
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_serve_refuses_with_one_clear_line(platform: str) -> None:
    p = pretend(platform, "serve", "--demo")
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"lunsync serve runs on Linux only (this is {platform})" in lines[0]


@pytest.mark.e2e
def test_the_client_manages_a_daemon_without_server_modules(api_daemon: ApiDaemon) -> None:
    env = {**os.environ, "LUNSYNC_API": api_daemon.api_url, "LUNSYNC_TOKEN": api_daemon.api_token}
    p = pretend("win32", "lun", "create", "winlun", "--size", "8MiB", "--json", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    p = pretend("win32", "lun", "list", "--json", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    names = {lun["name"] for lun in json.loads(p.stdout)}
    assert {"demo0", "winlun"} <= names
    bad = pretend("win32", "lun", "list", env={**env, "LUNSYNC_TOKEN": "wrong-token"})
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_serve_names_missing_server_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve", "--demo"]) == 2


def test_serve_is_available_here() -> None:
    assert cli.serve_unavailable() is None
