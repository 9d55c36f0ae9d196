"""Audits (notebook 09b): the state machine (AUDIT_MOVES), and the Auditor on real nodes in the simulator, on its
manual clock: an honest server passes, a dropper fails, a server that is down is unreachable, an audit whose
witnesses cannot be reached is void, and a restart abandons what was under way. Every transition of the table is
taken by some audit below (the last test checks that the scenarios together cover the table)."""
from __future__ import annotations

import base64
import itertools
import json
import random
from datetime import timedelta

import pytest

from bubble_ref import audit as audit_module
from bubble_ref.audit import (
    AUDIT_MOVES, AUDIT_OUTCOMES, REPORT_FANOUT, Auditor, IllegalMove, Suspicion, audit_move, misbehave, sign_report)
from bubble_ref.client import CLIENT_MIN_PADDED
from bubble_ref.envelope import check_packet, seal
from bubble_ref.ledger import Ledger, MonitorConfig
from bubble_ref.mesh import MeshConfig, Server, add_mesh_roles, verify_body
from bubble_ref.node import After, Call, Node, NodeConfig, Reply, Route
from bubble_ref.packets import MisbehaviorReport, format_timestamp
from bubble_ref.sim import SIM_EPOCH, SimNetwork, sim_keys
from bubble_ref.store import ManualClock

QUIET = MonitorConfig(audit_interval=None)  # no audit of its own: the tests start each one
SLOW_SYNC = MeshConfig(sync_interval=timedelta(hours=1))  # anti-entropy only when a test asks for it
DEADLINE = QUIET.audit_deadline.total_seconds()
RECHECK = QUIET.audit_recheck.total_seconds()
LIVE = ("handing", "waiting", "checking", "rechecking")


class Controls:
    "A role for the tests: begin an audit of a named server, or pull a sync page from one, through a request."
    name = "test"

    def __init__(self, node: Node, auditor: Auditor, sync):
        self.node, self.auditor, self.sync = node, auditor, sync

    def routes(self):
        return [Route("POST", "/test/audit", lambda r: Reply(202, {}, tuple(self.auditor.begin(json.loads(r.body))))),
                Route("POST", "/test/sync", lambda r: Reply(202, {}, (self.sync.request_page(
                    self.sync.peers.directory()[json.loads(r.body)], 0),)))]


def audited_node(data_dir, *, peers, clock, rng, new_identity, config, behaviour="honest", floods=True):
    "A mesh node with a ledger and an auditor (notebook 09b's node), and the test controls."
    node = Node.open(data_dir, clock=clock, rng=rng, new_identity=new_identity, config=config)
    roles = add_mesh_roles(node, peers, SLOW_SYNC)
    misbehave(roles.broadcast, roles.sync, behaviour)
    if not floods:  # relays nothing, but still answers anti-entropy
        roles.broadcast.forwards = lambda row: False
    node.add(Ledger(node, QUIET))
    auditor = node.add(Auditor(node, roles.service, roles.peers, QUIET))
    node.add(Controls(node, auditor, roles.sync))
    return node


@pytest.fixture
def moves(monkeypatch) -> list[tuple[str, str]]:
    "Every (state, event) an Auditor applies, in order (AUDIT_MOVES is looked up through `audit_move`)."
    taken = []

    def recording(state, event):
        taken.append((state, event))
        return audit_move(state, event)

    monkeypatch.setattr(audit_module, "audit_move", recording)
    return taken


def world(tmp_path, links: str, seed: int = 1, **options) -> SimNetwork:
    """Hosts A (the auditor), T (the target) and maybe B, linked as `links` (e.g. "AT" or "AB BT"), started, and
    run past the first directory round (so A knows every server and the lists that name T's neighbours)."""
    net = SimNetwork(seed, root=tmp_path)
    names = sorted(set(links.replace(" ", "")), key="ATB".index)
    for name in names:
        net.add(name, audited_node, **options.get(name, {}))
    for a, b in links.split():
        net.link(a, b)
    net.start()
    net.ids_for_tests = {name: net.hosts[name].node.id for name in names}
    net.run(seconds=12)
    return net


def node_of(net, name) -> Node:
    return net.hosts[name].node


