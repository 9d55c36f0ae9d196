"""The workshop's challenges (notebook 12b): every checker passes its reference solution and fails its naive one,
with the figures printed (run pytest with -s to see them); the teacher's rule agrees; the command line works."""
from __future__ import annotations

import random
import subprocess
import textwrap

import pytest

from bubble_ref import challenges
from bubble_ref.challenges import CHALLENGES, CoverPlan, CoverSchedule, check, load_solution
from bubble_ref.cli import WORKSHOP_CHALLENGES

from nodes import BUBBLE_REF

EXPECTED = {  # challenge -> (a figure, what the reference reaches, what the naive solution gets instead)
    "broadcast": ("complete", lambda v, f: v == f["broadcasts"], lambda v, f: v < f["broadcasts"]),
    "dropper": ("false_blames", lambda v, f: v == 0, lambda v, f: v > 0),
    "timing": ("accuracy", lambda v, f: v >= 0.8, lambda v, f: v <= 0.4),
    "cover": ("accuracy", lambda v, f: v <= 0.4, lambda v, f: v >= 0.8),
}


@pytest.mark.parametrize("name", sorted(CHALLENGES))
def test_each_checker_passes_the_reference_and_fails_the_naive_solution(name):
    challenge = CHALLENGES[name]
    good, naive = check(name, challenge.reference()), check(name, challenge.naive())
    print(f"\n{good.report()}\n{naive.report()}")
    figure, reference_value, naive_value = EXPECTED[name]
    assert good.passed, good.report()
    assert not naive.passed, naive.report()
    assert reference_value(good.figures[figure], good.figures), good.figures
    assert naive_value(naive.figures[figure], naive.figures), naive.figures
    assert challenge.passes(good.figures) and not challenge.passes(naive.figures)  # the teacher's rule agrees
    failed = [text for ok, text in naive.criteria if not ok]
    assert failed and all(any(ch.isdigit() for ch in text) for text in failed), "every failed criterion names its figures"
    assert "✗" in naive.report() and naive.report().endswith("NOT YET") and good.report().endswith("PASSED")


def test_the_cover_checker_also_runs_the_students_own_attack():
    always_right = lambda posts, fetches: dict(challenges.timing_traffic(0).truth)  # knows room 0's answer
    plain = check("cover", CoverPlan(20, "periodic"))
    with_attack = check("cover", CoverPlan(20, "periodic"), attacks=(always_right,))
    assert with_attack.figures["accuracy"] > plain.figures["accuracy"]


def test_a_poisson_timetable_leaks_at_the_rate_a_periodic_one_hides():
    leaky = check("cover", CoverPlan(20, "poisson"))
    assert not leaky.passed and leaky.figures["auc"] > 0.7, leaky.report()


def test_the_cover_timetable_is_cover_traffics_own():
    "CoverSchedule is CoverTraffic's schedule without the client: the same slots from the same random numbers."
    from bubble_ref.anonymity import CoverTraffic

    real = CoverTraffic.__new__(CoverTraffic)  # only the timetable's fields, as CoverTraffic.__init__ sets them
    rng = random.Random(7)
    real.schedule, real.rng, real.periods = "periodic", rng, {"post": 3.0, "get": None}
    real.next_at = {"post": real._gap("post") * rng.random()}
    ours = CoverSchedule(20, "periodic", random.Random(7))
    assert [real.next_slot() for _ in range(50)] == [ours.next_slot() for _ in range(50)]


def test_the_clis_challenge_list_is_the_modules():
    assert set(WORKSHOP_CHALLENGES) == set(CHALLENGES)


def test_workshop_check_on_the_command_line(tmp_path):
    def run(*args):
        return subprocess.run([str(BUBBLE_REF), "workshop", "check", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    passed = run("timing")
    assert passed.returncode == 0 and "PASSED" in passed.stdout and "100%" in passed.stdout, passed.stdout
    naive = run("timing", "--naive")
    assert naive.returncode == 1 and "NOT YET" in naive.stdout and "✗" in naive.stdout
    mine = tmp_path / "mine.py"
    mine.write_text(textwrap.dedent("""
        from bubble_ref.challenges import CoverPlan

        def plan():
            return CoverPlan(30, "periodic")

        def link(posts, fetches):  # my own attack: guess by order
            return dict(zip(sorted(fetches), sorted(posts)))
    """))
    ok = run("cover", "--solution", mine)
    assert ok.returncode == 0 and "PASSED" in ok.stdout, ok.stdout + ok.stderr
    missing = run("broadcast", "--solution", mine)
    assert missing.returncode == 2 and "defines no `make_strategy`" in missing.stderr
    assert run("broadcast", "--solution", tmp_path / "nope.py").returncode == 2
    unjoined = run("timing", "--post", "--data-dir", tmp_path / "not-joined")
    assert unjoined.returncode == 2 and "bubble-ref join" in unjoined.stderr


def test_load_solution_says_what_is_missing(tmp_path):
    (tmp_path / "s.py").write_text("def judge(rounds):\n    return set()\n")
    assert load_solution(tmp_path / "s.py", "judge")([]) == set()
    with pytest.raises(AttributeError, match="defines no `link`"):
        load_solution(tmp_path / "s.py", "link")
    with pytest.raises(FileNotFoundError):
        load_solution(tmp_path / "none.py", "link")
