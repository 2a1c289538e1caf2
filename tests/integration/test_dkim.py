"""DKIM end to end (SPEC §6, §10): `hedwig dkim-generate` as an operator runs it.

The key and the TXT record come from `python hedwig.py dkim-generate` (or
`scripts/dkim-generate`); `dkim.verify` gets the record through a `dnsfunc`
serving exactly the strings it printed, joined as a resolver joins them.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.support.proc import HOST, REPO_ROOT, to_toml

TIMEOUT = 30
DOMAIN, SELECTOR = "signer.test", "hw1"
RECORD = re.compile(r'(?P<name>\S+) IN TXT (?P<strings>"[^"]{1,255}"(?: "[^"]{1,255}")*)')


def run(*args: str, cwd: Path | str = REPO_ROOT, env: dict[str, str] | None = None, umask: int = 0o022,
        argv0: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEDWIG_")}
    argv = (argv0 or [sys.executable, str(REPO_ROOT / "hedwig.py"), "dkim-generate"]) + list(args)
    return subprocess.run(argv, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL, umask=umask)


def generate(tmp_path: Path, *args: str, name: str = "dkim.pem", **kwargs: Any) -> tuple[Path, str]:
    """(key file, printed record) of a successful dkim-generate."""
    key_path = tmp_path / name
    result = run("--domain", DOMAIN, "--selector", SELECTOR, "--private-key", str(key_path), *args, **kwargs)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return key_path, result.stdout


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, f"expected one line on stderr, got {stderr!r}"
    return lines[0]


def parse_record(stdout: str) -> tuple[str, bytes]:
    """(owner name, TXT data) of the one zone-file line printed."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, repr(stdout)
    m = RECORD.fullmatch(stdout.rstrip("\n"))
    assert m, f"not a zone-file TXT line: {stdout!r}"
    strings = re.findall(r'"([^"]*)"', m["strings"])
    assert all(len(s) == 255 for s in strings[:-1]), "long values are cut into 255-byte strings"
    return m["name"], "".join(strings).encode()


def tags(txt: bytes) -> dict[str, str]:
    return dict(t.strip().split("=", 1) for t in txt.decode().split(";") if t.strip())


def load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def dnsfunc_for(record: str) -> Any:
    name, txt = parse_record(record)
    asked: list[bytes] = []

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        asked.append(qname)
        return txt if qname.decode().lower() == name.lower() else None

    dnsfunc.asked = asked  # type: ignore[attr-defined]
    return dnsfunc


# -- dkim-generate ---------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
def test_generate_rsa_writes_a_0600_pkcs8_key_and_prints_its_record(tmp_path) -> None:
    key_path, record = generate(tmp_path)
    assert key_path.stat().st_mode & 0o777 == 0o600
    pem = key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    key = load_key(key_path)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    name, txt = parse_record(record)
    assert name == f"{SELECTOR}._domainkey.{DOMAIN}."
    assert record.startswith(f'{name} IN TXT "v=DKIM1; k=rsa; p=')
    assert len(re.findall(r'"[^"]*"', record)) == 2  # 2048 bits: 410 bytes -> two strings
    t = tags(txt)
    assert (t["v"], t["k"]) == ("DKIM1", "rsa")
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert base64.b64decode(t["p"], validate=True) == spki  # SPEC §10: DER SubjectPublicKeyInfo


@pytest.mark.timeout(TIMEOUT)
def test_generate_ed25519_prints_the_raw_public_key(tmp_path) -> None:
    key_path, record = generate(tmp_path, "--key-type", "ed25519")
    assert key_path.stat().st_mode & 0o777 == 0o600
    key = load_key(key_path)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    name, txt = parse_record(record)
    assert name == f"{SELECTOR}._domainkey.{DOMAIN}."
    assert record == f'{name} IN TXT "{txt.decode()}"\n'  # short: one string
    t = tags(txt)
    assert t["k"] == "ed25519"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64decode(t["p"], validate=True) == raw and len(raw) == 32  # RFC 8463


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277])
def test_generate_key_mode_is_0600_whatever_the_umask(tmp_path, umask) -> None:
    key_path, _ = generate(tmp_path, "--key-type", "ed25519", umask=umask)
    assert key_path.stat().st_mode & 0o777 == 0o600


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_generate_never_overwrites(tmp_path, kind) -> None:
    key_path = tmp_path / "existing.pem"
    key_path.write_bytes(b"precious\n")
    key_path.chmod(0o640)
    result = run("--domain", DOMAIN, "--selector", SELECTOR, "--private-key", str(key_path), "--key-type", kind)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert str(key_path) in line and "exists" in line
    assert result.stdout == ""
    assert key_path.read_bytes() == b"precious\n" and key_path.stat().st_mode & 0o777 == 0o640
    # a dangling symlink is not followed either
    link = tmp_path / "link.pem"
    link.symlink_to(tmp_path / "elsewhere.pem")
    result = run("--domain", DOMAIN, "--selector", SELECTOR, "--private-key", str(link), "--key-type", kind)
    assert result.returncode == 2 and "exists" in one_line(result.stderr)
    assert not (tmp_path / "elsewhere.pem").exists()


