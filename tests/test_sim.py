"""The simulator (`bubble_ref.sim.SimNetwork`): a seeded network that drives real nodes (the classes `bubble-ref node`
runs) on a simulated clock. Delivery, determinism, loss, crashes, partitions, and the failure semantics a Call gets
(the same as from the real driver: no answer, or an answer too big, is status None)."""
from __future__ import annotations

from datetime import timedelta

import matplotlib
import pytest

from bubble_ref.envelope import make_retrieval_proof, open_message, seal
from bubble_ref.mesh import open_mesh_node
from bubble_ref.node import After, Call, Node, Reply, Route
from bubble_ref.sim import SIM_EPOCH, SimNetwork, draw_sequence, host_url, match_route, pool_keys, sim_keys

matplotlib.use("Agg")

NAMES = list("ABCDE")


def line_network(seed: int, root, **kwargs) -> SimNetwork:
    "Five mesh nodes in a line A — B — C — D — E, started, peers resolved."
    net = SimNetwork(seed, root=root, **kwargs)
    for name in NAMES:
        net.add(name, open_mesh_node)
    for a, b in zip(NAMES, NAMES[1:]):
        net.link(a, b)
    net.start()
    net.run(seconds=1)
    return net


def holders(net: SimNetwork, packet_id: str) -> list[str]:
    return [n for n in NAMES if net.hosts[n].up and net.hosts[n].node.mailbox.contains(packet_id)]


def post(net: SimNetwork, name: str, alice, bob, text: str) -> str:
    reply = net.request(name, "POST", "/messages", seal(alice, bob.public.b64, text, clock=net.clock).to_dict())
    assert reply.status == 202, reply
    return reply.body["packet_id"]


def test_a_packet_crosses_a_line_of_real_nodes(tmp_path, alice, bob):
    with line_network(1, tmp_path, trace=True) as net:
        assert all(not net.hosts[n].node.roles["peers"].unresolved() for n in NAMES)
        posted = net.request("A", "POST", "/messages", seal(alice, bob.public.b64, "far end").to_dict())
        assert posted.status == 202 and len(posted.actions) == 1
        start = net.now
        net.run(seconds=1)
        proof = make_retrieval_proof(bob, server_id=net.hosts["E"].node.id, clock=net.clock)  # hardened, the default
        page = net.request("E", "GET", "/messages", proof.to_dict()).body
        assert open_message(bob, page["messages"][0]["packet"]).content == "far end"
        pid = posted.body["packet_id"]
        assert [net.hosts[n].node.roles["broadcast"].lookup(pid)["hops"] for n in NAMES] == [0, 1, 2, 3, 4]
        relays = [f"{e.src}->{e.dst}" for e in net.trace if e.at >= start and e.kind == "request" and "/relay" in e.what]
        assert relays == ["A->B", "B->C", "C->D", "D->E"]
        assert net.bytes_sent["POST /relay"] > 0 and not net.bugs


def test_the_same_seed_replays_event_for_event_and_another_seed_does_not(tmp_path, alice, bob):
    packet = seal(alice, bob.public.b64, "same?")  # one packet for every run: ciphertexts are random

    def run(seed: int, where: str):
        with line_network(seed, tmp_path / where, trace=True) as net:
            net.request("A", "POST", "/messages", packet.to_dict())
            net.run(seconds=30)
            return net.digest, net.events, [(e.at, e.kind, e.src, e.dst, e.what) for e in net.trace]

    first, again, other = run(7, "first"), run(7, "again"), run(8, "other")
    assert first == again
    assert first[0] != other[0] and first[2] != other[2]


def test_twenty_percent_loss_delays_but_does_not_stop_delivery(tmp_path, alice, bob):
    with line_network(3, tmp_path, loss=0.2) as net:
        pid = post(net, "A", alice, bob, "through the noise")
        for _ in range(120):
            net.run(seconds=1)
            if holders(net, pid) == NAMES:
                break
        assert holders(net, pid) == NAMES and not net.bugs