def begin(net, target: str) -> None:
    reply = net.request("A", "POST", "/test/audit", server_id(net, target))
    assert reply.status == 202 and len(reply.actions) == 1


def server_id(net, name: str) -> str:
    "The server id of a host, up or down (noted when the world started)."
    return net.ids_for_tests[name]


def audits(net) -> list[tuple[str, str]]:
    "A's audits: (target name, state), oldest first."
    names = {server_id(net, n): n for n in net.hosts}
    return [(names.get(peer, peer), state) for peer, state in
            node_of(net, "A").db.execute("SELECT peer, state FROM audits ORDER BY id")]


def run_until_state(net, state: str, limit: float = 30.0) -> None:
    "Step the simulation 5 ms at a time until A's (only) audit is in `state`."
    end = net.now + limit
    while audits(net)[-1][1] != state:
        assert net.now < end, f"the audit never reached {state!r}: {audits(net)}"
        net.run(seconds=0.005)


PATHS = {  # scenario -> the moves its audit takes, in order
    "honest neighbour": [("handing", "taken"), ("waiting", "found here")],
    "dropping neighbour": [("handing", "taken"), ("waiting", "not here"), ("checking", "missing"),
                           ("rechecking", "missing")],
    "target down": [("handing", "not taken")],
    "witnesses down": [("handing", "taken"), ("waiting", "not here"), ("checking", "no answer")],
    "found at a witness": [("handing", "taken"), ("waiting", "not here"), ("checking", "found")],
    "found at the second look": [("handing", "taken"), ("waiting", "not here"), ("checking", "missing"),
                                 ("rechecking", "found")],
    "witness gone at the second look": [("handing", "taken"), ("waiting", "not here"), ("checking", "missing"),
                                        ("rechecking", "no answer")],
    **{f"restart while {state}": [(state, "abandoned")] for state in LIVE},
}


# ------------------------------------------------------------------ the table

def test_every_state_has_its_moves_and_every_other_event_is_illegal():
    states = {s for s, _ in AUDIT_MOVES} | set(AUDIT_MOVES.values())
    events = {e for _, e in AUDIT_MOVES}
    assert states == set(LIVE) | set(AUDIT_OUTCOMES)
    assert set(AUDIT_MOVES.values()) - set(LIVE) == set(AUDIT_OUTCOMES), "every outcome is reachable"
    for state in states:
        for event in events:
            if (state, event) in AUDIT_MOVES:
                assert audit_move(state, event) == AUDIT_MOVES[(state, event)]
            else:
                with pytest.raises(IllegalMove, match=f"{state!r} cannot take event {event!r}"):
                    audit_move(state, event)
    for outcome in AUDIT_OUTCOMES:  # an ended audit takes no event at all
        assert not any(s == outcome for s, _ in AUDIT_MOVES)
    with pytest.raises(IllegalMove):
        audit_move("handing", "no such event")
    assert issubclass(IllegalMove, ValueError)


def test_the_scenarios_below_take_every_move_of_the_table():
    taken = {move for path in PATHS.values() for move in path}
    assert taken == set(AUDIT_MOVES), f"not exercised: {set(AUDIT_MOVES) - taken}"


# ------------------------------------------------------------------ audits in the simulator

def test_an_honest_server_passes(tmp_path, moves):
    with world(tmp_path, "AT") as net:
        begin(net, "T")
        net.run(seconds=30)
        assert audits(net) == [("T", "audit_passed")] and moves == PATHS["honest neighbour"]
        ledger = node_of(net, "A").roles["ledger"]
        assert [t.outcome for t in ledger.transactions(node_of(net, "T").id) if t.direction == "audit"] == ["audit_passed"]
        assert node_of(net, "A").roles["audit"].audited_lately(node_of(net, "T").id, net.clock() - timedelta(minutes=1))
        assert not net.bugs


def test_a_dropper_fails_after_a_second_look_and_is_reported(tmp_path, moves):
    with world(tmp_path, "AT BT", T={"behaviour": "drop"}) as net:  # A and B are T's neighbours
        begin(net, "T")
        net.run(seconds=DEADLINE + 1)
        assert audits(net) == [("T", "rechecking")], "one look is not enough: a relay may be late"
        net.run(seconds=RECHECK + 5)
        assert audits(net) == [("T", "audit_failed")] and moves == PATHS["dropping neighbour"]
        a, t = node_of(net, "A"), node_of(net, "T")
        assert a.roles["ledger"].score(t.id) < 1.0
        assert a.roles["audit"].results() == {t.id: {"audit_failed": 1}}
        assert net.bytes_sent["POST /reports"] > 0, "reported to B (these nodes have no ballot: B answers 404)"
        assert not net.bugs


