"""The chart's optional operator extras: the Grafana dashboard ConfigMap and the PrometheusRule
alerts (off by default). Their queries name only metrics the processes export (checked against
the live prometheus_client registry) and select this release's scraped series.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.unit.deploy.test_helm_chart import CHART, by_kind, helm, needs_helm, render

DASHBOARD = CHART / "dashboards" / "personalkv.json"
PRODUCTION = CHART / "values-production.yaml"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
# Read from kube-state-metrics (kube-prometheus-stack ships it), not from PersonalKV.
FOREIGN_METRICS = {"kube_deployment_status_replicas_available"}
ALERTS = {"PersonalKVNoServingReplicas", "PersonalKVAnswerTTFTHigh", "PersonalKVAnswerQueueFull",
          "PersonalKVReconcilerSkipped", "PersonalKVCachingFailures",
          "PersonalKVQueueDepthUnknown"}


def exported_metric_names() -> set[str]:
    """Every sample name the PersonalKV processes can export (families with their suffixes)."""
    import importlib

    from personalkv import observability
    from personalkv.service_layer.chunk_cache import ChunkCache
    from prometheus_client import REGISTRY

    importlib.import_module("personalkv.service_layer.reconciler")  # reconciler_skipped
    if observability._watched_cache is None:  # as the answering process registers it
        observability.watch_chunk_cache(ChunkCache(0))

    names = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(
            family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:personalkv|kube)_[a-z0-9_]+)\b", expr))


def balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for c in re.sub(r'"[^"]*"', '""', expr):  # brackets inside label values do not count
        if c in "([{":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack


def check_queries(exprs: list[str]) -> None:
    known = exported_metric_names() | FOREIGN_METRICS
    assert exprs
    for expr in exprs:
        assert balanced(expr), expr
        used = metrics_in(expr)
        assert used and used <= known, (expr, used - known)


def test_dashboard_is_grafana_json_over_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "personalkv" and len(dashboard["panels"]) >= 10
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    check_queries(exprs)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    assert all('namespace="$namespace"' in e for e in exprs)
    covered = set().union(*map(metrics_in, exprs))
    for name in ("personalkv_answer_time_to_first_token_seconds_bucket",
                 "personalkv_queue_depth_up", "personalkv_reconciler_skipped_total",
                 "personalkv_answer_rejected_total", "personalkv_tasks_total"):
        assert name in covered, name
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


@needs_helm
def test_dashboard_and_rules_are_off_by_default():
    docs = render()
    assert not by_kind(docs, "PrometheusRule")
    assert all(not n.endswith("dashboard") for n in by_kind(docs, "ConfigMap"))


@needs_helm
@pytest.mark.parametrize("values", [PRODUCTION, ALL_OPTIONS], ids=["production", "all-options"])
def test_dashboard_configmap_carries_the_file_and_the_sidecar_label(values):
    docs = render(values=values)
    (dashboard,) = [c for c in by_kind(docs, "ConfigMap").values()
                    if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "grafana_folder" in dashboard["metadata"]["annotations"]
    assert json.loads(dashboard["data"]["personalkv.json"]) == json.loads(DASHBOARD.read_text())


@needs_helm
@pytest.mark.parametrize("values, ttft, queue_full", [(PRODUCTION, 5, 0), (ALL_OPTIONS, 2.5, 0.5)],
                         ids=["production", "all-options"])
def test_alert_rules_query_exported_metrics_of_this_release(values, ttft, queue_full):
    docs = render(values=values)
    (rule,) = by_kind(docs, "PrometheusRule").values()
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == ALERTS
    check_queries([r["expr"] for r in alerts.values()])
    for r in alerts.values():
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert re.fullmatch(r"\d+m", r["for"]) and r["annotations"]["summary"]
    # Series are selected by the labels the ServiceMonitor's scrape gives: this namespace and
    # the Services it scrapes (all of them match the rules' service regex).
    namespace = "default"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s["metadata"]["name"] for s in docs if s["kind"] == "Service"
               and selector.items() <= s["metadata"]["labels"].items()]
    pattern = re.search(r'service=~"([^"]+)"', alerts["PersonalKVCachingFailures"]["expr"])[1]
    assert len(scraped) == 4 and all(re.fullmatch(pattern, n) for n in scraped), scraped
    answering = next(n for n in scraped if n.endswith("-answering"))
    for name in ("PersonalKVAnswerTTFTHigh", "PersonalKVAnswerQueueFull"):
        assert f'service="{answering}"' in alerts[name]["expr"]
    for r in alerts.values():
        assert f'namespace="{namespace}"' in r["expr"]
    serving = alerts["PersonalKVNoServingReplicas"]["expr"]
    deployments = [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"]
    pattern = re.search(r'deployment=~"([^"]+)"', serving)[1]
    assert sorted(n for n in deployments if re.fullmatch(pattern, n)) == sorted(
        n for n in deployments if n.endswith(("-ingestion", "-answering")))
    # thresholds from the values; Prometheus' own templating survives Helm's
    assert alerts["PersonalKVAnswerTTFTHigh"]["expr"].endswith(f"> {ttft}")
    assert alerts["PersonalKVAnswerQueueFull"]["expr"].endswith(f"> {queue_full}")
    assert "{{ $labels.deployment }}" in alerts["PersonalKVNoServingReplicas"]["annotations"][
        "summary"]


@needs_helm
def test_rules_without_the_service_monitor_are_refused():
    result = helm("template", "r", str(CHART), "--set", "metrics.prometheusRule.enabled=true",
                  check=False)
    assert result.returncode != 0 and "needs metrics.serviceMonitor.enabled" in result.stderr
