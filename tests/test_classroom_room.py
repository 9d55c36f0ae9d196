"""A classroom of real processes (notebook 12): `bubble-ref classroom` on 127.0.0.2 and `bubble-ref join` for six
students on 127.0.0.3 … 127.0.0.8 (Linux routes all of 127/8 to the loopback interface).

The story of a workshop, step by step: a message crosses the room, the teacher's demo packet floods it, a laptop
sleeps (SIGSTOP) and wakes (SIGCONT) and catches up, a late student catches up through anti-entropy, joining again
is idempotent, a `--behaviour drop` node is blacklisted by the room, a challenge result lands on the scoreboard, and
the dashboard's data (GET /classroom) and the projector page show all of it.
"""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bubble_ref.classroom import open_student, student_key
from bubble_ref.envelope import make_retrieval_proof, open_message
from bubble_ref.mesh import free_port

from nodes import BUBBLE_REF, HTTP_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT, wait_until

ANNOUNCE = re.compile(r"bubble-ref node '(?P<name>[^']*)' serving on (?P<url>http://127\.0\.0\.\d+:\d+) "
                      r"\(server id (?P<short_id>[0-9a-f]{16})…, proof mode hardened\)")
# Quick settings: hellos every half second (away after 2 s), audits every second, lists every half second. The
# audits look again 3 s after the first look (--audit-recheck; 15 s by default).
FAST = ("--hello-interval", "0.5", "--audit-interval", "1", "--audit-deadline", "0.8", "--audit-recheck", "3", "--sync-interval", "2",
        "--directory-interval", "0.5", "--retry-max", "2")
BLACKLIST_WAIT = 300.0  # seconds (generous: CI shares 2 cores)


class RoomProcess:
    "`bubble-ref classroom` or `bubble-ref join` as a subprocess: its announce line, its later lines, stop."

    def __init__(self, folder: Path, name: str, args: list[str]):
        self.folder, self.name, self.args = Path(folder), name, [str(a) for a in args]
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.seen: list[str] = []
        self._lines: queue.Queue = queue.Queue()

    def start(self, timeout: float = START_TIMEOUT) -> "RoomProcess":
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.stderr = self.folder.parent / f"{self.name}.stderr.log"
        with open(self.stderr, "ab") as errors:
            self.proc = subprocess.Popen([str(BUBBLE_REF), *self.args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=errors, text=True, encoding="utf-8")
        threading.Thread(target=self._pump, daemon=True, name=f"stdout of {self.name}").start()
        announce = self.wait_for_line(ANNOUNCE.pattern, timeout)
        self.url = ANNOUNCE.search(announce)["url"]
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> str:
        "The first line (since the start) matching `pattern`; AssertionError with everything printed otherwise."
        found = lambda: next((line for line in self.seen if re.search(pattern, line)), None)
        def more():
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                return found()
            if line is not None:
                self.seen.append(line)
            elif self.proc.poll() is not None and found() is None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before printing {pattern!r}: "
                                     f"{self.seen}; stderr: {self.stderr.read_text()[-2000:]}")
            return found()
        return wait_until(more, f"{self.name} to print {pattern!r} (printed so far: {self.seen})", timeout=timeout)

    def pause(self) -> None:  # a laptop's lid closes: the process runs no more, its sockets stay open
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        return self.proc.returncode


