"""Rules PROTOCOL.md 1.1 added or made exact (issue 16), each checked against the node's logic."""
from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest

from bubble_ref.ballot import open_monitored_node
from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, make_retrieval_proof, seal
from bubble_ref.mesh import sign_relay
from bubble_ref.node import PROTOCOL_VERSION, Request, open_relay_node
from bubble_ref.packets import MAX_JSON_DEPTH, PacketError, load_schema, parse_json
from bubble_ref.store import ManualClock


def nested(depth: int) -> str:
    return "[" * (depth - 1) + "{}" + "]" * (depth - 1)


def test_nesting_up_to_32_levels_parses_and_33_is_refused():
    assert MAX_JSON_DEPTH == 32
    parse_json("x", nested(32))
    parse_json("x", json.dumps({"a": [[{"b": []}]] * 40}))  # many brackets, but shallow: fine
    with pytest.raises(PacketError, match="nested too deeply"):
        parse_json("x", nested(33))
    with pytest.raises(PacketError, match="nested too deeply"):
        parse_json("x", "[" * 5000 + "]" * 5000)


def test_a_lone_surrogate_escape_is_not_utf8_text():
    with pytest.raises(PacketError, match="not UTF-8"):
        parse_json("x", '{"a": "\\ud800"}')
    assert parse_json("x", '{"a": "\\ud83e\\udee7"}') == {"a": "\U0001fae7"}  # a valid pair is one character


@pytest.fixture
def relay_node(tmp_path):
    clock = ManualClock()
    node = open_relay_node(tmp_path / "n", clock=clock, rng=random.Random(0))
    yield node, clock
    node.close()


def test_status_announces_the_protocol_and_the_required_fields(relay_node):
    node, _ = relay_node
    status = node.on_request(Request("GET /status")).body
    assert status["protocol"] == PROTOCOL_VERSION == "1.2"
    required = set(load_schema("status")["required"])
    assert required == {"server_id", "public_key", "protocol", "proof_mode", "time", "load"} <= set(status)


def test_post_retrieve_is_the_get_with_one_replay_cache(relay_node):
    node, clock = relay_node
    alice, bob = Identity.generate(), Identity.generate()
    packet = seal(alice, bob.public, "twice the door, one room", clock=clock)
    assert node.on_request(Request("POST /messages", packet.to_json().encode())).status == 202
    proof = make_retrieval_proof(bob, server_id=node.id, clock=clock).to_json().encode()
    by_post = node.on_request(Request("POST /messages/retrieve", proof))
    assert by_post.status == 200 and len(by_post.body["messages"]) == 1
    replayed = node.on_request(Request("GET /messages", proof))  # the same proof on the other route
    assert (replayed.status, replayed.body["error"]) == (401, "proof_replayed")
    fresh = make_retrieval_proof(bob, server_id=node.id, clock=clock).to_json().encode()
    assert node.on_request(Request("GET /messages", fresh)).body == by_post.body
    for route in ("POST /messages/retrieve", "GET /messages"):
        bad = node.on_request(Request(route, b'{"public_key": "x"}'))
        assert (bad.status, bad.body["error"]) == (400, "invalid_packet")


def test_a_stale_relay_is_refused_and_counts_against_no_one(tmp_path):
    clock = ManualClock()
    node = open_monitored_node(tmp_path / "n", clock=clock, rng=random.Random(0))
    peer = Identity.generate()
    try:
        peers = node.roles["peers"]
        peers.urls = ("http://127.0.0.9:1",)
        peers.learn_peer("http://127.0.0.9:1", {"server_id": peer.id, "public_key": peer.public.b64})
        alice, bob = Identity.generate(), Identity.generate()
        packet = seal(alice, bob.public, "an old relay", clock=clock)
        pid = check_packet(packet).id
        for skew, status in ((timedelta(minutes=-6), 403), (timedelta(minutes=6), 403),
                             (timedelta(minutes=-4), 202)):
            relay = sign_relay(peer, packet.to_dict(), pid, clock() + timedelta(days=1), 1, clock() + skew)
            reply = node.on_request(Request("POST /relay", json.dumps(relay).encode()))
            assert reply.status == status, (skew, reply.body)
            if status == 403:
                assert reply.body["error"] == "stale_request"
                assert node.roles["ledger"].transactions() == [], "a stale relay may be a replay: no one's fault"
        assert node.roles["ledger"].transactions()[0].outcome == "accepted"
    finally:
        node.close()


def test_a_sync_answer_from_a_peer_blacklisted_meanwhile_is_dropped(tmp_path):
    clock = ManualClock()
    node = open_monitored_node(tmp_path / "n", clock=clock, rng=random.Random(0))
    peer = Identity.generate()
    try:
        url = "http://127.0.0.9:1"
        peers = node.roles["peers"]
        peers.urls = (url,)
        peers.learn_peer(url, {"server_id": peer.id, "public_key": peer.public.b64})
        packet = seal(Identity.generate(), Identity.generate().public, "via a blacklisted peer", clock=clock)
        answer = {"packets": [{"packet_id": check_packet(packet).id, "expires_at": "2024-06-20T12:00:00Z",
                               "packet": packet.to_dict()}], "next_cursor": "1", "more": True}
        node.roles["ballot"].blacklisted.add(peer.id)
        assert node.on_answer(("sync", "page", url, 0), 200, answer) == []
        assert node.mailbox.count() == 0
        node.roles["ballot"].blacklisted.discard(peer.id)
        actions = node.on_answer(("sync", "page", url, 0), 200, answer)
        assert node.mailbox.count() == 1 and any(getattr(a, "url", "").endswith("/sync") for a in actions)
    finally:
        node.close()


def test_a_relay_refused_as_stale_waits_in_the_outbox(tmp_path):
    "§15: 403 stale_request means the clocks disagree; the relay is retried (signed afresh), not dropped."
    from bubble_ref.mesh import open_mesh_node
    from bubble_ref.node import After, Call

    clock = ManualClock()
    peer_url = "http://127.0.0.9:1"
    node = open_mesh_node(tmp_path / "n", peers=(peer_url,), clock=clock, rng=random.Random(0))
    peer = Identity.generate()
    try:
        node.roles["peers"].learn_peer(peer_url, {"server_id": peer.id, "public_key": peer.public.b64})
        packet = seal(Identity.generate(), Identity.generate().public, "to a peer with another clock", clock=clock)
        reply = node.on_request(Request("POST /messages", packet.to_json().encode()))
        call = next(a for a in reply.actions if isinstance(a, Call))
        actions = node.on_answer(call.tag, 403, {"error": "stale_request", "detail": "clocks"})
        assert any(isinstance(a, After) for a in actions), "a retry is scheduled"
        assert node.roles["broadcast"].outbox_size() == 1
    finally:
        node.close()
