"""The control/worker message codec: every kind round-trips, a stream cut anywhere yields the same messages, and
anything malformed is an RpcError, never another exception."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lunsync.provider.rpc import MAX_FRAME, Call, FrameDecoder, HandOff, Notice, Reply, RpcError, decode_body, encode
from lunsync.target import keys
from lunsync.target.handoff import SessionState

STATE = SessionState("iqn.2026-11.org.example:host1", "", 0x23D000000001, 7, 0, "iqn.2026-11.io.lunsync:t",
                     keys.NegotiatedParams.defaults(), "chap", 10, 2, 129, "127.0.0.1:40000", b"\x23" * 48,
                     b"\x01\x00" * 30)
MESSAGES = [Call(1, "snapshot.prepare", {"luns": ["a", "b"], "timeout_s": 2.5}), Reply(1, {"held": 2}),
            Reply(2, None, "lun 'x' does not exist", 404), Reply(3, b"\x00\x01" * 300 + b"{"),
            Notice("session-closed", {"tsih": 7}), Reply(4, b""), HandOff(STATE)]


def test_each_kind_round_trips() -> None:
    for m in MESSAGES:
        assert FrameDecoder().feed(encode(m)) == [m]


def test_the_frame_is_a_big_endian_length_and_a_json_object() -> None:
    frame = encode(Notice("ready", {"worker": 1}))
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4 and json.loads(frame[4:]) == {"kind": "notice", "event": "ready",
                                                             "params": {"worker": 1}}


@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_a_stream_cut_anywhere_gives_the_same_messages(cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in MESSAGES)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder()
    got = []
    for a, b in itertools.pairwise(points):
        got += dec.feed(stream[a:b])
    assert got == MESSAGES and dec.buffered == 0


def test_a_reply_of_bytes_follows_its_frame_as_it_is() -> None:
    data = bytes(range(256)) * 4
    frame = encode(Reply(9, data))
    (n,) = struct.unpack(">I", frame[:4])
    assert json.loads(frame[4:4 + n]) == {"kind": "reply", "id": 9, "result": None, "error": None, "status": 200,
                                          "blob": len(data)}
    assert frame[4 + n:] == data
    dec = FrameDecoder()
    assert dec.feed(frame[:-1]) == [] and dec.buffered > 0
    assert dec.feed(frame[-1:]) == [Reply(9, data)] and dec.buffered == 0
    # The header of a reply with data is complete only with them: a close before is a cut frame.
    header_only = FrameDecoder()
    assert header_only.feed(frame[:4 + n]) == [] and header_only.buffered > 0


@pytest.mark.parametrize("body", [
    b'{"kind": "reply", "id": 1, "result": 5, "error": null, "status": 200, "blob": 3}',
    b'{"kind": "reply", "id": 1, "result": null, "error": "x", "status": 500, "blob": 3}',
    b'{"kind": "reply", "id": 1, "result": null, "error": null, "status": 200, "blob": -3}',
    b'{"kind": "call", "id": 1, "method": "x", "params": {}, "blob": 3}',
])
def test_malformed_data_replies_are_rpc_errors(body: bytes) -> None:
    with pytest.raises(RpcError):
        decode_body(body)


def test_oversized_reply_data_are_refused() -> None:
    head = b'{"kind":"reply","id":1,"result":null,"error":null,"status":200,"blob":%d}' % (MAX_FRAME + 1)
    with pytest.raises(RpcError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", len(head)) + head)


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'{"kind": "shout"}', b'{"kind": "call", "id": 1, "method": "x"}',
    b'{"kind": "call", "id": -1, "method": "x", "params": {}}', b'{"kind": "call", "id": true, "method": "x", "params": {}}',
    b'{"kind": "call", "id": 1, "method": "", "params": {}}', b'{"kind": "call", "id": 1, "method": "x", "params": []}',
    b'{"kind": "reply", "id": 1, "result": null, "error": 5, "status": 500}',
    b'{"kind": "reply", "id": 1, "result": null, "error": null, "status": 99}',
    b'{"kind": "handoff", "state": {}}', b"\xff\xfe", b"[" * 100000,
])
def test_malformed_bodies_are_rpc_errors(body: bytes) -> None:
    with pytest.raises(RpcError):
        decode_body(body)


def test_an_oversized_length_is_refused_before_it_is_buffered() -> None:
    with pytest.raises(RpcError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))


@given(st.binary(max_size=200))
def test_garbage_streams_raise_only_rpc_errors(data: bytes) -> None:
    try:
        FrameDecoder().feed(data)
    except RpcError:
        pass
