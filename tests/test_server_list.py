"""Server-list exchange, in process: a node's signed list with URLs and keys, what a receiver must refuse, and the
directory a node builds from the lists it gets (Peers)."""
import json
from datetime import timedelta

import pytest

from bubble_ref.crypto import Identity
from bubble_ref.mesh import MeshConfig, Server, ServerListed, canonical_bytes, sign_body, verify_server_list
from bubble_ref.node import After, NodeError
from bubble_ref.packets import ServerListRequest, format_timestamp
from bubble_ref.store import ManualClock

from inproc import ask, assert_refused, calls, carry, mesh_node, pin

A_URL, B_URL, C_URL = "http://127.0.0.1:8101", "http://127.0.0.1:8102", "http://127.0.0.1:8103"


@pytest.fixture
def pair(tmp_path):
    clock = ManualClock()
    a = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL)
    b = mesh_node(tmp_path / "b", clock, (A_URL,), B_URL)
    pin(a, B_URL, b)
    yield a, b, clock
    a.close()
    b.close()


def list_request(requester, clock) -> dict:
    return ServerListRequest(requester_id=requester.id, timestamp=format_timestamp(clock())).to_dict()


def ask_list(node, requester, clock) -> dict:
    reply = ask(node, "POST /servers", list_request(requester, clock))
    assert reply.status == 200, reply
    return reply.body


def test_a_node_lists_itself_and_its_peers_signed(pair, alice):
    a, b, clock = pair
    answer = ask_list(a, alice, clock)
    assert answer["type"] == "server_list_response" and answer["responder_id"] == a.id
    assert answer["known_servers"] == [a.id, b.id]
    entries = verify_server_list(answer, responder_key=a.identity.public)
    assert entries == [Server(a.id, A_URL, a.identity.public), Server(b.id, B_URL, b.identity.public)]
    # trust on first use: without a pinned key, the responder's own entry is used
    assert verify_server_list(answer) == entries


def test_only_resolved_peers_are_listed(pair, alice):
    "B has not heard from A yet (A's key is not pinned): B lists only itself; a node without a URL lists nobody."
    a, b, clock = pair
    assert ask_list(b, alice, clock)["known_servers"] == [b.id]
    b.url = None
    assert ask_list(b, alice, clock)["known_servers"] == []


@pytest.mark.parametrize("change, phrase", [
    (lambda l, other: {**l, "servers": [{**l["servers"][1], "url": "http://127.0.0.1:1"}, l["servers"][0]]},
     "signature does not match"),
    (lambda l, other: {**l, "known_servers": l["known_servers"][:1]}, "signature does not match"),
    (lambda l, other: {**l, "servers": [{**l["servers"][0], "public_key": other.public.b64}]}, "is not the key's id"),
    (lambda l, other: {k: v for k, v in l.items() if k != "signature"}, "not signed"),
    (lambda l, other: {**l, "servers": [{**l["servers"][0], "url": "ftp://x"}]}, "http"),
    (lambda l, other: {**l, "extra": 1}, "unexpected field"),
])
def test_tampered_or_malformed_lists_are_refused(pair, alice, change, phrase):
    a, b, clock = pair
    answer = ask_list(a, alice, clock)
    with pytest.raises(NodeError) as caught:
        verify_server_list(change(answer, Identity.generate()), responder_key=a.identity.public)
    assert caught.value.code == "bad_server_list" and phrase in caught.value.detail


def test_a_list_signed_by_someone_else_than_the_pinned_server_is_refused(pair, alice, mallory):
    a, b, clock = pair
    answer = ask_list(a, alice, clock)
    forged = sign_body(mallory, {k: v for k, v in answer.items() if k != "signature"})
    with pytest.raises(NodeError, match="signature does not match"):
        verify_server_list(forged, responder_key=a.identity.public)
    with pytest.raises(NodeError, match="pinned key is"):
        verify_server_list(answer, responder_key=mallory.public)
    assert canonical_bytes(forged) == canonical_bytes(answer)  # same content, different signer


def test_bad_requests_get_a_400(pair):
    a, b, clock = pair
    for body in [b"{", json.dumps({"type": "server_list_request"}), json.dumps({"type": "nope"})]:
        assert_refused(ask(a, "POST /servers", body), 400, "invalid_packet")


def test_add_peer_skips_duplicates_self_and_respects_the_limit(pair):
    a, b, clock = pair
    peers = a.roles["peers"]
    assert not peers.add_peer(B_URL + "/") and not peers.add_peer(A_URL)
    assert peers.add_peer("http://127.0.0.1:8104")
    assert peers.urls == (B_URL, "http://127.0.0.1:8104")
    for port in range(8105, 8130):
        peers.add_peer(f"http://127.0.0.1:{port}")
    assert len(peers.urls) == peers.mesh.max_peers


# ------------------------------------------------------------------ peers and the directory

