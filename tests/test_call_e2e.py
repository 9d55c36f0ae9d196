"""A whole audio call: signalling through a real mesh of three `bubble-ref node` processes (each started with
--turn-url/--turn-secret-file/--turn-cert), media through coturn over TLS, between phones on 127.0.0.2 and
127.0.0.3. Only loopback addresses appear anywhere; the callee learns only the relay's address."""
from __future__ import annotations

import asyncio
import ipaddress
import time
from datetime import datetime, timezone

import numpy as np
import pytest
import requests

from bubble_ref.calls import Phone, sdp_addresses, sdp_candidates, start_coturn, turn_credentials_valid
from bubble_ref.client import Client, is_control_content
from bubble_ref.crypto import Identity
from bubble_ref.envelope import make_retrieval_proof
from bubble_ref.mesh import free_port
from nodes import assert_error, wait_until
from turn_support import PeeredNodeProcess, require_turnserver, start_all


@pytest.fixture
def coturn(tmp_path):
    require_turnserver()
    server = start_coturn(tmp_path / "coturn")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def turn_mesh(tmp_path, coturn):
    "Three nodes, each linked to the other two, handing out credentials for `coturn`."
    secret = tmp_path / "turn-secret"
    secret.write_bytes(coturn.secret)
    cert, _ = coturn.certificate.write(tmp_path / "turn-cert")
    turn_args = ("--turn-url", coturn.uri(), "--turn-secret-file", str(secret), "--turn-cert", str(cert))
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = [PeeredNodeProcess(tmp_path / f"n{i}", f"n{i}", ports[i], [u for j, u in enumerate(urls) if j != i],
                               *turn_args) for i in range(3)]
    try:
        start_all(procs)
        wait_until(lambda: all(requests.get(f"{u}/status", timeout=5).json()["known_peers"] == 2 for u in urls),
                   "every node knows its two peers", timeout=120.0)
        yield urls
    finally:
        for proc in procs:
            proc.stop()  # SIGTERM, then SIGKILL if it does not exit in time; a no-op if it never started


def ready_client(tmp_path, name, urls) -> Client:
    client = Client(Identity.generate(), tmp_path / name, default_servers=tuple(urls))
    client.refresh_load()
    client.choose()
    return client


