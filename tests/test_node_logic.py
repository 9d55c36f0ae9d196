"""The node's logic in process, sans IO: `Node` and `Mailbox` on a ManualClock, no sockets, no wall clock."""
from __future__ import annotations

import json
import stat
from datetime import timedelta

import pytest

from bubble_ref import __version__
from bubble_ref.envelope import PHRASE, PROOF_WINDOW, make_retrieval_proof, open_message, packet_id, seal
from bubble_ref.node import LoadMeter, Node, NodeConfig, NodeError
from bubble_ref.packets import MAX_PACKET_BYTES, ClientMessagePacket, format_timestamp
from bubble_ref.store import MAX_PAGE_SIZE, RETENTION, ManualClock, Mailbox, StoreError

R1, R2, NOBODY = "01" * 32, "02" * 32, "00" * 32  # recipient ids: 64 hex characters, as the store requires

DAY = timedelta(days=1)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def node(tmp_path, clock):
    node = Node.open(tmp_path / "node", clock=clock, config=NodeConfig(name="logic node"))
    yield node
    node.close()


@pytest.fixture
def hardened(tmp_path, clock):
    node = Node.open(tmp_path / "hardened", clock=clock, config=NodeConfig(proof_mode="hardened"))
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
    return json.dumps({**make_retrieval_proof(identity).to_dict(), **changes})


