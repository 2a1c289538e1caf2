"""SMTP AUTH: scrypt password hashes and the SASL exchanges PLAIN, LOGIN and CRAM-MD5.

Owns the `[[server.auth]] password` format (plain text, or the `scrypt$...` line that
`hedwig hash-password` prints), the constant-time credential check, the SASL
mechanisms as a small state machine (RFC 4954, RFC 4616 PLAIN, the LOGIN draft,
RFC 2195 CRAM-MD5), the AUTH replies, and redaction of AUTH lines for logs.

    exchange = SaslExchange("PLAIN", initial, users, hostname=host, challenge_nonce=nonce)
    step = exchange.start()               # Challenge | Done | Failed
    while isinstance(step, Challenge):
        send(step.reply)                  # 334 <base64>
        step = exchange.respond(next_line())
    send(step.reply)                      # 235 on Done, the failure's reply on Failed

Every failure of the credentials themselves (unknown user, wrong password, a hashed
user trying CRAM-MD5, an authzid that is not the authcid) gets the same 535 after
the same work, so the replies and their timing do not say which usernames exist.

Must not: touch sockets, gevent, clocks or files; import from outside hedwig.smtp.
Randomness enters as parameters (`salt`, `challenge_nonce`) except for the default
salt of `hash_password`. Verifying an scrypt hash costs ~50 ms of CPU (see
DEFAULT_N): a gevent caller should run it off the hub (hedwig.offload).
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

from .address import ProtocolError
from .replies import Reply

# -- replies -------------------------------------------------------------------

R235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
# RFC 4954 §4: the text of a 334 is the base64 challenge and nothing else.
R334_EMPTY = Reply(334, "", "")  # "334 ": PLAIN without an initial response
R334_USERNAME = Reply(334, "", "VXNlcm5hbWU6")  # "Username:"
R334_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")  # "Password:"
R501_AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
R501_AUTH_INITIAL = Reply(501, "5.5.4", "Initial response not allowed for this mechanism")
R501_AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
R501_AUTH_DECODE = Reply(501, "5.5.2", "Cannot decode response")
R503_ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
R504_AUTH_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")
R535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R538_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)

# -- password hashes -----------------------------------------------------------

HASH_PREFIX = "scrypt$"
# scrypt cost. n=2**14, r=8, p=1 (16 MiB) takes ~46 ms on the reference machine
# (2 vCPU, Python 3.11/OpenSSL); n=2**15 doubles that to ~97 ms. 2**14/8/1 is also
# Percival's "interactive login" setting. Stored hashes carry their own parameters,
# so raising these later only affects new hashes.
DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
DKLEN = 32
# Ceilings for parameters read from a stored hash: beyond them the hash is treated
# as malformed (never matches) rather than letting one config line pin a CPU or
# allocate gigabytes on every AUTH. 256 MiB admits n=2**17, r=8 (OWASP's setting).
MAX_MEMORY = 256 * 1024 * 1024
MAX_COST = 2**22  # n*r*p; ~32x the default work


def _maxmem(n: int, r: int, p: int) -> int:
    # OpenSSL needs 128*r*p bytes for B plus 128*r*(n+2) for V; keep 1 MiB of slack.
    return 128 * r * (n + p + 2) + (1 << 20)


def _params_problem(n: int, r: int, p: int) -> str | None:
    if n < 2 or n & (n - 1):
        return f"n must be a power of two greater than 1, got {n}"
    if r < 1 or p < 1:
        return f"r and p must be at least 1, got r={r} p={p}"
    if n * r * p > MAX_COST or _maxmem(n, r, p) > MAX_MEMORY:
        return f"scrypt parameters n={n} r={r} p={p} exceed the cost ceiling"
    return None


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict standard base64 (padding required, no stray characters) or None."""
    if not text.isascii():
        return None
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except binascii.Error:
        return None


def hash_password(
    password: str,
    *,
    salt: bytes | None = None,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
) -> str:
    """`scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>` (standard base64 with padding).

    The salt is 16 random bytes unless given; raises ValueError for parameters
    that verify_password would refuse.
    """
    problem = _params_problem(n, r, p)
    if problem:
        raise ValueError(problem)
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    if not salt:
        raise ValueError("salt must not be empty")
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=DKLEN
    )
    return f"{HASH_PREFIX}{n}${r}${p}${_b64encode(salt)}${_b64encode(digest)}"


