"""Configuration: TOML -> typed, frozen, validated settings.

Owns the table of every configuration key (`KEYS`: path, parser, default,
one-line doc).  That one table drives parsing, defaults, unknown-key detection
("typos must not pass silently"), error messages, `describe()` and the test that
conf/example.toml documents every key.  Cross-key rules (derived defaults,
duplicates, "required when") live in the small builders after the walker.

Errors are `ConfigError(key, message)`, printed by the CLI as one line:
    config: server.listeners[1].addr: expected HOST:PORT (IPv6 as "[::1]:25"), got "nonsense"

Must not: import gevent or any other hedwig module (except the pure
hedwig.smtp.auth, which owns the password hash format), touch the network, or keep
module-level settings -- the Config is passed down explicitly.  Pure apart from
reading the file and checking that configured key/cert files are readable.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .smtp.auth import is_valid_hash

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Parser = Callable[[Any, str], Any]


class ConfigError(Exception):
    """A user error in the configuration; str() is the one line the CLI prints.

    `key` is the dotted key path (`server.listeners[1].addr`), or the file path
    for errors not tied to a key (unreadable file, TOML syntax).
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message.replace("\r", " ").replace("\n", " ")

    def __str__(self) -> str:
        return f"config: {self.key}: {self.message}"


# --- the settings -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_path: str
    key_path: str
    mode: str  # "implicit" | "starttls"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    addr: str  # normalised "HOST:PORT" / "[v6]:PORT"
    host: str
    port: int
    tls: TlsConfig | None
    allow_cleartext_auth: bool


@dataclass(frozen=True, slots=True)
class AuthUser:
    username: str
    password: str = field(repr=False)

    @property
    def is_hashed(self) -> bool:
        return self.password.startswith("scrypt$")


@dataclass(frozen=True, slots=True)
class DkimConfig:
    domain: str
    selector: str
    private_key: str
    key_type: str  # "rsa" | "ed25519"


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool
    default_limit: int | None  # messages per minute; None or 0 = unlimited
    domain_limits: Mapping[str, int]  # lower-cased domain -> messages per minute
    backend: str  # "local" | "redis"
    redis_url: str | None
    key_prefix: str


@dataclass(frozen=True, slots=True)
class HttpBind:
    host: str
    port: int

    @property
    def bind(self) -> str:
        return _join_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class SmtpOutConfig:
    port: int
    nameservers: tuple[tuple[str, int], ...]  # () = system resolver
    connect_timeout: float
    command_timeout: float
    tls: str  # "opportunistic" | "required" | "none"


@dataclass(frozen=True, slots=True)
class CleanupConfig:
    bounced_retention: float | None
    deferred_retention: float | None
    interval: float


@dataclass(frozen=True, slots=True)
class StorageConfig:
    storage_type: str  # "fs"
    base_path: str  # absolute
    fsync: bool
    cleanup: CleanupConfig


@dataclass(frozen=True, slots=True)
class FilterConfig:
    type: str  # "from_domain_filter" | "to_domain_filter"
    domains: tuple[str, ...]  # lower-cased; TOML key `domain`
    action: str  # "allow" | "deny"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str  # error | warn | info | debug | trace
    format: str  # text | json


@dataclass(frozen=True, slots=True)
class ServerConfig:
    workers: int
    worker_timeout: float
    pool_size: int
    delivery_concurrency: int
    max_retries: int
    retry_initial_delay: float
    retry_max_delay: float
    disable_outbound: bool
    bounce_notifications: bool
    outbound_local: bool
    hostname: str
    helo_hostname: str
    max_message_size: int
    max_recipients: int
    max_connections: int
    cmd_timeout: float
    data_timeout: float
    relay_networks: tuple[IPNetwork, ...]
    disk_reserve: int
    listeners: tuple[ListenerConfig, ...]
    auth: tuple[AuthUser, ...]
    dkim: DkimConfig | None
    rate_limits: RateLimitConfig
    metrics: HttpBind | None
    health: HttpBind | None
    smtp: SmtpOutConfig
    routes: Mapping[str, tuple[str, int]]  # lower-cased domain or "*" -> (host, port)


@dataclass(frozen=True, slots=True)
class Config:
    log: LogConfig
    server: ServerConfig
    storage: StorageConfig
    filters: tuple[FilterConfig, ...]
    source: str  # file path, or "<config>"


# --- showing values in messages ------------------------------------------------


