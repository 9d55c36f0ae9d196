"""The node's logic in process, sans IO: `Node` with its `MailboxService` on a ManualClock, and `Mailbox`.

Every request is a `Request` given to `node.on_request`, every timer an `on_timer` call: no sockets, no threads,
no wall clock. What a driver would do with the returned actions is checked on the actions themselves.
"""
from __future__ import annotations

import json
import random
import sqlite3
import stat
from datetime import timedelta

import pytest

from bubble_ref import __version__
from bubble_ref.envelope import PHRASE, PROOF_WINDOW, make_retrieval_proof, open_message, packet_id, seal
from bubble_ref.node import (
    After, LoadMeter, MailboxService, Node, NodeConfig, NodeError, PacketStored, PacketStoring, Reply, Request, Route,
    Swept, coarse_load, open_relay_node)
from bubble_ref.packets import MAX_PACKET_BYTES, ClientMessagePacket, format_timestamp
from bubble_ref.store import MAX_PAGE_SIZE, RETENTION, SLOT, ManualClock, Mailbox, StoreError, to_millis

from inproc import ask, assert_refused

R1, R2, NOBODY = "01" * 32, "02" * 32, "00" * 32  # recipient ids: 64 hex characters, as the store requires

DAY = timedelta(days=1)
SWEEP = ("mailbox", "sweep")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def relay_node(path, clock, **config) -> Node:
    return open_relay_node(path, clock=clock, rng=random.Random(0), config=NodeConfig(**config))


@pytest.fixture
def node(tmp_path, clock):
    "A relay node as configured by default: hardened retrieval proofs."
    node = relay_node(tmp_path / "node", clock, name="logic node")
    yield node
    node.close()


@pytest.fixture
def spec(tmp_path, clock):
    "A node that also takes the seed's replayable proofs (`proof_mode='spec'`, only on request)."
    node = relay_node(tmp_path / "spec", clock, proof_mode="spec")
    yield node
    node.close()


@pytest.fixture
def mailbox(tmp_path, clock):
    box = Mailbox(tmp_path / "mailbox.sqlite3", clock=clock, page_size=2, max_packet_bytes=1000)
    yield box
    box.close()


@pytest.fixture(scope="module")
def to_bob(alice, bob) -> ClientMessagePacket:
    return seal(alice, bob.public.b64, "expires in a week")


def spec_proof(identity, **changes) -> str:
    "The seed's proof: the fixed phrase signed, replayable (only a spec node takes it)."
    return json.dumps({**make_retrieval_proof(identity).to_dict(), **changes})


def proof(node: Node, identity, **changes) -> str:
    "A fresh hardened proof: bound to `node` and its clock's now; a node accepts it once."
    return json.dumps({**make_retrieval_proof(identity, server_id=node.id, clock=node.clock).to_dict(), **changes})


def submit(node: Node, body) -> Reply:
    return ask(node, "POST /messages", body)


def retrieve(node: Node, body) -> Reply:
    return ask(node, "GET /messages", body)


def messages(node: Node, body) -> list[dict]:
    reply = retrieve(node, body)
    assert reply.status == 200, reply
    return reply.body["messages"]


def sweeps(node: Node) -> list[int]:
    "Record how many packets each sweep batch removes (the Swept events)."
    removed: list[int] = []
    node.on(Swept, lambda event: removed.append(event.removed) or [])
    return removed


# ------------------------------------------------------------------ 1. expiry through the node

def test_message_lives_seven_days_then_is_swept(node, clock, to_bob, bob):
    removed = sweeps(node)
    reply = submit(node, to_bob.to_json())
    assert reply.status == 202 and reply.actions == ()  # a relay-only node has nobody to tell
    answer = reply.body
    assert answer == {"packet_id": packet_id(to_bob), "stored": True,
                      "expires_at": format_timestamp(clock() + RETENTION)}

    clock.advance(6 * DAY)
    page = messages(node, proof(node, bob))
    assert [m["packet_id"] for m in page] == [answer["packet_id"]]
    assert page[0]["received_at"] == format_timestamp(clock() - 6 * DAY)
    assert open_message(bob, page[0]["packet"]).content == "expires in a week"

    clock.advance(DAY)  # exactly seven days: expired
    assert messages(node, proof(node, bob)) == []
    assert node.mailbox.count() == 1, "hidden, but still on disk until its slot is over"
    assert node.on_timer(SWEEP) == [After(node.config.sweep_interval, SWEEP)], "nothing to drop yet: an interval on"
    assert removed == [0] and node.mailbox.contains(answer["packet_id"])

    clock.advance(SLOT)  # its expiry slot (SLOT wide) has certainly ended: the whole slot goes
    assert node.on_timer(SWEEP) == [After(timedelta(0), SWEEP)], "it dropped a slot: the next step at once"
    assert removed == [0, 1]
    assert node.mailbox.count() == 0
    assert not node.mailbox.contains(answer["packet_id"])
    assert node.on_timer(SWEEP) == [After(node.config.sweep_interval, SWEEP)] and removed == [0, 1, 0]


