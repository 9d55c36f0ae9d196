#!/usr/bin/env python3
"""Execute notebooks top to bottom and save them exactly as JupyterLab would.

Usage:  python tools/run_notebooks.py notebooks/03_envelope.ipynb [more.ipynb ...]
        python tools/run_notebooks.py --normalize-only notebooks/*.ipynb

Why: notebooks are committed executed (nbval compares their outputs), and in the form
JupyterLab writes, so that merely opening and saving one in JupyterLab leaves `git status`
clean. JupyterLab (4.x) saves through the Jupyter server, which writes nbformat v4 JSON
(indent 1, keys sorted, non-ASCII kept) with the kernelspec display name of ipykernel,
"Python 3 (ipykernel)", and it does not keep per-cell `execution` timing metadata.
nbclient runs the cells in a real kernel, like JupyterLab's "Run All", in the notebook's
own folder, with timing records off.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
DROPPED_CELL_METADATA = ("execution", "lines_to_next_cell")


def normalize(nb) -> None:
    "Give the notebook the metadata JupyterLab writes."
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.pop("jupytext", None)  # left by a conversion from a script; JupyterLab writes no such key
    for cell in nb.cells:
        for key in DROPPED_CELL_METADATA:
            cell.metadata.pop(key, None)


def execute(nb, folder: Path, timeout: int) -> None:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(folder)}}).execute()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--normalize-only", action="store_true", help="do not execute, only fix the metadata")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (default: 120)")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        if not args.normalize_only:
            execute(nb, path.parent.resolve(), args.timeout)
        normalize(nb)
        nbformat.write(nb, path)  # what the Jupyter server's save does: indent 1, sorted keys, newline at the end
        print(f"{'normalized' if args.normalize_only else 'executed'}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
