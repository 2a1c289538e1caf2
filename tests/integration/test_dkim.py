"""DKIM end to end (SPEC §6, §10): `hedwig dkim-generate` as an operator runs it, then a
real Hedwig signing with that key, delivering to a real sink, checked with dkimpy.

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

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.integration.test_delivery import delivery_config, message, outcome, send, sinks  # noqa: F401
from tests.support.proc import HOST, REPO_ROOT, read_journal, split_received, to_toml, wait_until

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


# -- signing in the relay ----------------------------------------------------------------


def dkim_server(key_path: Path, key_type: str, **server: Any) -> dict[str, Any]:
    config = delivery_config(**server)
    config["server"]["dkim"] = {"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key_path),
                                "key_type": key_type}
    return config


def as_pkcs1(key_path: Path) -> None:
    """Rewrite a generated RSA key as PKCS#1 ("BEGIN RSA PRIVATE KEY"), as older tools write them."""
    pem = load_key(key_path).private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption())
    key_path.write_bytes(pem)
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")


def split_signature(data: bytes) -> tuple[bytes, bytes]:
    assert data.startswith(b"DKIM-Signature: "), data[:200]
    end = re.search(rb"\r\n(?![ \t])", data).end()
    return data[:end], data[end:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["rsa-pkcs8", "rsa-pkcs1", "ed25519"])
def test_relayed_mail_is_signed_and_verifies_with_the_printed_record(hedwig, sinks, tmp_path, kind) -> None:
    key_type = "ed25519" if kind == "ed25519" else "rsa"
    key_path, record = generate(tmp_path, "--key-type", key_type)
    if kind == "rsa-pkcs1":
        as_pkcs1(key_path)
    sink = sinks()
    proc = hedwig(dkim_server(key_path, key_type, routes={"dest.test": f"{HOST}:{sink.port}"}))
    data = (b"From: Alice <alice@signer.test>\r\nTo: bob@dest.test\r\nSubject: signed  mail\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <" + kind.encode() + b"@signer.test>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nX-Unsigned: yes\r\n\r\n"
            b"Hello,\r\n.leading dot\r\n\r\nbye \r\n")
    msg_id = send(proc.port, ["bob@dest.test"], data)
    assert outcome(proc, msg_id) == "delivered"
    [got] = sink.messages
    signature, rest = split_signature(got.data)
    assert split_received(rest)[1] == data  # SPEC §10: only fields on top are added
    dnsfunc = dnsfunc_for(record)
    assert dkim.verify(got.data, dnsfunc=dnsfunc) is True
    assert dnsfunc.asked == [f"{SELECTOR}._domainkey.{DOMAIN}.".encode()]
    fields = dict(t.strip().split("=", 1) for t in re.sub(rb"\r\n[ \t]", b"", signature)
                  .decode().split(":", 1)[1].split(";"))
    assert fields["a"] == ("ed25519-sha256" if key_type == "ed25519" else "rsa-sha256")
    assert (fields["c"], fields["d"], fields["s"]) == ("relaxed/relaxed", DOMAIN, SELECTOR)
    assert [h.strip() for h in fields["h"].split(":")] == [
        "from", "to", "subject", "date", "message-id", "mime-version", "content-type"]
    # the test can fail: a signed header or the body changed after signing
    assert dkim.verify(got.data.replace(b"Subject: signed  mail", b"Subject: signed mail!"),
                       dnsfunc=dnsfunc) is False
    assert dkim.verify(got.data.replace(b"To: bob@dest.test", b"To: eve@dest.test"), dnsfunc=dnsfunc) is False
    assert dkim.verify(got.data.replace(b"Hello,", b"Hullo"), dnsfunc=dnsfunc) is False
    # ... and with another key's record (same name) it does not verify either
    _, other = generate(tmp_path, "--key-type", key_type, name="other.pem")
    assert dkim.verify(got.data, dnsfunc=dnsfunc_for(other)) is False


