"""The abstract broadcast models (`bubble_ref.strategies`, formerly `sim`): reproducibility, strategies, faults,
and that the `Flood` model's rule is the real node's (checked against `Broadcast` in process, no sockets)."""
from __future__ import annotations

import random
from datetime import timedelta

import pytest

from bubble_ref.envelope import packet_id, seal
from bubble_ref.mesh import HOP_LIMIT, MeshConfig, build_topology, open_mesh_node, sign_relay
from bubble_ref.node import NodeConfig
from bubble_ref.store import ManualClock
from bubble_ref.strategies import (
    GRAFT, IHAVE, PAYLOAD, PRUNE, Flood, Gossip, Msg, Network, Plumtree, RunResult, Send, bench_mesh, compare,
    diameter, flood_targets, format_table, is_connected, partition, run)

from inproc import ask, calls, pin

STRATEGIES = [Flood, lambda: Gossip(fanout=2), Plumtree]


def kinds(result: RunResult) -> dict[str, int]:
    return dict(result.sent_by_kind)


# ------------------------------------------------------------------ reproducibility

@pytest.mark.parametrize("make", STRATEGIES)
def test_same_seed_same_run(make):
    kw = dict(n=15, broadcasts=15, loss=0.1, jitter=0.03, droppers=1, selective=1, seed=3)
    a, b = run(make(), **kw), run(make(), **kw)
    assert a == b  # every latency, every count, the digest of every event
    assert a.digest == b.digest and a.events == b.events > 0


@pytest.mark.parametrize("make", STRATEGIES)
def test_other_seed_other_run(make):
    kw = dict(n=15, broadcasts=15, loss=0.1, jitter=0.03)
    a, b = run(make(), seed=1, **kw), run(make(), seed=2, **kw)
    assert a.digest != b.digest
    assert [x.latencies for x in a.broadcasts] != [x.latencies for x in b.broadcasts]


def test_same_topology_other_seed_changes_event_order():
    links = build_topology(12, "random", 3, seed=5)
    a = run(Gossip(fanout=2), links=links, broadcasts=10, jitter=0.05, seed=1, trace=True)
    b = run(Gossip(fanout=2), links=links, broadcasts=10, jitter=0.05, seed=2, trace=True)
    assert a.links == b.links and a.trace != b.trace and a.digest != b.digest


def test_trace_is_in_time_order_and_clock_is_clean():
    r = run(Flood(), links=build_topology(6, "ring"), broadcasts=2, trace=True)
    times = [float(line.split()[0]) for line in r.trace]
    assert times == sorted(times)
    assert {t for b in r.broadcasts for t in b.latencies} == {0.1, 0.2, 0.3}  # 0.1 + 0.2 is 0.3 on this clock


def test_event_loop_runs_equal_times_in_schedule_order():
    net = Network([[1], [0]], Flood(), rng=random.Random(0))
    seen = []
    for label in "abc":
        net.set_timer(0.5, seen.append, label)
    net.set_timer(0.1, seen.append, "first")
    net.run()
    assert seen == ["first", "a", "b", "c"] and net.now == 0.5


# ------------------------------------------------------------------ strategies

def test_flood_cost_and_latency_on_a_clean_network():
    links = build_topology(25, "random", 4, seed=0)
    r = run(Flood(), links=links, broadcasts=30)
    n_links = sum(map(len, links)) // 2
    assert r.delivery_ratio == 1.0
    assert r.messages_per_broadcast == r.payloads_per_broadcast == 2 * n_links - (25 - 1)
    assert r.max_latency == pytest.approx(0.1 * diameter(links))  # shortest paths, 100 ms per link
    assert kinds(r)[IHAVE] == kinds(r)[GRAFT] == kinds(r)[PRUNE] == 0


def test_flood_reaches_every_honest_node_with_one_dropper():
    checked = 0
    for seed in range(8):
        r = run(Flood(), n=20, degree=4, droppers=1, broadcasts=20, seed=seed)
        (bad, behaviour), = r.misbehaving
        assert behaviour == "drop"
        if not is_connected(r.links, [bad]):
            continue  # the dropper is a cut vertex: nothing can get past it
        checked += 1
        assert r.delivery_ratio == 1.0 and r.complete == 20
    assert checked >= 3


