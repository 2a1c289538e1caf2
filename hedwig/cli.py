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
  hedwig -h | --help
  hedwig --version

Commands:
  serve          run the relay in the foreground (the default)
  check-config   validate the configuration and print what was understood

Options:
  --config PATH  configuration file; defaults to $HEDWIG_CONFIG, then conf/hedwig.toml
  -h --help      show this text
  --version      print the version
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

    from .config import ConfigError, describe, load_config

    try:
        config = load_config(_config_path(args))
    except ConfigError as exc:
        return _fail(str(exc))
    if args["check-config"]:
        print(describe(config))
        return 0
    return _serve(config)


def _serve(config) -> int:  # type: ignore[no-untyped-def]
    from . import log
    from .worker import StartupError, Worker

    log.setup(config.log.level, config.log.format)
    worker = Worker(config)
    try:
        worker.start()
    except StartupError as exc:
        return _fail(str(exc), 1)
    return worker.serve_forever()
