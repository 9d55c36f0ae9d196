"""Server monitoring (issue 6): transaction log, reputation, audits, reports, votes and quorum decisions.

The first part runs the sans-IO `MonitoredNode` on manual clocks (the rules, one by one). The second part runs
real `bubble-ref node` processes on 127.0.0.1 and talks HTTP to them: a dropper is audited, reported, voted on
and blacklisted by the mesh itself; hand-made decisions (signed with the nodes' own keys, read from their data
directories) are applied, refused when forged or short of a majority, and reversed by a whitelist.
Nothing asserts on wall-clock durations: every wait is a poll with a deadline.
"""
from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import timedelta

import pytest
import requests

from bubble_ref.client import CLIENT_MIN_PADDED
from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, seal
from bubble_ref.mesh import ServerEntry, free_port, sign_body, sign_relay, verify_server_list
from bubble_ref.node import NodeError
from bubble_ref.packets import QuorumDecision, ServerListRequest, format_timestamp, parse_timestamp
from bubble_ref.reputation import (
    WEIGHTS, MonitorConfig, MonitoredNode, bench_monitoring, has_majority, next_score, opinion, proposal_for,
    sign_report, simulate_monitoring)
from bubble_ref.store import ManualClock
from nodes import HTTP_TIMEOUT, assert_error
from test_mesh import Launcher, MeshProcess, wait_until

FAST_MONITOR = ("--audit-interval", "0.5", "--audit-deadline", "0.4", "--directory-interval", "0.3")
QUIET_MONITOR = ("--audit-interval", "0", "--directory-interval", "0.3")  # no audits: only what the test does


# ------------------------------------------------------------------- the rules, on manual clocks
@pytest.fixture
def world(tmp_path):
    "Four monitored nodes on one manual clock that know each other and a fifth server X (not running)."
    clock = ManualClock()
    nodes = [MonitoredNode.open(tmp_path / f"n{i}", clock=clock) for i in range(4)]
    x = Identity.generate()
    for node in nodes:
        for i, other in enumerate([n.identity for n in nodes] + [x]):
            node.learn_server(ServerEntry(other.id, f"http://127.0.0.{i + 1}:8000", other.public))
    yield nodes, x, clock
    for node in nodes:
        node.close()


def vote(identity: Identity, about: str, value: str, clock) -> dict:
    return sign_body(identity, {"type": "vote", "voter_id": identity.id, "reported_server_id": about,
                                "vote": value, "timestamp": format_timestamp(clock())})


def decision(votes: list[dict], about: str, clock, final: str = "blacklisted") -> dict:
    return QuorumDecision(reported_server_id=about, votes={v["voter_id"]: v["vote"] for v in votes},
                          final_decision=final, timestamp=format_timestamp(clock()), signed_votes=tuple(votes)).to_dict()


def refusal(node: MonitoredNode, body: dict) -> tuple[int, str]:
    with pytest.raises(NodeError) as excinfo:
        node.receive_decision(json.dumps(body))
    return excinfo.value.status, excinfo.value.code


def test_scores_are_weighted_moving_averages(tmp_path):
    node = MonitoredNode.open(tmp_path / "n", clock=ManualClock())
    peer = "ab" * 32
    assert node.score(peer) == 1.0
    node.record(peer, "audit", "p1", "audit_failed")
    target, weight = WEIGHTS["audit_failed"]
    assert node.score(peer) == pytest.approx((1 - weight) * 1.0 + weight * target) == next_score(1.0, "audit_failed")
    node.record(peer, "out", "p2", "delivered")
    assert node.score(peer) > (1 - weight)  # good outcomes pull it back up, slowly
    node.record(peer, "audit", "p3", "audit_void")
    assert node.score(peer) == pytest.approx(next_score(next_score(1.0, "audit_failed"), "delivered"))
    assert [t.outcome for t in node.transactions(peer)] == ["audit_void", "delivered", "audit_failed"]
    node.close()


def test_transactions_are_pruned_with_the_retention(tmp_path):
    clock = ManualClock()
    node = MonitoredNode.open(tmp_path / "n", clock=clock)
    node.record("cd" * 32, "in", "p", "accepted")
    clock.advance(node.config.retention + node.config.sweep_interval + timedelta(seconds=1))
    node.tick()
    assert node.transactions() == []
    node.close()


