"""Calls (notebook 11b) without a mesh: call messages, the state machine on a manual clock (every legal move,
expiry, glare, replays, senders that are not the peer), the sealed transport of call messages, TURN REST
credentials and GET /turn-credentials, and aiortc media on loopback (a swapped DTLS fingerprint fails the call)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import re
import time
from datetime import datetime, timedelta, timezone

import pytest

from bubble_ref import calls
from bubble_ref.calls import (
    FINAL, LIVE, TRANSITIONS, ApplyAnswer, CallError, CallMachine, CallMessage, CallTimes, Changed, IllegalMove,
    MakeAnswer, MakeOffer, Send, StopMedia, read_call_message)
from bubble_ref.client import is_control_content
from bubble_ref.envelope import EnvelopeError, check_packet, make_retrieval_proof, open_message, seal
from bubble_ref.packets import format_timestamp
from bubble_ref.store import ManualClock

START = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
TIMES = CallTimes()


def stamp(clock, seconds: float) -> str:
    return format_timestamp(clock() + timedelta(seconds=seconds))


# ---------------------------------------------------------------------------------- messages

def test_call_messages_round_trip_and_are_control_content():
    for message in [CallMessage("invite", "a" * 32, "2030-01-01T12:00:30Z", "direct"),
                    CallMessage("offer", "b" * 32, "2030-01-01T12:00:30Z", sdp="v=0\r\n"),
                    CallMessage("end", "c" * 32, "2030-01-01T12:00:30Z", reason="hung up")]:
        content = message.to_content()
        assert read_call_message(content) == message
        assert is_control_content(content)
        assert json.loads(content)["kind"] == "bubble_ref/call" and json.loads(content)["v"] == 1


@pytest.mark.parametrize("content", ["Hello Bob", "", '{"kind": "something else"}', "[1, 2]",
                                     "not json but mentions bubble_ref/call", '{"kind":"bubble_ref/self-copy"}'])
def test_other_content_is_not_a_call_message(content):
    assert read_call_message(content) is None
    assert not is_control_content(content)  # so the chat shows it (a "self-copy" from someone else included)


@pytest.mark.parametrize("body, problem", [
    ({"v": 2}, "version 2"),
    ({"v": 1, "type": "ring", "call_id": "a" * 32, "expires": "2030-01-01T12:00:30Z"}, "type must be"),
    ({"v": 1, "type": "invite", "call_id": "A" * 32, "expires": "2030-01-01T12:00:30Z"}, "32 hex digits"),
    ({"v": 1, "type": "invite", "call_id": "a" * 32, "expires": "tomorrow"}, "ISO-8601"),
    ({"v": 1, "type": "offer", "call_id": "a" * 32, "expires": "2030-01-01T12:00:30Z"}, "carries SDP"),
    ({"v": 1, "type": "invite", "call_id": "a" * 32, "expires": "2030-01-01T12:00:30Z", "sdp": "v=0"}, "carries SDP"),
    ({"v": 1, "type": "offer", "call_id": "a" * 32, "expires": "2030-01-01T12:00:30Z", "sdp": "x" * 9000}, "at most"),
    ({"v": 1, "type": "end", "call_id": "a" * 32, "expires": "2030-01-01T12:00:30Z", "reason": 5}, "reason must"),
    ({"v": 1, "type": "end", "call_id": "a" * 32, "expires": "2030-01-01T12:00:30Z", "mode": "carrier pigeon"},
     "mode must"),
    ({"v": 1, "type": "end", "call_id": "a" * 32, "expires": "2030-01-01T12:00:30Z", "secret": 1}, "unknown fields"),
])
def test_malformed_call_messages_are_refused_with_a_reason(body, problem):
    with pytest.raises(CallError, match=problem):
        read_call_message(json.dumps({"kind": "bubble_ref/call", **body}))


# ------------------------------------------------------------- the machine: every legal move

class Pair:
    "Alice (the caller) and Bob (the callee) on one manual clock; Sends are queued until `flush`."

    def __init__(self, times: CallTimes = TIMES):
        self.clock = ManualClock(START)
        ids = iter(f"{n:032x}" for n in range(1, 10_000))
        self.m = {name: CallMachine(name, clock=self.clock, new_id=lambda: next(ids), times=times)
                  for name in ("A", "B")}
        self.queue: list[tuple[str, Send]] = []
        self.actions: dict[str, list] = {"A": [], "B": []}
        self.call_id = ""

    def act(self, who: str, actions: list) -> list:
        self.actions[who] += actions
        self.queue += [(who, a) for a in actions if isinstance(a, Send)]
        return actions

    def flush(self) -> None:
        while self.queue:
            sender, send = self.queue.pop(0)
            self.act(send.peer, self.m[send.peer].receive(sender, send.message))

    def state(self, who: str) -> str:
        return self.m[who].calls[self.call_id].state

    def to(self, role: str, state: str) -> str:
        "Bring the call to `state` for `role` (Alice is the caller, Bob the callee); returns who that is."
        a, b = self.m["A"], self.m["B"]
        self.act("A", a.place("B"))
        self.call_id = a.active().call_id
        if (role, state) == ("caller", "inviting"):
            return "A"
        self.flush()
        if (role, state) == ("callee", "ringing"):
            return "B"
        self.act("B", b.accept(self.call_id))
        if (role, state) == ("callee", "offering"):
            return "B"
        self.act("B", b.media_ready(self.call_id, "v=0 offer"))
        if (role, state) == ("callee", "awaiting_answer"):
            return "B"
        self.flush()
        if (role, state) == ("caller", "answering"):
            return "A"
        self.act("A", a.media_ready(self.call_id, "v=0 answer"))
        if (role, state) == ("caller", "connecting"):
            return "A"
        self.flush()
        if (role, state) == ("callee", "connecting"):
            return "B"
        self.act("A", a.media_connected(self.call_id))
        self.act("B", b.media_connected(self.call_id))
        assert state == "connected"
        return "A" if role == "caller" else "B"


def perform(pair: Pair, who: str, event: str) -> None:
    "Make `event` happen to `who`'s side of the call."
    machine, peer, call_id = pair.m[who], "B" if who == "A" else "A", pair.call_id
    message = lambda kind, **kw: CallMessage(kind, call_id, stamp(pair.clock, 10), **kw)
    local = {"hangup": machine.hangup, "reject": machine.reject, "accept": machine.accept}
    if event in local:
        pair.act(who, local[event](call_id))
    elif event in ("end", "busy", "decline"):
        pair.act(who, machine.receive(peer, message(event, reason="test")))
    elif event in ("offer", "answer"):
        pair.act(who, machine.receive(peer, message(event, sdp="v=0")))
    elif event in ("offer_ready", "answer_ready"):
        pair.act(who, machine.media_ready(call_id, "v=0"))
    elif event == "connected":
        pair.act(who, machine.media_connected(call_id))
    elif event == "media_failed":
        pair.act(who, machine.media_failed(call_id, "DTLS failed"))
    elif event == "timeout":
        pair.clock.advance(timedelta(minutes=5))
        pair.act(who, machine.tick())
    elif event == "elsewhere":
        pair.act(who, machine.receive_own(message("offer", sdp="v=0")))
    elif event == "glare_lost":  # the peer's invitation, with a larger call id, crosses ours
        pair.act(who, machine.receive(peer, CallMessage("invite", "f" * 32, stamp(pair.clock, 20))))
    else:
        raise AssertionError(f"no way to perform {event}")


MOVES = sorted(k for k in TRANSITIONS if k[1] != "new")


@pytest.mark.parametrize("role, state, event", MOVES, ids=["-".join(m) for m in MOVES])
def test_every_legal_move_leads_where_the_table_says(role, state, event):
    pair = Pair()
    who = pair.to(role, state)
    assert pair.state(who) == state
    perform(pair, who, event)
    assert pair.state(who) == TRANSITIONS[(role, state, event)]
    changed = [a for a in pair.actions[who] if isinstance(a, Changed) and a.call_id == pair.call_id]
    assert changed[-1].state == TRANSITIONS[(role, state, event)]
    if TRANSITIONS[(role, state, event)] in FINAL and state not in ("inviting", "ringing") and event != "end":
        # leaving a call whose media exists stops the media and tells the other side
        assert any(isinstance(a, StopMedia) for a in pair.actions[who])


def test_the_table_covers_every_live_state_and_the_first_moves():
    assert TRANSITIONS[("caller", "new", "place")] == "inviting"
    assert TRANSITIONS[("callee", "new", "invite")] == "ringing"
    for role, states in calls.LIVE_AS.items():
        for state in states:
            assert (role, state, "hangup") in TRANSITIONS and (role, state, "end") in TRANSITIONS
    assert set(TRANSITIONS.values()) <= set(LIVE) | set(FINAL)


def test_a_whole_call_and_the_actions_for_the_drivers():
    pair = Pair()
    pair.to("caller", "connected")
    a, b = pair.actions["A"], pair.actions["B"]
    assert [type(x).__name__ for x in a if not isinstance(x, Changed)] == ["Send", "MakeAnswer", "Send"]
    assert [type(x).__name__ for x in b if not isinstance(x, Changed)] == ["MakeOffer", "Send", "ApplyAnswer"]
    invite, offer, answer = (x.message for x in a + b if isinstance(x, Send))
    assert invite.type == "invite" and invite.sdp is None  # no SDP, no address before the callee accepts
    assert next(x for x in a if isinstance(x, MakeAnswer)).offer_sdp == "v=0 offer"
    assert next(x for x in b if isinstance(x, ApplyAnswer)).answer_sdp == "v=0 answer"


def test_local_actions_at_the_wrong_time_are_errors_with_a_name():
    pair = Pair()
    pair.to("caller", "inviting")
    with pytest.raises(IllegalMove, match="'accept' is not allowed for the caller in state 'inviting'"):
        pair.m["A"].accept(pair.call_id)
    with pytest.raises(CallError, match="already in a call"):
        pair.m["A"].place("C")
    with pytest.raises(CallError, match="mode"):
        pair.m["B"].place("A", mode="smoke signals")


def test_remote_messages_at_the_wrong_time_are_refused_not_raised():
    pair = Pair()
    pair.to("callee", "ringing")
    assert pair.m["B"].receive("A", CallMessage("answer", pair.call_id, stamp(pair.clock, 10), sdp="v=0")) == []
    assert pair.m["B"].refused[-1] == (pair.call_id, "unexpected answer in state ringing")
    assert pair.state("B") == "ringing"
    assert pair.m["B"].receive("A", CallMessage("end", "9" * 32, stamp(pair.clock, 10))) == []
    assert pair.m["B"].refused[-1][1] == "end for an unknown call"
    assert pair.m["B"].media_ready(pair.call_id, "v=0") == []  # not offering: nothing to send
    assert pair.m["B"].media_connected(pair.call_id) == []


def test_media_finished_after_a_hangup_is_stopped():
    pair = Pair()
    who = pair.to("callee", "offering")
    pair.act(who, pair.m[who].hangup(pair.call_id))
    assert pair.m[who].media_ready(pair.call_id, "v=0 late offer") == [StopMedia(pair.call_id)]


# ------------------------------------------------------------------------ expiry and replays

def test_an_unanswered_call_times_out_on_both_sides():
    pair = Pair()
    pair.to("callee", "ringing")
    pair.clock.advance(TIMES.ring - timedelta(seconds=1))
    assert pair.m["A"].tick() == [] and pair.m["B"].tick() == []
    pair.clock.advance(timedelta(seconds=1))
    pair.act("B", pair.m["B"].tick())
    assert pair.state("B") == "missed"
    pair.act("A", pair.m["A"].tick())
    assert pair.state("A") == "missed"
    assert pair.actions["A"][-1].message.type == "end"  # Alice's end stops Bob's ringing (if he did not time out)


def test_a_set_up_that_takes_too_long_fails_and_says_so():
    pair = Pair()
    who = pair.to("caller", "connecting")
    pair.clock.advance(TIMES.setup)
    actions = pair.act(who, pair.m[who].tick())
    assert pair.state(who) == "failed" and pair.m[who].calls[pair.call_id].reason == "set-up took too long"
    assert [type(x) for x in actions] == [Changed, Send, StopMedia] and actions[1].message.type == "end"


def test_ringing_lasts_no_longer_than_the_invitation():
    pair = Pair()
    machine = pair.m["B"]
    machine.receive("A", CallMessage("invite", "1" * 32, stamp(pair.clock, 5)))
    assert machine.calls["1" * 32].deadline == START + timedelta(seconds=5)


@pytest.mark.parametrize("seconds, why", [(-31, "stale invite"), (-3600 * 24, "stale invite"),
                                          (46 + 31, "too far in the future")])
def test_stale_and_far_future_invitations_are_refused(seconds, why):
    pair = Pair()
    assert pair.m["B"].receive("A", CallMessage("invite", "1" * 32, stamp(pair.clock, seconds))) == []
    assert why in pair.m["B"].refused[-1][1] and not pair.m["B"].calls


def test_a_replayed_invitation_is_refused_even_after_its_call_ended():
    pair = Pair()
    invite = CallMessage("invite", "1" * 32, stamp(pair.clock, 20))
    assert [a.state for a in pair.m["B"].receive("A", invite)] == ["ringing"]
    pair.m["B"].reject("1" * 32)
    assert pair.m["B"].receive("A", invite) == []
    assert pair.m["B"].refused[-1] == ("1" * 32, "replayed invite")
    assert pair.m["B"].receive("C", invite) == []  # from someone else: the same id is still refused


def test_remembered_invitations_are_bounded():
    pair = Pair(CallTimes(remember=3))
    machine = pair.m["B"]
    for n in range(5):
        machine.receive("A", CallMessage("invite", f"{n:032x}", stamp(pair.clock, 20)))
        machine.calls.clear()  # forget the calls themselves; only the replay memory is left
    assert len(machine.seen_invites) == 3 and f"{0:032x}" not in machine.seen_invites


def test_messages_about_a_call_must_come_from_its_peer():
    pair = Pair()
    pair.to("caller", "inviting")
    forged = CallMessage("offer", pair.call_id, stamp(pair.clock, 10), sdp="v=0 Mallory's fingerprint")
    assert pair.m["A"].receive("MALLORY", forged) == []
    assert pair.m["A"].refused[-1] == (pair.call_id, "offer not from this call's peer")
    assert pair.state("A") == "inviting"


def test_an_invitation_during_a_call_gets_busy():
    pair = Pair()
    pair.to("callee", "connected")
    actions = pair.m["B"].receive("C", CallMessage("invite", "e" * 32, stamp(pair.clock, 20)))
    assert [type(a) for a in actions] == [Send] and actions[0].peer == "C" and actions[0].message.type == "busy"
    assert pair.state("B") == "connected"


def test_another_device_answering_stops_the_ringing():
    pair = Pair()
    pair.to("callee", "ringing")
    own = pair.m["B"].receive_own(CallMessage("end", pair.call_id, stamp(pair.clock, 10)))
    assert own == [] and pair.state("B") == "ringing"  # only an offer or a decline from my other device counts
    pair.m["B"].receive_own(CallMessage("decline", pair.call_id, stamp(pair.clock, 10)))
    assert pair.state("B") == "ended" and pair.m["B"].calls[pair.call_id].reason == "declined on another device"


# ---------------------------------------------------------------------------------------- glare

@pytest.mark.parametrize("first", ["A", "B"])
def test_glare_keeps_the_larger_call_id_on_both_sides(first):
    pair = Pair()
    a, b = pair.m["A"], pair.m["B"]
    invites = {}
    for who, peer in ((first, "B" if first == "A" else "A"), ("B" if first == "A" else "A", first)):
        invites[who] = next(x for x in pair.m[who].place(peer) if isinstance(x, Send)).message
    winner = max(invites, key=lambda who: invites[who].call_id)
    loser = "A" if winner == "B" else "B"
    at_loser = pair.m[loser].receive(winner, invites[winner])  # the invitations cross
    at_winner = pair.m[winner].receive(loser, invites[loser])
    assert at_winner == [] and pair.m[winner].refused[-1][1] == "glare: our own invitation wins"
    assert pair.m[loser].calls[invites[loser].call_id].state == "superseded"
    assert any(isinstance(x, MakeOffer) for x in at_loser)  # the loser accepts the winner's call at once
    pair.call_id = invites[winner].call_id
    pair.act(loser, at_loser)
    pair.act(loser, pair.m[loser].media_ready(pair.call_id, "v=0 offer"))
    pair.flush()
    pair.act(winner, pair.m[winner].media_ready(pair.call_id, "v=0 answer"))
    pair.flush()
    for who in (winner, loser):
        pair.m[who].media_connected(pair.call_id)
    assert a.calls[pair.call_id].state == b.calls[pair.call_id].state == "connected"


# -------------------------------------------------------------- call messages travel sealed

def test_a_relay_cannot_alter_or_forge_call_signalling(alice, bob, mallory):
    answer = CallMessage("answer", "1" * 32, "2030-01-01T12:00:30Z",
                         sdp="v=0\r\na=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n")
    packet = seal(bob, alice.public, answer.to_content())
    opened = open_message(alice, packet)
    assert read_call_message(opened.content) == answer and opened.sender_id == bob.id
    # a relay flips bits in the sealed message (trying to swap the fingerprint): the recipient refuses it
    box = bytearray(check_packet(packet).message_box)
    box[-40] ^= 0xFF
    tampered = packet.to_dict() | {"message": base64.b64encode(bytes(box)).decode()}
    with pytest.raises(EnvelopeError):
        open_message(alice, tampered)
    # Mallory seals her own answer with her own fingerprint: it opens, but as Mallory's, and the machine refuses it
    forged = open_message(alice, seal(mallory, alice.public, answer.to_content()))
    machine = CallMachine(alice.public.b64, clock=lambda: datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc))
    machine.calls["1" * 32] = calls.Call("1" * 32, bob.public.b64, "caller", "relay", state="inviting")
    assert machine.receive(forged.sender.b64, read_call_message(forged.content)) == []
    assert machine.refused[-1][1] == "answer not from this call's peer"


# --------------------------------------------------------------------------- TURN credentials

def test_turn_rest_credentials_are_the_documented_hmac():
    now = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
    username, password = calls.turn_credentials(b"0123456789abcdef", "cafe", now=now, ttl=timedelta(minutes=10))
    assert username == f"{int(now.timestamp()) + 600}:cafe"
    expected = base64.b64encode(hmac.new(b"0123456789abcdef", username.encode(), hashlib.sha1).digest()).decode()
    assert password == expected
    valid = lambda **kw: calls.turn_credentials_valid(**({"secret": b"0123456789abcdef", "username": username,
                                                           "password": password, "now": now} | kw))
    assert valid() and not valid(now=now + timedelta(minutes=10)) and not valid(secret=b"another secret!!")
    assert not valid(username="9999999999:cafe") and not valid(username="soon:cafe")
    with pytest.raises(ValueError):
        calls.turn_credentials(b"0123456789abcdef", "a:b", now=now, ttl=timedelta(minutes=1))


@pytest.mark.parametrize("kwargs, problem", [
    ({"uris": ()}, "turns:HOST:PORT"), ({"uris": ("stun:127.0.0.1:3478",)}, "turns:HOST:PORT"),
    ({"secret": b"short"}, "at least 16 bytes"), ({"ttl": timedelta(days=2)}, "1 minute to 1 day"),
    ({"per_minute": 0}, "at least 1 credential")])
def test_turn_config_refuses_what_cannot_work(kwargs, problem):
    good = {"uris": ("turns:127.0.0.1:5349?transport=tcp",), "secret": b"0123456789abcdef"}
    with pytest.raises(ValueError, match=problem):
        calls.TurnConfig(**(good | kwargs))


def test_load_turn_config_reads_the_secret_and_checks_the_certificate(tmp_path):
    (tmp_path / "secret").write_text("0123456789abcdef0123\n")
    config = calls.load_turn_config(["turns:127.0.0.1:5349?transport=tcp"], tmp_path / "secret")
    assert config.secret == b"0123456789abcdef0123" and config.certificate_pem is None
    with pytest.raises(ValueError, match="needs --turn-secret-file"):
        calls.load_turn_config(["turns:127.0.0.1:5349?transport=tcp"], None)
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(ValueError):
        calls.load_turn_config(["turns:127.0.0.1:5349?transport=tcp"], tmp_path / "secret", tmp_path / "cert.pem")


def test_the_limiter_allows_a_sliding_minute_per_key():
    clock = ManualClock(START)
    limiter = calls.CredentialLimiter(clock, per_minute=2, max_keys=2)
    assert [limiter.allow("k") for _ in range(3)] == [True, True, False]
    assert limiter.allow("other")
    clock.advance(timedelta(seconds=61))
    assert limiter.allow("k")
    limiter.allow("third")  # memory stays bounded: the least recently seen key is forgotten
    assert len(limiter._issued) <= 2


TURN = calls.TurnConfig(("turns:127.0.0.1:5349?transport=tcp",), b"0123456789abcdef0123",
                        certificate_pem="-----BEGIN CERTIFICATE-----\n…\n", per_minute=2)


def turn_node(data_dir, proof_mode: str = "hardened", clock=None):
    "A relay node (notebook 05a) with the TurnCredentials role composed on it (hardened proofs, as by default)."
    import random

    from bubble_ref.node import NodeConfig, open_relay_node
    from bubble_ref.packets import system_clock

    node = open_relay_node(data_dir, clock=clock or system_clock, rng=random.Random(0),
                           config=NodeConfig(proof_mode=proof_mode))
    node.add(calls.TurnCredentials(node, TURN))
    return node


@pytest.fixture
def turn_app(tmp_path):
    "A node's Flask app (the real driver's, notebook 05b) with GET /turn-credentials, in spec or hardened mode."
    from bubble_ref.relay import create_app

    made = []

    def make(proof_mode: str = "hardened"):
        node = turn_node(tmp_path / proof_mode, proof_mode)
        made.append(node)
        return node, create_app(node, node.on_request).test_client()
    yield make
    for node in made:
        node.close()


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert set(body) == {"error", "detail"} and body["error"] == code
    return body["detail"]


def test_turn_credentials_for_a_proven_key_and_clear_refusals(turn_app, alice):
    node, client = turn_app()
    fresh = lambda: make_retrieval_proof(alice, server_id=node.id).to_dict()  # a hardened proof counts once
    proof = fresh()
    response = client.get("/turn-credentials", json=proof)
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["uris"] == ["turns:127.0.0.1:5349?transport=tcp"] and answer["ttl"] == 600
    assert re.fullmatch(r"\d{10}:[0-9a-f]{16}", answer["username"]) and alice.id not in answer["username"]
    assert answer["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert calls.turn_credentials_valid(b"0123456789abcdef0123", answer["username"], answer["credential"],
                                        now=datetime.now(timezone.utc))
    assert client.get("/turn-credentials", json=fresh()).get_json()["username"] != answer["username"]  # unlinkable

    error_of(client.get("/turn-credentials", json=fresh()), 429, "rate_limited")  # the third in a minute
    wrong = proof | {"signature": fresh()["signature"][:-8] + "AAAAAAA="}
    error_of(client.get("/turn-credentials", json=wrong), 401, "bad_proof")
    error_of(client.get("/turn-credentials", json={"public_key": "x"}), 400, "invalid_packet")
    error_of(client.get("/turn-credentials", data="{not json", content_type="application/json"), 400,
             "invalid_packet")
    error_of(client.get("/turn-credentials", data="x", content_type="text/plain"), 415, "unsupported_media_type")
    error_of(client.get("/turn-credentials", data="x" * 9000, content_type="application/json"), 413, "too_large")
    error_of(client.post("/turn-credentials", json=proof), 405, "method_not_allowed")


def test_turn_credentials_in_hardened_mode_and_in_spec_mode_on_request(turn_app, alice):
    from bubble_ref.envelope import make_retrieval_proof as prove

    node, client = turn_app("hardened")
    error_of(client.get("/turn-credentials", json=prove(alice).to_dict()), 401, "bad_proof")  # a spec proof
    bound = prove(alice, server_id=node.id).to_dict()
    assert client.get("/turn-credentials", json=bound).status_code == 200
    error_of(client.get("/turn-credentials", json=bound), 401, "proof_replayed")
    elsewhere = prove(alice, server_id="0" * 64).to_dict()
    error_of(client.get("/turn-credentials", json=elsewhere), 401, "bad_proof")
    _, spec = turn_app("spec")  # the seed's phrase, replayable, only where the operator asked for it
    seed = prove(alice).to_dict()
    assert [spec.get("/turn-credentials", json=seed).status_code for _ in range(2)] == [200, 200]



def test_the_role_is_sans_io_and_its_limit_runs_on_the_nodes_clock(tmp_path, alice):
    "The role answers Requests without a server; the rate limit opens again after a minute of the injected clock."
    from bubble_ref.node import Request

    clock = ManualClock(datetime.now(timezone.utc))
    node = turn_node(tmp_path / "node", clock=clock)
    try:
        body = lambda: json.dumps(make_retrieval_proof(alice, server_id=node.id, clock=clock).to_dict()).encode()
        ask = lambda: node.on_request(Request("GET /turn-credentials", body()))
        assert [ask().status for _ in range(3)] == [200, 200, 429]
        assert ask().body["error"] == "rate_limited"
        clock.advance(timedelta(seconds=61))
        reply = ask()
        assert reply.status == 200 and reply.actions == ()
        assert int(reply.body["username"].split(":")[0]) == int((clock() + TURN.ttl).timestamp())
        assert "GET /turn-credentials" in {route.name for route in node.routes()}
        with pytest.raises(ValueError, match="already has a role"):
            node.add(calls.TurnCredentials(node, TURN))
    finally:
        node.close()

# ------------------------------------------------------------------------- media, on loopback

def media_pair(swap_fingerprint: bool = False):
    "Two direct MediaSessions (Bob offers from 127.0.0.3, Alice answers from 127.0.0.2); their states, over time."
    async def scenario():
        states = {"Alice": [], "Bob": []}
        bob = calls.MediaSession(calls.IcePolicy("127.0.0.3"), [], relay_only=False, tone_hz=660,
                                 on_state=states["Bob"].append)
        alice = calls.MediaSession(calls.IcePolicy("127.0.0.2"), [], relay_only=False, tone_hz=440,
                                   on_state=states["Alice"].append)
        try:
            offer = await bob.make_offer()
            answer = await alice.make_answer(offer)
            if swap_fingerprint:
                answer = re.sub(r"(a=fingerprint:sha-256 )[0-9A-F:]+", r"\g<1>" + ":".join(["AB"] * 32), answer)
            await bob.apply_answer(answer)
            deadline = time.monotonic() + 20
            while not {"connected", "failed"} & set(states["Bob"]):
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.01)
            if "connected" in states["Bob"]:
                while len(bob.heard) < 40 or len(alice.heard) < 40:  # 0.8 s of audio each way
                    assert time.monotonic() < deadline, (len(bob.heard), len(alice.heard))
                    await asyncio.sleep(0.02)
            before_closing = {who: list(seen) for who, seen in states.items()}
            return before_closing, offer, answer, bob.audio(), alice.audio(), bob.rate
        finally:
            await bob.close()
            await alice.close()
    return asyncio.run(scenario())


def peak(samples, rate: int) -> float:
    import numpy as np

    spectrum = np.abs(np.fft.rfft(samples.astype(float) * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_a_direct_call_on_loopback_gathers_only_its_own_address_and_carries_the_tones():
    states, offer, answer, heard_by_bob, heard_by_alice, rate = media_pair()
    assert states["Bob"][-1] == "connected"
    assert {a for _, a, _ in calls.sdp_candidates(offer)} == {"127.0.0.3"}
    assert {a for _, a, _ in calls.sdp_candidates(answer)} == {"127.0.0.2"}
    assert all(ipaddress.ip_address(a).is_loopback or a == "0.0.0.0"
               for a in calls.sdp_addresses(offer) | calls.sdp_addresses(answer))
    assert abs(peak(heard_by_bob, rate) - 440) < 5 and abs(peak(heard_by_alice, rate) - 660) < 5


def test_a_swapped_dtls_fingerprint_fails_the_call():
    states, *_ = media_pair(swap_fingerprint=True)
    assert states["Bob"][-1] == "failed" and "connected" not in states["Bob"]


def test_garbage_sdp_is_an_error_not_a_hang():
    async def scenario():
        session = calls.MediaSession(calls.IcePolicy("127.0.0.2"), [], relay_only=False, tone_hz=440)
        try:
            with pytest.raises(ValueError):
                await session.make_answer("this is not SDP")
        finally:
            await session.close()
    asyncio.run(scenario())


# -------------------------------------------------- phones over an in-memory, tamperable channel

class Channel:
    "An in-memory stand-in for the mesh that, unlike the mesh, lets a test alter what it carries."

    def __init__(self, alter=lambda content: content):
        self.alter, self.boxes = alter, {}

    def client(self, name: str):
        channel = self

        class FakeClient:
            identity = type("Id", (), {"public": type("Key", (), {"b64": name})()})()

            def send(self, peer: str, content: str):
                from bubble_ref.client import HistoryEntry

                channel.boxes.setdefault(peer, []).append(
                    HistoryEntry(f"{time.monotonic_ns()}", "in", name, channel.alter(content), "2030-01-01T12:00:00Z"))

            def poll(self):
                return channel.boxes.pop(name, [])
        return FakeClient()


def call_over(channel: Channel) -> dict:
    "Alice (127.0.0.2) calls Bob (127.0.0.3, answers by himself) in direct mode; the final states of both phones."
    async def scenario():
        alice = calls.Phone(channel.client("ALICE"), host="127.0.0.2", tone_hz=440).start(0.01)
        bob = calls.Phone(channel.client("BOB"), host="127.0.0.3", tone_hz=660, auto_accept=True).start(0.01)
        try:
            call_id = await alice.call("BOB", mode="direct")
            settled = lambda: all(call_id in p.machine.calls and p.machine.calls[call_id].state in ("connected", *FINAL)
                                  for p in (alice, bob))
            deadline = time.monotonic() + 20
            while not settled():
                assert time.monotonic() < deadline, [p.machine.calls.get(call_id) for p in (alice, bob)]
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # let an "end" reach the other side
            return {name: (p.machine.calls[call_id].state, p.machine.calls[call_id].reason)
                    for name, p in (("alice", alice), ("bob", bob))}
        finally:
            await alice.close()
            await bob.close()
    return asyncio.run(scenario())


def test_phones_connect_over_an_honest_channel():
    assert {who: state for who, (state, _) in call_over(Channel()).items()} == {"alice": "connected",
                                                                             "bob": "connected"}


def test_a_fingerprint_swapped_on_the_way_fails_the_call_for_both_phones():
    def swap(content: str) -> str:
        message = read_call_message(content)
        if message is None or message.type != "answer":
            return content
        forged = re.sub(r"(a=fingerprint:sha-256 )[0-9A-F:]+", r"\g<1>" + ":".join(["AB"] * 32), message.sdp)
        return CallMessage("answer", message.call_id, message.expires, message.mode, forged).to_content()

    states = call_over(Channel(swap))
    assert states["bob"] == ("failed", "ICE or DTLS failed")  # Bob checks Alice's (swapped) fingerprint
    assert states["alice"][0] in ("failed", "ended") and "connected" not in {s for s, _ in states.values()}


def test_a_session_tells_its_listeners_what_each_poll_fetched(tmp_path):
    from bubble_ref.contacts import ContactBook
    from bubble_ref.ui import ChatSession

    channel = Channel()
    book = ContactBook(tmp_path / "bob.contacts")
    try:
        session = ChatSession(channel.client("BOB"), book)
        heard: list[list] = []
        session.add_listener(heard.append)
        assert session.poll() == [] and heard == []  # an empty poll tells no one
        channel.client("ALICE").send("BOB", "hello")
        entries = session.poll()
        assert [e.content for e in entries] == ["hello"] and heard == [entries]
    finally:
        book.close()


def test_a_phone_listening_to_a_chat_session_hears_every_poll_once(tmp_path):
    "The chat's poller and the phone both poll one session; each call message reaches the phone exactly once."
    from bubble_ref.contacts import ContactBook
    from bubble_ref.ui import ChatSession, Poller

    channel = Channel()
    book = ContactBook(tmp_path / "bob.contacts")
    session = ChatSession(channel.client("BOB"), book)
    heard = []
    session.add_listener(heard.extend)
    chat_poller = Poller(session.poll, every=0.01, name="chat poller")

    async def scenario():
        alice = calls.Phone(channel.client("ALICE"), host="127.0.0.2", tone_hz=440).start(0.01)
        bob = calls.Phone(session.client, host="127.0.0.3", tone_hz=660, auto_accept=True)
        bob.listen_to(session)
        bob.start(0.5)  # the phone's own polls are slow here: most messages come in through the chat's
        chat_poller.start()
        try:
            call_id = await alice.call("BOB", mode="direct")
            deadline = time.monotonic() + 20
            while not all(call_id in p.machine.calls and p.machine.calls[call_id].state in ("connected", *FINAL)
                          for p in (alice, bob)):
                assert time.monotonic() < deadline, [p.machine.calls.get(call_id) for p in (alice, bob)]
                await asyncio.sleep(0.01)
            return alice.machine.calls[call_id].state, bob.machine.calls[call_id].state, bob
        finally:
            chat_poller.stop()
            await alice.close()
            await bob.close()
    try:
        states = asyncio.run(scenario())
    finally:
        book.close()
    alice_state, bob_state, bob = states
    assert (alice_state, bob_state) == ("connected", "connected"), bob.errors
    received = [s.type for s in bob.signals if s.direction == "received"]
    assert received == ["invite", "answer"], received  # each once: no double delivery, nothing refused as a replay
    assert bob.machine.refused == [] and [read_call_message(e.content).type for e in heard] == ["invite", "answer"]
