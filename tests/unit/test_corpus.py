"""Replays the SMTP dialogues in tests/corpus/*.smtp against ServerProtocol.

The format is line based and ASCII (gunicorn's tests/requests in spirit):

    # comment              ignored, as are blank lines
    C: <text>              the client sends <text> followed by CRLF; "C:" alone sends
                           an empty line. Backslash escapes (\\r \\n \\t \\0 \\xNN \\\\)
                           are decoded first, so bare CR/LF, NUL and 8-bit bytes can
                           be written: "C: NOOP\\n" sends "NOOP\\n\\r\\n".
    S: <prefix>            the server's next reply; the last line of that reply must
                           start with <prefix> ("250", "250 2.1.5", "220 mx.test").
                           The first S: is the greeting.
    X: closed | X: open    whether the session has ended when the dialogue is done.

All C: lines are concatenated and fed whole, one byte at a time and in random
chunks (so every dialogue is also a pipelining test); S: lines are matched in order
against the replies. The decider is test_protocol's: yes to everything, except
addresses in the refused.example domain (550); a message gets "250 2.0.0 OK queued
as X". Server hostname mx.test, SIZE limit 10000, 5 recipients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .test_protocol import drive, split_replies

CORPUS = Path(__file__).resolve().parent.parent / "corpus"


@dataclass
class Dialogue:
    client: bytes = b""
    server: list[str] = field(default_factory=list)
    closed: bool | None = None


def parse(path: Path) -> Dialogue:
    dialogue = Dialogue()
    text = path.read_text(encoding="ascii")
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{path.name}:{number}"
        if not line.strip() or line.startswith("#"):
            continue
        tag, sep, rest = line.partition(":")
        rest = rest.removeprefix(" ")
        if not sep or tag not in ("C", "S", "X"):
            raise ValueError(f"{where}: expected 'C:', 'S:', 'X:' or '#': {line!r}")
        if tag == "C":
            dialogue.client += rest.encode("ascii").decode("unicode_escape").encode("latin-1") + b"\r\n"
        elif tag == "S":
            if not rest[:3].isdigit():
                raise ValueError(f"{where}: S: needs a reply code: {line!r}")
            dialogue.server.append(rest)
        elif rest in ("closed", "open"):
            dialogue.closed = rest == "closed"
        else:
            raise ValueError(f"{where}: X: is 'closed' or 'open': {line!r}")
    return dialogue


FILES = sorted(CORPUS.glob("*.smtp"))


def test_corpus_is_there() -> None:
    assert len(FILES) >= 5


def test_parse_escapes() -> None:
    path = CORPUS / "syntax_errors.smtp"
    client = parse(path).client
    assert b"NOOP\n\r\n" in client and b"NO\0OP\r\n" in client and "jörg".encode() in client


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dialogue(path: Path) -> None:
    dialogue = parse(path)
    assert dialogue.server, f"{path.name}: no S: lines"
    result = drive(dialogue.client)
    got = split_replies(result.proto.greeting()) + result.replies
    last_lines = [reply.rstrip(b"\r\n").split(b"\r\n")[-1].decode() for reply in got]
    for i, (expected, actual) in enumerate(zip(dialogue.server, last_lines)):
        assert actual.startswith(expected), f"{path.name}: reply {i + 1}: expected {expected!r}, got {actual!r}"
    assert len(last_lines) == len(dialogue.server), (
        f"{path.name}: {len(dialogue.server)} replies expected, got {len(last_lines)}: {last_lines}"
    )
    if dialogue.closed is not None:
        assert result.proto.closed == dialogue.closed, path.name