def test_crashed_nodes_keep_their_outbox_and_catch_up(tmp_path, alice, bob):
    with line_network(4, tmp_path) as net:
        c_id = net.hosts["C"].node.id
        net.crash("C")
        assert not net.hosts["C"].up
        assert net.request("C", "GET", "/status") == Reply(0, None), "a crashed host answers nobody"
        pid = post(net, "A", alice, bob, "wait for C")
        net.run(seconds=20)
        assert net.hosts["B"].node.roles["broadcast"].outbox_size() == 1 and holders(net, pid) == ["A", "B"]
        net.start("C")
        assert net.hosts["C"].node.id == c_id and net.hosts["C"].incarnation == 2, "same key, same data"
        net.crash("B")  # B dies with its relay to C still queued ...
        net.run(seconds=1)
        net.start("B")  # ... and sends it after the restart, from its durable outbox
        net.run(seconds=60)
        assert holders(net, pid) == NAMES and not net.bugs


def test_a_partition_holds_packets_until_it_heals(tmp_path, alice, bob):
    with line_network(5, tmp_path) as net:
        net.partition({"A", "B"}, {"C", "D", "E"})
        pid = post(net, "A", alice, bob, "across the split")
        net.run(seconds=30)
        assert holders(net, pid) == ["A", "B"]
        net.heal()
        net.run(seconds=60)
        assert holders(net, pid) == NAMES and not net.bugs


# ------------------------------------------------------------------ what a Call gets


class Prober:
    "A role that makes the Calls a test gives it when the node starts, and records when and how each is answered."
    name = "probe"

    def __init__(self, node: Node, calls_to_make, answers: list):
        self.node, self.calls_to_make, self.answers = node, calls_to_make, answers

    def routes(self):
        big = {"blob": "x" * 5000}
        return [Route("GET", "/big", lambda request: Reply(200, big)),
                Route("GET", "/small", lambda request: Reply(200, {"ok": True}))]

    def start(self):
        return [After(timedelta(seconds=1), (self.name, "go"))]

    def on_timer(self, tag):
        return list(self.calls_to_make)

    def on_answer(self, tag, status, body):
        self.answers.append((tag[1], status, body, self.net.now - 1.0))
        return []


def probed_network(tmp_path, calls_to_make, answers) -> SimNetwork:
    net = SimNetwork(11, root=tmp_path)

    def build(data_dir, *, to_make, **kwargs):
        node = open_mesh_node(data_dir, **kwargs)
        prober = node.add(Prober(node, to_make, answers))
        prober.net = net
        return node

    net.add("P", build, to_make=calls_to_make)
    net.add("Q", build, to_make=())  # only serves /big and /small
    return net


def test_a_call_fails_like_it_would_on_the_wire(tmp_path):
    "Too big an answer, nobody at the address, a crashed host, a partition: status None, within the Call's timeout."
    q = host_url(1)
    answers = []
    to_make = [Call("GET", f"{q}/small", tag=("probe", "small"), timeout=5.0),
               Call("GET", f"{q}/big", tag=("probe", "big"), timeout=5.0, max_bytes=1000),
               Call("GET", f"{q}/big", tag=("probe", "big enough"), timeout=5.0, max_bytes=10_000),
               Call("GET", f"{q}/nothing", tag=("probe", "no route"), timeout=5.0),
               Call("GET", "http://127.0.9.9:8000/small", tag=("probe", "nobody there"), timeout=5.0)]
    with probed_network(tmp_path, to_make, answers) as net:
        net.start()
        net.run(seconds=10)
        got = {name: (status, body) for name, status, body, _ in answers if name != "probe"}
        assert got["small"] == (200, {"ok": True})
        assert got["big"] == (None, None)
        assert got["big enough"][0] == 200
        assert got["no route"][0] == 404
        assert got["nobody there"] == (None, None)
        assert all(after <= 5.0 for _, _, _, after in answers)

    answers.clear()
    with probed_network(tmp_path / "again", to_make[:1], answers) as net:
        net.start("P")  # Q never starts: its address answers nothing
        net.run(seconds=10)
        assert [(n, s) for n, s, _, _ in answers] == [("small", None)]

    answers.clear()
    with probed_network(tmp_path / "split", to_make[:1], answers) as net:
        net.start()
        net.partition({"P"}, {"Q"})
        net.run(seconds=10)
        (name, status, body, after), = [a for a in answers]
        assert (name, status) == ("small", None) and after == pytest.approx(5.0, abs=0.05), "lost: the timeout"


