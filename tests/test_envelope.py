"""bubble_ref.envelope: sealing, opening, server-side checks, packet ids and retrieval proofs."""
from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bubble_ref import crypto, envelope, packets
from bubble_ref.crypto import BOX_SIZES, ContentTooLarge, pad_to_bucket, seal_box
from bubble_ref.envelope import (
    PHRASE, PROOF_WINDOW, SIGNATURE_BOX_SIZE, EnvelopeError, MalformedPacket, NotForRecipient, ProofExpired,
    ProofRejected, ProofReplayed, ReplayCache, SpoofedSender, TamperedPacket, check_packet, make_retrieval_proof,
    open_message, packet_id, seal, verify_retrieval_proof)
from bubble_ref.packets import ClientMessagePacket, EncryptedSignature, InnerMessage, RetrievalPacket

from conftest import EXAMPLE_UUID, FIXED_TIMESTAMP, OTHER_SERVER_ID, SERVER_ID, b64, flip_byte, replace_field, unb64


def assert_refused(excinfo, cls: type, phrase: str) -> EnvelopeError:
    err = excinfo.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert phrase in str(err), str(err)
    return err


def inner_json_bytes(sender_b64: str, content: str, message_uuid: str = EXAMPLE_UUID) -> bytes:
    return InnerMessage(sender=sender_b64, content=content, uuid=message_uuid,
                        timestamp=FIXED_TIMESTAMP).to_json().encode("utf-8")


def build_packet(recipient: crypto.Identity, signer: crypto.Identity, inner_plaintext: bytes,
                 signature_plaintext: bytes | None = None) -> ClientMessagePacket:
    "A client packet built by hand: `signer` signs the message box, whatever the inside claims."
    message_box = seal_box(recipient.public, pad_to_bucket(inner_plaintext))
    if signature_plaintext is None:
        signature_plaintext = EncryptedSignature(signature=b64(signer.sign(message_box))).to_json().encode()
    signature_box = seal_box(recipient.public, signature_plaintext)
    return ClientMessagePacket(recipient=recipient.public.b64, message=b64(message_box), signature=b64(signature_box))


# ---------------------------------------------------------- seal and open

@pytest.mark.parametrize("content", ["Hi Bob, it's Alice. Lunch at noon?", "", "héllo wörld — 日本語 👋 \u0000 \"q\" \\",
                                     "x" * 5000], ids=["ascii", "empty", "unicode", "5000-bytes"])
def test_seal_open_round_trip(alice, bob, fixed_clock, content):
    packet = seal(alice, bob.public.b64, content, clock=fixed_clock)
    opened = open_message(bob, packet)
    assert opened.content == content
    assert opened.sender == alice.public
    assert opened.sender_id == alice.id
    assert opened.timestamp == FIXED_TIMESTAMP
    assert uuid.UUID(opened.uuid).version == 4
    assert str(uuid.UUID(opened.uuid)) == opened.uuid


def test_sealed_packet_shape(alice, bob, fixed_clock):
    packet = seal(alice, bob.public, "hello", clock=fixed_clock)
    assert isinstance(packet, ClientMessagePacket)
    assert packet.recipient == bob.public.b64
    assert packet.validate() is packet
    assert len(unb64(packet.message)) == BOX_SIZES[0]
    assert len(unb64(packet.signature)) == SIGNATURE_BOX_SIZE == 644
    # nothing about the sender is visible to a server
    assert alice.public.b64 not in packet.to_json()


def test_open_accepts_every_packet_form(sealed_to_bob, bob):
    for form in (sealed_to_bob, sealed_to_bob.to_dict(), sealed_to_bob.to_json(),
                 sealed_to_bob.to_json().encode()):
        assert open_message(bob, form).content == "Hi Bob, it's Alice. Lunch at noon?"


def test_each_seal_gets_a_fresh_uuid_and_fresh_boxes(alice, bob, fixed_clock):
    first, second = (seal(alice, bob.public.b64, "same", clock=fixed_clock) for _ in range(2))
    assert first.message != second.message and first.signature != second.signature
    assert open_message(bob, first).uuid != open_message(bob, second).uuid


