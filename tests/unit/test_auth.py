"""hedwig.smtp.auth: scrypt hashes, the SASL exchanges, redaction. Pure, no sockets.

Most hashes use n=2**10 so the suite stays fast; one test uses the defaults. The
only patch is a spy around hashlib.scrypt (the standard library, not our code) that
counts derivations, to show unknown users cost a derivation like real ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from hedwig.smtp import auth
from hedwig.smtp.address import ProtocolError
from hedwig.smtp.auth import (
    R235_AUTH_OK,
    R501_AUTH_CANCELLED,
    R501_AUTH_DECODE,
    R501_AUTH_INITIAL,
    R501_AUTH_SYNTAX,
    R504_AUTH_MECH,
    R535_AUTH_FAILED,
    Challenge,
    Done,
    Failed,
    SaslExchange,
    Step,
    cram_nonce,
    hash_password,
    is_hashed,
    is_valid_hash,
    mechanisms_for,
    parse_auth,
    redact,
    verify_password,
)

FAST: dict[str, Any] = {"n": 2**10, "r": 8, "p": 1}  # fast scrypt for tests
SALT = b"0123456789abcdef"
HOST = "mx.test"
NONCE = "1896.697170952"


def b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


ALICE_HASH = hash_password("alice-secret", salt=SALT, **FAST)
USERS: dict[str, str] = {
    "alice": ALICE_HASH,  # hashed
    "bob": "bob-plain",  # plain text
    "jörg": "pässwörd",  # non-ASCII both ways
}


def exchange(mechanism: str, initial: str | None = None, users: Mapping[str, str] = USERS,
             nonce: str = NONCE, hostname: str = HOST) -> SaslExchange:
    return SaslExchange(mechanism, initial, users, hostname=hostname, challenge_nonce=nonce)


def run(ex: SaslExchange, *lines: str) -> list[Step]:
    """Start the exchange and answer each Challenge with the next line; all steps."""
    steps = [ex.start()]
    for line in lines:
        assert isinstance(steps[-1], Challenge), steps
        steps.append(ex.respond(line))
    return steps


def final(ex: SaslExchange, *lines: str) -> Step:
    steps = run(ex, *lines)
    assert not isinstance(steps[-1], Challenge), steps
    assert ex.finished
    return steps[-1]


def cram_digest(password: str, challenge: str) -> str:
    return hmac.new(password.encode(), challenge.encode(), "md5").hexdigest()


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Spy on hashlib.scrypt: every derivation still runs, and is recorded."""
    calls: list[dict[str, Any]] = []
    real: Callable[..., bytes] = hashlib.scrypt

    def spy(password: bytes, **kwargs: Any) -> bytes:
        calls.append(kwargs)
        return real(password, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", spy)
    return calls


# -- hashes --------------------------------------------------------------------


def test_hash_format_and_round_trip() -> None:
    stored = hash_password("correct horse", salt=SALT, **FAST)
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "1024", "8", "1")
    assert unb64(salt) == SALT
    expected = hashlib.scrypt(b"correct horse", salt=SALT, n=1024, r=8, p=1, dklen=32)
    assert unb64(digest) == expected
    assert verify_password("correct horse", stored)
    assert is_hashed(stored) and is_valid_hash(stored)


def test_wrong_password() -> None:
    stored = hash_password("correct horse", **FAST)
    assert not verify_password("correct horsf", stored)
    assert not verify_password("", stored)
    assert not verify_password("correct horse ", stored)


def test_random_salt_differs() -> None:
    a, b = hash_password("pw", **FAST), hash_password("pw", **FAST)
    assert a != b
    assert len(unb64(a.split("$")[4])) == auth.SALT_BYTES
    assert verify_password("pw", a) and verify_password("pw", b)


def test_non_ascii_password() -> None:
    stored = hash_password("pässwörd ✉", salt=SALT, **FAST)
    assert verify_password("pässwörd ✉", stored)
    assert not verify_password("passwort ✉", stored)


