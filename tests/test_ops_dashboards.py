"""ops/: dashboard queries and alert rules name only exported metrics, and the reference lists every one.

The list of exported names comes from a real scrape of a gateway with
every optional part configured (a concurrency limit, a rate limit, Redis
sync), not from a list written here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import admin_socket_dir
from tests.e2e.obs_support import metrics_address, request, scrape_text

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "nexus.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
README = ROOT / "ops" / "README.md"

# PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        word = match.group(0)
        if following.startswith("(") or word in _KEYWORDS or word.startswith("__"):
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def test_metric_names_parser():
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(nexus_a_bucket{route="x"}[5m]))) / on (job) nexus_b > 1'
    assert metric_names(expr) == {"nexus_a_bucket", "nexus_b"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def documented_metrics() -> set[str]:
    """Return the metric names in the first column of the table in ops/README.md."""
    return set(re.findall(r"^\| `(nexus_[a-z_]+)` \|", README.read_text(), re.MULTILINE))


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.e2e
def test_every_query_names_an_exported_metric(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    socket = admin_socket_dir(tmp_path) / "a.sock"
    config = f"""
listen: ["127.0.0.1:0"]
workers: 2
admin: {{socket: {json.dumps(str(socket))}, metrics: "127.0.0.1:0"}}
redis: {{url: "redis://127.0.0.1:6379", key_prefix: "nexus-ops-test-{os.getpid()}"}}
upstreams:
  app:
    targets: [{json.dumps(upstream.url)}]
    concurrency: {{initial_limit: 10}}
routes:
  - {{name: echo, upstream: app, rate_limit: {{rate: 1000/s}}}}
"""
    gateway = gateway_factory(config, workers=2)
    assert request(gateway.url) == 200
    text = scrape_text(metrics_address(gateway.log()))
    names = exported_names(text)
    assert "nexus_http_requests_total" in names
    assert "nexus_redis_sync_lag_seconds" in names

    families = {family.name + ("_total" if family.type == "counter" else "") for family in text_string_to_metric_families(text)}
    assert documented_metrics() == families, "ops/README.md lists other metrics than the gateway exports"

    queries = dashboard_queries() + [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    assert len(queries) > 30
    unknown = {}
    for title, expr in queries:
        read = metric_names(expr)
        assert read, f"{title}: the query reads no metric: {expr}"
        # `up` is Prometheus's own series for every scrape target.
        missing = read - names - {"up"}
        if missing:
            unknown[title] = sorted(missing)
    assert unknown == {}, "queries name metrics the gateway does not export"


def test_dashboard_shape():
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Traffic", "Latency", "Errors", "Cache", "Rate limits", "Upstream health", "Redis sync", "Process"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]


def test_alert_rules_shape():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "NexusHighErrorRatio",
        "NexusHighP99Latency",
        "NexusTargetDown",
        "NexusRedisSyncLag",
        "NexusRingDrops",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket")
        assert rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_scrape_config_loads_the_rules():
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    job = config["scrape_configs"][0]
    assert job["job_name"] == "nexus" and job["metrics_path"] == "/metrics"