@dataclass(frozen=True, slots=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _parse_hash(stored: str) -> _Hash | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != HASH_PREFIX[:-1]:
        return None
    numbers = parts[1:4]
    # isdecimal() alone admits other scripts' digits; int() also takes "+8", " 8", "1_0".
    if not all(s.isascii() and s.isdecimal() and len(s) <= 10 for s in numbers):
        return None
    n, r, p = (int(s) for s in numbers)
    if _params_problem(n, r, p):
        return None
    salt, digest = _b64decode(parts[4]), _b64decode(parts[5])
    if not salt or digest is None or not 16 <= len(digest) <= 64:
        return None
    return _Hash(n, r, p, salt, digest)


def is_hashed(stored: str) -> bool:
    """An `scrypt$` value is a hash (even a malformed one, which never matches)."""
    return stored.startswith(HASH_PREFIX)


def is_valid_hash(stored: str) -> bool:
    """A well-formed hash within the cost ceilings (for config validation)."""
    return _parse_hash(stored) is not None


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of `password` against plain text or an scrypt hash; never raises."""
    try:
        given = password.encode("utf-8")
        if not is_hashed(stored):
            # compare_digest's time depends on the lengths, never on the contents.
            return hmac.compare_digest(given, stored.encode("utf-8"))
        h = _parse_hash(stored)
        if h is None:
            return False
        computed = hashlib.scrypt(
            given, salt=h.salt, n=h.n, r=h.r, p=h.p, maxmem=_maxmem(h.n, h.r, h.p),
            dklen=len(h.digest),
        )
        return hmac.compare_digest(computed, h.digest)
    except (UnicodeError, ValueError, MemoryError, AttributeError, TypeError):
        return False


# Unknown users are checked against a stand-in so they cost what a real user costs.
_DUMMY_PLAIN = "hedwig-no-such-user-" + "x" * 12
_DUMMY_SALT = b"hedwig-dummy-salt"


def _dummy_for(users: Mapping[str, str]) -> str:
    """A stored value that never matches and costs what the configured users cost.

    With hashed users it is a hash with the first well-formed one's parameters (the
    slow path an attacker would otherwise see only for real names); otherwise plain
    text. A config mixing plain and hashed users still shows which kind a real name
    has; configure one kind to hide that too.
    """
    for stored in users.values():
        h = _parse_hash(stored) if is_hashed(stored) else None
        if h is not None:
            zero = _b64encode(bytes(len(h.digest)))
            return f"{HASH_PREFIX}{h.n}${h.r}${h.p}${_b64encode(_DUMMY_SALT)}${zero}"
    return _DUMMY_PLAIN


# -- SASL ----------------------------------------------------------------------


def mechanisms_for(users: Mapping[str, str]) -> tuple[str, ...]:
    """What EHLO advertises: CRAM-MD5 needs the plain text, so only if some user has it."""
    if any(not is_hashed(stored) for stored in users.values()):
        return ("PLAIN", "LOGIN", "CRAM-MD5")
    return ("PLAIN", "LOGIN")


def parse_auth(arg: str) -> tuple[str, str | None]:
    """`AUTH mechanism [initial-response]` arguments -> (MECHANISM, initial or None).

    The mechanism is upper-cased (SASL names are case-insensitive in practice);
    raises ProtocolError(R501_AUTH_SYNTAX) for a missing mechanism or extra words.
    """
    words = arg.split(" ")
    words = [w for w in words if w]
    if not 1 <= len(words) <= 2 or not words[0].isascii():
        raise ProtocolError(R501_AUTH_SYNTAX)
    return words[0].upper(), (words[1] if len(words) == 2 else None)


def cram_nonce(random_digits: int, timestamp: int) -> str:
    """The `random.timestamp` part of an RFC 2195 challenge, from values the caller draws."""
    return f"{random_digits}.{timestamp}"


_NONCE = re.compile(r"[!-~]+")  # printable ASCII, no spaces


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send `334 <text_b64>` and feed the client's next line to respond()."""

    text_b64: str

    @property
    def reply(self) -> Reply:
        return Reply(334, "", self.text_b64)


@dataclass(frozen=True, slots=True)
class Done:
    """Authenticated as `username`; the client hears 235."""

    username: str

    @property
    def reply(self) -> Reply:
        return R235_AUTH_OK


@dataclass(frozen=True, slots=True)
class Failed:
    reply: Reply


Step: TypeAlias = Challenge | Done | Failed


class _State(enum.Enum):
    NEW = "new"
    PLAIN = "plain"  # waiting for the PLAIN message
    LOGIN_USER = "login-user"
    LOGIN_PASSWORD = "login-password"
    CRAM = "cram"  # waiting for "username digest"
    FINISHED = "finished"


