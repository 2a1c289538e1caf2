"""Fast paths that replace a regex must give the regex's answer (protocol long lines, dot-stuffing)."""

from __future__ import annotations

import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from hedwig.smtp.protocol import _LONG_LINE, _has_long_line
from hedwig.transport import dot_stuff

_DOT_LINE = re.compile(rb"(?m)^\.")

PIECES = [b"\r\n", b"\n", b"\r", b".", b"a", b"x" * 120, b"y" * 498, b"z" * 997, b"\r\n.", b"\n."]


def random_body(rng: random.Random) -> bytes:
    return b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 60)))


def test_long_line_check_agrees_with_the_regex_on_random_bodies() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        body = random_body(rng)
        assert _has_long_line(body) == bool(_LONG_LINE.search(body)), body[:80]


def test_long_line_check_at_the_edges() -> None:
    for n in (997, 998, 999, 1000, 1500, 2000):
        for before in (b"", b"ab\r\n", b"a" * 499 + b"\r\n", b"a" * 500 + b"\r\n"):
            body = before + b"q" * n + b"\r\n"
            assert _has_long_line(body) == bool(_LONG_LINE.search(body)), (len(before), n)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join))
def test_long_line_check_agrees_with_the_regex(body: bytes) -> None:
    assert _has_long_line(body) == bool(_LONG_LINE.search(body))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\n", b"\r\n", b"a", b"..", b"\r"]), max_size=40).map(b"".join))
def test_dot_stuffing_agrees_with_the_regex(message: bytes) -> None:
    assert dot_stuff(message) == _DOT_LINE.sub(b"..", message)
