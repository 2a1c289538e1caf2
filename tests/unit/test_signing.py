"""DKIM signing (SPEC §6): the cryptography seam against dkimpy's own arithmetic,
the header set, relaxed/relaxed, verification and tampering, key problems, the DNS record.

Keys are made here with `cryptography`; verification is dkimpy's `dkim.verify`
with a `dnsfunc` that serves the record `dns_record()` prints.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hedwig import signing
from hedwig.config import ConfigError, parse_config
from hedwig.signing import KeyProblem, Signer, dns_record, load_signer, parse_private_key

SELECTOR, DOMAIN = "hw2024", "example.test"

MESSAGE = (
    b"Received: from client.test (client.test [127.0.0.1]) by mx.test with ESMTP id X;\r\n"
    b"\tMon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@dest.test\r\n"
    b"Subject: Hello  there\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob,  \r\n"
    b"\r\n"
    b"a body line\twith a tab\r\n"
)

# 512 bits: too short for DKIM (RFC 8301); cryptography no longer makes such keys.
RSA_512_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBUwIBADANBgkqhkiG9w0BAQEFAASCAT0wggE5AgEAAkEAzuJ+6U5ElDPIrL3g
CJnzFPnaZkjbuJSBJQPyPp/srNlbg5F3oep0uXjcSD/+RO2Pm7gGK0cmAIw8ETvV
i9DcawIDAQABAkB4PbfZTX4aTMaTb3/oP+HCDT1cOXhKnTU6GEMRFs3t3xLloqEs
ihD2CY7b6Eb2z0GfaGt8hteamfpesBwBsxphAiEA7YW5RMMbQqF9DJ0RhXHWQeRk
TAonWN1N7YI9sCSVg0MCIQDe+p8lZM2E0GpufNpw7UmnYdmdhM6H8VmdOq6o5/hr
uQIgQd35eKYaYynhQaQ0/aqJ3g/1+FhAfRYxzBF4Bea/R30CID3g2QdciPghilet
CEWsY/MyYVyoPVRWcuMCJPQ0o6jpAiAZHkix232UCQj8GdN0luXHABVHulj1tqoY
uMODS7g+sQ==
-----END PRIVATE KEY-----
"""


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def pem(key: Any, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
        encryption: Any = None) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption or serialization.NoEncryption())


def record_text(line: str) -> bytes:
    """The TXT data a resolver returns for `dns_record()`'s line: its strings joined."""
    return "".join(re.findall(r'"([^"]*)"', line)).encode()


def verify(message: bytes, key: Any) -> bool:
    txt = record_text(dns_record(SELECTOR, DOMAIN, key))
    expected = f"{SELECTOR}._domainkey.{DOMAIN}.".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return txt if name == expected else None

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


def signature_tags(signed: bytes) -> dict[str, str]:
    """The tags of the DKIM-Signature field at the top of `signed`, unfolded."""
    assert signed.startswith(b"DKIM-Signature: ")
    end = re.search(rb"\r\n(?![ \t])", signed).end()
    value = re.sub(r"\s+", "", signed[len(b"DKIM-Signature:"):end].decode())
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


def split_signature(signed: bytes) -> tuple[bytes, bytes]:
    end = re.search(rb"\r\n(?![ \t])", signed).end()
    return signed[:end], signed[end:]


def dkimpy_signs(message: bytes, key: Any, key_pem: bytes, headers: list[bytes]) -> tuple[bytes, bytes]:
    """(ours, dkimpy's) for the same message, key and header list, with the same t= value."""
    signer = Signer(DOMAIN, SELECTOR, key)
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm, privkey = b"rsa-sha256", key_pem
    else:  # dkimpy's ed25519 key format: the base64 of the 32-byte seed
        algorithm = b"ed25519-sha256"
        privkey = base64.b64encode(key.private_bytes(serialization.Encoding.Raw,
                                                     serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption()))
    for _ in range(5):  # both stamp t= from the clock: retry across a second boundary
        ours = signer.sign(message)
        theirs = dkim.sign(message, SELECTOR.encode(), DOMAIN.encode(), privkey,
                           canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=algorithm,
                           include_headers=headers)
        if signature_tags(ours)["t"] == signature_tags(theirs + message)["t"]:
            return ours, theirs + message
    raise AssertionError("could not sign twice within one second")


