"""The fleet test (issue 12): four daemons, one host drained with `ctl evacuate`, watched by a real Prometheus.

Four `sevmigd serve` daemons with their own addresses: in four network namespaces on one bridge when
root can make them (sevmigd/testing/netns.py NetStar; the Prometheus server then runs in the switch's
namespace), else on loopback ports. The source runs six 32 MiB guests under load (dirty rate, shared
pages, page flips), one of them with the NOSEND policy. `evacuate --max-parallel 2` must move the five
movable guests round-robin to the other three hosts, each verifying on arrival, leave the NOSEND guest
running with its reason (exit status 1), and never run more than two migrations at once: the source's
high-water gauge says so. A real Prometheus server (Debian's `prometheus`; the second test skips with the
reason where it is not installed) scrapes all four daemons every second; read back through its HTTP
query API, the succeeded counters went up by five and the bytes processed equal `ctl jobs`' figures.

The scenario runs once per module (a fixture); the tests read its results. Every wait has a deadline.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

from sevmigd.testing import netns
from sevmigd.testing import prometheus as prom
from sevmigd.testing.daemons import start_daemon

pytestmark = pytest.mark.slow

GUEST_MIB = 32
MOVABLE = ("g1", "g2", "g3", "g4", "g5")
NOSEND = "nosend"
NOSEND_POLICY = 0x08
EVACUATE_TIMEOUT_S = 300
NETNS_REASON = netns.star_available()
PROM_REASON = prom.available()


def scrape(address: str, launcher: list[str]) -> str:
    url = f"http://{address}/metrics"
    if launcher:  # the daemon listens inside its namespace: ask from there
        r = subprocess.run([*launcher, sys.executable, "-c",
                            "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen(sys.argv[1],"
                            "timeout=30).read().decode())", url], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not exported")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    hosts, daemons, server = None, [], None
    star = None
    try:
        if NETNS_REASON is None:
            star = netns.NetStar(4).__enter__()
            hosts = [(star.ip[i], star.exec_prefix(i)) for i in range(4)]
        else:
            hosts = [("127.0.0.1", []) for _ in range(4)]
        for i, (ip, launcher) in enumerate(hosts):
            cfg = {"metrics_listen": f"{ip}:{9446 if launcher else 0}", "max_outgoing": 4}
            daemons.append(start_daemon(root, f"h{i}", listen=f"{ip}:0", launcher=launcher, config=cfg,
                                        log_level="info"))
        src, dests = daemons[0], daemons[1:]
        metrics = [d.ready["metrics"] for d in daemons]
        if PROM_REASON is None:
            listen = f"{star.switch_ip}:9090" if star is not None else "127.0.0.1:0"
            server = prom.PrometheusServer(root / "prometheus", metrics, listen=listen,
                                           launcher=star.switch_prefix() if star is not None else ())
            server.start()
            # every target scraped once before anything moves: the counters' starting values are known
            server.wait_for('up{job="sevmigd"} == 1', lambda r: len(r) == 4)
        for i, name in enumerate(MOVABLE):
            src.execute("launch", {"name": name, "memory": f"{GUEST_MIB}M", "dirty_rate": 6.0, "working_set": 8.0,
                                   "shared_fraction": 0.2, "flip_rate": 2.0, "seed": 11 + i})
        src.execute("launch", {"name": NOSEND, "memory": f"{GUEST_MIB}M", "policy": NOSEND_POLICY, "dirty_rate": 2.0})
        before = None
        if server is not None:
            before = server.value(f'sum(sevmigd_migrations_succeeded_total{{instance="{metrics[0]}",role="source"}})')
        to = ",".join(d.address for d in dests)
        dry = src.ctl("evacuate", "--to", to, "--max-parallel", "2", "--dry-run")
        res = src.ctl("evacuate", "--to", to, "--max-parallel", "2", "--json", timeout=EVACUATE_TIMEOUT_S)
        jobs = src.ctl_json("jobs")
        yield {"src": src, "dests": dests, "metrics": metrics, "hosts": hosts, "dry": dry, "res": res,
               "report": json.loads(res.stdout) if res.stdout.strip() else None, "jobs": jobs,
               "prometheus": server, "before": before, "netns": star is not None}
    finally:
        if server is not None:
            server.stop()
        for d in daemons:
            d.cleanup()
        if star is not None:
            star.__exit__(None, None, None)


def test_evacuate_moves_every_movable_guest_within_max_parallel(fleet):
    src, dests, res, report = fleet["src"], fleet["dests"], fleet["res"], fleet["report"]
    # the dry run said what would happen and moved nothing
    dry = fleet["dry"]
    assert dry.returncode == 1 and "1 guest(s) would be left" in dry.stdout, dry.stdout + dry.stderr
    assert "NOSEND" in dry.stdout and dry.stdout.count("planned") == 5
    # the evacuation: exit 1 because the NOSEND guest is left; the other five arrived
    assert res.returncode == 1, res.stderr
    rows = {r["guest"]: r for r in report["guests"]}
    assert set(rows) == {*MOVABLE, NOSEND}
    assert rows[NOSEND]["state"] == "left" and "NOSEND" in rows[NOSEND]["reason"]
    assert report["left"] == 1 and report["counts"] == {"done": 5, "left": 1}
    addresses = [d.address for d in dests]
    for i, name in enumerate(MOVABLE):  # round-robin in name order
        assert rows[name]["state"] == "done", rows[name]
        assert rows[name]["to"] == addresses[i % 3], rows[name]
        assert rows[name]["percent"] == 100.0 and rows[name]["downtime_ms"] is not None
        dest = dests[i % 3]
        st = dest.execute("status", {"name": name})
        assert st["state"] == "running" and st["sev_state"] == "RUNNING", st
        v = dest.execute("verify", {"name": name})
        assert v["ok"] and v["mismatch_count"] == 0 and v["pages_checked"] > 0, v
    left = {g["name"]: g for g in src.execute("list")["guests"]}
    assert left[NOSEND]["state"] == "running" and left[NOSEND]["job"] is None
    assert src.execute("verify", {"name": NOSEND})["ok"]
    assert all(left[n]["state"] == "migrated" for n in MOVABLE)
    # never more than two at once, and two did run together (read from the source's metrics)
    text = scrape(fleet["metrics"][0], fleet["hosts"][0][1])
    assert sample(text, "sevmigd_outgoing_migrations_high_water") == 2
    assert sample(text, "sevmigd_migrations_succeeded_total", role="source") == 5
    assert sample(text, "sevmigd_guests", state="running") == 1
    assert sample(text, "sevmigd_guests", state="migrated") == 5
    assert sample(text, "sevmigd_outgoing_queue_length") == 0
    assert fleet["jobs"]["high_water"] == 2
    incoming = sum(sample(scrape(m, h[1]), "sevmigd_migrations_succeeded_total", role="destination")
                   for m, h in zip(fleet["metrics"][1:], fleet["hosts"][1:]))
    assert incoming == 5


@pytest.mark.skipif(PROM_REASON is not None, reason=f"no Prometheus server: {PROM_REASON}")
def test_prometheus_reads_the_evacuation_back(fleet):
    server, src_metrics = fleet["prometheus"], fleet["metrics"][0]
    assert fleet["before"] == 0
    inst = f'instance="{src_metrics}"'
    # Prometheus scrapes every second: wait (bounded) for a scrape taken after the evacuation ended
    server.wait_for(f'sevmigd_migrations_succeeded_total{{{inst},role="source"}}',
                    lambda r: len(r) == 1 and r[0][1] == 5)
    after = server.value(f'sum(sevmigd_migrations_succeeded_total{{{inst},role="source"}})')
    assert after - fleet["before"] == 5
    dests = "|".join(fleet["metrics"][1:])
    assert server.value(f'sum(sevmigd_migrations_succeeded_total{{instance=~"{dests}",role="destination"}})') == 5
    # bytes processed: Prometheus' figures equal what `ctl jobs` reports, per migration and in total
    jobs = [j for j in fleet["jobs"]["jobs"] if j["state"] == "completed"]
    assert len(jobs) == 5
    ctl_bytes = {j["job"]: j["stats"]["transferred"] for j in jobs}
    per = server.query(f'sevmigd_migration_data_processed_bytes{{{inst},role="source"}}')
    assert {lab["migration"]: val for lab, val in per} == ctl_bytes
    total = server.value(f'sevmigd_migrations_data_processed_bytes_total{{{inst},role="source"}}')
    assert total == sum(ctl_bytes.values())
    assert server.value(f'max_over_time(sevmigd_outgoing_migrations_high_water{{{inst}}}[5m])') == 2
    # the PSP histograms were scraped too: every SEND_START of the source was timed
    assert server.value(f'sum(sevmigd_psp_command_duration_seconds_count{{{inst},command="SEND_START"}})') == 5


README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("## Operating a fleet")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_metric_names_are_the_exported_ones(fleet):
    """Every metric the README's table names is exported by a daemon that has migrated (and vice versa
    for the sevmigd_ families), so the documented alert rules refer to real series."""
    from prometheus_client.parser import text_string_to_metric_families

    documented = set(re.findall(r"`(sevmigd_[a-z_]+)`", _readme_section()))
    text = scrape(fleet["metrics"][0], fleet["hosts"][0][1])
    exported = set()
    for fam in text_string_to_metric_families(text):
        exported.add(fam.name + ("_total" if fam.type == "counter" else ""))
    assert documented == exported, (sorted(documented - exported), sorted(exported - documented))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian "
                    "package `prometheus`)")
def test_readme_prometheus_config_and_alert_rules_are_valid(tmp_path):
    config, rules = re.findall(r"```yaml\n(.*?)```", _readme_section(), re.S)
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "rules.yml").write_text(rules)
    for args in (["check", "config", str(tmp_path / "prometheus.yml")], ["check", "rules", str(tmp_path / "rules.yml")]):
        r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
