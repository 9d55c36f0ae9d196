"""Helpers for the node tests: run `bubble-ref node` as a real subprocess on 127.0.0.1, and check error answers.

`NodeProcess` starts the console script of the running interpreter's environment (never whatever `bubble-ref`
happens to be on PATH), reads the announce line with a timeout, and stops the node with SIGTERM (then SIGKILL
if it does not exit). Its stderr goes to a file, not a pipe: the node logs one line per request, and a pipe
nobody reads would fill up and block it.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

BUBBLE_REF = Path(sys.executable).parent / "bubble-ref"
START_TIMEOUT = 180.0  # seconds to wait for the announce line: generous, we wait on the OS (CI shares 2 cores)
STOP_TIMEOUT = 15.0  # seconds to wait for a clean exit after SIGTERM
HTTP_TIMEOUT = 10.0  # seconds, every request the tests make
JSON = {"Content-Type": "application/json"}

ANNOUNCE = re.compile(r"bubble-ref node (?:'(?P<name>[^']*)' )?serving on (?P<url>http://127\.0\.0\.1:(?P<port>\d+)) "
                      r"\(server id (?P<short_id>[0-9a-f]{16})…, proof mode (?P<mode>spec|hardened)\)")


class NodeStartError(RuntimeError):
    "The node process exited, or did not announce itself in time."


def _cpu_seconds(pid: int) -> float | None:
    "CPU time (user + system) a live process has used, from /proc; None where /proc is not available."
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class NodeProcess:
    "One `bubble-ref node` subprocess serving `data_dir` on a free loopback port."

    def __init__(self, data_dir: str | os.PathLike, name: str = "test node", *extra_args: str):
        self.data_dir, self.name, self.extra_args = Path(data_dir), name, list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.announce = ""
        self.stderr_path: Path | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._rest: list[str] = []

    # ------------------------------------------------------------ lifecycle

    @property
    def command(self) -> list[str]:
        return [str(BUBBLE_REF), "node", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(self.data_dir),
                "--name", self.name, *self.extra_args]

    def start(self, timeout: float = START_TIMEOUT) -> "NodeProcess":
        "Start the process and wait for its announce line; NodeStartError (and no process left) on failure."
        assert self.proc is None, "a NodeProcess is started once; make a new one to restart"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        fd, stderr_name = tempfile.mkstemp(prefix=f"{self.data_dir.name}-", suffix=".stderr.log",
                                           dir=self.data_dir.parent)
        self.stderr_path = Path(stderr_name)
        with os.fdopen(fd, "wb") as stderr_file:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=stderr_file, cwd=self.data_dir.parent, text=True, encoding="utf-8")
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True,
                                        name=f"stdout of node {self.name}")
        self._reader.start()
        started = time.monotonic()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            cpu = _cpu_seconds(self.proc.pid)
            doing = ("still importing Python modules (it had not logged anything yet)" if not self.stderr().strip()
                     else f"its last log line: {self.stderr().strip().splitlines()[-1]}")
            self.kill()
            raise NodeStartError(
                f"node {self.name!r} (pid {self.proc.pid}) did not announce itself within {timeout:.0f} s; it had "
                f"used {cpu if cpu is not None else '?'} s of CPU and was {doing}. Command: {' '.join(self.command)}; "
                f"full stderr: {self.stderr()[-2000:]!r}") from None
        if line is None:
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.kill()
            raise NodeStartError(f"node {self.name!r} exited with code {self.proc.returncode} "
                                 f"{time.monotonic() - started:.1f} s after starting, before announcing. Command: "
                                 f"{' '.join(self.command)}; stderr: {self.stderr()[-2000:]}")
        self.announce = line.rstrip("\n")
        match = ANNOUNCE.fullmatch(self.announce)
        if match is None:
            self.kill()
            raise NodeStartError(f"unexpected announce line {self.announce!r}")
        self.url = match["url"]
        return self

    def _pump(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _collect_stdout(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT)
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self._rest.append(line.rstrip("\n"))

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        "SIGTERM, wait for a clean exit (SIGKILL after `timeout`); returns the exit code. Safe to call twice."
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._collect_stdout()
        return self.proc.returncode

    def kill(self) -> int:
        "SIGKILL, as a crash would: no cleanup in the node. Returns the exit code (-9)."
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self._collect_stdout()
        return self.proc.returncode

    def __enter__(self) -> "NodeProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- output

    @property
    def stdout_after_announce(self) -> list[str]:
        "Lines the node printed after its announce line (complete only once it has exited)."
        return list(self._rest)

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace") if self.stderr_path else ""

    # ------------------------------------------------------------------ HTTP

    def operator_headers(self) -> dict:
        "The node's operator token, from its data folder: /trace, and /status's and /reputation's counters, need it."
        return {"Authorization": f"Bearer {(self.data_dir / 'operator_token').read_text().strip()}"}

    def status(self, operator: bool = True) -> dict:
        "GET /status, as the operator sees it (all fields) or, with operator=False, as anyone does."
        response = requests.get(f"{self.url}/status", headers=self.operator_headers() if operator else None,
                                timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()


def fetch_all(url: str, who, *, cursor: str | None = None, session=None) -> tuple[list[dict], str]:
    """Every message of a key after `cursor`, following `next_cursor` until `more` is false.

    `who` is an Identity: each page is asked with a fresh hardened proof bound to the node's server id (a hardened
    node, the default, accepts each proof once); or a spec proof (a dict), sent again with every page (spec nodes)."""
    from bubble_ref.crypto import Identity
    from bubble_ref.envelope import make_retrieval_proof

    get = (session or requests).get
    if isinstance(who, Identity):
        answer = get(f"{url}/status", timeout=HTTP_TIMEOUT)
        assert answer.status_code == 200, answer.text
        server_id = answer.json()["server_id"]
        proof = lambda: make_retrieval_proof(who, server_id=server_id).to_dict()  # noqa: E731
    else:
        proof = lambda: dict(who)  # noqa: E731
    messages: list[dict] = []
    for _ in range(10_000):
        body = proof() if cursor is None else {**proof(), "cursor": cursor}
        response = get(f"{url}/messages", json=body, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        page = response.json()
        messages.extend(page["messages"])
        assert page["more"] is False or page["messages"], "`more` with an empty page would loop forever"
        cursor = page["next_cursor"]
        if not page["more"]:
            return messages, cursor
    raise AssertionError("more than 10,000 pages")


def assert_error(response: requests.Response, status: int, code: str, phrase: str | None = None) -> dict:
    "`response` is the JSON error {error, detail} (exactly those keys) with `status`, `code` and `phrase` in detail."
    assert 400 <= status < 500
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("Content-Type", "").split(";")[0].strip() == "application/json", response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"].strip(), body
    if phrase is not None:
        assert phrase in body["detail"], body
    return body


def assert_alive(url: str) -> None:
    "The node still answers /status with 200 and its JSON."
    response = requests.get(f"{url}/status", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    assert set(response.json()) >= {"server_id", "public_key", "version", "load", "proof_mode"}


# ------------------------------------------------------------------ meshes of real node processes

WAIT = 60.0  # seconds: the longest a poll waits by default before the test fails (generous: CI shares 2 cores)
POLL = 0.05  # seconds between two polls


def wait_until(predicate, what: str, timeout: float = WAIT):
    "Poll `predicate` until it returns something truthy (returned); fail with `what` after `timeout` seconds."
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value {value!r})")
        time.sleep(POLL)


class MeshProcess(NodeProcess):
    """A `bubble-ref node` on a port fixed before it starts (so its peers can list it), joined to `peers`.

    Defaults that keep the mesh tests about what they test (`extra_args` come last and override them):
    `--retry-max 1` keeps retries to a dead peer quick; `--sync-interval 3600` keeps anti-entropy (which pulls
    what a peer stored, hop limit or not) out of the flood tests; `--audit-interval 0` keeps audit packets out
    of outbox and mailbox counts (the monitoring tests turn audits on again).
    """

    DEFAULTS = ("--retry-max", "1", "--sync-interval", "3600", "--audit-interval", "0")

    def __init__(self, data_dir, name: str, port: int, peers: list[str], *extra_args: str):
        super().__init__(data_dir, name, *extra_args)
        self.port, self.peers = port, list(peers)

    @property
    def command(self) -> list[str]:
        peer_args = [a for url in self.peers for a in ("--peer", url)]
        return [str(BUBBLE_REF), "node", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--name", self.name, *peer_args, *self.DEFAULTS, *self.extra_args]

    @property
    def fixed_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def again(self) -> "MeshProcess":
        "A new (not yet started) process with the same data directory, port, name, peers and options: a restart."
        return MeshProcess(self.data_dir, self.name, self.port, self.peers, *self.extra_args)

    def server_key(self):
        from bubble_ref.crypto import Identity
        return Identity.load(self.data_dir / "server_key.pem")

    def reputation(self, operator: bool = True) -> dict:
        response = requests.get(f"{self.url}/reputation", headers=self.operator_headers() if operator else None,
                                timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()


class Launcher:
    "Starts mesh processes and remembers every one, so teardown stops them all, whatever the test did."

    def __init__(self, root: Path):
        self.root = Path(root)
        self.started: list[NodeProcess] = []

    def line(self, names: str, *extra_args: str) -> dict[str, MeshProcess]:
        "Unstarted processes for a line of nodes named by the letters of `names`, on ports chosen now."
        from bubble_ref.mesh import line_topology
        return self.linked(names, line_topology(len(names)), *extra_args)

    def linked(self, names, links: list[list[int]], *extra_args: str,
               per_node: dict | None = None) -> dict[str, MeshProcess]:
        "Unstarted processes named `names`, node i peered with the nodes in `links[i]`, on ports chosen now."
        from bubble_ref.mesh import free_port
        ports = {n: free_port() for n in names}
        return {n: MeshProcess(self.root / n, n, ports[n], [f"http://127.0.0.1:{ports[names[j]]}" for j in links[i]],
                               *extra_args, *(per_node or {}).get(n, ()))
                for i, n in enumerate(names)}

    def start(self, *procs: MeshProcess) -> None:
        "Start the processes in parallel and wait for each announce line (on its own fixed port)."
        from concurrent.futures import ThreadPoolExecutor
        self.started.extend(procs)
        with ThreadPoolExecutor(max_workers=len(procs)) as pool:
            for proc in pool.map(lambda p: p.start(), procs):
                assert proc.url == proc.fixed_url, (proc.announce, proc.fixed_url)

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()  # SIGTERM, then SIGKILL if it does not exit in time; a no-op if it already exited