# -- the seam --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.PrivateFormat.PKCS8], ids=["pkcs1", "pkcs8"])
def test_rsa_signature_is_byte_for_byte_dkimpys(rsa_key, fmt, tmp_path) -> None:
    key_pem = pem(rsa_key, fmt)
    pkcs1 = fmt == serialization.PrivateFormat.TraditionalOpenSSL
    assert key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY" if pkcs1 else b"-----BEGIN PRIVATE KEY")
    path = tmp_path / "k.pem"
    path.write_bytes(key_pem)
    loaded = signing.load_private_key(str(path), "rsa")
    ours, theirs = dkimpy_signs(MESSAGE, loaded, key_pem,
                                [b"from", b"to", b"subject", b"date", b"message-id"])
    assert ours == theirs
    assert verify(ours, rsa_key)


def test_ed25519_signature_is_byte_for_byte_dkimpys(ed_key, tmp_path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(pem(ed_key))
    loaded = signing.load_private_key(str(path), "ed25519")
    ours, theirs = dkimpy_signs(MESSAGE, loaded, b"", [b"from", b"to", b"subject", b"date", b"message-id"])
    assert ours == theirs
    assert signature_tags(ours)["a"] == "ed25519-sha256"
    assert verify(ours, ed_key)


@pytest.mark.parametrize("bits", [1024, 2048, 3072])
def test_seam_function_equals_dkimpys_rsassa_pkcs1_v1_5(bits) -> None:
    """The replaced call itself, on many digests: cryptography's PKCS#1 v1.5 == dkimpy's arithmetic."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    numbers = dkim.crypto.parse_pem_private_key(pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    for i in range(8):
        data = os.urandom(i * 37)
        ours = signing._rsassa_pkcs1_v1_5_sign(hashlib.sha256(data), key)
        theirs = dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(data), numbers)
        assert ours == bytes(theirs)


def test_the_seam_is_ours_alone() -> None:
    """dkimpy itself keeps its own functions: only signing._Dkim's copies see ours."""
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim.crypto.RSASSA_PKCS1_v1_5_sign
    assert dkim.parse_pem_private_key is dkim.crypto.parse_pem_private_key
    assert signing._Dkim.sign is not dkim.DKIM.sign
    assert signing._Dkim.sign.__code__ is dkim.DKIM.sign.__code__  # dkimpy's code, unchanged
    assert signing._Dkim.gen_header.__code__ is dkim.DKIM.gen_header.__code__
    assert signing._Dkim.sign.__globals__["parse_pem_private_key"] is signing._key_as_given
    assert signing._Dkim.gen_header.__globals__["RSASSA_PKCS1_v1_5_sign"] is signing._rsassa_pkcs1_v1_5_sign


def test_rebinding_a_name_the_method_does_not_call_fails_loudly() -> None:
    with pytest.raises(ImportError, match="no_such_function"):
        signing._rebound(dkim.DKIM.sign, no_such_function=len)


# -- what is signed --------------------------------------------------------------------


def test_header_set_is_specs_fields_that_are_present(rsa_key) -> None:
    message = (b"Received: from a by b; Mon, 01 Jan 2024 00:00:00 +0000\r\n"
               b"MIME-Version: 1.0\r\nFrom: a@example.test\r\nTo: b@dest.test\r\nTo: c@dest.test\r\n"
               b"Cc: d@dest.test\r\nReply-To: e@example.test\r\nSubject: s\r\nDate: today\r\n"
               b"Message-ID: <2@example.test>\r\nContent-Type: text/plain\r\nX-Other: o\r\n"
               b"List-Id: l\r\nIn-Reply-To: <1@x>\r\nBcc: hidden@x.test\r\n\r\nbody\r\n")
    tags = signature_tags(Signer(DOMAIN, SELECTOR, rsa_key).sign(message))
    # each instance of a listed field, in message order; nothing else
    assert tags["h"].split(":") == ["mime-version", "from", "to", "to", "cc", "reply-to", "subject",
                                    "date", "message-id", "content-type"]


def test_only_present_fields_are_signed_but_from_always(rsa_key) -> None:
    signer = Signer(DOMAIN, SELECTOR, rsa_key)
    assert signature_tags(signer.sign(b"Subject: s\r\nTo: t@x.test\r\n\r\nbody\r\n"))["h"] == "subject:to:from"
    signed = signer.sign(b"Subject: s\r\n\r\nbody\r\n")
    assert verify(signed, rsa_key)
    # From was signed as absent: adding one afterwards breaks the signature
    head, rest = split_signature(signed)
    assert not verify(head + b"From: mallory@evil.test\r\n" + rest, rsa_key)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_tags_and_message_kept_byte_for_byte(kind, rsa_key, ed_key) -> None:
    key = rsa_key if kind == "rsa" else ed_key
    signed = Signer(DOMAIN, SELECTOR, key).sign(MESSAGE)
    head, rest = split_signature(signed)
    assert rest == MESSAGE  # SPEC §10: one field on top, the rest unchanged
    assert head.endswith(b"\r\n") and b"\n" not in head.replace(b"\r\n", b"")
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))  # folded
    tags = signature_tags(signed)
    assert tags["v"] == "1"
    assert tags["a"] == ("rsa-sha256" if kind == "rsa" else "ed25519-sha256")
    assert tags["c"] == "relaxed/relaxed"
    assert (tags["d"], tags["s"]) == (DOMAIN, SELECTOR)
    assert tags["h"] == "from:to:subject:date:message-id"
    assert "l" not in tags  # the whole body is signed


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_relaxed_relaxed_survives_whitespace_and_case_but_not_changes(kind, rsa_key, ed_key) -> None:
    key = rsa_key if kind == "rsa" else ed_key
    signed = Signer(DOMAIN, SELECTOR, key).sign(MESSAGE)
    assert verify(signed, key)
    # relaxed header: name case, whitespace runs and folding do not matter
    assert verify(signed.replace(b"Subject: Hello  there", b"SUBJECT:   Hello\r\n  there "), key)
    # relaxed body: trailing whitespace, runs of WSP and trailing empty lines do not matter
    assert verify(signed.replace(b"Hello Bob,  \r\n", b"Hello   Bob,\r\n") + b"\r\n\r\n", key)
    # but content does
    assert not verify(signed.replace(b"Subject: Hello  there", b"Subject: Hello there!"), key)
    assert not verify(signed.replace(b"To: bob@dest.test", b"To: eve@dest.test"), key)
    assert not verify(signed.replace(b"a body line", b"a body lime"), key)
    # an unsigned field may change
    assert verify(signed.replace(b"X-Mailer: test", b"X-Mailer: other"), key)


