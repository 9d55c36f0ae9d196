"""The classroom roles (notebook 12), sans-IO: the teacher's `Classroom` and the student's `ClassroomMember`.

Every request goes through `Node.on_request`, as the drivers send it; the clock is a ManualClock and keys come from
the simulator's pool, so these tests are fast and exact. The room of real processes is in test_classroom_room.py.
"""
from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest

from bubble_ref.classroom import (
    ClassroomConfig, ClassroomMember, ProjectorPages, coarse_count, make_hello, make_result, open_student_node,
    open_teacher_node, room_layout, sign_twice)
from bubble_ref.ledger import MonitorConfig
from bubble_ref.node import Call, Request
from bubble_ref.packets import format_timestamp
from bubble_ref.sim import pool_keys
from bubble_ref.store import ManualClock

TEACHER_URL = "http://127.0.0.2:8000"
STATS = {"stored": 0, "relayed": 0, "received": 0, "blacklisted": [], "demo": []}
RULES = {"broadcast": lambda figures: figures.get("complete", 0) == figures.get("broadcasts", -1)}


class World:
    "A teacher's node on a ManualClock, and student keys from the simulator's pool."

    def __init__(self, root, url: str = TEACHER_URL, **room):
        self.clock = ManualClock()
        keys = iter(pool_keys())
        self.keys = keys
        self.node = open_teacher_node(root / "teacher", url=url, clock=self.clock, rng=random.Random(0),
                                      room=ClassroomConfig(**room), challenges=RULES,
                                      monitor=MonitorConfig(audit_interval=None), new_identity=lambda: next(keys))
        self.classroom = self.node.roles["classroom"]

    def student(self, name: str, host: int) -> dict:
        return {"name": name, "client": next(self.keys), "server": next(self.keys), "url": f"http://127.0.0.{host}:8000"}

    def hello(self, s: dict, *, at=None, name=None, url=None, stats=None, raw: bytes | None = None, remote="127.0.0.9"):
        body = raw if raw is not None else json.dumps(make_hello(
            s["client"], s["server"], name=name or s["name"], node_url=url or s["url"], stats=stats or STATS,
            at=at or self.clock())).encode()
        return self.node.on_request(Request("POST /classroom/hello", body, {}, remote))

    def post(self, route: str, body, token: str | None = None):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.node.on_request(Request(route, raw, {}, "127.0.0.9", token))

    def room(self, operator: bool = False) -> dict:
        reply = self.node.on_request(Request("GET /classroom", b"", {}, "127.0.0.9",
                                             self.node.operator_token if operator else None))
        assert reply.status == 200
        return reply.body


@pytest.fixture
def world(tmp_path):
    made = World(tmp_path)
    yield made
    made.node.close()


def refused(reply, status: int, code: str) -> str:
    assert reply.status == status, (reply.status, reply.body)
    assert set(reply.body) == {"error", "detail"} and reply.body["error"] == code, reply.body
    return reply.body["detail"]


def test_a_hello_admits_a_student_links_them_and_makes_their_node_a_peer(world):
    ada, grace, alan = world.student("Ada", 3), world.student("Grace", 4), world.student("Alan", 5)
    first = world.hello(ada)
    assert first.status == 200 and first.body["name"] == "Ada"
    assert [n["name"] for n in first.body["neighbours"]] == ["teacher"]  # nobody else to link to yet
    assert [a.url for a in first.actions if isinstance(a, Call)] == [f"{ada['url']}/status"]  # resolve her node
    assert world.hello(grace).body["neighbours"][1]["name"] == "Ada"
    third = world.hello(alan)
    assert {n["name"] for n in third.body["neighbours"]} == {"teacher", "Ada", "Grace"}  # student_links = 2
    assert set(world.classroom.neighbours(ada["client"].id)) == {grace["client"].id, alan["client"].id}
    assert set(world.node.roles["peers"].urls) == {ada["url"], grace["url"], alan["url"]}
    assert list(world.classroom.news)[-1].startswith("Alan joined (3 in the room)")