def test_flood_with_a_dropper_on_a_ring():
    links = build_topology(10, "ring")
    r = run(Flood(), links=links, droppers=[4], broadcasts=20)
    assert is_connected(links, [4]) and r.delivery_ratio == 1.0
    assert all(b.origin != 4 and len(b.latencies) == 8 for b in r.broadcasts)  # 10 nodes - dropper - origin


def test_a_cut_vertex_defeats_every_strategy():
    links = [[1], [0, 2, 3], [1, 3], [1, 2]]  # node 0 hangs on node 1
    for make in STRATEGIES:
        r = run(make(), links=links, droppers=[1], broadcasts=10)
        assert r.delivery_ratio < 1.0


def test_gossip_sends_fewer_payloads_than_flood():
    for fanout in (1, 2, 3):
        kw = dict(n=25, degree=5, broadcasts=40, seed=4)
        flood, gossip = run(Flood(), **kw), run(Gossip(fanout=fanout), **kw)
        assert gossip.payloads_per_broadcast < flood.payloads_per_broadcast
        assert gossip.messages_per_broadcast == gossip.payloads_per_broadcast


def test_gossip_never_sends_back_or_beyond_fanout():
    links = build_topology(12, "random", 5, seed=2)
    net = Network(links, Gossip(fanout=2), rng=random.Random(0))
    out = net.strategy.on_receive(0, Msg(0, hops=1), links[0][0], PAYLOAD)
    assert len(out) == 2 and links[0][0] not in [s.to for s in out] and {s.to for s in out} <= set(links[0])
    assert net.strategy.on_receive(0, Msg(0, hops=1), links[0][1], PAYLOAD) == []  # a duplicate
    with pytest.raises(ValueError):
        Gossip(fanout=0)


def test_plumtree_settles_on_a_tree():
    six = [[1, 2], [0, 2, 3], [0, 1, 3, 4], [1, 2, 5], [2, 5], [3, 4]]
    r = run(Plumtree(), links=six, broadcasts=10)
    assert r.delivery_ratio == 1.0
    assert r.broadcasts[0].payloads == 2 * 8 - 5  # the first broadcast is a flood...
    assert [b.payloads for b in r.broadcasts[1:]] == [5] * 9  # ...then one payload per tree link


def test_plumtree_sends_fewer_payloads_than_flood():
    kw = dict(n=25, degree=4, broadcasts=50, seed=0)
    flood, plum = run(Flood(), **kw), run(Plumtree(), **kw)
    assert plum.delivery_ratio == 1.0
    assert plum.payloads_per_broadcast < 0.5 * flood.payloads_per_broadcast
    assert kinds(plum)[IHAVE] > 0 and kinds(plum)[PRUNE] > 0


def test_plumtree_repairs_around_a_dropped_eager_link():
    links = build_topology(20, "random", 4, seed=1)
    probe = Plumtree()
    run(probe, links=links, broadcasts=10, seed=1)  # the tree after ten broadcasts (t < 10 s)
    tree_links = sorted({(a, b) for a in range(20) for b in probe.eager[a] if a < b and a in probe.eager[b]})
    cuttable = [(a, b) for a, b in tree_links
                if is_connected([[w for w in links[v] if {v, w} != {a, b}] for v in range(20)])]
    assert cuttable
    a, b = cuttable[0]
    # the same run (same seed) up to t = 10 s, then that eager link drops everything
    before = run(Plumtree(), links=links, broadcasts=40, seed=1)
    cut = run(Plumtree(), links=links, broadcasts=40, seed=1, partitions=[partition((a, b), start=10.0)])
    assert cut.broadcasts[:10] == before.broadcasts[:10]
    assert cut.delivery_ratio == 1.0 and cut.complete == 40
    assert kinds(cut)[GRAFT] > kinds(before)[GRAFT]  # repaired by lazy push: IHAVE, then GRAFT


