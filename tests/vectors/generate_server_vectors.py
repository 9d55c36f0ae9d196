"""Write server_vectors.json: one test vector for every signed server object (PROTOCOL.md §15.1).

Three fixed server keys (server_a.pem, server_b.pem, server_c.pem, made on the first run and then kept) sign a
relay, sync requests, a sync fetch, a server list, a misbehaviour report, a vote request and votes; a quorum decision carries
the votes. Each vector gives the object as sent, the fields its signature covers, the exact RFC 8785 bytes (hex,
and as text for reading) and the signature. RSA-PSS is randomised, so a signature is a verify-only value: running
this again keeps every signature whose bytes did not change, so the file changes only when the objects do.

    python tests/vectors/generate_server_vectors.py

`tests/test_server_vectors.py` checks the file against bubble_ref in both directions; `tests/test_spec_verifier.py`
checks it with a verifier that uses only `cryptography` and `rfc8785`.
"""
from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path

from bubble_ref.audit import sign_report
from bubble_ref.crypto import Identity
from bubble_ref.mesh import canonical_bytes, sign_body, sign_relay
from bubble_ref.packets import (
    QuorumDecision, ServerListResponse, SyncFetch, SyncRequest, Vote, VoteRequest, parse_timestamp)

HERE = Path(__file__).parent
OUT = HERE / "server_vectors.json"
SERVERS = ("server_a", "server_b", "server_c")
URLS = {"server_a": "http://127.0.0.1:8001", "server_b": "http://127.0.0.1:8002",
        "server_c": "http://bücher.example:8003/bubble"}  # non-ASCII on purpose: JCS writes it as raw UTF-8


def identity(name: str) -> Identity:
    path = HERE / f"{name}.pem"
    if not path.exists():
        Identity.generate().save(path)
    return Identity.load(path)


def at(text: str) -> datetime:
    return parse_timestamp(text)


def unsigned_objects(keys: dict[str, Identity], hello: dict) -> list[dict]:
    """Every vector without its signatures: name, kind, schema, signer, the object (signature left out), and the
    time at which a receiver checks it. Built with bubble_ref's own classes, so the test can rebuild them."""
    a, b, c = (keys[n] for n in SERVERS)
    relay = sign_relay(a, hello["packet"], hello["packet_id"], at("2024-06-22T12:35:00Z"), 1, at("2024-06-15T12:35:00Z"))
    evidence = json.dumps({"kind": "audit_failed", "packet_id": hello["packet_id"], "result": "audit_failed",
                           "deadline": "2024-06-15T12:40:02Z"}, separators=(",", ":")).encode()
    report = sign_report(a, c.id, evidence, at("2024-06-15T12:40:30Z"))
    listed = [{"server_id": k.id, "url": URLS[n], "public_key": k.public.b64} for n, k in
              [("server_b", b), ("server_a", a), ("server_c", c)]]
    server_list = ServerListResponse(known_servers=tuple(e["server_id"] for e in listed), timestamp="2024-06-15T12:36:00Z",
                                     servers=tuple(listed), responder_id=b.id).to_dict()
    drop = lambda body: {k: v for k, v in body.items() if k != "signature"}
    return [
        {"name": "relay", "schema": "relay", "endpoint": "POST /relay", "signer": "server_a", "check_at": "2024-06-15T12:35:01Z",
         "object": drop(relay)},
        {"name": "sync-request-first", "schema": "sync_request", "endpoint": "POST /sync", "signer": "server_a",
         "check_at": "2024-06-15T12:35:11Z",
         "object": SyncRequest(since="", sender_id=a.id, sent_at="2024-06-15T12:35:10Z").to_dict()},
        {"name": "sync-request-cursor", "schema": "sync_request", "endpoint": "POST /sync", "signer": "server_a",
         "check_at": "2024-06-15T12:35:21Z",
         "object": SyncRequest(since="42", sender_id=a.id, sent_at="2024-06-15T12:35:20Z").to_dict()},
        {"name": "sync-fetch", "schema": "sync_fetch", "endpoint": "POST /sync/fetch (1.2)", "signer": "server_a",
         "check_at": "2024-06-15T12:35:31Z",
         "object": SyncFetch(ids=(hello["packet_id"],), sender_id=a.id, sent_at="2024-06-15T12:35:30Z").to_dict()},
        {"name": "server-list", "schema": "server_list_response", "endpoint": "answer to POST /servers",
         "signer": "server_b", "check_at": "2024-06-15T12:36:00Z", "object": server_list},
        {"name": "report", "schema": "misbehavior_report", "endpoint": "POST /reports", "signer": "server_a",
         "check_at": "2024-06-15T12:40:31Z", "object": drop(report)},
        {"name": "vote-request", "schema": "vote_request", "endpoint": "POST /votes", "signer": "server_a",
         "check_at": "2024-06-15T12:41:01Z",
         "object": VoteRequest(reported_server_id=c.id, proposal="blacklisted", sender_id=a.id,
                               sent_at="2024-06-15T12:41:00Z").to_dict()},
        {"name": "vote-a", "schema": "vote", "endpoint": "part of a decision (the caller's own vote)", "signer": "server_a",
         "check_at": "2024-06-15T12:41:00Z",
         "object": Vote(voter_id=a.id, reported_server_id=c.id, vote="blacklist", timestamp="2024-06-15T12:41:00Z").to_dict()},
        {"name": "vote-b", "schema": "vote", "endpoint": "answer to POST /votes", "signer": "server_b",
         "check_at": "2024-06-15T12:41:01Z",
         "object": Vote(voter_id=b.id, reported_server_id=c.id, vote="blacklist", timestamp="2024-06-15T12:41:01Z").to_dict()},
    ]


