"""Regressions at the edges of what a node accepts: nesting depth and the exact size limit."""
import random

import pytest
import requests

from bubble_ref.node import NodeConfig, Request, open_relay_node
from bubble_ref.packets import system_clock
from bubble_ref.relay import start_server
from bubble_ref.store import ManualClock

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    node = open_relay_node(tmp_path_factory.mktemp("limits"), clock=system_clock, rng=random.Random(),
                           config=NodeConfig(name="limits"))
    running = start_server(node)
    yield running
    running.stop()  # stops the driver and the server, then closes the node


@pytest.mark.parametrize("path, method", [("/messages", "POST"), ("/messages", "GET")])
@pytest.mark.parametrize("depth", [900, 1000, 50_000])
def test_deeply_nested_json_is_a_400_not_a_500(server, path, method, depth):
    response = requests.request(method, server.url + path, data=b"[" * depth, headers=JSON, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_packet"
    assert "JSON" in response.json()["detail"]


def test_node_logic_refuses_deep_nesting_with_a_json_error(tmp_path):
    node = open_relay_node(tmp_path, clock=ManualClock(), rng=random.Random(0))
    try:
        reply = node.on_request(Request("POST /messages", b"[" * 5000))
        assert (reply.status, reply.body["error"]) == (400, "invalid_packet")
        assert "nested too deeply" in reply.body["detail"]
        assert node.mailbox.count() == 0
    finally:
        node.close()


def test_a_body_of_exactly_the_limit_passes_the_size_checks(server):
    limit = server.node.config.max_packet_bytes
    body = b"[" + b" " * (limit - 2) + b"]"  # valid JSON of exactly `limit` bytes: the packet check answers
    assert len(body) == limit
    response = requests.post(server.url + "/messages", data=body, headers=JSON, timeout=10)
    assert response.status_code == 400 and response.json()["error"] == "invalid_packet"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_one_byte_over_the_limit_is_a_json_413(server, chunked):
    limit = server.node.config.max_packet_bytes
    body = b"x" * (limit + 1)
    data = (body[i:i + 8192] for i in range(0, len(body), 8192)) if chunked else body
    response = requests.post(server.url + "/messages", data=data, headers=JSON, timeout=10)
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"


def test_missing_content_type_is_explained(server):
    response = requests.post(server.url + "/messages", data=b"{}", timeout=10)
    assert response.status_code == 415
    assert response.json()["detail"] == "send the packet as application/json, with a Content-Type header"
