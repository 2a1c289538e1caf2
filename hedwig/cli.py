"""Command line: docopt usage, dispatch, exit codes (0 ok, 2 user error, 1 failure).

A user error (bad flag, bad config value, missing file) is one line on stderr
and exit 2 — never a traceback.
"""

from __future__ import annotations

import os
import re
import sys

from docopt import DocoptExit, docopt

from . import __version__

USAGE = """Hedwig, a forward-only SMTP relay.

Usage:
  hedwig [serve] [--config PATH]
  hedwig check-config [--config PATH]
  hedwig dkim-generate [--config PATH] [--domain D] [--selector S] [--private-key PATH]
                       [--key-type TYPE] [--bits N]
  hedwig queue list [--config PATH] [--state STATE] [--json]
  hedwig queue show ID [--config PATH]
  hedwig queue stats [--config PATH] [--json]
  hedwig queue retry (ID | --all) [--config PATH]
  hedwig queue delete ID [--config PATH]
  hedwig hash-password
  hedwig -h | --help
  hedwig --version

Commands:
  serve          run the relay in the foreground (the default)
  check-config   validate the configuration (DKIM key and certificates included)
                 and print what was understood
  dkim-generate  make a DKIM key: write the private key (PEM, PKCS#8, mode 0600,
                 never over an existing file) and print the DNS TXT record;
                 the flags override [server.dkim] of the config, if there is one
  hash-password  read a password from standard input (one line; asked twice on a
                 terminal) and print the scrypt$... hash for [[server.auth]] password
  queue          look into the spool (list, show, stats: read-only, safe while the
                 server runs) and steer it (retry: due now; delete: never delivered);
                 ID is the one in the server's "250 ... queued as ID" reply

Options:
  --config PATH        configuration file; defaults to $HEDWIG_CONFIG, then conf/hedwig.toml
  --domain D           dkim-generate: signing domain (d=)
  --selector S         dkim-generate: selector (s=)
  --private-key PATH   dkim-generate: where to write the private key
  --key-type TYPE      dkim-generate: rsa (the default) or ed25519
  --bits N             dkim-generate: RSA key size, 1024 to 8192 (default 2048)
  --state STATE        queue list: only queued, deferred, bounced or quarantined messages
  --json               queue list, stats: JSON for scripts instead of a table
  --all                queue retry: every deferred message
  -h --help            show this text
  --version            print the version
"""


def _config_path(args: dict) -> str:
    return args["--config"] or os.environ.get("HEDWIG_CONFIG") or "conf/hedwig.toml"


