"""DKIM signing (SPEC §6): our DKIM format byte for byte dkimpy's (seeded random
messages, hypothesis, and examples), the RSA operation against dkimpy's own
arithmetic, the header set, relaxed/relaxed, verification and tampering, key
problems, the DNS record.

Keys are made here with `cryptography`; verification is dkimpy's `dkim.verify`
with a `dnsfunc` that serves the record `dns_record()` prints.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import time
import types
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# -- byte for byte dkimpy's ------------------------------------------------------------
#
# Signer.sign() writes the DKIM format itself; dkimpy is the reference. Each
# comparison signs with dkim.sign() too, same key, same header list (SPEC §6:
# the listed fields present, every instance, From always) and the same t=
# (both clocks fixed, at a fraction of a second to check both truncate), and
# asks for identical bytes, then verifies ours with dkim.verify.

T = 1_764_121_234.75


@pytest.fixture()
def frozen_dkimpy(monkeypatch) -> None:
    """dkimpy's t= comes from time.time(), looked up in the dkim module: fix it there only."""
    monkeypatch.setattr(dkim, "time", types.SimpleNamespace(time=lambda: T))


def dkimpy_privkey(key: Any, fmt: serialization.PrivateFormat) -> tuple[bytes, bytes]:
    """(signature_algorithm, privkey) as dkim.sign takes them."""
    if isinstance(key, rsa.RSAPrivateKey):
        return b"rsa-sha256", pem(key, fmt)
    # dkimpy's ed25519 key format: the base64 of the 32-byte seed
    return b"ed25519-sha256", base64.b64encode(key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))


def spec_headers(message: bytes) -> list[bytes]:
    """SPEC §6's include list, from dkimpy's own parse of the message."""
    names = [name.lower() for name, _ in dkim.rfc822_parse(message)[0] if name.lower() in signing.SIGNED_HEADERS]
    return names if b"from" in names else [*names, b"from"]


