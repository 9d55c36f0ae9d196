"""bubble_ref.packets: schemas, strict JSON parsing and the packet classes."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

import fastjsonschema
import pytest

from bubble_ref import packets
from bubble_ref.packets import (
    MAX_PACKET_BYTES, PACKET_TYPES, ClientMessagePacket, EncryptedSignature, InnerMessage, MisbehaviorReport,
    PacketError, QuorumDecision, RetrievalPacket, ServerListRequest, ServerListResponse, SignedContent,
    SignedMessage)

from conftest import EXAMPLE_UUID, FIXED_TIMESTAMP, OTHER_SERVER_ID, SERVER_ID, b64

SCHEMA_NAMES = sorted(cls.schema for cls in PACKET_TYPES)


def _ids(cls: type) -> str:
    return cls.__name__


def _property_schema(cls: type, field: str) -> dict:
    "The schema of one top-level property, with a common.json $ref resolved."
    prop = packets.load_schema(cls.schema)["properties"][field]
    ref = prop.get("$ref", "")
    if ref.startswith("common.json#/$defs/"):
        prop = {**packets.load_schema("common")["$defs"][ref.rsplit("/", 1)[1]], **prop}
    return prop


REQUIRED_FIELDS = [(cls, f) for cls in PACKET_TYPES for f in packets.load_schema(cls.schema)["required"]]
ALL_FIELDS = [(cls, f) for cls in PACKET_TYPES for f in packets.load_schema(cls.schema)["properties"]]


def _pair_id(pair) -> str:
    return f"{pair[0].__name__}.{pair[1]}"


def assert_packet_error(excinfo, packet: str, path: str, phrase: str) -> PacketError:
    "The exact type, the packet, the path, and a key phrase of the reason."
    err = excinfo.value
    assert type(err) is PacketError
    assert err.packet == packet
    assert err.path == path
    assert phrase in err.reason, err.reason
    assert str(err) == f"{packet}: {path}: {err.reason}"
    return err


# ----------------------------------------------------------------- basics

def test_packet_types_cover_every_schema_once():
    assert len(PACKET_TYPES) == 9
    assert len({cls.schema for cls in PACKET_TYPES}) == len(PACKET_TYPES)
    for cls in PACKET_TYPES:
        assert issubclass(cls, packets.Packet)
        assert packets.load_schema(cls.schema)["$id"] == f"{packets.SCHEMA_BASE}{cls.schema}.json"


def test_packet_error_is_a_value_error_with_its_parts():
    err = PacketError("inner_message", "/uuid", "bad")
    assert isinstance(err, ValueError)
    assert (err.packet, err.path, err.reason) == ("inner_message", "/uuid", "bad")
    assert str(err) == "inner_message: /uuid: bad"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_shipped_schema_is_valid_draft_2020_12(name):
    validator = packets.validator_for(name)
    assert validator.schema["type"] == "object"
    assert validator.schema["additionalProperties"] is False


# ------------------------------------------------------------ round trips

@pytest.mark.parametrize("cls", PACKET_TYPES, ids=_ids)
def test_round_trip_json_and_dict(cls, example_packets):
    original = example_packets[cls]
    text = original.to_json()
    assert cls.from_json(text) == original
    assert cls.from_json(text.encode("utf-8")) == original
    assert cls.from_dict(original.to_dict()) == original
    assert cls.from_json(text).to_json() == text
    assert json.loads(text) == original.to_dict()
    assert original.validate() is original


@pytest.mark.parametrize("cls", PACKET_TYPES, ids=_ids)
def test_to_json_is_compact_and_keeps_non_ascii(cls, example_packets):
    text = example_packets[cls].to_json()
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    assert "\n" not in text and ": " not in text


def test_inner_message_to_json_keeps_unicode_unescaped(example_packets):
    assert "héllo ✓" in example_packets[InnerMessage].to_json()


def test_retrieval_packet_without_timestamp_leaves_it_out(bob):
    spec = RetrievalPacket(public_key=bob.public.b64, signature=b64(bytes(256)))
    assert spec.to_dict() == {"public_key": bob.public.b64, "signature": b64(bytes(256))}
    assert RetrievalPacket.from_json(spec.to_json()) == spec


def test_typed_packets_write_their_type_first(example_packets):
    for cls in (QuorumDecision, ServerListRequest, ServerListResponse, SignedMessage):
        data = example_packets[cls].to_dict()
        assert next(iter(data)) == "type"
        assert data["type"] == cls.schema


def test_nested_packets_rebuild_their_nested_types(example_packets, alice, bob):
    response = ServerListResponse.from_json(example_packets[ServerListResponse].to_json())
    assert response.known_servers == (alice.id, bob.id)
    assert isinstance(response.known_servers, tuple) and isinstance(response.servers, tuple)
    assert response.servers[1] == {"server_id": bob.id, "url": "http://127.0.0.1:8001", "public_key": bob.public.b64}
    plain = ServerListResponse(known_servers=(SERVER_ID, OTHER_SERVER_ID), timestamp=FIXED_TIMESTAMP)
    assert set(plain.to_dict()) == {"type", "known_servers", "timestamp"}  # the seed's form, no extension fields
    assert ServerListResponse.from_dict(plain.to_dict()) == plain
    signed = SignedMessage.from_json(example_packets[SignedMessage].to_json())
    assert signed.message == SignedContent(content="signed hello", timestamp=FIXED_TIMESTAMP)


def test_other_valid_spellings_are_accepted(alice):
    # a PEM public key, fractional seconds, empty votes and an empty server list are all legal
    inner = InnerMessage(sender=alice.public.pem, content="", uuid=EXAMPLE_UUID, timestamp="2024-06-15T12:34:56.5Z")
    assert InnerMessage.from_json(inner.to_json()) == inner
    decision = QuorumDecision(reported_server_id=SERVER_ID, votes={}, final_decision="whitelisted",
                              timestamp=FIXED_TIMESTAMP)
    assert QuorumDecision.from_dict(decision.to_dict()) == decision
    empty = ServerListResponse(known_servers=(), timestamp=FIXED_TIMESTAMP)
    assert ServerListResponse.from_dict(empty.to_dict()) == empty


# ------------------------------------------------------- missing / extra

@pytest.mark.parametrize("pair", REQUIRED_FIELDS, ids=_pair_id)
def test_missing_field(pair, example_packets):
    cls, field = pair
    data = example_packets[cls].to_dict()
    del data[field]
    with pytest.raises(PacketError) as excinfo:
        cls.from_dict(data)
    assert_packet_error(excinfo, cls.schema, "/", f"missing field {field!r}")
    with pytest.raises(PacketError) as excinfo:
        cls.from_json(json.dumps(data))
    assert_packet_error(excinfo, cls.schema, "/", f"missing field {field!r}")


@pytest.mark.parametrize("cls", PACKET_TYPES, ids=_ids)
def test_extra_field(cls, example_packets):
    data = {**example_packets[cls].to_dict(), "surplus": "x"}
    with pytest.raises(PacketError) as excinfo:
        cls.from_dict(data)
    assert_packet_error(excinfo, cls.schema, "/", "unexpected field 'surplus'")
    with pytest.raises(PacketError) as excinfo:
        cls.from_json(json.dumps(data))
    assert_packet_error(excinfo, cls.schema, "/", "unexpected field 'surplus'")


@pytest.mark.parametrize("cls", PACKET_TYPES, ids=_ids)
def test_empty_object_names_a_missing_field(cls):
    first_required = packets.load_schema(cls.schema)["required"][0]
    with pytest.raises(PacketError) as excinfo:
        cls.from_json("{}")
    assert_packet_error(excinfo, cls.schema, "/", f"missing field {first_required!r}")


def test_nested_missing_and_extra_fields(example_packets):
    data = example_packets[SignedMessage].to_dict()
    missing = copy.deepcopy(data)
    del missing["message"]["timestamp"]
    with pytest.raises(PacketError) as excinfo:
        SignedMessage.from_dict(missing)
    assert_packet_error(excinfo, "signed_message", "/message", "missing field 'timestamp'")
    extra = copy.deepcopy(data)
    extra["message"]["sender"] = "x"
    with pytest.raises(PacketError) as excinfo:
        SignedMessage.from_dict(extra)
    assert_packet_error(excinfo, "signed_message", "/message", "unexpected field 'sender'")


# ------------------------------------------------------------- wrong type

def _type_name(value) -> str:
    return {int: "integer", float: "number", bool: "boolean", type(None): "null", list: "array", dict: "object",
            str: "string"}[type(value)]


@pytest.mark.parametrize("wrong", [12345, 1.5, True, None, ["x"]], ids=lambda v: _type_name(v))
@pytest.mark.parametrize("pair", ALL_FIELDS, ids=_pair_id)
def test_wrong_type_for_every_field(pair, wrong, example_packets):
    cls, field = pair
    prop = _property_schema(cls, field)
    if prop.get("type") == "array" and isinstance(wrong, list):
        wrong = {"not": "an array"}
    data = {**example_packets[cls].to_dict(), field: wrong}
    if "type" in prop:
        phrase = f"expected {prop['type']}, got {_type_name(wrong)}"
    elif "const" in prop:
        phrase = f"must be {prop['const']!r}, got {wrong!r}"
    else:
        phrase = "must be one of"
    with pytest.raises(PacketError) as excinfo:
        cls.from_dict(data)
    assert_packet_error(excinfo, cls.schema, f"/{field}", phrase)


def test_string_where_object_expected(example_packets):
    data = {**example_packets[QuorumDecision].to_dict(), "votes": "everyone agrees"}
    with pytest.raises(PacketError) as excinfo:
        QuorumDecision.from_dict(data)
    assert_packet_error(excinfo, "quorum_decision", "/votes", "expected object, got string")


@pytest.mark.parametrize("text, got", [("[]", "array"), ('"a string"', "string"), ("42", "integer"),
                                       ("4.5", "number"), ("null", "null"), ("true", "boolean")])
@pytest.mark.parametrize("cls", PACKET_TYPES, ids=_ids)
def test_top_level_must_be_an_object(cls, text, got):
    with pytest.raises(PacketError) as excinfo:
        cls.from_json(text)
    assert_packet_error(excinfo, cls.schema, "/", f"expected object, got {got}")


# --------------------------------------------------------- strict parsing

@pytest.mark.parametrize("text, phrase", [
    ('{"signature": ', "invalid JSON: Expecting value at line 1 column 15"),
    ("", "invalid JSON: Expecting value at line 1 column 1"),
    ("{'signature': 'QQ=='}", "invalid JSON: Expecting property name enclosed in double quotes"),
    ('{"signature": "QQ=="} trailing', "invalid JSON: Extra data"),
    ('{"signature": "QQ==",}', "invalid JSON"),
    ('{"signature": "QQ=="\n\n', "line 3"),
])
def test_invalid_json(text, phrase):
    with pytest.raises(PacketError) as excinfo:
        EncryptedSignature.from_json(text)
    assert_packet_error(excinfo, "encrypted_signature", "/", phrase)


@pytest.mark.parametrize("data, byte", [
    (b'{"signature": "\xff"}', 15),
    (b'{"signature": "QQ==\xc3"}', 19),
    (b'{"signature": "\x80abc"}', 15),
])
def test_non_utf8_bytes(data, byte):
    with pytest.raises(PacketError) as excinfo:
        EncryptedSignature.from_json(data)
    assert_packet_error(excinfo, "encrypted_signature", "/", "not UTF-8 text")
    assert f"at byte {byte}" in excinfo.value.reason


@pytest.mark.parametrize("encoding, phrase", [
    ("utf-16", "not UTF-8 text (invalid start byte at byte 0)"),  # the byte-order mark is not UTF-8
    ("utf-32", "not UTF-8 text (invalid start byte at byte 0)"),
    ("utf-16-le", "invalid JSON"),  # no BOM: NUL bytes are UTF-8, but not JSON
])
def test_other_unicode_encodings_are_refused(encoding, phrase, example_packets):
    data = example_packets[ServerListRequest].to_json().encode(encoding)
    with pytest.raises(PacketError) as excinfo:
        ServerListRequest.from_json(data)
    assert_packet_error(excinfo, "server_list_request", "/", phrase)


def test_encoded_surrogates_are_not_utf8(example_packets):
    data = example_packets[InnerMessage].to_json().encode().replace("héllo".encode(), b"h\xed\xa0\x80llo")
    with pytest.raises(PacketError) as excinfo:
        InnerMessage.from_json(data)
    assert_packet_error(excinfo, "inner_message", "/", "not UTF-8 text")


def test_duplicate_keys_are_refused():
    with pytest.raises(PacketError) as excinfo:
        EncryptedSignature.from_json('{"signature": "QQ==", "signature": "QUI="}')
    assert_packet_error(excinfo, "encrypted_signature", "/", "duplicate key 'signature'")


def test_duplicate_keys_are_refused_in_nested_objects(example_packets):
    text = example_packets[SignedMessage].to_json().replace(
        '"content":"signed hello"', '"content":"signed hello","content":"other"')
    with pytest.raises(PacketError) as excinfo:
        SignedMessage.from_json(text)
    assert_packet_error(excinfo, "signed_message", "/", "duplicate key 'content'")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(constant):
    with pytest.raises(PacketError) as excinfo:
        EncryptedSignature.from_json(f'{{"signature": {constant}}}')
    assert_packet_error(excinfo, "encrypted_signature", "/", f"invalid JSON: {constant} is not valid JSON")


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_whole_packet_over_max_packet_bytes(as_bytes, example_packets):
    text = example_packets[ClientMessagePacket].to_json()
    too_big = text + " " * (MAX_PACKET_BYTES + 1 - len(text))
    assert len(too_big.encode()) == MAX_PACKET_BYTES + 1
    with pytest.raises(PacketError) as excinfo:
        ClientMessagePacket.from_json(too_big.encode() if as_bytes else too_big)
    assert_packet_error(excinfo, "client_message", "/",
                        f"packet is {MAX_PACKET_BYTES + 1} bytes; at most {MAX_PACKET_BYTES} bytes are accepted")


def test_packet_of_exactly_max_packet_bytes_is_accepted(example_packets):
    original = example_packets[ClientMessagePacket]
    text = original.to_json()
    assert ClientMessagePacket.from_json(text + " " * (MAX_PACKET_BYTES - len(text))) == original


def test_size_limit_counts_utf8_bytes_not_characters():
    text = '{"signature": "' + "é" * (MAX_PACKET_BYTES // 2) + '"}'
    assert len(text) < MAX_PACKET_BYTES < len(text.encode("utf-8"))
    with pytest.raises(PacketError) as excinfo:
        EncryptedSignature.from_json(text)
    assert_packet_error(excinfo, "encrypted_signature", "/", f"packet is {len(text.encode())} bytes")


def test_parse_json_uses_the_name_it_is_given_and_its_limit():
    assert packets.parse_json("anything", '{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(PacketError) as excinfo:
        packets.parse_json("anything", '{"a": 1}', max_bytes=4)
    assert_packet_error(excinfo, "anything", "/", "packet is 8 bytes; at most 4 bytes are accepted")


# ------------------------------------------------------------ bad base64

BAD_BASE64_SPELLINGS = {
    # each keeps the length of the valid value, so the format is the only problem
    "dollar": lambda v: "$" + v[1:],
    "url-safe-minus": lambda v: "-" + v[1:],
    "url-safe-underscore": lambda v: v[:5] + "_" + v[6:],
    "leading-space": lambda v: " " + v[1:],
    "newline-inside": lambda v: v[:10] + "\n" + v[11:],
    "non-ascii": lambda v: "é" + v[1:],
    "non-canonical-QR==": lambda v: v[:-4] + "QR==",
    "non-canonical-QUJ=": lambda v: v[:-4] + "QUJ=",
    "padding-inside": lambda v: v[:-4] + "Q=QQ",
    "too-much-padding": lambda v: v[:-4] + "Q===",
}
BASE64_FIELDS = [(EncryptedSignature, "signature"), (ClientMessagePacket, "message"), (ClientMessagePacket, "signature"),
                 (MisbehaviorReport, "evidence"), (RetrievalPacket, "signature"), (SignedMessage, "signature")]


@pytest.mark.parametrize("spelling", sorted(BAD_BASE64_SPELLINGS))
@pytest.mark.parametrize("pair", BASE64_FIELDS, ids=_pair_id)
def test_bad_base64(pair, spelling, example_packets):
    cls, field = pair
    valid = example_packets[cls].to_dict()[field]
    bad = BAD_BASE64_SPELLINGS[spelling](valid)
    assert len(bad) == len(valid) and bad != valid
    data = {**example_packets[cls].to_dict(), field: bad}
    with pytest.raises(PacketError) as excinfo:
        cls.from_dict(data)
    assert_packet_error(excinfo, cls.schema, f"/{field}", "not valid base64 (standard alphabet, '=' padding, canonical)")


def test_short_non_canonical_base64_evidence(example_packets):
    data = {**example_packets[MisbehaviorReport].to_dict(), "evidence": "QR=="}
    with pytest.raises(PacketError) as excinfo:
        MisbehaviorReport.from_dict(data)
    assert_packet_error(excinfo, "misbehavior_report", "/evidence", "not valid base64")


@pytest.mark.parametrize("text, ok", [("", True), ("QQ==", True), ("QUI=", True), ("QUJD", True),
                                      ("QR==", False), ("QUJ=", False), ("QQ", False), ("QQ==\n", False),
                                      ("Q Q==", False), ("QQ-_", False), ("é", False)])
def test_is_base64_accepts_only_canonical_padded_standard_base64(text, ok):
    assert packets.is_base64(text) is ok


@pytest.mark.parametrize("value, phrase", [
    ("", "too short: 0 characters, at least"),
    ("hello world", "not a public key"),
    ("-----BEGIN PUBLIC KEY-----\nQUJD\n-----END PUBLIC KEY-----\n\n", "not a public key"),
    ("QR==", "not a public key"),
    ("-----BEGIN PUBLIC KEY-----\nnot a key!\n-----END PUBLIC KEY-----\n", "not a public key"),
    ("-----BEGIN PRIVATE KEY-----\nQUJD\n-----END PRIVATE KEY-----\n", "not a public key"),
])
def test_bad_public_key_text(value, phrase, example_packets):
    data = {**example_packets[RetrievalPacket].to_dict(), "public_key": value}
    with pytest.raises(PacketError) as excinfo:
        RetrievalPacket.from_dict(data)
    assert_packet_error(excinfo, "retrieval", "/public_key", phrase)


def test_public_key_format_only_checks_the_spelling(example_packets):
    # any canonical base64 passes the schema; whether it is an RSA-2048 key is crypto's business
    data = {**example_packets[RetrievalPacket].to_dict(), "public_key": "QUJD"}
    assert RetrievalPacket.from_dict(data).public_key == "QUJD"


# ------------------------------------------------------------ timestamps

BAD_TIMESTAMPS = [
    "2024-06-15T12:34:56+00:00",  # offset instead of Z
    "2024-06-15T12:34:56+02:00",
    "2024-06-15 12:34:56Z",  # no T
    "2024-06-15",  # no time at all
    "2024-02-30T12:34:56Z",  # impossible date
    "2023-02-29T00:00:00Z",  # not a leap year
    "2024-06-15T24:00:00Z",  # impossible hour
    "2024-06-15T12:60:00Z",
    "2024-06-15T12:34:56",  # no zone
    "2024-06-15T12:34:56z",  # lowercase z
    "2024-06-15T12:34:56.1234567Z",  # more than microseconds
    "20240615T123456Z",  # basic format
    "yesterday",
]


@pytest.mark.parametrize("value", BAD_TIMESTAMPS)
@pytest.mark.parametrize("cls", [InnerMessage, ServerListRequest, MisbehaviorReport, QuorumDecision,
                                 ServerListResponse, RetrievalPacket], ids=_ids)
def test_bad_timestamp(cls, value, example_packets):
    data = {**example_packets[cls].to_dict(), "timestamp": value}
    with pytest.raises(PacketError) as excinfo:
        cls.from_dict(data)
    assert_packet_error(excinfo, cls.schema, "/timestamp", "not an ISO-8601 UTC timestamp")


def test_bad_nested_timestamp(example_packets):
    data = example_packets[SignedMessage].to_dict()
    data["message"]["timestamp"] = "2024-06-15T12:34:56+00:00"
    with pytest.raises(PacketError) as excinfo:
        SignedMessage.from_dict(data)
    assert_packet_error(excinfo, "signed_message", "/message/timestamp", "not an ISO-8601 UTC timestamp")


@pytest.mark.parametrize("suffix", ["\n", "\r\n", " "], ids=["lf", "crlf", "space"])
def test_timestamp_with_trailing_whitespace(suffix, example_packets):
    data = {**example_packets[ServerListRequest].to_dict(), "timestamp": FIXED_TIMESTAMP + suffix}
    with pytest.raises(PacketError) as excinfo:
        ServerListRequest.from_dict(data)
    assert_packet_error(excinfo, "server_list_request", "/timestamp", "not an ISO-8601 UTC timestamp")
    with pytest.raises(ValueError, match="not an ISO-8601 UTC timestamp"):
        packets.parse_timestamp(FIXED_TIMESTAMP + suffix)


def test_overlong_timestamp(example_packets):
    data = {**example_packets[ServerListRequest].to_dict(), "timestamp": "2024-06-15T12:34:56.123456Z" + "0" * 6}
    with pytest.raises(PacketError) as excinfo:
        ServerListRequest.from_dict(data)
    assert_packet_error(excinfo, "server_list_request", "/timestamp", "too long: 33 characters, at most 32")


IMPOSSIBLE_TIMESTAMPS = {"2024-02-30T12:34:56Z", "2023-02-29T00:00:00Z", "2024-06-15T24:00:00Z", "2024-06-15T12:60:00Z"}


@pytest.mark.parametrize("value", sorted(set(BAD_TIMESTAMPS) - IMPOSSIBLE_TIMESTAMPS))
def test_parse_timestamp_refuses_other_spellings(value):
    with pytest.raises(ValueError, match="is not an ISO-8601 UTC timestamp like 2024-06-15T12:34:56Z"):
        packets.parse_timestamp(value)


@pytest.mark.parametrize("value", sorted(IMPOSSIBLE_TIMESTAMPS))
def test_parse_timestamp_refuses_impossible_moments(value):
    # the spelling is right, but the date or time does not exist
    with pytest.raises(ValueError, match="is not a real date and time"):
        packets.parse_timestamp(value)


def test_parse_and_format_timestamp(fixed_time):
    assert packets.format_timestamp(fixed_time) == FIXED_TIMESTAMP
    assert packets.parse_timestamp(FIXED_TIMESTAMP) == fixed_time
    assert packets.parse_timestamp("2024-06-15T12:34:56.250Z") == fixed_time.replace(microsecond=250000)
    # other zones are converted to UTC, fractions of a second dropped
    tokyo = timezone(timedelta(hours=9))
    assert packets.format_timestamp(datetime(2024, 6, 15, 21, 34, 56, 999, tzinfo=tokyo)) == FIXED_TIMESTAMP


def test_format_timestamp_refuses_naive_datetimes():
    with pytest.raises(ValueError, match="no time zone"):
        packets.format_timestamp(datetime(2024, 6, 15, 12, 34, 56))


def test_system_clock_is_aware_utc():
    now = packets.system_clock()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)


# ----------------------------------------------------------------- uuids

@pytest.mark.parametrize("value", [
    EXAMPLE_UUID.upper(),  # uppercase
    "123e4567-E89B-42d3-a456-426614174000",  # partly uppercase
    EXAMPLE_UUID.replace("-", ""),  # no hyphens
    "123e4567e-89b-42d3-a456-426614174000",  # hyphens in the wrong places
    "not-a-uuid",
    "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
    "",
])
def test_bad_uuid(value, example_packets):
    data = {**example_packets[InnerMessage].to_dict(), "uuid": value}
    with pytest.raises(PacketError) as excinfo:
        InnerMessage.from_dict(data)
    assert_packet_error(excinfo, "inner_message", "/uuid", "not a canonical lowercase UUID")


@pytest.mark.parametrize("value", ["{" + EXAMPLE_UUID + "}", "urn:uuid:" + EXAMPLE_UUID])
def test_overlong_uuid_spellings(value, example_packets):
    data = {**example_packets[InnerMessage].to_dict(), "uuid": value}
    with pytest.raises(PacketError) as excinfo:
        InnerMessage.from_dict(data)
    assert_packet_error(excinfo, "inner_message", "/uuid", f"too long: {len(value)} characters, at most 36")


# -------------------------------------------------------- oversized values

def _limit(cls: type, field: str, keyword: str) -> int:
    return _property_schema(cls, field)[keyword]


MAX_LENGTH_FIELDS = [(cls, field) for cls, field in ALL_FIELDS if "maxLength" in _property_schema(cls, field)
                     and "pattern" not in _property_schema(cls, field)]


def test_every_string_field_has_a_max_length():
    for cls, field in ALL_FIELDS:
        prop = _property_schema(cls, field)
        if prop.get("type") == "string":
            assert "maxLength" in prop or "pattern" in prop, f"{cls.__name__}.{field} is unbounded"


@pytest.mark.parametrize("pair", MAX_LENGTH_FIELDS, ids=_pair_id)
def test_string_over_max_length(pair, example_packets):
    cls, field = pair
    limit = _limit(cls, field, "maxLength")
    too_long = "A" * (limit - limit % 4 + 4)  # valid base64 characters: the length is the only problem
    data = {**example_packets[cls].to_dict(), field: too_long}
    with pytest.raises(PacketError) as excinfo:
        cls.from_dict(data)
    assert_packet_error(excinfo, cls.schema, f"/{field}", f"too long: {len(too_long)} characters, at most {limit}")


def test_oversized_content_and_public_key(example_packets, alice):
    data = {**example_packets[InnerMessage].to_dict(), "content": "x" * 65537}
    with pytest.raises(PacketError) as excinfo:
        InnerMessage.from_dict(data)
    assert_packet_error(excinfo, "inner_message", "/content", "too long: 65537 characters, at most 65536")
    data = {**example_packets[RetrievalPacket].to_dict(), "public_key": alice.public.b64 * 3}
    with pytest.raises(PacketError) as excinfo:
        RetrievalPacket.from_dict(data)
    assert_packet_error(excinfo, "retrieval", "/public_key", f"too long: {len(alice.public.b64) * 3} characters")


def test_content_at_max_length_is_accepted(example_packets):
    data = {**example_packets[InnerMessage].to_dict(), "content": "é" * 65536}
    assert InnerMessage.from_dict(data).content == "é" * 65536


def test_too_many_votes_and_servers(example_packets):
    ids = [f"{i:064x}" for i in range(1025)]
    data = {**example_packets[QuorumDecision].to_dict(), "votes": dict.fromkeys(ids, "abstain")}
    with pytest.raises(PacketError) as excinfo:
        QuorumDecision.from_dict(data)
    assert_packet_error(excinfo, "quorum_decision", "/votes", "too many entries: 1025, at most 1024")
    data = {**example_packets[ServerListResponse].to_dict(), "known_servers": ids}
    with pytest.raises(PacketError) as excinfo:
        ServerListResponse.from_dict(data)
    assert_packet_error(excinfo, "server_list_response", "/known_servers", "too many entries: 1025, at most 1024")


MIN_LENGTH_FIELDS = [(cls, field) for cls, field in ALL_FIELDS if _property_schema(cls, field).get("minLength")]


@pytest.mark.parametrize("pair", MIN_LENGTH_FIELDS, ids=_pair_id)
def test_string_under_min_length(pair, example_packets):
    cls, field = pair
    limit = _limit(cls, field, "minLength")
    for short in ("", example_packets[cls].to_dict()[field][:limit - 1]):
        data = {**example_packets[cls].to_dict(), field: short}
        with pytest.raises(PacketError) as excinfo:
            cls.from_dict(data)
        assert_packet_error(excinfo, cls.schema, f"/{field}", f"too short: {len(short)} characters, at least {limit}")


# ------------------------------------------------- const, enum, patterns

@pytest.mark.parametrize("cls", [QuorumDecision, ServerListRequest, ServerListResponse, SignedMessage], ids=_ids)
def test_wrong_type_constant(cls, example_packets):
    data = {**example_packets[cls].to_dict(), "type": "something_else"}
    with pytest.raises(PacketError) as excinfo:
        cls.from_dict(data)
    assert_packet_error(excinfo, cls.schema, "/type", f"must be {cls.schema!r}, got 'something_else'")


def test_enum_values(example_packets, alice):
    data = {**example_packets[QuorumDecision].to_dict(), "final_decision": "undecided"}
    with pytest.raises(PacketError) as excinfo:
        QuorumDecision.from_dict(data)
    assert_packet_error(excinfo, "quorum_decision", "/final_decision",
                        "must be one of 'blacklisted', 'whitelisted'; got 'undecided'")
    data = {**example_packets[QuorumDecision].to_dict(), "votes": {alice.id: "maybe"}}
    with pytest.raises(PacketError) as excinfo:
        QuorumDecision.from_dict(data)
    assert_packet_error(excinfo, "quorum_decision", f"/votes/{alice.id}", "must be one of 'blacklist'")


@pytest.mark.parametrize("value, phrase", [
    ("A" * 64, "does not have the expected form (A client or server id"),
    ("g" * 64, "does not have the expected form (A client or server id"),
    ("0x" + "a" * 62, "does not have the expected form (A client or server id"),
    ("a" * 63, "too short: 63 characters, at least 64"),
    ("a" * 65, "too long: 65 characters, at most 64"),
    ("a" * 63 + "\n", "does not have the expected form"),
])
def test_bad_identity(value, phrase, example_packets):
    data = {**example_packets[ServerListRequest].to_dict(), "requester_id": value}
    with pytest.raises(PacketError) as excinfo:
        ServerListRequest.from_dict(data)
    assert_packet_error(excinfo, "server_list_request", "/requester_id", phrase)


def test_bad_identities_inside_lists_and_keys(example_packets):
    data = {**example_packets[ServerListResponse].to_dict(), "known_servers": [SERVER_ID, "nope"]}
    with pytest.raises(PacketError) as excinfo:
        ServerListResponse.from_dict(data)
    assert_packet_error(excinfo, "server_list_response", "/known_servers/1", "too short: 4 characters, at least 64")
    data = {**example_packets[QuorumDecision].to_dict(), "votes": {"NOT-AN-ID": "abstain"}}
    with pytest.raises(PacketError) as excinfo:
        QuorumDecision.from_dict(data)
    assert_packet_error(excinfo, "quorum_decision", "/votes", "key 'NOT-AN-ID': too short: 9 characters")


def test_server_list_entries_must_be_unique(example_packets):
    data = {**example_packets[ServerListResponse].to_dict(), "known_servers": [SERVER_ID, SERVER_ID]}
    with pytest.raises(PacketError) as excinfo:
        ServerListResponse.from_dict(data)
    assert_packet_error(excinfo, "server_list_response", "/known_servers", "entries must be unique")


def test_most_basic_problem_is_reported_first(example_packets):
    # too long AND not base64: the length is reported, not the format
    data = {**example_packets[EncryptedSignature].to_dict(), "signature": "$" * 2000}
    with pytest.raises(PacketError) as excinfo:
        EncryptedSignature.from_dict(data)
    assert_packet_error(excinfo, "encrypted_signature", "/signature", "too long: 2000 characters")
    # a top-level problem is reported before a nested one
    data = {**example_packets[SignedMessage].to_dict(), "message": {"content": 1, "timestamp": "x"}}
    del data["signature"]
    with pytest.raises(PacketError) as excinfo:
        SignedMessage.from_dict(data)
    assert_packet_error(excinfo, "signed_message", "/", "missing field 'signature'")


def test_validate_checks_an_instance_built_in_code(example_packets):
    bad = InnerMessage(**{**example_packets[InnerMessage].to_dict(), "uuid": "not-a-uuid"})
    with pytest.raises(PacketError) as excinfo:
        bad.validate()
    assert_packet_error(excinfo, "inner_message", "/uuid", "not a canonical lowercase UUID")


# ------------------------------------ compiled validator vs reference validator

BAD_LEAVES = [None, 0, -1, 1.5, True, False, [], {}, "", " ", "x", "QQ==", "QR==", "not base64!", "A" * 1025,
              "a" * 64, "A" * 64, "a" * 63, EXAMPLE_UUID, EXAMPLE_UUID.upper(), EXAMPLE_UUID.replace("-", ""),
              FIXED_TIMESTAMP, "2024-06-15T12:34:56.5Z", "2024-06-15T12:34:56+00:00", "2024-02-30T12:34:56Z",
              "blacklist", "blacklisted", "whitelisted", "abstain", "quorum_decision", "server_list_request",
              "server_list_response", "signed_message", "x" * 65537, "é" * 65536, ["a" * 64], {"a" * 64: "abstain"},
              b64(bytes(256)), b64(bytes(256))[:-4] + "QR==", b64(bytes(255)), b64(bytes(644)), "0" * 18, "0" * 19,
              "12a", FIXED_TIMESTAMP + "\n", EXAMPLE_UUID + "\n", "QQ==\n"]


def _variants(value, depth: int = 0):
    "Valid and invalid variations of a JSON value: deletions, additions and substitutions at every level."
    if isinstance(value, dict):
        for key in value:
            yield {k: v for k, v in value.items() if k != key}
            for leaf in BAD_LEAVES:
                yield {**value, key: leaf}
            if depth < 2:
                for inner in _variants(value[key], depth + 1):
                    yield {**value, key: inner}
        yield {**value, "extra": "x"}
        yield {**value, "a" * 64: "abstain"}
    elif isinstance(value, list):
        yield []
        yield value + value[:1]
        for leaf in BAD_LEAVES:
            yield value[:1] + [leaf]
        yield [f"{i:064x}" for i in range(1025)]
    for leaf in (None, [], "x", 0):
        if depth == 0:
            yield leaf


def _battery(example: dict, extra_valid: list[dict]):
    yield example
    yield from extra_valid
    yield from _variants(example)


@pytest.fixture(scope="module")
def batteries(example_packets, alice):
    by_schema = {}
    for cls, packet in example_packets.items():
        example = packet.to_dict()
        extra_valid = []
        if "timestamp" in example:
            extra_valid.append({**example, "timestamp": "2024-06-15T12:34:56.123456Z"})
        if cls is RetrievalPacket:
            extra_valid.append({k: v for k, v in example.items() if k != "timestamp"})
            extra_valid.append({**example, "public_key": alice.public.pem})
        if cls is InnerMessage:
            extra_valid.append({**example, "sender": alice.public.pem, "content": ""})
        if cls is QuorumDecision:
            extra_valid.append({**example, "votes": {}})
        if cls is ServerListResponse:
            extra_valid.append({**example, "known_servers": []})
        by_schema[cls.schema] = list(_battery(example, extra_valid))
    return by_schema


def _compiled_accepts(name: str, data) -> bool:
    try:
        packets.compiled_validator_for(name)(data)
        return True
    except fastjsonschema.JsonSchemaValueException:
        return False


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_compiled_and_reference_validators_agree(name, batteries):
    reference = packets.validator_for(name)
    accepted = rejected = 0
    disagreements = []
    for data in batteries[name]:
        ref_ok = reference.is_valid(data)
        fast_ok = _compiled_accepts(name, data)
        if ref_ok != fast_ok:
            disagreements.append((ref_ok, fast_ok, repr(data)[:200]))
        accepted += ref_ok
        rejected += not ref_ok
    assert not disagreements, disagreements[:5]
    assert accepted >= 2 and rejected >= 30, (accepted, rejected)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_validate_dict_agrees_with_the_reference_validator(name, batteries):
    reference = packets.validator_for(name)
    for data in batteries[name]:
        if reference.is_valid(data):
            assert packets.validate_dict(name, data) is None
        else:
            with pytest.raises(PacketError) as excinfo:
                packets.validate_dict(name, data)
            assert type(excinfo.value) is PacketError
            assert excinfo.value.packet == name
            assert "refused by the compiled schema check" not in excinfo.value.reason


def test_validators_are_cached():
    assert packets.compiled_validator_for("inner_message") is packets.compiled_validator_for("inner_message")
    assert packets.validator_for("inner_message") is packets.validator_for("inner_message")


def test_compiled_validator_refuses_keywords_not_proven_identical(monkeypatch):
    schema = {"type": "object", "properties": {"oneOf": {"type": "string"}},
              "additionalProperties": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}
    monkeypatch.setattr(packets, "load_schema", lambda name: schema)
    with pytest.raises(RuntimeError, match=r"schema not_a_schema uses \['oneOf'\]"):
        packets.compiled_validator_for("not_a_schema")


def test_identity_with_trailing_newline_is_refused(example_packets):
    # `$` in the identity pattern matches before a final newline for jsonschema (re.search) but not for
    # fastjsonschema (which rewrites `$` to `\Z`); validate_dict must still refuse the value.
    data = {**example_packets[ServerListRequest].to_dict(), "requester_id": "a" * 64 + "\n"}
    with pytest.raises(PacketError) as excinfo:
        ServerListRequest.from_dict(data)
    assert type(excinfo.value) is PacketError
    assert excinfo.value.packet == "server_list_request"
    assert "requester_id" in excinfo.value.path + excinfo.value.reason