def test_a_server_that_is_down_is_unreachable_not_guilty(tmp_path, moves):
    with world(tmp_path, "AT") as net:
        t_id = server_id(net, "T")
        net.crash("T")
        assert t_id in node_of(net, "A").roles["peers"].directory(), "A still knows T"
        begin(net, "T")
        net.run(seconds=30)
        assert audits(net) == [("T", "audit_unreachable")] and moves == PATHS["target down"]
        a = node_of(net, "A")
        assert a.roles["ledger"].score(t_id) == 1.0
        assert not a.roles["audit"].audited_lately(t_id, net.clock() - timedelta(minutes=1)), "no verdict"


def test_an_audit_is_void_when_the_witnesses_cannot_be_reached(tmp_path, moves):
    "A is not T's neighbour; T's only neighbour B is down: nobody can say whether T relayed. No evidence."
    with world(tmp_path, "AB BT") as net:
        assert node_of(net, "T").id in node_of(net, "A").roles["peers"].directory(), "A knows T from B's list"
        net.crash("B")
        begin(net, "T")
        net.run(seconds=30)
        assert audits(net) == [("T", "audit_void")] and moves == PATHS["witnesses down"]
        assert node_of(net, "A").roles["ledger"].score(node_of(net, "T").id) == 1.0


def test_an_audit_passes_when_a_witness_holds_the_packet(tmp_path, moves):
    "T relays to B, which keeps it to itself: A does not get it, but B shows it has it. T did its job."
    with world(tmp_path, "AB BT", B={"floods": False}) as net:
        begin(net, "T")
        net.run(seconds=30)
        assert audits(net) == [("T", "audit_passed")] and moves == PATHS["found at a witness"]


def test_an_audit_passes_when_the_packet_shows_up_before_the_second_look(tmp_path, moves):
    "T does not flood, but anti-entropy brings the packet to its neighbour B between A's two looks."
    with world(tmp_path, "AB BT", T={"floods": False}) as net:
        begin(net, "T")
        net.run(seconds=DEADLINE + 1)
        assert audits(net) == [("T", "rechecking")]
        assert net.request("B", "POST", "/test/sync", node_of(net, "T").id).status == 202
        net.run(seconds=1)
        net.run(seconds=RECHECK)
        assert audits(net) == [("T", "audit_passed")] and moves == PATHS["found at the second look"]


def test_an_audit_is_void_when_the_witness_is_gone_at_the_second_look(tmp_path, moves):
    with world(tmp_path, "AB BT", T={"behaviour": "drop"}) as net:
        begin(net, "T")
        net.run(seconds=DEADLINE + 1)
        assert audits(net) == [("T", "rechecking")]
        net.crash("B")
        net.run(seconds=RECHECK + 5)
        assert audits(net) == [("T", "audit_void")] and moves == PATHS["witness gone at the second look"]
        assert node_of(net, "A").roles["ledger"].score(node_of(net, "T").id) == 1.0


@pytest.mark.parametrize("state", LIVE)
def test_a_restart_abandons_the_audit_under_way(tmp_path, moves, state):
    "The throwaway key lives in memory only: after a restart the audit cannot be finished, and is abandoned."
    with world(tmp_path, "AB BT", T={"behaviour": "drop"}) as net:
        begin(net, "T")
        if state != "handing":
            run_until_state(net, state)
        assert audits(net) == [("T", state)]
        net.crash("A")
        net.start("A")
        assert audits(net) == [("T", "abandoned")] and moves[-1] == (state, "abandoned")
        assert moves.count((state, "abandoned")) == 1
        net.run(seconds=RECHECK + 5)  # answers and timers of the dead incarnation change nothing
        assert audits(net) == [("T", "abandoned")] and not net.bugs
        key = node_of(net, "A").db.execute("SELECT audit_key FROM audits").fetchone()[0]
        assert "PRIVATE" not in key and len(base64.b64decode(key)) < 400, "only the public key is stored"


