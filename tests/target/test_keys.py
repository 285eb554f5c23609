"""Tests for lunsync.target.keys: the §6.1 text format, the §13 key table and the §6.2 negotiation rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lunsync.target import keys
from lunsync.target.keys import (
    KEYS,
    Kind,
    NegotiatedParams,
    NegotiationError,
    Negotiator,
    Phase,
    Rule,
    TextError,
    encode_text,
    parse_number,
    parse_text,
)

# RFC 7143 Appendix B.1's first Login Request text, as bytes on the wire.
RFC_LOGIN_TEXT = bytes.fromhex(
    "496e69746961746f724e616d653d69716e2e313939392d30372e636f6d2e6f733a686f737469642e373700"  # InitiatorName=...
    "5461726765744e616d653d69716e2e313939392d30372e636f6d2e6578616d706c653a646973"
    "6b61727261792e736e2e383800"  # TargetName=iqn.1999-07.com.example:diskarray.sn.88
    "417574684d6574686f643d4b5242352c5352502c4e6f6e6500"  # AuthMethod=KRB5,SRP,None
)


def negotiate(pairs: list[tuple[str, str]], **limits: str) -> tuple[list[tuple[str, str]], NegotiatedParams]:
    n = Negotiator(limits)
    answers = n.respond(pairs)
    return answers, n.result()


# -- the text format ----------------------------------------------------------------------------------------------------


def test_parse_rfc_example() -> None:
    assert parse_text(RFC_LOGIN_TEXT) == [
        ("InitiatorName", "iqn.1999-07.com.os:hostid.77"),
        ("TargetName", "iqn.1999-07.com.example:diskarray.sn.88"),
        ("AuthMethod", "KRB5,SRP,None"),
    ]


def test_encode_rfc_example_is_byte_exact() -> None:
    assert encode_text(parse_text(RFC_LOGIN_TEXT)) == RFC_LOGIN_TEXT


def test_missing_final_nul_and_padding_are_tolerated() -> None:
    expected = [("HeaderDigest", "None"), ("DataDigest", "None")]
    assert parse_text(b"HeaderDigest=None\x00DataDigest=None") == expected
    assert parse_text(b"HeaderDigest=None\x00DataDigest=None\x00\x00\x00") == expected


def test_empty_text_is_no_pairs() -> None:
    assert parse_text(b"") == []
    assert parse_text(b"\x00\x00\x00\x00") == []


def test_value_keeps_equals_signs_and_may_be_empty() -> None:
    assert parse_text(b"CHAP_C=0bAAECAw==\x00TargetAlias=\x00") == [("CHAP_C", "0bAAECAw=="), ("TargetAlias", "")]


@pytest.mark.parametrize(
    "data",
    [
        b"HeaderDigest\x00",  # no '='
        b"HeaderDigest=None\x00\x00DataDigest=None\x00",  # empty pair between two
        b"=None\x00",  # empty key
        b"1Key=1\x00",  # must start with a letter
        b"Header Digest=None\x00",
        b"K\xc3\xa9y=1\x00",  # keys are ASCII
        b"InitiatorName=\xff\xfe\x00",  # not UTF-8
        b"MaxBurstLength=1\x00MaxBurstLength=2\x00",  # duplicate
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(TextError):
        parse_text(data)


def test_key_length_limit_is_63_bytes() -> None:
    assert parse_text(b"X-" + b"a" * 61 + b"=1") == [("X-" + "a" * 61, "1")]
    with pytest.raises(TextError, match="63"):
        parse_text(b"X-" + b"a" * 62 + b"=1")


def test_value_length_limits() -> None:
    assert parse_text(b"TargetAlias=" + b"a" * 255)[0][1] == "a" * 255
    with pytest.raises(TextError, match="255"):
        parse_text(b"TargetAlias=" + b"a" * 256)
    # UTF-8 counts bytes, not characters.
    with pytest.raises(TextError):
        parse_text(b"TargetAlias=" + "é".encode() * 128)
    # large-binary-values (CHAP_C, CHAP_R) and vendor keys may reach 8192 bytes.
    assert len(parse_text(b"CHAP_C=0x" + b"ab" * 4095)[0][1]) == 8192
    with pytest.raises(TextError, match="8192"):
        parse_text(b"CHAP_C=0x" + b"ab" * 4096)
    assert len(parse_text(b"X-com.example.blob=" + b"z" * 8192)[0][1]) == 8192


def test_sendtargets_response_may_repeat_names_and_addresses() -> None:
    data = (b"TargetName=iqn.a\x00TargetAddress=10.0.0.1:3260,1\x00TargetAddress=10.0.0.2:3260,2\x00"
            b"TargetName=iqn.b\x00TargetAddress=10.0.0.1:3260,1\x00")
    assert [k for k, _ in parse_text(data)].count("TargetAddress") == 3
    assert encode_text(parse_text(data)) == data


def test_extension_and_lowercase_standard_keys_parse() -> None:
    assert parse_text(b"X#NodeArchitecture=lunsync\x00iSCSIProtocolLevel=1\x00X-com.example.k=v\x00") == [
        ("X#NodeArchitecture", "lunsync"), ("iSCSIProtocolLevel", "1"), ("X-com.example.k", "v")]


@pytest.mark.parametrize(
    "pairs",
    [[("Bad Key", "v")], [("Key", "a\x00b")], [("K", "1"), ("K", "2")], [("TargetAlias", "x" * 256)], [("", "v")]],
)
def test_encode_refuses_what_parse_would_refuse(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(TextError):
        encode_text(pairs)


_key = st.from_regex(r"[A-Z][A-Za-z0-9.\-+@_]{0,62}", fullmatch=True)
_value = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=60)


@given(st.dictionaries(_key, _value, max_size=12))
def test_round_trip(d: dict[str, str]) -> None:
    pairs = list(d.items())
    assert parse_text(encode_text(pairs)) == pairs


@given(st.binary(max_size=400))
def test_garbage_parses_or_raises_text_error(data: bytes) -> None:
    try:
        pairs = parse_text(data)
    except TextError:
        return
    # Whatever parses re-encodes to the same pairs.
    assert parse_text(encode_text(pairs)) == pairs


_fragment = st.sampled_from([b"=", b"\x00", b"Key", b"X-", b"X#", b"\xff", b"\xc3\xa9", b"a" * 70, b"0x1", b"CHAP_C"])


@given(st.lists(_fragment, max_size=30).map(b"".join))
def test_structured_garbage_parses_or_raises_text_error(data: bytes) -> None:
    try:
        pairs = parse_text(data)
    except TextError:
        return
    assert all(k and "\x00" not in v for k, v in pairs)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("8192", 8192), ("0x2000", 8192), ("0X2000", 8192), ("00512", 512), (str(2**64 - 1), 2**64 - 1),
     ("", None), (" 1", None), ("+1", None), ("-1", None), ("1.0", None), ("0x", None), ("\u0663", None),
     ("1_000", None), (str(2**64), None), ("0b AAA", None)],
)
def test_parse_number(text: str, value: int | None) -> None:
    assert parse_number(text) == value


# -- the key table ------------------------------------------------------------------------------------------------------


def test_table_covers_rfc_7143_keys() -> None:
    expected = {
        "HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName", "InitiatorName", "TargetAlias",
        "InitiatorAlias", "TargetAddress", "TargetPortalGroupTag", "InitialR2T", "ImmediateData",
        "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
        "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel", "SessionType",
        "AuthMethod", "OFMarker", "IFMarker", "OFMarkInt", "IFMarkInt", "iSCSIProtocolLevel", "TaskReporting",
    }
    assert expected <= set(KEYS)


@pytest.mark.parametrize("spec", list(KEYS.values()), ids=list(KEYS))
def test_table_entry_is_consistent(spec: keys.KeySpec) -> None:
    assert KEYS[spec.name] is spec
    if spec.rule in (Rule.MIN, Rule.MAX):
        assert spec.kind is Kind.NUMBER and spec.bounds is not None and spec.default is not None
    if spec.kind is Kind.NUMBER:
        assert spec.bounds is not None
        if spec.default is not None:
            n = parse_number(spec.default)
            assert n is not None and spec.bounds[0] <= n <= spec.bounds[1]
    if spec.rule is Rule.LIST:
        assert spec.default in spec.values
    if spec.rule in (Rule.AND, Rule.OR):
        assert spec.kind is Kind.BOOLEAN and spec.default in ("Yes", "No")


def test_rfc_defaults() -> None:
    d = NegotiatedParams.defaults()
    assert (d.max_recv_data_segment_length, d.max_burst_length, d.first_burst_length) == (8192, 262144, 65536)
    assert (d.default_time2wait, d.default_time2retain, d.max_outstanding_r2t) == (2, 20, 1)
    assert d.initial_r2t and d.immediate_data and d.data_pdu_in_order and d.data_sequence_in_order
    assert not d.header_digest and not d.data_digest
    assert (d.error_recovery_level, d.max_connections, d.iscsi_protocol_level) == (0, 1, 0)
    assert d.session_type == "Normal" and d.task_reporting == "RFC3720" and d.initiator_name is None


def test_untouched_negotiator_yields_the_defaults() -> None:
    assert Negotiator().result() == NegotiatedParams.defaults()


# -- the rules (§6.2) ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "ours", "answer"), [("Yes", "Yes", "Yes"), ("Yes", "No", "No"), ("No", "Yes", "No"), ("No", "No", "No")]
)
def test_boolean_and(offer: str, ours: str, answer: str) -> None:
    answers, result = negotiate([("ImmediateData", offer)], ImmediateData=ours)
    assert answers == [("ImmediateData", answer)]
    assert result.immediate_data is (answer == "Yes")


@pytest.mark.parametrize(
    ("offer", "ours", "answer"), [("Yes", "Yes", "Yes"), ("Yes", "No", "Yes"), ("No", "Yes", "Yes"), ("No", "No", "No")]
)
def test_boolean_or(offer: str, ours: str, answer: str) -> None:
    answers, result = negotiate([("InitialR2T", offer)], InitialR2T=ours)
    assert answers == [("InitialR2T", answer)]
    assert result.initial_r2t is (answer == "Yes")


def test_numeric_min() -> None:
    answers, result = negotiate([("MaxBurstLength", "16776192"), ("MaxOutstandingR2T", "8")],
                                MaxBurstLength="1048576", MaxOutstandingR2T="4")
    assert answers == [("MaxBurstLength", "1048576"), ("MaxOutstandingR2T", "4")]
    assert (result.max_burst_length, result.max_outstanding_r2t) == (1048576, 4)
    answers, result = negotiate([("MaxBurstLength", "131072")])
    assert answers == [("MaxBurstLength", "131072")] and result.max_burst_length == 131072


def test_numeric_max() -> None:
    assert negotiate([("DefaultTime2Wait", "0")], DefaultTime2Wait="2")[0] == [("DefaultTime2Wait", "2")]
    answers, result = negotiate([("DefaultTime2Wait", "10")], DefaultTime2Wait="2")
    assert answers == [("DefaultTime2Wait", "10")] and result.default_time2wait == 10


def test_numeric_hex_offer_is_answered_in_decimal() -> None:
    assert negotiate([("MaxBurstLength", "0x10000")])[0] == [("MaxBurstLength", "65536")]


@pytest.mark.parametrize(
    ("key", "value"),
    [("MaxBurstLength", "511"), ("MaxBurstLength", str(2**24)), ("ErrorRecoveryLevel", "3"),
     ("DefaultTime2Retain", "3601"), ("MaxConnections", "0"), ("MaxOutstandingR2T", "65536"),
     ("iSCSIProtocolLevel", "32"), ("MaxBurstLength", "lots"), ("MaxBurstLength", "-1"), ("ImmediateData", "yes"),
     ("InitialR2T", "Maybe"), ("HeaderDigest", "CRC32C,,None"), ("MaxRecvDataSegmentLength", "100")],
)
def test_out_of_range_or_ill_formed_is_rejected_and_default_kept(key: str, value: str) -> None:
    answers, result = negotiate([(key, value)])
    assert answers == [(key, "Reject")]
    assert result == NegotiatedParams.defaults()


def test_error_recovery_level_is_zero_whatever_is_offered() -> None:
    answers, result = negotiate([("ErrorRecoveryLevel", "2")])
    assert answers == [("ErrorRecoveryLevel", "0")] and result.error_recovery_level == 0


def test_list_picks_the_initiators_first_acceptable_value() -> None:
    answers, result = negotiate([("HeaderDigest", "CRC32C,None"), ("DataDigest", "None,CRC32C")])
    assert answers == [("HeaderDigest", "CRC32C"), ("DataDigest", "None")]
    assert result.header_digest and not result.data_digest


def test_list_ignores_unknown_values_and_rejects_when_nothing_fits() -> None:
    assert negotiate([("HeaderDigest", "MD5,None")])[0] == [("HeaderDigest", "None")]
    answers, result = negotiate([("DataDigest", "CRC32C")], DataDigest="None")
    assert answers == [("DataDigest", "Reject")] and not result.data_digest


def test_task_reporting() -> None:
    assert negotiate([("TaskReporting", "FastAbort,RFC3720")])[0] == [("TaskReporting", "RFC3720")]
    assert negotiate([("TaskReporting", "ResponseFence,FastAbort")])[0] == [("TaskReporting", "Reject")]
    answers, result = negotiate([("TaskReporting", "FastAbort,RFC3720")], TaskReporting="RFC3720,FastAbort")
    assert answers == [("TaskReporting", "FastAbort")] and result.task_reporting == "FastAbort"


def test_protocol_level_is_minimum_with_ours() -> None:
    assert negotiate([("iSCSIProtocolLevel", "2")]) [1].iscsi_protocol_level == 1
    assert negotiate([("iSCSIProtocolLevel", "0")])[0] == [("iSCSIProtocolLevel", "0")]


def test_markers_are_answered_no_and_mark_intervals_reject() -> None:
    answers, _ = negotiate([("OFMarker", "Yes"), ("IFMarker", "No"), ("OFMarkInt", "2048~8192"),
                            ("IFMarkInt", "2048~8192")])
    assert answers == [("OFMarker", "No"), ("IFMarker", "No"), ("OFMarkInt", "Reject"), ("IFMarkInt", "Reject")]


def test_unknown_and_extension_keys_are_not_understood() -> None:
    answers, _ = negotiate([("X-com.example.feature", "Yes"), ("X#SomethingNew", "1"), ("RDMAExtensions", "Yes")])
    assert answers == [("X-com.example.feature", "NotUnderstood"), ("X#SomethingNew", "NotUnderstood"),
                       ("RDMAExtensions", "NotUnderstood")]


def test_node_architecture_is_understood_and_needs_no_answer() -> None:
    assert negotiate([("X#NodeArchitecture", "Linux,open-iscsi")])[0] == []


def test_mrdsl_declarations_cross_once() -> None:
    n = Negotiator({"MaxRecvDataSegmentLength": "65536"})
    assert n.respond([("MaxRecvDataSegmentLength", "262144")]) == [("MaxRecvDataSegmentLength", "65536")]
    assert n.declarations() == []
    r = n.result()
    assert (r.max_recv_data_segment_length, r.target_max_recv_data_segment_length) == (262144, 65536)


def test_declarations_when_the_initiator_never_declared() -> None:
    n = Negotiator()
    assert n.result().target_max_recv_data_segment_length == 8192  # nothing declared yet: the RFC default holds
    assert n.declarations() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.declarations() == []
    assert n.result().target_max_recv_data_segment_length == 262144
    assert n.result().max_recv_data_segment_length == 8192


def test_declared_names_are_recorded() -> None:
    answers, r = negotiate([("InitiatorName", "iqn.1994-05.com.redhat:x"), ("InitiatorAlias", "host1"),
                            ("TargetName", "iqn.2026-11.io.lunsync:demo")])
    assert answers == []
    assert (r.initiator_name, r.initiator_alias, r.target_name) == (
        "iqn.1994-05.com.redhat:x", "host1", "iqn.2026-11.io.lunsync:demo")


@pytest.mark.parametrize("name", ["", "iqn." + "x" * 220])
def test_ill_formed_names_fail_the_login(name: str) -> None:
    with pytest.raises(NegotiationError):
        negotiate([("InitiatorName", name)])


def test_answers_follow_the_offer_order() -> None:
    offers = [("MaxBurstLength", "65536"), ("X-a", "1"), ("FirstBurstLength", "8192"), ("SessionType", "Normal"),
              ("HeaderDigest", "None")]
    assert [k for k, _ in negotiate(offers)[0]] == ["MaxBurstLength", "X-a", "FirstBurstLength", "HeaderDigest"]


# -- relevance (§13) ----------------------------------------------------------------------------------------------------


def test_discovery_session_answers_irrelevant_for_data_keys() -> None:
    n = Negotiator(session_type="Discovery")
    answers = n.respond([("MaxBurstLength", "65536"), ("InitialR2T", "No"), ("MaxConnections", "2"),
                         ("HeaderDigest", "None"), ("DefaultTime2Wait", "0"), ("TaskReporting", "RFC3720")])
    assert answers == [("MaxBurstLength", "Irrelevant"), ("InitialR2T", "Irrelevant"), ("MaxConnections", "Irrelevant"),
                       ("HeaderDigest", "None"), ("DefaultTime2Wait", "2"), ("TaskReporting", "Irrelevant")]
    r = n.result()
    assert r.session_type == "Discovery" and r.max_burst_length == 262144


@pytest.mark.parametrize("fbl_first", [True, False])
def test_first_burst_irrelevant_without_unsolicited_data(fbl_first: bool) -> None:
    fbl = [("FirstBurstLength", "8192")]
    rest = [("InitialR2T", "Yes"), ("ImmediateData", "No")]
    answers, result = negotiate(fbl + rest if fbl_first else rest + fbl, ImmediateData="No")
    assert ("FirstBurstLength", "Irrelevant") in answers
    assert result.first_burst_length == 65536


def test_first_burst_never_exceeds_max_burst() -> None:
    answers, r = negotiate([("FirstBurstLength", "262144"), ("MaxBurstLength", "16384")],
                           FirstBurstLength="1048576", MaxBurstLength="1048576")
    assert answers == [("FirstBurstLength", "16384"), ("MaxBurstLength", "16384")]
    assert r.first_burst_length <= r.max_burst_length


def test_max_burst_below_default_first_burst_makes_the_target_offer_one() -> None:
    n = Negotiator()
    assert n.respond([("MaxBurstLength", "16384")]) == [("MaxBurstLength", "16384"), ("FirstBurstLength", "16384")]
    assert n.awaiting_answers
    assert n.respond([("FirstBurstLength", "8192")]) == []
    r = n.result()
    assert (r.first_burst_length, r.max_burst_length, n.awaiting_answers) == (8192, 16384, False)


def test_max_burst_below_agreed_first_burst_is_an_error() -> None:
    n = Negotiator()
    assert n.respond([("FirstBurstLength", "65536")]) == [("FirstBurstLength", "65536")]
    with pytest.raises(NegotiationError):
        n.respond([("MaxBurstLength", "16384")])


# -- protocol errors ----------------------------------------------------------------------------------------------------


def test_key_negotiated_twice_in_one_login_fails() -> None:
    n = Negotiator()
    n.respond([("MaxBurstLength", "65536")])
    with pytest.raises(NegotiationError) as e:
        n.respond([("MaxBurstLength", "65536")])
    assert (e.value.status_class, e.value.status_detail) == (0x02, 0x00)


def test_unknown_key_twice_fails_too() -> None:
    n = Negotiator()
    n.respond([("X-a", "1")])
    with pytest.raises(NegotiationError):
        n.respond([("X-a", "1")])


@pytest.mark.parametrize("value", ["Reject", "Irrelevant", "NotUnderstood"])
def test_reserved_words_may_not_be_offered(value: str) -> None:
    with pytest.raises(NegotiationError, match="reserved"):
        negotiate([("MaxBurstLength", value)])


@pytest.mark.parametrize("key", ["TargetAlias", "TargetAddress", "TargetPortalGroupTag"])
def test_target_only_keys_from_the_initiator_fail(key: str) -> None:
    with pytest.raises(NegotiationError):
        negotiate([(key, "1")])


@pytest.mark.parametrize("key", ["CHAP_A", "SRP_U", "KRB_AP_REQ", "SPKM_REQ"])
def test_authentication_keys_are_not_the_negotiators(key: str) -> None:
    with pytest.raises(NegotiationError, match=key) as e:
        Negotiator().respond([(key, "5")])
    assert (e.value.status_class, e.value.status_detail) == (0x02, 0x00)


def test_sendtargets_during_login_is_rejected() -> None:
    assert negotiate([("SendTargets", "All")])[0] == [("SendTargets", "Reject")]


def test_session_type_key() -> None:
    n = Negotiator(session_type="Discovery")
    assert n.respond([("SessionType", "Discovery"), ("MaxBurstLength", "512")]) == [("MaxBurstLength", "Irrelevant")]
    with pytest.raises(NegotiationError, match="disagrees"):
        Negotiator().respond([("SessionType", "Discovery")])
    with pytest.raises(NegotiationError, match="first"):
        m = Negotiator()
        m.respond([("HeaderDigest", "None")])
        m.respond([("SessionType", "Normal")])


def test_session_types_admitted() -> None:
    with pytest.raises(NegotiationError) as e:
        Negotiator({"SessionType": "Normal"}, session_type="Discovery")
    assert (e.value.status_class, e.value.status_detail) == (0x02, 0x09)
    with pytest.raises(NegotiationError) as e:
        Negotiator(session_type="Boot")
    assert (e.value.status_class, e.value.status_detail) == (0x02, 0x00)


@pytest.mark.parametrize(
    "limits",
    [{"MaxBurstLen": "1"}, {"MaxBurstLength": "100"}, {"ImmediateData": "yes"}, {"HeaderDigest": "MD5"},
     {"HeaderDigest": ""}, {"FirstBurstLength": "1048576", "MaxBurstLength": "65536"}, {"OFMarker": "Yes"}],
)
def test_bad_target_limits_are_refused(limits: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Negotiator(limits)


# -- connections and phases ---------------------------------------------------------------------------------------------


def _session() -> NegotiatedParams:
    n = Negotiator()
    n.respond([("MaxBurstLength", "65536"), ("HeaderDigest", "CRC32C"), ("MaxRecvDataSegmentLength", "16384"),
               ("InitiatorName", "iqn.x")])
    return n.result()


def test_non_leading_connection_keeps_session_values() -> None:
    session = _session()
    n = Negotiator(leading=False, baseline=session)
    answers = n.respond([("MaxBurstLength", "4096"), ("DataDigest", "CRC32C"), ("MaxRecvDataSegmentLength", "9000")])
    assert answers == [("MaxBurstLength", "Irrelevant"), ("DataDigest", "CRC32C"),
                       ("MaxRecvDataSegmentLength", "262144")]
    r = n.result()
    assert r.max_burst_length == 65536 and r.initiator_name == "iqn.x"
    # Connection-scope values start over: the leading connection's HeaderDigest does not carry.
    assert (r.header_digest, r.data_digest, r.max_recv_data_segment_length) == (False, True, 9000)


def test_baseline_is_required_where_it_is_the_source_of_truth() -> None:
    with pytest.raises(ValueError):
        Negotiator(leading=False)
    with pytest.raises(ValueError):
        Negotiator(phase=Phase.FULL_FEATURE)


def test_full_feature_text_negotiation() -> None:
    session = _session()
    n = Negotiator(phase=Phase.FULL_FEATURE, baseline=session)
    answers = n.respond([("HeaderDigest", "None"), ("MaxBurstLength", "512"), ("MaxRecvDataSegmentLength", "32768"),
                         ("SendTargets", "All"), ("X-z", "1")])
    assert answers == [("HeaderDigest", "Reject"), ("MaxBurstLength", "Reject"), ("X-z", "NotUnderstood")]
    r = n.result()
    assert r.max_recv_data_segment_length == 32768 and r.header_digest and r.max_burst_length == 65536
    assert n.declarations() == [] and n.offers() == []


# -- target offers ------------------------------------------------------------------------------------------------------


def test_no_offers_with_default_limits() -> None:
    n = Negotiator()
    assert n.offers() == [] and not n.awaiting_answers


def test_boolean_the_target_decides_is_declared_without_awaiting() -> None:
    n = Negotiator({"ImmediateData": "No"})
    assert n.offers() == [("ImmediateData", "No")]
    assert not n.awaiting_answers and n.result().immediate_data is False
    assert n.offers() == []


def test_numeric_offer_awaits_an_admissible_answer() -> None:
    n = Negotiator({"MaxBurstLength": "65536", "FirstBurstLength": "65536"})
    assert n.offers() == [("MaxBurstLength", "65536")]
    assert n.awaiting_answers
    assert n.respond([("MaxBurstLength", "65536")]) == []
    assert not n.awaiting_answers and n.result().max_burst_length == 65536


def test_answer_below_first_burst_draws_a_first_burst_offer() -> None:
    n = Negotiator({"MaxBurstLength": "65536"})
    n.offers()
    assert n.respond([("MaxBurstLength", "32768")]) == [("FirstBurstLength", "32768")]
    assert n.awaiting_answers and n.result().max_burst_length == 32768


def test_numeric_offer_answered_above_ours_is_an_error() -> None:
    n = Negotiator({"MaxBurstLength": "65536", "FirstBurstLength": "65536"})
    n.offers()
    with pytest.raises(NegotiationError, match="inadmissible"):
        n.respond([("MaxBurstLength", "131072")])


def test_list_offer_when_the_default_is_not_acceptable() -> None:
    n = Negotiator({"HeaderDigest": "CRC32C"})
    assert n.offers() == [("HeaderDigest", "CRC32C")]
    assert n.respond([("HeaderDigest", "CRC32C")]) == []
    assert n.result().header_digest
    m = Negotiator({"DataDigest": "CRC32C"})
    m.offers()
    with pytest.raises(NegotiationError):
        m.respond([("DataDigest", "Reject")])


def test_keys_already_negotiated_are_not_offered() -> None:
    n = Negotiator({"HeaderDigest": "CRC32C"})
    n.respond([("HeaderDigest", "CRC32C,None")])
    assert n.offers() == []


def test_discovery_offers_skip_irrelevant_keys() -> None:
    assert Negotiator({"ImmediateData": "No"}, session_type="Discovery").offers() == []


# -- properties ---------------------------------------------------------------------------------------------------------

_negotiable = [k for k, s in KEYS.items() if s.rule in (Rule.MIN, Rule.MAX, Rule.AND, Rule.OR, Rule.LIST)
               and not s.security]
_values = st.one_of(st.integers(0, 2**25).map(str), st.sampled_from(["Yes", "No", "None", "CRC32C", "CRC32C,None",
                                                                      "RFC3720", "0x200", "", "x", "Reject"]))


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(_negotiable), _values, max_size=len(_negotiable)),
       st.sampled_from(["Normal", "Discovery"]))
def test_answers_obey_the_rules(offers: dict[str, str], session_type: str) -> None:
    n = Negotiator(session_type=session_type)
    try:
        answers = dict(n.respond(list(offers.items())))
    except NegotiationError:
        assert "Reject" in offers.values()  # the only error these offers can provoke
        return
    assert set(answers) - set(offers) <= {"FirstBurstLength"}
    limits = keys.DEFAULT_TARGET_LIMITS
    for key, answer in answers.items():
        spec = KEYS[key]
        if answer in ("Reject", "Irrelevant") or key not in offers:  # not offered: our FirstBurstLength offer
            continue
        offered = offers[key]
        if spec.rule is Rule.MIN:
            assert int(answer) <= min(int(offered, 0), int(limits[key]))
        elif spec.rule is Rule.MAX:
            assert int(answer) == max(int(offered, 0), int(limits[key]))
        elif spec.rule is Rule.LIST:
            assert answer in offered.split(",")
        else:
            assert answer in ("Yes", "No")
    r = n.result()
    assert r.first_burst_length <= r.max_burst_length
    if n.awaiting_answers:
        assert answers["FirstBurstLength"] == str(r.max_burst_length)
