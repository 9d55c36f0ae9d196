"""The loopback forward proxy, and a client whose TX and RX traffic leave through different proxies."""
import time

import pytest
import requests

from bubble_ref.anonymity import ForwardProxy, RequestLog
from bubble_ref.client import Client, Transport
from bubble_ref.crypto import Identity
from bubble_ref.mesh import start_local_mesh
from bubble_ref.node import Node
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
    running = start_server(Node.open(tmp_path / "node"))
    yield running
    running.stop()
    running.node.close()


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
        fetched = {s.address for s in seen.seen if (s.method, s.path) == ("GET", "/messages")}
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
    cover = CoverTraffic(alice, rate_per_minute=60, rng=random.Random(1), get_share=0.0)
    real_contents = ["", "short", "x" * 900]  # empty, short, and long enough to need the 2 KiB bucket
    for text in real_contents:
        alice.send(bob.identity.public, text)
        cover.step()
        cover.step()
    sizes = {size for _, method, size in tap.seen if method == "POST"}
    assert cover.sent == {"post": 6, "get": 0} and len(sizes) == 1
    deadline = time.monotonic() + 15
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


def test_cover_traffic_runs_in_the_background_at_a_poisson_rate(tmp_path, pair_of_nodes):
    import random
    import statistics

    from bubble_ref.anonymity import CoverTraffic

    alice = Client(Identity.generate(), tmp_path / "alice2", default_servers=tuple(pair_of_nodes))
    cover = CoverTraffic(alice, rate_per_minute=1200, rng=random.Random(3))
    delays = [cover.next_delay() for _ in range(2000)]
    assert statistics.mean(delays) == pytest.approx(60 / 1200, rel=0.1)  # mean gap = 1 / rate
    assert statistics.stdev(delays) == pytest.approx(statistics.mean(delays), rel=0.15)  # exponential: sd = mean
    cover.start()
    deadline = time.monotonic() + 15
    while sum(cover.sent.values()) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cover.stop()
    assert cover.sent["post"] + cover.sent["get"] >= 5 and alice.history() == []
    with pytest.raises(ValueError):
        CoverTraffic(alice, rate_per_minute=0)
    alice.close()
