"""Quorum decisions at N = 1000 (issue 13, goal 4; notebook 09c, PROTOCOL §6.6, §18, protocol 1.2).

A decision carries only the majority's signed votes and has a body limit of its own (MAX_DECISION_BYTES), so one with
501 (or all 1000) real RSA-2048 votes fits, verifies and is applied by a node whose electorate is 1000 servers. The
expensive work of a hostile POST /decisions is bounded: a replay, a decision short of a majority in the votes it
claims, or one with more votes than any electorate holds, is refused before any signature is checked (counted with
a wrapper around `verify_body`). A node passes a decision it applies to its peers and DECISION_FANOUT random others, and the flood reaches
every node of a simulated mesh, including one that was down and catches up from its peers when it comes back.

The thousand voters are real RSA-2048 keys, made in a fraction of a second from the primes of the shipped key pool
(two different pool primes make one modulus). Keys that share primes would be worthless in real life; here they
only need to be distinct keys that sign and verify for real, and they do: nothing is faked.
"""
from __future__ import annotations

import itertools
import json
import random
from datetime import timedelta
from functools import lru_cache

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import bubble_ref.ballot as ballot_module
from bubble_ref.attacks import hostile_requests
from bubble_ref.ballot import CATCH_UP_BYTES, DECISION_FANOUT, MAX_DECISION_BYTES, open_monitored_node
from bubble_ref.crypto import Identity
from bubble_ref.ledger import MonitorConfig
from bubble_ref.mesh import MeshConfig, Server, sign_body
from bubble_ref.node import Call, NodeConfig
from bubble_ref.packets import MAX_PACKET_BYTES, QuorumDecision, Vote, format_timestamp
from bubble_ref.sim import SimNetwork, pool_keys
from bubble_ref.store import ManualClock

from inproc import ask, calls

N = 1000  # MeshConfig.max_servers: the largest directory a node keeps


@lru_cache(maxsize=None)
def voters(count: int) -> tuple[Identity, ...]:
    "`count` distinct real RSA-2048 identities from pairs of primes of two different pool keys (see the docstring)."
    primes = [(i, n.p) for i, key in enumerate(pool_keys()) for n in [key.private_key.private_numbers()]] + \
             [(i, n.q) for i, key in enumerate(pool_keys()) for n in [key.private_key.private_numbers()]]
    made = []
    for (i, p), (j, q) in itertools.combinations(primes, 2):
        if i == j:  # p and q of one pool key: that is the pool key itself, which the nodes use
            continue
        d = pow(65537, -1, (p - 1) * (q - 1))
        numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                        rsa.RSAPublicNumbers(65537, p * q))
        made.append(Identity(numbers.private_key(unsafe_skip_rsa_key_validation=True)))
        if len(made) == count:
            return tuple(made)
    raise ValueError(f"the pool's primes make fewer than {count} keys")


def vote(identity: Identity, about: str, value: str, at) -> dict:
    return sign_body(identity, Vote(voter_id=identity.id, reported_server_id=about, vote=value,
                                    timestamp=format_timestamp(at)).to_dict())


def decision(votes: list[dict], about: str, at, final: str = "blacklisted") -> dict:
    return QuorumDecision(reported_server_id=about, votes={v["voter_id"]: v["vote"] for v in votes},
                          final_decision=final, timestamp=format_timestamp(at), signed_votes=tuple(votes)).to_dict()


def body_size(data: dict) -> int:
    return len(json.dumps(data, separators=(",", ":")).encode())


class Big:
    "A monitored node (pool key 0) whose directory is 1000 servers it verified: 999 voters and the accused x."

    def __init__(self, root, peers: int = 3):
        self.clock = ManualClock()
        self.node = open_monitored_node(root, clock=self.clock, rng=random.Random(1), config=NodeConfig(name="big"),
                                        new_identity=lambda: pool_keys()[0])
        self.ballot = self.node.roles["ballot"]
        self.voters = voters(N)[:N - 1]
        self.x = voters(N)[N - 1]
        directory = self.node.roles["peers"]
        for i, key in enumerate((*self.voters, self.x)):
            directory.remember(Server(key.id, f"http://10.0.{i // 250}.{i % 250 + 1}:8000", key.public),
                               listed_by=None, verified=True)
        for i, key in enumerate(self.voters[:peers]):  # its pinned peers: the first few voters
            directory.learn_peer(f"http://10.0.0.{i + 1}:8000", {"server_id": key.id, "public_key": key.public.b64})
        self.votes = [vote(v, self.x.id, "blacklist", self.clock()) for v in self.voters]

    def post(self, body: dict):
        return ask(self.node, "POST /decisions", body)


@pytest.fixture
def big(tmp_path):
    world = Big(tmp_path / "big")
    yield world
    world.node.close()


