"""Helpers for the in-process tests: drive a sans-IO node by hand, as a driver would, with no sockets.

`ask` makes one request (a `Request` to `node.on_request`); `carry` delivers a `Call` a node asked for to the node
it is addressed to and hands the answer back to the caller (`on_answer`), returning the caller's next actions.
JSON goes through bytes both ways, as on the wire.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from urllib.parse import urlsplit

from bubble_ref.mesh import MeshConfig, open_mesh_node
from bubble_ref.node import After, Call, Node, NodeConfig, Reply, Request
from bubble_ref.node import body_bytes as reply_bytes
from bubble_ref.sim import match_route


def mesh_node(path: Path, clock, peers: tuple[str, ...], url: str, **mesh) -> Node:
    "A mesh node (notebook 06) at `url` (what `carry` routes by), named after its folder, with MeshConfig(**mesh)."
    node = open_mesh_node(path, peers=peers, clock=clock, rng=random.Random(0), config=NodeConfig(name=path.name),
                          mesh=MeshConfig(**mesh))
    node.url = url
    return node


def body_bytes(body) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body).encode("utf-8")


def ask(node: Node, method_path: str, body=None, remote: str = "127.0.0.1", token: str | None = None) -> Reply:
    """One request, e.g. ask(node, 'POST /messages', packet_dict); the path may hold parameters (/trace/<id>).

    `token`: the bearer token, as `Authorization: Bearer <token>` gives it (the operator's, for operator-only answers)."""
    method, path = method_path.split(" ", 1)
    route = match_route(node, method, path)
    assert route is not None, f"the node serves no {method_path}"
    reply = node.on_request(Request(route[0], body_bytes(body), route[1], remote, token))
    assert isinstance(reply, Reply)
    json.loads(reply_bytes(reply.body))  # every answer must be JSON (a JsonText is JSON text already)
    return reply


def assert_refused(reply: Reply, status: int, code: str, phrase: str = "") -> dict:
    "`reply` is the JSON error {error, detail} with `status` and `code`, `phrase` in its detail, and no actions."
    assert 400 <= status < 500
    assert (reply.status, reply.body.get("error") if isinstance(reply.body, dict) else None) == (status, code), reply
    assert set(reply.body) == {"error", "detail"} and reply.body["detail"].strip(), reply.body
    assert phrase in reply.body["detail"], reply.body
    assert reply.actions == (), "a refused request causes nothing"
    return reply.body


def calls(actions, path: str | None = None) -> list[Call]:
    "The Calls among `actions` (only those to URLs ending in `path`, if given)."
    return [a for a in actions if isinstance(a, Call) and (path is None or urlsplit(a.url).path == path)]


def timers(actions) -> list[After]:
    return [a for a in actions if isinstance(a, After)]


def carry(caller: Node, call: Call, nodes: dict[str, Node]) -> list:
    """Deliver `call` to the node at its URL (`nodes`: base URL -> node; a missing one is down: no answer), then
    give the answer to `caller`; the caller's actions. The callee's own actions are dropped (not performed)."""
    parts = urlsplit(call.url)
    callee = nodes.get(f"{parts.scheme}://{parts.netloc}")
    if callee is None:
        return caller.on_answer(call.tag, None, None)
    route = match_route(callee, call.method, parts.path)
    reply = (Reply(404, {"error": "not_found", "detail": "no such endpoint"}) if route is None else
             callee.on_request(Request(route[0], body_bytes(call.body), route[1], "127.0.0.1")))
    return caller.on_answer(call.tag, reply.status, json.loads(json.dumps(reply.body)))


def pin(node: Node, url: str, other: Node) -> None:
    "`node` learns the peer at `url` from `other`'s /status (as its Peers role does when the peer answers)."
    node.roles["peers"].learn_peer(url, ask(other, "GET /status").body)
