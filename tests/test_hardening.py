"""The hardening pass (issue 12), checked on real `bubble-ref node` processes on 127.0.0.1 over HTTP and TCP.

S1  hardened retrieval proofs are the default: the seed's replayable phrase is refused, a bound proof is accepted
    once, and the node remembers it across a restart (the replay cache is a table of its database).
S7  what moves with every packet or names other servers' standing is for the operator only (the bearer token the
    node writes to its data directory): /trace, /status's counters, /reputation's scores.
S3  one server's signed lists add at most `max_listed_per_source` servers to a node's directory.
S4  URLs learned from a list are contacted only if the node's URL policy allows them ("auto": a node on loopback
    only loopback ones; a node with a public URL only public ones), so a list cannot aim a node at its LAN or at
    a cloud metadata address.
H3  one address holds at most CONNECTIONS_PER_ADDRESS connections, another address is still served promptly, and
    requests that never finish are cut at REQUEST_DEADLINE.

Every wait is a poll with a deadline (the machine is shared); every process and socket is closed at teardown.
The fake list source of S3/S4 names phantom servers on 127.0.0.1:1 (nothing listens there) and addresses the node
must refuse, on port 1: a node that wrongly accepted one would only try to connect to it, and fail the test.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from bubble_ref.crypto import Identity, PublicKey
from bubble_ref.envelope import make_retrieval_proof, packet_id, seal
from bubble_ref.mesh import MeshConfig, free_port, sign_body, url_refusal
from bubble_ref.packets import ServerListResponse, format_timestamp
from bubble_ref.relay import CONNECTIONS_PER_ADDRESS, REQUEST_DEADLINE
from bubble_ref.sim import pool_keys

from nodes import HTTP_TIMEOUT, WAIT, Launcher, MeshProcess, NodeProcess, assert_error, wait_until


# ------------------------------------------------------------------ helpers

def get_messages(url: str, proof) -> requests.Response:
    return requests.get(f"{url}/messages", json=proof.to_dict(), timeout=HTTP_TIMEOUT)


def bound_proof(node: NodeProcess, who: Identity):
    "A fresh hardened proof for `node` (bound to its server id, signed now)."
    return make_retrieval_proof(who, server_id=node.status(operator=False)["server_id"])


@pytest.fixture(scope="module")
def default_node(tmp_path_factory):
    "A node started with no options but its address and data directory."
    node = NodeProcess(tmp_path_factory.mktemp("hardening") / "data", "default node")
    with node.start():
        yield node


# ------------------------------------------------------------------ S1: hardened proofs by default

def test_s1_a_default_node_takes_bound_proofs_once_and_remembers_them_across_a_restart(tmp_path, alice, bob):
    data = tmp_path / "data"
    first = NodeProcess(data, "s1 node").start()
    try:
        assert first.announce.endswith("proof mode hardened)"), first.announce
        assert first.status(operator=False)["proof_mode"] == "hardened"
        posted = requests.post(f"{first.url}/messages", json=seal(alice, bob.public.b64, "s1").to_dict(),
                               timeout=HTTP_TIMEOUT)
        assert posted.status_code == 202, posted.text
        assert_error(get_messages(first.url, make_retrieval_proof(bob)), 401, "bad_proof", "timestamp")  # the seed's
        used = bound_proof(first, bob)
        answer = get_messages(first.url, used)
        assert answer.status_code == 200, answer.text
        assert [m["packet_id"] for m in answer.json()["messages"]] == [posted.json()["packet_id"]]
        assert_error(get_messages(first.url, used), 401, "proof_replayed", "already used")
    finally:
        assert first.stop() == 0
    with NodeProcess(data, "s1 node").start() as second:
        assert_error(get_messages(second.url, used), 401, "proof_replayed", "already used")  # a restart forgets nothing
        fresh = get_messages(second.url, bound_proof(second, bob))
        assert fresh.status_code == 200 and len(fresh.json()["messages"]) == 1, fresh.text
    assert "Traceback" not in second.stderr()


def test_s1_spec_proofs_only_on_request_and_with_a_warning(tmp_path, bob):
    with NodeProcess(tmp_path / "data", "spec node", "--proof-mode", "spec").start() as node:
        assert node.announce.endswith("proof mode spec)"), node.announce
        seed = make_retrieval_proof(bob)
        assert [get_messages(node.url, seed).status_code for _ in range(2)] == [200, 200], "replayable, as the seed"
        wait_until(lambda: "WARNING" in node.stderr() and "replay" in node.stderr(), "the warning about spec mode")


# ------------------------------------------------------------------ S7: operator-only answers

def test_s7_trace_is_for_the_operator_only(default_node, alice, bob):
    packet = seal(alice, bob.public.b64, "traced")
    assert requests.post(f"{default_node.url}/messages", json=packet.to_dict(), timeout=HTTP_TIMEOUT).status_code == 202
    url = f"{default_node.url}/trace/{packet_id(packet)}"
    assert_error(requests.get(url, timeout=HTTP_TIMEOUT), 401, "operator_only", "Authorization: Bearer")
    assert_error(requests.get(url, headers={"Authorization": "Bearer " + "0" * 64}, timeout=HTTP_TIMEOUT),
                 401, "operator_only")
    assert_error(requests.get(url, headers={"Authorization": "Basic b3BlcmF0b3I6"}, timeout=HTTP_TIMEOUT),
                 401, "operator_only")
    traced = requests.get(url, headers=default_node.operator_headers(), timeout=HTTP_TIMEOUT)
    assert traced.status_code == 200, traced.text
    assert traced.json()["hops"] == 0 and traced.json()["from"] is None


def test_s7_status_counters_are_for_the_operator_only(default_node, alice, bob):
    assert requests.post(f"{default_node.url}/messages", json=seal(alice, bob.public.b64, "counted").to_dict(),
                         timeout=HTTP_TIMEOUT).status_code == 202
    public, operator = default_node.status(operator=False), default_node.status()
    assert {"name", "server_id", "public_key", "version", "proof_mode", "load", "load_measure", "time"} <= set(public)
    assert {"peers", "known_peers"} <= set(public), "roles' public fields"
    counters = {"stored_messages", "outbox", "lowest_reputation", "voters"}
    assert not counters & set(public), public
    assert counters <= set(operator) and operator["stored_messages"] >= 1, operator
    assert set(public) <= set(operator) and operator["server_id"] == public["server_id"]
    assert public["load"] == round(public["load"], 1), "the public load is coarse: tenths below 10 req/s"


def test_s7_reputation_scores_are_for_the_operator_only(default_node):
    public = requests.get(f"{default_node.url}/reputation", timeout=HTTP_TIMEOUT)
    assert public.status_code == 200, public.text
    assert {"blacklisted", "decisions"} <= set(public.json())
    assert not {"scores", "transactions", "audits", "reports"} & set(public.json()), public.json()
    operator = requests.get(f"{default_node.url}/reputation", headers=default_node.operator_headers(),
                            timeout=HTTP_TIMEOUT).json()
    assert {"blacklisted", "decisions", "scores", "transactions", "audits", "reports"} <= set(operator), operator


# ------------------------------------------------------------------ S3 and S4: what a server list may add

def phantom_key(rng: random.Random) -> PublicKey:
    "An RSA-2048 public key nobody holds the private key of (a random odd modulus): a server a list can invent."
    modulus = rng.getrandbits(2048) | (1 << 2047) | 1
    return PublicKey.from_key(rsa.RSAPublicNumbers(65537, modulus).public_key())


class ListSource:
    "A fake server on 127.0.0.1: /status shows its key, POST /servers answers a list of `urls` it signs."

    def __init__(self, identity: Identity, urls: list[str], seed: int = 0):
        rng = random.Random(seed)
        self.identity, self.lists_served = identity, 0
        self.entries = [{"server_id": key.id, "url": url, "public_key": key.b64}
                        for url, key in ((url, phantom_key(rng)) for url in urls)]
        source = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/status":
                    return self.answer(200, {"name": "list source", "server_id": identity.id,
                                             "public_key": identity.public.b64, "version": "test",
                                             "proof_mode": "hardened", "load": 0.0})
                self.answer(404, {"error": "not_found", "detail": self.path})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/servers":
                    return self.answer(404, {"error": "not_found", "detail": self.path})
                source.lists_served += 1
                self.answer(200, source.signed_list())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def signed_list(self) -> dict:
        me = {"server_id": self.identity.id, "url": self.url, "public_key": self.identity.public.b64}
        entries = [me, *self.entries]
        response = ServerListResponse(known_servers=tuple(e["server_id"] for e in entries),
                                      timestamp=format_timestamp(datetime.now(timezone.utc)),
                                      servers=tuple(entries), responder_id=self.identity.id)
        return sign_body(self.identity, response.to_dict())

    def __enter__(self) -> "ListSource":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def node_listening_to(launcher: Launcher, source: ListSource, name: str, *extra_args: str) -> MeshProcess:
    "A node whose only peer is `source`, asking it for its list every 0.3 s; started."
    node = MeshProcess(launcher.root / name, name, free_port(), [source.url], "--directory-interval", "0.3",
                       *extra_args)
    launcher.start(node)
    wait_until(lambda: node.status(operator=False)["known_peers"] == 1, f"{name} to pin the list source")
    return node


def known_servers_after_lists(node: MeshProcess, source: ListSource, rounds: int = 3) -> int:
    "The size of the node's directory once it has taken in `rounds` more of the source's lists."
    seen = source.lists_served
    wait_until(lambda: source.lists_served >= seen + rounds, f"{node.name} to ask for the list {rounds} times")
    return node.status(operator=False)["known_servers"]


def test_s3_one_source_adds_at_most_its_share_of_servers(launcher):
    assert MeshConfig().max_listed_per_source == 32
    phantoms = ["http://127.0.0.1:1"] * 100  # 100 servers (100 keys) at an address where nothing listens
    with ListSource(pool_keys()[0], phantoms) as source:
        node = node_listening_to(launcher, source, "s3")
        assert known_servers_after_lists(node, source) == 1 + 32, "the source itself, and 32 of the 100 it names"
        assert known_servers_after_lists(node, source) == 1 + 32, "later lists add no more"
        assert "Traceback" not in node.stderr()


REFUSED_EVERYWHERE = ["http://10.0.0.1:1", "http://169.254.169.254:1", "http://192.168.1.1:1"]  # LAN, metadata
LOOPBACK = ["http://127.0.0.1:1", "http://localhost:1"]


def test_s4_the_url_rules():
    "What the nodes below do, as a function: `auto` follows the class of the node's own URL."
    for url in REFUSED_EVERYWHERE:
        assert url_refusal(url, "auto", "http://127.0.0.1:8000") is not None, url  # a node on loopback
        assert url_refusal(url, "auto", "http://relay.example.org:8000") is not None, url  # a public node
    for url in LOOPBACK:
        assert url_refusal(url, "auto", "http://127.0.0.1:8000") is None, url
        assert url_refusal(url, "auto", "http://relay.example.org:8000") is not None, url
    assert url_refusal("http://relay.example.net", "auto", "http://relay.example.org:8000") is None
    assert url_refusal("ftp://127.0.0.1/", "any") is not None and url_refusal("http://u:p@127.0.0.1/", "any") is not None


def test_s4_a_node_on_loopback_takes_only_loopback_urls_from_a_list(launcher):
    with ListSource(pool_keys()[1], REFUSED_EVERYWHERE + LOOPBACK, seed=1) as source:
        node = node_listening_to(launcher, source, "s4-loopback")
        assert known_servers_after_lists(node, source) == 1 + len(LOOPBACK), "LAN and metadata addresses refused"


def test_s4_a_node_with_a_public_url_takes_neither_private_nor_loopback_urls(launcher):
    "--public-url names the node as on the Internet (auto policy: public); it still listens on 127.0.0.1 here."
    with ListSource(pool_keys()[2], REFUSED_EVERYWHERE + LOOPBACK, seed=2) as source:
        node = node_listening_to(launcher, source, "s4-public", "--public-url", "http://relay.example.org:8000")
        assert known_servers_after_lists(node, source) == 1, "only the source, a configured peer"


# ------------------------------------------------------------------ H3: slow sockets

def closed_by_server(sock: socket.socket) -> bool:
    "Has the node closed (or reset) this connection? `sock` is non-blocking: this never waits."
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset: the node closed it with our unread request in its buffer
        return True


def status_from(address: str, port: int) -> tuple[int, float]:
    "GET /status from a client bound to `address`: (status, seconds it took)."
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT, source_address=(address, 0))
    try:
        connection.request("GET", "/status")
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    finally:
        connection.close()


def test_h3_one_address_gets_its_share_and_unfinished_requests_are_cut_at_the_deadline(tmp_path):
    total = 100
    with NodeProcess(tmp_path / "data", "h3 node").start() as node:
        port = int(node.url.rsplit(":", 1)[1])
        socks, closed, seen_closed_at = [], set(), {}
        first_byte = time.monotonic()
        try:
            for _ in range(total):  # each begins a request and never finishes it (a slow client, or an attacker)
                sock = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
                socks.append(sock)
                try:
                    sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                except OSError:
                    closed.add(sock)  # closed before we could even write
                sock.setblocking(False)  # (with a timeout, even a MSG_DONTWAIT read would wait for it)
            begun = time.monotonic()

            def count_closed() -> int:
                now = time.monotonic()
                for sock in socks:
                    if sock not in closed and closed_by_server(sock):
                        closed.add(sock)
                        seen_closed_at[sock] = now
                return len(closed)

            wait_until(lambda: count_closed() >= total - CONNECTIONS_PER_ADDRESS,
                       "the node to close the connections beyond one address's share")
            code, took = status_from("127.0.0.2", port)
            assert code == 200 and took < 5, (code, took)  # another address is served at once
            assert count_closed() == total - CONNECTIONS_PER_ADDRESS, "exactly the share stays open"
            kept = [sock for sock in socks if sock not in closed]
            wait_until(lambda: f"127.0.0.1 holds {CONNECTIONS_PER_ADDRESS} connections already" in node.stderr(),
                       "the refusal in the node's log")

            wait_until(lambda: count_closed() == total, "the unfinished requests to be cut",
                       timeout=REQUEST_DEADLINE + WAIT / 4)
            assert time.monotonic() - begun < REQUEST_DEADLINE + WAIT / 4
            assert min(seen_closed_at[sock] for sock in kept) >= first_byte + REQUEST_DEADLINE, \
                "the kept ones were cut by the deadline, not sooner"
            assert status_from("127.0.0.1", port)[0] == 200, "the address is served again once its share is free"
        finally:
            for sock in socks:
                sock.close()
