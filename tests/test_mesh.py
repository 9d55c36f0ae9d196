"""The mesh (server-to-server broadcast): real `bubble-ref node --peer ...` subprocesses on 127.0.0.1, plus mesh
nodes in process, sans IO, on manual clocks (expiry, retries, the relay window) and the relay signature helpers.

Nothing here asserts on wall-clock durations: every wait is a poll with a deadline. Every process a test starts
is registered with a `Launcher` first and stopped (SIGTERM, SIGKILL as a last resort) at teardown.
"""
from __future__ import annotations

import base64
import json
import random
import re
from datetime import datetime, timedelta, timezone

import pytest
import requests

from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, make_retrieval_proof, open_message, seal
from bubble_ref.mesh import (
    HOP_LIMIT, MeshConfig, RelayReceived, RelaySent, canonical_bytes, sign_body, sign_relay,
    verify_body)
from bubble_ref.node import After
from bubble_ref.packets import format_timestamp, parse_timestamp
from bubble_ref.store import ManualClock

from inproc import ask, calls, carry, mesh_node, pin, timers
from nodes import HTTP_TIMEOUT, Launcher, MeshProcess, NodeProcess, assert_error, fetch_all, wait_until


# ------------------------------------------------------------------- helpers

def status(proc: NodeProcess) -> dict:
    return proc.status()


def trace(proc: NodeProcess, packet_id: str) -> requests.Response:
    return requests.get(f"{proc.url}/trace/{packet_id}", headers=proc.operator_headers(), timeout=HTTP_TIMEOUT)


def post_message(proc: NodeProcess, packet: dict) -> dict:
    response = requests.post(f"{proc.url}/messages", json=packet, timeout=HTTP_TIMEOUT)
    assert response.status_code == 202, response.text
    return response.json()


def post_relay(proc: NodeProcess, body: dict) -> requests.Response:
    return requests.post(f"{proc.url}/relay", json=body, timeout=HTTP_TIMEOUT)


def refused_relays(proc: NodeProcess) -> list[str]:
    "The lines of the node's request log that answered a POST /relay with a 4xx (a peer sent what it must not)."
    return [line for line in proc.stderr().splitlines() if re.search(r" POST /relay 4\d\d ", line)]


def wait_for_peers(*procs: MeshProcess) -> None:
    for proc in procs:
        wait_until(lambda: status(proc)["known_peers"] == len(proc.peers), f"node {proc.name} to know its peers")


def wait_outboxes_empty(*procs: NodeProcess) -> None:
    for proc in procs:
        wait_until(lambda: status(proc)["outbox"] == 0, f"the outbox of node {proc.name} to drain")


def mailbox_ids(proc: NodeProcess, who: Identity) -> list[str]:
    "The packet ids of every message in `who`'s mailbox on the node, in order, duplicates kept."
    messages, _ = fetch_all(proc.url, who)  # a fresh hardened proof for each page
    return [m["packet_id"] for m in messages]


def relay_body(signer: Identity, packet: dict, packet_id: str, hops: int, *, sender_id: str | None = None) -> dict:
    "A relay body as a peer sends it; `sender_id` other than the signer's makes a forgery signed by `signer`."
    now = datetime.now(timezone.utc)
    if sender_id is None:
        return sign_relay(signer, packet, packet_id, now + timedelta(days=7), hops, now)
    body = {"type": "relay", "packet": packet, "packet_id": packet_id,
            "expires_at": format_timestamp(now + timedelta(days=7)), "hops": hops, "sender_id": sender_id,
            "sent_at": format_timestamp(now)}
    body["signature"] = base64.b64encode(signer.sign(canonical_bytes(body))).decode("ascii")
    return body


def fresh_packet(alice: Identity, bob: Identity, text: str) -> tuple[dict, str]:
    "A new sealed packet from Alice to Bob, as a dict, and its server-computed id."
    packet = seal(alice, bob.public.b64, text)
    return packet.to_dict(), check_packet(packet).id