@pytest.mark.timeout(60)
def test_one_signature_per_message_for_all_its_domains_and_big_messages(hedwig, sinks, tmp_path) -> None:
    key_path, record = generate(tmp_path)
    one, two = sinks(), sinks()
    proc = hedwig(dkim_server(key_path, "rsa", routes={"one.test": f"{HOST}:{one.port}",
                                                        "two.test": f"{HOST}:{two.port}"}))
    data = message("two-domains")
    msg_id = send(proc.port, ["a@one.test", "b@two.test"], data)
    assert outcome(proc, msg_id) == "delivered"
    [a], [b] = one.messages, two.messages
    assert a.data == b.data  # signed once, the same bytes to both domains
    assert dkim.verify(a.data, dnsfunc=dnsfunc_for(record)) is True
    # a message beyond SIGN_IN_THREAD (64 KiB) is signed in the threadpool: same result
    big = message("big", b"".join(b"line %06d of a big message  \r\n" % i for i in range(12000)))
    assert len(big) > 300_000
    msg_id = send(proc.port, ["c@one.test"], big)
    assert outcome(proc, msg_id) == "delivered"
    got = one.messages[-1].data
    assert split_received(split_signature(got)[1])[1] == big
    assert dkim.verify(got, dnsfunc=dnsfunc_for(record)) is True


@pytest.mark.timeout(60)
def test_a_signing_failure_defers_and_nothing_goes_out_unsigned(hedwig, sinks, tmp_path) -> None:
    key_path, record = generate(tmp_path, "--key-type", "ed25519")
    sink = sinks()
    proc = hedwig(dkim_server(key_path, "ed25519", routes={"dest.test": f"{HOST}:{sink.port}"},
                              max_retries=2))
    # dkimpy cannot parse a header section with a line that is no header field
    broken = b"From: a@signer.test\r\nthis line is no header field\r\nSubject: x\r\n\r\nbody\r\n"
    bad_id = send(proc.port, ["bob@dest.test"], broken)

    def deferred_once() -> bool:
        return read_journal(proc.spool)[0].get(bad_id, {}).get("attempts") == 1

    wait_until(deferred_once, 10, what="the signing failure to be journalled as a deferral")
    state = read_journal(proc.spool)[0][bad_id]
    assert "DKIM signing failed" in state["error"], state
    assert re.search(rf"msg_id={bad_id} local error: DKIM signing failed", proc.log_text())
    # the worker goes on: a good message is signed and delivered meanwhile
    good_id = send(proc.port, ["carol@dest.test"], message("good"))
    assert outcome(proc, good_id) == "delivered"
    # after max_retries the broken one bounces; it never reached the sink
    assert outcome(proc, bad_id) == "bounced"
    assert [m.rcpt_tos for m in sink.messages] == [["carol@dest.test"]]
    assert dkim.verify(sink.messages[0].data, dnsfunc=dnsfunc_for(record)) is True
    assert "Traceback" not in proc.log_text()


BAD_KEYS = {
    "garbage": (b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n", "rsa",
                "not a PEM private key"),
    "wrong type": (None, "ed25519", 'holds an rsa key but server.dkim.key_type is "ed25519"'),
}


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_a_bad_key_stops_serve_and_check_config_with_one_line(hedwig, tmp_path, case) -> None:
    content, key_type, expected = BAD_KEYS[case]
    key_path, _ = generate(tmp_path)  # an RSA key
    if content is not None:
        key_path.write_bytes(content)
    proc = hedwig(dkim_server(key_path, key_type), ready=False)
    assert proc.wait(15) == 2
    text = proc.last_log().strip()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("config: server.dkim.private_key: ") and expected in lines[0], lines[0]
    result = run("--config", str(proc.config_path),
                 argv0=[sys.executable, str(REPO_ROOT / "hedwig.py"), "check-config"])
    assert result.returncode == 2
    assert one_line(result.stderr) == lines[0]
