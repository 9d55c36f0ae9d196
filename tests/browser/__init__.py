"""Browser tests: a real JupyterLab driven by Playwright and Debian's Chromium (see labharness.py).

A package, so that its conftest is imported as browser.conftest and never takes the place of tests/conftest.py
(the unit tests do `from conftest import ...`)."""
