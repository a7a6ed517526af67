"""`GET /metrics` follows the edge's API-key rule unless `--metrics-unauthenticated`; each app has
a registry of its own (several apps in one process do not share or clash)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sllm.api.app import create_app
from sllm.config import Settings

KEY = "sk-test-metrics-0123456789"


def _app(tmp_path, name: str, **settings):
    return create_app(Settings(storage_path=tmp_path / name, num_cpus=3, num_gpus=0, **settings))


def _names(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


def _series_names(text: str) -> set[str]:
    """Every series name a query may use: counters end in _total, histograms have three."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {
        f.name + suffix
        for f in text_string_to_metric_families(text)
        for suffix in suffixes.get(f.type, [""])
    }


def _dashboard_metrics() -> set[str]:
    path = Path(__file__).parents[2] / "examples" / "grafana" / "sllm-dashboard.json"
    exprs = [
        t["expr"] for p in json.loads(path.read_text())["panels"] for t in p.get("targets", [])
    ]
    return set(re.findall(r"sllm_[a-z_]+", " ".join(exprs)))


def test_metrics_need_the_key_like_every_route(tmp_path):
    with TestClient(_app(tmp_path, "a", api_keys=[KEY])) as c:
        r = c.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        text = r.text
    assert 'sllm_resources{kind="cpu",state="free"} 3.0' in text
    assert {"sllm_fine_tuning_jobs", "sllm_fine_tuning_queue_wait_seconds", "sllm_instances"} <= (
        _names(text)
    )
    # the refused scrape was counted, by its route template
    assert 'sllm_requests_total{code="401",method="GET",route="/metrics"} 1.0' in text
    plotted = _dashboard_metrics()
    assert len(plotted) >= 10 and plotted <= _series_names(text), plotted - _series_names(text)


def test_metrics_unauthenticated_opens_only_metrics(tmp_path):
    app = _app(tmp_path, "b", api_keys=[KEY], metrics_unauthenticated=True)
    other = _app(tmp_path, "c")  # a second app in the same process: its own registry
    with TestClient(app) as c, TestClient(other) as d:
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/fine_tuning/jobs/job-x/logs").status_code == 401
        for _ in range(3):
            d.get("/health")
        text = d.get("/metrics").text
        assert 'sllm_requests_total{code="200",method="GET",route="/health"} 3.0' in text
        assert 'route="/health"' not in c.get("/metrics").text
        r = d.get("/v1/fine_tuning/jobs/job-x/logs")
        assert r.status_code == 404 and r.json()["error"]["param"] == "job_id"
        assert 'route="/nowhere"' not in d.get("/nowhere").text + d.get("/metrics").text
        assert 'route="unmatched"' in d.get("/metrics").text