def test_message_uuid_and_pem_recipient(alice, bob, fixed_clock):
    packet = seal(alice, bob.public.pem, "hi", clock=fixed_clock, message_uuid=EXAMPLE_UUID)
    assert packet.recipient == bob.public.b64  # normalised to base64 DER
    assert open_message(bob, packet).uuid == EXAMPLE_UUID


def test_timestamp_comes_from_the_clock(alice, bob, fixed_time):
    later = fixed_time + timedelta(days=1, seconds=7, microseconds=999)
    opened = open_message(bob, seal(alice, bob.public.b64, "hi", clock=lambda: later))
    assert opened.timestamp == "2024-06-16T12:35:03Z"


@pytest.mark.parametrize("size, bucket", [(100, 1024), (1000, 2048), (3000, 4096), (40000, 65536)])
def test_message_box_uses_the_next_bucket(alice, bob, fixed_clock, size, bucket):
    packet = seal(alice, bob.public.b64, "x" * size, clock=fixed_clock)
    assert len(check_packet(packet).message_box) == bucket + crypto.BOX_OVERHEAD


@pytest.fixture(scope="module")
def max_content_bytes(alice) -> int:
    "The longest content (in UTF-8 bytes) whose inner JSON still fits the 64 KiB bucket."
    return crypto.BUCKETS[-1] - len(inner_json_bytes(alice.public.b64, ""))


def test_content_at_the_64_kib_limit(alice, bob, fixed_clock, max_content_bytes):
    assert 65000 < max_content_bytes < 65536
    content = "x" * max_content_bytes
    packet = seal(alice, bob.public.b64, content, clock=fixed_clock, message_uuid=EXAMPLE_UUID)
    checked = check_packet(packet)
    assert len(checked.message_box) == BOX_SIZES[-1]
    assert open_message(bob, packet).content == content


def test_unicode_content_near_the_limit(alice, bob, fixed_clock, max_content_bytes):
    content = "é" * (max_content_bytes // 2)  # two bytes each in UTF-8
    packet = seal(alice, bob.public.b64, content, clock=fixed_clock)
    assert open_message(bob, packet).content == content


@pytest.mark.parametrize("extra", [1, 1000])
def test_content_over_the_largest_bucket(alice, bob, fixed_clock, max_content_bytes, extra):
    with pytest.raises(ContentTooLarge) as excinfo:
        seal(alice, bob.public.b64, "x" * (max_content_bytes + extra), clock=fixed_clock, message_uuid=EXAMPLE_UUID)
    assert type(excinfo.value) is ContentTooLarge
    assert f"message is {65536 + extra} bytes after encoding" in str(excinfo.value)
    assert "64 KiB" in str(excinfo.value)


def test_seal_refuses_a_weak_recipient(alice, weak_rsa_1024):
    with pytest.raises(crypto.KeyRejected, match="recipient key is 1024 bits"):
        seal(alice, weak_rsa_1024.public_key(), "hi")


# -------------------------------------------------------- distinct errors

def test_error_classes_are_distinct():
    classes = [MalformedPacket, NotForRecipient, TamperedPacket, SpoofedSender, ProofRejected]
    for cls in classes:
        assert issubclass(cls, EnvelopeError) and issubclass(cls, ValueError)
        assert not any(issubclass(cls, other) for other in classes if other is not cls)
    assert issubclass(ProofExpired, ProofRejected) and issubclass(ProofReplayed, ProofRejected)


def test_not_for_recipient(sealed_to_bob, bob, mallory):
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(mallory, sealed_to_bob)
    assert_refused(excinfo, NotForRecipient, f"packet is addressed to key {bob.id[:16]}")
    assert mallory.id[:16] in str(excinfo.value)


@pytest.mark.parametrize("index, phrase", [(0, "message box: cannot unwrap"), (300, "message box: authentication tag"),
                                           (-1, "message box: authentication tag")],
                         ids=["wrapped-key", "ciphertext", "tag"])
def test_tampered_message_box(sealed_to_bob, bob, index, phrase):
    box = unb64(sealed_to_bob.message)
    tampered = replace_field(sealed_to_bob, message=b64(flip_byte(box, index)))
    check_packet(tampered)  # a server cannot tell
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, tampered)
    assert_refused(excinfo, TamperedPacket, phrase)


@pytest.mark.parametrize("index, phrase", [(10, "signature box: cannot unwrap"), (260, "signature box: authentication"),
                                           (400, "signature box: authentication")],
                         ids=["wrapped-key", "nonce", "ciphertext"])