def test_votes_come_from_own_evidence_with_a_gap_between_the_thresholds():
    config = MonitorConfig()
    assert opinion(0.36, True, config) == "blacklist"
    assert opinion(0.6, True, config) == "abstain"  # between 0.5 and 0.7: no flapping
    assert opinion(1.0, True, config) == "whitelist" and opinion(1.0, False, config) == "abstain"
    assert proposal_for(0.4, False, config) == "blacklisted" and proposal_for(0.4, True, config) is None
    assert proposal_for(0.8, True, config) == "whitelisted" and proposal_for(0.8, False, config) is None


def test_majority_is_of_every_known_active_server_not_of_the_votes_cast():
    electorate = {"a", "b", "c", "d", "x"}
    assert has_majority({"a": "blacklist", "b": "blacklist", "c": "blacklist"}, electorate, "x", "blacklisted")
    assert not has_majority({"a": "blacklist", "b": "blacklist"}, electorate, "x", "blacklisted")  # 2 of 4
    assert not has_majority({"a": "blacklist", "b": "blacklist", "x": "blacklist", "z": "blacklist"}, electorate, "x",
                            "blacklisted")  # the accused and strangers do not count
    assert has_majority({"a": "whitelist", "b": "whitelist", "c": "whitelist"}, electorate, "x", "whitelisted")


def test_a_decision_needs_valid_signatures_and_a_real_majority(world):
    nodes, x, clock = world
    three = [vote(n.identity, x.id, "blacklist", clock) for n in nodes[:3]]
    two = [*three[:2], vote(nodes[2].identity, x.id, "abstain", clock)]
    forged = [*three[:2], {**three[2], "vote": "blacklist", "voter_id": nodes[3].id}]  # n2's signature, n3's name
    assert refusal(nodes[3], decision(two, x.id, clock)) == (403, "no_majority")
    assert refusal(nodes[3], decision(forged, x.id, clock)) == (403, "bad_vote")
    altered = {**decision(two, x.id, clock), "votes": {v["voter_id"]: "blacklist" for v in two}}
    assert refusal(nodes[3], altered) == (400, "invalid_packet")
    bare = {k: v for k, v in decision(three, x.id, clock).items() if k != "signed_votes"}
    assert refusal(nodes[3], bare) == (400, "unsigned_decision")
    other = [vote(n.identity, nodes[0].id, "blacklist", clock) for n in nodes[1:3]] + [three[2]]
    assert refusal(nodes[3], decision(other, nodes[0].id, clock)) == (400, "invalid_packet")  # a vote about x
    assert x.id not in nodes[3].blacklisted()
    assert nodes[3].receive_decision(json.dumps(decision(three, x.id, clock)))["applied"]
    assert x.id in nodes[3].blacklisted()
    assert nodes[3].status()["blacklisted"] == 1


def test_votes_must_be_fresh_and_decisions_newer_than_the_last(world):
    nodes, x, clock = world
    old_votes = [vote(n.identity, x.id, "blacklist", clock) for n in nodes[:3]]
    clock.advance(timedelta(minutes=11))
    assert refusal(nodes[3], decision(old_votes, x.id, clock)) == (403, "stale_vote")
    blacklist = decision([vote(n.identity, x.id, "blacklist", clock) for n in nodes[:3]], x.id, clock)
    assert nodes[3].receive_decision(json.dumps(blacklist))["applied"]
    clock.advance(timedelta(minutes=1))
    whitelist = decision([vote(n.identity, x.id, "whitelist", clock) for n in nodes[:3]], x.id, clock, "whitelisted")
    assert nodes[3].receive_decision(json.dumps(whitelist))["applied"]
    assert x.id not in nodes[3].blacklisted()
    assert not nodes[3].receive_decision(json.dumps(blacklist))["applied"]  # a replay of the older decision
    assert x.id not in nodes[3].blacklisted()
    clock.advance(timedelta(days=2))
    assert refusal(nodes[2], whitelist) == (403, "stale_decision")


