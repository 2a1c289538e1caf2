"""DKIM signing (SPEC §6): keys, the header set, and the DKIM-Signature on top.

A `Signer` is built once per worker from `[server.dkim]` by `load_signer()`,
which loads the PEM private key (PKCS#1 or PKCS#8 RSA, PKCS#8 ed25519) with
`cryptography`, checks it against `key_type`, and signs a test message and
verifies it with dkimpy, so a bad key is one config error at start and never
a surprise at delivery. `Signer.sign(message)` returns the message with a
`DKIM-Signature:` field prepended (SPEC §10: only fields at the top are
added; the rest goes out byte for byte). `hedwig dkim-generate` uses
`generate_key()`, `write_private_key()` and `dns_record()` from here.

The DKIM format is ours, for the one case Hedwig signs: relaxed/relaxed,
rsa-sha256 or ed25519-sha256, the SPEC §6 fields, no l=, no z=. Issue 5 asks
for 2,000 RSA-2048 signatures/s on one core; with dkimpy doing the format,
its general-purpose Python (every field parsed and canonicalised, WSP
regexes rewriting every space, a logger, a hash wrapper) cost ~345 µs a
message on top of the ~350 µs the RSA operation itself takes in OpenSSL.
Here the constant part of the tag list is built once per Signer, the fields
are found with one regex pass, only the signed ones are canonicalised,
whitespace is squeezed with bytes.replace (a regex over a 4 KiB body alone
costs ~100 µs), and the header hash is one sha256 over one join. The
private-key operation is OpenSSL's through `cryptography`, for Ed25519 too
(deterministic, so the same bytes as dkimpy's PyNaCl).

dkimpy stays the reference and the verifier. What we write is dkimpy's
output byte for byte, folding and tag order included (dkim.sign with the same
key, header list and t=): tests/unit/test_signing.py checks that over many
generated messages, and load_signer()'s self-test verifies with dkim.verify.
Header blocks our one regex pass does not cover (an mbox "From " line, a
line that is no field) go to dkimpy's own parser, so they are taken or
refused exactly as dkimpy would.

Must not: read the spool, touch the network, or decide what a signing
failure means for the message (delivery.py defers it; SPEC §6 never sends
mail unsigned).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from .config import Config, ConfigError

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

KEY_TYPES = ("rsa", "ed25519")
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024 bits
MAX_RSA_BITS = 8192
DEFAULT_RSA_BITS = 2048

# SPEC §6: the fields signed when present (From always, see Signer.sign).
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"mime-version", b"content-type")
_SIGNED = frozenset(SIGNED_HEADERS)

# A DNS name made of LDH labels (underscores allowed, as in _domainkey); for
# d= and s= (RFC 6376 §3.5: both are domain names).
_DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


class KeyProblem(ValueError):
    """A private key that cannot be used; str() is the one line for the operator."""


# -- the DKIM format, as dkimpy writes it -----------------------------------------
#
# Only relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4), the whole body (no l=), no z=.
# Each helper names the dkimpy function whose output it reproduces; where
# dkimpy departs from the RFC's letter, we follow dkimpy, because a verifier
# only has to agree with itself and tests/unit/test_signing.py holds us to
# dkimpy's bytes.

# A field as dkimpy's rfc822_parse() sees one: a name of printable ASCII up to
# the first colon, then the rest of the line and every following line that
# starts with SP or HTAB. The second branch takes any other line whole (an
# mbox "From " line, a line that is no field, a continuation with nothing to
# continue): then dkimpy's own parser decides (see _parse).
_FIELD = re.compile(rb"([\x21-\x7e]+?):([^\n]*\n(?:[ \t][^\n]*\n)*)|[^\n]*\n")
_FIELD_NAME = b"DKIM-Signature"
_NOT_YET_SIGNED = b"0" * 60  # dkimpy's placeholder: it puts b= on its own folded line


def _parse(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(fields, body) exactly as dkim.rfc822_parse() gives them, CRLF line ends throughout.

    Fields are (name, value) with the value as written after the colon, its
    lines CRLF-terminated. The common message (nothing but fields above
    the blank line) takes one regex pass; any other header
    block goes to dkimpy's parser itself, so odd input is parsed, skipped or
    refused (MessageFormatError) exactly as dkimpy would.
    """
    if not message:
        raise dkim.MessageFormatError("empty message")
    if message.count(b"\n") != message.count(b"\r\n"):
        # dkimpy splits lines on \r?\n: each LF, with the CR right before it if any,
        # becomes CRLF. Two replaces do that 4x faster than re.sub.
        message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end >= 0:
        head, body = message[:end + 2], message[end + 4:]
    else:  # no blank line: all of it is header
        head, body = (message if message.endswith(b"\r\n") else message + b"\r\n"), b""
    fields: list[tuple[bytes, bytes]] = _FIELD.findall(head)
    if (b"", b"") in fields:  # a line that is not a field: leave it to dkimpy
        try:
            parsed, body = dkim.rfc822_parse(message)
        except IndexError:  # a continuation line first: dkimpy trips over headers[-1]
            raise dkim.MessageFormatError("the header starts with a continuation line") from None
        fields = [(name, value) for name, value in parsed]
    return fields, body


