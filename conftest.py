"""Project-wide pytest setup, loaded before any test or notebook runs."""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

_PRIVATE_TMP: Path | None = None


def pytest_configure(config):
    # On a machine where matplotlib has never run, its first import builds a font cache and
    # logs "Matplotlib is building the font cache" to stderr. Inside a notebook that message
    # would be an output nbval does not expect, so build the cache here, once, before any
    # notebook kernel starts.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401  (importing it builds the cache)

    # Every test, notebook kernel and command the tests start makes its temporary files in one
    # private folder (TMPDIR is inherited by subprocesses and kernels). At the end the folder
    # must hold nothing but pytest's own tmp_path tree: whatever else is left was leaked.
    global _PRIVATE_TMP
    if _PRIVATE_TMP is None and not hasattr(config, "workerinput"):
        _PRIVATE_TMP = Path(tempfile.mkdtemp(prefix="bubble-ref-pytest-"))
        os.environ["TMPDIR"] = str(_PRIVATE_TMP)
        tempfile.tempdir = None  # forget the cached default, so gettempdir() reads TMPDIR again


def leftovers(folder: Path) -> list[str]:
    "What tests, notebooks and commands left in the private temporary folder (pytest's own tree excepted)."
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("pytest-of-"))


def pytest_collection_modifyitems(config, items):
    # Notebook 11b starts coturn. Without its turnserver the notebook is skipped with an install hint, except
    # in CI (CI=true), where .ci/run installs coturn and a missing one must fail.
    if os.environ.get("CI") == "true" or shutil.which("turnserver") or os.path.exists("/usr/bin/turnserver"):
        return
    skip = pytest.mark.skip(reason="notebook 11b needs coturn's turnserver: apt-get install coturn (Debian/Ubuntu)")
    for item in items:
        if "11b_calls" in str(item.fspath):
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if _PRIVATE_TMP is None or not _PRIVATE_TMP.exists():
        return
    # A notebook whose demo is still live at its end (08b's chat) is cleaned up when its kernel shuts down; a
    # kernel killed after the shutdown timeout (a loaded machine) leaves that to its scratch folder's watcher
    # process (bubble_ref.ui.scratch_folder), which removes the folder just after. Wait for it, not on luck.
    deadline = time.monotonic() + 30
    while (left := leftovers(_PRIVATE_TMP)) and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(_PRIVATE_TMP, ignore_errors=True)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("temporary files were leaked (every notebook, test and command must clean up what it "
                   f"makes): {left[:20]}")
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
