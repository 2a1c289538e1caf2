"""hedwig.smtp.address: MAIL/RCPT paths and parameters (RFC 5321 §4.1.2, §4.5.3.1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hedwig.smtp import replies as R
from hedwig.smtp.address import (
    MAX_LOCAL_PART,
    MAX_PATH,
    MailParams,
    ProtocolError,
    domain_of,
    is_domain,
    parse_mail,
    parse_rcpt,
)
from hedwig.smtp.replies import Reply


def refused(call: Callable[..., object], *args: object) -> Reply:
    with pytest.raises(ProtocolError) as info:
        call(*args)
    return info.value.reply


def _path_of(total: int) -> str:
    """A valid mailbox whose path, angle brackets included, is `total` octets."""
    local = "l" * MAX_LOCAL_PART
    room = total - 2 - len(local) - 1  # brackets, "@"
    labels = []
    while room > 0:
        n = min(63, room)
        if room - n == 1:  # never leave a lone "." with no label after it
            n -= 1
        labels.append("d" * n)
        room -= n + 1
    domain = ".".join(labels)
    path = f"<{local}@{domain}>"
    assert len(path) == total, (len(path), total)
    return path


# -- MAIL ---------------------------------------------------------------------------


def test_plain_sender() -> None:
    assert parse_mail("FROM:<alice@example.org>") == ("alice@example.org", MailParams())


def test_null_reverse_path() -> None:
    assert parse_mail("FROM:<>") == ("", MailParams())
    assert parse_mail("FROM:<> SIZE=10") == ("", MailParams(size=10))


def test_keyword_is_case_insensitive_and_space_after_colon_tolerated() -> None:
    assert parse_mail("from:<a@example.org>")[0] == "a@example.org"
    assert parse_mail("FROM: <a@example.org>")[0] == "a@example.org"
    assert parse_mail("FROM:   <a@example.org>")[0] == "a@example.org"
    assert parse_rcpt("to: <b@example.net>", False) == "b@example.net"


def test_case_of_the_address_is_kept() -> None:
    assert parse_mail("FROM:<Alice.Smith@Example.ORG>")[0] == "Alice.Smith@Example.ORG"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<@relay.example:alice@example.org>", "alice@example.org"),
        ("<@a.example,@b.example:alice@example.org>", "alice@example.org"),
    ],
)
def test_source_route_is_stripped(arg: str, expected: str) -> None:
    assert parse_mail("FROM:" + arg)[0] == expected
    assert parse_rcpt("TO:" + arg, False) == expected


@pytest.mark.parametrize("arg", ["<@relay.example>", "<@relay.example:>", "<@>"])
def test_broken_source_route(arg: str) -> None:
    assert refused(parse_mail, "FROM:" + arg) == R.R501_BAD_SENDER
    assert refused(parse_rcpt, "TO:" + arg, False) == R.R501_BAD_RCPT


@pytest.mark.parametrize(
    "mailbox",
    [
        '"john doe"@example.org',
        '"a\\"b"@example.org',
        '"a\\\\b"@example.org',
        '"a@b"@example.org',
        '""@example.org',
        "a.b.c@example.org",
        "a+tag@example.org",
        "!#$%&'*+/=?^_`{|}~-@example.org",
        "user@[127.0.0.1]",
        "user@[IPv6:::1]",
        "user@[IPv6:2001:db8::1]",
        "user@localhost",
        "user@xn--bcher-kva.example",
        "user@a-b.example",
        "user@123.example",
    ],
)
def test_valid_mailboxes(mailbox: str) -> None:
    assert parse_mail(f"FROM:<{mailbox}>")[0] == mailbox
    assert parse_rcpt(f"TO:<{mailbox}>", False) == mailbox


@pytest.mark.parametrize(
    "mailbox",
    [
        "alice",
        "@example.org",
        "alice@",
        "alice@@example.org",
        "a b@example.org",
        "a..b@example.org",
        ".a@example.org",
        "a.@example.org",
        '"unclosed@example.org',
        '"a"b"@example.org',
        "a(b)@example.org",
        "a@-example.org",
        "a@example-.org",
        "a@example..org",
        "a@example.org.",
        "a@.example.org",
        "a@exa_mple.org",
        "a@[127.0.0]",
        "a@[localhost]",
        "a@[IPv6:zz::1]",
        "a@[127.0.0.1",
        "a@example.org ",
    ],
)
def test_invalid_mailboxes(mailbox: str) -> None:
    assert refused(parse_mail, f"FROM:<{mailbox}>") == R.R501_BAD_SENDER
    assert refused(parse_rcpt, f"TO:<{mailbox}>", False) == R.R501_BAD_RCPT


@pytest.mark.parametrize(
    "arg",
    ["FROM:alice@example.org", "FROM:<alice@example.org", "FROM:alice@example.org>", "FROM:",
     "FROM:<alice@example.org>x", "FROM:<alice@example.org>\tSIZE=1"],
)
def test_missing_brackets_or_trailing_junk(arg: str) -> None:
    assert refused(parse_mail, arg) == R.R501_BAD_SENDER
    assert refused(parse_rcpt, "TO:" + arg[5:], False) == R.R501_BAD_RCPT


@pytest.mark.parametrize("arg", ["", "FROM", "FROM <a@example.org>", "TO:<a@example.org>", "FRO:<a@example.org>"])
def test_wrong_keyword_is_syntax_error(arg: str) -> None:
    assert refused(parse_mail, arg) == R.R501_SYNTAX


def test_rcpt_wrong_keyword() -> None:
    assert refused(parse_rcpt, "FROM:<a@example.org>", False) == R.R501_SYNTAX
    assert refused(parse_rcpt, "", False) == R.R501_SYNTAX


def test_local_part_limit() -> None:
    ok = "l" * MAX_LOCAL_PART + "@example.org"
    assert parse_mail(f"FROM:<{ok}>")[0] == ok
    long = "l" * (MAX_LOCAL_PART + 1) + "@example.org"
    assert refused(parse_mail, f"FROM:<{long}>") == R.R553_PATH_TOO_LONG
    assert refused(parse_rcpt, f"TO:<{long}>", False) == R.R553_PATH_TOO_LONG
    assert R.R553_PATH_TOO_LONG.to_bytes().startswith(b"553 5.1.0 ")


def test_local_part_limit_counts_utf8_octets() -> None:
    local = "é" * 33  # 66 octets, 33 characters
    assert refused(parse_mail, f"FROM:<{local}@example.org> SMTPUTF8") == R.R553_PATH_TOO_LONG


def test_path_limit_includes_brackets() -> None:
    ok = _path_of(MAX_PATH)
    assert parse_mail("FROM:" + ok)[0] == ok[1:-1]
    assert parse_rcpt("TO:" + ok, False) == ok[1:-1]
    long = _path_of(MAX_PATH + 1)
    assert refused(parse_mail, "FROM:" + long) == R.R553_PATH_TOO_LONG
    assert refused(parse_rcpt, "TO:" + long, False) == R.R553_PATH_TOO_LONG


def test_very_long_path_is_553_not_a_hang() -> None:
    assert refused(parse_mail, "FROM:<" + "a" * 100_000 + "@example.org>") == R.R553_PATH_TOO_LONG


# -- MAIL parameters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("SIZE=0", MailParams(size=0)),
        ("SIZE=12345", MailParams(size=12345)),
        ("size=7", MailParams(size=7)),
        ("BODY=7BIT", MailParams(body="7BIT")),
        ("BODY=8bitmime", MailParams(body="8BITMIME")),
        ("SMTPUTF8", MailParams(smtputf8=True)),
        ("smtputf8", MailParams(smtputf8=True)),
        ("SIZE=1 BODY=8BITMIME SMTPUTF8", MailParams(1, "8BITMIME", True)),
        ("SIZE=1  BODY=7BIT", MailParams(1, "7BIT")),
        ("", MailParams()),
    ],
)
def test_mail_params(params: str, expected: MailParams) -> None:
    assert parse_mail(f"FROM:<a@example.org> {params}") == ("a@example.org", expected)


@pytest.mark.parametrize(
    "params",
    [
        "SIZE", "SIZE=", "SIZE=-1", "SIZE=1.5", "SIZE=ten", "SIZE=" + "9" * 21, "SIZE=\u00b2",
        "SIZE=\u0661\u0662", "BODY", "BODY=BINARYMIME", "SMTPUTF8=yes", "=1", "-X=1", "X=a=b",
    ],
)
def test_bad_mail_params_are_501(params: str) -> None:
    assert refused(parse_mail, f"FROM:<a@example.org> {params}") == R.R501_SYNTAX


def test_size_of_twenty_digits_is_parsed() -> None:
    assert parse_mail("FROM:<a@example.org> SIZE=" + "9" * 20)[1].size == int("9" * 20)


@pytest.mark.parametrize("params", ["FOO", "FOO=bar", "AUTH=<>", "RET=HDRS", "ENVID=x"])
def test_unknown_mail_params_are_555(params: str) -> None:
    assert refused(parse_mail, f"FROM:<a@example.org> {params}") == R.R555_UNKNOWN_PARAM
    assert R.R555_UNKNOWN_PARAM.to_bytes().startswith(b"555 5.5.4 ")


# -- SMTPUTF8 ------------------------------------------------------------------------


def test_non_ascii_needs_smtputf8() -> None:
    assert refused(parse_mail, "FROM:<jörg@example.org>") == R.R553_NEED_SMTPUTF8
    assert refused(parse_mail, "FROM:<jorg@bücher.example>") == R.R553_NEED_SMTPUTF8
    assert refused(parse_rcpt, "TO:<zoë@example.net>", False) == R.R553_NEED_SMTPUTF8
    assert R.R553_NEED_SMTPUTF8.to_bytes().startswith(b"553 5.6.7 ")


def test_non_ascii_with_smtputf8() -> None:
    assert parse_mail("FROM:<jörg@bücher.example> SMTPUTF8") == (
        "jörg@bücher.example", MailParams(smtputf8=True))
    assert parse_rcpt("TO:<zoë@例え.jp>", True) == "zoë@例え.jp"
    assert parse_rcpt('TO:<"zoë x"@example.net>', True) == '"zoë x"@example.net'


# -- RCPT ----------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["TO:<postmaster>", "TO:<Postmaster>", "TO:<POSTMASTER>"])
def test_postmaster_without_domain(arg: str) -> None:
    assert parse_rcpt(arg, False) == arg[4:-1]


def test_postmaster_with_domain_is_a_mailbox() -> None:
    assert parse_rcpt("TO:<postmaster@example.org>", False) == "postmaster@example.org"


def test_postmaster_is_not_a_sender() -> None:
    assert refused(parse_mail, "FROM:<postmaster>") == R.R501_BAD_SENDER


def test_rcpt_null_path_is_refused() -> None:
    assert refused(parse_rcpt, "TO:<>", False) == R.R501_BAD_RCPT


@pytest.mark.parametrize("params", ["NOTIFY=NEVER", "ORCPT=rfc822;a@example.org", "SIZE=1"])
def test_rcpt_params_are_555(params: str) -> None:
    assert refused(parse_rcpt, f"TO:<b@example.net> {params}", False) == R.R555_UNKNOWN_PARAM


def test_rcpt_bad_param_syntax_is_501() -> None:
    assert refused(parse_rcpt, "TO:<b@example.net> =x", False) == R.R501_SYNTAX


def test_rcpt_trailing_spaces() -> None:
    assert parse_rcpt("TO:<b@example.net>   ", False) == "b@example.net"


# -- helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "domain"),
    [("a@Example.ORG", "example.org"), ("", ""), ("postmaster", ""), ('"a@b"@c.example', "c.example"),
     ("a@[127.0.0.1]", "[127.0.0.1]")],
)
def test_domain_of(address: str, domain: str) -> None:
    assert domain_of(address) == domain


def test_is_domain() -> None:
    assert is_domain("example.org")
    assert is_domain("a")
    assert is_domain("[10.0.0.1]")
    assert not is_domain("")
    assert not is_domain("a" * 63 + "." + "b" * 200)  # 264 octets > 255
    assert is_domain(".".join(["a" * 63] * 3) + "." + "b" * 63)  # 255
    assert not is_domain("exa mple.org")
    assert not is_domain("[]")


def test_protocol_error_carries_the_reply() -> None:
    exc = ProtocolError(R.R501_SYNTAX)
    assert exc.reply is R.R501_SYNTAX
    assert str(exc) == R.R501_SYNTAX.text
