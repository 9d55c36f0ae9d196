"""bubble_ref.cli: the `bubble-ref` command."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bubble_ref import __version__, bench, cli

FLOAT = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def last_float(line: str) -> float:
    numbers = FLOAT.findall(line)
    assert numbers, f"no number on line {line!r}"
    return float(numbers[-1])


def test_demo(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "1. A mesh of three relay nodes is running on loopback: A — B — C" in out
    assert len(re.findall(r"   [ABC] at http://127\.0\.0\.1:\d+ ", out)) == 3
    choices = re.findall(r"^   (Alice|Bob) +loads \(requests/s\): A [\d.]+, B [\d.]+, C [\d.]+  →  TX ([ABC]), RX ([ABC])$",
                         out, flags=re.MULTILINE)
    assert [who for who, _, _ in choices] == ["Alice", "Bob"] and all(tx != rx for _, tx, rx in choices)
    alice_tx = choices[0][1]
    assert f"POSTs it to {alice_tx} (her TX server)" in out
    assert f"node {alice_tx}: hop 0, from Alice" in out and len(re.findall(r"   node [ABC]: hop \d", out)) == 3
    assert f"polls {choices[1][2]} (his RX server) and opens 1 message" in out
    assert "from Alice: True" in out and "content: \"Hi Bob, it's Alice. Lunch at noon?\"" in out
    assert "refused: SpoofedSender" in out and "accepted (this must never happen)" not in out
    assert out.rstrip().endswith("7. The nodes are stopped.")


def test_run_demo_writes_to_the_given_stream(capsys):
    import io
    stream = io.StringIO()
    assert cli.run_demo(stream) == 0
    assert "refused: SpoofedSender" in stream.getvalue()
    assert capsys.readouterr().out == ""


def test_bench_crypto(capsys):
    assert cli.main(["bench", "crypto", "--count", "4", "--rounds", "2", "--size", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bubble-ref bench crypto: 4 seals and opens of 100-byte content")
    rows = {line.split()[0]: line for line in lines if line.startswith(("seal", "open"))}
    assert set(rows) == {"seal", "open"}
    for name, line in rows.items():
        assert "ms" in line
        ratio = last_float(line)
        assert 0 < ratio, line


def test_format_crypto_bench_is_built_from_the_measurements():
    result = bench.CryptoBench(count=10, content_size=5, sign=0.002, wrap=0.0001, unwrap=0.002, verify=0.0001,
                             seal=0.0025, open=0.005)
    assert result.seal_bound == pytest.approx(1 / 0.0022)
    assert result.open_bound == pytest.approx(1 / 0.0041)
    assert result.seal_ratio == pytest.approx(0.0022 / 0.0025)
    assert result.open_ratio == pytest.approx(0.0041 / 0.005)
    table = bench.format_crypto_bench(result).splitlines()
    seal_line = next(line for line in table if line.startswith("seal"))
    open_line = next(line for line in table if line.startswith("open"))
    assert last_float(seal_line) == pytest.approx(0.88, abs=1e-3)
    assert last_float(open_line) == pytest.approx(0.82, abs=1e-3)
    assert "2.500 ms" in seal_line and "400.0" in seal_line


@pytest.mark.parametrize("args", [
    ["--count", "1", "--rounds", "5"],
    ["--count", "4", "--rounds", "0"],
    ["--count", "4", "--rounds", "2", "--size", "-1"],
], ids=["count-below-rounds", "zero-rounds", "negative-size"])
def test_bench_bad_arguments(capsys, args):
    assert cli.main(["bench", "crypto", *args]) == 2
    captured = capsys.readouterr()
    assert "count at least rounds" in captured.err
    assert captured.out == ""


def test_bench_crypto_function_refuses_bad_arguments():
    with pytest.raises(ValueError, match="count at least rounds"):
        bench.bench_crypto(count=1, content_size=10, rounds=5)
    with pytest.raises(ValueError, match="content_size not negative"):
        bench.bench_crypto(count=4, content_size=-1, rounds=2)


@pytest.mark.parametrize("argv", [[], ["bench"], ["nonsense"], ["bench", "crypto", "--count", "many"]])
def test_usage_errors_exit_with_2(capsys, argv):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    assert "usage: bubble-ref" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"bubble-ref {__version__}"


def test_console_script_runs_the_demo():
    script = Path(sys.executable).parent / "bubble-ref"
    assert script.is_file(), f"console script not installed next to {sys.executable}"
    result = subprocess.run([str(script), "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: SpoofedSender" in result.stdout


HEAVY = ("flask", "werkzeug", "jsonschema", "fastjsonschema", "matplotlib", "requests", "cryptography", "waitress")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["node", "--help"], ["bench", "mesh", "--help"]])
def test_help_and_version_import_no_heavy_library(argv):
    probe = ("import sys\nfrom bubble_ref import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", result.stdout[-500:]


def test_proof_mode_choices_are_the_nodes():
    from bubble_ref.node import PROOF_MODES

    node = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["node"]._actions
                if a.dest == "proof_mode")
    assert tuple(node.choices) == PROOF_MODES


def test_help_texts_have_no_doubled_percent_and_say_what_demo_runs(capsys):
    for argv in (["bench", "mesh", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    out = capsys.readouterr().out
    assert "%%" not in out and "10% loss" in out
    assert "3-node mesh" in out


class MeshCommand:
    "`bubble-ref mesh` as a subprocess, read line by line; stopped with SIGINT like Ctrl-C."

    def __init__(self, *args: str, env: dict | None = None):
        script = Path(sys.executable).parent / "bubble-ref"
        # Ctrl-C as a terminal delivers it: a shell that runs jobs in the background (CI started with `&`) hands its
        # children SIGINT *ignored*, and Python then installs no KeyboardInterrupt; give the command the default.
        self.proc = subprocess.Popen([str(script), "mesh", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []

    def wait_for(self, phrase: str, timeout: float = 400.0) -> str:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if phrase in line:
                return line
            assert time.monotonic() < deadline, self.lines
        raise AssertionError(f"{phrase!r} never printed; stdout: {self.lines}; stderr: {self.proc.stderr.read()}")

    def interrupt(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=120)
        self.lines += out.splitlines()
        return self.proc.returncode, "\n".join(self.lines), err


def test_mesh_with_a_new_data_dir_creates_it_and_keeps_it(tmp_path):
    data = tmp_path / "does" / "not" / "exist"
    mesh = MeshCommand("--nodes", "2", "--topology", "line", "--data-dir", str(data))
    mesh.wait_for("nodes are up")
    code, out, err = mesh.interrupt()
    assert code == 0, err
    assert "all nodes stopped" in out and "Traceback" not in err, err
    assert (data / "node-0.log").exists() and (data / "node-1" / "server_key.pem").exists()


def test_mesh_without_data_dir_removes_its_temporary_folder(tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    mesh = MeshCommand("--nodes", "2", env={**os.environ, "TMPDIR": str(private_tmp)})
    first = mesh.wait_for("data and logs in")
    assert str(private_tmp) in first and "removed when the mesh stops" in first
    mesh.wait_for("nodes are up")
    assert list(private_tmp.iterdir()), "the mesh's folder exists while it runs"
    code, out, err = mesh.interrupt()
    assert code == 0, err
    assert list(private_tmp.iterdir()) == [], "the temporary folder is removed after Ctrl-C"


def test_mesh_says_which_node_did_not_start_and_why(tmp_path):
    with socket.socket() as taken:  # node-1's port is in use, so node-1 cannot serve
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1] - 1
        mesh = MeshCommand("--nodes", "2", "--base-port", str(base), "--data-dir", str(tmp_path / "m"))
        out, err = mesh.proc.communicate(timeout=400)
    assert mesh.proc.returncode == 1, (out, err)
    assert "node(s) did not start" in err and "node-1 exited with code" in err, err
    assert "last log lines" in err, err