def test_joining_again_is_idempotent_and_a_replayed_hello_changes_nothing(world):
    ada = world.student("Ada", 3)
    world.hello(ada)
    captured = make_hello(ada["client"], ada["server"], name="Ada", node_url=ada["url"], stats=STATS, at=world.clock())
    world.clock.advance(timedelta(seconds=5))
    again = world.hello(ada, stats={**STATS, "stored": 42})  # the same keys a second time: a heartbeat, a rejoin
    assert again.status == 200 and again.actions == ()
    assert world.room(operator=True)["room"]["students"] == 1
    replay = world.post("POST /classroom/hello", captured)  # an eavesdropper replays the first hello
    assert replay.status == 200 and world.classroom.student(ada["client"].id)["sent_at"] > 0
    assert json.loads(world.classroom.student(ada["client"].id)["stats"])["stored"] == 42  # not rolled back
    world.clock.advance(timedelta(seconds=5))
    moved = world.hello(ada, url="http://127.0.0.3:8009")  # restarted on another port
    assert [a.url for a in moved.actions] == ["http://127.0.0.3:8009/status"]
    assert world.node.roles["peers"].urls == ("http://127.0.0.3:8009",)


def test_bad_hellos_get_4xx_json_errors_that_say_what_to_do(world):
    ada, mallory = world.student("Ada", 3), world.student("ADA", 4)
    world.hello(ada)
    assert "another --name" in refused(world.hello(mallory), 409, "name_taken")  # names compare case-folded
    assert refused(world.hello(world.student("teacher", 5)), 409, "name_taken")
    thief = {**world.student("Thief", 6), "server": ada["server"], "url": "http://127.0.0.6:8000"}
    refused(world.hello(thief), 409, "node_taken")  # signed by Ada's node key, but Ada's node is Ada's
    forged = make_hello(ada["client"], ada["server"], name="Ada", node_url=ada["url"], stats=STATS, at=world.clock())
    forged["stats"] = {**STATS, "stored": 999}
    refused(world.post("POST /classroom/hello", forged), 403, "bad_signature")
    half = dict(forged)
    half.pop("node_signature")
    refused(world.post("POST /classroom/hello", half), 400, "invalid_hello")
    refused(world.hello(ada, at=world.clock() - timedelta(hours=1)), 403, "stale_hello")
    assert "--host" in refused(world.hello(world.student("Eve", 7), url="http://10.1.2.3:8000"), 400, "bad_url")
    refused(world.hello(world.student("Eve", 7), url="http://203.0.113.5:8000"), 400, "bad_url")
    refused(world.hello(world.student("Eve", 7), url="file:///etc/passwd"), 400, "bad_url")
    refused(world.hello(world.student("Eve", 7), url=TEACHER_URL), 400, "bad_url")
    refused(world.hello(ada, raw=b"{not json"), 400, "invalid_hello")
    refused(world.hello(ada, raw=b"[]"), 400, "invalid_hello")
    assert "at most" in refused(world.hello(ada, raw=b" " * 9000), 400, "invalid_hello")
    refused(world.hello(world.student("Bad\u202eName", 7)), 400, "invalid_hello")  # a text-direction trick
    refused(world.hello(world.student("x" * 40, 7)), 400, "invalid_hello")
    assert world.room(operator=True)["room"]["students"] == 1


def test_one_machine_one_voice_a_full_room_and_a_flood_of_hellos_are_refused(tmp_path):
    world = World(tmp_path, max_students=3, per_address=2, hellos_per_minute=3)
    try:
        a1, a2, a3 = (world.student(f"a{i}", 3) for i in range(3))  # three nodes on one machine (127.0.0.3)
        assert world.hello(a1).status == world.hello(a2).status == 200
        refused(world.hello(a3), 403, "too_many_from_address")
        assert world.hello(world.student("b", 4)).status == 200
        refused(world.hello(world.student("c", 5)), 403, "room_full")
        for _ in range(2):
            world.clock.advance(timedelta(seconds=1))
            assert world.hello(a1).status == 200  # a1's second and third hello this minute: within 3
        world.clock.advance(timedelta(seconds=1))
        refused(world.hello(a1), 429, "rate_limited")
        world.clock.advance(timedelta(minutes=1))
        assert world.hello(a1).status == 200
    finally:
        world.node.close()


