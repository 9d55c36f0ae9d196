"""The broadcast tree and the bounded directory round of protocol 1.2 (PROTOCOL §15, §16), on the real node classes
in the simulator: duplicates carve a spanning tree out of the mesh, a client's post still reaches every peer of its
node, a dead tree node is routed around by anti-entropy (which grafts), a 1.1 receiver is flooded to as before, and a
directory round asks the peers and `directory_fanout` others, coming back to every server in turn."""
from __future__ import annotations

import random
from datetime import timedelta
from math import ceil

from bubble_ref.envelope import seal
from bubble_ref.mesh import MeshConfig, build_topology, open_mesh_node
from bubble_ref.node import Call
from bubble_ref.sim import SimNetwork, sim_keys
from bubble_ref.store import ManualClock

from inproc import mesh_node


def mesh_network(seed: int, root, links, meshes=None, **kwargs) -> SimNetwork:
    "Real mesh nodes n0.. linked as `links` (each with its own MeshConfig, if given), started, peers resolved."
    net = SimNetwork(seed, root=root, **kwargs)
    for i in range(len(links)):
        config = (meshes or {}).get(i, MeshConfig())
        net.add(f"n{i}", lambda d, mesh=config, **kw: open_mesh_node(d, mesh=mesh, **kw))
    for i, neighbours in enumerate(links):
        for j in neighbours:
            if i < j:
                net.link(f"n{i}", f"n{j}")
    net.start()
    net.run(seconds=2)
    return net


def post(net: SimNetwork, name: str, text: str) -> str:
    keys = sim_keys(64)
    reply = net.request(name, "POST", "/messages", seal(keys[60], keys[61].public, text, clock=net.clock).to_dict())
    assert reply.status == 202, reply
    return reply.body["packet_id"]


def tree_links(net: SimNetwork, links) -> set[frozenset]:
    "The links both ends keep on their tree (checking that no link is on the tree at one end only)."
    on = set()
    for i, neighbours in enumerate(links):
        if not neighbours:
            continue
        lazy = net.hosts[f"n{i}"].node.roles["broadcast"].lazy
        for j in neighbours:
            j_lazy = net.hosts[f"n{j}"].node.roles["broadcast"].lazy
            i_says, j_says = net.hosts[f"n{j}"].url not in lazy, net.hosts[f"n{i}"].url not in j_lazy
            assert i_says == j_says, f"n{i}-n{j} is on the tree at one end only"
            if i_says:
                on.add(frozenset((i, j)))
    return on


def connected(n: int, edges: set[frozenset]) -> bool:
    seen, todo = {0}, [0]
    while todo:
        v = todo.pop()
        for e in edges:
            if v in e:
                (w,) = e - {v}
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
    return len(seen) == n


def relays_since(net: SimNetwork, start: float) -> int:
    return sum(e.kind == "request" and e.what == "POST /relay" for e in net.trace if e.at >= start)


def test_duplicates_carve_a_spanning_tree_and_then_each_packet_costs_about_one_relay_per_node(tmp_path):
    n = 15
    links = build_topology(n, "random", degree=4, seed=3)
    edges = sum(map(len, links)) // 2
    with mesh_network(3, tmp_path, links, trace=True) as net:
        first_start = net.now
        post(net, "n0", "the first packet floods, and prunes")
        net.run(seconds=5)
        assert relays_since(net, first_start) == 2 * edges - n + 1, "every link on the tree at first: a flood"
        for b in range(1, 6):
            post(net, f"n{b}", f"packet {b}")
            net.run(seconds=2)
        tree = tree_links(net, links)
        assert len(tree) == n - 1 and connected(n, tree), "what stays on the tree is a spanning tree"
        start = net.now
        pid = post(net, "n7", "on the tree")
        net.run(seconds=5)
        assert all(h.node.mailbox.contains(pid) for h in net.hosts.values())
        extra = len(links[7]) - sum(1 for e in tree if 7 in e)  # the origin also posts over its off-tree links
        assert relays_since(net, start) == n - 1 + extra, "one relay per node, plus the origin's off-tree links"
        assert not net.bugs


def test_a_post_reaches_every_neighbour_of_its_node_at_once_even_off_the_tree(tmp_path):
    "Audits look for a handed packet at the node's neighbours (notebook 09b): they all get it in one hop."
    links = build_topology(12, "random", degree=4, seed=5)
    with mesh_network(5, tmp_path, links, trace=True) as net:
        for b in range(6):
            post(net, f"n{b}", f"warm-up {b}")
            net.run(seconds=2)
        origin = max(range(12), key=lambda v: len(links[v]) - sum(1 for e in tree_links(net, links) if v in e))
        assert net.hosts[f"n{origin}"].node.roles["broadcast"].lazy, "the origin has off-tree links"
        pid = post(net, f"n{origin}", "audit-like")
        net.run(seconds=0.15)  # one link's latency and a little
        assert all(net.hosts[f"n{j}"].node.mailbox.contains(pid) for j in links[origin])
        net.run(seconds=5)
        assert all(h.node.mailbox.contains(pid) for h in net.hosts.values()) and not net.bugs


