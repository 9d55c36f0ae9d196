"""A deliberately tiny second implementation: checks the server vectors from PROTOCOL.md's text alone.

It imports nothing from bubble_ref — only `cryptography` (RSA-PSS, SHA-256) and `rfc8785` (the canonical JSON the
text names) — to prove that the text and the vectors are enough to verify every signed server object (§15.1).
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

VECTORS = json.loads((Path(__file__).parent / "vectors" / "server_vectors.json").read_text("utf-8"))
SIGNED = {v["name"]: v for v in VECTORS["signed"]}


def identity(public_key_b64: str) -> str:
    "§2: lowercase hex SHA-256 of the DER SubjectPublicKeyInfo."
    return hashlib.sha256(base64.b64decode(public_key_b64, validate=True)).hexdigest()


def signed_bytes(obj: dict) -> bytes:
    "§15.1: RFC 8785 of the object without its top-level `signature`."
    return rfc8785.dumps({k: v for k, v in obj.items() if k != "signature"})


def verifies(public_key_b64: str, obj: dict, data: bytes | None = None) -> bool:
    "§3: RSA-PSS, SHA-256, MGF1-SHA-256, salt exactly 32 bytes, RSA-2048 with e = 65537."
    key = serialization.load_der_public_key(base64.b64decode(public_key_b64, validate=True))
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048 and key.public_numbers().e == 65537
    signature = base64.b64decode(obj["signature"], validate=True)
    assert len(signature) == 256
    try:
        key.verify(signature, signed_bytes(obj) if data is None else data,
                   padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
        return True
    except InvalidSignature:
        return False


def key_of(server_id: str) -> str:
    return next(k["public_key"] for k in VECTORS["keys"].values() if k["id"] == server_id)


def test_the_keys_have_their_ids():
    for entry in VECTORS["keys"].values():
        assert identity(entry["public_key"]) == entry["id"]


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_canonical_bytes_and_signature(name):
    vector = SIGNED[name]
    obj = vector["object"]
    assert signed_bytes(obj) == bytes.fromhex(vector["canonical_hex"]) == vector["canonical_text"].encode("utf-8")
    assert sorted(k for k in obj if k != "signature") == vector["signed_fields"]
    signer = VECTORS["keys"][vector["signer"]]
    assert signer["id"] == vector["signer_id"]
    assert verifies(signer["public_key"], obj)
    # the signer the object names is the one that signed
    named = obj.get("sender_id") or obj.get("voter_id") or obj.get("responder_id") or obj.get("reporter_id")
    assert named == signer["id"]


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_a_changed_field_breaks_the_signature(name):
    obj = dict(SIGNED[name]["object"])
    field = next(k for k in sorted(obj) if k != "signature" and isinstance(obj[k], str) and obj[k])
    obj[field] = obj[field][:-1] + ("0" if obj[field][-1] != "0" else "1")
    assert not verifies(VECTORS["keys"][SIGNED[name]["signer"]]["public_key"], obj)


def test_key_order_and_whitespace_on_the_wire_do_not_matter():
    obj = SIGNED["relay"]["object"]
    reordered = json.loads(json.dumps(dict(reversed(list(obj.items()))), indent=3))
    reordered["packet"] = dict(reversed(list(reordered["packet"].items())))
    assert verifies(VECTORS["keys"]["server_a"]["public_key"], reordered)


def test_relay_packet_id_is_recomputed_from_the_packet():
    "§9: SHA-256 over identity(recipient) '.' message '.' signature."
    relay = SIGNED["relay"]["object"]
    packet = relay["packet"]
    text = f"{identity(packet['recipient'])}.{packet['message']}.{packet['signature']}"
    assert hashlib.sha256(text.encode("ascii")).hexdigest() == relay["packet_id"]


def test_server_list_entries_and_responder():
    "§16: every listed id is its key's hash; the responder is listed and signed it."
    listed = SIGNED["server-list"]["object"]
    for entry in listed["servers"]:
        assert identity(entry["public_key"]) == entry["server_id"]
    assert listed["known_servers"] == [e["server_id"] for e in listed["servers"]]
    responder = next(e for e in listed["servers"] if e["server_id"] == listed["responder_id"])
    assert verifies(responder["public_key"], listed)
    assert "ü".encode("utf-8") in signed_bytes(listed), "non-ASCII is written as raw UTF-8, never \\u-escaped"


def test_report_names_its_key_and_carries_audit_evidence():
    "§6.5 and §18: reporter_id is the hash of public_key; evidence is base64 of audit_evidence.json."
    report = SIGNED["report"]["object"]
    assert identity(report["public_key"]) == report["reporter_id"]
    assert verifies(report["public_key"], report)
    evidence = json.loads(base64.b64decode(report["evidence"], validate=True))
    assert set(evidence) == {"kind", "packet_id", "result", "deadline"} and evidence["kind"] == "audit_failed"


def test_decision_carries_votes_that_verify_and_match():
    "§18: a decision is unsigned; each signed vote verifies with its voter's key, and `votes` equals them."
    decision = VECTORS["decision"]["object"]
    assert "signature" not in decision
    for vote in decision["signed_votes"]:
        assert vote["reported_server_id"] == decision["reported_server_id"]
        assert verifies(key_of(vote["voter_id"]), vote)
    assert {v["voter_id"]: v["vote"] for v in decision["signed_votes"]} == decision["votes"]
    assert len(decision["votes"]) > len(decision["signed_votes"]) // 2


def test_the_unsigned_sync_answer_holds_packets_whose_ids_check():
    answer = VECTORS["unsigned"][0]["object"]
    for item in answer["packets"]:
        packet = item["packet"]
        text = f"{identity(packet['recipient'])}.{packet['message']}.{packet['signature']}"
        assert hashlib.sha256(text.encode("ascii")).hexdigest() == item["packet_id"]


@pytest.mark.parametrize("mistake", VECTORS["must_not_verify"], ids=lambda m: m["name"])
def test_the_documented_mistake_does_not_verify(mistake):
    key = VECTORS["keys"][mistake["signer"]]["public_key"]
    obj = mistake["object"]
    assert verifies(key, obj, bytes.fromhex(mistake["signed_hex"])), "the signature is real, over the wrong bytes"
    assert not verifies(key, obj), "over the RFC 8785 bytes it fails"
    assert bytes.fromhex(mistake["signed_hex"]) != signed_bytes(obj)