def test_tampered_signature_box(sealed_to_bob, bob, index, phrase):
    box = unb64(sealed_to_bob.signature)
    tampered = replace_field(sealed_to_bob, signature=b64(flip_byte(box, index)))
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, tampered)
    assert_refused(excinfo, TamperedPacket, phrase)


def test_hand_built_packet_signed_by_the_claimed_sender_opens(alice, bob):
    # the control for the spoofing test below: the construction itself is sound
    packet = build_packet(bob, alice, inner_json_bytes(alice.public.b64, "really from Alice"))
    opened = open_message(bob, packet)
    assert (opened.sender_id, opened.content, opened.uuid) == (alice.id, "really from Alice", EXAMPLE_UUID)


def test_spoofed_sender(alice, bob, mallory):
    # Mallory writes Alice's key into the inner message, but can only sign with her own key
    packet = build_packet(bob, mallory, inner_json_bytes(alice.public.b64, "Alice here: pay Mallory"))
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, packet)
    assert_refused(excinfo, SpoofedSender, f"not made by the claimed sender {alice.id[:16]}")


def test_swapped_signature_boxes(alice, bob, fixed_clock):
    first = seal(alice, bob.public.b64, "first", clock=fixed_clock)
    second = seal(alice, bob.public.b64, "second", clock=fixed_clock)
    for target, donor in ((first, second), (second, first)):
        swapped = replace_field(target, signature=donor.signature)
        with pytest.raises(EnvelopeError) as excinfo:
            open_message(bob, swapped)
        assert_refused(excinfo, SpoofedSender, "the message may be forged")


def test_demo_forgery_mallory_signs_alices_message_box(sealed_to_bob, bob, mallory):
    message_box = unb64(sealed_to_bob.message)
    forged_signature = EncryptedSignature(signature=b64(mallory.sign(message_box))).to_json().encode()
    forged = replace_field(sealed_to_bob, signature=b64(seal_box(bob.public, forged_signature)))
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, forged)
    assert_refused(excinfo, SpoofedSender, "signature was not made by the claimed sender")


# -------------------------------------------------------- malformed packets

@pytest.mark.parametrize("text, phrase", [
    ("{not json", "client_message: /: invalid JSON"),
    ("[]", "client_message: /: expected object, got array"),
    ('{"recipient": "x"}', "client_message: /: missing field 'message'"),
    (b'{"recipient": "\xff"}', "not UTF-8 text"),
])
def test_malformed_packet_text(bob, text, phrase):
    for action in (lambda: check_packet(text), lambda: open_message(bob, text)):
        with pytest.raises(EnvelopeError) as excinfo:
            action()
        err = assert_refused(excinfo, MalformedPacket, phrase)
        assert type(err.__cause__) is packets.PacketError


def test_malformed_packet_object_and_dict(sealed_to_bob, bob):
    bad = replace_field(sealed_to_bob, message="QR==")
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, bad)
    assert_refused(excinfo, MalformedPacket, "client_message: /message: not valid base64")
    with pytest.raises(EnvelopeError) as excinfo:
        check_packet({**sealed_to_bob.to_dict(), "sender": "me"})
    assert_refused(excinfo, MalformedPacket, "unexpected field 'sender'")


def test_message_box_of_the_wrong_size(sealed_to_bob, bob):
    small = seal_box(bob.public, b"x" * 100)
    packet = replace_field(sealed_to_bob, message=b64(small))
    for action in (lambda: check_packet(packet), lambda: open_message(bob, packet)):
        with pytest.raises(EnvelopeError) as excinfo:
            action()
        assert_refused(excinfo, MalformedPacket, "client_message: /message: box is 384 bytes; a message box is one "
                                                 "of 1308, 2332, 4380, 8476, 16668, 33052, 65820 bytes")


@pytest.mark.parametrize("delta", [-1, 1, -300])
def test_signature_box_of_the_wrong_size(sealed_to_bob, bob, delta):
    length = SIGNATURE_BOX_SIZE - crypto.BOX_OVERHEAD + delta
    packet = replace_field(sealed_to_bob, signature=b64(seal_box(bob.public, b"x" * length)))
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, packet)
    assert_refused(excinfo, MalformedPacket, f"client_message: /signature: box is {SIGNATURE_BOX_SIZE + delta} "
                                             f"bytes; a signature box is {SIGNATURE_BOX_SIZE} bytes")


