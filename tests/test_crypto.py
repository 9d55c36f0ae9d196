"""bubble_ref.crypto: identities, public keys, hybrid boxes and padding buckets."""
from __future__ import annotations

import hashlib
import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bubble_ref import crypto
from bubble_ref.crypto import (
    BOX_OVERHEAD, BOX_SIZES, BUCKETS, BoxError, ContentTooLarge, CryptoError, Identity, KeyRejected, PublicKey,
    load_public_key, open_box, seal_box)

from conftest import b64, flip_byte


def spki_pem(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def spki_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def pkcs8_pem(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


# ---------------------------------------------------------------- constants

def test_constants():
    assert crypto.KEY_BITS == 2048
    assert crypto.PUBLIC_EXPONENT == 65537
    assert crypto.WRAPPED_KEY_BYTES == 256
    assert (crypto.NONCE_BYTES, crypto.TAG_BYTES) == (12, 16)
    assert BOX_OVERHEAD == 284
    assert issubclass(KeyRejected, CryptoError) and issubclass(BoxError, CryptoError)
    assert issubclass(ContentTooLarge, CryptoError) and issubclass(CryptoError, ValueError)


# --------------------------------------------------------------- identities

def test_generated_identity_is_rsa_2048_e65537(alice):
    numbers = alice.private_key.private_numbers().public_numbers
    assert alice.private_key.key_size == 2048
    assert numbers.e == 65537
    assert alice.id == alice.public.id
    assert repr(alice).startswith(f"Identity(id={alice.id[:12]}")


def test_identities_differ(alice, bob, mallory):
    assert len({alice.id, bob.id, mallory.id}) == 3


def test_save_and_load_without_password(alice, tmp_path):
    path = alice.save(tmp_path / "alice.pem")
    assert path == tmp_path / "alice.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    loaded = Identity.load(path)
    assert loaded.id == alice.id
    assert loaded.private_key.private_numbers() == alice.private_key.private_numbers()
    assert Identity.load(str(path)).id == alice.id


@pytest.mark.parametrize("password", ["correct horse", b"correct horse"], ids=["str", "bytes"])
def test_save_and_load_with_password(alice, tmp_path, password):
    path = alice.save(tmp_path / "alice.pem", password=password)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert Identity.load(path, "correct horse").id == alice.id
    assert Identity.load(path, b"correct horse").id == alice.id


def test_wrong_password(alice, tmp_path):
    path = alice.save(tmp_path / "alice.pem", password="right")
    with pytest.raises(KeyRejected, match="wrong password for this key file") as excinfo:
        Identity.load(path, "wrong")
    assert type(excinfo.value) is KeyRejected


@pytest.mark.parametrize("password", [None, ""], ids=["none", "empty"])
def test_missing_password(alice, tmp_path, password):
    path = alice.save(tmp_path / "alice.pem", password="right")
    with pytest.raises(KeyRejected, match="the key file is encrypted; give its password") as excinfo:
        Identity.load(path, password)
    assert type(excinfo.value) is KeyRejected


def test_password_for_an_unencrypted_file(alice, tmp_path):
    path = alice.save(tmp_path / "alice.pem")
    with pytest.raises(KeyRejected, match="the key file is not encrypted"):
        Identity.load(path, "surplus")


def test_to_pem_round_trip(alice):
    assert Identity.from_pem(alice.to_pem()).id == alice.id
    assert Identity.from_pem(alice.to_pem().decode()).id == alice.id
    assert Identity.from_pem(alice.to_pem("pw"), "pw").id == alice.id


def test_not_a_pem_file():
    with pytest.raises(KeyRejected, match="not a PEM private key") as excinfo:
        Identity.from_pem(b"this is not a key file")
    assert type(excinfo.value) is KeyRejected


def test_ec_private_key_file_is_refused(tmp_path):
    path = tmp_path / "ec.pem"
    path.write_bytes(pkcs8_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyRejected, match=r"private key is an EC key \(secp256r1\); the protocol needs RSA-2048"):
        Identity.load(path)


def test_ed25519_private_key_file_is_refused(tmp_path):
    path = tmp_path / "ed.pem"
    path.write_bytes(pkcs8_pem(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(KeyRejected, match="private key is an Ed25519 key"):
        Identity.load(path)


def test_weak_private_keys_are_refused(tmp_path, weak_rsa_1024):
    path = tmp_path / "weak.pem"
    path.write_bytes(pkcs8_pem(weak_rsa_1024))
    with pytest.raises(KeyRejected, match="private key is 1024 bits; the protocol needs 2048"):
        Identity.load(path)
    with pytest.raises(KeyRejected, match="1024 bits"):
        Identity(weak_rsa_1024)


def test_sign_is_rsa_pss_that_public_key_verifies(alice, bob):
    signature = alice.sign(b"data")
    assert len(signature) == 256
    assert alice.public.verify(signature, b"data")
    assert not alice.public.verify(signature, b"other data")
    assert not bob.public.verify(signature, b"data")
    assert not alice.public.verify(flip_byte(signature, 10), b"data")
    # PSS is randomised: two signatures of the same data differ and both verify
    again = alice.sign(b"data")
    assert again != signature and alice.public.verify(again, b"data")


# -------------------------------------------------------------- public keys

def test_public_key_pem_and_base64_der_normalise_to_the_same_key(alice):
    der = spki_der(alice.private_key.public_key())
    pem = spki_pem(alice.private_key.public_key())
    spellings = [pem, pem.encode(), b64(der), b64(der).encode(), "  " + pem + "\n\n", pem.replace("\n", "\r\n"),
                 alice.private_key.public_key(), alice.public]
    loaded = [load_public_key(s) for s in spellings]
    for key in loaded:
        assert key.id == alice.id
        assert key.b64 == b64(der)
        assert key.der == der
        assert key == alice.public
    assert alice.public.pem == pem
    assert repr(alice.public) == f"PublicKey(id={alice.id[:12]}…)"


def test_fingerprint_is_hex_sha256_of_der(alice):
    der = spki_der(alice.private_key.public_key())
    expected = hashlib.sha256(der).hexdigest()
    assert crypto.fingerprint(der) == expected
    assert alice.id == expected
    assert len(alice.id) == 64 and alice.id == alice.id.lower()
    assert load_public_key(alice.public.b64).id == expected


def test_public_key_equality_uses_der(alice, bob):
    assert PublicKey.from_key(alice.private_key.public_key()) == alice.public
    assert alice.public != bob.public


def test_1024_bit_key_is_refused(weak_rsa_1024):
    public = weak_rsa_1024.public_key()
    for spelling in (spki_pem(public), b64(spki_der(public)), public):
        with pytest.raises(KeyRejected, match="key is 1024 bits; the protocol needs 2048") as excinfo:
            load_public_key(spelling)
        assert type(excinfo.value) is KeyRejected


def test_exponent_3_key_is_refused(alice):
    n = alice.private_key.public_key().public_numbers().n
    e3 = rsa.RSAPublicNumbers(3, n).public_key()
    assert e3.key_size == 2048  # the size is right; only the exponent is wrong
    for spelling in (spki_pem(e3), b64(spki_der(e3)), e3):
        with pytest.raises(KeyRejected, match="public exponent 3; the protocol needs 65537"):
            load_public_key(spelling)


def test_ec_public_key_is_refused():
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    for spelling in (spki_pem(public), b64(spki_der(public)), public):
        with pytest.raises(KeyRejected, match=r"key is an EC key \(secp256r1\); the protocol needs RSA-2048"):
            load_public_key(spelling)


def test_ed25519_public_key_is_refused():
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    for spelling in (spki_pem(public), b64(spki_der(public)), public):
        with pytest.raises(KeyRejected, match="key is an Ed25519 key; the protocol needs RSA-2048"):
            load_public_key(spelling)


@pytest.mark.parametrize("text", ["AAAA", b64(b"not DER at all"), b64(bytes(300))])
def test_garbage_base64_is_refused(text):
    with pytest.raises(KeyRejected, match="not a public key: the data is not a DER or PEM key") as excinfo:
        load_public_key(text)
    assert type(excinfo.value) is KeyRejected


@pytest.mark.parametrize("text", ["this is not base64!", "abc$", "QQ"])
def test_non_base64_text_is_refused(text):
    with pytest.raises(KeyRejected, match="not a public key: not valid base64"):
        load_public_key(text)


def test_other_unreadable_keys_are_refused():
    with pytest.raises(KeyRejected, match="the data is not a DER or PEM key"):
        load_public_key("-----BEGIN PUBLIC KEY-----\nQUJD\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyRejected, match="bytes that are not ASCII text"):
        load_public_key("é".encode("utf-8"))
    with pytest.raises(KeyRejected, match="not a key"):
        load_public_key(12345)


def test_role_is_named_in_the_message(weak_rsa_1024):
    with pytest.raises(KeyRejected, match="^recipient key is 1024 bits"):
        load_public_key(weak_rsa_1024.public_key(), "recipient key")


# -------------------------------------------------------------------- boxes

@pytest.mark.parametrize("size", [0, 1, 190, 191, 1024, 65536 + BOX_OVERHEAD])
def test_box_round_trip_and_size(bob, size):
    plaintext = bytes(range(256)) * (size // 256) + bytes(size % 256)
    box = seal_box(bob.public, plaintext)
    assert len(box) == size + 284
    assert open_box(bob, box) == plaintext


def test_box_accepts_recipient_as_text(bob):
    assert open_box(bob, seal_box(bob.public.b64, b"hello")) == b"hello"
    assert open_box(bob, seal_box(bob.public.pem, b"hello")) == b"hello"


def test_boxes_are_randomised(bob):
    first, second = seal_box(bob.public, b"same"), seal_box(bob.public, b"same")
    assert first != second
    assert first[256:268] != second[256:268]  # fresh nonce
    assert open_box(bob, first) == open_box(bob, second) == b"same"


def test_seal_box_refuses_weak_recipients(weak_rsa_1024):
    with pytest.raises(KeyRejected, match="recipient key is 1024 bits"):
        seal_box(weak_rsa_1024.public_key(), b"x")


PLAINTEXT = b"attack at dawn, " * 8  # 128 bytes: ciphertext at 268..395, tag at 396..411


@pytest.mark.parametrize("index, phrase", [
    (0, "cannot unwrap the box key"),
    (128, "cannot unwrap the box key"),
    (255, "cannot unwrap the box key"),
    (256, "authentication tag mismatch"),  # nonce
    (267, "authentication tag mismatch"),
    (268, "authentication tag mismatch"),  # ciphertext
    (268 + 127, "authentication tag mismatch"),
    (268 + 128, "authentication tag mismatch"),  # tag
    (-1, "authentication tag mismatch"),
], ids=["wrapped-first", "wrapped-middle", "wrapped-last", "nonce-first", "nonce-last", "ciphertext-first",
        "ciphertext-last", "tag-first", "tag-last"])
def test_tampered_box(bob, index, phrase):
    box = seal_box(bob.public, PLAINTEXT)
    assert len(box) == 256 + 12 + len(PLAINTEXT) + 16
    with pytest.raises(BoxError, match=phrase) as excinfo:
        open_box(bob, flip_byte(box, index))
    assert type(excinfo.value) is BoxError


def test_box_for_another_recipient(bob, mallory):
    with pytest.raises(BoxError, match="not addressed to this key") as excinfo:
        open_box(mallory, seal_box(bob.public, b"for bob only"))
    assert type(excinfo.value) is BoxError


@pytest.mark.parametrize("length", [0, 1, 256, 283])
def test_truncated_box_names_the_size(bob, length):
    box = seal_box(bob.public, b"short")
    with pytest.raises(BoxError, match=f"box is {length} bytes; a box is at least 284 bytes"):
        open_box(bob, box[:length])


def test_box_cut_after_the_header_fails_authentication(bob):
    box = seal_box(bob.public, b"some plaintext")
    with pytest.raises(BoxError, match="authentication tag mismatch"):
        open_box(bob, box[:-1])
    with pytest.raises(BoxError, match="authentication tag mismatch"):
        open_box(bob, box + b"\x00")


def test_wrapped_key_of_the_wrong_length(bob):
    # a well-formed OAEP wrap of 16 bytes instead of a 32-byte AES key
    box = bob.public.key.encrypt(bytes(16), crypto.OAEP) + bytes(12 + 16)
    with pytest.raises(BoxError, match="the unwrapped key is 16 bytes; an AES-256 key is 32 bytes"):
        open_box(bob, box)


# ---------------------------------------------------------------- RSA-OAEP

def test_oaep_limit(bob):
    assert crypto.OAEP_MAX_PLAINTEXT == 190
    assert len(bob.public.key.encrypt(bytes(190), crypto.OAEP)) == 256
    with pytest.raises(ValueError):
        bob.public.key.encrypt(bytes(191), crypto.OAEP)


def test_inner_json_does_not_fit_raw_oaep(alice):
    # the reason for hybrid boxes: the sender's key alone is longer than OAEP can carry
    assert len(json.dumps({"sender": alice.public.b64})) > crypto.OAEP_MAX_PLAINTEXT


# ------------------------------------------------------------------ padding

def test_buckets_and_box_sizes():
    assert BUCKETS == (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    assert BOX_SIZES == (1308, 2332, 4380, 8476, 16668, 33052, 65820)
    assert BOX_SIZES == tuple(b + BOX_OVERHEAD for b in BUCKETS)


@pytest.mark.parametrize("length, bucket", [(0, 1024), (1, 1024), (1024, 1024), (1025, 2048), (2048, 2048),
                                            (2049, 4096), (40000, 65536), (65535, 65536), (65536, 65536)])
def test_bucket_for(length, bucket):
    assert crypto.bucket_for(length) == bucket
    padded = crypto.pad_to_bucket(b"{" * length)
    assert len(padded) == bucket
    assert padded[:length] == b"{" * length
    assert set(padded[length:]) <= {ord(" ")}


@pytest.mark.parametrize("length", [65537, 100000])
def test_content_too_large(length):
    with pytest.raises(ContentTooLarge) as excinfo:
        crypto.bucket_for(length)
    message = str(excinfo.value)
    assert type(excinfo.value) is ContentTooLarge
    assert f"message is {length} bytes" in message
    assert "65536 bytes (64 KiB)" in message
    assert f"shorten it by {length - 65536} bytes" in message
    with pytest.raises(ContentTooLarge, match=f"message is {length} bytes"):
        crypto.pad_to_bucket(bytes(length))


def test_padding_keeps_json_readable():
    data = json.dumps({"content": "hi"}).encode()
    padded = crypto.pad_to_bucket(data)
    assert len(padded) == 1024
    assert json.loads(padded) == {"content": "hi"}