def test_unparseable_message_raises_and_never_returns_it_unsigned(rsa_key) -> None:
    with pytest.raises(dkim.DKIMException):
        Signer(DOMAIN, SELECTOR, rsa_key).sign(b"From: a@x.test\r\nnot a header line\r\n\r\nbody\r\n")


# -- keys and config -------------------------------------------------------------------


def dkim_config(tmp_path: Path, key_bytes: bytes | None, key_type: str = "rsa", **dkim_keys: str):
    path = tmp_path / "dkim.pem"
    if key_bytes is not None:
        path.write_bytes(key_bytes)
    table = {"domain": DOMAIN, "selector": SELECTOR, "private_key": str(path), "key_type": key_type}
    table.update(dkim_keys)
    return parse_config({"server": {"listeners": [{"addr": "127.0.0.1:2525"}], "dkim": table},
                         "storage": {"base_path": str(tmp_path / "spool")}}, check_files=False), path


def test_load_signer_without_dkim_is_none(tmp_path) -> None:
    config = parse_config({"server": {"listeners": [{"addr": "127.0.0.1:2525"}]},
                           "storage": {"base_path": str(tmp_path)}})
    assert load_signer(config) is None


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.PrivateFormat.PKCS8], ids=["pkcs1", "pkcs8"])
def test_load_signer_rsa(tmp_path, rsa_key, fmt) -> None:
    config, _ = dkim_config(tmp_path, pem(rsa_key, fmt))
    signer = load_signer(config)
    assert signer is not None and signer.key_type == "rsa" and signer.algorithm == b"rsa-sha256"
    assert verify(signer.sign(MESSAGE), rsa_key)


def test_load_signer_ed25519(tmp_path, ed_key) -> None:
    config, _ = dkim_config(tmp_path, pem(ed_key), "ed25519")
    signer = load_signer(config)
    assert signer is not None and signer.key_type == "ed25519"
    assert verify(signer.sign(MESSAGE), ed_key)


