"""One OpenAPI document for every route (issue 16): the node's route table, the schema files, the error table in
PROTOCOL.md, and real answers of real node processes all agree with it."""
from __future__ import annotations

import base64
import copy
import json
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
import requests
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from bubble_ref.audit import sign_report
from bubble_ref.ballot import open_monitored_node
from bubble_ref.calls import TurnConfig, TurnCredentials
from bubble_ref.crypto import Identity
from bubble_ref.envelope import check_packet, make_retrieval_proof, seal
from bubble_ref.mesh import sign_body, sign_relay
from bubble_ref.node import PROTOCOL_VERSION, open_relay_node
from bubble_ref.packets import QuorumDecision, SyncFetch, SyncRequest, Vote, VoteRequest, format_checker, format_timestamp, load_schema
from bubble_ref.relay import HTTP_ERROR_CODES, create_app, start_server
from bubble_ref.spec import ANY_ROUTE_ERRORS, COMPONENTS, ERRORS, OPERATIONS, component_schema, error_table, openapi_document
from bubble_ref.store import ManualClock

from nodes import HTTP_TIMEOUT, JSON, Launcher, wait_until

ROOT = Path(__file__).parent.parent
HTTP_METHODS = {"get", "put", "post", "delete", "patch"}
TURN = TurnConfig(uris=("turns:127.0.0.1:5349?transport=tcp",), secret=b"0123456789abcdef")


def full_node(folder: Path):
    "What `bubble-ref node --turn-url …` runs: the monitored node and the calls role."
    node = open_monitored_node(folder, clock=ManualClock(), rng=random.Random(0))
    node.add(TurnCredentials(node, TURN))
    return node


def openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def served_operations(app) -> set[str]:
    return {f"{m} {openapi_path(r.rule)}" for r in app.url_map.iter_rules()
            if r.endpoint != "static" for m in r.methods - {"HEAD", "OPTIONS"}}


def documented_operations(document: dict, group: str | None = None) -> set[str]:
    return {f"{m.upper()} {path}" for path, item in document["paths"].items() for m, op in item.items()
            if m in HTTP_METHODS and (group is None or group in op["tags"])}


# ------------------------------------------------------------------ the document and the route table

def test_the_document_covers_exactly_the_routes_of_the_full_node(tmp_path):
    node = full_node(tmp_path / "full")
    try:
        assert served_operations(create_app(node, node.on_request)) == documented_operations(openapi_document())
    finally:
        node.close()


def test_a_relay_node_serves_exactly_the_client_group(tmp_path):
    node = open_relay_node(tmp_path / "relay", clock=ManualClock(), rng=random.Random(0))
    try:
        assert served_operations(create_app(node, node.on_request)) == documented_operations(openapi_document(), "client")
    finally:
        node.close()


def test_the_document_is_valid_openapi_3_1_with_a_response_schema_for_every_success():
    document = openapi_document()
    validate(document)
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            success = [s for s in op["responses"] if s.startswith("2")]
            assert len(success) == 1, (path, method)
            schema = op["responses"][success[0]]["content"]["application/json"]["schema"]
            assert "$ref" in schema or path == "/openapi.json", (path, method)
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}


def test_every_schema_file_is_valid_and_used():
    files = {p.stem for p in (ROOT / "bubble_ref" / "schemas").glob("*.json")}
    for name in files:
        jsonschema.Draft202012Validator.check_schema(load_schema(name))
    inner = {"common", "inner_message", "encrypted_signature", "signed_message", "audit_evidence"}  # not on a route
    assert set(COMPONENTS) == files - inner
    components = openapi_document()["components"]["schemas"]
    for name, component in COMPONENTS.items():
        assert components[component] == component_schema(name)
        assert "common.json" not in json.dumps(components[component]), "shared definitions are inlined"


def test_the_catalog_names_only_known_errors_and_every_status_is_documented():
    document = openapi_document()
    for op in OPERATIONS:
        responses = document["paths"][op.path][op.method.lower()]["responses"]
        for code in op.errors:
            assert code in ERRORS and str(ERRORS[code].status) in responses, (op.operation_id, code)
    assert set(ANY_ROUTE_ERRORS) <= set(ERRORS)
    assert set(HTTP_ERROR_CODES.values()) <= set(ERRORS)