def test_recipient_with_a_1024_bit_key(sealed_to_bob, bob, weak_rsa_1024):
    weak = weak_rsa_1024.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    packet = replace_field(sealed_to_bob, recipient=b64(weak))
    packet.validate()  # the schema only sees base64; the key check is the envelope's
    for action in (lambda: check_packet(packet), lambda: open_message(bob, packet)):
        with pytest.raises(EnvelopeError) as excinfo:
            action()
        err = assert_refused(excinfo, MalformedPacket, "client_message: /recipient: recipient key is 1024 bits")
        assert type(err.__cause__) is crypto.KeyRejected


def test_recipient_that_is_not_a_key(sealed_to_bob):
    with pytest.raises(EnvelopeError) as excinfo:
        check_packet(replace_field(sealed_to_bob, recipient=b64(b"not a key")))
    assert_refused(excinfo, MalformedPacket, "client_message: /recipient: recipient key is not a public key")


def test_malformed_inner_message(alice, bob):
    packet = build_packet(bob, alice, b'{"hello": "world"}')
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, packet)
    assert_refused(excinfo, MalformedPacket, "inside the sealed message: inner_message: /: missing field 'sender'")


def test_inner_message_that_is_not_json(alice, bob):
    packet = build_packet(bob, alice, b"\x00\x01 binary")
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, packet)
    assert_refused(excinfo, MalformedPacket, "inside the sealed message: inner_message: /: invalid JSON")


def test_inner_sender_with_a_weak_key(alice, bob, weak_rsa_1024):
    weak = b64(weak_rsa_1024.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    packet = build_packet(bob, alice, inner_json_bytes(weak, "hi"))
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, packet)
    assert_refused(excinfo, MalformedPacket, "inside the sealed message: sender key is 1024 bits")


def test_malformed_signature_object(alice, bob):
    non_canonical = b64(bytes(256))[:-4] + "QR=="  # the right length, not canonical base64
    padded = json.dumps({"signature": non_canonical}, separators=(",", ":")).encode().ljust(SIGNATURE_BOX_SIZE - crypto.BOX_OVERHEAD)
    assert len(padded) == SIGNATURE_BOX_SIZE - crypto.BOX_OVERHEAD
    packet = build_packet(bob, alice, inner_json_bytes(alice.public.b64, "hi"), signature_plaintext=padded)
    with pytest.raises(EnvelopeError) as excinfo:
        open_message(bob, packet)
    assert_refused(excinfo, MalformedPacket, "inside the sealed message: encrypted_signature: /signature: "
                                             "not valid base64")


# ---------------------------------------------------- check_packet, packet_id

def test_check_packet_returns_the_decoded_boxes(sealed_to_bob, bob):
    for form in (sealed_to_bob, sealed_to_bob.to_dict(), sealed_to_bob.to_json(), sealed_to_bob.to_json().encode()):
        checked = check_packet(form)
        assert checked.packet == sealed_to_bob
        assert checked.recipient == bob.public
        assert checked.message_box == base64.b64decode(sealed_to_bob.message)
        assert checked.signature_box == base64.b64decode(sealed_to_bob.signature)
        assert len(checked.message_box) in BOX_SIZES
        assert len(checked.signature_box) == SIGNATURE_BOX_SIZE
        assert checked.id == packet_id(sealed_to_bob)


def test_packet_id_is_sha256_of_recipient_id_message_and_signature(sealed_to_bob, bob):
    expected = hashlib.sha256(
        f"{bob.id}.{sealed_to_bob.message}.{sealed_to_bob.signature}".encode("ascii")).hexdigest()
    assert packet_id(sealed_to_bob) == expected
    assert packet_id(sealed_to_bob) == packet_id(sealed_to_bob)  # stable
    assert packet_id(sealed_to_bob, bob.public) == expected
    assert packet_id(ClientMessagePacket.from_json(sealed_to_bob.to_json())) == expected


