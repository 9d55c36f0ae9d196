"""Reports, votes, quorum decisions and the blacklist (notebook 09c): the Ballot role.

The first part runs full monitored nodes (`open_monitored_node`, what `bubble-ref node` serves) in process on one
manual clock: the rules, one by one. The second part runs real `bubble-ref node` processes on 127.0.0.1 and talks
HTTP to them: a dropper is audited, reported, voted on and blacklisted by the mesh itself, including while an honest
node is down for a while; hand-made decisions (signed with the nodes' own keys, read from their data directories)
are applied, refused when forged or short of a majority, and reversed by a whitelist.
Nothing asserts on wall-clock durations: every wait is a poll with a deadline.
"""
from __future__ import annotations

import base64
import random
import time
from collections import Counter
from datetime import datetime, timedelta

import pytest
import requests

from bubble_ref.audit import sign_report
from bubble_ref.ballot import VOTE_REUSE, Decided, open_monitored_node
from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, seal
from bubble_ref.ledger import MonitorConfig, Observed
from bubble_ref.mesh import Server, build_topology, sign_body, sign_relay, verify_body, verify_server_list
from bubble_ref.node import NodeConfig
from bubble_ref.packets import QuorumDecision, ServerListRequest, Vote, VoteRequest, format_timestamp, parse_timestamp
from bubble_ref.sim import sim_keys
from bubble_ref.store import ManualClock

from inproc import ask, assert_refused, calls, carry
from nodes import HTTP_TIMEOUT, Launcher, MeshProcess, assert_error, fetch_all, wait_until

MONITOR = MonitorConfig()


# ------------------------------------------------------------------- the rules, on a manual clock

def key_factory(server_key: Identity, spare) -> callable:
    "A node's key factory: its server key first, then throwaway keys (audits) from `spare`, in turn."
    made = []

    def make() -> Identity:
        made.append(None)
        return server_key if len(made) == 1 else spare[len(made) % len(spare)]
    return make


class World:
    "Four monitored nodes on one manual clock that know each other and a fifth server X (not running)."

    def __init__(self, root):
        self.clock = ManualClock()
        pool = sim_keys(64)  # fixed test keys: generating RSA keys is slow
        self.nodes = [open_monitored_node(root / f"n{i}", clock=self.clock, rng=random.Random(i),
                                          config=NodeConfig(name=f"n{i}"), new_identity=key_factory(pool[i], pool[40:]))
                      for i in range(4)]
        self.x = pool[4]
        self._fresh = list(pool[5:40])
        self.keys = [n.identity for n in self.nodes] + [self.x]
        self.urls = {f"http://127.0.0.{i + 1}:8000": node for i, node in enumerate(self.nodes)}
        self.verify_all()
        for i, node in enumerate(self.nodes):  # a ring of peers: n_i's pinned peers are n_i-1 and n_i+1
            for j in ((i - 1) % 4, (i + 1) % 4):
                other = self.keys[j]
                node.roles["peers"].learn_peer(f"http://127.0.0.{j + 1}:8000",
                                               {"server_id": other.id, "public_key": other.public.b64})

    def verify_all(self) -> None:
        "Every node has just heard from every server, signed (as a directory round would record)."
        for node in self.nodes:
            for i, other in enumerate(self.keys):
                node.roles["peers"].remember(Server(other.id, f"http://127.0.0.{i + 1}:8000", other.public),
                                             listed_by=None, verified=True)

    def fresh(self) -> Identity:
        "A key nobody in the world has used yet (a stranger, a client, a phantom)."
        return self._fresh.pop(0)

    def vote(self, identity: Identity, about: str, value: str, at=None) -> dict:
        return sign_body(identity, Vote(voter_id=identity.id, reported_server_id=about, vote=value,
                                        timestamp=format_timestamp(at or self.clock())).to_dict())

    def decision(self, votes: list[dict], about: str, final: str = "blacklisted") -> dict:
        return QuorumDecision(reported_server_id=about, votes={v["voter_id"]: v["vote"] for v in votes},
                              final_decision=final, timestamp=format_timestamp(self.clock()),
                              signed_votes=tuple(votes)).to_dict()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def ballot(node):
    return node.roles["ballot"]


def decide(node, body: dict):
    return ask(node, "POST /decisions", body)


def refusal(node, body: dict) -> tuple[int, str]:
    reply = decide(node, body)
    assert reply.status >= 400 and reply.actions == (), reply
    return reply.status, reply.body["error"]


