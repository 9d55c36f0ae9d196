"""The swarm (notebook 09d): random scenarios on real nodes in the simulator, checked against the invariants.

A seed replays exactly, in this process and in another one (whatever Python's string hashing); a fixed handful of
seeds that together hold a dropper, colluders, a crash and a partition break no invariant; an honest node that is
down for a while is not blacklisted while a silent dropper is (and the old weight of 'unreachable' would have
blacklisted it: the check can fail); a colluding majority does get its victim blacklisted (the checker sees it);
a Sybil's invented servers never vote, and a report flooder is refused and leaves bounded state (notebook 10's S3 and
S6 inside whole meshes) — and with every listed server counted as a voter, the Sybil wins (the check can fail).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from bubble_ref import ledger
from bubble_ref.ballot import Ballot
from bubble_ref.swarm import (
    Scenario, SwarmReport, format_swarm, make_scenario, outage_scenario, relay_reach, run_scenario)

SHORT = dict(faults_end=40, settle=90, max_nodes=6)  # a cheap scenario: 5 or 6 nodes, 90 simulated seconds
REPLAY_SEED, OTHER_SEED = 10, 12
CI_SEEDS = (28, 27, 8)  # with max_nodes=6: a dropper, colluders, a selective dropper; crashes, partitions, slow, loss
CI = dict(max_nodes=6)


def short_digest(seed: int) -> tuple[str, int]:
    run = run_scenario(make_scenario(seed, **SHORT))
    return run.digest, run.events


# ------------------------------------------------------------------ determinism

def test_a_seed_replays_exactly_and_another_seed_does_not():
    scenario = make_scenario(REPLAY_SEED, **SHORT)
    assert scenario == make_scenario(REPLAY_SEED, **SHORT), "the scenario is drawn from the seed alone"
    assert scenario.crashes and scenario.droppers and scenario.loss, "the replayed run has faults worth replaying"
    first, again = run_scenario(scenario), run_scenario(scenario)
    # packet ids differ (ciphertexts are random; the digest masks ids), everything else is the same
    assert (first.digest, first.events, first.decisions, sorted(first.acknowledged.values())) == \
        (again.digest, again.events, again.decisions, sorted(again.acknowledged.values()))
    assert first.events > 1000 and not first.bugs
    assert short_digest(OTHER_SEED)[0] != first.digest


def test_a_seed_replays_in_other_processes_whatever_the_hash_seed(tmp_path):
    "Python randomizes string hashing per process: nothing in a run may depend on set or dict-of-str order."
    script = textwrap.dedent(f"""
        from bubble_ref.swarm import make_scenario, run_scenario
        run = run_scenario(make_scenario({REPLAY_SEED}, **{SHORT!r}))
        print(run.digest, run.events)
    """)
    procs = []
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        digest, events = out.split()
        outputs.append((digest, int(events)))
    assert outputs[0] == outputs[1] == short_digest(REPLAY_SEED)


def test_a_short_scenario_ends_its_faults_by_faults_end():
    "`faults_end` is when the faults end (outage_scenario uses it so): crashes and partitions must be over by then."
    late = []
    for seed in range(30):
        s = make_scenario(seed, **SHORT)
        late += [f"seed {seed}: {name} down until t={up:.0f}" for name, _, up in s.crashes if up > s.faults_end]
        late += [f"seed {seed}: partition until t={end:.0f}" for _, _, _, end in s.partitions if end > s.faults_end]
    assert late == [], f"faults past faults_end={SHORT['faults_end']}: {late}"


def test_a_node_still_down_when_the_run_ends_does_not_break_the_invariant_check():
    """Seed 11 (short), with its crash moved by hand (make_scenario now ends every fault by faults_end): n5 crashes
    at t=78 and would come back at t=115, after the run ends at t=90. A node that is down is not asked (as
    check_invariants already does for the judges of a dropper); the check must not fail."""
    generated = make_scenario(11, **SHORT)
    assert [n for n, _, _ in generated.crashes] == ["n5"] and generated.behaviour["n5"] == "honest"
    scenario = dataclasses.replace(generated, crashes=(("n5", 78.0, 115.0),))
    assert [(n, up > scenario.settle) for n, _, up in scenario.crashes] == [("n5", True)]
    run = run_scenario(scenario)
    assert run.bugs == [] and not any("n5" in v for v in run.violations), run.violations


# ------------------------------------------------------------------ the swarm in CI

@pytest.fixture(scope="module")
def ci_runs():
    return [run_scenario(make_scenario(seed, **CI)) for seed in CI_SEEDS]


def test_the_ci_seeds_hold_the_faults_they_are_chosen_for():
    scenarios = [make_scenario(seed, **CI) for seed in CI_SEEDS]
    kinds = {b for s in scenarios for b in s.behaviour.values()}
    assert {"drop", "collude", "selective"} <= kinds, "re-choose CI_SEEDS if make_scenario changed"
    assert any(s.crashes for s in scenarios) and any(s.partitions for s in scenarios)
    assert any(s.loss for s in scenarios) and any(s.slow for s in scenarios)


def test_the_ci_seeds_break_no_invariant(ci_runs):
    for run in ci_runs:
        assert run.violations == [], f"seed {run.scenario.seed}: {run.violations}"
        assert run.bugs == [] and run.acknowledged, run.scenario.seed
    report = SwarmReport(ci_runs)
    assert report.violations == []
    assert len(report.catch_times("drop")) == 1 and len(report.catch_times("selective")) == 1, \
        "each dropper was blacklisted by every honest node"
    text = format_swarm(report)
    assert "violations: 0" in text and f"{len(CI_SEEDS)} seeds" in text


# ------------------------------------------------------------------ an honest node's outage, simulated

def test_an_honest_node_down_for_a_while_is_not_blacklisted_but_the_dropper_is():
    run = run_scenario(outage_scenario())
    assert run.violations == [] and run.bugs == []
    assert run.first_blacklisting("n4") is None, "n4 was only down"
    for judge in ("n0", "n1", "n2", "n4"):
        assert run.first_blacklisting("n3", by=judge) is not None, f"{judge} did not blacklist the dropper n3"
    down, up = run.scenario.crashes[0][1:]
    assert any(down <= at < up for _, _, at in run.acknowledged.values()), "messages flowed while n4 was down"


def test_the_outage_check_can_fail_with_the_old_weight_of_unreachable(monkeypatch):
    "With 'unreachable' counted as evidence (the old rule), n4 is wrongly blacklisted: the test above can fail."
    monkeypatch.setitem(ledger.WEIGHTS, "unreachable", (0.0, 0.05))
    run = run_scenario(outage_scenario())
    assert run.first_blacklisting("n4") is not None
    assert any("wrongly blacklisted" in v and "n4" in v for v in run.violations), run.violations


def test_a_colluding_majority_gets_its_victim_blacklisted_and_the_checker_says_so():
    "The quorum rule protects against a colluding minority, not a majority: the invariant check must catch it."
    names = tuple(f"n{i}" for i in range(5))
    links = tuple(tuple(j for j in range(5) if j != i) for i in range(5))
    behaviour = {"n0": "honest", "n1": "honest", "n2": "collude", "n3": "collude", "n4": "collude"}
    traffic = tuple((10.0 + 5 * k, names[k % 2], k % 8) for k in range(6))
    scenario = Scenario(3, names, links, behaviour, "n0", 0.0, (), (), (), traffic, 60.0, 120.0)
    run = run_scenario(scenario)
    assert run.first_blacklisting("n0", by="n1") is not None
    assert any("wrongly blacklisted" in v and "attackers' victim" in v for v in run.violations)


def test_delivery_is_not_owed_across_a_link_one_end_blacklisted():
    "n0 — n1 — n2 — n3: a packet at n3 reaches all four, unless n2 blacklisted n1 (or n1 blacklisted n2)."
    line = Scenario(0, ("n0", "n1", "n2", "n3"), ((1,), (0, 2), (1, 3), (2,)),
                    {"n0": "honest", "n1": "honest", "n2": "collude", "n3": "honest"}, "n1", 0.0, (), (), (), (),
                    0.0, 0.0)
    assert relay_reach(line, "n3") == {"n0", "n1", "n2", "n3"}
    cut = frozenset({frozenset(("n2", "n1"))})
    assert relay_reach(line, "n3", cut) == {"n2", "n3"} and relay_reach(line, "n0", cut) == {"n0", "n1"}


def test_seed_152_the_colluders_victim_never_applies_a_decision_about_itself():
    """The second 200-seed swarm on protocol 1.2 found the victim n2 blacklisting *itself* at t=5.6: its electorate
    was the two colluders, whose decision carried a majority of it. A node never applies (or passes on) a decision
    about itself, and no honest node blacklists n2."""
    scenario = make_scenario(152)
    assert scenario.victim == "n2" and sorted(n for n, b in scenario.behaviour.items() if b == "collude") == ["n0", "n1"]
    run = run_scenario(scenario)
    assert run.bugs == [] and run.violations == [], run.violations
    assert all(run.first_blacklisting("n2", by=judge) is None for judge in scenario.honest)  # n2 itself included
    assert run.first_blacklisting("n2", by="n0") is not None, "the colluders did blacklist n2, by their own lie"


def test_seed_43_an_honest_node_that_blacklists_its_only_link_passes_the_decision_across_it():
    """The dual of seed 73, found by the swarm after audits were thinned out: n4 (honest) is linked only to n3, a
    selective dropper. n4 blacklists n3 first, on a quorum of the others' votes, and from then on relays nothing to
    n3, as §18 wants. With decisions passed to peers only, nobody else heard of it (n4's only peer was the accused),
    so the others kept asking n3 for n4's audit packets, found them missing, and blacklisted honest n4 at t=185.
    A decision also goes to `DECISION_FANOUT` random servers: the others apply it at once, and n3 is no witness."""
    scenario = make_scenario(43)
    assert scenario.links[4] == (3,) and scenario.behaviour["n3"] == "selective"
    assert all(b == "honest" for n, b in scenario.behaviour.items() if n != "n3")
    run = run_scenario(scenario)
    assert run.bugs == [] and run.violations == [], run.violations
    first = run.first_blacklisting("n3", by="n4")
    assert first is not None, "n4 blacklisted the dropper"
    for judge in ("n0", "n1", "n2"):
        assert run.first_blacklisting("n3", by=judge) - first < 1.0, f"{judge} heard of n4's decision at once"
    assert all(run.first_blacklisting("n4", by=judge) is None for judge in scenario.names)


def test_seed_48_a_node_never_applies_a_decision_about_a_server_it_does_not_know():
    """Found once decisions also jumped to random servers: four colluders of nine leave their victim n2 out of their
    lists, so the leaves n3 and n6 (linked to n8 alone) never hear of n2 or its leaf n7, and the colluders' four votes
    were a majority of the seven servers each knew: their decision about n2 carried there. A node now applies no
    decision about a server outside its directory (a real attacker could post it to them directly anyway)."""
    scenario = make_scenario(48)
    assert scenario.victim == "n2" and sorted(n for n, b in scenario.behaviour.items() if b == "collude") == \
        ["n0", "n1", "n4", "n5"]
    assert scenario.links[3] == scenario.links[6] == (8,)
    run = run_scenario(scenario)
    assert run.bugs == [] and run.violations == [], run.violations[:3]
    assert all(run.first_blacklisting("n2", by=judge) is None for judge in scenario.honest)
    assert run.first_blacklisting("n2", by="n0") is not None, "the colluders did blacklist n2, by their own lie"


def test_seed_73_a_colluder_that_blacklists_its_only_link_is_cut_off_and_caught():
    """The 200-seed swarm's only violation: n4 (a colluder) is linked to its victim n1 alone and has verified nobody
    when it first calls a vote, so its own vote is a majority of its electorate; it blacklists n1 at t=5 and so
    refuses n1's relays and sends it nothing. A packet posted at n4 cannot leave n4 — by §18, not a loss. The
    honest nodes' audits of n4 fail, and every one of them blacklists it."""
    scenario = make_scenario(73)
    assert scenario.links[4] == (1,) and scenario.behaviour["n4"] == "collude" and scenario.victim == "n1"
    run = run_scenario(scenario)
    assert run.bugs == [] and run.violations == [], run.violations
    assert run.first_blacklisting("n1", by="n4") == 5.0, "n4 blacklisted its victim on its own vote"
    assert any(origin == "n4" for origin, _, _ in run.acknowledged.values()), "a packet was posted at n4"
    for judge in scenario.honest:
        assert run.first_blacklisting("n4", by=judge) is not None, f"{judge} did not blacklist n4"
    assert all(run.first_blacklisting("n1", by=judge) is None for judge in scenario.honest)


def test_bench_monitoring_refuses_nonsense():
    "The benchmark over these scenarios (`bubble-ref bench monitoring`) refuses settings that mean nothing."
    from bubble_ref.bench import bench_monitoring
    for bad in (dict(seeds=0), dict(loss=1.0), dict(loss=-0.1), dict(nodes=4)):
        with pytest.raises(ValueError):
            bench_monitoring(**bad)


# ------------------------------------------------------------------ notebook 10's attackers inside the swarm

def first_seed_with(kind: str) -> Scenario:
    "The first short scenario with an attacker of `kind` (make_scenario is deterministic: always the same seed)."
    return next(s for s in (make_scenario(seed, **SHORT) for seed in range(200)) if kind in s.behaviour.values())


def test_a_sybil_inside_a_mesh_gets_every_decision_refused():
    run = run_scenario(first_seed_with("sybil"))
    assert run.violations == [] and run.bugs == [], run.violations
    assert len(run.phantoms) == 8 and run.attacks[("sybil", 403)] > 0, run.attacks
    assert run.attacks[("sybil", 200)] == 0, "no node took the Sybil's decision"
    assert run.first_blacklisting(run.scenario.victim) is None


def test_the_sybil_check_can_fail_when_every_listed_server_votes(monkeypatch):
    "The naive electorate (every server in the directory, as lists name them): the Sybil's decision carries."
    monkeypatch.setattr(Ballot, "electorate", lambda self: set(self.peers.directory()) | {self.node.id})
    run = run_scenario(first_seed_with("sybil"))
    assert run.attacks[("sybil", 200)] > 0
    assert any("attackers' victim" in v for v in run.violations), run.violations
    assert any("invented server" in v for v in run.violations), run.violations


def test_a_report_flooder_is_rate_limited_and_leaves_bounded_state():
    run = run_scenario(first_seed_with("flood-reports"))
    assert run.violations == [] and run.bugs == [], run.violations
    assert run.attacks[("flood-reports", 429)] > 0 and run.attacks[("flood-reports", 202)] > 0, run.attacks
    text = format_swarm(SwarmReport([run]))
    assert "flooded reports answered" in text and "violations: 0" in text


def test_a_large_mesh_that_has_been_running_catches_a_reported_dropper_and_keeps_every_invariant():
    """`bubble-ref sim swarm --nodes N` at a size CI can afford (the closing note of issue 13 has N = 1000): every
    node knows every server from the start, audits on the node's own schedule, and blacklists the dropper a client
    reported; nobody honest is blacklisted, every post reaches every honest node."""
    from bubble_ref.swarm import format_large, large_scenario, run_large

    scenario = large_scenario(30, droppers=1, settle=200)
    assert scenario.droppers == ["n29"] and len(scenario.traffic) == 16
    run = run_large(scenario)
    assert run.violations == [], run.violations
    caught = [run.first_blacklisting("n29", by=h) for h in scenario.honest]
    assert all(t is not None and 20 < t < 200 for t in caught), caught
    assert not [d for d in run.decisions if d[2] != "n29"], "only the dropper is ever blacklisted"
    assert "drop dropper n29: blacklisted by 29 of 29 honest nodes" in format_large(run)
    with pytest.raises(ValueError, match="at least 25 nodes"):
        large_scenario(24)
