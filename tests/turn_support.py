"""Tests that start coturn find its `turnserver` here: in CI (CI=true) a missing one is a failure, elsewhere a
skip that says how to install it. And the call tests' mesh: `bubble-ref node` processes on ports fixed before
they start (so each can name the others as peers), started with the TURN flags."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bubble_ref.calls import find_turnserver
from nodes import BUBBLE_REF, NodeProcess

INSTALL_HINT = "install coturn's turnserver: apt-get install coturn (Debian/Ubuntu); .ci/run does it in CI"


def require_turnserver() -> str:
    "The path of turnserver; fails the test in CI and skips it elsewhere when coturn is not installed."
    path = find_turnserver()
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"turnserver (coturn) is missing in CI: {INSTALL_HINT}")
    pytest.skip(f"needs turnserver: {INSTALL_HINT}")


class PeeredNodeProcess(NodeProcess):
    """A `bubble-ref node` on a fixed port, joined to `peers`. `--sync-interval 3600` keeps anti-entropy rounds out
    of the way (the call messages travel by flooding) and `--audit-interval 0` keeps audit packets out of the mesh."""

    def __init__(self, data_dir: Path, name: str, port: int, peers: list[str], *extra_args: str):
        super().__init__(data_dir, name, *extra_args)
        self.port, self.peers = port, list(peers)

    @property
    def command(self) -> list[str]:
        peer_args = [a for url in self.peers for a in ("--peer", url)]
        return [str(BUBBLE_REF), "node", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir",
                str(self.data_dir), "--name", self.name, *peer_args, "--retry-max", "1", "--sync-interval", "3600",
                "--audit-interval", "0", *self.extra_args]


def start_all(procs: list[NodeProcess]) -> None:
    "Start the processes in parallel, each waiting for its own announce line (NodeStartError if one fails)."
    with ThreadPoolExecutor(max_workers=len(procs)) as pool:
        list(pool.map(lambda p: p.start(), procs))


