"""Anti-entropy between mesh nodes, in process, sans IO: signed sync requests, pages after a cursor, young packets
flooded on and old ones only kept, and the trace log that goes with the packets."""
import json
import random
from datetime import timedelta

import pytest

from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, seal
from bubble_ref.mesh import MeshConfig, open_mesh_node, sign_body
from bubble_ref.node import After, NodeConfig
from bubble_ref.packets import format_timestamp
from bubble_ref.store import ManualClock

from inproc import ask, assert_refused, calls, pin

A_URL, B_URL, C_URL = "http://a.invalid", "http://b.invalid", "http://c.invalid"
ROUND = ("sync", "round")


@pytest.fixture
def pair(tmp_path):
    "Nodes A and B that know each other (B also lists C, which it never resolves), on one manual clock."
    clock = ManualClock()
    a = open_mesh_node(tmp_path / "a", peers=(B_URL,), clock=clock, rng=random.Random(1),
                       config=NodeConfig(name="a", page_size=3))
    b = open_mesh_node(tmp_path / "b", peers=(A_URL, C_URL), clock=clock, rng=random.Random(2),
                       config=NodeConfig(name="b"))
    a.url, b.url = A_URL, B_URL
    pin(a, B_URL, b)
    pin(b, A_URL, a)
    yield a, b, clock
    a.close()
    b.close()


def post(node, alice, bob, text):
    reply = ask(node, "POST /messages", seal(alice, bob.public.b64, text).to_json())
    assert reply.status == 202, reply
    return reply.body["packet_id"]


SYNC_PATHS = ("/sync/ids", "/sync/fetch", "/sync")


def sync_round(asker, answerer):
    """One reconciliation round of `asker` with its only usable peer `answerer`, request after request as the asker
    makes them (1.2: ids pages and fetches; 1.1: whole pages): (packets stored per request, answers, the asker's
    other actions). (The answers' schemas are checked on a real node in tests/test_openapi_full.py.)"""
    actions = asker.on_timer(ROUND)
    assert actions[0] == After(asker.roles["sync"].mesh.sync_interval, ROUND), "the next round is always planned"
    pending = [c for path in SYNC_PATHS for c in calls(actions, path)]
    new, answers, others = [], [], []
    while pending:
        call = pending.pop(0)
        path = call.url.removeprefix(answerer.url)
        assert path in SYNC_PATHS, call.url
        before = asker.mailbox.count()
        reply = ask(answerer, f"POST {path}", call.body)
        assert reply.status == 200, reply
        answers.append((path, reply.body))
        followups = asker.on_answer(call.tag, reply.status, json.loads(json.dumps(reply.body)))
        new.append(asker.mailbox.count() - before)
        pending += [c for p in SYNC_PATHS for c in calls(followups, p)]
        others += [a for a in followups if a not in pending]
    return new, answers, others


def give(node, other, packet_id):
    "Store in `node` a copy of a packet `other` holds (as if it had come by another way)."
    stored = other.mailbox.get(packet_id)
    node.roles["sync"].service.accept(check_packet(json.loads(stored.packet)), expires_at=stored.expires_at)


def speaks_1_1(node, url):
    "Make `node` believe the peer at `url` announced protocol 1.1 (no /sync/ids, no /sync/fetch)."
    node.roles["peers"].protocols[url] = (1, 1)


def test_a_node_lists_ids_then_fetches_only_what_it_lacks(pair, alice, bob):
    a, b, clock = pair
    ids = [post(a, alice, bob, f"message {i}") for i in range(5)]
    a.db.execute("DELETE FROM outbox")  # as if flooding to B had been lost
    give(b, a, ids[1])
    new, answers, _ = sync_round(b, a)
    assert [path for path, _ in answers] == ["/sync/ids", "/sync/fetch", "/sync/ids", "/sync/fetch"]
    assert [len(x["ids"]) for path, x in answers if path == "/sync/ids"] == [3, 2]  # A's pages hold 3
    assert [[p["packet_id"] for p in x["packets"]] for path, x in answers if path == "/sync/fetch"] == [
        [ids[0], ids[2]], [ids[3], ids[4]]], "B fetched only what it lacked"
    assert new == [0, 2, 0, 2]
    assert {p.packet_id for p in b.mailbox.since().packets} == set(ids)
    new, answers, _ = sync_round(b, a)
    assert answers == [("/sync/ids", {"ids": [], "next_cursor": answers[0][1]["next_cursor"], "more": False})]


