"""DKIM signing (SPEC §6): keys, the header set, and the DKIM-Signature on top.

A `Signer` is built once per worker from `[server.dkim]` by `load_signer()`,
which loads the PEM private key (PKCS#1 or PKCS#8 RSA, PKCS#8 ed25519) with
`cryptography`, checks it against `key_type`, and signs and verifies a test
message with it, so a bad key is one config error at start and never a
surprise at delivery. `Signer.sign(message)` returns the message with a
`DKIM-Signature:` field prepended (SPEC §10: only fields at the top are
added; the rest goes out byte for byte). `hedwig dkim-generate` uses
`generate_key()`, `write_private_key()` and `dns_record()` from here.

dkimpy does the DKIM format: header parsing, relaxed/relaxed
canonicalisation, the body hash, the tag list and its folding, the header
hash. Only the RSA private-key operation is not dkimpy's: its pure-Python
arithmetic costs ~8 ms per RSA-2048 signature here (and parsing the PEM
again for every message another ~0.16 ms), OpenSSL through `cryptography`
~0.36 ms. `_Dkim` below is that one seam. ed25519 is dkimpy's own path
(PyNaCl, already native).

Must not: read the spool, touch the network, or decide what a signing
failure means for the message (delivery.py defers it; SPEC §6 never sends
mail unsigned).
"""

from __future__ import annotations

import base64
import os
import re
import types
from collections.abc import Callable
from typing import Any

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


# -- the seam: dkimpy's DKIM with the RSA private-key operation from cryptography --


def _rebound(method: Callable[..., Any], **names: Any) -> Callable[..., Any]:
    """`method`, unchanged, except that the global `names` it calls resolve to ours.

    Only this copy sees them: dkimpy's own DKIM, dkim.sign and everything
    else in the process keep dkimpy's functions. If a dkimpy release stops
    calling one of these names, the import fails here instead of signing
    with the pure-Python fallback behind our back.
    """
    missing = sorted(set(names) - set(method.__code__.co_names))
    if missing:
        raise ImportError(f"hedwig.signing: dkimpy's {method.__qualname__} no longer calls "
                          f"{', '.join(missing)}; the signing seam needs updating")
    copy = types.FunctionType(method.__code__, {**method.__globals__, **names}, method.__name__,
                              method.__defaults__, method.__closure__)
    copy.__kwdefaults__ = method.__kwdefaults__
    copy.__qualname__ = method.__qualname__
    copy.__doc__ = method.__doc__
    return copy


def _key_as_given(key: rsa.RSAPrivateKey) -> rsa.RSAPrivateKey:
    """Stands in for dkim.crypto.parse_pem_private_key: the key is already loaded."""
    return key


def _rsassa_pkcs1_v1_5_sign(digest: Any, key: rsa.RSAPrivateKey) -> bytes:
    """Stands in for dkim.crypto.RSASSA_PKCS1_v1_5_sign(hash, private_key).

    RFC 8017 §8.2.1 RSASSA-PKCS1-v1_5 over the header hash dkimpy computed
    (`digest` is its hash object). The scheme is deterministic, so the
    result is byte for byte what dkimpy's own arithmetic gives
    (tests/unit/test_signing.py checks it).
    """
    if digest.name.lower() != "sha256":
        raise dkim.ParameterError(f"unsupported hash {digest.name!r} (only rsa-sha256 is signed)")
    return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))


class _Dkim(dkim.DKIM):
    """dkimpy's DKIM whose RSA private key is a `cryptography` key object.

    The one seam. In dkimpy, `DKIM.sign()` turns the PEM it is given into
    numbers with `parse_pem_private_key()` and `DKIM.gen_header()` signs the
    header hash with `RSASSA_PKCS1_v1_5_sign(hash, key)`; both are looked up
    as globals of the `dkim` module. These two methods are dkimpy's own code,
    re-bound so that, for this class only, the first hands our loaded key
    through and the second signs with it in OpenSSL. Nothing else changes:
    canonicalisation, body hash, tags, folding and header hashing are
    dkimpy's. ed25519 keys take dkimpy's own branch (not these names).
    """

    sign = _rebound(dkim.DKIM.sign, parse_pem_private_key=_key_as_given)
    gen_header = _rebound(dkim.DKIM.gen_header, RSASSA_PKCS1_v1_5_sign=_rsassa_pkcs1_v1_5_sign)


# -- signing ---------------------------------------------------------------------


class Signer:
    """Signs outgoing mail for one (domain, selector, key); safe to share between greenlets."""

    def __init__(self, domain: str, selector: str, key: PrivateKey) -> None:
        self.domain = domain.rstrip(".")
        self.selector = selector
        self.key = key
        self._d = self.domain.encode("ascii")
        self._s = selector.encode("ascii")
        self._privkey: Any  # what _Dkim.sign takes as `privkey`
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = b"rsa-sha256"
            self._privkey = key
        else:
            # dkimpy's ed25519 branch takes the 32-byte seed in base64 (RFC 8463 keys).
            self.algorithm = b"ed25519-sha256"
            self._privkey = base64.b64encode(key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()))

    @property
    def key_type(self) -> str:
        return "rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ed25519"

    def sign(self, message: bytes) -> bytes:
        """`message` with a DKIM-Signature field on top. Raises dkim.DKIMException (or
        ValueError) for a message dkimpy cannot parse; never returns it unsigned."""
        d = _Dkim(message, signature_algorithm=self.algorithm)
        # SPEC §6: the listed fields that are present, each instance of them
        # (RFC 6376 §5.4.2: a name listed once per instance signs them all).
        # From is always listed: if absent, that signs its absence.
        names = [name.lower() for name, _ in d.headers if name.lower() in _SIGNED]
        if b"from" not in names:
            names.append(b"from")
        field = d.sign(self._s, self._d, self._privkey, canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=names)
        return field + message


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