class SaslExchange:
    """One AUTH command's exchange; `mechanism` and `initial` as parse_auth returns them.

    `users` maps username -> stored password (plain or `scrypt$...`). For CRAM-MD5
    the challenge is `<challenge_nonce@hostname>`; the caller draws the nonce (see
    cram_nonce) so this stays pure. A mechanism not in mechanisms_for(users) is
    refused with 504, like an unknown one.
    """

    def __init__(
        self,
        mechanism: str,
        initial: str | None,
        users: Mapping[str, str],
        *,
        hostname: str,
        challenge_nonce: str,
    ) -> None:
        if not _NONCE.fullmatch(challenge_nonce) or set("<>@") & set(challenge_nonce):
            raise ValueError(f"bad CRAM-MD5 nonce {challenge_nonce!r}")
        self.mechanism = mechanism.upper() if mechanism.isascii() else mechanism
        self.challenge = f"<{challenge_nonce}@{hostname}>"
        self._initial = initial
        self._users = users
        self._state = _State.NEW
        self._login_user = ""

    @property
    def finished(self) -> bool:
        return self._state is _State.FINISHED

    def start(self) -> Step:
        if self._state is not _State.NEW:
            raise RuntimeError("start() called twice")
        mechanism, initial = self.mechanism, self._initial
        if mechanism not in mechanisms_for(self._users):
            return self._finish(Failed(R504_AUTH_MECH))
        if mechanism == "CRAM-MD5":
            # RFC 4954 §4: an initial response to a server-first mechanism is a 501.
            if initial is not None:
                return self._finish(Failed(R501_AUTH_INITIAL))
            self._state = _State.CRAM
            return Challenge(_b64encode(self.challenge.encode("ascii")))
        if mechanism == "PLAIN":
            self._state = _State.PLAIN
            if initial is None:
                return Challenge(R334_EMPTY.text)
        else:  # LOGIN
            self._state = _State.LOGIN_USER
            if initial is None:
                return Challenge(R334_USERNAME.text)
        # RFC 4954 §4: "=" is an initial response of zero length.
        return self._step(b"" if initial == "=" else _b64decode(initial))

    def respond(self, line: str) -> Step:
        """The client's line after a Challenge: base64, or "*" to cancel."""
        if self._state in (_State.NEW, _State.FINISHED):
            raise RuntimeError(f"no response is due ({self._state.value})")
        line = line.strip(" \t")
        if line == "*":
            return self._finish(Failed(R501_AUTH_CANCELLED))
        return self._step(_b64decode(line))

    # -- internals -------------------------------------------------------------

    def _finish(self, step: Done | Failed) -> Step:
        self._state = _State.FINISHED
        self._login_user = ""
        return step

    def _step(self, data: bytes | None) -> Step:
        if data is None:
            return self._finish(Failed(R501_AUTH_DECODE))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._finish(Failed(R501_AUTH_DECODE))
        state = self._state
        if state is _State.PLAIN:
            return self._plain(text)
        if state is _State.LOGIN_USER:
            self._login_user = text
            self._state = _State.LOGIN_PASSWORD
            return Challenge(R334_PASSWORD.text)
        if state is _State.LOGIN_PASSWORD:
            return self._verdict(self._login_user, self._check(self._login_user, text))
        return self._cram(text)

    def _plain(self, message: str) -> Step:
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd; none may contain NUL.
        parts = message.split("\0")
        if len(parts) != 3:
            return self._finish(Failed(R501_AUTH_DECODE))
        authzid, authcid, password = parts
        ok = self._check(authcid, password)
        # Acting for someone else is not supported: authzid is empty or the user itself.
        return self._verdict(authcid, ok and authzid in ("", authcid))

    def _cram(self, response: str) -> Step:
        # RFC 2195 §2: "username SP digest", digest = lowercase hex HMAC-MD5(password, challenge).
        username, sep, digest = response.rpartition(" ")
        if not sep:
            return self._finish(Failed(R501_AUTH_DECODE))
        stored = self._users.get(username)
        # A hashed password cannot key the HMAC: such users fail like a wrong password,
        # after the same work as everyone else.
        usable = stored is not None and not is_hashed(stored)
        key = stored if usable and stored is not None else _DUMMY_PLAIN
        expected = hmac.new(key.encode("utf-8"), self.challenge.encode("ascii"), "md5").hexdigest()
        ok = hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("utf-8"))
        return self._verdict(username, ok and usable)

    def _check(self, username: str, password: str) -> bool:
        """Always run the password check, against a stand-in for unknown users."""
        stored = self._users.get(username)
        ok = verify_password(password, stored if stored is not None else _dummy_for(self._users))
        return ok and stored is not None

    def _verdict(self, username: str, ok: bool) -> Step:
        return self._finish(Done(username) if ok and username else Failed(R535_AUTH_FAILED))


# -- logs ----------------------------------------------------------------------

_MECHANISM_NAME = re.compile(r"[A-Za-z0-9_-]{1,20}")  # RFC 4422 §3.1


def redact(line: str, *, sasl_response: bool = False) -> str:
    """A command line fit for logs: AUTH's initial response becomes `***`.

    With `sasl_response=True` the line is a reply to a 334 and is hidden whole
    (except the "*" that cancels). Splits on any whitespace, so a malformed AUTH
    line the protocol refuses is still hidden; a "mechanism" that does not look
    like one (a client that forgot it) is hidden too.
    """
    if sasl_response:
        return line if line.strip() == "*" else "***"
    words = line.split(None, 2)
    if not words or words[0].upper() != "AUTH" or len(words) == 1:
        return line
    if not _MECHANISM_NAME.fullmatch(words[1]):
        return f"{words[0]} ***"
    if len(words) == 2:
        return f"{words[0]} {words[1]}"
    return f"{words[0]} {words[1]} ***"