def test_nothing_lacking_means_no_fetch(pair, alice, bob):
    a, b, clock = pair
    posted = ask(a, "POST /messages", seal(alice, bob.public.b64, "flooded normally").to_json())
    relay = calls(posted.actions, "/relay")[0]
    assert ask(b, "POST /relay", relay.body).status == 202
    new, answers, _ = sync_round(b, a)
    assert [path for path, _ in answers] == ["/sync/ids"] and new == [0]


def test_a_1_1_peer_is_asked_for_whole_pages(pair, alice, bob):
    "A peer that announced 1.1 has no /sync/ids: the node asks it the 1.1 way (PROTOCOL §20)."
    a, b, clock = pair
    speaks_1_1(b, A_URL)
    ids = {post(a, alice, bob, f"message {i}") for i in range(5)}
    a.db.execute("DELETE FROM outbox")
    new, answers, _ = sync_round(b, a)
    assert [path for path, _ in answers] == ["/sync", "/sync"]
    assert new == [3, 2] and [len(x["packets"]) for _, x in answers] == [3, 2]  # A's pages hold 3
    assert [x["more"] for _, x in answers] == [True, False]
    assert {p.packet_id for p in b.mailbox.since().packets} == ids
    new, answers, _ = sync_round(b, a)
    assert new == [0] and answers[0][1]["packets"] == []  # the cursor remembers where B stopped


def test_fetching_grafts_the_asker_back_into_the_tree(pair, alice, bob):
    "A peer that had to fetch from us gets our relays again (Plumtree's graft), after a duplicate pruned it."
    a, b, clock = pair
    broadcast = a.roles["broadcast"]
    posted = ask(a, "POST /messages", seal(alice, bob.public.b64, "one").to_json())
    give(b, a, posted.body["packet_id"])
    relay = calls(posted.actions, "/relay")[0]
    answer = ask(b, "POST /relay", relay.body)
    assert answer.body["stored"] is False and answer.body["prune"] is True
    assert b.roles["broadcast"].lazy == {A_URL}, "B had it already: the link is off B's tree ..."
    a.on_answer(relay.tag, answer.status, answer.body)
    assert broadcast.lazy == {B_URL}, "... and off A's: A relays to it no more"
    a.db.execute("DELETE FROM outbox")
    post(a, alice, bob, "two")
    a.db.execute("DELETE FROM outbox")
    sync_round(b, a)
    assert broadcast.lazy == set() == b.roles["broadcast"].lazy, "B fetched what it lacked from A: back on the tree"


def test_young_packets_learned_by_sync_are_flooded_on_and_old_ones_only_kept(pair, alice, bob):
    "A relay of a young packet was probably lost, so it goes on; an old one (a node refilling) stays here."
    a, b, clock = pair
    young = post(a, alice, bob, "young")
    a.db.execute("DELETE FROM outbox")
    _, _, actions = sync_round(b, a)
    queued = b.db.execute("SELECT peer, hops FROM outbox WHERE packet_id = ?", (bytes.fromhex(young),)).fetchall()
    assert queued == [(C_URL, 2)], "on to C, not back to A, whose copy it is"
    assert [c.url for c in calls(actions, "/relay")] == [f"{C_URL}/relay"]
    b.db.execute("DELETE FROM outbox")

    old = post(a, alice, bob, "old")
    a.db.execute("DELETE FROM outbox")
    clock.advance(MeshConfig().sync_reflood_age + timedelta(seconds=1))
    new, _, actions = sync_round(b, a)
    assert new == [0, 1] and b.mailbox.contains(old)
    assert b.roles["broadcast"].outbox_size() == 0 and calls(actions, "/relay") == []
    assert ask(b, f"GET /trace/{old}", token=b.operator_token).body["from"] == a.id


