"""Tests for lunsync.target.chap: CHAP responses, binary values and the target-side exchange (RFC 7143 §12.1.3)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lunsync.target.chap import (
    ALGORITHMS,
    AuthError,
    ChapCredentials,
    ChapServer,
    ChapState,
    chap_response,
    decode_binary,
    encode_binary,
)
from lunsync.target.keys import encode_text, parse_text

# Vectors computed with `printf '\x07secretsecret\x01\x02\x03' | openssl dgst -<alg>`: identifier 7, secret
# "secretsecret", challenge 01 02 03.
VECTORS = {
    5: "b9a7f9e677a3f6a8de38267059d25061",
    6: "0de94b908a28c3d13cb03617d5f959845955272c",
    7: "5ed8df1d2b9f163aea35a78c61f5a584f4953a1ded826b8f4a07670d2bfee3aa",
    8: "f5985553fccc34378e461e657230f891aff605027293ba268a506f1d6090a91f",
}

USER, SECRET = "iqn.1994-05.com.redhat:client", "initiator-secret-12"
MUTUAL_USER, MUTUAL_SECRET = "iqn.2026-11.io.lunsync:demo", "target-secret-1234"


def counter_bytes() -> Callable[[int], bytes]:
    """A deterministic random source: 0x11, 0x12, ... one byte at a time."""
    stream: Iterator[int] = iter(range(0x11, 0x10000))

    def take(n: int) -> bytes:
        return bytes(next(stream) & 0xFF for _ in range(n))

    return take


def server(mutual: bool = False, **kwargs: Any) -> ChapServer:
    creds = ChapCredentials(USER, SECRET, MUTUAL_USER if mutual else None, MUTUAL_SECRET if mutual else None)
    return ChapServer(creds, random_bytes=counter_bytes(), **kwargs)  # type: ignore[arg-type,unused-ignore]


def challenge_of(s: ChapServer, offer: str = "5") -> tuple[int, int, bytes]:
    d = dict(s.step([("CHAP_A", offer)]))
    return int(d["CHAP_A"]), int(d["CHAP_I"]), decode_binary(d["CHAP_C"])


# -- responses ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "digest"), list(VECTORS.items()))
def test_response_vectors(alg: int, digest: str) -> None:
    assert chap_response(alg, 7, b"secretsecret", bytes.fromhex("010203")).hex() == digest


def test_md5_response_matches_rfc_1994_construction() -> None:
    # RFC 1994 §4.1: MD5 over Identifier, then secret, then Challenge Value.
    ident, secret, challenge = 0x2A, b"a long shared secret", bytes(range(16))
    assert chap_response(5, ident, secret, challenge) == hashlib.md5(b"\x2a" + secret + challenge).digest()


@given(st.sampled_from(sorted(ALGORITHMS)), st.integers(0, 255), st.binary(min_size=1, max_size=64),
       st.binary(max_size=64))
def test_response_is_hash_of_ident_secret_challenge(alg: int, ident: int, secret: bytes, challenge: bytes) -> None:
    name = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}[alg]
    expected = hashlib.new(name, bytes([ident]) + secret + challenge).digest()
    got = chap_response(alg, ident, secret, challenge)
    assert got == expected and len(got) == ALGORITHMS[alg].digest_size


@pytest.mark.parametrize(("alg", "ident"), [(4, 0), (9, 0), (5, 256), (5, -1)])
def test_response_refuses_bad_arguments(alg: int, ident: int) -> None:
    with pytest.raises(ValueError):
        chap_response(alg, ident, b"s", b"c")


# -- binary values (RFC 7143 §6.1) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "data"),
    [("0x00ff10", b"\x00\xff\x10"), ("0XABcd", b"\xab\xcd"), ("0x123", b"\x01\x23"), ("0bAAECAw==", b"\x00\x01\x02\x03"),
     ("0Bq83v", b"\xab\xcd\xef")],
)
def test_decode_binary(text: str, data: bytes) -> None:
    assert decode_binary(text) == data


@pytest.mark.parametrize("text", ["", "0x", "0b", "abcd", "00ff", "0xzz", "0x 1", "0bAAECAw=", "0b!!!!", "0o777",
                                  "0bAAECAw==AAAA", "0x\u0661\u0662"])
def test_decode_binary_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        decode_binary(text)


@given(st.binary(min_size=1, max_size=1024))
def test_binary_round_trips(data: bytes) -> None:
    assert decode_binary(encode_binary(data)) == data
    assert decode_binary("0b" + base64.b64encode(data).decode()) == data


@given(st.text(max_size=40))
def test_decode_binary_garbage_raises_only_value_error(text: str) -> None:
    try:
        decode_binary(text)
    except ValueError:
        pass


# -- credentials --------------------------------------------------------------------------------------------------------


def test_credentials_hide_secrets_and_flag_weak_ones() -> None:
    c = ChapCredentials("u", "hunter2")
    assert "hunter2" not in repr(c)
    assert c.weak and not c.has_mutual
    assert not ChapCredentials("u", b"twelve bytes").weak


@pytest.mark.parametrize(
    "args",
    [("", "secret"), ("u", ""), ("u", "s", "m", None), ("u", "s", None, "m"), ("u", "same", "m", "same"),
     ("u", "same", "m", b"same"), ("u", "s", "", "m")],
)
def test_credentials_refuse(args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        ChapCredentials(*args)  # type: ignore[arg-type,unused-ignore]


# -- the exchange -------------------------------------------------------------------------------------------------------


def test_one_way_exchange() -> None:
    s = server()
    answer = s.step([("CHAP_A", "5")])
    # identifier 0x11 and a 16-byte challenge 0x12..0x21 from the injected source.
    assert answer == [("CHAP_A", "5"), ("CHAP_I", "17"), ("CHAP_C", "0x" + bytes(range(0x12, 0x22)).hex())]
    assert s.state is ChapState.AWAIT_RESPONSE
    r = chap_response(5, 17, SECRET.encode(), bytes(range(0x12, 0x22)))
    assert s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(r))]) == []
    assert s.done and not s.mutual


def test_the_exchange_survives_the_text_codec() -> None:
    s = server()
    answer = parse_text(encode_text(s.step(parse_text(b"CHAP_A=7,5\x00"))))
    _, ident, challenge = (int(answer[0][1]), int(answer[1][1]), decode_binary(answer[2][1]))
    r = chap_response(7, ident, SECRET.encode(), challenge)
    assert s.step(parse_text(encode_text([("CHAP_N", USER), ("CHAP_R", "0b" + base64.b64encode(r).decode())]))) == []
    assert s.done


@pytest.mark.parametrize(("offer", "chosen"), [("7,5", 7), ("5,7", 5), ("99,x,6", 6), ("8", 8), ("0x7", 7)])
def test_algorithm_is_the_initiators_first_supported(offer: str, chosen: int) -> None:
    s = server()
    alg, _, challenge = challenge_of(s, offer)
    assert alg == chosen and s.algorithm is ALGORITHMS[chosen]
    assert len(challenge) == ALGORITHMS[chosen].digest_size


@pytest.mark.parametrize("offer", ["", "1,2,3", "MD5", "5"])
def test_no_common_algorithm_fails(offer: str) -> None:
    s = server(algorithms=(7, 8))
    with pytest.raises(AuthError, match="no CHAP algorithm") as e:
        s.step([("CHAP_A", offer)])
    assert (e.value.status_class, e.value.status_detail) == (0x02, 0x01)
    assert s.state is ChapState.FAILED


def test_server_refuses_unknown_algorithms_at_construction() -> None:
    with pytest.raises(ValueError):
        server(algorithms=(5, 4))
    with pytest.raises(ValueError):
        server(algorithms=())


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_every_algorithm_authenticates(alg: int) -> None:
    s = server()
    _, ident, challenge = challenge_of(s, str(alg))
    s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(chap_response(alg, ident, SECRET.encode(), challenge)))])
    assert s.done


def test_wrong_secret_fails_without_leaking_it() -> None:
    s = server()
    _, ident, challenge = challenge_of(s)
    r = chap_response(5, ident, b"not-the-secret", challenge)
    with pytest.raises(AuthError) as e:
        s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(r))])
    assert SECRET not in str(e.value) and "CHAP_R" in e.value.reason
    assert not s.done and s.state is ChapState.FAILED
    with pytest.raises(AuthError):  # a failed exchange stays failed
        s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(r))])


def test_wrong_user_fails() -> None:
    s = server()
    _, ident, challenge = challenge_of(s)
    r = chap_response(5, ident, SECRET.encode(), challenge)
    with pytest.raises(AuthError, match="not the configured user"):
        s.step([("CHAP_N", "iqn.someone:else"), ("CHAP_R", encode_binary(r))])


@pytest.mark.parametrize("bad", ["", "0x", "zz", "0x00", "0x" + "00" * 17])
def test_malformed_or_short_response_fails(bad: str) -> None:
    s = server()
    challenge_of(s)
    with pytest.raises(AuthError):
        s.step([("CHAP_N", USER), ("CHAP_R", bad)])


def test_response_to_another_identifier_fails() -> None:
    s = server()
    _, ident, challenge = challenge_of(s)
    r = chap_response(5, (ident + 1) & 0xFF, SECRET.encode(), challenge)
    with pytest.raises(AuthError):
        s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(r))])


@pytest.mark.parametrize(
    "pairs",
    [[("CHAP_N", USER), ("CHAP_R", "0x00")], [("CHAP_A", "5"), ("CHAP_N", USER)], [], [("CHAP_A", "5"), ("CHAP_A", "5")]],
)
def test_keys_out_of_turn_fail(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(AuthError):
        server().step(pairs)


def test_chap_a_again_fails() -> None:
    s = server()
    challenge_of(s)
    with pytest.raises(AuthError, match="unexpected"):
        s.step([("CHAP_A", "5")])


def test_nothing_after_success() -> None:
    s = server()
    _, ident, challenge = challenge_of(s)
    s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(chap_response(5, ident, SECRET.encode(), challenge)))])
    with pytest.raises(AuthError, match="after the exchange"):
        s.step([("CHAP_N", USER)])


# -- mutual CHAP --------------------------------------------------------------------------------------------------------


def initiator_turn(s: ChapServer, alg: int, ident: int, challenge: bytes, *, their_i: str, their_c: str) -> list[
        tuple[str, str]]:
    r = chap_response(alg, ident, SECRET.encode(), challenge)
    answer: list[tuple[str, str]] = s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(r)), ("CHAP_I", their_i),
                                            ("CHAP_C", their_c)])
    return answer


def test_mutual_exchange() -> None:
    s = server(mutual=True)
    alg, ident, challenge = challenge_of(s, "7")
    theirs = bytes.fromhex("00112233445566778899aabbccddeeff")
    answer = initiator_turn(s, alg, ident, challenge, their_i="200", their_c=encode_binary(theirs))
    assert answer == [("CHAP_N", MUTUAL_USER),
                      ("CHAP_R", encode_binary(hashlib.sha256(bytes([200]) + MUTUAL_SECRET.encode() + theirs).digest()))]
    assert s.done and s.mutual


def test_mutual_accepts_base64_and_hex_identifier() -> None:
    s = server(mutual=True)
    alg, ident, challenge = challenge_of(s)
    answer = dict(initiator_turn(s, alg, ident, challenge, their_i="0x10", their_c="0bAAECAw=="))
    assert decode_binary(answer["CHAP_R"]) == chap_response(5, 16, MUTUAL_SECRET.encode(), b"\x00\x01\x02\x03")


def test_reflected_challenge_is_refused() -> None:
    s = server(mutual=True)
    alg, ident, challenge = challenge_of(s)
    with pytest.raises(AuthError, match="reflected"):
        initiator_turn(s, alg, ident, challenge, their_i=str(ident), their_c=encode_binary(challenge))
    assert not s.done and not s.mutual


def test_mutual_without_configured_secret_is_refused() -> None:
    s = server(mutual=False)
    alg, ident, challenge = challenge_of(s)
    with pytest.raises(AuthError, match="no mutual CHAP secret"):
        initiator_turn(s, alg, ident, challenge, their_i="1", their_c="0x0102")


def test_mutual_is_not_answered_for_a_failed_initiator() -> None:
    s = server(mutual=True)
    challenge_of(s)
    with pytest.raises(AuthError):
        s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(b"\x00" * 16)), ("CHAP_I", "1"), ("CHAP_C", "0x0102")])
    assert not s.mutual


@pytest.mark.parametrize(
    ("their_i", "their_c"),
    [("256", "0x0102"), ("-1", "0x0102"), ("one", "0x0102"), ("1", "0102"), ("1", "0x" + "ab" * 1025)],
)
def test_malformed_mutual_challenge_fails(their_i: str, their_c: str) -> None:
    s = server(mutual=True)
    alg, ident, challenge = challenge_of(s)
    with pytest.raises(AuthError):
        initiator_turn(s, alg, ident, challenge, their_i=their_i, their_c=their_c)


def test_half_a_mutual_request_fails() -> None:
    s = server(mutual=True)
    _, ident, challenge = challenge_of(s)
    r = encode_binary(chap_response(5, ident, SECRET.encode(), challenge))
    with pytest.raises(AuthError, match="both CHAP_I and CHAP_C"):
        s.step([("CHAP_N", USER), ("CHAP_R", r), ("CHAP_C", "0x0102")])


def test_one_way_still_works_with_mutual_configured() -> None:
    s = server(mutual=True)
    _, ident, challenge = challenge_of(s)
    assert s.step([("CHAP_N", USER), ("CHAP_R", encode_binary(chap_response(5, ident, SECRET.encode(), challenge)))]) == []
    assert s.done and not s.mutual


@given(st.lists(st.tuples(st.sampled_from(["CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C", "CHAP_X"]),
                          st.text(max_size=20)), max_size=5), st.booleans())
def test_garbage_steps_raise_only_auth_error(pairs: list[tuple[str, str]], second: bool) -> None:
    s = server(mutual=True)
    try:
        if second:
            s.step([("CHAP_A", "5")])
        s.step(pairs)
    except AuthError:
        assert s.state is ChapState.FAILED
