"""The browser harness itself: a missing tool is a skip that says how to install it, and a failure in CI."""
import sys

import pytest

from . import labharness


@pytest.mark.parametrize("missing, hint", [("chromium", "apt-get install chromium"),
                                           ("playwright", "pip install playwright")])
def test_a_missing_tool_skips_with_how_to_install_it_and_fails_in_ci(monkeypatch, tmp_path, missing, hint):
    if missing == "chromium":
        monkeypatch.setattr(labharness, "CHROMIUM", tmp_path / "no-such-chromium")
    else:
        monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # makes the import fail
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=hint):
        labharness.require_browser_tools()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{hint}.*CI=true"):
        labharness.require_browser_tools()
