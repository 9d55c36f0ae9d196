"""The README's code must run as written: every ```python block in a fresh interpreter against a real
`bubble-ref node` subprocess, and every `bubble-ref ...` command line must be one the CLI accepts.

The README starts its node with `bubble-ref node` (port 8000); the test starts one on a free port and
puts that port in place of 8000 in the blocks: that is the only change made to them."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bubble_ref import cli
from nodes import NodeProcess

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text("utf-8")) if lang == language]


def test_the_readme_has_python_blocks_and_one_talks_to_a_node():
    python = blocks("python")
    assert len(python) >= 2
    assert sum("http://127.0.0.1:8000" in b for b in python) >= 1


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with NodeProcess(tmp_path_factory.mktemp("readme") / "node", "readme node") as running:
        yield running


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written_in_a_fresh_interpreter(index, node, tmp_path):
    code = blocks("python")[index].replace("http://127.0.0.1:8000", node.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"README python block {index + 1} failed:\n{code}\n--- stderr:\n{result.stderr}"
    assert result.stdout.strip(), "every block shows something"
    if "make_retrieval_proof" in code:
        assert "from Alice: True" in result.stdout, result.stdout  # the retrieval really retrieved the message


def command_lines(language: str = "bash") -> list[list[str]]:
    found = []
    for body in blocks(language):
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("bubble-ref "):
                found.append(shlex.split(line)[1:])
    return found


def test_the_readme_shows_commands():
    assert len(command_lines()) >= 3


@pytest.mark.parametrize("argv", command_lines(), ids=" ".join)
def test_every_command_line_in_the_readme_is_accepted_by_the_cli(argv):
    if "--help" in argv or "--version" in argv:
        with pytest.raises(SystemExit) as done:
            cli.build_parser().parse_args(argv)
        assert done.value.code == 0
    else:
        assert cli.build_parser().parse_args(argv).command == argv[0]


def test_every_option_in_the_readme_synopsis_exists():
    synopsis = command_lines("text")
    assert len(synopsis) >= 8
    parser = cli.build_parser()
    for argv in synopsis:
        words = [w.strip("[]") for w in argv]
        sub = parser
        for word in words:  # walk down the sub-commands named on the line (bench crypto ...)
            choices = next((a.choices for a in sub._actions if a.choices and isinstance(a.choices, dict)), {})
            if word in choices:
                sub = choices[word]
        known = {option for action in sub._actions for option in action.option_strings}
        for word in words:
            if word.startswith("-"):
                assert word in known, f"README synopsis names {word}, which `bubble-ref {' '.join(argv[:2])}` lacks"
