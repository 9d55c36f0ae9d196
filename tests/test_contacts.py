"""Contacts: contact cards (export, import, refusals) and the local SQLite contact list."""
from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bubble_ref.contacts import (JPEG_MAGIC, MAX_CARD_BYTES, PICTURE_MAX_BYTES, PNG_MAGIC, Contact, ContactBook,
                                 ContactError, card_json, export_card, import_card, name_key)
from bubble_ref.store import ManualClock

PNG = PNG_MAGIC + b"\x00\x00\x00\rIHDR" + bytes(50)  # only the magic bytes are checked
JPEG = JPEG_MAGIC + b"\xe0\x00\x10JFIF" + bytes(50)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def spki_b64(key) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64(der)


@pytest.fixture(scope="module")
def weak_key() -> str:
    return spki_b64(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())


@pytest.fixture(scope="module")
def ec_key() -> str:
    return spki_b64(ec.generate_private_key(ec.SECP256R1()).public_key())


@pytest.fixture
def good(bob) -> dict:
    return {"type": "contact_card", "name": "Bob", "public_key": bob.public.b64}


@pytest.fixture
def book(tmp_path):
    with ContactBook(tmp_path / "contacts.sqlite3", clock=ManualClock()) as b:
        yield b


# --------------------------------------------------------------- the contact

def test_contact_id_and_short_id(bob):
    contact = Contact("Bob", bob.public)
    assert contact.id == bob.id and contact.short_id == bob.id[:12] and len(contact.short_id) == 12
    assert contact.picture is None
    assert bob.id[:12] in repr(contact) and bob.public.b64 not in repr(contact)


def test_contact_normalises_pem_and_base64(bob):
    assert Contact("Bob", bob.public.pem) == Contact("Bob", bob.public.b64) == Contact("Bob", bob.public)
    assert Contact("Bob", bob.public.pem).public_key.b64 == bob.public.b64


@pytest.mark.parametrize("name, phrase", [
    ("", "name is empty"),
    ("   ", "name is empty"),
    ("x" * 65, "too long: 65 characters, at most 64"),
    ("Bob\nAlice", "U+000A"),
    ("Bob\u202egnp.exe", "U+202E"),
    (" Bob", "spaces at the start or end"),
    ("Bob ", "spaces at the start or end"),
    (42, "name must be text"),
])
def test_contact_refuses_bad_names(bob, name, phrase):
    with pytest.raises(ContactError, match="^contact ") as caught:
        Contact(name, bob.public)
    assert phrase in str(caught.value)


def test_contact_accepts_unicode_names(bob):
    for name in ["Zoë", "李小龙", "👩‍💻 Dev", "x" * 64, "B"]:
        assert Contact(name, bob.public).name == name


def test_contact_refuses_bad_keys_and_pictures(bob, weak_key, ec_key):
    with pytest.raises(ContactError, match="public_key is 1024 bits; the protocol needs 2048"):
        Contact("Bob", weak_key)
    with pytest.raises(ContactError, match="EC key"):
        Contact("Bob", ec_key)
    with pytest.raises(ContactError, match="not a PNG or JPEG"):
        Contact("Bob", bob.public, b"GIF89a" + bytes(10))
    with pytest.raises(ContactError, match="at most 65,536"):
        Contact("Bob", bob.public, PNG_MAGIC + bytes(PICTURE_MAX_BYTES))
    with pytest.raises(ContactError, match="picture must be bytes"):
        Contact("Bob", bob.public, b64(PNG))
    assert Contact("Bob", bob.public, bytearray(PNG)).picture == PNG


def test_picture_limit_is_inclusive(bob):
    exactly = PNG_MAGIC + bytes(PICTURE_MAX_BYTES - len(PNG_MAGIC))
    assert len(Contact("Bob", bob.public, exactly).picture) == PICTURE_MAX_BYTES


# ------------------------------------------------------------------- cards

@pytest.mark.parametrize("picture", [None, PNG, JPEG])
def test_card_round_trip_file_and_text(tmp_path, bob, picture):
    contact = Contact("Bob", bob.public, picture)
    path = export_card(contact, tmp_path / "bob.json")
    assert import_card(path) == contact
    assert import_card(str(path)) == contact
    assert import_card(card_json(contact)) == contact
    assert import_card(card_json(contact).encode("utf-8")) == contact
    card = json.loads(path.read_text("utf-8"))
    assert card["type"] == "contact_card" and card["public_key"] == bob.public.b64
    assert ("picture" in card) == (picture is not None)
    if picture is not None:
        assert base64.b64decode(card["picture"]) == picture


def test_card_with_pem_key_is_normalised(good, bob):
    contact = import_card(json.dumps({**good, "public_key": bob.public.pem}))
    assert contact.public_key.b64 == bob.public.b64 and json.loads(card_json(contact))["public_key"] == bob.public.b64


def test_card_round_trip_unicode_name(tmp_path, bob):
    contact = Contact("Zoë 李", bob.public, PNG)
    assert import_card(export_card(contact, tmp_path / "zoe.json")) == contact


