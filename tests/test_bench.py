"""The benchmarks measure what they say: small runs of `bench store` on a real SQLite mailbox."""
from __future__ import annotations

from bubble_ref.bench import bench_store, format_store_bench


def test_bench_store_sweeps_the_expired_half_slot_by_slot_beside_a_writer(tmp_path):
    result = bench_store(packets=2_000, recipients=20, fetches=20, directory=str(tmp_path))
    assert len(result.fetch_latencies) == len(result.fetch_cpu) == 20 and result.fetch_percentile(99, cpu=True) > 0
    # arrivals are spread over 7 days and the sweep runs at day 10.5: about half has expired
    assert 0.40 <= result.swept / result.packets <= 0.55, result.swept
    assert result.writer_waits, "a writer stored packets during the sweep"
    assert 0 < result.longest_sweep_step <= result.sweep_seconds
    assert result.bytes_per_packet > 2_000, "client-sized packets (at least the smallest padded bucket)"
    lines = format_store_bench(result).splitlines()
    assert "target p99 <= 5 ms" in lines[1] and "target <= 2 s" in lines[2] and "target <= 50 ms" in lines[3]
    assert list(tmp_path.iterdir()) == [], "the temporary database is removed"


def test_the_live_mesh_counts_what_real_node_processes_sent():
    """Four `bubble-ref node` processes, one a silent dropper: every honest node holds every packet, and the operator
    counters say what the broadcast cost (not waiting for the blacklisting here: `bubble-ref bench mesh` does)."""
    from bubble_ref.bench import _live_mesh

    live = _live_mesh(4, 6, wait=0)
    assert live.delivery == 1.0 and live.blacklisted_after is None
    # Each packet reaches the 3 honest nodes: its origin sends it to all 2-3 peers, the tree relays the rest; the
    # first packets also flood while the tree forms. Fewer than one send per node would mean a counter is missing.
    assert 0.5 <= live.payload_sends_per_message_per_node <= 3.0