# ------------------------------------------------------------------ the auditor in process

@pytest.fixture
def known(tmp_path):
    "A node with an auditor that knows five servers (none running), on a manual clock."
    clock = ManualClock()
    keys = iter(sim_keys(64)[32:])  # the first is the node's own, the next ones its throwaway keys
    node = audited_node(tmp_path / "a", peers=(), clock=clock, rng=random.Random(3),
                        new_identity=lambda: next(keys), config=NodeConfig(name="a"))
    servers = sim_servers(5)
    for server in servers:
        node.roles["peers"].remember(server, listed_by=None, verified=True)
    yield node, servers, clock
    node.close()


def sim_servers(count: int) -> list[Server]:
    return [Server(k.id, f"http://127.0.1.{i + 1}:8000", k.public) for i, k in enumerate(sim_keys(count + 1)[1:])]


node_key = sim_keys(1)[0]


def test_audit_packets_look_like_client_traffic(known, alice, bob):
    node, servers, clock = known
    call, = node.roles["audit"].begin(servers[0].server_id)
    assert isinstance(call, Call) and call.method == "POST" and call.url == f"{servers[0].url}/messages"
    client_like = check_packet(seal(alice, bob.public, "hello", min_padded=CLIENT_MIN_PADDED))
    packet = check_packet(call.body)
    assert len(packet.message_box) == len(client_like.message_box)
    assert len(packet.signature_box) == len(client_like.signature_box)
    assert packet.recipient.id != node.id, "addressed to a throwaway key, not to the auditor"


def test_the_witnesses_are_the_neighbours_first_then_others_never_the_target(known):
    node, servers, clock = known
    auditor, peers = node.roles["audit"], node.roles["peers"]
    target = servers[0].server_id
    peers.peers_of[target] = (servers[1].server_id,)  # the target's own list names 1 ...
    peers.peers_of[servers[2].server_id] = (target,)  # ... and 2 names the target
    chosen, near = auditor.check_servers(target)
    ids = [s.server_id for s in chosen]
    assert near == {servers[1].server_id, servers[2].server_id}
    assert set(ids[:2]) == near and len(ids) == QUIET.audit_checks and target not in ids
    assert auditor.neighbours(target) == near


def test_no_audit_without_a_known_server(tmp_path):
    lonely = audited_node(tmp_path / "lonely", peers=("http://127.0.0.1:9",), clock=ManualClock(),
                          rng=random.Random(0), new_identity=lambda: node_key, config=NodeConfig())
    try:
        assert lonely.roles["audit"].begin() == []
        assert lonely.roles["audit"].begin("ab" * 32) == [], "nor of a server it does not know"
    finally:
        lonely.close()


def test_misbehaviour_modes_are_checked(tmp_path):
    with pytest.raises(ValueError, match="behaviour must be one of"):
        audited_node(tmp_path / "n", peers=(), clock=ManualClock(), rng=random.Random(0),
                     new_identity=lambda: node_key, config=NodeConfig(), behaviour="lazy")


def test_a_suspicion_starts_audits_of_that_server_at_most_once_per_window(known):
    node, servers, clock = known
    auditor = node.roles["audit"]
    suspect = servers[3].server_id
    first = node.emit(Suspicion(suspect))
    assert [c.url for c in first] == [f"{servers[3].url}/messages"], "the first audit at once"
    assert list(auditor.suspects) == [suspect] * (QUIET.suspect_audits - 1), "the next ones come first in line"
    assert node.emit(Suspicion(suspect)) == [], "a stream of reports does not make a stream of audits"
    assert node.emit(Suspicion(node.id)) == [] and node.emit(Suspicion("ef" * 32)) == [], \
        "never itself, never a server it does not know"
    picked = [auditor.pick_target().server_id for _ in range(2 * (QUIET.suspect_audits - 1))]
    assert picked[0::2] == [suspect] * 3, "the suspect's audits come first in line ..."
    assert suspect not in picked[1::2] or len(servers) < 3, "... every other turn: the turns between are random"
    clock.advance(QUIET.suspect_window)
    assert len(node.emit(Suspicion(suspect))) == 1, "a window later, it looks again"


