"""The client against a live in-process mesh of three nodes (each linked to the other two)."""
import json
import warnings
from pathlib import Path

import pytest
import requests

from bubble_ref.client import (
    Client, ClientError, NoServerAvailable, ServerKeyWarning, Transport, read_self_copy, self_copy_content)
from bubble_ref.crypto import Identity
from bubble_ref.envelope import open_message, seal
from bubble_ref.mesh import start_local_mesh

from nodes import HTTP_TIMEOUT, fetch_all, wait_until


@pytest.fixture(scope="module")
def running_mesh(tmp_path_factory):
    running = start_local_mesh(tmp_path_factory.mktemp("client-mesh"), ["n0", "n1", "n2"], "ring")
    yield running
    for r in running.values():
        r.stop()


@pytest.fixture(scope="module")
def mesh(running_mesh):
    "The URLs of the three nodes."
    return [r.url for r in running_mesh.values()]


def client(tmp_path, name, identity=None, servers=(), **kwargs):
    identity = identity or Identity.generate()
    return Client(identity, tmp_path / name, default_servers=tuple(servers), **kwargs)


class RecordingTransport(Transport):
    "An RX transport that keeps every packet the servers hand out (POST /messages/retrieve), duplicates included."

    def __init__(self):
        super().__init__()
        self.received = []

    def request(self, method, url, body=None):
        status, answer = super().request(method, url, body)
        if (method, url.rsplit("/", 2)[-2:]) == ("POST", ["messages", "retrieve"]) and status == 200:
            self.received += [item["packet"] for item in answer["messages"]]
        return status, answer


class FailingTransport(Transport):
    "A transport for which some URLs are unreachable (a dead server), counting the attempts."

    def __init__(self, dead=()):
        super().__init__()
        self.dead, self.attempts = set(dead), []

    def request(self, method, url, body=None):
        self.attempts.append((method, url))
        if any(url.startswith(d) for d in self.dead):
            raise ClientError(f"{url} could not be reached (simulated)")
        return super().request(method, url, body)


def test_login_with_a_key_file_and_password(tmp_path, alice):
    alice.save(tmp_path / "alice.pem", password="pw")
    logged_in = Client.login(tmp_path / "alice.pem", tmp_path / "profile", password="pw")
    assert logged_in.identity.id == alice.id
    logged_in.close()
    with pytest.raises(ClientError, match="wrong password"):
        Client.login(tmp_path / "alice.pem", tmp_path / "profile", password="nope")
    with pytest.raises(ClientError, match="cannot log in"):
        Client.login(tmp_path / "missing.pem", tmp_path / "profile")


def test_one_server_is_not_enough_then_discovery_grows_the_registry(tmp_path, mesh):
    c = client(tmp_path, "c", servers=mesh[:1])
    with pytest.raises(NoServerAvailable, match="TX and RX need two different ones"):
        c.choose()
    assert c.discover() == 2
    assert c.discover() == 0  # nothing new the second time...
    assert sorted(s.url for s in c.servers()) == sorted(mesh)
    assert all(s.vouchers == 2 for s in c.servers())  # ...but every key is now confirmed by two other servers
    c.refresh_load()
    tx, rx = c.choose()
    assert tx != rx and {tx, rx} <= set(mesh)
    c.close()


def test_alice_and_bob_talk_both_ways_with_tx_different_from_rx(tmp_path, mesh):
    alice, bob = client(tmp_path, "alice", servers=mesh), client(tmp_path, "bob", servers=mesh)
    for c in (alice, bob):
        c.refresh_load()
        assert c.choose()[0] != c.choose()[1]
    alice.send(bob.identity.public, "ping")
    wait_until(lambda: bob.poll() or [m.content for m in bob.history()] == ["ping"], "Bob to receive the ping")
    bob.send(alice.identity.public.pem, "pong")  # a PEM spelling of the key works too
    wait_until(lambda: alice.poll() or len(alice.history()) == 2, "Alice to receive the answer")
    assert [(m.direction, m.content) for m in alice.history(bob.identity.public)] == [("out", "ping"), ("in", "pong")]
    assert [(m.direction, m.content) for m in bob.history(alice.identity.public)] == [("in", "ping"), ("out", "pong")]
    assert alice.poll() == [] and len(alice.history()) == 2  # polling again records nothing twice
    alice.close()
    bob.close()