def test_on_a_network_a_hello_comes_from_the_address_of_its_node(tmp_path):
    "One laptop cannot claim the addresses of machines that are not there (to get more votes, or aim the room)."
    world = World(tmp_path, url="http://192.168.1.10:8000", per_address=2)
    try:
        at = lambda name, url: {**world.student(name, 3), "url": url}
        assert world.hello(at("Ada", "http://192.168.1.20:8001"), remote="192.168.1.20").status == 200
        detail = refused(world.hello(at("Sybil", "http://192.168.1.31:8001"), remote="192.168.1.20"), 400, "bad_url")
        assert "came from 192.168.1.20" in detail and "--host 192.168.1.20" in detail
        assert world.hello(at("Bob", "http://192.168.1.20:8002"), remote="192.168.1.20").status == 200
        refused(world.hello(at("Eve", "http://192.168.1.20:8003"), remote="192.168.1.20"), 403, "too_many_from_address")
        assert world.room(operator=True)["room"]["students"] == 2
    finally:
        world.node.close()


def test_one_address_gets_a_laptops_share_of_requests_counted_before_any_parsing(tmp_path):
    world = World(tmp_path, url="http://192.168.1.10:8000", per_address=2, hellos_per_minute=3, results_per_minute=1)
    try:
        ada = {**world.student("Ada", 3), "url": "http://192.168.1.20:8001"}
        junk = [world.hello(ada, raw=b"{not json", remote="192.168.1.20").status for _ in range(8)]
        assert junk == [400] * 8  # 2 laptops' share: 2 * (3 hellos + 1 result) a minute
        refused(world.hello(ada, remote="192.168.1.20"), 429, "rate_limited")
        result = make_result(ada["client"], "broadcast", True, {}, world.clock())
        assert "192.168.1.20" in refused(world.node.on_request(Request(
            "POST /classroom/results", json.dumps(result).encode(), {}, "192.168.1.20")), 429, "rate_limited")
        assert world.hello({**world.student("Bob", 4), "url": "http://192.168.1.21:8001"},
                           remote="192.168.1.21").status == 200  # another laptop is not slowed down
        world.clock.advance(timedelta(minutes=1))
        assert world.hello(ada, remote="192.168.1.20").status == 200
    finally:
        world.node.close()


def test_results_are_taken_only_signed_by_a_student_of_the_room_and_judged_by_the_rooms_rule(world):
    ada = world.student("Ada", 3)
    world.hello(ada)
    good = {"broadcasts": 180, "complete": 180}
    answer = world.post("POST /classroom/results", make_result(ada["client"], "broadcast", True, good, world.clock()))
    assert answer.status == 202 and answer.body == {"challenge": "broadcast", "passed": True, "claimed": True}
    lie = world.post("POST /classroom/results",  # claims a pass with figures that do not make one
                     make_result(ada["client"], "broadcast", True, {"broadcasts": 180, "complete": 2}, world.clock()))
    assert lie.status == 202 and lie.body["passed"] is False
    board = world.room()["scoreboard"]
    assert [(r["name"], r["challenge"], r["passed"]) for r in board] == [("Ada", "broadcast", True)]  # the best stays
    unsigned = {k: v for k, v in make_result(ada["client"], "broadcast", True, good, world.clock()).items()
                if k != "signature"}
    refused(world.post("POST /classroom/results", unsigned), 400, "invalid_result")
    refused(world.post("POST /classroom/results", make_result(next(world.keys), "broadcast", True, good,
                                                                world.clock())), 403, "unknown_student")
    tampered = {**make_result(ada["client"], "broadcast", False, good, world.clock()), "passed": True}
    refused(world.post("POST /classroom/results", tampered), 403, "bad_signature")
    refused(world.post("POST /classroom/results", make_result(ada["client"], "chess", True, good, world.clock())),
            400, "unknown_challenge")
    refused(world.post("POST /classroom/results", make_result(ada["client"], "broadcast", True, good,
                                                                world.clock() - timedelta(hours=1))), 403,
            "stale_result")
    refused(world.post("POST /classroom/results", make_result(ada["client"], "broadcast", True,
                                                                {f"k{i}": i for i in range(17)}, world.clock())),
            400, "invalid_result")
    refused(world.post("POST /classroom/results", b"{" * 9000), 400, "invalid_result")
    codes = [world.post("POST /classroom/results", make_result(ada["client"], "broadcast", True, good,
                                                                 world.clock())).status for _ in range(6)]
    assert codes[:4] == [202] * 4 and codes[4:] == [429, 429]  # 6 a minute, two were taken above