def test_a_bug_in_a_node_is_recorded_and_the_simulation_goes_on(tmp_path):
    class Broken:
        name = "broken"

        def start(self):
            return [After(timedelta(seconds=1), (self.name, "boom"))]

        def on_timer(self, tag):
            raise RuntimeError("the role has a bug")

    def build(data_dir, **kwargs):
        node = open_mesh_node(data_dir, **kwargs)
        node.add(Broken())
        return node

    with SimNetwork(2, root=tmp_path, trace=True) as net:
        net.add("A", build)
        net.add("B", open_mesh_node)
        net.link("A", "B")
        net.start()
        net.run(seconds=15)
        assert net.bugs == ["t=1.000 A: RuntimeError: the role has a bug"]
        assert [e.what for e in net.trace if e.kind == "bug"] == ["RuntimeError"]
        assert any(e.kind == "timer" and e.at > 1.0 for e in net.trace), "the simulation went on"


def test_the_timers_of_a_crashed_incarnation_never_fire(tmp_path):
    fired = []

    class Ticker:
        name = "tick"

        def start(self):
            return [After(timedelta(seconds=5), (self.name, "once"))]

        def on_timer(self, tag):
            fired.append(net.now)
            return []

    def build(data_dir, **kwargs):
        node = open_mesh_node(data_dir, **kwargs)
        node.add(Ticker())
        return node

    with SimNetwork(3, root=tmp_path) as net:
        net.add("A", build)
        net.start()
        net.run(seconds=2)
        net.crash("A")
        net.start("A")  # the new incarnation's timer is due at t=7
        net.run(seconds=10)
        assert fired == [pytest.approx(7.0)]


# ------------------------------------------------------------------ keys, clock, routes, pictures

def test_simulation_keys_are_fixed_and_hosts_get_them_by_seed(tmp_path):
    pool = pool_keys()
    assert len(pool) == 64 and len({k.id for k in pool}) == 64
    assert sim_keys(3) == pool[:3] and sim_keys(64) == pool

    def server_ids(seed: int, where: str) -> list[str]:
        with SimNetwork(seed, root=tmp_path / where) as net:
            for name in "XYZ":
                net.add(name, open_mesh_node)
            net.start()
            return [net.hosts[n].node.id for n in "XYZ"]

    first = server_ids(5, "a")
    assert first == server_ids(5, "b") and set(first) <= {k.id for k in pool}
    assert first != server_ids(6, "c")


def test_throwaway_keys_come_from_the_spare_half_of_the_pool(tmp_path):
    with SimNetwork(9, root=tmp_path) as net:
        net.add("A", open_mesh_node)
        net.start()
        node = net.hosts["A"].node
        throwaway = {node.new_identity().id for _ in range(20)}
        spare = {sim_keys(64)[k].id for k in net._keys[32:]}
        assert throwaway <= spare and node.id not in throwaway


def test_the_simulated_clock_moves_only_with_the_events(tmp_path):
    with SimNetwork(1, root=tmp_path) as net:
        assert net.clock() == SIM_EPOCH and net.now == 0.0
        seen = []
        net.at(2.5, lambda: seen.append(net.clock()))
        net.at(1.0, lambda: seen.append(net.clock()))
        net.run(seconds=2)
        assert seen == [SIM_EPOCH + timedelta(seconds=1)] and net.now == 2.0
        net.run()
        assert seen[-1] == SIM_EPOCH + timedelta(seconds=2.5)


def test_match_route_finds_the_route_and_its_parameters(tmp_path):
    with SimNetwork(1, root=tmp_path) as net:
        net.add("A", open_mesh_node)
        net.start()
        node = net.hosts["A"].node
        assert match_route(node, "GET", "/trace/" + "ab" * 32) == ("GET /trace/<packet_id>", {"packet_id": "ab" * 32})
        assert match_route(node, "POST", "/messages") == ("POST /messages", {})
        assert match_route(node, "DELETE", "/messages") is None and match_route(node, "GET", "/trace/a/b") is None
        assert net.request("A", "GET", "/nowhere").status == 404


def test_draw_sequence_draws_the_requests(tmp_path, alice, bob):
    import matplotlib.pyplot as plt

    with line_network(1, tmp_path, trace=True) as net:
        post(net, "A", alice, bob, "draw me")
        net.run(seconds=1)
        ax = draw_sequence(net.trace, NAMES, "a line")
        labels = [t.get_text() for t in ax.texts]
        assert sum("POST /relay" in t for t in labels) >= 4 and ax.get_title() == "a line"
        plt.close(ax.figure)


def test_a_network_made_without_a_root_removes_its_folder():
    net = SimNetwork(1)
    net.add("A", open_mesh_node)
    net.start()
    root = net.root
    assert (root / "A" / "server_key.pem").exists()
    net.close()
    assert not root.exists()