def test_two_devices_with_one_key_share_one_history(tmp_path, mesh):
    me, friend = Identity.generate(), client(tmp_path, "friend", servers=mesh)
    laptop, phone = client(tmp_path, "laptop", me, mesh), client(tmp_path, "phone", me, mesh)
    for c in (laptop, phone, friend):
        c.refresh_load()
        c.choose()
    if phone.rx == laptop.rx:  # make the two devices read from different RX servers
        phone.rx = next(u for u in mesh if u not in (laptop.rx, phone.tx))
    assert phone.rx != laptop.rx and phone.rx != phone.tx
    laptop.send(friend.identity.public, "sent from the laptop")
    friend.send(me.public, "to both your devices")
    for device in (laptop, phone):
        wait_until(lambda: device.poll() or len(device.history()) == 2, "each device to hold both messages")
    assert [m.uuid for m in phone.history()] == [m.uuid for m in laptop.history()]
    assert {(m.direction, m.content) for m in phone.history()} == {
        ("out", "sent from the laptop"), ("in", "to both your devices")}
    for c in (laptop, phone, friend):
        c.close()


def test_a_dead_tx_server_is_replaced_and_the_message_arrives_exactly_once(tmp_path, mesh, running_mesh):
    bob_rx = RecordingTransport()
    bob = client(tmp_path, "bob2", servers=mesh, rx=bob_rx)
    bob.refresh_load()
    bob.choose()
    tx_transport = FailingTransport()
    alice = client(tmp_path, "alice2", servers=mesh, tx=tx_transport)
    alice.refresh_load()
    first_tx, _ = alice.choose()
    tx_transport.dead.add(first_tx)  # the TX server dies mid-conversation
    alice.send(bob.identity.public, "still there?")
    assert alice.tx != first_tx
    assert ("POST", f"{first_tx}/messages") in tx_transport.attempts
    wait_until(lambda: bob.poll() or len(bob.history()) == 1, "Bob to receive the message")

    def copies_at(url):
        "The packets in Bob's mailbox at `url` that open to the message (the history would hide duplicates)."
        packets = [m["packet"] for m in fetch_all(url, bob.identity)[0]]
        return [p for p in packets if open_message(bob.identity, p).content == "still there?"]

    def outbox(r):
        token = {"Authorization": f"Bearer {r.node.operator_token}"}
        return requests.get(f"{r.url}/status", headers=token, timeout=HTTP_TIMEOUT).json()["outbox"]

    # the mesh is quiet: every node has the message and no relay is left to send (no later copy can come)
    wait_until(lambda: all(copies_at(r.url) and outbox(r) == 0 for r in running_mesh.values()),
               "a copy at every node and every outbox empty")
    bob.poll()
    assert [m.content for m in bob.history()] == ["still there?"]
    assert [len(copies_at(url)) for url in mesh] == [1, 1, 1], "one packet at every node, not a resent second one"
    received = [p for p in bob_rx.received if open_message(bob.identity, p).content == "still there?"]
    assert len(received) == 1, f"Bob was handed {len(received)} copies of the message"
    alice.close()
    bob.close()


def test_a_server_with_a_new_key_triggers_a_warning_and_is_distrusted(tmp_path, mesh):
    c = client(tmp_path, "pinning", servers=mesh[:1])
    impostor = Identity.generate()

    class Impostor(Transport):
        def request(self, method, url, body=None):
            status, answer = super().request(method, url, body)
            if url.endswith("/status") and isinstance(answer, dict):
                answer = {**answer, "public_key": impostor.public.b64, "server_id": impostor.id}
            return status, answer

    c.rx_transport = Impostor()
    with pytest.warns(ServerKeyWarning, match="pinned"):
        c.learn(mesh[0])
    assert c.servers() == [] and len(c.servers(trusted_only=False)) == 1
    c.close()


def test_forgeries_and_other_peoples_self_copies_never_enter_the_history(tmp_path, mesh, mallory):
    alice, bob = client(tmp_path, "alice3", servers=mesh), client(tmp_path, "bob3", servers=mesh)
    for c in (alice, bob):
        c.refresh_load()
        c.choose()
    # Mallory writes Bob a "self-copy" claiming Bob sent something: it is not from Bob, so it is an ordinary message
    fake = seal(mallory, bob.identity.public, self_copy_content(alice.identity.public, "I owe Mallory", "x" * 8))
    Transport().request("POST", f"{bob.rx}/messages", fake.to_dict())
    wait_until(lambda: bob.poll() or len(bob.history()) == 1, "Bob to receive the message")
    entry = bob.history()[0]
    assert entry.direction == "in" and entry.peer == mallory.public.b64
    assert read_self_copy(entry.content)["content"] == "I owe Mallory"  # shown as what Mallory sent, nothing more
    assert read_self_copy("plain text") is None and read_self_copy(json.dumps({"kind": "other"})) is None
    alice.close()
    bob.close()