@pytest.fixture(scope="module")
def line5(tmp_path_factory):
    "Five real nodes A — B — C — D — E, all peers resolved; shared by the delivery and the refusal tests."
    launch = Launcher(tmp_path_factory.mktemp("line5"))
    try:
        nodes = launch.line("ABCDE")
        launch.start(*nodes.values())
        wait_for_peers(*nodes.values())
        yield nodes
    finally:
        launch.stop_all()


# ------------------------------------------------------ 1. five-node line

def test_five_node_line_delivers_end_to_end_once_everywhere(line5, alice, bob):
    names = "ABCDE"
    ids = {n: status(line5[n])["server_id"] for n in names}
    packet, expected_id = fresh_packet(alice, bob, "Hello Bob, from the far end of the line")

    posted = post_message(line5["A"], packet)
    assert posted["packet_id"] == expected_id and posted["stored"] is True

    wait_until(lambda: trace(line5["E"], expected_id).status_code == 200, "the packet to reach E")
    traces = {}
    for n in names:
        response = trace(line5[n], expected_id)
        assert response.status_code == 200, (n, response.text)
        traces[n] = response.json()
    assert [traces[n]["hops"] for n in names] == [0, 1, 2, 3, 4], traces
    assert traces["A"]["from"] is None  # A is the origin: Alice posted there
    assert [traces[n]["from"] for n in "BCDE"] == [ids[n] for n in "ABCD"], traces  # each from its left neighbour

    messages, _ = fetch_all(line5["E"].url, bob)
    mine = [m for m in messages if m["packet_id"] == expected_id]
    assert len(mine) == 1
    assert mine[0]["packet"] == packet
    opened = open_message(bob, mine[0]["packet"])
    assert opened.content == "Hello Bob, from the far end of the line"
    assert opened.sender_id == alice.id

    wait_outboxes_empty(*line5.values())
    for n in names:
        assert mailbox_ids(line5[n], bob).count(expected_id) == 1, n

    before = {n: status(line5[n])["stored_messages"] for n in names}
    again = post_message(line5["C"], packet)
    assert again["packet_id"] == expected_id and again["stored"] is False
    assert status(line5["C"])["outbox"] == 0  # a duplicate queues nothing (the queue is written with the store)
    wait_outboxes_empty(*line5.values())
    for n in names:
        assert mailbox_ids(line5[n], bob).count(expected_id) == 1, n
        assert status(line5[n])["stored_messages"] == before[n], n
    assert trace(line5["C"], expected_id).json() == traces["C"]  # still hop 2 from B, not a new origin


# ------------------------------------------------------------ 2. refusals

def test_forged_unknown_and_mismatched_relays_are_refused(line5, alice, bob, mallory):
    b_key = line5["B"].server_key()
    assert b_key.id == status(line5["B"])["server_id"]
    c = line5["C"]
    packet, pid = fresh_packet(alice, bob, "refused relays")

    forged = relay_body(mallory, packet, pid, 1, sender_id=b_key.id)  # names B, signed by a stranger
    assert_error(post_relay(c, forged), 403, "bad_signature")

    unknown = relay_body(mallory, packet, pid, 1)  # a stranger signing as itself
    assert unknown["sender_id"] == mallory.id
    assert_error(post_relay(c, unknown), 403, "unknown_server")

    too_far = relay_body(b_key, packet, pid, HOP_LIMIT + 1)
    assert_error(post_relay(c, too_far), 400, "hop_limit")

    _, other_pid = fresh_packet(alice, bob, "another packet, whose id does not match")
    mismatched = relay_body(b_key, packet, other_pid, 1)
    assert_error(post_relay(c, mismatched), 400, "invalid_packet")

    tampered = {**relay_body(b_key, packet, pid, 1)}
    tampered["hops"] = 2  # signed as hop 1
    assert_error(post_relay(c, tampered), 403, "bad_signature")

    wait_outboxes_empty(*line5.values())
    for n in "ABCDE":  # none of the refused relays stored anything, anywhere
        assert trace(line5[n], pid).status_code == 404, n
        assert trace(line5[n], other_pid).status_code == 404, n
        assert pid not in mailbox_ids(line5[n], bob), n