def test_tally_counts_only_known_signed_votes_and_applies_nothing_itself(world):
    nodes, x, clock = world
    stranger = Identity.generate()
    votes = [vote(nodes[1].identity, x.id, "blacklist", clock), vote(stranger, x.id, "blacklist", clock),
             {**vote(nodes[2].identity, x.id, "blacklist", clock), "signature": "A" * 344}]
    nodes[0].record(x.id, "audit", "p", "audit_failed")
    nodes[0].record(x.id, "audit", "q", "audit_failed")
    assert nodes[0].make_vote(x.id)["vote"] == "blacklist"
    assert nodes[0].tally(x.id, "blacklisted", [nodes[0].make_vote(x.id), *votes]) is None  # 2 of 4 counted
    votes[2] = vote(nodes[2].identity, x.id, "blacklist", clock)
    made = nodes[0].tally(x.id, "blacklisted", [nodes[0].make_vote(x.id), *votes])
    assert made is not None and stranger.id not in made["votes"] and len(made["signed_votes"]) == 3
    assert x.id not in nodes[0].blacklisted()  # a tally is a proposal until receive_decision checks it


def test_reports_must_be_signed_by_their_reporter_and_only_make_the_node_look(world):
    nodes, x, clock = world
    server = nodes[1].identity
    report = sign_report(server, x.id, b"audit abc failed", clock)
    answer = nodes[0].receive_report(json.dumps(report))
    assert answer["stored"] and answer["from_server"] and answer["reports_about"] == 1
    assert not nodes[0].receive_report(json.dumps(report))["stored"]  # the same report twice is one
    assert nodes[0].score(x.id) == 1.0  # a signal, not proof: no score moves ...
    assert nodes[0].make_audit().target.server_id == x.id  # ... but the node audits x next
    unsigned = {k: v for k, v in report.items() if k not in ("signature", "public_key")}
    forged = {**report, "evidence": base64.b64encode(b"something else").decode()}
    impostor = {**sign_report(Identity.generate(), x.id, b"", clock), "reporter_id": server.id}
    for body, expected in ((unsigned, (400, "unsigned_report")), (forged, (403, "bad_signature")),
                           (impostor, (400, "invalid_packet"))):
        with pytest.raises(NodeError) as excinfo:
            nodes[0].receive_report(json.dumps(body))
        assert (excinfo.value.status, excinfo.value.code) == expected
    clock.advance(timedelta(minutes=10))
    with pytest.raises(NodeError) as excinfo:
        nodes[0].receive_report(json.dumps(report))
    assert excinfo.value.code == "stale_report"


def test_client_reports_are_rate_limited_per_key(world):
    nodes, x, clock = world
    client = Identity.generate()
    limit = nodes[0].monitor.client_reports_per_minute
    for i in range(limit):
        assert not nodes[0].receive_report(json.dumps(sign_report(client, x.id, bytes([i]), clock)))["from_server"]
    with pytest.raises(NodeError) as excinfo:
        nodes[0].receive_report(json.dumps(sign_report(client, x.id, b"one too many", clock)))
    assert (excinfo.value.status, excinfo.value.code) == (429, "rate_limited")
    other = Identity.generate()
    assert nodes[0].receive_report(json.dumps(sign_report(other, x.id, b"another client", clock)))["stored"]
    clock.advance(timedelta(minutes=1))
    assert nodes[0].receive_report(json.dumps(sign_report(client, x.id, b"a minute later", clock)))["stored"]


def test_audit_packets_look_like_client_traffic(world, alice, bob):
    nodes, x, _ = world
    audit = nodes[0].make_audit()
    client_like = check_packet(seal(alice, bob.public, "hello", min_padded=CLIENT_MIN_PADDED))
    packet = check_packet(audit.packet)
    assert len(packet.message_box) == len(client_like.message_box)
    assert len(packet.signature_box) == len(client_like.signature_box)
    assert audit.target.server_id not in {c.server_id for c in audit.checks} and len(audit.checks) == 3


def test_no_audit_without_a_known_server(tmp_path):
    lonely = MonitoredNode.open(tmp_path / "lonely", peers=("http://127.0.0.1:9",))
    assert lonely.make_audit() is None
    lonely.close()


def test_misbehaviour_modes_are_checked(tmp_path):
    with pytest.raises(ValueError, match="behaviour must be one of"):
        MonitoredNode.open(tmp_path / "n", behaviour="lazy")


