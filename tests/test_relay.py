"""The real driver's outgoing side (`relay.fetch` and `relay.Executor`): a peer's answer costs the caller at most
the Call's timeout and max_bytes, whatever the peer does; redirects are not followed.

The misbehaving peers are raw TCP servers on 127.0.0.1 written for these tests (a real HTTP server would not
misbehave on purpose). They keep misbehaving far longer than the timeout, so a caller that waits for them fails
clearly; the bounds allow generous slack for a loaded machine.
"""
from __future__ import annotations

import gzip
import json
import socketserver
import threading
import time
from contextlib import contextmanager

import pytest

from bubble_ref.node import Call
from bubble_ref.relay import Executor, fetch

TIMEOUT = 1.0  # the Calls' timeout, seconds
SLACK = 3.0  # what a loaded machine may add to it, seconds
MISBEHAVE = 10.0  # how long the bad servers keep it up, seconds: far more than TIMEOUT + SLACK


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads, allow_reuse_address = True, True


def read_request(sock) -> bytes:
    "One HTTP request: the head, then Content-Length bytes of body."
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@contextmanager
def raw_server(answer):
    "A TCP server on 127.0.0.1 that reads a request, then calls `answer(socket, stop_event)`; yields its URL."
    stop = threading.Event()
    hits: list[bytes] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(MISBEHAVE + 5)
            try:
                hits.append(read_request(self.request))
                answer(self.request, stop)
            except OSError:
                pass  # the caller hung up: that is what we want

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def ok_json(body: bytes, extra_headers: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n" % (len(body), extra_headers)
            + body)


def answers_json(body: bytes):
    def answer(sock, stop):
        sock.sendall(ok_json(body))
    return answer


def drip(prefix: bytes, unit: bytes, every: float = 0.2):
    "Send `prefix`, then `unit` every `every` seconds until the test ends or MISBEHAVE seconds have passed."
    def answer(sock, stop):
        sock.sendall(prefix)
        end = time.monotonic() + MISBEHAVE
        while not stop.is_set() and time.monotonic() < end:
            sock.sendall(unit)
            stop.wait(every)
    return answer


def silent(sock, stop):
    stop.wait(MISBEHAVE)  # reads the request, never answers


def huge(sock, stop):
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 30000000\r\n\r\n")
    chunk = b"1," * 32768
    while not stop.is_set():
        sock.sendall(chunk)


def gzip_bomb(sock, stop):
    body = gzip.compress(b" " * 20_000_000)  # 20 kB on the wire, 20 MB once decoded
    sock.sendall(ok_json(body, b"Content-Encoding: gzip\r\n"))


def timed_fetch(url: str, **call) -> tuple[tuple, float]:
    started = time.monotonic()
    result = fetch(Call("GET", url, **{"timeout": TIMEOUT, **call}))
    return result, time.monotonic() - started


# ------------------------------------------------------------------ fetch

def test_fetch_reads_a_json_answer_and_tolerates_a_body_that_is_not_json():
    with raw_server(answers_json(b'{"hello": "bubble"}')) as (url, hits):
        assert timed_fetch(url)[0] == (200, {"hello": "bubble"})
        assert hits[0].startswith(b"GET / HTTP/1.1")
    with raw_server(answers_json(b"not json")) as (url, _):
        assert timed_fetch(url)[0] == (200, None)