def test_a_classroom_of_a_teacher_and_six_students(tmp_path):
    started: list[RoomProcess] = []
    clients = []
    try:
        port = free_port("127.0.0.2")
        teacher = RoomProcess(tmp_path / "teacher", "teacher", [
            "classroom", "--room", "test room", "--host", "127.0.0.2", "--port", port,
            "--data-dir", tmp_path / "teacher", *FAST])
        started.append(teacher.start())
        pin = re.search(r"--pin ([0-9a-f]{64})", teacher.wait_for_line(r"--pin [0-9a-f]{64} --name THEIR-NAME"))[1]
        token = (tmp_path / "teacher" / "operator_token").read_text().strip()
        operator = {"Authorization": f"Bearer {token}"}

        def join(name: str, host: int, *extra) -> RoomProcess:
            proc = RoomProcess(tmp_path / name, name, [
                "join", teacher.url, "--pin", pin, "--name", name, "--host", f"127.0.0.{host}",
                "--port", free_port(f"127.0.0.{host}"), "--data-dir", tmp_path / name, *FAST, *extra])
            started.append(proc)
            return proc

        def room(operator_view: bool = True) -> dict:
            answer = requests.get(f"{teacher.url}/classroom", headers=operator if operator_view else None,
                                  timeout=HTTP_TIMEOUT)
            assert answer.status_code == 200, answer.text
            return answer.json()

        def node(data: dict, name: str) -> dict:
            return next(n for n in data["nodes"] if n["name"] == name)

        def settled(count: int):
            data = room()
            ok = (data["room"]["students"] == count and all(n["status"] == "here" for n in data["nodes"])
                  and len(data["links"]) >= data["room"]["links_planned"])
            return data if ok else None

        first = {name: join(name, host) for name, host in [("Ada", 3), ("Grace", 4), ("Alan", 5), ("Katherine", 6)]}
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda p: p.start(), first.values()))
        for name, proc in first.items():
            proc.wait_for_line(f"joined {re.escape(teacher.url)} as '{name}'")
        data = wait_until(lambda: settled(4), "four students here, every assigned link up")
        assert [n["name"] for n in data["nodes"]][0] == "teacher"  # then the students, in the order they joined
        assert sorted(n["name"] for n in data["nodes"][1:]) == ["Ada", "Alan", "Grace", "Katherine"]
        assert "(4 in the room)" in teacher.wait_for_line(r"joined \(4 in the room\)")  # the teacher's terminal

        # 1. A message crosses the room: Ada's client (made by `join`) writes to Katherine, whose client reads it.
        ada, ada_book = open_student(tmp_path / "Ada")
        katherine, _ = open_student(tmp_path / "Katherine")
        clients += [ada, katherine]
        ada.send(ada_book.by_name("Katherine").public_key, "Hi Katherine, from across the room")
        got = wait_until(lambda: katherine.poll() or None, "Katherine's client to get Ada's message")
        assert [e.content for e in got] == ["Hi Katherine, from across the room"]

        # 2. The teacher's demo packet, handed to Grace's node, floods the room.
        demo = requests.post(f"{teacher.url}/classroom/demo", json={"from": "Grace"}, headers=operator,
                             timeout=HTTP_TIMEOUT)
        assert demo.status_code == 202 and demo.json()["from"] == "Grace", demo.text
        flood = wait_until(lambda: (f := room()["flood"])["reached"] == 5 and f, "the demo packet to reach all five")
        assert flood["arrivals"][0]["node"] == node(data, "Grace")["id"] and flood["arrivals"][0]["hops"] == 0

        # 3. Alan's laptop sleeps: the room sees him away; a message for him waits; he wakes and his node has it.
        first["Alan"].pause()
        wait_until(lambda: node(room(), "Alan")["status"] == "away", "the dashboard to show Alan away")
        ada.send(ada_book.by_name("Alan").public_key, "while you were asleep")
        first["Alan"].resume()
        alan_key, alan_id = student_key(tmp_path / "Alan"), node(data, "Alan")["id"]

        def alan_node_holds_it():
            proof = make_retrieval_proof(alan_key, server_id=alan_id).to_dict()
            page = requests.get(f"{node(data, 'Alan')['url']}/messages", json=proof, timeout=HTTP_TIMEOUT).json()
            return [m for m in page["messages"] if open_message(alan_key, m["packet"]).content == "while you were asleep"]
        wait_until(alan_node_holds_it, "Alan's own node to catch up after waking", timeout=120)
        wait_until(lambda: node(room(), "Alan")["status"] == "here", "the dashboard to show Alan back")

        # 4. Barbara joins late: anti-entropy brings her node what the room held before (the demo packet too).
        barbara = join("Barbara", 7)
        barbara.start().wait_for_line("joined .* as 'Barbara'")
        wait_until(lambda: room()["flood"]["reached"] == 6, "Barbara's node to catch up the demo packet", timeout=120)

        # 5. Joining is idempotent: while Ada's node runs, a second join does nothing; after a restart with only
        #    the data directory, she is back with the same keys, name, address and port: the roster has no duplicate.
        again = subprocess.run([str(BUBBLE_REF), "join", "--data-dir", str(tmp_path / "Ada")], capture_output=True,
                               text=True, timeout=START_TIMEOUT)
        assert again.returncode == 0 and "already running" in again.stdout, (again.stdout, again.stderr)
        url_before = node(room(), "Ada")["url"]
        assert first["Ada"].stop() == 0 and first["Ada"].wait_for_line("^bubble-ref join stopped$")
        rejoined = RoomProcess(tmp_path / "Ada", "Ada again", ["join", "--data-dir", tmp_path / "Ada", *FAST])
        started.append(rejoined)
        rejoined.start().wait_for_line("joined .* as 'Ada'")
        assert rejoined.url == url_before
        assert wait_until(lambda: settled(5), "the room of five to settle again")["room"]["students"] == 5

        # 6. The teacher starts a dropper; the room's audits and votes blacklist it.
        mallory = join("Mallory", 8, "--behaviour", "drop")
        mallory.start().wait_for_line("joined .* as 'Mallory'")
        mallory_id = ANNOUNCE.search(mallory.seen[0])["short_id"]

        def caught():
            data = room()
            her = [n for n in data["nodes"] if n["id"].startswith(mallory_id)]
            return data if her and her[0]["blacklisted"] and her[0]["blacklisted_by"] >= 5 else None
        data = wait_until(caught, "the teacher's node and most of the room to blacklist Mallory", timeout=BLACKLIST_WAIT)
        assert [n["name"] for n in data["nodes"] if n["blacklisted"] or n["blacklisted_by"]] == ["Mallory"]
        assert node(data, "Mallory")["score"] < 1.0 or node(data, "Mallory")["blacklisted"]

        # 7. Grace runs a challenge and posts her result, signed with the key `join` made; the scoreboard has it.
        check = subprocess.run([str(BUBBLE_REF), "workshop", "check", "timing", "--post", "--data-dir",
                                str(tmp_path / "Grace")], capture_output=True, text=True, timeout=START_TIMEOUT)
        assert check.returncode == 0 and "scoreboard says passed" in check.stdout, (check.stdout, check.stderr)

        # 8. The public dashboard shows all of it, coarsely (it is refreshed at most every 10 s).
        def public_shows_everything():
            view = room(operator_view=False)
            names = [n["name"] for n in view["nodes"]]
            ok = (sorted(names[:5]) == ["Ada", "Alan", "Grace", "Katherine", "teacher"]
                  and names[5:] == ["Barbara", "Mallory"]
                  and node(view, "Mallory")["blacklisted"] and view["scoreboard"]
                  and view["flood"] and view["flood"]["reached"] >= 6)
            return view if ok else None
        view = wait_until(public_shows_everything, "the public view to show the whole story", timeout=60)
        assert view["room"]["operator"] is False and all(n["stored"] % 10 == 0 and "score" not in n for n in view["nodes"])
        assert [(r["name"], r["challenge"], r["passed"]) for r in view["scoreboard"]] == [("Grace", "timing", True)]
        assert len(view["links"]) >= view["room"]["links_planned"] - 1  # Mallory's links may be refused by now
        assert not [n["name"] for n in view["nodes"] if n["blacklisted"] and n["name"] != "Mallory"]
        page = requests.get(f"{teacher.url}/classroom/projector", timeout=HTTP_TIMEOUT)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert json.loads((tmp_path / "Ada" / "classroom.json").read_text())["teacher_id"] == pin
    finally:
        for client in clients:
            client.close()
        for proc in started[::-1]:
            proc.stop()
