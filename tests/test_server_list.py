"""Server-list exchange: a node's signed list with URLs and keys, and what a receiver must refuse."""
import json

import pytest

from bubble_ref.crypto import Identity
from bubble_ref.mesh import MeshNode, ServerEntry, canonical_bytes, sign_body, verify_server_list
from bubble_ref.node import NodeConfig, NodeError
from bubble_ref.packets import ServerListRequest, format_timestamp
from bubble_ref.store import ManualClock

A_URL, B_URL = "http://127.0.0.1:8101", "http://127.0.0.1:8102"


@pytest.fixture
def pair(tmp_path):
    clock = ManualClock()
    a = MeshNode.open(tmp_path / "a", peers=(B_URL,), clock=clock, config=NodeConfig(name="a"))
    b = MeshNode.open(tmp_path / "b", peers=(A_URL,), clock=clock, config=NodeConfig(name="b"))
    a.url, b.url = A_URL, B_URL
    a.learn_peer(B_URL, b.status())
    yield a, b, clock
    a.close()
    b.close()


def ask(node, requester, clock):
    return node.answer_server_list(json.dumps(ServerListRequest(requester_id=requester.id,
                                                                timestamp=format_timestamp(clock())).to_dict()))


def test_a_node_lists_itself_and_its_peers_signed(pair, alice):
    a, b, clock = pair
    answer = ask(a, alice, clock)
    assert answer["type"] == "server_list_response" and answer["responder_id"] == a.id
    assert answer["known_servers"] == [a.id, b.id]
    entries = verify_server_list(answer, responder_key=a.identity.public)
    assert entries == [ServerEntry(a.id, A_URL, a.identity.public), ServerEntry(b.id, B_URL, b.identity.public)]
    # trust on first use: without a pinned key, the responder's own entry is used
    assert verify_server_list(answer) == entries


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
    answer = ask(a, alice, clock)
    with pytest.raises(NodeError) as caught:
        verify_server_list(change(answer, Identity.generate()), responder_key=a.identity.public)
    assert caught.value.code == "bad_server_list" and phrase in caught.value.detail


def test_a_list_signed_by_someone_else_than_the_pinned_server_is_refused(pair, alice, mallory):
    a, b, clock = pair
    answer = ask(a, alice, clock)
    forged = sign_body(mallory, {k: v for k, v in answer.items() if k != "signature"})
    with pytest.raises(NodeError, match="signature does not match"):
        verify_server_list(forged, responder_key=a.identity.public)
    with pytest.raises(NodeError, match="pinned key is"):
        verify_server_list(answer, responder_key=mallory.public)
    assert canonical_bytes(forged) == canonical_bytes(answer)  # same content, different signer


def test_bad_requests_get_a_400(pair):
    a, b, clock = pair
    for body in [b"{", json.dumps({"type": "server_list_request"}), json.dumps({"type": "nope"})]:
        with pytest.raises(NodeError) as caught:
            a.answer_server_list(body)
        assert (caught.value.status, caught.value.code) == (400, "invalid_packet")


def test_add_peer_skips_duplicates_self_and_respects_the_limit(pair):
    a, b, clock = pair
    assert not a.add_peer(B_URL + "/") and not a.add_peer(A_URL)
    assert a.add_peer("http://127.0.0.1:8103")
    assert a.peers == (B_URL, "http://127.0.0.1:8103")
    for port in range(8104, 8130):
        a.add_peer(f"http://127.0.0.1:{port}")
    assert len(a.peers) == a.mesh.max_peers
