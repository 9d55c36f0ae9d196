"""A real JupyterLab driven by a real Chromium, for the browser tests.

`JupyterLabServer` runs `python -m jupyterlab` (the test interpreter's own environment, so kernels import this
checkout) on a free 127.0.0.1 port, with no token, private Jupyter config/data/runtime dirs and a private TMPDIR,
serving one root folder. `Lab` wraps a Playwright page showing it and runs JupyterLab commands through
`window.jupyterapp` (exposed by `--LabApp.expose_app_in_browser`).

Commands return promises of widgets, which Playwright cannot serialize, so nothing here hands a promise back to
Python: each JavaScript snippet starts the work, records its progress in `window.__labtest`, and returns null;
Python then polls that record (`Lab.wait_for`). Waiting is always on conditions, with generous deadlines
(the tests must pass with two busy loops beside them on a 2-core machine).

Chromium is Debian's (/usr/bin/chromium); `playwright install` (a browser download) is never needed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SERVER_START_TIMEOUT = 120.0  # s: JupyterLab answers /api/status
LAB_LOAD_TIMEOUT = 120.0  # s: the page has loaded and restored JupyterLab
KERNEL_TIMEOUT = 180.0  # s: notebooks opened, kernels started and answered (many at once, on a busy machine)
STOP_TIMEOUT = 30.0  # s: JupyterLab and its kernels are gone after SIGTERM
# JupyterLab settings for a quiet test session: no "get notified about Jupyter news?" toast over the page.
USER_SETTINGS = {"@jupyterlab/apputils-extension/notification":
                 {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}}


def missing_browser_tools() -> list[str]:
    "What the browser tests need and this machine lacks, each with how to install it."
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (pip install playwright, or pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium; no `playwright install` needed)")
    return missing


def require_browser_tools() -> None:
    "Skip when the tools are missing, with how to install them; in CI (CI=true) fail instead: nothing hides there."
    missing = missing_browser_tools()
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: a missing dependency is a failure)", pytrace=False)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    "Pids whose command line contains `text` (used with our private, unique home: only what our JupyterLab started)."
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass  # the process ended meanwhile
    return pids


class JupyterLabServer:
    "`jupyter lab` serving `root` on 127.0.0.1, everything private under `home`; start() then stop()."

    def __init__(self, root: Path, home: Path):
        self.root, self.home = Path(root), Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = self.home / "tmp"  # TMPDIR of the server and its kernels: what they leave behind shows here
        self.runtime_dir = self.home / "runtime"
        self.log_path = self.home / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
                "--IdentityProvider.token=", "--ServerApp.disable_check_xsrf=True", "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--allow-root", f"--ServerApp.root_dir={self.root}"]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, JUPYTER_PLATFORM_DIRS="1", TMPDIR=str(self.tmp),
                   JUPYTER_CONFIG_DIR=str(self.home / "config"), JUPYTER_DATA_DIR=str(self.home / "data"),
                   JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
                   JUPYTERLAB_SETTINGS_DIR=str(self.home / "config" / "lab" / "user-settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.home / "config" / "lab" / "workspaces"))
        env.pop("JUPYTER_PATH", None)  # only this environment's kernels and extensions
        return env

    def start(self) -> "JupyterLabServer":
        env = self.environment()
        for key in ("TMPDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
            Path(env[key]).mkdir(parents=True, exist_ok=True)
        for plugin, settings in USER_SETTINGS.items():
            settings_file = Path(env["JUPYTERLAB_SETTINGS_DIR"]) / f"{plugin}.jupyterlab-settings"
            settings_file.parent.mkdir(parents=True, exist_ok=True)
            settings_file.write_text(json.dumps(settings))
        with open(self.log_path, "wb") as log:  # a file, not a pipe: nobody reads a pipe, and a full one blocks
            self.proc = subprocess.Popen(self.command, env=env, cwd=self.home, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status", timeout=5) as answer:
                    json.load(answer)
                return self
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_TIMEOUT} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    def stop(self) -> list[int]:
        """SIGTERM: JupyterLab shuts its kernels down and exits. Anything of ours still alive after that is killed
        and returned (a non-empty list is a leak the caller should report)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT)
        # Kernels run in sessions of their own, and so do the notebooks' folder watchers; all of them name a
        # path under our private home (the kernel's connection file, the watched folder).
        deadline = time.monotonic() + STOP_TIMEOUT
        while (left := processes_mentioning(str(self.home))) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


