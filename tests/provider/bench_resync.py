"""Benchmark of live restores: the four figures the README reports (not a test; run it by hand).

    .venv/bin/python tests/provider/bench_resync.py [--big-gib 4] [--sparse-gib 64]

1. first read: the RecoverSet request (POST /v1/recovery/resync) until it returns, i.e. the destination serves the
   snapshot, for a 1 GiB LUN and a 64 GiB sparse LUN; plus a 4 KiB qemu-io read right after (its own login included);
2. copy rate: the ResyncVolume copier against ``os.copy_file_range`` of the same bytes on the same filesystem, both
   ending with an fdatasync, in-process on FileBackends;
3. only what changed: 1 % of a 1 GiB LUN's chunks changed since the snapshot, bytes copied back to the origin;
4. foreground I/O: 4 KiB random-read IOPS (iscsi-perf -r, 16 in flight) on a LUN during a default-throttled resync
   against the same LUN idle.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e.harness import DEMO_IQN, Daemon, lunsync_command
from lunsync.snapshots.backend import FileBackend
from lunsync.snapshots.resync import ResyncVolume, Unthrottled

MIB, GIB = 1 << 20, 1 << 30


def sh(*cmd: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                       check=False)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stdout}\n{p.stderr}")
    return p.stdout


class Bench:
    def __init__(self, workdir: Path, size: str, prefill: int | None = None) -> None:
        self.d = Daemon(workdir, demo_size=size, api=True, metrics=True)
        if prefill is not None:
            # The demo LUN's file, written before the daemon starts: much faster than writing it over iSCSI.
            path = self.d.data_dir / "luns" / "demo0.img"
            path.parent.mkdir(parents=True, exist_ok=True)
            block = bytes([prefill]) * (8 * MIB)
            size_b = int(size.rstrip("GiB")) * GIB
            with open(path, "wb") as f:
                f.writelines(block for _ in range(size_b // len(block)))
        self.d.start()
        self.env = {"LUNSYNC_API": self.d.api_url, "LUNSYNC_DATA_DIR": str(self.d.data_dir)}
        self.http = httpx.Client(base_url=self.d.api_url + "/v1",
                                 headers={"Authorization": f"Bearer {self.d.api_token}"}, timeout=600)

    def cli(self, *args: str) -> str:
        return sh(*lunsync_command(), *args, env=self.env)

    def qemu(self, *cmds: str, lun: int = 0) -> str:
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        return sh(*args, self.d.url(lun))

    def close(self) -> None:
        self.http.close()
        self.d.close()


def first_read(tmp: Path, size: str, label: str) -> None:
    b = Bench(tmp / f"first-{label}", size)
    try:
        b.qemu("write -P 0xaa 0 64M", "write -P 0xaa 1G 16M" if size != "1GiB" else "write -P 0xaa 512M 16M")
        b.cli("snapshot", "create", "demo0@s1")
        b.qemu("write -P 0xbb 0 32M")
        b.http.get("/recovery")  # a warm connection: the figure is the restore, not TCP and FastAPI's first call
        for dest in (None, "lab"):
            mark = b.d.log_mark()
            t0 = time.perf_counter()
            r = b.http.post("/recovery/resync", json={"pairs": [{"snapshot": "demo0@s1", "destination": dest}],
                                                      "rate_mib_s": 1})
            post_ms = (time.perf_counter() - t0) * 1000
            if r.is_error:
                raise SystemExit(f"resync of {label} to {dest or 'origin'} refused: {r.status_code} {r.text}")
            t1 = time.perf_counter()
            if dest is None:  # the new LUN is not mapped; the origin is LUN 0
                b.qemu("read -P 0xaa 0 4k")
            read_ms = (time.perf_counter() - t1) * 1000
            inside = b.d.wait_for_log(r"serve their snapshots ([0-9.]+) ms", since=mark).group(1)
            print(f"first read, {label} LUN -> {dest or 'origin'}: POST /v1/recovery/resync answered in "
                  f"{post_ms:.1f} ms (RecoverSet inside the daemon {inside} ms), the destination serving the "
                  f"snapshot from then on" + (f"; a qemu-io 4 KiB read of A after it, login included: {read_ms:.0f} ms"
                                        if dest is None else ""))
            b.http.post(f"/recovery/{r.json()['id']}/cancel")
    finally:
        b.close()


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(8 * MIB)
        f.writelines(chunk for _ in range(size // len(chunk)))
        os.fsync(f.fileno())


async def copy_rate(tmp: Path, size: int) -> None:
    src_path = tmp / "src.img"
    _random_file(src_path, size)
    results: dict[str, list[float]] = {"copy_file_range": [], "resync": []}
    for _ in range(3):
        dst = tmp / "base.img"
        dst.unlink(missing_ok=True)
        fd_in = os.open(src_path, os.O_RDONLY)
        fd_out = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd_out, size)
        t0 = time.perf_counter()
        done = 0
        while done < size:
            done += os.copy_file_range(fd_in, fd_out, min(size - done, 1 << 30), done, done)
        os.fdatasync(fd_out)
        results["copy_file_range"].append(size / (time.perf_counter() - t0))
        os.close(fd_in)
        os.close(fd_out)
        dst.unlink()

        d2 = tmp / "dst.img"
        d2.unlink(missing_ok=True)
        src = FileBackend.open(src_path, 512, read_only=True)
        dest = FileBackend.create(d2, size, 512)
        t0 = time.perf_counter()
        vol = await ResyncVolume.open(src, dest, tmp / "b.bitmap", throttle=Unthrottled())
        vol.start()
        await vol.wait()
        results["resync"].append(size / (time.perf_counter() - t0))
        await src.close()
        await dest.close()
        d2.unlink()
    base = max(results["copy_file_range"])
    ours = max(results["resync"])
    print(f"copy rate, {size // GIB} GiB: os.copy_file_range+fdatasync {base / MIB:.0f} MiB/s, resync copier "
          f"(bitmap commits every 1 s, final commit) {ours / MIB:.0f} MiB/s = {ours / base:.2f}x "
          f"(best of 3 each; all runs {[round(x / MIB) for x in results['copy_file_range']]} vs "
          f"{[round(x / MIB) for x in results['resync']]})")


def only_changed(tmp: Path) -> None:
    b = Bench(tmp / "changed", "1GiB", prefill=0xAA)
    try:
        b.cli("snapshot", "create", "demo0@s1")
        chunks = 1 * GIB // (64 << 10)
        changed = random.Random(7).sample(range(chunks), chunks // 100)
        cmds = [f"write -P 0xbb {c * 65536} 64k" for c in sorted(changed)]
        for i in range(0, len(cmds), 40):
            b.qemu(*cmds[i:i + 40])
        r = b.http.post("/recovery/resync", json={"pairs": [{"snapshot": "demo0@s1"}], "verify": True}).json()
        final = b.http.post(f"/recovery/{r['id']}/wait", params={"timeout_s": 120}).json()
        print(f"only what changed: {len(changed)} of {chunks} chunks (1 %) changed; bytes copied "
              f"{final['bytes_copied']} = {final['bytes_copied'] / 65536:.0f} chunks (expected "
              f"{len(changed) * 65536}); LUN size {GIB}; verified {final['pairs'][0]['verified']}")
    finally:
        b.close()


def perf(url: str, seconds: int) -> float:
    p = subprocess.run(["iscsi-perf", "-b", "8", "-m", "16", "-r", "-t", str(seconds), url], capture_output=True,
                       text=True, timeout=seconds + 30, check=False)
    m = re.findall(r"iops average (\d+)", p.stdout + p.stderr)
    return float(m[-1]) if m else 0.0


def foreground(tmp: Path, gib: int) -> None:
    b = Bench(tmp / "fg", f"{gib}GiB", prefill=0xAA)
    try:
        b.cli("snapshot", "create", "demo0@s1")
        b.cli("lun", "create", "lab", "--size", f"{gib}GiB")
        b.cli("lun", "map", "lab", "--target", DEMO_IQN, "--lun", "1")
        url = b.d.url(1)
        r = b.http.post("/recovery/resync", json={"pairs": [{"snapshot": "demo0@s1", "destination": "lab"}]}).json()
        time.sleep(0.3)
        during = perf(url, 4)
        st = b.http.get(f"/recovery/{r['id']}").json()
        final = b.http.post(f"/recovery/{r['id']}/wait", params={"timeout_s": 600}).json()
        idle = perf(url, 4)
        took = (dt.datetime.fromisoformat(final["finished_at"]) - dt.datetime.fromisoformat(final["started_at"])).total_seconds()
        print(f"foreground: 4 KiB random read IOPS on the destination during a default-throttled resync "
              f"{during:.0f}, idle {idle:.0f} = {during / idle:.2f}x (state during: {st['state']}, "
              f"{st['percent']:.0f}% at the end of the sample; throttle {st['pairs'][0].get('throttle')}); "
              f"{gib} GiB copied in {took:.1f} s")
    finally:
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-gib", type=int, default=4)
    ap.add_argument("--sparse-gib", type=int, default=64)
    ap.add_argument("--only", choices=("first", "copy", "changed", "fg"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as t:
        tmp = Path(t)
        if a.only in (None, "first"):
            first_read(tmp, "1GiB", "1 GiB")
            first_read(tmp, f"{a.sparse_gib}GiB", f"{a.sparse_gib} GiB sparse")
        if a.only in (None, "copy"):
            asyncio.run(copy_rate(tmp, 1 * GIB))
        if a.only in (None, "changed"):
            only_changed(tmp)
        if a.only in (None, "fg"):
            foreground(tmp, a.big_gib)


if __name__ == "__main__":
    main()
