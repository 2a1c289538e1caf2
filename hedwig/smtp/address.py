"""RFC 5321 paths and ESMTP parameters of MAIL and RCPT.

Pure functions over already-decoded command arguments. A parse error raises
ProtocolError carrying the reply the client should get, so the protocol can
answer without a ladder of error types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .replies import (
    R501_BAD_RCPT,
    R501_BAD_SENDER,
    R501_SYNTAX,
    R553_NEED_SMTPUTF8,
    R553_PATH_TOO_LONG,
    R555_UNKNOWN_PARAM,
    Reply,
)

MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets
MAX_LOCAL_PART = 64  # §4.5.3.1.1
MAX_DOMAIN = 255  # §4.5.3.1.2


class ProtocolError(Exception):
    """A client error; `reply` is what the client is told."""

    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME"
    smtputf8: bool = False


# atext of RFC 5322 §3.2.3; non-ASCII is allowed separately under SMTPUTF8 (RFC 6531).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?)\Z")
_LITERAL = re.compile(r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]\Z")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?\Z")


def is_domain(text: str) -> bool:
    if not text or len(text.encode("utf-8")) > MAX_DOMAIN:
        return False
    if text.startswith("["):
        return _LITERAL.match(text) is not None
    return all(_LABEL.match(label) for label in text.split("."))


def _check_mailbox(mailbox: str, bad: Reply) -> None:
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not is_domain(domain):
        raise ProtocolError(bad)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise ProtocolError(R553_PATH_TOO_LONG)
    if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        raise ProtocolError(bad)


def _split_path(arg: str, keyword: str, bad: Reply) -> tuple[str, list[str]]:
    """'FROM:<a@b> SIZE=10' -> ('a@b', ['SIZE=10']). Tolerates a space after the colon."""
    if arg[: len(keyword)].upper() != keyword:
        raise ProtocolError(R501_SYNTAX)
    rest = arg[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):
        raise ProtocolError(bad)
    end = rest.find(">")
    if end < 0:
        raise ProtocolError(bad)
    if end + 1 > MAX_PATH:
        raise ProtocolError(R553_PATH_TOO_LONG)
    path = rest[1:end]
    tail = rest[end + 1:]
    if tail and not tail.startswith(" "):
        raise ProtocolError(bad)
    if path.startswith("@"):
        # RFC 5321 §4.1.1.3 / Appendix C: source routes are accepted and ignored.
        colon = path.find(":")
        if colon < 0:
            raise ProtocolError(bad)
        path = path[colon + 1:]
        if not path:  # "<@relay:>" is not the null path
            raise ProtocolError(bad)
    return path, tail.split()


def _params(words: list[str]) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in words:
        m = _PARAM.match(word)
        if not m:
            raise ProtocolError(R501_SYNTAX)
        params[m.group(1).upper()] = m.group(2)
    return params


def _check_ascii(text: str, smtputf8: bool) -> None:
    if not smtputf8 and not text.isascii():
        raise ProtocolError(R553_NEED_SMTPUTF8)


def parse_mail(arg: str) -> tuple[str, MailParams]:
    """Argument of MAIL ('FROM:<path> params') -> (reverse-path, params); '' is the null path."""
    path, words = _split_path(arg, "FROM:", R501_BAD_SENDER)
    params = _params(words)
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    for key, value in params.items():
        if key == "SIZE":  # RFC 1870
            # isascii(): str.isdigit() is also true for "²", which int() refuses.
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise ProtocolError(R501_SYNTAX)
            size = int(value)
        elif key == "BODY":  # RFC 6152
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise ProtocolError(R501_SYNTAX)
            body = value.upper()
        elif key == "SMTPUTF8":  # RFC 6531
            if value is not None:
                raise ProtocolError(R501_SYNTAX)
            smtputf8 = True
        else:
            raise ProtocolError(R555_UNKNOWN_PARAM)
    if path:
        _check_ascii(path, smtputf8)
        _check_mailbox(path, R501_BAD_SENDER)
    return path, MailParams(size, body, smtputf8)


def parse_rcpt(arg: str, smtputf8: bool) -> str:
    """Argument of RCPT ('TO:<path>') -> forward-path. No RCPT parameters are offered."""
    path, words = _split_path(arg, "TO:", R501_BAD_RCPT)
    if _params(words):
        raise ProtocolError(R555_UNKNOWN_PARAM)
    if path.lower() == "postmaster":  # RFC 5321 §4.5.1: <Postmaster> without a domain
        return path
    _check_ascii(path, smtputf8)
    _check_mailbox(path, R501_BAD_RCPT)
    return path


def domain_of(address: str) -> str:
    """The domain of a mailbox, lower-cased; '' for the null path or <postmaster>."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""  # rpartition puts an @-less "postmaster" in [2]