# ------------------------------------------------------------------- the simulator and the benchmark
def test_simulated_runs_reproduce_exactly_with_a_seed():
    a = simulate_monitoring(loss=0.1, droppers=[3], selective=[7], seed=5)
    b = simulate_monitoring(loss=0.1, droppers=[3], selective=[7], seed=5)
    c = simulate_monitoring(loss=0.1, droppers=[3], selective=[7], seed=6)
    assert a == b and a.digest != c.digest


def test_simulated_droppers_fall_and_honest_nodes_and_minorities_do_not():
    result = bench_monitoring(seeds=6)
    assert result["silent"]["never"] == 0 and result["selective"]["never"] == 0
    assert result["silent"]["worst"] <= 3
    assert result["honest_blacklisted"] == 0 and result["coups"] == 0
    majority = simulate_monitoring(loss=0.1, colluders=range(12, 25), victim=0, seed=2)
    assert majority.round_blacklisted(0) is not None  # the rule protects against a minority, not a majority


def test_bench_monitoring_refuses_nonsense():
    with pytest.raises(ValueError):
        bench_monitoring(seeds=0)
    with pytest.raises(ValueError):
        bench_monitoring(loss=1.0)


# ------------------------------------------------------------------- real nodes over HTTP
def ring(launcher: Launcher, names: str, *extra: str, per_node: dict | None = None) -> dict[str, MeshProcess]:
    ports = {n: free_port() for n in names}
    procs = {}
    for i, n in enumerate(names):
        neighbours = {names[(i - 1) % len(names)], names[(i + 1) % len(names)]} - {n}
        procs[n] = MeshProcess(launcher.root / n, n, ports[n], [f"http://127.0.0.1:{ports[m]}" for m in sorted(neighbours)],
                               *extra, *(per_node or {}).get(n, ()))
    launcher.start(*procs.values())
    return procs


def reputation(proc: MeshProcess) -> dict:
    return requests.get(f"{proc.url}/reputation", timeout=HTTP_TIMEOUT).json()


def knows_everyone(procs: dict[str, MeshProcess]):
    return lambda: all(p.status()["known_servers"] == len(procs) - 1 for p in procs.values())


@pytest.fixture
def launcher(tmp_path):
    launched = Launcher(tmp_path)
    yield launched
    launched.stop_all()


def test_a_dropper_is_audited_reported_voted_on_and_blacklisted_by_the_mesh(launcher, alice, bob):
    procs = ring(launcher, "ABCDE", *FAST_MONITOR, per_node={"E": ("--behaviour", "drop")})
    honest = [procs[n] for n in "ABCD"]
    packet = seal(alice, bob.public, "logged")
    assert requests.post(f"{procs['A'].url}/messages", json=packet.to_dict(), timeout=HTTP_TIMEOUT).status_code == 202
    e_id = procs["E"].server_key().id
    wait_until(lambda: all(e_id in reputation(p)["blacklisted"] for p in honest), "every honest node to blacklist E",
               timeout=90)
    views = {p.name: reputation(p) for p in honest}
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
    decision_ = next(d for d in views["A"]["decisions"] if d["reported_server_id"] == e_id)
    assert decision_["final_decision"] == "blacklisted" and len(decision_["signed_votes"]) == len(decision_["votes"])
    assert list(decision_["votes"].values()).count("blacklist") >= 3  # > half of the 4 servers besides E
    assert min(p.status()["lowest_reputation"] for p in honest) < 0.5
    # E's relays are refused, and E is left out of server lists
    now = parse_timestamp(procs["A"].status()["time"])
    probe = seal(alice, bob.public, "after the decision")
    relay = sign_relay(procs["E"].server_key(), probe.to_dict(), check_packet(probe).id, now + timedelta(days=1), 1, now)
    assert_error(requests.post(f"{procs['A'].url}/relay", json=relay, timeout=HTTP_TIMEOUT), 403, "blacklisted")
    request = ServerListRequest(requester_id=alice.id, timestamp=format_timestamp(now)).to_dict()
    listed = verify_server_list(requests.post(f"{procs['A'].url}/servers", json=request, timeout=HTTP_TIMEOUT).json())
    assert e_id not in {entry.server_id for entry in listed}