def test_the_public_view_is_coarse_and_the_teachers_token_sees_exact_counts(world):
    ada = world.student("Ada", 3)
    world.hello(ada, stats={**STATS, "stored": 47, "relayed": 3})
    public, exact = world.room(), world.room(operator=True)
    her = lambda view: next(n for n in view["nodes"] if n["name"] == "Ada")
    assert (her(public)["stored"], her(public)["relayed"]) == (40, 0) and "score" not in her(public)
    assert (her(exact)["stored"], her(exact)["relayed"]) == (47, 3) and her(exact)["score"] == 1.0
    assert public["room"]["operator"] is False and exact["room"]["operator"] is True
    assert her(public)["card"] == ada["client"].public.b64  # the roster is the room's phone book
    assert her(public)["status"] == "joining"  # the teacher's node has not reached her node yet
    world.clock.advance(timedelta(seconds=5))
    world.hello(ada, stats={**STATS, "stored": 99})
    assert her(world.room())["stored"] == 40  # the public view is at most public_refresh (10 s) old
    world.clock.advance(timedelta(seconds=10))
    assert her(world.room())["stored"] == 90
    world.clock.advance(timedelta(seconds=30))
    assert her(world.room())["status"] == "away"
    assert [coarse_count(n) for n in (0, 9, 10, 123)] == [0, 0, 10, 120]
    assert room_layout(3) == [(0.0, 0.0), (0.0, 1.0), (0.0, -1.0)]


def test_demo_floods_are_the_teachers_and_go_to_a_here_students_node(world):
    ada = world.student("Ada", 3)
    refused(world.post("POST /classroom/demo", {}), 401, "operator_only")
    alone = world.post("POST /classroom/demo", {}, token=world.node.operator_token)
    assert alone.status == 202 and alone.body["from"] == "teacher"  # nobody here: posted at the teacher's node
    world.hello(ada)
    handed = world.post("POST /classroom/demo", {"from": "ada"}, token=world.node.operator_token)
    assert handed.status == 202 and handed.body["from"] == "Ada"
    assert [(a.method, a.url) for a in handed.actions] == [("POST", f"{ada['url']}/messages")]
    refused(world.post("POST /classroom/demo", {"from": "Nobody"}, token=world.node.operator_token), 404, "not_found")
    world.hello(ada, stats={**STATS, "demo": [{"packet_id": handed.body["packet_id"], "from": "", "hops": 0,
                                               "at_ms": 1}]}, at=world.clock() + timedelta(seconds=1))
    flood = world.room(operator=True)["flood"]
    assert flood["packet_id"] == handed.body["packet_id"] and flood["reached"] == 1
    assert flood["arrivals"][0]["node"] == ada["server"].id and flood["arrivals"][0]["hops"] == 0