def test_a_decision_needs_valid_signatures_and_a_real_majority(world):
    nodes, x = world.nodes, world.x
    three = [world.vote(n.identity, x.id, "blacklist") for n in nodes[:3]]
    two = [*three[:2], world.vote(nodes[2].identity, x.id, "abstain")]
    forged = [*three[:2], {**three[2], "vote": "blacklist", "voter_id": nodes[3].id}]  # n2's signature, n3's name
    assert refusal(nodes[3], world.decision(two, x.id)) == (403, "no_majority")
    assert refusal(nodes[3], world.decision(forged, x.id)) == (403, "bad_vote")
    altered = {**world.decision(two, x.id), "votes": {v["voter_id"]: "blacklist" for v in two}}
    assert refusal(nodes[3], altered) == (400, "invalid_packet")
    bare = {k: v for k, v in world.decision(three, x.id).items() if k != "signed_votes"}
    assert refusal(nodes[3], bare) == (400, "unsigned_decision")
    other = [world.vote(n.identity, nodes[0].id, "blacklist") for n in nodes[1:3]] + \
        [world.vote(nodes[3].identity, x.id, "blacklist")]  # it claims 3 of 4, but one of them is about x
    assert refusal(nodes[3], world.decision(other, nodes[0].id)) == (400, "invalid_packet")
    twice = [*three, three[0]]
    assert refusal(nodes[3], world.decision(twice, x.id)) == (400, "invalid_packet")  # one voter, two votes
    assert x.id not in ballot(nodes[3]).blacklisted
    applied_at = world.decision(three, x.id)["timestamp"]
    applied = decide(nodes[3], world.decision(three, x.id))
    assert applied.status == 200 and applied.body == {"reported_server_id": x.id, "final_decision": "blacklisted",
                                                      "applied": True}
    assert x.id in ballot(nodes[3]).blacklisted
    assert ask(nodes[3], "GET /status").body["blacklisted"] == 1
    forwarded = calls(applied.actions, "/decisions")
    assert sorted(c.url for c in forwarded) == [f"http://127.0.0.{i}:8000/decisions" for i in (1, 2, 3)], \
        "passed on to its two peers in the ring and up to DECISION_FANOUT others it knows (here n1), never x"
    again = decide(nodes[3], world.decision(three, x.id) | {"timestamp": applied_at})
    assert again.status == 200 and not again.body["applied"] and again.actions == (), "a duplicate stops the flood"


def test_votes_must_be_fresh_and_decisions_newer_than_the_last(world):
    nodes, x, clock = world.nodes, world.x, world.clock
    old_votes = [world.vote(n.identity, x.id, "blacklist") for n in nodes[:3]]
    clock.advance(timedelta(minutes=11))
    world.verify_all()  # the voters are still around (verified lately), but their votes are old
    assert refusal(nodes[3], world.decision(old_votes, x.id)) == (403, "stale_vote")
    blacklist = world.decision([world.vote(n.identity, x.id, "blacklist") for n in nodes[:3]], x.id)
    assert decide(nodes[3], blacklist).body["applied"]
    clock.advance(timedelta(minutes=1))
    world.verify_all()
    whitelist = world.decision([world.vote(n.identity, x.id, "whitelist") for n in nodes[:3]], x.id, "whitelisted")
    assert decide(nodes[3], whitelist).body["applied"]
    assert x.id not in ballot(nodes[3]).blacklisted
    replay = decide(nodes[3], blacklist)  # a replay of the older decision
    assert replay.status == 200 and not replay.body["applied"] and replay.actions == ()
    assert x.id not in ballot(nodes[3]).blacklisted
    clock.advance(timedelta(days=2))
    assert refusal(nodes[2], whitelist) == (403, "stale_decision")


def test_a_node_blacklists_only_a_server_it_has_reached_not_one_only_named(world):
    """Known by name only, the accused's own list is unread, so its neighbours (its witnesses) may be missing from the
    quorum base: a blacklist waits until the node has reached the accused (swarm seed 48, on a second path)."""
    nodes, clock = world.nodes, world.clock
    named, n3 = world.fresh(), nodes[3]
    server = Server(named.id, "http://127.0.0.9:8000", named.public)
    n3.roles["peers"].remember(server, listed_by=nodes[0].id)  # a list named it; it never answered n3
    first = decide(n3, world.decision([world.vote(n.identity, named.id, "blacklist") for n in nodes[:3]], named.id))
    assert first.status == 200 and not first.body["applied"] and first.actions == ()
    assert named.id not in ballot(n3).blacklisted
    clock.advance(timedelta(seconds=5))
    n3.roles["peers"].remember(server, listed_by=None, verified=True)  # it answered n3, signed: n3 read its list
    later = decide(n3, world.decision([world.vote(n.identity, named.id, "blacklist") for n in nodes[:3]], named.id))
    assert later.body["applied"] and named.id in ballot(n3).blacklisted