def test_default_parameters_round_trip_and_cost() -> None:
    start = time.perf_counter()
    stored = hash_password("default-cost")
    elapsed = time.perf_counter() - start
    assert stored.startswith(f"scrypt${auth.DEFAULT_N}${auth.DEFAULT_R}${auth.DEFAULT_P}$")
    assert verify_password("default-cost", stored)
    assert not verify_password("default-cosT", stored)
    assert elapsed < 2.0  # ~50 ms intended; only a gross regression fails here


def test_plain_text_stored() -> None:
    assert verify_password("bob-plain", "bob-plain")
    assert not verify_password("bob-plain ", "bob-plain")
    assert not verify_password("", "bob-plain")
    assert verify_password("pässwörd", "pässwörd")
    assert not is_hashed("bob-plain")


GOOD = hash_password("pw", salt=SALT, **FAST)
_, _N, _R, _P, _SALT64, _DIGEST64 = GOOD.split("$")


@pytest.mark.parametrize("stored", [
    "scrypt$",
    "scrypt$$$$$",
    f"scrypt${_N}${_R}${_P}${_SALT64}",  # five fields
    f"scrypt${_N}${_R}${_P}${_SALT64}${_DIGEST64}$",  # seven
    f"scrypt$1000${_R}${_P}${_SALT64}${_DIGEST64}",  # n not a power of two
    f"scrypt$1${_R}${_P}${_SALT64}${_DIGEST64}",
    f"scrypt$0${_R}${_P}${_SALT64}${_DIGEST64}",
    f"scrypt${_N}$0${_P}${_SALT64}${_DIGEST64}",
    f"scrypt${_N}${_R}$0${_SALT64}${_DIGEST64}",
    f"scrypt$+1024${_R}${_P}${_SALT64}${_DIGEST64}",
    f"scrypt$ 1024${_R}${_P}${_SALT64}${_DIGEST64}",
    f"scrypt$1_024${_R}${_P}${_SALT64}${_DIGEST64}",
    f"scrypt$-1024${_R}${_P}${_SALT64}${_DIGEST64}",
    f"scrypt$１０２４${_R}${_P}${_SALT64}${_DIGEST64}",  # fullwidth digits
    f"scrypt${_N}${_R}${_P}$${_DIGEST64}",  # empty salt
    f"scrypt${_N}${_R}${_P}${_SALT64}$",  # empty digest
    f"scrypt${_N}${_R}${_P}$!!!!${_DIGEST64}",
    f"scrypt${_N}${_R}${_P}${_SALT64}${_DIGEST64.rstrip('=')}",  # padding missing
    f"scrypt${_N}${_R}${_P}${_SALT64}${_DIGEST64}AAAA",  # data after padding
    f"scrypt${_N}${_R}${_P}${_SALT64}${b64(b'short')}",  # digest too short
    f"scrypt${_N}${_R}${_P}${_SALT64}${b64(bytes(65))}",  # digest too long
    f"scrypt${_N}${_R}${_P}${_SALT64}${_DIGEST64}é",
    f"scrypt${2**40}$8$1${_SALT64}${_DIGEST64}",  # over the memory ceiling
    f"scrypt$2$1${2**30}${_SALT64}${_DIGEST64}",  # over the cost ceiling
    f"scrypt$99999999999999999999${_R}${_P}${_SALT64}${_DIGEST64}",
])
def test_malformed_hash_never_matches(stored: str) -> None:
    assert is_hashed(stored)
    assert not is_valid_hash(stored)
    assert verify_password("pw", stored) is False


def test_prefix_is_case_sensitive() -> None:
    # As config.AuthUser.is_hashed: only "scrypt$" marks a hash; anything else is plain text.
    upper = GOOD.replace("scrypt$", "SCRYPT$")
    assert not is_hashed(upper)
    assert verify_password(upper, upper) and not verify_password("pw", upper)


def test_verify_never_raises_on_odd_input() -> None:
    assert verify_password("\udcff", "plain") is False  # lone surrogate
    assert verify_password("\udcff", GOOD) is False
    assert verify_password("pw", None) is False  # type: ignore[arg-type]


def test_hash_password_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError):
        hash_password("pw", n=1000)
    with pytest.raises(ValueError):
        hash_password("pw", n=2**10, r=0)
    with pytest.raises(ValueError):
        hash_password("pw", n=2**24)
    with pytest.raises(ValueError):
        hash_password("pw", salt=b"", **FAST)