def test_packet_id_is_the_same_for_pem_and_base64_recipients(sealed_to_bob, bob):
    as_pem = replace_field(sealed_to_bob, recipient=bob.public.pem)
    assert as_pem.recipient != sealed_to_bob.recipient
    assert packet_id(as_pem) == packet_id(sealed_to_bob)
    checked = check_packet(as_pem)
    assert checked.recipient == bob.public and checked.id == packet_id(sealed_to_bob)
    assert open_message(bob, as_pem).content == "Hi Bob, it's Alice. Lunch at noon?"


def test_packet_id_changes_with_every_field(sealed_to_bob, alice, bob, mallory, fixed_clock):
    other = seal(alice, bob.public.b64, "Hi Bob, it's Alice. Lunch at noon?", clock=fixed_clock)
    ids = {
        packet_id(sealed_to_bob),
        packet_id(replace_field(sealed_to_bob, message=other.message)),
        packet_id(replace_field(sealed_to_bob, signature=other.signature)),
        packet_id(replace_field(sealed_to_bob, recipient=mallory.public.b64)),
        packet_id(other),
    }
    assert len(ids) == 5
    assert all(len(i) == 64 and int(i, 16) >= 0 for i in ids)


# ------------------------------------------------------------- open / all

def test_open_is_open_message_and_not_exported():
    import builtins
    assert envelope.open is envelope.open_message
    assert "open" not in envelope.__all__
    assert "open_message" in envelope.__all__
    namespace: dict = {}
    exec("from bubble_ref.envelope import *", namespace)
    assert "open" not in namespace and namespace["open_message"] is open_message
    assert builtins.open is not envelope.open


# -------------------------------------------------------- retrieval proofs

def test_proof_phrase():
    assert PHRASE == "I AM WHO I SAY I AM"
    assert envelope.proof_phrase() == b"I AM WHO I SAY I AM"
    assert envelope.proof_phrase(SERVER_ID, FIXED_TIMESTAMP) == f"I AM WHO I SAY I AM|{SERVER_ID}|{FIXED_TIMESTAMP}".encode()
    with pytest.raises(ValueError, match="needs both a server id and a timestamp"):
        envelope.proof_phrase(SERVER_ID)
    with pytest.raises(ValueError, match="needs both a server id and a timestamp"):
        envelope.proof_phrase(timestamp=FIXED_TIMESTAMP)


def test_spec_proof_verifies(bob):
    proof = make_retrieval_proof(bob)
    assert proof.timestamp is None
    assert proof.public_key == bob.public.b64
    assert bob.public.verify(unb64(proof.signature), PHRASE.encode())
    for form in (proof, proof.to_dict(), proof.to_json(), proof.to_json().encode()):
        assert verify_retrieval_proof(form) == bob.public
        assert verify_retrieval_proof(form, mode="spec") == bob.public


def test_spec_proof_can_be_replayed_forever(bob):
    # the seed protocol's weakness, documented: anyone who saw the proof once can use it again
    proof = make_retrieval_proof(bob).to_json()
    assert all(verify_retrieval_proof(proof) == bob.public for _ in range(3))


def test_spec_proof_signed_by_another_key(bob, mallory):
    forged = RetrievalPacket(public_key=bob.public.b64, signature=b64(mallory.sign(PHRASE.encode())))
    with pytest.raises(EnvelopeError) as excinfo:
        verify_retrieval_proof(forged)
    assert_refused(excinfo, ProofRejected, "signature is not this key's signature of the phrase 'I AM WHO I SAY I AM'")


@pytest.mark.parametrize("phrase", [b"I AM WHO I SAY I AM.", b"i am who i say i am", b""])
def test_spec_proof_over_a_different_phrase(bob, phrase):
    proof = RetrievalPacket(public_key=bob.public.b64, signature=b64(bob.sign(phrase)))
    with pytest.raises(EnvelopeError) as excinfo:
        verify_retrieval_proof(proof)
    assert_refused(excinfo, ProofRejected, "is not this key's signature")


@pytest.fixture
def hardened(fixed_time):
    "verify_retrieval_proof in hardened mode for SERVER_ID at the fixed time, with a fresh replay cache."
    cache = ReplayCache()

    def verify(proof, *, now=fixed_time, server_id=SERVER_ID):
        return verify_retrieval_proof(proof, mode="hardened", server_id=server_id, now=now, replay_cache=cache)
    verify.cache = cache
    return verify