def test_plumtree_with_a_link_down_from_the_start():
    links = build_topology(20, "random", 4, seed=1)
    a, b = next((a, b) for a in range(20) for b in links[a]
                if a < b and is_connected([[w for w in links[v] if {v, w} != {a, b}] for v in range(20)]))
    r = run(Plumtree(), links=links, broadcasts=30, seed=1, partitions=[partition((b, a))])
    assert r.delivery_ratio == 1.0


def test_plumtree_graft_is_answered_with_the_packet():
    net = Network([[1], [0]], Plumtree(), rng=random.Random(0))
    p = net.strategy
    assert p.on_broadcast(0, Msg(7)) == [Send(1, PAYLOAD, Msg(7, hops=1))]
    p._make_lazy(0, 1)
    assert p.on_receive(0, Msg(7, hops=1), 1, GRAFT) == [Send(1, PAYLOAD, Msg(7, hops=1))]
    assert 1 in p.eager[0]  # and the link is eager again
    timer, = p.on_receive(1, Msg(8, hops=1), 0, IHAVE)  # node 1 lacks 8: wait, then graft
    assert timer.delay == pytest.approx(0.4)
    assert p.on_timer(1, timer)[0] == Send(0, GRAFT, Msg(8, hops=1))


# ------------------------------------------------------------------ faults

def test_loss_reduces_delivery_and_is_counted_as_sent():
    links = build_topology(25, "random", 4, seed=0)
    clean = run(Flood(), links=links, broadcasts=40, seed=2)
    lossy = run(Flood(), links=links, broadcasts=40, seed=2, loss=0.3)
    assert clean.delivery_ratio == 1.0 > lossy.delivery_ratio
    assert lossy.payloads_per_broadcast < clean.payloads_per_broadcast  # unreached nodes forward nothing
    total = run(Flood(), links=[[1], [0]], broadcasts=50, loss=1.0, seed=0)
    assert total.delivery_ratio == 0.0 and total.messages_per_broadcast == 1.0  # sent, then lost


def test_partition_drops_only_during_its_window():
    line = build_topology(6, "line")
    r = run(Flood(), links=line, broadcasts=9, seed=0, partitions=[partition((2, 3), start=3.0, end=6.0)])
    for b in r.broadcasts:
        if 3.0 <= b.start < 6.0:  # the whole broadcast (at most 0.5 s) falls inside the window
            assert b.delivery_ratio < 1.0
            side = {0, 1, 2} if b.origin <= 2 else {3, 4, 5}
            others = [v for v in range(6) if v != b.origin]
            assert {v for v, t in zip(others, b.latencies) if t is not None} == side - {b.origin}
        else:
            assert b.delivery_ratio == 1.0


def test_jitter_and_link_latency():
    r = run(Flood(), links=[[1], [0, 2], [1]], broadcasts=20, jitter=0.05, seed=0)
    assert all(0.1 <= t <= 0.2 + 0.1 for t in r.latencies) and len(set(r.latencies)) > 5
    slow = run(Flood(), links=[[1], [0]], broadcasts=3, link_latency={(1, 0): 0.25})
    assert slow.latencies == [0.25, 0.25, 0.25]


def test_dropper_receives_but_forwards_nothing():
    line = [[1], [0, 2], [1]]
    net = Network(line, Flood(), rng=random.Random(0), behaviour={1: "drop"})
    net.broadcast(0, Msg(0))
    net.run()
    assert 0 in net.first_seen[1] and 0 not in net.first_seen[2]
    assert dict(net.sent[0]) == {PAYLOAD: 1}  # only node 0's send went on the wire


def test_selective_node_drops_only_censored_recipients():
    line = [[1], [0, 2], [1]]
    net = Network(line, Flood(), rng=random.Random(0), behaviour={1: "selective"}, censored={0})
    net.broadcast(0, Msg(0, recipient=0))
    net.broadcast(0, Msg(1, recipient=5))
    net.run()
    assert 0 not in net.first_seen[2] and 1 in net.first_seen[2]
    r = run(Flood(), links=line, selective=[1], censored=[0], broadcasts=40, clients=2, seed=0)
    for b in r.broadcasts:
        assert (b.delivery_ratio < 1.0) == (b.recipient == 0)
    assert r.misbehaving == ((1, "selective"),)


