"""Pure SMTP: parsing, replies and the server protocol state machine.

Nothing in this package touches sockets, gevent, clocks or files, and nothing
here imports from the rest of hedwig, so it can be unit-tested and fuzzed with
byte strings alone.
"""