def test_copies_learned_by_sync_keep_the_origin_expiry(pair, alice, bob):
    a, b, clock = pair
    packet_id = post(a, alice, bob, "hello")
    clock.advance(timedelta(days=6))
    sync_round(b, a)
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
    assert_refused(ask(a, "POST /sync", body), 403, "unknown_server")
    forged = {**body, "sender_id": b.id}
    assert_refused(ask(a, "POST /sync", forged), 403, "bad_signature")
    old = calls(b.on_timer(ROUND), "/sync/ids")[0].body
    for path in ("/sync", "/sync/ids"):
        assert_refused(ask(a, f"POST {path}", body), 403, "unknown_server")
        assert_refused(ask(a, f"POST {path}", forged), 403, "bad_signature")
        assert ask(a, f"POST {path}", old).status == 200
    fetch = sign_body(b.identity, {"type": "sync_fetch", "ids": ["0" * 64], "sender_id": b.id,
                                   "sent_at": format_timestamp(clock())})
    assert ask(a, "POST /sync/fetch", fetch).body == {"packets": []}, "nothing held by that id"
    assert_refused(ask(a, "POST /sync/fetch", {**fetch, "ids": ["1" * 64]}), 403, "bad_signature")
    assert_refused(ask(a, "POST /sync/fetch", sign_body(stranger, {**fetch, "sender_id": stranger.id})),
                   403, "unknown_server")
    too_many = sign_body(b.identity, {**fetch, "ids": [f"{i:064x}" for i in range(65)]})
    assert_refused(ask(a, "POST /sync/fetch", too_many), 400, "invalid_packet")
    clock.advance(timedelta(minutes=6))
    for path, request in (("/sync", old), ("/sync/ids", old), ("/sync/fetch", fetch)):
        assert_refused(ask(a, f"POST {path}", request), 403, "stale_request")
    assert_refused(ask(a, "POST /sync", {**old, "since": "abc"}), 400, "invalid_packet")