def test_a_dead_node_on_the_tree_is_routed_around_by_anti_entropy_which_grafts(tmp_path):
    links = build_topology(12, "random", degree=4, seed=7)
    with mesh_network(7, tmp_path, links) as net:
        for b in range(6):
            post(net, f"n{b}", f"warm-up {b}")
            net.run(seconds=2)
        tree = tree_links(net, links)
        hub = max(range(12), key=lambda v: sum(1 for e in tree if v in e))
        net.crash(f"n{hub}")
        origin = next(v for v in range(12) if v != hub and frozenset((v, hub)) in tree)
        pid = post(net, f"n{origin}", "around the dead")
        alive = [h for name, h in net.hosts.items() if name != f"n{hub}"]
        for _ in range(60):
            net.run(seconds=1)
            if all(h.node.mailbox.contains(pid) for h in alive):
                break
        assert all(h.node.mailbox.contains(pid) for h in alive), "anti-entropy fetched it around the dead node"
        without_hub = [[j for j in nb if j != hub] if v != hub else [] for v, nb in enumerate(links)]
        assert tree_links(net, without_hub) - tree, "a fetch put an off-tree link back on the tree"
        assert not net.bugs


def test_a_receiver_that_never_says_prune_is_flooded_to_as_before(tmp_path):
    "A 1.1 node never answers `prune`, so its 1.2 peers keep relaying everything to it (PROTOCOL §20)."
    links = build_topology(8, "ring")
    old = MeshConfig(plumtree=False)
    with mesh_network(9, tmp_path, links, meshes={0: old}) as net:
        for b in range(1, 6):
            post(net, f"n{b}", f"packet {b}")
            net.run(seconds=2)
        assert all(net.hosts["n0"].url not in net.hosts[f"n{j}"].node.roles["broadcast"].lazy for j in links[0])
        assert not net.hosts["n0"].node.roles["broadcast"].lazy
        assert any(net.hosts[f"n{v}"].node.roles["broadcast"].lazy for v in range(1, 8)), "the others pruned"


def test_a_directory_round_asks_the_peers_and_four_others_coming_back_to_each_in_turn(tmp_path):
    clock = ManualClock()
    node = mesh_node(tmp_path / "a", clock, ("http://p.invalid",), "http://a.invalid")
    try:
        peers = node.roles["peers"]
        keys = sim_keys(24)
        from bubble_ref.mesh import Server
        others = [Server(k.id, f"http://s{i}.invalid", k.public) for i, k in enumerate(keys[1:21])]
        for server in others:
            peers.remember(server, listed_by=None)
        peer = Server(keys[0].id, "http://p.invalid", keys[0].public)
        peers.pinned[peer.url] = peer
        asked = []
        for _ in range(5):
            calls = [a for a in peers.on_timer(("peers", "directory")) if isinstance(a, Call)]
            assert len(calls) == 1 + 4 and calls[0].url == "http://p.invalid/servers"
            asked.append({c.tag[2] for c in calls[1:]})
            clock.advance(timedelta(seconds=10))
        assert set().union(*asked) == {s.server_id for s in others}, "five rounds of four: each of the 20 once"
        cycle = ceil(20 / 4) * MeshConfig().directory_interval
        assert peers.verification_window(timedelta(minutes=10)) == max(timedelta(minutes=10), 2 * cycle)
        everyone = MeshConfig(directory_fanout=None)
        assert len(mesh_node(tmp_path / "b", clock, (), "http://b.invalid", directory_fanout=None)
                   .roles["peers"].directory_round()) == 0 and everyone.directory_fanout is None
    finally:
        node.close()


def test_the_electorate_window_follows_the_directory_cycle(tmp_path):
    "With 300 servers known and 4 asked per 10 s round, a cycle is 750 s: an answer counts as recent for 1500 s."
    from bubble_ref.ballot import open_monitored_node
    from bubble_ref.mesh import Server

    clock = ManualClock()
    node = open_monitored_node(tmp_path / "n", clock=clock, rng=random.Random(0))
    try:
        peers, ballot = node.roles["peers"], node.roles["ballot"]
        keys = sim_keys(64)
        servers = [Server(f"{i:064x}", f"http://10.0.{i // 250}.{i % 250 + 1}:8000", keys[i % 64].public)
                   for i in range(300)]
        old, older = servers[0], servers[1]
        for server in servers:
            peers.remember(server, listed_by=None)
        node.db.execute("UPDATE servers SET verified_at = ? WHERE server_id = ?",
                        (int((clock() - timedelta(minutes=20)).timestamp() * 1000), old.server_id))
        node.db.execute("UPDATE servers SET verified_at = ? WHERE server_id = ?",
                        (int((clock() - timedelta(minutes=30)).timestamp() * 1000), older.server_id))
        assert peers.verification_window(timedelta(minutes=10)) == timedelta(seconds=2 * 75 * 10)
        assert old.server_id in ballot.electorate() and older.server_id not in ballot.electorate()
    finally:
        node.close()
