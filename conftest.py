"""Project-wide pytest setup, loaded before any test or notebook runs."""


def pytest_configure(config):
    # On a machine where matplotlib has never run, its first import builds a font cache and
    # logs "Matplotlib is building the font cache" to stderr. Inside a notebook that message
    # would be an output nbval does not expect, so build the cache here, once, before any
    # notebook kernel starts.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401  (importing it builds the cache)


def pytest_collection_modifyitems(config, items):
    # Notebook 11b starts coturn. Without its turnserver the notebook is skipped with an install hint, except
    # in CI (CI=true), where .ci/run installs coturn and a missing one must fail.
    import os
    import shutil

    if os.environ.get("CI") == "true" or shutil.which("turnserver") or os.path.exists("/usr/bin/turnserver"):
        return
    import pytest

    skip = pytest.mark.skip(reason="notebook 11b needs coturn's turnserver: apt-get install coturn (Debian/Ubuntu)")
    for item in items:
        if "11b_calls" in str(item.fspath):
            item.add_marker(skip)