# JavaScript run in the page. Each function takes one argument and returns null or plain data.
JS_HELPERS = r"""
window.__labtest = window.__labtest || {panels: {}, state: {}};
window.__labtest.track = (key, promise) => {
  const state = window.__labtest.state;
  state[key] = {done: false};
  promise.then(value => { state[key] = {done: true, ok: true, value: (value === undefined ? null : value)}; },
               error => { state[key] = {done: true, ok: false, error: String(error && error.stack || error)}; });
};
"""

JS_OPEN = r"""
(path) => {
  const t = window.__labtest, app = window.jupyterapp;
  t.track('open:' + path, (async () => {
    const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
    t.panels[path] = panel;
    await panel.context.ready;
    await panel.sessionContext.ready;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    if (!kernel) { throw new Error('no kernel for ' + path); }
    // The panel copies the kernel's spec and language_info into the notebook's metadata when they arrive;
    // its reactions were registered first, so once ours run, the metadata is what a user would save.
    await Promise.all([kernel.info, kernel.spec]);
    await new Promise(resolve => setTimeout(resolve, 0));
    return {kernel: kernel.name, dirty: panel.context.model.dirty};
  })());
  return null;
}
"""

JS_SAVE = r"""
(path) => {
  const t = window.__labtest, panel = t.panels[path];
  t.track('save:' + path, panel.context.save().then(() => ({dirty: panel.context.model.dirty})));
  return null;
}
"""

JS_RUN_ALL = r"""
(path) => {
  const t = window.__labtest, app = window.jupyterapp, panel = t.panels[path];
  app.shell.activateById(panel.id);  // 'notebook:run-all-cells' acts on the current notebook
  t.track('run-all:' + path, app.commands.execute('notebook:run-all-cells').then(ok => ({ok})));
  return null;
}
"""

JS_ERRORS = r"""
(path) => {
  // An error names its cell and the line that raised (a bare `assert` has an empty message).
  const errors = [], plain = (text) => text.replace(/\x1b\[[0-9;]*m/g, '');
  const cells = window.__labtest.panels[path].content.model.cells;
  for (let n = 0; n < cells.length; n++) {
    const cell = cells.get(n);
    if (cell.type !== 'code') continue;
    for (let i = 0; i < cell.outputs.length; i++) {
      const out = cell.outputs.get(i).toJSON();
      if (out.output_type === 'error') {
        const where = (out.traceback || []).map(plain).join('\n').split('\n').filter((l) => l.startsWith('---->'));
        errors.push(out.ename + ': ' + out.evalue + ` (cell ${n}` + (where.length ? `, ${where[where.length - 1]}` : '') + ')');
      }
      if (out.output_type === 'stream' && out.name === 'stderr') errors.push('stderr: ' + out.text);
    }
  }
  return errors;
}
"""

JS_CLOSE = r"""
(path) => {
  const t = window.__labtest, panel = t.panels[path];
  t.track('close:' + path, (async () => {
    await panel.sessionContext.shutdown();  // the kernel too, not only the tab
    panel.close();
    delete t.panels[path];
  })());
  return null;
}
"""


