"""Transaction log, reputation scores and audits (issue 6, first part), on in-process nodes."""
import json
import random
import time
from datetime import timedelta

import pytest
import requests

from bubble_ref.client import CLIENT_MIN_PADDED
from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, seal
from bubble_ref.mesh import (
    MeshConfig, add_mesh_routes, build_topology, free_port, sign_relay, start_mesh_workers, wait_for_peers)
from bubble_ref.node import NodeConfig, NodeError
from bubble_ref.relay import create_app, start_server
from bubble_ref.reputation import WEIGHTS, MonitoredNode, add_reputation_routes, run_audit
from bubble_ref.store import ManualClock


@pytest.fixture
def triangle(tmp_path):
    "A, B honest; C a dropper; each linked to the other two; anti-entropy out of the way."
    names = "ABC"
    urls = {n: f"http://127.0.0.1:{free_port()}" for n in names}
    links = build_topology(3, "ring")
    nodes, handles = {}, []
    for i, n in enumerate(names):
        node = MonitoredNode.open(tmp_path / n, peers=tuple(urls[names[j]] for j in links[i]),
                                  config=NodeConfig(name=n), mesh=MeshConfig(sync_interval=timedelta(hours=1)),
                                  dropper=(n == "C"), rng=random.Random(i))
        app = create_app(node)
        add_mesh_routes(app, node)
        add_reputation_routes(app, node)
        handles.append((start_server(node, port=int(urls[n].rsplit(":", 1)[1]), app=app), start_mesh_workers(node)))
        node.url, nodes[n] = urls[n], node
    wait_for_peers(nodes.values())
    yield nodes, urls
    for server, workers in handles:
        workers.halt()
        server.stop()
    for node in nodes.values():
        node.close()


def test_scores_are_weighted_moving_averages(tmp_path):
    node = MonitoredNode.open(tmp_path / "n", clock=ManualClock())
    peer = "ab" * 32
    assert node.score(peer) == 1.0
    node.record(peer, "audit", "p1", "audit_failed")
    target, weight = WEIGHTS["audit_failed"]
    assert node.score(peer) == pytest.approx((1 - weight) * 1.0 + weight * target)
    node.record(peer, "out", "p2", "delivered")
    assert node.score(peer) > (1 - weight)  # good outcomes pull it back up, slowly
    assert [t.outcome for t in node.transactions(peer)] == ["delivered", "audit_failed"]
    node.close()


def test_transactions_are_pruned_with_the_retention(tmp_path):
    clock = ManualClock()
    node = MonitoredNode.open(tmp_path / "n", clock=clock)
    node.record("cd" * 32, "in", "p", "accepted")
    clock.advance(node.config.retention + node.config.sweep_interval + timedelta(seconds=1))
    node.tick()
    assert node.transactions() == []
    node.close()


def test_audits_pass_for_an_honest_peer_and_fail_for_a_dropper(triangle):
    nodes, urls = triangle
    a = nodes["A"]
    outcomes = {}
    for _ in range(4):
        outcome = run_audit(a, deadline=0.5)
        audited = a.audits()[-1][1]
        outcomes.setdefault(audited, set()).add(outcome)
    assert outcomes.get(nodes["B"].id, {"audit_passed"}) == {"audit_passed"}
    assert outcomes[nodes["C"].id] == {"audit_failed"}  # seed 0 audits C at least once
    assert a.score(nodes["C"].id) < a.score(nodes["B"].id)
    evidence = [row for row in a.audits() if row[1] == nodes["C"].id]
    assert evidence and all(result == "audit_failed" for _, _, result in evidence)
    reputation = requests.get(f"{urls['A']}/reputation", timeout=5).json()
    assert reputation["scores"][nodes["C"].id] < 1.0
    assert requests.get(f"{urls['A']}/status", timeout=5).json()["lowest_reputation"] < 1.0


def test_audit_packets_look_like_client_traffic(triangle, alice, bob):
    nodes, _ = triangle
    delivery, proofs = nodes["A"].make_audit()
    client_like = check_packet(seal(alice, bob.public, "hello", min_padded=CLIENT_MIN_PADDED))
    audit = check_packet(delivery.body["packet"])
    assert len(audit.message_box) == len(client_like.message_box)
    assert len(audit.signature_box) == len(client_like.signature_box)
    assert len(proofs) == 1 and delivery.peer not in proofs  # the others are asked, not the audited peer


def test_relays_are_logged_and_only_what_a_peer_signed_counts_against_it(triangle, alice, bob):
    nodes, urls = triangle
    packet = seal(alice, bob.public, "logged")
    requests.post(f"{urls['A']}/messages", json=packet.to_dict(), timeout=5)
    deadline = time.monotonic() + 10  # B logs "accepted" before it answers; A logs "delivered" once the answer is in
    while not (any(t.outcome == "accepted" for t in nodes["B"].transactions())
               and any(t.outcome == "delivered" for t in nodes["A"].transactions())):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stranger = Identity.generate()
    checked = check_packet(packet)
    forged = {**sign_relay(stranger, packet.to_dict(), checked.id, nodes["A"].clock() + timedelta(days=1), 1,
                           nodes["A"].clock()), "sender_id": nodes["A"].id}
    before = nodes["B"].score(nodes["A"].id)
    with pytest.raises(NodeError):
        nodes["B"].relay_in(json.dumps(forged))  # a stranger pretending to be A...
    assert nodes["B"].score(nodes["A"].id) == before  # ...costs A nothing
    too_far = sign_relay(nodes["A"].identity, packet.to_dict(), checked.id, nodes["A"].clock() + timedelta(days=1),
                         99, nodes["A"].clock())
    with pytest.raises(NodeError):
        nodes["B"].relay_in(json.dumps(too_far))  # A itself breaking the hop limit does
    assert nodes["B"].transactions(nodes["A"].id)[0].outcome == "refused"
    assert nodes["B"].score(nodes["A"].id) < before


def test_no_audit_with_fewer_than_two_known_peers(tmp_path):
    lonely = MonitoredNode.open(tmp_path / "lonely", peers=("http://127.0.0.1:9",))
    assert lonely.make_audit() is None
    lonely.close()
