"""Stamped block I/O over a raw iSCSI session, for tests that judge what landed by the data itself, not by timing.

This module owns the stamp format and a small synchronous client on :class:`iscsi_scapy.RawInitiator`. Every 4 KiB
block a test writes carries ``(seq, lun, block, writer)`` and a body derived from them, so a read tells exactly which
write a block holds, or that it holds none (zeros), or that it is damaged (anything else). Used by the snapshot-set
consistency tests (with :class:`Turns`, one global sequence of writes across LUNs) and the crash trials.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass

from iscsi_scapy import RawInitiator, ScsiResult, cdb_read10, cdb_write10

SECTOR = 512
UNIT = 4096  # bytes per stamped block
SPU = UNIT // SECTOR
_HEAD = struct.Struct(">8sQIII")  # magic, seq, lun, block, writer
MAGIC = b"LSSTAMP1"
ZEROS = bytes(UNIT)


@dataclass(frozen=True, slots=True)
class Stamp:
    seq: int
    lun: int
    block: int
    writer: int


def stamp(s: Stamp) -> bytes:
    head = _HEAD.pack(MAGIC, s.seq, s.lun, s.block, s.writer)
    body = hashlib.sha256(head).digest() * ((UNIT - len(head)) // 32 + 1)
    return (head + body)[:UNIT]


def parse(block: bytes) -> Stamp | None | str:
    """The stamp a block holds; None for zeros (never written); ``"damaged"`` for anything else."""
    if block == ZEROS:
        return None
    if len(block) != UNIT or block[:8] != MAGIC:
        return "damaged"
    s = Stamp(*_HEAD.unpack_from(block)[1:])
    return s if stamp(s) == block else "damaged"


class ScsiFailed(AssertionError):
    pass


class StampClient:
    """One iSCSI session to a target; commands are synchronous (one outstanding), so their order is known."""

    def __init__(self, host: str, port: int, iqn: str, initiator: str, isid: int, timeout: float = 10.0) -> None:
        self.ini = RawInitiator(host, port, timeout=timeout)
        self.ini.connect()
        self.ini.login(iqn, initiator=initiator, isid=isid)

    def close(self) -> None:
        try:
            self.ini.close()
        except OSError:
            pass

    def _ok(self, what: str, r: object) -> None:
        status = getattr(r, "status", None)
        if status != 0:
            raise ScsiFailed(f"{what}: status {status!r} sense {getattr(r, 'sense', b'').hex()}")

    def _scsi(self, cdb: bytes, lun: int, **kwargs: object) -> ScsiResult:
        """One command; a UNIT ATTENTION (the first command after login, a LUN map change) is retried, as an
        initiator would."""
        for _ in range(4):
            r = self.ini.scsi(cdb, lun=lun, **kwargs)  # type: ignore[arg-type]
            if r.status == 2 and r.sense_key == 6:
                continue
            return r
        return r

    def write(self, lun: int, block: int, data: bytes, fua: bool = False) -> None:
        r = self._scsi(cdb_write10(block * SPU, len(data) // SECTOR, fua=fua), lun, write_data=data)
        self._ok(f"WRITE(10) lun {lun} block {block}", r)

    def sync_cache(self, lun: int) -> None:
        r = self._scsi(b"\x35" + bytes(9), lun)
        self._ok(f"SYNCHRONIZE CACHE lun {lun}", r)

    def read(self, lun: int, block: int, blocks: int) -> bytes:
        out = bytearray()
        step = 16  # 64 KiB per READ(10)
        for b in range(block, block + blocks, step):
            n = min(step, block + blocks - b)
            r = self._scsi(cdb_read10(b * SPU, n * SPU), lun, read_length=n * UNIT)
            self._ok(f"READ(10) lun {lun} block {b}", r)
            out += r.data
        return bytes(out)


def chunk_hashes(data: bytes, chunk: int = 64 << 10) -> list[str]:
    return [hashlib.sha256(data[i:i + chunk]).hexdigest()[:16] for i in range(0, len(data), chunk)]


class Turns:
    """One global sequence handed round several writers (threads): write ``n`` is issued only once ``n - 1`` is
    acknowledged, so it causally follows every earlier write, whichever LUN took it. ``acked`` is the highest write
    acknowledged."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.next = 0
        self.acked = -1
        self.stop = False
        self.error: BaseException | None = None

    def wait_acked(self, n: int, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.acked >= n or self.error is not None, timeout), \
                f"writers stuck at {self.acked}"
            if self.error is not None:
                raise AssertionError(f"a writer failed: {self.error!r}")

    def write_turns(self, client: StampClient, lun: int, i: int, writers: int, base: int = 0) -> None:
        """Writer ``i`` of ``writers`` (run in its own thread, until :attr:`stop`): write ``n`` with
        ``n % writers == i`` goes to LUN ``lun`` at block ``base + n // writers``, stamped ``(n, i, base + n //
        writers, i)`` (``base`` keeps writers that share a LUN apart). A failure is kept in :attr:`error` for the
        main thread; the client is closed at the end."""
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stop or self.next % writers == i)
                    if self.stop:
                        return
                    n = self.next
                client.write(lun, base + n // writers, stamp(Stamp(n, i, base + n // writers, i)))
                with self.cond:
                    self.acked = n
                    self.next = n + 1
                    self.cond.notify_all()
        except Exception as e:  # noqa: BLE001 - the main thread reports it
            with self.cond:
                self.error = e
                self.cond.notify_all()
        finally:
            client.close()

    def finish(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
