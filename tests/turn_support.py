"""Tests that start coturn find its `turnserver` here: in CI (CI=true) a missing one is a failure, elsewhere a
skip that says how to install it."""
from __future__ import annotations

import os

import pytest

from bubble_ref.calls import find_turnserver

INSTALL_HINT = "install coturn's turnserver: apt-get install coturn (Debian/Ubuntu); .ci/run does it in CI"


def require_turnserver() -> str:
    "The path of turnserver; fails the test in CI and skips it elsewhere when coturn is not installed."
    path = find_turnserver()
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"turnserver (coturn) is missing in CI: {INSTALL_HINT}")
    pytest.skip(f"needs turnserver: {INSTALL_HINT}")