def test_only_the_votes_of_servers_verified_lately_count(world):
    "A server this node has not heard from for the active window is not in its electorate: its vote is not counted."
    nodes, x, clock = world.nodes, world.x, world.clock
    clock.advance(MONITOR.active_window + timedelta(minutes=1))
    for i in (0, 1):  # only n0 and n1 (and x) are heard from again, by n3
        other = world.keys[i]
        nodes[3].roles["peers"].remember(Server(other.id, f"http://127.0.0.{i + 1}:8000", other.public),
                                         listed_by=None, verified=True)
    assert ballot(nodes[3]).electorate() == {nodes[0].id, nodes[1].id, nodes[3].id}
    votes = [world.vote(n.identity, x.id, "blacklist") for n in nodes[:3]]
    assert decide(nodes[3], world.decision(votes, x.id)).body["applied"], "2 of the 3 it knows to be active"


def test_servers_only_heard_of_count_in_the_quorum_but_a_lister_cannot_add_many(world):
    "A list can name phantoms: they raise the bar (they count in the base), at most named_per_lister per lister."
    nodes = world.nodes
    n1 = nodes[1]
    phantoms = [world.fresh() for _ in range(6)]
    for i, p in enumerate(phantoms):
        n1.roles["peers"].remember(Server(p.id, f"http://127.0.1.{i + 1}:8000", p.public), listed_by=nodes[0].id)
    assert len(ballot(n1).quorum_base() - ballot(n1).electorate()) == MONITOR.named_per_lister
    sybil = world.decision([world.vote(nodes[0].identity, nodes[2].id, "blacklist")] +
                           [world.vote(p, nodes[2].id, "blacklist") for p in phantoms], about=nodes[2].id)
    assert refusal(n1, sybil) == (403, "no_majority"), "phantoms' votes are not counted; they only raise the bar"


def test_a_poll_is_called_on_own_evidence_and_counts_only_verified_signed_votes(world):
    nodes, x, clock = world.nodes, world.x, world.clock
    n0 = nodes[0]
    for i in (1, 2):  # n1 and n2 have audited x twice and failed it: they will vote to blacklist
        for audit in ("p", "q"):
            nodes[i].emit(Observed(x.id, "audit", f"{audit}{i}", "audit_failed"))
    stranger = world.fresh()
    n0.emit(Observed(x.id, "audit", "p", "audit_failed"))
    vote_calls = calls(n0.emit(Observed(x.id, "audit", "q", "audit_failed")), "/votes")
    assert ballot(n0).make_vote(x.id)["vote"] == "blacklist"
    assert sorted(c.url for c in vote_calls) == sorted(f"{u}/votes" for u in list(world.urls)[1:]), \
        "its score fell under the line: it asks every other member of its electorate"
    request = VoteRequest.from_dict(vote_calls[0].body)
    assert (request.reported_server_id, request.proposal, request.sender_id) == (x.id, "blacklisted", n0.id)

    by_url = {c.url.removesuffix("/votes"): c for c in vote_calls}
    answers = {  # n1 answers for real; n2's answer is forged; n3's answer is a stranger's vote
        "http://127.0.0.2:8000": None,
        "http://127.0.0.3:8000": {**world.vote(nodes[2].identity, x.id, "blacklist"), "signature": "A" * 344},
        "http://127.0.0.4:8000": world.vote(stranger, x.id, "blacklist")}
    actions = []
    for url, body in answers.items():
        call = by_url[url]
        actions += carry(n0, call, world.urls) if body is None else n0.on_answer(call.tag, 200, body)
    assert x.id not in ballot(n0).blacklisted and calls(actions, "/decisions") == [], "2 of 4 counted: no majority"
    assert n0.emit(Observed(x.id, "audit", "r", "audit_failed")) == [], "no new poll during the cooldown"

    clock.advance(MONITOR.vote_cooldown)
    world.verify_all()
    vote_calls = calls(n0.emit(Observed(x.id, "audit", "s", "audit_failed")), "/votes")
    actions = []
    for call in vote_calls:
        actions += carry(n0, call, world.urls)
    assert x.id in ballot(n0).blacklisted
    decision = next(d for d in ballot(n0).decisions() if d["reported_server_id"] == x.id)
    assert stranger.id not in decision["votes"] and sorted(decision["votes"].values()).count("blacklist") == 3
    assert len(calls(actions, "/decisions")) == 3, "and passed on to its two peers and the one other it knows"