def test_peers_are_resolved_by_their_status_and_retried_with_backoff(tmp_path):
    clock = ManualClock()
    a = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL, resolve_retry=timedelta(seconds=1),
                  retry_max=timedelta(seconds=3))
    b = mesh_node(tmp_path / "b", clock, (A_URL,), B_URL)
    try:
        first = a.start()
        status_call, = calls(first, "/status")
        assert status_call.url == f"{B_URL}/status"
        assert After(MeshConfig().directory_interval, ("peers", "directory")) in first
        waits = []
        for _ in range(3):  # B is down
            retry, = a.on_answer(status_call.tag, None, None)
            waits.append(retry.delay.total_seconds())
            status_call, = a.on_timer(retry.tag)
        assert waits == [1, 2, 3], "doubling, capped at retry_max"
        assert a.roles["peers"].unresolved() == [B_URL]
        carry(a, status_call, {B_URL: b})
        assert a.roles["peers"].peer_at(B_URL).server_id == b.id and a.roles["peers"].unresolved() == []
        assert a.roles["peers"].verified_since(clock()) == {b.id}
        assert ask(a, "GET /status").body["known_peers"] == 1
    finally:
        a.close()
        b.close()


def test_a_peer_that_changes_its_key_is_refused(pair, mallory):
    a, b, clock = pair
    impostor = {**ask(b, "GET /status").body, "server_id": mallory.id, "public_key": mallory.public.b64}
    with pytest.raises(NodeError) as caught:
        a.roles["peers"].learn_peer(B_URL, impostor)
    assert caught.value.code == "peer_key_changed"
    assert a.roles["peers"].peer_at(B_URL).server_id == b.id
    lying = {**ask(b, "GET /status").body, "server_id": mallory.id}
    with pytest.raises(NodeError) as caught:
        a.roles["peers"].learn_peer(B_URL, lying)
    assert caught.value.code == "bad_peer"


def test_the_directory_learns_from_verified_lists_only(tmp_path):
    "A asks B (its peer) for B's list, which names C: A now knows C, by B's word; a bad list teaches nothing."
    clock = ManualClock()
    a = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL)
    b = mesh_node(tmp_path / "b", clock, (A_URL, C_URL), B_URL)
    c = mesh_node(tmp_path / "c", clock, (B_URL,), C_URL)
    listed = []
    a.on(ServerListed, lambda e: listed.append((e.responder_id, len(e.servers))) or [])
    try:
        pin(a, B_URL, b)
        pin(b, A_URL, a)
        pin(b, C_URL, c)
        actions = a.on_timer(("peers", "directory"))
        assert actions[-1] == After(MeshConfig().directory_interval, ("peers", "directory"))
        list_call, = calls(actions, "/servers")
        answer = ask(b, "POST /servers", list_call.body).body

        assert [s["url"] for s in answer["servers"]] == [B_URL, A_URL, C_URL]
        tampered = {**answer, "servers": [*answer["servers"][:2], {**answer["servers"][2], "url": "http://127.0.0.1:1"}]}
        assert a.on_answer(list_call.tag, 200, tampered) == [] and c.id not in a.roles["peers"].directory()
        a.on_answer(list_call.tag, 200, answer)
        directory = a.roles["peers"].directory()
        assert sorted(directory) == sorted([b.id, c.id]) and directory[c.id].url == C_URL
        assert a.roles["peers"].peers_of[b.id] == tuple(sorted([a.id, c.id]))
        assert listed == [(b.id, 3)]
        assert a.roles["peers"].named_unverified(clock() - timedelta(minutes=1), per_lister=4) == {c.id}
        assert a.roles["peers"].verified_since(clock()) == {b.id}
        # the next round asks C too, which it now knows
        asked = sorted(call.url for call in calls(a.on_timer(("peers", "directory")), "/servers"))
        assert asked == [f"{B_URL}/servers", f"{C_URL}/servers"]
    finally:
        for node in (a, b, c):
            node.close()


def test_discover_adds_listed_servers_as_peers(tmp_path):
    clock = ManualClock()
    a = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL, discover=True)
    b = mesh_node(tmp_path / "b", clock, (A_URL, C_URL), B_URL)
    c = mesh_node(tmp_path / "c", clock, (B_URL,), C_URL)
    try:
        pin(a, B_URL, b)
        pin(b, C_URL, c)
        list_call, = calls(a.on_timer(("peers", "directory")), "/servers")
        actions = carry(a, list_call, {B_URL: b})
        assert a.roles["peers"].urls == (B_URL, C_URL)
        assert [call.url for call in calls(actions, "/status")] == [f"{C_URL}/status"]
    finally:
        for node in (a, b, c):
            node.close()


def test_the_directory_survives_a_restart(tmp_path):
    clock = ManualClock()
    a = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL)
    b = mesh_node(tmp_path / "b", clock, (A_URL,), B_URL)
    pin(a, B_URL, b)
    b.close()
    a.close()
    again = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL)
    try:
        assert list(again.roles["peers"].directory()) == [b.id]
        assert again.roles["peers"].unresolved() == [B_URL], "a peer's key is pinned again when it answers"
    finally:
        again.close()