def test_a_blacklisted_server_is_not_suspected_but_random_audits_still_reach_it(known):
    """Found by a swarm of 100: after the decision, the failures of audits of the blacklisted dropper kept making
    reports, the reports suspicions, and over 70% of the mesh's audits went to a server already decided about."""
    node, servers, clock = known
    auditor, peers = node.roles["audit"], node.roles["peers"]
    bad, later = servers[0].server_id, servers[1].server_id
    node.emit(Suspicion(later))  # in line before it is decided about
    refused = {bad}
    peers.policies.append(lambda sid: "blacklisted" if sid in refused else None)
    assert node.emit(Suspicion(bad)) == [] and bad not in auditor.suspects, "decided: no suspicion"
    refused.add(later)
    assert later in auditor.suspects
    auditor.pick_target()
    assert not auditor.suspects, "a suspect decided about meanwhile leaves the line unaudited (one pick drains it)"
    picked = [auditor.pick_target().server_id for _ in range(200)]
    assert bad in picked, "random audits still reach it: that is how it could be whitelisted"


def test_reports_steer_at_most_every_other_scheduled_audit(known):
    "A liar who reports server after server fills the line of suspects; half the scheduled audits stay random."
    node, servers, clock = known
    auditor = node.roles["audit"]
    for server in servers[:4]:
        node.emit(Suspicion(server.server_id))
    assert len(auditor.suspects) == 4 * (QUIET.suspect_audits - 1), "(each suspicion's first audit began at once)"
    turns = []
    for _ in range(8):
        state = auditor.node.rng.getstate()
        auditor.pick_target()
        turns.append("random" if auditor.node.rng.getstate() != state else "suspect")
    assert turns == ["suspect", "random"] * 4


SCHEDULED = MonitorConfig(audit_interval=timedelta(seconds=60))  # the node's default schedule


@pytest.fixture
def scheduled(tmp_path):
    "A node with a ledger and an auditor on the default audit schedule, knowing no server yet, on a manual clock."
    clock = ManualClock()
    pool = sim_keys(64)
    keys = itertools.chain([pool[32]], itertools.cycle(pool[33:]))  # the node's key, then throwaway keys for audits
    node = Node.open(tmp_path / "n", clock=clock, rng=random.Random(5), new_identity=lambda: next(keys),
                     config=NodeConfig(name="n"))
    roles = add_mesh_roles(node, (), SLOW_SYNC)
    node.add(Ledger(node, SCHEDULED))
    auditor = node.add(Auditor(node, roles.service, roles.peers, SCHEDULED))
    yield node, roles.peers, auditor, clock
    node.close()


def test_audits_thin_out_in_a_large_mesh_so_audit_storage_per_node_is_bounded(scheduled):
    """Every audit packet is kept by every node for 7 days, so the mesh's audit rate, not one node's, sets each node's
    storage: above `full_audit_rate_up_to` servers each node audits less often, in proportion."""
    node, peers, auditor, clock = scheduled
    base = SCHEDULED.audit_interval
    servers = [Server(f"{i:064x}", f"http://127.0.2.{i % 250 + 1}:{8000 + i}", sim_keys(2)[1].public)
               for i in range(1, 1000)]
    mean_spacing = {}
    for size in (10, 25, 100, 1000):
        for server in servers[:size - 1]:
            peers.remember(server, listed_by=None, verified=True)
        assert len(peers.directory()) + 1 == size
        mean_spacing[size] = auditor.spacing()
        delays = [auditor._next_timer()[0].delay for _ in range(200)]
        assert all(0.5 * mean_spacing[size] <= d <= 1.5 * mean_spacing[size] for d in delays)
    assert mean_spacing[10] == mean_spacing[25] == base, "a small mesh audits at the configured rate"
    assert mean_spacing[100] == base * 4 and mean_spacing[1000] == base * 40
    for size, spacing in mean_spacing.items():  # audit packets the whole mesh makes per hour
        assert size * (timedelta(hours=1) / spacing) <= SCHEDULED.full_audit_rate_up_to * 60
    assert 1000 * (timedelta(hours=1) / mean_spacing[1000]) == 100 * (timedelta(hours=1) / mean_spacing[100])