def test_relay_at_the_hop_limit_is_stored_but_not_forwarded(line5, alice, bob):
    b_key = line5["B"].server_key()
    packet, pid = fresh_packet(alice, bob, "sixteen hops already")

    response = post_relay(line5["C"], relay_body(b_key, packet, pid, HOP_LIMIT))
    assert response.status_code == 202, response.text
    assert response.json()["packet_id"] == pid and response.json()["stored"] is True
    assert trace(line5["C"], pid).json()["hops"] == HOP_LIMIT
    assert trace(line5["C"], pid).json()["from"] == b_key.id

    wait_outboxes_empty(line5["C"])
    assert trace(line5["D"], pid).status_code == 404  # C's other neighbour never got it...
    assert refused_relays(line5["D"]) == []  # ...because C never sent it (not because D refused a hop 17)
    assert trace(line5["B"], pid).status_code == 404  # nor the sender
    assert pid in mailbox_ids(line5["C"], bob)

    # Control: one hop fewer, and C forwards it to D (hop 16), which stops there.
    packet2, pid2 = fresh_packet(alice, bob, "fifteen hops already")
    response = post_relay(line5["C"], relay_body(b_key, packet2, pid2, HOP_LIMIT - 1))
    assert response.status_code == 202 and response.json()["stored"] is True, response.text
    reached = wait_until(lambda: trace(line5["D"], pid2).status_code == 200 and trace(line5["D"], pid2),
                         "the hop-15 relay to reach D")
    assert reached.json()["hops"] == HOP_LIMIT
    wait_outboxes_empty(*line5.values())
    assert trace(line5["E"], pid2).status_code == 404
    assert trace(line5["B"], pid2).status_code == 404
    assert trace(line5["D"], pid).status_code == 404
    assert refused_relays(line5["D"]) == [] and refused_relays(line5["E"]) == []  # D did not try E with hop 17


# ------------------------------------------------- 3. partition and restart

def test_partition_heals_when_the_middle_node_restarts(launcher, alice, bob):
    nodes = launcher.line("ABC")
    a, b, c = nodes["A"], nodes["B"], nodes["C"]
    launcher.start(a, b, c)
    wait_for_peers(a, b, c)

    assert b.stop() == 0
    posted = []
    for i in range(5):
        packet, pid = fresh_packet(alice, bob, f"while B is down, #{i}")
        answer = post_message(a, packet)
        assert answer["stored"] is True and answer["packet_id"] == pid
        posted.append(pid)
    assert len(set(posted)) == 5
    assert status(a)["outbox"] == 5  # all waiting for B
    assert all(trace(c, pid).status_code == 404 for pid in posted)

    b2 = b.again()
    launcher.start(b2)
    wait_until(lambda: len(mailbox_ids(c, bob)) >= 5, "all 5 packets to reach C")
    wait_outboxes_empty(a, b2, c)

    at_c = mailbox_ids(c, bob)
    assert len(at_c) == 5 and len(set(at_c)) == 5 and set(at_c) == set(posted)
    assert sorted(mailbox_ids(b2, bob)) == sorted(posted)
    assert sorted(mailbox_ids(a, bob)) == sorted(posted)
    for pid in posted:
        assert trace(c, pid).json()["hops"] == 2


# -------------------------------------------- 4. SIGKILL with a full outbox

def test_outbox_survives_sigkill_and_drains_when_the_peer_comes(launcher, alice, bob):
    nodes = launcher.line("AB")
    a, b = nodes["A"], nodes["B"]
    launcher.start(a)  # B is down

    posted = []
    for i in range(20):
        packet, pid = fresh_packet(alice, bob, f"queued #{i}")
        assert post_message(a, packet)["stored"] is True
        posted.append(pid)
    assert len(set(posted)) == 20
    wait_until(lambda: status(a)["outbox"] == 20, "A's outbox to hold 20 relays")

    assert a.kill() == -9
    a2 = a.again()
    launcher.start(a2)
    after_restart = status(a2)
    assert after_restart["outbox"] == 20
    assert after_restart["stored_messages"] == 20

    launcher.start(b)
    wait_until(lambda: status(a2)["outbox"] == 0, "A's outbox to drain to B")
    at_b = mailbox_ids(b, bob)
    assert len(at_b) == 20 and set(at_b) == set(posted)
    a_id = status(a2)["server_id"]
    for pid in posted:
        got = trace(b, pid).json()
        assert (got["hops"], got["from"]) == (1, a_id), got
    assert status(b)["outbox"] == 0  # B's only peer is the sender