def test_a_poll_answered_meanwhile_by_a_decision_makes_no_new_one(world):
    """At N = 1000 hundreds of polls about one dropper are open when the first decision floods the mesh; each that
    closed with a majority made a newer decision, which flooded the mesh again (a third of a megabyte per post)."""
    nodes, x, clock = world.nodes, world.x, world.clock
    n0 = nodes[0]
    for i in (0, 1, 2):  # all three have failed x twice: n0's poll will carry
        for audit in ("p", "q"):
            nodes[i].emit(Observed(x.id, "audit", f"{audit}{i}", "audit_failed"))
    clock.advance(MONITOR.vote_cooldown)
    vote_calls = calls(n0.emit(Observed(x.id, "audit", "r", "audit_failed")), "/votes")
    assert len(vote_calls) == 3, "n0 polls the other three"
    other = world.decision([world.vote(n.identity, x.id, "blacklist") for n in nodes[1:3]] +
                           [world.vote(n0.identity, x.id, "blacklist")], x.id)
    clock.advance(timedelta(seconds=1))
    assert decide(n0, other).body["applied"], "another node's decision arrives while the poll is open"
    held = ballot(n0).decisions()
    actions = []
    for call in vote_calls:
        actions += carry(n0, call, world.urls)
    assert calls(actions, "/decisions") == [] and ballot(n0).decisions() == held, "the poll closes without a decision"


def test_a_vote_request_is_answered_from_own_evidence_and_makes_the_node_look(world):
    nodes, x, clock = world.nodes, world.x, world.clock
    n0, n1 = nodes[0], nodes[1]
    request = sign_body(n1.identity, VoteRequest(reported_server_id=x.id, proposal="blacklisted", sender_id=n1.id,
                                                 sent_at=format_timestamp(clock())).to_dict())
    reply = ask(n0, "POST /votes", request)
    assert reply.status == 200
    vote = Vote.from_dict(reply.body)
    assert (vote.voter_id, vote.reported_server_id, vote.vote) == (n0.id, x.id, "abstain"), "no evidence: abstain"
    assert verify_body(n0.identity.public, reply.body)
    assert [c.url for c in calls(reply.actions, "/messages")] == ["http://127.0.0.5:8000/messages"], "it audits x"
    unsigned = {k: v for k, v in request.items() if k != "signature"}
    about_itself = ask(n0, "POST /votes", sign_body(n1.identity, {**unsigned, "reported_server_id": n0.id}))
    assert about_itself.body["vote"] == "abstain", "never a vote about itself"
    stranger = world.fresh()
    unknown = sign_body(stranger, {**request, "sender_id": stranger.id})
    assert_refused(ask(n0, "POST /votes", unknown), 403, "unknown_server")
    clock.advance(MONITOR.clock_skew + timedelta(seconds=1))
    assert_refused(ask(n0, "POST /votes", request), 403, "stale_request")


def test_a_signed_vote_answers_many_callers_while_the_opinion_holds(world):
    """A vote names no requester, so the same signed vote answers every caller for VOTE_REUSE: a thousand callers
    cost a voter one RSA signature, not a thousand. A changed opinion is signed at once."""
    nodes, x, clock = world.nodes, world.x, world.clock
    n0 = nodes[0]

    def vote_for(caller) -> dict:
        request = sign_body(caller.identity, VoteRequest(reported_server_id=x.id, proposal="blacklisted",
                                                         sender_id=caller.id, sent_at=format_timestamp(clock())).to_dict())
        reply = ask(n0, "POST /votes", request)
        assert reply.status == 200 and verify_body(n0.identity.public, reply.body)
        return reply.body

    first = vote_for(nodes[1])
    clock.advance(VOTE_REUSE - timedelta(seconds=1))
    assert vote_for(nodes[2]) == first, "the same signed vote, not a new signature"
    for audit in ("p", "q"):  # n0's own evidence changes: two failed audits of x
        n0.emit(Observed(x.id, "audit", audit, "audit_failed"))
    changed = vote_for(nodes[3])
    assert (first["vote"], changed["vote"]) == ("abstain", "blacklist")
    assert changed["timestamp"] == format_timestamp(clock()), "a new opinion is signed now"
    clock.advance(VOTE_REUSE)
    later = vote_for(nodes[1])
    assert later["vote"] == "blacklist" and later["timestamp"] == format_timestamp(clock()), "and again when it is old"


