"""STUN (notebook 11a): the codec against the RFC 5769 vectors and against aioice, the responder's rules, the
server over UDP and TLS answering an independent client (aioice's codec), and `bubble-ref stun` as a process."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from aioice import stun as aioice_stun

from bubble_ref import stun
from bubble_ref.stun import (
    BINDING, ERROR, ERROR_CODE, REQUEST, SOFTWARE, SUCCESS, UNKNOWN_ATTRIBUTES, USERNAME,
    XOR_MAPPED_ADDRESS, StunError, StunMessage, decode, encode, read_xor_address, xor_address)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc5769.json").read_text("utf-8"))
NAMES = ["sample_request", "ipv4_response", "ipv6_response", "long_term_request"]
BUBBLE_REF = Path(sys.executable).parent / "bubble-ref"


def key_of(name: str) -> bytes:
    vector = VECTORS[name]
    if name == "long_term_request":
        return stun.long_term_key(vector["username"], vector["realm"], vector["password"])
    return vector["password"].encode("utf-8")


# ------------------------------------------------------------------ the codec against RFC 5769

@pytest.mark.parametrize("name", NAMES)
def test_each_rfc5769_vector_is_checked_and_rebuilt_byte_for_byte(name):
    wire = bytes.fromhex(VECTORS[name]["hex"])
    message = decode(wire, integrity_key=key_of(name))
    rebuilt = encode(message, integrity_key=key_of(name), fingerprint=name != "long_term_request",
                     padding=VECTORS[name]["padding"].encode("utf-8"))
    assert rebuilt == wire
    with pytest.raises(StunError, match="MESSAGE-INTEGRITY does not match"):
        decode(wire, integrity_key=b"not the password")


def test_the_sample_request_carries_what_rfc5769_lists():
    vector = VECTORS["sample_request"]
    message = decode(bytes.fromhex(vector["hex"]))
    assert (message.method, message.cls) == (BINDING, REQUEST)
    assert message.get(SOFTWARE) == vector["software"].encode()
    assert message.get(USERNAME) == vector["username"].encode()
    assert struct.unpack("!I", message.get(0x0024))[0] == vector["priority"]
    assert message.get(0x8029).hex() == vector["ice_controlled"]


@pytest.mark.parametrize("name", ["ipv4_response", "ipv6_response"])
def test_the_responses_map_to_the_published_addresses(name):
    message = decode(bytes.fromhex(VECTORS[name]["hex"]))
    assert (message.method, message.cls) == (BINDING, SUCCESS)
    assert list(read_xor_address(message.get(XOR_MAPPED_ADDRESS), message.transaction_id)) == \
        VECTORS[name]["mapped_address"]


def test_every_single_bit_flip_is_refused_or_changes_nothing_that_is_read():
    wire = bytes.fromhex(VECTORS["sample_request"]["hex"])
    original = decode(wire, integrity_key=key_of("sample_request"))
    unprotected = []
    for index in range(len(wire)):
        for bit in range(8):
            damaged = bytearray(wire)
            damaged[index] ^= 1 << bit
            try:
                read = decode(bytes(damaged), integrity_key=key_of("sample_request"))
            except StunError:
                continue
            assert read == original, (index, bit)
            unprotected.append(index)
    # only the FINGERPRINT's type: it then names an attribute after MESSAGE-INTEGRITY, which a reader ignores
    assert sorted(set(unprotected)) == [len(wire) - 8, len(wire) - 7]


def test_message_types_interleave_the_class_bits():
    assert stun.message_type(BINDING, REQUEST) == 0x0001
    assert stun.message_type(BINDING, SUCCESS) == 0x0101
    assert stun.message_type(BINDING, ERROR) == 0x0111
    assert stun.message_type(0x009, REQUEST) == 0x0009  # TURN's ChannelBind
    assert stun.message_type(0xFFF, 0b11) == 0x3FFF
    for method in range(0x1000):
        for cls in range(4):
            assert stun.split_type(stun.message_type(method, cls)) == (method, cls)
    with pytest.raises(ValueError):
        stun.message_type(0x1000, REQUEST)


# -------------------------------------------------------------------------- against aioice

def test_aioice_reads_what_we_write():
    tid = bytes(range(12))
    message = StunMessage(BINDING, SUCCESS, tid, ((XOR_MAPPED_ADDRESS, xor_address("2001:db8::7", 3478, tid)),
                                                   (SOFTWARE, b"bubble-ref"), (USERNAME, b"alice:bob")))
    theirs = aioice_stun.parse_message(encode(message, integrity_key=b"pw"))
    assert theirs.message_method == aioice_stun.Method.BINDING and theirs.message_class == aioice_stun.Class.RESPONSE
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::7", 3478)
    assert theirs.attributes["SOFTWARE"] == "bubble-ref" and theirs.attributes["USERNAME"] == "alice:bob"
    assert theirs.check_message_integrity(b"pw") and not theirs.check_message_integrity(b"other")


def test_we_read_what_aioice_writes_and_write_the_same_bytes():
    theirs = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    theirs.attributes["USERNAME"] = "evtj:h6vY"
    theirs.attributes["PRIORITY"] = 1845494271
    theirs.attributes["ICE-CONTROLLED"] = 0x932FF9B151263B36
    theirs.add_message_integrity(b"secret")
    wire = bytes(theirs)
    ours = decode(wire, integrity_key=b"secret")
    assert ours.get(USERNAME) == b"evtj:h6vY" and struct.unpack("!I", ours.get(0x0024))[0] == 1845494271
    assert encode(ours, integrity_key=b"secret") == wire  # same attributes, same order: the same bytes


def test_aioice_is_laxer_than_a_server_may_be():
    tid = bytes(12)
    no_cookie = bytearray(encode(StunMessage(BINDING, REQUEST, tid), fingerprint=False))
    no_cookie[4:8] = bytes(4)
    aioice_stun.parse_message(bytes(no_cookie))  # aioice accepts an RFC 3489 message
    with pytest.raises(StunError, match="magic cookie"):
        decode(bytes(no_cookie))


# -------------------------------------------------------------------------- decoding rules

@pytest.mark.parametrize("wire, problem", [
    (b"\x00\x01\x00\x00\x21\x12\xa4", "a STUN message is 20"),
    (bytes(20 + stun.MAX_MESSAGE_BYTES), "a STUN message is 20"),
    (b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), "first two bits"),
    (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12), "must match"),
    (b"\x00\x01\x00\x03\x21\x12\xa4\x42" + bytes(12) + b"abc", "multiples of 4"),
    (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12) + b"\x80\x22\x00\x08", "claims 8 bytes"),
    (b"\x00\x01\x00\x10\x21\x12\xa4\x42" + bytes(12) + b"\x80\x28\x00\x04abcd\x80\x22\x00\x00" + bytes(4),
     "FINGERPRINT must be the last"),
    (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + bytes(12) + b"\x00\x08\x00\x04abcd", "MESSAGE-INTEGRITY must be 20"),
])
def test_decode_names_the_rule_that_bytes_break(wire, problem):
    with pytest.raises(StunError, match=problem):
        decode(wire)


def test_a_key_requires_message_integrity_and_later_attributes_are_dropped():
    tid = bytes(12)
    with pytest.raises(StunError, match="MESSAGE-INTEGRITY is missing"):
        decode(encode(StunMessage(BINDING, REQUEST, tid)), integrity_key=b"pw")
    signed = encode(StunMessage(BINDING, REQUEST, tid, ((SOFTWARE, b"kept"),)), integrity_key=b"pw", fingerprint=False)
    extra = struct.pack("!HH", USERNAME, 4) + b"evil"
    tampered = signed[:2] + struct.pack("!H", len(signed) - 20 + len(extra)) + signed[4:] + extra
    assert decode(tampered, integrity_key=b"pw").get(USERNAME) is None  # not protected, so not kept


def test_xor_addresses_round_trip_and_bad_lengths_are_refused():
    tid = bytes(range(12))
    for host, port in [("0.0.0.0", 0), ("255.255.255.255", 65535), ("::1", 1), ("2001:db8::ffff", 40000)]:
        assert read_xor_address(xor_address(host, port, tid), tid) == (host, port)
    with pytest.raises(StunError):
        read_xor_address(b"\x00\x01\x00\x00", tid)
    with pytest.raises(StunError):
        read_xor_address(b"\x00\x02" + bytes(6), tid)  # family 2 with an IPv4-sized value


# ------------------------------------------------------------------------------ the responder

def test_the_responder_answers_binding_and_nothing_else():
    responder = stun.StunResponder(software="test")
    request = stun.binding_request()
    answer = decode(responder.respond(encode(request), ("198.51.100.4", 4242)))
    assert (answer.cls, answer.transaction_id) == (SUCCESS, request.transaction_id)
    assert read_xor_address(answer.get(XOR_MAPPED_ADDRESS), answer.transaction_id) == ("198.51.100.4", 4242)
    assert answer.get(SOFTWARE) == b"test"
    optional = stun.binding_request(None, (0x8055, b"optional, unknown"))
    assert decode(responder.respond(encode(optional), ("198.51.100.4", 1))).cls == SUCCESS

    required = stun.binding_request(None, (0x0031, b"x"), (0x0032, b"y"))
    error = decode(responder.respond(encode(required), ("198.51.100.4", 1)))
    assert error.cls == ERROR and error.get(ERROR_CODE)[2:4] == bytes([4, 20])
    assert error.get(UNKNOWN_ATTRIBUTES) == bytes.fromhex("00310032")

    allocate = StunMessage(0x003, REQUEST, bytes(12))
    assert decode(responder.respond(encode(allocate), ("198.51.100.4", 1))).get(ERROR_CODE)[2:4] == bytes([4, 0])
    assert responder.respond(encode(answer), ("198.51.100.4", 1)) is None  # never answer an answer
    assert responder.respond(b"\x16\x03\x01" + bytes(40), ("198.51.100.4", 1)) is None  # a TLS hello on the UDP port
    assert dict(responder.counts) == {"answered": 2, "error 420": 1, "error 400": 1, "not a request": 1,
                                      "not stun": 1}


# ------------------------------------------------------------------- the server, over the wire

async def aioice_over_udp(server: tuple[str, int], local: str) -> tuple[tuple, tuple]:
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data, source):
            if not answer.done():
                answer.set_result(aioice_stun.parse_message(data))

    transport, _ = await loop.create_datagram_endpoint(Client, local_addr=(local, 0))
    try:
        request = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
        for _ in range(5):
            transport.sendto(bytes(request), server)
            try:
                message = await asyncio.wait_for(asyncio.shield(answer), 1.0)
                break
            except asyncio.TimeoutError:
                continue
        assert message.transaction_id == request.transaction_id
        return message.attributes["XOR-MAPPED-ADDRESS"], transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


async def aioice_over_tls(server: tuple[str, int], context: ssl.SSLContext, local: str) -> tuple[tuple, tuple]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*server, ssl=context, local_addr=(local, 0)), 10)
    try:
        request = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
        writer.write(bytes(request))
        header = await asyncio.wait_for(reader.readexactly(20), 10)
        message = aioice_stun.parse_message(header + await reader.readexactly(struct.unpack("!H", header[2:4])[0]))
        assert message.transaction_id == request.transaction_id
        return message.attributes["XOR-MAPPED-ADDRESS"], writer.get_extra_info("sockname")[:2]
    finally:
        writer.close()


def test_the_server_answers_aioice_over_udp_and_over_tls():
    async def scenario():
        server = await stun.start_stun_server("127.0.0.1", tls_port=0)
        try:
            mapped, local = await aioice_over_udp(server.udp, "127.0.0.2")
            assert tuple(mapped) == tuple(local) and mapped[0] == "127.0.0.2"
            mapped, local = await aioice_over_tls(server.tls, server.certificate.client_context(), "127.0.0.3")
            assert tuple(mapped) == tuple(local) and mapped[0] == "127.0.0.3"
            # our own clients, with a pinned fingerprint
            assert (await stun.binding_over_udp(server.udp, local=("127.0.0.4", 0)))[0] == "127.0.0.4"
            assert (await stun.binding_over_tls(server.tls, fingerprint=server.certificate.fingerprint,
                                                local_host="127.0.0.5"))[0] == "127.0.0.5"
            with pytest.raises(StunError, match="not the pinned"):
                await stun.binding_over_tls(server.tls, fingerprint=stun.make_certificate().fingerprint)
            with pytest.raises(ssl.SSLError):  # a context that trusts another certificate
                await stun.binding_over_tls(server.tls, ssl_context=stun.make_certificate().client_context())
        finally:
            await server.close()
        assert server.responder.counts["answered"] == 4
    asyncio.run(scenario())


def test_the_tls_server_closes_bad_streams_and_keeps_serving():
    async def scenario():
        server = await stun.start_stun_server("127.0.0.1", tls_port=0)
        context = server.certificate.client_context()
        try:
            for junk in (b"GET / HTTP/1.1\r\n\r\n" + bytes(8),  # not STUN
                         struct.pack("!HHI12s", 1, 4000, stun.MAGIC_COOKIE, bytes(12))):  # too long
                reader, writer = await asyncio.open_connection(*server.tls, ssl=context)
                writer.write(junk)
                assert await asyncio.wait_for(reader.read(100), 10) == b""  # closed without an answer
                writer.close()
            # a plain TCP client that never starts TLS is dropped too, and the server still serves
            def plain_stun_to_the_tls_port() -> bytes:
                with socket.create_connection(server.tls, timeout=15) as plain:
                    plain.sendall(encode(stun.binding_request()))
                    return plain.recv(100)
            answer = await asyncio.to_thread(plain_stun_to_the_tls_port)
            assert answer == b"" or answer[:1] == b"\x15", answer  # closed, at most with a TLS alert: no STUN
            assert (await stun.binding_over_tls(server.tls, ssl_context=context))[0] == "127.0.0.1"
        finally:
            await server.close()
    asyncio.run(scenario())


def test_the_recording_proxy_only_forwards_to_loopback():
    async def scenario():
        with pytest.raises(ValueError, match="loopback"):
            await stun.RecordingProxy(("192.0.2.1", 3478)).start()
    asyncio.run(scenario())


# -------------------------------------------------------------------------------- the command

def start_stun_process(*args: str) -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen([str(BUBBLE_REF), "stun", "--host", "127.0.0.1", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [process.stdout.readline() for _ in range(2 if "--tls-port" in args else 1)]
    assert all(lines), (lines, process.stderr.read() if process.poll() is not None else "")
    return process, lines


def test_bubble_ref_stun_serves_both_transports_and_stops_on_sigterm(tmp_path):
    certificate = stun.make_certificate()
    cert, key = certificate.write(tmp_path / "tls")
    process, (udp_line, tls_line) = start_stun_process("--tls-port", "0", "--cert", str(cert), "--key", str(key))
    try:
        udp_port = int(re.search(r"UDP on 127\.0\.0\.1:(\d+)", udp_line)[1])
        tls_port, fingerprint = re.search(r"TLS on 127\.0\.0\.1:(\d+), certificate sha-256 ([0-9A-F:]{95}) \(given",
                                          tls_line).groups()
        assert fingerprint == certificate.fingerprint

        async def ask():
            by_udp, _ = await aioice_over_udp(("127.0.0.1", udp_port), "127.0.0.2")
            by_tls, _ = await aioice_over_tls(("127.0.0.1", int(tls_port)), certificate.client_context(), "127.0.0.3")
            return by_udp[0], by_tls[0]
        assert asyncio.run(ask()) == ("127.0.0.2", "127.0.0.3")
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert out.startswith("bubble-ref stun stopped after 2 requests")


def test_bubble_ref_stun_makes_a_certificate_when_given_none():
    process, (_, tls_line) = start_stun_process("--tls-port", "0")
    try:
        assert "self-signed, made now; clients pin this fingerprint" in tls_line
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)
    assert process.returncode == 0


def test_bubble_ref_stun_refuses_half_a_key_pair_and_missing_files(tmp_path, capsys):
    from bubble_ref.cli import main

    assert main(["stun", "--port", "0", "--tls-port", "0", "--cert", "x.pem"]) == 2
    assert "both --cert and --key" in capsys.readouterr().err
    assert main(["stun", "--port", "0", "--tls-port", "0", "--cert", str(tmp_path / "none.pem"),
                 "--key", str(tmp_path / "none.key")]) == 2
    assert "No such file" in capsys.readouterr().err


CALLS_HEAVY = ("flask", "werkzeug", "jsonschema", "fastjsonschema", "matplotlib", "requests", "cryptography",
               "waitress", "aiortc", "aioice", "av", "numpy")


@pytest.mark.parametrize("argv", [["stun", "--help"], ["bench", "calls", "--help"], ["node", "--help"]])
def test_the_call_commands_help_imports_no_heavy_library(argv):
    "`--help` of the commands notebooks 11a and 11b add stays fast: no web, crypto, media or numeric library."
    probe = ("import sys\nfrom bubble_ref import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print('HEAVY', sorted(m for m in {CALLS_HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", result.stdout[-500:]
    assert "--turn-url" in result.stdout if argv[0] == "node" else "usage: bubble-ref" in result.stdout