def test_a_node_that_learns_a_large_mesh_after_drawing_its_timer_keeps_the_large_mesh_rate(scheduled):
    """A new node draws its first audit time knowing only its peers (the full rate), then learns the mesh. Found by a
    swarm of 1000 new nodes: each audited within 30-90 s, 1000 audit packets for every node to keep, where the
    stretched spacing allows 25 a minute. When the timer fires, the audit is kept with probability planned / current
    spacing, so the rate follows the directory the node knows when it audits."""
    node, peers, auditor, clock = scheduled
    base = SCHEDULED.audit_interval
    servers = [Server(f"{i:064x}", f"http://127.0.2.{i % 250 + 1}:{8000 + i}", sim_keys(2)[1].public)
               for i in range(1, 1000)]
    for server in servers[:3]:
        peers.remember(server, listed_by=None, verified=True)
    auditor._next_timer()
    assert auditor.planned_spacing == base, "drawn knowing 4 servers: the full rate"
    started = lambda actions: sum(isinstance(a, Call) for a in actions)  # an audit begins with its packet's POST
    assert [started(auditor.on_timer(("audit", "next"))) for _ in range(5)] == [1] * 5, "a mesh that did not grow"
    for server in servers[3:]:
        peers.remember(server, listed_by=None, verified=True)
    trials, begun = 400, 0
    for _ in range(trials):
        auditor.planned_spacing = base  # each timer drawn before the node learnt the other 996
        begun += started(auditor.on_timer(("audit", "next")))
        assert auditor.planned_spacing == base * 40, "the next draw knows the mesh"
    assert 0 < begun <= 25, f"{begun} of {trials} (1 in 40 expected: 60 s planned, 2400 s now)"


def test_reports_about_many_servers_start_one_audit_off_the_schedule_per_spacing(scheduled):
    "Reports cannot raise a node's audit rate: the first suspicion audits at once, the next wait for a spacing."
    node, peers, auditor, clock = scheduled
    *servers, later = sim_servers(7)
    for server in (*servers, later):
        peers.remember(server, listed_by=None, verified=True)
    started = [len(node.emit(Suspicion(s.server_id))) for s in servers]
    assert started == [1, 0, 0, 0, 0, 0], "one at once; the others wait in line for the scheduled audits"
    assert len(auditor.suspects) == min(6 * SCHEDULED.suspect_audits - 1, auditor.suspects.maxlen)
    clock.advance(auditor.spacing() * 0.99)
    assert node.emit(Suspicion(later.server_id)) == [], "still within the spacing"
    clock.advance(auditor.spacing() * 0.01)
    assert len(node.emit(Suspicion(servers[0].server_id))) == 0, "(that one was looked at lately)"
    assert len(node.emit(Suspicion(later.server_id))) == 0, "(and that one just now: it waits in line)"
    clock.advance(SCHEDULED.suspect_window)
    assert len(node.emit(Suspicion(servers[1].server_id))) == 1, "a spacing later, one more at once"


def test_a_failed_audit_is_reported_to_every_known_server_but_the_accused(known):
    node, servers, clock = known
    auditor = node.roles["audit"]
    target = servers[0]
    call, = auditor.begin(target.server_id)
    audit_id = call.tag[2]
    pid = check_packet(call.body).id
    auditor.on_answer(call.tag, 202, {})
    for event in ("not here", "missing"):
        auditor.move(audit_id, event)
    report_calls = auditor.move(audit_id, "missing")
    assert sorted(c.url for c in report_calls) == sorted(f"{s.url}/reports" for s in servers[1:])
    body = report_calls[0].body
    report = MisbehaviorReport.from_dict(body)
    assert report.reporter_id == node.id and report.reported_server_id == target.server_id
    assert verify_body(node.identity.public, body)
    evidence = json.loads(base64.b64decode(report.evidence))
    assert evidence["kind"] == "audit_failed" and evidence["packet_id"] == pid
    with pytest.raises(IllegalMove):
        auditor.move(audit_id, "found"), "an ended audit takes no more events"


def fail_an_audit(auditor, target_id: str) -> list:
    "Begin an audit of `target_id` and take it to audit_failed (taken, not here, missing twice): the last actions."
    call, = auditor.begin(target_id)
    audit_id = call.tag[2]
    auditor.on_answer(call.tag, 202, {})
    for event in ("not here", "missing"):
        auditor.move(audit_id, event)
    return auditor.move(audit_id, "missing")