def test_misbehaving_nodes_never_originate_nor_count():
    r = run(Flood(), n=12, degree=3, droppers=2, selective=2, broadcasts=30, seed=9)
    bad = {v for v, _ in r.misbehaving}
    assert len(bad) == 4 and all(b.origin not in bad for b in r.broadcasts)
    assert all(len(b.latencies) == 12 - 4 - 1 for b in r.broadcasts)


def test_hop_limit_stops_flooding():
    line = build_topology(25, "line")
    r = run(Flood(), links=line, broadcasts=1, seed=0, hop_limit=3)
    b, = r.broadcasts
    assert 0 < b.reached <= 6 and r.delivery_ratio < 1.0
    assert max(r.latencies) == pytest.approx(0.3)


def test_summary_and_helpers():
    results = compare(n=12, degree=3, broadcasts=5, seed=1)
    table = format_table(results)
    assert [r.strategy for r in results] == ["flood", "gossip(fanout=2)", "plumtree"]
    assert table.splitlines()[0].startswith("strategy") and len(table.splitlines()) == 4
    assert set(results[0].summary()) == {"strategy", "messages", "payloads", "median", "max", "delivery"}
    assert diameter(build_topology(7, "line")) == 6 and not is_connected(build_topology(5, "line"), [2])
    with pytest.raises(ValueError):
        Network([[1], []], Flood(), rng=random.Random(0))  # links must be symmetric
    small = bench_mesh(n=15, broadcasts=3, degree=3)
    assert len(small) == 3 and all(r.n == 15 for r in small)


# ------------------------------------------------------------------ the real node's rule

def test_flood_targets_rule():
    assert flood_targets(["a", "b", "c"], None, 0) == ["a", "b", "c"]
    assert flood_targets(["a", "b", "c"], "b", 3) == ["a", "c"]
    assert flood_targets(["a", "b", "c"], "b", HOP_LIMIT - 1) == ["a", "c"]
    assert flood_targets(["a", "b", "c"], "b", HOP_LIMIT) == []


@pytest.fixture
def small_mesh(tmp_path):
    """Real mesh nodes in process on a ManualClock, no sockets: B peers with A, C and D (a star), and every node
    has pinned its peers' keys from their /status. They flood as 1.1 did (`plumtree=False`): the model `Flood` is
    compared with that; 1.2's tree is tested on the real classes in tests/test_plumtree.py."""
    clock = ManualClock()
    names = "ABCD"
    url = {n: f"http://{n.lower()}.mesh.test:8000" for n in names}
    star = {"A": "B", "B": "ACD", "C": "B", "D": "B"}
    nodes = {n: open_mesh_node(tmp_path / n, peers=tuple(url[p] for p in star[n]), clock=clock,
                               rng=random.Random(i), config=NodeConfig(name=n), mesh=MeshConfig(plumtree=False))
             for i, n in enumerate(names)}
    for n in names:
        nodes[n].url = url[n]
    for n in names:
        for p in star[n]:
            pin(nodes[n], url[p], nodes[p])
    yield nodes, url, star, clock
    for node in nodes.values():
        node.close()


def _queued(node, pid: str, actions) -> list[str]:
    """The peers `node` queued `pid` for (its outbox rows, written by `Broadcast.queue` with the packet) and sent it
    to (the relay Calls among `actions`), which must agree; the Calls are answered, so the outbox empties again."""
    rows = sorted(peer for (peer,) in node.db.execute("SELECT peer FROM outbox WHERE packet_id = ?",
                                                      (bytes.fromhex(pid),)))
    relays = [c for c in calls(actions, "/relay") if c.body["packet_id"] == pid]
    assert sorted(c.url.removesuffix("/relay") for c in relays) == rows
    for call in relays:
        node.on_answer(call.tag, 202, {"packet_id": pid, "stored": True})
    assert node.db.execute("SELECT count(*) FROM outbox WHERE packet_id = ?", (bytes.fromhex(pid),)).fetchone() == (0,)
    return rows


