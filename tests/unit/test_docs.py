"""The operator files agree with the code: README, conf/example.toml, the Grafana
dashboard, the systemd unit, the container config and .ci/run.

Each test reads files only; a key added to hedwig/config.py's KEYS, or a metric
to SPEC §8, fails here until the documentation names it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from hedwig.config import KEYS, REQUIRED, Key, load_config

ROOT = Path(__file__).resolve().parents[2]

# SPEC §8, the metrics every deployment can count on.
METRICS = (
    "hedwig_queue_depth", "hedwig_retry_attempts_total", "hedwig_connection_pool_entries",
    "hedwig_dkim_signing_latency_seconds", "hedwig_emails_received_total",
    "hedwig_emails_sent_total", "hedwig_emails_deferred_total", "hedwig_emails_bounced_total",
    "hedwig_emails_dropped_total", "hedwig_worker_jobs_processed_total",
    "hedwig_worker_job_duration_seconds", "hedwig_send_latency_seconds",
    "hedwig_send_attempts_total",
)
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


def _read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of a `## heading` section of a Markdown file, up to the next `## `."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def _plain(key: Key) -> str:
    """server.listeners[].addr -> server.listeners.addr, as a TOML file spells it."""
    return key.path.replace("[]", "")


# --- conf/example.toml --------------------------------------------------------------


def _example_keys(text: str) -> set[str]:
    """Dotted paths of every key and table in a TOML file, commented out or not."""
    found: set[str] = set()
    table = ""
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if header := re.fullmatch(r"\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?", line):
            table = header[1]
            found.add(table)
        elif assignment := re.match(r'("?)([A-Za-z0-9_]+)\1\s*=', line):
            found.add(f"{table}.{assignment[2]}" if table else assignment[2])
    return found


def test_example_toml_names_every_key() -> None:
    found = _example_keys(_read("conf/example.toml"))
    missing = [k.path for k in KEYS if _plain(k) not in found]
    assert not missing, f"conf/example.toml does not mention {missing}"


# --- README.md ---------------------------------------------------------------------


def _reference_rows() -> dict[str, str]:
    """key -> default cell of README's configuration reference table."""
    rows = {}
    for line in _section(_read("README.md"), "Configuration reference").splitlines():
        if m := re.match(r"\| `([^`]+)` \| ([^|]*) \|", line):
            rows[m[1]] = m[2].strip()
    return rows


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def test_readme_reference_lists_every_key_and_no_other() -> None:
    rows = _reference_rows()
    paths = [k.path for k in KEYS]
    assert [p for p in paths if p not in rows] == [], "keys missing from README's table"
    assert [r for r in rows if r not in paths] == [], "README's table names unknown keys"


def test_readme_reference_defaults_match_the_code() -> None:
    rows = _reference_rows()
    for key in KEYS:
        if key.default is REQUIRED:
            assert rows[key.path] == "required", key.path
        elif key.default is not None:  # None: derived or unset, described in words
            assert rows[key.path] == f"`{_toml(key.default)}`", key.path


def test_readme_lists_every_metric() -> None:
    section = _section(_read("README.md"), "Metrics")
    assert [m for m in METRICS if f"`{m}`" not in section] == []


def test_readme_commands_are_what_ci_runs() -> None:
    """The two commands at the top: run it (with a config that loads), test it (= .ci/run)."""
    readme = _read("README.md")
    commands = re.findall(r"^    (\S.*)$", readme.split("\n## ", 1)[0], re.M)
    assert commands[:2] == [
        "pip install -r requirements.txt && python hedwig.py --config conf/hedwig.toml",
        "pip install -r requirements-dev.txt && python -m pytest",
    ]
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines()]
    assert commands[1] in ci_lines
    load_config(str(ROOT / "conf" / "hedwig.toml"))


# --- conf/grafana-dashboard.json ----------------------------------------------------------


def _panel_exprs(dashboard: dict) -> list[str]:
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_dashboard_parses_and_charts_every_metric() -> None:
    dashboard = json.loads(_read("conf/grafana-dashboard.json"))
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    exprs = _panel_exprs(dashboard)
    used = {HISTOGRAM_SERIES.sub("", name)
            for expr in exprs for name in re.findall(r"\bhedwig_[a-z_]+", expr)}
    assert [m for m in METRICS if m not in used] == [], "metrics without a panel"
    assert sorted(used - set(METRICS)) == [], "panels query metrics Hedwig does not have"
    text = " ".join(exprs)
    assert re.search(r"by \(le, domain\) \(rate\(hedwig_send_latency_seconds_bucket", text)
    assert re.search(r"by \(domain, status\) \(rate\(hedwig_send_attempts_total", text)


def test_dashboard_uses_the_datasource_input() -> None:
    dashboard = json.loads(_read("conf/grafana-dashboard.json"))
    sources = {json.dumps(p["datasource"]) for p in dashboard["panels"] if "datasource" in p}
    sources |= {json.dumps(v["datasource"]) for v in dashboard["templating"]["list"]}
    assert sources == {json.dumps({"type": "prometheus", "uid": "${DS_PROMETHEUS}"})}


# --- conf/hedwig.service ------------------------------------------------------------------


def _unit(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if (m := re.fullmatch(r"([A-Za-z]+)=(.*)", line.strip())):
            settings.setdefault(m[1], []).append(m[2])
    return settings


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "min" else 1)


def test_systemd_unit() -> None:
    unit = _unit(_read("conf/hedwig.service"))
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert " serve " in unit["ExecStart"][0] + " "
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # SIGTERM to the master alone; it stops its workers within the grace period, and
    # SPEC §10 gives every process 15 s: systemd must not SIGKILL before that.
    assert unit["KillMode"] == ["mixed"]
    assert _seconds(unit["TimeoutStopSec"][0]) > 15
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert "CAP_NET_BIND_SERVICE" in unit["AmbientCapabilities"][0]


# --- Dockerfile and conf/docker.toml -----------------------------------------------------


def test_container_config_listens_everywhere_but_relays_for_loopback_only() -> None:
    dockerfile = _read("Dockerfile")
    assert "COPY conf/docker.toml /etc/hedwig/hedwig.toml" in dockerfile
    config = load_config(str(ROOT / "conf" / "docker.toml"))
    assert [lst.host for lst in config.server.listeners] == ["0.0.0.0"]
    exposed = re.search(r"^EXPOSE (.*)$", dockerfile, re.M)
    assert exposed and str(config.server.listeners[0].port) in exposed[1].split()
    # Not an open relay: no users, so only loopback may relay (SPEC §2 default).
    assert not config.server.auth
    assert config.server.relay_networks
    assert all(net.network_address.is_loopback and net.broadcast_address.is_loopback
               for net in config.server.relay_networks)
    assert config.storage.base_path.startswith("/var/lib/hedwig/")
    assert re.search(r'^VOLUME \["/var/lib/hedwig"\]$', dockerfile, re.M)