def test_the_first_sweep_is_an_interval_after_the_start(node):
    assert node.start() == [After(node.config.sweep_interval, SWEEP)]


def test_a_big_sweep_drops_one_slot_per_step_back_to_back(tmp_path, clock):
    "The node asks for its next sweep step at once while a step dropped a slot, else an interval later."
    node = relay_node(tmp_path / "n", clock, sweep_interval=timedelta(minutes=10))
    removed = sweeps(node)
    try:
        for i in range(5):  # three slots: 2 packets, 2 packets, 1 packet
            node.mailbox.store(f"{i:064x}", R1, "{}", expires_at=clock() + (i // 2) * SLOT + timedelta(minutes=1))
        node.mailbox.store("f" * 64, R1, "{}")  # lives on
        clock.advance(3 * SLOT + timedelta(minutes=1))  # every one of the three slots has ended
        nexts = [node.on_timer(SWEEP) for _ in range(4)]
        assert removed == [2, 2, 1, 0], "the oldest slot first, one slot per step"
        assert nexts == [[After(timedelta(0), SWEEP)]] * 3 + [[After(timedelta(minutes=10), SWEEP)]]
        assert node.mailbox.count() == 1 and node.mailbox.contains("f" * 64)
    finally:
        node.close()


# ------------------------------------------------------------------ 2. the mailbox

def test_store_is_idempotent(mailbox, clock):
    row, created = mailbox.store("a" * 64, R1, '{"n": 1}')
    assert created is True
    assert (row.packet_id, row.recipient_id, row.packet) == ("a" * 64, R1, '{"n": 1}')
    assert row.received_at == clock() and row.expires_at == clock() + RETENTION
    clock.advance(timedelta(hours=1))
    again, created = mailbox.store("a" * 64, R1, '{"n": 1}')
    assert created is False
    assert again == row, "the first copy is kept as it was (same cursor, same times)"
    assert mailbox.count() == 1
    assert mailbox.contains("a" * 64) and not mailbox.contains("b" * 64)


def test_cursor_paging(mailbox):
    for i in range(5):
        mailbox.store(f"{i:064x}", R1, f'{{"n": {i}}}')
        mailbox.store(f"{i + 100:064x}", R2, "{}")  # another recipient's rows are never shown
    seen, cursor, pages = [], None, []
    while True:
        page = mailbox.fetch(R1, after=cursor)
        pages.append((len(page.packets), page.more))
        seen += [p.packet for p in page.packets]
        assert all(p.recipient_id == R1 for p in page.packets)
        if not page.more:
            break
        cursor = page.next_cursor
    assert pages == [(2, True), (2, True), (1, False)]
    assert seen == [f'{{"n": {i}}}' for i in range(5)], "oldest first, each once"
    assert page.next_cursor == "5", "cursors count R1's own packets: R2's, stored in between, do not show"
    assert [p.cursor for p in mailbox.fetch(R2, limit=2).packets] == ["1", "2"]
    end = mailbox.fetch(R1, after=page.next_cursor)
    assert (end.packets, end.next_cursor, end.more) == ([], page.next_cursor, False), "the cursor stays put"
    assert mailbox.fetch(R1, limit=1).more is True
    assert mailbox.fetch(NOBODY) == mailbox.fetch(NOBODY, after="") and mailbox.fetch(NOBODY).next_cursor == "0"


@pytest.mark.parametrize("cursor", ["-1", "abc", "1\n", " 1", "1.0", "١", "9" * 19])
def test_bad_cursor_is_refused(mailbox, cursor):
    with pytest.raises(StoreError, match="cursor"):
        mailbox.fetch(R1, after=cursor)


@pytest.mark.parametrize("limit", [0, -1, 3])
def test_bad_limit_is_refused(mailbox, limit):
    with pytest.raises(StoreError, match="limit"):
        mailbox.fetch(R1, limit=limit)


def test_packet_over_the_limit_is_refused(mailbox):
    mailbox.store("a" * 64, R1, "x" * 1000)  # exactly the limit is fine
    with pytest.raises(StoreError, match="1001 bytes"):
        mailbox.store("b" * 64, R1, "x" * 1001)
    with pytest.raises(StoreError, match="1002 bytes"):
        mailbox.store("c" * 64, R1, "é" * 501)  # counted in UTF-8 bytes, not characters
    assert mailbox.count() == 1


@pytest.mark.parametrize("kwargs", [{"page_size": 0}, {"page_size": MAX_PAGE_SIZE + 1}, {"synchronous": "OFF"}])
def test_mailbox_refuses_bad_settings(tmp_path, clock, kwargs):
    with pytest.raises(ValueError):
        Mailbox(tmp_path / "m.sqlite3", clock=clock, **kwargs)


def test_expiry_is_capped_at_seven_days(mailbox, clock):
    row, _ = mailbox.store("a" * 64, R1, "{}", expires_at=clock() + timedelta(days=30))
    assert row.expires_at == clock() + RETENTION
    earlier, _ = mailbox.store("b" * 64, R1, "{}", expires_at=clock() + timedelta(hours=1))
    assert earlier.expires_at == clock() + timedelta(hours=1)


def test_fetch_hides_expired_rows_before_any_sweep(mailbox, clock):
    mailbox.store("a" * 64, R1, '{"short": true}', expires_at=clock() + timedelta(hours=1))
    mailbox.store("b" * 64, R1, '{"long": true}')
    clock.advance(timedelta(hours=1))  # exactly at expiry: gone
    assert [p.packet_id for p in mailbox.fetch(R1).packets] == ["b" * 64]
    assert mailbox.count() == 2
    assert mailbox.sweep() == 0, "its slot is not over yet: still on disk (hidden)"
    clock.advance(SLOT)
    assert mailbox.sweep() == 1
    assert mailbox.count() == 1 and mailbox.contains("b" * 64)


def test_sweep_step_drops_one_finished_slot_at_a_time(mailbox, clock):
    start = clock()
    for i in range(5):  # slot k holds the packets expiring k slots from now (the clock starts on a slot boundary)
        mailbox.store(f"{i:064x}", R1, "{}", expires_at=start + (i // 2) * SLOT + timedelta(minutes=1))
    assert mailbox.sweep_step() is None, "nothing has expired"
    clock.advance(SLOT + timedelta(minutes=1))  # the first slot is over, the second (expired at +SLOT+1min) is not
    assert [mailbox.sweep_step(), mailbox.sweep_step()] == [2, None]
    assert mailbox.count() == 3 and [p.packet_id for p in mailbox.fetch(R1).packets] == [f"{4:064x}"], \
        "the second slot's packets are hidden (expired), though still on disk"
    clock.advance(2 * SLOT)
    assert [mailbox.sweep_step(), mailbox.sweep_step(), mailbox.sweep_step()] == [2, 1, None]
    assert mailbox.count() == 0
    assert mailbox.connection().execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' "
                                        "AND name LIKE 'messages_%'").fetchone()[0] == 0, "the slots' tables are gone"


def test_mailbox_survives_reopening(tmp_path, clock):
    path = tmp_path / "m.sqlite3"
    first = Mailbox(path, clock=clock)
    first.store("a" * 64, R1, "{}")
    first.close()
    second = Mailbox(path, clock=clock)
    try:
        assert [p.packet_id for p in second.fetch(R1).packets] == ["a" * 64]
        assert second.store("a" * 64, R1, "{}")[1] is False
    finally:
        second.close()


def test_server_key_is_created_once(tmp_path, clock):
    data = tmp_path / "fresh"
    first = Node.open(data, clock=clock, rng=random.Random(0))
    first.close()
    key_file = data / "server_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    pem = key_file.read_bytes()

    def must_not_be_called():
        raise AssertionError("a node with a key file must not make a new key")

    second = Node.open(data, clock=clock, rng=random.Random(0), new_identity=must_not_be_called)
    try:
        assert second.id == first.id
        assert key_file.read_bytes() == pem
        assert sorted(p.name for p in data.iterdir() if not p.name.startswith("mailbox.sqlite3")) == [
            "operator_token", "server_key.pem"]
        token_file = data / "operator_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, "the operator's secret, like the key"
        assert token_file.read_text().strip() == second.operator_token == first.operator_token
        assert len(second.operator_token) == 64 and int(second.operator_token, 16) >= 0
    finally:
        second.close()


def test_the_key_factory_is_injected(tmp_path, clock, alice):
    "Sans IO: the node makes its first key with the factory it is given (tests and the simulator use fixed keys)."
    node = Node.open(tmp_path / "given", clock=clock, rng=random.Random(0), new_identity=lambda: alice)
    try:
        assert node.id == alice.id and node.new_identity() is alice
    finally:
        node.close()


def test_status_fields(node, clock, to_bob):
    submit(node, to_bob.to_json())
    reply = ask(node, "GET /status")
    assert reply.status == 200 and reply.actions == ()
    status = reply.body
    assert status["name"] == "logic node"
    assert status["server_id"] == node.id == node.identity.id
    assert status["public_key"] == node.identity.public.b64
    assert status["version"] == __version__
    assert status["proof_mode"] == "hardened", "the default"
    assert "stored_messages" not in status, "what moves with each packet is for the operator only"
    assert status["time"] == format_timestamp(clock())
    assert isinstance(status["load"], float)
    assert status["load"] == 0.0, "2 requests over 60 s, rounded to a tenth: one request more or less does not show"
    assert "60 s" in status["load_measure"] and "rounded" in status["load_measure"]
    operator = ask(node, "GET /status", token=node.operator_token).body
    assert operator["stored_messages"] == 1
    assert abs(operator["load"] - 3 / 60) < 1e-9, "the submit and two status calls, over 60 s, exactly"
    assert ask(node, "GET /status", token="not the token").body.keys() == status.keys()


def test_load_meter_sliding_window(clock):
    meter = LoadMeter(clock, timedelta(seconds=60))
    assert meter.per_second() == 0
    for _ in range(30):
        meter.record()
    assert meter.per_second() == 0.5
    clock.advance(timedelta(seconds=30))
    for _ in range(30):
        meter.record()
    assert meter.per_second() == 1.0
    clock.advance(timedelta(seconds=30))  # the first 30 are exactly 60 s old: out of the window
    assert meter.per_second() == 0.5
    clock.advance(timedelta(seconds=31))
    assert meter.per_second() == 0


def test_node_load_counts_every_request(node, clock, to_bob, bob):
    for _ in range(3):
        submit(node, to_bob.to_json())
    retrieve(node, proof(node, bob))
    assert submit(node, "{").status == 400  # refused requests are load too ...
    assert node.on_request(Request("DELETE /messages")).status == 404  # ... and so are requests for no endpoint
    assert node.load.per_second() == round(6 / 60, 3)
    clock.advance(timedelta(seconds=61))
    assert node.load.per_second() == 0
    assert ask(node, "GET /status", token=node.operator_token).body["load"] == round(1 / 60, 3), \
        "the operator sees the exact load: only this status request"


def test_the_public_load_is_coarse_and_refreshed_at_most_every_load_refresh(node, clock):
    "Timing privacy: the public load hides single requests and moves at most once per `load_refresh` (10 s)."
    assert coarse_load(0.017) == 0.0 and coarse_load(2.345) == 2.3 and coarse_load(123.4) == 120.0
    assert ask(node, "GET /status").body["load"] == 0.0
    for _ in range(150):  # 2.5 requests per second over the 60 s window
        node.on_request(Request("GET /nothing-here"))
    assert ask(node, "GET /status").body["load"] == 0.0, "still the value published less than 10 s ago"
    clock.advance(node.config.load_refresh - timedelta(seconds=1))
    assert ask(node, "GET /status").body["load"] == 0.0
    clock.advance(timedelta(seconds=1))
    # 4 status requests (this one included) and the 150 others, all in the 60 s window
    assert ask(node, "GET /status").body["load"] == coarse_load(154 / 60) == 2.6, "refreshed, rounded to a tenth"
    assert ask(node, "GET /status", token=node.operator_token).body["load"] == round(155 / 60, 3)


# ------------------------------------------------------------------ 3. hardened proofs

def test_hardened_proof_works_once_even_across_a_restart(node, tmp_path, clock, alice, bob):
    assert submit(node, seal(alice, bob.public.b64, "hardened").to_json()).status == 202
    used = proof(node, bob)
    assert len(messages(node, used)) == 1
    assert_refused(retrieve(node, used), 401, "proof_replayed", "already used")
    assert len(messages(node, proof(node, bob))) == 1, "a fresh proof, even in the same second (PSS is randomised)"
    assert node.db.execute("SELECT count(*) FROM proofs_seen").fetchone()[0] == 2
    node.close()
    again = relay_node(tmp_path / "node", clock)  # the replay cache is a table of the node's database
    try:
        assert_refused(retrieve(again, used), 401, "proof_replayed", "already used")
        assert len(messages(again, proof(again, bob))) == 1
    finally:
        again.close()


def test_hardened_proof_expires(node, clock, bob):
    stale = make_retrieval_proof(bob, server_id=node.id, clock=clock).to_json()
    clock.advance(timedelta(minutes=10))
    assert_refused(retrieve(node, stale), 401, "proof_expired", "window")
    future = make_retrieval_proof(bob, server_id=node.id,
                                  clock=lambda: clock() + PROOF_WINDOW + timedelta(seconds=1)).to_json()
    assert_refused(retrieve(node, future), 401, "proof_expired")
    at_edge = make_retrieval_proof(bob, server_id=node.id, clock=lambda: clock() - PROOF_WINDOW).to_json()
    assert messages(node, at_edge) == []


def test_hardened_node_refuses_spec_and_foreign_proofs(node, clock, bob, mallory):
    assert_refused(retrieve(node, spec_proof(bob)), 401, "bad_proof", "timestamp")
    assert_refused(retrieve(node, make_retrieval_proof(bob, server_id="0" * 64, clock=clock).to_json()),
                   401, "bad_proof", "wrong server")
    stolen = make_retrieval_proof(mallory, server_id=node.id, clock=clock).to_dict()
    assert_refused(retrieve(node, json.dumps({**stolen, "public_key": bob.public.b64})), 401, "bad_proof")


def test_a_spec_node_takes_the_seeds_phrase_again_and_again_and_a_bound_proof_once(spec, alice, bob):
    "The seed's proof can be replayed by anyone who saw it: that is why it is only on request (notebook 03)."
    assert ask(spec, "GET /status").body["proof_mode"] == "spec"
    assert submit(spec, seal(alice, bob.public.b64, "spec").to_json()).status == 202
    seed = spec_proof(bob)
    assert len(messages(spec, seed)) == 1 and len(messages(spec, seed)) == 1, "the same proof twice: both accepted"
    bound = proof(spec, bob)
    assert len(messages(spec, bound)) == 1
    assert_refused(retrieve(spec, bound), 401, "proof_replayed")  # a bound proof is checked as hardened, even here


def test_node_config_refuses_unknown_proof_mode():
    with pytest.raises(ValueError, match="proof_mode"):
        NodeConfig(proof_mode="lenient")


# ------------------------------------------------------------------ 4. JSON errors for bad input

@pytest.mark.parametrize("body, status, code, phrase", [
    ("{", 400, "invalid_packet", "invalid JSON"),
    (b"\xff", 400, "invalid_packet", "not UTF-8"),
    ("[]", 400, "invalid_packet", "expected object"),
    ('{"recipient": "x"}', 400, "invalid_packet", "missing field"),
    ("x" * (MAX_PACKET_BYTES + 1), 413, "too_large", str(MAX_PACKET_BYTES)),
])
def test_submit_refuses(node, body, status, code, phrase):
    assert_refused(submit(node, body), status, code, phrase)
    assert node.mailbox.count() == 0


def test_submit_refuses_a_broken_box(node, to_bob):
    broken = {**to_bob.to_dict(), "signature": to_bob.to_dict()["message"][:860]}
    assert_refused(submit(node, json.dumps(broken)), 400, "invalid_packet", "box is")


def test_submit_dedups_the_same_packet_spelled_with_a_pem_recipient(node, to_bob, bob):
    first = submit(node, to_bob.to_json()).body
    pem = submit(node, json.dumps({**to_bob.to_dict(), "recipient": bob.public.pem})).body
    assert pem["packet_id"] == first["packet_id"] and pem["stored"] is False
    stored = messages(node, proof(node, bob))
    assert [m["packet"]["recipient"] for m in stored] == [bob.public.b64], "stored in canonical form"


@pytest.mark.parametrize("make_body, status, code, phrase", [
    (lambda node, bob, mallory: "{", 400, "invalid_packet", "invalid JSON"),
    (lambda node, bob, mallory: json.dumps({"public_key": bob.public.b64}), 400, "invalid_packet", "signature"),
    (lambda node, bob, mallory: proof(node, bob, cursor="abc"), 400, "invalid_packet", "cursor"),
    (lambda node, bob, mallory: proof(node, bob, extra=1), 400, "invalid_packet", "unexpected field"),
    (lambda node, bob, mallory: proof(node, bob, public_key=mallory.public.b64), 401, "bad_proof", "signature"),
    (lambda node, bob, mallory: proof(node, bob, timestamp="2024-06-15T12:00:01Z"), 401, "bad_proof", "signature"),
    (lambda node, bob, mallory: " " * (MAX_PACKET_BYTES + 1), 413, "too_large", "bytes"),
])
def test_retrieve_refuses(node, bob, mallory, make_body, status, code, phrase):
    assert_refused(retrieve(node, make_body(node, bob, mallory)), status, code, phrase)


@pytest.mark.parametrize("make_body, status, code, phrase", [
    (lambda bob, mallory: spec_proof(bob, cursor="abc"), 400, "invalid_packet", "cursor"),
    (lambda bob, mallory: spec_proof(bob, public_key=mallory.public.b64), 401, "bad_proof", PHRASE),
])
def test_a_spec_node_refuses_bad_seed_proofs(spec, bob, mallory, make_body, status, code, phrase):
    assert_refused(retrieve(spec, make_body(bob, mallory)), status, code, phrase)


@pytest.mark.parametrize("holding", [0, 1], ids=["empty", "holding-a-packet"])
@pytest.mark.parametrize("bad_id", ["r1", "ab" * 31, "zz" * 32, ""])
def test_mailbox_refuses_ids_that_are_not_64_hex_characters(tmp_path, bad_id, holding):
    "Whatever the mailbox holds: a malformed id is a StoreError, never a silent answer."
    mailbox = Mailbox(tmp_path / "m.sqlite3", clock=ManualClock())
    try:
        for i in range(holding):
            mailbox.store(f"{i:064x}", R1, "{}")
        with pytest.raises(StoreError, match="is not an id"):
            mailbox.store(bad_id, R1, "{}")
        with pytest.raises(StoreError, match="is not an id"):
            mailbox.store("f" * 64, bad_id, "{}")
        with pytest.raises(StoreError, match="is not an id"):
            mailbox.fetch(bad_id)
        assert mailbox.count() == holding
    finally:
        mailbox.close()


OLD_SCHEMA = """
CREATE TABLE messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    packet_id    BLOB    NOT NULL UNIQUE,
    recipient_id BLOB    NOT NULL,
    packet       TEXT    NOT NULL,
    received_at  INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX messages_by_recipient ON messages (recipient_id, seq);
CREATE INDEX messages_by_expiry ON messages (expires_at);
"""  # the mailbox before expiry slots: one table, one sequence for every recipient


def test_an_old_single_table_mailbox_is_migrated_and_its_cursors_stay_valid(tmp_path, clock):
    path, now = tmp_path / "old.sqlite3", clock()
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    rows = [(1, "a", R1, now + timedelta(hours=1)), (2, "b", R2, now + RETENTION), (3, "c", R1, now + RETENTION),
            (4, "d", R1, now + RETENTION)]
    old.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                    [(seq, bytes.fromhex(c * 64), bytes.fromhex(r), f'{{"n": {seq}}}', to_millis(now), to_millis(e))
                     for seq, c, r, e in rows])
    old.commit()
    old.close()
    for _ in range(2):  # the second opening finds nothing left to migrate
        box = Mailbox(path, clock=clock)
        try:
            tables = {name for (name,) in box.connection().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "messages" not in tables and len([t for t in tables if t.startswith("messages_")]) == 2, tables
            assert box.count() == 4
            assert [(p.cursor, p.packet) for p in box.fetch(R1).packets] == [("1", '{"n": 1}'), ("3", '{"n": 3}'),
                                                                              ("4", '{"n": 4}')]
            assert [p.packet_id for p in box.fetch(R1, after="1").packets] == ["c" * 64, "d" * 64], \
                "a cursor a client got before the migration still means the same place"
            assert [p.packet_id for p in box.fetch(R2).packets] == ["b" * 64]
        finally:
            box.close()
    box = Mailbox(path, clock=clock)
    try:
        new_r1, _ = box.store("e" * 64, R1, "{}")
        new_r2, _ = box.store("f" * 64, R2, "{}")
        assert (new_r1.cursor, new_r2.cursor) == ("5", "3"), "each recipient's sequence goes on from its last packet"
        assert (new_r1.seq, new_r2.seq) == ("5", "6"), "and the node's own sequence from the old one"
    finally:
        box.close()


def test_node_error_is_the_json_error_of_a_reply():
    error = NodeError(403, "nope", "because")
    assert (error.status, error.code, error.detail) == (403, "nope", "because")
    assert error.to_dict() == {"error": "nope", "detail": "because"} and "403 nope: because" in str(error)


def test_an_unknown_route_is_a_404(node):
    assert_refused(node.on_request(Request("DELETE /messages")), 404, "not_found", "DELETE /messages")
    assert_refused(node.on_request(Request("GET /admin")), 404, "not_found")


# ------------------------------------------------------------------ 5. roles, routes and events

def test_a_relay_node_serves_the_client_api(node):
    assert sorted(route.name for route in node.routes()) == ["GET /messages", "GET /status", "POST /messages",
                                                             "POST /messages/retrieve"]
    assert isinstance(node.roles["mailbox"], MailboxService)
    assert {r.name: r.json_body for r in node.routes()} == {"POST /messages": True, "GET /messages": True,
                                                           "POST /messages/retrieve": True, "GET /status": False}


class Echo:
    "A role for the tests: POST /echo answers with its body; its timer and answers are recorded."
    name = "echo"

    def __init__(self, node, rule="/echo"):
        self.node, self.rule, self.seen = node, rule, []

    def routes(self):
        return [Route("POST", self.rule, lambda request: Reply(200, json.loads(request.body)), json_body=True)]

    def on_timer(self, tag):
        self.seen.append(("timer", tag))
        return [After(timedelta(seconds=1), tag)]

    def on_answer(self, tag, status, body):
        self.seen.append(("answer", tag, status, body))
        return []


def test_roles_add_routes_and_receive_their_own_timers_and_answers(node):
    echo = node.add(Echo(node))
    assert ask(node, "POST /echo", {"hello": "bubble"}).body == {"hello": "bubble"}
    assert node.on_timer(("echo", "tick")) == [After(timedelta(seconds=1), ("echo", "tick"))]
    assert node.on_answer(("echo", "call"), None, None) == []
    assert echo.seen == [("timer", ("echo", "tick")), ("answer", ("echo", "call"), None, None)]


def test_two_roles_may_not_share_a_name_or_a_route(node):
    node.add(Echo(node))
    with pytest.raises(ValueError, match="named 'echo'"):
        node.add(Echo(node, rule="/other"))
    other = Echo(node)
    other.name = "echo2"
    with pytest.raises(ValueError, match="POST /echo"):
        node.add(other)


def test_a_bug_in_a_handler_raises_instead_of_becoming_a_refusal(node):
    "Only NodeError is a refusal; any other exception is a bug the driver must see (a 500, a logged traceback)."
    class Broken:
        name = "broken"

        def routes(self):
            return [Route("GET", "/broken", lambda request: 1 / 0)]

    node.add(Broken())
    with pytest.raises(ZeroDivisionError):
        node.on_request(Request("GET /broken"))


def test_events_reach_their_listeners_in_order_with_their_actions(node, to_bob):
    storing, stored = [], []
    node.on(PacketStoring, lambda e: storing.append((e.row.packet_id, e.came_from, e.hops,
                                                     e.db is node.db and node.mailbox.count()))
            or [After(timedelta(seconds=1), ("a",))])
    node.on(PacketStored, lambda e: stored.append((e.row.packet_id, e.created)) or [After(timedelta(seconds=2), ("b",))])
    node.on(PacketStored, lambda e: [After(timedelta(seconds=3), ("c",))])
    first = submit(node, to_bob.to_json())
    pid = first.body["packet_id"]
    assert storing == [(pid, None, 0, 1)], "inside the transaction: the row is already there"
    assert first.actions == (After(timedelta(seconds=2), ("b",)), After(timedelta(seconds=3), ("c",))), \
        "the actions of PacketStored listeners, in the order they were added (a storing listener's are not kept)"
    again = submit(node, to_bob.to_json())
    assert storing == [(pid, None, 0, 1)], "PacketStoring is for new packets only"
    assert stored == [(pid, True), (pid, False)] and len(again.actions) == 2