def dkimpy_signs(message: bytes, key: Any,
                 fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    """dkim.sign()'s field on top of `message` (needs frozen_dkimpy)."""
    algorithm, privkey = dkimpy_privkey(key, fmt)
    return dkim.sign(message, SELECTOR.encode(), DOMAIN.encode(), privkey, canonicalize=(b"relaxed", b"relaxed"),
                     signature_algorithm=algorithm, include_headers=spec_headers(message)) + message


NAMES = [b"From", b"To", b"Cc", b"Subject", b"Date", b"Message-ID", b"Reply-To", b"MIME-Version",
         b"Content-Type", b"Received", b"X-Mailer", b"List-Id", b"Bcc", b"In-Reply-To", b"DKIM-Signature",
         b"Sender", b"X-Spam-Status"]
WORDS = [b"alice@example.test", b"<bob@dest.test>", b"Hello", b"=?utf-8?q?caf=C3=A9?=", b"caf\xc3\xa9",
         b"\xff\xfe", b"(comment)", b"a;b=c", b"b=", b"1.0", b"text/plain;", b'charset="utf-8"', b"x" * 90,
         b":", b"\x01", b"\r"]
SPACES = [b" ", b" ", b" ", b"  ", b"\t", b" \t ", b" " * 9, b"\r\n ", b"\r\n\t", b"\r\n  \t", b""]


def case(rng: random.Random, name: bytes) -> bytes:
    style = rng.randrange(5)
    if style == 0:
        return name.lower()
    if style == 1:
        return name.upper()
    if style == 2:
        return bytes(c ^ 0x20 if chr(c).isalpha() and rng.random() < 0.5 else c for c in name)
    return name


def field_value(rng: random.Random) -> bytes:
    value = rng.choice([b"", b" ", b"  ", b"\t", b" \t"])
    for _ in range(rng.randrange(6)):
        value += rng.choice(WORDS if rng.random() < 0.8 else [b"\r"]) + rng.choice(SPACES)
    return value + rng.choice([b"", b"", b" ", b"\t ", b"  "])


def body_line(rng: random.Random) -> bytes:
    parts = [rng.choice(WORDS[:-1] + [b"", b"a", b"the", b"."]) for _ in range(rng.randrange(12))]
    line = b"".join(p + rng.choice([b" ", b" ", b" ", b"  ", b"\t", b" \t", b"", b" " * 9, b"\t \t   \t"])
                    for p in parts)
    return rng.choice([b"", b"", b" ", b"\t", b"  "]) + line


def random_message(rng: random.Random) -> bytes:
    """Varied casing, folding, WSP runs, tabs, 8-bit bytes, duplicates, fields outside the set,
    missing fields, no From, empty and odd bodies, LF and mixed line ends."""
    names = rng.sample(NAMES, rng.randrange(len(NAMES)))
    if rng.random() < 0.85 and b"From" not in names:
        names.insert(rng.randrange(len(names) + 1), b"From")
    for _ in range(rng.randrange(4)):  # duplicates, anywhere
        names.insert(rng.randrange(len(names) + 1), rng.choice([b"From", b"To", b"Cc", b"Subject", b"Received"]))
    head = [case(rng, n) + b":" + field_value(rng) for n in names]
    lines = [body_line(rng) for _ in range(rng.choice([0, 0, 1, 2, 5, 20, 60]))]
    lines += [rng.choice([b"", b" ", b"\t", b"  "]) for _ in range(rng.choice([0, 0, 0, 1, 3]))]  # trailing
    newline = rng.choice([b"\r\n"] * 8 + [b"\n", b"mixed"])
    end = rng.choice([b"\r\n"] * 4 + [b""])  # a body without its final line end
    if rng.random() < 0.05:  # no body at all, or no header at all
        text = b"\r\n".join(head) + rng.choice([b"", b"\r\n"]) if head else b"X: y\r\n"
    else:
        text = b"\r\n".join(head + [b""] + lines) + end
    if newline == b"\n":
        text = text.replace(b"\r\n", b"\n")
    elif newline == b"mixed":
        text = re.sub(rb"\r\n", lambda _: rng.choice([b"\r\n", b"\n"]), text)
    return text


RANDOM_MESSAGES = [random_message(random.Random(seed)) for seed in range(300)]
ALL_KINDS = {"rsa-pkcs1": serialization.PrivateFormat.TraditionalOpenSSL,
             "rsa-pkcs8": serialization.PrivateFormat.PKCS8, "ed25519": serialization.PrivateFormat.PKCS8}


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_byte_for_byte_dkimpys_over_many_messages(kind, rsa_key, ed_key, tmp_path, frozen_dkimpy) -> None:
    key_pem = pem(ed_key if kind == "ed25519" else rsa_key, ALL_KINDS[kind])
    assert key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY" if kind == "rsa-pkcs1" else b"-----BEGIN PRIVATE KEY")
    path = tmp_path / "k.pem"
    path.write_bytes(key_pem)
    loaded = signing.load_private_key(str(path), kind.partition("-")[0])
    signer = Signer(DOMAIN, SELECTOR, loaded, clock=lambda: T)
    # dkimpy's pure-Python RSA takes ~8 ms a signature: RSA gets every third message
    messages = RANDOM_MESSAGES if kind == "ed25519" else RANDOM_MESSAGES[list(ALL_KINDS).index(kind)::3]
    for i, message in enumerate(messages):
        ours = signer.sign(message)
        assert ours == dkimpy_signs(message, loaded, ALL_KINDS[kind]), (i, message)
        assert verify(ours, loaded), (i, message)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_the_bench_message_and_the_examples_are_dkimpys(kind, rsa_key, ed_key, frozen_dkimpy) -> None:
    key = rsa_key if kind == "rsa" else ed_key
    signer = Signer(DOMAIN, SELECTOR, key, clock=lambda: T)
    examples = [MESSAGE, MESSAGE.replace(b"\r\n", b"\n"),
                b"From: a@x.test\r\n\r\n", b"From: a@x.test\r\n", b"From: a@x.test", b"\r\nbody only\r\n",
                b"To: a\r\nFrom: 1\r\nTo: b\r\nFrom: 2\r\nSubject: s\r\nTo: c\r\n\r\nduplicates\r\n",
                b"From: a\r\n\r\n\r\n\r\n", b"From: a\r\n\r\n \t \r\n\r\n", b"From: a\r\n\r\nno final line end",
                b"From mbox line\r\nFrom: a@x.test\r\n\r\nbody\r\n", b"From: a\r\n\r\nlone\rcr \r\r\n"]
    for message in examples:
        assert signer.sign(message) == dkimpy_signs(message, key), message
    assert signature_tags(signer.sign(MESSAGE))["t"] == "1764121234"


def test_the_clock_is_now_by_default(ed_key) -> None:
    before = int(time.time())
    t = int(signature_tags(Signer(DOMAIN, SELECTOR, ed_key).sign(MESSAGE))["t"])
    assert before <= t <= time.time()


@pytest.mark.parametrize("message", RANDOM_MESSAGES[:100])
def test_parse_is_dkimpys_rfc822_parse(message) -> None:
    headers, body = dkim.rfc822_parse(message)
    assert signing._parse(message) == ([(name, value) for name, value in headers], body)


header_bytes = st.lists(st.sampled_from([b"From", b"from", b"To", b"Subject", b"X", b":", b" ", b"\t", b"\r",
                                         b"\n", b"\r\n", b"a", b"\xe9", b"From ", b"b=", b";"]), max_size=30)


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=header_bytes.map(b"".join), body=header_bytes.map(b"".join))
def test_any_bytes_are_signed_as_dkimpy_signs_them_or_refused(head, body, ed_key, frozen_dkimpy) -> None:
    """Arbitrary header and body bytes: the same field as dkimpy, or an error where dkimpy errs."""
    message = head + b"\r\n\r\n" + body
    try:
        headers, parsed_body = dkim.rfc822_parse(message)
        theirs = dkimpy_signs(message, ed_key)
    except Exception:  # noqa: BLE001 - dkimpy refuses it (MessageFormatError, or trips: IndexError)
        with pytest.raises(dkim.DKIMException):
            Signer(DOMAIN, SELECTOR, ed_key, clock=lambda: T).sign(message)
        return
    assert signing._parse(message) == ([(name, value) for name, value in headers], parsed_body)
    assert Signer(DOMAIN, SELECTOR, ed_key, clock=lambda: T).sign(message) == theirs