def test_reports_over_http(launcher, alice):
    procs = ring(launcher, "ABC", *QUIET_MONITOR)
    wait_until(knows_everyone(procs), "every node to know the others")
    c_id = procs["C"].server_key().id
    from_b = sign_report(procs["B"].server_key(), c_id, b"audit failed")
    response = requests.post(f"{procs['A'].url}/reports", json=from_b, timeout=HTTP_TIMEOUT)
    assert response.status_code == 202 and response.json()["from_server"] is True
    assert reputation(procs["A"])["reports"] == {c_id: 1}
    assert reputation(procs["A"])["scores"].get(c_id, 1.0) == 1.0  # a report alone moves no score
    unsigned = {k: v for k, v in sign_report(alice, c_id, b"x").items() if k not in ("signature", "public_key")}
    assert_error(requests.post(f"{procs['A'].url}/reports", json=unsigned, timeout=HTTP_TIMEOUT), 400,
                 "unsigned_report")
    forged = {**sign_report(alice, c_id, b"x"), "reported_server_id": procs["B"].server_key().id}
    assert_error(requests.post(f"{procs['A'].url}/reports", json=forged, timeout=HTTP_TIMEOUT), 403, "bad_signature")
    assert_error(requests.post(f"{procs['A'].url}/reports", data="{not json", timeout=HTTP_TIMEOUT,
                               headers={"Content-Type": "application/json"}), 400, "invalid_packet")
    codes = [requests.post(f"{procs['A'].url}/reports", json=sign_report(alice, c_id, bytes([i])),
                           timeout=HTTP_TIMEOUT).status_code for i in range(8)]
    assert codes[:6] == [202] * 6 and codes[6:] == [429, 429]  # a client key is rate limited


def test_quorum_decisions_over_http(launcher, alice, bob):
    procs = ring(launcher, "ABCX", *QUIET_MONITOR)
    wait_until(knows_everyone(procs), "every node to know the others")
    keys = {n: p.server_key() for n, p in procs.items()}
    x_id = keys["X"].id
    clock = lambda: parse_timestamp(procs["A"].status()["time"])
    post = lambda name, body: requests.post(f"{procs[name].url}/decisions", json=body, timeout=HTTP_TIMEOUT)
    # 1 of the 3 servers besides X is no majority; a forged vote spoils a decision
    assert_error(post("A", decision([vote(keys["B"], x_id, "blacklist", clock)], x_id, clock)), 403, "no_majority")
    forged = [vote(keys["B"], x_id, "blacklist", clock),
              {**vote(keys["B"], x_id, "blacklist", clock), "voter_id": keys["C"].id}]
    assert_error(post("A", decision(forged, x_id, clock)), 403, "bad_vote")
    # a real majority (B and C) is applied by A, and spreads to the others
    votes = [vote(keys[n], x_id, "blacklist", clock) for n in "BC"]
    answer = post("A", decision(votes, x_id, clock))
    assert answer.status_code == 200 and answer.json()["applied"] is True
    wait_until(lambda: all(x_id in reputation(procs[n])["blacklisted"] for n in "ABC"), "the decision to spread")
    packet = seal(alice, bob.public, "from a blacklisted server")
    checked = check_packet(packet)
    now = clock()
    relay = sign_relay(keys["X"], packet.to_dict(), checked.id, now + timedelta(days=1), 1, now)
    assert_error(requests.post(f"{procs['A'].url}/relay", json=relay, timeout=HTTP_TIMEOUT), 403, "blacklisted")
    request = ServerListRequest(requester_id=alice.id, timestamp=format_timestamp(now)).to_dict()
    listed = verify_server_list(requests.post(f"{procs['A'].url}/servers", json=request, timeout=HTTP_TIMEOUT).json())
    assert x_id not in {entry.server_id for entry in listed}
    # a whitelist decided the same way reverses it
    later = lambda: clock() + timedelta(seconds=2)  # timestamps have whole seconds; a decision must be newer
    whitelist = decision([vote(keys[n], x_id, "whitelist", later) for n in "BC"], x_id, later, "whitelisted")
    assert post("A", whitelist).json()["applied"] is True
    wait_until(lambda: all(x_id not in reputation(procs[n])["blacklisted"] for n in "ABC"), "the whitelist to spread")
    assert requests.post(f"{procs['A'].url}/relay", json=relay, timeout=HTTP_TIMEOUT).status_code == 202