def raises_node_error(status: int, code: str, phrase: str = ""):
    "Context manager: the block raises NodeError(status, code) with `phrase` in its detail."
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(NodeError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            error = self.info.value
            assert (error.status, error.code) == (status, code), error
            assert phrase in error.detail, error.detail
            assert error.to_dict() == {"error": code, "detail": error.detail}
            return handled
    return Check()


# ------------------------------------------------------------------ 1. expiry through the node

def test_message_lives_seven_days_then_is_swept(node, clock, to_bob, bob):
    answer = node.submit(to_bob.to_json())
    assert answer == {"packet_id": packet_id(to_bob), "stored": True,
                      "expires_at": format_timestamp(clock() + RETENTION)}

    clock.advance(6 * DAY)
    page = node.retrieve(spec_proof(bob))
    assert [m["packet_id"] for m in page["messages"]] == [answer["packet_id"]]
    assert page["messages"][0]["received_at"] == format_timestamp(clock() - 6 * DAY)
    assert open_message(bob, page["messages"][0]["packet"]).content == "expires in a week"

    clock.advance(2 * DAY)  # day 8
    assert node.retrieve(spec_proof(bob))["messages"] == []
    assert node.mailbox.count() == 1, "hidden, but still on disk until a sweep"

    assert node.tick() == 1  # more than the sweep interval has passed since the node opened
    assert node.mailbox.count() == 0
    assert not node.mailbox.contains(answer["packet_id"])
    assert node.tick() == 0, "the next sweep waits for the interval"


def test_tick_runs_once_per_interval(tmp_path, clock, to_bob):
    node = Node.open(tmp_path, clock=clock, config=NodeConfig(sweep_interval=timedelta(minutes=10)))
    try:
        node.submit(to_bob.to_json())
        clock.advance(RETENTION + timedelta(minutes=9))  # expired, and 7 days since the last sweep
        assert node.tick() == 1
        node.mailbox.store("f" * 64, "ee" * 32, "{}", expires_at=clock() + timedelta(minutes=1))
        clock.advance(timedelta(minutes=5))  # expired, but only 5 minutes since the last sweep
        assert node.tick() == 0 and node.mailbox.count() == 1
        clock.advance(timedelta(minutes=5))
        assert node.tick() == 1 and node.mailbox.count() == 0
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
    assert mailbox.sweep() == 1
    assert mailbox.count() == 1 and mailbox.contains("b" * 64)


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
    first = Node.open(data, clock=clock)
    first.close()
    key_file = data / "server_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    pem = key_file.read_bytes()
    second = Node.open(data, clock=clock)
    try:
        assert second.id == first.id
        assert key_file.read_bytes() == pem
        assert sorted(p.name for p in data.iterdir() if not p.name.startswith("mailbox.sqlite3")) == ["server_key.pem"]
    finally:
        second.close()


def test_status_fields(node, clock, to_bob):
    node.submit(to_bob.to_json())
    status = node.status()
    assert status["name"] == "logic node"
    assert status["server_id"] == node.id == node.identity.id
    assert status["public_key"] == node.identity.public.b64
    assert status["version"] == __version__
    assert status["proof_mode"] == "spec"
    assert status["stored_messages"] == 1
    assert status["time"] == format_timestamp(clock())
    assert isinstance(status["load"], float)
    assert status["load"] == round(2 / 60, 3), "the submit and this status call, over 60 s"
    assert "60 s" in status["load_measure"]


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
        node.submit(to_bob.to_json())
    node.retrieve(spec_proof(bob))
    with pytest.raises(NodeError):
        node.submit("{")  # refused requests are load too
    assert node.load.per_second() == round(5 / 60, 3)
    clock.advance(timedelta(seconds=61))
    assert node.load.per_second() == 0
    assert node.status()["load"] == round(1 / 60, 3), "only the status request itself"


# ------------------------------------------------------------------ 3. hardened proofs

def test_hardened_proof_works_once(hardened, clock, alice, bob):
    hardened.submit(seal(alice, bob.public.b64, "hardened").to_json())
    proof = make_retrieval_proof(bob, server_id=hardened.id, clock=clock).to_json()
    assert len(hardened.retrieve(proof)["messages"]) == 1
    with raises_node_error(401, "proof_replayed", "already used"):
        hardened.retrieve(proof)
    clock.advance(timedelta(seconds=1))
    fresh = make_retrieval_proof(bob, server_id=hardened.id, clock=clock).to_json()
    assert len(hardened.retrieve(fresh)["messages"]) == 1


def test_hardened_proof_expires(hardened, clock, bob):
    proof = make_retrieval_proof(bob, server_id=hardened.id, clock=clock).to_json()
    clock.advance(timedelta(minutes=10))
    with raises_node_error(401, "proof_expired", "window"):
        hardened.retrieve(proof)
    future = make_retrieval_proof(bob, server_id=hardened.id,
                                  clock=lambda: clock() + PROOF_WINDOW + timedelta(seconds=1)).to_json()
    with raises_node_error(401, "proof_expired"):
        hardened.retrieve(future)
    at_edge = make_retrieval_proof(bob, server_id=hardened.id, clock=lambda: clock() - PROOF_WINDOW).to_json()
    assert hardened.retrieve(at_edge)["messages"] == []


def test_hardened_node_refuses_spec_and_foreign_proofs(hardened, clock, bob, mallory):
    with raises_node_error(401, "bad_proof", "timestamp"):
        hardened.retrieve(spec_proof(bob))
    with raises_node_error(401, "bad_proof", "wrong server"):
        hardened.retrieve(make_retrieval_proof(bob, server_id="0" * 64, clock=clock).to_json())
    stolen = make_retrieval_proof(mallory, server_id=hardened.id, clock=clock).to_dict()
    with raises_node_error(401, "bad_proof"):
        hardened.retrieve(json.dumps({**stolen, "public_key": bob.public.b64}))


def test_node_config_refuses_unknown_proof_mode():
    with pytest.raises(ValueError, match="proof_mode"):
        NodeConfig(proof_mode="lenient")


# ------------------------------------------------------------------ 4. NodeError for bad input

@pytest.mark.parametrize("body, status, code, phrase", [
    ("{", 400, "invalid_packet", "invalid JSON"),
    (b"\xff", 400, "invalid_packet", "not UTF-8"),
    ("[]", 400, "invalid_packet", "expected object"),
    ('{"recipient": "x"}', 400, "invalid_packet", "missing field"),
    ("x" * (MAX_PACKET_BYTES + 1), 413, "too_large", str(MAX_PACKET_BYTES)),
])
def test_submit_refuses(node, body, status, code, phrase):
    with raises_node_error(status, code, phrase):
        node.submit(body)
    assert node.mailbox.count() == 0


def test_submit_refuses_a_broken_box(node, to_bob):
    broken = {**to_bob.to_dict(), "signature": to_bob.to_dict()["message"][:860]}
    with raises_node_error(400, "invalid_packet", "box is"):
        node.submit(json.dumps(broken))


def test_submit_dedups_the_same_packet_spelled_with_a_pem_recipient(node, to_bob, bob):
    first = node.submit(to_bob.to_json())
    pem = node.submit(json.dumps({**to_bob.to_dict(), "recipient": bob.public.pem}))
    assert pem["packet_id"] == first["packet_id"] and pem["stored"] is False
    stored = node.retrieve(spec_proof(bob))["messages"]
    assert [m["packet"]["recipient"] for m in stored] == [bob.public.b64], "stored in canonical form"


@pytest.mark.parametrize("make_body, status, code, phrase", [
    (lambda bob, mallory: "{", 400, "invalid_packet", "invalid JSON"),
    (lambda bob, mallory: json.dumps({"public_key": bob.public.b64}), 400, "invalid_packet", "signature"),
    (lambda bob, mallory: spec_proof(bob, cursor="abc"), 400, "invalid_packet", "cursor"),
    (lambda bob, mallory: spec_proof(bob, extra=1), 400, "invalid_packet", "unexpected field"),
    (lambda bob, mallory: spec_proof(bob, public_key=mallory.public.b64), 401, "bad_proof", PHRASE),
    (lambda bob, mallory: " " * (MAX_PACKET_BYTES + 1), 413, "too_large", "bytes"),
])
def test_retrieve_refuses(node, bob, mallory, make_body, status, code, phrase):
    with raises_node_error(status, code, phrase):
        node.retrieve(make_body(bob, mallory))


@pytest.mark.parametrize("bad_id", ["r1", "ab" * 31, "zz" * 32, ""])
def test_mailbox_refuses_ids_that_are_not_64_hex_characters(tmp_path, bad_id):
    mailbox = Mailbox(tmp_path / "m.sqlite3", clock=ManualClock())
    try:
        with pytest.raises(StoreError, match="is not an id"):
            mailbox.store(bad_id, R1, "{}")
        with pytest.raises(StoreError, match="is not an id"):
            mailbox.fetch(bad_id)
    finally:
        mailbox.close()
