"""Sans IO, checked on the source: the protocol logic performs no I/O and reads no clock, randomness or key factory
of its own (rule 3 of the codebase). Everything the logic needs from the world is injected: the clock, the RNG,
the key factory; everything it wants done is returned as actions for a driver.

The check parses each core module with `ast` and looks for the names and calls that would break that promise.
The driver helpers that live in a core module (named below, each with the reason) are the only exception.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

CORE_MODULES = ("node", "mesh", "ledger", "audit", "ballot")

# Functions in core modules that are drivers, not logic: they start servers and wait on the wall clock.
DRIVER_HELPERS = {
    "mesh": {"free_port",  # binds a socket to find a free port
             "wait_for_peers",  # polls running nodes with time.sleep
             "start_local_mesh"},  # serves nodes with the real driver (relay.start_server)
}

FORBIDDEN_MODULES = {"requests", "threading", "time", "socket", "subprocess", "asyncio", "secrets", "urllib.request",
                     "http.client", "concurrent.futures", "multiprocessing", "signal", "selectors"}
FORBIDDEN_CALLS = {
    ("time", "sleep"), ("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("time", "time_ns"),
    ("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today"), ("os", "urandom"),
    ("os", "getrandom"), ("uuid", "uuid4"), ("threading", "Thread"), ("threading", "Lock"),
    ("requests", "get"), ("requests", "post"), ("requests", "request"), ("requests", "Session"),
    # the module-level RNG is global state: the node's RNG is injected (node.rng)
    *(("random", f) for f in ("random", "choice", "choices", "randint", "randrange", "uniform", "shuffle",
                              "sample", "getrandbits", "seed", "gauss")),
}


def _attribute_pair(node: ast.AST) -> tuple[str, str] | None:
    "('time', 'sleep') for `time.sleep`, ('datetime', 'now') for `datetime.now` or `datetime.datetime.now`."
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name):
            return node.value.id, node.attr
        if isinstance(node.value, ast.Attribute):
            return node.value.attr, node.attr
    return None


def _allowed_generate_defaults(tree: ast.AST) -> set[int]:
    "ids of the `Identity.generate` nodes that are the default value of a parameter named `new_identity`."
    allowed = set()
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = func.args
        positional = args.posonlyargs + args.args
        pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        for arg, default in pairs:
            if arg.arg == "new_identity" and _attribute_pair(default) == ("Identity", "generate"):
                allowed.add(id(default))
    return allowed


def sans_io_violations(source: str, skip: set[str] = frozenset()) -> list[str]:
    "Every I/O, clock, global-randomness or key-generation use in `source`, outside the top-level names in `skip`."
    tree = ast.parse(source)
    found = []
    for top in tree.body:
        if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and top.name in skip:
            continue
        allowed = _allowed_generate_defaults(top)
        for node in ast.walk(top):
            where = f"line {getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                found += [f"{where}: import {a.name}" for a in node.names
                          if a.name in FORBIDDEN_MODULES or a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module in FORBIDDEN_MODULES or node.module.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{where}: from {node.module} import ...")
            pair = _attribute_pair(node)
            if pair in FORBIDDEN_CALLS:
                found.append(f"{where}: {'.'.join(pair)}")
            elif pair == ("Identity", "generate") and id(node) not in allowed:
                found.append(f"{where}: Identity.generate outside a `new_identity` default")
            elif pair == ("random", "Random") and isinstance(node, ast.Attribute):
                pass  # a seeded Random is checked below, at its call
            if isinstance(node, ast.Call) and _attribute_pair(node.func) == ("random", "Random") \
                    and not node.args and not node.keywords:
                found.append(f"{where}: random.Random() without a seed")
    return found


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_logic_does_no_io_and_reads_no_clock_of_its_own(module):
    source = inspect.getsource(importlib.import_module(f"bubble_ref.{module}"))
    violations = sans_io_violations(source, DRIVER_HELPERS.get(module, set()))
    assert violations == [], f"bubble_ref.{module} is not sans IO: {violations}"


@pytest.mark.parametrize("module, names", sorted(DRIVER_HELPERS.items()))
def test_the_driver_helpers_named_as_exceptions_exist_and_are_the_only_ones(module, names):
    "The exceptions are real (a renamed helper must not leave a stale hole), and without them the check fires."
    source = inspect.getsource(importlib.import_module(f"bubble_ref.{module}"))
    tree = ast.parse(source)
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert names <= top
    assert sans_io_violations(source) != [], "the helpers do I/O, so they are exceptions for a reason"


def test_the_simulator_uses_no_wall_clock_no_threads_and_no_network():
    "The simulated driver must not read the real clock or touch the network: a seed must replay exactly."
    source = inspect.getsource(importlib.import_module("bubble_ref.sim"))
    violations = [v for v in sans_io_violations(source, {"_extra_keys"}) if "Identity.generate" not in v]
    assert violations == []


@pytest.mark.parametrize("snippet, expected", [
    ("import time\nclass A:\n    def f(self):\n        time.sleep(1)", ["import time", "time.sleep"]),
    ("import requests\ndef f():\n    return requests.get('http://x')", ["import requests", "requests.get"]),
    ("from threading import Thread", ["from threading import"]),
    ("from datetime import datetime\ndef f():\n    return datetime.now()", ["datetime.now"]),
    ("import datetime\ndef f():\n    return datetime.datetime.utcnow()", ["datetime.utcnow"]),
    ("import random\ndef f():\n    return random.choice([1, 2])", ["random.choice"]),
    ("import random\ndef f():\n    return random.Random()", ["random.Random() without a seed"]),
    ("def f(identity=Identity.generate):\n    pass", ["Identity.generate outside"]),
    ("def f():\n    return Identity.generate()", ["Identity.generate outside"]),
    ("def f(*, new_identity=Identity.generate):\n    return new_identity()", []),
    ("def f(a, new_identity=Identity.generate):\n    pass", []),
    ("import random\ndef f(seed):\n    return random.Random(seed)", []),
])
def test_the_check_finds_what_it_looks_for(snippet, expected):
    found = sans_io_violations(textwrap.dedent(snippet))
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found)), found