def test_relays_refused_with_unknown_server_wait_in_the_outbox(launcher, alice, bob):
    "A peer that does not (yet) list us answers 403 unknown_server: a refusal for now, retried, never dropped."
    nodes = launcher.line("AB")
    a, b = nodes["A"], nodes["B"]
    b_alone = MeshProcess(b.data_dir, "B", b.port, [])  # B forgot to list A
    launcher.start(a, b_alone)

    posted = []
    for i in range(3):
        packet, pid = fresh_packet(alice, bob, f"to a node that does not know me #{i}")
        assert post_message(a, packet)["stored"] is True
        posted.append(pid)
    # each relay tried at least twice (3 first tries, then retries), so a refusal did not drop any
    wait_until(lambda: len([line for line in b_alone.stderr().splitlines() if " POST /relay 403 " in line]) >= 6,
               "A to retry its refused relays")
    assert status(a)["outbox"] == 3
    assert status(b_alone)["stored_messages"] == 0

    assert b_alone.stop() == 0
    launcher.start(b)  # now B lists A: the waiting relays go through
    wait_until(lambda: status(a)["outbox"] == 0, "A's outbox to drain once B knows A")
    assert sorted(mailbox_ids(b, bob)) == sorted(posted)


# ------------------------------------------------- 5. in process, sans IO: expiry, retries, the window

DAY = timedelta(days=1)
START = datetime(2024, 6, 15, 12, 0, 0, tzinfo=timezone.utc)
A_URL, B_URL, C_URL = "http://a.invalid", "http://b.invalid", "http://c.invalid"


@pytest.fixture
def pair(tmp_path):
    "A (peer: B) and B (peers: A and C, C never answers), each on its own manual clock; B has pinned A."
    clock_a, clock_b = ManualClock(START), ManualClock(START)
    a = mesh_node(tmp_path / "a", clock_a, (B_URL,), A_URL)
    b = mesh_node(tmp_path / "b", clock_b, (A_URL, C_URL), B_URL)
    pin(b, A_URL, a)
    yield a, b, clock_a, clock_b
    a.close()
    b.close()


def retrieve_ids(node, who: Identity) -> list[str]:
    "`who`'s mailbox at `node`, asked with a fresh hardened proof (bound to the node, at the node's time)."
    reply = ask(node, "GET /messages", make_retrieval_proof(who, server_id=node.id, clock=node.clock).to_dict())
    assert reply.status == 200, reply
    return [m["packet_id"] for m in reply.body["messages"]]


def node_trace(node, packet_id: str):
    reply = ask(node, f"GET /trace/{packet_id}", token=node.operator_token)
    return reply.body if reply.status == 200 else None


def outbox(node) -> int:
    return node.roles["broadcast"].outbox_size()


