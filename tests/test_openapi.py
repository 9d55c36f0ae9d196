"""The relay's OpenAPI document: valid OpenAPI 3.1, served at /openapi.json, and true to the Flask routes."""
from __future__ import annotations

import random
import re

import pytest
import requests
from openapi_spec_validator import validate

from bubble_ref import __version__
from bubble_ref.ballot import open_monitored_node
from bubble_ref.node import NodeConfig, open_relay_node
from bubble_ref.packets import system_clock
from bubble_ref.relay import create_app, openapi_document, start_server
from bubble_ref.store import ManualClock

HTTP_METHODS = {"get", "put", "post", "delete", "patch"}
# every status the relay answers /messages with besides success (404 and 405 are only for paths and methods that do
# not exist: the `default` response of every operation)
MESSAGES_ERRORS = {"400", "401", "413", "415"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    node = open_relay_node(tmp_path_factory.mktemp("openapi-node"), clock=system_clock, rng=random.Random(),
                           config=NodeConfig(name="openapi"))
    running = start_server(node, host="127.0.0.1", port=0)
    try:
        yield running
    finally:
        running.stop()  # closes the node too


@pytest.fixture(scope="module")
def served(server) -> dict:
    response = requests.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


def openapi_path(rule: str) -> str:
    "A Werkzeug rule like /users/<int:id> written as an OpenAPI path: /users/{id}."
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_document_is_valid_openapi_3_1():
    document = openapi_document()
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert document["info"]["version"] == __version__


def test_the_validator_is_not_a_no_op():
    "The validation above means something: a document with a broken response is refused."
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
    broken = openapi_document()
    broken["paths"]["/status"]["get"]["responses"]["200"] = {"content": {}}  # no description
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_served_document_is_valid_and_the_same(served):
    validate(served)
    assert served == openapi_document()


def test_every_flask_route_is_documented(server, served):
    app = create_app(server.node, server.driver.request)
    routes = [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"]
    assert {openapi_path(r.rule) for r in routes} >= {"/messages", "/status", "/openapi.json"}
    for rule in routes:
        path = openapi_path(rule.rule)
        assert path in served["paths"], f"route {rule.rule} is not documented"
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            assert method.lower() in served["paths"][path], f"{method} {rule.rule} is not documented"


def test_every_documented_operation_exists(server, served):
    "A relay-only node serves the client group of the document (the full node serves it all: test_openapi_full)."
    app = create_app(server.node, server.driver.request)
    served_ops = {(openapi_path(r.rule), m.lower()) for r in app.url_map.iter_rules() if r.endpoint != "static"
                  for m in r.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, item in served["paths"].items() for method in item if method in HTTP_METHODS
                  if "client" in item[method]["tags"]}
    assert documented == served_ops


def test_messages_documents_every_error_status(served):
    operations = served["paths"]["/messages"]
    documented = set().union(*(set(op["responses"]) for op in operations.values()))
    missing = MESSAGES_ERRORS - documented
    assert not missing, f"/messages does not document {sorted(missing)}"
    assert "202" in operations["post"]["responses"] and "200" in operations["get"]["responses"]
    assert "401" in operations["get"]["responses"], "proof failures are GET /messages answers"


def test_error_responses_use_the_error_schema(served):
    error = served["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "detail"] and set(error["properties"]) == {"error", "detail"}
    for path, item in served["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue  # path-level `parameters`
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)


def test_request_bodies_match_the_packet_schemas(served):
    schemas = served["components"]["schemas"]
    post = served["paths"]["/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    get = served["paths"]["/messages"]["get"]["requestBody"]["content"]["application/json"]["schema"]
    assert post == {"$ref": "#/components/schemas/ClientMessagePacket"}
    assert get == {"$ref": "#/components/schemas/RetrievalPacket"}
    assert set(schemas["ClientMessagePacket"]["required"]) == {"recipient", "message", "signature"}
    assert set(schemas["RetrievalPacket"]["properties"]) == {"public_key", "signature", "timestamp", "cursor"}
    assert "$ref" not in str(schemas["ClientMessagePacket"]), "common.json references are inlined"


def test_status_schema_lists_what_status_returns(server, served):
    "The schema lists what the operator sees; everyone else sees the same minus the operator's counters."
    schema = served["components"]["schemas"]["Status"]
    operator = requests.get(f"{server.url}/status", headers={"Authorization": f"Bearer {server.node.operator_token}"},
                            timeout=10).json()
    public = requests.get(f"{server.url}/status", timeout=10).json()
    assert set(operator) <= set(schema["properties"]) and set(public) <= set(operator)  # mesh roles add more
    assert "stored_messages" in operator and "stored_messages" not in public
    assert set(schema["required"]) <= set(public)


# Server-to-server endpoints of the full node (`bubble-ref node`): the mesh (06) and monitoring (09) speak them to
# each other; the OpenAPI document describes the client API. A new route must be added to one or the other.
SERVER_ROUTES = {"POST /relay", "GET /trace/<packet_id>", "POST /servers", "POST /sync", "POST /sync/ids",
                 "POST /sync/fetch", "GET /reputation",
                 "POST /reports", "POST /votes", "POST /decisions"}


def test_the_full_node_serves_the_client_api_and_only_known_server_routes(tmp_path, served):
    node = open_monitored_node(tmp_path / "full", clock=ManualClock(), rng=random.Random(0))
    try:
        app = create_app(node, node.on_request)
        served_ops = {f"{m} {openapi_path(r.rule)}" for r in app.url_map.iter_rules() if r.endpoint != "static"
                      for m in r.methods - {"HEAD", "OPTIONS"}}
        documented = {f"{method.upper()} {path}" for path, item in served["paths"].items() for method in item
                      if method in HTTP_METHODS}
        assert served_ops <= documented, "the document covers every route (issue 16; test_openapi_full checks it all)"
        assert served_ops - {f"{m.upper()} {p}" for p, item in served["paths"].items() for m in item
                             if m in HTTP_METHODS and "client" in item[m]["tags"]} == {
            f"{r.split()[0]} {openapi_path(r.split()[1])}" for r in SERVER_ROUTES}
    finally:
        node.close()