wsp_text = st.lists(st.sampled_from([b" ", b"\t", b"a", b"\r", b"\n", b"\r\n", b"\xa0", b"\x0b"]),
                    max_size=40).map(b"".join)


@settings(max_examples=500, derandomize=True, database=None)
@given(text=wsp_text)
def test_canonicalisation_helpers_are_dkimpys(text) -> None:
    from dkim.canonicalization import Relaxed, compress_whitespace

    assert signing._squeeze(text) == compress_whitespace(text)
    crlf = re.sub(rb"\r?\n", b"\r\n", text)  # as dkimpy's rfc822_parse leaves a body
    assert signing._relaxed_body(crlf) == Relaxed.canonicalize_body(crlf)
    [(_, value)] = Relaxed.canonicalize_headers([(b"x", crlf + b"\r\n")])
    assert signing._relaxed_value(crlf + b"\r\n") + b"\r\n" == value


@pytest.mark.parametrize("bits", [1024, 2048, 3072])
def test_rsa_operation_equals_dkimpys_rsassa_pkcs1_v1_5(bits) -> None:
    """OpenSSL's PKCS#1 v1.5 (what we sign with) == dkimpy's own arithmetic, on many digests."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    numbers = dkim.crypto.parse_pem_private_key(pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    for i in range(8):
        data = os.urandom(i * 37)
        ours = signing._rsa_sign_digest(key, hashlib.sha256(data).digest())
        theirs = dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(data), numbers)
        assert ours == bytes(theirs)


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
