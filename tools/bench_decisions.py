#!/usr/bin/env python3
"""CPU of POST /decisions at N = 1000, in process, beside a valid POST /messages (issue 13, goal 4).

Usage:  PYTHONPATH=. python tools/bench_decisions.py [--rounds 7]

One monitored node (`open_monitored_node`) whose electorate is 1000 servers it verified (tests/test_decisions_scale's
`Big`: real RSA-2048 voters). Each kind is timed with `time.thread_time()` around `node.on_request` (parsing, schema,
signatures, SQLite: everything but HTTP), `--rounds` rounds of a few requests each, kinds alternated; printed as the
median and min-max of the per-request CPU milliseconds, and as a multiple of a valid POST /messages.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_decisions_scale import N, Big, body_size, decision, vote, voters  # noqa: E402

from bubble_ref.crypto import Identity  # noqa: E402
from bubble_ref.envelope import seal  # noqa: E402
from bubble_ref.node import Request  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bubble-bench-decisions-") as root:
        big = Big(Path(root) / "big")
        node, ballot = big.node, big.ballot
        alice, bob = Identity.generate(), Identity.generate()
        messages = iter([seal(alice, bob.public.b64, "x" * 1500).to_json().encode() for _ in range(40 * args.rounds + 20)])
        strangers = voters(N + 1024)[N:]

        def post(route: str, body: bytes):
            return node.on_request(Request(route, body))

        def majority(count: int) -> bytes:
            "A genuine decision with `count` votes, newer than the one held, with no vote verified before."
            big.clock.advance(timedelta(seconds=1))
            ballot._verified.clear()
            return json.dumps(decision(big.votes[:count], big.x.id, big.clock())).encode()

        def spoilt(cold: bool) -> bytes:
            "The held decision's votes re-dated (newer) with the last signature spoilt; `cold`: none verified before."
            big.clock.advance(timedelta(seconds=1))
            if cold:
                ballot._verified.clear()
            votes = big.votes[:N // 2 + 1]
            votes = [*votes[:-1], {**votes[-1], "signature": votes[0]["signature"]}]
            return json.dumps(decision(votes, big.x.id, big.clock())).encode()

        held = json.dumps(decision(big.votes[:N // 2 + 1], big.x.id, big.clock())).encode()
        assert post("POST /decisions", held).body["applied"]
        spaces = iter(range(1, 10 ** 6))
        respaced = lambda: held + b" " * next(spaces)  # the same decision, never the same bytes twice
        later = big.clock() + timedelta(minutes=4)  # newer than the held decision for the whole run
        unknown = decision([vote(s, big.x.id, "blacklist", later) for s in strangers[:1001]], big.x.id, later)
        unknown_1mib = json.dumps(unknown).encode()
        unknown_1mib += b" " * (1024 * 1024 - len(unknown_1mib))
        too_many = json.dumps(decision([vote(s, big.x.id, "blacklist", big.clock()) for s in strangers[:1024]],
                                       big.x.id, big.clock())).encode()
        kinds = {  # name: (route, body maker, expected status, requests per round)
            "valid POST /messages": ("POST /messages", lambda: next(messages), 202, 40),
            "decision, 501 votes": ("POST /decisions", lambda: majority(N // 2 + 1), 200, 3),
            "decision, 1000 votes": ("POST /decisions", lambda: majority(N - 1), 200, 3),
            "replay, same bytes": ("POST /decisions", lambda: held, 200, 5),
            "replay, other bytes": ("POST /decisions", respaced, 200, 5),
            "1001 unknown voters, 1 MiB": ("POST /decisions", lambda: unknown_1mib, 403, 5),
            "1024 votes (too many)": ("POST /decisions", lambda: too_many, 400, 5),
            "spoilt re-dated, cold": ("POST /decisions", lambda: spoilt(True), 403, 3),
            "spoilt re-dated, warm": ("POST /decisions", lambda: spoilt(False), 403, 5),
        }
        sizes = {"decision, 501 votes": body_size(decision(big.votes[:N // 2 + 1], big.x.id, big.clock())),
                 "decision, 1000 votes": body_size(decision(big.votes[:N - 1], big.x.id, big.clock())),
                 "1001 unknown voters, 1 MiB": len(unknown_1mib), "1024 votes (too many)": len(too_many)}
        for _ in range(20):
            post("POST /messages", next(messages))  # warm up
        cpu = {kind: [] for kind in kinds}
        names = list(kinds)
        for r in range(args.rounds):
            for kind in names[r % len(names):] + names[:r % len(names)]:
                route, make, status, count = kinds[kind]
                spent = 0.0
                for _ in range(count):
                    body = make()
                    start = time.thread_time()
                    reply = post(route, body)
                    spent += time.thread_time() - start
                    assert reply.status == status, (kind, reply.status, reply.body)
                cpu[kind].append(spent * 1000 / count)
        node.close()
    valid = statistics.median(cpu["valid POST /messages"])
    one_vote = len(json.dumps(big.votes[0], separators=(",", ":")))
    print(f"N = {N}: one signed vote is {one_vote} bytes compact JSON (+ its `votes` entry); "
          + "; ".join(f"{k}: {v} bytes" for k, v in sizes.items()))
    print(f"{'kind':28}{'CPU ms/request: median (min-max)':>36}{'x valid':>9}")
    for kind, values in cpu.items():
        print(f"{kind:28}{statistics.median(values):>16.2f}  ({min(values):.2f}-{max(values):.2f})"
              f"{statistics.median(values) / valid:>15.1f}")


if __name__ == "__main__":
    main()