def test_verify_uses_stored_parameters(scrypt_calls: list[dict[str, Any]]) -> None:
    stored = hash_password("pw", salt=SALT, n=2**11, r=4, p=2)
    assert verify_password("pw", stored)
    assert [(c["n"], c["r"], c["p"], c["salt"]) for c in scrypt_calls] == [(2**11, 4, 2, SALT)] * 2


# -- mechanisms_for, parse_auth --------------------------------------------------


def test_mechanisms_for() -> None:
    assert mechanisms_for(USERS) == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert mechanisms_for({"alice": ALICE_HASH}) == ("PLAIN", "LOGIN")
    assert mechanisms_for({"bob": "plain"}) == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert mechanisms_for({}) == ("PLAIN", "LOGIN")


@pytest.mark.parametrize("arg, expected", [
    ("PLAIN", ("PLAIN", None)),
    ("plain", ("PLAIN", None)),
    ("Cram-Md5", ("CRAM-MD5", None)),
    ("PLAIN AGJvYgBib2ItcGxhaW4=", ("PLAIN", "AGJvYgBib2ItcGxhaW4=")),
    ("LOGIN  Ym9i", ("LOGIN", "Ym9i")),
    ("PLAIN =", ("PLAIN", "=")),
])
def test_parse_auth(arg: str, expected: tuple[str, str | None]) -> None:
    assert parse_auth(arg) == expected