@pytest.fixture
def large(scheduled):
    "The scheduled node in a mesh of 100: three pinned peers (real keys) and 96 other known servers."
    node, peers, auditor, clock = scheduled
    pinned = sim_servers(3)
    for server in pinned:
        peers.learn_peer(server.url, {"server_id": server.server_id, "public_key": server.public_key.b64})
        peers.remember(server, listed_by=None, verified=True)
    others = [Server(f"{i:064x}", f"http://127.0.2.{i % 250 + 1}:{8000 + i}", sim_keys(2)[1].public)
              for i in range(1, 97)]
    for server in others:
        peers.remember(server, listed_by=None, verified=True)
    assert len(peers.directory()) + 1 == 100
    return node, peers, auditor, clock, pinned, others


def test_in_a_large_mesh_a_failure_is_reported_to_the_peers_and_a_few_random_servers(large):
    """Reports to every known server cost N² per incident (6 million at N = 1000). Beyond `full_audit_rate_up_to`, a
    failure goes to the peers and REPORT_FANOUT random servers; each audits, and reports in turn only if it fails."""
    node, peers, auditor, clock, pinned, others = large
    picked = set()
    for target in others[:6]:
        reports = [a for a in fail_an_audit(auditor, target.server_id) if isinstance(a, Call)]
        urls = [c.url for c in reports]
        assert len(urls) == len(set(urls)) == len(pinned) + REPORT_FANOUT
        assert {f"{s.url}/reports" for s in pinned} <= set(urls), "every peer"
        assert f"{target.url}/reports" not in urls, "never the accused"
        picked |= set(urls) - {f"{s.url}/reports" for s in pinned}
        assert all(MisbehaviorReport.from_dict(c.body).reported_server_id == target.server_id for c in reports)
    assert len(picked) > 2 * REPORT_FANOUT, f"the others are drawn afresh each time: {len(picked)} different"


def test_in_a_large_mesh_a_failed_audit_is_followed_up_within_an_audit_interval(large):
    """One failed audit takes a score to 0.6, a blacklist vote needs under 0.5, and the stretched spacing is 4 min at
    N = 100 (40 at 1000): so a failure is followed by one more audit of that server after about an audit_interval."""
    node, peers, auditor, clock, pinned, others = large
    target = others[0].server_id
    follow, = [a for a in fail_an_audit(auditor, target) if isinstance(a, After)]
    assert follow.tag == ("audit", "follow_up", target)
    assert 0.5 * SCHEDULED.audit_interval <= follow.delay <= 1.5 * SCHEDULED.audit_interval < auditor.spacing()
    clock.advance(follow.delay)
    again = auditor.on_timer(follow.tag)
    assert [c.url for c in again] == [f"{others[0].url}/messages"], "the follow-up audits that server"
    assert not [a for a in fail_an_audit(auditor, target) if isinstance(a, After)], \
        "a follow-up's own failure calls none: at most one per failure this node saw"
    clock.advance(SCHEDULED.suspect_window)
    assert [a for a in fail_an_audit(auditor, target) if isinstance(a, After)], "a later failure, a later follow-up"
    peers.policies.append(lambda sid: "blacklisted" if sid == target else None)
    assert auditor.on_timer(follow.tag) == [], "no follow-up of a server this node refuses"


def test_in_a_small_mesh_a_failure_calls_no_follow_up(known):
    "Up to `full_audit_rate_up_to` servers the spacing is not stretched: the next scheduled audit comes as soon."
    node, servers, clock = known
    actions = fail_an_audit(node.roles["audit"], servers[0].server_id)
    assert actions and all(isinstance(a, Call) for a in actions)


def test_sign_report_makes_a_report_anyone_can_check(alice, mallory):
    body = sign_report(alice, "ab" * 32, b"what happened", SIM_EPOCH)
    assert body["reporter_id"] == alice.id and body["public_key"] == alice.public.b64
    assert body["timestamp"] == format_timestamp(SIM_EPOCH)
    assert base64.b64decode(body["evidence"]) == b"what happened"
    assert verify_body(alice.public, body) and not verify_body(mallory.public, body)
    assert not verify_body(alice.public, {**body, "reported_server_id": "cd" * 32})
