"""The loopback forward proxy, and a client whose TX and RX traffic leave through different proxies."""
import time

import pytest
import requests

from bubble_ref.anonymity import ForwardProxy, RequestLog
from bubble_ref.client import Client, Transport
from bubble_ref.crypto import Identity
from bubble_ref.mesh import start_local_mesh
import random

from bubble_ref.node import open_relay_node
from bubble_ref.packets import system_clock
from bubble_ref.relay import start_server


@pytest.fixture
def pair_of_nodes(tmp_path):
    "Two linked in-process mesh nodes; their URLs."
    running = start_local_mesh(tmp_path / "mesh", ["n0", "n1"], "line")
    yield [r.url for r in running.values()]
    for r in running.values():
        r.stop()


@pytest.fixture
def proxy():
    p = ForwardProxy("127.0.0.2").start()
    yield p
    p.stop()


@pytest.fixture
def node(tmp_path):
    running = start_server(open_relay_node(tmp_path / "node", clock=system_clock, rng=random.Random()))
    yield running
    running.stop()


def through(proxy_url):
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": proxy_url}
    return session


def test_the_server_sees_the_proxy_address_and_bodies_pass_unchanged(proxy, node):
    with RequestLog() as seen:
        status = through(proxy.url).get(f"{node.url}/status", timeout=10)
        bad = through(proxy.url).post(f"{node.url}/messages", json={"not": "a packet"}, timeout=10)
    assert status.status_code == 200 and status.json()["server_id"] == node.node.id
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_packet"  # the node's JSON came back intact
    assert [(s.address, s.method, s.path) for s in seen.seen] == [
        ("127.0.0.2", "GET", "/status"), ("127.0.0.2", "POST", "/messages")]
    assert proxy.forwarded == 2


@pytest.mark.parametrize("target, status", [
    ("http://192.0.2.1/status", 403),        # not loopback: never forwarded
    ("http://example.invalid/status", 403),  # a name, not a loopback IP
])
def test_the_proxy_forwards_to_loopback_only(proxy, target, status):
    response = through(proxy.url).get(target, timeout=10)
    assert response.status_code == status and "loopback" in response.text
    assert proxy.forwarded == 0


def test_the_proxy_wants_absolute_http_urls(proxy):
    response = requests.get(f"{proxy.url}/status", timeout=10)  # a plain request to the proxy itself
    assert response.status_code == 400 and "absolute http://" in response.text


def test_a_proxy_only_listens_on_loopback():
    with pytest.raises(ValueError, match="not a loopback address"):
        ForwardProxy("0.0.0.0")


def test_tx_and_rx_servers_log_different_client_addresses(tmp_path, pair_of_nodes):
    urls = pair_of_nodes
    tx_proxy, rx_proxy = ForwardProxy("127.0.0.2").start(), ForwardProxy("127.0.0.3").start()
    try:
        alice = Client(Identity.generate(), tmp_path / "alice", default_servers=tuple(urls),
                       tx=Transport(proxy=tx_proxy.url), rx=Transport(proxy=rx_proxy.url))
        alice.refresh_load()
        alice.choose()
        bob = Client(Identity.generate(), tmp_path / "bob", default_servers=tuple(urls))
        bob.refresh_load()
        bob.choose()
        bob.send(alice.identity.public, "hello Alice")  # before the log starts: only Alice's traffic is watched
        with RequestLog() as seen:
            alice.send(bob.identity.public, "hello Bob")
            deadline = time.monotonic() + 15
            while not alice.poll():
                assert time.monotonic() < deadline
                time.sleep(0.05)
        bob.close()
        posted = {s.address for s in seen.seen if (s.method, s.path) == ("POST", "/messages")}
        fetched = {s.address for s in seen.seen if (s.method, s.path) == ("POST", "/messages/retrieve")}
        assert posted == {"127.0.0.2"} and fetched == {"127.0.0.3"}
        alice.close()
    finally:
        tx_proxy.stop()
        rx_proxy.stop()




def test_fake_and_real_posts_have_identical_sizes_and_fakes_never_reach_a_history(tmp_path, pair_of_nodes):
    import random

    from bubble_ref.anonymity import CoverTraffic, WireTap

    tap = WireTap()
    alice = Client(Identity.generate(), tmp_path / "alice", default_servers=tuple(pair_of_nodes), tx=tap)
    bob = Client(Identity.generate(), tmp_path / "bob", default_servers=tuple(pair_of_nodes))
    for c in (alice, bob):
        c.refresh_load()
        c.choose()
    cover = CoverTraffic(alice, rate_per_minute=60, rng=random.Random(1), get_rate_per_minute=0)
    alice.dispatch = cover.enqueue  # what start() does, without the background thread
    real_contents = ["", "short", "x" * 900]  # empty, short, and long enough to need the 2 KiB bucket
    for text in real_contents:
        alice.send(bob.identity.public, text)
        assert [p["recipient"] for p in cover.waiting] == [bob.identity.public.b64, alice.identity.public.b64]
        assert cover.slot("post") == "real" and cover.slot("post") == "real"  # the message, then its self-copy
        assert cover.slot("post") == "post"  # nothing waiting: a fake
    sizes = {size for _, method, size in tap.seen if method == "POST"}
    assert cover.sent == {"post": 3, "get": 0, "real": 6} and len(sizes) == 1
    deadline = time.monotonic() + 30
    while len(bob.history()) < 3:
        assert time.monotonic() < deadline
        bob.poll()
        time.sleep(0.05)
    time.sleep(0.3)
    bob.poll()
    assert sorted(m.content for m in bob.history()) == sorted(real_contents)
    assert sorted(m.content for m in alice.history()) == sorted(real_contents)
    assert bob.rejected == 0  # fakes are sealed to throwaway keys: they never even reach Bob's mailbox
    alice.close()
    bob.close()