EXTENSION_MODULES = ("classroom.py", "challenges.py")  # notebooks 12 and 12b: not the protocol (PROTOCOL §20)


def codes_raised_in(modules) -> set[str]:
    "The error codes the package's `modules` (file names in bubble_ref/) raise as NodeError (or refuse) answers."
    source = "\n".join((ROOT / "bubble_ref" / name).read_text("utf-8") for name in modules)
    return set(re.findall(r'(?:NodeError|refuse)\(\s*\d{3},\s*f?"([a-z_]+)(?:\{|")', source))


def test_every_error_code_in_the_code_is_in_the_table():
    "The table is complete: every NodeError the package can raise names a code the table defines."
    # (an extension's own routes and codes are documented with it: the classroom's in docs/workshop.md, below)
    extensions = {"_modidx.py", *EXTENSION_MODULES}
    raised = codes_raised_in(p.name for p in (ROOT / "bubble_ref").glob("*.py") if p.name not in extensions)
    raised |= {"internal_error", "http_error"}
    stale = {c for c in ERRORS if c.startswith("stale_")}
    raised = {c for c in raised if c != "stale_"} | (stale if "stale_" in raised else set())
    # codes refused by roles while talking to other servers (bad_peer, peer_key_changed, bad_server_list) never go
    # out as an answer: they end a call the node made itself
    outgoing_only = {"bad_peer", "peer_key_changed", "bad_server_list"}
    assert raised - outgoing_only <= set(ERRORS), raised - outgoing_only - set(ERRORS)
    assert set(ERRORS) - {"bad_request", "not_found", "method_not_allowed", "too_large", "unsupported_media_type",
                          "http_error", "internal_error"} <= raised


def test_every_error_code_the_classroom_can_answer_is_in_the_teachers_guide():
    "An extension documents its own codes (PROTOCOL §20): docs/workshop.md's table says what each means and what to do."
    codes = codes_raised_in(EXTENSION_MODULES) - {"invalid_"}  # f"invalid_{what}": one per parse_signed(what) call
    source = "\n".join((ROOT / "bubble_ref" / name).read_text("utf-8") for name in EXTENSION_MODULES)
    codes |= {f"invalid_{name.split()[-1]}" for name in re.findall(r'parse_signed\(\s*"([a-z ]+)"', source)}
    assert {"invalid_hello", "invalid_result", "unknown_student", "room_full"} <= codes, "the search finds them"
    guide = (ROOT / "docs" / "workshop.md").read_text("utf-8")
    assert sorted(c for c in codes if f"`{c}`" not in guide) == []


def test_protocol_md_holds_the_error_table_exactly():
    text = (ROOT / "PROTOCOL.md").read_text("utf-8")
    assert error_table() in text, "PROTOCOL.md §21 must hold spec.error_table() verbatim (paste it from the notebook)"


def test_the_status_schema_requires_the_protocol_version():
    assert "protocol" in load_schema("status")["required"] and re.fullmatch(r"\d+\.\d+", PROTOCOL_VERSION)


# ------------------------------------------------------------------ real answers, validated against the document

def strict(document: dict) -> dict:
    "The document with every object schema closed: a field the node sends must be one the document declares."
    document = copy.deepcopy(document)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and "propertyNames" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)
    close(document["components"]["schemas"])
    return document


