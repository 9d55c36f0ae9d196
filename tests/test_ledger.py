"""The ledger (notebook 09a): the rules (scores, opinions, proposals, majorities, rate limits) and the Ledger role,
in process on a manual clock: what the mesh tells it (events), what it stores, what GET /reputation shows."""
from __future__ import annotations

import random
from datetime import timedelta

import pytest

from bubble_ref.ledger import (
    WEIGHTS, Ledger, MonitorConfig, Observed, RateLimiter, ScoreChanged, has_majority, next_score, opinion,
    proposal_for)
from bubble_ref.mesh import RelayReceived, RelaySent, add_mesh_roles
from bubble_ref.node import Node
from bubble_ref.packets import format_timestamp
from bubble_ref.store import ManualClock

from inproc import ask

PEER, OTHER = "ab" * 32, "cd" * 32


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def node(tmp_path, clock):
    node = Node.open(tmp_path / "n", clock=clock, rng=random.Random(0))
    add_mesh_roles(node)
    node.add(Ledger(node))
    yield node
    node.close()


def ledger(node) -> Ledger:
    return node.roles["ledger"]


# ------------------------------------------------------------------ the rules

def test_scores_are_weighted_moving_averages(node):
    book = ledger(node)
    assert book.score(PEER) == 1.0
    book.record(PEER, "audit", "p1", "audit_failed")
    target, weight = WEIGHTS["audit_failed"]
    assert book.score(PEER) == pytest.approx((1 - weight) * 1.0 + weight * target) == next_score(1.0, "audit_failed")
    book.record(PEER, "out", "p2", "delivered")
    assert book.score(PEER) == pytest.approx(next_score(next_score(1.0, "audit_failed"), "delivered"))
    book.record(PEER, "audit", "p3", "audit_void")
    assert book.score(PEER) == pytest.approx(next_score(next_score(1.0, "audit_failed"), "delivered"))
    assert [t.outcome for t in book.transactions(PEER)] == ["audit_void", "delivered", "audit_failed"]
    assert book.score(OTHER) == 1.0 and book.transactions(OTHER) == []


def test_no_evidence_of_absence_moves_a_score():
    "Being down, declining, an audit without a verdict: weight 0. Only failures and good service move a score."
    for outcome in ("unreachable", "declined", "audit_void", "audit_unreachable"):
        assert WEIGHTS[outcome][1] == 0.0 and next_score(0.7, outcome) == 0.7
    for outcome in ("refused", "audit_failed"):
        assert WEIGHTS[outcome][0] == 0.0 and next_score(1.0, outcome) < 1.0
    for outcome in ("accepted", "audit_passed"):
        assert WEIGHTS[outcome][0] == 1.0 and next_score(0.4, outcome) > 0.4


def test_two_signed_refusals_or_two_failed_audits_take_a_perfect_score_under_the_line():
    line = MonitorConfig().blacklist_below
    for outcome in ("refused", "audit_failed"):
        once = next_score(1.0, outcome)
        assert once >= line > next_score(once, outcome), f"one {outcome} is not enough, two are"


def test_votes_come_from_own_evidence_with_a_gap_between_the_thresholds():
    config = MonitorConfig()
    assert opinion(0.36, True, config) == "blacklist"
    assert opinion(0.6, True, config) == "abstain"  # between 0.5 and 0.7: no flapping
    assert opinion(1.0, True, config) == "whitelist" and opinion(1.0, False, config) == "abstain"
    assert proposal_for(0.4, False, config) == "blacklisted" and proposal_for(0.4, True, config) is None
    assert proposal_for(0.8, True, config) == "whitelisted" and proposal_for(0.8, False, config) is None


def test_majority_is_of_every_known_active_server_not_of_the_votes_cast():
    electorate = {"a", "b", "c", "d", "x"}
    assert has_majority({"a": "blacklist", "b": "blacklist", "c": "blacklist"}, electorate, "x", "blacklisted")
    assert not has_majority({"a": "blacklist", "b": "blacklist"}, electorate, "x", "blacklisted")  # 2 of 4
    assert not has_majority({"a": "blacklist", "b": "blacklist", "x": "blacklist", "z": "blacklist"}, electorate, "x",
                            "blacklisted")  # the accused and strangers do not count
    assert has_majority({"a": "whitelist", "b": "whitelist", "c": "whitelist"}, electorate, "x", "whitelisted")
    assert not has_majority({"a": "whitelist", "b": "whitelist", "c": "whitelist"}, electorate, "x", "blacklisted")