@pytest.mark.parametrize("arg", ["", " ", "PLAIN a b", "PLAİN"])
def test_parse_auth_syntax(arg: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_auth(arg)
    assert info.value.reply == R501_AUTH_SYNTAX


# -- PLAIN -----------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    assert final(exchange("PLAIN", b64("\0bob\0bob-plain"))) == Done("bob")
    assert final(exchange("PLAIN", b64("\0alice\0alice-secret"))) == Done("alice")
    assert final(exchange("PLAIN", b64("\0jörg\0pässwörd"))) == Done("jörg")


def test_plain_without_initial_response() -> None:
    ex = exchange("PLAIN")
    first = ex.start()
    assert first == Challenge("")
    assert first.reply.to_bytes() == b"334 \r\n"
    assert not ex.finished
    assert ex.respond(b64("\0bob\0bob-plain")) == Done("bob")
    assert ex.finished


@pytest.mark.parametrize("message", [
    "\0bob\0wrong",
    "\0alice\0bob-plain",
    "\0nobody\0bob-plain",
    "\0\0",
    "\0bob\0",
    "\0\0bob-plain",
    "\0BOB\0bob-plain",  # usernames are exact
])
def test_plain_wrong_credentials(message: str) -> None:
    assert final(exchange("PLAIN", b64(message))) == Failed(R535_AUTH_FAILED)
    assert final(exchange("PLAIN"), b64(message)) == Failed(R535_AUTH_FAILED)


def test_plain_authzid() -> None:
    assert final(exchange("PLAIN", b64("bob\0bob\0bob-plain"))) == Done("bob")
    # Acting for another user is refused, with the ordinary 535.
    assert final(exchange("PLAIN", b64("alice\0bob\0bob-plain"))) == Failed(R535_AUTH_FAILED)
    assert final(exchange("PLAIN", b64("Bob\0bob\0bob-plain"))) == Failed(R535_AUTH_FAILED)


@pytest.mark.parametrize("bad", [
    "%%%",
    "AGJvYgBib2ItcGxhaW4",  # padding missing
    "AGJvYgBib2ItcGxhaW4=AAAA",  # data after padding
    "AGJv YgBib2ItcGxhaW4=",
    "ÀGJvYgBib2ItcGxhaW4=",
    b64("bob-plain"),  # no NULs
    b64("\0bob-plain"),  # one NUL
    b64("\0bob\0bob\0plain"),  # three
    b64(b"\0bob\0\xff\xfe"),  # not UTF-8
    "=",  # empty initial response
])
def test_plain_cannot_decode(bad: str) -> None:
    if bad != "=":
        assert final(exchange("PLAIN"), bad) == Failed(R501_AUTH_DECODE)
    assert final(exchange("PLAIN", bad)) == Failed(R501_AUTH_DECODE)


def test_plain_cancel() -> None:
    assert final(exchange("PLAIN"), "*") == Failed(R501_AUTH_CANCELLED)
    assert R501_AUTH_CANCELLED.to_bytes() == b"501 5.7.0 Authentication cancelled\r\n"


def test_responses_tolerate_surrounding_blanks() -> None:
    assert final(exchange("PLAIN"), " " + b64("\0bob\0bob-plain") + " ") == Done("bob")
    assert final(exchange("LOGIN"), " * ") == Failed(R501_AUTH_CANCELLED)


# -- LOGIN -----------------------------------------------------------------------


def test_login() -> None:
    steps = run(exchange("LOGIN"), b64("bob"), b64("bob-plain"))
    assert steps == [Challenge("VXNlcm5hbWU6"), Challenge("UGFzc3dvcmQ6"), Done("bob")]
    assert unb64(steps[0].text_b64) == b"Username:"  # type: ignore[union-attr]
    assert unb64(steps[1].text_b64) == b"Password:"  # type: ignore[union-attr]
    assert steps[0].reply.to_bytes() == b"334 VXNlcm5hbWU6\r\n"
    assert final(exchange("login"), b64("alice"), b64("alice-secret")) == Done("alice")
    assert final(exchange("LOGIN"), b64("jörg"), b64("pässwörd")) == Done("jörg")


def test_login_with_initial_response() -> None:
    ex = exchange("LOGIN", b64("alice"))
    assert ex.start() == Challenge("UGFzc3dvcmQ6")
    assert ex.respond(b64("alice-secret")) == Done("alice")


@pytest.mark.parametrize("user, password", [
    ("bob", "wrong"), ("alice", "bob-plain"), ("nobody", "bob-plain"), ("", ""), ("bob", ""),
])
def test_login_wrong_credentials(user: str, password: str) -> None:
    assert final(exchange("LOGIN"), b64(user), b64(password)) == Failed(R535_AUTH_FAILED)
    assert final(exchange("LOGIN", b64(user) if user else "="), b64(password)) == \
        Failed(R535_AUTH_FAILED)


def test_login_cancel_and_decode() -> None:
    assert final(exchange("LOGIN"), "*") == Failed(R501_AUTH_CANCELLED)
    assert final(exchange("LOGIN"), b64("bob"), "*") == Failed(R501_AUTH_CANCELLED)
    assert final(exchange("LOGIN"), "bob") == Failed(R501_AUTH_DECODE)  # not base64 ("bob" is 3 chars)
    assert final(exchange("LOGIN"), b64("bob"), "!!") == Failed(R501_AUTH_DECODE)
    assert final(exchange("LOGIN"), b64(b"\xff")) == Failed(R501_AUTH_DECODE)
    assert final(exchange("LOGIN", "%%%")) == Failed(R501_AUTH_DECODE)


# -- CRAM-MD5 --------------------------------------------------------------------


def test_cram_md5_rfc2195_vector() -> None:
    # RFC 2195 §2's example, verbatim.
    users = {"tim": "tanstaaftanstaaf"}
    ex = exchange("CRAM-MD5", users=users, nonce="1896.697170952", hostname="postoffice.reston.mci.net")
    first = ex.start()
    assert isinstance(first, Challenge)
    assert unb64(first.text_b64) == b"<1896.697170952@postoffice.reston.mci.net>"
    assert first.text_b64 == "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
    digest = "b913a602c7eda7a495b4e6e7334d3890"
    assert cram_digest("tanstaaftanstaaf", ex.challenge) == digest
    response = b64(f"tim {digest}")
    assert response == "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    assert ex.respond(response) == Done("tim")


def test_cram_md5_accepts_uppercase_hex() -> None:
    ex = exchange("CRAM-MD5")
    ex.start()
    assert ex.respond(b64(f"bob {cram_digest('bob-plain', ex.challenge).upper()}")) == Done("bob")


def test_cram_md5_non_ascii_user() -> None:
    ex = exchange("CRAM-MD5")
    ex.start()
    assert ex.respond(b64(f"jörg {cram_digest('pässwörd', ex.challenge)}")) == Done("jörg")


@pytest.mark.parametrize("response", [
    lambda c: f"bob {cram_digest('wrong', c)}",
    lambda c: f"nobody {cram_digest('bob-plain', c)}",
    lambda c: f"bob {cram_digest('bob-plain', c + 'x')}",  # another challenge
    lambda c: f"bob {cram_digest('bob-plain', c)[:-1]}",
    lambda c: "bob ",
    lambda c: f" {cram_digest('bob-plain', c)}",
    # alice's password is hashed: even her real password cannot work, and the
    # reply is the ordinary 535 (no oracle for "this user is hashed").
    lambda c: f"alice {cram_digest('alice-secret', c)}",
    lambda c: f"alice {cram_digest(ALICE_HASH, c)}",
])
def test_cram_md5_wrong(response: Callable[[str], str]) -> None:
    ex = exchange("CRAM-MD5")
    ex.start()
    assert ex.respond(b64(response(ex.challenge))) == Failed(R535_AUTH_FAILED)


def test_cram_md5_cancel_decode_and_initial() -> None:
    assert final(exchange("CRAM-MD5"), "*") == Failed(R501_AUTH_CANCELLED)
    assert final(exchange("CRAM-MD5"), "%%") == Failed(R501_AUTH_DECODE)
    assert final(exchange("CRAM-MD5"), b64("bob")) == Failed(R501_AUTH_DECODE)  # no space
    # RFC 4954 §4: no initial response for a server-first mechanism.
    assert final(exchange("CRAM-MD5", b64("bob x"))) == Failed(R501_AUTH_INITIAL)


def test_cram_md5_not_offered_without_plain_users() -> None:
    users = {"alice": ALICE_HASH}
    assert final(exchange("CRAM-MD5", users=users)) == Failed(R504_AUTH_MECH)


def test_cram_md5_challenge_uses_nonce_and_hostname() -> None:
    ex = exchange("CRAM-MD5", nonce=cram_nonce(4711, 1700000000), hostname="relay.example")
    first = ex.start()
    assert isinstance(first, Challenge)
    assert unb64(first.text_b64) == b"<4711.1700000000@relay.example>"


@pytest.mark.parametrize("nonce", ["", "a b", "a<b", "a@b", "a>b", "é"])
def test_bad_nonce_is_a_programming_error(nonce: str) -> None:
    with pytest.raises(ValueError):
        exchange("PLAIN", nonce=nonce)


# -- unknown mechanisms, misuse ----------------------------------------------------


@pytest.mark.parametrize("mechanism", ["GSSAPI", "XOAUTH2", "", "DIGEST-MD5", "PLAİN"])
def test_unknown_mechanism(mechanism: str) -> None:
    assert final(exchange(mechanism)) == Failed(R504_AUTH_MECH)
    assert final(exchange(mechanism, b64("x"))) == Failed(R504_AUTH_MECH)
    assert R504_AUTH_MECH.to_bytes() == b"504 5.5.4 Unrecognized authentication type\r\n"


def test_mechanism_case_insensitive() -> None:
    assert final(exchange("plain", b64("\0bob\0bob-plain"))) == Done("bob")
    assert final(exchange("cram-md5"), b64("bob x")) == Failed(R535_AUTH_FAILED)


def test_exchange_misuse_raises() -> None:
    ex = exchange("PLAIN")
    with pytest.raises(RuntimeError):
        ex.respond("x")
    ex.start()
    with pytest.raises(RuntimeError):
        ex.start()
    ex.respond("*")
    with pytest.raises(RuntimeError):
        ex.respond(b64("\0bob\0bob-plain"))


def test_step_replies() -> None:
    assert Done("bob").reply == R235_AUTH_OK
    assert R235_AUTH_OK.to_bytes() == b"235 2.7.0 Authentication successful\r\n"
    assert Failed(R535_AUTH_FAILED).reply.to_bytes() == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert R501_AUTH_DECODE.to_bytes() == b"501 5.5.2 Cannot decode response\r\n"
    assert auth.R538_ENCRYPTION_REQUIRED.to_bytes() == \
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    assert auth.R503_ALREADY_AUTH.to_bytes() == b"503 5.5.1 Already authenticated\r\n"


# -- no username oracle ------------------------------------------------------------


def test_unknown_user_costs_a_derivation_like_a_hashed_user(scrypt_calls: list[dict[str, Any]]) -> None:
    users = {"alice": ALICE_HASH}
    for mechanism, lines in [
        ("PLAIN", [b64("\0alice\0wrong")]),
        ("PLAIN", [b64("\0nobody\0wrong")]),
        ("LOGIN", [b64("alice"), b64("wrong")]),
        ("LOGIN", [b64("nobody"), b64("wrong")]),
    ]:
        scrypt_calls.clear()
        assert final(exchange(mechanism, users=users), *lines) == Failed(R535_AUTH_FAILED)
        # Exactly one derivation, with alice's parameters, whoever the user is.
        assert [(c["n"], c["r"], c["p"], c["dklen"]) for c in scrypt_calls] == [(2**10, 8, 1, 32)]


def test_plain_users_never_derive(scrypt_calls: list[dict[str, Any]]) -> None:
    users = {"bob": "bob-plain"}
    assert final(exchange("PLAIN", b64("\0nobody\0bob-plain"), users=users)) == Failed(R535_AUTH_FAILED)
    assert final(exchange("PLAIN", b64("\0bob\0bob-plain"), users=users)) == Done("bob")
    assert scrypt_calls == []


def test_password_checked_even_when_authzid_is_refused(scrypt_calls: list[dict[str, Any]]) -> None:
    assert final(exchange("PLAIN", b64("bob\0alice\0alice-secret"))) == Failed(R535_AUTH_FAILED)
    assert len(scrypt_calls) == 1


def test_dummy_never_matches() -> None:
    # Whatever an unknown user sends, including the stand-in's own secret.
    assert final(exchange("PLAIN", b64(f"\0nobody\0{auth._DUMMY_PLAIN}"), users={"b": "x"})) == \
        Failed(R535_AUTH_FAILED)
    ex = exchange("CRAM-MD5", users={"b": "x"})
    ex.start()
    assert ex.respond(b64(f"nobody {cram_digest(auth._DUMMY_PLAIN, ex.challenge)}")) == \
        Failed(R535_AUTH_FAILED)


def test_dummy_follows_first_well_formed_hash() -> None:
    broken = "scrypt$oops"
    other = hash_password("x", salt=SALT, n=2**11, r=4, p=1)
    dummy = auth._dummy_for({"a": broken, "b": other, "c": "plain"})
    assert dummy.split("$")[1:4] == ["2048", "4", "1"]
    assert is_valid_hash(dummy)
    assert auth._dummy_for({"c": "plain"}) == auth._DUMMY_PLAIN


# -- redact ------------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("AUTH PLAIN AGJvYgBib2ItcGxhaW4=", "AUTH PLAIN ***"),
    ("auth plain AGJvYgBib2ItcGxhaW4=", "auth plain ***"),
    ("AUTH LOGIN Ym9i\r\n", "AUTH LOGIN ***"),
    ("AUTH\tPLAIN\tAGJvYgBib2ItcGxhaW4=", "AUTH PLAIN ***"),
    ("AUTH PLAIN  a b c", "AUTH PLAIN ***"),
    ("AUTH PLAIN", "AUTH PLAIN"),
    ("AUTH CRAM-MD5", "AUTH CRAM-MD5"),
    ("AUTH", "AUTH"),
    ("AUTH AGJvYgBib2ItcGxhaW4=", "AUTH ***"),  # mechanism forgotten: the secret moved left
    ("MAIL FROM:<a@b.test>", "MAIL FROM:<a@b.test>"),
    ("EHLO client.test", "EHLO client.test"),
    ("", ""),
])
def test_redact_commands(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_redact_sasl_responses() -> None:
    assert redact("dGltIGI5MTNhNjAy", sasl_response=True) == "***"
    assert redact("", sasl_response=True) == "***"
    assert redact("*", sasl_response=True) == "*"
