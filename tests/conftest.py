"""Shared fixtures for the bubble_ref unit tests.

RSA-2048 identities are generated once per session (`alice`, `bob`, `mallory`);
everything time-dependent runs on `fixed_clock`, never on the wall clock.
"""
from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone

import pytest

from bubble_ref import crypto, envelope, packets

FIXED_TIME = datetime(2024, 6, 15, 12, 34, 56, tzinfo=timezone.utc)
FIXED_TIMESTAMP = "2024-06-15T12:34:56Z"
# A well-formed version-4 UUID written out by hand (not a random value).
EXAMPLE_UUID = "123e4567-e89b-42d3-a456-426614174000"
# Server ids are hex SHA-256 strings; derive them from fixed labels.
SERVER_ID = hashlib.sha256(b"rx-server-1").hexdigest()
OTHER_SERVER_ID = hashlib.sha256(b"rx-server-2").hexdigest()


# ---------------------------------------------------------------- identities

@pytest.fixture(scope="session")
def alice() -> crypto.Identity:
    return crypto.Identity.generate()


@pytest.fixture(scope="session")
def bob() -> crypto.Identity:
    return crypto.Identity.generate()


@pytest.fixture(scope="session")
def mallory() -> crypto.Identity:
    return crypto.Identity.generate()


# --------------------------------------------------------------------- clock

@pytest.fixture(scope="session")
def fixed_time() -> datetime:
    return FIXED_TIME


@pytest.fixture(scope="session")
def fixed_clock():
    "A Clock (callable returning an aware UTC datetime) frozen at FIXED_TIME."
    return lambda: FIXED_TIME


# ------------------------------------------------------------------- real nodes

@pytest.fixture
def launcher(tmp_path):
    "Starts real nodes as subprocesses (tests/nodes.py) under tmp_path; stops every one when the test ends."
    from nodes import Launcher  # the tests' helper module, importable as in every test module (tests/ on sys.path)
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.stop_all()


# ------------------------------------------------------------------- helpers

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def flip_byte(data: bytes, index: int) -> bytes:
    "`data` with every bit of the byte at `index` inverted."
    changed = bytearray(data)
    changed[index] ^= 0xFF
    return bytes(changed)


def replace_field(packet: packets.ClientMessagePacket, **changes) -> packets.ClientMessagePacket:
    return packets.ClientMessagePacket(**{**packet.to_dict(), **changes})


def build_example_packets(alice: crypto.Identity, bob: crypto.Identity, clock) -> dict[type, packets.Packet]:
    "One valid instance of every class in PACKET_TYPES."
    sealed = envelope.seal(alice, bob.public.b64, "example content", clock=clock, message_uuid=EXAMPLE_UUID)
    signed_content = packets.SignedContent(content="signed hello", timestamp=FIXED_TIMESTAMP)
    signed_bytes = json.dumps({"content": signed_content.content, "timestamp": signed_content.timestamp}).encode()
    examples = [
        sealed,
        packets.InnerMessage(sender=alice.public.b64, content="héllo ✓", uuid=EXAMPLE_UUID,
                             timestamp=FIXED_TIMESTAMP),
        packets.EncryptedSignature(signature=b64(alice.sign(b"message box bytes"))),
        envelope.make_retrieval_proof(bob, server_id=SERVER_ID, clock=clock),
        packets.MisbehaviorReport(  # with the optional signed extension, so every field is exercised
            reporter_id=alice.id, reported_server_id=SERVER_ID, timestamp=FIXED_TIMESTAMP,
            evidence=b64(b"evidence: a server dropped my packet"), public_key=alice.public.b64,
            signature=b64(alice.sign(b"the canonical bytes of the report"))),
        packets.QuorumDecision(reported_server_id=SERVER_ID,
                               votes={alice.id: "blacklist", bob.id: "abstain", OTHER_SERVER_ID: "whitelist"},
                               final_decision="blacklisted", timestamp=FIXED_TIMESTAMP,
                               signed_votes=tuple({"type": "vote", "voter_id": voter, "reported_server_id": SERVER_ID,
                                                   "vote": value, "timestamp": FIXED_TIMESTAMP,
                                                   "signature": b64(alice.sign(voter.encode()))}
                                                  for voter, value in ((alice.id, "blacklist"), (bob.id, "abstain"),
                                                                       (OTHER_SERVER_ID, "whitelist")))),
        packets.ServerListRequest(requester_id=alice.id, timestamp=FIXED_TIMESTAMP),
        packets.ServerListResponse(  # with the optional signed extension, so every field is exercised
            known_servers=(alice.id, bob.id), timestamp=FIXED_TIMESTAMP,
            servers=({"server_id": alice.id, "url": "http://127.0.0.1:8000", "public_key": alice.public.b64},
                     {"server_id": bob.id, "url": "http://127.0.0.1:8001", "public_key": bob.public.b64}),
            responder_id=alice.id, signature=b64(alice.sign(b"the canonical bytes of the list"))),
        packets.SignedMessage(message=signed_content, signature=b64(alice.sign(signed_bytes)),
                              public_key=alice.public.b64),
    ]
    by_class = {type(p): p for p in examples}
    assert set(by_class) == set(packets.PACKET_TYPES), "every packet class needs an example"
    return by_class


@pytest.fixture(scope="session")
def example_packets(alice, bob, fixed_clock) -> dict[type, packets.Packet]:
    return build_example_packets(alice, bob, fixed_clock)


@pytest.fixture(scope="session")
def sealed_to_bob(alice, bob, fixed_clock) -> packets.ClientMessagePacket:
    "A message from Alice to Bob, sealed once per session."
    return envelope.seal(alice, bob.public.b64, "Hi Bob, it's Alice. Lunch at noon?", clock=fixed_clock)


@pytest.fixture(scope="session")
def weak_rsa_1024():
    "A 1024-bit RSA private key (refused everywhere)."
    from cryptography.hazmat.primitives.asymmetric import rsa
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)
