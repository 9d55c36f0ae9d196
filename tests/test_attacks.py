"""Notebook 10's attacker kit against real `bubble-ref node` processes, and the parser's shape limits (H1, H2, H3).

The hostile bodies are the security tester's (bubble_ref.attacks.hostile_requests); `bench_hostile` starts a node
process, sends them in alternated rounds beside valid posts, and reads the node's own CPU and memory from /proc.
Nothing here asserts a ratio of timings: statuses, memory and honest clients' success are what must hold.
"""
from __future__ import annotations

import json
import time

import pytest

from bubble_ref.attacks import MAX_HOSTILE_BYTES, bench_hostile, format_hostile_bench, hostile_requests
from bubble_ref.packets import MAX_PACKET_BYTES, PacketError, json_shape_limits, parse_json


def test_the_kit_stays_within_the_size_a_node_accepts():
    kit = hostile_requests()
    assert len({a.name for a in kit}) == len(kit) >= 10
    assert all(len(a.body) <= MAX_HOSTILE_BYTES == MAX_PACKET_BYTES for a in kit)


@pytest.mark.parametrize("attack", [a for a in hostile_requests() if a.name != "long string"], ids=lambda a: a.name)
def test_the_parser_refuses_each_hostile_body_with_a_clear_error(attack):
    "All but one are refused by the parser itself; the long string is JSON, and the schema refuses it (below)."
    with pytest.raises(PacketError) as refused:
        parse_json("hostile", attack.body)
    assert str(refused.value).strip()


def test_shape_limits_refuse_many_tiny_objects_before_parsing_and_keep_honest_documents():
    containers, separators = json_shape_limits(MAX_PACKET_BYTES)
    assert (containers, separators) == (512, 8192)
    with pytest.raises(PacketError, match="too many objects and arrays"):
        parse_json("votes", b"[" + b"{}," * 43_000 + b"{}]")
    with pytest.raises(PacketError, match="too many values"):
        parse_json("numbers", b"[" + b"0," * 60_000 + b"0]")
    # the largest honest documents: a quorum decision with as many signed votes as fit (about 1 KB each) ...
    vote = {"type": "vote", "voter_id": "ab" * 32, "reported_server_id": "cd" * 32, "vote": "blacklist",
            "timestamp": "2026-12-01T10:00:00Z", "public_key": "A" * 392, "signature": "B" * 344}
    decision = {"type": "quorum_decision", "reported_server_id": "cd" * 32, "final_decision": "blacklisted",
                "timestamp": "2026-12-01T10:00:00Z", "votes": {f"{i:064x}": "blacklist" for i in range(110)},
                "signed_votes": [vote] * 110}
    text = json.dumps(decision).encode()
    assert len(text) <= MAX_PACKET_BYTES and parse_json("decision", text) == decision
    # ... and a sync answer of 512 KiB of the smallest sealed packets (about 1 KiB each)
    item = {"packet_id": "ef" * 32, "received_at": "2026-12-01T10:00:00Z",
            "packet": {"recipient": "C" * 392, "message": "D" * 200, "signature": "E" * 344}}
    page = {"packets": [item] * 450, "next_cursor": "450", "more": True}
    text = json.dumps(page).encode()
    assert len(text) <= 512 * 1024 and parse_json("answer", text, max_bytes=512 * 1024) == page


def test_the_long_string_is_refused_by_the_schema():
    from bubble_ref.packets import ClientMessagePacket

    attack = next(a for a in hostile_requests() if a.name == "long string")
    with pytest.raises(PacketError):
        ClientMessagePacket.from_dict(parse_json("client_message", attack.body))


def test_bench_hostile_on_a_real_node_process():
    "Every hostile body gets a 4xx from the node as served, memory stays put, and slow sockets starve no one."
    started = time.monotonic()
    result = bench_hostile(rounds=1, per_round=5, slow_sockets=150, honest=10)
    report = format_hostile_bench(result)
    assert all(all(400 <= s < 500 for s in statuses) for statuses in result.statuses.values()), report
    assert set(result.hostile_cpu_ms) == {a.name for a in hostile_requests()}
    assert result.rss_after < result.rss_before * 1.25, report
    assert result.honest == [r for r in result.honest if r is not None] and len(result.honest) == 10, report
    assert result.slow_held <= 64, report
    assert "worst kind" in report and time.monotonic() - started < 300
