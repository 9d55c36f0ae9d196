"""Opening a notebook in JupyterLab must not modify it.

The notebooks are committed in the exact form JupyterLab writes (tools/run_notebooks.py saves them that way).
If they drift from it, a learner who merely opens one sees it marked modified and gets a `git diff` they never
made. Here every notebook is copied, opened in a real JupyterLab (each with its own kernel, as a user's would
be: the kernel's spec and language info go into the metadata), saved, closed, and compared byte for byte.
"""
from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CONTROL = "control_old_kernelspec.ipynb"


@pytest.fixture(scope="module")
def round_trip(lab, lab_server):
    """Open, save and close every notebook at once; {name: (bytes before, bytes after, dirty on open)}.

    Besides the real notebooks, a control copy of one with an outdated kernelspec display name (what the
    notebooks had before they were saved in JupyterLab's form) must come back changed: proof that the
    round trip really goes through JupyterLab's save."""
    folder = lab_server.root / "round-trip"
    folder.mkdir()
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names, f"no notebooks in {NOTEBOOKS}"
    for name in names:
        shutil.copyfile(NOTEBOOKS / name, folder / name)
    control = json.loads((NOTEBOOKS / names[0]).read_text(encoding="utf-8"))
    control["metadata"]["kernelspec"]["display_name"] = "Python 3"
    (folder / CONTROL).write_text(json.dumps(control, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                                  encoding="utf-8")
    before = {name: (folder / name).read_bytes() for name in [*names, CONTROL]}
    paths = [f"{folder.name}/{name}" for name in before]
    opened = lab.open_notebooks(paths)
    lab.save(paths)
    lab.close(paths)
    yield {name: (before[name], (folder / name).read_bytes(), opened[f"{folder.name}/{name}"]["dirty"])
           for name in before}
    shutil.rmtree(folder)


def diff_excerpt(before: bytes, after: bytes, name: str, lines: int = 30) -> str:
    diff = difflib.unified_diff(before.decode(errors="replace").splitlines(), after.decode(errors="replace").splitlines(),
                                f"committed/{name}", f"saved by JupyterLab/{name}", lineterm="", n=1)
    return "\n".join(list(diff)[:lines])


def test_opening_and_saving_a_notebook_in_jupyterlab_leaves_it_unchanged(round_trip):
    changed = {name: (before, after, dirty) for name, (before, after, dirty) in round_trip.items()
               if name != CONTROL and (before != after or dirty)}
    report = "\n\n".join(f"{name}: {'marked modified on open; ' if dirty else ''}"
                         f"{'bytes changed by the save:' if before != after else 'bytes unchanged'}\n"
                         f"{diff_excerpt(before, after, name)}" for name, (before, after, dirty) in changed.items())
    assert not changed, (f"{len(changed)} notebook(s) change when merely opened and saved in JupyterLab; "
                         f"re-save them with `python tools/run_notebooks.py --normalize-only notebooks/*.ipynb` "
                         f"(or re-run them with tools/run_notebooks.py):\n{report}")
    assert len(round_trip) - 1 == len(list(NOTEBOOKS.glob("*.ipynb")))


def test_the_round_trip_would_notice_a_change(round_trip):
    before, after, dirty = round_trip[CONTROL]
    assert dirty and before != after, "JupyterLab should have rewritten the outdated kernelspec display name"
    assert json.loads(after)["metadata"]["kernelspec"]["display_name"] == "Python 3 (ipykernel)"