def test_hardened_proof_accepted_once_then_replayed(bob, fixed_clock, hardened):
    proof = make_retrieval_proof(bob, server_id=SERVER_ID, clock=fixed_clock)
    assert proof.timestamp == FIXED_TIMESTAMP
    assert bob.public.verify(unb64(proof.signature), f"{PHRASE}|{SERVER_ID}|{FIXED_TIMESTAMP}".encode())
    assert hardened(proof) == bob.public
    assert len(hardened.cache) == 1
    with pytest.raises(EnvelopeError) as excinfo:
        hardened(proof.to_json())
    assert_refused(excinfo, ProofReplayed, "already used")
    # a second, fresh proof from the same key at the same time is fine
    assert hardened(make_retrieval_proof(bob, server_id=SERVER_ID, clock=fixed_clock)) == bob.public


def test_hardened_proof_for_another_server(bob, fixed_clock, hardened):
    proof = make_retrieval_proof(bob, server_id=OTHER_SERVER_ID, clock=fixed_clock)
    with pytest.raises(EnvelopeError) as excinfo:
        hardened(proof)
    assert_refused(excinfo, ProofRejected, "wrong server, wrong time, or wrong key")
    assert len(hardened.cache) == 0  # a refused proof is not remembered


def test_hardened_proof_with_an_altered_timestamp(bob, fixed_clock, hardened):
    proof = make_retrieval_proof(bob, server_id=SERVER_ID, clock=fixed_clock)
    redated = RetrievalPacket(public_key=proof.public_key, signature=proof.signature, timestamp="2024-06-15T12:35:00Z")
    with pytest.raises(EnvelopeError) as excinfo:
        hardened(redated)
    assert_refused(excinfo, ProofRejected, "wrong server, wrong time, or wrong key")


def test_hardened_proof_signed_by_another_key(bob, mallory, fixed_clock, hardened):
    mallorys = make_retrieval_proof(mallory, server_id=SERVER_ID, clock=fixed_clock)
    forged = RetrievalPacket(public_key=bob.public.b64, signature=mallorys.signature, timestamp=mallorys.timestamp)
    with pytest.raises(EnvelopeError) as excinfo:
        hardened(forged)
    assert_refused(excinfo, ProofRejected, "is not this key's signature")


@pytest.mark.parametrize("offset", [PROOF_WINDOW + timedelta(seconds=1), -(PROOF_WINDOW + timedelta(seconds=1)),
                                    timedelta(days=1), -timedelta(days=365)],
                         ids=["too-old", "too-far-ahead", "a-day-old", "a-year-ahead"])
def test_hardened_proof_outside_the_window(bob, fixed_time, hardened, offset):
    proof = make_retrieval_proof(bob, server_id=SERVER_ID, clock=lambda: fixed_time)
    with pytest.raises(EnvelopeError) as excinfo:
        hardened(proof, now=fixed_time + offset)
    err = assert_refused(excinfo, ProofExpired, f"proof made at {FIXED_TIMESTAMP} is outside the 120 s window")
    assert isinstance(err, ProofRejected)


@pytest.mark.parametrize("offset", [PROOF_WINDOW, -PROOF_WINDOW, timedelta(0)], ids=["oldest", "newest", "now"])
def test_hardened_proof_at_the_edges_of_the_window(bob, fixed_time, hardened, offset):
    proof = make_retrieval_proof(bob, server_id=SERVER_ID, clock=lambda: fixed_time)
    assert hardened(proof, now=fixed_time + offset) == bob.public


def test_hardened_mode_needs_a_timestamp(bob, hardened):
    with pytest.raises(EnvelopeError) as excinfo:
        hardened(make_retrieval_proof(bob))  # a spec-mode proof
    assert_refused(excinfo, ProofRejected, "hardened mode: the proof needs a timestamp")


def test_hardened_proof_is_not_a_spec_proof(bob, fixed_clock):
    with pytest.raises(EnvelopeError) as excinfo:
        verify_retrieval_proof(make_retrieval_proof(bob, server_id=SERVER_ID, clock=fixed_clock), mode="spec")
    assert_refused(excinfo, ProofRejected, "phrase 'I AM WHO I SAY I AM'")