@pytest.fixture
def verify_calls(monkeypatch) -> list:
    "Every RSA verification the ballot makes, counted."
    made = []
    real = ballot_module.verify_body

    def counting(key, data):
        made.append(data.get("voter_id"))
        return real(key, data)

    monkeypatch.setattr(ballot_module, "verify_body", counting)
    return made


def test_the_electorate_is_a_thousand_and_a_decision_with_the_majority_fits_verifies_and_applies(big, verify_calls):
    assert len(big.ballot.electorate()) == N + 1 == big.ballot.max_voters(), "its 1000 servers and itself"
    assert len(big.ballot.quorum_base() - {big.x.id}) == N, "a majority is counted over all but the accused"
    majority = decision(big.votes[:N // 2 + 1], big.x.id, big.clock())  # 501 of the 1000 servers besides x
    size = body_size(majority)
    assert MAX_PACKET_BYTES < size < MAX_DECISION_BYTES, size  # too big for any other route, fits this one
    reply = big.post(majority)
    assert reply.status == 200 and reply.body["applied"] and big.x.id in big.ballot.blacklisted, reply.body
    assert len(verify_calls) == N // 2 + 1, "each vote of the electorate checked once"
    forwarded = calls(reply.actions, "/decisions")
    assert len(forwarded) == 3 + DECISION_FANOUT < len(big.node.roles["peers"].directory()) == N, \
        "to its 3 peers and 4 random others, not to 1000 servers"
    peer_urls = {f"http://10.0.0.{i}:8000/decisions" for i in (1, 2, 3)}
    assert peer_urls < {c.url for c in forwarded}, "every peer, and random others to cross an accused cut vertex"


def test_the_largest_decision_a_node_can_make_fits_the_limit(big):
    "Every server votes, with the longest timestamps the format allows: 1001 votes still fit in MAX_DECISION_BYTES."
    stamp = format_timestamp(big.clock())[:-1] + ".999999Z"
    every = [{**v, "timestamp": stamp} for v in big.votes] + [big.ballot.make_vote(big.x.id)] + \
            [vote(big.x, big.x.id, "whitelist", big.clock())]
    assert len(every) == big.ballot.max_voters() == N + 1
    largest = decision(every, big.x.id, big.clock())
    assert body_size(largest) < MAX_DECISION_BYTES < CATCH_UP_BYTES, body_size(largest)


def test_one_vote_short_of_the_majority_is_refused_before_any_signature(big, verify_calls):
    short = decision(big.votes[:N // 2], big.x.id, big.clock())  # 500 of 1000: not more than half
    reply = big.post(short)
    assert (reply.status, reply.body["error"]) == (403, "no_majority") and reply.actions == ()
    assert verify_calls == [] and big.x.id not in big.ballot.blacklisted


def test_a_replay_costs_no_signature_check_and_a_spoilt_redated_one_costs_one(big, verify_calls, monkeypatch):
    parsed = []
    real_parse = ballot_module.parse_json
    monkeypatch.setattr(ballot_module, "parse_json", lambda *a, **k: parsed.append(a[0]) or real_parse(*a, **k))
    genuine = decision(big.votes[:N // 2 + 1], big.x.id, big.clock())
    assert big.post(genuine).body["applied"] and len(parsed) == 1
    verify_calls.clear()
    replay = big.post(genuine)
    assert replay.status == 200 and not replay.body["applied"] and replay.actions == ()
    assert verify_calls == [] and len(parsed) == 1, "the same bytes again (a duplicate of the flood): not even parsed"
    respaced = big.post(json.dumps(genuine, indent=1).encode())  # the same decision, other bytes
    assert respaced.status == 200 and not respaced.body["applied"] and respaced.actions == ()
    assert verify_calls == [] and len(parsed) == 2, "not newer than the held decision: refused before any signature"
    # the same votes, re-dated a second later (newer), with the last vote's signature spoilt:
    big.clock.advance(timedelta(seconds=1))
    spoilt = [*genuine["signed_votes"][:-1], {**genuine["signed_votes"][-1], "signature": genuine["signed_votes"][0]["signature"]}]
    reply = big.post(decision(spoilt, big.x.id, big.clock()))
    assert (reply.status, reply.body["error"]) == (403, "bad_vote")
    assert len(verify_calls) == 1, "the 500 votes it verified before are remembered; only the spoilt one is checked"


def test_hostile_decisions_are_refused_cheaply(big, verify_calls):
    strangers = voters(N + 24)[N:]  # keys nobody in big's directory has
    unknown = decision([vote(s, big.x.id, "blacklist", big.clock()) for s in strangers], big.x.id, big.clock())
    reply = big.post(unknown)
    assert (reply.status, reply.body["error"]) == (403, "no_majority") and verify_calls == []
    too_many = decision(big.votes + [vote(s, big.x.id, "blacklist", big.clock()) for s in voters(N + 24)[N:]],
                        big.x.id, big.clock())
    assert len(too_many["signed_votes"]) == N - 1 + 24 > big.ballot.max_voters()
    reply = big.post(too_many)
    assert (reply.status, reply.body["error"]) == (400, "invalid_packet") and verify_calls == []
    oversized = json.dumps(too_many) + " " * MAX_DECISION_BYTES
    reply = ask(big.node, "POST /decisions", oversized.encode())
    assert (reply.status, reply.body["error"]) == (413, "too_large") and str(MAX_DECISION_BYTES) in reply.body["detail"]
    other_route = ask(big.node, "POST /reports", b" " * (MAX_PACKET_BYTES + 1))
    assert other_route.status == 413, "the larger limit is POST /decisions' own"
    keys = next(h for h in hostile_requests() if h.name == "6k vote keys").body  # 128 KiB, a comma every 10 bytes
    reply = ask(big.node, "POST /decisions", keys)
    assert (reply.status, reply.body["error"]) == (400, "invalid_packet") and "too many values" in reply.body["detail"], \
        "the parser's shape limits follow the body's size, not the route's 1 MiB: refused before json.loads"


def test_a_decision_floods_over_the_peers_to_every_node_and_a_node_that_was_down_catches_up(tmp_path):
    """A ring of 12 simulated monitored nodes: a decision posted at one reaches all with at most N (2 + fanout)
    requests (each node, once: its 2 peers and DECISION_FANOUT random others), not N(N-1)."""
    quiet = MonitorConfig(audit_interval=None)
    names = [f"n{i:02d}" for i in range(12)]
    with SimNetwork(5, root=tmp_path, trace=True) as net:
        for name in names:
            net.add(name, open_monitored_node, monitor=quiet)
        for a, b in zip(names, names[1:] + names[:1]):
            net.link(a, b)
        net.start()
        net.run(seconds=90)  # directory rounds: every node verifies every other
        nodes = {name: net.hosts[name].node for name in names}
        assert all(len(n.roles["ballot"].electorate()) == 12 for n in nodes.values())
        identities = [n.identity for n in nodes.values()]
        x = voters(1)[0]
        for node in nodes.values():  # a server all of them know and have reached (nor a blacklist of one only named)
            node.roles["peers"].remember(Server(x.id, "http://10.9.9.9:8000", x.public), listed_by=None, verified=True)
        net.crash("n06")
        votes = [vote(identity, x.id, "blacklist", net.clock()) for identity in identities]
        before = len(net.trace)
        reply = net.request("n00", "POST", "/decisions", decision(votes, x.id, net.clock()))
        assert reply.status == 200 and reply.body["applied"]
        net.run(seconds=5)
        up = [name for name in names if name != "n06"]
        assert all(x.id in net.hosts[name].node.roles["ballot"].blacklisted for name in up)
        posts = [e for e in net.trace[before:] if e.kind == "request" and e.what == "POST /decisions"]
        assert len(posts) <= len(names) * (2 + DECISION_FANOUT) < len(names) * (len(names) - 1), len(posts)
        net.start("n06")  # back: it resolves its peers, and asks them for the decisions they hold
        net.run(seconds=5)
        assert x.id in net.hosts["n06"].node.roles["ballot"].blacklisted
        assert not net.bugs


def test_over_http_the_decision_route_takes_its_own_larger_limit_and_refuses_more_before_reading(tmp_path):
    "The real driver (Flask + waitress): 338 KB is fine on POST /decisions, not on POST /messages; > 1 MiB is 413."
    import socket
    from urllib.parse import urlsplit

    import requests

    from bubble_ref.relay import start_server

    world = Big(tmp_path / "big", peers=0)  # no peers: nothing to pass the decision on to
    running = start_server(world.node)
    try:
        url = world.node.url
        majority = json.dumps(decision(world.votes[:N // 2 + 1], world.x.id, world.clock())).encode()
        json_headers = {"Content-Type": "application/json"}
        answer = requests.post(f"{url}/decisions", data=majority, headers=json_headers, timeout=60)
        assert answer.status_code == 200 and answer.json()["applied"], answer.text
        refused = requests.post(f"{url}/messages", data=majority, headers=json_headers, timeout=60)
        assert refused.status_code == 413 and refused.json()["error"] == "too_large"
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:  # headers only, no body
            sock.sendall(b"POST /decisions HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (MAX_DECISION_BYTES + 1))
            head = b""
            while chunk := sock.recv(65536):  # the node answers at once and closes: it never waits for the body
                head += chunk
        assert head.startswith(b"HTTP/1.1 413") and b"too_large" in head and str(MAX_DECISION_BYTES).encode() in head
    finally:
        running.stop()
        world.node.close()