def _squeeze(text: bytes) -> bytes:
    """Each run of SP and HTAB made one SP (dkimpy's compress_whitespace).

    dkimpy's regex substitution rewrites every single space too, and any
    regex over a 4 KiB body costs ~100 µs here; these replaces run in C,
    and plain text (no tab, no double space) costs two scans.
    """
    if b"\t" in text:
        text = text.replace(b"\t", b" ")
    while b"  " in text:
        text = text.replace(b"  ", b" ")
    return text


def _relaxed_value(value: bytes) -> bytes:
    """A field value, relaxed (dkimpy's Relaxed.canonicalize_headers, without the CRLF):
    unfolded, WSP runs made one SP, leading and trailing whitespace gone."""
    return _squeeze(value.replace(b"\r\n", b"")).strip()


def _relaxed_body(body: bytes) -> bytes:
    """dkimpy's Relaxed.canonicalize_body() of a CRLF body.

    dkimpy strips WSP before each CRLF, then squeezes WSP runs to one SP;
    squeezing first and then dropping the one SP left before a CRLF is the
    same, with no regex. Then trailing empty lines go, a missing final CRLF
    is added, and a body of nothing but CRLF hashes as empty (RFC 6376 §3.4.4).
    """
    body = _squeeze(body).replace(b" \r\n", b"\r\n")
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    body = body + b"\r\n" if end == len(body) else body[:end + 2]
    return b"" if body == b"\r\n" else body


def _fold(value: bytes, maxlen: int = 72 - len(_FIELD_NAME)) -> bytes:
    """dkimpy's fold(value, namelen=14): lines of at most 72 columns, cut at the last SP
    (which the CRLF SP replaces), or hard at 72 when a line has none."""
    if len(value) <= maxlen or (value.endswith(b"\r\n") and len(value) <= maxlen + 2):
        return value
    i = value.rfind(b"\r\n ")
    pre, value = (b"", value) if i < 0 else (value[:i + 3], value[i + 3:])
    lines = []
    while len(value) > maxlen:
        i = value.rfind(b" ", 0, maxlen)
        if i < 0:
            lines.append(value[:maxlen])
            value = value[maxlen:]
        else:
            lines.append(value[:i])
            value = value[i + 1:]
        maxlen = 71
    lines.append(value)
    return pre + b"\r\n ".join(lines)


# -- signing ---------------------------------------------------------------------


