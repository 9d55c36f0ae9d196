"""The expiry sweep in bounded steps: a big expired slot is read `sweep_rows` rows per step, then dropped whole.

No wall time here: what a step does is checked on what SQLite executes (its virtual-machine instructions, counted
with a progress handler) and on the counts, which must be exact after every step and across a restart.
"""
from __future__ import annotations

import random
from datetime import timedelta

import pytest

from bubble_ref.node import After, NodeConfig, Swept, open_relay_node
from bubble_ref.store import SLOT, SWEEP_ROWS, Mailbox, ManualClock

R1, R2 = "01" * 32, "02" * 32
SWEEP = ("mailbox", "sweep")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()  # starts on a slot boundary


def fill(mailbox: Mailbox, clock: ManualClock, expired: int, alive: int = 3) -> None:
    "`expired` packets in the slot that ends one slot from now, `alive` in a slot a week away."
    mailbox.store_many([(f"{n:064x}", R1, '{"n": %d}' % n) for n in range(expired)],
                       expires_at=clock() + timedelta(minutes=1))
    mailbox.store_many([(f"{n:064x}", R2, "{}") for n in range(expired, expired + alive)])


def tables(mailbox: Mailbox) -> int:
    return mailbox.connection().execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'messages_%'").fetchone()[0]


def steps_with_work(mailbox: Mailbox) -> list[tuple[int | None, int, int]]:
    "Sweep to the end: (packets gone, count() after, SQLite instructions run) for each step."
    db, ops, out = mailbox.connection(), [0], []

    def tick() -> int:
        ops[0] += 1
        return 0

    db.set_progress_handler(tick, 1)
    try:
        while True:
            ops[0] = 0
            changes = db.total_changes
            removed = mailbox.sweep_step()
            assert removed != 0 or db.total_changes == changes, "a reading step writes nothing"
            assert not db.in_transaction
            work = ops[0]
            out.append((removed, mailbox.count(), work))
            if removed is None:
                return out
    finally:
        db.set_progress_handler(None, 1)


def test_a_big_slot_is_read_sweep_rows_at_a_time_then_dropped_in_one_step(tmp_path, clock):
    mailbox = Mailbox(tmp_path / "m.sqlite3", clock=clock, sweep_rows=10)
    fill(mailbox, clock, expired=35)
    clock.advance(SLOT + timedelta(minutes=1))
    steps = steps_with_work(mailbox)
    assert [removed for removed, _, _ in steps] == [0, 0, 0, 0, 35, None], "35 rows: reads of 10, 10, 10, 5; a drop"
    assert [count for _, count, _ in steps] == [38, 38, 38, 38, 3, 3], "exact after every step: rows go with the drop"
    assert tables(mailbox) == 1 and [p.packet_id for p in mailbox.fetch(R2).packets] == [f"{n:064x}" for n in (35, 36, 37)]
    mailbox.close()


def test_a_step_does_the_same_bounded_work_however_big_the_slot(tmp_path, clock):
    """The instructions SQLite runs in the largest step do not grow with the slot (they would, reading it at once).

    (The drop is one instruction whatever the slot's size; its work is freeing the table's pages, which the reading
    steps have brought into memory. That part is measured, not tested: `bubble-ref bench store`.)"""
    work = {}
    for expired in (40, 400):
        box_clock = ManualClock(clock())
        mailbox = Mailbox(tmp_path / f"m{expired}.sqlite3", clock=box_clock, sweep_rows=10)
        fill(mailbox, box_clock, expired)
        box_clock.advance(SLOT + timedelta(minutes=1))
        steps = steps_with_work(mailbox)
        assert len(steps) == expired // 10 + 3 and steps[-2][:2] == (expired, 3)  # reads, the drop, None
        work[expired] = max(ops for _, _, ops in steps)
        mailbox.close()
    assert work[400] == work[40], work


def test_a_small_slot_goes_in_one_step(tmp_path, clock):
    mailbox = Mailbox(tmp_path / "m.sqlite3", clock=clock)
    fill(mailbox, clock, expired=SWEEP_ROWS)
    clock.advance(SLOT + timedelta(minutes=1))
    assert [mailbox.sweep_step(), mailbox.sweep_step()] == [SWEEP_ROWS, None]
    assert mailbox.count() == 3 and tables(mailbox) == 1
    mailbox.close()


def test_a_restart_mid_sweep_keeps_the_counts_and_sweeps_again(tmp_path, clock):
    "Reading steps change nothing on disk: a node killed between steps reopens exact, and its sweep starts over."
    mailbox = Mailbox(tmp_path / "m.sqlite3", clock=clock, sweep_rows=10)
    fill(mailbox, clock, expired=35)
    clock.advance(SLOT + timedelta(minutes=1))
    assert [mailbox.sweep_step(), mailbox.sweep_step()] == [0, 0]
    mailbox.close()  # (uncommitted work would be lost here; a reading step has none)
    again = Mailbox(tmp_path / "m.sqlite3", clock=clock, sweep_rows=10)
    assert again.count() == 38 and tables(again) == 2
    assert [again.sweep_step() for _ in range(6)] == [0, 0, 0, 0, 35, None]
    assert again.count() == 3 == sum(1 for _ in again.fetch(R2).packets)
    again.close()


def test_the_node_runs_the_reading_steps_back_to_back(tmp_path, clock):
    "A reading step did something: the node asks for the next step at once, not a sweep interval later."
    node = open_relay_node(tmp_path / "n", clock=clock, rng=random.Random(0),
                           config=NodeConfig(sweep_interval=timedelta(minutes=10)))
    try:
        node.mailbox.sweep_rows = 10
        removed: list[int] = []
        node.on(Swept, lambda event: removed.append(event.removed) or [])
        fill(node.mailbox, clock, expired=25)
        clock.advance(SLOT + timedelta(minutes=1))
        nexts = [node.on_timer(SWEEP) for _ in range(5)]
        assert removed == [25, 0], "no Swept for a reading step: the roles prune once per dropped slot"
        assert nexts == [[After(timedelta(0), SWEEP)]] * 4 + [[After(timedelta(minutes=10), SWEEP)]]
        assert node.mailbox.count() == 3
    finally:
        node.close()
