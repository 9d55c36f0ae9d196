"""The published test vectors (tests/vectors/, described in PROTOCOL.md) open as documented."""
import base64
import hashlib
import json
from datetime import timezone
from pathlib import Path

import pytest

from bubble_ref import envelope
from bubble_ref.crypto import BOX_SIZES, Identity, load_public_key
from bubble_ref.envelope import ReplayCache, check_packet, open_message, packet_id, verify_retrieval_proof
from bubble_ref.packets import ClientMessagePacket, parse_timestamp

VECTORS_DIR = Path(__file__).parent / "vectors"
VECTORS = json.loads((VECTORS_DIR / "vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def keys() -> dict[str, Identity]:
    return {name: Identity.load(VECTORS_DIR / entry["private_key_file"]) for name, entry in VECTORS["keys"].items()}


def test_key_files_match_published_public_keys_and_ids(keys):
    for name, entry in VECTORS["keys"].items():
        der = base64.b64decode(entry["public_key"])
        assert keys[name].public.b64 == entry["public_key"]
        assert entry["id"] == hashlib.sha256(der).hexdigest() == keys[name].id


@pytest.mark.parametrize("vector", VECTORS["sealed_messages"], ids=lambda v: v["name"])
def test_sealed_message_opens_to_expected_content(keys, vector):
    opened = open_message(keys[vector["to"]], vector["packet"])
    expected = vector["expected"]
    assert (opened.sender.b64, opened.sender_id, opened.content, opened.uuid, opened.timestamp) == (
        expected["sender"], expected["sender_id"], expected["content"], expected["uuid"], expected["timestamp"])


@pytest.mark.parametrize("vector", VECTORS["sealed_messages"], ids=lambda v: v["name"])
def test_sealed_message_id_and_box_sizes(keys, vector):
    packet = ClientMessagePacket.from_dict(vector["packet"])
    checked = check_packet(packet)
    assert packet_id(packet) == vector["packet_id"] == checked.id
    assert len(checked.message_box) == vector["message_box_bytes"] and vector["message_box_bytes"] in BOX_SIZES
    assert len(checked.signature_box) == vector["signature_box_bytes"] == envelope.SIGNATURE_BOX_SIZE
    # The id is over the recipient's identity: a PEM spelling of the same key names the same packet.
    pem = load_public_key(packet.recipient).pem
    assert packet_id(ClientMessagePacket(pem, packet.message, packet.signature)) == vector["packet_id"]


@pytest.mark.parametrize("vector", VECTORS["rejected_packets"], ids=lambda v: v["name"])
def test_rejected_packet_fails_with_documented_error(keys, vector):
    error_type = getattr(envelope, vector["error"])
    with pytest.raises(error_type) as caught:
        open_message(keys[vector["to"]], vector["packet"])
    assert type(caught.value) is error_type


def test_retrieval_proofs_verify_as_documented(keys):
    spec, hardened = VECTORS["retrieval_proofs"]
    assert spec["signed_text"] == envelope.PHRASE
    assert verify_retrieval_proof(spec["packet"]).id == keys[spec["identity"]].id
    now = parse_timestamp(hardened["server_time"])
    assert now.tzinfo == timezone.utc
    assert hardened["signed_text"] == f"{envelope.PHRASE}|{hardened['server_id']}|{hardened['packet']['timestamp']}"
    cache = ReplayCache()
    proven = verify_retrieval_proof(hardened["packet"], mode="hardened", server_id=hardened["server_id"],
                                    now=now, replay_cache=cache)
    assert proven.id == keys[hardened["identity"]].id
    with pytest.raises(envelope.ProofReplayed):
        verify_retrieval_proof(hardened["packet"], mode="hardened", server_id=hardened["server_id"],
                               now=now, replay_cache=cache)