def _refusal(text: str, label: str = "bob.json") -> str:
    with pytest.raises(ContactError) as caught:
        import_card(text, label=label)
    assert type(caught.value) is ContactError
    message = str(caught.value)
    assert message.startswith(f"card {label!r}: "), message
    return message


@pytest.mark.parametrize("change, phrase", [
    ({"type": "client_message"}, "type: must be 'contact_card'"),
    ({"email": "bob@example.org"}, "unexpected field 'email'"),
    ({"name": ""}, "name: too short: 0 characters"),
    ({"name": "B" * 65}, "name: too long: 65 characters, at most 64"),
    ({"name": "Bob\u001b[2J"}, "does not have the expected form"),
    ({"name": "Bob\n"}, "name: 'Bob\\n' does not have the expected form (1 to 64 characters, no control"),
    ({"name": " Bob"}, "does not have the expected form"),
    ({"name": 7}, "name: expected string, got integer"),
    ({"public_key": "not base64!"}, "public_key: not a public key"),
    ({"public_key": b64(b"hello, not a key")}, "public_key is not a public key"),
    ({"picture": "iVBORw0KGgo=!"}, "picture: not valid base64"),
    ({"picture": None}, "picture: expected string, got null"),
    ({"picture": b64(b"GIF89a" + bytes(100))}, "picture is not a PNG or JPEG image (it starts with 47 49 46 38"),
    ({"picture": b64(b"<svg onload='alert(1)'/>")}, "picture is not a PNG or JPEG image"),
    ({"picture": ""}, "picture is not a PNG or JPEG image (it starts with nothing"),
    ({"picture": b64(PNG_MAGIC + bytes(70_000))}, "picture is 70,008 bytes; at most 65,536 (64 KiB)"),
])
def test_card_refusals(good, change, phrase):
    assert phrase in _refusal(json.dumps({**good, **change}))


@pytest.mark.parametrize("field", ["type", "name", "public_key"])
def test_card_missing_field(good, field):
    card = {k: v for k, v in good.items() if k != field}
    assert f"missing field {field!r}" in _refusal(json.dumps(card))


def test_card_weak_and_ec_keys(good, weak_key, ec_key):
    assert _refusal(json.dumps({**good, "public_key": weak_key})) == \
        "card 'bob.json': public_key is 1024 bits; the protocol needs 2048"
    assert "public_key is an EC key (secp256r1); the protocol needs RSA-2048" in \
        _refusal(json.dumps({**good, "public_key": ec_key}))


def test_card_invalid_json(good):
    assert "invalid JSON" in _refusal(json.dumps(good)[:-5])
    assert "invalid JSON" in _refusal('{"type": "contact_card", "type": "contact_card"}')  # duplicate key
    assert "expected object, got array" in _refusal(json.dumps([good]))


def test_card_files_named_in_errors(tmp_path, good, weak_key):
    path = tmp_path / "bob.json"
    path.write_text(json.dumps({**good, "public_key": weak_key}))
    with pytest.raises(ContactError, match=r"^card 'bob.json': public_key is 1024 bits; the protocol needs 2048$"):
        import_card(path)
    path.write_text("{not json")
    with pytest.raises(ContactError, match=r"^card 'bob.json': invalid JSON"):
        import_card(path)
    path.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ContactError, match="not UTF-8"):
        import_card(path)


def test_card_file_problems(tmp_path):
    with pytest.raises(ContactError, match=r"card 'missing.json': no such file"):
        import_card(tmp_path / "missing.json")
    with pytest.raises(ContactError, match="is a directory"):
        import_card(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_CARD_BYTES + 1))
    with pytest.raises(ContactError, match=r"card 'big.json': the file is .* bytes; a card is at most"):
        import_card(big)
    with pytest.raises(ContactError, match="the card is .* bytes"):
        import_card("{" + " " * MAX_CARD_BYTES + "}")
    with pytest.raises(ContactError, match="file path or JSON text"):
        import_card(12)


def test_card_text_without_label_says_card(good):
    with pytest.raises(ContactError, match=r"^card: unexpected field 'x'"):
        import_card(json.dumps({**good, "x": 1}))


# ------------------------------------------------------------ contact book

def test_book_add_get_by_name_all(book, alice, bob):
    book.add(Contact("Bob", bob.public, PNG))
    book.add(Contact("alice", alice.public))
    assert len(book) == 2
    assert book.get(bob.id) == Contact("Bob", bob.public, PNG)
    assert book.get(bob.public) == book.get(bob.public.b64) == book.get(bob.id.upper()) == book.get(bob.id)
    assert book.by_name("Bob").id == bob.id and book.by_name("BOB").id == bob.id
    assert book.by_name("Ｂｏｂ").id == bob.id  # NFKC: full-width letters are the same name
    assert book.by_name("Carol") is None and book.get("0" * 64) is None
    assert [c.name for c in book.all()] == ["alice", "Bob"]  # sorted by name, case ignored
    assert bob.id in book and "0" * 64 not in book and "nonsense" not in book