class Lab:
    "A Playwright page showing JupyterLab, with the few commands the tests need."

    def __init__(self, page, server: JupyterLabServer):
        self.page, self.server = page, server
        self.console_errors: list[str] = []
        page.on("console", lambda message: self.console_errors.append(message.text) if message.type == "error" else None)

    def load(self) -> "Lab":
        self.page.goto(f"{self.server.url}/lab", timeout=LAB_LOAD_TIMEOUT * 1000)
        self.page.wait_for_function("() => window.jupyterapp !== undefined", timeout=LAB_LOAD_TIMEOUT * 1000)
        self.page.evaluate("() => { window.jupyterapp.restored.then(() => { window.__labRestored = true; }); return null; }")
        self.page.wait_for_function("() => window.__labRestored === true", timeout=LAB_LOAD_TIMEOUT * 1000)
        self.page.evaluate(f"() => {{ {JS_HELPERS}; return null; }}")
        return self

    # -- progress records ----------------------------------------------------------------------

    def state(self, key: str) -> dict | None:
        return self.page.evaluate("(key) => window.__labtest.state[key] || null", key)

    def wait_for(self, keys: list[str], timeout: float) -> dict[str, object]:
        """Wait until every tracked promise in `keys` has settled; their values. A rejection fails with its error.
        Meanwhile a 'select a kernel' dialog, should one appear, is answered with its default (Python 3)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.page.evaluate("(keys) => keys.map(k => window.__labtest.state[k] || null)", keys)
            failed = {k: s["error"] for k, s in zip(keys, states) if s and s["done"] and not s["ok"]}
            if failed:
                raise AssertionError(f"in JupyterLab: {failed}\nserver log: {self.server.log_tail()}")
            if all(s and s["done"] for s in states):
                return {k: s["value"] for k, s in zip(keys, states)}
            self.answer_kernel_dialog()
            if time.monotonic() > deadline:
                pending = [k for k, s in zip(keys, states) if not (s and s["done"])]
                raise AssertionError(f"not done within {timeout} s: {pending}\nserver log: {self.server.log_tail()}")
            time.sleep(0.1)

    def answer_kernel_dialog(self) -> None:
        from playwright.sync_api import Error as PlaywrightError

        dialog = self.page.locator(".jp-Dialog")
        try:
            if dialog.count() and "kernel" in dialog.first.inner_text(timeout=2000).lower():
                dialog.first.locator(".jp-mod-accept").click(timeout=2000)
        except PlaywrightError:
            pass  # the dialog went away meanwhile; the next round looks again

    # -- commands --------------------------------------------------------------------------------

    def open_notebooks(self, paths: list[str], timeout: float = KERNEL_TIMEOUT) -> dict[str, dict]:
        "Open notebooks (all at once), each with its own new kernel, as a user would; {path: {kernel, dirty}}."
        for path in paths:
            self.page.evaluate(JS_OPEN, path)
        values = self.wait_for([f"open:{p}" for p in paths], timeout)
        return {p: values[f"open:{p}"] for p in paths}

    def save(self, paths: list[str], timeout: float = 60.0) -> dict[str, dict]:
        for path in paths:
            self.page.evaluate(JS_SAVE, path)
        values = self.wait_for([f"save:{p}" for p in paths], timeout)
        return {p: values[f"save:{p}"] for p in paths}

    def run_all(self, path: str, timeout: float = 180.0) -> list[str]:
        "Run All in the notebook; the errors (and stderr) its cells printed; fails if a cell raised."
        self.page.evaluate(JS_RUN_ALL, path)
        ok = self.wait_for([f"run-all:{path}"], timeout)[f"run-all:{path}"]["ok"]
        errors = self.page.evaluate(JS_ERRORS, path)
        assert ok and not [e for e in errors if not e.startswith("stderr")], f"Run All failed in {path}: {errors}"
        return errors

    def run_a_copy(self, notebook: Path, lab_folder: tuple[Path, str]) -> str:
        """Copy `notebook` into the lab's folder (the `lab_folder` fixture), open it and Run All, as a learner would;
        fails if a cell raised or wrote to stderr. Its path in the lab."""
        folder, relative = lab_folder
        shutil.copyfile(notebook, folder / notebook.name)
        path = f"{relative}/{notebook.name}"
        self.open_notebooks([path])
        stderr = self.run_all(path)
        assert not stderr, f"Run All wrote to stderr in {path}: {stderr}"
        return path

    def close(self, paths: list[str], timeout: float = 60.0) -> None:
        "Shut each notebook's kernel down and close its tab."
        for path in paths:
            self.page.evaluate(JS_CLOSE, path)
        self.wait_for([f"close:{p}" for p in paths], timeout)
