"""ChatSession logic and the ChatWidget driven from code, over a live in-process two-node mesh."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bubble_ref.client import Client
from bubble_ref.contacts import Contact, ContactBook, ContactError
from bubble_ref.crypto import Identity
from bubble_ref.mesh import start_local_mesh
from bubble_ref.ui import ChatSession, ChatWidget, describe_error, scratch_folder

PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    running = start_local_mesh(tmp_path_factory.mktemp("chat-mesh"), ["0", "1"], "line")
    yield [r.url for r in running.values()]
    for r in running.values():
        r.stop()


def person(tmp_path, name, mesh):
    client = Client(Identity.generate(), tmp_path / name, default_servers=tuple(mesh))
    client.refresh_load()
    client.choose()
    return client, ContactBook(tmp_path / f"{name}.contacts")


def until(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)


def test_sessions_send_by_name_and_show_names_not_keys(tmp_path, mesh):
    (a, a_book), (b, b_book) = person(tmp_path, "a", mesh), person(tmp_path, "b", mesh)
    a_book.add(Contact("Bob", b.identity.public, None))
    b_book.add(Contact("Alice", a.identity.public, PNG))
    alice, bob = ChatSession(a, a_book), ChatSession(b, b_book)
    alice.send("Bob", "hello")
    until(lambda: bob.poll() or bob.unread())
    assert bob.unread() == {"Alice": 1}
    assert [(l.who, l.text) for l in bob.transcript("Alice")] == [("Alice", "hello")]
    assert bob.unread() == {}  # showing the transcript marks it read
    with pytest.raises(ContactError, match="no contact named 'Carol'"):
        alice.send("Carol", "hi")
    with pytest.raises(ValueError, match="nothing to send"):
        alice.send("Bob", "  ")
    for c, book in ((a, a_book), (b, b_book)):
        c.close()
        book.close()


def test_the_widget_sends_on_click_and_refuses_empty_text(tmp_path, mesh):
    (a, a_book), (b, b_book) = person(tmp_path, "a2", mesh), person(tmp_path, "b2", mesh)
    a_book.add(Contact("Bob", b.identity.public, PNG))
    b_book.add(Contact("Alice", a.identity.public, None))
    alice_ui, bob_ui = ChatWidget(ChatSession(a, a_book), "Alice"), ChatWidget(ChatSession(b, b_book), "Bob")
    assert alice_ui.picture.value == PNG and alice_ui.contacts.value == "Bob"
    alice_ui.text.value = "<b>not bold</b>"
    alice_ui.send_button.click()
    assert alice_ui.text.value == "" and "&lt;b&gt;not bold&lt;/b&gt;" in alice_ui.transcript.value  # escaped
    until(lambda: bob_ui.poll_once())
    assert "not bold" in bob_ui.transcript.value
    alice_ui.text.value = ""
    alice_ui.send_button.click()
    assert alice_ui.status.value == "not sent: nothing to send"
    bob_ui.start_polling(every=0.1)  # a live window: new messages appear by themselves
    alice_ui.session.send("Bob", "second")
    until(lambda: "second" in bob_ui.transcript.value)
    bob_ui.stop_polling()
    for c, book in ((a, a_book), (b, b_book)):
        c.close()
        book.close()


def test_an_unknown_sender_is_shown_as_a_short_fingerprint(tmp_path, mesh):
    (a, a_book), (s, _) = person(tmp_path, "a3", mesh), person(tmp_path, "stranger", mesh)
    ui = ChatWidget(ChatSession(a, a_book), "Alice")
    assert "no contacts yet" in ui.transcript.value
    s.send(a.identity.public, "who am I?")
    until(lambda: ui.session.poll() or ui.session.unread())
    (name, count), = ui.session.unread().items()
    assert name.startswith("unknown") and count == 1 and s.identity.public.b64 not in name
    a.close()
    s.close()
    a_book.close()


def test_an_error_in_a_handler_shows_in_the_status_line_and_the_log(tmp_path, mesh, caplog):
    (a, a_book), (b, _) = person(tmp_path, "a4", mesh), person(tmp_path, "b4", mesh)
    a_book.add(Contact("Bob", b.identity.public, None))
    ui = ChatWidget(ChatSession(a, a_book), "Alice")
    a.close()  # what the old notebook's last cell did under a live window
    ui.text.value = "are you there?"
    ui.send_button.click()  # must not raise: a click handler's exception would only reach the log console
    assert ui.status.value.startswith("not sent: ProgrammingError: Cannot operate on a closed database"), ui.status.value
    assert ui.text.value == "are you there?"  # the text is kept, not lost
    assert ui.poll_once() == 0
    assert ui.status.value.startswith("cannot fetch: ProgrammingError: Cannot operate on a closed database")
    ui.poll_once()  # the same error again: shown, but logged only once
    errors = [r for r in caplog.records if r.name == "bubble_ref.ui" and r.levelname == "ERROR"]
    assert [r.getMessage().split(": ", 1)[1].split(":")[0] for r in errors] == ["not sent", "cannot fetch"]
    assert all(r.exc_info and r.exc_info[0].__name__ == "ProgrammingError" for r in errors)  # with the traceback
    ui.start_polling(every=0.02)  # the background poller survives errors instead of dying silently
    until(lambda: sum(1 for t in threading.enumerate() if t.name == "chat poller: Alice") == 1)
    time.sleep(0.2)
    assert ui.poller.running and ui.status.value.startswith("cannot fetch: ProgrammingError")
    ui.stop_polling()
    assert not ui.poller.running
    b.close()
    a_book.close()


def test_a_stopped_chat_says_so_instead_of_failing(tmp_path, mesh, caplog):
    (a, a_book), (b, _) = person(tmp_path, "a5", mesh), person(tmp_path, "b5", mesh)
    a_book.add(Contact("Bob", b.identity.public, None))
    ui = ChatWidget(ChatSession(a, a_book), "Alice")
    ui.start_polling(every=0.05)
    ui.stop()
    assert ui.status.value == "chat stopped" and not ui.poller.running
    a.close()
    a_book.close()  # the teardown closes the databases after stopping the windows
    ui.text.value = "hello?"
    ui.send_button.click()
    assert ui.status.value == "not sent: chat stopped (run the notebook again for a new chat)"
    assert ui.poll_once() == 0 and ui.status.value.startswith("not sent: chat stopped")
    ui.contacts.options = ["Bob", "Carol"]  # any redraw a handler triggers leaves the closed session alone
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    b.close()


def test_describe_error_names_the_type_except_for_refused_input():
    assert describe_error("not sent", ValueError("nothing to send")) == "not sent: nothing to send"
    assert describe_error("not sent", ContactError("no contact named 'Carol'")) == "not sent: no contact named 'Carol'"
    assert describe_error("cannot fetch", OSError("unreachable")) == "cannot fetch: OSError: unreachable"


def test_a_scratch_folder_is_removed_on_exit_and_after_its_process_is_killed(tmp_path):
    with scratch_folder("kept-", parent=tmp_path) as folder:
        (folder / "f").write_text("x")
        assert folder.parent == tmp_path and folder.is_dir()
    assert not folder.exists()
    # A process killed outright (SIGKILL to its process group, the way nbval ends a kernel) runs no
    # Python at exit; its folder must go all the same.
    code = ("import sys, time; from bubble_ref.ui import scratch_folder; "
            "held = scratch_folder('killed-', parent=sys.argv[1]); print(held.__enter__(), flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert folder.parent == tmp_path and folder.is_dir()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    until(lambda: not folder.exists(), timeout=30)
