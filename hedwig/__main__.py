"""Entry point: patch gevent first, then hand over to the CLI.

Both doors land here: `python hedwig.py` (a shim importing this module) and
the installed `hedwig` console script (`hedwig.__main__:main`). The patch is
the first statement so that nothing imports socket, ssl or threading before
it; hedwig/__init__.py imports nothing, and no library module patches.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from hedwig.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