def vector(entry: dict, keys: dict[str, Identity], old: dict) -> dict:
    "The vector for one object: canonical bytes, and a signature (the old one if the bytes did not change)."
    signer = keys[entry["signer"]]
    canonical = canonical_bytes(entry["object"])
    previous = old.get(entry["name"])
    if previous is not None and previous["canonical_hex"] == canonical.hex() and previous["signer_id"] == signer.id:
        signed = {**entry["object"], "signature": previous["object"]["signature"]}
    else:
        signed = sign_body(signer, entry["object"])
    return {"name": entry["name"], "schema": entry["schema"], "endpoint": entry["endpoint"], "signer": entry["signer"],
            "signer_id": signer.id, "check_at": entry["check_at"], "object": signed,
            "signed_fields": sorted(entry["object"]), "canonical_hex": canonical.hex(),
            "canonical_text": canonical.decode("utf-8")}


def main() -> None:
    keys = {name: identity(name) for name in SERVERS}
    hello = next(v for v in json.loads((HERE / "vectors.json").read_text("utf-8"))["sealed_messages"] if v["name"] == "hello")
    old, old_mistake = {}, []
    if OUT.exists():
        previous = json.loads(OUT.read_text("utf-8"))
        old = {v["name"]: v for v in previous["signed"]}
        old_mistake = previous.get("must_not_verify", [])
    vectors = [vector(entry, keys, old) for entry in unsigned_objects(keys, hello)]
    by_name = {v["name"]: v for v in vectors}
    decision = QuorumDecision(reported_server_id=keys["server_c"].id,
                              votes={by_name[n]["object"]["voter_id"]: "blacklist" for n in ("vote-a", "vote-b")},
                              final_decision="blacklisted", timestamp="2024-06-15T12:41:02Z",
                              signed_votes=tuple(by_name[n]["object"] for n in ("vote-a", "vote-b"))).to_dict()

    # A common mistake, kept as a vector that must NOT verify: the server list signed over bytes with the non-ASCII
    # URL escaped (json.dumps's default ensure_ascii=True). RFC 8785 writes it as raw UTF-8, so these bytes differ.
    listed = by_name["server-list"]
    unsigned = {k: v for k, v in listed["object"].items() if k != "signature"}
    escaped = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("ascii")
    kept = next((m for m in old_mistake if m["signed_hex"] == escaped.hex()), None)
    wrong_signature = kept["object"]["signature"] if kept else \
        base64.b64encode(keys["server_b"].sign(escaped)).decode("ascii")
    mistakes = [{"name": "server-list-non-ascii-escaped", "signer": "server_b", "signer_id": keys["server_b"].id,
                 "why": "signed over json.dumps(sort_keys=True) with ensure_ascii=True: \\u00fc instead of raw UTF-8 "
                        "ü; the canonical bytes (RFC 8785) are those of the vector server-list",
                 "signed_hex": escaped.hex(), "object": {**unsigned, "signature": wrong_signature}}]

    document = {
        "description": "Purple Bubble server-object vectors (bubble_ref; PROTOCOL.md §15.1). Every signed server "
                       "object: its signature is RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) by `signer` over "
                       "`canonical_hex`, the RFC 8785 (JCS) serialisation of the object without its top-level "
                       "`signature`. PSS is randomised: check the signatures, do not reproduce them.",
        "keys": {name: {"private_key_file": f"{name}.pem", "public_key": k.public.b64, "id": k.id, "url": URLS[name]}
                 for name, k in keys.items()},
        "signed": vectors,
        "decision": {"name": "decision", "schema": "quorum_decision", "endpoint": "POST /decisions",
                     "check_at": "2024-06-15T12:41:30Z", "object": decision,
                     "note": "A quorum decision has no signature of its own: each entry of signed_votes is a signed "
                             "vote (vectors vote-a and vote-b), and `votes` must equal them."},
        "unsigned": [{"name": "sync-answer", "schema": "sync_page", "endpoint": "answer to POST /sync",
                      "note": "Not signed: every packet in it is checked like a relayed one (§8 step 1, id, expiry).",
                      "object": {"packets": [{"packet_id": hello["packet_id"], "expires_at": "2024-06-22T12:34:56Z",
                                              "packet": hello["packet"]}], "next_cursor": "43", "more": False}}],
        "must_not_verify": mistakes,
    }
    OUT.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
