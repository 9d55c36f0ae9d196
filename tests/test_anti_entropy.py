"""Anti-entropy between mesh nodes, in process: signed sync requests, pages since a cursor, no re-flooding."""
import json
import random
from datetime import timedelta

import pytest

from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, seal
from bubble_ref.mesh import MeshConfig, MeshNode, sign_body
from bubble_ref.node import NodeConfig, NodeError
from bubble_ref.packets import format_timestamp
from bubble_ref.store import ManualClock

A_URL, B_URL, C_URL = "http://a.invalid", "http://b.invalid", "http://c.invalid"


@pytest.fixture
def pair(tmp_path):
    "Nodes A and B that know each other (B also lists C, which it never resolves), on one manual clock."
    clock = ManualClock()
    a = MeshNode.open(tmp_path / "a", peers=(B_URL,), clock=clock, config=NodeConfig(name="a", page_size=3))
    b = MeshNode.open(tmp_path / "b", peers=(A_URL, C_URL), clock=clock, config=NodeConfig(name="b"))
    a.learn_peer(B_URL, b.status())
    b.learn_peer(A_URL, a.status())
    yield a, b, clock
    a.close()
    b.close()


def post(node, alice, bob, text):
    return node.submit(seal(alice, bob.public.b64, text).to_json())["packet_id"]


def sync_once(asker, answerer, rng=None):
    url, body = asker.make_sync_request(rng or random.Random(0))
    answer = answerer.answer_sync(json.dumps(body))
    return asker.apply_sync(url, answer), answer


def test_a_node_pulls_what_it_lacks_page_by_page_and_does_not_flood_it(pair, alice, bob):
    a, b, clock = pair
    ids = {post(a, alice, bob, f"message {i}") for i in range(5)}
    a.mailbox.connection().execute("DELETE FROM outbox")  # as if flooding to B had been lost
    new, answer = sync_once(b, a)
    assert (new, len(answer["packets"]), answer["more"]) == (3, 3, True)  # A's pages hold 3
    new, answer = sync_once(b, a)
    assert (new, answer["more"]) == (2, False)
    assert {p.packet_id for p in b.mailbox.since().packets} == ids
    assert b.outbox_size() == 0  # learned by reconciliation: kept, not flooded again
    new, answer = sync_once(b, a)
    assert (new, answer["packets"]) == (0, [])  # the cursor remembers where B stopped


def test_copies_learned_by_sync_keep_the_origin_expiry(pair, alice, bob):
    a, b, clock = pair
    packet_id = post(a, alice, bob, "hello")
    clock.advance(timedelta(days=6))
    sync_once(b, a)
    original = a.mailbox.since().packets[0]
    copy = b.mailbox.since().packets[0]
    assert copy.packet_id == packet_id and copy.expires_at == original.expires_at
    clock.advance(timedelta(days=1, minutes=1))
    assert b.mailbox.since().packets == [] and a.mailbox.since().packets == []


def test_only_known_servers_may_ask_and_only_with_a_fresh_signed_request(pair):
    a, b, clock = pair
    stranger = Identity.generate()
    body = sign_body(stranger, {"type": "sync_request", "since": "", "sender_id": stranger.id,
                                "sent_at": format_timestamp(clock())})
    with pytest.raises(NodeError) as caught:
        a.answer_sync(json.dumps(body))
    assert (caught.value.status, caught.value.code) == (403, "unknown_server")
    forged = {**body, "sender_id": b.id}
    with pytest.raises(NodeError) as caught:
        a.answer_sync(json.dumps(forged))
    assert (caught.value.status, caught.value.code) == (403, "bad_signature")
    _, old = b.make_sync_request(random.Random(0))
    clock.advance(timedelta(minutes=6))
    with pytest.raises(NodeError) as caught:
        a.answer_sync(json.dumps(old))
    assert (caught.value.status, caught.value.code) == (403, "stale_request")
    with pytest.raises(NodeError) as caught:
        a.answer_sync(json.dumps({**old, "since": "abc"}))
    assert (caught.value.status, caught.value.code) == (400, "invalid_packet")


def test_bad_items_in_an_answer_are_skipped_and_the_rest_is_stored(pair, alice, bob):
    a, b, clock = pair
    good = check_packet(seal(alice, bob.public.b64, "good"))
    answer = {"packets": [
        {"packet_id": "0" * 64, "expires_at": format_timestamp(clock() + timedelta(days=1)),
         "packet": good.packet.to_dict()},                                      # id does not match
        {"packet_id": good.id, "expires_at": "yesterday", "packet": good.packet.to_dict()},  # bad time
        {"packet": "not a packet"},                                             # garbage
        {"packet_id": good.id, "expires_at": format_timestamp(clock() - timedelta(seconds=1)),
         "packet": good.packet.to_dict()},                                      # already expired
        {"packet_id": good.id, "expires_at": format_timestamp(clock() + timedelta(days=2)),
         "packet": good.packet.to_dict()},                                      # fine
    ], "next_cursor": "7", "more": False}
    assert b.apply_sync(A_URL, answer) == 1
    assert [p.packet_id for p in b.mailbox.since().packets] == [good.id]
    with pytest.raises(NodeError):
        b.apply_sync(C_URL, answer)  # C was never resolved: not a known peer
    with pytest.raises(NodeError):
        b.apply_sync(A_URL, ["not", "a", "dict"])


def test_no_sync_request_without_known_peers(tmp_path):
    lonely = MeshNode.open(tmp_path / "lonely", peers=(A_URL,), mesh=MeshConfig())
    try:
        assert lonely.make_sync_request(random.Random(0)) is None
    finally:
        lonely.close()


def test_trace_describes_only_packets_still_held_and_the_log_is_cleaned(pair, alice, bob):
    a, b, clock = pair
    packet_id = post(a, alice, bob, "short-lived")
    assert a.trace(packet_id)["hops"] == 0
    clock.advance(timedelta(days=8))
    assert a.trace(packet_id) is None  # expired: no trace even before the sweep
    clock.advance(a.config.sweep_interval)
    assert a.tick() == 1
    assert a.mailbox.connection().execute("SELECT count(*) FROM relay_log").fetchone()[0] == 0
    again = post(a, alice, bob, "short-lived")  # a new packet (new box), traced afresh
    assert a.trace(again)["hops"] == 0