class Signer:
    """Signs outgoing mail for one (domain, selector, key); safe to share between
    greenlets and threads (it keeps no state between messages).

    `clock` gives t= (seconds since the epoch, as dkimpy's time.time()).
    """

    def __init__(self, domain: str, selector: str, key: PrivateKey,
                 clock: Callable[[], float] = time.time) -> None:
        # DNS names (KeyProblem otherwise): the tag list below relies on it.
        self.domain = check_dns_name(domain, "a domain name like example.com")
        self.selector = check_dns_name(selector, "a selector like hedwig or 2024-01")
        self.key = key
        self._clock = clock
        self._sign_digest: Callable[[bytes], bytes]
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = b"rsa-sha256"
            # RFC 8017 §8.2.1 RSASSA-PKCS1-v1_5 over the header hash.
            self._sign_digest = functools.partial(_rsa_sign_digest, key)
        else:
            # RFC 8463 §3: ed25519-sha256 signs the SHA-256 of the header hash input,
            # as dkimpy does (Ed25519 is deterministic: the same 64 bytes as PyNaCl's).
            self.algorithm = b"ed25519-sha256"
            self._sign_digest = key.sign
        d = self.domain.encode("ascii")
        # dkimpy's tags, in its order: v a c d i q s t h bh b. Everything up to t= is fixed.
        self._tags = (b"v=1; a=" + self.algorithm + b"; c=relaxed/relaxed; d=" + d + b"; i=@" + d
                      + b"; q=dns/txt; s=" + self.selector.encode("ascii") + b"; t=")

    @property
    def key_type(self) -> str:
        return "rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ed25519"

    def sign(self, message: bytes) -> bytes:
        """`message` with a DKIM-Signature field on top. Raises dkim.DKIMException (or
        ValueError) for a message it cannot parse; never returns it unsigned."""
        fields, body = _parse(message)
        # SPEC §6: the listed fields that are present, each instance of them
        # (RFC 6376 §5.4.2: a name listed once per instance signs them all).
        # From is always listed: if absent, that signs its absence.
        names: list[bytes] = []
        instances: dict[bytes, list[bytes]] = {}
        for name, value in fields:
            name = name.lower()
            if name in _SIGNED:
                names.append(name)
                instances.setdefault(name, []).append(value)
        if b"from" not in instances:
            names.append(b"from")
        # The n-th listing of a name hashes its n-th instance from the bottom
        # (RFC 6376 §5.4.2; dkimpy's select_headers).
        hashed = [name + b":" + _relaxed_value(instances[name].pop()) + b"\r\n"
                  for name in names if instances.get(name)]
        tags = (self._tags + b"%d" % self._clock() + b"; h=" + b" : ".join(names) + b"; bh="
                + base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()) + b"; b=")
        # The field as hashed (RFC 6376 §3.7): folded as it will be, b= empty, relaxed,
        # no final CRLF. dkimpy empties b= with its RE_BTAG regex; b= is our last
        # tag and the only one (d= and s= are DNS names, h= field names), and
        # folding never splits "b=" (a SP precedes it, the placeholder has none),
        # so cutting after the last "b=" is the same, without the regex's ~10 µs.
        unsigned = _fold(tags + _NOT_YET_SIGNED)
        unsigned = unsigned[:unsigned.rindex(b"b=") + 2]
        hashed.append(b"dkim-signature:" + _relaxed_value(b" " + unsigned))
        signature = self._sign_digest(hashlib.sha256(b"".join(hashed)).digest())
        return (b"DKIM-Signature: " + _fold(tags + base64.b64encode(signature) + b"\r\n")
                + message)


_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = Prehashed(hashes.SHA256())