def test_reports_must_be_signed_by_their_reporter_and_only_make_the_node_look(world):
    nodes, x, clock = world.nodes, world.x, world.clock
    server = nodes[1].identity
    report = sign_report(server, x.id, b"audit abc failed", clock())
    answer = ask(nodes[0], "POST /reports", report)
    assert answer.status == 202
    assert answer.body["stored"] and answer.body["from_server"] and answer.body["reports_about"] == 1
    assert ask(nodes[0], "POST /reports", report).body["stored"] is False  # the same report twice is one
    assert nodes[0].roles["ledger"].score(x.id) == 1.0  # a signal, not proof: no score moves ...
    assert [c.url for c in calls(answer.actions, "/messages")] == ["http://127.0.0.5:8000/messages"], \
        "... but the node audits x now"
    unsigned = {k: v for k, v in report.items() if k not in ("signature", "public_key")}
    forged = {**report, "evidence": base64.b64encode(b"something else").decode()}
    impostor = {**sign_report(world.fresh(), x.id, b"", clock()), "reporter_id": server.id}
    assert_refused(ask(nodes[0], "POST /reports", unsigned), 400, "unsigned_report")
    assert_refused(ask(nodes[0], "POST /reports", forged), 403, "bad_signature")
    assert_refused(ask(nodes[0], "POST /reports", impostor), 400, "invalid_packet")
    clock.advance(timedelta(minutes=10))
    assert_refused(ask(nodes[0], "POST /reports", report), 403, "stale_report")
    assert ask(nodes[0], "GET /reputation", token=nodes[0].operator_token).body["reports"] == {x.id: 1}
    assert "reports" not in ask(nodes[0], "GET /reputation").body, "who reported whom: for the operator only"


def test_client_reports_are_rate_limited_per_key_and_in_all(world):
    nodes, x, clock = world.nodes, world.x, world.clock
    client = world.fresh()
    limit = MONITOR.client_reports_per_minute
    for i in range(limit):
        reply = ask(nodes[0], "POST /reports", sign_report(client, x.id, bytes([i]), clock()))
        assert reply.status == 202 and not reply.body["from_server"]
    assert_refused(ask(nodes[0], "POST /reports", sign_report(client, x.id, b"one too many", clock())),
                   429, "rate_limited")
    other = world.fresh()
    assert ask(nodes[0], "POST /reports", sign_report(other, x.id, b"another client", clock())).body["stored"]
    clock.advance(timedelta(minutes=1))
    assert ask(nodes[0], "POST /reports", sign_report(client, x.id, b"a minute later", clock())).body["stored"]