def test_hardened_mode_needs_its_arguments(bob, fixed_time, fixed_clock):
    proof = make_retrieval_proof(bob, server_id=SERVER_ID, clock=fixed_clock)
    with pytest.raises(ValueError, match="hardened mode needs server_id, now and replay_cache"):
        verify_retrieval_proof(proof, mode="hardened", server_id=SERVER_ID, now=fixed_time)
    with pytest.raises(ValueError, match="mode must be one of"):
        verify_retrieval_proof(proof, mode="lenient")


@pytest.mark.parametrize("packet, phrase", [
    ("{not json", "retrieval: /: invalid JSON"),
    ({"public_key": "x"}, "retrieval: /: missing field 'signature'"),
    ({"public_key": "hello world", "signature": b64(bytes(256))}, "retrieval: /public_key: not a public key"),
    ('{"signature": "QQ==", "signature": "QQ=="}', "duplicate key 'signature'"),
])
def test_malformed_retrieval_packet(packet, phrase):
    with pytest.raises(EnvelopeError) as excinfo:
        verify_retrieval_proof(packet)
    err = assert_refused(excinfo, MalformedPacket, phrase)
    assert type(err.__cause__) is packets.PacketError


def test_retrieval_packet_with_an_unusable_key(bob, weak_rsa_1024):
    signature = b64(bob.sign(PHRASE.encode()))
    ec_der = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    weak_der = weak_rsa_1024.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    for der, phrase in ((weak_der, "public_key is 1024 bits"), (ec_der, "public_key is an EC key")):
        with pytest.raises(EnvelopeError) as excinfo:
            verify_retrieval_proof({"public_key": b64(der), "signature": signature})
        err = assert_refused(excinfo, MalformedPacket, phrase)
        assert type(err.__cause__) is crypto.KeyRejected


# ------------------------------------------------------------ ReplayCache

def test_replay_cache_forgets_after_the_window(fixed_time):
    cache = ReplayCache(window=timedelta(minutes=2))
    t = fixed_time
    cache.remember(b"first", t, now=t)
    cache.remember(b"second", t + timedelta(minutes=1), now=t + timedelta(minutes=1))
    assert len(cache) == 2
    with pytest.raises(ProofReplayed):
        cache.remember(b"first", t, now=t + timedelta(minutes=2))  # the last moment it is remembered
    cache.remember(b"third", t, now=t + timedelta(minutes=2, seconds=1))  # "first" has expired now
    assert len(cache) == 2
    cache.remember(b"first", t + timedelta(minutes=2, seconds=1), now=t + timedelta(minutes=2, seconds=1))
    with pytest.raises(ProofReplayed) as excinfo:
        cache.remember(b"second", t + timedelta(minutes=1), now=t + timedelta(minutes=3))
    assert type(excinfo.value) is ProofReplayed
    cache.remember(b"other", t, now=t + timedelta(hours=1))  # everything before has expired
    assert len(cache) == 1


def test_replay_cache_refuses_when_full(fixed_time):
    cache = ReplayCache(window=timedelta(minutes=2), max_entries=2)
    t = fixed_time
    cache.remember(b"a", t, now=t)
    cache.remember(b"b", t, now=t)
    with pytest.raises(EnvelopeError) as excinfo:
        cache.remember(b"c", t, now=t + timedelta(seconds=30))
    assert_refused(excinfo, ProofRejected, "too many recent retrieval proofs")
    assert len(cache) == 2
    with pytest.raises(ProofReplayed):  # a replay is still reported as a replay
        cache.remember(b"a", t, now=t + timedelta(seconds=30))
    cache.remember(b"c", t + timedelta(minutes=3), now=t + timedelta(minutes=3))  # a and b have expired
    assert len(cache) == 1


def test_full_replay_cache_refuses_new_proofs(bob, fixed_time, fixed_clock):
    cache = ReplayCache(max_entries=1)
    kwargs = dict(mode="hardened", server_id=SERVER_ID, now=fixed_time, replay_cache=cache)
    assert verify_retrieval_proof(make_retrieval_proof(bob, server_id=SERVER_ID, clock=fixed_clock), **kwargs)
    with pytest.raises(EnvelopeError) as excinfo:
        verify_retrieval_proof(make_retrieval_proof(bob, server_id=SERVER_ID, clock=fixed_clock), **kwargs)
    assert_refused(excinfo, ProofRejected, "too many recent retrieval proofs")