def test_book_update_same_key(book, bob):
    book.add(Contact("Bob", bob.public, PNG))
    first = book.added_at(bob.id)
    book.clock.advance(timedelta(days=3))
    book.add(Contact("Robert", bob.public, JPEG))
    assert len(book) == 1
    assert book.get(bob.id) == Contact("Robert", bob.public, JPEG)
    assert book.by_name("Bob") is None and book.added_at(bob.id) == first
    book.add(Contact("Robert", bob.public))  # the card without a picture: the picture goes
    assert book.get(bob.id).picture is None
    book.add(Contact("ROBERT", bob.public))  # renaming to its own name in another case is fine
    assert book.get(bob.id).name == "ROBERT"


@pytest.mark.parametrize("name", ["Bob", "bob", "BOB", "Ｂｏｂ"])
def test_book_refuses_two_keys_with_one_name(book, bob, mallory, name):
    book.add(Contact("Bob", bob.public))
    with pytest.raises(ContactError, match="already used by another contact") as caught:
        book.add(Contact(name, mallory.public))
    assert bob.id[:12] in str(caught.value) and "choose another name" in str(caught.value)
    assert book.get(mallory.id) is None and len(book) == 1
    book.add(Contact("Mallory", mallory.public))  # the refused transaction left the book usable
    assert len(book) == 2


def test_book_rename_into_taken_name_refused(book, alice, bob):
    book.add(Contact("Alice", alice.public))
    book.add(Contact("Bob", bob.public))
    with pytest.raises(ContactError, match=r"'alice' is already used by another contact \('Alice'"):
        book.add(Contact("alice", bob.public))
    assert book.get(bob.id).name == "Bob"


def test_book_remove(book, alice, bob):
    book.add(Contact("Alice", alice.public))
    book.add(Contact("Bob", bob.public))
    assert book.remove(bob.id) is True
    assert book.remove(bob.id) is False
    assert book.get(bob.id) is None and [c.name for c in book.all()] == ["Alice"]
    assert book.remove(alice.public) is True and len(book) == 0
    book.add(Contact("Bob", alice.public))  # a removed contact's name is free again
    assert book.by_name("bob").id == alice.id


def test_book_display_name(book, alice, bob, mallory):
    book.add(Contact("Bob", bob.public))
    for spelling in [bob.public, bob.public.b64, bob.public.pem, bob.id, Contact("Other", bob.public)]:
        assert book.display_name(spelling) == "Bob"
    assert book.display_name(mallory.public) == f"unknown {mallory.id[:12]}"
    assert book.display_name(alice.id) == f"unknown {alice.id[:12]}"
    assert mallory.public.b64 not in book.display_name(mallory.public.b64)
    with pytest.raises(ContactError, match="64-character hex id"):
        book.display_name("bob")


def test_book_persists_across_reopen(tmp_path, alice, bob):
    path = tmp_path / "contacts.sqlite3"
    with ContactBook(path) as book:
        book.add(Contact("Bob", bob.public, PNG))
        book.add(Contact("Alice", alice.public))
        assert book._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with ContactBook(path) as again:
        assert again.all() == [Contact("Alice", alice.public), Contact("Bob", bob.public, PNG)]
        assert again.display_name(bob.public) == "Bob"
        columns = [row[1] for row in again._db.execute("PRAGMA table_info(contacts)")]
        assert columns == ["id", "name", "public_key", "picture", "added_at"]
        stored = again._db.execute("SELECT public_key, picture FROM contacts WHERE id = ?", (bob.id,)).fetchone()
        assert stored == (bob.public.b64, PNG)


def test_book_import_and_export_cards(tmp_path, book, bob, mallory):
    card = export_card(Contact("Bob", bob.public, PNG), tmp_path / "bob.json")
    assert book.import_card(card) == Contact("Bob", bob.public, PNG)
    assert book.import_card(card, name="Bobby").name == "Bobby" and len(book) == 1
    out = book.export_card(bob.id, tmp_path / "out.json")
    assert import_card(out) == Contact("Bobby", bob.public, PNG)
    with pytest.raises(ContactError, match="no contact with id"):
        book.export_card(mallory.id, tmp_path / "m.json")
    fake = export_card(Contact("bobby", mallory.public), tmp_path / "fake.json")
    with pytest.raises(ContactError, match="already used"):
        book.import_card(fake)
    with pytest.raises(ContactError, match="^card 'x.json'"):
        book.import_card("{}", label="x.json")
    assert len(book) == 1


def test_book_add_needs_a_contact(book, bob):
    with pytest.raises(ContactError, match="takes a Contact"):
        book.add(bob.public)


def test_name_key():
    assert name_key("Bob") == name_key("BOB") == name_key("Ｂｏｂ")
    assert name_key("Bob") != name_key("Воb")  # Cyrillic lookalikes are not folded (exercise 3)
