"""ChatSession logic and the ChatWidget driven from code, over a live in-process two-node mesh."""
import time

import pytest

from bubble_ref.client import Client
from bubble_ref.contacts import Contact, ContactBook, ContactError
from bubble_ref.crypto import Identity
from bubble_ref.mesh import start_local_mesh
from bubble_ref.ui import ChatSession, ChatWidget

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