class Checker:
    "Validates answers against the document's response schema for (path, method, status)."

    def __init__(self):
        self.document = strict(openapi_document())
        self.registry = Registry().with_resource("urn:openapi", Resource.from_contents(
            self.document, default_specification=DRAFT202012))
        self.seen: set[tuple[str, str, str]] = set()

    def __call__(self, path: str, method: str, response: requests.Response, status: int, error: str | None = None):
        assert response.status_code == status, (method, path, response.status_code, response.text[:300])
        assert response.headers["Content-Type"].split(";")[0] == "application/json"
        responses = self.document["paths"][path][method.lower()]["responses"]
        key = str(status) if str(status) in responses else "default"
        pointer = "/".join(p.replace("~", "~0").replace("/", "~1")
                           for p in ("paths", path, method.lower(), "responses", key, "content", "application/json",
                                     "schema"))
        validator = jsonschema.Draft202012Validator({"$ref": f"urn:openapi#/{pointer}"}, registry=self.registry,
                                                    format_checker=format_checker())
        body = response.json()
        validator.validate(body)
        if error is not None:
            assert body["error"] == error and error in self.document["paths"][path][method.lower()]["responses"][
                str(status)]["description"], (path, method, body)
        self.seen.add((method.upper(), path, str(status)))
        return body


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("openapi-mesh"))
    procs = launcher.line("AB", "--audit-interval", "0")
    try:
        for proc in procs.values():
            launcher.started.append(proc)
            proc.start()
        for proc in procs.values():
            wait_until(lambda p=proc: p.status()["known_peers"] == 1, f"{proc.name} to pin its peer")
        yield procs
    finally:
        for proc in launcher.started:
            proc.stop()


