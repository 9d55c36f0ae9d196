"""Fixtures for the browser tests: one JupyterLab and one Chromium for the browser tests (they take seconds to
start), each test working in its own folder under the lab's root. See labharness.py.

Both are package-scoped, not session-scoped: Playwright's sync API keeps its asyncio loop marked as *running* in
the main thread for as long as `sync_playwright()` is open, so a session-wide Chromium made every later
`asyncio.run()` in the same pytest run (the calls and STUN tests) fail with "cannot be called from a running event
loop". Closing it when the browser tests are done gives the thread back its state."""
from __future__ import annotations

import asyncio
import shutil

import pytest

from .labharness import CHROMIUM, CHROMIUM_ARGS, JupyterLabServer, Lab, require_browser_tools


@pytest.fixture(scope="package")
def lab_server(tmp_path_factory):
    "A running JupyterLab; on teardown it is stopped, and nothing it started may outlive it."
    require_browser_tools()
    server = JupyterLabServer(root=tmp_path_factory.mktemp("lab-root"), home=tmp_path_factory.mktemp("lab-home"))
    server.start()
    yield server
    leaked = server.stop()
    assert not leaked, f"processes of this JupyterLab outlived it (killed now): {leaked}"
    leftovers = sorted(p.name for p in server.tmp.iterdir())
    assert not leftovers, f"JupyterLab or its kernels left files in their TMPDIR: {leftovers}"


@pytest.fixture(scope="package")
def lab(lab_server):
    "A Chromium page showing the running JupyterLab; closed after the last browser test."
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            yield Lab(page, lab_server).load()
        finally:
            browser.close()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    assert loop is None, f"Playwright left an event loop running in the main thread: {loop!r}"


@pytest.fixture
def lab_folder(lab_server, request):
    "A fresh folder under the lab's root for one test; (absolute path, path relative to the root)."
    folder = lab_server.root / request.node.name
    folder.mkdir()
    yield folder, folder.name
    shutil.rmtree(folder, ignore_errors=True)