def test_all_client_reports_together_are_rate_limited(world):
    nodes, x, clock = world.nodes, world.x, world.clock
    clients = [world.fresh() for _ in range(MONITOR.all_client_reports_per_minute // 5 + 1)]
    codes = Counter()
    for client in clients:
        for i in range(5):
            codes[ask(nodes[0], "POST /reports", sign_report(client, x.id, bytes([i]), clock())).status] += 1
    assert codes == {202: MONITOR.all_client_reports_per_minute, 429: 5}
    server_report = sign_report(nodes[1].identity, x.id, b"servers have their own budget", clock())
    assert ask(nodes[0], "POST /reports", server_report).status == 202


def test_the_blacklist_is_a_policy_for_every_role_and_survives_a_restart(world, tmp_path):
    nodes, x, clock = world.nodes, world.x, world.clock
    n3 = nodes[3]
    assert decide(n3, world.decision([world.vote(n.identity, x.id, "blacklist") for n in nodes[:3]], x.id)).body["applied"]
    refused = ask(n3, "POST /votes", sign_body(x, VoteRequest(reported_server_id=nodes[0].id, proposal="blacklisted",
                                                            sender_id=x.id, sent_at=format_timestamp(clock())).to_dict()))
    assert_refused(refused, 403, "blacklisted")
    assert_refused(ask(n3, "POST /reports", sign_report(x, nodes[0].id, b"revenge", clock())), 403, "blacklisted")
    assert n3.roles["peers"].refusal(x.id) is not None
    asked = {c.url for c in calls(n3.on_timer(("peers", "directory")), "/servers")}
    assert "http://127.0.0.5:8000/servers" not in asked and len(asked) == 3, "x is no longer asked for its list"
    view = ask(n3, "GET /reputation").body
    assert view["blacklisted"] == [x.id] and view["decisions"][0]["reported_server_id"] == x.id
    n3.close()
    again = open_monitored_node(tmp_path / "n3", clock=clock, rng=random.Random(9),
                                new_identity=key_factory(n3.identity, sim_keys(64)[40:]))
    world.nodes[3] = again
    assert ballot(again).blacklisted == {x.id}


def test_reports_are_kept_for_the_evidence_window(world):
    nodes, x, clock = world.nodes, world.x, world.clock
    ask(nodes[0], "POST /reports", sign_report(nodes[1].identity, x.id, b"x", clock()))
    clock.advance(MONITOR.evidence_window + timedelta(seconds=1))
    nodes[0].on_timer(("mailbox", "sweep"))
    assert ask(nodes[0], "GET /reputation", token=nodes[0].operator_token).body["reports"] == {}


def test_decided_is_an_event(world):
    nodes, x = world.nodes, world.x
    seen = []
    nodes[3].on(Decided, lambda e: seen.append((e.server_id, e.final_decision)) or [])
    decide(nodes[3], world.decision([world.vote(n.identity, x.id, "blacklist") for n in nodes[:3]], x.id))
    assert seen == [(x.id, "blacklisted")]


# ------------------------------------------------------------------- real nodes over HTTP

FAST_MONITOR = ("--audit-interval", "0.5", "--audit-deadline", "0.4", "--directory-interval", "0.3")
QUIET_MONITOR = ("--audit-interval", "0", "--directory-interval", "0.3")  # no audits: only what the test does
BLACKLIST_WAIT = 300.0  # seconds: a blacklisting takes two failed audits per judge, each 15 s or more (recheck)


def ring(launcher: Launcher, names: str, *extra: str, per_node: dict | None = None) -> dict[str, MeshProcess]:
    procs = launcher.linked(names, build_topology(len(names), "ring"), *extra, per_node=per_node)
    launcher.start(*procs.values())
    return procs


def knows_everyone(procs: dict[str, MeshProcess]):
    "Every node knows every other, and has verified each (its votes count: `voters` is the electorate, itself included)."
    expected = {"known_servers": len(procs) - 1, "voters": len(procs)}
    return lambda: all(expected.items() <= p.status().items() for p in procs.values())


def now_at(proc: MeshProcess) -> datetime:
    return parse_timestamp(proc.status()["time"])


def assert_refused_relay_and_unlisted(honest: MeshProcess, bad: MeshProcess, alice, bob) -> None:
    "`honest` refuses relays signed by `bad` (403 blacklisted) and leaves it out of its server list."
    now = now_at(honest)
    probe = seal(alice, bob.public, "after the decision")
    relay = sign_relay(bad.server_key(), probe.to_dict(), check_packet(probe).id, now + timedelta(days=1), 1, now)
    assert_error(requests.post(f"{honest.url}/relay", json=relay, timeout=HTTP_TIMEOUT), 403, "blacklisted")
    request = ServerListRequest(requester_id=alice.id, timestamp=format_timestamp(now)).to_dict()
    listed = verify_server_list(requests.post(f"{honest.url}/servers", json=request, timeout=HTTP_TIMEOUT).json())
    assert bad.server_key().id not in {entry.server_id for entry in listed}


def test_a_dropper_is_audited_reported_voted_on_and_blacklisted_by_the_mesh(launcher, alice, bob):
    procs = ring(launcher, "ABCDE", *FAST_MONITOR, per_node={"E": ("--behaviour", "drop")})
    honest = [procs[n] for n in "ABCD"]
    packet = seal(alice, bob.public, "logged")
    assert requests.post(f"{procs['A'].url}/messages", json=packet.to_dict(), timeout=HTTP_TIMEOUT).status_code == 202
    e_id = procs["E"].server_key().id
    wait_until(lambda: all(e_id in p.reputation()["blacklisted"] for p in honest), "every honest node to blacklist E",
               timeout=BLACKLIST_WAIT)
    views = {p.name: p.reputation() for p in honest}
    outcomes = {(t["direction"], t["outcome"]) for view in views.values() for t in view["transactions"]}
    assert ("in", "accepted") in outcomes or ("out", "delivered") in outcomes
    audits_of = lambda server_id: Counter(outcome for view in views.values()
                                          for outcome, k in view["audits"].get(server_id, {}).items() for _ in range(k))
    assert audits_of(e_id)["audit_failed"] >= 3 and audits_of(e_id)["audit_passed"] == 0
    honest_ids = {p.server_key().id for p in honest}
    assert sum(audits_of(h)["audit_passed"] for h in honest_ids) >= 1
    assert sum(audits_of(h)["audit_failed"] for h in honest_ids) == 0
    assert sum(view["scores"].get(e_id, 1.0) < 0.5 for view in views.values()) >= 3
    assert any(view["reports"].get(e_id, 0) >= 1 for view in views.values())
    decision = next(d for d in views["A"]["decisions"] if d["reported_server_id"] == e_id)
    assert decision["final_decision"] == "blacklisted" and len(decision["signed_votes"]) == len(decision["votes"])
    assert list(decision["votes"].values()).count("blacklist") >= 3  # > half of the 4 servers besides E
    assert min(p.status()["lowest_reputation"] for p in honest) < 0.5
    assert_refused_relay_and_unlisted(procs["A"], procs["E"], alice, bob)  # E's relays refused, E left out of lists


def test_reports_over_http(launcher, alice):
    procs = ring(launcher, "ABC", *QUIET_MONITOR)
    wait_until(knows_everyone(procs), "every node to know the others")
    c_id = procs["C"].server_key().id
    now = lambda: now_at(procs["A"])
    from_b = sign_report(procs["B"].server_key(), c_id, b"audit failed", now())
    response = requests.post(f"{procs['A'].url}/reports", json=from_b, timeout=HTTP_TIMEOUT)
    assert response.status_code == 202 and response.json()["from_server"] is True
    assert procs["A"].reputation()["reports"] == {c_id: 1}
    assert procs["A"].reputation()["scores"].get(c_id, 1.0) == 1.0  # a report alone moves no score
    unsigned = {k: v for k, v in sign_report(alice, c_id, b"x", now()).items() if k not in ("signature", "public_key")}
    assert_error(requests.post(f"{procs['A'].url}/reports", json=unsigned, timeout=HTTP_TIMEOUT), 400,
                 "unsigned_report")
    forged = {**sign_report(alice, c_id, b"x", now()), "reported_server_id": procs["B"].server_key().id}
    assert_error(requests.post(f"{procs['A'].url}/reports", json=forged, timeout=HTTP_TIMEOUT), 403, "bad_signature")
    assert_error(requests.post(f"{procs['A'].url}/reports", data="{not json", timeout=HTTP_TIMEOUT,
                               headers={"Content-Type": "application/json"}), 400, "invalid_packet")
    codes = [requests.post(f"{procs['A'].url}/reports", json=sign_report(alice, c_id, bytes([i]), now()),
                           timeout=HTTP_TIMEOUT).status_code for i in range(8)]
    assert codes[:6] == [202] * 6 and codes[6:] == [429, 429]  # a client key is rate limited
    # the report from B made A audit C (suspicion): C is honest, so the audit passes
    wait_until(lambda: procs["A"].reputation()["audits"].get(c_id, {}).get("audit_passed", 0) >= 1,
               "A to audit C after the report")


def test_quorum_decisions_over_http(launcher, alice, bob):
    procs = ring(launcher, "ABCX", *QUIET_MONITOR)
    wait_until(knows_everyone(procs), "every node to know the others")
    keys = {n: p.server_key() for n, p in procs.items()}
    x_id = keys["X"].id
    clock = lambda: now_at(procs["A"])

    def vote(identity, value, at):
        return sign_body(identity, Vote(voter_id=identity.id, reported_server_id=x_id, vote=value,
                                        timestamp=format_timestamp(at())).to_dict())

    def decision(votes, at, final="blacklisted"):
        return QuorumDecision(reported_server_id=x_id, votes={v["voter_id"]: v["vote"] for v in votes},
                              final_decision=final, timestamp=format_timestamp(at()), signed_votes=tuple(votes)).to_dict()

    post = lambda name, body: requests.post(f"{procs[name].url}/decisions", json=body, timeout=HTTP_TIMEOUT)
    # 1 of the 3 servers besides X is no majority; a forged vote spoils a decision
    assert_error(post("A", decision([vote(keys["B"], "blacklist", clock)], clock)), 403, "no_majority")
    forged = [vote(keys["B"], "blacklist", clock), {**vote(keys["B"], "blacklist", clock), "voter_id": keys["C"].id}]
    assert_error(post("A", decision(forged, clock)), 403, "bad_vote")
    # a real majority (B and C) is applied by A, and spreads to the others
    answer = post("A", decision([vote(keys[n], "blacklist", clock) for n in "BC"], clock))
    assert answer.status_code == 200 and answer.json()["applied"] is True
    wait_until(lambda: all(x_id in procs[n].reputation()["blacklisted"] for n in "ABC"), "the decision to spread")
    assert_refused_relay_and_unlisted(procs["A"], procs["X"], alice, bob)
    # a whitelist decided the same way reverses it
    later = lambda: clock() + timedelta(seconds=2)  # timestamps have whole seconds; a decision must be newer
    whitelist = decision([vote(keys[n], "whitelist", later) for n in "BC"], later, "whitelisted")
    assert post("A", whitelist).json()["applied"] is True
    wait_until(lambda: all(x_id not in procs[n].reputation()["blacklisted"] for n in "ABC"), "the whitelist to spread")
    now = clock()
    probe = seal(alice, bob.public, "welcome back")
    relay = sign_relay(keys["X"], probe.to_dict(), check_packet(probe).id, now + timedelta(days=1), 1, now)
    assert requests.post(f"{procs['A'].url}/relay", json=relay, timeout=HTTP_TIMEOUT).status_code == 202


# ------------------------------------------------------------------- an honest node's outage, for real

OUTAGE_NODES = 5
OUTAGE_SECONDS = 20.0
OUTAGE_MESSAGES = 15
OUTAGE_FLAGS = ("--audit-interval", "2", "--audit-deadline", "1", "--sync-interval", "5", "--directory-interval", "1",
                "--retry-max", "2")


def test_an_honest_node_that_was_down_is_not_blacklisted_but_a_dropper_is(launcher, alice, bob):
    """Five fully linked nodes; n4 (honest) is stopped for a while as 15 messages are posted to the others; n3 drops
    everything. Every honest node blacklists n3; nobody blacklists n4; every message reaches every honest node."""
    names = [f"n{i}" for i in range(OUTAGE_NODES)]
    links = [[j for j in range(OUTAGE_NODES) if j != i] for i in range(OUTAGE_NODES)]
    procs = launcher.linked(names, links, *OUTAGE_FLAGS, per_node={"n3": ("--behaviour", "drop")})
    launcher.start(*procs.values())
    wait_until(knows_everyone(procs), "every node to know the others", timeout=120)
    ids = {n: p.server_key().id for n, p in procs.items()}

    assert procs["n4"].stop() == 0
    posted = []
    spacing = OUTAGE_SECONDS / OUTAGE_MESSAGES
    for k in range(OUTAGE_MESSAGES):
        origin = procs[names[k % 3]]
        answer = requests.post(f"{origin.url}/messages", json=seal(alice, bob.public, f"while n4 is down, #{k}").to_dict(),
                               timeout=HTTP_TIMEOUT)
        assert answer.status_code == 202, answer.text
        posted.append(answer.json()["packet_id"])
        time.sleep(spacing)  # the traffic is spread over the outage (this is the scenario, not a wait for a result)
    procs["n4"] = procs["n4"].again()
    launcher.start(procs["n4"])

    honest = [procs[n] for n in ("n0", "n1", "n2", "n4")]
    wait_until(lambda: all(ids["n3"] in p.reputation()["blacklisted"] for p in honest),
               "every honest node to blacklist the dropper n3", timeout=BLACKLIST_WAIT)
    wait_until(lambda: all(set(posted) <= {m["packet_id"] for m in fetch_all(p.url, bob)[0]}
                           for p in honest), "every message to reach every honest node", timeout=120)

    views = {n: procs[n].reputation() for n in names}
    for name, view in views.items():
        assert ids["n4"] not in view["blacklisted"], f"{name} blacklisted n4, which was only down"
        assert not any(d["reported_server_id"] == ids["n4"] and d["final_decision"] == "blacklisted"
                       for d in view["decisions"]), name
    seen_down = sum(views[n]["audits"].get(ids["n4"], {}).get("audit_unreachable", 0) for n in ("n0", "n1", "n2"))
    assert seen_down >= 1, "the outage was seen by the audits (else this test proves nothing about it)"
    assert all(views[n]["scores"].get(ids["n4"], 1.0) >= MONITOR.blacklist_below for n in ("n0", "n1", "n2"))
    assert all(views[n]["audits"].get(ids["n3"], {}).get("audit_failed", 0) >= 1 for n in ("n0", "n1", "n2"))