def test_periodic_and_poisson_schedules_and_their_streams():
    import random
    import statistics

    from bubble_ref.anonymity import CoverTraffic

    class Idle:  # slots are only computed here: no client is needed
        dispatch = None

    periodic = CoverTraffic(Idle(), rate_per_minute=120, get_rate_per_minute=30, rng=random.Random(1))
    slots = [periodic.next_slot() for _ in range(200)]
    posts = [t for t, kind in slots if kind == "post"]
    gets = [t for t, kind in slots if kind == "get"]
    assert {round(b - a, 9) for a, b in zip(posts, posts[1:])} == {0.5}  # every post gap is the period
    assert {round(b - a, 9) for a, b in zip(gets, gets[1:])} == {2.0}
    assert 0 <= posts[0] < 0.5 and 0 <= gets[0] < 2.0  # random phases
    poisson = CoverTraffic(Idle(), rate_per_minute=1200, get_rate_per_minute=0, schedule="poisson",
                           rng=random.Random(3))
    times = [poisson.next_slot()[0] for _ in range(3000)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(60 / 1200, rel=0.1)  # mean gap = 1 / rate
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.15)  # exponential: sd = mean
    for bad in (dict(rate_per_minute=0), dict(rate_per_minute=10, schedule="bursty"),
                dict(rate_per_minute=10, get_rate_per_minute=-1)):
        with pytest.raises(ValueError):
            CoverTraffic(Idle(), **bad)


def test_cover_traffic_in_the_background_takes_over_sending_and_flushes_on_stop(tmp_path, pair_of_nodes):
    import random

    from bubble_ref.anonymity import CoverTraffic

    alice = Client(Identity.generate(), tmp_path / "alice2", default_servers=tuple(pair_of_nodes))
    bob = Client(Identity.generate(), tmp_path / "bob2", default_servers=tuple(pair_of_nodes))
    for c in (alice, bob):
        c.refresh_load()
        c.choose()
    cover = CoverTraffic(alice, rate_per_minute=600, rng=random.Random(3)).start()
    try:
        assert alice.dispatch == cover.enqueue
        alice.send(bob.identity.public, "through the schedule")
        deadline = time.monotonic() + 30
        while cover.sent["real"] < 2 or cover.sent["post"] < 3:
            assert time.monotonic() < deadline, cover.sent
            time.sleep(0.05)
    finally:
        cover.stop()
    assert alice.dispatch is None
    alice.send(bob.identity.public, "after stop: sent at once")
    deadline = time.monotonic() + 30
    while len(bob.history()) < 2:
        assert time.monotonic() < deadline
        bob.poll()
        time.sleep(0.05)
    assert [m.content for m in bob.history()] == ["through the schedule", "after stop: sent at once"]
    alice.close()
    bob.close()


def test_an_observer_tells_real_from_fake_posts_unless_they_share_a_periodic_schedule(tmp_path, pair_of_nodes):
    import random

    from bubble_ref.anonymity import CoverTraffic, WireTap, auc, observe, observer_auc

    assert auc([2, 3], [1]) == 1.0 and auc([1], [1]) == 0.5 and auc([0], [1, 2]) == 0.0
    alice = Client(Identity.generate(), tmp_path / "alice3", default_servers=tuple(pair_of_nodes), tx=WireTap())
    bob = Client(Identity.generate(), tmp_path / "bob3", default_servers=tuple(pair_of_nodes))
    alice.refresh_load()
    alice.choose()
    moments = sorted(random.Random(5).uniform(0, 240) for _ in range(12))
    found = {}
    for name, schedule, at_once in (("at once", "poisson", True), ("periodic", "periodic", False)):
        cover = CoverTraffic(alice, rate_per_minute=30, get_rate_per_minute=0, schedule=schedule,
                             rng=random.Random(6))
        line = observe(cover, bob.identity.public, moments, 240.0, at_once=at_once)
        assert sum(kind == "real" for _, kind in line) == 24  # every message and its self-copy went out
        found[name] = max(observer_auc(line).values())
    assert found["at once"] > 0.9, found
    assert found["periodic"] <= 0.55, found
    alice.close()
    bob.close()