def _rsa_sign_digest(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 (RFC 8017 §8.2.1) of a SHA-256 digest, in OpenSSL."""
    return key.sign(digest, _PKCS1V15, _PREHASHED_SHA256)


# -- keys ------------------------------------------------------------------------


def check_dns_name(value: str, what: str) -> str:
    """`value` if it is a usable DNS name (selector or domain), else KeyProblem naming `what`."""
    if not _DNS_NAME.fullmatch(value) or len(value.rstrip(".")) > 253:
        raise KeyProblem(f'expected {what}, got "{value}"')
    return value.rstrip(".")


def parse_private_key(data: bytes, key_type: str, source: str) -> PrivateKey:
    """A PEM private key of `key_type` (rsa: PKCS#1 or PKCS#8; ed25519: PKCS#8). Raises KeyProblem."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: a password would be needed
        raise KeyProblem(f"{source}: the key is encrypted; give Hedwig an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyProblem(f"{source}: not a PEM private key (expected RSA in PKCS#1 or PKCS#8, "
                         "or ed25519 in PKCS#8)") from None
    found = ("rsa" if isinstance(key, rsa.RSAPrivateKey)
             else "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else None)
    if found is None:
        raise KeyProblem(f"{source}: a {type(key).__name__.removeprefix('_')} key; "
                         "DKIM keys are rsa or ed25519")
    if found != key_type:
        raise KeyProblem(f'{source} holds an {found} key but server.dkim.key_type is "{key_type}"')
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise KeyProblem(f"{source}: a {key.key_size}-bit RSA key; DKIM needs at least "
                         f"{MIN_RSA_BITS} bits (RFC 8301)")
    return key


def load_private_key(path: str, key_type: str) -> PrivateKey:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KeyProblem(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_private_key(data, key_type, path)


def load_signer(config: Config) -> Signer | None:
    """The worker's Signer for `[server.dkim]` (None without it). Raises ConfigError.

    The key is loaded, checked and used once here (a test message signed and
    verified against the key's own DNS record), so whatever is wrong with it
    stops the start as one line naming the key.
    """
    dkim_config = config.server.dkim
    if dkim_config is None:
        return None
    try:
        domain = check_dns_name(dkim_config.domain, "a domain name like example.com")
    except KeyProblem as exc:
        raise ConfigError("server.dkim.domain", str(exc)) from None
    try:
        selector = check_dns_name(dkim_config.selector, "a selector like hedwig or 2024-01")
    except KeyProblem as exc:
        raise ConfigError("server.dkim.selector", str(exc)) from None
    try:
        key = load_private_key(dkim_config.private_key, dkim_config.key_type)
        signer = Signer(domain, selector, key)
        self_test(signer)
    except KeyProblem as exc:
        raise ConfigError("server.dkim.private_key", str(exc)) from None
    return signer


def self_test(signer: Signer) -> None:
    """Sign a small message and verify it with dkimpy against our own record. Raises KeyProblem."""
    probe = b"From: hedwig@" + signer.domain.encode() + b"\r\nSubject: key check\r\n\r\nkey check\r\n"
    record = txt_value(signer.key).encode()
    try:
        ok = dkim.verify(signer.sign(probe), dnsfunc=lambda name, timeout=5: record)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the key is unusable
        raise KeyProblem(f"signing a test message failed: {exc}") from None
    if not ok:
        raise KeyProblem("a test message signed with this key does not verify")


def generate_key(key_type: str, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (what load_private_key reads back)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private_key(path: str, key: PrivateKey) -> None:
    """Create `path` (0600, O_EXCL: an existing file is never replaced) holding the key.

    Raises FileExistsError if it exists, OSError for other failures (nothing is left behind).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        data = private_key_pem(key)
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def public_key_b64(key: PrivateKey) -> str:
    """The p= value (SPEC §10): RSA: DER SubjectPublicKeyInfo; ed25519: the raw 32 bytes (RFC 8463)."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        raw = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def txt_value(key: PrivateKey) -> str:
    """The TXT record's text (RFC 6376 §3.6.1), before splitting into strings."""
    k = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
    return f"v=DKIM1; k={k}; p={public_key_b64(key)}"


def dns_record(selector: str, domain: str, key: PrivateKey) -> str:
    """The zone-file line: `SELECTOR._domainkey.DOMAIN. IN TXT "..." "..."` (SPEC §6).

    A TXT character-string holds at most 255 bytes (RFC 1035 §3.3), so the
    text is cut into consecutive 255-byte strings on the one line; resolvers
    and DKIM verifiers join them back without separators (RFC 6376 §3.6.2.2).
    """
    value = txt_value(key)
    strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT {strings}"