def _show(value: object) -> str:
    """A TOML value the way the user wrote it (strings quoted), one line, <= 60 chars."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{_quote(k)} = {_show(v)}" for k, v in value.items()) + "}"
    elif hasattr(value, "isoformat"):
        text = value.isoformat()  # TOML dates and times
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _quote(name: str) -> str:
    """A key as it appears in a dotted path: bare if it can be, else quoted."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


def _join(where: str, name: str) -> str:
    return f"{where}.{_quote(name)}" if where else _quote(name)


def _expect(what: str, value: object, key: str) -> ConfigError:
    return ConfigError(key, f"expected {what}, got {_show(value)}")


def _join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- value parsers: (TOML value, key path) -> typed value, or ConfigError -------------

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float, key: str) -> float:
    """Seconds from "500ms", "30s", "5m", "2h", "7d", or a bare number of seconds."""
    seconds = -1.0
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    elif isinstance(text, str) and (m := _DURATION_RE.fullmatch(text)):
        seconds = float(m[1]) * _DURATION_UNITS[m[2] or "s"]
    if not math.isfinite(seconds) or seconds < 0:
        raise _expect('a duration like "30s", "5m" or "7d"', text, key)
    return seconds


_SIZE_RE = re.compile(r"([0-9]+) ?([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _u in enumerate("kmgt", start=1):  # bare K/M/G/T and KiB... are binary, KB... decimal
    _SIZE_UNITS.update({_u: 1024**_i, _u + "ib": 1024**_i, _u + "b": 1000**_i})


def parse_size(value: str | int, key: str) -> int:
    """Bytes from an int or "1024", "100KiB", "10MB", "512MiB", "1G", "1GiB", "2TB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
        unit = _SIZE_UNITS.get(m[2].lower())
        if unit is not None:
            return int(m[1]) * unit
    raise _expect('a size like 1048576, "512MiB" or "1GiB"', value, key)


_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")  # a host name or IPv4 address


def parse_hostport(text: str, key: str) -> tuple[str, int]:
    """("host", port) from "HOST:PORT" or "[IPv6]:PORT"; port 0..65535 (0 = ephemeral)."""
    what = 'HOST:PORT (IPv6 as "[::1]:25")'
    if not isinstance(text, str):
        raise _expect(what, text, key)
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _expect(what, text, key) from None
    elif not _HOST_RE.fullmatch(host):  # also rejects an IPv6 address without brackets
        raise _expect(what, text, key)
    if not re.fullmatch(r"[0-9]{1,5}", port):
        raise _expect(what, text, key)
    if int(port) > 65535:
        raise _expect("a port from 0 to 65535", text, key)
    return host, int(port)


def _int(lo: int, hi: int | None = None) -> Parser:
    what = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(value: Any, key: str) -> int:
        # bool is a subclass of int: `workers = true` must not mean 1
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expect(what, value, key)
        if value < lo or (hi is not None and value > hi):
            raise _expect(what, value, key)
        return value

    return parse


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _expect("true or false", value, key)
    return value


def _choice(*choices: str, aliases: Mapping[str, str] = MappingProxyType({})) -> Parser:
    what = "one of " + ", ".join(f'"{c}"' for c in choices)

    def parse(value: Any, key: str) -> str:
        name = aliases.get(value.lower(), value.lower()) if isinstance(value, str) else None
        if name not in choices:
            raise _expect(what, value, key)
        return name

    return parse


def _string_that(ok: Callable[[str], Any], what: str) -> Parser:
    def parse(value: Any, key: str) -> str:
        if not isinstance(value, str) or not ok(value):
            raise _expect(what, value, key)
        return value

    return parse


_string = _string_that(lambda s: True, "a string")
_text = _string_that(lambda s: s and "\0" not in s, "a non-empty string")
_redis_url = _string_that(lambda s: s.startswith(("redis://", "rediss://", "unix://")),
                          "a URL starting with redis://, rediss:// or unix://")


def _word(what: str) -> Parser:
    """A non-empty string without spaces or control characters (host, domain, selector)."""
    return _string_that(lambda s: re.fullmatch(r"[^\s\x00-\x1f\x7f]+", s), what)


_hostname = _word("a host name without spaces")
_domain = _word("a domain name without spaces")


def _where(parse: Parser, ok: Callable[[Any], bool], what: str) -> Parser:
    """`parse`, then a range check on its result (`what` is the message on failure)."""

    def checked(value: Any, key: str) -> Any:
        result = parse(value, key)
        if not ok(result):
            raise _expect(what, value, key)
        return result

    return checked


_positive = _where(parse_duration, lambda s: s > 0, 'a duration above zero like "30s" or "5m"')
_route = _where(parse_hostport, lambda hp: hp[1] > 0, "HOST:PORT with a port from 1 to 65535")


def _list(value: Any, key: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _expect(what, value, key)
    return value


def _networks(value: Any, key: str) -> tuple[IPNetwork, ...]:
    """CIDRs; a bare address is a /32 or /128.  Host bits set is an error, not masked."""
    out = []
    for i, item in enumerate(_list(value, key, 'an array of networks like ["10.0.0.0/8"]')):
        try:
            if not isinstance(item, str):
                raise ValueError("not a string")
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            why = " (host bits set)" if "host bits" in str(e) else ""
            what = 'a network like "10.0.0.0/8" or an IP address'
            raise ConfigError(f"{key}[{i}]", f"expected {what}, got {_show(item)}{why}") from None
    return tuple(out)


def _nameserver(item: Any, key: str) -> tuple[str, int]:
    what = 'an IP address or IP:PORT like "127.0.0.1:5353"'
    if not isinstance(item, str):  # ip_address(5) would be 0.0.0.5
        raise _expect(what, item, key)
    try:
        return str(ipaddress.ip_address(item)), 53
    except ValueError:
        pass
    try:
        host, port = parse_hostport(item, key)
        ipaddress.ip_address(host)
    except (ConfigError, ValueError):
        raise _expect(what, item, key) from None
    if port == 0:
        raise _expect(what, item, key)
    return host, port


def _nameservers(value: Any, key: str) -> tuple[tuple[str, int], ...]:
    items = _list(value, key, 'an array of DNS servers like ["127.0.0.1:5353"]')
    return tuple(_nameserver(item, f"{key}[{i}]") for i, item in enumerate(items))


def _domains(value: Any, key: str) -> tuple[str, ...]:
    what = 'a non-empty array of domains like ["example.com"]'
    items = _list(value, key, what)
    if not items:
        raise _expect(what, value, key)
    return tuple(_domain(item, f"{key}[{i}]").lower() for i, item in enumerate(items))


def _domain_map(parse_value: Parser, *, wildcard: bool) -> Parser:
    """A table keyed by domain name (case-insensitive: keys are lower-cased)."""

    def parse(value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise _expect('a table like { "example.com" = ... }', value, key)
        out: dict[str, Any] = {}
        seen: dict[str, str] = {}
        for name, item in value.items():
            path = f"{key}.{_quote(name)}"
            domain = name.lower()
            if not (wildcard and domain == "*"):
                _domain(name, path)
            if domain in seen:
                why = f"duplicate of {_quote(seen[domain])} (domain names are case-insensitive)"
                raise ConfigError(path, why)
            seen[domain] = name
            out[domain] = parse_value(item, path)
        return MappingProxyType(out)

    return parse


def _check_readable(path: str, key: str) -> None:
    if not os.path.exists(path):
        why = "no such file"
    elif not os.path.isfile(path):
        why = "not a regular file"
    elif not os.access(path, os.R_OK):
        why = "permission denied"
    else:
        return
    raise ConfigError(key, f"cannot read {_show(path)}: {why}")


# --- the table of every key ----------------------------------------------------


REQUIRED: Any = object()  # a Key's default: the key must be given (when its table is)


def _redact_url(value: object) -> str:
    return "(none)" if value is None else json.dumps(re.sub(r"//[^@/]*@", "//***@", str(value)))


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key.  `path` is dotted; "[]" marks an array of tables."""

    path: str
    parse: Parser
    default: Any  # a TOML value run through `parse`; None = unset or derived; REQUIRED
    doc: str
    file: bool = False  # names a file that must be readable (when check_files)
    attr: str = ""  # field name on the dataclass when it differs from the TOML key
    show: Callable[[Any], str] | None = None  # describe() override (secrets)


_LEVELS = _choice("error", "warn", "info", "debug", "trace", aliases={"warning": "warn"})
_MESSAGE_SIZE = _where(parse_size, lambda n: n >= 1024, "a size of at least 1024 bytes")
_SECRET = lambda _: '"***"'  # noqa: E731
L, T, A = "server.listeners[]", "server.listeners[].tls", "server.auth[]"
R, C = "server.rate_limits", "server.smtp"

KEYS: tuple[Key, ...] = (
    # path, parser, default, doc
    Key("log.level", _LEVELS, "info", "error, warn, info, debug or trace (HEDWIG_LOG_LEVEL wins)"),
    Key("log.format", _choice("text", "json"), "text", "text, or json (one object per line)"),
    Key("server.workers", _int(1, 256), 1, "worker processes, sharing the listening sockets"),
    Key("server.worker_timeout", _positive, "30s", "a worker silent this long is killed and replaced"),
    Key("server.pool_size", _int(1), 100, "per worker: max concurrent outbound connections"),
    Key("server.delivery_concurrency", _int(1), None, "per worker: delivery greenlets (pool_size)"),
    Key("server.max_retries", _int(0), 5, "attempts for a temporary failure before bouncing"),
    Key("server.retry_initial_delay", _positive, "60s", "backoff: initial x 2^attempts, +-20%"),
    Key("server.retry_max_delay", _positive, "24h", "backoff cap, >= retry_initial_delay"),
    Key("server.disable_outbound", _bool, False, "accept and queue, never deliver (dropped)"),
    Key("server.bounce_notifications", _bool, False, "DSN to authenticated senders on bounce"),
    Key("server.outbound_local", _bool, False, "deliver without TLS (local test sinks)"),
    Key("server.hostname", _hostname, None, "220 greeting and EHLO reply name (OS hostname)"),
    Key("server.helo_hostname", _hostname, None, "name sent in outbound EHLO (hostname)"),
    Key("server.max_message_size", _MESSAGE_SIZE, 26214400, "bytes or a size; advertised as SIZE"),
    Key("server.max_recipients", _int(1), 1000, "recipients per message"),
    Key("server.max_connections", _int(1), 10000, "per worker; beyond it 421 4.7.0"),
    Key("server.cmd_timeout", _positive, "5m", "idle time between commands"),
    Key("server.data_timeout", _positive, "10m", "deadline for the whole DATA phase"),
    Key("server.relay_networks", _networks, None,
        "CIDRs that may relay without AUTH (loopback if no [[server.auth]], else none)"),
    Key("server.disk_reserve", parse_size, "1GiB", "free spool space below which mail gets 452"),
    Key(f"{L}.addr", parse_hostport, REQUIRED, "HOST:PORT ([::1]:PORT); at least one listener"),
    Key(f"{L}.allow_cleartext_auth", _bool, False, "allow AUTH without TLS on this listener"),
    Key(f"{T}.cert_path", _text, REQUIRED, "PEM certificate chain; makes it TLS", file=True),
    Key(f"{T}.key_path", _text, REQUIRED, "PEM private key", file=True),
    Key(f"{T}.mode", _choice("implicit", "starttls"), "implicit", "implicit or starttls"),
    Key(f"{A}.username", _text, REQUIRED, "SMTP AUTH user name"),
    Key(f"{A}.password", _text, REQUIRED, "plain, or scrypt$... from hash-password", show=_SECRET),
    Key("server.dkim.domain", _domain, REQUIRED, "signing domain (d=)"),
    Key("server.dkim.selector", _word("a selector without spaces"), REQUIRED, "selector (s=)"),
    Key("server.dkim.private_key", _text, REQUIRED, "PEM private key file", file=True),
    Key("server.dkim.key_type", _choice("rsa", "ed25519"), "rsa", "rsa or ed25519"),
    Key(f"{R}.enabled", _bool, False, "per-destination-domain rate limits"),
    Key(f"{R}.default_limit", _int(0), None, "messages/minute per domain; 0 or unset = no limit"),
    Key(f"{R}.domain_limits", _domain_map(_int(0), wildcard=False), {}, '"gmail.com" = 30'),
    Key(f"{R}.backend", _choice("local", "redis"), "local", "local, or redis (cluster-wide)"),
    Key(f"{R}.redis_url", _redis_url, None, "redis://, rediss:// or unix:// URL", show=_redact_url),
    Key(f"{R}.key_prefix", _string, "hedwig:", "prefix of the Redis keys"),
    Key("server.metrics.bind", parse_hostport, REQUIRED, "HOST:PORT serving GET /metrics"),
    Key("server.health.bind", parse_hostport, REQUIRED, "HOST:PORT serving /healthz, /readyz"),
    Key(f"{C}.port", _int(1, 65535), 25, "remote port for MX delivery"),
    Key(f"{C}.nameservers", _nameservers, [], '"IP" or "IP:PORT" DNS servers ([] = system)'),
    Key(f"{C}.connect_timeout", _positive, "30s", "outbound connect timeout"),
    Key(f"{C}.command_timeout", _positive, "5m", "outbound per-command timeout"),
    Key(f"{C}.tls", _choice("opportunistic", "required", "none"), "opportunistic", "STARTTLS use"),
    Key("server.routes", _domain_map(_route, wildcard=True), {},
        '"domain" = "HOST:PORT" bypasses MX lookup; "*" routes everything'),
    Key("storage.storage_type", _choice("fs", aliases={"filesystem": "fs"}), "fs", "fs"),
    Key("storage.base_path", _text, REQUIRED, "spool root directory"),
    Key("storage.fsync", _bool, True, "false trades power-loss durability for speed"),
    Key("storage.cleanup.bounced_retention", parse_duration, None, "delete bounced mail after"),
    Key("storage.cleanup.deferred_retention", parse_duration, None, "give up on deferred after"),
    Key("storage.cleanup.interval", _positive, "1h", "how often cleanup runs"),
    Key("filters[].type", _choice("from_domain_filter", "to_domain_filter"), REQUIRED,
        "from_domain_filter (MAIL FROM) or to_domain_filter (RCPT TO)"),
    Key("filters[].domain", _domains, REQUIRED, "domains the filter matches", attr="domains"),
    Key("filters[].action", _choice("allow", "deny"), REQUIRED, "allow or deny"),
)

# Tables that are off unless present (their keys are required only then).
OPTIONAL_TABLES = frozenset({f"{L}.tls", "server.dkim", "server.metrics", "server.health"})

del L, T, A, R, C


def _tables(keys: tuple[Key, ...]) -> dict[str, dict[str, Key | str]]:
    """table pattern -> {name: Key, or the pattern of a sub-table}, in declaration order."""
    tables: dict[str, dict[str, Key | str]] = {"": {}}
    for key in keys:
        parts = key.path.split(".")
        for depth in range(1, len(parts)):
            parent, table = ".".join(parts[: depth - 1]), ".".join(parts[:depth])
            tables.setdefault(table, {})
            tables[parent].setdefault(parts[depth - 1].removesuffix("[]"), table)
        tables[".".join(parts[:-1])][parts[-1]] = key
    return tables


_TABLES = _tables(KEYS)


# --- walking the TOML against the table -------------------------------------------


def _read_table(raw: Any, table: str, where: str, check_files: bool) -> dict[str, Any]:
    """Parse one table: unknown keys, then each declared key / sub-table in order."""
    if not isinstance(raw, dict):
        raise _expect("a table", raw, where)
    node = _TABLES[table]
    for name in raw:
        if name not in node:
            close = difflib.get_close_matches(name, list(node), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(_join(where, name), "unknown key" + hint)
    out: dict[str, Any] = {}
    for name, item in node.items():
        path = _join(where, name)
        if isinstance(item, Key):
            if name in raw:
                out[name] = item.parse(raw[name], path)
                if item.file and check_files:
                    _check_readable(out[name], path)
            elif item.default is REQUIRED:
                raise ConfigError(path, "missing (required)")
            else:
                out[name] = None if item.default is None else item.parse(item.default, path)
        elif item.endswith("[]"):
            items = raw.get(name, [])
            if not isinstance(items, list):
                raise _expect(f"[[{item[:-2]}]] tables", items, path)
            out[name] = tuple(
                _read_table(t, item, f"{path}[{i}]", check_files) for i, t in enumerate(items)
            )
        elif name in raw or item not in OPTIONAL_TABLES:
            out[name] = _read_table(raw.get(name, {}), item, path, check_files)
        else:
            out[name] = None
    return out


def load_config(path: str, *, check_files: bool = True) -> Config:
    """Read and validate the TOML file at `path`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"invalid TOML: not UTF-8 (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "invalid TOML: " + str(e).replace("(at line", "(line")) from None
    return parse_config(doc, check_files=check_files, source=path)


def parse_config(
    data: dict[str, Any], *, check_files: bool = True, source: str = "<config>"
) -> Config:
    """Validate an already-parsed TOML document."""
    v = _read_table(data, "", "", check_files)
    storage = v["storage"]
    return Config(
        log=LogConfig(**v["log"]),
        server=_server(v["server"]),
        storage=StorageConfig(**{**storage, "base_path": os.path.abspath(storage["base_path"]),
                                 "cleanup": CleanupConfig(**storage["cleanup"])}),
        filters=tuple(FilterConfig(f["type"], f["domain"], f["action"]) for f in v["filters"]),
        source=source,
    )


# --- cross-key rules -------------------------------------------------------------

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _server(s: dict[str, Any]) -> ServerConfig:
    listeners = tuple(_listener(raw) for raw in s["listeners"])
    if not listeners:
        what = "at least one [[server.listeners]] with addr is required"
        raise ConfigError("server.listeners", what)
    used: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(listeners):
        where = (listener.host.lower(), listener.port)
        if listener.port and where in used:  # port 0: each gets its own ephemeral port
            why = f'"{listener.addr}" is already used by server.listeners[{used[where]}]'
            raise ConfigError(f"server.listeners[{i}].addr", why)
        used.setdefault(where, i)

    auth = tuple(AuthUser(**raw) for raw in s["auth"])
    names: dict[str, int] = {}
    for i, user in enumerate(auth):
        if user.is_hashed and not is_valid_hash(user.password):
            # A malformed hash would silently lock the user out; never echo the value.
            why = "malformed scrypt hash (use the line `hedwig hash-password` prints)"
            raise ConfigError(f"server.auth[{i}].password", why)
        if user.username in names:
            first = names[user.username]
            why = f"duplicate user {_show(user.username)} (also server.auth[{first}])"
            raise ConfigError(f"server.auth[{i}].username", why)
        names[user.username] = i

    initial, maximum = s["retry_initial_delay"], s["retry_max_delay"]
    if maximum < initial:
        what = f"at least server.retry_initial_delay ({_fmt_duration(initial)})"
        got = _fmt_duration(maximum)
        raise ConfigError("server.retry_max_delay", f"expected {what}, got {got}")

    limits = s["rate_limits"]
    if limits["enabled"] and limits["backend"] == "redis" and limits["redis_url"] is None:
        why = 'missing (required when backend = "redis")'
        raise ConfigError("server.rate_limits.redis_url", why)

    hostname = s["hostname"] or _hostname(socket.gethostname() or "localhost", "server.hostname")
    if s["relay_networks"] is not None:
        relay = s["relay_networks"]
    else:
        relay = () if auth else _LOOPBACK
    return ServerConfig(**{
        **s,
        "delivery_concurrency": s["delivery_concurrency"] or s["pool_size"],
        "hostname": hostname,
        "helo_hostname": s["helo_hostname"] or hostname,
        "relay_networks": relay,
        "listeners": listeners,
        "auth": auth,
        "dkim": DkimConfig(**s["dkim"]) if s["dkim"] else None,
        "rate_limits": RateLimitConfig(**limits),
        "metrics": HttpBind(*s["metrics"]["bind"]) if s["metrics"] else None,
        "health": HttpBind(*s["health"]["bind"]) if s["health"] else None,
        "smtp": SmtpOutConfig(**s["smtp"]),
    })


def _listener(raw: dict[str, Any]) -> ListenerConfig:
    host, port = raw["addr"]
    tls = TlsConfig(**raw["tls"]) if raw["tls"] else None
    return ListenerConfig(_join_hostport(host, port), host, port, tls, raw["allow_cleartext_auth"])


# --- describe() for `hedwig check-config` -----------------------------------------


def describe(config: Config) -> str:
    """Every setting with its effective value (defaults included); secrets as "***"."""
    lines = [f"# effective configuration from {config.source}"]
    _describe_table(config, "", "", lines)
    return "\n".join(lines)


def _describe_table(obj: Any, table: str, where: str, lines: list[str]) -> None:
    for name, item in _TABLES[table].items():
        path = _join(where, name)
        if isinstance(item, Key):
            value = getattr(obj, item.attr or name)
            lines.append(f"{path} = {item.show(value) if item.show else _fmt(value)}")
            continue
        sub = getattr(obj, name)
        if item.endswith("[]"):
            if not sub:
                lines.append(f"{path} = []")
            for i, element in enumerate(sub):
                _describe_table(element, item, f"{path}[{i}]", lines)
        elif sub is None:
            lines.append(f"{path} = (off)")
        else:
            _describe_table(sub, item, path, lines)


def _fmt(value: object) -> str:
    """An effective value, TOML-like.  Every float in the Config is a duration."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f'"{_fmt_duration(value)}"'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return json.dumps(_join_hostport(*value))  # (host, port)
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_quote(k)} = {_fmt(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _fmt_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds * 1000:g}ms" if seconds else "0s"