@pytest.mark.parametrize("protocol", ["1.2", "1.1"])
def test_a_sync_answer_is_bounded_in_bytes(tmp_path, alice, bob, protocol):
    "A fetch (1.2) or a page (1.1) holds packets up to sync_page_bytes (at least one); the asker asks on for the rest."
    clock = ManualClock()
    a = open_mesh_node(tmp_path / "a", peers=(B_URL,), clock=clock, rng=random.Random(1),
                       mesh=MeshConfig(sync_page_bytes=5000))
    b = open_mesh_node(tmp_path / "b", peers=(A_URL,), clock=clock, rng=random.Random(2))
    a.url, b.url = A_URL, B_URL
    try:
        pin(a, B_URL, b)
        pin(b, A_URL, a)
        if protocol == "1.1":
            speaks_1_1(b, A_URL)
        for i in range(4):
            post(a, alice, bob, f"{i}" * 2000)
        sizes = [len(p.packet) for p in a.mailbox.since().packets]
        per_page = max(1, 5000 // sizes[0])
        new, answers, _ = sync_round(b, a)
        assert sum(new) == 4
        if protocol == "1.2":
            fetched = [x["packets"] for path, x in answers if path == "/sync/fetch"]
            assert all(1 <= len(x) <= per_page for x in fetched) and len(fetched) > 1
        else:
            assert all(len(x["packets"]) <= per_page for _, x in answers)
            assert all(x["more"] for _, x in answers[:-1]) and not answers[-1][1]["more"]
    finally:
        a.close()
        b.close()


def test_bad_items_in_an_answer_are_skipped_and_the_rest_is_stored(pair, alice, bob):
    a, b, clock = pair
    good = check_packet(seal(alice, bob.public.b64, "good"))
    answer = {"packets": [
        {"packet_id": "0" * 64, "expires_at": format_timestamp(clock() + timedelta(days=1)),
         "packet": good.packet.to_dict()},                                      # id does not match
        {"packet_id": good.id, "expires_at": "yesterday", "packet": good.packet.to_dict()},  # bad time
        {"packet": "not a packet"},                                             # garbage
        "not even an object",
        {"packet_id": good.id, "expires_at": format_timestamp(clock() - timedelta(seconds=1)),
         "packet": good.packet.to_dict()},                                      # already expired
        {"packet_id": good.id, "expires_at": format_timestamp(clock() + timedelta(days=2)),
         "packet": good.packet.to_dict()},                                      # fine
    ], "next_cursor": "7", "more": False}
    b.on_answer(("sync", "page", A_URL, 0), 200, answer)
    assert [p.packet_id for p in b.mailbox.since().packets] == [good.id]
    assert b.db.execute("SELECT cursor FROM sync_cursors WHERE peer = ?", (A_URL,)).fetchone() == ("7",)


@pytest.mark.parametrize("url, status, body", [
    (C_URL, 200, "answer"),  # C was never resolved: not a known peer
    (A_URL, 200, ["not", "a", "dict"]),
    (A_URL, 200, {"packets": "not a list"}),
    (A_URL, 500, "answer"),
    (A_URL, None, None),
])
def test_answers_from_unknown_peers_or_in_bad_shape_store_nothing(pair, alice, bob, url, status, body):
    a, b, clock = pair
    good = check_packet(seal(alice, bob.public.b64, "good"))
    answer = {"packets": [{"packet_id": good.id, "expires_at": format_timestamp(clock() + timedelta(days=2)),
                           "packet": good.packet.to_dict()}], "next_cursor": "7", "more": True}
    assert b.on_answer(("sync", "page", url, 0), status, answer if body == "answer" else body) == []
    assert b.mailbox.count() == 0
    assert b.db.execute("SELECT count(*) FROM sync_cursors").fetchone() == (0,)


@pytest.mark.parametrize("cursor", ["-1", "abc", "1" * 19, 7, None])
def test_a_bad_cursor_in_an_answer_is_not_kept(pair, cursor):
    a, b, clock = pair
    b.on_answer(("sync", "page", A_URL, 0), 200, {"packets": [], "next_cursor": cursor, "more": False})
    assert b.db.execute("SELECT count(*) FROM sync_cursors").fetchone() == (0,)


def test_no_sync_request_without_known_peers(tmp_path):
    lonely = open_mesh_node(tmp_path / "lonely", peers=(A_URL,), clock=ManualClock(), rng=random.Random(0))
    try:
        assert lonely.on_timer(ROUND) == [After(MeshConfig().sync_interval, ROUND)]
    finally:
        lonely.close()


def test_trace_describes_only_packets_still_held_and_the_log_is_cleaned(pair, alice, bob):
    a, b, clock = pair
    packet_id = post(a, alice, bob, "short-lived")
    assert ask(a, f"GET /trace/{packet_id}", token=a.operator_token).body == {"received_at": format_timestamp(clock()), "hops": 0, "from": None}
    clock.advance(timedelta(days=8))
    assert_refused(ask(a, f"GET /trace/{packet_id}", token=a.operator_token), 404, "not_found")  # expired: no trace even before the sweep
    assert_refused(ask(a, "GET /trace/not-an-id", token=a.operator_token), 400, "invalid_packet")
    a.on_timer(("mailbox", "sweep"))
    assert a.db.execute("SELECT count(*) FROM relay_log").fetchone()[0] == 0
    again = post(a, alice, bob, "short-lived")  # a new packet (new box), traced afresh
    assert ask(a, f"GET /trace/{again}", token=a.operator_token).body["hops"] == 0
