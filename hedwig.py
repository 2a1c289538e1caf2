"""Run Hedwig from a checkout: `python hedwig.py --config conf/hedwig.toml`."""

import sys

from hedwig.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