def test_a_member_says_hello_links_to_its_neighbours_and_catches_up_after_a_sleep(tmp_path):
    clock, keys = ManualClock(), iter(pool_keys()[20:])
    teacher_key = next(keys)
    status = {"server_id": teacher_key.id, "public_key": teacher_key.public.b64}
    node = open_student_node(tmp_path / "ada", url="http://127.0.0.3:8000", teacher_url=TEACHER_URL, student="Ada",
                             client=next(keys), clock=clock, rng=random.Random(0), teacher_status=status,
                             monitor=MonitorConfig(audit_interval=None), new_identity=lambda: next(keys))
    try:
        member: ClassroomMember = node.roles["member"]
        assert node.roles["peers"].peer_at(TEACHER_URL).server_id == teacher_key.id  # pinned before any request
        hello = member.start()[0]
        assert hello.url == f"{TEACHER_URL}/classroom/hello" and hello.body["name"] == "Ada"
        demo = next(keys)
        answer = {"room": "r", "name": "Ada", "demo_key": demo.public.b64, "hello_every": 5.0,
                  "neighbours": [{"name": "teacher", "url": TEACHER_URL, "server_id": teacher_key.id},
                                 {"name": "Grace", "url": "http://127.0.0.4:8000/", "server_id": "0" * 64},
                                 {"name": "Eve", "url": "http://8.8.8.8:53", "server_id": "1" * 64}]}
        actions = member.on_answer(("member", "hello"), 200, answer)
        assert member.joined and member.problem is None and member.demo_id == demo.id
        assert node.roles["peers"].urls == (TEACHER_URL, "http://127.0.0.4:8000")  # not the public address
        assert [a.url for a in actions if isinstance(a, Call)] == ["http://127.0.0.4:8000/status"]
        member.on_answer(("member", "hello"), 409, {"error": "name_taken", "detail": "choose another name"})
        assert "choose another name" in member.problem
        member.on_answer(("member", "hello"), None, None)
        assert "does not answer" in member.problem
        clock.advance(timedelta(seconds=5))
        assert [type(a).__name__ for a in member.on_timer(("member", "hello"))] == ["Call"]  # on time: just a hello
        member.on_answer(("member", "hello"), 200, answer)
        clock.advance(timedelta(minutes=10))  # the laptop slept
        woke = member.on_timer(("member", "hello"))
        assert [a.url.rsplit("/", 1)[1] for a in woke if isinstance(a, Call)][-1] == "hello"
        assert any(a.url == f"{TEACHER_URL}/sync" for a in woke if isinstance(a, Call))  # catches up at once
    finally:
        node.close()


def test_the_hello_is_signed_by_both_keys_over_the_same_bytes(world):
    client, server = next(world.keys), next(world.keys)
    body = sign_twice(client, server, {"type": "x", "sent_at": format_timestamp(world.clock())})
    assert body["signature"] != body["node_signature"]
    from bubble_ref.mesh import verify_body

    unsigned = {k: v for k, v in body.items() if k not in ("signature", "node_signature")}
    assert verify_body(client.public, {**unsigned, "signature": body["signature"]})
    assert verify_body(server.public, {**unsigned, "signature": body["node_signature"]})
    assert not verify_body(server.public, {**unsigned, "signature": body["signature"]})


def test_the_projector_pages_are_static_with_a_strict_policy_and_everything_else_passes_through():
    seen = []

    def node_app(environ, start_response):
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    app, answers = ProjectorPages(node_app), {}

    def call(path, method="GET"):
        def start_response(status, headers):
            answers[path, method] = (status, dict(headers))
        body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method}, start_response))
        return answers[path, method], body

    (status, headers), body = call("/classroom/projector")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/html") and b'<svg id="mesh"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"] and "unsafe" not in headers["Content-Security-Policy"]
    assert b"textContent" in call("/classroom/projector.js")[1] and b"innerHTML" not in call("/classroom/projector.js")[1]
    (status, headers), body = call("/classroom/projector", "POST")
    assert status.startswith("405") and json.loads(body)["error"] == "method_not_allowed"
    assert call("/classroom/projector", "HEAD")[1] == b""
    call("/classroom")
    assert seen == ["/classroom"]


def test_a_students_name_is_drawn_as_text_never_as_a_formula(world):
    "Names are the students' own: `$\\frac{$` once made matplotlib's mathtext fail, and the teacher's dashboard with it."
    from bubble_ref.classroom import draw_room, figure_png

    for i, name in enumerate(["$\\frac{$", "$x$", "a$b", "\\$"]):
        assert world.hello(world.student(name, 3 + i)).status == 200
    world.node.roles["classroom"]._public = None
    for operator in (False, True):
        data = world.room(operator=operator)
        figure = draw_room(data)
        assert figure_png(figure)[:4] == b"\x89PNG"
        drawn = {t.get_text() for ax in figure.axes for t in ax.texts}
        assert "\\$\\frac{\\$" in {t.split(" (")[0] for t in drawn}  # the dollar signs escaped: shown as typed
        ticks = [t.get_text() for t in figure.axes[1].get_yticklabels()]
        assert sorted(ticks[1:]) == sorted(["\\$\\frac{\\$", "\\$x\\$", "a\\$b", "\\\\$"])


