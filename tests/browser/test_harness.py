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


def test_a_failing_cell_is_reported_with_its_number_and_line(lab, lab_folder):
    "A bare `assert` has no message: the report must still say which cell and which line raised."
    import nbformat

    folder, relative = lab_folder
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("A lesson"),
                                         nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("y = 2\nassert x == y")])
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(nb, folder / "failing.ipynb")
    path = f"{relative}/failing.ipynb"
    lab.open_notebooks([path])
    with pytest.raises(AssertionError) as failed:
        lab.run_all(path)
    assert "AssertionError:  (cell 2, ----> 2 assert x == y)" in str(failed.value), str(failed.value)
    lab.close([path])