def peak(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(float) * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


async def until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


def test_an_audio_call_through_a_subprocess_mesh_and_coturn_over_tls(tmp_path, turn_mesh, coturn):
    # the nodes hand out credentials that coturn accepts, and only to a proven key
    url = turn_mesh[0]
    assert_error(requests.get(f"{url}/turn-credentials", timeout=10), 415, "unsupported_media_type")
    assert_error(requests.get(f"{url}/turn-credentials", json={"public_key": "AAAA", "signature": "AAAA"},
                              timeout=10), 400, "invalid_packet")
    caller, server_id = Identity.generate(), requests.get(f"{url}/status", timeout=10).json()["server_id"]
    assert_error(requests.get(f"{url}/turn-credentials", json=make_retrieval_proof(caller).to_dict(), timeout=10),
                 401, "bad_proof")  # a spec proof, on a node started without --proof-mode spec
    answer = requests.get(f"{url}/turn-credentials", json=make_retrieval_proof(caller, server_id=server_id).to_dict(),
                          timeout=10).json()
    assert answer["uris"] == [coturn.uri()] and answer["certificate"] == coturn.certificate.cert_pem.decode()
    assert turn_credentials_valid(coturn.secret, answer["username"], answer["credential"],
                                  now=datetime.now(timezone.utc))

    alice_client, bob_client = ready_client(tmp_path, "alice", turn_mesh), ready_client(tmp_path, "bob", turn_mesh)

    async def scenario():
        alice = Phone(alice_client, host="127.0.0.2", name="alice", tone_hz=440).start()
        bob = Phone(bob_client, host="127.0.0.3", name="bob", tone_hz=660, auto_accept=True).start()
        try:
            call_id = await alice.call(bob_client.identity.public.b64)
            both = lambda state: all(call_id in p.machine.calls and p.machine.calls[call_id].state == state
                                     for p in (alice, bob))
            await until(lambda: both("connected") or alice.machine.calls[call_id].state == "failed",
                        "both phones connected")
            assert both("connected"), (alice.machine.calls[call_id].reason, alice.errors, bob.errors)
            await until(lambda: len(bob.media[call_id].heard) >= 75 and len(alice.media[call_id].heard) >= 75,
                        "1.5 s of audio each way")
            await alice.hangup(call_id)
            await until(lambda: both("ended"), "both phones to see the end")
            return alice, bob, call_id
        finally:
            await alice.close()
            await bob.close()

    alice, bob, call_id = asyncio.run(scenario())
    heard_by_bob, heard_by_alice = bob.finished[call_id], alice.finished[call_id]
    assert abs(peak(heard_by_bob.audio(), heard_by_bob.rate) - 440) < 5
    assert abs(peak(heard_by_alice.audio(), heard_by_alice.rate) - 660) < 5
    for phone in (alice, bob):
        pc = phone.finished[call_id].pc
        for sdp in (pc.localDescription.sdp, pc.remoteDescription.sdp):
            assert all(ipaddress.ip_address(a).is_loopback or a == "0.0.0.0" for a in sdp_addresses(sdp)), sdp
            assert {(kind, address) for kind, address, _ in sdp_candidates(sdp)} == {("relay", "127.0.0.1")}
    # the callee learnt the relay's address only, never the caller's laptop
    assert "127.0.0.2" not in bob.finished[call_id].pc.remoteDescription.sdp
    assert [s.type for s in sorted(alice.signals + bob.signals, key=lambda s: s.at) if s.direction == "sent"] == \
        ["invite", "offer", "answer", "end"]
    # coturn saw random usernames, never a key id; the chat shows none of the signalling
    assert alice_client.identity.id[:16] not in coturn.log() and bob_client.identity.id[:16] not in coturn.log()
    assert not any(is_control_content(e.content) for e in bob_client.history())
    assert sum(is_control_content(e.content) for e in bob_client.history(include_control=True)) == 4
    alice_client.close()
    bob_client.close()


def test_a_node_with_a_turn_url_but_no_usable_secret_refuses_to_start(tmp_path, capsys):
    from bubble_ref.cli import main

    base = ["node", "--port", "0", "--data-dir", str(tmp_path / "node"), "--audit-interval", "0",
            "--turn-url", "turns:127.0.0.1:5349?transport=tcp"]
    assert main(base) == 2 and "needs --turn-secret-file" in capsys.readouterr().err
    (tmp_path / "short").write_text("tiny")
    assert main(base + ["--turn-secret-file", str(tmp_path / "short")]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err
    (tmp_path / "secret").write_text("0123456789abcdef0123")
    assert main(base[:-1] + ["stun:127.0.0.1:3478", "--turn-secret-file", str(tmp_path / "secret")]) == 2
    assert "turns:HOST:PORT" in capsys.readouterr().err
    no_url = base[:-2] + ["--turn-secret-file", str(tmp_path / "secret")]
    assert main(no_url) == 2 and "go with --turn-url" in capsys.readouterr().err
    assert not (tmp_path / "node").exists()  # refused before the node's folder and key were made


def test_bench_calls_reports_every_figure(capsys, tmp_path, monkeypatch):
    import tempfile

    from bubble_ref import calls
    from bubble_ref.cli import main

    require_turnserver()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the bench's temporary folder goes under tmp_path
    assert main(["bench", "calls", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bench calls: 2 relay calls over a mesh of 3 `bubble-ref node` processes and coturn")
    for figure in ("invite → both connected", "of which in the mesh (3 msgs)", "offer arrived → connected",
                   "audio frames lost:"):
        assert figure in out, out
    with pytest.raises(ValueError):
        calls.bench_calls(calls=0)
    assert main(["bench", "calls", "--mode", "direct", "-n", "0"]) == 2
    assert "at least one call" in capsys.readouterr().err