BAD_KEYS = {
    "missing": (None, "rsa", "cannot read"),
    "empty": (b"", "rsa", "not a PEM private key"),
    "garbage": (b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n", "rsa",
                "not a PEM private key"),
    "not PEM at all": (b"hello\n", "ed25519", "not a PEM private key"),
    "ed25519 key, key_type rsa": ("ed25519", "rsa", 'holds an ed25519 key but server.dkim.key_type is "rsa"'),
    "rsa key, key_type ed25519": ("rsa", "ed25519", 'holds an rsa key but server.dkim.key_type is "ed25519"'),
    "rsa pkcs1, key_type ed25519": ("rsa-pkcs1", "ed25519", "holds an rsa key"),
    "ec key": ("ec", "rsa", "DKIM keys are rsa or ed25519"),
    "encrypted": ("encrypted", "rsa", "the key is encrypted"),
    "512-bit rsa": (RSA_512_PEM, "rsa", "512-bit RSA key; DKIM needs at least 1024 bits"),
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_bad_key_is_one_config_error_naming_the_key(tmp_path, rsa_key, ed_key, case) -> None:
    content, key_type, expected = BAD_KEYS[case]
    made = {"ed25519": pem(ed_key), "rsa": pem(rsa_key),
            "rsa-pkcs1": pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL),
            "ec": pem(ec.generate_private_key(ec.SECP256R1())),
            "encrypted": pem(rsa_key, encryption=serialization.BestAvailableEncryption(b"secret"))}
    config, path = dkim_config(tmp_path, made.get(content, content), key_type)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        load_signer(config)
    text = str(info.value)
    assert text.startswith("config: server.dkim.private_key: "), text
    assert str(path) in text and expected in text, text
    assert "\n" not in text


@pytest.mark.parametrize(("key", "value"), [("domain", "exa_mple..test"), ("selector", "-bad-")])
def test_bad_domain_or_selector_is_named(tmp_path, rsa_key, key, value) -> None:
    config, _ = dkim_config(tmp_path, pem(rsa_key), **{key: value})
    with pytest.raises(ConfigError, match=rf"^config: server\.dkim\.{key}: expected"):
        load_signer(config)


def test_key_problem_from_parse_private_key_names_the_source(ed_key) -> None:
    with pytest.raises(KeyProblem, match=r"^somewhere\.pem holds an ed25519 key"):
        parse_private_key(pem(ed_key), "rsa", "somewhere.pem")


# -- key files and the DNS record ------------------------------------------------------


def test_write_private_key_is_0600_and_never_overwrites(tmp_path, ed_key) -> None:
    path = tmp_path / "new.pem"
    signing.write_private_key(str(path), ed_key)
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_bytes()
    assert first.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(FileExistsError):
        signing.write_private_key(str(path), other)
    assert path.read_bytes() == first
    loaded = parse_private_key(first, "ed25519", str(path))
    assert loaded.public_key().public_bytes_raw() == ed_key.public_key().public_bytes_raw()


@pytest.mark.parametrize("bits", [1024, 2048, 4096])
def test_rsa_record_format_and_public_key(bits) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    line = dns_record("sel", "Example.Test.", key)
    m = re.fullmatch(r'sel\._domainkey\.Example\.Test\. IN TXT ((?:"[^"]*" ?)+)', line)
    assert m, line
    strings = re.findall(r'"([^"]*)"', line)
    assert all(1 <= len(s) <= 255 for s in strings)
    assert all(len(s) == 255 for s in strings[:-1])  # consecutive 255-byte pieces
    assert line.count('" "') == len(strings) - 1  # one line, strings separated by one space
    text = "".join(strings)
    assert text.startswith("v=DKIM1; k=rsa; p=")
    spki = base64.b64decode(text.split("p=", 1)[1], validate=True)
    public = serialization.load_der_public_key(spki)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert len(strings) == -(-len(text) // 255)


def test_ed25519_record_is_the_raw_32_byte_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    line = dns_record("s", "example.test", key)
    assert re.fullmatch(r's\._domainkey\.example\.test\. IN TXT "v=DKIM1; k=ed25519; p=[A-Za-z0-9+/=]{44}"', line)
    raw = base64.b64decode(record_text(line).split(b"p=", 1)[1])
    assert raw == key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize("name", ["example.com", "a-b.c_d.test", "2024-01", "x.", "_dmarc.x"])
def test_dns_names_accepted(name) -> None:
    assert signing.check_dns_name(name, "x") == name.rstrip(".")


@pytest.mark.parametrize("name", ["", "a b", "-a.test", "a-.test", "a..test", "é.test", "a/b", "x" * 64])
def test_dns_names_refused(name) -> None:
    with pytest.raises(KeyProblem):
        signing.check_dns_name(name, "x")
