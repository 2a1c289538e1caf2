"""Hedwig: a forward-only SMTP relay on gevent.

This module holds the version only and imports nothing, so that importing the
package never imports socket, ssl or threading before gevent has patched them
(see hedwig/__main__.py).
"""

__version__ = "0.1.0"