def test_the_rate_limiter_counts_per_key_in_a_sliding_minute(clock):
    limiter = RateLimiter(clock, per_minute=3)
    assert [limiter.allow("k") for _ in range(4)] == [True, True, True, False]
    assert limiter.peek("other") and limiter.allow("other")
    assert not limiter.peek("k"), "peek says no without counting"
    clock.advance(timedelta(seconds=59))
    assert not limiter.allow("k")
    clock.advance(timedelta(seconds=1))
    assert limiter.allow("k") and limiter.allow("k") and limiter.allow("k") and not limiter.allow("k")


def test_the_rate_limiter_forgets_idle_keys(clock):
    "Its own promise: 'a stream of new keys must not grow memory forever'. Keys idle for a minute are forgotten."
    limiter = RateLimiter(clock, per_minute=1)
    for minute in range(5):
        for i in range(100):
            assert limiter.allow(f"key {minute}.{i}")  # each reporter key reports once, and is never seen again
        clock.advance(timedelta(minutes=1))
    limiter.allow("one more")
    for i in range(100):
        limiter.peek(f"key 0.{i}")  # looking at an idle key does not bring it back either
    tracked = len(vars(limiter)["_seen"])
    assert tracked <= 101, f"{tracked} keys tracked, but only 1 was active in the last minute"


# ------------------------------------------------------------------ the role

def test_the_ledger_records_what_the_mesh_and_the_auditor_tell_it(node):
    changes = []
    node.on(ScoreChanged, lambda e: changes.append((e.peer, round(e.score, 3))) or [])
    node.emit(RelayReceived(PEER, "1" * 64, "accepted"))
    node.emit(RelaySent(OTHER, "1" * 64, "unreachable"))
    node.emit(RelayReceived(OTHER, "2" * 64, "refused"))
    node.emit(Observed(OTHER, "audit", "3" * 64, "audit_failed"))
    book = ledger(node)
    assert [(t.direction, t.peer, t.outcome) for t in reversed(book.transactions())] == [
        ("in", PEER, "accepted"), ("out", OTHER, "unreachable"), ("in", OTHER, "refused"), ("audit", OTHER, "audit_failed")]
    # "unreachable" has no weight (a down server is not a bad one): logged, but the score does not move
    assert changes == [(PEER, 1.0), (OTHER, round(next_score(1.0, "refused"), 3)),
                       (OTHER, round(next_score(next_score(1.0, "refused"), "audit_failed"), 3))]
    assert book.score(OTHER) < MonitorConfig().blacklist_below


def test_get_reputation_shows_scores_and_the_newest_transactions_to_the_operator_only(node, clock):
    node.emit(Observed(PEER, "audit", "3" * 64, "audit_failed"))
    for i in range(60):
        node.emit(RelayReceived(OTHER, f"{i:064x}", "accepted"))
    public = ask(node, "GET /reputation")
    assert public.status == 200 and "scores" not in public.body and "transactions" not in public.body
    reply = ask(node, "GET /reputation", token=node.operator_token)
    assert reply.status == 200
    assert reply.body["scores"] == {PEER: round(next_score(1.0, "audit_failed"), 3), OTHER: 1.0}
    assert len(reply.body["transactions"]) == 50 and reply.body["transactions"][0]["packet_id"] == f"{59:064x}"
    assert reply.body["transactions"][0] == {"at": format_timestamp(clock()), "peer": OTHER, "direction": "in",
                                             "packet_id": f"{59:064x}", "outcome": "accepted"}
    assert "lowest_reputation" not in ask(node, "GET /status").body  # what it thinks of others: for its operator
    assert (ask(node, "GET /status", token=node.operator_token).body["lowest_reputation"]
            == round(next_score(1.0, "audit_failed"), 3))


def test_transactions_are_pruned_with_the_retention_but_scores_stay(node, clock):
    node.emit(Observed(PEER, "audit", "p", "audit_failed"))
    clock.advance(node.config.retention + timedelta(seconds=1))
    node.emit(RelayReceived(OTHER, "q" * 64, "accepted"))
    node.on_timer(("mailbox", "sweep"))
    assert [t.peer for t in ledger(node).transactions()] == [OTHER]
    assert ledger(node).score(PEER) < 1.0


def test_a_failed_write_leaves_neither_the_log_nor_the_score_half_done(node):
    book = ledger(node)
    book.record(PEER, "in", "p", "accepted")
    with pytest.raises(KeyError):
        book.record(PEER, "in", "q", "no such outcome")
    assert len(book.transactions(PEER)) == 1 and book.score(PEER) == 1.0
    node.db.execute("SELECT 1")  # the connection is usable: no transaction left open
    assert not node.db.in_transaction
