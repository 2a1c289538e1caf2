"""hedwig.config: value parsers, defaults, one-line errors, example.toml, describe()."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from pathlib import Path

import pytest

from hedwig import config
from hedwig.config import (
    KEYS,
    ConfigError,
    describe,
    load_config,
    parse_config,
    parse_duration,
    parse_hostport,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "example.toml"

LISTENER = '[[server.listeners]]\naddr = "127.0.0.1:2525"\n'
STORAGE = '[storage]\nbase_path = "spool"\n'


def toml(*, top: str = "", server: str = "", listeners: str = LISTENER, extra: str = "",
         storage: str = STORAGE) -> str:
    """A config file: top-level keys, [server] keys, listeners, other tables, [storage]."""
    return f"{top}\n[server]\n{server}\n{listeners}\n{extra}\n{storage}\n"


def load_text(tmp_path: Path, text: str, **kw: bool) -> config.Config:
    path = tmp_path / "hedwig.toml"
    path.write_text(text.replace("{tmp}", str(tmp_path)))
    return load_config(str(path), **kw)


# --- value parsers -----------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("7d", 604800), ("1.5s", 1.5),
    ("0s", 0), ("45", 45), (10, 10), (2.5, 2.5), (0, 0),
])
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("text", [
    "abc", "", "5 minutes", "5 m", "-5s", "5w", "1h30m", -1, True, "inf",
    float("nan"), float("inf"),
])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_duration(text, "server.cmd_timeout")  # type: ignore[arg-type]
    assert str(e.value).startswith('config: server.cmd_timeout: expected a duration like "30s"')


def test_parse_duration_message_quotes_the_value() -> None:
    with pytest.raises(ConfigError) as e:
        parse_duration("abc", "k")
    assert str(e.value) == 'config: k: expected a duration like "30s", "5m" or "7d", got "abc"'
    assert (e.value.key, e.value.message.startswith("expected")) == ("k", True)


@pytest.mark.parametrize("value, size", [
    (0, 0), (1024, 1024), ("1024", 1024), ("100B", 100), ("1K", 1024), ("100KiB", 102400),
    ("10KB", 10000), ("10MB", 10_000_000), ("512MiB", 512 << 20), ("2M", 2 << 20),
    ("1G", 1 << 30), ("1GiB", 1 << 30), ("1GB", 10**9), ("2TiB", 2 << 40), ("1TB", 10**12),
    ("10 MiB", 10 << 20), ("1gib", 1 << 30),
])
def test_parse_size(value: str | int, size: int) -> None:
    assert parse_size(value, "k") == size


@pytest.mark.parametrize("value", ["lots", "", "1.5GiB", "-1", -1, "10XB", "MiB", True, False, 1.0])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_size(value, "server.disk_reserve")  # type: ignore[arg-type]
    assert str(e.value).startswith("config: server.disk_reserve: expected a size like")


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:25", ("127.0.0.1", 25)), ("[::1]:25", ("::1", 25)),
    ("localhost:0", ("localhost", 0)), ("mx.example.com:65535", ("mx.example.com", 65535)),
    ("[2001:db8::1]:2525", ("2001:db8::1", 2525)), ("0.0.0.0:465", ("0.0.0.0", 465)),
])
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, "k") == expected


@pytest.mark.parametrize("text", [
    "nonsense", "::1:25", "[::1]", ":25", "host:", "host:70000", "host:-1", "host: 25",
    "[nothost]:25", "my host:25", "host:25x", "[::1]25", 25, "",
])
def test_parse_hostport_rejects(text: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_hostport(text, "server.listeners[0].addr")  # type: ignore[arg-type]
    assert str(e.value).startswith("config: server.listeners[0].addr: expected ")
    assert "\n" not in str(e.value)


def test_relay_networks_are_strict_cidrs() -> None:
    data = {"server": {"listeners": [{"addr": "127.0.0.1:25"}],
                       "relay_networks": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]},
            "storage": {"base_path": "spool"}}
    nets = parse_config(data).server.relay_networks
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "::1/128"]
    assert isinstance(nets, tuple) and isinstance(nets[0], ipaddress.IPv4Network)


# --- defaults ----------------------------------------------------------------------


def test_minimal_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.socket, "gethostname", lambda: "mx.test")
    c = load_text(tmp_path, LISTENER + STORAGE)
    assert c.source == str(tmp_path / "hedwig.toml")
    assert c.log == config.LogConfig(level="info", format="text")
    assert c.filters == ()
    s = c.server
    assert (s.workers, s.pool_size, s.delivery_concurrency, s.max_retries) == (1, 100, 100, 5)
    assert (s.retry_initial_delay, s.retry_max_delay) == (60.0, 86400.0)
    assert (s.disable_outbound, s.bounce_notifications, s.outbound_local) == (False, False, False)
    assert (s.hostname, s.helo_hostname) == ("mx.test", "mx.test")
    assert (s.max_message_size, s.max_recipients, s.max_connections) == (26214400, 1000, 10000)
    assert (s.cmd_timeout, s.data_timeout) == (300.0, 600.0)
    assert [str(n) for n in s.relay_networks] == ["127.0.0.0/8", "::1/128"]
    assert s.disk_reserve == 1 << 30
    assert s.listeners == (config.ListenerConfig("127.0.0.1:2525", "127.0.0.1", 2525, None, False),)
    assert (s.auth, s.dkim, s.metrics, s.health) == ((), None, None, None)
    assert s.rate_limits == config.RateLimitConfig(False, None, {}, "local", None, "hedwig:")
    assert s.smtp == config.SmtpOutConfig(25, (), 30.0, 300.0, "opportunistic")
    assert dict(s.routes) == {}
    assert c.storage == config.StorageConfig("fs", os.path.abspath("spool"), True,
                                             config.CleanupConfig(None, None, 3600.0))


def test_relay_networks_default_is_empty_with_auth_users() -> None:
    data = {"server": {"listeners": [{"addr": "127.0.0.1:25"}],
                       "auth": [{"username": "u", "password": "p"}]},
            "storage": {"base_path": "spool"}}
    assert parse_config(data).server.relay_networks == ()
    data["server"]["relay_networks"] = ["10.0.0.0/8"]  # type: ignore[index]
    assert [str(n) for n in parse_config(data).server.relay_networks] == ["10.0.0.0/8"]


def test_derived_defaults() -> None:
    data = {"server": {"listeners": [{"addr": "127.0.0.1:25"}], "pool_size": 7,
                       "hostname": "mx.example.com"},
            "storage": {"base_path": "/var/spool/hedwig", "storage_type": "filesystem"}}
    c = parse_config(data)
    assert (c.server.delivery_concurrency, c.server.helo_hostname) == (7, "mx.example.com")
    assert c.storage.storage_type == "fs"
    data["server"].update(delivery_concurrency=3, helo_hostname="out.example.com")  # type: ignore[attr-defined]
    c = parse_config(data)
    assert (c.server.delivery_concurrency, c.server.helo_hostname) == (3, "out.example.com")


def test_values_are_normalised_and_frozen(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    text = toml(
        server='max_message_size = "10MiB"',
        listeners=LISTENER + '[[server.listeners]]\naddr = "[::1]:4650"\n'
        '[server.listeners.tls]\ncert_path = "{tmp}/cert.pem"\nkey_path = "{tmp}/key.pem"\n'
        'mode = "STARTTLS"\n',
        extra='[log]\nlevel = "warning"\n[server.rate_limits.domain_limits]\n"Gmail.COM" = 30\n'
        '[server.routes]\n"Example.Test" = "127.0.0.1:2526"\n"*" = "[::1]:25"\n'
        '[server.smtp]\nnameservers = ["127.0.0.1", "127.0.0.1:5353", "[::1]:53", "::2"]\n'
        '[[filters]]\ntype = "to_domain_filter"\ndomain = ["Spam.Example"]\naction = "deny"\n'
        '[server.metrics]\nbind = "127.0.0.1:0"\n',
    )
    c = load_text(tmp_path, text)
    s = c.server
    assert c.log.level == "warn" and s.max_message_size == 10 << 20
    assert s.listeners[1] == config.ListenerConfig(
        "[::1]:4650", "::1", 4650,
        config.TlsConfig(f"{tmp_path}/cert.pem", f"{tmp_path}/key.pem", "starttls"), False)
    assert dict(s.rate_limits.domain_limits) == {"gmail.com": 30}
    assert dict(s.routes) == {"example.test": ("127.0.0.1", 2526), "*": ("::1", 25)}
    assert s.smtp.nameservers == (("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 53), ("::2", 53))
    assert c.filters == (config.FilterConfig("to_domain_filter", ("spam.example",), "deny"),)
    assert s.metrics == config.HttpBind("127.0.0.1", 0) and s.health is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.routes["x"] = ("h", 1)  # type: ignore[index]


def test_auth_user_hides_password() -> None:
    plain = config.AuthUser("u", "hunter2")
    hashed = config.AuthUser("v", "scrypt$16384$8$1$c2FsdA==$aA==")
    assert "hunter2" not in repr(plain)
    assert (plain.is_hashed, hashed.is_hashed) == (False, True)


def test_check_files_false_skips_file_checks(tmp_path: Path) -> None:
    text = toml(extra='[server.dkim]\ndomain = "example.com"\nselector = "s1"\n'
                      'private_key = "/nonexistent/dkim.key"\n')
    assert load_text(tmp_path, text, check_files=False).server.dkim == config.DkimConfig(
        "example.com", "s1", "/nonexistent/dkim.key", "rsa")
    expected = r'^config: server\.dkim\.private_key: cannot read "/nonexistent/dkim.key": no such'
    with pytest.raises(ConfigError, match=expected):
        load_text(tmp_path, text)


# --- broken configs: one line, names the key, says what was expected -------------------

TLS = '[server.listeners.tls]\ncert_path = "{tmp}/cert.pem"\nkey_path = "{tmp}/key.pem"\n'
TWO_LISTENERS = LISTENER + '[[server.listeners]]\naddr = "{addr}"\n'
BROKEN = [
    # (id, toml text, key, fragment of the message)
    ("unknown-top-level", toml(top='colour = "blue"'), "colour", "unknown key"),
    ("unknown-server-key-hint", toml(server="listner = 1"), "server.listner",
     'unknown key (did you mean "listeners"?)'),
    ("unknown-listener-key-hint", toml(listeners=LISTENER + "allow_cleartext_aut = true\n"),
     "server.listeners[0].allow_cleartext_aut", 'did you mean "allow_cleartext_auth"?'),
    ("unknown-tls-key", toml(listeners=LISTENER + TLS + 'mod = "starttls"\n'),
     "server.listeners[0].tls.mod", 'did you mean "mode"?'),
    ("unknown-cleanup-key", toml(storage=STORAGE + '[storage.cleanup]\nintervall = "1h"\n'),
     "storage.cleanup.intervall", 'did you mean "interval"?'),
    ("unknown-filter-key", toml(extra='[[filters]]\ntype = "to_domain_filter"\ndomains = ["x"]\n'),
     "filters[0].domains", 'did you mean "domain"?'),
    ("listeners-missing", toml(listeners=""), "server.listeners",
     "at least one [[server.listeners]] with addr is required"),
    ("listeners-not-array", toml(listeners='[server.listeners]\naddr = "127.0.0.1:25"\n'),
     "server.listeners", "expected [[server.listeners]] tables"),
    ("listener-addr-missing", toml(listeners="[[server.listeners]]\nallow_cleartext_auth = true\n"),
     "server.listeners[0].addr", "missing (required)"),
    ("addr-nonsense", toml(listeners=TWO_LISTENERS.replace("{addr}", "nonsense")),
     "server.listeners[1].addr", 'expected HOST:PORT (IPv6 as "[::1]:25"), got "nonsense"'),
    ("addr-port-70000", toml(listeners='[[server.listeners]]\naddr = "127.0.0.1:70000"\n'),
     "server.listeners[0].addr", 'expected a port from 0 to 65535, got "127.0.0.1:70000"'),
    ("addr-ipv6-no-brackets", toml(listeners='[[server.listeners]]\naddr = "::1:25"\n'),
     "server.listeners[0].addr", "expected HOST:PORT"),
    ("duplicate-listener", toml(listeners=TWO_LISTENERS.replace("{addr}", "127.0.0.1:2525")),
     "server.listeners[1].addr", "already used by server.listeners[0]"),
    ("duration-5-minutes", toml(server='cmd_timeout = "5 minutes"'), "server.cmd_timeout",
     'expected a duration like "30s", "5m" or "7d", got "5 minutes"'),
    ("duration-zero", toml(server='data_timeout = "0s"'), "server.data_timeout",
     "expected a duration above zero"),
    ("size-lots", toml(server='disk_reserve = "lots"'), "server.disk_reserve",
     'expected a size like 1048576, "512MiB" or "1GiB", got "lots"'),
    ("size-too-small", toml(server="max_message_size = 100"), "server.max_message_size",
     "expected a size of at least 1024 bytes, got 100"),
    ("relay-bad-cidr-at-1", toml(server='relay_networks = ["10.0.0.0/8", "10.0.0.1/8"]'),
     "server.relay_networks[1]", 'got "10.0.0.1/8" (host bits set)'),
    ("relay-not-array", toml(server='relay_networks = "10.0.0.0/8"'), "server.relay_networks",
     "expected an array of networks"),
    ("bool-yes", toml(server='disable_outbound = "yes"'), "server.disable_outbound",
     'expected true or false, got "yes"'),
    ("bool-as-int", toml(server="outbound_local = 1"), "server.outbound_local",
     "expected true or false, got 1"),
    ("int-as-bool", toml(server="max_retries = true"), "server.max_retries",
     "expected an integer >= 0, got true"),
    ("int-as-string", toml(server='workers = "two"'), "server.workers",
     'expected an integer from 1 to 256, got "two"'),
    ("workers-0", toml(server="workers = 0"), "server.workers",
     "expected an integer from 1 to 256, got 0"),
    ("hostname-spaces", toml(server='hostname = "mail host"'), "server.hostname",
     "expected a host name without spaces"),
    ("retry-max-below-initial", toml(server='retry_initial_delay = "10m"\nretry_max_delay = "1m"'),
     "server.retry_max_delay", "expected at least server.retry_initial_delay (10m), got 1m"),
    ("tls-mode-sometimes", toml(listeners=LISTENER + TLS + 'mode = "sometimes"\n'),
     "server.listeners[0].tls.mode", 'expected one of "implicit", "starttls", got "sometimes"'),
    ("tls-cert-missing-file",
     toml(listeners=LISTENER + TLS.replace("{tmp}/cert.pem", "/nonexistent/hedwig/cert.pem")),
     "server.listeners[0].tls.cert_path",
     'cannot read "/nonexistent/hedwig/cert.pem": no such file'),
    ("tls-key-is-a-directory", toml(listeners=LISTENER + TLS.replace("{tmp}/key.pem", "{tmp}")),
     "server.listeners[0].tls.key_path", "not a regular file"),
    ("tls-key-path-missing",
     toml(listeners=LISTENER + '[server.listeners.tls]\ncert_path = "{tmp}/cert.pem"\n'),
     "server.listeners[0].tls.key_path", "missing (required)"),
    ("auth-duplicate-user",
     toml(extra='[[server.auth]]\nusername = "a"\npassword = "p"\n'
                '[[server.auth]]\nusername = "a"\npassword = "q"\n'),
     "server.auth[1].username", 'duplicate user "a" (also server.auth[0])'),
    ("auth-empty-password", toml(extra='[[server.auth]]\nusername = "a"\npassword = ""\n'),
     "server.auth[0].password", "expected a non-empty string"),
    ("dkim-missing-selector",
     toml(extra='[server.dkim]\ndomain = "example.com"\nprivate_key = "{tmp}/key.pem"\n'),
     "server.dkim.selector", "missing (required)"),
    ("dkim-key-type", toml(extra='[server.dkim]\ndomain = "example.com"\nselector = "s"\n'
                                 'private_key = "{tmp}/key.pem"\nkey_type = "dsa"\n'),
     "server.dkim.key_type", 'expected one of "rsa", "ed25519", got "dsa"'),
    ("smtp-tls-maybe", toml(extra='[server.smtp]\ntls = "maybe"\n'), "server.smtp.tls",
     'expected one of "opportunistic", "required", "none", got "maybe"'),
    ("smtp-port-0", toml(extra="[server.smtp]\nport = 0\n"), "server.smtp.port",
     "expected an integer from 1 to 65535, got 0"),
    ("nameserver-not-an-ip", toml(extra='[server.smtp]\nnameservers = ["not-an-ip"]\n'),
     "server.smtp.nameservers[0]", 'expected an IP address or IP:PORT like "127.0.0.1:5353"'),
    ("nameserver-int", toml(extra="[server.smtp]\nnameservers = [5]\n"),
     "server.smtp.nameservers[0]", "expected an IP address or IP:PORT"),
    ("nameserver-hostname-port",
     toml(extra='[server.smtp]\nnameservers = ["::1", "dns.test:53"]\n'),
     "server.smtp.nameservers[1]", 'got "dns.test:53"'),
    ("routes-bad-hostport", toml(extra='[server.routes]\n"example.test" = "smarthost"\n'),
     'server.routes."example.test"', 'expected HOST:PORT (IPv6 as "[::1]:25"), got "smarthost"'),
    ("routes-port-0", toml(extra='[server.routes]\n"*" = "smarthost:0"\n'),
     'server.routes."*"', "expected HOST:PORT with a port from 1 to 65535"),
    ("filters-action-maybe",
     toml(extra='[[filters]]\ntype = "to_domain_filter"\ndomain = ["x.test"]\naction = "maybe"\n'),
     "filters[0].action", 'expected one of "allow", "deny", got "maybe"'),
    ("filters-type-unknown",
     toml(extra='[[filters]]\ntype = "subject_filter"\ndomain = ["x.test"]\naction = "deny"\n'),
     "filters[0].type", 'expected one of "from_domain_filter", "to_domain_filter"'),
    ("filters-domain-empty",
     toml(extra='[[filters]]\ntype = "to_domain_filter"\ndomain = []\naction = "deny"\n'),
     "filters[0].domain", "expected a non-empty array of domains"),
    ("domain-limit-negative", toml(extra='[server.rate_limits.domain_limits]\n"gmail.com" = -1\n'),
     'server.rate_limits.domain_limits."gmail.com"', "expected an integer >= 0, got -1"),
    ("domain-limit-duplicate",
     toml(extra='[server.rate_limits.domain_limits]\n"gmail.com" = 1\n"GMail.com" = 2\n'),
     'server.rate_limits.domain_limits."GMail.com"', 'duplicate of "gmail.com"'),
    ("redis-without-url", toml(extra='[server.rate_limits]\nenabled = true\nbackend = "redis"\n'),
     "server.rate_limits.redis_url", 'missing (required when backend = "redis")'),
    ("redis-url-scheme", toml(extra='[server.rate_limits]\nredis_url = "http://x"\n'),
     "server.rate_limits.redis_url", "expected a URL starting with redis://"),
    ("metrics-without-bind", toml(extra="[server.metrics]\n"), "server.metrics.bind",
     "missing (required)"),
    ("health-bind-bad", toml(extra='[server.health]\nbind = 9091\n'), "server.health.bind",
     "expected HOST:PORT"),
    ("base-path-missing", toml(storage="[storage]\nfsync = false\n"), "storage.base_path",
     "missing (required)"),
    ("storage-missing", toml(storage=""), "storage.base_path", "missing (required)"),
    ("storage-type-s3", toml(storage=STORAGE + 'storage_type = "s3"\n'), "storage.storage_type",
     'expected one of "fs", got "s3"'),
    ("log-level-loud", toml(extra='[log]\nlevel = "loud"\n'), "log.level",
     'expected one of "error", "warn", "info", "debug", "trace", got "loud"'),
    ("base-path-not-a-string", toml(storage="[storage]\nbase_path = 1\n"), "storage.base_path",
     "expected a non-empty string, got 1"),
]


@pytest.mark.parametrize("text, key, fragment", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_config(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    message = str(e.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"config: {key}: "), message
    assert fragment.replace("{tmp}", str(tmp_path)) in message, message
    assert e.value.key == key


def test_enough_distinct_broken_keys() -> None:
    assert len({c[2] for c in BROKEN}) >= 20


def test_scalar_where_a_table_is_expected() -> None:
    with pytest.raises(ConfigError, match=r'^config: server: expected a table, got 5$'):
        parse_config({"server": 5})
    expected = r'^config: server\.listeners\[0\]: expected a table, got "a:1"$'
    with pytest.raises(ConfigError, match=expected):
        parse_config({"server": {"listeners": ["a:1"]}})


def test_long_values_are_truncated() -> None:
    data = {"server": {"listeners": [{"addr": "x" * 500}]}, "storage": {"base_path": "s"}}
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert "…" in str(e.value) and len(str(e.value)) < 150


def test_newlines_in_values_stay_on_one_line() -> None:
    data = {"server": {"listeners": [{"addr": "a\nb:25"}]}, "storage": {"base_path": "s"}}
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert str(e.value) == (r'config: server.listeners[0].addr: '
                            r'expected HOST:PORT (IPv6 as "[::1]:25"), got "a\nb:25"')


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"config: {path}: cannot read: No such file or directory"


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nworkers = 1\nhostname = "unterminated\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    expected = rf"config: {re.escape(str(path))}: invalid TOML: .+ \(line 3, column \d+\)"
    assert re.fullmatch(expected, str(e.value))


# --- conf/example.toml and describe() -------------------------------------------------


def test_example_loads() -> None:
    c = load_config(str(EXAMPLE), check_files=False)
    assert len(c.server.listeners) == 2 and c.server.listeners[1].tls is not None
    assert len(c.server.auth) == 2 and c.server.dkim is not None and c.filters
    assert c.server.metrics and c.server.health and c.server.routes and c.server.smtp.nameservers
    assert c.server.rate_limits.domain_limits and c.storage.cleanup.bounced_retention


def _present(data: object, parts: list[str]) -> bool:
    """Is the key path (with [] for arrays of tables) set in the parsed TOML?"""
    if not parts:
        return True
    name, rest = parts[0], parts[1:]
    if name.endswith("[]"):
        items = data.get(name[:-2], []) if isinstance(data, dict) else []
        return any(_present(item, rest) for item in items)
    return isinstance(data, dict) and name in data and _present(data[name], rest)


def test_example_sets_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    missing = [k.path for k in KEYS if not _present(data, k.path.split("."))]
    assert not missing


def test_example_comments_every_key() -> None:
    """Each key has a comment block right above one of its occurrences, naming its default."""
    comments: dict[str, str] = {}
    table, comment = "", ""
    for line in EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            comment += line + "\n"
            continue
        if header := re.fullmatch(r"\[\[?([^\]]+)\]\]?", line):
            table = name = header[1]
        elif assignment := re.match(r"([A-Za-z0-9_]+)\s*=", line):
            name = f"{table}.{assignment[1]}"
        else:
            name = ""
        if name and comment:
            comments.setdefault(name, comment)
        comment = ""
    for key in KEYS:
        doc = comments.get(key.path.replace("[]", ""), "")
        assert "Default" in doc or "Required" in doc, key.path


def test_describe_shows_every_key_and_no_secret() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    data["server"]["rate_limits"]["redis_url"] = "redis://:s3cr3t-redis@127.0.0.1:6379/0"
    c = parse_config(data, check_files=False, source="example")
    text = describe(c)
    assert "change-me" not in text and "scrypt$" not in text and "s3cr3t-redis" not in text
    assert 'server.auth[0].password = "***"' in text
    assert 'server.rate_limits.redis_url = "redis://***@127.0.0.1:6379/0"' in text
    shown = {re.sub(r"\[\d+\]", "[]", line.split(" = ")[0]) for line in text.splitlines()}
    assert not [k.path for k in KEYS if k.path not in shown]
    routes = '{"example.test" = "127.0.0.1:2526", "*" = "smarthost.example.com:587"}'
    assert f"server.routes = {routes}" in text


def test_describe_minimal_shows_defaults() -> None:
    c = parse_config({"server": {"listeners": [{"addr": "[::1]:2525"}], "hostname": "h"},
                      "storage": {"base_path": "/spool"}})
    text = describe(c)
    for line in ('server.retry_initial_delay = "1m"', "server.disk_reserve = 1073741824",
                 'server.relay_networks = ["127.0.0.0/8", "::1/128"]', "server.dkim = (off)",
                 'server.listeners[0].addr = "[::1]:2525"', "server.auth = []",
                 "storage.cleanup.bounced_retention = (none)", 'storage.base_path = "/spool"'):
        assert line in text.splitlines()