@pytest.mark.timeout(TIMEOUT)
def test_generate_bits(tmp_path) -> None:
    key_path, record = generate(tmp_path, "--bits", "1024")
    assert load_key(key_path).key_size == 1024
    assert len(re.findall(r'"[^"]*"', record)) == 1  # 1024 bits: 234 bytes fit one string
    key_path, record = generate(tmp_path, "--bits", "3072", name="big.pem")
    assert load_key(key_path).key_size == 3072
    assert len(re.findall(r'"[^"]*"', record)) == 3
    parse_record(record)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize(("args", "named"), [
    (["--bits", "512"], "--bits"),
    (["--bits", "9000"], "--bits"),
    (["--bits", "many"], "--bits"),
    (["--key-type", "ed25519", "--bits", "2048"], "--bits"),
    (["--key-type", "dsa"], "--key-type"),
    (["--domain", "not a domain"], "--domain"),
    (["--selector", "-x-"], "--selector"),
    (["--private-key", "/nonexistent-dir/k.pem"], "/nonexistent-dir/k.pem"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_generate_refuses_bad_flags_in_one_line(tmp_path, args, named) -> None:
    base = {"--domain": DOMAIN, "--selector": SELECTOR, "--private-key": str(tmp_path / "k.pem")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = run(*[x for kv in base.items() for x in kv])
    assert result.returncode == 2
    assert named in one_line(result.stderr)
    assert result.stdout == ""
    assert not (tmp_path / "k.pem").exists()


@pytest.mark.timeout(TIMEOUT)
def test_generate_takes_server_dkim_from_the_config_and_flags_override_it(tmp_path) -> None:
    cfg = tmp_path / "hedwig.toml"
    cfg.write_text(to_toml({
        "server": {"listeners": [{"addr": f"{HOST}:2525"}],
                   "dkim": {"domain": "conf.test", "selector": "fromconf",
                            "private_key": str(tmp_path / "conf.pem"), "key_type": "ed25519"}},
        "storage": {"base_path": str(tmp_path / "spool")},
    }))
    # the key file named by the config need not exist yet: that is what this makes
    result = run("--config", str(cfg))
    assert result.returncode == 0, result.stderr
    name, txt = parse_record(result.stdout)
    assert name == "fromconf._domainkey.conf.test." and tags(txt)["k"] == "ed25519"
    assert isinstance(load_key(tmp_path / "conf.pem"), ed25519.Ed25519PrivateKey)
    # $HEDWIG_CONFIG works as --config does; flags win over the config
    result = run("--selector", "flag", "--private-key", str(tmp_path / "flag.pem"), "--key-type", "rsa",
                 env={"HEDWIG_CONFIG": str(cfg)})
    assert result.returncode == 0, result.stderr
    name, txt = parse_record(result.stdout)
    assert name == "flag._domainkey.conf.test." and tags(txt)["k"] == "rsa"
    assert isinstance(load_key(tmp_path / "flag.pem"), rsa.RSAPrivateKey)
    # the config's own path is still taken: refused, it exists now
    result = run("--config", str(cfg))
    assert result.returncode == 2 and str(tmp_path / "conf.pem") in one_line(result.stderr)


@pytest.mark.timeout(TIMEOUT)
def test_generate_without_a_config_needs_the_flags(tmp_path) -> None:
    # run from a directory without conf/hedwig.toml: no config at all
    result = run("--selector", "s", "--private-key", str(tmp_path / "k.pem"), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "--domain" in line and "[server.dkim] domain" in line
    result = run("--domain", "d.test", "--selector", "s", cwd=tmp_path)
    assert result.returncode == 2 and "--private-key" in one_line(result.stderr)
    result = run("--domain", "d.test", "--private-key", str(tmp_path / "k.pem"), cwd=tmp_path)
    assert result.returncode == 2 and "--selector" in one_line(result.stderr)
    assert not (tmp_path / "k.pem").exists()
    # a config that is named must load
    missing = tmp_path / "nowhere.toml"
    result = run("--config", str(missing), "--domain", "d.test", "--selector", "s",
                 "--private-key", str(tmp_path / "k.pem"))
    assert result.returncode == 2 and str(missing) in one_line(result.stderr)


@pytest.mark.timeout(TIMEOUT)
def test_scripts_dkim_generate_is_the_same_command(tmp_path) -> None:
    script = REPO_ROOT / "scripts" / "dkim-generate"
    assert os.access(script, os.X_OK)
    key_path = tmp_path / "k.pem"
    result = run("--domain", DOMAIN, "--selector", SELECTOR, "--private-key", str(key_path),
                 "--key-type", "ed25519", argv0=[str(script)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    name, txt = parse_record(result.stdout)
    assert name == f"{SELECTOR}._domainkey.{DOMAIN}."
    raw = load_key(key_path).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64decode(tags(txt)["p"]) == raw
    result = run("--private-key", str(key_path), argv0=[str(script)], cwd=tmp_path)
    assert result.returncode == 2 and "--domain" in one_line(result.stderr)