def test_a_member_reports_only_the_teachers_demo_packets_however_many_others_come(tmp_path):
    "The demo key is public: a prankster's stream of packets to it must not hide the teacher's demo from the room."
    from types import SimpleNamespace

    clock, keys = ManualClock(), iter(pool_keys()[40:])
    teacher_key, demo = next(keys), next(keys)
    node = open_student_node(tmp_path / "ada", url="http://127.0.0.3:8000", teacher_url=TEACHER_URL, student="Ada",
                             client=next(keys), clock=clock, rng=random.Random(0),
                             teacher_status={"server_id": teacher_key.id, "public_key": teacher_key.public.b64},
                             monitor=MonitorConfig(audit_interval=None), new_identity=lambda: next(keys))
    try:
        member: ClassroomMember = node.roles["member"]
        answer = lambda wanted: {"room": "r", "name": "Ada", "demo_key": demo.public.b64, "hello_every": 5.0,
                                 "neighbours": [], "demo_packets": wanted}
        member.on_answer(("member", "hello"), 200, answer([]))

        def arrive(packet_id: str, hops: int) -> None:  # what PacketStored carries that the member reads
            member.spot_demo(SimpleNamespace(created=True, came_from="", hops=hops, row=SimpleNamespace(
                recipient_id=demo.id, packet_id=packet_id, received_at=clock())))
        ours = "a" * 64
        arrive(ours, 2)
        for i in range(300):  # the prankster's stream, after the teacher's packet
            arrive(f"{i:064x}", 0)
        assert member.stats()["demo"] == []  # nothing named yet: nothing reported
        member.on_answer(("member", "hello"), 200, answer([ours, "junk", 7]))
        assert member.demo_wanted == (ours,)
        assert member.stats()["demo"] == []  # 300 others came after ours: the newest 256 are kept, ours is gone
        arrive(ours, 3)  # ... so a member must see the teacher's packet among the newest 256 to report it
        assert [(d["packet_id"], d["hops"]) for d in member.stats()["demo"]] == [(ours, 3)]
        for i in range(100):
            arrive(f"{i + 1000:064x}", 0)
        assert [d["packet_id"] for d in member.stats()["demo"]] == [ours]  # 100 more do not push it out
        assert len(member.demo_seen) == 256
    finally:
        node.close()


CLASSROOM_DRIVERS = {  # the functions of bubble_ref.classroom that serve, wait, or talk to the network
    "_fast_keys", "start_room", "add_student", "wait_for", "fetch_room", "Dashboard", "lan_address", "DataDirLock",
    "serve_until_stopped", "run_classroom_command", "student_key", "open_student", "check_teacher",
    "run_join_command", "_join"}


def test_the_classroom_roles_do_no_io_and_read_no_clock_of_their_own():
    "Classroom and ClassroomMember are roles like the node's (sans-IO): only the named drivers may do I/O."
    import ast
    import inspect

    from bubble_ref import classroom
    from test_sans_io import sans_io_violations

    source = inspect.getsource(classroom)
    assert sans_io_violations(source, CLASSROOM_DRIVERS) == []
    top = {n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert CLASSROOM_DRIVERS <= top and sans_io_violations(source) != []  # the exceptions are real


def test_the_teachers_exact_view_never_reaches_a_visitor(world):
    "The public view is cached; the operator's is not: asking as the teacher first must not fill the public cache."
    ada = world.student("Ada", 3)
    world.hello(ada, stats={**STATS, "stored": 47, "relayed": 13, "received": 5})
    exact = world.room(operator=True)
    assert exact["room"]["operator"] is True and "score" in exact["nodes"][1]
    for token in (None, "0" * 64, world.node.operator_token[:-1] + "x"):  # no token, a wrong one, nearly right
        reply = world.node.on_request(Request("GET /classroom", b"", {}, "127.0.0.9", token))
        view = reply.body
        assert reply.status == 200 and view["room"]["operator"] is False
        assert all("score" not in n for n in view["nodes"])
        assert [(n["stored"], n["relayed"], n["received"]) for n in view["nodes"]][1] == (40, 10, 0)
        assert view["room"]["refreshed_every"] == 10.0