def test_relayed_copy_expires_with_the_original(pair, alice, bob):
    a, b, clock_a, clock_b = pair
    packet, pid = fresh_packet(alice, bob, "sent on day 0")
    answer = ask(a, "POST /messages", packet)
    assert answer.body["stored"] is True and answer.body["packet_id"] == pid
    assert parse_timestamp(answer.body["expires_at"]) == START + 7 * DAY
    first, = calls(answer.actions, "/relay")
    assert first.url == f"{B_URL}/relay" and first.body["hops"] == 1

    # B is unreachable for six days: the relay waits in A's outbox and is tried again when its timer fires
    retry = timers(a.on_answer(first.tag, None, None))
    assert retry == [After(MeshConfig().retry_base, ("broadcast", "wake", B_URL))]
    clock_a.advance(6 * DAY)
    clock_b.advance(6 * DAY)
    again, = calls(a.on_timer(retry[0].tag), "/relay")
    body = again.body
    assert parse_timestamp(body["expires_at"]) == START + 7 * DAY and body["hops"] == 1
    assert parse_timestamp(body["sent_at"]) == START + 6 * DAY, "signed afresh when sent"
    relayed = ask(b, "POST /relay", body)
    assert relayed.status == 202 and relayed.body["stored"] is True
    assert parse_timestamp(relayed.body["expires_at"]) == START + 7 * DAY  # not day 13: the origin's expiry
    assert a.on_answer(again.tag, relayed.status, relayed.body) == []
    assert node_trace(b, pid)["hops"] == 1 and node_trace(b, pid)["from"] == a.id
    assert outbox(a) == 0 and outbox(b) == 1  # B queues it for C only
    onward, = calls(relayed.actions, "/relay")
    assert onward.url == f"{C_URL}/relay" and parse_timestamp(onward.body["expires_at"]) == START + 7 * DAY

    clock_a.now = clock_b.now = START + timedelta(days=6.9)
    assert retrieve_ids(a, bob) == [pid]
    assert retrieve_ids(b, bob) == [pid]
    wake = timers(b.on_answer(onward.tag, None, None))  # C does not answer either

    clock_a.now = clock_b.now = START + timedelta(days=7.01)
    assert retrieve_ids(a, bob) == []
    assert retrieve_ids(b, bob) == []
    assert calls(b.on_timer(wake[0].tag)) == []  # an expired packet is not sent on ...
    assert outbox(b) == 0  # ... and leaves the outbox


def test_relay_already_expired_is_not_stored(pair, alice, bob):
    a, b, clock_a, clock_b = pair
    for expires_at in (START - timedelta(minutes=1), START):  # in the past, and exactly now
        packet, pid = fresh_packet(alice, bob, f"expired at {expires_at}")
        body = sign_relay(a.identity, packet, pid, expires_at, 1, START)  # signed now: a relay signed long ago is refused as stale (§15)
        answer = ask(b, "POST /relay", body)
        assert answer.status == 202 and answer.body["stored"] is False and answer.body["packet_id"] == pid
        assert answer.actions == ()
        assert not b.mailbox.contains(pid)
        assert node_trace(b, pid) is None
        assert outbox(b) == 0
    assert b.mailbox.count() == 0
    assert retrieve_ids(b, bob) == []


def test_retries_back_off_up_to_retry_max_and_a_refusal_for_now_waits(tmp_path, alice, bob):
    clock = ManualClock(START)
    a = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL, retry_base=timedelta(seconds=1),
                  retry_max=timedelta(seconds=10))
    try:
        packet, pid = fresh_packet(alice, bob, "to a peer that is down")
        call, = calls(ask(a, "POST /messages", packet).actions)
        waits = []
        for failure in [(None, None), (503, None), (403, {"error": "unknown_server", "detail": "who?"})] * 2:
            wake, = timers(a.on_answer(call.tag, *failure))
            waits.append(wake.delay.total_seconds())
            clock.advance(wake.delay)
            call, = calls(a.on_timer(wake.tag))
        assert waits == [1, 2, 4, 8, 10, 10], "doubling from retry_base, capped at retry_max"
        assert outbox(a) == 1, "no answer, a 5xx and 403 unknown_server are 'not yet': the relay waits"
        assert a.on_answer(call.tag, 400, {"error": "invalid_packet", "detail": "no"}) == []
        assert outbox(a) == 0, "any other refusal is final: the peer declined it"
    finally:
        a.close()


def test_relays_in_flight_to_one_peer_are_bounded_by_the_window(tmp_path, alice, bob):
    clock = ManualClock(START)
    a = mesh_node(tmp_path / "a", clock, (B_URL,), A_URL, relay_window=3)
    try:
        sent = []
        for i in range(5):
            packet, _ = fresh_packet(alice, bob, f"#{i}")
            sent += calls(ask(a, "POST /messages", packet).actions)
        assert len(sent) == 3 and outbox(a) == 5, "three in flight, two waiting in the outbox"
        delivered = a.on_answer(sent[0].tag, 202, {})
        assert len(calls(delivered)) == 1 and outbox(a) == 4, "an answer frees a place: the next relay goes"
        assert a.on_answer(sent[0].tag, 202, {}) == [], "a second answer to the same relay is ignored"
    finally:
        a.close()