def _relay(sender, packet, hops: int, clock) -> dict:
    now = clock()
    return sign_relay(sender.identity, packet.to_dict(), packet_id(packet), now + timedelta(days=1), hops, now)


def test_flood_targets_match_the_real_node(small_mesh, alice, bob):
    nodes, url, star, clock = small_mesh
    A, B, C = nodes["A"], nodes["B"], nodes["C"]
    b_peers = B.roles["peers"].urls

    # 1. a client posts to B: B queues it for every peer
    packet = seal(alice, bob.public.b64, "posted at B", clock=clock)
    reply = ask(B, "POST /messages", packet.to_json())
    pid = reply.body["packet_id"]
    assert _queued(B, pid, reply.actions) == sorted(flood_targets(b_peers, None, 0)) == sorted(url[p] for p in "ACD")

    # 2. a client posts to A; A relays to B (hop 1); B queues it for every peer but A
    packet = seal(alice, bob.public.b64, "posted at A", clock=clock)
    reply = ask(A, "POST /messages", packet.to_json())
    pid = reply.body["packet_id"]
    delivery, = calls(reply.actions, "/relay")
    assert [delivery.url.removesuffix("/relay")] == flood_targets(A.roles["peers"].urls, None, 0) == [url["B"]]
    relayed = ask(B, "POST /relay", delivery.body)
    assert relayed.body["stored"] is True
    assert _queued(B, pid, relayed.actions) == sorted(flood_targets(b_peers, url["A"], delivery.body["hops"]))
    again = ask(B, "POST /relay", delivery.body)  # ...and only once: a duplicate queues nothing
    assert again.body["stored"] is False and _queued(B, pid, again.actions) == []

    # 3. relays from C just below and at the hop limit
    for hops in (HOP_LIMIT - 1, HOP_LIMIT):
        packet = seal(alice, bob.public.b64, f"{hops} hops", clock=clock)
        reply = ask(B, "POST /relay", _relay(C, packet, hops, clock))
        assert reply.body["stored"] is True
        assert _queued(B, packet_id(packet), reply.actions) == sorted(flood_targets(b_peers, url["C"], hops))
    assert flood_targets(b_peers, url["C"], HOP_LIMIT) == []


def test_sim_flood_forwards_like_the_real_node(small_mesh, alice, bob):
    "The model's Flood, on the same star, picks the same peers as the real node B's `Broadcast.queue` does."
    nodes, url, star, clock = small_mesh
    names = "ABCD"
    links = [[names.index(p) for p in star[n]] for n in names]
    strategy = Flood()
    Network(links, strategy, rng=random.Random(0))
    B = nodes["B"]
    for i, (sender, hops) in enumerate([(None, 0), ("A", 1), ("D", 5), ("C", HOP_LIMIT - 1), ("C", HOP_LIMIT)]):
        packet = seal(alice, bob.public.b64, f"from {sender} at hop {hops}", clock=clock)
        pid = packet_id(packet)
        if sender is None:
            reply = ask(B, "POST /messages", packet.to_json())
        else:
            reply = ask(B, "POST /relay", _relay(nodes[sender], packet, hops, clock))
        assert reply.status == 202, reply
        msg = Msg(i, hops=hops)
        sends = (strategy.on_broadcast(1, msg) if sender is None
                 else strategy.on_receive(1, msg, names.index(sender), PAYLOAD))
        relayed_hops = {c.body["hops"] for c in calls(reply.actions, "/relay") if c.body["packet_id"] == pid}
        assert sorted(url[names[s.to]] for s in sends) == _queued(B, pid, reply.actions)
        assert all(s.kind == PAYLOAD and s.msg.hops == hops + 1 for s in sends)
        assert relayed_hops == ({hops + 1} if sends else set()), "the real relays carry the model's hop count"
