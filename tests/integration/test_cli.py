"""The command line as an operator meets it: exit codes, one-line errors, no tracebacks.

Every case runs `python hedwig.py ...` from the repository root in a fresh
process, with HEDWIG_* variables removed from the environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.proc import HOST, REPO_ROOT, HedwigProcess, free_port

TIMEOUT = 20


def run(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEDWIG_")}
    argv = [sys.executable, "-c", code] if code is not None else [sys.executable, "hedwig.py", *args]
    return subprocess.run(argv, cwd=REPO_ROOT, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


GOOD = """
[server]
hostname = "mx.test"
disk_reserve = 0
[[server.listeners]]
addr = "127.0.0.1:{port}"
[storage]
base_path = "{spool}"
"""


def test_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hedwig ") and result.stdout.strip().split()[-1][0].isdigit()
    assert result.stderr == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
    result = run(flag)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "check-config" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("argv", [["--bogus"], ["serve", "--frobnicate"], ["no-such-command"], ["--config"]],
                         ids=" ".join)
def test_bad_flag(argv):
    result = run(*argv)
    assert result.returncode == 2
    one_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize(("argv", "named"), [(["--bogus"], "--bogus"), (["--config"], "--config"),
                                             (["frobnicate"], "frobnicate")], ids=["--bogus", "--config", "frobnicate"])
def test_bad_flag_is_named(argv, named):
    result = run(*argv)
    assert result.returncode == 2
    assert named in one_line(result.stderr)


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_missing_config_file(tmp_path, command):
    path = tmp_path / "nowhere" / "hedwig.toml"
    result = run(command, "--config", str(path))
    assert result.returncode == 2
    assert str(path) in one_line(result.stderr)


def test_config_from_environment(tmp_path):
    path = tmp_path / "env.toml"
    path.write_text(GOOD.format(port=free_port(), spool=tmp_path / "spool"))
    result = run("check-config", env={"HEDWIG_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout


def test_check_config_prints_the_settings(tmp_path):
    path = tmp_path / "good.toml"
    port = free_port()
    path.write_text(GOOD.format(port=port, spool=tmp_path / "spool"))
    result = run("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        'server.hostname = "mx.test"',
        f'server.listeners[0].addr = "127.0.0.1:{port}"',
        f'storage.base_path = "{tmp_path / "spool"}"',
        "server.max_message_size = 26214400",  # defaults are shown too
        'server.cmd_timeout = "5m"',
        "storage.fsync = true",
    ):
        assert line in out.splitlines(), f"{line!r} not in:\n{out}"
    assert not (tmp_path / "spool").exists(), "check-config must not create the spool"


# (name, TOML text after the good base with its own [server]/[storage] edits, expected key)
# Each case breaks one thing; {spool} and {port} are filled in.
BROKEN = [
    ("unknown key", '[server]\nhostname = "mx.test"\nbogus = 1\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', "server.bogus"),
    ("bad addr", '[[server.listeners]]\naddr = "nonsense"\n[storage]\nbase_path = "{spool}"\n',
     "server.listeners[0].addr"),
    ("bad port", '[[server.listeners]]\naddr = "127.0.0.1:70000"\n[storage]\nbase_path = "{spool}"\n',
     "server.listeners[0].addr"),
    ("bad duration", '[server]\ncmd_timeout = "5 minutes"\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', "server.cmd_timeout"),
    ("bad size", '[server]\nmax_message_size = "lots"\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', "server.max_message_size"),
    ("bad CIDR", '[server]\nrelay_networks = ["10.0.0.0/8", "10.0.0.1/8"]\n[[server.listeners]]\n'
     'addr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n', "server.relay_networks[1]"),
    ("bad bool", '[[server.listeners]]\naddr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n'
     'fsync = "yes"\n', "storage.fsync"),
    ("tls cert missing", '[[server.listeners]]\naddr = "127.0.0.1:{port}"\n[server.listeners.tls]\n'
     'cert_path = "{spool}/none/cert.pem"\nkey_path = "{spool}/none/key.pem"\n[storage]\nbase_path = "{spool}"\n',
     "server.listeners[0].tls.cert_path"),
    ("bad smtp.tls", '[server.smtp]\ntls = "always"\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', "server.smtp.tls"),
    ("bad nameserver", '[server.smtp]\nnameservers = ["127.0.0.1:5353", "dns.example"]\n[[server.listeners]]\n'
     'addr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n', "server.smtp.nameservers[1]"),
    ("bad route", '[server.routes]\n"example.test" = "127.0.0.1"\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', 'server.routes."example.test"'),
    ("bad filter action", '[[server.listeners]]\naddr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n'
     '[[filters]]\ntype = "to_domain_filter"\ndomain = ["x.test"]\naction = "reject"\n', "filters[0].action"),
    ("negative domain limit", '[server.rate_limits]\nenabled = true\n[server.rate_limits.domain_limits]\n'
     '"gmail.com" = -1\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n',
     'server.rate_limits.domain_limits."gmail.com"'),
    ("redis without url", '[server.rate_limits]\nenabled = true\nbackend = "redis"\n[[server.listeners]]\n'
     'addr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n', "server.rate_limits.redis_url"),
    ("missing base_path", '[[server.listeners]]\naddr = "127.0.0.1:{port}"\n[storage]\nfsync = true\n',
     "storage.base_path"),
    ("bad log level", '[log]\nlevel = "loud"\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', "log.level"),
    ("workers 0", '[server]\nworkers = 0\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', "server.workers"),
    ("no listeners", '[server]\nhostname = "mx.test"\n[storage]\nbase_path = "{spool}"\n', "server.listeners"),
    ("max_connections 0", '[server]\nmax_connections = 0\n[[server.listeners]]\naddr = "127.0.0.1:{port}"\n'
     '[storage]\nbase_path = "{spool}"\n', "server.max_connections"),
    ("retry_max_delay below initial", '[server]\nretry_initial_delay = "10m"\nretry_max_delay = "1m"\n'
     '[[server.listeners]]\naddr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n',
     "server.retry_max_delay"),
    ("unknown storage type", '[[server.listeners]]\naddr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n'
     'storage_type = "s3"\n', "storage.storage_type"),
    ("typo in table", '[[server.listener]]\naddr = "127.0.0.1:{port}"\n[storage]\nbase_path = "{spool}"\n',
     "server.listener"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_config(tmp_path, case):
    _, text, key = case
    spool = tmp_path / "spool"
    path = tmp_path / "broken.toml"
    path.write_text(text.format(port=free_port(), spool=spool))
    with ThreadPoolExecutor(2) as pool:  # both commands at once: half the wall time
        results = list(pool.map(lambda cmd: run(cmd, "--config", str(path)), ["check-config", "serve"]))
    for command, result in zip(["check-config", "serve"], results):
        assert result.returncode == 2, (command, result.returncode, result.stderr)
        line = one_line(result.stderr)
        assert line.startswith(f"config: {key}: "), (command, line)
        assert result.stdout == "", (command, result.stdout)
    assert not spool.exists(), "a rejected config must not create the spool"


@pytest.mark.parametrize("what", ["directory", "not UTF-8"])
def test_unreadable_config_names_the_file(tmp_path, what):
    path = tmp_path / "conf.toml"
    if what == "directory":
        path.mkdir()
    else:
        path.write_bytes(b'[server]\nhostname = "\xff"\n')
    result = run("check-config", "--config", str(path))
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"config: {path}: ")


def test_empty_config_names_a_required_key(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    result = run("check-config", "--config", str(path))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith(("config: storage.base_path: ", "config: server.listeners")), line


def test_unusable_spool_fails_cleanly(tmp_path):
    """base_path under a regular file: serve fails with one line naming the spool, exit 1."""
    (tmp_path / "file").write_text("not a directory")
    path = tmp_path / "spool.toml"
    path.write_text(GOOD.format(port=free_port(), spool=tmp_path / "file" / "spool"))
    assert run("check-config", "--config", str(path)).returncode == 0
    result = run("serve", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "file" / "spool") in result.stderr.splitlines()[-1], result.stderr


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "syntax.toml"
    path.write_text('[server\nhostname = "mx.test"\n')
    result = run("check-config", "--config", str(path))
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"config: {path}: ")


def test_import_hedwig_does_not_import_gevent():
    result = run(code=(
        "import sys, hedwig, hedwig.config\n"
        "print('gevent' in sys.modules, any(m.startswith('gevent') for m in sys.modules))\n"
    ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_entry_module_patches_socket():
    result = run(code=(
        "import hedwig.__main__, sys; from gevent import monkey; print(monkey.is_module_patched('socket'))"
    ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_serve_is_the_default_command(tmp_path):
    """`python hedwig.py --config F` (no `serve`) runs the server; SIGTERM ends it with 0."""
    with HedwigProcess(tmp_path / "h", args=["--config", "{config}"]) as server:
        assert server.running
        server.signal(signal.SIGTERM)
        assert server.wait(10) == 0, server.log_text()


def test_port_in_use_fails_cleanly(tmp_path):
    """Not a config error (exit 1, not 2): start-up log lines may precede it, the last line names it."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(GOOD.format(port=port, spool=tmp_path / "spool"))
        result = run("serve", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert f"127.0.0.1:{port}" in last and "in use" in last, result.stderr