def test_relay_outcomes_are_events(pair, alice, bob):
    "What the ledger (notebook 09) learns from the broadcast: RelayReceived and RelaySent."
    a, b, clock_a, clock_b = pair
    seen = []
    for node in (a, b):
        node.on(RelayReceived, lambda e, n=node.config.name: seen.append((n, "received", e.outcome)) or [])
        node.on(RelaySent, lambda e, n=node.config.name: seen.append((n, "sent", e.outcome)) or [])
    pin(a, B_URL, b)
    packet, pid = fresh_packet(alice, bob, "events")
    call, = calls(ask(a, "POST /messages", packet).actions)
    carry(a, call, {B_URL: b})
    too_far = sign_relay(a.identity, packet, pid, START + DAY, HOP_LIMIT + 1, START)
    assert ask(b, "POST /relay", too_far).status == 400
    assert seen == [("b", "received", "accepted"), ("a", "sent", "delivered"), ("b", "received", "refused")]


# ---------------------------------------- 6. canonical bytes and signatures

def test_canonical_bytes_ignore_signature_and_key_order(mallory):
    now = datetime(2024, 6, 15, 12, 0, 0, tzinfo=timezone.utc)
    body = sign_relay(mallory, {"recipient": "r", "message": "m", "signature": "s"}, "ab" * 32, now + 7 * DAY, 3,
                      now)
    items = list(body.items())
    random.Random(7).shuffle(items)
    shuffled = dict(items)
    assert list(shuffled) != list(body)
    assert canonical_bytes(shuffled) == canonical_bytes(body)
    assert canonical_bytes(dict(reversed(items))) == canonical_bytes(body)
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    assert canonical_bytes(unsigned) == canonical_bytes(body)
    assert canonical_bytes({**body, "signature": "something else"}) == canonical_bytes(body)
    expected = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_bytes(body) == expected
    assert b"signature\":\"s\"" in canonical_bytes(body)  # the packet's own `signature` field is covered
    assert b" " not in canonical_bytes(body) and canonical_bytes(body).startswith(b'{"expires_at":')
    assert canonical_bytes({"b": "é", "a": 1}) == '{"a":1,"b":"é"}'.encode("utf-8")
    assert canonical_bytes({**body, "hops": 4}) != canonical_bytes(body)


def test_sign_relay_verifies_with_the_server_key(alice, mallory):
    now = datetime(2024, 6, 15, 12, 0, 0, tzinfo=timezone.utc)
    packet = {"recipient": "r", "message": "m", "signature": "s"}
    body = sign_relay(mallory, packet, "cd" * 32, now + 7 * DAY, 2, now)
    assert body["type"] == "relay" and body["sender_id"] == mallory.id and body["hops"] == 2
    assert body["packet"] == packet and body["packet_id"] == "cd" * 32
    assert body["expires_at"] == "2024-06-22T12:00:00Z" and body["sent_at"] == "2024-06-15T12:00:00Z"
    signature = base64.b64decode(body["signature"], validate=True)
    assert mallory.public.verify(signature, canonical_bytes(body))
    assert not alice.public.verify(signature, canonical_bytes(body))  # another server's key
    assert not mallory.public.verify(signature, canonical_bytes({**body, "hops": 3}))
    assert not mallory.public.verify(signature, canonical_bytes({**body, "sender_id": alice.id}))


def test_verify_body_is_the_checking_side_of_sign_body(alice, mallory):
    body = sign_body(alice, {"type": "x", "n": 1, "text": "é"})
    assert verify_body(alice.public, body) and verify_body(alice.public, dict(reversed(list(body.items()))))
    assert not verify_body(mallory.public, body)
    assert not verify_body(alice.public, {**body, "n": 2})
    for broken in ({k: v for k, v in body.items() if k != "signature"}, {**body, "signature": "not base64!"},
                   {**body, "signature": None}):
        assert verify_body(alice.public, broken) is False