def test_fetch_sends_the_body_as_json():
    with raw_server(answers_json(b"{}")) as (url, hits):
        assert fetch(Call("POST", url, {"a": [1, 2]}, timeout=TIMEOUT)) == (200, {})
        head, _, body = hits[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST / HTTP/1.1") and b"application/json" in head.lower()
        assert json.loads(body) == {"a": [1, 2]}


def test_an_answer_of_exactly_max_bytes_is_read_and_one_byte_more_is_a_failure():
    body = b'"' + b"x" * 998 + b'"'  # 1000 bytes of JSON
    with raw_server(answers_json(body)) as (url, _):
        assert timed_fetch(url, max_bytes=1000)[0] == (200, "x" * 998)
        assert timed_fetch(url, max_bytes=999)[0] == (None, None)


def test_a_huge_answer_is_cut_off_at_max_bytes():
    with raw_server(huge) as (url, _):
        result, elapsed = timed_fetch(url, max_bytes=100_000)
    assert result == (None, None)
    assert elapsed < TIMEOUT + SLACK, f"reading a 30 MB answer took {elapsed:.1f} s"


def test_a_compressed_answer_is_bounded_by_its_decoded_size():
    with raw_server(gzip_bomb) as (url, _):
        result, elapsed = timed_fetch(url, max_bytes=100_000)
    assert result == (None, None) and elapsed < TIMEOUT + SLACK


def test_a_server_that_never_answers_costs_the_timeout():
    with raw_server(silent) as (url, _):
        result, elapsed = timed_fetch(url)
    assert result == (None, None)
    assert elapsed < TIMEOUT + SLACK, f"a silent server held the caller {elapsed:.1f} s (timeout {TIMEOUT} s)"


def test_a_body_dripping_past_the_timeout_is_a_failure():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    with raw_server(drip(head, b" ")) as (url, _):
        result, elapsed = timed_fetch(url)
    assert result == (None, None)
    assert elapsed < TIMEOUT + SLACK, f"a dripping body held the caller {elapsed:.1f} s (timeout {TIMEOUT} s)"


def test_a_chunked_body_dripping_past_the_timeout_is_a_failure():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    with raw_server(drip(head, b"1\r\n \r\n")) as (url, _):
        result, elapsed = timed_fetch(url)
    assert result == (None, None) and elapsed < TIMEOUT + SLACK


def test_headers_dripping_past_the_timeout_are_a_failure():
    "The timeout bounds the whole exchange, headers included (`requests`' own timeout is per socket read)."
    with raw_server(drip(b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n", every=0.3)) as (url, _):
        result, elapsed = timed_fetch(url)
    assert elapsed < TIMEOUT + SLACK, f"dripping headers held the caller {elapsed:.1f} s (timeout {TIMEOUT} s)"
    assert result == (None, None)


def test_a_status_line_dripping_past_the_timeout_is_a_failure():
    with raw_server(drip(b"", b"H", every=0.3)) as (url, _):
        result, elapsed = timed_fetch(url)
    assert result == (None, None)
    assert elapsed < TIMEOUT + SLACK, f"a dripping status line held the caller {elapsed:.1f} s (timeout {TIMEOUT} s)"


def test_redirects_are_not_followed():
    with raw_server(answers_json(b'{"followed": true}')) as (target, target_hits):
        def redirect(sock, stop):
            sock.sendall(b"HTTP/1.1 302 Found\r\nLocation: %b/elsewhere\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2\r\n\r\n{}" % target.encode())
        with raw_server(redirect) as (url, hits):
            assert timed_fetch(url)[0][0] == 302
            assert fetch(Call("POST", url, {"x": 1}, timeout=TIMEOUT))[0] == 302
        assert len(hits) == 2 and target_hits == [], "the redirect's target was never asked"


REDIRECT_HEAD = b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/elsewhere\r\nContent-Type: application/json\r\n"


def test_a_redirect_with_a_huge_body_is_cut_off_at_max_bytes():
    "A 3xx answer is an answer like any other: the caller reads at most about max_bytes of it, in the timeout."
    sent = [0]

    def huge_redirect(sock, stop):
        sock.sendall(REDIRECT_HEAD + b"Content-Length: 60000000\r\n\r\n")
        chunk = b"1," * 32768
        while not stop.is_set() and sent[0] < 60_000_000:
            sock.sendall(chunk)
            sent[0] += len(chunk)

    with raw_server(huge_redirect) as (url, _):
        result, elapsed = timed_fetch(url, max_bytes=100_000)
    assert result[1] is None
    assert sent[0] < 20_000_000, f"the caller read {sent[0] / 1e6:.0f} MB of a redirect's body (max_bytes 100 kB)"
    assert elapsed < TIMEOUT + SLACK, f"reading a 60 MB redirect took {elapsed:.1f} s (timeout {TIMEOUT} s)"


def test_a_redirect_with_a_dripping_body_costs_at_most_the_timeout():
    with raw_server(drip(REDIRECT_HEAD + b"Content-Length: 100000\r\n\r\n", b" ")) as (url, _):
        result, elapsed = fetch_or_exception(url)
    assert result[1] is None
    assert elapsed < TIMEOUT + SLACK, f"a dripping redirect held the caller {elapsed:.1f} s (timeout {TIMEOUT} s)"


# ------------------------------------------------------------------ broken answers

def fetch_or_exception(url: str, **call) -> tuple[tuple, float]:
    "timed_fetch, with an exception out of fetch turned into a clear test failure (the Executor would lose the call)."
    started = time.monotonic()
    try:
        return timed_fetch(url, **call)
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"fetch raised {type(e).__module__}.{type(e).__name__}: {e} after {time.monotonic() - started:.1f} s;"
                    " it must answer (None, None): in the Executor the exception ends the worker thread and the node "
                    "never gets an answer for this Call")


def truncated(sock, stop):
    "The peer dies in the middle of its answer (as a node killed mid-response does)."
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":")


def bad_chunk(sock, stop):
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n")


def bad_gzip(sock, stop):
    sock.sendall(ok_json(b"this is not gzip", b"Content-Encoding: gzip\r\n"))


@pytest.mark.parametrize("answer", [truncated, bad_chunk, bad_gzip], ids=lambda f: f.__name__)
def test_a_broken_answer_is_a_failure_not_an_exception(answer):
    with raw_server(answer) as (url, _):
        result, elapsed = fetch_or_exception(url)
    assert result == (None, None) and elapsed < TIMEOUT + SLACK


def test_nobody_listening_is_a_failure():
    with raw_server(silent) as (url, _):
        pass  # the port is free again
    result, elapsed = timed_fetch(url)
    assert result == (None, None) and elapsed < TIMEOUT + SLACK


# ------------------------------------------------------------------ the executor

def test_the_executor_answers_every_call_within_its_timeout():
    "Bad peers and a good one at once: each answer comes back (None for the bad ones) within about its timeout."
    answers: dict[str, tuple] = {}
    done = threading.Event()

    def record(tag, status, body):
        answers[tag[1]] = (status, body, time.monotonic() - started)
        if len(answers) == 5:
            done.set()

    body_drip = drip(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n", b" ")
    with raw_server(silent) as (silent_url, _), raw_server(huge) as (huge_url, _), \
            raw_server(body_drip) as (drip_url, _), raw_server(answers_json(b'{"ok": 1}')) as (good_url, _):
        executor = Executor(record)
        started = time.monotonic()
        try:
            for name, url in [("silent", silent_url), ("huge", huge_url), ("dripping", drip_url), ("good", good_url)]:
                executor.submit(Call("GET", url, tag=("test", name), timeout=TIMEOUT, max_bytes=100_000))
            executor.submit(Call("GET", f"{good_url}/again", tag=("test", "good again"), timeout=TIMEOUT))
            assert done.wait(60), f"answers so far: {answers}"
        finally:
            executor.stop()
    assert answers["good"][:2] == answers["good again"][:2] == (200, {"ok": 1})
    for name in ("silent", "huge", "dripping"):
        status, body, elapsed = answers[name]
        assert (status, body) == (None, None), name
        assert elapsed < TIMEOUT + SLACK, f"{name}: answered after {elapsed:.1f} s"


def test_the_executor_answers_a_call_whose_answer_breaks():
    "A peer dying mid-answer must still give the node an answer (None), or the node waits for it forever."
    answers = []
    answered = threading.Semaphore(0)

    def record(tag, status, body):
        answers.append((tag[1], status, body))
        answered.release()

    with raw_server(truncated) as (url, _):
        executor = Executor(record)
        try:
            for i in range(2):
                executor.submit(Call("GET", f"{url}/{i}", tag=("test", i), timeout=TIMEOUT))
            deadline = time.monotonic() + TIMEOUT + SLACK + 5
            got = [answered.acquire(timeout=max(0.0, deadline - time.monotonic())) for _ in range(2)]
        finally:
            executor.stop()
    assert got == [True, True], f"answers: {answers} (a Call with no answer is lost to the node)"
    assert sorted(answers) == [(0, None, None), (1, None, None)]


def test_a_stopped_executor_takes_no_more_calls():
    answers = []
    with raw_server(answers_json(b"{}")) as (url, hits):
        executor = Executor(lambda tag, status, body: answers.append(tag))
        executor.stop()
        executor.submit(Call("GET", url, tag=("test", "late"), timeout=TIMEOUT))
        time.sleep(0.5)  # give a (wrongly) started worker time to call; nothing may happen
    assert answers == [] and hits == []


def test_a_worker_keeps_its_connection_alive_and_retries_once_when_the_server_closed_it():
    "Three calls in a row use one TCP connection; a hang-up on the kept connection is retried once on a fresh one."
    connections, hang_up = [], threading.Event()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            connections.append(self.client_address)
            self.request.settimeout(MISBEHAVE)
            served = 0
            while read_request(self.request):
                if hang_up.is_set():  # as a server whose idle timeout crosses our request on the wire
                    hang_up.clear()
                    return
                self.request.sendall(ok_json(b'{"n": %d}' % served))
                served += 1

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    answers = []
    answered = threading.Semaphore(0)
    executor = Executor(lambda tag, status, body: (answers.append((tag[1], status, body)), answered.release()))
    try:
        for i in range(3):
            executor.submit(Call("GET", f"{url}/{i}", tag=("test", i), timeout=TIMEOUT))
            assert answered.acquire(timeout=TIMEOUT + SLACK)
        assert answers == [(0, 200, {"n": 0}), (1, 200, {"n": 1}), (2, 200, {"n": 2})] and len(connections) == 1
        hang_up.set()
        executor.submit(Call("GET", f"{url}/3", tag=("test", 3), timeout=TIMEOUT))
        assert answered.acquire(timeout=TIMEOUT + SLACK)
    finally:
        executor.stop()
        server.shutdown()
        server.server_close()
    assert answers[-1] == (3, 200, {"n": 0}) and len(connections) == 2, "answered on a second, fresh connection"