def _usage_problem(exc: DocoptExit) -> str:
    """Name what docopt refused, in one line."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if "unmatched" in first:  # docopt-ng: "... arguments [Option(None, '--bogus', 0, True)]"
        names = re.findall(r"\(None, '([^']*)'", first)
        if names:
            return "unexpected argument " + ", ".join(f'"{n}"' for n in names)
    if first and not first.lower().startswith("usage:"):
        return first.rstrip(".")
    return "invalid arguments"


def _fail(message: str, code: int = 2) -> int:
    print(f"hedwig: {message}" if not message.startswith("config: ") else message, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = docopt(USAGE, argv=sys.argv[1:] if argv is None else argv, default_help=False)
    except DocoptExit as exc:
        return _fail(f"{_usage_problem(exc)}; see `hedwig --help`")
    if args["--help"]:
        print(USAGE, end="")
        return 0
    if args["--version"]:
        print(f"hedwig {__version__}")
        return 0
    if args["hash-password"]:
        return _hash_password()
    if args["dkim-generate"]:
        return _dkim_generate(args)

    from .config import ConfigError, describe, load_config

    try:
        config = load_config(_config_path(args))
    except ConfigError as exc:
        return _fail(str(exc))
    if args["check-config"]:
        from .master import config_problem

        problem = config_problem(config)
        if problem:
            return _fail(problem)
        print(describe(config))
        return 0
    if args["queue"]:
        from .queuetool import main as queue_main

        return queue_main(config, args)
    return _serve(config, _config_path(args))


def _dkim_generate(args: dict) -> int:
    """SPEC §1/§6: a new DKIM key file and the TXT record to publish for it."""
    from .config import ConfigError, load_config
    from .signing import (DEFAULT_RSA_BITS, KEY_TYPES, MAX_RSA_BITS, MIN_RSA_BITS, KeyProblem,
                          check_dns_name, dns_record, generate_key, write_private_key)

    # The config is optional here; one named by --config or $HEDWIG_CONFIG must load.
    # Its key file need not exist yet (that is what this command makes).
    path = args["--config"] or os.environ.get("HEDWIG_CONFIG")
    if path is None and os.path.exists("conf/hedwig.toml"):
        path = "conf/hedwig.toml"
    dkim_config = None
    if path is not None:
        try:
            dkim_config = load_config(path, check_files=False).server.dkim
        except ConfigError as exc:
            return _fail(str(exc))

    def setting(flag: str, key: str) -> str | None:
        value = args[flag]
        if value is None and dkim_config is not None:
            value = getattr(dkim_config, key)
        return value

    domain = setting("--domain", "domain")
    selector = setting("--selector", "selector")
    key_path = setting("--private-key", "private_key")
    key_type = setting("--key-type", "key_type") or "rsa"
    for value, flag, key in ((domain, "--domain", "domain"), (selector, "--selector", "selector"),
                             (key_path, "--private-key", "private_key")):
        if not value:
            return _fail(f"dkim-generate: no {key.replace('_', ' ')}: give {flag} "
                         f"or set [server.dkim] {key} in the config")
    assert domain is not None and selector is not None and key_path is not None
    try:
        where = "--domain" if args["--domain"] else "server.dkim.domain"
        domain = check_dns_name(domain, "a domain name like example.com")
        where = "--selector" if args["--selector"] else "server.dkim.selector"
        selector = check_dns_name(selector, "a selector like hedwig or 2024-01")
    except KeyProblem as exc:
        return _fail(f"dkim-generate: {where}: {exc}")
    if key_type not in KEY_TYPES:
        return _fail(f'dkim-generate: --key-type: expected rsa or ed25519, got "{key_type}"')
    bits_text = args["--bits"]
    if bits_text is not None and key_type == "ed25519":
        return _fail("dkim-generate: --bits is for RSA keys; an ed25519 key has no size to choose")
    bits = DEFAULT_RSA_BITS if bits_text is None else int(bits_text) if bits_text.isdigit() else -1
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        return _fail(f'dkim-generate: --bits: expected {MIN_RSA_BITS} to {MAX_RSA_BITS}, got "{bits_text}"')

    key = generate_key(key_type, bits)
    try:
        write_private_key(key_path, key)
    except FileExistsError:
        return _fail(f"dkim-generate: {key_path} exists; not overwriting it "
                     "(move it away or choose another --private-key)")
    except OSError as exc:
        return _fail(f"dkim-generate: cannot write {key_path}: {exc.strerror or exc}")
    print(dns_record(selector, domain, key))
    return 0


def _read_password() -> str:
    """One line from stdin; on a terminal, asked twice without echo. Raises ValueError."""
    if sys.stdin is None:
        raise ValueError("no standard input to read the password from")
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("Password: ")
        if first and getpass.getpass("Again: ") != first:
            raise ValueError("the passwords do not match")
        return first
    raw = sys.stdin.buffer.readline()
    # Only the line end is taken off: spaces are part of the password.
    raw = raw.removesuffix(b"\n").removesuffix(b"\r")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the password is not valid UTF-8") from None


def _hash_password() -> int:
    from .smtp.auth import hash_password

    try:
        password = _read_password()
    except ValueError as exc:
        return _fail(str(exc))
    except (EOFError, KeyboardInterrupt):
        return _fail("no password given")
    if not password:
        return _fail("empty password; nothing hashed")
    print(hash_password(password))
    return 0


def _serve(config, path: str) -> int:  # type: ignore[no-untyped-def]
    from . import log
    from .master import Master

    log.setup(config.log.level, config.log.format)
    return Master(config, path).run()
