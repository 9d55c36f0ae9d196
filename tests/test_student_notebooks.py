"""The students' copies of the notebooks (notebook 14: `bubble_ref.exercises`; `bubble-ref workshop student-notebooks`).

- Stripping leaks nothing: no solution or hidden-test marker, no line of a reference solution or of a hidden
  test, no output of an exercise cell is left in any cell of any student's copy.
- Every student's copy (of every notebook, with exercises or without) runs top to bottom in a real kernel
  (nbclient, this environment's python3). In the same run, right after each exercise, the test plays a
  student: the stub's checks print ✗ "not written yet"; a common mistake (MISTAKES below) gets ✗ lines with
  its hint; the reference solution with the hidden tests gets ✓ lines only. A failing exercise must not stop
  the notebook: the checks print, never raise.

Running every copy takes a few minutes (each notebook runs as its lesson does, servers included); each
notebook is its own test, with a generous per-cell timeout.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bubble_ref.exercises import (BEGIN_HIDDEN_TESTS, BEGIN_SOLUTION, END_HIDDEN_TESTS, END_SOLUTION, StripError,
                                  cell_source, exercise_role, leftover_markers, student_cell)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell: generous, the machine may be busy (the lessons start servers and simulations)

# A common mistake per exercise: (notebook, exercise number) -> [(code for each solution region, hint it must get)].
# The code replaces the reference solution's region `i` (other regions keep the reference); the hint is a
# substring of a ✗ line the checks must print for it.
MISTAKES: dict[tuple[str, int], list[tuple[dict[int, str], str]]] = {
    ("00_welcome", 1): [({1: 'return {**sees, "TX+RX operator": sees["TX server"]}'},
                         "the operator's set is the union of the TX server's and the RX server's sets"),
                        ({1: 'sees["TX+RX operator"] = sees["TX server"] | sees["RX server"]\nreturn sees'},
                         "build a new dict")],
    ("00_welcome", 2): [({0: 'return {"recipient", "signature"}'}, "the signature is boxed to Bob on its own")],
    ("01_packets", 1): [({0: "try:\n    base64.b64decode(text, validate=True)\n    return True\n"
                             "except ValueError:\n    return False"}, "decode, encode again, and compare")],
    ("01_packets", 2): [({0: "return json.loads(text)"}, "refuse the key seen twice")],
    ("02_crypto", 1): [({0: 'return data + b" " * (256 - len(data))'}, "short messages go in the smallest bucket"),
                       ({0: "for bucket in BUCKETS:\n    if len(data) < bucket:\n"
                            "        return data + b' ' * (bucket - len(data))\nraise ValueError('too long')"},
                        "a message that fills a bucket exactly stays in it")],
    ("02_crypto", 2): [({0: "return box[268:]"}, "a box is RSA-OAEP(key)")],
    ("02_crypto", 3): [({0: "return bucket_for(length) - length"}, "with powers of 4 the next bucket after 1 KiB is 4 KiB")],
    ("03_envelope", 1): [({0: "inner = InnerMessage(sender=sender.public.b64, content=content, uuid=str(uuid_module.uuid4()),\n"
                              "                     timestamp=format_timestamp(clock()))\n"
                              "padded = pad_to_bucket(inner.to_json().encode())\n"
                              "message_box = seal_box(recipient, padded)\n"
                              "signature = EncryptedSignature(signature=base64.b64encode(sender.sign(padded)).decode())\n"
                              "signature_box = seal_box(recipient, signature.to_json().encode())\n"
                              "return ClientMessagePacket(recipient.b64, base64.b64encode(message_box).decode(),\n"
                              "                           base64.b64encode(signature_box).decode())"},
                          "sign the message box")],
    ("03_envelope", 2): [({0: "timestamp = format_timestamp(clock())\n"
                              "signature = identity.sign(PHRASE.encode())\n"
                              "return RetrievalPacket(public_key=identity.public.b64,\n"
                              "                       signature=base64.b64encode(signature).decode(), timestamp=timestamp)"},
                          "sign exactly 'I AM WHO I SAY I AM|<server id>|<timestamp>'")],
    ("04_store", 1): [({0: "return [p.packet_id for p in mailbox.fetch(recipient_id, limit=limit).packets]"},
                       "keep fetching with after=page.next_cursor")],
    ("04_store", 2): [({0: "return received_at + RETENTION"}, "too early: the sweep drops a slot only once")],
    ("05a_node", 1): [({1: "return Reply(200, json.loads(request.body))"}, "refuse with NodeError(400, 'invalid_json'")],
    ("05a_node", 2): [({1: "self.beats += 1\nreturn []"}, "or the heart stops after one beat")],
    ("05b_relay", 1): [({0: "if content_length and content_length > max_bytes:\n    return 413, 'too_large'\n"
                            "if content_type != 'application/json':\n    return 415, 'unsupported_media_type'\nreturn None"},
                        "parameters do not count")],
    ("05b_relay", 2): [({0: "data = b''.join(chunks)\nif len(data) > max_bytes:\n    raise ValueError('too large')\nreturn data"},
                        "stop at the first chunk that takes you over the limit")],
    ("06_mesh", 1): [({0: "import ipaddress\nfrom urllib.parse import urlsplit\nhost = urlsplit(url).hostname\ntry:\n"
                          "    ip = ipaddress.ip_address(host)\nexcept ValueError:\n    return 'public'\n"
                          "return 'loopback' if ip.is_loopback else 'private' if ip.is_private else 'public'"},
                      "only http and https")],
    ("06_mesh", 2): [({0: "return sum(len(n) for n in links) // 2"}, "the two waves meet")],
    ("06b_sim", 1): [({0: "net = SimNetwork(seed, **kwargs)\nfor name in names:\n    net.add(name, open_mesh_node)\n"
                          "for a, b in zip(names, names[1:]):\n    net.link(a, b)\nnet.start()\nnet.run(seconds=1)\nreturn net"},
                      "link E back to A")],
    ("06b_sim", 2): [({0: "for _ in range(limit):\n    net.run(seconds=1)\n"
                          "    if all(h.node.mailbox.contains(packet_id) for h in net.hosts.values()):\n"
                          "        return round(net.now)\nreturn None"}, "within the first second")],
    ("06c_strategies", 1): [({0: "dist, stack = {source: 0}, [source]\nwhile stack:\n    node = stack.pop()\n"
                                 "    for n in links[node]:\n        if n not in dist:\n            dist[n] = dist[node] + 1\n"
                                 "            stack.append(n)\nreturn dist"}, "take the shorter")],
    ("06c_strategies", 2): [({2: "if msg.id in self.seen[node]:\n    return []\nself.seen[node].add(msg.id)\n"
                                 "return [Send(p, PAYLOAD, msg._replace(hops=msg.hops + 1)) for p in self.net.links[node]]"},
                             "never send a packet back")],
    ("07_client", 1): [({0: "usable = sorted((s for s in servers if s.load is not None), key=lambda s: s.load)\n"
                            "if len(usable) < 2:\n    raise NoServerAvailable('too few')\nreturn usable[0].url, usable[1].url"},
                        "keep the current RX")],
    ("07_client", 2): [({0: "data = json.loads(content)\nreturn data if data.get('kind') == SELF_COPY_KIND else None"},
                        "ordinary text is not JSON")],
    ("07b_anonymity", 1): [({0: "wins = sum(1 for p in positives for n in negatives if p > n)\n"
                                "return wins / (len(positives) * len(negatives))"}, "a tie counts half")],
    ("07b_anonymity", 2): [({0: "scores = {'real': [], 'fake': []}\n"
                                "for (before, _), (moment, kind) in zip(timeline, timeline[1:]):\n"
                                "    scores[kind].append(moment - before)\nreturn scores['real'], scores['fake']"},
                            "the last is left out too")],
    ("08a_contacts", 1): [({0: "return isinstance(name, str) and 0 < len(name.strip()) and len(name) <= 64"},
                           "no spaces at the start or the end")],
    ("08a_contacts", 2): [({0: "return name_key(name)"}, "CONFUSABLES maps")],
    ("08b_ui", 1): [({0: "return f'{doing}: {type(error).__name__}: {error}'"}, "shows its message alone")],
    ("08b_ui", 2): [({0: "digest = hashlib.sha256((my_id + their_id).encode()).hexdigest()[:12]\n"
                         "return ' '.join(digest[i:i + 4] for i in range(0, 12, 4))"}, "sort the two ids")],
    ("09a_ledger", 1): [({0: "score = start\nfor outcome in outcomes:\n    target, weight = WEIGHTS[outcome]\n"
                             "    score = weight * score + (1 - weight) * target\nreturn score"},
                         "one signed refusal steps 0.3 towards 0")],
    ("09a_ledger", 2): [({0: "score, count = start, 0\nwhile score > MonitorConfig().blacklist_below:\n"
                             "    score, count = next_score(score, 'refused'), count + 1\nreturn count"},
                         "a score of exactly 0.5 is not blacklisted yet")],
    ("09a_ledger", 3): [({0: "yes = sum(1 for vote in votes.values() if vote == VOTE_FOR[decision])\n"
                             "return 2 * yes > len(electorate)"}, "the accused, does not vote on itself")],
    ("09b_audit", 1): [({0: "if any(answers.values()):\n    return 'found'\n"
                            "if any(a is False for a in answers.values()):\n    return 'missing'\nreturn 'no answer'"},
                        "a non-neighbour's 'no' is no evidence")],
    ("09b_audit", 2): [({0: "state = 'handing'\nfor event in events:\n    state = AUDIT_MOVES.get((state, event), state)\n"
                            "return state"}, "raise IllegalMove")],
    ("09c_ballot", 1): [({0: "return len(quorum_base) // 2 + 1"}, "7 voters without the accused")],
    ("09c_ballot", 2): [({0: "server_id, decided_at, final = decision\nheld[server_id] = (decided_at, final)\nreturn True"},
                         "an old decision replayed must not undo a newer one")],
    ("09d_swarm", 1): [({0: "index = {n: i for i, n in enumerate(scenario.names)}\nreached, todo = {origin}, [origin]\n"
                            "while todo:\n    node = todo.pop()\n    for j in scenario.links[index[node]]:\n"
                            "        other = scenario.names[j]\n        if other not in reached:\n"
                            "            reached.add(other)\n            todo.append(other)\nreturn reached"},
                        "the dropper stops the packet"),
                       ({0: "relays = {n for n in scenario.names if scenario.behaviour[n] in ('honest', 'collude')}\n"
                            "if origin not in relays:\n    return {origin}\n"
                            "index = {n: i for i, n in enumerate(scenario.names)}\nreached, todo = {origin}, [origin]\n"
                            "while todo:\n    node = todo.pop()\n    for j in scenario.links[index[node]]:\n"
                            "        other = scenario.names[j]\n        if other in relays and other not in reached:\n"
                            "            reached.add(other)\n            todo.append(other)\nreturn reached"},
                        "a Sybil relays too")],
    ("09d_swarm", 2): [({0: "behaviour = scenario.behaviour\nfor name in scenario.names:\n"
                            "    if sum(b == 'collude' for b in behaviour.values()) > len(scenario.names) // 2:\n        break\n"
                            "    if behaviour[name] == 'honest' and name != scenario.victim:\n        behaviour[name] = 'collude'\n"
                            "return dataclasses.replace(scenario, behaviour=behaviour)"},
                        "not the scenario you were given")],
    ("10_attacks", 1): [({0: "return make_retrieval_proof(identity, server_id=server_id, clock=lambda: now - timedelta(minutes=1))"},
                         "make it older than PROOF_WINDOW"),
                        ({0: "return make_retrieval_proof(identity, clock=lambda: now - PROOF_WINDOW - timedelta(minutes=1))"},
                         "bind it to the server")],
    ("10_attacks", 2): [({0: 'if len(raw) > max_bytes:\n    return "too large"\n'
                             "containers, separators = json_shape_limits(max_bytes)\n"
                             'if raw.count(b"[") > containers:\n    return "too many objects and arrays"\n'
                             'if raw.count(b",") + raw.count(b":") > separators:\n    return "too many values"\nreturn None'},
                         "objects count too"),
                        ({0: 'if len(raw) > max_bytes:\n    return "too large"\n'
                             "containers, separators = json_shape_limits(max_bytes)\n"
                             'if raw.count(b"{") + raw.count(b"[") >= containers:\n    return "too many objects and arrays"\n'
                             'if raw.count(b",") + raw.count(b":") >= separators:\n    return "too many values"\nreturn None'},
                         "a body with exactly the limit passes")],
    ("11a_stun", 1): [({0: "return struct.pack('HHI', 0x0001, 0, 0x2112A442) + transaction_id"}, "network byte order")],
    ("11a_stun", 2): [({0: "return struct.unpack('!H', value[2:4])[0]"}, "XOR the top 16 bits")],
    ("11a_stun", 3): [({0: "crc = zlib.crc32(message) ^ 0x5354554E\nlength = struct.unpack('!H', message[2:4])[0] + 8\n"
                           "return message[:2] + struct.pack('!H', length) + message[4:] + struct.pack('!HHI', 0x8028, 4, crc)"},
                       "the CRC covers the header with the grown length")],
    ("11b_calls", 1): [({0: "return {state for (role, state, event), new in TRANSITIONS.items()\n"
                            "        if new == final and role == 'caller'}"}, "a timeout while inviting or ringing")],
    ("11b_calls", 2): [({0: "return base64.b64encode(hmac.new(username.encode(), secret, hashlib.sha1).digest()).decode()"},
                        "keyed with the secret")],
    ("11b_calls", 3): [({0: "return ('callee', 'ringing', 'end'), ('caller', 'inviting', 'hangup')"},
                        "the caller cancels while its call is still inviting")],
    ("13_spec", 1): [({0: "return json.dumps(obj, sort_keys=True).encode()"}, "json.dumps needs three arguments"),
                     ({0: "def without_signatures(value):\n    if isinstance(value, dict):\n"
                          "        return {k: without_signatures(v) for k, v in value.items() if k != 'signature'}\n"
                          "    if isinstance(value, list):\n        return [without_signatures(v) for v in value]\n"
                          "    return value\n"
                          "return json.dumps(without_signatures(obj), sort_keys=True, separators=(',', ':'),\n"
                          "                  ensure_ascii=False).encode()"},
                      "only the top-level signature is left out")],
    ("13_spec", 2): [({0: "return rule.replace('<', '{').replace('>', '}')"}, "drop the converter")],
    ("14_exercises", 1): [({0: "return key_id[:12]"}, "three groups of four hex characters")],
    ("90_cli", 1): [({0: "from bubble_ref.crypto import BOX_OVERHEAD, bucket_for\nreturn bucket_for(n) + BOX_OVERHEAD"},
                     "plus the sender's key (392 characters)")],
}


def teacher_notebooks() -> list[Path]:
    "The repository's notebooks that have exercises."
    return [p for p in sorted(NOTEBOOKS.glob("*.ipynb"))
            if any(exercise_role(c) for c in json.loads(p.read_text("utf-8"))["cells"])]


def load(path: Path) -> dict:
    return json.loads(path.read_text("utf-8"))


def regions(source: str, begin: str, end: str) -> list[list[str]]:
    "The lines inside each begin…end region of a cell's source."
    found, inside = [], False
    for line in source.split("\n"):
        if line.strip() == begin:
            found.append([])
            inside = True
        elif line.strip() == end:
            inside = False
        elif inside:
            found[-1].append(line)
    return found


def solution_variant(source: str, replacements: dict[int, str]) -> str:
    "A solution cell's source with region i replaced by replacements[i] (indented like its marker); others kept."
    out, index, inside = [], -1, False
    for line in source.split("\n"):
        if line.strip() == BEGIN_SOLUTION:
            index, inside = index + 1, True
            if index in replacements:
                indent = line[:len(line) - len(line.lstrip())]
                out += [indent + new for new in replacements[index].split("\n")]
        elif line.strip() == END_SOLUTION:
            inside = False
        elif not inside or index not in replacements:
            out.append(line)
    return "\n".join(out)


def text_of(cell: dict) -> str:
    "A code cell's printed output, as one string."
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    "The students' copies, written by the real command."
    out = tmp_path_factory.mktemp("workshop")
    command = [str(Path(sys.executable).parent / "bubble-ref"), "workshop", "student-notebooks", str(out),
               "--notebooks", str(NOTEBOOKS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {len(list(NOTEBOOKS.glob('*.ipynb')))} notebooks" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "overwrite" in again.stderr  # a second run never replaces a student's work
    return out / "notebooks"


def test_every_exercise_has_its_two_cells_and_never_exports():
    notebooks = teacher_notebooks()
    assert len(notebooks) >= 19, [p.name for p in notebooks]
    for path in notebooks:
        cells, grade_ids = load(path)["cells"], []
        for index, cell in enumerate(cells):
            role = exercise_role(cell)
            if role is None:
                continue
            grade_ids.append(cell["metadata"]["nbgrader"]["grade_id"])
            assert not cell_source(cell).lstrip().startswith("#| export"), (path.name, cell["id"])
            if role == "solution" and cell["cell_type"] == "code":
                assert exercise_role(cells[index + 1]) == "checks", f"{path.name}: {cell['id']} has no checks cell after it"
                assert regions(cell_source(cell), BEGIN_SOLUTION, END_SOLUTION), (path.name, cell["id"])
        assert len(exercises(load(path))) >= 1, path.name
        assert len(grade_ids) == len(set(grade_ids)), f"{path.name}: nbgrader grade ids repeat"


def test_nbgrader_would_accept_the_lesson_notebooks():
    "nbgrader looks for the hidden-test words anywhere in a line, in every cell: only checks cells may hold them."
    for path in teacher_notebooks():
        if path.name.startswith("14_"):
            continue  # the teachers' notebook quotes the markers in its prose
        for cell in load(path)["cells"]:
            if "HIDDEN TESTS" in cell_source(cell):
                assert exercise_role(cell) == "checks", (path.name, cell["id"])


def test_the_stripper_refuses_what_it_cannot_strip_safely():
    solution = {"cell_type": "code", "metadata": {"nbgrader": {"solution": True}}, "outputs": [], "execution_count": 1}
    for source, why in [(f"{BEGIN_SOLUTION}\nx = 1", "never closed"), (END_SOLUTION, "without"),
                        (f"{BEGIN_SOLUTION}\n{BEGIN_SOLUTION}\n{END_SOLUTION}", "inside another"),
                        (f"#| export\n{BEGIN_SOLUTION}\nx = 1\n{END_SOLUTION}", "exported")]:
        with pytest.raises(StripError, match=why):
            student_cell({**solution, "source": source})
    lesson = {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": 1,
              "source": f"{BEGIN_HIDDEN_TESTS}\nassert True\n{END_HIDDEN_TESTS}"}
    with pytest.raises(StripError, match="hidden-test region in a cell"):
        student_cell(lesson)


def test_stripping_leaks_no_solution_and_no_hidden_test(copies):
    for path in teacher_notebooks():
        teacher, student = load(path), load(copies / path.name)
        assert [c["id"] for c in teacher["cells"]] == [c["id"] for c in student["cells"]]
        assert not leftover_markers(student), path.name
        secret, elsewhere = set(), []
        for cell in teacher["cells"]:
            source = cell_source(cell)
            hidden = regions(source, BEGIN_SOLUTION, END_SOLUTION) + regions(source, BEGIN_HIDDEN_TESTS, END_HIDDEN_TESTS)
            secret |= {line.strip() for region in hidden for line in region}
            inside = {line for region in hidden for line in region}
            elsewhere += [line for line in source.split("\n") if line not in inside]
            if not exercise_role(cell):
                elsewhere.append(json.dumps(cell.get("outputs", []), ensure_ascii=False))
        # distinctive: long enough to mean something, and not also written outside the regions (the lesson's code)
        outside = "\n".join(elsewhere)
        distinctive = {line for line in secret if len(line) >= 12 and not line.startswith("#") and line not in outside}
        assert len(distinctive) >= 3, f"{path.name}: too few distinctive solution lines to test for leaks"
        for cell in student["cells"]:
            seen = cell_source(cell) + json.dumps(cell.get("outputs", []), ensure_ascii=False)
            leaked = [line for line in distinctive if line in seen]
            assert not leaked, f"{path.name}, cell {cell['id']}: {leaked[:3]}"
            if exercise_role(cell) and cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, (path.name, cell["id"])


def test_every_exercise_has_a_common_mistake():
    "Each exercise's checks are shown to catch at least one plausible mistake, with its hint."
    for path in teacher_notebooks():
        for number, _ in enumerate(exercises(load(path)), start=1):
            assert (path.stem, number) in MISTAKES, f"{path.stem}, exercise {number}: add a common mistake to MISTAKES"


def exercises(notebook: dict) -> list[tuple[dict, dict]]:
    "(solution cell, checks cell) of each exercise, in order: exercise N is the notebook's N-th checks cell."
    pairs, solution = [], None
    for cell in notebook["cells"]:
        if exercise_role(cell) == "solution" and cell["cell_type"] == "code":
            solution = cell
        elif exercise_role(cell) == "checks":
            assert solution is not None, f"checks cell {cell['id']} has no solution cell before it"
            pairs.append((solution, cell))
    return pairs


def played(teacher: dict, student: dict, stem: str) -> dict:
    """The student's copy with, after each exercise's checks, the cells of a test student: each common mistake with
    the checks the student sees, then the reference solution with the checks and hidden tests."""
    after = {}
    for number, ((solution, checks), (_, seen)) in enumerate(zip(exercises(teacher), exercises(student)), start=1):
        played_cells = []
        for k, (replacements, _) in enumerate(MISTAKES.get((stem, number), [])):
            mistake = {**solution, "id": f"test-mistake-{number}-{k}",
                       "source": solution_variant(cell_source(solution), replacements)}
            played_cells += [mistake, {**seen, "id": f"test-mistake-{number}-{k}-checks"}]
        played_cells += [{**solution, "id": f"test-reference-{number}"},
                         {**checks, "id": f"test-reference-{number}-checks"}]
        after[seen["id"]] = played_cells
    cells = [c for cell in student["cells"] for c in [cell, *after.get(cell["id"], [])]]
    return {**student, "cells": [{**c, "outputs": [], "execution_count": None} if c["cell_type"] == "code" else c
                                 for c in cells]}


def test_every_notebook_gets_a_copy_and_one_without_exercises_is_the_lesson_itself(copies):
    names = {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    assert {p.name for p in copies.glob("*.ipynb")} == names
    for name in sorted(names - {p.name for p in teacher_notebooks()}):
        teacher, student = load(NOTEBOOKS / name), load(copies / name)
        assert [(c["id"], cell_source(c)) for c in teacher["cells"]] == [(c["id"], cell_source(c)) for c in student["cells"]]


@pytest.mark.parametrize("name", [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))])
def test_a_students_copy_runs_and_its_checks_say_what_is_wrong(copies, name):
    "Every copy runs; in one with exercises, each stub, common mistake and reference solution gets its lines."
    from nbclient import NotebookClient
    import nbformat

    stem, student = Path(name).stem, load(copies / name)
    notebook = nbformat.reads(json.dumps(played(load(NOTEBOOKS / name), student, stem)), as_version=4)
    stubs = {checks["id"] for _, checks in exercises(student)}
    NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(copies)}}).execute()  # raises if any cell raises
    ran = {cell["id"]: text_of(cell) for cell in notebook.cells if cell["cell_type"] == "code"}
    for cell_id, output in ran.items():
        if cell_id in stubs:  # the stub: ✗ not written yet, and nothing passes
            assert "✗" in output and "not written yet" in output and "✓" not in output, (name, cell_id, output)
        mistake = re.fullmatch(r"test-mistake-(\d+)-(\d+)-checks", cell_id)
        if mistake:
            hint = MISTAKES[(stem, int(mistake.group(1)))][int(mistake.group(2))][1]
            crosses = [line for line in output.splitlines() if line.startswith("✗")]
            assert any(hint in line for line in crosses), (name, cell_id, hint, output)
            assert "not written yet" not in output and "checks pass;" in output, (name, cell_id, output)
        reference = re.fullmatch(r"test-reference-(\d+)-checks", cell_id)
        if reference:
            assert "✗" not in output and re.search(r"→ .*: all \d+ checks pass", output), (name, cell_id, output)
    if exercises(student):
        assert any(re.fullmatch(r"test-reference-\d+-checks", i) for i in ran), name
    else:  # a lesson without exercises: it ran to the end, every code cell
        assert all(cell.get("execution_count") for cell in notebook.cells if cell["cell_type"] == "code"), name