def test_every_route_of_a_real_node_answers_as_documented(mesh, tmp_path):
    a, b = mesh["A"], mesh["B"]
    check = Checker()
    alice, bob, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    a_key, b_id = a.server_key(), b.status()["server_id"]
    now = lambda: datetime.now(timezone.utc)

    # client group
    status = check("/status", "GET", requests.get(f"{a.url}/status", timeout=HTTP_TIMEOUT), 200)
    assert status["protocol"] == PROTOCOL_VERSION and "stored_messages" not in status
    check("/status", "GET", requests.get(f"{a.url}/status", headers=a.operator_headers(), timeout=HTTP_TIMEOUT), 200)
    check("/openapi.json", "GET", requests.get(f"{a.url}/openapi.json", timeout=HTTP_TIMEOUT), 200)
    packet = seal(alice, bob.public, "hello, documented world")
    posted = check("/messages", "POST", requests.post(f"{a.url}/messages", json=packet.to_dict(), timeout=HTTP_TIMEOUT), 202)
    check("/messages", "POST", requests.post(f"{a.url}/messages", json={"recipient": "x"}, timeout=HTTP_TIMEOUT),
          400, "invalid_packet")
    check("/messages", "POST", requests.post(f"{a.url}/messages", data=b"{}", timeout=HTTP_TIMEOUT), 415,
          "unsupported_media_type")
    check("/messages", "POST", requests.post(f"{a.url}/messages", data=b" " * 200_000, headers=JSON,
                                             timeout=HTTP_TIMEOUT), 413, "too_large")
    a_id = status["server_id"]
    wait_until(lambda: requests.post(f"{b.url}/messages/retrieve", json=make_retrieval_proof(
        bob, server_id=b_id).to_dict(), timeout=HTTP_TIMEOUT).json()["messages"], "the packet to reach B")
    for path, method in (("/messages", "GET"), ("/messages/retrieve", "POST")):
        proof = make_retrieval_proof(bob, server_id=a_id).to_dict()
        page = check(path, method, requests.request(method, f"{a.url}{path}", json=proof, timeout=HTTP_TIMEOUT), 200)
        assert [m["packet_id"] for m in page["messages"]] == [posted["packet_id"]]
        check(path, method, requests.request(method, f"{a.url}{path}", json=proof, timeout=HTTP_TIMEOUT), 401,
              "proof_replayed")
        check(path, method, requests.request(method, f"{a.url}{path}", json=make_retrieval_proof(
            bob, server_id=b_id).to_dict(), timeout=HTTP_TIMEOUT), 401, "bad_proof")
        stale = make_retrieval_proof(bob, server_id=a_id, clock=lambda: now() - timedelta(minutes=5)).to_dict()
        check(path, method, requests.request(method, f"{a.url}{path}", json=stale, timeout=HTTP_TIMEOUT), 401,
              "proof_expired")

    # server group: A's own key signs requests to B, as A's node does
    server_list = check("/servers", "POST", requests.post(f"{b.url}/servers", json={
        "type": "server_list_request", "requester_id": alice.id, "timestamp": format_timestamp(now())},
        timeout=HTTP_TIMEOUT), 200)
    assert server_list["responder_id"] == b_id
    fresh = seal(alice, bob.public, "relayed by hand")
    relay = sign_relay(a_key, fresh.to_dict(), check_packet(fresh).id, now() + timedelta(days=7), 1, now())
    check("/relay", "POST", requests.post(f"{b.url}/relay", json=relay, timeout=HTTP_TIMEOUT), 202)
    expired = sign_relay(a_key, fresh.to_dict(), check_packet(fresh).id, now() - timedelta(seconds=1), 1, now())
    check("/relay", "POST", requests.post(f"{b.url}/relay", json=expired, timeout=HTTP_TIMEOUT), 202)
    check("/relay", "POST", requests.post(f"{b.url}/relay", json=sign_relay(
        stranger, fresh.to_dict(), check_packet(fresh).id, now() + timedelta(days=1), 1, now()) | {
        "sender_id": stranger.id}, timeout=HTTP_TIMEOUT), 403, "unknown_server")
    check("/relay", "POST", requests.post(f"{b.url}/relay", json=sign_relay(
        a_key, fresh.to_dict(), check_packet(fresh).id, now() + timedelta(days=1), 1, now() - timedelta(minutes=6)),
        timeout=HTTP_TIMEOUT), 403, "stale_request")
    check("/relay", "POST", requests.post(f"{b.url}/relay", json={**relay, "hops": 2}, timeout=HTTP_TIMEOUT), 403,
          "bad_signature")
    check("/relay", "POST", requests.post(f"{b.url}/relay", json=sign_relay(
        a_key, fresh.to_dict(), check_packet(fresh).id, now() + timedelta(days=1), 17, now()), timeout=HTTP_TIMEOUT),
        400, "hop_limit")
    sync = sign_body(a_key, SyncRequest(since="", sender_id=a_key.id, sent_at=format_timestamp(now())).to_dict())
    page = check("/sync", "POST", requests.post(f"{b.url}/sync", json=sync, timeout=HTTP_TIMEOUT), 200)
    assert page["packets"]
    check("/sync", "POST", requests.post(f"{b.url}/sync", json={**sync, "since": "x"}, timeout=HTTP_TIMEOUT), 400,
          "invalid_packet")
    ids = check("/sync/ids", "POST", requests.post(f"{b.url}/sync/ids", json=sync, timeout=HTTP_TIMEOUT), 200)
    assert [i["packet_id"] for i in ids["ids"]] == [p["packet_id"] for p in page["packets"]]
    fetch = sign_body(a_key, SyncFetch(ids=(ids["ids"][0]["packet_id"],), sender_id=a_key.id,
                                       sent_at=format_timestamp(now())).to_dict())
    fetched = check("/sync/fetch", "POST", requests.post(f"{b.url}/sync/fetch", json=fetch, timeout=HTTP_TIMEOUT), 200)
    assert fetched["packets"] == page["packets"][:1]
    check("/sync/fetch", "POST", requests.post(f"{b.url}/sync/fetch", json={**fetch, "ids": []}, timeout=HTTP_TIMEOUT),
          400, "invalid_packet")

    # operator group
    trace_path = "/trace/{packet_id}"
    check(trace_path, "GET", requests.get(f"{b.url}/trace/{posted['packet_id']}", timeout=HTTP_TIMEOUT), 401,
          "operator_only")
    trace = check(trace_path, "GET", requests.get(f"{b.url}/trace/{posted['packet_id']}", headers=b.operator_headers(),
                                                  timeout=HTTP_TIMEOUT), 200)
    assert trace["from"] == a_id and trace["hops"] == 1
    check(trace_path, "GET", requests.get(f"{b.url}/trace/{'ab' * 32}", headers=b.operator_headers(),
                                          timeout=HTTP_TIMEOUT), 404, "not_found")

    # monitoring group
    check("/reputation", "GET", requests.get(f"{b.url}/reputation", timeout=HTTP_TIMEOUT), 200)
    check("/reputation", "GET", requests.get(f"{b.url}/reputation", headers=b.operator_headers(),
                                             timeout=HTTP_TIMEOUT), 200)
    report = sign_report(alice, a_id, b"seen nothing", now())
    check("/reports", "POST", requests.post(f"{b.url}/reports", json=report, timeout=HTTP_TIMEOUT), 202)
    unsigned = {k: v for k, v in report.items() if k not in ("signature", "public_key")}
    check("/reports", "POST", requests.post(f"{b.url}/reports", json=unsigned, timeout=HTTP_TIMEOUT), 400,
          "unsigned_report")
    ask = sign_body(a_key, VoteRequest(reported_server_id=stranger.id, proposal="blacklisted", sender_id=a_key.id,
                                       sent_at=format_timestamp(now())).to_dict())
    vote = check("/votes", "POST", requests.post(f"{b.url}/votes", json=ask, timeout=HTTP_TIMEOUT), 200)
    assert vote["voter_id"] == b_id
    foreign = sign_body(stranger, {**{k: v for k, v in ask.items() if k != "signature"}, "sender_id": stranger.id})
    check("/votes", "POST", requests.post(f"{b.url}/votes", json=foreign, timeout=HTTP_TIMEOUT), 403, "unknown_server")
    lone = sign_body(stranger, Vote(voter_id=stranger.id, reported_server_id=a_id, vote="blacklist",
                                    timestamp=format_timestamp(now())).to_dict())
    decision = QuorumDecision(reported_server_id=a_id, votes={stranger.id: "blacklist"}, final_decision="blacklisted",
                              timestamp=format_timestamp(now()), signed_votes=(lone,)).to_dict()
    check("/decisions", "POST", requests.post(f"{b.url}/decisions", json=decision, timeout=HTTP_TIMEOUT), 403,
          "no_majority")
    check("/decisions", "POST", requests.post(f"{b.url}/decisions", json={
        k: v for k, v in decision.items() if k != "signed_votes"}, timeout=HTTP_TIMEOUT), 400, "unsigned_decision")
    # A's quorum base, when B is the accused, is A alone: A's own signed whitelist vote carries a (harmless) decision.
    # B answers the same decision about itself, but never applies it (PROTOCOL §18).
    whitelist = sign_body(a_key, Vote(voter_id=a_key.id, reported_server_id=b_id, vote="whitelist",
                                      timestamp=format_timestamp(now())).to_dict())
    about_b = QuorumDecision(reported_server_id=b_id, votes={a_key.id: "whitelist"}, final_decision="whitelisted",
                             timestamp=format_timestamp(now()), signed_votes=(whitelist,)).to_dict()
    decided = check("/decisions", "POST", requests.post(f"{a.url}/decisions", json=about_b, timeout=HTTP_TIMEOUT), 200)
    assert decided == {"reported_server_id": b_id, "final_decision": "whitelisted", "applied": True}
    itself = check("/decisions", "POST", requests.post(f"{b.url}/decisions", json=about_b, timeout=HTTP_TIMEOUT), 200)
    assert itself == {"reported_server_id": b_id, "final_decision": "whitelisted", "applied": False}

    # any route
    for method, path, status, code in (("DELETE", "/messages", 405, "method_not_allowed"),
                                       ("GET", "/nowhere", 404, "not_found")):
        response = requests.request(method, f"{a.url}{path}", timeout=HTTP_TIMEOUT)
        assert response.status_code == status and response.json()["error"] == code
        jsonschema.validate(response.json(), component_schema("error"))

    answered = {(m, p) for m, p, s in check.seen if s.startswith("2")}
    expected = {(op.method, op.path) for op in OPERATIONS if op.group != "calls"}
    assert answered == expected, expected - answered


def test_turn_credentials_answer_as_documented(tmp_path):
    "The calls group, on an in-process node with the calls role (a real TURN server is not needed to answer)."
    from bubble_ref.packets import system_clock

    node = open_relay_node(tmp_path / "turn", clock=system_clock, rng=random.Random())
    node.add(TurnCredentials(node, TURN))
    running = start_server(node)
    try:
        check = Checker()
        bob = Identity.generate()
        body = check("/turn-credentials", "GET", requests.get(f"{running.url}/turn-credentials", json=make_retrieval_proof(
            bob, server_id=node.id).to_dict(), timeout=HTTP_TIMEOUT), 200)
        assert body["uris"] == list(TURN.uris)
        check("/turn-credentials", "GET", requests.get(f"{running.url}/turn-credentials", json={"public_key": "x"},
                                                       timeout=HTTP_TIMEOUT), 400, "invalid_packet")
    finally:
        running.stop()
