"""Write the test vectors in this folder: two fixed key pairs and packets sealed with them.

Run it only to make new vectors (every run gives new random boxes, so the committed
files change): `python tests/vectors/generate_vectors.py`. Existing keys are reused.
The vectors are what PROTOCOL.md points to; `tests/test_vectors.py` opens them.
"""
import base64
import json
from datetime import datetime, timezone
from pathlib import Path

from bubble_ref.crypto import Identity, pad_to_bucket, seal_box
from bubble_ref.envelope import PHRASE, check_packet, make_retrieval_proof, packet_id, proof_phrase, seal
from bubble_ref.packets import ClientMessagePacket, EncryptedSignature, InnerMessage

HERE = Path(__file__).parent


def identity(name: str) -> Identity:
    path = HERE / f"{name}.pem"
    if not path.exists():
        Identity.generate().save(path)
    return Identity.load(path)


def main() -> None:
    alice, bob, mallory = identity("alice"), identity("bob"), identity("mallory")
    at = lambda *t: (lambda: datetime(*t, tzinfo=timezone.utc))
    keys = {name: {"private_key_file": f"{name}.pem", "public_key": who.public.b64, "id": who.id}
            for name, who in [("alice", alice), ("bob", bob), ("mallory", mallory)]}

    sealed = []
    for name, content, uuid, clock in [
        ("hello", "Hello, this is a test message!", "123e4567-e89b-42d3-a456-426614174000", at(2024, 6, 15, 12, 34, 56)),
        ("unicode", "Grüße aus Köln — 日本語 — 🫧", "9b2f4c3e-8d1a-4f6b-9c7e-2a5d8e1f3b40", at(2024, 6, 15, 12, 35, 0)),
        ("empty", "", "0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", at(2024, 6, 15, 12, 36, 0)),
        ("two-kib-bucket", "x" * 1500, "4c1d2e3f-a5b6-4c7d-8e9f-0a1b2c3d4e5f", at(2024, 6, 15, 12, 37, 0)),
    ]:
        packet = seal(alice, bob.public.b64, content, clock=clock, message_uuid=uuid)
        checked = check_packet(packet)
        sealed.append({
            "name": name, "from": "alice", "to": "bob", "packet": packet.to_dict(), "packet_id": packet_id(packet),
            "message_box_bytes": len(checked.message_box), "signature_box_bytes": len(checked.signature_box),
            "expected": {"sender": alice.public.b64, "sender_id": alice.id, "content": content, "uuid": uuid,
                         "timestamp": clock().strftime("%Y-%m-%dT%H:%M:%SZ")}})

    good = seal(alice, bob.public.b64, "Meet at the station.", clock=at(2024, 6, 15, 13, 0, 0))
    box = bytearray(base64.b64decode(good.message))
    box[300] ^= 0x01
    inner = InnerMessage(sender=alice.public.b64, content="Send Mallory the password.",
                         uuid="5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a", timestamp="2024-06-15T13:01:00Z")
    spoof_box = seal_box(bob.public, pad_to_bucket(inner.to_json().encode()))
    spoof_sig = EncryptedSignature(signature=base64.b64encode(mallory.sign(spoof_box)).decode())
    rejected = [
        {"name": "tampered-message-box", "to": "bob", "error": "TamperedPacket",
         "packet": ClientMessagePacket(good.recipient, base64.b64encode(bytes(box)).decode(), good.signature).to_dict()},
        {"name": "spoofed-sender", "to": "bob", "error": "SpoofedSender",
         "packet": ClientMessagePacket(bob.public.b64, base64.b64encode(spoof_box).decode(),
                                       base64.b64encode(seal_box(bob.public, spoof_sig.to_json().encode())).decode()).to_dict()},
        {"name": "not-for-this-recipient", "to": "mallory", "error": "NotForRecipient", "packet": good.to_dict()},
    ]

    server_id = "5e" * 32
    proofs = [
        {"mode": "spec", "identity": "bob", "signed_text": PHRASE, "packet": make_retrieval_proof(bob).to_dict()},
        {"mode": "hardened", "identity": "bob", "server_id": server_id, "server_time": "2024-06-15T12:00:30Z",
         "signed_text": proof_phrase(server_id, "2024-06-15T12:00:00Z").decode(),
         "packet": make_retrieval_proof(bob, server_id=server_id, clock=at(2024, 6, 15, 12, 0, 0)).to_dict()},
    ]
    vectors = {"description": "Purple Bubble test vectors (bubble_ref). Keys are in the PEM files beside this one; "
                              "see PROTOCOL.md for the format.",
               "keys": keys, "sealed_messages": sealed, "rejected_packets": rejected, "retrieval_proofs": proofs}
    (HERE / "vectors.json").write_text(json.dumps(vectors, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
