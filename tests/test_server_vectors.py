"""The server-object vectors (tests/vectors/server_vectors.json, PROTOCOL.md §15.1) against bubble_ref, both ways.

Vectors to code: bubble_ref computes the published canonical bytes, verifies every published signature, and a node
accepts every published object at its `check_at` time. Code to vectors: bubble_ref builds the very same unsigned
objects from the same inputs, and what it signs verifies (the tiny verifier in test_spec_verifier.py then checks
the file without bubble_ref).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import random
from pathlib import Path

import pytest

from bubble_ref.ballot import open_monitored_node
from bubble_ref.crypto import Identity
from bubble_ref.mesh import Server, canonical_bytes, sign_body, verify_body, verify_server_list
from bubble_ref.node import Request
from bubble_ref.packets import (
    MisbehaviorReport, QuorumDecision, Relay, ServerListResponse, SyncFetch, SyncRequest, Vote, VoteRequest, parse_timestamp,
    validate_dict)
from bubble_ref.store import ManualClock

HERE = Path(__file__).parent / "vectors"
VECTORS = json.loads((HERE / "server_vectors.json").read_text("utf-8"))
SIGNED = {v["name"]: v for v in VECTORS["signed"]}
PACKETS = {"relay": Relay, "sync_request": SyncRequest, "sync_fetch": SyncFetch,
           "server_list_response": ServerListResponse,
           "misbehavior_report": MisbehaviorReport, "vote_request": VoteRequest, "vote": Vote}


@pytest.fixture(scope="module")
def keys() -> dict[str, Identity]:
    return {name: Identity.load(HERE / entry["private_key_file"]) for name, entry in VECTORS["keys"].items()}


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("generate_server_vectors", HERE / "generate_server_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_signed_server_object_has_a_vector():
    "The seven kinds the text lists (relay, sync request, server list, report, vote request, vote; decision)."
    assert {v["schema"] for v in VECTORS["signed"]} == set(PACKETS)
    assert VECTORS["decision"]["object"]["signed_votes"] and VECTORS["unsigned"][0]["schema"] == "sync_page"


def test_key_files_match_the_published_keys(keys):
    for name, entry in VECTORS["keys"].items():
        assert keys[name].public.b64 == entry["public_key"] and keys[name].id == entry["id"]


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_vector_to_code_bytes_signature_schema(name, keys):
    vector = SIGNED[name]
    obj = vector["object"]
    assert canonical_bytes(obj).hex() == vector["canonical_hex"]
    assert verify_body(keys[vector["signer"]].public, obj)
    assert not verify_body(keys["server_c" if vector["signer"] != "server_c" else "server_a"].public, obj)
    PACKETS[vector["schema"]].from_dict(obj)  # the published object is a valid packet of its schema


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_code_to_vector_same_objects_and_signatures_that_verify(name, keys, generator):
    hello = next(v for v in json.loads((HERE / "vectors.json").read_text("utf-8"))["sealed_messages"]
                 if v["name"] == "hello")
    rebuilt = {e["name"]: e for e in generator.unsigned_objects(keys, hello)}[name]
    vector = SIGNED[name]
    assert rebuilt["object"] == {k: v for k, v in vector["object"].items() if k != "signature"}
    assert canonical_bytes(rebuilt["object"]).hex() == vector["canonical_hex"]
    fresh = sign_body(keys[vector["signer"]], rebuilt["object"])
    assert fresh["signature"] != vector["object"]["signature"], "RSA-PSS is randomised: verify, never compare"
    assert verify_body(keys[vector["signer"]].public, fresh)


def test_the_decision_is_what_bubble_ref_builds(keys):
    decision = VECTORS["decision"]["object"]
    votes = [SIGNED["vote-a"]["object"], SIGNED["vote-b"]["object"]]
    assert QuorumDecision(reported_server_id=keys["server_c"].id, votes={v["voter_id"]: v["vote"] for v in votes},
                          final_decision="blacklisted", timestamp=decision["timestamp"],
                          signed_votes=tuple(votes)).to_dict() == decision
    validate_dict("quorum_decision", decision)


def test_the_mistake_does_not_verify_with_bubble_ref(keys):
    mistake = VECTORS["must_not_verify"][0]
    assert not verify_body(keys[mistake["signer"]].public, mistake["object"])
    assert keys[mistake["signer"]].public.verify(base64.b64decode(mistake["object"]["signature"]),
                                                 bytes.fromhex(mistake["signed_hex"]))


def test_the_signed_server_list_passes_verify_server_list(keys):
    listed = SIGNED["server-list"]["object"]
    entries = verify_server_list(listed, responder_key=keys["server_b"].public)
    assert [e.url for e in entries] == [VECTORS["keys"][n]["url"] for n in ("server_b", "server_a", "server_c")]


@pytest.fixture
def node_b(tmp_path, keys):
    "Server B's node (its key from the vectors), with server A as a pinned peer, on a manual clock."
    clock = ManualClock(parse_timestamp("2024-06-15T12:35:00Z"))
    node = open_monitored_node(tmp_path / "b", clock=clock, rng=random.Random(0), new_identity=lambda: keys["server_b"])
    peers = node.roles["peers"]
    peers.urls = (VECTORS["keys"]["server_a"]["url"],)
    peers.learn_peer(VECTORS["keys"]["server_a"]["url"], {"server_id": keys["server_a"].id,
                                                          "public_key": keys["server_a"].public.b64})
    server_c = keys["server_c"]  # reports are taken only about servers a node knows: A's list named C
    peers.remember(Server(server_c.id, VECTORS["keys"]["server_c"]["url"], server_c.public), listed_by=keys["server_a"].id)
    yield node, clock
    node.close()


def at(clock, text: str) -> None:
    target = parse_timestamp(text)
    clock.advance(target - clock())


def test_a_node_accepts_every_published_request(node_b):
    "Vectors to code, end to end: server B's node takes A's relay, sync requests, report and vote request."
    node, clock = node_b
    assert node.id == VECTORS["keys"]["server_b"]["id"]
    expected = {"relay": ("POST /relay", 202), "sync-request-first": ("POST /sync", 200),
                "sync-request-cursor": ("POST /sync", 200), "sync-fetch": ("POST /sync/fetch", 200),
                "report": ("POST /reports", 202),
                "vote-request": ("POST /votes", 200)}
    replies = {}
    for name, (route, status) in expected.items():
        vector = SIGNED[name]
        at(clock, vector["check_at"])
        reply = replies[name] = node.on_request(Request(route, json.dumps(vector["object"]).encode()))
        assert reply.status == status, (name, reply.body)
    assert node.mailbox.contains(SIGNED["relay"]["object"]["packet_id"])
    fetched = replies["sync-fetch"].body["packets"]  # the relayed packet, fetched back by id
    assert [p["packet_id"] for p in fetched] == SIGNED["sync-fetch"]["object"]["ids"]
    vote = reply.body  # B's own signed vote, as a vote request's answer
    assert verify_body(node.identity.public, vote) and vote["voter_id"] == node.id


def test_a_node_applies_the_published_decision(node_b):
    node, clock = node_b
    at(clock, VECTORS["decision"]["check_at"])
    peers, c_id = node.roles["peers"], VECTORS["keys"]["server_c"]["id"]
    peers.remember(peers.directory()[c_id], listed_by=None, verified=True)  # B has reached C: a blacklist of a
    # server known only by name is not applied (PROTOCOL.md §18, Applying a decision)
    reply = node.on_request(Request("POST /decisions", json.dumps(VECTORS["decision"]["object"]).encode()))
    assert reply.status == 200 and reply.body == {"reported_server_id": VECTORS["keys"]["server_c"]["id"],
                                                  "final_decision": "blacklisted", "applied": True}


def test_a_stale_or_tampered_relay_is_refused(node_b):
    node, clock = node_b
    relay = SIGNED["relay"]["object"]
    at(clock, "2024-06-15T12:41:00Z")  # six minutes after it was signed
    reply = node.on_request(Request("POST /relay", json.dumps(relay).encode()))
    assert (reply.status, reply.body["error"]) == (403, "stale_request")
    at(clock, SIGNED["relay"]["check_at"])
    reply = node.on_request(Request("POST /relay", json.dumps({**relay, "hops": 2}).encode()))
    assert (reply.status, reply.body["error"]) == (403, "bad_signature")


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_rfc8785_bytes_equal_what_protocol_1_0_signed(name):
    "§15.1: for every valid object, JCS and 1.0's json.dumps(sort_keys=True, compact, ensure_ascii=False) agree."
    obj = {k: v for k, v in SIGNED[name]["object"].items() if k != "signature"}
    old = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_bytes(obj) == old
